//! Write Capstan plugins in plain Rust.
//!
//! A plugin implements [`Plugin`] (one function, `run`) and exports it with
//! [`export_plugin!`]; everything else is ordinary Rust calling the functions in
//! [`docker`], [`log`], [`config`], [`state`], [`time`], [`notify`] and [`http`]
//! ([`stack`] re-creates compose stacks in dependency order):
//!
//! ```ignore
//! use capstan_sdk::prelude::*;
//!
//! struct Hello;
//!
//! impl Plugin for Hello {
//!     fn run(event: Event) -> Result<Outcome, Error> {
//!         let mut names = Vec::new();
//!         for device in docker::list_devices() {
//!             let running = docker::list_containers(&device.name, &ContainerFilter::running())?;
//!             log::info(&format!("{}: {} running", device.name, running.len()));
//!             names.push(device.name);
//!         }
//!         Ok(Outcome::new(format!("looked at {}", names.join(", "))))
//!     }
//! }
//!
//! capstan_sdk::export_plugin!(Hello);
//! ```
//!
//! Build with `cargo build --target wasm32-wasip2 --release`; the `.wasm` in
//! `target/wasm32-wasip2/release/` is the plugin. Every Docker call is checked against
//! the policy in the plugin's `plugin.toml`; a refusal is `Err(Error::Denied(reason))`,
//! which a plugin handles like any other error.

/// The generated bindings of the `capstan:plugin@0.2.0` world (`wit/` in the Capstan
/// repository).
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "capstan:plugin/plugin@0.2.0",
        pub_export_macro: true,
        export_macro_name: "__export_capstan_plugin",
        default_bindings_module: "capstan_sdk::bindings",
    });
}

pub use bindings::capstan::plugin::types::{DockerError, Error, Timestamp};
pub use bindings::{
    CronEvent, DockerEvent, Event, Guest as Plugin, ManualEvent, Outcome, RunEvent, WebhookEvent,
};

/// Exports a type implementing [`Plugin`] as the component's `run`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ident) => {
        $crate::bindings::__export_capstan_plugin!($plugin with_types_in $crate::bindings);
    };
}

pub mod stack;

/// Everything a plugin usually needs.
pub mod prelude {
    pub use crate::docker::{
        self, ContainerFilter, ContainerSpec, ContainerSummary, ImageUpdate, LogOptions,
        PruneFilter, RecreateOptions, UpdateStatus, UpdateTarget,
    };
    pub use crate::http;
    pub use crate::notify::{self, Notification, Priority, Sent};
    pub use crate::{Error, Event, Outcome, Plugin, config, log, state, time};
}

/// Docker on the devices in the plugin's scope: every function of the WIT `docker`
/// interface, plus constructors for its option records.
pub mod docker {
    pub use crate::bindings::capstan::plugin::docker::*;

    impl ContainerFilter {
        /// Running containers, no other condition.
        pub fn running() -> ContainerFilter {
            ContainerFilter {
                all: false,
                labels: Vec::new(),
                names: Vec::new(),
                status: Vec::new(),
                health: Vec::new(),
            }
        }

        /// Every container, stopped ones too.
        pub fn all() -> ContainerFilter {
            ContainerFilter {
                all: true,
                ..ContainerFilter::running()
            }
        }

        /// Also requires the label selector (`key` or `key=value`).
        pub fn label(mut self, selector: impl Into<String>) -> ContainerFilter {
            self.labels.push(selector.into());
            self
        }

        /// Also requires a name matching one of the globs given this way.
        pub fn name(mut self, glob: impl Into<String>) -> ContainerFilter {
            self.names.push(glob.into());
            self
        }

        /// Also requires one of the states given this way (`running`, `exited`, …).
        pub fn status(mut self, state: impl Into<String>) -> ContainerFilter {
            self.status.push(state.into());
            self
        }

        /// Also requires one of the health states given this way (`unhealthy`, …).
        pub fn health(mut self, health: impl Into<String>) -> ContainerFilter {
            self.health.push(health.into());
            self
        }
    }

    impl LogOptions {
        /// The last `n` lines of stdout and stderr.
        pub fn tail(n: u32) -> LogOptions {
            LogOptions {
                stdout: true,
                stderr: true,
                tail: Some(n),
                since: None,
                timestamps: false,
            }
        }
    }

