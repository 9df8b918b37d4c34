//! `cargo xtask demo`: a client, an LB and three backends in network
//! namespaces; real TCP, UDP and IPv6 traffic through the XDP balancer; then
//! `lbctl status`; a rolling maintenance of every backend under client load;
//! `lbctl report`; then everything is removed.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lb_tests::topology::*;

fn main() {
    let weights = [100, 100, 200];
    println!("== building the topology: client, LB and 3 backends on one segment");
    let mut t = Topology::new(3);
    println!(
        "== starting lb_decap agents and servers on the backends, then the LB agent (native XDP)"
    );
    // Closed flows leave the connection table after 1 s (10 s by default),
    // so the drains of the rollout below end quickly.
    t.start_with(&weights, |c| {
        c.replace(
            "collect_interval_ms = 200",
            "collect_interval_ms = 200\nclosed_timeout_s = 1",
        )
    });

    let web: SocketAddr = SocketAddr::new(VIP_V4.parse().unwrap(), 80);
    let dns: SocketAddr = SocketAddr::new(VIP_V4.parse().unwrap(), 53);
    let web6: SocketAddr = SocketAddr::new(VIP_V6.parse().unwrap(), 80);
    let (tcp, udp, tcp6) = t.from_client(move || {
        let tcp: Vec<_> = (0..400).map(|_| connect_once(web)).collect();
        let udp: Vec<_> = (0..50).map(|_| udp_once(dns)).collect();
        let tcp6: Vec<_> = (0..50).map(|_| connect_once(web6)).collect();
        (tcp, udp, tcp6)
    });
    let report = |what: &str, r: &[std::io::Result<String>]| {
        let ok = r.iter().filter(|x| x.is_ok()).count();
        let mut per: std::collections::BTreeMap<String, usize> = Default::default();
        for name in r.iter().flatten() {
            *per.entry(name.clone()).or_default() += 1;
        }
        println!("{what}: {ok}/{} answered, by backend {per:?}", r.len());
        ok == r.len()
    };
    println!("== traffic from the client namespace (weights b0:b1:b2 = 100:100:200)");
    let all_ok = report("TCP  198.18.10.1:80   ", &tcp)
        & report("UDP  198.18.10.1:53   ", &udp)
        & report("TCP  [fd00:10::1]:80  ", &tcp6);

    println!("== lbctl status");
    let out = t.lbctl(&["status"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let rollout_ok = rollout(&t, web);

    // Let the collector (every 200 ms here) see the last packets.
    std::thread::sleep(std::time::Duration::from_millis(500));
    println!("== lbctl report --top 5");
    let report = t.lbctl(&["report", "--top", "5", "--since", "1h"]);
    print!("{}", String::from_utf8_lossy(&report.stdout));
    eprint!("{}", String::from_utf8_lossy(&report.stderr));
    println!("== removing the topology");
    drop(t);
    if !rollout_ok {
        eprintln!("demo: the rollout failed");
        std::process::exit(1);
    }
    if !all_ok || !out.status.success() || !report.status.success() {
        eprintln!("demo: some traffic was not answered");
        std::process::exit(1);
    }
    println!("== done");
}

/// Rolls maintenance over every backend of VIP "web" while a client keeps
/// connecting, printing each change of phase. True when it completed with no
/// failed connection.
fn rollout(t: &Topology, web: SocketAddr) -> bool {
    println!("== rolling maintenance of VIP web under client load");
    println!("   each backend reports load 0.3; load_limit 0.8, min_spare 20%, max_parallel 2");
    for i in 0..3 {
        t.set_load(i, 0.3);
    }
    std::thread::sleep(Duration::from_millis(800));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        in_netns(&t.ns("cl"), move || {
            while !stop.load(Ordering::Relaxed) {
                match connect_once(web) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let out = t.lbctl(&["maintenance", "rollout", "web"]);
    print!(
        "$ lbctl maintenance rollout web\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let started = Instant::now();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut done = false;
    while started.elapsed() < Duration::from_secs(60) {
        let out = t.lbctl(&["maintenance", "status", "--json"]);
        let Ok(all) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            break;
        };
        let Some(v) = all
            .as_array()
            .and_then(|a| a.iter().find(|v| v["name"] == "web"))
        else {
            break;
        };
        let now: BTreeMap<String, String> = v["backends"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(a, b)| (a.clone(), b["phase"].as_str().unwrap_or("?").to_string()))
                    .collect()
            })
            .unwrap_or_default();
        if now != last {
            let line: Vec<String> = now.iter().map(|(a, p)| format!("{a} {p:<19}")).collect();
            let spare = v["spare"]
                .as_f64()
                .map_or("-".into(), |s| format!("{:.0}%", s * 100.0));
            println!(
                "   {:>5.1}s  {}  spare {spare}",
                started.elapsed().as_secs_f64(),
                line.join("  ")
            );
            last = now;
        }
        if v["rollout"]["finished_ms"].is_u64() {
            done = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = client.join();
    let out = t.lbctl(&["maintenance", "status"]);
    print!(
        "$ lbctl maintenance status\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "rollout {} in {:.1}s; client connections during it: {ok} answered, {failed} failed",
        if done { "complete" } else { "NOT complete" },
        started.elapsed().as_secs_f64()
    );
    done && failed == 0
}
