//! `cargo xtask bench`: the datapath's cost per packet against a floor program,
//! the connection table at a million flows, Maglev, the control plane, the flow
//! scan, live forwarding over veth, and source-side balancing (install time
//! against the number of hosts, cost per packet). Each figure is the median of several
//! rounds; ratios are against baselines measured in the same run. Writes
//! `target/bench/results.json` and `target/bench/results.md`.
//! `scaleout` (`scaleout.rs`): the second chance's cost and the
//! convergence of several LB nodes behind an ECMP router.
mod scaleout;
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, ProgramArray},
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, Pod,
};
use lb_common::{DecapOutcome, FlowKey, FlowState, Outcome, PROTO_IPIP, PROTO_TCP, PROTO_UDP};
use lb_tests::{fixture::*, packet::*, topology};
use lb_userspace::datapath::{Datapath as _, MapSizes};
use serde_json::{json, Value};

mod bypass;
mod dlog;
mod maglev;
mod srcside;

const ROUNDS: usize = 5;
const REPEAT: u32 = 1_000_000;
const FRAME_LEN: usize = 128;
/// Runs per round of a new-flow case that the peer runs too: Katran skips its
/// LRU insert above 125,000 new connections per second and CPU.
const NEW_FLOW_REPEAT: u32 = 100_000;
/// Runs of `NEW_FLOW_REPEAT` new flows that overfill a 1,000,000-entry table.
const FILL_RUNS: u32 = 11;

mod katran;
mod peer;

/// Mirrors `BenchFrame` in lb-ebpf/src/bench.rs.
#[repr(C)]
#[derive(Clone, Copy)]
struct BenchFrame {
    port_off: u32,
    addr_off: u32,
    data: [u8; FRAME_LEN],
}
// SAFETY: plain integers and bytes, #[repr(C)], no padding.
unsafe impl Pod for BenchFrame {}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One row of the results table.
struct Row {
    section: &'static str,
    figure: String,
    value: String,
    baseline: String,
    target: String,
    met: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    json: BTreeMap<String, Value>,
}

impl Report {
    fn row(
        &mut self,
        section: &'static str,
        figure: impl Into<String>,
        value: impl Into<String>,
        baseline: impl Into<String>,
        target: impl Into<String>,
        met: Option<bool>,
    ) {
        let r = Row {
            section,
            figure: figure.into(),
            value: value.into(),
            baseline: baseline.into(),
            target: target.into(),
            met,
        };
        println!(
            "  {:<52} {:>16}  {:<22} {}",
            r.figure,
            r.value,
            r.baseline,
            match r.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "",
            }
        );
        self.rows.push(r);
    }

    fn markdown(&self, machine: &str) -> String {
        let mut s = format!("Machine: {machine}\n\n| section | figure | value | baseline / ratio | target | met |\n|---|---|---|---|---|---|\n");
        for r in &self.rows {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            s += &format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.section, r.figure, r.value, r.baseline, r.target, met
            );
        }
        s
    }
}

fn pad(frame: Vec<u8>) -> [u8; FRAME_LEN] {
    assert!(frame.len() <= FRAME_LEN);
    let mut out = [0u8; FRAME_LEN];
    out[..frame.len()].copy_from_slice(&frame);
    out
}

/// The shim and floor programs, with the program under test in the tail-call slot.
struct Shim {
    ebpf: Ebpf,
}

impl Shim {
    fn load() -> Shim {
        let path = root().join("target/ebpf/bpfel-unknown-none/release/lb-bench");
        let mut ebpf =
            Ebpf::load_file(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
        for name in ["bench_shim", "bench_floor", "bench_send"] {
            let p: &mut Xdp = ebpf.program_mut(name).expect(name).try_into().expect("XDP");
            p.load().expect("verifier accepts the bench programs");
        }
        Shim { ebpf }
    }

    /// Puts `name` (from `other`, or from the bench object itself) in the
    /// tail-call slot; `None` selects the floor program.
    fn target(&mut self, other: Option<(&Ebpf, &str)>) {
        let fd = {
            let (obj, name) = other.unwrap_or((&self.ebpf, "bench_floor"));
            let p: &Xdp = obj.program(name).expect(name).try_into().expect("XDP");
            p.fd().expect("loaded").try_clone().expect("dup fd")
        };
        let mut progs = ProgramArray::try_from(self.ebpf.map_mut("BENCH_PROGS").expect("map"))
            .expect("prog array");
        progs.set(0, &fd, 0).expect("tail-call slot");
    }

    /// Puts a program loaded elsewhere (the peer) in the tail-call slot.
    fn target_fd(&mut self, fd: &aya::programs::ProgramFd) {
        let fd = fd.try_clone().expect("dup fd");
        let mut progs = ProgramArray::try_from(self.ebpf.map_mut("BENCH_PROGS").expect("map"))
            .expect("prog array");
        progs.set(0, &fd, 0).expect("tail-call slot");
    }

    fn target_own(&mut self, name: &str) {
        let fd = {
            let p: &Xdp = self
                .ebpf
                .program(name)
                .expect(name)
                .try_into()
                .expect("XDP");
            p.fd().expect("loaded").try_clone().expect("dup fd")
        };
        let mut progs = ProgramArray::try_from(self.ebpf.map_mut("BENCH_PROGS").expect("map"))
            .expect("prog array");
        progs.set(0, &fd, 0).expect("tail-call slot");
    }

    fn frame(&mut self, data: [u8; FRAME_LEN], vary: Option<(u32, u32)>) {
        let (port_off, addr_off) = vary.unwrap_or((0, 0));
        let mut frames: Array<_, BenchFrame> =
            Array::try_from(self.ebpf.map_mut("BENCH_FRAME").expect("map")).expect("array");
        frames
            .set(
                0,
                BenchFrame {
                    port_off,
                    addr_off,
                    data,
                },
                0,
            )
            .expect("frame");
    }

    /// Average ns per run over `repeat` runs, and the last verdict.
    fn run(&self, data: &[u8; FRAME_LEN], repeat: u32) -> (f64, u32) {
        let p: &Xdp = self
            .ebpf
            .program("bench_shim")
            .expect("shim")
            .try_into()
            .expect("XDP");
        let opts = TestRunOptions {
            data_in: Some(data),
            repeat,
            ..Default::default()
        };
        let r = p.test_run(opts).expect("BPF_PROG_TEST_RUN");
        (r.duration.as_nanos() as f64, r.return_value)
    }
}

const V4_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const V4_VIP_TO_V6: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);
const V6_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 1);

