//! The HTTP API (axum): one router, one error type, bearer-token auth on every route but
//! the health probe.
//!
//! [`ROUTES`] is the one list of the API's routes: [`router`] registers exactly those,
//! behind the token check, and a test holds the OpenAPI document
//! (`GET /api/openapi.json`, generated from the handlers by utoipa, see [`openapi`]) to
//! the same list, both ways. Authentication is a layer over every route in the list and
//! the fallback, not a per-handler check, so a new route cannot forget it; a test walks
//! the list and expects 401 without a token. Only `/healthz` is open.
//!
//! Each route also declares the [`Role`] a token needs for it ([`Route::role`],
//! [`route_role`]); a layer on the route itself, inside the token check, refuses a token
//! below it with 403 before the handler runs, and a test walks every route with every
//! role. What a device-scoped token may
//! see is decided in [`authz`], which the dashboard calls too.
//!
//! Webhook deliveries (`POST /hooks/{name}`, [`HOOK_PATH`]) are not part of this
//! router: they authenticate each delivery with the hook's own secret (see
//! [`crate::trigger::webhook`]), are served by [`hook_router`] and merged in beside it
//! by `serve`.

pub mod authz;
pub mod cluster;
mod devices;
pub(crate) mod docker;
pub mod error;
pub(crate) mod hooks;
mod metrics;
mod notifiers;
pub mod openapi;
pub(crate) mod plugins;
mod runs;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, patch, post, put};
use axum::{Json, Router};

use crate::engine::Engine;
pub use crate::token::{Role, TokenInfo};
pub use error::{AppError, ErrorBody};

/// What every handler works on: the engine's state, its run scheduler, and how the
/// listener serving them is set up.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub scheduler: Arc<crate::scheduler::Scheduler>,
    pub listen: ListenInfo,
}

/// How the listener serving the API (and the dashboard beside it) is set up, for what
/// depends on it (a session cookie is `Secure` over TLS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenInfo {
    /// Whether clients reach the listener over TLS (`serve --tls-cert/--tls-key`).
    pub tls: bool,
}

impl AppState {
    /// The state of a listener without TLS (tests, the in-process CLI).
    pub fn new(scheduler: Arc<crate::scheduler::Scheduler>) -> AppState {
        AppState {
            engine: scheduler.engine().clone(),
            scheduler,
            listen: ListenInfo::default(),
        }
    }

    /// The same, served as `listen` says.
    pub fn with_listen(mut self, listen: ListenInfo) -> AppState {
        self.listen = listen;
        self
    }
}

