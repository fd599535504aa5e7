//! Webhook triggers: decide whether a delivery is genuine, new and welcome before any
//! plugin runs for it.
//!
//! A hook is reachable by anyone who can reach the engine, so everything here happens on
//! the raw request (`HeaderMap` + `Bytes`, read with the hook's size limit) before the
//! body is parsed or a run exists, in this order:
//!
//! | check | failure | status |
//! |---|---|---|
//! | the hook exists | [`WebhookError::UnknownHook`] | 404 |
//! | body within `max_body` | [`WebhookError::TooLarge`] | 413 |
//! | signature (HMAC-SHA256) or bearer token, against either of the hook's two secrets | `MissingSignature`, `BadSignature`, `MissingToken`, `BadToken` | 401 |
//! | timestamp present, readable, within `replay_window` | `MissingTimestamp`, `BadTimestamp`, `StaleTimestamp`, `FutureTimestamp` | 401 |
//! | delivery id present and sane; body is JSON if required | [`WebhookError::Unprocessable`] | 422 |
//! | delivery id not seen within `delivery_retention` | — ([`Admission::Duplicate`]) | 200 |
//! | signature not accepted before (`replay = "reject"`, the default for HMAC hooks) | — ([`Admission::Duplicate`]) | 200 |
//! | the hook's rate limit | [`WebhookError::RateLimited`] (+ `Retry-After`) | 429 |
//!
//! Decisions where senders' conventions differ:
//! - A stale or future timestamp answers **401**, not 408: it is an authentication
//!   failure (a replay, or a clock to fix), and 408 invites automatic retries of the
//!   same, still-stale request.
//! - A duplicate delivery answers **200** with `{"status":"duplicate","run_id":…}`: the
//!   delivery *was* accepted (the first time), and senders such as GitHub treat any
//!   non-2xx as a failure to retry or flag. A new delivery answers 202 with its run id.
//! - A delivery id is not covered by any sender's signature: anyone holding one
//!   captured request could send it again with fresh ids. So an HMAC hook also
//!   remembers each verified signature (its SHA-256, in sled: [`deliveries`]), and a
//!   delivery whose signature was accepted before is a duplicate whatever its id: until
//!   its signed timestamp leaves `replay_window`, or, when the hook signs no timestamp,
//!   for `delivery_retention`. GitHub's "Redeliver" repeats both id and signature, so it
//!   answers with the first run either way. `replay = "allow"` turns this off for a
//!   sender that signs identical bodies on purpose.
//! - A bearer hook cannot tell a replay from a new delivery: its token is the same on
//!   every request, so whoever holds one captured request can send any body. It relies
//!   on delivery ids against retries, and refuses `replay`.
//! - `?wait=true` answers with a summary of the run (status, times, outcome or error;
//!   [`crate::runs::RunSummary`]), not its logs and host calls: anyone holding one
//!   captured request could otherwise read them. The full record needs the hook's
//!   `wait_response = "full"`, or a valid API token in [`API_TOKEN_HEADER`] (not
//!   `Authorization`, which a bearer hook uses for its own token).
//! - Authentication comes before the rate limit, so forged requests cannot use up a
//!   genuine sender's allowance (and cost one HMAC each, over a body already capped).
//! - A timestamp must be covered by the signature (`{timestamp}` in `signed_payload`),
//!   or it would prove nothing: that is checked when the hook is configured.
//! - Headers handed to the plugin leave out `Authorization`, `Cookie`,
//!   `Proxy-Authorization` and [`API_TOKEN_HEADER`]: plugins never see credentials.
//!
//! Secrets live in the vault under `hook/<name>/current` and `hook/<name>/previous`:
//! rotating moves the current one to `previous`, so deliveries signed with either verify
//! until the old one is retired ([`HookKeys`]).

mod deliveries;
mod kind;
pub mod ratelimit;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use deliveries::{ClaimResult, Deliveries};
pub use kind::Webhook;
pub use ratelimit::TokenBucket;

use super::units;
use crate::runs::RunId;
use crate::secret::Secret;
use crate::store::{Store, StoreError};
use crate::vault::{SecretName, Vault, VaultError};

/// Default signature header (GitHub's).
pub const DEFAULT_SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// Default text before the hex digest in the signature header.
pub const DEFAULT_SIGNATURE_PREFIX: &str = "sha256=";
/// Default largest body.
pub const DEFAULT_MAX_BODY: u64 = 1 << 20;
/// Largest `max_body` a hook may set: bodies are held in memory.
pub const MAX_MAX_BODY: u64 = 64 << 20;
/// Default replay window around the sender's timestamp.
pub const DEFAULT_REPLAY_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Default time a delivery id is remembered.
pub const DEFAULT_DELIVERY_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Longest delivery id accepted.
pub const MAX_DELIVERY_ID_LEN: usize = 200;
/// Vault record kind for hook secrets.
pub const SECRET_KIND: &str = "hook";

/// The header in which a delivery may carry an API token (`cap_…`), to have
/// `?wait=true` answer with the full run record.
pub const API_TOKEN_HEADER: &str = "x-capstan-token";

/// Request headers never passed to a plugin.
const HIDDEN_HEADERS: &[&str] = &[
    "authorization",
    "cookie",
    "proxy-authorization",
    API_TOKEN_HEADER,
];

/// How a hook authenticates deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthKind {
    /// An HMAC-SHA256 of the body (or a template over timestamp and body) in a header.
    HmacSha256,
    /// `Authorization: Bearer <secret>`.
    Bearer,
}

/// What an HMAC hook does with a delivery whose signature it accepted before.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplayPolicy {
    /// Answer it as a duplicate (200 with the first run's id), whatever its delivery id.
    #[default]
    Reject,
    /// Run it again (for a sender that signs identical bodies on purpose).
    Allow,
}

