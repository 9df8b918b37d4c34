//! Hosts whose guests call a service, added to a `Topology` for the
//! source-side balancing tests: host `hH` sits on the segment at
//! 198.18.0.(21+H) and routes the VIPs to the LB node; each guest `hHgG` is a
//! namespace behind the host's veth `gG`, at 198.18.(20+2H+G).2 with the
//! host side at .1. The backends route the guests' subnets to their hosts,
//! so their direct replies go straight back.

use std::{path::PathBuf, time::Duration};

use crate::topology::{attach_pass_through, in_netns, must, Topology, LB_V4, LB_V6};

impl Topology {
    pub fn host_v4(&self, h: usize) -> String {
        format!("198.18.0.{}", 21 + h)
    }

    pub fn guest_v4(&self, h: usize, g: usize) -> String {
        format!("198.18.{}.2", 20 + 2 * h + g)
    }

    pub fn host_v6(&self, h: usize) -> String {
        format!("fd00::{}", 21 + h)
    }

    pub fn guest_v6(&self, h: usize, g: usize) -> String {
        format!("fd00:{}::2", 20 + 2 * h + g)
    }

    /// The control socket of host `h`'s source-side balancer.
    pub fn host_balancer_socket(&self, h: usize) -> PathBuf {
        self.dir.join(format!("h{h}-host.sock"))
    }