fn bench_vips() -> String {
    let v4: Vec<String> = (0..10)
        .map(|i| format!("{{ address = \"198.18.0.{}\" }}", 11 + i))
        .collect();
    let v6: Vec<String> = (0..10)
        .map(|i| format!("{{ address = \"fd00::{:x}\" }}", 0x11 + i))
        .collect();
    let (v4, v6) = (v4.join(", "), v6.join(", "));
    format!(
        "[[vips]]\naddress=\"{V4_VIP}\"\nport=80\nprotocol=\"tcp\"\nbackends=[{v4}]\n\
         [[vips]]\naddress=\"{V4_VIP}\"\nport=53\nprotocol=\"udp\"\nbackends=[{v4}]\n\
         [[vips]]\naddress=\"{V6_VIP}\"\nport=443\nprotocol=\"tcp\"\nbackends=[{v6}]\n\
         [[vips]]\naddress=\"{V4_VIP_TO_V6}\"\nport=80\nprotocol=\"tcp\"\nbackends=[{v6}]\n"
    )
}

fn bench_sizes(flows: u32) -> MapSizes {
    MapSizes {
        maglev_size: 65537,
        maglev_slots: 3 * 8 * 65537,
        max_vips: 8,
        max_backends: 64,
        flow_table_size: flows,
    }
}

fn v4_tcp(dst: Ipv4Addr, flags: u8) -> Vec<u8> {
    eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IPV4,
        &ipv4(CLIENT, dst, PROTO_TCP, &tcp(40000, 80, flags, b"")),
    )
}

/// Offsets the shim rewrites for new-flow cases: the TCP source port and the
/// last two bytes of the IPv4 source address.
const V4_VARY: (u32, u32) = (14 + 20, 14 + 12 + 2);

fn outcome(f: &Fixture, o: Outcome) -> u64 {
    f.outcome(o)
}

/// New flows recorded over every VIP of the fixture.
fn vip_new_flows(f: &Fixture) -> u64 {
    f.balancer
        .vips()
        .iter()
        .map(|(id, _)| f.vip_counters(*id).new_flows)
        .sum()
}

/// Fills the connection table with new flows through `program`, then
/// removes every entry (as the collector's expiry would).
fn recycle_flows(
    f: &mut Fixture,
    shim: &mut Shim,
    program: Option<&'static str>,
    frame: &[u8; FRAME_LEN],
    vary: Option<(u32, u32)>,
) {
    shim.target(program.map(|p| (&f.ebpf, p)));
    shim.frame(*frame, vary);
    for _ in 0..FILL_RUNS {
        shim.run(frame, NEW_FLOW_REPEAT);
    }
    make_room(f, usize::MAX);
}

/// Removes up to `n` connection-table entries.
fn make_room(f: &mut Fixture, n: usize) {
    let keys: Vec<_> = f.flows().into_iter().take(n).map(|(k, _)| k).collect();
    let dp = f.balancer.datapath_mut();
    for k in &keys {
        dp.remove_flow(k).expect("removing a flow");
    }
}

