//! `GET /api/hooks`: the installed webhooks, for operators wiring up senders. Names, the
//! plugin each runs and how deliveries authenticate — never a secret.

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::{AppError, AppState};
use crate::trigger::webhook::AuthKind;

/// One installed hook.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HookView {
    /// The hook's name; deliveries go to `POST /hooks/{name}`.
    #[schema(example = "registry")]
    pub name: String,
    /// The plugin a delivery runs.
    pub plugin: String,
    /// How deliveries authenticate: `hmac-sha256` or `bearer`.
    #[schema(example = "hmac-sha256")]
    pub auth: &'static str,
    /// Where senders deliver.
    #[schema(example = "/hooks/registry")]
    pub url_path: String,
}

fn auth_name(a: AuthKind) -> &'static str {
    match a {
        AuthKind::HmacSha256 => "hmac-sha256",
        AuthKind::Bearer => "bearer",
    }
}

/// List webhooks
#[utoipa::path(
    get,
    path = "/api/hooks",
    tag = "hooks",
    responses((status = 200, description = "Every installed hook, by name", body = [HookView]))
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<HookView>>, AppError> {
    let mut hooks: Vec<HookView> = state
        .scheduler
        .hooks()
        .list()
        .into_iter()
        .map(|h| HookView {
            url_path: format!("/hooks/{}", h.name),
            auth: auth_name(h.auth),
            name: h.name,
            plugin: h.plugin,
        })
        .collect();
    hooks.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(hooks))
}
