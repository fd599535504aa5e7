//! Proxy mode: Capstan serves the Docker Engine API for one device, behind a policy.
//!
//! Other tools (the docker CLI, Portainer, Dockman, Watchtower, CI jobs) point
//! `DOCKER_HOST` at a Capstan proxy and reach a local, SSH or TLS daemon through it. Each
//! request is decided by the same [`crate::policy`] engine that guards plugins: the
//! socket-proxy vocabulary applied to the Docker API endpoint the request matched. What is
//! forwarded is exactly the path that was decided on (decoded once, normalised), never the
//! raw bytes the client sent. Every container a request names — in its path, its query
//! (`commit?container=`) or its body (`VolumesFrom`, `container:NAME` modes, `Links`,
//! network connect's `Container`) — is checked against the policy's container scope
//! (the daemon is asked which container the reference is), a create must pass the
//! policy's create guard, and container and network listings are narrowed to the scope.
//! Bodies read for that are bounded ([`body::MAX_BODY`], else 413) and refused when they
//! cannot be read the way the daemon would read them.
//!
//! Denials answer 403 in Docker's own error format (`{"message": …}`) with a sentence that
//! names the variable that would allow the request, so the docker CLI prints something
//! useful. Streaming responses (logs -f, events) are passed through as they arrive, and
//! upgraded connections (attach, exec) are spliced byte for byte.
//!
//! On a TCP listener the proxy can speak TLS (`--tls-cert`, `--tls-key`), and with
//! `--tls-client-ca` demand client certificates signed by that CA, as `dockerd
//! --tlsverify` does: `docker --tlsverify -H tcp://…` then works against the proxy
//! unchanged, and the certificate is the client's credential (no token needed).
//!
//! Every request the proxy answers is recorded ([`AccessLog`]): client, device, method,
//! the path decided on, the decision, the rule and variable that made it, and the status.
//! By default allowed requests are `info` events (denials are `warn` events anyway); with
//! `--access-log FILE` (`access_log` in `[[proxy]]`) every request is a JSON line in that
//! file. Bodies and headers are never recorded, and query values that may hold secrets
//! (build arguments, remote URLs) are written as `***`.
//!
//! In cluster mode a `[[proxy]]` of `capstan serve` serves its device only while its
//! node owns the device ([`crate::cluster::Cluster::holds`], checked per request after
//! the client's token): another node's proxy answers 421 naming the owner node and its
//! API address, or 503 when no node owns it now. Requests are not forwarded to the
//! owner: streams and upgraded connections do not fit NATS request/reply. A response
//! still streaming (logs, events, stats) and an upgraded connection (attach, exec) are
//! cut when the node stops holding the lease ([`FENCE_CHECK`]): a streamed body ends
//! with an error (the client sees the connection drop, not a clean end) and an upgraded
//! connection is closed, so a node that lost its device does not keep acting on it
//! through a stream it opened while it owned it.
//!
//! Connections are accepted and timed by [`crate::server`], under the process's
//! connection cap, as the API's are.
//!
//! Upstream requests go through the device's [`DockerClient`]: the same pooled
//! connections (local socket, TLS, SSH channels running `docker system dial-stdio`) that
//! plugins and checks use — `src/docker/` stays the one place that opens them.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

use crate::docker::{BoxError, DockerClient, daemon};
use crate::policy::body::{self, BodyError};
use crate::policy::{CompiledPolicy, Decision, Framing, Var};
use crate::secret::Secret;
use crate::server::{Listener, RequestBody, Server, ServerConfig};

pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// How often a streaming response or an upgraded connection checks, in cluster mode,
/// that its node still holds the device's lease.
pub const FENCE_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// Why a streamed answer was cut.
#[derive(Debug, thiserror::Error)]
#[error("capstan: this node no longer owns device {0} in the cluster; the stream is cut")]
struct LeaseLost(String);

/// A streamed answer that ends, with [`LeaseLost`], once `lost` ([`lease_lost`])
/// resolves (`None` after: the answer has ended).
struct Fenced {
    inner: Incoming,
    device: String,
    lost: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
}

