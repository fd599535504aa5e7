//! What a run did: [`RunReport`], built while the plugin runs and returned by
//! [`PluginRuntime::run`](super::PluginRuntime::run).

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
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

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::TimedOut => "timed-out",
            RunStatus::MemoryExceeded => "memory-exceeded",
            RunStatus::Trapped => "trapped",
        }
    }
}

impl fmt::Display for RunStatus {
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

/// One Docker host call: what was asked, the requests it maps to, the decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostCall {
    /// The WIT function, e.g. `restart-container`.
    pub op: String,
    pub device: String,
    /// The Docker API request(s), e.g. `POST /containers/web/restart`.
    pub request: String,
    /// `allow` or `deny`.
    pub decision: String,
    /// `ok`, or the error kind returned to the plugin (`denied`, `not-found`, …).
    pub result: String,
    pub ms: f64,
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
    pub status: RunStatus,
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
        self.status == RunStatus::Succeeded
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
                let _ = writeln!(s, "  {} on {}: {}", d.op, d.device, d.reason);
            }
        }
        s
    }
}
