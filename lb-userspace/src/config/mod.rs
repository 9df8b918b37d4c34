//! The agent's configuration: the TOML file as written (`RawConfig`) and the
//! validated form (`Config`) everything downstream takes.
//!
//! Validation is complete before anything is loaded or attached: an invalid
//! file is refused with a message naming the offending field.

use std::{
    collections::{BTreeSet, HashSet},
    fmt,
    net::IpAddr,
    path::PathBuf,
    str::FromStr,
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::maglev::is_prime;

pub const DEFAULT_SOCKET: &str = "/run/lb-agent/lb.sock";
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

// ---------------------------------------------------------------------------
// The file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub socket: Option<String>,
    pub datapath: Option<RawDatapath>,
    pub encap: Option<RawEncap>,
    #[serde(default)]
    pub vips: Vec<RawVip>,
    pub decap: Option<RawDecap>,
    pub visibility: Option<RawVisibility>,
    pub metrics: Option<RawMetrics>,
    pub lifecycle: Option<RawLifecycle>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLifecycle {
    pub state_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMaintenance {
    pub load_limit: Option<f64>,
    pub min_spare: Option<f64>,
    pub max_parallel: Option<i64>,
    pub drain_timeout_s: Option<i64>,
    pub hook: Option<Vec<String>>,
    pub hook_timeout_s: Option<i64>,
    pub prefer_up_to_date: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVisibility {
    pub trace_flows: Option<bool>,
    pub event_sample: Option<i64>,
    pub collect_interval_ms: Option<i64>,
    pub tcp_idle_timeout_s: Option<i64>,
    pub udp_idle_timeout_s: Option<i64>,
    pub closed_timeout_s: Option<i64>,
    pub half_open_timeout_s: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatapath {
    pub interfaces: Vec<String>,
    pub xdp_mode: Option<String>,
    // Numbers are read as i64 and range-checked here, so a bad value gets a
    // message naming its field rather than a type error.
    pub maglev_table_size: Option<i64>,
    pub max_vips: Option<i64>,
    pub max_backends: Option<i64>,
    pub flow_table_size: Option<i64>,
    pub next_hop_refresh_ms: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEncap {
    pub source_v4: Option<String>,
    pub source_v6: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVip {
    pub name: Option<String>,
    pub address: String,
    pub port: Option<i64>,
    pub protocol: String,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    pub health: Option<RawHealth>,
    pub feedback: Option<RawFeedback>,
    pub maintenance: Option<RawMaintenance>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFeedback {
    pub port: i64,
    pub path: Option<String>,
    pub interval_ms: Option<i64>,
    pub timeout_ms: Option<i64>,
    pub smoothing: Option<f64>,
    pub min_change: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub kind: String,
    pub port: Option<i64>,
    pub path: Option<String>,
    pub expect_status: Option<i64>,
    pub interval_ms: Option<i64>,
    pub timeout_ms: Option<i64>,
    pub rise: Option<i64>,
    pub fall: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub address: String,
    pub weight: Option<i64>,
    pub max_flows: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDecap {
    pub interfaces: Vec<String>,
    pub addresses: Vec<String>,
    pub xdp_mode: Option<String>,
}

// ---------------------------------------------------------------------------
// The validated form.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub socket: PathBuf,
    pub balancer: Option<BalancerConfig>,
    pub decap: Option<DecapConfig>,
    /// Prometheus text exposition on this TCP address; off when `None`.
    pub metrics: Option<std::net::SocketAddr>,
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
    pub maglev_table_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    pub flow_table_size: u32,
    pub next_hop_refresh_ms: u64,
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
    /// `GET path` answers with `expect_status`.
    Http { path: String, expect_status: u16 },
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
        Ok(())
    }
}

fn parse_addr(field: &str, text: &str) -> Result<IpAddr, ConfigError> {
    let addr: IpAddr = text
        .parse()
        .or_else(|_| err(field, format!("{text:?} is not an IP address")))?;
    if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() {
        return err(field, format!("{addr} cannot be used here"));
    }
    if let IpAddr::V4(v4) = addr {
        if v4.is_broadcast() {
            return err(field, format!("{addr} cannot be used here"));
        }
    }
    Ok(addr)
}

fn check_interfaces(field: &str, names: &[String]) -> Result<(), ConfigError> {
    if names.is_empty() {
        return err(field, "at least one interface is needed");
    }
    let mut seen = HashSet::new();
    for (i, name) in names.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            return err(f, format!("{name:?} is not a valid interface name"));
        }
        if !seen.insert(name) {
            return err(f, format!("{name:?} is listed twice"));
        }
    }
    Ok(())
}

/// `value` (or `default` when absent) if it lies in `lo..=hi`.
fn in_range<T: TryFrom<i64>>(
    field: &str,
    value: Option<i64>,
    default: i64,
    lo: i64,
    hi: i64,
) -> Result<T, ConfigError> {
    let v = value.unwrap_or(default);
    if v < lo || v > hi {
        return err(field, format!("{v} is out of range {lo}..={hi}"));
    }
    T::try_from(v).or_else(|_| err(field, format!("{v} is out of range")))
}

impl RawConfig {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let socket = PathBuf::from(self.socket.unwrap_or_else(|| DEFAULT_SOCKET.into()));
        if !socket.is_absolute() {
            return err("socket", "must be an absolute path");
        }
        if self.datapath.is_none() && !self.vips.is_empty() {
            return err("vips", "VIPs need a [datapath] section");
        }
        if self.datapath.is_none() && self.encap.is_some() {
            return err("encap", "[encap] needs a [datapath] section");
        }
        if self.datapath.is_none() && self.lifecycle.is_some() {
            return err("lifecycle", "[lifecycle] needs a [datapath] section");
        }
        if self.datapath.is_none() && self.visibility.is_some() {
            return err("visibility", "[visibility] needs a [datapath] section");
        }
        let balancer = match self.datapath {
            Some(dp) => {
                let mut b = validate_balancer(dp, self.encap, self.vips)?;
                if let Some(v) = self.visibility {
                    b.visibility = validate_visibility(v)?;
                }
                if let Some(path) = self.lifecycle.and_then(|l| l.state_file) {
                    b.state_file = PathBuf::from(&path);
                    if !b.state_file.is_absolute() || b.state_file.file_name().is_none() {
                        return err(
                            "lifecycle.state_file",
                            format!("{path:?} is not an absolute file path"),
                        );
                    }
                }
                Some(b)
            }
            None => None,
        };
        let metrics = match self.metrics {
            Some(m) => Some(m.listen.parse::<std::net::SocketAddr>().or_else(|_| {
                err(
                    "metrics.listen",
                    format!("{:?} is not an address:port", m.listen),
                )
            })?),
            None => None,
        };
        let decap = self.decap.map(validate_decap).transpose()?;
        if balancer.is_none() && decap.is_none() {
            return err(
                "config",
                "nothing to run: give a [datapath] section with [[vips]], or a [decap] section",
            );
        }
        if let (Some(b), Some(d)) = (&balancer, &decap) {
            for (i, name) in d.interfaces.iter().enumerate() {
                if b.datapath.interfaces.contains(name) {
                    return err(
                        format!("decap.interfaces[{i}]"),
                        format!("{name:?} already runs the balancer"),
                    );
                }
            }
        }
        Ok(Config {
            socket,
            balancer,
            decap,
            metrics,
        })
    }
}

fn validate_balancer(
    dp: RawDatapath,
    encap: Option<RawEncap>,
    raw_vips: Vec<RawVip>,
) -> Result<BalancerConfig, ConfigError> {
    check_interfaces("datapath.interfaces", &dp.interfaces)?;
    let xdp_mode = match dp.xdp_mode.as_deref() {
        None => XdpModeSetting::Native,
        Some(s) => s.parse().or_else(|e| err("datapath.xdp_mode", e))?,
    };
    let maglev_table_size: u32 = in_range(
        "datapath.maglev_table_size",
        dp.maglev_table_size,
        lb_common::DEFAULT_MAGLEV_SIZE.into(),
        7,
        16_777_259,
    )?;
    if !is_prime(maglev_table_size) {
        return err(
            "datapath.maglev_table_size",
            format!("{maglev_table_size} is not prime (65537 is the usual choice)"),
        );
    }
    let max_vips: u32 = in_range("datapath.max_vips", dp.max_vips, 64, 1, 65_536)?;
    let ring_entries = 2 * u64::from(max_vips) * u64::from(maglev_table_size);
    if ring_entries > MAX_RING_ENTRIES {
        return err(
            "datapath.max_vips",
            format!(
                "2 x max_vips x maglev_table_size = {ring_entries} Maglev slots, more than the {MAX_RING_ENTRIES} allowed; lower one of them"
            ),
        );
    }
    let max_backends: u32 = in_range("datapath.max_backends", dp.max_backends, 4096, 1, 1 << 20)?;
    let flow_table_size: u32 = in_range(
        "datapath.flow_table_size",
        dp.flow_table_size,
        1_000_000,
        1,
        100_000_000,
    )?;
    let next_hop_refresh_ms: u64 = in_range(
        "datapath.next_hop_refresh_ms",
        dp.next_hop_refresh_ms,
        1000,
        100,
        3_600_000,
    )?;

    let encap = match encap {
        None => EncapConfig::default(),
        Some(e) => EncapConfig {
            source_v4: e
                .source_v4
                .map(|s| {
                    s.parse::<Ipv4Net>()
                        .or_else(|_| err("encap.source_v4", format!("{s:?} is not an IPv4 prefix")))
                })
                .transpose()?,
            source_v6: e
                .source_v6
                .map(|s| {
                    s.parse::<Ipv6Net>()
                        .or_else(|_| err("encap.source_v6", format!("{s:?} is not an IPv6 prefix")))
                })
                .transpose()?,
        },
    };

    if raw_vips.len() > max_vips as usize {
        return err(
            "vips",
            format!(
                "{} VIPs, more than datapath.max_vips = {max_vips}",
                raw_vips.len()
            ),
        );
    }
    let mut vips = Vec::with_capacity(raw_vips.len());
    let mut keys = HashSet::new();
    let mut names = HashSet::new();
    let mut all_backends = BTreeSet::new();
    for (i, rv) in raw_vips.into_iter().enumerate() {
        let f = format!("vips[{i}]");
        let address = parse_addr(&format!("{f}.address"), &rv.address)?;
        let port: u16 = in_range(&format!("{f}.port"), rv.port, 0, 0, 65_535)?;
        let protocol = match rv.protocol.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return err(
                    format!("{f}.protocol"),
                    format!("{other:?} is not a protocol; expected \"tcp\" or \"udp\""),
                )
            }
        };
        if !keys.insert((address, port, protocol)) {
            return err(
                f,
                format!("{address} port {port} {protocol} is defined twice"),
            );
        }
        let name = rv
            .name
            .unwrap_or_else(|| format!("{protocol}/{}", socket_text(address, port)));
        if name.is_empty() || name.len() > 64 || name.contains(char::is_whitespace) {
            return err(
                format!("{f}.name"),
                "must be 1 to 64 characters without spaces",
            );
        }
        if !names.insert(name.clone()) {
            return err(format!("{f}.name"), format!("{name:?} is used by two VIPs"));
        }
        if rv.backends.is_empty() {
            return err(format!("{f}.backends"), "a VIP needs at least one backend");
        }
        if rv.backends.len() > maglev_table_size as usize {
            return err(
                format!("{f}.backends"),
                "more backends than datapath.maglev_table_size slots",
            );
        }
        let mut backends = Vec::with_capacity(rv.backends.len());
        let mut seen = HashSet::new();
        for (j, rb) in rv.backends.into_iter().enumerate() {
            let bf = format!("{f}.backends[{j}]");
            let address = parse_addr(&format!("{bf}.address"), &rb.address)?;
            if !seen.insert(address) {
                return err(
                    format!("{bf}.address"),
                    format!("{address} is listed twice"),
                );
            }
            let weight: u32 = in_range(&format!("{bf}.weight"), rb.weight, 100, 0, 65_535)?;
            match address {
                IpAddr::V4(_) if encap.source_v4.is_none() => {
                    return err(
                        format!("{bf}.address"),
                        "an IPv4 backend needs encap.source_v4",
                    )
                }
                IpAddr::V6(_) if encap.source_v6.is_none() => {
                    return err(
                        format!("{bf}.address"),
                        "an IPv6 backend needs encap.source_v6",
                    )
                }
                _ => {}
            }
            let max_flows = match rb.max_flows {
                Some(n) => Some(in_range(
                    &format!("{bf}.max_flows"),
                    Some(n),
                    0,
                    1,
                    i64::from(u32::MAX),
                )?),
                None => None,
            };
            all_backends.insert(address);
            backends.push(BackendConfig {
                address,
                weight,
                max_flows,
            });
        }
        let health = match rv.health {
            Some(h) => Some(validate_health(&format!("{f}.health"), h, port)?),
            None => None,
        };
        let feedback = match rv.feedback {
            Some(fb) => Some(validate_feedback(&format!("{f}.feedback"), fb)?),
            None => None,
        };
        let maintenance = match rv.maintenance {
            Some(m) => validate_maintenance(&format!("{f}.maintenance"), m)?,
            None => Maintenance::default(),
        };
        vips.push(VipConfig {
            name,
            address,
            port,
            protocol,
            backends,
            health,
            feedback,
            maintenance,
        });
    }
    if all_backends.len() > max_backends as usize {
        return err(
            "vips",
            format!(
                "{} distinct backends, more than datapath.max_backends = {max_backends}",
                all_backends.len()
            ),
        );
    }
    Ok(BalancerConfig {
        datapath: DatapathConfig {
            interfaces: dp.interfaces,
            xdp_mode,
            maglev_table_size,
            max_vips,
            max_backends,
            flow_table_size,
            next_hop_refresh_ms,
        },
        encap,
        vips,
        visibility: VisibilityConfig::default(),
        state_file: PathBuf::from(DEFAULT_STATE_FILE),
    })
}

fn validate_maintenance(f: &str, m: RawMaintenance) -> Result<Maintenance, ConfigError> {
    let d = Maintenance::default();
    let fraction = |field: &str, v: Option<f64>, default: f64, lo: f64, hi: f64| {
        let v = v.unwrap_or(default);
        if !(v.is_finite() && v >= lo && v <= hi) {
            return err(
                format!("{f}.{field}"),
                format!("{v} is out of range {lo}..={hi}"),
            );
        }
        Ok(v)
    };
    let hook = match m.hook {
        Some(argv) => {
            if argv.is_empty() || argv[0].is_empty() {
                return err(
                    format!("{f}.hook"),
                    "give the program and its arguments, as [\"/path/to/program\", \"arg\"]",
                );
            }
            if !argv[0].starts_with('/') {
                return err(
                    format!("{f}.hook"),
                    format!("{:?} must be an absolute path", argv[0]),
                );
            }
            Some(argv)
        }
        None => None,
    };
    Ok(Maintenance {
        load_limit: fraction("load_limit", m.load_limit, d.load_limit, 0.01, 1.0)?,
        min_spare: fraction("min_spare", m.min_spare, d.min_spare, 0.0, 0.99)?,
        max_parallel: in_range(
            &format!("{f}.max_parallel"),
            m.max_parallel,
            d.max_parallel.into(),
            1,
            1000,
        )?,
        drain_timeout_s: in_range(
            &format!("{f}.drain_timeout_s"),
            m.drain_timeout_s,
            d.drain_timeout_s as i64,
            1,
            7 * 86_400,
        )?,
        hook,
        hook_timeout_s: in_range(
            &format!("{f}.hook_timeout_s"),
            m.hook_timeout_s,
            d.hook_timeout_s as i64,
            1,
            86_400,
        )?,
        prefer_up_to_date: fraction(
            "prefer_up_to_date",
            m.prefer_up_to_date,
            d.prefer_up_to_date,
            0.05,
            1.0,
        )?,
    })
}

fn validate_health(f: &str, h: RawHealth, vip_port: u16) -> Result<HealthCheck, ConfigError> {
    let d = HealthCheck::default();
    let kind = match h.kind.as_str() {
        "tcp" => {
            if h.path.is_some() || h.expect_status.is_some() {
                return err(
                    format!("{f}.path"),
                    "path and expect_status are for kind = \"http\"",
                );
            }
            HealthKind::Tcp
        }
        "http" => {
            let path = h.path.unwrap_or_else(|| "/".into());
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                return err(
                    format!("{f}.path"),
                    format!("{path:?} is not an absolute path without spaces"),
                );
            }
            HealthKind::Http {
                path,
                expect_status: in_range(
                    &format!("{f}.expect_status"),
                    h.expect_status,
                    200,
                    100,
                    599,
                )?,
            }
        }
        other => {
            return err(
                format!("{f}.kind"),
                format!("{other:?} is not a check; expected \"tcp\" or \"http\""),
            )
        }
    };
    let port: u16 = in_range(&format!("{f}.port"), h.port, vip_port.into(), 0, 65_535)?;
    if port == 0 {
        return err(
            format!("{f}.port"),
            "an every-port VIP needs an explicit health check port",
        );
    }
    let interval_ms: u64 = in_range(
        &format!("{f}.interval_ms"),
        h.interval_ms,
        d.interval_ms as i64,
        100,
        3_600_000,
    )?;
    let timeout_ms: u64 = in_range(
        &format!("{f}.timeout_ms"),
        h.timeout_ms,
        d.timeout_ms as i64,
        10,
        60_000,
    )?;
    if timeout_ms > interval_ms {
        return err(format!("{f}.timeout_ms"), "must not exceed interval_ms");
    }
    Ok(HealthCheck {
        kind,
        port,
        interval_ms,
        timeout_ms,
        rise: in_range(&format!("{f}.rise"), h.rise, d.rise.into(), 1, 100)?,
        fall: in_range(&format!("{f}.fall"), h.fall, d.fall.into(), 1, 100)?,
    })
}