/// What `?wait=true` answers with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WaitResponse {
    /// The run's status, times and outcome or error; the full record only for a
    /// caller that also presents an API token.
    #[default]
    Summary,
    /// The full run record (logs and host calls) for every verified delivery.
    Full,
}

/// A hook as written in a plugin manifest (`[[trigger.webhook]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// The hook's name, in its URL (`/hooks/<name>`): lower-case letters, digits, `-`,
    /// `_`; at most 64 characters.
    pub name: String,
    /// `hmac-sha256` or `bearer`.
    pub auth: AuthKind,
    /// (hmac) Header carrying the signature. Default `X-Hub-Signature-256`.
    #[serde(default)]
    pub signature_header: Option<String>,
    /// (hmac) Text before the hex digest in that header. Default `sha256=`; `""` for
    /// a bare digest.
    #[serde(default)]
    pub signature_prefix: Option<String>,
    /// (hmac) What is signed: a template over `{body}` and `{timestamp}`, e.g.
    /// `v0:{timestamp}:{body}` (Slack). Default `{body}` (GitHub).
    #[serde(default)]
    pub signed_payload: Option<String>,
    /// (hmac) Header carrying the send time, Unix seconds (or milliseconds) or RFC 3339.
    /// It must be signed: `signed_payload` must include `{timestamp}`.
    #[serde(default)]
    pub timestamp_header: Option<String>,
    /// How far the timestamp may be from this host's clock, either way. Default 5m.
    #[serde(default, with = "units::serde_duration::option")]
    pub replay_window: Option<Duration>,
    /// Largest body accepted, e.g. `"1MiB"` or a number of bytes. Default 1 MiB.
    #[serde(default, deserialize_with = "deserialize_opt_size")]
    pub max_body: Option<u64>,
    /// At most `requests` deliveries per `per`, in bursts of up to `burst`.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Header carrying the sender's delivery id (e.g. `X-GitHub-Delivery`). When set,
    /// it is required, and a repeated id does not run the plugin twice.
    #[serde(default)]
    pub delivery_header: Option<String>,
    /// How long an accepted delivery is remembered: its delivery id, and (for an HMAC
    /// hook that signs no timestamp) its signature. Default 24h.
    #[serde(default, with = "units::serde_duration::option")]
    pub delivery_retention: Option<Duration>,
    /// Refuse bodies that are not JSON (422). Default false.
    #[serde(default)]
    pub require_json: bool,
    /// (hmac) A delivery whose signature was accepted before: `"reject"` (default:
    /// answered as a duplicate whatever its delivery id, until its signed timestamp
    /// leaves `replay_window`, or for `delivery_retention` without one) or `"allow"`
    /// (run again).
    #[serde(default)]
    pub replay: Option<ReplayPolicy>,
    /// What `?wait=true` answers with: `"summary"` (default: status, times, outcome or
    /// error; the full record only with an API token in `X-Capstan-Token`) or `"full"`
    /// (the run record with its logs and host calls, to every verified delivery).
    #[serde(default)]
    pub wait_response: Option<WaitResponse>,
}

fn deserialize_opt_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    struct Size(#[serde(deserialize_with = "units::serde_byte_size::deserialize")] u64);
    Ok(Option::<Size>::deserialize(d)?.map(|s| s.0))
}

/// A hook's rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Deliveries allowed per `per`.
    pub requests: u32,
    /// The period, e.g. `"1m"`.
    #[serde(with = "units::serde_duration")]
    pub per: Duration,
    /// Largest burst. Default `requests`.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// One piece of the signed payload.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Timestamp,
    Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    Hmac {
        header: HeaderName,
        prefix: String,
        payload: Vec<Part>,
        timestamp: Option<HeaderName>,
    },
    Bearer,
}

/// A validated hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSpec {
    name: String,
    auth: Auth,
    replay_window: Duration,
    max_body: u64,
    rate_limit: Option<RateLimitConfig>,
    delivery_header: Option<HeaderName>,
    delivery_retention: Duration,
    require_json: bool,
    /// Whether verified signatures are remembered (HMAC hooks with `replay = "reject"`).
    reject_replays: bool,
    wait_response: WaitResponse,
}

/// Configuration and administration errors (install, secrets), not delivery failures.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hook {hook:?}: {field}: {message}")]
    Invalid {
        hook: String,
        field: &'static str,
        message: String,
    },
    #[error("hook {hook:?} is already installed by plugin {plugin:?}")]
    Taken { hook: String, plugin: String },
    #[error("hook {0:?} has no secret in the vault: set one before installing it")]
    NoSecret(String),
    #[error("hook secret: {0}")]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn header_name(hook: &str, field: &'static str, text: &str) -> Result<HeaderName, HookError> {
    HeaderName::try_from(text.trim().to_ascii_lowercase()).map_err(|_| HookError::Invalid {
        hook: hook.to_string(),
        field,
        message: format!("{text:?} is not a valid header name"),
    })
}

fn parse_payload(hook: &str, template: &str) -> Result<Vec<Part>, HookError> {
    let invalid = |message: String| HookError::Invalid {
        hook: hook.to_string(),
        field: "signed_payload",
        message,
    };
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_string()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| invalid(format!("unclosed {{ in {template:?}")))?;
        match &rest[open + 1..open + close] {
            "body" => parts.push(Part::Body),
            "timestamp" => parts.push(Part::Timestamp),
            other => {
                return Err(invalid(format!(
                    "unknown placeholder {{{other}}}; use {{body}} and {{timestamp}}"
                )));
            }
        }
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    if parts.iter().filter(|p| **p == Part::Body).count() != 1 {
        return Err(invalid(format!(
            "{template:?} must contain {{body}} exactly once"
        )));
    }
    Ok(parts)
}