impl hyper::body::Body for Fenced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let Some(lost) = self.lost.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        if lost.as_mut().poll(cx).is_ready() {
            self.lost = None;
            return std::task::Poll::Ready(Some(Err(Box::new(LeaseLost(self.device.clone())))));
        }
        std::pin::Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves once `cluster`'s node stops holding `device`'s lease (never without a
/// cluster).
async fn lease_lost(cluster: Option<Arc<crate::cluster::Cluster>>, device: String) {
    let Some(cluster) = cluster else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(FENCE_CHECK);
    loop {
        tick.tick().await;
        if !cluster.holds(&device) {
            return;
        }
    }
}

/// Where a proxy listens: `tcp://HOST:PORT` or `unix:///path.sock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(a) = s.strip_prefix("tcp://") {
            a.parse()
                .map(Listen::Tcp)
                .map_err(|_| format!("{s:?}: expected tcp://IP:PORT, e.g. tcp://127.0.0.1:2375"))
        } else if let Some(p) = s.strip_prefix("unix://") {
            if p.starts_with('/') {
                Ok(Listen::Unix(PathBuf::from(p)))
            } else {
                Err(format!("{s:?}: expected unix:///absolute/path.sock"))
            }
        } else {
            Err(format!(
                "{s:?}: expected tcp://IP:PORT or unix:///absolute/path.sock"
            ))
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "tcp://{a}"),
            Listen::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "refusing to serve the Docker API on the non-loopback address {0} without client authentication: anyone who can reach it would control the daemon. Require client certificates (--tls-cert, --tls-key, --tls-client-ca), or give a token (--token-file; clients send it as `X-Capstan-Token` or `Authorization: Bearer`), or listen on 127.0.0.1"
    )]
    ExposedWithoutToken(SocketAddr),
    #[error("proxy TLS: {0}")]
    Tls(String),
    #[error("the policy's device scope does not include device {0:?}")]
    DeviceOutOfScope(String),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "cannot open the access log {}: {source} (check that its directory exists and is writable, or leave the access log out to record requests as `info` log lines)",
        path.display()
    )]
    AccessLog {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Counters of every decision the proxy made.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
}

pub use crate::server::tls::{TlsFiles, tls_note};

/// A proxy reachable from other hosts must authenticate its clients: by a token or by
/// client certificates.
fn check_exposure(listen: &Listen, token: bool, client_certs: bool) -> Result<(), ProxyError> {
    match listen {
        Listen::Tcp(addr) if !addr.ip().is_loopback() && !token && !client_certs => {
            Err(ProxyError::ExposedWithoutToken(*addr))
        }
        _ => Ok(()),
    }
}

/// Where a proxy records the requests it answers.
#[derive(Debug)]
pub enum AccessLog {
    /// Allowed requests as `info` events of the `capstan::proxy::access` target (denied ones
    /// are `warn` events of the proxy with the reason).
    Tracing,
    /// Every request as one JSON line appended to this file.
    File {
        path: PathBuf,
        file: std::sync::Mutex<std::fs::File>,
    },
}

impl AccessLog {
    /// Opens (creating it with mode 0600 if needed) `path` for appending.
    pub fn open(path: &Path) -> Result<AccessLog, ProxyError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| ProxyError::AccessLog {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(AccessLog::File {
            path: path.to_path_buf(),
            file: std::sync::Mutex::new(file),
        })
    }
}

/// One access record as it is filled in while a request is decided.
#[derive(Debug, Default)]
struct AccessNote {
    /// The path and query decided on (what is forwarded), once decided.
    path: Option<String>,
    /// The rule that decided (`section`, `guard`, `toggle`, `write-gate`, `token`,
    /// `container-scope`, `request-body`, `cluster` (another node owns the device), …).
    rule: &'static str,
    /// The variable that decided, if one did.
    variable: Option<Var>,
    /// Whether the request was sent to the daemon.
    forwarded: bool,
}

