//! The agent under clients that would use it up: idle connections to its
//! metrics port must not take the descriptors its health checks and the
//! control API need.
use std::{
    io::Read as _,
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::topology::*;

/// Sets this process's soft limit on open files; returns the previous one.
fn set_soft_file_limit(soft: u64) -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a valid rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        let previous = l.rlim_cur;
        l.rlim_cur = soft.min(l.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0);
        previous
    }
}

/// The process running `lb-agent --config <config>`.
fn agent_pid(config: &Path) -> u32 {
    let wanted = config.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find_map(|d| {
            let pid: u32 = d.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(d.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let agent = args.first()?.ends_with("lb-agent") && args.contains(&wanted);
            agent.then_some(pid)
        })
        .expect("the LB agent's process")
}

/// The soft and hard "Max open files" of a process.
fn file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].to_string(), f[4].to_string())
}

/// `lbctl status --json`, or `None` if it takes over `within`.
fn status_within(t: &Topology, within: Duration) -> Option<serde_json::Value> {
    let mut child = Command::new(bin("lbctl"))
        .arg("--socket")
        .arg(t.lb_socket())
        .args(["status", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run lbctl");
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    serde_json::from_slice(&out).ok()
}

fn web_health(status: &serde_json::Value) -> Vec<String> {
    let web = status["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "web")
        .unwrap();
    web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["health"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn idle_clients_of_the_metrics_port_leave_health_checks_and_lbctl_alone() {
    let mut t = Topology::new(3);
    // The agents start as a service manager starts them: 1024 open files.
    let saved = set_soft_file_limit(1024);
    t.start(&[100, 100, 100]);
    set_soft_file_limit(saved);
    let pid = agent_pid(&t.dir.join("lb.toml"));
    let (soft, hard) = file_limits(pid);
    assert_eq!(
        soft, hard,
        "the agent raised its soft limit to the hard one"
    );

    // Up to 1,500 idle connections to the metrics port, as any local user
    // can open (until the listener's backlog stays full).
    let idle: Vec<TcpStream> = in_netns(&t.ns("lb"), || {
        let to = "127.0.0.1:9180".parse().unwrap();
        let (mut open, mut refused) = (Vec::new(), 0);
        while open.len() < 1500 && refused < 5 {
            match TcpStream::connect_timeout(&to, Duration::from_millis(200)) {
                Ok(s) => {
                    open.push(s);
                    refused = 0;
                }
                Err(_) => refused += 1,
            }
        }
        open
    })
    .join()
    .unwrap();
    eprintln!("{} idle connections to the metrics port", idle.len());
    // Health checks run every 300 ms and two failures take a backend down.
    std::thread::sleep(Duration::from_secs(2));
    let status = status_within(&t, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("lbctl status got no answer within 5 s:\n{}", t.log("lb")));
    assert_eq!(web_health(&status), ["up", "up", "up"], "{}", t.log("lb"));
    let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    eprintln!("the agent holds {descriptors} descriptors");
    assert!(
        descriptors < 200,
        "the agent holds {descriptors} descriptors"
    );

    // Once they leave, a scrape is answered at once.
    drop(idle);
    let metrics = t.scrape_metrics();
    assert!(
        metrics.contains("lb_health_check_local_errors_total 0"),
        "{metrics}"
    );
    let lines = t.log("lb").lines().count();
    assert!(lines < 100, "{lines} log lines:\n{}", t.log("lb"));
}
