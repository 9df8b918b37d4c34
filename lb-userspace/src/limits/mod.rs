//! What keeps clients from using up the agent: the descriptor limit,
//! raised at start; listeners with a bound on open connections (the others
//! wait in the kernel's backlog and cost no descriptor) and a pause after an
//! accept error instead of a loop that spins and logs each one; HTTP
//! connections with deadlines. And what tells the agent's own shortage from
//! a peer's failure (`is_local`), and a log that speaks once per period.
//!
//! - `listen`: the accept loop and the HTTP connections.

use std::{
    io,
    time::{Duration, Instant},
};

use tracing::{info, warn};

mod listen;

pub(crate) use listen::{serve, serve_http, Bound, HttpBound};

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
pub(crate) mod testing;
#[cfg(test)]
mod tests;
