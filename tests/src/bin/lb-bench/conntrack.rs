//! The connection table at 1,000,000 flows: insert cost with room and
//! full, memory, early flows kept; and the report scan over it.
use super::*;

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

pub fn connection_table(report: &mut Report) {
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
    let data = pad(v4_syn(V4_VIP));
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