/// Keeps the benchmark on one CPU: the shim's per-CPU run counter (the
/// source of new flows) and both sides' per-CPU state then stay the same
/// from round to round.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t with one CPU set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!(
                "could not pin to CPU 0: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn datapath_cost(report: &mut Report) -> BTreeMap<&'static str, f64> {
    println!("== datapath cost per packet (BPF_PROG_TEST_RUN, {REPEAT} runs per round, median of {ROUNDS})");
    pin_to_cpu0();
    let mut f = Fixture::with_sizes(bench_sizes(1_000_000), &bench_vips());
    f.add_decap_address("198.18.0.11".parse().unwrap());
    let mut shim = Shim::load();
    let encapsulated = {
        let inner = ipv4(CLIENT, V4_VIP, PROTO_TCP, &tcp(40000, 80, TCP_ACK, b""));
        eth(
            NEXT_HOP_MAC,
            LB_MAC,
            ETH_IPV4,
            &encap_ipv4(
                Ipv4Addr::new(198, 18, 200, 7),
                Ipv4Addr::new(198, 18, 0, 11),
                PROTO_IPIP,
                &inner,
            ),
        )
    };
    struct Case {
        key: &'static str,
        name: &'static str,
        program: Option<&'static str>,
        frame: Vec<u8>,
        vary: Option<(u32, u32)>,
        verdict: u32,
        counted: Option<Outcome>,
        /// Run with tracers and flow events switched off.
        untraced: bool,
        /// Also run through the peer (Katran), when one is given.
        katran: bool,
        /// Runs per round (new-flow cases against the peer stay under its
        /// per-CPU new-connection limit).
        repeat: u32,
    }
    let cases = vec![
        Case {
            key: "floor",
            name: "floor: swap MACs, XDP_TX",
            program: None,
            frame: v4_tcp(V4_VIP, TCP_ACK),
            vary: None,
            verdict: XDP_TX,
            counted: None,
            untraced: false,
            katran: false,
            repeat: REPEAT,
        },
        Case {
            key: "v4_syn_new",
            name: "IPv4 TCP SYN, new flow each run, the table with room",
            program: Some("lb_ingress"),
            frame: v4_tcp(V4_VIP, TCP_SYN),
            vary: Some(V4_VARY),
            verdict: XDP_TX,
            counted: Some(Outcome::Forwarded),
            untraced: false,
            katran: true,
            repeat: NEW_FLOW_REPEAT,
        },
        Case {
            key: "v4_syn_full",
            name: "IPv4 TCP SYN, new flow into the full 1M-entry table",
            program: Some("lb_ingress"),
            frame: v4_tcp(V4_VIP, TCP_SYN),
            vary: Some(V4_VARY),
            verdict: XDP_TX,
            counted: Some(Outcome::Forwarded),
            untraced: false,
            katran: true,
            repeat: NEW_FLOW_REPEAT,
        },
        Case {
            key: "v4_established",
            name: "IPv4 TCP established",
            program: Some("lb_ingress"),
            frame: v4_tcp(V4_VIP, TCP_ACK),
            vary: None,
            verdict: XDP_TX,
            counted: Some(Outcome::Forwarded),
            untraced: false,
            katran: true,
            repeat: REPEAT,
        },
        Case {
            key: "v4_udp",
            name: "IPv4 UDP",
            program: Some("lb_ingress"),
            frame: eth(
                LB_MAC,
                CLIENT_MAC,
                ETH_IPV4,
                &ipv4(CLIENT, V4_VIP, PROTO_UDP, &udp(5000, 53, b"query")),
            ),
            vary: None,
            verdict: XDP_TX,
            counted: Some(Outcome::Forwarded),
            untraced: false,
            katran: true,
            repeat: REPEAT,
        },
        Case {
            key: "v6_established",
            name: "IPv6 TCP established",
            program: Some("lb_ingress"),
            frame: eth(
                LB_MAC,
                CLIENT_MAC,
                ETH_IPV6,
                &ipv6(
                    CLIENT6,
                    V6_VIP,
                    PROTO_TCP,
                    0,
                    64,
                    &tcp(40000, 443, TCP_ACK, b""),
                ),
            ),
            vary: None,
            verdict: XDP_TX,
            counted: Some(Outcome::Forwarded),
            untraced: false,
            katran: true,
            repeat: REPEAT,
        },
        Case {
            key: "v4_to_v6",
            name: "IPv4 client to IPv6 backend",
            program: Some("lb_ingress"),
            frame: v4_tcp(V4_VIP_TO_V6, TCP_ACK),
            vary: None,
            verdict: XDP_TX,
            counted: Some(Outcome::Forwarded),
            untraced: false,
            katran: true,
            repeat: REPEAT,
        },
        Case {
            key: "pass",
            name: "non-VIP traffic passed",
            program: Some("lb_ingress"),
            frame: v4_tcp(Ipv4Addr::new(198, 18, 0, 99), TCP_ACK),
            vary: None,
            verdict: XDP_PASS,
            counted: Some(Outcome::PassNotVip),
            untraced: false,
            katran: true,
            repeat: REPEAT,
        },
        Case {
            key: "decap",
            name: "lb_decap on an IPIP packet",
            program: Some("lb_decap"),
            frame: encapsulated,
            vary: None,
            verdict: XDP_PASS,
            counted: None,
            untraced: false,
            katran: false,
            repeat: REPEAT,
        },
        Case {
            key: "v4_syn_new_untraced",
            name: "IPv4 TCP SYN, new flow, tracers and events off",
            program: Some("lb_ingress"),
            frame: v4_tcp(V4_VIP, TCP_SYN),
            vary: Some(V4_VARY),
            verdict: XDP_TX,
            counted: Some(Outcome::Forwarded),
            untraced: true,
            katran: false,
            repeat: NEW_FLOW_REPEAT,
        },
        Case {
            key: "v4_established_untraced",
            name: "IPv4 TCP established, tracers off",
            program: Some("lb_ingress"),
            frame: v4_tcp(V4_VIP, TCP_ACK),
            vary: None,
            verdict: XDP_TX,
            counted: Some(Outcome::Forwarded),
            untraced: true,
            katran: true,
            repeat: REPEAT,
        },
    ];
    // The floor runs right before every round of every case, and each case is
    // reported as the median of its per-round ratios: the machine's drift
    // (other tenants, frequency) cancels out of the ratio.
    let floor_frame = pad(v4_tcp(V4_VIP, TCP_ACK));
    let mut ns = BTreeMap::new();
    let mut ratios = BTreeMap::new();
    let mut traced = true;
    let mut peer_ratios = BTreeMap::new();
    let mut katran = peer::load();
    // LB_BENCH_CASES=key,key runs only those cases (for profiling one path).
    let only = std::env::var("LB_BENCH_CASES").ok();
    let only: Option<Vec<&str>> = only.as_deref().map(|s| s.split(',').collect());
    for c in cases {
        if c.key != "floor" && only.as_ref().is_some_and(|o| !o.contains(&c.key)) {
            continue;
        }
        if c.untraced && traced {
            f.apply(&format!(
                "[visibility]\ntrace_flows = false\nevent_sample = 0\n{}",
                bench_vips()
            ));
            traced = false;
        }
        let data = pad(c.frame);
        // New flows with room: the table starts empty, and the rounds
        // (NEW_FLOW_REPEAT × ROUNDS) stay under its size. It is filled and
        // emptied first, as a table in service has been: its free entries
        // are then scattered over its memory, not in allocation order.
        let with_room = matches!(c.key, "v4_syn_new" | "v4_syn_new_untraced");
        if with_room {
            recycle_flows(&mut f, &mut shim, c.program, &data, c.vary);
        }
        // Warm up (and, for established cases, create the flow).
        shim.target(c.program.map(|p| (&f.ebpf, p)));
        shim.frame(data, c.vary);
        shim.run(&data, 1000);
        if c.key == "v4_syn_full" {
            // Past the table's size: from here on no insert finds room (a
            // kernel LRU, Katran's, evicts on each).
            for _ in 0..FILL_RUNS {
                shim.run(&data, NEW_FLOW_REPEAT);
            }
        }
        let new_before = vip_new_flows(&f);
        let unrecorded_before = f.balancer.datapath().flows_unrecorded().expect("counter");
        let mut peer = katran.as_mut().filter(|_| c.katran);
        let peer_before = peer.as_deref_mut().map(|k| {
            peer::prepare(
                k,
                &mut shim,
                &data,
                c.vary,
                c.verdict,
                c.key == "v4_syn_full",
            )
        });
        let before = c.counted.map(|o| outcome(&f, o));
        let decap_before = f.decap_outcomes()[DecapOutcome::Decapsulated as usize].packets;
        let (mut samples, mut per_round) = (Vec::new(), Vec::new());
        let (mut to_peer, mut peer_to_floor) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            shim.target(None);
            shim.frame(floor_frame, None);
            let (floor_ns, verdict) = shim.run(&floor_frame, c.repeat);
            assert_eq!(verdict, XDP_TX, "floor: unexpected verdict");
            shim.target(c.program.map(|p| (&f.ebpf, p)));
            shim.frame(data, c.vary);
            let (t, verdict) = shim.run(&data, c.repeat);
            assert_eq!(verdict, c.verdict, "{}: unexpected verdict", c.name);
            samples.push(t);
            per_round.push(t / floor_ns);
            if let Some(k) = peer.as_deref_mut() {
                let kt = peer::run(k, &mut shim, &data, c.vary, c.repeat, c.verdict);
                to_peer.push(t / kt);
                peer_to_floor.push(kt / floor_ns);
            }
        }
        let runs = u64::from(c.repeat) * ROUNDS as u64;
        if let (Some(k), Some(b)) = (peer.as_deref(), peer_before) {
            peer::check(k, &b, runs, c.verdict, c.vary.is_some(), c.name);
            peer_ratios.insert(c.key, (median(to_peer), median(peer_to_floor)));
        }
        if let (Some(o), Some(b)) = (c.counted, before) {
            assert_eq!(
                outcome(&f, o) - b,
                runs,
                "{}: not every run was {:?}",
                c.name,
                o
            );
        }
        // Every run of a new-flow case was what it says: recorded with room,
        // forwarded without an entry into the full table.
        if with_room {
            assert_eq!(
                vip_new_flows(&f) - new_before,
                runs,
                "{}: not every run recorded a new flow",
                c.name
            );
        }
        if c.key == "v4_syn_full" {
            assert_eq!(
                f.balancer.datapath().flows_unrecorded().expect("counter") - unrecorded_before,
                runs,
                "{}: not every run found the table full",
                c.name
            );
        }
        if c.key == "decap" {
            assert_eq!(
                f.decap_outcomes()[DecapOutcome::Decapsulated as usize].packets - decap_before,
                runs,
                "decap: not every run decapsulated"
            );
        }
        ns.insert(c.key, median(samples));
        ratios.insert(c.key, median(per_round));
        if c.key == "v4_syn_full" {
            // What the collector's expiry does for the cases after: room
            // for their flows, in a table still nine-tenths full.
            make_room(&mut f, 100_000);
        }
    }
    let names = [
        ("floor", "floor: swap MACs, XDP_TX", None),
        (
            "v4_syn_new",
            "IPv4 TCP SYN, new flow each run, the table with room",
            Some(5.0),
        ),
        (
            "v4_syn_full",
            "IPv4 TCP SYN, new flow into the full 1M-entry table",
            None,
        ),
        ("v4_established", "IPv4 TCP established", Some(3.0)),
        ("v4_udp", "IPv4 UDP (established)", Some(3.0)),
        ("v6_established", "IPv6 TCP established", Some(3.0)),
        (
            "v4_to_v6",
            "IPv4 client to IPv6 backend (established)",
            Some(3.0),
        ),
        ("pass", "non-VIP traffic passed", None),
        ("decap", "lb_decap on an IPIP packet", None),
        (
            "v4_syn_new_untraced",
            "IPv4 TCP SYN, new flow, tracers and events off",
            None,
        ),
        (
            "v4_established_untraced",
            "IPv4 TCP established, tracers off",
            None,
        ),
    ];
    for (key, name, target) in names {
        let Some(&ratio) = ratios.get(key) else {
            continue;
        };
        let (t, met) = match target {
            Some(x) => (format!("≤ {x}× floor"), Some(ratio <= x)),
            None => (String::new(), None),
        };
        report.row(
            "datapath",
            name,
            format!("{:.1} ns", ns[key]),
            format!("{ratio:.2}× floor"),
            t,
            met,
        );
        report
            .json
            .insert(format!("datapath.{key}.ns"), json!(ns[key]));
        report
            .json
            .insert(format!("datapath.{key}.ratio_to_floor"), json!(ratio));
    }
    // What the tracers cost: the same case with them on and off, in floor
    // units (each measured against the floor of its own rounds).
    for (on, off, what) in [
        (
            "v4_established",
            "v4_established_untraced",
            "tracer cost, established packet",
        ),
        (
            "v4_syn_new",
            "v4_syn_new_untraced",
            "tracer and event cost, new flow",
        ),
    ] {
        let (Some(r_on), Some(r_off)) = (ratios.get(on), ratios.get(off)) else {
            continue;
        };
        let delta = r_on - r_off;
        report.row(
            "datapath",
            what,
            format!("{delta:+.2}× floor"),
            format!("≈ {:+.0} ns at this run's floor", delta * ns["floor"]),
            "",
            None,
        );
        report
            .json
            .insert(format!("datapath.{on}.tracer_cost_ratio"), json!(delta));
    }
    peer::report(report, &peer_ratios);
    ns
}

