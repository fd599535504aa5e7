//! Notifier channel records ([`super::NOTIFIERS`]): what the operator named a channel,
//! which service it reaches and where, and when it was added — never its URL, which holds
//! the service's token and is sealed in the vault (see [`crate::notify`]).

use super::{NOTIFIERS, Store, StoreError, decode, encode};
use crate::notify::NotifierInfo;

/// The stored notifier channels.
#[derive(Clone)]
pub struct NotifierRecords {
    tree: sled::Tree,
}

impl NotifierRecords {
    pub fn open(store: &Store) -> Result<NotifierRecords, StoreError> {
        Ok(NotifierRecords {
            tree: store.open_tree(NOTIFIERS)?,
        })
    }

    /// Every channel, by name.
    pub fn list(&self) -> Result<Vec<NotifierInfo>, StoreError> {
        self.tree
            .iter()
            .map(|r| {
                let (k, v) = r?;
                decode(&k, &v)
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<Option<NotifierInfo>, StoreError> {
        match self.tree.get(name.as_bytes())? {
            Some(v) => Ok(Some(decode(name.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Stores a channel's record, replacing one of the same name.
    pub fn put(&self, info: &NotifierInfo) -> Result<(), StoreError> {
        self.tree.insert(info.name.as_bytes(), encode(info))?;
        Ok(())
    }

    /// Removes a channel's record; whether there was one.
    pub fn remove(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.tree.remove(name.as_bytes())?.is_some())
    }
}
