//! Docker connections: the one place that opens a connection to a Docker daemon.
//!
//! Everything in Capstan that talks to Docker (API checks, the CLI, later the proxy mode
//! and the plugin host functions) gets its connection here, so host key verification,
//! credentials from the vault, timeouts, pooling and error classification are written
//! once. Three transports, one file each:
//!
//! - [`local`]: a unix socket or `tcp://` address (`device.docker_host`, else
//!   `[docker] host` / `DOCKER_HOST`, else `/var/run/docker.sock`);
//! - [`ssh`]: one russh session per device, one channel per HTTP connection: a
//!   `direct-streamlocal@openssh.com` channel straight to the remote Docker socket when
//!   the server allows it, else `docker system dial-stdio` run on the remote host
//!   (optionally through `sudo -n`, with a custom socket path, with Docker-only
//!   credentials); see [`SshTunnel`];
//! - [`tls`]: `tcp://host:2376` with the CA, client certificate and key from the vault,
//!   kept in memory only.
//!
//! On top of any transport, [`DockerClient`] (in [`pool`]) keeps HTTP/1.1 connections
//! alive and reuses them, and hands out both a `bollard::Docker` and a raw
//! request/response interface (for proxying, including upgrades for attach and exec).
//! [`Pool`] keeps one client per device for the engine. [`check`] runs a timed
//! connection check and says precisely what failed. [`daemon`] asks a daemon which
//! container a reference means, for the policy's container scope.

pub mod check;
pub mod daemon;
mod error;
pub mod history;
mod local;
pub mod pool;
mod ssh;
pub(crate) mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use crate::device::SshTunnel;
use crate::device::{Device, DeviceKind, DeviceSecrets, IpFamily};

pub use check::{CheckFailure, CheckOptions, CheckReport, DockerFacts, HostKeyReport, run_check};
pub use error::{ConnectError, classify_bollard};
pub use pool::{DockerClient, PingInfo, Pool};

/// The request and response body type of raw requests: any boxed body of bytes.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An empty request body.
pub fn empty_body() -> Body {
    use http_body_util::BodyExt;
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A complete request body.
pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// sshd's default `MaxSessions` is 10 channels per connection. One SSH session per device
/// carries at most this many concurrent Docker connections (each a channel running
/// `docker system dial-stdio`), leaving two channels to spare; requests beyond it wait
/// for a connection to come free. A long stream (logs with follow, events) holds its
/// channel while it lasts.
pub const SSH_CHANNELS_PER_SESSION: usize = 8;

/// How many HTTP connections a local or TLS device keeps at most.
pub const DIRECT_CONNECTIONS: usize = 32;

/// Connection settings shared by every device.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Limit for establishing a connection: name resolution, TCP connect, SSH handshake
    /// and authentication, channel open or TLS handshake.
    pub connect_timeout: Duration,
    /// Limit for a Docker API call to answer (bollard's request timeout; streams may then
    /// run for as long as they deliver).
    pub request_timeout: Duration,
    /// Idle HTTP connections (and their SSH channels) older than this are closed.
    pub idle_timeout: Duration,
    /// After a failed connection attempt to a device, no new attempt is made for this
    /// long; the pause doubles with every further failure, up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// The ssh-agent socket for agent auth and agent forwarding (the engine's settings
    /// take it from `SSH_AUTH_SOCK`; default none).
    pub agent_socket: Option<PathBuf>,
    /// The address for local devices without their own (the engine's settings take it
    /// from `DOCKER_HOST`; default none: `/var/run/docker.sock`).
    pub docker_host_env: Option<String>,
    /// How SSH devices without their own setting reach the remote daemon (the engine's
    /// settings take it from `CAPSTAN_SSH_TUNNEL`; default [`SshTunnel::Auto`]): a
    /// streamlocal channel straight to the socket, or `docker system dial-stdio`.
    pub ssh_tunnel: SshTunnel,
    /// Connection checks run at once by the engine ([`Pool::check`]); more wait for a
    /// slot (the engine's settings take it from `[docker] check_concurrency`).
    pub check_concurrency: usize,
}

/// How long establishing a connection may take, unless `[docker] connect_timeout` says.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a Docker API call may take to answer, unless `[docker] request_timeout` says.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an idle connection is kept, unless `[docker] idle_timeout` says.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Connection checks the engine runs at once, unless `[docker] check_concurrency` says.
pub const DEFAULT_CHECK_CONCURRENCY: usize = 16;
/// The most checks at once the engine (and `capstan device check --concurrency`) allows.
pub const MAX_CHECK_CONCURRENCY: usize = 1024;

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            agent_socket: None,
            docker_host_env: None,
            ssh_tunnel: SshTunnel::Auto,
            check_concurrency: DEFAULT_CHECK_CONCURRENCY,
        }
    }
}

