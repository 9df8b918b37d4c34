//! The datapath's two indexes of the VIP table, kept beside it so that an
//! established flow needs no VIP lookup (see `lb-ebpf/src/balance.rs`):
//!
//! - `VIP_BY_ID`: each live VIP's key by VIP id; a connection-table entry
//!   names its VIP by id, and the datapath checks that the id still holds
//!   the key the flow is addressed to;
//! - `VIP_FILTER`: per slot (`lb_common::vip_filter_slot`), how many VIP
//!   entries have an address that folds into it; a packet whose slot is 0
//!   is not to a VIP.
//!
//! Neither is pinned: each load starts them empty and the agent fills them
//! from the VIP table before the programs are attached. Writes keep them a
//! superset of the VIP table at every moment: a VIP's slot and id entry are
//! written before its VIP entry, and cleared after it is removed.

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use aya::maps::{Array, MapData};
use lb_common::{vip_filter_slot, VipInfo, VipKey};

/// A write to one of the two maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// `VIP_FILTER[slot] = count`.
    Filter { slot: u32, count: u32 },
    /// `VIP_BY_ID[id] = key` (the all-zero key clears it).
    ById { id: u32, key: VipKey },
}

/// What the two maps hold, to compute the writes each VIP change needs.
#[derive(Default)]
pub struct VipIndex {
    /// Id of every VIP entry (VIPs and address markers) by key.
    ids: HashMap<VipKey, u32>,
    /// Key held at each id of `VIP_BY_ID`.
    by_id: HashMap<u32, VipKey>,
    /// VIP entries per filter slot.
    slots: HashMap<u32, u32>,
}

/// Address markers (port 0, protocol 0) are no VIP of their own.
fn is_vip(key: &VipKey) -> bool {
    key.proto != 0
}

impl VipIndex {
    /// The writes to make before `key` is written to the VIP table with `info`.
    pub fn set(&mut self, key: &VipKey, info: &VipInfo) -> Vec<Write> {
        let mut out = Vec::new();
        if !self.ids.contains_key(key) {
            let slot = vip_filter_slot(key.addr_words());
            let count = self.slots.entry(slot).or_default();
            *count += 1;
            out.push(Write::Filter {
                slot,
                count: *count,
            });
        }
        let previous = self.ids.insert(*key, info.vip_id);
        if is_vip(key) {
            if let Some(old) = previous.filter(|old| *old != info.vip_id) {
                out.extend(self.clear_id(old, key));
            }
            if self.by_id.insert(info.vip_id, *key) != Some(*key) {
                out.push(Write::ById {
                    id: info.vip_id,
                    key: *key,
                });
            }
        }
        out
    }

    /// The writes to make after `key` was removed from the VIP table.
    pub fn remove(&mut self, key: &VipKey) -> Vec<Write> {
        let mut out = Vec::new();
        let Some(id) = self.ids.remove(key) else {
            return out;
        };
        if is_vip(key) {
            out.extend(self.clear_id(id, key));
        }
        let slot = vip_filter_slot(key.addr_words());
        let count = self.slots.entry(slot).or_default();
        *count = count.saturating_sub(1);
        out.push(Write::Filter {
            slot,
            count: *count,
        });
        if *count == 0 {
            self.slots.remove(&slot);
        }
        out
    }

    /// Clears id `id` if it still holds `key` (another VIP may have it now).
    fn clear_id(&mut self, id: u32, key: &VipKey) -> Option<Write> {
        if self.by_id.get(&id) != Some(key) {
            return None;
        }
        self.by_id.remove(&id);
        Some(Write::ById {
            id,
            key: VipKey::default(),
        })
    }
}

/// The two maps of a loaded object and what they hold.
pub struct VipIndexMaps {
    by_id: Array<MapData, VipKey>,
    filter: Array<MapData, u32>,
    index: VipIndex,
}

impl VipIndexMaps {
    /// Takes the maps and fills them from the VIP table's `entries` (empty
    /// for a fresh datapath; the running one's when it is adopted).
    pub fn new(
        by_id: Array<MapData, VipKey>,
        filter: Array<MapData, u32>,
        entries: &[(VipKey, VipInfo)],
    ) -> Result<Self> {
        let mut maps = Self {
            by_id,
            filter,
            index: VipIndex::default(),
        };
        for (key, info) in entries {
            maps.before_set(key, info)?;
        }
        Ok(maps)
    }

    pub fn before_set(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
        let writes = self.index.set(key, info);
        self.apply(&writes)
    }

    pub fn after_remove(&mut self, key: &VipKey) -> Result<()> {
        let writes = self.index.remove(key);
        self.apply(&writes)
    }

