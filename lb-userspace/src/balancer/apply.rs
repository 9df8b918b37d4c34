//! Switching a new configuration in: plan (capacity included) before the
//! first write, then add backends, switch tables, and remove what is gone,
//! in the order the module comment of `balancer` gives.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{bail, Result};
use lb_common::VipInfo;
use serde::{Deserialize, Serialize};

use super::{
    ident,
    keys::{backend_info, marker_key, settings, vip_key},
    BackendState, Balancer, VipIdent, VipState,
};
use crate::{
    config::{BalancerConfig, VipConfig},
    datapath::Datapath,
    maglev,
    nexthop::NextHop,
};

/// What an apply changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplySummary {
    pub vips_added: u32,
    pub vips_removed: u32,
    pub vips_changed: u32,
    pub vips_unchanged: u32,
    pub backends_added: u32,
    pub backends_removed: u32,
}

/// What an apply will do, worked out before anything is written.
struct Plan {
    new_backends: Vec<IpAddr>,
    gone_backends: Vec<IpAddr>,
    gone_vips: Vec<VipIdent>,
    /// VIPs whose Maglev table must be (re)built: new ones and changed
    /// backends or weights.
    rebuild: BTreeSet<VipIdent>,
}

/// Tables are built on all cores this many VIPs at a time (bounding memory).
const BUILD_CHUNK: usize = 64;

impl<D: Datapath> Balancer<D> {
    /// Switches the datapath to `config`. On error nothing has been written,
    /// except when the kernel itself refuses a write midway. `next_hops` holds
    /// what is already resolved for new backends, so their entries are complete
    /// before any Maglev ring points at them.
    pub fn apply(
        &mut self,
        config: &BalancerConfig,
        next_hops: &BTreeMap<IpAddr, NextHop>,
    ) -> Result<ApplySummary> {
        self.vip_ids.wake();
        self.rings.wake();
        self.backend_ids.wake();
        if config.datapath.maglev_table_size != self.sizes.maglev_size {
            bail!("datapath.maglev_table_size cannot change while running");
        }
        if config.datapath.maglev_slots != u64::from(self.sizes.maglev_slots) {
            bail!("datapath.maglev_slots cannot change while running");
        }
        let plan = self.plan(config)?;
        let mut summary = ApplySummary::default();
        let mut s = settings(config);
        // Written before new VIPs, so a new every-port VIP is looked up from
        // its first packet; cleared only once no old VIP has port 0 either.
        let every_port = config.vips.iter().any(|v| v.port == 0)
            || self.vips.values().any(|v| v.config.port == 0);
        if !every_port {
            s.flags |= lb_common::SETTING_NO_EVERY_PORT_VIPS;
        }
        self.dp.set_settings(&s)?;
        self.add_backends(&plan.new_backends, next_hops, &mut summary)?;
        let gone_vips = self.switch_tables(config, &plan, &mut summary)?;
        self.remove_gone(config, gone_vips, &plan.gone_backends, &mut summary)?;
        self.bypass_source = config.datapath.bypass_source;
        self.sync_vip_flags(config)?;
        Ok(summary)
    }

    /// The `VIP_*` flags a VIP's entry carries under this configuration.
    fn vip_flags(&self, vip: &VipConfig) -> u32 {
        if self.bypass_source && vip.bypass.is_some() {
            lb_common::VIP_BYPASS_SOURCE
        } else {
            0
        }
    }

    /// Rewrites the entries of VIPs whose flags changed without a table
    /// rebuild (a bypass policy or `bypass_source` switched).
    fn sync_vip_flags(&mut self, config: &BalancerConfig) -> Result<()> {
        for vip in &config.vips {
            let flags = self.vip_flags(vip);
            let Some(state) = self.vips.get_mut(&ident(vip)) else {
                continue;
            };
            state.config.bypass = vip.bypass.clone();
            if state.flags != flags {
                state.flags = flags;
                let info = state.info();
                self.dp
                    .set_vip(&vip_key(vip.address, vip.port, vip.protocol), &info)?;
            }
        }
        Ok(())
    }

