//! Device routes: create, list, show, update, delete.
//!
//! Secrets (passwords, private keys and their passphrases, TLS material) are write-only:
//! a request may carry them, a response never does. Responses carry the record and the
//! names of the secret fields the vault holds. Adding and editing go through
//! [`Devices`](crate::device::Devices), the same path as `capstan device add|edit`, so the
//! API and the CLI agree on what a valid device is.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Deserializer};

use super::{AppError, AppState};
use crate::device::{Device, DeviceChanges, DeviceKind, IpFamily, SecretField, SshAuth, SshTunnel};
use crate::secret::Secret;

/// A device as the API shows it: the record, and which secrets are stored (names only).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct DeviceView {
    #[serde(flatten)]
    pub device: Device,
    /// Which secret fields the vault holds for this device (names only).
    #[schema(example = json!(["private-key"]))]
    pub secrets: Vec<&'static str>,
}

fn view(state: &AppState, device: Device) -> Result<DeviceView, AppError> {
    let secrets = state
        .devices()?
        .stored_secret_fields(&device)?
        .into_iter()
        .map(|f| f.as_str())
        .collect();
    Ok(DeviceView { device, secrets })
}

/// `Some(value)` for a value, `Some(None)` for `null`; absent fields stay `None`
/// (with `#[serde(default)]`): "leave", "clear" and "set" in one field.
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// The body of `POST /api/devices` and `PATCH /api/devices/{name}`: the settings and
/// secrets `capstan device add` takes. On create, `name` and `kind` are required; on
/// update, an absent field is left as it is, `null` clears it (a secret too), and a value
/// replaces it. Secrets are write-only.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceBody {
    /// Unique name (letters, digits, `.`, `_`, `-`); on update, renames the device.
    #[schema(example = "web1")]
    name: Option<String>,
    /// How to reach the daemon; cannot change on update.
    kind: Option<DeviceKind>,
    /// Host name or address (ssh, tls).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, nullable)]
    host: Option<Option<String>>,
    /// Port; defaults: 22 for ssh, 2376 for tls.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u16>, nullable, minimum = 1)]
    port: Option<Option<u16>>,
    /// SSH login user.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, nullable)]
    user: Option<Option<String>>,
    /// SSH auth method; inferred from `private_key` / `password` when absent.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<SshAuth>, nullable)]
    auth: Option<Option<SshAuth>>,
    /// SSH password (write-only).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    password: Option<Option<Secret>>,
    /// SSH private key, OpenSSH or PEM text (write-only).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    private_key: Option<Option<Secret>>,
    /// The private key's passphrase (write-only).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    key_passphrase: Option<Option<Secret>>,
    /// Separate SSH credentials for the Docker connection only; `null` drops them.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<DockerLoginBody>, nullable)]
    docker_login: Option<Option<DockerLoginBody>>,
    /// Resolve the host to IPv4 or IPv6 addresses only.
    ip_family: Option<IpFamily>,
    /// Request agent forwarding on the SSH session.
    agent_forwarding: Option<bool>,
    /// Answer keyboard-interactive password prompts with the password.
    keyboard_interactive: Option<bool>,
    /// Docker socket on the remote host, e.g. `/run/user/1000/docker.sock`.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, nullable)]
    socket_path: Option<Option<String>>,
    /// Run the remote docker client through `sudo -n`.
    sudo: Option<bool>,
    /// How Docker connections cross the SSH session; `null` returns to the engine's
    /// default (`CAPSTAN_SSH_TUNNEL`, else `auto`).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<SshTunnel>, nullable)]
    ssh_tunnel: Option<Option<SshTunnel>>,
    /// The SSH host key to pin, an OpenSSH public key line (`ssh-ed25519 AAAA…`).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, nullable)]
    host_key: Option<Option<String>>,
    /// Local daemon address: `unix:///path` or `tcp://host:port`.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, nullable)]
    docker_host: Option<Option<String>>,
    /// Name to verify in the daemon's TLS certificate (default: the host).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, nullable)]
    tls_server_name: Option<Option<String>>,
    /// CA certificate, PEM (write-only).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    tls_ca: Option<Option<Secret>>,
    /// Client certificate, PEM (write-only).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    tls_cert: Option<Option<Secret>>,
    /// Client private key, PEM (write-only).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    tls_key: Option<Option<Secret>>,
}

