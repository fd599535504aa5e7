//! Plugin routes: list, show, install, remove, run, the audit log of their host calls,
//! and the secrets plugins use without seeing (names and whether set; values write-only).
//!
//! Install takes the manifest text and the component as base64 in one JSON body (up to
//! [`MAX_INSTALL_BODY`]); the engine validates the manifest against the known devices and
//! compiles the component before anything is stored. Webhook secrets the engine
//! generated for the plugin's hooks are in the install answer — the only time they are
//! shown. A run request is queued through the scheduler like any trigger; `?wait=true`
//! waits (bounded) and answers with the run record.
//!
//! A device-scoped token lists, shows and runs only the plugins it covers (every device
//! the plugin may reach is one it sees); the others answer 404 ([`authz`]). The audit
//! log spans every plugin and device: it needs a token without a device scope.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::authz;
use super::{AppError, AppState};
use crate::plugin::{InstalledPlugin, PluginError, PluginSource};
use crate::runs::{RunId, RunRecord};
use crate::scheduler::SubmitError;
use crate::token::TokenInfo;

/// Largest install body: the component travels base64-encoded inside it.
pub const MAX_INSTALL_BODY: usize = 64 << 20;
/// The longest `timeout` a run request may give (the engine's `runs.max_wait` bounds it
/// further).
const MAX_WAIT_SECS: u64 = 3600;

/// An installed plugin.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PluginView {
    #[schema(example = "autoheal")]
    pub name: String,
    pub version: String,
    pub description: String,
    /// SHA-256 of the `.wasm`, hex.
    pub sha256: String,
    /// Size of the `.wasm`, bytes.
    pub size: u64,
    pub installed_at: chrono::DateTime<chrono::Utc>,
    /// Its device scope as written in the manifest (names or globs).
    pub devices: Vec<String>,
    /// The manifest's `[triggers]`: cron schedules, webhooks and run-outcome triggers
    /// (`run`).
    #[schema(value_type = Object)]
    pub triggers: serde_json::Value,
    /// Its limits, resolved against the engine's defaults.
    #[schema(value_type = Object)]
    pub limits: serde_json::Value,
    /// Whether the runtime has it loaded (compiled and linked) and can run it.
    pub loaded: bool,
}

/// The API's (and the dashboard's) view of an installed plugin.
pub(crate) fn view(state: &AppState, p: InstalledPlugin) -> PluginView {
    let loaded = state.scheduler.runtime().plugin(&p.name).is_some();
    PluginView {
        triggers: serde_json::to_value(&p.triggers).unwrap_or_default(),
        limits: serde_json::to_value(p.limits).unwrap_or_default(),
        name: p.name,
        version: p.version,
        description: p.description,
        sha256: p.sha256,
        size: p.size,
        installed_at: p.installed_at,
        devices: p.devices,
        loaded,
    }
}

impl From<SubmitError> for AppError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::NotInstalled(_) => AppError::NotFound(e.to_string()),
            SubmitError::ShuttingDown | SubmitError::QueueFull { .. } => {
                AppError::Unavailable(e.to_string())
            }
            SubmitError::Store(e) => e.into(),
        }
    }
}

impl From<PluginError> for AppError {
    fn from(e: PluginError) -> Self {
        match e {
            PluginError::NotInstalled(_) => AppError::NotFound(e.to_string()),
            PluginError::Manifest(_)
            | PluginError::Source(_)
            | PluginError::Component { .. }
            | PluginError::Trigger(_) => AppError::Invalid(e.to_string()),
            PluginError::Engine(_) | PluginError::Store(_) | PluginError::Io { .. } => {
                AppError::Internal(e.to_string())
            }
        }
    }
}

/// List installed plugins
#[utoipa::path(
    get,
    path = "/api/plugins",
    tag = "plugins",
    responses((status = 200, description = "Every installed plugin the token covers, by name", body = [PluginView]))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
) -> Result<Json<Vec<PluginView>>, AppError> {
    let plugins = state.scheduler.runtime().installed()?;
    Ok(Json(
        plugins
            .into_iter()
            .filter(|p| authz::authorize_plugin(&token, p).is_ok())
            .map(|p| view(&state, p))
            .collect(),
    ))
}

/// The installed plugin `name`, or 404 when the token does not cover it.
fn covered(state: &AppState, token: &TokenInfo, name: &str) -> Result<InstalledPlugin, AppError> {
    let p = state.scheduler.runtime().installed_plugin(name)?;
    authz::authorize_plugin(token, &p)?;
    Ok(p)
}

