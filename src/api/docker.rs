//! Docker connection checks over HTTP.
//!
//! - `POST /api/docker/pre-check`: checks an unsaved device spec, secrets included (as
//!   strings in the JSON body). Nothing is stored; secrets are never echoed.
//! - `GET /api/docker/check/{id}`: checks a stored device (by id or name).
//!
//! Both answer with the check report: 200 only when the daemon answered, 502 when the
//! device or the daemon failed, 504 on a timeout (the body says which kind of failure,
//! what to do, and which steps succeeded).

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{AppError, AppState};
use crate::device::{
    self, Device, DeviceKind, DeviceSecrets, DockerSshLogin, IpFamily, SecretField, SshAuth,
    SshTunnel,
};
use crate::docker::{CheckOptions, CheckReport, run_check};
use crate::secret::Secret;

/// Seconds allowed for connecting and for each call when the request does not say.
const DEFAULT_TIMEOUT_SECS: u64 = 10;
const MAX_TIMEOUT_SECS: u64 = 120;

/// The body of `POST /api/docker/pre-check`: a device as `capstan device add` takes it,
/// with its secrets inline.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreCheckSpec {
    /// A name for messages (default `pre-check`).
    #[serde(default)]
    name: Option<String>,
    kind: DeviceKind,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    #[schema(minimum = 1)]
    port: Option<u16>,
    #[serde(default)]
    user: Option<String>,
    /// Inferred from `private_key` / `password` when absent.
    #[serde(default)]
    auth: Option<SshAuth>,
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, write_only)]
    password: Option<Secret>,
    /// OpenSSH or PEM private key text.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, write_only)]
    private_key: Option<Secret>,
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, write_only)]
    key_passphrase: Option<Secret>,
    /// Docker-only SSH credentials.
    #[serde(default)]
    docker_login: Option<DockerLoginSpec>,
    #[serde(default)]
    ip_family: IpFamily,
    #[serde(default)]
    agent_forwarding: bool,
    #[serde(default)]
    keyboard_interactive: bool,
    #[serde(default)]
    socket_path: Option<String>,
    #[serde(default)]
    sudo: bool,
    /// How the Docker connection crosses the SSH session (default: the engine's).
    #[serde(default)]
    ssh_tunnel: Option<SshTunnel>,
    /// The host key to expect (OpenSSH public key line).
    #[serde(default)]
    host_key: Option<String>,
    #[serde(default)]
    docker_host: Option<String>,
    #[serde(default)]
    tls_server_name: Option<String>,
    /// PEM texts.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, write_only)]
    tls_ca: Option<Secret>,
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, write_only)]
    tls_cert: Option<Secret>,
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, write_only)]
    tls_key: Option<Secret>,
    /// Accept the SSH server's key when `host_key` is absent; the report shows it, to
    /// pin when the device is saved.
    #[serde(default)]
    trust_host_key: bool,
    /// Seconds allowed for connecting and for each call (1-120, default 10).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 120)]
    timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DockerLoginSpec {
    user: String,
    #[serde(default)]
    auth: Option<SshAuth>,
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, write_only)]
    password: Option<Secret>,
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, write_only)]
    private_key: Option<Secret>,
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, write_only)]
    key_passphrase: Option<Secret>,
}

fn infer_auth(
    given: Option<SshAuth>,
    key: &Option<Secret>,
    pw: &Option<Secret>,
) -> Option<SshAuth> {
    given.or(if key.is_some() {
        Some(SshAuth::Key)
    } else if pw.is_some() {
        Some(SshAuth::Password)
    } else {
        None
    })
}

