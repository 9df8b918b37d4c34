//! What the datapath logs (`lb-agent --datapath-log`) cost: the same object
//! loaded twice, logs off and on. Off, the verifier must have removed the
//! logging code: the translated programs are counted, and the off ones must
//! not reference the log ring at all; the established-flow and non-VIP cases
//! are timed against the floor in the same rounds.
use super::*;

const PROGRAMS: [&str; 3] = ["lb_ingress", "lb_decap", "lb_source"];

/// Translated instructions, JITed bytes, and how many instructions load the
/// `AYA_LOGS` map, of a loaded program.
fn program_size(f: &mut Fixture, name: &str) -> (u32, u32, usize) {
    let prog: &mut Xdp = f
        .ebpf
        .program_mut(name)
        .expect(name)
        .try_into()
        .expect("XDP");
    if prog.fd().is_err() {
        prog.load()
            .unwrap_or_else(|e| panic!("the verifier accepts {name}: {e:?}"));
    }
    let info = prog.info().expect("program info");
    let xlated = info.size_translated().expect("xlated size") / 8;
    let ring = info
        .map_ids()
        .expect("map ids")
        .unwrap_or_default()
        .into_iter()
        .filter_map(|id| aya::maps::MapInfo::from_id(id).ok())
        .find(|m| m.name_as_str() == Some("AYA_LOGS"))
        .map(|m| m.id());
    let out = Command::new("bpftool")
        .args(["prog", "dump", "xlated", "id", &info.id().to_string()])
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool prog dump xlated failed");
    let dump = String::from_utf8_lossy(&out.stdout);
    let refs = ring.map_or(0, |id| dump.matches(&format!("map[id:{id}]")).count());
    (xlated, info.size_jitted(), refs)
}

fn sizes(report: &mut Report, off: &mut Fixture, on: &mut Fixture) {
    for name in PROGRAMS {
        let (x_off, j_off, refs_off) = program_size(off, name);
        let (x_on, j_on, refs_on) = program_size(on, name);
        assert_eq!(
            refs_off, 0,
            "{name}: with the logs off, the verifier left {refs_off} loads of the log ring"
        );
        assert!(
            refs_on > 0,
            "{name}: with the logs on, no load of the log ring"
        );
        report.row(
            "datapath",
            format!("{name} xlated insns / jited bytes, log off"),
            format!("{x_off} / {j_off}"),
            format!("on: {x_on} / {j_on}"),
            "off: no log code left",
            Some(refs_off == 0),
        );
        let key = format!("datapath_log.{name}");
        report.json.insert(
            key,
            json!({ "xlated_off": x_off, "xlated_on": x_on, "jited_off": j_off, "jited_on": j_on,
                    "log_ring_loads_off": refs_off, "log_ring_loads_on": refs_on }),
        );
    }
}

/// Median per-round ratios to the floor of `frame` through `program` of each
/// fixture, measured in the same rounds.
fn timed(shim: &mut Shim, fixtures: [&Fixture; 2], frame: Vec<u8>, verdict: u32) -> [f64; 2] {
    let floor_frame = pad(v4_tcp(V4_VIP, TCP_ACK));
    let data = pad(frame);
    let mut per_round = [Vec::new(), Vec::new()];
    for f in fixtures {
        shim.target(Some((&f.ebpf, "lb_ingress")));
        shim.frame(data, None);
        shim.run(&data, 1000);
    }
    for _ in 0..ROUNDS {
        for (i, f) in fixtures.iter().enumerate() {
            shim.target(None);
            shim.frame(floor_frame, None);
            let (floor_ns, _) = shim.run(&floor_frame, REPEAT);
            shim.target(Some((&f.ebpf, "lb_ingress")));
            shim.frame(data, None);
            let (t, v) = shim.run(&data, REPEAT);
            assert_eq!(v, verdict, "unexpected verdict");
            per_round[i].push(t / floor_ns);
        }
    }
    let [a, b] = per_round;
    [median(a), median(b)]
}

pub fn run(report: &mut Report) {
    println!("== datapath logs: the same object with --datapath-log off and on");
    let sizes_ = bench_sizes(65_536);
    let mut off = Fixture::with_datapath_log(sizes_, &bench_vips(), false);
    let mut on = Fixture::with_datapath_log(sizes_, &bench_vips(), true);
    sizes(report, &mut off, &mut on);
    let mut shim = Shim::load();
    let cases = [
        (
            "established",
            "IPv4 TCP established",
            v4_tcp(V4_VIP, TCP_ACK),
            XDP_TX,
        ),
        (
            "pass",
            "non-VIP traffic passed",
            v4_tcp(Ipv4Addr::new(198, 18, 0, 99), TCP_ACK),
            XDP_PASS,
        ),
    ];
    for (key, name, frame, verdict) in cases {
        let [r_off, r_on] = timed(&mut shim, [&off, &on], frame, verdict);
        report.row(
            "datapath",
            format!("{name}, log off"),
            format!("{r_off:.2}× floor"),
            format!("on: {r_on:.2}× floor"),
            "",
            None,
        );
        report.json.insert(
            format!("datapath_log.{key}"),
            json!({ "ratio_to_floor_off": r_off, "ratio_to_floor_on": r_on }),
        );
    }
}
