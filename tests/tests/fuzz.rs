//! Fuzzing `lb_ingress` and `lb_decap` with BPF_PROG_TEST_RUN: random bytes and
//! mutations of valid packets (every truncation length, broken versions, IHLs,
//! lengths and protocols, IPv4 options and fragments, IPv6 extension headers,
//! ICMP errors with quoted headers, encapsulated packets, bit flips), from a
//! fixed seed, each packet through both programs.
//!
//! What must hold for every packet, checked from its bytes alone:
//! - neither program returns `XDP_ABORTED`;
//! - a packet passed is unchanged, except one `lb_decap` decapsulated;
//! - `lb_ingress` passes every packet not addressed to a VIP address, and what
//!   it sends is a packet a VIP may forward (not a fragment, every length within
//!   the frame, an ICMP error's quote within the error) behind an outer header
//!   whose length is the inner packet's;
//! - `lb_decap` passes every packet that is not encapsulated to one of its
//!   addresses, and what it decapsulates is the inner packet, whole;
//! - the second chance: `lb_ingress` adds a well-formed option naming a
//!   backend (the fixture's VIP has a previous table), and `lb_decap` sends
//!   on only packets with a well-formed option, to the address it names,
//!   with the option removed and the rest intact. Tunnelled packets carry
//!   valid, damaged and random options.
//!
//! `LB_FUZZ_PACKETS` (default 1,000,000) sets the number of packets and
//! `LB_FUZZ_SEED` another seed; a failure prints the seed, the packet's index
//! and its bytes.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use lb_common::{DecapOutcome, Outcome, SECOND_CHANCE_LEN, SECOND_CHANCE_OPTION};
use lb_tests::{fixture::*, packet::*};

const SEED: u64 = 0x4c42_5f46_555a_5a31;
const DEFAULT_PACKETS: u64 = 1_000_000;

const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
/// An IPv4 VIP with IPv6 backends.
const VIP4_TO_V6: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const OTHER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x99);
/// Backends, whose first addresses are also `lb_decap`'s own.
const BACKEND4: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 18, 0, 11),
    Ipv4Addr::new(198, 18, 0, 12),
    Ipv4Addr::new(198, 18, 0, 13),
];
const BACKEND6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x12),
];

const PROTO_ICMP: u8 = 1;
const PROTO_IPIP: u8 = 4;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_IPV6: u8 = 41;
const PROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers: hop-by-hop, routing, fragment, destination options.
const EXTENSIONS: [u8; 4] = [0, 43, 44, 60];

fn vip(addr: IpAddr, port: u16, proto: &str, backends: &[IpAddr]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address = \"{a}\", weight = 1 }}"))
        .collect();
    format!(
        "[[vips]]\naddress=\"{addr}\"\nport={port}\nprotocol=\"{proto}\"\nbackends=[{}]\n",
        list.join(", ")
    )
}

/// VIPs over IPv4 and IPv6, TCP and UDP, one port and every port, to IPv4
/// and IPv6 backends.
fn vips() -> String {
    let b4: Vec<IpAddr> = BACKEND4.iter().map(|a| IpAddr::V4(*a)).collect();
    let b6: Vec<IpAddr> = BACKEND6.iter().map(|a| IpAddr::V6(*a)).collect();
    [
        vip(IpAddr::V4(VIP4), 80, "tcp", &b4),
        vip(IpAddr::V4(VIP4), 0, "udp", &b4[..2]),
        vip(IpAddr::V6(VIP6), 443, "tcp", &b6),
        vip(IpAddr::V6(VIP6), 0, "udp", &b6[..1]),
        vip(IpAddr::V4(VIP4_TO_V6), 80, "tcp", &b6),
    ]
    .concat()
}

fn be16(b: &[u8], off: usize) -> usize {
    usize::from(u16::from_be_bytes([b[off], b[off + 1]]))
}

/// The oracle's view of the configuration, independent of the datapath.
struct Addresses {
    vips4: Vec<[u8; 4]>,
    vips6: Vec<[u8; 16]>,
    local4: Vec<[u8; 4]>,
    local6: Vec<[u8; 16]>,
}

