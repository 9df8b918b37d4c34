//! The `[host]` section: this agent is the host intermediary of its guests.
//! When the fleet store holds an install whose calling service runs on this
//! node, the agent runs a source-side balancer on the guests' interfaces.
//! That balancer is an ordinary balancer instance (`INSTANCE-host`); its
//! configuration is rendered here from the section and the install, and
//! validated by the same rules as a configuration file.

use std::{net::IpAddr, path::PathBuf};

use super::{err, BypassPolicy, Config, ConfigError, FleetConfig, Protocol, RawHost};

/// How this host's source-side balancer is set up; what it balances comes
/// from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// The source-side balancer's control socket (`lbctl --socket`).
    pub socket: PathBuf,
    /// `native`, `generic` or `auto`, as `datapath.xdp_mode`.
    pub xdp_mode: String,
    /// The outer source of encapsulated packets, as `encap.source_v4/v6`.
    pub source_v4: Option<String>,
    pub source_v6: Option<String>,
    /// Must equal the LB nodes' so that both build the same tables.
    pub maglev_table_size: u32,
    pub flow_table_size: u32,
    /// The source-side balancer's lifecycle state file.
    pub state_file: PathBuf,
    /// Where bypass instructions for this host's guests arrive; without it
    /// the host is no bypass intermediary.
    pub bypass_listen: Option<std::net::SocketAddr>,
}

/// One VIP of the target service, with the instances to balance over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVip {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// (address, weight)
    pub backends: Vec<(IpAddr, u32)>,
    /// The service's bypass policy for this VIP, from the store.
    pub bypass: Option<BypassPolicy>,
}

/// The instance name of the source-side balancer of agent `instance`.
pub fn host_instance(instance: &str) -> String {
    format!("{instance}-host")
}

impl HostConfig {
    /// The key file the host writes for its source intermediary (the ring
    /// of the store, readable by root only).
    pub fn bypass_key_file(&self) -> PathBuf {
        self.state_file.with_extension("bypass-keys.toml")
    }

    /// The source-side balancer's configuration file, as TOML text. With
    /// `bypass` (the keys are there), VIPs with a policy make it a source
    /// intermediary: `lb_source` on the interfaces, instructions received
    /// on `bypass_listen`.
    pub fn render(
        &self,
        instance: &str,
        interfaces: &[String],
        vips: &[HostVip],
        bypass: bool,
    ) -> String {
        use toml::{Table, Value};
        let bypass =
            bypass && self.bypass_listen.is_some() && vips.iter().any(|v| v.bypass.is_some());
        let mut dp = Table::new();
        if bypass {
            dp.insert("bypass_source".into(), Value::from(true));
        }
        dp.insert("interfaces".into(), Value::from(interfaces.to_vec()));
        dp.insert("xdp_mode".into(), Value::from(self.xdp_mode.clone()));
        dp.insert(
            "maglev_table_size".into(),
            Value::from(i64::from(self.maglev_table_size)),
        );
        dp.insert(
            "flow_table_size".into(),
            Value::from(i64::from(self.flow_table_size)),
        );
        let mut encap = Table::new();
        if let Some(s) = &self.source_v4 {
            encap.insert("source_v4".into(), Value::from(s.clone()));
        }
        if let Some(s) = &self.source_v6 {
            encap.insert("source_v6".into(), Value::from(s.clone()));
        }
        let vips: Vec<Value> = vips
            .iter()
            .map(|v| {
                let mut t = Table::new();
                t.insert("name".into(), Value::from(v.name.clone()));
                t.insert("address".into(), Value::from(v.address.to_string()));
                t.insert("port".into(), Value::from(i64::from(v.port)));
                let proto = match v.protocol {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                };
                t.insert("protocol".into(), Value::from(proto));
                let backends: Vec<Value> = v
                    .backends
                    .iter()
                    .map(|(a, w)| {
                        let mut b = Table::new();
                        b.insert("address".into(), Value::from(a.to_string()));
                        b.insert("weight".into(), Value::from(i64::from(*w)));
                        Value::from(b)
                    })
                    .collect();
                t.insert("backends".into(), Value::from(backends));
                if let (true, Some(p)) = (bypass, &v.bypass) {
                    let mut b = Table::new();
                    b.insert(
                        "after_packets".into(),
                        Value::from(i64::from(p.after_packets)),
                    );
                    let names: Vec<Value> = p
                        .protocols
                        .iter()
                        .map(|x| Value::from(x.to_string()))
                        .collect();
                    b.insert("protocols".into(), Value::from(names));
                    t.insert("bypass".into(), Value::from(b));
                }
                Value::from(t)
            })
            .collect();
        let mut lifecycle = Table::new();
        lifecycle.insert(
            "state_file".into(),
            Value::from(self.state_file.display().to_string()),
        );
        let mut root = Table::new();
        root.insert("instance".into(), Value::from(host_instance(instance)));
        root.insert(
            "socket".into(),
            Value::from(self.socket.display().to_string()),
        );
        root.insert("datapath".into(), Value::from(dp));
        root.insert("encap".into(), Value::from(encap));
        root.insert("vips".into(), Value::from(vips));
        root.insert("lifecycle".into(), Value::from(lifecycle));
        if let (true, Some(listen)) = (bypass, self.bypass_listen) {
            let mut b = Table::new();
            b.insert(
                "key_file".into(),
                Value::from(self.bypass_key_file().display().to_string()),
            );
            b.insert("listen".into(), Value::from(listen.to_string()));
            root.insert("bypass".into(), Value::from(b));
        }
        toml::to_string(&root).unwrap_or_default()
    }

