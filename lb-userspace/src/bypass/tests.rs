use std::net::{IpAddr, SocketAddr};

use super::*;

const A: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
const NOW: u64 = 1_800_000_000_000;

fn ring(text: &str) -> KeyRing {
    KeyRing::parse(text).unwrap()
}

fn one_key(id: u16, secret: &str) -> KeyRing {
    ring(&format!("[[keys]]\nid = {id}\nsecret = \"{secret}\"\n"))
}

fn verifier(r: KeyRing) -> Verifier {
    Verifier::new(r, DEFAULT_WINDOW_MS, DEFAULT_MAX_NONCES)
}

fn instruction(client: &str, vip: &str, backend: &str) -> Instruction {
    Instruction {
        kind: Kind::Bypass,
        flow: Flow {
            protocol: 6,
            client: client.parse::<SocketAddr>().unwrap(),
            vip: vip.parse::<SocketAddr>().unwrap(),
        },
        backend: backend.parse::<IpAddr>().unwrap(),
    }
}

fn tcp4() -> Instruction {
    instruction("198.18.0.2:40000", "198.18.0.10:80", "198.18.1.11")
}

#[test]
fn sealed_instructions_come_back_unchanged() {
    let r = one_key(1, A);
    let sealer = Sealer::new(&r);
    let mut v = verifier(one_key(1, A));
    let cases = [
        tcp4(),
        instruction("[fd00::2]:40000", "[fd00::10]:443", "fd00:1::11"),
        // An IPv4 flow to an IPv6 backend.
        instruction("198.18.0.2:5353", "198.18.0.10:53", "fd00:1::12"),
        Instruction {
            kind: Kind::Revoke,
            ..tcp4()
        },
    ];
    for case in cases {
        let datagram = sealer.seal(case, NOW);
        assert_eq!(v.check(&datagram, NOW + 10), Ok(case));
    }
    assert_eq!(v.remembered(), 4);
}

#[test]
fn every_changed_byte_is_refused() {
    let r = one_key(1, A);
    let datagram = Sealer::new(&r).seal(tcp4(), NOW);
    for at in 0..datagram.len() {
        for flip in [0x01u8, 0x80] {
            let mut forged = datagram;
            forged[at] ^= flip;
            let mut v = verifier(one_key(1, A));
            let refusal = v.check(&forged, NOW).expect_err("a changed byte");
            assert!(
                matches!(
                    refusal,
                    Refusal::BadTag | Refusal::Malformed(_) | Refusal::UnknownKey(_)
                ),
                "byte {at}: {refusal}"
            );
            assert_eq!(v.remembered(), 0, "a refused datagram is not remembered");
        }
    }
}

#[test]
fn a_replay_is_refused_within_the_window_and_stale_after_it() {
    let r = one_key(1, A);
    let datagram = Sealer::new(&r).seal(tcp4(), NOW);
    let mut v = verifier(one_key(1, A));
    assert!(v.check(&datagram, NOW).is_ok());
    assert_eq!(v.check(&datagram, NOW + 1), Err(Refusal::Replayed));
    assert_eq!(
        v.check(&datagram, NOW + DEFAULT_WINDOW_MS),
        Err(Refusal::Replayed)
    );
    assert_eq!(
        v.check(&datagram, NOW + DEFAULT_WINDOW_MS + 1),
        Err(Refusal::Stale {
            skew_ms: DEFAULT_WINDOW_MS as i64 + 1
        })
    );
    // The nonce expired with the window.
    assert_eq!(v.remembered(), 0);
}

#[test]
fn instructions_from_the_future_or_the_past_are_stale() {
    let r = one_key(1, A);
    let sealer = Sealer::new(&r);
    let mut v = verifier(one_key(1, A));
    let future = sealer.seal(tcp4(), NOW + 60_000);
    assert_eq!(
        v.check(&future, NOW),
        Err(Refusal::Stale { skew_ms: -60_000 })
    );
    let ancient = sealer.seal(tcp4(), 0);
    assert!(matches!(v.check(&ancient, NOW), Err(Refusal::Stale { .. })));
    let far_future = sealer.seal(tcp4(), u64::MAX);
    assert!(matches!(
        v.check(&far_future, NOW),
        Err(Refusal::Stale { .. })
    ));
    assert_eq!(v.remembered(), 0);
}