fn validate_feedback(f: &str, fb: RawFeedback) -> Result<Feedback, ConfigError> {
    let port: u16 = in_range(&format!("{f}.port"), Some(fb.port), 0, 1, 65_535)?;
    let path = fb.path.unwrap_or_else(|| "/load".into());
    if !path.starts_with('/') || path.contains(char::is_whitespace) {
        return err(
            format!("{f}.path"),
            format!("{path:?} is not an absolute path without spaces"),
        );
    }
    let interval_ms: u64 = in_range(
        &format!("{f}.interval_ms"),
        fb.interval_ms,
        1000,
        100,
        3_600_000,
    )?;
    let timeout_ms: u64 = in_range(&format!("{f}.timeout_ms"), fb.timeout_ms, 500, 10, 60_000)?;
    if timeout_ms > interval_ms {
        return err(format!("{f}.timeout_ms"), "must not exceed interval_ms");
    }
    let fraction =
        |field: &str, v: Option<f64>, default: f64, lo: f64| -> Result<f64, ConfigError> {
            let v = v.unwrap_or(default);
            if !(v.is_finite() && v >= lo && v <= 1.0) {
                return err(
                    format!("{f}.{field}"),
                    format!("{v} is out of range {lo}..=1"),
                );
            }
            Ok(v)
        };
    Ok(Feedback {
        port,
        path,
        interval_ms,
        timeout_ms,
        smoothing: fraction("smoothing", fb.smoothing, 0.5, 0.01)?,
        min_change: fraction("min_change", fb.min_change, 0.1, 0.0)?,
    })
}

