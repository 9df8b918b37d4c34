//! Reports, flow listings and events for `lbctl`, built from the collector's
//! aggregates and the datapath counters.

use std::net::IpAddr;

use anyhow::{bail, Context as _, Result};

use super::state::Shared;
use crate::{
    api::{BackendReport, EventStats, FlowQuery, Report, ReportQuery, Response, VipReport},
    collector::{flow_record, monotonic_ns, phase_matches, FlowPhase, Leg},
    config::VipConfig,
    datapath::{Datapath as _, FlowSource as _},
};

const STATES: [&str; 6] = [
    "open",
    "half-open",
    "closed-fin",
    "closed-rst",
    "closed",
    "all",
];

/// Backend ids and addresses, as the balancer has them.
struct BackendIds(Vec<(u32, IpAddr)>);

impl BackendIds {
    fn address(&self, id: u32) -> Option<IpAddr> {
        self.0.iter().find(|(b, _)| *b == id).map(|(_, a)| *a)
    }
}

/// The vip id and backend id that `--vip` / `--backend` name.
fn filters(
    vips: &[(u32, &VipConfig)],
    backends: &BackendIds,
    vip: Option<&str>,
    backend: Option<IpAddr>,
) -> Result<(Option<u32>, Option<u32>)> {
    let vip_id = match vip {
        Some(name) => Some(
            vips.iter()
                .find(|(_, v)| v.name == name)
                .map(|(id, _)| *id)
                .with_context(|| format!("no VIP named {name:?}; `lbctl status` lists the VIPs"))?,
        ),
        None => None,
    };
    let backend_id = match backend {
        Some(addr) => Some(
            backends
                .0
                .iter()
                .find(|(_, a)| *a == addr)
                .map(|(id, _)| *id)
                .with_context(|| {
                    format!("no backend {addr}; `lbctl status` lists every VIP's backends")
                })?,
        ),
        None => None,
    };
    Ok((vip_id, backend_id))
}

pub(crate) async fn report(state: &Shared, q: &ReportQuery) -> Result<Report> {
    let st = state.lock().await;
    let bal = st.balancer()?;
    let c = &st.collector;
    let vips = bal.vips();
    let backends = BackendIds(bal.backend_ids());
    let (vip_id, backend_id) = filters(&vips, &backends, q.vip.as_deref(), q.backend)?;
    if let Some(s) = q.since_s {
        if !(s > 0.0 && s.is_finite()) {
            bail!("--since must be a positive duration");
        }
    }
    let now = monotonic_ns();
    let mut report = Report {
        window_s: c.window_s(q.since_s),
        collected_ago_s: if c.collected_at_ns == 0 {
            0.0
        } else {
            now.saturating_sub(c.collected_at_ns) as f64 / 1e9
        },
        flows_in_table: c.flows_in_table,
        ..Report::default()
    };
    let mut vip_backends: Vec<IpAddr> = Vec::new();
    for (id, v) in &vips {
        if vip_id.is_some_and(|want| want != *id) {
            continue;
        }
        vip_backends.extend(v.backends.iter().map(|b| b.address));
        report.vips.push(VipReport {
            name: v.name.clone(),
            address: v.address,
            port: v.port,
            protocol: v.protocol,
            flows: c.vip_report(*id, q.since_s),
        });
    }
    for (id, addr) in &backends.0 {
        if backend_id.is_some_and(|want| want != *id)
            || (vip_id.is_some() && !vip_backends.contains(addr))
        {
            continue;
        }
        let total = bal.datapath().backend_counters(*id)?;
        report.backends.push(BackendReport {
            address: *addr,
            flows: c.backend_report(*id, q.since_s),
            sent_total: Leg {
                packets: total.packets,
                bytes: total.bytes_out,
            },
            delivered: None,
        });
    }
    report.top_flows = c
        .top(q.top, |_, s| {
            vip_id.is_none_or(|v| s.vip_id == v) && backend_id.is_none_or(|b| s.backend_id == b)
        })
        .iter()
        .map(|(k, s)| flow_record(k, s, backends.address(s.backend_id), now))
        .collect();
    add_bypassed(&st, &backends, now, &mut report)?;
    let (sent, dropped) = bal.datapath().event_stats()?;
    report.events = EventStats {
        sent,
        dropped,
        received: c.events_received,
    };
    report.notes.push(
        "backend-to-client traffic does not cross the load balancer (direct server return): it is not measured here".into(),
    );
    if vip_id.is_some() {
        report
            .notes
            .push("backend figures cover all VIPs a backend serves".into());
    }
    Ok(report)
}

/// A source intermediary's bypassed flows, with a note on what they count.
fn add_bypassed(
    st: &super::state::State,
    backends: &BackendIds,
    now: u64,
    report: &mut Report,
) -> Result<()> {
    report.bypassed_flows = super::bypass::bypassed_flows(st, &backends.0, now)?;
    if !report.bypassed_flows.is_empty() {
        report.notes.push(
            "bypassed flows: counted at this host's intermediary (client to backend straight, and the packets still sent toward the LB); the backend's answers go to the client directly".into(),
        );
    }
    Ok(())
}

pub(crate) async fn flows(state: &Shared, q: &FlowQuery) -> Result<Response> {
    if let Some(s) = &q.state {
        if !STATES.contains(&s.as_str()) {
            bail!("--state {s:?}: expected one of {}", STATES.join(", "));
        }
    }
    // Filters and names under the lock; the table is read without it (a
    // million flows take a good fraction of a second), as the collector does.
    let (vip_id, backend_id, backends, table) = {
        let st = state.lock().await;
        let bal = st.balancer()?;
        let vips = bal.vips();
        let backends = BackendIds(bal.backend_ids());
        let (vip_id, backend_id) = filters(&vips, &backends, q.vip.as_deref(), q.backend)?;
        let table = st
            .flows
            .clone()
            .context("the connection table is not open")?;
        (vip_id, backend_id, backends, table)
    };
    let wanted = q.state.clone();
    let mut matched = tokio::task::spawn_blocking(move || -> Result<Vec<_>> {
        let mut matched = Vec::new();
        table.scan_flows(&mut |k, s| {
            let keep = vip_id.is_none_or(|v| s.vip_id == v)
                && backend_id.is_none_or(|b| s.backend_id == b)
                && wanted
                    .as_deref()
                    .is_none_or(|f| f == "all" || phase_matches(FlowPhase::of(k, s), f));
            if keep {
                matched.push((*k, *s));
            }
        })?;
        Ok(matched)
    })
    .await
    .context("the flow listing stopped")??;
    let count = matched.len();
    matched.sort_unstable_by_key(|f| std::cmp::Reverse(f.1.bytes_in));
    matched.truncate(q.limit);
    let now = monotonic_ns();
    Ok(Response::Flows {
        flows: matched
            .iter()
            .map(|(k, s)| flow_record(k, s, backends.address(s.backend_id), now))
            .collect(),
        matched: count,
    })
}

pub(crate) async fn events(state: &Shared, limit: usize) -> Result<Response> {
    let st = state.lock().await;
    let bal = st.balancer()?;
    let backends = BackendIds(bal.backend_ids());
    let (sent, dropped) = bal.datapath().event_stats()?;
    Ok(Response::Events {
        events: st
            .collector
            .events(limit, |id| backends.address(id), monotonic_ns()),
        stats: EventStats {
            sent,
            dropped,
            received: st.collector.events_received,
        },
    })
}
