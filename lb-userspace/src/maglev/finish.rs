//! The end of the fill, by slot instead of by step.
//!
//! A walk's steps are a function of their number alone: step `j` reaches
//! slot `pos0 + j * skip (mod M)` at time `Walk::time(j)`, and is taken in
//! round `floor(time) + 1` (the first round whose boundary is past it; the
//! fill skips only rounds in which no walk steps). Within a round walks step
//! in identity order. So every step has a place in one order, (round, walk,
//! step), and the fill gives each slot to the first step in that order that
//! reaches it free from a walk still under its cap. Steps that reach taken
//! slots change nothing.
//!
//! Once few slots are free, `run` finds for each the first visit of every
//! walk still stepping (the step number solves `pos + d * skip = slot`), and
//! hands out slots in that order, passing a slot whose first visitor reached
//! its cap on to the next. The tables are those of stepping to the end (see
//! the tests), at a fraction of the steps: at N = 10 and M = 65,537 the last
//! tenth of the slots took most of them.

use std::{cmp::Reverse, collections::BinaryHeap};

use super::Walk;

/// Whether to finish by slot: each free slot then costs a visit computed
/// per walk still stepping, against the steps it saves. Once the free
/// slots times the walks are at most M / 8: with a build of 4.0 ms stepping
/// to the end (N = 10, M = 65,537), 3.4 ms at M, 2.8 ms at M / 4, 2.9 ms
/// at M / 16; at N = 1,000 (M = 524,309) 33 ms, 33, 30 and 28 ms.
pub(super) fn worth_it(free: u64, walks: u64, m: u64) -> bool {
    m > 2 && free.saturating_mul(walks) <= m / 8
}

/// A step in the fill's order: round, then the walk's place in identity
/// order, then the step's number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Visit {
    round: u64,
    walk: usize,
    step: u64,
}

/// What a walk needs to find its next visit to a slot, computed once: the
/// inverse of its skip modulo M.
struct Visitor {
    inverse: u64,
}

fn pow_mod(mut base: u64, mut exp: u64, m: u64) -> u64 {
    let mut result = 1 % m;
    base %= m;
    while exp > 0 {
        if exp & 1 == 1 {
            result = result * base % m;
        }
        base = base * base % m;
        exp >>= 1;
    }
    result
}

/// The first step at or after the walk's current one that reaches `slot`.
fn visit(w: &Walk, v: &Visitor, order: usize, slot: u64, m: u64, clock: &[f64]) -> Visit {
    // Below 2^25 each (M up to 2^24): the product fits.
    let d = (slot + m - w.pos) % m * v.inverse % m;
    let step = w.steps + d;
    let time = w.time(step, m, clock);
    Visit {
        // Non-negative and below 2^53 (weights up to 65,535, M up to 2^24):
        // the conversion truncates to the floor, exactly.
        round: time as u64 + 1,
        walk: order,
        step,
    }
}

/// The first visit to `slot` by a walk still under its cap.
fn first_visit(
    walks: &[Walk],
    visitors: &[Visitor],
    counts: &[u32],
    slot: u64,
    m: u64,
    clock: &[f64],
) -> Option<Visit> {
    walks
        .iter()
        .zip(visitors)
        .enumerate()
        .filter(|(_, (w, _))| counts[w.index] < w.cap)
        .map(|(order, (w, v))| visit(w, v, order, slot, m, clock))
        .min()
}

/// Gives every slot not `taken` to the walk whose step would have taken it.
/// `walks` are those still under their caps, in identity order, between
/// two rounds.
pub(super) fn run(
    table: &mut [u32],
    counts: &mut [u32],
    walks: &[Walk],
    taken: &[u64],
    clock: &[f64],
) {
    let m = table.len() as u64;
    // M is prime, so every skip (1..M) has an inverse: M - 2 powers of it.
    let visitors: Vec<Visitor> = walks
        .iter()
        .map(|w| Visitor {
            inverse: pow_mod(w.skip, m - 2, m),
        })
        .collect();
    let mut queue = BinaryHeap::new();
    for slot in 0..m {
        if taken[(slot / 64) as usize] & (1 << (slot % 64)) != 0 {
            continue;
        }
        if let Some(v) = first_visit(walks, &visitors, counts, slot, m, clock) {
            queue.push(Reverse((v, slot)));
        }
    }
    while let Some(Reverse((v, slot))) = queue.pop() {
        let w = &walks[v.walk];
        if counts[w.index] >= w.cap {
            // Capped before it got there: the slot's next visitor, which
            // comes later (this one was the first of all).
            if let Some(next) = first_visit(walks, &visitors, counts, slot, m, clock) {
                queue.push(Reverse((next, slot)));
            }
            continue;
        }
        table[slot as usize] = w.id;
        counts[w.index] += 1;
    }
}
