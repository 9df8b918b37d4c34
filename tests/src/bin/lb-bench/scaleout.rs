//! `lb-bench scaleout`: what several LB nodes cost and how fast they converge.
//!
//! - The second chance's cost per packet, through the shim against the floor
//!   program: `lb_decap` on a plain IPIP packet, on one with the option that
//!   a local socket owns (a real loopback connection, so the socket lookup
//!   hits), on a SYN with the option, and on one it sends on; `lb_ingress`
//!   on an unknown flow that gets a second candidate against an established
//!   one.
//! - Convergence: the router's withdrawal of a node whose link went (only the
//!   BGP hold timer tells, 3 s here), of a drained node, and the time until a
//!   new node is in the router's multipath route, in the scale-out topology.
use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    time::Duration,
};

use lb_common::{DecapOutcome, PROTO_IPIP, PROTO_TCP, SECOND_CHANCE_LEN, SECOND_CHANCE_OPTION};
use lb_tests::{
    fixture::*,
    packet::*,
    scaleout::{backend_address, Ecmp},
    topology::VIP_V4,
};
use serde_json::json;

use super::{median, pad, Report, Shim, REPEAT, ROUNDS};

pub fn run(report: &mut Report) {
    second_chance_cost(report);
    convergence(report);
}

/// An IPIP frame to 198.18.0.11 around `inner`, with the second-chance
/// option naming 198.18.0.12 when `option`.
fn tunnelled(inner: &[u8], option: bool) -> Vec<u8> {
    let mut opt = vec![
        SECOND_CHANCE_OPTION,
        SECOND_CHANCE_LEN as u8,
        198,
        18,
        0,
        12,
    ];
    opt.extend_from_slice(&NEXT_HOP_MAC);
    let fields = V4Fields {
        id: 0,
        frag_off: 0x4000,
        options: if option { &opt } else { &[] },
        ..V4Fields::default()
    };
    let outer = ipv4_full(
        Ipv4Addr::new(198, 18, 200, 7),
        Ipv4Addr::new(198, 18, 0, 11),
        PROTO_IPIP,
        fields,
        inner,
    );
    eth(NEXT_HOP_MAC, LB_MAC, ETH_IPV4, &outer)
}

fn second_chance_cost(report: &mut Report) {
    println!("== second chance, cost per packet ({REPEAT} runs per round, median of {ROUNDS})");
    // A connection on this namespace's loopback: the "owned" case's inner
    // packet is one of its segments, so the socket lookup finds it.
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let server = listener.local_addr().expect("address");
    let client = TcpStream::connect(server).expect("loopback connection");
    let (_accepted, _) = listener.accept().expect("accept");
    let client_port = client.local_addr().expect("address").port();
    let lo = Ipv4Addr::LOCALHOST;
    let owned_inner = ipv4(
        lo,
        lo,
        PROTO_TCP,
        &tcp(client_port, server.port(), TCP_ACK, b""),
    );
    let vip = Ipv4Addr::new(198, 18, 10, 1);
    let client4 = Ipv4Addr::new(198, 18, 50, 1);
    let ack = ipv4(client4, vip, PROTO_TCP, &tcp(40000, 80, TCP_ACK, b""));
    let syn = ipv4(client4, vip, PROTO_TCP, &tcp(40000, 80, TCP_SYN, b""));

    let backends = |n: usize| -> String {
        let list: Vec<String> = (0..n)
            .map(|i| format!("{{ address = \"198.18.0.{}\" }}", 11 + i))
            .collect();
        format!(
            "[[vips]]\naddress=\"{vip}\"\nport=80\nprotocol=\"tcp\"\nbackends=[{}]\n",
            list.join(", ")
        )
    };
    let mut f = Fixture::with_sizes(super::bench_sizes(1_000_000), &backends(9));
    f.apply(&backends(10));
    f.add_decap_address("198.18.0.11".parse().unwrap());
    // An unknown flow whose slot moved from 9 to 10 backends: every packet
    // takes the miss path and gets a second candidate.
    let moved_port = (40000..50000u16)
        .find(|p| {
            let frame = eth(
                LB_MAC,
                CLIENT_MAC,
                ETH_IPV4,
                &ipv4(client4, vip, PROTO_TCP, &tcp(*p, 80, TCP_ACK, b"")),
            );
            f.ingress(&frame).output.get(14) == Some(&0x48)
        })
        .expect("a moved slot");
    let moved = eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IPV4,
        &ipv4(client4, vip, PROTO_TCP, &tcp(moved_port, 80, TCP_ACK, b"")),
    );
    let still_port = (40000..50000u16)
        .find(|p| {
            let frame = eth(
                LB_MAC,
                CLIENT_MAC,
                ETH_IPV4,
                &ipv4(client4, vip, PROTO_TCP, &tcp(*p, 80, TCP_ACK, b"")),
            );
            f.ingress(&frame).output.get(14) == Some(&0x45)
        })
        .expect("a slot that stayed");
    let established = eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IPV4,
        &ipv4(client4, vip, PROTO_TCP, &tcp(still_port, 80, TCP_ACK, b"")),
    );

    let cases: [(&str, &str, &str, Vec<u8>, u32); 6] = [
        (
            "decap_plain",
            "lb_decap, IPIP without the option",
            "lb_decap",
            tunnelled(&ack, false),
            XDP_PASS,
        ),
        (
            "decap_owned",
            "lb_decap, option, a local socket owns it",
            "lb_decap",
            tunnelled(&owned_inner, true),
            XDP_PASS,
        ),
        (
            "decap_syn",
            "lb_decap, option, SYN (kept)",
            "lb_decap",
            tunnelled(&syn, true),
            XDP_PASS,
        ),
        (
            "decap_sent_on",
            "lb_decap, option, no socket: sent on",
            "lb_decap",
            tunnelled(&ack, true),
            XDP_TX,
        ),
        (
            "ingress_established",
            "lb_ingress, established flow",
            "lb_ingress",
            established,
            XDP_TX,
        ),
        (
            "ingress_second",
            "lb_ingress, unknown flow with a second candidate",
            "lb_ingress",
            moved,
            XDP_TX,
        ),
    ];
    let mut shim = Shim::load();
    let floor_frame = pad(tunnelled(&ack, false));
    let mut ratios = std::collections::BTreeMap::new();
    for (key, name, program, frame, verdict) in cases {
        let data = pad(frame);
        shim.target(Some((&f.ebpf, program)));
        shim.frame(data, None);
        shim.run(&data, 1000);
        let sent_on_before = f.decap_outcomes()[DecapOutcome::SecondChance as usize].packets;
        let (mut samples, mut per_round) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            shim.target(None);
            shim.frame(floor_frame, None);
            let (floor_ns, v) = shim.run(&floor_frame, REPEAT);
            assert_eq!(v, XDP_TX, "floor");
            shim.target(Some((&f.ebpf, program)));
            shim.frame(data, None);
            let (t, v) = shim.run(&data, REPEAT);
            assert_eq!(v, verdict, "{name}: unexpected verdict");
            samples.push(t);
            per_round.push(t / floor_ns);
        }
        if key == "decap_sent_on" {
            let sent_on = f.decap_outcomes()[DecapOutcome::SecondChance as usize].packets;
            assert_eq!(sent_on - sent_on_before, u64::from(REPEAT) * ROUNDS as u64);
        }
        let (ns, ratio) = (median(samples), median(per_round));
        report.row(
            "scaleout",
            name,
            format!("{ns:.1} ns"),
            format!("{ratio:.2}× floor"),
            "",
            None,
        );
        report.json.insert(format!("scaleout.{key}.ns"), json!(ns));
        report
            .json
            .insert(format!("scaleout.{key}.ratio_to_floor"), json!(ratio));
        ratios.insert(key, ratio);
    }
    for (with, what) in [
        (
            "decap_owned",
            "second chance on the backend: a packet it owns",
        ),
        (
            "decap_sent_on",
            "second chance on the backend: a packet sent on",
        ),
    ] {
        let delta = ratios[with] - ratios["decap_plain"];
        report.row(
            "scaleout",
            what,
            format!("{delta:+.2}× floor"),
            "against lb_decap without the option",
            "",
            None,
        );
        report
            .json
            .insert(format!("scaleout.{with}.cost_ratio"), json!(delta));
    }
}

