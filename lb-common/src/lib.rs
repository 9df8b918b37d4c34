//! Types shared by the XDP datapath (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Everything here is part of the map ABI: `#[repr(C)]`, explicit padding, no
//! `bool` or `usize`, and sizes asserted at compile time so that the kernel and
//! user sides cannot silently disagree. Addresses are stored as 16 bytes; an
//! IPv4 address occupies the first 4 bytes and the rest is zero. Ports and
//! addresses are kept in network byte order, exactly as they appear on the wire.
#![no_std]

pub mod flow_table;

/// Address family tags used in keys.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// An address as the maps store it (16 bytes, IPv4 in the first 4), and its
/// family tag.
pub fn addr_bytes(addr: core::net::IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match addr {
        core::net::IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (out, FAMILY_V4)
        }
        core::net::IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// The inverse of `addr_bytes`.
pub fn addr_from_bytes(addr: [u8; 16], family: u8) -> core::net::IpAddr {
    if family == FAMILY_V4 {
        core::net::IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        core::net::IpAddr::from(addr)
    }
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6: u8 = 41;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Default size of a VIP's Maglev table (prime).
pub const DEFAULT_MAGLEV_SIZE: u32 = 65537;

/// Backend flag: the backend may take new flows (it is in Maglev tables).
pub const BACKEND_AVAILABLE: u32 = 1 << 0;
/// Backend flag: established flows may keep using the backend (active or draining).
/// A backend without it (down, removed) loses even its established flows, which
/// are re-balanced through Maglev.
pub const BACKEND_USABLE: u32 = 1 << 1;
/// Backend flag: the id is allocated to this backend (the datapath ignores
/// it; a restarting agent reads it to adopt the backend ids in use).
pub const BACKEND_ALLOCATED: u32 = 1 << 2;

/// Version of the map layout (key and value types, map set). Pinned maps
/// live under a directory named after it, so an agent with another layout
/// never reads them as its own. Layout 4 made the connection table a
/// preallocated hash the agent expires (it was a kernel LRU) and added
/// `FLOWS_UNRECORDED`. Layout 5 made it an array the datapath indexes
/// itself (`flow_table`); layout 6 places its flows by a keyed NH hash,
/// with the claim words' tags from bits the bucket choice does not use.
pub const LAYOUT_VERSION: u32 = 6;

/// Key of the VIP table: (address, port, protocol). Port 0 matches every port.
/// Aligned to 4 bytes so the datapath reads and writes it in words.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: [u8; 16],
    /// Network byte order; 0 means every port.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// Slots of the datapath's VIP address filter (`VIP_FILTER`, a power of two).
pub const VIP_FILTER_SLOTS: u32 = 4096;

/// The `VIP_FILTER` slot of an address, given as its four native-endian
/// words: a fold cheap enough for every packet. The agent sets the slot of
/// every VIP address; a packet whose slot is clear is not to a VIP.
#[inline(always)]
pub fn vip_filter_slot(words: [u32; 4]) -> u32 {
    let x = words[0] ^ words[1] ^ words[2] ^ words[3];
    (x ^ (x >> 12) ^ (x >> 24)) & (VIP_FILTER_SLOTS - 1)
}

/// The four native-endian words at a 4-aligned address field.
///
/// # Safety
/// `addr` must be 4-aligned (a field at a 4-aligned offset of a
/// `#[repr(C, align(4))]` key).
#[inline(always)]
unsafe fn words_at(addr: &[u8; 16]) -> [u32; 4] {
    // SAFETY: aligned, as the caller promises; 16 bytes of integers.
    unsafe { core::ptr::read(addr.as_ptr().cast::<[u32; 4]>()) }
}

impl BackendInfo {
    /// The address as four words, read with word loads.
    #[inline(always)]
    pub fn addr_words(&self) -> [u32; 4] {
        // SAFETY: `addr` is at offset 0 of this 4-aligned struct.
        unsafe { words_at(&self.addr) }
    }
}

impl Settings {
    /// The IPv6 encapsulation source prefix as four words.
    #[inline(always)]
    pub fn src_v6_words(&self) -> [u32; 4] {
        // SAFETY: `src_v6` is at offset 16 of this 4-aligned struct.
        unsafe { words_at(&self.src_v6) }
    }
}

impl VipKey {
    /// The address as four words, read with word loads.
    #[inline(always)]
    pub fn addr_words(&self) -> [u32; 4] {
        // SAFETY: `addr` is at offset 0 of this 4-aligned struct.
        unsafe { words_at(&self.addr) }
    }
}

/// Value of the VIP table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Stable index of the VIP for per-VIP counters.
    pub vip_id: u32,
    /// `VIP_*` bits (bypass source).
    pub flags: u32,
    /// The VIP's Maglev ring: `ring_size` slots of `MAGLEV` from slot
    /// `ring_base` (a flow's slot is `ring_base + hash % ring_size`). Each
    /// VIP's size follows its backend count; 0 means no table.
    pub ring_base: u32,
    pub ring_size: u32,
    /// The ring of the VIP's table before its last change (size 0: none),
    /// of its own size. A flow the connection table does not know, whose
    /// backend differs in the two tables, gets the previous table's backend
    /// as a second chance (see `SECOND_CHANCE_*`).
    pub previous_base: u32,
    pub previous_size: u32,
}

/// IPv4 option in the outer header of a packet sent with a second chance:
/// type (copied, class 0, number 30: RFC 4727's experimental value), length,
/// then the second candidate's IPv4 address and the next-hop MAC toward it.
/// `lb_decap` on the first candidate forwards a non-SYN TCP packet that no
/// local socket owns to that address, with the option removed.
pub const SECOND_CHANCE_OPTION: u8 = 0x9e;
/// Length of the option (type, length, address, MAC): the outer header is 32 bytes.
pub const SECOND_CHANCE_LEN: usize = 12;

/// Value of the backend table, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: u8,
    /// MTU of the link toward the next hop (the smaller of the interface's
    /// and the route's), capped at 65535; 0 while unknown (no size check).
    /// A packet whose IP length plus the outer header exceeds it does not fit.
    pub mtu: u16,
    /// `BACKEND_AVAILABLE` | `BACKEND_USABLE`.
    pub flags: u32,
    /// Interface the next hop is reached through.
    pub ifindex: u32,
    /// MAC of that interface and of the next hop toward the backend.
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// Key of the connection table: the flow's 5-tuple as the client sent it.
/// Aligned to 4 bytes so the datapath hashes it in words.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Value of the connection table: the flow's backend and its tracers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    pub backend_id: u32,
    pub vip_id: u32,
    /// `flow_hash` of the key, kept so established packets need not rehash.
    pub hash: u32,
    /// Union of the TCP flags the client sent (0 for UDP).
    pub tcp_flags: u8,
    /// `FLOW_CLOSED_*` bits.
    pub state: u8,
    pub _pad: [u8; 2],
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) of the first and
    /// last packet, kept with tracers off too: the agent expires idle flows
    /// by `last_ns` (the table does not evict).
    pub first_ns: u64,
    pub last_ns: u64,
    /// Incoming leg (client to LB, as received).
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Outgoing leg (LB to backend, as sent, encapsulation included); one
    /// packet out per packet in, so only bytes differ.
    pub bytes_out: u64,
}

