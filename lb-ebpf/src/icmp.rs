//! ICMP "fragmentation needed" and ICMPv6 "packet too big" about VIP flows.
//!
//! A router on the way back to the client reports an oversize reply that a
//! backend sent from the VIP. The embedded header is that reply (VIP to client),
//! so the flow key is the embedded 5-tuple reversed; the error then follows the
//! flow to its backend so the backend's path MTU is updated. Only errors sent
//! to a VIP address are such reports; the others are not the balancer's.
//!
//! Every length an error carries is checked before it is forwarded: the outer
//! packet lies within the frame, and the quoted header and the start of its
//! transport header lie within the outer packet. An error to a VIP address
//! that fails a check is dropped as malformed.
use lb_common::{FlowKey, Outcome, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

use crate::{
    balance::{is_vip_address, known_flow, lookup_vip},
    forward::{drop, forward, pass, Verdict},
    headers::{
        ip_len_in_frame, l4_min_len, ptr_at, Ipv4Hdr, Ipv6Hdr, Ports, ETH_LEN, IPV4_LEN, IPV6_LEN,
    },
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMP_HDR_LEN: usize = 8;
/// Bytes of the reported packet's transport header an error quotes at least
/// (RFC 792, RFC 4443); the ports are in them.
const QUOTED_L4_LEN: usize = 8;

#[inline(always)]
fn is_balanced(proto: u8) -> bool {
    proto == PROTO_TCP || proto == PROTO_UDP
}

/// Compares two addresses word by word (a byte-array comparison would be a
/// `memcmp` call, which BPF does not have).
#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 16 {
        let wa = u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        let wb = u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if wa != wb {
            return false;
        }
        i += 4;
    }
    true
}

/// An ICMP message in an IPv4 packet whose flow key (addresses only) is
/// `outer`, with a header of `ihl` bytes and a total length of `tot_len`.
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
        return drop(Outcome::DropMalformed);
    };
    // SAFETY: ptr_at checked bounds.
    let [ty, code] = unsafe { *icmp };
    if ty != ICMP_DEST_UNREACH || code != ICMP_FRAG_NEEDED {
        return pass(Outcome::PassNotVip);
    }
    let Some(ip_len) = ip_len_in_frame(ctx, tot_len as usize) else {
        return drop(Outcome::DropMalformed);
    };
    let inner_off = icmp_off + ICMP_HDR_LEN;
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, inner_off) else {
        return drop(Outcome::DropMalformed);
    };
    // SAFETY: ptr_at checked bounds.
    let inner = unsafe { *inner };
    let inner_ihl = ((inner.version_ihl & 0x0f) as usize) * 4;
    if inner.version_ihl >> 4 != 4
        || inner_ihl < IPV4_LEN
        || ihl + ICMP_HDR_LEN + inner_ihl + QUOTED_L4_LEN > ip_len as usize
    {
        return drop(Outcome::DropMalformed);
    }
    // A later fragment quotes no ports: it cannot be told which flow it is.
    if !is_balanced(inner.proto) || u16::from_be(inner.frag_off) & 0x1fff != 0 {
        return pass(Outcome::PassNotVip);
    }
    // The quoted total length is the reported packet's, so it may exceed the
    // quote, but it must hold that packet's own headers.
    if (u16::from_be(inner.tot_len) as usize) < inner_ihl + l4_min_len(inner.proto) {
        return drop(Outcome::DropMalformed);
    }
    let Some(ports) = ptr_at::<Ports>(ctx, inner_off + inner_ihl) else {
        return drop(Outcome::DropMalformed);
    };
    // SAFETY: ptr_at checked bounds.
    let ports = unsafe { *ports };
    let key = FlowKey::v4(inner.dst, inner.src, ports.dst, ports.src, inner.proto);
    forward_icmp(ctx, outer, &key, ip_len)
}

/// An ICMPv6 message in an IPv6 packet whose flow key (addresses only) is
/// `outer`, with a payload length of `payload_len`.
pub fn icmp6(ctx: &aya_ebpf::programs::XdpContext, outer: &FlowKey, payload_len: u16) -> Verdict {
    if !is_vip_address(&outer.dst, FAMILY_V6) {
        return pass(Outcome::PassNotVip);
    }
    let icmp_off = ETH_LEN + IPV6_LEN;
    let Some(icmp) = ptr_at::<[u8; 2]>(ctx, icmp_off) else {
        return drop(Outcome::DropMalformed);
    };
    // SAFETY: ptr_at checked bounds.
    let [ty, _code] = unsafe { *icmp };
    if ty != ICMPV6_PKT_TOOBIG {
        return pass(Outcome::PassNotVip);
    }
    // Summed in usize: a payload length near 65,535 must not wrap.
    let Some(ip_len) = ip_len_in_frame(ctx, payload_len as usize + IPV6_LEN) else {
        return drop(Outcome::DropMalformed);
    };
    let inner_off = icmp_off + ICMP_HDR_LEN;
    let Some(inner) = ptr_at::<Ipv6Hdr>(ctx, inner_off) else {
        return drop(Outcome::DropMalformed);
    };
    // SAFETY: ptr_at checked bounds.
    let inner = unsafe { *inner };
    if inner.vtc_flow[0] >> 4 != 6 || ICMP_HDR_LEN + IPV6_LEN + QUOTED_L4_LEN > payload_len as usize
    {
        return drop(Outcome::DropMalformed);
    }
    // Extension headers in the quote are not walked, as in traffic.
    if !is_balanced(inner.next_hdr) {
        return pass(Outcome::PassNotVip);
    }
    if (u16::from_be(inner.payload_len) as usize) < l4_min_len(inner.next_hdr) {
        return drop(Outcome::DropMalformed);
    }
    let Some(ports) = ptr_at::<Ports>(ctx, inner_off + IPV6_LEN) else {
        return drop(Outcome::DropMalformed);
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
    forward_icmp(ctx, outer, &key, ip_len)
}

/// The error goes where the flow it quotes goes, if that flow is a VIP's and
/// the reported packet came from the address the error is sent to.
#[inline(always)]
fn forward_icmp(
    ctx: &aya_ebpf::programs::XdpContext,
    outer: &FlowKey,
    key: &FlowKey,
    ip_len: u16,
) -> Verdict {
    if !same_addr(&key.dst, &outer.dst) {
        return drop(Outcome::DropMalformed);
    }
    match lookup_vip(key) {
        Some(vip) => forward(ctx, key, &vip, known_flow(key, 0).0, None, ip_len, 0, true),
        None => pass(Outcome::PassNotVip),
    }
}
