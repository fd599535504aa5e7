//! The run lifecycle: how a cron fire, a webhook delivery or a manual request becomes a
//! recorded plugin run.
//!
//! [`Scheduler`] is the hub `capstan serve` is built around. It owns the plugin runtime
//! and the run history, and holds the engine's live triggers ([`Triggers`]) and plugin
//! administration ([`PluginAdmin`]: install, remove, hook secrets) for the routes and
//! tasks that need them. What it does itself is the run lifecycle below; each trigger
//! kind submits its runs here ([`crate::trigger`]).
//!
//! Every run goes the same way ([`Scheduler::submit`]):
//! 1. a `queued` record is written before anything else, so a run that never ends still
//!    leaves a trace (marked `interrupted` at the next start);
//! 2. the run waits for a slot of its plugin (`max_runs_per_plugin`) and then for one of
//!    the engine (`max_concurrent_runs`); a plugin with `max_queued_per_plugin` runs
//!    already waiting refuses more (a webhook answers 503), so a flood cannot grow the
//!    queue without bound;
//! 3. `running`, the plugin runs on a fresh instance under its limits (its deadline is
//!    `limits.timeout_secs`), and the record gets its end: status, outcome, logs, host
//!    calls.
//!
//! Shutdown ([`Scheduler::shutdown`]): nothing new is accepted, runs not yet started
//! are recorded `interrupted`, running ones get a grace period, and the rest are
//! stopped and recorded `interrupted`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, oneshot, watch};

use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::plugin::admin::PluginAdmin;
use crate::plugin::report::{self, RunReport};
use crate::plugin::{PluginError, PluginRuntime, TriggerEvent};
use crate::runs::{
    LogLevel, LogLine, RunEnd, RunError, RunId, RunLogs, RunRecord, RunStatus, RunStore,
    RunStoreConfig, RunTrigger,
};
use crate::trigger::Triggers;
use crate::trigger::cron::CronScheduler;
use crate::trigger::webhook::Webhooks;

/// Engine-wide run settings (the `[runs]` table of the engine config).
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Runs executing at once, across plugins.
    pub max_concurrent_runs: usize,
    /// Runs of one plugin executing at once.
    pub max_runs_per_plugin: usize,
    /// Runs of one plugin waiting for a slot; beyond this, new runs are refused.
    pub max_queued_per_plugin: usize,
    /// How long running runs may go on at shutdown before they are stopped.
    pub shutdown_grace: Duration,
    /// The longest a caller may wait for a run's end (`?wait=true`).
    pub max_wait: Duration,
    /// Run history retention and caps.
    pub history: RunStoreConfig,
    /// Run-outcome triggers in a row: a run that would be deeper in such a chain is
    /// refused and recorded ([`crate::trigger::run`]).
    pub max_chain_depth: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_concurrent_runs: 16,
            max_runs_per_plugin: 4,
            max_queued_per_plugin: 1_000,
            shutdown_grace: Duration::from_secs(30),
            max_wait: Duration::from_secs(60),
            history: RunStoreConfig::default(),
            max_chain_depth: 3,
        }
    }
}

/// Why a run could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("no plugin named {0:?} is installed")]
    NotInstalled(String),
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error(
        "plugin {plugin:?} already has {queued} runs waiting (runs.max_queued_per_plugin); try again later"
    )]
    QueueFull { plugin: String, queued: usize },
    #[error(transparent)]
    Store(#[from] RunError),
}

/// What [`Scheduler::shutdown`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StopReport {
    /// Runs that ended by themselves within the grace period.
    pub finished: usize,
    /// Runs stopped at the end of the grace period, or never started: `interrupted`.
    pub interrupted: usize,
}

/// A plugin's share of the engine: its run slots and its queue length.
struct PluginGate {
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
}

/// A run recorded `queued` and holding a place in its plugin's queue, not yet started.
struct Admitted {
    record: RunRecord,
    gate: Arc<PluginGate>,
}

/// A run in flight: how to stop it and how to learn that it ended.
struct InFlight {
    abort: tokio::task::AbortHandle,
    done: watch::Receiver<bool>,
    started: bool,
}

