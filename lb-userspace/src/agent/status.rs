//! `lbctl status`: the balancer's VIPs and backends with their lifecycle and
//! flows, the datapath's outcome counters, the decapsulator's, and the
//! drivers' XDP error counters. The metrics render the same rows.

use lb_common::{DecapOutcome, Outcome, PacketCounter};

use super::state::State;
use crate::{
    api::{
        BackendStatus, DecapStatus, NextHopStatus, OutcomeStatus, Status, VipBackendStatus,
        VipStatus, XdpErrors,
    },
    balancer::Balancer,
    collector::Collector,
    config::VipConfig,
    datapath::{Datapath, DecapMaps, KernelDatapath},
    ethtool,
    lifecycle::Lifecycle,
};

/// The whole status, read under the state lock.
pub(crate) fn status(st: &State) -> anyhow::Result<Status> {
    let mut status = Status {
        interfaces: st.interfaces.clone(),
        ..Status::default()
    };
    if let (Some(bal), Some(cfg)) = (&st.balancer, &st.config.balancer) {
        status.maglev_table_size = cfg.datapath.maglev_table_size;
        status.vips = vips(bal, &st.lifecycle, &st.collector)?;
        status.backends = backends(bal, &st.collector)?;
        status.outcomes = ingress_outcomes(bal)?;
        status.mss_clamped = bal.datapath().mss_clamped()?;
        status.flows_unrecorded = bal.datapath().flows_unrecorded()?;
        status.flow_timeout_divisor = st.collector.timeouts.map_or(1, |t| t.divisor);
    }
    if let Some(d) = &st.decap {
        status.decap = Some(decap(d)?);
    }
    status.xdp_errors = xdp_errors(st);
    status.bypass = super::bypass::status(st)?;
    Ok(status)
}

/// The drivers' XDP error counters of every interface the datapath sends
/// through: those it is attached to, then those next hops leave by.
pub(crate) fn xdp_errors(st: &State) -> Vec<XdpErrors> {
    let mut names: Vec<String> = st.interfaces.iter().map(|i| i.name.clone()).collect();
    if let Some(bal) = &st.balancer {
        for nh in bal.backends().filter_map(|(_, _, nh)| nh) {
            if let Some(name) = ethtool::interface_name(nh.ifindex) {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
    }
    names
        .into_iter()
        .map(|interface| match ethtool::xdp_errors(&interface) {
            Ok(counters) => XdpErrors {
                interface,
                counters: counters.into_iter().collect(),
                error: None,
            },
            Err(e) => XdpErrors {
                interface,
                error: Some(format!("{e:#}")),
                ..XdpErrors::default()
            },
        })
        .collect()
}

/// `lb_ingress` packets and bytes by outcome.
pub(crate) fn ingress_outcomes(
    bal: &Balancer<KernelDatapath>,
) -> anyhow::Result<Vec<OutcomeStatus>> {
    Ok(outcome_list(
        Outcome::ALL.iter().map(|o| o.name()),
        &bal.datapath().outcomes()?,
    ))
}

/// The decapsulator's addresses and outcome counters.
pub(crate) fn decap(d: &DecapMaps) -> anyhow::Result<DecapStatus> {
    Ok(DecapStatus {
        addresses: d.addresses()?,
        outcomes: outcome_list(DecapOutcome::ALL.iter().map(|o| o.name()), &d.outcomes()?),
    })
}

/// Every VIP with its counters and, per backend, its standing, weights,
/// lifecycle state and flows.
pub(crate) fn vips(
    bal: &Balancer<KernelDatapath>,
    lifecycle: &Lifecycle,
    collector: &Collector,
) -> anyhow::Result<Vec<VipStatus>> {
    let ids: std::collections::BTreeMap<_, _> = bal
        .backends()
        .map(|(address, id, _)| (address, id))
        .collect();
    bal.vips()
        .into_iter()
        .map(|(vip_id, v)| {
            let backends = v
                .backends
                .iter()
                .map(|b| {
                    let id = ids.get(&b.address).copied().unwrap_or(u32::MAX);
                    let flows = collector
                        .pair_presence
                        .get(&(vip_id, id))
                        .map_or(0, |p| p.active + p.closing);
                    pair(bal, lifecycle, v, b, flows)
                })
                .collect();
            Ok(VipStatus {
                name: v.name.clone(),
                address: v.address,
                port: v.port,
                protocol: v.protocol,
                vip_id,
                counters: bal.datapath().vip_counters(vip_id)?.into(),
                table_digest: format!("{:016x}", bal.table_digest((v.address, v.port, v.protocol))),
                backends,
            })
        })
        .collect()
}

/// A backend as one VIP uses it.
fn pair(
    bal: &Balancer<KernelDatapath>,
    lifecycle: &Lifecycle,
    v: &VipConfig,
    b: &crate::config::BackendConfig,
    active_flows: u64,
) -> VipBackendStatus {
    let ident = (v.address, v.port, v.protocol);
    let life = lifecycle.vip(ident);
    let record = life.and_then(|l| l.backends.get(&b.address));
    let disabled = record.is_some_and(|r| r.disabled);
    VipBackendStatus {
        address: b.address,
        weight: b.weight,
        maglev_slots: bal.slots(ident, b.address),
        health: if disabled {
            "disabled"
        } else {
            bal.standing(v, b.address)
        }
        .into(),
        effective_weight: bal.effective_weight(v, b),
        load_factor: Some(bal.load_factor(ident, b.address)).filter(|f| *f < 1.0),
        state: record.map_or_else(String::new, |r| r.phase.name().into()),
        up_to_date: match (life, record) {
            (Some(l), Some(r)) => l.up_to_date(r),
            _ => true,
        },
        load: record.and_then(|r| r.load),
        active_flows,
        drain_progress: record.and_then(|r| r.drain_progress()),
    }
}

/// Every backend host with its counters over all VIPs and its open flows.
pub(crate) fn backends(
    bal: &Balancer<KernelDatapath>,
    collector: &Collector,
) -> anyhow::Result<Vec<BackendStatus>> {
    bal.backends()
        .map(|(address, id, next_hop)| {
            Ok(BackendStatus {
                address,
                backend_id: id,
                next_hop: next_hop.map(|nh| NextHopStatus {
                    ifindex: nh.ifindex,
                    mac: mac_text(nh.dst_mac),
                    mtu: nh.mtu,
                }),
                counters: bal.datapath().backend_counters(id)?.into(),
                active_flows: collector.backend_presence.get(&id).map_or(0, |p| p.active),
            })
        })
        .collect()
}

fn outcome_list(
    names: impl Iterator<Item = &'static str>,
    counters: &[PacketCounter],
) -> Vec<OutcomeStatus> {
    names
        .zip(counters)
        .map(|(name, c)| OutcomeStatus {
            outcome: name.to_string(),
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect()
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
