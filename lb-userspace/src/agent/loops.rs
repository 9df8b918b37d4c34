//! The agent's loops, one function each: collecting flows (and stepping the
//! lifecycle), health checks, load polls, flow events, and next hops.

use std::{collections::BTreeMap, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tracing::{info, warn};

use super::state::{wall_ms, Shared, State};
use crate::{
    collector::monotonic_ns,
    config::{Feedback, HealthCheck, VipConfig},
    datapath::FlowTable,
    health::{self, CheckError, Probe, Schedule, Tracker},
    lifecycle::{self, HookJob},
    limits::LogEvery,
    nexthop::{ChangeWatcher, Resolver},
};

/// How often the probe loops look for due probes.
const PROBE_TICK: Duration = Duration::from_millis(100);

fn ticker(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// The collector's loop: one collection per interval. The connection table
/// is read and expired outside the state lock (a million flows take a good
/// fraction of a second); the lock is held only to take the result in, read
/// the counters and step the lifecycle.
pub(crate) async fn collect(state: Shared, table: FlowTable, every: Duration) {
    let mut tick = ticker(every);
    let mut table = Some(table);
    loop {
        tick.tick().await;
        let timeouts = state.lock().await.collector.timeouts;
        let mut t = table.take().expect("the table comes back from each scan");
        let pass = tokio::task::spawn_blocking(move || {
            let scan = crate::collector::scan(&t, timeouts, monotonic_ns()).and_then(|mut s| {
                crate::collector::expire(&mut t, &mut s)?;
                Ok(s)
            });
            (t, scan)
        })
        .await;
        let scan = match pass {
            Ok((t, scan)) => {
                table = Some(t);
                scan
            }
            Err(e) => {
                warn!("the collector's scan stopped: {e}");
                return;
            }
        };
        let mut st = state.lock().await;
        let State {
            balancer,
            collector,
            ..
        } = &mut *st;
        let Some(bal) = balancer.as_mut() else { return };
        let vips: Vec<u32> = bal.vips().iter().map(|(id, _)| *id).collect();
        let backends: Vec<u32> = bal.backend_ids().iter().map(|(id, _)| *id).collect();
        if let Err(e) =
            scan.and_then(|s| collector.absorb(s, bal.datapath(), monotonic_ns(), &vips, &backends))
        {
            warn!("collecting flows: {e:#}");
            continue;
        }
        let jobs = step_lifecycle(&mut st);
        drop(st);
        for job in jobs {
            tokio::spawn(hook(state.clone(), job));
        }
    }
}

/// Moves the lifecycle on with what the collector just saw: the flows of
/// each VIP on each backend, and each backend's flows over all VIPs. Returns
/// hooks to run.
fn step_lifecycle(st: &mut State) -> Vec<HookJob> {
    let State {
        balancer,
        collector,
        lifecycle,
        ..
    } = st;
    let Some(bal) = balancer.as_mut() else {
        return Vec::new();
    };
    let vip_ids: BTreeMap<_, u32> = bal
        .vips()
        .into_iter()
        .map(|(id, v)| ((v.address, v.port, v.protocol), id))
        .collect();
    let backend_ids: BTreeMap<_, u32> = bal
        .backend_ids()
        .into_iter()
        .map(|(id, a)| (a, id))
        .collect();
    let snapshot = &*bal;
    let observe = |vip, b: &crate::config::BackendConfig| {
        // A pair the collector has not seen counts as serving with no flows
        // (the capacity rule still applies).
        let vip_id = vip_ids.get(&vip).copied().unwrap_or(u32::MAX);
        let backend_id = backend_ids.get(&b.address).copied().unwrap_or(u32::MAX);
        let pair = collector
            .pair_presence
            .get(&(vip_id, backend_id))
            .copied()
            .unwrap_or_default();
        let host = collector
            .backend_presence
            .get(&backend_id)
            .map_or(0, |p| p.active);
        lifecycle.observe(snapshot, vip, b, pair.active + pair.closing, host)
    };
    let observations: BTreeMap<_, _> = snapshot
        .vips()
        .iter()
        .flat_map(|(_, v)| {
            let vip = (v.address, v.port, v.protocol);
            v.backends.iter().map(move |b| ((vip, b.address), b))
        })
        .map(|(pair, b)| (pair, observe(pair.0, b)))
        .collect();
    let now = wall_ms();
    let step = lifecycle.step(
        bal,
        &|vip, b| {
            observations
                .get(&(vip, b.address))
                .copied()
                .unwrap_or(lifecycle::Observation {
                    flows: 0,
                    load: None,
                    healthy: true,
                })
        },
        now,
    );
    match step {
        Ok((jobs, changed)) => {
            if changed {
                st.save_lifecycle();
            }
            jobs
        }
        Err(e) => {
            warn!("lifecycle step: {e:#}");
            Vec::new()
        }
    }
}

/// Runs a maintenance hook, then reports the result to the lifecycle.
async fn hook(state: Shared, job: HookJob) {
    let backend = job.backend;
    info!(%backend, hook = ?job.argv, "running the maintenance hook");
    let result = lifecycle::run_hook(&job).await;
    let mut st = state.lock().await;
    let Ok((bal, lifecycle)) = st.balancer_and_lifecycle() else {
        return;
    };
    match lifecycle.hook_finished(bal, job.vip, backend, result, wall_ms()) {
        Ok(true) => st.save_lifecycle(),
        Ok(false) => {}
        Err(e) => warn!(%backend, "after the maintenance hook: {e:#}"),
    }
}

/// The loop of one kind of probe: every `PROBE_TICK`, the pairs due among
/// the VIPs `select` picks (with the VIP's settings and the port to probe)
/// are probed at once, outside the lock; `apply` takes the results under it.
/// Ends when the agent runs no balancer.
async fn probe_loop<T, S, R, Fut>(
    state: Shared,
    select: fn(&VipConfig) -> Option<(&T, u16)>,
    interval: fn(&T) -> Duration,
    probe: impl Fn(SocketAddr, T) -> Fut,
    apply: impl Fn(&mut State, &mut Schedule<S>, Vec<(Probe<T>, R)>),
) where
    T: Clone,
    S: Default,
    Fut: Future<Output = R>,
{
    let mut schedule: Schedule<S> = Schedule::default();
    let mut tick = ticker(PROBE_TICK);
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        let due = {
            let st = state.lock().await;
            let Some(b) = &st.config.balancer else { return };
            schedule.due(b, now, select)
        };
        if due.is_empty() {
            continue;
        }
        let results = schedule.run(due, now, interval, &probe).await;
        let mut st = state.lock().await;
        if st.balancer.is_none() {
            return;
        }
        apply(&mut st, &mut schedule, results);
    }
}

fn health_of(v: &VipConfig) -> Option<(&HealthCheck, u16)> {
    v.health.as_ref().map(|h| (h, h.port))
}

fn feedback_of(v: &VipConfig) -> Option<(&Feedback, u16)> {
    v.feedback.as_ref().map(|f| (f, f.port))
}

/// Runs every VIP's health checks at their intervals and applies the
/// verdicts (rise/fall thresholds) to the balancer; returning backends count
/// their passes.
pub(crate) async fn check_health(state: Shared) {
    probe_loop(
        state,
        health_of,
        |hc| Duration::from_millis(hc.interval_ms),
        {
            let clients = Arc::new(health::Clients::default());
            move |target, hc| {
                let clients = clients.clone();
                async move { health::check(&clients, target, &hc).await }
            }
        },
        apply_health,
    )
    .await;
}

/// Health checks that ended on a local error are logged at most this often.
static LOCAL_ERROR_LOG: std::sync::Mutex<LogEvery> =
    std::sync::Mutex::new(LogEvery::new(Duration::from_secs(10)));

fn apply_health(
    st: &mut State,
    trackers: &mut Schedule<Tracker>,
    results: Vec<(Probe<HealthCheck>, Result<(), CheckError>)>,
) {
    // A check the agent could not run for want of its own resources says
    // nothing of the backend: no verdict, and no pass for a returning one.
    let (local, results): (Vec<_>, Vec<_>) = results
        .into_iter()
        .partition(|(_, r)| r.as_ref().is_err_and(CheckError::is_local));
    if let Some((p, Err(e))) = local.first() {
        if let Some(held) = LOCAL_ERROR_LOG.lock().expect("not poisoned").ready() {
            warn!(
                checks = local.len(),
                held_back = held,
                backend = %p.target,
                "health checks gave no verdict, the backends keep theirs: {e}"
            );
        }
    }
    let Ok((bal, lifecycle)) = st.balancer_and_lifecycle() else {
        return;
    };
    for (p, result) in &results {
        let (hc, (vip, backend)) = (&p.settings, p.pair);
        let tracker = trackers
            .kept(&p.pair)
            .expect("a pair just probed is followed");
        let Some(up) = tracker.record(result.is_ok(), hc.rise, hc.fall) else {
            continue;
        };
        let vip_addr = SocketAddr::new(vip.0, vip.1);
        match result {
            Ok(()) => info!(vip = %vip_addr, backend = %p.target, "backend up"),
            Err(e) => warn!(vip = %vip_addr, backend = %p.target, "backend down: {e}"),
        }
        if let Err(e) = bal.set_health(vip, backend, up) {
            warn!(%backend, "applying a health verdict: {e:#}");
        }
    }
    // Then returning backends count their passes.
    let mut returned = false;
    for (p, result) in &results {
        let ((vip, backend), rise) = (p.pair, p.settings.rise);
        match lifecycle.health_result(bal, vip, backend, result.is_ok(), rise, wall_ms()) {
            Ok(changed) => returned |= changed,
            Err(e) => warn!(%backend, "lifecycle after a health check: {e:#}"),
        }
    }
    if returned {
        st.save_lifecycle();
    }
}

/// Polls every VIP's load feedback endpoints at their intervals and hands
/// the reports to the lifecycle, whose step turns them (with active flows)
/// into damped load levels and weights. A backend that does not answer keeps
/// its last report; its health check decides whether it is down.
pub(crate) async fn poll_load(state: Shared) {
    probe_loop(
        state,
        feedback_of,
        |fb| Duration::from_millis(fb.interval_ms),
        {
            let clients = Arc::new(health::Clients::default());
            move |target, fb| {
                let clients = clients.clone();
                async move { health::fetch_load(&clients, target, &fb.path, fb.timeout_ms).await }
            }
        },
        |st: &mut State, _: &mut Schedule, results| {
            for (p, result) in results {
                match result {
                    Ok(load) => st.lifecycle.set_reported_load(p.pair.0, p.pair.1, load),
                    Err(e) => tracing::debug!(backend = %p.target, "load report: {e:#}"),
                }
            }
        },
    )
    .await;
}

/// Moves flow events from the datapath's ring buffer into the collector.
pub(crate) async fn read_events(state: Shared, ring: aya::maps::RingBuf<aya::maps::MapData>) {
    let mut fd =
        // SAFETY: the ring buffer owns its map fd, which stays open and the
        // same for as long as the AsyncFd owns the ring buffer.
        match unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        {
            Ok(fd) => fd,
            Err(e) => {
                warn!("cannot poll the flow-event ring buffer: {e}");
                return;
            }
        };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let mut batch = Vec::new();
        {
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() == std::mem::size_of::<lb_common::FlowEvent>() {
                    // SAFETY: the datapath writes whole FlowEvents; read unaligned.
                    batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
                }
            }
        }
        guard.clear_ready();
        let mut st = state.lock().await;
        for e in batch {
            st.collector.add_event(e);
        }
    }
}

