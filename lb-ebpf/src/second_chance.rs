//! Second chance: a flow the connection table does not know (it moved here
//! from another LB node) after its VIP's backend set changed may belong to
//! the backend the previous table named rather than the one the live table
//! names. `lb_ingress` then sends the packet to the live table's backend
//! with the previous one's address (and the next-hop MAC toward it) in an
//! IPv4 option of the outer header; `lb_decap` on that backend keeps a
//! packet a local socket owns (or a SYN), and sends any other TCP packet on
//! to the second candidate with the option removed, so it is tried at most
//! twice. GLB Director's second chance is the model; this one carries one
//! candidate, IPv4 outer headers only.
use aya_ebpf::{
    bindings::{bpf_sock_tuple, xdp_action, BPF_F_CURRENT_NETNS},
    helpers::{bpf_sk_release, bpf_skc_lookup_tcp, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    BackendInfo, DecapOutcome, FlowKey, VipInfo, BACKEND_USABLE, FAMILY_V4, MAGLEV_LANES,
    NO_BACKEND, PROTO_TCP, SECOND_CHANCE_LEN, SECOND_CHANCE_OPTION, SETTING_SECOND_CHANCE, TCP_ACK,
    TCP_SYN,
};

use crate::{
    headers::{ptr_at, EthHdr, Ipv4Hdr, ETH_LEN, IPV4_LEN},
    maps::{BACKENDS, MAGLEV, SETTINGS},
};

/// The outer header with the option: 20 bytes of IPv4 and the option.
#[repr(C)]
#[derive(Clone, Copy)]
struct OuterWithOption {
    ip: Ipv4Hdr,
    kind: u8,
    len: u8,
    addr: [u8; 4],
    mac: [u8; 6],
}

const TCP_STATE_LISTEN: u32 = 10;

/// What `offer` did.
const NONE: u32 = 0;
const ATTACHED: u32 = 1;
const FAILED: u32 = 2;

/// After the encapsulation of a packet of a flow the connection table does
/// not know: adds the second candidate when the VIP's previous table offers
/// one. Returns the outer bytes added (0 without), `Err` when the packet
/// could not be rewritten.
#[inline(always)]
pub fn consider(
    ctx: &XdpContext,
    key: &FlowKey,
    vip: &VipInfo,
    hash: u32,
    backend_id: u32,
    ip_len: u16,
    tcp_flags: u8,
) -> Result<u64, ()> {
    if vip.previous_size == 0
        || key.proto != PROTO_TCP
        || tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    {
        return Ok(0);
    }
    // The flow's slot in the previous ring, which has a size of its own.
    let slot = vip.previous_base.wrapping_add(hash % vip.previous_size);
    match offer(ctx, slot, backend_id, ip_len) {
        NONE => Ok(0),
        ATTACHED => Ok(SECOND_CHANCE_LEN as u64),
        _ => Err(()),
    }
}

/// For a TCP packet, not a connection's first SYN, of a flow the connection
/// table did not know, encapsulated (20-byte outer IPv4 header) to
/// `backend_id`: adds the backend in the previous ring's `slot` as the
/// second candidate when it differs, is usable, takes IPv4 too, and the
/// packet still fits the link with the option. A function of its own: inlined, it would not fit
/// `lb_ingress`'s stack.
#[inline(never)]
fn offer(ctx: &XdpContext, slot: u32, backend_id: u32, ip_len: u16) -> u32 {
    let Some(settings) = SETTINGS.get(0) else {
        return NONE;
    };
    if settings.flags & SETTING_SECOND_CHANCE == 0 {
        return NONE;
    }
    let Some(backend) = BACKENDS.get(backend_id) else {
        return NONE;
    };
    let with_option = ip_len as usize + IPV4_LEN + SECOND_CHANCE_LEN;
    if backend.family != FAMILY_V4 || (backend.mtu != 0 && with_option > backend.mtu as usize) {
        return NONE;
    }
    let Some(chunk) = MAGLEV.get(slot / MAGLEV_LANES) else {
        return NONE;
    };
    let id = chunk[(slot % MAGLEV_LANES) as usize];
    if id == NO_BACKEND || id == backend_id {
        return NONE;
    }
    let Some(other) = BACKENDS.get(id) else {
        return NONE;
    };
    if other.flags & BACKEND_USABLE == 0 || other.family != FAMILY_V4 || other.ifindex == 0 {
        return NONE;
    }
    match attach(ctx, other) {
        Ok(()) => ATTACHED,
        Err(()) => FAILED,
    }
}

/// Adds the option to the 20-byte outer IPv4 header `encapsulate` wrote,
/// in place (`lb_ingress` has little stack to spare): Ethernet and the outer
/// header move 12 bytes to the front, the option goes after them.
#[inline(always)]
fn attach(ctx: &XdpContext, other: &BackendInfo) -> Result<(), ()> {
    // SAFETY: the helper only moves ctx->data; the pointer is derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(SECOND_CHANCE_LEN as i32)) } != 0 {
        return Err(());
    }
    const HEADERS: usize = ETH_LEN + IPV4_LEN;
    let p = ptr_at::<[u8; HEADERS + SECOND_CHANCE_LEN]>(ctx, 0).ok_or(())? as *mut u8;
    // SAFETY: ptr_at checked that all 46 bytes are in the packet. The regions
    // overlap; copying front to back reads every byte before it is written.
    unsafe {
        let mut i = 0;
        while i < HEADERS {
            *p.add(i) = *p.add(i + SECOND_CHANCE_LEN);
            i += 1;
        }
        let ip = p.add(ETH_LEN);
        *ip = 0x40 | ((IPV4_LEN + SECOND_CHANCE_LEN) / 4) as u8;
        let tot_len = u16::from_be_bytes([*ip.add(2), *ip.add(3)]) + SECOND_CHANCE_LEN as u16;
        *ip.add(2) = (tot_len >> 8) as u8;
        *ip.add(3) = tot_len as u8;
        *ip.add(10) = 0;
        *ip.add(11) = 0;
        let opt = ip.add(IPV4_LEN);
        *opt = SECOND_CHANCE_OPTION;
        *opt.add(1) = SECOND_CHANCE_LEN as u8;
        let mut j = 0;
        while j < 4 {
            *opt.add(2 + j) = other.addr[j];
            j += 1;
        }
        j = 0;
        while j < 6 {
            *opt.add(6 + j) = other.dst_mac[j];
            j += 1;
        }
        let mut sum: u32 = 0;
        j = 0;
        while j < IPV4_LEN + SECOND_CHANCE_LEN {
            sum += u32::from(u16::from_be_bytes([*ip.add(j), *ip.add(j + 1)]));
            j += 2;
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        let check = !(sum as u16);
        *ip.add(10) = (check >> 8) as u8;
        *ip.add(11) = check as u8;
    }
    Ok(())
}

/// On a backend: what to do with an encapsulated packet whose outer IPv4
/// header is `outer_len` bytes. `None`: decapsulate as usual (no option,
/// another option, a SYN, or a packet a local socket owns). `Some`: the
/// packet went on to the second candidate (or was dropped doing so).
#[inline(always)]
pub fn on_decap(ctx: &XdpContext, outer_len: usize, inner_v4: bool) -> Option<(u32, DecapOutcome)> {
    if outer_len != IPV4_LEN + SECOND_CHANCE_LEN || !inner_v4 {
        return None;
    }
    let outer: *const OuterWithOption = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: ptr_at checked bounds.
    let outer = unsafe { outer.read_unaligned() };
    if outer.kind != SECOND_CHANCE_OPTION || outer.len as usize != SECOND_CHANCE_LEN {
        return None;
    }
    let inner_off = ETH_LEN + IPV4_LEN + SECOND_CHANCE_LEN;
    let inner: *const Ipv4Hdr = ptr_at(ctx, inner_off)?;
    // SAFETY: ptr_at checked bounds.
    let inner = unsafe { inner.read_unaligned() };
    let ihl = ((inner.version_ihl & 0x0f) as usize) * 4;
    if inner.proto != PROTO_TCP || ihl < IPV4_LEN || u16::from_be(inner.frag_off) & 0x3fff != 0 {
        return None;
    }
    // The outer length must be the inner packet's plus the headers, so the
    // packet sent on has a consistent one.
    let outer_total = u16::from_be(outer.ip.tot_len) as usize;
    if outer_total != IPV4_LEN + SECOND_CHANCE_LEN + u16::from_be(inner.tot_len) as usize {
        return None;
    }
    // Ports (4 bytes) and the flags byte (offset 13) of the inner TCP header.
    let l4 = inner_off + (ihl & 0x3c);
    let ports: *const [u16; 2] = ptr_at(ctx, l4)?;
    let flags: *const u8 = ptr_at(ctx, l4 + 13)?;
    // SAFETY: ptr_at checked bounds.
    let (ports, flags) = unsafe { (ports.read_unaligned(), *flags) };
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN || owned_here(ctx, &inner, ports) {
        return None;
    }
    Some(send_on(ctx, &outer))
}

/// Whether a socket of this host (not a listener) owns the connection.
#[inline(always)]
fn owned_here(ctx: &XdpContext, inner: &Ipv4Hdr, ports: [u16; 2]) -> bool {
    // SAFETY: a zeroed tuple is valid plain data.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes(inner.src);
    tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(inner.dst);
    tuple.__bindgen_anon_1.ipv4.sport = ports[0];
    tuple.__bindgen_anon_1.ipv4.dport = ports[1];
    // The IPv4 member: two addresses and two ports.
    let size = 12u32;
    // SAFETY: the helper reads `size` bytes of the tuple; a non-null socket
    // must be released, which every path below does.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.ctx as *mut _,
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket the helper returned; `state` is readable on it.
    let state = unsafe { (*sk).state };
    // SAFETY: releasing the reference the lookup took.
    unsafe { bpf_sk_release(sk as *mut _) };
    state != TCP_STATE_LISTEN
}

/// Sends the packet on to the second candidate: the option goes, the outer
/// destination becomes the candidate, and the frame leaves where it came in.
#[inline(always)]
fn send_on(ctx: &XdpContext, outer: &OuterWithOption) -> (u32, DecapOutcome) {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (xdp_action::XDP_DROP, DecapOutcome::DroppedMalformed);
    };
    // SAFETY: ptr_at checked bounds.
    let eth = unsafe { eth.read_unaligned() };
    if outer.ip.ttl <= 1 {
        return (xdp_action::XDP_DROP, DecapOutcome::DroppedMalformed);
    }
    let mut ip = outer.ip;
    ip.version_ihl = 0x45;
    ip.tot_len = (u16::from_be(ip.tot_len).wrapping_sub(SECOND_CHANCE_LEN as u16)).to_be();
    ip.ttl -= 1;
    ip.dst = outer.addr;
    ip.check = 0;
    ip.check = crate::encap::ipv4_checksum(&ip);
    let out_eth = EthHdr {
        dst: outer.mac,
        src: eth.dst,
        ether_type: eth.ether_type,
    };
    // SAFETY: the helper only moves ctx->data; pointers are derived again below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, SECOND_CHANCE_LEN as i32) } != 0 {
        return (xdp_action::XDP_DROP, DecapOutcome::DroppedAdjustFailed);
    }
    let (Some(e), Some(i)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)) else {
        return (xdp_action::XDP_DROP, DecapOutcome::DroppedAdjustFailed);
    };
    // SAFETY: ptr_at checked bounds.
    unsafe {
        e.write_unaligned(out_eth);
        i.write_unaligned(ip);
    }
    (xdp_action::XDP_TX, DecapOutcome::SecondChance)
}
