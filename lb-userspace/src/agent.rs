//! The agent: loads the datapath, fills its maps, attaches the programs, serves
//! the control API, keeps next hops fresh, and detaches on shutdown.
//!
//! Start-up order is validation, load, maps, and only then attach, so a bad
//! configuration or a failed load leaves every interface as it was.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use aya::{
    programs::{Xdp, XdpMode},
    Ebpf,
};
use lb_common::{DecapOutcome, Outcome};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};
use tracing::{info, warn};

use crate::{
    api::{
        ApplySummary, DecapStatus, InterfaceStatus, MaintenanceCommand, OutcomeStatus, Request,
        Response, Status, VipMaintenance,
    },
    balancer::Balancer,
    collector::{monotonic_ns, Collector},
    config::{Config, XdpModeSetting},
    datapath::{self, DecapMaps, FlowTable, KernelDatapath, MapSizes},
    lifecycle::{HookJob, Lifecycle, Observation},
    nexthop::{ChangeWatcher, NextHop, Resolver},
};

/// Largest request the API accepts (a configuration file, JSON-encoded).
const MAX_REQUEST: u64 = 16 << 20;

pub(crate) struct State {
    pub(crate) config: Config,
    pub(crate) balancer: Option<Balancer<KernelDatapath>>,
    pub(crate) decap: Option<DecapMaps>,
    pub(crate) interfaces: Vec<InterfaceStatus>,
    pub(crate) collector: Collector,
    pub(crate) lifecycle: Lifecycle,
    /// A handle on the connection table for `lbctl flows`, read without the lock.
    pub(crate) flows: Option<Arc<FlowTable>>,
}

impl State {
    /// Persists the lifecycle; a failure is logged, the agent goes on.
    fn save_lifecycle(&self) {
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

pub(crate) type Shared = Arc<Mutex<State>>;

fn sizes(config: &Config) -> MapSizes {
    match &config.balancer {
        Some(b) => MapSizes {
            maglev_size: b.datapath.maglev_table_size,
            max_vips: b.datapath.max_vips,
            max_backends: b.datapath.max_backends,
            flow_table_size: b.datapath.flow_table_size,
        },
        None => MapSizes::DECAP_ONLY,
    }
}

/// Resolves next hops for `addresses`, retrying briefly while neighbours are
/// being discovered. Unresolved ones are left to the refresh loop.
async fn resolve_all(
    resolver: &Resolver,
    addresses: &[IpAddr],
    patience: Duration,
) -> BTreeMap<IpAddr, NextHop> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut found = BTreeMap::new();
    loop {
        for a in addresses {
            if found.contains_key(a) {
                continue;
            }
            match resolver.resolve(*a).await {
                Ok(Some(nh)) => {
                    found.insert(*a, nh);
                }
                Ok(None) => {}
                Err(e) => warn!(backend = %a, "next hop: {e:#}"),
            }
        }
        if found.len() == addresses.len() || tokio::time::Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn attach(
    ebpf: &mut Ebpf,
    program: &str,
    interface: &str,
    mode: XdpModeSetting,
) -> Result<InterfaceStatus> {
    let prog: &mut Xdp = ebpf
        .program_mut(program)
        .with_context(|| format!("the eBPF object has no program {program}"))?
        .try_into()?;
    let attached = match mode {
        XdpModeSetting::Native => prog.attach(interface, XdpMode::Driver).map(|_| "native"),
        XdpModeSetting::Generic => prog.attach(interface, XdpMode::Skb).map(|_| "generic"),
        XdpModeSetting::NativeOrGeneric => match prog.attach(interface, XdpMode::Driver) {
            Ok(_) => Ok("native"),
            Err(e) => {
                warn!(
                    interface,
                    "native XDP unavailable ({e}); falling back to generic"
                );
                prog.attach(interface, XdpMode::Skb).map(|_| "generic")
            }
        },
    }
    .with_context(|| format!("attaching {program} to {interface}"))?;
    info!(interface, program, mode = attached, "attached");
    Ok(InterfaceStatus {
        name: interface.to_string(),
        program: program.to_string(),
        mode: attached.to_string(),
    })
}

/// Runs the agent until `shutdown` completes. `config` is already validated.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let resolver = Arc::new(Resolver::new().context("opening rtnetlink")?);
    let sizes = sizes(&config);
    let mut ebpf = datapath::load(&sizes)?;
    for name in ["lb_ingress", "lb_decap"] {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading {name} (verifier)"))?;
    }

    let mut balancer = None;
    let mut flow_table = None;
    let mut listing_table = None;
    let mut lifecycle = Lifecycle::default();
    if let Some(b) = &config.balancer {
        let mut local = BTreeSet::new();
        for name in &b.datapath.interfaces {
            local.insert(resolver.ifindex(name).await?);
        }
        let dp = KernelDatapath::new(&mut ebpf, &sizes)?;
        flow_table = Some(dp.flow_table()?);
        listing_table = Some(Arc::new(dp.flow_table()?));
        let mut bal = Balancer::new(dp, sizes, local);
        let addresses: Vec<IpAddr> = b
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|x| x.address))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let next_hops = resolve_all(&resolver, &addresses, Duration::from_secs(2)).await;
        let summary = bal.apply(b, &next_hops)?;
        info!(
            ?summary,
            resolved = next_hops.len(),
            backends = addresses.len(),
            "configuration applied"
        );
        // A rollout in progress when the agent stopped resumes.
        lifecycle = Lifecycle::load(&b.state_file)?;
        lifecycle.sync(b, wall_ms());
        lifecycle.place_all(&mut bal)?;
        for (vip, backend) in lifecycle.disabled() {
            bal.set_enabled(&vip, backend, false)?;
            info!(vip, %backend, "disabled by an operator before the restart");
        }
        lifecycle
            .save(&b.state_file)
            .context("the lifecycle state file must be writable")?;
        balancer = Some(bal);
    }
    let mut decap = None;
    if let Some(d) = &config.decap {
        for name in &d.interfaces {
            resolver.ifindex(name).await?;
        }
        let mut maps = DecapMaps::new(&mut ebpf)?;
        for a in &d.addresses {
            maps.add_address(*a)?;
        }
        decap = Some(maps);
    }