impl AccessNote {
    /// Notes the policy's decision.
    fn decided(&mut self, decision: &Decision<'_>) {
        self.path = Some(decision.path().to_string());
        self.rule = decision.rule().kind();
        self.variable = decision.rule().var();
    }
}

/// The JSON line of one request.
#[derive(serde::Serialize)]
struct AccessRecord<'a> {
    time: String,
    client: &'a str,
    device: &'a str,
    method: &'a str,
    path: &'a str,
    decision: &'static str,
    rule: &'static str,
    variable: Option<&'static str>,
    status: u16,
}

/// Query parameters whose values may hold secrets: build arguments and the URLs of build
/// contexts, image imports and plugins (which may carry credentials).
const SECRET_QUERY_KEYS: &[&str] = &["buildargs", "remote", "fromSrc"];

/// `path_and_query` with the values of [`SECRET_QUERY_KEYS`] replaced by `***`.
fn redact_query(path_and_query: &str) -> std::borrow::Cow<'_, str> {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.into();
    };
    let secret = |pair: &str| {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        SECRET_QUERY_KEYS
            .iter()
            .any(|s| s.eq_ignore_ascii_case(key))
    };
    if !query.split('&').any(secret) {
        return path_and_query.into();
    }
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if secret(pair) => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{path}?{}", pairs.join("&")).into()
}

/// An answer narrowed to the container scope before it is returned.
#[derive(Debug, Clone, Copy)]
enum Filter {
    /// `GET /containers/json`.
    Containers,
    /// `GET /networks/{id}` and `GET /networks`.
    Networks,
}

/// A running proxy's shared state.
pub struct Proxy {
    device: String,
    policy: Arc<CompiledPolicy>,
    upstream: Arc<DockerClient>,
    token_hash: Option<[u8; 32]>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    access_log: AccessLog,
    /// Cluster mode: the proxy serves its device only while this node owns it.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    pub stats: ProxyStats,
}

fn docker_error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = serde_json::to_vec(&serde_json::json!({ "message": message })).expect("json");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("valid response")
}

/// A client's body forwarded as it arrives.
fn streamed(body: RequestBody) -> crate::docker::Body {
    body.map_err(|e| Box::new(e) as BoxError).boxed_unsync()
}

fn empty() -> ProxyBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) are not forwarded, except that an upgrade keeps
/// `Connection: Upgrade` and `Upgrade`.
fn strip_hop_headers(h: &mut HeaderMap, keep_upgrade: bool) {
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        h.remove(name);
    }
    if !keep_upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// Whether the body is a form the daemon reads parameters from as it reads the query (Go's
