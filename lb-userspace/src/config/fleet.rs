//! The `[fleet]` section (where the etcd store is and how to reach it) and
//! the fleet's VIP document, validated with the same rules as `[[vips]]`.

use std::path::PathBuf;

use ipnet::{Ipv4Net, Ipv6Net};

use super::{
    err, validate, BalancerConfig, ConfigError, EncapConfig, RawFleet, RawVipDocument, VipConfig,
};

/// The key prefix when the section names none.
pub const DEFAULT_FLEET_PREFIX: &str = "/lb";

/// How the agent (or `lbctl`) reaches the fleet's etcd store. TLS is not
/// optional: the store decides what every balancer forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// `https://host:port` URLs.
    pub endpoints: Vec<String>,
    /// PEM files: the CA that signed etcd's server certificate, and this
    /// client's certificate and key.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// This agent's name in the fleet (default: the host name).
    pub node: String,
    /// Every key lives under it, e.g. `/lb/nodes/NODE`; no trailing `/`.
    pub prefix: String,
    /// Registrations and status reports vanish this long after the agent
    /// stops renewing them.
    pub lease_ttl_s: u64,
}

impl FleetConfig {
    /// The `[fleet]` section of a TOML file, ignoring every other section, so
    /// that `lbctl --fleet` takes an agent's configuration file or a file
    /// with only this section.
    pub fn from_toml_section(text: &str) -> Result<FleetConfig, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError {
            field: "config".into(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        let Some(section) = table.remove("fleet") else {
            return err("fleet", "the file has no [fleet] section");
        };
        let raw: RawFleet = section
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError {
                field: "fleet".into(),
                message: e.to_string().trim().replace('\n', " "),
            })?;
        validate_fleet(raw)
    }
}

/// A fleet name (node, service): letters, digits, `-`, `_` and `.`, since it
/// becomes the last part of a key.
pub fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 64 || !name.chars().all(allowed) || name.starts_with('.') {
        return err(
            field,
            format!("{name:?}: 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'"),
        );
    }
    Ok(())
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // what fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn validate_endpoint(field: &str, text: &str) -> Result<String, ConfigError> {
    if text.starts_with("http://") {
        return err(
            field,
            format!("{text:?}: the store is reached over TLS only (https://)"),
        );
    }
    let rest = text.strip_prefix("https://").unwrap_or(text);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let Some((host, port)) = rest.rsplit_once(':') else {
        return err(
            field,
            format!("{text:?} is not host:port or https://host:port"),
        );
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = !host.is_empty() && !host.contains(['/', ' ', '@']);
    if !port_ok || !host_ok {
        return err(
            field,
            format!("{text:?} is not host:port or https://host:port"),
        );
    }
    Ok(format!("https://{host}:{port}"))
}

fn required_path(field: &str, value: Option<String>) -> Result<PathBuf, ConfigError> {
    let Some(text) = value else {
        return err(
            field,
            "required: the store is reached over TLS with client certificates",
        );
    };
    let path = PathBuf::from(&text);
    if text.is_empty() || path.file_name().is_none() {
        return err(field, format!("{text:?} is not a file path"));
    }
    Ok(path)
}

pub(super) fn validate_fleet(f: RawFleet) -> Result<FleetConfig, ConfigError> {
    if f.endpoints.is_empty() {
        return err("fleet.endpoints", "at least one etcd endpoint is needed");
    }
    let endpoints = f
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| validate_endpoint(&format!("fleet.endpoints[{i}]"), e))
        .collect::<Result<Vec<_>, _>>()?;
    let ca = required_path("fleet.ca", f.ca)?;
    let cert = required_path("fleet.cert", f.cert)?;
    let key = required_path("fleet.key", f.key)?;
    let node = f.node.unwrap_or_else(host_name);
    check_name("fleet.node", &node)?;
    let prefix = f.prefix.unwrap_or_else(|| DEFAULT_FLEET_PREFIX.into());
    let prefix_ok = prefix.starts_with('/')
        && prefix.len() > 1
        && !prefix.ends_with('/')
        && !prefix.contains("//")
        && !prefix.contains(char::is_whitespace);
    if !prefix_ok {
        return err(
            "fleet.prefix",
            format!("{prefix:?}: a key prefix such as \"/lb\" (leading '/', none trailing)"),
        );
    }
    let lease_ttl_s = validate::in_range("fleet.lease_ttl_s", f.lease_ttl_s, 10, 2, 3600)?;
    Ok(FleetConfig {
        endpoints,
        ca,
        cert,
        key,
        node,
        prefix,
        lease_ttl_s,
    })
}

impl RawVipDocument {
    /// Parses a VIP document: TOML with `[[vips]]` tables, as in a
    /// configuration file.
    pub fn from_toml(text: &str) -> Result<RawVipDocument, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError {
            field: "vips document".into(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }

    /// The VIPs as balancer `b` would take them: its table sizes and
    /// encapsulation prefixes apply.
    pub fn validate_for(self, b: &BalancerConfig) -> Result<Vec<VipConfig>, ConfigError> {
        validate::validate_vips(self.vips, &b.datapath, &b.encap)
    }

    /// Every rule that does not depend on a balancer's own settings (`lbctl`
    /// checks a document before it writes it; each balancer checks it again
    /// against its table sizes and encapsulation prefixes).
    pub fn validate_alone(self) -> Result<Vec<VipConfig>, ConfigError> {
        let mut datapath = validate::validate_datapath(super::RawDatapath {
            interfaces: vec!["any".into()],
            xdp_mode: None,
            maglev_table_size: None,
            maglev_slots: None,
            max_vips: None,
            max_backends: None,
            flow_table_size: None,
            next_hop_refresh_ms: None,
            icmp_too_big_rate: None,
            icmp_too_big_burst: None,
            clamp_mss: None,
            second_chance: None,
            bypass_source: None,
        })?;
        datapath.max_vips = u32::MAX;
        datapath.max_backends = u32::MAX;
        datapath.maglev_table_size = u32::MAX;
        datapath.maglev_slots = u64::MAX;
        let any_v4: Ipv4Net = "0.0.0.0/0".parse().expect("a prefix");
        let any_v6: Ipv6Net = "::/0".parse().expect("a prefix");
        let encap = EncapConfig {
            source_v4: Some(any_v4),
            source_v6: Some(any_v6),
        };
        validate::validate_vips(self.vips, &datapath, &encap)
    }
}
