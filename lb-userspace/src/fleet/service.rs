//! The service registry's records (`PREFIX/services/NAME`): a service's
//! instances, each an address with a weight on a host node, the VIPs its
//! callers reach it at, and the rules a record must follow before it is
//! written.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::config::{check_name, ConfigError, Protocol};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub instances: Vec<Instance>,
    /// Where callers reach the service (the VIPs the LB nodes serve for it).
    /// An install to this service balances these on the callers' hosts.
    #[serde(default)]
    pub vips: Vec<ServiceVip>,
}

/// A VIP of a service: address, port (0: every port) and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceVip {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for ServiceVip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        write!(f, "{}/{proto}", SocketAddr::new(self.address, self.port))
    }
}

/// One `--vip ADDR:PORT[/tcp|/udp]` argument (TCP by default).
pub fn parse_vip(field: &str, text: &str) -> Result<ServiceVip, ConfigError> {
    let (addr_text, proto) = match text.rsplit_once('/') {
        Some((a, p)) => (a, p),
        None => (text, "tcp"),
    };
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => return err(field, format!("{other:?}: the protocol is tcp or udp")),
    };
    let address: SocketAddr = addr_text.parse().or_else(|_| {
        err(
            field,
            format!("{addr_text:?} is not ip:port (or [ipv6]:port)"),
        )
    })?;
    Ok(ServiceVip {
        address: address.ip(),
        port: address.port(),
        protocol,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// `ip:port` (`[v6]:port` for IPv6).
    pub address: SocketAddr,
    /// Relative weight, 0..=65535 (default 100), as a backend's.
    pub weight: u32,
    /// The fleet node the instance runs on, if known.
    pub node: Option<String>,
}

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field: field.into(),
        message: message.into(),
    })
}

/// One `--instance ADDR[,weight=W][,node=N]` argument; `field` names it in errors.
pub fn parse_instance(field: &str, text: &str) -> Result<Instance, ConfigError> {
    let mut parts = text.split(',');
    let addr_text = parts.next().unwrap_or_default();
    let address: SocketAddr = addr_text.parse().or_else(|_| {
        err(
            format!("{field}.address"),
            format!("{addr_text:?} is not ip:port (or [ipv6]:port)"),
        )
    })?;
    let mut instance = Instance {
        address,
        weight: 100,
        node: None,
    };
    for part in parts {
        match part.split_once('=') {
            Some(("weight", w)) => {
                instance.weight = w.parse().or_else(|_| {
                    err(
                        format!("{field}.weight"),
                        format!("{w:?} is not a whole number"),
                    )
                })?;
            }
            Some(("node", n)) => instance.node = Some(n.to_string()),
            _ => {
                return err(
                    field,
                    format!("{part:?}: expected weight=W or node=N after the address"),
                )
            }
        }
    }
    Ok(instance)
}