    fn apply(&mut self, writes: &[Write]) -> Result<()> {
        for w in writes {
            match *w {
                Write::Filter { slot, count } => self
                    .filter
                    .set(slot, count, 0)
                    .with_context(|| format!("writing VIP_FILTER slot {slot}"))?,
                Write::ById { id, key } => self.by_id.set(id, key, 0).with_context(|| {
                    format!("writing VIP_BY_ID {id} (is the VIP id below max_vips?)")
                })?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(last: u8, port: u16, proto: u8) -> VipKey {
        let mut addr = [0; 16];
        addr[0] = 10;
        addr[3] = last;
        VipKey {
            addr,
            port: port.to_be(),
            proto,
            family: lb_common::FAMILY_V4,
        }
    }

    fn info(id: u32) -> VipInfo {
        VipInfo {
            vip_id: id,
            ..VipInfo::default()
        }
    }

    /// Replays writes into plain maps: what the datapath would read.
    #[derive(Default)]
    struct Seen {
        filter: HashMap<u32, u32>,
        by_id: HashMap<u32, VipKey>,
    }

    impl Seen {
        fn apply(&mut self, writes: Vec<Write>) {
            for w in writes {
                match w {
                    Write::Filter { slot, count } => {
                        self.filter.insert(slot, count);
                    }
                    Write::ById { id, key } => {
                        self.by_id.insert(id, key);
                    }
                }
            }
        }

        fn passes(&self, k: &VipKey) -> bool {
            self.filter
                .get(&vip_filter_slot(k.addr_words()))
                .is_some_and(|n| *n > 0)
        }
    }

    #[test]
    fn an_address_stays_in_the_filter_while_any_of_its_entries_is_there() {
        let (mut ix, mut seen) = (VipIndex::default(), Seen::default());
        let (marker, web, dns) = (key(1, 0, 0), key(1, 80, 6), key(1, 53, 17));
        seen.apply(ix.set(&marker, &info(0)));
        seen.apply(ix.set(&web, &info(1)));
        seen.apply(ix.set(&dns, &info(2)));
        assert!(seen.passes(&web));
        assert_eq!(seen.by_id[&1], web);
        assert_eq!(seen.by_id[&2], dns);
        assert!(!seen.by_id.contains_key(&0), "markers are no VIP");
        seen.apply(ix.remove(&web));
        seen.apply(ix.remove(&marker));
        assert!(seen.passes(&dns), "dns is still there");
        assert_eq!(seen.by_id[&1], VipKey::default(), "id 1 cleared");
        seen.apply(ix.remove(&dns));
        assert!(!seen.passes(&dns));
        assert_eq!(seen.by_id[&2], VipKey::default());
        // Removing what is not there writes nothing.
        assert!(ix.remove(&dns).is_empty());
    }

    #[test]
    fn rewriting_a_vip_writes_nothing_and_a_new_id_clears_the_old_one() {
        let (mut ix, mut seen) = (VipIndex::default(), Seen::default());
        let web = key(2, 80, 6);
        seen.apply(ix.set(&web, &info(3)));
        assert!(ix.set(&web, &info(3)).is_empty(), "a ring change only");
        seen.apply(ix.set(&web, &info(4)));
        assert_eq!(seen.by_id[&3], VipKey::default());
        assert_eq!(seen.by_id[&4], web);
    }

    #[test]
    fn an_id_taken_by_another_vip_is_not_cleared_by_the_old_one_leaving() {
        let (mut ix, mut seen) = (VipIndex::default(), Seen::default());
        let (old, new) = (key(3, 80, 6), key(4, 80, 6));
        seen.apply(ix.set(&old, &info(5)));
        // An apply writes the new VIP (reusing the id) before removing the old.
        seen.apply(ix.set(&new, &info(5)));
        seen.apply(ix.remove(&old));
        assert_eq!(seen.by_id[&5], new);
        assert!(seen.passes(&new));
    }

    #[test]
    fn addresses_sharing_a_slot_keep_it_set_until_both_are_gone() {
        let (mut ix, mut seen) = (VipIndex::default(), Seen::default());
        let a = key(5, 80, 6);
        // Another address of the same slot: the fold ignores a swap of words.
        let mut b = a;
        b.addr = [0; 16];
        b.addr[4..8].copy_from_slice(&a.addr[0..4]);
        b.family = lb_common::FAMILY_V6;
        assert_eq!(
            vip_filter_slot(a.addr_words()),
            vip_filter_slot(b.addr_words())
        );
        seen.apply(ix.set(&a, &info(6)));
        seen.apply(ix.set(&b, &info(7)));
        seen.apply(ix.remove(&a));
        assert!(seen.passes(&b));
        seen.apply(ix.remove(&b));
        assert!(!seen.passes(&b));
    }
}
