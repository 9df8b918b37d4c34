//! The connection table (`FLOWS`) mapped into the agent's memory: set up,
//! read, filled (migration) and expired with the slot protocol of
//! `lb_common::flow_table`, with atomics on the words the datapath claims.

use std::{
    os::fd::AsFd as _,
    ptr::{addr_of, addr_of_mut},
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::MapData;
use lb_common::{
    flow_table::{
        buckets_of, claim_word, key_of, key_words, slot_element, slot_hash, tags_element, FlowSlot,
        FlowTableHeader, FlowTags, BUCKET_ELEMENTS, FLOW_BUCKET_SLOTS, SLOT_BUSY, SLOT_FREE,
    },
    FlowKey, FlowState,
};

use super::map_array;

/// The mapped table. Slots are numbered across buckets: slot `n` is slot
/// `n % FLOW_BUCKET_SLOTS` of bucket `n / FLOW_BUCKET_SLOTS`.
pub struct FlowSlots {
    ptr: *mut FlowSlot,
    elements: u32,
    buckets: u32,
    // Unmapped on drop.
    _mapping: memmap2::MmapMut,
    // Keeps the map alive as long as the mapping.
    map: MapData,
}

// SAFETY: the mapping is shared memory that the datapath writes concurrently
// anyway; every access here is a volatile read, an atomic, or a write to a
// slot this side holds claimed (`SLOT_BUSY`).
unsafe impl Send for FlowSlots {}
unsafe impl Sync for FlowSlots {}

/// What `FlowSlots::take` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Held (`SLOT_BUSY`) for `release`: the slot's number.
    Slot(u32),
    /// The flow saw a packet since it was scanned: left in place.
    Moved,
    Absent,
}

/// Where a key lives.
struct Place {
    words: [u32; 10],
    claim: u32,
    buckets: [u32; 2],
}

impl FlowSlots {
    /// Maps the table. A table not yet set up (a new map) gets a header for
    /// `capacity` flows and random hash keys; one set up by an earlier agent
    /// keeps its keys (its flows are placed by them) and takes `capacity`.
    pub fn open(map: MapData, capacity: Option<u32>) -> Result<Self> {
        let info = map
            .info()
            .context("reading the connection table's map info")?;
        if info.value_size() as usize != size_of::<FlowSlot>() {
            bail!(
                "the connection table has {}-byte entries, not {}",
                info.value_size(),
                size_of::<FlowSlot>()
            );
        }
        let elements = info.max_entries();
        if elements < 1 + BUCKET_ELEMENTS || (elements - 1) % BUCKET_ELEMENTS != 0 {
            bail!("the connection table has {elements} entries: not a header and whole buckets");
        }
        let buckets = (elements - 1) / BUCKET_ELEMENTS;
        let mut mapping = map_array(
            map.fd().as_fd(),
            elements as usize * size_of::<FlowSlot>(),
            "the connection table",
        )?;
        let table = FlowSlots {
            ptr: mapping.as_mut_ptr().cast(),
            elements,
            buckets,
            _mapping: mapping,
            map,
        };
        let header = table.header();
        // SAFETY: the header, element 0 of the mapping.
        unsafe {
            if (*header).buckets == 0 {
                let Some(capacity) = capacity else {
                    bail!("the connection table was never set up");
                };
                let mut keys = [0u32; 10];
                let len = size_of_val(&keys);
                if libc::getrandom(keys.as_mut_ptr().cast(), len, 0) != len as isize {
                    return Err(std::io::Error::last_os_error())
                        .context("drawing the connection table's hash keys");
                }
                (*header).capacity = u64::from(capacity);
                (*header).keys = keys;
                // Last: the datapath uses the table once it has buckets.
                AtomicU32::from_ptr(addr_of_mut!((*header).buckets))
                    .store(buckets, Ordering::SeqCst);
            } else if (*header).buckets != buckets {
                bail!(
                    "the connection table's header says {} buckets, the map holds {buckets}",
                    (*header).buckets
                );
            } else if let Some(capacity) = capacity {
                (*header).capacity = u64::from(capacity);
            }
        }
        Ok(table)
    }

