//! The sealing primitive and key derivation, kept apart from storage so each is testable.
//!
//! A sealed value is `version(1) || nonce(24) || ciphertext+tag` under XChaCha20-Poly1305,
//! with a fresh random nonce per seal. The associated data is supplied by the caller and
//! binds the record's identity, so a ciphertext copied onto another record does not open.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::secret::Secret;

const SEAL_VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
pub const KEY_LEN: usize = 32;

/// A 256-bit symmetric key, wiped on drop.
pub struct SymKey(Zeroizing<[u8; KEY_LEN]>);

impl SymKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        SymKey(Zeroizing::new(bytes))
    }

    pub fn random() -> Self {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        random_fill(&mut k[..]);
        SymKey(k)
    }

    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&Key::from(*self.0))
    }

    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        random_fill(&mut nonce);
        let ct = self
            .cipher()
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a sealed value; `None` when the key, the associated data or the bytes are wrong.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Secret> {
        if sealed.len() < 1 + NONCE_LEN || sealed[0] != SEAL_VERSION {
            return None;
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[1..1 + NONCE_LEN]);
        self.cipher()
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &sealed[1 + NONCE_LEN..],
                    aad,
                },
            )
            .ok()
            .map(Secret::new)
    }
}

impl std::fmt::Debug for SymKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SymKey(***)")
    }
}

pub fn random_fill(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random source failed");
}

/// Argon2id parameters, stored in the vault header next to the salt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Argon2Params {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes over memory.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Argon2Params {
    /// The floor the vault accepts: 64 MiB and 3 passes.
    pub const MINIMUM: Argon2Params = Argon2Params {
        m_cost_kib: 64 * 1024,
        t_cost: 3,
        p_cost: 1,
    };
    /// What new vaults use.
    pub const DEFAULT: Argon2Params = Argon2Params {
        m_cost_kib: 64 * 1024,
        t_cost: 3,
        p_cost: 4,
    };

    pub fn is_at_least_minimum(&self) -> bool {
        self.m_cost_kib >= Self::MINIMUM.m_cost_kib && self.t_cost >= Self::MINIMUM.t_cost
    }
}

pub fn derive_key(passphrase: &Secret, salt: &[u8], p: Argon2Params) -> Result<SymKey, String> {
    let params = argon2::Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(KEY_LEN))
        .map_err(|e| format!("invalid Argon2id parameters: {e}"))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    argon
        .hash_password_into(passphrase.expose(), salt, &mut out[..])
        .map_err(|e| format!("Argon2id key derivation failed: {e}"))?;
    Ok(SymKey(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_value_opens_only_with_the_same_key_and_associated_data() {
        let k = SymKey::random();
        let sealed = k.seal(b"top secret", b"device/1/password");
        assert_eq!(
            k.open(&sealed, b"device/1/password").unwrap().expose(),
            b"top secret"
        );
        assert!(k.open(&sealed, b"device/2/password").is_none());
        assert!(
            SymKey::random()
                .open(&sealed, b"device/1/password")
                .is_none()
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(k.open(&tampered, b"device/1/password").is_none());
    }

    #[test]
    fn every_seal_uses_a_fresh_nonce() {
        let k = SymKey::random();
        assert_ne!(k.seal(b"x", b""), k.seal(b"x", b""));
    }
}