    let listener = bind_socket(&config.socket).await?;

    // Attach last: everything the programs read is in place.
    let mut interfaces = Vec::new();
    if let Some(b) = &config.balancer {
        for name in &b.datapath.interfaces {
            interfaces.push(attach(&mut ebpf, "lb_ingress", name, b.datapath.xdp_mode)?);
        }
    }
    if let Some(d) = &config.decap {
        for name in &d.interfaces {
            interfaces.push(attach(&mut ebpf, "lb_decap", name, d.xdp_mode)?);
        }
    }

    let socket = config.socket.clone();
    let refresh = config
        .balancer
        .as_ref()
        .map(|b| Duration::from_millis(b.datapath.next_hop_refresh_ms));
    let visibility = config.balancer.as_ref().map(|b| b.visibility);
    let balancing = config.balancer.is_some();
    let metrics_addr = config.metrics;
    let events = match &config.balancer {
        Some(_) => Some(aya::maps::RingBuf::try_from(
            ebpf.take_map("FLOW_EVENTS")
                .context("the eBPF object has no FLOW_EVENTS")?,
        )?),
        None => None,
    };
    let state: Shared = Arc::new(Mutex::new(State {
        config,
        balancer,
        decap,
        interfaces,
        collector: visibility.map(|v| Collector::new(&v)).unwrap_or_default(),
        lifecycle,
        flows: listing_table,
    }));
    let mut tasks = Vec::new();
    if let (Some(v), Some(table)) = (visibility, flow_table) {
        tasks.push(tokio::spawn(collect(
            state.clone(),
            table,
            Duration::from_millis(v.collect_interval_ms),
        )));
    }
    if let Some(ring) = events {
        tasks.push(tokio::spawn(read_events(state.clone(), ring)));
    }
    if balancing {
        tasks.push(tokio::spawn(check_health(state.clone())));
        tasks.push(tokio::spawn(poll_load(state.clone())));
    }
    if let Some(addr) = metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        info!(%addr, "serving Prometheus metrics");
        tasks.push(tokio::spawn(crate::metrics::serve(listener, state.clone())));
    }
    info!(socket = %socket.display(), "serving the control API");

    let refresher = refresh
        .map(|every| tokio::spawn(refresh_next_hops(state.clone(), resolver.clone(), every)));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (state, resolver) = (state.clone(), resolver.clone());
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, state, resolver).await {
                            warn!("control connection: {e:#}");
                        }
                    });
                }
                Err(e) => warn!("accept: {e}"),
            },
        }
    }
    info!("shutting down: detaching programs");
    if let Some(r) = refresher {
        r.abort();
    }
    for t in tasks {
        t.abort();
    }
    let _ = std::fs::remove_file(&socket);
    // Dropping the object detaches every program and frees the maps.
    drop(state);
    drop(ebpf);
    Ok(())
}

async fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!("another agent is serving {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The collector's loop: one collection per interval. The connection table
/// is read and expired outside the state lock (a million flows take a good
/// fraction of a second); the lock is held only to take the result in, read
/// the counters and step the lifecycle.
async fn collect(state: Shared, table: FlowTable, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            tokio::spawn(run_hook(state.clone(), job));
        }
    }
}

/// Moves the lifecycle on with what the collector just saw: the flows of
/// each VIP on each backend, and each backend's load. Returns hooks to run.
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
    let backend_ids: BTreeMap<IpAddr, u32> = bal
        .backend_ids()
        .into_iter()
        .map(|(id, a)| (a, id))
        .collect();
    let observations: BTreeMap<_, Observation> = bal
        .vips()
        .iter()
        .flat_map(|(vip_id, v)| {
            let ident = (v.address, v.port, v.protocol);
            v.backends.iter().map(move |b| (ident, *vip_id, *b))
        })
        .map(|(ident, vip_id, b)| {
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
            let o = Observation {
                flows: pair.active + pair.closing,
                load: crate::lifecycle::load_level(
                    bal.reported_load(ident, b.address),
                    host,
                    b.max_flows,
                ),
                healthy: bal.healthy(ident, b.address),
            };
            ((ident, b.address), o)
        })
        .collect();
    let now = wall_ms();
    match lifecycle.step(
        bal,
        &|vip, b| {
            // Every configured pair is observed; were one not, it counts as
            // serving with unknown load (the capacity rule still applies).
            observations
                .get(&(vip, b.address))
                .copied()
                .unwrap_or(Observation {
                    flows: 0,
                    load: None,
                    healthy: true,
                })
        },
        now,
    ) {
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

/// Runs a maintenance hook with its environment and timeout, then reports
/// the result to the lifecycle.
async fn run_hook(state: Shared, job: HookJob) {
    let backend = job.backend;
    info!(%backend, hook = ?job.argv, "running the maintenance hook");
    let result = run_command(&job).await;
    let mut st = state.lock().await;
    let State {
        balancer,
        lifecycle,
        ..
    } = &mut *st;
    let Some(bal) = balancer.as_mut() else { return };
    match lifecycle.hook_finished(bal, job.vip, backend, result, wall_ms()) {
        Ok(true) => st.save_lifecycle(),
        Ok(false) => {}
        Err(e) => warn!(%backend, "after the maintenance hook: {e:#}"),
    }
}

/// The hook's outcome: success, or what went wrong (exit status, the end of
/// its standard error, a timeout). The hook runs in its own process group,
/// which is killed as a whole at the timeout.
async fn run_command(job: &HookJob) -> std::result::Result<(), String> {
    let mut cmd = tokio::process::Command::new(&job.argv[0]);
    cmd.args(&job.argv[1..])
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", job.argv[0]))?;
    let group = child.id();
    let run = tokio::time::timeout(Duration::from_secs(job.timeout_s), child.wait_with_output());
    match run.await {
        Err(_) => {
            if let Some(pid) = group {
                // SAFETY: kill(2) on the process group the hook leads.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            Err(format!(
                "timed out after {} s and was killed",
                job.timeout_s
            ))
        }
        Ok(Err(e)) => Err(format!("waiting for {}: {e}", job.argv[0])),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: String = stderr
                .trim()
                .lines()
                .last()
                .unwrap_or("")
                .chars()
                .take(300)
                .collect();
            Err(if tail.is_empty() {
                format!("{}", out.status)
            } else {
                format!("{}: {tail}", out.status)
            })
        }
    }
}

