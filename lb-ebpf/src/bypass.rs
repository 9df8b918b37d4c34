//! `lb_source`: the source intermediary on a client host. For a VIP marked
//! `VIP_BYPASS_SOURCE`, a flow with an entry in `BYPASS` is encapsulated
//! straight to the entry's backend; any other packet is recorded in
//! `BYPASS_SENT` (so the agent accepts instructions only for flows this host
//! sent) and passed to the stack, which routes it to the LB as before.
//! A bypassed flow still sends a packet toward the LB every
//! `BYPASS_REFRESH_NS`, and its closing FIN or RST, so the LB's connection
//! table keeps it and sees it end (drains wait for it).
use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, macros::xdp, programs::XdpContext,
};
use lb_common::{
    flow_hash, FlowKey, Outcome, BACKEND_USABLE, BYPASS_ENDED, BYPASS_PASSED, BYPASS_REFRESHED,
    BYPASS_REFRESH_NS, BYPASS_SENT_DIRECT, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, TCP_FIN,
    TCP_RST, VIP_BYPASS_SOURCE,
};

use crate::{
    balance::lookup_vip,
    counters, datapath_log,
    encap::{encapsulate, send},
    forward::{drop, pass, Verdict},
    headers::{ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, Ports, ETH_LEN, ETH_P_IPV4, IPV4_LEN, IPV6_LEN},
    maps::{BACKENDS, BYPASS, BYPASS_NEXT, BYPASS_SENT, BYPASS_STATS, SETTINGS},
};

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = BYPASS_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
}

/// Toward the LB: the stack routes the packet to the VIP as before.
#[inline(always)]
fn to_lb(key: &FlowKey, now: u64) -> Verdict {
    // A full LRU forgets the oldest flow: an instruction for it is then
    // refused as an unknown flow, and the flow stays on the LB path.
    let _ = BYPASS_SENT.insert(key, now, 0);
    count(BYPASS_PASSED);
    pass(Outcome::PassNotVip)
}

/// A TCP or UDP packet's flow, IP length and TCP flags; `None` for anything
/// else, fragments and packets whose headers do not fit the frame (which
/// `lb_ingress` then judges as usual).
#[inline(always)]
fn reparse(ctx: &XdpContext) -> Option<(FlowKey, u16, u8)> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked bounds.
    let (key, l4, ip_len) = if u16::from_be(unsafe { (*eth).ether_type }) == ETH_P_IPV4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: ptr_at checked bounds.
        let ip = unsafe { *ip };
        let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
        if ip.version_ihl >> 4 != 4 || ihl < IPV4_LEN || u16::from_be(ip.frag_off) & 0x3fff != 0 {
            return None;
        }
        let l4 = ETH_LEN + ihl;
        let key = FlowKey::v4(ip.src, ip.dst, 0, 0, ip.proto);
        (key, l4, u16::from_be(ip.tot_len))
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: ptr_at checked bounds.
        let ip = unsafe { *ip };
        if ip.vtc_flow[0] >> 4 != 6 {
            return None;
        }
        let key = FlowKey {
            src: ip.src,
            dst: ip.dst,
            sport: 0,
            dport: 0,
            proto: ip.next_hdr,
            family: FAMILY_V6,
            _pad: [0; 2],
        };
        let len = u16::from_be(ip.payload_len).saturating_add(IPV6_LEN as u16);
        (key, ETH_LEN + IPV6_LEN, len)
    };
    if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        return None;
    }
    let l4 = l4 & 0x7f;
    // The whole IP packet is in the frame, its transport header too.
    if (ip_len as usize) + ETH_LEN > (ctx.data_end() - ctx.data())
        || (ip_len as usize) + ETH_LEN < l4 + 8
    {
        return None;
    }
    let ports: *const Ports = ptr_at(ctx, l4)?;
    // SAFETY: ptr_at checked bounds.
    let ports = unsafe { *ports };
    let mut key = key;
    key.sport = ports.src;
    key.dport = ports.dst;
    let mut tcp_flags = 0;
    if key.proto == PROTO_TCP {
        let flags: *const u8 = ptr_at(ctx, l4 + 13)?;
        if (ip_len as usize) + ETH_LEN < l4 + 20 {
            return None;
        }
        // SAFETY: ptr_at checked bounds.
        tcp_flags = unsafe { *flags };
    }
    Some((key, ip_len, tcp_flags))
}

