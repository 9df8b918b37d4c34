//! What decides a (VIP, backend) pair's weight and whether its flows may stay:
//! the health checks' verdict and the lifecycle's placement.

use std::net::IpAddr;

use crate::config::Protocol;

/// A VIP as the balancer keys it: address, port, protocol.
pub type VipIdent = (IpAddr, u16, Protocol);

/// A backend of a VIP.
pub type Pair = (VipIdent, IpAddr);

/// Where the lifecycle puts a backend of a VIP, and the weight factors it
/// gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    pub backend: IpAddr,
    pub service: Service,
    /// Rollouts prefer up-to-date backends (1 = no preference).
    pub preference: f64,
    /// From the backend's load level (1 = unloaded).
    pub load_factor: f64,
}

/// Where the lifecycle puts a backend of a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Service {
    /// In the VIP's Maglev table.
    #[default]
    Serving,
    /// Out of the table; its established flows continue.
    Draining,
    /// Out of service (in maintenance, or disabled by an operator):
    /// established flows go elsewhere too.
    Out,
}

/// Everything that decides a pair's weight and whether its flows may stay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct PairState {
    /// A health check says down.
    pub(super) down: bool,
    pub(super) service: Service,
    /// Weight factor from the backend's load level.
    pub(super) load_factor: f64,
    /// Weight factor from the lifecycle (preferring up-to-date backends).
    pub(super) preference: f64,
}

impl Default for PairState {
    fn default() -> Self {
        PairState {
            down: false,
            service: Service::Serving,
            load_factor: 1.0,
            preference: 1.0,
        }
    }
}

impl PairState {
    pub(super) fn in_table(&self) -> bool {
        !self.down && self.service == Service::Serving
    }

    /// Whether established flows must leave the backend.
    pub(super) fn blocks_flows(&self) -> bool {
        self.down || self.service == Service::Out
    }

    /// The pair's weight in the VIP's table, from its configured weight.
    pub(super) fn weight(&self, configured: u32) -> u32 {
        if !self.in_table() || configured == 0 {
            return 0;
        }
        ((f64::from(configured) * self.load_factor * self.preference).round() as u32).max(1)
    }
}
