//! `wasi:http/outgoing-handler`: a plugin's outbound HTTP, through our own send path.
//!
//! wasmtime-wasi-http provides the WASI types and resources; it is built without a
//! default sender, so every request a plugin makes reaches [`Outbound::send_request`],
//! which takes the same four steps as every host function:
//! 1. **policy**: the origin (scheme, host, port) against the manifest's
//!    `[policy] outbound` ([`OutboundList`]); the `Host` header is the URL's (the guest
//!    cannot set it: wasi-http forbids the header); `{{secret.NAME}}` only for an origin
//!    its `[secrets.NAME] origins` binds, substituted after the check and never in the
//!    host; then, after DNS resolution, no [special address](special_address) (loopback,
//!    private, link-local, cloud metadata, …) unless an entry names the host literally —
//!    and the connection goes to the address that was checked, so a second resolution
//!    cannot rebind it;
//! 2. **limit**: `limits.max_http_requests` per run, `limits.http_timeout_ms` for
//!    connecting, for the response head and between body frames, the run's deadline over
//!    all of it, and `limits.max_http_response_bytes` on the body read;
//! 3. **call**: HTTP/1.1 over TCP, or over TLS (rustls, the webpki roots); redirects are
//!    not followed — a 3xx is handed to the plugin like any answer;
//! 4. **map the error**: a refusal is `internal-error("denied: <reason>")`, the reason
//!    naming the manifest setting that would allow the request (the SDK turns it into
//!    `Error::Denied`), everything else the matching `wasi:http` error code.
//!
//! Every request is recorded once, as a host call `http.request` (in the run's report
//! and record — after the run's other host calls, the first 1,000 — the audit log, and
//! so `/metrics`) with its decision. The recorded request
//! line is the URL as the plugin wrote it — with `{{secret.NAME}}` in place of a secret —
//! and any secret value that appears in it anyway is replaced by `***`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};
use zeroize::Zeroizing;

use super::RunState;
use super::docker::bounded;
use crate::plugin::records::AuditRecord;
use crate::plugin::report::{CallDecision, Denial, HostCall};
use crate::plugin::runtime::LoadedPlugin;
use crate::policy::{Origin, Scheme, special_address};
use crate::secret::Secret;
use crate::vault::SecretName;

/// The host call's name in records and metrics.
pub const OP: &str = "http.request";

/// The vault record kind of plugin secrets: `plugin-secret/<plugin>/<name>`.
pub const SECRET_KIND: &str = "plugin-secret";

/// The vault name of plugin `plugin`'s secret `name`.
pub fn secret_name(plugin: &str, name: &str) -> SecretName {
    SecretName::new(SECRET_KIND, plugin, name)
}

/// How a refusal reaches the guest: `internal-error` with this prefix and the reason.
/// A request that timed out or could not reach its server is `internal-error` with
/// [`TIMEOUT_PREFIX`] or [`UNREACHABLE_PREFIX`] and why; the SDK maps each prefix to its
/// `error` case (any other text is `failed`).
pub const DENIED_PREFIX: &str = "denied: ";
/// See [`DENIED_PREFIX`].
pub const TIMEOUT_PREFIX: &str = "timeout: ";
/// See [`DENIED_PREFIX`].
pub const UNREACHABLE_PREFIX: &str = "unreachable: ";

/// The longest time a DNS lookup may take (within the request's timeout).
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// The outbound state of one run: the `WasiHttpHooks` of its store.
pub struct Outbound {
    shared: Arc<Shared>,
}

/// What the requests of one run share with the tasks that send them.
struct Shared {
    plugin: Arc<LoadedPlugin>,
    services: Arc<super::Services>,
    deadline: Instant,
    sent: AtomicU32,
    /// Records made since the runtime last took them ([`Outbound::take_records`]).
    records: Mutex<Records>,
}

#[derive(Default)]
struct Records {
    calls: Vec<HostCall>,
    denials: Vec<Denial>,
}

/// The records of a run's requests, for its report.
pub struct OutboundRecords {
    pub calls: Vec<HostCall>,
    pub denials: Vec<Denial>,
    /// Requests the plugin made (denied ones too).
    pub requests: u64,
}

impl Outbound {
    pub fn new(
        plugin: Arc<LoadedPlugin>,
        services: Arc<super::Services>,
        deadline: Instant,
    ) -> Outbound {
        Outbound {
            shared: Arc::new(Shared {
                plugin,
                services,
                deadline,
                sent: AtomicU32::new(0),
                records: Mutex::new(Records::default()),
            }),
        }
    }

