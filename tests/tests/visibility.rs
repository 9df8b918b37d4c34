//! Visibility end to end: a known workload through the balancer, then the
//! report, the flow listing and the metrics must tell exactly what happened.
//! Bytes are checked against a capture of what the client sent.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use lb_tests::topology::*;

const FLOWS: usize = 100;

/// Per client port: (packets, bytes) of the IPv4 TCP frames to VIP_V4 port 80
/// in a pcap file.
fn pcap_flows(path: &std::path::Path) -> BTreeMap<u16, (u64, u64)> {
    let data = std::fs::read(path).expect("pcap");
    assert!(data.len() >= 24, "pcap too short");
    let magic = u32::from_le_bytes(data[0..4].try_into().unwrap());
    assert!(
        magic == 0xa1b2_c3d4 || magic == 0xa1b2_3c4d,
        "unexpected pcap magic {magic:#x}"
    );
    let mut out: BTreeMap<u16, (u64, u64)> = BTreeMap::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let incl = u32::from_le_bytes(data[off + 8..off + 12].try_into().unwrap()) as usize;
        let orig = u32::from_le_bytes(data[off + 12..off + 16].try_into().unwrap()) as u64;
        let frame = &data[off + 16..off + 16 + incl];
        off += 16 + incl;
        let vip: std::net::Ipv4Addr = VIP_V4.parse().unwrap();
        if frame.len() < 38
            || frame[12..14] != [0x08, 0x00]
            || frame[23] != 6
            || frame[30..34] != vip.octets()
        {
            continue;
        }
        let ihl = (frame[14] & 0x0f) as usize * 4;
        if u16::from_be_bytes([frame[16 + ihl], frame[17 + ihl]]) != 80 {
            continue;
        }
        let sport = u16::from_be_bytes([frame[14 + ihl], frame[15 + ihl]]);
        let e = out.entry(sport).or_default();
        e.0 += 1;
        e.1 += orig;
    }
    out
}

