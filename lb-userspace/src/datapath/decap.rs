//! The decapsulator's maps (`lb_decap` on backend hosts).

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    Ebpf,
};
use lb_common::{addr_bytes, addr_from_bytes, HostAddr, PacketCounter, DECAP_OUTCOME_COUNT};

use super::kernel::{sum_packets, take};

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

    pub fn add_address(&mut self, addr: IpAddr) -> Result<()> {
        let (addr, family) = addr_bytes(addr);
        let key = HostAddr {
            addr,
            family,
            _pad: [0; 3],
        };
        self.addrs.insert(key, 1, 0).context("writing DECAP_ADDRS")
    }

    /// The addresses decapsulated for, as the map holds them.
    pub fn addresses(&self) -> Result<Vec<IpAddr>> {
        self.addrs
            .keys()
            .map(|k| {
                let k = k.context("reading DECAP_ADDRS")?;
                Ok(addr_from_bytes(k.addr, k.family))
            })
            .collect()
    }

    pub fn outcomes(&self) -> Result<Vec<PacketCounter>> {
        (0..DECAP_OUTCOME_COUNT)
            .map(|i| Ok(sum_packets(&self.outcomes.get(&i, 0)?)))
            .collect()
    }
}
