//! Docker requests for a device another node owns (see [`super::leases`]): the calling
//! node's host function has already passed the plugin's device scope, policy and
//! container scope; it sends the request (method, path, JSON body, time limit, body cap)
//! over NATS to the owner's subject `capstan.docker.INSTANCE` (`capstan.NAME.docker.…`
//! with `[cluster] name`), and the owner performs it over its own pooled connection and
//! answers status, content type and body, or an error kind that becomes the same WIT
//! error a local call would give.
//!
//! The answer comes in frames of at most [`CHUNK`] bytes (NATS refuses messages over its
//! max payload, 1 MiB by default), each numbered ([`SEQ`]), the last marked ([`LAST`]);
//! the caller stops reading at its body cap.
//!
//! `device check` on a node that does not own the device sends the check's requests
//! (`/_ping`, `/version`, `/info`) the same way ([`Cluster::check_through_owner`]).
//!
//! The owner serves what any NATS client that can publish on its subject sends: NATS
//! credentials of the engines are root-equivalent on every device, as for the runs
//! subjects. It refuses a request for a device it does not hold now (fencing), one over
//! [`MAX_REQUEST`] bytes, a method outside GET/POST/PUT/DELETE/HEAD, and bounds the time
//! and the body as a local call does.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{Cluster, ClusterError, nats};
use crate::docker::{CheckFailure, CheckReport, DockerFacts, Steps};
use crate::scheduler::Scheduler;

/// Largest request accepted (method, path and JSON body, encoded).
pub const MAX_REQUEST: usize = 256 * 1024;
/// Largest frame of an answer.
pub const CHUNK: usize = 512 * 1024;
/// Requests an owner serves at once; more wait.
const CONCURRENCY: usize = 64;
/// Largest answer a routed check reads (`/info` of a busy daemon is a few KiB).
const CHECK_MAX_BODY: usize = 1024 * 1024;
/// What a caller waits beyond the request's own time limit for the owner's answer.
pub const GRACE: Duration = Duration::from_secs(3);

/// Frame number, from 0.
pub const SEQ: &str = "Capstan-Seq";
/// On the last frame.
pub const LAST: &str = "Capstan-Last";
const STATUS: &str = "Capstan-Status";
const CONTENT_TYPE: &str = "Capstan-Content-Type";
const TRUNCATED: &str = "Capstan-Truncated";
const ERROR: &str = "Capstan-Error";

/// A Docker request sent to the device's owner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DockerRequest {
    pub device: String,
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    pub timeout_ms: u64,
    pub max_body: u64,
}

/// Why the owner did not answer with the daemon's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The node asked does not hold the device's lease (now).
    NotOwner,
    NotFound,
    /// The daemon's error status with its message (a local call gives `docker`).
    Docker(u16),
    Timeout,
    Unreachable,
    Invalid,
    /// Too large, or not a request.
    Refused,
}

impl ErrorKind {
    fn wire(self) -> String {
        match self {
            ErrorKind::NotOwner => "not-owner".into(),
            ErrorKind::NotFound => "not-found".into(),
            ErrorKind::Docker(s) => format!("docker {s}"),
            ErrorKind::Timeout => "timeout".into(),
            ErrorKind::Unreachable => "unreachable".into(),
            ErrorKind::Invalid => "invalid".into(),
            ErrorKind::Refused => "refused".into(),
        }
    }

    fn parse(text: &str) -> Option<ErrorKind> {
        Some(match text {
            "not-owner" => ErrorKind::NotOwner,
            "not-found" => ErrorKind::NotFound,
            "timeout" => ErrorKind::Timeout,
            "unreachable" => ErrorKind::Unreachable,
            "invalid" => ErrorKind::Invalid,
            "refused" => ErrorKind::Refused,
            other => ErrorKind::Docker(other.strip_prefix("docker ")?.parse().ok()?),
        })
    }
}

/// What the owner answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Answer {
        status: u16,
        content_type: Option<String>,
        body: Bytes,
        truncated: bool,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// The frames of an answer, in order.