/// Memory the kernel charges for a map (fdinfo `memlock`).
fn memlock(map: &aya::maps::MapData) -> u64 {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = map.fd().as_fd().as_raw_fd();
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("fdinfo");
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn outer_dst_v4(frame: &[u8]) -> [u8; 4] {
    [frame[30], frame[31], frame[32], frame[33]]
}

fn connection_table(report: &mut Report) {
    println!("== connection table at 1,000,000 flows");
    let f = Fixture::with_sizes(bench_sizes(1_000_000), &bench_vips());
    let mut shim = Shim::load();
    // 1000 established flows, and the backend each was given.
    let samples: Vec<(Vec<u8>, [u8; 4])> = (0..1000u16)
        .map(|i| {
            let ip = ipv4(
                Ipv4Addr::new(198, 18, 60, (i % 250) as u8 + 1),
                V4_VIP,
                PROTO_TCP,
                &tcp(20000 + i, 80, TCP_SYN, b""),
            );
            let frame = eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &ip);
            let out = f.ingress(&frame).output;
            let ack = eth(
                LB_MAC,
                CLIENT_MAC,
                ETH_IPV4,
                &ipv4(
                    Ipv4Addr::new(198, 18, 60, (i % 250) as u8 + 1),
                    V4_VIP,
                    PROTO_TCP,
                    &tcp(20000 + i, 80, TCP_ACK, b""),
                ),
            );
            (ack, outer_dst_v4(&out))
        })
        .collect();
    // Fill: a new flow per run, twice the table's size, through lb_ingress.
    shim.target(Some((&f.ebpf, "lb_ingress")));
    let data = pad(v4_tcp(V4_VIP, TCP_SYN));
    shim.frame(data, Some(V4_VARY));
    // The first 200,000 inserts find free entries; once the table is full,
    // later flows are forwarded without an entry (no collector runs here).
    let (filling_ns, _) = shim.run(&data, 200_000);
    let mut rates = Vec::new();
    for _ in 0..ROUNDS {
        let (ns, verdict) = shim.run(&data, 400_000);
        assert_eq!(verdict, XDP_TX);
        rates.push(1e9 / ns);
    }
    let rate = median(rates);
    let entries = f.flows().len();
    let flows_map = f.balancer.datapath().flows_map();
    let flows_mem = memlock(flows_map);
    let mut total_mem = flows_mem;
    for name in [
        "VIPS",
        "MAGLEV",
        "BACKENDS",
        "SETTINGS",
        "VIP_STATS",
        "BACKEND_STATS",
        "OUTCOMES",
    ] {
        if let Some(m) = f.ebpf.map(name) {
            total_mem += memlock(map_data(m));
        }
    }
    let still_there = samples
        .iter()
        .filter(|(ack, _)| {
            let ip = &ack[14..];
            let key = flow_key(
                IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])),
                IpAddr::V4(V4_VIP),
                u16::from_be_bytes([ip[20], ip[21]]),
                80,
                PROTO_TCP,
            );
            f.flow(&key).is_some()
        })
        .count();
    let kept = samples
        .iter()
        .filter(|(ack, backend)| outer_dst_v4(&f.ingress(ack).output) == *backend)
        .count();
    report.row(
        "connection table",
        "new flow while the table fills (no eviction)",
        format!("{filling_ns:.0} ns"),
        format!("{:.2} M/s", 1e3 / filling_ns),
        "",
        None,
    );
    report.row(
        "connection table",
        "new flow into the full table (forwarded by Maglev, no entry)",
        format!("{:.0} ns", 1e9 / rate),
        format!("{:.2} M/s", rate / 1e6),
        "",
        None,
    );
    report.row(
        "connection table",
        "entries after 2,200,000 new flows (max 1,000,000)",
        entries.to_string(),
        "",
        "",
        None,
    );
    report.row(
        "connection table",
        "FLOWS map memory (kernel memlock)",
        format!("{:.0} MiB", flows_mem as f64 / 1048576.0),
        format!("{:.0} B/flow", flows_mem as f64 / 1e6),
        "",
        None,
    );
    report.row(
        "connection table",
        "all balancer maps (M = 65537, 8 VIPs)",
        format!("{:.0} MiB", total_mem as f64 / 1048576.0),
        "",
        "",
        None,
    );
    report.row(
        "connection table",
        "early flows pushed out by the fill",
        format!("{}/1000", 1000 - still_there),
        "",
        "",
        None,
    );
    report.row(
        "connection table",
        "early flows still on their backend after the fill",
        format!("{kept}/1000"),
        "",
        "1000/1000",
        Some(kept == 1000),
    );
    report
        .json
        .insert("conntrack.insert_rate_per_s".into(), json!(rate));
    report
        .json
        .insert("conntrack.entries".into(), json!(entries));
    report
        .json
        .insert("conntrack.flows_map_bytes".into(), json!(flows_mem));
    report
        .json
        .insert("conntrack.all_maps_bytes".into(), json!(total_mem));
    report
        .json
        .insert("conntrack.kept_backend".into(), json!(kept));

    println!("== report scan of the connection table");
    let n = f.flows().len();
    let mut batch = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let mut count = 0usize;
        lb_userspace::datapath::for_each(flows_map, 8192, |_: &FlowKey, _: &FlowState| count += 1)
            .expect("scan");
        batch.push(t.elapsed().as_secs_f64());
        assert!(count >= n * 99 / 100, "scan saw {count} of {n}");
    }
    let per_elem = {
        use std::os::fd::AsFd as _;
        // A second handle on the same kernel map, for aya's element-wise walk.
        let fd = flows_map.fd().as_fd().try_clone_to_owned().expect("dup fd");
        let data = aya::maps::MapData::from_fd(fd).expect("map from fd");
        let map: aya::maps::HashMap<_, FlowKey, FlowState> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("map");
        let t = Instant::now();
        let count = map.iter().filter(|r| r.is_ok()).count();
        assert!(count >= n * 99 / 100);
        t.elapsed().as_secs_f64()
    };
    let batch = median(batch);
    // What a report costs: one collector pass (scan, phases, expiry check,
    // per-VIP and per-backend aggregates, top flows) over the whole table.
    let mut f = f;
    let vip_ids: Vec<u32> = f.balancer.vips().iter().map(|(id, _)| *id).collect();
    let backend_ids: Vec<u32> = f.balancer.backend_ids().iter().map(|(id, _)| *id).collect();
    let mut passes = Vec::new();
    // No table size: the pass reads and aggregates the full table without
    // the early expiry a nearly full table would get (that would measure
    // deleting it).
    let mut collector = lb_userspace::collector::Collector::new(
        &lb_userspace::config::VisibilityConfig::default(),
        0,
    );
    for _ in 0..ROUNDS {
        let t = Instant::now();
        collector
            .collect(
                f.balancer.datapath_mut(),
                lb_userspace::collector::monotonic_ns(),
                &vip_ids,
                &backend_ids,
            )
            .expect("collect");
        passes.push(t.elapsed().as_secs_f64());
    }
    let pass = median(passes);
    report.row(
        "report scan",
        format!(
            "collector pass (report data) over {} flows",
            collector.flows_in_table
        ),
        format!("{:.0} ms", pass * 1e3),
        format!(
            "≈ {:.0} ms per 100,000 flows",
            pass * 1e5 / collector.flows_in_table.max(1) as f64 * 1e3
        ),
        "≤ 1 s for 100,000",
        Some(pass * 1e5 / (collector.flows_in_table.max(1) as f64) <= 1.0),
    );
    report
        .json
        .insert("scan.collector_pass_s".into(), json!(pass));
    // The agent scans and expires outside its state lock and holds the lock
    // only to take the result in: how long the lock is held per collection.
    let mut table = f.balancer.datapath().flow_table().expect("flow table");
    let (mut outside, mut inside) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let mut scan = lb_userspace::collector::scan(
            &table,
            collector.timeouts,
            lb_userspace::collector::monotonic_ns(),
        )
        .expect("scan");
        lb_userspace::collector::expire(&mut table, &mut scan).expect("expire");
        outside.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        collector
            .absorb(
                scan,
                f.balancer.datapath(),
                lb_userspace::collector::monotonic_ns(),
                &vip_ids,
                &backend_ids,
            )
            .expect("absorb");
        inside.push(t.elapsed().as_secs_f64());
    }
    let (outside, inside) = (median(outside), median(inside));
    report.row(
        "report scan",
        format!(
            "agent state lock held per collection, {} flows",
            collector.flows_in_table
        ),
        format!("{:.2} ms", inside * 1e3),
        format!(
            "{:.0} ms of scan and expiry outside it ({:.4}× the whole pass)",
            outside * 1e3,
            inside / (inside + outside)
        ),
        "",
        None,
    );
    report.json.insert("scan.lock_held_s".into(), json!(inside));
    report.row(
        "report scan",
        format!("read {n} flows, batch lookups"),
        format!("{:.0} ms", batch * 1e3),
        format!(
            "{:.0} ms per element ({:.1}×)",
            per_elem * 1e3,
            per_elem / batch
        ),
        "≤ 1 s (for 1,000,000)",
        Some(batch * 1e6 / n as f64 <= 1.0),
    );
    report.json.insert("scan.flows".into(), json!(n));
    report.json.insert("scan.batch_s".into(), json!(batch));
    report
        .json
        .insert("scan.per_element_s".into(), json!(per_elem));
}

