//! The host-side memory a run may make the engine hold: one account per run, charged for
//! every byte the host keeps or holds on the run's behalf.
//!
//! Why it exists: a plugin's linear memory is capped by `limits.memory_mib`, but what
//! the host copies out of it is not linear memory. Without an account, a plugin under a
//! 64 MiB limit could make the engine hold gigabytes: log records with half a million
//! empty fields (each field costs the host a `(String, String)` even when both are
//! empty), thousands of empty records, an outcome of tens of megabytes, host-call
//! records carrying huge names. So every such byte is charged here, with the fixed
//! overhead of the structure that holds it, against `limits.max_host_bytes`:
//!
//! - **kept** until the run ends ([`HostBudget::keep`]): log records, captured stdout and
//!   stderr, host-call and denial records, the outcome;
//! - **held** for the length of one call ([`HostBudget::hold`]): state values and key
//!   lists read back into the host, arguments copied from the guest.
//!
//! A charge that does not fit is a [`LimitError`]; the host function traps with it (a
//! host-side resource exhaustion is the guest's fault, so the run fails) and the first
//! one is remembered so the report names it even when it was met where no trap can be
//! raised. The account is shared (atomics behind an `Arc`) because stdout and stderr are
//! written by WASI streams outside the store's data.
//!
//! What stays outside: wasmtime copies a call's arguments out of linear memory before a
//! host function sees them. That copy is bounded by the guest's memory (at most about
//! three times its size for a list of empty strings) and freed when the call returns;
//! the caps on fields per record and records per run keep any of it from being kept.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::plugin::report::{Denial, HostCall, LogRecord};

/// Bytes charged for a log record besides its text: the record itself.
pub const LOG_RECORD_OVERHEAD: usize = std::mem::size_of::<LogRecord>();
/// Bytes charged for each field of a log record besides its key and value.
pub const LOG_FIELD_OVERHEAD: usize = std::mem::size_of::<(String, String)>();
/// Bytes charged for a host-call record besides its text.
pub const HOST_CALL_OVERHEAD: usize = std::mem::size_of::<HostCall>();
/// Bytes charged for a denial record besides its text.
pub const DENIAL_OVERHEAD: usize = std::mem::size_of::<Denial>();

/// What one `host.log` record costs the host: the record, each field, and their text.
pub fn log_record_cost(level: &str, message: &str, fields: &[(String, String)]) -> usize {
    LOG_RECORD_OVERHEAD
        + level.len()
        + message.len()
        + fields
            .iter()
            .map(|(k, v)| LOG_FIELD_OVERHEAD + k.len() + v.len())
            .sum::<usize>()
}

/// What a host-call record costs the host.
pub fn host_call_cost(c: &HostCall) -> usize {
    HOST_CALL_OVERHEAD
        + c.op.len()
        + c.device.len()
        + c.request.len()
        + c.decision.as_str().len()
        + c.result.len()
}

/// What a denial record costs the host.
pub fn denial_cost(d: &Denial) -> usize {
    DENIAL_OVERHEAD + d.op.len() + d.device.len() + d.request.len() + d.reason.len()
}

/// A run limit that ended the run from inside a host call. Each names the manifest
/// setting that raises it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "host memory limit: {what} ({bytes} bytes) would bring what the engine holds for this run to {total} bytes, more than its limit of {limit} bytes (limits.max_host_bytes)"
    )]
    HostMemory {
        what: String,
        bytes: usize,
        total: usize,
        limit: usize,
    },
    #[error(
        "log field limit: a log record has {fields} fields, more than the {max} allowed (limits.max_log_fields)"
    )]
    LogFields { fields: usize, max: u32 },
    #[error("host call limit: the plugin made more than {max} host calls (limits.max_host_calls)")]
    HostCalls { max: u32 },
}

/// One run's account of host-side memory.
#[derive(Debug)]
pub struct HostBudget {
    limit: usize,
    kept: AtomicUsize,
    exceeded: Mutex<Option<LimitError>>,
}

impl HostBudget {
    pub fn new(limit: usize) -> HostBudget {
        HostBudget {
            limit,
            kept: AtomicUsize::new(0),
            exceeded: Mutex::new(None),
        }
    }

    /// The limit, bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes kept so far.
    pub fn kept(&self) -> usize {
        self.kept.load(Ordering::Relaxed)
    }

    /// Charges `bytes` the host keeps until the run ends (`what` names them in the
    /// error). Nothing is charged when they do not fit.
    pub fn keep(&self, what: &str, bytes: usize) -> Result<(), LimitError> {
        let mut kept = self.kept.load(Ordering::Relaxed);
        loop {
            let total = kept.saturating_add(bytes);
            if total > self.limit {
                return Err(self.exceed(what, bytes, total));
            }
            match self
                .kept
                .compare_exchange_weak(kept, total, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(now) => kept = now,
            }
        }
    }

    /// Checks that `bytes` the host holds only while one call runs fit beside what it
    /// keeps.
    pub fn hold(&self, what: &str, bytes: usize) -> Result<(), LimitError> {
        let total = self.kept().saturating_add(bytes);
        if total > self.limit {
            return Err(self.exceed(what, bytes, total));
        }
        Ok(())
    }

    /// Remembers `e` as the run's limit when it is the first one met.
    pub fn note(&self, e: &LimitError) {
        let mut first = self.exceeded.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e.clone());
        }
    }

    /// The first limit the run met, if any.
    pub fn exceeded(&self) -> Option<LimitError> {
        self.exceeded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn exceed(&self, what: &str, bytes: usize, total: usize) -> LimitError {
        let e = LimitError::HostMemory {
            what: what.to_string(),
            bytes,
            total,
            limit: self.limit,
        };
        self.note(&e);
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_fits_and_refuses_the_rest_naming_the_setting() {
        let b = HostBudget::new(100);
        b.keep("a log record", 60).unwrap();
        b.hold("a state value", 40).unwrap();
        let e = b.hold("a state value", 41).unwrap_err();
        assert!(e.to_string().contains("limits.max_host_bytes"), "{e}");
        assert!(e.to_string().contains("a state value (41 bytes)"), "{e}");
        assert!(b.keep("the outcome", 41).is_err());
        assert_eq!(b.kept(), 60, "a refused charge takes nothing");
        b.keep("a log record", 40).unwrap();
        assert_eq!(b.kept(), 100);
        assert!(b.keep("a byte", 1).is_err());
        // The first limit met is the one the report names.
        assert_eq!(
            b.exceeded().unwrap(),
            LimitError::HostMemory {
                what: "a state value".into(),
                bytes: 41,
                total: 101,
                limit: 100
            }
        );
    }

    #[test]
    fn an_empty_record_and_an_empty_field_still_cost_their_overhead() {
        assert_eq!(log_record_cost("", "", &[]), LOG_RECORD_OVERHEAD);
        let fields = vec![(String::new(), String::new()); 3];
        assert_eq!(
            log_record_cost("info", "", &fields),
            LOG_RECORD_OVERHEAD + 4 + 3 * LOG_FIELD_OVERHEAD
        );
        const { assert!(LOG_RECORD_OVERHEAD >= 64 && LOG_FIELD_OVERHEAD >= 48) };
    }
}
