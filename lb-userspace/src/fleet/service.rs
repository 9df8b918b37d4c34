//! The service registry's records (`PREFIX/services/NAME`): a service's
//! instances, each an address with a weight on a host node, and the rules a
//! record must follow before it is written.

use std::{collections::BTreeSet, net::SocketAddr};

use serde::{Deserialize, Serialize};

use crate::config::{check_name, ConfigError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub instances: Vec<Instance>,
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
            };
            assert_eq!(s.validate().unwrap_err().field, field, "{s:?}");
        }
    }
}