impl Service {
    /// The checks a record passes before it is written: the name, every
    /// instance's address, weight and node.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_name("service", &self.name)?;
        if self.instances.is_empty() {
            return err("instances", "a service needs at least one instance");
        }
        let mut seen = BTreeSet::new();
        for (i, inst) in self.instances.iter().enumerate() {
            let f = format!("instances[{i}]");
            let ip = inst.address.ip();
            if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
                return err(format!("{f}.address"), format!("{ip} cannot be used here"));
            }
            if inst.address.port() == 0 {
                return err(format!("{f}.address"), "the port must not be 0");
            }
            if !seen.insert(inst.address) {
                return err(
                    format!("{f}.address"),
                    format!("{} is listed twice", inst.address),
                );
            }
            if inst.weight > 65_535 {
                return err(
                    format!("{f}.weight"),
                    format!("{} is out of range 0..=65535", inst.weight),
                );
            }
            if let Some(node) = &inst.node {
                check_name(&format!("{f}.node"), node)?;
            }
        }
        self.validate_vips()
    }

    /// VIPs: usable addresses, each listed once; a VIP with a port is served
    /// on the instances' port (direct server return keeps the port).
    fn validate_vips(&self) -> Result<(), ConfigError> {
        let mut seen = BTreeSet::new();
        for (i, vip) in self.vips.iter().enumerate() {
            let f = format!("vips[{i}]");
            let ip = vip.address;
            if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
                return err(format!("{f}.address"), format!("{ip} cannot be used here"));
            }
            if !seen.insert((vip.address, vip.port, vip.protocol)) {
                return err(f, format!("{vip} is listed twice"));
            }
            if self.instances.iter().any(|x| x.address.ip() == ip) {
                return err(
                    format!("{f}.address"),
                    format!("{ip} is also an instance's address"),
                );
            }
            if vip.port == 0 {
                continue;
            }
            if let Some((j, inst)) = self
                .instances
                .iter()
                .enumerate()
                .find(|(_, x)| x.address.port() != vip.port)
            {
                return err(
                    format!("instances[{j}].address"),
                    format!(
                        "port {} differs from {vip}'s: with direct server return the instance serves the VIP's port",
                        inst.address.port()
                    ),
                );
            }
        }
        Ok(())
    }

    /// A record read from the store, checked like one about to be written.
    pub fn from_json(name: &str, text: &str) -> Result<Service, ConfigError> {
        let service: Service = serde_json::from_str(text).map_err(|e| ConfigError {
            field: format!("services/{name}"),
            message: e.to_string(),
        })?;
        service.validate()?;
        Ok(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_parse_and_are_validated() {
        let v = parse_vip("vip[0]", "[fd00:10::1]:53/udp").unwrap();
        assert_eq!((v.port, v.protocol), (53, Protocol::Udp));
        assert_eq!(
            parse_vip("vip[0]", "198.18.10.1:80").unwrap().protocol,
            Protocol::Tcp
        );
        for bad in ["198.18.10.1", "198.18.10.1:80/sctp"] {
            assert_eq!(parse_vip("vip[0]", bad).unwrap_err().field, "vip[0]");
        }
        let inst = Instance {
            address: "198.18.0.11:80".parse().unwrap(),
            weight: 1,
            node: None,
        };
        let with = |vips: &[&str]| Service {
            name: "web".into(),
            instances: vec![inst.clone()],
            vips: vips.iter().map(|v| parse_vip("v", v).unwrap()).collect(),
        };
        with(&["198.18.10.1:80", "198.18.10.1:0/udp"])
            .validate()
            .unwrap();
        let cases = [
            (vec!["127.0.0.1:80"], "vips[0].address"),
            (vec!["198.18.10.1:80", "198.18.10.1:80"], "vips[1]"),
            (vec!["198.18.0.11:80"], "vips[0].address"),
            (vec!["198.18.10.1:443"], "instances[0].address"),
        ];
        for (vips, field) in cases {
            assert_eq!(with(&vips).validate().unwrap_err().field, field, "{vips:?}");
        }
    }

    #[test]
    fn instances_parse_and_bad_fields_are_named() {
        let i = parse_instance("instance[0]", "198.18.0.11:80,weight=5,node=b1").unwrap();
        assert_eq!(i.address, "198.18.0.11:80".parse().unwrap());
        assert_eq!((i.weight, i.node.as_deref()), (5, Some("b1")));
        let i = parse_instance("instance[0]", "[fd00::11]:443").unwrap();
        assert_eq!((i.weight, i.node), (100, None));
        let cases = [
            ("198.18.0.11", "instance[0].address"),
            ("198.18.0.11:80,weight=x", "instance[0].weight"),
            ("198.18.0.11:80,colour=red", "instance[0]"),
        ];
        for (text, field) in cases {
            let e = parse_instance("instance[0]", text).unwrap_err();
            assert_eq!(e.field, field, "{text}");
        }
    }

    #[test]
    fn services_are_validated() {
        let inst = |a: &str, w: u32, n: Option<&str>| Instance {
            address: a.parse().unwrap(),
            weight: w,
            node: n.map(str::to_string),
        };
        let good = Service {
            name: "web".into(),
            instances: vec![inst("198.18.0.11:80", 100, Some("b1"))],
            vips: vec![parse_vip("vip[0]", "198.18.10.1:80/tcp").unwrap()],
        };
        good.validate().unwrap();
        let cases = [
            ("bad name", vec![inst("198.18.0.11:80", 1, None)], "service"),
            ("web", vec![], "instances"),
            (
                "web",
                vec![inst("127.0.0.1:80", 1, None)],
                "instances[0].address",
            ),
            (
                "web",
                vec![inst("198.18.0.11:0", 1, None)],
                "instances[0].address",
            ),
            (
                "web",
                vec![inst("198.18.0.11:80", 70_000, None)],
                "instances[0].weight",
            ),
            (
                "web",
                vec![inst("198.18.0.11:80", 1, Some("a/b"))],
                "instances[0].node",
            ),
            (
                "web",
                vec![
                    inst("198.18.0.11:80", 1, None),
                    inst("198.18.0.11:80", 2, None),
                ],
                "instances[1].address",
            ),
        ];
        for (name, instances, field) in cases {
            let s = Service {
                name: name.into(),
                instances,
                vips: Vec::new(),
            };
            assert_eq!(s.validate().unwrap_err().field, field, "{s:?}");
        }
    }
}
