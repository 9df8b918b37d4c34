//! The agent's configuration: the TOML file as written (`RawConfig`, in
//! `raw`) and the validated form (`Config`, here) everything downstream takes;
//! `validate` turns the one into the other.
//!
//! Validation is complete before anything is loaded or attached: an invalid
//! file is refused with a message naming the offending field.

use std::{fmt, net::IpAddr, path::PathBuf, str::FromStr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

mod announce;
mod bypass;
mod fleet;
mod host;
mod raw;
mod validate;

pub use announce::AnnounceConfig;
pub use bypass::{
    validate_bypass, BypassConfig, BypassPolicy, RawBypass,
    DEFAULT_WINDOW_MS as DEFAULT_BYPASS_WINDOW_MS, MAX_AFTER_PACKETS as MAX_BYPASS_AFTER_PACKETS,
};
pub use fleet::{check_name, FleetConfig, DEFAULT_FLEET_PREFIX};
pub use host::{host_instance, HostConfig, HostVip};
pub use raw::*;

pub const DEFAULT_SOCKET: &str = "/run/lb-agent/lb.sock";
/// The agent instance when the file names none.
pub const DEFAULT_INSTANCE: &str = "lb";
const MAX_RING_ENTRIES: u64 = 1 << 28;

/// A validation failure: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field: field.into(),
        message: message.into(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Names the agent's pinned datapath (`/sys/fs/bpf/lb-agent/INSTANCE`) and
    /// its lock: one agent per instance.
    pub instance: String,
    pub socket: PathBuf,
    pub balancer: Option<BalancerConfig>,
    pub decap: Option<DecapConfig>,
    /// Prometheus text exposition on this TCP address; off when `None`.
    pub metrics: Option<std::net::SocketAddr>,
    /// The etcd store of a fleet: the agent registers there, and a balancer
    /// takes its VIPs from it (the file's `[[vips]]` serve until then).
    pub fleet: Option<FleetConfig>,
    /// The VIP routes this balancer keeps for BIRD to announce; none when
    /// the section is absent.
    pub announce: Option<AnnounceConfig>,
    /// The host intermediary role: source-side balancers installed through
    /// the fleet store run on this host's guests' interfaces.
    pub host: Option<HostConfig>,
    /// Bypass: instructions received (client host) or sent (backend host).
    pub bypass: Option<BypassConfig>,
    /// The programs log why they drop or pass packets, and the agent
    /// forwards the records to its logs (`lb-agent --datapath-log`; not in
    /// the file: it is for debugging, and set by each start).
    pub datapath_log: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerConfig {
    pub datapath: DatapathConfig,
    pub encap: EncapConfig,
    pub vips: Vec<VipConfig>,
    pub visibility: VisibilityConfig,
    /// Where the lifecycle (maintenance states, rollouts) is persisted, so an
    /// agent restart resumes a rollout.
    pub state_file: PathBuf,
}

pub const DEFAULT_STATE_FILE: &str = "/var/lib/lb-agent/lifecycle.json";

/// How a VIP's backends are taken out for maintenance (see `lifecycle`).
#[derive(Debug, Clone, PartialEq)]
pub struct Maintenance {
    /// Load level (0..=1 of a backend's capacity) a backend should stay under.
    pub load_limit: f64,
    /// Spare capacity the backends left in service must keep, as a fraction
    /// of their capacity at `load_limit`, for another backend to start draining.
    pub min_spare: f64,
    /// Most backends of the VIP out of the table for maintenance at once.
    pub max_parallel: u32,
    /// A draining backend is taken out after this long even with flows left.
    pub drain_timeout_s: u64,
    /// Command run when a backend is in maintenance (program and arguments).
    pub hook: Option<Vec<String>>,
    pub hook_timeout_s: u64,
    /// Weight factor, during a rollout, for backends still awaiting
    /// maintenance while an up-to-date backend is under the load limit.
    pub prefer_up_to_date: f64,
}

impl Eq for Maintenance {}

impl Default for Maintenance {
    fn default() -> Self {
        Maintenance {
            load_limit: 0.8,
            min_spare: 0.2,
            max_parallel: 1,
            drain_timeout_s: 300,
            hook: None,
            hook_timeout_s: 600,
            prefer_up_to_date: 0.5,
        }
    }
}

/// Tracers, flow events and the collector that reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisibilityConfig {
    /// Per-flow tracers in the datapath (times, flags, per-leg bytes, closes).
    pub trace_flows: bool,
    /// Flow events: 0 = off, N = one flow in N (by flow hash).
    pub event_sample: u32,
    pub collect_interval_ms: u64,
    /// Idle flows are removed from the connection table (and counted as
    /// expired) after these many seconds.
    pub tcp_idle_timeout_s: u64,
    pub udp_idle_timeout_s: u64,
    /// After the client's FIN or RST.
    pub closed_timeout_s: u64,
    /// A SYN with nothing after it.
    pub half_open_timeout_s: u64,
}

impl Default for VisibilityConfig {
    fn default() -> Self {
        VisibilityConfig {
            trace_flows: true,
            event_sample: 1,
            collect_interval_ms: 1000,
            tcp_idle_timeout_s: 300,
            udp_idle_timeout_s: 60,
            closed_timeout_s: 10,
            half_open_timeout_s: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathConfig {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpModeSetting,
    /// The smallest Maglev ring (prime); a VIP's ring grows with its
    /// backend count (`maglev::ring_size`).
    pub maglev_table_size: u32,
    /// Slots of the array every VIP's rings are carved from (4 bytes each).
    pub maglev_slots: u64,
    pub max_vips: u32,
    pub max_backends: u32,
    pub flow_table_size: u32,
    pub next_hop_refresh_ms: u64,
    /// ICMP "too big" answers to clients whose packets would not fit a
    /// backend's link once encapsulated: per second and burst, per CPU
    /// (rate 0: none, such packets are dropped).
    pub icmp_too_big_rate: u32,
    pub icmp_too_big_burst: u32,
    /// Lower the MSS option of SYNs to VIPs to what fits the backend's link.
    pub clamp_mss: bool,
    /// Flows the connection table does not know, whose backend differs in
    /// the VIP's previous table, carry that backend as a second candidate.
    pub second_chance: bool,
    /// This agent is a bypass source intermediary (a client host) for the
    /// VIPs with a `bypass` policy: their flows go to the LB unless an
    /// accepted instruction sends them straight to the backend.
    pub bypass_source: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EncapConfig {
    pub source_v4: Option<Ipv4Net>,
    pub source_v6: Option<Ipv6Net>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipConfig {
    pub name: String,
    pub address: IpAddr,
    /// 0 means every port.
    pub port: u16,
    pub protocol: Protocol,
    pub backends: Vec<BackendConfig>,
    /// Checks of every backend of the VIP; without them backends are always up.
    pub health: Option<HealthCheck>,
    /// Load reports from the backends, which scale their weights.
    pub feedback: Option<Feedback>,
    pub maintenance: Maintenance,
    /// Off (`None`) by default.
    pub bypass: Option<BypassPolicy>,
}

/// Where and how often backends report their load, and how it is damped.
/// A backend answers `GET path` on `port` with JSON `{"load": x}`, x from 0
/// (idle) to 1 (at its limit); its weight becomes weight × max(0.05, 1 − load).
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    pub port: u16,
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Weight of a new report in the moving average (1 = no damping).
    pub smoothing: f64,
    /// Smallest change of a backend's weight factor that rebuilds the table.
    pub min_change: f64,
}

impl Eq for Feedback {}

/// How a VIP's backends are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: HealthKind,
    /// Port on the backend's address (default: the VIP's port).
    pub port: u16,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Successes in a row that bring a down backend up, failures in a row
    /// that take an up backend down.
    pub rise: u32,
    pub fall: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            kind: HealthKind::Tcp,
            port: 0,
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 2,
            fall: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthKind {
    /// A TCP connection is accepted.
    Tcp,
    /// `GET path` answers with `expect_status` (redirects are not
    /// followed); over TLS when `tls` is set (`kind = "https"`).
    Http {
        path: String,
        expect_status: u16,
        tls: Option<TlsCheck>,
    },
}

/// How an HTTPS check verifies the backend's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsCheck {
    /// The name the certificate must carry (and the SNI sent); `None`: the
    /// backend's IP address, which the certificate must then list.
    pub server_name: Option<String>,
    /// PEM certificates of the only CAs trusted (read from `tls_ca_file`
    /// at validation); `None`: the system's roots.
    pub ca_pem: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: IpAddr,
    /// Relative weight; 0 keeps established flows but takes no new ones.
    pub weight: u32,
    /// Concurrent flows the backend is sized for: its load level is at least
    /// its active flows over this.
    pub max_flows: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecapConfig {
    pub interfaces: Vec<String>,
    pub addresses: Vec<IpAddr>,
    pub xdp_mode: XdpModeSetting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The protocol with this IP protocol number, if it is one a VIP can have.
    pub const fn from_number(number: u8) -> Option<Protocol> {
        match number {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// How XDP programs are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpModeSetting {
    /// Driver mode only; attaching fails where the driver lacks it.
    Native,
    /// Generic (skb) mode only.
    Generic,
    /// Driver mode, falling back to generic where the driver lacks it.
    NativeOrGeneric,
}

impl FromStr for XdpModeSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            "native-or-generic" => Ok(Self::NativeOrGeneric),
            other => Err(format!(
                "unknown XDP mode {other:?}; expected \"native\", \"generic\" or \"native-or-generic\""
            )),
        }
    }
}

impl Config {
    /// Parses and validates a configuration file's text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            field: "config".into(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        raw.validate()
    }

    /// Settings fixed at start-up (sizes, interfaces, socket) cannot change on a
    /// reload; VIPs, backends, weights and the encapsulation prefixes can.
    pub fn check_reload(&self, new: &Config) -> Result<(), ConfigError> {
        if self.instance != new.instance {
            return err("instance", "cannot change on reload; restart the agent");
        }
        if self.socket != new.socket {
            return err("socket", "cannot change on reload; restart the agent");
        }
        let old_dp = self.balancer.as_ref().map(|b| &b.datapath);
        let new_dp = new.balancer.as_ref().map(|b| &b.datapath);
        if old_dp != new_dp {
            return err("datapath", "cannot change on reload; restart the agent");
        }
        if self.decap != new.decap {
            return err("decap", "cannot change on reload; restart the agent");
        }
        if self.balancer.as_ref().map(|b| &b.state_file)
            != new.balancer.as_ref().map(|b| &b.state_file)
        {
            return err(
                "lifecycle.state_file",
                "cannot change on reload; restart the agent",
            );
        }
        if self.metrics != new.metrics {
            return err("metrics", "cannot change on reload; restart the agent");
        }
        if self.fleet != new.fleet {
            return err("fleet", "cannot change on reload; restart the agent");
        }
        if self.announce != new.announce {
            return err("announce", "cannot change on reload; restart the agent");
        }
        if self.host != new.host {
            return err("host", "cannot change on reload; restart the agent");
        }
        Ok(())
    }
}

/// `198.18.0.1:80` or `[fd00::1]:80`.
pub fn socket_text(addr: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

#[cfg(test)]
mod tests;
