//! Client connections through the VIP that live across the tests' events,
//! and the probe that tells which of them broke.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use super::Ecmp;
use crate::topology::in_netns;

impl Ecmp {
    /// Runs `f` in the client's namespace.
    pub fn from_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.ns("cl"), f)
            .join()
            .expect("client thread panicked")
    }

    /// `n` TCP connections to `vip` from the client, each with the name of
    /// the backend that answered.
    pub fn open_connections(&self, vip: SocketAddr, n: usize) -> Vec<Connection> {
        self.from_client(move || {
            (0..n)
                .map(|_| Connection::open(vip).expect("a connection through the VIP"))
                .collect()
        })
    }
}

/// A long-lived client connection and the backend it reached.
pub struct Connection {
    pub stream: TcpStream,
    pub backend: String,
}

impl Connection {
    pub fn open(vip: SocketAddr) -> std::io::Result<Connection> {
        use std::io::BufRead as _;
        let stream = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut reader = std::io::BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::Error::other("closed before the backend answered"));
        }
        Ok(Connection {
            stream,
            backend: line.trim().to_string(),
        })
    }
}

/// Sends a message on every connection, then reads every echo within
/// `patience` (TCP retransmits while the router converges). Returns the
/// indexes of connections that broke (reset, closed, or no echo in time).
pub fn probe(conns: &mut [Connection], round: u32, patience: Duration) -> Vec<usize> {
    use std::io::{Read as _, Write as _};
    let message = format!("ping {round:08}\n");
    let mut broken = Vec::new();
    for (i, c) in conns.iter_mut().enumerate() {
        if c.stream.write_all(message.as_bytes()).is_err() {
            broken.push(i);
        }
    }
    let deadline = Instant::now() + patience;
    for (i, c) in conns.iter_mut().enumerate() {
        if broken.contains(&i) {
            continue;
        }
        let mut buf = vec![0u8; message.len()];
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = c
            .stream
            .set_read_timeout(Some(left.max(Duration::from_millis(10))));
        match c.stream.read_exact(&mut buf) {
            Ok(()) if buf == message.as_bytes() => {}
            _ => broken.push(i),
        }
    }
    broken
}
