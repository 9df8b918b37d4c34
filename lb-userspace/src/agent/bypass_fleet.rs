//! A backend host's bypass from the fleet store (`[decap]` with `[fleet]`):
//! the client prefixes the host agents registered with their intermediary,
//! the services' bypass policies (for every VIP of the service) and, unless
//! the file gives a key file, the key ring. At every change of the store it
//! reads them at one revision and, if every record is valid, switches
//! `lb_decap`'s maps and the sender's keys to them; an invalid record
//! leaves everything as it was and is reported, with what is in force,
//! under `PREFIX/bypass/senders/NODE` (its lease).

use std::time::Duration;

use anyhow::Result;
use tracing::{info, warn};

use super::{bypass_send::SharedKeys, state::wall_ms};
use crate::{
    balancer::vip_key,
    config::FleetConfig,
    datapath::DestMaps,
    fleet::{
        bypass::{keys_from_store, sender_plan, SenderStatus},
        lease_answer, under, watch_answer, StatusError, Store, Versioned,
    },
    limits::LogEvery,
};

const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub(crate) struct Follower {
    pub(crate) maps: DestMaps,
    pub(crate) keys: SharedKeys,
    pub(crate) keys_from_store: bool,
    pub(crate) node: String,
    pub(crate) status: SenderStatus,
}

/// Follows the store until the agent stops (the task is aborted; the
/// status record goes with the lease).
pub(crate) async fn follow(mut f: Follower, fleet: FleetConfig) {
    let mut backoff = MIN_BACKOFF;
    let mut log = LogEvery::new(Duration::from_secs(60));
    loop {
        let started = tokio::time::Instant::now();
        if let Err(e) = f.session(&fleet).await {
            if log.ready().is_some() {
                warn!("bypass: fleet store: {e:#}; the bypass state in force stays, reconnecting");
            }
        }
        if started.elapsed() > MAX_BACKOFF * 3 {
            backoff = MIN_BACKOFF;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

impl Follower {
    async fn session(&mut self, fleet: &FleetConfig) -> Result<()> {
        let mut store = Store::connect(fleet).await?;
        let (lease, mut keeper, mut alive) = store.lease(fleet.lease_ttl_s).await?;
        let revision = self.converge(&mut store).await?;
        self.report(&mut store, lease).await?;
        let bypass_prefix = format!("{}bypass/", store.keys.all());
        let services = store.keys.services();
        let mut watch = store.watch_prefix(&store.keys.all(), revision + 1).await?;
        let mut renew = tokio::time::interval(Duration::from_secs(fleet.lease_ttl_s.div_ceil(3)));
        loop {
            let dirty = tokio::select! {
                _ = renew.tick() => { keeper.keep_alive().await?; false }
                msg = alive.message() => { lease_answer(msg)?; false }
                msg = watch.message() => watch_answer(msg, |k| {
                    (k.starts_with(&bypass_prefix) && !k.starts_with(&store.keys.bypass_senders()))
                        || k.starts_with(&services)
                })?,
            };
            if dirty {
                let before = self.status.clone();
                self.converge(&mut store).await?;
                if before != self.status {
                    self.report(&mut store, lease).await?;
                }
            }
        }
    }

    /// One read of the store, applied if every record is valid.
    async fn converge(&mut self, store: &mut Store) -> Result<i64> {
        let (all, revision) = store.list_at(&store.keys.all()).await?;
        let part = |prefix: &str| under(&all, prefix);
        let services = part("services/");
        let policies = part("bypass/policies/");
        let intermediaries = part("bypass/intermediaries/");
        let keys = all
            .iter()
            .find(|(k, _)| k == "bypass/keys")
            .map(|(_, v)| v.clone());
        let generation = services
            .iter()
            .chain(&policies)
            .chain(&intermediaries)
            .chain(keys.as_ref().map(|k| ("".to_string(), k.clone())).iter())
            .map(|(_, v)| v.revision)
            .max()
            .unwrap_or(0);
        match self.apply(&services, &policies, &intermediaries, keys.as_ref()) {
            Ok(()) => {
                self.status.generation = Some(generation);
                self.status.error = None;
            }
            Err(e) => {
                let message = format!("{e:#}");
                if self.status.error.as_ref().map(|x| &x.message) != Some(&message) {
                    warn!(
                        generation,
                        "bypass: store records not applied, the state in force stays: {message}"
                    );
                }
                self.status.error = Some(StatusError {
                    revision: generation,
                    message,
                });
            }
        }
        Ok(revision)
    }

    fn apply(
        &mut self,
        services: &[(String, Versioned)],
        policies: &[(String, Versioned)],
        intermediaries: &[(String, Versioned)],
        keys: Option<&Versioned>,
    ) -> Result<()> {
        let plan = sender_plan(services, policies, intermediaries)?;
        let ring = match (self.keys_from_store, keys) {
            (true, Some(k)) => Some(keys_from_store(&k.text)?),
            _ => None,
        };
        let vips: Vec<_> = plan
            .vips
            .iter()
            .map(|(a, p, proto, after)| (vip_key(*a, *p, *proto), *after))
            .collect();
        self.maps.replace(&plan.intermediaries, &vips)?;
        if self.keys_from_store {
            let mut held = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            // Keys deleted from the store: the ring in use stays (an
            // instruction in flight is still checked by its receiver).
            if let Some(ring) = ring {
                if format!("{:?}", held.as_ref()) != format!("{:?}", Some(&ring)) {
                    info!(keys = ?ring, "bypass: key ring from the store");
                }
                *held = Some(ring);
            }
        }
        self.status.intermediaries = plan
            .intermediaries
            .iter()
            .map(|(p, a)| format!("{p} -> {a}"))
            .collect();
        self.status.vips = plan
            .vips
            .iter()
            .map(|(a, p, proto, after)| {
                format!(
                    "{}/{proto} after {after}",
                    std::net::SocketAddr::new(*a, *p)
                )
            })
            .collect();
        self.status.keys = self
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|k| format!("{k:?}"));
        Ok(())
    }

    async fn report(&mut self, store: &mut Store, lease: i64) -> Result<()> {
        self.status.node = self.node.clone();
        self.status.updated_ms = wall_ms();
        let key = store.keys.bypass_sender(&self.node);
        store
            .put(&key, &serde_json::to_string(&self.status)?, Some(lease))
            .await?;
        Ok(())
    }
}
