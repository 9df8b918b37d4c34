//! End to end with every link at MTU 1500, the client's, the LB's and the
//! backends' alike, so that a full-size client packet no longer fits once the
//! balancer adds its outer header. Bulk TCP transfers through the VIP must
//! complete (path MTU discovery, started by the balancer's ICMP answers),
//! an oversize UDP datagram with DF must come back to the client as an ICMP
//! error, and frames a driver drops after `XDP_TX` must show in the status.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::topology::*;

const MTU: u32 = 1500;
const BULK_PORT: u16 = 8080;
const MIB: usize = 1 << 20;
/// Long enough for a transfer that works (well under a second here), short
/// enough that one that stalls fails the test instead of hanging it.
const STALL: Duration = Duration::from_secs(20);

fn vip(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().unwrap(), port)
}

/// A bulk server on every backend, on port 8080: `PUT n` then n bytes is
/// answered `OK n`; `GET n` with n bytes. Stopped and joined on drop.
struct Bulk {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Bulk {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn bulk_servers(t: &Topology) -> Bulk {
    let stop = Arc::new(AtomicBool::new(false));
    // Every server listens before the first connection is made.
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let threads = (0..t.backends)
        .map(|i| {
            let s = stop.clone();
            let bound = bound_tx.clone();
            in_netns(&t.ns(&format!("b{i}")), move || {
                let listener = TcpListener::bind(("::", BULK_PORT)).expect("bind bulk port");
                listener.set_nonblocking(true).expect("nonblocking");
                let _ = bound.send(());
                let mut conns: Vec<JoinHandle<()>> = Vec::new();
                while !s.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => conns.push(std::thread::spawn(|| serve_bulk(stream))),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        })
        .collect();
    for _ in 0..t.backends {
        bound_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a bulk server did not start");
    }
    Bulk { stop, threads }
}

fn serve_bulk(stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(STALL));
    let _ = stream.set_write_timeout(Some(STALL));
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut words = line.split_whitespace();
    let (verb, n) = (
        words.next(),
        words.next().and_then(|n| n.parse::<u64>().ok()),
    );
    match (verb, n) {
        (Some("PUT"), Some(n)) => {
            let got = std::io::copy(&mut reader.by_ref().take(n), &mut std::io::sink());
            if got.is_ok_and(|got| got == n) {
                let _ = reader.get_mut().write_all(format!("OK {n}\n").as_bytes());
            }
        }
        (Some("GET"), Some(n)) => {
            let chunk = vec![0x5a; 64 * 1024];
            let mut left = n as usize;
            while left > 0 {
                let k = left.min(chunk.len());
                if reader.get_mut().write_all(&chunk[..k]).is_err() {
                    return;
                }
                left -= k;
            }
        }
        _ => {}
    }
}

fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(STALL))?;
    s.set_write_timeout(Some(STALL))?;
    Ok(s)
}

/// Sends `n` bytes to the bulk server behind `to`; how long it took.
fn upload(to: SocketAddr, n: usize) -> Result<Duration, String> {
    let start = Instant::now();
    let mut s = connect(to).map_err(|e| format!("connect: {e}"))?;
    s.write_all(format!("PUT {n}\n").as_bytes())
        .map_err(|e| format!("request: {e}"))?;
    let chunk = vec![0xa5; 64 * 1024];
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(chunk.len());
        s.write_all(&chunk[..k])
            .map_err(|e| format!("stalled after {} KiB sent: {e}", sent / 1024))?;
        sent += k;
    }
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("no answer after the upload: {e}"))?;
    if line.trim() != format!("OK {n}") {
        return Err(format!("the server answered {line:?}"));
    }
    Ok(start.elapsed())
}

/// Fetches `n` bytes from the bulk server behind `to`; how long it took.
fn download(to: SocketAddr, n: usize) -> Result<Duration, String> {
    let start = Instant::now();
    let mut s = connect(to).map_err(|e| format!("connect: {e}"))?;
    s.write_all(format!("GET {n}\n").as_bytes())
        .map_err(|e| format!("request: {e}"))?;
    let mut got = 0;
    let mut buf = vec![0; 64 * 1024];
    while got < n {
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("closed after {got} bytes")),
            Ok(k) => got += k,
            Err(e) => return Err(format!("stalled after {} KiB received: {e}", got / 1024)),
        }
    }
    Ok(start.elapsed())
}

