//! `lb_ingress`: parse, find the VIP and the backend, encapsulate, send.
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    FlowKey, Outcome, VipInfo, FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

use crate::{
    balance::{choose_backend, is_vip_address, lookup_vip},
    counters,
    encap::{encapsulate, send},
    headers::{
        len_from, ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, Ports, ETH_LEN, ETH_P_IPV4, ETH_P_IPV6,
        IPV4_LEN, IPV6_LEN,
    },
    icmp,
    maps::SETTINGS,
    trace,
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

#[xdp]
pub fn lb_ingress(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (action, outcome) = match ctx_ethertype(&ctx) {
        Some(ETH_P_IPV4) => ipv4(&ctx),
        Some(ETH_P_IPV6) => ipv6(&ctx),
        Some(_) => pass(Outcome::PassNotIp),
        None => pass(Outcome::PassMalformed),
    };
    counters::outcome(outcome, bytes);
    action
}

#[inline(always)]
fn ctx_ethertype(ctx: &XdpContext) -> Option<u16> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked bounds.
    Some(u16::from_be(unsafe { (*eth).ether_type }))
}

/// Minimum transport header length for the protocols a VIP carries.
#[inline(always)]
fn l4_min_len(proto: u8) -> usize {
    if proto == PROTO_TCP {
        20
    } else {
        8
    }
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
    let key = FlowKey::v4(ip.src, ip.dst, 0, 0, ip.proto);

    if ip.proto == PROTO_ICMP {
        return icmp::icmp4(ctx, ihl, tot_len);
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        return pass(Outcome::PassNotVip);
    }
    // Fragments carry no ports (or only some of the datagram), so they cannot
    // be balanced consistently; VIP fragments are dropped and counted.
    if u16::from_be(ip.frag_off) & 0x3fff != 0 {
        if is_vip_address(&key.dst, FAMILY_V4) {
            return drop(Outcome::DropFragment);
        }
        return pass(Outcome::PassNotVip);
    }
    let l4 = ETH_LEN + ihl;
    let truncated = len_from(ctx, ETH_LEN) < tot_len as usize
        || (tot_len as usize) < ihl + l4_min_len(ip.proto);
    forward_l4(ctx, key, l4, tot_len, truncated)
}

fn ipv6(ctx: &XdpContext) -> Verdict {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) else {
        return pass(Outcome::PassMalformed);
    };
    // SAFETY: ptr_at checked bounds.
    let ip = unsafe { *ip };
    if ip.vtc_flow[0] >> 4 != 6 {
        return pass(Outcome::PassMalformed);
    }
    let payload_len = u16::from_be(ip.payload_len);
    let key = FlowKey {
        src: ip.src,
        dst: ip.dst,
        sport: 0,
        dport: 0,
        proto: ip.next_hdr,
        family: FAMILY_V6,
        _pad: [0; 2],
    };
    if ip.next_hdr == PROTO_ICMPV6 {
        return icmp::icmp6(ctx, payload_len);
    }
    // Extension headers are not walked: such packets are not balanced.
    if ip.next_hdr != PROTO_TCP && ip.next_hdr != PROTO_UDP {
        return pass(Outcome::PassNotVip);
    }
    let tot_len = payload_len.wrapping_add(IPV6_LEN as u16);
    let truncated = len_from(ctx, ETH_LEN) < tot_len as usize
        || (payload_len as usize) < l4_min_len(ip.next_hdr);
    forward_l4(ctx, key, ETH_LEN + IPV6_LEN, tot_len, truncated)
}

/// TCP or UDP: read the ports, then balance if the flow is for a VIP.
#[inline(always)]
fn forward_l4(
    ctx: &XdpContext,
    mut key: FlowKey,
    l4: usize,
    ip_len: u16,
    truncated: bool,
) -> Verdict {
    let Some(ports) = ptr_at::<Ports>(ctx, l4) else {
        if is_vip_address(&key.dst, key.family) {
            return drop(Outcome::DropMalformed);
        }
        return pass(Outcome::PassNotVip);
    };
    // SAFETY: ptr_at checked bounds.
    let ports = unsafe { *ports };
    key.sport = ports.src;
    key.dport = ports.dst;
    let Some(vip) = lookup_vip(&key) else {
        return pass(Outcome::PassNotVip);
    };
    if truncated {
        return drop(Outcome::DropMalformed);
    }
    let mut tcp_flags = 0;
    if key.proto == PROTO_TCP {
        let Some(flags) = ptr_at::<u8>(ctx, l4 + TCP_FLAGS_OFFSET) else {
            return drop(Outcome::DropMalformed);
        };
        // SAFETY: ptr_at checked bounds.
        tcp_flags = unsafe { *flags };
    }
    forward(ctx, &key, &vip, ip_len, tcp_flags, false)
}

/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;

/// Sends the IP packet after the Ethernet header to the backend of the flow
/// `key` of `vip`. `icmp` marks an ICMP error about the flow: it follows the
/// flow but is neither recorded nor traced as part of it.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    key: &FlowKey,
    vip: &VipInfo,
    ip_len: u16,
    tcp_flags: u8,
    icmp: bool,
) -> Verdict {
    let Some(settings) = SETTINGS.get(0) else {
        return drop(Outcome::DropNoBackend);
    };
    let Some(choice) = choose_backend(key, vip, settings.maglev_size) else {
        return drop(Outcome::DropNoBackend);
    };
    if choice.backend.ifindex == 0 {
        return drop(Outcome::DropNoNextHop);
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
        &choice.backend,
        settings,
        choice.hash,
        key.family == FAMILY_V4,
        ip_len,
    )
    .is_err()
    {
        return drop(Outcome::DropEncapFailed);
    }
    let Some((action, redirected)) = send(ctx, &choice.backend) else {
        return drop(Outcome::DropRedirectFailed);
    };
    let new_flow = choice.flow.is_none() && !icmp;
    counters::forwarded(
        vip.vip_id,
        choice.backend_id,
        bytes_in,
        bytes_in + outer,
        new_flow,
    );
    if !icmp {
        let packet = trace::Packet {
            key,
            vip_id: vip.vip_id,
            backend_id: choice.backend_id,
            hash: choice.hash,
            tcp_flags,
            bytes_in,
            bytes_out: bytes_in + outer,
        };
        match choice.flow {
            Some(state) => trace::known_flow(&packet, settings, state),
            None => trace::new_flow(&packet, settings),
        }
    }
    let outcome = if icmp {
        Outcome::IcmpForwarded
    } else if redirected {
        Outcome::Redirected
    } else {
        Outcome::Forwarded
    };
    (action, outcome)
}
