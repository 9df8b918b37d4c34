//! End to end: source-side balancing installed through a real etcd (TLS with
//! client certificates). Two hosts with two guests each call service `b`,
//! whose three instances (plus a fourth added later) run real servers behind
//! `lb_decap`; one LB node also serves the VIP and publishes the health it
//! checks. After `lbctl install --from a --to b` each host balances its
//! guests' connections itself (same Maglev as the LB node, encapsulated to
//! the instances, direct return), the LB node forwards none of them, and
//! instance changes, published health, an agent restart, etcd going away,
//! bad writes and the uninstall behave as the README says.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use lb_tests::{
    etcd::{self, Etcd, EtcdCluster},
    topology::*,
};
use serde_json::Value;

const HOSTS: usize = 2;
const GUESTS: usize = 2;

fn lbctl(ns: &str, fleet: &Path, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin("lbctl"))
        .arg("--fleet")
        .arg(fleet)
        .args(args)
        .output()
        .expect("run lbctl")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// Runs an lbctl write that must be refused; returns its message.
fn refused(ns: &str, fleet: &Path, args: &[&str]) -> String {
    let out = lbctl(ns, fleet, args);
    assert!(!out.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_of(ns: &str, fleet: &Path, args: &[&str]) -> Value {
    serde_json::from_str(&ok(lbctl(ns, fleet, args), &args.join(" "))).expect("JSON")
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.parse().unwrap(), 80)
}

/// `n` connections from every guest at once; the answering backends.
fn from_guests(t: &Topology, n: usize) -> Vec<String> {
    let mut threads = Vec::new();
    for h in 0..HOSTS {
        for g in 0..GUESTS {
            let ns = t.ns(&format!("h{h}g{g}"));
            threads.push(in_netns(&ns, move || {
                (0..n)
                    .map(|_| connect_once(vip()).unwrap_or_else(|e| format!("error: {e}")))
                    .collect::<Vec<_>>()
            }));
        }
    }
    threads
        .into_iter()
        .flat_map(|t| t.join().expect("guest thread"))
        .collect()
}

fn tally(names: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

/// Packets the LB node counted for the VIP.
fn lb_vip_packets(t: &Topology) -> u64 {
    t.status_json()["vips"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["name"] == "b")
        .map(|v| v["counters"]["packets"].as_u64().unwrap())
        .sum()
}

/// Every host's status, by node.
fn hosts(ns: &str, fleet: &Path) -> BTreeMap<String, Value> {
    let v = json_of(ns, fleet, &["installs", "--json"]);
    v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["node"].as_str().unwrap().to_string(), h.clone()))
        .collect()
}

/// True when every host applied a state at least as new as `revision`,
/// without error, and `check` holds for it.
fn all_hosts(ns: &str, fleet: &Path, revision: i64, check: impl Fn(&Value) -> bool) -> bool {
    let hosts = hosts(ns, fleet);
    (0..HOSTS).all(|h| {
        hosts.get(&format!("h{h}")).is_some_and(|s| {
            s["generation"].as_i64().is_some_and(|g| g >= revision)
                && s["error"].is_null()
                && check(s)
        })
    })
}

fn install_revision(ns: &str, fleet: &Path) -> i64 {
    let v = json_of(ns, fleet, &["installs", "--json"]);
    v["installs"][0]["revision"].as_i64().expect("an install")
}

fn vip_doc(backends: &[(String, u32)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(b, w)| format!("{{ address = \"{b}\", weight = {w} }}"))
        .collect();
    let list = list.join(", ");
    format!(
        "[[vips]]\nname = \"b\"\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\nbackends = [{list}]\nhealth = {{ kind = \"tcp\", interval_ms = 200, timeout_ms = 150, rise = 2, fall = 2 }}\n\
         [[vips]]\nname = \"b-udp\"\naddress = \"{VIP_V4}\"\nport = 0\nprotocol = \"udp\"\nbackends = [{list}]\n"
    )
}