pub fn frames(outcome: &Outcome) -> Vec<(HeaderMap, Bytes)> {
    let mut first = HeaderMap::new();
    let chunks: Vec<Bytes> = match outcome {
        Outcome::Answer {
            status,
            content_type,
            body,
            truncated,
        } => {
            first.insert(STATUS, status.to_string().as_str());
            if let Some(ct) = content_type {
                first.insert(CONTENT_TYPE, ct.as_str());
            }
            if *truncated {
                first.insert(TRUNCATED, "1");
            }
            if body.is_empty() {
                vec![Bytes::new()]
            } else {
                body.chunks(CHUNK).map(Bytes::copy_from_slice).collect()
            }
        }
        Outcome::Error { kind, message } => {
            first.insert(ERROR, kind.wire().as_str());
            vec![Bytes::copy_from_slice(message.as_bytes())]
        }
    };
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut h = if i == 0 {
                first.clone()
            } else {
                HeaderMap::new()
            };
            h.insert(SEQ, i.to_string().as_str());
            if i + 1 == n {
                h.insert(LAST, "1");
            }
            (h, chunk)
        })
        .collect()
}

/// An answer put together from its frames.
#[derive(Debug, Default)]
pub struct Assembly {
    next: u64,
    head: Option<Outcome>,
    body: BytesMut,
    max_body: usize,
    cut: bool,
}

impl Assembly {
    pub fn new(max_body: usize) -> Assembly {
        Assembly {
            max_body,
            ..Default::default()
        }
    }

    /// Takes the next frame; the whole answer once the last frame is in.
    pub fn push(
        &mut self,
        headers: Option<&HeaderMap>,
        payload: &[u8],
    ) -> Result<Option<Outcome>, String> {
        let get = |name: &str| {
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        let seq: u64 = get(SEQ)
            .and_then(|s| s.parse().ok())
            .ok_or("a frame without its number")?;
        if seq != self.next {
            return Err(format!("frame {seq} came where {} was due", self.next));
        }
        self.next += 1;
        if seq == 0 {
            self.head = Some(if let Some(kind) = get(ERROR) {
                let kind = ErrorKind::parse(&kind).ok_or(format!("unknown error kind {kind:?}"))?;
                Outcome::Error {
                    kind,
                    message: String::from_utf8_lossy(payload).into_owned(),
                }
            } else {
                let status = get(STATUS)
                    .and_then(|s| s.parse().ok())
                    .ok_or("an answer without a status")?;
                Outcome::Answer {
                    status,
                    content_type: get(CONTENT_TYPE),
                    body: Bytes::new(),
                    truncated: get(TRUNCATED).is_some(),
                }
            });
        }
        if matches!(self.head, Some(Outcome::Answer { .. })) {
            let room = self.max_body.saturating_sub(self.body.len());
            if payload.len() > room {
                self.body.extend_from_slice(&payload[..room]);
                self.cut = true;
            } else {
                self.body.extend_from_slice(payload);
            }
        }
        if get(LAST).is_none() && !self.cut {
            return Ok(None);
        }
        let mut out = self.head.take().ok_or("no first frame")?;
        if let Outcome::Answer {
            body, truncated, ..
        } = &mut out
        {
            *body = std::mem::take(&mut self.body).freeze();
            *truncated |= self.cut;
        }
        Ok(Some(out))
    }
}

/// Why a routed request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("owner node {owner} did not answer within {secs:.1} s")]
    NoAnswer { owner: String, secs: f64 },
    #[error("owner node {owner} does not listen for device requests (stopped or cut off)")]
    NoResponders { owner: String },
    #[error("owner node {owner} sent an unreadable answer: {why}")]
    Garbled { owner: String, why: String },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

impl Cluster {
    /// The subject an owner process listens on for device requests.
    fn docker_subject(&self, instance: &str) -> String {
        match &self.settings.name {
            None => format!("capstan.docker.{instance}"),
            Some(n) => format!("capstan.{n}.docker.{instance}"),
        }
    }

