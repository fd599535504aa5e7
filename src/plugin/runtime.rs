//! The plugin runtime: one wasmtime engine, the installed plugins pre-instantiated, and a
//! fresh store and instance for every run.
//!
//! - **Engine:** Cranelift, the component model, epoch interruption; the pooling
//!   allocator with one slot per concurrent run, falling back to on-demand allocation
//!   when the address space for the pool cannot be reserved (which one is in use is
//!   logged and reported by [`PluginRuntime::allocator`]).
//! - **Epochs:** a ticker on its own OS thread advances the epoch every
//!   [`RuntimeConfig::epoch_tick`]; at each tick a running guest yields to tokio
//!   (`UpdateDeadline::YieldCustom` with `tokio::task::yield_now`), so a spinning plugin
//!   cannot stall the engine's timers, and is interrupted once past its deadline.
//! - **Per plugin:** the component from the [compile cache](super::cache), its imports
//!   linked once into an `InstancePre`, its compiled policy, config and limits.
//! - **Per run:** a new `Store` with the plugin's memory limit over all its memories and
//!   tables together (see [`super::sandbox::Limiter`]), an account of the memory the host
//!   holds for it (see [`super::budget`]), a WASI context that grants nothing (see
//!   [`super::sandbox::wasi_context`]), captured output, the deadline both as an epoch
//!   callback (guest code) and as a tokio timeout (time spent in host calls); then
//!   instantiate, call `run`, drop everything.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Enabled, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap,
    UpdateDeadline,
};

use super::bindings::{self, Plugin, PluginPre};
use super::budget::{HostBudget, LimitError};
use super::cache::{CompileCache, Loaded, sha256_hex};
use super::host::{RunCtx, RunState, Services, render_wit_error};
use super::manifest::{Limits, MANIFEST_FILE, Manifest, Triggers};
use super::records::{Audit, InstalledPlugin, PluginRecords, PluginState};
use super::report::{Exit, Outcome, RunReport};
use super::sandbox::{
    CappedPipe, Limiter, MAX_CORE_INSTANCES, MAX_MEMORIES, MAX_TABLES, wasi_context,
};
use crate::policy::CompiledPolicy;
use crate::store::StoreError;

/// The WIT package plugins are built against (`wit/`).
pub const CONTRACT: &str = "capstan:plugin@0.2.0";

/// Bytes of each pooled linear memory reset with `memset` (only its pages that were
/// touched, found with Linux's `PAGEMAP_SCAN` where the kernel has it) instead of being
/// handed back to the kernel with `madvise`. An `madvise` of a process with threads on
/// several cores makes the kernel stop each of those cores to flush its TLB (a
/// shootdown), once per run; a small plugin's memory is reset without one. Kept
/// resident per slot: at most `runs.max_concurrent` × this much memory.
const MEMORY_KEEP_RESIDENT: usize = 2 * 1024 * 1024;
/// The same for tables.
const TABLE_KEEP_RESIDENT: usize = 64 * 1024;

/// The `capstan:plugin` package version a component imports when it is not
/// [`CONTRACT`] (a plugin built with an older SDK), as `capstan:plugin@0.1.0`.
fn other_contract(
    engine: &wasmtime::Engine,
    component: &wasmtime::component::Component,
) -> Option<String> {
    let ty = component.component_type();
    ty.imports(engine).find_map(|(name, _)| {
        let rest = name.strip_prefix("capstan:plugin/")?;
        let version = rest.split_once('@').map(|(_, v)| v)?;
        let found = format!("capstan:plugin@{version}");
        (found != CONTRACT).then_some(found)
    })
}

/// Why the runtime could not do what was asked (a run that fails is not one of these: it
/// is a [`RunReport`] with a status).
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("no plugin named `{0}` is installed (see `capstan plugin list`)")]
    NotInstalled(String),
    #[error(transparent)]
    Manifest(#[from] super::manifest::ManifestError),
    #[error("{0}")]
    Source(String),
    #[error("plugin {name}: {path} is not a usable plugin component: {detail}")]
    Component {
        name: String,
        path: String,
        detail: String,
    },
    #[error("cannot set up the plugin runtime: {0}")]
    Engine(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("plugin {name}: {detail}")]
    Io { name: String, detail: String },
    #[error("{0}")]
    Trigger(String),
}

/// Which instance allocator the engine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllocatorKind {
    /// Slots reserved once at start-up, reused for every run (fast instantiation).
    Pooling,
    /// Memory mapped per instance (used when the pool cannot be reserved).
    OnDemand,
}

impl std::fmt::Display for AllocatorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AllocatorKind::Pooling => "pooling",
            AllocatorKind::OnDemand => "on-demand",
        })
    }
}

/// Which allocator to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllocatorChoice {
    /// Pooling, falling back to on-demand.
    #[default]
    Auto,
    Pooling,
    OnDemand,
}

