//! End to end: a fleet kept in a real etcd (TLS with client certificates).
//! Agents register under a lease; a killed one disappears when the lease runs
//! out, a stopped one at once. The LB agent applies the store's VIP document,
//! refuses an invalid one and keeps forwarding with its last state while etcd
//! is down, then applies the next change once it has reconnected; one started
//! while etcd is down joins later. `lbctl` refuses bad writes before they
//! reach the store, and the service registry round-trips.
use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use lb_tests::{
    etcd::{self, Etcd},
    topology::*,
};
use serde_json::{json, Value};

/// `lbctl --fleet FLEET ARGS`, in network namespace `ns` when given.
fn lbctl(ns: Option<&str>, fleet: &Path, args: &[&str]) -> Output {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin("lbctl"));
            c
        }
        None => Command::new(bin("lbctl")),
    };
    cmd.arg("--fleet")
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

fn json_of(ns: Option<&str>, fleet: &Path, args: &[&str]) -> Value {
    let text = ok(lbctl(ns, fleet, args), &args.join(" "));
    serde_json::from_str(&text).expect("JSON")
}

/// Calls `f` until it returns something, for up to `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn node(ns: Option<&str>, fleet: &Path, name: &str) -> Option<Value> {
    let nodes = json_of(ns, fleet, &["fleet", "nodes", "--json"]);
    nodes
        .as_array()
        .expect("a list")
        .iter()
        .find(|n| n["node"] == name)
        .cloned()
}

fn vips_revision(ns: Option<&str>, fleet: &Path) -> Option<i64> {
    json_of(ns, fleet, &["fleet", "vips", "show", "--json"])["revision"].as_i64()
}

/// A VIP document: the TCP VIP on port 80, served by backend `i` only.
fn vip_doc(t: &Topology, i: usize) -> String {
    format!(
        "[[vips]]\nname = \"web\"\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\nbackends = [{{ address = \"{}\", weight = 10 }}]\n",
        t.backend_v4(i)
    )
}

const BAD_DOC: &str =
    "[[vips]]\nname = \"web\"\naddress = \"198.18.10.1\"\nport = 70000\nprotocol = \"tcp\"\nbackends = [{ address = \"198.18.0.11\" }]\n";

/// `n` connections to the VIP answered by `backend`.
fn all_from(t: &Topology, backend: &str, n: usize) {
    let vip = SocketAddr::new(VIP_V4.parse().unwrap(), 80);
    let names: Vec<String> = t.from_client(move || {
        (0..n)
            .map(|_| connect_once(vip).unwrap_or_else(|e| format!("error: {e}")))
            .collect()
    });
    assert!(
        names.iter().all(|n| n == backend),
        "expected every connection on {backend}: {names:?}\n{}",
        t.log("lb")
    );
}

