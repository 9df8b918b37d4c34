//! End to end: real TCP and UDP traffic from a client namespace through the
//! XDP balancer (native mode on veth) to backends that decapsulate with
//! `lb_decap` and answer the client directly.
use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use lb_tests::topology::*;

fn vip(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().unwrap(), port)
}

fn counts(names: &[String]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for n in names {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

/// Asserts that each backend's share of `names` is within ±20% of its weight's share.
fn assert_spread(names: &[String], weights: &[u32]) {
    let c = counts(names);
    let total: u32 = weights.iter().sum();
    for (i, w) in weights.iter().enumerate() {
        let expected = names.len() as f64 * f64::from(*w) / f64::from(total);
        let got = c.get(&format!("b{i}")).copied().unwrap_or(0) as f64;
        assert!(
            (got - expected).abs() <= 0.2 * expected,
            "backend b{i} (weight {w}) got {got} of {} connections, expected {expected:.0} ±20%: {c:?}",
            names.len()
        );
    }
}

fn many_connections(t: &Topology, to: SocketAddr, n: usize) -> Vec<std::io::Result<String>> {
    t.from_client(move || (0..n).map(|_| connect_once(to)).collect())
}

#[test]
fn tcp_connections_all_succeed_and_spread_by_weight() {
    let weights = [100, 100, 200];
    let mut t = Topology::new(3);
    t.start(&weights);
    let status = t.status_json();
    assert_eq!(
        status["interfaces"][0]["mode"], "native",
        "the LB must run native XDP"
    );

    // With weights 1:1:2, ±20% is 3.6 standard deviations for the smaller shares.
    let results = many_connections(&t, vip(VIP_V4, 80), 1000);
    let failures: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of 1000 connections failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    let names: Vec<String> = results.into_iter().map(Result::unwrap).collect();
    assert_spread(&names, &weights);

    // The datapath saw the same: new flows per backend match what the client saw.
    let status = t.status_json();
    let web = vip_named(&status, "web");
    assert_eq!(web["counters"]["new_flows"], 1000);
    let c = counts(&names);
    // Backends are listed by address: the three IPv4 ones first.
    for (i, b) in status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .take(3)
        .enumerate()
    {
        assert_eq!(b["address"], backend_v4(i));
        assert_eq!(
            b["counters"]["new_flows"].as_u64().unwrap() as usize,
            c[&format!("b{i}")]
        );
    }
    let text = t.lbctl(&["status"]);
    assert!(text.status.success());
    assert!(String::from_utf8_lossy(&text.stdout).contains("VIP web tcp 198.18.10.1:80"));
}

#[test]
fn udp_ipv6_and_ipv4_to_ipv6_backends_work() {
    let mut t = Topology::new(3);
    t.start(&[100, 100, 100]);
    let udp: Vec<_> = t.from_client(|| (0..60).map(|_| udp_once(vip(VIP_V4, 53))).collect());
    let udp_ok: Vec<String> = udp.into_iter().map(|r| r.expect("UDP answered")).collect();
    assert_eq!(
        counts(&udp_ok).len(),
        3,
        "UDP flows reach every backend: {:?}",
        counts(&udp_ok)
    );

    let v6 = many_connections(&t, vip(VIP_V6, 80), 60);
    let v6: Vec<String> = v6
        .into_iter()
        .map(|r| r.expect("IPv6 connection"))
        .collect();
    assert_eq!(counts(&v6).len(), 3);

    let mixed = many_connections(&t, vip(VIP_V4_TO_V6, 80), 60);
    let mixed: Vec<String> = mixed
        .into_iter()
        .map(|r| r.expect("IPv4 VIP to IPv6 backends"))
        .collect();
    assert_eq!(counts(&mixed).len(), 3);

    // Every backend decapsulated, and no packet was malformed.
    let b0 = t.lbctl_at(&t.dir.join("b0.sock"), &["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&b0.stdout).unwrap();
    let outcomes = s["decap"]["outcomes"].as_array().unwrap();
    assert!(outcomes[0]["packets"].as_u64().unwrap() > 0);
    assert_eq!(outcomes[2]["packets"], 0);
}

#[test]
fn reload_keeps_open_connections_and_applies_new_weights() {
    let mut t = Topology::new(3);
    t.start(&[100, 100, 100]);
    // 30 long-lived connections, open across the reload.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<usize, String>>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<usize>();
    let client = lb_tests::topology::in_netns(&t.ns("cl"), move || {
        let mut conns = Vec::new();
        for _ in 0..30 {
            let s = TcpStream::connect_timeout(&vip(VIP_V4, 80), Duration::from_secs(3))
                .expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut name = String::new();
            r.read_line(&mut name).unwrap();
            conns.push((s, r, name));
        }
        ready_tx.send(conns.len()).unwrap();
        rx.recv().unwrap();
        let mut ok = 0;
        for (i, (mut s, mut r, _)) in conns.into_iter().enumerate() {
            let msg = format!("still there {i}\n");
            if s.write_all(msg.as_bytes()).is_err() {
                continue;
            }
            let mut back = String::new();
            if r.read_line(&mut back).is_ok() && back == msg {
                ok += 1;
            }
        }
        done_tx.send(Ok(ok)).unwrap();
    });
    assert_eq!(ready_rx.recv_timeout(Duration::from_secs(20)).unwrap(), 30);

    // A bad configuration is refused and changes nothing.
    let before = t.status_json();
    let bad = t.write(
        "bad.toml",
        &t.lb_config(&[100, 100, 100])
            .replace("weight = 100", "weight = -1"),
    );
    let out = t.lbctl(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vips[0].backends[0].weight"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resized = t.write(
        "resized.toml",
        &t.lb_config(&[100, 100, 100])
            .replace("maglev_table_size = 65537", "maglev_table_size = 257"),
    );
    let out = t.lbctl(&["apply", "-f", resized.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("datapath"));
    let after = t.status_json();
    // Counters move with traffic; the configuration part must not.
    for (b, a) in before["vips"]
        .as_array()
        .unwrap()
        .iter()
        .zip(after["vips"].as_array().unwrap())
    {
        let weights = |v: &serde_json::Value| {
            v["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["weight"].clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(weights(b), weights(a));
    }

    // New weights: b0 gets 4 times the others.
    let good = t.write("good.toml", &t.lb_config(&[400, 100, 100]));
    let out = t.lbctl(&["apply", "-f", good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 changed"));

    tx.send(()).unwrap();
    let ok = done_rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .unwrap();
    client.join().unwrap();
    assert_eq!(ok, 30, "open connections broken by the reload");

    // 1500 connections keep the 1/6 shares 3.5 standard deviations inside ±20%.
    let names: Vec<String> = many_connections(&t, vip(VIP_V4, 80), 1500)
        .into_iter()
        .map(|r| r.expect("connection after reload"))
        .collect();
    assert_spread(&names, &[400, 100, 100]);
}

#[test]
fn bad_config_attaches_nothing_and_shutdown_keeps_forwarding() {
    let mut t = Topology::new(1);
    let lb = t.ns("lb");
    let xdp_on_lb = || {
        let out = std::process::Command::new("ip")
            .args(["-n", &lb, "link", "show", "eth0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("xdp")
    };
    // Invalid: exit code 2, the field named, nothing attached.
    let bad = t.write(
        "bad.toml",
        &t.lb_config(&[100])
            .replace("protocol = \"tcp\"", "protocol = \"sctp\""),
    );
    let out = agent_command(&lb)
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vips[0].protocol"));
    assert!(!xdp_on_lb());

    // lbctl without an agent says so.
    let out = t.lbctl(&["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the agent is not running"));

    t.start(&[100]);
    assert!(xdp_on_lb());

    // Malformed API requests get an error and change nothing.
    for request in [
        "not json\n",
        "{\"command\":\"reboot\"}\n",
        "{\"command\":\"apply\",\"config\":\"[datapath\"}\n",
        "{\"command\":\"apply\",\"config\":\"socket = \\\"/elsewhere.sock\\\"\\n[decap]\\ninterfaces=[\\\"eth0\\\"]\\naddresses=[\\\"198.18.0.2\\\"]\"}\n",
    ] {
        let mut stream = std::os::unix::net::UnixStream::connect(t.lb_socket()).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).unwrap();
        let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply["result"], "error", "{request}: {reply}");
        assert!(!reply["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(t.status_json()["vips"].as_array().unwrap().len(), 4);
    assert!(connect_once_from(&t, vip(VIP_V4, 80)).is_ok());
    let status = t.stop_lb();
    assert!(status.success(), "agent exit status {status}");
    assert!(xdp_on_lb(), "SIGTERM leaves the datapath forwarding");
    assert!(connect_once_from(&t, vip(VIP_V4, 80)).is_ok());
    assert!(!t.lb_socket().exists(), "control socket left behind");
    let out = t.run_agent("lb", &t.dir.join("lb.toml"), &["--cleanup"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!xdp_on_lb(), "XDP still attached after --cleanup");
}

#[test]
fn two_armed_lb_redirects_through_the_devmap() {
    let mut t = Topology::two_armed(3);
    t.start(&[100, 100, 100]);
    let names: Vec<String> = many_connections(&t, vip(VIP_V4, 80), 300)
        .into_iter()
        .map(|r| r.expect("connection through the redirecting LB"))
        .collect();
    // The weight spread is checked with 1000 connections elsewhere; 300 only
    // need to reach every backend.
    assert_eq!(counts(&names).len(), 3, "{:?}", counts(&names));
    let v6: Vec<String> = many_connections(&t, vip(VIP_V6, 80), 30)
        .into_iter()
        .map(|r| r.expect("IPv6"))
        .collect();
    assert_eq!(v6.len(), 30);
    let status = t.status_json();
    let outcome = |name: &str| {
        status["outcomes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["outcome"] == name)
            .unwrap()["packets"]
            .as_u64()
            .unwrap()
    };
    assert!(outcome("redirected") > 0);
    assert_eq!(
        outcome("forwarded"),
        0,
        "nothing should leave through the receiving interface"
    );
    assert_eq!(outcome("dropped_redirect_failed"), 0);
}

#[test]
fn next_hop_follows_a_backend_mac_change() {
    let mut t = Topology::new(3);
    t.start(&[100, 100, 100]);
    let before: Vec<String> = many_connections(&t, vip(VIP_V4, 80), 60)
        .into_iter()
        .map(|r| r.expect("connection"))
        .collect();
    assert!(counts(&before).contains_key("b0"));
    // The backend announces its new MAC (gratuitous ARP); the LB's neighbour
    // entry changes, and the agent must follow it long before its 60 s poll.
    let b0 = t.ns("b0");
    must(&[
        "ip",
        "netns",
        "exec",
        &b0,
        "sysctl",
        "-qw",
        "net.ipv4.conf.eth0.arp_notify=1",
    ]);
    must(&[
        "ip",
        "-n",
        &b0,
        "link",
        "set",
        "eth0",
        "address",
        "02:00:00:00:0b:00",
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = t.status_json();
        let b = status["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == backend_v4(0))
            .unwrap()
            .clone();
        if b["next_hop"]["mac"] == "02:00:00:00:0b:00" {
            break;
        }
        if std::time::Instant::now() > deadline {
            let neigh = std::process::Command::new("ip")
                .args(["-n", &t.ns("lb"), "neigh"])
                .output()
                .unwrap();
            panic!(
                "next hop not refreshed: {b}\nLB neighbours:\n{}\n{}",
                String::from_utf8_lossy(&neigh.stdout),
                t.log("lb")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let after: Vec<String> = many_connections(&t, vip(VIP_V4, 80), 60)
        .into_iter()
        .map(|r| r.expect("connection after the MAC change"))
        .collect();
    assert!(counts(&after).contains_key("b0"));
}

#[test]
fn a_backend_whose_server_stops_is_marked_down_and_gets_no_new_flows() {
    let mut t = Topology::new(3);
    t.start(&[100, 100, 100]);
    let health = |t: &Topology| -> Vec<String> {
        let s = t.status_json();
        let web = vip_named(&s, "web");
        web["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["health"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(health(&t), ["up", "up", "up"]);
    t.stop_servers(1);
    let stopped = std::time::Instant::now();
    loop {
        if health(&t)[1] == "down" {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(3),
            "not marked down within 3 s:\n{}",
            t.log("lb")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let detected = stopped.elapsed();
    eprintln!("backend b1 marked down {detected:?} after its server stopped");
    assert_eq!(health(&t), ["up", "down", "up"]);
    let names: Vec<String> = many_connections(&t, vip(VIP_V4, 80), 200)
        .into_iter()
        .map(|r| r.expect("every new connection goes to a live backend"))
        .collect();
    let c = counts(&names);
    assert!(
        !c.contains_key("b1"),
        "new flows reached the down backend: {c:?}"
    );
    assert_eq!(c.len(), 2);
    let s = t.status_json();
    let web = vip_named(&s, "web");
    assert_eq!(web["backends"][1]["maglev_slots"], 0);
}

#[test]
fn an_operator_disables_and_enables_a_backend() {
    let mut t = Topology::new(3);
    t.start(&[100, 100, 100]);
    for (args, needle) in [
        (
            vec!["backend", "disable", "nope", "198.18.0.11"],
            "no VIP named",
        ),
        (
            vec!["backend", "disable", "web", "198.18.0.99"],
            "not a backend of web",
        ),
        (
            vec!["backend", "disable", "web", "not-an-address"],
            "invalid",
        ),
    ] {
        let out = t.lbctl(&args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = t.lbctl(&["backend", "disable", "web", "198.18.0.11"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        vip_named(&t.status_json(), "web")["backends"][0]["health"],
        "disabled"
    );
    let names: Vec<String> = many_connections(&t, vip(VIP_V4, 80), 150)
        .into_iter()
        .map(|r| r.expect("connection"))
        .collect();
    assert!(!counts(&names).contains_key("b0"), "{:?}", counts(&names));
    // The setting survives an agent restart.
    t.stop_lb();
    t.start_lb();
    assert_eq!(
        vip_named(&t.status_json(), "web")["backends"][0]["health"],
        "disabled"
    );
    let names: Vec<String> = many_connections(&t, vip(VIP_V4, 80), 60)
        .into_iter()
        .map(|r| r.expect("connection"))
        .collect();
    assert!(!counts(&names).contains_key("b0"), "{:?}", counts(&names));
    let out = t.lbctl(&["backend", "enable", "web", "198.18.0.11"]);
    assert!(out.status.success());
    assert_eq!(
        vip_named(&t.status_json(), "web")["backends"][0]["health"],
        "up"
    );
    let names: Vec<String> = many_connections(&t, vip(VIP_V4, 80), 150)
        .into_iter()
        .map(|r| r.expect("connection"))
        .collect();
    assert!(counts(&names).contains_key("b0"), "{:?}", counts(&names));
}

#[test]
fn a_backend_reporting_high_load_gets_proportionally_fewer_new_flows() {
    let mut t = Topology::new(3);
    t.start(&[100, 100, 100]);
    t.set_load(2, 0.75);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let web = vip_named(&t.status_json(), "web");
        if web["backends"][2]["effective_weight"] == 25 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "load not applied: {web}\n{}",
            t.log("lb")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let web = vip_named(&t.status_json(), "web");
    let weights: Vec<u64> = web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["effective_weight"].as_u64().unwrap())
        .collect();
    assert_eq!(weights, [100, 100, 25]);
    let names: Vec<String> = many_connections(&t, vip(VIP_V4, 80), 900)
        .into_iter()
        .map(|r| r.expect("connection"))
        .collect();
    let c = counts(&names);
    let (b0, b1, b2) = (c["b0"], c["b1"], c["b2"]);
    eprintln!(
        "900 new connections with b2 at load 0.75 (weights 100:100:25): b0 {b0}, b1 {b1}, b2 {b2}"
    );
    // Shares 100:100:25 give b2 about 100 of 900 and the others about 400.
    assert!(
        b2 > 0 && b2 * 2 < b0.min(b1),
        "b2 should get about a quarter of the others' flows: {c:?}"
    );
    // Load falls back: the weight comes back.
    t.set_load(2, 0.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while vip_named(&t.status_json(), "web")["backends"][2]["effective_weight"] != 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "weight did not recover"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The VIP of this name in `lbctl status --json`.
fn vip_named(status: &serde_json::Value, name: &str) -> serde_json::Value {
    status["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap()
        .clone()
}

fn connect_once_from(t: &Topology, to: SocketAddr) -> std::io::Result<String> {
    t.from_client(move || connect_once(to))
}
