//! `lbctl`: the operator's CLI against a running `lb-agent`, and against a
//! fleet's etcd store (`lbctl fleet`, `lbctl service`, `lbctl bypass`).
#[path = "lbctl/bypass.rs"]
mod bypass;
#[path = "lbctl/fleet.rs"]
mod fleet;
#[path = "lbctl/install.rs"]
mod install;
#[path = "lbctl/node.rs"]
mod node;
#[path = "lbctl/progress.rs"]
mod progress;
#[path = "lbctl/report.rs"]
mod report;

use std::{
    fmt,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{anyhow, Context as _, Result};
use clap::{Parser, Subcommand};
use lb_userspace::{
    api::{
        call, BackendStatus, EventRecord, EventStats, FlowQuery, FlowRecord, Leg,
        MaintenanceCommand, OutcomeStatus, Report, ReportQuery, Request, Response, Status,
        VipMaintenance, VipStatus, XdpErrors,
    },
    config::{socket_text, Config, DEFAULT_SOCKET},
    lifecycle::Phase,
};
use serde::{Serialize, Serializer};

#[derive(Parser)]
#[command(name = "lbctl", version, about = "Control a running lb-agent")]
struct Cli {
    /// The agent's control socket.
    #[arg(long, global = true, env = "LBCTL_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// For `fleet` and `service`: a TOML file with a [fleet] section (the
    /// store's endpoints and TLS files), e.g. an agent's configuration.
    #[arg(long, global = true, env = "LBCTL_FLEET", value_name = "FILE")]
    fleet: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show VIPs, backends, weights and counters.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Flows per VIP and backend: rates, active and half-open flows, closes,
    /// packets and bytes per leg, sent against delivered, the largest flows.
    Report {
        #[arg(long)]
        json: bool,
        /// Only this VIP (by name).
        #[arg(long)]
        vip: Option<String>,
        /// Only this backend (by address).
        #[arg(long)]
        backend: Option<std::net::IpAddr>,
        /// How many of the largest flows to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Counters and rates over this window (e.g. 30s, 5m); default: since
        /// the previous collection.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Print the report again every this many seconds, until interrupted.
        #[arg(long, num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
        /// Control socket of a backend's agent: its lb_decap counters become
        /// the "delivered" figures of that backend (repeatable).
        #[arg(long = "decap-socket")]
        decap_sockets: Vec<PathBuf>,
    },
    /// List flows of the connection table, largest first.
    Flows {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        vip: Option<String>,
        #[arg(long)]
        backend: Option<std::net::IpAddr>,
        /// open, half-open, closed-fin, closed-rst, closed or all.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Recent flow open and close events from the datapath.
    Events {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Take a backend of a VIP out of service or put it back, or take it
    /// through maintenance.
    Backend {
        #[command(subcommand)]
        action: BackendAction,
    },
    /// Rolling maintenance of a VIP's backends, and its progress.
    Maintenance {
        #[command(subcommand)]
        action: MaintenanceAction,
    },
    /// Apply a new configuration file atomically (established flows are kept).
    Apply {
        /// The TOML configuration file.
        #[arg(long, short)]
        file: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// This LB node's VIP announcement through BIRD: drain, undrain, status.
    Node {
        #[command(subcommand)]
        action: node::NodeCommand,
    },
    /// The fleet's etcd store: registered nodes, the VIP document.
    Fleet {
        #[command(subcommand)]
        action: fleet::FleetAction,
    },
    /// The fleet's service registry.
    Service {
        #[command(subcommand)]
        action: fleet::ServiceAction,
    },
    /// Bypass in the fleet store: per-service policies, the key ring,
    /// registered intermediaries.
    Bypass {
        #[command(subcommand)]
        action: bypass::BypassAction,
    },
    /// Balance FROM's calls to TO's VIPs on the hosts of FROM's instances
    /// (source-side balancing; the fleet store carries the instruction).
    Install {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
    /// Remove an install: its hosts detach their source-side balancer.
    Uninstall {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
    /// Installs, and per host the generation applied and any error.
    Installs {
        #[arg(long)]
        json: bool,
    },
    /// Write man pages and shell completions under DIR (used to build the
    /// package).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
    /// Stop the agent. The pinned datapath keeps forwarding with its last
    /// state until an agent of the same instance starts and adopts it.
    Shutdown {
        /// Also remove the pinned datapath: the programs detach and the
        /// connection table is freed.
        #[arg(long)]
        detach: bool,
    },
}

#[derive(Subcommand)]
enum BackendAction {
    /// Put the backend back into the VIP's table.
    Enable {
        vip: String,
        backend: std::net::IpAddr,
    },
    /// Take the backend out: no new flows, and its established flows move
    /// to the other backends.
    Disable {
        vip: String,
        backend: std::net::IpAddr,
    },
    /// Mark the backend maintenance-pending: it drains when capacity allows,
    /// goes in maintenance, runs the hook and returns up to date. On a
    /// backend whose hook failed, runs the hook again.
    Maintain {
        vip: String,
        backend: std::net::IpAddr,
    },
    /// Bring a backend in maintenance (or whose hook failed) back: it serves
    /// again once its health checks pass.
    Return {
        vip: String,
        backend: std::net::IpAddr,
    },
}

#[derive(Subcommand)]
enum MaintenanceAction {
    /// Mark every backend of the VIP for maintenance: a rolling upgrade,
    /// one backend (or more, as capacity and max_parallel allow) at a time.
    Rollout {
        vip: String,
        /// Follow the rollout until it completes (exit 0) or fails (a hook
        /// failed, or it was cancelled: exit 1), with a progress bar on a
        /// terminal and one line per change otherwise.
        #[arg(long)]
        wait: bool,
    },
    /// Stop the VIP's rollout: pending and draining backends return to active.
    Cancel { vip: String },
    /// Each VIP's rollout, spare capacity and backends' phases.
    Status {
        #[arg(long)]
        json: bool,
    },
}

fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.0}%", v * 100.0))
}

fn print_maintenance(vips: &[VipMaintenance]) {
    for v in vips {
        println!(
            "VIP {}  generation {}  spare capacity {} (min_spare {}, load_limit {}, max_parallel {})",
            v.life.name,
            v.life.generation,
            percent(v.life.spare),
            percent(Some(v.min_spare)),
            percent(Some(v.load_limit)),
            v.max_parallel
        );
        match &v.life.rollout {
            Some(r) => {
                let done = v
                    .life
                    .backends
                    .values()
                    .filter(|b| b.generation >= r.generation && b.phase == Phase::Active)
                    .count();
                let state = if r.cancelled_ms.is_some() {
                    "cancelled"
                } else if r.finished_ms.is_some() {
                    "complete"
                } else {
                    "running"
                };
                println!(
                    "  rollout to generation {}: {state}, {done}/{} backends up to date, lowest spare capacity {}",
                    r.generation,
                    v.life.backends.len(),
                    percent(r.min_spare_seen)
                );
            }
            None => println!("  no rollout"),
        }
        if let Some(h) = &v.life.held {
            println!("  waiting: {h}");
        }
        println!(
            "  {:<40} {:<20} {:>10} {:>6} {:>7} {:>6} {:>6}  last hook error",
            "backend", "state", "up to date", "load", "flows", "drain", "hooks"
        );
        for (a, r) in &v.life.backends {
            println!(
                "  {:<40} {:<20} {:>10} {:>6} {:>7} {:>6} {:>6}  {}",
                a.to_string(),
                r.phase.name(),
                if v.life.up_to_date(r) { "yes" } else { "no" },
                percent(r.load),
                r.flows,
                percent(r.drain_progress()),
                r.hook_runs,
                r.last_error.as_deref().unwrap_or("")
            );
        }
    }
}

pub(crate) fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn print_status(s: &Status) {
    for i in &s.interfaces {
        println!("interface {:<12} {:<11} {}", i.name, i.program, i.mode);
    }
    for v in &s.vips {
        print_vip_status(v, s.maglev_table_size);
    }
    if !s.backends.is_empty() {
        print_backend_traffic(&s.backends);
    }
    if !s.outcomes.is_empty() {
        println!();
        println!("datapath outcomes:");
        for o in s.outcomes.iter().filter(|o| o.packets > 0) {
            print_outcome(o);
        }
        if s.mss_clamped > 0 {
            println!(
                "  {:<24} {:>12} SYNs (forwarded)",
                "mss_clamped", s.mss_clamped
            );
        }
        if s.flows_unrecorded > 0 {
            println!(
                "  {:<24} {:>12} packets (forwarded by Maglev alone: the connection table was full)",
                "flows_unrecorded", s.flows_unrecorded
            );
        }
        if s.flow_timeout_divisor > 1 {
            println!(
                "  connection table nearly full: idle timeouts divided by {}",
                s.flow_timeout_divisor
            );
        }
    }
    print_xdp_errors(&s.xdp_errors);
    if let Some(b) = &s.bypass {
        println!();
        println!(
            "bypass: {} flows sent straight to their backend; instructions accepted {}, revoked {}, sent {} (errors {})",
            b.entries, b.accepted, b.revoked, b.sent, b.send_errors
        );
        println!(
            "  packets straight to backends {}, toward the LB {} (refreshes of bypassed flows {}); entries ended by the datapath {}, by the agent {}",
            b.packets_direct, b.packets_to_lb, b.packets_refreshed, b.ended_by_datapath, b.ended_by_agent
        );
        for (reason, n) in &b.refused {
            println!("  refused {reason:<16} {n:>10}");
        }
    }
    if let Some(d) = &s.decap {
        println!();
        let addrs: Vec<String> = d.addresses.iter().map(|a| a.to_string()).collect();
        println!("decapsulating for {}:", addrs.join(", "));
        for o in &d.outcomes {
            print_outcome(o);
        }
    }
}

/// Drivers' XDP error counters: frames the datapath counted as sent that
/// the driver dropped.
fn print_xdp_errors(list: &[XdpErrors]) {
    if list.is_empty() {
        return;
    }
    println!();
    println!("driver XDP errors (frames the datapath sent that the driver dropped):");
    for e in list {
        let counters: Vec<String> = e.counters.iter().map(|(n, v)| format!("{n} {v}")).collect();
        let text = match &e.error {
            Some(error) => format!("unreadable: {error}"),
            None if counters.is_empty() => "none kept by this driver".into(),
            None => counters.join(", "),
        };
        println!("  {:<12} {text}", e.interface);
    }
    let lost: u64 = list.iter().flat_map(|e| e.counters.values()).sum();
    if lost > 0 {
        println!("  warning: {lost} frames counted as forwarded (or answered) never left");
    }
}

/// A VIP of `lbctl status` and the table of its backends.
fn print_vip_status(v: &VipStatus, maglev_table_size: u32) {
    println!();
    println!(
        "VIP {} {} {}  packets {}  bytes {}  new flows {}  table {}",
        v.name,
        v.protocol,
        socket_text(v.address, v.port),
        v.counters.packets,
        human_bytes(v.counters.bytes),
        v.counters.new_flows,
        v.table_digest
    );
    println!(
        "  {:<40} {:>6} {:>9} {:>7} {:>9} {:<20} {:>5} {:>6} {:>6}",
        "backend", "weight", "effective", "share", "health", "state", "load", "flows", "drain"
    );
    for b in &v.backends {
        let share = if maglev_table_size > 0 {
            100.0 * f64::from(b.maglev_slots) / f64::from(maglev_table_size)
        } else {
            0.0
        };
        let state = if b.up_to_date || b.state != "active" {
            b.state.clone()
        } else {
            "active (outdated)".into()
        };
        println!(
            "  {:<40} {:>6} {:>9} {:>6.1}% {:>9} {:<20} {:>5} {:>6} {:>6}",
            b.address.to_string(),
            b.weight,
            b.effective_weight,
            share,
            b.health,
            state,
            percent(b.load),
            b.active_flows,
            percent(b.drain_progress)
        );
    }
}

/// Traffic of each backend, over all the VIPs it serves.
fn print_backend_traffic(backends: &[BackendStatus]) {
    println!();
    println!("backends (traffic over all their VIPs):");
    println!(
        "  {:<40} {:>19} {:>6} {:>10} {:>11} {:>10} {:>8}",
        "backend", "next hop", "mtu", "packets", "bytes", "new flows", "active"
    );
    for b in backends {
        let (nh, mtu) = b.next_hop.as_ref().map_or_else(
            || ("unresolved".into(), "-".into()),
            |n| (n.mac.clone(), n.mtu.to_string()),
        );
        println!(
            "  {:<40} {:>19} {:>6} {:>10} {:>11} {:>10} {:>8}",
            b.address.to_string(),
            nh,
            mtu,
            b.counters.packets,
            human_bytes(b.counters.bytes),
            b.counters.new_flows,
            b.active_flows
        );
    }
}

fn print_outcome(o: &OutcomeStatus) {
    println!(
        "  {:<24} {:>12} packets {:>12}",
        o.outcome,
        o.packets,
        human_bytes(o.bytes)
    );
}

/// `value` as pretty JSON when `json`, otherwise as `text` prints it.
fn print<T: Serialize + ?Sized>(json: bool, value: &T, text: impl FnOnce(&T)) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        text(value);
    }
    Ok(())
}

/// An answer other than the one a request expects.
#[derive(Debug)]
enum Refusal {
    /// The agent answered with an error.
    Error(String),
    /// Another kind of response.
    Unexpected(Response),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Error(message) => f.write_str(message),
            Refusal::Unexpected(other) => write!(f, "unexpected response: {other:?}"),
        }
    }
}

