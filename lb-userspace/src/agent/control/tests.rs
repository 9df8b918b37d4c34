//! Unit tests of the control API's reading and its limits, on socket pairs
//! served by `answer` with a handler that needs no datapath.

use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

fn limits(budget: usize, max_request: usize, read_timeout: Duration) -> RequestLimits {
    RequestLimits::new(budget, max_request, (read_timeout, Duration::from_secs(5)))
}

/// The API answers root only; the tests need to be root to get past that.
fn not_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let skip = unsafe { libc::geteuid() } != 0;
    if skip {
        eprintln!("skipped: the control API answers root only");
    }
    skip
}

async fn handled(req: Request) -> Response {
    Response::Maintenance {
        message: format!("handled {req:?}"),
    }
}

/// A connection served by `answer`: the client's halves.
fn connect(
    limits: &RequestLimits,
) -> (
    tokio::net::unix::OwnedReadHalf,
    tokio::net::unix::OwnedWriteHalf,
) {
    let (client, server) = UnixStream::pair().unwrap();
    let limits = limits.clone();
    tokio::spawn(async move {
        let _ = answer(server, &limits, handled).await;
    });
    client.into_split()
}

/// The response to what the client sent, or `None` when the connection
/// closed (or stayed silent for 5 s) without one. (The agent may close with
/// part of a request unread: the client reads the response, then a reset.)
async fn response(read: &mut tokio::net::unix::OwnedReadHalf) -> Option<Response> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), read.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
    serde_json::from_slice(&out).ok()
}

async fn ask(limits: &RequestLimits, request: &[u8]) -> Option<Response> {
    let (mut read, mut write) = connect(limits);
    write.write_all(request).await.unwrap();
    write.shutdown().await.unwrap();
    response(&mut read).await
}

fn error_of(r: Option<Response>) -> String {
    match r {
        Some(Response::Error { message }) => message,
        other => panic!("expected an error response, got {other:?}"),
    }
}

#[tokio::test]
async fn requests_are_answered_and_bad_ones_get_errors() {
    if not_root() {
        return;
    }
    let l = limits(1 << 20, 1 << 16, Duration::from_secs(5));
    let ok = ask(&l, b"{\"command\":\"maintenance_status\"}\n").await;
    assert!(
        matches!(&ok, Some(Response::Maintenance { message }) if message.contains("MaintenanceStatus")),
        "{ok:?}"
    );
    let e = error_of(ask(&l, b"{\"command\":\"apply\",\"config\":\"\xff\xfe\"}\n").await);
    assert!(e.contains("UTF-8"), "{e}");
    let e = error_of(ask(&l, b"{\"command\":\"nonsense\"}\n").await);
    assert!(e.contains("malformed request"), "{e}");
    let e = error_of(ask(&l, &vec![b' '; 100_000]).await);
    assert!(e.contains("larger than"), "{e}");
}

#[tokio::test]
async fn a_silent_client_gets_an_error_at_the_read_timeout() {
    if not_root() {
        return;
    }
    let l = limits(1 << 20, 1 << 16, Duration::from_millis(300));
    let (mut read, _write) = connect(&l);
    let e = error_of(response(&mut read).await);
    assert!(e.contains("no complete request within"), "{e}");
    // Half a request, then silence.
    let (mut read, mut write) = connect(&l);
    write.write_all(b"{\"command\":").await.unwrap();
    let e = error_of(response(&mut read).await);
    assert!(e.contains("no complete request within"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_requests_stay_within_the_budget() {
    if not_root()
        || !crate::limits::testing::in_child(
            "agent::control::tests::concurrent_large_requests_stay_within_the_budget",
        )
    {
        return;
    }
    const MIB: usize = 1 << 20;
    const BUDGET: usize = 64 * MIB;
    let l = limits(BUDGET, 16 * MIB, Duration::from_secs(10));
    let chunk: Arc<[u8]> = vec![b' '; MIB].into();
    let peak = crate::limits::testing::PeakRss::start();
    // 20 clients each send 50 MiB at once.
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let (l, chunk) = (l.clone(), chunk.clone());
            tokio::spawn(async move {
                let (mut read, mut write) = connect(&l);
                for _ in 0..50 {
                    if write.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                drop(write);
                response(&mut read).await
            })
        })
        .collect();
    for c in clients {
        let e = error_of(c.await.unwrap());
        assert!(
            e.contains("larger than 16 MiB") || e.contains("requests at once"),
            "{e}"
        );
    }
    let grew = peak.growth_mib();
    eprintln!("resident memory grew by {grew} MiB at most");
    assert!(
        grew < ((BUDGET >> 20) + 48) as u64,
        "resident memory grew by {grew} MiB"
    );
    // The budget is whole again.
    assert_eq!(l.budget.available_permits(), BUDGET);
    let ok = ask(&l, b"{\"command\":\"status\"}\n").await;
    assert!(matches!(ok, Some(Response::Maintenance { .. })), "{ok:?}");
}
