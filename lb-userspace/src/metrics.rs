//! Prometheus text exposition (format 0.0.4) of the datapath counters and the
//! collector's aggregates, on the TCP address in `[metrics] listen`.

use std::fmt::Write as _;

use anyhow::Result;
use axum::{http::header::CONTENT_TYPE, http::StatusCode, routing::get, Router};
use lb_common::{DecapOutcome, Outcome};
use tokio::net::TcpListener;
use tracing::warn;

use crate::{agent::Shared, datapath::Datapath as _};

pub(crate) async fn serve(listener: TcpListener, state: Shared) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let state = state.clone();
            async move {
                match render(&state).await {
                    Ok(text) => (
                        StatusCode::OK,
                        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
                        text,
                    ),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [(CONTENT_TYPE, "text/plain")],
                        format!("{e:#}\n"),
                    ),
                }
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        warn!("metrics server stopped: {e}");
    }
}

/// Text exposition writer: one `# HELP`/`# TYPE` per family, escaped labels.
#[derive(Default)]
struct Exposition {
    text: String,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.sample_text(name, labels, &value.to_string());
    }

    /// A fractional sample; non-finite values are left out.
    fn sample_f(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        if value.is_finite() {
            self.sample_text(name, labels, &value.to_string());
        }
    }

    fn sample_text(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.text.push_str(name);
        if !labels.is_empty() {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.text, "{{{}}}", l.join(","));
        }
        let _ = writeln!(self.text, " {value}");
    }
}

