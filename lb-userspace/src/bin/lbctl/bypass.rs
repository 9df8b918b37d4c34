//! `lbctl bypass ...`: bypass in the fleet store: per-service policies, the
//! key ring, and what intermediaries and senders registered.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Subcommand;
use lb_userspace::fleet::{
    bypass::{keys_from_store, IntermediaryRecord, PolicyRecord, SenderStatus},
    Service,
};
use serde::Serialize;

use super::{fleet::connect, print};

#[derive(Subcommand)]
pub enum BypassAction {
    /// Set a service's bypass policy (every VIP of the service whose
    /// protocol is listed).
    Set {
        service: String,
        /// Packets of a flow the LB forwards before the instruction (1..=1000, default 1).
        #[arg(long)]
        after_packets: Option<i64>,
        /// tcp or udp (repeatable; default: the protocol of the service's first VIP).
        #[arg(long = "protocol")]
        protocols: Vec<String>,
    },
    /// Remove a service's bypass policy: its flows are no longer bypassed
    /// from their next instruction on (entries in force end with their flows).
    Unset { service: String },
    /// The key ring that seals instructions.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Policies, key ids, registered intermediaries and the senders' state.
    Show {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum KeysAction {
    /// Validate a key file (`active`, `[[keys]] id, secret`) and write it.
    Set {
        #[arg(long, short)]
        file: PathBuf,
    },
}

#[derive(Serialize)]
struct BypassView {
    policies: Vec<PolicyRecord>,
    /// Key ids and the active one (never the secrets).
    keys: Option<String>,
    keys_revision: Option<i64>,
    intermediaries: Vec<IntermediaryRecord>,
    senders: Vec<SenderStatus>,
    /// Records that do not validate (the agents keep their last good state).
    invalid: Vec<String>,
}

pub async fn run(file: Option<&Path>, action: BypassAction) -> Result<()> {
    match action {
        BypassAction::Set {
            service,
            after_packets,
            protocols,
        } => {
            let mut store = connect(file).await?;
            let skey = store.keys.service(&service);
            let doc = store
                .get(&skey)
                .await?
                .ok_or_else(|| anyhow!("service: no service named {service:?}"))?;
            let s = Service::from_json(&service, &doc.text)?;
            let protocols = (!protocols.is_empty()).then_some(protocols);
            let record =
                PolicyRecord::new(&s, after_packets, protocols).context("invalid bypass policy")?;
            let key = store.keys.bypass_policy(&service);
            let own = store.get(&key).await?.map_or(0, |d| d.revision);
            let text = serde_json::to_string(&record)?;
            if !store
                .put_if(
                    &key,
                    Some(&text),
                    &[(skey, doc.revision), (key.clone(), own)],
                )
                .await?
            {
                bail!("the service or its policy changed meanwhile; nothing written, try again");
            }
            println!("{key}: after {} packets", record.after_packets);
            Ok(())
        }
        BypassAction::Unset { service } => {
            let mut store = connect(file).await?;
            let key = store.keys.bypass_policy(&service);
            if store.get(&key).await?.is_none() {
                bail!("service: {service:?} has no bypass policy");
            }
            store.delete(&key).await?;
            println!("{key}: removed");
            Ok(())
        }
        BypassAction::Keys {
            action: KeysAction::Set { file: keys },
        } => {
            let text = std::fs::read_to_string(&keys)
                .with_context(|| format!("reading {}", keys.display()))?;
            let ring = keys_from_store(&text)
                .with_context(|| format!("invalid key file {}", keys.display()))?;
            let mut store = connect(file).await?;
            let key = store.keys.bypass_keys();
            let revision = store.put(&key, &text, None).await?;
            println!("{key}: {ring:?} written at revision {revision}");
            Ok(())
        }
        BypassAction::Show { json } => {
            let mut store = connect(file).await?;
            let view = show(&mut store).await?;
            print(json, &view, print_view)
        }
    }
}

async fn show(store: &mut lb_userspace::fleet::Store) -> Result<BypassView> {
    let parse = |what: &str, k: &str, text: &str| anyhow!("{what}{k}: not readable: {text}");
    let mut invalid = Vec::new();
    let mut policies = Vec::new();
    for (k, v) in store.list(&store.keys.bypass_policies()).await? {
        match PolicyRecord::from_json(&k, &v.text) {
            Ok(p) => policies.push(p),
            Err(e) => invalid.push(e.to_string()),
        }
    }
    let keys = store.get(&store.keys.bypass_keys()).await?;
    let mut intermediaries = Vec::new();
    for (k, v) in store.list(&store.keys.bypass_intermediaries()).await? {
        match IntermediaryRecord::from_json(&k, &v.text) {
            Ok(r) => intermediaries.push(r),
            Err(e) => invalid.push(e.to_string()),
        }
    }
    let mut senders = Vec::new();
    for (k, v) in store.list(&store.keys.bypass_senders()).await? {
        senders.push(
            serde_json::from_str(&v.text)
                .map_err(|e| parse("bypass/senders/", &k, &e.to_string()))?,
        );
    }
    Ok(BypassView {
        policies,
        keys: keys.as_ref().map(|k| match keys_from_store(&k.text) {
            Ok(ring) => format!("{ring:?}"),
            Err(e) => format!("invalid: {e}"),
        }),
        keys_revision: keys.map(|k| k.revision),
        intermediaries,
        senders,
        invalid,
    })
}

fn print_view(v: &BypassView) {
    for p in &v.policies {
        let protocols: Vec<String> = p.protocols.iter().map(|x| x.to_string()).collect();
        println!(
            "policy {:<16} after {:>4} packets  {}",
            p.service,
            p.after_packets,
            protocols.join(",")
        );
    }
    match (&v.keys, v.keys_revision) {
        (Some(k), Some(r)) => println!("keys   {k} (revision {r})"),
        _ => println!("keys   none in the store"),
    }
    for i in &v.intermediaries {
        let prefixes: Vec<String> = i.prefixes.iter().map(|p| p.to_string()).collect();
        println!(
            "intermediary {:<12} {} -> {}",
            i.node,
            prefixes.join(" "),
            i.address
        );
    }
    for e in &v.invalid {
        println!("invalid {e}");
    }
    for s in &v.senders {
        let state = match &s.error {
            Some(e) => format!("error at revision {}: {}", e.revision, e.message),
            None => format!("generation {}", s.generation.unwrap_or(0)),
        };
        println!(
            "sender {:<12} {state}; {} prefixes, VIPs: {}",
            s.node,
            s.intermediaries.len(),
            s.vips.join(", ")
        );
    }
}
