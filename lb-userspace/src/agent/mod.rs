//! The agent: loads the datapath, fills its maps, attaches the programs,
//! starts its loops, serves the control API, and detaches on shutdown.
//!
//! Start-up order is validation, load, maps, and only then attach, so a bad
//! configuration or a failed load leaves every interface as it was.
//!
//! - `state`: the state behind the lock (`State`, `Shared`).
//! - `instance`: the instance lock, attaching through pinned links, cleanup.
//! - `loops`: one function per loop (collect, health, load, events, next hops).
//! - `control`: the control API and its handlers.
//! - `announce`: the VIPs announced through BIRD, node drain.
//! - `fleet`: registration in the fleet store, a balancer's VIPs from it, and
//!   the health verdicts it publishes there.
//! - `host`: the host intermediary role: source-side balancers installed
//!   through the store, on the guests' interfaces.
//! - `status`, `report`, `metrics`: what the agent shows, read from the state.
//! - `datapath_log`: the programs' log records (`--datapath-log`) forwarded
//!   to the agent's logs.

mod announce;
mod bypass;
mod bypass_fleet;
mod bypass_send;
mod control;
mod dashboard;
mod datapath_log;
mod fleet;
mod host;
mod instance;
mod loops;
mod metrics;
mod report;
mod state;
mod status;

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::{
    maps::{MapData, RingBuf},
    programs::Xdp,
    Ebpf,
};
use tokio::{net::UnixListener, sync::Mutex, task::JoinHandle};
use tracing::{info, warn};

pub use instance::cleanup;
use instance::InstanceLock;
pub use state::wall_ms;
use state::{Shared, State};

use crate::{
    api::InterfaceStatus,
    balancer::Balancer,
    collector::Collector,
    config::{BalancerConfig, Config, DecapConfig},
    datapath::{self, DecapMaps, FlowTable, KernelDatapath, MapSizes, Origin, Pins},
    lifecycle::Lifecycle,
    nexthop::{NextHop, Resolver},
};