/// Docker-only SSH credentials. On update, `user` and `auth` default to the device's
/// current Docker login.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DockerLoginBody {
    user: Option<String>,
    /// Inferred from `private_key` / `password` when absent.
    auth: Option<SshAuth>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    password: Option<Option<Secret>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    private_key: Option<Option<Secret>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    key_passphrase: Option<Option<Secret>>,
}

/// Records a secret change: a value sets it, `null` clears it.
fn put_secret(ch: &mut DeviceChanges, field: SecretField, value: Option<Option<Secret>>) {
    match value {
        Some(Some(s)) => ch.secrets.set(field, s),
        Some(None) => ch.clear_secrets.push(field),
        None => {}
    }
}

/// The auth method the given secrets imply, as the CLI infers it.
fn inferred_auth(ch: &DeviceChanges, key: SecretField, password: SecretField) -> Option<SshAuth> {
    if ch.secrets.get(key).is_some() {
        Some(SshAuth::Key)
    } else if ch.secrets.get(password).is_some() {
        Some(SshAuth::Password)
    } else {
        None
    }
}

impl DeviceBody {
    /// The kind and the change set this body describes, for a new device (`existing`
    /// `None`) or an update.
    fn into_changes(
        self,
        existing: Option<&Device>,
    ) -> Result<(DeviceKind, DeviceChanges), AppError> {
        let kind = match (self.kind, existing) {
            (Some(k), Some(d)) if k != d.kind => {
                return Err(AppError::Invalid(format!(
                    "device {} is a {} device; a device's kind cannot change (delete it and create it again)",
                    d.name, d.kind
                )));
            }
            (_, Some(d)) => d.kind,
            (Some(k), None) => k,
            (None, None) => {
                return Err(AppError::Invalid(
                    "a new device needs a kind: ssh, tls or local".into(),
                ));
            }
        };
        if existing.is_none() && self.name.is_none() {
            return Err(AppError::Invalid("a new device needs a name".into()));
        }
        let mut ch = DeviceChanges {
            name: self.name,
            host: self.host,
            port: self.port,
            user: self.user,
            ip_family: self.ip_family,
            agent_forwarding: self.agent_forwarding,
            keyboard_interactive: self.keyboard_interactive,
            socket_path: self.socket_path,
            sudo: self.sudo,
            ssh_tunnel: self.ssh_tunnel,
            host_key: self
                .host_key
                .map(|k| k.map(|k| k.trim().to_string()).filter(|k| !k.is_empty())),
            docker_host: self.docker_host,
            tls_server_name: self.tls_server_name,
            ..Default::default()
        };
        put_secret(&mut ch, SecretField::Password, self.password);
        put_secret(&mut ch, SecretField::PrivateKey, self.private_key);
        put_secret(&mut ch, SecretField::KeyPassphrase, self.key_passphrase);
        put_secret(&mut ch, SecretField::TlsCa, self.tls_ca);
        put_secret(&mut ch, SecretField::TlsCert, self.tls_cert);
        put_secret(&mut ch, SecretField::TlsKey, self.tls_key);
        ch.auth = match self.auth {
            Some(a) => Some(a),
            None => inferred_auth(&ch, SecretField::PrivateKey, SecretField::Password).map(Some),
        };
        match self.docker_login {
            None => {}
            Some(None) => ch.docker_login = Some(None),
            Some(Some(l)) => {
                let current = existing.and_then(|d| d.docker_login.as_ref());
                put_secret(&mut ch, SecretField::DockerPassword, l.password);
                put_secret(&mut ch, SecretField::DockerPrivateKey, l.private_key);
                put_secret(&mut ch, SecretField::DockerKeyPassphrase, l.key_passphrase);
                let user = l
                    .user
                    .or_else(|| current.map(|c| c.user.clone()))
                    .ok_or_else(|| AppError::Invalid("docker_login needs a user".into()))?;
                let auth = l
                    .auth
                    .or_else(|| {
                        inferred_auth(
                            &ch,
                            SecretField::DockerPrivateKey,
                            SecretField::DockerPassword,
                        )
                    })
                    .or_else(|| current.map(|c| c.auth))
                    .ok_or_else(|| {
                        AppError::Invalid(
                            "docker_login needs private_key, password or an auth method".into(),
                        )
                    })?;
                ch.docker_login = Some(Some((user, auth)));
            }
        }
        Ok((kind, ch))
    }
}

