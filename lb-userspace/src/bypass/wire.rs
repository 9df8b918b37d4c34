//! The bypass instruction on the wire: one UDP datagram of fixed size from a
//! backend's host to a client's host intermediary, "this flow → this
//! backend" (or "forget this flow"), sealed with HMAC-SHA256.
//!
//! Layout (big-endian, 120 bytes):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `LBBY` |
//! | 4 | 1 | version (1) |
//! | 5 | 1 | kind: 1 bypass, 2 revoke |
//! | 6 | 2 | key id |
//! | 8 | 8 | timestamp, ms since the Unix epoch |
//! | 16 | 16 | nonce (random) |
//! | 32 | 1 | protocol (6 TCP, 17 UDP) |
//! | 33 | 3 | zero |
//! | 36 | 16 | client address (IPv4 as `::ffff:a.b.c.d`) |
//! | 52 | 2 | client port |
//! | 54 | 2 | VIP port |
//! | 56 | 16 | VIP address |
//! | 72 | 16 | backend address |
//! | 88 | 32 | HMAC-SHA256 of bytes 0..88 under the key named by the key id |
//!
//! Nothing in a datagram is trusted before its tag is checked, and the tag
//! covers every other byte.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

pub const MAGIC: [u8; 4] = *b"LBBY";
pub const VERSION: u8 = 1;
/// Bytes covered by the tag.
pub const SIGNED_LEN: usize = 88;
pub const TAG_LEN: usize = 32;
pub const LEN: usize = SIGNED_LEN + TAG_LEN;
pub const NONCE_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Send the rest of the flow straight to the backend.
    Bypass,
    /// Forget the flow's entry: its packets take the LB path again.
    Revoke,
}

/// A flow as the client sees it: client → VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub protocol: u8,
    pub client: SocketAddr,
    pub vip: SocketAddr,
}

/// What an instruction says, once its tag, age and nonce were checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instruction {
    pub kind: Kind,
    pub flow: Flow,
    pub backend: IpAddr,
}

/// The parts of a datagram before its tag is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Envelope {
    pub key_id: u16,
    pub timestamp_ms: u64,
    pub nonce: [u8; NONCE_LEN],
    pub instruction: Instruction,
}

/// Why a datagram is not an instruction at all (before any key is used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    Length(usize),
    Magic,
    Version(u8),
    Kind(u8),
    Protocol(u8),
    Reserved,
    /// Client and VIP of different address families, or a port of 0.
    Flow,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Malformed::Length(n) => write!(f, "{n} bytes, not {LEN}"),
            Malformed::Magic => write!(f, "not a bypass instruction (magic)"),
            Malformed::Version(v) => write!(f, "version {v}, this agent reads {VERSION}"),
            Malformed::Kind(k) => write!(f, "unknown kind {k}"),
            Malformed::Protocol(p) => write!(f, "protocol {p} is neither TCP nor UDP"),
            Malformed::Reserved => write!(f, "reserved bytes are not zero"),
            Malformed::Flow => write!(f, "the flow's addresses or ports are not usable"),
        }
    }
}

fn put_addr(out: &mut [u8], addr: IpAddr) {
    let v6 = match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    out.copy_from_slice(&v6.octets());
}

fn get_addr(bytes: &[u8]) -> IpAddr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(bytes);
    let v6 = Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

impl Envelope {
    /// The signed part (bytes 0..88).
    pub fn signed_bytes(&self) -> [u8; SIGNED_LEN] {
        let mut b = [0u8; SIGNED_LEN];
        let i = &self.instruction;
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = match i.kind {
            Kind::Bypass => 1,
            Kind::Revoke => 2,
        };
        b[6..8].copy_from_slice(&self.key_id.to_be_bytes());
        b[8..16].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        b[16..32].copy_from_slice(&self.nonce);
        b[32] = i.flow.protocol;
        put_addr(&mut b[36..52], i.flow.client.ip());
        b[52..54].copy_from_slice(&i.flow.client.port().to_be_bytes());
        b[54..56].copy_from_slice(&i.flow.vip.port().to_be_bytes());
        put_addr(&mut b[56..72], i.flow.vip.ip());
        put_addr(&mut b[72..88], i.backend);
        b
    }

    /// Reads the fields of a datagram of exactly `LEN` bytes; the tag is
    /// returned beside them, unchecked.
    pub fn parse(b: &[u8]) -> Result<(Envelope, &[u8]), Malformed> {
        if b.len() != LEN {
            return Err(Malformed::Length(b.len()));
        }
        if b[0..4] != MAGIC {
            return Err(Malformed::Magic);
        }
        if b[4] != VERSION {
            return Err(Malformed::Version(b[4]));
        }
        let kind = match b[5] {
            1 => Kind::Bypass,
            2 => Kind::Revoke,
            k => return Err(Malformed::Kind(k)),
        };
        let protocol = b[32];
        if protocol != 6 && protocol != 17 {
            return Err(Malformed::Protocol(protocol));
        }
        if b[33..36] != [0, 0, 0] {
            return Err(Malformed::Reserved);
        }
        let client = SocketAddr::new(get_addr(&b[36..52]), u16_at(b, 52));
        let vip = SocketAddr::new(get_addr(&b[56..72]), u16_at(b, 54));
        if client.is_ipv4() != vip.is_ipv4() || client.port() == 0 || vip.port() == 0 {
            return Err(Malformed::Flow);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[16..32]);
        let envelope = Envelope {
            key_id: u16_at(b, 6),
            timestamp_ms: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            nonce,
            instruction: Instruction {
                kind,
                flow: Flow {
                    protocol,
                    client,
                    vip,
                },
                backend: get_addr(&b[72..88]),
            },
        };
        Ok((envelope, &b[SIGNED_LEN..]))
    }
}
