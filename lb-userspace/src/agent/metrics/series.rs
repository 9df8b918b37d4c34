//! The series of a scrape: the datapath counters, the collector's
//! aggregates and the lifecycle's figures, from the same rows as
//! `lbctl status`.

use anyhow::Result;

use super::exposition::Exposition;
use crate::agent::{
    announce,
    state::{Shared, State},
    status,
};
use crate::{
    api::{BackendStatus, Counters, OutcomeStatus, VipBackendStatus},
    collector::{Collector, Expired, Presence},
    datapath::Datapath as _,
    health,
    lifecycle::{Phase, Record, VipLife},
};

/// One metric family over rows of `R`: `parts` gives (value of the `extra`
/// label, sample value) pairs for a row.
struct Family<R> {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    extra: Option<&'static str>,
    parts: fn(&R) -> Vec<(&str, u64)>,
}

/// A row of a family: its labels and what its samples are read from.
struct Row<'a, R> {
    labels: Vec<(&'static str, String)>,
    data: &'a R,
}

/// Every family of `families` over every row.
fn table<R>(out: &mut Exposition, families: &[Family<R>], rows: &[Row<'_, R>]) {
    for f in families {
        out.family(f.name, f.kind, f.help);
        for r in rows {
            for (label, value) in (f.parts)(r.data) {
                let mut l: Vec<(&str, &str)> =
                    r.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                if let Some(key) = f.extra {
                    l.push((key, label));
                }
                out.sample(f.name, &l, value);
            }
        }
    }
}

/// A program's packets and bytes by outcome, as two counter families;
/// `bytes_as` says how its bytes are counted.
fn outcomes(
    out: &mut Exposition,
    prefix: &str,
    program: &str,
    bytes_as: &str,
    list: &[OutcomeStatus],
) {
    let packets = format!("{prefix}_packets_total");
    out.family(
        &packets,
        "counter",
        &format!("{program} packets by outcome."),
    );
    for o in list {
        out.sample(&packets, &[("outcome", &o.outcome)], o.packets);
    }
    let bytes = format!("{prefix}_bytes_total");
    let help = format!("{program} bytes ({bytes_as}) by outcome.");
    out.family(&bytes, "counter", &help);
    for o in list {
        out.sample(&bytes, &[("outcome", &o.outcome)], o.bytes);
    }
}

/// What a VIP's series are read from.
struct VipData {
    t: Counters,
    e: Expired,
    p: Presence,
}

const VIP_FAMILIES: [Family<VipData>; 7] = [
    Family {
        name: "lb_vip_packets_total",
        kind: "counter",
        help: "Packets from clients to the VIP (each sent on to a backend).",
        extra: None,
        parts: |r| vec![("", r.t.packets)],
    },
    Family {
        name: "lb_vip_bytes_total",
        kind: "counter",
        help: "Bytes per leg: client_to_lb as received, lb_to_backend as sent (encapsulation included).",
        extra: Some("leg"),
        parts: |r| vec![("client_to_lb", r.t.bytes), ("lb_to_backend", r.t.bytes_out)],
    },
    Family {
        name: "lb_vip_flows_opened_total",
        kind: "counter",
        help: "Flows the VIP's Maglev table placed.",
        extra: None,
        parts: |r| vec![("", r.t.new_flows)],
    },
    Family {
        name: "lb_vip_flows_closed_total",
        kind: "counter",
        help: "Flows closed by the client (fin, rst) or expired by the agent.",
        extra: Some("reason"),
        parts: |r| {
            vec![
                ("fin", r.t.closed_fin),
                ("rst", r.t.closed_rst),
                ("expired", r.e.flows),
            ]
        },
    },
    Family {
        name: "lb_vip_flows_half_open_expired_total",
        kind: "counter",
        help: "Half-open flows (a SYN and nothing after it) that expired.",
        extra: None,
        parts: |r| vec![("", r.e.half_open)],
    },
    Family {
        name: "lb_vip_flows_active",
        kind: "gauge",
        help: "Open flows in the connection table at the last collection.",
        extra: None,
        parts: |r| vec![("", r.p.active)],
    },
    Family {
        name: "lb_vip_flows_half_open",
        kind: "gauge",
        help: "Half-open flows in the connection table at the last collection.",
        extra: None,
        parts: |r| vec![("", r.p.half_open)],
    },
];

/// What a backend's series are read from: its status, as `lbctl` shows it,
/// and what the collector expired.
struct BackendData {
    status: BackendStatus,
    expired: Expired,
}

const BACKEND_FAMILIES: [Family<BackendData>; 7] = [
    Family {
        name: "lb_backend_packets_total",
        kind: "counter",
        help: "Packets sent to the backend, over all its VIPs.",
        extra: None,
        parts: |b| vec![("", b.status.counters.packets)],
    },
    Family {
        name: "lb_backend_bytes_total",
        kind: "counter",
        help: "Bytes per leg for the backend's flows, over all its VIPs.",
        extra: Some("leg"),
        parts: |b| {
            vec![
                ("client_to_lb", b.status.counters.bytes),
                ("lb_to_backend", b.status.counters.bytes_out),
            ]
        },
    },
    Family {
        name: "lb_backend_flows_opened_total",
        kind: "counter",
        help: "Flows placed on the backend.",
        extra: None,
        parts: |b| vec![("", b.status.counters.new_flows)],
    },
    Family {
        name: "lb_backend_flows_closed_total",
        kind: "counter",
        help: "Backend flows closed by the client (fin, rst) or expired.",
        extra: Some("reason"),
        parts: |b| {
            vec![
                ("fin", b.status.counters.closed_fin),
                ("rst", b.status.counters.closed_rst),
                ("expired", b.expired.flows),
            ]
        },
    },
    Family {
        name: "lb_backend_flows_active",
        kind: "gauge",
        help: "Open flows on the backend at the last collection.",
        extra: None,
        parts: |b| vec![("", b.status.active_flows)],
    },
    Family {
        name: "lb_backend_next_hop_resolved",
        kind: "gauge",
        help: "1 when the backend's next-hop MAC is known.",
        extra: None,
        parts: |b| vec![("", u64::from(b.status.next_hop.is_some()))],
    },
    Family {
        name: "lb_backend_next_hop_mtu",
        kind: "gauge",
        help: "MTU of the link toward the backend; absent while its next hop is unresolved.",
        extra: None,
        parts: |b| {
            let mtu = b.status.next_hop.as_ref().map(|n| u64::from(n.mtu));
            mtu.map(|m| ("", m)).into_iter().collect()
        },
    },
];

/// Per (VIP, backend) series, from the VIPs' status rows. `lb_backend_up`
/// carries the backend's standing (up, down, disabled, unchecked) as its
/// `health` label.
const PAIR_FAMILIES: [Family<VipBackendStatus>; 4] = [
    Family {
        name: "lb_backend_weight",
        kind: "gauge",
        help: "Configured weight of the backend in the VIP.",
        extra: None,
        parts: |b| vec![("", u64::from(b.weight))],
    },
    Family {
        name: "lb_backend_effective_weight",
        kind: "gauge",
        help: "Weight of the backend in the VIP's table now: 0 while out, scaled by its load.",
        extra: None,
        parts: |b| vec![("", u64::from(b.effective_weight))],
    },
    Family {
        name: "lb_backend_up",
        kind: "gauge",
        help: "1 when the backend is in service in the VIP: neither down by its health check nor disabled.",
        extra: Some("health"),
        parts: |b| {
            let up = b.health != "down" && b.health != "disabled";
            vec![(b.health.as_str(), u64::from(up))]
        },
    },
    Family {
        name: "lb_backend_maglev_slots",
        kind: "gauge",
        help: "Slots the backend holds in the VIP's Maglev table.",
        extra: None,
        parts: |b| vec![("", u64::from(b.maglev_slots))],
    },
];

/// The exposition text for the agent's current state.
pub(super) async fn render(state: &Shared) -> Result<Exposition> {
    let st = state.lock().await;
    let mut out = Exposition::default();
    if st.balancer.is_some() {
        balancer_series(&mut out, &st)?;
        lifecycle_series(&mut out, &st);
        datapath_series(&mut out, &st)?;
        out.family(
            "lb_health_check_local_errors_total",
            "counter",
            "Health checks that failed for want of the agent's own resources (descriptors, buffers, memory, local ports); no verdict is taken from them.",
        );
        out.sample(
            "lb_health_check_local_errors_total",
            &[],
            health::local_errors(),
        );
    }
    if st.announce.is_some() {
        announce_series(&mut out, &st);
    }
    if let Some(d) = &st.decap {
        let decap = status::decap(d)?;
        outcomes(
            &mut out,
            "lb_decap",
            "lb_decap",
            "as received, outer header included",
            &decap.outcomes,
        );
    }
    if let Some(b) = crate::agent::bypass::status(&st)? {
        bypass_series(&mut out, &b);
    }
    out.family(
        "lb_interface_xdp_errors_total",
        "counter",
        "Drivers' counters of XDP frames lost after the program's verdict (ethtool -S): frames counted as sent that never left.",
    );
    for e in status::xdp_errors(&st) {
        for (counter, v) in &e.counters {
            let labels = [("interface", e.interface.as_str()), ("counter", counter)];
            out.sample("lb_interface_xdp_errors_total", &labels, *v);
        }
    }
    Ok(out)
}

/// The node's BGP announcement, as `lbctl node status` shows it.
fn announce_series(out: &mut Exposition, st: &State) {
    let node = announce::node_status(st);
    out.family(
        "lb_node_drained",
        "gauge",
        "1 while the node is drained (lbctl node drain).",
    );
    out.sample("lb_node_drained", &[], u64::from(node.drained));
    out.family(
        "lb_vip_announced",
        "gauge",
        "1 for a VIP address whose route BIRD announces, 0 for one withheld (reason label).",
    );
    for a in &node.announced {
        out.sample(
            "lb_vip_announced",
            &[("address", &a.to_string()), ("reason", "")],
            1,
        );
    }
    for w in &node.withheld {
        let labels = [
            ("address", w.address.to_string()),
            ("reason", w.reason.clone()),
        ];
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        out.sample("lb_vip_announced", &labels, 0);
    }
}

/// Per-VIP, per-backend and per-pair series, from the same rows as
/// `lbctl status`.
fn balancer_series(out: &mut Exposition, st: &State) -> Result<()> {
    let bal = st.balancer()?;
    let c: &Collector = &st.collector;
    let vips = status::vips(bal, &st.lifecycle, c)?;
    let vip_data: Vec<VipData> = vips
        .iter()
        .map(|v| VipData {
            t: v.counters,
            e: c.vip_expired(v.vip_id),
            p: c.vip_presence.get(&v.vip_id).copied().unwrap_or_default(),
        })
        .collect();
    let rows: Vec<Row<'_, VipData>> = vips
        .iter()
        .zip(&vip_data)
        .map(|(v, data)| Row {
            labels: vec![
                ("vip", v.name.clone()),
                ("address", v.address.to_string()),
                ("port", v.port.to_string()),
                ("protocol", v.protocol.to_string()),
            ],
            data,
        })
        .collect();
    table(out, &VIP_FAMILIES, &rows);
    out.family(
        "lb_vip_table_info",
        "gauge",
        "1, labelled with the digest of the VIP's Maglev table: equal on LB nodes with the same backends and weights.",
    );
    for v in &vips {
        let labels = [
            ("vip", v.name.as_str()),
            ("digest", v.table_digest.as_str()),
        ];
        out.sample("lb_vip_table_info", &labels, 1);
    }
    let backend_data: Vec<BackendData> = status::backends(bal, c)?
        .into_iter()
        .map(|status| BackendData {
            expired: c.backend_expired(status.backend_id),
            status,
        })
        .collect();
    let rows: Vec<Row<'_, BackendData>> = backend_data
        .iter()
        .map(|data| Row {
            labels: vec![("backend", data.status.address.to_string())],
            data,
        })
        .collect();
    table(out, &BACKEND_FAMILIES, &rows);
    let rows: Vec<Row<'_, VipBackendStatus>> = vips
        .iter()
        .flat_map(|v| {
            v.backends.iter().map(|data| Row {
                labels: vec![
                    ("vip", v.name.clone()),
                    ("backend", data.address.to_string()),
                ],
                data,
            })
        })
        .collect();
    table(out, &PAIR_FAMILIES, &rows);
    Ok(())
}

/// Outcome counters, the connection table's size and the flow events.
fn datapath_series(out: &mut Exposition, st: &State) -> Result<()> {
    let bal = st.balancer()?;
    let dp = bal.datapath();
    let c = &st.collector;
    outcomes(
        out,
        "lb_datapath",
        "lb_ingress",
        "as received",
        &status::ingress_outcomes(bal)?,
    );
    out.family(
        "lb_connection_table_flows",
        "gauge",
        "Entries in the connection table at the last collection.",
    );
    out.sample("lb_connection_table_flows", &[], c.flows_in_table);
    out.family(
        "lb_datapath_mss_clamped_total",
        "counter",
        "TCP SYNs whose MSS option was lowered to fit the backend's link (also counted under their outcome).",
    );
    out.sample("lb_datapath_mss_clamped_total", &[], dp.mss_clamped()?);
    out.family(
        "lb_datapath_flows_unrecorded_total",
        "counter",
        "Packets of flows the full connection table had no room for, forwarded by Maglev alone (also counted under their outcome).",
    );
    out.sample(
        "lb_datapath_flows_unrecorded_total",
        &[],
        dp.flows_unrecorded()?,
    );
    out.family(
        "lb_connection_table_timeout_divisor",
        "gauge",
        "What the idle timeouts are divided by while the connection table is nearly full (1: as configured).",
    );
    out.sample(
        "lb_connection_table_timeout_divisor",
        &[],
        c.timeouts.map_or(1, |t| t.divisor),
    );
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
    Ok(())
}

// One sample per (VIP, backend); `None` leaves the sample out.
type PairValue = fn(&VipLife, &Record) -> Option<f64>;
const LIFECYCLE_PAIR_SERIES: [(&str, &str, &str, PairValue); 6] = [
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

/// One sample per VIP; `None` leaves the sample out.
type VipValue = fn(&VipLife) -> Option<f64>;
const LIFECYCLE_VIP_SERIES: [(&str, &str, VipValue); 3] = [
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

/// Backend states, loads and drain progress, and each VIP's rollout, from the
/// lifecycle (the same figures `lbctl maintenance status` shows).
fn lifecycle_series(out: &mut Exposition, st: &State) {
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
    for (name, kind, help, value) in LIFECYCLE_PAIR_SERIES {
        out.family(name, kind, help);
        for l in &vips {
            for (a, r) in &l.backends {
                if let Some(v) = value(l, r) {
                    out.sample_f(name, &[("vip", &l.name), ("backend", &a.to_string())], v);
                }
            }
        }
    }
    for (name, help, value) in LIFECYCLE_VIP_SERIES {
        out.family(name, "gauge", help);
        for l in &vips {
            if let Some(v) = value(l) {
                out.sample_f(name, &[("vip", &l.name)], v);
            }
        }
    }
}

/// The bypass intermediary's and sender's counters.
fn bypass_series(out: &mut Exposition, b: &crate::api::BypassStatus) {
    out.family(
        "lb_bypass_instructions_refused_total",
        "counter",
        "Bypass instructions the intermediary refused, by reason; a refused instruction changes nothing.",
    );
    for (reason, n) in &b.refused {
        out.sample(
            "lb_bypass_instructions_refused_total",
            &[("reason", reason)],
            *n,
        );
    }
    for (name, help, v) in [
        ("lb_bypass_instructions_accepted_total", "Bypass instructions applied.", b.accepted),
        ("lb_bypass_instructions_revoked_total", "Revoke instructions applied.", b.revoked),
        ("lb_bypass_entries", "Flows sent straight to their backend now.", b.entries),
        ("lb_bypass_packets_direct_total", "Packets the intermediary sent straight to a backend.", b.packets_direct),
        ("lb_bypass_packets_to_lb_total", "Packets of bypass VIPs the intermediary passed toward the LB.", b.packets_to_lb),
        ("lb_bypass_packets_refreshed_total", "Packets of bypassed flows sent toward the LB so that its connection table keeps them.", b.packets_refreshed),
        ("lb_bypass_entries_ended_total", "Entries ended by the datapath (FIN/RST, unusable backend) and by the agent (backend left the VIP, idle).", b.ended_by_datapath + b.ended_by_agent),
        ("lb_bypass_instructions_sent_total", "Bypass instructions this backend host sent.", b.sent),
        ("lb_bypass_send_errors_total", "Bypass instructions this backend host could not send.", b.send_errors),
    ] {
        let kind = if name == "lb_bypass_entries" { "gauge" } else { "counter" };
        out.family(name, kind, help);
        out.sample(name, &[], v);
    }
}
