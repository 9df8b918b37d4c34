//! Weighted Maglev: the lookup table a VIP's new flows are hashed into.
//!
//! The table depends only on the backends' identities (their addresses), their
//! weights and the table size, never on the order backends were given in, so
//! every agent with the same configuration builds the same table and flows keep
//! their backend across LB nodes behind ECMP.
//!
//! Each backend walks its own permutation of the slots (offset and skip derived
//! from its address) on a clock whose pace follows its weight. The first
//! backend to reach a free slot takes it, and a backend stops at its weighted share plus a small
//! headroom (see `Walk`). Each VIP's table is sized from its backend count
//! (`ring_size`), so one backend leaving moves little more than its share.

use std::sync::{Arc, Mutex};

use lb_common::NO_BACKEND;

mod finish;

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

/// Builds one table per (entry set, size), spread over the machine's cores.
pub fn build_many(jobs: &[(Vec<Entry>, u32)]) -> Vec<Table> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len().max(1));
    if threads <= 1 {
        return jobs.iter().map(|(e, m)| build_table(e, *m)).collect();
    }
    let per = jobs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = jobs
            .chunks(per)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|(e, m)| build_table(e, *m))
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

/// Tables built for one apply, by pool and size, so that VIPs with the same
/// backends and weights (a service on several ports, several VIPs in front
/// of one cluster) share one build. Kept up to `SHARED_BYTES` of slots;
/// past that, tables are built and not kept.
#[derive(Default)]
pub struct Builds {
    tables: std::collections::HashMap<PoolKey, Arc<Table>>,
    bytes: usize,
}

const SHARED_BYTES: usize = 64 << 20;

/// A table's size and its pool: (backend id, weight) in the given order.
type PoolKey = (u32, Vec<(u32, u32)>);

impl Builds {
    /// `build_many`, building each distinct (pool, size) once.
    pub fn build_many(&mut self, jobs: &[(Vec<Entry>, u32)]) -> Vec<Arc<Table>> {
        // Ids stand for identities (one backend, one id), in the given order:
        // the counts follow the entries' order.
        let key = |(entries, size): &(Vec<Entry>, u32)| -> PoolKey {
            let pool: Vec<(u32, u32)> = entries.iter().map(|e| (e.id, e.weight)).collect();
            (*size, pool)
        };
        let keys: Vec<_> = jobs.iter().map(key).collect();
        let mut missing: Vec<usize> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if !self.tables.contains_key(k) && !missing.iter().any(|&j| keys[j] == *k) {
                missing.push(i);
            }
        }
        let todo: Vec<(Vec<Entry>, u32)> = missing.iter().map(|&i| jobs[i].clone()).collect();
        let mut fresh = std::collections::HashMap::new();
        for (i, table) in missing.iter().zip(build_many(&todo)) {
            let table = Arc::new(table);
            let size = table.slots.len() * 4;
            if self.bytes + size <= SHARED_BYTES {
                self.bytes += size;
                self.tables.insert(keys[*i].clone(), Arc::clone(&table));
            }
            fresh.insert(keys[*i].clone(), table);
        }
        keys.iter()
            .map(|k| {
                self.tables
                    .get(k)
                    .or_else(|| fresh.get(k))
                    .map(Arc::clone)
                    .expect("every pool was built")
            })
            .collect()
    }
}

/// How far above its weighted share of the table a backend may fill: 4 %, so
/// the largest share is at most 1.04x the ideal (or its share rounded up, in
/// tables too small for that).
const HEADROOM_PERCENT: u64 = 4;

/// Each backend walks its own permutation of the slots (offset and skip
/// derived from its identity) on a clock of its own; the first backend to
/// reach a free slot takes it, and a backend stops once it holds its
/// weighted share plus `HEADROOM_PERCENT`.
///
/// Classic Maglev lets a backend whose next slot is taken keep walking until
/// it finds a free one, so every backend claims in lockstep: the balance is
/// perfect, but removing one backend changes who wins almost every later
/// race, and the table moves several times the removed backend's share (6.7x
/// at 1,000 backends in 65,537 slots). Here a step costs time whether or not
/// the slot was free, so a slot goes to the backend whose permutation reaches
/// it first: only the removed backend's slots, and the few that a backend
/// reaching its cap sooner or later passes on, change hands. The cap keeps
/// the balance within the headroom.
///
/// A backend of weight w takes its k-th step at `-ln(1 - k/M) / w`: the
/// time at which each slot is reached is then exponential with rate w, so a
/// backend is first to a slot in proportion to its weight. Time runs in
/// rounds (the heaviest backend takes about one step per round at first),
/// and within a round backends step in identity order.
struct Walk {
    index: usize,
    id: u32,
    /// Rounds per unit of `-ln(1 - k/M)`: M * max weight / weight.
    pace: f64,
    steps: u64,
    next: f64,
    pos: u64,
    skip: u64,
    cap: u32,
}

