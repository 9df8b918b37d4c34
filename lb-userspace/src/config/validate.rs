//! Validation of the file as written (`RawConfig::validate`) into the
//! validated `Config`, section by section, each failure naming its field.

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
    path::PathBuf,
};

use ipnet::{Ipv4Net, Ipv6Net};

use super::{
    announce::validate_announce, err, socket_text, BackendConfig, BalancerConfig, Config,
    ConfigError, DatapathConfig, DecapConfig, EncapConfig, Feedback, HealthCheck, HealthKind,
    Maintenance, Protocol, RawBackend, RawConfig, RawDatapath, RawDecap, RawEncap, RawFeedback,
    RawHealth, RawMaintenance, RawVip, RawVisibility, TlsCheck, VipConfig, VisibilityConfig,
    XdpModeSetting, DEFAULT_INSTANCE, DEFAULT_SOCKET, DEFAULT_STATE_FILE, MAX_RING_ENTRIES,
};
use crate::maglev::{self, is_prime};

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
pub(super) fn in_range<T: TryFrom<i64>>(
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
        let instance = validate_instance(self.instance)?;
        let socket = PathBuf::from(self.socket.unwrap_or_else(|| DEFAULT_SOCKET.into()));
        if !socket.is_absolute() {
            return err("socket", "must be an absolute path");
        }
        if self.datapath.is_none() && !self.vips.is_empty() {
            return err("vips", "VIPs need a [datapath] section");
        }
        let balancer_only = [
            ("encap", self.encap.is_some()),
            ("lifecycle", self.lifecycle.is_some()),
            ("announce", self.announce.is_some()),
            ("visibility", self.visibility.is_some()),
        ];
        for (section, present) in balancer_only {
            if present && self.datapath.is_none() {
                return err(section, format!("[{section}] needs a [datapath] section"));
            }
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
        let fleet = self.fleet.map(super::fleet::validate_fleet).transpose()?;
        let announce = self.announce.map(validate_announce).transpose()?;
        let host = self
            .host
            .map(|h| super::host::validate_host(&instance, h, fleet.as_ref()))
            .transpose()?;
        let bypass = self
            .bypass
            .map(|b| super::bypass::validate_bypass_section(b, fleet.is_some()))
            .transpose()?;
        super::bypass::check_roles(
            bypass.as_ref(),
            balancer.as_ref().is_some_and(|b| b.datapath.bypass_source),
            decap.is_some(),
        )?;
        if balancer.is_none() && decap.is_none() && host.is_none() {
            return err(
                "config",
                "nothing to run: give a [datapath] section with [[vips]], a [decap] section, or [host] with [fleet]",
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
            instance,
            socket,
            balancer,
            decap,
            metrics,
            fleet,
            announce,
            host,
            bypass,
            datapath_log: false,
        })
    }
}

fn validate_balancer(
    dp: RawDatapath,
    encap: Option<RawEncap>,
    raw_vips: Vec<RawVip>,
) -> Result<BalancerConfig, ConfigError> {
    let datapath = validate_datapath(dp)?;
    let encap = validate_encap(encap)?;
    let vips = validate_vips(raw_vips, &datapath, &encap)?;
    Ok(BalancerConfig {
        datapath,
        encap,
        vips,
        visibility: VisibilityConfig::default(),
        state_file: PathBuf::from(DEFAULT_STATE_FILE),
    })
}

pub(super) fn validate_datapath(dp: RawDatapath) -> Result<DatapathConfig, ConfigError> {
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
    let maglev_slots = validate_maglev_slots(dp.maglev_slots, maglev_table_size, max_vips)?;
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
    let icmp_too_big_rate: u32 = in_range(
        "datapath.icmp_too_big_rate",
        dp.icmp_too_big_rate,
        lb_common::DEFAULT_ICMP_TOO_BIG_RATE.into(),
        0,
        1_000_000,
    )?;
    let icmp_too_big_burst: u32 = in_range(
        "datapath.icmp_too_big_burst",
        dp.icmp_too_big_burst,
        lb_common::DEFAULT_ICMP_TOO_BIG_BURST.into(),
        1,
        1_000_000,
    )?;
    Ok(DatapathConfig {
        interfaces: dp.interfaces,
        xdp_mode,
        maglev_table_size,
        maglev_slots,
        max_vips,
        max_backends,
        flow_table_size,
        next_hop_refresh_ms,
        icmp_too_big_rate,
        icmp_too_big_burst,
        clamp_mss: dp.clamp_mss.unwrap_or(true),
        second_chance: dp.second_chance.unwrap_or(true),
        bypass_source: dp.bypass_source.unwrap_or(false),
    })
}

