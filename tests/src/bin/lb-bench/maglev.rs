//! The Maglev section: balance, disruption when one backend leaves, build
//! time and memory, at N = 10, 100 and 1,000, for the project's fill in
//! tables sized from N (`maglev::ring_size`) and, as the baseline in the same
//! run, the classic Maglev fill in the old single size (65,537).

use std::time::Instant;

use lb_common::NO_BACKEND;
use lb_userspace::maglev;
use serde_json::json;

use super::{median, Report, ROUNDS};

/// The smallest table (the default `maglev_table_size`).
const MINIMUM: u32 = 65537;

/// The classic Maglev fill (the paper's, with weighted turns) the project
/// used before tables were sized from N: a backend whose next slot is taken
/// walks on until it finds a free one. The baseline of this section only.
fn classic(entries: &[maglev::Entry], size: u32) -> Vec<u32> {
    let m = u64::from(size);
    let mut table = vec![NO_BACKEND; size as usize];
    let mut sorted: Vec<&maglev::Entry> = entries.iter().filter(|e| e.weight > 0).collect();
    sorted.sort_by(|a, b| a.identity.cmp(&b.identity));
    let max_weight = u64::from(sorted.iter().map(|e| e.weight).max().unwrap_or(1));
    let hash = |seed: u64, bytes: &[u8]| {
        let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    };
    // (id, weight, next slot, skip, credit)
    let mut walks: Vec<(u32, u64, u64, u64, u64)> = sorted
        .iter()
        .map(|e| {
            let pos = hash(0x6c62_6f66_6673_6574, &e.identity) % m;
            let skip = hash(0x6c62_736b_6970_0000, &e.identity) % (m - 1) + 1;
            (e.id, u64::from(e.weight), pos, skip, 0)
        })
        .collect();
    let mut filled = 0u64;
    while filled < m && !walks.is_empty() {
        for (id, weight, pos, skip, credit) in walks.iter_mut() {
            *credit += *weight;
            if *credit < max_weight {
                continue;
            }
            *credit -= max_weight;
            loop {
                let slot = *pos as usize;
                *pos += *skip;
                if *pos >= m {
                    *pos -= m;
                }
                if table[slot] == NO_BACKEND {
                    table[slot] = *id;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    table
}

fn backends(n: u32, weighted: bool) -> Vec<maglev::Entry> {
    (0..n)
        .map(|i| maglev::Entry {
            id: i,
            identity: vec![198, 18, (i >> 8) as u8, i as u8],
            weight: if weighted { 100 + (i % 3) * 50 } else { 100 },
        })
        .collect()
}

/// Largest share against its weighted ideal.
fn balance(entries: &[maglev::Entry], table: &[u32]) -> f64 {
    let total: u32 = entries.iter().map(|e| e.weight).sum();
    let mut slots = vec![0u32; entries.len()];
    for id in table {
        slots[*id as usize] += 1;
    }
    entries
        .iter()
        .map(|e| {
            f64::from(slots[e.id as usize])
                / (table.len() as f64 * f64::from(e.weight) / f64::from(total))
        })
        .fold(0.0, f64::max)
}

/// The worst, over three leaving backends (a light, a middle, a heavy one
/// with the weights), of the slots moved against the leaver's weighted share.
fn disruption(
    entries: &[maglev::Entry],
    table: &[u32],
    build: &dyn Fn(&[maglev::Entry]) -> Vec<u32>,
) -> f64 {
    let total: u32 = entries.iter().map(|e| e.weight).sum();
    [0usize, 1, 2]
        .iter()
        .map(|&gone| {
            let mut rest = entries.to_vec();
            let left = rest.remove(gone);
            let after = build(&rest);
            let moved = table.iter().zip(&after).filter(|(a, b)| a != b).count();
            moved as f64 / (table.len() as f64 * f64::from(left.weight) / f64::from(total))
        })
        .fold(0.0, f64::max)
}

/// Figures of one fill at one N: (build ms, balance, disruption).
fn measure(entries: &[maglev::Entry], build: &dyn Fn(&[maglev::Entry]) -> Vec<u32>) -> [f64; 3] {
    let times: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(build(entries));
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let table = build(entries);
    [
        median(times),
        balance(entries, &table),
        disruption(entries, &table, build),
    ]
}

pub fn run(report: &mut Report) {
    println!("== Maglev: the fill in tables sized from N, against classic Maglev in {MINIMUM} slots, one core");
    for n in [10u32, 100, 1000] {
        let m = maglev::ring_size(MINIMUM, n as usize);
        for weighted in [false, true] {
            let entries = backends(n, weighted);
            let kind = if weighted { "weighted" } else { "equal" };
            let old = measure(&entries, &|e| classic(e, MINIMUM));
            let new = measure(&entries, &|e| maglev::build(e, m));
            rows(report, n, m, kind, old, new);
        }
        let entries = backends(n, true);
        let mut shuffled = entries.clone();
        shuffled.reverse();
        let identical = maglev::build(&shuffled, m) == maglev::build(&entries, m);
        report.row(
            "maglev",
            format!("two agents, N = {n}, any order"),
            if identical { "identical" } else { "DIFFERENT" },
            "",
            "identical",
            Some(identical),
        );
        let bytes = 3 * u64::from(m) * 4;
        report.row(
            "maglev",
            format!("memory per VIP, N = {n} (3 rings of {m} slots)"),
            format!("{:.2} MB", bytes as f64 / 1e6),
            format!("classic: {:.2} MB", 3.0 * f64::from(MINIMUM) * 4.0 / 1e6),
            "",
            None,
        );
        report
            .json
            .insert(format!("maglev.n{n}.ring_size"), json!(m));
        report
            .json
            .insert(format!("maglev.n{n}.identical"), json!(identical));
    }
}

fn rows(report: &mut Report, n: u32, m: u32, kind: &str, old: [f64; 3], new: [f64; 3]) {
    let [old_ms, old_balance, old_disruption] = old;
    let [ms, balance, disruption] = new;
    report.row(
        "maglev",
        format!("disruption, one of N = {n} {kind} leaves (worst of 3)"),
        format!("{disruption:.3}× ideal"),
        format!("M = {m}; classic, M = {MINIMUM}: {old_disruption:.3}×"),
        "≤ 1.5×",
        Some(disruption <= 1.5),
    );
    report.row(
        "maglev",
        format!("balance, N = {n} {kind} (largest share / weighted ideal)"),
        format!("{balance:.4}"),
        format!("classic: {old_balance:.4}"),
        "≤ 1.05",
        Some(balance <= 1.05),
    );
    report.row(
        "maglev",
        format!("build, N = {n} {kind}"),
        format!("{ms:.2} ms"),
        format!("M = {m}; classic, M = {MINIMUM}: {old_ms:.2} ms"),
        "",
        None,
    );
    for (name, value) in [
        ("build_ms", ms),
        ("balance", balance),
        ("disruption", disruption),
        ("classic_build_ms", old_ms),
        ("classic_balance", old_balance),
        ("classic_disruption", old_disruption),
    ] {
        report
            .json
            .insert(format!("maglev.n{n}.{kind}.{name}"), json!(value));
    }
}
