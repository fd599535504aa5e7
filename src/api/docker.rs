//! Docker connection checks over HTTP.
//!
//! - `POST /api/docker/pre-check`: checks an unsaved device spec, secrets included (as
//!   strings in the JSON body). Nothing is stored; secrets are never echoed.
//! - `GET /api/docker/check/{id}`: checks a stored device (by id or name).
//!
//! - `POST /api/docker/check/{id}`: the same, with options (a timeout, trust on first
//!   use, or `pooled`: over the engine's own connection to the device).
//!
//! In cluster mode, a check of a stored device on a node that does not own it goes to
//! the owner node over NATS (the owner's connection is the one plugins use), and the
//! report names it (`owner`); no owner is a failed check at the step `owner`.
//!
//! All answer with the check report: 200 only when the daemon answered, 502 when the
//! device or the daemon failed, 504 on a timeout (the body says which kind of failure,
//! what to do, and which steps succeeded). The engine runs at most
//! `[docker] check_concurrency` checks at once; the others wait for a slot.
//!
//! Checking a stored device is for operators (of that device: a device-scoped token gets
//! 404 for the others); pinning a host key on first use changes the device, so
//! `trust_host_key` needs admin. The pre-check connects anywhere with any credentials and
//! serves adding a device: admin.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{AppError, AppState, authz};
use crate::device::{self, Device, DeviceKind, DeviceSecrets, DeviceSpec};
use crate::docker::{CheckOptions, CheckReport};
use crate::token::{Role, TokenInfo};

/// Seconds allowed for connecting and for each call when the request does not say.
const DEFAULT_TIMEOUT_SECS: u64 = 10;
const MAX_TIMEOUT_SECS: u64 = 120;

/// The body of `POST /api/docker/pre-check`: a device as `capstan device add` takes it
/// (a [`DeviceSpec`], secrets inline; `name` defaults to `pre-check`), and how to run
/// the check.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = PreCheckSpec)]
pub struct PreCheckBody {
    #[serde(flatten)]
    device: DeviceSpec,
    /// Accept the SSH server's key when `host_key` is absent; the report shows it, to
    /// pin when the device is saved.
    #[serde(default)]
    trust_host_key: bool,
    /// Seconds allowed for connecting and for each call (1-120, default 10).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 120)]
    timeout_secs: Option<u64>,
}

impl PreCheckBody {
    /// Reads the body: the check's own two fields, and the rest as a device spec, which
    /// refuses unknown fields (serde's flattening would ignore them).
    fn parse(body: &[u8]) -> Result<PreCheckBody, AppError> {
        let bad = |e: serde_json::Error| AppError::bad_json("device spec", &e);
        let mut fields: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(body).map_err(bad)?;
        let trust_host_key = match fields.remove("trust_host_key") {
            Some(v) => serde_json::from_value(v).map_err(bad)?,
            None => false,
        };
        let timeout_secs = match fields.remove("timeout_secs") {
            Some(v) => serde_json::from_value(v).map_err(bad)?,
            None => None,
        };
        let device = serde_json::from_value(serde_json::Value::Object(fields)).map_err(bad)?;
        Ok(PreCheckBody {
            device,
            trust_host_key,
            timeout_secs,
        })
    }

    /// The device and secrets the body describes, validated as `device add` would.
    fn into_device(self) -> Result<(Device, DeviceSecrets, CheckSettings), AppError> {
        let mut spec = self.device;
        spec.name.get_or_insert_with(|| "pre-check".into());
        let dev = device::new_device(&spec)?;
        Ok((
            dev,
            spec.given_secrets(),
            CheckSettings::new(self.trust_host_key, self.timeout_secs)?,
        ))
    }
}

struct CheckSettings {
    trust_host_key: bool,
    timeout: Duration,
    pooled: bool,
}

impl CheckSettings {
    /// From a request's options: the timeout must be 1-120 s (default 10).
    fn new(trust_host_key: bool, timeout_secs: Option<u64>) -> Result<CheckSettings, AppError> {
        let timeout = timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
        if !(1..=MAX_TIMEOUT_SECS).contains(&timeout) {
            return Err(AppError::Invalid(format!(
                "timeout_secs must be between 1 and {MAX_TIMEOUT_SECS}"
            )));
        }
        Ok(CheckSettings {
            trust_host_key,
            timeout: Duration::from_secs(timeout),
            pooled: false,
        })
    }
}

fn check_options(state: &AppState, s: &CheckSettings) -> CheckOptions {
    let mut connect = state.docker.options().clone();
    connect.connect_timeout = s.timeout;
    connect.request_timeout = s.timeout;
    CheckOptions {
        trust_host_key: s.trust_host_key,
        connect,
        pooled: s.pooled,
    }
}

fn respond(report: CheckReport) -> Response {
    let status = StatusCode::from_u16(report.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
    (status, Json(report)).into_response()
}

/// Check an unsaved device
///
/// Connects with the given settings and secrets, pings the daemon and reads its version;
/// nothing is stored and no secret is echoed.
#[utoipa::path(
    post,
    path = "/api/docker/pre-check",
    tag = "docker",
    request_body = PreCheckBody,
    responses(
        (status = 200, description = "The daemon answered", body = CheckReport),
        (status = 422, description = "Not a valid device spec", body = super::ErrorBody),
        (status = 502, description = "The device or the daemon failed; the report says which step and why", body = CheckReport),
        (status = 504, description = "A step timed out", body = CheckReport),
    )
)]
pub async fn pre_check(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AppError> {
    let body = body?;
    let (dev, secrets, settings) = PreCheckBody::parse(&body)?.into_device()?;
    let report = state
        .docker
        .check(&dev, &secrets, &check_options(&state, &settings))
        .await;
    Ok(respond(report))
}

/// Check a stored device
///
/// Connects with the stored settings and secrets, pings the daemon and reads its
/// version. An SSH device without a pinned host key fails with `host-key-unknown`, the
/// report showing the key the server presented; `POST` with `trust_host_key` pins it.
#[utoipa::path(
    get,
    path = "/api/docker/check/{id}",
    tag = "docker",
    params(("id" = String, Path, description = "Device id or name")),
    responses(
        (status = 200, description = "The daemon answered", body = CheckReport),
        (status = 404, description = "No such device", body = super::ErrorBody),
        (status = 502, description = "The device or the daemon failed; the report says which step and why", body = CheckReport),
        (status = 504, description = "A step timed out", body = CheckReport),
    )
)]
pub async fn check(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    check_stored(&state, &token, &id, &CheckSettings::new(false, None)?).await
}

