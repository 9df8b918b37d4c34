//! The connection table's layout, shared by the datapath and the agent.
//!
//! The table is a BPF array the datapath indexes itself (`FLOWS`, created
//! with `BPF_F_MMAPABLE`), not a kernel hash: an established packet finds
//! its entry with array reads and word compares, without the kernel hash's
//! calls (hash, bucket walk, `memcmp`), which were a third of the
//! datapath's time per established packet.
//!
//! - Element 0 is the header (`FlowTableHeader`): how many flows the table
//!   may hold (`capacity`, the configured `flow_table_size`), how many it
//!   holds (`used`), its bucket count and the seed of its slot hash.
//! - Then `buckets` buckets, each an element of claim words (`FlowTags`)
//!   and `FLOW_BUCKET_SLOTS` elements of slots (`FlowSlot`: key and state).
//!   A lookup reads the bucket's claim words from one element, at fixed
//!   offsets, and a slot only where its claim word matches. A flow lives in
//!   one of two buckets picked by a seeded hash of its key (so that nobody
//!   outside can aim flows at one bucket), in the one with more room when
//!   it is recorded. There are half again as many slots as the capacity,
//!   so a flow almost never finds both of its buckets full before the table
//!   holds `capacity` flows.
//! - A slot's claim word is `SLOT_FREE`, `SLOT_BUSY` (being written or
//!   being removed), or the key's protocol and family with a 16-bit tag of
//!   the slot hash in its upper half, which rejects almost every other flow
//!   with one compare. A writer takes a free slot with a compare-and-exchange
//!   to `SLOT_BUSY`, writes the state and the key, then publishes the claim
//!   word; a reader compares the claim word first. The agent removes a flow
//!   the same way (claim word to `SLOT_BUSY`) and frees the slot only after
//!   an RCU grace period, when no program can still hold it.
use crate::{fmix32, mix, FlowKey, FlowState};

/// Slots per bucket.
pub const FLOW_BUCKET_SLOTS: u32 = 8;
/// A free slot's claim word.
pub const SLOT_FREE: u32 = 0;
/// The claim word of a slot being written or removed (family 0xff: never a key's).
pub const SLOT_BUSY: u32 = u32::MAX;

/// One slot: the key's ten words (the last holds the claim word's value
/// while the slot is in use), then the state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSlot {
    pub key: [u32; 10],
    pub state: FlowState,
}

/// A bucket's claim words: the element before its slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTags {
    pub claims: [u32; FLOW_BUCKET_SLOTS as usize],
    pub _unused: [u32; 16],
}

/// Element 0 of the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTableHeader {
    /// Slots in use (claimed by a recorded flow, or removed and not yet freed).
    pub used: u64,
    /// Flows the table may hold: a new flow finds it full at this count.
    pub capacity: u64,
    /// Buckets after the header; 0 in a table not yet set up.
    pub buckets: u32,
    /// Seed of `slot_hash`, random per table.
    pub seed: u32,
    pub _pad: [u64; 9],
}

const _: () = assert!(core::mem::size_of::<FlowSlot>() == 96);
const _: () = assert!(core::mem::size_of::<FlowTableHeader>() == 96);
const _: () = assert!(core::mem::size_of::<FlowTags>() == 96);

/// Elements per bucket: its claim words and its slots.
pub const BUCKET_ELEMENTS: u32 = 1 + FLOW_BUCKET_SLOTS;

/// The element of bucket `bucket`'s claim words.
#[inline(always)]
pub const fn tags_element(bucket: u32) -> u32 {
    1 + bucket * BUCKET_ELEMENTS
}

/// The element of slot `slot` of bucket `bucket`.
#[inline(always)]
pub const fn slot_element(bucket: u32, slot: u32) -> u32 {
    tags_element(bucket) + 1 + slot
}

/// The most buckets a table has (its elements fit a u32).
pub const MAX_BUCKETS: u32 = u32::MAX / BUCKET_ELEMENTS - 1;

