//! A VIP's bypass policy: `bypass = { after_packets = N, protocols = [...] }`
//! (off without it). With it, the backends' hosts may tell client hosts'
//! intermediaries to send a flow straight to its backend once N of its
//! packets went through the LB; an agent with `[datapath] bypass_source`
//! acts as such an intermediary for the VIP.

use serde::Deserialize;

use super::{err, validate::in_range, ConfigError, Protocol};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBypass {
    pub after_packets: Option<i64>,
    pub protocols: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BypassPolicy {
    /// Packets of a flow the LB forwards before the instruction is sent.
    pub after_packets: u32,
    pub protocols: Vec<Protocol>,
}

pub const DEFAULT_AFTER_PACKETS: i64 = 1;
/// Instructions older or newer than this (by their timestamp against the
/// receiver's clock) are refused as stale.
pub const DEFAULT_WINDOW_MS: u64 = 5_000;
pub const MAX_AFTER_PACKETS: i64 = 1000;

/// `f` names the policy (`vips[i].bypass`); `vip` is the VIP's protocol,
/// which the list must name (a policy that applies to nothing is a mistake).
pub fn validate_bypass(
    f: &str,
    raw: RawBypass,
    vip: Protocol,
) -> Result<BypassPolicy, ConfigError> {
    let after_packets = in_range(
        &format!("{f}.after_packets"),
        raw.after_packets,
        DEFAULT_AFTER_PACKETS,
        1,
        MAX_AFTER_PACKETS,
    )?;
    let names = raw.protocols.unwrap_or_else(|| vec![vip.to_string()]);
    let mut protocols = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let p = match name.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return err(
                    format!("{f}.protocols[{i}]"),
                    format!("{other:?} is neither \"tcp\" nor \"udp\""),
                )
            }
        };
        if protocols.contains(&p) {
            return err(
                format!("{f}.protocols[{i}]"),
                format!("{name:?} is named twice"),
            );
        }
        protocols.push(p);
    }
    if !protocols.contains(&vip) {
        return err(
            format!("{f}.protocols"),
            format!("does not name the VIP's protocol \"{vip}\": the policy would do nothing"),
        );
    }
    Ok(BypassPolicy {
        after_packets,
        protocols,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(after: Option<i64>, protocols: Option<&[&str]>) -> RawBypass {
        RawBypass {
            after_packets: after,
            protocols: protocols.map(|p| p.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn defaults_and_bad_policies_name_the_field() {
        let ok = validate_bypass("vips[0].bypass", raw(None, None), Protocol::Tcp).unwrap();
        assert_eq!(ok.after_packets, 1);
        assert_eq!(ok.protocols, vec![Protocol::Tcp]);
        let cases = [
            (raw(Some(0), None), "vips[0].bypass.after_packets"),
            (raw(Some(1001), None), "vips[0].bypass.after_packets"),
            (raw(None, Some(&["sctp"])), "vips[0].bypass.protocols[0]"),
            (
                raw(None, Some(&["tcp", "tcp"])),
                "vips[0].bypass.protocols[1]",
            ),
            (raw(None, Some(&["udp"])), "vips[0].bypass.protocols"),
            (raw(None, Some(&[])), "vips[0].bypass.protocols"),
        ];
        for (r, field) in cases {
            let e = validate_bypass("vips[0].bypass", r, Protocol::Tcp).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    const SOURCE: &str = "[datapath]\ninterfaces = [\"g0\"]\nbypass_source = true\n\
        [encap]\nsource_v4 = \"198.18.0.21/32\"\n";
    const VIP: &str = "[[vips]]\naddress = \"198.18.10.1\"\nport = 80\nprotocol = \"tcp\"\n\
        backends = [{ address = \"198.18.0.11\" }]\nbypass = { after_packets = 3 }\n";
    const DECAP: &str = "[decap]\ninterfaces = [\"eth0\"]\naddresses = [\"198.18.0.11\"]\n";

    fn parse(text: &str) -> Result<crate::config::Config, ConfigError> {
        crate::config::Config::from_toml(text)
    }

    #[test]
    fn both_roles_parse() {
        let c = parse(&format!(
            "{SOURCE}[bypass]\nkey_file = \"/etc/k.toml\"\nlisten = \"198.18.0.21:7470\"\n{VIP}"
        ))
        .unwrap();
        let b = c.balancer.unwrap();
        assert!(b.datapath.bypass_source);
        assert_eq!(b.vips[0].bypass.as_ref().unwrap().after_packets, 3);
        assert_eq!(c.bypass.unwrap().idle_timeout_s, 120);
        let c = parse(&format!(
            "{DECAP}[bypass]\nkey_file = \"/etc/k.toml\"\n\
             intermediaries = [{{ prefix = \"198.18.20.7/22\", address = \"198.18.0.21:7470\" }}]\n\
             vips = [{{ address = \"198.18.10.1\", port = 80, protocol = \"tcp\" }}]\n"
        ))
        .unwrap();
        let bp = c.bypass.unwrap();
        assert_eq!(bp.intermediaries[0].0.to_string(), "198.18.20.0/22");
        assert_eq!(bp.vips[0].3, 1);
    }

    const FLEET: &str = "[fleet]\nendpoints = [\"127.0.0.1:2379\"]\nca = \"/c\"\ncert = \"/d\"\nkey = \"/e\"\nnode = \"b0\"\n";

    #[test]
    fn in_a_fleet_the_store_gives_prefixes_policies_and_keys() {
        // A backend host in a fleet needs no [bypass] section at all; with
        // one, the key file is optional and the lists come from the store.
        let c = parse(&format!("{DECAP}{FLEET}")).unwrap();
        assert!(c.bypass.is_none());
        let c = parse(&format!("{DECAP}{FLEET}[bypass]\nwindow_ms = 2000\n")).unwrap();
        assert_eq!(c.bypass.unwrap().key_file, None);
        let cases = [
            (
                format!("{DECAP}{FLEET}[bypass]\nintermediaries = [{{ prefix = \"198.18.20.0/22\", address = \"198.18.0.21:7470\" }}]\n"),
                "bypass.intermediaries",
            ),
            (
                format!("{DECAP}{FLEET}[bypass]\nvips = [{{ address = \"198.18.10.1\", port = 80, protocol = \"tcp\" }}]\n"),
                "bypass.vips",
            ),
            (format!("{DECAP}[bypass]\nwindow_ms = 2000\n"), "bypass.key_file"),
            (
                format!("{SOURCE}{FLEET}[bypass]\nlisten = \"198.18.0.21:7470\"\n{VIP}"),
                "bypass.key_file",
            ),
        ];
        for (text, field) in cases {
            let e = parse(&text).expect_err(&text);
            assert_eq!(e.field, field, "{text}: {e}");
        }
    }

    #[test]
    fn bad_sections_name_the_field() {
        let key = "key_file = \"/etc/k.toml\"\n";
        let cases = [
            (format!("{SOURCE}{VIP}"), "datapath.bypass_source"),
            (format!("{SOURCE}[bypass]\n{key}{VIP}"), "bypass.listen"),
            (
                format!("{DECAP}[bypass]\n{key}listen = \"198.18.0.21:7470\"\n"),
                "bypass.listen",
            ),
            (
                format!("{SOURCE}[bypass]\nkey_file = \"k.toml\"\nlisten = \"198.18.0.21:1\"\n{VIP}"),
                "bypass.key_file",
            ),
            (
                format!("{SOURCE}[bypass]\n{key}listen = \"nowhere\"\n{VIP}"),
                "bypass.listen",
            ),
            (
                format!("{DECAP}[bypass]\n{key}intermediaries = [{{ prefix = \"198.18.20.0/33\", address = \"198.18.0.21:7470\" }}]\n"),
                "bypass.intermediaries[0].prefix",
            ),
            (
                format!("{DECAP}[bypass]\n{key}intermediaries = [{{ prefix = \"198.18.20.0/22\", address = \"198.18.0.21:0\" }}]\n"),
                "bypass.intermediaries[0].address",
            ),
            (
                format!("{DECAP}[bypass]\n{key}vips = [{{ address = \"198.18.10.1\", port = 80, protocol = \"sctp\" }}]\n"),
                "bypass.vips[0].protocol",
            ),
            (
                format!("{DECAP}[bypass]\n{key}vips = [{{ address = \"198.18.10.1\", port = 80, protocol = \"tcp\", after_packets = 0 }}]\n"),
                "bypass.vips[0].after_packets",
            ),
            (
                format!("{SOURCE}[bypass]\n{key}listen = \"198.18.0.21:1\"\n{}", VIP.replace("after_packets = 3", "after_packets = 3, protocols = [\"udp\"]")),
                "vips[0].bypass.protocols",
            ),
        ];
        for (text, field) in cases {
            let e = parse(&text).expect_err(&text);
            assert_eq!(e.field, field, "{text}: {e}");
        }
    }
}

/// `[bypass]`: this agent's part in bypass. On a client host (with
/// `[datapath] bypass_source`), `listen` is where instructions arrive; on a
/// backend host (with `[decap]`), `intermediaries` says which client
/// prefixes have an intermediary and where, and `vips` which VIPs' flows
/// may be bypassed after how many packets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBypassSection {
    pub key_file: Option<String>,
    pub listen: Option<String>,
    pub window_ms: Option<i64>,
    pub idle_timeout_s: Option<i64>,
    #[serde(default)]
    pub intermediaries: Vec<RawIntermediary>,
    #[serde(default)]
    pub vips: Vec<RawBypassVip>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIntermediary {
    pub prefix: String,
    pub address: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBypassVip {
    pub address: String,
    pub port: i64,
    pub protocol: String,
    pub after_packets: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BypassConfig {
    /// `None` in a fleet: the keys come from the store (`PREFIX/bypass/keys`).
    pub key_file: Option<std::path::PathBuf>,
    pub listen: Option<std::net::SocketAddr>,
    pub window_ms: u64,
    /// A bypassed flow without packets for this long loses its entry.
    pub idle_timeout_s: u64,
    pub intermediaries: Vec<(ipnet::IpNet, std::net::SocketAddr)>,
    /// (address, port, protocol, after_packets).
    pub vips: Vec<(std::net::IpAddr, u16, Protocol, u32)>,
}

/// The roles `[bypass]` asks for must have their sections: a source
/// intermediary `listen` and `[datapath] bypass_source` (both or neither),
/// a sender `[decap]`.
pub fn check_roles(
    bypass: Option<&BypassConfig>,
    bypass_source: bool,
    decap: bool,
) -> Result<(), ConfigError> {
    let Some(bp) = bypass else {
        if bypass_source {
            return err(
                "datapath.bypass_source",
                "a source intermediary needs a [bypass] section (key_file, listen)",
            );
        }
        return Ok(());
    };
    if bypass_source && bp.key_file.is_none() {
        return err(
            "bypass.key_file",
            "a source intermediary configured in its file needs a key file",
        );
    }
    if bp.listen.is_some() != bypass_source {
        return err(
            "bypass.listen",
            "a source intermediary needs both bypass.listen and [datapath] bypass_source = true",
        );
    }
    if (!bp.intermediaries.is_empty() || !bp.vips.is_empty()) && !decap {
        return err(
            "bypass.intermediaries",
            "sending instructions needs a [decap] section (a backend host)",
        );
    }
    Ok(())
}

/// `fleet`: the agent has `[fleet]`, where the client prefixes, the
/// policies and (without `key_file`) the keys come from.
pub fn validate_bypass_section(
    raw: RawBypassSection,
    fleet: bool,
) -> Result<BypassConfig, ConfigError> {
    let key_file = match &raw.key_file {
        Some(k) if std::path::Path::new(k).is_absolute() => Some(std::path::PathBuf::from(k)),
        Some(k) => return err("bypass.key_file", format!("{k:?} is not an absolute path")),
        None if fleet => None,
        None => {
            return err(
                "bypass.key_file",
                "missing: the keys come from a key file (or, with [fleet], from the store)",
            )
        }
    };
    if fleet && !raw.intermediaries.is_empty() {
        return err(
            "bypass.intermediaries",
            "with [fleet] the intermediaries come from the store (the host agents register them)",
        );
    }
    if fleet && !raw.vips.is_empty() {
        return err(
            "bypass.vips",
            "with [fleet] the bypass policies come from the store (lbctl bypass set)",
        );
    }
    let listen = match raw.listen {
        Some(l) => Some(
            l.parse()
                .or_else(|_| err("bypass.listen", format!("{l:?} is not an address:port")))?,
        ),
        None => None,
    };
    let window_ms = in_range(
        "bypass.window_ms",
        raw.window_ms,
        DEFAULT_WINDOW_MS as i64,
        100,
        300_000,
    )?;
    let idle_timeout_s = in_range("bypass.idle_timeout_s", raw.idle_timeout_s, 120, 1, 86_400)?;
    let mut intermediaries = Vec::new();
    for (i, m) in raw.intermediaries.iter().enumerate() {
        let f = format!("bypass.intermediaries[{i}]");
        let prefix: ipnet::IpNet = m.prefix.parse().or_else(|_| {
            err(
                format!("{f}.prefix"),
                format!("{:?} is not a prefix", m.prefix),
            )
        })?;
        let address: std::net::SocketAddr = m.address.parse().or_else(|_| {
            err(
                format!("{f}.address"),
                format!("{:?} is not an address:port", m.address),
            )
        })?;
        if address.port() == 0 {
            return err(format!("{f}.address"), "port 0");
        }
        intermediaries.push((prefix.trunc(), address));
    }
    let vips = raw
        .vips
        .iter()
        .enumerate()
        .map(|(i, v)| validate_vip(&format!("bypass.vips[{i}]"), v))
        .collect::<Result<_, _>>()?;
    Ok(BypassConfig {
        key_file,
        listen,
        window_ms,
        idle_timeout_s,
        intermediaries,
        vips,
    })
}

/// One of `[bypass] vips` (a backend host's policy for a VIP).
fn validate_vip(
    f: &str,
    v: &RawBypassVip,
) -> Result<(std::net::IpAddr, u16, Protocol, u32), ConfigError> {
    let address: std::net::IpAddr = v.address.parse().or_else(|_| {
        err(
            format!("{f}.address"),
            format!("{:?} is not an address", v.address),
        )
    })?;
    let port: u16 = in_range(&format!("{f}.port"), Some(v.port), 0, 1, 65_535)?;
    let protocol = match v.protocol.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => {
            return err(
                format!("{f}.protocol"),
                format!("{other:?} is neither \"tcp\" nor \"udp\""),
            )
        }
    };
    let after = in_range(
        &format!("{f}.after_packets"),
        v.after_packets,
        DEFAULT_AFTER_PACKETS,
        1,
        MAX_AFTER_PACKETS,
    )?;
    Ok((address, port, protocol, after))
}
