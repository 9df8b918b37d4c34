//! The connection table the datapath indexes itself (`FLOWS`): capacity,
//! removal by the collector's handle, and flows recorded by the agent
//! (a migration) found by the datapath, through the real programs.
use std::net::Ipv4Addr;

use lb_common::{FlowKey, FlowState, PROTO_TCP, TCP_ACK, TCP_SYN};
use lb_tests::{fixture::*, packet::*};
use lb_userspace::datapath::{Datapath as _, FlowSource as _, MapSizes};

const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const BACKENDS: [&str; 3] = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];

fn config() -> String {
    let list: Vec<String> = BACKENDS
        .iter()
        .map(|a| format!("{{ address = \"{a}\", weight = 1 }}"))
        .collect();
    format!(
        "[[vips]]\naddress=\"{VIP4}\"\nport=80\nprotocol=\"tcp\"\nbackends=[{}]\n",
        list.join(", ")
    )
}

fn client(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 0)) + i / 60000)
}

fn sport(i: u32) -> u16 {
    (1024 + i % 60000) as u16
}

fn frame(i: u32, flags: u8) -> Vec<u8> {
    let ip = ipv4(client(i), VIP4, PROTO_TCP, &tcp(sport(i), 80, flags, b""));
    eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &ip)
}

fn key(i: u32) -> FlowKey {
    FlowKey::v4(
        client(i).octets(),
        VIP4.octets(),
        sport(i).to_be(),
        80u16.to_be(),
        PROTO_TCP,
    )
}

fn backend_of(out: &[u8]) -> [u8; 4] {
    [out[30], out[31], out[32], out[33]]
}

fn sizes(flows: u32) -> MapSizes {
    MapSizes {
        flow_table_size: flows,
        ..SIZES
    }
}

fn with_capacity(flows: u32) -> Fixture {
    Fixture::with_sizes(sizes(flows), &config())
}

#[test]
fn a_table_holds_exactly_its_capacity() {
    holds_exactly_4096(with_capacity(4096));
}

/// The same where a new slot is published behind a full barrier, as on
/// hosts whose CPUs may reorder each other's stores (arm64): this host
/// (x86) publishes with a plain store, so the other path is tried here.
#[test]
fn a_table_holds_exactly_its_capacity_with_store_barriers() {
    holds_exactly_4096(Fixture::with_store_barriers(sizes(4096), &config()));
}

fn holds_exactly_4096(f: Fixture) {
    // Half again as many slots as flows, in buckets of eight: every one of
    // 4,096 new flows finds room, and the 4,097th finds the table full.
    for i in 0..4096 {
        assert_eq!(f.ingress(&frame(i, TCP_SYN)).action, XDP_TX);
    }
    let slots = f.balancer.datapath().flow_slots();
    assert_eq!((slots.in_use(), slots.capacity()), (4096, 4096));
    assert_eq!(f.flows().len(), 4096);
    assert_eq!(f.balancer.datapath().flows_unrecorded().unwrap(), 0);
    assert_eq!(f.ingress(&frame(5000, TCP_SYN)).action, XDP_TX);
    assert!(f.flow(&key(5000)).is_none());
    assert_eq!(f.balancer.datapath().flows_unrecorded().unwrap(), 1);
    // Each recorded flow is found again, with its own entry.
    for i in (0..4096).step_by(97) {
        let before = f.flow(&key(i)).expect("recorded").packets_in;
        f.ingress(&frame(i, TCP_ACK));
        assert_eq!(f.flow(&key(i)).unwrap().packets_in, before + 1, "flow {i}");
    }
}

#[test]
fn the_collector_removes_idle_flows_and_frees_their_slots() {
    let f = with_capacity(64);
    for i in 0..64 {
        f.ingress(&frame(i, TCP_SYN));
    }
    let slots = f.balancer.datapath().flow_slots().clone();
    assert_eq!(slots.in_use(), 64);
    let mut table = f.balancer.datapath().flow_table().unwrap();
    let scanned: Vec<(FlowKey, FlowState)> = f.flows();
    // A packet after the scan, a clock tick later: that flow is no longer idle.
    std::thread::sleep(std::time::Duration::from_millis(30));
    f.ingress(&frame(7, TCP_ACK));
    let mut removed = 0;
    for (k, s) in &scanned {
        if table.remove_idle_flow(k, s.last_ns).unwrap() {
            removed += 1;
        }
    }
    assert_eq!(removed, 63, "the flow that moved stays");
    // Gone for packets at once; the slots are freed after a grace period.
    assert!(f.flow(&key(3)).is_none());
    assert!(f.flow(&key(7)).is_some());
    assert_eq!(slots.in_use(), 64);
    table.settle().unwrap();
    assert_eq!(slots.in_use(), 1);
    assert_eq!(f.flows().len(), 1);
    // The room is used again.
    for i in 100..163 {
        f.ingress(&frame(i, TCP_SYN));
    }
    assert_eq!(slots.in_use(), 64);
    assert_eq!(f.balancer.datapath().flows_unrecorded().unwrap(), 0);
}

#[test]
fn flows_the_agent_records_are_followed_by_the_datapath() {
    // What a migration does: the agent writes entries, and the datapath
    // follows them rather than Maglev.
    let mut f = with_capacity(256);
    let slots = f.balancer.datapath().flow_slots().clone();
    let backends = f.balancer.backend_ids();
    let mut expected = Vec::new();
    for i in 0..200 {
        f.ingress(&frame(i, TCP_SYN));
        let entry = f.flow(&key(i)).expect("recorded");
        // Another backend than the one Maglev picked.
        let pos = backends
            .iter()
            .position(|(id, _)| *id == entry.backend_id)
            .expect("a backend of the VIP");
        let (id, addr) = backends[(pos + 1) % backends.len()];
        f.balancer.datapath_mut().remove_flow(&key(i)).unwrap();
        assert!(f.flow(&key(i)).is_none());
        let state = FlowState {
            backend_id: id,
            ..entry
        };
        assert!(slots.insert(&key(i), &state));
        assert_eq!(f.flow(&key(i)), Some(state));
        expected.push((i, addr));
    }
    assert_eq!(slots.in_use(), 200);
    for (i, addr) in expected {
        let out = f.ingress(&frame(i, TCP_ACK)).output;
        let std::net::IpAddr::V4(a) = addr else {
            panic!("IPv4 backends")
        };
        assert_eq!(backend_of(&out), a.octets(), "flow {i}");
    }
}
