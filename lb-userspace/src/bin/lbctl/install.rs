//! `lbctl install|uninstall|installs`: source-side balancing of one
//! service's calls to another, set on the callers' hosts through the fleet
//! store. Every write is checked against the registry first and made in a
//! transaction that fails if a record it was checked against changed since.

use std::{collections::BTreeMap, path::Path};

use anyhow::{bail, Context as _, Result};
use lb_userspace::{
    agent::wall_ms,
    fleet::{HostStatus, Install, InstallView, Service, Store},
};
use serde::Serialize;

use super::{fleet::connect, print};

/// The registry's services and the mod revision of each record.
async fn services(store: &mut Store) -> Result<(BTreeMap<String, Service>, BTreeMap<String, i64>)> {
    let mut services = BTreeMap::new();
    let mut revisions = BTreeMap::new();
    for (name, doc) in store.list(&store.keys.services()).await? {
        // An invalid record is skipped here; an install that names it is
        // refused (no such service).
        if let Ok(s) = Service::from_json(&name, &doc.text) {
            services.insert(name.clone(), s);
            revisions.insert(name, doc.revision);
        }
    }
    Ok((services, revisions))
}

async fn installs(store: &mut Store) -> Result<Vec<(Install, i64)>> {
    store
        .list(&store.keys.installs())
        .await?
        .into_iter()
        .map(|(key, doc)| {
            let i = Install::from_json(&key, &doc.text)?;
            Ok((i, doc.revision))
        })
        .collect()
}

/// Checks that `service` may replace its record: every install that names it
/// still holds. Returns the records the write must find unchanged.
pub(super) async fn check_service_change(
    store: &mut Store,
    service: &Service,
) -> Result<Vec<(String, i64)>> {
    let (mut all, revisions) = services(store).await?;
    let key = store.keys.service(&service.name);
    let own = store.get(&key).await?.map_or(0, |d| d.revision);
    all.insert(service.name.clone(), service.clone());
    let mut unchanged = vec![(key, own)];
    for (install, revision) in installs(store).await? {
        if install.from != service.name && install.to != service.name {
            continue;
        }
        install.check(&all).with_context(|| {
            format!(
                "refused: the install from {} to {} would no longer hold",
                install.from, install.to
            )
        })?;
        unchanged.push((store.keys.install(&install.from, &install.to), revision));
        for other in [&install.from, &install.to] {
            if other != &service.name {
                let rev = revisions.get(other).copied().unwrap_or(0);
                unchanged.push((store.keys.service(other), rev));
            }
        }
    }
    Ok(unchanged)
}

pub async fn install(file: Option<&Path>, from: String, to: String) -> Result<()> {
    let mut store = connect(file).await?;
    let (services, revisions) = services(&mut store).await?;
    let install = Install {
        from,
        to,
        created_ms: wall_ms(),
    };
    install
        .check(&services)
        .context("refused, nothing written")?;
    let key = store.keys.install(&install.from, &install.to);
    let mut unchanged = vec![(key.clone(), 0)];
    if store.get(&key).await?.is_some() {
        bail!(
            "an install from {} to {} exists already; nothing written",
            install.from,
            install.to
        );
    }
    for name in [&install.from, &install.to] {
        unchanged.push((store.keys.service(name), revisions[name]));
    }
    let text = serde_json::to_string(&install)?;
    if !store.put_if(&key, Some(&text), &unchanged).await? {
        bail!(
            "the registry changed while the install was being written; nothing written, try again"
        );
    }
    let hosts = install.hosts(&services);
    println!(
        "installed: {} -> {} on {} hosts ({})",
        install.from,
        install.to,
        hosts.len(),
        hosts.join(", ")
    );
    Ok(())
}

pub async fn uninstall(file: Option<&Path>, from: String, to: String) -> Result<()> {
    let mut store = connect(file).await?;
    let key = store.keys.install(&from, &to);
    let Some(doc) = store.get(&key).await? else {
        bail!("no install from {from} to {to}; nothing changed");
    };
    if !store
        .put_if(&key, None, &[(key.clone(), doc.revision)])
        .await?
    {
        bail!("the install changed while it was being removed; try again");
    }
    println!("uninstalled: {from} -> {to}");
    Ok(())
}

#[derive(Serialize)]
struct InstallsView {
    installs: Vec<InstallView>,
    hosts: Vec<HostStatus>,
}

pub async fn show(file: Option<&Path>, json: bool) -> Result<()> {
    let mut store = connect(file).await?;
    let (services, _) = services(&mut store).await?;
    let hosts = store
        .list(&store.keys.hosts())
        .await?
        .into_iter()
        .map(|(node, doc)| {
            serde_json::from_str(&doc.text).with_context(|| format!("the status of host {node}"))
        })
        .collect::<Result<Vec<HostStatus>>>()?;
    let installs = installs(&mut store)
        .await?
        .into_iter()
        .map(|(install, revision)| {
            let label = format!("{}/{}", install.from, install.to);
            let targets = install.hosts(&services);
            let pending = targets
                .iter()
                .filter(|node| {
                    !hosts.iter().any(|h| {
                        &&h.node == node
                            && h.installs.contains(&label)
                            && h.generation.is_some_and(|g| g >= revision)
                    })
                })
                .cloned()
                .collect();
            InstallView {
                hosts: targets,
                pending,
                install,
                revision,
            }
        })
        .collect();
    let view = InstallsView { installs, hosts };
    print(json, &view, |v| {
        for i in &v.installs {
            println!(
                "install {} -> {}  revision {}  hosts {}  pending {}",
                i.install.from,
                i.install.to,
                i.revision,
                i.hosts.join(","),
                if i.pending.is_empty() {
                    "none".to_string()
                } else {
                    i.pending.join(",")
                }
            );
        }
        println!();
        println!(
            "{:<20} {:>10} {:<24} {:<24}  ERROR",
            "HOST", "GENERATION", "INSTALLS", "INTERFACES"
        );
        for h in &v.hosts {
            let error = h.error.as_ref().map_or(String::new(), |e| {
                format!("at revision {}: {}", e.revision, e.message)
            });
            println!(
                "{:<20} {:>10} {:<24} {:<24}  {error}",
                h.node,
                h.generation.map_or("-".into(), |g| g.to_string()),
                h.installs.join(","),
                h.interfaces.join(",")
            );
        }
    })
}
