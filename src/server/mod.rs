//! Every listener Capstan opens — the API with its webhooks, each Docker API proxy — is
//! served by this module, so that what a stranger can hold open is bounded in one place.
//!
//! Anyone who can reach a listener can open connections and send bytes slowly, or not
//! at all. Without bounds, 1,100 connections that never finish a request head use up a
//! process's 1,024 file descriptors and nothing else is served. Here:
//!
//! - **header timeout**: a connection has `header_timeout` from being accepted (and,
//!   when kept alive, from the first byte of each next request) to deliver a complete
//!   request head (a TLS handshake included); then it is closed.
//! - **body timeout**: while a request body is read, a pause longer than `body_timeout`
//!   ends it with an error the handler answers ([`BodyError::Timeout`]).
//! - **idle timeout**: a kept-alive connection with no request in progress is closed after
//!   `idle_timeout`.
//! - **connection cap and load shedding**: the process holds at most `max_connections`
//!   client connections (by default what the open-file limit leaves after a reserve for
//!   the engine's own files and upstream connections). At the cap, each new connection
//!   closes the connection that has had no request in progress the longest (one still
//!   sending its head, or idle between requests), so `/healthz` and authenticated calls
//!   on fresh connections are served however many half-open ones a client holds. When
//!   every connection has a request in progress, new ones wait in the kernel's backlog
//!   until one ends. An `accept` that fails for want of file descriptors sheds the same
//!   way and retries after a pause, instead of spinning.
//! - **pre-auth body budget** ([`budget`]): bodies read before their request is
//!   authenticated (webhook deliveries, verified by a signature over the body) share one
//!   byte budget; past it they are answered 503 with `Retry-After`.
//!
//! Upgraded connections (a proxied `docker attach` or `exec`) leave this module's
//! accounting once the upgrade is done: they were authorised by the policy first.
//!
//! [`raise_open_file_limit`] lifts the soft `RLIMIT_NOFILE` to the hard limit when a
//! server process starts, so the default cap is as high as the system allows.

pub mod budget;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};

pub use budget::PreauthBudget;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Default time to deliver a complete request head.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default longest pause while a request body is read.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a kept-alive connection may wait for its next request.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default budget for request bodies read before authentication: the largest webhook
/// body a hook may accept (`max_body` at most 64 MiB) fits.
pub const DEFAULT_PREAUTH_BODY_BUDGET: u64 = 64 << 20;
/// How long requests in progress may go on once a server stops.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The default connection cap never goes beyond this, however high the open-file limit
/// (each idle connection still costs memory).
pub const MAX_DEFAULT_CONNECTIONS: usize = 16_384;
/// File descriptors kept back from client connections for the engine's own files
/// (database, plugins) and upstream connections: a quarter of the limit, at most this.
pub const RESERVED_FILES: u64 = 256;

/// The `[server]` settings, resolved: every listener of a process shares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Time to deliver a complete request head (and TLS handshake).
    pub header_timeout: Duration,
    /// Longest pause while a request body is read.
    pub body_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Client connections open at once; `None`: derived from the open-file limit.
    pub max_connections: Option<usize>,
    /// Bytes of request bodies read before authentication, across all requests.
    pub preauth_body_budget: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: None,
            preauth_body_budget: DEFAULT_PREAUTH_BODY_BUDGET,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "server.max_connections = {configured} leaves too few of this process's {limit} open files for the engine itself (at most {most} with this limit): lower it, or raise the open-file limit (`ulimit -n`, systemd `LimitNOFILE=`)"
    )]
    TooManyConnections {
        configured: usize,
        limit: u64,
        most: usize,
    },
}

/// The connection cap for a process allowed `open_files` descriptors: the configured
/// one if it leaves the reserve, else the default from the limit.
pub fn connection_cap(configured: Option<usize>, open_files: u64) -> Result<usize, ServerError> {
    let reserve = (open_files / 4).min(RESERVED_FILES);
    let most = usize::try_from(open_files.saturating_sub(reserve))
        .unwrap_or(usize::MAX)
        .max(1);
    match configured {
        Some(n) if n > most => Err(ServerError::TooManyConnections {
            configured: n,
            limit: open_files,
            most,
        }),
        Some(n) => Ok(n),
        None => Ok(most.min(MAX_DEFAULT_CONNECTIONS)),
    }
}

