//! Datapath fixtures: map state, an input packet, the expected verdict and the
//! expected output bytes, run through the real programs with BPF_PROG_TEST_RUN.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    flow_hash, vip_filter_slot, DecapOutcome, FlowKey, Outcome, PROTO_IPIP, PROTO_IPV6, PROTO_TCP,
    PROTO_UDP,
};
use lb_tests::{fixture::*, packet::*};
use lb_userspace::{
    datapath::{Datapath as _, MapSizes},
    maglev,
};

const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const B4: [&str; 3] = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
const B6: [&str; 2] = ["fd00::11", "fd00::12"];

fn vip(addr: &str, port: u16, proto: &str, backends: &[(&str, u32)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        "[[vips]]\naddress=\"{addr}\"\nport={port}\nprotocol=\"{proto}\"\nbackends=[{}]\n",
        list.join(", ")
    )
}

fn standard() -> String {
    [
        vip(
            "198.18.10.1",
            80,
            "tcp",
            &[(B4[0], 1), (B4[1], 1), (B4[2], 1)],
        ),
        vip("198.18.10.1", 0, "udp", &[(B4[0], 1), (B4[1], 2)]),
        vip("fd00:10::1", 443, "tcp", &[(B6[0], 1), (B6[1], 1)]),
        vip("198.18.10.2", 80, "tcp", &[(B6[0], 1), (B6[1], 1)]),
    ]
    .concat()
}

/// The backend Maglev gives `key` for a VIP with these (address, weight) backends.
/// Equal weights, and the same backends with the third weighing 9.
const THREE: [(&str, u32); 3] = [(B4[0], 1), (B4[1], 1), (B4[2], 1)];
const SKEWED: [(&str, u32); 3] = [(B4[0], 1), (B4[1], 1), (B4[2], 9)];

/// A client port of a VIP4:80 TCP flow whose Maglev slot moves to another
/// backend from `THREE` to `SKEWED`, and its backend under `THREE`.
fn moving_flow(f: &Fixture) -> (u16, String) {
    (40000..41000u16)
        .find_map(|p| {
            let k = key4(p, 80, PROTO_TCP);
            let (a, b) = (maglev_pick(f, &THREE, &k), maglev_pick(f, &SKEWED, &k));
            (a != b).then_some((p, a))
        })
        .expect("some slot moves")
}

fn maglev_pick(f: &Fixture, backends: &[(&str, u32)], key: &lb_common::FlowKey) -> String {
    let entries: Vec<maglev::Entry> = backends
        .iter()
        .map(|(a, w)| maglev::Entry {
            id: f.backend_id(a),
            identity: lb_common::addr_bytes(a.parse().unwrap()).0.to_vec(),
            weight: *w,
        })
        .collect();
    let m = ring_size(entries.len());
    let table = maglev::build(&entries, m);
    let id = table[(flow_hash(key) % m) as usize];
    backends
        .iter()
        .find(|(a, _)| f.backend_id(a) == id)
        .unwrap()
        .0
        .to_string()
}

fn src_v4(hash: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 200, (hash & 0xff) as u8)
}

fn src_v6(hash: u32) -> Ipv6Addr {
    let base = u128::from("fd00:200::".parse::<Ipv6Addr>().unwrap());
    Ipv6Addr::from(base | u128::from(hash))
}

fn expect_v4_encap(inner_ip: &[u8], backend: &str, hash: u32, inner_proto: u8) -> Vec<u8> {
    let outer = encap_ipv4(
        src_v4(hash),
        backend.parse().unwrap(),
        inner_proto,
        inner_ip,
    );
    eth(NEXT_HOP_MAC, LB_MAC, ETH_IPV4, &outer)
}

fn expect_v6_encap(inner_ip: &[u8], backend: &str, hash: u32, inner_proto: u8) -> Vec<u8> {
    let outer = ipv6(
        src_v6(hash),
        backend.parse().unwrap(),
        inner_proto,
        hash & 0xfffff,
        64,
        inner_ip,
    );
    eth(NEXT_HOP_MAC, LB_MAC, ETH_IPV6, &outer)
}

/// Sends the IP packet `ip` to the balancer and checks that it left with
/// `XDP_TX`, encapsulated for the backend Maglev gives `key` among `backends`.
/// Returns that backend.
fn assert_balanced(f: &Fixture, ip: &[u8], key: &FlowKey, backends: &[(&str, u32)]) -> String {
    assert_balanced_as(f, ip, ip, key, backends)
}

/// Like `assert_balanced`, for a packet the balancer changes into `inner`
/// before encapsulating it.
fn assert_balanced_as(
    f: &Fixture,
    ip: &[u8],
    inner: &[u8],
    key: &FlowKey,
    backends: &[(&str, u32)],
) -> String {
    let inner_v4 = ip[0] >> 4 == 4;
    let (ether_type, inner_proto) = if inner_v4 {
        (ETH_IPV4, PROTO_IPIP)
    } else {
        (ETH_IPV6, PROTO_IPV6)
    };
    let backend = maglev_pick(f, backends, key);
    let expected = if backend.contains(':') {
        expect_v6_encap(inner, &backend, flow_hash(key), inner_proto)
    } else {
        expect_v4_encap(inner, &backend, flow_hash(key), inner_proto)
    };
    let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ether_type, ip));
    assert_eq!(r.action, XDP_TX, "{key:?}");
    assert_eq!(r.output, expected, "{key:?}");
    backend
}

fn tcp4(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    ipv4(CLIENT4, VIP4, PROTO_TCP, &tcp(sport, dport, flags, b""))
}

fn key4(sport: u16, dport: u16, proto: u8) -> lb_common::FlowKey {
    flow_key(IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), sport, dport, proto)
}

#[test]
fn ipv4_tcp_syn_is_encapsulated_to_the_maglev_backend() {
    let f = Fixture::new(&standard());
    for sport in 40000..40020u16 {
        let key = key4(sport, 80, PROTO_TCP);
        let backend = assert_balanced(
            &f,
            &tcp4(sport, 80, TCP_SYN),
            &key,
            &[(B4[0], 1), (B4[1], 1), (B4[2], 1)],
        );
        assert_eq!(f.flow(&key).unwrap().backend_id, f.backend_id(&backend));
    }
    assert_eq!(f.outcome(Outcome::Forwarded), 20);
    // The batch scan sees exactly the 20 flows, each with its backend.
    let flows = f.flows();
    assert_eq!(flows.len(), 20);
    assert!(flows.iter().all(|(k, v)| f.flow(k) == Some(*v)));
    let dp = f.balancer.datapath();
    let (web_id, _) = f
        .balancer
        .vips()
        .into_iter()
        .find(|(_, v)| v.port == 80 && v.address == IpAddr::V4(VIP4))
        .unwrap();
    let web = dp.vip_counters(web_id).unwrap();
    assert_eq!(web.new_flows, 20);
    assert_eq!(web.packets, 20);
    let per_backend: u64 = f
        .balancer
        .backends()
        .map(|(_, id, _)| dp.backend_counters(id).unwrap().new_flows)
        .sum();
    assert_eq!(per_backend, 20);
}

#[test]
fn ipv4_options_are_parsed() {
    let f = Fixture::new(&standard());
    let fields = V4Fields {
        id: 7,
        options: &[1, 1, 1, 0],
        ..V4Fields::default()
    };
    let ip = ipv4_full(
        CLIENT4,
        VIP4,
        PROTO_TCP,
        fields,
        &tcp(40000, 80, TCP_SYN, b""),
    );
    assert_balanced(
        &f,
        &ip,
        &key4(40000, 80, PROTO_TCP),
        &[(B4[0], 1), (B4[1], 1), (B4[2], 1)],
    );
}

