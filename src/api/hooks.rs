//! Webhooks at the web edge: `POST /hooks/{name}` (deliveries, outside the
//! token-protected `/api` tree) and `GET /api/hooks` with the secret rotation routes
//! (operators wiring up senders: names, the plugin each runs and how deliveries
//! authenticate — never a secret).
//!
//! A delivery is verified by [`crate::trigger::webhook`], which answers with a typed
//! [`Answer`]; this route starts the run through the scheduler, builds the one response
//! from that answer and labels the delivery metric with it.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::authz::PluginFilter;
use super::{AppError, AppState};
use crate::plugin::admin::HookAdminError;
use crate::runs::RunSummary;
use crate::secret::Secret;
use crate::token::TokenInfo;
use crate::trigger::webhook::{
    self, API_TOKEN_HEADER, Answer, AuthKind, WaitResponse, WebhookError,
};

/// `?wait=true` on a hook: answer with the run's end (bounded by `runs.max_wait`).
#[derive(Debug, Default, Deserialize)]
pub(super) struct HookQuery {
    #[serde(default)]
    wait: bool,
}

/// `POST /hooks/{name}`: each hook authenticates its deliveries itself
/// ([`crate::trigger::webhook`]). Answers 202 with the run id; with `?wait=true`, 200
/// with the finished run (or 202 with the run so far when it outlasts
/// `runs.max_wait`): its summary ([`RunSummary`]), or the full record when the hook has
/// `wait_response = "full"` or the request carries a valid API token in
/// `X-Capstan-Token` ([`full_record`]).
pub(super) async fn deliver(
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<HookQuery>, QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let s = &state.scheduler;
    // Refused as every other refusal on this route is: JSON, and counted.
    let refused = |e: WebhookError| {
        let answer = Answer::Rejected(e);
        s.metrics().webhook_delivery("", answer.result());
        answer.into_response()
    };
    let wait = match query {
        Ok(q) => q.0.wait,
        Err(e) => {
            return refused(WebhookError::Unprocessable(format!(
                "the query: {}",
                e.body_text()
            )));
        }
    };
    let full = match wait.then(|| full_record(&state, &name, &headers)) {
        None => false,
        Some(Ok(full)) => full,
        Some(Err(e)) => return refused(e),
    };
    // 202 means durable: the run's `queued` record is on disk before the answer (in
    // cluster mode: JetStream acked the run's publish).
    let answer = webhook::deliver(s.hooks(), &name, &headers, body, |d| async move {
        let plugin = d.plugin.clone();
        if let Some(cluster) = s.cluster() {
            return crate::cluster::work::accept_delivery(cluster, d).await;
        }
        s.submit_durable(&plugin, d.into_event())
            .await
            .map(crate::trigger::webhook::Launched::Started)
            .map_err(|e| e.to_string())
    })
    .await;
    // Unknown hooks share one label, so strangers cannot create series at will.
    let label = if answer.names_a_hook() {
        name.as_str()
    } else {
        ""
    };
    s.metrics().webhook_delivery(label, answer.result());
    let Answer::Accepted { run_id: id } = answer else {
        return answer.into_response();
    };
    if !wait {
        return answer.into_response();
    }
    // In cluster mode another node may run it: its end arrives through the history stream.
    let waited = match s.cluster() {
        Some(_) => crate::cluster::history::wait_for_end(s.runs(), id, s.config().max_wait)
            .await
            .ok_or(crate::runs::RunError::NotFound(id)),
        None => s.wait(id, s.config().max_wait).await,
    };
    match waited {
        Ok(record) => {
            let status = if record.status.is_final() {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            let body = if full {
                serde_json::json!({
                    "status": record.status,
                    "run_id": id.to_string(),
                    "detail": "full",
                    "run": record,
                })
            } else {
                serde_json::json!({
                    "status": record.status,
                    "run_id": id.to_string(),
                    "detail": "summary",
                    "run": RunSummary::from(&record),
                })
            };
            (status, Json(body)).into_response()
        }
        Err(e) => {
            tracing::error!(run = %id, error = %e, "cannot read the run record");
            answer.into_response()
        }
    }
}

/// Whether a `?wait=true` answer carries the full run record (logs, host calls): when
/// the hook opts in (`wait_response = "full"`), or the request also carries a valid API
/// token in `X-Capstan-Token`. Otherwise a summary: one captured delivery must not
/// hand its holder what the plugin logged and touched. A token that does not verify, or
/// a device-scoped one that does not cover the hook's plugin (it could not read the run
/// over the API either), is refused (401) before anything runs, rather than silently
/// answered with less.
fn full_record(state: &AppState, hook: &str, headers: &HeaderMap) -> Result<bool, WebhookError> {
    match state.scheduler.hooks().wait_response(hook) {
        // Unknown: the delivery answers 404.
        None => return Ok(false),
        Some(WaitResponse::Full) => return Ok(true),
        Some(WaitResponse::Summary) => {}
    }
    let Some(token) = headers.get(API_TOKEN_HEADER) else {
        return Ok(false);
    };
    match state.tokens.verify(token.as_bytes().trim_ascii()) {
        Ok(Some(info)) if !info.is_device_scoped() => Ok(true),
        Ok(Some(info)) => {
            let covered = state
                .scheduler
                .hooks()
                .owner(hook)
                .and_then(|p| state.scheduler.runtime().installed_plugin(&p).ok())
                .is_some_and(|p| super::authz::authorize_plugin(&info, &p).is_ok());
            if covered {
                Ok(true)
            } else {
                Err(WebhookError::BadApiToken)
            }
        }
        Ok(None) => Err(WebhookError::BadApiToken),
        Err(e) => Err(WebhookError::Internal(e.to_string())),
    }
}

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
    /// With `?secrets=true`: which secrets the hook accepts (`current`, `current +
    /// previous`, or `none (closed)`), never the secrets themselves.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "current")]
    pub secrets: Option<&'static str>,
}