    /// Sends `req` to the owner process `instance` (node `owner`) and reads its answer,
    /// waiting at most `req.timeout_ms` plus [`GRACE`].
    pub async fn route_docker(
        &self,
        owner: &str,
        instance: &str,
        req: &DockerRequest,
    ) -> Result<Outcome, RouteError> {
        let payload = serde_json::to_vec(req)
            .map_err(|e| nats("encoding a device request")(e.to_string()))?;
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| nats("subscribing for a device answer")(e.to_string()))?;
        self.client
            .publish_with_reply(self.docker_subject(instance), inbox, payload.into())
            .await
            .map_err(|e| nats("sending a device request")(e.to_string()))?;
        let wait = Duration::from_millis(req.timeout_ms) + GRACE;
        let mut assembly = Assembly::new(req.max_body as usize);
        let until = tokio::time::Instant::now() + wait;
        loop {
            let msg = match tokio::time::timeout_at(until, sub.next()).await {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => {
                    return Err(RouteError::NoAnswer {
                        owner: owner.to_string(),
                        secs: wait.as_secs_f64(),
                    });
                }
            };
            if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                return Err(RouteError::NoResponders {
                    owner: owner.to_string(),
                });
            }
            match assembly.push(msg.headers.as_ref(), &msg.payload) {
                Ok(Some(out)) => return Ok(out),
                Ok(None) => {}
                Err(why) => {
                    return Err(RouteError::Garbled {
                        owner: owner.to_string(),
                        why,
                    });
                }
            }
        }
    }

    /// Serves device requests sent to this process until `stopped` (see the module docs).
    pub async fn serve_docker(
        self: Arc<Self>,
        scheduler: Arc<Scheduler>,
        stopped: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stopped);
        let subject = self.docker_subject(&self.instance);
        let mut sub = match self.client.subscribe(subject.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(%subject, error = %e, "cluster: cannot listen for device requests; other nodes cannot reach this node's devices");
                return;
            }
        };
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        loop {
            let msg = tokio::select! {
                _ = &mut stopped => break,
                m = sub.next() => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let (this, scheduler) = (self.clone(), scheduler.clone());
            tokio::spawn(async move {
                let outcome = this.perform(&scheduler, &msg.payload).await;
                for (headers, body) in frames(&outcome) {
                    if let Err(e) = this
                        .client
                        .publish_with_headers(reply.clone(), headers, body)
                        .await
                    {
                        tracing::debug!(error = %e, "cluster: cannot send a device answer");
                        break;
                    }
                }
                drop(permit);
            });
        }
        let _ = sub.unsubscribe().await;
    }

    /// One device request from another node: checked, performed here, answered.
    async fn perform(&self, scheduler: &Arc<Scheduler>, payload: &[u8]) -> Outcome {
        let refuse = |kind, message: String| Outcome::Error { kind, message };
        if payload.len() > MAX_REQUEST {
            tracing::warn!(
                bytes = payload.len(),
                "cluster: a device request over the size limit was refused"
            );
            return refuse(
                ErrorKind::Refused,
                format!(
                    "the request is {} bytes, over the {MAX_REQUEST}-byte limit",
                    payload.len()
                ),
            );
        }
        let req: DockerRequest = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => return refuse(ErrorKind::Refused, format!("not a device request: {e}")),
        };
        if !self.holds(&req.device) {
            tracing::info!(device = %short(&req.device), "cluster: a device request for a device this node does not own was refused");
            return refuse(
                ErrorKind::NotOwner,
                format!(
                    "node {} does not own device {} (now)",
                    self.settings.node_name,
                    short(&req.device)
                ),
            );
        }
        crate::plugin::host::docker_api::perform_routed(scheduler.engine(), &req).await
    }
}

