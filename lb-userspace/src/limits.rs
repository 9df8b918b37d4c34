//! What keeps clients from using up the agent: the descriptor limit,
//! raised at start; listeners with a bound on open connections (the others
//! wait in the kernel's backlog and cost no descriptor) and a pause after an
//! accept error instead of a loop that spins and logs each one; HTTP
//! connections with deadlines. And what tells the agent's own shortage from
//! a peer's failure (`is_local`), and a log that speaks once per period.

use std::{
    future::Future,
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::Semaphore,
};
use tracing::{debug, info, warn};

/// The soft and hard limits on open descriptors.
fn file_limit() -> std::io::Result<(u64, u64)> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the rlimit it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((l.rlim_cur, l.rlim_max))
}

/// Raises the soft limit on open descriptors to the hard limit, and logs the
/// result. Service managers start daemons with a soft limit of 1024, which
/// a few hundred idle clients would otherwise use up, and with it the
/// sockets that health checks need.
pub fn raise_file_limit() {
    let (soft, hard) = match file_limit() {
        Ok(l) => l,
        Err(e) => {
            warn!("reading the open file limit: {e}");
            return;
        }
    };
    if soft < hard {
        let raised = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the rlimit it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            let e = std::io::Error::last_os_error();
            warn!(soft, hard, "raising the open file limit: {e}");
            return;
        }
    }
    info!(limit = hard, was = soft, "open file limit");
}

/// Whether `e` says the agent itself ran short (descriptors, kernel
/// buffers, memory, local ports) rather than that a peer failed.
pub fn is_local(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EADDRNOTAVAIL
                | libc::EAGAIN
        )
    )
}

/// A listener the accept loop takes connections from.
pub(crate) trait Listen {
    type Stream: Send + 'static;
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listen for TcpListener {
    type Stream = TcpStream;
    async fn accept(&mut self) -> io::Result<TcpStream> {
        TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

impl Listen for UnixListener {
    type Stream = UnixStream;
    async fn accept(&mut self) -> io::Result<UnixStream> {
        UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

/// How many connections of a listener may be open at once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bound {
    /// The listener's name in logs.
    pub(crate) name: &'static str,
    pub(crate) max_connections: usize,
}

/// The first pause after an accept error; it doubles while errors go on.
const ACCEPT_PAUSE: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// Accept errors of a listener are logged at most this often.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Accepts connections from `listener` until `shutdown` completes, and
/// serves each with `handle` in a task of its own. At most
/// `bound.max_connections` are open at once: the loop accepts only when one
/// may be, so the others wait in the kernel's backlog. After an accept error
/// (out of descriptors, say) the loop pauses, longer while errors go on.
pub(crate) async fn serve<L, F, Fut>(
    mut listener: L,
    bound: Bound,
    shutdown: impl Future<Output = ()>,
    handle: F,
) where
    L: Listen,
    F: Fn(L::Stream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let open = Arc::new(Semaphore::new(bound.max_connections));
    let mut pause = ACCEPT_PAUSE;
    let mut log = LogEvery::new(ACCEPT_LOG_EVERY);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            p = open.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok(stream) => {
                pause = ACCEPT_PAUSE;
                let served = handle(stream);
                tokio::spawn(async move {
                    served.await;
                    drop(permit);
                });
            }
            Err(e) => {
                if let Some(held) = log.ready() {
                    warn!(
                        listener = bound.name,
                        pause_ms = pause.as_millis() as u64,
                        "accept: {e} ({held} more since the last report); pausing"
                    );
                }
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
            }
        }
    }
}

/// How many connections of an HTTP listener may be open at once, and for
/// how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HttpBound {
    pub(crate) bound: Bound,
    /// How long a request's head may take to arrive, counted from the
    /// connection or the previous response.
    pub(crate) header_timeout: Duration,
    /// How long a connection lives: then it is closed after the response
    /// under way, if that takes at most `header_timeout` more.
    pub(crate) lifetime: Duration,
}

/// Serves HTTP/1 requests on `listener` with `router`, within `bound`.
pub(crate) async fn serve_http(listener: TcpListener, router: axum::Router, bound: HttpBound) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(bound.header_timeout);
    let forever = std::future::pending();
    serve(listener, bound.bound, forever, |stream| {
        let connection = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        async move {
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = tokio::time::sleep(bound.lifetime) => {
                    connection.as_mut().graceful_shutdown();
                    tokio::time::timeout(bound.header_timeout, connection)
                        .await
                        .unwrap_or(Ok(()))
                }
            };
            if let Err(e) = ended {
                debug!(listener = bound.bound.name, "HTTP connection: {e}");
            }
        }
    })
    .await;
}

/// Lets a repeated log message through once per period.
#[derive(Debug)]
pub struct LogEvery {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl LogEvery {
    pub const fn new(every: Duration) -> Self {
        LogEvery {
            every,
            last: None,
            held: 0,
        }
    }

    /// When the message may go out now: how many were held back since the
    /// last one.
    pub fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    };

    /// A fresh path for a Unix socket in the temporary directory.
    pub(crate) fn socket_path(name: &str) -> std::path::PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("lb-{name}-{}-{n}.sock", std::process::id()))
    }

    /// Log lines written while the guard lives (on this thread).
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    pub(crate) fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Logs(writer.clone()))
            .with_ansi(false)
            .finish();
        (buf, tracing::subscriber::set_default(subscriber))
    }

    /// Resident memory of this process in bytes.
    pub(crate) fn rss() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        // SAFETY: sysconf has no preconditions.
        pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
    }

    /// Samples resident memory every 2 ms until `growth` is asked for.
    pub(crate) struct PeakRss {
        before: u64,
        done: Arc<std::sync::atomic::AtomicBool>,
        sampler: std::thread::JoinHandle<u64>,
    }

    impl PeakRss {
        pub(crate) fn start() -> Self {
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stop = done.clone();
            let before = rss();
            let sampler = std::thread::spawn(move || {
                let mut peak = 0;
                while !stop.load(Ordering::Relaxed) {
                    peak = peak.max(rss());
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                peak.max(rss())
            });
            PeakRss {
                before,
                done,
                sampler,
            }
        }

        /// How much higher than at the start resident memory went, in MiB.
        pub(crate) fn growth_mib(self) -> u64 {
            self.done.store(true, Ordering::Relaxed);
            let peak = self.sampler.join().unwrap();
            peak.saturating_sub(self.before) >> 20
        }
    }

    /// Runs the test `name` (its path from the crate root) alone in a child
    /// process, for tests that change process-wide settings such as resource
    /// limits; returns true in that child, false in the parent once the
    /// child passed.
    pub(crate) fn in_child(name: &str) -> bool {
        const CHILD: &str = "LB_TEST_CHILD";
        if std::env::var(CHILD).is_ok_and(|n| n == name) {
            return true;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, name)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("1 passed"),
            "{name} in a child process:\n{text}"
        );
        false
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        time::Duration,
    };

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::{testing::*, *};

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
}