/// Show one plugin
#[utoipa::path(
    get,
    path = "/api/plugins/{name}",
    tag = "plugins",
    params(("name" = String, Path, description = "Plugin name")),
    responses(
        (status = 200, description = "The plugin", body = PluginView),
        (status = 404, description = "Not installed", body = super::ErrorBody),
    )
)]
pub async fn show(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
    Path(name): Path<String>,
) -> Result<Json<PluginView>, AppError> {
    let p = covered(&state, &token, &name)?;
    Ok(Json(view(&state, p)))
}

/// The body of `POST /api/plugins`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstallBody {
    /// The plugin's `plugin.toml`, as text.
    manifest: String,
    /// The plugin's `.wasm` component, base64 (standard alphabet).
    wasm_base64: String,
}

/// A hook secret the engine generated at install.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HookSecret {
    pub hook: String,
    /// Give it to the sender (HMAC key or bearer token). Shown once, here.
    pub secret: String,
}

/// The answer to an install.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InstalledView {
    pub plugin: PluginView,
    /// Secrets generated for the plugin's hooks that had none; not shown again.
    pub generated_secrets: Vec<HookSecret>,
}

/// Install or replace a plugin
///
/// The manifest is validated against the known devices and the component compiled and
/// linked before anything is stored; a plugin of the same name is replaced.
#[utoipa::path(
    post,
    path = "/api/plugins",
    tag = "plugins",
    request_body = InstallBody,
    responses(
        (status = 201, description = "Installed; hook secrets are shown this once", body = InstalledView),
        (status = 413, description = "The body is over 64 MiB", body = super::ErrorBody),
        (status = 422, description = "Not a valid manifest or component; the message says why", body = super::ErrorBody),
    )
)]
pub async fn install(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AppError> {
    let body = body?;
    let body: InstallBody =
        serde_json::from_slice(&body).map_err(|e| AppError::bad_json("install request", &e))?;
    let wasm = {
        use base64::Engine as _;
        let text: String = body
            .wasm_base64
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| AppError::Invalid(format!("wasm_base64 is not base64: {e}")))?
    };
    let src = PluginSource {
        manifest: body.manifest,
        manifest_file: "the uploaded manifest".into(),
        wasm,
        wasm_file: "the uploaded component".into(),
    };
    let scheduler = state.scheduler.clone();
    // Compiling a component takes a while: off the async workers.
    let installed = tokio::task::spawn_blocking(move || scheduler.plugins().install(&src))
        .await
        .map_err(|e| AppError::Internal(format!("the install task failed: {e}")))??;
    let name = installed.plugin.name.clone();
    let generated_secrets = installed
        .generated_secrets
        .iter()
        .map(|(hook, secret)| HookSecret {
            hook: hook.clone(),
            secret: secret.expose_str().unwrap_or_default().to_string(),
        })
        .collect();
    tracing::info!(plugin = %name, "plugin installed over the API");
    let v = InstalledView {
        plugin: view(&state, installed.plugin),
        generated_secrets,
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/plugins/{name}"))],
        Json(v),
    )
        .into_response())
}

/// Remove a plugin
///
/// Its record, files, compiled code, state and hooks go; its run history stays.
#[utoipa::path(
    delete,
    path = "/api/plugins/{name}",
    tag = "plugins",
    params(("name" = String, Path, description = "Plugin name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "Not installed", body = super::ErrorBody),
    )
)]
pub async fn remove(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, AppError> {
    let removed = state.scheduler.plugins().remove(&name)?;
    tracing::info!(plugin = %removed.name, "plugin removed over the API");
    Ok(StatusCode::NO_CONTENT)
}

/// The body of `POST /api/plugins/{name}/run`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    /// Handed to the plugin as the manual event's input.
    #[serde(default)]
    input: String,
    /// Run as if this webhook of the plugin had received `input` as its body (a JSON
    /// delivery without a delivery id).
    #[serde(default)]
    webhook: Option<String>,
}

/// The query of `POST /api/plugins/{name}/run`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunParams {
    /// Wait for the run to end and answer with its record.
    #[serde(default)]
    wait: bool,
    /// Seconds to wait at most (1-3600; default and upper bound: the engine's
    /// `runs.max_wait`, 60 s unless configured).
    #[param(minimum = 1, maximum = 3600)]
    timeout: Option<u64>,
    /// With `wait`: the record also carries `report`, the runtime's full report of the
    /// run (stdout, stderr, denials), when the run ended.
    #[serde(default)]
    report: bool,
}

/// A run record with the runtime's report of the run (`?wait=true&report=true`).
#[derive(Debug, Serialize)]
struct ReportedRun {
    #[serde(flatten)]
    record: RunRecord,
    report: Option<crate::plugin::report::RunReport>,
}