    /// The map (for its fd and memory figures).
    pub fn map(&self) -> &MapData {
        &self.map
    }

    fn header(&self) -> *mut FlowTableHeader {
        self.ptr.cast()
    }

    fn used(&self) -> &AtomicU64 {
        // SAFETY: the header's `used`, aligned, written with atomics only.
        unsafe { AtomicU64::from_ptr(addr_of_mut!((*self.header()).used)) }
    }

    /// Flows the table may hold.
    pub fn capacity(&self) -> u64 {
        // SAFETY: the header, plain data.
        unsafe { std::ptr::read_volatile(addr_of!((*self.header()).capacity)) }
    }

    /// Slots in use (flows recorded, and removed ones not yet freed).
    pub fn in_use(&self) -> u64 {
        self.used().load(Ordering::Relaxed)
    }

    /// Slot `n`'s element.
    fn slot(&self, n: u32) -> *mut FlowSlot {
        let e = slot_element(n / FLOW_BUCKET_SLOTS, n % FLOW_BUCKET_SLOTS);
        assert!(e < self.elements, "slot {n} beyond the table");
        // SAFETY: in the mapping (checked above).
        unsafe { self.ptr.add(e as usize) }
    }

    /// Slot `n`'s claim word.
    fn claim(&self, n: u32) -> &AtomicU32 {
        let e = tags_element(n / FLOW_BUCKET_SLOTS);
        assert!(e < self.elements, "slot {n} beyond the table");
        // SAFETY: a claim word of the mapping, aligned, written with
        // atomics only.
        unsafe {
            let tags = self.ptr.add(e as usize).cast::<FlowTags>();
            AtomicU32::from_ptr(addr_of_mut!(
                (*tags).claims[(n % FLOW_BUCKET_SLOTS) as usize]
            ))
        }
    }

    fn place(&self, key: &FlowKey) -> Place {
        // SAFETY: the header, plain data.
        let (buckets, keys) = unsafe { ((*self.header()).buckets, (*self.header()).keys) };
        let words = *key_words(key);
        let h = slot_hash(&words, &keys);
        let (a, b) = buckets_of(h, buckets);
        Place {
            claim: claim_word(&words, h),
            words,
            buckets: [a * FLOW_BUCKET_SLOTS, b * FLOW_BUCKET_SLOTS],
        }
    }

    /// The slots of a key's buckets, each once.
    fn slots_of(p: &Place) -> impl Iterator<Item = u32> {
        let [a, b] = p.buckets;
        let second = if b == a { 0 } else { FLOW_BUCKET_SLOTS };
        (a..a + FLOW_BUCKET_SLOTS).chain(b..b + second)
    }

    fn find(&self, key: &FlowKey) -> Option<u32> {
        let p = self.place(key);
        Self::slots_of(&p).find(|&i| {
            if self.claim(i).load(Ordering::Acquire) != p.claim {
                return false;
            }
            // SAFETY: a slot of the mapping; a torn read fails the compare.
            let words = unsafe { std::ptr::read_volatile(addr_of!((*self.slot(i)).key)) };
            words[..9] == p.words[..9]
        })
    }

    /// The entry of `key`.
    pub fn get(&self, key: &FlowKey) -> Option<FlowState> {
        let i = self.find(key)?;
        // SAFETY: a slot of the mapping, plain data.
        Some(unsafe { std::ptr::read_volatile(addr_of!((*self.slot(i)).state)) })
    }

    /// Hands every recorded flow to `each`; returns how many there were.
    /// Flows recorded or removed meanwhile may or may not be seen, and a
    /// flow's counters are read while its packets update them.
    pub fn for_each(&self, mut each: impl FnMut(&FlowKey, &FlowState)) -> usize {
        let mut n = 0;
        for i in 0..self.buckets * FLOW_BUCKET_SLOTS {
            let claim = self.claim(i).load(Ordering::Acquire);
            if claim == SLOT_FREE || claim == SLOT_BUSY {
                continue;
            }
            // SAFETY: a slot of the mapping, plain data.
            let slot = unsafe { std::ptr::read_volatile(self.slot(i)) };
            // Rewritten while read: skipped, as a flow recorded meanwhile.
            if self.claim(i).load(Ordering::Acquire) != claim {
                continue;
            }
            each(&key_of(&slot.key), &slot.state);
            n += 1;
        }
        n
    }