fn sizes(config: &Config) -> MapSizes {
    match &config.balancer {
        Some(b) => MapSizes {
            maglev_size: b.datapath.maglev_table_size,
            // Validated to at most `config::MAX_RING_ENTRIES` (2^28).
            maglev_slots: u32::try_from(b.datapath.maglev_slots).unwrap_or(u32::MAX),
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

/// The balancer's part of the start: maps filled, the lifecycle resumed, a
/// second handle on the connection table for the collector.
struct Balancing {
    balancer: Balancer<KernelDatapath>,
    lifecycle: Lifecycle,
    collector_table: FlowTable,
    listing_table: Arc<FlowTable>,
    events: RingBuf<MapData>,
}

/// Fills the balancer's maps from the configuration and resumes the
/// lifecycle (a rollout in progress when the agent stopped goes on). Over a
/// datapath a previous agent left (`origin`), the ids and rings in use are
/// adopted first, so established flows keep their backends.
async fn start_balancer(
    ebpf: &mut Ebpf,
    b: &BalancerConfig,
    sizes: &MapSizes,
    resolver: &Resolver,
    origin: &Origin,
) -> Result<Balancing> {
    let mut local = BTreeSet::new();
    for name in &b.datapath.interfaces {
        local.insert(resolver.ifindex(name).await?);
    }
    let dp = KernelDatapath::new(ebpf, sizes)?;
    let collector_table = dp.flow_table()?;
    let listing_table = Arc::new(dp.flow_table()?);
    let mut bal = Balancer::new(dp, *sizes, local);
    match origin {
        Origin::Fresh => {}
        Origin::Adopted => {
            let (vips, backends) = bal.adopt()?;
            info!(vips, backends, "adopted the running datapath");
        }
        Origin::Migrating { old, layout } => {
            let old = datapath::OldMaps::open(old, *layout)?;
            let (vips, backends) = bal.adopt_from(&old)?;
            info!(vips, backends, "migrating the running datapath to new maps");
        }
    }
    let mut lifecycle = Lifecycle::load(&b.state_file)?;
    lifecycle.sync(b, wall_ms());
    for (vip, backend) in lifecycle.disabled() {
        info!(vip, %backend, "disabled by an operator before the restart");
    }
    // The first tables built already have the lifecycle's weights.
    lifecycle.seed_all(&mut bal);
    let addresses: Vec<IpAddr> = b
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|x| x.address))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let next_hops = resolve_all(resolver, &addresses, Duration::from_secs(2)).await;
    let summary = bal.apply(b, &next_hops)?;
    for (address, nh) in &next_hops {
        bal.set_next_hop(*address, Some(*nh))?;
    }
    info!(
        ?summary,
        resolved = next_hops.len(),
        backends = addresses.len(),
        "configuration applied"
    );
    lifecycle.place_all(&mut bal)?;
    lifecycle
        .save(&b.state_file)
        .context("the lifecycle state file must be writable")?;
    let events = RingBuf::try_from(
        ebpf.take_map("FLOW_EVENTS")
            .context("the eBPF object has no FLOW_EVENTS")?,
    )?;
    Ok(Balancing {
        balancer: bal,
        lifecycle,
        collector_table,
        listing_table,
        events,
    })
}

/// Writes the addresses `lb_decap` decapsulates for.
async fn start_decap(ebpf: &mut Ebpf, d: &DecapConfig, resolver: &Resolver) -> Result<DecapMaps> {
    for name in &d.interfaces {
        resolver.ifindex(name).await?;
    }
    let mut maps = DecapMaps::new(ebpf)?;
    maps.set_addresses(&d.addresses)?;
    Ok(maps)
}

/// Loads the object over the instance's pinned maps, and both programs (the
/// verifier runs here).
fn load_programs(
    pins: &Pins,
    sizes: &MapSizes,
    object: &[u8],
    datapath_log: bool,
) -> Result<(Ebpf, Origin)> {
    let (mut ebpf, origin) = pins.load(sizes, object, datapath_log)?;
    for name in ["lb_ingress", "lb_decap"] {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading {name} (verifier)"))?;
    }
    Ok((ebpf, origin))
}

/// Copies the connection table of the datapath being replaced (`old`, of
/// map layout `layout`) into the new maps.
fn migrate_flows(dp: &mut KernelDatapath, old: &std::path::Path, layout: u32) -> Result<()> {
    let old = datapath::OldMaps::open(old, layout)?;
    let now = crate::collector::monotonic_ns();
    let (moved, left) = dp.copy_flows_from(&old, now)?;
    if left > 0 {
        warn!(
            flows = moved,
            left_out = left,
            "connection table migrated; the new flow_table_size holds fewer flows: the least recently used were left out"
        );
    } else {
        info!(flows = moved, "connection table migrated");
    }
    Ok(())
}

/// Starts the loops the configuration needs.
async fn spawn_loops(
    state: &Shared,
    config: &Config,
    tables: Option<(FlowTable, RingBuf<MapData>)>,
    resolver: &Arc<Resolver>,
) -> Result<Vec<JoinHandle<()>>> {
    let mut tasks = Vec::new();
    if let (Some(b), Some((table, events))) = (&config.balancer, tables) {
        let every = Duration::from_millis(b.visibility.collect_interval_ms);
        tasks.push(tokio::spawn(loops::collect(state.clone(), table, every)));
        tasks.push(tokio::spawn(loops::read_events(state.clone(), events)));
        tasks.push(tokio::spawn(loops::check_health(state.clone())));
        tasks.push(tokio::spawn(loops::poll_load(state.clone())));
        let refresh = Duration::from_millis(b.datapath.next_hop_refresh_ms);
        tasks.push(tokio::spawn(loops::refresh_next_hops(
            state.clone(),
            resolver.clone(),
            refresh,
        )));
    }
    if let Some(a) = &config.announce {
        let every = Duration::from_millis(a.refresh_ms);
        tasks.push(tokio::spawn(announce::keep(state.clone(), every)));
    }
    if let Some(addr) = config.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        info!(%addr, "serving Prometheus metrics");
        tasks.push(tokio::spawn(metrics::serve(listener, state.clone())));
    }
    Ok(tasks)
}

/// Runs the agent until `shutdown` completes or `lbctl shutdown` asks.
/// `config` is already validated.
///
/// The datapath is pinned: when the agent stops (or dies), the programs keep
/// forwarding with the last state, and the next agent of the instance adopts
/// it. Only `lbctl shutdown --detach` or `lb-agent --cleanup` removes it.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    run_object(config, datapath::EBPF_OBJECT, shutdown).await
}