/// The soft and hard `RLIMIT_NOFILE` of this process.
pub fn open_file_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, which lives on our stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Raises the soft open-file limit to the hard one (capped at 2^20 when the hard limit
/// is unlimited, which Linux refuses as a soft limit). Returns the soft limit in force
/// afterwards; when raising fails the old one stays, and that is logged.
pub fn raise_open_file_limit() -> u64 {
    let (soft, hard) = match open_file_limit() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit; assuming 1024");
            return 1024;
        }
    };
    let target = if hard == libc::RLIM_INFINITY {
        1 << 20
    } else {
        hard
    };
    if soft >= target {
        tracing::debug!(soft, hard, "open-file limit");
        return soft;
    }
    let lim = libc::rlimit {
        rlim_cur: target,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct it is given, which lives on our stack.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
        return soft;
    }
    tracing::debug!(
        from = soft,
        to = target,
        hard,
        "raised the soft open-file limit"
    );
    target
}

/// The part of [`ServerConfig`] each connection applies.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header: Duration,
    body: Duration,
    idle: Duration,
}

/// The listeners of one process: their timeouts, and the connections they hold under
/// one cap. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

struct Shared {
    timeouts: Timeouts,
    cap: usize,
    registry: Mutex<Registry>,
    /// Notified whenever a connection closes.
    closed: Notify,
    epoch: Instant,
    shed_total: AtomicU64,
    /// When the cap was last reported (ms since `epoch`), so a flood logs once a minute.
    last_report: AtomicU64,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    open: HashMap<u64, Arc<ConnState>>,
    /// Connections told to close that have not closed yet.
    shedding: usize,
}

impl Server {
    /// Servers for a process with the open-file limit it has now (call
    /// [`raise_open_file_limit`] first).
    pub fn new(config: &ServerConfig) -> Result<Server, ServerError> {
        let open_files = open_file_limit().map(|(soft, _)| soft).unwrap_or(1024);
        let cap = connection_cap(config.max_connections, open_files)?;
        tracing::debug!(open_files, max_connections = cap, "connection cap");
        Ok(Self::with_cap(config, cap))
    }

    fn with_cap(config: &ServerConfig, cap: usize) -> Server {
        Server {
            shared: Arc::new(Shared {
                timeouts: Timeouts {
                    header: config.header_timeout,
                    body: config.body_timeout,
                    idle: config.idle_timeout,
                },
                cap: cap.max(1),
                registry: Mutex::default(),
                closed: Notify::new(),
                epoch: Instant::now(),
                shed_total: AtomicU64::new(0),
                last_report: AtomicU64::new(0),
            }),
        }
    }

    /// The connection cap in force.
    pub fn max_connections(&self) -> usize {
        self.shared.cap
    }

    /// Client connections open now (those being shed not counted).
    pub fn open_connections(&self) -> usize {
        let r = lock(&self.shared.registry);
        r.open.len() - r.shedding
    }

    fn register(&self) -> ConnHandle {
        let state = Arc::new(ConnState {
            active: AtomicUsize::new(0),
            // A new connection owes its first request head.
            in_head: AtomicBool::new(true),
            since_ms: AtomicU64::new(self.now_ms()),
            shedding: AtomicBool::new(false),
            shed: Notify::new(),
            changed: Notify::new(),
            epoch: self.shared.epoch,
        });
        let mut r = lock(&self.shared.registry);
        let id = r.next_id;
        r.next_id += 1;
        r.open.insert(id, state.clone());
        ConnHandle {
            server: self.clone(),
            id,
            state,
        }
    }

    fn now_ms(&self) -> u64 {
        self.shared.epoch.elapsed().as_millis() as u64
    }

