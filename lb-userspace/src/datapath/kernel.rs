//! The balancer's maps in a loaded eBPF object, behind `Datapath`.

use std::{os::fd::AsFd as _, sync::Arc};

use anyhow::{Context as _, Result};
use aya::{
    maps::{Array, DevMapHash, HashMap, IterableMap as _, MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
    Ebpf,
};
use lb_common::{
    BackendInfo, FlowKey, FlowState, MaglevChunk, PacketCounter, Settings, TrafficCounters,
    VipInfo, VipKey, MAGLEV_LANES, OUTCOME_COUNT,
};

use super::{
    flow_slots::{FlowSlots, Taken},
    map_array,
    vip_index::VipIndexMaps,
    Datapath, MapSizes,
};

/// The Maglev ring array, mapped into the agent's memory (the map is created
/// with `BPF_F_MMAPABLE`): writing a ring is one copy, where a syscall per slot
/// (or the kernel's per-element batch update) costs seconds for many VIPs.
struct MappedRings {
    ptr: *mut u32,
    /// Mapped length in slots (whole `MaglevChunk`s).
    slots: usize,
    // Unmapped on drop.
    _mapping: memmap2::MmapMut,
    // Keeps the map alive as long as the mapping.
    _map: Array<MapData, MaglevChunk>,
}

// SAFETY: the mapping is owned by this value; access goes through &mut self.
unsafe impl Send for MappedRings {}

impl MappedRings {
    fn new(map: Array<MapData, MaglevChunk>, slots: usize) -> Result<Self> {
        let slots = slots.div_ceil(MAGLEV_LANES as usize) * MAGLEV_LANES as usize;
        let mut mapping = map_array(
            map.map().fd().as_fd(),
            slots * std::mem::size_of::<u32>(),
            "MAGLEV",
        )?;
        Ok(Self {
            ptr: mapping.as_mut_ptr().cast(),
            slots,
            _mapping: mapping,
            _map: map,
        })
    }

    fn write(&mut self, offset: usize, values: &[u32]) -> Result<()> {
        if offset + values.len() > self.slots {
            anyhow::bail!("Maglev ring write beyond the map");
        }
        // SAFETY: in bounds (checked above) of a live, writable mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.add(offset), values.len());
        }
        Ok(())
    }
}

/// The balancer's maps, taken out of a loaded object.
pub struct KernelDatapath {
    settings: Array<MapData, Settings>,
    backends: Array<MapData, BackendInfo>,
    maglev: MappedRings,
    vips: HashMap<MapData, VipKey, VipInfo>,
    vip_index: VipIndexMaps,
    tx_ports: DevMapHash<MapData>,
    pub(super) vip_stats: PerCpuArray<MapData, TrafficCounters>,
    pub(super) backend_stats: PerCpuArray<MapData, TrafficCounters>,
    pub(super) outcomes: PerCpuArray<MapData, PacketCounter>,
    pub(super) flows: Arc<FlowSlots>,
    pub(super) event_stats: PerCpuArray<MapData, u64>,
    pub(super) mss_clamped: PerCpuArray<MapData, u64>,
    pub(super) flows_unrecorded: PerCpuArray<MapData, u64>,
    cpus: usize,
}

/// Every entry of a VIPS map (this datapath's, or one being migrated).
pub(super) fn vip_entries<V: aya::Pod>(
    map: &HashMap<MapData, VipKey, V>,
) -> Result<Vec<(VipKey, V)>> {
    map.iter().map(|e| e.context("reading VIPS")).collect()
}

/// Every entry of a BACKENDS map with any flag set, by id.
pub(super) fn backend_entries(
    map: &Array<MapData, BackendInfo>,
) -> Result<Vec<(u32, BackendInfo)>> {
    let mut out = Vec::new();
    for id in 0..map.len() {
        let info = map.get(&id, 0).context("reading BACKENDS")?;
        if info.flags != 0 {
            out.push((id, info));
        }
    }
    Ok(out)
}

/// A map of the object as it is (for the maps this side memory-maps).
pub(super) fn take_data(ebpf: &mut Ebpf, name: &str) -> Result<MapData> {
    match ebpf.take_map(name) {
        Some(aya::maps::Map::Array(data)) => Ok(data),
        Some(_) => anyhow::bail!("map {name} is not an array"),
        None => anyhow::bail!("the eBPF object has no map {name}"),
    }
}

pub(super) fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn sum_counters(values: PerCpuValues<TrafficCounters>) -> TrafficCounters {
    values
        .iter()
        .fold(TrafficCounters::default(), |acc, v| TrafficCounters {
            packets: acc.packets + v.packets,
            bytes: acc.bytes + v.bytes,
            bytes_out: acc.bytes_out + v.bytes_out,
            new_flows: acc.new_flows + v.new_flows,
            closed_fin: acc.closed_fin + v.closed_fin,
            closed_rst: acc.closed_rst + v.closed_rst,
        })
}

pub fn sum_packets(values: &PerCpuValues<PacketCounter>) -> PacketCounter {
    values
        .iter()
        .fold(PacketCounter::default(), |acc, v| PacketCounter {
            packets: acc.packets + v.packets,
            bytes: acc.bytes + v.bytes,
        })
}