#[test]
fn established_flow_keeps_its_backend_after_the_table_changes() {
    let (three, skewed) = (THREE, SKEWED);
    let mut f = Fixture::new(&standard());
    let (sport, before) = moving_flow(&f);
    let r = f.ingress(&eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IPV4,
        &tcp4(sport, 80, TCP_SYN),
    ));
    assert_eq!(r.action, XDP_TX);

    let mut changed = standard();
    changed = changed.replacen(
        &vip("198.18.10.1", 80, "tcp", &three),
        &vip("198.18.10.1", 80, "tcp", &skewed),
        1,
    );
    f.apply(&changed);

    let key = key4(sport, 80, PROTO_TCP);
    let ip = tcp4(sport, 80, TCP_ACK);
    let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &ip));
    assert_eq!(r.action, XDP_TX);
    assert_eq!(
        r.output,
        expect_v4_encap(&ip, &before, flow_hash(&key), PROTO_IPIP),
        "established flow moved"
    );

    // The same slot for a flow the table has not seen goes to the new choice.
    let newcomer = (41000..50000u16)
        .find(|p| {
            let m = ring_size(skewed.len());
            flow_hash(&key4(*p, 80, PROTO_TCP)) % m == flow_hash(&key) % m
        })
        .unwrap();
    let nkey = key4(newcomer, 80, PROTO_TCP);
    let nip = tcp4(newcomer, 80, TCP_SYN);
    let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &nip));
    let after = maglev_pick(&f, &skewed, &nkey);
    assert_ne!(after, before);
    assert_eq!(
        r.output,
        expect_v4_encap(&nip, &after, flow_hash(&nkey), PROTO_IPIP)
    );
}

#[test]
fn flows_of_a_removed_backend_are_rebalanced() {
    let mut f = Fixture::new(&standard());
    let key = (40000..41000u16)
        .map(|p| key4(p, 80, PROTO_TCP))
        .find(|k| maglev_pick(&f, &[(B4[0], 1), (B4[1], 1), (B4[2], 1)], k) == B4[2])
        .unwrap();
    let sport = u16::from_be(key.sport);
    f.ingress(&eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IPV4,
        &tcp4(sport, 80, TCP_SYN),
    ));
    f.apply(&standard().replacen(
        &vip(
            "198.18.10.1",
            80,
            "tcp",
            &[(B4[0], 1), (B4[1], 1), (B4[2], 1)],
        ),
        &vip("198.18.10.1", 80, "tcp", &[(B4[0], 1), (B4[1], 1)]),
        1,
    ));
    let ip = tcp4(sport, 80, TCP_ACK);
    let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &ip));
    let now = maglev_pick(&f, &[(B4[0], 1), (B4[1], 1)], &key);
    assert_eq!(r.action, XDP_TX);
    assert_eq!(
        r.output,
        expect_v4_encap(&ip, &now, flow_hash(&key), PROTO_IPIP)
    );
}

#[test]
fn udp_to_an_every_port_vip() {
    let f = Fixture::new(&standard());
    for dport in [53u16, 9999, 65535] {
        let ip = ipv4(CLIENT4, VIP4, PROTO_UDP, &udp(5000, dport, b"hello"));
        assert_balanced(
            &f,
            &ip,
            &key4(5000, dport, PROTO_UDP),
            &[(B4[0], 1), (B4[1], 2)],
        );
    }
}

#[test]
fn ipv6_client_to_ipv6_backend() {
    let f = Fixture::new(&standard());
    let ip = ipv6(
        CLIENT6,
        VIP6,
        PROTO_TCP,
        0,
        64,
        &tcp(40000, 443, TCP_SYN, b""),
    );
    let key = flow_key(IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), 40000, 443, PROTO_TCP);
    assert_balanced(&f, &ip, &key, &[(B6[0], 1), (B6[1], 1)]);
}

#[test]
fn ipv4_client_to_ipv6_backend() {
    let f = Fixture::new(&standard());
    let vip2 = Ipv4Addr::new(198, 18, 10, 2);
    let ip = ipv4(CLIENT4, vip2, PROTO_TCP, &tcp(40000, 80, TCP_SYN, b"x"));
    let key = flow_key(IpAddr::V4(CLIENT4), IpAddr::V4(vip2), 40000, 80, PROTO_TCP);
    assert_balanced(&f, &ip, &key, &[(B6[0], 1), (B6[1], 1)]);
}

/// An established flow skips the VIP table: its entry is checked against
/// the VIP its id names (`VIP_BY_ID`). Once the VIP is gone its packets
/// pass like any traffic that is not a VIP's; back, they follow the entry.
#[test]
fn flows_of_a_removed_vip_pass_and_follow_their_entry_once_it_is_back() {
    let mut f = Fixture::new(&standard());
    let syn = eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &tcp4(40100, 80, TCP_SYN));
    assert_eq!(f.ingress(&syn).action, XDP_TX);
    let key = key4(40100, 80, PROTO_TCP);
    let ack = eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &tcp4(40100, 80, TCP_ACK));
    let forwarded = f.ingress(&ack);
    assert_eq!(forwarded.action, XDP_TX);

    // Without VIP4:80; the address keeps its every-port UDP VIP, so its
    // filter slot stays set and the entry's check is what stops the flow.
    let without = standard().replacen(&vip("198.18.10.1", 80, "tcp", &THREE), "", 1);
    f.apply(&without);
    assert!(f.flow(&key).is_some(), "the entry outlives its VIP");
    let passed = f.outcome(Outcome::PassNotVip);
    let r = f.ingress(&ack);
    assert_eq!(r.action, XDP_PASS);
    assert_eq!(r.output, ack, "passed unchanged");
    assert_eq!(f.outcome(Outcome::PassNotVip), passed + 1);

    f.apply(&standard());
    let r = f.ingress(&ack);
    assert_eq!(r.action, XDP_TX);
    assert_eq!(r.output, forwarded.output, "same backend as before");
}

/// The VIP address filter only lets packets on to the lookups: an address
/// that is no VIP's but folds into a VIP address's slot still passes.
#[test]
fn an_address_sharing_a_vip_addresses_filter_slot_passes() {
    let f = Fixture::new(&standard());
    // VIP4's address words are [w, 0, 0, 0]; [0, w, 0, 0] folds the same.
    let o = VIP4.octets();
    let mut bytes = [0u8; 16];
    bytes[4..8].copy_from_slice(&o);
    let other = Ipv6Addr::from(bytes);
    let k = flow_key(IpAddr::V6(CLIENT6), IpAddr::V6(other), 1, 80, PROTO_TCP);
    assert_eq!(
        vip_filter_slot(k.dst_words()),
        vip_filter_slot(key4(1, 80, PROTO_TCP).dst_words())
    );
    let frame = eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IPV6,
        &ipv6(CLIENT6, other, PROTO_TCP, 0, 64, &tcp(1, 80, TCP_SYN, b"")),
    );
    let r = f.ingress(&frame);
    assert_eq!(r.action, XDP_PASS);
    assert_eq!(r.output, frame);
    assert_eq!(f.outcome(Outcome::PassNotVip), 1);
    assert!(f.flows().is_empty());
}

