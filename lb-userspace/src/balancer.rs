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

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{bail, Context as _, Result};
use lb_common::{
    BackendInfo, Settings, TrafficCounters, VipInfo, VipKey, BACKEND_AVAILABLE, BACKEND_USABLE,
    FAMILY_V4, FAMILY_V6,
};

use crate::{
    api::{ApplySummary, BackendStatus, Counters, NextHopStatus, VipBackendStatus, VipStatus},
    config::{BalancerConfig, EncapConfig, Protocol, VipConfig, VisibilityConfig},
    datapath::{Datapath, MapSizes},
    maglev,
    nexthop::NextHop,
};

/// 16-byte address as the maps store it, and its family tag.
pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// The inverse of `addr_bytes`.
pub fn addr_from_bytes(addr: [u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        IpAddr::from(addr)
    }
}

/// The datapath key of a VIP.
pub fn vip_key(address: IpAddr, port: u16, protocol: Protocol) -> VipKey {
    let (addr, family) = addr_bytes(address);
    VipKey {
        addr,
        port: port.to_be(),
        proto: protocol.number(),
        family,
    }
}

/// The marker entry that makes an address known as a VIP address.
fn marker_key(address: IpAddr) -> VipKey {
    let (addr, family) = addr_bytes(address);
    VipKey {
        addr,
        port: 0,
        proto: 0,
        family,
    }
}

/// Datapath settings: table size, tracers and events, encapsulation sources.
pub fn settings(maglev_size: u32, encap: &EncapConfig, visibility: &VisibilityConfig) -> Settings {
    let mut s = Settings {
        maglev_size,
        flags: if visibility.trace_flows {
            lb_common::SETTING_TRACE_FLOWS
        } else {
            0
        },
        event_sample: visibility.event_sample,
        ..Settings::default()
    };
    if let Some(v4) = encap.source_v4 {
        s.src_v4 = u32::from(v4.network()).to_be();
        s.src_v4_hostmask = u32::from(v4.hostmask()).to_be();
    }
    if let Some(v6) = encap.source_v6 {
        s.src_v6 = v6.network().octets();
        let host_bits = 128 - u32::from(v6.prefix_len());
        let mask = if host_bits >= 32 {
            u32::MAX
        } else {
            (1u32 << host_bits) - 1
        };
        s.src_v6_hostmask = mask.to_be();
    }
    s
}

/// Hands out ids from a fixed range, oldest-freed last, so a freed id is
/// reused as late as possible.
#[derive(Debug)]
struct IdPool {
    free: BTreeSet<u32>,
    resting: Vec<u32>,
    cursor: u32,
    size: u32,
}

impl IdPool {
    fn new(size: u32) -> Self {
        Self {
            free: (0..size).collect(),
            resting: Vec::new(),
            cursor: 0,
            size,
        }
    }

    fn available(&self) -> usize {
        self.free.len()
    }

    /// The next free id at or after the cursor, wrapping around.
    fn take(&mut self) -> Option<u32> {
        let id = self
            .free
            .range(self.cursor..)
            .next()
            .or_else(|| self.free.iter().next())
            .copied()?;
        self.free.remove(&id);
        self.cursor = (id + 1) % self.size.max(1);
        Some(id)
    }

    fn rest(&mut self, id: u32) {
        self.resting.push(id);
    }

    /// Ids given up by the previous apply become usable again.
    fn wake(&mut self) {
        self.free.extend(self.resting.drain(..));
    }
}

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
    /// False while a health check of any of its VIPs says it is down: its
    /// established flows are then re-balanced too.
    usable: bool,
}

impl BackendState {
    fn info(&self, address: IpAddr) -> BackendInfo {
        let (addr, family) = addr_bytes(address);
        let mut info = BackendInfo {
            addr,
            family,
            flags: if self.usable {
                BACKEND_USABLE | BACKEND_AVAILABLE
            } else {
                0
            },
            ..BackendInfo::default()
        };
        if let Some(nh) = self.next_hop {
            info.ifindex = nh.ifindex;
            info.src_mac = nh.src_mac;
            info.dst_mac = nh.dst_mac;
        }
        info
    }
}

pub type VipIdent = (IpAddr, u16, Protocol);

fn ident(v: &VipConfig) -> VipIdent {
    (v.address, v.port, v.protocol)
}