    impl RecreateOptions {
        /// Pull the container's image anew, then re-create it from it.
        pub fn pull() -> RecreateOptions {
            RecreateOptions {
                image: None,
                pull: true,
                stop_timeout_secs: None,
            }
        }

        /// Re-create from the image as it is on the device now.
        pub fn local() -> RecreateOptions {
            RecreateOptions {
                image: None,
                pull: false,
                stop_timeout_secs: None,
            }
        }
    }

    /// Whether the registry has another image for the tag `container` runs, without
    /// pulling ([`check_image_update`] of [`UpdateTarget::Container`]).
    pub fn check_container_update(device: &str, container: &str) -> Result<ImageUpdate, Error> {
        check_image_update(device, &UpdateTarget::Container(container.to_string()))
    }

    impl UpdateStatus {
        /// `up-to-date`, `available` or `unknown`.
        pub fn name(&self) -> &'static str {
            match self {
                UpdateStatus::UpToDate => "up-to-date",
                UpdateStatus::Available => "available",
                UpdateStatus::Unknown(_) => "unknown",
            }
        }
    }

    impl ContainerSpec {
        /// A container of `image` with the image's defaults and nothing else: add to it
        /// with the builders below or by setting fields.
        pub fn new(image: impl Into<String>) -> ContainerSpec {
            ContainerSpec {
                image: image.into(),
                command: Vec::new(),
                entrypoint: None,
                env: Vec::new(),
                labels: Vec::new(),
                ports: Vec::new(),
                mounts: Vec::new(),
                restart_policy: None,
                network: None,
                network_aliases: Vec::new(),
                user: None,
                working_dir: None,
                hostname: None,
                memory_bytes: None,
                cpus: None,
                cap_add: Vec::new(),
                cap_drop: Vec::new(),
                read_only_rootfs: false,
                privileged: false,
            }
        }

        /// Sets the command (`Cmd`).
        pub fn command<S: Into<String>>(
            mut self,
            cmd: impl IntoIterator<Item = S>,
        ) -> ContainerSpec {
            self.command = cmd.into_iter().map(Into::into).collect();
            self
        }

        /// Adds `KEY=VALUE` to the environment.
        pub fn env(mut self, key: &str, value: &str) -> ContainerSpec {
            self.env.push(format!("{key}={value}"));
            self
        }

        /// Adds a label.
        pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> ContainerSpec {
            self.labels.push((key.into(), value.into()));
            self
        }

        /// Publishes TCP `container_port` on `host_port` of every host address.
        pub fn publish(mut self, container_port: u16, host_port: u16) -> ContainerSpec {
            self.ports.push(PortBinding {
                container_port,
                protocol: "tcp".into(),
                host_port: Some(host_port),
                host_ip: None,
            });
            self
        }

        /// Mounts the named volume `name` at `target`.
        pub fn volume(
            mut self,
            name: impl Into<String>,
            target: impl Into<String>,
        ) -> ContainerSpec {
            self.mounts.push(Mount {
                kind: "volume".into(),
                source: name.into(),
                target: target.into(),
                read_only: false,
            });
            self
        }

        /// Sets the restart policy (`unless-stopped`, `on-failure:3`, …).
        pub fn restart(mut self, policy: impl Into<String>) -> ContainerSpec {
            self.restart_policy = Some(policy.into());
            self
        }

        /// Joins the network `name`.
        pub fn network(mut self, name: impl Into<String>) -> ContainerSpec {
            self.network = Some(name.into());
            self
        }
    }

    impl PruneFilter {
        /// Everything (within the scope, for containers).
        pub fn any() -> PruneFilter {
            PruneFilter {
                until: None,
                labels: Vec::new(),
                not_labels: Vec::new(),
            }
        }

        /// Only what was created more than `age` ago (`24h`, `90m`) or before a time.
        pub fn until(mut self, age: impl Into<String>) -> PruneFilter {
            self.until = Some(age.into());
            self
        }

        /// Also requires the label selector (`key` or `key=value`).
        pub fn label(mut self, selector: impl Into<String>) -> PruneFilter {
            self.labels.push(selector.into());
            self
        }

        /// Keeps what carries this label (with several, what carries all of them).
        pub fn not_label(mut self, selector: impl Into<String>) -> PruneFilter {
            self.not_labels.push(selector.into());
            self
        }
    }

    impl ExecOptions {
        /// Runs `cmd` with the container's defaults and a 30 s timeout.
        pub fn cmd<S: Into<String>>(cmd: impl IntoIterator<Item = S>) -> ExecOptions {
            ExecOptions {
                cmd: cmd.into_iter().map(Into::into).collect(),
                env: Vec::new(),
                user: None,
                working_dir: None,
                timeout_secs: None,
            }
        }
    }
}