/// `FlowState::state`: the flow was closed by the client's FIN / RST (counted once).
pub const FLOW_CLOSED_FIN: u8 = 1 << 0;
pub const FLOW_CLOSED_RST: u8 = 1 << 1;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A flow event, sent through the `FLOW_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub key: FlowKey,
    pub backend_id: u32,
    pub vip_id: u32,
    /// `EVENT_*`.
    pub kind: u32,
    pub tcp_flags: u32,
    pub ts_ns: u64,
}

pub const EVENT_OPEN: u32 = 1;
pub const EVENT_CLOSE_FIN: u32 = 2;
pub const EVENT_CLOSE_RST: u32 = 3;

/// `Settings::flags`: keep per-flow tracers (times, flags, per-leg bytes,
/// close detection). Backend choice and per-VIP counters do not depend on it.
pub const SETTING_TRACE_FLOWS: u32 = 1 << 0;
/// `Settings::flags`: lower the MSS option of TCP SYNs to VIPs to what fits
/// the backend's link once encapsulated.
pub const SETTING_CLAMP_MSS: u32 = 1 << 1;
/// `Settings::flags`: no VIP has port 0 (every port), so a packet whose exact
/// (address, port, protocol) is not a VIP needs no second lookup. Set by the
/// agent only while it knows of none; absent (an older agent, zeroed
/// settings) means look both up.
pub const SETTING_NO_EVERY_PORT_VIPS: u32 = 1 << 2;
/// `Settings::flags`: give flows the connection table does not know the
/// previous table's backend as a second candidate (see `SECOND_CHANCE_OPTION`).
pub const SETTING_SECOND_CHANCE: u32 = 1 << 3;

/// Index into `EVENT_STATS`.
pub const EVENTS_SENT: u32 = 0;
pub const EVENTS_DROPPED: u32 = 1;

/// Key of the decapsulation address table: an address of the backend host.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostAddr {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `VipInfo::flags`: this instance is a bypass source intermediary for the
/// VIP (a client host): a flow with an entry in `BYPASS` is encapsulated
/// straight to that entry's backend; every other packet is recorded in
/// `BYPASS_SENT` and passed to the stack, which routes it to the LB.
pub const VIP_BYPASS_SOURCE: u32 = 1 << 0;

/// Value of the bypass table (keyed by `FlowKey`): the backend a flow is sent
/// straight to, and what the intermediary sent on that leg. Written by the
/// agent (backend id, on an accepted instruction) and by the datapath
/// (counters; it removes the entry on the client's FIN or RST, or when the
/// backend is no longer usable).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BypassEntry {
    pub backend_id: u32,
    /// Packets of the flow sent toward the LB since the entry was made: the
    /// refreshes (see `BYPASS_REFRESH_NS`) and the closing FIN or RST.
    pub lb_packets: u32,
    /// Packets and bytes received from the client and sent straight to the
    /// backend (bytes as received, before the outer header).
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_ktime_get_coarse_ns` of the last packet; 0 before the first.
    pub last_ns: u64,
}