    /// Records a flow (a migration's copy), with the datapath's protocol:
    /// in the roomier of its buckets. Returns `false` if the table is full
    /// for it. The caller has checked that the table does not hold it.
    pub fn insert(&self, key: &FlowKey, state: &FlowState) -> bool {
        // The place in the count first, given back without a slot, as
        // `lb_flow_record` does.
        let capacity = self.capacity();
        if self.in_use() >= capacity {
            return false;
        }
        if self.used().fetch_add(1, Ordering::Relaxed) >= capacity {
            self.used().fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        let p = self.place(key);
        let free = |start: u32| {
            (start..start + FLOW_BUCKET_SLOTS)
                .filter(|&i| self.claim(i).load(Ordering::Relaxed) == SLOT_FREE)
                .count()
        };
        let [a, b] = p.buckets;
        let order = if b != a && free(b) > free(a) {
            [b, a]
        } else {
            [a, b]
        };
        for start in order {
            for i in start..start + FLOW_BUCKET_SLOTS {
                let claim = self.claim(i);
                if claim
                    .compare_exchange(SLOT_FREE, SLOT_BUSY, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
                {
                    continue;
                }
                // SAFETY: a slot this side holds claimed; the claim word is
                // published with an atomic store after the plain writes.
                unsafe {
                    let slot = self.slot(i);
                    std::ptr::write_volatile(addr_of_mut!((*slot).state), *state);
                    for (w, v) in p.words.iter().enumerate().take(9) {
                        std::ptr::write_volatile(addr_of_mut!((*slot).key[w]), *v);
                    }
                    std::ptr::write_volatile(addr_of_mut!((*slot).key[9]), p.claim);
                }
                claim.store(p.claim, Ordering::SeqCst);
                return true;
            }
        }
        self.used().fetch_sub(1, Ordering::Relaxed);
        false
    }

    /// Takes a flow out of use (its claim word to `SLOT_BUSY`, so packets no
    /// longer find it) unless, with `last_ns`, a packet came since it was
    /// scanned. A taken slot is freed by `release`.
    pub fn take(&self, key: &FlowKey, last_ns: Option<u64>) -> Taken {
        let Some(i) = self.find(key) else {
            return Taken::Absent;
        };
        let p = self.place(key);
        if self
            .claim(i)
            .compare_exchange(p.claim, SLOT_BUSY, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            // Removed or replaced meanwhile.
            return Taken::Absent;
        }
        if let Some(last_ns) = last_ns {
            // SAFETY: a slot of the mapping, plain data.
            let now = unsafe { std::ptr::read_volatile(addr_of!((*self.slot(i)).state.last_ns)) };
            if now != last_ns {
                self.claim(i).store(p.claim, Ordering::SeqCst);
                return Taken::Moved;
            }
        }
        Taken::Slot(i)
    }

    /// Frees taken slots, once no program can still hold them: a program
    /// that found a flow just before it was taken may write its state
    /// until it returns. Programs run inside RCU read-side sections, so
    /// after a grace period none does.
    pub fn release(&self, slots: &[u32]) {
        if slots.is_empty() {
            return;
        }
        rcu_grace_period();
        for &i in slots {
            // The other words stay: a free slot's are never read.
            self.claim(i).store(SLOT_FREE, Ordering::SeqCst);
            self.used().fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Waits for an RCU grace period: `membarrier(MEMBARRIER_CMD_GLOBAL)` runs
/// `synchronize_rcu()` in the kernel. Where it is not available, a pause far
/// longer than any program run.
fn rcu_grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: a syscall without pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
