//! The narrow interface between control logic and the kernel maps.
//!
//! Control logic (`balancer`, `lifecycle`, `collector`) only talks to
//! `Datapath`, so it is unit-tested with the in-memory fake (`fake`) and no
//! kernel.
//!
//! - `kernel`: the balancer's maps in a loaded object (`KernelDatapath`).
//! - `flow_slots`: the connection table mapped into memory (`FlowSlots`).
//! - `flows`: the connection table as the collector reads it (`FlowSource`,
//!   and `FlowTable`, a second handle read without the agent's lock).
//! - `batch`: `BPF_MAP_LOOKUP_BATCH` scans.
//! - `decap`: the decapsulator's maps.
//! - `bypass`: the source intermediary's maps (bypass entries, flows sent).
//! - `pins`: the maps and links pinned under bpffs, adopted at start.
//! - `migrate`: moving a running datapath into maps of new sizes.
//! - `fake`: the in-memory datapath for unit tests.

mod batch;
mod bypass;
mod decap;
#[cfg(test)]
pub mod fake;
mod flow_slots;
mod flows;
mod kernel;
mod migrate;
mod pins;
mod vip_index;

use anyhow::{Context as _, Result};
use aya::Ebpf;
use lb_common::{
    BackendInfo, FlowKey, FlowState, PacketCounter, Settings, TrafficCounters, VipInfo, VipKey,
    MAGLEV_LANES,
};

pub use batch::for_each;
pub use bypass::{BypassMaps, DestMaps};
pub use decap::DecapMaps;
pub use flow_slots::FlowSlots;
pub use flows::{FlowSource, FlowTable};
pub use kernel::{sum_packets, KernelDatapath};
pub use migrate::OldMaps;
pub use pins::{ensure_bpffs, Origin, Pins, PINNED_MAPS, PIN_ROOT};

/// What the balancer logic needs from the datapath.
pub trait Datapath {
    fn set_settings(&mut self, settings: &Settings) -> Result<()>;
    fn set_backend(&mut self, id: u32, backend: &BackendInfo) -> Result<()>;
    /// Writes a whole Maglev ring: `slots` from slot `base` of `MAGLEV`.
    fn set_ring(&mut self, base: u32, slots: &[u32]) -> Result<()>;
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
    /// Every VIP entry (VIPs and address markers), to adopt a running datapath.
    fn vip_entries(&self) -> Result<Vec<(VipKey, VipInfo)>>;
    /// Every backend entry with any flag set, by id.
    fn backend_entries(&self) -> Result<Vec<(u32, BackendInfo)>>;
    /// TCP SYNs whose MSS option was lowered to fit a backend's link.
    fn mss_clamped(&self) -> Result<u64>;
    /// Packets of flows the full connection table had no room for
    /// (forwarded by Maglev alone).
    fn flows_unrecorded(&self) -> Result<u64>;
}

/// Map sizes set before the object is loaded.
#[derive(Debug, Clone, Copy)]
pub struct MapSizes {
    /// The smallest ring size (`maglev_table_size`).
    pub maglev_size: u32,
    /// Slots of the `MAGLEV` array, shared by every VIP's rings.
    pub maglev_slots: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    pub flow_table_size: u32,
}

impl MapSizes {
    /// Smallest sizes, for an agent that only decapsulates.
    pub const DECAP_ONLY: MapSizes = MapSizes {
        maglev_size: 7,
        maglev_slots: 21,
        max_vips: 1,
        max_backends: 1,
        flow_table_size: 1,
    };
}

/// The eBPF object, embedded at build time (`cargo xtask build-ebpf`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJECT"));

