//! The connection table (`FLOWS`): finding a flow's entry and recording a
//! new one. The layout and the slot protocol are `lb_common::flow_table`'s.
use core::{
    intrinsics::{atomic_cxchg, atomic_xadd, atomic_xchg, AtomicOrdering},
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
    sync::atomic::{compiler_fence, Ordering},
};

use aya_ebpf::Global;

use lb_common::{
    flow_table::{
        buckets_of, claim_word, key_words, slot_element, slot_hash, tags_element, FlowTableHeader,
        FlowTags, FLOW_BUCKET_SLOTS, SLOT_BUSY, SLOT_FREE,
    },
    FlowKey, FlowState,
};

use crate::maps::FLOWS;

// The target has no atomic read-modify-write types (`core::sync::atomic`
// offers loads and stores only), but LLVM emits BPF's atomic instructions
// (ISA v3, `-C target-cpu=v3`) for the intrinsics.

/// Non-zero where every CPU sees another's stores in the order it made
/// them (x86's total store order); the agent sets it at load, and the
/// verifier removes the branch not taken. There a new slot's claim word is
/// published by a plain store, after the slot's: a locked instruction would
/// first wait for those stores to reach the cache, a miss to memory in a
/// large table (a tenth of a new flow's time). Elsewhere (arm64) the
/// publishing exchange is a full barrier.
#[unsafe(no_mangle)]
static STORES_IN_ORDER: Global<u8> = Global::new(0);

/// Adds `n` (wrapping: `u64::MAX` subtracts one) to `*p` atomically and
/// returns the old value.
#[inline(always)]
unsafe fn add(p: *mut u64, n: u64) -> u64 {
    // SAFETY: the caller's pointer, aligned, in a map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, n) }
}

/// Compare-and-exchange: whether `*p` was `old` and is now `new`.
#[inline(always)]
unsafe fn cas(p: *mut u32, old: u32, new: u32) -> bool {
    // SAFETY: the caller's pointer, aligned, in a map value.
    unsafe {
        atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new).1
    }
}

/// Where a key lives: its words, claim word and its two buckets (equal in
/// a one-bucket table).
struct Place<'a> {
    words: &'a [u32; 10],
    claim: u32,
    first: u32,
    second: u32,
}

/// The table's header and the key's place; `None` while the agent has not
/// set the table up.
#[inline(always)]
fn place(key: &FlowKey) -> Option<(*mut FlowTableHeader, Place<'_>)> {
    let header = FLOWS.get_ptr_mut(0)? as *mut FlowTableHeader;
    // SAFETY: element 0 is the header; plain data.
    let buckets = unsafe { (*header).buckets };
    if buckets == 0 {
        return None;
    }
    let words = key_words(key);
    // SAFETY: as above.
    let h = slot_hash(words, unsafe { &(*header).keys });
    let (first, second) = buckets_of(h, buckets);
    Some((
        header,
        Place {
            claim: claim_word(words, h),
            words,
            first,
            second,
        },
    ))
}

/// A bucket's claim words.
#[inline(always)]
fn tags(bucket: u32) -> Option<*mut FlowTags> {
    Some(FLOWS.get_ptr_mut(tags_element(bucket))? as *mut FlowTags)
}

/// The element of `words`' slot in bucket `bucket`. The bucket's claim
/// words are read from one element at fixed offsets (a load and a compare
/// per slot that is not the flow's); a slot is read only where its claim
/// word matches. An index, not a pointer, comes back: the verifier then
/// leaves `find` in one state whichever slot matched.
#[inline(always)]
fn find_in(bucket: u32, words: &[u32; 10], claim: u32) -> Option<u32> {
    let tags = tags(bucket)?;
    for i in 0..FLOW_BUCKET_SLOTS {
        // SAFETY: the claim words' element; a claim word is read once. A
        // slot being written or removed holds `SLOT_BUSY`.
        if unsafe { read_volatile(addr_of!((*tags).claims[i as usize])) } != claim {
            continue;
        }
        let element = slot_element(bucket, i);
        let slot = FLOWS.get_ptr_mut(element)?;
        // SAFETY: an element of the array, plain data. One branch for the
        // nine words: fewer paths to verify.
        let differ = unsafe {
            let k = &(*slot).key;
            (k[0] ^ words[0])
                | (k[1] ^ words[1])
                | (k[2] ^ words[2])
                | (k[3] ^ words[3])
                | (k[4] ^ words[4])
                | (k[5] ^ words[5])
                | (k[6] ^ words[6])
                | (k[7] ^ words[7])
                | (k[8] ^ words[8])
        };
        if differ == 0 {
            return Some(element);
        }
    }
    None
}

/// The entry of `key`, if the table holds one. Inlined: a global function
/// (as `lb_flow_record` is) would cost a call per packet.
#[inline(always)]
pub fn find(key: &FlowKey) -> Option<*mut FlowState> {
    let (_, p) = place(key)?;
    let i = match find_in(p.first, p.words, p.claim) {
        Some(i) => i,
        None if p.second == p.first => return None,
        None => find_in(p.second, p.words, p.claim)?,
    };
    let slot = FLOWS.get_ptr_mut(i)?;
    // SAFETY: an element of the array.
    Some(unsafe { addr_of_mut!((*slot).state) })
}