impl std::error::Error for Refusal {}

/// What `pick` takes out of `response` when it is the expected variant;
/// `pick` hands any other response back, and it becomes a `Refusal`.
fn expect<T>(
    response: Response,
    pick: impl FnOnce(Response) -> Result<T, Response>,
) -> Result<T, Refusal> {
    pick(response).map_err(|other| match other {
        Response::Error { message } => Refusal::Error(message),
        other => Refusal::Unexpected(other),
    })
}

/// Fills `delivered` from backend agents' lb_decap counters.
async fn add_delivered(report: &mut Report, sockets: &[PathBuf]) -> Result<()> {
    for s in sockets {
        let status = expect(call(s, &Request::Status).await?, |r| match r {
            Response::Status(st) => Ok(st),
            other => Err(other),
        })
        .map_err(|refusal| match refusal {
            Refusal::Error(message) => anyhow!("{}: {message}", s.display()),
            Refusal::Unexpected(other) => {
                anyhow!("{}: unexpected response {other:?}", s.display())
            }
        })?;
        let decap = status
            .decap
            .with_context(|| format!("the agent at {} runs no lb_decap", s.display()))?;
        let done = &decap.outcomes[lb_common::DecapOutcome::Decapsulated as usize];
        for b in report
            .backends
            .iter_mut()
            .filter(|b| decap.addresses.contains(&b.address))
        {
            b.delivered = Some(Leg {
                packets: done.packets,
                bytes: done.bytes,
            });
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let socket = cli.socket.as_path();
    match cli.command {
        Command::Status { json } => run_status(socket, json).await,
        Command::Report {
            json,
            vip,
            backend,
            top,
            since,
            watch,
            decap_sockets,
        } => {
            let query = ReportQuery {
                vip,
                backend,
                top,
                since_s: since.map(|d| d.as_secs_f64()),
            };
            run_report(socket, query, json, watch, &decap_sockets).await
        }
        Command::Flows {
            json,
            vip,
            backend,
            state,
            limit,
        } => {
            let query = FlowQuery {
                vip,
                backend,
                state,
                limit,
            };
            run_flows(socket, query, json).await
        }
        Command::Events { json, limit } => run_events(socket, limit, json).await,
        Command::Backend { action } => run_backend(socket, action).await,
        Command::Maintenance { action } => run_maintenance(socket, action).await,
        Command::Apply { file, json } => run_apply(socket, &file, json).await,
        Command::Shutdown { detach } => run_shutdown(socket, detach).await,
        Command::Node { action } => node::run_node(socket, action).await,
        Command::Fleet { action } => fleet::run_fleet(cli.fleet.as_deref(), action).await,
        Command::Service { action } => fleet::run_service(cli.fleet.as_deref(), action).await,
        Command::Bypass { action } => bypass::run(cli.fleet.as_deref(), action).await,
        Command::Install { from, to } => install::install(cli.fleet.as_deref(), from, to).await,
        Command::Uninstall { from, to } => install::uninstall(cli.fleet.as_deref(), from, to).await,
        Command::Installs { json } => install::show(cli.fleet.as_deref(), json).await,
        Command::GenerateDocs { dir } => {
            lb_userspace::docs::generate(<Cli as clap::CommandFactory>::command(), &dir)
        }
    }
}

async fn run_shutdown(socket: &Path, detach: bool) -> Result<()> {
    let detach = expect(
        call(socket, &Request::Shutdown { detach }).await?,
        |r| match r {
            Response::ShuttingDown { detach } => Ok(detach),
            other => Err(other),
        },
    )?;
    if detach {
        println!("lb-agent stops and removes its datapath");
    } else {
        println!("lb-agent stops; the datapath keeps forwarding until an agent adopts it");
    }
    Ok(())
}

async fn run_status(socket: &Path, json: bool) -> Result<()> {
    let status = expect(call(socket, &Request::Status).await?, |r| match r {
        Response::Status(s) => Ok(s),
        other => Err(other),
    })?;
    print(json, &*status, print_status)
}

/// The report, once or, with `watch`, every `watch` seconds until
/// interrupted: redrawn in place on a terminal, one after the other when
/// piped or with `--json`.
async fn run_report(
    socket: &Path,
    query: ReportQuery,
    json: bool,
    watch: Option<u64>,
    decap_sockets: &[PathBuf],
) -> Result<()> {
    let Some(secs) = watch else {
        let r = fetch_report(socket, &query, decap_sockets).await?;
        return print(json, &r, |r| print!("{}", report::render(r)));
    };
    let secs = secs.max(1);
    let screen =
        (!json && std::io::IsTerminal::is_terminal(&std::io::stdout())).then(report::Screen::enter);
    loop {
        let r = fetch_report(socket, &query, decap_sockets).await?;
        let header = format!(
            "every {secs}s, at {} (Ctrl-C stops)\n\n",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        );
        match &screen {
            Some(s) => s.draw(&(header + &report::render(&r))),
            None if json => println!("{}", serde_json::to_string_pretty(&r)?),
            None => print!("{header}{}", report::render(&r)),
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(secs)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn fetch_report(
    socket: &Path,
    query: &ReportQuery,
    decap_sockets: &[PathBuf],
) -> Result<Report> {
    let mut report = expect(
        call(socket, &Request::Report(query.clone())).await?,
        |r| match r {
            Response::Report(r) => Ok(r),
            other => Err(other),
        },
    )?;
    add_delivered(&mut report, decap_sockets).await?;
    Ok(*report)
}

/// What `lbctl flows` prints: the largest flows, and how many matched.
struct FlowList<'a> {
    flows: &'a [FlowRecord],
    matched: usize,
}

/// As a `serde_json::Value`, whose keys are sorted at every level: the JSON
/// `lbctl flows --json` has always printed.
impl Serialize for FlowList<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serde_json::json!({ "matched": self.matched, "flows": self.flows }).serialize(serializer)
    }
}

async fn run_flows(socket: &Path, query: FlowQuery, json: bool) -> Result<()> {
    let (flows, matched) = expect(call(socket, &Request::Flows(query)).await?, |r| match r {
        Response::Flows { flows, matched } => Ok((flows, matched)),
        other => Err(other),
    })?;
    let list = FlowList {
        flows: &flows,
        matched,
    };
    print(json, &list, |l| {
        println!("{} flows match; the {} largest:", l.matched, l.flows.len());
        let mut out = String::new();
        report::flows(&mut out, l.flows);
        print!("{out}");
    })
}

/// What `lbctl events` prints: recent flow events and the event counters.
struct EventList {
    events: Vec<EventRecord>,
    stats: EventStats,
}

/// As a `serde_json::Value`, whose keys are sorted at every level: the JSON
/// `lbctl events --json` has always printed.
impl Serialize for EventList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serde_json::json!({ "stats": self.stats, "events": self.events }).serialize(serializer)
    }
}

