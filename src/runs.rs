//! Run history: one record per plugin run, kept in the store, followed live.
//!
//! Every run the engine starts — on a cron fire, a webhook delivery or by hand — gets a
//! [`RunRecord`] before the plugin is instantiated, so a run that never ends (a crash, a
//! kill, a shutdown deadline) still leaves a trace, marked `interrupted` at the next
//! start-up ([`RunStore::interrupt_active`]). Records say why the run started, when it
//! was queued, started and finished, how it ended, what the plugin logged (capped) and
//! which host calls it made and how the policy decided on them.
//!
//! Layout (three trees):
//! - `runs`: run id (16 bytes, UUIDv7, so key order is time order) → JSON record;
//! - `runs_by_plugin`: `plugin \0 id` → empty, for newest-first listing per plugin;
//! - `runs_active`: id → plugin, for the queued and running ones, so crash recovery does
//!   not scan the history.
//!
//! A record is written twice: `queued` when the run is created (made durable by
//! [`Store::durable`] where someone was promised the run, e.g. a webhook's 202) and final
//! when it ends. In between, the run lives in memory ([`RunStore`]'s live set): its
//! `running` state and anything appended. Each write is a few plain writes in a
//! crash-safe order ([`RunHistory`](crate::store::runs::RunHistory) keeps the trees),
//! and every change is broadcast to followers ([`RunStore::subscribe`], for
//! `capstan runs --follow`).
//! Retention (last N per plugin, maximum age) is applied on every insert, a bounded
//! amount at a time, and in full by [`RunStore::apply_retention`], which the engine calls
//! periodically; queued and running records are never removed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::plugin::TriggerEvent;
use crate::store::runs::RunHistory;
use crate::store::{Store, StoreError};

/// Default cap on a run's kept log text.
pub const DEFAULT_LOG_CAP_BYTES: usize = 64 * 1024;
/// Default cap on the host calls kept per run.
pub const DEFAULT_MAX_HOST_CALLS: usize = 1_000;
/// How many old records one insert removes at most; the periodic pass does the rest.
const RETENTION_BATCH: usize = 32;
/// Most records one page of a listing returns.
pub const MAX_PAGE: usize = 1_000;
/// Updates a follower may fall behind before it is told it lagged.
const FOLLOW_BUFFER: usize = 1_024;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("no run {0}")]
    NotFound(RunId),
    #[error("run {id} is {from}; it cannot become {to}")]
    InvalidTransition {
        id: RunId,
        from: RunStatus,
        to: RunStatus,
    },
    #[error("invalid run: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A run's id: a UUIDv7, so ids sort by creation time (monotonic within the process).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(transparent)]
pub struct RunId(Uuid);

/// A plugin name a record can be stored under (the plugin index separates with NUL).
fn check_plugin_name(plugin: &str) -> Result<(), RunError> {
    if plugin.is_empty() || plugin.contains('\0') {
        return Err(RunError::Invalid(format!(
            "plugin name {plugin:?} is empty or contains NUL"
        )));
    }
    Ok(())
}

impl RunId {
    pub fn new() -> RunId {
        RunId(Uuid::now_v7())
    }

    /// The id as a UUID (what the runtime's report and the plugin's records carry).
    pub fn uuid(&self) -> Uuid {
        self.0
    }

    /// The id's key bytes (big-endian time first).
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    pub(crate) fn from_slice(b: &[u8]) -> Option<RunId> {
        Uuid::from_slice(b).ok().map(RunId)
    }

    /// When the id was made (millisecond precision).
    pub fn created_at(&self) -> DateTime<Utc> {
        let ms = self
            .0
            .get_timestamp()
            .map(|t| {
                let (s, ns) = t.to_unix();
                s as i64 * 1000 + i64::from(ns / 1_000_000)
            })
            .unwrap_or(0);
        DateTime::from_timestamp_millis(ms).unwrap_or_default()
    }
}

impl Default for RunId {
    fn default() -> Self {
        RunId::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for RunId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(RunId)
            .map_err(|_| format!("{s:?} is not a run id (a UUID)"))
    }
}

/// Where a run is in its life. `queued` and `running` are active; the rest are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    Queued,
    Running,
    /// The plugin returned an outcome.
    Ok,
    /// The plugin returned an error or trapped.
    Failed,
    /// The run was refused before or while running (policy, disabled plugin).
    Denied,
    /// The run hit its deadline.
    TimedOut,
    /// The engine stopped (crash, kill, shutdown deadline) before the run ended.
    Interrupted,
}

