//! `lb_decap`, for backend hosts: removes the outer header of packets the
//! balancer encapsulated to one of this host's addresses and passes the inner
//! packet to the stack, which answers the client directly. A packet that
//! carries a second candidate goes through `second_chance` first.
use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_xdp_adjust_head, macros::xdp, programs::XdpContext,
};
use lb_common::{DecapOutcome, HostAddr, FAMILY_V4, FAMILY_V6, PROTO_IPIP, PROTO_IPV6};

use crate::{
    bypass_dest, counters, datapath_log,
    headers::{
        len_from, ptr_at, write_header, EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_LEN, ETH_P_IPV4, ETH_P_IPV6,
        IPV4_LEN, IPV6_LEN,
    },
    maps::DECAP_ADDRS,
    second_chance,
};

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let verdict = decap(&ctx);
    datapath_log::exit(&ctx, datapath_log::PROGRAM_DECAP, verdict)
}

/// The pipeline, as a call of its own (see `datapath_log::exit`); returns
/// the `pack`ed verdict.
#[inline(never)]
fn decap(ctx: &XdpContext) -> u32 {
    // Opaque to LLVM: see `ingress::ingress`.
    let ctx = core::hint::black_box(ctx);
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (action, outcome) = try_decap(ctx);
    counters::decap_outcome(outcome, bytes);
    datapath_log::pack(action, outcome as u32)
}

/// Where the outer header ends and which family the inner packet is.
struct Outer {
    len: usize,
    inner_v4: bool,
}

#[inline(always)]
fn is_local(addr: [u8; 16], family: u8) -> bool {
    let key = HostAddr {
        addr,
        family,
        _pad: [0; 3],
    };
    DECAP_ADDRS.get_ptr(key).is_some()
}

#[inline(always)]
fn outer_header(ctx: &XdpContext) -> Option<Outer> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked bounds.
    match u16::from_be(unsafe { (*eth).ether_type }) {
        ETH_P_IPV4 => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
            // SAFETY: ptr_at checked bounds.
            let ip = unsafe { *ip };
            let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
            let encapsulated = ip.proto == PROTO_IPIP || ip.proto == PROTO_IPV6;
            // Fragmented outer packets are left to the stack.
            if ip.version_ihl >> 4 != 4
                || ihl < IPV4_LEN
                || !encapsulated
                || u16::from_be(ip.frag_off) & 0x3fff != 0
            {
                return None;
            }
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&ip.dst);
            if !is_local(addr, FAMILY_V4) {
                return None;
            }
            Some(Outer {
                len: ihl,
                inner_v4: ip.proto == PROTO_IPIP,
            })
        }
        ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
            // SAFETY: ptr_at checked bounds.
            let ip = unsafe { *ip };
            let encapsulated = ip.next_hdr == PROTO_IPIP || ip.next_hdr == PROTO_IPV6;
            if ip.vtc_flow[0] >> 4 != 6 || !encapsulated || !is_local(ip.dst, FAMILY_V6) {
                return None;
            }
            Some(Outer {
                len: IPV6_LEN,
                inner_v4: ip.next_hdr == PROTO_IPIP,
            })
        }
        _ => None,
    }
}

/// Checks the inner IP header against its family and the bytes present.
#[inline(always)]
fn inner_is_sound(ctx: &XdpContext, off: usize, v4: bool) -> bool {
    if v4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, off) else {
            return false;
        };
        // SAFETY: ptr_at checked bounds.
        let ip = unsafe { *ip };
        let tot_len = u16::from_be(ip.tot_len) as usize;
        ip.version_ihl >> 4 == 4
            && (ip.version_ihl & 0x0f) >= 5
            && tot_len >= IPV4_LEN
            && tot_len <= len_from(ctx, off)
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, off) else {
            return false;
        };
        // SAFETY: ptr_at checked bounds.
        let ip = unsafe { *ip };
        ip.vtc_flow[0] >> 4 == 6
            && u16::from_be(ip.payload_len) as usize + IPV6_LEN <= len_from(ctx, off)
    }
}

/// `second_chance::on_decap` as a call of its own, so that its stack and
/// `bypass_dest::notice`'s are not added up in `lb_decap`'s (512 bytes at
/// most). A subprogram returns one scalar: 0 keep going, 1 sent on, 2 and 3
/// dropped (adjust failed, malformed).
#[inline(never)]
fn second_chance_call(ctx: &XdpContext, outer_len: usize, inner_v4: bool) -> u32 {
    match second_chance::on_decap(ctx, outer_len & 0x3f, inner_v4) {
        None => 0,
        Some((_, DecapOutcome::SecondChance)) => 1,
        Some((_, DecapOutcome::DroppedAdjustFailed)) => 2,
        Some(_) => 3,
    }
}

fn try_decap(ctx: &XdpContext) -> (u32, DecapOutcome) {
    let Some(outer) = outer_header(ctx) else {
        return (xdp_action::XDP_PASS, DecapOutcome::Passed);
    };
    // Outer IPv4 options can make the length anything up to 60 bytes; bound it
    // for the verifier.
    let outer_len = outer.len & 0x3f;
    if !inner_is_sound(ctx, ETH_LEN + outer_len, outer.inner_v4) {
        return (xdp_action::XDP_DROP, DecapOutcome::DroppedMalformed);
    }
    if outer_len > IPV4_LEN {
        match second_chance_call(ctx, outer_len, outer.inner_v4) {
            0 => {}
            1 => return (xdp_action::XDP_TX, DecapOutcome::SecondChance),
            2 => return (xdp_action::XDP_DROP, DecapOutcome::DroppedAdjustFailed),
            _ => return (xdp_action::XDP_DROP, DecapOutcome::DroppedMalformed),
        }
    }
    // Only a packet this host keeps tells its flow's intermediary.
    bypass_dest::notice(ctx, outer_len, outer.inner_v4);
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (xdp_action::XDP_DROP, DecapOutcome::DroppedMalformed);
    };
    // SAFETY: ptr_at checked bounds.
    let mut eth_hdr = unsafe { *eth };
    eth_hdr.ether_type = (if outer.inner_v4 {
        ETH_P_IPV4
    } else {
        ETH_P_IPV6
    })
    .to_be();
    // SAFETY: the helper only moves ctx->data; pointers are derived again below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return (xdp_action::XDP_DROP, DecapOutcome::DroppedAdjustFailed);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (xdp_action::XDP_DROP, DecapOutcome::DroppedAdjustFailed);
    };
    // SAFETY: ptr_at checked bounds.
    unsafe { write_header(eth, eth_hdr) };
    (xdp_action::XDP_PASS, DecapOutcome::Decapsulated)
}