/// Structured log records, kept in the run's report.
pub mod log {
    use crate::bindings::capstan::plugin::host::{self, Level};

    /// A record with fields (`&[("container", "web")]`).
    pub fn with(level: Level, message: &str, fields: &[(&str, &str)]) {
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        host::log(level, message, &fields);
    }

    pub fn debug(message: &str) {
        host::log(Level::Debug, message, &[]);
    }

    pub fn info(message: &str) {
        host::log(Level::Info, message, &[]);
    }

    pub fn warn(message: &str) {
        host::log(Level::Warn, message, &[]);
    }

    pub fn error(message: &str) {
        host::log(Level::Error, message, &[]);
    }

    pub use crate::bindings::capstan::plugin::host::Level as LogLevel;
}

/// The manifest's `[config]` values.
pub mod config {
    use crate::bindings::capstan::plugin::host;

    /// The value of `key` as text, if set.
    pub fn get(key: &str) -> Option<String> {
        host::config_get(key)
    }

    /// The value of `key` parsed as `T`, or `default` when unset or unparsable.
    pub fn get_or<T: std::str::FromStr>(key: &str, default: T) -> T {
        get(key).and_then(|v| v.parse().ok()).unwrap_or(default)
    }

    /// Every key and value.
    pub fn all() -> Vec<(String, String)> {
        host::config_all()
    }
}

/// The plugin's persistent key-value state (kept across runs and restarts).
pub mod state {
    use crate::Error;
    use crate::bindings::capstan::plugin::host;

    pub fn get(key: &str) -> Option<Vec<u8>> {
        host::state_get(key)
    }

    pub fn set(key: &str, value: &[u8]) -> Result<(), Error> {
        host::state_set(key, value)
    }

    pub fn delete(key: &str) {
        host::state_delete(key)
    }

    /// Keys starting with `prefix`, in byte order.
    pub fn keys(prefix: &str) -> Vec<String> {
        host::state_keys(prefix)
    }

    /// The value under `key` read as JSON; `None` when missing or unreadable.
    pub fn get_json<T: serde::de::DeserializeOwned>(key: &str) -> Option<T> {
        get(key).and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Stores `value` as JSON.
    pub fn set_json<T: serde::Serialize>(key: &str, value: &T) -> Result<(), Error> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Failed(e.to_string()))?;
        set(key, &bytes)
    }
}

/// Messages for people, through the notifier channels the operator configured
/// (`capstan notifier add`) and the manifest's `[notify] channels` allows.
pub mod notify {
    use crate::Error;
    pub use crate::bindings::capstan::plugin::host::{Notification, Priority, Sent};

    /// Sends `notification` to `channel`. `Ok(Sent::Queued)` once the engine has it (it
    /// delivers with retries); `Duplicate` and `RateLimited` say it was not sent.
    pub fn send(channel: &str, notification: &Notification) -> Result<Sent, Error> {
        crate::bindings::capstan::plugin::host::notify(channel, notification)
    }

    impl Notification {
        /// A notification of normal priority, without tags or dedup key.
        pub fn new(title: impl Into<String>, message: impl Into<String>) -> Notification {
            Notification {
                title: title.into(),
                message: message.into(),
                priority: Priority::Normal,
                tags: Vec::new(),
                dedup_key: None,
            }
        }

        pub fn priority(mut self, priority: Priority) -> Notification {
            self.priority = priority;
            self
        }

        /// Adds a tag.
        pub fn tag(mut self, tag: impl Into<String>) -> Notification {
            self.tags.push(tag.into());
            self
        }

        /// Notifications with the same key on the same channel within the engine's
        /// dedup window are sent once.
        pub fn dedup_key(mut self, key: impl Into<String>) -> Notification {
            self.dedup_key = Some(key.into());
            self
        }
    }
}

/// The generated bindings of `wasi:http/outgoing-handler` (WASI 0.2.12), the interface
/// [`http`] wraps. Only what a plugin calls becomes an import of its component.
#[allow(missing_docs, clippy::all)]
pub mod wasi_http {
    wit_bindgen::generate!({
        path: "wit",
        world: "capstan:sdk-http/http",
        generate_all,
    });
}

