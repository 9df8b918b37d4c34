//! Source-side balancing: how long an install takes to reach every host as
//! the fleet grows (simulated hosts against a real etcd), and what the
//! source-side balancer costs per packet against the floor (it is
//! `lb_ingress` with a host's settings).
//!
//! A simulated host does what the host role does against the store: it
//! registers under a lease, watches the fleet's prefix, and at each change
//! that concerns hosts reads the store once, works out its plan with
//! `fleet::plan` and writes its status under its lease. It loads no
//! datapath (the end-to-end test measures that part: 0.3-0.5 s), so the
//! figure is the store's fan-out and the hosts' planning.

use std::{sync::Arc, time::Instant};

use lb_tests::etcd::Etcd;
use lb_userspace::{
    config::{FleetConfig, HostConfig},
    fleet::{self, HostStatus, Install, Store},
};
use tokio::sync::Notify;

use super::*;

const HOST_COUNTS: [usize; 3] = [1, 10, 100];
const INSTALL_ROUNDS: usize = 3;

pub fn run(report: &mut Report) {
    install_fan_out(report);
    packet_cost(report);
}

fn install_fan_out(report: &mut Report) {
    println!("== install time against the number of hosts (real etcd, simulated hosts)");
    let etcd = Etcd::start(None);
    let section = etcd.fleet_section("bench", 10);
    let cfg = FleetConfig::from_toml_section(&section).expect("fleet section");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for hosts in HOST_COUNTS {
        let (install, uninstall) = rt.block_on(fan_out(&cfg, hosts));
        for (what, t) in [("install", install), ("uninstall", uninstall)] {
            report.row(
                "srcside",
                format!("{what} reaches {hosts} hosts (median of {INSTALL_ROUNDS})"),
                format!("{:.1} ms", t * 1e3),
                "",
                "",
                None,
            );
            report
                .json
                .insert(format!("srcside.{what}_ms.hosts_{hosts}"), json!(t * 1e3));
        }
    }
}

/// Registers `hosts` simulated hosts, then installs and uninstalls a → b
/// `INSTALL_ROUNDS` times; median seconds until every host reported each.
async fn fan_out(cfg: &FleetConfig, hosts: usize) -> (f64, f64) {
    let mut store = Store::connect(cfg).await.expect("etcd");
    clear(&mut store).await;
    let a: Vec<String> = (0..hosts)
        .map(|h| {
            format!(
                "{{\"address\": \"198.18.{}.{}:1\", \"weight\": 1, \"node\": \"h{h}\"}}",
                20 + h / 200,
                2 + h % 200
            )
        })
        .collect();
    let a = format!("{{\"name\": \"a\", \"instances\": [{}]}}", a.join(","));
    let b = "{\"name\": \"b\", \"instances\": [{\"address\": \"198.18.0.11:80\", \"weight\": 100, \"node\": \"b0\"}, {\"address\": \"198.18.0.12:80\", \"weight\": 100, \"node\": \"b1\"}], \"vips\": [{\"address\": \"198.18.10.1\", \"port\": 80, \"protocol\": \"tcp\"}]}";
    store
        .put(&store.keys.service("a"), &a, None)
        .await
        .expect("a");
    store
        .put(&store.keys.service("b"), b, None)
        .await
        .expect("b");
    let stop = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    for h in 0..hosts {
        let mut c = cfg.clone();
        c.node = format!("h{h}");
        tasks.push(tokio::spawn(simulated_host(c, stop.clone())));
    }
    wait_hosts(&mut store, hosts, false).await;
    let (mut ins, mut outs) = (Vec::new(), Vec::new());
    let key = store.keys.install("a", "b");
    for _ in 0..INSTALL_ROUNDS {
        let record = Install {
            from: "a".into(),
            to: "b".into(),
            created_ms: 0,
        };
        let started = Instant::now();
        store
            .put(&key, &serde_json::to_string(&record).unwrap(), None)
            .await
            .expect("install");
        wait_hosts(&mut store, hosts, true).await;
        ins.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        store.put_if(&key, None, &[]).await.expect("uninstall");
        wait_hosts(&mut store, hosts, false).await;
        outs.push(started.elapsed().as_secs_f64());
    }
    for _ in 0..hosts {
        stop.notify_one();
    }
    stop.notify_waiters();
    for t in tasks {
        t.abort();
    }
    clear(&mut store).await;
    (median(ins), median(outs))
}

async fn clear(store: &mut Store) {
    for (key, _) in store.list(&store.keys.all()).await.expect("list") {
        let full = format!("{}{key}", store.keys.all());
        let _ = store.put_if(&full, None, &[]).await;
    }
}

