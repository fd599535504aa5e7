//! The host side of the WIT interfaces: one file per interface ([`docker`], [`host`],
//! [`types`]), all implemented on [`RunState`], the data of one run's store.
//!
//! Every host function takes the same four steps, in this order:
//! 1. **scope and policy**: the device scope, every Docker API request the call will make
//!    decided by the plugin's [`CompiledPolicy`](crate::policy::CompiledPolicy), then the
//!    container scope — a refusal is `error::denied(reason)`, audited, never a trap;
//! 2. **limit**: the run's host-call budget, its host-side memory budget
//!    ([`crate::plugin::budget`]), and the time left before its deadline;
//! 3. **call**: the Docker request(s) over the device's pooled connection, or the store;
//! 4. **map the error**: into a WIT `error` the plugin handles; only host bugs trap.

pub mod docker;
pub(crate) mod docker_api;
mod docker_spec;
mod docker_update;
pub mod http;
// Named after the WIT interface `capstan:plugin/host`, like its siblings.
#[allow(clippy::module_inception)]
pub mod host;
pub mod types;

use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::plugin::bindings::{DockerError, WitError};
use crate::plugin::budget::{HostBudget, LimitError, denial_cost, host_call_cost};
use crate::plugin::records::{Audit, PluginState};
use crate::plugin::report::{Denial, HostCall, LogRecord};
use crate::plugin::runtime::LoadedPlugin;
use crate::plugin::sandbox::Limiter;

/// What a host function returns for a `result<T, error>` in WIT: an error value for the
/// plugin, or a trap.
#[derive(Debug)]
pub enum HostError {
    /// Goes back to the plugin as a WIT `error`.
    Wit(WitError),
    /// Ends the run: a host bug or a limit.
    Trap(wasmtime::Error),
}

impl HostError {
    pub fn denied(reason: impl Into<String>) -> HostError {
        HostError::Wit(WitError::Denied(reason.into()))
    }
    pub fn not_found(what: impl Into<String>) -> HostError {
        HostError::Wit(WitError::NotFound(what.into()))
    }
    pub fn unreachable(why: impl Into<String>) -> HostError {
        HostError::Wit(WitError::Unreachable(why.into()))
    }
    pub fn invalid(why: impl Into<String>) -> HostError {
        HostError::Wit(WitError::Invalid(why.into()))
    }
    pub fn timeout(why: impl Into<String>) -> HostError {
        HostError::Wit(WitError::Timeout(why.into()))
    }
    pub fn docker(status: u16, message: impl Into<String>) -> HostError {
        HostError::Wit(WitError::Docker(DockerError {
            status,
            message: message.into(),
        }))
    }
    pub fn trap(message: impl std::fmt::Display) -> HostError {
        HostError::Trap(wasmtime::format_err!("{message}"))
    }

    /// The WIT case name, for reports (`denied`, `not-found`, …; `trap`).
    pub fn kind(&self) -> &'static str {
        match self {
            HostError::Wit(e) => wit_error_kind(e),
            HostError::Trap(_) => "trap",
        }
    }
}

/// The WIT case name of an error value.
pub fn wit_error_kind(e: &WitError) -> &'static str {
    match e {
        WitError::Denied(_) => "denied",
        WitError::NotFound(_) => "not-found",
        WitError::Unreachable(_) => "unreachable",
        WitError::Docker(_) => "docker",
        WitError::Invalid(_) => "invalid",
        WitError::Timeout(_) => "timeout",
        WitError::Failed(_) => "failed",
    }
}

/// A one-line rendering of an error value.
pub fn render_wit_error(e: &WitError) -> String {
    match e {
        WitError::Denied(m) => format!("denied: {m}"),
        WitError::NotFound(m) => format!("not found: {m}"),
        WitError::Unreachable(m) => format!("unreachable: {m}"),
        WitError::Docker(d) => format!("docker answered {}: {}", d.status, d.message),
        WitError::Invalid(m) => format!("invalid: {m}"),
        WitError::Timeout(m) => format!("timeout: {m}"),
        WitError::Failed(m) => format!("failed: {m}"),
    }
}

impl From<WitError> for HostError {
    fn from(e: WitError) -> Self {
        HostError::Wit(e)
    }
}