impl KernelDatapath {
    pub fn new(ebpf: &mut Ebpf, sizes: &MapSizes) -> Result<Self> {
        let cpus = nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        let slots = sizes.maglev_slots as usize;
        let vips = take(ebpf, "VIPS")?;
        // Filled from the VIP table a previous agent left, if any.
        let vip_index = VipIndexMaps::new(
            take(ebpf, "VIP_BY_ID")?,
            take(ebpf, "VIP_FILTER")?,
            &vip_entries(&vips)?,
        )?;
        Ok(Self {
            settings: take(ebpf, "SETTINGS")?,
            backends: take(ebpf, "BACKENDS")?,
            maglev: MappedRings::new(take(ebpf, "MAGLEV")?, slots)?,
            vips,
            vip_index,
            tx_ports: take(ebpf, "TX_PORTS")?,
            vip_stats: take(ebpf, "VIP_STATS")?,
            backend_stats: take(ebpf, "BACKEND_STATS")?,
            outcomes: take(ebpf, "OUTCOMES")?,
            flows: Arc::new(FlowSlots::open(
                take_data(ebpf, "FLOWS")?,
                Some(sizes.flow_table_size),
            )?),
            event_stats: take(ebpf, "EVENT_STATS")?,
            mss_clamped: take(ebpf, "MSS_CLAMPED")?,
            flows_unrecorded: take(ebpf, "FLOWS_UNRECORDED")?,
            cpus,
        })
    }

    /// One connection-table entry.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowState>> {
        Ok(self.flows.get(key))
    }

    /// The connection table itself (for benchmarks and tools).
    pub fn flows_map(&self) -> &MapData {
        self.flows.map()
    }

    /// The connection table, mapped.
    pub fn flow_slots(&self) -> &Arc<FlowSlots> {
        &self.flows
    }

    /// Removes flows, waiting for one RCU grace period for all of them
    /// (`remove_flow` waits for one each).
    pub fn remove_flows(&mut self, keys: &[FlowKey]) {
        let taken: Vec<u32> = keys
            .iter()
            .filter_map(|k| match self.flows.take(k, None) {
                Taken::Slot(i) => Some(i),
                _ => None,
            })
            .collect();
        self.flows.release(&taken);
    }

    fn zeros<T: aya::Pod + Default>(&self) -> Result<PerCpuValues<T>> {
        PerCpuValues::try_from(vec![T::default(); self.cpus]).context("building per-CPU values")
    }
}

impl Datapath for KernelDatapath {
    fn vip_entries(&self) -> Result<Vec<(VipKey, VipInfo)>> {
        vip_entries(&self.vips)
    }

    fn backend_entries(&self) -> Result<Vec<(u32, BackendInfo)>> {
        backend_entries(&self.backends)
    }

    fn set_settings(&mut self, settings: &Settings) -> Result<()> {
        self.settings
            .set(0, settings, 0)
            .context("writing SETTINGS")
    }

    fn set_backend(&mut self, id: u32, backend: &BackendInfo) -> Result<()> {
        self.backends
            .set(id, backend, 0)
            .with_context(|| format!("writing backend {id}"))
    }

    fn set_ring(&mut self, base: u32, slots: &[u32]) -> Result<()> {
        self.maglev
            .write(base as usize, slots)
            .with_context(|| format!("writing the Maglev ring at slot {base}"))
    }

    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
        self.vip_index.before_set(key, info)?;
        self.vips.insert(key, info, 0).context("writing a VIP")
    }

    fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        self.vips.remove(key).context("removing a VIP")?;
        self.vip_index.after_remove(key)
    }

    fn clear_vip_counters(&mut self, vip_id: u32) -> Result<()> {
        let zeros = self.zeros()?;
        self.vip_stats
            .set(vip_id, zeros, 0)
            .context("clearing VIP counters")
    }

    fn clear_backend_counters(&mut self, id: u32) -> Result<()> {
        let zeros = self.zeros()?;
        self.backend_stats
            .set(id, zeros, 0)
            .context("clearing backend counters")
    }

    fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .with_context(|| format!("adding interface {ifindex} to TX_PORTS"))
    }

    fn vip_counters(&self, vip_id: u32) -> Result<TrafficCounters> {
        Ok(sum_counters(self.vip_stats.get(&vip_id, 0)?))
    }

    fn backend_counters(&self, id: u32) -> Result<TrafficCounters> {
        Ok(sum_counters(self.backend_stats.get(&id, 0)?))
    }

    fn outcomes(&self) -> Result<Vec<PacketCounter>> {
        (0..OUTCOME_COUNT)
            .map(|i| Ok(sum_packets(&self.outcomes.get(&i, 0)?)))
            .collect()
    }

    fn scan_flows(&self, each: &mut dyn FnMut(&FlowKey, &FlowState)) -> Result<usize> {
        Ok(self.flows.for_each(each))
    }

    fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        self.remove_flows(std::slice::from_ref(key));
        Ok(())
    }

    fn event_stats(&self) -> Result<(u64, u64)> {
        let sum = |i: u32| -> Result<u64> { Ok(self.event_stats.get(&i, 0)?.iter().sum()) };
        Ok((
            sum(lb_common::EVENTS_SENT)?,
            sum(lb_common::EVENTS_DROPPED)?,
        ))
    }

    fn mss_clamped(&self) -> Result<u64> {
        Ok(self.mss_clamped.get(&0, 0)?.iter().sum())
    }

    fn flows_unrecorded(&self) -> Result<u64> {
        Ok(self.flows_unrecorded.get(&0, 0)?.iter().sum())
    }
}
