//! Checks and load polls against real HTTP servers on loopback.

use std::sync::{atomic::AtomicUsize, Arc};

use axum::{
    body::Body,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::config::TlsCheck;

#[test]
fn fall_and_rise_need_streaks() {
    let mut t = Tracker::default();
    assert_eq!(t.record(false, 2, 3), None);
    assert_eq!(t.record(false, 2, 3), None);
    assert_eq!(
        t.record(true, 2, 3),
        None,
        "a success resets the failure streak"
    );
    assert_eq!(t.record(false, 2, 3), None);
    assert_eq!(t.record(false, 2, 3), None);
    assert_eq!(t.record(false, 2, 3), Some(false));
    assert!(!t.up);
    assert_eq!(t.record(false, 2, 3), None);
    assert_eq!(t.record(true, 2, 3), None);
    assert_eq!(t.record(true, 2, 3), Some(true));
    assert!(t.up);
}

/// Out of descriptors, a check cannot open its socket: that is the
/// agent's trouble, not the backend's.
#[tokio::test]
async fn a_check_without_a_descriptor_is_a_local_error() {
    if !crate::limits::testing::in_child(
        "health::tests::a_check_without_a_descriptor_is_a_local_error",
    ) {
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tcp = HealthCheck {
        kind: HealthKind::Tcp,
        ..HealthCheck::default()
    };
    check(&Clients::default(), addr, &tcp).await.unwrap();
    // No descriptor above the highest open one.
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|d| d.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    let mut limits = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a valid rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limits);
        let full = libc::rlimit {
            rlim_cur: highest + 1,
            rlim_max: limits.rlim_max,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &full);
    }
    // Fill the holes below it.
    let held: Vec<std::fs::File> = std::iter::from_fn(|| std::fs::File::open("/dev/null").ok())
        .take(1 << 16)
        .collect();
    let result = check(&Clients::default(), addr, &tcp).await;
    drop(held);
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limits) };
    match result {
        Err(CheckError::Local(e)) => {
            assert!(format!("{e:#}").contains("Too many open files"), "{e:#}")
        }
        other => panic!("expected a local error, got {other:?}"),
    }
    assert_eq!(local_errors(), 1);
}

#[tokio::test]
async fn tcp_and_http_checks_on_loopback() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let status = if String::from_utf8_lossy(&buf[..n]).contains("GET /bad") {
                503
            } else {
                200
            };
            let _ = s
                .write_all(format!("HTTP/1.0 {status} X\r\n\r\n").as_bytes())
                .await;
        }
    });
    let tcp = HealthCheck {
        kind: HealthKind::Tcp,
        ..HealthCheck::default()
    };
    check(&Clients::default(), addr, &tcp).await.unwrap();
    let clients = Clients::default();
    let http = |path: &str| HealthCheck {
        kind: HealthKind::Http {
            path: path.into(),
            expect_status: 200,
            tls: None,
        },
        ..HealthCheck::default()
    };
    check(&clients, addr, &http("/ok")).await.unwrap();
    let err = check(&clients, addr, &http("/bad")).await.unwrap_err();
    assert!(format!("{err:#}").contains("503"), "{err:#}");
    // Nothing listens on port 1 of loopback.
    assert!(check(&clients, "127.0.0.1:1".parse().unwrap(), &tcp)
        .await
        .is_err());
}

/// A backend's HTTP server: what checks and load polls meet in the field.
fn backend_routes() -> Router {
    Router::new()
        .route("/ok", get(|| async { "fine" }))
        .route(
            "/moved",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/ok")], "") }),
        )
        .route("/big", get(|| async { vec![b'x'; MAX_BODY + 1] }))
        .route(
            "/load",
            get(|| async {
                // Chunked: the body's length is not known in advance.
                let parts = ["{\"lo", "ad\": 0.", "25}"]
                    .map(|p| Ok::<_, std::io::Error>(axum::body::Bytes::from(p)));
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    Body::from_stream(futures::stream::iter(parts)),
                )
                    .into_response()
            }),
        )
}

/// Serves `backend_routes` on loopback, over TLS when `tls` is given;
/// returns its address and how many connections it accepted.
async fn serve_backend(tls: Option<tokio_rustls::TlsAcceptor>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = TowerToHyperService::new(backend_routes());
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(s), service).await;
                    }
                    Some(acceptor) => {
                        if let Ok(s) = acceptor.accept(s).await {
                            let _ = http.serve_connection(TokioIo::new(s), service).await;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

fn http_check(path: &str, tls: Option<TlsCheck>) -> HealthCheck {
    HealthCheck {
        kind: HealthKind::Http {
            path: path.into(),
            expect_status: 200,
            tls,
        },
        ..HealthCheck::default()
    }
}

#[tokio::test]
async fn http_checks_keep_the_connection_and_refuse_redirects_and_big_bodies() {
    let (addr, accepted) = serve_backend(None).await;
    let clients = Clients::default();
    for _ in 0..3 {
        check(&clients, addr, &http_check("/ok", None))
            .await
            .unwrap();
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "three checks, one connection"
    );
    let e = check(&clients, addr, &http_check("/moved", None))
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("redirects are not followed"),
        "{e:#}"
    );
    let e = check(&clients, addr, &http_check("/big", None))
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains(&format!("over {MAX_BODY} bytes")),
        "{e:#}"
    );
    let e = check(&clients, addr, &http_check("/missing", None))
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("HTTP status 404, expected 200"),
        "{e:#}"
    );
}

#[tokio::test]
async fn load_reports_may_be_chunked_and_must_be_json() {
    let (addr, _) = serve_backend(None).await;
    let clients = Clients::default();
    assert_eq!(
        fetch_load(&clients, addr, "/load", 2000).await.unwrap(),
        0.25
    );
    let e = fetch_load(&clients, addr, "/ok", 2000).await.unwrap_err();
    assert!(format!("{e:#}").contains("not {\"load\": number}"), "{e:#}");
    let e = fetch_load(&clients, addr, "/moved", 2000)
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("HTTP status 302"), "{e:#}");
}

/// A CA, and a certificate it signed for `backend.test` and 127.0.0.1.
fn test_pki() -> (String, tokio_rustls::TlsAcceptor) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["backend.test".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca.pem(), tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[tokio::test]
async fn https_checks_verify_the_certificate() {
    let (ca_pem, acceptor) = test_pki();
    let (addr, accepted) = serve_backend(Some(acceptor)).await;
    let clients = Clients::default();
    let tls = |name: Option<&str>| TlsCheck {
        server_name: name.map(str::to_string),
        ca_pem: Some(ca_pem.clone().into_bytes()),
    };
    // By name (SNI and verification) and by the backend's IP address.
    for t in [tls(Some("backend.test")), tls(None)] {
        check(&clients, addr, &http_check("/ok", Some(t.clone())))
            .await
            .unwrap();
        check(&clients, addr, &http_check("/ok", Some(t)))
            .await
            .unwrap();
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "one TLS connection per client"
    );
    let e = check(
        &clients,
        addr,
        &http_check("/ok", Some(tls(Some("other.test")))),
    )
    .await
    .unwrap_err();
    assert!(
        format!("{e:#}").to_lowercase().contains("certificate"),
        "{e:#}"
    );
    // The system's roots do not know the test CA.
    let system = TlsCheck {
        server_name: None,
        ca_pem: None,
    };
    let e = check(&clients, addr, &http_check("/ok", Some(system)))
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").to_lowercase().contains("certificate"),
        "{e:#}"
    );
    // Plain HTTP to a TLS port is no pass either.
    assert!(check(&clients, addr, &http_check("/ok", None))
        .await
        .is_err());
}