/// Runs every VIP's health checks at their intervals and applies the
/// verdicts (rise/fall thresholds) to the balancer.
async fn check_health(state: Shared) {
    use std::collections::HashMap;
    type Pair = ((IpAddr, u16, crate::config::Protocol), IpAddr);
    let mut trackers: HashMap<Pair, (crate::health::Tracker, tokio::time::Instant)> =
        HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        // What is due, from the configuration in force.
        let due: Vec<(Pair, SocketAddr, crate::config::HealthCheck)> = {
            let st = state.lock().await;
            let Some(b) = &st.config.balancer else { return };
            let mut due = Vec::new();
            for v in &b.vips {
                let Some(hc) = &v.health else { continue };
                for be in &v.backends {
                    let pair = ((v.address, v.port, v.protocol), be.address);
                    let next = trackers.get(&pair).map_or(now, |(_, at)| *at);
                    if next <= now {
                        due.push((pair, SocketAddr::new(be.address, hc.port), hc.clone()));
                    }
                }
            }
            due
        };
        if due.is_empty() {
            continue;
        }
        let results =
            futures::future::join_all(due.into_iter().map(|(pair, target, hc)| async move {
                let result = crate::health::check(target, &hc).await;
                (pair, target, hc, result)
            }))
            .await;
        let mut changes = Vec::new();
        let mut passes = Vec::new();
        for (pair, target, hc, result) in results {
            passes.push((pair, result.is_ok(), hc.rise));
            let entry = trackers
                .entry(pair)
                .or_insert((crate::health::Tracker::default(), now));
            entry.1 = now + Duration::from_millis(hc.interval_ms);
            if let Some(up) = entry.0.record(result.is_ok(), hc.rise, hc.fall) {
                match &result {
                    Ok(()) => {
                        info!(vip = %SocketAddr::new(pair.0 .0, pair.0 .1), backend = %target, "backend up")
                    }
                    Err(e) => {
                        warn!(vip = %SocketAddr::new(pair.0 .0, pair.0 .1), backend = %target, "backend down: {e:#}")
                    }
                }
                changes.push((pair, up));
            }
        }
        let mut st = state.lock().await;
        let State {
            balancer,
            lifecycle,
            ..
        } = &mut *st;
        let Some(bal) = balancer.as_mut() else {
            return;
        };
        for ((vip, backend), up) in changes {
            if let Err(e) = bal.set_health(vip, backend, up) {
                warn!(%backend, "applying a health verdict: {e:#}");
            }
        }
        // Returning backends count their passes.
        let mut returned = false;
        for ((vip, backend), passed, rise) in passes {
            match lifecycle.health_result(bal, vip, backend, passed, rise, wall_ms()) {
                Ok(changed) => returned |= changed,
                Err(e) => warn!(%backend, "lifecycle after a health check: {e:#}"),
            }
        }
        if returned {
            st.save_lifecycle();
        }
        // Pairs no longer configured are forgotten.
        if let Some(b) = &st.config.balancer {
            let live: std::collections::HashSet<Pair> = b
                .vips
                .iter()
                .filter(|v| v.health.is_some())
                .flat_map(|v| {
                    v.backends
                        .iter()
                        .map(move |be| ((v.address, v.port, v.protocol), be.address))
                })
                .collect();
            trackers.retain(|p, _| live.contains(p));
        }
    }
}

