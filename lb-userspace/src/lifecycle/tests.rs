//! Unit tests of `lifecycle`.

use super::*;
use crate::{
    config::{Config, Protocol},
    datapath::{fake::FakeDatapath, MapSizes},
};
use std::{cell::RefCell, collections::HashMap};

const B0: &str = "198.18.0.10";
const B1: &str = "198.18.0.11";
const B2: &str = "198.18.0.12";

fn config(maintenance: &str, health: bool) -> BalancerConfig {
    config_with(maintenance, health, "")
}

/// `extra`: more lines of the VIP's table.
fn config_with(maintenance: &str, health: bool, extra: &str) -> BalancerConfig {
    let health = if health {
        "health = { kind = \"tcp\", rise = 2 }\n"
    } else {
        ""
    };
    let text = format!(
        r#"
[datapath]
interfaces = ["eth0"]
maglev_table_size = 257
[encap]
source_v4 = "198.18.200.0/24"
[[vips]]
name = "web"
address = "198.18.10.1"
port = 80
protocol = "tcp"
backends = [ {{ address = "{B0}" }}, {{ address = "{B1}" }}, {{ address = "{B2}" }} ]
maintenance = {{ {maintenance} }}
{health}{extra}"#
    );
    Config::from_toml(&text).unwrap().balancer.unwrap()
}

