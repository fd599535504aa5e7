//! Raw Docker Engine API requests for the `docker` host functions, sent over the
//! device's pooled connection exactly as they were decided (method and path), with the
//! run's deadline as a limit and every failure mapped to a WIT error.
//!
//! In cluster mode a device another node owns is reached through that node
//! ([`Target::Owner`], [`crate::cluster::route`]): the same request, decided here, is
//! performed there ([`perform_routed`]) and its answer or error comes back as the same
//! [`Answer`] or WIT error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::header::{CONTENT_TYPE, HeaderMap};
use hyper::{Request, StatusCode};
use serde_json::Value;

use super::HostError;
use crate::docker::{ConnectError, DockerClient, empty_body, full_body};

/// A Docker request as decided by the policy: method and origin-form path.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: &'static str,
    pub path: String,
}

impl Req {
    pub fn get(path: impl Into<String>) -> Req {
        Req {
            method: "GET",
            path: path.into(),
        }
    }
    pub fn post(path: impl Into<String>) -> Req {
        Req {
            method: "POST",
            path: path.into(),
        }
    }
    pub fn delete(path: impl Into<String>) -> Req {
        Req {
            method: "DELETE",
            path: path.into(),
        }
    }
}

impl std::fmt::Display for Req {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

/// How long a single Docker request may take at most (the run's deadline may cut it
/// shorter).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest response body read into memory (lists, inspect output).
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Largest log or exec output returned to a plugin, per stream.
pub const MAX_OUTPUT: usize = 1024 * 1024;

/// Where a device's requests go.
pub enum Target {
    /// This node's pooled connection (a single engine, or the device's owner node).
    Local(Arc<DockerClient>),
    /// The owner node, over NATS (cluster mode).
    Owner {
        cluster: Arc<crate::cluster::Cluster>,
        /// The owner's node name and process.
        owner: String,
        instance: String,
    },
}

/// One device's daemon, as the host functions of one call see it.
pub struct Api {
    pub target: Target,
    pub device: String,
    pub deadline: Instant,
}

/// A response read into memory.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Whether the body was cut at the cap.
    pub truncated: bool,
}

impl Answer {
    /// The daemon's `{"message": …}`, or the body as text.
    pub fn message(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_string())
    }

    /// 2xx (and 304, "already in that state") pass; 404 is `not-found`; anything else
    /// is `docker(status, message)`.
    pub fn check(self) -> Result<Answer, HostError> {
        if self.status.is_success() || self.status == StatusCode::NOT_MODIFIED {
            Ok(self)
        } else if self.status == StatusCode::NOT_FOUND {
            Err(HostError::not_found(self.message()))
        } else {
            Err(HostError::docker(self.status.as_u16(), self.message()))
        }
    }

    pub fn json(&self) -> Result<Value, HostError> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| HostError::trap(format!("the Docker daemon sent unreadable JSON: {e}")))
    }
}

/// Maps a connection failure to the WIT error a plugin can act on.
pub fn connect_error(e: &ConnectError) -> HostError {
    match e.root() {
        ConnectError::Daemon {
            status: 404,
            message,
            ..
        } => HostError::not_found(message.clone()),
        ConnectError::Daemon {
            status, message, ..
        } => HostError::docker(*status, message.clone()),
        _ if e.is_timeout() => HostError::timeout(e.to_string()),
        _ => HostError::unreachable(e.to_string()),
    }
}

impl Api {
    /// The local connection, when the device's requests are sent from here.
    pub fn local(&self) -> Option<&Arc<DockerClient>> {
        match &self.target {
            Target::Local(c) => Some(c),
            Target::Owner { .. } => None,
        }
    }