/// Live balancer state over a datapath.
pub struct Balancer<D: Datapath> {
    dp: D,
    sizes: MapSizes,
    encap: EncapConfig,
    vips: BTreeMap<VipIdent, VipState>,
    backends: BTreeMap<IpAddr, BackendState>,
    vip_ids: IdPool,
    rings: IdPool,
    backend_ids: IdPool,
    tx_ports: BTreeSet<u32>,
    /// Receiving interfaces: frames leave them with XDP_TX, no DevMap entry needed.
    local_ports: BTreeSet<u32>,
    /// What health checks, the operator, load reports and the lifecycle say
    /// about each (VIP, backend) pair; absent pairs are at their default.
    pairs: BTreeMap<Pair, PairState>,
}

pub type Pair = (VipIdent, IpAddr);

/// Where the lifecycle puts a backend of a VIP, and the weight factors it
/// gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    pub backend: IpAddr,
    pub service: Service,
    /// Rollouts prefer up-to-date backends (1 = no preference).
    pub preference: f64,
    /// From the backend's load level (1 = unloaded).
    pub load_factor: f64,
}

/// Where the lifecycle puts a backend of a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Service {
    /// In the VIP's Maglev table.
    #[default]
    Serving,
    /// Out of the table; its established flows continue.
    Draining,
    /// Out of service: established flows go elsewhere too.
    Out,
}

/// Everything that decides a pair's weight and whether its flows may stay.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PairState {
    /// A health check says down.
    down: bool,
    /// An operator disabled it.
    disabled: bool,
    service: Service,
    /// The last load report (0 = idle, 1 = at its limit).
    load: Option<f64>,
    /// Weight factor from the backend's load level.
    load_factor: f64,
    /// Weight factor from the lifecycle (preferring up-to-date backends).
    preference: f64,
}

impl Default for PairState {
    fn default() -> Self {
        PairState {
            down: false,
            disabled: false,
            service: Service::Serving,
            load: None,
            load_factor: 1.0,
            preference: 1.0,
        }
    }
}

impl PairState {
    fn in_table(&self) -> bool {
        !self.down && !self.disabled && self.service == Service::Serving
    }

    /// Whether established flows must leave the backend.
    fn blocks_flows(&self) -> bool {
        self.down || self.disabled || self.service == Service::Out
    }
}

