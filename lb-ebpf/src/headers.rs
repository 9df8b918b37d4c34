//! Wire header layouts and bounds-checked access to packet bytes.
use aya_ebpf::programs::XdpContext;
use lb_common::PROTO_TCP;

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network byte order.
    pub ether_type: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub vtc_flow: [u8; 4],
    pub payload_len: u16,
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// An IPv6 address as the packet holds it (at a 2-aligned offset; read and
/// written as words by `addr6_words` and `write_addr6`).
pub type Addr6 = [u16; 8];

/// Offsets of the source and destination addresses in the IPv6 header.
pub const IPV6_SRC: usize = 8;
pub const IPV6_DST: usize = 24;

/// An IPv6 address in the packet as four native-endian words, each holding
/// four address bytes in memory order (as `FlowKey` stores them): four word
/// loads (`load32`). A byte-wise copy into the key would cost 32 loads and
/// stores, and the key's word reads (the VIP filter, the table's hash) would
/// then wait on the byte stores; 16-bit loads joined in registers cost the
/// IPv6 path about 3% of its time in `lb-bench` against these.
///
/// # Safety
/// `addr` must come from `ptr_at` for this frame at an even offset.
#[inline(always)]
pub unsafe fn addr6_words(addr: *const Addr6) -> [u32; 4] {
    let p = addr.cast::<u8>();
    // SAFETY: in bounds (ptr_at), as the caller promises.
    unsafe {
        [
            load32(p),
            load32(p.add(4)),
            load32(p.add(8)),
            load32(p.add(12)),
        ]
    }
}

/// A 32-bit load from a packet address that may be only 2-aligned, as one
/// BPF word load: Rust's unaligned read is byte loads in BPF, and an aligned
/// read would claim an alignment the packet does not have. The kernels of
/// the architectures with efficient unaligned access (x86-64, arm64) let
/// programs make such loads from packets; the bytes are read in memory order.
///
/// # Safety
/// `p..p + 4` must be in the packet (checked by `ptr_at`).
#[inline(always)]
unsafe fn load32(p: *const u8) -> u32 {
    let v: u64;
    // SAFETY: a load from a bounds-checked packet address.
    unsafe {
        core::arch::asm!(
            "{v} = *(u32 *)({p} + 0)",
            v = lateout(reg) v,
            p = in(reg) p,
            options(readonly, nostack, preserves_flags)
        );
    }
    v as u32
}

/// The store `load32` reads back.
///
/// # Safety
/// `p..p + 4` must be in the packet (checked by `ptr_at`).
#[inline(always)]
unsafe fn store32(p: *mut u8, v: u32) {
    // SAFETY: a store to a bounds-checked packet address.
    unsafe {
        core::arch::asm!(
            "*(u32 *)({p} + 0) = {v}",
            p = in(reg) p,
            v = in(reg) u64::from(v),
            options(nostack, preserves_flags)
        );
    }
}

/// Writes an IPv6 address given as four words (as `addr6_words` reads
/// them) into the packet in four word stores (`store32`).
///
/// # Safety
/// `dst` must come from `ptr_at` for this frame (bounds checked) at an even
/// offset, or point into such a header.
#[inline(always)]
pub unsafe fn write_addr6(dst: *mut Addr6, words: [u32; 4]) {
    let d = dst.cast::<u8>();
    // SAFETY: in bounds (ptr_at), as the caller promises.
    unsafe {
        store32(d, words[0]);
        store32(d.add(4), words[1]);
        store32(d.add(8), words[2]);
        store32(d.add(12), words[3]);
    }
}

/// The first eight bytes of an IPv6 header (version, class, flow label,
/// payload length, next header, hop limit), written before the addresses.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Fixed {
    pub vtc_flow: [u8; 4],
    pub payload_len: u16,
    pub next_hdr: u8,
    pub hop_limit: u8,
}

/// The first four bytes of TCP and UDP headers.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

/// A pointer to a `T` at `off` bytes into the packet, if the packet holds it.
/// Call it again after `bpf_xdp_adjust_head`: old pointers are invalid.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Writes a header into the packet with the header's own (16-bit)
/// alignment: `write_unaligned` stores byte by byte in BPF, twice the
/// instructions. Headers here are written at even offsets of a frame that
/// starts at an even address (XDP headroom), so the stores are aligned.
///
/// # Safety
/// `dst` must come from `ptr_at` for this frame (bounds checked) at an even offset.
#[inline(always)]
pub unsafe fn write_header<T: Copy>(dst: *mut T, value: T) {
    const { assert!(core::mem::align_of::<T>() == 2) };
    // SAFETY: in bounds (ptr_at) and 2-aligned, as the caller promises.
    unsafe { dst.write(value) }
}

/// Bytes from `off` to the end of the packet.
#[inline(always)]
pub fn len_from(ctx: &XdpContext, off: usize) -> usize {
    (ctx.data_end() - ctx.data()).saturating_sub(off)
}

/// The length of the IP packet after the Ethernet header, given as the sum its
/// header implies (computed by the caller in `usize`, so that it cannot wrap),
/// if the frame holds that many bytes.
#[inline(always)]
pub fn ip_len_in_frame(ctx: &XdpContext, ip_len: usize) -> Option<u16> {
    if ip_len > len_from(ctx, ETH_LEN) {
        return None;
    }
    u16::try_from(ip_len).ok()
}

/// Minimum transport header length for the protocols a VIP carries.
#[inline(always)]
pub fn l4_min_len(proto: u8) -> usize {
    if proto == PROTO_TCP {
        20
    } else {
        8
    }
}
