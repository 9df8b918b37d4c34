//! The host as bypass source intermediary. When `[host] bypass_listen` is
//! set, an installed VIP has a bypass policy in the store and the store
//! holds a key ring, the source-side balancer runs `lb_source` (rendered
//! with `bypass_source` and a `[bypass]` section) and the host registers
//! its guests' prefixes and its listen address under
//! `PREFIX/bypass/intermediaries/NODE` (its lease), which the backends'
//! hosts follow. The key ring is written to a file only root reads, which
//! the balancer reads again when it changes (rotation without a restart).

use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};

use anyhow::{Context as _, Result};

use super::Host;
use crate::fleet::{
    bypass::{keys_from_store, IntermediaryRecord},
    HostPlan, Store,
};

impl Host {
    /// Whether the balancer runs as source intermediary for `plan`; if so
    /// the key file holds `keys` (an invalid ring is an error: nothing
    /// changes).
    pub(super) fn bypass_keys(&self, plan: &HostPlan, keys: Option<&str>) -> Result<bool> {
        if self.host.bypass_listen.is_none() || !plan.vips.iter().any(|v| v.bypass.is_some()) {
            return Ok(false);
        }
        let Some(text) = keys else {
            return Ok(false);
        };
        keys_from_store(text)?;
        let path = self.host.bypass_key_file();
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text) {
            return Ok(true);
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // Written beside, then renamed: the balancer never reads half a ring.
        let tmp = path.with_extension("toml.new");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(true)
    }

    /// The intermediary record to register (`None`: none).
    pub(super) fn set_intermediary(&mut self, plan: Option<&HostPlan>) {
        self.intermediary = match (plan, self.host.bypass_listen) {
            (Some(plan), Some(address)) => Some(IntermediaryRecord {
                node: self.fleet.node.clone(),
                prefixes: plan
                    .sources
                    .iter()
                    .map(|a| ipnet::IpNet::from(*a))
                    .collect(),
                address,
                updated_ms: 0,
            }),
            _ => None,
        };
        self.status.bypass = self.intermediary.as_ref().map(|r| {
            let prefixes: Vec<String> = r.prefixes.iter().map(|p| p.to_string()).collect();
            format!("{} -> {}", prefixes.join(" "), r.address)
        });
        if self.intermediary.is_none() {
            let _ = std::fs::remove_file(self.host.bypass_key_file());
        }
    }

    /// Writes (or deletes) the intermediary record under the lease.
    pub(super) async fn register(&mut self, store: &mut Store, lease: i64) -> Result<()> {
        let key = store.keys.bypass_intermediary(&self.fleet.node);
        match &mut self.intermediary {
            Some(r) => {
                r.updated_ms = self.status.updated_ms;
                store
                    .put(&key, &serde_json::to_string(r)?, Some(lease))
                    .await?;
            }
            None => store.delete(&key).await?,
        }
        Ok(())
    }
}
