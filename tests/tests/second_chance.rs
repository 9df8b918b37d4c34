//! Datapath fixtures for the second chance (see `lb-ebpf/src/second_chance.rs`):
//! `lb_ingress` adds the previous table's backend to the outer header of a
//! flow it does not know, and `lb_decap` sends a packet no local socket owns
//! on to it. Expected frames are built from the RFCs (`lb_tests::packet`).
use std::net::{IpAddr, Ipv4Addr};

use lb_common::{
    flow_hash, DecapOutcome, FlowKey, PROTO_IPIP, PROTO_TCP, SECOND_CHANCE_LEN,
    SECOND_CHANCE_OPTION,
};
use lb_tests::{fixture::*, packet::*};
use lb_userspace::maglev;

const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B4: [&str; 4] = ["198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14"];

fn vip(backends: &[&str]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address = \"{a}\", weight = 1 }}"))
        .collect();
    format!(
        "[[vips]]\naddress=\"198.18.10.1\"\nport=80\nprotocol=\"tcp\"\nbackends=[{}]\n",
        list.join(", ")
    )
}

fn key(sport: u16) -> FlowKey {
    flow_key(IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), sport, 80, PROTO_TCP)
}

fn tcp4(sport: u16, flags: u8) -> Vec<u8> {
    ipv4(CLIENT4, VIP4, PROTO_TCP, &tcp(sport, 80, flags, b"data"))
}

/// The backend Maglev gives `key` among equal-weight `backends`.
fn pick(f: &Fixture, backends: &[&str], key: &FlowKey) -> String {
    let entries: Vec<maglev::Entry> = backends
        .iter()
        .map(|a| maglev::Entry {
            id: f.backend_id(a),
            identity: lb_common::addr_bytes(a.parse().unwrap()).0.to_vec(),
            weight: 1,
        })
        .collect();
    let m = ring_size(entries.len());
    let id = maglev::build(&entries, m)[(flow_hash(key) % m) as usize];
    backends
        .iter()
        .find(|a| f.backend_id(a) == id)
        .unwrap()
        .to_string()
}

fn outer_src(hash: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 200, (hash & 0xff) as u8)
}

/// The option: type, length, the second candidate's address, the MAC toward it.
fn option(second: &str) -> Vec<u8> {
    let mut o = vec![SECOND_CHANCE_OPTION, SECOND_CHANCE_LEN as u8];
    o.extend_from_slice(&second.parse::<Ipv4Addr>().unwrap().octets());
    o.extend_from_slice(&NEXT_HOP_MAC);
    o
}

/// What the balancer sends to `first` with `second` as the second chance.
fn with_second(inner: &[u8], first: &str, second: &str, hash: u32) -> Vec<u8> {
    let opt = option(second);
    let fields = V4Fields {
        id: 0,
        frag_off: 0x4000,
        options: &opt,
        ..V4Fields::default()
    };
    let outer = ipv4_full(
        outer_src(hash),
        first.parse().unwrap(),
        PROTO_IPIP,
        fields,
        inner,
    );
    eth(NEXT_HOP_MAC, LB_MAC, ETH_IPV4, &outer)
}

/// A flow of the first three backends' table whose slot moves once the
/// fourth joins: (client port, backend before, backend after).
fn moving_flow(f: &Fixture) -> (u16, String, String) {
    (40000..42000u16)
        .find_map(|p| {
            let before = pick(f, &B4[..3], &key(p));
            let after = pick(f, &B4, &key(p));
            (before != after).then_some((p, before, after))
        })
        .expect("a slot moves")
}

