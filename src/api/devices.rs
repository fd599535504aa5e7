//! Device routes. Responses carry the record and the names of the secret fields stored,
//! never a secret value.

use axum::Json;
use axum::extract::{Path, State};

use super::{AppError, AppState};
use crate::device::Device;

#[derive(serde::Serialize)]
pub struct DeviceView {
    #[serde(flatten)]
    pub device: Device,
    /// Which secret fields the vault holds for this device (names only).
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

pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<DeviceView>>, AppError> {
    let devices = state.devices()?.list()?;
    devices
        .into_iter()
        .map(|d| view(&state, d))
        .collect::<Result<Vec<_>, _>>()
        .map(Json)
}

pub async fn show(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<DeviceView>, AppError> {
    let d = state.devices()?.get(&name)?;
    Ok(Json(view(&state, d)?))
}
