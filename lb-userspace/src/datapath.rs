//! The narrow interface between control logic and the kernel maps, and its
//! implementation over the loaded eBPF object.
//!
//! Control logic (`balancer`) only talks to `Datapath`, so it is unit-tested
//! with an in-memory fake and no kernel.

use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::{Context as _, Result};
use aya::{
    maps::{Array, DevMapHash, HashMap, IterableMap as _, MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
    Ebpf,
};
use lb_common::{
    BackendInfo, FlowKey, FlowState, HostAddr, MaglevChunk, PacketCounter, Settings,
    TrafficCounters, VipInfo, VipKey, DECAP_OUTCOME_COUNT, MAGLEV_LANES, OUTCOME_COUNT,
};

/// What the balancer logic needs from the datapath.
pub trait Datapath {
    fn set_settings(&mut self, settings: &Settings) -> Result<()>;
    fn set_backend(&mut self, id: u32, backend: &BackendInfo) -> Result<()>;
    /// Writes a whole Maglev ring (its `maglev_size` slots).
    fn set_ring(&mut self, ring: u32, slots: &[u32]) -> Result<()>;
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()>;
    fn remove_vip(&mut self, key: &VipKey) -> Result<()>;
    fn clear_vip_counters(&mut self, vip_id: u32) -> Result<()>;
    fn clear_backend_counters(&mut self, id: u32) -> Result<()>;
    /// Allows redirects to `ifindex` (an interface other than the receiving one).
    fn add_tx_port(&mut self, ifindex: u32) -> Result<()>;
    fn vip_counters(&self, vip_id: u32) -> Result<TrafficCounters>;
    fn backend_counters(&self, id: u32) -> Result<TrafficCounters>;
    /// `lb_ingress` outcome counters, indexed by `Outcome`.
    fn outcomes(&self) -> Result<Vec<PacketCounter>>;
    /// Hands every connection-table entry to `each`; returns how many.
    fn scan_flows(&self, each: &mut dyn FnMut(&FlowKey, &FlowState)) -> Result<usize>;
    /// Deletes a flow (expiry). A flow already gone is not an error.
    fn remove_flow(&mut self, key: &FlowKey) -> Result<()>;
    /// Flow events sent and dropped (ring buffer full).
    fn event_stats(&self) -> Result<(u64, u64)>;
}

/// Map sizes set before the object is loaded.
#[derive(Debug, Clone, Copy)]
pub struct MapSizes {
    pub maglev_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    pub flow_table_size: u32,
}

impl MapSizes {
    /// Smallest sizes, for an agent that only decapsulates.
    pub const DECAP_ONLY: MapSizes = MapSizes {
        maglev_size: 7,
        max_vips: 1,
        max_backends: 1,
        flow_table_size: 1,
    };

    /// Maglev rings: two per VIP, so a changed table is written beside the
    /// live one and switched in.
    pub fn rings(&self) -> u32 {
        2 * self.max_vips
    }
}

/// The eBPF object, embedded at build time (`cargo xtask build-ebpf`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJECT"));

/// Loads the embedded object with the given sizes. Programs are not attached.
pub fn load(sizes: &MapSizes) -> Result<Ebpf> {
    let slots = u64::from(sizes.rings()) * u64::from(sizes.maglev_size);
    let chunks = slots.div_ceil(u64::from(MAGLEV_LANES));
    let chunks = u32::try_from(chunks).context("Maglev rings do not fit a BPF array")?;
    aya::EbpfLoader::new()
        // VIP entries of the old and the new configuration coexist during an
        // apply, plus one address marker per VIP address.
        .map_max_entries("VIPS", 4 * sizes.max_vips)
        .map_max_entries("MAGLEV", chunks)
        .map_max_entries("BACKENDS", sizes.max_backends)
        .map_max_entries("FLOWS", sizes.flow_table_size)
        .map_max_entries("VIP_STATS", sizes.max_vips)
        .map_max_entries("BACKEND_STATS", sizes.max_backends)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object")
}

/// The Maglev ring array, mapped into the agent's memory (the map is created
/// with `BPF_F_MMAPABLE`): writing a ring is one copy, where a syscall per slot
/// (or the kernel's per-element batch update) costs seconds for many VIPs.
struct MappedRings {
    ptr: *mut u32,
    /// Mapped length in slots (whole `MaglevChunk`s).
    slots: usize,
    // Keeps the map alive as long as the mapping.
    _map: Array<MapData, MaglevChunk>,
}

// SAFETY: the mapping is owned by this value; access goes through &mut self.
unsafe impl Send for MappedRings {}

impl MappedRings {
    fn new(map: Array<MapData, MaglevChunk>, slots: usize) -> Result<Self> {
        let slots = slots.div_ceil(MAGLEV_LANES as usize) * MAGLEV_LANES as usize;
        let len = slots * std::mem::size_of::<u32>();
        let fd = map.map().fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF array fd we own, shared and writable; the kernel
        // checks the length against the map.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("memory-mapping MAGLEV");
        }
        Ok(Self {
            ptr: ptr.cast(),
            slots,
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

impl Drop for MappedRings {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.slots * std::mem::size_of::<u32>()) };
    }
}

/// The balancer's maps, taken out of a loaded object.
pub struct KernelDatapath {
    settings: Array<MapData, Settings>,
    backends: Array<MapData, BackendInfo>,
    maglev: MappedRings,
    vips: HashMap<MapData, VipKey, VipInfo>,
    tx_ports: DevMapHash<MapData>,
    vip_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    outcomes: PerCpuArray<MapData, PacketCounter>,
    flows: HashMap<MapData, FlowKey, FlowState>,
    event_stats: PerCpuArray<MapData, u64>,
    maglev_size: u32,
    cpus: usize,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
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
        let maglev_size = sizes.maglev_size;
        let slots = sizes.rings() as usize * maglev_size as usize;
        Ok(Self {
            settings: take(ebpf, "SETTINGS")?,
            backends: take(ebpf, "BACKENDS")?,
            maglev: MappedRings::new(take(ebpf, "MAGLEV")?, slots)?,
            vips: take(ebpf, "VIPS")?,
            tx_ports: take(ebpf, "TX_PORTS")?,
            vip_stats: take(ebpf, "VIP_STATS")?,
            backend_stats: take(ebpf, "BACKEND_STATS")?,
            outcomes: take(ebpf, "OUTCOMES")?,
            flows: take(ebpf, "FLOWS")?,
            event_stats: take(ebpf, "EVENT_STATS")?,
            maglev_size,
            cpus,
        })
    }

    /// One connection-table entry.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowState>> {
        match self.flows.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading a flow"),
        }
    }

    /// The connection table itself (for benchmarks and tools).
    pub fn flows_map(&self) -> &MapData {
        self.flows.map()
    }

    fn zeros<T: aya::Pod + Default>(&self) -> Result<PerCpuValues<T>> {
        PerCpuValues::try_from(vec![T::default(); self.cpus]).context("building per-CPU values")
    }
}