fn get(t: &Topology, args: &[&str]) -> serde_json::Value {
    let out = t.lbctl(args);
    assert!(
        out.status.success(),
        "lbctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn a_known_workload_is_reported_exactly() {
    let mut t = Topology::new(3);
    t.start(&[100, 100, 100]);
    let pcap = t.dir.join("client.pcap");
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.ns("cl"),
            "tcpdump",
            "--immediate-mode",
            "-i",
            "eth0",
            "-U",
            "-n",
            "-s",
            "96",
            "-w",
        ])
        .arg(&pcap)
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    let mut line = String::new();
    BufReader::new(tcpdump.stderr.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening"), "tcpdump: {line}");

    // 100 connections: each sends 1000 + i bytes and reads them back; even
    // ones close with FIN, odd ones with RST.
    let vip: SocketAddr = SocketAddr::new(VIP_V4.parse().unwrap(), 80);
    let ports: Vec<u16> = t.from_client(move || {
        (0..FLOWS)
            .map(|i| {
                let mut s =
                    TcpStream::connect_timeout(&vip, Duration::from_secs(3)).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let port = s.local_addr().unwrap().port();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut name = String::new();
                r.read_line(&mut name).unwrap();
                let payload = vec![b'x'; 1000 + i];
                s.write_all(&payload).unwrap();
                let mut back = vec![0u8; payload.len()];
                r.read_exact(&mut back).unwrap();
                if i % 2 == 0 {
                    s.shutdown(std::net::Shutdown::Write).unwrap();
                    // Wait for the server's FIN, so the last ACK is sent too.
                    let mut rest = Vec::new();
                    let _ = r.read_to_end(&mut rest);
                } else {
                    linger_zero(&s);
                }
                drop(s);
                port
            })
            .collect()
    });
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(tcpdump.id() as i32, libc::SIGINT) };
    let mut tail = String::new();
    tcpdump
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut tail)
        .unwrap();
    tcpdump.wait().unwrap();
    let sent = pcap_flows(&pcap);
    assert_eq!(
        sent.len(),
        FLOWS,
        "the capture holds every flow ({} bytes; tcpdump: {tail})",
        std::fs::metadata(&pcap).map(|m| m.len()).unwrap_or(0)
    );
    // Let the collector pass at least once more.
    std::thread::sleep(Duration::from_millis(600));

    // Flow by flow: the datapath's per-leg counters equal the capture.
    let flows = get(
        &t,
        &[
            "flows", "--json", "--vip", "web", "--state", "all", "--limit", "1000",
        ],
    );
    assert_eq!(flows["matched"], FLOWS);
    let mut fin = 0;
    let mut rst = 0;
    for f in flows["flows"].as_array().unwrap() {
        let port = f["client"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap();
        let i = ports
            .iter()
            .position(|p| *p == port)
            .expect("a flow of the workload");
        let (packets, bytes) = sent[&port];
        assert_eq!(f["client_to_lb"]["packets"], packets, "flow {port}");
        assert_eq!(f["client_to_lb"]["bytes"], bytes, "flow {port}");
        assert_eq!(
            f["lb_to_backend"]["bytes"],
            bytes + 20 * packets,
            "flow {port}: IPIP adds 20 bytes a packet"
        );
        let flags = f["tcp_flags"].as_str().unwrap();
        if i % 2 == 0 {
            assert_eq!(f["state"], "closed-fin", "flow {port}");
            assert_eq!(flags, "SYN|ACK|FIN|PSH", "flow {port}");
            fin += 1;
        } else {
            assert_eq!(f["state"], "closed-rst", "flow {port}");
            assert!(
                flags.contains("RST") && flags.contains("SYN"),
                "flow {port}: {flags}"
            );
            rst += 1;
        }
    }
    assert_eq!((fin, rst), (50, 50));

    // The report over the whole run.
    let report = get(
        &t,
        &[
            "report", "--json", "--vip", "web", "--since", "1h", "--top", "5",
        ],
    );
    let web = &report["vips"][0]["flows"];
    let packets: u64 = sent.values().map(|v| v.0).sum();
    let bytes: u64 = sent.values().map(|v| v.1).sum();
    assert_eq!(web["new_flows"], FLOWS);
    assert_eq!(web["closed_fin"], 50);
    assert_eq!(web["closed_rst"], 50);
    assert_eq!(web["active"], 0);
    assert_eq!(web["closing"], FLOWS);
    assert_eq!(web["client_to_lb"]["packets"], packets);
    assert_eq!(web["client_to_lb"]["bytes"], bytes);
    assert_eq!(web["lb_to_backend"]["bytes"], bytes + 20 * packets);
    assert_eq!(report["top_flows"].as_array().unwrap().len(), 5);
    let notes = report["notes"].to_string();
    assert!(
        notes.contains("direct server return"),
        "the report says the return leg is not seen"
    );
    let backends: u64 = report["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["flows"]["new_flows"].as_u64().unwrap())
        .sum();
    assert_eq!(backends, FLOWS as u64);
    assert_eq!(report["events"]["dropped"], 0);
    assert_eq!(
        report["events"]["sent"], 200,
        "an open and a close per flow"
    );

    // Sent against delivered, with each backend's lb_decap counters.
    let sockets: Vec<String> = (0..3)
        .map(|i| t.dir.join(format!("b{i}.sock")).display().to_string())
        .collect();
    let mut args = vec!["report", "--json"];
    for s in &sockets {
        args.push("--decap-socket");
        args.push(s);
    }
    let with_delivered = get(&t, &args);
    for b in with_delivered["backends"]
        .as_array()
        .unwrap()
        .iter()
        .take(3)
    {
        let sent = &b["sent_total"];
        let delivered = &b["delivered"];
        assert_eq!(sent["packets"], delivered["packets"], "{b}");
        assert_eq!(sent["bytes"], delivered["bytes"], "{b}");
    }

    // Events, newest last.
    let events = get(&t, &["events", "--json", "--limit", "500"]);
    let kinds = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["vip"] == "198.18.10.1:80")
        .count();
    assert_eq!(kinds, 200);

    // Metrics: valid text exposition with the same figures.
    let text = t.scrape_metrics();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head
        .to_ascii_lowercase()
        .contains("text/plain; version=0.0.4"));
    check_exposition(body);
    let scrape =
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    };
    assert_eq!(
        value("lb_vip_flows_opened_total", &[("vip", "web")]),
        FLOWS as f64
    );
    assert_eq!(
        value(
            "lb_vip_flows_closed_total",
            &[("vip", "web"), ("reason", "rst")]
        ),
        50.0
    );
    assert_eq!(
        value(
            "lb_vip_bytes_total",
            &[("vip", "web"), ("leg", "client_to_lb")]
        ),
        bytes as f64
    );
    assert_eq!(
        value(
            "lb_backend_weight",
            &[("vip", "web"), ("backend", "198.18.0.11")]
        ),
        100.0
    );
    assert!(value("lb_datapath_packets_total", &[("outcome", "forwarded")]) >= packets as f64);
    // The table had room for every flow, and no pressure shortened the timeouts.
    assert_eq!(value("lb_datapath_flows_unrecorded_total", &[]), 0.0);
    assert_eq!(value("lb_connection_table_timeout_divisor", &[]), 1.0);
    // Lifecycle series: one state per backend is 1, the others 0.
    let b0 = [("vip", "web"), ("backend", "198.18.0.11")];
    let state = |s: &str| value("lb_backend_state", &[b0[0], b0[1], ("state", s)]);
    assert_eq!(state("active"), 1.0);
    for other in [
        "maintenance-pending",
        "draining",
        "in-maintenance",
        "returning",
        "hook-failed",
    ] {
        assert_eq!(state(other), 0.0, "{other}");
    }
    assert_eq!(value("lb_backend_up_to_date", &b0), 1.0);
    assert_eq!(value("lb_backend_maintenance_hook_runs_total", &b0), 0.0);
    let spare = value("lb_vip_spare_capacity_ratio", &[("vip", "web")]);
    assert!((0.0..=1.0).contains(&spare), "{spare}");
    assert_eq!(value("lb_vip_rollout_running", &[("vip", "web")]), 0.0);
}

/// Sets SO_LINGER to zero, so dropping the socket sends RST.
fn linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd as _;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(rc, 0);
}

/// Checks the text exposition strictly: every sample belongs to a family
/// declared with HELP and TYPE before it, names and labels are well formed,
/// counters end in `_total`, and values are numbers.
fn check_exposition(body: &str) {
    let name = regex::Regex::new(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$").unwrap();
    let sample = regex::Regex::new(r#"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? (-?[0-9.eE+-]+|NaN|\+Inf|-Inf)$"#).unwrap();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = std::collections::BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let n = rest.split(' ').next().unwrap();
            assert!(name.is_match(n), "bad name in {line}");
            helped.insert(n.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (n, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            if kind == "counter" {
                assert!(n.ends_with("_total"), "counter {n} must end in _total");
            }
            assert!(
                types.insert(n.to_string(), kind.to_string()).is_none(),
                "{n} declared twice"
            );
        } else if !line.is_empty() {
            let caps = sample
                .captures(line)
                .unwrap_or_else(|| panic!("malformed sample: {line}"));
            let n = &caps[1];
            assert!(
                types.contains_key(n) && helped.contains(n),
                "{n} has no HELP/TYPE"
            );
        }
    }
    assert!(types.len() > 10, "expected the full set of families");
}
