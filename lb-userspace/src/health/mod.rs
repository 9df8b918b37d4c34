//! Probes of backends: health checks (TCP connect, or HTTP(S) GET with an
//! expected status, through `http::Clients`) with the rise/fall thresholds that turn results into
//! up/down, load reports, and the schedule that runs both per (VIP, backend).

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tokio::net::TcpStream;

mod http;
mod schedule;

pub use http::{Clients, MAX_BODY};
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
pub async fn check(
    clients: &Clients,
    target: SocketAddr,
    hc: &HealthCheck,
) -> Result<(), CheckError> {
    probe(clients, target, hc).await.map_err(|e| {
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

async fn probe(clients: &Clients, target: SocketAddr, hc: &HealthCheck) -> Result<()> {
    let timeout = Duration::from_millis(hc.timeout_ms);
    tokio::time::timeout(timeout, async {
        match &hc.kind {
            HealthKind::Tcp => {
                TcpStream::connect(target).await.context("connect")?;
            }
            HealthKind::Http {
                path,
                expect_status,
                tls,
            } => {
                let answer = clients.get(target, path, tls.as_ref(), "*/*").await?;
                if answer.status.as_u16() != *expect_status {
                    return Err(http::wrong_status(&answer, *expect_status));
                }
            }
        }
        Ok(())
    })
    .await
    .context("timed out")?
}

/// Fetches a backend's load report: `GET path` answering `{"load": x}`.
pub async fn fetch_load(
    clients: &Clients,
    target: SocketAddr,
    path: &str,
    timeout_ms: u64,
) -> Result<f64> {
    tokio::time::timeout(Duration::from_millis(timeout_ms), async {
        let answer = clients.get(target, path, None, "application/json").await?;
        if answer.status != reqwest::StatusCode::OK {
            return Err(http::wrong_status(&answer, 200));
        }
        #[derive(serde::Deserialize)]
        struct Report {
            load: f64,
        }
        let report: Report =
            serde_json::from_slice(&answer.body).context("the body is not {\"load\": number}")?;
        if !report.load.is_finite() {
            bail!("load {} is not a number", report.load);
        }
        Ok(report.load)
    })
    .await
    .context("timed out")?
}

#[cfg(test)]
mod tests;
