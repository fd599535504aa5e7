//! What the plugin runtime keeps in the store: the audit log of host calls, each
//! plugin's small key-value state, and the installed plugins — the records here, their
//! storage in [`crate::store::plugins`] (re-exported: [`Audit`], [`PluginState`],
//! [`PluginRecords`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::plugin::manifest::{Limits, Triggers};
use crate::plugin::report::{CallDecision, HostCall};

pub use crate::store::plugins::{Audit, PluginRecords, PluginState};

/// One host call as the audit log keeps it: the call ([`HostCall`], recorded once by
/// the host function), with when and by which plugin. Stored as it always was, one flat
/// JSON object ([`Audited`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(into = "Audited", from = "Audited")]
pub struct AuditRecord {
    pub time: DateTime<Utc>,
    pub plugin: String,
    pub call: HostCall,
}

/// An audit record's stored form.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Audited {
    time: DateTime<Utc>,
    plugin: String,
    /// The device named in the call (empty for calls on no device).
    device: String,
    /// The WIT function, e.g. `restart-container`.
    op: String,
    /// The Docker API request(s) decided on, e.g. `POST /containers/web/restart`.
    request: String,
    /// `allow` or `deny`.
    decision: CallDecision,
    /// Why: the policy's sentence, or the scope that refused.
    reason: String,
}

impl From<AuditRecord> for Audited {
    fn from(r: AuditRecord) -> Audited {
        Audited {
            time: r.time,
            plugin: r.plugin,
            device: r.call.device,
            op: r.call.op,
            request: r.call.request,
            decision: r.call.decision,
            reason: r.call.reason,
        }
    }
}

impl From<Audited> for AuditRecord {
    /// The call's result and time are not in the audit log.
    fn from(a: Audited) -> AuditRecord {
        AuditRecord {
            time: a.time,
            plugin: a.plugin,
            call: HostCall {
                op: a.op,
                device: a.device,
                request: a.request,
                decision: a.decision,
                result: String::new(),
                ms: 0.0,
                reason: a.reason,
            },
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_audit_record_written_before_calls_were_typed_loads_and_saves_byte_for_byte() {
        let old = r#"{"time":"2026-12-01T10:00:00Z","plugin":"p","device":"local","op":"restart-container","request":"POST /containers/web/restart","decision":"deny","reason":"ALLOW_RESTARTS is 0"}"#;
        let rec: AuditRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.call.decision, CallDecision::Deny);
        assert_eq!(rec.call.reason, "ALLOW_RESTARTS is 0");
        assert_eq!(serde_json::to_string(&rec).unwrap(), old);
    }
}
