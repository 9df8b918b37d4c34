//! Encapsulation toward a backend (IPIP / 6in4 to IPv4 backends, IPv4- or
//! IPv6-in-IPv6 to IPv6 backends) and the send decision (XDP_TX or DevMap).
use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{BackendInfo, Settings, FAMILY_V4, PROTO_IPIP, PROTO_IPV6};

use crate::{
    headers::{
        ptr_at, write_addr6, write_header, Addr6, EthHdr, Ipv4Hdr, Ipv6Fixed, Ipv6Hdr, ETH_LEN,
        ETH_P_IPV4, ETH_P_IPV6, IPV4_LEN, IPV6_LEN,
    },
    maps::TX_PORTS,
};

/// TTL of the outer IPv4 header; the `upgrade-test` build differs here, so
/// the upgrade test has another program to switch to.
#[cfg(not(feature = "upgrade-test"))]
const OUTER_TTL: u8 = 64;
#[cfg(feature = "upgrade-test")]
const OUTER_TTL: u8 = 63;

pub enum EncapError {
    AdjustFailed,
}

/// Internet checksum of an IPv4 header without options.
#[inline(always)]
pub fn ipv4_checksum(h: &Ipv4Hdr) -> u16 {
    // SAFETY: Ipv4Hdr is 20 bytes of plain data, readable as ten u16 words.
    let words: &[u16; 10] = unsafe { &*(h as *const Ipv4Hdr as *const [u16; 10]) };
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 10 {
        sum += words[i] as u32;
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Prepends Ethernet and an outer IP header addressed to `backend` in front of
/// the IP packet that starts after the current Ethernet header.
/// `inner_v4` says which family the inner packet is, `inner_len` its IP length.
/// The outer source varies with `hash` inside the configured prefix.
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    backend: &BackendInfo,
    settings: &Settings,
    hash: u32,
    inner_v4: bool,
    inner_len: u16,
) -> Result<(), EncapError> {
    let inner_proto = if inner_v4 { PROTO_IPIP } else { PROTO_IPV6 };
    let outer_v4 = backend.family == FAMILY_V4;
    let outer_len = if outer_v4 { IPV4_LEN } else { IPV6_LEN };

    // SAFETY: the helper only moves ctx->data; every pointer is derived again below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return Err(EncapError::AdjustFailed);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(EncapError::AdjustFailed)?;
    let eth_hdr = EthHdr {
        dst: backend.dst_mac,
        src: backend.src_mac,
        ether_type: (if outer_v4 { ETH_P_IPV4 } else { ETH_P_IPV6 }).to_be(),
    };
    // SAFETY: ptr_at checked that the header fits in the packet.
    unsafe { write_header(eth, eth_hdr) };

    if outer_v4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_LEN).ok_or(EncapError::AdjustFailed)?;
        let src = (u32::from_be(settings.src_v4) & !u32::from_be(settings.src_v4_hostmask))
            | (hash & u32::from_be(settings.src_v4_hostmask));
        let mut hdr = Ipv4Hdr {
            version_ihl: 0x45,
            tos: 0,
            tot_len: (inner_len.wrapping_add(IPV4_LEN as u16)).to_be(),
            id: 0,
            frag_off: 0x4000u16.to_be(), // DF: the path must carry the outer MTU
            ttl: OUTER_TTL,
            proto: inner_proto,
            check: 0,
            src: src.to_be_bytes(),
            dst: [
                backend.addr[0],
                backend.addr[1],
                backend.addr[2],
                backend.addr[3],
            ],
        };
        hdr.check = ipv4_checksum(&hdr);
        // SAFETY: ptr_at checked that the header fits in the packet.
        unsafe { write_header(ip, hdr) };
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_LEN).ok_or(EncapError::AdjustFailed)?;
        // The source prefix's last word carries the hash in its host bits.
        let mut src = settings.src_v6_words();
        let mask = u32::from_be(settings.src_v6_hostmask);
        src[3] = ((u32::from_be(src[3]) & !mask) | (hash & mask)).to_be();
        // The flow label also carries the hash so that ECMP on the way spreads flows.
        let label = hash & 0x000f_ffff;
        let fixed = Ipv6Fixed {
            vtc_flow: (0x6000_0000u32 | label).to_be_bytes(),
            payload_len: inner_len.to_be(),
            next_hdr: inner_proto,
            hop_limit: 64,
        };
        // Written in place, field by field, from words: no header built on
        // the stack and copied.
        // SAFETY: ptr_at checked that the whole header fits in the packet;
        // its fields are at even offsets of it.
        unsafe {
            write_header(ip.cast::<Ipv6Fixed>(), fixed);
            write_addr6(core::ptr::addr_of_mut!((*ip).src).cast::<Addr6>(), src);
            write_addr6(
                core::ptr::addr_of_mut!((*ip).dst).cast::<Addr6>(),
                backend.addr_words(),
            );
        }
    }
    Ok(())
}

/// Sends the encapsulated frame toward the backend's next hop: `XDP_TX` when it
/// leaves through the receiving interface, a DevMap redirect otherwise.
/// Returns the action and whether it was a redirect; `None` if the redirect failed.
#[inline(always)]
pub fn send(ctx: &XdpContext, backend: &BackendInfo) -> Option<(u32, bool)> {
    if backend.ifindex == ctx.ingress_ifindex() as u32 {
        return Some((xdp_action::XDP_TX, false));
    }
    match TX_PORTS.redirect(backend.ifindex, 0) {
        Ok(action) => Some((action, true)),
        Err(_) => None,
    }
}
