//! The plugin runtime's records ([`super::AUDIT`], [`super::PLUGIN_STATE`],
//! [`super::PLUGIN_STATE_SIZE`], [`super::PLUGINS`]): the audit log of host calls, each
//! plugin's key-value state with its running size (kept with every change so a
//! `state-set` costs O(key + value), not a scan of the state), and the installed plugins.

use std::sync::atomic::{AtomicU64, Ordering};

use sled::Transactional;

use super::{AUDIT, PLUGIN_STATE, PLUGIN_STATE_SIZE, PLUGINS, Store, StoreError, decode, encode};
use crate::plugin::records::{AuditRecord, InstalledPlugin, StateSet};

/// The audit log.
#[derive(Clone)]
pub struct Audit {
    tree: sled::Tree,
    seq: std::sync::Arc<AtomicU64>,
}

impl Audit {
    pub fn open(store: &Store) -> Result<Audit, StoreError> {
        Ok(Audit {
            tree: store.open_tree(AUDIT)?,
            seq: std::sync::Arc::new(AtomicU64::new(0)),
        })
    }

    /// Appends a record; the key orders records by time.
    pub fn record(&self, rec: &AuditRecord) -> Result<(), StoreError> {
        let nanos = rec.time.timestamp_nanos_opt().unwrap_or(0) as u64;
        let mut key = nanos.to_be_bytes().to_vec();
        key.extend_from_slice(&self.seq.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        self.tree.insert(key, encode(rec))?;
        Ok(())
    }

    /// The last `n` records, oldest first.
    pub fn tail(&self, n: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter().rev().take(n) {
            let (k, v) = item?;
            out.push(decode(&k, &v)?);
        }
        out.reverse();
        Ok(out)
    }
}

/// Each plugin's persistent key-value state, and its running size.
#[derive(Clone)]
pub struct PluginState {
    tree: sled::Tree,
    sizes: sled::Tree,
}

fn size_of_entry(key: &str, value_len: usize) -> u64 {
    (key.len() + value_len) as u64
}

fn decode_size(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

impl PluginState {
    pub fn open(store: &Store) -> Result<PluginState, StoreError> {
        Ok(PluginState {
            tree: store.open_tree(PLUGIN_STATE)?,
            sizes: store.open_tree(PLUGIN_STATE_SIZE)?,
        })
    }

    fn key(plugin: &str, key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(plugin.len() + 1 + key.len());
        k.extend_from_slice(plugin.as_bytes());
        k.push(0);
        k.extend_from_slice(key.as_bytes());
        k
    }

    fn prefix(plugin: &str) -> Vec<u8> {
        Self::key(plugin, "")
    }

    pub fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(Self::key(plugin, key))?.map(|v| v.to_vec()))
    }

    /// Bytes the plugin's state takes (keys and values): the running size, counted from
    /// the state once when none is kept yet (state written before sizes were kept).
    pub fn size(&self, plugin: &str) -> Result<u64, StoreError> {
        if let Some(v) = self.sizes.get(plugin)? {
            return Ok(decode_size(&v));
        }
        let counted = self.count(plugin)?;
        // Another writer may have started keeping it meanwhile: theirs stands.
        match self.sizes.compare_and_swap(
            plugin,
            None as Option<&[u8]>,
            Some(&counted.to_be_bytes()[..]),
        )? {
            Ok(()) => Ok(counted),
            Err(e) => Ok(e.current.map_or(counted, |v| decode_size(&v))),
        }
    }

    /// Counts the state's bytes by scanning it.
    fn count(&self, plugin: &str) -> Result<u64, StoreError> {
        let skip = Self::prefix(plugin).len();
        let mut total = 0u64;
        for item in self.tree.scan_prefix(Self::prefix(plugin)) {
            let (k, v) = item?;
            total += (k.len() - skip + v.len()) as u64;
        }
        Ok(total)
    }

    /// Stores `value` unless the plugin's state would exceed `max_bytes`. Replacing a
    /// key counts the difference. O(key + value): the value and the running size change
    /// in one transaction.
    pub fn set(
        &self,
        plugin: &str,
        key: &str,
        value: &[u8],
        max_bytes: u64,
    ) -> Result<StateSet, StoreError> {
        self.size(plugin)?;
        let k = Self::key(plugin, key);
        let r = (&self.tree, &self.sizes).transaction(|(tree, sizes)| {
            let size = sizes.get(plugin)?.map_or(0, |v| decode_size(&v));
            let old = tree.get(&k)?.map_or(0, |v| size_of_entry(key, v.len()));
            let would_be = size.saturating_sub(old) + size_of_entry(key, value.len());
            if would_be > max_bytes {
                return Ok(StateSet::OverQuota { size, would_be });
            }
            tree.insert(&k[..], value)?;
            sizes.insert(plugin, &would_be.to_be_bytes()[..])?;
            Ok::<_, sled::transaction::ConflictableTransactionError<StoreError>>(StateSet::Stored {
                size: would_be,
            })
        });
        r.map_err(tx_error)
    }

    /// Removes `key`; the running size drops by what it took.
    pub fn delete(&self, plugin: &str, key: &str) -> Result<(), StoreError> {
        self.size(plugin)?;
        let k = Self::key(plugin, key);
        let r = (&self.tree, &self.sizes).transaction(|(tree, sizes)| {
            if let Some(old) = tree.remove(&k[..])? {
                let size = sizes.get(plugin)?.map_or(0, |v| decode_size(&v));
                let left = size.saturating_sub(size_of_entry(key, old.len()));
                sizes.insert(plugin, &left.to_be_bytes()[..])?;
            }
            Ok::<_, sled::transaction::ConflictableTransactionError<StoreError>>(())
        });
        r.map_err(tx_error)
    }

