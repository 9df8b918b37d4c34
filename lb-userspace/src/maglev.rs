//! Weighted Maglev: the lookup table a VIP's new flows are hashed into.
//!
//! The table depends only on the backends' identities (their addresses), their
//! weights and the table size, never on the order backends were given in, so
//! every agent with the same configuration builds the same table and flows keep
//! their backend across LB nodes behind ECMP.
//!
//! Each backend walks its own permutation of the slots (offset and skip derived
//! from its address). Backends take turns claiming their next free slot; with
//! weights, a backend's turn comes `weight / max_weight` times per round, so its
//! share of the table is proportional to its weight.

use lb_common::NO_BACKEND;

/// A backend as Maglev sees it.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Stored in the table's slots (the datapath's backend id).
    pub id: u32,
    /// Identity the permutation is derived from (the backend's address bytes).
    pub identity: Vec<u8>,
    /// Relative weight; 0 takes no slots.
    pub weight: u32,
}

fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Finalise (murmur3 fmix64) so nearby addresses get unrelated permutations.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// A built table, and how many slots each entry got (in the order given).
pub struct Table {
    pub slots: Vec<u32>,
    pub counts: Vec<u32>,
    /// `digest(entries, slots)`, computed with the table (in `build_many`'s
    /// threads).
    pub digest: u64,
}

/// A digest of a built table that two LB nodes can compare: each slot is
/// hashed as the identity of the backend it holds (backend ids are local to
/// a node), so nodes with the same backends and weights show the same digest.
pub fn digest(entries: &[Entry], slots: &[u32]) -> u64 {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.identity.cmp(&b.identity));
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut mix = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for e in &sorted {
        mix(&(e.identity.len() as u32).to_le_bytes());
        mix(&e.identity);
    }
    // A slot is hashed as its backend's rank in identity order (u32::MAX
    // when empty), one multiply per slot: a thousand tables of 65537 slots
    // are digested in well under a second. Ids are small and dense.
    let top = sorted.iter().map(|e| e.id as usize + 1).max().unwrap_or(0);
    let mut rank = vec![u32::MAX; top];
    for (r, e) in sorted.iter().enumerate() {
        rank[e.id as usize] = r as u32;
    }
    for slot in slots {
        let r = rank.get(*slot as usize).copied().unwrap_or(u32::MAX);
        h = (h ^ u64::from(r)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 29;
    }
    h
}

/// Builds a table of `size` slots (a prime) holding backend ids.
/// Without any backend of non-zero weight every slot is `NO_BACKEND`.
pub fn build(entries: &[Entry], size: u32) -> Vec<u32> {
    build_table(entries, size).slots
}

/// Builds one table per entry set, spread over the machine's cores.
pub fn build_many(sets: &[Vec<Entry>], size: u32) -> Vec<Table> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(sets.len().max(1));
    if threads <= 1 {
        return sets.iter().map(|e| build_table(e, size)).collect();
    }
    let per = sets.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = sets
            .chunks(per)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|e| build_table(e, size))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("Maglev build thread panicked"))
            .collect()
    })
}

/// `build`, also counting each entry's slots.
pub fn build_table(entries: &[Entry], size: u32) -> Table {
    let m = u64::from(size);
    let mut table = vec![NO_BACKEND; size as usize];
    let mut counts = vec![0u32; entries.len()];
    let mut backends: Vec<(usize, &Entry)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.weight > 0)
        .collect();
    if backends.is_empty() || size == 0 {
        let digest = digest(entries, &table);
        return Table {
            slots: table,
            counts,
            digest,
        };
    }
    // Identity order, not input order: this is what makes agents agree.
    backends.sort_by(|a, b| a.1.identity.cmp(&b.1.identity));
    let max_weight = u64::from(backends.iter().map(|(_, e)| e.weight).max().unwrap_or(1));

    // Each backend walks its permutation offset, offset + skip, offset + 2 skip,
    // ... (mod M); `pos` is the next slot it will try. Stepping by addition and
    // one conditional subtraction keeps divisions out of the loop.
    struct Walk {
        index: usize,
        id: u32,
        weight: u64,
        pos: u64,
        skip: u64,
        credit: u64,
    }
    let mut walks: Vec<Walk> = backends
        .iter()
        .map(|&(index, e)| Walk {
            index,
            id: e.id,
            weight: u64::from(e.weight),
            pos: fnv1a(0x6c62_6f66_6673_6574, &e.identity) % m,
            skip: if m > 1 {
                fnv1a(0x6c62_736b_6970_0000, &e.identity) % (m - 1) + 1
            } else {
                1
            },
            credit: 0,
        })
        .collect();

    let mut filled = 0u64;
    loop {
        for w in walks.iter_mut() {
            w.credit += w.weight;
            if w.credit < max_weight {
                continue;
            }
            w.credit -= max_weight;
            loop {
                let slot = w.pos as usize;
                w.pos += w.skip;
                if w.pos >= m {
                    w.pos -= m;
                }
                if table[slot] == NO_BACKEND {
                    table[slot] = w.id;
                    counts[w.index] += 1;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                let digest = digest(entries, &table);
                return Table {
                    slots: table,
                    counts,
                    digest,
                };
            }
        }
    }
}

