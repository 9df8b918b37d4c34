//! The agent's part in a fleet: it registers under a lease, and a balancer
//! watches the store's VIP document, applies each new one as `lbctl apply`
//! would, and reports what it applied. While the store is unreachable the
//! datapath forwards with the last state and the loop reconnects with backoff.
//! A stopping agent revokes its lease, so its records go at once.
//!
//! The last document applied is kept beside the lifecycle state file, so an
//! agent that restarts while the store is unreachable starts with the VIPs in
//! force (an adopted datapath keeps them) instead of its file's.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use etcd_client::{EventType, WatchResponse, WatchStream};
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{info, warn};

use super::{control, state::wall_ms, Shared};
use crate::{
    config::{BalancerConfig, Config, FleetConfig, RawVipDocument},
    fleet::{HealthRecord, NodeRecord, StatusError, StatusRecord, Store, Versioned},
    limits::LogEvery,
    nexthop::Resolver,
};

const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// While the store stays unreachable, one warning per this period.
const LOG_PERIOD: Duration = Duration::from_secs(60);
/// How often a balancer compares its health verdicts with those it
/// published.
const HEALTH_PUBLISH: Duration = Duration::from_millis(250);
/// Time a stopping agent gives the store to revoke its lease.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the last VIP document applied is kept.
fn cache_path(b: &BalancerConfig) -> PathBuf {
    b.state_file.with_extension("fleet-vips.toml")
}

/// Replaces the file's VIPs with the last document applied from the store,
/// if one was kept and is still valid for this balancer.
pub(super) fn start_with_cached_vips(config: &mut Config) {
    if config.fleet.is_none() {
        return;
    }
    let Some(b) = config.balancer.as_mut() else {
        return;
    };
    let path = cache_path(b);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    match RawVipDocument::from_toml(&text).and_then(|d| d.validate_for(b)) {
        Ok(vips) => {
            info!(path = %path.display(), vips = vips.len(), "starting with the VIPs last applied from the fleet store");
            b.vips = vips;
        }
        Err(e) => {
            warn!(path = %path.display(), "the kept VIP document is not valid, not used: {e}")
        }
    }
}

/// Keeps the document applied (written atomically); a failure is logged.
fn keep(b: &BalancerConfig, text: &str) {
    let path = cache_path(b);
    let tmp = path.with_extension("new");
    let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        warn!(path = %path.display(), "keeping the applied VIP document: {e}");
    }
}

/// What the balancer took from the store, kept across reconnections.
#[derive(Debug, Default)]
struct Applied {
    /// Mod revision of the VIP document in force.
    generation: Option<i64>,
    /// Why the newest document was not applied.
    error: Option<StatusError>,
}

