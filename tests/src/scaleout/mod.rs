//! A scale-out test network: a router running BIRD with ECMP in front of
//! several LB nodes (each with its own BIRD and `lb-agent`), backends running
//! `lb_decap`, and a client behind the router. Every LB node takes its VIPs
//! from one etcd (the fleet store, in the router's namespace).
//!
//! ```text
//!  client 198.18.2.1 --veth-- router (198.18.2.254, br0 198.18.0.254, BIRD AS 65000, etcd)
//!                                     |
//!          br0: lb0..lbN 198.18.0.2+i (BIRD AS 65001, lb-agent), b0..bM 198.18.0.11+i
//! ```
//!
//! The router's kernel protocol has `merge paths on` and the L4 hash policy
//! (`fib_multipath_hash_policy=3`, fields 0x0037): one 5-tuple stays on one
//! LB node. BGP timers are low (hold 3 s) so a lost node goes within ~3 s.
//! Dropping `Ecmp` stops BIRD, the agents and servers, etcd, removes the
//! pinned datapaths, the namespaces and the temp dir, also on a panic.
//!
//! `bird`: the BIRD configurations and what the router's route says;
//! `conns`: long-lived client connections and the probe that finds broken ones.

use std::{
    fs::File,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

mod bird;
mod conns;

pub use conns::{probe, Connection};

use crate::{
    etcd::Etcd,
    topology::{
        agent_command, attach_pass_through, bin, cleanup_agent, in_netns, must,
        remove_stale_namespaces, start_servers, terminate, Servers, VIP_V4, VIP_V4_TO_V6, VIP_V6,
    },
};

pub const CLIENT: &str = "198.18.2.1";
pub const ROUTER_CLIENT_SIDE: &str = "198.18.2.254";
pub const ROUTER: &str = "198.18.0.254";
/// The kernel table each LB agent keeps its VIP routes in.
pub const ANNOUNCE_TABLE: u32 = 100;

pub fn lb_address(i: usize) -> String {
    format!("198.18.0.{}", 2 + i)
}

pub fn backend_address(i: usize) -> String {
    format!("198.18.0.{}", 11 + i)
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// One LB node's processes.
struct Node {
    agent: Option<Child>,
    bird: Option<Child>,
}

pub struct Ecmp {
    pub id: String,
    /// `[datapath] second_chance` of LB configurations written from now on.
    pub second_chance: bool,
    pub dir: PathBuf,
    pub etcd: Etcd,
    namespaces: Vec<String>,
    nodes: Vec<Node>,
    router_bird: Option<Child>,
    backend_agents: Vec<Child>,
    servers: Vec<Servers>,
    pass_through: Vec<aya::Ebpf>,
}

fn sysctl(ns: &str, setting: &str) {
    must(&["ip", "netns", "exec", ns, "sysctl", "-qw", setting]);
}

impl Ecmp {
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.id)
    }

    /// The namespaces, links and addresses for `backends` backends (nothing
    /// runs yet but etcd and the router's BIRD).
    pub fn new(backends: usize) -> Ecmp {
        remove_stale_namespaces();
        let n = NEXT_ID.fetch_add(1, Ordering::SeqCst);
        let id = format!("lbt{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("{id}-ecmp"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let rt = format!("{id}-rt");
        let mut namespaces = Vec::new();
        add_ns(&mut namespaces, &rt);
        must(&["ip", "-n", &rt, "link", "set", "lo", "up"]);
        must(&["ip", "-n", &rt, "link", "add", "br0", "type", "bridge"]);
        must(&["ip", "-n", &rt, "link", "set", "br0", "up"]);
        must(&[
            "ip",
            "-n",
            &rt,
            "addr",
            "add",
            &format!("{ROUTER}/24"),
            "dev",
            "br0",
        ]);
        for s in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.fib_multipath_hash_policy=3",
            "net.ipv4.fib_multipath_hash_fields=0x0037",
        ] {
            sysctl(&rt, s);
        }
        let etcd = Etcd::start_at(Some(&rt), Some(ROUTER));
        let mut t = Ecmp {
            id,
            second_chance: true,
            dir,
            etcd,
            namespaces,
            nodes: Vec::new(),
            router_bird: None,
            backend_agents: Vec::new(),
            servers: Vec::new(),
            pass_through: Vec::new(),
        };
        // The client, on a link of its own to the router.
        let cl = t.ns("cl");
        add_ns(&mut t.namespaces, &cl);
        must(&["ip", "-n", &cl, "link", "set", "lo", "up"]);
        must(&[
            "ip", "-n", &rt, "link", "add", "cl", "type", "veth", "peer", "name", "eth0", "netns",
            &cl,
        ]);
        t.link_up(&rt, "cl", ROUTER_CLIENT_SIDE, "1500");
        t.link_up(&cl, "eth0", CLIENT, "1500");
        must(&[
            "ip",
            "-n",
            &cl,
            "route",
            "add",
            "default",
            "via",
            ROUTER_CLIENT_SIDE,
        ]);
        for i in 0..backends {
            t.add_backend(i);
        }
        t
    }

    fn link_up(&self, ns: &str, dev: &str, address: &str, mtu: &str) {
        must(&["ip", "-n", ns, "link", "set", dev, "mtu", mtu, "up"]);
        // veth leaves checksums to a device that never computes them.
        must(&[
            "ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "tso", "off", "gso",
            "off",
        ]);
        must(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            dev,
        ]);
        sysctl(ns, &format!("net.ipv4.conf.{dev}.rp_filter=0"));
        sysctl(ns, "net.ipv4.conf.all.rp_filter=0");
    }

    /// A host `role` on the router's bridge (switch port named `role`).
    fn plug(&mut self, role: &str, address: &str) -> String {
        let (rt, ns) = (self.ns("rt"), self.ns(role));
        add_ns(&mut self.namespaces, &ns);
        must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        must(&[
            "ip", "-n", &rt, "link", "add", role, "mtu", "1600", "type", "veth", "peer", "name",
            "eth0", "netns", &ns,
        ]);
        must(&["ip", "-n", &rt, "link", "set", role, "master", "br0", "up"]);
        self.link_up(&ns, "eth0", address, "1600");
        ns
    }

    /// Backend `i`: the VIPs on its loopback (direct server return), the way
    /// back to the client through the router, `lb_decap` and the servers.
    fn add_backend(&mut self, i: usize) {
        let role = format!("b{i}");
        let ns = self.plug(&role, &backend_address(i));
        // A backend's lb_decap sends second-chance packets on with XDP_TX.
        self.pass_through
            .push(attach_pass_through(&self.ns("rt"), &role));
        for vip in [
            format!("{VIP_V4}/32"),
            format!("{VIP_V4_TO_V6}/32"),
            format!("{VIP_V6}/128"),
        ] {
            must(&["ip", "-n", &ns, "addr", "add", &vip, "dev", "lo"]);
        }
        sysctl(&ns, "net.ipv4.conf.all.arp_ignore=1");
        sysctl(&ns, "net.ipv4.conf.all.arp_announce=2");
        must(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "198.18.2.0/24",
            "via",
            ROUTER,
        ]);
        let socket = self.dir.join(format!("{role}.sock"));
        let config = format!(
            "instance = \"{id}-{role}\"\nsocket = \"{sock}\"\n[decap]\ninterfaces = [\"eth0\"]\naddresses = [\"{addr}\"]\nxdp_mode = \"native\"\n",
            id = self.id,
            sock = socket.display(),
            addr = backend_address(i),
        );
        let child = self.spawn_agent(&role, &config);
        self.backend_agents.push(child);
        self.wait_ready(&role, &socket);
        self.servers.push(start_servers(&ns, &role));
    }

    /// Starts backend `i` after the others (a new member of the backend set).
    pub fn grow_backends(&mut self, i: usize) {
        self.add_backend(i);
    }

    fn spawn_agent(&self, role: &str, config: &str) -> Child {
        let path = self.dir.join(format!("{role}.toml"));
        std::fs::write(&path, config).expect("agent config");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{role}.log")))
            .expect("log file");
        agent_command(&self.ns(role))
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn lb-agent")
    }

    pub fn log(&self, role: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{role}.log"))).unwrap_or_default()
    }

    fn wait_ready(&self, role: &str, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self
            .lbctl_at(socket, &["status", "--json"])
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "lb-agent for {role} not ready:\n{}",
                self.log(role)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn socket(&self, node: usize) -> PathBuf {
        self.dir.join(format!("lb{node}.sock"))
    }

    pub fn lbctl_at(&self, socket: &Path, args: &[&str]) -> Output {
        Command::new(bin("lbctl"))
            .arg("--socket")
            .arg(socket)
            .args(args)
            .output()
            .expect("run lbctl")
    }

    /// `lbctl ARGS` against LB node `node`; panics unless it succeeds.
    pub fn lbctl(&self, node: usize, args: &[&str]) -> String {
        let out = self.lbctl_at(&self.socket(node), args);
        assert!(
            out.status.success(),
            "lbctl {args:?} on lb{node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn status(&self, node: usize) -> serde_json::Value {
        serde_json::from_str(&self.lbctl(node, &["status", "--json"])).expect("status JSON")
    }

    /// The fleet file `lbctl --fleet` reads (etcd on the router's loopback).
    fn fleet_file(&self) -> PathBuf {
        let path = self.dir.join("fleet.toml");
        std::fs::write(&path, self.etcd.fleet_section("lbctl", 5)).expect("fleet file");
        path
    }

    /// Writes the fleet's VIP document (`[[vips]]` TOML) through `lbctl fleet vips set`.
    pub fn set_vips(&self, document: &str) {
        let file = self.dir.join("vips.toml");
        std::fs::write(&file, document).expect("vips file");
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns("rt")])
            .arg(bin("lbctl"))
            .arg("--fleet")
            .arg(self.fleet_file())
            .args(["fleet", "vips", "set", "-f"])
            .arg(&file)
            .output()
            .expect("run lbctl");
        assert!(
            out.status.success(),
            "lbctl fleet vips set: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The configuration of LB node `i`: `[announce]` into the kernel table
    /// its BIRD learns, `[fleet]` for the VIPs; `extra` is appended.
    pub fn lb_config(&self, i: usize, extra: &str) -> String {
        format!(
            r#"instance = "{id}-lb{i}"
socket = "{sock}"
[datapath]
interfaces = ["eth0"]
xdp_mode = "native"
maglev_table_size = 65537
max_vips = 8
flow_table_size = 65536
second_chance = {second_chance}

[visibility]
collect_interval_ms = 500

[metrics]
listen = "127.0.0.1:9180"

[lifecycle]
state_file = "{dir}/lb{i}-lifecycle.json"

[encap]
source_v4 = "198.18.200.0/24"
source_v6 = "fd00:200::/64"

[announce]
table = {ANNOUNCE_TABLE}
refresh_ms = 200

{fleet}
{extra}"#,
            id = self.id,
            sock = self.socket(i).display(),
            dir = self.dir.display(),
            fleet = self.etcd.fleet_section_at(ROUTER, &format!("lb{i}"), 3),
            second_chance = self.second_chance,
        )
    }

    /// LB node `i`: its link, its BIRD, its agent; returns once the agent
    /// serves its control socket.
    pub fn add_node(&mut self, i: usize) {
        let role = format!("lb{i}");
        self.plug(&role, &lb_address(i));
        // XDP_TX frames reach the bridge only when its port has NAPI on.
        self.pass_through
            .push(attach_pass_through(&self.ns("rt"), &role));
        let bird = self.spawn_bird(&role, &bird::node_bird_config(i));
        while self.nodes.len() <= i {
            self.nodes.push(Node {
                agent: None,
                bird: None,
            });
        }
        self.nodes[i].bird = Some(bird);
        self.start_agent(i);
    }

    /// Starts LB node `i`'s agent (again) with the configuration it had.
    pub fn start_agent(&mut self, i: usize) {
        let role = format!("lb{i}");
        let path = self.dir.join(format!("{role}.toml"));
        let config = std::fs::read_to_string(&path).unwrap_or_else(|_| self.lb_config(i, ""));
        let child = self.spawn_agent(&role, &config);
        self.nodes[i].agent = Some(child);
        let socket = self.socket(i);
        self.wait_ready(&role, &socket);
    }

    /// Restarts LB node `i`'s agent with a configuration written afresh
    /// (`second_chance` as set now); it adopts its pinned datapath.
    pub fn restart_agent_afresh(&mut self, i: usize) {
        self.stop_agent(i);
        let path = self.dir.join(format!("lb{i}.toml"));
        std::fs::write(&path, self.lb_config(i, "")).expect("agent config");
        self.start_agent(i);
    }

    /// One scrape of LB node `i`'s metrics: the body.
    pub fn scrape(&self, i: usize) -> String {
        use std::io::{Read as _, Write as _};
        in_netns(&self.ns(&format!("lb{i}")), || {
            let mut s = TcpStream::connect("127.0.0.1:9180").expect("metrics endpoint");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).expect("a scrape");
            out.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default()
        })
        .join()
        .expect("scrape thread")
    }

    /// Packets the backends' `lb_decap` sent on to a second candidate.
    pub fn second_chance_packets(&self, backends: usize) -> u64 {
        (0..backends)
            .map(|i| {
                let socket = self.dir.join(format!("b{i}.sock"));
                let out = self.lbctl_at(&socket, &["status", "--json"]);
                let status: serde_json::Value =
                    serde_json::from_slice(&out.stdout).unwrap_or_default();
                status["decap"]["outcomes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|o| o["outcome"] == "second_chance")
                    .filter_map(|o| o["packets"].as_u64())
                    .sum::<u64>()
            })
            .sum()
    }

    /// Stops LB node `i`'s agent with SIGTERM (it withdraws its VIPs).
    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].agent.take() {
            terminate(&mut c);
        }
    }
}

fn add_ns(list: &mut Vec<String>, ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
    must(&["ip", "netns", "add", ns]);
    list.push(ns.to_string());
}

impl Drop for Ecmp {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(c) = node.agent.as_mut() {
                terminate(c);
            }
        }
        for c in &mut self.backend_agents {
            terminate(c);
        }
        let birds = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.bird.as_mut())
            .chain(self.router_bird.as_mut());
        for c in birds {
            terminate(c);
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if (name.starts_with("lb") || name.starts_with('b')) && name.ends_with(".toml") {
                    cleanup_agent(&e.path());
                }
            }
        }
        self.pass_through.clear();
        for s in &mut self.servers {
            s.stop();
        }
        self.etcd.kill();
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("logs kept in {}", self.dir.display());
        }
    }
}
