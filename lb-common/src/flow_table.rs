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
//!   holds (`used`), its bucket count and the keys of its slot hash.
//! - Then `buckets` buckets, each an element of claim words (`FlowTags`)
//!   and `FLOW_BUCKET_SLOTS` elements of slots (`FlowSlot`: key and state).
//!   A lookup reads the bucket's claim words from one element, at fixed
//!   offsets, and a slot only where its claim word matches. A flow lives in
//!   one of two buckets picked by a keyed hash of its key (`slot_hash`,
//!   with keys drawn at random per table, so that nobody outside can aim
//!   flows at one bucket), in the one with more room when
//!   it is recorded. There are half again as many slots as the capacity,
//!   so a flow almost never finds both of its buckets full before the table
//!   holds `capacity` flows.
//! - A slot's claim word is `SLOT_FREE`, `SLOT_BUSY` (being written or
//!   being removed), or the key's protocol and family with a 16-bit tag of
//!   the slot hash in its upper half, which rejects almost every other flow
//!   with one compare. The tag is the hash's low half, while the first
//!   bucket comes from its high bits: flows of one bucket have tags as
//!   different as any (map layout 5 tagged with the high half, nearly the
//!   same for all the flows of a first bucket). A writer counts the flow in
//!   `used` (giving the place back if it finds no slot), takes a free slot
//!   with a compare-and-exchange to `SLOT_BUSY`, writes the state and the
//!   key, then publishes the claim word; a reader compares the claim word
//!   first. The agent removes a flow
//!   the same way (claim word to `SLOT_BUSY`) and frees the slot only after
//!   an RCU grace period, when no program can still hold it.
use crate::{fmix32, FlowKey, FlowState};

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
    pub _pad0: u32,
    /// The keys of `slot_hash`, random per table.
    pub keys: [u32; 10],
    pub _pad: [u64; 4],
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

/// The keyed hash that places a key (not the Maglev `flow_hash`, which
/// every node must share and anybody can compute): NH, the sum of five
/// products of the key's word pairs each added to its key word, folded to
/// 32 bits and mixed by murmur3's finalizer. NH is universal (two keys
/// collide with probability 2^-32 over the random keys), so nobody who
/// does not know the keys can send flows into one bucket, and its five
/// multiplies are independent of each other: a chain of about 20 cycles,
/// against 70 for murmur3 over the ten words, which it replaced in map
/// layout 6 (on an established packet, 10 to 15 % of its time).
#[inline(always)]
pub fn slot_hash(w: &[u32; 10], k: &[u32; 10]) -> u32 {
    #[inline(always)]
    fn term(a: u32, b: u32, ka: u32, kb: u32) -> u64 {
        (a.wrapping_add(ka) as u64) * (b.wrapping_add(kb) as u64)
    }
    let s = term(w[0], w[1], k[0], k[1])
        .wrapping_add(term(w[2], w[3], k[2], k[3]))
        .wrapping_add(term(w[4], w[5], k[4], k[5]))
        .wrapping_add(term(w[6], w[7], k[6], k[7]))
        .wrapping_add(term(w[8], w[9] & 0xffff, k[8], k[9]));
    fmix32((s >> 32) as u32 ^ s as u32)
}

/// The claim word a key's slot holds: its protocol and family, and the
/// lower half of its slot hash (`buckets_of` uses the upper one).
#[inline(always)]
pub fn claim_word(w: &[u32; 10], h: u32) -> u32 {
    (w[9] & 0xffff) | (h << 16)
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
    extern crate std;
    use std::{collections::HashMap, vec, vec::Vec};

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
    fn the_keys_move_flows() {
        let k = FlowKey::v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, 6);
        let w = key_words(&k);
        assert_ne!(slot_hash(w, &[1; 10]), slot_hash(w, &[2; 10]));
    }

    /// Arbitrary table keys, as `getrandom` could draw them.
    const KEYS: [u32; 10] = [
        0x243f_6a88,
        0x85a3_08d3,
        0x1319_8a2e,
        0x0370_7344,
        0xa409_3822,
        0x299f_31d0,
        0x082e_fa98,
        0xec4e_6c89,
        0x4528_21e6,
        0x38d0_1377,
    ];

    /// Keys as clients make them: one VIP, sources in one IPv4 /16 or one
    /// IPv6 /64 (only the low words differ), ephemeral ports in sequence.
    fn clients(n: u32) -> impl Iterator<Item = FlowKey> {
        (0..n).map(|i| {
            let port = 32768 + (i % 28000) as u16;
            let host = i / 28000;
            if i % 2 == 0 {
                FlowKey::v4(
                    [10, 1, (host >> 8) as u8, host as u8],
                    [192, 0, 2, 1],
                    port,
                    443,
                    6,
                )
            } else {
                let net = u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8]);
                let src = [net, 1u32.to_be(), 0, host.to_be()];
                let dst = [net, 0, 0, 1u32.to_be()];
                FlowKey::v6(src, dst, port, 443, 17)
            }
        })
    }

    #[test]
    fn client_flows_spread_evenly_over_the_buckets() {
        let buckets = buckets_for(100_000);
        let mut load = vec![0u32; buckets as usize];
        let n = 150_000;
        for k in clients(n) {
            let (first, _) = buckets_of(slot_hash(key_words(&k), &KEYS), buckets);
            load[first as usize] += 1;
        }
        // A mean of 8 per bucket; a random placement's fullest bucket holds
        // about 20 (Poisson), a skewed one far more.
        let max = *load.iter().max().unwrap();
        assert!(max <= 24, "the fullest bucket has {max} of {n} flows");
        let empty = load.iter().filter(|&&l| l == 0).count();
        // Poisson: e^-8 of the buckets, about 6 of 18,750.
        assert!(empty < 40, "{empty} empty buckets");
    }

    #[test]
    fn flows_of_one_bucket_have_different_tags() {
        let buckets = buckets_for(1_000_000);
        let mut by_bucket: HashMap<u32, Vec<u32>> = HashMap::new();
        for k in clients(400_000) {
            let w = key_words(&k);
            let h = slot_hash(w, &KEYS);
            by_bucket
                .entry(buckets_of(h, buckets).0)
                .or_default()
                .push(claim_word(w, h));
        }
        let (mut pairs, mut same) = (0u64, 0u64);
        for claims in by_bucket.values() {
            for (i, a) in claims.iter().enumerate() {
                for b in &claims[i + 1..] {
                    pairs += 1;
                    same += u64::from(a == b);
                }
            }
        }
        // Independent 16-bit tags (with two protocols) agree for about one
        // pair in 131,072; tags from the bits that picked the bucket would
        // agree for most pairs.
        assert!(pairs > 100_000, "{pairs} pairs");
        assert!(same * 1000 < pairs, "{same} of {pairs} pairs share a tag");
    }
}