/// The running fleet loop: `leave` ends it, revoking its lease so that the
/// node's records go at once rather than when the lease runs out.
pub(super) struct Membership {
    stop: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Membership {
    pub(super) fn spawn(state: Shared, resolver: Arc<Resolver>, cfg: FleetConfig) -> Membership {
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(run(state, resolver, cfg, stop.clone()));
        Membership { stop, task }
    }

    /// Revokes the lease if the store answers within `LEAVE_TIMEOUT`.
    pub(super) async fn leave(self) {
        self.stop.notify_one();
        let mut task = self.task;
        if tokio::time::timeout(LEAVE_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Runs until `stop` is notified.
async fn run(state: Shared, resolver: Arc<Resolver>, cfg: FleetConfig, stop: Arc<Notify>) {
    let mut applied = Applied::default();
    let mut backoff = MIN_BACKOFF;
    let mut warnings = LogEvery::new(LOG_PERIOD);
    loop {
        let started = Instant::now();
        let e = match session(&state, &resolver, &cfg, &mut applied, &stop).await {
            Ok(()) => return,
            Err(e) => e,
        };
        if started.elapsed() > MAX_BACKOFF * 3 {
            backoff = MIN_BACKOFF;
        }
        if let Some(held) = warnings.ready() {
            warn!(
                failures_not_logged = held,
                "fleet store: {e:#}; forwarding with the last state, reconnecting (one warning per {} s)",
                LOG_PERIOD.as_secs()
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.notified() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection to the store, until it fails (an error) or `stop` is
/// notified (the lease revoked, `Ok`).
async fn session(
    state: &Shared,
    resolver: &Resolver,
    cfg: &FleetConfig,
    applied: &mut Applied,
    stop: &Notify,
) -> Result<()> {
    let mut store = Store::connect(cfg).await?;
    let (lease, mut keeper, mut alive) = store.lease(cfg.lease_ttl_s).await?;
    let record = node_record(state, cfg).await;
    let node_key = store.keys.node(&cfg.node);
    store
        .put(&node_key, &serde_json::to_string(&record)?, Some(lease))
        .await?;
    info!(node = cfg.node, lease, "registered in the fleet store");
    let balancer = state.lock().await.config.balancer.is_some();
    let mut watch = None;
    if balancer {
        let vips_key = store.keys.vips();
        let (doc, revision) = store.get_at(&vips_key).await?;
        if let Some(doc) = doc {
            consider(state, resolver, applied, &doc).await;
        }
        report(&mut store, state, cfg, applied, lease).await?;
        watch = Some(store.watch(&vips_key, revision + 1).await?);
    }
    let mut renew = tokio::time::interval(Duration::from_secs(cfg.lease_ttl_s.div_ceil(3)));
    let mut health_tick = tokio::time::interval(HEALTH_PUBLISH);
    let mut published: Option<HealthRecord> = None;
    loop {
        tokio::select! {
            _ = health_tick.tick(), if balancer => {
                publish_health(&mut store, state, cfg, lease, &mut published).await?;
            }
            _ = stop.notified() => {
                match store.revoke(lease).await {
                    Ok(()) => info!(node = cfg.node, "left the fleet store (lease revoked)"),
                    Err(e) => warn!("leaving the fleet store: {e:#}; the lease runs out by itself"),
                }
                return Ok(());
            }
            _ = renew.tick() => keeper.keep_alive().await?,
            msg = alive.message() => match msg? {
                Some(r) if r.ttl() > 0 => {}
                Some(_) => bail!("the lease expired"),
                None => bail!("the lease keep-alive stream ended"),
            },
            msg = next_change(watch.as_mut()) => {
                let resp = msg?.ok_or_else(|| anyhow!("the watch ended"))?;
                if resp.canceled() {
                    bail!("the watch was cancelled: {}", resp.cancel_reason());
                }
                if changes(state, resolver, applied, &resp).await {
                    report(&mut store, state, cfg, applied, lease).await?;
                }
            }
        }
    }
}

async fn next_change(
    stream: Option<&mut WatchStream>,
) -> Result<Option<WatchResponse>, etcd_client::Error> {
    match stream {
        Some(s) => s.message().await,
        None => std::future::pending().await,
    }
}

/// Applies the newest document of a watch response; true when something
/// changed that the status must show.
async fn changes(
    state: &Shared,
    resolver: &Resolver,
    applied: &mut Applied,
    resp: &WatchResponse,
) -> bool {
    let Some(event) = resp.events().last() else {
        return false;
    };
    let Some(kv) = event.kv() else {
        return false;
    };
    match event.event_type() {
        EventType::Put => match kv.value_str() {
            Ok(text) => {
                let doc = Versioned {
                    text: text.to_string(),
                    revision: kv.mod_revision(),
                };
                consider(state, resolver, applied, &doc).await;
            }
            Err(e) => {
                refuse(applied, kv.mod_revision(), format!("not UTF-8: {e}"));
            }
        },
        EventType::Delete => refuse(
            applied,
            kv.mod_revision(),
            "the VIP document was deleted; the VIPs in force stay".into(),
        ),
    }
    true
}

fn refuse(applied: &mut Applied, revision: i64, message: String) {
    warn!(
        revision,
        "VIP document from the fleet store not applied: {message}"
    );
    applied.error = Some(StatusError { revision, message });
}

/// Validates `doc` against this balancer's settings and switches to it; an
/// invalid document leaves the VIPs in force.
async fn consider(state: &Shared, resolver: &Resolver, applied: &mut Applied, doc: &Versioned) {
    if applied.generation == Some(doc.revision)
        || applied
            .error
            .as_ref()
            .is_some_and(|e| e.revision == doc.revision)
    {
        return;
    }
    let mut new = state.lock().await.config.clone();
    let Some(b) = new.balancer.as_mut() else {
        return;
    };
    let vips = RawVipDocument::from_toml(&doc.text).and_then(|d| d.validate_for(b));
    let kept = b.clone();
    let result = match vips {
        Ok(vips) => {
            b.vips = vips;
            control::switch(new, state, resolver).await
        }
        Err(e) => Err(e.into()),
    };
    if result.is_ok() {
        keep(&kept, &doc.text);
    }
    match result {
        Ok(summary) => {
            info!(
                revision = doc.revision,
                ?summary,
                "VIP document from the fleet store applied"
            );
            applied.generation = Some(doc.revision);
            applied.error = None;
        }
        Err(e) => refuse(applied, doc.revision, format!("{e:#}")),
    }
}

/// Writes `PREFIX/status/NODE`, and the node record (its addresses follow
/// the VIPs in force), under the lease.
async fn report(
    store: &mut Store,
    state: &Shared,
    cfg: &FleetConfig,
    applied: &Applied,
    lease: i64,
) -> Result<()> {
    let record = node_record(state, cfg).await;
    let key = store.keys.node(&cfg.node);
    store
        .put(&key, &serde_json::to_string(&record)?, Some(lease))
        .await?;
    let vips = match &state.lock().await.config.balancer {
        Some(b) => b.vips.iter().map(|v| v.name.clone()).collect(),
        None => Vec::new(),
    };
    let record = StatusRecord {
        node: cfg.node.clone(),
        generation: applied.generation,
        vips,
        error: applied.error.clone(),
        updated_ms: wall_ms(),
    };
    let key = store.keys.status(&cfg.node);
    store
        .put(&key, &serde_json::to_string(&record)?, Some(lease))
        .await?;
    Ok(())
}

/// The balancer's health verdicts on the backends it checks (VIPs with a
/// health check); `None` when it checks none.
async fn health_record(state: &Shared, node: &str) -> Option<HealthRecord> {
    let st = state.lock().await;
    let (Some(b), Some(bal)) = (&st.config.balancer, &st.balancer) else {
        return None;
    };
    let mut checked = std::collections::BTreeSet::new();
    let mut down = std::collections::BTreeSet::new();
    for v in b.vips.iter().filter(|v| v.health.is_some()) {
        let Ok(vip) = bal.vip_named(&v.name) else {
            continue;
        };
        for x in &v.backends {
            checked.insert(x.address);
            if !bal.up(vip, x.address) {
                down.insert(x.address);
            }
        }
    }
    (!checked.is_empty()).then(|| HealthRecord {
        node: node.to_string(),
        checked: checked.into_iter().collect(),
        down: down.into_iter().collect(),
        updated_ms: 0,
    })
}

/// Publishes the verdicts under `PREFIX/health/NODE` (the agent's lease:
/// a dead checker's opinion goes with it) when they changed.
async fn publish_health(
    store: &mut Store,
    state: &Shared,
    cfg: &FleetConfig,
    lease: i64,
    published: &mut Option<HealthRecord>,
) -> Result<()> {
    let Some(mut record) = health_record(state, &cfg.node).await else {
        return Ok(());
    };
    if published
        .as_ref()
        .is_some_and(|p| (&p.checked, &p.down) == (&record.checked, &record.down))
    {
        return Ok(());
    }
    record.updated_ms = wall_ms();
    let key = store.keys.health(&cfg.node);
    store
        .put(&key, &serde_json::to_string(&record)?, Some(lease))
        .await?;
    info!(down = ?record.down, "health verdicts published to the fleet store");
    *published = Some(record);
    Ok(())
}

async fn node_record(state: &Shared, cfg: &FleetConfig) -> NodeRecord {
    let st = state.lock().await;
    let mut roles = Vec::new();
    let mut addresses = Vec::new();
    if let Some(b) = &st.config.balancer {
        roles.push("lb".to_string());
        addresses.extend(b.vips.iter().map(|v| v.address.to_string()));
    }
    if st.config.host.is_some() {
        roles.push("host".to_string());
    }
    if let Some(d) = &st.config.decap {
        roles.push("backend".to_string());
        addresses.extend(d.addresses.iter().map(|a| a.to_string()));
    }
    let mut seen = std::collections::HashSet::new();
    addresses.retain(|a| seen.insert(a.clone()));
    NodeRecord {
        node: cfg.node.clone(),
        roles,
        addresses,
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        updated_ms: wall_ms(),
    }
}
