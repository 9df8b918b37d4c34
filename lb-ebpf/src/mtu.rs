//! Packets that would not fit the backend's link once encapsulated.
//!
//! A TCP SYN to a VIP has its MSS option clamped to what fits (every SYN,
//! whether or not it fits itself; unless the agent switched it off). Any other packet over the limit is not sent
//! into a drop further on: an IPv4 packet with DF, or an IPv6 packet, is
//! answered with ICMP "fragmentation needed" / ICMPv6 "packet too big" built
//! here from the packet itself and sent back with `XDP_TX` (rate-limited per
//! CPU), so the client's path MTU discovery starts; an IPv4 packet without DF
//! is dropped (the balancer does not fragment, and fragments to a VIP are
//! dropped anyway).
use core::ptr::null_mut;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_TX},
    helpers::{
        bpf_csum_diff, bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
        bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    programs::XdpContext,
};
use lb_common::{
    BackendInfo, FlowKey, Outcome, Settings, FAMILY_V4, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    SETTING_CLAMP_MSS, TCP_ACK, TCP_SYN,
};

use crate::{
    encap::ipv4_checksum,
    headers::{
        ptr_at, write_header, EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_LEN, ETH_P_IPV4, ETH_P_IPV6, IPV4_LEN,
        IPV6_LEN,
    },
    maps::{ICMP_TOO_BIG_TOKENS, MSS_CLAMPED},
};

const TCP_LEN: usize = 20;
const ICMP_HDR_LEN: usize = 8;
const TCP_OPT_EOL: u8 = 0;
const TCP_OPT_NOP: u8 = 1;
const TCP_OPT_MSS: u8 = 2;
/// Option bytes a TCP header can hold (60 - 20).
const TCP_MAX_OPTIONS: usize = 40;
const IP_DF: u16 = 0x4000;

/// RFC 1812 4.3.2.3: an ICMP error quotes as much of the packet as fits in
/// 576 bytes. RFC 4443 2.4 (c): an ICMPv6 error as much as fits in 1280.
const QUOTE_V4: usize = 576 - IPV4_LEN - ICMP_HDR_LEN;
const QUOTE_V6: usize = 1280 - IPV6_LEN - ICMP_HDR_LEN;
/// RFC 792: at least the IP header (up to 60 bytes) and 8 bytes of data.
const MIN_QUOTE_V4: usize = 60 + 8;
const MIN_QUOTE_V6: usize = IPV6_LEN + 8;

/// Checks the packet after the Ethernet header (IP length `ip_len`, of flow
/// `key`) against the link toward `backend`, and clamps a SYN's MSS. `None`
/// means go on and forward; otherwise the action and outcome for a packet
/// that does not fit. `icmp` marks an ICMP error about a flow: never clamped
/// nor answered.
#[inline(always)]
pub fn fit(
    ctx: &XdpContext,
    key: &FlowKey,
    backend: &BackendInfo,
    settings: &Settings,
    ip_len: u16,
    tcp_flags: u8,
    icmp: bool,
) -> Option<(u32, Outcome)> {
    let mtu = backend.mtu as usize;
    if mtu == 0 {
        return None;
    }
    let outer = if backend.family == FAMILY_V4 {
        IPV4_LEN
    } else {
        IPV6_LEN
    };
    let inner_v4 = key.family == FAMILY_V4;
    let room = mtu.saturating_sub(outer);
    let clamp = settings.flags & SETTING_CLAMP_MSS != 0;
    if clamp && !icmp && key.proto == PROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // Never below what a sender assumes without the option (RFC 9293
        // 3.7.1, RFC 8200 8.3): a link that small gains nothing from it.
        let (inner_ip, floor) = if inner_v4 {
            (IPV4_LEN, 536)
        } else {
            (IPV6_LEN, 1220)
        };
        let mss = room.saturating_sub(inner_ip + TCP_LEN).max(floor);
        if clamp_mss(ctx, inner_v4, mss as u16) {
            if let Some(c) = MSS_CLAMPED.get_ptr_mut(0) {
                // SAFETY: per-CPU value.
                unsafe { *c += 1 };
            }
        }
    }
    if ip_len as usize <= room {
        return None;
    }
    if icmp || (inner_v4 && !dont_fragment(ctx)) {
        return Some((XDP_DROP, Outcome::DropTooBig));
    }
    match take_token(settings) {
        Token::Off => return Some((XDP_DROP, Outcome::DropTooBig)),
        Token::Empty => return Some((XDP_DROP, Outcome::IcmpRateLimited)),
        Token::Taken => {}
    }
    let answered = if inner_v4 {
        frag_needed(ctx, room as u16, ip_len as usize)
    } else {
        packet_too_big(ctx, room as u32, ip_len as usize)
    };
    Some(match answered {
        Some(()) => (XDP_TX, Outcome::IcmpTooBigSent),
        None => (XDP_DROP, Outcome::DropTooBig),
    })
}