/// Outbound HTTP to the origins the manifest's `[policy] outbound` allows.
///
/// ```ignore
/// let r = http::get("https://status.example.com/health")?;
/// if r.status != 200 { /* … */ }
/// http::post_json("https://ntfy.sh/ops", &serde_json::json!({"message": "done"}))?;
/// // A secret stored with `capstan plugin secret set PLUGIN slack`, bound to
/// // `https://hooks.slack.com` in `[secrets.slack] origins`: the host writes it in.
/// http::post("https://hooks.slack.com/services/{{secret.slack}}", "application/json", b"{}")?;
/// ```
///
/// Every request is checked by the host first: the origin against the allow-list, the
/// address it resolves to (no private or loopback address unless the allow-list names
/// the host itself), the run's request count and deadline. A refusal is
/// `Err(Error::Denied(reason))`, the reason naming the setting that would allow it; a
/// timeout is `Error::Timeout`, a connection that fails `Error::Unreachable`, a
/// response over `limits.max_http_response_bytes` `Error::Failed`. Redirects are not
/// followed: a 3xx is a response like any other. The `Host` header always comes from
/// the URL and cannot be set.
pub mod http {
    use crate::Error;
    use crate::wasi_http::wasi::http::outgoing_handler;
    use crate::wasi_http::wasi::http::types::{
        ErrorCode, Fields, HeaderError, IncomingBody, Method, OutgoingBody, OutgoingRequest,
        RequestOptions, Scheme,
    };
    use crate::wasi_http::wasi::io::streams::StreamError;