/// Polls every VIP's load feedback endpoints at their intervals and records
/// the reports; the lifecycle step turns them (with active flows) into damped
/// load levels and weights. A backend that does not answer keeps its last
/// report; its health check decides whether it is down.
async fn poll_load(state: Shared) {
    use std::collections::HashMap;
    type Pair = ((IpAddr, u16, crate::config::Protocol), IpAddr);
    let mut next: HashMap<Pair, tokio::time::Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        let due: Vec<(Pair, SocketAddr, crate::config::Feedback)> = {
            let st = state.lock().await;
            let Some(b) = &st.config.balancer else { return };
            let mut due = Vec::new();
            for v in &b.vips {
                let Some(fb) = &v.feedback else { continue };
                for be in &v.backends {
                    let pair = ((v.address, v.port, v.protocol), be.address);
                    if next.get(&pair).is_none_or(|at| *at <= now) {
                        due.push((pair, SocketAddr::new(be.address, fb.port), fb.clone()));
                    }
                }
            }
            due
        };
        if due.is_empty() {
            continue;
        }
        let results =
            futures::future::join_all(due.into_iter().map(|(pair, target, fb)| async move {
                let result = crate::health::fetch_load(target, &fb.path, fb.timeout_ms).await;
                (pair, target, fb, result)
            }))
            .await;
        let mut changes = Vec::new();
        for (pair, target, fb, result) in results {
            next.insert(pair, now + Duration::from_millis(fb.interval_ms));
            match result {
                Ok(load) => changes.push((pair, load)),
                Err(e) => tracing::debug!(backend = %target, "load report: {e:#}"),
            }
        }
        if changes.is_empty() {
            continue;
        }
        let mut st = state.lock().await;
        let Some(bal) = st.balancer.as_mut() else {
            return;
        };
        for ((vip, backend), load) in changes {
            if let Err(e) = bal.set_reported_load(vip, backend, load) {
                warn!(%backend, "recording a load report: {e:#}");
            }
        }
    }
}

