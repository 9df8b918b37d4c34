//! The connection table at 1,000,000 flows: insert cost with room and
//! full, memory, early flows kept; and the report scan over it.
use super::*;
use lb_common::flow_table::FlowSlot;

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

/// Early flows: a SYN each through `lb_ingress`; returns each flow's ACK
/// frame and the backend its SYN went to.
fn early_flows(f: &Fixture) -> Vec<(Vec<u8>, [u8; 4])> {
    (0..1000u16)
        .map(|i| {
            let client = Ipv4Addr::new(198, 18, 60, (i % 250) as u8 + 1);
            let packet = |flags| {
                let ip = ipv4(client, V4_VIP, PROTO_TCP, &tcp(20000 + i, 80, flags, b""));
                eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &ip)
            };
            let out = f.ingress(&packet(TCP_SYN)).output;
            (packet(TCP_ACK), outer_dst_v4(&out))
        })
        .collect()
}

/// The fill: a new flow per run, twice the table's size, through
/// lb_ingress. The first 200,000 inserts find free entries; once the table
/// is full, later flows are forwarded without an entry (no collector runs
/// here). Returns the cost per new flow while filling, and the rate of new
/// flows into the full table.
fn fill(f: &Fixture) -> (f64, f64) {
    let mut shim = Shim::load();
    shim.target(Some((&f.ebpf, "lb_ingress")));
    let data = pad(v4_syn(V4_VIP));
    shim.frame(data, Some(V4_VARY));
    let (filling_ns, _) = shim.run(&data, 200_000);
    let mut rates = Vec::new();
    for _ in 0..ROUNDS {
        let (ns, verdict) = shim.run(&data, 400_000);
        assert_eq!(verdict, XDP_TX);
        rates.push(1e9 / ns);
    }
    (filling_ns, median(rates))
}

/// The connection table's memory, and all the balancer's maps': every BPF
/// map this process holds a descriptor of (the fixture's, with the shim
/// gone), each counted once. The datapath owns its maps, so they are found
/// through `/proc/self/fdinfo`, not through the object.
fn memory(f: &Fixture) -> (u64, u64) {
    let flows_mem = memlock(f.balancer.datapath().flows_map());
    let mut maps = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fdinfo").expect("fdinfo") {
        let Ok(text) = std::fs::read_to_string(entry.expect("fdinfo entry").path()) else {
            continue;
        };
        let field = |name: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        if let (Some(id), Some(bytes)) = (field("map_id:"), field("memlock:")) {
            maps.insert(id, bytes);
        }
    }
    let total_mem = maps.values().sum::<u64>();
    assert!(
        total_mem >= flows_mem,
        "the connection table is among the maps"
    );
    (flows_mem, total_mem)
}

/// How many early flows still have an entry, and how many still go to
/// the backend their SYN went to.
fn early_flows_kept(f: &Fixture, samples: &[(Vec<u8>, [u8; 4])]) -> (usize, usize) {
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
    (still_there, kept)
}

pub fn connection_table(report: &mut Report) {
    println!("== connection table at 1,000,000 flows");
    let f = Fixture::with_sizes(bench_sizes(1_000_000), &bench_vips());
    let samples = early_flows(&f);
    let (filling_ns, rate) = fill(&f);
    let entries = f.flows().len();
    let (flows_mem, total_mem) = memory(&f);
    let (still_there, kept) = early_flows_kept(&f, &samples);
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
    for (key, value) in [
        ("conntrack.insert_rate_per_s", json!(rate)),
        ("conntrack.entries", json!(entries)),
        ("conntrack.flows_map_bytes", json!(flows_mem)),
        ("conntrack.all_maps_bytes", json!(total_mem)),
        ("conntrack.kept_backend", json!(kept)),
    ] {
        report.json.insert(key.into(), value);
    }
    report_scan(report, f);
}

/// Reading the full table the collector's way (the mapped array) against
/// batch lookups of the whole array, which copy every slot, used or not,
/// through the syscall (seconds each).
fn read_whole_table(f: &Fixture) -> (f64, f64) {
    let slots = f.balancer.datapath().flow_slots();
    let n = f.flows().len();
    let mut mapped = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let count = slots.for_each(|_, _| {});
        mapped.push(t.elapsed().as_secs_f64());
        assert!(count >= n * 99 / 100, "scan saw {count} of {n}");
    }
    let t = Instant::now();
    let mut count = 0usize;
    lb_userspace::datapath::for_each(slots.map(), 8192, |_: &u32, s: &FlowSlot| {
        count += usize::from(s.key[9] != 0);
    })
    .expect("batch scan");
    assert!(count >= n * 99 / 100, "batch scan saw {count} of {n}");
    (median(mapped), t.elapsed().as_secs_f64())
}

/// What a report costs: one collector pass (scan, phases, expiry check,
/// per-VIP and per-backend aggregates, top flows) over the whole table.
/// Returns the collector and the pass's time.
fn collector_pass(
    f: &mut Fixture,
    vip_ids: &[u32],
    backend_ids: &[u32],
) -> (lb_userspace::collector::Collector, f64) {
    // No table size: the pass reads and aggregates the full table without
    // the early expiry a nearly full table would get (that would measure
    // deleting it).
    let mut collector = lb_userspace::collector::Collector::new(
        &lb_userspace::config::VisibilityConfig::default(),
        0,
    );
    let mut passes = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        collector
            .collect(
                f.balancer.datapath_mut(),
                lb_userspace::collector::monotonic_ns(),
                vip_ids,
                backend_ids,
            )
            .expect("collect");
        passes.push(t.elapsed().as_secs_f64());
    }
    (collector, median(passes))
}

/// The agent scans and expires outside its state lock and holds the lock
/// only to take the result in: the time outside and inside, per collection.
fn lock_held(
    f: &Fixture,
    collector: &mut lb_userspace::collector::Collector,
    vip_ids: &[u32],
    backend_ids: &[u32],
) -> (f64, f64) {
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
                vip_ids,
                backend_ids,
            )
            .expect("absorb");
        inside.push(t.elapsed().as_secs_f64());
    }
    (median(outside), median(inside))
}

fn report_scan(report: &mut Report, mut f: Fixture) {
    println!("== report scan of the connection table");
    let n = f.flows().len();
    let (mapped, batch) = read_whole_table(&f);
    let vip_ids: Vec<u32> = f.balancer.vips().iter().map(|(id, _)| *id).collect();
    let backend_ids: Vec<u32> = f.balancer.backend_ids().iter().map(|(id, _)| *id).collect();
    let (mut collector, pass) = collector_pass(&mut f, &vip_ids, &backend_ids);
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
    let (outside, inside) = lock_held(&f, &mut collector, &vip_ids, &backend_ids);
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
        format!("read {n} flows, the mapped table"),
        format!("{:.0} ms", mapped * 1e3),
        format!(
            "{:.0} ms with batch lookups of the whole array ({:.1}×)",
            batch * 1e3,
            batch / mapped
        ),
        "≤ 1 s (for 1,000,000)",
        Some(mapped * 1e6 / n as f64 <= 1.0),
    );
    report.json.insert("scan.flows".into(), json!(n));
    report.json.insert("scan.mapped_s".into(), json!(mapped));
    report.json.insert("scan.batch_s".into(), json!(batch));
}