impl HookConfig {
    /// Checks everything that can be checked before a delivery arrives.
    pub fn validate(&self) -> Result<HookSpec, HookError> {
        let name = self.name.as_str();
        let invalid = |field: &'static str, message: String| HookError::Invalid {
            hook: name.to_string(),
            field,
            message,
        };
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(invalid(
                "name",
                "use 1-64 lower-case letters, digits, '-' or '_'".into(),
            ));
        }
        let auth = match self.auth {
            AuthKind::Bearer => {
                for (field, set) in [
                    ("signature_header", self.signature_header.is_some()),
                    ("signature_prefix", self.signature_prefix.is_some()),
                    ("signed_payload", self.signed_payload.is_some()),
                    ("timestamp_header", self.timestamp_header.is_some()),
                ] {
                    if set {
                        return Err(invalid(
                            field,
                            "only applies to auth = \"hmac-sha256\" (a bearer token signs nothing)"
                                .into(),
                        ));
                    }
                }
                if self.replay.is_some() {
                    return Err(invalid(
                        "replay",
                        "only applies to auth = \"hmac-sha256\": a bearer token is the same on every delivery, so whoever captured one can send any body and a replay cannot be told from a new delivery; set delivery_header against retries, or sign deliveries".into(),
                    ));
                }
                Auth::Bearer
            }
            AuthKind::HmacSha256 => {
                let header = header_name(
                    name,
                    "signature_header",
                    self.signature_header
                        .as_deref()
                        .unwrap_or(DEFAULT_SIGNATURE_HEADER),
                )?;
                let payload =
                    parse_payload(name, self.signed_payload.as_deref().unwrap_or("{body}"))?;
                let signs_timestamp = payload.contains(&Part::Timestamp);
                let timestamp = match &self.timestamp_header {
                    Some(h) => {
                        if !signs_timestamp {
                            return Err(invalid(
                                "timestamp_header",
                                "signed_payload must include {timestamp}, or the timestamp is not signed and proves nothing against replays".into(),
                            ));
                        }
                        Some(header_name(name, "timestamp_header", h)?)
                    }
                    None if signs_timestamp => {
                        return Err(invalid(
                            "signed_payload",
                            "uses {timestamp}; set timestamp_header to say where it comes from"
                                .into(),
                        ));
                    }
                    None => None,
                };
                Auth::Hmac {
                    header,
                    prefix: self
                        .signature_prefix
                        .clone()
                        .unwrap_or_else(|| DEFAULT_SIGNATURE_PREFIX.into()),
                    payload,
                    timestamp,
                }
            }
        };
        let has_timestamp = matches!(
            auth,
            Auth::Hmac {
                timestamp: Some(_),
                ..
            }
        );
        if self.replay_window.is_some() && !has_timestamp {
            return Err(invalid(
                "replay_window",
                "needs timestamp_header (there is no time to check)".into(),
            ));
        }
        let replay_window = self.replay_window.unwrap_or(DEFAULT_REPLAY_WINDOW);
        if replay_window.is_zero() {
            return Err(invalid("replay_window", "must be longer than 0s".into()));
        }
        let max_body = self.max_body.unwrap_or(DEFAULT_MAX_BODY);
        if max_body == 0 || max_body > MAX_MAX_BODY {
            return Err(invalid(
                "max_body",
                format!("must be between 1 byte and {} MiB", MAX_MAX_BODY >> 20),
            ));
        }
        if let Some(r) = &self.rate_limit {
            if r.requests == 0 || r.burst == Some(0) {
                return Err(invalid(
                    "rate_limit",
                    "requests and burst must be at least 1".into(),
                ));
            }
            if r.per.is_zero() {
                return Err(invalid("rate_limit", "per must be longer than 0s".into()));
            }
        }
        let delivery_header = self
            .delivery_header
            .as_deref()
            .map(|h| header_name(name, "delivery_header", h))
            .transpose()?;
        let reject_replays = matches!(auth, Auth::Hmac { .. })
            && self.replay.unwrap_or_default() == ReplayPolicy::Reject;
        // Signatures without a signed timestamp are remembered for delivery_retention.
        let retains_signatures = reject_replays && !has_timestamp;
        if self.delivery_retention.is_some() && delivery_header.is_none() && !retains_signatures {
            let message = if reject_replays {
                "needs delivery_header: this hook remembers signatures while their timestamp is within replay_window, and has no ids to remember"
            } else {
                "needs delivery_header (there are no ids to remember)"
            };
            return Err(invalid("delivery_retention", message.into()));
        }
        let delivery_retention = self
            .delivery_retention
            .unwrap_or(DEFAULT_DELIVERY_RETENTION);
        if delivery_retention.is_zero() {
            return Err(invalid(
                "delivery_retention",
                "must be longer than 0s".into(),
            ));
        }
        Ok(HookSpec {
            name: name.to_string(),
            auth,
            replay_window,
            max_body,
            rate_limit: self.rate_limit,
            delivery_header,
            delivery_retention,
            require_json: self.require_json,
            reject_replays,
            wait_response: self.wait_response.unwrap_or_default(),
        })
    }
}

impl HookSpec {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn max_body(&self) -> u64 {
        self.max_body
    }
}

/// Which of a hook's two secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlot {
    Current,
    Previous,
}

impl KeySlot {
    fn field(self) -> &'static str {
        match self {
            KeySlot::Current => "current",
            KeySlot::Previous => "previous",
        }
    }

    pub fn secret_name(self, hook: &str) -> SecretName {
        SecretName::new(SECRET_KIND, hook, self.field())
    }
}

/// A hook's secrets in memory: the current one and, during a rotation, the previous.
#[derive(Debug, Clone)]
pub struct HookKeys {
    pub current: Secret,
    pub previous: Option<Secret>,
}