#[test]
fn non_vip_traffic_passes_byte_for_byte() {
    let f = Fixture::new(&standard());
    let other4 = Ipv4Addr::new(198, 18, 0, 99);
    let frames = [
        // Another address, the VIP address on a port it does not serve, another protocol.
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV4,
            &ipv4(CLIENT4, other4, PROTO_TCP, &tcp(1, 80, TCP_SYN, b"")),
        ),
        eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &tcp4(40000, 81, TCP_SYN)),
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV4,
            &ipv4(CLIENT4, VIP4, 47, b"gre-ish payload"),
        ),
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV4,
            &ipv4(CLIENT4, VIP4, 1, &[8, 0, 0, 0, 0, 1, 0, 1]),
        ),
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV6,
            &ipv6(
                CLIENT6,
                "fd00::99".parse().unwrap(),
                PROTO_UDP,
                0,
                64,
                &udp(1, 2, b""),
            ),
        ),
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV6,
            &ipv6(CLIENT6, VIP6, 0, 0, 64, &[6, 0, 0, 0, 0, 0, 0, 0]),
        ),
        // ARP.
        eth(
            [0xff; 6],
            CLIENT_MAC,
            0x0806,
            &[
                0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 3, 198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 198, 18,
                0, 2,
            ],
        ),
    ];
    for (i, frame) in frames.iter().enumerate() {
        let r = f.ingress(frame);
        assert_eq!(r.action, XDP_PASS, "frame {i}");
        assert_eq!(&r.output, frame, "frame {i} changed");
    }
    assert_eq!(f.outcome(Outcome::PassNotVip), 6);
    assert_eq!(f.outcome(Outcome::PassNotIp), 1);
}

#[test]
fn truncated_and_garbage_packets_are_neither_aborted_nor_forwarded() {
    let f = Fixture::new(&standard());
    let syn = eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &tcp4(40000, 80, TCP_SYN));
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x43;
    let mut bad_version = syn.clone();
    bad_version[14] = 0x65;
    let mut long_total = syn.clone();
    long_total[16..18].copy_from_slice(&1500u16.to_be_bytes());
    let mut short_total = syn.clone();
    short_total[16..18].copy_from_slice(&24u16.to_be_bytes());
    let v6 = eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IPV6,
        &ipv6(CLIENT6, VIP6, PROTO_TCP, 0, 64, &tcp(1, 443, TCP_SYN, b"")),
    );
    let mut garbage = vec![0u8; 200];
    let mut x: u32 = 12345;
    for b in garbage.iter_mut() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    let cases: Vec<(&str, Vec<u8>, Option<u32>)> = vec![
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        ("ethernet only", syn[..14].to_vec(), None),
        ("ipv4 header cut", syn[..20].to_vec(), None),
        ("vip tcp ports only", syn[..38].to_vec(), Some(XDP_DROP)),
        ("vip tcp header cut", syn[..44].to_vec(), Some(XDP_DROP)),
        ("ihl below 5", bad_ihl, None),
        ("ipv4 version 6", bad_version, None),
        ("total length beyond frame", long_total, Some(XDP_DROP)),
        ("total length below tcp", short_total, Some(XDP_DROP)),
        ("ipv6 header cut", v6[..40].to_vec(), None),
        ("vip ipv6 tcp cut", v6[..60].to_vec(), Some(XDP_DROP)),
        ("random bytes", garbage.clone(), None),
        (
            "random bytes as ipv4",
            {
                let mut g = garbage.clone();
                g[12] = 8;
                g[13] = 0;
                g
            },
            None,
        ),
        (
            "random bytes as ipv6",
            {
                let mut g = garbage;
                g[12] = 0x86;
                g[13] = 0xdd;
                g
            },
            None,
        ),
    ];
    for (name, frame, want) in cases {
        let r = f.ingress(&frame);
        assert!(
            r.action == XDP_PASS || r.action == XDP_DROP,
            "{name}: action {}",
            r.action
        );
        if let Some(w) = want {
            assert_eq!(r.action, w, "{name}");
        }
        if r.action == XDP_PASS {
            assert_eq!(r.output, frame, "{name}: passed but changed");
        }
    }
    assert_eq!(f.outcome(Outcome::Forwarded), 0);
    assert_eq!(f.outcome(Outcome::DropMalformed), 5);
}

#[test]
fn vip_fragments_are_dropped_and_counted() {
    let f = Fixture::new(&standard());
    let first = ipv4_full(
        CLIENT4,
        VIP4,
        PROTO_UDP,
        V4Fields {
            id: 9,
            frag_off: 0x2000,
            ..V4Fields::default()
        },
        &udp(5000, 53, &[0u8; 32]),
    );
    let later = ipv4_full(
        CLIENT4,
        VIP4,
        PROTO_UDP,
        V4Fields {
            id: 9,
            frag_off: 5,
            ..V4Fields::default()
        },
        &[0u8; 32],
    );
    let elsewhere = ipv4_full(
        CLIENT4,
        Ipv4Addr::new(198, 18, 0, 99),
        PROTO_UDP,
        V4Fields {
            id: 9,
            frag_off: 5,
            ..V4Fields::default()
        },
        &[0u8; 32],
    );
    assert_eq!(
        f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &first)).action,
        XDP_DROP
    );
    assert_eq!(
        f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &later)).action,
        XDP_DROP
    );
    let frame = eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &elsewhere);
    let r = f.ingress(&frame);
    assert_eq!((r.action, r.output), (XDP_PASS, frame));
    assert_eq!(f.outcome(Outcome::DropFragment), 2);
}

#[test]
fn icmp_too_big_goes_to_the_flows_backend() {
    let f = Fixture::new(&standard());
    // IPv4: establish, then a router reports the backend's reply as too big.
    let key = key4(40000, 80, PROTO_TCP);
    f.ingress(&eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IPV4,
        &tcp4(40000, 80, TCP_SYN),
    ));
    let backend = maglev_pick(&f, &[(B4[0], 1), (B4[1], 1), (B4[2], 1)], &key);
    let reply = ipv4(
        VIP4,
        CLIENT4,
        PROTO_TCP,
        &tcp(80, 40000, TCP_ACK, &[0u8; 8]),
    );
    let router = Ipv4Addr::new(198, 18, 0, 254);
    let icmp = ipv4(router, VIP4, 1, &icmp_frag_needed(1400, &reply[..28]));
    let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &icmp));
    assert_eq!(r.action, XDP_TX);
    assert_eq!(
        r.output,
        expect_v4_encap(&icmp, &backend, flow_hash(&key), PROTO_IPIP)
    );

    // IPv6.
    let key6 = flow_key(IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), 40001, 443, PROTO_TCP);
    f.ingress(&eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IPV6,
        &ipv6(
            CLIENT6,
            VIP6,
            PROTO_TCP,
            0,
            64,
            &tcp(40001, 443, TCP_SYN, b""),
        ),
    ));
    let backend6 = maglev_pick(&f, &[(B6[0], 1), (B6[1], 1)], &key6);
    let reply6 = ipv6(
        VIP6,
        CLIENT6,
        PROTO_TCP,
        0,
        64,
        &tcp(443, 40001, TCP_ACK, b""),
    );
    let icmp6 = ipv6(
        "fd00::fe".parse().unwrap(),
        VIP6,
        58,
        0,
        64,
        &icmp6_too_big(1280, &reply6[..48]),
    );
    let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &icmp6));
    assert_eq!(r.action, XDP_TX);
    assert_eq!(
        r.output,
        expect_v6_encap(&icmp6, &backend6, flow_hash(&key6), PROTO_IPV6)
    );
    assert_eq!(f.outcome(Outcome::IcmpForwarded), 2);

    // An error about a flow to no VIP passes untouched.
    let stranger = ipv4(
        Ipv4Addr::new(198, 18, 0, 50),
        CLIENT4,
        PROTO_TCP,
        &tcp(80, 40000, TCP_ACK, b""),
    );
    let icmp = eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IPV4,
        &ipv4(
            router,
            Ipv4Addr::new(198, 18, 0, 50),
            1,
            &icmp_frag_needed(1400, &stranger[..28]),
        ),
    );
    let r = f.ingress(&icmp);
    assert_eq!((r.action, r.output), (XDP_PASS, icmp));
}

