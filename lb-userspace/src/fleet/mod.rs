//! The fleet store: etcd v3 over TLS, its key schema and the records kept
//! there. The agent's fleet loop (`agent/fleet.rs`) and `lbctl fleet` /
//! `lbctl service` use it; it knows nothing of the agent.
//!
//! Keys, under the configured prefix (default `/lb`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `PREFIX/nodes/NODE` | [`NodeRecord`] (JSON) | the agent's |
//! | `PREFIX/vips` | the VIP document: TOML with `[[vips]]` | none |
//! | `PREFIX/status/NODE` | [`StatusRecord`] (JSON) | the agent's |
//! | `PREFIX/services/NAME` | [`Service`] (JSON) | none |
//! | `PREFIX/installs/FROM/TO` | [`Install`] (JSON) | none |
//! | `PREFIX/health/NODE` | [`HealthRecord`] (JSON): a checker's verdicts | the checker's |
//! | `PREFIX/hosts/NODE` | [`HostStatus`] (JSON): what a host applied | the host's |
//! | `PREFIX/bypass/...` | bypass policies, keys, intermediaries (see `bypass`) | |
//!
//! - `service`: the service registry's records and their validation.
//! - `bypass`: bypass policies, keys and intermediaries, and what a
//!   backend host works out from them.
//! - `install`: installs, published health, host status, and the plan a
//!   host works out from them.

pub mod bypass;
mod install;
mod service;

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity,
    LeaseKeepAliveResponse, LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp,
    WatchOptions, WatchResponse, WatchStream,
};
use serde::{Deserialize, Serialize};

pub use install::{combine_health, plan, HealthRecord, HostPlan, HostStatus, Install, InstallView};
pub use service::{parse_instance, parse_vip, Instance, Service, ServiceVip};

use crate::config::FleetConfig;

/// Time any single request to the store may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time one endpoint has to accept a connection and answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A registered agent (`PREFIX/nodes/NODE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    /// `lb` (runs the balancer), `backend` (runs lb_decap), or both.
    pub roles: Vec<String>,
    /// The balancer's VIP addresses and the decapsulated addresses.
    pub addresses: Vec<String>,
    pub pid: u32,
    pub version: String,
    /// Unix time in ms when the record was last written (at registration,
    /// and with each status report of a balancer).
    pub updated_ms: u64,
}

/// What an agent applied from the store (`PREFIX/status/NODE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatusRecord {
    pub node: String,
    /// The etcd mod revision of the VIP document in force on this node;
    /// `None` while it runs the VIPs of its file.
    pub generation: Option<i64>,
    /// VIP names in force.
    pub vips: Vec<String>,
    /// Why the newest document was not applied (its revision and the error).
    pub error: Option<StatusError>,
    pub updated_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusError {
    pub revision: i64,
    pub message: String,
}

/// A key's text and its etcd mod revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub text: String,
    pub revision: i64,
}

/// The entries of `all` (a `list_at` of every key) under `prefix`, with the
/// prefix taken off.
pub fn under(all: &[(String, Versioned)], prefix: &str) -> Vec<(String, Versioned)> {
    all.iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
        .collect()
}

/// A lease keep-alive answer (`LeaseKeepAliveStream::message`): an error
/// once the lease expired or its stream ended.
pub fn lease_answer(
    msg: std::result::Result<Option<LeaseKeepAliveResponse>, etcd_client::Error>,
) -> Result<()> {
    match msg? {
        Some(r) if r.ttl() > 0 => Ok(()),
        Some(_) => bail!("the lease expired"),
        None => bail!("the lease keep-alive stream ended"),
    }
}

/// A watch answer (`WatchStream::message`): whether one of its events is
/// for a key `concerns` accepts; an error once the watch ended or was
/// cancelled.
pub fn watch_answer(
    msg: std::result::Result<Option<WatchResponse>, etcd_client::Error>,
    concerns: impl Fn(&str) -> bool,
) -> Result<bool> {
    let resp = msg?.ok_or_else(|| anyhow!("the watch ended"))?;
    if resp.canceled() {
        bail!("the watch was cancelled: {}", resp.cancel_reason());
    }
    Ok(resp
        .events()
        .iter()
        .filter_map(|e| e.kv())
        .any(|kv| kv.key_str().is_ok_and(&concerns)))
}

