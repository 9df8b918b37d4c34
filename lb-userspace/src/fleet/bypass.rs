//! Bypass in the fleet store: per-service policies (`lbctl bypass set`),
//! the key ring (`lbctl bypass keys set`), the intermediaries that host
//! agents register (their guests' prefixes and where instructions go), and
//! what a backend host works out from them. Each record is validated where
//! it is read: an invalid one is an error naming its key and field, and the
//! reader keeps its last good state.
//!
//! | key | value | written by | lease |
//! |---|---|---|---|
//! | `PREFIX/bypass/policies/SERVICE` | [`PolicyRecord`] (JSON) | `lbctl bypass set` | none |
//! | `PREFIX/bypass/keys` | the key ring (TOML, as a key file) | `lbctl bypass keys set` | none |
//! | `PREFIX/bypass/intermediaries/NODE` | [`IntermediaryRecord`] (JSON) | each host agent with bypass | the host's |
//! | `PREFIX/bypass/senders/NODE` | [`SenderStatus`] (JSON) | each backend agent | the agent's |

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use super::{Service, StatusError, Versioned};
use crate::{
    bypass::KeyRing,
    config::{validate_bypass, BypassPolicy, ConfigError, Protocol, RawBypass},
};

/// A service's bypass policy: its VIPs whose protocol is listed may be
/// bypassed once a flow has crossed the LB with `after_packets` packets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub service: String,
    pub after_packets: u32,
    pub protocols: Vec<Protocol>,
}

/// A host's source intermediary: instructions for flows from `prefixes`
/// go to `address`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntermediaryRecord {
    pub node: String,
    pub prefixes: Vec<ipnet::IpNet>,
    pub address: SocketAddr,
    pub updated_ms: u64,
}

/// What a backend host applied (`PREFIX/bypass/senders/NODE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SenderStatus {
    pub node: String,
    /// The newest mod revision among the bypass and service records in force.
    pub generation: Option<i64>,
    /// `PREFIX -> ADDRESS` of the intermediaries in force.
    pub intermediaries: Vec<String>,
    /// `VIP after N` of the policies in force.
    pub vips: Vec<String>,
    /// The key ids and the active one, never the secrets.
    pub keys: Option<String>,
    pub error: Option<StatusError>,
    pub updated_ms: u64,
}

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field: field.into(),
        message: message.into(),
    })
}

