//! ICMP "fragmentation needed" and ICMPv6 "packet too big" about VIP flows.
//!
//! A router on the way back to the client reports an oversize reply that a
//! backend sent from the VIP. The embedded header is that reply (VIP to client),
//! so the flow key is the embedded 5-tuple reversed; the error then follows the
//! flow to its backend so the backend's path MTU is updated. Only errors sent
//! to a VIP address are such reports; the others are not the balancer's.
use lb_common::{FlowKey, Outcome, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

use crate::{
    balance::{is_vip_address, lookup_vip},
    forward::{forward, pass, Verdict},
    headers::{ptr_at, Ipv4Hdr, Ipv6Hdr, Ports, ETH_LEN, IPV6_LEN},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMP_HDR_LEN: usize = 8;

#[inline(always)]
fn is_balanced(proto: u8) -> bool {
    proto == PROTO_TCP || proto == PROTO_UDP
}

/// An ICMP message in an IPv4 packet whose flow key (addresses only) is `outer`.
pub fn icmp4(
    ctx: &aya_ebpf::programs::XdpContext,
    outer: &FlowKey,
    ihl: usize,
    tot_len: u16,
) -> Verdict {
    if !is_vip_address(&outer.dst, FAMILY_V4) {
        return pass(Outcome::PassNotVip);
    }
    let icmp_off = ETH_LEN + ihl;
    let Some(icmp) = ptr_at::<[u8; 2]>(ctx, icmp_off) else {
        return pass(Outcome::PassNotVip);
    };
    // SAFETY: ptr_at checked bounds.
    let [ty, code] = unsafe { *icmp };
    if ty != ICMP_DEST_UNREACH || code != ICMP_FRAG_NEEDED {
        return pass(Outcome::PassNotVip);
    }
    let inner_off = icmp_off + ICMP_HDR_LEN;
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, inner_off) else {
        return pass(Outcome::PassNotVip);
    };
    // SAFETY: ptr_at checked bounds.
    let inner = unsafe { *inner };
    let inner_ihl = ((inner.version_ihl & 0x0f) as usize) * 4;
    if inner.version_ihl >> 4 != 4 || inner_ihl < 20 || !is_balanced(inner.proto) {
        return pass(Outcome::PassNotVip);
    }
    let Some(ports) = ptr_at::<Ports>(ctx, inner_off + inner_ihl) else {
        return pass(Outcome::PassNotVip);
    };
    // SAFETY: ptr_at checked bounds.
    let ports = unsafe { *ports };
    let key = FlowKey::v4(inner.dst, inner.src, ports.dst, ports.src, inner.proto);
    forward_icmp(ctx, &key, tot_len)
}

/// An ICMPv6 message in an IPv6 packet whose flow key (addresses only) is `outer`.
pub fn icmp6(ctx: &aya_ebpf::programs::XdpContext, outer: &FlowKey, payload_len: u16) -> Verdict {
    if !is_vip_address(&outer.dst, FAMILY_V6) {
        return pass(Outcome::PassNotVip);
    }
    let icmp_off = ETH_LEN + IPV6_LEN;
    let Some(icmp) = ptr_at::<[u8; 2]>(ctx, icmp_off) else {
        return pass(Outcome::PassNotVip);
    };
    // SAFETY: ptr_at checked bounds.
    let [ty, _code] = unsafe { *icmp };
    if ty != ICMPV6_PKT_TOOBIG {
        return pass(Outcome::PassNotVip);
    }
    let inner_off = icmp_off + ICMP_HDR_LEN;
    let Some(inner) = ptr_at::<Ipv6Hdr>(ctx, inner_off) else {
        return pass(Outcome::PassNotVip);
    };
    // SAFETY: ptr_at checked bounds.
    let inner = unsafe { *inner };
    if inner.vtc_flow[0] >> 4 != 6 || !is_balanced(inner.next_hdr) {
        return pass(Outcome::PassNotVip);
    }
    let Some(ports) = ptr_at::<Ports>(ctx, inner_off + IPV6_LEN) else {
        return pass(Outcome::PassNotVip);
    };
    // SAFETY: ptr_at checked bounds.
    let ports = unsafe { *ports };
    let key = FlowKey {
        src: inner.dst,
        dst: inner.src,
        sport: ports.dst,
        dport: ports.src,
        proto: inner.next_hdr,
        family: FAMILY_V6,
        _pad: [0; 2],
    };
    forward_icmp(ctx, &key, payload_len.wrapping_add(IPV6_LEN as u16))
}

/// The error goes where the flow it quotes goes, if that flow is a VIP's.
#[inline(always)]
fn forward_icmp(ctx: &aya_ebpf::programs::XdpContext, key: &FlowKey, ip_len: u16) -> Verdict {
    match lookup_vip(key) {
        Some(vip) => forward(ctx, key, &vip, ip_len, 0, true),
        None => pass(Outcome::PassNotVip),
    }
}