impl RunStatus {
    pub fn is_final(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Ok => "ok",
            RunStatus::Failed => "failed",
            RunStatus::Denied => "denied",
            RunStatus::TimedOut => "timed-out",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a run started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RunTrigger {
    Cron {
        schedule: String,
        scheduled_at: DateTime<Utc>,
    },
    Webhook {
        hook: String,
        /// The sender's delivery id, when the hook names one.
        delivery: Option<String>,
    },
    Manual {
        /// Who asked: an API token's name, or `cli`.
        by: String,
    },
    /// A Docker event: `event` is `type:action` (`container:die`), `actor` the object's
    /// id, `count` the events the debounce window folded into the run.
    Docker {
        device: String,
        event: String,
        actor: String,
        count: u32,
    },
    /// Another plugin's run ended (a run-outcome trigger, `[[triggers.run]]`).
    Run {
        /// The ended run's id.
        run_id: String,
        /// The plugin that ran.
        plugin: String,
        /// How it ended.
        status: String,
        /// Run-outcome triggers in a row that led to this run: 1 when the ended run was
        /// started by something else. A run past `runs.max_chain_depth` is refused and
        /// recorded `denied`.
        depth: u32,
    },
}

impl From<&TriggerEvent> for RunTrigger {
    /// What the record says started a run, from the event the plugin gets.
    fn from(event: &TriggerEvent) -> RunTrigger {
        match event {
            TriggerEvent::Cron {
                schedule,
                scheduled_at,
            } => RunTrigger::Cron {
                schedule: schedule.clone(),
                scheduled_at: *scheduled_at,
            },
            TriggerEvent::Webhook { hook, delivery, .. } => RunTrigger::Webhook {
                hook: hook.clone(),
                delivery: delivery.clone(),
            },
            TriggerEvent::Manual { by, .. } => RunTrigger::Manual { by: by.clone() },
            TriggerEvent::Docker {
                device,
                kind,
                action,
                actor_id,
                count,
                ..
            } => RunTrigger::Docker {
                device: device.clone(),
                event: format!("{kind}:{action}"),
                actor: actor_id.clone(),
                count: *count,
            },
            TriggerEvent::Run {
                run_id,
                plugin,
                status,
                depth,
                ..
            } => RunTrigger::Run {
                run_id: run_id.clone(),
                plugin: plugin.clone(),
                status: status.clone(),
                depth: *depth,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogLine {
    pub at: DateTime<Utc>,
    pub level: LogLevel,
    pub message: String,
}

/// A run's log, capped: when the log exceeds the cap the *oldest* lines go (the last
/// lines usually say how a run ended), counted in `dropped_lines` and `dropped_bytes`.
/// Each line counts its message and [`RunLogs::LINE_OVERHEAD`], so empty lines fill the
/// cap too.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunLogs {
    #[schema(value_type = Vec<LogLine>)]
    pub lines: VecDeque<LogLine>,
    /// Bytes currently kept: each line's message plus [`RunLogs::LINE_OVERHEAD`].
    pub bytes: usize,
    pub dropped_lines: u64,
    /// Message bytes dropped.
    pub dropped_bytes: u64,
}

impl RunLogs {
    /// What a line costs beyond its message: its time, level and the record around them,
    /// as stored and as held in memory.
    pub const LINE_OVERHEAD: usize = 32;

    /// Appends a line, keeping at most `cap` bytes (messages and each line's overhead).
    /// The newest line is always kept: one longer than the cap keeps its last bytes.
    pub fn push(&mut self, mut line: LogLine, cap: usize) {
        let room = cap.saturating_sub(Self::LINE_OVERHEAD);
        if line.message.len() > room {
            let mut cut = line.message.len() - room;
            while !line.message.is_char_boundary(cut) {
                cut += 1;
            }
            self.dropped_bytes += cut as u64;
            line.message.drain(..cut);
        }
        self.bytes += line.message.len() + Self::LINE_OVERHEAD;
        self.lines.push_back(line);
        while self.bytes > cap && self.lines.len() > 1 {
            let Some(old) = self.lines.pop_front() else {
                break;
            };
            self.bytes -= old.message.len() + Self::LINE_OVERHEAD;
            self.dropped_bytes += old.message.len() as u64;
            self.dropped_lines += 1;
        }
    }

    /// Appends another log (e.g. a runtime's buffer), keeping its drop counts.
    pub fn extend(&mut self, other: RunLogs, cap: usize) {
        self.dropped_bytes += other.dropped_bytes;
        self.dropped_lines += other.dropped_lines;
        for line in other.lines {
            self.push(line, cap);
        }
    }
}

pub use crate::plugin::report::{CallDecision, HostCall, RecordedCall};

/// One run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunRecord {
    pub id: RunId,
    pub plugin: String,
    pub trigger: RunTrigger,
    pub queued_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub status: RunStatus,
    /// What the plugin returned on success (its JSON outcome).
    pub outcome: Option<serde_json::Value>,
    /// Why the run failed, was denied, timed out or was interrupted.
    pub error: Option<String>,
    pub logs: RunLogs,
    #[serde(with = "crate::plugin::report::as_recorded")]
    #[schema(value_type = Vec<RecordedCall>)]
    pub host_calls: Vec<HostCall>,
    pub host_calls_dropped: u64,
    /// In cluster mode, the node that ran it (on the records every node gets from the
    /// cluster's history); absent for an engine that runs alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl RunRecord {
    /// From start to finish (or to now, while running).
    pub fn duration(&self) -> Option<chrono::Duration> {
        let start = self.started_at?;
        Some(self.finished_at.unwrap_or_else(Utc::now) - start)
    }
}

/// A run without its logs and host calls: what a webhook's `?wait=true` answers to a
/// sender, who proves only that it holds one signed request.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RunSummary {
    pub id: RunId,
    pub plugin: String,
    pub status: RunStatus,
    pub queued_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// From start to finish (or to now, while running), milliseconds.
    pub duration_ms: Option<i64>,
    /// What the plugin returned on success.
    pub outcome: Option<serde_json::Value>,
    /// Why the run failed, was denied, timed out or was interrupted.
    pub error: Option<String>,
}

impl From<&RunRecord> for RunSummary {
    fn from(r: &RunRecord) -> RunSummary {
        RunSummary {
            id: r.id,
            plugin: r.plugin.clone(),
            status: r.status,
            queued_at: r.queued_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            duration_ms: r.duration().map(|d| d.num_milliseconds()),
            outcome: r.outcome.clone(),
            error: r.error.clone(),
        }
    }
}

/// How a run ended, for [`RunStore::finish`].
#[derive(Debug, Clone, PartialEq)]
pub struct RunEnd {
    /// A final status.
    pub status: RunStatus,
    pub outcome: Option<serde_json::Value>,
    pub error: Option<String>,
    /// Logs not yet appended with [`RunStore::append`].
    pub logs: RunLogs,
    /// Host calls not yet appended.
    pub host_calls: Vec<HostCall>,
}

impl RunEnd {
    pub fn ok(outcome: Option<serde_json::Value>) -> RunEnd {
        RunEnd {
            status: RunStatus::Ok,
            outcome,
            error: None,
            logs: RunLogs::default(),
            host_calls: Vec::new(),
        }
    }

    /// A failed, denied, timed-out or interrupted end with its reason.
    pub fn error(status: RunStatus, error: impl Into<String>) -> RunEnd {
        RunEnd {
            status,
            outcome: None,
            error: Some(error.into()),
            logs: RunLogs::default(),
            host_calls: Vec::new(),
        }
    }
}

/// Limits and retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStoreConfig {
    /// Keep at most this many finished runs per plugin (newest kept). Default 500.
    pub keep_per_plugin: Option<usize>,
    /// Remove finished runs older than this. Default 30 days.
    pub max_age: Option<Duration>,
    /// Log bytes kept per run. Default 64 KiB.
    pub log_cap_bytes: usize,
    /// Host calls kept per run. Default 1000.
    pub max_host_calls: usize,
}

impl Default for RunStoreConfig {
    fn default() -> Self {
        RunStoreConfig {
            keep_per_plugin: Some(500),
            max_age: Some(Duration::from_secs(30 * 24 * 3600)),
            log_cap_bytes: DEFAULT_LOG_CAP_BYTES,
            max_host_calls: DEFAULT_MAX_HOST_CALLS,
        }
    }
}

/// A page of a listing, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct RunPage {
    pub runs: Vec<RunRecord>,
    /// Pass as `before` to get the next (older) page; `None` on the last page.
    pub next: Option<RunId>,
}

/// What to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunQuery {
    /// One plugin's runs, or every plugin's.
    pub plugin: Option<String>,
    /// Only runs older than this one (the previous page's `next`).
    pub before: Option<RunId>,
    /// Page size; 0 means 50; at most [`MAX_PAGE`].
    pub limit: usize,
}

