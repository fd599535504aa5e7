//! Kept-alive HTTP/1.1 connections to one daemon ([`DockerClient`]), and one client per
//! device for the engine ([`Pool`]).
//!
//! A [`DockerClient`] owns a transport and the HTTP connections opened through it. A
//! request takes an idle connection (most recently used first), or opens a new one while
//! fewer than the transport's limit are open (8 channels for an SSH session, see
//! [`SSH_CHANNELS_PER_SESSION`](super::SSH_CHANNELS_PER_SESSION)), or waits for one to
//! come back. A connection comes back once its response body has been read to the end;
//! an upgraded connection (attach, exec) leaves the pool with its caller and frees its
//! slot when dropped. Idle connections close after `idle_timeout`, by a reaper task that
//! runs only while some are kept: an SSH device whose session is idle costs its session
//! and nothing more (about 110 KB in `capstan serve`, `cargo bench --bench fleet`).
//!
//! The same connections serve `bollard` (through a custom transport) and raw requests
//! ([`DockerClient::send`]), which the proxy mode uses to forward any request, upgrades
//! included (`hyper::upgrade::on(response)`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bollard::{API_DEFAULT_VERSION, ClientVersion, Docker};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HOST, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::{
    Body, BoxError, ConnectError, ConnectOptions, Guarded, HostKeyPolicy, Steps, Transport,
    empty_body,
};
use crate::device::{Device, DeviceSecrets};

/// Connections to one Docker daemon, kept alive and reused; cheap to share (`Arc`).
pub struct DockerClient {
    device: Device,
    inner: Arc<Inner>,
    docker: tokio::sync::OnceCell<Docker>,
}

struct Inner {
    device: String,
    transport: Transport,
    slots: Arc<Semaphore>,
    max: usize,
    idle: Mutex<Vec<Idle>>,
    returned: Notify,
    /// Connections whose response is still being read; they come back when it ends.
    returning: AtomicUsize,
    /// Connections opened so far.
    opened: AtomicUsize,
    idle_timeout: Duration,
    request_timeout: Duration,
    /// A reaper task runs while connections are kept idle (see [`Inner::reap`]): a device
    /// whose session is idle with no kept connection has no task and no timer.
    reaping: AtomicBool,
    me: Weak<Inner>,
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

/// How often a request yields to let a just-finished connection come back before it
/// opens a new one.
const RETURN_YIELDS: usize = 8;

/// What `GET /_ping` says about the daemon.
#[derive(Debug, Clone)]
pub struct PingInfo {
    /// The daemon's (maximum) API version, from the `API-Version` header.
    pub api_version: Option<String>,
    /// `OSType` header (`linux`, `windows`).
    pub os_type: Option<String>,
    /// `Server` header, e.g. `Docker/20.10.24 (linux)`.
    pub server: Option<String>,
}

impl DockerClient {
    /// A client for `device`; connects on first use, not here.
    pub fn new(
        device: &Device,
        secrets: &DeviceSecrets,
        opts: &ConnectOptions,
        host_keys: HostKeyPolicy,
    ) -> Result<Arc<DockerClient>, ConnectError> {
        let transport = Transport::new(device, secrets, opts, host_keys)?;
        let max = transport.max_connections();
        let inner = Arc::new_cyclic(|me| Inner {
            device: device.name.clone(),
            transport,
            slots: Arc::new(Semaphore::new(max)),
            max,
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
            returning: AtomicUsize::new(0),
            opened: AtomicUsize::new(0),
            idle_timeout: opts.idle_timeout,
            request_timeout: opts.request_timeout,
            reaping: AtomicBool::new(false),
            me: me.clone(),
        });
        Ok(Arc::new(DockerClient {
            device: device.clone(),
            inner,
            docker: tokio::sync::OnceCell::new(),
        }))
    }

    /// The device record this client was built from.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Sends one request to the daemon over a pooled connection and returns the response
    /// as it arrives (the body streams). The URI may be absolute or a path
    /// (`/v1.41/containers/json`); a `Host` header is added when missing. For an upgrade
    /// (`Connection: Upgrade`, attach and exec), call `hyper::upgrade::on(response)`.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, ConnectError> {
        self.inner.send(req).await
    }