#[test]
fn keys_are_checked_by_id_and_rotate() {
    let old = one_key(1, A);
    let datagram = Sealer::new(&old).seal(tcp4(), NOW);
    // Another secret under the same id: forged.
    assert_eq!(
        verifier(one_key(1, B)).check(&datagram, NOW),
        Err(Refusal::BadTag)
    );
    // An id the receiver does not have.
    assert_eq!(
        verifier(one_key(2, A)).check(&datagram, NOW),
        Err(Refusal::UnknownKey(1))
    );
    // During a rotation the receiver holds both keys: the old sender and
    // the new one (active 2) are both accepted.
    let both = format!("[[keys]]\nid = 1\nsecret = \"{A}\"\n[[keys]]\nid = 2\nsecret = \"{B}\"\n");
    let mut v = verifier(ring(&both));
    assert!(v.check(&datagram, NOW).is_ok());
    let new = ring(&both);
    assert_eq!(new.active(), 2);
    assert!(v.check(&Sealer::new(&new).seal(tcp4(), NOW), NOW).is_ok());
    // Once the old key is dropped, its instructions are refused.
    v.set_ring(one_key(2, B));
    let late = Sealer::new(&old).seal(tcp4(), NOW);
    assert_eq!(v.check(&late, NOW), Err(Refusal::UnknownKey(1)));
}

#[test]
fn a_full_nonce_memory_refuses_until_the_window_moves_on() {
    let r = one_key(1, A);
    let sealer = Sealer::new(&r);
    let mut v = Verifier::new(one_key(1, A), DEFAULT_WINDOW_MS, 3);
    for _ in 0..3 {
        assert!(v.check(&sealer.seal(tcp4(), NOW), NOW).is_ok());
    }
    assert_eq!(
        v.check(&sealer.seal(tcp4(), NOW), NOW),
        Err(Refusal::NoncesFull)
    );
    let later = NOW + DEFAULT_WINDOW_MS + 1;
    assert!(v.check(&sealer.seal(tcp4(), later), later).is_ok());
    assert_eq!(v.remembered(), 1);
}

#[test]
fn malformed_datagrams_are_refused_by_reason() {
    let r = one_key(1, A);
    let good = Sealer::new(&r).seal(tcp4(), NOW);
    let mut v = verifier(one_key(1, A));
    for len in [0, 1, wire::LEN - 1, wire::LEN + 1, 1500] {
        let mut d = good.to_vec();
        d.resize(len, 0);
        assert_eq!(
            v.check(&d, NOW),
            Err(Refusal::Malformed(Malformed::Length(len)))
        );
    }
    let with = |at: usize, value: u8| {
        let mut d = good;
        d[at] = value;
        d
    };
    let mut v = verifier(one_key(1, A));
    assert_eq!(
        v.check(&with(0, b'X'), NOW),
        Err(Refusal::Malformed(Malformed::Magic))
    );
    assert_eq!(
        v.check(&with(4, 2), NOW),
        Err(Refusal::Malformed(Malformed::Version(2)))
    );
    assert_eq!(
        v.check(&with(5, 9), NOW),
        Err(Refusal::Malformed(Malformed::Kind(9)))
    );
    assert_eq!(
        v.check(&with(32, 1), NOW),
        Err(Refusal::Malformed(Malformed::Protocol(1)))
    );
    assert_eq!(
        v.check(&with(34, 1), NOW),
        Err(Refusal::Malformed(Malformed::Reserved))
    );
    // The client's port 0.
    let mut d = good;
    d[52] = 0;
    d[53] = 0;
    assert_eq!(v.check(&d, NOW), Err(Refusal::Malformed(Malformed::Flow)));
    // An IPv6 client to an IPv4 VIP.
    let mixed = Sealer::new(&r).seal(
        instruction("[fd00::2]:40000", "198.18.0.10:80", "198.18.1.11"),
        NOW,
    );
    assert_eq!(
        v.check(&mixed, NOW),
        Err(Refusal::Malformed(Malformed::Flow))
    );
}

#[test]
fn random_datagrams_never_pass_and_never_panic() {
    let mut v = verifier(one_key(1, A));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let r = one_key(1, A);
    let good = Sealer::new(&r).seal(tcp4(), NOW);
    for i in 0..20_000 {
        let len = if i % 2 == 0 {
            wire::LEN
        } else {
            (next() % 200) as usize
        };
        // Half start from a valid header, so the checks past the form run.
        let mut d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 4 == 0 && len == wire::LEN {
            d[..36].copy_from_slice(&good[..36]);
        }
        assert!(v.check(&d, NOW).is_err());
    }
    assert_eq!(v.remembered(), 0);
}