/// Index into `BYPASS_STATS`: packets sent straight to a backend; packets of
/// bypass VIPs passed toward the LB (no entry, refreshes and endings
/// included); entries the datapath ended (FIN/RST, or a backend no longer
/// usable); packets of bypassed flows sent toward the LB as refreshes.
pub const BYPASS_SENT_DIRECT: u32 = 0;
pub const BYPASS_PASSED: u32 = 1;
pub const BYPASS_ENDED: u32 = 2;
pub const BYPASS_REFRESHED: u32 = 3;
pub const BYPASS_STAT_COUNT: u32 = 4;

/// A bypassed flow sends one of its packets toward the LB when its last
/// such packet is this old, so the LB's connection table keeps the flow:
/// the LB counts it among its backend's flows (a drain waits for it), and
/// a revoked entry finds the LB's entry still there. The LB's idle timeouts
/// must be longer (300 s and 60 s by default).
pub const BYPASS_REFRESH_NS: u64 = 2_000_000_000;

/// Key of `BYPASS_CLIENTS` (an LPM trie): a client prefix, IPv4 as
/// `::ffff:a.b.c.d` (prefix length + 96).
pub type BypassPrefix = [u8; 16];

/// Value of `BYPASS_CLIENTS`: where the intermediary of a client prefix
/// listens for instructions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BypassIntermediary {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// A flow `lb_decap` saw reach its VIP's `after_packets` from a client
/// behind an intermediary: the backend host's agent sends the instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BypassEvent {
    /// The inner flow as the client sent it.
    pub key: FlowKey,
    /// The outer destination: this backend's address.
    pub backend: [u8; 16],
    pub backend_family: u8,
    pub _pad: [u8; 3],
    pub intermediary: BypassIntermediary,
}

/// Maglev slots per `MAGLEV` array element. Array elements are padded to 8
/// bytes; packing 8 slots in one 32-byte element wastes nothing and makes the
/// memory-mapped array a plain `u32` slice for the agent.
pub const MAGLEV_LANES: u32 = 8;
pub type MaglevChunk = [u32; MAGLEV_LANES as usize];

