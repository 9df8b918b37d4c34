//! Backend lifecycle: maintenance drains, hooks and rolling upgrades.
//!
//! Each (VIP, backend) pair has a phase:
//! - `active`: in the VIP's Maglev table. It is *up-to-date* when its
//!   maintenance generation has reached the VIP's (a rollout raises the VIP's).
//! - `maintenance-pending`: marked for maintenance, still serving, waiting for
//!   capacity to drain.
//! - `draining`: out of the table (no new flows); established flows continue.
//! - `in-maintenance`: out of service; established flows go elsewhere. The
//!   hook runs here.
//! - `returning`: the hook succeeded; back once health checks pass `rise` times.
//! - `hook-failed`: the hook failed; the backend stays out and the VIP's
//!   rollout halts until an operator retries (`maintain`) or returns it.
//!
//! *Down* (failed health checks) is kept by the balancer and *disabled* (by an
//! operator) here, beside the phase; either takes a backend out whatever its
//! phase.
//!
//! The capacity rule: backend i has capacity weight_i and a load level load_i
//! (0..1 of its capacity, from its load reports and active flows over
//! `max_flows`). The demand is the sum of load_i × weight_i over backends that
//! carry flows (serving or draining), and the capacity is the sum of
//! load_limit × weight_i over backends that take new flows. Spare capacity is
//! 1 − demand / capacity. A pending backend starts draining only if the spare
//! capacity without it stays at or above `min_spare`, and while fewer than
//! `max_parallel` backends of the VIP are out for maintenance.
//!
//! Everything here is driven by `step` with a clock passed in (milliseconds
//! since the Unix epoch), so it is unit-tested with a fake datapath and a
//! fake clock. The state is persisted as JSON after every change, so an agent
//! restart resumes a rollout; a hook that was running is run again.
//!
//! - `record`: what is kept per VIP and backend, hooks and observations.
//! - `step`: one step of a VIP (drains, hooks, capacity, rollouts).
//! - `load`: load levels, their damping, and weight factors.
//! - `hook`: the hook runner.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

mod hook;
mod load;
mod record;
mod step;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub use hook::run_hook;
pub use load::{load_level, weight_factor};
pub use record::{HookJob, HookRun, Observation, Phase, Record, Rollout, VipLife};

use crate::{
    balancer::{Balancer, Placement, Service, VipIdent},
    config::{BackendConfig, BalancerConfig, VipConfig},
    datapath::Datapath,
};
use step::step_vip;

#[derive(Debug, Default)]
pub struct Lifecycle {
    vips: BTreeMap<VipIdent, VipLife>,
    configs: BTreeMap<VipIdent, VipConfig>,
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    version: u32,
    vips: Vec<VipLife>,
}

