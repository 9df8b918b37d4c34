//! The configuration file as written: serde structs that mirror the TOML,
//! with numbers read as `i64` so `validate` can range-check them and name the
//! offending field.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub instance: Option<String>,
    pub socket: Option<String>,
    pub datapath: Option<RawDatapath>,
    pub encap: Option<RawEncap>,
    #[serde(default)]
    pub vips: Vec<RawVip>,
    pub decap: Option<RawDecap>,
    pub visibility: Option<RawVisibility>,
    pub metrics: Option<RawMetrics>,
    pub lifecycle: Option<RawLifecycle>,
    pub fleet: Option<RawFleet>,
    pub announce: Option<RawAnnounce>,
    pub host: Option<RawHost>,
    pub bypass: Option<super::bypass::RawBypassSection>,
}

/// `[announce]`: the kernel table BIRD learns the VIP routes from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAnnounce {
    pub table: Option<i64>,
    pub refresh_ms: Option<i64>,
}

/// `[host]`: this agent runs source-side balancers for its guests when the
/// fleet store installs one (see `config::host`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    pub socket: Option<String>,
    pub xdp_mode: Option<String>,
    pub encap_source_v4: Option<String>,
    pub encap_source_v6: Option<String>,
    pub maglev_table_size: Option<i64>,
    pub flow_table_size: Option<i64>,
    pub state_file: Option<String>,
    pub bypass_listen: Option<String>,
}

/// `[fleet]`: the etcd store this agent registers with (and, for a
/// balancer, takes its VIPs from).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub node: Option<String>,
    pub prefix: Option<String>,
    pub lease_ttl_s: Option<i64>,
}

/// The VIP document of a fleet (`PREFIX/vips` in etcd): the `[[vips]]` of a
/// configuration file and nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVipDocument {
    #[serde(default)]
    pub vips: Vec<RawVip>,
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
    pub maglev_slots: Option<i64>,
    pub max_vips: Option<i64>,
    pub max_backends: Option<i64>,
    pub flow_table_size: Option<i64>,
    pub next_hop_refresh_ms: Option<i64>,
    pub icmp_too_big_rate: Option<i64>,
    pub icmp_too_big_burst: Option<i64>,
    pub clamp_mss: Option<bool>,
    pub second_chance: Option<bool>,
    pub bypass_source: Option<bool>,
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
    pub bypass: Option<super::RawBypass>,
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
    pub tls_server_name: Option<String>,
    pub tls_ca_file: Option<String>,
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