/// `GET /api/hooks?secrets=true` adds each hook's secret state.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct HookListQuery {
    /// Also say which secrets each hook accepts.
    #[serde(default)]
    secrets: bool,
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
    params(HookListQuery),
    responses((status = 200, description = "Every installed hook, by name", body = [HookView]))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
    Query(query): Query<HookListQuery>,
) -> Result<Json<Vec<HookView>>, AppError> {
    let filter = PluginFilter::for_token(&token, state.scheduler.runtime())?;
    Ok(Json(views(&state, &filter, query.secrets)))
}

/// Every installed hook the filter allows, by name; with `secrets`, which secrets each
/// accepts (never the secrets). The API's list and the dashboard's hooks page.
pub(crate) fn views(state: &AppState, filter: &PluginFilter, secrets: bool) -> Vec<HookView> {
    let secrets_of = |hook: &str| match webhook::HookKeys::load(&state.engine.vault, hook) {
        Ok(k) if k.previous.is_some() => "current + previous",
        Ok(_) => "current",
        Err(_) => "none (closed)",
    };
    let mut hooks: Vec<HookView> = state
        .scheduler
        .hooks()
        .list()
        .into_iter()
        .filter(|h| filter.allows(&h.plugin))
        .map(|h| HookView {
            secrets: secrets.then(|| secrets_of(&h.name)),
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
    hooks
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
        scheduler
            .plugins()
            .rotate_hook(&hook, req.secret.map(Secret::from_str_owned))
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
    let retired = tokio::task::spawn_blocking(move || scheduler.plugins().retire_hook(&hook))
        .await
        .map_err(|e| AppError::Internal(format!("the retire task failed: {e}")))??;
    Ok(Json(Retired {
        hook: name,
        retired,
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{HeaderValue, Request};
    use hmac::{KeyInit, Mac};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::plugin::PluginSource;
    use crate::runs::{RunQuery, RunTrigger};
    use crate::scheduler::Scheduler;
    use crate::trigger::webhook::HookKeys;

    const SECRET: &str = "It's a Secret to Everybody";

    fn signed(body: &str, delivery: &str) -> Vec<(&'static str, String)> {
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(body.as_bytes());
        vec![
            (
                "x-hub-signature-256",
                format!("sha256={}", hex::encode(mac.finalize().into_bytes())),
            ),
            ("x-github-delivery", delivery.to_string()),
            ("content-type", "application/json".to_string()),
        ]
    }

    /// An engine on a scratch directory with the trivial test plugin installed behind
    /// hook `gh` (GitHub-style, 2 KiB bodies).
    fn engine_with_hook() -> (tempfile::TempDir, Arc<Scheduler>) {
        let dir = tempfile::tempdir().unwrap();
        let engine = crate::engine::Engine::scratch(dir.path());
        HookKeys::set(&engine.vault, "gh", &Secret::from_str_owned(SECRET.into())).unwrap();
        let scheduler = Scheduler::with_defaults(Arc::new(engine)).unwrap();
        let wasm = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("plugins/target/wasm32-wasip2/release/trivial.wasm");
        let src = PluginSource {
            manifest: "name = \"deploy\"\nversion = \"1\"\n[[triggers.webhook]]\nname = \"gh\"\nauth = \"hmac-sha256\"\ndelivery_header = \"X-GitHub-Delivery\"\nmax_body = \"2KiB\"\n".into(),
            manifest_file: "plugin.toml".into(),
            wasm: std::fs::read(&wasm)
                .unwrap_or_else(|e| panic!("{}: {e} (build the plugins first)", wasm.display())),
            wasm_file: wasm.display().to_string(),
        };
        let installed = scheduler.plugins().install(&src).unwrap();
        assert!(installed.generated_secrets.is_empty());
        (dir, scheduler)
    }

    async fn post(
        app: &axum::Router,
        path: &str,
        headers: &[(&'static str, String)],
        body: String,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::post(path).body(Body::from(body)).unwrap();
        for (k, v) in headers {
            req.headers_mut()
                .insert(*k, HeaderValue::from_str(v).unwrap());
        }
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_route_serves_deliveries_with_the_hooks_body_limit() {
        let (_dir, scheduler) = engine_with_hook();
        let app = crate::api::hook_router(AppState::new(scheduler.clone()));

        let body = r#"{"ref":"refs/heads/main"}"#.to_string();
        let (status, json) = post(&app, "/hooks/gh", &signed(&body, "h-1"), body.clone()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{json}");
        let (status, json) = post(&app, "/hooks/gh", &signed(&body, "h-1"), body.clone()).await;
        assert_eq!(
            (status, json["status"].as_str()),
            (StatusCode::OK, Some("duplicate"))
        );
        let big = "x".repeat(3000);
        let (status, _) = post(&app, "/hooks/gh", &signed(&big, "h-2"), big.clone()).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        let (status, _) = post(&app, "/hooks/nope", &signed(&body, "h-3"), body).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let launched: Vec<_> = scheduler
            .runs()
            .list(&RunQuery {
                plugin: Some("deploy".into()),
                before: None,
                limit: 0,
            })
            .unwrap()
            .runs
            .into_iter()
            .map(|r| match r.trigger {
                RunTrigger::Webhook { delivery, .. } => delivery.unwrap_or_default(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(launched, ["h-1"]);
        scheduler.shutdown().await;
    }
}