/// Engine-wide settings of the plugin runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Limits for what a manifest leaves unset.
    pub defaults: Limits,
    /// Runs executing at once; further runs wait for a slot. Also the pooling
    /// allocator's number of slots.
    pub max_concurrent_runs: u32,
    pub allocator: AllocatorChoice,
    /// How often the epoch advances: the granularity of deadlines and of yielding.
    pub epoch_tick: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            defaults: Limits::DEFAULT,
            max_concurrent_runs: 16,
            allocator: AllocatorChoice::Auto,
            epoch_tick: Duration::from_millis(10),
        }
    }
}

/// Why a plugin runs: the WIT `event` the plugin gets, and what the run record says
/// started it ([`crate::runs::RunTrigger`] is derived from it). Each trigger kind
/// builds its own ([`crate::trigger`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "trigger", rename_all = "lowercase")]
pub enum TriggerEvent {
    Cron {
        schedule: String,
        scheduled_at: DateTime<Utc>,
    },
    Webhook {
        hook: String,
        /// The sender's delivery id, when the hook names one (for the record; the
        /// plugin sees it among the headers).
        #[serde(default)]
        delivery: Option<String>,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    Manual {
        /// Who asked: an API token's name, or `cli` (for the record).
        #[serde(default = "cli")]
        by: String,
        input: String,
    },
    /// A Docker event on a watched device (`[[triggers.docker]]`).
    Docker {
        device: String,
        /// Docker's event type (`container`, `image`, …).
        #[serde(rename = "type")]
        kind: String,
        /// Docker's action (`die`, `health_status: unhealthy`, …).
        action: String,
        actor_id: String,
        attributes: Vec<(String, String)>,
        time: DateTime<Utc>,
        /// Events folded into this run by the trigger's debounce window.
        count: u32,
    },
    /// Another plugin's run ended (`[[triggers.run]]`).
    Run {
        run_id: String,
        plugin: String,
        status: String,
        outcome: String,
        /// Run-outcome triggers that led here (1 for the first in a chain).
        depth: u32,
    },
}

fn cli() -> String {
    "cli".to_string()
}

impl TriggerEvent {
    /// A run asked for from the command line with `input`.
    pub fn manual(input: impl Into<String>) -> TriggerEvent {
        TriggerEvent::Manual {
            by: cli(),
            input: input.into(),
        }
    }

    /// `cron`, `webhook`, `manual`, `docker` or `run`.
    pub fn kind(&self) -> &'static str {
        match self {
            TriggerEvent::Cron { .. } => "cron",
            TriggerEvent::Webhook { .. } => "webhook",
            TriggerEvent::Manual { .. } => "manual",
            TriggerEvent::Docker { .. } => "docker",
            TriggerEvent::Run { .. } => "run",
        }
    }

    /// The WIT value.
    pub fn to_wit(&self) -> bindings::Event {
        match self {
            TriggerEvent::Cron {
                schedule,
                scheduled_at,
            } => bindings::Event::Cron(bindings::CronEvent {
                schedule: schedule.clone(),
                scheduled_at: scheduled_at.timestamp_millis(),
            }),
            TriggerEvent::Webhook {
                hook,
                headers,
                body,
                ..
            } => bindings::Event::Webhook(bindings::WebhookEvent {
                hook: hook.clone(),
                headers: headers.clone(),
                body: body.clone(),
            }),
            TriggerEvent::Manual { input, .. } => bindings::Event::Manual(bindings::ManualEvent {
                input: input.clone(),
            }),
            TriggerEvent::Docker {
                device,
                kind,
                action,
                actor_id,
                attributes,
                time,
                count,
            } => bindings::Event::Docker(bindings::DockerEvent {
                device: device.clone(),
                type_: kind.clone(),
                action: action.clone(),
                actor_id: actor_id.clone(),
                attributes: attributes.clone(),
                time: time.timestamp_millis(),
                count: *count,
            }),
            TriggerEvent::Run {
                run_id,
                plugin,
                status,
                outcome,
                depth,
            } => bindings::Event::Run(bindings::RunEvent {
                run_id: run_id.clone(),
                plugin: plugin.clone(),
                status: status.clone(),
                outcome: outcome.clone(),
                depth: *depth,
            }),
        }
    }
}

/// A plugin to install: its manifest text and component bytes, with where they came
/// from (for error messages).
#[derive(Debug, Clone)]
pub struct PluginSource {
    pub manifest: String,
    pub manifest_file: String,
    pub wasm: Vec<u8>,
    pub wasm_file: String,
}

