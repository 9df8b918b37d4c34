//! The BGP side of the scale-out network: BIRD on the router and on each LB
//! node, and what the router's multipath route says.

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{lb_address, Ecmp, ANNOUNCE_TABLE, ROUTER};
use crate::topology::must;

/// BGP timers low enough for tests: a session within ~1 s, a lost peer
/// withdrawn within the 3 s hold time.
const TIMERS: &str = "hold time 3; keepalive time 1; connect retry time 1; connect delay time 1; error wait time 1, 2;";

/// LB node `i`'s BIRD: learns the agent's VIP routes from the kernel table
/// and exports them to the router with itself as next hop.
pub(super) fn node_bird_config(i: usize) -> String {
    format!(
        "log stderr {{ info, remote, warning, error, auth, fatal, bug }};\nrouter id {addr};\nprotocol device {{ }}\n\
         protocol kernel vips {{ ipv4 {{ import all; export none; }}; kernel table {ANNOUNCE_TABLE}; learn; scan time 10; }}\n\
         protocol bgp uplink {{ local {addr} as 65001; neighbor {ROUTER} as 65000; {TIMERS}\n\
         ipv4 {{ import none; export where proto = \"vips\"; next hop self; }}; }}\n",
        addr = lb_address(i)
    )
}

impl Ecmp {
    /// The router's BIRD, with one BGP session per LB node that may come
    /// (`max_nodes`); sessions to nodes not started yet just stay down.
    pub fn start_router(&mut self, max_nodes: usize) {
        let mut conf = format!(
            "log stderr {{ info, remote, warning, error, auth, fatal, bug }};\nrouter id {ROUTER};\nprotocol device {{ }}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
             template bgp lbs {{ local {ROUTER} as 65000; {TIMERS} ipv4 {{ import all; export none; }}; }}\n"
        );
        for i in 0..max_nodes {
            conf.push_str(&format!(
                "protocol bgp lb{i} from lbs {{ neighbor {} as 65001; }}\n",
                lb_address(i)
            ));
        }
        self.router_bird = Some(self.spawn_bird("rt", &conf));
    }

    pub(super) fn spawn_bird(&self, role: &str, conf: &str) -> Child {
        let path = self.dir.join(format!("bird-{role}.conf"));
        std::fs::write(&path, conf).expect("bird config");
        let log = File::create(self.dir.join(format!("bird-{role}.log"))).expect("bird log");
        Command::new("ip")
            .args(["netns", "exec", &self.ns(role), "bird", "-f", "-c"])
            .arg(&path)
            .arg("-s")
            .arg(self.bird_socket(role))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn bird")
    }

    pub fn bird_socket(&self, role: &str) -> PathBuf {
        self.dir.join(format!("bird-{role}.ctl"))
    }

    /// Loses LB node `i` as a host dies: its link goes first (so no BGP
    /// notification or TCP close reaches the router: only the hold timer
    /// tells), then its agent and BIRD are killed (SIGKILL, nothing
    /// withdrawn). Returns when the link went.
    pub fn kill_node(&mut self, i: usize) -> Instant {
        must(&["ip", "-n", &self.ns("rt"), "link", "del", &format!("lb{i}")]);
        let lost = Instant::now();
        for c in [self.nodes[i].agent.take(), self.nodes[i].bird.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        lost
    }

    /// The LB nodes the router's route to `vip` goes through now.
    pub fn next_hops(&self, vip: &str) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.ns("rt"), "route", "show", vip])
            .output()
            .expect("ip route");
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        let mut hops: Vec<String> = words
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_string())
            .collect();
        hops.sort();
        hops
    }

    /// Waits until the router's route to `vip` has exactly the next hops of
    /// LB nodes `nodes`; returns how long it took.
    pub fn wait_next_hops(&self, vip: &str, nodes: &[usize], patience: Duration) -> Duration {
        let start = Instant::now();
        let mut want: Vec<String> = nodes.iter().map(|i| lb_address(*i)).collect();
        want.sort();
        loop {
            let hops = self.next_hops(vip);
            if hops == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < patience,
                "the router's next hops for {vip} are {hops:?}, not {want:?}, after {patience:?}\n{}",
                self.bird_log("rt")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn bird_log(&self, role: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("bird-{role}.log"))).unwrap_or_default()
    }
}
