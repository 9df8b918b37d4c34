//! `lb_ingress`: parse, find the VIP and the backend, encapsulate, send.
use aya_ebpf::{macros::xdp, programs::XdpContext};
use lb_common::{
    FlowKey, Outcome, VipInfo, FAMILY_V4, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

use crate::{
    balance::{is_vip_address, known_flow, lookup_vip, may_be_vip, vip_is_live},
    counters, datapath_log,
    forward::{drop, forward, pass, Verdict},
    headers::{
        addr6_words, ip_len_in_frame, l4_min_len, ptr_at, Addr6, EthHdr, Ipv4Hdr, Ipv6Hdr, Ports,
        ETH_LEN, ETH_P_IPV4, ETH_P_IPV6, IPV6_DST, IPV6_LEN, IPV6_SRC,
    },
    icmp,
};

#[xdp]
pub fn lb_ingress(ctx: XdpContext) -> u32 {
    let verdict = ingress(&ctx);
    datapath_log::exit(&ctx, datapath_log::PROGRAM_INGRESS, verdict)
}

/// The pipeline, as a call of its own (see `datapath_log::exit`); returns
/// the `pack`ed verdict.
#[inline(never)]
fn ingress(ctx: &XdpContext) -> u32 {
    // Opaque to LLVM, which would otherwise pass `data` and `data_end` as
    // 32-bit arguments instead of the context, and the verifier refuses
    // the zero extension of `data_end` that the callee then does.
    let ctx = core::hint::black_box(ctx);
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (action, outcome) = match ctx_ethertype(ctx) {
        Some(ETH_P_IPV4) => ipv4(ctx),
        Some(ETH_P_IPV6) => ipv6(ctx),
        Some(_) => pass(Outcome::PassNotIp),
        None => pass(Outcome::PassMalformed),
    };
    counters::outcome(outcome, bytes);
    datapath_log::pack(action, outcome as u32)
}

#[inline(always)]
fn ctx_ethertype(ctx: &XdpContext) -> Option<u16> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked bounds.
    Some(u16::from_be(unsafe { (*eth).ether_type }))
}

fn ipv4(ctx: &XdpContext) -> Verdict {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return pass(Outcome::PassMalformed);
    };
    // SAFETY: ptr_at checked bounds.
    let ip = unsafe { *ip };
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be(ip.tot_len);
    if ip.version_ihl >> 4 != 4 || ihl < 20 || (tot_len as usize) < ihl {
        return pass(Outcome::PassMalformed);
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP && ip.proto != PROTO_ICMP {
        return pass(Outcome::PassNotVip);
    }
    // Fragments carry no ports (or only some of the datagram; for ICMP errors,
    // of the quoted header), so they cannot be balanced consistently; VIP
    // fragments are dropped and counted.
    if u16::from_be(ip.frag_off) & 0x3fff != 0 {
        let key = FlowKey::v4(ip.src, ip.dst, 0, 0, ip.proto);
        if is_vip_address(&key.dst, FAMILY_V4) {
            return drop(Outcome::DropFragment);
        }
        return pass(Outcome::PassNotVip);
    }
    if ip.proto == PROTO_ICMP {
        let key = FlowKey::v4(ip.src, ip.dst, 0, 0, ip.proto);
        return icmp::icmp4(ctx, &key, ihl, tot_len);
    }
    let ip_len = ip_len_in_frame(ctx, tot_len as usize)
        .filter(|&len| len as usize >= ihl + l4_min_len(ip.proto));
    // The key is built with its ports, in words: with them left zero, LLVM
    // merges the key's zero words into a `memset`, which BPF calls as a byte
    // loop; written in afterwards, the key's word reads wait on them.
    let l4 = ETH_LEN + ihl;
    let ports = ports_at(ctx, l4);
    let (sport, dport) = ports.unwrap_or((0, 0));
    forward_l4(
        ctx,
        FlowKey::v4(ip.src, ip.dst, sport, dport, ip.proto),
        ports.is_some(),
        l4,
        ip_len,
    )
}