#[test]
fn backend_without_next_hop_drops_and_counts() {
    let mut f = Fixture::new(&standard());
    for b in B4 {
        f.balancer.set_next_hop(b.parse().unwrap(), None).unwrap();
    }
    let r = f.ingress(&eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IPV4,
        &tcp4(40000, 80, TCP_SYN),
    ));
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(f.outcome(Outcome::DropNoNextHop), 1);
}

#[test]
fn decap_restores_the_inner_packet_exactly() {
    let mut f = Fixture::new(&standard());
    let backend4 = "198.18.0.11";
    let backend6 = "fd00::11";
    f.add_decap_address(backend4.parse().unwrap());
    f.add_decap_address(backend6.parse().unwrap());
    assert_eq!(f.decap_addresses(), 2);

    let inner4 = tcp4(40000, 80, TCP_ACK);
    let inner6 = ipv6(
        CLIENT6,
        VIP6,
        PROTO_TCP,
        0,
        64,
        &tcp(40000, 443, TCP_ACK, b"payload"),
    );
    let cases = [
        (
            expect_v4_encap(&inner4, backend4, 77, PROTO_IPIP),
            inner4.clone(),
            ETH_IPV4,
        ),
        (
            expect_v6_encap(&inner6, backend6, 77, PROTO_IPV6),
            inner6.clone(),
            ETH_IPV6,
        ),
        (
            expect_v6_encap(&inner4, backend6, 77, PROTO_IPIP),
            inner4.clone(),
            ETH_IPV4,
        ),
        (
            expect_v4_encap(&inner6, backend4, 77, PROTO_IPV6),
            inner6.clone(),
            ETH_IPV6,
        ),
    ];
    for (i, (frame, inner, ether_type)) in cases.iter().enumerate() {
        let r = f.decap(frame);
        assert_eq!(r.action, XDP_PASS, "case {i}");
        assert_eq!(
            r.output,
            eth(NEXT_HOP_MAC, LB_MAC, *ether_type, inner),
            "case {i}"
        );
    }
    // The balancer's own output, decapsulated, is the client's packet again.
    let key = key4(40000, 80, PROTO_TCP);
    let backend = maglev_pick(&f, &[(B4[0], 1), (B4[1], 1), (B4[2], 1)], &key);
    f.add_decap_address(backend.parse().unwrap());
    let client_frame = eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &inner4);
    let encapsulated = f.ingress(&client_frame).output;
    let r = f.decap(&encapsulated);
    assert_eq!(r.output[14..], client_frame[14..]);

    // Not for this host, not encapsulated, or truncated inside: untouched or dropped.
    let other = expect_v4_encap(&inner4, "198.18.0.99", 77, PROTO_IPIP);
    assert_eq!(f.decap(&other).output, other);
    let plain = eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &inner4);
    assert_eq!(f.decap(&plain).output, plain);
    let mut cut = expect_v4_encap(&inner4, backend4, 77, PROTO_IPIP);
    cut.truncate(14 + 20 + 10);
    assert_eq!(f.decap(&cut).action, XDP_DROP);
    let counts = f.decap_outcomes();
    assert_eq!(counts[DecapOutcome::Decapsulated as usize].packets, 5);
    assert_eq!(counts[DecapOutcome::Passed as usize].packets, 2);
    assert_eq!(counts[DecapOutcome::DroppedMalformed as usize].packets, 1);
}

#[test]
fn tracers_count_exactly_what_passed() {
    let mut f = Fixture::new(&standard());
    let key = key4(40000, 80, PROTO_TCP);
    let frame = |flags: u8, payload: &[u8]| {
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV4,
            &ipv4(CLIENT4, VIP4, PROTO_TCP, &tcp(40000, 80, flags, payload)),
        )
    };
    let (syn, data, fin) = (
        frame(TCP_SYN, b""),
        frame(TCP_ACK, &[7u8; 100]),
        frame(TCP_FIN | TCP_ACK, b""),
    );
    for fr in [&syn, &data, &fin, &fin] {
        assert_eq!(f.ingress(fr).action, XDP_TX);
    }
    let state = f.flow(&key).unwrap();
    let sent = (syn.len() + data.len() + 2 * fin.len()) as u64;
    assert_eq!(state.packets_in, 4);
    assert_eq!(state.bytes_in, sent);
    assert_eq!(
        state.bytes_out,
        sent + 4 * 20,
        "IPv4 outer header on each packet"
    );
    assert_eq!(state.tcp_flags, TCP_SYN | TCP_ACK | TCP_FIN);
    assert_eq!(state.state, lb_common::FLOW_CLOSED_FIN);
    assert!(state.first_ns > 0 && state.last_ns >= state.first_ns);
    let vip_id = state.vip_id;
    let backend = state.backend_id;

    // A second flow closed by RST; a UDP flow never closes.
    let rst_key = key4(40001, 80, PROTO_TCP);
    for flags in [TCP_SYN, TCP_RST | TCP_ACK, TCP_RST] {
        f.ingress(&eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV4,
            &ipv4(CLIENT4, VIP4, PROTO_TCP, &tcp(40001, 80, flags, b"")),
        ));
    }
    f.ingress(&eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IPV4,
        &ipv4(CLIENT4, VIP4, PROTO_UDP, &udp(5000, 53, b"q")),
    ));
    assert_eq!(f.flow(&rst_key).unwrap().state, lb_common::FLOW_CLOSED_RST);
    assert_eq!(f.flow(&key4(5000, 53, PROTO_UDP)).unwrap().tcp_flags, 0);

    let vip = f.vip_counters(vip_id);
    assert_eq!(
        (vip.new_flows, vip.closed_fin, vip.closed_rst, vip.packets),
        (2, 1, 1, 7)
    );
    assert_eq!(vip.bytes_out, vip.bytes + 7 * 20);
    let rst_backend = f.flow(&rst_key).unwrap().backend_id;
    let b = f.backend_counters(backend);
    assert_eq!(b.closed_fin, 1);
    assert_eq!(f.backend_counters(rst_backend).closed_rst, 1);

    // Events: every flow is sampled by default; opens and first closes only.
    let events = f.events();
    let kinds: Vec<(u16, u32)> = events
        .iter()
        .map(|e| (u16::from_be(e.key.sport), e.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (40000, lb_common::EVENT_OPEN),
            (40000, lb_common::EVENT_CLOSE_FIN),
            (40001, lb_common::EVENT_OPEN),
            (40001, lb_common::EVENT_CLOSE_RST),
            (5000, lb_common::EVENT_OPEN),
        ]
    );
    assert_eq!(events[0].backend_id, backend);
    assert_eq!(f.balancer.datapath().event_stats().unwrap(), (5, 0));
}

#[test]
fn tracers_and_events_can_be_switched_off() {
    let mut f = Fixture::new(&format!(
        "[visibility]\ntrace_flows = false\nevent_sample = 0\n{}",
        standard()
    ));
    let key = key4(40000, 80, PROTO_TCP);
    for flags in [TCP_SYN, TCP_ACK, TCP_FIN] {
        assert_eq!(
            f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &tcp4(40000, 80, flags)))
                .action,
            XDP_TX
        );
    }
    let state = f.flow(&key).unwrap();
    assert_eq!(
        state.packets_in, 1,
        "the tracers count only the first packet"
    );
    // Times, flags and the close state are kept all the same: the agent
    // expires flows by them (a lone SYN would be half-open).
    assert!(state.first_ns > 0 && state.last_ns >= state.first_ns);
    assert_eq!(state.tcp_flags, TCP_SYN | TCP_ACK | TCP_FIN);
    assert_eq!(state.state, lb_common::FLOW_CLOSED_FIN);
    assert_eq!(
        f.vip_counters(state.vip_id).packets,
        3,
        "per-VIP counters stay on"
    );
    assert_eq!(f.vip_counters(state.vip_id).closed_fin, 0);
    assert!(f.events().is_empty());
}