/// The store's keys under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }
    pub fn vips(&self) -> String {
        format!("{}/vips", self.prefix)
    }
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }
    pub fn node(&self, node: &str) -> String {
        format!("{}{node}", self.nodes())
    }
    pub fn statuses(&self) -> String {
        format!("{}/status/", self.prefix)
    }
    pub fn status(&self, node: &str) -> String {
        format!("{}{node}", self.statuses())
    }
    pub fn services(&self) -> String {
        format!("{}/services/", self.prefix)
    }
    pub fn service(&self, name: &str) -> String {
        format!("{}{name}", self.services())
    }
    pub fn installs(&self) -> String {
        format!("{}/installs/", self.prefix)
    }
    pub fn install(&self, from: &str, to: &str) -> String {
        format!("{}{from}/{to}", self.installs())
    }
    pub fn healths(&self) -> String {
        format!("{}/health/", self.prefix)
    }
    pub fn health(&self, node: &str) -> String {
        format!("{}{node}", self.healths())
    }
    pub fn hosts(&self) -> String {
        format!("{}/hosts/", self.prefix)
    }
    pub fn host(&self, node: &str) -> String {
        format!("{}{node}", self.hosts())
    }
    pub fn bypass_policies(&self) -> String {
        format!("{}/bypass/policies/", self.prefix)
    }
    pub fn bypass_policy(&self, service: &str) -> String {
        format!("{}{service}", self.bypass_policies())
    }
    pub fn bypass_keys(&self) -> String {
        format!("{}/bypass/keys", self.prefix)
    }
    pub fn bypass_intermediaries(&self) -> String {
        format!("{}/bypass/intermediaries/", self.prefix)
    }
    pub fn bypass_intermediary(&self, node: &str) -> String {
        format!("{}{node}", self.bypass_intermediaries())
    }
    pub fn bypass_senders(&self) -> String {
        format!("{}/bypass/senders/", self.prefix)
    }
    pub fn bypass_sender(&self, node: &str) -> String {
        format!("{}{node}", self.bypass_senders())
    }
    /// Every key of the fleet (a watch on it sees every change).
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }
}

/// `fut` within `REQUEST_TIMEOUT`, with `what` in the error.
async fn timed<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r.with_context(|| format!("etcd: {what}")),
        Err(_) => Err(anyhow!(
            "etcd: {what}: no answer within {} s",
            REQUEST_TIMEOUT.as_secs()
        )),
    }
}

/// A connection to the fleet's etcd.
pub struct Store {
    client: Client,
    pub keys: Keys,
}