    /// Keys starting with `prefix`, in byte order.
    pub fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        let skip = Self::prefix(plugin).len();
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(Self::key(plugin, prefix)) {
            let (k, _) = item?;
            out.push(String::from_utf8_lossy(&k[skip..]).into_owned());
        }
        Ok(out)
    }

    /// Every plugin's state: (plugin, key, value), in byte order (what cluster mode
    /// replicates).
    pub fn entries(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item?;
            let Some(nul) = k.iter().position(|&b| b == 0) else {
                continue;
            };
            out.push((
                String::from_utf8_lossy(&k[..nul]).into_owned(),
                String::from_utf8_lossy(&k[nul + 1..]).into_owned(),
                v.to_vec(),
            ));
        }
        Ok(out)
    }

    /// Removes all of a plugin's state (on `plugin remove`).
    pub fn clear(&self, plugin: &str) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.tree.scan_prefix(Self::prefix(plugin)) {
            let (k, _) = item?;
            self.tree.remove(k)?;
            n += 1;
        }
        self.sizes.remove(plugin)?;
        Ok(n)
    }
}

fn tx_error(e: sled::transaction::TransactionError<StoreError>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Abort(e) => e,
        sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
    }
}

/// The installed plugins.
#[derive(Clone)]
pub struct PluginRecords {
    tree: sled::Tree,
}

impl PluginRecords {
    pub fn open(store: &Store) -> Result<PluginRecords, StoreError> {
        Ok(PluginRecords {
            tree: store.open_tree(PLUGINS)?,
        })
    }

    pub fn get(&self, name: &str) -> Result<Option<InstalledPlugin>, StoreError> {
        match self.tree.get(name)? {
            Some(v) => Ok(Some(decode(name.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    pub fn put(&self, p: &InstalledPlugin) -> Result<(), StoreError> {
        self.tree.insert(p.name.as_bytes(), encode(p))?;
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.tree.remove(name)?.is_some())
    }

    pub fn list(&self) -> Result<Vec<InstalledPlugin>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (tempfile::TempDir, PluginState) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let state = PluginState::open(&store).unwrap();
        (dir, state)
    }

    #[test]
    fn the_state_quota_holds_exactly_with_a_running_size() {
        let (_dir, s) = state();
        // "k1" + 8 bytes = 10; the quota is 30.
        assert_eq!(
            s.set("p", "k1", &[1; 8], 30).unwrap(),
            StateSet::Stored { size: 10 }
        );
        assert_eq!(
            s.set("p", "k2", &[2; 8], 30).unwrap(),
            StateSet::Stored { size: 20 }
        );
        // Exactly at the quota is allowed; one byte over is not, and stores nothing.
        assert_eq!(
            s.set("p", "k3", &[3; 8], 30).unwrap(),
            StateSet::Stored { size: 30 }
        );
        assert_eq!(
            s.set("p", "k4", &[], 30).unwrap(),
            StateSet::OverQuota {
                size: 30,
                would_be: 32
            }
        );
        assert_eq!(s.get("p", "k4").unwrap(), None);
        // Replacing a key counts the difference, both ways.
        assert_eq!(
            s.set("p", "k1", &[1; 9], 30).unwrap(),
            StateSet::OverQuota {
                size: 30,
                would_be: 31
            }
        );
        assert_eq!(
            s.set("p", "k1", &[1; 2], 30).unwrap(),
            StateSet::Stored { size: 24 }
        );
        // Deleting frees what the key took; deleting a missing key changes nothing.
        s.delete("p", "k2").unwrap();
        s.delete("p", "missing").unwrap();
        assert_eq!(s.size("p").unwrap(), 14);
        assert_eq!(s.size("p").unwrap(), s.count("p").unwrap());
        // Other plugins have their own quota.
        assert_eq!(
            s.set("q", "k1", &[0; 28], 30).unwrap(),
            StateSet::Stored { size: 30 }
        );
        assert_eq!(s.size("p").unwrap(), 14);
        // Clearing forgets the size with the state.
        assert_eq!(s.clear("p").unwrap(), 2);
        assert_eq!(s.size("p").unwrap(), 0);
    }

    #[test]
    fn state_written_before_sizes_were_kept_is_counted_once() {
        let (_dir, s) = state();
        s.tree
            .insert(PluginState::key("p", "old"), &[7u8; 10][..])
            .unwrap();
        assert_eq!(s.size("p").unwrap(), 13);
        assert_eq!(
            s.set("p", "new", &[0; 7], 23).unwrap(),
            StateSet::Stored { size: 23 }
        );
        assert!(matches!(
            s.set("p", "more", &[], 23).unwrap(),
            StateSet::OverQuota { .. }
        ));
    }

    #[test]
    fn eight_thousand_sets_keep_the_size_without_rescanning() {
        let (_dir, s) = state();
        let started = std::time::Instant::now();
        for i in 0..8_000u32 {
            let key = format!("key-{i:05}");
            assert!(matches!(
                s.set("p", &key, &i.to_be_bytes(), 1 << 20).unwrap(),
                StateSet::Stored { .. }
            ));
        }
        println!("8000 sets: {:?}", started.elapsed());
        assert_eq!(s.size("p").unwrap(), 8_000 * (9 + 4));
        assert_eq!(s.size("p").unwrap(), s.count("p").unwrap());
    }
}