impl Walk {
    fn new(index: usize, e: &Entry, m: u64, total_weight: u64, max_weight: u64) -> Walk {
        // The weighted share, and the cap: at least the share rounded up, so
        // the caps always add up to the whole table.
        let share = m * u64::from(e.weight);
        let rounded_up = share.div_ceil(total_weight);
        let with_headroom = share * (100 + HEADROOM_PERCENT) / (100 * total_weight);
        let pace = m as f64 * max_weight as f64 / f64::from(e.weight);
        Walk {
            index,
            id: e.id,
            pace,
            steps: 0,
            next: 0.0,
            pos: fnv1a(0x6c62_6f66_6673_6574, &e.identity) % m,
            skip: if m > 1 {
                fnv1a(0x6c62_736b_6970_0000, &e.identity) % (m - 1) + 1
            } else {
                1
            },
            cap: u32::try_from(rounded_up.max(with_headroom)).unwrap_or(u32::MAX),
        }
    }

    /// One step: the slot it reaches, and when the next step is (`clock`:
    /// `-ln(1 - k/M)` by k). A walk that completes a lap (which a walk
    /// still under its cap does only while others fill the last slots)
    /// goes round again, later.
    fn step(&mut self, m: u64, clock: &[f64]) -> usize {
        let slot = self.pos as usize;
        self.pos += self.skip;
        if self.pos >= m {
            self.pos -= m;
        }
        self.steps += 1;
        self.next = self.time(self.steps, m, clock);
        slot
    }

    /// When step number `step` (from 0) is taken: laps after the first are
    /// 64 units of `clock` apart. `finish` computes a step's time with this
    /// too, so with the same bits.
    fn time(&self, step: u64, m: u64, clock: &[f64]) -> f64 {
        let lap = (step / m) as f64;
        (lap * 64.0 + clock[(step % m) as usize]) * self.pace
    }
}

/// `build`, also counting each entry's slots.
pub fn build_table(entries: &[Entry], size: u32) -> Table {
    build_with(entries, size, true)
}

/// `build_table`, finishing by slot or (the tests' reference) stepping to the end.
fn build_with(entries: &[Entry], size: u32, by_slot: bool) -> Table {
    let m = u64::from(size);
    let mut table = vec![NO_BACKEND; size as usize];
    let mut counts = vec![0u32; entries.len()];
    let mut backends: Vec<(usize, &Entry)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.weight > 0)
        .collect();
    if !backends.is_empty() && size > 0 {
        // Identity order, not input order: this is what makes agents agree.
        backends.sort_by(|a, b| a.1.identity.cmp(&b.1.identity));
        let total: u64 = backends.iter().map(|(_, e)| u64::from(e.weight)).sum();
        let max = backends.iter().map(|(_, e)| u64::from(e.weight)).max();
        let walks = backends
            .iter()
            .map(|&(index, e)| Walk::new(index, e, m, total, max.unwrap_or(1)))
            .collect();
        fill_with(&mut table, &mut counts, walks, by_slot);
    }
    let digest = digest(entries, &table);
    Table {
        slots: table,
        counts,
        digest,
    }
}

/// The fill's clock: `-ln(1 - k/M)` for each step k of a lap.
///
/// Agents on different hosts must build the same tables, and a walk's steps
/// are compared with round boundaries, so a last-bit difference in a clock
/// value can move a slot. `f64::ln_1p` is the system libm's `log1p`, whose
/// last bits differ between C libraries (and between a glibc's variants for
/// CPUs with and without FMA); the `libm` crate's is plain Rust arithmetic,
/// the same bits on every host.
pub(crate) fn clock(m: u64) -> Vec<f64> {
    (0..m)
        .map(|k| -libm::log1p(-(k as f64) / m as f64))
        .collect()
}

/// Clocks of the table sizes built so far, up to `CLOCK_CACHE_BYTES` in
/// all: an apply builds many tables of few sizes, and the clock took about
/// a tenth of a build (0.4 ms of 4 at M = 65,537).
static CLOCKS: Mutex<Vec<(u64, Arc<Vec<f64>>)>> = Mutex::new(Vec::new());
const CLOCK_CACHE_BYTES: u64 = 64 << 20;