/// `lbctl service set b` over backends `(index, weight)`, and the LB node's
/// VIP document to match (same instances and weights: the same table).
fn set_b(t: &Topology, ns: &str, fleet: &Path, backends: &[(usize, u32)]) {
    let mut args = vec!["service".to_string(), "set".into(), "b".into()];
    for (i, w) in backends {
        args.push("--instance".into());
        args.push(format!("{}:80,weight={w},node=b{i}", t.backend_v4(*i)));
    }
    args.extend(["--vip".into(), format!("{VIP_V4}:80/tcp")]);
    args.extend(["--vip".into(), format!("{VIP_V4}:0/udp")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(lbctl(ns, fleet, &args), "service set b");
    let list: Vec<(String, u32)> = backends
        .iter()
        .map(|(i, w)| (t.backend_v4(*i), *w))
        .collect();
    let doc = t.write("vips.toml", &vip_doc(&list));
    ok(
        lbctl(
            ns,
            fleet,
            &["fleet", "vips", "set", "-f", doc.to_str().unwrap()],
        ),
        "fleet vips set",
    );
}

/// A TCP connection held open; `echo` checks it still reaches its backend.
struct Held {
    stream: TcpStream,
    backend: String,
}

fn hold(t: &Topology, h: usize, g: usize) -> Held {
    t.from_guest(h, g, || {
        let stream = TcpStream::connect_timeout(&vip(), Duration::from_secs(3)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(stream.try_clone().unwrap())
            .read_line(&mut line)
            .expect("the backend's name");
        Held {
            stream,
            backend: line.trim().to_string(),
        }
    })
}

fn echo(held: &mut Held) {
    held.stream.write_all(b"still there\n").expect("write");
    let mut line = String::new();
    BufReader::new(held.stream.try_clone().unwrap())
        .read_line(&mut line)
        .expect("echo on the established connection");
    assert_eq!(line, "still there\n", "backend {}", held.backend);
}

/// Connections from every guest all answered, each by one of `live`.
fn served_by(t: &Topology, n: usize, live: &[&str]) {
    let names = from_guests(t, n);
    assert!(
        names.iter().all(|x| live.contains(&x.as_str())),
        "{:?}",
        tally(&names)
    );
}

/// UDP requests from guest `g` of host `h`, one from each source port
/// given, to the VIP's port 53; the answering backends, in order.
fn udp_from_ports(t: &Topology, h: usize, g: usize, ports: std::ops::Range<u16>) -> Vec<String> {
    t.from_guest(h, g, move || {
        ports
            .map(|p| {
                let sock = std::net::UdpSocket::bind(("0.0.0.0", p)).expect("bind");
                sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                sock.connect(SocketAddr::new(VIP_V4.parse().unwrap(), 53))
                    .expect("connect");
                sock.send(b"who?").expect("send");
                let mut buf = [0u8; 64];
                match sock.recv(&mut buf) {
                    Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
                    Err(e) => format!("error: {e}"),
                }
            })
            .collect()
    })
}

fn xdp_on(t: &Topology, h: usize, dev: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", &t.ns(&format!("h{h}")), "link", "show", dev])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("xdp")
}

#[test]
fn installed_balancing_on_callers_hosts() {
    let mut t = Topology::new(4);
    for h in 0..HOSTS {
        t.add_host(h, GUESTS);
    }
    let lb = t.ns("lb");
    let ns = lb.as_str();
    let mut etcd = Etcd::start_at(Some(ns), Some(LB_V4));
    let fleet = t.write("fleet.toml", &etcd.fleet_section("lbctl", 3));
    let fleet = fleet.as_path();
    let lb_section = etcd.fleet_section("lb-1", 3);
    t.start_with(&[100, 100, 100, 100], |c| format!("{c}\n{lb_section}"));

    // The registry: callers `a` in the guests, `b` on three backends.
    let mut a = vec!["service", "set", "a"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    for h in 0..HOSTS {
        for g in 0..GUESTS {
            a.push("--instance".into());
            a.push(format!("{}:1,node=h{h}", t.guest_v4(h, g)));
        }
    }
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    ok(lbctl(ns, fleet, &a), "service set a");
    set_b(&t, ns, fleet, &[(0, 100), (1, 100), (2, 100)]);
    for h in 0..HOSTS {
        let section = etcd.fleet_section_at(LB_V4, &format!("h{h}"), 3);
        t.start_host(h, &section);
    }
    // Before the install, the guests go through the LB node.
    wait_for(
        "the LB serves the store's VIP",
        Duration::from_secs(10),
        || {
            let vips = t.status_json()["vips"].clone();
            vips.as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == "b")
                .then_some(())
        },
    );
    let before = lb_vip_packets(&t);
    let names = from_guests(&t, 5);
    eprintln!(
        "without an install, 20 connections from the guests: LB node's VIP packets {before} -> {}",
        lb_vip_packets(&t)
    );
    assert!(names.iter().all(|n| n.starts_with('b')), "{names:?}");
    assert!(
        lb_vip_packets(&t) > before,
        "the LB node carried the guests' flows"
    );

    // The same flows through the LB node now, through the hosts later.
    let via_lb = udp_from_ports(&t, 0, 0, 41000..41040);
    assert!(via_lb.iter().all(|n| n.starts_with('b')), "{via_lb:?}");
    assert!(
        tally(&via_lb).len() >= 2,
        "40 flows on one backend: {via_lb:?}"
    );

    // Bad installs are refused and change nothing.
    let e = refused(ns, fleet, &["install", "--from", "a", "--to", "nosuch"]);
    assert!(e.contains("to: no service named \"nosuch\""), "{e}");
    let e = refused(ns, fleet, &["install", "--from", "b", "--to", "a"]);
    assert!(e.contains("has no VIP"), "{e}");
    assert!(json_of(ns, fleet, &["installs", "--json"])["installs"]
        .as_array()
        .unwrap()
        .is_empty());

    // Install: every host has the balancer.
    let started = Instant::now();
    ok(
        lbctl(ns, fleet, &["install", "--from", "a", "--to", "b"]),
        "install",
    );
    let rev = install_revision(ns, fleet);
    wait_for(
        "every host applies the install",
        Duration::from_secs(10),
        || all_hosts(ns, fleet, rev, |s| s["installs"][0] == "a/b").then_some(()),
    );
    let took = started.elapsed();
    eprintln!("install applied on every host in {took:?}");
    let v = json_of(ns, fleet, &["installs", "--json"]);
    assert_eq!(v["installs"][0]["hosts"], serde_json::json!(["h0", "h1"]));
    assert_eq!(v["installs"][0]["pending"], serde_json::json!([]), "{v}");
    let text = ok(lbctl(ns, fleet, &["installs"]), "installs");
    assert!(
        text.contains("install a -> b") && text.contains("pending none"),
        "{text}"
    );
    assert!(took < Duration::from_secs(2), "install took {took:?}");
    for h in 0..HOSTS {
        for g in 0..GUESTS {
            assert!(xdp_on(&t, h, &format!("g{g}")), "h{h} g{g} has no balancer");
        }
    }

    // Same Maglev as the LB node: each flow goes where the LB sent it.
    let via_host = udp_from_ports(&t, 0, 0, 41000..41040);
    assert_eq!(
        via_host, via_lb,
        "the host chose otherwise than the LB node"
    );

    // The guests' connections: balanced on their hosts, none via the LB.
    let before = lb_vip_packets(&t);
    let names = from_guests(&t, 300);
    let counts = tally(&names);
    eprintln!("1200 connections from the guests: {counts:?}");
    for b in ["b0", "b1", "b2"] {
        let n = counts.get(b).copied().unwrap_or(0);
        assert!((320..=480).contains(&n), "{b}: {n} of 1200 ({counts:?})");
    }
    assert_eq!(counts.values().sum::<usize>(), 1200, "{counts:?}");
    let after = lb_vip_packets(&t);
    eprintln!("LB node's VIP packets: {before} before the 1200 connections, {after} after");
    assert_eq!(after, before, "the LB node forwarded none of them");
    // The host's own balancer counts them per backend (lbctl status there).
    let st = t.lbctl_at(&t.host_balancer_socket(0), &["status", "--json"]);
    let st: Value = serde_json::from_slice(&ok(st, "status on h0").into_bytes()).unwrap();
    let new_flows: u64 = st["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["counters"]["new_flows"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        new_flows >= 600,
        "h0's balancer counted {new_flows} new flows: {st}"
    );
    eprintln!("h0's source-side balancer counted {new_flows} new flows over its backends");
    let report = ok(
        t.lbctl_at(&t.host_balancer_socket(0), &["report"]),
        "report on h0",
    );
    assert!(report.contains("VIP b"), "{report}");

    // Add an instance: new flows reach it within 2 s; established stay.
    let mut held: Vec<Held> = (0..HOSTS).map(|h| hold(&t, h, 0)).collect();
    set_b(&t, ns, fleet, &[(0, 100), (1, 100), (2, 100), (3, 100)]);
    let added = Instant::now();
    wait_for(
        "new flows reach the new instance",
        Duration::from_secs(5),
        || from_guests(&t, 3).iter().any(|n| n == "b3").then_some(()),
    );
    let took = added.elapsed();
    eprintln!("added instance reached by new flows in {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    for h in held.iter_mut() {
        echo(h);
    }

    // Mark one down (its server stops; the LB node's check publishes it).
    t.stop_servers(1);
    let down = Instant::now();
    wait_for("the hosts take b1 out", Duration::from_secs(10), || {
        all_hosts(ns, fleet, 0, |s| {
            !s["backends"].as_array().unwrap().iter().any(|b| {
                b.as_str()
                    .unwrap()
                    .starts_with(&format!("{} ", t.backend_v4(1)))
            })
        })
        .then_some(())
    });
    eprintln!("down instance out of every host in {:?}", down.elapsed());
    let names = from_guests(&t, 40);
    assert!(
        names
            .iter()
            .all(|n| ["b0", "b2", "b3"].contains(&n.as_str())),
        "{:?}",
        tally(&names)
    );
    for h in held.iter_mut().filter(|h| h.backend != "b1") {
        echo(h);
    }

    // Bad writes after the install: refused, nothing changes.
    let e = refused(
        ns,
        fleet,
        &[
            "service",
            "set",
            "b",
            "--instance",
            &format!("{}:80", t.backend_v4(0)),
        ],
    );
    assert!(e.contains("no VIP"), "{e}");
    let e = refused(ns, fleet, &["install", "--from", "a", "--to", "b"]);
    assert!(e.contains("exists already"), "{e}");
    let e = refused(ns, fleet, &["uninstall", "--from", "a", "--to", "c"]);
    assert!(e.contains("no install"), "{e}");

    // An invalid record written around lbctl: every host keeps its last good
    // state and reports the error; the next good write is applied.
    let bad = etcd::store_put(
        ns,
        std::fs::read_to_string(fleet).unwrap(),
        "/lbtest/services/b",
        "{\"name\": \"b\", \"instances\": []}",
    );
    wait_for(
        "every host reports the bad record",
        Duration::from_secs(10),
        || {
            let hosts = hosts(ns, fleet);
            (0..HOSTS)
                .all(|h| {
                    hosts[&format!("h{h}")]["error"]["revision"] == bad
                        && hosts[&format!("h{h}")]["error"]["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("instances"))
                })
                .then_some(())
        },
    );
    served_by(&t, 10, &["b0", "b2", "b3"]);
    assert!(xdp_on(&t, 0, "g0"));

    // A host agent killed, a change made meanwhile: it catches up on restart.
    t.kill_agent("h1");
    set_b(&t, ns, fleet, &[(0, 200), (2, 100), (3, 100)]);
    let weighted = format!("{} 200", t.backend_v4(0));
    t.restart_agent("h1");
    let restarted = Instant::now();
    wait_for(
        "the restarted host catches up",
        Duration::from_secs(10),
        || {
            hosts(ns, fleet)
                .get("h1")
                .filter(|s| s["error"].is_null() && s["backends"][0] == weighted.as_str())
                .map(|_| ())
        },
    );
    eprintln!("restarted host caught up in {:?}", restarted.elapsed());
    let live = |n: &String| ["b0", "b2", "b3"].contains(&n.as_str());
    let names = from_guests(&t, 20);
    assert!(names.iter().all(live), "{names:?}");

    // etcd gone: the hosts keep forwarding with their last state, not via
    // the LB node.
    etcd.kill();
    let before = lb_vip_packets(&t);
    let names = from_guests(&t, 20);
    assert!(names.iter().all(live), "{names:?}");
    assert_eq!(lb_vip_packets(&t), before);
    // A host agent restarting meanwhile runs the balancer it kept at once.
    t.kill_agent("h1");
    t.restart_agent("h1");
    wait_for(
        "h1's kept balancer answers",
        Duration::from_secs(10),
        || {
            t.lbctl_at(&t.host_balancer_socket(1), &["status", "--json"])
                .status
                .success()
                .then_some(())
        },
    );
    let names = from_guests(&t, 10);
    assert!(names.iter().all(live), "{names:?}");
    assert_eq!(lb_vip_packets(&t), before);
    etcd.restart();

    // Uninstall: the hosts detach, and the guests go through the LB again.
    ok(
        lbctl(ns, fleet, &["uninstall", "--from", "a", "--to", "b"]),
        "uninstall",
    );
    let gone = Instant::now();
    wait_for("every host detaches", Duration::from_secs(30), || {
        (0..HOSTS)
            .all(|h| (0..GUESTS).all(|g| !xdp_on(&t, h, &format!("g{g}"))))
            .then_some(())
    });
    eprintln!("uninstalled from every host in {:?}", gone.elapsed());
    let before = lb_vip_packets(&t);
    let names = from_guests(&t, 10);
    assert!(names.iter().all(live), "{names:?}");
    assert!(
        lb_vip_packets(&t) > before,
        "the LB node carries them again"
    );
    for h in 0..HOSTS {
        let pins =
            Path::new(lb_userspace::datapath::PIN_ROOT).join(t.instance(&format!("h{h}-host")));
        assert!(!pins.exists(), "{} left behind", pins.display());
    }
}

/// Installs and changes with one etcd member of three dead; forwarding with
/// all of them dead.
#[test]
fn installs_survive_etcd_member_loss() {
    let mut t = Topology::new(3);
    t.add_host(0, GUESTS);
    let lb = t.ns("lb");
    let ns = lb.as_str();
    let mut cluster = EtcdCluster::start(ns, LB_V4, 3);
    let fleet = t.write("fleet.toml", &cluster.fleet_section("lbctl", 3));
    let fleet = fleet.as_path();
    t.start(&[100, 100, 100]);
    let a: Vec<String> = (0..GUESTS)
        .flat_map(|g| {
            [
                "--instance".to_string(),
                format!("{}:1,node=h0", t.guest_v4(0, g)),
            ]
        })
        .collect();
    let mut args = vec!["service", "set", "a"];
    args.extend(a.iter().map(String::as_str));
    ok(lbctl(ns, fleet, &args), "service set a");
    set_b(&t, ns, fleet, &[(0, 100), (1, 100), (2, 100)]);
    t.start_host(0, &cluster.fleet_section("h0", 3));

    // The first endpoint every client names is gone.
    cluster.kill(0);
    let killed = Instant::now();
    wait_for(
        "the members left elect a leader",
        Duration::from_secs(20),
        || {
            lbctl(ns, fleet, &["installs", "--json"])
                .status
                .success()
                .then_some(())
        },
    );
    eprintln!(
        "store answering again {:?} after a member was killed",
        killed.elapsed()
    );
    let started = Instant::now();
    ok(
        lbctl(ns, fleet, &["install", "--from", "a", "--to", "b"]),
        "install",
    );
    let rev = install_revision(ns, fleet);
    let h0_ok = |check: &dyn Fn(&Value) -> bool| {
        hosts(ns, fleet).get("h0").is_some_and(|s| {
            s["generation"].as_i64() >= Some(rev) && s["error"].is_null() && check(s)
        })
    };
    wait_for(
        "the host applies the install",
        Duration::from_secs(20),
        || h0_ok(&|s| s["installs"][0] == "a/b").then_some(()),
    );
    eprintln!(
        "install with a member down applied in {:?}",
        started.elapsed()
    );
    let names = from_guests_of(&t, 0, 30);
    assert!(
        names
            .iter()
            .all(|n| ["b0", "b1", "b2"].contains(&n.as_str())),
        "{names:?}"
    );
    set_b(&t, ns, fleet, &[(0, 100), (2, 100)]);
    wait_for(
        "the host applies the change",
        Duration::from_secs(20),
        || h0_ok(&|s| s["backends"].as_array().is_some_and(|b| b.len() == 2)).then_some(()),
    );
    let names = from_guests_of(&t, 0, 20);
    assert!(
        names.iter().all(|n| ["b0", "b2"].contains(&n.as_str())),
        "{names:?}"
    );

    // Every member gone: the host's balancer forwards with its last state.
    let counted = |t: &Topology| -> u64 {
        let out = t.lbctl_at(&t.host_balancer_socket(0), &["status", "--json"]);
        let st: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        st["vips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["counters"]["packets"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    cluster.kill(1);
    cluster.kill(2);
    let before = counted(&t);
    let names = from_guests_of(&t, 0, 20);
    assert!(
        names.iter().all(|n| ["b0", "b2"].contains(&n.as_str())),
        "{names:?}"
    );
    assert!(counted(&t) > before, "the host's balancer carried them");
}

/// `n` connections from each guest of host `h`.
fn from_guests_of(t: &Topology, h: usize, n: usize) -> Vec<String> {
    (0..GUESTS)
        .flat_map(|g| {
            t.from_guest(h, g, move || {
                (0..n)
                    .map(|_| connect_once(vip()).unwrap_or_else(|e| format!("error: {e}")))
                    .collect::<Vec<_>>()
            })
        })
        .collect()
}
