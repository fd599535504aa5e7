//! The run lifecycle: how a cron fire, a webhook delivery or a manual request becomes a
//! recorded plugin run.
//!
//! [`Scheduler`] is the hub `capstan serve` is built around. It owns the plugin runtime,
//! the run history, the cron scheduler and the installed webhooks, and is the one place
//! that installs and removes plugins, so a plugin's triggers start and stop with it
//! while the engine runs.
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

use tokio::sync::{Semaphore, watch};

use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::plugin::report::{self, RunReport};
use crate::plugin::{
    InstalledPlugin, LoadedPlugin, PluginError, PluginRuntime, PluginSource, TriggerEvent,
};
use crate::runs::{
    self, Decision, LogLevel, LogLine, RunEnd, RunError, RunId, RunLogs, RunRecord, RunStatus,
    RunStore, RunStoreConfig, RunTrigger,
};
use crate::secret::Secret;
use crate::trigger::cron::{CronScheduler, CronTrigger, FireInfo, TriggerId};
use crate::trigger::webhook::{Delivery, HookError, HookKeys, Webhooks};

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

/// Why a hook's secrets could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum HookAdminError {
    #[error("no installed plugin declares hook {0:?}")]
    Unknown(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// Shortest hook secret accepted.
pub const MIN_HOOK_SECRET: usize = 16;

/// What [`Scheduler::install`] did.
#[derive(Debug)]
pub struct Installed {
    pub plugin: InstalledPlugin,
    /// Webhook secrets generated for hooks that had none, shown to the user once.
    pub generated_secrets: Vec<(String, Secret)>,
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
    hooks: Arc<Webhooks>,
    cron: CronScheduler,
    metrics: Arc<Metrics>,
    config: SchedulerConfig,
    global: Arc<Semaphore>,
    gates: Mutex<HashMap<String, Arc<PluginGate>>>,
    in_flight: Mutex<HashMap<RunId, InFlight>>,
    /// Wakes `shutdown` when a run ends.
    ended: tokio::sync::Notify,
    stopping: AtomicBool,
    /// Installs and removes one at a time.
    admin: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Scheduler {
    /// Opens the run history (marking runs a previous process left unfinished as
    /// `interrupted`) and the webhooks. Plugins are loaded and their triggers activated
    /// by [`Scheduler::load_installed`].
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
        let hooks = Arc::new(Webhooks::open(&engine.store)?);
        Ok(Arc::new(Scheduler {
            global: Arc::new(Semaphore::new(config.max_concurrent_runs.max(1))),
            engine,
            runtime,
            runs,
            hooks,
            cron: CronScheduler::new(),
            metrics,
            config,
            gates: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            ended: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
            admin: Mutex::new(()),
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

    pub fn hooks(&self) -> &Arc<Webhooks> {
        &self.hooks
    }

    pub fn cron(&self) -> &CronScheduler {
        &self.cron
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Loads every installed plugin and activates its triggers. Returns the plugins (or
    /// triggers) that could not be, with why; the others run.
    pub fn load_installed(&self) -> anyhow::Result<(crate::plugin::LoadSummary, Vec<String>)> {
        let mut summary = self.runtime.load_installed()?;
        let mut problems = Vec::new();
        for rec in self.runtime.installed()? {
            let Some(plugin) = self.runtime.plugin(&rec.name) else {
                continue;
            };
            if let Err(e) = self.activate(&plugin) {
                problems.push(format!("plugin {}: {e}", rec.name));
            }
        }
        summary.failed.sort();
        Ok((summary, problems))
    }

    /// Installs (or replaces) a plugin from its manifest and component, and activates
    /// its triggers at once. Hooks without a secret get a generated one.
    pub fn install(&self, src: &PluginSource) -> Result<Installed, PluginError> {
        let _admin = lock(&self.admin);
        let (manifest, source) = (src.manifest.as_str(), src.manifest_file.as_str());
        // A hook owned by another plugin is refused before anything is stored.
        let parsed = crate::plugin::Manifest::parse(manifest, source)?;
        for h in &parsed.triggers.webhook {
            if let Some(owner) = self.hooks.owner(&h.name)
                && owner != parsed.name
            {
                return Err(PluginError::Source(format!(
                    "{source}: hook {:?} already belongs to plugin {owner:?}; choose another name or remove that plugin first",
                    h.name
                )));
            }
        }
        let plugin = self
            .runtime
            .install_bytes(manifest, source, &src.wasm, &src.wasm_file)?;
        let mut generated_secrets = Vec::new();
        for h in &parsed.triggers.webhook {
            match HookKeys::load(&self.engine.vault, &h.name) {
                Ok(_) => {}
                Err(HookError::NoSecret(_)) => {
                    let secret = Secret::random_hex(32);
                    HookKeys::set(&self.engine.vault, &h.name, &secret)
                        .map_err(|e| PluginError::Trigger(e.to_string()))?;
                    generated_secrets.push((h.name.clone(), secret));
                }
                Err(e) => return Err(PluginError::Trigger(e.to_string())),
            }
        }
        let loaded = self
            .runtime
            .plugin(&plugin.name)
            .ok_or_else(|| PluginError::NotInstalled(plugin.name.clone()))?;
        self.activate(&loaded)
            .map_err(|e| PluginError::Trigger(format!("{e:#}")))?;
        self.engine.store.flush()?;
        Ok(Installed {
            plugin,
            generated_secrets,
        })
    }

    /// Removes a plugin: its triggers stop at once (runs under way finish), then its
    /// files, compiled code, state and hook secrets go.
    pub fn remove(&self, name: &str) -> Result<InstalledPlugin, PluginError> {
        let _admin = lock(&self.admin);
        let rec = self.runtime.installed_plugin(name)?;
        self.deactivate(name);
        for h in &rec.triggers.webhook {
            if let Err(e) = HookKeys::remove(&self.engine.vault, &h.name) {
                tracing::warn!(hook = %h.name, error = %e, "could not remove the hook's secrets");
            }
        }
        self.runtime.remove(name)
    }

    /// The plugin that declares hook `name`.
    fn hook_plugin(&self, name: &str) -> Result<String, HookAdminError> {
        self.runtime
            .installed()?
            .into_iter()
            .find(|p| p.triggers.webhook.iter().any(|h| h.name == name))
            .map(|p| p.name)
            .ok_or_else(|| HookAdminError::Unknown(name.to_string()))
    }

    /// Puts a hook's secrets from the vault into effect at once.
    fn apply_hook_keys(&self, name: &str, plugin: &str) -> Result<(), HookAdminError> {
        let keys = HookKeys::load(&self.engine.vault, name)?;
        if !self.hooks.set_keys(name, keys)
            && let Some(p) = self.runtime.plugin(plugin)
        {
            // The hook was closed for want of a secret: open it now.
            self.activate(&p)
                .map_err(|e| HookAdminError::Invalid(format!("{e:#}")))?;
        }
        self.engine.store.flush()?;
        Ok(())
    }

    /// Gives hook `name` a new secret (`None`: a generated one, returned to show once).
    /// The old secret stays valid until [`Scheduler::retire_hook`], so senders can be
    /// switched over without losing deliveries. Takes effect at once.
    pub fn rotate_hook(
        &self,
        name: &str,
        secret: Option<Secret>,
    ) -> Result<Option<Secret>, HookAdminError> {
        let _admin = lock(&self.admin);
        let plugin = self.hook_plugin(name)?;
        let (secret, generated) = match secret {
            Some(s) => (s, false),
            None => (Secret::random_hex(32), true),
        };
        if secret.expose().len() < MIN_HOOK_SECRET {
            return Err(HookAdminError::Invalid(format!(
                "a hook secret must be at least {MIN_HOOK_SECRET} bytes"
            )));
        }
        match HookKeys::rotate(&self.engine.vault, name, &secret) {
            Ok(()) => {}
            Err(HookError::NoSecret(_)) => HookKeys::set(&self.engine.vault, name, &secret)?,
            Err(e) => return Err(e.into()),
        }
        self.apply_hook_keys(name, &plugin)?;
        tracing::info!(hook = name, "hook secret rotated");
        Ok(generated.then_some(secret))
    }

    /// Stops accepting hook `name`'s previous secret. Returns whether it had one.
    pub fn retire_hook(&self, name: &str) -> Result<bool, HookAdminError> {
        let _admin = lock(&self.admin);
        let plugin = self.hook_plugin(name)?;
        let had = HookKeys::retire_previous(&self.engine.vault, name)?;
        self.apply_hook_keys(name, &plugin)?;
        Ok(had)
    }

    /// Puts a loaded plugin's triggers in place of whatever it had. Hooks it still
    /// declares are replaced in place, so their delivery ids are remembered across an
    /// update.
    fn activate(&self, plugin: &LoadedPlugin) -> anyhow::Result<()> {
        self.cron.remove_plugin(&plugin.name);
        for (i, c) in plugin.triggers.cron.iter().enumerate() {
            // `run_on_start` fires on install and when the engine starts.
            let trigger = CronTrigger::from_config(c)?;
            self.cron
                .add(TriggerId::new(&plugin.name, i as u32), trigger);
        }
        for old in self.hooks.list() {
            if old.plugin == plugin.name
                && !plugin.triggers.webhook.iter().any(|h| h.name == old.name)
            {
                self.hooks.remove(&old.name)?;
            }
        }
        let mut missing = Vec::new();
        for h in &plugin.triggers.webhook {
            let spec = h.validate()?;
            match HookKeys::load(&self.engine.vault, &h.name) {
                Ok(keys) => self.hooks.install(&plugin.name, spec, keys)?,
                Err(HookError::NoSecret(_)) => {
                    self.hooks.remove(&h.name)?;
                    missing.push(h.name.clone());
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !missing.is_empty() {
            anyhow::bail!(
                "hook(s) {} have no secret in the vault and stay closed: set one with `capstan hook rotate NAME`",
                missing.join(", ")
            );
        }
        Ok(())
    }

    fn deactivate(&self, name: &str) {
        self.cron.remove_plugin(name);
        if let Err(e) = self.hooks.remove_plugin(name) {
            tracing::warn!(plugin = name, error = %e, "could not remove the plugin's hooks");
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

    /// Records a `queued` run and starts it in the background. Returns its id at once.
    pub fn submit(
        self: &Arc<Self>,
        plugin: &str,
        trigger: RunTrigger,
        event: TriggerEvent,
    ) -> Result<RunId, SubmitError> {
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
        let record = match self.runs.create(plugin, trigger) {
            Ok(r) => r,
            Err(e) => {
                gate.queued.fetch_sub(1, Ordering::SeqCst);
                return Err(e.into());
            }
        };
        let id = record.id;
        let (done_tx, done_rx) = watch::channel(false);
        // The map entry is in place before the task can end and remove it.
        let mut in_flight = lock(&self.in_flight);
        let task = tokio::spawn(
            self.clone()
                .execute(id, plugin.to_string(), event, gate, done_tx),
        );
        in_flight.insert(
            id,
            InFlight {
                abort: task.abort_handle(),
                done: done_rx,
                started: false,
            },
        );
        Ok(id)
    }

    async fn execute(
        self: Arc<Self>,
        id: RunId,
        plugin: String,
        event: TriggerEvent,
        gate: Arc<PluginGate>,
        done: watch::Sender<bool>,
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
        let end = match self.runtime.run(&plugin, event).await {
            Ok(report) => {
                for c in &report.host_calls {
                    self.metrics.host_call(&c.op, &c.decision);
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

    /// Turns true when run `id` ends; `None` when it already has.
    fn done_of(&self, id: RunId) -> Option<watch::Receiver<bool>> {
        lock(&self.in_flight).get(&id).map(|f| f.done.clone())
    }

    /// Runs queued or running now.
    pub fn in_flight(&self) -> usize {
        lock(&self.in_flight).len()
    }

    /// Fires cron triggers until `shutdown` resolves. Each fire is a run; the trigger's
    /// overlap policy sees the run as going on until it ends.
    pub async fn run_cron(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let me = self.clone();
        let report = self
            .cron
            .run(
                move |id: TriggerId, fire: FireInfo| {
                    let me = me.clone();
                    async move { me.cron_fire(id, fire).await }
                },
                shutdown,
                // The fires only wait for their runs; `shutdown` looks after the runs.
                Duration::ZERO,
            )
            .await;
        tracing::debug!(?report, "cron scheduler stopped");
    }

    async fn cron_fire(self: Arc<Self>, id: TriggerId, fire: FireInfo) {
        let trigger = RunTrigger::Cron {
            schedule: fire.schedule.to_string(),
            scheduled_at: fire.scheduled_at,
        };
        let event = TriggerEvent::Cron {
            schedule: fire.schedule.to_string(),
            scheduled_at: fire.scheduled_at,
        };
        match self.submit(id.plugin(), trigger, event) {
            Ok(run) => {
                if let Some(mut done) = self.done_of(run) {
                    let _ = done.wait_for(|d| *d).await;
                }
            }
            Err(SubmitError::ShuttingDown) => {}
            Err(e) => {
                tracing::warn!(plugin = id.plugin(), trigger = id.index(), error = %e, "cron fire not run")
            }
        }
    }

    /// Starts the run for a verified webhook delivery (the launcher of the hook route).
    pub fn launch_delivery(self: &Arc<Self>, d: Delivery) -> Result<RunId, SubmitError> {
        let trigger = RunTrigger::Webhook {
            hook: d.hook.clone(),
            delivery: d.delivery_id.clone(),
        };
        let event = TriggerEvent::Webhook {
            hook: d.hook,
            headers: d.headers,
            body: d.body.to_vec(),
        };
        self.submit(&d.plugin, trigger, event)
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

/// `?wait=true` on a hook: answer with the run's end (bounded by `runs.max_wait`).
#[derive(Debug, Default, serde::Deserialize)]
struct HookQuery {
    #[serde(default)]
    wait: bool,
}

/// The `POST /hooks/{name}` route, outside the token-protected `/api` tree: each hook
/// authenticates its deliveries itself ([`crate::trigger::webhook`]). Answers 202 with
/// the run id; with `?wait=true`, 200 with the finished run (or 202 with the run so far
/// when it outlasts `runs.max_wait`): its summary ([`crate::runs::RunSummary`]), or the
/// full record when the hook has `wait_response = "full"` or the request carries a
/// valid API token in `X-Capstan-Token` ([`full_record`]).
pub fn hook_router(scheduler: Arc<Scheduler>) -> axum::Router {
    use axum::routing::post;
    axum::Router::new()
        .route(crate::api::HOOK_PATH, post(hook))
        .with_state(scheduler)
}

async fn hook(
    axum::extract::State(s): axum::extract::State<Arc<Scheduler>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    query: Result<axum::extract::Query<HookQuery>, axum::extract::rejection::QueryRejection>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    // Refused as every other refusal on this route is: JSON, and counted.
    let refused = |e: crate::trigger::webhook::WebhookError| {
        let resp = e.into_response();
        s.metrics
            .webhook_delivery("", delivery_result(resp.status()));
        resp
    };
    let wait = match query {
        Ok(q) => q.0.wait,
        Err(e) => {
            return refused(crate::trigger::webhook::WebhookError::Unprocessable(
                format!("the query: {}", e.body_text()),
            ));
        }
    };
    let full = match wait.then(|| full_record(&s, &name, &headers)) {
        None => false,
        Some(Ok(full)) => full,
        Some(Err(e)) => return refused(e),
    };
    let started: Arc<Mutex<Option<RunId>>> = Arc::default();
    let (cell, launcher) = (started.clone(), s.clone());
    let resp = crate::trigger::webhook::deliver(&s.hooks, &name, &headers, body, move |d| {
        let r = launcher.launch_delivery(d);
        if let Ok(id) = &r {
            *lock(&cell) = Some(*id);
        }
        async move { r.map_err(|e| e.to_string()) }
    })
    .await;
    // Unknown hooks share one label, so strangers cannot create series at will.
    let label = if resp.status() == StatusCode::NOT_FOUND {
        ""
    } else {
        name.as_str()
    };
    s.metrics
        .webhook_delivery(label, delivery_result(resp.status()));
    let id = *lock(&started);
    match id {
        Some(id) if wait && resp.status() == StatusCode::ACCEPTED => {
            match s.wait(id, s.config.max_wait).await {
                Ok(record) => {
                    let status = if record.status.is_final() {
                        StatusCode::OK
                    } else {
                        StatusCode::ACCEPTED
                    };
                    let body = if full {
                        serde_json::json!({
                            "status": record.status,
                            "run_id": id.to_string(),
                            "detail": "full",
                            "run": record,
                        })
                    } else {
                        serde_json::json!({
                            "status": record.status,
                            "run_id": id.to_string(),
                            "detail": "summary",
                            "run": crate::runs::RunSummary::from(&record),
                        })
                    };
                    (status, axum::Json(body)).into_response()
                }
                Err(e) => {
                    tracing::error!(run = %id, error = %e, "cannot read the run record");
                    resp
                }
            }
        }
        _ => resp,
    }
}

/// Whether a `?wait=true` answer carries the full run record (logs, host calls): when
/// the hook opts in (`wait_response = "full"`), or the request also carries a valid API
/// token in `X-Capstan-Token`. Otherwise a summary: one captured delivery must not
/// hand its holder what the plugin logged and touched. A token that does not verify is
/// refused (401) before anything runs, rather than silently answered with less.
fn full_record(
    s: &Scheduler,
    hook: &str,
    headers: &axum::http::HeaderMap,
) -> Result<bool, crate::trigger::webhook::WebhookError> {
    use crate::trigger::webhook::{API_TOKEN_HEADER, WaitResponse, WebhookError};
    match s.hooks.wait_response(hook) {
        // Unknown: the delivery answers 404.
        None => return Ok(false),
        Some(WaitResponse::Full) => return Ok(true),
        Some(WaitResponse::Summary) => {}
    }
    let Some(token) = headers.get(API_TOKEN_HEADER) else {
        return Ok(false);
    };
    match s.engine.tokens.verify(token.as_bytes().trim_ascii()) {
        Ok(Some(_)) => Ok(true),
        Ok(None) => Err(WebhookError::BadApiToken),
        Err(e) => Err(WebhookError::Internal(e.to_string())),
    }
}

/// The `result` label of a delivery, from its answer.
fn delivery_result(status: axum::http::StatusCode) -> &'static str {
    match status.as_u16() {
        202 => "accepted",
        200 => "duplicate",
        401 => "unauthorized",
        404 => "unknown-hook",
        413 => "too-large",
        422 => "invalid",
        429 => "rate-limited",
        503 => "unavailable",
        _ => "error",
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
            Ok(_) => {}
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
        report::RunStatus::Succeeded => RunStatus::Ok,
        report::RunStatus::TimedOut => RunStatus::TimedOut,
        // A run that failed after the policy refused one of its calls failed *because*
        // it was denied.
        report::RunStatus::Failed if denied => RunStatus::Denied,
        report::RunStatus::Failed
        | report::RunStatus::MemoryExceeded
        | report::RunStatus::Trapped => RunStatus::Failed,
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
        (report::RunStatus::Succeeded, _) => None,
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
    let host_calls = report
        .host_calls
        .iter()
        .map(|c| runs::HostCall {
            op: c.op.clone(),
            device: (!c.device.is_empty()).then(|| c.device.clone()),
            request: (!c.request.is_empty()).then(|| c.request.clone()),
            decision: if c.decision == "deny" {
                Decision::Deny
            } else {
                Decision::Allow
            },
            reason: report
                .denials
                .iter()
                .find(|d| c.decision == "deny" && d.op == c.op && d.request == c.request)
                .map(|d| d.reason.clone())
                .or_else(|| (!c.result.is_empty() && c.result != "ok").then(|| c.result.clone())),
        })
        .collect();
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
    use crate::plugin::report::{Denial, HostCall, LogRecord, Outcome};

    fn report(status: report::RunStatus) -> RunReport {
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
        let mut r = report(report::RunStatus::Succeeded);
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
            decision: "allow".into(),
            result: "ok".into(),
            ms: 1.0,
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
        assert_eq!(end.host_calls[0].decision, Decision::Allow);
        assert_eq!(end.host_calls[0].reason, None);
    }

    #[test]
    fn a_failure_after_a_denial_is_denied_with_the_reason_on_the_call() {
        let mut r = report(report::RunStatus::Failed);
        r.error = Some("denied: POST is off".into());
        r.host_calls.push(HostCall {
            op: "docker.restart-container".into(),
            device: "local".into(),
            request: "POST /containers/web/restart".into(),
            decision: "deny".into(),
            result: "denied".into(),
            ms: 0.1,
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
        assert_eq!(end.host_calls[0].decision, Decision::Deny);
        assert_eq!(
            end.host_calls[0].reason.as_deref(),
            Some("ALLOW_RESTARTS is 0")
        );
    }

    #[test]
    fn timeouts_traps_and_memory_map_to_their_statuses() {
        assert_eq!(
            end_of(report(report::RunStatus::TimedOut), 10).status,
            RunStatus::TimedOut
        );
        for s in [
            report::RunStatus::Trapped,
            report::RunStatus::MemoryExceeded,
        ] {
            let end = end_of(report(s), 10);
            assert_eq!(end.status, RunStatus::Failed);
            assert!(end.error.unwrap().starts_with(s.as_str()));
        }
    }
}