impl Cluster {
    /// `device check` on a node that does not own `device`: the owner's connection is
    /// the one that counts, so the check's requests (`GET /_ping`, `/version`, `/info`,
    /// each within `timeout`) go to the owner like a plugin's host calls, and the report
    /// names it ([`CheckReport::owner`]). No owner (or no NATS) is a failed check at
    /// the step `owner`, saying why.
    pub async fn check_through_owner(
        &self,
        device: &crate::device::Device,
        timeout: Duration,
    ) -> CheckReport {
        let start = std::time::Instant::now();
        let steps = Steps::default();
        let mut report = CheckReport::starting(device);
        let failure = |kind: &'static str, message: String| CheckFailure {
            kind: kind.into(),
            message,
            offered_methods: None,
            expected_fingerprint: None,
            presented_fingerprint: None,
        };
        let owner = steps
            .run("owner", async { self.owner_elsewhere(&device.name).await })
            .await;
        let result = match owner {
            Err(e) => Err(("owner", failure(e.kind(), e.to_string()))),
            Ok(lease) => {
                report.owner = Some(lease.owner.clone());
                self.probe_through(&lease, &device.name, timeout, &steps)
                    .await
                    .map_err(|(step, kind, message)| (step, failure(kind, message)))
            }
        };
        match result {
            Ok((facts, latency)) => {
                report.connected = true;
                report.docker = Some(facts);
                report.latency_ms = Some(latency);
            }
            Err((step, e)) => {
                report.failed_step = Some(step.into());
                report.error = Some(e);
            }
        }
        report.steps = steps.done();
        report.total_ms = crate::millis(start.elapsed());
        report
    }

    /// Ping, version and info through the owner: the facts and the ping's round trip,
    /// or the step that failed with a kind and a message.
    async fn probe_through(
        &self,
        lease: &super::leases::Lease,
        device: &str,
        timeout: Duration,
        steps: &Steps,
    ) -> Result<(DockerFacts, f64), (&'static str, &'static str, String)> {
        let ask = |step: &'static str, path: &'static str| async move {
            let req = DockerRequest {
                device: device.to_string(),
                method: "GET".into(),
                path: path.into(),
                body: None,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                max_body: CHECK_MAX_BODY as u64,
            };
            let fail = |kind, why: String| {
                Err((
                    step,
                    kind,
                    format!(
                        "device {device}, through its owner node {}: {why}",
                        lease.owner
                    ),
                ))
            };
            match self.route_docker(&lease.owner, &lease.instance, &req).await {
                Err(e @ RouteError::NoAnswer { .. }) => fail("timeout", e.to_string()),
                Err(e) => fail("unreachable", e.to_string()),
                Ok(Outcome::Error { kind, message }) => {
                    let kind = match kind {
                        ErrorKind::Timeout => "timeout",
                        ErrorKind::NotOwner => "not-owner",
                        ErrorKind::Docker(_) | ErrorKind::NotFound => "daemon",
                        _ => "unreachable",
                    };
                    fail(kind, message)
                }
                Ok(Outcome::Answer { status, body, .. }) if (200..300).contains(&status) => {
                    Ok(body)
                }
                Ok(Outcome::Answer { status, body, .. }) => fail(
                    "daemon",
                    format!(
                        "the daemon answered {path} with {status}: {}",
                        String::from_utf8_lossy(&body).trim()
                    ),
                ),
            }
        };
        let t = std::time::Instant::now();
        steps.run("ping", ask("ping", "/_ping")).await?;
        let latency = crate::millis(t.elapsed());
        let version = steps.run("version", ask("version", "/version")).await?;
        let info = steps.run("info", ask("info", "/info")).await?;
        let json = |step: &'static str, b: &Bytes| {
            serde_json::from_slice::<serde_json::Value>(b).map_err(|e| {
                (
                    step,
                    "daemon",
                    format!("device {device}: the daemon's {step} is not JSON: {e}"),
                )
            })
        };
        let (v, i) = (json("version", &version)?, json("info", &info)?);
        let text = |x: &serde_json::Value| x.as_str().map(str::to_string);
        let api_version = text(&v["ApiVersion"]).unwrap_or_default();
        Ok((
            DockerFacts {
                version: text(&v["Version"]).unwrap_or_default(),
                // The owner's connection speaks with the daemon; it is not known here.
                negotiated_api_version: api_version.clone(),
                api_version,
                min_api_version: text(&v["MinAPIVersion"]),
                os: text(&v["Os"]).unwrap_or_default(),
                arch: text(&v["Arch"]).unwrap_or_default(),
                kernel_version: text(&v["KernelVersion"]),
                operating_system: text(&i["OperatingSystem"]),
                name: text(&i["Name"]),
                containers: i["Containers"].as_i64(),
                containers_running: i["ContainersRunning"].as_i64(),
                images: i["Images"].as_i64(),
            },
            latency,
        ))
    }
}

