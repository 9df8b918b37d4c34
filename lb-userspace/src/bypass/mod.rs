//! Bypass instructions between hosts: a backend's host tells a client's host
//! intermediary to send the rest of a flow straight to the backend.
//!
//! - `wire`: the datagram's fixed layout.
//! - `keys`: the key ring (key file, ids for rotation), HMAC-SHA256.
//! - here: sealing an instruction, and the receiver's checks in order:
//!   form, key, tag, age (the replay window), nonce (not seen within the
//!   window). An instruction refused at any step changes nothing, and the
//!   refusal is counted by its reason.
//!
//! - `intermediary`: what the source intermediary checks next (a flow it
//!   sent, a backend in the VIP's current set) and the entry it writes.

pub mod intermediary;
pub mod keys;
pub mod wire;

use std::collections::BTreeSet;

use ring::rand::{SecureRandom as _, SystemRandom};

pub use keys::KeyRing;
use wire::{Envelope, NONCE_LEN};
pub use wire::{Flow, Instruction, Kind, Malformed};

/// Instructions older or newer than this (by their timestamp against the
/// receiver's clock) are refused as stale; hosts' clocks must agree within it.
pub const DEFAULT_WINDOW_MS: u64 = crate::config::DEFAULT_BYPASS_WINDOW_MS;
/// Nonces remembered at most: at the window's end they expire. A receiver
/// whose memory is full refuses (and counts) rather than forget a nonce
/// still inside the window.
pub const DEFAULT_MAX_NONCES: usize = 1 << 20;

/// Why an instruction was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Malformed(Malformed),
    UnknownKey(u16),
    /// Forged, or sealed with another secret under the same key id.
    BadTag,
    /// Outside the replay window; `skew_ms` is its age (negative: from the
    /// future).
    Stale {
        skew_ms: i64,
    },
    Replayed,
    /// The nonce memory is full of nonces still inside the window.
    NoncesFull,
    /// A flow this host did not send toward the LB (or no longer remembers).
    UnknownFlow,
    /// A backend not in the VIP's current set, or a VIP without bypass.
    WrongBackend,
    /// The datapath's tables could not be read or written (full?).
    Datapath,
}

impl Refusal {
    /// The counter's name for this reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::UnknownKey(_) => "unknown_key",
            Refusal::BadTag => "bad_tag",
            Refusal::Stale { .. } => "stale",
            Refusal::Replayed => "replayed",
            Refusal::NoncesFull => "nonces_full",
            Refusal::UnknownFlow => "unknown_flow",
            Refusal::WrongBackend => "wrong_backend",
            Refusal::Datapath => "datapath",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Malformed(m) => write!(f, "malformed: {m}"),
            Refusal::UnknownKey(id) => write!(f, "key id {id} is not in the key ring"),
            Refusal::BadTag => write!(f, "the tag does not match: forged or wrong secret"),
            Refusal::Stale { skew_ms } => {
                write!(f, "timestamp {skew_ms} ms away from this host's clock")
            }
            Refusal::Replayed => write!(f, "nonce already seen: a replay"),
            Refusal::NoncesFull => write!(f, "too many instructions within the window"),
            Refusal::UnknownFlow => write!(f, "a flow this host did not send"),
            Refusal::WrongBackend => write!(
                f,
                "the backend is not in the VIP's current set (or the VIP has no bypass)"
            ),
            Refusal::Datapath => write!(f, "the bypass table could not be written"),
        }
    }
}

/// Seals instructions with the ring's active key, a fresh random nonce and
/// the time given.
pub struct Sealer<'a> {
    ring: &'a KeyRing,
    random: SystemRandom,
}

impl<'a> Sealer<'a> {
    pub fn new(ring: &'a KeyRing) -> Self {
        Sealer {
            ring,
            random: SystemRandom::new(),
        }
    }

    pub fn seal(&self, instruction: Instruction, now_ms: u64) -> [u8; wire::LEN] {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .expect("the system's random source");
        seal_with(self.ring, instruction, now_ms, nonce)
    }
}

fn seal_with(
    ring: &KeyRing,
    instruction: Instruction,
    now_ms: u64,
    nonce: [u8; NONCE_LEN],
) -> [u8; wire::LEN] {
    let envelope = Envelope {
        key_id: ring.active(),
        timestamp_ms: now_ms,
        nonce,
        instruction,
    };
    let signed = envelope.signed_bytes();
    let mut out = [0u8; wire::LEN];
    out[..wire::SIGNED_LEN].copy_from_slice(&signed);
    out[wire::SIGNED_LEN..].copy_from_slice(ring.sign(&signed).as_ref());
    out
}

/// The receiving side: checks datagrams and remembers the nonces of those
/// it accepted until they leave the window.
pub struct Verifier {
    ring: KeyRing,
    window_ms: u64,
    max_nonces: usize,
    /// (timestamp, nonce) of accepted instructions. A replay carries the
    /// same timestamp (the tag covers it), so the pair finds it.
    seen: BTreeSet<(u64, [u8; NONCE_LEN])>,
}

impl Verifier {
    pub fn new(ring: KeyRing, window_ms: u64, max_nonces: usize) -> Self {
        Verifier {
            ring,
            window_ms,
            max_nonces,
            seen: BTreeSet::new(),
        }
    }

    /// Replaces the key ring (rotation); remembered nonces stay.
    pub fn set_ring(&mut self, ring: KeyRing) {
        self.ring = ring;
    }

    /// Checks one datagram received at `now_ms`. Nothing is remembered
    /// unless it is accepted, so forged datagrams cannot fill the memory.
    pub fn check(&mut self, datagram: &[u8], now_ms: u64) -> Result<Instruction, Refusal> {
        let (envelope, tag) = Envelope::parse(datagram).map_err(Refusal::Malformed)?;
        let signed = &datagram[..wire::SIGNED_LEN];
        match self.ring.verify(envelope.key_id, signed, tag) {
            None => return Err(Refusal::UnknownKey(envelope.key_id)),
            Some(false) => return Err(Refusal::BadTag),
            Some(true) => {}
        }
        self.forget_before(now_ms.saturating_sub(self.window_ms));
        let skew_ms = now_ms as i128 - envelope.timestamp_ms as i128;
        if skew_ms.unsigned_abs() > self.window_ms as u128 {
            let skew_ms = skew_ms.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
            return Err(Refusal::Stale { skew_ms });
        }
        let entry = (envelope.timestamp_ms, envelope.nonce);
        if self.seen.contains(&entry) {
            return Err(Refusal::Replayed);
        }
        if self.seen.len() >= self.max_nonces {
            return Err(Refusal::NoncesFull);
        }
        self.seen.insert(entry);
        Ok(envelope.instruction)
    }

    /// Nonces of instructions older than `oldest` are refused as stale
    /// anyway: they need not be remembered.
    fn forget_before(&mut self, oldest: u64) {
        self.seen = self.seen.split_off(&(oldest, [0u8; NONCE_LEN]));
    }

    pub fn remembered(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests;
