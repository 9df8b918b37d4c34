//! End to end: the datapath is pinned, so it forwards while no agent runs.
//! An agent stopped (SIGTERM) or killed (SIGKILL) under load is restarted
//! with no failed or stalled connection and no forwarding gap; a new program
//! replaces the running one in its link; a changed map size, and an upgrade
//! from map layouts 1 to 5, migrate the connection table; cleanup removes
//! everything and a second agent is refused without touching the first.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::topology::*;

/// Long-lived connections kept busy, and a stream of new connections.
struct Load {
    stop: Arc<AtomicBool>,
    new_ok: Arc<AtomicUsize>,
    /// The longest time between two new connections that succeeded, in ms.
    max_gap_ms: Arc<AtomicUsize>,
    rounds: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

/// A connection: the backend's greeting read, ready for echoes.
struct Conn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

fn open(vip: SocketAddr) -> Result<Conn, String> {
    let stream = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    // A stall longer than this is a failure.
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    let writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut name = String::new();
    reader
        .read_line(&mut name)
        .map_err(|e| format!("greeting: {e}"))?;
    if name.is_empty() {
        return Err("closed before the greeting".into());
    }
    Ok(Conn { writer, reader })
}

fn echo(c: &mut Conn, msg: &str) -> Result<(), String> {
    c.writer
        .write_all(msg.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut back = String::new();
    c.reader
        .read_line(&mut back)
        .map_err(|e| format!("echo: {e}"))?;
    if back != msg {
        return Err(format!("echo {back:?} for {msg:?}"));
    }
    Ok(())
}

impl Load {
    /// `long` connections in groups of 50 per thread, each echoing a line
    /// every 100 ms, and one new connection every 10 ms.
    fn start(t: &Topology, vip: SocketAddr, long: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let new_ok = Arc::new(AtomicUsize::new(0));
        let rounds = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let opened = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for group in 0..long.div_ceil(50) {
            let n = 50.min(long - group * 50);
            let (stop, rounds, failures, opened) = (
                stop.clone(),
                rounds.clone(),
                failures.clone(),
                opened.clone(),
            );
            threads.push(in_netns(&t.ns("cl"), move || {
                let mut conns = Vec::new();
                for _ in 0..n {
                    match open(vip) {
                        Ok(c) => conns.push(c),
                        Err(e) => failures.lock().unwrap().push(format!("long open: {e}")),
                    }
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    for (i, c) in conns.iter_mut().enumerate() {
                        if let Err(e) = echo(c, &format!("g{group} c{i} r{round}\n")) {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("long g{group} c{i} round {round}: {e}"));
                        }
                    }
                    rounds.fetch_add(1, Ordering::Relaxed);
                    round += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while opened.load(Ordering::Relaxed) < long {
            assert!(Instant::now() < deadline, "long connections not opened");
            std::thread::sleep(Duration::from_millis(50));
        }
        let max_gap_ms = Arc::new(AtomicUsize::new(0));
        let (s, ok, f, gap) = (
            stop.clone(),
            new_ok.clone(),
            failures.clone(),
            max_gap_ms.clone(),
        );
        threads.push(in_netns(&t.ns("cl"), move || {
            let mut last = Instant::now();
            while !s.load(Ordering::Relaxed) {
                match connect_once(vip) {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        let ms = last.elapsed().as_millis() as usize;
                        gap.fetch_max(ms, Ordering::Relaxed);
                        last = Instant::now();
                    }
                    Err(e) => f.lock().unwrap().push(format!("new connection: {e}")),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
        Load {
            stop,
            new_ok,
            max_gap_ms,
            rounds,
            failures,
            threads,
        }
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// New connections that succeeded during `d`.
    fn new_during(&self, d: Duration) -> usize {
        let before = self.new_ok.load(Ordering::Relaxed);
        std::thread::sleep(d);
        self.new_ok.load(Ordering::Relaxed) - before
    }

    fn stop(self) -> (usize, usize, Vec<String>) {
        let gap = self.max_gap_ms.load(Ordering::Relaxed);
        println!("longest time between two successful new connections: {gap} ms");
        // A new connection every 10 ms: a forwarding gap would show here.
        assert!(gap < 500, "new connections stopped for {gap} ms");
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("load thread");
        }
        let failures = self.failures.lock().unwrap().clone();
        (
            self.new_ok.load(Ordering::Relaxed),
            self.rounds.load(Ordering::Relaxed),
            failures,
        )
    }
}

fn web() -> SocketAddr {
    SocketAddr::new(VIP_V4.parse().unwrap(), 80)
}

/// VIP web's counters in `lbctl status --json`.
fn web_counters(t: &Topology) -> serde_json::Value {
    let status = t.status_json();
    status["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "web")
        .expect("web")["counters"]
        .clone()
}

/// The program attached to the LB's eth0, as `ip link` shows it.
fn lb_prog_id(t: &Topology) -> Option<u32> {
    let out = std::process::Command::new("ip")
        .args(["-n", &t.ns("lb"), "-d", "link", "show", "eth0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let at = text.find("prog/xdp id ")?;
    text[at + "prog/xdp id ".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Client to LB packets of every flow of VIP web in the connection table,
/// by client address.
fn flow_packets(t: &Topology) -> std::collections::BTreeMap<String, u64> {
    let out = t.lbctl(&["flows", "--vip", "web", "--limit", "100000", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["client"].as_str().unwrap().to_string(),
                f["client_to_lb"]["packets"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn pins_of(t: &Topology, role: &str) -> std::path::PathBuf {
    Path::new(lb_userspace::datapath::PIN_ROOT).join(t.instance(role))
}

#[test]
fn restarts_and_an_upgrade_under_load_lose_no_connection() {
    let mut t = Topology::new(3);
    t.start(&[100, 100, 100]);
    let load = Load::start(&t, web(), 500);
    std::thread::sleep(Duration::from_secs(1));
    let before = web_counters(&t);
    let flows_before = flow_packets(&t);
    let prog = lb_prog_id(&t).expect("XDP on the LB");

    // SIGTERM: the agent goes, the datapath stays.
    t.stop_lb();
    assert_eq!(lb_prog_id(&t), Some(prog), "the program stays attached");
    let gap = load.new_during(Duration::from_millis(1500));
    assert!(gap > 20, "only {gap} new connections while no agent ran");
    assert!(load.failures().is_empty(), "{:?}", load.failures());
    t.start_lb();
    let after = web_counters(&t);
    for c in ["packets", "new_flows"] {
        assert!(
            after[c].as_u64() > before[c].as_u64(),
            "counter {c} went from {} to {} over the restart",
            before[c],
            after[c]
        );
    }
    assert_ne!(
        lb_prog_id(&t),
        Some(prog),
        "the new agent's program replaced it"
    );
    // The long-lived flows kept their entries, and their counters went on.
    let flows_after = flow_packets(&t);
    let kept = flows_before
        .iter()
        .filter(|(c, p)| flows_after.get(*c).is_some_and(|a| a > *p))
        .count();
    assert!(
        kept >= 500,
        "{kept} of {} flows kept counting",
        flows_before.len()
    );

    // SIGKILL: the same.
    t.kill_lb();
    let gap = load.new_during(Duration::from_millis(1500));
    assert!(gap > 20, "only {gap} new connections while no agent ran");
    t.start_lb();

    // An upgrade: another build of the program replaces the running one.
    let upgrade =
        std::env::var("LB_UPGRADE_OBJECT").expect("LB_UPGRADE_OBJECT (set by `cargo xtask test`)");
    let old = lb_prog_id(&t);
    t.stop_lb();
    t.start_lb_with(&["--ebpf-object", &upgrade]);
    let new = lb_prog_id(&t);
    assert_ne!(new, old);
    let tag = |id: Option<u32>| {
        let out = std::process::Command::new("bpftool")
            .args(["prog", "show", "id", &id.unwrap().to_string()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .skip_while(|w| *w != "tag")
            .nth(1)
            .unwrap_or("")
            .to_string()
    };
    let upgraded_tag = tag(new);
    std::thread::sleep(Duration::from_secs(1));
    // And back to the embedded build.
    t.stop_lb();
    t.start_lb();
    assert_ne!(
        tag(lb_prog_id(&t)),
        upgraded_tag,
        "the upgrade build differs"
    );
    std::thread::sleep(Duration::from_secs(1));

    // Shown if the checks below fail (see the datapath-log test).
    println!(
        "LB status at the end:\n{}",
        String::from_utf8_lossy(&t.lbctl(&["status"]).stdout)
    );
    let (new_ok, rounds, failures) = load.stop();
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(new_ok > 300, "{new_ok} new connections");
    assert!(rounds > 10 * 30, "{rounds} rounds of the long connections");
    println!(
        "new connections {new_ok}, long-connection rounds {rounds} (500 connections), 0 failed"
    );
}

#[test]
fn a_changed_flow_table_size_migrates_the_connections() {
    let mut t = Topology::new(3);
    t.start(&[100, 100, 100]);
    let load = Load::start(&t, web(), 100);
    std::thread::sleep(Duration::from_secs(1));
    t.stop_lb();
    let path = t.dir.join("lb.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("flow_table_size = 65536", "flow_table_size = 131072")
            .replace("xdp_mode = \"native\"", "xdp_mode = \"generic\""),
    )
    .unwrap();
    t.start_lb();
    assert!(
        t.log("lb").contains("connection table migrated"),
        "{}",
        t.log("lb")
    );
    // The pinned link keeps its native mode over a restart: a swap cannot
    // change it, and the status says so rather than showing the file's mode.
    let status = t.status_json();
    let mode = status["interfaces"][0]["mode"].as_str().unwrap_or_default();
    assert_eq!(mode, "native, kept: configured generic", "{status}");
    assert!(
        t.log("lb").contains("keeps its XDP mode"),
        "{}",
        t.log("lb")
    );
    let layout = format!("maps-v{}", lb_common::LAYOUT_VERSION);
    let maps = pins_of(&t, "lb").join(&layout);
    let info = aya::maps::MapInfo::from_pin(maps.join("FLOWS")).expect("pinned FLOWS");
    assert_eq!(
        info.max_entries(),
        lb_common::flow_table::elements_for(131072)
    );
    assert!(!pins_of(&t, "lb").join(format!("{layout}-next")).exists());
    std::thread::sleep(Duration::from_secs(1));

    // A table too small for the flows: the most recently used are kept,
    // the rest are left out (and said so); those are forwarded by Maglev
    // alone, to the same backends, so no connection breaks.
    t.stop_lb();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("flow_table_size = 131072", "flow_table_size = 64"),
    )
    .unwrap();
    t.start_lb();
    let log = t.log("lb");
    assert!(
        log.contains("connection table migrated") && log.contains("left_out"),
        "{log}"
    );
    let info = aya::maps::MapInfo::from_pin(maps.join("FLOWS")).expect("pinned FLOWS");
    assert_eq!(info.max_entries(), lb_common::flow_table::elements_for(64));
    std::thread::sleep(Duration::from_secs(2));
    let status = t.status_json();
    assert!(
        status["flows_unrecorded"].as_u64().unwrap_or(0) > 0,
        "flows beyond the table are counted: {status}"
    );
    let (_, _, failures) = load.stop();
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
}

/// `bpftool -j map dump pinned PATH`: the entries as (key, value) hex bytes.
fn dump_pinned(path: &Path) -> Vec<(Vec<String>, Vec<String>)> {
    let dump = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .unwrap();
    assert!(dump.status.success(), "{dump:?}");
    let entries: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    let bytes = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .expect("hex bytes")
            .iter()
            .map(|b| b.as_str().unwrap().trim_start_matches("0x").to_string())
            .collect()
    };
    entries
        .as_array()
        .expect("map entries")
        .iter()
        .map(|e| (bytes(&e["key"]), bytes(&e["value"])))
        .collect()
}

/// Replaces the map pinned at `path` by a new map of `spec` (bpftool's
/// `type … key … value … entries …` words) holding `entries`.
fn repin(path: &Path, spec: &[&str], entries: &[(Vec<String>, Vec<String>)]) {
    std::fs::remove_file(path).unwrap();
    let p = path.to_str().unwrap();
    let mut create = vec!["bpftool", "map", "create", p];
    create.extend(spec);
    must(&create);
    if entries.is_empty() {
        return;
    }
    // One bpftool for every entry.
    let batch: String = entries
        .iter()
        .map(|(key, value)| {
            format!(
                "map update pinned {p} key hex {} value hex {}\n",
                key.join(" "),
                value.join(" ")
            )
        })
        .collect();
    let file = path.with_extension("batch");
    let file = std::env::temp_dir().join(file.file_name().unwrap());
    std::fs::write(&file, batch).unwrap();
    must(&["bpftool", "batch", "file", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
}

/// The flows of a pinned connection table (an array of 96-byte elements:
/// the header, then per bucket an element of eight claim words and eight
/// `FlowSlot`s) as a kernel hash's entries: the key (its claim word's tag
/// cleared) and the state, for each slot whose claim word is in use.
fn slots_as_entries(path: &Path) -> Vec<(Vec<String>, Vec<String>)> {
    let elements: Vec<Vec<String>> = dump_pinned(path).into_iter().map(|(_, v)| v).collect();
    assert_eq!((elements.len() - 1) % 9, 0, "a header and whole buckets");
    let mut entries = Vec::new();
    for bucket in elements[1..].chunks(9) {
        for (i, slot) in bucket[1..].iter().enumerate() {
            assert_eq!(slot.len(), 96);
            let claim = bucket[0][i * 4..i * 4 + 4].join("");
            if claim == "00000000" || claim == "ffffffff" {
                continue;
            }
            let mut key = slot[..40].to_vec();
            key[38] = "00".into();
            key[39] = "00".into();
            entries.push((key, slot[40..].to_vec()));
        }
    }
    entries
}

/// Turns the stopped LB's pinned maps into the shape an agent of map layout
/// `old` (1 to 5) left: the directory is `maps-vOLD`. Layout 5's maps are
/// this layout's, with the connection table's flows placed by another slot
/// hash: as the new agent sees it, a table whose keys it does not know,
/// which is what the running table is once renamed. Before layout 5, the
/// connection table is a kernel hash (layout 4) or LRU (1 to 3) with the same flows, there
/// is no `FLOWS_UNRECORDED` before layout 4, and for layouts 1 and 2 the
/// VIP table has that layout's entries (12 or 16 bytes, the VIP id first).
/// The running program keeps the maps it holds, so forwarding goes on
/// meanwhile.
fn pin_as_layout(t: &Topology, old: u32) {
    let pins = pins_of(t, "lb");
    let current = pins.join(format!("maps-v{}", lb_common::LAYOUT_VERSION));
    let dir = pins.join(format!("maps-v{old}"));
    std::fs::rename(&current, &dir).expect("renaming the maps directory");
    if old == 5 {
        return;
    }
    if old < 4 {
        std::fs::remove_file(dir.join("FLOWS_UNRECORDED")).unwrap();
    }
    let flows = dir.join("FLOWS");
    let entries = slots_as_entries(&flows);
    assert!(!entries.is_empty(), "no flow to convert");
    let kind = if old == 4 { "hash" } else { "lru_hash" };
    repin(
        &flows,
        &[
            "type", kind, "key", "40", "value", "56", "entries", "65536", "name", "FLOWS",
        ],
        &entries,
    );
    if old >= 3 {
        return;
    }
    let vips = dir.join("VIPS");
    let entries = dump_pinned(&vips);
    assert!(!entries.is_empty(), "no VIP entry to convert");
    let size = if old == 1 { 12 } else { 16 };
    // The VIP id, then zeros: the old ring fields are not carried over.
    let entries: Vec<_> = entries
        .into_iter()
        .map(|(key, value)| {
            assert_eq!(key.len(), 20);
            let mut old_value: Vec<String> = value[..4].to_vec();
            old_value.resize(size, "00".to_string());
            (key, old_value)
        })
        .collect();
    let size_text = size.to_string();
    repin(
        &vips,
        &[
            "type", "hash", "key", "20", "value", &size_text, "entries", "128", "name", "VIPS",
        ],
        &entries,
    );
}

#[test]
fn upgrades_from_layouts_1_to_5_keep_the_connections() {
    let mut t = Topology::new(3);
    t.start(&[100, 100, 100]);
    let load = Load::start(&t, web(), 100);
    std::thread::sleep(Duration::from_secs(1));
    let pins = pins_of(&t, "lb");
    let current = pins.join(format!("maps-v{}", lb_common::LAYOUT_VERSION));
    for old in [5, 4, 3, 2, 1] {
        let flows_before = flow_packets(&t);
        t.stop_lb();
        pin_as_layout(&t, old);
        t.start_lb();
        // Each start writes its own log.
        let log = t.log("lb");
        assert!(
            log.contains("connection table migrated") && log.contains(&format!("layout: {old} }}")),
            "layout {old}: {log}"
        );
        assert!(current.join("FLOWS").exists());
        assert!(
            !pins.join(format!("maps-v{old}")).exists(),
            "layout {old}'s maps stay"
        );
        assert!(!pins
            .join(format!("maps-v{}-next", lb_common::LAYOUT_VERSION))
            .exists());
        std::thread::sleep(Duration::from_secs(1));
        // The long-lived flows kept their entries (and so their backends).
        let flows_after = flow_packets(&t);
        let kept = flows_before
            .iter()
            .filter(|(c, p)| flows_after.get(*c).is_some_and(|a| a > *p))
            .count();
        println!(
            "layout {old}: {kept} of {} flows kept counting",
            flows_before.len()
        );
        assert!(
            kept >= 100,
            "layout {old}: {kept} of {} flows kept counting",
            flows_before.len()
        );
    }

    // A layout this agent cannot convert is refused, and nothing is touched.
    t.stop_lb();
    let unknown = pins.join("maps-v99");
    std::fs::create_dir(&unknown).unwrap();
    let out = t.run_agent("lb", &t.dir.join("lb.toml"), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("map layout 99") && err.contains("--cleanup"),
        "{err}"
    );
    assert!(current.join("FLOWS").exists());
    std::fs::remove_dir(&unknown).unwrap();
    t.start_lb();
    std::thread::sleep(Duration::from_secs(1));
    let (_, _, failures) = load.stop();
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
}

#[test]
fn cleanup_removes_everything_and_a_second_agent_is_refused() {
    let mut t = Topology::new(1);
    t.start(&[100]);
    let config = t.dir.join("lb.toml");
    let state_file = t.dir.join("lifecycle.json");
    let state_before = std::fs::read(&state_file).unwrap();

    // The same instance: refused by its lock, the first untouched.
    let out = t.run_agent("lb", &config, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another agent runs instance"), "{err}");
    assert_eq!(std::fs::read(&state_file).unwrap(), state_before);
    assert!(t.lb_socket().exists());
    assert!(t.from_client(|| connect_once(web())).is_ok());

    // Another instance on the same interface: refused, nothing pinned for it.
    let other = t.write(
        "other.toml",
        &std::fs::read_to_string(&config)
            .unwrap()
            .replace(&t.instance("lb"), &format!("{}-other", t.id))
            .replace("lb.sock", "other.sock"),
    );
    let out = t.run_agent("lb", &other, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already has an XDP program"), "{err}");
    assert!(!Path::new(lb_userspace::datapath::PIN_ROOT)
        .join(format!("{}-other", t.id))
        .exists());
    assert!(!t.dir.join("other.sock").exists());

    // A socket path that is a regular file is left alone.
    let file = t.write("not-a-socket", "keep me");
    let decap = t.write(
        "decap.toml",
        &format!(
            "instance = \"{}-file\"\nsocket = \"{}\"\n[decap]\ninterfaces = [\"eth0\"]\naddresses = [\"198.18.0.1\"]\n",
            t.id,
            file.display()
        ),
    );
    let out = t.run_agent("cl", &decap, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a socket"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    // Cleanup is refused while the agent runs.
    let out = t.run_agent("lb", &config, &["--cleanup"]);
    assert!(!out.status.success());

    // `lbctl shutdown --detach`: nothing is left.
    let out = t.lbctl(&["shutdown", "--detach"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t.wait_lb_exit().success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while pins_of(&t, "lb").exists() || lb_prog_id(&t).is_some() {
        assert!(
            Instant::now() < deadline,
            "shutdown --detach left the datapath"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!t.lb_socket().exists());

    // Started again, stopped: the datapath stays until `lb-agent --cleanup`.
    t.start_lb();
    t.stop_lb();
    assert!(pins_of(&t, "lb").exists());
    assert!(lb_prog_id(&t).is_some());
    let out = t.run_agent("lb", &config, &["--cleanup"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins_of(&t, "lb").exists());
    assert_eq!(lb_prog_id(&t), None, "the program is detached");
    assert!(!t.lb_socket().exists());
}

/// One UDP datagram from the client to the VIP's address on `port`, which
/// no VIP serves: `lb_ingress` passes it to the stack (`passed_not_vip`).
fn probe(t: &Topology, port: u16) {
    let to = SocketAddr::new(VIP_V4.parse().unwrap(), port);
    t.from_client(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
        s.send_to(b"probe", to).expect("send");
    });
}

/// The datapath records in the LB agent's JSON log since its last start.
fn datapath_records(t: &Topology) -> Vec<serde_json::Value> {
    t.log("lb")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "lb_datapath")
        .collect()
}

#[test]
fn datapath_logs_follow_each_start_and_keep_the_flows() {
    let mut t = Topology::new(2);
    t.start(&[100, 100]);
    let load = Load::start(&t, web(), 50);
    let vip = VIP_V4;

    // Without --datapath-log: no record, whatever the programs pass.
    t.stop_lb();
    t.start_lb_with(&["--log-format", "json"]);
    probe(&t, 4242);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        datapath_records(&t).is_empty(),
        "records without --datapath-log: {:?}",
        datapath_records(&t)
    );

    // With it: the next agent's program logs the passed datagram.
    t.stop_lb();
    t.start_lb_with(&["--datapath-log", "--log-format", "json"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let dst = format!("{vip}:4243");
    let record = loop {
        probe(&t, 4243);
        std::thread::sleep(Duration::from_millis(200));
        if let Some(r) = datapath_records(&t).into_iter().find(|r| r["dst"] == dst) {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no datapath record for {dst}:\n{}",
            t.log("lb")
        );
    };
    assert_eq!(record["program"], "lb_ingress", "{record}");
    assert_eq!(record["outcome"], "passed_not_vip", "{record}");
    assert_eq!(record["action"], "pass", "{record}");
    assert_eq!(record["proto"], "17", "{record}");
    // Forwarded packets (the load's) are not logged.
    let web_dst = format!("{vip}:80");
    assert!(
        !datapath_records(&t).iter().any(|r| r["dst"] == web_dst),
        "a forwarded packet was logged"
    );

    // And off again with the next start.
    t.stop_lb();
    t.start_lb_with(&["--log-format", "json"]);
    probe(&t, 4244);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        datapath_records(&t).is_empty(),
        "records after a restart without --datapath-log: {:?}",
        datapath_records(&t)
    );

    // Shown if the checks below fail: the outcome counters (kept across
    // the restarts in the pinned maps) say whether the datapath dropped
    // or passed a packet of the load.
    println!(
        "LB status at the end:\n{}",
        String::from_utf8_lossy(&t.lbctl(&["status"]).stdout)
    );
    let (_, rounds, failures) = load.stop();
    assert!(
        failures.is_empty(),
        "{} failures over the restarts: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(rounds > 0, "the long connections made no round");
}