/// What [`RunStore::apply_retention`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retained {
    pub removed_over_count: usize,
    pub removed_over_age: usize,
}

/// The run history. Cheap to clone.
///
/// Active runs are held in memory as well ([`RunStore::live`]): a run's `running`
/// state and the lines appended while it runs change only that copy, and its record is
/// written twice, `queued` when it is created and final when it ends. A crash loses
/// only what a `queued` record on disk cannot say (that the run had started, and its
/// logs so far); the next start marks it `interrupted` all the same.
#[derive(Clone)]
pub struct RunStore {
    history: RunHistory,
    config: RunStoreConfig,
    /// Records per plugin, kept in memory so retention on insert needs no count scan.
    counts: Arc<Mutex<HashMap<String, usize>>>,
    /// The queued and running runs this process created, as they are now.
    live: Arc<Mutex<Live>>,
    /// Unix milliseconds before which no record can be old enough to expire (learnt
    /// by the last expiry pass), so inserts do not scan for expired runs each time.
    expire_not_before: Arc<AtomicI64>,
    updates: broadcast::Sender<Arc<RunRecord>>,
}

/// The active runs of this process, and how many each plugin has.
#[derive(Default)]
struct Live {
    runs: HashMap<RunId, Arc<RunRecord>>,
    per_plugin: HashMap<String, usize>,
    /// Runs whose final record is being written (outside the lock): they take no other
    /// change and no second end.
    ending: HashSet<RunId>,
}

impl Live {
    fn get(&self, id: &RunId) -> Option<&Arc<RunRecord>> {
        self.runs.get(id)
    }

    fn insert(&mut self, record: Arc<RunRecord>) {
        match self.per_plugin.get_mut(&record.plugin) {
            Some(n) => *n += 1,
            None => {
                self.per_plugin.insert(record.plugin.clone(), 1);
            }
        }
        self.runs.insert(record.id, record);
    }

    fn remove(&mut self, id: &RunId) {
        if let Some(r) = self.runs.remove(id)
            && let Some(n) = self.per_plugin.get_mut(&r.plugin)
        {
            *n -= 1;
            if *n == 0 {
                self.per_plugin.remove(&r.plugin);
            }
        }
    }

