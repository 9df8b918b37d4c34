//! Live forwarding over veth: a generator sends real frames at the LB's
//! interface (`BPF_PROG_TEST_RUN` in live-frames mode, which is what
//! xdp-trafficgen does; xdp-trafficgen 1.3.1 itself cannot load on this
//! kernel). `lb_ingress` and then the floor program run on the LB's veth
//! and are measured from the same place: the veth's XDP_TX counter.
use super::*;
use aya::programs::{TestRunAttrs, XdpMode};
use std::path::Path;

const SECONDS: f64 = 3.0;

pub fn forwarding(report: &mut Report) {
    println!("== live forwarding over veth (one queue, {ROUNDS} rounds of {SECONDS} s)");
    match measure() {
        Ok(rows) => {
            for (name, pps, floor, forwarded) in rows {
                report.row(
                    "live",
                    name,
                    format!("{:.2} Mpps", pps / 1e6),
                    format!("{:.2}× floor ({:.2} Mpps)", pps / floor, floor / 1e6),
                    "",
                    None,
                );
                report.json.insert(
                    format!(
                        "live.{}",
                        name.split(',').next().unwrap_or(name).replace(' ', "_")
                    ),
                    json!({ "pps": pps, "floor_pps": floor, "lb_forwarded_counter": forwarded }),
                );
            }
        }
        Err(e) => {
            println!("  live forwarding not measured: {e}");
            report.row("live", "forwarding rate", "not measured", e, "", None);
        }
    }
}

