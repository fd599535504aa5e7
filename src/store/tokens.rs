//! API token records ([`super::API_TOKENS`]): the SHA-256 of each token → what it is.

use super::{API_TOKENS, Store, StoreError, decode, encode};
use crate::token::TokenInfo;

/// The stored tokens, by the hash of each.
#[derive(Clone)]
pub struct TokenRecords {
    tree: sled::Tree,
}

impl TokenRecords {
    pub fn open(store: &Store) -> Result<TokenRecords, StoreError> {
        Ok(TokenRecords {
            tree: store.open_tree(API_TOKENS)?,
        })
    }

    /// Stores a token's record under its hash, durably.
    pub fn put(&self, hash: &[u8; 32], info: &TokenInfo) -> Result<(), StoreError> {
        self.tree.insert(hash, encode(info))?;
        self.tree.flush()?;
        Ok(())
    }

    pub fn get(&self, hash: &[u8; 32]) -> Result<Option<TokenInfo>, StoreError> {
        match self.tree.get(hash)? {
            Some(bytes) => Ok(Some(decode(hash, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Every token's record, in hash order.
    pub fn list(&self) -> Result<Vec<TokenInfo>, StoreError> {
        self.tree
            .iter()
            .map(|r| {
                let (k, b) = r?;
                decode(&k, &b)
            })
            .collect()
    }

    /// Every token's hash and record, in hash order (what cluster mode replicates: the
    /// hash, never the token).
    pub fn entries(&self) -> Result<Vec<([u8; 32], TokenInfo)>, StoreError> {
        self.tree
            .iter()
            .map(|r| {
                let (k, b) = r?;
                let hash: [u8; 32] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    key: hex::encode(&k),
                    reason: "a token key is not a 32-byte hash".into(),
                })?;
                Ok((hash, decode(&k, &b)?))
            })
            .collect()
    }

    /// Removes the token with `hash`, durably; whether there was one.
    pub fn remove(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        let had = self.tree.remove(hash)?.is_some();
        self.tree.flush()?;
        Ok(had)
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Removes every token whose record `revoke` picks, durably; returns how many.
    pub fn remove_where(&self, revoke: impl Fn(&TokenInfo) -> bool) -> Result<usize, StoreError> {
        let mut n = 0;
        for r in self.tree.iter() {
            let (k, b) = r?;
            let info: TokenInfo = decode(&k, &b)?;
            if revoke(&info) {
                self.tree.remove(k)?;
                n += 1;
            }
        }
        self.tree.flush()?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_written_in_the_existing_encoding_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let info = TokenInfo::internal("0a1b2c3d", "ci", crate::token::Role::Viewer);
        let hash = [7u8; 32];
        store
            .tree("api_tokens")
            .unwrap()
            .insert(hash, serde_json::to_vec(&info).unwrap())
            .unwrap();
        let records = TokenRecords::open(&store).unwrap();
        assert_eq!(records.get(&hash).unwrap(), Some(info.clone()));
        assert_eq!(records.list().unwrap(), std::slice::from_ref(&info));
        assert!(!records.is_empty());
        let other = TokenInfo {
            name: "other".into(),
            ..info.clone()
        };
        records.put(&[9u8; 32], &other).unwrap();
        let raw = store.tree("api_tokens").unwrap().get([9u8; 32]).unwrap();
        assert_eq!(raw.unwrap().to_vec(), serde_json::to_vec(&other).unwrap());
        assert_eq!(records.remove_where(|i| i.name == "ci").unwrap(), 1);
        assert_eq!(records.list().unwrap(), [other]);
    }

    #[test]
    fn a_token_record_from_before_roles_reads_back_as_admin_of_every_device() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let hash = [3u8; 32];
        store
            .tree("api_tokens")
            .unwrap()
            .insert(
                hash,
                &br#"{"id":"0a1b2c3d","name":"old","created_at":"2026-01-02T03:04:05Z"}"#[..],
            )
            .unwrap();
        let info = TokenRecords::open(&store)
            .unwrap()
            .get(&hash)
            .unwrap()
            .unwrap();
        assert_eq!(info.role, crate::token::Role::Admin);
        assert!(info.devices.is_empty());
        assert!(info.sees_device("anything"));
        assert!(info.allows(crate::token::Role::Admin));
    }
}