    /// `GET /_ping`: the cheapest round trip to the daemon.
    pub async fn ping(&self) -> Result<PingInfo, ConnectError> {
        self.inner.ping().await
    }

    /// A bollard client on these connections, its API version negotiated with the daemon
    /// on first use (the lower of the daemon's and bollard's).
    pub async fn docker(&self) -> Result<Docker, ConnectError> {
        self.docker
            .get_or_try_init(|| async {
                let ping = self.inner.ping().await?;
                self.bollard_for(ping.api_version.as_deref()).await
            })
            .await
            .cloned()
    }

    /// Builds the bollard client for a daemon that announced `api_version`.
    ///
    /// bollard's own `negotiate_version` asks `/v1.53/version`, which daemons older than
    /// that API refuse (400 "client version 1.53 is too new"), so the version comes from
    /// the `_ping` header, as the docker CLI does it; bollard's negotiation remains the
    /// fallback for a daemon that sends no such header.
    pub(crate) async fn bollard_for(
        &self,
        api_version: Option<&str>,
    ) -> Result<Docker, ConnectError> {
        let announced = api_version.and_then(parse_version);
        let version = match announced {
            Some(v) if v < *API_DEFAULT_VERSION => v,
            _ => *API_DEFAULT_VERSION,
        };
        let inner = self.inner.clone();
        let transport = move |req: bollard::BollardRequest| {
            let inner = inner.clone();
            async move {
                let req = req.map(|b| b.map_err(BoxError::from).boxed_unsync());
                inner.send(req).await.map_err(ConnectError::into_bollard)
            }
        };
        // The one place a bollard client is built (see clippy.toml).
        #[allow(clippy::disallowed_methods)]
        let docker = Docker::connect_with_custom_transport(
            transport,
            Some("http://docker"),
            self.inner.request_timeout.as_secs().max(1),
            &version,
        )
        .map_err(|e| ConnectError::Transport {
            device: self.inner.device.clone(),
            detail: e.to_string(),
        })?;
        if announced.is_some() {
            return Ok(docker);
        }
        let device = self.inner.device.clone();
        docker.negotiate_version().await.map_err(|e| {
            super::classify_bollard(
                &device,
                "negotiating the API version",
                self.inner.request_timeout,
                e,
            )
        })
    }