    /// The rendered configuration, validated as a file would be.
    pub fn config(
        &self,
        instance: &str,
        interfaces: &[String],
        vips: &[HostVip],
        bypass: bool,
    ) -> Result<(Config, String), ConfigError> {
        let text = self.render(instance, interfaces, vips, bypass);
        Ok((Config::from_toml(&text)?, text))
    }
}

/// Renames a field of the rendered file to the `[host]` setting it came from.
fn host_field(field: &str) -> String {
    let name = match field {
        "datapath.xdp_mode" => "xdp_mode",
        "datapath.maglev_table_size" => "maglev_table_size",
        "datapath.flow_table_size" => "flow_table_size",
        "encap.source_v4" => "encap_source_v4",
        "encap.source_v6" => "encap_source_v6",
        "lifecycle.state_file" => "state_file",
        "socket" => "socket",
        "bypass.listen" => "bypass_listen",
        other => other,
    };
    format!("host.{name}")
}

pub(super) fn validate_host(
    instance: &str,
    h: RawHost,
    fleet: Option<&FleetConfig>,
) -> Result<HostConfig, ConfigError> {
    if fleet.is_none() {
        return err(
            "host",
            "the host role needs a [fleet] section: installs come from the fleet store",
        );
    }
    let range = |field: &str, v: Option<i64>, default: i64, hi: i64| -> Result<u32, ConfigError> {
        let v = v.unwrap_or(default);
        if !(1..=hi).contains(&v) {
            return err(field, format!("{v} is out of range 1..={hi}"));
        }
        Ok(u32::try_from(v).unwrap_or(u32::MAX))
    };
    let host = HostConfig {
        socket: PathBuf::from(
            h.socket
                .unwrap_or_else(|| format!("/run/lb-agent/{}.sock", host_instance(instance))),
        ),
        xdp_mode: h.xdp_mode.unwrap_or_else(|| "native".into()),
        source_v4: h.encap_source_v4,
        source_v6: h.encap_source_v6,
        maglev_table_size: range(
            "host.maglev_table_size",
            h.maglev_table_size,
            lb_common::DEFAULT_MAGLEV_SIZE.into(),
            i64::from(u32::MAX),
        )?,
        flow_table_size: range(
            "host.flow_table_size",
            h.flow_table_size,
            65_536,
            i64::from(u32::MAX),
        )?,
        state_file: PathBuf::from(h.state_file.unwrap_or_else(|| {
            format!(
                "/var/lib/lb-agent/{}-lifecycle.json",
                host_instance(instance)
            )
        })),
        bypass_listen: match h.bypass_listen {
            Some(l) => match l.parse::<std::net::SocketAddr>() {
                Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => Some(a),
                _ => {
                    return err(
                        "host.bypass_listen",
                        format!("{l:?} is not an address:port the backends' hosts can reach"),
                    )
                }
            },
            None => None,
        },
    };
    if host.source_v4.is_none() && host.source_v6.is_none() {
        return err(
            "host",
            "give encap_source_v4 and/or encap_source_v6: the outer source of packets sent to the target's instances",
        );
    }
    // Every setting is checked by rendering a balancer on a placeholder
    // interface and validating it as a file.
    host.config(instance, &["lo".to_string()], &[], false)
        .map_err(|e| ConfigError {
            field: host_field(&e.field),
            message: e.message,
        })?;
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: &str = "[fleet]\nendpoints = [\"127.0.0.1:2379\"]\nca = \"/c\"\ncert = \"/d\"\nkey = \"/e\"\nnode = \"h0\"\n";

    fn host(section: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("instance = \"h\"\n[host]\n{section}\n{FLEET}"))
    }

    #[test]
    fn a_host_section_is_validated_with_named_fields() {
        let c = host("encap_source_v4 = \"198.18.0.21/32\"").unwrap();
        let h = c.host.unwrap();
        assert_eq!(h.socket, PathBuf::from("/run/lb-agent/h-host.sock"));
        assert_eq!(h.xdp_mode, "native");
        let cases = [
            ("", "host"),
            ("encap_source_v4 = \"x\"", "host.encap_source_v4"),
            (
                "encap_source_v4 = \"198.18.0.21/32\"\nxdp_mode = \"fast\"",
                "host.xdp_mode",
            ),
            (
                "encap_source_v4 = \"198.18.0.21/32\"\nmaglev_table_size = 100",
                "host.maglev_table_size",
            ),
            (
                "encap_source_v4 = \"198.18.0.21/32\"\nstate_file = \"rel.json\"",
                "host.state_file",
            ),
            ("encap_source_v4 = \"198.18.0.21/32\"\ncolour = 1", "config"),
        ];
        for (section, field) in cases {
            assert_eq!(host(section).unwrap_err().field, field, "{section}");
        }
        let no_fleet = Config::from_toml("[host]\nencap_source_v4 = \"198.18.0.21/32\"\n");
        assert_eq!(no_fleet.unwrap_err().field, "host");
    }

    #[test]
    fn the_rendered_balancer_is_a_valid_configuration() {
        let c = host("encap_source_v4 = \"198.18.0.21/32\"").unwrap();
        let vips = [HostVip {
            name: "b".into(),
            address: "198.18.10.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            backends: vec![("198.18.0.11".parse().unwrap(), 100)],
            bypass: None,
        }];
        let h = c.host.unwrap();
        let (inner, _) = h
            .config("h", &["g0".into(), "g1".into()], &vips, false)
            .unwrap();
        assert_eq!(inner.instance, "h-host");
        let b = inner.balancer.unwrap();
        assert_eq!(b.datapath.interfaces, ["g0", "g1"]);
        assert_eq!(b.vips[0].backends[0].weight, 100);
        assert!(inner.fleet.is_none() && inner.host.is_none());
        assert!(!b.datapath.bypass_source && inner.bypass.is_none());
    }

    #[test]
    fn a_vip_with_bypass_makes_the_balancer_a_source_intermediary() {
        let c = host("encap_source_v4 = \"198.18.0.21/32\"\nbypass_listen = \"198.18.0.21:7470\"")
            .unwrap();
        let h = c.host.unwrap();
        let mut vips = vec![HostVip {
            name: "b".into(),
            address: "198.18.10.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            backends: vec![("198.18.0.11".parse().unwrap(), 100)],
            bypass: None,
        }];
        // No policy, or no keys: lb_ingress as before.
        let (inner, _) = h.config("h", &["g0".into()], &vips, true).unwrap();
        assert!(!inner.balancer.unwrap().datapath.bypass_source);
        vips[0].bypass = Some(BypassPolicy {
            after_packets: 2,
            protocols: vec![Protocol::Tcp],
        });
        let (inner, _) = h.config("h", &["g0".into()], &vips, false).unwrap();
        assert!(!inner.balancer.unwrap().datapath.bypass_source);
        let (inner, _) = h.config("h", &["g0".into()], &vips, true).unwrap();
        let bp = inner.bypass.unwrap();
        assert_eq!(bp.listen, h.bypass_listen);
        assert_eq!(bp.key_file, Some(h.bypass_key_file()));
        let b = inner.balancer.unwrap();
        assert!(b.datapath.bypass_source);
        assert_eq!(b.vips[0].bypass.as_ref().unwrap().after_packets, 2);
        let e = host("encap_source_v4 = \"198.18.0.21/32\"\nbypass_listen = \"0.0.0.0:7470\"")
            .unwrap_err();
        assert_eq!(e.field, "host.bypass_listen");
    }
}
