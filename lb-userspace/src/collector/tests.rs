//! Unit tests of `collector`.

use super::*;
use crate::datapath::fake::FakeDatapath;
use lb_common::{TCP_ACK, TCP_FIN, TCP_RST};

fn key(sport: u16, proto: u8) -> FlowKey {
    FlowKey::v4(
        [198, 18, 0, 1],
        [198, 18, 10, 1],
        sport.to_be(),
        80u16.to_be(),
        proto,
    )
}

fn flow(flags: u8, state: u8, last_s: u64, bytes: u64) -> FlowState {
    FlowState {
        backend_id: 3,
        vip_id: 1,
        tcp_flags: flags,
        state,
        first_ns: NS,
        last_ns: last_s * NS,
        packets_in: 1,
        bytes_in: bytes,
        bytes_out: bytes + 20,
        ..FlowState::default()
    }
}

fn visibility() -> VisibilityConfig {
    VisibilityConfig {
        tcp_idle_timeout_s: 300,
        udp_idle_timeout_s: 60,
        closed_timeout_s: 10,
        half_open_timeout_s: 30,
        ..VisibilityConfig::default()
    }
}

#[test]
fn a_flow_that_wakes_up_between_scan_and_expiry_stays() {
    /// A table that, like the kernel one, removes only flows still idle.
    struct Table(std::collections::HashMap<FlowKey, FlowState>);
    impl FlowSource for Table {
        fn scan_flows(&self, each: &mut dyn FnMut(&FlowKey, &FlowState)) -> Result<usize> {
            self.0.iter().for_each(|(k, v)| each(k, v));
            Ok(self.0.len())
        }
        fn remove_idle_flow(&mut self, key: &FlowKey, last_ns: u64) -> Result<bool> {
            if self.0.get(key).is_some_and(|s| s.last_ns != last_ns) {
                return Ok(false);
            }
            self.0.remove(key);
            Ok(true)
        }
    }
    let now = 1000;
    let mut t = Table(Default::default());
    t.0.insert(
        key(1, PROTO_TCP),
        flow(TCP_SYN | TCP_ACK, 0, now - 400, 500),
    );
    t.0.insert(
        key(2, PROTO_TCP),
        flow(TCP_SYN | TCP_ACK, 0, now - 400, 500),
    );
    let mut scan = scan(&t, Some(Timeouts::new(&visibility(), 0)), now * NS).unwrap();
    assert_eq!((scan.expired.len(), scan.present), (2, 0));
    // A packet for flow 2 arrives before the expiry.
    t.0.get_mut(&key(2, PROTO_TCP)).unwrap().last_ns = now * NS;
    expire(&mut t, &mut scan).unwrap();
    assert_eq!(t.0.len(), 1, "only the idle flow went");
    assert!(t.0.contains_key(&key(2, PROTO_TCP)));
    assert_eq!((scan.expired.len(), scan.present), (1, 1));
    let mut c = Collector::new(&visibility(), 0);
    c.absorb(scan, &FakeDatapath::default(), now * NS, &[], &[])
        .unwrap();
    assert_eq!(c.vip_presence[&1].active, 1, "the woken flow counts");
    assert_eq!(c.vip_expired(1).flows, 1);
}

#[test]
fn counts_presence_and_expires_by_phase() {
    let mut dp = FakeDatapath::default();
    let now = 1000;
    dp.flows
        .insert(key(1, PROTO_TCP), flow(TCP_SYN | TCP_ACK, 0, now - 5, 500));
    dp.flows
        .insert(key(2, PROTO_TCP), flow(TCP_SYN, 0, now - 5, 60));
    dp.flows
        .insert(key(3, PROTO_TCP), flow(TCP_SYN, 0, now - 31, 60)); // half-open, expired
    dp.flows.insert(
        key(4, PROTO_TCP),
        flow(TCP_SYN | TCP_FIN, FLOW_CLOSED_FIN, now - 5, 90),
    );
    dp.flows.insert(
        key(5, PROTO_TCP),
        flow(TCP_SYN | TCP_RST, FLOW_CLOSED_RST, now - 11, 90),
    ); // expired
    dp.flows
        .insert(key(6, lb_common::PROTO_UDP), flow(0, 0, now - 61, 40)); // expired
    dp.flows
        .insert(key(7, PROTO_TCP), flow(TCP_ACK, 0, now - 299, 40));
    let mut c = Collector::new(&visibility(), 0);
    c.collect(&mut dp, now * NS, &[1], &[3]).unwrap();
    assert_eq!(dp.flows.len(), 4, "three flows expired");
    assert_eq!(c.flows_in_table, 4);
    let p = c.vip_presence[&1];
    assert_eq!((p.active, p.half_open, p.closing), (3, 1, 1));
    assert_eq!(c.backend_presence[&3], p);
    assert_eq!(
        c.vip_expired(1),
        Expired {
            flows: 3,
            half_open: 1
        }
    );
    let top = c.top(2, |_, _| true);
    assert_eq!(top.len(), 2);
    assert_eq!(top[0].1.bytes_in, 500);
    assert_eq!(top[1].1.bytes_in, 90);
}