impl Addresses {
    fn new() -> Addresses {
        Addresses {
            vips4: vec![VIP4.octets(), VIP4_TO_V6.octets()],
            vips6: vec![VIP6.octets()],
            local4: vec![BACKEND4[0].octets()],
            local6: vec![BACKEND6[0].octets()],
        }
    }

    /// Whether the frame's IP destination is a VIP address (whatever else is in it).
    fn to_vip(&self, f: &[u8]) -> bool {
        match ether_type(f) {
            Some(ETH_IPV4) if f.len() >= 34 => self.vips4.iter().any(|a| f[30..34] == a[..]),
            Some(ETH_IPV6) if f.len() >= 54 => self.vips6.iter().any(|a| f[38..54] == a[..]),
            _ => false,
        }
    }

    /// Whether the frame is an IPIP / IPv6 tunnel packet to one of `lb_decap`'s addresses.
    fn encapsulated_to_us(&self, f: &[u8]) -> bool {
        let tunnel = |p: u8| p == PROTO_IPIP || p == PROTO_IPV6;
        match ether_type(f) {
            Some(ETH_IPV4) if f.len() >= 34 => {
                tunnel(f[23]) && self.local4.iter().any(|a| f[30..34] == a[..])
            }
            Some(ETH_IPV6) if f.len() >= 54 => {
                tunnel(f[20]) && self.local6.iter().any(|a| f[38..54] == a[..])
            }
            _ => false,
        }
    }
}

fn ether_type(f: &[u8]) -> Option<u16> {
    (f.len() >= 14).then(|| u16::from_be_bytes([f[12], f[13]]))
}

/// The length an IP packet at the start of `ip` declares, if its version is 4 or 6.
fn declared_len(ip: &[u8]) -> Option<usize> {
    match ip.first()? >> 4 {
        4 if ip.len() >= 20 => Some(be16(ip, 2)),
        6 if ip.len() >= 40 => Some(be16(ip, 4) + 40),
        _ => None,
    }
}

/// Whether `ip` (the whole received IP packet) is one a VIP may forward:
/// the datapath's rules, written again from the RFCs.
fn forwardable(ip: &[u8]) -> Result<(), String> {
    declared_len(ip).ok_or("no IPv4 or IPv6 header")?;
    let (hdr, proto, total) = match ip[0] >> 4 {
        4 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ihl < 20 || be16(ip, 6) & 0x3fff != 0 {
                return Err(format!(
                    "IHL {ihl} or a fragment (frag_off {:#x})",
                    be16(ip, 6)
                ));
            }
            (ihl, ip[9], be16(ip, 2))
        }
        6 => (40, ip[6], be16(ip, 4) + 40),
        v => return Err(format!("IP version {v}")),
    };
    if total > ip.len() {
        return Err(format!(
            "length {total} beyond the {} bytes received",
            ip.len()
        ));
    }
    let l4_min = match proto {
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 => 8,
        p => return Err(format!("protocol {p}")),
    };
    if total < hdr + l4_min {
        return Err(format!("length {total} below the headers"));
    }
    if proto == PROTO_ICMP || proto == PROTO_ICMPV6 {
        let too_big = if proto == PROTO_ICMP {
            ip[hdr..hdr + 2] == [3, 4]
        } else {
            ip[hdr] == 2
        };
        if !too_big {
            return Err(format!("ICMP type {} code {}", ip[hdr], ip[hdr + 1]));
        }
        // The quoted header and 8 bytes of its transport header lie within the error.
        let quote = &ip[hdr + 8..total];
        let quoted_hdr = match quote.first().map(|b| b >> 4) {
            Some(4) => usize::from(quote[0] & 0x0f) * 4,
            Some(6) => 40,
            _ => return Err("quote is no IP header".into()),
        };
        if quoted_hdr < 20 || quote.len() < quoted_hdr + 8 {
            return Err(format!(
                "quote of {} bytes, header {quoted_hdr}",
                quote.len()
            ));
        }
    }
    Ok(())
}