#[test]
fn event_sampling_follows_the_flow_hash() {
    let mut f = Fixture::new(&format!("[visibility]\nevent_sample = 4\n{}", standard()));
    let mut expected = Vec::new();
    for sport in 41000..41040u16 {
        f.ingress(&eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV4,
            &tcp4(sport, 80, TCP_SYN),
        ));
        f.ingress(&eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV4,
            &tcp4(sport, 80, TCP_RST),
        ));
        if flow_hash(&key4(sport, 80, PROTO_TCP)).is_multiple_of(4) {
            expected.push((sport, lb_common::EVENT_OPEN));
            expected.push((sport, lb_common::EVENT_CLOSE_RST));
        }
    }
    let got: Vec<(u16, u32)> = f
        .events()
        .iter()
        .map(|e| (u16::from_be(e.key.sport), e.kind))
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(got, expected);
}

/// Overwrites the big-endian 16-bit field at `off`.
fn set_u16(mut frame: Vec<u8>, off: usize, value: u16) -> Vec<u8> {
    frame[off..off + 2].copy_from_slice(&value.to_be_bytes());
    frame
}

#[test]
fn ipv6_payload_length_beyond_the_frame_is_malformed() {
    let f = Fixture::new(&standard());
    let syn = |dst: Ipv6Addr| {
        eth(
            LB_MAC,
            CLIENT_MAC,
            ETH_IPV6,
            &ipv6(
                CLIENT6,
                dst,
                PROTO_TCP,
                0,
                64,
                &tcp(40000, 443, TCP_SYN, b""),
            ),
        )
    };
    // 65,496 and more used to wrap to a small total length once the 40-byte
    // header was added, so the check against the frame let them through.
    let lengths = [65495u16, 65496, 65500, 65515, 65535];
    for len in lengths {
        let r = f.ingress(&set_u16(syn(VIP6), 18, len));
        assert_eq!(r.action, XDP_DROP, "payload length {len}");
        let elsewhere = set_u16(syn("fd00::99".parse().unwrap()), 18, len);
        let r = f.ingress(&elsewhere);
        assert_eq!((r.action, r.output), (XDP_PASS, elsewhere), "{len}");
    }
    assert_eq!(f.outcome(Outcome::Forwarded), 0);
    assert_eq!(f.outcome(Outcome::DropMalformed), lengths.len() as u64);
}

const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);

/// The start of a backend's reply from the VIP (IPv4, port 80) and from VIP6
/// (port 443) to a client: what a router quotes in an ICMP error.
fn replies() -> (Vec<u8>, Vec<u8>) {
    let reply4 = ipv4(
        VIP4,
        CLIENT4,
        PROTO_TCP,
        &tcp(80, 40000, TCP_ACK, &[0u8; 8]),
    );
    let reply6 = ipv6(
        VIP6,
        CLIENT6,
        PROTO_TCP,
        0,
        64,
        &tcp(443, 40001, TCP_ACK, b""),
    );
    (reply4, reply6)
}

/// ICMP "fragmentation needed" from a router to `dst`, quoting `quote`.
fn frag_needed_to(dst: Ipv4Addr, fields: V4Fields, quote: &[u8]) -> Vec<u8> {
    let icmp = ipv4_full(ROUTER4, dst, 1, fields, &icmp_frag_needed(1400, quote));
    eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &icmp)
}

/// ICMPv6 "packet too big" from a router to `dst`, quoting `quote`.
fn too_big_to(dst: Ipv6Addr, quote: &[u8]) -> Vec<u8> {
    let icmp = ipv6(ROUTER6, dst, 58, 0, 64, &icmp6_too_big(1280, quote));
    eth(LB_MAC, CLIENT_MAC, ETH_IPV6, &icmp)
}

#[test]
fn icmp_errors_with_inconsistent_quotes_are_not_forwarded() {
    let f = Fixture::new(&standard());
    let (reply4, reply6) = replies();
    // Offsets in the frame: outer IPv4 total length 16, quoted IPv4 header 42
    // (its total length 44); outer IPv6 payload length 18, quoted IPv6 header
    // 62 (its payload length 66).
    let v4 = frag_needed_to(VIP4, V4Fields::default(), &reply4[..28]);
    let v6 = too_big_to(VIP6, &reply6[..48]);
    let mut padded4 = v4.clone();
    padded4.extend_from_slice(&[0u8; 16]);
    let mut padded6 = v6.clone();
    padded6.extend_from_slice(&[0u8; 16]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "v4 total length beyond the frame",
            set_u16(v4.clone(), 16, 1500),
        ),
        (
            "v4 total length ends inside the quoted ports",
            set_u16(padded4.clone(), 16, 20 + 8 + 20 + 2),
        ),
        (
            "v4 total length ends before the quoted transport header",
            set_u16(padded4, 16, 20 + 8 + 20),
        ),
        (
            "v4 quoted transport header shorter than 8 bytes",
            frag_needed_to(VIP4, V4Fields::default(), &reply4[..24]),
        ),
        (
            "v4 quoted total length below its header",
            set_u16(v4.clone(), 44, 19),
        ),
        ("v6 payload length wraps", set_u16(v6.clone(), 18, 65515)),
        (
            "v6 payload length beyond the frame",
            set_u16(v6.clone(), 18, 1000),
        ),
        (
            "v6 payload length ends inside the quoted ports",
            set_u16(padded6, 18, 8 + 40 + 2),
        ),
        (
            "v6 quoted transport header shorter than 8 bytes",
            too_big_to(VIP6, &reply6[..44]),
        ),
        (
            "v6 quoted payload length below a transport header",
            set_u16(v6.clone(), 66, 4),
        ),
        (
            "v4 quoting a reply from another VIP address",
            frag_needed_to(VIP4, V4Fields::default(), &{
                let vip2 = Ipv4Addr::new(198, 18, 10, 2);
                let reply = ipv4(vip2, CLIENT4, PROTO_TCP, &tcp(80, 40000, TCP_ACK, b""));
                reply[..28].to_vec()
            }),
        ),
    ];
    for (name, frame) in &cases {
        let r = f.ingress(frame);
        assert_eq!(r.action, XDP_DROP, "{name}");
    }
    assert_eq!(f.outcome(Outcome::IcmpForwarded), 0);
    assert_eq!(f.outcome(Outcome::DropMalformed), cases.len() as u64);
    // The same errors with consistent lengths are forwarded.
    assert_eq!(f.ingress(&v4).action, XDP_TX);
    assert_eq!(f.ingress(&v6).action, XDP_TX);
    assert_eq!(f.outcome(Outcome::IcmpForwarded), 2);
}

#[test]
fn icmp_errors_pass_unless_addressed_to_a_vip() {
    let f = Fixture::new(&standard());
    let (reply4, reply6) = replies();
    // Well-formed errors quoting a VIP flow, sent to addresses that are not
    // VIP addresses (a backend, another host): the balancer has no business
    // with them.
    let frames = [
        frag_needed_to(B4[0].parse().unwrap(), V4Fields::default(), &reply4[..28]),
        frag_needed_to(
            Ipv4Addr::new(198, 18, 0, 99),
            V4Fields::default(),
            &reply4[..28],
        ),
        too_big_to(B6[0].parse().unwrap(), &reply6[..48]),
    ];
    for (i, frame) in frames.iter().enumerate() {
        let r = f.ingress(frame);
        assert_eq!((r.action, &r.output), (XDP_PASS, frame), "frame {i}");
    }
    assert_eq!(f.outcome(Outcome::PassNotVip), frames.len() as u64);
    assert_eq!(f.outcome(Outcome::IcmpForwarded), 0);
}