fn parse_body(body: &Bytes) -> Result<DeviceBody, AppError> {
    serde_json::from_slice(body).map_err(|e| AppError::bad_json("device spec", &e))
}

/// List devices
#[utoipa::path(
    get,
    path = "/api/devices",
    tag = "devices",
    responses((status = 200, description = "Every device, by name", body = [DeviceView]))
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<DeviceView>>, AppError> {
    let devices = state.devices()?.list()?;
    devices
        .into_iter()
        .map(|d| view(&state, d))
        .collect::<Result<Vec<_>, _>>()
        .map(Json)
}

/// Show one device
#[utoipa::path(
    get,
    path = "/api/devices/{name}",
    tag = "devices",
    params(("name" = String, Path, description = "Device name or id")),
    responses(
        (status = 200, description = "The device; secrets by name only", body = DeviceView),
        (status = 404, description = "No such device", body = super::ErrorBody),
    )
)]
pub async fn show(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<DeviceView>, AppError> {
    let d = state.devices()?.get(&name)?;
    Ok(Json(view(&state, d)?))
}

/// Create a device
///
/// Validated as `capstan device add` validates; secrets go to the vault and are never
/// returned.
#[utoipa::path(
    post,
    path = "/api/devices",
    tag = "devices",
    request_body = DeviceBody,
    responses(
        (status = 201, description = "Created", body = DeviceView,
            headers(("location" = String, description = "The device's URL"))),
        (status = 409, description = "A device with that name exists", body = super::ErrorBody),
        (status = 422, description = "Not a valid device; the message says why", body = super::ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AppError> {
    let body = body?;
    let (kind, changes) = parse_body(&body)?.into_changes(None)?;
    let dev = state.devices()?.add(kind, changes)?;
    tracing::info!(device = %dev.name, kind = %dev.kind, "device added over the API");
    let location = format!("/api/devices/{}", dev.name);
    let v = view(&state, dev)?;
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(v)).into_response())
}

/// Update a device
///
/// Absent fields stay as they are, `null` clears a field (or a secret), a value replaces
/// it. A changed device's pooled Docker connections are dropped.
#[utoipa::path(
    patch,
    path = "/api/devices/{name}",
    tag = "devices",
    params(("name" = String, Path, description = "Device name or id")),
    request_body = DeviceBody,
    responses(
        (status = 200, description = "Updated", body = DeviceView),
        (status = 404, description = "No such device", body = super::ErrorBody),
        (status = 409, description = "Renamed to a name in use", body = super::ErrorBody),
        (status = 422, description = "The change would make an invalid device", body = super::ErrorBody),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DeviceView>, AppError> {
    let body = body?;
    let body = parse_body(&body)?;
    let dev = {
        let devices = state.devices()?;
        let old = devices.get(&name)?;
        let (_, changes) = body.into_changes(Some(&old))?;
        devices.edit(&old.id.to_string(), changes)?
    };
    state.docker.forget(dev.id);
    tracing::info!(device = %dev.name, "device updated over the API");
    Ok(Json(view(&state, dev)?))
}

/// Delete a device
///
/// Removes the record and its secrets, and closes its pooled Docker connections.
#[utoipa::path(
    delete,
    path = "/api/devices/{name}",
    tag = "devices",
    params(("name" = String, Path, description = "Device name or id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such device", body = super::ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, AppError> {
    let dev = state.devices()?.remove(&name)?;
    state.docker.forget(dev.id);
    tracing::info!(device = %dev.name, "device removed over the API");
    Ok(StatusCode::NO_CONTENT)
}
