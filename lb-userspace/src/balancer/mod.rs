//! The balancer's control state: which VIPs, backends, ids and Maglev rings
//! are live, and how a new configuration is switched in.
//!
//! An apply is planned in full (capacity included) before the first write, so
//! a configuration that does not fit changes nothing. Writes then go in an
//! order where no packet sees half a change:
//! 1. new backends are written (nothing points at them yet);
//! 2. changed or new Maglev tables are written into free rings;
//! 3. each VIP entry is switched to its new ring in one map update;
//! 4. removed VIPs are deleted, then removed backends lose their usable bit
//!    (their established flows are re-balanced through Maglev).
//!
//! Rings and ids given up by an apply rest until the next apply before they
//! are reused, so a packet that read the old VIP entry never reads a ring that
//! is being rewritten.

mod apply;
mod ids;
mod keys;
mod pairs;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{bail, Context as _, Result};
use lb_common::{addr_bytes, BackendInfo};

pub use apply::ApplySummary;
use ids::IdPool;
pub use keys::{settings, vip_key};
use pairs::PairState;
pub use pairs::{Pair, Placement, Service, VipIdent};

use crate::{
    config::{BackendConfig, VipConfig},
    datapath::{Datapath, MapSizes},
    maglev,
    nexthop::NextHop,
};

#[derive(Debug, Clone)]
struct VipState {
    config: VipConfig,
    vip_id: u32,
    ring: u32,
    /// Slots each backend holds in the ring, by address.
    slots: BTreeMap<IpAddr, u32>,
}

#[derive(Debug, Clone)]
struct BackendState {
    id: u32,
    next_hop: Option<NextHop>,
    /// False while any of its VIPs blocks its flows (a health check says
    /// down, or the lifecycle has it out): they are then re-balanced too.
    usable: bool,
}

impl BackendState {
    fn info(&self, address: IpAddr) -> BackendInfo {
        keys::backend_info(address, self.usable, self.next_hop)
    }
}

fn ident(v: &VipConfig) -> VipIdent {
    (v.address, v.port, v.protocol)
}

/// Live balancer state over a datapath.
pub struct Balancer<D: Datapath> {
    dp: D,
    sizes: MapSizes,
    vips: BTreeMap<VipIdent, VipState>,
    backends: BTreeMap<IpAddr, BackendState>,
    vip_ids: IdPool,
    rings: IdPool,
    backend_ids: IdPool,
    tx_ports: BTreeSet<u32>,
    /// Receiving interfaces: frames leave them with XDP_TX, no DevMap entry needed.
    local_ports: BTreeSet<u32>,
    /// What health checks and the lifecycle's placement say about each
    /// (VIP, backend) pair; absent pairs are at their default.
    pairs: BTreeMap<Pair, PairState>,
}

impl<D: Datapath> Balancer<D> {
    pub fn new(dp: D, sizes: MapSizes, local_ports: BTreeSet<u32>) -> Self {
        Self {
            dp,
            sizes,
            vips: BTreeMap::new(),
            backends: BTreeMap::new(),
            vip_ids: IdPool::new(sizes.max_vips),
            rings: IdPool::new(sizes.rings()),
            backend_ids: IdPool::new(sizes.max_backends),
            tx_ports: BTreeSet::new(),
            local_ports,
            pairs: BTreeMap::new(),
        }
    }

    pub fn datapath(&self) -> &D {
        &self.dp
    }

    /// A backend as the VIP's Maglev table takes it: no slots while out,
    /// its weight scaled by its load otherwise.
    fn entry(&self, vip: &VipConfig, b: &BackendConfig) -> maglev::Entry {
        maglev::Entry {
            id: self.backends[&b.address].id,
            identity: addr_bytes(b.address).0.to_vec(),
            weight: self.effective_weight(vip, b),
        }
    }

    /// Records a health check verdict for a backend of a VIP (see `update`).
    /// Returns whether anything changed.
    pub fn set_health(&mut self, vip: VipIdent, address: IpAddr, up: bool) -> Result<bool> {
        self.update_pair(vip, address, |p| p.down = !up)
    }

