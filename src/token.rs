//! API bearer tokens, stored hashed.
//!
//! A token is `cap_<id>_<secret>`: the id (8 hex digits) names it in listings and
//! revocation; the whole token is hashed with SHA-256 and only the hash is stored, so the
//! database never holds a usable token. A token is shown once, when created.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::secret::Secret;
use crate::store::tokens::TokenRecords;
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone)]
pub struct Tokens {
    records: TokenRecords,
}

fn hash(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl Tokens {
    pub fn new(store: &Store) -> Result<Tokens, StoreError> {
        Ok(Tokens {
            records: TokenRecords::open(store)?,
        })
    }

    /// Creates a token; returns it (show it once) and its record.
    pub fn create(&self, name: &str) -> Result<(Secret, TokenInfo), StoreError> {
        let mut id = [0u8; 4];
        let mut secret = zeroize::Zeroizing::new([0u8; 24]);
        crate::vault::crypto::random_fill(&mut id);
        crate::vault::crypto::random_fill(&mut secret[..]);
        let token = Secret::from_str_owned(format!(
            "cap_{}_{}",
            hex::encode(id),
            hex::encode(&secret[..])
        ));
        let info = TokenInfo {
            id: hex::encode(id),
            name: name.to_string(),
            created_at: Utc::now(),
        };
        self.records.put(&hash(token.expose()), &info)?;
        Ok((token, info))
    }

    /// Looks a presented token up by its hash.
    pub fn verify(&self, presented: &[u8]) -> Result<Option<TokenInfo>, StoreError> {
        if !presented.starts_with(b"cap_") {
            return Ok(None);
        }
        self.records.get(&hash(presented))
    }

    pub fn list(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let mut v = self.records.list()?;
        v.sort_by_key(|a| a.created_at);
        Ok(v)
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Revokes every token whose id or name is `id_or_name`; returns how many.
    pub fn revoke(&self, id_or_name: &str) -> Result<usize, StoreError> {
        self.records
            .remove_where(|info| info.id == id_or_name || info.name == id_or_name)
    }
}