/// A name from the wire, cut for a log line or an answer.
fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(frames: Vec<(HeaderMap, Bytes)>, max_body: usize) -> Outcome {
        let mut a = Assembly::new(max_body);
        let n = frames.len();
        for (i, (h, b)) in frames.into_iter().enumerate() {
            match a.push(Some(&h), &b).unwrap() {
                Some(out) => {
                    assert!(i + 1 == n || max_body < n * CHUNK, "ended early");
                    return out;
                }
                None => assert!(i + 1 < n, "the last frame ends it"),
            }
        }
        panic!("no outcome");
    }

    #[test]
    fn an_answer_travels_in_frames_and_comes_back_the_same() {
        let body = Bytes::from(vec![7u8; 2 * CHUNK + 10]);
        let out = Outcome::Answer {
            status: 200,
            content_type: Some("application/vnd.docker.multiplexed-stream".into()),
            body: body.clone(),
            truncated: false,
        };
        let f = frames(&out);
        assert_eq!(f.len(), 3);
        assert!(f.iter().all(|(_, b)| b.len() <= CHUNK));
        assert_eq!(assemble(f, usize::MAX), out);
        // Empty bodies and errors are one frame.
        let empty = Outcome::Answer {
            status: 204,
            content_type: None,
            body: Bytes::new(),
            truncated: true,
        };
        assert_eq!(frames(&empty).len(), 1);
        assert_eq!(assemble(frames(&empty), 10), empty);
        for kind in [
            ErrorKind::NotOwner,
            ErrorKind::NotFound,
            ErrorKind::Docker(409),
            ErrorKind::Timeout,
            ErrorKind::Unreachable,
            ErrorKind::Invalid,
            ErrorKind::Refused,
        ] {
            let e = Outcome::Error {
                kind,
                message: "why".into(),
            };
            assert_eq!(assemble(frames(&e), 10), e);
        }
    }

    #[test]
    fn the_caller_stops_at_its_body_cap_and_marks_the_answer_truncated() {
        let out = Outcome::Answer {
            status: 200,
            content_type: None,
            body: Bytes::from(vec![1u8; 3 * CHUNK]),
            truncated: false,
        };
        match assemble(frames(&out), CHUNK + 5) {
            Outcome::Answer {
                body, truncated, ..
            } => {
                assert_eq!(body.len(), CHUNK + 5);
                assert!(truncated);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn frames_out_of_order_or_unnumbered_are_refused() {
        let out = Outcome::Answer {
            status: 200,
            content_type: None,
            body: Bytes::from(vec![1u8; 2 * CHUNK]),
            truncated: false,
        };
        let f = frames(&out);
        let mut a = Assembly::new(usize::MAX);
        assert!(a.push(Some(&f[1].0), &f[1].1).is_err());
        let mut a = Assembly::new(usize::MAX);
        assert!(a.push(None, b"x").is_err());
    }

    #[test]
    fn a_request_travels_as_json() {
        let r = DockerRequest {
            device: "web".into(),
            method: "POST".into(),
            path: "/containers/x/restart".into(),
            body: Some(serde_json::json!({"a": 1})),
            timeout_ms: 1500,
            max_body: 1024,
        };
        let back: DockerRequest = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