/// Whether `n` is prime (table sizes must be, so every skip visits every slot).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn backends(n: u32, weight: impl Fn(u32) -> u32) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                id: i,
                identity: vec![198, 18, (i >> 8) as u8, i as u8],
                weight: weight(i),
            })
            .collect()
    }

    /// (id, last address byte, weight) triples.
    fn entries(list: &[(u32, u8, u32)]) -> Vec<Entry> {
        list.iter()
            .map(|&(id, last, weight)| Entry {
                id,
                identity: vec![198, 18, 0, last],
                weight,
            })
            .collect()
    }

    fn shares(table: &[u32]) -> HashMap<u32, usize> {
        let mut s = HashMap::new();
        for id in table {
            *s.entry(*id).or_default() += 1;
        }
        s
    }

    /// Largest slot share against its weight-proportional share.
    fn imbalance(entries: &[Entry], table: &[u32]) -> f64 {
        let total: u32 = entries.iter().map(|e| e.weight).sum();
        let s = shares(table);
        entries
            .iter()
            .filter(|e| e.weight > 0)
            .map(|e| {
                let ideal = table.len() as f64 * f64::from(e.weight) / f64::from(total);
                s.get(&e.id).copied().unwrap_or(0) as f64 / ideal
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn digest_follows_identities_not_ids() {
        let a = entries(&[(1, 10, 100), (2, 11, 100), (3, 12, 50)]);
        // The same backends under other local ids, given in another order.
        let b = entries(&[(9, 12, 50), (7, 10, 100), (8, 11, 100)]);
        let (ta, tb) = (build(&a, 65537), build(&b, 65537));
        assert_eq!(digest(&a, &ta), digest(&b, &tb));
        let c = entries(&[(1, 10, 100), (2, 11, 100), (3, 12, 60)]);
        assert_ne!(digest(&a, &ta), digest(&c, &build(&c, 65537)));
    }

    #[test]
    fn equal_weights_balance_within_two_percent() {
        for n in [3, 10, 100, 1000] {
            let entries = backends(n, |_| 100);
            let table = build(&entries, 65537);
            assert!(table.iter().all(|id| *id < n));
            let worst = imbalance(&entries, &table);
            assert!(
                worst <= 1.02,
                "n={n}: largest share is {worst:.4}x the ideal"
            );
        }
    }

    #[test]
    fn weights_are_honoured() {
        let entries = backends(4, |i| [100, 200, 300, 400][i as usize]);
        let table = build(&entries, 65537);
        let worst = imbalance(&entries, &table);
        assert!(
            worst <= 1.02,
            "largest share is {worst:.4}x its weighted ideal"
        );
        let s = shares(&table);
        let ratio = s[&3] as f64 / s[&0] as f64;
        assert!(
            (3.9..=4.1).contains(&ratio),
            "weight 400 vs 100 gave {ratio:.3}x the slots"
        );
    }

    #[test]
    fn zero_weight_takes_no_slot_and_no_backends_gives_empty_table() {
        let entries = backends(3, |i| if i == 1 { 0 } else { 10 });
        let table = build(&entries, 101);
        assert!(!table.contains(&1));
        assert!(build(&backends(3, |_| 0), 101)
            .iter()
            .all(|id| *id == NO_BACKEND));
        assert!(build(&[], 101).iter().all(|id| *id == NO_BACKEND));
    }

    #[test]
    fn input_order_does_not_matter() {
        let entries = backends(50, |i| 1 + i % 7);
        let mut reversed = entries.clone();
        reversed.reverse();
        reversed.swap(3, 17);
        assert_eq!(build(&entries, 65537), build(&reversed, 65537));
    }

    #[test]
    fn removing_one_backend_moves_close_to_the_ideal_share() {
        for n in [5u32, 10, 100] {
            let entries = backends(n, |_| 1);
            let before = build(&entries, 65537);
            let after = build(&entries[1..], 65537);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let ideal = 65537.0 / f64::from(n);
            let ratio = moved as f64 / ideal;
            // Every slot of the removed backend must move. Maglev trades some extra
            // movement for its near-perfect balance: measured here 1.003x at N=5,
            // 1.02x at N=10 and 1.52x at N=100 with M=65537.
            assert!(
                ratio >= 1.0,
                "n={n}: moved fewer slots than the removed backend held"
            );
            assert!(
                ratio <= 1.6,
                "n={n}: moved {ratio:.3}x the ideal 1/N of the table"
            );
        }
    }

    #[test]
    fn counts_and_parallel_builds_match_the_table() {
        let sets: Vec<Vec<Entry>> = (1..6).map(|n| backends(n * 3, |i| 1 + i % 4)).collect();
        let many = build_many(&sets, 4099);
        for (set, t) in sets.iter().zip(&many) {
            assert_eq!(t.slots, build(set, 4099));
            let s = shares(&t.slots);
            for (e, c) in set.iter().zip(&t.counts) {
                assert_eq!(s.get(&e.id).copied().unwrap_or(0), *c as usize);
            }
        }
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(7) && is_prime(2));
        assert!(!is_prime(65536) && !is_prime(1) && !is_prime(0) && !is_prime(65535));
    }
}
