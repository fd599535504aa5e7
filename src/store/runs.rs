//! Run history ([`super::RUNS`], [`super::RUNS_BY_PLUGIN`], [`super::RUNS_ACTIVE`]): the
//! run records, the per-plugin index for newest-first listing, and the index of queued
//! and running runs, so crash recovery does not scan the history.
//!
//! The hot operations — a new run, a run's final record, a removal — are plain writes
//! in an order that leaves nothing a crash could make inconsistent (each says which),
//! not transactions: a sled transaction holds a lock that every other operation of the
//! database waits for. Only [`RunHistory::update`], which reads a record to change it
//! (runs left by an earlier process), is a transaction.

use std::collections::HashMap;
use std::sync::Arc;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::commit::{Entry, GroupCommit};
use super::{RUNS, RUNS_ACTIVE, RUNS_BY_PLUGIN, Store, StoreError, decode, encode};
use crate::runs::{RunId, RunRecord};

/// The stored run history. Cheap to clone.
#[derive(Clone)]
pub struct RunHistory {
    runs: sled::Tree,
    by_plugin: sled::Tree,
    active: sled::Tree,
    journal: Arc<GroupCommit>,
}

fn plugin_key(plugin: &str, id: &RunId) -> Vec<u8> {
    let mut k = Vec::with_capacity(plugin.len() + 17);
    k.extend_from_slice(plugin.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn plugin_prefix(plugin: &str) -> Vec<u8> {
    let mut k = plugin.as_bytes().to_vec();
    k.push(0);
    k
}

impl RunHistory {
    pub fn open(store: &Store) -> Result<RunHistory, StoreError> {
        Ok(RunHistory {
            runs: store.open_tree(RUNS)?,
            by_plugin: store.open_tree(RUNS_BY_PLUGIN)?,
            active: store.open_tree(RUNS_ACTIVE)?,
            journal: store.journal(),
        })
    }

    /// How many records each plugin has, counted from the plugin index.
    pub fn count_per_plugin(&self) -> Result<HashMap<String, usize>, StoreError> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for key in self.by_plugin.iter().keys() {
            let key = key?;
            if let Some(nul) = key.iter().position(|b| *b == 0) {
                *counts
                    .entry(String::from_utf8_lossy(&key[..nul]).into_owned())
                    .or_default() += 1;
            }
        }
        Ok(counts)
    }

    /// Stores a new (active) run: its active and plugin index entries, then the record.
    ///
    /// Three plain writes, not a transaction (a sled transaction serialises every
    /// other operation of the database while it runs). They are made in this order
    /// because sled recovers a prefix of its log after a crash: a crash between them
    /// leaves an active entry without a record, which crash recovery drops
    /// ([`RunHistory::forget_active`]), or an index entry without a record, which
    /// listings skip and retention removes; never a record that is not indexed.
    ///
    /// The three writes are then journaled (in the same order), so that
    /// [`Store::durable`] covers them.
    pub fn insert(&self, record: &RunRecord) -> Result<(), StoreError> {
        let id = record.id;
        let key = &id.as_bytes()[..];
        let plugin = record.plugin.as_bytes();
        let indexed = plugin_key(&record.plugin, &id);
        let value = sled::IVec::from(encode(record));
        self.active.insert(key, plugin)?;
        self.by_plugin.insert(indexed.as_slice(), &[][..])?;
        self.runs.insert(key, value.clone())?;
        self.journal.append(&[
            Entry {
                tree: RUNS_ACTIVE,
                key,
                value: plugin,
            },
            Entry {
                tree: RUNS_BY_PLUGIN,
                key: &indexed,
                value: &[],
            },
            Entry {
                tree: RUNS,
                key,
                value: &value,
            },
        ]);
        Ok(())
    }

    /// Writes an ended run's final record, then takes it out of the active index (a
    /// crash between leaves an active entry on a final record, which crash recovery
    /// drops).
    pub fn write_final(&self, record: &RunRecord) -> Result<(), StoreError> {
        let key = &record.id.as_bytes()[..];
        self.runs.insert(key, encode(record))?;
        self.active.remove(key)?;
        Ok(())
    }

    /// Stores a final record that came from elsewhere (the cluster's history): its
    /// plugin index entry, the record, then out of the active index (a crash between
    /// leaves what [`RunHistory::insert`] and [`RunHistory::write_final`] may leave).
    pub fn write_replicated(&self, record: &RunRecord) -> Result<(), StoreError> {
        let key = &record.id.as_bytes()[..];
        self.by_plugin
            .insert(plugin_key(&record.plugin, &record.id), &[][..])?;
        self.runs.insert(key, encode(record))?;
        self.active.remove(key)?;
        Ok(())
    }

    /// Applies `change` to a stored record in one transaction, and takes the run out of
    /// the active index when it ends. `None` when there is no such record. `change` may
    /// run more than once (on conflict); its error aborts the change.
    pub fn update<E: From<StoreError>>(
        &self,
        id: RunId,
        change: impl Fn(&mut RunRecord) -> Result<(), E>,
    ) -> Result<Option<RunRecord>, E> {
        let key = id.as_bytes();
        let r = (&self.runs, &self.active).transaction(|(runs, active)| {
            let Some(bytes) = runs.get(key)? else {
                return Ok(None);
            };
            let mut record: RunRecord =
                decode(key, &bytes).map_err(|e| ConflictableTransactionError::Abort(E::from(e)))?;
            change(&mut record).map_err(ConflictableTransactionError::Abort)?;
            runs.insert(&key[..], encode(&record))?;
            if record.status.is_final() {
                active.remove(&key[..])?;
            }
            Ok(Some(record))
        });
        match r {
            Ok(record) => Ok(record),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(StoreError::from(e).into()),
        }
    }

    pub fn get(&self, id: RunId) -> Result<Option<RunRecord>, StoreError> {
        let key = id.as_bytes();
        match self.runs.get(key)? {
            Some(bytes) => Ok(Some(decode(key, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Up to `n` run ids, newest first: of one plugin or of all, older than `before`.
    pub fn newest_ids(
        &self,
        plugin: Option<&str>,
        before: Option<RunId>,
        n: usize,
    ) -> Result<Vec<RunId>, StoreError> {
        let mut ids: Vec<RunId> = Vec::with_capacity(n);
        if n == 0 {
            return Ok(ids);
        }
        match plugin {
            Some(plugin) => {
                let prefix = plugin_prefix(plugin);
                let end = match &before {
                    Some(b) => plugin_key(plugin, b),
                    None => {
                        let mut e = plugin.as_bytes().to_vec();
                        e.push(1);
                        e
                    }
                };
                for key in self.by_plugin.range(prefix.clone()..end).keys().rev() {
                    let key = key?;
                    if let Some(id) = RunId::from_slice(&key[prefix.len()..]) {
                        ids.push(id);
                    }
                    if ids.len() == n {
                        break;
                    }
                }
            }
            None => {
                let iter = match &before {
                    Some(b) => self.runs.range(..&b.as_bytes()[..]),
                    None => self.runs.iter(),
                };
                for key in iter.keys().rev() {
                    if let Some(id) = RunId::from_slice(&key?) {
                        ids.push(id);
                    }
                    if ids.len() == n {
                        break;
                    }
                }
            }
        }
        Ok(ids)
    }

    /// The active index, oldest first; `None` for a key that is not a run id.
    pub fn active(&self) -> Result<Vec<Option<RunId>>, StoreError> {
        self.active
            .iter()
            .keys()
            .map(|k| Ok(RunId::from_slice(&k?)))
            .collect()
    }

    pub fn is_active(&self, id: RunId) -> Result<bool, StoreError> {
        Ok(self.active.contains_key(id.as_bytes())?)
    }

    /// Drops a run from the active index (its record is final or gone).
    pub fn forget_active(&self, id: RunId) -> Result<(), StoreError> {
        self.active.remove(id.as_bytes())?;
        Ok(())
    }

    /// A plugin's run ids, oldest first.
    pub fn oldest_ids_of(
        &self,
        plugin: &str,
    ) -> impl Iterator<Item = Result<RunId, StoreError>> + use<> {
        let prefix = plugin_prefix(plugin);
        let skip = prefix.len();
        self.by_plugin
            .scan_prefix(&prefix)
            .keys()
            .filter_map(move |key| match key {
                Ok(key) => RunId::from_slice(&key[skip..]).map(Ok),
                Err(e) => Some(Err(e.into())),
            })
    }

    /// Every run id, oldest first.
    pub fn oldest_ids(&self) -> impl Iterator<Item = Result<RunId, StoreError>> + use<> {
        self.runs.iter().keys().filter_map(|key| match key {
            Ok(key) => RunId::from_slice(&key).map(Ok),
            Err(e) => Some(Err(e.into())),
        })
    }

    /// Removes a record, then its plugin index entry (a crash between leaves an index
    /// entry without a record, which listings skip and the next removal takes). False
    /// if the record was gone already.
    pub fn remove(&self, id: RunId, plugin: &str) -> Result<bool, StoreError> {
        let existed = self.runs.remove(&id.as_bytes()[..])?.is_some();
        self.by_plugin.remove(plugin_key(plugin, &id))?;
        Ok(existed)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.runs.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runs::{RunStore, RunStoreConfig, RunTrigger};

    #[test]
    fn runs_keep_the_existing_keys_and_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let runs = RunStore::open(&store, RunStoreConfig::default()).unwrap();
        let r = runs
            .create("heal", RunTrigger::Manual { by: "cli".into() })
            .unwrap();
        // As earlier versions wrote them: the record as JSON under the id's 16 bytes,
        // `plugin \0 id` → empty, and id → plugin while active.
        let raw = store.tree("runs").unwrap().get(r.id.as_bytes()).unwrap();
        assert_eq!(raw.unwrap().to_vec(), serde_json::to_vec(&r).unwrap());
        let mut pkey = b"heal\0".to_vec();
        pkey.extend_from_slice(r.id.as_bytes());
        let idx = store.tree("runs_by_plugin").unwrap().get(&pkey).unwrap();
        assert_eq!(idx.unwrap().to_vec(), Vec::<u8>::new());
        let active = store
            .tree("runs_active")
            .unwrap()
            .get(r.id.as_bytes())
            .unwrap();
        assert_eq!(&active.unwrap()[..], b"heal");

        // A record written straight into the trees reads back through the history.
        let history = RunHistory::open(&store).unwrap();
        let mut raw_run = r.clone();
        raw_run.id = RunId::new();
        store
            .tree("runs")
            .unwrap()
            .insert(raw_run.id.as_bytes(), serde_json::to_vec(&raw_run).unwrap())
            .unwrap();
        let mut okey = b"heal\0".to_vec();
        okey.extend_from_slice(raw_run.id.as_bytes());
        store
            .tree("runs_by_plugin")
            .unwrap()
            .insert(okey, &[][..])
            .unwrap();
        assert_eq!(history.get(raw_run.id).unwrap().unwrap().id, raw_run.id);
        assert_eq!(
            history.newest_ids(Some("heal"), None, 10).unwrap(),
            [raw_run.id, r.id]
        );
        assert_eq!(history.count_per_plugin().unwrap()["heal"], 2);
        assert_eq!(history.active().unwrap(), [Some(r.id)]);
    }
}