impl Store {
    /// Connects over TLS with the configured client certificate to the
    /// first endpoint that answers, trying each in turn (a dead member of
    /// the cluster is skipped). Fails when none answers.
    pub async fn connect(cfg: &FleetConfig) -> Result<Store> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))
        };
        let (ca, cert, key) = (read(&cfg.ca)?, read(&cfg.cert)?, read(&cfg.key)?);
        // Successive connections start at successive endpoints, so clients
        // spread over the members and one that keeps failing is not always
        // tried first.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let start = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = cfg.endpoints.len();
        let mut errors = Vec::new();
        for k in 0..n {
            let endpoint = &cfg.endpoints[(start + k) % n];
            let tls = TlsOptions::new()
                .ca_certificate(Certificate::from_pem(ca.clone()))
                .identity(Identity::from_pem(cert.clone(), key.clone()));
            match Store::connect_one(endpoint, tls, &cfg.prefix).await {
                Ok(store) => return Ok(store),
                Err(e) => errors.push(format!("{endpoint}: {e:#}")),
            }
        }
        Err(anyhow!(
            "no etcd endpoint answered: {}. Check that etcd runs and is reachable from this host (`etcdctl --endpoints ... endpoint health` with the same certificates), and the [fleet] endpoints, ca, cert and key settings",
            errors.join("; ")
        ))
    }

    async fn connect_one(endpoint: &str, tls: TlsOptions, prefix: &str) -> Result<Store> {
        let options = ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let client = timed("connecting", Client::connect([endpoint], Some(options))).await?;
        let mut store = Store {
            client,
            keys: Keys::new(prefix),
        };
        // The channel connects lazily: one request proves the store answers.
        match tokio::time::timeout(CONNECT_TIMEOUT, store.client.status()).await {
            Ok(r) => r.context("etcd: status")?,
            Err(_) => bail!("etcd: no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        };
        Ok(store)
    }

    pub async fn get(&mut self, key: &str) -> Result<Option<Versioned>> {
        Ok(self.get_at(key).await?.0)
    }

    /// `key`'s value, and the store's revision when it was read (a watch
    /// from the next one misses nothing).
    pub async fn get_at(&mut self, key: &str) -> Result<(Option<Versioned>, i64)> {
        let resp = timed("get", self.client.get(key, None)).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let value = match resp.kvs().first() {
            Some(kv) => Some(Versioned {
                text: kv.value_str()?.to_string(),
                revision: kv.mod_revision(),
            }),
            None => None,
        };
        Ok((value, revision))
    }

    /// Every key under `prefix`, with the part after the prefix and the value.
    pub async fn list(&mut self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        Ok(self.list_at(prefix).await?.0)
    }

    /// `list`, and the store's revision when it was read.
    pub async fn list_at(&mut self, prefix: &str) -> Result<(Vec<(String, Versioned)>, i64)> {
        let options = GetOptions::new().with_prefix();
        let resp = timed("get", self.client.get(prefix, Some(options))).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let items = resp
            .kvs()
            .iter()
            .map(|kv| {
                let key = kv.key_str()?;
                Ok((
                    key.strip_prefix(prefix).unwrap_or(key).to_string(),
                    Versioned {
                        text: kv.value_str()?.to_string(),
                        revision: kv.mod_revision(),
                    },
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((items, revision))
    }

    /// Writes `value` to `key` (deletes `key` when `value` is `None`) only
    /// if every key of `unchanged` still has the mod revision given (0: the
    /// key does not exist). Returns whether it was written.
    pub async fn put_if(
        &mut self,
        key: &str,
        value: Option<&str>,
        unchanged: &[(String, i64)],
    ) -> Result<bool> {
        let compares: Vec<Compare> = unchanged
            .iter()
            .map(|(k, rev)| Compare::mod_revision(k.as_str(), CompareOp::Equal, *rev))
            .collect();
        let op = match value {
            Some(v) => TxnOp::put(key, v, None),
            None => TxnOp::delete(key, None),
        };
        let txn = Txn::new().when(compares).and_then([op]);
        let resp = timed("txn", self.client.txn(txn)).await?;
        Ok(resp.succeeded())
    }

    /// Writes `value`; with `lease`, the key goes when the lease does.
    /// Returns the store's revision after the write.
    pub async fn put(&mut self, key: &str, value: &str, lease: Option<i64>) -> Result<i64> {
        let options = lease.map(|id| PutOptions::new().with_lease(id));
        let resp = timed("put", self.client.put(key, value, options)).await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// A lease of `ttl_s` seconds, and what keeps it alive.
    pub async fn lease(&mut self, ttl_s: u64) -> Result<(i64, LeaseKeeper, LeaseKeepAliveStream)> {
        let ttl = i64::try_from(ttl_s).context("lease TTL")?;
        let grant = timed("lease grant", self.client.lease_grant(ttl, None)).await?;
        let (keeper, stream) =
            timed("lease keep-alive", self.client.lease_keep_alive(grant.id())).await?;
        Ok((grant.id(), keeper, stream))
    }

    /// Ends lease `id`: the keys written under it go at once.
    pub async fn revoke(&mut self, id: i64) -> Result<()> {
        timed("lease revoke", self.client.lease_revoke(id)).await?;
        Ok(())
    }

    /// Deletes `key` (no error if it does not exist).
    pub async fn delete(&mut self, key: &str) -> Result<()> {
        timed("delete", self.client.delete(key, None)).await?;
        Ok(())
    }

    /// Watches every key under `prefix` from `revision` on.
    pub async fn watch_prefix(&mut self, prefix: &str, revision: i64) -> Result<WatchStream> {
        let options = WatchOptions::new()
            .with_start_revision(revision)
            .with_prefix();
        timed("watch", self.client.watch(prefix, Some(options))).await
    }

    /// Watches `key` from `revision` on.
    pub async fn watch(&mut self, key: &str, revision: i64) -> Result<WatchStream> {
        let options = WatchOptions::new().with_start_revision(revision);
        timed("watch", self.client.watch(key, Some(options))).await
    }
}