impl HookKeys {
    /// Reads a hook's secrets from the vault.
    pub fn load(vault: &Vault, hook: &str) -> Result<HookKeys, HookError> {
        let current = vault
            .get(&KeySlot::Current.secret_name(hook))?
            .ok_or_else(|| HookError::NoSecret(hook.to_string()))?;
        let previous = vault.get(&KeySlot::Previous.secret_name(hook))?;
        Ok(HookKeys { current, previous })
    }

    /// Sets a hook's secret, retiring any other.
    pub fn set(vault: &Vault, hook: &str, secret: &Secret) -> Result<(), HookError> {
        if secret.is_empty() {
            return Err(HookError::Invalid {
                hook: hook.to_string(),
                field: "secret",
                message: "must not be empty".into(),
            });
        }
        vault.put(&KeySlot::Current.secret_name(hook), secret)?;
        vault.remove(&KeySlot::Previous.secret_name(hook))?;
        Ok(())
    }

    /// Makes `new` the current secret and keeps the current one as previous, so that
    /// deliveries signed with either verify while senders switch over.
    pub fn rotate(vault: &Vault, hook: &str, new: &Secret) -> Result<(), HookError> {
        let old = vault
            .get(&KeySlot::Current.secret_name(hook))?
            .ok_or_else(|| HookError::NoSecret(hook.to_string()))?;
        if new.is_empty() {
            return Err(HookError::Invalid {
                hook: hook.to_string(),
                field: "secret",
                message: "must not be empty".into(),
            });
        }
        vault.put(&KeySlot::Previous.secret_name(hook), &old)?;
        vault.put(&KeySlot::Current.secret_name(hook), new)?;
        Ok(())
    }

    /// Ends a rotation: only the current secret verifies from now on. Returns whether
    /// there was a previous one.
    pub fn retire_previous(vault: &Vault, hook: &str) -> Result<bool, HookError> {
        let name = KeySlot::Previous.secret_name(hook);
        let had = vault.contains(&name)?;
        vault.remove(&name)?;
        Ok(had)
    }

    /// Removes both secrets (hook uninstalled).
    pub fn remove(vault: &Vault, hook: &str) -> Result<usize, HookError> {
        Ok(vault.remove_record(SECRET_KIND, hook)?)
    }

    fn each(&self) -> impl Iterator<Item = &Secret> {
        std::iter::once(&self.current).chain(self.previous.as_ref())
    }
}

/// Why a delivery was refused. [`WebhookError::status`] is the one place that maps each
/// to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("no webhook named {0:?}")]
    UnknownHook(String),
    #[error("body of {size} bytes is larger than this hook's limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("missing signature header {0}")]
    MissingSignature(String),
    #[error("the signature in {0} does not match the body")]
    BadSignature(String),
    #[error("missing bearer token (Authorization: Bearer …)")]
    MissingToken,
    #[error("the bearer token does not match")]
    BadToken,
    #[error("missing timestamp header {0}")]
    MissingTimestamp(String),
    #[error("timestamp header {0} is neither Unix time nor an RFC 3339 date")]
    BadTimestamp(String),
    #[error(
        "timestamp too old: sent {age} ago, this hook accepts deliveries up to {window} old (a replay, or a delayed delivery)"
    )]
    StaleTimestamp { age: String, window: String },
    #[error(
        "timestamp too new: {ahead} ahead of this host's clock, at most {window} is accepted (check the sender's clock)"
    )]
    FutureTimestamp { ahead: String, window: String },
    #[error("{0}")]
    Unprocessable(String),
    #[error("rate limit reached for this hook; retry in {retry_after_secs}s")]
    RateLimited { retry_after_secs: u64 },
    #[error(
        "the API token in X-Capstan-Token is not valid: send a current one (capstan token create), or leave the header out for a summary answer"
    )]
    BadApiToken,
    #[error("internal error")]
    Internal(String),
}

impl WebhookError {
    pub fn status(&self) -> StatusCode {
        use WebhookError::*;
        match self {
            UnknownHook(_) => StatusCode::NOT_FOUND,
            TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            MissingSignature(_) | BadSignature(_) | MissingToken | BadToken | BadApiToken => {
                StatusCode::UNAUTHORIZED
            }
            MissingTimestamp(_)
            | BadTimestamp(_)
            | StaleTimestamp { .. }
            | FutureTimestamp { .. } => StatusCode::UNAUTHORIZED,
            Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        use WebhookError::*;
        match self {
            UnknownHook(_) => "not-found",
            TooLarge { .. } => "too-large",
            MissingSignature(_) | BadSignature(_) | MissingToken | BadToken | BadApiToken => {
                "unauthorized"
            }
            MissingTimestamp(_) | BadTimestamp(_) => "unauthorized",
            StaleTimestamp { .. } | FutureTimestamp { .. } => "stale",
            Unprocessable(_) => "invalid",
            RateLimited { .. } => "rate-limited",
            Internal(_) => "internal",
        }
    }
}

impl From<StoreError> for WebhookError {
    fn from(e: StoreError) -> Self {
        WebhookError::Internal(e.to_string())
    }
}

impl IntoResponse for WebhookError {
    fn into_response(self) -> Response {
        if let WebhookError::Internal(detail) = &self {
            tracing::error!(%detail, "webhook delivery failed");
        }
        let status = self.status();
        let mut resp = (
            status,
            Json(serde_json::json!({
                "error": { "kind": self.kind(), "message": self.to_string() }
            })),
        )
            .into_response();
        if let WebhookError::RateLimited { retry_after_secs } = self {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        resp
    }
}

/// A verified delivery, as the plugin will see it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub hook: String,
    pub plugin: String,
    /// The sender's delivery id, when the hook names a header for it.
    pub delivery_id: Option<String>,
    /// Request headers (names lower-case), without credentials.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub received_at: DateTime<Utc>,
    /// The verified signature this delivery claimed against replays (hooks with
    /// `replay = "reject"`), for a cluster to claim across its nodes too.
    pub replay_key: Option<ReplayKey>,
}

/// A verified signature remembered against replays: its SHA-256 (hex) and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayKey {
    pub signature: String,
    pub until: DateTime<Utc>,
}