fn validate_visibility(v: RawVisibility) -> Result<VisibilityConfig, ConfigError> {
    let d = VisibilityConfig::default();
    let secs = |field: &str, value: Option<i64>, default: u64| -> Result<u64, ConfigError> {
        in_range(
            &format!("visibility.{field}"),
            value,
            default as i64,
            1,
            86_400,
        )
    };
    Ok(VisibilityConfig {
        trace_flows: v.trace_flows.unwrap_or(d.trace_flows),
        event_sample: in_range(
            "visibility.event_sample",
            v.event_sample,
            d.event_sample.into(),
            0,
            1 << 20,
        )?,
        collect_interval_ms: in_range(
            "visibility.collect_interval_ms",
            v.collect_interval_ms,
            d.collect_interval_ms as i64,
            100,
            3_600_000,
        )?,
        tcp_idle_timeout_s: secs(
            "tcp_idle_timeout_s",
            v.tcp_idle_timeout_s,
            d.tcp_idle_timeout_s,
        )?,
        udp_idle_timeout_s: secs(
            "udp_idle_timeout_s",
            v.udp_idle_timeout_s,
            d.udp_idle_timeout_s,
        )?,
        closed_timeout_s: secs("closed_timeout_s", v.closed_timeout_s, d.closed_timeout_s)?,
        half_open_timeout_s: secs(
            "half_open_timeout_s",
            v.half_open_timeout_s,
            d.half_open_timeout_s,
        )?,
    })
}

