//! Bypass at the source intermediary, through the real `lb_source` (and
//! `lb_ingress` behind it) with
//! BPF_PROG_TEST_RUN: packets of a bypass VIP's flows are passed toward the
//! LB and recorded until an accepted instruction sends the flow straight to
//! its backend; refused instructions change nothing; an entry ends with its
//! flow (FIN/RST) or when its backend leaves the VIP; a bypassed flow sends
//! a packet toward the LB now and then, which keeps its entry there.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use lb_common::{
    BYPASS_ENDED, BYPASS_PASSED, BYPASS_REFRESHED, BYPASS_REFRESH_NS, BYPASS_SENT_DIRECT,
    PROTO_IPIP, PROTO_TCP,
};
use lb_tests::{fixture::*, packet::*};
use lb_userspace::{
    bypass::{
        intermediary::{flow_key as bypass_key, BalancerTables, Intermediary},
        Flow, Instruction, KeyRing, Kind, Sealer, Verifier, DEFAULT_MAX_NONCES, DEFAULT_WINDOW_MS,
    },
    config::Protocol,
    datapath::BypassMaps,
};

const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 2);
const B4: [&str; 3] = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
const KEY_A: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const KEY_B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
const NOW: u64 = 1_800_000_000_000;

fn vips() -> String {
    let backends: Vec<String> = B4
        .iter()
        .map(|a| format!("{{ address = \"{a}\", weight = 1 }}"))
        .collect();
    format!(
        "[[vips]]\nname=\"web\"\naddress=\"198.18.10.1\"\nport=80\nprotocol=\"tcp\"\nbypass={{ after_packets = 2 }}\nbackends=[{b}]\n\
         [[vips]]\nname=\"plain\"\naddress=\"198.18.10.1\"\nport=81\nprotocol=\"tcp\"\nbackends=[{b}]\n",
        b = backends.join(", ")
    )
}

struct Bypass {
    f: Fixture,
    maps: BypassMaps,
    intermediary: Intermediary,
    ring: KeyRing,
}

fn ring(id: u16, secret: &str) -> KeyRing {
    KeyRing::parse(&format!("[[keys]]\nid = {id}\nsecret = \"{secret}\"\n")).unwrap()
}

impl Bypass {
    fn new() -> Bypass {
        let mut f = Fixture::new(&vips());
        // The key file is read by the agent, not here.
        f.apply_full(
            "bypass_source = true\n[bypass]\nkey_file = \"/etc/lb/bypass-keys.toml\"\nlisten = \"127.0.0.1:7470\"",
            &vips(),
        );
        f.load_source();
        let maps = BypassMaps::new(&mut f.ebpf).expect("bypass maps");
        let verifier = Verifier::new(ring(1, KEY_A), DEFAULT_WINDOW_MS, DEFAULT_MAX_NONCES);
        Bypass {
            f,
            maps,
            intermediary: Intermediary::new(verifier),
            ring: ring(1, KEY_A),
        }
    }

    fn receive(&mut self, datagram: &[u8], now: u64) -> Result<Instruction, String> {
        let mut tables = BalancerTables {
            balancer: &self.f.balancer,
            maps: &mut self.maps,
        };
        self.intermediary
            .receive(datagram, now, &mut tables)
            .map_err(|r| r.reason().to_string())
    }

    fn stat(&self, i: u32) -> u64 {
        self.maps.stats().expect("stats")[i as usize]
    }
}

fn frame(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let ip = ipv4(CLIENT4, VIP4, PROTO_TCP, &tcp(sport, dport, flags, b"data"));
    eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &ip)
}

fn flow(sport: u16) -> Flow {
    Flow {
        protocol: PROTO_TCP,
        client: SocketAddr::new(IpAddr::V4(CLIENT4), sport),
        vip: SocketAddr::new(IpAddr::V4(VIP4), 80),
    }
}

fn bypass(sport: u16, backend: &str) -> Instruction {
    Instruction {
        kind: Kind::Bypass,
        flow: flow(sport),
        backend: backend.parse().unwrap(),
    }
}

/// Asserts the frame left encapsulated (IPIP) to `backend`, unchanged inside.
fn assert_direct(run: &Run, input: &[u8], backend: &str) {
    assert_eq!(run.action, XDP_TX, "sent straight to the backend");
    let out = &run.output;
    assert_eq!(&out[0..6], &NEXT_HOP_MAC);
    assert_eq!(out[14 + 9], PROTO_IPIP);
    let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    assert_eq!(dst.to_string(), backend);
    assert_eq!(&out[34..], &input[14..], "the inner packet is untouched");
}

