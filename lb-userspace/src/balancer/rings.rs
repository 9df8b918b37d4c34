//! Space for Maglev rings in the `MAGLEV` array: each VIP's ring has the
//! size its backend count asks for (`maglev::ring_size`), so rings of
//! different sizes are carved out of one array of `maglev_slots` slots.
//!
//! First fit from the lowest free slot, free pieces merged with their
//! neighbours. A ring given up rests until the next apply before its space
//! is reused (a packet that read the old VIP entry may still read it).

use std::collections::BTreeMap;

/// A ring: `size` slots from slot `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Span {
    pub base: u32,
    pub size: u32,
}

impl Span {
    /// No ring (a VIP adopted from maps whose rings were not copied).
    pub const NONE: Span = Span { base: 0, size: 0 };

    /// The live ring of a VIP entry.
    pub fn of_live(info: &lb_common::VipInfo) -> Span {
        Span {
            base: info.ring_base,
            size: info.ring_size,
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct RingSpace {
    /// Free pieces: base -> size, never adjacent (merged).
    free: BTreeMap<u32, u32>,
    resting: Vec<Span>,
    total: u32,
}

impl RingSpace {
    pub(super) fn new(total: u32) -> Self {
        let mut free = BTreeMap::new();
        if total > 0 {
            free.insert(0, total);
        }
        Self {
            free,
            resting: Vec::new(),
            total,
        }
    }

    pub(super) fn total(&self) -> u32 {
        self.total
    }

    /// Free slots, and the largest free piece.
    pub(super) fn free(&self) -> (u64, u32) {
        let sum = self.free.values().map(|s| u64::from(*s)).sum();
        (sum, self.free.values().copied().max().unwrap_or(0))
    }

    /// The lowest free piece of `size` slots.
    pub(super) fn take(&mut self, size: u32) -> Option<Span> {
        let (&base, &len) = self.free.iter().find(|(_, len)| **len >= size)?;
        self.free.remove(&base);
        if len > size {
            self.free.insert(base + size, len - size);
        }
        Some(Span { base, size })
    }

    /// Marks `span` as in use (adopting a running datapath); false when it
    /// is not wholly free (outside the array or used twice).
    pub(super) fn claim(&mut self, span: Span) -> bool {
        let end = u64::from(span.base) + u64::from(span.size);
        let Some((&base, &len)) = self.free.range(..=span.base).next_back() else {
            return false;
        };
        if span.size == 0 || end > u64::from(base) + u64::from(len) {
            return false;
        }
        self.free.remove(&base);
        if span.base > base {
            self.free.insert(base, span.base - base);
        }
        let after = u64::from(base) + u64::from(len) - end;
        if after > 0 {
            self.free.insert(end as u32, after as u32);
        }
        true
    }

    pub(super) fn rest(&mut self, span: Span) {
        if span.size > 0 {
            self.resting.push(span);
        }
    }

    /// Rings given up by the previous apply become free again.
    pub(super) fn wake(&mut self) {
        for span in std::mem::take(&mut self.resting) {
            self.release(span);
        }
    }

    fn release(&mut self, span: Span) {
        let (mut base, mut size) = (span.base, span.size);
        if let Some((&b, &s)) = self.free.range(..base).next_back() {
            if b + s == base {
                self.free.remove(&b);
                base = b;
                size += s;
            }
        }
        if let Some(&s) = self.free.get(&(base + size)) {
            self.free.remove(&(base + size));
            size += s;
        }
        self.free.insert(base, size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_of_different_sizes_share_the_array_and_merge_when_freed() {
        let mut space = RingSpace::new(100);
        let a = space.take(30).unwrap();
        let b = space.take(50).unwrap();
        assert_eq!((a.base, b.base), (0, 30));
        assert!(space.take(30).is_none(), "only 20 slots are left");
        assert_eq!(space.free(), (20, 20));
        space.rest(a);
        assert!(space.take(25).is_none(), "a resting ring is not reused");
        space.wake();
        assert_eq!(space.take(25).unwrap().base, 0);
        space.rest(b);
        space.wake();
        // 25..30, 30..80 and 80..100 merge into one piece of 75.
        assert_eq!(space.free(), (75, 75));
        assert_eq!(space.take(75).unwrap(), Span { base: 25, size: 75 });
    }

    #[test]
    fn claims_take_exactly_the_adopted_span_once() {
        let mut space = RingSpace::new(100);
        assert!(space.claim(Span { base: 10, size: 20 }));
        assert!(!space.claim(Span { base: 25, size: 10 }), "overlaps");
        assert!(!space.claim(Span { base: 90, size: 20 }), "past the end");
        assert!(!space.claim(Span { base: 40, size: 0 }));
        assert_eq!(space.free(), (80, 70));
        assert_eq!(space.take(10).unwrap().base, 0);
        assert_eq!(space.take(10).unwrap().base, 30);
    }
}
