//! Installs (`PREFIX/installs/FROM/TO`: balance FROM's calls to TO on FROM's
//! hosts), the health the checkers publish (`PREFIX/health/NODE`), what each
//! host applied (`PREFIX/hosts/NODE`), and `plan`: what one host must run,
//! worked out from those records alone so that it can be tested without a
//! store.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use super::{Service, StatusError, Versioned};
use crate::config::{check_name, ConfigError, HostVip};

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field: field.into(),
        message: message.into(),
    })
}

/// An instruction: balance `from`'s calls to `to` on the hosts of `from`'s
/// instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Install {
    pub from: String,
    pub to: String,
    pub created_ms: u64,
}

impl Install {
    /// A record read from the store at `PREFIX/installs/KEY`.
    pub fn from_json(key: &str, text: &str) -> Result<Install, ConfigError> {
        let field = format!("installs/{key}");
        let install: Install = serde_json::from_str(text).map_err(|e| ConfigError {
            field: field.clone(),
            message: e.to_string(),
        })?;
        check_name(&format!("{field}.from"), &install.from)?;
        check_name(&format!("{field}.to"), &install.to)?;
        if key != format!("{}/{}", install.from, install.to) {
            return err(field, "the record's from/to do not match its key");
        }
        Ok(install)
    }

    /// The rules an install follows against the registry, checked by
    /// `lbctl install` before writing and by every host when reading.
    pub fn check(&self, services: &BTreeMap<String, Service>) -> Result<(), ConfigError> {
        if self.from == self.to {
            return err("to", "a service cannot be installed toward itself");
        }
        let Some(from) = services.get(&self.from) else {
            return err("from", format!("no service named {:?}", self.from));
        };
        let Some(to) = services.get(&self.to) else {
            return err("to", format!("no service named {:?}", self.to));
        };
        if to.vips.is_empty() {
            return err(
                "to",
                format!(
                    "service {:?} has no VIP to balance: set one (lbctl service set {} --vip ADDR:PORT ...)",
                    self.to, self.to
                ),
            );
        }
        if !from.instances.iter().any(|i| i.node.is_some()) {
            return err(
                "from",
                format!(
                    "no instance of {:?} names its node, so no host can be set",
                    self.from
                ),
            );
        }
        Ok(())
    }

    /// The hosts to set: the nodes of `from`'s instances.
    pub fn hosts(&self, services: &BTreeMap<String, Service>) -> Vec<String> {
        let nodes: BTreeSet<&String> = services
            .get(&self.from)
            .map(|s| s.instances.iter().filter_map(|i| i.node.as_ref()).collect())
            .unwrap_or_default();
        nodes.into_iter().cloned().collect()
    }
}

/// An install as `lbctl installs` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallView {
    #[serde(flatten)]
    pub install: Install,
    /// Mod revision of the install record.
    pub revision: i64,
    /// The hosts to set (nodes of `from`'s instances).
    pub hosts: Vec<String>,
    /// Those of them that do not report the install in force (no host
    /// agent there, not converged yet, or an error: see their status).
    pub pending: Vec<String>,
}

/// One checker's verdicts on the backends it checks (`PREFIX/health/NODE`,
/// under the checker's lease: a dead checker's opinion goes with it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HealthRecord {
    pub node: String,
    /// Every backend address this node checks.
    pub checked: Vec<IpAddr>,
    /// Those whose last verdict is down.
    pub down: Vec<IpAddr>,
    pub updated_ms: u64,
}

/// The backends the fleet holds down: those that more than half of the
/// checkers checking them report down. A backend nobody checks is up.
pub fn combine_health(records: &[HealthRecord]) -> BTreeSet<IpAddr> {
    let mut votes: BTreeMap<IpAddr, (usize, usize)> = BTreeMap::new();
    for r in records {
        let checked: BTreeSet<&IpAddr> = r.checked.iter().collect();
        for a in &checked {
            votes.entry(**a).or_default().0 += 1;
        }
        for a in r.down.iter().collect::<BTreeSet<_>>() {
            if checked.contains(a) {
                votes.entry(*a).or_default().1 += 1;
            }
        }
    }
    votes
        .into_iter()
        .filter(|(_, (checkers, down))| down * 2 > *checkers)
        .map(|(a, _)| a)
        .collect()
}

/// What one host applied (`PREFIX/hosts/NODE`, under the host's lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HostStatus {
    pub node: String,
    /// The store revision the state in force was read at; `None` before
    /// the first.
    pub generation: Option<i64>,
    /// `FROM/TO` of the installs in force on this host.
    pub installs: Vec<String>,
    /// The guests' interfaces the balancer runs on.
    pub interfaces: Vec<String>,
    /// The instances balanced over (`address weight`), each once, sorted.
    pub backends: Vec<String>,
    /// The source intermediary, if this host is one: the intermediary
    /// record it registered (prefixes, address) and the key ids.
    #[serde(default)]
    pub bypass: Option<String>,
    /// Why the newest state was not applied (the revision read, the error).
    pub error: Option<StatusError>,
    pub updated_ms: u64,
}