/// The source and destination ports at `l4`, if the packet holds them.
#[inline(always)]
fn ports_at(ctx: &XdpContext, l4: usize) -> Option<(u16, u16)> {
    let p = ptr_at::<Ports>(ctx, l4)?;
    // SAFETY: ptr_at checked bounds.
    Some(unsafe { ((*p).src, (*p).dst) })
}

fn ipv6(ctx: &XdpContext) -> Verdict {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) else {
        return pass(Outcome::PassMalformed);
    };
    // SAFETY: ptr_at checked bounds; only the fields used are read.
    let (version, payload_len, next_hdr) = unsafe {
        (
            (*ip).vtc_flow[0] >> 4,
            u16::from_be((*ip).payload_len),
            (*ip).next_hdr,
        )
    };
    if version != 6 {
        return pass(Outcome::PassMalformed);
    }
    let (Some(src), Some(dst)) = (
        ptr_at::<Addr6>(ctx, ETH_LEN + IPV6_SRC),
        ptr_at::<Addr6>(ctx, ETH_LEN + IPV6_DST),
    ) else {
        return pass(Outcome::PassMalformed);
    };
    // SAFETY: ptr_at checked bounds, at even offsets.
    let (src, dst) = unsafe { (addr6_words(src), addr6_words(dst)) };
    if next_hdr == PROTO_ICMPV6 {
        return icmp::icmp6(ctx, &FlowKey::v6(src, dst, 0, 0, next_hdr), payload_len);
    }
    // Extension headers are not walked: such packets are not balanced.
    if next_hdr != PROTO_TCP && next_hdr != PROTO_UDP {
        return pass(Outcome::PassNotVip);
    }
    // Summed in usize: a payload length near 65,535 must not wrap to a short packet.
    let ip_len = ip_len_in_frame(ctx, payload_len as usize + IPV6_LEN)
        .filter(|_| payload_len as usize >= l4_min_len(next_hdr));
    let l4 = ETH_LEN + IPV6_LEN;
    let ports = ports_at(ctx, l4);
    let (sport, dport) = ports.unwrap_or((0, 0));
    forward_l4(
        ctx,
        FlowKey::v6(src, dst, sport, dport, next_hdr),
        ports.is_some(),
        l4,
        ip_len,
    )
}

/// TCP or UDP: balance if the flow is for a VIP. `key` holds the ports,
/// if the packet has them (`has_ports`). `ip_len` is the IP packet's
/// length, `None` if the frame does not hold it or it cannot hold the
/// transport header.
#[inline(always)]
fn forward_l4(
    ctx: &XdpContext,
    key: FlowKey,
    has_ports: bool,
    l4: usize,
    ip_len: Option<u16>,
) -> Verdict {
    if !has_ports {
        if is_vip_address(&key.dst, key.family) {
            return drop(Outcome::DropMalformed);
        }
        return pass(Outcome::PassNotVip);
    }
    // Most traffic that is not a VIP's stops here, before any hashing.
    if !may_be_vip(&key) {
        return pass(Outcome::PassNotVip);
    }
    let tcp_flags = if key.proto == PROTO_TCP {
        // SAFETY: ptr_at checked bounds.
        ptr_at::<u8>(ctx, l4 + TCP_FLAGS_OFFSET).map(|f| unsafe { *f })
    } else {
        Some(0)
    };
    // A flow the connection table knows, whose VIP is still the one it was
    // recorded for, needs no VIP lookup: one table lookup per packet.
    let (known, has_entry) = match (ip_len, tcp_flags) {
        (Some(_), Some(flags)) => known_flow(&key, flags),
        _ => (None, None),
    };
    let vip = match &known {
        Some(choice) if vip_is_live(&key, choice.vip_id) => VipInfo {
            vip_id: choice.vip_id,
            ..VipInfo::default()
        },
        _ => match lookup_vip(&key) {
            Some(vip) => vip,
            None => return pass(Outcome::PassNotVip),
        },
    };
    // (`known` is only set when both are.)
    let (Some(ip_len), Some(tcp_flags)) = (ip_len, tcp_flags) else {
        return drop(Outcome::DropMalformed);
    };
    // One call site: the pipeline is inlined once.
    forward(ctx, &key, &vip, known, has_entry, ip_len, tcp_flags, false)
}

/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;
