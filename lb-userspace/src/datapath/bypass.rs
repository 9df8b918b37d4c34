//! The source intermediary's maps (bypass on a client host): entries the
//! agent writes on accepted instructions, the flows the datapath sent
//! toward the LB, and its counters.

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap, MapData, MapError, PerCpuArray},
    Ebpf,
};
use lb_common::{BypassEntry, FlowKey, BYPASS_STAT_COUNT};

use super::kernel::take;

pub struct BypassMaps {
    entries: HashMap<MapData, FlowKey, BypassEntry>,
    sent: HashMap<MapData, FlowKey, u64>,
    stats: PerCpuArray<MapData, u64>,
}

impl BypassMaps {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            entries: take(ebpf, "BYPASS")?,
            sent: take(ebpf, "BYPASS_SENT")?,
            stats: take(ebpf, "BYPASS_STATS")?,
        })
    }

    /// Whether the datapath sent this flow toward the LB (and still
    /// remembers it).
    pub fn was_sent(&self, key: &FlowKey) -> Result<bool> {
        match self.sent.get(key, 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e).context("reading BYPASS_SENT"),
        }
    }

    /// Records the flow as sent toward the LB at `at_ns` (coarse monotonic
    /// time): the datapath's next refresh of it is due `BYPASS_REFRESH_NS`
    /// later. For tests and benchmarks, which time the direct path alone.
    pub fn set_sent(&mut self, key: &FlowKey, at_ns: u64) -> Result<()> {
        self.sent
            .insert(key, at_ns, 0)
            .context("writing BYPASS_SENT")
    }

    /// Sends the flow straight to `backend_id` from its next packet on.
    pub fn set(&mut self, key: &FlowKey, backend_id: u32) -> Result<()> {
        let entry = BypassEntry {
            backend_id,
            ..Default::default()
        };
        self.entries.insert(key, entry, 0).context("writing BYPASS")
    }

    /// Ends the flow's entry; false if it had none.
    pub fn remove(&mut self, key: &FlowKey) -> Result<bool> {
        match self.entries.remove(key) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e).context("removing from BYPASS"),
        }
    }

    pub fn entries(&self) -> Result<Vec<(FlowKey, BypassEntry)>> {
        self.entries
            .iter()
            .map(|r| r.context("reading BYPASS"))
            .collect()
    }

    /// `BYPASS_*` counters summed over CPUs.
    pub fn stats(&self) -> Result<[u64; BYPASS_STAT_COUNT as usize]> {
        let mut out = [0u64; BYPASS_STAT_COUNT as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = self
                .stats
                .get(&(i as u32), 0)
                .context("reading BYPASS_STATS")?
                .iter()
                .sum();
        }
        Ok(out)
    }
}

/// The destination side's maps (a backend host): client prefixes with an
/// intermediary, bypass VIPs with their packet counts, and the events
/// `lb_decap` sends.
pub struct DestMaps {
    clients: aya::maps::LpmTrie<MapData, lb_common::BypassPrefix, lb_common::BypassIntermediary>,
    policy: HashMap<MapData, lb_common::VipKey, u32>,
}

impl DestMaps {
    /// The maps, and the event ring for the sender.
    pub fn new(ebpf: &mut Ebpf) -> Result<(Self, aya::maps::RingBuf<MapData>)> {
        Ok((
            Self {
                clients: take(ebpf, "BYPASS_CLIENTS")?,
                policy: take(ebpf, "BYPASS_POLICY")?,
            },
            take(ebpf, "BYPASS_EVENTS")?,
        ))
    }

    pub fn add_client_prefix(
        &mut self,
        prefix: ipnet::IpNet,
        intermediary: std::net::SocketAddr,
    ) -> Result<()> {
        let (len, data) = prefix_key(prefix);
        let (addr, family) = lb_common::addr_bytes(intermediary.ip());
        let value = lb_common::BypassIntermediary {
            addr,
            port: intermediary.port().to_be(),
            family,
            _pad: 0,
        };
        self.clients
            .insert(&aya::maps::lpm_trie::Key::new(len, data), value, 0)
            .context("writing BYPASS_CLIENTS")
    }

    pub fn add_policy(&mut self, vip: &lb_common::VipKey, after_packets: u32) -> Result<()> {
        self.policy
            .insert(vip, after_packets, 0)
            .context("writing BYPASS_POLICY")
    }
}

impl DestMaps {
    /// Makes the maps hold exactly these client prefixes and policies: new
    /// entries are written first, then those no longer wanted removed, so a
    /// prefix or VIP in both states never goes missing.
    pub fn replace(
        &mut self,
        intermediaries: &[(ipnet::IpNet, std::net::SocketAddr)],
        vips: &[(lb_common::VipKey, u32)],
    ) -> Result<()> {
        for (prefix, at) in intermediaries {
            self.add_client_prefix(*prefix, *at)?;
        }
        for (vip, after) in vips {
            self.add_policy(vip, *after)?;
        }
        let wanted: Vec<(u32, [u8; 16])> =
            intermediaries.iter().map(|(p, _)| prefix_key(*p)).collect();
        let stale: Vec<_> = self
            .clients
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
            .collect();
        for k in stale {
            self.clients
                .remove(&k)
                .context("removing from BYPASS_CLIENTS")?;
        }
        let stale: Vec<_> = self
            .policy
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !vips.iter().any(|(v, _)| v == k))
            .collect();
        for k in stale {
            self.policy
                .remove(&k)
                .context("removing from BYPASS_POLICY")?;
        }
        Ok(())
    }
}

/// The LPM key of a client prefix: IPv4 as IPv4-mapped IPv6.
fn prefix_key(prefix: ipnet::IpNet) -> (u32, [u8; 16]) {
    match prefix {
        ipnet::IpNet::V4(p) => (
            u32::from(96 + p.prefix_len()),
            p.addr().to_ipv6_mapped().octets(),
        ),
        ipnet::IpNet::V6(p) => (u32::from(p.prefix_len()), p.addr().octets()),
    }
}
