//! The host intermediary role (`[host]` with `[fleet]`): the agent watches
//! the store's installs, services and published health, works out with
//! `fleet::plan` whether it runs a calling service's instances, finds their
//! guests' interfaces (the route toward each instance's address), and runs
//! the source-side balancer there (`inner`), pointed at the target's
//! instances that the checkers do not hold down. It reports what it applied
//! under `PREFIX/hosts/NODE` (its lease). An invalid record leaves the
//! balancer as it is and is reported; while the store is unreachable the
//! balancer forwards with its last state.
//!
//! - `inner`: starting, updating and stopping the source-side balancer.
//! - `bypass`: the host as bypass source intermediary (policies and keys
//!   from the store, its registration).

mod bypass;
mod inner;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{anyhow, Result};
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{info, warn};

use super::state::wall_ms;
use crate::{
    config::{Config, ConfigError, FleetConfig, HostConfig},
    fleet::{
        self, lease_answer, under, watch_answer, HostPlan, HostStatus, StatusError, Store,
        Versioned,
    },
    limits::LogEvery,
    nexthop::Resolver,
};
use inner::Inner;

const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const LOG_PERIOD: Duration = Duration::from_secs(60);
/// Guests come and go without the store knowing: their interfaces are
/// looked for again this often.
const RECHECK: Duration = Duration::from_secs(5);
/// Changes that arrive together are applied together.
const SETTLE: Duration = Duration::from_millis(50);

/// The running host role; `leave` stops it (the balancer keeps forwarding).
pub(super) struct HostRole {
    stop: Arc<Notify>,
    task: JoinHandle<()>,
}

impl HostRole {
    /// The role, if the configuration gives it.
    pub(super) fn spawn_for(config: &Config, resolver: &Arc<Resolver>) -> Option<HostRole> {
        let (Some(host), Some(fleet)) = (&config.host, &config.fleet) else {
            return None;
        };
        Some(HostRole::spawn(
            &config.instance,
            host.clone(),
            fleet.clone(),
            resolver.clone(),
        ))
    }

    fn spawn(
        instance: &str,
        host: HostConfig,
        fleet: FleetConfig,
        resolver: Arc<Resolver>,
    ) -> HostRole {
        let stop = Arc::new(Notify::new());
        let role = Host {
            instance: instance.to_string(),
            host,
            fleet,
            resolver,
            inner: None,
            status: HostStatus::default(),
            intermediary: None,
        };
        let task = tokio::spawn(run(role, stop.clone()));
        HostRole { stop, task }
    }