struct Net(Vec<String>, Option<std::process::Child>, PathBuf);
impl Drop for Net {
    fn drop(&mut self) {
        if let Some(c) = self.1.as_mut() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
            topology::cleanup_agent(&self.2);
        }
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn xdp_tx(ns: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-S", "eth0"])
        .output()
        .expect("ethtool");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("rx_queue_0_xdp_tx:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// Sends `frame` out of eth0 of the current namespace for `SECONDS`;
/// returns the wall time it ran.
fn generate(shim: &Shim, frame: &[u8; FRAME_LEN], ifindex: u32) -> f64 {
    let p: &Xdp = shim
        .ebpf
        .program("bench_shim")
        .expect("shim")
        .try_into()
        .expect("XDP");
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let md: [u32; 6] = [0, FRAME_LEN as u32, 0, ifindex, 0, 0];
    let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < SECONDS {
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat: 1 << 20,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..Default::default()
        };
        p.test_run(opts).expect("live BPF_PROG_TEST_RUN");
    }
    start.elapsed().as_secs_f64()
}

type Rows = Vec<(&'static str, f64, f64, u64)>;

/// Two namespaces joined by a veth pair (eth0 in each), addressed, with
/// the backends as permanent neighbours of the LB.
fn veth_pair(gen: &str, lb: &str) {
    for n in [gen, lb] {
        topology::must(&["ip", "netns", "add", n]);
    }
    topology::must(&[
        "ip", "-n", gen, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", lb,
    ]);
    for (n, addr) in [(gen, "198.18.0.1/24"), (lb, "198.18.0.2/24")] {
        topology::must(&["ip", "-n", n, "addr", "add", addr, "dev", "eth0"]);
        topology::must(&["ip", "-n", n, "link", "set", "eth0", "up"]);
    }
    for b in 0..3 {
        topology::must(&[
            "ip",
            "-n",
            lb,
            "neigh",
            "add",
            &format!("198.18.0.{}", 11 + b),
            "lladdr",
            &format!("02:00:00:00:01:{b:02x}"),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
    }
}

/// The MAC address of eth0 in namespace `ns`.
fn mac_of(ns: &str) -> Result<[u8; 6], String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/sys/class/net/eth0/address"])
        .output()
        .map_err(|e| e.to_string())?;
    let mac: Vec<u8> = String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    mac.try_into()
        .map_err(|_| "cannot read the LB's MAC".to_string())
}

/// The generator, in namespace `gen`: for each request (whether to vary
/// the source, an ifindex or 0 for eth0's) it sends `frame` for `SECONDS`
/// and answers with the wall time it ran. A drain program on its eth0
/// takes what the LB sends back (the veth needs an XDP program to run
/// NAPI for it).
fn generator(
    gen: &str,
    frame: [u8; FRAME_LEN],
    requests: std::sync::mpsc::Receiver<(bool, u32)>,
    done: std::sync::mpsc::Sender<f64>,
) -> std::thread::JoinHandle<()> {
    topology::in_netns(gen, move || {
        let mut drain = lb_userspace::datapath::load(&MapSizes::DECAP_ONLY).expect("load");
        let p: &mut Xdp = drain
            .program_mut("lb_decap")
            .expect("lb_decap")
            .try_into()
            .expect("XDP");
        p.load().expect("verifier");
        p.attach("eth0", XdpMode::Driver).expect("attach drain");
        // /sys still shows the namespace it was mounted in; ask the kernel.
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        let mut shim = Shim::load();
        shim.target_own("bench_send");
        while let Ok((vary, idx)) = requests.recv() {
            let vary = vary.then_some((14 + 20, 14 + 12 + 2));
            shim.frame(frame, vary);
            let ifx = if idx == 0 { ifindex } else { idx };
            done.send(generate(&shim, &frame, ifx)).expect("report");
        }
        drop(drain);
    })
}

/// `lbctl --socket SOCKET ARGS`.
fn lbctl(socket: &Path) -> Command {
    let mut c = Command::new(topology::bin("lbctl"));
    c.arg("--socket").arg(socket);
    c
}

/// Starts the agent in namespace `lb` with `config`; returns once it answers.
fn start_agent(
    net: &mut Net,
    lb: &str,
    config: &Path,
    socket: &Path,
    log: &Path,
) -> Result<(), String> {
    let log = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let child = topology::agent_command(lb)
        .arg("--config")
        .arg(config)
        .stderr(log)
        .spawn()
        .map_err(|e| e.to_string())?;
    net.1 = Some(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lbctl(socket)
        .arg("status")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        if Instant::now() > deadline {
            return Err("the LB agent did not start".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Stops the agent. Its XDP link is pinned (it outlives a stopped agent),
/// so it is stopped with its datapath detached and its pins removed.
fn stop_agent(net: &mut Net, socket: &Path) {
    if let Some(mut c) = net.1.take() {
        let detached = lbctl(socket)
            .args(["shutdown", "--detach"])
            .status()
            .is_ok_and(|s| s.success());
        if !detached {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let _ = c.wait();
        topology::cleanup_agent(&net.2);
    }
}

/// Packets the agent counts as forwarded.
fn forwarded(socket: &Path) -> u64 {
    let out = lbctl(socket)
        .args(["status", "--json"])
        .output()
        .expect("lbctl");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["outcomes"]
        .as_array()
        .and_then(|a| a.iter().find(|o| o["outcome"] == "forwarded"))
        .and_then(|o| o["packets"].as_u64())
        .unwrap_or(0)
}

/// `ROUNDS` generator runs: the median rate of XDP_TX on the LB's eth0,
/// and how much `counter` grew over them all.
fn rounds(
    lb: &str,
    requests: &std::sync::mpsc::Sender<(bool, u32)>,
    done: &std::sync::mpsc::Receiver<f64>,
    vary: bool,
    counter: &dyn Fn() -> u64,
) -> (f64, u64) {
    let mut rates = Vec::new();
    let mut counted = 0;
    for _ in 0..ROUNDS {
        let (before, count_before) = (xdp_tx(lb), counter());
        requests.send((vary, 0)).expect("generator");
        let secs = done.recv().expect("generator result");
        std::thread::sleep(Duration::from_millis(50));
        rates.push((xdp_tx(lb) - before) as f64 / secs);
        counted += counter().saturating_sub(count_before);
    }
    (median(rates), counted)
}

/// The floor program on the LB's eth0 (kept attached while the returned
/// shim lives).
fn attach_floor(lb: &str) -> Result<Shim, String> {
    topology::in_netns(lb, || {
        let mut shim = Shim::load();
        let p: &mut Xdp = shim
            .ebpf
            .program_mut("bench_floor")
            .expect("floor")
            .try_into()
            .expect("XDP");
        p.attach("eth0", XdpMode::Driver).expect("attach floor");
        shim
    })
    .join()
    .map_err(|_| "attaching the floor program failed".to_string())
}

fn measure() -> Result<Rows, String> {
    let id = format!("lbl{}", std::process::id());
    let (gen, lb) = (format!("{id}-gen"), format!("{id}-lb"));
    let tmp = |suffix: &str| std::env::temp_dir().join(format!("{id}{suffix}"));
    let (config, socket, state) = (tmp(".toml"), tmp(".sock"), tmp(".lifecycle.json"));
    let mut net = Net(vec![gen.clone(), lb.clone()], None, config.clone());
    veth_pair(&gen, &lb);
    let lb_mac = mac_of(&lb)?;
    // A UDP every-port VIP; the small flow table makes the rotating
    // new-flow mix miss on every packet.
    std::fs::write(&config, format!(
        "instance = \"{id}\"\nsocket = \"{}\"\n[datapath]\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nflow_table_size = 16384\n[lifecycle]\nstate_file = \"{}\"\n[encap]\nsource_v4 = \"198.18.200.0/24\"\n\
         [[vips]]\naddress = \"198.18.10.1\"\nprotocol = \"udp\"\nbackends = [{{ address = \"198.18.0.11\" }}, {{ address = \"198.18.0.12\" }}, {{ address = \"198.18.0.13\" }}]\n",
        socket.display(),
        state.display()
    )).map_err(|e| e.to_string())?;
    let frame = pad(eth(
        lb_mac,
        CLIENT_MAC,
        ETH_IPV4,
        &ipv4(
            Ipv4Addr::new(198, 18, 0, 1),
            V4_VIP,
            PROTO_UDP,
            &udp(5000, 53, b"live"),
        ),
    ));
    let (tx, rx) = std::sync::mpsc::channel::<(bool, u32)>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<f64>();
    let generator = generator(&gen, frame, rx, done_tx);
    start_agent(&mut net, &lb, &config, &socket, &tmp(".log"))?;
    let lb_forwarded = || forwarded(&socket);
    let (est, est_fwd) = rounds(&lb, &tx, &done_rx, false, &lb_forwarded);
    let (new, new_fwd) = rounds(&lb, &tx, &done_rx, true, &lb_forwarded);
    // The floor on the same interface, same generator.
    stop_agent(&mut net, &socket);
    let floor_prog = attach_floor(&lb)?;
    let (floor_est, _) = rounds(&lb, &tx, &done_rx, false, &|| 0);
    let (floor_new, _) = rounds(&lb, &tx, &done_rx, true, &|| 0);
    drop(floor_prog);
    drop(tx);
    let _ = generator.join();
    drop(net);
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&state);
    Ok(vec![
        ("established-flow mix, lb_ingress", est, floor_est, est_fwd),
        (
            "new-flow mix (every packet new), lb_ingress",
            new,
            floor_new,
            new_fwd,
        ),
    ])
}