/// Buckets for a table of `capacity` flows: half again as many slots.
pub const fn buckets_for(capacity: u32) -> u32 {
    let slots = capacity as u64 + capacity as u64 / 2;
    let b = slots.div_ceil(FLOW_BUCKET_SLOTS as u64);
    if b == 0 {
        1
    } else if b > MAX_BUCKETS as u64 {
        MAX_BUCKETS
    } else {
        b as u32
    }
}

/// Array elements (`max_entries`) of a table of `capacity` flows: the
/// header and the buckets.
pub const fn elements_for(capacity: u32) -> u32 {
    1 + buckets_for(capacity) * BUCKET_ELEMENTS
}

/// The key's ten words, as the datapath reads them.
#[inline(always)]
pub fn key_words(k: &FlowKey) -> &[u32; 10] {
    // SAFETY: FlowKey is #[repr(C, align(4))], 40 bytes of integers with no
    // padding.
    unsafe { &*(k as *const FlowKey as *const [u32; 10]) }
}

/// The key of a slot's words (the claim word's tag cleared).
#[inline(always)]
pub fn key_of(words: &[u32; 10]) -> FlowKey {
    let mut w = *words;
    w[9] &= 0xffff;
    // SAFETY: as in `key_words`.
    unsafe { core::mem::transmute::<[u32; 10], FlowKey>(w) }
}

/// The seeded hash that places a key (not the Maglev `flow_hash`, which
/// every node must share and anybody can compute).
#[inline(always)]
pub fn slot_hash(w: &[u32; 10], seed: u32) -> u32 {
    let mut h = seed;
    h = mix(h, w[0]);
    h = mix(h, w[1]);
    h = mix(h, w[2]);
    h = mix(h, w[3]);
    h = mix(h, w[4]);
    h = mix(h, w[5]);
    h = mix(h, w[6]);
    h = mix(h, w[7]);
    h = mix(h, w[8]);
    h = mix(h, w[9] & 0xffff);
    fmix32(h)
}

/// The claim word a key's slot holds: its protocol and family, and the
/// upper half of its slot hash.
#[inline(always)]
pub fn claim_word(w: &[u32; 10], h: u32) -> u32 {
    (w[9] & 0xffff) | (h & 0xffff_0000)
}

/// The two buckets a hash may live in (the same one twice in a one-bucket
/// table).
#[inline(always)]
pub fn buckets_of(h: u32, buckets: u32) -> (u32, u32) {
    let first = ((h as u64 * buckets as u64) >> 32) as u32;
    let g = h.wrapping_mul(0x9e37_79b1).rotate_left(16) ^ h;
    let mut second = ((g as u64 * buckets as u64) >> 32) as u32;
    if second == first && buckets > 1 {
        second = if first + 1 == buckets { 0 } else { first + 1 };
    }
    (first, second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(buckets_for(8), 2);
        assert_eq!(elements_for(8), 19);
        assert_eq!((tags_element(1), slot_element(1, 7)), (10, 18));
        assert_eq!(buckets_for(1), 1);
        assert_eq!(buckets_for(1_000_000), 187_500);
        assert_eq!(buckets_for(u32::MAX), MAX_BUCKETS);
    }

    #[test]
    fn two_buckets_differ_when_there_are_two() {
        for h in [0u32, 1, 0x8000_0000, u32::MAX, 12345, 0xdead_beef] {
            let (a, b) = buckets_of(h, 2);
            assert_ne!(a, b);
            assert!(a < 2 && b < 2);
            assert_eq!(buckets_of(h, 1), (0, 0));
        }
    }

    #[test]
    fn claim_words_are_never_free_or_busy() {
        let k = FlowKey::v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, 6);
        let w = key_words(&k);
        for h in [0u32, u32::MAX, 0xffff_0000] {
            let c = claim_word(w, h);
            assert_ne!(c, SLOT_FREE);
            assert_ne!(c, SLOT_BUSY);
            let mut s = *w;
            s[9] = c;
            assert_eq!(key_of(&s), k);
        }
    }

    #[test]
    fn the_seed_moves_flows() {
        let k = FlowKey::v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, 6);
        let w = key_words(&k);
        assert_ne!(slot_hash(w, 1), slot_hash(w, 2));
    }
}