impl PluginSource {
    /// Reads `source`: a `.wasm` with `plugin.toml` beside it (or `manifest`), or a
    /// directory holding `plugin.toml` (the `.wasm` in it, or in a
    /// `target/wasm32-wasip2/release/` at or above it, named after the plugin).
    pub fn read(source: &Path, manifest: Option<&Path>) -> Result<PluginSource, PluginError> {
        let (wasm_path, manifest_path) = locate(source, manifest)?;
        let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
            PluginError::Source(format!("cannot read {}: {e}", manifest_path.display()))
        })?;
        let wasm = std::fs::read(&wasm_path).map_err(|e| {
            PluginError::Source(format!("cannot read {}: {e}", wasm_path.display()))
        })?;
        Ok(PluginSource {
            manifest: text,
            manifest_file: manifest_path.display().to_string(),
            wasm,
            wasm_file: wasm_path.display().to_string(),
        })
    }
}

/// An installed plugin, ready to run.
pub struct LoadedPlugin {
    pub name: String,
    pub version: String,
    pub description: String,
    pub policy: CompiledPolicy,
    pub config: BTreeMap<String, String>,
    pub limits: Limits,
    pub triggers: Triggers,
    /// The manifest's `[notify]` table: channels `host.notify` may use, run-end notices.
    pub notify: crate::notify::NotifySpec,
    /// The origins it may reach over HTTP (`[policy] outbound`).
    pub outbound: crate::policy::OutboundList,
    /// Its secrets and the origins each is bound to (`[secrets.NAME] origins`).
    pub secrets: BTreeMap<String, crate::policy::OutboundList>,
    pub sha256: String,
    /// Whether the component came from the compile cache.
    pub loaded: Loaded,
    pre: PluginPre<RunState>,
}

/// What loading the installed plugins found.
#[derive(Debug, Default)]
pub struct LoadSummary {
    pub loaded: usize,
    pub from_cache: usize,
    pub compiled: usize,
    /// Plugins that could not be loaded, with why.
    pub failed: Vec<(String, String)>,
}

/// The plugin runtime. Cheap to share behind an `Arc`; `run` may be called concurrently.
pub struct PluginRuntime {
    engine: wasmtime::Engine,
    linker: Linker<RunState>,
    allocator: AllocatorKind,
    cache: CompileCache,
    services: Arc<Services>,
    records: PluginRecords,
    plugins: RwLock<HashMap<String, Arc<LoadedPlugin>>>,
    slots: Arc<Semaphore>,
    defaults: Limits,
    plugins_dir: PathBuf,
    _ticker: EpochTicker,
}

/// Directory of installed plugins under the data directory.
pub const PLUGINS_DIR: &str = "plugins";
/// Directory of the compile cache under the data directory.
pub const CACHE_DIR: &str = "plugin-cache";
/// The copy of an installed plugin's component.
pub const WASM_FILE: &str = "plugin.wasm";

impl PluginRuntime {
    /// Sets up the engine and linker. Installed plugins are loaded by
    /// [`PluginRuntime::load_installed`].
    pub fn new(
        engine: Arc<crate::engine::Engine>,
        config: RuntimeConfig,
    ) -> Result<PluginRuntime, PluginError> {
        let (wasm_engine, allocator) = build_engine(&config)?;
        let mut linker = Linker::<RunState>::new(&wasm_engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        Plugin::add_to_linker::<RunState, HasSelf<RunState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        // Outbound HTTP, through our send path (super::host::http).
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        let data_dir = engine.settings.data_dir.clone();
        let services = Arc::new(Services {
            audit: Audit::open(&engine.store)?,
            state: PluginState::open(&engine.store)?,
            engine: engine.clone(),
            cluster: std::sync::OnceLock::new(),
        });
        let records = PluginRecords::open(&engine.store)?;
        let ticker = EpochTicker::start(wasm_engine.clone(), config.epoch_tick);
        Ok(PluginRuntime {
            cache: CompileCache::new(&wasm_engine, data_dir.join(CACHE_DIR)),
            engine: wasm_engine,
            linker,
            allocator,
            services,
            records,
            plugins: RwLock::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(config.max_concurrent_runs.max(1) as usize)),
            defaults: config.defaults,
            plugins_dir: data_dir.join(PLUGINS_DIR),
            _ticker: ticker,
        })
    }

    /// The wasmtime engine (for benchmarks and tools that compare against it).
    pub fn wasm_engine(&self) -> &wasmtime::Engine {
        &self.engine
    }

    /// The instance allocator in use.
    pub fn allocator(&self) -> AllocatorKind {
        self.allocator
    }

    /// Makes the host functions reach devices through their owner nodes (cluster mode).
    pub fn join_cluster(&self, cluster: Arc<crate::cluster::Cluster>) {
        let _ = self.services.cluster.set(cluster);
    }

    /// The audit log.
    pub fn audit(&self) -> &Audit {
        &self.services.audit
    }