    fn of_plugin(&self, plugin: &str) -> usize {
        self.per_plugin.get(plugin).copied().unwrap_or(0)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RunStore {
    pub fn open(store: &Store, config: RunStoreConfig) -> Result<RunStore, RunError> {
        let history = RunHistory::open(store)?;
        let counts = history.count_per_plugin()?;
        Ok(RunStore {
            history,
            config,
            counts: Arc::new(Mutex::new(counts)),
            live: Arc::default(),
            expire_not_before: Arc::default(),
            updates: broadcast::channel(FOLLOW_BUFFER).0,
        })
    }

    pub fn config(&self) -> &RunStoreConfig {
        &self.config
    }

    /// Every change to a record, as it is committed. A follower that falls more than
    /// 1024 updates behind gets `RecvError::Lagged` and should re-read with `get`.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<RunRecord>> {
        self.updates.subscribe()
    }

    fn publish(&self, record: Arc<RunRecord>) {
        // No follower is not an error.
        let _ = self.updates.send(record);
    }

    /// Records a new run, `queued`. The record is written but not yet flushed: a caller
    /// that promises the run to someone waits for [`Store::durable`] first.
    pub fn create(&self, plugin: &str, trigger: RunTrigger) -> Result<RunRecord, RunError> {
        check_plugin_name(plugin)?;
        // A fresh id (time and random bits) names no stored or running run: no lookup.
        self.record_new(RunId::new(), plugin, trigger, true)
    }

    /// [`RunStore::create`] under an id chosen elsewhere: in cluster mode the id a run
    /// got when it was accepted, so that a run delivered again (after its node died)
    /// is recorded again under the same id. A stored record under that id (an earlier
    /// attempt's) is replaced; refused while this process runs the id already.
    pub fn create_as(
        &self,
        id: RunId,
        plugin: &str,
        trigger: RunTrigger,
    ) -> Result<RunRecord, RunError> {
        check_plugin_name(plugin)?;
        if lock(&self.live).get(&id).is_some() {
            return Err(RunError::Invalid(format!(
                "run {id} is already running in this engine"
            )));
        }
        let earlier = self.history.get(id)?;
        if let Some(e) = &earlier
            && e.plugin != plugin
        {
            return Err(RunError::Invalid(format!(
                "run {id} is a run of plugin {}, not {plugin}",
                e.plugin
            )));
        }
        self.record_new(id, plugin, trigger, earlier.is_none())
    }

    /// Writes a new `queued` record under `id`; `new`: no earlier attempt's record was
    /// replaced (the run counts towards the plugin's retention).
    fn record_new(
        &self,
        id: RunId,
        plugin: &str,
        trigger: RunTrigger,
        new: bool,
    ) -> Result<RunRecord, RunError> {
        let record = RunRecord {
            id,
            plugin: plugin.to_string(),
            trigger,
            queued_at: Utc::now(),
            started_at: None,
            finished_at: None,
            status: RunStatus::Queued,
            outcome: None,
            error: None,
            logs: RunLogs::default(),
            host_calls: Vec::new(),
            host_calls_dropped: 0,
            node: None,
        };
        self.history.insert(&record)?;
        let shared = Arc::new(record.clone());
        lock(&self.live).insert(shared.clone());
        if new {
            self.count_new(plugin);
        }
        self.publish(shared);
        // The run is recorded; a retention hiccup must not make its creation fail.
        if let Err(e) = self.retain_on_insert(plugin) {
            tracing::warn!(plugin, error = %e, "run retention on insert failed; the periodic pass will retry");
        }
        Ok(record)
    }

    /// `queued` → `running` (in memory: see [`RunStore`]).
    pub fn start(&self, id: RunId) -> Result<RunRecord, RunError> {
        let now = Utc::now();
        self.change_live(id, |r| {
            if r.status != RunStatus::Queued {
                return Err(RunError::InvalidTransition {
                    id,
                    from: r.status,
                    to: RunStatus::Running,
                });
            }
            r.status = RunStatus::Running;
            r.started_at = Some(now);
            Ok(())
        })
    }

    /// Adds log lines and host calls to an active run (for followers while it runs;
    /// in memory until the run ends).
    pub fn append(
        &self,
        id: RunId,
        logs: RunLogs,
        host_calls: Vec<HostCall>,
    ) -> Result<RunRecord, RunError> {
        let (cap, max_calls) = (self.config.log_cap_bytes, self.config.max_host_calls);
        self.change_live(id, |r| {
            if r.status.is_final() {
                return Err(RunError::InvalidTransition {
                    id,
                    from: r.status,
                    to: r.status,
                });
            }
            r.logs.extend(logs.clone(), cap);
            add_host_calls(r, host_calls.clone(), max_calls);
            Ok(())
        })
    }

    /// Changes the in-memory copy of an active run of this process and publishes it;
    /// a run that is not one of them (left by an earlier process) is changed on disk.
    fn change_live(
        &self,
        id: RunId,
        change: impl Fn(&mut RunRecord) -> Result<(), RunError>,
    ) -> Result<RunRecord, RunError> {
        let changed = {
            let mut live = lock(&self.live);
            let ending = live.ending.contains(&id);
            match live.runs.get_mut(&id) {
                // Its end is being written: as if it had ended.
                Some(current) if ending => {
                    return Err(RunError::InvalidTransition {
                        id,
                        from: current.status,
                        to: current.status,
                    });
                }
                Some(current) => {
                    let mut next = RunRecord::clone(current);
                    change(&mut next)?;
                    let next = Arc::new(next);
                    *current = next.clone();
                    Some(next)
                }
                None => None,
            }
        };
        match changed {
            Some(record) => {
                self.publish(record.clone());
                Ok(RunRecord::clone(&record))
            }
            None => self.update(id, change),
        }
    }

    /// Ends an active run (`queued` or `running`) with a final status: one write of
    /// the final record, which leaves the active index with it.
    pub fn finish(&self, id: RunId, end: RunEnd) -> Result<RunRecord, RunError> {
        if !end.status.is_final() {
            return Err(RunError::Invalid(format!(
                "a run cannot finish as {}",
                end.status
            )));
        }
        let now = Utc::now();
        let (cap, max_calls) = (self.config.log_cap_bytes, self.config.max_host_calls);
        // The run is marked ending under the live set's lock, so that two ends of one run
        // cannot both be written, and taken out of it only once the final record is
        // written, so that a reader finds one or the other. The write itself is made
        // outside the lock: the other runs' starts, ends and logs do not wait for it.
        let mut live = lock(&self.live);
        let Some(current) = live.get(&id) else {
            drop(live);
            return self.update(id, |r| apply_end(r, id, end.clone(), now, cap, max_calls));
        };
        if live.ending.contains(&id) {
            return Err(RunError::InvalidTransition {
                id,
                from: current.status,
                to: end.status,
            });
        }
        let mut record = RunRecord::clone(current);
        apply_end(&mut record, id, end, now, cap, max_calls)?;
        live.ending.insert(id);
        drop(live);
        let written = self.history.write_final(&record);
        let mut live = lock(&self.live);
        live.ending.remove(&id);
        written?;
        live.remove(&id);
        drop(live);
        let record = Arc::new(record);
        self.publish(record.clone());
        Ok(Arc::unwrap_or_clone(record))
    }

    /// Applies `change` to a stored record in one transaction, keeping the active index in
    /// step, and publishes the result. `change` may run more than once (on conflict).
    fn update(
        &self,
        id: RunId,
        change: impl Fn(&mut RunRecord) -> Result<(), RunError>,
    ) -> Result<RunRecord, RunError> {
        let record = self
            .history
            .update(id, change)?
            .ok_or(RunError::NotFound(id))?;
        let record = Arc::new(record);
        self.publish(record.clone());
        Ok(Arc::unwrap_or_clone(record))
    }

    fn count_new(&self, plugin: &str) {
        let mut counts = lock(&self.counts);
        match counts.get_mut(plugin) {
            Some(n) => *n += 1,
            None => {
                counts.insert(plugin.to_string(), 1);
            }
        }
    }

    /// Stores a final record another node (or this one, earlier) published to the
    /// cluster's history ([`crate::cluster::history`]), unless [`replaces`] says the
    /// record held here should stay. A run this process is running now is never
    /// touched: its own end comes. Returns whether the record was stored.
    pub fn apply_replicated(&self, record: RunRecord) -> Result<bool, RunError> {
        if record.plugin.is_empty() || record.plugin.contains('\0') {
            return Err(RunError::Invalid(format!(
                "plugin name {:?} is empty or contains NUL",
                record.plugin
            )));
        }
        if lock(&self.live).get(&record.id).is_some() {
            return Ok(false);
        }
        let held = self.history.get(record.id)?;
        if !replaces(held.as_ref(), &record) {
            return Ok(false);
        }
        if let Some(h) = &held
            && h.plugin != record.plugin
        {
            self.remove(h.id, &h.plugin)?;
        }
        let new = held.as_ref().is_none_or(|h| h.plugin != record.plugin);
        self.history.write_replicated(&record)?;
        if new {
            self.count_new(&record.plugin);
        }
        let plugin = record.plugin.clone();
        self.publish(Arc::new(record));
        if new && let Err(e) = self.retain_on_insert(&plugin) {
            tracing::warn!(plugin, error = %e, "run retention on insert failed; the periodic pass will retry");
        }
        Ok(true)
    }

    pub fn get(&self, id: RunId) -> Result<Option<RunRecord>, RunError> {
        if let Some(r) = lock(&self.live).get(&id) {
            return Ok(Some(RunRecord::clone(r)));
        }
        Ok(self.history.get(id)?)
    }

    /// Runs newest first, one page at a time.
    pub fn list(&self, query: &RunQuery) -> Result<RunPage, RunError> {
        let limit = match query.limit {
            0 => 50,
            n => n.min(MAX_PAGE),
        };
        let mut ids = self
            .history
            .newest_ids(query.plugin.as_deref(), query.before, limit + 1)?;
        let more = ids.len() > limit;
        ids.truncate(limit);
        let mut runs = Vec::with_capacity(ids.len());
        for id in &ids {
            // An index entry whose record is gone (removed concurrently) is skipped.
            if let Some(r) = self.get(*id)? {
                runs.push(r);
            }
        }
        Ok(RunPage {
            next: if more { ids.last().copied() } else { None },
            runs,
        })
    }

    /// Ids of the queued and running runs, oldest first.
    pub fn active(&self) -> Result<Vec<RunId>, RunError> {
        self.history
            .active()?
            .into_iter()
            .map(|id| {
                id.ok_or_else(|| RunError::Invalid("malformed id in the active index".into()))
            })
            .collect()
    }

    /// Marks every queued and running run `interrupted` with `reason`: at start-up
    /// (the previous process died with runs in flight) and at shutdown once the grace
    /// period is over. Returns the runs marked.
    pub fn interrupt_active(&self, reason: &str) -> Result<Vec<RunId>, RunError> {
        let mut marked = Vec::new();
        for id in self.active()? {
            match self.finish(id, RunEnd::error(RunStatus::Interrupted, reason)) {
                Ok(_) => marked.push(id),
                // Finished or removed meanwhile: nothing to mark.
                Err(RunError::InvalidTransition { .. } | RunError::NotFound(_)) => {
                    self.history.forget_active(id)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(marked)
    }

    /// Applies both retention rules in full. Call periodically (e.g. hourly).
    pub fn apply_retention(&self) -> Result<Retained, RunError> {
        self.apply_retention_at(Utc::now())
    }

    /// [`RunStore::apply_retention`] as if it were `now` (tests, and catching up).
    pub fn apply_retention_at(&self, now: DateTime<Utc>) -> Result<Retained, RunError> {
        let plugins: Vec<String> = self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut out = Retained::default();
        for p in plugins {
            out.removed_over_count += self.trim_plugin(&p, usize::MAX)?;
        }
        out.removed_over_age = self.expire(now, usize::MAX)?;
        Ok(out)
    }

    fn retain_on_insert(&self, plugin: &str) -> Result<(), RunError> {
        self.trim_plugin(plugin, RETENTION_BATCH)?;
        self.expire(Utc::now(), RETENTION_BATCH)?;
        Ok(())
    }

    /// Removes a plugin's oldest finished runs beyond `keep_per_plugin`, at most `max`.
    fn trim_plugin(&self, plugin: &str, max: usize) -> Result<usize, RunError> {
        let Some(keep) = self.config.keep_per_plugin else {
            return Ok(0);
        };
        let count = self.count(plugin);
        if count <= keep {
            return Ok(0);
        }
        // Active runs count towards `keep` but are not removed: at most the finished
        // ones go (this process's active runs are known; an earlier process's are few,
        // and skipped by the scan).
        let finished = count.saturating_sub(lock(&self.live).of_plugin(plugin));
        let excess = (count - keep).min(finished).min(max);
        if excess == 0 {
            return Ok(0);
        }
        // An insert's pass looks at a bounded number of entries; the periodic one at all.
        let mut budget = if max == usize::MAX {
            usize::MAX
        } else {
            max.saturating_mul(4)
        };
        let mut removed = 0;
        for id in self.history.oldest_ids_of(plugin) {
            if removed == excess || budget == 0 {
                break;
            }
            budget -= 1;
            let id = id?;
            if self.history.is_active(id)? {
                continue;
            }
            if self.remove(id, plugin)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes finished runs that ended before `now - max_age`, oldest first, at most
    /// `max`.
    fn expire(&self, now: DateTime<Utc>, max: usize) -> Result<usize, RunError> {
        let Some(max_age) = self.config.max_age else {
            return Ok(0);
        };
        let max_age = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
        // Nothing can have become old enough since a pass that found the oldest record
        // young: an insert's pass skips the scan until then (the periodic one does not).
        if max != usize::MAX
            && now.timestamp_millis() < self.expire_not_before.load(Ordering::Relaxed)
        {
            return Ok(0);
        }
        let cutoff = now - max_age;
        let mut removed = 0;
        let mut kept_old = false;
        // When the next record can be old enough, if this pass gets to know it.
        let mut next = None;
        for id in self.history.oldest_ids() {
            if removed == max {
                break;
            }
            let id = id?;
            // Ids are in creation order: nothing after this one is old enough.
            if id.created_at() >= cutoff {
                next = Some(id.created_at() + max_age);
                break;
            }
            // Removed meanwhile: nothing to expire.
            let Some(record) = self.history.get(id)? else {
                continue;
            };
            if record.status.is_final()
                && record.finished_at.unwrap_or(record.queued_at) < cutoff
                && self.remove(id, &record.plugin)?
            {
                removed += 1;
            } else {
                kept_old = true;
            }
        }
        if removed < max && next.is_none() {
            // The whole history was looked at: a record created from now on is next.
            next = Some(now + max_age);
        }
        if let Some(next) = next.filter(|_| !kept_old) {
            self.expire_not_before
                .store(next.timestamp_millis(), Ordering::Relaxed);
        }
        Ok(removed)
    }

    /// Removes one finished record and its index entry. False if it was gone already.
    fn remove(&self, id: RunId, plugin: &str) -> Result<bool, RunError> {
        let existed = self.history.remove(id, plugin)?;
        if existed {
            let mut counts = lock(&self.counts);
            if let Some(n) = counts.get_mut(plugin) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(plugin);
                }
            }
        }
        Ok(existed)
    }

    /// Records held for a plugin.
    pub fn count(&self, plugin: &str) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(plugin)
            .copied()
            .unwrap_or(0)
    }

    pub fn flush(&self) -> Result<(), RunError> {
        Ok(self.history.flush()?)
    }
}

/// Whether a final record from the cluster's history replaces `held`, the record this
/// node has under the same id: always when there is none or the held one is not final
/// (a run of a node that died, marked `interrupted` here, or never ended here); a
/// final record held here gives way to another final one unless they are the same
/// (the latest published end of a run wins, as the history stream keeps only that).
/// A non-final record never replaces anything: only ends are replicated.
pub fn replaces(held: Option<&RunRecord>, incoming: &RunRecord) -> bool {
    if !incoming.status.is_final() {
        return false;
    }
    match held {
        None => true,
        Some(h) => h != incoming,
    }
}

/// A run's end applied to its record; refused when the record is final already.
fn apply_end(
    r: &mut RunRecord,
    id: RunId,
    end: RunEnd,
    now: DateTime<Utc>,
    cap: usize,
    max_calls: usize,
) -> Result<(), RunError> {
    if r.status.is_final() {
        return Err(RunError::InvalidTransition {
            id,
            from: r.status,
            to: end.status,
        });
    }
    r.status = end.status;
    r.finished_at = Some(now);
    r.outcome = end.outcome;
    r.error = end.error;
    r.logs.extend(end.logs, cap);
    add_host_calls(r, end.host_calls, max_calls);
    Ok(())
}

fn add_host_calls(r: &mut RunRecord, calls: Vec<HostCall>, max: usize) {
    for call in calls {
        if r.host_calls.len() < max {
            r.host_calls.push(call);
        } else {
            r.host_calls_dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path, config: RunStoreConfig) -> RunStore {
        RunStore::open(&Store::open(dir).unwrap(), config).unwrap()
    }

    fn manual() -> RunTrigger {
        RunTrigger::Manual { by: "cli".into() }
    }

    fn line(msg: &str) -> LogLine {
        LogLine {
            at: Utc::now(),
            level: LogLevel::Info,
            message: msg.into(),
        }
    }

    fn call(op: &str) -> HostCall {
        HostCall::from(RecordedCall {
            op: op.into(),
            device: Some("local".into()),
            request: Some("POST /containers/web/restart".into()),
            decision: CallDecision::Deny,
            reason: Some("POST=0".into()),
        })
    }

    #[test]
    fn a_new_run_is_queued_with_a_time_ordered_id() {
        let dir = tempfile::tempdir().unwrap();
        let runs = open(dir.path(), RunStoreConfig::default());
        let a = runs.create("heal", manual()).unwrap();
        let b = runs.create("heal", manual()).unwrap();
        assert_eq!(a.status, RunStatus::Queued);
        assert!(a.started_at.is_none() && a.finished_at.is_none());
        assert!(b.id > a.id, "ids sort by creation");
        assert!((a.id.created_at() - a.queued_at).num_milliseconds().abs() <= 1);
        assert_eq!(runs.active().unwrap(), vec![a.id, b.id]);
        assert_eq!(a.id.to_string().parse::<RunId>().unwrap(), a.id);
        assert!("nope".parse::<RunId>().is_err());
    }

    #[test]
    fn starting_and_finishing_record_times_status_outcome_logs_and_host_calls() {
        let dir = tempfile::tempdir().unwrap();
        let runs = open(dir.path(), RunStoreConfig::default());
        let r = runs.create("heal", manual()).unwrap();
        let started = runs.start(r.id).unwrap();
        assert_eq!(started.status, RunStatus::Running);
        let mut logs = RunLogs::default();
        logs.push(line("restarting web"), 1024);
        let mut end = RunEnd::ok(Some(serde_json::json!({"restarted": ["web"]})));
        end.logs = logs;
        end.host_calls = vec![call("docker.restart-container")];
        let done = runs.finish(r.id, end).unwrap();
        assert_eq!(done.status, RunStatus::Ok);
        assert!(done.finished_at.unwrap() >= done.started_at.unwrap());
        assert!(done.duration().unwrap() >= chrono::Duration::zero());
        assert_eq!(done.outcome.unwrap()["restarted"][0], "web");
        assert_eq!(done.logs.lines[0].message, "restarting web");
        assert_eq!(done.host_calls[0].decision, CallDecision::Deny);
        assert!(runs.active().unwrap().is_empty());
        assert_eq!(runs.get(r.id).unwrap().unwrap().status, RunStatus::Ok);
    }

    #[test]
    fn a_finished_run_cannot_be_started_or_finished_again() {
        let dir = tempfile::tempdir().unwrap();
        let runs = open(dir.path(), RunStoreConfig::default());
        let r = runs.create("heal", manual()).unwrap();
        runs.finish(r.id, RunEnd::error(RunStatus::Denied, "plugin disabled"))
            .unwrap();
        let e = runs.start(r.id).unwrap_err();
        assert!(
            e.to_string()
                .contains("is denied; it cannot become running"),
            "{e}"
        );
        let e = runs.finish(r.id, RunEnd::ok(None)).unwrap_err();
        assert!(matches!(e, RunError::InvalidTransition { .. }), "{e}");
        let e = runs
            .finish(r.id, RunEnd::error(RunStatus::Running, "x"))
            .unwrap_err();
        assert!(e.to_string().contains("cannot finish as running"), "{e}");
        let missing = RunId::new();
        assert!(matches!(runs.start(missing), Err(RunError::NotFound(id)) if id == missing));
        assert!(runs.get(missing).unwrap().is_none());
    }

    #[test]
    fn ends_raced_from_many_threads_record_one_end_per_run_and_the_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let runs = open(dir.path(), RunStoreConfig::default());
        let ids: Vec<RunId> = (0..50)
            .map(|_| runs.create("heal", manual()).unwrap().id)
            .collect();
        // Eight threads end every run at once, each with its own status and log line,
        // and log to it meanwhile: the final record is written outside the live set's
        // lock, and none of it may give a run two ends or a change after its end.
        let statuses = [RunStatus::Ok, RunStatus::Failed];
        let won: Vec<Vec<(RunId, RunStatus, String)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|t| {
                    let (runs, ids) = (&runs, &ids);
                    s.spawn(move || {
                        let mut won = Vec::new();
                        for id in ids {
                            let mut logs = RunLogs::default();
                            logs.push(line(&format!("extra {t}")), 1024);
                            // Refused once the run is ending or ended, never lost silently.
                            let _ = runs.append(*id, logs, Vec::new());
                            let status = statuses[t % 2];
                            let mut end = RunEnd::error(status, format!("thread {t}"));
                            end.logs.push(line(&format!("end {t}")), 1024);
                            match runs.finish(*id, end) {
                                Ok(r) => won.push((*id, r.status, format!("end {t}"))),
                                Err(e) => {
                                    assert!(matches!(e, RunError::InvalidTransition { .. }), "{e}")
                                }
                            }
                        }
                        won
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won: Vec<_> = won.into_iter().flatten().collect();
        assert_eq!(won.len(), ids.len(), "each run ended exactly once");
        for (id, status, last) in won {
            let stored = runs.get(id).unwrap().unwrap();
            assert_eq!(stored.status, status);
            assert_eq!(stored.logs.lines.back().unwrap().message, last);
        }
        assert!(runs.active().unwrap().is_empty());
        assert!(matches!(
            runs.finish(ids[0], RunEnd::ok(None)),
            Err(RunError::InvalidTransition { .. })
        ));
    }

    #[test]
    fn listing_is_newest_first_per_plugin_or_overall_and_pages_with_a_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let runs = open(dir.path(), RunStoreConfig::default());
        let mut heal = Vec::new();
        let mut all = Vec::new();
        for i in 0..7 {
            let r = runs.create("heal", manual()).unwrap();
            heal.push(r.id);
            all.push(r.id);
            if i % 2 == 0 {
                // A plugin whose name extends the other's must not leak into its list.
                all.push(runs.create("heal-x", manual()).unwrap().id);
            }
        }
        heal.reverse();
        all.reverse();
        let page = |plugin: Option<&str>, before, limit| {
            runs.list(&RunQuery {
                plugin: plugin.map(str::to_string),
                before,
                limit,
            })
            .unwrap()
        };
        let p1 = page(Some("heal"), None, 3);
        assert_eq!(p1.runs.iter().map(|r| r.id).collect::<Vec<_>>(), heal[..3]);
        let p2 = page(Some("heal"), p1.next, 3);
        assert_eq!(p2.runs.iter().map(|r| r.id).collect::<Vec<_>>(), heal[3..6]);
        let p3 = page(Some("heal"), p2.next, 3);
        assert_eq!(p3.runs.iter().map(|r| r.id).collect::<Vec<_>>(), heal[6..]);
        assert_eq!(p3.next, None);
        let overall = page(None, None, 0);
        assert_eq!(overall.runs.iter().map(|r| r.id).collect::<Vec<_>>(), all);
        let older = page(None, Some(all[2]), 2);
        assert_eq!(
            older.runs.iter().map(|r| r.id).collect::<Vec<_>>(),
            all[3..5]
        );
        assert!(page(Some("nobody"), None, 5).runs.is_empty());
    }

    #[test]
    fn logs_keep_the_newest_lines_within_the_cap_and_count_what_was_dropped() {
        let per_line = 7 + RunLogs::LINE_OVERHEAD;
        let mut logs = RunLogs::default();
        for i in 0..10 {
            logs.push(line(&format!("line {i:02}")), 4 * per_line + 2);
        }
        let kept: Vec<_> = logs.lines.iter().map(|l| l.message.as_str()).collect();
        assert_eq!(kept, ["line 06", "line 07", "line 08", "line 09"]);
        assert_eq!(logs.bytes, 4 * per_line);
        assert_eq!(logs.dropped_lines, 6);
        assert_eq!(logs.dropped_bytes, 42);
        let mut long = RunLogs::default();
        long.push(line("ééééé-tail"), 6 + RunLogs::LINE_OVERHEAD);
        assert_eq!(long.lines[0].message, "-tail");
        assert_eq!(long.dropped_bytes, 10);
    }

    #[test]
    fn empty_log_lines_fill_the_cap_with_their_overhead() {
        // The reported attack: thousands of empty records under a 64 KiB cap.
        let cap = 64 * 1024;
        let mut logs = RunLogs::default();
        for _ in 0..9_990 {
            logs.push(line(""), cap);
        }
        assert_eq!(logs.lines.len(), cap / RunLogs::LINE_OVERHEAD);
        assert!(logs.bytes <= cap);
        assert_eq!(
            logs.dropped_lines,
            9_990 - (cap / RunLogs::LINE_OVERHEAD) as u64
        );
        // The newest line is kept even when the cap is smaller than its overhead.
        let mut tiny = RunLogs::default();
        tiny.push(line("a"), 1);
        tiny.push(line("last"), 1);
        assert_eq!(tiny.lines.len(), 1);
        assert_eq!(tiny.lines[0].message, "");
    }

    #[test]
    fn the_store_caps_logs_and_host_calls_of_each_run() {
        let dir = tempfile::tempdir().unwrap();
        let config = RunStoreConfig {
            log_cap_bytes: 10 + RunLogs::LINE_OVERHEAD,
            max_host_calls: 2,
            ..RunStoreConfig::default()
        };
        let runs = open(dir.path(), config);
        let r = runs.create("heal", manual()).unwrap();
        runs.start(r.id).unwrap();
        let mut logs = RunLogs::default();
        logs.push(line("0123456789"), usize::MAX);
        runs.append(r.id, logs, vec![call("a"), call("b"), call("c")])
            .unwrap();
        let mut more = RunLogs::default();
        more.push(line("abc"), usize::MAX);
        let mut end = RunEnd::ok(None);
        end.logs = more;
        end.host_calls = vec![call("d")];
        let done = runs.finish(r.id, end).unwrap();
        assert_eq!(done.logs.lines.len(), 1);
        assert_eq!(done.logs.lines[0].message, "abc");
        assert_eq!(done.logs.dropped_bytes, 10);
        assert_eq!(done.host_calls.len(), 2);
        assert_eq!(done.host_calls_dropped, 2);
        let e = runs.append(r.id, RunLogs::default(), vec![]).unwrap_err();
        assert!(matches!(e, RunError::InvalidTransition { .. }));
    }

    #[tokio::test]
    async fn followers_receive_every_change_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let runs = open(dir.path(), RunStoreConfig::default());
        let mut follow = runs.subscribe();
        let r = runs.create("heal", manual()).unwrap();
        runs.start(r.id).unwrap();
        runs.finish(r.id, RunEnd::error(RunStatus::Failed, "exit 1"))
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let u = follow.recv().await.unwrap();
            assert_eq!(u.id, r.id);
            seen.push(u.status);
        }
        assert_eq!(
            seen,
            [RunStatus::Queued, RunStatus::Running, RunStatus::Failed]
        );
    }

    #[test]
    fn records_survive_reopening_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let runs = open(dir.path(), RunStoreConfig::default());
            let r = runs
                .create(
                    "deploy",
                    RunTrigger::Webhook {
                        hook: "registry".into(),
                        delivery: Some("d-1".into()),
                    },
                )
                .unwrap();
            runs.start(r.id).unwrap();
            runs.finish(r.id, RunEnd::ok(Some(serde_json::json!("done"))))
                .unwrap();
            runs.flush().unwrap();
            r.id
        };
        let runs = open(dir.path(), RunStoreConfig::default());
        let r = runs.get(id).unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Ok);
        assert_eq!(r.outcome, Some(serde_json::json!("done")));
        assert!(
            matches!(r.trigger, RunTrigger::Webhook { ref delivery, .. } if delivery.as_deref() == Some("d-1"))
        );
        assert_eq!(runs.count("deploy"), 1, "counts are rebuilt at open");
    }