/// The answer to a run request that does not wait.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunStarted {
    #[schema(value_type = String, format = Uuid)]
    pub run_id: RunId,
}

/// Run a plugin now
///
/// Queues a manual run (or, with `webhook`, one as if that hook had received the input);
/// `?wait=true` waits for it to end (bounded by `timeout`) and answers with the run
/// record: 200 when it ended, 202 when it is still queued or running. `&report=true`
/// adds the runtime's full report of an ended run to the record.
#[utoipa::path(
    post,
    path = "/api/plugins/{name}/run",
    tag = "plugins",
    params(("name" = String, Path, description = "Plugin name"), RunParams),
    request_body(content = RunBody, description = "Optional; `{}` runs with empty input"),
    responses(
        (status = 202, description = "Queued (without wait, or still running at the timeout)", body = RunStarted),
        (status = 200, description = "With wait: the run ended", body = RunRecord),
        (status = 404, description = "Not installed", body = super::ErrorBody),
        (status = 422, description = "A bad query (`wait`, `timeout`) or body", body = super::ErrorBody),
        (status = 503, description = "The engine cannot take runs now", body = super::ErrorBody),
    )
)]
pub async fn run(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
    Path(name): Path<String>,
    query: Result<Query<RunParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AppError> {
    let body = body?;
    let Query(q) = query.map_err(|e| AppError::Invalid(e.body_text()))?;
    if token.is_device_scoped() {
        covered(&state, &token, &name)?;
    }
    let body: RunBody = if body.iter().all(u8::is_ascii_whitespace) {
        RunBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| AppError::bad_json("run request", &e))?
    };
    let wait = match q.timeout {
        Some(t) if !(1..=MAX_WAIT_SECS).contains(&t) => {
            return Err(AppError::Invalid(format!(
                "timeout must be between 1 and {MAX_WAIT_SECS} seconds"
            )));
        }
        Some(t) => Duration::from_secs(t),
        None => state.scheduler.config().max_wait,
    };
    let event = match body.webhook {
        Some(hook) => crate::plugin::TriggerEvent::Webhook {
            hook,
            delivery: None,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.input.into_bytes(),
        },
        None => crate::trigger::manual::event(format!("api:{}", token.name), body.input),
    };
    let (id, report) = if q.wait && q.report {
        let (id, report) = state.scheduler.submit_reporting(&name, event)?;
        (id, Some(report))
    } else {
        (state.scheduler.submit(&name, event)?, None)
    };
    if !q.wait {
        return Ok((StatusCode::ACCEPTED, Json(RunStarted { run_id: id })).into_response());
    }
    let record = state.scheduler.wait(id, wait).await?;
    let status = if record.status.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    if let Some(mut report) = report {
        let report = report.try_recv().ok();
        return Ok((status, Json(ReportedRun { record, report })).into_response());
    }
    Ok((status, Json(record)).into_response())
}

/// The most audit records one request may ask for: an answer stays a few MB however
/// long the log has grown.
pub const MAX_AUDIT_TAIL: usize = 10_000;

/// The query of `GET /api/audit`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// How many of the last records (default 20, at most 10000).
    #[serde(default = "default_tail")]
    tail: usize,
}

fn default_tail() -> usize {
    20
}

/// The last audit records of plugin host calls
///
/// Oldest first, as stored: time, plugin and the host call (device, op, decision,
/// request, reason).
#[utoipa::path(
    get,
    path = "/api/audit",
    tag = "plugins",
    params(AuditParams),
    responses(
        (status = 200, description = "The last audit records", body = [Object]),
        (status = 403, description = "The token is limited to devices; the audit log spans every device", body = super::ErrorBody),
        (status = 422, description = "A bad query", body = super::ErrorBody),
    )
)]
pub async fn audit(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
    query: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Json<Vec<crate::plugin::records::AuditRecord>>, AppError> {
    authz::require_unscoped(&token, "the audit log")?;
    let Query(q) = query.map_err(|e| AppError::Invalid(e.body_text()))?;
    if q.tail > MAX_AUDIT_TAIL {
        return Err(AppError::Invalid(format!(
            "tail is at most {MAX_AUDIT_TAIL}"
        )));
    }
    let records = state
        .scheduler
        .runtime()
        .audit()
        .tail(q.tail)
        .map_err(|e| AppError::Internal(format!("reading the audit log: {e}")))?;
    Ok(Json(records))
}

impl From<crate::plugin::secrets::SecretError> for AppError {
    fn from(e: crate::plugin::secrets::SecretError) -> Self {
        use crate::plugin::secrets::SecretError;
        match e {
            SecretError::NotInstalled(_)
            | SecretError::Undeclared { .. }
            | SecretError::NotSet { .. } => AppError::NotFound(e.to_string()),
            SecretError::Invalid(_) => AppError::Invalid(e.to_string()),
            SecretError::Vault(_) => AppError::Internal(e.to_string()),
        }
    }
}

/// The body of `PUT /api/plugins/{name}/secrets/{secret}`; at most
/// [`MAX_SECRET_BODY`] bytes.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretBody {
    /// The value: text without control characters, at most 8 KiB. Never returned.
    #[schema(value_type = String, write_only)]
    value: crate::secret::Secret,
}