impl std::ops::Deref for AppState {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

/// One route of the API.
pub struct Route {
    /// `GET`, `POST`, `PUT`, `PATCH`, `DELETE`.
    pub method: &'static str,
    /// The path as registered, `{name}` for a parameter.
    pub path: &'static str,
    /// The path with its parameters filled, for tests that walk the routes.
    pub example: &'static str,
    /// The least role a token needs: reading is `viewer`, running plugins and checking
    /// devices `operator`, changing anything `admin` (see [`authz`]).
    pub role: Role,
    handler: fn() -> MethodRouter<AppState>,
}

/// The role [`ROUTES`] declares for `method` on the route registered as `path` (`HEAD`
/// counts as `GET`); `None` for a method or path that is no route.
pub fn route_role(method: &str, path: &str) -> Option<Role> {
    let method = if method == "HEAD" { "GET" } else { method };
    ROUTES
        .iter()
        .find(|r| r.method == method && r.path == path)
        .map(|r| r.role)
}

/// Every route but `/healthz`; each needs a bearer token, with the role it declares.
pub const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/api/devices",
        role: Role::Viewer,
        example: "/api/devices",
        handler: || get(devices::list),
    },
    Route {
        method: "POST",
        path: "/api/devices",
        role: Role::Admin,
        example: "/api/devices",
        handler: || post(devices::create),
    },
    Route {
        method: "GET",
        path: "/api/devices/{name}",
        role: Role::Viewer,
        example: "/api/devices/local",
        handler: || get(devices::show),
    },
    Route {
        method: "PATCH",
        path: "/api/devices/{name}",
        role: Role::Admin,
        example: "/api/devices/local",
        handler: || patch(devices::update),
    },
    Route {
        method: "DELETE",
        path: "/api/devices/{name}",
        role: Role::Admin,
        example: "/api/devices/local",
        handler: || delete(devices::delete),
    },
    Route {
        method: "POST",
        path: "/api/docker/pre-check",
        role: Role::Admin,
        example: "/api/docker/pre-check",
        handler: || post(docker::pre_check),
    },
    Route {
        method: "GET",
        path: "/api/docker/check/{id}",
        role: Role::Operator,
        example: "/api/docker/check/local",
        handler: || get(docker::check),
    },
    Route {
        method: "POST",
        path: "/api/docker/check/{id}",
        role: Role::Operator,
        example: "/api/docker/check/local",
        handler: || post(docker::check_with),
    },
    Route {
        method: "GET",
        path: "/api/plugins",
        role: Role::Viewer,
        example: "/api/plugins",
        handler: || get(plugins::list),
    },
    Route {
        method: "POST",
        path: "/api/plugins",
        role: Role::Admin,
        example: "/api/plugins",
        handler: || post(plugins::install).layer(DefaultBodyLimit::max(plugins::MAX_INSTALL_BODY)),
    },
    Route {
        method: "GET",
        path: "/api/plugins/{name}",
        role: Role::Viewer,
        example: "/api/plugins/inventory",
        handler: || get(plugins::show),
    },
    Route {
        method: "DELETE",
        path: "/api/plugins/{name}",
        role: Role::Admin,
        example: "/api/plugins/inventory",
        handler: || delete(plugins::remove),
    },
    Route {
        method: "POST",
        path: "/api/plugins/{name}/run",
        role: Role::Operator,
        example: "/api/plugins/inventory/run",
        handler: || post(plugins::run),
    },
    Route {
        method: "GET",
        path: "/api/plugins/{name}/secrets",
        role: Role::Viewer,
        example: "/api/plugins/inventory/secrets",
        handler: || get(plugins::secrets),
    },
    Route {
        method: "PUT",
        path: "/api/plugins/{name}/secrets/{secret}",
        role: Role::Admin,
        example: "/api/plugins/inventory/secrets/slack",
        handler: || put(plugins::secret_put).layer(DefaultBodyLimit::max(plugins::MAX_SECRET_BODY)),
    },
    Route {
        method: "DELETE",
        path: "/api/plugins/{name}/secrets/{secret}",
        role: Role::Admin,
        example: "/api/plugins/inventory/secrets/slack",
        handler: || delete(plugins::secret_delete),
    },
    Route {
        method: "GET",
        path: "/api/audit",
        role: Role::Viewer,
        example: "/api/audit",
        handler: || get(plugins::audit),
    },
    Route {
        method: "GET",
        path: "/api/runs",
        role: Role::Viewer,
        example: "/api/runs",
        handler: || get(runs::list),
    },
    Route {
        method: "GET",
        path: "/api/runs/events",
        role: Role::Viewer,
        example: "/api/runs/events",
        handler: || get(runs::events),
    },
    Route {
        method: "GET",
        path: "/api/runs/{id}",
        role: Role::Viewer,
        example: "/api/runs/0190b5c2-0000-7000-8000-000000000000",
        handler: || get(runs::show),
    },
    Route {
        method: "GET",
        path: "/api/hooks",
        role: Role::Viewer,
        example: "/api/hooks",
        handler: || get(hooks::list),
    },
    Route {
        method: "POST",
        path: "/api/hooks/{name}/rotate",
        role: Role::Admin,
        example: "/api/hooks/registry/rotate",
        handler: || post(hooks::rotate),
    },
    Route {
        method: "POST",
        path: "/api/hooks/{name}/retire",
        role: Role::Admin,
        example: "/api/hooks/registry/retire",
        handler: || post(hooks::retire),
    },
    Route {
        method: "GET",
        path: "/api/notifiers",
        role: Role::Viewer,
        example: "/api/notifiers",
        handler: || get(notifiers::list),
    },
    Route {
        method: "POST",
        path: "/api/notifiers",
        role: Role::Admin,
        example: "/api/notifiers",
        handler: || post(notifiers::add),
    },
    Route {
        method: "DELETE",
        path: "/api/notifiers/{name}",
        role: Role::Admin,
        example: "/api/notifiers/ops",
        handler: || delete(notifiers::remove),
    },
    Route {
        method: "POST",
        path: "/api/notifiers/{name}/test",
        role: Role::Admin,
        example: "/api/notifiers/ops/test",
        handler: || post(notifiers::test),
    },
    Route {
        method: "GET",
        path: "/api/cluster",
        role: Role::Viewer,
        example: "/api/cluster",
        handler: || get(cluster::status),
    },
    Route {
        method: "GET",
        path: "/api/openapi.json",
        role: Role::Viewer,
        example: "/api/openapi.json",
        handler: || get(openapi::serve),
    },
    Route {
        method: "GET",
        path: "/metrics",
        role: Role::Viewer,
        example: "/metrics",
        handler: || get(metrics::serve),
    },
];

