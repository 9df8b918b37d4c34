//! The dashboard in a real browser: Debian's chromium, headless, driven over
//! WebDriver (chromedriver, with fantoccini) in the LB's namespace while a
//! client sends traffic. The page's figures must be those `lbctl status
//! --json` shows; a screenshot is saved as `target/dashboard.png`. Also: the
//! listener's answers to bad requests, and the Grafana dashboard's queries
//! against a real scrape.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder};
use lb_tests::topology::*;
use serde_json::{json, Value};

const DRIVER_PORT: u16 = 9515;

/// chromedriver (and the chromium it starts, in its process group) in a
/// namespace, with a profile directory; all gone when dropped.
struct Browser {
    driver: Child,
    profile: PathBuf,
}

impl Browser {
    fn start(ns: &str) -> Browser {
        let profile = std::env::temp_dir().join(format!("lb-dashboard-{}", std::process::id()));
        std::fs::create_dir_all(&profile).expect("profile dir");
        let driver = Command::new("ip")
            .args(["netns", "exec", ns, "chromedriver"])
            .arg(format!("--port={DRIVER_PORT}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect(
                "chromedriver (Debian package chromium-driver; scripts/bootstrap.sh installs it)",
            );
        Browser { driver, profile }
    }

    fn capabilities(&self) -> serde_json::Map<String, Value> {
        let caps = json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,2400",
                         format!("--user-data-dir={}", self.profile.display())],
            }
        });
        caps.as_object().unwrap().clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill on the process group chromedriver leads.
        unsafe { libc::kill(-(self.driver.id() as i32), libc::SIGKILL) };
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A client in the client namespace opening connections to the VIP until
/// stopped, holding the last few open.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Traffic {
    fn start(t: &Topology) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let vip: SocketAddr = format!("{VIP_V4}:80").parse().unwrap();
        let thread = in_netns(&t.ns("cl"), move || {
            let mut held: Vec<TcpStream> = Vec::new();
            let mut opened = 0;
            while !s.load(Ordering::Relaxed) {
                if let Ok(stream) = TcpStream::connect_timeout(&vip, Duration::from_secs(2)) {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut line = String::new();
                    let _ = BufReader::new(&stream).read_line(&mut line);
                    held.push(stream);
                    opened += 1;
                    if held.len() > 4 {
                        held.remove(0);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            opened
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the client; returns how many connections it opened.
    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap())
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every figure on the page: `data-k` key -> text.
async fn figures(c: &Client) -> serde_json::Map<String, Value> {
    let script = "return Object.fromEntries([...document.querySelectorAll('[data-k]')].map(e => [e.dataset.k, e.textContent]));";
    match c.execute(script, vec![]).await.expect("read the page") {
        Value::Object(m) => m,
        other => panic!("page figures: {other}"),
    }
}

async fn refreshes(c: &Client) -> u64 {
    let script = "return Number(document.getElementById('updated').dataset.refreshes || 0);";
    c.execute(script, vec![])
        .await
        .expect("read the page")
        .as_u64()
        .unwrap_or(0)
}

/// The figures `lbctl status --json` gives, under the page's keys.
fn expected(status: &Value) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    let mut put = |k: String, v: &Value| {
        let text = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        m.insert(k, Value::String(text));
    };
    for v in status["vips"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        for c in [
            "packets",
            "bytes",
            "bytes_out",
            "new_flows",
            "closed_fin",
            "closed_rst",
        ] {
            put(format!("vip/{name}/{c}"), &v["counters"][c]);
        }
        for b in v["backends"].as_array().unwrap() {
            let k = format!("backend/{name}/{}", b["address"].as_str().unwrap());
            for f in [
                "state",
                "health",
                "weight",
                "effective_weight",
                "active_flows",
                "maglev_slots",
            ] {
                put(format!("{k}/{f}"), &b[f]);
            }
        }
    }
    for b in status["backends"].as_array().unwrap() {
        let k = format!("host/{}", b["address"].as_str().unwrap());
        put(format!("{k}/packets"), &b["counters"]["packets"]);
        put(format!("{k}/new_flows"), &b["counters"]["new_flows"]);
        put(format!("{k}/active_flows"), &b["active_flows"]);
    }
    for o in status["outcomes"].as_array().unwrap() {
        let name = o["outcome"].as_str().unwrap();
        put(format!("outcome/{name}/packets"), &o["packets"]);
        put(format!("outcome/{name}/bytes"), &o["bytes"]);
    }
    m
}

/// Keys whose values differ between the page and `lbctl`.
fn differences(
    page: &serde_json::Map<String, Value>,
    want: &serde_json::Map<String, Value>,
) -> Vec<String> {
    want.iter()
        .filter(|(k, v)| page.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: page {:?}, lbctl {v}", page.get(k)))
        .collect()
}

/// Waits until the page, read between two `lbctl status --json` calls,
/// shows what one of them shows; returns that status and the page's figures.
async fn agree(
    c: &Client,
    status_json: &dyn Fn() -> Value,
) -> (Value, serde_json::Map<String, Value>) {
    let mut last = Vec::new();
    for _ in 0..20 {
        let before = status_json();
        let seen = refreshes(c).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while refreshes(c).await <= seen + 1 {
            assert!(Instant::now() < deadline, "the page stopped refreshing");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let on_page = figures(c).await;
        let after = status_json();
        let (b, a) = (expected(&before), expected(&after));
        if differences(&on_page, &b).is_empty() {
            return (before, on_page);
        }
        if differences(&on_page, &a).is_empty() {
            return (after, on_page);
        }
        last = differences(&on_page, &a);
        last.push(format!("(lbctl itself moved: {:?})", differences(&b, &a)));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the page does not show what lbctl shows: {last:#?}");
}

fn screenshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard.png")
}

#[test]
fn the_dashboard_shows_what_lbctl_shows() {
    let mut t = Topology::new(2);
    t.start(&[100, 50]);
    let mut traffic = Traffic::start(&t);
    let browser = Browser::start(&t.ns("lb"));
    let caps = browser.capabilities();
    let socket = t.lb_socket();
    let socket2 = socket.clone();
    let lbctl = bin("lbctl");
    let status_json = move || -> Value {
        let out = Command::new(&lbctl)
            .arg("--socket")
            .arg(&socket)
            .args(["status", "--json"])
            .output()
            .expect("lbctl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    };
    let stop_traffic = {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        (tx, rx, done_tx, done_rx)
    };
    let (stop_tx, stop_rx, stopped_tx, stopped_rx) = stop_traffic;
    let page = in_netns(&t.ns("lb"), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            let c = loop {
                match ClientBuilder::new(connector.clone())
                    .capabilities(caps.clone())
                    .connect(&format!("http://127.0.0.1:{DRIVER_PORT}"))
                    .await
                {
                    Ok(c) => break c,
                    Err(e) if Instant::now() > deadline => panic!("chromedriver: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            c.goto("http://127.0.0.1:9180/ui").await.expect("open the page");
            // With live traffic, the charts show rates: wait for a sample
            // pair with packets in it.
            let deadline = Instant::now() + Duration::from_secs(30);
            let legend = "return [...document.querySelectorAll('[data-chart=\"vip-packets\"] .legend span')].map(e => e.textContent).join(' | ');";
            loop {
                let text = c.execute(legend, vec![]).await.unwrap();
                let text = text.as_str().unwrap_or("").to_string();
                let rate = text
                    .split(" | ")
                    .find_map(|e| e.strip_prefix("■ web "))
                    .and_then(|r| r.split('/').next())
                    .and_then(|r| r.parse::<f64>().ok())
                    .unwrap_or(0.0);
                if rate > 0.0 {
                    break;
                }
                assert!(Instant::now() < deadline, "no packet rate on the chart: {text:?}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            // A few samples, so the screenshot shows the lines.
            let points = "return (document.querySelector('[data-chart=\"vip-packets\"] polyline[data-series=\"web\"]')?.getAttribute('points') || '').split(' ').length;";
            while c.execute(points, vec![]).await.unwrap().as_u64().unwrap_or(0) < 5 {
                assert!(Instant::now() < deadline + Duration::from_secs(30), "the chart line does not grow");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let lines = "return document.querySelectorAll('[data-chart] polyline').length;";
            let polylines = c.execute(lines, vec![]).await.unwrap().as_u64().unwrap();
            assert!(polylines >= 4, "{polylines} chart lines");
            let png = c.screenshot().await.expect("screenshot");
            // Then, with the traffic stopped and the figures settled, the page
            // must agree with lbctl.
            stop_tx.send(()).unwrap();
            stopped_rx.recv().unwrap();
            let (status, figures) = agree(&c, &status_json).await;
            // An operator takes a backend out: the page shows it among the
            // backends in maintenance, and still agrees with lbctl.
            let out = Command::new(bin("lbctl"))
                .arg("--socket")
                .arg(&socket2)
                .args(["backend", "disable", "web", &backend_v4(1)])
                .output()
                .expect("lbctl");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let (after, on_page) = agree(&c, &status_json).await;
            let key = format!("maint/web/{}/phase", backend_v4(1));
            assert_eq!(on_page.get(&key).and_then(Value::as_str), Some("disabled active"), "{on_page:#?}");
            let health = format!("backend/web/{}/health", backend_v4(1));
            assert_eq!(on_page[&health], "disabled");
            let web = after["vips"].as_array().unwrap().iter().find(|v| v["name"] == "web").unwrap();
            let b1 = web["backends"].as_array().unwrap().iter().find(|b| b["address"] == backend_v4(1).as_str()).unwrap();
            assert_eq!(b1["health"], "disabled", "lbctl: {b1}");
            assert_eq!(b1["effective_weight"], 0, "lbctl: {b1}");
            c.close().await.ok();
            (png, status, figures.len())
        })
    });
    stop_rx.recv().unwrap();
    let opened = traffic.stop();
    std::thread::sleep(Duration::from_secs(1));
    stopped_tx.send(()).unwrap();
    let (png, status, figures) = page.join().expect("browser thread");
    assert!(opened > 20, "the client opened {opened} connections");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(screenshot_path(), &png).expect("save the screenshot");
    let web = status["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "web")
        .expect("VIP web");
    let packets = web["counters"]["packets"].as_u64().unwrap();
    assert!(
        packets > 0 && figures > 20,
        "{packets} packets, {figures} figures"
    );
    drop(browser);
}

/// One HTTP/1.1 exchange with the metrics listener in the LB's namespace:
/// the status line and the body.
fn http(t: &Topology, request: Vec<u8>) -> (String, String) {
    in_netns(&t.ns("lb"), move || {
        let mut s = TcpStream::connect("127.0.0.1:9180").expect("listener");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    })
    .join()
    .unwrap()
}

#[test]
fn the_listener_answers_bad_requests_with_clear_errors() {
    let mut t = Topology::new(1);
    t.start(&[100]);
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n");
    let (line, body) = http(&t, get("/nothing-here").into_bytes());
    assert!(line.contains(" 404 "), "{line}");
    assert!(
        body.contains("no page at /nothing-here") && body.contains("/api/status"),
        "{body}"
    );
    let post =
        "POST /api/status HTTP/1.1\r\nHost: lb\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    let (line, _) = http(&t, post.as_bytes().to_vec());
    assert!(line.contains(" 405 "), "the dashboard is read-only: {line}");
    // A head over the listener's bound.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: lb\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let (line, _) = http(&t, big.into_bytes());
    assert!(line.contains(" 431 ") || line.is_empty(), "{line}");
    let (line, _) = http(&t, b"NOT HTTP AT ALL\r\n\r\n".to_vec());
    assert!(line.contains(" 400 ") || line.is_empty(), "{line}");
    // The listener still serves.
    let (line, body) = http(&t, get("/api/status").into_bytes());
    assert!(line.contains(" 200 "), "{line}");
    let status: Value = serde_json::from_str(&body).expect("JSON");
    let lbctl = t.status_json();
    assert_eq!(status["interfaces"], lbctl["interfaces"]);
    assert_eq!(
        status["vips"].as_array().unwrap().len(),
        lbctl["vips"].as_array().unwrap().len()
    );
    // OpenMetrics when asked for.
    let om = "GET /metrics HTTP/1.1\r\nHost: lb\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\nConnection: close\r\n\r\n";
    let (line, body) = http(&t, om.as_bytes().to_vec());
    assert!(line.contains(" 200 "), "{line}");
    assert!(body.contains("# TYPE lb_vip_packets counter"), "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
}

/// Every `lb_*` metric name a query of `deploy/grafana/lb.json` uses.
fn grafana_metric_names() -> BTreeSet<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/lb.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("lb.json")).expect("JSON");
    let mut exprs = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "only {} queries in lb.json", exprs.len());
    let name = regex::Regex::new(r"\blb_[a-z0-9_]+").unwrap();
    exprs
        .iter()
        .flat_map(|e| name.find_iter(e).map(|m| m.as_str().to_string()))
        .collect()
}

#[test]
fn every_metric_the_grafana_dashboard_queries_is_scraped() {
    let mut t = Topology::new(2);
    t.start(&[100, 100]);
    let vip: SocketAddr = format!("{VIP_V4}:80").parse().unwrap();
    t.from_client(move || {
        for _ in 0..20 {
            connect_once(vip).expect("a connection through the VIP");
        }
    });
    // Let the collector see the flows.
    std::thread::sleep(Duration::from_secs(1));
    let text = t.scrape_metrics();
    let scraped: BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("lb_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<String> = grafana_metric_names()
        .into_iter()
        .filter(|n| !scraped.contains(n.as_str()))
        .collect();
    assert!(missing.is_empty(), "queried but not scraped: {missing:?}");
}
