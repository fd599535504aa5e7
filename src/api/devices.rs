//! Device routes: create, list, show, update, delete.
//!
//! Secrets (passwords, private keys and their passphrases, TLS material) are write-only:
//! a request may carry them, a response never does. Responses carry the record and the
//! names of the secret fields the vault holds. The body is a
//! [`DeviceSpec`](crate::device::DeviceSpec), and adding and editing go through
//! [`Devices`](crate::device::Devices), the same type and path as `capstan device
//! add|edit`, so the API and the CLI agree on what a valid device is.
//!
//! A token limited to devices lists only those and gets 404 for the others
//! ([`authz::authorize_device`]); changing devices is for unscoped admins.

use super::{AppError, AppState, authz};
use crate::device::{Device, DeviceSpec};
use crate::token::TokenInfo;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

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

/// The body of `POST /api/devices` and `PATCH /api/devices/{name}`: a [`DeviceSpec`]
/// (on create, `name` and `kind` are required). A host key of only spaces pins none.
fn parse_body(body: &Bytes) -> Result<DeviceSpec, AppError> {
    let mut spec: DeviceSpec =
        serde_json::from_slice(body).map_err(|e| AppError::bad_json("device spec", &e))?;
    if let Some(k) = &mut spec.host_key {
        *k = k.take().filter(|k| !k.trim().is_empty());
    }
    Ok(spec)
}

/// List devices
#[utoipa::path(
    get,
    path = "/api/devices",
    tag = "devices",
    responses((status = 200, description = "Every device the token sees, by name", body = [DeviceView]))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
) -> Result<Json<Vec<DeviceView>>, AppError> {
    let devices = state.devices()?.list()?;
    devices
        .into_iter()
        .filter(|d| token.sees_device(&d.name))
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
        (status = 404, description = "No such device (or not one the token sees)", body = super::ErrorBody),
    )
)]
pub async fn show(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
    Path(name): Path<String>,
) -> Result<Json<DeviceView>, AppError> {
    let d = visible(&state, &token, &name)?;
    Ok(Json(view(&state, d)?))
}

/// The device `asked` (name or id), or 404 (naming `asked`, as for a missing device)
/// when the token does not see it.
pub(super) fn visible(
    state: &AppState,
    token: &TokenInfo,
    asked: &str,
) -> Result<Device, AppError> {
    let d = state.devices()?.get(asked)?;
    authz::authorize_device(token, &d.name)
        .map_err(|_| AppError::NotFound(format!("no device named {asked:?}")))?;
    Ok(d)
}

/// Create a device
///
/// Validated as `capstan device add` validates; secrets go to the vault and are never
/// returned.
#[utoipa::path(
    post,
    path = "/api/devices",
    tag = "devices",
    request_body = DeviceSpec,
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
    let dev = state.devices()?.add(parse_body(&body)?)?;
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
    request_body = DeviceSpec,
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
    let spec = parse_body(&body)?;
    let dev = state.devices()?.edit(&name, spec)?;
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