    /// Plugin state (for tools and tests).
    pub fn state(&self) -> &PluginState {
        &self.services.state
    }

    /// The installed plugins' records.
    pub fn installed(&self) -> Result<Vec<InstalledPlugin>, PluginError> {
        Ok(self.records.list()?)
    }

    /// One installed plugin's record.
    pub fn installed_plugin(&self, name: &str) -> Result<InstalledPlugin, PluginError> {
        self.records
            .get(name)?
            .ok_or_else(|| PluginError::NotInstalled(name.to_string()))
    }

    /// A loaded plugin.
    pub fn plugin(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Loads every installed plugin (compiled components from the cache).
    pub fn load_installed(&self) -> Result<LoadSummary, PluginError> {
        let mut summary = LoadSummary::default();
        for rec in self.records.list()? {
            match self.load_from_disk(&rec.name) {
                Ok(p) => {
                    summary.loaded += 1;
                    match p.loaded {
                        Loaded::Cached => summary.from_cache += 1,
                        Loaded::Compiled => summary.compiled += 1,
                    }
                    self.insert(p);
                }
                Err(e) => {
                    tracing::error!(plugin = %rec.name, error = %e, "cannot load plugin");
                    summary.failed.push((rec.name.clone(), e.to_string()));
                }
            }
        }
        Ok(summary)
    }

    fn insert(&self, p: LoadedPlugin) {
        self.plugins
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p.name.clone(), Arc::new(p));
    }

    /// An installed plugin's manifest text as stored.
    pub fn manifest_text(&self, name: &str) -> Result<String, PluginError> {
        let path = self.plugin_dir(name).join(MANIFEST_FILE);
        std::fs::read_to_string(&path).map_err(|e| PluginError::Io {
            name: name.to_string(),
            detail: format!("cannot read {}: {e}", path.display()),
        })
    }

