//! Server tokens at rest: sealed with AES-256-GCM under a 32-byte key from a secret Spin
//! variable (`token_seal_key`, base64). Only the apple component is given that variable, so only
//! it can unseal. The account id is bound in as associated data, so a sealed token copied to
//! another account's key does not open.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use std::fmt;

/// Prefix of a sealed value: format version 1, so the format can change later.
const PREFIX: &str = "v1.";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealError {
    /// The key variable is not 32 bytes of base64.
    BadKey,
    /// The sealed value is damaged, sealed under another key, or for another account.
    CannotOpen,
    NoRandomness,
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SealError::BadKey => "token_seal_key must be 32 random bytes, base64-encoded",
            SealError::CannotOpen => "sealed token cannot be opened with this key",
            SealError::NoRandomness => "no randomness available for a nonce",
        })
    }
}

impl std::error::Error for SealError {}

pub struct SealKey(Aes256Gcm);

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    pub fn from_base64(text: &str) -> Result<SealKey, SealError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| SealError::BadKey)?;
        if bytes.len() != 32 {
            return Err(SealError::BadKey);
        }
        Aes256Gcm::new_from_slice(&bytes)
            .map(SealKey)
            .map_err(|_| SealError::BadKey)
    }

    pub fn seal(&self, account: &str, secret: &str) -> Result<String, SealError> {
        let mut nonce = [0u8; 12];
        getrandom::getrandom(&mut nonce).map_err(|_| SealError::NoRandomness)?;
        let ct = self
            .0
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: account.as_bytes(),
                },
            )
            .map_err(|_| SealError::CannotOpen)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(format!("{PREFIX}{}", STANDARD.encode(out)))
    }

    pub fn open(&self, account: &str, sealed: &str) -> Result<String, SealError> {
        let body = sealed.strip_prefix(PREFIX).ok_or(SealError::CannotOpen)?;
        let raw = STANDARD.decode(body).map_err(|_| SealError::CannotOpen)?;
        if raw.len() < 12 + 16 {
            return Err(SealError::CannotOpen);
        }
        let (nonce, ct) = raw.split_at(12);
        let pt = self
            .0
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: account.as_bytes(),
                },
            )
            .map_err(|_| SealError::CannotOpen)?;
        String::from_utf8(pt).map_err(|_| SealError::CannotOpen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SealKey {
        SealKey::from_base64(&STANDARD.encode([byte; 32])).unwrap()
    }

    #[test]
    fn round_trip_and_no_clear_text() {
        let k = key(7);
        let sealed = k.seal("acct-1", "c2VjcmV0LXRva2Vu").unwrap();
        assert!(!sealed.contains("c2VjcmV0LXRva2Vu"));
        assert_eq!(k.open("acct-1", &sealed).unwrap(), "c2VjcmV0LXRva2Vu");
        // A fresh nonce each time.
        assert_ne!(sealed, k.seal("acct-1", "c2VjcmV0LXRva2Vu").unwrap());
    }

    #[test]
    fn wrong_key_account_or_damage_fails() {
        let sealed = key(7).seal("acct-1", "secret").unwrap();
        assert_eq!(key(8).open("acct-1", &sealed), Err(SealError::CannotOpen));
        assert_eq!(key(7).open("acct-2", &sealed), Err(SealError::CannotOpen));
        let mut damaged = sealed.clone();
        damaged.pop();
        damaged.push('A');
        assert!(key(7).open("acct-1", &damaged).is_err());
        assert_eq!(key(7).open("acct-1", "plain"), Err(SealError::CannotOpen));
    }

    #[test]
    fn bad_keys_are_refused() {
        assert_eq!(
            SealKey::from_base64("short").unwrap_err(),
            SealError::BadKey
        );
        assert_eq!(
            SealKey::from_base64(&STANDARD.encode([1u8; 16])).unwrap_err(),
            SealError::BadKey
        );
        assert_eq!(format!("{:?}", key(1)), "SealKey(..)");
    }
}
