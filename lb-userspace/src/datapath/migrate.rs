//! Moving a running datapath into new maps (see `pins`): the old maps, opened
//! from their pins, and what is copied from them: backend entries, counters
//! and the connection table. VIP entries and Maglev rings are not copied: the
//! agent rebuilds every table into the new maps before the switch. Maps of an
//! earlier layout (an upgrade, see `pins::MIGRATABLE_LAYOUTS`) are read in
//! their own types and converted: the VIP entries of layouts 3 and 4 are this
//! layout's, and every earlier connection table (a kernel hash or LRU, or
//! layout 5's slots placed by another hash) has this table's keys and
//! states.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    BackendInfo, FlowKey, FlowState, PacketCounter, TrafficCounters, VipInfo, VipKey,
    LAYOUT_VERSION, OUTCOME_COUNT,
};

use super::{batch, flow_slots::FlowSlots, kernel, KernelDatapath};

/// The VIP entry of map layout 1 (12 bytes: id, ring, flags) and of layout 2
/// (16 bytes: the same and the previous ring), as `N` words. Only the VIP id
/// is carried over: rings are not copied (the agent builds every table into
/// the new maps) and the flags are the agent's to set again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OldVipInfo<const N: usize>(pub [u32; N]);

// SAFETY: plain old data, `repr(C)`, no padding.
unsafe impl<const N: usize> aya::Pod for OldVipInfo<N> {}

impl<const N: usize> OldVipInfo<N> {
    /// The entry in this layout: the same VIP id, no ring yet.
    pub fn convert(self) -> VipInfo {
        VipInfo {
            vip_id: self.0[0],
            ..VipInfo::default()
        }
    }
}

/// The VIP table, in the types of its layout.
enum OldVips {
    Current(HashMap<MapData, VipKey, VipInfo>),
    V1(HashMap<MapData, VipKey, OldVipInfo<3>>),
    V2(HashMap<MapData, VipKey, OldVipInfo<4>>),
}

/// The connection table of the datapath being replaced.
enum OldFlows {
    /// This layout's (a table of other sizes), or layout 5's: the same
    /// slots, placed by the slot hash of layout 5. They are read by
    /// scanning the slots, which needs no hash.
    Slots(FlowSlots),
    /// Layouts 1 to 4: a kernel hash (an LRU before layout 4).
    Hash(MapData),
}

/// The maps of the datapath being replaced.
pub struct OldMaps {
    vips: OldVips,
    backends: Array<MapData, BackendInfo>,
    flows: OldFlows,
    vip_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    outcomes: PerCpuArray<MapData, PacketCounter>,
    event_stats: PerCpuArray<MapData, u64>,
    mss_clamped: PerCpuArray<MapData, u64>,
    /// Absent before layout 4.
    flows_unrecorded: Option<PerCpuArray<MapData, u64>>,
}

fn open(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
}

impl OldMaps {
    /// Opens the maps pinned in `dir`, of map layout `layout`.
    pub fn open(dir: &Path, layout: u32) -> Result<OldMaps> {
        let vips = Map::HashMap(open(dir, "VIPS")?);
        let vips = match layout {
            // Layout 3 differs from this one only in its connection table's
            // type, whose entries are the same.
            LAYOUT_VERSION | 3 | 4 | 5 => OldVips::Current(HashMap::try_from(vips)?),
            1 => OldVips::V1(
                HashMap::try_from(vips).context("the VIP table of layout 1 has another shape")?,
            ),
            2 => OldVips::V2(
                HashMap::try_from(vips).context("the VIP table of layout 2 has another shape")?,
            ),
            other => bail!("no conversion from map layout {other}"),
        };
        Ok(OldMaps {
            vips,
            backends: Array::try_from(Map::Array(open(dir, "BACKENDS")?))?,
            flows: match layout {
                LAYOUT_VERSION | 5 => OldFlows::Slots(FlowSlots::open(open(dir, "FLOWS")?, None)?),
                _ => OldFlows::Hash(open(dir, "FLOWS")?),
            },
            vip_stats: PerCpuArray::try_from(Map::PerCpuArray(open(dir, "VIP_STATS")?))?,
            backend_stats: PerCpuArray::try_from(Map::PerCpuArray(open(dir, "BACKEND_STATS")?))?,
            outcomes: PerCpuArray::try_from(Map::PerCpuArray(open(dir, "OUTCOMES")?))?,
            event_stats: PerCpuArray::try_from(Map::PerCpuArray(open(dir, "EVENT_STATS")?))?,
            mss_clamped: PerCpuArray::try_from(Map::PerCpuArray(open(dir, "MSS_CLAMPED")?))?,
            flows_unrecorded: match layout {
                LAYOUT_VERSION | 4 | 5 => Some(PerCpuArray::try_from(Map::PerCpuArray(open(
                    dir,
                    "FLOWS_UNRECORDED",
                )?))?),
                _ => None,
            },
        })
    }