/// Re-resolves every backend's next hop when the kernel reports a neighbour,
/// route or link change, and periodically as a safety net, and rewrites the
/// backend entries whose next hop changed (a neighbour's new MAC, a moved route).
pub(crate) async fn refresh_next_hops(state: Shared, resolver: Arc<Resolver>, every: Duration) {
    let mut watcher = match ChangeWatcher::new() {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(
                "cannot watch rtnetlink changes ({e:#}); refreshing next hops every {every:?} only"
            );
            None
        }
    };
    let mut tick = ticker(every);
    loop {
        let changed = async {
            match watcher.as_mut() {
                Some(w) => w.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            alive = changed => {
                tracing::debug!(alive, "rtnetlink change");
                if !alive {
                    warn!("rtnetlink change watch ended; refreshing every {every:?} only");
                    watcher = None;
                }
                // Changes come in bursts (and resolving probes neighbours,
                // which makes more): settle, then refresh once for all of them.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Some(w) = watcher.as_mut() {
                    w.drain();
                }
            }
        }
        let addresses = match &state.lock().await.balancer {
            Some(b) => b.backend_addresses(),
            None => return,
        };
        let mut results = Vec::with_capacity(addresses.len());
        for a in addresses {
            match resolver.resolve(a).await {
                Ok(nh) => results.push((a, nh)),
                Err(e) => {
                    warn!(backend = %a, "next hop: {e:#}");
                    results.push((a, None));
                }
            }
        }
        let mut st = state.lock().await;
        let Some(b) = st.balancer.as_mut() else {
            return;
        };
        for (a, nh) in results {
            match b.set_next_hop(a, nh) {
                Ok(true) => info!(backend = %a, next_hop = ?nh, "next hop changed"),
                Ok(false) => {}
                Err(e) => warn!(backend = %a, "writing next hop: {e:#}"),
            }
        }
    }
}