    /// Time left for one request: the smaller of `cap` and the run's deadline.
    fn budget(&self, cap: Duration) -> Result<Duration, HostError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HostError::timeout("the run's deadline has passed"));
        }
        Ok(left.min(cap))
    }

    /// Sends one request and reads the answer (at most `max_body` bytes) within `cap`.
    pub async fn send(
        &self,
        req: &Req,
        body: Option<&Value>,
        cap: Duration,
        max_body: usize,
    ) -> Result<Answer, HostError> {
        let budget = self.budget(cap)?;
        let client = match &self.target {
            Target::Local(c) => c,
            Target::Owner {
                cluster,
                owner,
                instance,
            } => {
                return self
                    .send_to_owner(cluster, owner, instance, req, body, budget, max_body)
                    .await;
            }
        };
        let mut builder = Request::builder().method(req.method).uri(&req.path);
        let body = match body {
            Some(v) => {
                builder = builder.header(CONTENT_TYPE, "application/json");
                full_body(serde_json::to_vec(v).expect("JSON values serialise"))
            }
            None => empty_body(),
        };
        let request = builder
            .body(body)
            .map_err(|e| HostError::trap(format!("cannot build the request {req}: {e}")))?;
        let device = self.device.clone();
        let work = async {
            let resp = client.send(request).await.map_err(|e| connect_error(&e))?;
            let (parts, mut incoming) = resp.into_parts();
            let mut buf = BytesMut::new();
            let mut truncated = false;
            while let Some(frame) = incoming.frame().await {
                let frame = frame.map_err(|e| {
                    HostError::unreachable(format!(
                        "device {device}: reading the answer to {req} failed: {e}"
                    ))
                })?;
                if let Ok(data) = frame.into_data() {
                    let room = max_body.saturating_sub(buf.len());
                    if data.len() > room {
                        buf.extend_from_slice(&data[..room]);
                        truncated = true;
                        break;
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body: buf.freeze(),
                truncated,
            })
        };
        match tokio::time::timeout(budget, work).await {
            Ok(r) => r,
            Err(_) => Err(HostError::timeout(format!(
                "device {}: {req} did not answer within {:.1} s",
                self.device,
                budget.as_secs_f64()
            ))),
        }
    }

    /// [`Api::send`] through the owner node.
    #[allow(clippy::too_many_arguments)]
    async fn send_to_owner(
        &self,
        cluster: &crate::cluster::Cluster,
        owner: &str,
        instance: &str,
        req: &Req,
        body: Option<&Value>,
        budget: Duration,
        max_body: usize,
    ) -> Result<Answer, HostError> {
        use crate::cluster::route::{DockerRequest, ErrorKind, Outcome};
        let request = DockerRequest {
            device: self.device.clone(),
            method: req.method.to_string(),
            path: req.path.clone(),
            body: body.cloned(),
            timeout_ms: u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
            max_body: max_body as u64,
        };
        let device = &self.device;
        match cluster.route_docker(owner, instance, &request).await {
            Ok(Outcome::Answer {
                status,
                content_type,
                body,
                truncated,
            }) => {
                let mut headers = HeaderMap::new();
                if let Some(ct) = content_type.and_then(|c| c.parse().ok()) {
                    headers.insert(CONTENT_TYPE, ct);
                }
                Ok(Answer {
                    status: StatusCode::from_u16(status).map_err(|_| {
                        HostError::unreachable(format!(
                            "device {device}: owner node {owner} sent status {status}"
                        ))
                    })?,
                    headers,
                    body,
                    truncated,
                })
            }
            Ok(Outcome::Error { kind, message }) => Err(match kind {
                ErrorKind::NotOwner => HostError::unreachable(format!(
                    "device {device}: node {owner} does not own it any more ({message}); try again once its lease has moved"
                )),
                ErrorKind::NotFound => HostError::not_found(message),
                ErrorKind::Docker(status) => HostError::docker(status, message),
                ErrorKind::Timeout => HostError::timeout(message),
                ErrorKind::Unreachable => HostError::unreachable(message),
                ErrorKind::Invalid => HostError::invalid(message),
                ErrorKind::Refused => HostError::invalid(format!(
                    "device {device}: owner node {owner} refused the request: {message}"
                )),
            }),
            Err(e) => Err(HostError::unreachable(format!("device {device}: {e}"))),
        }
    }

    /// Sends a request and returns its JSON answer, mapping errors (see [`Answer::check`]).
    pub async fn json(&self, req: &Req, body: Option<&Value>) -> Result<Value, HostError> {
        self.send(req, body, REQUEST_TIMEOUT, MAX_BODY)
            .await?
            .check()?
            .json()
    }

    /// Sends a request whose answer carries nothing needed.
    pub async fn call(&self, req: &Req, body: Option<&Value>) -> Result<(), HostError> {
        self.send(req, body, REQUEST_TIMEOUT, MAX_BODY)
            .await?
            .check()?;
        Ok(())
    }
}

