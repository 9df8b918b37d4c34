//! Probes of backends: health checks (TCP connect or HTTP GET with an
//! expected status) with the rise/fall thresholds that turn results into
//! up/down, load reports, and the schedule that runs both per (VIP, backend).

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

mod schedule;

pub use schedule::{Probe, Schedule};

use crate::{
    config::{HealthCheck, HealthKind},
    limits,
};

/// Up/down with hysteresis: `fall` failures in a row take an up backend down,
/// `rise` successes in a row bring a down backend up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracker {
    pub up: bool,
    streak: u32,
}

impl Default for Tracker {
    /// A backend starts up: it takes traffic until checks say otherwise.
    fn default() -> Self {
        Tracker {
            up: true,
            streak: 0,
        }
    }
}

impl Tracker {
    /// Records one check result; returns the new state when it changed.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { fall } else { rise };
        if self.streak >= needed {
            self.up = ok;
            self.streak = 0;
            return Some(ok);
        }
        None
    }
}

/// Why a check did not pass.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The backend failed it: refused, timed out, a wrong answer.
    #[error("{0:#}")]
    Backend(anyhow::Error),
    /// The agent itself ran short (descriptors, buffers, memory, local
    /// ports): the check tells nothing of the backend.
    #[error("local error, not the backend's: {0:#}")]
    Local(anyhow::Error),
}

impl CheckError {
    pub fn is_local(&self) -> bool {
        matches!(self, CheckError::Local(_))
    }
}

/// Checks that ended on a local error since the agent started.
static LOCAL_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Checks that ended on a local error since the agent started (its one
/// health loop runs them all).
pub fn local_errors() -> u64 {
    LOCAL_ERRORS.load(Ordering::Relaxed)
}

/// Runs one check against `target`; `Ok(())` when the backend is healthy.
pub async fn check(target: SocketAddr, hc: &HealthCheck) -> Result<(), CheckError> {
    probe(target, hc).await.map_err(|e| {
        let local = e
            .chain()
            .filter_map(|c| c.downcast_ref::<std::io::Error>())
            .any(limits::is_local);
        if local {
            LOCAL_ERRORS.fetch_add(1, Ordering::Relaxed);
            CheckError::Local(e)
        } else {
            CheckError::Backend(e)
        }
    })
}

async fn probe(target: SocketAddr, hc: &HealthCheck) -> Result<()> {
    let timeout = Duration::from_millis(hc.timeout_ms);
    tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(target).await.context("connect")?;
        if let HealthKind::Http { path, expect_status } = &hc.kind {
            let request = format!(
                "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: lb-agent\r\nConnection: close\r\n\r\n",
                target.ip()
            );
            stream.write_all(request.as_bytes()).await?;
            let mut head = [0u8; 64];
            let mut n = 0;
            while n < 12 {
                let got = stream.read(&mut head[n..]).await?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            let line = String::from_utf8_lossy(&head[..n]);
            let status: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("not an HTTP response: {line:?}"))?;
            if status != *expect_status {
                bail!("HTTP status {status}, expected {expect_status}");
            }
        }
        Ok(())
    })
    .await
    .context("timed out")?
}

/// Fetches a backend's load report: `GET path` answering `{"load": x}`.
pub async fn fetch_load(target: SocketAddr, path: &str, timeout_ms: u64) -> Result<f64> {
    tokio::time::timeout(Duration::from_millis(timeout_ms), async {
        let mut stream = TcpStream::connect(target).await.context("connect")?;
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: lb-agent\r\nAccept: application/json\r\n\r\n",
            target.ip()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut response).await?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
        let status = head.split_whitespace().nth(1).unwrap_or("");
        if status != "200" {
            bail!("HTTP status {status}");
        }
        #[derive(serde::Deserialize)]
        struct Report {
            load: f64,
        }
        let report: Report = serde_json::from_str(body.trim()).context("the body is not {\"load\": number}")?;
        if !report.load.is_finite() {
            bail!("load {} is not a number", report.load);
        }
        Ok(report.load)
    })
    .await
    .context("timed out")?
}

#[cfg(test)]
mod tests {
    use super::*;

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
        check(addr, &tcp).await.unwrap();
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
        let result = check(addr, &tcp).await;
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
        check(addr, &tcp).await.unwrap();
        let http = |path: &str| HealthCheck {
            kind: HealthKind::Http {
                path: path.into(),
                expect_status: 200,
            },
            ..HealthCheck::default()
        };
        check(addr, &http("/ok")).await.unwrap();
        let err = check(addr, &http("/bad")).await.unwrap_err();
        assert!(format!("{err:#}").contains("503"), "{err:#}");
        // Nothing listens on port 1 of loopback.
        assert!(check("127.0.0.1:1".parse().unwrap(), &tcp).await.is_err());
    }
}
