//! End to end: several LB nodes behind an ECMP router, each announcing the
//! VIPs it can serve through its own BIRD (see `lb_tests::scaleout`), all
//! taking the same VIP document from etcd. Client flows spread over every
//! node; the nodes' Maglev tables have one digest; a node lost with its
//! link, a node added, a drained node, a node without usable backends and a
//! stopped agent each move flows between nodes with no connection broken.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_tests::{
    scaleout::{backend_address, lb_address, probe, Connection, Ecmp},
    topology::VIP_V4,
};
use serde_json::Value;

fn vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.parse().unwrap(), 80)
}

/// The fleet's VIP document: `web` (TCP 80 on VIP_V4) over `backends`.
fn vip_doc(backends: &[usize]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|i| format!("{{ address = \"{}\", weight = 100 }}", backend_address(*i)))
        .collect();
    format!(
        "[[vips]]\nname = \"web\"\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\nbackends = [{}]\n",
        list.join(", ")
    )
}

fn web(status: &Value) -> Option<&Value> {
    status["vips"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == "web")
}

/// Waits until LB node `node` serves `web` with `backends` backends.
fn wait_vips(t: &Ecmp, node: usize, backends: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = t.status(node);
        if web(&s).and_then(|v| v["backends"].as_array().map(Vec::len)) == Some(backends) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "lb{node} does not serve web with {backends} backends: {s}\n{}",
            t.log(&format!("lb{node}"))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn new_flows(t: &Ecmp, node: usize) -> u64 {
    web(&t.status(node)).map_or(0, |v| v["counters"]["new_flows"].as_u64().unwrap_or(0))
}

fn digest(t: &Ecmp, node: usize) -> String {
    web(&t.status(node))
        .and_then(|v| v["table_digest"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// A fleet of `nodes` LB nodes over three backends, announced and in the
/// router's multipath route (room for `max_nodes` BGP sessions).
fn fleet(nodes: usize, max_nodes: usize) -> Ecmp {
    let mut t = Ecmp::new(3);
    t.set_vips(&vip_doc(&[0, 1, 2]));
    t.start_router(max_nodes);
    for i in 0..nodes {
        t.add_node(i);
    }
    for i in 0..nodes {
        wait_vips(&t, i, 3);
    }
    let all: Vec<usize> = (0..nodes).collect();
    t.wait_next_hops(VIP_V4, &all, Duration::from_secs(30));
    t
}

fn assert_unbroken(conns: &mut [Connection], round: u32, what: &str) {
    let broken = probe(conns, round, Duration::from_secs(20));
    assert!(
        broken.is_empty(),
        "{what}: {} of {} connections broke",
        broken.len(),
        conns.len()
    );
}

#[test]
fn ecmp_spreads_flows_and_survives_losing_and_adding_nodes() {
    let mut t = fleet(3, 4);

    // One table everywhere.
    let digests: Vec<String> = (0..3).map(|i| digest(&t, i)).collect();
    assert_eq!(digests[0].len(), 16, "{digests:?}");
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");

    // Spread: short connections from ephemeral ports, hashed by the router.
    let before: Vec<u64> = (0..3).map(|i| new_flows(&t, i)).collect();
    let n = 300usize;
    t.from_client(move || {
        for _ in 0..n {
            Connection::open(vip()).expect("a connection");
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let split: Vec<u64> = (0..3).map(|i| new_flows(&t, i) - before[i]).collect();
    eprintln!("spread of {n} flows over 3 LB nodes: {split:?}");
    assert_eq!(split.iter().sum::<u64>(), n as u64, "{split:?}");
    // Binomial(300, 1/3): mean 100, sd 8.2; five sd either way.
    for (i, s) in split.iter().enumerate() {
        assert!((59..=141).contains(s), "lb{i} took {s} of {n}: {split:?}");
    }

    // Losing a node: 240 long-lived connections, one node killed with its link.
    let mut conns = t.open_connections(vip(), 240);
    assert_unbroken(&mut conns, 0, "before the loss");
    let held: Vec<u64> = (0..3).map(|i| new_flows(&t, i)).collect();
    let lost = t.kill_node(1);
    t.wait_next_hops(VIP_V4, &[0, 2], Duration::from_secs(15));
    let withdrawal = lost.elapsed();
    eprintln!(
        "the router withdrew the lost node {withdrawal:?} after its link went (hold time 3 s)"
    );
    // Nothing but the hold timer (3 s, keepalives every second) can tell
    // the router: about 2 to 3 s, surely not within one.
    assert!(withdrawal >= Duration::from_secs(1), "{withdrawal:?}");
    assert_unbroken(&mut conns, 1, "after losing lb1");
    let moved: u64 = [0, 2].iter().map(|i| new_flows(&t, *i) - held[*i]).sum();
    assert!(moved > 0, "no flow moved to the other nodes");
    eprintln!("{moved} flows moved from the lost node to lb0 and lb2, none broken");

    // Adding a fourth node: the router rehashes, flows that move continue.
    t.add_node(3);
    wait_vips(&t, 3, 3);
    assert_eq!(digest(&t, 3), digests[0]);
    t.wait_next_hops(VIP_V4, &[0, 2, 3], Duration::from_secs(20));
    assert_unbroken(&mut conns, 2, "after adding lb3");
    let arrived = new_flows(&t, 3);
    assert!(arrived > 0, "no flow moved to lb3");
    eprintln!("{arrived} flows moved to the new node lb3, none broken");
}

#[test]
fn drain_no_backend_and_shutdown_withdraw_the_node() {
    let mut t = fleet(2, 2);
    let mut conns = t.open_connections(vip(), 200);
    assert_unbroken(&mut conns, 0, "before the drain");

    // lbctl node drain: routes withdrawn, flows move, none fail.
    let drained: Value =
        serde_json::from_str(&t.lbctl(0, &["node", "drain", "--json"])).expect("JSON");
    assert_eq!(drained["drained"], true, "{drained}");
    assert_eq!(drained["announced"], serde_json::json!([]), "{drained}");
    assert_eq!(drained["withheld"][0]["reason"], "the node is drained");
    let took = t.wait_next_hops(VIP_V4, &[1], Duration::from_secs(10));
    eprintln!("drain: the router withdrew lb0 after {took:?}");
    // The metrics say the same, and carry the table digest.
    let (m0, m1) = (t.scrape(0), t.scrape(1));
    assert!(m0.contains("\nlb_node_drained 1\n"), "{m0}");
    assert!(m1.contains("\nlb_node_drained 0\n"), "{m1}");
    let withheld =
        format!("lb_vip_announced{{address=\"{VIP_V4}\",reason=\"the node is drained\"}} 0");
    assert!(m0.contains(&withheld), "{m0}");
    let announced = format!("lb_vip_announced{{address=\"{VIP_V4}\",reason=\"\"}} 1");
    assert!(m1.contains(&announced), "{m1}");
    let info = format!(
        "lb_vip_table_info{{vip=\"web\",digest=\"{}\"}} 1",
        digest(&t, 0)
    );
    assert!(m0.contains(&info) && m1.contains(&info), "{m0}\n{m1}");
    assert_unbroken(&mut conns, 1, "after the drain");

    // The drain survives an agent restart.
    t.stop_agent(0);
    t.start_agent(0);
    let status: Value =
        serde_json::from_str(&t.lbctl(0, &["node", "status", "--json"])).expect("JSON");
    assert_eq!(status["drained"], true, "{status}");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(t.next_hops(VIP_V4), vec![lb_address(1)]);
    let text = t.lbctl(0, &["node", "status"]);
    assert!(text.contains("drained"), "{text}");

    // Undrain: announced again; flows that move back continue.
    t.lbctl(0, &["node", "undrain"]);
    t.wait_next_hops(VIP_V4, &[0, 1], Duration::from_secs(10));
    assert_unbroken(&mut conns, 2, "after the undrain");

    // No usable backend on lb1: withdrawn there, its flows go to lb0.
    for i in 0..3 {
        t.lbctl(1, &["backend", "disable", "web", &backend_address(i)]);
    }
    t.wait_next_hops(VIP_V4, &[0], Duration::from_secs(10));
    let status: Value =
        serde_json::from_str(&t.lbctl(1, &["node", "status", "--json"])).expect("JSON");
    assert_eq!(
        status["withheld"][0]["reason"], "no usable backend",
        "{status}"
    );
    assert_unbroken(&mut conns, 3, "with lb1 out of backends");
    for i in 0..3 {
        t.lbctl(1, &["backend", "enable", "web", &backend_address(i)]);
    }
    t.wait_next_hops(VIP_V4, &[0, 1], Duration::from_secs(10));
    assert_unbroken(&mut conns, 4, "with lb1 back");

    // An agent without [announce] refuses, and says why.
    let out = t.lbctl_at(&t.dir.join("b0.sock"), &["node", "drain"]);
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("[announce]"), "{why}");

    // A stopping agent withdraws its VIPs (its datapath stays pinned).
    t.stop_agent(1);
    t.wait_next_hops(VIP_V4, &[0], Duration::from_secs(10));
    assert_unbroken(&mut conns, 5, "after lb1's agent stopped");
}

/// Opens 300 connections over `web` on backends 0..3, adds backend 3 to the
/// fleet's document, then drains LB node `drained`: its flows move to the
/// other node, whose table (with backend 3) may name another backend.
/// Returns the connections broken.
fn flows_moved_after_a_backend_change(t: &Ecmp, drained: usize, round: u32) -> usize {
    let other = 1 - drained;
    let mut conns = t.open_connections(vip(), 300);
    assert_unbroken(&mut conns, round, "before the backend change");
    t.set_vips(&vip_doc(&[0, 1, 2, 3]));
    for i in 0..2 {
        wait_vips(t, i, 4);
    }
    assert_eq!(digest(t, 0), digest(t, 1));
    // Established flows keep their backends through the change on their node.
    assert_unbroken(&mut conns, round + 1, "after the backend change");
    t.lbctl(drained, &["node", "drain"]);
    t.wait_next_hops(VIP_V4, &[other], Duration::from_secs(10));
    probe(&mut conns, round + 2, Duration::from_secs(20)).len()
}

#[test]
fn second_chance_keeps_flows_that_move_after_a_backend_change() {
    let mut t = Ecmp::new(4);
    t.second_chance = false;
    t.set_vips(&vip_doc(&[0, 1, 2]));
    t.start_router(2);
    for i in 0..2 {
        t.add_node(i);
        wait_vips(&t, i, 3);
    }
    t.wait_next_hops(VIP_V4, &[0, 1], Duration::from_secs(30));
    let without = flows_moved_after_a_backend_change(&t, 0, 0);
    eprintln!("without second chance: {without} of 300 connections broke");
    // About a half moved, and a quarter of those to the new backend.
    assert!(without > 0, "the scenario moved no flow to another backend");
    assert_eq!(t.second_chance_packets(4), 0);

    // The same with second chance on both nodes.
    t.second_chance = true;
    for i in 0..2 {
        t.restart_agent_afresh(i);
    }
    t.lbctl(0, &["node", "undrain"]);
    t.set_vips(&vip_doc(&[0, 1, 2]));
    for i in 0..2 {
        wait_vips(&t, i, 3);
    }
    t.wait_next_hops(VIP_V4, &[0, 1], Duration::from_secs(20));
    let with = flows_moved_after_a_backend_change(&t, 1, 10);
    let sent_on = t.second_chance_packets(4);
    eprintln!(
        "with second chance: {with} of 300 connections broke; {sent_on} packets sent on by lb_decap"
    );
    assert_eq!(with, 0, "connections broke with second chance");
    assert!(sent_on > 0, "no packet took the second chance");
}