/// What `launch` made of a verified, new delivery ([`receive`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launched {
    /// Its run was started (or, in a cluster, handed over) under this id.
    Started(RunId),
    /// Another node of the cluster accepted the same signature first: a replay, not
    /// run again; the run that first copy started, if known.
    Replayed { run_id: Option<RunId> },
}

impl From<RunId> for Launched {
    fn from(id: RunId) -> Launched {
        Launched::Started(id)
    }
}

/// What to do with a verified delivery.
#[derive(Debug)]
pub enum Admission {
    /// New: start a run, then [`Claim::accept`] its id.
    Run(Claim),
    /// Accepted before, within the hook's retention window: do not run again.
    Duplicate {
        hook: String,
        /// The delivery id this copy carries, when the hook names a header for it.
        delivery: Option<String>,
        /// What it was recognised by.
        matched: Matched,
        /// The run the first copy started (`None` while it is being started).
        run_id: Option<RunId>,
    },
}

/// What identified a duplicate delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Matched {
    /// Its delivery id was accepted before (a retry, or a redelivery).
    DeliveryId,
    /// Its signature was accepted before, under whatever delivery id (a replay).
    Signature,
}

impl Matched {
    pub fn as_str(self) -> &'static str {
        match self {
            Matched::DeliveryId => "delivery-id",
            Matched::Signature => "signature",
        }
    }
}

/// A new delivery whose keys (delivery id, signature) are claimed, each in its tree.
/// Dropping it without [`Claim::accept`] releases them, so a retry of a delivery that
/// could not be run runs.
#[derive(Debug)]
pub struct Claim {
    delivery: Delivery,
    keys: Vec<(Deliveries, String)>,
    accepted: bool,
}

impl Claim {
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// Records the run this delivery started; a later copy is answered with its id.
    pub fn accept(mut self, run_id: RunId) -> Result<(), StoreError> {
        self.accepted = true;
        for (tree, key) in &self.keys {
            tree.accept(&self.delivery.hook, key, run_id)?;
        }
        Ok(())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.accepted {
            return;
        }
        for (tree, key) in &self.keys {
            if let Err(e) = tree.release(&self.delivery.hook, key) {
                tracing::warn!(hook = %self.delivery.hook, error = %e, "could not release a webhook delivery claim");
            }
        }
    }
}

struct Hook {
    spec: HookSpec,
    plugin: String,
    keys: RwLock<HookKeys>,
    bucket: Option<Mutex<TokenBucket>>,
}

/// An installed hook as the API and CLI list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HookInfo {
    pub name: String,
    pub plugin: String,
    pub auth: AuthKind,
    pub max_body: u64,
    /// Whether repeated delivery ids are recognised.
    pub idempotent: bool,
    /// Whether a delivery whose signature was accepted before is a duplicate.
    pub rejects_replays: bool,
    /// What `?wait=true` answers with.
    pub wait_response: WaitResponse,
}

/// Every installed hook, and the delivery ids and signatures they have accepted.
/// Shared by reference (`Arc<Webhooks>`) between the API route and plugin
/// install/remove.
pub struct Webhooks {
    hooks: RwLock<HashMap<String, Arc<Hook>>>,
    deliveries: Deliveries,
    signatures: Deliveries,
}

impl Webhooks {
    pub fn open(store: &Store) -> Result<Webhooks, HookError> {
        Ok(Webhooks {
            hooks: RwLock::new(HashMap::new()),
            deliveries: Deliveries::open(store)?,
            signatures: Deliveries::open_signatures(store)?,
        })
    }

    fn hook(&self, name: &str) -> Option<Arc<Hook>> {
        self.hooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Installs (or, for the same plugin, replaces) a hook with its secrets.
    pub fn install(&self, plugin: &str, spec: HookSpec, keys: HookKeys) -> Result<(), HookError> {
        let mut hooks = self.hooks.write().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = hooks.get(&spec.name)
            && existing.plugin != plugin
        {
            return Err(HookError::Taken {
                hook: spec.name.clone(),
                plugin: existing.plugin.clone(),
            });
        }
        let bucket = spec.rate_limit.map(|r| {
            Mutex::new(TokenBucket::new(
                r.requests,
                r.per,
                r.burst.unwrap_or(r.requests),
                Instant::now(),
            ))
        });
        hooks.insert(
            spec.name.clone(),
            Arc::new(Hook {
                plugin: plugin.to_string(),
                keys: RwLock::new(keys),
                bucket,
                spec,
            }),
        );
        Ok(())
    }

    /// Replaces a hook's secrets in memory (after [`HookKeys::rotate`] and friends).
    pub fn set_keys(&self, name: &str, keys: HookKeys) -> bool {
        match self.hook(name) {
            Some(h) => {
                *h.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
                true
            }
            None => false,
        }
    }

    /// Removes a hook; its remembered delivery ids and signatures go with it.
    pub fn remove(&self, name: &str) -> Result<bool, HookError> {
        let removed = self
            .hooks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .is_some();
        if removed {
            self.deliveries.forget_hook(name)?;
            self.signatures.forget_hook(name)?;
        }
        Ok(removed)
    }

    /// Removes every hook of a plugin. Returns their names.
    pub fn remove_plugin(&self, plugin: &str) -> Result<Vec<String>, HookError> {
        let names: Vec<String> = self
            .hooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|h| h.plugin == plugin)
            .map(|h| h.spec.name.clone())
            .collect();
        for n in &names {
            self.remove(n)?;
        }
        Ok(names)
    }

    /// The plugin a hook belongs to, if it is installed.
    pub fn owner(&self, name: &str) -> Option<String> {
        self.hook(name).map(|h| h.plugin.clone())
    }