/// What every run's host functions share: the engine (store, vault, Docker connections)
/// and the trees the runtime writes.
pub struct Services {
    pub engine: Arc<crate::engine::Engine>,
    pub audit: Audit,
    pub state: PluginState,
    /// Cluster mode: devices another node owns are reached through it.
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

/// The data of one run's store.
pub struct RunState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: Limiter,
    pub(crate) run: RunCtx,
    /// `wasi:http`'s context, and our send path with its checks ([`http`]).
    pub(crate) http_ctx: wasmtime_wasi_http::WasiHttpCtx,
    pub(crate) outbound: http::Outbound,
}

/// Host calls kept in a report (all are counted).
pub const MAX_REPORTED_CALLS: usize = 1000;

/// What the host functions of one run know and record.
pub struct RunCtx {
    /// The run's id: the scheduler's run record's, or one of its own for a run outside
    /// the scheduler (benchmarks, runtime tests).
    pub run_id: uuid::Uuid,
    pub plugin: Arc<LoadedPlugin>,
    pub services: Arc<Services>,
    pub started: Instant,
    pub deadline: Instant,
    pub logs: Vec<LogRecord>,
    /// What the kept log records cost, counted as [`crate::plugin::budget::log_record_cost`].
    pub log_bytes: usize,
    pub logs_dropped: u64,
    pub host_calls: Vec<HostCall>,
    pub host_calls_total: u64,
    pub denials: Vec<Denial>,
    /// The run's host-side memory, shared with its captured stdout and stderr.
    pub budget: Arc<HostBudget>,
}

impl RunCtx {
    pub fn new(
        run_id: uuid::Uuid,
        plugin: Arc<LoadedPlugin>,
        services: Arc<Services>,
        deadline: Instant,
        budget: Arc<HostBudget>,
    ) -> RunCtx {
        RunCtx {
            run_id,
            plugin,
            services,
            started: Instant::now(),
            deadline,
            logs: Vec::new(),
            log_bytes: 0,
            logs_dropped: 0,
            host_calls: Vec::new(),
            host_calls_total: 0,
            denials: Vec::new(),
            budget,
        }
    }

    /// The limit (not a bug) that ended the run, if one did.
    pub fn limit_hit(&self) -> Option<LimitError> {
        self.budget.exceeded()
    }

    /// Ends the run with `e`: remembered for the report, returned as the trap.
    pub fn limit(&self, e: LimitError) -> wasmtime::Error {
        self.budget.note(&e);
        wasmtime::Error::new(e)
    }

    /// Step 2 for every host function: count the call against the run's budget. A run
    /// that already met a limit where no trap could be raised (a denial record, its
    /// output) ends here.
    pub fn count_call(&mut self) -> wasmtime::Result<()> {
        if let Some(e) = self.budget.exceeded() {
            return Err(wasmtime::Error::new(e));
        }
        self.host_calls_total += 1;
        let max = self.plugin.limits.max_host_calls;
        if self.host_calls_total > u64::from(max) {
            return Err(self.limit(LimitError::HostCalls { max }));
        }
        Ok(())
    }

    /// Keeps a Docker host call's record (the first [`MAX_REPORTED_CALLS`]), charged to
    /// the run's host memory; one that does not fit is left out and ends the run at its
    /// next host call.
    pub fn keep_host_call(&mut self, call: HostCall) {
        if self.host_calls.len() < MAX_REPORTED_CALLS
            && self
                .budget
                .keep("a host-call record", host_call_cost(&call))
                .is_ok()
        {
            self.host_calls.push(call);
        }
    }

    /// Takes the records of the run's outbound HTTP requests into its report, after
    /// its other host calls, charged like [`RunCtx::keep_host_call`].
    pub fn absorb_outbound(&mut self, outbound: &http::Outbound) {
        let records = outbound.take_records();
        self.host_calls_total += records.requests;
        for call in records.calls {
            self.keep_host_call(call);
        }
        for denial in records.denials {
            self.keep_denial(denial);
        }
    }

    /// Keeps a denial's record, charged like [`RunCtx::keep_host_call`].
    pub fn keep_denial(&mut self, denial: Denial) {
        if self
            .budget
            .keep("a denial record", denial_cost(&denial))
            .is_ok()
        {
            self.denials.push(denial);
        }
    }
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}