    /// A request to send.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Request {
        /// `GET`, `POST`, … (any token).
        pub method: String,
        /// `http://` or `https://` URL; `{{secret.NAME}}` may stand in its path, query
        /// or a header value.
        pub url: String,
        /// Header names and values, sent in this order.
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
        /// How long to wait to connect, for the answer, and between parts of its body,
        /// milliseconds; the host's `limits.http_timeout_ms` holds in any case.
        pub timeout_ms: Option<u32>,
    }

    impl Request {
        /// A request with `method` to `url`, no headers and no body.
        pub fn new(method: impl Into<String>, url: impl Into<String>) -> Request {
            Request {
                method: method.into(),
                url: url.into(),
                headers: Vec::new(),
                body: Vec::new(),
                timeout_ms: None,
            }
        }

        /// A `GET` of `url`.
        pub fn get(url: impl Into<String>) -> Request {
            Request::new("GET", url)
        }

        /// Adds a header.
        pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Request {
            self.headers.push((name.into(), value.into()));
            self
        }

        /// Sets the body.
        pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
            self.body = body.into();
            self
        }

        /// Sets the timeout, milliseconds.
        pub fn timeout_ms(mut self, ms: u32) -> Request {
            self.timeout_ms = Some(ms);
            self
        }
    }

    /// What came back.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Response {
        pub status: u16,
        /// Header names (lower case) and values, as received (values as UTF-8, lossy).
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Response {
        /// The body as UTF-8 (invalid sequences replaced).
        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }

        /// The body parsed as JSON.
        pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
            serde_json::from_slice(&self.body).map_err(|e| {
                Error::Invalid(format!("the response body is not the JSON expected: {e}"))
            })
        }

        /// The first value of header `name` (any case).
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        /// Whether the status is 2xx.
        pub fn is_success(&self) -> bool {
            (200..300).contains(&self.status)
        }
    }

    /// `GET url`.
    pub fn get(url: &str) -> Result<Response, Error> {
        send(Request::get(url))
    }

    /// `POST url` with `body` of `content_type`.
    pub fn post(
        url: &str,
        content_type: &str,
        body: impl Into<Vec<u8>>,
    ) -> Result<Response, Error> {
        send(
            Request::new("POST", url)
                .header("content-type", content_type)
                .body(body),
        )
    }

    /// `POST url` with `value` as a JSON body.
    pub fn post_json<T: serde::Serialize + ?Sized>(
        url: &str,
        value: &T,
    ) -> Result<Response, Error> {
        let body = serde_json::to_vec(value).map_err(|e| Error::Failed(e.to_string()))?;
        post(url, "application/json", body)
    }

    /// Sends `request` and reads the whole response.
    pub fn send(request: Request) -> Result<Response, Error> {
        let (scheme, authority, path) = split_url(&request.url)?;
        let fields = Fields::new();
        for (name, value) in &request.headers {
            fields
                .append(name, value.as_bytes())
                .map_err(|e| header_error(name, e))?;
        }
        let outgoing = OutgoingRequest::new(fields);
        let method = method_of(&request.method);
        let invalid =
            |what: &str| Error::Invalid(format!("{what} of `{}` is not valid", request.url));
        outgoing
            .set_method(&method)
            .map_err(|()| invalid("the method"))?;
        outgoing
            .set_scheme(Some(&scheme))
            .map_err(|()| invalid("the scheme"))?;
        outgoing
            .set_authority(Some(authority))
            .map_err(|()| invalid("the host"))?;
        outgoing
            .set_path_with_query(Some(path))
            .map_err(|()| invalid("the path"))?;
        let body = outgoing
            .body()
            .map_err(|()| Error::Failed("the request body was already taken".into()))?;
        let options = request.timeout_ms.map(|ms| {
            let ns = u64::from(ms) * 1_000_000;
            let o = RequestOptions::new();
            let _ = o.set_connect_timeout(Some(ns));
            let _ = o.set_first_byte_timeout(Some(ns));
            let _ = o.set_between_bytes_timeout(Some(ns));
            o
        });
        let future = outgoing_handler::handle(outgoing, options).map_err(error_of)?;
        // A refused request closes the body; what went wrong comes from the future.
        if let Ok(stream) = body.write() {
            for chunk in request.body.chunks(4096) {
                if stream.blocking_write_and_flush(chunk).is_err() {
                    break;
                }
            }
            drop(stream);
        }
        let _ = OutgoingBody::finish(body, None);
        let response = loop {
            match future.get() {
                Some(Ok(Ok(response))) => break response,
                Some(Ok(Err(code))) => return Err(error_of(code)),
                Some(Err(())) => {
                    return Err(Error::Failed("the response was already taken".into()));
                }
                None => future.subscribe().block(),
            }
        };
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let incoming = response
            .consume()
            .map_err(|()| Error::Failed("the response body was already taken".into()))?;
        let stream = incoming
            .stream()
            .map_err(|()| Error::Failed("the response body was already taken".into()))?;
        let mut bytes = Vec::new();
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    let code = crate::wasi_http::wasi::http::types::http_error_code(&e);
                    return Err(match code {
                        Some(code) => error_of(code),
                        // A body's error arrives as text: the host's own words (the
                        // limit it met), or the connection's.
                        None => match from_host(e.to_debug_string()) {
                            Error::Failed(m) => {
                                Error::Failed(format!("reading the response body failed: {m}"))
                            }
                            other => other,
                        },
                    });
                }
            }
        }
        drop(stream);
        let _ = IncomingBody::finish(incoming);
        Ok(Response {
            status,
            headers,
            body: bytes,
        })
    }

    /// `scheme`, `host[:port]` and `/path?query` of an `http(s)://` URL.
    fn split_url(url: &str) -> Result<(Scheme, &str, &str), Error> {
        let bad = |why: &str| Error::Invalid(format!("`{url}` is not an http(s) URL: {why}"));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no `scheme://`"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            _ => return Err(bad("the scheme is not http or https")),
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        let path = path.split('#').next().unwrap_or("");
        let path = if path.is_empty() { "/" } else { path };
        Ok((scheme, authority, path))
    }

    fn method_of(method: &str) -> Method {
        match method.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "CONNECT" => Method::Connect,
            "OPTIONS" => Method::Options,
            "TRACE" => Method::Trace,
            "PATCH" => Method::Patch,
            _ => Method::Other(method.to_string()),
        }
    }

    fn header_error(name: &str, e: HeaderError) -> Error {
        match e {
            HeaderError::Forbidden => Error::Denied(format!(
                "the `{name}` header cannot be set by a plugin (the Host header always comes from the URL; hop-by-hop headers from the connection)"
            )),
            HeaderError::InvalidSyntax => {
                Error::Invalid(format!("the `{name}` header's name or value is not valid"))
            }
            HeaderError::Immutable => {
                Error::Failed(format!("the `{name}` header cannot be changed"))
            }
        }
    }

    /// The host's refusals arrive as `internal-error("denied: …")` with the reason; a
    /// timeout or a server out of reach as `internal-error("timeout: …")` or
    /// `internal-error("unreachable: …")` with why, in the host's words.
    fn from_host(message: String) -> Error {
        if let Some(rest) = message.strip_prefix("denied: ") {
            Error::Denied(rest.to_string())
        } else if let Some(rest) = message.strip_prefix("timeout: ") {
            Error::Timeout(rest.to_string())
        } else if let Some(rest) = message.strip_prefix("unreachable: ") {
            Error::Unreachable(rest.to_string())
        } else {
            Error::Failed(message)
        }
    }

    fn error_of(code: ErrorCode) -> Error {
        match code {
            ErrorCode::InternalError(Some(m)) => from_host(m),
            ErrorCode::HttpRequestDenied => Error::Denied("the host refused the request".into()),
            ErrorCode::DnsTimeout
            | ErrorCode::ConnectionTimeout
            | ErrorCode::ConnectionReadTimeout
            | ErrorCode::ConnectionWriteTimeout
            | ErrorCode::HttpResponseTimeout => Error::Timeout(describe(&code)),
            ErrorCode::DnsError(_)
            | ErrorCode::DestinationNotFound
            | ErrorCode::DestinationUnavailable
            | ErrorCode::DestinationIpProhibited
            | ErrorCode::DestinationIpUnroutable
            | ErrorCode::ConnectionRefused
            | ErrorCode::ConnectionTerminated
            | ErrorCode::ConnectionLimitReached
            | ErrorCode::TlsProtocolError
            | ErrorCode::TlsCertificateError
            | ErrorCode::TlsAlertReceived(_) => Error::Unreachable(describe(&code)),
            ErrorCode::HttpRequestUriInvalid | ErrorCode::HttpRequestMethodInvalid => {
                Error::Invalid(describe(&code))
            }
            other => Error::Failed(describe(&other)),
        }
    }

    fn describe(code: &ErrorCode) -> String {
        match code {
            ErrorCode::HttpResponseBodySize(Some(n)) => format!(
                "the response body is larger than {n} bytes (limits.max_http_response_bytes)"
            ),
            other => format!("{other:?}"),
        }
    }
}