fn convergence(report: &mut Report) {
    println!("== convergence (router with BIRD, BGP hold time 3 s)");
    let mut t = Ecmp::new(3);
    let list: Vec<String> = (0..3)
        .map(|i| format!("{{ address = \"{}\" }}", backend_address(i)))
        .collect();
    t.set_vips(&format!(
        "[[vips]]\nname = \"web\"\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\nbackends = [{}]\n",
        list.join(", ")
    ));
    t.start_router(4);
    let mut joins = Vec::new();
    for i in 0..4 {
        t.add_node(i);
        let up: Vec<usize> = (0..=i).collect();
        joins.push(
            t.wait_next_hops(VIP_V4, &up, Duration::from_secs(30))
                .as_secs_f64(),
        );
    }
    // Drain and undrain node 0, three times.
    let mut drains = Vec::new();
    for _ in 0..3 {
        t.lbctl(0, &["node", "drain"]);
        drains.push(
            t.wait_next_hops(VIP_V4, &[1, 2, 3], Duration::from_secs(10))
                .as_secs_f64(),
        );
        t.lbctl(0, &["node", "undrain"]);
        t.wait_next_hops(VIP_V4, &[0, 1, 2, 3], Duration::from_secs(10));
    }
    // Lose nodes 3, 2, 1 in turn.
    let mut losses = Vec::new();
    for lost in [3usize, 2, 1] {
        let at = t.kill_node(lost);
        let left: Vec<usize> = (0..lost).collect();
        t.wait_next_hops(VIP_V4, &left, Duration::from_secs(15));
        losses.push(at.elapsed().as_secs_f64());
    }
    let ms = |v: &[f64]| -> String {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        format!(
            "{:.0} ms (max {:.0})",
            1e3 * median(s.clone()),
            1e3 * s[s.len() - 1]
        )
    };
    for (key, name, v) in [
        (
            "node_lost",
            "a node's link lost until the router withdraws it",
            &losses,
        ),
        (
            "node_drained",
            "lbctl node drain until the router withdraws it",
            &drains,
        ),
        (
            "node_joined",
            "a node's agent up until the router routes to it",
            &joins,
        ),
    ] {
        report.row(
            "scaleout",
            name,
            ms(v),
            format!("{} samples", v.len()),
            "",
            None,
        );
        report
            .json
            .insert(format!("scaleout.{key}.seconds"), json!(v));
    }
}