async fn run_events(socket: &Path, limit: usize, json: bool) -> Result<()> {
    let list = expect(
        call(socket, &Request::Events { limit }).await?,
        |r| match r {
            Response::Events { events, stats } => Ok(EventList { events, stats }),
            other => Err(other),
        },
    )?;
    print(json, &list, |l| {
        let stats = &l.stats;
        println!(
            "flow events: {} sent, {} dropped, {} received",
            stats.sent, stats.dropped, stats.received
        );
        for e in &l.events {
            println!(
                "  {:>8.1} s ago  {:<9} {} {} → {}  backend {}",
                e.ago_s,
                e.kind,
                e.protocol,
                e.client,
                e.vip,
                e.backend
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "-".into())
            );
        }
    })
}

async fn run_backend(socket: &Path, action: BackendAction) -> Result<()> {
    let (vip, backend, enabled) = match action {
        BackendAction::Enable { vip, backend } => (vip, backend, true),
        BackendAction::Disable { vip, backend } => (vip, backend, false),
        BackendAction::Maintain { vip, backend } => {
            return maintenance(socket, MaintenanceCommand::Maintain { vip, backend }).await;
        }
        BackendAction::Return { vip, backend } => {
            return maintenance(socket, MaintenanceCommand::Return { vip, backend }).await;
        }
    };
    let request = Request::SetBackend {
        vip: vip.clone(),
        backend,
        enabled,
    };
    let changed = expect(call(socket, &request).await?, |r| match r {
        Response::BackendSet { changed } => Ok(changed),
        other => Err(other),
    })?;
    let state = if enabled { "enabled" } else { "disabled" };
    if changed {
        println!("{backend} {state} in {vip}");
    } else {
        println!("{backend} was already {state} in {vip}");
    }
    Ok(())
}