#[inline(always)]
fn dont_fragment(ctx: &XdpContext) -> bool {
    match ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) {
        // SAFETY: ptr_at checked bounds.
        Some(ip) => u16::from_be(unsafe { (*ip).frag_off }) & IP_DF != 0,
        None => false,
    }
}

enum Token {
    Taken,
    Empty,
    Off,
}

/// Takes a token from this CPU's bucket for one ICMP answer.
#[inline(always)]
fn take_token(settings: &Settings) -> Token {
    let rate = settings.icmp_too_big_rate as u64;
    if rate == 0 {
        return Token::Off;
    }
    let Some(bucket) = ICMP_TOO_BIG_TOKENS.get_ptr_mut(0) else {
        return Token::Off;
    };
    let cost = 1_000_000_000 / rate;
    let cap = cost * settings.icmp_too_big_burst.max(1) as u64;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU value, only this CPU uses it while the program runs.
    unsafe {
        let elapsed = now.saturating_sub((*bucket).last_ns);
        let credit = (*bucket).credit_ns.saturating_add(elapsed).min(cap);
        (*bucket).last_ns = now;
        if credit < cost {
            (*bucket).credit_ns = credit;
            return Token::Empty;
        }
        (*bucket).credit_ns = credit - cost;
    }
    Token::Taken
}

/// Folds a 32-bit one's complement sum to 16 bits.
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3: the checksum after a 16-bit word changed from `old` to `new`.
#[inline(always)]
fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!check) + u64::from(!old) + u64::from(new))
}

/// `N` bytes of the packet at `off`, copied out by the kernel.
///
/// The TCP option walk reads through this helper rather than packet pointers:
/// an offset that only reaches helpers stays imprecise for the verifier, so it
/// prunes the walk's paths instead of following every combination of option
/// lengths (which costs it hundreds of thousands of instructions).
#[inline(always)]
fn load<const N: usize>(ctx: &XdpContext, off: usize) -> Option<[u8; N]> {
    let mut buf = [0u8; N];
    // SAFETY: the kernel checks the range against the packet; buf is N bytes.
    let r = unsafe { bpf_xdp_load_bytes(ctx.ctx, off as u32, buf.as_mut_ptr().cast(), N as u32) };
    (r == 0).then_some(buf)
}

/// Writes `bytes` into the packet at `off` (see `load`).
#[inline(always)]
fn store<const N: usize>(ctx: &XdpContext, off: usize, mut bytes: [u8; N]) -> Option<()> {
    // SAFETY: the kernel checks the range against the packet; bytes is N bytes.
    let r =
        unsafe { bpf_xdp_store_bytes(ctx.ctx, off as u32, bytes.as_mut_ptr().cast(), N as u32) };
    (r == 0).then_some(())
}