/// Until `hosts` hosts report, every one with (or without) the install.
async fn wait_hosts(store: &mut Store, hosts: usize, installed: bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let statuses = store.list(&store.keys.hosts()).await.expect("hosts");
        let done = statuses
            .iter()
            .filter_map(|(_, v)| serde_json::from_str::<HostStatus>(&v.text).ok())
            .filter(|s| s.installs.is_empty() != installed && s.error.is_none())
            .count();
        if done == hosts {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {hosts} hosts followed"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One simulated host (see the module's comment).
async fn simulated_host(cfg: FleetConfig, stop: Arc<Notify>) {
    let mut store = Store::connect(&cfg).await.expect("etcd");
    let (lease, _keeper, _alive) = store.lease(30).await.expect("lease");
    let node = store.keys.node(&cfg.node);
    store
        .put(&node, "{\"node\": \"sim\"}", Some(lease))
        .await
        .expect("register");
    let mut revision = follow(&mut store, &cfg.node, lease).await;
    let mut watch = store
        .watch_prefix(&store.keys.all(), revision + 1)
        .await
        .expect("watch");
    let concerns = [
        store.keys.installs(),
        store.keys.services(),
        store.keys.healths(),
    ];
    loop {
        tokio::select! {
            _ = stop.notified() => return,
            msg = watch.message() => {
                let Ok(Some(resp)) = msg else { return };
                let relevant = resp.events().iter().filter_map(|e| e.kv()).any(|kv| {
                    kv.key_str().is_ok_and(|k| concerns.iter().any(|p| k.starts_with(p.as_str())))
                });
                if relevant {
                    revision = follow(&mut store, &cfg.node, lease).await.max(revision);
                }
            }
        }
    }
}

/// Reads the store, plans, writes the status; returns the revision read.
async fn follow(store: &mut Store, node: &str, lease: i64) -> i64 {
    let (all, revision) = store.list_at(&store.keys.all()).await.expect("read");
    let part = |prefix: &str| -> Vec<(String, fleet::Versioned)> {
        all.iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
            .collect()
    };
    let plan = fleet::plan(
        node,
        &part("installs/"),
        &part("services/"),
        &part("health/"),
    )
    .expect("a valid plan");
    let status = HostStatus {
        node: node.to_string(),
        generation: Some(revision),
        installs: plan.map(|p| p.installs).unwrap_or_default(),
        ..Default::default()
    };
    store
        .put(
            &store.keys.host(node),
            &serde_json::to_string(&status).unwrap(),
            Some(lease),
        )
        .await
        .expect("status");
    revision
}

/// `lb_ingress` with the settings a host's `[host]` section gives it, over
/// a target of three instances, against the floor of the same rounds.
fn packet_cost(report: &mut Report) {
    println!("== source-side balancer per packet (BPF_PROG_TEST_RUN, host settings)");
    let text = "instance = \"bench\"\n[host]\nencap_source_v4 = \"198.18.0.21/32\"\n[fleet]\nendpoints = [\"127.0.0.1:2379\"]\nca = \"/a\"\ncert = \"/b\"\nkey = \"/c\"\n";
    let host: HostConfig = lb_userspace::config::Config::from_toml(text)
        .expect("host config")
        .host
        .expect("[host]");
    let vips = [lb_userspace::config::HostVip {
        name: "b".into(),
        address: IpAddr::V4(V4_VIP),
        port: 80,
        protocol: lb_userspace::config::Protocol::Tcp,
        backends: (0..3)
            .map(|i| (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11 + i)), 100))
            .collect(),
        bypass: None,
    }];
    let (config, _) = host
        .config("bench", &["lo".into()], &vips, false)
        .expect("rendered");
    let b = config.balancer.expect("a balancer");
    let sizes = MapSizes {
        maglev_size: b.datapath.maglev_table_size,
        maglev_slots: u32::try_from(b.datapath.maglev_slots).expect("validated"),
        max_vips: b.datapath.max_vips,
        max_backends: b.datapath.max_backends,
        flow_table_size: b.datapath.flow_table_size,
    };
    let doc = "[[vips]]\naddress=\"198.18.10.1\"\nport=80\nprotocol=\"tcp\"\nbackends=[{ address = \"198.18.0.11\" }, { address = \"198.18.0.12\" }, { address = \"198.18.0.13\" }]\n";
    let f = Fixture::with_sizes(sizes, doc);
    let mut shim = Shim::load();
    let floor_frame = pad(v4_tcp(V4_VIP, TCP_ACK));
    for (key, name, flags, vary) in [
        (
            "syn_new",
            "guest's TCP SYN, new flow each run",
            TCP_SYN,
            Some(V4_VARY),
        ),
        ("established", "guest's TCP established", TCP_ACK, None),
    ] {
        let data = pad(v4_tcp(V4_VIP, flags));
        shim.target(Some((&f.ebpf, "lb_ingress")));
        shim.frame(data, vary);
        shim.run(&data, 1000);
        let before = f.outcome(Outcome::Forwarded);
        let (mut samples, mut ratios) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            shim.target(None);
            shim.frame(floor_frame, None);
            let (floor_ns, verdict) = shim.run(&floor_frame, REPEAT);
            assert_eq!(verdict, XDP_TX, "floor: unexpected verdict");
            shim.target(Some((&f.ebpf, "lb_ingress")));
            shim.frame(data, vary);
            let (t, verdict) = shim.run(&data, REPEAT);
            assert_eq!(verdict, XDP_TX, "{name}: unexpected verdict");
            samples.push(t);
            ratios.push(t / floor_ns);
        }
        assert_eq!(
            f.outcome(Outcome::Forwarded) - before,
            u64::from(REPEAT) * ROUNDS as u64,
            "{name}: not every run was forwarded"
        );
        let (ns, ratio) = (median(samples), median(ratios));
        report.row(
            "srcside",
            name,
            format!("{ns:.1} ns"),
            format!("{ratio:.2}× floor"),
            "",
            None,
        );
        report.json.insert(format!("srcside.{key}.ns"), json!(ns));
        report
            .json
            .insert(format!("srcside.{key}.ratio_to_floor"), json!(ratio));
    }
}