    #[test]
    fn runs_left_queued_or_running_by_a_crash_are_marked_interrupted_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let (running, queued, done) = {
            let runs = open(dir.path(), RunStoreConfig::default());
            let a = runs.create("heal", manual()).unwrap();
            runs.start(a.id).unwrap();
            let b = runs.create("heal", manual()).unwrap();
            let c = runs.create("heal", manual()).unwrap();
            runs.finish(c.id, RunEnd::ok(None)).unwrap();
            runs.flush().unwrap();
            (a.id, b.id, c.id)
        };
        let runs = open(dir.path(), RunStoreConfig::default());
        let marked = runs
            .interrupt_active("the engine stopped before the run finished")
            .unwrap();
        assert_eq!(marked, vec![running, queued]);
        for id in [running, queued] {
            let r = runs.get(id).unwrap().unwrap();
            assert_eq!(r.status, RunStatus::Interrupted);
            assert!(r.finished_at.is_some());
            assert_eq!(
                r.error.as_deref(),
                Some("the engine stopped before the run finished")
            );
        }
        assert_eq!(runs.get(done).unwrap().unwrap().status, RunStatus::Ok);
        assert!(runs.interrupt_active("again").unwrap().is_empty());
    }

    #[test]
    fn retention_keeps_the_last_runs_per_plugin_but_never_an_active_one() {
        let dir = tempfile::tempdir().unwrap();
        let config = RunStoreConfig {
            keep_per_plugin: Some(3),
            ..RunStoreConfig::default()
        };
        let runs = open(dir.path(), config);
        let still_running = runs.create("heal", manual()).unwrap();
        runs.start(still_running.id).unwrap();
        let mut finished = Vec::new();
        for _ in 0..5 {
            let r = runs.create("heal", manual()).unwrap();
            runs.finish(r.id, RunEnd::ok(None)).unwrap();
            finished.push(r.id);
        }
        let other = runs.create("other", manual()).unwrap();
        runs.finish(other.id, RunEnd::ok(None)).unwrap();
        // Trimming happens on insert: the oldest finished runs went; the running one,
        // though oldest, stays.
        let kept: Vec<_> = runs
            .list(&RunQuery {
                plugin: Some("heal".into()),
                ..RunQuery::default()
            })
            .unwrap()
            .runs
            .iter()
            .map(|r| r.id)
            .collect();
        assert!(kept.contains(&still_running.id));
        assert!(kept.contains(&finished[4]) && kept.contains(&finished[3]));
        assert!(!kept.contains(&finished[0]) && !kept.contains(&finished[1]));
        assert!(runs.get(finished[0]).unwrap().is_none());
        assert_eq!(runs.count("heal"), kept.len());
        assert!(runs.get(other.id).unwrap().is_some());
    }

    #[test]
    fn retention_removes_finished_runs_past_the_maximum_age() {
        let dir = tempfile::tempdir().unwrap();
        let config = RunStoreConfig {
            keep_per_plugin: None,
            max_age: Some(Duration::from_secs(3600)),
            ..RunStoreConfig::default()
        };
        let runs = open(dir.path(), config);
        let old = runs.create("heal", manual()).unwrap();
        runs.finish(old.id, RunEnd::ok(None)).unwrap();
        let active = runs.create("heal", manual()).unwrap();
        assert_eq!(runs.apply_retention().unwrap(), Retained::default());
        let later = Utc::now() + chrono::Duration::hours(2);
        let done = runs.apply_retention_at(later).unwrap();
        assert_eq!(done.removed_over_age, 1);
        assert!(runs.get(old.id).unwrap().is_none());
        assert!(
            runs.get(active.id).unwrap().is_some(),
            "active runs are kept"
        );
        assert_eq!(runs.count("heal"), 1);
        let listed = runs
            .list(&RunQuery {
                plugin: Some("heal".into()),
                ..RunQuery::default()
            })
            .unwrap();
        assert_eq!(listed.runs.len(), 1, "the index entry went with the record");
    }

    #[test]
    fn records_serialize_with_kebab_case_status_and_tagged_triggers() {
        let dir = tempfile::tempdir().unwrap();
        let runs = open(dir.path(), RunStoreConfig::default());
        let at = DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let r = runs
            .create(
                "heal",
                RunTrigger::Cron {
                    schedule: "*/5 * * * *".into(),
                    scheduled_at: at,
                },
            )
            .unwrap();
        let r = runs
            .finish(r.id, RunEnd::error(RunStatus::TimedOut, "deadline 30s"))
            .unwrap();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["status"], "timed-out");
        assert_eq!(v["trigger"]["kind"], "cron");
        assert_eq!(v["trigger"]["schedule"], "*/5 * * * *");
        assert_eq!(v["trigger"]["scheduled_at"], "2026-03-01T10:00:00Z");
        assert_eq!(v["id"], r.id.to_string());
    }

    #[test]
    fn a_plugin_name_with_nul_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let runs = open(dir.path(), RunStoreConfig::default());
        assert!(matches!(
            runs.create("a\0b", manual()),
            Err(RunError::Invalid(_))
        ));
        assert!(matches!(
            runs.create("", manual()),
            Err(RunError::Invalid(_))
        ));
    }

    #[test]
    fn a_run_recorded_again_under_its_id_replaces_the_earlier_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let runs = open(dir.path(), RunStoreConfig::default());
        let id = RunId::new();
        let first = runs.create_as(id, "heal", manual()).unwrap();
        assert_eq!(first.id, id);
        // While this process runs it, the id cannot be taken again.
        assert!(matches!(
            runs.create_as(id, "heal", manual()),
            Err(RunError::Invalid(_))
        ));
        runs.finish(id, RunEnd::error(RunStatus::Interrupted, "killed"))
            .unwrap();
        // Another plugin cannot reuse the id.
        assert!(matches!(
            runs.create_as(id, "other", manual()),
            Err(RunError::Invalid(_))
        ));
        let again = runs.create_as(id, "heal", manual()).unwrap();
        assert_eq!(again.status, RunStatus::Queued);
        runs.finish(id, RunEnd::ok(None)).unwrap();
        let page = runs.list(&RunQuery::default()).unwrap();
        assert_eq!(page.runs.len(), 1, "one record per run id");
        assert_eq!(page.runs[0].status, RunStatus::Ok);
        assert_eq!(runs.count("heal"), 1);
    }

    #[test]
    fn a_replicated_end_replaces_an_interrupted_record_but_not_a_running_one() {
        let dir = tempfile::tempdir().unwrap();
        let runs = open(dir.path(), RunStoreConfig::default());
        // A run this node was killed in: interrupted here, ended ok elsewhere.
        let killed = runs.create("heal", manual()).unwrap();
        runs.finish(killed.id, RunEnd::error(RunStatus::Interrupted, "killed"))
            .unwrap();
        let mut elsewhere = runs.get(killed.id).unwrap().unwrap();
        elsewhere.status = RunStatus::Ok;
        elsewhere.error = None;
        elsewhere.node = Some("n2".into());
        assert!(runs.apply_replicated(elsewhere.clone()).unwrap());
        assert_eq!(runs.get(killed.id).unwrap().unwrap(), elsewhere);
        // The same record again changes nothing; an older non-final one neither.
        assert!(!runs.apply_replicated(elsewhere.clone()).unwrap());
        let mut older = elsewhere.clone();
        older.status = RunStatus::Running;
        assert!(!runs.apply_replicated(older).unwrap());
        assert_eq!(runs.get(killed.id).unwrap().unwrap().status, RunStatus::Ok);

        // A run of another node, unknown here: listed, counted, followers told.
        let mut follow = runs.subscribe();
        let mut other = elsewhere.clone();
        other.id = RunId::new();
        assert!(runs.apply_replicated(other.clone()).unwrap());
        assert_eq!(follow.try_recv().unwrap().id, other.id);
        assert_eq!(runs.count("heal"), 2);
        assert!(!runs.active().unwrap().contains(&other.id));

        // A run this process runs now is left to its own end.
        let live = runs.create("heal", manual()).unwrap();
        let mut ended = live.clone();
        ended.status = RunStatus::Ok;
        assert!(!runs.apply_replicated(ended).unwrap());
        assert_eq!(
            runs.get(live.id).unwrap().unwrap().status,
            RunStatus::Queued
        );
        assert!(
            !replaces(None, &live),
            "a non-final record is not replicated"
        );
    }
}