/// Lowers the MSS option of the TCP SYN after the IP header to `limit` if it
/// is higher, and updates the TCP checksum. Returns whether it changed it.
#[inline(never)]
fn clamp_mss(ctx: &XdpContext, inner_v4: bool, limit: u16) -> bool {
    let first = if inner_v4 {
        clamp_first_mss::<{ ETH_LEN + IPV4_LEN }>(ctx, true, limit)
    } else {
        clamp_first_mss::<{ ETH_LEN + IPV6_LEN }>(ctx, false, limit)
    };
    if let Some(changed) = first {
        return changed;
    }
    let l4 = if inner_v4 {
        let Some([version_ihl]) = load::<1>(ctx, ETH_LEN) else {
            return false;
        };
        ETH_LEN + ((version_ihl & 0x0f) as usize) * 4
    } else {
        ETH_LEN + IPV6_LEN
    };
    let Some([doff]) = load::<1>(ctx, l4 + 12) else {
        return false;
    };
    let options_end = ((doff >> 4) as usize) * 4;
    let mut off = TCP_LEN;
    // Bounded for the verifier: each step consumes at least one option byte.
    // The step is computed without a branch (a NOP is one byte, any other
    // option says its length), so the verifier follows one path per option
    // rather than two.
    for _ in 0..TCP_MAX_OPTIONS {
        if off >= options_end {
            return false;
        }
        let Some([kind, len]) = load::<2>(ctx, l4 + off) else {
            return false;
        };
        if kind == TCP_OPT_EOL {
            return false;
        }
        if kind == TCP_OPT_MSS {
            return len == 4
                && off + 4 <= options_end
                && set_mss(ctx, l4, off + 2, limit).is_some();
        }
        let nop = 0u64.wrapping_sub((u64::from(kind ^ TCP_OPT_NOP).wrapping_sub(1)) >> 63);
        let step = (u64::from(len) & !nop) | (1 & nop);
        if step < 2 && nop == 0 {
            return false;
        }
        off += step as usize;
    }
    false
}

/// `clamp_mss` for the common SYN, with packet pointers at fixed offsets
/// (no helper calls): no IPv4 options (the TCP header at `L4`), and no TCP
/// options or the MSS as the first one, where the common stacks put it.
/// `None` for any other layout, which `clamp_mss` walks.
#[inline(always)]
fn clamp_first_mss<const L4: usize>(ctx: &XdpContext, inner_v4: bool, limit: u16) -> Option<bool> {
    if inner_v4 {
        // SAFETY: ptr_at checked bounds.
        let version_ihl = unsafe { *ptr_at::<u8>(ctx, ETH_LEN)? };
        if version_ihl & 0x0f != 5 {
            return None;
        }
    }
    // SAFETY: ptr_at checked bounds.
    let doff = unsafe { *ptr_at::<u8>(ctx, L4 + 12)? } >> 4;
    if (doff as usize) * 4 <= TCP_LEN {
        return Some(false);
    }
    // The option's kind and length, then its value: two 16-bit words at an
    // even offset of the frame.
    let option = ptr_at::<[u16; 2]>(ctx, L4 + TCP_LEN)?;
    let check = ptr_at::<u16>(ctx, L4 + 16)?;
    // SAFETY: ptr_at checked bounds.
    let [kind_len, value] = unsafe { *option };
    let [kind, len] = kind_len.to_ne_bytes();
    if kind != TCP_OPT_MSS {
        return None;
    }
    let old = u16::from_be(value);
    // (doff is at least 6 here: the 4 bytes of the option are within it.)
    if len != 4 || old <= limit {
        return Some(false);
    }
    // SAFETY: ptr_at checked bounds; both are at even offsets.
    unsafe {
        (*option)[1] = limit.to_be();
        *check = csum_replace(u16::from_be(*check), old, limit).to_be();
    }
    Some(true)
}

/// Writes `limit` into the MSS value at `at` bytes into the TCP header at
/// `l4` if the value there is larger, fixing the checksum incrementally.
#[inline(always)]
fn set_mss(ctx: &XdpContext, l4: usize, at: usize, limit: u16) -> Option<()> {
    let old = u16::from_be_bytes(load::<2>(ctx, l4 + at)?);
    if old <= limit {
        return None;
    }
    let check = u16::from_be_bytes(load::<2>(ctx, l4 + 16)?);
    // A value at an odd offset straddles two checksum words: in one's
    // complement arithmetic that is the byte-swapped value.
    let (o, n) = if at.is_multiple_of(2) {
        (old, limit)
    } else {
        (old.swap_bytes(), limit.swap_bytes())
    };
    store(ctx, l4 + at, limit.to_be_bytes())?;
    store(ctx, l4 + 16, csum_replace(check, o, n).to_be_bytes())
}

