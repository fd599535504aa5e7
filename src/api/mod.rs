//! The HTTP API (axum): one router, one error type, bearer-token auth on every route but
//! the health probe.
//!
//! [`router`] builds the whole API from the engine state so tests drive it with
//! `tower::ServiceExt::oneshot` and `serve` binds it to a socket. Authentication is a
//! layer on the `/api` sub-router, not a per-handler check, so a new route cannot forget
//! it; a test walks every route and expects 401 without a token.

mod devices;
mod docker;
pub mod error;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::engine::Engine;
pub use error::AppError;

/// What every handler works on: the engine's state and its run scheduler.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub scheduler: Arc<crate::scheduler::Scheduler>,
}

impl AppState {
    pub fn new(scheduler: Arc<crate::scheduler::Scheduler>) -> AppState {
        AppState {
            engine: scheduler.engine().clone(),
            scheduler,
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

/// Every route, for the auth test: (method, path with placeholders filled).
pub const PROTECTED_ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/devices"),
    ("GET", "/api/devices/local"),
    ("POST", "/api/docker/pre-check"),
    ("GET", "/api/docker/check/local"),
];

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/devices", get(devices::list))
        .route("/devices/{name}", get(devices::show))
        .route("/docker/pre-check", post(docker::pre_check))
        .route("/docker/check/{id}", get(docker::check))
        .fallback(|| async { AppError::NotFound("no such API route".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .nest("/api", api)
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Accepts `Authorization: Bearer cap_…` when the token's hash is stored.
async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = presented else {
        return AppError::Unauthorized.into_response();
    };
    match state.tokens.verify(token.as_bytes()) {
        Ok(Some(_)) => next.run(req).await,
        Ok(None) => AppError::Unauthorized.into_response(),
        Err(e) => AppError::Internal(e.to_string()).into_response(),
    }
}