#[test]
fn flows_go_to_the_lb_until_an_instruction_sends_them_to_the_backend() {
    let mut t = Bypass::new();
    let syn = frame(40000, 80, TCP_SYN);
    let run = t.f.source(&syn);
    assert_eq!(run.action, XDP_PASS, "toward the LB through the stack");
    assert_eq!(run.output, syn, "unchanged");
    let key = bypass_key(&flow(40000));
    assert!(t.maps.was_sent(&key).unwrap(), "recorded as sent");
    assert!(t.f.flow(&key).is_none(), "not balanced here");
    assert_eq!(t.stat(BYPASS_PASSED), 1);

    let sealed = Sealer::new(&t.ring).seal(bypass(40000, B4[1]), NOW);
    let accepted = t.receive(&sealed, NOW).expect("accepted");
    assert_eq!(accepted.backend.to_string(), B4[1]);
    let ack = frame(40000, 80, TCP_ACK);
    assert_direct(&t.f.source(&ack), &ack, B4[1]);
    assert_direct(&t.f.source(&ack), &ack, B4[1]);
    let entries = t.maps.entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1.packets, 2);
    assert_eq!(entries[0].1.bytes, 2 * ack.len() as u64);
    assert_eq!(t.stat(BYPASS_SENT_DIRECT), 2);
    assert_eq!(t.intermediary.accepted(), 1);

    // A VIP without a bypass policy is balanced as before.
    let plain = frame(40000, 81, TCP_SYN);
    assert_eq!(t.f.source(&plain).action, XDP_TX);
    assert!(t
        .f
        .flow(&lb_tests::fixture::flow_key(
            IpAddr::V4(CLIENT4),
            IpAddr::V4(VIP4),
            40000,
            81,
            PROTO_TCP
        ))
        .is_some());
}

#[test]
fn refused_instructions_are_counted_and_change_nothing() {
    let mut t = Bypass::new();
    t.f.source(&frame(40001, 80, TCP_SYN));
    let good = Sealer::new(&t.ring).seal(bypass(40001, B4[0]), NOW);
    t.receive(&good, NOW).expect("accepted");
    let before = t.maps.entries().unwrap();

    let other_secret = ring(1, KEY_B);
    let unknown_id = ring(9, KEY_A);
    let mut flipped = Sealer::new(&t.ring).seal(bypass(40001, B4[2]), NOW);
    flipped[80] ^= 1; // the backend's last byte, after sealing
    let cases: Vec<(&str, Vec<u8>, u64)> = vec![
        (
            "bad_tag",
            Sealer::new(&other_secret)
                .seal(bypass(40001, B4[2]), NOW)
                .to_vec(),
            NOW,
        ),
        ("bad_tag", flipped.to_vec(), NOW),
        (
            "unknown_key",
            Sealer::new(&unknown_id)
                .seal(bypass(40001, B4[2]), NOW)
                .to_vec(),
            NOW,
        ),
        ("replayed", good.to_vec(), NOW + 1),
        (
            "stale",
            Sealer::new(&t.ring)
                .seal(bypass(40001, B4[2]), NOW - 60_000)
                .to_vec(),
            NOW,
        ),
        (
            "unknown_flow",
            Sealer::new(&t.ring)
                .seal(bypass(40099, B4[2]), NOW)
                .to_vec(),
            NOW,
        ),
        (
            "wrong_backend",
            Sealer::new(&t.ring)
                .seal(bypass(40001, "198.18.0.99"), NOW)
                .to_vec(),
            NOW,
        ),
        ("malformed", good[..100].to_vec(), NOW),
    ];
    for (reason, datagram, now) in &cases {
        assert_eq!(t.receive(datagram, *now).unwrap_err(), *reason);
        assert_eq!(
            t.maps.entries().unwrap(),
            before,
            "{reason} changed nothing"
        );
    }
    let refused = t.intermediary.refused();
    for (reason, count) in [
        ("bad_tag", 2),
        ("unknown_key", 1),
        ("replayed", 1),
        ("stale", 1),
        ("unknown_flow", 1),
        ("wrong_backend", 1),
        ("malformed", 1),
    ] {
        assert_eq!(refused.get(reason).copied(), Some(count), "{reason}");
    }
    let ack = frame(40001, 80, TCP_ACK);
    assert_direct(&t.f.source(&ack), &ack, B4[0]);

    // A backend that is down is not in the VIP's current set.
    t.f.source(&frame(40002, 80, TCP_SYN));
    let vip = (IpAddr::V4(VIP4), 80, Protocol::Tcp);
    t.f.balancer
        .set_health(vip, B4[2].parse().unwrap(), false)
        .unwrap();
    let down = Sealer::new(&t.ring).seal(bypass(40002, B4[2]), NOW + 2);
    assert_eq!(t.receive(&down, NOW + 2).unwrap_err(), "wrong_backend");
}

