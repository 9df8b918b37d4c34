//! An in-memory datapath for tests: map contents plus a log of writes.

use std::collections::{BTreeSet, HashMap};

use anyhow::{bail, Result};
use lb_common::{
    BackendInfo, FlowKey, FlowState, PacketCounter, Settings, TrafficCounters, VipInfo, VipKey,
    NO_BACKEND, OUTCOME_COUNT,
};

use super::Datapath;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Backend(u32, u32),
    Ring(u32),
    Vip(VipKey, VipInfo),
    RemoveVip(VipKey),
}

#[derive(Default)]
pub struct FakeDatapath {
    pub settings: Settings,
    pub backends: HashMap<u32, BackendInfo>,
    /// Rings by first slot; writing one drops those it overlaps (their
    /// slots are overwritten).
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
        let ring = self.rings.get(&vip.ring_base)?;
        assert_eq!(ring.len() as u32, vip.ring_size);
        let id = ring[(hash % vip.ring_size) as usize];
        (id != NO_BACKEND).then_some(id)
    }
}

impl Datapath for FakeDatapath {
    fn vip_entries(&self) -> Result<Vec<(VipKey, VipInfo)>> {
        Ok(self.vips.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backend_entries(&self) -> Result<Vec<(u32, BackendInfo)>> {
        let mut out: Vec<(u32, BackendInfo)> = self
            .backends
            .iter()
            .filter(|(_, b)| b.flags != 0)
            .map(|(id, b)| (*id, *b))
            .collect();
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }
    fn set_settings(&mut self, settings: &Settings) -> Result<()> {
        self.settings = *settings;
        Ok(())
    }
    fn set_backend(&mut self, id: u32, backend: &BackendInfo) -> Result<()> {
        self.backends.insert(id, *backend);
        self.log.push(Op::Backend(id, backend.flags));
        Ok(())
    }
    fn set_ring(&mut self, base: u32, slots: &[u32]) -> Result<()> {
        let end = base as usize + slots.len();
        self.rings
            .retain(|b, r| *b as usize + r.len() <= base as usize || *b as usize >= end);
        self.rings.insert(base, slots.to_vec());
        self.log.push(Op::Ring(base));
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
    fn mss_clamped(&self) -> Result<u64> {
        Ok(0)
    }
    fn flows_unrecorded(&self) -> Result<u64> {
        Ok(0)
    }
}
