//! What the plugin runtime keeps in the store: the audit log of host calls, each
//! plugin's small key-value state, and the installed plugins — the records here, their
//! storage in [`crate::store::plugins`] (re-exported: [`Audit`], [`PluginState`],
//! [`PluginRecords`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::plugin::manifest::{Limits, Triggers};

pub use crate::store::plugins::{Audit, PluginRecords, PluginState};

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

/// Longest state key, bytes.
pub const MAX_STATE_KEY: usize = 256;

/// What [`PluginState::set`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateSet {
    /// Stored; the state now takes `size` bytes.
    Stored { size: u64 },
    /// Not stored: the state takes `size` bytes and would take `would_be`.
    OverQuota { size: u64, would_be: u64 },
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