    /// What is new, what changes, and whether it fits.
    fn plan(&self, config: &BalancerConfig) -> Result<Plan> {
        let wanted: BTreeSet<IpAddr> = config
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.address))
            .collect();
        let new_backends: Vec<IpAddr> = wanted
            .iter()
            .filter(|a| !self.backends.contains_key(a))
            .copied()
            .collect();
        let gone_backends: Vec<IpAddr> = self
            .backends
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        let new_idents: BTreeSet<VipIdent> = config.vips.iter().map(ident).collect();
        let gone_vips: Vec<VipIdent> = self
            .vips
            .keys()
            .filter(|k| !new_idents.contains(k))
            .copied()
            .collect();
        let rebuild: BTreeSet<VipIdent> = config
            .vips
            .iter()
            .filter(|v| match self.vips.get(&ident(v)) {
                Some(old) => old.config.backends != v.backends,
                None => true,
            })
            .map(ident)
            .collect();
        let vips_new = config
            .vips
            .iter()
            .filter(|v| !self.vips.contains_key(&ident(v)))
            .count();
        if vips_new > self.vip_ids.available() + gone_vips.len() {
            bail!(
                "not enough VIP slots (datapath.max_vips = {})",
                self.sizes.max_vips
            );
        }
        let rings: Vec<(&VipConfig, u32)> = config
            .vips
            .iter()
            .filter(|v| rebuild.contains(&ident(v)))
            .map(|v| (v, self.ring_size(v)))
            .collect();
        self.rings_fit(&rings)?;
        if new_backends.len() > self.backend_ids.available() {
            bail!(
                "not enough backend slots (datapath.max_backends = {})",
                self.sizes.max_backends
            );
        }
        Ok(Plan {
            new_backends,
            gone_backends,
            gone_vips,
            rebuild,
        })
    }

    /// Step 1: new backends are written; nothing points at them yet.
    fn add_backends(
        &mut self,
        addresses: &[IpAddr],
        next_hops: &BTreeMap<IpAddr, NextHop>,
        summary: &mut ApplySummary,
    ) -> Result<()> {
        for &address in addresses {
            let id = self.backend_ids.take().expect("capacity checked above");
            let next_hop = next_hops.get(&address).copied();
            if let Some(nh) = next_hop {
                self.allow_tx_port(nh.ifindex)?;
            }
            let state = BackendState {
                id,
                next_hop,
                usable: self.usable(address),
            };
            self.dp.clear_backend_counters(id)?;
            self.dp.set_backend(id, &state.info(address))?;
            self.backends.insert(address, state);
            summary.backends_added += 1;
        }
        Ok(())
    }

    /// Steps 2 and 3: tables into free rings, then the VIP entries switch
    /// over, one VIP at a time. Returns the removed VIPs, still to delete.
    fn switch_tables(
        &mut self,
        config: &BalancerConfig,
        plan: &Plan,
        summary: &mut ApplySummary,
    ) -> Result<Vec<(VipIdent, VipState)>> {
        // Ids of removed VIPs may be reused right away: they only index counters.
        let gone: Vec<(VipIdent, VipState)> = plan
            .gone_vips
            .iter()
            .filter_map(|k| self.vips.remove(k).map(|old| (*k, old)))
            .collect();
        let mut reusable_vip_ids: Vec<u32> = gone.iter().map(|(_, s)| s.vip_id).collect();
        for vip in config
            .vips
            .iter()
            .filter(|v| !plan.rebuild.contains(&ident(v)))
        {
            // Same backends and weights: keep the ring; the name may change.
            if let Some(state) = self.vips.get_mut(&ident(vip)) {
                state.config = vip.clone();
            }
            summary.vips_unchanged += 1;
        }
        let to_build: Vec<&VipConfig> = config
            .vips
            .iter()
            .filter(|v| plan.rebuild.contains(&ident(v)))
            .collect();
        let mut builds = maglev::Builds::default();
        for chunk in to_build.chunks(BUILD_CHUNK) {
            let jobs: Vec<(Vec<maglev::Entry>, u32)> = chunk
                .iter()
                .map(|vip| {
                    let entries = vip.backends.iter().map(|b| self.entry(vip, b)).collect();
                    (entries, self.ring_size(vip))
                })
                .collect();
            let tables = builds.build_many(&jobs);
            for (vip, table) in chunk.iter().zip(tables) {
                self.switch_vip(vip, &table, &mut reusable_vip_ids, summary)?;
            }
        }
        for id in reusable_vip_ids {
            self.vip_ids.rest(id);
        }
        Ok(gone)
    }

    /// Step 4: removed VIPs, their address markers, then removed backends;
    /// verdicts of pairs that no longer exist go.
    fn remove_gone(
        &mut self,
        config: &BalancerConfig,
        gone_vips: Vec<(VipIdent, VipState)>,
        gone_backends: &[IpAddr],
        summary: &mut ApplySummary,
    ) -> Result<()> {
        let live_addresses: BTreeSet<IpAddr> =
            self.vips.values().map(|v| v.config.address).collect();
        for (k, old) in gone_vips {
            self.dp.remove_vip(&vip_key(k.0, k.1, k.2))?;
            if !live_addresses.contains(&k.0) {
                // Several removed VIPs may share the address; remove the marker once.
                let _ = self.dp.remove_vip(&marker_key(k.0));
            }
            self.rings.rest(old.ring);
            if let Some(previous) = old.previous {
                self.rings.rest(previous);
            }
            summary.vips_removed += 1;
        }
        for address in gone_backends {
            if let Some(state) = self.backends.remove(address) {
                let mut info = backend_info(*address, false, state.next_hop);
                info.flags = 0;
                self.dp.set_backend(state.id, &info)?;
                self.backend_ids.rest(state.id);
                summary.backends_removed += 1;
            }
        }
        let live: BTreeSet<(VipIdent, IpAddr)> = config
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(move |b| (ident(v), b.address)))
            .collect();
        self.pairs.retain(|p, _| live.contains(p));
        // A pair that kept its backend out may have gone with the apply.
        let addresses: Vec<IpAddr> = self.backends.keys().copied().collect();
        for address in addresses {
            self.set_usable(address, self.usable(address))?;
        }
        Ok(())
    }

    /// The size of the VIP's ring: from its configured backend count, so
    /// health and weight changes never resize it.
    pub(super) fn ring_size(&self, vip: &VipConfig) -> u32 {
        maglev::ring_size(self.sizes.maglev_size, vip.backends.len())
    }

    /// Whether rings of these sizes fit the free space now (rings given up
    /// in this apply are not free yet); an error naming the first that
    /// does not. Nothing is taken.
    pub(super) fn rings_fit(&self, rings: &[(&VipConfig, u32)]) -> Result<()> {
        let mut space = self.rings.clone();
        for (vip, size) in rings {
            if space.take(*size).is_none() {
                let (free, largest) = self.rings.free();
                bail!(
                    "the Maglev rings do not fit datapath.maglev_slots = {}: VIP {} ({} backends) needs a ring of {size} slots; {free} slots are free, at most {largest} in one piece (rings given up by the last change are free after the next); raise datapath.maglev_slots",
                    self.sizes.maglev_slots,
                    vip.name,
                    vip.backends.len()
                );
            }
        }
        Ok(())
    }

    /// Writes `table` into a free ring and points the VIP at it.
    pub(super) fn switch_vip(
        &mut self,
        vip: &VipConfig,
        table: &maglev::Table,
        reusable_vip_ids: &mut Vec<u32>,
        summary: &mut ApplySummary,
    ) -> Result<()> {
        let key = ident(vip);
        let old = self.vips.get(&key).map(|o| (o.vip_id, o.ring));
        let old_previous = self.vips.get(&key).and_then(|o| o.previous);
        let ring = self
            .rings
            .take(table.slots.len() as u32)
            .expect("capacity checked before any write");
        self.dp.set_ring(ring.base, &table.slots)?;
        let slots: BTreeMap<IpAddr, u32> = vip
            .backends
            .iter()
            .zip(&table.counts)
            .map(|(b, c)| (b.address, *c))
            .collect();
        let vip_id = match old {
            Some((id, _)) => id,
            None => {
                let id = match reusable_vip_ids.pop() {
                    Some(id) => id,
                    None => self
                        .vip_ids
                        .take()
                        .expect("capacity checked before any write"),
                };
                self.dp.clear_vip_counters(id)?;
                id
            }
        };
        // The table being replaced stays as the previous one (second
        // chance), whatever its size; the one before it is given up.
        let previous = old.map(|(_, old_ring)| old_ring).filter(|r| r.size > 0);
        let state = VipState {
            config: vip.clone(),
            vip_id,
            ring,
            flags: self.vip_flags(vip),
            slots,
            digest: table.digest,
            previous,
        };
        self.dp
            .set_vip(&vip_key(vip.address, vip.port, vip.protocol), &state.info())?;
        self.dp
            .set_vip(&marker_key(vip.address), &VipInfo::default())?;
        match old {
            Some(_) => summary.vips_changed += 1,
            None => summary.vips_added += 1,
        }
        if let Some(given_up) = old_previous {
            self.rings.rest(given_up);
        }
        self.vips.insert(key, state);
        Ok(())
    }
}
