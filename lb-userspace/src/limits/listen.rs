//! The accept loop of the agent's listeners (the control socket, the
//! metrics address), with a bound on open connections and a pause after
//! errors, and the HTTP connections of the metrics address.

use std::{future::Future, io, sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::Semaphore,
};
use tracing::{debug, warn};

use super::LogEvery;

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

/// The largest request head (request line and headers) an HTTP listener
/// reads: past it the client gets 431 and the connection is closed.
const MAX_HEAD: usize = 16 * 1024;

/// Serves HTTP/1 requests on `listener` with `router`, within `bound`.
pub(crate) async fn serve_http(listener: TcpListener, router: axum::Router, bound: HttpBound) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(bound.header_timeout)
        .max_buf_size(MAX_HEAD);
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