fn web() -> VipIdent {
    ("198.18.10.1".parse().unwrap(), 80, Protocol::Tcp)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A balancer over the fake datapath, a lifecycle, a fake clock and
/// observations the test sets.
struct World {
    bal: Balancer<FakeDatapath>,
    life: Lifecycle,
    now_ms: u64,
    obs: RefCell<HashMap<IpAddr, Observation>>,
    hooks: Vec<HookJob>,
}

impl World {
    fn new(maintenance: &str, health: bool) -> World {
        World::with(config(maintenance, health))
    }

    fn with(cfg: BalancerConfig) -> World {
        let sizes = MapSizes {
            maglev_size: 257,
            // The default of the configuration above (max_vips = 64).
            maglev_slots: 3 * 64 * 257,
            max_vips: 8,
            max_backends: 8,
            flow_table_size: 1024,
        };
        let mut bal = Balancer::new(FakeDatapath::default(), sizes, BTreeSet::new());
        bal.apply(&cfg, &BTreeMap::new()).unwrap();
        let mut life = Lifecycle::default();
        life.sync(&cfg, 1_000);
        let obs = cfg.vips[0]
            .backends
            .iter()
            .map(|b| {
                (
                    b.address,
                    Observation {
                        flows: 10,
                        load: Some(0.3),
                        healthy: true,
                    },
                )
            })
            .collect();
        World {
            bal,
            life,
            now_ms: 1_000,
            obs: RefCell::new(obs),
            hooks: Vec::new(),
        }
    }

    fn set(&self, b: &str, f: impl FnOnce(&mut Observation)) {
        f(self.obs.borrow_mut().get_mut(&ip(b)).unwrap());
    }

    fn step(&mut self, advance_ms: u64) -> bool {
        self.now_ms += advance_ms;
        let obs = self.obs.borrow().clone();
        let (jobs, changed) = self
            .life
            .step(&mut self.bal, &|_, b| obs[&b.address], self.now_ms)
            .unwrap();
        self.hooks.extend(jobs);
        changed
    }

    fn phase(&self, b: &str) -> Phase {
        self.life.record(web(), ip(b)).unwrap().phase
    }

    fn slots(&self, b: &str) -> u32 {
        self.bal.slots(web(), ip(b))
    }

    /// (address, weight in the table) of every backend of `web`.
    fn weights(&self) -> Vec<(IpAddr, u32)> {
        let cfg = self.bal.vips()[0].1.clone();
        cfg.backends
            .iter()
            .map(|b| (b.address, self.bal.effective_weight(&cfg, b)))
            .collect()
    }

    fn usable(&self, b: &str) -> bool {
        let id = self
            .bal
            .backend_ids()
            .into_iter()
            .find(|(_, a)| *a == ip(b))
            .unwrap()
            .0;
        self.bal.datapath().backends[&id].flags & lb_common::BACKEND_USABLE != 0
    }

    fn finish_hook(&mut self, b: &str, result: Result<(), String>) -> bool {
        self.life
            .hook_finished(&mut self.bal, web(), ip(b), result, self.now_ms)
            .unwrap()
    }

    fn health(&mut self, b: &str, passed: bool) {
        self.life
            .health_result(&mut self.bal, web(), ip(b), passed, 2, self.now_ms)
            .unwrap();
    }
}

#[test]
fn maintain_drain_hook_and_return_through_every_phase() {
    let mut w = World::new("hook = [\"/bin/true\"]", true);
    assert_eq!(w.phase(B0), Phase::Active);
    let before = w.bal.datapath().log.len();
    assert_eq!(
        w.life
            .maintain(&mut w.bal, "web", ip(B0), w.now_ms)
            .unwrap(),
        Phase::MaintenancePending
    );
    assert_eq!(w.bal.datapath().log.len(), before, "pending still serves");
    assert!(w.slots(B0) > 0);

    assert!(w.step(1000));
    assert_eq!(w.phase(B0), Phase::Draining);
    assert_eq!(w.slots(B0), 0, "draining takes no new flows");
    assert!(w.usable(B0), "established flows continue");
    assert_eq!(w.life.record(web(), ip(B0)).unwrap().flows_at_drain, 10);

    w.set(B0, |o| o.flows = 4);
    assert!(!w.step(1000), "flows moving is not a change to persist");
    assert_eq!(w.phase(B0), Phase::Draining);
    let progress = w.life.record(web(), ip(B0)).unwrap().drain_progress();
    assert_eq!(progress, Some(0.6));

    w.set(B0, |o| o.flows = 0);
    assert!(w.step(1000));
    assert_eq!(w.phase(B0), Phase::InMaintenance);
    assert!(!w.usable(B0), "out of service");
    assert_eq!(w.hooks.len(), 1);
    let job = &w.hooks[0];
    assert_eq!(job.argv, vec!["/bin/true".to_string()]);
    assert!(job.env.contains(&("LB_BACKEND".into(), B0.into())));
    assert!(job.env.contains(&("LB_VIP_NAME".into(), "web".into())));
    w.step(1000);
    assert_eq!(w.hooks.len(), 1, "the hook runs once");

    assert!(w.finish_hook(B0, Ok(())));
    assert_eq!(w.phase(B0), Phase::Returning);
    w.step(1000);
    assert_eq!(w.phase(B0), Phase::Returning, "waits for health checks");
    w.health(B0, true);
    w.health(B0, false);
    w.health(B0, true);
    assert_eq!(w.phase(B0), Phase::Returning, "rise = 2 passes in a row");
    w.health(B0, true);
    assert_eq!(w.phase(B0), Phase::Active);
    assert!(w.usable(B0));
    assert!(w.slots(B0) > 0);
    let r = w.life.record(web(), ip(B0)).unwrap();
    assert_eq!((r.hook_runs, r.flows_cut), (1, 0));
}

#[test]
fn illegal_transitions_and_unknown_names_change_nothing() {
    let mut w = World::new("hook = [\"/bin/true\"]", false);
    // Every refused command leaves the lifecycle and the datapath as they were.
    fn refused(w: &mut World, expect: &str, cmd: impl FnOnce(&mut World) -> Result<()>) {
        let (life, log) = (w.life.vip(web()).cloned(), w.bal.datapath().log.len());
        let e = cmd(w).unwrap_err();
        assert!(e.to_string().contains(expect), "{e} lacks {expect:?}");
        assert_eq!(w.life.vip(web()).cloned(), life);
        assert_eq!(w.bal.datapath().log.len(), log);
    }
    let now = w.now_ms;
    refused(&mut w, "no VIP named", |w| {
        w.life.maintain(&mut w.bal, "nope", ip(B0), now).map(drop)
    });
    refused(&mut w, "not a backend of web", |w| {
        w.life
            .maintain(&mut w.bal, "web", ip("198.18.0.99"), now)
            .map(drop)
    });
    refused(&mut w, "is active", |w| {
        w.life.return_backend(&mut w.bal, "web", ip(B0), now)
    });
    refused(&mut w, "no rollout running", |w| {
        w.life.cancel(&mut w.bal, "web", now).map(drop)
    });
    refused(&mut w, "no VIP named", |w| {
        w.life.rollout(&mut w.bal, "nope", now).map(drop)
    });

    w.life.maintain(&mut w.bal, "web", ip(B0), now).unwrap();
    refused(&mut w, "is maintenance-pending", |w| {
        w.life.maintain(&mut w.bal, "web", ip(B0), now).map(drop)
    });
    w.step(1000);
    refused(&mut w, "is draining", |w| {
        w.life.maintain(&mut w.bal, "web", ip(B0), now).map(drop)
    });
    refused(&mut w, "is draining", |w| {
        w.life.return_backend(&mut w.bal, "web", ip(B0), now)
    });
    w.set(B0, |o| o.flows = 0);
    w.step(1000);
    assert_eq!(w.phase(B0), Phase::InMaintenance);
    refused(&mut w, "hook is running", |w| {
        w.life.return_backend(&mut w.bal, "web", ip(B0), now)
    });
    refused(&mut w, "is in-maintenance", |w| {
        w.life.maintain(&mut w.bal, "web", ip(B0), now).map(drop)
    });
    assert!(!w.finish_hook(B1, Ok(())), "no hook of B1 is running");
    assert_eq!(w.phase(B1), Phase::Active);
}

#[test]
fn capacity_holds_a_pending_backend_until_load_falls() {
    // Capacity at limit 0.8 with two of three backends: 1.6 weight units.
    let mut w = World::new("load_limit = 0.8, min_spare = 0.2", false);
    for b in [B0, B1, B2] {
        w.set(b, |o| o.load = Some(0.5));
    }
    // Demand 1.5 against 1.6 without B0: spare 6% < 20%.
    w.life
        .maintain(&mut w.bal, "web", ip(B0), w.now_ms)
        .unwrap();
    w.step(1000);
    assert_eq!(w.phase(B0), Phase::MaintenancePending);
    let held = w.life.vip(web()).unwrap().held.clone().unwrap();
    assert!(held.contains("under min_spare"), "{held}");
    let spare = w.life.vip(web()).unwrap().spare.unwrap();
    assert!((spare - (1.0 - 1.5 / 2.4)).abs() < 1e-9, "{spare}");
    // Demand 0.9 against 1.6: spare 44%.
    for b in [B0, B1, B2] {
        w.set(b, |o| o.load = Some(0.3));
    }
    w.step(1000);
    assert_eq!(w.phase(B0), Phase::Draining);
    assert!(w.life.vip(web()).unwrap().spare.unwrap() >= 0.2);
    assert_eq!(w.life.vip(web()).unwrap().held, None);
}

#[test]
fn no_drain_starts_before_every_backend_reported_its_load() {
    let cfg = config_with("min_spare = 0.2", false, "feedback = { port = 8081 }\n");
    let mut w = World::with(cfg);
    w.set(B2, |o| o.load = None);
    w.life
        .maintain(&mut w.bal, "web", ip(B0), w.now_ms)
        .unwrap();
    w.step(1000);
    assert_eq!(w.phase(B0), Phase::MaintenancePending);
    let held = w.life.vip(web()).unwrap().held.clone().unwrap();
    assert!(
        held.contains("waiting for the load reports of 198.18.0.12"),
        "{held}"
    );
    w.set(B2, |o| o.load = Some(0.3));
    w.step(1000);
    assert_eq!(w.phase(B0), Phase::Draining);
}

#[test]
fn the_last_backend_taking_new_flows_never_drains() {
    let mut w = World::new("min_spare = 0", false);
    for b in [B0, B1, B2] {
        w.set(b, |o| o.load = None);
    }
    w.set(B1, |o| o.healthy = false);
    w.set(B2, |o| o.healthy = false);
    w.life
        .maintain(&mut w.bal, "web", ip(B0), w.now_ms)
        .unwrap();
    w.step(1000);
    assert_eq!(w.phase(B0), Phase::MaintenancePending);
    let held = w.life.vip(web()).unwrap().held.clone().unwrap();
    assert!(held.contains("last backend"), "{held}");
    // A down backend costs no capacity: it may drain at once.
    w.life
        .maintain(&mut w.bal, "web", ip(B1), w.now_ms)
        .unwrap();
    w.step(1000);
    assert_eq!(w.phase(B1), Phase::Draining);
}

#[test]
fn drain_timeout_cuts_the_remaining_flows() {
    let mut w = World::new("drain_timeout_s = 30", false);
    w.life
        .maintain(&mut w.bal, "web", ip(B1), w.now_ms)
        .unwrap();
    w.step(1000);
    assert_eq!(w.phase(B1), Phase::Draining);
    w.set(B1, |o| o.flows = 3);
    w.step(29_000);
    assert_eq!(w.phase(B1), Phase::Draining);
    w.step(1_000);
    assert_eq!(w.phase(B1), Phase::InMaintenance);
    assert_eq!(w.life.record(web(), ip(B1)).unwrap().flows_cut, 3);
    assert!(!w.usable(B1));
    assert!(w.hooks.is_empty(), "no hook configured");
    // Without a hook, the operator returns it; no health check: back at once.
    w.life
        .return_backend(&mut w.bal, "web", ip(B1), w.now_ms)
        .unwrap();
    assert_eq!(w.phase(B1), Phase::Returning);
    w.step(1000);
    assert_eq!(w.phase(B1), Phase::Active);
    assert!(w.usable(B1));
}

#[test]
fn a_failed_hook_keeps_the_backend_out_and_halts_the_rollout() {
    let mut w = World::new("hook = [\"/bin/upgrade\"]", false);
    for b in [B0, B1, B2] {
        w.set(b, |o| o.flows = 0);
    }
    assert_eq!(w.life.rollout(&mut w.bal, "web", w.now_ms).unwrap(), 3);
    w.step(1000);
    w.step(1000);
    let first = w.hooks[0].backend;
    assert_eq!(w.hooks.len(), 1);
    assert!(w.finish_hook(&first.to_string(), Err("exit status 3".into())));
    let r = w.life.record(web(), first).unwrap();
    assert_eq!(
        (r.phase, r.last_error.as_deref()),
        (Phase::HookFailed, Some("exit status 3"))
    );
    w.step(1000);
    w.step(1000);
    assert_eq!(w.hooks.len(), 1, "the rollout halts");
    assert!(w
        .life
        .vip(web())
        .unwrap()
        .held
        .clone()
        .unwrap()
        .contains("halted"));
    assert!(!w.usable(&first.to_string()));
    // Retry: the hook runs again, succeeds, and the rollout goes on.
    w.life.maintain(&mut w.bal, "web", first, w.now_ms).unwrap();
    w.step(1000);
    assert_eq!(w.hooks.len(), 2);
    assert!(w.finish_hook(&first.to_string(), Ok(())));
    w.step(1000);
    assert_eq!(w.life.record(web(), first).unwrap().phase, Phase::Active);
    w.step(1000);
    assert_eq!(w.hooks.len(), 3, "the next backend's hook");
}

#[test]
fn rollout_goes_one_by_one_prefers_up_to_date_and_completes() {
    let mut w = World::new("hook = [\"/bin/upgrade\"], prefer_up_to_date = 0.5", false);
    for b in [B0, B1, B2] {
        w.set(b, |o| o.flows = 0);
    }
    w.life.rollout(&mut w.bal, "web", w.now_ms).unwrap();
    let e = w.life.rollout(&mut w.bal, "web", w.now_ms).unwrap_err();
    assert!(e.to_string().contains("already running"), "{e}");
    let mut order = Vec::new();
    for _ in 0..3 {
        w.step(1000); // drain starts
        let draining: Vec<_> = [B0, B1, B2]
            .into_iter()
            .filter(|b| w.phase(b).out_for_maintenance())
            .collect();
        assert_eq!(draining.len(), 1, "max_parallel = 1: {draining:?}");
        w.step(1000); // drained: hook
        let job = w.hooks.last().unwrap().clone();
        order.push(job.backend);
        assert!(w.finish_hook(&job.backend.to_string(), Ok(())));
        w.step(1000); // back (no health check)
                      // Up-to-date backends are preferred: pending ones weigh half.
                      // (Every backend is at load 0.3: a weight factor of 0.7.)
        for (address, weight) in w.weights() {
            let r = w.life.record(web(), address).unwrap();
            let expect = match r.phase {
                Phase::MaintenancePending => 35,
                Phase::Active => 70,
                _ => 0,
            };
            assert_eq!(weight, expect, "{address} {:?}", r.phase);
        }
    }
    order.sort();
    order.dedup();
    assert_eq!(order.len(), 3, "every backend's hook ran once");
    assert_eq!(w.hooks.len(), 3);
    let life = w.life.vip(web()).unwrap();
    let rollout = life.rollout.clone().unwrap();
    assert!(rollout.finished_ms.is_some());
    assert!(life
        .backends
        .values()
        .all(|r| life.up_to_date(r) && r.phase == Phase::Active));
    assert!(w.weights().iter().all(|(_, weight)| *weight == 70));
    assert_eq!(life.generation, 1);
}

#[test]
fn several_drain_at_once_while_capacity_allows() {
    let mut w = World::new("max_parallel = 3, min_spare = 0.3", false);
    // Demand 3 × 0.2 = 0.6; without one: 1 − 0.6/1.6 = 62%; without two:
    // 1 − 0.6/0.8 = 25% < 30%. So exactly one drains, capacity-bound.
    for b in [B0, B1, B2] {
        w.set(b, |o| o.load = Some(0.2));
    }
    w.life.rollout(&mut w.bal, "web", w.now_ms).unwrap();
    w.step(1000);
    let out = |w: &World| {
        [B0, B1, B2]
            .into_iter()
            .filter(|b| w.phase(b) == Phase::Draining)
            .count()
    };
    assert_eq!(out(&w), 1);
    // Lighter load: without two, 1 − 0.3/0.8 = 62%.
    for b in [B0, B1, B2] {
        w.set(b, |o| o.load = Some(0.1));
    }
    w.step(1000);
    assert_eq!(out(&w), 2);
    let rollout = w.life.vip(web()).unwrap().rollout.clone().unwrap();
    assert!(rollout.min_spare_seen.unwrap() >= 0.3);
}

#[test]
fn cancel_returns_pending_and_draining_backends() {
    let mut w = World::new("", false);
    w.life.rollout(&mut w.bal, "web", w.now_ms).unwrap();
    w.step(1000);
    assert_eq!(w.life.cancel(&mut w.bal, "web", w.now_ms).unwrap(), 3);
    assert!([B0, B1, B2].iter().all(|b| w.phase(b) == Phase::Active));
    assert!([B0, B1, B2].iter().all(|b| w.slots(b) > 0));
    assert!(w
        .life
        .vip(web())
        .unwrap()
        .rollout
        .clone()
        .unwrap()
        .cancelled_ms
        .is_some());
}

#[test]
fn an_agent_restart_resumes_the_rollout() {
    let dir = std::env::temp_dir().join(format!("lb-lifecycle-test-{}", std::process::id()));
    let path = dir.join("state.json");
    let mut w = World::new(
        "hook = [\"/bin/upgrade\"], max_parallel = 2, min_spare = 0",
        false,
    );
    for b in [B0, B1, B2] {
        w.set(b, |o| o.load = None);
    }
    w.set(B0, |o| o.flows = 0);
    w.life.rollout(&mut w.bal, "web", w.now_ms).unwrap();
    w.step(1000); // two draining
    w.step(1000); // B0 (no flows) in maintenance, hook running
    assert_eq!(w.hooks.len(), 1);
    w.life.save(&path).unwrap();
    let phases: Vec<Phase> = [B0, B1, B2].iter().map(|b| w.phase(b)).collect();

    // A new agent: fresh datapath, the same configuration, the saved state.
    let mut v = World::new(
        "hook = [\"/bin/upgrade\"], max_parallel = 2, min_spare = 0",
        false,
    );
    v.life = Lifecycle::load(&path).unwrap();
    v.life.sync(
        &config(
            "hook = [\"/bin/upgrade\"], max_parallel = 2, min_spare = 0",
            false,
        ),
        v.now_ms,
    );
    assert_eq!(
        [B0, B1, B2].iter().map(|b| v.phase(b)).collect::<Vec<_>>(),
        phases
    );
    v.now_ms = w.now_ms;
    for b in [B0, B1, B2] {
        v.set(b, |o| o.flows = 0);
    }
    v.step(1000);
    // The interrupted hook runs again; the other drain completes.
    assert_eq!(v.hooks.len(), 2);
    assert!(v.hooks.iter().any(|j| j.backend == ip(B0)));
    for j in v.hooks.clone() {
        assert!(v.finish_hook(&j.backend.to_string(), Ok(())));
    }
    for _ in 0..4 {
        v.step(1000);
        for j in v.hooks.clone() {
            v.finish_hook(&j.backend.to_string(), Ok(()));
        }
    }
    let life = v.life.vip(web()).unwrap();
    assert!(life.rollout.clone().unwrap().finished_ms.is_some());
    assert_eq!(life.generation, 1);
    let _ = std::fs::remove_dir_all(&dir);

    // A corrupt state file is refused with its name.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&path, "{").unwrap();
    let e = Lifecycle::load(&path).unwrap_err();
    assert!(format!("{e:#}").contains("state.json"), "{e:#}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn disabled_and_down_are_both_needed_to_clear() {
    let mut w = World::new("", true);
    let addr = ip(B2);
    let id = w
        .bal
        .backend_ids()
        .into_iter()
        .find(|(_, a)| *a == addr)
        .unwrap()
        .0;
    let in_ring = |w: &World| {
        let dp = w.bal.datapath();
        let (a, port, proto) = web();
        let live = dp.vips[&crate::balancer::vip_key(a, port, proto)].ring_base;
        dp.rings[&live].contains(&id)
    };
    assert!(w.life.set_disabled(&mut w.bal, "web", addr, true).unwrap());
    assert!(!in_ring(&w));
    assert!(!w.usable(B2));
    assert!(!w.life.serves(&w.bal, web(), addr));
    assert!(w.bal.set_health(web(), addr, false).unwrap());
    assert!(w.life.set_disabled(&mut w.bal, "web", addr, false).unwrap());
    assert!(!in_ring(&w), "still down");
    assert!(!w.usable(B2));
    assert!(w.bal.set_health(web(), addr, true).unwrap());
    assert!(in_ring(&w));
    assert!(w.usable(B2));
    assert_eq!(
        w.bal.datapath().backends[&id].flags,
        lb_common::BACKEND_ALLOCATED | lb_common::BACKEND_USABLE | lb_common::BACKEND_AVAILABLE
    );
    // Unknown names and backends are refused and change nothing.
    let before = w.bal.datapath().log.len();
    assert!(w.life.set_disabled(&mut w.bal, "nope", addr, true).is_err());
    assert!(w
        .life
        .set_disabled(&mut w.bal, "web", ip("198.18.0.99"), true)
        .is_err());
    assert_eq!(w.bal.datapath().log.len(), before);
    // A disabled backend stays out whatever its phase, and the setting
    // is persisted.
    assert!(w.life.set_disabled(&mut w.bal, "web", addr, true).unwrap());
    assert_eq!(w.life.disabled(), vec![("web".to_string(), addr)]);
}

#[test]
fn load_levels_become_weights_damped_and_with_hysteresis() {
    // Default damping without a feedback section: smoothing 0.5, min_change 0.1.
    let mut w = World::new("", false);
    let weight = |w: &World, b: &str| {
        w.weights()
            .into_iter()
            .find(|(a, _)| *a == ip(b))
            .unwrap()
            .1
    };
    w.set(B0, |o| o.load = Some(0.0));
    w.set(B1, |o| o.load = None);
    w.step(1000);
    // First figures apply as they are: 0.3 gives 0.7; unknown gives 1.
    assert_eq!(
        (weight(&w, B0), weight(&w, B1), weight(&w, B2)),
        (100, 100, 70)
    );
    // B2 at 0.8: averages 0.55 (factor 0.45, applied) then 0.675 (0.325,
    // applied: a change of 0.125) then 0.7375 (0.2625, a change of 0.0625: held).
    w.set(B2, |o| o.load = Some(0.8));
    w.step(1000);
    assert_eq!(weight(&w, B2), 45);
    w.step(1000);
    assert_eq!(weight(&w, B2), 32, "100 × 0.325, rounded");
    let writes = w.bal.datapath().log.len();
    w.step(1000);
    assert_eq!(weight(&w, B2), 32, "a change under min_change is held");
    assert_eq!(w.bal.datapath().log.len(), writes, "and rebuilds nothing");
    // The shares follow the weights: 100 : 100 : 32 of the table.
    let (a, port, proto) = web();
    let size = w.bal.datapath().vips[&crate::balancer::vip_key(a, port, proto)].ring_size;
    let slots = w.slots(B2) as f64 / f64::from(size);
    assert!((slots - 32.0 / 232.0).abs() < 0.03, "{slots}");
    // Flows over max_flows count as load too: see load_level.
    let r = w.life.record(web(), ip(B2)).unwrap();
    assert!((r.load.unwrap() - 0.7375).abs() < 1e-9);
}
