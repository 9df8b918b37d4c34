//! Frame builders for fixtures, written from the RFCs rather than from the
//! datapath, so expected outputs are independent of the code under test.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

pub fn eth(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 header fields fixtures vary; `options` must be a multiple of 4 bytes.
#[derive(Clone, Copy)]
pub struct V4Fields<'a> {
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub options: &'a [u8],
}

impl Default for V4Fields<'_> {
    fn default() -> Self {
        V4Fields {
            id: 1,
            frag_off: 0,
            ttl: 64,
            options: &[],
        }
    }
}

pub fn ipv4_full(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    fields: V4Fields<'_>,
    payload: &[u8],
) -> Vec<u8> {
    let V4Fields {
        id,
        frag_off,
        ttl,
        options,
    } = fields;
    assert_eq!(options.len() % 4, 0);
    let ihl = 5 + options.len() / 4;
    let tot = (ihl * 4 + payload.len()) as u16;
    let mut h = vec![0x40 | ihl as u8, 0];
    h.extend_from_slice(&tot.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag_off.to_be_bytes());
    h.extend_from_slice(&[ttl, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(options);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_full(src, dst, proto, V4Fields::default(), payload)
}

pub fn ipv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next: u8,
    flow_label: u32,
    hop_limit: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut h = (0x6000_0000u32 | (flow_label & 0xfffff))
        .to_be_bytes()
        .to_vec();
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, hop_limit]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// A TCP header without options (checksum left zero: the datapath never checks it).
pub fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&1u32.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&[0x50, flags]);
    t.extend_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}

/// A TCP header with `options` (a multiple of 4 bytes), checksum left zero.
pub fn tcp_with_options(
    sport: u16,
    dport: u16,
    flags: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let mut t = tcp(sport, dport, flags, b"");
    t[12] = (((20 + options.len()) / 4) << 4) as u8;
    t.extend_from_slice(options);
    t.extend_from_slice(payload);
    t
}

/// The pseudo-header of RFC 793 (IPv4) or RFC 8200 8.1 (IPv6) for an
/// upper-layer packet of `len` bytes.
pub fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed address families"),
    }
    p
}

/// Fills in the checksum of an upper-layer packet (TCP, UDP, ICMPv6) at
/// `at` bytes into it, over the pseudo-header and the packet.
pub fn with_checksum(src: IpAddr, dst: IpAddr, proto: u8, at: usize, packet: &[u8]) -> Vec<u8> {
    let mut p = packet.to_vec();
    p[at..at + 2].copy_from_slice(&[0, 0]);
    let mut all = pseudo_header(src, dst, proto, p.len());
    all.extend_from_slice(&p);
    let c = checksum(&all);
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
    p
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// ICMP destination unreachable, fragmentation needed, quoting `original`.
pub fn icmp_frag_needed(mtu: u16, original: &[u8]) -> Vec<u8> {
    let mut m = vec![3, 4, 0, 0, 0, 0];
    m.extend_from_slice(&mtu.to_be_bytes());
    m.extend_from_slice(original);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// ICMPv6 packet too big, quoting `original` (checksum left zero: see
/// `with_checksum`).
pub fn icmp6_too_big(mtu: u32, original: &[u8]) -> Vec<u8> {
    let mut m = vec![2, 0, 0, 0];
    m.extend_from_slice(&mtu.to_be_bytes());
    m.extend_from_slice(original);
    m
}

/// The outer IPv4 header the balancer puts in front of `inner` (RFC 2003):
/// DF set, id 0, TTL 64.
pub fn encap_ipv4(src: Ipv4Addr, dst: Ipv4Addr, inner_proto: u8, inner: &[u8]) -> Vec<u8> {
    ipv4_full(
        src,
        dst,
        inner_proto,
        V4Fields {
            id: 0,
            frag_off: 0x4000,
            ..V4Fields::default()
        },
        inner,
    )
}