/// A request routed here by another node (which decided it): performed over this
/// node's connection to the device, bounded by [`REQUEST_TIMEOUT`] and [`MAX_BODY`] as
/// well as the caller's own limits, the result as it goes back.
pub async fn perform_routed(
    engine: &crate::engine::Engine,
    r: &crate::cluster::route::DockerRequest,
) -> crate::cluster::route::Outcome {
    use crate::cluster::route::{ErrorKind, Outcome};
    let error = |kind, message: String| Outcome::Error { kind, message };
    let method: &'static str = match r.method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        _ => return error(ErrorKind::Refused, "method not allowed".into()),
    };
    if !r.path.starts_with('/') || r.path.len() > 8192 {
        return error(ErrorKind::Refused, "not an origin-form path".into());
    }
    let dev = match engine.devices().and_then(|d| d.get(&r.device)) {
        Ok(d) => d,
        Err(e) => return error(ErrorKind::NotFound, e.to_string()),
    };
    let client = match engine.docker_client(&dev) {
        Ok(c) => c,
        Err(e) => return outcome_of(connect_error(&e)),
    };
    let cap = Duration::from_millis(r.timeout_ms).min(REQUEST_TIMEOUT);
    let api = Api {
        target: Target::Local(client),
        device: dev.name,
        deadline: Instant::now() + cap,
    };
    let max_body = usize::try_from(r.max_body)
        .unwrap_or(MAX_BODY)
        .min(MAX_BODY);
    let req = Req {
        method,
        path: r.path.clone(),
    };
    match api.send(&req, r.body.as_ref(), cap, max_body).await {
        Ok(a) => Outcome::Answer {
            status: a.status.as_u16(),
            content_type: a
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: a.body,
            truncated: a.truncated,
        },
        Err(e) => outcome_of(e),
    }
}

/// A failed routed request as it goes back to the calling node.
fn outcome_of(e: HostError) -> crate::cluster::route::Outcome {
    use crate::cluster::route::{ErrorKind, Outcome};
    use crate::plugin::bindings::WitError;
    let (kind, message) = match e {
        HostError::Wit(WitError::NotFound(m)) => (ErrorKind::NotFound, m),
        HostError::Wit(WitError::Docker(d)) => (ErrorKind::Docker(d.status), d.message),
        HostError::Wit(WitError::Timeout(m)) => (ErrorKind::Timeout, m),
        HostError::Wit(WitError::Invalid(m)) => (ErrorKind::Invalid, m),
        HostError::Wit(WitError::Unreachable(m)) => (ErrorKind::Unreachable, m),
        HostError::Wit(other) => (ErrorKind::Unreachable, super::render_wit_error(&other)),
        HostError::Trap(t) => (ErrorKind::Invalid, t.to_string()),
    };
    Outcome::Error { kind, message }
}

/// Splits Docker's multiplexed stream (8-byte frame headers: stream, 0, 0, 0, size) into
/// stdout and stderr. A body that is not framed (a TTY container) is all stdout.
pub fn demux(body: &[u8], multiplexed: bool) -> (Vec<u8>, Vec<u8>) {
    if !multiplexed || !looks_multiplexed(body) {
        return (body.to_vec(), Vec::new());
    }
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut rest = body;
    while rest.len() >= 8 {
        let size = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let end = (8 + size).min(rest.len());
        let payload = &rest[8..end];
        match rest[0] {
            2 => err.extend_from_slice(payload),
            _ => out.extend_from_slice(payload),
        }
        rest = &rest[end..];
    }
    (out, err)
}