/// The extra VIPs of these tests: bulk transfers over IPv4 in IPv4, IPv6 in
/// IPv6 and IPv4 in IPv6, and UDP over IPv6.
fn with_bulk_vips(t: &Topology) -> impl FnOnce(String) -> String {
    let list = |addr: &dyn Fn(usize) -> String| -> String {
        (0..t.backends)
            .map(|i| format!("{{ address = \"{}\", weight = 100 }}", addr(i)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let v4 = list(&|i| t.backend_v4(i));
    let v6 = list(&|i| t.backend_v6(i));
    let vips = [
        ("bulk", VIP_V4, BULK_PORT, "tcp", &v4),
        ("bulk6", VIP_V6, BULK_PORT, "tcp", &v6),
        ("bulk-4to6", VIP_V4_TO_V6, BULK_PORT, "tcp", &v6),
        ("dns6", VIP_V6, 53, "udp", &v6),
    ]
    .map(|(name, address, port, protocol, backends)| {
        format!(
            "\n[[vips]]\nname = \"{name}\"\naddress = \"{address}\"\nport = {port}\n\
             protocol = \"{protocol}\"\nbackends = [{backends}]\n"
        )
    })
    .concat();
    move |config| config + &vips
}

fn start() -> Topology {
    let mut t = Topology::with_mtu(2, MTU);
    let edit = with_bulk_vips(&t);
    t.start_with(&[100, 100], edit);
    t
}

fn outcome(status: &serde_json::Value, name: &str) -> u64 {
    status["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["outcome"] == name)
        .unwrap_or_else(|| panic!("no outcome {name}"))["packets"]
        .as_u64()
        .unwrap()
}

/// The driver's XDP error counters of `interface` in the status, summed.
fn xdp_errors(status: &serde_json::Value, interface: &str) -> u64 {
    let entry = status["xdp_errors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["interface"] == interface)
        .unwrap_or_else(|| panic!("no XDP error counters for {interface}: {status}"));
    assert!(entry["error"].is_null(), "{entry}");
    let counters = entry["counters"].as_object().unwrap();
    assert!(
        counters.contains_key("rx_queue_0_xdp_tx_errors"),
        "{counters:?}"
    );
    counters.values().map(|v| v.as_u64().unwrap()).sum()
}

/// The MTU the client's kernel keeps for `dst` (`ip route get`).
fn client_route_mtu(t: &Topology, dst: &str) -> Option<u32> {
    let out = std::process::Command::new("ip")
        .args(["-n", &t.ns("cl"), "route", "get", dst])
        .output()
        .expect("ip route get");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace().skip_while(|w| *w != "mtu");
    words.nth(1).and_then(|m| m.parse().ok())
}

#[test]
fn bulk_transfers_through_the_vip_complete_at_mtu_1500() {
    let t = start();
    let _servers = bulk_servers(&t);
    // (VIP, the MTU the client should learn: 1500 less the outer header)
    let paths = [(VIP_V4, 1480), (VIP_V6, 1460), (VIP_V4_TO_V6, 1460)];
    for (address, learned) in paths {
        let to = vip(address, BULK_PORT);
        let up = t.from_client(move || upload(to, MIB));
        let up = up.unwrap_or_else(|e| panic!("1 MiB upload to {to}: {e}\n{}", t.log("lb")));
        let down = t.from_client(move || download(to, MIB));
        let down = down.unwrap_or_else(|e| panic!("1 MiB download from {to}: {e}"));
        println!("{to}: 1 MiB up in {up:?}, down in {down:?}");
        assert_eq!(client_route_mtu(&t, address), Some(learned), "{address}");
    }

    let status = t.status_json();
    let answered = outcome(&status, "icmp_too_big_sent");
    let clamped = status["mss_clamped"].as_u64().unwrap();
    println!("icmp_too_big_sent {answered}, mss_clamped {clamped}");
    println!("{}", status["outcomes"]);
    assert!(answered >= 3, "one answer per path at least: {answered}");
    // The first SYN on each path at least (later ones may already advertise
    // what the client learned).
    assert!(clamped >= 3, "SYNs clamped: {clamped}");
    assert_eq!(outcome(&status, "icmp_rate_limited"), 0);
    for b in status["backends"].as_array().unwrap() {
        assert_eq!(b["next_hop"]["mtu"], MTU, "{b}");
    }
    // What the datapath counted as forwarded did leave.
    assert_eq!(xdp_errors(&status, "eth0"), 0);
    let text = t.scrape_metrics();
    assert!(text.contains("lb_datapath_mss_clamped_total"), "{text}");
    assert!(
        text.contains(
            "lb_interface_xdp_errors_total{interface=\"eth0\",counter=\"rx_queue_0_xdp_tx_errors\"} 0"
        ),
        "{text}"
    );
    assert!(text.contains(&format!(
        "lb_backend_next_hop_mtu{{backend=\"{}\"}} 1500",
        t.backend_v4(0)
    )));

    // A frame the driver refuses after XDP_TX is counted by the driver: the
    // switch port facing the LB now takes 1400 bytes, which the LB cannot
    // know. A 1396-byte datagram reaches the LB and fits its own link with
    // the outer header (1416), but not the port (1400 + 18 for veth).
    must(&["ip", "-n", &t.ns("sw"), "link", "set", "lb", "mtu", "1400"]);
    let forwarded = outcome(&status, "forwarded");
    t.from_client(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..3 {
            sock.send_to(&[0; 1396 - 28], vip(VIP_V4, 53)).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let status = t.status_json();
    assert_eq!(outcome(&status, "forwarded"), forwarded + 3);
    assert_eq!(xdp_errors(&status, "eth0"), 3, "{}", status["xdp_errors"]);
    let text = String::from_utf8(t.lbctl(&["status"]).stdout).unwrap();
    println!("{text}");
    assert!(
        text.contains("rx_queue_0_xdp_tx_errors 3") && text.contains("warning: 3 frames"),
        "{text}"
    );
    let text = t.scrape_metrics();
    assert!(
        text.contains(
            "lb_interface_xdp_errors_total{interface=\"eth0\",counter=\"rx_queue_0_xdp_tx_errors\"} 3"
        ),
        "{text}"
    );
}

/// Sets a socket option of type int.
fn set_int(sock: &UdpSocket, level: i32, name: i32, value: i32) {
    // SAFETY: a valid fd and a pointer to an int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

fn get_int(sock: &UdpSocket, level: i32, name: i32) -> i32 {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: a valid fd and a pointer to an int with its length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&mut value as *mut i32).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
    value
}

/// Sends a datagram of `ip_len` bytes (IP header included) with DF to
/// `to`, then, once the balancer's answer is in, another: it must fail with
/// EMSGSIZE and the socket report the reduced path MTU. A datagram of that
/// size then gets its answer from a backend. Returns the path MTU.
fn oversize_datagram(to: SocketAddr, ip_len: usize) -> i32 {
    let v4 = to.is_ipv4();
    let (local, header) = if v4 {
        ("0.0.0.0:0", 28)
    } else {
        ("[::]:0", 48)
    };
    let sock = UdpSocket::bind(local).unwrap();
    let (level, discover, dont_fragment, mtu) = if v4 {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
            libc::IP_MTU,
        )
    } else {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
            libc::IPV6_MTU,
        )
    };
    set_int(&sock, level, discover, dont_fragment);
    sock.connect(to).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(get_int(&sock, level, mtu), MTU as i32);
    sock.send(&vec![0; ip_len - header])
        .expect("the first datagram fits the client's own link");
    std::thread::sleep(Duration::from_millis(300));
    // The ICMP error is reported on the socket, and the datagram no longer
    // fits the path.
    let reported = sock.take_error().unwrap().expect("an error on the socket");
    assert_eq!(reported.raw_os_error(), Some(libc::EMSGSIZE), "{reported}");
    let later = sock.send(&vec![0; ip_len - header]);
    let error = later.expect_err("the client learned the smaller path MTU");
    assert_eq!(error.raw_os_error(), Some(libc::EMSGSIZE), "{error}");
    let learned = get_int(&sock, level, mtu);
    sock.send(&vec![0; learned as usize - header])
        .expect("a datagram of the path MTU is sent");
    let mut buf = [0; 64];
    let n = sock.recv(&mut buf).expect("a backend answers");
    let name = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(name.starts_with('b'), "{name}");
    learned
}

#[test]
fn an_oversize_udp_datagram_with_df_gets_an_icmp_error() {
    let t = start();
    let to = vip(VIP_V4, 53);
    let learned = t.from_client(move || oversize_datagram(to, 1500));
    assert_eq!(learned, 1480, "fragmentation needed: 1500 less 20");
    assert_eq!(client_route_mtu(&t, VIP_V4), Some(1480));
    let to = vip(VIP_V6, 53);
    let learned = t.from_client(move || oversize_datagram(to, 1500));
    assert_eq!(learned, 1460, "packet too big: 1500 less 40");
    assert_eq!(client_route_mtu(&t, VIP_V6), Some(1460));
    let status = t.status_json();
    assert_eq!(outcome(&status, "icmp_too_big_sent"), 2);
    assert_eq!(outcome(&status, "dropped_too_big"), 0);
}