    /// Opens one connection now, recording each step, and keeps it for the next request.
    pub(crate) async fn connect_traced(&self, steps: &Steps) -> Result<(), ConnectError> {
        let permit = self
            .inner
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ConnectError::Transport {
                device: self.inner.device.clone(),
                detail: "the client is shutting down".into(),
            })?;
        let sender = self.inner.connect(permit, steps).await?;
        self.inner.put_idle(sender);
        Ok(())
    }

    pub(crate) fn transport(&self) -> &Transport {
        &self.inner.transport
    }

    /// Connections open now (busy or idle).
    pub fn open_connections(&self) -> usize {
        self.inner.max - self.inner.slots.available_permits()
    }

    /// Connections opened since the client was created (for SSH: channels).
    pub fn connections_opened(&self) -> usize {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// SSH channels opened since the client was created, by tunnel (all zero for other
    /// transports).
    pub fn ssh_channels(&self) -> super::SshChannels {
        self.inner.transport.ssh_channels()
    }

    /// Connections open and idle now.
    pub fn idle_connections(&self) -> usize {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Inner {
    async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, ConnectError> {
        self.prepare(&mut req)?;
        let mut stale = 0;
        loop {
            let (mut sender, reused) = self.checkout().await?;
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.recycle(sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // The kept connection died before the request left: use another.
                    Some(r) if reused && stale < 3 => {
                        stale += 1;
                        req = r;
                    }
                    _ => return Err(self.hyper_error(e.into_error())),
                },
            }
        }
    }

    async fn ping(self: &Arc<Self>) -> Result<PingInfo, ConnectError> {
        let req = Request::get("/_ping")
            .body(empty_body())
            .expect("static request");
        let resp = self.send(req).await?;
        let status = resp.status();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let info = PingInfo {
            api_version: header("api-version"),
            os_type: header("ostype"),
            server: header("server"),
        };
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.hyper_error(e))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(ConnectError::Daemon {
                device: self.device.clone(),
                status: status.as_u16(),
                message: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        Ok(info)
    }

    /// Origin-form URI and a `Host` header, as the daemon expects on a kept connection.
    fn prepare(&self, req: &mut Request<Body>) -> Result<(), ConnectError> {
        if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string();
            *req.uri_mut() = pq.parse().map_err(|e| ConnectError::Transport {
                device: self.device.clone(),
                detail: format!("bad request URI: {e}"),
            })?;
        }
        if !req.headers().contains_key(HOST) {
            req.headers_mut()
                .insert(HOST, HeaderValue::from_static(self.transport.host_header()));
        }
        Ok(())
    }

    /// An idle connection, or a new one, or the next one to come back.
    async fn checkout(&self) -> Result<(SendRequest<Body>, bool), ConnectError> {
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(s) = self.take_idle() {
                return Ok((s, true));
            }
            // A response read to its end a moment ago frees its connection only once the
            // connection task has noticed: give it that moment rather than open another
            // connection (for SSH, a channel and a remote process) for every call of a
            // sequential caller.
            if self.returning.load(Ordering::Acquire) > 0 {
                for _ in 0..RETURN_YIELDS {
                    tokio::task::yield_now().await;
                    if let Some(s) = self.take_idle() {
                        return Ok((s, true));
                    }
                }
            }
            if let Ok(permit) = self.slots.clone().try_acquire_owned() {
                return Ok((self.connect(permit, &Steps::default()).await?, false));
            }
            tokio::select! {
                _ = &mut returned => {}
                permit = self.slots.clone().acquire_owned() => {
                    let permit = permit.map_err(|_| ConnectError::Transport {
                        device: self.device.clone(),
                        detail: "the client is shutting down".into(),
                    })?;
                    return Ok((self.connect(permit, &Steps::default()).await?, false));
                }
            }
        }
    }

    fn take_idle(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(i) = idle.pop() {
            if !i.sender.is_closed() && i.since.elapsed() < self.idle_timeout {
                return Some(i.sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: SendRequest<Body>) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Idle {
                sender,
                since: Instant::now(),
            });
        self.returned.notify_one();
        self.start_reaper();
    }

    /// Starts the reaper unless it runs: every half `idle_timeout` (at least 0.5 s) it
    /// closes the idle connections past their time, and ends once none is kept.
    fn start_reaper(&self) {
        if self.reaping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.reaping.store(false, Ordering::Release);
            return;
        };
        let me = self.me.clone();
        let every = self.idle_timeout.max(Duration::from_secs(1)) / 2;
        rt.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match me.upgrade() {
                    Some(inner) if !inner.reap() => {}
                    _ => return,
                }
            }
        });
    }

    /// Puts the connection back once the response has been read to the end.
    fn recycle(self: &Arc<Self>, mut sender: SendRequest<Body>) {
        if sender.is_ready() {
            self.put_idle(sender);
            return;
        }
        self.returning.fetch_add(1, Ordering::AcqRel);
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let ready = sender.ready().await.is_ok();
            if let Some(inner) = me.upgrade() {
                if ready {
                    inner.put_idle(sender);
                }
                inner.returning.fetch_sub(1, Ordering::AcqRel);
            }
        });
    }

    async fn connect(
        &self,
        permit: OwnedSemaphorePermit,
        steps: &Steps,
    ) -> Result<SendRequest<Body>, ConnectError> {
        let io = self.transport.connect(steps).await?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        let io = TokioIo::new(Guarded { io, _guard: permit });
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| self.hyper_error(e))?;
        let device = self.device.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%device, "Docker connection ended: {e}");
            }
        });
        Ok(sender)
    }

    /// Maps a hyper failure to what it stands for on this transport.
    fn hyper_error(&self, e: hyper::Error) -> ConnectError {
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = src {
            if let Some(c) = s
                .downcast_ref::<std::io::Error>()
                .and_then(|io| self.transport.classify_stream_error(&self.device, io))
            {
                return c;
            }
            src = s.source();
        }
        let detail = if e.is_incomplete_message() {
            "the daemon closed the connection before answering".to_string()
        } else {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            s
        };
        ConnectError::Transport {
            device: self.device.clone(),
            detail,
        }
    }

    /// Closes the idle connections past their time. Returns true, the reaper ending,
    /// when none is left: the flag is cleared under the lock [`Inner::put_idle`] pushes
    /// under, so a connection kept after this starts a new reaper.
    fn reap(&self) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|i| !i.sender.is_closed() && i.since.elapsed() < self.idle_timeout);
        if idle.is_empty() {
            self.reaping.store(false, Ordering::Release);
            return true;
        }
        false
    }
}