/// What one host must run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    /// `FROM/TO` of the installs that concern this host.
    pub installs: Vec<String>,
    /// The addresses of the calling services' instances on this host: the
    /// guests whose interfaces get the balancer.
    pub sources: Vec<IpAddr>,
    pub vips: Vec<HostVip>,
}

/// Parses every record of `items` with `parse`; the first failure is the error.
fn parse_all<T>(
    items: &[(String, Versioned)],
    parse: impl Fn(&str, &str) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ConfigError> {
    items.iter().map(|(k, v)| parse(k, &v.text)).collect()
}

/// What `node` must run, from the store's installs, services and health
/// records (each `(key after the prefix, value)`). `None`: no install
/// concerns this node. A record that an install of this node depends on and
/// that is invalid is an error (the host keeps its last good state); other
/// services' records do not matter here, and a health record that does not
/// parse counts as no opinion.
pub fn plan(
    node: &str,
    installs: &[(String, Versioned)],
    services: &[(String, Versioned)],
    health: &[(String, Versioned)],
) -> Result<Option<HostPlan>, ConfigError> {
    let installs = parse_all(installs, Install::from_json)?;
    let parsed: BTreeMap<&str, Result<Service, ConfigError>> = services
        .iter()
        .map(|(k, v)| (k.as_str(), Service::from_json(k, &v.text)))
        .collect();
    let service = |name: &str| -> Result<Option<Service>, ConfigError> {
        match parsed.get(name) {
            Some(Ok(s)) => Ok(Some(s.clone())),
            Some(Err(e)) => Err(e.clone()),
            None => Ok(None),
        }
    };
    let records: Vec<HealthRecord> = health
        .iter()
        .filter_map(|(_, v)| serde_json::from_str(&v.text).ok())
        .collect();
    let down = combine_health(&records);
    let mut plan = HostPlan {
        installs: Vec::new(),
        sources: Vec::new(),
        vips: Vec::new(),
    };
    for install in &installs {
        let Some(from) = service(&install.from)? else {
            continue;
        };
        let sources: Vec<IpAddr> = from
            .instances
            .iter()
            .filter(|i| i.node.as_deref() == Some(node))
            .map(|i| i.address.ip())
            .collect();
        if sources.is_empty() {
            continue;
        }
        let label = format!("{}/{}", install.from, install.to);
        let mut known = BTreeMap::new();
        known.insert(from.name.clone(), from.clone());
        if let Some(to) = service(&install.to)? {
            known.insert(to.name.clone(), to);
        }
        install.check(&known).map_err(|e| ConfigError {
            field: format!("installs/{label}: {}", e.field),
            message: e.message,
        })?;
        add_target(&mut plan, &known[&install.to], &down)?;
        plan.installs.push(label);
        plan.sources.extend(sources);
    }
    plan.sources.sort();
    plan.sources.dedup();
    Ok((!plan.installs.is_empty()).then_some(plan))
}

/// Adds `to`'s VIPs, balanced over its instances that are not down (over
/// all of them if every one is: failing open, as when the checkers
/// themselves are cut off).
fn add_target(
    plan: &mut HostPlan,
    to: &Service,
    down: &BTreeSet<IpAddr>,
) -> Result<(), ConfigError> {
    let all: Vec<(IpAddr, u32)> = to
        .instances
        .iter()
        .map(|i| (i.address.ip(), i.weight))
        .collect();
    let mut up: Vec<(IpAddr, u32)> = all
        .iter()
        .filter(|(a, _)| !down.contains(a))
        .copied()
        .collect();
    if up.is_empty() {
        up = all;
    }
    for (i, v) in to.vips.iter().enumerate() {
        let name = if to.vips.len() == 1 {
            to.name.clone()
        } else {
            format!("{}-{i}", to.name)
        };
        let vip = HostVip {
            name,
            address: v.address,
            port: v.port,
            protocol: v.protocol,
            backends: up.clone(),
            bypass: None,
        };
        match plan
            .vips
            .iter()
            .find(|x| (x.address, x.port, x.protocol) == (vip.address, vip.port, vip.protocol))
        {
            Some(x) if x == &vip => {}
            Some(x) => {
                return err(
                    format!("services/{}.vips[{i}]", to.name),
                    format!("{v} is also the VIP of {:?} here", x.name),
                )
            }
            None => plan.vips.push(vip),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