/// `datapath.maglev_slots`: by default three rings of the smallest size per
/// VIP (at most `MAX_RING_ENTRIES`); at least the three rings of one VIP
/// with one backend.
fn validate_maglev_slots(
    raw: Option<i64>,
    maglev_table_size: u32,
    max_vips: u32,
) -> Result<u64, ConfigError> {
    let default = (3 * u64::from(maglev_table_size) * u64::from(max_vips)).min(MAX_RING_ENTRIES);
    let least = 3 * u64::from(maglev::ring_size(maglev_table_size, 1));
    let slots: u64 = in_range(
        "datapath.maglev_slots",
        raw,
        default as i64,
        0,
        MAX_RING_ENTRIES as i64,
    )?;
    if slots < least {
        return err(
            "datapath.maglev_slots",
            format!(
                "{slots} slots cannot hold the three rings of one VIP ({least} slots with datapath.maglev_table_size = {maglev_table_size})"
            ),
        );
    }
    Ok(slots)
}

fn validate_encap(encap: Option<RawEncap>) -> Result<EncapConfig, ConfigError> {
    let Some(e) = encap else {
        return Ok(EncapConfig::default());
    };
    Ok(EncapConfig {
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
    })
}

/// What VIPs must not share, gathered as they are validated: their
/// (address, port, protocol) and their names; and the distinct backends of
/// all of them, which the datapath has room for only so many of.
#[derive(Default)]
struct VipsSeen {
    keys: HashSet<(IpAddr, u16, Protocol)>,
    names: HashSet<String>,
    backends: BTreeSet<IpAddr>,
}

pub(super) fn validate_vips(
    raw_vips: Vec<RawVip>,
    dp: &DatapathConfig,
    encap: &EncapConfig,
) -> Result<Vec<VipConfig>, ConfigError> {
    let max_vips = dp.max_vips;
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
    let mut seen = VipsSeen::default();
    for (i, rv) in raw_vips.into_iter().enumerate() {
        let f = format!("vips[{i}]");
        let vip = validate_vip(&f, rv, dp.maglev_table_size, encap, &mut seen)?;
        // The live ring, the previous one and a changed one, side by side.
        let ring = maglev::ring_size(dp.maglev_table_size, vip.backends.len());
        if 3 * u64::from(ring) > dp.maglev_slots {
            return err(
                format!("{f}.backends"),
                format!(
                    "{} backends take rings of {ring} slots, and three of them (the live table, the previous one and a changed one) do not fit datapath.maglev_slots = {}",
                    vip.backends.len(),
                    dp.maglev_slots
                ),
            );
        }
        vips.push(vip);
    }
    let max_backends = dp.max_backends;
    if seen.backends.len() > max_backends as usize {
        return err(
            "vips",
            format!(
                "{} distinct backends, more than datapath.max_backends = {max_backends}",
                seen.backends.len()
            ),
        );
    }
    Ok(vips)
}