impl ConnectOptions {
    /// The pause before the next attempt after `failures` failed attempts in a row.
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(16);
        self.backoff_base
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// What to do about the SSH server's host key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostKeyPolicy {
    /// Accept only the key pinned on the device; refuse when none is pinned.
    #[default]
    PinnedOnly,
    /// Like `PinnedOnly`, but when no key is pinned accept the presented one (trust on
    /// first use). The caller records the key: see [`CheckReport::host_key`].
    TrustOnFirstUse,
}

/// How many SSH channels a client has opened, by tunnel (see [`SshTunnel`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SshChannels {
    /// `direct-streamlocal@openssh.com` channels straight to the remote socket.
    pub streamlocal: usize,
    /// Channels running `docker system dial-stdio`.
    pub dial_stdio: usize,
}

/// One timed step of establishing a connection or of a check.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Step {
    #[schema(value_type = String)]
    pub step: std::borrow::Cow<'static, str>,
    pub ms: f64,
}

/// Records the steps of a connection as they succeed, and which one is under way (the one
/// that failed or timed out, if the connection did not succeed).
#[derive(Debug, Default)]
pub struct Steps {
    inner: Mutex<StepsInner>,
}

#[derive(Debug, Default)]
struct StepsInner {
    done: Vec<Step>,
    current: Option<&'static str>,
}

impl Steps {
    /// Runs one step, recording its duration when it succeeds.
    pub(crate) async fn run<T, E>(
        &self,
        name: &'static str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        self.lock().current = Some(name);
        let start = Instant::now();
        let r = fut.await;
        if r.is_ok() {
            let ms = crate::millis(start.elapsed());
            let mut inner = self.lock();
            inner.done.push(Step {
                step: name.into(),
                ms,
            });
            inner.current = None;
        }
        r
    }

    /// The step under way: after a failure, the step that failed.
    pub fn current(&self) -> Option<&'static str> {
        self.lock().current
    }

    /// The steps that succeeded, in order.
    pub fn done(&self) -> Vec<Step> {
        self.lock().done.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StepsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs `fut` within `limit`; on expiry, a timeout error naming the step under way.
pub(crate) async fn within<T>(
    device: &str,
    limit: Duration,
    steps: &Steps,
    fut: impl Future<Output = Result<T, ConnectError>>,
) -> Result<T, ConnectError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout {
            device: device.to_string(),
            step: steps.current().unwrap_or("connecting"),
            after: limit,
        }),
    }
}

/// A byte stream to a Docker daemon, whatever carries it.
pub(crate) trait IoStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> IoStream for T {}

pub(crate) type Io = Box<dyn IoStream>;

/// The transports, chosen by the device kind.
pub(crate) enum Transport {
    Local(local::LocalTransport),
    Ssh(Box<ssh::SshTransport>),
    Tls(tls::TlsTransport),
}

impl Transport {
    pub(crate) fn new(
        device: &Device,
        secrets: &DeviceSecrets,
        opts: &ConnectOptions,
        host_keys: HostKeyPolicy,
    ) -> Result<Transport, ConnectError> {
        Ok(match device.kind {
            DeviceKind::Local => Transport::Local(local::LocalTransport::new(device, opts)?),
            DeviceKind::Ssh => Transport::Ssh(Box::new(ssh::SshTransport::new(
                device, secrets, opts, host_keys,
            )?)),
            DeviceKind::Tls => Transport::Tls(tls::TlsTransport::new(device, secrets, opts)?),
        })
    }

    /// Opens a new byte stream to the daemon.
    pub(crate) async fn connect(&self, steps: &Steps) -> Result<Io, ConnectError> {
        match self {
            Transport::Local(t) => t.connect(steps).await,
            Transport::Ssh(t) => t.connect(steps).await,
            Transport::Tls(t) => t.connect(steps).await,
        }
    }

    /// How many connections a client may hold to this daemon.
    pub(crate) fn max_connections(&self) -> usize {
        match self {
            Transport::Ssh(_) => SSH_CHANNELS_PER_SESSION,
            _ => DIRECT_CONNECTIONS,
        }
    }

    /// The host key the SSH server presented on the last handshake.
    pub(crate) fn presented_host_key(&self) -> Option<russh::keys::PublicKey> {
        match self {
            Transport::Ssh(t) => t.presented_host_key(),
            _ => None,
        }
    }

