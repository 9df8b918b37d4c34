//! A test network in namespaces: a client, a load balancer and backends on one
//! Ethernet segment (a bridge in a "switch" namespace, joined by veth pairs).
//!
//! The LB runs `lb-agent` with `lb_ingress` in native XDP mode; each backend
//! runs `lb-agent` with `lb_decap`, holds the VIPs on its loopback and answers
//! the client directly (direct server return). Only 198.18.0.0/15 and fd00::/8
//! are used and no namespace has a route out. Dropping the `Topology` stops
//! agents and servers and deletes every namespace, also when a test panics.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub const CLIENT_V4: &str = "198.18.0.1";
pub const CLIENT_V6: &str = "fd00::1";
pub const LB_V4: &str = "198.18.0.2";
pub const LB_V6: &str = "fd00::2";
pub const VIP_V4: &str = "198.18.10.1";
pub const VIP_V6: &str = "fd00:10::1";
/// An IPv4 VIP served by the backends' IPv6 addresses.
pub const VIP_V4_TO_V6: &str = "198.18.10.2";

/// Address of backend `i` on the shared segment (one-armed topology).
pub fn backend_v4(i: usize) -> String {
    format!("198.18.0.{}", 11 + i)
}

pub fn backend_v6(i: usize) -> String {
    format!("fd00::{}", 11 + i)
}

/// Where `lb-agent` and `lbctl` are (set by `cargo xtask`).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("LB_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests through `cargo xtask test`",
        path.display()
    );
    path
}

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Runs a command and panics with its stderr if it fails.
pub fn must(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `lb-agent` to run in network namespace `ns`. Unlike `ip netns exec`,
/// which gives its command a mount namespace of its own (and so a bpffs of
/// its own), the agent stays in this mount namespace: the datapath it pins
/// under /sys/fs/bpf outlives it, as on a host.
pub fn agent_command(ns: &str) -> Command {
    use std::os::unix::process::CommandExt as _;
    let path = format!("/var/run/netns/{ns}");
    let netns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut cmd = Command::new(bin("lb-agent"));
    // SAFETY: setns(2) is async-signal-safe; the fd was opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Runs `f` in a new thread that has entered network namespace `ns`; sockets
/// it creates belong to that namespace.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Deletes namespaces left by test processes that were killed before their
/// guard ran (names are `lbt<pid>x<n>-<role>`).
pub fn remove_stale_namespaces() {
    let out = sh(&["ip", "netns", "list"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name.strip_prefix("lbt").and_then(|r| r.split('x').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh(&["ip", "netns", "del", name]);
        }
    }
    // Their agents' pinned datapaths and locks too.
    for dir in [lb_userspace::datapath::PIN_ROOT, "/run/lb-agent"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("lbt").and_then(|r| r.split('x').next()) else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ =
                    std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
            }
        }
    }
}

/// A backend's TCP and UDP servers; each answers with the backend's name.
/// A load report (`GET /load` on port 8081, `{"load": x}`) says `load`/1000.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    load: Arc<AtomicU32>,
}

impl Servers {
    /// Stops the servers and waits for their threads.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub struct Topology {
    pub id: String,
    pub backends: usize,
    /// The LB has a second interface (eth1) on a backend-only segment and
    /// routes the backends' replies; forwarding leaves through the DevMap.
    pub two_armed: bool,
    pub dir: PathBuf,
    pub(crate) namespaces: Vec<String>,
    pub(crate) agents: Vec<(String, Child)>,
    servers: Vec<Servers>,
    pub(crate) pass_through: Vec<aya::Ebpf>,
}