/// `max_entries` of the maps whose size the configuration sets.
pub(crate) fn max_entries(sizes: &MapSizes) -> Result<[(&'static str, u32); 7]> {
    let chunks = u64::from(sizes.maglev_slots).div_ceil(u64::from(MAGLEV_LANES));
    let chunks = u32::try_from(chunks).context("Maglev rings do not fit a BPF array")?;
    Ok([
        // VIP entries of the old and the new configuration coexist during an
        // apply, plus one address marker per VIP address.
        ("VIPS", 4 * sizes.max_vips),
        ("MAGLEV", chunks),
        ("BACKENDS", sizes.max_backends),
        (
            "FLOWS",
            lb_common::flow_table::elements_for(sizes.flow_table_size),
        ),
        ("VIP_STATS", sizes.max_vips),
        ("VIP_BY_ID", sizes.max_vips),
        ("BACKEND_STATS", sizes.max_backends),
    ])
}

/// The `.rodata` constant that switches the datapath logs on (see
/// `lb-ebpf/src/datapath_log.rs`).
const DATAPATH_LOG: &str = "DATAPATH_LOG";

/// The `.rodata` constant that tells the datapath this host's CPUs keep
/// stores in order for each other (see `lb-ebpf/src/flows.rs`).
const STORES_IN_ORDER: &str = "STORES_IN_ORDER";

/// Whether this host's CPUs (the agent's own architecture) see each
/// other's stores in program order: x86's total store order.
const HOST_STORES_IN_ORDER: bool = cfg!(any(target_arch = "x86_64", target_arch = "x86"));

/// A loader with the map sizes, the datapath-log switch and the host's
/// store order (`stores_in_order`: `HOST_STORES_IN_ORDER` but in tests).
/// Logs off, an object built without them (an older `--ebpf-object`) loads
/// as well; one without the store-order constant publishes with a
/// barrier, which is right everywhere.
fn loader(
    sizes: &MapSizes,
    datapath_log: bool,
    stores_in_order: bool,
) -> Result<aya::EbpfLoader<'static>> {
    let mut loader = aya::EbpfLoader::new();
    for (name, size) in max_entries(sizes)? {
        loader.map_max_entries(name, size);
    }
    let value: &'static u8 = if datapath_log { &1 } else { &0 };
    loader.override_global(DATAPATH_LOG, value, datapath_log);
    let in_order: &'static u8 = if stores_in_order { &1 } else { &0 };
    loader.override_global(STORES_IN_ORDER, in_order, false);
    Ok(loader)
}

/// Maps `len` bytes of a `BPF_F_MMAPABLE` array (`fd`) into the agent's
/// memory, shared and writable; the kernel checks the length against the
/// map. `what` names it in the error.
fn map_array(fd: std::os::fd::BorrowedFd<'_>, len: usize, what: &str) -> Result<memmap2::MmapMut> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a map's memory, not a file that can shrink under the mapping;
    // the datapath writes it concurrently, so its users read and write it
    // only through raw pointers (volatile, atomic, or to memory the program
    // does not write), never through references to the bytes.
    unsafe { memmap2::MmapOptions::new().len(len).map_mut(fd.as_raw_fd()) }
        .with_context(|| format!("memory-mapping {what}"))
}

/// Loads the embedded object with the given sizes and maps of its own (not
/// pinned: for tests and benchmarks). Programs are not attached.
pub fn load(sizes: &MapSizes) -> Result<Ebpf> {
    load_logging(sizes, false)
}

/// `load`, with the datapath logs on or off.
pub fn load_logging(sizes: &MapSizes, datapath_log: bool) -> Result<Ebpf> {
    load_with(sizes, datapath_log, HOST_STORES_IN_ORDER)
}

/// `load_logging`, built as for a host whose CPUs do (`stores_in_order`)
/// or do not keep each other's stores in order, whatever this one's: tests
/// run the path of the other architecture with it.
pub fn load_with(sizes: &MapSizes, datapath_log: bool, stores_in_order: bool) -> Result<Ebpf> {
    loader(sizes, datapath_log, stores_in_order)?
        .load(EBPF_OBJECT)
        .context("loading the eBPF object")
}