#[test]
fn icmp_fragments_to_a_vip_are_dropped() {
    let f = Fixture::new(&standard());
    let (reply4, _) = replies();
    let first = V4Fields {
        frag_off: 0x2000,
        ..V4Fields::default()
    };
    let later = V4Fields {
        frag_off: 0x2000 | 3,
        ..V4Fields::default()
    };
    for fields in [first, later] {
        let r = f.ingress(&frag_needed_to(VIP4, fields, &reply4[..28]));
        assert_eq!(r.action, XDP_DROP, "frag_off {:#x}", fields.frag_off);
    }
    assert_eq!(f.outcome(Outcome::DropFragment), 2);
    assert_eq!(f.outcome(Outcome::IcmpForwarded), 0);
    let elsewhere = frag_needed_to(Ipv4Addr::new(198, 18, 0, 99), first, &reply4[..28]);
    let r = f.ingress(&elsewhere);
    assert_eq!((r.action, r.output), (XDP_PASS, elsewhere));
}

#[test]
fn syn_on_a_closed_flow_starts_a_new_flow() {
    let (three, skewed) = (THREE, SKEWED);
    let mut f = Fixture::new(&standard());
    let (sport, before) = moving_flow(&f);
    let key = key4(sport, 80, PROTO_TCP);
    let hash = flow_hash(&key);
    for flags in [TCP_SYN, TCP_ACK, TCP_FIN | TCP_ACK] {
        let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &tcp4(sport, 80, flags)));
        assert_eq!(r.action, XDP_TX);
    }
    f.apply(&standard().replacen(
        &vip("198.18.10.1", 80, "tcp", &three),
        &vip("198.18.10.1", 80, "tcp", &skewed),
        1,
    ));
    // The closed connection's last ACK still follows it.
    let ack = tcp4(sport, 80, TCP_ACK);
    let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &ack));
    assert_eq!(r.output, expect_v4_encap(&ack, &before, hash, PROTO_IPIP));
    let closed = f.flow(&key).unwrap();
    assert_eq!(
        (closed.state, closed.packets_in),
        (lb_common::FLOW_CLOSED_FIN, 4)
    );
    // The coarse clock ticks every few milliseconds.
    std::thread::sleep(std::time::Duration::from_millis(20));

    // The client reuses the 5-tuple: a new connection, balanced afresh.
    let syn = tcp4(sport, 80, TCP_SYN);
    let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &syn));
    let after = maglev_pick(&f, &skewed, &key);
    assert_eq!(r.action, XDP_TX);
    assert_eq!(r.output, expect_v4_encap(&syn, &after, hash, PROTO_IPIP));
    let fresh = f.flow(&key).unwrap();
    assert_eq!(fresh.backend_id, f.backend_id(&after));
    assert_eq!(
        (
            fresh.packets_in,
            fresh.bytes_in,
            fresh.tcp_flags,
            fresh.state
        ),
        (1, 14 + syn.len() as u64, TCP_SYN, 0)
    );
    assert!(fresh.first_ns > closed.last_ns, "age restarts");
    assert_eq!(fresh.last_ns, fresh.first_ns);
    assert_eq!(f.vip_counters(closed.vip_id).new_flows, 2);
    assert_eq!(f.backend_counters(f.backend_id(&before)).new_flows, 1);
    assert_eq!(f.backend_counters(f.backend_id(&after)).new_flows, 1);
    let events: Vec<(u32, u32)> = f.events().iter().map(|e| (e.kind, e.backend_id)).collect();
    assert_eq!(
        events,
        vec![
            (lb_common::EVENT_OPEN, f.backend_id(&before)),
            (lb_common::EVENT_CLOSE_FIN, f.backend_id(&before)),
            (lb_common::EVENT_OPEN, f.backend_id(&after)),
        ]
    );
    // The new connection's packets follow it, and its close counts again.
    let fin = tcp4(sport, 80, TCP_FIN | TCP_ACK);
    let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &fin));
    assert_eq!(r.output, expect_v4_encap(&fin, &after, hash, PROTO_IPIP));
    assert_eq!(f.vip_counters(closed.vip_id).closed_fin, 2);
}

// Packets too big for the backend's link once encapsulated (every link in
// these fixtures has MTU 1500 unless a test sets another).

const DF: u16 = 0x4000;
const VIP4_TO_6: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);
const WEB4: [(&str, u32); 3] = [(B4[0], 1), (B4[1], 1), (B4[2], 1)];
const WEB6: [(&str, u32); 2] = [(B6[0], 1), (B6[1], 1)];

/// An IP packet from `src` to `dst` (the same family) with DF set on IPv4.
fn ip_df(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_full(
            s,
            d,
            proto,
            V4Fields {
                frag_off: DF,
                ..V4Fields::default()
            },
            payload,
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, proto, 0, 64, payload),
        _ => panic!("mixed families"),
    }
}

/// A checksummed TCP segment from `src:sport` to `dst:dport` in an IP packet.
fn tcp_packet(
    (src, sport): (IpAddr, u16),
    (dst, dport): (IpAddr, u16),
    flags: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let segment = tcp_with_options(sport, dport, flags, options, payload);
    ip_df(
        src,
        dst,
        PROTO_TCP,
        &with_checksum(src, dst, PROTO_TCP, 16, &segment),
    )
}

fn ether(ip: &[u8]) -> Vec<u8> {
    let ether_type = if ip[0] >> 4 == 4 { ETH_IPV4 } else { ETH_IPV6 };
    eth(LB_MAC, CLIENT_MAC, ether_type, ip)
}

/// Where a test flow goes: (client, VIP, port, the VIP's backends).
type Path = (IpAddr, IpAddr, u16, &'static [(&'static str, u32)]);

const V4_IN_V4: Path = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), 80, &WEB4);
const V6_IN_V6: Path = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), 443, &WEB6);
const V4_IN_V6: Path = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4_TO_6), 80, &WEB6);

/// (case, path, link MTU, TCP flags, options before the MSS, MSS sent, MSS
/// expected at the backend, options after).
type MssCase = (
    &'static str,
    Path,
    u32,
    u8,
    &'static [u8],
    u16,
    u16,
    &'static [u8],
);

/// TCP options: `before`, an MSS option of `mss`, `after`.
fn with_mss(before: &[u8], mss: u16, after: &[u8]) -> Vec<u8> {
    let m = mss.to_be_bytes();
    [before, &[2, 4, m[0], m[1]], after].concat()
}

