//! The control API between `lbctl` and `lb-agent`: one JSON request per line
//! on a Unix socket only root can use, one JSON response line back.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};

use crate::config::Protocol;
pub use crate::{
    balancer::ApplySummary,
    collector::{EventRecord, FlowRecord, FlowReport, Leg},
};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Apply a whole new configuration (the TOML text of the file).
    Apply {
        config: String,
    },
    Report(ReportQuery),
    Flows(FlowQuery),
    Events {
        limit: usize,
    },
    /// Take a backend of a VIP out of service, or put it back.
    SetBackend {
        vip: String,
        backend: IpAddr,
        enabled: bool,
    },
    /// Lifecycle commands on a backend of a VIP, or on a whole VIP.
    Maintenance(MaintenanceCommand),
    MaintenanceStatus,
    /// Stop the agent; with `detach`, remove its pinned datapath too.
    Shutdown {
        detach: bool,
    },
    /// The node's BGP announcement: drain, undrain, status.
    Node {
        action: NodeAction,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeAction {
    /// Withdraw every VIP (kept across restarts) so the router sends the
    /// node's flows to the other LB nodes.
    Drain,
    /// Announce the servable VIPs again.
    Undrain,
    Status,
}

/// A VIP address this node does not announce, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WithheldVip {
    pub address: IpAddr,
    pub reason: String,
}

