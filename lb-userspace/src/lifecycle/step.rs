//! One step of a VIP's lifecycle: what the collector saw comes in, drains
//! end, hooks start, returning backends come back, pending backends drain
//! while capacity allows, and a rollout completes.

use std::{collections::BTreeMap, net::IpAddr};

use tracing::{info, warn};

use super::{
    load::damping,
    record::{HookJob, HookRun, Observation, Phase, VipLife},
};
use crate::{balancer::Service, config::VipConfig};

/// Moves one VIP on. Returns whether a phase, a hook or the rollout moved:
/// news to persist (flows, loads and spare capacity move at every step and
/// are not).
pub(super) fn step_vip(
    life: &mut VipLife,
    cfg: &VipConfig,
    obs: &BTreeMap<IpAddr, Observation>,
    now_ms: u64,
    jobs: &mut Vec<HookJob>,
) -> bool {
    observe(life, cfg, obs);
    let mut changed = end_drains(life, cfg, now_ms);
    changed |= start_hooks(life, cfg, jobs);
    changed |= return_unchecked(life, cfg, now_ms);
    changed |= start_drains(life, cfg, obs, now_ms);
    changed |= follow_rollout(life, cfg, obs, now_ms);
    changed
}

/// Takes in each backend's flows and damps its load level.
fn observe(life: &mut VipLife, cfg: &VipConfig, obs: &BTreeMap<IpAddr, Observation>) {
    let (smoothing, _) = damping(cfg);
    for (a, r) in life.backends.iter_mut() {
        if let Some(o) = obs.get(a) {
            r.flows = o.flows;
            r.load = match (r.load, o.load) {
                (Some(prev), Some(now)) => Some(prev + smoothing * (now - prev)),
                (_, now) => now,
            };
        }
    }
}

/// Drains that are over (no flows left, or the timeout) go in maintenance.
fn end_drains(life: &mut VipLife, cfg: &VipConfig, now_ms: u64) -> bool {
    let m = &cfg.maintenance;
    let mut changed = false;
    for (a, r) in life.backends.iter_mut() {
        if r.phase != Phase::Draining {
            continue;
        }
        let timed_out = now_ms.saturating_sub(r.since_ms) >= m.drain_timeout_s * 1000;
        if r.flows > 0 && !timed_out {
            continue;
        }
        if r.flows > 0 {
            warn!(vip = life.name, backend = %a, flows_cut = r.flows, "drain timeout: taking the backend out with flows left");
            r.flows_cut += r.flows;
        } else {
            info!(vip = life.name, backend = %a, "drained");
        }
        r.enter(Phase::InMaintenance, now_ms);
        changed = true;
        r.hook = if m.hook.is_some() {
            HookRun::Due
        } else {
            HookRun::Idle
        };
    }
    changed
}

/// Due hooks become jobs for the agent to run.
fn start_hooks(life: &mut VipLife, cfg: &VipConfig, jobs: &mut Vec<HookJob>) -> bool {
    let m = &cfg.maintenance;
    let mut changed = false;
    for (a, r) in life.backends.iter_mut() {
        if r.phase != Phase::InMaintenance || r.hook != HookRun::Due {
            continue;
        }
        changed = true;
        let Some(argv) = &m.hook else {
            r.hook = HookRun::Idle;
            continue;
        };
        r.hook = HookRun::Running;
        r.hook_runs += 1;
        jobs.push(HookJob {
            vip: (cfg.address, cfg.port, cfg.protocol),
            backend: *a,
            argv: argv.clone(),
            env: vec![
                ("LB_VIP_NAME".into(), cfg.name.clone()),
                ("LB_VIP_ADDRESS".into(), cfg.address.to_string()),
                ("LB_VIP_PORT".into(), cfg.port.to_string()),
                ("LB_VIP_PROTOCOL".into(), cfg.protocol.to_string()),
                ("LB_BACKEND".into(), a.to_string()),
                ("LB_GENERATION".into(), life.generation.to_string()),
                ("LB_FLOWS_CUT".into(), r.flows_cut.to_string()),
            ],
            timeout_s: m.hook_timeout_s,
        });
    }
    changed
}

/// Without health checks, a backend whose hook succeeded is back at once.
fn return_unchecked(life: &mut VipLife, cfg: &VipConfig, now_ms: u64) -> bool {
    if cfg.health.is_some() {
        return false;
    }
    let mut changed = false;
    let generation = life.generation;
    for (a, r) in life.backends.iter_mut() {
        if r.phase == Phase::Returning {
            r.enter(Phase::Active, now_ms);
            changed = true;
            r.generation = generation;
            info!(vip = life.name, backend = %a, generation, "back from maintenance, up to date");
        }
    }
    changed
}