    /// An installed plugin's manifest text and component as stored (what cluster mode
    /// replicates).
    pub fn source_of(&self, name: &str) -> Result<PluginSource, PluginError> {
        let dir = self.plugin_dir(name);
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read(&path).map_err(|e| PluginError::Io {
                name: name.to_string(),
                detail: format!("cannot read {}: {e}", path.display()),
            })
        };
        let manifest = String::from_utf8(read(MANIFEST_FILE)?).map_err(|_| PluginError::Io {
            name: name.to_string(),
            detail: "the stored manifest is not UTF-8".into(),
        })?;
        Ok(PluginSource {
            manifest,
            manifest_file: MANIFEST_FILE.to_string(),
            wasm: read(WASM_FILE)?,
            wasm_file: WASM_FILE.to_string(),
        })
    }

    fn plugin_dir(&self, name: &str) -> PathBuf {
        self.plugins_dir.join(name)
    }

    fn load_from_disk(&self, name: &str) -> Result<LoadedPlugin, PluginError> {
        let dir = self.plugin_dir(name);
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path).map_err(|e| PluginError::Io {
            name: name.to_string(),
            detail: format!("cannot read {}: {e}", manifest_path.display()),
        })?;
        let manifest = Manifest::parse(&text, &manifest_path.display().to_string())?;
        let wasm_path = dir.join(WASM_FILE);
        let wasm = std::fs::read(&wasm_path).map_err(|e| PluginError::Io {
            name: name.to_string(),
            detail: format!("cannot read {}: {e}", wasm_path.display()),
        })?;
        self.prepare(&manifest, &wasm, &wasm_path)
    }

    /// Compiles (or loads from the cache) and links a plugin.
    fn prepare(
        &self,
        manifest: &Manifest,
        wasm: &[u8],
        path: &Path,
    ) -> Result<LoadedPlugin, PluginError> {
        let sha256 = sha256_hex(wasm);
        let component_error = |detail: String| PluginError::Component {
            name: manifest.name.clone(),
            path: path.display().to_string(),
            detail,
        };
        let (component, loaded) = self
            .cache
            .load(&self.engine, wasm, &sha256)
            .map_err(|e| component_error(format!("{e:#}")))?;
        if let Some(older) = other_contract(&self.engine, &component) {
            return Err(component_error(format!(
                "it was built against {older}; this engine speaks {CONTRACT}: rebuild it with \
                 the capstan SDK of this release (the author's guide lists what changed)"
            )));
        }
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| component_error(format!("{e:#}")))?;
        let pre = PluginPre::new(instance_pre).map_err(|e| {
            component_error(format!(
                "{e:#} (does it export `run` from the {CONTRACT} world? build it with the capstan SDK)"
            ))
        })?;
        Ok(LoadedPlugin {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            description: manifest.description.clone(),
            policy: manifest.policy.compile(),
            config: manifest.config_values(),
            limits: Limits::resolve(&manifest.limits, &self.defaults),
            triggers: manifest.triggers.clone(),
            notify: manifest.notify.clone(),
            outbound: manifest.policy.outbound().clone(),
            secrets: manifest.secret_bindings(),
            sha256,
            loaded,
            pre,
        })
    }

    /// Installs a plugin from `source`: a `.wasm` with `plugin.toml` beside it (or
    /// `manifest`), or a directory holding `plugin.toml` (the `.wasm` in it, or in a
    /// `target/wasm32-wasip2/release/` at or above it, named after the plugin). The
    /// manifest is validated against the known devices and the component compiled and
    /// linked before anything is stored. Replaces an installed plugin of that name.
    pub fn install(
        &self,
        source: &Path,
        manifest: Option<&Path>,
    ) -> Result<InstalledPlugin, PluginError> {
        let src = PluginSource::read(source, manifest)?;
        self.install_bytes(&src.manifest, &src.manifest_file, &src.wasm, &src.wasm_file)
    }

    /// Installs a plugin from its manifest text and its component's bytes (`file` and
    /// `wasm_file` name them in errors): validated, compiled and linked before anything
    /// is stored. Replaces an installed plugin of that name.
    pub fn install_bytes(
        &self,
        text: &str,
        file: &str,
        wasm: &[u8],
        wasm_file: &str,
    ) -> Result<InstalledPlugin, PluginError> {
        let manifest = Manifest::parse(text, file)?;
        let devices: Vec<String> = self
            .services
            .engine
            .devices()
            .and_then(|d| d.list())
            .map_err(|e| PluginError::Source(format!("cannot list devices: {e}")))?
            .into_iter()
            .map(|d| d.name)
            .collect();
        manifest.validate(file, &devices)?;
        let loaded = self.prepare(&manifest, wasm, Path::new(wasm_file))?;

        let dir = self.plugin_dir(&manifest.name);
        let io = |e: std::io::Error| PluginError::Io {
            name: manifest.name.clone(),
            detail: format!("cannot write {}: {e}", dir.display()),
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        write_atomic(&dir.join(WASM_FILE), wasm).map_err(io)?;
        write_atomic(&dir.join(MANIFEST_FILE), text.as_bytes()).map_err(io)?;
        if let Some(old) = self.records.get(&manifest.name)?
            && old.sha256 != loaded.sha256
        {
            self.cache.forget(&old.sha256);
        }
        let record = InstalledPlugin {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            description: manifest.description.clone(),
            sha256: loaded.sha256.clone(),
            size: wasm.len() as u64,
            installed_at: Utc::now(),
            triggers: manifest.triggers.clone(),
            limits: loaded.limits,
            devices: manifest
                .policy
                .devices()
                .patterns()
                .map(str::to_string)
                .collect(),
        };
        self.records.put(&record)?;
        self.services.engine.store.flush()?;
        self.insert(loaded);
        tracing::info!(plugin = %record.name, version = %record.version, "plugin installed");
        Ok(record)
    }

    /// Removes an installed plugin: its record, files, compiled code and state.
    pub fn remove(&self, name: &str) -> Result<InstalledPlugin, PluginError> {
        let rec = self.installed_plugin(name)?;
        self.records.remove(name)?;
        self.services.state.clear(name)?;
        if let Err(e) = super::secrets::remove_all(&self.services.engine.vault, name) {
            tracing::warn!(plugin = %name, error = %e, "cannot remove the plugin's secrets");
        }
        self.cache.forget(&rec.sha256);
        let _ = std::fs::remove_dir_all(self.plugin_dir(name));
        self.plugins
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.services.engine.store.flush()?;
        Ok(rec)
    }

    /// Runs plugin `name` once for `event`, on a fresh instance, and reports what it did.
    /// Waits for a free slot when `max_concurrent_runs` runs are under way.
    pub async fn run(&self, name: &str, event: TriggerEvent) -> Result<RunReport, PluginError> {
        self.run_as(name, event, uuid::Uuid::new_v4()).await
    }

    /// [`PluginRuntime::run`] as run `run_id` (the scheduler's run record): the report and
    /// what the run's host functions record (notifications) carry that id.
    pub async fn run_as(
        &self,
        name: &str,
        event: TriggerEvent,
        run_id: uuid::Uuid,
    ) -> Result<RunReport, PluginError> {
        let plugin = self
            .plugin(name)
            .ok_or_else(|| PluginError::NotInstalled(name.to_string()))?;
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| PluginError::Engine("the runtime is shutting down".into()))?;
        Ok(self.run_loaded(plugin, &event, run_id).await)
    }

    async fn run_loaded(
        &self,
        plugin: Arc<LoadedPlugin>,
        event: &TriggerEvent,
        run_id: uuid::Uuid,
    ) -> RunReport {
        let started_at = Utc::now();
        let limits = plugin.limits;
        let budget = Duration::from_secs(u64::from(limits.timeout_secs));
        let deadline = Instant::now() + budget;
        let budget = Arc::new(HostBudget::new(limits.max_host_bytes as usize));
        let stdout = CappedPipe::new("stdout", limits.max_output_bytes as usize, budget.clone());
        let stderr = CappedPipe::new("stderr", limits.max_output_bytes as usize, budget.clone());
        let state = RunState {
            wasi: wasi_context(stdout.clone(), stderr.clone()),
            table: ResourceTable::new(),
            limiter: Limiter::new(limits.memory_mib),
            run: RunCtx::new(
                run_id,
                plugin.clone(),
                self.services.clone(),
                deadline,
                budget.clone(),
            ),
            http_ctx: wasmtime_wasi_http::WasiHttpCtx::new(),
            outbound: super::host::http::Outbound::new(
                plugin.clone(),
                self.services.clone(),
                deadline,
            ),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ))
            }
        });
        store.set_epoch_deadline(1);
        let wit_event = event.to_wit();
        let started = store.data().run.started;
        let result = tokio::time::timeout_at(deadline.into(), async {
            let instance = plugin.pre.instantiate_async(&mut store).await?;
            instance.call_run(&mut store, &wit_event).await
        })
        .await;

        // A limit met where no trap could be raised (a record left out, a write of
        // stdout) ends the run all the same, whatever the plugin returned.
        let result = match result {
            Ok(Ok(returned)) => match charge_returned(&budget, &returned) {
                Some(e) => Ok(Err(wasmtime::Error::new(e))),
                None => Ok(Ok(returned)),
            },
            other => other,
        };
        let (status, outcome, error) = match result {
            Err(_elapsed) => (
                Exit::TimedOut,
                None,
                Some(format!(
                    "stopped at its deadline of {} s (limits.timeout_secs) while waiting in a host call",
                    limits.timeout_secs
                )),
            ),
            Ok(Ok(Ok(o))) => (
                Exit::Succeeded,
                Some(Outcome {
                    summary: o.summary,
                    details: o.details,
                }),
                None,
            ),
            Ok(Ok(Err(e))) => (Exit::Failed, None, Some(render_wit_error(&e))),
            Ok(Err(trap)) => {
                let data = store.data();
                if let Some(asked) = data.limiter.exceeded {
                    (
                        Exit::MemoryExceeded,
                        None,
                        Some(format!(
                            "stopped: its memories and tables would have grown to {} MiB, its limit is {} MiB (limits.memory_mib)",
                            asked.div_ceil(1024 * 1024),
                            limits.memory_mib
                        )),
                    )
                } else if trap.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                    (
                        Exit::TimedOut,
                        None,
                        Some(format!(
                            "stopped at its deadline of {} s (limits.timeout_secs)",
                            limits.timeout_secs
                        )),
                    )
                } else if let Some(limit) = data.run.limit_hit() {
                    (Exit::Trapped, None, Some(format!("stopped: {limit}")))
                } else {
                    (Exit::Trapped, None, Some(describe_trap(&trap)))
                }
            }
        };
        let duration_ms = crate::millis(started.elapsed());
        {
            let data = store.data_mut();
            data.run.absorb_outbound(&data.outbound);
        }
        let run = std::mem::replace(
            &mut store.data_mut().run,
            RunCtx::new(
                run_id,
                plugin.clone(),
                self.services.clone(),
                deadline,
                budget,
            ),
        );
        drop(store);
        let (stdout, stdout_dropped) = stdout.take();
        let (stderr, stderr_dropped) = stderr.take();
        if status != Exit::Succeeded {
            tracing::info!(plugin = %plugin.name, %status, error = error.as_deref().unwrap_or(""), "plugin run did not succeed");
        }
        RunReport {
            run_id,
            plugin: plugin.name.clone(),
            version: plugin.version.clone(),
            trigger: event.kind().to_string(),
            started_at,
            status,
            outcome,
            error,
            logs: run.logs,
            logs_dropped: run.logs_dropped,
            stdout,
            stderr,
            stdout_dropped,
            stderr_dropped,
            host_calls: run.host_calls,
            host_calls_total: run.host_calls_total,
            denials: run.denials,
            duration_ms,
        }
    }
}