/// Backend id stored in Maglev slots that have no backend (a VIP with none available).
pub const NO_BACKEND: u32 = u32::MAX;

/// Global datapath settings, a single entry written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// The smallest Maglev ring size (`maglev_table_size`). Each VIP's own
    /// size is in its entry; the datapath does not read this one.
    pub maglev_size: u32,
    /// `SETTING_*` bits.
    pub flags: u32,
    /// IPv4 encapsulation source prefix and the host bits that vary with the
    /// flow hash, both in network byte order.
    pub src_v4: u32,
    pub src_v4_hostmask: u32,
    /// IPv6 encapsulation source prefix; the low 32 bits vary under
    /// `src_v6_hostmask` (network byte order).
    pub src_v6: [u8; 16],
    pub src_v6_hostmask: u32,
    /// Flow events: 0 = off, N = the flows whose hash is a multiple of N
    /// (1 = every flow). Sampling by hash keeps a flow's open and close together.
    pub event_sample: u32,
    /// ICMP "fragmentation needed" / "packet too big" answers to oversize
    /// packets: a token bucket per CPU refilled with this many per second
    /// (0 = never answer: oversize packets are dropped) and holding at most
    /// `icmp_too_big_burst`.
    pub icmp_too_big_rate: u32,
    pub icmp_too_big_burst: u32,
}

/// Defaults of `Settings::icmp_too_big_rate` / `icmp_too_big_burst`, the
/// figures of Linux's own ICMP limit (`icmp_msgs_per_sec`, `icmp_msgs_burst`).
pub const DEFAULT_ICMP_TOO_BIG_RATE: u32 = 1000;
pub const DEFAULT_ICMP_TOO_BIG_BURST: u32 = 50;

/// A CPU's token bucket for ICMP "too big" answers (see `Settings`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpTokens {
    /// Refill credit in nanoseconds; one answer costs 1 s / rate.
    pub credit_ns: u64,
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
}

/// Per-VIP and per-backend traffic counters (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    /// Packets in (= packets out: each is sent on once).
    pub packets: u64,
    /// Bytes in, as received from clients.
    pub bytes: u64,
    /// Bytes out to backends, encapsulation included.
    pub bytes_out: u64,
    pub new_flows: u64,
    /// Flows the client closed with FIN / RST (first one seen).
    pub closed_fin: u64,
    pub closed_rst: u64,
}

/// What `lb_ingress` did with a packet; the index into `OUTCOMES`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Encapsulated and sent back out of the receiving interface (`XDP_TX`).
    Forwarded = 0,
    /// Encapsulated and redirected to another interface through the DevMap.
    Redirected = 1,
    /// ICMP too-big about a VIP flow, encapsulated to that flow's backend.
    IcmpForwarded = 2,
    /// Not IPv4 or IPv6.
    PassNotIp = 3,
    /// IP traffic not addressed to a VIP.
    PassNotVip = 4,
    /// An IP header too short or inconsistent to tell where it goes; the stack decides.
    PassMalformed = 5,
    /// VIP traffic whose transport header is truncated or inconsistent.
    DropMalformed = 6,
    /// An IPv4 fragment addressed to a VIP (see the README: fragments are dropped).
    DropFragment = 7,
    /// The VIP has no available backend.
    DropNoBackend = 8,
    /// The backend has no resolved next hop yet.
    DropNoNextHop = 9,
    /// Making room for the outer header failed.
    DropEncapFailed = 10,
    /// `bpf_redirect_map` refused the target interface.
    DropRedirectFailed = 11,
    /// Too big for the backend's link once encapsulated (IPv4 with DF, or
    /// IPv6): answered with ICMP "fragmentation needed" / ICMPv6 "packet too
    /// big" (`XDP_TX` back to the client), not forwarded.
    IcmpTooBigSent = 12,
    /// Too big for the backend's link once encapsulated and not answered:
    /// IPv4 without DF (the balancer does not fragment), an ICMP error, or
    /// answers switched off (`icmp_too_big_rate = 0`).
    DropTooBig = 13,
    /// Too big, and the ICMP answer was suppressed by the rate limit; dropped.
    IcmpRateLimited = 14,
}

