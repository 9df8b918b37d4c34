//! The bypass topology shared by the bypass tests: host h0's guest calls
//! the VIP through h0's source intermediary; the backends' agents run
//! `lb_decap` with `[bypass]` (client prefix 198.18.20.0/22 → h0's
//! intermediary); the LB node carries the flows' first packets.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::topology::*;

pub const KEY: &str = "5f1e6a3c9b2d47e8a0c4f6b8d2e1a3c5b7d9f0e2a4c6b8d0f1e3a5c7b9d1f3e5";
pub const AFTER_PACKETS: u32 = 2;
pub const PORT: u16 = 7470;

pub fn vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.parse().unwrap(), 80)
}

pub fn key_file(secret: &str) -> String {
    format!("[[keys]]\nid = 1\nsecret = \"{secret}\"\n")
}

/// The topology with bypass configured on the backends, the LB's
/// configuration edited by `edit_lb`; the host agent is started by the test
/// (before it runs, every packet takes the LB path).
pub fn topology(edit_lb: impl FnOnce(String) -> String) -> Topology {
    let mut t = Topology::new(2);
    t.add_host(0, 1);
    let keys = t.write("bypass-keys.toml", &key_file(KEY));
    let intermediary = format!("{}:{PORT}", t.host_v4(0));
    t.start_edited(&[100, 100], edit_lb, |_, c| {
        format!(
            "{c}[bypass]\nkey_file = \"{}\"\nintermediaries = [{{ prefix = \"198.18.20.0/22\", address = \"{intermediary}\" }}]\n\
             vips = [{{ address = \"{VIP_V4}\", port = 80, protocol = \"tcp\", after_packets = {AFTER_PACKETS} }}]\n",
            keys.display()
        )
    });
    // The host resolves the backends' MACs from its neighbour table: a
    // connection from the host fills it.
    for i in 0..2 {
        let b: SocketAddr = format!("{}:80", t.backend_v4(i)).parse().unwrap();
        in_netns(&t.ns("h0"), move || {
            connect_once(b).expect("host to backend")
        })
        .join()
        .unwrap();
    }
    t
}

/// Starts h0's agent as the source intermediary of the "web" VIP.
pub fn start_host(t: &mut Topology) {
    let backends: Vec<String> = (0..2)
        .map(|i| format!("{{ address = \"{}\", weight = 100 }}", t.backend_v4(i)))
        .collect();
    let vips = format!(
        "[[vips]]\nname = \"web\"\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\nbackends = [{}]\n\
         bypass = {{ after_packets = {AFTER_PACKETS} }}\n\
         health = {{ kind = \"tcp\", interval_ms = 300, timeout_ms = 200, rise = 2, fall = 2 }}\n",
        backends.join(", ")
    );
    let keys = t.dir.join("bypass-keys.toml");
    let bypass = format!(
        "key_file = \"{}\"\nlisten = \"{}:{PORT}\"",
        keys.display(),
        t.host_v4(0)
    );
    t.start_intermediary(0, 1, &vips, &bypass);
}

/// `lbctl ARGS --json` against h0's agent.
pub fn host_json(t: &Topology, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = t.lbctl_at(&t.host_socket(0), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

pub fn host_status(t: &Topology) -> Value {
    host_json(t, &["status"])
}

pub fn bypass_field(t: &Topology, field: &str) -> u64 {
    host_status(t)["bypass"][field].as_u64().unwrap_or(0)
}

/// Packets the LB node forwarded for the VIP.
pub fn lb_packets(t: &Topology) -> u64 {
    t.status_json()["vips"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["name"] == "web")
        .map(|v| v["counters"]["packets"].as_u64().unwrap())
        .sum()
}

pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// One connection from host h0's guest to `vip`: `bytes` up, echoed back
/// down (every byte checked); returns the backend's name and the client's
/// local address.
pub fn transfer(t: &Topology, vip: SocketAddr, bytes: usize) -> (String, SocketAddr) {
    t.from_guest(0, 0, move || {
        let stream = TcpStream::connect_timeout(&vip, Duration::from_secs(3)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let local = stream.local_addr().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut name = String::new();
        reader.read_line(&mut name).expect("backend's name");
        let mut writer = stream.try_clone().unwrap();
        let up = std::thread::spawn(move || {
            let chunk = vec![0x5au8; 16 * 1024];
            for _ in 0..bytes / chunk.len() {
                writer.write_all(&chunk).expect("upload");
            }
        });
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < bytes {
            let n = reader.read(&mut buf).expect("download");
            assert!(n > 0, "closed after {got} bytes");
            assert!(buf[..n].iter().all(|b| *b == 0x5a));
            got += n;
        }
        up.join().unwrap();
        (name.trim().to_string(), local)
    })
}