/// `ParseForm` reads `application/x-www-form-urlencoded`; `multipart/form-data` counts
/// too, and so does a Content-Type that is not text, to be safe).
fn is_form_body(h: &HeaderMap) -> bool {
    h.get_all(header::CONTENT_TYPE)
        .iter()
        .any(|v| match v.to_str() {
            Err(_) => true,
            Ok(s) => {
                let media = s.split(';').next().unwrap_or_default().trim();
                media.eq_ignore_ascii_case("application/x-www-form-urlencoded")
                    || media.eq_ignore_ascii_case("multipart/form-data")
            }
        })
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

fn hash_token(t: &[u8]) -> [u8; 32] {
    Sha256::digest(t).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Proxy {
    /// Builds a proxy for `device`. Fails when the listen address is exposed without
    /// client authentication (a token or client certificates), when the policy's device
    /// scope leaves the device out, or when the TLS files are unusable.
    pub fn new(
        device: &str,
        policy: CompiledPolicy,
        upstream: Arc<DockerClient>,
        listen: &Listen,
        token: Option<&Secret>,
        tls: Option<&TlsFiles>,
    ) -> Result<Proxy, ProxyError> {
        check_exposure(
            listen,
            token.is_some(),
            tls.is_some_and(|t| t.client_ca.is_some()),
        )?;
        if tls.is_some() && matches!(listen, Listen::Unix(_)) {
            return Err(ProxyError::Tls(format!(
                "TLS is for tcp:// listeners; {listen} is a unix socket, guarded by its file permissions"
            )));
        }
        let tls = tls
            .map(TlsFiles::acceptor)
            .transpose()
            .map_err(|e| ProxyError::Tls(e.to_string()))?;
        if !policy.devices().is_empty() && !policy.devices().allows(device) {
            return Err(ProxyError::DeviceOutOfScope(device.to_string()));
        }
        Ok(Proxy {
            device: device.to_string(),
            policy: Arc::new(policy),
            upstream,
            token_hash: token.map(|t| hash_token(t.expose())),
            tls,
            access_log: AccessLog::Tracing,
            cluster: None,
            stats: ProxyStats::default(),
        })
    }

    /// Cluster mode: serves the device only while `cluster`'s node owns it
    /// ([`crate::cluster::Cluster::holds`]); otherwise answers 421 naming the owner node
    /// and its API address, or 503 when no node owns it now.
    pub fn in_cluster(mut self, cluster: Arc<crate::cluster::Cluster>) -> Proxy {
        self.cluster = Some(cluster);
        self
    }

    /// The answer to a request for a device this node does not own: 421 (Misdirected
    /// Request) with the owner node and where its API listens, or 503 when no node owns
    /// it now (or NATS does not answer).
    async fn not_owner(&self, cluster: &crate::cluster::Cluster) -> Response<ProxyBody> {
        match cluster.owner_elsewhere(&self.device).await {
            Ok(lease) => {
                let api = cluster
                    .api_of(&lease.owner)
                    .await
                    .map(|a| format!(" (its API at {a})"))
                    .unwrap_or_default();
                docker_error(
                    StatusCode::MISDIRECTED_REQUEST,
                    &format!(
                        "capstan: node {} does not own device {} in the cluster; node {}{api} does: use a proxy on that node",
                        cluster.node_name(),
                        self.device,
                        lease.owner
                    ),
                )
            }
            Err(e) => docker_error(StatusCode::SERVICE_UNAVAILABLE, &format!("capstan: {e}")),
        }
    }

    /// Records requests in `log` instead of as `info` events.
    pub fn with_access_log(mut self, log: AccessLog) -> Proxy {
        self.access_log = log;
        self
    }

    /// Writes the access record of one answered request.
    fn record(&self, client: &str, method: &str, raw_path: &str, note: &AccessNote, status: u16) {
        let path = redact_query(note.path.as_deref().unwrap_or(raw_path));
        let decision = if note.forwarded { "allow" } else { "deny" };
        let variable = note.variable.map(Var::name);
        match &self.access_log {
            AccessLog::Tracing => {
                if note.forwarded {
                    tracing::info!(
                        target: "capstan::proxy::access",
                        %client,
                        device = %self.device,
                        %method,
                        path = %path,
                        rule = note.rule,
                        variable = variable.unwrap_or("-"),
                        status,
                        "proxy request allowed"
                    );
                }
            }
            AccessLog::File {
                path: file_path,
                file,
            } => {
                let record = AccessRecord {
                    time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    client,
                    device: &self.device,
                    method,
                    path: &path,
                    decision,
                    rule: note.rule,
                    variable,
                    status,
                };
                let mut line = serde_json::to_vec(&record).expect("access records serialise");
                line.push(b'\n');
                let written = {
                    use std::io::Write;
                    let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    file.write_all(&line)
                };
                if let Err(e) = written {
                    tracing::error!(device = %self.device, path = %file_path.display(), error = %e, "cannot write the proxy access log");
                }
            }
        }
    }

    fn authorized(&self, h: &HeaderMap) -> bool {
        let Some(want) = &self.token_hash else {
            return true;
        };
        let presented = h
            .get("x-capstan-token")
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                h.get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
            });
        presented.is_some_and(|p| constant_time_eq(&hash_token(p.trim().as_bytes()), want))
    }

    /// Handles one client request and records it in the access log.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        client: String,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let method = req.method().clone();
        let raw_path = req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.to_string());
        let mut note = AccessNote::default();
        let response = self.respond(req, &client, &mut note).await;
        let status = response
            .as_ref()
            .map_or(0, |r: &Response<ProxyBody>| r.status().as_u16());
        self.record(&client, method.as_str(), &raw_path, &note, status);
        response
    }

    /// Decides one client request and answers it, noting how in `note`.
    async fn respond(
        &self,
        req: Request<RequestBody>,
        client: &str,
        note: &mut AccessNote,
    ) -> Result<Response<ProxyBody>, Infallible> {
        if !self.authorized(req.headers()) {
            note.rule = "token";
            tracing::warn!(%client, device = %self.device, method = %req.method(), "proxy request without a valid token");
            return Ok(docker_error(
                StatusCode::UNAUTHORIZED,
                "capstan: missing or invalid proxy token",
            ));
        }
        if let Some(cluster) = &self.cluster
            && !cluster.holds(&self.device)
        {
            note.rule = "cluster";
            let response = self.not_owner(cluster).await;
            tracing::info!(%client, device = %self.device, method = %req.method(), status = response.status().as_u16(), "proxy request for a device another node owns (or none) was not served");
            return Ok(response);
        }
        let method = req.method().clone();
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let framing = Framing {
            upgrade: is_upgrade(req.headers()),
            form_body: is_form_body(req.headers()),
        };
        let decision = self.policy.decide_framed(method.as_str(), &pq, framing);
        note.decided(&decision);
        if !decision.is_allowed() {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
            let reason = decision.reason();
            tracing::warn!(%client, device = %self.device, %method, path = %pq, %reason, "proxy request denied");
            return Ok(docker_error(
                StatusCode::FORBIDDEN,
                &format!("capstan policy: {reason}"),
            ));
        }
        if let Some(container) = decision.container()
            && !self.policy.containers().is_all()
            && let Err(why) = self.check_container_scope(container).await
        {
            note.rule = "container-scope";
            note.variable = None;
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%client, device = %self.device, %method, path = %pq, reason = %why, "proxy request denied");
            return Ok(docker_error(
                StatusCode::FORBIDDEN,
                &format!("capstan policy: {method} {pq} is denied: {why}"),
            ));
        }
        let (parts, body) = req.into_parts();
        let body = match self.inspect_request(&decision, &parts.headers, body).await {
            Ok(body) => body,
            Err((status, why)) => {
                note.rule = "request-body";
                note.variable = None;
                self.stats.denied.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%client, device = %self.device, %method, path = %pq, reason = %why, "proxy request denied");
                return Ok(docker_error(
                    status,
                    &format!("capstan policy: {method} {pq} is denied: {why}"),
                ));
            }
        };
        let mut req = Request::from_parts(parts, body);
        self.stats.allowed.fetch_add(1, Ordering::Relaxed);
        let forward_path = decision.path().to_string();
        let filter = self.response_filter(&decision);

        let upgrade = is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_headers(&mut parts.headers, upgrade);
        parts.headers.remove("x-capstan-token");
        if self.token_hash.is_some() {
            parts.headers.remove(header::AUTHORIZATION);
        }
        let mut up = Request::builder().method(parts.method).uri(forward_path);
        *up.headers_mut().expect("builder has headers") = parts.headers;
        let up = up.body(body).expect("valid request");

        note.forwarded = true;
        let mut resp = match self.upstream.send(up).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(device = %self.device, error = %e, "proxy upstream failed");
                return Ok(docker_error(
                    StatusCode::BAD_GATEWAY,
                    &format!("capstan: device {}: {e}", self.device),
                ));
            }
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return Ok(docker_error(
                    StatusCode::BAD_GATEWAY,
                    "capstan: the daemon upgraded a request that did not ask for it",
                ));
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let device = self.device.clone();
            let lost = lease_lost(self.cluster.clone(), device.clone());
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((c, u)) => {
                        let mut c = TokioIo::new(c);
                        let mut u = TokioIo::new(u);
                        tokio::select! {
                            r = tokio::io::copy_bidirectional(&mut c, &mut u) => {
                                if let Err(e) = r {
                                    tracing::debug!(%device, error = %e, "upgraded proxy connection ended");
                                }
                            }
                            () = lost => {
                                tracing::warn!(%device, "cluster: this node no longer owns the device; an upgraded proxy connection (attach, exec) is closed");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(%device, error = %e, "proxy upgrade failed"),
                }
            });
            let (parts, _) = resp.into_parts();
            return Ok(Response::from_parts(parts, empty()));
        }

        let (mut parts, body) = resp.into_parts();
        strip_hop_headers(&mut parts.headers, false);
        if let Some(filter) = filter
            && parts.status.is_success()
        {
            return Ok(match self.filter_response(filter, body).await {
                Ok(bytes) => {
                    parts.headers.remove(header::CONTENT_LENGTH);
                    parts.headers.remove(header::CONTENT_ENCODING);
                    Response::from_parts(
                        parts,
                        Full::new(bytes).map_err(|never| match never {}).boxed(),
                    )
                }
                Err(why) => {
                    tracing::error!(device = %self.device, error = %why, "proxy cannot filter a listing to the container scope");
                    docker_error(
                        StatusCode::BAD_GATEWAY,
                        &format!(
                            "capstan: cannot filter the answer to the policy's container scope: {why}"
                        ),
                    )
                }
            });
        }
        let body = match &self.cluster {
            Some(cluster) => Fenced {
                inner: body,
                device: self.device.clone(),
                lost: Some(Box::pin(lease_lost(
                    Some(cluster.clone()),
                    self.device.clone(),
                ))),
            }
            .boxed(),
            None => body.map_err(Into::into).boxed(),
        };
        Ok(Response::from_parts(parts, body))
    }

    /// Reads what the request names beyond its path (see [`crate::policy::body`]): the
    /// body of the endpoints that carry containers or host privileges is read (at most
    /// [`body::MAX_BODY`] bytes, else 413), every container it or the query names must be
    /// in scope, a create must pass the create guard and make a container in scope.
    /// Returns the body to forward, or the status and reason of a refusal.
    async fn inspect_request(
        &self,
        decision: &crate::policy::Decision<'_>,
        headers: &HeaderMap,
        body: RequestBody,
    ) -> Result<crate::docker::Body, (StatusCode, String)> {
        let Some(endpoint) = decision.endpoint().filter(|e| body::inspects(e)) else {
            return Ok(streamed(body));
        };
        let query = decision.path().split_once('?').map_or("", |(_, q)| q);
        let (bytes, passthrough) = if body::needs_body(endpoint) {
            if let Some(enc) = headers
                .get(header::CONTENT_ENCODING)
                .filter(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
            {
                let enc = String::from_utf8_lossy(enc.as_bytes()).into_owned();
                return Err((StatusCode::BAD_REQUEST, BodyError::Encoded(enc).to_string()));
            }
            let too_large = || {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    BodyError::TooLarge {
                        limit: body::MAX_BODY,
                    }
                    .to_string(),
                )
            };
            let declared = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > body::MAX_BODY as u64) {
                return Err(too_large());
            }
            let read = match Limited::new(body, body::MAX_BODY).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
                Err(e) => {
                    return Err((
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the request body: {e}"),
                    ));
                }
            };
            (read, None)
        } else {
            (Bytes::new(), Some(body))
        };
        let named = body::inspect(endpoint, query, &bytes).map_err(|e| {
            let status = match e {
                BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            (status, e.to_string())
        })?;
        let forbidden = |why: String| (StatusCode::FORBIDDEN, why);
        if let Some(asks) = &named.asks {
            self.policy
                .create()
                .check(asks)
                .map_err(|d| forbidden(d.to_string()))?;
        }
        let scope = self.policy.containers();
        daemon::check_named(&self.upstream, scope, &named.containers)
            .await
            .map_err(|r| forbidden(r.to_string()))?;
        if let Some(new) = &named.new_container
            && !scope.is_all()
            && !scope.matches(new.name.as_deref().unwrap_or_default(), &new.labels)
        {
            return Err(forbidden(format!(
                "the new container {} would be outside the policy's container scope ({}): give it a name and labels that match",
                new.name
                    .as_deref()
                    .map_or("(no name given)".to_string(), |n| n.to_string()),
                scope.describe()
            )));
        }
        Ok(match passthrough {
            Some(body) => streamed(body),
            None => crate::docker::full_body(bytes),
        })
    }

    /// Which answers must be narrowed to the container scope: the container list, and
    /// the `Containers` of network inspect and list.
    fn response_filter(&self, decision: &crate::policy::Decision<'_>) -> Option<Filter> {
        if self.policy.containers().is_all() {
            return None;
        }
        match decision.endpoint()?.operation {
            "ContainerList" => Some(Filter::Containers),
            "NetworkInspect" | "NetworkList" => Some(Filter::Networks),
            _ => None,
        }
    }

    /// Reads a listing (at most [`daemon::MAX_ANSWER`] bytes) and keeps what is in scope.
    async fn filter_response(&self, filter: Filter, body: Incoming) -> Result<Bytes, String> {
        let bytes = Limited::new(body, daemon::MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("cannot read the daemon's answer: {e}"))?
            .to_bytes();
        let mut v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("unreadable answer: {e}"))?;
        let scope = self.policy.containers();
        match filter {
            Filter::Containers => daemon::filter_container_list(scope, &mut v),
            Filter::Networks => {
                let ids = daemon::ids_in_scope(&self.upstream, scope).await?;
                daemon::filter_network_containers(&mut v, &ids);
            }
        }
        Ok(Bytes::from(
            serde_json::to_vec(&v).expect("JSON values serialise"),
        ))
    }

    /// Inspects the container upstream and checks its name and labels against the scope.
    async fn check_container_scope(&self, container: &str) -> Result<(), String> {
        let named = [body::NamedContainer {
            field: "path".to_string(),
            reference: container.to_string(),
        }];
        daemon::check_named(&self.upstream, self.policy.containers(), &named)
            .await
            .map_err(|r| r.to_string())
    }

    /// Accepts clients on `listener` until `shutdown` resolves, with the default
    /// [`crate::server`] limits.
    pub async fn serve(
        self: Arc<Self>,
        listener: ProxyListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ProxyError> {
        let server = Server::new(&ServerConfig::default()).map_err(ProxyError::Server)?;
        self.serve_on(&server, listener, shutdown).await
    }

    /// Accepts clients on `listener` until `shutdown` resolves, under `server`'s
    /// timeouts and connection cap (shared with the process's other listeners).
    pub async fn serve_on(
        self: Arc<Self>,
        server: &Server,
        listener: ProxyListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ProxyError> {
        tracing::info!(
            device = %self.device,
            listen = %listener.listen,
            tls = self.tls.is_some(),
            "proxy listening"
        );
        let this = self.clone();
        let make = move |client: &str| {
            let (this, client) = (this.clone(), client.to_string());
            hyper::service::service_fn(move |req| this.clone().handle(req, client.clone()))
        };
        server
            .serve(listener.inner, self.tls.clone(), make, shutdown)
            .await;
        tracing::info!(
            device = %self.device,
            allowed = self.stats.allowed.load(Ordering::Relaxed),
            denied = self.stats.denied.load(Ordering::Relaxed),
            "proxy stopped"
        );
        Ok(())
    }
}

/// A bound proxy socket: binding first lets the caller fail start-up on a taken address.
pub struct ProxyListener {
    listen: Listen,
    inner: Listener,
}

impl ProxyListener {
    pub async fn bind(listen: &Listen) -> Result<ProxyListener, ProxyError> {
        let err = |source| ProxyError::Listen {
            addr: listen.to_string(),
            source,
        };
        let inner = match listen {
            Listen::Tcp(a) => Listener::Tcp(tokio::net::TcpListener::bind(a).await.map_err(err)?),
            Listen::Unix(p) => {
                if p.exists() {
                    // Only replace a stale socket, never another kind of file.
                    use std::os::unix::fs::FileTypeExt;
                    let ft = std::fs::symlink_metadata(p).map_err(err)?.file_type();
                    if !ft.is_socket() {
                        return Err(err(std::io::Error::other(
                            "a file that is not a socket is in the way",
                        )));
                    }
                    let _ = std::fs::remove_file(p);
                }
                let l = tokio::net::UnixListener::bind(p).map_err(err)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
                Listener::Unix(l, p.clone())
            }
        };
        Ok(ProxyListener {
            listen: listen.clone(),
            inner,
        })
    }

    /// The bound address (for `tcp://…:0`, the port chosen).
    pub fn local_listen(&self) -> Listen {
        match &self.inner {
            Listener::Tcp(l) => l
                .local_addr()
                .map(Listen::Tcp)
                .unwrap_or_else(|_| self.listen.clone()),
            Listener::Unix(_, p) => Listen::Unix(p.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn listen_addresses_parse_and_say_what_they_expect() {
        assert_eq!(
            "tcp://127.0.0.1:2375".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:2375".parse().unwrap())
        );
        assert_eq!(
            "unix:///run/c.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/run/c.sock".into())
        );
        for bad in [
            "127.0.0.1:2375",
            "tcp://localhost:1",
            "unix://rel.sock",
            "http://x",
        ] {
            assert!(bad.parse::<Listen>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_non_loopback_listener_needs_a_token_or_client_certificates() {
        let exposed: Listen = "tcp://0.0.0.0:2376".parse().unwrap();
        let local: Listen = "tcp://127.0.0.1:2375".parse().unwrap();
        let unix: Listen = "unix:///run/capstan-proxy.sock".parse().unwrap();
        assert!(matches!(
            check_exposure(&exposed, false, false),
            Err(ProxyError::ExposedWithoutToken(_))
        ));
        check_exposure(&exposed, true, false).unwrap();
        check_exposure(&exposed, false, true).unwrap();
        check_exposure(&local, false, false).unwrap();
        check_exposure(&unix, false, false).unwrap();
    }

    #[test]
    fn form_bodies_are_recognised_by_their_media_type_in_any_case() {
        let with = |value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            is_form_body(&h)
        };
        assert!(with("application/x-www-form-urlencoded"));
        assert!(with("Application/X-WWW-Form-Urlencoded; charset=utf-8"));
        assert!(with(" multipart/form-data; boundary=x"));
        assert!(!with("text/plain"));
        assert!(!with("application/json"));
        assert!(!is_form_body(&HeaderMap::new()));
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_bytes(b"application/\xff").unwrap(),
        );
        assert!(
            is_form_body(&h),
            "an unreadable Content-Type counts as a form"
        );
    }

    #[test]
    fn access_records_leave_out_query_values_that_may_hold_secrets() {
        assert_eq!(
            redact_query("/build?t=app&buildargs=%7B%22TOKEN%22%3A%22s3cret%22%7D&q=1"),
            "/build?t=app&buildargs=***&q=1"
        );
        assert_eq!(
            redact_query("/build?remote=https://u:pw@git.example/r.git"),
            "/build?remote=***"
        );
        assert_eq!(
            redact_query("/images/create?fromSrc=https://u:pw@x/i.tar&repo=a"),
            "/images/create?fromSrc=***&repo=a"
        );
        assert_eq!(
            redact_query("/containers/json?all=1"),
            "/containers/json?all=1"
        );
        assert_eq!(redact_query("/_ping"), "/_ping");
    }

    #[test]
    fn upgrade_requests_are_recognised_by_both_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("tcp"));
        assert!(!is_upgrade(&h));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_upgrade(&h));
    }
}