#[test]
fn flows_without_tracers_expire_by_their_last_packet() {
    // With tracers off the datapath still stamps the times and close state.
    let mut dp = FakeDatapath::default();
    let now = 1000;
    let untraced = |last_s| FlowState {
        packets_in: 1,
        bytes_in: 60,
        bytes_out: 80,
        ..flow(TCP_SYN, 0, last_s, 60)
    };
    dp.flows.insert(key(1, PROTO_TCP), untraced(now - 31));
    dp.flows.insert(key(2, PROTO_TCP), untraced(now - 29));
    let mut c = Collector::new(&visibility(), 0);
    c.collect(&mut dp, now * NS, &[1], &[3]).unwrap();
    assert_eq!(dp.flows.len(), 1);
    assert!(dp.flows.contains_key(&key(2, PROTO_TCP)));
}

#[test]
fn idle_times_shorten_while_the_table_is_nearly_full_and_recover() {
    assert_eq!(next_divisor(1, 899, 1000), 1);
    assert_eq!(next_divisor(1, 900, 1000), 2);
    assert_eq!(next_divisor(512, 1000, 1000), MAX_DIVISOR);
    assert_eq!(next_divisor(MAX_DIVISOR, 1000, 1000), MAX_DIVISOR);
    assert_eq!(next_divisor(8, 800, 1000), 8, "between the marks it holds");
    assert_eq!(next_divisor(8, 749, 1000), 4);
    assert_eq!(next_divisor(1, 0, 1000), 1);
    assert_eq!(
        next_divisor(64, 1000, 0),
        1,
        "an unknown size never shortens"
    );

    // A table of 10: 9 open TCP flows idle 200 s (under 300 s), and one
    // idle 20 s.
    let mut dp = FakeDatapath::default();
    let now = 10_000;
    for sport in 1..=9 {
        dp.flows.insert(
            key(sport, PROTO_TCP),
            flow(TCP_SYN | TCP_ACK, 0, now - 200, 1),
        );
    }
    dp.flows
        .insert(key(10, PROTO_TCP), flow(TCP_SYN | TCP_ACK, 0, now - 20, 1));
    let mut c = Collector::new(&visibility(), 10);
    c.collect(&mut dp, now * NS, &[1], &[3]).unwrap();
    assert_eq!(dp.flows.len(), 10, "nothing is idle past 300 s");
    assert_eq!(c.timeouts.unwrap().divisor, 2);
    // 300 s / 2 = 150 s: the nine least recently used flows go, the recent one stays.
    c.collect(&mut dp, now * NS, &[1], &[3]).unwrap();
    assert_eq!(dp.flows.len(), 1);
    assert!(dp.flows.contains_key(&key(10, PROTO_TCP)));
    assert_eq!(c.vip_expired(1).flows, 9);
    assert_eq!(c.timeouts.unwrap().divisor, 1, "room again: back to 300 s");
    // A reload keeps the divisor in force.
    c.timeouts.as_mut().unwrap().divisor = 4;
    c.set_timeouts(&visibility(), 10);
    assert_eq!(c.timeouts.unwrap().divisor, 4);
    // Never below a second: a flow idle half a second stays at any divisor.
    let t = Timeouts {
        divisor: MAX_DIVISOR,
        ..Timeouts::new(&visibility(), 10)
    };
    assert_eq!(t.shortened(300 * NS), NS);
    assert_eq!(t.shortened(NS / 2), NS / 2);
}