fn big_config(instance: &str, socket: &str, weight: u32) -> String {
    let mut s = format!(
        "instance = \"{instance}\"\nsocket = \"{socket}\"\n[datapath]\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nmaglev_table_size = 65537\nmax_vips = 1000\nmax_backends = 256\nflow_table_size = 65536\n[lifecycle]\nstate_file = \"{socket}.lifecycle.json\"\n[encap]\nsource_v4 = \"198.18.200.0/24\"\n"
    );
    for i in 0..1000u32 {
        let backends: Vec<String> = (0..10u32)
            .map(|j| {
                format!(
                    "{{ address = \"198.18.0.{}\", weight = {} }}",
                    11 + (i + j * 7) % 100,
                    weight + j
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

fn control_plane(report: &mut Report) {
    println!("== control plane: lbctl apply of 1,000 VIPs x 10 backends");
    let id = format!("lbb{}", std::process::id());
    let (ns, peer) = (format!("{id}-lb"), format!("{id}-nb"));
    let dir = std::env::temp_dir().join(&id);
    std::fs::create_dir_all(&dir).expect("dir");
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
    let mut guard = Guard(vec![ns.clone(), peer.clone()], dir.clone(), None);
    for n in [&ns, &peer] {
        topology::must(&["ip", "netns", "add", n]);
    }
    topology::must(&[
        "ip", "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
        &peer,
    ]);
    topology::must(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        "198.18.0.2/24",
        "dev",
        "eth0",
    ]);
    topology::must(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
    topology::must(&["ip", "-n", &peer, "link", "set", "eth0", "up"]);
    // The 100 backends are neighbours with known MACs, so resolution is instant.
    for b in 0..100u32 {
        topology::must(&[
            "ip",
            "-n",
            &ns,
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
    let socket = dir.join("lb.sock");
    let socket_s = socket.display().to_string();
    let initial = dir.join("initial.toml");
    let small = big_config(&id, &socket_s, 100);
    let first_vip_end = small
        .match_indices("[[vips]]")
        .nth(1)
        .map(|(i, _)| i)
        .expect("two vips");
    std::fs::write(&initial, &small[..first_vip_end]).expect("write");
    let log = std::fs::File::create(dir.join("agent.log")).expect("log");
    let child = topology::agent_command(&ns)
        .arg("--config")
        .arg(&initial)
        .stderr(log)
        .spawn()
        .expect("agent");
    let pid = child.id();
    guard.2 = Some(child);
    let lbctl = |args: &[&str]| {
        Command::new(topology::bin("lbctl"))
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .expect("lbctl")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lbctl(&["status", "--json"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "agent did not start: {}",
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut times = Vec::new();
    for round in 0..ROUNDS as u32 {
        // Every round changes every VIP's weights: 1000 tables rebuilt and rewritten.
        let path = dir.join(format!("big{round}.toml"));
        std::fs::write(&path, big_config(&id, &socket_s, 100 + round * 10)).expect("write");
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
    let status: Value =
        serde_json::from_slice(&lbctl(&["status", "--json"]).stdout).expect("status");
    let vips = status["vips"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(vips, 1000, "the datapath does not hold 1000 VIPs");
    let status_text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |field: &str| -> u64 {
        status_text
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let (rss_kib, anon_kib) = (kib("VmRSS:"), kib("RssAnon:"));
    let t = median(times);
    report.row(
        "control plane",
        "lbctl apply, 1,000 VIPs × 10 backends (all changed)",
        format!("{t:.3} s"),
        "",
        "≤ 1 s",
        Some(t <= 1.0),
    );
    report.row(
        "control plane",
        "agent private memory (RssAnon) at that size",
        format!("{:.0} MiB", anon_kib as f64 / 1024.0),
        format!("RSS {:.0} MiB incl. mapped rings", rss_kib as f64 / 1024.0),
        "",
        None,
    );
    report
        .json
        .insert("control.agent_rss_anon_kib".into(), json!(anon_kib));
    report
        .json
        .insert("control.apply_1000_vips_s".into(), json!(t));
    report
        .json
        .insert("control.agent_rss_kib".into(), json!(rss_kib));
    drop(guard);
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

fn main() {
    let machine = machine();
    println!("lb benchmarks on {machine}");
    let mut report = Report::default();
    // `lb-bench [section ...]` runs only the named sections; results files are
    // written only for a full run.
    let mut only: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--peer" {
            let v = args.next().unwrap_or_default();
            let Some(path) = v.strip_prefix("katran=") else {
                eprintln!("--peer: expected katran=PATH/balancer.bpf.o, got {v:?}");
                std::process::exit(2);
            };
            peer::KATRAN_OBJECT.set(path.into()).expect("one --peer");
        } else {
            only.push(a);
        }
    }
    type Section = (&'static str, fn(&mut Report));
    let sections: [Section; 8] = [
        ("datapath", |r| {
            datapath_cost(r);
            // A run filtered to some cases (LB_BENCH_CASES) is for one path.
            if std::env::var_os("LB_BENCH_CASES").is_none() {
                dlog::run(r);
            }
        }),
        ("conntrack", connection_table),
        ("maglev", maglev::run),
        ("control", control_plane),
        ("live", live::forwarding),
        ("scaleout", scaleout::run),
        ("srcside", srcside::run),
        ("bypass", bypass::run),
    ];
    for (name, run) in sections {
        if only.is_empty() || only.iter().any(|o| o == name) {
            run(&mut report);
        }
    }
    if !only.is_empty() {
        return;
    }

    let out = root().join("target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    let json =
        json!({ "machine": machine, "rounds": ROUNDS, "repeat": REPEAT, "figures": report.json });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("write json");
    let md = report.markdown(&machine);
    std::fs::write(out.join("results.md"), &md).expect("write md");
    println!("\n{md}");
    println!("written: target/bench/results.json, target/bench/results.md");
}

mod live {
    //! Live forwarding over veth: a generator sends real frames at the LB's
    //! interface (`BPF_PROG_TEST_RUN` in live-frames mode, which is what
    //! xdp-trafficgen does; xdp-trafficgen 1.3.1 itself cannot load on this
    //! kernel). `lb_ingress` and then the floor program run on the LB's veth
    //! and are measured from the same place: the veth's XDP_TX counter.
    use super::*;
    use aya::programs::{TestRunAttrs, XdpMode};

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
                        format!("live.{}", name.split(',').next().unwrap_or(name).replace(' ', "_")),
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

    fn measure() -> Result<Rows, String> {
        let id = format!("lbl{}", std::process::id());
        let (gen, lb) = (format!("{id}-gen"), format!("{id}-lb"));
        let config = std::env::temp_dir().join(format!("{id}.toml"));
        let mut net = Net(vec![gen.clone(), lb.clone()], None, config.clone());
        for n in [&gen, &lb] {
            topology::must(&["ip", "netns", "add", n]);
        }
        topology::must(&[
            "ip", "-n", &gen, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", &lb,
        ]);
        topology::must(&[
            "ip",
            "-n",
            &gen,
            "addr",
            "add",
            "198.18.0.1/24",
            "dev",
            "eth0",
        ]);
        topology::must(&[
            "ip",
            "-n",
            &lb,
            "addr",
            "add",
            "198.18.0.2/24",
            "dev",
            "eth0",
        ]);
        for n in [&gen, &lb] {
            topology::must(&["ip", "-n", n, "link", "set", "eth0", "up"]);
        }
        for b in 0..3 {
            topology::must(&[
                "ip",
                "-n",
                &lb,
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
        let mac_out = Command::new("ip")
            .args(["netns", "exec", &lb, "cat", "/sys/class/net/eth0/address"])
            .output()
            .map_err(|e| e.to_string())?;
        let lb_mac: Vec<u8> = String::from_utf8_lossy(&mac_out.stdout)
            .trim()
            .split(':')
            .filter_map(|h| u8::from_str_radix(h, 16).ok())
            .collect();
        let lb_mac: [u8; 6] = lb_mac
            .try_into()
            .map_err(|_| "cannot read the LB's MAC".to_string())?;
        // A UDP every-port VIP; the small flow table makes the rotating
        // new-flow mix miss on every packet.
        let socket = std::env::temp_dir().join(format!("{id}.sock"));
        let state = std::env::temp_dir().join(format!("{id}.lifecycle.json"));
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
        // Drains what the LB sends back (the veth needs an XDP program to run NAPI for it).
        let (tx, rx) = std::sync::mpsc::channel::<(bool, u32)>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<f64>();
        let generator = topology::in_netns(&gen, move || {
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
            while let Ok((vary, idx)) = rx.recv() {
                let vary = vary.then_some((14 + 20, 14 + 12 + 2));
                shim.frame(frame, vary);
                let ifx = if idx == 0 { ifindex } else { idx };
                done_tx.send(generate(&shim, &frame, ifx)).expect("report");
            }
            drop(drain);
        });
        let log = std::fs::File::create(std::env::temp_dir().join(format!("{id}.log")))
            .map_err(|e| e.to_string())?;
        let child = topology::agent_command(&lb)
            .arg("--config")
            .arg(&config)
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        net.1 = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !Command::new(topology::bin("lbctl"))
            .arg("--socket")
            .arg(&socket)
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
        let forwarded = || -> u64 {
            let out = Command::new(topology::bin("lbctl"))
                .arg("--socket")
                .arg(&socket)
                .args(["status", "--json"])
                .output()
                .expect("lbctl");
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            v["outcomes"]
                .as_array()
                .and_then(|a| a.iter().find(|o| o["outcome"] == "forwarded"))
                .and_then(|o| o["packets"].as_u64())
                .unwrap_or(0)
        };
        let run = |vary: bool| -> (f64, u64) {
            let mut rates = Vec::new();
            let mut lb_count = 0;
            for _ in 0..ROUNDS {
                let (before, fwd) = (xdp_tx(&lb), forwarded());
                tx.send((vary, 0)).expect("generator");
                let secs = done_rx.recv().expect("generator result");
                std::thread::sleep(Duration::from_millis(50));
                rates.push((xdp_tx(&lb) - before) as f64 / secs);
                lb_count += forwarded().saturating_sub(fwd);
            }
            (median(rates), lb_count)
        };
        let (est, est_fwd) = run(false);
        let (new, new_fwd) = run(true);
        // The floor on the same interface, same generator.
        // The agent's XDP link is pinned (it outlives a stopped agent), so
        // it is stopped with its datapath detached and its pins removed.
        if let Some(mut c) = net.1.take() {
            let detached = Command::new(topology::bin("lbctl"))
                .arg("--socket")
                .arg(&socket)
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
        let floor_prog = topology::in_netns(&lb, || {
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
        .map_err(|_| "attaching the floor program failed".to_string())?;
        let floor_run = |vary: bool| -> f64 {
            let mut rates = Vec::new();
            for _ in 0..ROUNDS {
                let before = xdp_tx(&lb);
                tx.send((vary, 0)).expect("generator");
                let secs = done_rx.recv().expect("generator result");
                std::thread::sleep(Duration::from_millis(50));
                rates.push((xdp_tx(&lb) - before) as f64 / secs);
            }
            median(rates)
        };
        let floor_est = floor_run(false);
        let floor_new = floor_run(true);
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
}
