//! End to end: bypassed flows in the LB's lifecycle, and across a restart of
//! the intermediary's agent. A bypassed flow still sends a packet toward the
//! LB every 2 s and its closing FIN there, so the LB's connection table
//! keeps it: a drain waits for it. The LB's idle timeout is cut to 5 s here,
//! so a flow the LB stopped hearing from would be forgotten (and the drain
//! declared done) well before the test lets its flows end.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::{bypass::*, topology::*};
use serde_json::Value;

/// How long each drain is held by live bypassed flows: longer than the LB's
/// idle timeout (5 s), so only refreshes keep the flows there.
const HOLD: Duration = Duration::from_secs(9);

fn short_idle(config: String) -> String {
    config.replace(
        "collect_interval_ms = 200",
        "collect_interval_ms = 200\ntcp_idle_timeout_s = 5\nclosed_timeout_s = 2",
    )
}

/// A long-lived connection from the guest: echoes 200 ms apart until `stop`,
/// then a clean close.
struct Long {
    backend: String,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<usize, String>>,
}

fn open_long(t: &Topology) -> Long {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let flag = stop.clone();
    let handle = in_netns(&t.ns("h0g0"), move || {
        let stream = TcpStream::connect_timeout(&vip(), Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut name = String::new();
        reader
            .read_line(&mut name)
            .map_err(|e| format!("greeting: {e}"))?;
        let name = name.trim().to_string();
        tx.send(name.clone()).unwrap();
        let mut rounds = 0;
        while !flag.load(Ordering::Relaxed) {
            let msg = format!("ping {rounds}\n");
            writer
                .write_all(msg.as_bytes())
                .map_err(|e| format!("{name} round {rounds} send: {e}"))?;
            let mut echo = String::new();
            reader
                .read_line(&mut echo)
                .map_err(|e| format!("{name} round {rounds} echo: {e}"))?;
            if echo != msg {
                return Err(format!("{name} round {rounds}: echo {echo:?}"));
            }
            rounds += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(rounds)
    });
    let backend = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the long connection's greeting");
    Long {
        backend,
        stop,
        handle,
    }
}

impl Long {
    fn close(self) {
        self.stop.store(true, Ordering::Relaxed);
        let rounds = self
            .handle
            .join()
            .expect("long connection thread")
            .expect("the long connection lasted");
        assert!(rounds > 10, "{rounds} echo rounds");
    }
}

fn maintenance(t: &Topology) -> Value {
    let out = t.lbctl(&["maintenance", "status", "--json"]);
    assert!(out.status.success());
    let all: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    all.as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "web")
        .expect("web VIP")
        .clone()
}

fn phase(web: &Value, backend: &str) -> String {
    web["backends"][backend]["phase"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

/// New connections from the guest, one after another until `stop`.
struct Churn {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    handle: JoinHandle<()>,
}

fn churn(t: &Topology) -> Churn {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let (flag, count, failed) = (stop.clone(), ok.clone(), failures.clone());
    let handle = in_netns(&t.ns("h0g0"), move || {
        while !flag.load(Ordering::Relaxed) {
            match connect_once(vip()) {
                Ok(_) => count.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    failed.lock().unwrap().push(e.to_string());
                    0
                }
            };
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    Churn {
        stop,
        ok,
        failures,
        handle,
    }
}

#[test]
fn a_rollout_waits_for_bypassed_flows_and_fails_no_connection() {
    let mut t = topology(short_idle);
    start_host(&mut t);
    let addr = |i: usize| t.backend_v4(i);

    // Long-lived bypassed flows to both backends.
    let mut longs: Vec<Long> = Vec::new();
    for _ in 0..30 {
        longs.push(open_long(&t));
        let on = |b: &str| longs.iter().filter(|l| l.backend == b).count();
        if on("b0") >= 2 && on("b1") >= 2 {
            break;
        }
    }
    for b in ["b0", "b1"] {
        assert!(longs.iter().any(|l| l.backend == b), "no long flow on {b}");
    }
    let n = longs.len() as u64;
    wait_for(
        "the long flows are bypassed",
        Duration::from_secs(5),
        || bypass_field(&t, "entries") >= n,
    );

    let churn = churn(&t);
    let out = t.lbctl(&["maintenance", "rollout", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    let mut drained = Vec::new();
    while drained.len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "rollout stuck: {:#}",
            maintenance(&t)
        );
        // The next backend to drain.
        let web = maintenance(&t);
        let Some(i) = (0..2).find(|i| phase(&web, &addr(*i)) == "draining") else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let name = format!("b{i}");
        let since = Instant::now();
        // Its bypassed flows are live: the drain waits, well past the LB's
        // idle timeout.
        let refreshed = bypass_field(&t, "packets_refreshed");
        while since.elapsed() < HOLD {
            let web = maintenance(&t);
            assert_eq!(
                phase(&web, &addr(i)),
                "draining",
                "{name}'s drain ended while its bypassed flows were live: {web:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let live = longs.iter().filter(|l| l.backend == name).count() as u64;
        let web = maintenance(&t);
        assert!(
            web["backends"][addr(i)]["flows"].as_u64().unwrap() >= live,
            "the LB counts {name}'s {live} bypassed flows: {web:#}"
        );
        assert!(bypass_field(&t, "packets_refreshed") > refreshed);
        // Its flows end: the drain completes.
        let (mine, rest): (Vec<Long>, Vec<Long>) =
            longs.into_iter().partition(|l| l.backend == name);
        longs = rest;
        let ended = Instant::now();
        for l in mine {
            l.close();
        }
        let took = wait_for(
            &format!("{name}'s drain completes"),
            Duration::from_secs(15),
            || phase(&maintenance(&t), &addr(i)) != "draining",
        );
        let web = maintenance(&t);
        assert_eq!(
            web["backends"][addr(i)]["flows_cut"],
            0,
            "{name}'s drain did not time out: {web:#}"
        );
        eprintln!(
            "{name}: draining held {:?} by {live} bypassed flows; done {took:?} after they ended ({:?})",
            HOLD,
            ended.elapsed()
        );
        drained.push(i);
    }
    wait_for("the rollout finishes", Duration::from_secs(60), || {
        maintenance(&t)["rollout"]["finished_ms"].is_u64()
    });
    churn.stop.store(true, Ordering::Relaxed);
    churn.handle.join().expect("connections thread");
    let failures = churn.failures.lock().unwrap().clone();
    let ok = churn.ok.load(Ordering::Relaxed);
    eprintln!(
        "rollout with bypass: {ok} new connections, {} failed; both drains waited for their bypassed flows",
        failures.len()
    );
    assert!(ok > 100, "{ok} new connections during the rollout");
    assert!(failures.is_empty(), "failed connections: {failures:?}");
    assert_eq!(t.hook_runs().len(), 2, "{:?}", t.hook_runs());
}

/// The intermediary's agent is killed and started again mid-flow: its
/// bypass entries are pinned, so the flow goes on straight to its backend
/// while no agent runs and after the restart; `lbctl report` on the host
/// lists the flow as bypassed with its packets and bytes per leg.
#[test]
fn a_restarted_intermediary_keeps_its_bypassed_flows() {
    let mut t = topology(|c| c);
    start_host(&mut t);
    let long = open_long(&t);
    wait_for("the long flow is bypassed", Duration::from_secs(5), || {
        bypass_field(&t, "entries") >= 1
    });
    std::thread::sleep(Duration::from_secs(1));
    let report = host_json(&t, &["report"]);
    let flows = report["bypassed_flows"].as_array().expect("bypassed_flows");
    assert_eq!(flows.len(), 1, "{report:#}");
    let f = &flows[0];
    let backend = t.backend_v4(long.backend.trim_start_matches('b').parse().unwrap());
    assert_eq!(f["bypassed"], true);
    assert_eq!(f["backend"], backend.as_str(), "{f:#}");
    assert_eq!(f["vip"], vip().to_string());
    assert!(
        f["client_to_backend"]["packets"].as_u64().unwrap() >= 5,
        "{f:#}"
    );
    assert!(
        f["client_to_backend"]["bytes"].as_u64().unwrap() >= 5 * 60,
        "{f:#}"
    );
    let text = t.lbctl_at(&t.host_socket(0), &["report"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("bypassed flows") && text.contains(&format!("via {backend}: bypassed")),
        "{text}"
    );

    let (lb_before, direct_before) = (lb_packets(&t), bypass_field(&t, "packets_direct"));
    t.kill_agent("h0");
    std::thread::sleep(Duration::from_secs(3));
    t.restart_agent("h0");
    // The entry survived, and the sweep (every second) keeps it.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(bypass_field(&t, "entries"), 1, "{:#}", host_status(&t));
    let direct = bypass_field(&t, "packets_direct") - direct_before;
    let through_lb = lb_packets(&t) - lb_before;
    eprintln!(
        "intermediary restarted mid-flow: {direct} packets straight to the backend, {through_lb} through the LB in the meantime"
    );
    assert!(
        direct >= 30,
        "{direct} packets straight on across the restart"
    );
    assert!(
        through_lb <= 6,
        "{through_lb} packets through the LB across the restart (refreshes only)"
    );
    let after = host_json(&t, &["report"]);
    let f = &after["bypassed_flows"][0];
    assert!(
        f["client_to_backend"]["packets"].as_u64().unwrap()
            >= flows[0]["client_to_backend"]["packets"].as_u64().unwrap() + direct,
        "the entry's counters went on: {f:#}"
    );
    long.close();
    wait_for(
        "the entry ends with the flow",
        Duration::from_secs(3),
        || bypass_field(&t, "entries") == 0,
    );
}