#[test]
fn windows_give_deltas_and_rates() {
    let mut dp = FakeDatapath::default();
    let mut c = Collector::new(&visibility(), 0);
    c.collect(&mut dp, 10 * NS, &[1], &[3]).unwrap();
    dp.vip_stats.insert(
        1,
        TrafficCounters {
            packets: 10,
            bytes: 1000,
            bytes_out: 1200,
            new_flows: 4,
            closed_fin: 1,
            closed_rst: 2,
        },
    );
    c.collect(&mut dp, 12 * NS, &[1], &[3]).unwrap();
    let r = c.vip_report(1, None);
    assert_eq!(r.new_flows, 4);
    assert!((r.new_flows_per_s - 2.0).abs() < 1e-9);
    assert_eq!((r.closed_fin, r.closed_rst), (1, 2));
    assert_eq!(
        r.client_to_lb,
        Leg {
            packets: 10,
            bytes: 1000
        }
    );
    assert_eq!(
        r.lb_to_backend,
        Leg {
            packets: 10,
            bytes: 1200
        }
    );
    assert!((c.window_s(Some(100.0)) - 2.0).abs() < 1e-9);
}

#[test]
fn flag_text_and_phases() {
    assert_eq!(tcp_flags_text(TCP_SYN | TCP_ACK | TCP_FIN), "SYN|ACK|FIN");
    assert!(phase_matches(FlowPhase::ClosedRst, "closed"));
    assert!(phase_matches(FlowPhase::HalfOpen, "open"));
    assert!(!phase_matches(FlowPhase::Open, "half-open"));
}

/// 4,000 backends and 1,000 VIPs, collected every second for 25 minutes:
/// the counter history stays within its memory budget, and `--since`
/// windows still cover what they ask for, at a coarser resolution.
#[test]
fn the_history_stays_within_its_budget() {
    if !crate::limits::testing::in_child("collector::tests::the_history_stays_within_its_budget") {
        return;
    }
    let vips: Vec<u32> = (1..=1000).collect();
    let backends: Vec<u32> = (1..=4000).collect();
    let mut dp = FakeDatapath::default();
    let mut c = Collector::new(&visibility(), 0);
    let peak = crate::limits::testing::PeakRss::start();
    for s in 1..=1500 {
        // VIP 1 opens a flow a second.
        dp.vip_stats.entry(1).or_default().new_flows = s;
        c.collect(&mut dp, s * NS, &vips, &backends).unwrap();
    }
    let grew = peak.growth_mib();
    eprintln!("resident memory grew by {grew} MiB at most");
    assert!(grew < 64 + 32, "resident memory grew by {grew} MiB");
    // From sizes: each snapshot holds 5,000 samples of 4 + 48 + 16 bytes
    // (72 with alignment), and the budget is 64 MiB.
    let sample = std::mem::size_of::<Sample>();
    assert_eq!(sample, 72);
    let snapshot = std::mem::size_of::<Snapshot>() + 5000 * sample;
    let kept = c.history.len();
    eprintln!("{kept} snapshots of {snapshot} bytes");
    assert_eq!(c.history_bytes, kept * snapshot);
    assert!(c.history_bytes() <= HISTORY_BYTES);
    assert_eq!(kept, HISTORY_BYTES / snapshot, "the budget is used");
    assert_eq!(
        c.window_s(None),
        1.0,
        "the last collection, at full resolution"
    );
    for since in [10.0, 300.0, 1200.0] {
        let w = c.window_s(Some(since));
        eprintln!("--since {since} s: a window of {w} s");
        assert!(w <= since && w >= since * 0.85, "--since {since}: {w} s");
        assert_eq!(c.vip_report(1, Some(since)).new_flows as f64, w);
    }
}

/// A small history is bounded by count, and thinned the same way: windows
/// reach back to the first collection.
#[test]
fn a_long_history_reaches_back_to_the_start() {
    let mut dp = FakeDatapath::default();
    let mut c = Collector::new(&visibility(), 0);
    for s in 1..=9000 {
        c.collect(&mut dp, s * NS, &[1], &[3]).unwrap();
    }
    assert_eq!(c.history.len(), HISTORY_MAX);
    assert_eq!(c.window_s(None), 1.0);
    assert_eq!(c.window_s(Some(1e9)), 8999.0, "from the first collection");
    let w = c.window_s(Some(8000.0));
    assert!((7800.0..=8000.0).contains(&w), "{w}");
}
