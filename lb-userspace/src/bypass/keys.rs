//! The keys that seal bypass instructions: a key ring read from a key file
//! (or, in a fleet, from the store), each key with an id so that keys can be
//! rotated: a sender seals with the active key, a receiver accepts every key
//! of its ring.
//!
//! ```toml
//! active = 2
//! [[keys]]
//! id = 1
//! secret = "…64 hex digits or more…"   # openssl rand -hex 32
//! [[keys]]
//! id = 2
//! secret = "…"
//! ```

use std::collections::BTreeMap;

use ring::hmac;
use serde::Deserialize;

use crate::config::ConfigError;

/// Shortest secret accepted: HMAC-SHA256's own block of 32 bytes.
pub const MIN_SECRET_BYTES: usize = 32;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRing {
    active: Option<u16>,
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: u16,
    secret: String,
}

pub struct KeyRing {
    keys: BTreeMap<u16, hmac::Key>,
    active: u16,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("KeyRing")
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish()
    }
}

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field: field.into(),
        message: message.into(),
    })
}

impl KeyRing {
    /// Reads a key file's text: at least one key, unique ids, secrets of at
    /// least 32 bytes in hex; `active` (default: the highest id) must be one
    /// of them.
    pub fn parse(text: &str) -> Result<KeyRing, ConfigError> {
        let raw: RawRing =
            toml::from_str(text).or_else(|e| err("keys", e.message().to_string()))?;
        if raw.keys.is_empty() {
            return err("keys", "at least one key is needed");
        }
        let mut keys = BTreeMap::new();
        for (i, k) in raw.keys.iter().enumerate() {
            let secret = hex::decode(k.secret.trim())
                .or_else(|e| err(format!("keys[{i}].secret"), format!("not hex: {e}")))?;
            if secret.len() < MIN_SECRET_BYTES {
                return err(
                    format!("keys[{i}].secret"),
                    format!(
                        "{} bytes; at least {MIN_SECRET_BYTES} are needed (openssl rand -hex 32)",
                        secret.len()
                    ),
                );
            }
            if keys
                .insert(k.id, hmac::Key::new(hmac::HMAC_SHA256, &secret))
                .is_some()
            {
                return err(format!("keys[{i}].id"), format!("{} is used twice", k.id));
            }
        }
        let active = raw
            .active
            .unwrap_or_else(|| *keys.keys().last().expect("one key"));
        if !keys.contains_key(&active) {
            return err(
                "active",
                format!("{active} is not the id of a key in the file"),
            );
        }
        Ok(KeyRing { keys, active })
    }

    pub fn active(&self) -> u16 {
        self.active
    }

    /// The tag of `signed` under the active key.
    pub(crate) fn sign(&self, signed: &[u8]) -> hmac::Tag {
        hmac::sign(&self.keys[&self.active], signed)
    }

    /// Whether the key `id` is in the ring and `tag` is its tag of `signed`
    /// (compared in constant time). `None`: no such key.
    pub(crate) fn verify(&self, id: u16, signed: &[u8], tag: &[u8]) -> Option<bool> {
        let key = self.keys.get(&id)?;
        Some(hmac::verify(key, signed, tag).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    #[test]
    fn a_ring_takes_the_highest_id_as_active_by_default() {
        let ring = KeyRing::parse(&format!(
            "[[keys]]\nid = 1\nsecret = \"{A}\"\n[[keys]]\nid = 7\nsecret = \"{B}\"\n"
        ))
        .unwrap();
        assert_eq!(ring.active(), 7);
        let tag = ring.sign(b"flow");
        assert_eq!(ring.verify(7, b"flow", tag.as_ref()), Some(true));
        assert_eq!(ring.verify(1, b"flow", tag.as_ref()), Some(false));
        assert_eq!(ring.verify(2, b"flow", tag.as_ref()), None);
        assert!(!format!("{ring:?}").contains("0011"));
    }

    #[test]
    fn bad_key_files_name_the_field() {
        let cases = [
            ("keys = []\n".to_string(), "keys"),
            (
                format!("[[keys]]\nid = 1\nsecret = \"zz{A}\"\n"),
                "keys[0].secret",
            ),
            (
                format!("[[keys]]\nid = 1\nsecret = \"{}\"\n", &A[..62]),
                "keys[0].secret",
            ),
            (
                format!("[[keys]]\nid = 1\nsecret = \"{A}\"\n[[keys]]\nid = 1\nsecret = \"{B}\"\n"),
                "keys[1].id",
            ),
            (
                format!("active = 3\n[[keys]]\nid = 1\nsecret = \"{A}\"\n"),
                "active",
            ),
            (format!("[[keys]]\nid = 70000\nsecret = \"{A}\"\n"), "keys"),
            (
                format!("[[keys]]\nid = 1\nsecret = \"{A}\"\nextra = 1\n"),
                "keys",
            ),
        ];
        for (text, field) in cases {
            let e = KeyRing::parse(&text).expect_err(&text);
            assert_eq!(e.field, field, "{text}: {e}");
        }
    }
}