/// `run` with another eBPF object than the embedded one (`lb-agent
/// --ebpf-object`): the object must have this build's map layout.
pub async fn run_object(
    mut config: Config,
    object: &[u8],
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    // Before anything is read or written: a second agent changes nothing.
    let _lock = InstanceLock::take(&config.instance)?;
    fleet::start_with_cached_vips(&mut config);
    crate::limits::raise_file_limit();
    let resolver = Arc::new(Resolver::new().context("opening rtnetlink")?);
    let pins = Pins::new(&config.instance);
    instance::check_interfaces(&config, &pins, &resolver).await?;
    instance::remove_stale_socket(&config.socket)?;
    let sizes = sizes(&config);
    let (mut ebpf, origin) = load_programs(&pins, &sizes, object, config.datapath_log)?;
    let datapath_log = if config.datapath_log {
        Some(datapath_log::forward(&mut ebpf)?)
    } else {
        None
    };
    if bypass::is_source(&config) {
        bypass::load_source(&mut ebpf, &pins)?;
    }
    let bypass_parts = bypass::start(&mut ebpf, &config).await?;
    let mut balancing = match &config.balancer {
        Some(b) => Some(start_balancer(&mut ebpf, b, &sizes, &resolver, &origin).await?),
        None => None,
    };
    let decap = match &config.decap {
        Some(d) => Some(start_decap(&mut ebpf, d, &resolver).await?),
        None => None,
    };
    let listener = bind_socket(&config.socket).await?;
    if let (Origin::Migrating { old, layout }, Some(b)) = (&origin, balancing.as_mut()) {
        // Flows last, just before the switch: few start in between.
        migrate_flows(b.balancer.datapath_mut(), old, *layout)?;
    }
    let interfaces = instance::attach_all(&mut ebpf, &config, &pins, &resolver).await?;
    if let Origin::Migrating { old, .. } = &origin {
        pins.finish_migration(old)?;
        info!("migration complete");
    }
    let socket = config.socket.clone();
    // Only now that the programs are attached may VIPs be announced.
    let announce = match (&config.announce, &config.balancer) {
        (Some(a), Some(b)) => Some(announce::Announce::start(a, b).await?),
        _ => None,
    };
    let state = shared_state(config.clone(), balancing, decap, interfaces, announce);
    let mut tasks = spawn_loops(&state.0, &config, state.1, &resolver).await?;
    bypass::spawn(&state.0, &config, bypass_parts, &mut tasks).await;
    let state = state.0;
    info!(socket = %socket.display(), instance = config.instance, "serving the control API");
    let stop = state.lock().await.stop.clone();
    let stopped = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = stop.notified() => {}
        }
    };
    let membership = config
        .fleet
        .as_ref()
        .map(|f| fleet::Membership::spawn(state.clone(), resolver.clone(), f.clone()));
    let host_role = host::HostRole::spawn_for(&config, &resolver);
    control::accept(listener, &state, &resolver, stopped).await;
    if let Some(h) = host_role {
        h.leave().await;
    }
    for t in tasks.into_iter().chain(datapath_log) {
        t.abort();
    }
    announce::withdraw_all(&state).await;
    if let Some(m) = membership {
        m.leave().await;
    }
    let _ = std::fs::remove_file(&socket);
    let detach = state.lock().await.detach;
    drop(state);
    drop(ebpf);
    if detach {
        pins.remove()?;
        info!("stopped: programs detached, pinned maps removed");
    } else {
        info!(pins = %pins.dir().display(), "stopped: the datapath keeps forwarding with its last state");
    }
    Ok(())
}

/// The state behind the lock, and what the loops take that is not in it.
fn shared_state(
    config: Config,
    balancing: Option<Balancing>,
    decap: Option<DecapMaps>,
    interfaces: Vec<InterfaceStatus>,
    announce: Option<announce::Announce>,
) -> (Shared, Option<(FlowTable, RingBuf<MapData>)>) {
    let collector = config
        .balancer
        .as_ref()
        .map(|b| Collector::new(&b.visibility, u64::from(b.datapath.flow_table_size)))
        .unwrap_or_default();
    let (balancer, lifecycle, tables, flows) = match balancing {
        Some(b) => (
            Some(b.balancer),
            b.lifecycle,
            Some((b.collector_table, b.events)),
            Some(b.listing_table),
        ),
        None => (None, Lifecycle::default(), None, None),
    };
    let state = Arc::new(Mutex::new(State {
        config,
        balancer,
        decap,
        interfaces,
        collector,
        lifecycle,
        flows,
        announce,
        stop: Arc::new(tokio::sync::Notify::new()),
        detach: false,
        bypass: None,
        bypass_sent: None,
    }));
    (state, tables)
}

/// Binds the control socket (a stale one was removed at the start), for root
/// only.
async fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
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