    /// Builds host `h` with `guests` guests (at most 2).
    pub fn add_host(&mut self, h: usize, guests: usize) {
        assert!(
            guests <= 2 && h < 5,
            "address plan: up to 5 hosts of 2 guests"
        );
        let sw = self.ns("sw");
        let host = self.ns(&format!("h{h}"));
        self.add_ns(&host);
        let port = format!("h{h}");
        must(&["ip", "-n", &host, "link", "set", "lo", "up"]);
        must(&[
            "ip", "-n", &sw, "link", "add", &port, "mtu", "1600", "type", "veth", "peer", "name",
            "eth0", "netns", &host,
        ]);
        must(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"]);
        must(&[
            "ip", "-n", &host, "link", "set", "eth0", "mtu", "1600", "up",
        ]);
        let addr = format!("{}/24", self.host_v4(h));
        must(&["ip", "-n", &host, "addr", "add", &addr, "dev", "eth0"]);
        let addr6 = format!("{}/64", self.host_v6(h));
        must(&[
            "ip", "-n", &host, "addr", "add", &addr6, "dev", "eth0", "nodad",
        ]);
        for s in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            must(&["ip", "netns", "exec", &host, "sysctl", "-qw", s]);
        }
        // Without an install, guests reach the VIPs through the LB node.
        must(&[
            "ip",
            "-n",
            &host,
            "route",
            "add",
            "198.18.10.0/24",
            "via",
            LB_V4,
        ]);
        must(&[
            "ip",
            "-n",
            &host,
            "-6",
            "route",
            "add",
            "fd00:10::/64",
            "via",
            LB_V6,
        ]);
        // Frames the source-side balancer redirects to eth0 arrive only if
        // the peer runs XDP (see `Topology::build_with`).
        self.pass_through.push(attach_pass_through(&sw, &port));
        for g in 0..guests {
            let guest = self.ns(&format!("h{h}g{g}"));
            self.add_ns(&guest);
            let dev = format!("g{g}");
            let net = 20 + 2 * h + g;
            must(&["ip", "-n", &guest, "link", "set", "lo", "up"]);
            must(&[
                "ip", "-n", &host, "link", "add", &dev, "type", "veth", "peer", "name", "eth0",
                "netns", &guest,
            ]);
            must(&[
                "ip",
                "-n",
                &host,
                "addr",
                "add",
                &format!("198.18.{net}.1/24"),
                "dev",
                &dev,
            ]);
            must(&["ip", "-n", &host, "link", "set", &dev, "up"]);
            must(&[
                "ip",
                "-n",
                &guest,
                "addr",
                "add",
                &format!("198.18.{net}.2/24"),
                "dev",
                "eth0",
            ]);
            must(&[
                "ip",
                "-n",
                &host,
                "addr",
                "add",
                &format!("fd00:{net}::1/64"),
                "dev",
                &dev,
                "nodad",
            ]);
            must(&[
                "ip",
                "-n",
                &guest,
                "addr",
                "add",
                &format!("fd00:{net}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            must(&["ip", "-n", &guest, "link", "set", "eth0", "up"]);
            // As on the LB's clients: checksums computed in software.
            must(&[
                "ip", "netns", "exec", &guest, "ethtool", "-K", "eth0", "tx", "off", "tso", "off",
                "gso", "off",
            ]);
            must(&[
                "ip",
                "-n",
                &guest,
                "route",
                "add",
                "default",
                "via",
                &format!("198.18.{net}.1"),
            ]);
            must(&[
                "ip",
                "-n",
                &guest,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:{net}::1"),
            ]);
            for i in 0..self.backends {
                let b = self.ns(&format!("b{i}"));
                must(&[
                    "ip",
                    "-n",
                    &b,
                    "route",
                    "add",
                    &format!("198.18.{net}.0/24"),
                    "via",
                    &self.host_v4(h),
                ]);
                must(&[
                    "ip",
                    "-n",
                    &b,
                    "-6",
                    "route",
                    "add",
                    &format!("fd00:{net}::/64"),
                    "via",
                    &self.host_v6(h),
                ]);
            }
        }
    }

    /// Starts host `h`'s agent: the host role with `fleet` (a `[fleet]`
    /// section), its source-side balancer's socket and state in the test dir.
    pub fn start_host(&mut self, h: usize, fleet: &str) {
        self.start_host_with(h, "", fleet);
    }

    /// Like `start_host`, with more lines (`host_lines`) in its `[host]`
    /// section; the host encapsulates from its IPv6 address too.
    pub fn start_host_with(&mut self, h: usize, host_lines: &str, fleet: &str) {
        let role = format!("h{h}");
        let socket = self.dir.join(format!("{role}.sock"));
        let config = format!(
            "socket = \"{}\"\n[host]\nsocket = \"{}\"\nencap_source_v4 = \"{}/32\"\nencap_source_v6 = \"{}/128\"\nstate_file = \"{}\"\n{host_lines}\n{fleet}",
            socket.display(),
            self.host_balancer_socket(h).display(),
            self.host_v4(h),
            self.host_v6(h),
            self.dir.join(format!("{role}-host.json")).display(),
        );
        self.spawn_agent(&role, &config, &[]);
        self.wait_ready(&role, &socket);
    }

    /// The control socket of host `h`'s agent.
    pub fn host_socket(&self, h: usize) -> PathBuf {
        self.dir.join(format!("h{h}.sock"))
    }

    /// Starts host `h`'s agent as a bypass source intermediary from a file
    /// configuration: `lb_source` on its guests' interfaces `g0..`, `vips`
    /// (`[[vips]]` tables), encapsulating from the host's address, and
    /// `bypass` (the lines of its `[bypass]` section).
    pub fn start_intermediary(&mut self, h: usize, guests: usize, vips: &str, bypass: &str) {
        let role = format!("h{h}");
        let socket = self.host_socket(h);
        let interfaces: Vec<String> = (0..guests).map(|g| format!("\"g{g}\"")).collect();
        let config = format!(
            "socket = \"{}\"\n[datapath]\ninterfaces = [{}]\nxdp_mode = \"native\"\nbypass_source = true\n\
             [lifecycle]\nstate_file = \"{}\"\n[encap]\nsource_v4 = \"{}/32\"\n[bypass]\n{bypass}\n{vips}",
            socket.display(),
            interfaces.join(", "),
            self.dir.join(format!("{role}-lifecycle.json")).display(),
            self.host_v4(h),
        );
        self.spawn_agent(&role, &config, &[]);
        self.wait_ready(&role, &socket);
    }

    /// Kills `role`'s agent with SIGKILL (its datapath stays pinned).
    pub fn kill_agent(&mut self, role: &str) {
        let pos = self
            .agents
            .iter()
            .position(|(r, _)| r == role)
            .expect("agent running");
        let mut child = self.agents.remove(pos).1;
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts `role`'s agent again with the configuration it last started with.
    pub fn restart_agent(&mut self, role: &str) {
        let config =
            std::fs::read_to_string(self.dir.join(format!("{role}.toml"))).expect("config");
        self.spawn_agent(role, &config, &[]);
        let socket = self.dir.join(format!("{role}.sock"));
        self.wait_ready(role, &socket);
    }

    /// Runs `f` in guest `g` of host `h`.
    pub fn from_guest<T: Send + 'static>(
        &self,
        h: usize,
        g: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        in_netns(&self.ns(&format!("h{h}g{g}")), f)
            .join()
            .expect("guest thread panicked")
    }
}

/// Sleeps a little between polls.
pub fn pause() {
    std::thread::sleep(Duration::from_millis(100));
}