/// Adds `LEN` bytes of the packet from `off` (a multiple of 4) to the
/// one's complement sum `seed`, with `bpf_csum_diff` in pieces of at most 512
/// bytes (the limit of kernels before 6.13).
#[inline(always)]
fn csum_packet<const LEN: usize>(ctx: &XdpContext, off: usize, seed: u32) -> Option<u32> {
    let start = ptr_at::<[u8; LEN]>(ctx, off)? as *mut u8;
    let mut sum = seed;
    let mut done = 0;
    while done < LEN {
        let n = if LEN - done < 512 { LEN - done } else { 512 };
        // SAFETY: ptr_at checked that all LEN bytes are in the packet.
        let r = unsafe { bpf_csum_diff(null_mut(), 0, start.add(done).cast(), n as u32, sum) };
        if r < 0 {
            return None;
        }
        sum = r as u32;
        done += n;
    }
    Some(sum)
}

/// The checksum to store (in memory order) for a one's complement sum
/// computed over memory.
#[inline(always)]
fn finish(sum: u32) -> [u8; 2] {
    (!fold(u64::from(sum))).to_ne_bytes()
}

/// Turns the frame around: `hdr` bytes of new IP and ICMP headers go in
/// front of the received IP packet, which is cut to `quote` bytes. Returns
/// the received Ethernet header.
#[inline(always)]
fn make_room(ctx: &XdpContext, hdr: usize, quote: usize) -> Option<EthHdr> {
    // SAFETY: ptr_at checked bounds.
    let eth = unsafe { *ptr_at::<EthHdr>(ctx, 0)? };
    // SAFETY: the helpers only move ctx->data / data_end; every pointer is
    // derived again afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(hdr as i32)) } != 0 {
        return None;
    }
    // Kept opaque: LLVM would otherwise fold `want - (end - start)` into
    // arithmetic on the end pointer, which the verifier refuses.
    let len = core::hint::black_box(ctx.data_end() - ctx.data()) as i32;
    let want = (ETH_LEN + hdr + quote) as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want - len) } != 0 {
        return None;
    }
    Some(eth)
}

/// The Ethernet header of an answer: back where the packet came from.
#[inline(always)]
fn turn_around(ctx: &XdpContext, received: &EthHdr, ether_type: u16) -> Option<()> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let hdr = EthHdr {
        dst: received.src,
        src: received.dst,
        ether_type: ether_type.to_be(),
    };
    // SAFETY: ptr_at checked bounds.
    unsafe { write_header(eth, hdr) };
    Some(())
}

/// Rewrites the frame into ICMP "fragmentation needed" (type 3 code 4,
/// RFC 1191) from the VIP to the client, quoting the packet.
#[inline(always)]
fn frag_needed(ctx: &XdpContext, mtu: u16, ip_len: usize) -> Option<()> {
    // Fixed lengths keep the verifier's work small: the RFC 1812 quote, or
    // RFC 792's (the longest IP header and 8 bytes) behind a tiny MTU.
    if ip_len >= QUOTE_V4 {
        frag_needed_quoting::<QUOTE_V4, { ICMP_HDR_LEN + QUOTE_V4 }>(ctx, mtu)
    } else if ip_len >= MIN_QUOTE_V4 {
        frag_needed_quoting::<MIN_QUOTE_V4, { ICMP_HDR_LEN + MIN_QUOTE_V4 }>(ctx, mtu)
    } else {
        None
    }
}

