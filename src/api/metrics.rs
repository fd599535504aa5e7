//! `GET /metrics`: the engine's metrics for Prometheus (see [`crate::metrics`]). Behind the
//! bearer token like every route but `/healthz`: give Prometheus a token of its own in
//! the scrape config (`authorization: { credentials_file: … }`). The metrics span every
//! device and plugin: a token limited to devices is refused (403).

use axum::extract::{Extension, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

use super::{AppError, AppState, authz};
use crate::token::TokenInfo;

/// Prometheus metrics
///
/// The OpenMetrics text format: runs by plugin and status, run durations, host calls by
/// operation and decision, SSH sessions and channels, webhook deliveries by result.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "engine",
    responses(
        (status = 200, description = "OpenMetrics text", body = String,
            content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        (status = 403, description = "The token is limited to devices; the metrics span every device", body = super::ErrorBody),
    )
)]
pub async fn serve(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
) -> Result<impl IntoResponse, AppError> {
    authz::require_unscoped(&token, "/metrics")?;
    if let Some(cluster) = state.scheduler.cluster() {
        cluster.refresh_gauges().await;
    }
    let text = state.scheduler.metrics().render(&state.docker);
    Ok(([(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text))
}
