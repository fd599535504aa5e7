//! Notifier channel routes: list, add, remove, send a test message.
//!
//! A channel's URL holds the service's token, so it is write-only: a request may carry
//! it, no response does — they show [`NotifierInfo`] (name, service, scheme and host).
//! Adding goes through [`crate::notify::Notifier::add`], the same path as `capstan
//! notifier add`, so the API and the CLI agree on what a valid channel URL is.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{AppError, AppState};
use crate::notify::{NotifierInfo, NotifyError};
use crate::secret::Secret;

/// The body of `POST /api/notifiers`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewNotifier {
    /// The channel's name (letters, digits, `.`, `_`, `-`; at most 64).
    #[schema(example = "ops")]
    pub name: String,
    /// The channel URL, e.g. `ntfy://ntfy.sh/alerts` (see the README's notifier
    /// section for every service). Stored in the vault; never returned.
    #[schema(example = "ntfy://ntfy.sh/alerts")]
    pub url: String,
}

impl From<NotifyError> for AppError {
    fn from(e: NotifyError) -> Self {
        match e {
            NotifyError::NotFound(_) => AppError::NotFound(e.to_string()),
            NotifyError::Duplicate(_) => AppError::Conflict(e.to_string()),
            NotifyError::BadName(_) => AppError::InvalidSetting {
                message: e.to_string(),
                setting: "name",
            },
            NotifyError::Url(_) => AppError::InvalidSetting {
                message: e.to_string(),
                setting: "url",
            },
            NotifyError::Invalid(_) => AppError::Invalid(e.to_string()),
            NotifyError::Undelivered(_) => AppError::Unavailable(e.to_string()),
            NotifyError::Storage(_) => AppError::Internal(e.to_string()),
        }
    }
}

/// List notifier channels
#[utoipa::path(
    get,
    path = "/api/notifiers",
    tag = "notifiers",
    responses((status = 200, description = "Every channel, by name; never its URL", body = [NotifierInfo]))
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<NotifierInfo>>, AppError> {
    Ok(Json(state.notifier.list()?))
}

/// Add a notifier channel
///
/// The URL is checked (service, host, token, recipients) and sealed in the vault; the
/// answer shows only the service and the URL's scheme and host.
#[utoipa::path(
    post,
    path = "/api/notifiers",
    tag = "notifiers",
    request_body = NewNotifier,
    responses(
        (status = 201, description = "Added", body = NotifierInfo,
            headers(("location" = String, description = "The channel's URL in this API"))),
        (status = 409, description = "A channel with that name exists", body = super::ErrorBody),
        (status = 422, description = "A bad name or URL; the message says why (never quoting the URL)", body = super::ErrorBody),
    )
)]
pub async fn add(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AppError> {
    let body = body?;
    let new: NewNotifier =
        serde_json::from_slice(&body).map_err(|e| AppError::bad_json("notifier", &e))?;
    let url = Secret::from_str_owned(new.url);
    let info = state.notifier.add(&state.vault, &new.name, &url)?;
    let location = format!("/api/notifiers/{}", info.name);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(info),
    )
        .into_response())
}

/// Remove a notifier channel
///
/// Removes its record and its URL from the vault. Manifests that name it keep loading;
/// their notifications to it answer `not-found`.
#[utoipa::path(
    delete,
    path = "/api/notifiers/{name}",
    tag = "notifiers",
    params(("name" = String, Path, description = "Channel name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such channel", body = super::ErrorBody),
    )
)]
pub async fn remove(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, AppError> {
    state.notifier.remove(&state.vault, &name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Send a test message
///
/// One attempt, now, past the dedup window and rate limit; answers when the service has
/// accepted it (or not). The outcome is also written to the audit log.
#[utoipa::path(
    post,
    path = "/api/notifiers/{name}/test",
    tag = "notifiers",
    params(("name" = String, Path, description = "Channel name")),
    responses(
        (status = 200, description = "The service accepted the test message", body = Object,
            example = json!({"delivered": true, "channel": {"name": "ops", "service": "ntfy", "at": "ntfy://ntfy.sh", "added_at": "2026-12-07T09:00:00Z"}})),
        (status = 404, description = "No such channel", body = super::ErrorBody),
        (status = 503, description = "The service did not accept it; the message says why (status, timeout, refused connection)", body = super::ErrorBody),
    )
)]
pub async fn test(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    let info = state.notifier.test(&state.vault, &name).await?;
    Ok(Json(
        serde_json::json!({ "delivered": true, "channel": info }),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_api_document_takes_a_channel_url_and_never_answers_one() {
        let doc = serde_json::to_value(super::super::openapi::document()).unwrap();
        let schemas = &doc["components"]["schemas"];
        assert!(
            schemas["NewNotifier"]["properties"]["url"].is_object(),
            "{schemas}"
        );
        let shown = &schemas["NotifierInfo"]["properties"];
        assert!(
            shown["at"].is_object() && shown["service"].is_object(),
            "{shown}"
        );
        assert!(shown.get("url").is_none(), "{shown}");
    }
}
