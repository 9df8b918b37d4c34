//! The agent's state, shared by its loops and handlers behind one lock.

use std::sync::Arc;

use anyhow::{Context as _, Result};
use tokio::sync::Mutex;
use tracing::warn;

use super::announce::Announce;
use crate::{
    api::InterfaceStatus,
    balancer::Balancer,
    collector::Collector,
    config::Config,
    datapath::{DecapMaps, FlowTable, KernelDatapath},
    lifecycle::Lifecycle,
};

pub(crate) struct State {
    pub(crate) config: Config,
    pub(crate) balancer: Option<Balancer<KernelDatapath>>,
    pub(crate) decap: Option<DecapMaps>,
    pub(crate) interfaces: Vec<InterfaceStatus>,
    pub(crate) collector: Collector,
    pub(crate) lifecycle: Lifecycle,
    /// A handle on the connection table for `lbctl flows`, read without the lock.
    pub(crate) flows: Option<Arc<FlowTable>>,
    /// The VIP routes for BIRD, with `[announce]`.
    pub(crate) announce: Option<Announce>,
    /// Notified by `lbctl shutdown`.
    pub(crate) stop: Arc<tokio::sync::Notify>,
    /// `lbctl shutdown --detach`: remove the pinned datapath on the way out.
    pub(crate) detach: bool,
    /// The bypass source intermediary (a client host).
    pub(crate) bypass: Option<super::bypass::Source>,
    /// The bypass sender's counters (a backend host).
    pub(crate) bypass_sent: Option<Arc<super::bypass_send::SendStats>>,
}

pub(crate) type Shared = Arc<Mutex<State>>;

const NO_BALANCER: &str = "this agent runs no balancer";

impl State {
    /// The balancer, or the error a request to a decap-only agent gets.
    pub(crate) fn balancer(&self) -> Result<&Balancer<KernelDatapath>> {
        self.balancer.as_ref().context(NO_BALANCER)
    }

    /// The balancer and the lifecycle, to change both.
    pub(crate) fn balancer_and_lifecycle(
        &mut self,
    ) -> Result<(&mut Balancer<KernelDatapath>, &mut Lifecycle)> {
        let bal = self.balancer.as_mut().context(NO_BALANCER)?;
        Ok((bal, &mut self.lifecycle))
    }

    /// Persists the lifecycle; a failure is logged, the agent goes on.
    pub(crate) fn save_lifecycle(&self) {
        if let Some(b) = &self.config.balancer {
            if let Err(e) = self.lifecycle.save(&b.state_file) {
                warn!("persisting the lifecycle state: {e:#}");
            }
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch: lifecycle times survive a
/// restart.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