#[test]
fn entries_end_with_the_flow_or_when_the_backend_leaves() {
    let mut t = Bypass::new();
    for (sport, backend) in [(40010, B4[0]), (40011, B4[1])] {
        t.f.source(&frame(sport, 80, TCP_SYN));
        let sealed = Sealer::new(&t.ring).seal(bypass(sport, backend), NOW + sport as u64);
        t.receive(&sealed, NOW + sport as u64).expect("accepted");
    }
    // The client's FIN ends the entry and takes the LB path (whose table
    // sees the flow close), as does what follows.
    let fin = frame(40010, 80, TCP_FIN | TCP_ACK);
    assert_eq!(t.f.source(&fin).action, XDP_PASS);
    assert_eq!(t.f.source(&fin).output, fin, "unchanged");
    let ack = frame(40010, 80, TCP_ACK);
    assert_eq!(t.f.source(&ack).action, XDP_PASS);
    assert_eq!(t.stat(BYPASS_ENDED), 1);

    // The backend goes down: the next packet ends the entry and takes the
    // LB path (the agent also removes such entries itself).
    let ack = frame(40011, 80, TCP_ACK);
    assert_direct(&t.f.source(&ack), &ack, B4[1]);
    let vip = (IpAddr::V4(VIP4), 80, Protocol::Tcp);
    t.f.balancer
        .set_health(vip, B4[1].parse().unwrap(), false)
        .unwrap();
    assert_eq!(t.f.source(&ack).action, XDP_PASS);
    assert!(t.maps.entries().unwrap().is_empty());
    assert_eq!(t.stat(BYPASS_ENDED), 2);

    // An authenticated revoke for a flow the host sent removes its entry.
    t.f.source(&frame(40012, 80, TCP_SYN));
    let sealed = Sealer::new(&t.ring).seal(bypass(40012, B4[0]), NOW + 100);
    t.receive(&sealed, NOW + 100).expect("accepted");
    let mut revoke = bypass(40012, B4[0]);
    revoke.kind = Kind::Revoke;
    let sealed = Sealer::new(&t.ring).seal(revoke, NOW + 101);
    t.receive(&sealed, NOW + 101).expect("revoke accepted");
    assert!(t.maps.entries().unwrap().is_empty());
    assert_eq!(t.intermediary.revoked(), 1);
}

#[test]
fn a_bypassed_flow_refreshes_its_entry_at_the_lb() {
    let mut t = Bypass::new();
    t.f.source(&frame(40020, 80, TCP_SYN));
    let sealed = Sealer::new(&t.ring).seal(bypass(40020, B4[2]), NOW);
    t.receive(&sealed, NOW).expect("accepted");
    let ack = frame(40020, 80, TCP_ACK);
    assert_direct(&t.f.source(&ack), &ack, B4[2]);
    // Once the last packet toward the LB is older than the refresh time,
    // one packet takes the LB path (unchanged); the next goes straight on.
    std::thread::sleep(std::time::Duration::from_nanos(
        BYPASS_REFRESH_NS + 200_000_000,
    ));
    let run = t.f.source(&ack);
    assert_eq!(run.action, XDP_PASS, "a refresh toward the LB");
    assert_eq!(run.output, ack, "unchanged");
    assert_direct(&t.f.source(&ack), &ack, B4[2]);
    assert_eq!(t.stat(BYPASS_REFRESHED), 1);
    let entries = t.maps.entries().unwrap();
    assert_eq!((entries[0].1.packets, entries[0].1.lb_packets), (2, 1));
}
