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

        let backends = bal.backend_ids();
        let status = bal.backend_status()?;
        out.family(
            "lb_backend_packets_total",
            "counter",
            "Packets sent to the backend, over all its VIPs.",
        );
        for (id, a) in &backends {
            out.sample(
                "lb_backend_packets_total",
                &[("backend", &a.to_string())],
                dp.backend_counters(*id)?.packets,
            );
        }
        out.family(
            "lb_backend_bytes_total",
            "counter",
            "Bytes per leg for the backend's flows, over all its VIPs.",
        );
        for (id, a) in &backends {
            let t = dp.backend_counters(*id)?;
            for (leg, v) in [("client_to_lb", t.bytes), ("lb_to_backend", t.bytes_out)] {
                out.sample(
                    "lb_backend_bytes_total",
                    &[("backend", &a.to_string()), ("leg", leg)],
                    v,
                );
            }
        }
        out.family(
            "lb_backend_flows_opened_total",
            "counter",
            "Flows placed on the backend.",
        );
        for (id, a) in &backends {
            out.sample(
                "lb_backend_flows_opened_total",
                &[("backend", &a.to_string())],
                dp.backend_counters(*id)?.new_flows,
            );
        }
        out.family(
            "lb_backend_flows_closed_total",
            "counter",
            "Backend flows closed by the client (fin, rst) or expired.",
        );
        for (id, a) in &backends {
            let t = dp.backend_counters(*id)?;
            let e = c.backend_expired(*id);
            for (reason, v) in [
                ("fin", t.closed_fin),
                ("rst", t.closed_rst),
                ("expired", e.flows),
            ] {
                out.sample(
                    "lb_backend_flows_closed_total",
                    &[("backend", &a.to_string()), ("reason", reason)],
                    v,
                );
            }
        }
        out.family(
            "lb_backend_flows_active",
            "gauge",
            "Open flows on the backend at the last collection.",
        );
        for (id, a) in &backends {
            let p = c.backend_presence.get(id).copied().unwrap_or_default();
            out.sample(
                "lb_backend_flows_active",
                &[("backend", &a.to_string())],
                p.active,
            );
        }
        out.family(
            "lb_backend_next_hop_resolved",
            "gauge",
            "1 when the backend's next-hop MAC is known.",
        );
        for b in &status {
            out.sample(
                "lb_backend_next_hop_resolved",
                &[("backend", &b.address.to_string())],
                u64::from(b.next_hop.is_some()),
            );
        }
        out.family(
            "lb_backend_weight",
            "gauge",
            "Configured weight of the backend in the VIP.",
        );
        for (_, v) in &vips {
            for b in &v.backends {
                out.sample(
                    "lb_backend_weight",
                    &[("vip", &v.name), ("backend", &b.address.to_string())],
                    u64::from(b.weight),
                );
            }
        }
        out.family(
            "lb_backend_effective_weight",
            "gauge",
            "Weight of the backend in the VIP's table now: 0 while out, scaled by its load.",
        );
        for v in bal.vip_status()? {
            for b in &v.backends {
                out.sample(
                    "lb_backend_effective_weight",
                    &[("vip", &v.name), ("backend", &b.address.to_string())],
                    u64::from(b.effective_weight),
                );
            }
        }
        out.family(
            "lb_backend_up",
            "gauge",
            "1 when the VIP's health check has the backend up (or no check is configured).",
        );
        for v in bal.vip_status()? {
            for b in &v.backends {
                out.sample(
                    "lb_backend_up",
                    &[
                        ("vip", &v.name),
                        ("backend", &b.address.to_string()),
                        ("health", &b.health),
                    ],
                    u64::from(b.health != "down"),
                );
            }
        }
        out.family(
            "lb_backend_maglev_slots",
            "gauge",
            "Slots the backend holds in the VIP's Maglev table.",
        );
        for v in bal.vip_status()? {
            for b in &v.backends {
                out.sample(
                    "lb_backend_maglev_slots",
                    &[("vip", &v.name), ("backend", &b.address.to_string())],
                    u64::from(b.maglev_slots),
                );
            }
        }
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