/// Drains to start, unhealthy backends first (they cost no capacity); the
/// first one held sets the VIP's `held` reason and stops the pass.
fn start_drains(
    life: &mut VipLife,
    cfg: &VipConfig,
    obs: &BTreeMap<IpAddr, Observation>,
    now_ms: u64,
) -> bool {
    life.held = None;
    let mut pending: Vec<(bool, IpAddr)> = cfg
        .backends
        .iter()
        .filter(|b| life.backends[&b.address].phase == Phase::MaintenancePending)
        .map(|b| (obs.get(&b.address).is_some_and(|o| o.healthy), b.address))
        .collect();
    pending.sort_by_key(|(healthy, _)| *healthy);
    let mut changed = false;
    for (healthy, a) in pending {
        if let Some(reason) = hold(life, cfg, obs, healthy, a) {
            life.held = Some(reason);
            break;
        }
        let r = life.backends.get_mut(&a).expect("pending backend exists");
        r.enter(Phase::Draining, now_ms);
        changed = true;
        r.flows_at_drain = r.flows;
        info!(vip = life.name, backend = %a, flows = r.flows, "draining");
    }
    changed
}

/// Why the pending backend `a` may not start draining now, if it may not.
fn hold(
    life: &VipLife,
    cfg: &VipConfig,
    obs: &BTreeMap<IpAddr, Observation>,
    healthy: bool,
    a: IpAddr,
) -> Option<String> {
    let m = &cfg.maintenance;
    // With load reports configured, capacity is unknown until every healthy
    // backend has reported (after a start, say): no drain starts blind.
    if healthy && cfg.feedback.is_some() {
        let unreported: Vec<IpAddr> = obs
            .iter()
            .filter(|(_, o)| o.healthy && o.load.is_none())
            .map(|(a, _)| *a)
            .collect();
        if !unreported.is_empty() {
            return Some(format!(
                "waiting for the load reports of {}",
                addresses(&unreported)
            ));
        }
    }
    let failed: Vec<IpAddr> = life
        .backends
        .iter()
        .filter(|(_, r)| r.phase == Phase::HookFailed)
        .map(|(a, _)| *a)
        .collect();
    if !failed.is_empty() {
        return Some(format!("halted: the hook of {} failed", addresses(&failed)));
    }
    let out = life
        .backends
        .values()
        .filter(|r| r.phase.out_for_maintenance())
        .count() as u32;
    if out >= m.max_parallel {
        return Some(format!(
            "{out} backend(s) out for maintenance, max_parallel = {}",
            m.max_parallel
        ));
    }
    if !healthy {
        return None;
    }
    match spare(life, cfg, obs, Some(a)) {
        Some(s) if s >= m.min_spare => None,
        Some(s) => Some(format!(
            "spare capacity without {a} would be {:.0}%, under min_spare {:.0}%",
            s * 100.0,
            m.min_spare * 100.0
        )),
        None => Some(format!("{a} is the last backend taking new flows")),
    }
}

/// Records the spare capacity, and completes a running rollout once every
/// backend is active and up to date.
fn follow_rollout(
    life: &mut VipLife,
    cfg: &VipConfig,
    obs: &BTreeMap<IpAddr, Observation>,
    now_ms: u64,
) -> bool {
    life.spare = spare(life, cfg, obs, None);
    let Some(r) = life.rollout.as_mut().filter(|r| r.running()) else {
        return false;
    };
    r.min_spare_seen = match (r.min_spare_seen, life.spare) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let done = life
        .backends
        .values()
        .all(|b| b.phase == Phase::Active && b.generation >= r.generation);
    if !done {
        return false;
    }
    r.finished_ms = Some(now_ms);
    info!(
        vip = life.name,
        generation = r.generation,
        "rollout complete"
    );
    true
}

/// Spare capacity of the VIP's backends with `without` taken out of service
/// (see the `lifecycle` module comment); `None` when no capacity would be
/// left.
fn spare(
    life: &VipLife,
    cfg: &VipConfig,
    obs: &BTreeMap<IpAddr, Observation>,
    without: Option<IpAddr>,
) -> Option<f64> {
    let mut demand = 0.0;
    let mut capacity = 0.0;
    for b in &cfg.backends {
        let (Some(r), Some(o)) = (life.backends.get(&b.address), obs.get(&b.address)) else {
            continue;
        };
        if !o.healthy {
            continue;
        }
        let weight = f64::from(b.weight);
        if matches!(
            r.phase,
            Phase::Active | Phase::MaintenancePending | Phase::Draining
        ) {
            demand += o.load.unwrap_or(0.0) * weight;
        }
        if r.phase.service() == Service::Serving && Some(b.address) != without {
            capacity += cfg.maintenance.load_limit * weight;
        }
    }
    (capacity > 0.0).then(|| 1.0 - demand / capacity)
}

/// "a, b, c" for log lines and reasons.
fn addresses(list: &[IpAddr]) -> String {
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