pub const OUTCOME_COUNT: u32 = 15;

impl Outcome {
    pub const ALL: [Outcome; OUTCOME_COUNT as usize] = [
        Outcome::Forwarded,
        Outcome::Redirected,
        Outcome::IcmpForwarded,
        Outcome::PassNotIp,
        Outcome::PassNotVip,
        Outcome::PassMalformed,
        Outcome::DropMalformed,
        Outcome::DropFragment,
        Outcome::DropNoBackend,
        Outcome::DropNoNextHop,
        Outcome::DropEncapFailed,
        Outcome::DropRedirectFailed,
        Outcome::IcmpTooBigSent,
        Outcome::DropTooBig,
        Outcome::IcmpRateLimited,
    ];

    /// Operator-facing name, also used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Redirected => "redirected",
            Outcome::IcmpForwarded => "icmp_forwarded",
            Outcome::PassNotIp => "passed_not_ip",
            Outcome::PassNotVip => "passed_not_vip",
            Outcome::PassMalformed => "passed_malformed",
            Outcome::DropMalformed => "dropped_malformed",
            Outcome::DropFragment => "dropped_fragment",
            Outcome::DropNoBackend => "dropped_no_backend",
            Outcome::DropNoNextHop => "dropped_no_next_hop",
            Outcome::DropEncapFailed => "dropped_encap_failed",
            Outcome::DropRedirectFailed => "dropped_redirect_failed",
            Outcome::IcmpTooBigSent => "icmp_too_big_sent",
            Outcome::DropTooBig => "dropped_too_big",
            Outcome::IcmpRateLimited => "icmp_rate_limited",
        }
    }
}

/// What `lb_decap` did with a packet; the index into `DECAP_OUTCOMES`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapOutcome {
    /// Outer header removed, inner packet passed to the stack.
    Decapsulated = 0,
    /// Not an encapsulated packet for this host: passed untouched.
    Passed = 1,
    /// Encapsulated to this host but the inner packet is truncated or inconsistent.
    DroppedMalformed = 2,
    /// Removing the outer header failed.
    DroppedAdjustFailed = 3,
    /// A non-SYN TCP packet no local socket owns, sent on to the second
    /// candidate its outer header named.
    SecondChance = 4,
}

pub const DECAP_OUTCOME_COUNT: u32 = 5;

impl DecapOutcome {
    pub const ALL: [DecapOutcome; DECAP_OUTCOME_COUNT as usize] = [
        DecapOutcome::Decapsulated,
        DecapOutcome::Passed,
        DecapOutcome::DroppedMalformed,
        DecapOutcome::DroppedAdjustFailed,
        DecapOutcome::SecondChance,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DecapOutcome::Decapsulated => "decapsulated",
            DecapOutcome::Passed => "passed",
            DecapOutcome::DroppedMalformed => "dropped_malformed",
            DecapOutcome::DroppedAdjustFailed => "dropped_adjust_failed",
            DecapOutcome::SecondChance => "second_chance",
        }
    }
}

/// Per-CPU decapsulation counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCounter {
    pub packets: u64,
    pub bytes: u64,
}