/// The open route: a liveness probe that says nothing about the engine.
pub const HEALTH_PATH: &str = "/healthz";

/// Webhook deliveries: outside `/api`, each hook authenticating its own (served by
/// [`hook_router`]).
pub const HOOK_PATH: &str = "/hooks/{name}";

/// The `POST /hooks/{name}` route alone, outside the token check: merge it beside
/// [`router`].
pub fn hook_router(state: AppState) -> Router {
    Router::new()
        .route(HOOK_PATH, post(hooks::deliver))
        .with_state(state)
}

/// The API every listener serves: each route but the health probe needs a bearer token.
pub fn router(state: AppState) -> Router {
    let protected = routes().layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route(HEALTH_PATH, get(healthz))
        .merge(protected)
        .with_state(state)
}

/// The name requests of the in-process CLI are made under (e.g. a manual run's
/// `api:local-cli`), the same as the CLI token's.
pub const IN_PROCESS_CALLER: &str = crate::app::cli_token::TOKEN_NAME;

/// The API for the CLI of this process, which opened the data directory itself (no
/// engine holds it): every request is made as [`IN_PROCESS_CALLER`], with no token.
/// It is never served on a socket: nothing but a value built in this process can call
/// it, so the network API's authentication stays as it is.
pub fn in_process_router(state: AppState) -> Router {
    let caller = crate::token::TokenInfo::internal(
        "in-process",
        IN_PROCESS_CALLER,
        crate::token::Role::Admin,
    );
    let protected = routes().layer(middleware::from_fn(move |mut req: Request, next: Next| {
        req.extensions_mut().insert(caller.clone());
        next.run(req)
    }));
    Router::new()
        .route(HEALTH_PATH, get(healthz))
        .merge(protected)
        .with_state(state)
}

/// [`ROUTES`], each behind the check of its role, with the fallbacks, before
/// authentication is layered on.
fn routes() -> Router<AppState> {
    let mut protected = Router::new();
    for r in ROUTES {
        let (need, method, path) = (r.role, r.method, r.path);
        let check = middleware::from_fn(move |req: Request, next: Next| {
            require_role(need, method, path, req, next)
        });
        protected = protected.route(r.path, (r.handler)().route_layer(check));
    }
    protected
        .fallback(|| async { AppError::NotFound("no such API route".into()) })
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
}

/// Liveness probe
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "engine",
    security(()),
    responses((status = 200, description = "The engine is up", body = Object,
        example = json!({"status": "ok"})))
)]
pub async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Accepts `Authorization: Bearer cap_…` when the token's hash is stored and its role is
/// the one the route declares (or above), and hands the token's record to the handler
/// (`Extension<TokenInfo>`: who asked for a run, and its device scope).
async fn require_token(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
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
        Ok(Some(info)) => {
            req.extensions_mut().insert(info);
            next.run(req).await
        }
        Ok(None) => AppError::Unauthorized.into_response(),
        Err(e) => AppError::Internal(e.to_string()).into_response(),
    }
}

/// Lets the request through to the route `method path` only when the caller's token
/// (put in the request by the authentication layer outside) has role `need` or above;
/// 403 naming the role otherwise, and 401 when no token came through at all.
async fn require_role(
    need: Role,
    method: &'static str,
    path: &'static str,
    req: Request,
    next: Next,
) -> Response {
    let Some(token) = req.extensions().get::<TokenInfo>() else {
        return AppError::Unauthorized.into_response();
    };
    match authz::require_role(token, need, &format!("{method} {path}")) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}
