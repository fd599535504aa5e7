//! The vault as versions before the vault file kept it, in the database: read once at
//! open so that [`crate::vault`] can move it into its file, after which the store
//! compacts these trees away.
//!
//! Layout ([`super::LEGACY_VAULT`], [`super::LEGACY_SECRETS_PREFIX`]): the header as
//! JSON under key `header` in tree `vault`, and the sealed secrets of key generation N
//! in tree `secrets.g<N>`, secret name → ciphertext.

use std::collections::BTreeMap;

use super::{LEGACY_SECRETS_PREFIX, LEGACY_VAULT, StoreError};

const HEADER_KEY: &[u8] = b"header";

/// What an older version's vault left in the database.
#[derive(Debug)]
pub struct LegacyVault {
    /// Every legacy tree present, for the compaction to leave behind.
    trees: Vec<sled::IVec>,
    /// The header's JSON, when tree `vault` holds one.
    pub header: Option<Vec<u8>>,
    /// The sealed secrets of each key generation whose tree is present.
    pub secrets: BTreeMap<u64, BTreeMap<String, Vec<u8>>>,
}

impl LegacyVault {
    /// The legacy trees of `db`, read; `None` when there are none.
    pub(crate) fn read(db: &sled::Db) -> Result<Option<LegacyVault>, StoreError> {
        let prefix = LEGACY_SECRETS_PREFIX.name.as_bytes();
        let trees: Vec<sled::IVec> = db
            .tree_names()
            .into_iter()
            .filter(|n| &n[..] == LEGACY_VAULT.name.as_bytes() || n.starts_with(prefix))
            .collect();
        if trees.is_empty() {
            return Ok(None);
        }
        let has_meta = trees.iter().any(|n| &n[..] == LEGACY_VAULT.name.as_bytes());
        let header = if has_meta {
            db.open_tree(LEGACY_VAULT.name)?
                .get(HEADER_KEY)?
                .map(|v| v.to_vec())
        } else {
            None
        };
        let mut secrets = BTreeMap::new();
        if header.is_some() {
            for name in &trees {
                let Some(generation) = std::str::from_utf8(&name[..])
                    .ok()
                    .and_then(|n| n.strip_prefix(LEGACY_SECRETS_PREFIX.name))
                    .and_then(|g| g.parse::<u64>().ok())
                else {
                    continue;
                };
                let mut sealed = BTreeMap::new();
                for item in db.open_tree(name)?.iter() {
                    let (k, v) = item?;
                    sealed.insert(String::from_utf8_lossy(&k).into_owned(), v.to_vec());
                }
                secrets.insert(generation, sealed);
            }
        }
        Ok(Some(LegacyVault {
            trees,
            header,
            secrets,
        }))
    }

    /// The legacy trees, for the compaction to leave behind.
    pub(crate) fn trees(&self) -> &[sled::IVec] {
        &self.trees
    }
}
