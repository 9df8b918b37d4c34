//! `lbctl fleet ...` and `lbctl service ...`: the fleet's etcd store, reached
//! with the `[fleet]` section of the file `--fleet` names.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use clap::Subcommand;
use lb_userspace::{
    config::{FleetConfig, RawVipDocument},
    fleet::{parse_instance, parse_vip, NodeRecord, Service, StatusRecord, Store},
};
use serde::Serialize;

use super::print;

#[derive(Subcommand)]
pub enum FleetAction {
    /// Registered agents and what each reports it applied.
    Nodes {
        #[arg(long)]
        json: bool,
    },
    /// The VIP document every balancer of the fleet applies.
    Vips {
        #[command(subcommand)]
        action: VipsAction,
    },
}

#[derive(Subcommand)]
pub enum VipsAction {
    /// Validate a TOML file of `[[vips]]` and write it to the store.
    Set {
        #[arg(long, short)]
        file: PathBuf,
    },
    /// The document in the store and its revision.
    Show {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ServiceAction {
    /// Write a service's instances (replacing those in the store).
    Set {
        name: String,
        /// ADDR:PORT[,weight=W][,node=N] (repeatable).
        #[arg(long = "instance", required = true)]
        instances: Vec<String>,
        /// ADDR:PORT[/tcp|/udp]: where callers reach the service (repeatable).
        #[arg(long = "vip")]
        vips: Vec<String>,
    },
    /// One service, or all of them.
    Show {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn connect(file: Option<&Path>) -> Result<Store> {
    let file = file.ok_or_else(|| {
        anyhow!("fleet commands need --fleet FILE (or LBCTL_FLEET): a TOML file with a [fleet] section, such as the agent's configuration")
    })?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let cfg = FleetConfig::from_toml_section(&text)
        .with_context(|| format!("invalid fleet settings in {}", file.display()))?;
    Store::connect(&cfg).await
}

/// A registered node with the status it reported.
#[derive(Serialize)]
struct NodeView {
    #[serde(flatten)]
    node: NodeRecord,
    status: Option<StatusRecord>,
}

#[derive(Serialize)]
struct VipsView {
    revision: Option<i64>,
    document: Option<String>,
}

pub async fn run_fleet(file: Option<&Path>, action: FleetAction) -> Result<()> {
    match action {
        FleetAction::Nodes { json } => {
            let mut store = connect(file).await?;
            let nodes = store.list(&store.keys.nodes()).await?;
            let statuses = store.list(&store.keys.statuses()).await?;
            let mut views = Vec::new();
            for (name, v) in nodes {
                let node: NodeRecord = serde_json::from_str(&v.text)
                    .with_context(|| format!("the record of node {name}"))?;
                let status = statuses
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, s)| serde_json::from_str(&s.text))
                    .transpose()
                    .with_context(|| format!("the status of node {name}"))?;
                views.push(NodeView { node, status });
            }
            print(json, &views, |views| print_nodes(views))
        }
        FleetAction::Vips {
            action: VipsAction::Set { file: doc },
        } => {
            let text = std::fs::read_to_string(&doc)
                .with_context(|| format!("reading {}", doc.display()))?;
            // The balancers check it again against their own settings.
            let vips = RawVipDocument::from_toml(&text)
                .and_then(RawVipDocument::validate_alone)
                .with_context(|| format!("invalid VIP document {}", doc.display()))?;
            let mut store = connect(file).await?;
            let key = store.keys.vips();
            let revision = store.put(&key, &text, None).await?;
            println!("{key}: {} VIPs written at revision {revision}", vips.len());
            Ok(())
        }
        FleetAction::Vips {
            action: VipsAction::Show { json },
        } => {
            let mut store = connect(file).await?;
            let doc = store.get(&store.keys.vips()).await?;
            let view = VipsView {
                revision: doc.as_ref().map(|d| d.revision),
                document: doc.map(|d| d.text),
            };
            print(json, &view, |v| match (&v.revision, &v.document) {
                (Some(r), Some(d)) => println!("# revision {r}\n{d}"),
                _ => println!("no VIP document in the store"),
            })
        }
    }
}

fn print_nodes(views: &[NodeView]) {
    println!(
        "{:<20} {:<12} {:>8} {:<8} {:>10}  VIPS / ERROR",
        "NODE", "ROLES", "PID", "VERSION", "GENERATION"
    );
    for v in views {
        let (generation, detail) = match &v.status {
            Some(s) => (
                s.generation.map_or("-".into(), |g| g.to_string()),
                match &s.error {
                    Some(e) => format!(
                        "{} | error at revision {}: {}",
                        s.vips.join(","),
                        e.revision,
                        e.message
                    ),
                    None => s.vips.join(","),
                },
            ),
            None => ("-".into(), String::new()),
        };
        println!(
            "{:<20} {:<12} {:>8} {:<8} {:>10}  {detail}",
            v.node.node,
            v.node.roles.join(","),
            v.node.pid,
            v.node.version,
            generation
        );
    }
}

pub async fn run_service(file: Option<&Path>, action: ServiceAction) -> Result<()> {
    match action {
        ServiceAction::Set {
            name,
            instances,
            vips,
        } => {
            let instances = instances
                .iter()
                .enumerate()
                .map(|(i, text)| parse_instance(&format!("instance[{i}]"), text))
                .collect::<Result<Vec<_>, _>>()
                .context("invalid service")?;
            let vips = vips
                .iter()
                .enumerate()
                .map(|(i, text)| parse_vip(&format!("vip[{i}]"), text))
                .collect::<Result<Vec<_>, _>>()
                .context("invalid service")?;
            let service = Service {
                name,
                instances,
                vips,
            };
            service.validate().context("invalid service")?;
            let mut store = connect(file).await?;
            let key = store.keys.service(&service.name);
            let unchanged = super::install::check_service_change(&mut store, &service).await?;
            let text = serde_json::to_string(&service)?;
            if !store.put_if(&key, Some(&text), &unchanged).await? {
                anyhow::bail!(
                    "the registry changed while {key} was being written; nothing written, try again"
                );
            }
            println!(
                "{key}: {} instances, {} VIPs written",
                service.instances.len(),
                service.vips.len()
            );
            Ok(())
        }
        ServiceAction::Show { name, json } => {
            let mut store = connect(file).await?;
            let services = match &name {
                Some(name) => {
                    let doc = store
                        .get(&store.keys.service(name))
                        .await?
                        .ok_or_else(|| anyhow!("no service {name:?} in the store"))?;
                    vec![Service::from_json(name, &doc.text)?]
                }
                None => store
                    .list(&store.keys.services())
                    .await?
                    .into_iter()
                    .map(|(name, doc)| Service::from_json(&name, &doc.text))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            print(json, &services, |services| {
                for s in services {
                    let vips: Vec<String> = s.vips.iter().map(|v| v.to_string()).collect();
                    println!("service {}  vips {}", s.name, vips.join(" "));
                    for i in &s.instances {
                        println!(
                            "  {:<24} weight {:>5}  node {}",
                            i.address.to_string(),
                            i.weight,
                            i.node.as_deref().unwrap_or("-")
                        );
                    }
                }
            })
        }
    }
}