    /// Tells the connection that has had no request in progress the longest to close.
    /// False when every connection has a request in progress.
    fn shed_one(&self) -> bool {
        let victim = {
            let mut r = lock(&self.shared.registry);
            let victim = r
                .open
                .values()
                .filter(|c| !c.shedding.load(Ordering::SeqCst))
                .filter(|c| c.active.load(Ordering::SeqCst) == 0)
                .min_by_key(|c| c.since_ms.load(Ordering::SeqCst))
                .cloned();
            if let Some(v) = &victim {
                v.shedding.store(true, Ordering::SeqCst);
                r.shedding += 1;
            }
            victim
        };
        let Some(v) = victim else {
            return false;
        };
        v.shed.notify_one();
        let total = self.shared.shed_total.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.now_ms();
        let last = self.shared.last_report.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 60_000)
            && self
                .shared
                .last_report
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                max_connections = self.shared.cap,
                shed_so_far = total,
                "connection limit reached: closing connections that have no request in progress (server.max_connections)"
            );
        }
        true
    }

    /// Waits until the process holds fewer connections than the cap: sheds one with no
    /// request in progress, or waits for one to close. Resolves at once below the cap.
    async fn room(&self) {
        loop {
            let closed = self.shared.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.open_connections() < self.shared.cap || self.shed_one() {
                return;
            }
            closed.await;
        }
    }

    /// Accepts clients on `listener` until `shutdown` resolves, serving each connection
    /// (after a TLS handshake when `tls` is given) with the service `make` builds for its
    /// peer. At shutdown, stops accepting, lets requests in progress finish (for up to
    /// [`SHUTDOWN_GRACE`]) and returns when every connection has closed.
    pub async fn serve<M, S, B>(
        &self,
        listener: Listener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        make: M,
        shutdown: impl Future<Output = ()>,
    ) where
        M: Fn(&str) -> S,
        S: hyper::service::Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                () = self.room() => {}
            }
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((io, peer)) => {
                    let handle = self.register();
                    let service = make(&peer);
                    tasks.spawn(connection(
                        io,
                        peer,
                        tls.clone(),
                        handle,
                        self.shared.timeouts,
                        service,
                        stop_rx.clone(),
                    ));
                }
                Err(e) if out_of_files(&e) => {
                    // The listening socket stays readable: retrying at once would spin.
                    let shed = self.shed_one();
                    tracing::warn!(error = %e, shed, "accept failed: out of file descriptors");
                    let pause = if shed { 10 } else { 100 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Err(e) => {
                    // A connection that failed before it was accepted (reset, aborted).
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        let _ = stop_tx.send(true);
        // Idle connections close at once; requests in progress get a grace period (a
        // `docker events` stream would never end by itself).
        let grace = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { break },
                _ = &mut grace => {
                    tracing::debug!(open = tasks.len(), "connections still open at shutdown are closed");
                    tasks.shutdown().await;
                    break;
                }
            }
        }
        if let Listener::Unix(_, p) = &listener {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn out_of_files(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the accept loop and a connection's own task know about it.
struct ConnState {
    /// Requests in progress: from a complete head until the response is written.
    active: AtomicUsize,
    /// With no request in progress: a head is owed or being read (a new connection, or
    /// bytes of a next one arrived), rather than waiting idle.
    in_head: AtomicBool,
    /// Start of the current phase (head or idle), ms since `epoch`.
    since_ms: AtomicU64,
    shedding: AtomicBool,
    /// Tells the connection's task to close it now.
    shed: Notify,
    /// Wakes the connection's watchdog when its phase changes.
    changed: Notify,
    epoch: Instant,
}

impl ConnState {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// When the connection is to be closed if nothing changes; `None` while a request
    /// is in progress (its body has its own timeout; a response may stream for long).
    fn deadline(&self, t: &Timeouts) -> Option<(Instant, &'static str)> {
        if self.active.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = self.epoch + Duration::from_millis(self.since_ms.load(Ordering::SeqCst));
        Some(if self.in_head.load(Ordering::SeqCst) {
            (since + t.header, "server.header_timeout")
        } else {
            (since + t.idle, "server.idle_timeout")
        })
    }

    /// Bytes arrived: on an idle connection they start the next request head.
    fn on_bytes(&self) {
        if self.active.load(Ordering::SeqCst) == 0 && !self.in_head.swap(true, Ordering::SeqCst) {
            self.since_ms.store(self.now_ms(), Ordering::SeqCst);
            self.changed.notify_one();
        }
    }

    /// Resolves when the deadline in force passes; names the setting that closed it.
    async fn expired(&self, t: &Timeouts) -> &'static str {
        loop {
            match self.deadline(t) {
                None => self.changed.notified().await,
                Some((at, setting)) => {
                    if Instant::now() >= at {
                        return setting;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.changed.notified() => {}
                    }
                }
            }
        }
    }
}

/// A connection's place in the registry; leaving it (drop) frees its slot.
struct ConnHandle {
    server: Server,
    id: u64,
    state: Arc<ConnState>,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        {
            let mut r = lock(&self.server.shared.registry);
            r.open.remove(&self.id);
            if self.state.shedding.load(Ordering::SeqCst) {
                r.shedding -= 1;
            }
        }
        self.server.shared.closed.notify_waiters();
    }
}

/// Marks a request in progress on its connection until dropped (with the response body,
/// once it has been written).
struct Busy(Arc<ConnState>);

impl Busy {
    fn new(state: &Arc<ConnState>) -> Busy {
        state.active.fetch_add(1, Ordering::SeqCst);
        state.in_head.store(false, Ordering::SeqCst);
        state.changed.notify_one();
        Busy(state.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.in_head.store(false, Ordering::SeqCst);
            self.0.since_ms.store(self.0.now_ms(), Ordering::SeqCst);
        }
        self.0.changed.notify_one();
    }
}

/// A client connection accepted by a listener.
pub trait ClientStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ClientStream for T {}
pub type BoxStream = Box<dyn ClientStream>;

/// A bound listening socket.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    /// The socket and its path (removed when serving ends).
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    /// The next client and how logs name it.
    async fn accept(&self) -> std::io::Result<(BoxStream, String)> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(s, a)| {
                let _ = s.set_nodelay(true);
                (Box::new(s) as BoxStream, a.to_string())
            }),
            Listener::Unix(l, p) => l
                .accept()
                .await
                .map(|(s, _)| (Box::new(s) as BoxStream, format!("unix:{}", p.display()))),
        }
    }
}