/// The largest body of a secret's `PUT`.
pub const MAX_SECRET_BODY: usize = 16 * 1024;

/// List a plugin's secrets
///
/// The secrets the plugin's manifest declares (`[secrets.NAME] origins`), with the
/// origins each is bound to and whether a value is stored. Never a value.
#[utoipa::path(
    get,
    path = "/api/plugins/{name}/secrets",
    tag = "plugins",
    params(("name" = String, Path, description = "Plugin name")),
    responses(
        (status = 200, description = "Its declared secrets", body = [crate::plugin::secrets::PluginSecret]),
        (status = 404, description = "Not installed", body = super::ErrorBody),
    )
)]
pub async fn secrets(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
    Path(name): Path<String>,
) -> Result<Json<Vec<crate::plugin::secrets::PluginSecret>>, AppError> {
    covered(&state, &token, &name)?;
    let runtime = state.scheduler.runtime();
    Ok(Json(crate::plugin::secrets::list(
        &state.vault,
        runtime,
        &name,
    )?))
}

/// Store a plugin secret
///
/// Seals the value in the vault under the plugin's secret `secret`, which its manifest
/// must declare. The plugin never reads it: it writes `{{secret.NAME}}` in a URL or
/// header value and the host substitutes it for the bound origins only.
#[utoipa::path(
    put,
    path = "/api/plugins/{name}/secrets/{secret}",
    tag = "plugins",
    params(
        ("name" = String, Path, description = "Plugin name"),
        ("secret" = String, Path, description = "The secret's name, as declared in `[secrets.NAME]`"),
    ),
    request_body(content = SecretBody),
    responses(
        (status = 204, description = "Stored"),
        (status = 404, description = "Not installed, or the manifest declares no such secret", body = super::ErrorBody),
        (status = 413, description = "The body is over 16 KiB", body = super::ErrorBody),
        (status = 422, description = "Not JSON like {\"value\": \"…\"}, or the value is empty, too long or not text", body = super::ErrorBody),
    )
)]
pub async fn secret_put(
    State(state): State<AppState>,
    Path((name, secret)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, AppError> {
    let body = body?;
    // The body holds a secret: the error never quotes it.
    let req: SecretBody = serde_json::from_slice(&body).map_err(|_| {
        AppError::Invalid("the body must be JSON like {\"value\": \"…\"}".to_string())
    })?;
    secret_change(state, move |vault, runtime| {
        crate::plugin::secrets::set(vault, runtime, &name, &secret, &req.value)
    })
    .await
}

/// Runs a change of a plugin secret off the async threads (the vault rewrites its file);
/// 204 when it is done.
async fn secret_change(
    state: AppState,
    change: impl FnOnce(
        &crate::vault::Vault,
        &crate::plugin::PluginRuntime,
    ) -> Result<(), crate::plugin::secrets::SecretError>
    + Send
    + 'static,
) -> Result<StatusCode, AppError> {
    tokio::task::spawn_blocking(move || change(&state.vault, state.scheduler.runtime()))
        .await
        .map_err(|e| AppError::Internal(format!("the secret task failed: {e}")))??;
    Ok(StatusCode::NO_CONTENT)
}

/// Remove a plugin secret's value
#[utoipa::path(
    delete,
    path = "/api/plugins/{name}/secrets/{secret}",
    tag = "plugins",
    params(
        ("name" = String, Path, description = "Plugin name"),
        ("secret" = String, Path, description = "The secret's name"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "Not installed, not declared, or no value stored", body = super::ErrorBody),
    )
)]
pub async fn secret_delete(
    State(state): State<AppState>,
    Path((name, secret)): Path<(String, String)>,
) -> Result<StatusCode, AppError> {
    secret_change(state, move |vault, runtime| {
        crate::plugin::secrets::remove(vault, runtime, &name, &secret)
    })
    .await
}
