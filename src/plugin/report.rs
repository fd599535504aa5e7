//! What a run did: [`RunReport`], built while the plugin runs and returned by
//! [`PluginRuntime::run`](super::PluginRuntime::run).

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How the plugin's `run` call ended, as the runtime saw it. Not a run's status: the
/// run record's [`crate::runs::Exit`] is derived from it (and from the run's
/// denials) in one place, [`crate::scheduler::end_of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exit {
    /// `run` returned an outcome.
    Succeeded,
    /// `run` returned an error value.
    Failed,
    /// The run hit its wall-clock deadline and was stopped.
    TimedOut,
    /// The plugin tried to grow its memory past its limit and was stopped.
    MemoryExceeded,
    /// The plugin trapped (a panic, an `unreachable`, a stack overflow, …) or could not
    /// be instantiated.
    Trapped,
}

impl Exit {
    pub fn as_str(self) -> &'static str {
        match self {
            Exit::Succeeded => "succeeded",
            Exit::Failed => "failed",
            Exit::TimedOut => "timed-out",
            Exit::MemoryExceeded => "memory-exceeded",
            Exit::Trapped => "trapped",
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The plugin's own account of a successful run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub summary: String,
    /// JSON text, or empty.
    pub details: String,
}

/// One `host.log` record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogRecord {
    /// Milliseconds since the run started.
    pub at_ms: f64,
    pub level: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<(String, String)>,
}

/// How the policy decided on a host call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = Decision)]
pub enum CallDecision {
    Allow,
    Deny,
}

impl CallDecision {
    /// `allow` or `deny`, as every record and the metrics label spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            CallDecision::Allow => "allow",
            CallDecision::Deny => "deny",
        }
    }
}

/// `decision == "deny"`, as the records spell it.
impl PartialEq<&str> for CallDecision {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for CallDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One Docker host call: what was asked, the requests it maps to, the decision and why.
///
/// Recorded once, by the host function; the run report, the run record
/// ([`crate::runs::RunRecord::host_calls`]) and the audit log ([`AuditRecord`]) hold
/// this same value, each serialized as it always was: the report with the fields below
/// but `reason` (its `denials` say why calls were refused), the record as
/// [`RecordedCall`], the audit log as [`AuditRecord`] says.
///
/// [`AuditRecord`]: super::records::AuditRecord
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostCall {
    /// The WIT function, e.g. `restart-container`.
    pub op: String,
    /// The device named in the call (empty for calls on no device).
    pub device: String,
    /// The Docker API request(s), e.g. `POST /containers/web/restart`.
    pub request: String,
    pub decision: CallDecision,
    /// `ok`, or the error kind returned to the plugin (`denied`, `not-found`, …).
    pub result: String,
    pub ms: f64,
    /// Why: the policy's sentence, the scope that refused, or how an allowed call
    /// failed.
    #[serde(skip)]
    pub reason: String,
}

impl HostCall {
    /// The reason the run record gives: why it was denied, or how an allowed call
    /// failed (its result kind); none for a call that went through.
    pub fn recorded_reason(&self) -> Option<&str> {
        let failed =
            (!self.result.is_empty() && self.result != "ok").then_some(self.result.as_str());
        match self.decision {
            CallDecision::Deny => Some(self.reason.as_str())
                .filter(|r| !r.is_empty())
                .or(failed),
            CallDecision::Allow => failed,
        }
    }
}

/// A host call as the run record holds it and the API returns it: the device and the
/// request when there is one, and [`HostCall::recorded_reason`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = HostCall)]
pub struct RecordedCall {
    /// Interface and function, e.g. `docker.restart-container`.
    pub op: String,
    pub device: Option<String>,
    /// The Docker API request it stands for, e.g. `POST /containers/web/restart`.
    pub request: Option<String>,
    pub decision: CallDecision,
    /// Why it was denied (or a note on an allow).
    pub reason: Option<String>,
}

impl From<&HostCall> for RecordedCall {
    fn from(c: &HostCall) -> RecordedCall {
        RecordedCall {
            op: c.op.clone(),
            device: (!c.device.is_empty()).then(|| c.device.clone()),
            request: (!c.request.is_empty()).then(|| c.request.clone()),
            decision: c.decision,
            reason: c.recorded_reason().map(str::to_string),
        }
    }
}

impl From<RecordedCall> for HostCall {
    /// Back from a stored record: a denial's reason is its reason, an allowed call's is
    /// its result (the time it took is not recorded).
    fn from(r: RecordedCall) -> HostCall {
        let (result, reason) = match (r.decision, r.reason) {
            (CallDecision::Deny, reason) => ("denied".to_string(), reason.unwrap_or_default()),
            (CallDecision::Allow, Some(result)) => (result, String::new()),
            (CallDecision::Allow, None) => ("ok".to_string(), String::new()),
        };
        HostCall {
            op: r.op,
            device: r.device.unwrap_or_default(),
            request: r.request.unwrap_or_default(),
            decision: r.decision,
            result,
            ms: 0.0,
            reason,
        }
    }
}

/// `#[serde(with)]` for the run record's host calls: each as [`RecordedCall`].
pub mod as_recorded {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{HostCall, RecordedCall};

