//! The destination intermediary in `lb_decap`: a flow of a bypass VIP from
//! a client prefix that has an intermediary is counted; when it reaches the
//! VIP's `after_packets`, an event asks the agent to send the instruction.
use aya_ebpf::{maps::lpm_trie::Key, programs::XdpContext};
use lb_common::{BypassEvent, FlowKey, VipKey, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

use crate::{
    headers::{ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, Ports, ETH_LEN, ETH_P_IPV4, IPV6_LEN},
    maps::{BYPASS_CLIENTS, BYPASS_EVENTS, BYPASS_POLICY, BYPASS_SEEN},
};

/// The inner packet (at `inner`, checked sound) of an encapsulated frame.
#[inline(never)]
pub fn notice(ctx: &XdpContext, inner: usize, inner_v4: bool) {
    let _ = try_notice(ctx, inner & 0x7f, inner_v4);
}

#[inline(always)]
fn try_notice(ctx: &XdpContext, inner: usize, inner_v4: bool) -> Option<()> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked bounds.
    let outer_v4 = u16::from_be(unsafe { (*eth).ether_type }) == ETH_P_IPV4;
    let (key, client) = inner_flow(ctx, inner, inner_v4)?;
    let policy = policy(&key)?;
    // Full length: the longest prefix that holds the client matches.
    let trie_key = Key::new(128, client);
    let intermediary = *BYPASS_CLIENTS.get(&trie_key)?;
    let count = match BYPASS_SEEN.get_ptr_mut(key) {
        // SAFETY: a valid entry pointer; a race between CPUs only loses a count.
        Some(c) => unsafe {
            *c = (*c).saturating_add(1);
            *c
        },
        None => {
            let _ = BYPASS_SEEN.insert(key, 1, 0);
            1
        }
    };
    if count != policy {
        return Some(());
    }
    let mut backend = [0u8; 16];
    let backend_family = if outer_v4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: ptr_at checked bounds.
        backend[..4].copy_from_slice(unsafe { &(*ip).dst });
        FAMILY_V4
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: ptr_at checked bounds.
        backend = unsafe { (*ip).dst };
        FAMILY_V6
    };
    let event = BypassEvent {
        key,
        backend,
        backend_family,
        _pad: [0; 3],
        intermediary,
    };
    // A full ring drops the event: the flow stays on the LB path.
    let _ = BYPASS_EVENTS.output::<BypassEvent>(&event, 0);
    Some(())
}

/// The policy's packet count for the flow's VIP (exact port, then port 0).
#[inline(always)]
fn policy(key: &FlowKey) -> Option<u32> {
    let mut vk = VipKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        family: key.family,
    };
    // SAFETY: u32 values; a stale copy is harmless.
    if let Some(n) = unsafe { BYPASS_POLICY.get(vk) } {
        return Some(*n);
    }
    vk.port = 0;
    unsafe { BYPASS_POLICY.get(vk) }.copied()
}

/// The inner flow, and the client's address as a trie key (IPv4 mapped).
#[inline(always)]
fn inner_flow(ctx: &XdpContext, inner: usize, v4: bool) -> Option<(FlowKey, [u8; 16])> {
    let (key, l4) = if v4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN + inner)?;
        // SAFETY: ptr_at checked bounds.
        let ip = unsafe { *ip };
        if u16::from_be(ip.frag_off) & 0x3fff != 0 {
            return None;
        }
        let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
        let key = FlowKey::v4(ip.src, ip.dst, 0, 0, ip.proto);
        (key, (inner + ihl) & 0xff)
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN + inner)?;
        // SAFETY: ptr_at checked bounds.
        let ip = unsafe { *ip };
        let key = FlowKey {
            src: ip.src,
            dst: ip.dst,
            sport: 0,
            dport: 0,
            proto: ip.next_hdr,
            family: FAMILY_V6,
            _pad: [0; 2],
        };
        (key, inner + IPV6_LEN)
    };
    if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        return None;
    }
    let ports: *const Ports = ptr_at(ctx, ETH_LEN + l4)?;
    // SAFETY: ptr_at checked bounds.
    let ports = unsafe { *ports };
    let mut key = key;
    key.sport = ports.src;
    key.dport = ports.dst;
    let mut client = key.src;
    if v4 {
        client = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0];
        client[12..].copy_from_slice(&key.src[..4]);
    }
    Some((key, client))
}
