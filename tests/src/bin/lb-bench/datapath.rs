//! The datapath section: each case's cost per packet through the shim
//! against the floor program (and Katran, with `--peer`), in the same rounds.
use super::*;

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
    f.balancer.datapath_mut().remove_flows(&keys);
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

/// One case of the datapath section.
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

/// What the cases run on, and what they measured.
struct Run {
    f: Fixture,
    shim: Shim,
    katran: Option<katran::Katran>,
    rounds: usize,
    floor_frame: [u8; FRAME_LEN],
    /// Tracers still on (the untraced cases come last).
    traced: bool,
    ns: BTreeMap<&'static str, f64>,
    ratios: BTreeMap<&'static str, f64>,
    peer_ratios: BTreeMap<&'static str, (f64, f64)>,
}

pub(crate) fn datapath_cost(report: &mut Report) -> BTreeMap<&'static str, f64> {
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
    let shim = Shim::load();
    let encapsulated = encapsulated();
    // The floor runs right before every round of every case, and each case is
    // reported as the median of its per-round ratios: the machine's drift
    // (other tenants, frequency) cancels out of the ratio.
    let mut run = Run {
        f,
        shim,
        katran: peer::load(),
        rounds,
        floor_frame: pad(v4_tcp(V4_VIP, TCP_ACK)),
        traced: true,
        ns: BTreeMap::new(),
        ratios: BTreeMap::new(),
        peer_ratios: BTreeMap::new(),
    };
    // LB_BENCH_CASES=key,key runs only those cases (for profiling one path).
    let only = std::env::var("LB_BENCH_CASES").ok();
    let only: Option<Vec<&str>> = only.as_deref().map(|s| s.split(',').collect());
    for c in cases(encapsulated) {
        if c.key != "floor" && only.as_ref().is_some_and(|o| !o.contains(&c.key)) {
            continue;
        }
        run_case(&mut run, c);
    }
    report_rows(report, &run.ns, &run.ratios);
    peer::report(report, &run.peer_ratios);
    unpin(&cpus);
    run.ns
}

/// The frame `lb_decap` gets: an IPIP packet from the LB to backend 198.18.0.11.
fn encapsulated() -> Vec<u8> {
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
}

impl Case {
    /// A packet `lb_ingress` forwards, run through the peer too.
    fn forwarded(key: &'static str, name: &'static str, frame: Vec<u8>) -> Case {
        Case {
            key,
            name,
            program: Some("lb_ingress"),
            frame,
            vary: None,
            verdict: XDP_TX,
            counted: Some(Outcome::Forwarded),
            untraced: false,
            katran: true,
            repeat: REPEAT,
        }
    }

    /// A new flow each run (a fresh source port and address), in rounds the
    /// peer's new-connection limit allows.
    fn new_flows(self) -> Case {
        Case {
            vary: Some(V4_VARY),
            repeat: NEW_FLOW_REPEAT,
            ..self
        }
    }

    fn untraced(self) -> Case {
        Case {
            untraced: true,
            ..self
        }
    }

    fn without_peer(self) -> Case {
        Case {
            katran: false,
            ..self
        }
    }
}

/// The cases, the floor first and the untraced ones last.
fn cases(encapsulated: Vec<u8>) -> Vec<Case> {
    let v6 = eth(
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
    );
    let udp = eth(
        LB_MAC,
        CLIENT_MAC,
        ETH_IPV4,
        &ipv4(CLIENT, V4_VIP, PROTO_UDP, &udp(5000, 53, b"query")),
    );
    vec![
        Case {
            program: None,
            counted: None,
            ..Case::forwarded("floor", "floor: swap MACs, XDP_TX", v4_tcp(V4_VIP, TCP_ACK))
        }
        .without_peer(),
        Case::forwarded(
            "v4_syn_new",
            "IPv4 TCP SYN, new flow each run, the table with room",
            v4_syn(V4_VIP),
        )
        .new_flows(),
        Case::forwarded(
            "v4_syn_full",
            "IPv4 TCP SYN, new flow into the full 1M-entry table",
            v4_syn(V4_VIP),
        )
        .new_flows(),
        Case::forwarded(
            "v4_established",
            "IPv4 TCP established",
            v4_tcp(V4_VIP, TCP_ACK),
        ),
        Case::forwarded("v4_udp", "IPv4 UDP", udp),
        Case::forwarded("v6_established", "IPv6 TCP established", v6),
        Case::forwarded(
            "v4_to_v6",
            "IPv4 client to IPv6 backend",
            v4_tcp(V4_VIP_TO_V6, TCP_ACK),
        ),
        Case {
            verdict: XDP_PASS,
            counted: Some(Outcome::PassNotVip),
            ..Case::forwarded(
                "pass",
                "non-VIP traffic passed",
                v4_tcp(Ipv4Addr::new(198, 18, 0, 99), TCP_ACK),
            )
        },
        Case {
            program: Some("lb_decap"),
            verdict: XDP_PASS,
            counted: None,
            ..Case::forwarded("decap", "lb_decap on an IPIP packet", encapsulated)
        }
        .without_peer(),
        Case::forwarded(
            "v4_syn_new_untraced",
            "IPv4 TCP SYN, new flow, tracers and events off",
            v4_syn(V4_VIP),
        )
        .new_flows()
        .untraced()
        .without_peer(),
        Case::forwarded(
            "v4_established_untraced",
            "IPv4 TCP established, tracers off",
            v4_tcp(V4_VIP, TCP_ACK),
        )
        .untraced(),
    ]
}

/// Runs one case: warm-up, its rounds against the floor (and the peer),
/// and the checks that every run took the path the case names.
fn run_case(run: &mut Run, c: Case) {
    let Run {
        f,
        shim,
        katran,
        rounds,
        floor_frame,
        traced,
        ns,
        ratios,
        peer_ratios,
    } = run;
    let (rounds, floor_frame) = (*rounds, *floor_frame);
    if c.untraced && *traced {
        f.apply(&format!(
            "[visibility]\ntrace_flows = false\nevent_sample = 0\n{}",
            bench_vips()
        ));
        *traced = false;
    }
    let data = pad(c.frame);
    // New flows with room: the table starts empty, and the rounds
    // (NEW_FLOW_REPEAT × rounds) stay under its size. It is filled and
    // emptied first, as a table in service has been: its free entries
    // are then scattered over its memory, not in allocation order.
    let with_room = matches!(c.key, "v4_syn_new" | "v4_syn_new_untraced");
    if with_room {
        recycle_flows(f, shim, c.program, &data, c.vary);
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
    let new_before = vip_new_flows(f);
    let unrecorded_before = f.balancer.datapath().flows_unrecorded().expect("counter");
    let mut peer = katran.as_mut().filter(|_| c.katran);
    let peer_before = peer
        .as_deref_mut()
        .map(|k| peer::prepare(k, shim, &data, c.vary, c.verdict, c.key == "v4_syn_full"));
    let before = c.counted.map(|o| outcome(f, o));
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
            let kt = peer::run(k, shim, &data, c.vary, c.repeat, c.verdict);
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
            outcome(f, o) - b,
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
            vip_new_flows(f) - new_before,
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
        make_room(f, 100_000);
    }
}

/// The section's rows: each case against the floor, and the tracers' cost.
fn report_rows(
    report: &mut Report,
    ns: &BTreeMap<&'static str, f64>,
    ratios: &BTreeMap<&'static str, f64>,
) {
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
}