#[test]
fn an_unknown_flow_carries_the_previous_tables_backend() {
    let mut f = Fixture::new(&vip(&B4));
    // Ids for all four first, so `pick` can name them; then three, then four.
    f.apply(&vip(&B4[..3]));
    f.apply(&vip(&B4));
    let (sport, before, after) = moving_flow(&f);
    let k = key(sport);
    let hash = flow_hash(&k);

    // Mid-flow (ACK) with no connection-table entry: the live table's
    // backend first, the previous one second; the flow is not recorded.
    let ack = tcp4(sport, TCP_ACK);
    let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &ack));
    assert_eq!(r.action, XDP_TX);
    assert_eq!(r.output, with_second(&ack, &after, &before, hash));
    assert!(f.flow(&k).is_none(), "a doubtful flow is not recorded");
    let again = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &ack));
    assert_eq!(again.output, r.output, "every packet carries both");

    // A SYN starts a new connection: the live table alone, recorded.
    let syn_port = (sport + 1..sport + 3000)
        .find(|p| pick(&f, &B4[..3], &key(*p)) != pick(&f, &B4, &key(*p)))
        .unwrap();
    let syn = tcp4(syn_port, TCP_SYN);
    let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &syn));
    let first = pick(&f, &B4, &key(syn_port));
    let plain = encap_ipv4(
        outer_src(flow_hash(&key(syn_port))),
        first.parse().unwrap(),
        PROTO_IPIP,
        &syn,
    );
    assert_eq!(r.output, eth(NEXT_HOP_MAC, LB_MAC, ETH_IPV4, &plain));
    assert!(f.flow(&key(syn_port)).is_some());

    // A flow whose slot did not move needs no second chance.
    let still = (40000..42000u16)
        .find(|p| pick(&f, &B4[..3], &key(*p)) == pick(&f, &B4, &key(*p)))
        .unwrap();
    let ack = tcp4(still, TCP_ACK);
    let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &ack));
    assert_eq!(r.output[14] & 0x0f, 5, "no option");

    // Switched off ([datapath] second_chance = false): no option.
    f.apply_full("second_chance = false", &vip(&B4));
    let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &tcp4(sport, TCP_ACK)));
    assert_eq!(r.output[14] & 0x0f, 5, "switched off");
    f.apply_full("second_chance = true", &vip(&B4));

    // A full-size packet that would not fit the link with the option goes
    // without it.
    f.set_mtu((ack.len() + 20 + SECOND_CHANCE_LEN - 1) as u32);
    let r = f.ingress(&eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &tcp4(sport, TCP_ACK)));
    assert_eq!(r.action, XDP_TX);
    assert_eq!(r.output[14] & 0x0f, 5, "no room for the option");
}

#[test]
fn decap_sends_what_no_socket_owns_to_the_second_candidate() {
    let mut f = Fixture::new(&vip(&B4));
    let (first, second) = (B4[3], B4[1]);
    f.add_decap_address(first.parse().unwrap());
    let hash = 77;

    // No socket here owns the flow: on to the second candidate, the option
    // gone, TTL lowered, to the MAC the balancer gave, from this host's MAC.
    let ack = tcp4(40000, TCP_ACK);
    let r = f.decap(&with_second(&ack, first, second, hash));
    assert_eq!(r.action, XDP_TX);
    let fields = V4Fields {
        id: 0,
        frag_off: 0x4000,
        ttl: 63,
        ..V4Fields::default()
    };
    let on = ipv4_full(
        outer_src(hash),
        second.parse().unwrap(),
        PROTO_IPIP,
        fields,
        &ack,
    );
    assert_eq!(r.output, eth(NEXT_HOP_MAC, NEXT_HOP_MAC, ETH_IPV4, &on));
    // The second candidate decapsulates it like any packet.
    f.add_decap_address(second.parse().unwrap());
    let there = f.decap(&r.output);
    assert_eq!(there.action, XDP_PASS);
    assert_eq!(there.output[14..], ack[..]);

    // A SYN is a new connection: kept here.
    let syn = tcp4(40001, TCP_SYN);
    let r = f.decap(&with_second(&syn, first, second, hash));
    assert_eq!((r.action, r.output[14..].to_vec()), (XDP_PASS, syn));

    // A malformed option is ignored: decapsulated as usual, never forwarded.
    let mut bad_len = with_second(&ack, first, second, hash);
    bad_len[14 + 21] = 11;
    let mut bad_kind = with_second(&ack, first, second, hash);
    bad_kind[14 + 20] = 0x94;
    for frame in [bad_len, bad_kind] {
        let r = f.decap(&frame);
        assert_eq!((r.action, r.output[14..].to_vec()), (XDP_PASS, ack.clone()));
    }
    // Truncated inside: dropped, as without the option.
    let mut cut = with_second(&ack, first, second, hash);
    cut.truncate(14 + 32 + 12);
    assert_eq!(f.decap(&cut).action, XDP_DROP);
    // A TTL that would run out: dropped, not forwarded.
    let mut dying = with_second(&ack, first, second, hash);
    dying[14 + 8] = 1;
    let c = checksum(&{
        let mut h = dying[14..46].to_vec();
        h[10] = 0;
        h[11] = 0;
        h
    });
    dying[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(f.decap(&dying).action, XDP_DROP);

    let counts = f.decap_outcomes();
    assert_eq!(counts[DecapOutcome::SecondChance as usize].packets, 1);
    assert_eq!(counts[DecapOutcome::Decapsulated as usize].packets, 4);
    assert_eq!(counts[DecapOutcome::DroppedMalformed as usize].packets, 2);
}