fn validate_decap(d: RawDecap) -> Result<DecapConfig, ConfigError> {
    check_interfaces("decap.interfaces", &d.interfaces)?;
    let xdp_mode = match d.xdp_mode.as_deref() {
        None => XdpModeSetting::Native,
        Some(s) => s.parse().or_else(|e| err("decap.xdp_mode", e))?,
    };
    if d.addresses.is_empty() {
        return err(
            "decap.addresses",
            "at least one address of this host is needed",
        );
    }
    let mut addresses = Vec::new();
    for (i, a) in d.addresses.iter().enumerate() {
        let addr = parse_addr(&format!("decap.addresses[{i}]"), a)?;
        if addresses.contains(&addr) {
            return err(
                format!("decap.addresses[{i}]"),
                format!("{addr} is listed twice"),
            );
        }
        addresses.push(addr);
    }
    Ok(DecapConfig {
        interfaces: d.interfaces,
        addresses,
        xdp_mode,
    })
}

/// `198.18.0.1:80` or `[fd00::1]:80`.
pub fn socket_text(addr: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
socket = "/run/lb-test/lb.sock"
[datapath]
interfaces = ["eth0"]
xdp_mode = "native"
maglev_table_size = 65537
[encap]
source_v4 = "198.18.200.0/24"
source_v6 = "fd00:200::/96"
[[vips]]
name = "web"
address = "198.18.10.1"
port = 80
protocol = "tcp"
backends = [ { address = "198.18.0.11", weight = 100 }, { address = "fd00::12", weight = 50 } ]
[[vips]]
address = "fd00:10::1"
protocol = "udp"
backends = [ { address = "fd00::12" } ]
"#;

    fn with(replace: &str, by: &str) -> Result<Config, ConfigError> {
        assert!(GOOD.contains(replace), "fixture lacks {replace:?}");
        Config::from_toml(&GOOD.replacen(replace, by, 1))
    }

    fn field_of(replace: &str, by: &str) -> String {
        match with(replace, by) {
            Ok(_) => panic!("{replace:?} -> {by:?} was accepted"),
            Err(e) => {
                assert!(!e.message.is_empty());
                e.field
            }
        }
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::from_toml(GOOD).unwrap();
        let b = c.balancer.unwrap();
        assert_eq!(b.vips.len(), 2);
        assert_eq!(b.vips[1].name, "udp/[fd00:10::1]:0");
        assert_eq!(b.vips[1].port, 0);
        assert_eq!(b.vips[1].backends[0].weight, 100);
        assert_eq!(b.datapath.max_vips, 64);
        assert_eq!(b.datapath.flow_table_size, 1_000_000);
        assert!(c.decap.is_none());
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "socket = \"/run/lb-test/lb.sock\"",
                "socket = \"relative.sock\"",
                "socket",
            ),
            (
                "interfaces = [\"eth0\"]",
                "interfaces = []",
                "datapath.interfaces",
            ),
            (
                "interfaces = [\"eth0\"]",
                "interfaces = [\"eth0\", \"eth0\"]",
                "datapath.interfaces[1]",
            ),
            (
                "interfaces = [\"eth0\"]",
                "interfaces = [\"a-very-long-interface-name\"]",
                "datapath.interfaces[0]",
            ),
            (
                "xdp_mode = \"native\"",
                "xdp_mode = \"turbo\"",
                "datapath.xdp_mode",
            ),
            (
                "maglev_table_size = 65537",
                "maglev_table_size = 65536",
                "datapath.maglev_table_size",
            ),
            (
                "maglev_table_size = 65537",
                "maglev_table_size = 5",
                "datapath.maglev_table_size",
            ),
            (
                "maglev_table_size = 65537",
                "maglev_table_size = 65537\nmax_vips = 0",
                "datapath.max_vips",
            ),
            (
                "maglev_table_size = 65537",
                "maglev_table_size = 65537\nmax_vips = 4096",
                "datapath.max_vips",
            ),
            (
                "maglev_table_size = 65537",
                "maglev_table_size = 65537\nmax_vips = 1",
                "vips",
            ),
            (
                "maglev_table_size = 65537",
                "maglev_table_size = 65537\nmax_backends = 1",
                "vips",
            ),
            (
                "maglev_table_size = 65537",
                "maglev_table_size = 65537\nflow_table_size = 0",
                "datapath.flow_table_size",
            ),
            (
                "maglev_table_size = 65537",
                "maglev_table_size = 65537\nnext_hop_refresh_ms = 1",
                "datapath.next_hop_refresh_ms",
            ),
            (
                "source_v4 = \"198.18.200.0/24\"",
                "source_v4 = \"198.18.200.0/33\"",
                "encap.source_v4",
            ),
            (
                "source_v6 = \"fd00:200::/96\"",
                "source_v6 = \"nope\"",
                "encap.source_v6",
            ),
            (
                "source_v6 = \"fd00:200::/96\"",
                "",
                "vips[0].backends[1].address",
            ),
            (
                "source_v4 = \"198.18.200.0/24\"",
                "",
                "vips[0].backends[0].address",
            ),
            (
                "address = \"198.18.10.1\"",
                "address = \"198.18.10\"",
                "vips[0].address",
            ),
            (
                "address = \"198.18.10.1\"",
                "address = \"0.0.0.0\"",
                "vips[0].address",
            ),
            (
                "address = \"198.18.10.1\"",
                "address = \"224.0.0.1\"",
                "vips[0].address",
            ),
            (
                "protocol = \"tcp\"",
                "protocol = \"sctp\"",
                "vips[0].protocol",
            ),
            ("name = \"web\"", "name = \"two words\"", "vips[0].name"),
            (
                "name = \"web\"",
                "name = \"udp/[fd00:10::1]:0\"",
                "vips[1].name",
            ),
            (
                "{ address = \"198.18.0.11\", weight = 100 }",
                "{ address = \"198.18.0.11\", weight = 70000 }",
                "vips[0].backends[0].weight",
            ),
            (
                "{ address = \"198.18.0.11\", weight = 100 }",
                "{ address = \"fd00::12\", weight = 1 }",
                "vips[0].backends[1].address",
            ),
            (
                "{ address = \"198.18.0.11\", weight = 100 }",
                "{ address = \"127.0.0.1\" }",
                "vips[0].backends[0].address",
            ),
            (
                "backends = [ { address = \"fd00::12\" } ]",
                "backends = []",
                "vips[1].backends",
            ),
            (
                "address = \"fd00:10::1\"\nprotocol = \"udp\"",
                "address = \"198.18.10.1\"\nport = 80\nprotocol = \"tcp\"",
                "vips[1]",
            ),
            ("port = 80", "port = 80\ncolour = \"red\"", "config"),
            (
                "[encap]",
                "[visibility]\nevent_sample = -2\n[encap]",
                "visibility.event_sample",
            ),
            (
                "[encap]",
                "[visibility]\ntcp_idle_timeout_s = 0\n[encap]",
                "visibility.tcp_idle_timeout_s",
            ),
            (
                "[encap]",
                "[visibility]\ncollect_interval_ms = 5\n[encap]",
                "visibility.collect_interval_ms",
            ),
            (
                "[encap]",
                "[metrics]\nlisten = \"localhost\"\n[encap]",
                "metrics.listen",
            ),
            ("port = 80", "port = 70000", "vips[0].port"),
            ("port = 80", "port = -1", "vips[0].port"),
            (
                "{ address = \"198.18.0.11\", weight = 100 }",
                "{ address = \"198.18.0.11\", weight = -1 }",
                "vips[0].backends[0].weight",
            ),
            ("port = 80", "port = \"eighty\"", "config"),
            (
                "port = 80",
                "port = 80\nhealth = { kind = \"icmp\" }",
                "vips[0].health.kind",
            ),
            (
                "port = 80",
                "port = 80\nhealth = { kind = \"http\", path = \"x\" }",
                "vips[0].health.path",
            ),
            (
                "port = 80",
                "port = 80\nhealth = { kind = \"tcp\", path = \"/\" }",
                "vips[0].health.path",
            ),
            (
                "port = 80",
                "port = 80\nhealth = { kind = \"http\", expect_status = 99 }",
                "vips[0].health.expect_status",
            ),
            (
                "port = 80",
                "port = 80\nhealth = { kind = \"tcp\", interval_ms = 100, timeout_ms = 200 }",
                "vips[0].health.timeout_ms",
            ),
            (
                "port = 80",
                "port = 80\nhealth = { kind = \"tcp\", fall = 0 }",
                "vips[0].health.fall",
            ),
            (
                "protocol = \"udp\"",
                "protocol = \"udp\"\nhealth = { kind = \"tcp\" }",
                "vips[1].health.port",
            ),
            (
                "port = 80",
                "port = 80\nfeedback = { port = 0 }",
                "vips[0].feedback.port",
            ),
            (
                "port = 80",
                "port = 80\nfeedback = { port = 8081, smoothing = 0 }",
                "vips[0].feedback.smoothing",
            ),
            (
                "port = 80",
                "port = 80\nfeedback = { port = 8081, min_change = 2 }",
                "vips[0].feedback.min_change",
            ),
            (
                "port = 80",
                "port = 80\nfeedback = { port = 8081, path = \"load\" }",
                "vips[0].feedback.path",
            ),
            (
                "port = 80",
                "port = 80\nfeedback = { port = 8081, interval_ms = 100, timeout_ms = 200 }",
                "vips[0].feedback.timeout_ms",
            ),
            (
                "port = 80",
                "port = 80\nmaintenance = { load_limit = 0 }",
                "vips[0].maintenance.load_limit",
            ),
            (
                "port = 80",
                "port = 80\nmaintenance = { load_limit = 1.5 }",
                "vips[0].maintenance.load_limit",
            ),
            (
                "port = 80",
                "port = 80\nmaintenance = { min_spare = 1 }",
                "vips[0].maintenance.min_spare",
            ),
            (
                "port = 80",
                "port = 80\nmaintenance = { max_parallel = 0 }",
                "vips[0].maintenance.max_parallel",
            ),
            (
                "port = 80",
                "port = 80\nmaintenance = { drain_timeout_s = 0 }",
                "vips[0].maintenance.drain_timeout_s",
            ),
            (
                "port = 80",
                "port = 80\nmaintenance = { hook = [] }",
                "vips[0].maintenance.hook",
            ),
            (
                "port = 80",
                "port = 80\nmaintenance = { hook = [\"upgrade.sh\"] }",
                "vips[0].maintenance.hook",
            ),
            (
                "port = 80",
                "port = 80\nmaintenance = { hook_timeout_s = -1 }",
                "vips[0].maintenance.hook_timeout_s",
            ),
            (
                "port = 80",
                "port = 80\nmaintenance = { prefer_up_to_date = 0 }",
                "vips[0].maintenance.prefer_up_to_date",
            ),
            (
                "weight = 100 }",
                "weight = 100, max_flows = 0 }",
                "vips[0].backends[0].max_flows",
            ),
            (
                "[encap]",
                "[lifecycle]\nstate_file = \"relative.json\"\n[encap]",
                "lifecycle.state_file",
            ),
        ];
        for (replace, by, field) in cases {
            assert_eq!(&field_of(replace, by), field, "case {by:?}");
        }
    }

    #[test]
    fn structural_errors() {
        let e = Config::from_toml("").unwrap_err();
        assert_eq!(e.field, "config");
        let e =
            Config::from_toml("[[vips]]\naddress=\"198.18.10.1\"\nprotocol=\"tcp\"\nbackends=[]")
                .unwrap_err();
        assert_eq!(e.field, "vips");
        let e = Config::from_toml("this is not toml").unwrap_err();
        assert_eq!(e.field, "config");
        let e = Config::from_toml("[decap]\ninterfaces=[\"eth0\"]\naddresses=[]").unwrap_err();
        assert_eq!(e.field, "decap.addresses");
        let e = Config::from_toml("[decap]\ninterfaces=[\"eth0\"]\naddresses=[\"x\"]").unwrap_err();
        assert_eq!(e.field, "decap.addresses[0]");
        let both = format!("{GOOD}\n[decap]\ninterfaces=[\"eth0\"]\naddresses=[\"198.18.0.2\"]");
        assert_eq!(
            Config::from_toml(&both).unwrap_err().field,
            "decap.interfaces[0]"
        );
    }

    #[test]
    fn shipped_examples_are_valid() {
        let lb = Config::from_toml(include_str!("../../../examples/lb.toml")).unwrap();
        assert_eq!(lb.balancer.unwrap().vips.len(), 2);
        let backend = Config::from_toml(include_str!("../../../examples/backend.toml")).unwrap();
        assert!(backend.decap.is_some());
    }

    #[test]
    fn decap_only_config() {
        let c = Config::from_toml(
            "[decap]\ninterfaces=[\"veth0\"]\naddresses=[\"198.18.0.11\", \"fd00::11\"]\nxdp_mode=\"generic\"",
        )
        .unwrap();
        let d = c.decap.unwrap();
        assert_eq!(d.addresses.len(), 2);
        assert_eq!(d.xdp_mode, XdpModeSetting::Generic);
        assert!(c.balancer.is_none());
    }

    #[test]
    fn reload_may_change_vips_but_not_sizes() {
        let old = Config::from_toml(GOOD).unwrap();
        let weights = with("weight = 50", "weight = 10").unwrap();
        old.check_reload(&weights).unwrap();
        let resized = with("maglev_table_size = 65537", "maglev_table_size = 257").unwrap();
        assert_eq!(old.check_reload(&resized).unwrap_err().field, "datapath");
        let moved = with("/run/lb-test/lb.sock", "/run/other.sock").unwrap();
        assert_eq!(old.check_reload(&moved).unwrap_err().field, "socket");
    }
}
