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

    /// Makes the map hold exactly `wanted` (an adopted map may hold
    /// addresses a new configuration dropped): new ones first, then the
    /// others go.
    pub fn set_addresses(&mut self, wanted: &[IpAddr]) -> Result<()> {
        for a in wanted {
            self.addrs
                .insert(host_addr(*a), 1, 0)
                .context("writing DECAP_ADDRS")?;
        }
        for a in self.addresses()? {
            if !wanted.contains(&a) {
                self.addrs
                    .remove(&host_addr(a))
                    .context("removing from DECAP_ADDRS")?;
            }
        }
        Ok(())
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

fn host_addr(addr: IpAddr) -> HostAddr {
    let (addr, family) = addr_bytes(addr);
    HostAddr {
        addr,
        family,
        _pad: [0; 3],
    }
}
