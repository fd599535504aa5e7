//! One error type for every API failure, mapped to a status code and a JSON body in one
//! place. Internal detail is logged, not returned.
//!
//! Every error answers `{"error": {"kind": "...", "message": "..."}}` ([`ErrorBody`]);
//! `kind` is one of `unauthorized`, `forbidden`, `not-found`, `method-not-allowed`, `invalid`,
//! `conflict`, `too-large`, `unavailable`, `internal`. An invalid input that is one
//! setting adds `"setting"` (the body field, e.g. `"private_key"`), so a client can
//! name it in its own words (the CLI names the flag). Handlers take their body as
//! `Result<Bytes, BytesRejection>` and convert with `?`, so a body over the route's
//! limit is this JSON too.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::device::DeviceError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// The token is valid but its role (or device scope) does not allow the request; the
    /// message says which role or scope it would take.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("this route does not take that method")]
    MethodNotAllowed,
    #[error("{0}")]
    Invalid(String),
    /// Invalid, and about one setting: `setting` is its request body field.
    #[error("{message}")]
    InvalidSetting {
        message: String,
        setting: &'static str,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    /// The engine cannot do it now (shutting down, at capacity); the client may retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

/// The body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// `unauthorized`, `forbidden`, `not-found`, `method-not-allowed`, `invalid`,
    /// `conflict`, `too-large`, `unavailable` or `internal`.
    #[schema(example = "invalid")]
    pub kind: &'static str,
    /// What failed and what to do next. Never contains a secret.
    pub message: String,
    /// The request body field an `invalid` error is about, when it is about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "private_key")]
    pub setting: Option<&'static str>,
}

impl AppError {
    fn status_and_kind(&self) -> (StatusCode, &'static str) {
        match self {
            AppError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AppError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            AppError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            AppError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed"),
            AppError::Invalid(_) | AppError::InvalidSetting { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid")
            }
            AppError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            AppError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too-large"),
            AppError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            AppError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// A request body that is not the JSON the route takes. serde's messages quote the
    /// offending value ("invalid type: string \"…\", expected …"), which may be a secret
    /// put in the wrong field: those keep only what was expected and where.
    pub fn bad_json(what: &str, e: &serde_json::Error) -> AppError {
        let msg = e.to_string();
        let msg = match (
            msg.starts_with("invalid type:") || msg.starts_with("invalid value:"),
            msg.find(", expected "),
        ) {
            (true, Some(at)) => format!("a value has the wrong type or form{}", &msg[at..]),
            (true, None) => format!(
                "a value has the wrong type or form at line {} column {}",
                e.line(),
                e.column()
            ),
            (false, _) => msg,
        };
        AppError::Invalid(format!("invalid {what}: {msg}"))
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if let AppError::Internal(detail) = &self {
            tracing::error!(%detail, "API request failed");
        }
        let (status, kind) = self.status_and_kind();
        let mut resp = (
            status,
            Json(ErrorBody {
                error: ErrorDetail {
                    kind,
                    message: self.to_string(),
                    setting: match &self {
                        AppError::InvalidSetting { setting, .. } => Some(*setting),
                        _ => None,
                    },
                },
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                "www-authenticate",
                "Bearer".parse().expect("static header value"),
            );
        }
        resp
    }
}

impl From<axum::extract::rejection::BytesRejection> for AppError {
    fn from(e: axum::extract::rejection::BytesRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AppError::TooLarge("the request body is larger than this route accepts".into())
        } else {
            AppError::Invalid(format!(
                "the request body could not be read: {}",
                e.body_text()
            ))
        }
    }
}

impl From<DeviceError> for AppError {
    fn from(e: DeviceError) -> Self {
        match e {
            // The API's own wording: body fields rather than CLI flags, and no CLI hint.
            DeviceError::NotFound(name) => AppError::NotFound(format!("no device named {name:?}")),
            DeviceError::Invalid(why) => {
                let message = format!("invalid device: {}", why.for_api());
                match why.setting() {
                    Some(setting) => AppError::InvalidSetting { message, setting },
                    None => AppError::Invalid(message),
                }
            }
            DeviceError::Duplicate(_) => AppError::Conflict(e.to_string()),
            DeviceError::Spec(why) => AppError::Invalid(why),
            other => AppError::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_in_the_wrong_place_is_not_quoted_back() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Spec {
            port: u16,
        }
        let e = serde_json::from_str::<Spec>(r#"{"port": "hunter2"}"#).unwrap_err();
        let msg = AppError::bad_json("device", &e).to_string();
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(msg.contains("expected u16"), "{msg}");
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Spec {
            port: u16,
        }
        let e = serde_json::from_str::<Spec>(r#"{"prot": 1}"#).unwrap_err();
        assert!(AppError::bad_json("x", &e).to_string().contains("prot"));
    }

    async fn body_of(e: AppError) -> serde_json::Value {
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn an_invalid_device_setting_is_named_in_the_error_body() {
        let mut d = crate::device::Device::blank(crate::device::DeviceKind::Ssh, "web1");
        d.user = Some("u".into());
        let e = crate::device::validate(&d, &|_| None).unwrap_err();
        let v = body_of(AppError::from(e)).await;
        assert_eq!(v["error"]["kind"], "invalid");
        assert_eq!(v["error"]["setting"], "host");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("give `host`"), "{message}");
    }

    #[tokio::test]
    async fn other_errors_name_no_setting() {
        let v = body_of(AppError::Invalid("not a device".into())).await;
        assert_eq!(v["error"]["kind"], "invalid");
        assert_eq!(v["error"]["message"], "not a device");
        assert!(v["error"].get("setting").is_none(), "{v}");
    }
}