/// Checks what `lb_ingress` sent: the received IP packet behind an outer header
/// whose lengths match it.
fn check_encapsulated(input: &[u8], out: &[u8]) -> Result<(), String> {
    let inner = &input[14..];
    forwardable(inner)?;
    if out.len() < 14 || out[..6] != NEXT_HOP_MAC || out[6..12] != LB_MAC {
        return Err("Ethernet header".into());
    }
    let (outer_hdr, outer_total, tunnel) = match (ether_type(out), out.get(14).map(|b| b >> 4)) {
        (Some(ETH_IPV4), Some(4)) if out.len() >= 34 && out[14] == 0x45 => {
            (20, be16(out, 16), out[23])
        }
        (Some(ETH_IPV4), Some(4)) if out.len() >= 46 && out[14] == 0x48 => {
            check_option(&out[34..46])?;
            if checksum(&out[14..46]) != 0 {
                return Err("outer checksum with the option".into());
            }
            (32, be16(out, 16), out[23])
        }
        (Some(ETH_IPV6), Some(6)) if out.len() >= 54 => (40, be16(out, 18) + 40, out[20]),
        _ => return Err("outer IP header".into()),
    };
    if out[14 + outer_hdr..] != *inner {
        return Err("the inner packet changed".into());
    }
    let inner_v4 = match tunnel {
        PROTO_IPIP => true,
        PROTO_IPV6 => false,
        p => return Err(format!("outer protocol {p}")),
    };
    if inner_v4 != (ether_type(input) == Some(ETH_IPV4)) {
        return Err("outer protocol does not match the inner family".into());
    }
    let inner_total = declared_len(inner).ok_or("inner version")?;
    if outer_total != outer_hdr + inner_total {
        return Err(format!(
            "outer length {outer_total} for an inner packet of {inner_total}"
        ));
    }
    Ok(())
}

/// A second-chance option as `lb_ingress` writes it: naming an IPv4 backend
/// and the next hop's MAC.
fn check_option(o: &[u8]) -> Result<(), String> {
    let named = BACKEND4.iter().any(|b| o[2..6] == b.octets());
    if o[0] != SECOND_CHANCE_OPTION || o[1] as usize != SECOND_CHANCE_LEN || !named {
        return Err("second-chance option".into());
    }
    if o[6..12] != NEXT_HOP_MAC {
        return Err("second-chance next-hop MAC".into());
    }
    Ok(())
}

/// Checks a packet `lb_decap` sent on to the second candidate: only with a
/// well-formed option, to the address and MAC it named, option removed,
/// TTL lowered, checksum right, the inner packet intact.
fn check_sent_on(input: &[u8], out: &[u8]) -> Result<(), String> {
    let well_formed = input.len() >= 46
        && input[14] == 0x48
        && input[34] == SECOND_CHANCE_OPTION
        && input[35] as usize == SECOND_CHANCE_LEN;
    if !well_formed {
        return Err("sent on without a well-formed option".into());
    }
    if out.len() != input.len() - SECOND_CHANCE_LEN || out[..6] != input[40..46] {
        return Err("frame length or destination MAC".into());
    }
    if out[6..12] != input[..6] || out[14] != 0x45 || out[30..34] != input[36..40] {
        return Err("source MAC, header length or destination".into());
    }
    if out[22] != input[22] - 1 || checksum(&out[14..34]) != 0 {
        return Err("TTL or checksum".into());
    }
    if be16(out, 16) + SECOND_CHANCE_LEN != be16(input, 16) || out[34..] != input[46..] {
        return Err("length or inner packet".into());
    }
    Ok(())
}

/// Checks what `lb_decap` passed changed: the received frame minus the outer
/// IP header, with the inner packet's EtherType.
fn check_decapsulated(input: &[u8], out: &[u8]) -> Result<(), String> {
    let outer_hdr = match ether_type(input) {
        Some(ETH_IPV4) => usize::from(input[14] & 0x0f) * 4,
        _ => 40,
    };
    let inner = input.get(14 + outer_hdr..).ok_or("outer header cut")?;
    let inner_type = match inner.first().map(|b| b >> 4) {
        Some(4) => ETH_IPV4,
        Some(6) => ETH_IPV6,
        _ => return Err("inner version".into()),
    };
    let total = declared_len(inner).ok_or("inner header cut")?;
    if total > inner.len() {
        return Err(format!("inner length {total} beyond {}", inner.len()));
    }
    if out != eth_with(input, inner_type, inner) {
        return Err("not the inner packet".into());
    }
    Ok(())
}

