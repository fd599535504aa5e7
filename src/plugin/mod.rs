//! The plugin runtime: WebAssembly components that act on Docker hosts through the
//! `capstan:plugin` WIT contract (`wit/`), each call decided by the plugin's policy.
//!
//! Why it exists: operators automate their Docker hosts (heal what is unhealthy,
//! redeploy on a push, take inventory) without handing a script root-equivalent access.
//! A plugin is one `.wasm` (a WASI p2 component) plus a [`manifest`] that declares when it
//! runs, what it may touch and how much it may use. It gets nothing by default
//! ([`sandbox`]); everything it does to Docker goes through a host function that is
//! expressed as the Docker API request it will make and decided by the same policy engine
//! as proxy mode ([`host`]).
//!
//! The flow: [`PluginRuntime::install`] (validate the manifest, compile once into the
//! on-disk [`cache`], record it) → [`PluginRuntime::load_installed`] at start-up (compiled
//! code from the cache, an `InstancePre` per plugin) → [`PluginRuntime::run`] per trigger
//! (a fresh store and instance, limits, deadline) → [`RunReport`].
//!
//! ```no_run
//! # async fn demo(engine: std::sync::Arc<capstan::engine::Engine>) -> anyhow::Result<()> {
//! use capstan::plugin::{PluginRuntime, RuntimeConfig, TriggerEvent};
//!
//! let runtime = PluginRuntime::new(engine, RuntimeConfig::default())?;
//! runtime.load_installed()?;
//! let report = runtime.run("autoheal", TriggerEvent::manual("")).await?;
//! println!("{}", report.render());
//! # Ok(()) }
//! ```

pub mod admin;
pub mod bindings;
pub mod budget;
pub mod cache;
pub mod host;
pub mod manifest;
pub mod records;
pub mod report;
pub mod runtime;
pub mod sandbox;
pub mod scaffold;
pub mod secrets;

pub use budget::LimitError;
pub use manifest::{Limits, Manifest, ManifestError};
pub use records::{AuditRecord, InstalledPlugin};
pub use report::{CallDecision, Denial, Exit, HostCall, LogRecord, Outcome, RunReport};
pub use runtime::{
    AllocatorChoice, AllocatorKind, LoadSummary, LoadedPlugin, PluginError, PluginRuntime,
    PluginSource, RuntimeConfig, TriggerEvent,
};
