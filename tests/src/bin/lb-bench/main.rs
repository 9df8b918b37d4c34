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
use lb_common::{DecapOutcome, Outcome, PROTO_IPIP, PROTO_TCP, PROTO_UDP};
use lb_tests::{fixture::*, packet::*, topology};
use lb_userspace::datapath::{Datapath as _, MapSizes};
use serde_json::{json, Value};

mod bypass;
mod conntrack;
mod control;
mod datapath;
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
            datapath::datapath_cost(r);
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