pub struct Scheduler {
    engine: Arc<Engine>,
    runtime: Arc<PluginRuntime>,
    runs: RunStore,
    triggers: Arc<Triggers>,
    plugins: PluginAdmin,
    metrics: Arc<Metrics>,
    config: SchedulerConfig,
    global: Arc<Semaphore>,
    gates: Mutex<HashMap<String, Arc<PluginGate>>>,
    in_flight: Mutex<HashMap<RunId, InFlight>>,
    /// Wakes `shutdown` when a run ends.
    ended: tokio::sync::Notify,
    stopping: AtomicBool,
    /// Called with every run's final record (run-outcome triggers, notifications).
    end_listeners: std::sync::RwLock<Vec<RunEndListener>>,
    /// Cluster mode: where cron fires and webhook deliveries go instead of
    /// [`Scheduler::submit`] (see [`crate::cluster`]). Unset: the engine runs alone.
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

/// What [`Scheduler::on_run_end`] registers: called once per run, with its final record,
/// on the task that ended the run. It must not block (hand work to a task of its own).
pub type RunEndListener = Box<dyn Fn(&Arc<Scheduler>, &RunRecord) + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Scheduler {
    /// Opens the run history (marking runs a previous process left unfinished as
    /// `interrupted`) and the webhooks. Plugins are loaded and their triggers activated
    /// by [`PluginAdmin::load_installed`].
    pub fn new(
        engine: Arc<Engine>,
        runtime: Arc<PluginRuntime>,
        metrics: Arc<Metrics>,
        config: SchedulerConfig,
    ) -> anyhow::Result<Arc<Scheduler>> {
        let runs = RunStore::open(&engine.store, config.history.clone())?;
        let left = runs.interrupt_active("the engine stopped before the run ended")?;
        if !left.is_empty() {
            tracing::warn!(
                runs = left.len(),
                "runs left unfinished by the previous engine process are recorded as interrupted"
            );
        }
        let triggers = Arc::new(Triggers::open(&engine.store)?);
        Ok(Arc::new(Scheduler {
            global: Arc::new(Semaphore::new(config.max_concurrent_runs.max(1))),
            plugins: PluginAdmin::new(engine.clone(), runtime.clone(), triggers.clone()),
            engine,
            runtime,
            runs,
            triggers,
            metrics,
            config,
            gates: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            ended: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
            end_listeners: std::sync::RwLock::new(Vec::new()),
            cluster: std::sync::OnceLock::new(),
        }))
    }

    /// A scheduler with the engine's `[runs]` settings and a plugin runtime of its own
    /// (for tools and tests that serve the API without `capstan serve`).
    pub fn with_defaults(engine: Arc<Engine>) -> anyhow::Result<Arc<Scheduler>> {
        let config = engine.settings.runs.clone();
        let runtime = Arc::new(PluginRuntime::new(
            engine.clone(),
            crate::plugin::RuntimeConfig {
                max_concurrent_runs: config.max_concurrent_runs as u32,
                ..Default::default()
            },
        )?);
        Scheduler::new(engine, runtime, Arc::new(Metrics::new()), config)
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn runtime(&self) -> &Arc<PluginRuntime> {
        &self.runtime
    }

    pub fn runs(&self) -> &RunStore {
        &self.runs
    }

    /// Install, remove, hook secrets.
    pub fn plugins(&self) -> &PluginAdmin {
        &self.plugins
    }

    pub fn triggers(&self) -> &Arc<Triggers> {
        &self.triggers
    }

    pub fn hooks(&self) -> &Arc<Webhooks> {
        &self.triggers.hooks
    }

    pub fn cron(&self) -> &CronScheduler {
        &self.triggers.cron
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The cluster this engine is a node of, if any: triggers hand their runs to it.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.get()
    }

    /// Makes this engine a node of `cluster` (once, before triggers fire).
    pub fn join_cluster(&self, cluster: Arc<crate::cluster::Cluster>) {
        self.runtime.join_cluster(cluster.clone());
        cluster.count_in(self.metrics.cluster_series(cluster.node_name()));
        if self.cluster.set(cluster).is_ok() {
            crate::cluster::Cluster::publish_local_ends(self);
        }
    }

    fn gate(&self, plugin: &str) -> Arc<PluginGate> {
        lock(&self.gates)
            .entry(plugin.to_string())
            .or_insert_with(|| {
                Arc::new(PluginGate {
                    slots: Arc::new(Semaphore::new(self.config.max_runs_per_plugin.max(1))),
                    queued: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    /// Registers `listener` to be called with the final record of every run that ends
    /// from now on (whatever its status, `interrupted` at shutdown included).
    pub fn on_run_end(&self, listener: RunEndListener) {
        self.end_listeners
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(listener);
    }

    /// Calls the run-end listeners with `record`.
    fn tell_end(self: &Arc<Self>, record: &RunRecord) {
        let listeners = self.end_listeners.read().unwrap_or_else(|e| e.into_inner());
        for listener in listeners.iter() {
            listener(self, record);
        }
    }

    /// Records a run of `plugin` that is refused before it is queued (a chain of
    /// run-outcome triggers past `max_chain_depth`): a `denied` record whose error is
    /// `reason`, counted, and told to the run-end listeners like any other end. Must not
    /// be called from a run-end listener (they would be called within themselves).
    pub fn refuse(
        self: &Arc<Self>,
        plugin: &str,
        event: &TriggerEvent,
        reason: &str,
    ) -> Result<RunId, SubmitError> {
        let record = self.runs.create(plugin, RunTrigger::from(event))?;
        let record = self
            .runs
            .finish(record.id, RunEnd::error(RunStatus::Denied, reason))?;
        self.metrics
            .run_finished(plugin, RunStatus::Denied.as_str(), Duration::ZERO);
        self.tell_end(&record);
        Ok(record.id)
    }

    /// Records a `queued` run (its trigger as the event says) and starts it in the
    /// background. Returns its id at once.
    pub fn submit(
        self: &Arc<Self>,
        plugin: &str,
        event: TriggerEvent,
    ) -> Result<RunId, SubmitError> {
        self.submit_to(plugin, event, None)
    }

    /// [`Scheduler::submit`], and the runtime's full report of the run (stdout, stderr,
    /// denials: more than its record keeps) on the receiver once the run has ended. No
    /// report comes for a run the runtime could not start or that was stopped.
    pub fn submit_reporting(
        self: &Arc<Self>,
        plugin: &str,
        event: TriggerEvent,
    ) -> Result<(RunId, oneshot::Receiver<RunReport>), SubmitError> {
        let (tx, rx) = oneshot::channel();
        Ok((self.submit_to(plugin, event, Some(tx))?, rx))
    }

    /// [`Scheduler::submit`], returning only once the `queued` record is on disk
    /// (flushed together with whatever else was written meanwhile: group commit), so a
    /// crash after the answer loses no accepted run. What a webhook's 202 waits for.
    /// When the record cannot be made durable the run is not started: its record ends
    /// `failed` and the error is returned.
    pub async fn submit_durable(
        self: &Arc<Self>,
        plugin: &str,
        event: TriggerEvent,
    ) -> Result<RunId, SubmitError> {
        let admitted = self.admit(plugin, &event)?;
        if let Err(e) = self.engine.store.durable().await {
            let id = admitted.record.id;
            admitted.gate.queued.fetch_sub(1, Ordering::SeqCst);
            let reason = format!("the run's record could not be made durable: {e}");
            match self
                .runs
                .finish(id, RunEnd::error(RunStatus::Failed, &reason))
            {
                Ok(record) => self.tell_end(&record),
                Err(e) => tracing::error!(run = %id, error = %e, "cannot record the run's end"),
            }
            return Err(SubmitError::Store(RunError::Store(e)));
        }
        Ok(self.launch(admitted, event, None))
    }

    /// [`Scheduler::submit`] with a log line the record carries from the start (a run a
    /// cluster delivers again says which attempt it is).
    pub fn submit_noted(
        self: &Arc<Self>,
        plugin: &str,
        event: TriggerEvent,
        note: LogLine,
    ) -> Result<RunId, SubmitError> {
        self.submit_as(RunId::new(), plugin, event, vec![note])
    }

    /// [`Scheduler::submit`] under an id chosen before (cluster mode: when the run was
    /// accepted, so a run delivered again is recorded again under the same id, replacing
    /// an earlier attempt's record), with log lines the record carries from the start.
    pub fn submit_as(
        self: &Arc<Self>,
        id: RunId,
        plugin: &str,
        event: TriggerEvent,
        notes: Vec<LogLine>,
    ) -> Result<RunId, SubmitError> {
        let admitted = self.admit_as(Some(id), plugin, &event)?;
        if !notes.is_empty() {
            let mut logs = RunLogs::default();
            for note in notes {
                logs.push(note, self.runs.config().log_cap_bytes);
            }
            if let Err(e) = self.runs.append(admitted.record.id, logs, Vec::new()) {
                tracing::warn!(run = %admitted.record.id, error = %e, "cannot add the note to the run's record");
            }
        }
        Ok(self.launch(admitted, event, None))
    }

    fn submit_to(
        self: &Arc<Self>,
        plugin: &str,
        event: TriggerEvent,
        report_to: Option<oneshot::Sender<RunReport>>,
    ) -> Result<RunId, SubmitError> {
        let admitted = self.admit(plugin, &event)?;
        Ok(self.launch(admitted, event, report_to))
    }

    /// Takes a place in the plugin's queue and records the run `queued`.
    fn admit(
        self: &Arc<Self>,
        plugin: &str,
        event: &TriggerEvent,
    ) -> Result<Admitted, SubmitError> {
        self.admit_as(None, plugin, event)
    }

    /// [`Scheduler::admit`] under `id` when one was chosen elsewhere, else a fresh one.
    fn admit_as(
        self: &Arc<Self>,
        id: Option<RunId>,
        plugin: &str,
        event: &TriggerEvent,
    ) -> Result<Admitted, SubmitError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        if self.runtime.plugin(plugin).is_none() {
            return Err(SubmitError::NotInstalled(plugin.to_string()));
        }
        let gate = self.gate(plugin);
        let queued = gate.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.config.max_queued_per_plugin {
            gate.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull {
                plugin: plugin.to_string(),
                queued,
            });
        }
        let trigger = RunTrigger::from(event);
        let created = match id {
            Some(id) => self.runs.create_as(id, plugin, trigger),
            None => self.runs.create(plugin, trigger),
        };
        match created {
            Ok(record) => Ok(Admitted { record, gate }),
            Err(e) => {
                gate.queued.fetch_sub(1, Ordering::SeqCst);
                Err(e.into())
            }
        }
    }

    /// Starts an admitted run in the background.
    fn launch(
        self: &Arc<Self>,
        admitted: Admitted,
        event: TriggerEvent,
        report_to: Option<oneshot::Sender<RunReport>>,
    ) -> RunId {
        let Admitted { record, gate } = admitted;
        let id = record.id;
        let (done_tx, done_rx) = watch::channel(false);
        // The map entry is in place before the task can end and remove it.
        let mut in_flight = lock(&self.in_flight);
        let task =
            tokio::spawn(
                self.clone()
                    .execute(id, record.plugin, event, gate, done_tx, report_to),
            );
        in_flight.insert(
            id,
            InFlight {
                abort: task.abort_handle(),
                done: done_rx,
                started: false,
            },
        );
        id
    }

    async fn execute(
        self: Arc<Self>,
        id: RunId,
        plugin: String,
        event: TriggerEvent,
        gate: Arc<PluginGate>,
        done: watch::Sender<bool>,
        report_to: Option<oneshot::Sender<RunReport>>,
    ) {
        // Whatever happens to this task (an end, an abort at shutdown), the record gets
        // a final status and waiters are woken.
        let mut guard = RunGuard {
            scheduler: self.clone(),
            id,
            plugin: plugin.clone(),
            done,
            queued: Some(gate.clone()),
            started_at: None,
            finished: false,
        };
        let Ok(_plugin_slot) = gate.slots.clone().acquire_owned().await else {
            return;
        };
        let Ok(_engine_slot) = self.global.clone().acquire_owned().await else {
            return;
        };
        guard.dequeue();
        if self.stopping.load(Ordering::SeqCst) {
            return; // the guard records it interrupted
        }
        if let Err(e) = self.runs.start(id) {
            tracing::error!(run = %id, error = %e, "cannot record the run's start");
            return;
        }
        if let Some(f) = lock(&self.in_flight).get_mut(&id) {
            f.started = true;
        }
        guard.started_at = Some(Instant::now());
        let end = match self.runtime.run_as(&plugin, event, id.uuid()).await {
            Ok(report) => {
                for c in &report.host_calls {
                    self.metrics.host_call(&c.op, c.decision.as_str());
                    if c.op == crate::plugin::host::http::OP {
                        self.metrics
                            .outbound_request(&plugin, c.decision.as_str(), &c.result);
                    }
                }
                if let Some(tx) = report_to {
                    // The receiver may have stopped waiting: then nobody wants it.
                    let _ = tx.send(report.clone());
                }
                end_of(report, self.runs.config().log_cap_bytes)
            }
            Err(PluginError::NotInstalled(name)) => RunEnd::error(
                RunStatus::Failed,
                format!("plugin {name} was removed before the run started"),
            ),
            Err(e) => RunEnd::error(RunStatus::Failed, e.to_string()),
        };
        guard.finish(end);
    }

    /// Waits up to `timeout` (at most `max_wait`) for a run to end, and returns its
    /// record as it is then.
    pub async fn wait(&self, id: RunId, timeout: Duration) -> Result<RunRecord, RunError> {
        if let Some(mut done) = self.done_of(id) {
            let _ = tokio::time::timeout(timeout.min(self.config.max_wait), done.wait_for(|d| *d))
                .await;
        }
        self.runs.get(id)?.ok_or(RunError::NotFound(id))
    }

    /// Resolves when run `id` has ended (at once when it already has).
    pub async fn until_ended(&self, id: RunId) {
        if let Some(mut done) = self.done_of(id) {
            let _ = done.wait_for(|d| *d).await;
        }
    }

    /// Turns true when run `id` ends; `None` when it already has.
    fn done_of(&self, id: RunId) -> Option<watch::Receiver<bool>> {
        lock(&self.in_flight).get(&id).map(|f| f.done.clone())
    }

    /// Runs queued or running now.
    pub fn in_flight(&self) -> usize {
        lock(&self.in_flight).len()
    }

    /// Stops accepting runs, records the ones not yet started as interrupted, gives
    /// running ones up to `shutdown_grace` and stops the rest (recorded interrupted).
    pub async fn shutdown(&self) -> StopReport {
        self.stopping.store(true, Ordering::SeqCst);
        let before = self.in_flight();
        // Not started yet: they would start after the grace period, so stop them now.
        let waiting: Vec<tokio::task::AbortHandle> = lock(&self.in_flight)
            .values()
            .filter(|f| !f.started)
            .map(|f| f.abort.clone())
            .collect();
        let mut interrupted = waiting.len();
        for a in waiting {
            a.abort();
        }
        let deadline = tokio::time::Instant::now() + self.config.shutdown_grace;
        loop {
            let notified = self.ended.notified();
            let running: Vec<tokio::task::AbortHandle> = lock(&self.in_flight)
                .values()
                .filter(|f| f.started)
                .map(|f| f.abort.clone())
                .collect();
            if running.is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(
                    runs = running.len(),
                    grace = ?self.config.shutdown_grace,
                    "runs still going at the end of the shutdown grace period are stopped"
                );
                interrupted += running.len();
                for a in running {
                    a.abort();
                }
                break;
            }
        }
        // Aborted tasks record their end when dropped; wait for that (briefly).
        let settle = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.in_flight() > 0 && tokio::time::Instant::now() < settle {
            let _ = tokio::time::timeout_at(settle, self.ended.notified()).await;
        }
        if let Err(e) = self
            .runs
            .interrupt_active("the engine stopped before the run ended")
        {
            tracing::error!(error = %e, "cannot record interrupted runs");
        }
        if let Err(e) = self.engine.store.flush() {
            tracing::error!(error = %e, "cannot flush the store");
        }
        StopReport {
            finished: before.saturating_sub(interrupted),
            interrupted,
        }
    }
}

/// Gives a run its final record however its task ends.
struct RunGuard {
    scheduler: Arc<Scheduler>,
    id: RunId,
    plugin: String,
    done: watch::Sender<bool>,
    queued: Option<Arc<PluginGate>>,
    started_at: Option<Instant>,
    finished: bool,
}

impl RunGuard {
    fn dequeue(&mut self) {
        if let Some(g) = self.queued.take() {
            g.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn finish(&mut self, end: RunEnd) {
        let s = &self.scheduler;
        let status = end.status;
        match s.runs.finish(self.id, end) {
            Ok(record) => s.tell_end(&record),
            Err(e) => tracing::error!(run = %self.id, error = %e, "cannot record the run's end"),
        }
        let took = self.started_at.map(|t| t.elapsed()).unwrap_or_default();
        s.metrics.run_finished(&self.plugin, status.as_str(), took);
        self.finished = true;
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.dequeue();
        if !self.finished {
            let why = if self.started_at.is_some() {
                "stopped at shutdown: the run did not end within the shutdown grace period"
            } else {
                "the engine stopped before the run started"
            };
            self.finish(RunEnd::error(RunStatus::Interrupted, why));
        }
        lock(&self.scheduler.in_flight).remove(&self.id);
        let _ = self.done.send(true);
        self.scheduler.ended.notify_waiters();
    }
}

/// The record's end from what the runtime reported.
pub fn end_of(report: RunReport, log_cap: usize) -> RunEnd {
    let denied = !report.denials.is_empty();
    let status = match report.status {
        report::Exit::Succeeded => RunStatus::Ok,
        report::Exit::TimedOut => RunStatus::TimedOut,
        // A run that failed after the policy refused one of its calls failed *because*
        // it was denied.
        report::Exit::Failed if denied => RunStatus::Denied,
        report::Exit::Failed | report::Exit::MemoryExceeded | report::Exit::Trapped => {
            RunStatus::Failed
        }
    };
    let outcome = report.outcome.as_ref().map(|o| {
        let details = if o.details.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&o.details)
                .unwrap_or_else(|_| serde_json::Value::String(o.details.clone()))
        };
        serde_json::json!({ "summary": o.summary, "details": details })
    });
    let error = match (report.status, &report.error) {
        (report::Exit::Succeeded, _) => None,
        (s, Some(e)) => Some(format!("{s}: {e}")),
        (s, None) => Some(s.to_string()),
    };
    let mut logs = RunLogs::default();
    let base = report.started_at;
    for r in &report.logs {
        let mut message = r.message.clone();
        for (k, v) in &r.fields {
            message.push_str(&format!(" {k}={v}"));
        }
        logs.push(
            LogLine {
                at: base + chrono::Duration::microseconds((r.at_ms * 1000.0) as i64),
                level: level_of(&r.level),
                message,
            },
            log_cap,
        );
    }
    if report.logs_dropped > 0 {
        logs.dropped_lines += report.logs_dropped;
    }
    let finished = base + chrono::Duration::microseconds((report.duration_ms * 1000.0) as i64);
    for (text, level, stream) in [
        (&report.stdout, LogLevel::Info, "stdout"),
        (&report.stderr, LogLevel::Warn, "stderr"),
    ] {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            logs.push(
                LogLine {
                    at: finished,
                    level,
                    message: format!("[{stream}] {line}"),
                },
                log_cap,
            );
        }
    }
    // Each call carries its own decision and reason, recorded by the host function.
    let host_calls = report.host_calls;
    RunEnd {
        status,
        outcome,
        error,
        logs,
        host_calls,
    }
}

fn level_of(level: &str) -> LogLevel {
    match level {
        "trace" => LogLevel::Trace,
        "debug" => LogLevel::Debug,
        "warn" | "warning" => LogLevel::Warn,
        "error" => LogLevel::Error,
        _ => LogLevel::Info,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::report::{CallDecision, Denial, HostCall, LogRecord, Outcome};

    fn report(status: report::Exit) -> RunReport {
        RunReport {
            run_id: uuid::Uuid::new_v4(),
            plugin: "p".into(),
            version: "1".into(),
            trigger: "manual".into(),
            started_at: chrono::Utc::now(),
            status,
            outcome: None,
            error: None,
            logs: vec![],
            logs_dropped: 0,
            stdout: String::new(),
            stderr: String::new(),
            stdout_dropped: 0,
            stderr_dropped: 0,
            host_calls: vec![],
            host_calls_total: 0,
            denials: vec![],
            duration_ms: 3.0,
        }
    }

    #[test]
    fn a_successful_report_becomes_ok_with_its_outcome_logs_and_calls() {
        let mut r = report(report::Exit::Succeeded);
        r.outcome = Some(Outcome {
            summary: "2 restarted".into(),
            details: r#"{"restarted":["a","b"]}"#.into(),
        });
        r.logs.push(LogRecord {
            at_ms: 1.5,
            level: "warn".into(),
            message: "slow".into(),
            fields: vec![("device".into(), "local".into())],
        });
        r.stdout = "hello\n".into();
        r.host_calls.push(HostCall {
            op: "docker.list-containers".into(),
            device: "local".into(),
            request: "GET /containers/json".into(),
            decision: CallDecision::Allow,
            result: "ok".into(),
            ms: 1.0,
            reason: "allowed by the plugin's policy".into(),
        });
        let end = end_of(r, 1024);
        assert_eq!(end.status, RunStatus::Ok);
        assert_eq!(end.error, None);
        let o = end.outcome.unwrap();
        assert_eq!(o["summary"], "2 restarted");
        assert_eq!(o["details"]["restarted"][1], "b");
        let lines: Vec<_> = end.logs.lines.iter().map(|l| l.message.as_str()).collect();
        assert_eq!(lines, ["slow device=local", "[stdout] hello"]);
        assert_eq!(end.logs.lines[0].level, LogLevel::Warn);
        assert_eq!(end.host_calls.len(), 1);
        assert_eq!(end.host_calls[0].decision, CallDecision::Allow);
        assert_eq!(end.host_calls[0].recorded_reason(), None);
    }

    #[test]
    fn a_failure_after_a_denial_is_denied_with_the_reason_on_the_call() {
        let mut r = report(report::Exit::Failed);
        r.error = Some("denied: POST is off".into());
        r.host_calls.push(HostCall {
            op: "docker.restart-container".into(),
            device: "local".into(),
            request: "POST /containers/web/restart".into(),
            decision: CallDecision::Deny,
            result: "denied".into(),
            ms: 0.1,
            reason: "ALLOW_RESTARTS is 0".into(),
        });
        r.denials.push(Denial {
            op: "docker.restart-container".into(),
            device: "local".into(),
            request: "POST /containers/web/restart".into(),
            reason: "ALLOW_RESTARTS is 0".into(),
        });
        let end = end_of(r, 1024);
        assert_eq!(end.status, RunStatus::Denied);
        assert!(end.error.unwrap().contains("POST is off"));
        assert_eq!(end.host_calls[0].decision, CallDecision::Deny);
        assert_eq!(
            end.host_calls[0].recorded_reason(),
            Some("ALLOW_RESTARTS is 0")
        );
    }

    #[tokio::test]
    async fn a_refused_run_is_recorded_denied_counted_and_told_to_the_listeners() {
        let dir = tempfile::tempdir().unwrap();
        let scheduler = Scheduler::with_defaults(Arc::new(Engine::scratch(dir.path()))).unwrap();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        scheduler.on_run_end(Box::new(move |_, r: &RunRecord| {
            lock(&h).push((r.id, r.status));
        }));
        let event = TriggerEvent::Run {
            run_id: "r".into(),
            plugin: "a".into(),
            status: "failed".into(),
            outcome: String::new(),
            depth: 4,
        };
        let id = scheduler.refuse("b", &event, "too deep").unwrap();
        let r = scheduler.runs().get(id).unwrap().unwrap();
        assert_eq!(
            (r.status, r.error.as_deref()),
            (RunStatus::Denied, Some("too deep"))
        );
        assert_eq!(r.started_at, None, "never started");
        assert!(
            matches!(r.trigger, RunTrigger::Run { depth: 4, .. }),
            "{:?}",
            r.trigger
        );
        assert_eq!(*lock(&heard), [(id, RunStatus::Denied)]);
        let metrics = scheduler.metrics().render(&scheduler.engine().docker);
        assert!(
            metrics.contains(r#"capstan_runs_total{plugin="b",status="denied"} 1"#),
            "{metrics}"
        );
    }

    #[test]
    fn timeouts_traps_and_memory_map_to_their_statuses() {
        assert_eq!(
            end_of(report(report::Exit::TimedOut), 10).status,
            RunStatus::TimedOut
        );
        for s in [report::Exit::Trapped, report::Exit::MemoryExceeded] {
            let end = end_of(report(s), 10);
            assert_eq!(end.status, RunStatus::Failed);
            assert!(end.error.unwrap().starts_with(s.as_str()));
        }
    }
}