/// The source intermediary's program, on a client host's guest interfaces:
/// packets of bypass VIPs are handled here; every other frame goes on to
/// the program in `BYPASS_NEXT` (`lb_ingress`, the source-side balancer)
/// through a tail call, so the balancer's own path is unchanged.
#[xdp]
pub fn lb_source(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    if let Some((key, ip_len, tcp_flags)) = reparse(&ctx) {
        if lookup_vip(&key).is_some_and(|v| v.flags & VIP_BYPASS_SOURCE != 0) {
            let (action, outcome) = direct(&ctx, &key, ip_len, tcp_flags);
            counters::outcome(outcome, bytes);
            return datapath_log::ingress(&ctx, datapath_log::PROGRAM_SOURCE, action, outcome);
        }
    }
    // SAFETY: the helper either does not return (the next program runs) or
    // returns an error (no program in the slot).
    unsafe { BYPASS_NEXT.tail_call(&ctx, 0) };
    xdp_action::XDP_PASS
}

/// A packet of a flow to a bypass VIP, as it leaves a guest.
#[inline(always)]
fn direct(ctx: &XdpContext, key: &FlowKey, ip_len: u16, tcp_flags: u8) -> Verdict {
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let Some(entry) = BYPASS.get_ptr_mut(key) else {
        return to_lb(key, now);
    };
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        // The client ends the flow: this packet and what follows take the LB
        // path, whose table (kept by the refreshes) still has the flow and
        // so sees it close.
        let _ = BYPASS.remove(key);
        count(BYPASS_ENDED);
        return to_lb(key, now);
    }
    // A forgotten "sent" time (a full LRU) counts as due.
    // SAFETY: u64 values; a stale copy only moves a refresh.
    let last_to_lb = unsafe { BYPASS_SENT.get(key) }.copied().unwrap_or(0);
    if now.saturating_sub(last_to_lb) >= BYPASS_REFRESH_NS {
        // SAFETY: as below.
        unsafe { (*entry).lb_packets += 1 };
        count(BYPASS_REFRESHED);
        return to_lb(key, now);
    }
    // SAFETY: a valid entry pointer; BypassEntry is plain data.
    let backend_id = unsafe { (*entry).backend_id };
    let backend = match BACKENDS.get(backend_id) {
        Some(b) if b.flags & BACKEND_USABLE != 0 && b.ifindex != 0 => *b,
        // The backend left the VIP (down, disabled, removed) or has no next
        // hop: the entry ends here and the flow takes the LB path again.
        _ => {
            let _ = BYPASS.remove(key);
            count(BYPASS_ENDED);
            return to_lb(key, now);
        }
    };
    let Some(settings) = SETTINGS.get(0) else {
        return to_lb(key, now);
    };
    let outer = if backend.family == FAMILY_V4 {
        IPV4_LEN
    } else {
        IPV6_LEN
    };
    if backend.mtu != 0 && ip_len as usize + outer > backend.mtu as usize {
        // Too big for the direct leg: the LB path answers it (ICMP "too
        // big", MSS) as for any flow.
        return to_lb(key, now);
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let hash = flow_hash(key);
    if encapsulate(
        ctx,
        &backend,
        settings,
        hash,
        key.family == FAMILY_V4,
        ip_len,
    )
    .is_err()
    {
        return drop(Outcome::DropEncapFailed);
    }
    let Some((action, redirected)) = send(ctx, &backend) else {
        return drop(Outcome::DropRedirectFailed);
    };
    // SAFETY: as above; counters may race between CPUs, which only loses counts.
    unsafe {
        (*entry).packets += 1;
        (*entry).bytes += bytes;
        (*entry).last_ns = now;
    }
    count(BYPASS_SENT_DIRECT);
    let outcome = if redirected {
        Outcome::Redirected
    } else {
        Outcome::Forwarded
    };
    (action, outcome)
}
