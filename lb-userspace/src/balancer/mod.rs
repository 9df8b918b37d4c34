//! The balancer's control state: which VIPs, backends, ids and Maglev rings
//! are live, and how a new configuration is switched in.
//!
//! An apply is planned in full (capacity included) before the first write, so
//! a configuration that does not fit changes nothing. Writes then go in an
//! order where no packet sees half a change:
//! 1. new backends are written (nothing points at them yet);
//! 2. changed or new Maglev tables are written into free rings (each VIP's
//!    ring sized from its backend count, carved out of one array: `rings`);
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
mod rings;
mod serving;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{bail, Context as _, Result};
use lb_common::{addr_bytes, addr_from_bytes, BackendInfo, BACKEND_ALLOCATED, BACKEND_USABLE};

pub use apply::ApplySummary;
use ids::IdPool;
pub use keys::{settings, vip_key};
use pairs::PairState;
pub use pairs::{Pair, Placement, Service, VipIdent};
use rings::{RingSpace, Span};

use crate::{
    config::{BackendConfig, Protocol, VipConfig},
    datapath::{Datapath, KernelDatapath, MapSizes, OldMaps},
    maglev,
    nexthop::NextHop,
};

#[derive(Debug, Clone)]
struct VipState {
    config: VipConfig,
    vip_id: u32,
    ring: Span,
    /// `VIP_*` flags as last written to the datapath.
    flags: u32,
    /// Slots each backend holds in the ring, by address.
    slots: BTreeMap<IpAddr, u32>,
    /// `maglev::digest` of the table in the ring (0 until one is built).
    digest: u64,
    /// The ring of the table before the last change, kept for the
    /// datapath's second chance until the next change. Its size may differ
    /// (the backend count crossed a size boundary).
    previous: Option<Span>,
}