/// The client stream, telling its connection's state when bytes arrive.
struct Watched {
    io: BoxStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_bytes();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Serves one connection until it ends, is shed, times out, or the server stops.
async fn connection<S, B>(
    io: BoxStream,
    peer: String,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handle: ConnHandle,
    timeouts: Timeouts,
    service: S,
    mut stop: watch::Receiver<bool>,
) where
    S: hyper::service::Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let state = handle.state.clone();
    let io: BoxStream = Box::new(Watched {
        io,
        state: state.clone(),
    });
    let io: BoxStream = match tls {
        None => io,
        Some(acceptor) => tokio::select! {
            r = acceptor.accept(io) => match r {
                Ok(tls) => Box::new(tls),
                Err(e) => {
                    tracing::info!(client = %peer, error = %e, "TLS handshake failed");
                    return;
                }
            },
            _ = state.shed.notified() => return,
            setting = state.expired(&timeouts) => {
                tracing::info!(client = %peer, "TLS handshake not finished within {setting}");
                return;
            }
            _ = stop.wait_for(|s| *s) => return,
        },
    };
    let service = Tracked {
        inner: service,
        state: state.clone(),
        body_timeout: timeouts.body,
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Head and idle deadlines are this module's (they are told apart; hyper's header
    // timer would also count the idle wait between requests).
    builder.timer(TokioTimer::new()).header_read_timeout(None);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(client = %peer, error = %e, "client connection ended");
                }
                return;
            }
            _ = state.shed.notified() => {
                tracing::debug!(client = %peer, "connection closed to make room (server.max_connections)");
                return;
            }
            setting = state.expired(&timeouts) => {
                tracing::debug!(client = %peer, "connection closed: nothing within {setting}");
                return;
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The service of one connection: marks each request in progress until its response
/// has been written, and gives its body the body timeout.
struct Tracked<S> {
    inner: S,
    state: Arc<ConnState>,
    body_timeout: Duration,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    type Response = Response<WithBusy<B>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Response<WithBusy<B>>, S::Error>> + Send + 'static>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let busy = Busy::new(&self.state);
        let timeout = self.body_timeout;
        let fut = self
            .inner
            .call(req.map(|body| RequestBody::new(body, timeout)));
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| WithBusy { inner, _busy: busy }))
        })
    }
}

