//! The read-only dashboard on the metrics listener: a page whose assets are
//! embedded in the binary (`assets/`: HTML, CSS, and a script that draws its
//! own SVG charts), and the JSON it reads. The JSON is what `lbctl` shows,
//! from the same functions: `/api/status` is `lbctl status --json`,
//! `/api/maintenance` is `lbctl maintenance status --json`, `/api/flows`
//! is `lbctl flows --json`; `/api/history` holds the VIPs' and backends'
//! counters of the last minutes, sampled here, from which the page draws
//! packet and new-flow rates.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde::Serialize;

use super::{
    control, report,
    state::{wall_ms, Shared},
    status,
};
use crate::api::{FlowQuery, Response as ApiResponse, Status};

/// The JSON endpoints, for the listener's "not found" answer.
pub(crate) const API_PATHS: [&str; 4] = [
    "/api/status",
    "/api/maintenance",
    "/api/flows",
    "/api/history",
];

/// How often the counters are sampled for the charts, and how many samples
/// are kept (five minutes, or less with very many VIPs and backends).
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const SAMPLES: usize = 150;
/// At most this many (VIP or backend, counters) entries over all samples
/// (a few MiB): with thousands of backends the history is shorter.
const ENTRIES: usize = 100_000;
/// The largest flows the page lists.
const TOP_FLOWS: usize = 10;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// Packets and new flows of a VIP or a backend at one sample.
#[derive(Debug, Clone, Copy, Serialize)]
struct Point {
    packets: u64,
    new_flows: u64,
}

/// One sample of every VIP's and backend's counters.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    /// Wall clock, milliseconds since the epoch.
    at_ms: u64,
    vips: BTreeMap<String, Point>,
    backends: BTreeMap<String, Point>,
}

/// The samples of the last minutes, oldest first.
#[derive(Clone, Default)]
pub(crate) struct History(Arc<Mutex<VecDeque<Sample>>>);

impl History {
    /// Starts sampling `state` every `SAMPLE_EVERY`.
    pub(crate) fn start(state: Shared) -> History {
        let history = History::default();
        let kept = history.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let status = status::status(&*state.lock().await);
                if let Ok(s) = status {
                    kept.record(&s, wall_ms());
                }
            }
        });
        history
    }

    fn record(&self, s: &Status, at_ms: u64) {
        let point = |c: &crate::api::Counters| Point {
            packets: c.packets,
            new_flows: c.new_flows,
        };
        let sample = Sample {
            at_ms,
            vips: s
                .vips
                .iter()
                .map(|v| (v.name.clone(), point(&v.counters)))
                .collect(),
            backends: s
                .backends
                .iter()
                .map(|b| (b.address.to_string(), point(&b.counters)))
                .collect(),
        };
        let per_sample = (sample.vips.len() + sample.backends.len()).max(1);
        let kept = (ENTRIES / per_sample).clamp(2, SAMPLES);
        let mut samples = self.0.lock().expect("not poisoned");
        samples.push_back(sample);
        while samples.len() > kept {
            samples.pop_front();
        }
    }

    fn samples(&self) -> Vec<Sample> {
        self.0
            .lock()
            .expect("not poisoned")
            .iter()
            .cloned()
            .collect()
    }
}

/// The page, its assets and its JSON.
pub(crate) fn routes(state: Shared, history: History) -> Router {
    let asset = |body: &'static str, kind: &'static str| {
        get(move || async move {
            (
                [
                    (header::CONTENT_TYPE, kind),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                body,
            )
        })
    };
    let html = "text/html; charset=utf-8";
    let (s1, s2, s3) = (state.clone(), state.clone(), state);
    Router::new()
        .route("/", asset(INDEX, html))
        .route("/ui", asset(INDEX, html))
        .route(
            "/ui/app.js",
            asset(SCRIPT, "text/javascript; charset=utf-8"),
        )
        .route("/ui/style.css", asset(STYLE, "text/css; charset=utf-8"))
        .route(
            "/api/status",
            get(move || async move { json(status::status(&*s1.lock().await)) }),
        )
        .route(
            "/api/maintenance",
            get(move || async move {
                match control::maintenance_status(&*s2.lock().await) {
                    ApiResponse::MaintenanceStatus { vips } => json(Ok(vips)),
                    _ => json::<()>(Err(anyhow::anyhow!("no maintenance status"))),
                }
            }),
        )
        .route(
            "/api/flows",
            get(move || async move {
                let query = FlowQuery {
                    limit: TOP_FLOWS,
                    ..FlowQuery::default()
                };
                match report::flows(&s3, &query).await {
                    Ok(ApiResponse::Flows { flows, matched }) => json(Ok(
                        serde_json::json!({ "matched": matched, "flows": flows }),
                    )),
                    Ok(_) => json::<()>(Err(anyhow::anyhow!("no flows"))),
                    Err(e) => json::<()>(Err(e)),
                }
            }),
        )
        .route(
            "/api/history",
            get(move || async move {
                let samples = history.samples();
                Json(serde_json::json!({
                    "sample_every_s": SAMPLE_EVERY.as_secs(),
                    "samples": samples,
                }))
            }),
        )
}

/// A value as JSON, or the error as `{"error": ...}` with 503 (the agent
/// has no balancer, say).
fn json<T: Serialize>(value: anyhow::Result<T>) -> Response {
    match value {
        Ok(v) => Json(v).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": format!("{e:#}") })),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_last_samples() {
        let h = History::default();
        let mut s = Status::default();
        s.backends.push(crate::api::BackendStatus {
            address: "198.18.0.11".parse().unwrap(),
            backend_id: 1,
            next_hop: None,
            counters: crate::api::Counters {
                packets: 7,
                ..Default::default()
            },
            active_flows: 0,
        });
        for i in 0..(SAMPLES as u64 + 5) {
            h.record(&s, i);
        }
        let samples = h.samples();
        assert_eq!(samples.len(), SAMPLES);
        assert_eq!(samples[0].at_ms, 5);
        assert_eq!(samples[0].backends["198.18.0.11"].packets, 7);
        // With very many backends, fewer samples are kept.
        for i in 0..2000u32 {
            let mut b = s.backends[0].clone();
            // 198.19.0.0 and up.
            b.address = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0xc613_0000 + i));
            s.backends.push(b);
        }
        for i in 0..100 {
            h.record(&s, 1000 + i);
        }
        assert_eq!(h.samples().len(), ENTRIES / 2001);
    }
}
