//! `forward`: send a packet to the backend of its flow, and the `Verdict` type.
//!
//! Shared by `ingress` (TCP and UDP packets) and `icmp` (errors about those
//! flows), so neither imports the other for it.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{FlowKey, FlowState, Outcome, VipInfo, FAMILY_V4};

use crate::{
    balance::{maglev_choice, Choice},
    counters,
    encap::{encapsulate, send},
    headers::{IPV4_LEN, IPV6_LEN},
    maps::SETTINGS,
    mtu, second_chance, trace,
};

/// The verdict for a packet and the outcome it is counted under.
pub type Verdict = (u32, Outcome);

#[inline(always)]
pub const fn pass(o: Outcome) -> Verdict {
    (xdp_action::XDP_PASS, o)
}

#[inline(always)]
pub const fn drop(o: Outcome) -> Verdict {
    (xdp_action::XDP_DROP, o)
}

/// Sends the IP packet after the Ethernet header to the backend of the flow
/// `key` of `vip`: `known`, the connection table's choice (`known_flow`),
/// or else the VIP's Maglev ring's (`has_entry`: the table's entry for the
/// flow all the same, which that choice replaces). `icmp` marks an
/// ICMP error about the
/// flow: it follows the flow but is neither recorded nor traced as part of it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn forward(
    ctx: &XdpContext,
    key: &FlowKey,
    vip: &VipInfo,
    known: Option<Choice>,
    has_entry: Option<*mut FlowState>,
    ip_len: u16,
    tcp_flags: u8,
    icmp: bool,
) -> Verdict {
    let Some(settings) = SETTINGS.get(0) else {
        return drop(Outcome::DropNoBackend);
    };
    // A match, not `or_else`: LLVM may leave a closure out of line, and
    // its result then comes back through the stack with fields the verifier
    // sees as never written.
    let choice = match known {
        Some(choice) => Some(choice),
        None => maglev_choice(key, vip),
    };
    let Some(choice) = choice else {
        return drop(Outcome::DropNoBackend);
    };
    if choice.backend.ifindex == 0 {
        return drop(Outcome::DropNoNextHop);
    }
    if let Some(refused) = mtu::fit(ctx, key, choice.backend, settings, ip_len, tcp_flags, icmp) {
        return refused;
    }
    // Counted as received, before the outer header is added.
    let bytes_in = (ctx.data_end() - ctx.data()) as u64;
    let outer = if choice.backend.family == FAMILY_V4 {
        IPV4_LEN
    } else {
        IPV6_LEN
    } as u64;
    if encapsulate(
        ctx,
        choice.backend,
        settings,
        choice.hash,
        key.family == FAMILY_V4,
        ip_len,
    )
    .is_err()
    {
        return drop(Outcome::DropEncapFailed);
    }
    let mut new_flow = choice.flow.is_none() && !icmp;
    let mut bytes_out = bytes_in + outer;
    if new_flow {
        let (hash, id) = (choice.hash, choice.backend_id);
        let Ok(added) = second_chance::consider(ctx, key, vip, hash, id, ip_len, tcp_flags) else {
            return drop(Outcome::DropEncapFailed);
        };
        // A flow that may belong to the previous table's backend is not recorded.
        new_flow = added == 0;
        bytes_out += added;
    }
    let Some((action, redirected)) = send(ctx, choice.backend) else {
        return drop(Outcome::DropRedirectFailed);
    };
    // Flows sent with a second candidate stay out of the connection table;
    // a new flow counts once it is recorded (not each packet of a flow the
    // full table had no room for).
    let mut recorded = false;
    if !icmp && (choice.flow.is_some() || new_flow) {
        let packet = trace::Packet {
            key,
            vip_id: vip.vip_id,
            backend_id: choice.backend_id,
            hash: choice.hash,
            tcp_flags,
            bytes_in,
            bytes_out,
        };
        match choice.flow {
            Some(state) => trace::known_flow(&packet, settings, state),
            None => recorded = trace::new_flow(&packet, settings, has_entry),
        }
    }
    counters::forwarded(vip.vip_id, choice.backend_id, bytes_in, bytes_out, recorded);
    let outcome = if icmp {
        Outcome::IcmpForwarded
    } else if redirected {
        Outcome::Redirected
    } else {
        Outcome::Forwarded
    };
    (action, outcome)
}