async fn run_maintenance(socket: &Path, action: MaintenanceAction) -> Result<()> {
    match action {
        MaintenanceAction::Status { json } => {
            let vips = expect(
                call(socket, &Request::MaintenanceStatus).await?,
                |r| match r {
                    Response::MaintenanceStatus { vips } => Ok(vips),
                    other => Err(other),
                },
            )?;
            print(json, vips.as_slice(), print_maintenance)
        }
        MaintenanceAction::Rollout { vip, wait } => {
            maintenance(socket, MaintenanceCommand::Rollout { vip: vip.clone() }).await?;
            if wait {
                progress::wait_rollout(socket, &vip).await?;
            }
            Ok(())
        }
        MaintenanceAction::Cancel { vip } => {
            maintenance(socket, MaintenanceCommand::Cancel { vip }).await
        }
    }
}

async fn run_apply(socket: &Path, file: &Path, json: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    // Same validation the agent does, so mistakes show before anything is sent.
    Config::from_toml(&text)
        .with_context(|| format!("invalid configuration {}", file.display()))?;
    let summary = expect(
        call(socket, &Request::Apply { config: text }).await?,
        |r| match r {
            Response::Applied(s) => Ok(s),
            other => Err(other),
        },
    )
    .map_err(|refusal| match refusal {
        Refusal::Error(message) => anyhow!("the agent refused the configuration: {message}"),
        unexpected => unexpected.into(),
    })?;
    print(json, &summary, |s| {
        println!(
            "applied: {} VIPs added, {} changed, {} unchanged, {} removed; {} backends added, {} removed",
            s.vips_added, s.vips_changed, s.vips_unchanged, s.vips_removed, s.backends_added, s.backends_removed
        )
    })
}

async fn maintenance(socket: &Path, cmd: MaintenanceCommand) -> Result<()> {
    let message = expect(
        call(socket, &Request::Maintenance(cmd)).await?,
        |r| match r {
            Response::Maintenance { message } => Ok(message),
            other => Err(other),
        },
    )?;
    println!("{message}");
    Ok(())
}

fn main() -> ExitCode {
    // Behave like other CLIs when piped into `head`: end quietly on a closed pipe.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