/// The VIP `f` (`vips[i]`); `seen` holds what the VIPs before it use.
fn validate_vip(
    f: &str,
    rv: RawVip,
    maglev_table_size: u32,
    encap: &EncapConfig,
    seen: &mut VipsSeen,
) -> Result<VipConfig, ConfigError> {
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
    if !seen.keys.insert((address, port, protocol)) {
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
    if !seen.names.insert(name.clone()) {
        return err(format!("{f}.name"), format!("{name:?} is used by two VIPs"));
    }
    let backends = validate_backends(f, rv.backends, maglev_table_size, encap, seen)?;
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
    let bypass = match rv.bypass {
        Some(b) => Some(super::bypass::validate_bypass(
            &format!("{f}.bypass"),
            b,
            protocol,
        )?),
        None => None,
    };
    Ok(VipConfig {
        bypass,
        name,
        address,
        port,
        protocol,
        backends,
        health,
        feedback,
        maintenance,
    })
}

/// The backends of the VIP `f`; each is added to `seen.backends`.
fn validate_backends(
    f: &str,
    raw: Vec<RawBackend>,
    maglev_table_size: u32,
    encap: &EncapConfig,
    seen: &mut VipsSeen,
) -> Result<Vec<BackendConfig>, ConfigError> {
    if raw.is_empty() {
        return err(format!("{f}.backends"), "a VIP needs at least one backend");
    }
    if raw.len() > maglev_table_size as usize {
        return err(
            format!("{f}.backends"),
            "more backends than datapath.maglev_table_size slots",
        );
    }
    let mut backends = Vec::with_capacity(raw.len());
    let mut in_vip = HashSet::new();
    for (j, rb) in raw.into_iter().enumerate() {
        let bf = format!("{f}.backends[{j}]");
        let backend = validate_backend(&bf, rb, encap, &mut in_vip)?;
        seen.backends.insert(backend.address);
        backends.push(backend);
    }
    Ok(backends)
}

/// The backend `bf` (`vips[i].backends[j]`); `in_vip` holds the addresses of
/// the VIP's backends before it.
fn validate_backend(
    bf: &str,
    rb: RawBackend,
    encap: &EncapConfig,
    in_vip: &mut HashSet<IpAddr>,
) -> Result<BackendConfig, ConfigError> {
    let address = parse_addr(&format!("{bf}.address"), &rb.address)?;
    if !in_vip.insert(address) {
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
    Ok(BackendConfig {
        address,
        weight,
        max_flows,
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
    let tls = match h.kind.as_str() {
        "https" => Some(validate_tls(f, &h)?),
        _ if h.tls_server_name.is_some() || h.tls_ca_file.is_some() => {
            return err(
                format!("{f}.tls_server_name"),
                "tls_server_name and tls_ca_file are for kind = \"https\"",
            );
        }
        _ => None,
    };
    let kind = match h.kind.as_str() {
        "tcp" => {
            if h.path.is_some() || h.expect_status.is_some() {
                return err(
                    format!("{f}.path"),
                    "path and expect_status are for kind = \"http\" or \"https\"",
                );
            }
            HealthKind::Tcp
        }
        "http" | "https" => {
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
                tls,
            }
        }
        other => {
            return err(
                format!("{f}.kind"),
                format!("{other:?} is not a check; expected \"tcp\", \"http\" or \"https\""),
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

/// The certificate checks of an HTTPS health check: a DNS name to verify,
/// and the CA bundle, read and parsed now so a bad file is refused here.
fn validate_tls(f: &str, h: &RawHealth) -> Result<TlsCheck, ConfigError> {
    let server_name = match &h.tls_server_name {
        None => None,
        Some(name) => {
            let valid = !name.is_empty()
                && name.len() <= 253
                && name.parse::<IpAddr>().is_err()
                && name.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            if !valid {
                return err(
                    format!("{f}.tls_server_name"),
                    format!("{name:?} is not a DNS name (leave it out to verify the backend's IP address)"),
                );
            }
            Some(name.to_ascii_lowercase())
        }
    };
    let ca_pem = match &h.tls_ca_file {
        None => None,
        Some(path) => {
            let field = format!("{f}.tls_ca_file");
            let pem = std::fs::read(path)
                .or_else(|e| err(&field, format!("cannot read {path:?}: {e}")))?;
            match reqwest::Certificate::from_pem_bundle(&pem) {
                Ok(certs) if !certs.is_empty() => {}
                _ => return err(&field, format!("{path:?} holds no PEM certificate")),
            }
            Some(pem)
        }
    };
    Ok(TlsCheck {
        server_name,
        ca_pem,
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

/// An instance name: it names a directory under bpffs and a lock file.
fn validate_instance(name: Option<String>) -> Result<String, ConfigError> {
    let name = name.unwrap_or_else(|| DEFAULT_INSTANCE.into());
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if name.is_empty() || name.len() > 64 || !name.chars().all(allowed) {
        return err(
            "instance",
            format!("{name:?}: 1 to 64 letters, digits, '-' or '_'"),
        );
    }
    Ok(name)
}