fn cached_clock(m: u64) -> Arc<Vec<f64>> {
    let mut clocks = CLOCKS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = clocks.iter().find(|(size, _)| *size == m) {
        return Arc::clone(c);
    }
    let c = Arc::new(clock(m));
    let mut bytes: u64 = clocks.iter().map(|(size, _)| size * 8).sum();
    // The oldest sizes go first; a clock larger than the whole budget is
    // not kept.
    while bytes + m * 8 > CLOCK_CACHE_BYTES && !clocks.is_empty() {
        bytes -= clocks.remove(0).0 * 8;
    }
    if m * 8 <= CLOCK_CACHE_BYTES {
        clocks.push((m, Arc::clone(&c)));
    }
    c
}

/// Runs the walks until every slot is taken. The caps add up to at least the
/// table size and every skip visits every slot (the size is prime), so it ends.
///
/// Step by step while many slots are free; once few are (`finish::worth_it`),
/// by slot: the last slots cost most of the steps (most steps then reach a
/// taken slot), and `finish` gives each remaining slot to the walk that
/// would have taken it, without the steps in between.
///
/// `by_slot` false steps to the end: the reference the tests hold the
/// by-slot finish to.
fn fill_with(table: &mut [u32], counts: &mut [u32], mut walks: Vec<Walk>, by_slot: bool) {
    let m = table.len() as u64;
    // The costly part of a step's time, computed once per table size.
    let clock = cached_clock(m);
    // Which slots are taken, one bit each: every step tests a slot at random,
    // and the bits (8 KB at M = 65,537) stay in the L1 cache where the table
    // (32 bits a slot) does not.
    let mut taken = vec![0u64; (m as usize).div_ceil(64)];
    let mut filled = 0u64;
    let mut round = 0.0f64;
    // The earliest next step of the walks under their caps (each walk's
    // first step is at 0).
    let mut first = 0.0f64;
    while filled < m {
        // Between rounds: every step before `round` is taken, and `walks`
        // holds the walks still under their caps.
        if by_slot && finish::worth_it(m - filled, walks.len() as u64, m) {
            finish::run(table, counts, &walks, &taken, &clock);
            return;
        }
        // The next round in which some walk steps (light backends wait).
        round = (round + 1.0).max(first.floor() + 1.0);
        first = f64::INFINITY;
        let mut capped = false;
        for w in walks.iter_mut() {
            while w.next < round && counts[w.index] < w.cap {
                let slot = w.step(m, &clock);
                let (word, bit) = (slot / 64, 1u64 << (slot % 64));
                if taken[word] & bit == 0 {
                    taken[word] |= bit;
                    table[slot] = w.id;
                    counts[w.index] += 1;
                    filled += 1;
                    if filled == m {
                        return;
                    }
                }
            }
            if counts[w.index] >= w.cap {
                capped = true;
            } else {
                first = first.min(w.next);
            }
        }
        if capped {
            walks.retain(|w| counts[w.index] < w.cap);
        }
    }
}

/// Slots per backend a table is sized for. Measured with the weights of
/// the unit tests (up to 4x apart) at 1,000 backends, one backend leaving
/// moves up to 1.49x its share with 200 slots per backend, 1.33x with 400.
pub const SLOTS_PER_BACKEND: u64 = 400;

/// Largest table `ring_size` picks (the largest `maglev_table_size` allowed).
pub const MAX_RING_SIZE: u32 = 16_777_259;

/// The size of a VIP's table for `backends` configured backends: the
/// smallest of `minimum`, then the first primes at or above 2, 4, 8 ...
/// times `minimum`, that has `SLOTS_PER_BACKEND` slots per backend (at most
/// `MAX_RING_SIZE`). Sizes double, so a VIP changes size only when its
/// backend count doubles or halves across a boundary, and VIPs share few
/// distinct sizes (which keeps the rings' array from fragmenting).
pub fn ring_size(minimum: u32, backends: usize) -> u32 {
    let wanted = SLOTS_PER_BACKEND.saturating_mul(backends as u64);
    let mut size = minimum;
    let mut target = u64::from(minimum);
    while u64::from(size) < wanted {
        target *= 2;
        if target > u64::from(MAX_RING_SIZE) {
            break;
        }
        size = next_prime(target as u32);
    }
    size
}

/// The first prime at or above `n`.
pub fn next_prime(n: u32) -> u32 {
    (n..).find(|c| is_prime(*c)).unwrap_or(n)
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
mod tests;
