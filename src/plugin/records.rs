//! What the plugin runtime keeps in the store: the audit log of host calls, each
//! plugin's small key-value state, and the installed plugins.
//!
//! Trees: `audit` (time-ordered, one record per Docker host call, allowed or denied),
//! `plugin_state` (`<plugin>\0<key>` → bytes), `plugins` (name → [`InstalledPlugin`]).

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::plugin::manifest::{Limits, Triggers};
use crate::store::{self, Store, StoreError};

pub const AUDIT_TREE: &str = "audit";
pub const STATE_TREE: &str = "plugin_state";
pub const PLUGINS_TREE: &str = "plugins";

/// One host call as the audit log keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditRecord {
    pub time: DateTime<Utc>,
    pub plugin: String,
    /// The device named in the call (empty for calls on no device).
    pub device: String,
    /// The WIT function, e.g. `restart-container`.
    pub op: String,
    /// The Docker API request(s) decided on, e.g. `POST /containers/web/restart`.
    pub request: String,
    /// `allow` or `deny`.
    pub decision: String,
    /// Why: the policy's sentence, or the scope that refused.
    pub reason: String,
}

/// The audit log.
#[derive(Clone)]
pub struct Audit {
    tree: sled::Tree,
    seq: std::sync::Arc<AtomicU64>,
}

impl Audit {
    pub fn open(store: &Store) -> Result<Audit, StoreError> {
        Ok(Audit {
            tree: store.tree(AUDIT_TREE)?,
            seq: std::sync::Arc::new(AtomicU64::new(0)),
        })
    }

    /// Appends a record; the key orders records by time.
    pub fn record(&self, rec: &AuditRecord) -> Result<(), StoreError> {
        let nanos = rec.time.timestamp_nanos_opt().unwrap_or(0) as u64;
        let mut key = nanos.to_be_bytes().to_vec();
        key.extend_from_slice(&self.seq.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        self.tree.insert(key, store::encode(rec))?;
        Ok(())
    }

    /// The last `n` records, oldest first.
    pub fn tail(&self, n: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter().rev().take(n) {
            let (k, v) = item?;
            out.push(store::decode(&k, &v)?);
        }
        out.reverse();
        Ok(out)
    }
}

/// Each plugin's persistent key-value state.
#[derive(Clone)]
pub struct PluginState {
    tree: sled::Tree,
}

/// Longest state key, bytes.
pub const MAX_STATE_KEY: usize = 256;

impl PluginState {
    pub fn open(store: &Store) -> Result<PluginState, StoreError> {
        Ok(PluginState {
            tree: store.tree(STATE_TREE)?,
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

    /// Bytes the plugin's state takes (keys and values).
    pub fn size(&self, plugin: &str) -> Result<u64, StoreError> {
        let skip = Self::prefix(plugin).len();
        let mut total = 0u64;
        for item in self.tree.scan_prefix(Self::prefix(plugin)) {
            let (k, v) = item?;
            total += (k.len() - skip + v.len()) as u64;
        }
        Ok(total)
    }

    /// Stores `value` unless the plugin's state would exceed `max_bytes`; returns
    /// `Ok(false)` when it would.
    pub fn set(
        &self,
        plugin: &str,
        key: &str,
        value: &[u8],
        max_bytes: u64,
    ) -> Result<bool, StoreError> {
        let k = Self::key(plugin, key);
        let old = self
            .tree
            .get(&k)?
            .map(|v| (key.len() + v.len()) as u64)
            .unwrap_or(0);
        let size = self.size(plugin)?;
        if size - old + (key.len() + value.len()) as u64 > max_bytes {
            return Ok(false);
        }
        self.tree.insert(k, value)?;
        Ok(true)
    }

    pub fn delete(&self, plugin: &str, key: &str) -> Result<(), StoreError> {
        self.tree.remove(Self::key(plugin, key))?;
        Ok(())
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

    /// Removes all of a plugin's state (on `plugin remove`).
    pub fn clear(&self, plugin: &str) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.tree.scan_prefix(Self::prefix(plugin)) {
            let (k, _) = item?;
            self.tree.remove(k)?;
            n += 1;
        }
        Ok(n)
    }
}

/// An installed plugin as recorded in the `plugins` tree.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstalledPlugin {
    pub name: String,
    pub version: String,
    pub description: String,
    /// SHA-256 of the `.wasm`, hex.
    pub sha256: String,
    /// Size of the `.wasm`, bytes.
    pub size: u64,
    pub installed_at: DateTime<Utc>,
    /// Its triggers, for the scheduler and the webhook router.
    pub triggers: Triggers,
    /// Its limits, resolved against the engine's defaults at install.
    pub limits: Limits,
    /// Its device scope as written.
    pub devices: Vec<String>,
}

/// The `plugins` tree.
#[derive(Clone)]
pub struct PluginRecords {
    tree: sled::Tree,
}

impl PluginRecords {
    pub fn open(store: &Store) -> Result<PluginRecords, StoreError> {
        Ok(PluginRecords {
            tree: store.tree(PLUGINS_TREE)?,
        })
    }

    pub fn get(&self, name: &str) -> Result<Option<InstalledPlugin>, StoreError> {
        match self.tree.get(name)? {
            Some(v) => Ok(Some(store::decode(name.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    pub fn put(&self, p: &InstalledPlugin) -> Result<(), StoreError> {
        self.tree.insert(p.name.as_bytes(), store::encode(p))?;
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.tree.remove(name)?.is_some())
    }

    pub fn list(&self) -> Result<Vec<InstalledPlugin>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item?;
            out.push(store::decode(&k, &v)?);
        }
        Ok(out)
    }
}