    /// The VIP entries, converted to this layout.
    pub fn vip_entries(&self) -> Result<Vec<(VipKey, VipInfo)>> {
        match &self.vips {
            OldVips::Current(vips) => kernel::vip_entries(vips),
            OldVips::V1(vips) => Ok(converted(kernel::vip_entries(vips)?)),
            OldVips::V2(vips) => Ok(converted(kernel::vip_entries(vips)?)),
        }
    }

    pub fn backend_entries(&self) -> Result<Vec<(u32, BackendInfo)>> {
        kernel::backend_entries(&self.backends)
    }
}

fn converted<const N: usize>(entries: Vec<(VipKey, OldVipInfo<N>)>) -> Vec<(VipKey, VipInfo)> {
    entries.into_iter().map(|(k, v)| (k, v.convert())).collect()
}

impl KernelDatapath {
    /// Copies the counters of the given VIP and backend ids, and the
    /// outcome and event counters.
    pub fn copy_counters_from(
        &mut self,
        old: &OldMaps,
        vip_ids: &[u32],
        backend_ids: &[u32],
    ) -> Result<()> {
        for id in vip_ids {
            let v = old
                .vip_stats
                .get(id, 0)
                .context("reading old VIP counters")?;
            self.vip_stats
                .set(*id, v, 0)
                .context("writing VIP counters")?;
        }
        for id in backend_ids {
            let v = old
                .backend_stats
                .get(id, 0)
                .context("reading old backend counters")?;
            self.backend_stats
                .set(*id, v, 0)
                .context("writing backend counters")?;
        }
        for i in 0..OUTCOME_COUNT {
            let v = old.outcomes.get(&i, 0).context("reading old outcomes")?;
            self.outcomes.set(i, v, 0).context("writing outcomes")?;
        }
        for i in 0..old.event_stats.len().min(self.event_stats.len()) {
            let v = old
                .event_stats
                .get(&i, 0)
                .context("reading old event counters")?;
            self.event_stats
                .set(i, v, 0)
                .context("writing event counters")?;
        }
        let v = old
            .mss_clamped
            .get(&0, 0)
            .context("reading old MSS counter")?;
        self.mss_clamped
            .set(0, v, 0)
            .context("writing the MSS counter")?;
        if let Some(old) = &old.flows_unrecorded {
            let v = old
                .get(&0, 0)
                .context("reading the old unrecorded-flow counter")?;
            self.flows_unrecorded
                .set(0, v, 0)
                .context("writing the unrecorded-flow counter")?;
        }
        Ok(())
    }

    /// Copies the connection table, the most recently used flows first: a
    /// smaller new table keeps the newest that fit (a full table refuses
    /// the rest). Flows without times (an older agent's, tracers off) are
    /// stamped `now_ns`, so the collector expires them like the others.
    /// Returns how many flows were copied and how many did not fit.
    pub fn copy_flows_from(&mut self, old: &OldMaps, now_ns: u64) -> Result<(usize, usize)> {
        let mut flows = Vec::new();
        match &old.flows {
            OldFlows::Slots(table) => {
                table.for_each(|k, v| flows.push((*k, *v)));
            }
            OldFlows::Hash(map) => {
                batch::for_each(map, 8192, |k: &FlowKey, v: &FlowState| flows.push((*k, *v)))
                    .context("reading the old connection table")?;
            }
        }
        flows.sort_unstable_by_key(|(_, v)| std::cmp::Reverse(v.last_ns));
        let mut copied = 0;
        for (k, mut v) in flows.iter().copied() {
            if v.first_ns == 0 {
                v.first_ns = now_ns;
                v.last_ns = now_ns;
            }
            if self.flows.insert(&k, &v) {
                copied += 1;
            } else if self.flows.in_use() >= self.flows.capacity() {
                break;
            }
        }
        Ok((copied, flows.len() - copied))
    }
}
