//! The control plane: `lbctl apply` of 1,000 VIPs x 10 backends to a real
//! agent, and the agent's memory at that size.
use super::*;
use std::{path::Path, process::Output};

/// 1,000 VIPs of 10 backends each, out of 100. With `distinct`, every VIP's
/// weights differ from every other's, so no two share a table; without,
/// VIPs i and i + 100 have the same pool (one build for both).
fn big_config(instance: &str, socket: &str, weight: u32, distinct: bool) -> String {
    let mut s = format!(
        "instance = \"{instance}\"\nsocket = \"{socket}\"\n[datapath]\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nmaglev_table_size = 65537\nmax_vips = 1000\nmax_backends = 256\nflow_table_size = 65536\n[lifecycle]\nstate_file = \"{socket}.lifecycle.json\"\n[encap]\nsource_v4 = \"198.18.200.0/24\"\n"
    );
    for i in 0..1000u32 {
        let backends: Vec<String> = (0..10u32)
            .map(|j| {
                format!(
                    "{{ address = \"198.18.0.{}\", weight = {} }}",
                    11 + (i + j * 7) % 100,
                    weight + j + if distinct { i } else { 0 }
                )
            })
            .collect();
        s += &format!(
            "[[vips]]\naddress = \"198.18.{}.{}\"\nport = 80\nprotocol = \"tcp\"\nbackends = [{}]\n",
            20 + i / 250,
            1 + i % 250,
            backends.join(", ")
        );
    }
    s
}

/// The namespaces, the agent and the work directory, removed on drop.
struct Guard(Vec<String>, PathBuf, Option<std::process::Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.2.as_mut() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
            // The agent leaves its datapath pinned: remove it.
            topology::cleanup_agent(&self.1.join("initial.toml"));
        }
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// The LB's namespace `ns` and a peer, joined by a veth; the 100 backends
/// are neighbours with known MACs, so resolution is instant.
fn namespaces(ns: &str, peer: &str) {
    for n in [ns, peer] {
        topology::must(&["ip", "netns", "add", n]);
    }
    topology::must(&[
        "ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
        peer,
    ]);
    topology::must(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        "198.18.0.2/24",
        "dev",
        "eth0",
    ]);
    topology::must(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
    topology::must(&["ip", "-n", peer, "link", "set", "eth0", "up"]);
    for b in 0..100u32 {
        topology::must(&[
            "ip",
            "-n",
            ns,
            "neigh",
            "add",
            &format!("198.18.0.{}", 11 + b),
            "lladdr",
            &format!("02:00:00:00:01:{:02x}", b),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
    }
}

/// Starts the agent in `ns` with the first VIP of the big configuration;
/// returns once it answers.
fn start_agent(
    guard: &mut Guard,
    ns: &str,
    id: &str,
    socket: &Path,
    lbctl: &dyn Fn(&[&str]) -> Output,
) {
    let dir = guard.1.clone();
    let initial = dir.join("initial.toml");
    let small = big_config(id, &socket.display().to_string(), 100, false);
    let first_vip_end = small
        .match_indices("[[vips]]")
        .nth(1)
        .map(|(i, _)| i)
        .expect("two vips");
    std::fs::write(&initial, &small[..first_vip_end]).expect("write");
    let log = std::fs::File::create(dir.join("agent.log")).expect("log");
    let child = topology::agent_command(ns)
        .arg("--config")
        .arg(&initial)
        .stderr(log)
        .spawn()
        .expect("agent");
    guard.2 = Some(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lbctl(&["status", "--json"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "agent did not start: {}",
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ROUNDS` applies of each configuration (pools shared, pools distinct),
/// each round with other weights, so that all 1,000 VIPs are rebuilt and
/// rewritten: the median time of each.
fn apply_times(dir: &Path, id: &str, socket: &Path, lbctl: &dyn Fn(&[&str]) -> Output) -> [f64; 2] {
    let mut times = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS as u32 {
        for (distinct, times) in [false, true].into_iter().zip(times.iter_mut()) {
            let path = dir.join(format!("big{round}-{distinct}.toml"));
            let config = big_config(
                id,
                &socket.display().to_string(),
                100 + round * 10,
                distinct,
            );
            std::fs::write(&path, config).expect("write");
            let t = Instant::now();
            let out = lbctl(&["apply", "-f", path.to_str().expect("utf-8")]);
            let elapsed = t.elapsed().as_secs_f64();
            assert!(
                out.status.success(),
                "apply failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            times.push(elapsed);
        }
    }
    times.map(median)
}

/// The process's RSS and private (anonymous) memory, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status_text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |field: &str| -> u64 {
        status_text
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (kib("VmRSS:"), kib("RssAnon:"))
}

pub fn control_plane(report: &mut Report) {
    println!("== control plane: lbctl apply of 1,000 VIPs x 10 backends");
    let id = format!("lbb{}", std::process::id());
    let (ns, peer) = (format!("{id}-lb"), format!("{id}-nb"));
    let dir = std::env::temp_dir().join(&id);
    std::fs::create_dir_all(&dir).expect("dir");
    let mut guard = Guard(vec![ns.clone(), peer.clone()], dir.clone(), None);
    namespaces(&ns, &peer);
    let socket = dir.join("lb.sock");
    let lbctl = |args: &[&str]| {
        Command::new(topology::bin("lbctl"))
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .expect("lbctl")
    };
    start_agent(&mut guard, &ns, &id, &socket, &lbctl);
    let pid = guard.2.as_ref().map(|c| c.id()).expect("agent");
    let [shared, distinct] = apply_times(&dir, &id, &socket, &lbctl);
    let status: Value =
        serde_json::from_slice(&lbctl(&["status", "--json"]).stdout).expect("status");
    let vips = status["vips"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(vips, 1000, "the datapath does not hold 1000 VIPs");
    let (rss_kib, anon_kib) = memory_kib(pid);
    report.row(
        "control plane",
        "lbctl apply, 1,000 VIPs × 10 backends (all changed)",
        format!("{shared:.3} s"),
        "100 pools, each shared by 10 VIPs",
        "≤ 1 s",
        Some(shared <= 1.0),
    );
    report.row(
        "control plane",
        "lbctl apply, 1,000 VIPs × 10 backends, every pool its own",
        format!("{distinct:.3} s"),
        "1,000 tables built",
        "≤ 1 s",
        Some(distinct <= 1.0),
    );
    report.row(
        "control plane",
        "agent private memory (RssAnon) at that size",
        format!("{:.0} MiB", anon_kib as f64 / 1024.0),
        format!("RSS {:.0} MiB incl. mapped rings", rss_kib as f64 / 1024.0),
        "",
        None,
    );
    for (key, value) in [
        ("control.agent_rss_anon_kib", json!(anon_kib)),
        ("control.apply_1000_vips_s", json!(shared)),
        ("control.apply_1000_distinct_pools_s", json!(distinct)),
        ("control.agent_rss_kib", json!(rss_kib)),
    ] {
        report.json.insert(key.into(), value);
    }
    drop(guard);
}