#[test]
fn syn_mss_is_clamped_to_what_fits_the_backend_link() {
    let mut f = Fixture::new(&standard());
    let ts: &[u8] = &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0];
    #[rustfmt::skip]
    let cases: [MssCase; 10] = [
        ("v4 in v4: 1500-20-20-20", V4_IN_V4, 1500, TCP_SYN, &[], 1460, 1440, &[1, 1, 4, 2]),
        ("v6 in v6: 1500-40-40-20", V6_IN_V6, 1500, TCP_SYN, &[], 1440, 1400, &[]),
        ("v4 in v6: 1500-40-20-20", V4_IN_V6, 1500, TCP_SYN, &[], 1460, 1420, &[]),
        ("after other options", V4_IN_V4, 1500, TCP_SYN, ts, 1460, 1440, &[]),
        ("at an odd offset", V4_IN_V4, 1500, TCP_SYN, &[1], 1460, 1440, &[1, 1, 0]),
        ("a smaller link", V4_IN_V4, 1400, TCP_SYN, &[], 1460, 1340, &[]),
        ("a larger link", V4_IN_V4, 9000, TCP_SYN, &[], 8960, 8940, &[]),
        ("small enough already", V4_IN_V4, 1500, TCP_SYN, &[], 536, 536, &[]),
        ("not a SYN", V4_IN_V4, 1500, TCP_ACK, &[], 1460, 1460, &[]),
        ("behind the end of options", V4_IN_V4, 1500, TCP_SYN, &[0; 4], 1460, 1460, &[]),
    ];
    let mut clamped = 0;
    for (i, (name, (client, vip, port, backends), mtu, flags, before, sent, expected, after)) in
        cases.into_iter().enumerate()
    {
        f.set_mtu(mtu);
        let sport = 42000 + i as u16;
        let (from, to) = ((client, sport), (vip, port));
        let input = tcp_packet(from, to, flags, &with_mss(before, sent, after), b"");
        let inner = tcp_packet(from, to, flags, &with_mss(before, expected, after), b"");
        let key = flow_key(client, vip, sport, port, PROTO_TCP);
        assert_balanced_as(&f, &input, &inner, &key, backends);
        clamped += u64::from(sent != expected);
        assert_eq!(f.mss_clamped(), clamped, "{name}");
    }
    f.set_mtu(1500);
    // Without an MSS option there is nothing to clamp.
    let (client, vip, port, backends) = V4_IN_V4;
    let plain = tcp_packet((client, 43000), (vip, port), TCP_SYN, &[1, 1, 4, 2], b"");
    assert_balanced(&f, &plain, &key4(43000, 80, PROTO_TCP), backends);
    // An MSS option first with a wrong length is left alone (the common
    // layout's direct path must judge it as the option walk does).
    let bad_len = tcp_packet(
        (client, 43003),
        (vip, port),
        TCP_SYN,
        &[2, 3, 0x05, 0xb4],
        b"",
    );
    assert_balanced(&f, &bad_len, &key4(43003, 80, PROTO_TCP), backends);
    assert_eq!(f.mss_clamped(), clamped);
    // Switched off, the MSS is left alone.
    f.apply_full("clamp_mss = false", &standard());
    let syn = tcp_packet(
        (client, 43002),
        (vip, port),
        TCP_SYN,
        &with_mss(&[], 1460, &[]),
        b"",
    );
    assert_balanced(&f, &syn, &key4(43002, 80, PROTO_TCP), backends);
    assert_eq!(f.mss_clamped(), clamped);
    f.apply(&standard());
    // A SYN that does not fit itself is clamped all the same (it is answered,
    // not forwarded, so only the counter shows it).
    let big = tcp_packet(
        (client, 43001),
        (vip, port),
        TCP_SYN,
        &with_mss(&[], 1460, &[]),
        &[0; 1460],
    );
    assert_eq!(f.ingress(&ether(&big)).action, XDP_TX);
    assert_eq!(f.mss_clamped(), clamped + 1);
}

/// The ICMP "fragmentation needed" the balancer should answer `ip` with
/// (RFC 1191 / RFC 1812: quoting up to 548 bytes), from the VIP.
fn expect_frag_needed(ip: &[u8], mtu: u16, quote: usize) -> Vec<u8> {
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let fields = V4Fields {
        id: 0,
        ..V4Fields::default()
    };
    let icmp = icmp_frag_needed(mtu, &ip[..quote]);
    eth(
        CLIENT_MAC,
        LB_MAC,
        ETH_IPV4,
        &ipv4_full(dst, src, 1, fields, &icmp),
    )
}

/// The ICMPv6 "packet too big" for `ip` (RFC 4443: quoting up to 1232 bytes).
fn expect_packet_too_big(ip: &[u8], mtu: u32, quote: usize) -> Vec<u8> {
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
    let icmp = with_checksum(
        dst.into(),
        src.into(),
        58,
        2,
        &icmp6_too_big(mtu, &ip[..quote]),
    );
    eth(
        CLIENT_MAC,
        LB_MAC,
        ETH_IPV6,
        &ipv6(dst, src, 58, 0, 64, &icmp),
    )
}

#[test]
fn oversize_packets_are_answered_with_icmp_and_those_that_fit_forwarded() {
    let mut f = Fixture::new(&standard());
    let (c4, c6) = (IpAddr::V4(CLIENT4), IpAddr::V6(CLIENT6));
    let (v4, v6, v4to6) = (IpAddr::V4(VIP4), IpAddr::V6(VIP6), IpAddr::V4(VIP4_TO_6));
    let data = |n: usize| vec![0x5a; n];
    // A full-size segment (1460 bytes of data) of an established flow.
    let seg4 = tcp_packet((c4, 40000), (v4, 80), TCP_ACK, &[], &data(1460));
    let r = f.ingress(&ether(&seg4));
    assert_eq!(r.action, XDP_TX);
    assert_eq!(r.output, expect_frag_needed(&seg4, 1480, 548));
    assert!(
        f.flow(&key4(40000, 80, PROTO_TCP)).is_none(),
        "not forwarded, so not a flow yet"
    );
    // To IPv6 backends the outer header is 40 bytes.
    let seg = tcp_packet((c4, 40001), (v4to6, 80), TCP_ACK, &[], &data(1460));
    assert_eq!(
        f.ingress(&ether(&seg)).output,
        expect_frag_needed(&seg, 1460, 548)
    );
    // UDP, one byte over.
    let dgram = ip_df(c4, v4, PROTO_UDP, &udp(5000, 53, &data(1453)));
    assert_eq!(dgram.len(), 1481);
    assert_eq!(
        f.ingress(&ether(&dgram)).output,
        expect_frag_needed(&dgram, 1480, 548)
    );
    // IPv6: packet too big, quoting 1232 bytes.
    let seg6 = tcp_packet((c6, 40002), (v6, 443), TCP_ACK, &[], &data(1440));
    let r = f.ingress(&ether(&seg6));
    assert_eq!(r.action, XDP_TX);
    assert_eq!(r.output, expect_packet_too_big(&seg6, 1460, 1232));
    assert_eq!(f.outcome(Outcome::IcmpTooBigSent), 4);

    // What fits exactly is forwarded unchanged.
    let fits4 = tcp_packet((c4, 40003), (v4, 80), TCP_ACK, &[], &data(1440));
    assert_eq!(fits4.len(), 1480);
    assert_balanced(&f, &fits4, &key4(40003, 80, PROTO_TCP), &WEB4);
    let fits6 = tcp_packet((c6, 40004), (v6, 443), TCP_ACK, &[], &data(1400));
    assert_eq!(fits6.len(), 1460);
    let key6 = flow_key(c6, v6, 40004, 443, PROTO_TCP);
    assert_balanced(&f, &fits6, &key6, &WEB6);
    assert_eq!(f.outcome(Outcome::Forwarded), 2);

    // Behind a small link the MTU follows it; a packet shorter than the
    // usual quote is quoted by its header and 8 bytes (RFC 792).
    f.set_mtu(576);
    let r = f.ingress(&ether(&fits4));
    assert_eq!(r.output, expect_frag_needed(&fits4, 556, 548));
    f.set_mtu(400);
    let short = tcp_packet((c4, 40003), (v4, 80), TCP_ACK, &[], &data(460));
    let r = f.ingress(&ether(&short));
    assert_eq!(r.output, expect_frag_needed(&short, 380, 68));
    f.set_mtu(1500);

    // IPv4 without DF: dropped (the balancer does not fragment).
    let no_df = ipv4(CLIENT4, VIP4, PROTO_UDP, &udp(5000, 53, &data(1460)));
    assert_eq!(f.ingress(&ether(&no_df)).action, XDP_DROP);
    // An ICMP error about a flow is never answered: too big, it is dropped.
    let reply = ipv4(
        VIP4,
        CLIENT4,
        PROTO_TCP,
        &tcp(80, 40003, TCP_ACK, &data(1440)),
    );
    let router = Ipv4Addr::new(198, 18, 0, 254);
    let error = ipv4(router, VIP4, 1, &icmp_frag_needed(1400, &reply[..1460]));
    assert_eq!(f.ingress(&ether(&error)).action, XDP_DROP);
    assert_eq!(f.outcome(Outcome::DropTooBig), 2);
    assert_eq!(f.outcome(Outcome::IcmpTooBigSent), 6);
    // Only the forwarded packets count for the VIP.
    let vip_id = f.flow(&key4(40003, 80, PROTO_TCP)).unwrap().vip_id;
    assert_eq!(f.vip_counters(vip_id).packets, 1);
}