impl<D: Datapath> Balancer<D> {
    pub fn new(dp: D, sizes: MapSizes, local_ports: BTreeSet<u32>) -> Self {
        Self {
            dp,
            sizes,
            encap: EncapConfig::default(),
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
        let m = self.sizes.maglev_size;
        if config.datapath.maglev_table_size != m {
            bail!("datapath.maglev_table_size cannot change while running");
        }

        // Plan: what is new, what changes, and does it fit.
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
        // VIPs whose Maglev table must be (re)built: new ones and changed backends or weights.
        let rebuild: BTreeSet<VipIdent> = config
            .vips
            .iter()
            .filter(|v| match self.vips.get(&ident(v)) {
                Some(old) => old.config.backends != v.backends,
                None => true,
            })
            .map(ident)
            .collect();
        let rings_needed = rebuild.len();
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
        if rings_needed > self.rings.available() {
            bail!("not enough free Maglev rings; retry the apply");
        }
        if new_backends.len() > self.backend_ids.available() {
            bail!(
                "not enough backend slots (datapath.max_backends = {})",
                self.sizes.max_backends
            );
        }

        let mut summary = ApplySummary::default();
        self.encap = config.encap;
        self.dp
            .set_settings(&settings(m, &config.encap, &config.visibility))?;

        // 1. New backends.
        for address in new_backends {
            let id = self.backend_ids.take().expect("capacity checked above");
            let next_hop = next_hops.get(&address).copied();
            if let Some(nh) = next_hop {
                self.allow_tx_port(nh.ifindex)?;
            }
            let usable = self.usable(address);
            let state = BackendState {
                id,
                next_hop,
                usable,
            };
            self.dp.clear_backend_counters(id)?;
            self.dp.set_backend(id, &state.info(address))?;
            self.backends.insert(address, state);
            summary.backends_added += 1;
        }

        // 2 and 3. Tables into free rings, then the VIP entries switch over.
        // Ids of removed VIPs may be reused right away: they only index counters.
        let mut gone_vip_states = Vec::new();
        for k in &gone_vips {
            if let Some(old) = self.vips.remove(k) {
                gone_vip_states.push((*k, old));
            }
        }
        let mut reusable_vip_ids: Vec<u32> =
            gone_vip_states.iter().map(|(_, s)| s.vip_id).collect();
        for vip in config.vips.iter().filter(|v| !rebuild.contains(&ident(v))) {
            // Same backends and weights: keep the ring; the name may change.
            if let Some(state) = self.vips.get_mut(&ident(vip)) {
                state.config = vip.clone();
            }
            summary.vips_unchanged += 1;
        }
        // Tables are built on all cores a chunk at a time (bounding memory),
        // then written and switched in one VIP at a time.
        let to_build: Vec<&VipConfig> = config
            .vips
            .iter()
            .filter(|v| rebuild.contains(&ident(v)))
            .collect();
        for chunk in to_build.chunks(64) {
            let sets: Vec<Vec<maglev::Entry>> = chunk
                .iter()
                .map(|vip| vip.backends.iter().map(|b| self.entry(vip, b)).collect())
                .collect();
            let tables = maglev::build_many(&sets, m);
            for (vip, table) in chunk.iter().zip(tables) {
                self.switch_vip(vip, &table, &mut reusable_vip_ids, &mut summary)?;
            }
        }

        // 4. Removed VIPs, their address markers, then removed backends.
        let live_addresses: BTreeSet<IpAddr> =
            self.vips.values().map(|v| v.config.address).collect();
        for (k, old) in gone_vip_states {
            self.dp.remove_vip(&vip_key(k.0, k.1, k.2))?;
            if !live_addresses.contains(&k.0) {
                // Several removed VIPs may share the address; remove the marker once.
                let _ = self.dp.remove_vip(&marker_key(k.0));
            }
            self.rings.rest(old.ring);
            summary.vips_removed += 1;
        }
        for id in reusable_vip_ids {
            self.vip_ids.rest(id);
        }
        for address in gone_backends {
            if let Some(state) = self.backends.remove(&address) {
                let mut info = state.info(address);
                info.flags = 0;
                self.dp.set_backend(state.id, &info)?;
                self.backend_ids.rest(state.id);
                summary.backends_removed += 1;
            }
        }
        // Health verdicts of pairs that no longer exist go.
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
        Ok(summary)
    }

    /// A backend as the VIP's Maglev table takes it: no slots while out,
    /// its weight scaled by its load otherwise.
    fn entry(&self, vip: &VipConfig, b: &crate::config::BackendConfig) -> maglev::Entry {
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

    /// `lbctl backend enable|disable`: an operator takes a backend of a VIP
    /// out of service or puts it back. Unknown VIPs and backends are refused.
    pub fn set_enabled(&mut self, vip_name: &str, address: IpAddr, enabled: bool) -> Result<bool> {
        let (vip, address) = self.pair_named(vip_name, address)?;
        self.update_pair(vip, address, |p| p.disabled = !enabled)
    }

    /// Records the load a backend of a VIP last reported (the lifecycle turns
    /// it, with the backend's flows, into a load level and a weight).
    pub fn set_reported_load(&mut self, vip: VipIdent, address: IpAddr, load: f64) -> Result<bool> {
        self.update_pair(vip, address, |p| p.load = Some(load.clamp(0.0, 1.0)))
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

    /// The load a backend of a VIP last reported.
    pub fn reported_load(&self, vip: VipIdent, address: IpAddr) -> Option<f64> {
        self.pairs.get(&(vip, address)).and_then(|p| p.load)
    }

    /// Whether health checks and the operator let the backend serve the VIP
    /// (the lifecycle aside).
    pub fn healthy(&self, vip: VipIdent, address: IpAddr) -> bool {
        self.pairs
            .get(&(vip, address))
            .is_none_or(|p| !p.down && !p.disabled)
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
    pub fn effective_weight(&self, vip: &VipConfig, b: &crate::config::BackendConfig) -> u32 {
        let p = self
            .pairs
            .get(&(ident(vip), b.address))
            .copied()
            .unwrap_or_default();
        if !p.in_table() || b.weight == 0 {
            return 0;
        }
        ((f64::from(b.weight) * p.load_factor * p.preference).round() as u32).max(1)
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

    /// The backend's standing in the VIP: "disabled", "down", "up" or
    /// "unchecked" (no health check configured).
    pub fn standing(&self, vip: &VipConfig, address: IpAddr) -> &'static str {
        let p = self
            .pairs
            .get(&(ident(vip), address))
            .copied()
            .unwrap_or_default();
        if p.disabled {
            "disabled"
        } else if p.down {
            "down"
        } else if vip.health.is_some() {
            "up"
        } else {
            "unchecked"
        }
    }

    /// Writes `table` into a free ring and points the VIP at it.
    fn switch_vip(
        &mut self,
        vip: &VipConfig,
        table: &maglev::Table,
        reusable_vip_ids: &mut Vec<u32>,
        summary: &mut ApplySummary,
    ) -> Result<()> {
        let key = ident(vip);
        let old = self.vips.get(&key).map(|o| (o.vip_id, o.ring));
        let ring = self
            .rings
            .take()
            .expect("capacity checked before any write");
        self.dp.set_ring(ring, &table.slots)?;
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
        let info = VipInfo {
            vip_id,
            ring,
            flags: 0,
        };
        self.dp
            .set_vip(&vip_key(vip.address, vip.port, vip.protocol), &info)?;
        self.dp
            .set_vip(&marker_key(vip.address), &VipInfo::default())?;
        match old {
            Some((_, old_ring)) => {
                self.rings.rest(old_ring);
                summary.vips_changed += 1;
            }
            None => summary.vips_added += 1,
        }
        self.vips.insert(
            key,
            VipState {
                config: vip.clone(),
                vip_id,
                ring,
                slots,
            },
        );
        Ok(())
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

    pub fn vip_status(&self) -> Result<Vec<VipStatus>> {
        let mut out = Vec::new();
        for v in self.vips.values() {
            let c = self.dp.vip_counters(v.vip_id)?;
            out.push(VipStatus {
                name: v.config.name.clone(),
                address: v.config.address,
                port: v.config.port,
                protocol: v.config.protocol,
                vip_id: v.vip_id,
                counters: counters(c),
                backends: v
                    .config
                    .backends
                    .iter()
                    .map(|b| VipBackendStatus {
                        address: b.address,
                        weight: b.weight,
                        maglev_slots: v.slots.get(&b.address).copied().unwrap_or(0),
                        health: self.standing(&v.config, b.address).into(),
                        effective_weight: self.effective_weight(&v.config, b),
                        load_factor: self
                            .pairs
                            .get(&(ident(&v.config), b.address))
                            .map(|p| p.load_factor)
                            .filter(|f| *f < 1.0),
                        state: String::new(),
                        up_to_date: true,
                        load: None,
                        active_flows: 0,
                        drain_progress: None,
                    })
                    .collect(),
            });
        }
        Ok(out)
    }

    pub fn backend_status(&self) -> Result<Vec<BackendStatus>> {
        self.backends
            .iter()
            .map(|(address, state)| {
                Ok(BackendStatus {
                    address: *address,
                    backend_id: state.id,
                    next_hop: state.next_hop.map(|nh| NextHopStatus {
                        ifindex: nh.ifindex,
                        mac: mac_text(nh.dst_mac),
                    }),
                    counters: counters(self.dp.backend_counters(state.id)?),
                    active_flows: 0,
                })
            })
            .collect()
    }
}

fn counters(c: TrafficCounters) -> Counters {
    c.into()
}

pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
pub mod fake {
    //! An in-memory datapath for tests: map contents plus a log of writes.
    use super::*;
    use lb_common::NO_BACKEND;
    use lb_common::{FlowKey, FlowState, PacketCounter, TrafficCounters, OUTCOME_COUNT};
    use std::collections::HashMap;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Op {
        Backend(u32, u32),
        Ring(u32),
        Vip(VipKey, VipInfo),
        RemoveVip(VipKey),
    }

    #[derive(Default)]
    pub struct FakeDatapath {
        pub maglev_size: u32,
        pub settings: Settings,
        pub backends: HashMap<u32, BackendInfo>,
        pub rings: HashMap<u32, Vec<u32>>,
        pub vips: HashMap<VipKey, VipInfo>,
        pub tx_ports: BTreeSet<u32>,
        pub flows: HashMap<FlowKey, FlowState>,
        pub vip_stats: HashMap<u32, TrafficCounters>,
        pub backend_stats: HashMap<u32, TrafficCounters>,
        pub log: Vec<Op>,
    }

    impl FakeDatapath {
        /// The backend a new flow with this hash would get, as the datapath decides.
        pub fn pick(&self, key: &VipKey, hash: u32) -> Option<u32> {
            let vip = self.vips.get(key)?;
            let ring = self.rings.get(&vip.ring)?;
            let id = ring[(hash % self.maglev_size) as usize];
            (id != NO_BACKEND).then_some(id)
        }
    }

    impl Datapath for FakeDatapath {
        fn set_settings(&mut self, settings: &Settings) -> Result<()> {
            self.settings = *settings;
            Ok(())
        }
        fn set_backend(&mut self, id: u32, backend: &BackendInfo) -> Result<()> {
            self.backends.insert(id, *backend);
            self.log.push(Op::Backend(id, backend.flags));
            Ok(())
        }
        fn set_ring(&mut self, ring: u32, slots: &[u32]) -> Result<()> {
            assert_eq!(slots.len() as u32, self.maglev_size);
            self.rings.insert(ring, slots.to_vec());
            self.log.push(Op::Ring(ring));
            Ok(())
        }
        fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
            self.vips.insert(*key, *info);
            self.log.push(Op::Vip(*key, *info));
            Ok(())
        }
        fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
            if self.vips.remove(key).is_none() {
                bail!("no such VIP");
            }
            self.log.push(Op::RemoveVip(*key));
            Ok(())
        }
        fn clear_vip_counters(&mut self, _: u32) -> Result<()> {
            Ok(())
        }
        fn clear_backend_counters(&mut self, _: u32) -> Result<()> {
            Ok(())
        }
        fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
            self.tx_ports.insert(ifindex);
            Ok(())
        }
        fn vip_counters(&self, id: u32) -> Result<TrafficCounters> {
            Ok(self.vip_stats.get(&id).copied().unwrap_or_default())
        }
        fn backend_counters(&self, id: u32) -> Result<TrafficCounters> {
            Ok(self.backend_stats.get(&id).copied().unwrap_or_default())
        }
        fn outcomes(&self) -> Result<Vec<PacketCounter>> {
            Ok(vec![PacketCounter::default(); OUTCOME_COUNT as usize])
        }
        fn scan_flows(&self, each: &mut dyn FnMut(&FlowKey, &FlowState)) -> Result<usize> {
            for (k, v) in &self.flows {
                each(k, v);
            }
            Ok(self.flows.len())
        }
        fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
            self.flows.remove(key);
            Ok(())
        }
        fn event_stats(&self) -> Result<(u64, u64)> {
            Ok((0, 0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fake::*, *};
    use crate::config::Config;

    const SIZES: MapSizes = MapSizes {
        maglev_size: 257,
        max_vips: 4,
        max_backends: 8,
        flow_table_size: 1024,
    };

    fn config(vips: &str) -> BalancerConfig {
        let text = format!(
            "[datapath]\ninterfaces=[\"eth0\"]\nmaglev_table_size=257\nmax_vips=4\nmax_backends=8\n\
             [encap]\nsource_v4=\"198.18.200.0/24\"\nsource_v6=\"fd00:200::/64\"\n{vips}"
        );
        Config::from_toml(&text).unwrap().balancer.unwrap()
    }

    fn vip(addr: &str, port: u16, backends: &[(&str, u32)]) -> String {
        let list: Vec<String> = backends
            .iter()
            .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
            .collect();
        format!(
            "[[vips]]\naddress=\"{addr}\"\nport={port}\nprotocol=\"tcp\"\nbackends=[{}]\n",
            list.join(", ")
        )
    }

    /// VIP 198.18.10.1:80 over two equal backends.
    fn web_two() -> BalancerConfig {
        config(&vip(
            "198.18.10.1",
            80,
            &[("198.18.0.11", 1), ("198.18.0.12", 1)],
        ))
    }

    fn balancer() -> Balancer<FakeDatapath> {
        let dp = FakeDatapath {
            maglev_size: 257,
            ..FakeDatapath::default()
        };
        Balancer::new(dp, SIZES, BTreeSet::from([2]))
    }

    impl Balancer<FakeDatapath> {
        fn apply_cfg(&mut self, c: &BalancerConfig) -> Result<ApplySummary> {
            self.apply(c, &BTreeMap::new())
        }
    }

    fn key(addr: &str, port: u16) -> VipKey {
        vip_key(addr.parse().unwrap(), port, Protocol::Tcp)
    }

    #[test]
    fn first_apply_writes_backends_rings_vips_and_markers() {
        let mut b = balancer();
        let s = b.apply_cfg(&web_two()).unwrap();
        assert_eq!((s.vips_added, s.backends_added), (1, 2));
        let dp = b.datapath();
        assert_eq!(dp.backends.len(), 2);
        assert!(dp
            .backends
            .values()
            .all(|i| i.flags == BACKEND_USABLE | BACKEND_AVAILABLE));
        assert!(dp.vips.contains_key(&key("198.18.10.1", 80)));
        assert!(dp
            .vips
            .contains_key(&marker_key("198.18.10.1".parse().unwrap())));
        assert_eq!(dp.settings.maglev_size, 257);
        assert_eq!(u32::from_be(dp.settings.src_v4_hostmask), 0xff);
        assert_eq!(u32::from_be(dp.settings.src_v6_hostmask), u32::MAX);
        // The ring holds both backends in about equal shares.
        let ring = &dp.rings[&dp.vips[&key("198.18.10.1", 80)].ring];
        let first = ring.iter().filter(|id| **id == ring[0]).count();
        assert!((120..=137).contains(&first), "{first} of 257 slots");
    }

    #[test]
    fn changed_weights_go_to_a_new_ring_written_before_the_switch() {
        let mut b = balancer();
        b.apply_cfg(&web_two()).unwrap();
        let old_ring = b.datapath().vips[&key("198.18.10.1", 80)].ring;
        let start = b.datapath().log.len();
        let s = b
            .apply_cfg(&config(&vip(
                "198.18.10.1",
                80,
                &[("198.18.0.11", 3), ("198.18.0.12", 1)],
            )))
            .unwrap();
        assert_eq!(
            (s.vips_changed, s.backends_added, s.backends_removed),
            (1, 0, 0)
        );
        let log = &b.datapath().log[start..];
        let new_ring = b.datapath().vips[&key("198.18.10.1", 80)].ring;
        assert_ne!(new_ring, old_ring);
        let ring_at = log.iter().position(|o| *o == Op::Ring(new_ring)).unwrap();
        let switch_at = log
            .iter()
            .position(|o| matches!(o, Op::Vip(k, i) if *k == key("198.18.10.1", 80) && i.ring == new_ring))
            .unwrap();
        assert!(ring_at < switch_at);
        // The VIP keeps its id (and counters).
        assert_eq!(b.datapath().vips[&key("198.18.10.1", 80)].vip_id, 0);
    }

    #[test]
    fn unchanged_vips_keep_their_ring_and_write_nothing() {
        let mut b = balancer();
        let c = config(&vip("198.18.10.1", 80, &[("198.18.0.11", 1)]));
        b.apply(&c, &BTreeMap::new()).unwrap();
        let start = b.datapath().log.len();
        let s = b.apply(&c, &BTreeMap::new()).unwrap();
        assert_eq!(s.vips_unchanged, 1);
        assert_eq!(b.datapath().log.len(), start);
    }

    #[test]
    fn removed_backend_loses_usable_bit_after_vip_switch() {
        let mut b = balancer();
        b.apply_cfg(&web_two()).unwrap();
        let gone_id = b.backends[&"198.18.0.12".parse().unwrap()].id;
        let start = b.datapath().log.len();
        let s = b
            .apply_cfg(&config(&vip("198.18.10.1", 80, &[("198.18.0.11", 1)])))
            .unwrap();
        assert_eq!(s.backends_removed, 1);
        let log = &b.datapath().log[start..];
        let switch_at = log.iter().position(|o| matches!(o, Op::Vip(..))).unwrap();
        let cleared_at = log
            .iter()
            .position(|o| *o == Op::Backend(gone_id, 0))
            .unwrap();
        assert!(switch_at < cleared_at);
        let ring = &b.datapath().rings[&b.datapath().vips[&key("198.18.10.1", 80)].ring];
        assert!(!ring.contains(&gone_id));
    }

    #[test]
    fn removed_vip_and_its_marker_go() {
        let mut b = balancer();
        b.apply_cfg(&config(&format!(
            "{}{}",
            vip("198.18.10.1", 80, &[("198.18.0.11", 1)]),
            vip("198.18.10.2", 80, &[("198.18.0.11", 1)])
        )))
        .unwrap();
        b.apply_cfg(&config(&vip("198.18.10.1", 80, &[("198.18.0.11", 1)])))
            .unwrap();
        let dp = b.datapath();
        assert!(!dp.vips.contains_key(&key("198.18.10.2", 80)));
        assert!(!dp
            .vips
            .contains_key(&marker_key("198.18.10.2".parse().unwrap())));
        assert!(dp
            .vips
            .contains_key(&marker_key("198.18.10.1".parse().unwrap())));
    }

    #[test]
    fn many_applies_never_run_out_of_rings_or_reuse_a_live_ring() {
        let mut b = balancer();
        for round in 0..50u32 {
            let vips: String = (0..4)
                .map(|i| {
                    vip(
                        &format!("198.18.10.{}", i + 1),
                        80,
                        &[("198.18.0.11", round + 1), ("198.18.0.12", 1)],
                    )
                })
                .collect();
            b.apply_cfg(&config(&vips)).unwrap();
            let live: BTreeSet<u32> = b.vips.values().map(|v| v.ring).collect();
            assert_eq!(live.len(), 4, "round {round}: two VIPs share a ring");
        }
    }

    #[test]
    fn too_many_backends_changes_nothing() {
        let mut b = balancer();
        b.apply_cfg(&config(&vip("198.18.10.1", 80, &[("198.18.0.11", 1)])))
            .unwrap();
        let before = b.datapath().log.len();
        let many: Vec<(String, u32)> = (0..9).map(|i| (format!("198.18.1.{i}"), 1)).collect();
        let many: Vec<(&str, u32)> = many.iter().map(|(a, w)| (a.as_str(), *w)).collect();
        // The config itself is valid for max_backends=8 per... use a raw build to bypass validation.
        let mut c = config(&vip("198.18.10.1", 80, &[("198.18.0.11", 1)]));
        c.vips[0].backends = many
            .iter()
            .map(|(a, w)| crate::config::BackendConfig {
                address: a.parse().unwrap(),
                weight: *w,
                max_flows: None,
            })
            .collect();
        assert!(b.apply(&c, &BTreeMap::new()).is_err());
        assert_eq!(b.datapath().log.len(), before);
    }

    #[test]
    fn next_hops_fill_backend_entries_and_tx_ports() {
        let mut b = balancer();
        b.apply_cfg(&web_two()).unwrap();
        let nh = NextHop {
            ifindex: 7,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
        };
        assert!(b
            .set_next_hop("198.18.0.11".parse().unwrap(), Some(nh))
            .unwrap());
        assert!(!b
            .set_next_hop("198.18.0.11".parse().unwrap(), Some(nh))
            .unwrap());
        let local = NextHop { ifindex: 2, ..nh };
        assert!(b
            .set_next_hop("198.18.0.12".parse().unwrap(), Some(local))
            .unwrap());
        let dp = b.datapath();
        let id = b.backends[&"198.18.0.11".parse().unwrap()].id;
        assert_eq!(dp.backends[&id].ifindex, 7);
        assert_eq!(dp.backends[&id].dst_mac, [2, 0, 0, 0, 0, 2]);
        assert_eq!(dp.tx_ports, BTreeSet::from([7]));
    }

    #[test]
    fn a_down_backend_leaves_the_table_then_loses_its_flows_and_comes_back() {
        let mut b = balancer();
        b.apply_cfg(&web_two()).unwrap();
        let addr: IpAddr = "198.18.0.12".parse().unwrap();
        let id = b.backends[&addr].id;
        let web = ("198.18.10.1".parse().unwrap(), 80, Protocol::Tcp);
        let start = b.datapath().log.len();
        assert!(b.set_health(web, addr, false).unwrap());
        assert!(
            !b.set_health(web, addr, false).unwrap(),
            "no change, no writes"
        );
        let log = b.datapath().log[start..].to_vec();
        let switch = log
            .iter()
            .position(|o| matches!(o, Op::Vip(k, _) if *k == key("198.18.10.1", 80)))
            .unwrap();
        let unusable = log.iter().position(|o| *o == Op::Backend(id, 0)).unwrap();
        assert!(
            switch < unusable,
            "new flows stop before established ones move"
        );
        let ring = &b.datapath().rings[&b.datapath().vips[&key("198.18.10.1", 80)].ring];
        assert!(!ring.contains(&id));
        // A reload keeps the verdict.
        b.apply_cfg(&config(&vip(
            "198.18.10.1",
            80,
            &[("198.18.0.11", 2), ("198.18.0.12", 1)],
        )))
        .unwrap();
        let ring = &b.datapath().rings[&b.datapath().vips[&key("198.18.10.1", 80)].ring];
        assert!(!ring.contains(&id));
        let start = b.datapath().log.len();
        assert!(b.set_health(web, addr, true).unwrap());
        let log = b.datapath().log[start..].to_vec();
        let usable = log
            .iter()
            .position(|o| *o == Op::Backend(id, BACKEND_USABLE | BACKEND_AVAILABLE))
            .unwrap();
        let switch = log.iter().position(|o| matches!(o, Op::Vip(..))).unwrap();
        assert!(usable < switch, "usable again before new flows come");
        let ring = &b.datapath().rings[&b.datapath().vips[&key("198.18.10.1", 80)].ring];
        assert!(ring.contains(&id));
        // Unknown pairs change nothing.
        assert!(!b
            .set_health(web, "198.18.0.99".parse().unwrap(), false)
            .unwrap());
    }

    #[test]
    fn disabled_and_down_are_both_needed_to_clear() {
        let mut b = balancer();
        b.apply_cfg(&web_two()).unwrap();
        let addr: IpAddr = "198.18.0.12".parse().unwrap();
        let id = b.backends[&addr].id;
        let web = ("198.18.10.1".parse().unwrap(), 80, Protocol::Tcp);
        let name = b.vips[&web].config.name.clone();
        let ring = |b: &Balancer<FakeDatapath>| {
            b.datapath().rings[&b.datapath().vips[&key("198.18.10.1", 80)].ring].clone()
        };
        assert!(b.set_enabled(&name, addr, false).unwrap());
        assert!(!ring(&b).contains(&id));
        assert_eq!(b.datapath().backends[&id].flags, 0);
        assert!(b.set_health(web, addr, false).unwrap());
        assert!(b.set_enabled(&name, addr, true).unwrap());
        assert!(!ring(&b).contains(&id), "still down");
        assert!(b.set_health(web, addr, true).unwrap());
        assert!(ring(&b).contains(&id));
        assert_eq!(
            b.datapath().backends[&id].flags,
            BACKEND_USABLE | BACKEND_AVAILABLE
        );
        // Unknown names and backends are refused and change nothing.
        let before = b.datapath().log.len();
        assert!(b.set_enabled("nope", addr, false).is_err());
        assert!(b
            .set_enabled(&name, "198.18.0.99".parse().unwrap(), false)
            .is_err());
        assert_eq!(b.datapath().log.len(), before);
    }

    #[test]
    fn load_scales_weights_and_shares() {
        let mut b = balancer();
        b.apply_cfg(&config(&vip(
            "198.18.10.1",
            80,
            &[("198.18.0.11", 100), ("198.18.0.12", 100)],
        )))
        .unwrap();
        let web = ("198.18.10.1".parse().unwrap(), 80, Protocol::Tcp);
        let busy: IpAddr = "198.18.0.12".parse().unwrap();
        let place = Placement {
            backend: busy,
            service: Service::Serving,
            preference: 1.0,
            load_factor: 0.25,
        };
        assert!(b.set_service(web, &[place]).unwrap());
        let writes = b.datapath().log.len();
        assert!(
            !b.set_service(web, &[place]).unwrap(),
            "same factor, no rebuild"
        );
        assert_eq!(b.datapath().log.len(), writes);
        let status = b.vip_status().unwrap();
        let s = &status[0].backends;
        assert_eq!((s[0].effective_weight, s[1].effective_weight), (100, 25));
        let share = f64::from(s[1].maglev_slots) / 257.0;
        assert!((share - 0.2).abs() < 0.02, "25 of 125: {share}");
    }

    #[test]
    fn two_agents_agree_whatever_the_order() {
        let mut a = balancer();
        let mut b = balancer();
        a.apply_cfg(&config(&vip(
            "198.18.10.1",
            80,
            &[("198.18.0.11", 2), ("198.18.0.12", 1), ("198.18.0.13", 1)],
        )))
        .unwrap();
        b.apply_cfg(&config(&vip(
            "198.18.10.1",
            80,
            &[("198.18.0.13", 1), ("198.18.0.11", 2), ("198.18.0.12", 1)],
        )))
        .unwrap();
        let addr_of = |bal: &Balancer<FakeDatapath>, id: u32| {
            *bal.backends.iter().find(|(_, s)| s.id == id).unwrap().0
        };
        for hash in 0..257 {
            let pa = a.datapath().pick(&key("198.18.10.1", 80), hash).unwrap();
            let pb = b.datapath().pick(&key("198.18.10.1", 80), hash).unwrap();
            assert_eq!(addr_of(&a, pa), addr_of(&b, pb));
        }
    }
}
