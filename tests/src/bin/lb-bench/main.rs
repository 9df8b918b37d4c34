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
mod conntrack;
mod control;
mod dlog;
mod live;
mod maglev;
mod srcside;

const ROUNDS: usize = 5;
/// Most rounds of the datapath section (`LB_BENCH_ROUNDS`): the new-flow
/// cases with room must stay under the table's 1,000,000 entries.
const MAX_DATAPATH_ROUNDS: usize = 9;
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

/// A client's SYN as the common stacks send it: the MSS option first (1460,
/// which the datapath clamps to what fits the backend's link), then NOP,
/// NOP, SACK permitted.
fn v4_syn(dst: Ipv4Addr) -> Vec<u8> {
    let options = [2, 4, 0x05, 0xb4, 1, 1, 4, 2];
    eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IPV4,
        &ipv4(
            CLIENT,
            dst,
            PROTO_TCP,
            &tcp_with_options(40000, 80, TCP_SYN, &options, b""),
        ),
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

/// Keeps the datapath cases on one CPU: the shim's per-CPU run counter (the
/// source of new flows) and both sides' per-CPU state then stay the same
/// from round to round. Returns the CPUs allowed before, for `unpin`: the
/// later sections start agents, which would inherit the pin.
fn pin_to_cpu0() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t values for this thread; zeroed is a valid empty set.
    unsafe {
        let mut before: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut before);
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!(
                "could not pin to CPU 0: {}",
                std::io::Error::last_os_error()
            );
        }
        before
    }
}

/// Allows the CPUs of `before` again.
fn unpin(before: &libc::cpu_set_t) {
    // SAFETY: a cpu_set_t that sched_getaffinity filled.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), before) };
}

fn datapath_cost(report: &mut Report) -> BTreeMap<&'static str, f64> {
    // LB_BENCH_ROUNDS=N (up to 9) runs more rounds, for a steadier median
    // when comparing two builds.
    let rounds = std::env::var("LB_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse::<usize>().ok())
        .map_or(ROUNDS, |r| r.clamp(1, MAX_DATAPATH_ROUNDS));
    println!("== datapath cost per packet (BPF_PROG_TEST_RUN, {REPEAT} runs per round, median of {rounds})");
    let cpus = pin_to_cpu0();
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
            frame: v4_syn(V4_VIP),
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
            frame: v4_syn(V4_VIP),
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
            frame: v4_syn(V4_VIP),
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
        // (NEW_FLOW_REPEAT × rounds) stay under its size. It is filled and
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
        for _ in 0..rounds {
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
        let runs = u64::from(c.repeat) * rounds as u64;
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
    unpin(&cpus);
    ns
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
        ("conntrack", conntrack::connection_table),
        ("maglev", maglev::run),
        ("control", control::control_plane),
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