    pub(super) async fn leave(self) {
        self.stop.notify_one();
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(15), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

struct Host {
    instance: String,
    host: HostConfig,
    fleet: FleetConfig,
    resolver: Arc<Resolver>,
    inner: Option<Inner>,
    status: HostStatus,
    /// The intermediary record this host registers (bypass on), if any.
    intermediary: Option<crate::fleet::bypass::IntermediaryRecord>,
}

/// Where the configuration of the balancer in force is kept, so that an
/// agent restarting while the store is unreachable runs it at once.
fn cache_path(host: &HostConfig) -> PathBuf {
    host.state_file.with_extension("config.toml")
}

/// Removes what the host role leaves behind (`lb-agent --cleanup`).
pub(super) fn cleanup(instance: &str, host: &HostConfig) -> Result<()> {
    let config = host.config(instance, &["lo".to_string()], &[], false)?.0;
    inner::remove(&config)?;
    let _ = std::fs::remove_file(cache_path(host));
    let _ = std::fs::remove_file(host.bypass_key_file());
    Ok(())
}

async fn run(mut role: Host, stop: Arc<Notify>) {
    role.start_kept().await;
    let mut backoff = MIN_BACKOFF;
    let mut warnings = LogEvery::new(LOG_PERIOD);
    loop {
        let started = tokio::time::Instant::now();
        let e = match role.session(&stop).await {
            Ok(()) => break,
            Err(e) => e,
        };
        if started.elapsed() > MAX_BACKOFF * 3 {
            backoff = MIN_BACKOFF;
        }
        if let Some(held) = warnings.ready() {
            warn!(
                failures_not_logged = held,
                "host role: fleet store: {e:#}; the source-side balancer forwards with its last state, reconnecting"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.notified() => break,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    if let Some(inner) = role.inner.take() {
        if let Err(e) = inner.stop(false).await {
            warn!("stopping the source-side balancer: {e:#}");
        }
    }
}

/// What a store event means to a host.
fn concerns(keys: &fleet::Keys, key: &str) -> bool {
    [
        keys.installs(),
        keys.services(),
        keys.healths(),
        keys.bypass_policies(),
        keys.bypass_keys(),
    ]
    .iter()
    .any(|p| key.starts_with(p.as_str()))
}

impl Host {
    /// Over pins a previous agent left, with the configuration it kept: the
    /// balancer runs (and shows its counters) before the store answers.
    async fn start_kept(&mut self) {
        let Ok(text) = std::fs::read_to_string(cache_path(&self.host)) else {
            return;
        };
        let config = match Config::from_toml(&text) {
            Ok(c) => c,
            Err(e) => {
                warn!("the kept source-side balancer configuration is not valid, not used: {e}");
                return;
            }
        };
        if !crate::datapath::Pins::new(&config.instance).exist() {
            return;
        }
        match Inner::start(config, text).await {
            Ok(inner) => self.inner = Some(inner),
            Err(e) => warn!("starting the kept source-side balancer: {e:#}"),
        }
    }

    async fn session(&mut self, stop: &Notify) -> Result<()> {
        let mut store = Store::connect(&self.fleet).await?;
        let (lease, mut keeper, mut alive) = store.lease(self.fleet.lease_ttl_s).await?;
        let revision = self.converge(&mut store).await?;
        self.report(&mut store, lease).await?;
        let mut watch = store.watch_prefix(&store.keys.all(), revision + 1).await?;
        info!(
            node = self.fleet.node,
            "host role: following the fleet store's installs"
        );
        let mut renew =
            tokio::time::interval(Duration::from_secs(self.fleet.lease_ttl_s.div_ceil(3)));
        let mut recheck = tokio::time::interval(RECHECK);
        loop {
            let dirty = tokio::select! {
                _ = stop.notified() => {
                    let _ = store.revoke(lease).await;
                    return Ok(());
                }
                _ = renew.tick() => { keeper.keep_alive().await?; false }
                msg = alive.message() => { lease_answer(msg)?; false }
                _ = recheck.tick() => true,
                msg = watch.message() => watch_answer(msg, |k| concerns(&store.keys, k))?,
            };
            if dirty {
                tokio::time::sleep(SETTLE).await;
                let before = self.status.clone();
                self.converge(&mut store).await?;
                if before != self.status {
                    self.report(&mut store, lease).await?;
                }
            }
        }
    }

    /// Reads the store once (one revision), and makes the balancer follow
    /// it. Returns the revision read; only store errors are errors here.
    async fn converge(&mut self, store: &mut Store) -> Result<i64> {
        let (all, revision) = store.list_at(&store.keys.all()).await?;
        let part = |prefix: &str| under(&all, prefix);
        let (installs, services, health) = (part("installs/"), part("services/"), part("health/"));
        let policies = part("bypass/policies/");
        let keys: Vec<(String, Versioned)> = all
            .iter()
            .filter(|(k, _)| k == "bypass/keys")
            .cloned()
            .collect();
        // The generation: the newest record a host follows, so that it moves
        // only when what it follows does.
        let generation = [&installs, &services, &health, &policies, &keys]
            .iter()
            .flat_map(|p| p.iter().map(|(_, v)| v.revision))
            .max()
            .unwrap_or(0);
        let plan =
            fleet::plan(&self.fleet.node, &installs, &services, &health).and_then(|mut plan| {
                if let Some(p) = plan.as_mut() {
                    fleet::bypass::set_host_policies(&mut p.vips, &services, &policies)?;
                }
                Ok(plan)
            });
        let outcome = match plan {
            Ok(plan) => {
                let keys = keys.first().map(|(_, v)| v.text.as_str());
                self.follow(plan, keys).await
            }
            Err(e) => Err(e.into()),
        };
        match outcome {
            Ok(()) => {
                self.status.generation = Some(generation);
                self.status.error = None;
            }
            Err(e) => {
                let message = format!("{e:#}");
                if self.status.error.as_ref().map(|x| &x.message) != Some(&message) {
                    warn!(
                        generation,
                        "host role: not applied, the last good state stays: {message}"
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

    /// Runs, updates or stops the balancer for `plan`; `keys`: the store's
    /// bypass key ring.
    async fn follow(&mut self, plan: Option<HostPlan>, keys: Option<&str>) -> Result<()> {
        let Some(plan) = plan else {
            self.set_intermediary(None);
            if let Some(inner) = self.inner.take() {
                inner.stop(true).await?;
                info!("no install concerns this host: source-side balancer removed");
            } else {
                cleanup(&self.instance, &self.host)?;
            }
            let _ = std::fs::remove_file(cache_path(&self.host));
            self.status.installs.clear();
            self.status.interfaces.clear();
            self.status.backends.clear();
            return Ok(());
        };
        let mut interfaces = Vec::new();
        for source in &plan.sources {
            let name = self
                .resolver
                .interface_toward(*source)
                .await
                .map_err(|e| anyhow!("finding the interface of the guest {source}: {e:#}"))?;
            interfaces.push(name);
        }
        interfaces.sort();
        interfaces.dedup();
        let with_bypass = self.bypass_keys(&plan, keys)?;
        let (config, text) = self
            .host
            .config(&self.instance, &interfaces, &plan.vips, with_bypass)
            .map_err(|e: ConfigError| anyhow!("the source-side balancer's configuration: {e}"))?;
        self.run_balancer(config, text).await?;
        self.set_intermediary(with_bypass.then_some(&plan));
        let kept = cache_path(&self.host);
        if let Some(dir) = kept.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let text = self
            .inner
            .as_ref()
            .map(|i| i.text.as_str())
            .unwrap_or_default();
        if let Err(e) = std::fs::write(&kept, text) {
            warn!(path = %kept.display(), "keeping the source-side balancer configuration: {e}");
        }
        self.status.installs = plan.installs;
        self.status.interfaces = interfaces;
        self.status.backends = plan
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|(a, w)| format!("{a} {w}")))
            .collect();
        self.status.backends.sort();
        self.status.backends.dedup();
        Ok(())
    }

    async fn run_balancer(&mut self, config: Config, text: String) -> Result<()> {
        if let Some(mut inner) = self.inner.take() {
            let same_datapath = inner.alive()
                && inner.config.balancer.as_ref().map(|b| &b.datapath)
                    == config.balancer.as_ref().map(|b| &b.datapath);
            if same_datapath {
                let result = if inner.text == text {
                    Ok(())
                } else {
                    inner.apply(config, text).await
                };
                self.inner = Some(inner);
                return result;
            }
            // New interfaces: a restart over the pins (flows are kept).
            inner.stop(false).await?;
        }
        self.inner = Some(Inner::start(config, text).await?);
        Ok(())
    }

    async fn report(&mut self, store: &mut Store, lease: i64) -> Result<()> {
        self.status.node = self.fleet.node.clone();
        self.status.updated_ms = wall_ms();
        self.register(store, lease).await?;
        let key = store.keys.host(&self.fleet.node);
        store
            .put(&key, &serde_json::to_string(&self.status)?, Some(lease))
            .await?;
        Ok(())
    }
}