/// A response body that keeps its request marked in progress until it is dropped.
pub struct WithBusy<B> {
    inner: B,
    _busy: Busy,
}

impl<B: Body + Unpin> Body for WithBusy<B> {
    type Data = B::Data;
    type Error = B::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(
        "the request body stopped arriving: nothing for {0:?} (server.body_timeout); send it without pauses"
    )]
    Timeout(Duration),
    #[error(transparent)]
    Read(#[from] hyper::Error),
}

/// A request body as handlers receive it: hyper's, with the body timeout.
pub struct RequestBody {
    inner: Incoming,
    timeout: Duration,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl RequestBody {
    fn new(inner: Incoming, timeout: Duration) -> RequestBody {
        RequestBody {
            inner,
            timeout,
            pause: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.pause = None;
                Poll::Ready(r.map(|r| r.map_err(BodyError::from)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let pause = this
                    .pause
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match pause.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Timeout(timeout)))),
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
    fn the_default_cap_leaves_a_reserve_of_the_open_file_limit() {
        assert_eq!(connection_cap(None, 1024).unwrap(), 768);
        assert_eq!(connection_cap(None, 256).unwrap(), 192);
        assert_eq!(
            connection_cap(None, 1 << 20).unwrap(),
            MAX_DEFAULT_CONNECTIONS
        );
        assert_eq!(connection_cap(Some(500), 1024).unwrap(), 500);
        let err = connection_cap(Some(1000), 1024).unwrap_err().to_string();
        assert!(
            err.contains("server.max_connections") && err.contains("at most 768"),
            "{err}"
        );
    }

    fn server(cap: usize) -> Server {
        Server::with_cap(&ServerConfig::default(), cap)
    }

    #[tokio::test]
    async fn shedding_closes_the_connection_longest_without_a_request_and_spares_busy_ones() {
        let s = server(3);
        let oldest = s.register();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let busy_older = s.register();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let younger = s.register();
        // The middle one has a request in progress; it is older than `younger`.
        let _busy = Busy::new(&busy_older.state);
        busy_older.state.since_ms.store(0, Ordering::SeqCst);

        assert!(s.shed_one());
        assert!(oldest.state.shedding.load(Ordering::SeqCst));
        assert_eq!(s.open_connections(), 2);
        assert!(s.shed_one());
        assert!(younger.state.shedding.load(Ordering::SeqCst));
        assert!(!busy_older.state.shedding.load(Ordering::SeqCst));
        // Only the busy one is left: nothing more to shed.
        assert!(!s.shed_one());
        drop(oldest);
        drop(younger);
        assert_eq!(s.open_connections(), 1);
    }

    #[tokio::test]
    async fn at_the_cap_room_is_made_by_shedding_or_by_waiting_for_a_close() {
        let s = server(1);
        let only = s.register();
        let _busy = Busy::new(&only.state);
        // Every connection busy: room waits until one closes.
        let waiting = tokio::spawn({
            let s = s.clone();
            async move { s.room().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(_busy);
        drop(only);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("room after a close")
            .unwrap();
        // An idle one is shed at once.
        let idle = s.register();
        tokio::time::timeout(Duration::from_secs(5), s.room())
            .await
            .expect("room by shedding");
        assert!(idle.state.shedding.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_connection_owes_a_head_within_the_header_timeout_and_idles_within_the_idle_timeout()
    {
        let t = Timeouts {
            header: Duration::from_millis(50),
            body: Duration::from_secs(30),
            idle: Duration::from_millis(100),
        };
        let s = server(4);
        let c = s.register();
        let start = Instant::now();
        assert_eq!(c.state.expired(&t).await, "server.header_timeout");
        assert!(start.elapsed() >= t.header);
        // A request, then idle: the idle timeout applies.
        drop(Busy::new(&c.state));
        let start = Instant::now();
        assert_eq!(c.state.expired(&t).await, "server.idle_timeout");
        assert!(start.elapsed() >= t.idle);
        // Bytes of a next request: the header timeout again, from the first byte.
        c.state.on_bytes();
        assert_eq!(c.state.expired(&t).await, "server.header_timeout");
        // While a request is in progress nothing expires.
        let busy = Busy::new(&c.state);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), c.state.expired(&t))
                .await
                .is_err()
        );
        drop(busy);
    }
}