    /// The VIP a name refers to, or a clear error.
    pub fn vip_named(&self, vip_name: &str) -> Result<VipIdent> {
        self.vips
            .values()
            .find(|v| v.config.name == vip_name)
            .map(|v| ident(&v.config))
            .with_context(|| format!("no VIP named {vip_name:?}"))
    }

    /// The VIP and backend an operator names, or a clear error.
    pub fn pair_named(&self, vip_name: &str, address: IpAddr) -> Result<Pair> {
        let vip = self.vip_named(vip_name)?;
        if !self.vips[&vip]
            .config
            .backends
            .iter()
            .any(|b| b.address == address)
        {
            bail!("{address} is not a backend of {vip_name}");
        }
        Ok((vip, address))
    }

    /// The lifecycle's placement of a VIP's backends, applied in one go (one
    /// table rebuild at most).
    pub fn set_service(&mut self, vip: VipIdent, changes: &[Placement]) -> Result<bool> {
        self.update(vip, |pairs| {
            for c in changes {
                let p = pairs.entry((vip, c.backend)).or_default();
                p.service = c.service;
                p.preference = c.preference;
                p.load_factor = c.load_factor.clamp(0.0, 1.0);
            }
        })
    }

    /// The weight factor the backend's load gives it in the VIP now.
    pub fn load_factor(&self, vip: VipIdent, address: IpAddr) -> f64 {
        self.pairs
            .get(&(vip, address))
            .map_or(1.0, |p| p.load_factor)
    }

    /// Whether health checks let the backend serve the VIP (no check, or
    /// its last verdict is up).
    pub fn up(&self, vip: VipIdent, address: IpAddr) -> bool {
        self.pairs.get(&(vip, address)).is_none_or(|p| !p.down)
    }

    fn update_pair(
        &mut self,
        vip: VipIdent,
        address: IpAddr,
        change: impl FnOnce(&mut PairState),
    ) -> Result<bool> {
        let known = self
            .vips
            .get(&vip)
            .is_some_and(|v| v.config.backends.iter().any(|b| b.address == address));
        if !known {
            return Ok(false);
        }
        self.update(vip, |pairs| {
            change(pairs.entry((vip, address)).or_default())
        })
    }

    /// Usable for established flows: no VIP it serves blocks them.
    fn usable(&self, address: IpAddr) -> bool {
        !self
            .pairs
            .iter()
            .any(|((_, a), p)| *a == address && p.blocks_flows())
    }

    /// Changes the pairs of one VIP with `change` and rewrites the datapath in
    /// an order that never breaks a flow needlessly: backends that become
    /// usable are marked so first, then the VIP's table is rebuilt if any
    /// weight moved (a leaving backend gets no new flows), and only then do
    /// backends that must lose their established flows lose their usable bit.
    fn update(
        &mut self,
        vip: VipIdent,
        change: impl FnOnce(&mut BTreeMap<Pair, PairState>),
    ) -> Result<bool> {
        let Some(config) = self.vips.get(&vip).map(|v| v.config.clone()) else {
            return Ok(false);
        };
        // `change` touches only this VIP's pairs.
        let pairs_of = |b: &Self| -> Vec<Option<PairState>> {
            config
                .backends
                .iter()
                .map(|be| b.pairs.get(&(vip, be.address)).copied())
                .collect()
        };
        let before = pairs_of(self);
        let weights = |b: &Self| -> Vec<u32> {
            config
                .backends
                .iter()
                .map(|be| b.effective_weight(&config, be))
                .collect()
        };
        let old_weights = weights(self);
        change(&mut self.pairs);
        let after = pairs_of(self);
        if after == before {
            return Ok(false);
        }
        // A backend's usability can only move where this VIP's pair changed
        // whether it blocks established flows (the scan over other VIPs'
        // pairs is needed only then).
        let blocks = |p: &Option<PairState>| p.is_some_and(|p| p.blocks_flows());
        let mut old_usable = Vec::new();
        let mut new_usable = Vec::new();
        for (i, b) in config.backends.iter().enumerate() {
            if blocks(&before[i]) == blocks(&after[i]) {
                old_usable.push(true);
                new_usable.push(true);
                continue;
            }
            let others = self
                .pairs
                .iter()
                .any(|((v, a), p)| *a == b.address && *v != vip && p.blocks_flows());
            old_usable.push(!blocks(&before[i]) && !others);
            new_usable.push(!blocks(&after[i]) && !others);
        }
        for (i, b) in config.backends.iter().enumerate() {
            if new_usable[i] && !old_usable[i] {
                self.set_usable(b.address, true)?;
            }
        }
        if weights(self) != old_weights {
            self.rebuild(&config)?;
        }
        for (i, b) in config.backends.iter().enumerate() {
            if !new_usable[i] && old_usable[i] {
                self.set_usable(b.address, false)?;
            }
        }
        Ok(true)
    }