impl Datapath for KernelDatapath {
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

    fn set_ring(&mut self, ring: u32, slots: &[u32]) -> Result<()> {
        let base = ring as usize * self.maglev_size as usize;
        self.maglev
            .write(base, slots)
            .with_context(|| format!("writing Maglev ring {ring}"))
    }

    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
        self.vips.insert(key, info, 0).context("writing a VIP")
    }

    fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        self.vips.remove(key).context("removing a VIP")
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
        crate::batch::for_each(self.flows.map(), 8192, |k, v| each(k, v))
            .context("scanning the connection table")
    }

    fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        match self.flows.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing a flow"),
        }
    }

    fn event_stats(&self) -> Result<(u64, u64)> {
        let sum = |i: u32| -> Result<u64> { Ok(self.event_stats.get(&i, 0)?.iter().sum()) };
        Ok((
            sum(lb_common::EVENTS_SENT)?,
            sum(lb_common::EVENTS_DROPPED)?,
        ))
    }
}

/// A second handle on the connection table, for the collector: it reads and
/// expires flows without holding the agent's state lock.
pub struct FlowTable {
    flows: HashMap<MapData, FlowKey, FlowState>,
}

impl KernelDatapath {
    pub fn flow_table(&self) -> Result<FlowTable> {
        let fd = self
            .flows
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the connection table's fd")?;
        let data = MapData::from_fd(fd).context("opening the connection table again")?;
        let flows = HashMap::try_from(aya::maps::Map::LruHashMap(data))
            .context("the connection table has an unexpected type")?;
        Ok(FlowTable { flows })
    }
}

impl crate::collector::FlowSource for FlowTable {
    fn scan_flows(&self, each: &mut dyn FnMut(&FlowKey, &FlowState)) -> Result<usize> {
        crate::batch::for_each(self.flows.map(), 8192, |k, v| each(k, v))
            .context("scanning the connection table")
    }

    fn remove_idle_flow(&mut self, key: &FlowKey, last_ns: u64) -> Result<bool> {
        match self.flows.get(key, 0) {
            Ok(state) if state.last_ns != last_ns => return Ok(false),
            Ok(_) => {}
            Err(aya::maps::MapError::KeyNotFound) => return Ok(true),
            Err(e) => return Err(e).context("reading a flow"),
        }
        match self.flows.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(true),
            Err(e) => Err(e).context("removing a flow"),
        }
    }
}

/// The decapsulator's maps.
pub struct DecapMaps {
    addrs: HashMap<MapData, HostAddr, u32>,
    outcomes: PerCpuArray<MapData, PacketCounter>,
}

impl DecapMaps {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            addrs: take(ebpf, "DECAP_ADDRS")?,
            outcomes: take(ebpf, "DECAP_OUTCOMES")?,
        })
    }

    pub fn add_address(&mut self, addr: std::net::IpAddr) -> Result<()> {
        let (addr, family) = crate::balancer::addr_bytes(addr);
        let key = HostAddr {
            addr,
            family,
            _pad: [0; 3],
        };
        self.addrs.insert(key, 1, 0).context("writing DECAP_ADDRS")
    }

    /// The addresses decapsulated for, as the map holds them.
    pub fn addresses(&self) -> Result<Vec<std::net::IpAddr>> {
        self.addrs
            .keys()
            .map(|k| {
                let k = k.context("reading DECAP_ADDRS")?;
                Ok(crate::balancer::addr_from_bytes(k.addr, k.family))
            })
            .collect()
    }

    pub fn outcomes(&self) -> Result<Vec<PacketCounter>> {
        (0..DECAP_OUTCOME_COUNT)
            .map(|i| Ok(sum_packets(&self.outcomes.get(&i, 0)?)))
            .collect()
    }
}
