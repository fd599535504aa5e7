//! `GET /api/hooks`: the installed webhooks, for operators wiring up senders. Names, the
//! plugin each runs and how deliveries authenticate — never a secret.

use axum::Json;
use axum::extract::{Path, State};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{AppError, AppState};
use crate::scheduler::HookAdminError;
use crate::secret::Secret;
use crate::trigger::webhook::{AuthKind, WaitResponse};

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
    /// Whether a delivery whose signature was accepted before answers as a duplicate,
    /// whatever its delivery id (HMAC hooks, unless `replay = "allow"`; a bearer hook
    /// cannot tell).
    pub rejects_replays: bool,
    /// What `?wait=true` answers with: `summary`, or `full` (the run record).
    #[schema(example = "summary")]
    pub wait_response: &'static str,
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
            rejects_replays: h.rejects_replays,
            wait_response: match h.wait_response {
                WaitResponse::Summary => "summary",
                WaitResponse::Full => "full",
            },
        })
        .collect();
    hooks.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(hooks))
}

/// `POST /api/hooks/{name}/rotate`: the new secret, or nothing to have one generated.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// The new secret, at least 16 bytes. Omitted: a random one is generated and
    /// returned once.
    #[schema(write_only)]
    pub secret: Option<String>,
}

/// What a rotation did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Rotated {
    pub hook: String,
    /// The generated secret, shown this once (absent when the request gave one).
    pub generated_secret: Option<String>,
    /// The previous secret stays valid until `POST /api/hooks/{name}/retire`.
    pub previous_valid: bool,
}

/// What a retirement did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Retired {
    pub hook: String,
    /// Whether there was a previous secret to retire.
    pub retired: bool,
}

impl From<HookAdminError> for AppError {
    fn from(e: HookAdminError) -> Self {
        match e {
            HookAdminError::Unknown(_) => AppError::NotFound(e.to_string()),
            HookAdminError::Invalid(_) => AppError::Invalid(e.to_string()),
            HookAdminError::Plugin(p) => p.into(),
            HookAdminError::Hook(_) | HookAdminError::Store(_) => AppError::Internal(e.to_string()),
        }
    }
}

/// Rotate a webhook's secret
///
/// The new secret takes effect at once; the previous one stays valid until it is
/// retired, so senders can be switched over without losing deliveries.
#[utoipa::path(
    post,
    path = "/api/hooks/{name}/rotate",
    tag = "hooks",
    params(("name" = String, Path, description = "The hook")),
    request_body(content = RotateRequest, description = "Optional: the new secret"),
    responses(
        (status = 200, description = "Rotated", body = Rotated),
        (status = 404, description = "No installed plugin declares the hook", body = super::ErrorBody),
        (status = 422, description = "The secret is too short or the body is not JSON", body = super::ErrorBody),
    )
)]
pub async fn rotate(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Rotated>, AppError> {
    let req: RotateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RotateRequest::default()
    } else {
        // The body may hold a secret: the error never quotes it.
        serde_json::from_slice(&body).map_err(|_| {
            AppError::Invalid("the body must be empty or JSON like {\"secret\": \"…\"}".to_string())
        })?
    };
    let scheduler = state.scheduler.clone();
    let hook = name.clone();
    let generated = tokio::task::spawn_blocking(move || {
        scheduler.rotate_hook(&hook, req.secret.map(Secret::from_str_owned))
    })
    .await
    .map_err(|e| AppError::Internal(format!("the rotation task failed: {e}")))??;
    Ok(Json(Rotated {
        hook: name,
        generated_secret: generated.map(|s| s.expose_str().unwrap_or_default().to_string()),
        previous_valid: true,
    }))
}

/// Retire a webhook's previous secret
#[utoipa::path(
    post,
    path = "/api/hooks/{name}/retire",
    tag = "hooks",
    params(("name" = String, Path, description = "The hook")),
    responses(
        (status = 200, description = "The previous secret is no longer accepted", body = Retired),
        (status = 404, description = "No installed plugin declares the hook", body = super::ErrorBody),
    )
)]
pub async fn retire(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Retired>, AppError> {
    let scheduler = state.scheduler.clone();
    let hook = name.clone();
    let retired = tokio::task::spawn_blocking(move || scheduler.retire_hook(&hook))
        .await
        .map_err(|e| AppError::Internal(format!("the retire task failed: {e}")))??;
    Ok(Json(Retired {
        hook: name,
        retired,
    }))
}
