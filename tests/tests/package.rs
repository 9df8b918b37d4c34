//! The Debian package `cargo xtask dist` builds (`cargo xtask test` builds
//! it first): what it holds, that its binaries and example configurations
//! work, that its systemd units pass `systemd-analyze verify`, and that
//! the LB node's agent runs with only the capabilities its unit leaves it
//! (logging JSON, as for a log shipper).

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::topology::*;

fn dist() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dist")
}

fn package() -> PathBuf {
    std::fs::read_dir(dist())
        .expect(
            "target/dist: run the tests through `cargo xtask test` (it runs `cargo xtask dist`)",
        )
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("no package in target/dist: run `cargo xtask dist`")
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The package unpacked in a temporary directory, removed when dropped.
struct Unpacked(PathBuf);

impl Unpacked {
    fn new() -> Unpacked {
        let dir = std::env::temp_dir().join(format!("lb-package-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        output(Command::new("dpkg-deb").arg("-x").arg(package()).arg(&dir));
        Unpacked(dir)
    }

    fn path(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Unpacked {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_package_holds_binaries_units_configs_docs_and_dashboard() {
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(package()));
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    for want in [
        "./usr/bin/lb-agent",
        "./usr/bin/lbctl",
        "./usr/lib/systemd/system/lb-agent.service",
        "./usr/lib/systemd/system/lb-agent-backend.service",
        "./etc/lb-agent/lb.toml.example",
        "./etc/lb-agent/backend.toml.example",
        "./usr/share/man/man1/lb-agent.1.gz",
        "./usr/share/man/man1/lbctl.1.gz",
        "./usr/share/man/man1/lbctl-status.1.gz",
        "./usr/share/man/man1/lbctl-maintenance.1.gz",
        "./usr/share/bash-completion/completions/lbctl",
        "./usr/share/bash-completion/completions/lb-agent",
        "./usr/share/zsh/vendor-completions/_lbctl",
        "./usr/share/fish/vendor_completions.d/lbctl.fish",
        "./usr/share/lb-agent/grafana/lb.json",
    ] {
        assert!(
            files.contains(&want),
            "{want} is not in the package:\n{listing}"
        );
    }
    let info = output(Command::new("dpkg-deb").arg("-I").arg(package()));
    assert!(info.contains("Package: lb-agent"), "{info}");
    assert!(info.contains("Depends: libc6"), "{info}");

    let p = Unpacked::new();
    // The packaged binaries run, with the eBPF object inside lb-agent.
    let version = output(Command::new(p.path("usr/bin/lbctl")).arg("--version"));
    assert!(version.starts_with("lbctl "), "{version}");
    for example in ["lb.toml", "backend.toml"] {
        let config = p.path(&format!("etc/lb-agent/{example}.example"));
        let checked = output(
            Command::new(p.path("usr/bin/lb-agent"))
                .arg("--config")
                .arg(&config)
                .arg("--check"),
        );
        assert!(checked.contains("valid"), "{checked}");
    }
    // Man pages and completions come from the clap definitions.
    let page =
        output(Command::new("zcat").arg(p.path("usr/share/man/man1/lbctl-maintenance.1.gz")));
    assert!(page.contains("rollout"), "{page}");
    let bash =
        std::fs::read_to_string(p.path("usr/share/bash-completion/completions/lbctl")).unwrap();
    assert!(
        bash.contains("maintenance") && bash.contains("--wait"),
        "bash completion"
    );
    let grafana = std::fs::read(p.path("usr/share/lb-agent/grafana/lb.json")).unwrap();
    serde_json::from_slice::<serde_json::Value>(&grafana).expect("the Grafana dashboard is JSON");
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let p = Unpacked::new();
    for unit in ["lb-agent.service", "lb-agent-backend.service"] {
        let path = p.path(&format!("usr/lib/systemd/system/{unit}"));
        // The units name /usr/bin/...: point them at the unpacked binaries.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/bin/", &format!("{}/", p.path("usr/bin").display()));
        let copy = p.path(unit);
        std::fs::write(&copy, text).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy)
            .output()
            .expect("systemd-analyze (Debian package systemd)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "{unit}: {err}"
        );
    }
}

/// Capability numbers (linux/capability.h) of the names units use.
fn capability(name: &str) -> u32 {
    match name {
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("capability {other} is not in this test's table"),
    }
}

/// The capabilities `CapabilityBoundingSet=` of a unit leaves.
fn bounding_set(unit: &Path) -> Vec<u32> {
    let text = std::fs::read_to_string(unit).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet in the unit");
    line.split_whitespace().map(capability).collect()
}

/// An agent started with only `caps` in its bounding set: as root, that is
/// all it has after exec, as under its unit. Killed when dropped.
struct Restricted(Child);

impl Drop for Restricted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_lb_agent_runs_with_only_its_units_capabilities() {
    let unit = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/lb-agent.service");
    let caps = bounding_set(&unit);
    assert!(!caps.contains(&capability("CAP_SYS_ADMIN")));
    let mask = caps.iter().fold(0u64, |m, c| m | 1 << c);
    let mut t = Topology::new(2);
    t.start(&[100, 100]);
    // A fresh start (no pinned datapath to adopt): programs load and attach.
    let out = t.lbctl(&["shutdown", "--detach"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.wait_lb_exit();
    let config = t.write("lb-restricted.toml", "").with_file_name("lb.toml");
    let log = std::fs::File::create(config.with_file_name("lb-restricted.log")).unwrap();
    let mut cmd = agent_command(&t.ns("lb"));
    // As a log shipper would read it.
    cmd.arg("--config")
        .arg(&config)
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: prctl(PR_CAPBSET_DROP) only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for cap in 0..=40u32 {
                if !caps.contains(&cap)
                    && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                    && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let agent = Restricted(cmd.spawn().expect("spawn lb-agent"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let log =
        || std::fs::read_to_string(config.with_file_name("lb-restricted.log")).unwrap_or_default();
    loop {
        let out = t.lbctl(&["status", "--json"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restricted agent did not start:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let vip: SocketAddr = format!("{VIP_V4}:80").parse().unwrap();
    let answers = t.from_client(move || {
        (0..20)
            .map(|_| connect_once(vip).expect("a connection through the VIP"))
            .collect::<Vec<_>>()
    });
    assert_eq!(answers.len(), 20);
    let status = t.status_json();
    assert_eq!(status["interfaces"][0]["program"], "lb_ingress", "{status}");
    let web = status["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "web")
        .expect("VIP web");
    assert!(
        web["counters"]["new_flows"].as_u64().unwrap() >= 20,
        "{status}"
    );
    // It really ran with only those capabilities.
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", agent.0.id())).unwrap();
    let effective = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(effective, mask, "CapEff of the agent");
    let log = log();
    assert!(!log.contains("ERROR"), "{log}");
    // One JSON object per line, with its level, target and message.
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(records.len() >= 2, "{log}");
    assert!(
        records
            .iter()
            .all(|r| r["level"].is_string() && r["target"].is_string()),
        "{log}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["message"] == "datapath maps" && r["origin"] == "Fresh"),
        "{log}"
    );
}