impl PolicyRecord {
    /// The record `lbctl bypass set` writes for `service`: validated like a
    /// VIP's `bypass` policy, against every VIP of the service (at least one
    /// must have a listed protocol).
    pub fn new(
        service: &Service,
        after_packets: Option<i64>,
        protocols: Option<Vec<String>>,
    ) -> Result<PolicyRecord, ConfigError> {
        let Some(first) = service.vips.first() else {
            return err(
                "service",
                format!(
                    "service {:?} has no VIP: bypass applies to a service's VIPs",
                    service.name
                ),
            );
        };
        let raw = RawBypass {
            after_packets,
            protocols: protocols.clone(),
        };
        // The VIP's protocol is checked below against every VIP.
        let names = protocols.unwrap_or_else(|| vec![first.protocol.to_string()]);
        let any = names
            .iter()
            .find(|n| service.vips.iter().any(|v| v.protocol.to_string() == **n))
            .cloned()
            .unwrap_or_else(|| first.protocol.to_string());
        let vip_protocol = if any == "udp" {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        let BypassPolicy {
            after_packets,
            protocols,
        } = validate_bypass("bypass", raw, vip_protocol)?;
        if !service.vips.iter().any(|v| protocols.contains(&v.protocol)) {
            return err(
                "bypass.protocols",
                "names no protocol of the service's VIPs: the policy would do nothing",
            );
        }
        Ok(PolicyRecord {
            service: service.name.clone(),
            after_packets,
            protocols,
        })
    }

    /// A record read from `PREFIX/bypass/policies/KEY`, checked again.
    pub fn from_json(key: &str, text: &str) -> Result<PolicyRecord, ConfigError> {
        let field = format!("bypass/policies/{key}");
        let r: PolicyRecord = serde_json::from_str(text)
            .or_else(|e| err(field.clone(), format!("not a policy record: {e}")))?;
        if r.service != key {
            return err(
                format!("{field}.service"),
                format!("{:?} differs from the key", r.service),
            );
        }
        if !(1..=crate::config::MAX_BYPASS_AFTER_PACKETS as u32).contains(&r.after_packets) {
            return err(
                format!("{field}.after_packets"),
                format!(
                    "{} is out of range 1..={}",
                    r.after_packets,
                    crate::config::MAX_BYPASS_AFTER_PACKETS
                ),
            );
        }
        if r.protocols.is_empty() {
            return err(format!("{field}.protocols"), "names no protocol");
        }
        Ok(r)
    }

    /// The policy of one VIP of the service, if it has one.
    pub fn for_protocol(&self, protocol: Protocol) -> Option<BypassPolicy> {
        self.protocols.contains(&protocol).then(|| BypassPolicy {
            after_packets: self.after_packets,
            protocols: vec![protocol],
        })
    }
}

impl IntermediaryRecord {
    pub fn from_json(key: &str, text: &str) -> Result<IntermediaryRecord, ConfigError> {
        let field = format!("bypass/intermediaries/{key}");
        let r: IntermediaryRecord = serde_json::from_str(text)
            .or_else(|e| err(field.clone(), format!("not an intermediary record: {e}")))?;
        if r.address.port() == 0 || r.address.ip().is_unspecified() {
            return err(
                format!("{field}.address"),
                format!("{} is not an address instructions can reach", r.address),
            );
        }
        Ok(r)
    }
}

/// A key ring read from `PREFIX/bypass/keys`.
pub fn keys_from_store(text: &str) -> Result<KeyRing, ConfigError> {
    KeyRing::parse(text).map_err(|e| ConfigError {
        field: format!("bypass/keys: {}", e.field),
        message: e.message,
    })
}

/// The policies of the store, by service, every record checked.
pub fn parse_policies(
    policies: &[(String, Versioned)],
) -> Result<BTreeMap<String, PolicyRecord>, ConfigError> {
    policies
        .iter()
        .map(|(k, v)| Ok((k.clone(), PolicyRecord::from_json(k, &v.text)?)))
        .collect()
}

/// Gives each of a host's VIPs the bypass policy of the service it belongs
/// to (checked records only: an invalid policy is an error).
pub fn set_host_policies(
    vips: &mut [crate::config::HostVip],
    services: &[(String, Versioned)],
    policies: &[(String, Versioned)],
) -> Result<(), ConfigError> {
    let policies = parse_policies(policies)?;
    for (name, policy) in &policies {
        let Some((_, v)) = services.iter().find(|(k, _)| k == name) else {
            continue;
        };
        let service = Service::from_json(name, &v.text)?;
        for vip in vips.iter_mut() {
            if service
                .vips
                .iter()
                .any(|s| (s.address, s.port, s.protocol) == (vip.address, vip.port, vip.protocol))
            {
                vip.bypass = policy.for_protocol(vip.protocol);
            }
        }
    }
    Ok(())
}

/// What a backend host's `lb_decap` needs: client prefixes → intermediary,
/// and per VIP the packets before the instruction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SenderPlan {
    pub intermediaries: Vec<(ipnet::IpNet, SocketAddr)>,
    pub vips: Vec<(IpAddr, u16, Protocol, u32)>,
}

