//! What the lifecycle keeps of each VIP and backend (persisted as JSON), and
//! what it exchanges with the agent: hooks to run and observations.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::{
    balancer::{Service, VipIdent},
    config::Protocol,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Active,
    MaintenancePending,
    Draining,
    InMaintenance,
    Returning,
    HookFailed,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Active,
        Phase::MaintenancePending,
        Phase::Draining,
        Phase::InMaintenance,
        Phase::Returning,
        Phase::HookFailed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Active => "active",
            Phase::MaintenancePending => "maintenance-pending",
            Phase::Draining => "draining",
            Phase::InMaintenance => "in-maintenance",
            Phase::Returning => "returning",
            Phase::HookFailed => "hook-failed",
        }
    }

    /// Where the balancer puts a backend in this phase.
    pub fn service(self) -> Service {
        match self {
            Phase::Active | Phase::MaintenancePending => Service::Serving,
            Phase::Draining => Service::Draining,
            Phase::InMaintenance | Phase::Returning | Phase::HookFailed => Service::Out,
        }
    }

    /// Out of the table for maintenance (counts against `max_parallel`).
    pub(super) fn out_for_maintenance(self) -> bool {
        !matches!(self, Phase::Active | Phase::MaintenancePending)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookRun {
    /// Not running and not due.
    #[default]
    Idle,
    /// To be started at the next step.
    Due,
    Running,
}

/// One backend of a VIP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub phase: Phase,
    /// When the phase was entered (ms since the Unix epoch).
    pub since_ms: u64,
    /// The VIP generation of the backend's last completed maintenance.
    pub generation: u64,
    /// Flows (open or closing) it had when its drain started.
    pub flows_at_drain: u64,
    /// Flows (open or closing) at the last step.
    pub flows: u64,
    /// Flows cut by drain timeouts, over its lifetime.
    pub flows_cut: u64,
    pub hook_runs: u32,
    pub hook: HookRun,
    /// The last hook failure.
    pub last_error: Option<String>,
    /// Health checks passed in a row while returning.
    pub health_passes: u32,
    /// Damped load level at the last step (0..1 of its capacity), if known.
    pub load: Option<f64>,
    /// Disabled by an operator (`lbctl backend disable`): out of service
    /// whatever its phase. Kept here, its one home, so that it survives a
    /// restart.
    #[serde(default)]
    pub disabled: bool,
    /// The load the backend last reported (0 = idle, 1 = at its limit), not
    /// persisted: after a restart it is unknown until the next report.
    #[serde(skip)]
    pub reported_load: Option<f64>,
}

impl Record {
    pub(super) fn new(generation: u64, now_ms: u64) -> Self {
        Record {
            phase: Phase::Active,
            since_ms: now_ms,
            generation,
            flows_at_drain: 0,
            flows: 0,
            flows_cut: 0,
            hook_runs: 0,
            hook: HookRun::Idle,
            last_error: None,
            health_passes: 0,
            load: None,
            disabled: false,
            reported_load: None,
        }
    }

    pub(super) fn enter(&mut self, phase: Phase, now_ms: u64) {
        self.phase = phase;
        self.since_ms = now_ms;
    }

    /// Share of the flows it had at the start of its drain that are gone.
    pub fn drain_progress(&self) -> Option<f64> {
        match self.phase {
            Phase::Draining if self.flows_at_drain == 0 => Some(1.0),
            Phase::Draining => Some(
                1.0 - (self.flows.min(self.flows_at_drain) as f64 / self.flows_at_drain as f64),
            ),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub generation: u64,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub cancelled_ms: Option<u64>,
    /// Lowest spare capacity seen while it ran.
    pub min_spare_seen: Option<f64>,
}

impl Rollout {
    pub fn running(&self) -> bool {
        self.finished_ms.is_none() && self.cancelled_ms.is_none()
    }
}

/// The lifecycle of one VIP's backends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipLife {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub generation: u64,
    pub rollout: Option<Rollout>,
    pub backends: BTreeMap<IpAddr, Record>,
    /// Spare capacity of the backends taking new flows at the last step
    /// (`None`: none takes new flows).
    pub spare: Option<f64>,
    /// Why a pending backend is not draining yet.
    pub held: Option<String>,
}

impl VipLife {
    pub fn up_to_date(&self, r: &Record) -> bool {
        r.generation >= self.generation
    }
}

/// A hook to run: the program and arguments, its environment and timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookJob {
    pub vip: VipIdent,
    pub backend: IpAddr,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub timeout_s: u64,
}

/// What the agent observes of a backend of a VIP at a step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Observation {
    /// Flows of the VIP on the backend, open or closing.
    pub flows: u64,
    /// Load level (0..1 of its capacity), if known.
    pub load: Option<f64>,
    /// Neither down by health checks nor disabled by an operator.
    pub healthy: bool,
}