    /// Every installed hook (never its secrets), sorted by name.
    pub fn list(&self) -> Vec<HookInfo> {
        let mut v: Vec<HookInfo> = self
            .hooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|h| HookInfo {
                name: h.spec.name.clone(),
                plugin: h.plugin.clone(),
                auth: match h.spec.auth {
                    Auth::Hmac { .. } => AuthKind::HmacSha256,
                    Auth::Bearer => AuthKind::Bearer,
                },
                max_body: h.spec.max_body,
                idempotent: h.spec.delivery_header.is_some(),
                rejects_replays: h.spec.reject_replays,
                wait_response: h.spec.wait_response,
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Installed hook names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<_> = self
            .hooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// The hook's body limit, for reading the body ([`read_body`]).
    pub fn max_body(&self, name: &str) -> Option<u64> {
        self.hook(name).map(|h| h.spec.max_body)
    }

    /// What the hook's `?wait=true` answers with (`None` for an unknown hook).
    pub fn wait_response(&self, name: &str) -> Option<WaitResponse> {
        self.hook(name).map(|h| h.spec.wait_response)
    }

    /// Forgets delivery ids and signatures past their retention. Call periodically.
    pub fn purge_expired(&self) -> Result<usize, HookError> {
        let now = Utc::now();
        Ok(self.deliveries.purge_expired(now)? + self.signatures.purge_expired(now)?)
    }

    /// Verifies a delivery: see the module docs for the checks and their order.
    pub fn verify(
        &self,
        name: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Admission, WebhookError> {
        self.verify_at(name, headers, body, Utc::now(), Instant::now())
    }

    /// [`Webhooks::verify`] at a given time (tests).
    pub fn verify_at(
        &self,
        name: &str,
        headers: &HeaderMap,
        body: Bytes,
        now: DateTime<Utc>,
        instant: Instant,
    ) -> Result<Admission, WebhookError> {
        let hook = self
            .hook(name)
            .ok_or_else(|| WebhookError::UnknownHook(name.to_string()))?;
        let spec = &hook.spec;

        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let size = declared.max(body.len() as u64);
        if size > spec.max_body {
            return Err(WebhookError::TooLarge {
                size,
                limit: spec.max_body,
            });
        }

        let verified = {
            let keys = hook.keys.read().unwrap_or_else(|e| e.into_inner());
            authenticate(spec, &keys, headers, &body, now)?
        };

        let delivery_id = match &spec.delivery_header {
            Some(h) => Some(delivery_id(h, headers)?),
            None => None,
        };
        if spec.require_json && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
            return Err(WebhookError::Unprocessable(
                "this hook accepts JSON bodies only, and the body is not valid JSON".into(),
            ));
        }

        let retained = now
            + chrono::Duration::from_std(spec.delivery_retention).unwrap_or(chrono::Duration::MAX);
        let duplicate = |matched, run_id| Admission::Duplicate {
            hook: spec.name.clone(),
            delivery: delivery_id.clone(),
            matched,
            run_id,
        };
        let mut keys = Vec::new();
        if let Some(id) = &delivery_id {
            if let ClaimResult::Duplicate { run_id } =
                self.deliveries.claim(&spec.name, id, now, retained)?
            {
                return Ok(duplicate(Matched::DeliveryId, run_id));
            }
            keys.push((self.deliveries.clone(), id.clone()));
        }
        let replay_key = match (&verified, spec.reject_replays) {
            (Verified::Signature { digest, signed_at }, true) => Some((
                hex::encode(digest),
                // A signed timestamp is refused as stale once it leaves the window, so
                // it need not be remembered longer (a second more, for rounding).
                match signed_at {
                    Some(at) => {
                        *at + chrono::Duration::from_std(spec.replay_window)
                            .unwrap_or(chrono::Duration::MAX)
                            + chrono::Duration::seconds(1)
                    }
                    None => retained,
                },
            )),
            _ => None,
        };
        // From here on the claims are held: dropping this (on a replay or the 429 below)
        // releases them.
        let mut claim = Claim {
            delivery: Delivery {
                hook: spec.name.clone(),
                plugin: hook.plugin.clone(),
                delivery_id: delivery_id.clone(),
                headers: visible_headers(headers),
                body,
                received_at: now,
                replay_key: None,
            },
            keys,
            accepted: false,
        };
        if let Some((key, expires)) = replay_key {
            if let ClaimResult::Duplicate { run_id } =
                self.signatures.claim(&spec.name, &key, now, expires)?
            {
                return Ok(duplicate(Matched::Signature, run_id));
            }
            claim.delivery.replay_key = Some(ReplayKey {
                signature: key.clone(),
                until: expires,
            });
            claim.keys.push((self.signatures.clone(), key));
        }

        if let Some(bucket) = &hook.bucket {
            let taken = bucket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_take(instant);
            if let Err(wait) = taken {
                return Err(WebhookError::RateLimited {
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
        }
        Ok(Admission::Run(claim))
    }
}

/// What authentication established about a delivery.
enum Verified {
    /// A bearer token: the same on every delivery, so nothing tells one from another.
    Token,
    /// A valid signature: its SHA-256 (whatever the header's hex case or spacing), and
    /// the signed timestamp when the template signs one.
    Signature {
        digest: [u8; 32],
        signed_at: Option<DateTime<Utc>>,
    },
}

fn authenticate(
    spec: &HookSpec,
    keys: &HookKeys,
    headers: &HeaderMap,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<Verified, WebhookError> {
    match &spec.auth {
        Auth::Bearer => {
            let presented = headers
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    let scheme = v.get(..7)?;
                    scheme
                        .eq_ignore_ascii_case("bearer ")
                        .then(|| v[7..].trim())
                })
                .filter(|t| !t.is_empty())
                .ok_or(WebhookError::MissingToken)?;
            // Check against every key, without stopping at the first match.
            let matched = keys.each().fold(false, |any, k| {
                any | digests_equal(presented.as_bytes(), k.expose())
            });
            if matched {
                Ok(Verified::Token)
            } else {
                Err(WebhookError::BadToken)
            }
        }
        Auth::Hmac {
            header,
            prefix,
            payload,
            timestamp,
        } => {
            let raw = headers
                .get(header)
                .ok_or_else(|| WebhookError::MissingSignature(header.to_string()))?;
            let bad = || WebhookError::BadSignature(header.to_string());
            let signature = raw
                .to_str()
                .ok()
                .and_then(|v| v.trim().strip_prefix(prefix.as_str()))
                .and_then(|hex_digest| hex::decode(hex_digest).ok())
                .ok_or_else(bad)?;
            let stamp = match timestamp {
                Some(h) => {
                    let value = headers
                        .get(h)
                        .ok_or_else(|| WebhookError::MissingTimestamp(h.to_string()))?
                        .to_str()
                        .map_err(|_| WebhookError::BadTimestamp(h.to_string()))?
                        .trim()
                        .to_string();
                    let at = parse_timestamp(&value)
                        .ok_or_else(|| WebhookError::BadTimestamp(h.to_string()))?;
                    Some((value, at))
                }
                None => None,
            };
            let stamp_text = stamp.as_ref().map(|(v, _)| v.as_str()).unwrap_or("");
            let matched = keys.each().fold(false, |any, k| {
                any | hmac_matches(k.expose(), payload, stamp_text, body, &signature)
            });
            if !matched {
                return Err(bad());
            }
            let signed_at = stamp.map(|(_, at)| at);
            if let Some(at) = signed_at {
                check_window(at, now, spec.replay_window)?;
            }
            Ok(Verified::Signature {
                digest: Sha256::digest(&signature).into(),
                signed_at,
            })
        }
    }
}

fn hmac_matches(key: &[u8], payload: &[Part], stamp: &str, body: &[u8], signature: &[u8]) -> bool {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in payload {
        match part {
            Part::Text(t) => mac.update(t.as_bytes()),
            Part::Timestamp => mac.update(stamp.as_bytes()),
            Part::Body => mac.update(body),
        }
    }
    // Constant-time comparison.
    mac.verify_slice(signature).is_ok()
}

/// Compares two secrets in constant time (over their SHA-256 digests, so the length of
/// neither leaks).
fn digests_equal(a: &[u8], b: &[u8]) -> bool {
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    let diff = x
        .iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q));
    std::hint::black_box(diff) == 0
}

/// Unix seconds, Unix milliseconds (13 digits or more), or RFC 3339.
fn parse_timestamp(value: &str) -> Option<DateTime<Utc>> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        let n: i64 = value.parse().ok()?;
        return if value.len() >= 13 {
            DateTime::from_timestamp_millis(n)
        } else {
            DateTime::from_timestamp(n, 0)
        };
    }
    DateTime::parse_from_rfc3339(value)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn check_window(
    at: DateTime<Utc>,
    now: DateTime<Utc>,
    window: Duration,
) -> Result<(), WebhookError> {
    let window_c = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    // Whole seconds: the sender's clock is not known more precisely than that.
    let fmt = |d: chrono::Duration| {
        units::format_duration(Duration::from_secs(d.num_seconds().unsigned_abs()))
    };
    let age = now - at;
    if age > window_c {
        return Err(WebhookError::StaleTimestamp {
            age: fmt(age),
            window: units::format_duration(window),
        });
    }
    if -age > window_c {
        return Err(WebhookError::FutureTimestamp {
            ahead: fmt(-age),
            window: units::format_duration(window),
        });
    }
    Ok(())
}

fn delivery_id(header: &HeaderName, headers: &HeaderMap) -> Result<String, WebhookError> {
    let value = headers.get(header).ok_or_else(|| {
        WebhookError::Unprocessable(format!(
            "missing delivery id header {header}, which this hook requires"
        ))
    })?;
    let id = value.to_str().map(str::trim).unwrap_or("");
    let sane = !id.is_empty()
        && id.len() <= MAX_DELIVERY_ID_LEN
        && id.bytes().all(|b| b.is_ascii_graphic());
    if !sane {
        return Err(WebhookError::Unprocessable(format!(
            "delivery id in {header} must be 1-{MAX_DELIVERY_ID_LEN} printable ASCII characters"
        )));
    }
    Ok(id.to_string())
}

fn visible_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| !HIDDEN_HEADERS.contains(&name.as_str()))
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// Reads a request body, refusing it with 413 past `limit` bytes without reading more.
pub async fn read_body(body: axum::body::Body, limit: u64) -> Result<Bytes, WebhookError> {
    use http_body_util::{BodyExt, Limited};
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit_usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(WebhookError::TooLarge {
            size: limit + 1,
            limit,
        }),
        Err(e) => Err(WebhookError::Unprocessable(format!(
            "the request body could not be read: {e}"
        ))),
    }
}