/// The exposition text for the agent's current state.
pub(crate) async fn render(state: &Shared) -> Result<String> {
    let st = state.lock().await;
    let mut out = Exposition::default();
    if let Some(bal) = &st.balancer {
        let dp = bal.datapath();
        let c = &st.collector;
        let vips = bal.vips();
        struct Row {
            labels: Vec<(&'static str, String)>,
            t: lb_common::TrafficCounters,
            e: crate::collector::Expired,
            p: crate::collector::Presence,
        }
        let mut rows = Vec::new();
        for (id, v) in &vips {
            rows.push(Row {
                labels: vec![
                    ("vip", v.name.clone()),
                    ("address", v.address.to_string()),
                    ("port", v.port.to_string()),
                    ("protocol", v.protocol.to_string()),
                ],
                t: dp.vip_counters(*id)?,
                e: c.vip_expired(*id),
                p: c.vip_presence.get(id).copied().unwrap_or_default(),
            });
        }
        // One family over all VIPs; `parts` gives (extra label value, value) pairs.
        let mut per_vip =
            |name: &str,
             kind: &str,
             help: &str,
             extra: Option<&str>,
             parts: &dyn Fn(&Row) -> Vec<(&'static str, u64)>| {
                out.family(name, kind, help);
                for r in &rows {
                    for (label, value) in parts(r) {
                        let mut l: Vec<(&str, &str)> =
                            r.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                        if let Some(key) = extra {
                            l.push((key, label));
                        }
                        out.sample(name, &l, value);
                    }
                }
            };
        per_vip(
            "lb_vip_packets_total",
            "counter",
            "Packets from clients to the VIP (each sent on to a backend).",
            None,
            &|r| vec![("", r.t.packets)],
        );
        per_vip(
            "lb_vip_bytes_total",
            "counter",
            "Bytes per leg: client_to_lb as received, lb_to_backend as sent (encapsulation included).",
            Some("leg"),
            &|r| vec![("client_to_lb", r.t.bytes), ("lb_to_backend", r.t.bytes_out)],
        );
        per_vip(
            "lb_vip_flows_opened_total",
            "counter",
            "Flows the VIP's Maglev table placed.",
            None,
            &|r| vec![("", r.t.new_flows)],
        );
        per_vip(
            "lb_vip_flows_closed_total",
            "counter",
            "Flows closed by the client (fin, rst) or expired by the agent.",
            Some("reason"),
            &|r| {
                vec![
                    ("fin", r.t.closed_fin),
                    ("rst", r.t.closed_rst),
                    ("expired", r.e.flows),
                ]
            },
        );
        per_vip(
            "lb_vip_flows_half_open_expired_total",
            "counter",
            "Half-open flows (a SYN and nothing after it) that expired.",
            None,
            &|r| vec![("", r.e.half_open)],
        );
        per_vip(
            "lb_vip_flows_active",
            "gauge",
            "Open flows in the connection table at the last collection.",
            None,
            &|r| vec![("", r.p.active)],
        );
        per_vip(
            "lb_vip_flows_half_open",
            "gauge",
            "Half-open flows in the connection table at the last collection.",
            None,
            &|r| vec![("", r.p.half_open)],
        );

        // Every backend's counters once, from the same status `lbctl` shows.
        let backends = bal.backend_status()?;
        let mut per_backend =
            |name: &str,
             kind: &str,
             help: &str,
             extra: Option<&str>,
             parts: &dyn Fn(&crate::api::BackendStatus) -> Vec<(&'static str, u64)>| {
                out.family(name, kind, help);
                for b in &backends {
                    let addr = b.address.to_string();
                    for (label, value) in parts(b) {
                        let mut l = vec![("backend", addr.as_str())];
                        if let Some(key) = extra {
                            l.push((key, label));
                        }
                        out.sample(name, &l, value);
                    }
                }
            };
        per_backend(
            "lb_backend_packets_total",
            "counter",
            "Packets sent to the backend, over all its VIPs.",
            None,
            &|b| vec![("", b.counters.packets)],
        );
        per_backend(
            "lb_backend_bytes_total",
            "counter",
            "Bytes per leg for the backend's flows, over all its VIPs.",
            Some("leg"),
            &|b| {
                vec![
                    ("client_to_lb", b.counters.bytes),
                    ("lb_to_backend", b.counters.bytes_out),
                ]
            },
        );
        per_backend(
            "lb_backend_flows_opened_total",
            "counter",
            "Flows placed on the backend.",
            None,
            &|b| vec![("", b.counters.new_flows)],
        );
        per_backend(
            "lb_backend_flows_closed_total",
            "counter",
            "Backend flows closed by the client (fin, rst) or expired.",
            Some("reason"),
            &|b| {
                vec![
                    ("fin", b.counters.closed_fin),
                    ("rst", b.counters.closed_rst),
                    ("expired", c.backend_expired(b.backend_id).flows),
                ]
            },
        );
        per_backend(
            "lb_backend_flows_active",
            "gauge",
            "Open flows on the backend at the last collection.",
            None,
            &|b| {
                vec![(
                    "",
                    c.backend_presence
                        .get(&b.backend_id)
                        .map_or(0, |p| p.active),
                )]
            },
        );
        per_backend(
            "lb_backend_next_hop_resolved",
            "gauge",
            "1 when the backend's next-hop MAC is known.",
            None,
            &|b| vec![("", u64::from(b.next_hop.is_some()))],
        );
        // Per (VIP, backend) series, from one read of the VIPs' status.
        let vip_status = bal.vip_status()?;
        // `health_label` adds the backend's standing (up, down, disabled, unchecked).
        let mut per_pair =
            |name: &str,
             help: &str,
             health_label: bool,
             value: &dyn Fn(&crate::api::VipBackendStatus) -> u64| {
                out.family(name, "gauge", help);
                for v in &vip_status {
                    for b in &v.backends {
                        let addr = b.address.to_string();
                        let mut l = vec![("vip", v.name.as_str()), ("backend", addr.as_str())];
                        if health_label {
                            l.push(("health", b.health.as_str()));
                        }
                        out.sample(name, &l, value(b));
                    }
                }
            };
        per_pair(
            "lb_backend_weight",
            "Configured weight of the backend in the VIP.",
            false,
            &|b| u64::from(b.weight),
        );
        per_pair(
            "lb_backend_effective_weight",
            "Weight of the backend in the VIP's table now: 0 while out, scaled by its load.",
            false,
            &|b| u64::from(b.effective_weight),
        );
        per_pair(
            "lb_backend_up",
            "1 when the backend is in service in the VIP: neither down by its health check nor disabled.",
            true,
            &|b| u64::from(b.health != "down" && b.health != "disabled"),
        );
        per_pair(
            "lb_backend_maglev_slots",
            "Slots the backend holds in the VIP's Maglev table.",
            false,
            &|b| u64::from(b.maglev_slots),
        );
        lifecycle_series(&mut out, &st);
        let outcomes = dp.outcomes()?;
        out.family(
            "lb_datapath_packets_total",
            "counter",
            "lb_ingress packets by outcome.",
        );
        for (o, cnt) in Outcome::ALL.iter().zip(&outcomes) {
            out.sample(
                "lb_datapath_packets_total",
                &[("outcome", o.name())],
                cnt.packets,
            );
        }
        out.family(
            "lb_datapath_bytes_total",
            "counter",
            "lb_ingress bytes (as received) by outcome.",
        );
        for (o, cnt) in Outcome::ALL.iter().zip(&outcomes) {
            out.sample(
                "lb_datapath_bytes_total",
                &[("outcome", o.name())],
                cnt.bytes,
            );
        }
        out.family(
            "lb_connection_table_flows",
            "gauge",
            "Entries in the connection table at the last collection.",
        );
        out.sample("lb_connection_table_flows", &[], c.flows_in_table);
        let (sent, dropped) = dp.event_stats()?;
        out.family(
            "lb_flow_events_total",
            "counter",
            "Flow events sent by the datapath, dropped (ring buffer full), received by the agent.",
        );
        for (result, v) in [
            ("sent", sent),
            ("dropped", dropped),
            ("received", c.events_received),
        ] {
            out.sample("lb_flow_events_total", &[("result", result)], v);
        }
    }
    if let Some(d) = &st.decap {
        let outcomes = d.outcomes()?;
        out.family(
            "lb_decap_packets_total",
            "counter",
            "lb_decap packets by outcome.",
        );
        for (o, cnt) in DecapOutcome::ALL.iter().zip(&outcomes) {
            out.sample(
                "lb_decap_packets_total",
                &[("outcome", o.name())],
                cnt.packets,
            );
        }
        out.family(
            "lb_decap_bytes_total",
            "counter",
            "lb_decap bytes (as received, outer header included) by outcome.",
        );
        for (o, cnt) in DecapOutcome::ALL.iter().zip(&outcomes) {
            out.sample("lb_decap_bytes_total", &[("outcome", o.name())], cnt.bytes);
        }
    }
    Ok(out.text)
}

/// Backend states, loads and drain progress, and each VIP's rollout, from the
/// lifecycle (the same figures `lbctl maintenance status` shows).
fn lifecycle_series(out: &mut Exposition, st: &crate::agent::State) {
    use crate::lifecycle::{Phase, Record, VipLife};
    let vips: Vec<&VipLife> = st.lifecycle.vips().map(|(l, _)| l).collect();
    out.family(
        "lb_backend_state",
        "gauge",
        "1 for the backend's lifecycle state in the VIP, 0 for the others.",
    );
    for l in &vips {
        for (a, r) in &l.backends {
            let a = a.to_string();
            for p in Phase::ALL {
                out.sample(
                    "lb_backend_state",
                    &[("vip", &l.name), ("backend", &a), ("state", p.name())],
                    u64::from(r.phase == p),
                );
            }
        }
    }
    // One sample per (VIP, backend); `None` leaves the sample out.
    type Value = fn(&VipLife, &Record) -> Option<f64>;
    let per_backend: [(&str, &str, &str, Value); 6] = [
        (
            "lb_backend_up_to_date",
            "gauge",
            "1 when the backend has had the VIP's latest maintenance generation.",
            |l, r| Some(f64::from(u8::from(l.up_to_date(r)))),
        ),
        (
            "lb_backend_load_ratio",
            "gauge",
            "Load level of the backend (0 idle, 1 at its capacity) from its load reports and active flows; absent when unknown.",
            |_, r| r.load,
        ),
        (
            "lb_backend_vip_flows",
            "gauge",
            "Flows (open or closing) of the VIP on the backend, as the lifecycle last saw them.",
            |_, r| Some(r.flows as f64),
        ),
        (
            "lb_backend_drain_progress_ratio",
            "gauge",
            "While draining: the share of the backend's flows at the start of the drain that are gone.",
            |_, r| r.drain_progress(),
        ),
        (
            "lb_backend_drain_flows_cut_total",
            "counter",
            "Flows cut because a drain timed out.",
            |_, r| Some(r.flows_cut as f64),
        ),
        (
            "lb_backend_maintenance_hook_runs_total",
            "counter",
            "Maintenance hook runs started for the backend.",
            |_, r| Some(f64::from(r.hook_runs)),
        ),
    ];
    for (name, kind, help, value) in per_backend {
        out.family(name, kind, help);
        for l in &vips {
            for (a, r) in &l.backends {
                if let Some(v) = value(l, r) {
                    out.sample_f(name, &[("vip", &l.name), ("backend", &a.to_string())], v);
                }
            }
        }
    }
    type VipValue = fn(&VipLife) -> Option<f64>;
    let per_vip: [(&str, &str, VipValue); 3] = [
        (
            "lb_vip_spare_capacity_ratio",
            "Spare capacity of the backends taking new flows (1 - demand / capacity at the load limit); absent when none does.",
            |l| l.spare,
        ),
        (
            "lb_vip_maintenance_generation",
            "The VIP's maintenance generation (raised by each rollout).",
            |l| Some(l.generation as f64),
        ),
        (
            "lb_vip_rollout_running",
            "1 while a rollout of the VIP runs.",
            |l| Some(f64::from(u8::from(l.rollout.as_ref().is_some_and(|r| r.running())))),
        ),
    ];
    for (name, help, value) in per_vip {
        out.family(name, "gauge", help);
        for l in &vips {
            if let Some(v) = value(l) {
                out.sample_f(name, &[("vip", &l.name)], v);
            }
        }
    }
}