/// The plan from one read of the store. Every policy and intermediary
/// record is checked (an invalid one is an error: the last good plan
/// stays); a policy of a service that does not exist applies to nothing.
pub fn sender_plan(
    services: &[(String, Versioned)],
    policies: &[(String, Versioned)],
    intermediaries: &[(String, Versioned)],
) -> Result<SenderPlan, ConfigError> {
    let policies = parse_policies(policies)?;
    let mut plan = SenderPlan::default();
    for (name, policy) in &policies {
        let Some((_, v)) = services.iter().find(|(k, _)| k == name) else {
            continue;
        };
        let service = Service::from_json(name, &v.text)?;
        for vip in &service.vips {
            if policy.protocols.contains(&vip.protocol) {
                plan.vips
                    .push((vip.address, vip.port, vip.protocol, policy.after_packets));
            }
        }
    }
    let mut owners: BTreeMap<ipnet::IpNet, String> = BTreeMap::new();
    for (key, v) in intermediaries {
        let r = IntermediaryRecord::from_json(key, &v.text)?;
        for p in &r.prefixes {
            if let Some(other) = owners.insert(p.trunc(), key.clone()) {
                return err(
                    format!("bypass/intermediaries/{key}.prefixes"),
                    format!("{p} is also registered by {other:?}"),
                );
            }
            plan.intermediaries.push((p.trunc(), r.address));
        }
    }
    plan.vips.sort_by_key(|v| (v.0, v.1, v.2));
    plan.vips.dedup();
    plan.intermediaries.sort();
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Versioned {
        Versioned {
            text: text.into(),
            revision: 1,
        }
    }

    fn service(vips: &[&str]) -> Service {
        let vips: Vec<String> = vips
            .iter()
            .map(|s| {
                let vip = super::super::parse_vip("vip", s).unwrap();
                serde_json::to_string(&vip).unwrap()
            })
            .collect();
        Service::from_json(
            "b",
            &format!(
                "{{\"name\":\"b\",\"instances\":[{{\"address\":\"198.18.0.11:80\",\"weight\":100,\"node\":\"b0\"}}],\"vips\":[{}]}}",
                vips.join(",")
            ),
        )
        .unwrap()
    }

    #[test]
    fn policies_are_validated_against_the_services_vips() {
        let b = service(&["198.18.10.1:80/tcp", "198.18.10.1:0/udp"]);
        let p = PolicyRecord::new(&b, Some(2), None).unwrap();
        assert_eq!(p.protocols, vec![Protocol::Tcp]);
        let p = PolicyRecord::new(&b, None, Some(vec!["udp".into(), "tcp".into()])).unwrap();
        assert_eq!(p.after_packets, 1);
        assert_eq!(p.protocols.len(), 2);
        let cases = [
            (Some(0), None, "bypass.after_packets"),
            (None, Some(vec!["sctp".to_string()]), "bypass.protocols[0]"),
        ];
        for (after, protocols, field) in cases {
            let e = PolicyRecord::new(&b, after, protocols).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        let tcp_only = service(&["198.18.10.1:80/tcp"]);
        let e = PolicyRecord::new(&tcp_only, None, Some(vec!["udp".into()])).unwrap_err();
        assert_eq!(e.field, "bypass.protocols", "{e}");
        let none = service(&[]);
        assert_eq!(
            PolicyRecord::new(&none, None, None).unwrap_err().field,
            "service"
        );
    }

    #[test]
    fn a_sender_plan_refuses_bad_records_by_key() {
        let b = service(&["198.18.10.1:80/tcp", "[fd00::10:1]:80/tcp"]);
        let services = [("b".to_string(), v(&serde_json::to_string(&b).unwrap()))];
        let policy = serde_json::to_string(&PolicyRecord::new(&b, Some(3), None).unwrap()).unwrap();
        let policies = [("b".to_string(), v(&policy))];
        let inter = r#"{"node":"h0","prefixes":["198.18.20.2/32","fd00::20:2/128"],"address":"198.18.0.21:7470","updated_ms":0}"#;
        let intermediaries = [("h0".to_string(), v(inter))];
        let plan = sender_plan(&services, &policies, &intermediaries).unwrap();
        assert_eq!(plan.vips.len(), 2);
        assert_eq!(plan.vips[0].3, 3);
        assert_eq!(plan.intermediaries.len(), 2);
        let bad = [
            (
                vec![("b".to_string(), v("{"))],
                intermediaries.to_vec(),
                "bypass/policies/b",
            ),
            (
                vec![("b".to_string(), v(&policy.replace("\"b\"", "\"c\"")))],
                intermediaries.to_vec(),
                "bypass/policies/b.service",
            ),
            (
                policies.to_vec(),
                vec![(
                    "h0".to_string(),
                    v(&inter.replace("198.18.0.21:7470", "198.18.0.21:0")),
                )],
                "bypass/intermediaries/h0.address",
            ),
            (
                policies.to_vec(),
                vec![("h0".to_string(), v(inter)), ("h1".to_string(), v(inter))],
                "bypass/intermediaries/h1.prefixes",
            ),
        ];
        for (p, i, field) in bad {
            let e = sender_plan(&services, &p, &i).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        assert_eq!(
            keys_from_store("keys = []").unwrap_err().field,
            "bypass/keys: keys"
        );
    }
}