    /// Rebuilds a VIP's table from its configuration, health, operator
    /// settings, lifecycle and load, and switches it in.
    fn rebuild(&mut self, config: &VipConfig) -> Result<()> {
        self.rings.wake();
        if self.rings.available() == 0 {
            bail!("no free Maglev ring to rebuild {}", config.name);
        }
        let entries: Vec<maglev::Entry> = config
            .backends
            .iter()
            .map(|b| self.entry(config, b))
            .collect();
        let table = maglev::build_table(&entries, self.sizes.maglev_size);
        self.switch_vip(
            config,
            &table,
            &mut Vec::new(),
            &mut ApplySummary::default(),
        )
    }

    /// The weight a backend has in the VIP's table now.
    pub fn effective_weight(&self, vip: &VipConfig, b: &BackendConfig) -> u32 {
        self.pairs
            .get(&(ident(vip), b.address))
            .copied()
            .unwrap_or_default()
            .weight(b.weight)
    }

    fn set_usable(&mut self, address: IpAddr, usable: bool) -> Result<()> {
        if let Some(state) = self.backends.get_mut(&address) {
            if state.usable != usable {
                state.usable = usable;
                let (id, info) = (state.id, state.info(address));
                self.dp.set_backend(id, &info)?;
            }
        }
        Ok(())
    }

    /// The backend's standing in the VIP by its health checks: "down", "up"
    /// or "unchecked" (no health check configured).
    pub fn standing(&self, vip: &VipConfig, address: IpAddr) -> &'static str {
        if !self.up(ident(vip), address) {
            "down"
        } else if vip.health.is_some() {
            "up"
        } else {
            "unchecked"
        }
    }

    /// (vip id, configuration) of every live VIP.
    pub fn vips(&self) -> Vec<(u32, &VipConfig)> {
        self.vips.values().map(|v| (v.vip_id, &v.config)).collect()
    }

    /// (backend id, address) of every live backend.
    pub fn backend_ids(&self) -> Vec<(u32, IpAddr)> {
        self.backends.iter().map(|(a, s)| (s.id, *a)).collect()
    }

    pub fn datapath_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    /// Backend addresses whose next hop the agent should keep resolved.
    pub fn backend_addresses(&self) -> Vec<IpAddr> {
        self.backends.keys().copied().collect()
    }

    /// Records a backend's next hop; rewrites its entry only when it changed.
    pub fn set_next_hop(&mut self, address: IpAddr, next_hop: Option<NextHop>) -> Result<bool> {
        let Some(state) = self.backends.get_mut(&address) else {
            return Ok(false);
        };
        if state.next_hop == next_hop {
            return Ok(false);
        }
        state.next_hop = next_hop;
        let (id, info) = (state.id, state.info(address));
        if let Some(nh) = next_hop {
            self.allow_tx_port(nh.ifindex)?;
        }
        self.dp.set_backend(id, &info)?;
        Ok(true)
    }

    fn allow_tx_port(&mut self, ifindex: u32) -> Result<()> {
        if !self.local_ports.contains(&ifindex) && self.tx_ports.insert(ifindex) {
            self.dp.add_tx_port(ifindex)?;
        }
        Ok(())
    }

    /// Slots each backend of a live VIP holds in its Maglev table.
    pub fn slots(&self, vip: VipIdent, address: IpAddr) -> u32 {
        self.vips
            .get(&vip)
            .and_then(|v| v.slots.get(&address).copied())
            .unwrap_or(0)
    }

    /// (address, backend id, next hop) of every live backend.
    pub fn backends(&self) -> impl Iterator<Item = (IpAddr, u32, Option<NextHop>)> + '_ {
        self.backends.iter().map(|(a, s)| (*a, s.id, s.next_hop))
    }
}

#[cfg(test)]
mod tests;