impl PreCheckSpec {
    /// The device and secrets the spec describes, validated as `device add` would.
    fn into_device(self) -> Result<(Device, DeviceSecrets, CheckSettings), AppError> {
        let now = chrono::Utc::now();
        let mut secrets = DeviceSecrets::default();
        let mut put = |f: SecretField, s: Option<Secret>| {
            if let Some(s) = s {
                secrets.set(f, s);
            }
        };
        let auth = infer_auth(self.auth, &self.private_key, &self.password);
        let key_has_passphrase = self.key_passphrase.is_some();
        put(SecretField::Password, self.password);
        put(SecretField::PrivateKey, self.private_key);
        put(SecretField::KeyPassphrase, self.key_passphrase);
        let docker_login = match self.docker_login {
            Some(l) => {
                let auth = infer_auth(l.auth, &l.private_key, &l.password).ok_or_else(|| {
                    AppError::Invalid(
                        "docker_login needs private_key, password or an auth method".into(),
                    )
                })?;
                let has_pass = l.key_passphrase.is_some();
                put(SecretField::DockerPassword, l.password);
                put(SecretField::DockerPrivateKey, l.private_key);
                put(SecretField::DockerKeyPassphrase, l.key_passphrase);
                Some(DockerSshLogin {
                    user: l.user,
                    auth,
                    key_has_passphrase: has_pass && auth == SshAuth::Key,
                })
            }
            None => None,
        };
        put(SecretField::TlsCa, self.tls_ca);
        put(SecretField::TlsCert, self.tls_cert);
        put(SecretField::TlsKey, self.tls_key);
        let dev = Device {
            id: uuid::Uuid::new_v4(),
            name: self.name.unwrap_or_else(|| "pre-check".into()),
            kind: self.kind,
            host: self.host,
            port: self.port,
            user: self.user,
            auth,
            key_has_passphrase: key_has_passphrase && auth == Some(SshAuth::Key),
            docker_login,
            ip_family: self.ip_family,
            agent_forwarding: self.agent_forwarding,
            keyboard_interactive: self.keyboard_interactive,
            socket_path: self.socket_path,
            sudo: self.sudo,
            ssh_tunnel: self.ssh_tunnel,
            host_key: self.host_key.map(|k| k.trim().to_string()),
            docker_host: self.docker_host,
            tls_server_name: self.tls_server_name,
            created_at: now,
            updated_at: now,
        };
        device::validate(&dev, &|f| secrets.get(f).cloned())?;
        Ok((
            dev,
            secrets,
            CheckSettings::new(self.trust_host_key, self.timeout_secs)?,
        ))
    }
}

struct CheckSettings {
    trust_host_key: bool,
    timeout: Duration,
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
    request_body = PreCheckSpec,
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
    let spec: PreCheckSpec =
        serde_json::from_slice(&body).map_err(|e| AppError::bad_json("device spec", &e))?;
    let (dev, secrets, settings) = spec.into_device()?;
    let report = run_check(&dev, &secrets, &check_options(&state, &settings)).await;
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
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    check_stored(&state, &id, &CheckSettings::new(false, None)?).await
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
}

/// Check a stored device, with options
///
/// As `GET`, with a timeout of your choosing and, for an SSH device with no pinned
/// host key, trust on first use: the presented key is pinned when the SSH login succeeds
/// (`host_key.trusted_now` in the report).
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
    let settings = CheckSettings::new(req.trust_host_key, req.timeout_secs)?;
    check_stored(&state, &id, &settings).await
}

async fn check_stored(
    state: &AppState,
    id: &str,
    settings: &CheckSettings,
) -> Result<Response, AppError> {
    let (dev, secrets) = {
        let devices = state.devices()?;
        let dev = devices.get(id)?;
        let secrets = devices.secrets(&dev)?;
        (dev, secrets)
    };
    if settings.trust_host_key && dev.kind != DeviceKind::Ssh {
        return Err(AppError::Invalid(format!(
            "trust_host_key is for ssh devices; {} is a {} device",
            dev.name, dev.kind
        )));
    }
    let mut report = run_check(&dev, &secrets, &check_options(state, settings)).await;
    report.device_id = Some(dev.id);
    if let Some(k) = report.host_key.as_ref().filter(|k| k.trusted_now) {
        state.devices()?.edit(
            &dev.id.to_string(),
            device::DeviceChanges::pin_host_key(&k.key),
        )?;
        state.docker.forget(dev.id);
        tracing::info!(device = %dev.name, key = %k.fingerprint, "pinned the SSH host key the server presented (trust on first use, over the API)");
    }
    Ok(respond(report))
}
