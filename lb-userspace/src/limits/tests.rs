//! Unit tests of `limits`.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
};

use super::{listen::Listen, testing::*, *};

#[tokio::test]
async fn connections_beyond_the_bound_wait_in_the_backlog() {
    let path = socket_path("bound");
    let listener = UnixListener::bind(&path).unwrap();
    let (open, most, served) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let counters = (open.clone(), most.clone(), served.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let bound = Bound {
        name: "test",
        max_connections: 8,
    };
    let server = tokio::spawn(serve(
        listener,
        bound,
        async move {
            let _ = stopped.await;
        },
        move |mut stream: UnixStream| {
            let (open, most, served) = counters.clone();
            async move {
                let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Held open until the client closes.
                let _ = stream.read_to_end(&mut Vec::new()).await;
                open.fetch_sub(1, Ordering::SeqCst);
                served.fetch_add(1, Ordering::SeqCst);
            }
        },
    ));
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(UnixStream::connect(&path).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        most.load(Ordering::SeqCst),
        8,
        "idle clients hold at most the bound of accepted connections"
    );
    drop(clients);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while served.load(Ordering::SeqCst) < 40 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        served.load(Ordering::SeqCst),
        40,
        "the waiting ones are served"
    );
    let _ = stop.send(());
    server.await.unwrap();
    let _ = std::fs::remove_file(&path);
}

/// A listener out of descriptors.
struct Exhausted(Arc<AtomicUsize>);

impl Listen for Exhausted {
    type Stream = UnixStream;
    async fn accept(&mut self) -> io::Result<UnixStream> {
        self.0.fetch_add(1, Ordering::Relaxed);
        tokio::task::yield_now().await;
        Err(io::Error::from_raw_os_error(libc::EMFILE))
    }
}

#[tokio::test]
async fn accept_errors_pause_the_loop_and_are_logged_once_per_period() {
    let (logs, _guard) = capture_logs();
    let calls = Arc::new(AtomicUsize::new(0));
    let bound = Bound {
        name: "test",
        max_connections: 8,
    };
    serve(
        Exhausted(calls.clone()),
        bound,
        tokio::time::sleep(Duration::from_secs(2)),
        |_| async {},
    )
    .await;
    let calls = calls.load(Ordering::Relaxed);
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let lines = logs.lines().count();
    assert!((2..=20).contains(&calls), "{calls} accept calls in 2 s");
    assert!(lines <= 2, "{lines} log lines in 2 s:\n{logs}");
    assert!(logs.contains("Too many open files"), "{logs}");
}

/// Connections to `port` on IPv4 loopback that the server accepted
/// (established and with a socket; those in the backlog have none).
fn accepted_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f[1].rsplit(':').next().unwrap();
            u16::from_str_radix(local, 16) == Ok(port) && f[3] == "01" && f[9] != "0"
        })
        .count()
}

/// An HTTP server with a bound of `max` connections, 500 ms to send a
/// request's head and `lifetime` per connection; `/big` answers 32 MiB.
async fn http_server(max: usize, lifetime: Duration) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .route("/metrics", axum::routing::get(|| async { "up 1\n" }))
        .route(
            "/big",
            axum::routing::get(|| async { vec![b'x'; 32 << 20] }),
        );
    let bound = HttpBound {
        bound: Bound {
            name: "test",
            max_connections: max,
        },
        header_timeout: Duration::from_millis(500),
        lifetime,
    };
    tokio::spawn(serve_http(listener, router, bound));
    addr
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n");
    c.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
        .await
        .expect("served")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn idle_http_clients_are_bounded_and_closed() {
    let addr = http_server(4, Duration::from_secs(30)).await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(accepted_on(addr.port()), 4, "accepted of 20 idle clients");
    // Four at a time, each closed 500 ms after it was accepted.
    let started = tokio::time::Instant::now();
    for mut c in idle {
        let read = tokio::time::timeout(Duration::from_secs(10), c.read(&mut [0u8; 1])).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(get(addr, "/metrics").await.ends_with("up 1\n"));
    // A kept-alive connection idle after its response is closed too.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), kept.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "idle after a response: closed");
    assert!(String::from_utf8_lossy(&got).ends_with("up 1\n"));
}

#[tokio::test]
async fn a_client_that_does_not_read_is_cut_at_the_connection_lifetime() {
    let addr = http_server(4, Duration::from_secs(1)).await;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /big HTTP/1.1\r\nHost: lb\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection is closed");
    assert!(got.len() < 32 << 20, "cut before the whole response");
}

#[test]
fn local_errors_are_the_agents_shortages() {
    for (errno, local) in [
        (libc::EMFILE, true),
        (libc::ENFILE, true),
        (libc::ENOBUFS, true),
        (libc::ENOMEM, true),
        (libc::EADDRNOTAVAIL, true),
        (libc::EAGAIN, true),
        (libc::ECONNREFUSED, false),
        (libc::ECONNRESET, false),
        (libc::EHOSTUNREACH, false),
        (libc::ENETUNREACH, false),
        (libc::ETIMEDOUT, false),
    ] {
        let e = io::Error::from_raw_os_error(errno);
        assert_eq!(is_local(&e), local, "{e}");
    }
    assert!(!is_local(&io::Error::other("not an OS error")));
}

#[test]
fn the_soft_file_limit_is_raised_to_the_hard_limit() {
    if !testing::in_child("limits::tests::the_soft_file_limit_is_raised_to_the_hard_limit") {
        return;
    }
    let (_, hard) = file_limit().unwrap();
    let low = libc::rlimit {
        rlim_cur: 256.min(hard),
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the rlimit it is given.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
    raise_file_limit();
    assert_eq!(file_limit().unwrap(), (hard, hard));
}