/// The time.
pub mod time {
    use crate::Timestamp;

    /// Now, in milliseconds since the Unix epoch.
    pub fn now() -> Timestamp {
        crate::bindings::capstan::plugin::host::now()
    }
}

impl Outcome {
    /// An outcome with a summary and no details.
    pub fn new(summary: impl Into<String>) -> Outcome {
        Outcome {
            summary: summary.into(),
            details: String::new(),
        }
    }

    /// Adds details as JSON.
    pub fn with_details<T: serde::Serialize>(mut self, details: &T) -> Outcome {
        self.details = serde_json::to_string(details).unwrap_or_default();
        self
    }
}

impl Error {
    /// A failure of the plugin's own.
    pub fn failed(message: impl Into<String>) -> Error {
        Error::Failed(message.into())
    }

    /// One line saying what went wrong.
    pub fn message(&self) -> String {
        match self {
            Error::Denied(m) => format!("denied: {m}"),
            Error::NotFound(m) => format!("not found: {m}"),
            Error::Unreachable(m) => format!("unreachable: {m}"),
            Error::Docker(d) => format!("docker answered {}: {}", d.status, d.message),
            Error::Invalid(m) => format!("invalid: {m}"),
            Error::Timeout(m) => format!("timeout: {m}"),
            Error::Failed(m) => format!("failed: {m}"),
        }
    }

    /// The WIT case name: `denied`, `not-found`, `unreachable`, `docker`, `invalid`,
    /// `timeout` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Denied(_) => "denied",
            Error::NotFound(_) => "not-found",
            Error::Unreachable(_) => "unreachable",
            Error::Docker(_) => "docker",
            Error::Invalid(_) => "invalid",
            Error::Timeout(_) => "timeout",
            Error::Failed(_) => "failed",
        }
    }

    /// Whether the policy refused the call.
    pub fn is_denied(&self) -> bool {
        matches!(self, Error::Denied(_))
    }
}

impl Event {
    /// The event's text input: the manual input, or the webhook body as UTF-8 (empty
    /// for the other kinds).
    pub fn input(&self) -> String {
        match self {
            Event::Manual(m) => m.input.clone(),
            Event::Webhook(w) => String::from_utf8_lossy(&w.body).into_owned(),
            Event::Cron(_) | Event::Docker(_) | Event::Run(_) => String::new(),
        }
    }
}