#[inline(always)]
fn frag_needed_quoting<const QUOTE: usize, const ICMP_LEN: usize>(
    ctx: &XdpContext,
    mtu: u16,
) -> Option<()> {
    let quote = QUOTE;
    // SAFETY: ptr_at checked bounds.
    let ip = unsafe { *ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)? };
    let received = make_room(ctx, IPV4_LEN + ICMP_HDR_LEN, quote)?;
    turn_around(ctx, &received, ETH_P_IPV4)?;
    let mut hdr = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: ((IPV4_LEN + ICMP_HDR_LEN + quote) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: 64,
        proto: PROTO_ICMP,
        check: 0,
        src: ip.dst,
        dst: ip.src,
    };
    hdr.check = ipv4_checksum(&hdr);
    let out_ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)?;
    // SAFETY: ptr_at checked bounds.
    unsafe { write_header(out_ip, hdr) };
    let icmp_off = ETH_LEN + IPV4_LEN;
    let icmp = ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, icmp_off)?;
    let m = mtu.to_be_bytes();
    // SAFETY: ptr_at checked bounds.
    unsafe { *icmp = [3, 4, 0, 0, 0, 0, m[0], m[1]] };
    let check = finish(csum_packet::<ICMP_LEN>(ctx, icmp_off, 0)?);
    // SAFETY: ptr_at checked bounds.
    unsafe {
        (*icmp)[2] = check[0];
        (*icmp)[3] = check[1];
    }
    Some(())
}

/// Rewrites the frame into ICMPv6 "packet too big" (RFC 4443 3.2) from the
/// VIP to the client, quoting the packet.
#[inline(always)]
fn packet_too_big(ctx: &XdpContext, mtu: u32, ip_len: usize) -> Option<()> {
    // As for IPv4: the RFC's quote, or the header and 8 bytes.
    if ip_len >= QUOTE_V6 {
        packet_too_big_quoting::<QUOTE_V6, { ICMP_HDR_LEN + QUOTE_V6 }>(ctx, mtu)
    } else if ip_len >= MIN_QUOTE_V6 {
        packet_too_big_quoting::<MIN_QUOTE_V6, { ICMP_HDR_LEN + MIN_QUOTE_V6 }>(ctx, mtu)
    } else {
        None
    }
}

#[inline(always)]
fn packet_too_big_quoting<const QUOTE: usize, const ICMP_LEN: usize>(
    ctx: &XdpContext,
    mtu: u32,
) -> Option<()> {
    let quote = QUOTE;
    // SAFETY: ptr_at checked bounds.
    let ip = unsafe { *ptr_at::<Ipv6Hdr>(ctx, ETH_LEN)? };
    let received = make_room(ctx, IPV6_LEN + ICMP_HDR_LEN, quote)?;
    turn_around(ctx, &received, ETH_P_IPV6)?;
    let icmp_len = ICMP_HDR_LEN + quote;
    let hdr = Ipv6Hdr {
        vtc_flow: 0x6000_0000u32.to_be_bytes(),
        payload_len: (icmp_len as u16).to_be(),
        next_hdr: PROTO_ICMPV6,
        hop_limit: 64,
        src: ip.dst,
        dst: ip.src,
    };
    let out_ip = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN)?;
    // SAFETY: ptr_at checked bounds.
    unsafe { write_header(out_ip, hdr) };
    let icmp_off = ETH_LEN + IPV6_LEN;
    let icmp = ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, icmp_off)?;
    let m = mtu.to_be_bytes();
    // SAFETY: ptr_at checked bounds.
    unsafe { *icmp = [2, 0, 0, 0, m[0], m[1], m[2], m[3]] };
    // The pseudo-header: the addresses (already in place), then the length
    // and the next header as 32-bit words.
    let addresses = csum_packet::<32>(ctx, ETH_LEN + 8, 0)?;
    let mut tail = [(icmp_len as u32).to_be(), u32::from(PROTO_ICMPV6).to_be()];
    // SAFETY: a stack buffer of 8 bytes.
    let pseudo = unsafe { bpf_csum_diff(null_mut(), 0, tail.as_mut_ptr(), 8, addresses) };
    if pseudo < 0 {
        return None;
    }
    let check = finish(csum_packet::<ICMP_LEN>(ctx, icmp_off, pseudo as u32)?);
    // SAFETY: ptr_at checked bounds.
    unsafe {
        (*icmp)[2] = check[0];
        (*icmp)[3] = check[1];
    }
    Some(())
}