/// The body of `POST /api/docker/check/{id}`; every field is optional.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// When the device has no pinned SSH host key, accept the one the server presents
    /// and pin it (trust on first use). A pinned key is never replaced.
    #[serde(default)]
    trust_host_key: bool,
    /// Seconds allowed for connecting and for each call (1-120, default 10).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 120)]
    timeout_secs: Option<u64>,
    /// Check the engine's own connection to the device (the one plugins and proxies
    /// use) instead of a fresh one: its live SSH session is reused, or opened and kept.
    /// Not with `trust_host_key`.
    #[serde(default)]
    pooled: bool,
}

/// Check a stored device, with options
///
/// As `GET`, with a timeout of your choosing and, for an SSH device with no pinned
/// host key, trust on first use: the presented key is pinned when the SSH login succeeds
/// (`host_key.trusted_now` in the report). With `pooled`, over the engine's own
/// connection to the device (`pooled: true` in the report).
#[utoipa::path(
    post,
    path = "/api/docker/check/{id}",
    tag = "docker",
    params(("id" = String, Path, description = "Device id or name")),
    request_body(content = Option<CheckRequest>, description = "Options; an empty body or `null` means none"),
    responses(
        (status = 200, description = "The daemon answered", body = CheckReport),
        (status = 404, description = "No such device", body = super::ErrorBody),
        (status = 422, description = "Bad options, or trust_host_key for a device that is not ssh", body = super::ErrorBody),
        (status = 502, description = "The device or the daemon failed; the report says which step and why", body = CheckReport),
        (status = 504, description = "A step timed out", body = CheckReport),
    )
)]
pub async fn check_with(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AppError> {
    let body = body?;
    // No body, or `null`, means no options.
    let req: Option<CheckRequest> = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice(&body).map_err(|e| AppError::bad_json("check options", &e))?
    };
    let req = req.unwrap_or_default();
    if req.pooled && req.trust_host_key {
        return Err(AppError::Invalid(
            "trust_host_key needs a fresh check: a pooled check uses the engine's connection, which accepts only the pinned key".into(),
        ));
    }
    let mut settings = CheckSettings::new(req.trust_host_key, req.timeout_secs)?;
    settings.pooled = req.pooled;
    check_stored(&state, &token, &id, &settings).await
}

async fn check_stored(
    state: &AppState,
    token: &TokenInfo,
    id: &str,
    settings: &CheckSettings,
) -> Result<Response, AppError> {
    Ok(respond(
        check_stored_report(state, token, id, settings).await?,
    ))
}

/// Checks the stored device `id` (id or name) over a fresh connection with the default
/// timeout, as `token` (404 for a device it does not see): what the dashboard's "check
/// now" runs, the same check as `GET /api/docker/check/{id}`.
pub(crate) async fn check_device(
    state: &AppState,
    token: &TokenInfo,
    id: &str,
) -> Result<CheckReport, AppError> {
    check_stored_report(state, token, id, &CheckSettings::new(false, None)?).await
}

/// Checks a stored device, pins a key trusted on first use, and records the report in
/// the device's check history (the dashboard's last check and latency chart).
async fn check_stored_report(
    state: &AppState,
    token: &TokenInfo,
    id: &str,
    settings: &CheckSettings,
) -> Result<CheckReport, AppError> {
    let (dev, secrets) = {
        let dev = super::devices::visible(state, token, id)?;
        if settings.trust_host_key {
            authz::require_role(
                token,
                Role::Admin,
                "trust_host_key (pinning the device's host key)",
            )?;
        }
        let devices = state.devices()?;
        let secrets = devices.secrets(&dev)?;
        (dev, secrets)
    };
    if settings.trust_host_key && dev.kind != DeviceKind::Ssh {
        return Err(AppError::Invalid(format!(
            "trust_host_key is for ssh devices; {} is a {} device",
            dev.name, dev.kind
        )));
    }
    // Cluster mode: the owner's connection is the one that counts; a node that does not
    // own the device asks the owner (a first-use key pin is this node's own setup and
    // connects from here).
    if !settings.trust_host_key
        && let Some(cluster) = state.scheduler.cluster()
        && !cluster.holds(&dev.name)
    {
        let mut report = cluster.check_through_owner(&dev, settings.timeout).await;
        report.device_id = Some(dev.id);
        state.docker.history().record(report.clone());
        return Ok(report);
    }
    let mut report = state
        .docker
        .check(&dev, &secrets, &check_options(state, settings))
        .await;
    report.device_id = Some(dev.id);
    if let Some(k) = report.host_key.as_ref().filter(|k| k.trusted_now) {
        state
            .devices()?
            .edit(&dev.id.to_string(), DeviceSpec::pin_host_key(&k.key))?;
        state.docker.forget(dev.id);
        tracing::info!(device = %dev.name, key = %k.fingerprint, "pinned the SSH host key the server presented (trust on first use, over the API)");
    }
    state.docker.history().record(report.clone());
    Ok(report)
}