impl VipState {
    /// The VIP's datapath entry.
    fn info(&self) -> lb_common::VipInfo {
        let previous = self.previous.unwrap_or(Span { base: 0, size: 0 });
        lb_common::VipInfo {
            vip_id: self.vip_id,
            flags: self.flags,
            ring_base: self.ring.base,
            ring_size: self.ring.size,
            previous_base: previous.base,
            previous_size: previous.size,
        }
    }
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

impl Balancer<KernelDatapath> {
    /// Adopts the ids of a datapath being migrated to new maps (see
    /// `datapath::pins`): backend entries and the redirect ports are written
    /// into the new maps and the counters copied. The next apply builds every
    /// table.
    pub fn adopt_from(&mut self, old: &OldMaps) -> Result<(usize, usize)> {
        // The old maps' rings are not copied: nothing of the new array is
        // in use yet, and no VIP has a previous table in it.
        let counts = self.adopt_entries(old.vip_entries()?, old.backend_entries()?, false)?;
        for (address, state) in &self.backends {
            self.dp.set_backend(state.id, &state.info(*address))?;
        }
        for port in &self.tx_ports {
            self.dp.add_tx_port(*port)?;
        }
        let vip_ids: Vec<u32> = self.vips.values().map(|v| v.vip_id).collect();
        let backend_ids: Vec<u32> = self.backends.values().map(|b| b.id).collect();
        self.dp.copy_counters_from(old, &vip_ids, &backend_ids)?;
        Ok(counts)
    }
}

fn place(pairs: &mut BTreeMap<Pair, PairState>, vip: VipIdent, placements: &[Placement]) {
    for c in placements {
        let p = pairs.entry((vip, c.backend)).or_default();
        p.service = c.service;
        p.preference = c.preference;
        p.load_factor = c.load_factor.clamp(0.0, 1.0);
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
    rings: RingSpace,
    backend_ids: IdPool,
    tx_ports: BTreeSet<u32>,
    /// Receiving interfaces: frames leave them with XDP_TX, no DevMap entry needed.
    local_ports: BTreeSet<u32>,
    /// What health checks and the lifecycle's placement say about each
    /// (VIP, backend) pair; absent pairs are at their default.
    pairs: BTreeMap<Pair, PairState>,
    /// `[datapath] bypass_source` of the configuration applied.
    bypass_source: bool,
}

impl<D: Datapath> Balancer<D> {
    pub fn new(dp: D, sizes: MapSizes, local_ports: BTreeSet<u32>) -> Self {
        Self {
            dp,
            sizes,
            vips: BTreeMap::new(),
            backends: BTreeMap::new(),
            vip_ids: IdPool::new(sizes.max_vips),
            rings: RingSpace::new(sizes.maglev_slots),
            backend_ids: IdPool::new(sizes.max_backends),
            tx_ports: BTreeSet::new(),
            local_ports,
            pairs: BTreeMap::new(),
            bypass_source: false,
        }
    }

    pub fn datapath(&self) -> &D {
        &self.dp
    }

    /// Takes over what a previous agent left in the maps: the VIPs' ids and
    /// rings, the backends' ids and next hops. Flows in the connection table
    /// keep their backends and counters keep counting. The configuration of
    /// an adopted VIP is not in the maps, so the next apply rebuilds its
    /// table (the same backends and weights give the same table) and removes
    /// what the configuration no longer has. Returns (VIPs, backends).
    pub fn adopt(&mut self) -> Result<(usize, usize)> {
        let (vips, backends) = (self.dp.vip_entries()?, self.dp.backend_entries()?);
        self.adopt_entries(vips, backends, true)
    }

    fn adopt_entries(
        &mut self,
        vip_entries: Vec<(lb_common::VipKey, lb_common::VipInfo)>,
        backend_entries: Vec<(u32, BackendInfo)>,
        rings_in_use: bool,
    ) -> Result<(usize, usize)> {
        for (key, info) in vip_entries {
            let Some(protocol) = Protocol::from_number(key.proto) else {
                continue; // an address marker
            };
            let (address, port) = (
                addr_from_bytes(key.addr, key.family),
                u16::from_be(key.port),
            );
            let (ring, previous) = if rings_in_use {
                let previous = (info.previous_size > 0).then_some(Span {
                    base: info.previous_base,
                    size: info.previous_size,
                });
                (Span::of_live(&info), previous)
            } else {
                (Span::NONE, None)
            };
            if !self.vip_ids.claim(info.vip_id)
                || (rings_in_use && !self.rings.claim(ring))
                || previous.is_some_and(|r| !self.rings.claim(r))
            {
                bail!(
                    "the pinned VIP {address} port {port} has vip id {}, ring {ring:?} and previous ring {previous:?}, outside this agent's sizes (datapath.maglev_slots = {}) or used twice",
                    info.vip_id,
                    self.rings.total()
                );
            }
            let config = VipConfig {
                name: String::new(),
                address,
                port,
                protocol,
                backends: Vec::new(),
                health: None,
                feedback: None,
                maintenance: Default::default(),
                bypass: None,
            };
            let state = VipState {
                config,
                vip_id: info.vip_id,
                ring,
                flags: info.flags,
                slots: BTreeMap::new(),
                digest: 0,
                previous,
            };
            self.vips.insert((address, port, protocol), state);
        }
        for (id, info) in backend_entries {
            if info.flags & BACKEND_ALLOCATED == 0 {
                continue;
            }
            let address = addr_from_bytes(info.addr, info.family);
            if !self.backend_ids.claim(id) {
                bail!("the pinned backend {address} has id {id}, outside this agent's sizes");
            }
            let next_hop = (info.ifindex != 0).then_some(NextHop {
                ifindex: info.ifindex,
                src_mac: info.src_mac,
                dst_mac: info.dst_mac,
                mtu: u32::from(info.mtu),
            });
            if let Some(nh) = next_hop {
                if !self.local_ports.contains(&nh.ifindex) {
                    self.tx_ports.insert(nh.ifindex);
                }
            }
            let state = BackendState {
                id,
                next_hop,
                usable: info.flags & BACKEND_USABLE != 0,
            };
            self.backends.insert(address, state);
        }
        Ok((self.vips.len(), self.backends.len()))
    }

    /// Places a VIP's backends before its table is first built (after an
    /// adoption, so that the first table already has the lifecycle's
    /// weights); writes nothing.
    pub fn seed(&mut self, vip: VipIdent, placements: &[Placement]) {
        place(&mut self.pairs, vip, placements);
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
            .with_context(|| format!("no VIP named {vip_name:?}; `lbctl status` lists the VIPs"))
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
            bail!("{address} is not a backend of {vip_name}; `lbctl status` lists its backends");
        }
        Ok((vip, address))
    }

    /// The lifecycle's placement of a VIP's backends, applied in one go (one
    /// table rebuild at most).
    pub fn set_service(&mut self, vip: VipIdent, changes: &[Placement]) -> Result<bool> {
        self.update(vip, |pairs| place(pairs, vip, changes))
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
        let size = self.ring_size(config);
        self.rings_fit(&[(config, size)])?;
        let entries: Vec<maglev::Entry> = config
            .backends
            .iter()
            .map(|b| self.entry(config, b))
            .collect();
        let table = maglev::build_table(&entries, size);
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

    /// The backend id of `backend` if it is in the current set of the VIP
    /// `(address, port, protocol)` (exact port, else the every-port VIP),
    /// that VIP has a bypass policy for the protocol, and the backend may
    /// carry the flow: usable, not down, not out of service (a draining
    /// backend keeps its flows, bypassed or not).
    pub fn bypass_target(
        &self,
        address: IpAddr,
        port: u16,
        protocol: crate::config::Protocol,
        backend: IpAddr,
    ) -> Option<u32> {
        let vip = self
            .vips
            .get(&(address, port, protocol))
            .or_else(|| self.vips.get(&(address, 0, protocol)))?;
        let policy = vip.config.bypass.as_ref()?;
        if !policy.protocols.contains(&protocol)
            || !vip.config.backends.iter().any(|b| b.address == backend)
        {
            return None;
        }
        let ident = ident(&vip.config);
        let state = self.backends.get(&backend)?;
        let pair = self
            .pairs
            .get(&(ident, backend))
            .copied()
            .unwrap_or_default();
        (state.usable && !pair.blocks_flows()).then_some(state.id)
    }

    /// (address, backend id, next hop) of every live backend.
    pub fn backends(&self) -> impl Iterator<Item = (IpAddr, u32, Option<NextHop>)> + '_ {
        self.backends.iter().map(|(a, s)| (*a, s.id, s.next_hop))
    }
}

#[cfg(test)]
mod tests;