#[test]
fn balancer_follows_the_store() {
    let mut t = Topology::new(3);
    let lb_ns = t.ns("lb");
    let ns = Some(lb_ns.as_str());
    // Declared after the topology, so it is killed before the namespaces go.
    // On the LB's loopback for the LB agent and lbctl, on its segment
    // address for the backends' agents.
    let mut etcd = Etcd::start_at(ns, Some(LB_V4));
    let fleet_text = etcd.fleet_section("lbctl", 3);
    let fleet = t.write("fleet.toml", &fleet_text);
    let section = etcd.fleet_section("lb-1", 3);
    t.start_edited(
        &[100, 100, 100],
        |c| format!("{c}\n{section}"),
        |i, c| format!("{c}\n{}", etcd.fleet_section_at(LB_V4, &format!("b{i}"), 3)),
    );

    // Registered and reporting: the record is written before the first
    // status report, so wait for the report, not only the record.
    let n = wait_for(
        "the LB agent is registered and has reported its status",
        Duration::from_secs(15),
        || node(ns, &fleet, "lb-1").filter(|n| !n["status"].is_null()),
    );
    for i in 0..3 {
        let b = wait_for(
            "the backends are registered",
            Duration::from_secs(15),
            || node(ns, &fleet, &format!("b{i}")),
        );
        assert_eq!(b["roles"], json!(["backend"]));
        assert_eq!(b["addresses"], json!([t.backend_v4(i), t.backend_v6(i)]));
        assert_eq!(b["status"], Value::Null, "a backend applies no VIPs: {b}");
    }
    // Its VIPs are the store's to change, not `lbctl apply`'s.
    let out = t.lbctl(&["apply", "-f", t.dir.join("lb.toml").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fleet store"));
    assert_eq!(n["roles"], json!(["lb"]));
    assert!(n["pid"].as_u64().is_some_and(|p| p > 0), "{n}");
    // The file's four VIPs serve until the store has a document.
    assert_eq!(n["status"]["generation"], Value::Null, "{n}");
    assert_eq!(n["status"]["vips"].as_array().map(Vec::len), Some(4), "{n}");
    assert_eq!(n["addresses"], json!([VIP_V4, VIP_V6, VIP_V4_TO_V6]));

    // A document through lbctl: applied, and reported with its revision.
    let doc = t.write("vips-b0.toml", &vip_doc(&t, 0));
    ok(
        lbctl(
            ns,
            &fleet,
            &["fleet", "vips", "set", "-f", doc.to_str().unwrap()],
        ),
        "fleet vips set",
    );
    let rev1 = vips_revision(ns, &fleet).expect("a VIP document");
    let applied = Instant::now();
    wait_for(
        "the LB reports the document applied",
        Duration::from_secs(10),
        || node(ns, &fleet, "lb-1").filter(|n| n["status"]["generation"] == rev1),
    );
    eprintln!("document applied and reported in {:?}", applied.elapsed());
    let n = node(ns, &fleet, "lb-1").unwrap();
    assert_eq!(n["status"]["vips"], json!(["web"]));
    assert_eq!(n["addresses"], json!([VIP_V4]));
    assert_eq!(n["status"]["error"], Value::Null);
    all_from(&t, "b0", 10);

    // An invalid document written around lbctl: refused, the VIPs stay.
    let bad_rev = etcd::store_put(&lb_ns, fleet_text.clone(), "/lbtest/vips", BAD_DOC);
    let n = wait_for(
        "the LB reports the bad document",
        Duration::from_secs(10),
        || node(ns, &fleet, "lb-1").filter(|n| n["status"]["error"]["revision"] == bad_rev),
    );
    let message = n["status"]["error"]["message"].as_str().unwrap();
    assert!(message.contains("vips[0].port"), "{message}");
    assert_eq!(n["status"]["generation"], rev1);
    all_from(&t, "b0", 10);
    let text = ok(lbctl(ns, &fleet, &["fleet", "nodes"]), "fleet nodes");
    assert!(
        text.contains("lb-1") && text.contains("vips[0].port"),
        "{text}"
    );

    // etcd down: forwarding goes on with the last state.
    etcd.kill();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(4) {
        all_from(&t, "b0", 5);
    }
    assert!(t.status_json()["vips"]
        .as_array()
        .is_some_and(|v| v.len() == 1));
    // Back up: the agent reconnects and applies the next change.
    etcd.restart();
    let doc = t.write("vips-b1.toml", &vip_doc(&t, 1));
    ok(
        lbctl(
            ns,
            &fleet,
            &["fleet", "vips", "set", "-f", doc.to_str().unwrap()],
        ),
        "fleet vips set after the restart",
    );
    let rev2 = vips_revision(ns, &fleet).expect("a VIP document");
    let back = Instant::now();
    wait_for(
        "the LB applies the change after reconnecting",
        Duration::from_secs(30),
        || node(ns, &fleet, "lb-1").filter(|n| n["status"]["generation"] == rev2),
    );
    eprintln!(
        "after etcd restarted: change applied in {:?}",
        back.elapsed()
    );
    all_from(&t, "b1", 10);
    // Several failed attempts, one warning (one per minute at most).
    let warnings = t.log("lb").matches("fleet store:").count();
    assert_eq!(warnings, 1, "{}", t.log("lb"));

    // A clean stop revokes the lease: the records go at once. A new agent
    // takes the document from the store.
    t.stop_lb();
    let stopped = Instant::now();
    wait_for("the stopped agent leaves", Duration::from_secs(2), || {
        node(ns, &fleet, "lb-1").is_none().then_some(())
    });
    eprintln!("registration gone {:?} after SIGTERM", stopped.elapsed());
    t.start_lb();
    wait_for(
        "the new agent applies the document",
        Duration::from_secs(10),
        || node(ns, &fleet, "lb-1").filter(|n| n["status"]["generation"] == rev2),
    );
    all_from(&t, "b1", 10);

    // A dead agent disappears when its lease runs out (TTL 3 s).
    t.kill_lb();
    let killed = Instant::now();
    wait_for(
        "the killed agent's registration expires",
        Duration::from_secs(15),
        || node(ns, &fleet, "lb-1").is_none().then_some(()),
    );
    eprintln!("registration gone {:?} after the kill", killed.elapsed());
    let nodes = json_of(ns, &fleet, &["fleet", "nodes", "--json"]);
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node"].as_str())
        .collect();
    assert_eq!(names, ["b0", "b1", "b2"]);

    // An agent started while etcd is down serves the VIPs it last applied
    // from the store (not its file's), joins once etcd is back and reports.
    etcd.kill();
    t.start_lb();
    all_from(&t, "b1", 10);
    std::thread::sleep(Duration::from_secs(2));
    etcd.restart();
    wait_for(
        "the agent started without etcd joins",
        Duration::from_secs(20),
        || node(ns, &fleet, "lb-1").filter(|n| n["status"]["generation"] == rev2),
    );
    all_from(&t, "b1", 10);
}

#[test]
fn lbctl_checks_writes_and_the_registry_round_trips() {
    let etcd = Etcd::start(None);
    let dir = etcd.dir.clone();
    let fleet = dir.join("fleet.toml");
    std::fs::write(&fleet, etcd.fleet_section("lbctl", 10)).unwrap();
    let fleet = fleet.as_path();

    // A bad VIP document is refused with the field named; nothing is written.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, BAD_DOC).unwrap();
    let out = lbctl(
        None,
        fleet,
        &["fleet", "vips", "set", "-f", bad.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vips[0].port") && err.contains("70000"),
        "{err}"
    );
    let unknown = dir.join("unknown.toml");
    std::fs::write(&unknown, "[[vips]]\naddres = \"198.18.10.1\"\n").unwrap();
    let out = lbctl(
        None,
        fleet,
        &["fleet", "vips", "set", "-f", unknown.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("addres"), "{err}");
    assert_eq!(vips_revision(None, fleet), None);

    // A bad service is refused; nothing is written.
    let cases: [(&[&str], &str); 3] = [
        (
            &["web", "--instance", "198.18.0.11:80,weight=70000"],
            "instances[0].weight",
        ),
        (&["web", "--instance", "198.18.0.11"], "instance[0].address"),
        (&["bad/name", "--instance", "198.18.0.11:80"], "service"),
    ];
    for (args, field) in cases {
        let mut all = vec!["service", "set"];
        all.extend_from_slice(args);
        let out = lbctl(None, fleet, &all);
        assert!(!out.status.success(), "{all:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{all:?}: {err}");
    }
    assert_eq!(
        json_of(None, fleet, &["service", "show", "--json"]),
        json!([])
    );

    // Round trip.
    ok(
        lbctl(
            None,
            fleet,
            &[
                "service",
                "set",
                "web",
                "--instance",
                "198.18.0.11:80,weight=5,node=b0",
                "--instance",
                "[fd00::12]:80",
                "--vip",
                "198.18.10.1:80/tcp",
            ],
        ),
        "service set",
    );
    ok(
        lbctl(
            None,
            fleet,
            &["service", "set", "dns", "--instance", "198.18.0.13:53"],
        ),
        "service set",
    );
    let web = json!({"name": "web", "instances": [
        {"address": "198.18.0.11:80", "weight": 5, "node": "b0"},
        {"address": "[fd00::12]:80", "weight": 100, "node": null},
    ], "vips": [{"address": "198.18.10.1", "port": 80, "protocol": "tcp"}]});
    assert_eq!(
        json_of(None, fleet, &["service", "show", "web", "--json"]),
        json!([web])
    );
    let all = json_of(None, fleet, &["service", "show", "--json"]);
    assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");
    let text = ok(
        lbctl(None, fleet, &["service", "show", "web"]),
        "service show",
    );
    assert!(
        text.contains("198.18.0.11:80") && text.contains("node b0"),
        "{text}"
    );
    let out = lbctl(None, fleet, &["service", "show", "nope"]);
    assert!(!out.status.success());

    // Without settings, or with a bad [fleet] section, lbctl says why.
    let out = Command::new(bin("lbctl"))
        .args(["fleet", "nodes"])
        .env_remove("LBCTL_FLEET")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fleet FILE"));
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "[fleet]\nendpoints = [\"http://127.0.0.1:1\"]\n").unwrap();
    let out = lbctl(None, &broken, &["fleet", "nodes"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("fleet.endpoints[0]"),
        "{err}"
    );
}
