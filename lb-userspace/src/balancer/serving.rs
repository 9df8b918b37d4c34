//! What the balancer can serve, as the BGP announcement and the operators
//! comparing LB nodes see it.

use std::{collections::BTreeMap, net::IpAddr};

use super::{Balancer, VipIdent};
use crate::datapath::Datapath;

impl<D: Datapath> Balancer<D> {
    /// Every live VIP address, and whether this node can serve it now: some
    /// VIP at the address has a backend holding slots in its table, usable
    /// for flows and with a resolved next hop.
    pub fn servable_addresses(&self) -> BTreeMap<IpAddr, bool> {
        let mut out = BTreeMap::new();
        for v in self.vips.values() {
            let serves = v.slots.iter().any(|(address, slots)| {
                *slots > 0
                    && self
                        .backends
                        .get(address)
                        .is_some_and(|b| b.usable && b.next_hop.is_some())
            });
            *out.entry(v.config.address).or_insert(false) |= serves;
        }
        out
    }

    /// The digest of a VIP's Maglev table (`maglev::digest`): equal on every
    /// node with the same backends and weights.
    pub fn table_digest(&self, vip: VipIdent) -> u64 {
        self.vips.get(&vip).map_or(0, |v| v.digest)
    }
}