fn parse_version(v: &str) -> Option<ClientVersion> {
    let (a, b) = v.trim().split_once('.')?;
    Some(ClientVersion {
        major_version: a.parse().ok()?,
        minor_version: b.parse().ok()?,
    })
}

/// What [`Pool::stats`] counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// SSH sessions open (at most one per SSH device).
    pub ssh_sessions: usize,
    /// SSH channels open: one per Docker connection (streamlocal or `dial-stdio`), busy
    /// or idle.
    pub ssh_channels: usize,
}

/// One [`DockerClient`] per device, created on first use and kept while the device's
/// record is unchanged (an edited device gets a new client; its old connections close
/// when their last user lets go). Connection checks run here too, at most
/// [`ConnectOptions::check_concurrency`] at once.
pub struct Pool {
    opts: ConnectOptions,
    clients: Mutex<HashMap<Uuid, Arc<DockerClient>>>,
    checks: Semaphore,
    /// The last checks of each stored device.
    history: super::history::CheckHistory,
}

impl Pool {
    pub fn new(opts: ConnectOptions) -> Pool {
        Pool {
            checks: Semaphore::new(opts.check_concurrency.max(1)),
            opts,
            clients: Mutex::new(HashMap::new()),
            history: Default::default(),
        }
    }

    /// The last checks of each stored device (recorded by the stored-device check).
    pub fn history(&self) -> &super::history::CheckHistory {
        &self.history
    }

    /// Checks `device` once one of the engine's check slots is free (a check's timings
    /// start then): over a fresh connection, or with [`CheckOptions::pooled`] over this
    /// pool's connection to it (`secrets` then serve only when a new client is built).
    ///
    /// [`CheckOptions::pooled`]: super::CheckOptions::pooled
    pub async fn check(
        &self,
        device: &Device,
        secrets: &DeviceSecrets,
        opts: &super::CheckOptions,
    ) -> super::CheckReport {
        // The semaphore is never closed.
        let _slot = self.checks.acquire().await.ok();
        if opts.pooled {
            let client = self.client(device, || Ok(secrets.clone()));
            super::check::run_pooled_check(device, client, opts).await
        } else {
            super::run_check(device, secrets, opts).await
        }
    }

    pub fn options(&self) -> &ConnectOptions {
        &self.opts
    }

    /// The client for `device`; `secrets` is called only when a new client is built.
    pub fn client(
        &self,
        device: &Device,
        secrets: impl FnOnce() -> Result<DeviceSecrets, ConnectError>,
    ) -> Result<Arc<DockerClient>, ConnectError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&device.id).filter(|c| c.device == *device) {
            return Ok(c.clone());
        }
        let client = DockerClient::new(device, &secrets()?, &self.opts, HostKeyPolicy::PinnedOnly)?;
        clients.insert(device.id, client.clone());
        Ok(client)
    }

    /// A bollard client for `device` (see [`DockerClient::docker`]).
    pub async fn docker(
        &self,
        device: &Device,
        secrets: impl FnOnce() -> Result<DeviceSecrets, ConnectError>,
    ) -> Result<Docker, ConnectError> {
        self.client(device, secrets)?.docker().await
    }

    /// SSH sessions and channels open now, over the clients this pool holds (for
    /// `/metrics`). A session being connected or checked at this very moment counts as
    /// open when it has channels.
    pub fn stats(&self) -> PoolStats {
        let clients: Vec<Arc<DockerClient>> = self
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut stats = PoolStats::default();
        for c in clients {
            if let Transport::Ssh(t) = &c.inner.transport {
                let channels = c.open_connections();
                stats.ssh_channels += channels;
                if t.has_session().unwrap_or(channels > 0) {
                    stats.ssh_sessions += 1;
                }
            }
        }
        stats
    }

    /// Drops the client of a removed or edited device.
    pub fn forget(&self, id: Uuid) {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new(ConnectOptions::default())
    }
}