/// What became of one delivery, typed: the hook route builds its one response from it
/// ([`Answer::into_response`]) and labels the delivery metric with it ([`Answer::result`]).
#[derive(Debug)]
pub enum Answer {
    /// Verified and new: its run was started (202 `{"status":"accepted","run_id"}`).
    Accepted { run_id: RunId },
    /// Accepted before, by delivery id or by signature: not run again (200
    /// `{"status":"duplicate","delivery","matched","run_id"}` with the first run's id).
    Replayed {
        delivery: Option<String>,
        matched: Matched,
        run_id: Option<RunId>,
    },
    /// Refused, and why (the error's status and JSON body).
    Rejected(WebhookError),
    /// Verified and new, but its run could not be started (503); the delivery id and
    /// signature were released so the sender's retry can run.
    Unavailable,
}

impl Answer {
    /// The status this answer is given with.
    pub fn status(&self) -> StatusCode {
        match self {
            Answer::Accepted { .. } => StatusCode::ACCEPTED,
            Answer::Replayed { .. } => StatusCode::OK,
            Answer::Rejected(e) => e.status(),
            Answer::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `result` label of the delivery metric: `accepted`, `duplicate`,
    /// `unauthorized`, `unknown-hook`, `too-large`, `invalid`, `rate-limited`,
    /// `unavailable`, or `error`.
    pub fn result(&self) -> &'static str {
        use WebhookError::*;
        match self {
            Answer::Accepted { .. } => "accepted",
            Answer::Replayed { .. } => "duplicate",
            Answer::Unavailable => "unavailable",
            Answer::Rejected(e) => match e {
                UnknownHook(_) => "unknown-hook",
                TooLarge { .. } => "too-large",
                MissingSignature(_)
                | BadSignature(_)
                | MissingToken
                | BadToken
                | BadApiToken
                | MissingTimestamp(_)
                | BadTimestamp(_)
                | StaleTimestamp { .. }
                | FutureTimestamp { .. } => "unauthorized",
                Unprocessable(_) => "invalid",
                RateLimited { .. } => "rate-limited",
                Internal(_) => "error",
            },
        }
    }

    /// Whether the delivery named a hook that is installed (the metric keeps the name
    /// only then, so strangers cannot create series at will).
    pub fn names_a_hook(&self) -> bool {
        !matches!(self, Answer::Rejected(WebhookError::UnknownHook(_)))
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let status = self.status();
        match self {
            Answer::Accepted { run_id } => {
                // The answer to every accepted delivery: a struct, not a JSON map built
                // per request.
                #[derive(serde::Serialize)]
                struct Accepted {
                    status: &'static str,
                    run_id: RunId,
                }
                let body = Accepted {
                    status: "accepted",
                    run_id,
                };
                (status, Json(body)).into_response()
            }
            Answer::Replayed {
                delivery,
                matched,
                run_id,
            } => (
                status,
                Json(serde_json::json!({
                    "status": "duplicate",
                    "delivery": delivery,
                    "matched": matched,
                    "run_id": run_id.map(|r| r.to_string()),
                })),
            )
                .into_response(),
            Answer::Rejected(e) => e.into_response(),
            Answer::Unavailable => (
                status,
                Json(serde_json::json!({
                    "error": { "kind": "unavailable", "message": "the run could not be started; retry later" }
                })),
            )
                .into_response(),
        }
    }
}

/// Verifies a delivery whose body was read, and starts its run when it is new.
///
/// `launch` starts the plugin run for a verified, new delivery and returns its run id
/// (the run goes on after the answer); when it fails, the delivery id and signature are
/// released so the sender's retry can run ([`Answer::Unavailable`]).
pub async fn receive<F, Fut, L>(
    hooks: &Webhooks,
    name: &str,
    headers: &HeaderMap,
    body: Bytes,
    launch: F,
) -> Answer
where
    F: FnOnce(Delivery) -> Fut,
    Fut: Future<Output = Result<L, String>>,
    L: Into<Launched>,
{
    match hooks.verify(name, headers, body) {
        Err(e) => {
            if e.status() != StatusCode::NOT_FOUND {
                tracing::info!(hook = name, status = e.status().as_u16(), reason = %e, "webhook delivery refused");
            }
            Answer::Rejected(e)
        }
        Ok(Admission::Duplicate {
            delivery,
            matched,
            run_id,
            ..
        }) => {
            tracing::info!(
                hook = name,
                delivery = delivery.as_deref().unwrap_or("-"),
                matched = matched.as_str(),
                "repeated webhook delivery not run again"
            );
            Answer::Replayed {
                delivery,
                matched,
                run_id,
            }
        }
        Ok(Admission::Run(claim)) => match launch(claim.delivery().clone()).await.map(Into::into) {
            Ok(Launched::Started(run_id)) => {
                if let Err(e) = claim.accept(run_id) {
                    tracing::warn!(hook = name, error = %e, "could not record the delivery id; a retry may run again");
                }
                Answer::Accepted { run_id }
            }
            Ok(Launched::Replayed { run_id }) => {
                let delivery = claim.delivery().delivery_id.clone();
                tracing::info!(
                    hook = name,
                    delivery = delivery.as_deref().unwrap_or("-"),
                    matched = Matched::Signature.as_str(),
                    "repeated webhook delivery (accepted by another node of the cluster) not run again"
                );
                // Remembered here too, so the next copy is answered without asking.
                match run_id {
                    Some(id) => {
                        if let Err(e) = claim.accept(id) {
                            tracing::warn!(hook = name, error = %e, "could not record the replayed delivery");
                        }
                    }
                    None => drop(claim),
                }
                Answer::Replayed {
                    delivery,
                    matched: Matched::Signature,
                    run_id,
                }
            }
            Err(detail) => {
                tracing::error!(hook = name, %detail, "webhook run could not be started");
                drop(claim);
                Answer::Unavailable
            }
        },
    }
}

/// One delivery from the request as axum hands it over: reads the body within the
/// hook's limit (404 for an unknown hook, 413 past the limit), then [`receive`].
pub async fn deliver<F, Fut, L>(
    hooks: &Webhooks,
    name: &str,
    headers: &HeaderMap,
    body: axum::body::Body,
    launch: F,
) -> Answer
where
    F: FnOnce(Delivery) -> Fut,
    Fut: Future<Output = Result<L, String>>,
    L: Into<Launched>,
{
    let Some(limit) = hooks.max_body(name) else {
        return Answer::Rejected(WebhookError::UnknownHook(name.to_string()));
    };
    match read_body(body, limit).await {
        Ok(body) => receive(hooks, name, headers, body, launch).await,
        Err(e) => Answer::Rejected(e),
    }
}

#[cfg(test)]
mod tests;