/// Free slots in bucket `bucket`. Like `claim_in`, shaped as one lookup
/// per slot: with the claim words' element looked up once before the loop,
/// the verifier's work on `lb_flow_record` rose by 75,000 instructions.
#[inline(never)]
fn free_in(bucket: u32) -> u32 {
    let mut n = 0;
    for i in 0..FLOW_BUCKET_SLOTS {
        if let Some(tags) = tags(bucket) {
            // SAFETY: the claim words' element.
            if unsafe { read_volatile(addr_of!((*tags).claims[i as usize])) } == SLOT_FREE {
                n += 1;
            }
        }
    }
    n
}

/// Takes a free slot of bucket `bucket` for the key: claims it
/// (`SLOT_FREE` to `SLOT_BUSY`, which one CPU only wins), writes the state
/// and the key, then publishes the claim word. A subprogram of its own
/// within `lb_flow_record`.
#[inline(never)]
fn claim_in(bucket: u32, words: &[u32; 10], claim_word: u32, state: &FlowState) -> bool {
    for i in 0..FLOW_BUCKET_SLOTS {
        let Some(slot) = FLOWS.get_ptr_mut(slot_element(bucket, i)) else {
            return false;
        };
        let Some(tags) = tags(bucket) else {
            return false;
        };
        // SAFETY: the claim words' element and a slot of the array; claim
        // words are only written with atomics, by the datapath and the agent
        // alike, and the slot is written only once this CPU holds it.
        unsafe {
            let claim = addr_of_mut!((*tags).claims[i as usize]);
            if read_volatile(claim) != SLOT_FREE || !cas(claim, SLOT_FREE, SLOT_BUSY) {
                continue;
            }
            (*slot).state = *state;
            let k = &mut (*slot).key;
            k[0] = words[0];
            k[1] = words[1];
            k[2] = words[2];
            k[3] = words[3];
            k[4] = words[4];
            k[5] = words[5];
            k[6] = words[6];
            k[7] = words[7];
            k[8] = words[8];
            k[9] = claim_word;
            publish(claim, claim_word);
        }
        return true;
    }
    false
}

/// Publishes a claimed slot's claim word once its state and key are
/// written: those stores are visible before it, in store order (see
/// `STORES_IN_ORDER`) or behind the exchange's full barrier. A subprogram:
/// inlined, its branch made the verifier's work on `claim_in` grow by a
/// tenth.
#[inline(never)]
fn publish(claim: *mut u32, claim_word: u32) {
    // SAFETY: a claim word this CPU holds `SLOT_BUSY`.
    unsafe {
        if STORES_IN_ORDER.load() != 0 {
            // The target has no release store before ISA v4: the fence
            // keeps the compiler from moving the slot's stores past this.
            compiler_fence(Ordering::Release);
            write_volatile(claim, claim_word);
        } else {
            atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(claim, claim_word);
        }
    }
}

/// What `record` did.
#[derive(PartialEq, Eq)]
pub enum Recorded {
    Yes,
    /// The table holds its capacity (or is not set up).
    Full,
    /// Both of the key's buckets are full (the table is not).
    NoRoom,
}

/// Records `state` for `key`, which the table did not hold when the packet
/// looked it up.
///
/// Two CPUs recording the same new flow at once may both take a slot; the
/// flow's packets then find the first, and the other, idle, is expired.
#[inline(always)]
pub fn record(key: &FlowKey, state: &FlowState) -> Recorded {
    match lb_flow_record(key, state) {
        0 => Recorded::Yes,
        1 => Recorded::Full,
        _ => Recorded::NoRoom,
    }
}

/// `record`, as a global function (0: recorded, 1: full, 2: no room in
/// the key's buckets). The verifier checks a global function once, on its
/// own (the object carries BTF for that, `--btf`), where a static one is
/// walked again on each of the many paths of the packet path into it: with
/// this one static, the program's verification took three times the work.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_flow_record(key: *const FlowKey, state: *const FlowState) -> u32 {
    if key.is_null() || state.is_null() {
        return 1;
    }
    // SAFETY: a FlowKey and a FlowState the caller holds.
    let (key, state) = unsafe { (&*key, &*state) };
    let Some((header, p)) = place(key) else {
        return 1;
    };
    // SAFETY: the header; `used` is only written with atomics.
    let used = unsafe { addr_of_mut!((*header).used) };
    // SAFETY: as above.
    let capacity = unsafe { (*header).capacity };
    // A full table is seen without a locked instruction (a flood of new
    // flows into it would bounce the count's cache line between CPUs).
    // SAFETY: as above.
    if unsafe { read_volatile(used) } >= capacity {
        return 1;
    }
    // The flow's place in the count is taken before its slot, and given
    // back if it finds none: a locked add after the slot's stores would
    // wait for them (see `STORES_IN_ORDER`).
    // SAFETY: as above.
    if unsafe { add(used, 1) } >= capacity {
        // SAFETY: as above.
        unsafe { add(used, u64::MAX) };
        return 1;
    }
    // The bucket with more room first.
    let (a, b) = if p.second != p.first && free_in(p.second) > free_in(p.first) {
        (p.second, p.first)
    } else {
        (p.first, p.second)
    };
    let taken =
        claim_in(a, p.words, p.claim, state) || (b != a && claim_in(b, p.words, p.claim, state));
    if !taken {
        // SAFETY: as above.
        unsafe { add(used, u64::MAX) };
        return 2;
    }
    0
}