impl Topology {
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.id)
    }

    /// Backend `i`'s IPv4 address in this topology.
    pub fn backend_v4(&self, i: usize) -> String {
        if self.two_armed {
            format!("198.18.1.{}", 11 + i)
        } else {
            backend_v4(i)
        }
    }

    pub fn backend_v6(&self, i: usize) -> String {
        if self.two_armed {
            format!("fd00:1::{}", 11 + i)
        } else {
            backend_v6(i)
        }
    }

    pub fn lb_socket(&self) -> PathBuf {
        self.dir.join("lb.sock")
    }

    /// Builds the namespaces and links of a one-armed LB; nothing runs yet.
    pub fn new(backends: usize) -> Topology {
        Topology::build(backends, false)
    }

    /// Like `new`, with the backends on a second segment behind the LB.
    pub fn two_armed(backends: usize) -> Topology {
        Topology::build(backends, true)
    }

    /// Like `new`, with every link at `mtu` (the LB's and the backends' too,
    /// so encapsulated full-size packets do not fit).
    pub fn with_mtu(backends: usize, mtu: u32) -> Topology {
        Topology::build_with(backends, false, Some(mtu))
    }

    fn build(backends: usize, two_armed: bool) -> Topology {
        Topology::build_with(backends, two_armed, None)
    }

    fn build_with(backends: usize, two_armed: bool, uniform_mtu: Option<u32>) -> Topology {
        let n = NEXT_ID.fetch_add(1, Ordering::SeqCst);
        remove_stale_namespaces();
        let id = format!("lbt{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(&id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut t = Topology {
            id,
            backends,
            two_armed,
            dir,
            namespaces: Vec::new(),
            agents: Vec::new(),
            servers: Vec::new(),
            pass_through: Vec::new(),
        };
        let sw = t.ns("sw");
        t.add_ns(&sw);
        for br in ["br0", "br1"] {
            must(&["ip", "-n", &sw, "link", "add", br, "type", "bridge"]);
            must(&["ip", "-n", &sw, "link", "set", br, "up"]);
        }
        // (role, switch port, bridge, interface in the host, IPv4, IPv6)
        let mut links: Vec<(String, String, &str, &str, String, String)> = vec![
            (
                "cl".into(),
                "cl".into(),
                "br0",
                "eth0",
                CLIENT_V4.into(),
                CLIENT_V6.into(),
            ),
            (
                "lb".into(),
                "lb".into(),
                "br0",
                "eth0",
                LB_V4.into(),
                LB_V6.into(),
            ),
        ];
        if two_armed {
            links.push((
                "lb".into(),
                "lbb".into(),
                "br1",
                "eth1",
                "198.18.1.1".into(),
                "fd00:1::1".into(),
            ));
        }
        for i in 0..backends {
            let bridge = if two_armed { "br1" } else { "br0" };
            links.push((
                format!("b{i}"),
                format!("b{i}"),
                bridge,
                "eth0",
                t.backend_v4(i),
                t.backend_v6(i),
            ));
        }
        for (role, port, bridge, dev, v4, v6) in &links {
            let ns = t.ns(role);
            if !t.namespaces.contains(&ns) {
                t.add_ns(&ns);
                must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
                for s in [
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ] {
                    must(&["ip", "netns", "exec", &ns, "sysctl", "-qw", s]);
                }
            }
            // The client keeps the usual 1500; the rest of the network carries
            // encapsulated frames, up to 40 bytes longer (unless a test wants
            // every link alike).
            let (port_mtu, mtu) = match uniform_mtu {
                Some(m) => (m.to_string(), m.to_string()),
                None if role == "cl" => ("1600".into(), "1500".into()),
                None => ("1600".into(), "1600".into()),
            };
            must(&[
                "ip", "-n", &sw, "link", "add", port, "mtu", &port_mtu, "type", "veth", "peer",
                "name", dev, "netns", &ns,
            ]);
            must(&["ip", "-n", &sw, "link", "set", port, "master", bridge, "up"]);
            must(&["ip", "-n", &ns, "link", "set", dev, "mtu", &mtu, "up"]);
            // veth would leave TCP/UDP checksums to a "device" that never
            // computes them; real NICs do. Compute them in software.
            must(&[
                "ip", "netns", "exec", &ns, "ethtool", "-K", dev, "tx", "off", "tso", "off", "gso",
                "off",
            ]);
            must(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                dev,
            ]);
            must(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            must(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{dev}.rp_filter=0"),
            ]);
        }
        if two_armed {
            // The LB routes the backends' direct replies to the client.
            let lb = t.ns("lb");
            for s in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
                must(&["ip", "netns", "exec", &lb, "sysctl", "-qw", s]);
            }
            for i in 0..backends {
                let ns = t.ns(&format!("b{i}"));
                must(&[
                    "ip",
                    "-n",
                    &ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    "198.18.1.1",
                ]);
                must(&[
                    "ip",
                    "-n",
                    &ns,
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    "fd00:1::1",
                ]);
            }
        }
        // On veth, frames the LB sends with XDP_TX land in the peer's ring, and
        // on this kernel NAPI is kicked for them only when the peer itself runs
        // an XDP program (GRO alone leaves them waiting for the next ordinary
        // packet). A physical NIC has no such peer. The switch port facing the
        // LB therefore runs lb_decap, which passes everything not addressed to
        // its (here: no) addresses.
        t.pass_through.push(attach_pass_through(&sw, "lb"));
        if two_armed {
            t.pass_through.push(attach_pass_through(&sw, "lbb"));
        }
        let cl = t.ns("cl");
        must(&[
            "ip",
            "-n",
            &cl,
            "route",
            "add",
            "198.18.10.0/24",
            "via",
            LB_V4,
        ]);
        must(&[
            "ip",
            "-n",
            &cl,
            "-6",
            "route",
            "add",
            "fd00:10::/64",
            "via",
            LB_V6,
        ]);
        for i in 0..backends {
            let ns = t.ns(&format!("b{i}"));
            for vip in [
                format!("{VIP_V4}/32"),
                format!("{VIP_V4_TO_V6}/32"),
                format!("{VIP_V6}/128"),
            ] {
                must(&["ip", "-n", &ns, "addr", "add", &vip, "dev", "lo"]);
            }
            // Direct server return: never answer ARP for the VIPs on the
            // segment, and never use a VIP as the sender of an ARP request.
            for s in [
                "net.ipv4.conf.all.arp_ignore=1",
                "net.ipv4.conf.all.arp_announce=2",
            ] {
                must(&["ip", "netns", "exec", &ns, "sysctl", "-qw", s]);
            }
        }
        t
    }

    pub(crate) fn add_ns(&mut self, ns: &str) {
        let _ = sh(&["ip", "netns", "del", ns]);
        must(&["ip", "netns", "add", ns]);
        self.namespaces.push(ns.to_string());
    }

    /// The LB agent's configuration, with one weight per backend for the
    /// IPv4 TCP VIP (IPv6 and UDP VIPs use equal weights).
    pub fn lb_config(&self, weights: &[u32]) -> String {
        let list = |addr: &dyn Fn(usize) -> String, w: &dyn Fn(usize) -> u32| -> String {
            (0..self.backends)
                .map(|i| format!("{{ address = \"{}\", weight = {} }}", addr(i), w(i)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let v4 = |i: usize| self.backend_v4(i);
        let v6 = |i: usize| self.backend_v6(i);
        let tcp4 = list(&v4, &|i| weights[i]);
        let equal4 = list(&v4, &|_| 100);
        let equal6 = list(&v6, &|_| 100);
        format!(
            r#"instance = "{instance}"
socket = "{socket}"
[datapath]
interfaces = ["eth0"]
xdp_mode = "native"
maglev_table_size = 65537
max_vips = 8
flow_table_size = 65536
# Long, so that tests see next hops follow rtnetlink change events.
next_hop_refresh_ms = 60000

[visibility]
collect_interval_ms = 200

[metrics]
listen = "127.0.0.1:9180"

[lifecycle]
state_file = "{state}"

[encap]
source_v4 = "198.18.200.0/24"
source_v6 = "fd00:200::/64"

[[vips]]
name = "web"
address = "{VIP_V4}"
port = 80
protocol = "tcp"
backends = [{tcp4}]
health = {{ kind = "tcp", interval_ms = 300, timeout_ms = 200, rise = 2, fall = 2 }}
feedback = {{ port = 8081, path = "/load", interval_ms = 300, timeout_ms = 200, smoothing = 1.0, min_change = 0.05 }}
maintenance = {{ load_limit = 0.8, min_spare = 0.2, max_parallel = 2, drain_timeout_s = 30, hook = ["/bin/sh", "{hook}"], hook_timeout_s = 10 }}

[[vips]]
name = "dns"
address = "{VIP_V4}"
port = 53
protocol = "udp"
backends = [{equal4}]

[[vips]]
name = "web6"
address = "{VIP_V6}"
port = 80
protocol = "tcp"
backends = [{equal6}]

[[vips]]
name = "web-4to6"
address = "{VIP_V4_TO_V6}"
port = 80
protocol = "tcp"
backends = [{equal6}]
"#,
            instance = self.instance("lb"),
            socket = self.lb_socket().display(),
            state = self.dir.join("lifecycle.json").display(),
            hook = self.hook_script().display(),
        )
    }

    /// The maintenance hook the LB runs: it records its environment, one line
    /// per run, in `hooks.log` (see `hook_runs`), and takes a moment like an
    /// upgrade would.
    pub fn hook_script(&self) -> PathBuf {
        let log = self.dir.join("hooks.log");
        self.write(
            "hook.sh",
            &format!(
                "echo \"$LB_VIP_NAME $LB_BACKEND $LB_GENERATION\" >> {}\nsleep 0.3\n",
                log.display()
            ),
        )
    }

    /// Lines the maintenance hook wrote: "vip backend generation" per run.
    pub fn hook_runs(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("hooks.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("write config");
        p
    }

    /// The agent instance of `role`: its pinned datapath and lock are its own.
    pub fn instance(&self, role: &str) -> String {
        format!("{}-{role}", self.id)
    }

    pub(crate) fn spawn_agent(&mut self, role: &str, config: &str, args: &[&str]) {
        let ns = self.ns(role);
        let config = if config.contains("instance =") {
            config.to_string()
        } else {
            format!("instance = \"{}\"\n{config}", self.instance(role))
        };
        let path = self.write(&format!("{role}.toml"), &config);
        let log = File::create(self.dir.join(format!("{role}.log"))).expect("log file");
        let child = agent_command(&ns)
            .arg("--config")
            .arg(&path)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn lb-agent");
        self.agents.push((role.to_string(), child));
    }

    /// The agent log of `role`, for failure messages.
    pub fn log(&self, role: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{role}.log"))).unwrap_or_default()
    }

    pub(crate) fn wait_ready(&mut self, role: &str, socket: &PathBuf) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self
                .lbctl_at(socket, &["status", "--json"])
                .status
                .success()
            {
                return;
            }
            if let Some((_, child)) = self.agents.iter_mut().find(|(r, _)| r == role) {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "lb-agent for {role} exited with {status}:\n{}",
                        self.log(role)
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "lb-agent for {role} not ready:\n{}",
                self.log(role)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `lb_decap` agents and servers on every backend, then the LB agent.
    pub fn start(&mut self, weights: &[u32]) {
        self.start_with(weights, |c| c);
    }

    /// Like `start`, with the LB's configuration edited by `edit` first.
    pub fn start_with(&mut self, weights: &[u32], edit: impl FnOnce(String) -> String) {
        self.start_edited(weights, edit, |_, c| c);
    }

    /// Like `start_with`, with backend `i`'s configuration edited by
    /// `edit_backend(i, config)` too.
    pub fn start_edited(
        &mut self,
        weights: &[u32],
        edit: impl FnOnce(String) -> String,
        edit_backend: impl Fn(usize, String) -> String,
    ) {
        for i in 0..self.backends {
            let role = format!("b{i}");
            let socket = self.dir.join(format!("{role}.sock"));
            let config = format!(
                "socket = \"{}\"\n[decap]\ninterfaces = [\"eth0\"]\naddresses = [\"{}\", \"{}\"]\nxdp_mode = \"native\"\n",
                socket.display(),
                self.backend_v4(i),
                self.backend_v6(i)
            );
            let config = edit_backend(i, config);
            self.spawn_agent(&role, &config, &[]);
            self.wait_ready(&role, &socket);
            self.start_servers(i);
        }
        let config = edit(self.lb_config(weights));
        self.spawn_agent("lb", &config, &[]);
        let socket = self.lb_socket();
        self.wait_ready("lb", &socket);
    }

    fn start_servers(&mut self, i: usize) {
        let servers = start_servers(&self.ns(&format!("b{i}")), &format!("b{i}"));
        self.servers.push(servers);
    }

    /// Sets the load backend `i` reports (0 idle, 1 at its limit).
    pub fn set_load(&self, i: usize, load: f64) {
        self.servers[i]
            .load
            .store((load * 1000.0) as u32, Ordering::Relaxed);
    }

    /// Stops backend `i`'s servers (its host and decapsulator stay up).
    pub fn stop_servers(&mut self, i: usize) {
        self.servers[i].stop();
    }

    pub fn lbctl_at(&self, socket: &PathBuf, args: &[&str]) -> std::process::Output {
        Command::new(bin("lbctl"))
            .arg("--socket")
            .arg(socket)
            .args(args)
            .output()
            .expect("run lbctl")
    }

    pub fn lbctl(&self, args: &[&str]) -> std::process::Output {
        self.lbctl_at(&self.lb_socket(), args)
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = self.lbctl(&["status", "--json"]);
        assert!(
            out.status.success(),
            "lbctl status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Runs `f` in the client's namespace and returns its result.
    pub fn from_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.ns("cl"), f)
            .join()
            .expect("client thread panicked")
    }

    /// Starts the LB agent again with the configuration it last started with.
    pub fn start_lb(&mut self) {
        self.start_lb_with(&[]);
    }

    /// Like `start_lb`, with extra arguments for `lb-agent`; fails the test
    /// if the agent does not become ready.
    pub fn start_lb_with(&mut self, args: &[&str]) {
        let config = std::fs::read_to_string(self.dir.join("lb.toml")).expect("lb.toml");
        self.spawn_agent("lb", &config, args);
        let socket = self.lb_socket();
        self.wait_ready("lb", &socket);
    }

    /// The LB agent's process, no longer followed by the topology.
    fn take_lb(&mut self) -> Child {
        let pos = self
            .agents
            .iter()
            .position(|(r, _)| r == "lb")
            .expect("lb agent running");
        self.agents.remove(pos).1
    }

    /// Waits for the LB agent to exit by itself (`lbctl shutdown`).
    pub fn wait_lb_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.take_lb();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "the LB agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the LB agent with SIGKILL (no clean-up of its own) and waits.
    pub fn kill_lb(&mut self) {
        let mut child = self.take_lb();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Runs `lb-agent` once more with `config` in `role`'s namespace and
    /// returns its output (for agents that must refuse to start).
    pub fn run_agent(
        &self,
        role: &str,
        config: &std::path::Path,
        args: &[&str],
    ) -> std::process::Output {
        agent_command(&self.ns(role))
            .arg("--config")
            .arg(config)
            .args(args)
            .output()
            .expect("run lb-agent")
    }

    /// Stops the LB agent with SIGTERM and waits for it.
    pub fn stop_lb(&mut self) -> std::process::ExitStatus {
        terminate(&mut self.take_lb())
    }

    /// One scrape of the LB agent's metrics endpoint: the whole HTTP response.
    pub fn scrape_metrics(&self) -> String {
        in_netns(&self.ns("lb"), || {
            let mut s = TcpStream::connect("127.0.0.1:9180").expect("metrics endpoint");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).expect("a scrape");
            out
        })
        .join()
        .unwrap()
    }
}

/// Starts a backend's servers in namespace `ns`, answering as `name`: TCP
/// port 80 (the name, then an echo), UDP port 53 on the VIPs, and the load
/// report on port 8081.
pub fn start_servers(ns: &str, name: &str) -> Servers {
    let ns = ns.to_string();
    let name = name.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    // TCP: the first line back is the backend's name, then an echo.
    let (n, s) = (name.clone(), stop.clone());
    threads.push(in_netns(&ns, move || {
        let listener = TcpListener::bind("[::]:80").expect("bind TCP [::]:80");
        listener.set_nonblocking(true).expect("nonblocking");
        let mut conns: Vec<JoinHandle<()>> = Vec::new();
        while !s.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let (n, s) = (n.clone(), s.clone());
                    conns.push(std::thread::spawn(move || serve_tcp(stream, &n, &s)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
            conns.retain(|c| !c.is_finished());
        }
        for c in conns {
            let _ = c.join();
        }
    }));
    // UDP: bound to the VIPs so replies leave from the VIP address.
    for vip in [
        SocketAddr::new(VIP_V4.parse().unwrap(), 53),
        SocketAddr::new(VIP_V6.parse().unwrap(), 53),
    ] {
        let (n, s) = (name.clone(), stop.clone());
        threads.push(in_netns(&ns, move || {
            let sock = UdpSocket::bind(vip).unwrap_or_else(|e| panic!("bind UDP {vip}: {e}"));
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(n.as_bytes(), from);
                }
            }
        }));
    }
    // Load report.
    let load = Arc::new(AtomicU32::new(0));
    let (l, s) = (load.clone(), stop.clone());
    threads.push(in_netns(&ns, move || {
        let listener = TcpListener::bind("[::]:8081").expect("bind TCP [::]:8081");
        listener.set_nonblocking(true).expect("nonblocking");
        while !s.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut buf = [0u8; 512];
                    let _ = stream.read(&mut buf);
                    let body = format!("{{\"load\": {}}}", f64::from(l.load(Ordering::Relaxed)) / 1000.0);
                    let _ = stream.write_all(
                        format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
                            .as_bytes(),
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }));
    Servers {
        stop,
        threads,
        load,
    }
}

/// Attaches `lb_decap` (with no decapsulation address, so it passes every
/// frame) to `iface` in namespace `ns`; detached when the object is dropped.
pub fn attach_pass_through(ns: &str, iface: &str) -> aya::Ebpf {
    let iface = iface.to_string();
    in_netns(ns, move || {
        let mut ebpf = lb_userspace::datapath::load(&lb_userspace::datapath::MapSizes::DECAP_ONLY)
            .expect("load eBPF object");
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut("lb_decap")
            .expect("lb_decap")
            .try_into()
            .expect("XDP");
        prog.load().expect("verifier");
        prog.attach(&iface, aya::programs::XdpMode::Driver)
            .expect("attach pass-through");
        ebpf
    })
    .join()
    .expect("pass-through thread")
}

fn serve_tcp(mut stream: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    if stream.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// SIGTERM, then SIGKILL after 5 s; waits for the child.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `lb-agent --cleanup` with a role's configuration: its pinned datapath,
/// lock and socket go.
pub fn cleanup_agent(config: &std::path::Path) {
    let _ = Command::new(bin("lb-agent"))
        .arg("--cleanup")
        .arg("--config")
        .arg(config)
        .stderr(Stdio::null())
        .status();
}

impl Drop for Topology {
    fn drop(&mut self) {
        for (_, child) in self.agents.iter_mut() {
            terminate(child);
        }
        // Agents leave their datapath pinned when they stop.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "toml") {
                    cleanup_agent(&e.path());
                }
            }
        }
        self.pass_through.clear();
        for i in 0..self.servers.len() {
            self.stop_servers(i);
        }
        for ns in self.namespaces.iter().rev() {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("agent logs kept in {}", self.dir.display());
        }
    }
}

/// One TCP connection to `vip`: returns the name of the backend that answered.
pub fn connect_once(vip: SocketAddr) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::other(
            "connection closed before the backend answered",
        ));
    }
    Ok(line.trim().to_string())
}

/// One UDP request to `vip`: returns the name of the backend that answered.
pub fn udp_once(vip: SocketAddr) -> std::io::Result<String> {
    let local: SocketAddr = if vip.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
    };
    let sock = UdpSocket::bind(local)?;
    sock.connect(vip)?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send(b"who?")?;
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