#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
const fn mix(h: u32, word: u32) -> u32 {
    let k = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// The flow hash: picks the Maglev slot and the varying bits of the outer
/// source address. It depends only on the 5-tuple (a fixed seed, no per-node
/// state), so every LB node picks the same backend for the same flow.
/// Words are read little-endian, as the datapath (bpfel) reads them.
#[inline(always)]
pub const fn flow_hash(k: &FlowKey) -> u32 {
    let mut h: u32 = 0x4c42_5f31;
    h = mix(h, word(&k.src, 0));
    h = mix(h, word(&k.src, 4));
    h = mix(h, word(&k.src, 8));
    h = mix(h, word(&k.src, 12));
    h = mix(h, word(&k.dst, 0));
    h = mix(h, word(&k.dst, 4));
    h = mix(h, word(&k.dst, 8));
    h = mix(h, word(&k.dst, 12));
    h = mix(h, ((k.sport as u32) << 16) | k.dport as u32);
    h = mix(h, k.proto as u32);
    fmix32(h ^ 40)
}

impl FlowKey {
    /// The destination address as four words, read with word loads.
    #[inline(always)]
    pub fn dst_words(&self) -> [u32; 4] {
        // SAFETY: `dst` is at offset 16 of this 4-aligned struct.
        unsafe { words_at(&self.dst) }
    }

    /// An IPv4 flow key, built as ten native-endian words so that the datapath
    /// writes it with word stores (a byte-wise build costs `memset` calls in BPF).
    /// Ports are in network byte order, as on the wire.
    #[inline(always)]
    pub fn v4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> FlowKey {
        let words: [u32; 10] = [
            u32::from_ne_bytes(src),
            0,
            0,
            0,
            u32::from_ne_bytes(dst),
            0,
            0,
            0,
            u32::from_ne_bytes({
                let (s, d) = (sport.to_ne_bytes(), dport.to_ne_bytes());
                [s[0], s[1], d[0], d[1]]
            }),
            u32::from_ne_bytes([proto, FAMILY_V4, 0, 0]),
        ];
        // SAFETY: FlowKey is #[repr(C, align(4))], 40 bytes of integers with no
        // padding; the words are laid out exactly as its fields.
        unsafe { core::mem::transmute::<[u32; 10], FlowKey>(words) }
    }

    /// An IPv6 flow key from its addresses as native-endian words (each
    /// word holds four address bytes in memory order), built like `v4`.
    #[inline(always)]
    pub fn v6(src: [u32; 4], dst: [u32; 4], sport: u16, dport: u16, proto: u8) -> FlowKey {
        let words: [u32; 10] = [
            src[0],
            src[1],
            src[2],
            src[3],
            dst[0],
            dst[1],
            dst[2],
            dst[3],
            u32::from_ne_bytes({
                let (s, d) = (sport.to_ne_bytes(), dport.to_ne_bytes());
                [s[0], s[1], d[0], d[1]]
            }),
            u32::from_ne_bytes([proto, FAMILY_V6, 0, 0]),
        ];
        // SAFETY: as in `v4`.
        unsafe { core::mem::transmute::<[u32; 10], FlowKey>(words) }
    }
}

const _: () = assert!(core::mem::size_of::<VipKey>() == 20);
// The word reads of `BackendInfo::addr_words` and `Settings::src_v6_words`.
const _: () = assert!(core::mem::offset_of!(BackendInfo, addr) == 0);
const _: () = assert!(core::mem::offset_of!(Settings, src_v6) == 16);
const _: () = assert!(core::mem::size_of::<VipInfo>() == 24);
const _: () = assert!(core::mem::size_of::<BackendInfo>() == 40);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<FlowState>() == 56);
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 64);
const _: () = assert!(core::mem::size_of::<Settings>() == 48);
const _: () = assert!(core::mem::size_of::<HostAddr>() == 20);
const _: () = assert!(core::mem::size_of::<TrafficCounters>() == 48);
const _: () = assert!(core::mem::size_of::<PacketCounter>() == 16);
const _: () = assert!(core::mem::size_of::<IcmpTokens>() == 16);
const _: () = assert!(core::mem::size_of::<BypassEntry>() == 32);
const _: () = assert!(core::mem::size_of::<BypassIntermediary>() == 20);
const _: () = assert!(core::mem::size_of::<BypassEvent>() == 80);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] with explicit padding and only
    // integer fields, so every bit pattern is valid.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for BackendInfo {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for flow_table::FlowSlot {}
    unsafe impl aya::Pod for flow_table::FlowTags {}
    unsafe impl aya::Pod for flow_table::FlowTableHeader {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for HostAddr {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for PacketCounter {}
    unsafe impl aya::Pod for IcmpTokens {}
    unsafe impl aya::Pod for BypassEntry {}
    unsafe impl aya::Pod for BypassIntermediary {}
    unsafe impl aya::Pod for BypassEvent {}
}