/// Moves flow events from the datapath's ring buffer into the collector.
async fn read_events(state: Shared, ring: aya::maps::RingBuf<aya::maps::MapData>) {
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
async fn refresh_next_hops(state: Shared, resolver: Arc<Resolver>, every: Duration) {
    let mut watcher = match ChangeWatcher::new() {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(
                "cannot watch rtnetlink changes ({e:#}); refreshing next hops every {every:?} only"
            );
            None
        }
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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

async fn serve(stream: UnixStream, state: Shared, resolver: Arc<Resolver>) -> Result<()> {
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let response = if cred.uid() != 0 {
        Response::Error {
            message: "the control API is for root only".into(),
        }
    } else {
        let mut line = String::new();
        BufReader::new(read.take(MAX_REQUEST))
            .read_line(&mut line)
            .await?;
        match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(req, &state, &resolver).await,
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
        }
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    Ok(())
}

async fn handle(req: Request, state: &Shared, resolver: &Resolver) -> Response {
    let result = match req {
        Request::Status => status(state).await.map(|s| Response::Status(Box::new(s))),
        Request::Apply { config } => apply(&config, state, resolver).await.map(Response::Applied),
        Request::Report(q) => crate::report::report(state, &q)
            .await
            .map(|r| Response::Report(Box::new(r))),
        Request::Flows(q) => crate::report::flows(state, &q).await,
        Request::Events { limit } => crate::report::events(state, limit).await,
        Request::SetBackend {
            vip,
            backend,
            enabled,
        } => set_backend(state, &vip, backend, enabled).await,
        Request::Maintenance(cmd) => maintenance(state, cmd).await,
        Request::MaintenanceStatus => maintenance_status(state).await,
    };
    result.unwrap_or_else(|e| Response::Error {
        message: format!("{e:#}"),
    })
}

async fn set_backend(
    state: &Shared,
    vip: &str,
    backend: IpAddr,
    enabled: bool,
) -> Result<Response> {
    let mut st = state.lock().await;
    let bal = st
        .balancer
        .as_mut()
        .context("this agent runs no balancer")?;
    let changed = bal.set_enabled(vip, backend, enabled)?;
    let pair = bal.pair_named(vip, backend)?;
    if changed {
        info!(vip, %backend, enabled, "backend set by the operator");
        st.lifecycle.set_disabled(pair.0, pair.1, !enabled);
        st.save_lifecycle();
    }
    Ok(Response::BackendSet { changed })
}

async fn maintenance(state: &Shared, cmd: MaintenanceCommand) -> Result<Response> {
    let mut st = state.lock().await;
    let State {
        balancer,
        lifecycle,
        ..
    } = &mut *st;
    let bal = balancer.as_mut().context("this agent runs no balancer")?;
    let now = wall_ms();
    let message = match &cmd {
        MaintenanceCommand::Maintain { vip, backend } => {
            let phase = lifecycle.maintain(bal, vip, *backend, now)?;
            format!("{backend} of {vip} is {}", phase.name())
        }
        MaintenanceCommand::Return { vip, backend } => {
            lifecycle.return_backend(bal, vip, *backend, now)?;
            format!("{backend} of {vip} is returning: it serves again once its health checks pass")
        }
        MaintenanceCommand::Rollout { vip } => {
            let n = lifecycle.rollout(bal, vip, now)?;
            format!("rollout of {vip} started: {n} backend(s) maintenance-pending")
        }
        MaintenanceCommand::Cancel { vip } => {
            let n = lifecycle.cancel(bal, vip, now)?;
            format!("maintenance of {vip} cancelled: {n} backend(s) back to active")
        }
    };
    st.save_lifecycle();
    Ok(Response::Maintenance { message })
}

async fn maintenance_status(state: &Shared) -> Result<Response> {
    let st = state.lock().await;
    let vips = st
        .lifecycle
        .vips()
        .map(|(life, cfg)| VipMaintenance {
            load_limit: cfg.maintenance.load_limit,
            min_spare: cfg.maintenance.min_spare,
            max_parallel: cfg.maintenance.max_parallel,
            drain_timeout_s: cfg.maintenance.drain_timeout_s,
            hook: cfg.maintenance.hook.clone(),
            life: life.clone(),
        })
        .collect();
    Ok(Response::MaintenanceStatus { vips })
}

async fn apply(text: &str, state: &Shared, resolver: &Resolver) -> Result<ApplySummary> {
    let new = Config::from_toml(text)?;
    state.lock().await.config.check_reload(&new)?;
    let Some(b) = &new.balancer else {
        // A decap-only agent: check_reload allowed only an identical config.
        return Ok(ApplySummary::default());
    };
    // Resolve next hops of new backends before the switch, outside the lock.
    let known: BTreeSet<IpAddr> = match &state.lock().await.balancer {
        Some(bal) => bal.backend_addresses().into_iter().collect(),
        None => BTreeSet::new(),
    };
    let fresh: Vec<IpAddr> = b
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|x| x.address))
        .filter(|a| !known.contains(a))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let next_hops = resolve_all(resolver, &fresh, Duration::from_secs(1)).await;
    let mut st = state.lock().await;
    st.config.check_reload(&new)?;
    let bal = st
        .balancer
        .as_mut()
        .context("this agent runs no balancer")?;
    let summary = bal.apply(b, &next_hops)?;
    info!(?summary, "configuration applied");
    let State {
        balancer,
        lifecycle,
        ..
    } = &mut *st;
    lifecycle.sync(b, wall_ms());
    if let Some(bal) = balancer.as_mut() {
        lifecycle.place_all(bal)?;
    }
    st.save_lifecycle();
    st.collector.timeouts = Some((&b.visibility).into());
    st.config = new;
    Ok(summary)
}