    pub fn serialize<S: Serializer>(calls: &[HostCall], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(calls.iter().map(RecordedCall::from))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<HostCall>, D::Error> {
        Ok(Vec::<RecordedCall>::deserialize(d)?
            .into_iter()
            .map(HostCall::from)
            .collect())
    }
}

/// A refused host call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Denial {
    pub op: String,
    pub device: String,
    pub request: String,
    pub reason: String,
}

/// Everything about one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub run_id: uuid::Uuid,
    pub plugin: String,
    pub version: String,
    /// `cron`, `webhook` or `manual`.
    pub trigger: String,
    pub started_at: DateTime<Utc>,
    pub status: Exit,
    /// Set when the plugin returned one.
    pub outcome: Option<Outcome>,
    /// The plugin's error value, or why it was stopped.
    pub error: Option<String>,
    pub logs: Vec<LogRecord>,
    /// Log records dropped past `max_log_bytes` or `max_log_records`.
    pub logs_dropped: u64,
    pub stdout: String,
    pub stderr: String,
    /// Bytes of stdout / stderr dropped past `max_output_bytes`.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    /// Docker host calls (the first 1,000; `host_calls_total` counts all host calls).
    pub host_calls: Vec<HostCall>,
    /// Every host call the plugin made, `host` and `docker` interfaces alike.
    pub host_calls_total: u64,
    pub denials: Vec<Denial>,
    pub duration_ms: f64,
}

impl RunReport {
    /// Whether the run succeeded.
    pub fn succeeded(&self) -> bool {
        self.status == Exit::Succeeded
    }

    /// A human-readable rendering (what `capstan plugin run` prints).
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "plugin {} {} ({} trigger): {} in {:.1} ms",
            self.plugin, self.version, self.trigger, self.status, self.duration_ms
        );
        if let Some(o) = &self.outcome {
            let _ = writeln!(s, "outcome: {}", o.summary);
            if !o.details.is_empty() {
                let _ = writeln!(s, "details: {}", o.details);
            }
        }
        if let Some(e) = &self.error {
            let _ = writeln!(s, "error: {e}");
        }
        if !self.logs.is_empty() || self.logs_dropped > 0 {
            let _ = writeln!(s, "logs:");
            for l in &self.logs {
                let fields: String = l.fields.iter().map(|(k, v)| format!(" {k}={v}")).collect();
                let _ = writeln!(
                    s,
                    "  {:>8.1} ms {:<5} {}{fields}",
                    l.at_ms, l.level, l.message
                );
            }
            if self.logs_dropped > 0 {
                let _ = writeln!(
                    s,
                    "  … {} record(s) dropped (max_log_bytes, max_log_records)",
                    self.logs_dropped
                );
            }
        }
        for (name, text, dropped) in [
            ("stdout", &self.stdout, self.stdout_dropped),
            ("stderr", &self.stderr, self.stderr_dropped),
        ] {
            if !text.is_empty() || dropped > 0 {
                let _ = writeln!(s, "{name}:");
                for line in text.lines() {
                    let _ = writeln!(s, "  {line}");
                }
                if dropped > 0 {
                    let _ = writeln!(s, "  … {dropped} byte(s) dropped (max_output_bytes)");
                }
            }
        }
        if !self.host_calls.is_empty() {
            let _ = writeln!(s, "host calls ({} in all):", self.host_calls_total);
            for c in &self.host_calls {
                let _ = writeln!(
                    s,
                    "  {:<5} {:<20} {:<10} {}  → {} ({:.1} ms)",
                    c.decision, c.op, c.device, c.request, c.result, c.ms
                );
            }
        }
        if !self.denials.is_empty() {
            let _ = writeln!(s, "denials:");
            for d in &self.denials {
                if d.device.is_empty() {
                    // A call on no device (an outbound HTTP request): its request instead.
                    let _ = writeln!(s, "  {} {}: {}", d.op, d.request, d.reason);
                } else {
                    let _ = writeln!(s, "  {} on {}: {}", d.op, d.device, d.reason);
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_record_host_calls_in_the_stored_format_load_and_save_byte_for_byte() {
        #[derive(Serialize, Deserialize)]
        struct Record {
            #[serde(with = "as_recorded")]
            host_calls: Vec<HostCall>,
        }
        let old = r#"{"host_calls":[{"op":"docker.restart-container","device":"local","request":"POST /containers/web/restart","decision":"deny","reason":"ALLOW_RESTARTS is 0"},{"op":"docker.list-containers","device":null,"request":null,"decision":"allow","reason":null},{"op":"docker.inspect-container","device":"local","request":"GET /containers/x/json","decision":"allow","reason":"not-found"}]}"#;
        let r: Record = serde_json::from_str(old).unwrap();
        assert_eq!(
            r.host_calls[0].recorded_reason(),
            Some("ALLOW_RESTARTS is 0")
        );
        assert_eq!(r.host_calls[2].result, "not-found");
        assert_eq!(serde_json::to_string(&r).unwrap(), old);
    }

    #[test]
    fn a_reported_host_call_serializes_as_before_without_its_reason() {
        let call = HostCall {
            op: "docker.list-containers".into(),
            device: "local".into(),
            request: "GET /containers/json".into(),
            decision: CallDecision::Allow,
            result: "ok".into(),
            ms: 1.5,
            reason: "allowed by the plugin's policy".into(),
        };
        assert_eq!(
            serde_json::to_string(&call).unwrap(),
            r#"{"op":"docker.list-containers","device":"local","request":"GET /containers/json","decision":"allow","result":"ok","ms":1.5}"#
        );
    }
}