/// `input`'s MAC addresses, `ether_type` and `payload`.
fn eth_with(input: &[u8], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = input[..12].to_vec();
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Overwrites the big-endian 16-bit field at `off`, if the frame holds it.
fn set16(f: &mut [u8], off: usize, v: u16) {
    if off + 2 <= f.len() {
        f[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }
}

/// Offsets of the IP headers in a frame: the outer one, then those quoted in
/// ICMP errors or carried in tunnels.
fn ip_headers(f: &[u8]) -> Vec<(usize, bool)> {
    let mut out = Vec::new();
    let mut next = match ether_type(f) {
        Some(ETH_IPV4) => Some((14, false)),
        Some(ETH_IPV6) => Some((14, true)),
        _ => None,
    };
    while let Some((off, v6)) = next.take() {
        out.push((off, v6));
        let (len, proto) = if v6 {
            if f.len() < off + 40 {
                break;
            }
            (40, f[off + 6])
        } else {
            if f.len() < off + 20 {
                break;
            }
            (usize::from(f[off] & 0x0f) * 4, f[off + 9])
        };
        // A broken IHL would point back at this header.
        if len < 20 {
            break;
        }
        let l4 = off + len;
        next = match proto {
            PROTO_IPIP => Some((l4, false)),
            PROTO_IPV6 => Some((l4, true)),
            PROTO_ICMP if f.get(l4) == Some(&3) => Some((l4 + 8, false)),
            PROTO_ICMPV6 if f.get(l4) == Some(&2) => Some((l4 + 8, true)),
            _ => None,
        };
    }
    out
}

/// Valid packets, mostly to VIPs, and their mutations.
struct Gen {
    rng: fastrand::Rng,
}

impl Gen {
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.usize(..from.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.rng.fill(&mut b);
        b
    }

    fn dst4(&mut self) -> Ipv4Addr {
        match self.rng.u8(..10) {
            0..=5 => VIP4,
            6 => VIP4_TO_V6,
            7 => BACKEND4[0],
            8 => OTHER4,
            _ => Ipv4Addr::from(self.rng.u32(..)),
        }
    }

    fn dst6(&mut self) -> Ipv6Addr {
        match self.rng.u8(..10) {
            0..=6 => VIP6,
            7 => BACKEND6[0],
            8 => OTHER6,
            _ => Ipv6Addr::from(self.rng.u128(..)),
        }
    }

    fn port(&mut self) -> u16 {
        match self.rng.u8(..8) {
            0..=2 => 80,
            3..=5 => 443,
            6 => 53,
            _ => self.rng.u16(..),
        }
    }

    fn tcp_flags(&mut self) -> u8 {
        match self.rng.u8(..6) {
            0 => TCP_SYN,
            1 => TCP_ACK,
            2 => TCP_FIN | TCP_ACK,
            3 => TCP_RST,
            4 => TCP_SYN | TCP_ACK,
            _ => self.rng.u8(..),
        }
    }

    /// A TCP or UDP header with a short payload; its protocol number.
    fn transport(&mut self, dport: u16) -> (u8, Vec<u8>) {
        let payload = {
            let n = self.rng.usize(..48);
            self.bytes(n)
        };
        let sport = self.rng.u16(1024..);
        if self.rng.bool() {
            let flags = self.tcp_flags();
            (PROTO_TCP, tcp(sport, dport, flags, &payload))
        } else {
            (PROTO_UDP, udp(sport, dport, &payload))
        }
    }

    /// IPv4 options: valid ones (NOP, EOL, record route) or random bytes.
    fn options(&mut self) -> Vec<u8> {
        let words = self.rng.usize(..=10);
        match self.rng.u8(..3) {
            0 => vec![1; words * 4],
            1 => {
                let mut o = vec![7, (words * 4) as u8, 4];
                o.resize(words * 4, 0);
                o
            }
            _ => self.bytes(words * 4),
        }
    }

    fn v4_fields(&mut self) -> (u16, Vec<u8>) {
        let frag_off = match self.rng.u8(..20) {
            0 => 0x2000,
            1 => self.rng.u16(1..0x2000),
            2 => 0x2000 | self.rng.u16(1..0x2000),
            3 => self.rng.u16(..),
            4..=9 => 0x4000,
            _ => 0,
        };
        let options = if self.rng.u8(..4) == 0 {
            self.options()
        } else {
            Vec::new()
        };
        (frag_off, options)
    }

    fn ipv4_with(&mut self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
        let (frag_off, options) = self.v4_fields();
        let fields = V4Fields {
            id: self.rng.u16(..),
            frag_off,
            options: &options,
            ..V4Fields::default()
        };
        ipv4_full(src, dst, proto, fields, payload)
    }

    /// TCP or UDP over IPv4.
    fn ipv4_traffic(&mut self) -> Vec<u8> {
        let dst = self.dst4();
        let dport = self.port();
        let (proto, l4) = self.transport(dport);
        self.ipv4_with(CLIENT4, dst, proto, &l4)
    }

    /// TCP or UDP over IPv6, sometimes behind extension headers.
    fn ipv6_traffic(&mut self) -> Vec<u8> {
        let dst = self.dst6();
        let dport = self.port();
        let (proto, l4) = self.transport(dport);
        let (next, payload) = self.extensions(proto, l4);
        ipv6(CLIENT6, dst, next, self.rng.u32(..), 64, &payload)
    }

    /// Up to three extension headers in front of `payload` (8 bytes each).
    fn extensions(&mut self, mut next: u8, mut payload: Vec<u8>) -> (u8, Vec<u8>) {
        if self.rng.u8(..4) != 0 {
            return (next, payload);
        }
        for _ in 0..self.rng.usize(1..=3) {
            let ext = self.pick(&EXTENSIONS);
            let mut h = vec![next, 0];
            if ext == 44 {
                // Fragment header: offset and M flag, identification.
                h.extend_from_slice(&self.rng.u16(..).to_be_bytes());
                h.extend_from_slice(&self.rng.u32(..).to_be_bytes());
            } else {
                h.extend_from_slice(&[1, 4, 0, 0, 0, 0]);
            }
            h.extend_from_slice(&payload);
            payload = h;
            next = ext;
        }
        (next, payload)
    }

    /// A reply a backend sent from a VIP, as a router quotes it: the IP header
    /// and part of the transport header and payload.
    fn quote(&mut self, v6: bool) -> Vec<u8> {
        // From the VIP's port to the client's.
        let (vip_port, client_port) = (self.port(), self.rng.u16(1024..));
        let (proto, mut l4) = self.transport(client_port);
        l4[..2].copy_from_slice(&vip_port.to_be_bytes());
        let reply = if v6 {
            ipv6(VIP6, CLIENT6, proto, 0, 64, &l4)
        } else {
            let src = if self.rng.u8(..4) == 0 {
                VIP4_TO_V6
            } else {
                VIP4
            };
            self.ipv4_with(src, CLIENT4, proto, &l4)
        };
        let hdr = if v6 {
            40
        } else {
            usize::from(reply[0] & 0x0f) * 4
        };
        let n = match self.rng.u8(..4) {
            0 => self.rng.usize(..=reply.len()),
            1 => reply.len(),
            _ => (hdr + 8).min(reply.len()),
        };
        reply[..n].to_vec()
    }

    /// ICMP "fragmentation needed" quoting a VIP's reply.
    fn icmp4_error(&mut self) -> Vec<u8> {
        let quote = self.quote(false);
        let dst = self.dst4();
        let mut icmp = icmp_frag_needed(self.rng.u16(..), &quote);
        if self.rng.u8(..8) == 0 {
            icmp[0] = self.pick(&[0, 3, 8, 11, 12]);
            icmp[1] = self.rng.u8(..16);
        }
        self.ipv4_with(OTHER4, dst, PROTO_ICMP, &icmp)
    }

    /// ICMPv6 "packet too big" quoting a VIP's reply.
    fn icmp6_error(&mut self) -> Vec<u8> {
        let quote = self.quote(true);
        let dst = self.dst6();
        let mut icmp = icmp6_too_big(self.rng.u32(..), &quote);
        if self.rng.u8(..8) == 0 {
            icmp[0] = self.pick(&[1, 2, 3, 128, 135]);
        }
        ipv6(OTHER6, dst, PROTO_ICMPV6, 0, 64, &icmp)
    }

    /// One of the IP packets above, or a tunnel packet carrying one.
    fn ip_packet(&mut self, depth: u8) -> Vec<u8> {
        match self.rng.u8(..if depth == 0 { 7 } else { 5 }) {
            0 | 1 => self.ipv4_traffic(),
            2 => self.ipv6_traffic(),
            3 => self.icmp4_error(),
            4 => self.icmp6_error(),
            _ => self.tunnel(depth + 1),
        }
    }

    /// A second-chance option: mostly well formed, else damaged or random.
    fn second_chance_option(&mut self) -> Vec<u8> {
        let mut o = vec![SECOND_CHANCE_OPTION, SECOND_CHANCE_LEN as u8];
        o.extend_from_slice(&self.pick(&BACKEND4).octets());
        o.extend_from_slice(&NEXT_HOP_MAC);
        match self.rng.u8(..6) {
            0 => o[1] = self.rng.u8(..),
            1 => o[0] = self.rng.u8(..),
            2 => o = self.bytes(SECOND_CHANCE_LEN),
            _ => {}
        }
        o
    }

    /// An encapsulated packet as the balancer sends it, mostly to `lb_decap`'s address.
    fn tunnel(&mut self, depth: u8) -> Vec<u8> {
        let inner = self.ip_packet(depth);
        let proto = if inner[0] >> 4 == 4 {
            PROTO_IPIP
        } else {
            PROTO_IPV6
        };
        if self.rng.bool() {
            let dst = if self.rng.u8(..4) == 0 {
                self.dst4()
            } else {
                BACKEND4[0]
            };
            let src = Ipv4Addr::new(198, 18, 200, 1);
            if self.rng.u8(..3) == 0 {
                let option = self.second_chance_option();
                let fields = V4Fields {
                    id: 0,
                    frag_off: 0x4000,
                    ttl: self.rng.u8(..3).max(1) * 32 - 31 + self.rng.u8(..2),
                    options: &option,
                };
                return ipv4_full(src, dst, proto, fields, &inner);
            }
            self.ipv4_with(src, dst, proto, &inner)
        } else {
            let dst = if self.rng.u8(..4) == 0 {
                self.dst6()
            } else {
                BACKEND6[0]
            };
            let src = "fd00:200::1".parse().expect("address");
            ipv6(src, dst, proto, 0, 64, &inner)
        }
    }

    /// A valid frame.
    fn frame(&mut self) -> Vec<u8> {
        let ip = self.ip_packet(0);
        let ether_type = if ip[0] >> 4 == 4 { ETH_IPV4 } else { ETH_IPV6 };
        eth(LB_MAC, CLIENT_MAC, ether_type, &ip)
    }

    /// Random bytes, mostly with an IP EtherType.
    fn garbage(&mut self) -> Vec<u8> {
        let n = self.rng.usize(14..400);
        let mut f = self.bytes(n);
        let ether_type = match self.rng.u8(..8) {
            0..=2 => ETH_IPV4,
            3..=5 => ETH_IPV6,
            6 => 0x0806,
            _ => self.rng.u16(..),
        };
        f[12..14].copy_from_slice(&ether_type.to_be_bytes());
        f
    }

    /// A length near `actual` or at an edge of its field.
    fn length(&mut self, actual: usize) -> u16 {
        match self.rng.u8(..8) {
            0 => 0,
            1 => self.rng.u16(65_400..),
            2 => self.rng.u16(..64),
            3 => self.rng.u16(..),
            _ => (actual as i64 + i64::from(self.rng.i8(..))).clamp(0, 65_535) as u16,
        }
    }

    /// Breaks one field of one of the frame's IP headers, or of what follows it.
    fn mutate_header(&mut self, f: &mut [u8]) {
        let headers = ip_headers(f);
        if headers.is_empty() {
            return;
        }
        let (off, v6) = self.pick(&headers);
        if off >= f.len() {
            return;
        }
        let rest = f.len() - off;
        if v6 {
            match self.rng.u8(..6) {
                0 => f[off] = (self.rng.u8(..16) << 4) | (f[off] & 0x0f),
                1 => {
                    let len = self.length(rest.saturating_sub(40));
                    set16(f, off + 4, len)
                }
                2 if off + 6 < f.len() => {
                    f[off + 6] = self.pick(&[0, 4, 6, 17, 41, 43, 44, 58, 59, 60, 255]);
                }
                3 if off + 40 <= f.len() => {
                    let dst = self.dst6();
                    f[off + 24..off + 40].copy_from_slice(&dst.octets());
                }
                _ => {
                    // The byte after the header: ICMPv6 type, port or extension.
                    if let Some(b) = f.get_mut(off + 40 + self.rng.usize(..8)) {
                        *b = self.rng.u8(..);
                    }
                }
            }
        } else {
            match self.rng.u8(..8) {
                0 => f[off] = (self.rng.u8(..16) << 4) | (f[off] & 0x0f),
                1 => f[off] = (f[off] & 0xf0) | self.rng.u8(..16),
                2 => {
                    let len = self.length(rest);
                    set16(f, off + 2, len)
                }
                3 => {
                    let frag = self.v4_fields().0;
                    set16(f, off + 6, frag)
                }
                4 if off + 9 < f.len() => {
                    f[off + 9] = self.pick(&[0, 1, 4, 6, 17, 41, 47, 58, 255]);
                }
                5 if off + 20 <= f.len() => {
                    let dst = self.dst4();
                    f[off + 16..off + 20].copy_from_slice(&dst.octets());
                }
                _ => {
                    // The transport or ICMP header, or the options.
                    let ihl = usize::from(f[off] & 0x0f) * 4;
                    if let Some(b) = f.get_mut(off + ihl.max(20) + self.rng.usize(..16)) {
                        *b = self.rng.u8(..);
                    }
                }
            }
        }
    }

    fn mutate(&mut self, f: &mut Vec<u8>) {
        for _ in 0..self.rng.usize(1..=3) {
            match self.rng.u8(..10) {
                0..=5 => self.mutate_header(f),
                6 => {
                    for _ in 0..self.rng.usize(1..=8) {
                        let i = self.rng.usize(12..f.len());
                        f[i] ^= 1 << self.rng.u8(..8);
                    }
                }
                7 => {
                    let i = self.rng.usize(12..f.len());
                    f[i] = self.rng.u8(..);
                }
                8 => {
                    // Ethernet padding after the IP packet.
                    let n = self.rng.usize(1..64);
                    let pad = self.bytes(n);
                    f.extend_from_slice(&pad);
                }
                _ => {
                    let n = self.rng.usize(14..=f.len());
                    f.truncate(n);
                }
            }
        }
    }
}

/// Counts of what the programs did.
#[derive(Default)]
struct Tally {
    packets: u64,
    ingress: [u64; 5],
    decap: [u64; 5],
    /// Packets `lb_ingress` sent with a second-chance option.
    with_option: u64,
}

struct Fuzz {
    f: Fixture,
    addrs: Addresses,
    seed: u64,
    tally: Tally,
}

impl Fuzz {
    fn new(seed: u64) -> Fuzz {
        let sizes = lb_userspace::datapath::MapSizes {
            max_vips: 8,
            ..SIZES
        };
        // The IPv4 TCP VIP had one backend fewer before: its previous table
        // gives flows a second chance.
        let b4: Vec<IpAddr> = BACKEND4.iter().map(|a| IpAddr::V4(*a)).collect();
        let before = vips().replacen(
            &vip(IpAddr::V4(VIP4), 80, "tcp", &b4),
            &vip(IpAddr::V4(VIP4), 80, "tcp", &b4[..2]),
            1,
        );
        let mut f = Fixture::with_sizes(sizes, &before);
        f.apply(&vips());
        f.add_decap_address(IpAddr::V4(BACKEND4[0]));
        f.add_decap_address(IpAddr::V6(BACKEND6[0]));
        Fuzz {
            f,
            addrs: Addresses::new(),
            seed,
            tally: Tally::default(),
        }
    }

    fn fail(&self, program: &str, frame: &[u8], action: u32, why: &str) -> ! {
        let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
        panic!(
            "{program}: packet {} (seed {:#x}): action {action}: {why}\nframe: {hex}",
            self.tally.packets, self.seed
        );
    }

    /// Runs one frame through both programs and checks what they did.
    fn run(&mut self, frame: &[u8]) {
        let r = self.f.ingress(frame);
        let verdict = match r.action {
            XDP_PASS if r.output != frame => Err("passed but changed".to_string()),
            XDP_PASS => Ok(()),
            XDP_DROP | XDP_TX if !self.addrs.to_vip(frame) => {
                Err("not addressed to a VIP".to_string())
            }
            XDP_DROP => Ok(()),
            XDP_TX => check_encapsulated(frame, &r.output),
            _ => Err("unexpected action".to_string()),
        };
        if r.action == XDP_TX && r.output.get(14) == Some(&0x48) {
            self.tally.with_option += 1;
        }
        if let Err(why) = verdict {
            self.fail("lb_ingress", frame, r.action, &why);
        }
        self.tally.ingress[r.action as usize] += 1;

        let r = self.f.decap(frame);
        let ours = self.addrs.encapsulated_to_us(frame);
        let verdict = match r.action {
            XDP_PASS if r.output == frame => Ok(()),
            XDP_PASS if !ours => Err("changed a packet not tunnelled to this host".into()),
            XDP_PASS => check_decapsulated(frame, &r.output),
            XDP_DROP if ours => Ok(()),
            XDP_DROP => Err("dropped a packet not tunnelled to this host".into()),
            XDP_TX if ours => check_sent_on(frame, &r.output),
            _ => Err("unexpected action".to_string()),
        };
        if let Err(why) = verdict {
            self.fail("lb_decap", frame, r.action, &why);
        }
        self.tally.decap[r.action as usize] += 1;
        self.tally.packets += 1;
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.replace('_', "");
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

#[test]
fn random_and_mutated_packets_are_never_aborted_nor_misrouted() {
    let packets = env_u64("LB_FUZZ_PACKETS").unwrap_or(DEFAULT_PACKETS);
    let seed = env_u64("LB_FUZZ_SEED").unwrap_or(SEED);
    let mut fuzz = Fuzz::new(seed);
    let mut gen = Gen {
        rng: fastrand::Rng::with_seed(seed),
    };
    let start = Instant::now();
    while fuzz.tally.packets < packets {
        match gen.rng.u16(..1000) {
            // Every truncation of a valid frame (about a tenth of the packets).
            0..=1 => {
                let frame = gen.frame();
                for len in 14..=frame.len() {
                    fuzz.run(&frame[..len]);
                }
            }
            2..=99 => fuzz.run(&gen.garbage()),
            100..=349 => fuzz.run(&gen.frame()),
            _ => {
                let mut frame = gen.frame();
                gen.mutate(&mut frame);
                fuzz.run(&frame);
            }
        }
    }
    let elapsed = start.elapsed();

    let decap = fuzz.f.decap_outcomes();
    let t = &fuzz.tally;
    println!(
        "{} packets through lb_ingress and lb_decap in {:.1} s (seed {seed:#x})",
        t.packets,
        elapsed.as_secs_f64()
    );
    let actions = |a: &[u64; 5]| {
        format!(
            "aborted {}, drop {}, pass {}, tx {}, redirect {}",
            a[0], a[1], a[2], a[3], a[4]
        )
    };
    println!("lb_ingress: {}", actions(&t.ingress));
    for o in Outcome::ALL {
        println!("  {:<24} {}", o.name(), fuzz.f.outcome(o));
    }
    println!("  with a second-chance option {}", t.with_option);
    println!("lb_decap: {}", actions(&t.decap));
    for o in DecapOutcome::ALL {
        println!("  {:<24} {}", o.name(), decap[o as usize].packets);
    }
    // `run` fails at the first XDP_ABORTED; this states the criterion.
    assert_eq!(
        t.ingress[XDP_ABORTED as usize] + t.decap[XDP_ABORTED as usize],
        0
    );
    // The generator reaches every path it is meant to exercise.
    if packets >= DEFAULT_PACKETS {
        for o in [
            Outcome::Forwarded,
            Outcome::IcmpForwarded,
            Outcome::PassNotIp,
            Outcome::PassNotVip,
            Outcome::PassMalformed,
            Outcome::DropMalformed,
            Outcome::DropFragment,
        ] {
            assert!(fuzz.f.outcome(o) > 0, "no packet {}", o.name());
        }
        for o in [
            DecapOutcome::Decapsulated,
            DecapOutcome::Passed,
            DecapOutcome::DroppedMalformed,
            DecapOutcome::SecondChance,
        ] {
            assert!(decap[o as usize].packets > 0, "no packet {}", o.name());
        }
        assert!(t.with_option > 0, "no packet with a second-chance option");
    }
}