/// `lbctl node status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    pub drained: bool,
    /// The kernel routing table BIRD learns the VIP routes from.
    pub table: u32,
    /// VIP addresses whose route is in the table (BIRD announces them).
    pub announced: Vec<IpAddr>,
    pub withheld: Vec<WithheldVip>,
    /// The last failure to update the table, if the last attempt failed.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum MaintenanceCommand {
    /// Mark a backend maintenance-pending (or retry its failed hook).
    Maintain { vip: String, backend: IpAddr },
    /// Bring a backend in maintenance back (once health checks pass).
    Return { vip: String, backend: IpAddr },
    /// Mark every backend of the VIP for a rolling upgrade.
    Rollout { vip: String },
    /// Stop a rollout; pending and draining backends return to active.
    Cancel { vip: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReportQuery {
    /// Only this VIP (by name).
    pub vip: Option<String>,
    /// Only this backend.
    pub backend: Option<IpAddr>,
    /// How many of the largest flows to include.
    pub top: usize,
    /// Window for counters and rates, in seconds (default: since the
    /// previous collection).
    pub since_s: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FlowQuery {
    pub vip: Option<String>,
    pub backend: Option<IpAddr>,
    /// "open", "half-open", "closed-fin", "closed-rst", "closed" or "all".
    pub state: Option<String>,
    pub limit: usize,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Applied(ApplySummary),
    Report(Box<Report>),
    Flows {
        flows: Vec<FlowRecord>,
        matched: usize,
    },
    Events {
        events: Vec<EventRecord>,
        stats: EventStats,
    },
    /// `changed` is false when the backend already was in that state.
    BackendSet {
        changed: bool,
    },
    /// What a maintenance command did, in words.
    Maintenance {
        message: String,
    },
    MaintenanceStatus {
        vips: Vec<VipMaintenance>,
    },
    Node(NodeStatus),
    /// The agent stops once this answer is sent.
    ShuttingDown {
        detach: bool,
    },
    Error {
        message: String,
    },
}

/// Datapath counters of a VIP or a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Packets in from clients (each is sent on to a backend once).
    pub packets: u64,
    /// Bytes in, as received.
    pub bytes: u64,
    /// Bytes out to backends, encapsulation included.
    pub bytes_out: u64,
    pub new_flows: u64,
    /// Flows the client closed with FIN / RST.
    pub closed_fin: u64,
    pub closed_rst: u64,
}

impl From<lb_common::TrafficCounters> for Counters {
    fn from(c: lb_common::TrafficCounters) -> Self {
        Counters {
            packets: c.packets,
            bytes: c.bytes,
            bytes_out: c.bytes_out,
            new_flows: c.new_flows,
            closed_fin: c.closed_fin,
            closed_rst: c.closed_rst,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NextHopStatus {
    pub ifindex: u32,
    pub mac: String,
    /// The largest IP packet the link toward the backend carries; clients'
    /// packets must fit it with the outer header added.
    #[serde(default)]
    pub mtu: u32,
}

/// A backend as one VIP uses it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VipBackendStatus {
    pub address: IpAddr,
    pub weight: u32,
    /// Slots this backend holds in the VIP's Maglev table.
    pub maglev_slots: u32,
    /// "up" or "down" by the VIP's health check, "disabled" by an operator,
    /// or "unchecked".
    pub health: String,
    /// The weight in the VIP's table now: 0 while out, scaled by load.
    pub effective_weight: u32,
    /// The weight factor from the backend's load reports, if any.
    pub load_factor: Option<f64>,
    /// Lifecycle phase: active, maintenance-pending, draining, ...
    pub state: String,
    /// Whether it has had the VIP's latest maintenance generation.
    pub up_to_date: bool,
    /// Load level (0..1 of its capacity) the lifecycle last saw, if known.
    pub load: Option<f64>,
    /// Flows of this VIP on it, open or closing, at the collector's last pass.
    pub active_flows: u64,
    /// While draining: the share of its flows at the drain's start now gone.
    pub drain_progress: Option<f64>,
}

/// A backend host, with the traffic it received over all VIPs it serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: IpAddr,
    pub backend_id: u32,
    pub next_hop: Option<NextHopStatus>,
    pub counters: Counters,
    /// Open flows at the collector's last pass (the figure reports and
    /// metrics show too).
    pub active_flows: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub vip_id: u32,
    pub counters: Counters,
    /// A digest of the VIP's Maglev table, by backend identity: LB nodes
    /// with the same backends and weights show the same digest.
    #[serde(default)]
    pub table_digest: String,
    pub backends: Vec<VipBackendStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutcomeStatus {
    pub outcome: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub program: String,
    pub mode: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecapStatus {
    pub addresses: Vec<IpAddr>,
    pub outcomes: Vec<OutcomeStatus>,
}

/// A driver's XDP error counters on an interface the datapath sends through
/// (`ethtool -S`): frames counted as sent that the driver then dropped.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct XdpErrors {
    pub interface: String,
    /// By the driver's counter names; empty for a driver without them.
    pub counters: BTreeMap<String, u64>,
    /// Why the counters could not be read, if they could not.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub interfaces: Vec<InterfaceStatus>,
    pub maglev_table_size: u32,
    pub vips: Vec<VipStatus>,
    pub backends: Vec<BackendStatus>,
    pub outcomes: Vec<OutcomeStatus>,
    pub decap: Option<DecapStatus>,
    /// TCP SYNs whose MSS option was lowered to fit a backend's link (they
    /// are counted under their outcome too).
    #[serde(default)]
    pub mss_clamped: u64,
    /// Packets of flows the full connection table had no room for: sent to
    /// the Maglev ring's backend without an entry (they are counted under
    /// their outcome too).
    #[serde(default)]
    pub flows_unrecorded: u64,
    /// What the connection table's idle timeouts are divided by while it is
    /// nearly full (1: the configured ones).
    #[serde(default)]
    pub flow_timeout_divisor: u64,
    #[serde(default)]
    pub xdp_errors: Vec<XdpErrors>,
    /// The bypass intermediary of a client host, or the sender of a
    /// backend host.
    #[serde(default)]
    pub bypass: Option<BypassStatus>,
}

/// Bypass at this agent: instructions received (source intermediary) and
/// sent (backend host), and the intermediary's datapath counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BypassStatus {
    /// Entries in the bypass table now.
    pub entries: u64,
    pub accepted: u64,
    pub revoked: u64,
    /// Refused instructions by reason (bad_tag, unknown_key, stale,
    /// replayed, unknown_flow, wrong_backend, malformed, ...).
    pub refused: std::collections::BTreeMap<String, u64>,
    /// Entries the agent ended (backend left the VIP, flow idle).
    pub ended_by_agent: u64,
    /// Datapath: packets sent straight to a backend, packets of bypass VIPs
    /// passed toward the LB, entries ended (FIN/RST, unusable backend).
    pub packets_direct: u64,
    pub packets_to_lb: u64,
    pub ended_by_datapath: u64,
    /// Packets of bypassed flows sent toward the LB so that its connection
    /// table keeps them (one per flow every 2 s of traffic; counted in
    /// `packets_to_lb` too).
    #[serde(default)]
    pub packets_refreshed: u64,
    /// Backend host: instructions sent, and those that could not be.
    pub sent: u64,
    pub send_errors: u64,
}

/// A VIP's maintenance settings and lifecycle (`lbctl maintenance status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VipMaintenance {
    pub load_limit: f64,
    pub min_spare: f64,
    pub max_parallel: u32,
    pub drain_timeout_s: u64,
    pub hook: Option<Vec<String>>,
    #[serde(flatten)]
    pub life: crate::lifecycle::VipLife,
}

/// How long `call` waits for the agent, connecting included. The agent
/// answers every request in well under a second; a full control queue (16
/// clients at once) or a stuck agent shows up as this error, not a hang.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends one request to the agent and waits for its response, at most
/// `CALL_TIMEOUT`.
pub async fn call(socket: &Path, request: &Request) -> Result<Response> {
    call_within(socket, request, CALL_TIMEOUT).await
}

async fn call_within(
    socket: &Path,
    request: &Request,
    limit: std::time::Duration,
) -> Result<Response> {
    match tokio::time::timeout(limit, exchange(socket, request)).await {
        Ok(result) => result,
        Err(_) => bail!(
            "lb-agent at {} did not answer within {:.1} s: it may be serving its maximum of control clients, or stuck; retry, and check the agent's log",
            socket.display(),
            limit.as_secs_f64()
        ),
    }
}

async fn exchange(socket: &Path, request: &Request) -> Result<Response> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| anyhow::anyhow!("{}", unreachable(socket, &e)))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    // The agent may refuse a request before it has read all of it (too
    // large, say): its answer is still there to read.
    let sent = async {
        write.write_all(line.as_bytes()).await?;
        write.shutdown().await
    }
    .await;
    let mut reply = String::new();
    let received = BufReader::new(read).read_line(&mut reply).await;
    if reply.is_empty() {
        sent.context("sending the request to lb-agent")?;
        received?;
        bail!("lb-agent closed the connection without answering");
    }
    serde_json::from_str(&reply).context("lb-agent sent a response lbctl does not understand")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VipReport {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub flows: FlowReport,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendReport {
    pub address: IpAddr,
    pub flows: FlowReport,
    /// Sent to the backend since the agent started (LB to backend leg).
    pub sent_total: Leg,
    /// What the backend's `lb_decap` decapsulated (filled by `lbctl report
    /// --decap-socket`), to compare with `lb_to_backend`.
    pub delivered: Option<Leg>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventStats {
    /// Sent by the datapath / dropped because the ring buffer was full.
    pub sent: u64,
    pub dropped: u64,
    /// Read by the agent.
    pub received: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// The window counters and rates cover, in seconds.
    pub window_s: f64,
    /// Seconds since the collector last read the connection table.
    pub collected_ago_s: f64,
    pub flows_in_table: u64,
    pub vips: Vec<VipReport>,
    pub backends: Vec<BackendReport>,
    /// The largest flows by bytes in, at the last collection.
    pub top_flows: Vec<FlowRecord>,
    pub events: EventStats,
    /// A source intermediary's bypassed flows, counted at the intermediary
    /// (empty elsewhere).
    #[serde(default)]
    pub bypassed_flows: Vec<BypassedFlow>,
    /// What the report cannot show, and why.
    pub notes: Vec<String>,
}

/// A flow the source intermediary sends straight to its backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BypassedFlow {
    pub client: std::net::SocketAddr,
    pub vip: std::net::SocketAddr,
    pub protocol: String,
    /// `None` if the backend id is no longer the balancer's (the sweep ends
    /// such entries).
    pub backend: Option<IpAddr>,
    /// Always true: the flow is bypassed (a field so that flow listings
    /// can be told apart in JSON).
    pub bypassed: bool,
    /// Client to backend straight, as received from the client (the
    /// packets the intermediary encapsulated).
    pub client_to_backend: crate::collector::Leg,
    /// Packets of the flow sent toward the LB since the entry was made
    /// (refreshes of the LB's entry, the closing FIN or RST).
    pub client_to_lb_packets: u64,
    /// Seconds since the flow's last packet sent straight (`None`: none yet).
    pub idle_s: Option<f64>,
}

/// Why the agent's socket could not be reached, and what to do about it.
fn unreachable(socket: &Path, e: &std::io::Error) -> String {
    let at = socket.display();
    match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "no lb-agent socket at {at}: the agent is not running (start it: `systemctl start lb-agent`, or `lb-agent --config FILE`), or it serves another socket (the `socket` setting of its configuration; give it with `lbctl --socket PATH` or LBCTL_SOCKET)"
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied on {at}: the control socket is root's only; run lbctl as root (`sudo lbctl ...`)"
        ),
        std::io::ErrorKind::ConnectionRefused => format!(
            "nothing answers on {at}: the agent that made it has stopped (its datapath keeps forwarding); start it again (`systemctl start lb-agent`, or `lb-agent --config FILE`)"
        ),
        _ => format!("cannot reach lb-agent at {at}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;

    /// The operator's usual mistakes, each with what to do next.
    #[tokio::test]
    async fn an_unreachable_agent_says_what_to_do() {
        let missing = crate::limits::testing::socket_path("api-missing");
        let e = call(&missing, &Request::Status).await.unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("the agent is not running"), "{text}");
        assert!(text.contains("lbctl --socket PATH"), "{text}");

        // A socket its agent left behind: nobody listens.
        let stale = crate::limits::testing::socket_path("api-stale");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let e = call(&stale, &Request::Status).await.unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("has stopped"), "{text}");
        assert!(text.contains("systemctl start lb-agent"), "{text}");
        let _ = std::fs::remove_file(&stale);

        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let text = unreachable(Path::new("/run/lb-agent/lb.sock"), &denied);
        assert!(text.contains("run lbctl as root"), "{text}");
    }

    /// An agent that refuses a request before reading all of it still gets
    /// its answer through.
    #[tokio::test]
    async fn an_answer_before_the_whole_request_is_read_is_shown() {
        let path = crate::limits::testing::socket_path("api");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut some = vec![0u8; 1 << 20];
            let _ = s.read_exact(&mut some).await;
            let refusal = Response::Error {
                message: "the request is larger than 16 MiB".into(),
            };
            let line = serde_json::to_string(&refusal).unwrap() + "\n";
            let _ = s.write_all(line.as_bytes()).await;
        });
        let apply = Request::Apply {
            config: " ".repeat(20 << 20),
        };
        let response = call(&path, &apply).await;
        let _ = std::fs::remove_file(&path);
        match response {
            Ok(Response::Error { message }) => assert!(message.contains("larger"), "{message}"),
            other => panic!("expected the agent's refusal, got {other:?}"),
        }
    }

    /// An agent that accepts but never answers gives an error, not a hang.
    #[tokio::test]
    async fn an_agent_that_never_answers_is_an_error() {
        let path = crate::limits::testing::socket_path("silent");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let held = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
        let limit = std::time::Duration::from_millis(300);
        let response = call_within(&path, &Request::Status, limit).await;
        let _ = std::fs::remove_file(&path);
        drop(held);
        let message = format!("{:#}", response.expect_err("no answer is an error"));
        assert!(message.contains("did not answer within 0.3 s"), "{message}");
    }
}