/// Keeps the calling thread on CPU 0, so that every run uses the same
/// per-CPU token bucket.
fn pin_to_first_cpu() {
    // SAFETY: a zeroed cpu_set_t is valid; the calls change only this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn icmp_answers_are_rate_limited() {
    pin_to_first_cpu();
    let mut f = Fixture::new(&standard());
    f.apply_full("icmp_too_big_rate = 1\nicmp_too_big_burst = 3", &standard());
    let big = ip_df(
        IpAddr::V4(CLIENT4),
        IpAddr::V4(VIP4),
        PROTO_UDP,
        &udp(5000, 53, &[0; 1472]),
    );
    let actions: Vec<u32> = (0..5).map(|_| f.ingress(&ether(&big)).action).collect();
    assert_eq!(actions, [XDP_TX, XDP_TX, XDP_TX, XDP_DROP, XDP_DROP]);
    assert_eq!(f.outcome(Outcome::IcmpTooBigSent), 3);
    assert_eq!(f.outcome(Outcome::IcmpRateLimited), 2);
    // Rate 0: no answers at all.
    f.apply_full("icmp_too_big_rate = 0", &standard());
    assert_eq!(f.ingress(&ether(&big)).action, XDP_DROP);
    assert_eq!(f.outcome(Outcome::DropTooBig), 1);
    // The defaults (1000/s): the bucket refills within milliseconds.
    f.apply(&standard());
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(f.ingress(&ether(&big)).action, XDP_TX);
    assert_eq!(f.outcome(Outcome::IcmpTooBigSent), 4);
}

#[test]
fn the_verifier_work_stays_far_below_its_limit() {
    let f = Fixture::new(&standard());
    let prog: &aya::programs::Xdp = f.ebpf.program("lb_ingress").unwrap().try_into().unwrap();
    let verified = prog.info().unwrap().verified_instruction_count().unwrap();
    println!("lb_ingress: {verified} instructions verified");
    // The limit is 1,000,000; walking TCP options the wrong way costs most of it.
    assert!(verified < 200_000, "{verified} instructions verified");
}

#[test]
fn a_full_connection_table_forwards_new_flows_by_maglev_and_counts_them() {
    let sizes = MapSizes {
        flow_table_size: 8,
        ..SIZES
    };
    let mut f = Fixture::with_sizes(sizes, &standard());
    let syn = |sport| eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &tcp4(sport, 80, TCP_SYN));
    let ack = |sport| eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &tcp4(sport, 80, TCP_ACK));
    let backend_of = |out: &[u8]| [out[30], out[31], out[32], out[33]];
    let mut first = Vec::new();
    for sport in 40000..40008u16 {
        let run = f.ingress(&syn(sport));
        assert_eq!(run.action, XDP_TX);
        first.push(backend_of(&run.output));
    }
    assert_eq!(f.flows().len(), 8);
    let vip_id = f.flow(&key4(40000, 80, PROTO_TCP)).unwrap().vip_id;
    assert_eq!(f.vip_counters(vip_id).new_flows, 8);
    assert_eq!(f.balancer.datapath().flows_unrecorded().unwrap(), 0);

    // The table is full: a ninth flow is still forwarded, to its Maglev
    // backend, on every packet, without an entry, and counted per packet.
    let expected: Ipv4Addr = maglev_pick(&f, &THREE, &key4(41000, 80, PROTO_TCP))
        .parse()
        .unwrap();
    let expected = expected.octets();
    for frame in [syn(41000), ack(41000), ack(41000)] {
        let run = f.ingress(&frame);
        assert_eq!(run.action, XDP_TX);
        assert_eq!(backend_of(&run.output), expected);
    }
    assert!(f.flow(&key4(41000, 80, PROTO_TCP)).is_none());
    assert_eq!(f.flows().len(), 8, "nothing was evicted");
    assert_eq!(f.balancer.datapath().flows_unrecorded().unwrap(), 3);
    assert_eq!(
        f.vip_counters(vip_id).new_flows,
        8,
        "a flow counts as new once it is recorded"
    );
    assert_eq!(f.vip_counters(vip_id).packets, 11);
    // The recorded flows keep their backends.
    for (i, sport) in (40000..40008u16).enumerate() {
        assert_eq!(backend_of(&f.ingress(&ack(sport)).output), first[i]);
    }

    // Once the agent expires a flow there is room: the ninth flow's next
    // packet records it (from the next clock tick: a CPU whose insert found
    // the table full does not try again in the same tick).
    f.balancer
        .datapath_mut()
        .remove_flow(&key4(40000, 80, PROTO_TCP))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(backend_of(&f.ingress(&ack(41000)).output), expected);
    let state = f.flow(&key4(41000, 80, PROTO_TCP)).expect("recorded now");
    assert_eq!(state.packets_in, 1);
    assert_eq!(f.vip_counters(vip_id).new_flows, 9);
    assert_eq!(f.balancer.datapath().flows_unrecorded().unwrap(), 3);
}

#[test]
fn a_new_syn_on_a_closed_entry_replaces_it_in_a_full_table() {
    // One CPU, so that the failed insert below sets this CPU's "full" mark.
    // SAFETY: a zeroed cpu_set_t with one CPU set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    let sizes = MapSizes {
        flow_table_size: 4,
        ..SIZES
    };
    let f = Fixture::with_sizes(sizes, &standard());
    let frame = |sport, flags| eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &tcp4(sport, 80, flags));
    for sport in 40000..40004u16 {
        assert_eq!(f.ingress(&frame(sport, TCP_SYN)).action, XDP_TX);
    }
    // The first connection closes; its entry stays (closed) in the full table.
    f.ingress(&frame(40000, TCP_ACK | TCP_FIN));
    let key = key4(40000, 80, PROTO_TCP);
    assert_eq!(f.flow(&key).unwrap().state, lb_common::FLOW_CLOSED_FIN);
    // A new flow finds no room (and marks this CPU full for the tick) ...
    f.ingress(&frame(41000, TCP_SYN));
    assert!(f.flow(&key4(41000, 80, PROTO_TCP)).is_none());
    // ... yet a new connection reusing the closed one's 5-tuple replaces
    // its entry, so that its later packets follow the new choice.
    f.ingress(&frame(40000, TCP_SYN));
    let state = f.flow(&key).expect("the entry");
    assert_eq!(
        (state.state, state.packets_in, state.tcp_flags),
        (0, 1, TCP_SYN)
    );
    assert_eq!(f.flows().len(), 4);
}
