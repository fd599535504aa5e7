//! Run history routes: pages of records, one record, and a live stream of updates.
//!
//! `GET /api/runs/events` is what `capstan runs --follow` reads: every change to a run
//! record as it is committed, one JSON run record per line (NDJSON). A follower that
//! falls more than the run store's buffer (1024 updates) behind skips what it missed and
//! goes on with the newest (re-read with `GET /api/runs/{id}` what matters). At shutdown
//! `serve` gives open streams a moment, then closes them.
//!
//! A device-scoped token sees only the runs of plugins it covers
//! ([`authz::PluginFilter`]): pages and the stream leave the others out, and one of
//! their runs answers 404.

use std::convert::Infallible;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

use super::authz::PluginFilter;
use super::{AppError, AppState};
use crate::runs::{MAX_PAGE, RunError, RunId, RunQuery, RunRecord};
use crate::token::TokenInfo;

impl From<RunError> for AppError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::NotFound(_) => AppError::NotFound(e.to_string()),
            RunError::Invalid(_) => AppError::Invalid(e.to_string()),
            RunError::InvalidTransition { .. } => AppError::Conflict(e.to_string()),
            RunError::Store(_) => AppError::Internal(e.to_string()),
        }
    }
}

/// The query of `GET /api/runs`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this plugin's runs.
    plugin: Option<String>,
    /// Only runs older than this one: the previous page's `next`.
    #[param(format = Uuid)]
    before: Option<String>,
    /// Page size (default 50, at most 1000).
    #[param(maximum = 1000)]
    limit: Option<usize>,
}

/// A page of runs, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunPageView {
    pub runs: Vec<RunRecord>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    #[schema(value_type = Option<String>, format = Uuid)]
    pub next: Option<RunId>,
}

fn run_id(s: &str) -> Result<RunId, AppError> {
    s.parse().map_err(AppError::Invalid)
}

/// List runs
#[utoipa::path(
    get,
    path = "/api/runs",
    tag = "runs",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of runs, newest first", body = RunPageView),
        (status = 422, description = "A bad `before` or `limit`", body = super::ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<RunPageView>, AppError> {
    let Query(q) = query.map_err(|e| AppError::Invalid(e.body_text()))?;
    let limit = q.limit.unwrap_or(0);
    if limit > MAX_PAGE {
        return Err(AppError::Invalid(format!("limit is at most {MAX_PAGE}")));
    }
    let query = RunQuery {
        plugin: q.plugin.filter(|p| !p.is_empty()),
        before: q.before.as_deref().map(run_id).transpose()?,
        limit,
    };
    let filter = PluginFilter::for_token(&token, state.scheduler.runtime())?;
    let page = filter.list_runs(state.scheduler.runs(), &query)?;
    Ok(Json(RunPageView {
        runs: page.runs,
        next: page.next,
    }))
}

/// Show one run
#[utoipa::path(
    get,
    path = "/api/runs/{id}",
    tag = "runs",
    params(("id" = String, Path, format = Uuid, description = "Run id (a UUID)")),
    responses(
        (status = 200, description = "The run", body = RunRecord),
        (status = 404, description = "No such run", body = super::ErrorBody),
        (status = 422, description = "Not a run id", body = super::ErrorBody),
    )
)]
pub async fn show(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
    Path(id): Path<String>,
) -> Result<Json<RunRecord>, AppError> {
    let id = run_id(&id)?;
    let Some(r) = state.scheduler.runs().get(id)? else {
        return Err(RunError::NotFound(id).into());
    };
    PluginFilter::for_token(&token, state.scheduler.runtime())?.authorize_run(&r)?;
    Ok(Json(r))
}

/// The query of `GET /api/runs/events`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only this plugin's runs.
    plugin: Option<String>,
}

/// Follow runs
///
/// Every change to a run record as it is committed, one JSON run record per line
/// (`application/x-ndjson`), until the client goes away or the engine stops. A client
/// reading too slowly skips updates (more than 1024 behind).
#[utoipa::path(
    get,
    path = "/api/runs/events",
    tag = "runs",
    params(EventsQuery),
    responses((status = 200, description = "NDJSON: one run record per line", body = RunRecord,
        content_type = "application/x-ndjson"))
)]
pub async fn events(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, AppError> {
    let Query(q) = query.map_err(|e| AppError::Invalid(e.body_text()))?;
    let plugin = q.plugin.filter(|p| !p.is_empty());
    // A scoped token's plugins as they are when the stream opens.
    let filter = PluginFilter::for_token(&token, state.scheduler.runtime())?;
    let rx = state.scheduler.runs().subscribe();
    let start = (rx, plugin, filter);
    let stream = futures_util::stream::unfold(start, |(mut rx, plugin, filter)| async move {
        loop {
            let rec = match rx.recv().await {
                Ok(rec) => rec,
                Err(RecvError::Lagged(n)) => {
                    tracing::debug!(skipped = n, "a run follower lagged; updates skipped");
                    continue;
                }
                Err(RecvError::Closed) => return None,
            };
            if plugin.as_deref().is_some_and(|p| p != rec.plugin) || !filter.allows(&rec.plugin) {
                continue;
            }
            let mut line = serde_json::to_vec(&*rec).ok()?;
            line.push(b'\n');
            return Some((Ok::<_, Infallible>(Bytes::from(line)), (rx, plugin, filter)));
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