fn outcome_list(
    names: impl Iterator<Item = &'static str>,
    counters: &[lb_common::PacketCounter],
) -> Vec<OutcomeStatus> {
    names
        .zip(counters)
        .map(|(name, c)| OutcomeStatus {
            outcome: name.to_string(),
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect()
}

async fn status(state: &Shared) -> Result<Status> {
    use crate::datapath::Datapath as _;
    let st = state.lock().await;
    let mut status = Status {
        interfaces: st.interfaces.clone(),
        ..Status::default()
    };
    if let (Some(bal), Some(cfg)) = (&st.balancer, &st.config.balancer) {
        status.maglev_table_size = cfg.datapath.maglev_table_size;
        status.vips = bal.vip_status()?;
        let backend_ids: BTreeMap<IpAddr, u32> = bal
            .backend_ids()
            .into_iter()
            .map(|(id, a)| (a, id))
            .collect();
        for v in &mut status.vips {
            let ident = (v.address, v.port, v.protocol);
            let life = st.lifecycle.vip(ident);
            for b in &mut v.backends {
                if let Some(r) = life.and_then(|l| l.backends.get(&b.address)) {
                    b.state = r.phase.name().into();
                    b.up_to_date = life.is_some_and(|l| l.up_to_date(r));
                    b.load = r.load;
                    b.drain_progress = r.drain_progress();
                }
                let id = backend_ids.get(&b.address).copied().unwrap_or(u32::MAX);
                b.active_flows = st
                    .collector
                    .pair_presence
                    .get(&(v.vip_id, id))
                    .map_or(0, |p| p.active + p.closing);
            }
        }
        status.backends = bal.backend_status()?;
        for b in &mut status.backends {
            b.active_flows = st
                .collector
                .backend_presence
                .get(&b.backend_id)
                .map_or(0, |p| p.active);
        }
        let counters = bal.datapath().outcomes()?;
        status.outcomes = outcome_list(Outcome::ALL.iter().map(|o| o.name()), &counters);
    }
    if let Some(d) = &st.decap {
        status.decap = Some(DecapStatus {
            addresses: d.addresses()?,
            outcomes: outcome_list(DecapOutcome::ALL.iter().map(|o| o.name()), &d.outcomes()?),
        });
    }
    Ok(status)
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT"),
        _ = term.recv() => info!("SIGTERM"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(script: &str, timeout_s: u64) -> HookJob {
        HookJob {
            vip: (
                "198.18.10.1".parse().unwrap(),
                80,
                crate::config::Protocol::Tcp,
            ),
            backend: "198.18.0.11".parse().unwrap(),
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![
                ("LB_BACKEND".into(), "198.18.0.11".into()),
                ("LB_VIP_NAME".into(), "web".into()),
            ],
            timeout_s,
        }
    }

    #[tokio::test]
    async fn hooks_see_their_environment_and_report_failures() {
        assert_eq!(
            run_command(&job(
                r#"test "$LB_BACKEND $LB_VIP_NAME" = "198.18.0.11 web""#,
                5
            ))
            .await,
            Ok(())
        );
        let e = run_command(&job("echo starting; echo 'disk full' >&2; exit 3", 5))
            .await
            .unwrap_err();
        assert!(
            e.contains("exit status: 3") && e.contains("disk full"),
            "{e}"
        );
        let e = run_command(&HookJob {
            argv: vec!["/nonexistent/upgrade".into()],
            ..job("", 5)
        })
        .await
        .unwrap_err();
        assert!(e.contains("cannot run /nonexistent/upgrade"), "{e}");
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed() {
        let started = std::time::Instant::now();
        // A background child too: the whole process group goes.
        let e = run_command(&job("sleep 29.123 & sleep 29.123; wait", 1))
            .await
            .unwrap_err();
        assert!(e.contains("timed out after 1 s"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let left = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|d| std::fs::read(d.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).contains("29.123"))
            .count();
        assert_eq!(left, 0, "hook processes survived the timeout");
    }
}
