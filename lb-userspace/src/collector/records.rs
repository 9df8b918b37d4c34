//! Flows, events and flow reports as `lbctl` and the reports show them.

use std::net::{IpAddr, SocketAddr};

use lb_common::{addr_from_bytes, FlowKey, FlowState, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use serde::{Deserialize, Serialize};

use super::{FlowPhase, NS};

/// Packets and bytes on one leg of a flow's path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leg {
    pub packets: u64,
    pub bytes: u64,
}

/// What happened to flows of a VIP or a backend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowReport {
    /// New flows per second over the report's window.
    pub new_flows_per_s: f64,
    /// Flows opened, closed and expired in the window.
    pub new_flows: u64,
    pub closed_fin: u64,
    pub closed_rst: u64,
    pub expired: u64,
    /// Half-open flows (SYN and nothing after it) that expired in the window.
    pub half_open_expired: u64,
    /// In the connection table at the last collection: open (not closed),
    /// of which half-open, and closed but not yet expired.
    pub active: u64,
    pub half_open: u64,
    pub closing: u64,
    /// Client to LB, as received, in the window.
    pub client_to_lb: Leg,
    /// LB to backend, as sent (encapsulation included), in the window.
    pub lb_to_backend: Leg,
}

/// One flow of the connection table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowRecord {
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub protocol: String,
    pub backend: Option<IpAddr>,
    /// "open", "half-open", "closed-fin" or "closed-rst".
    pub state: String,
    /// TCP flags seen from the client, e.g. "SYN|ACK|FIN".
    pub tcp_flags: String,
    pub age_s: f64,
    pub idle_s: f64,
    pub client_to_lb: Leg,
    pub lb_to_backend: Leg,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRecord {
    /// "open", "close-fin" or "close-rst".
    pub kind: String,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub protocol: String,
    pub backend: Option<IpAddr>,
    /// Seconds before the report was made.
    pub ago_s: f64,
}

pub fn tcp_flags_text(flags: u8) -> String {
    let names = [
        (TCP_SYN, "SYN"),
        (TCP_ACK, "ACK"),
        (TCP_FIN, "FIN"),
        (TCP_RST, "RST"),
        (0x08, "PSH"),
        (0x20, "URG"),
    ];
    let set: Vec<&str> = names
        .iter()
        .filter(|(b, _)| flags & b != 0)
        .map(|(_, n)| *n)
        .collect();
    set.join("|")
}

pub(super) fn protocol_name(proto: u8) -> String {
    match proto {
        lb_common::PROTO_TCP => "tcp".into(),
        lb_common::PROTO_UDP => "udp".into(),
        other => other.to_string(),
    }
}

/// The client and VIP ends of a flow key.
pub fn endpoints(key: &FlowKey) -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::new(
            addr_from_bytes(key.src, key.family),
            u16::from_be(key.sport),
        ),
        SocketAddr::new(
            addr_from_bytes(key.dst, key.family),
            u16::from_be(key.dport),
        ),
    )
}

/// A flow as `lbctl flows` and reports show it.
pub fn flow_record(
    key: &FlowKey,
    state: &FlowState,
    backend: Option<IpAddr>,
    now_ns: u64,
) -> FlowRecord {
    let (client, vip) = endpoints(key);
    let secs = |ns: u64| {
        if ns == 0 {
            0.0
        } else {
            now_ns.saturating_sub(ns) as f64 / NS as f64
        }
    };
    FlowRecord {
        client,
        vip,
        protocol: protocol_name(key.proto),
        backend,
        state: FlowPhase::of(key, state).name().into(),
        tcp_flags: tcp_flags_text(state.tcp_flags),
        age_s: secs(state.first_ns),
        idle_s: secs(state.last_ns),
        client_to_lb: Leg {
            packets: state.packets_in,
            bytes: state.bytes_in,
        },
        lb_to_backend: Leg {
            packets: state.packets_in,
            bytes: state.bytes_out,
        },
    }
}
