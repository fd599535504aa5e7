//! Raw Docker Engine API requests for the `docker` host functions, sent over the
//! device's pooled connection exactly as they were decided (method and path), with the
//! run's deadline as a limit and every failure mapped to a WIT error.

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

/// One device's daemon, as the host functions of one call see it.
pub struct Api {
    pub client: Arc<DockerClient>,
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
            let resp = self
                .client
                .send(request)
                .await
                .map_err(|e| connect_error(&e))?;
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
