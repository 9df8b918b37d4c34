//! The agent: loads the datapath, fills its maps, attaches the programs,
//! starts its loops, serves the control API, and detaches on shutdown.
//!
//! Start-up order is validation, load, maps, and only then attach, so a bad
//! configuration or a failed load leaves every interface as it was.
//!
//! - `state`: the state behind the lock (`State`, `Shared`).
//! - `loops`: one function per loop (collect, health, load, events, next hops).
//! - `control`: the control API and its handlers.
//! - `status`, `report`, `metrics`: what the agent shows, read from the state.

mod control;
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

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{MapData, RingBuf},
    programs::{Xdp, XdpMode},
    Ebpf,
};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::Mutex,
    task::JoinHandle,
};
use tracing::{info, warn};

pub use state::wall_ms;
use state::{Shared, State};

use crate::{
    api::InterfaceStatus,
    balancer::Balancer,
    collector::Collector,
    config::{BalancerConfig, Config, DecapConfig, XdpModeSetting},
    datapath::{self, DecapMaps, FlowTable, KernelDatapath, MapSizes},
    lifecycle::Lifecycle,
    nexthop::{NextHop, Resolver},
};

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
/// lifecycle (a rollout in progress when the agent stopped goes on).
async fn start_balancer(
    ebpf: &mut Ebpf,
    b: &BalancerConfig,
    sizes: &MapSizes,
    resolver: &Resolver,
) -> Result<Balancing> {
    let mut local = BTreeSet::new();
    for name in &b.datapath.interfaces {
        local.insert(resolver.ifindex(name).await?);
    }
    let dp = KernelDatapath::new(ebpf, sizes)?;
    let collector_table = dp.flow_table()?;
    let listing_table = Arc::new(dp.flow_table()?);
    let mut bal = Balancer::new(dp, *sizes, local);
    let addresses: Vec<IpAddr> = b
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|x| x.address))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let next_hops = resolve_all(resolver, &addresses, Duration::from_secs(2)).await;
    let summary = bal.apply(b, &next_hops)?;
    info!(
        ?summary,
        resolved = next_hops.len(),
        backends = addresses.len(),
        "configuration applied"
    );
    let mut lifecycle = Lifecycle::load(&b.state_file)?;
    lifecycle.sync(b, wall_ms());
    for (vip, backend) in lifecycle.disabled() {
        info!(vip, %backend, "disabled by an operator before the restart");
    }
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
    for a in &d.addresses {
        maps.add_address(*a)?;
    }
    Ok(maps)
}

/// Loads the object and both programs (the verifier runs here).
fn load_programs(sizes: &MapSizes) -> Result<Ebpf> {
    let mut ebpf = datapath::load(sizes)?;
    for name in ["lb_ingress", "lb_decap"] {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading {name} (verifier)"))?;
    }
    Ok(ebpf)
}

/// Attaches the programs the configuration asks for, last: everything they
/// read is in place.
fn attach_all(ebpf: &mut Ebpf, config: &Config) -> Result<Vec<InterfaceStatus>> {
    let mut interfaces = Vec::new();
    if let Some(b) = &config.balancer {
        for name in &b.datapath.interfaces {
            interfaces.push(attach(ebpf, "lb_ingress", name, b.datapath.xdp_mode)?);
        }
    }
    if let Some(d) = &config.decap {
        for name in &d.interfaces {
            interfaces.push(attach(ebpf, "lb_decap", name, d.xdp_mode)?);
        }
    }
    Ok(interfaces)
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
    if let Some(addr) = config.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        info!(%addr, "serving Prometheus metrics");
        tasks.push(tokio::spawn(metrics::serve(listener, state.clone())));
    }
    Ok(tasks)
}

/// Runs the agent until `shutdown` completes. `config` is already validated.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    crate::limits::raise_file_limit();
    let resolver = Arc::new(Resolver::new().context("opening rtnetlink")?);
    let sizes = sizes(&config);
    let mut ebpf = load_programs(&sizes)?;
    let balancing = match &config.balancer {
        Some(b) => Some(start_balancer(&mut ebpf, b, &sizes, &resolver).await?),
        None => None,
    };
    let decap = match &config.decap {
        Some(d) => Some(start_decap(&mut ebpf, d, &resolver).await?),
        None => None,
    };
    let listener = bind_socket(&config.socket).await?;
    let interfaces = attach_all(&mut ebpf, &config)?;

    let socket = config.socket.clone();
    let collector = config
        .balancer
        .as_ref()
        .map(|b| Collector::new(&b.visibility))
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
    let loops_config = config.clone();
    let state: Shared = Arc::new(Mutex::new(State {
        config,
        balancer,
        decap,
        interfaces,
        collector,
        lifecycle,
        flows,
    }));
    let tasks = spawn_loops(&state, &loops_config, tables, &resolver).await?;
    info!(socket = %socket.display(), "serving the control API");
    control::accept(listener, &state, &resolver, shutdown).await;
    info!("shutting down: detaching programs");
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