impl Lifecycle {
    /// Reads the persisted state, if any. A running hook is run again.
    pub fn load(path: &Path) -> Result<Lifecycle> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lifecycle::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let p: Persisted = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a lifecycle state file; move it away to start afresh",
                path.display()
            )
        })?;
        if p.version != 1 {
            bail!(
                "{}: lifecycle state version {} is not supported",
                path.display(),
                p.version
            );
        }
        let mut vips = BTreeMap::new();
        for mut v in p.vips {
            for r in v.backends.values_mut() {
                if r.hook == HookRun::Running {
                    r.hook = HookRun::Due;
                }
            }
            vips.insert((v.address, v.port, v.protocol), v);
        }
        Ok(Lifecycle {
            vips,
            configs: BTreeMap::new(),
        })
    }

    /// Writes the state atomically (a new file renamed over the old one).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let p = Persisted {
            version: 1,
            vips: self.vips.values().cloned().collect(),
        };
        let tmp = path.with_extension("json.new");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&p)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }

    /// Follows a (new) configuration: new VIPs and backends start active and
    /// up-to-date, removed ones are forgotten.
    pub fn sync(&mut self, config: &BalancerConfig, now_ms: u64) {
        self.configs = config
            .vips
            .iter()
            .map(|v| ((v.address, v.port, v.protocol), v.clone()))
            .collect();
        self.vips.retain(|k, _| self.configs.contains_key(k));
        for (k, cfg) in &self.configs {
            let life = self.vips.entry(*k).or_insert_with(|| VipLife {
                name: cfg.name.clone(),
                address: cfg.address,
                port: cfg.port,
                protocol: cfg.protocol,
                generation: 0,
                rollout: None,
                backends: BTreeMap::new(),
                spare: None,
                held: None,
            });
            life.name = cfg.name.clone();
            let wanted: BTreeSet<IpAddr> = cfg.backends.iter().map(|b| b.address).collect();
            life.backends.retain(|a, _| wanted.contains(a));
            for b in &cfg.backends {
                let generation = life.generation;
                life.backends
                    .entry(b.address)
                    .or_insert_with(|| Record::new(generation, now_ms));
            }
        }
    }

    pub fn vips(&self) -> impl Iterator<Item = (&VipLife, &VipConfig)> {
        self.vips
            .iter()
            .filter_map(|(k, l)| self.configs.get(k).map(|c| (l, c)))
    }

    pub fn record(&self, vip: VipIdent, backend: IpAddr) -> Option<&Record> {
        self.vips.get(&vip)?.backends.get(&backend)
    }

    pub fn vip(&self, vip: VipIdent) -> Option<&VipLife> {
        self.vips.get(&vip)
    }

    /// `lbctl backend enable|disable`: an operator takes a backend of a VIP
    /// out of service or puts it back, whatever its phase. Unknown VIPs and
    /// backends are refused. Returns whether anything changed.
    pub fn set_disabled<D: Datapath>(
        &mut self,
        bal: &mut Balancer<D>,
        name: &str,
        backend: IpAddr,
        disabled: bool,
    ) -> Result<bool> {
        let (vip, r) = self.record_named(bal, name, backend)?;
        if r.disabled == disabled {
            return Ok(false);
        }
        r.disabled = disabled;
        info!(vip = name, %backend, disabled, "backend set by the operator");
        self.place(bal, vip)?;
        Ok(true)
    }

    /// Records the load a backend of a VIP reported; the next step turns it,
    /// with the backend's flows, into a load level and a weight.
    pub fn set_reported_load(&mut self, vip: VipIdent, backend: IpAddr, load: f64) {
        if let Some(r) = self
            .vips
            .get_mut(&vip)
            .and_then(|l| l.backends.get_mut(&backend))
        {
            r.reported_load = Some(load.clamp(0.0, 1.0));
        }
    }

    /// What a step sees of a backend of a VIP, from its flows (of this VIP,
    /// and of all VIPs on the host), its load report and its health.
    pub fn observe<D: Datapath>(
        &self,
        bal: &Balancer<D>,
        vip: VipIdent,
        b: &BackendConfig,
        flows: u64,
        host_flows: u64,
    ) -> Observation {
        let r = self.record(vip, b.address);
        Observation {
            flows,
            load: load_level(r.and_then(|r| r.reported_load), host_flows, b.max_flows),
            healthy: self.serves(bal, vip, b.address),
        }
    }

    /// Neither down by its health checks nor disabled by an operator (the
    /// phase aside).
    pub fn serves<D: Datapath>(&self, bal: &Balancer<D>, vip: VipIdent, backend: IpAddr) -> bool {
        bal.up(vip, backend) && !self.record(vip, backend).is_some_and(|r| r.disabled)
    }

    /// (VIP name, backend) of every backend an operator disabled.
    pub fn disabled(&self) -> Vec<(String, IpAddr)> {
        self.vips
            .values()
            .flat_map(|l| {
                l.backends
                    .iter()
                    .filter(|(_, r)| r.disabled)
                    .map(|(a, _)| (l.name.clone(), *a))
            })
            .collect()
    }

    /// The VIP an operator names (the balancer resolves names and refuses
    /// unknown ones).
    fn life_named<D: Datapath>(
        &mut self,
        bal: &Balancer<D>,
        name: &str,
    ) -> Result<(VipIdent, &mut VipLife)> {
        let vip = bal.vip_named(name)?;
        let life = self
            .vips
            .get_mut(&vip)
            .with_context(|| format!("{name} has no lifecycle yet"))?;
        Ok((vip, life))
    }

    /// The backend of a VIP an operator names.
    fn record_named<D: Datapath>(
        &mut self,
        bal: &Balancer<D>,
        name: &str,
        backend: IpAddr,
    ) -> Result<(VipIdent, &mut Record)> {
        let (vip, backend) = bal.pair_named(name, backend)?;
        let r = self
            .vips
            .get_mut(&vip)
            .and_then(|l| l.backends.get_mut(&backend))
            .with_context(|| format!("{backend} of {name} has no lifecycle yet"))?;
        Ok((vip, r))
    }

    /// `lbctl backend maintain`: an active backend becomes maintenance-pending;
    /// one whose hook failed runs its hook again.
    pub fn maintain<D: Datapath>(
        &mut self,
        bal: &mut Balancer<D>,
        name: &str,
        backend: IpAddr,
        now_ms: u64,
    ) -> Result<Phase> {
        let vip = bal.vip_named(name)?;
        let has_hook = self
            .configs
            .get(&vip)
            .is_some_and(|c| c.maintenance.hook.is_some());
        let (vip, r) = self.record_named(bal, name, backend)?;
        match r.phase {
            Phase::Active => r.enter(Phase::MaintenancePending, now_ms),
            Phase::HookFailed if has_hook => {
                r.enter(Phase::InMaintenance, now_ms);
                r.hook = HookRun::Due;
            }
            Phase::HookFailed => bail!(
                "{backend} of {name} has no hook to retry; `lbctl backend return` puts it back"
            ),
            other => bail!(
                "{backend} of {name} is {}; only an active backend can be marked for maintenance (`lbctl maintenance status` shows each phase)",
                other.name()
            ),
        }
        let phase = r.phase;
        info!(vip = name, %backend, phase = phase.name(), "maintenance requested");
        self.place(bal, vip)?;
        Ok(phase)
    }

    /// `lbctl backend return`: a backend in maintenance (its hook not running)
    /// or whose hook failed returns once its health checks pass.
    pub fn return_backend<D: Datapath>(
        &mut self,
        bal: &mut Balancer<D>,
        name: &str,
        backend: IpAddr,
        now_ms: u64,
    ) -> Result<()> {
        let (vip, r) = self.record_named(bal, name, backend)?;
        match (r.phase, r.hook) {
            (Phase::InMaintenance, HookRun::Idle) | (Phase::HookFailed, _) => {
                r.enter(Phase::Returning, now_ms);
                r.health_passes = 0;
                r.hook = HookRun::Idle;
            }
            (Phase::InMaintenance, _) => bail!("{backend} of {name}: its hook is running; `lbctl maintenance status` shows when it ends"),
            (other, _) => bail!(
                "{backend} of {name} is {}; only a backend in maintenance can return (`lbctl maintenance status` shows each phase)",
                other.name()
            ),
        }
        info!(vip = name, %backend, "returning from maintenance");
        self.place(bal, vip)
    }

    /// `lbctl maintenance rollout`: raises the VIP's generation and marks every
    /// active backend maintenance-pending. Returns how many were marked.
    pub fn rollout<D: Datapath>(
        &mut self,
        bal: &mut Balancer<D>,
        name: &str,
        now_ms: u64,
    ) -> Result<usize> {
        let (vip, life) = self.life_named(bal, name)?;
        if let Some(r) = life.rollout.as_ref().filter(|r| r.running()) {
            bail!(
                "a rollout of {name} (generation {}) is already running; `lbctl maintenance status` shows it",
                r.generation
            );
        }
        life.generation += 1;
        let generation = life.generation;
        let mut marked = 0;
        for r in life.backends.values_mut() {
            if r.phase == Phase::Active {
                r.enter(Phase::MaintenancePending, now_ms);
                marked += 1;
            }
        }
        life.rollout = Some(Rollout {
            generation,
            started_ms: now_ms,
            finished_ms: None,
            cancelled_ms: None,
            min_spare_seen: life.spare,
        });
        info!(vip = name, generation, marked, "rollout started");
        self.place(bal, vip)?;
        Ok(marked)
    }

    /// `lbctl maintenance cancel`: pending and draining backends return to
    /// active and a running rollout stops. Backends already out stay out.
    pub fn cancel<D: Datapath>(
        &mut self,
        bal: &mut Balancer<D>,
        name: &str,
        now_ms: u64,
    ) -> Result<usize> {
        let (vip, life) = self.life_named(bal, name)?;
        let mut returned = 0;
        for r in life.backends.values_mut() {
            if matches!(r.phase, Phase::MaintenancePending | Phase::Draining) {
                r.enter(Phase::Active, now_ms);
                returned += 1;
            }
        }
        let rollout = life.rollout.as_mut().filter(|r| r.running());
        if returned == 0 && rollout.is_none() {
            bail!("{name} has no rollout running and no backend pending or draining: nothing to cancel");
        }
        if let Some(r) = rollout {
            r.cancelled_ms = Some(now_ms);
        }
        info!(vip = name, returned, "maintenance cancelled");
        self.place(bal, vip)?;
        Ok(returned)
    }

    /// A hook finished: success makes the backend return (once health checks
    /// pass), failure leaves it out. Returns whether the state changed.
    pub fn hook_finished<D: Datapath>(
        &mut self,
        bal: &mut Balancer<D>,
        vip: VipIdent,
        backend: IpAddr,
        result: Result<(), String>,
        now_ms: u64,
    ) -> Result<bool> {
        let Some(life) = self.vips.get_mut(&vip) else {
            return Ok(false);
        };
        let Some(r) = life.backends.get_mut(&backend) else {
            return Ok(false);
        };
        if r.phase != Phase::InMaintenance || r.hook != HookRun::Running {
            return Ok(false);
        }
        r.hook = HookRun::Idle;
        match result {
            Ok(()) => {
                info!(vip = life.name, %backend, "maintenance hook succeeded");
                r.enter(Phase::Returning, now_ms);
                r.health_passes = 0;
                r.last_error = None;
            }
            Err(e) => {
                warn!(vip = life.name, %backend, "maintenance hook failed: {e}; the backend stays out and the rollout halts");
                r.enter(Phase::HookFailed, now_ms);
                r.last_error = Some(e);
            }
        }
        self.place(bal, vip)?;
        Ok(true)
    }

    /// A health check result: a returning backend becomes active and
    /// up-to-date after `rise` passes in a row.
    pub fn health_result<D: Datapath>(
        &mut self,
        bal: &mut Balancer<D>,
        vip: VipIdent,
        backend: IpAddr,
        passed: bool,
        rise: u32,
        now_ms: u64,
    ) -> Result<bool> {
        let Some(life) = self.vips.get_mut(&vip) else {
            return Ok(false);
        };
        let generation = life.generation;
        let Some(r) = life.backends.get_mut(&backend) else {
            return Ok(false);
        };
        if r.phase != Phase::Returning {
            return Ok(false);
        }
        r.health_passes = if passed { r.health_passes + 1 } else { 0 };
        if r.health_passes < rise {
            return Ok(true);
        }
        r.enter(Phase::Active, now_ms);
        r.generation = generation;
        info!(vip = life.name, %backend, generation, "back from maintenance, up to date");
        self.place(bal, vip)?;
        Ok(true)
    }

    /// One pass over every VIP: finished drains go in maintenance (starting
    /// hooks), returning backends without health checks come back, pending
    /// backends drain while capacity allows, rollouts complete, and the
    /// balancer follows. Returns the hooks to start and whether anything
    /// changed (to persist).
    pub fn step<D: Datapath>(
        &mut self,
        bal: &mut Balancer<D>,
        observe: &dyn Fn(VipIdent, &BackendConfig) -> Observation,
        now_ms: u64,
    ) -> Result<(Vec<HookJob>, bool)> {
        let mut jobs = Vec::new();
        let mut changed = false;
        let keys: Vec<VipIdent> = self.vips.keys().copied().collect();
        for vip in keys {
            let Some(cfg) = self.configs.get(&vip).cloned() else {
                continue;
            };
            let life = self.vips.get_mut(&vip).expect("key listed above");
            let obs: BTreeMap<IpAddr, Observation> = cfg
                .backends
                .iter()
                .map(|b| (b.address, observe(vip, b)))
                .collect();
            changed |= step_vip(life, &cfg, &obs, now_ms, &mut jobs);
            self.place(bal, vip)?;
        }
        Ok((jobs, changed))
    }

    /// Puts every VIP's backends where their phases say (after a start or a
    /// reload).
    pub fn place_all<D: Datapath>(&self, bal: &mut Balancer<D>) -> Result<()> {
        for vip in self.vips.keys() {
            self.place(bal, *vip)?;
        }
        Ok(())
    }

    /// Gives the balancer every VIP's placements before its tables are first
    /// built (see `Balancer::seed`).
    pub fn seed_all<D: Datapath>(&self, bal: &mut Balancer<D>) {
        for vip in self.vips.keys() {
            if let Some(changes) = self.placements(bal, *vip) {
                bal.seed(*vip, &changes);
            }
        }
    }

    /// Puts the VIP's backends where their phases say.
    fn place<D: Datapath>(&self, bal: &mut Balancer<D>, vip: VipIdent) -> Result<()> {
        if let Some(changes) = self.placements(bal, vip) {
            bal.set_service(vip, &changes)?;
        }
        Ok(())
    }

    /// Where the VIP's backends go: by phase (out whatever it is while
    /// disabled), with the rollout's preference for up-to-date backends and
    /// the load factor (with hysteresis).
    fn placements<D: Datapath>(&self, bal: &Balancer<D>, vip: VipIdent) -> Option<Vec<Placement>> {
        let (life, cfg) = (self.vips.get(&vip)?, self.configs.get(&vip)?);
        let limit = cfg.maintenance.load_limit;
        let rolling = life.rollout.as_ref().is_some_and(Rollout::running);
        let prefer = rolling
            && life.backends.iter().any(|(a, r)| {
                r.phase == Phase::Active
                    && life.up_to_date(r)
                    && self.serves(bal, vip, *a)
                    && r.load.unwrap_or(0.0) < limit
            });
        let (_, min_change) = load::damping(cfg);
        let changes = life
            .backends
            .iter()
            .map(|(a, r)| Placement {
                backend: *a,
                service: if r.disabled {
                    Service::Out
                } else {
                    r.phase.service()
                },
                preference: if prefer && !life.up_to_date(r) {
                    cfg.maintenance.prefer_up_to_date
                } else {
                    1.0
                },
                load_factor: load::next_factor(bal.load_factor(vip, *a), r.load, min_change),
            })
            .collect();
        Some(changes)
    }
}

#[cfg(test)]
mod tests;
