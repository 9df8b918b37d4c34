//! End to end: a rolling maintenance of every backend of a VIP, under
//! continuous client load (short and long-lived TCP connections from the
//! client namespace to real servers in three backend namespaces).
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use lb_tests::topology::*;

/// Failures and successes of the client load, by kind.
#[derive(Default)]
struct Tally {
    short_ok: AtomicUsize,
    long_ok: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

/// A long-lived connection: the backend's name, then `rounds` echoes 100 ms
/// apart, then a clean close.
fn long_connection(vip: SocketAddr, rounds: usize) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut name = String::new();
    reader
        .read_line(&mut name)
        .map_err(|e| format!("greeting: {e}"))?;
    if name.is_empty() {
        return Err("closed before the greeting".into());
    }
    for round in 0..rounds {
        let msg = format!("ping {round}\n");
        writer
            .write_all(msg.as_bytes())
            .map_err(|e| format!("round {round} send: {e}"))?;
        let mut echo = String::new();
        reader
            .read_line(&mut echo)
            .map_err(|e| format!("round {round} echo from {}: {e}", name.trim()))?;
        if echo != msg {
            return Err(format!("round {round}: echo {echo:?} from {}", name.trim()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(name.trim().to_string())
}

/// Waits until the agent has seen every backend of "web" at `load`.
fn wait_for_loads(t: &Topology, load: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let web = maintenance_json(t);
        let seen = web["backends"]
            .as_object()
            .unwrap()
            .values()
            .all(|b| (b["load"].as_f64().unwrap_or(-1.0) - load).abs() < 0.01);
        if seen {
            return;
        }
        assert!(Instant::now() < deadline, "loads not seen: {web}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn maintenance_json(t: &Topology) -> serde_json::Value {
    let out = t.lbctl(&["maintenance", "status", "--json"]);
    assert!(
        out.status.success(),
        "lbctl maintenance status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    all.as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "web")
        .expect("web VIP")
        .clone()
}

/// The capacity rule, recomputed from what the agent reports: demand over
/// backends carrying flows, capacity at the load limit over backends taking
/// new flows.
fn spare_of(web: &serde_json::Value) -> Option<f64> {
    let limit = web["load_limit"].as_f64().unwrap();
    let (mut demand, mut capacity) = (0.0, 0.0);
    for (_, b) in web["backends"].as_object().unwrap() {
        let phase = b["phase"].as_str().unwrap();
        let load = b["load"].as_f64().unwrap_or(0.0);
        // All three backends have weight 100.
        if matches!(phase, "active" | "maintenance-pending" | "draining") {
            demand += load * 100.0;
        }
        if matches!(phase, "active" | "maintenance-pending") {
            capacity += limit * 100.0;
        }
    }
    (capacity > 0.0).then(|| 1.0 - demand / capacity)
}

#[test]
fn a_rollout_under_continuous_load_fails_no_connection() {
    let mut t = Topology::new(3);
    // Closed flows leave the table after 1 s, so drains end soon after the
    // last connection closes.
    t.start_with(&[100, 100, 100], |c| {
        c.replace(
            "collect_interval_ms = 200",
            "collect_interval_ms = 200\nclosed_timeout_s = 1",
        )
    });
    for i in 0..3 {
        t.set_load(i, 0.3);
    }
    wait_for_loads(&t, 0.3);

    // Continuous load: two threads of short connections, three of long ones.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let vip = SocketAddr::new(VIP_V4.parse().unwrap(), 80);
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (stop, tally) = (stop.clone(), tally.clone());
        clients.push(in_netns(&t.ns("cl"), move || {
            while !stop.load(Ordering::Relaxed) {
                match connect_once(vip) {
                    Ok(_) => {
                        tally.short_ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.failures.lock().unwrap().push(format!("short: {e}")),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
    }
    for _ in 0..3 {
        let (stop, tally) = (stop.clone(), tally.clone());
        clients.push(in_netns(&t.ns("cl"), move || {
            while !stop.load(Ordering::Relaxed) {
                match long_connection(vip, 15) {
                    Ok(_) => {
                        tally.long_ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.failures.lock().unwrap().push(format!("long: {e}")),
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(1));

    // Started with --wait: lbctl follows it to the end, one line per change
    // (its output is not a terminal).
    let waiting = std::process::Command::new(bin("lbctl"))
        .arg("--socket")
        .arg(t.lb_socket())
        .args(["maintenance", "rollout", "web", "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lbctl");
    let deadline = Instant::now() + Duration::from_secs(10);
    while maintenance_json(&t)["rollout"].is_null() {
        assert!(Instant::now() < deadline, "the rollout did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A second rollout while one runs is refused.
    let again = t.lbctl(&["maintenance", "rollout", "web"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    // Watch it: capacity, how many are out at once, the phases each went through.
    let started = Instant::now();
    let mut phases: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut most_out = 0;
    let mut held_for_capacity = false;
    let mut lowest_spare = f64::MAX;
    let last = loop {
        let web = maintenance_json(&t);
        let min_spare = web["min_spare"].as_f64().unwrap();
        if let Some(spare) = spare_of(&web) {
            lowest_spare = lowest_spare.min(spare);
            assert!(
                spare >= min_spare - 1e-9,
                "spare capacity {spare} under {min_spare}: {web:#}"
            );
        } else {
            panic!("no backend taking new flows: {web:#}");
        }
        let mut out = 0;
        for (a, b) in web["backends"].as_object().unwrap() {
            let phase = b["phase"].as_str().unwrap().to_string();
            if !matches!(phase.as_str(), "active" | "maintenance-pending") {
                out += 1;
            }
            assert_ne!(phase, "hook-failed", "{web:#}");
            phases.entry(a.clone()).or_default().insert(phase);
        }
        most_out = most_out.max(out);
        held_for_capacity |= web["held"]
            .as_str()
            .is_some_and(|h| h.contains("spare capacity"));
        if web["rollout"]["finished_ms"].is_u64() {
            break web;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "rollout not done after 90 s: {web:#}\n{}",
            t.log("lb")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = started.elapsed();
    // Load keeps running on the upgraded pool for a moment.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }

    let failures = tally.failures.lock().unwrap().clone();
    let (short_ok, long_ok) = (
        tally.short_ok.load(Ordering::Relaxed),
        tally.long_ok.load(Ordering::Relaxed),
    );
    eprintln!(
        "rollout took {took:?}: {short_ok} short and {long_ok} long connections succeeded, {} failed; at most {most_out} backend(s) out at once; lowest spare capacity {lowest_spare:.3}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} connections failed during the rollout: {failures:?}",
        failures.len()
    );
    assert!(
        short_ok > 100 && long_ok > 10,
        "{short_ok} short, {long_ok} long"
    );

    let waited = waiting.wait_with_output().expect("lbctl --wait");
    let said = String::from_utf8_lossy(&waited.stdout);
    assert!(
        waited.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&waited.stderr)
    );
    assert!(said.contains("rollout of web: 0/3 backends done"), "{said}");
    assert!(said.contains("draining"), "{said}");
    assert!(
        said.contains("rollout of web complete: 3/3 backends up to date"),
        "{said}"
    );
    assert!(
        !said.contains('\x1b'),
        "no terminal codes when piped: {said}"
    );

    // Every backend's hook ran exactly once, with its address and VIP.
    let mut runs = t.hook_runs();
    runs.sort();
    let mut expected: Vec<String> = (0..3).map(|i| format!("web {} 1", backend_v4(i))).collect();
    expected.sort();
    assert_eq!(runs, expected);

    // Each backend drained and went in maintenance; all are back, up to date.
    for (a, seen) in &phases {
        assert!(seen.contains("draining"), "{a} never drained: {seen:?}");
    }
    for (a, b) in last["backends"].as_object().unwrap() {
        assert_eq!(b["phase"], "active", "{a}");
        assert_eq!(b["generation"], 1, "{a}");
        assert_eq!(b["hook_runs"], 1, "{a}");
        assert_eq!(b["flows_cut"], 0, "{a}: no drain timed out");
    }
    let agent_lowest = last["rollout"]["min_spare_seen"].as_f64().unwrap();
    assert!(agent_lowest >= 0.2, "agent saw spare {agent_lowest}");
    // Loads of 0.3 on three backends of weight 100 leave room for one out at
    // a time while another drains (spare 1 − 60/160 with one out); a second
    // must wait while two still carry flows: the capacity rule did bind.
    assert!(
        held_for_capacity,
        "no pending backend was ever held back by capacity"
    );
    assert!(most_out <= 2, "max_parallel = 2, saw {most_out} out");

    // The status shows state, load, weight and flows per backend.
    let status = t.status_json();
    let web = status["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "web")
        .unwrap()
        .clone();
    for b in web["backends"].as_array().unwrap() {
        assert_eq!(b["state"], "active");
        assert_eq!(b["up_to_date"], true);
        assert!((b["load"].as_f64().unwrap() - 0.3).abs() < 0.01);
    }
}

#[test]
fn maintenance_commands_refuse_bad_input_and_a_restart_resumes() {
    let mut t = Topology::new(3);
    t.start(&[100, 100, 100]);
    let b0 = backend_v4(0);
    for (args, expect) in [
        (vec!["backend", "maintain", "nope", &b0], "no VIP named"),
        (
            vec!["backend", "maintain", "web", "198.18.9.9"],
            "not a backend of web",
        ),
        (vec!["backend", "return", "web", &b0], "is active"),
        (vec!["maintenance", "cancel", "web"], "no rollout running"),
        (vec!["maintenance", "rollout", "nope"], "no VIP named"),
    ] {
        let out = t.lbctl(&args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    let out = t.lbctl(&["backend", "maintain", "web", "not-an-address"]);
    assert!(!out.status.success());

    // A held rollout: make the pool too loaded for any backend to drain.
    for i in 0..3 {
        t.set_load(i, 0.7);
    }
    wait_for_loads(&t, 0.7);
    let out = t.lbctl(&["maintenance", "rollout", "web"]);
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(800));
    let web = maintenance_json(&t);
    for (a, b) in web["backends"].as_object().unwrap() {
        assert_eq!(b["phase"], "maintenance-pending", "{a}: {web:#}");
    }
    assert!(
        web["held"].as_str().unwrap().contains("spare capacity"),
        "{web:#}"
    );
    let text = t.lbctl(&["maintenance", "status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("waiting: spare capacity"), "{text}");

    // The agent restarts mid-rollout: the rollout is still there, held (by
    // capacity once the loads are reported again) and, once the load allows,
    // completes.
    t.stop_lb();
    t.start_lb();
    let web = maintenance_json(&t);
    assert_eq!(web["generation"], 1, "{web:#}");
    assert!(web["rollout"]["finished_ms"].is_null(), "{web:#}");
    wait_for_loads(&t, 0.7);
    std::thread::sleep(Duration::from_millis(500));
    let web = maintenance_json(&t);
    for (a, b) in web["backends"].as_object().unwrap() {
        assert_eq!(b["phase"], "maintenance-pending", "{a}: {web:#}");
    }
    for i in 0..3 {
        t.set_load(i, 0.1);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let web = maintenance_json(&t);
        if web["rollout"]["finished_ms"].is_u64() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not resumed: {web:#}\n{}",
            t.log("lb")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(t.hook_runs().len(), 3, "{:?}", t.hook_runs());
    // All connections work after it.
    let results: Vec<_> = t.from_client(|| {
        (0..60)
            .map(|_| connect_once(SocketAddr::new(VIP_V4.parse().unwrap(), 80)))
            .collect()
    });
    assert!(results.iter().all(Result::is_ok));
}

#[test]
fn a_failing_hook_keeps_its_backend_out_and_halts_the_rollout() {
    let mut t = Topology::new(3);
    let failing = backend_v4(1);
    let log = t.dir.join("hooks.log");
    let script = t.write(
        "failing-hook.sh",
        &format!(
            "echo \"$LB_VIP_NAME $LB_BACKEND $LB_GENERATION\" >> {}\n\
             if [ \"$LB_BACKEND\" = \"{failing}\" ]; then echo \"upgrade of $LB_BACKEND failed: package conflict\" >&2; exit 3; fi\n",
            log.display()
        ),
    );
    let default_hook = t.dir.join("hook.sh").display().to_string();
    t.start_with(&[100, 100, 100], |c| {
        c.replace(
            "collect_interval_ms = 200",
            "collect_interval_ms = 200\nclosed_timeout_s = 1",
        )
        .replace("max_parallel = 2", "max_parallel = 1")
        .replace(&default_hook, &script.display().to_string())
    });
    wait_for_loads(&t, 0.0);
    // lbctl --wait follows the rollout until the hook fails, then exits
    // non-zero saying what to do.
    let out = t.lbctl(&["maintenance", "rollout", "web", "--wait"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("the maintenance hook of {failing} failed"))
            && err.contains("package conflict")
            && err.contains(&format!("lbctl backend maintain web {failing}"))
            && err.contains("lbctl maintenance cancel web"),
        "{err}"
    );
    let web = maintenance_json(&t);
    assert_eq!(web["backends"][&failing]["phase"], "hook-failed", "{web:#}");
    let error = web["backends"][&failing]["last_error"].as_str().unwrap();
    assert!(
        error.contains("exit status: 3") && error.contains("package conflict"),
        "{error}"
    );
    // The rollout halts: the last backend stays pending; the failed one gets
    // no traffic, and every connection still succeeds.
    std::thread::sleep(Duration::from_secs(1));
    let web = maintenance_json(&t);
    assert_eq!(
        web["backends"][backend_v4(2)]["phase"],
        "maintenance-pending"
    );
    assert!(web["held"].as_str().unwrap().contains("halted"), "{web:#}");
    let names: Vec<String> = t.from_client(|| {
        (0..60)
            .map(|_| {
                connect_once(SocketAddr::new(VIP_V4.parse().unwrap(), 80)).expect("connection")
            })
            .collect()
    });
    assert!(!names.contains(&"b1".to_string()), "{names:?}");
    let text = String::from_utf8_lossy(&t.lbctl(&["maintenance", "status"]).stdout).into_owned();
    assert!(
        text.contains("hook-failed") && text.contains("package conflict"),
        "{text}"
    );

    // The operator returns it (the upgrade was finished by hand): it comes
    // back once healthy and the rollout goes on to the end.
    let out = t.lbctl(&["backend", "return", "web", &failing]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let web = maintenance_json(&t);
        if web["rollout"]["finished_ms"].is_u64() {
            break;
        }
        assert!(Instant::now() < deadline, "rollout stuck: {web:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut runs = t.hook_runs();
    runs.sort();
    assert_eq!(runs.len(), 3, "{runs:?}");
}