    /// Takes what the run's requests recorded so far.
    pub fn take_records(&self) -> OutboundRecords {
        let mut r = self
            .shared
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        OutboundRecords {
            calls: std::mem::take(&mut r.calls),
            denials: std::mem::take(&mut r.denials),
            requests: u64::from(self.shared.sent.load(Ordering::Relaxed)),
        }
    }
}

impl wasmtime_wasi_http::WasiHttpView for RunState {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView {
            ctx: &mut self.http_ctx,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

type SendResult = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
>;

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        let shared = self.shared.clone();
        Box::new(async move { shared.send(request, options).await })
    }
}

/// A request that passed the checks that need no network.
struct Checked {
    origin: Origin,
    /// The secret values the request carries, to scrub from what is recorded.
    secrets: Vec<Secret>,
    request: http::Request<WasiBody>,
}

/// One request under way, for its record.
struct Call {
    /// `METHOD URL` as the plugin wrote it (scrubbed and bounded when recorded).
    line: String,
    started: Instant,
}

impl Shared {
    async fn send(
        self: Arc<Self>,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> SendResult {
        let call = Call {
            line: format!("{} {}", request.method(), request.uri()),
            started: Instant::now(),
        };
        let n = self.sent.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let max = self.plugin.limits.max_http_requests;
        if n > max {
            let reason = format!(
                "the run already made {max} HTTP requests, its limit (raise `limits.max_http_requests`)"
            );
            // The first refusal is recorded; a plugin that goes on asking writes nothing
            // more (no audit record, log line or denial per request).
            if n == max.saturating_add(1) {
                return Err(self.deny(&call, &[], reason));
            }
            return Err(HttpError::InternalError(Some(format!(
                "{DENIED_PREFIX}{reason}"
            ))));
        }
        let checked = match self.check(request) {
            Ok(c) => c,
            Err(reason) => return Err(self.deny(&call, &[], reason)),
        };
        let timeout = self.timeout(options);
        let Checked {
            origin,
            secrets,
            request,
        } = checked;
        let addr = match self.resolve(&origin, timeout).await {
            Ok(addr) => addr,
            Err(Refusal::Denied(reason)) => return Err(self.deny(&call, &secrets, reason)),
            Err(Refusal::Failed(e, why)) => return Err(self.fail(&call, &secrets, e, &why)),
        };
        match self.exchange(&origin, addr, request, timeout).await {
            Ok((response, io)) => {
                let status = response.status().as_u16().to_string();
                let entry = self
                    .plugin
                    .outbound
                    .allows(&origin)
                    .map_or("", |r| r.as_str());
                let reason = format!(
                    "allowed by `{entry}` in [policy] outbound; sent to {addr}, answered {status}"
                );
                self.record(&call, &secrets, CallDecision::Allow, &status, &reason);
                Ok((response, io))
            }
            Err((e, why)) => Err(self.fail(&call, &secrets, e, &why)),
        }
    }

    /// Step 1 without the network: origin, Host header, secrets.
    fn check(&self, mut request: http::Request<WasiBody>) -> Result<Checked, String> {
        let uri = request.uri().clone();
        let scheme = uri
            .scheme_str()
            .and_then(Scheme::parse)
            .ok_or_else(|| "only http and https URLs may be requested".to_string())?;
        let authority = uri
            .authority()
            .ok_or_else(|| "the URL has no host".to_string())?;
        if authority.as_str().contains('@') {
            return Err("a URL may not carry a user name or password".to_string());
        }
        if authority.as_str().contains("{{") {
            return Err("a secret may not stand in a URL's host: the allow-list decides on the host as written".to_string());
        }
        let origin = Origin::new(scheme, authority.host(), authority.port_u16())
            .map_err(|e| e.to_string())?;
        let outbound = &self.plugin.outbound;
        if outbound.allows(&origin).is_none() {
            let named = if outbound.is_empty() {
                "the plugin's `[policy] outbound` names no origin".to_string()
            } else {
                format!("`{origin}` is not in the plugin's `[policy] outbound`")
            };
            return Err(format!(
                "{named}: add `{origin}` to `[policy] outbound` to allow it"
            ));
        }
        // wasi-http forbids the guest's own Host header and sets it from the URL; hold
        // that here too, so nothing but the URL can choose the virtual host.
        for host in request.headers().get_all(http::header::HOST) {
            if host.as_bytes() != authority.as_str().as_bytes() {
                return Err(
                    "the Host header must be the URL's host: set the host in the URL".to_string(),
                );
            }
        }
        let secrets = self.substitute(&origin, &mut request)?;
        Ok(Checked {
            origin,
            secrets,
            request,
        })
    }

    /// Puts the value of every `{{secret.NAME}}` in the path, query and header values,
    /// when the secret is bound to `origin`; returns the values used.
    fn substitute(
        &self,
        origin: &Origin,
        request: &mut http::Request<WasiBody>,
    ) -> Result<Vec<Secret>, String> {
        let path = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        let mut names: Vec<String> = placeholders(&path);
        for value in request.headers().values() {
            names.extend(placeholders(&String::from_utf8_lossy(value.as_bytes())));
        }
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut values: BTreeMap<String, Secret> = BTreeMap::new();
        for name in &names {
            let Some(bound) = self.plugin.secrets.get(name) else {
                return Err(format!(
                    "the plugin has no secret `{name}`: declare it with `[secrets.{name}] origins = [\"{origin}\"]` and set it with `capstan plugin secret set {} {name}`",
                    self.plugin.name
                ));
            };
            if bound.allows(origin).is_none() {
                return Err(format!(
                    "secret `{name}` may not be sent to `{origin}`: add `{origin}` to `[secrets.{name}] origins` to allow it"
                ));
            }
            let value = self
                .services
                .engine
                .vault
                .get(&secret_name(&self.plugin.name, name))
                .map_err(|e| format!("secret `{name}` cannot be read from the vault: {e}"))?
                .ok_or_else(|| {
                    format!(
                        "secret `{name}` has no value yet: set it with `capstan plugin secret set {} {name}`",
                        self.plugin.name
                    )
                })?;
            value.expose_str().map_err(|_| {
                format!("secret `{name}` is not UTF-8 text and cannot stand in a URL or header")
            })?;
            values.insert(name.clone(), value);
        }
        // The texts with values in them are wiped when dropped, as the values are.
        let fill = |text: &str| -> Zeroizing<String> {
            let mut out = Zeroizing::new(text.to_string());
            for (name, value) in &values {
                out = Zeroizing::new(out.replace(
                    &format!("{{{{secret.{name}}}}}"),
                    value.expose_str().unwrap_or_default(),
                ));
            }
            out
        };
        if !placeholders(&path).is_empty() {
            let filled = fill(&path);
            let pq = http::uri::PathAndQuery::try_from(filled.as_str()).map_err(|_| {
                "a secret's value is not valid in a URL's path or query (percent-encode it when you store it)".to_string()
            })?;
            let mut parts = request.uri().clone().into_parts();
            parts.path_and_query = Some(pq);
            *request.uri_mut() = http::Uri::from_parts(parts)
                .map_err(|_| "the URL is not valid once its secrets are in".to_string())?;
        }
        let headers = request.headers_mut();
        let named: Vec<http::HeaderName> = headers.keys().cloned().collect();
        for name in named {
            let old: Vec<http::HeaderValue> = headers.get_all(&name).iter().cloned().collect();
            if !old
                .iter()
                .any(|v| !placeholders(&String::from_utf8_lossy(v.as_bytes())).is_empty())
            {
                continue;
            }
            headers.remove(&name);
            for v in old {
                let filled = fill(&String::from_utf8_lossy(v.as_bytes()));
                let mut value = http::HeaderValue::from_str(&filled)
                    .map_err(|_| format!("a secret's value is not valid in the `{name}` header"))?;
                value.set_sensitive(true);
                headers.append(name.clone(), value);
            }
        }
        Ok(values.into_values().collect())
    }

    /// The request's timeout: the plugin's, within `limits.http_timeout_ms`.
    fn timeout(&self, options: Option<RequestOptions>) -> Duration {
        let limit = Duration::from_millis(u64::from(self.plugin.limits.http_timeout_ms));
        let asked = options
            .into_iter()
            .flat_map(|o| {
                [
                    o.connect_timeout,
                    o.first_byte_timeout,
                    o.between_bytes_timeout,
                ]
            })
            .flatten()
            .min();
        asked.map_or(limit, |a| a.min(limit))
    }

    /// When waiting for `timeout` from now must end: then, or at the run's deadline.
    fn until(&self, timeout: Duration) -> tokio::time::Instant {
        (Instant::now() + timeout).min(self.deadline).into()
    }

    /// Step 1 on the network: the address to connect to, checked.
    async fn resolve(&self, origin: &Origin, timeout: Duration) -> Result<SocketAddr, Refusal> {
        let literal = self.plugin.outbound.names_literally(origin);
        let addrs: Vec<SocketAddr> = match origin.ip() {
            Some(ip) => vec![SocketAddr::new(ip, origin.port())],
            None => {
                let lookup = tokio::net::lookup_host((origin.host(), origin.port()));
                let until = self.until(timeout.min(DNS_TIMEOUT));
                match tokio::time::timeout_at(until, lookup).await {
                    Err(_) => {
                        return Err(Refusal::Failed(
                            HttpError::DnsTimeout,
                            format!("looking up `{}` timed out", origin.host()),
                        ));
                    }
                    Ok(Err(e)) => {
                        return Err(Refusal::Failed(
                            HttpError::DnsError {
                                rcode: Some(e.to_string()),
                                info_code: None,
                            },
                            format!("cannot resolve `{}`: {e}", origin.host()),
                        ));
                    }
                    Ok(Ok(addrs)) => addrs.collect(),
                }
            }
        };
        match pick_address(&addrs, literal) {
            Ok(addr) => Ok(addr),
            Err(Some((ip, kind))) => Err(Refusal::Denied(refusal_of_special(origin, ip, kind))),
            Err(None) => Err(Refusal::Failed(
                HttpError::DestinationNotFound,
                format!("`{}` has no address", origin.host()),
            )),
        }
    }

    /// Steps 2 and 3: connect to `addr`, send, wait for the response head.
    async fn exchange(
        &self,
        origin: &Origin,
        addr: SocketAddr,
        mut request: http::Request<WasiBody>,
        timeout: Duration,
    ) -> Result<
        (
            http::Response<WasiBody>,
            Box<dyn Future<Output = Result<(), HttpError>> + Send>,
        ),
        (HttpError, String),
    > {
        let timed_out = |what: &str| {
            let why = if Instant::now() >= self.deadline {
                format!("{what}: the run reached its deadline (limits.timeout_secs)")
            } else {
                format!(
                    "{what} took longer than {} ms (limits.http_timeout_ms or the request's timeout)",
                    timeout.as_millis()
                )
            };
            (HttpError::ConnectionTimeout, why)
        };
        let tcp = match tokio::time::timeout_at(self.until(timeout), TcpStream::connect(addr)).await
        {
            Err(_) => return Err(timed_out(&format!("connecting to {origin}"))),
            Ok(Err(e)) => {
                return Err((
                    HttpError::ConnectionRefused,
                    format!("cannot connect to {origin}: {e}"),
                ));
            }
            Ok(Ok(s)) => s,
        };
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Io> = match origin.scheme() {
            Scheme::Http => Box::new(tcp),
            Scheme::Https => {
                let name = server_name(origin).map_err(|e| (HttpError::TlsProtocolError, e))?;
                let tls = tokio_rustls::TlsConnector::from(tls_config());
                match tokio::time::timeout_at(self.until(timeout), tls.connect(name, tcp)).await {
                    Err(_) => return Err(timed_out(&format!("the TLS handshake with {origin}"))),
                    Ok(Err(e)) => {
                        return Err((
                            HttpError::TlsProtocolError,
                            format!("TLS with {origin} failed: {e}"),
                        ));
                    }
                    Ok(Ok(s)) => Box::new(s),
                }
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| {
                (
                    HttpError::HttpProtocolError,
                    format!("HTTP with {origin}: {e}"),
                )
            })?;
        // The connection lives as long as the response (the runtime drops the worker
        // with it), and no longer than the run.
        let deadline: tokio::time::Instant = self.deadline.into();
        let worker = wasmtime_wasi::runtime::spawn(async move {
            let _ = tokio::time::timeout_at(deadline, conn).await;
        });
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        *request.uri_mut() = http::Uri::try_from(path).map_err(|_| {
            (
                HttpError::HttpRequestUriInvalid,
                "the URL's path is not valid".to_string(),
            )
        })?;
        let response = match tokio::time::timeout_at(
            self.until(timeout),
            sender.send_request(request),
        )
        .await
        {
            Err(_) => {
                let (_, why) = timed_out(&format!("waiting for {origin} to answer"));
                return Err((HttpError::ConnectionReadTimeout, why));
            }
            Ok(Err(e)) => {
                return Err((
                    HttpError::HttpProtocolError,
                    format!("{origin} did not answer: {e}"),
                ));
            }
            Ok(Ok(r)) => r,
        };
        let max = u64::from(self.plugin.limits.max_http_response_bytes);
        if let Some(len) = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            && len > max
        {
            return Err((
                HttpError::HttpResponseBodySize(Some(max)),
                format!(
                    "the response of {len} bytes is larger than {max} (limits.max_http_response_bytes)"
                ),
            ));
        }
        let response = response.map(|incoming| {
            CappedBody {
                inner: incoming,
                left: max,
                max,
                between: timeout,
                deadline,
                timer: None,
            }
            .boxed_unsync()
        });
        Ok((
            response,
            Box::new(async move {
                let _ = worker.await;
                Ok(())
            }),
        ))
    }

    fn deny(&self, call: &Call, secrets: &[Secret], reason: String) -> HttpError {
        let reason = bounded(&scrub(&reason, secrets));
        tracing::info!(plugin = %self.plugin.name, op = OP, request = %bounded(&scrub(&call.line, secrets)), reason = %reason, "plugin host call denied");
        self.record(call, secrets, CallDecision::Deny, "denied", &reason);
        {
            let mut r = self.records.lock().unwrap_or_else(|e| e.into_inner());
            if r.denials.len() < super::MAX_REPORTED_CALLS {
                r.denials.push(Denial {
                    op: OP.to_string(),
                    device: String::new(),
                    request: bounded(&scrub(&call.line, secrets)),
                    reason: reason.clone(),
                });
            }
        }
        HttpError::InternalError(Some(format!("{DENIED_PREFIX}{reason}")))
    }

    /// A request that went out (or tried to) and failed: recorded as allowed with how it
    /// failed, and handed to the guest as `internal-error("<kind>: <why>")` — our own
    /// words, naming the origin or the limit and never a secret.
    fn fail(&self, call: &Call, secrets: &[Secret], e: HttpError, why: &str) -> HttpError {
        let (kind, prefix) = match &e {
            HttpError::DnsTimeout
            | HttpError::ConnectionTimeout
            | HttpError::ConnectionReadTimeout => ("timeout", TIMEOUT_PREFIX),
            HttpError::HttpResponseBodySize(_) => ("too-large", ""),
            _ => ("unreachable", UNREACHABLE_PREFIX),
        };
        let why = scrub(why, secrets);
        self.record(call, secrets, CallDecision::Allow, kind, &why);
        HttpError::InternalError(Some(format!("{prefix}{why}")))
    }

    /// The request, recorded once: in the run's report (through
    /// [`Outbound::take_records`]) and in the audit log.
    fn record(
        &self,
        call: &Call,
        secrets: &[Secret],
        decision: CallDecision,
        result: &str,
        reason: &str,
    ) {
        let recorded = HostCall {
            op: OP.to_string(),
            device: String::new(),
            request: bounded(&scrub(&call.line, secrets)),
            decision,
            result: result.to_string(),
            ms: crate::millis(call.started.elapsed()),
            reason: bounded(&scrub(reason, secrets)),
        };
        let rec = AuditRecord {
            time: chrono::Utc::now(),
            plugin: self.plugin.name.clone(),
            call: recorded.clone(),
        };
        if let Err(e) = self.services.audit.record(&rec) {
            tracing::error!(error = %e, "cannot write the audit record");
        }
        // The report keeps the first MAX_REPORTED_CALLS (all are counted and audited).
        let mut r = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if r.calls.len() < super::MAX_REPORTED_CALLS {
            r.calls.push(recorded);
        }
    }
}

/// Why a request does not go out.
enum Refusal {
    /// The policy refused it: recorded as a denial.
    Denied(String),
    /// It could not go out: the error for the plugin, and why.
    Failed(HttpError, String),
}

/// The first of a host's addresses a request may go to: any, when the allow-list names
/// the host literally, else the first that is no [special address](special_address).
/// Otherwise the first special one found and its kind (or `None`: no address at all).
fn pick_address(
    addrs: &[SocketAddr],
    literal: bool,
) -> Result<SocketAddr, Option<(IpAddr, &'static str)>> {
    let mut refused = None;
    for addr in addrs {
        match special_address(addr.ip()) {
            Some(kind) if !literal => {
                refused.get_or_insert((addr.ip(), kind));
            }
            _ => return Ok(*addr),
        }
    }
    Err(refused)
}

fn refusal_of_special(origin: &Origin, ip: IpAddr, kind: &str) -> String {
    if origin.ip().is_some() {
        format!(
            "{ip} is a {kind} address, which only an entry naming it may reach (a wildcard does not): add `{origin}` to `[policy] outbound` to allow it"
        )
    } else {
        format!(
            "`{}` resolves to {ip}, a {kind} address, which only an entry naming the host itself may reach (a wildcard does not): add `{origin}` to `[policy] outbound` to allow it",
            origin.host()
        )
    }
}

/// The names of the `{{secret.NAME}}` placeholders in `text`.
pub fn placeholders(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{secret.") {
        let after = &rest[start + "{{secret.".len()..];
        let Some(end) = after.find("}}") else { break };
        names.push(after[..end].to_string());
        rest = &after[end + 2..];
    }
    names
}

/// `text` with every secret value in `secrets` replaced by `***`.
fn scrub(text: &str, secrets: &[Secret]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if let Ok(v) = s.expose_str()
            && !v.is_empty()
        {
            out = out.replace(v, "***");
        }
    }
    out
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

fn server_name(origin: &Origin) -> Result<rustls_pki_types::ServerName<'static>, String> {
    match origin.ip() {
        Some(ip) => Ok(rustls_pki_types::ServerName::IpAddress(ip.into())),
        None => rustls_pki_types::ServerName::try_from(origin.host().to_string())
            .map_err(|e| format!("`{}` is not a TLS server name: {e}", origin.host())),
    }
}

/// The TLS client configuration of every outbound request: the webpki roots, built once.
pub(crate) fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// A response body read under `limits.max_http_response_bytes`, a wait of at most
/// `between` for each frame, and the run's deadline.
struct CappedBody {
    inner: hyper::body::Incoming,
    left: u64,
    max: u64,
    between: Duration,
    deadline: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => {
                this.timer = None;
                Poll::Ready(Some(Err(HttpError::from(e))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.timer = None;
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        this.left = 0;
                        // wasi-http hands a body's error to the guest as text (no
                        // error code): say which limit, in words.
                        return Poll::Ready(Some(Err(HttpError::InternalError(Some(format!(
                            "the response body is larger than {} bytes (limits.max_http_response_bytes)",
                            this.max
                        ))))));
                    }
                    this.left -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                let until = (tokio::time::Instant::now() + this.between).min(this.deadline);
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.timer = None;
                        Poll::Ready(Some(Err(HttpError::InternalError(Some(format!(
                            "{TIMEOUT_PREFIX}no more of the response body came within {} ms (limits.http_timeout_ms, the request's timeout, or the run's deadline)",
                            this.between.as_millis()
                        ))))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_secret_placeholder_and_nothing_else() {
        assert_eq!(
            placeholders("/services/{{secret.slack}}?t={{secret.tok-2}}&x={{secret.slack}}"),
            ["slack", "tok-2", "slack"]
        );
        assert!(placeholders("/a/{{secret.x").is_empty());
        assert!(placeholders("/plain/{{other}}").is_empty());
    }

    #[test]
    fn a_wildcard_host_goes_only_to_a_public_address_and_a_named_one_anywhere() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let mixed = [a("10.0.0.1:80"), a("93.184.216.34:80"), a("[::1]:80")];
        assert_eq!(pick_address(&mixed, false), Ok(a("93.184.216.34:80")));
        assert_eq!(pick_address(&mixed, true), Ok(a("10.0.0.1:80")));
        let private = [a("127.0.0.1:80"), a("169.254.169.254:80")];
        assert_eq!(
            pick_address(&private, false),
            Err(Some(("127.0.0.1".parse().unwrap(), "loopback")))
        );
        assert_eq!(pick_address(&[], true), Err(None));
    }

    #[test]
    fn scrubs_secret_values_from_recorded_text() {
        let s = [Secret::from_str_owned("hunter2".into())];
        assert_eq!(
            scrub("GET http://x/hunter2?a=hunter2", &s),
            "GET http://x/***?a=***"
        );
    }
}