fn looks_multiplexed(body: &[u8]) -> bool {
    body.is_empty() || (body.len() >= 8 && body[0] <= 2 && body[1..4] == [0, 0, 0])
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn encode_query(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// A container ID or name as a path segment: Docker's name rule, one leading `/`
/// ignored.
pub fn container_ref(text: &str) -> Result<String, HostError> {
    let name = text.strip_prefix('/').unwrap_or(text);
    let ok = !name.is_empty()
        && name.len() <= 255
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(HostError::invalid(format!(
            "`{text}` is not a container ID or name (letters, digits, `_`, `.`, `-`)"
        )))
    }
}

/// An image reference as it may stand in a path (`registry:5000/team/app:1.2`,
/// `app@sha256:…`).
pub fn image_ref(text: &str) -> Result<String, HostError> {
    let ok = !text.is_empty()
        && text.len() <= 512
        && !text.starts_with('/')
        && !text.ends_with('/')
        && !text.contains("//")
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':' | '@' | '/'));
    if ok {
        Ok(text.to_string())
    } else {
        Err(HostError::invalid(format!(
            "`{text}` is not an image reference"
        )))
    }
}

/// Splits an image reference into `fromImage` and `tag` for a pull (`latest` when no
/// tag or digest is given).
pub fn split_reference(reference: &str) -> (String, String) {
    if let Some((name, digest)) = reference.split_once('@') {
        return (name.to_string(), digest.to_string());
    }
    let last = reference.rsplit('/').next().unwrap_or(reference);
    match last.rsplit_once(':') {
        Some((_, tag)) => {
            let name = &reference[..reference.len() - tag.len() - 1];
            (name.to_string(), tag.to_string())
        }
        None => (reference.to_string(), "latest".to_string()),
    }
}

/// Docker's labels object as pairs.
pub fn labels_of(v: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = v
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

pub fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_references_into_name_and_tag() {
        assert_eq!(split_reference("nginx"), ("nginx".into(), "latest".into()));
        assert_eq!(
            split_reference("nginx:1.27"),
            ("nginx".into(), "1.27".into())
        );
        assert_eq!(
            split_reference("registry:5000/team/app"),
            ("registry:5000/team/app".into(), "latest".into())
        );
        assert_eq!(
            split_reference("registry:5000/team/app:2"),
            ("registry:5000/team/app".into(), "2".into())
        );
        assert_eq!(
            split_reference("app@sha256:abc"),
            ("app".into(), "sha256:abc".into())
        );
    }

    #[test]
    fn demultiplexes_docker_streams() {
        let mut body = vec![1, 0, 0, 0, 0, 0, 0, 3];
        body.extend_from_slice(b"out");
        body.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 3]);
        body.extend_from_slice(b"err");
        assert_eq!(demux(&body, true), (b"out".to_vec(), b"err".to_vec()));
        assert_eq!(demux(b"plain text", true), (b"plain text".to_vec(), vec![]));
    }

    #[test]
    fn validates_container_and_image_references() {
        assert_eq!(container_ref("/web-1").unwrap(), "web-1");
        assert!(container_ref("../images").is_err());
        assert!(container_ref("a/b").is_err());
        assert!(container_ref("").is_err());
        assert!(image_ref("registry:5000/team/app:1.2").is_ok());
        assert!(image_ref("a//b").is_err());
        assert!(image_ref("a b").is_err());
        assert_eq!(
            encode_query("{\"a\":[\"b=c\"]}"),
            "%7B%22a%22%3A%5B%22b%3Dc%22%5D%7D"
        );
    }
}
