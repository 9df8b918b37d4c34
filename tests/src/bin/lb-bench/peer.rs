//! The datapath benchmark's optional peer: Katran, run through the same shim,
//! on the same packets, in the same rounds as `lb_ingress` and the floor.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, sync::OnceLock};

use super::katran::{Katran, Stat, Vip, MAX_CONN_RATE};
use super::*;

/// `--peer katran=PATH`, set once by `main`.
pub static KATRAN_OBJECT: OnceLock<PathBuf> = OnceLock::new();

/// Counters before a case's timed rounds.
pub struct Before {
    tx: u64,
    pass: u64,
    misses: u64,
    syn_misses: u64,
    fallback: u64,
}

/// The VIPs of `bench_vips()`, as Katran's maps hold them.
fn vips() -> Vec<Vip> {
    let v4: Vec<IpAddr> = (0..10)
        .map(|i| IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11 + i)))
        .collect();
    let v6: Vec<IpAddr> = (0..10u16)
        .map(|i| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x11 + i)))
        .collect();
    vec![
        Vip {
            addr: V4_VIP.into(),
            port: 80,
            proto: PROTO_TCP,
            reals: v4.clone(),
        },
        Vip {
            addr: V4_VIP.into(),
            port: 53,
            proto: PROTO_UDP,
            reals: v4,
        },
        Vip {
            addr: V6_VIP.into(),
            port: 443,
            proto: PROTO_TCP,
            reals: v6.clone(),
        },
        Vip {
            addr: V4_VIP_TO_V6.into(),
            port: 80,
            proto: PROTO_TCP,
            reals: v6,
        },
    ]
}

/// Loads and configures Katran when `--peer katran=PATH` was given. Each CPU's
/// LRU holds 1,000,000 flows, the size of the project's connection table (the
/// benchmark runs on one CPU, so both sides see a 1M-entry table).
pub fn load() -> Option<Katran> {
    let path = KATRAN_OBJECT.get()?;
    // One CPU for the whole comparison: Katran's LRU is per CPU.
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let cpu = aya::util::nr_cpus().map_or(0, |n| n - 1);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
    }
    let k = Katran::load(path, &vips(), 1_000_000)
        .unwrap_or_else(|e| panic!("peer katran={}: {e:#}", path.display()));
    println!("   peer: Katran from {}", path.display());
    Some(k)
}

fn snapshot(k: &Katran) -> Before {
    let s = |x| k.stat(x).expect("Katran stats");
    Before {
        tx: s(Stat::Tx).0,
        pass: s(Stat::Pass).0,
        misses: s(Stat::Lru).1,
        syn_misses: s(Stat::LruMiss).0,
        fallback: s(Stat::FallbackLru).0,
    }
}

/// Checks Katran's own output for the case's frame, warms it up (creating
/// the flow for established cases), and, for the full-table case, fills its
/// LRU past its size. Returns the counters before the timed rounds.
pub fn prepare(
    k: &mut Katran,
    shim: &mut Shim,
    data: &[u8; FRAME_LEN],
    vary: Option<(u32, u32)>,
    verdict: u32,
    fill: bool,
) -> Before {
    k.reset_conn_rate().expect("reset");
    k.verify(data, verdict == XDP_TX)
        .unwrap_or_else(|e| panic!("peer check failed: {e:#}"));
    shim.target_fd(k.prog_fd().expect("Katran fd"));
    shim.frame(*data, vary);
    shim.run(data, 1000);
    if fill {
        for _ in 0..FILL_RUNS {
            k.reset_conn_rate().expect("reset");
            shim.run(data, NEW_FLOW_REPEAT);
        }
    }
    snapshot(k)
}

/// One timed run of Katran through the shim: ns per packet.
pub fn run(
    k: &mut Katran,
    shim: &mut Shim,
    data: &[u8; FRAME_LEN],
    vary: Option<(u32, u32)>,
    repeat: u32,
    verdict: u32,
) -> f64 {
    k.reset_conn_rate().expect("reset");
    shim.target_fd(k.prog_fd().expect("Katran fd"));
    shim.frame(*data, vary);
    let (ns, v) = shim.run(data, repeat);
    assert_eq!(v, verdict, "Katran: unexpected verdict");
    if vary.is_some() {
        let (conns, _) = k.stat(Stat::NewConnRate).expect("stats");
        assert!(
            conns <= u64::from(MAX_CONN_RATE),
            "Katran counted {conns} new connections in a second: it skipped LRU inserts"
        );
    }
    ns
}

/// After a case: every run was sent (or passed) by Katran, established
/// packets found their flow, and new flows all went through Maglev and the
/// LRU insert.
pub fn check(k: &Katran, b: &Before, runs: u64, verdict: u32, new_flows: bool, name: &str) {
    let a = snapshot(k);
    assert_eq!(
        a.fallback, b.fallback,
        "Katran ({name}): per-CPU LRU missing"
    );
    if verdict == XDP_PASS {
        assert_eq!(
            a.pass - b.pass,
            runs,
            "Katran ({name}): not every run passed"
        );
        return;
    }
    assert_eq!(a.tx - b.tx, runs, "Katran ({name}): not every run was sent");
    if new_flows {
        assert_eq!(
            a.syn_misses - b.syn_misses,
            runs,
            "Katran ({name}): not every run was a new flow"
        );
    } else {
        assert_eq!(
            a.misses, b.misses,
            "Katran ({name}): established packets missed the LRU"
        );
    }
}

/// Rows for the cases Katran ran: our time over Katran's, and Katran's ratio
/// to the floor. Targets (issue's table): established ≤ 0.8×, new flow into
/// the full table ≤ 0.7×, non-VIP pass ≤ 1×. A new flow into the full table
/// is forwarded here by Maglev without an entry, while Katran's LRU evicts
/// one; the new flow with room compares the two inserts.
pub fn report(report: &mut Report, ratios: &BTreeMap<&'static str, (f64, f64)>) {
    let rows = [
        ("v4_established", "IPv4 TCP established", Some(0.8)),
        ("v4_udp", "IPv4 UDP (established)", Some(0.8)),
        ("v6_established", "IPv6 TCP established", Some(0.8)),
        ("v4_to_v6", "IPv4 client to IPv6 backend", None),
        ("pass", "non-VIP traffic passed", Some(1.0)),
        (
            "v4_syn_full",
            "new flow into the full 1M-entry table",
            Some(0.7),
        ),
        ("v4_syn_new", "new flow, the table with room", None),
        (
            "v4_established_untraced",
            "IPv4 TCP established, tracers off",
            None,
        ),
    ];
    for (key, name, target) in rows {
        let Some(&(to_peer, peer_floor)) = ratios.get(key) else {
            continue;
        };
        let (t, met) = match target {
            Some(x) => (format!("≤ {x}× katran"), Some(to_peer <= x)),
            None => (String::new(), None),
        };
        report.row(
            "vs katran",
            name,
            format!("{to_peer:.2}× katran"),
            format!("katran {peer_floor:.2}× floor"),
            t,
            met,
        );
        report
            .json
            .insert(format!("katran.{key}.ratio_to_katran"), json!(to_peer));
        report
            .json
            .insert(format!("katran.{key}.katran_to_floor"), json!(peer_floor));
    }
}