    /// Whether the SSH login succeeded on the last attempt (the server is who it claims
    /// to be as far as the handshake can tell, and the credentials work).
    pub(crate) fn ssh_authenticated(&self) -> bool {
        match self {
            Transport::Ssh(t) => t.authenticated(),
            _ => false,
        }
    }

    /// SSH channels opened so far, by how they reach the daemon.
    pub(crate) fn ssh_channels(&self) -> SshChannels {
        match self {
            Transport::Ssh(t) => {
                let (streamlocal, dial_stdio) = t.channels_opened();
                SshChannels {
                    streamlocal,
                    dial_stdio,
                }
            }
            _ => SshChannels::default(),
        }
    }

    /// The HTTP `Host` header sent to the daemon.
    pub(crate) fn host_header(&self) -> &'static str {
        "docker"
    }

    /// Maps an I/O failure on an established stream to the error it stands for.
    pub(crate) fn classify_stream_error(
        &self,
        device: &str,
        e: &std::io::Error,
    ) -> Option<ConnectError> {
        match self {
            Transport::Ssh(t) => t.classify_stream_error(e),
            Transport::Tls(t) => tls::classify_stream_error(device, &t.addr_label(), e),
            Transport::Local(_) => None,
        }
    }
}

/// Resolves `host:port` to addresses of the wanted family.
pub(crate) async fn resolve(
    device: &str,
    host: &str,
    port: u16,
    family: IpFamily,
) -> Result<Vec<SocketAddr>, ConnectError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let all: Vec<SocketAddr> = match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| ConnectError::Resolve {
                device: device.to_string(),
                host: host.to_string(),
                detail: e.to_string(),
            })?
            .collect(),
    };
    if all.is_empty() {
        return Err(ConnectError::Resolve {
            device: device.to_string(),
            host: host.to_string(),
            detail: "no addresses".into(),
        });
    }
    let wanted: Vec<SocketAddr> = all
        .iter()
        .copied()
        .filter(|a| match family {
            IpFamily::Any => true,
            IpFamily::Ipv4 => a.is_ipv4(),
            IpFamily::Ipv6 => a.is_ipv6(),
        })
        .collect();
    if wanted.is_empty() {
        let found = all
            .iter()
            .map(|a| a.ip().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ConnectError::NoAddressInFamily {
            device: device.to_string(),
            host: host.to_string(),
            family: match family {
                IpFamily::Ipv6 => "IPv6",
                _ => "IPv4",
            },
            found,
        });
    }
    Ok(wanted)
}

/// Connects to the first address that answers.
pub(crate) async fn connect_tcp(
    device: &str,
    addrs: &[SocketAddr],
    service: &'static str,
) -> Result<tokio::net::TcpStream, ConnectError> {
    let mut last = None;
    for a in addrs {
        match tokio::net::TcpStream::connect(a).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some((a, e)),
        }
    }
    let (a, e) = last.expect("resolve returns at least one address");
    Err(ConnectError::Unreachable {
        device: device.to_string(),
        addr: a.to_string(),
        detail: e.to_string(),
        service,
    })
}

/// `host:port`, with brackets around IPv6 addresses.
pub(crate) fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A stream plus something that must live exactly as long as it (a pool slot).
pub(crate) struct Guarded<G> {
    pub(crate) io: Io,
    pub(crate) _guard: G,
}

impl<G: Unpin> AsyncRead for Guarded<G> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<G: Unpin> AsyncWrite for Guarded<G> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_up_to_the_maximum() {
        let o = ConnectOptions {
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(4),
            ..ConnectOptions::default()
        };
        let got: Vec<u128> = (1..=6).map(|n| o.backoff(n).as_millis()).collect();
        assert_eq!(got, [500, 1000, 2000, 4000, 4000, 4000]);
        assert_eq!(o.backoff(u32::MAX), Duration::from_secs(4));
    }

    #[test]
    fn addresses_in_messages_bracket_ipv6() {
        assert_eq!(host_port("::1", 22), "[::1]:22");
        assert_eq!(host_port("example.org", 2376), "example.org:2376");
    }

    #[tokio::test]
    async fn resolving_keeps_only_the_requested_family() {
        let v4 = resolve("d", "127.0.0.1", 22, IpFamily::Ipv4).await.unwrap();
        assert!(v4.iter().all(|a| a.is_ipv4()));
        let e = resolve("d", "127.0.0.1", 22, IpFamily::Ipv6)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "resolve");
        let v6 = resolve("d", "::1", 22, IpFamily::Ipv6).await.unwrap();
        assert_eq!(v6[0].to_string(), "[::1]:22");
    }
}