/// Charges what the plugin returned (its outcome, or its error's message) to the run's
/// host memory; the limit the run met, if it met one.
fn charge_returned(
    budget: &HostBudget,
    returned: &Result<bindings::Outcome, bindings::WitError>,
) -> Option<LimitError> {
    let charged = match returned {
        Ok(o) => budget.keep("the outcome", o.summary.len() + o.details.len()),
        Err(e) => budget.keep("the error value", render_wit_error(e).len()),
    };
    charged.err().or_else(|| budget.exceeded())
}

/// A trap as one readable line plus the wasm backtrace, when there is one.
fn describe_trap(e: &wasmtime::Error) -> String {
    let mut s = match e.downcast_ref::<Trap>() {
        Some(Trap::StackOverflow) => "trapped: stack overflow (the plugin recursed too deeply)".to_string(),
        Some(Trap::MemoryOutOfBounds) => "trapped: out-of-bounds memory access (in a Rust plugin usually deep recursion that ran out of its stack in linear memory)".to_string(),
        Some(Trap::UnreachableCodeReached) => {
            "trapped: wasm `unreachable` executed (a Rust plugin panicked; see stderr)".to_string()
        }
        Some(t) => format!("trapped: {t}"),
        None => format!("trapped: {e}"),
    };
    let chain: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
    if !chain.is_empty() {
        s.push_str(&format!(" ({})", chain.join("; ")));
    }
    s
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Finds the `.wasm` and the manifest of an install source.
fn locate(source: &Path, manifest: Option<&Path>) -> Result<(PathBuf, PathBuf), PluginError> {
    let missing = |what: String| PluginError::Source(what);
    if source.is_file() {
        let manifest = match manifest {
            Some(m) => m.to_path_buf(),
            None => source.with_file_name(MANIFEST_FILE),
        };
        if !manifest.is_file() {
            return Err(missing(format!(
                "no manifest for {}: expected {} (or pass --manifest)",
                source.display(),
                manifest.display()
            )));
        }
        return Ok((source.to_path_buf(), manifest));
    }
    if !source.is_dir() {
        return Err(missing(format!("{} does not exist", source.display())));
    }
    let manifest = manifest
        .map(Path::to_path_buf)
        .unwrap_or_else(|| source.join(MANIFEST_FILE));
    if !manifest.is_file() {
        return Err(missing(format!(
            "{} has no {MANIFEST_FILE}",
            source.display()
        )));
    }
    let wasms: Vec<PathBuf> = std::fs::read_dir(source)
        .map_err(|e| missing(format!("cannot read {}: {e}", source.display())))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
        .collect();
    if wasms.len() == 1 {
        return Ok((wasms[0].clone(), manifest));
    }
    // A crate directory: the build output of `cargo build --target wasm32-wasip2
    // --release`, in the crate's or its workspace's target directory.
    let text = std::fs::read_to_string(&manifest).unwrap_or_default();
    let name = Manifest::parse(&text, "")
        .map(|m| m.name)
        .unwrap_or_default()
        .replace('-', "_");
    let file = format!("{name}.wasm");
    let mut dir = Some(
        source
            .canonicalize()
            .unwrap_or_else(|_| source.to_path_buf()),
    );
    for _ in 0..4 {
        let Some(d) = dir else { break };
        let candidate = d.join("target/wasm32-wasip2/release").join(&file);
        if candidate.is_file() {
            return Ok((candidate, manifest));
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    Err(missing(format!(
        "no .wasm in {} (looked for {file} in target/wasm32-wasip2/release/ too): build it with `cargo build --target wasm32-wasip2 --release`",
        source.display()
    )))
}

fn build_engine(config: &RuntimeConfig) -> Result<(wasmtime::Engine, AllocatorKind), PluginError> {
    let base = || {
        let mut c = Config::new();
        c.wasm_component_model(true);
        c.epoch_interruption(true);
        c
    };
    if config.allocator != AllocatorChoice::OnDemand {
        let slots = config.max_concurrent_runs.max(1);
        let mut pool = PoolingAllocationConfig::new();
        // Per component, as many core instances, memories and tables as the store's
        // limiter allows, which holds all of them together to the plugin's
        // `memory_mib`; one memory may be as large as the largest `memory_mib`.
        let per = |n: usize| n as u32;
        pool.total_component_instances(slots)
            .total_core_instances(slots * per(MAX_CORE_INSTANCES))
            .total_memories(slots * per(MAX_MEMORIES))
            .total_tables(slots * per(MAX_TABLES))
            .total_stacks(slots)
            .max_core_instances_per_component(per(MAX_CORE_INSTANCES))
            .max_memories_per_component(per(MAX_MEMORIES))
            .max_tables_per_component(per(MAX_TABLES))
            .max_memory_size(Limits::MAX.memory_mib as usize * 1024 * 1024)
            .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
            .table_keep_resident(TABLE_KEEP_RESIDENT)
            .pagemap_scan(Enabled::Auto);
        let mut c = base();
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        match wasmtime::Engine::new(&c) {
            Ok(engine) => {
                tracing::info!(slots, "plugin runtime: pooling instance allocator");
                return Ok((engine, AllocatorKind::Pooling));
            }
            Err(e) if config.allocator == AllocatorChoice::Auto => {
                tracing::warn!(error = %e, "plugin runtime: cannot reserve the address space for the pooling allocator; using on-demand allocation (slower instantiation)");
            }
            Err(e) => return Err(PluginError::Engine(format!("pooling allocator: {e}"))),
        }
    }
    let engine = wasmtime::Engine::new(&base()).map_err(|e| PluginError::Engine(e.to_string()))?;
    tracing::info!("plugin runtime: on-demand instance allocator");
    Ok((engine, AllocatorKind::OnDemand))
}

/// Advances the engine's epoch on its own OS thread until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: wasmtime::Engine, tick: Duration) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("capstan-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .expect("spawn the epoch ticker thread");
        EpochTicker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component of `instances` core instances of one module, each with a linear
    /// memory of `mib` MiB and a table of `elements` elements.
    fn component(instances: u32, mib: u64, elements: u64) -> Vec<u8> {
        use wasm_encoder::{
            Component, InstanceSection, MemorySection, MemoryType, Module, ModuleArg,
            ModuleSection, RefType, TableSection, TableType,
        };
        let mut module = Module::new();
        let mut tables = TableSection::new();
        tables.table(TableType {
            element_type: RefType::FUNCREF,
            table64: false,
            minimum: elements,
            maximum: None,
            shared: false,
        });
        module.section(&tables);
        let mut memories = MemorySection::new();
        memories.memory(MemoryType {
            minimum: mib * 16,
            maximum: None,
            memory64: false,
            shared: false,
            page_size_log2: None,
        });
        module.section(&memories);
        let mut c = Component::new();
        c.section(&ModuleSection(&module));
        let mut section = InstanceSection::new();
        for _ in 0..instances {
            section.instantiate(0, Vec::<(&str, ModuleArg)>::new());
        }
        c.section(&section);
        c.finish()
    }

    /// Instantiates `bytes` under `memory_mib` on the runtime's own engine (pooling).
    fn instantiate(bytes: &[u8], memory_mib: u32) -> Result<(), String> {
        let (engine, kind) = build_engine(&RuntimeConfig {
            max_concurrent_runs: 2,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(kind, AllocatorKind::Pooling);
        let component =
            wasmtime::component::Component::new(&engine, bytes).map_err(|e| format!("{e:#}"))?;
        let linker = Linker::<Limiter>::new(&engine);
        let mut store = Store::new(&engine, Limiter::new(memory_mib));
        store.limiter(|l| l);
        store.set_epoch_deadline(u64::MAX / 2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(linker.instantiate_async(&mut store, &component))
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    }

    /// A component importing an (empty) instance named `name`.
    fn importing(name: &str) -> Vec<u8> {
        use wasm_encoder::{
            Component, ComponentImportSection, ComponentTypeRef, ComponentTypeSection, InstanceType,
        };
        let mut c = Component::new();
        let mut types = ComponentTypeSection::new();
        types.instance(&InstanceType::new());
        c.section(&types);
        let mut imports = ComponentImportSection::new();
        imports.import(name, ComponentTypeRef::Instance(0));
        c.section(&imports);
        c.finish()
    }

    #[test]
    fn a_plugin_built_against_an_older_contract_is_named_as_such() {
        let (engine, _) = build_engine(&RuntimeConfig {
            max_concurrent_runs: 1,
            allocator: AllocatorChoice::OnDemand,
            ..Default::default()
        })
        .unwrap();
        let load = |name: &str| {
            let c = wasmtime::component::Component::new(&engine, importing(name)).unwrap();
            other_contract(&engine, &c)
        };
        assert_eq!(
            load("capstan:plugin/host@0.1.0").as_deref(),
            Some("capstan:plugin@0.1.0")
        );
        assert_eq!(load(&CONTRACT.replace("plugin@", "plugin/host@")), None);
        assert_eq!(load("wasi:cli/environment@0.2.6"), None);
    }

    #[test]
    fn the_memory_limit_holds_for_every_memory_of_a_component_together() {
        // One memory of 40 MiB fits a 64 MiB limit; so does each of two, but not both.
        instantiate(&component(1, 40, 10), 64).unwrap();
        let e = instantiate(&component(2, 40, 10), 64).unwrap_err();
        assert!(e.contains("limit is 64 MiB"), "{e}");
        instantiate(&component(2, 40, 10), 96).unwrap();
        // Tables count too: four memories of 16 MiB fill 64 MiB exactly; a table
        // element more is over.
        instantiate(&component(4, 16, 0), 64).unwrap();
        let e = instantiate(&component(4, 16, 1), 64).unwrap_err();
        assert!(e.contains("memory limit"), "{e}");
    }

    #[test]
    fn a_component_may_not_hold_more_memories_than_the_limiter_counts() {
        let e = instantiate(&component(MAX_MEMORIES as u32 + 1, 1, 1), 1024).unwrap_err();
        assert!(e.contains("memor"), "{e}");
    }
}
