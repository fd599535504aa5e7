//! A remote daemon over SSH: a russh channel to the remote Docker socket.
//!
//! One SSH session per device, opened on first use and kept: every HTTP connection to
//! the daemon is a channel on it. Opening a channel on a live session costs one round
//! trip; a new session costs a TCP connect, key exchange and authentication, so sessions
//! are reused until they drop, and the next operation reconnects (pausing with back-off
//! after failures, so a dead host is not hammered).
//!
//! A channel reaches the daemon one of two ways ([`SshTunnel`]):
//!
//! - `direct-streamlocal@openssh.com`: sshd connects the channel straight to the socket
//!   (the device's socket path, else `/var/run/docker.sock`). No remote process, so
//!   every request and response crosses one relay (sshd) instead of two (sshd, then the
//!   dial-stdio process and its pipes): the faster way. It needs a server that allows
//!   streamlocal forwarding (`AllowStreamLocalForwarding`, not `DisableForwarding`) and a
//!   user who may open the socket, and it goes to that socket whatever Docker context
//!   the remote user has set.
//! - `docker system dial-stdio` run on the remote host (through `sudo -n` when the device
//!   says so, with `-H unix://<path>` for a custom socket), whose stdin and stdout carry
//!   the Docker API. Works wherever the docker CLI does, sudo included.
//!
//! `auto` (the default) asks for a streamlocal channel and falls back to dial-stdio
//! when the server refuses it, logging why at debug level; after a refusal the session
//! goes straight to dial-stdio for a minute before asking again. A device with sudo
//! always uses dial-stdio, and so does `auto` for a device with agent forwarding (the
//! agent is there for the remote docker command).
//!
//! OpenSSH's sshd only disables Nagle's algorithm on a connection once a command runs on
//! it, so a session whose channels are all streamlocal also runs `true` once, in the
//! background: without it, concurrent channels and responses written in pieces stall on
//! delayed ACKs (tens of milliseconds).
//!
//! The server's host key must match the key pinned on the device (compared by key data,
//! not by comment). Without a pinned key the connection is refused with the presented
//! fingerprint, unless the caller asked to trust on first use.
//!
//! What the remote command writes to stderr is kept: when dial-stdio fails before
//! answering (no `docker`, permission denied on the socket, no daemon, sudo refusing),
//! that text becomes the error's kind and message.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use russh::client::{self, Handle, Msg};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelWriteHalf, MethodKind, MethodSet};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{
    ConnectError, ConnectOptions, HostKeyPolicy, Io, Steps, connect_tcp, host_port, resolve, within,
};
use crate::device::{Device, DeviceSecrets, IpFamily, SecretField, SshAuth, SshTunnel};
use crate::secret::Secret;

/// Which of the device's logins a transport uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoginChoice {
    /// The login for Docker connections: the Docker-only credentials when the device has
    /// them, else the main login.
    Docker,
    /// The device's main SSH login.
    Main,
}

/// A login: user and how to prove it.
struct Login {
    user: String,
    method: LoginMethod,
}

enum LoginMethod {
    Password {
        password: Secret,
        keyboard_interactive: bool,
    },
    Key(Arc<PrivateKey>),
    Agent,
    None,
}

pub(crate) struct SshTransport {
    device: String,
    host: String,
    port: u16,
    family: IpFamily,
    login: Login,
    pinned: Option<PublicKey>,
    policy: HostKeyPolicy,
    agent_socket: Option<PathBuf>,
    agent_forwarding: bool,
    command: String,
    /// The remote socket: the streamlocal target, and named in messages.
    remote_socket: String,
    /// How channels reach the daemon (dial-stdio for sudo devices whatever was asked, and
    /// for `auto` with agent forwarding).
    tunnel: SshTunnel,
    streamlocal_opened: AtomicUsize,
    dial_stdio_opened: AtomicUsize,
    opts: ConnectOptions,
    config: Arc<client::Config>,
    state: tokio::sync::Mutex<SessionState>,
    presented: Arc<Mutex<Option<PublicKey>>>,
    authenticated: AtomicBool,
}

#[derive(Default)]
struct SessionState {
    session: Option<Arc<Session>>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<ConnectError>,
}

struct Session {
    handle: Handle<ClientHandler>,
    /// When the server last refused a streamlocal channel: `auto` goes straight to
    /// dial-stdio for [`STREAMLOCAL_RETRY`] after that.
    streamlocal_refused: Mutex<Option<Instant>>,
    /// A command has run on this session (see [`Session::nudge_nodelay`]).
    exec_done: AtomicBool,
}

impl Session {
    /// OpenSSH's sshd turns on TCP_NODELAY for a connection only when a command or shell
    /// starts on it. A session carrying only streamlocal channels keeps Nagle's
    /// algorithm, and a second small write from sshd (concurrent channels, a response
    /// or stream written in pieces) then waits for our delayed ACK, up to 40 ms. So the
    /// first streamlocal channel of a session runs `true` once on the side, in the
    /// background, for that effect alone.
    fn nudge_nodelay(self: &Arc<Self>, device: &str) {
        if self.exec_done.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.clone();
        let device = device.to_string();
        rt.spawn(async move {
            let run = async {
                let mut ch = me.handle.channel_open_session().await?;
                ch.exec(false, "true").await?;
                // Wait for it to end, so the channel slot comes free before we go.
                while let Some(m) = ch.wait().await {
                    if matches!(m, ChannelMsg::Close) {
                        break;
                    }
                }
                Ok::<_, russh::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(30), run).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%device, "running `true` to have sshd set TCP_NODELAY failed: {e}")
                }
                Err(_) => {
                    tracing::debug!(%device, "running `true` to have sshd set TCP_NODELAY did not end within 30 s")
                }
            }
        });
    }
}

/// The client configuration of every session: it holds nothing per device, so one is
/// shared.
fn client_config() -> Arc<client::Config> {
    static CONFIG: std::sync::LazyLock<Arc<client::Config>> = std::sync::LazyLock::new(|| {
        Arc::new(client::Config {
            nodelay: true,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 3,
            ..Default::default()
        })
    });
    CONFIG.clone()
}

impl SshTransport {
    pub(crate) fn new(
        device: &Device,
        secrets: &DeviceSecrets,
        opts: &ConnectOptions,
        policy: HostKeyPolicy,
    ) -> Result<Self, ConnectError> {
        Self::with_login(device, secrets, opts, policy, LoginChoice::Docker)
    }

    pub(crate) fn with_login(
        device: &Device,
        secrets: &DeviceSecrets,
        opts: &ConnectOptions,
        policy: HostKeyPolicy,
        which: LoginChoice,
    ) -> Result<Self, ConnectError> {
        let name = device.name.clone();
        let invalid = |detail: String| ConnectError::Invalid {
            device: name.clone(),
            detail,
        };
        let host = device
            .host
            .clone()
            .filter(|h| !h.trim().is_empty())
            .ok_or_else(|| invalid("an ssh device needs a host".into()))?;
        let login = match (&device.docker_login, which) {
            (Some(d), LoginChoice::Docker) => build_login(
                &device.name,
                &d.user,
                d.auth,
                device.keyboard_interactive,
                secrets,
                [
                    SecretField::DockerPassword,
                    SecretField::DockerPrivateKey,
                    SecretField::DockerKeyPassphrase,
                ],
            )?,
            _ => build_login(
                &device.name,
                device
                    .user
                    .as_deref()
                    .ok_or_else(|| invalid("an ssh device needs a user".into()))?,
                device
                    .auth
                    .ok_or_else(|| invalid("an ssh device needs an auth method".into()))?,
                device.keyboard_interactive,
                secrets,
                [
                    SecretField::Password,
                    SecretField::PrivateKey,
                    SecretField::KeyPassphrase,
                ],
            )?,
        };
        let pinned = match &device.host_key {
            Some(k) => Some(
                crate::device::parse_host_key(k)
                    .map_err(|e| invalid(format!("the pinned host key is unreadable: {e}")))?,
            ),
            None => None,
        };
        let docker = if device.sudo {
            "sudo -n docker"
        } else {
            "docker"
        };
        let command = match &device.socket_path {
            Some(p) => format!("{docker} -H 'unix://{p}' system dial-stdio"),
            None => format!("{docker} system dial-stdio"),
        };
        let tunnel = effective_tunnel(device, opts.ssh_tunnel);
        Ok(SshTransport {
            device: device.name.clone(),
            port: device.port_or_default(),
            host,
            family: device.ip_family,
            login,
            pinned,
            policy,
            agent_socket: opts.agent_socket.clone(),
            agent_forwarding: device.agent_forwarding,
            command,
            remote_socket: device
                .socket_path
                .clone()
                .unwrap_or_else(|| "/var/run/docker.sock".into()),
            tunnel,
            streamlocal_opened: AtomicUsize::new(0),
            dial_stdio_opened: AtomicUsize::new(0),
            opts: opts.clone(),
            config: client_config(),
            state: tokio::sync::Mutex::new(SessionState::default()),
            presented: Arc::new(Mutex::new(None)),
            authenticated: AtomicBool::new(false),
        })
    }

    fn addr_label(&self) -> String {
        host_port(&self.host, self.port)
    }

    pub(crate) fn presented_host_key(&self) -> Option<PublicKey> {
        self.presented
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Relaxed)
    }

    /// Channels opened so far: (streamlocal, dial-stdio).
    pub(crate) fn channels_opened(&self) -> (usize, usize) {
        (
            self.streamlocal_opened.load(Ordering::Relaxed),
            self.dial_stdio_opened.load(Ordering::Relaxed),
        )
    }

    /// Opens a channel to the daemon, on the live session or a new one.
    pub(crate) async fn connect(&self, steps: &Steps) -> Result<Io, ConnectError> {
        let device = self.device.as_str();
        let mut retried = false;
        loop {
            let (session, fresh) = self.session(steps).await?;
            let opened = within(
                device,
                self.opts.connect_timeout,
                steps,
                steps.run("open-channel", self.open_channel(&session)),
            )
            .await;
            match opened {
                Ok(io) => return Ok(io),
                // A kept session can die between two operations: reconnect once.
                Err(_) if !fresh && !retried && session.handle.is_closed() => {
                    self.forget(&session).await;
                    retried = true;
                }
                Err(e) => {
                    // A kept session that cannot open a channel in time is probably
                    // dead without having noticed (no RST on a dropped network): the
                    // next operation starts a new one.
                    if !fresh && e.is_timeout() {
                        self.forget(&session).await;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Logs in without opening a channel (to verify a login).
    pub(crate) async fn login_only(&self, steps: &Steps) -> Result<(), ConnectError> {
        let (session, _) = self.session(steps).await?;
        self.forget(&session).await;
        let _ = session
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        Ok(())
    }

    /// The live session, or a new one. Returns whether it is new.
    async fn session(&self, steps: &Steps) -> Result<(Arc<Session>, bool), ConnectError> {
        let mut st = self.state.lock().await;
        if let Some(s) = &st.session {
            if !s.handle.is_closed() {
                return Ok((s.clone(), false));
            }
            tracing::info!(device = %self.device, "SSH session closed; reconnecting");
            st.session = None;
        }
        if let (Some(at), Some(last)) = (st.retry_at, &st.last_error) {
            let now = Instant::now();
            if now < at {
                return Err(ConnectError::BackingOff {
                    failures: st.failures,
                    retry_in: at - now,
                    last: Box::new(last.clone()),
                });
            }
        }
        let result = within(
            &self.device,
            self.opts.connect_timeout,
            steps,
            self.establish(steps),
        )
        .await;
        match result {
            Ok(session) => {
                let session = Arc::new(session);
                st.session = Some(session.clone());
                st.failures = 0;
                st.retry_at = None;
                st.last_error = None;
                Ok((session, true))
            }
            Err(e) => {
                if e.backs_off() {
                    st.failures += 1;
                    st.retry_at = Some(Instant::now() + self.opts.backoff(st.failures));
                    st.last_error = Some(e.clone());
                }
                Err(e)
            }
        }
    }

    async fn forget(&self, session: &Arc<Session>) {
        let mut st = self.state.lock().await;
        if st.session.as_ref().is_some_and(|s| Arc::ptr_eq(s, session)) {
            st.session = None;
        }
    }

    /// Resolve, connect, handshake (host key check), authenticate.
    async fn establish(&self, steps: &Steps) -> Result<Session, ConnectError> {
        let device = self.device.as_str();
        let addrs = steps
            .run(
                "resolve",
                resolve(device, &self.host, self.port, self.family),
            )
            .await?;
        let tcp = steps
            .run("tcp-connect", connect_tcp(device, &addrs, "SSH server"))
            .await?;
        let addr = self.addr_label();
        let handler = ClientHandler {
            device: self.device.clone(),
            addr: addr.clone(),
            pinned: self.pinned.clone(),
            policy: self.policy,
            presented: self.presented.clone(),
            agent_socket: self.agent_socket.clone(),
            agent_forwarding: self.agent_forwarding,
        };
        self.authenticated.store(false, Ordering::Relaxed);
        let mut handle = steps
            .run("ssh-handshake", async {
                client::connect_stream(self.config.clone(), tcp, handler)
                    .await
                    .map_err(|e| match e {
                        HandlerError::Refused(c) => c,
                        HandlerError::Ssh(e) => self.ssh_error("the SSH handshake failed", e),
                    })
            })
            .await?;
        steps
            .run("authenticate", self.authenticate(&mut handle))
            .await?;
        self.authenticated.store(true, Ordering::Relaxed);
        tracing::debug!(device = %self.device, %addr, user = %self.login.user, "SSH session established");
        Ok(Session {
            handle,
            streamlocal_refused: Mutex::new(None),
            exec_done: AtomicBool::new(false),
        })
    }

    fn ssh_error(&self, what: &str, e: russh::Error) -> ConnectError {
        let detail = match &e {
            russh::Error::Disconnect | russh::Error::HUP => {
                format!("{what}: the server closed the connection")
            }
            russh::Error::IO(io) => format!("{what}: {io}"),
            russh::Error::NoCommonAlgo { kind, ours, theirs } => format!(
                "{what}: no common {kind:?} algorithm (ours: {ours:?}; the server's: {theirs:?})"
            ),
            other => format!("{what}: {other}"),
        };
        ConnectError::Ssh {
            device: self.device.clone(),
            addr: self.addr_label(),
            detail,
        }
    }

    async fn authenticate(&self, handle: &mut Handle<ClientHandler>) -> Result<(), ConnectError> {
        let user = self.login.user.clone();
        let fail = |method: &str, remaining: &MethodSet| ConnectError::AuthRejected {
            device: self.device.clone(),
            user: user.clone(),
            method: method.to_string(),
            offered: method_names(remaining),
        };
        let err = |e: russh::Error| self.ssh_error("authentication failed", e);
        match &self.login.method {
            LoginMethod::None => match handle.authenticate_none(&user).await.map_err(err)? {
                russh::client::AuthResult::Success => Ok(()),
                russh::client::AuthResult::Failure {
                    remaining_methods, ..
                } => Err(fail("none", &remaining_methods)),
            },
            LoginMethod::Password {
                password,
                keyboard_interactive,
            } => {
                let pw = password.expose_str().map_err(|_| ConnectError::Invalid {
                    device: self.device.clone(),
                    detail: "the stored password is not UTF-8".into(),
                })?;
                if *keyboard_interactive {
                    match self.keyboard_interactive(handle, &user, pw).await? {
                        None => Ok(()),
                        Some(remaining) if remaining.contains(&MethodKind::Password) => {
                            self.password(handle, &user, pw).await
                        }
                        Some(remaining) => Err(fail("keyboard-interactive", &remaining)),
                    }
                } else {
                    self.password(handle, &user, pw).await
                }
            }
            LoginMethod::Key(key) => {
                let hash = if key.algorithm().is_rsa() {
                    rsa_hash(handle).await
                } else {
                    None
                };
                let r = handle
                    .authenticate_publickey(&user, PrivateKeyWithHashAlg::new(key.clone(), hash))
                    .await
                    .map_err(err)?;
                match r {
                    russh::client::AuthResult::Success => Ok(()),
                    russh::client::AuthResult::Failure {
                        remaining_methods, ..
                    } => Err(fail("publickey", &remaining_methods)),
                }
            }
            LoginMethod::Agent => self.agent_auth(handle, &user).await,
        }
    }

    async fn password(
        &self,
        handle: &mut Handle<ClientHandler>,
        user: &str,
        pw: &str,
    ) -> Result<(), ConnectError> {
        match handle
            .authenticate_password(user, pw)
            .await
            .map_err(|e| self.ssh_error("authentication failed", e))?
        {
            russh::client::AuthResult::Success => Ok(()),
            russh::client::AuthResult::Failure {
                remaining_methods, ..
            } => Err(ConnectError::AuthRejected {
                device: self.device.clone(),
                user: user.to_string(),
                method: "password".into(),
                offered: method_names(&remaining_methods),
            }),
        }
    }

    /// Keyboard-interactive, answering password prompts with the password. `Ok(None)` on
    /// success, `Ok(Some(methods))` when the server refused.
    async fn keyboard_interactive(
        &self,
        handle: &mut Handle<ClientHandler>,
        user: &str,
        pw: &str,
    ) -> Result<Option<MethodSet>, ConnectError> {
        use russh::client::KeyboardInteractiveAuthResponse as R;
        let err = |e: russh::Error| self.ssh_error("keyboard-interactive authentication failed", e);
        let mut reply = handle
            .authenticate_keyboard_interactive_start(user, None::<String>)
            .await
            .map_err(err)?;
        // PAM may send informational rounds with no prompts; a password is answered once.
        let mut answered = 0;
        for _ in 0..8 {
            match reply {
                R::Success => return Ok(None),
                R::Failure {
                    remaining_methods, ..
                } => return Ok(Some(remaining_methods)),
                R::InfoRequest { prompts, .. } => {
                    let answers: Vec<String> = prompts
                        .iter()
                        .map(|p| {
                            let asks_secret =
                                !p.echo || p.prompt.to_ascii_lowercase().contains("password");
                            if asks_secret {
                                answered += 1;
                                pw.to_string()
                            } else {
                                String::new()
                            }
                        })
                        .collect();
                    if answered > 2 {
                        // The server keeps asking: the password is wrong.
                        return Ok(Some(MethodSet::from(
                            &[MethodKind::KeyboardInteractive][..],
                        )));
                    }
                    reply = handle
                        .authenticate_keyboard_interactive_respond(answers)
                        .await
                        .map_err(err)?;
                }
            }
        }
        Ok(Some(MethodSet::empty()))
    }

    async fn agent_auth(
        &self,
        handle: &mut Handle<ClientHandler>,
        user: &str,
    ) -> Result<(), ConnectError> {
        let invalid = |detail: String| ConnectError::Invalid {
            device: self.device.clone(),
            detail,
        };
        let sock = self.agent_socket.as_ref().ok_or_else(|| {
            invalid(
                "agent auth needs an ssh-agent: SSH_AUTH_SOCK is not set for the capstan process"
                    .into(),
            )
        })?;
        let mut agent = russh::keys::agent::client::AgentClient::connect_uds(sock)
            .await
            .map_err(|e| {
                invalid(format!(
                    "cannot reach the ssh-agent at {} ({e}); is it running?",
                    sock.display()
                ))
            })?;
        let ids = agent.request_identities().await.map_err(|e| {
            invalid(format!(
                "the ssh-agent at {} did not list its keys: {e}",
                sock.display()
            ))
        })?;
        if ids.is_empty() {
            return Err(invalid(format!(
                "the ssh-agent at {} holds no keys (ssh-add one)",
                sock.display()
            )));
        }
        let mut remaining = MethodSet::empty();
        for id in ids {
            let key = id.public_key().into_owned();
            let hash = if key.algorithm().is_rsa() {
                rsa_hash(handle).await
            } else {
                None
            };
            match handle
                .authenticate_publickey_with(user, key, hash, &mut agent)
                .await
            {
                Ok(russh::client::AuthResult::Success) => return Ok(()),
                Ok(russh::client::AuthResult::Failure {
                    remaining_methods, ..
                }) => remaining = remaining_methods,
                Err(e) => {
                    tracing::debug!(device = %self.device, "agent signing failed: {e:?}");
                }
            }
        }
        Err(ConnectError::AuthRejected {
            device: self.device.clone(),
            user: user.to_string(),
            method: "publickey (ssh-agent)".into(),
            offered: method_names(&remaining),
        })
    }

    async fn open_channel(&self, session: &Arc<Session>) -> Result<Io, ConnectError> {
        let streamlocal = match self.tunnel {
            SshTunnel::DialStdio => false,
            SshTunnel::Streamlocal => true,
            SshTunnel::Auto => !session
                .streamlocal_refused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|at| at.elapsed() < STREAMLOCAL_RETRY),
        };
        if streamlocal {
            match session
                .handle
                .channel_open_direct_streamlocal(self.remote_socket.as_str())
                .await
            {
                Ok(channel) => {
                    self.streamlocal_opened.fetch_add(1, Ordering::Relaxed);
                    session.nudge_nodelay(&self.device);
                    return Ok(Box::new(ChannelIo::new(channel)));
                }
                Err(russh::Error::ChannelOpenFailure(f)) if self.tunnel == SshTunnel::Auto => {
                    // sshd answers "connect failed" both when its configuration forbids
                    // streamlocal and when the socket cannot be opened, so whichever it
                    // was, the next channels skip the question for a while (a daemon
                    // that was restarting gets its streamlocal channels back after it).
                    *session
                        .streamlocal_refused
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                    tracing::debug!(
                        device = %self.device,
                        "no streamlocal channel: {}; using docker system dial-stdio for the next {} s",
                        streamlocal_refusal(&f, &self.remote_socket),
                        STREAMLOCAL_RETRY.as_secs()
                    );
                }
                Err(russh::Error::ChannelOpenFailure(f)) => {
                    return Err(ConnectError::Ssh {
                        device: self.device.clone(),
                        addr: self.addr_label(),
                        detail: format!(
                            "{}; the tunnel is set to streamlocal only (auto would fall back to docker system dial-stdio)",
                            streamlocal_refusal(&f, &self.remote_socket)
                        ),
                    });
                }
                Err(e) => return Err(self.ssh_error("opening a streamlocal channel failed", e)),
            }
        }
        let err = |e: russh::Error| match e {
            russh::Error::ChannelOpenFailure(f) => ConnectError::Ssh {
                device: self.device.clone(),
                addr: self.addr_label(),
                detail: format!(
                    "the server refused a new channel ({f:?}); its MaxSessions may be below {}",
                    super::SSH_CHANNELS_PER_SESSION
                ),
            },
            other => self.ssh_error("opening a channel failed", other),
        };
        let channel = session.handle.channel_open_session().await.map_err(err)?;
        if self.agent_forwarding {
            channel.agent_forward(false).await.map_err(err)?;
        }
        channel
            .exec(false, self.command.as_bytes())
            .await
            .map_err(err)?;
        session.exec_done.store(true, Ordering::Relaxed);
        self.dial_stdio_opened.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(ChannelIo::new(channel)))
    }

    /// Maps a failed read on a dial-stdio channel to what the remote side said.
    pub(crate) fn classify_stream_error(&self, e: &std::io::Error) -> Option<ConnectError> {
        let f = e.get_ref()?.downcast_ref::<DialStdioFailed>()?;
        Some(self.classify_dial_failure(f))
    }

    fn classify_dial_failure(&self, f: &DialStdioFailed) -> ConnectError {
        let device = self.device.clone();
        if f.lost {
            return ConnectError::Ssh {
                device,
                addr: self.addr_label(),
                detail: "the SSH session ended before the daemon answered (sshd stopped or restarted, or the network dropped); the next operation reconnects".into(),
            };
        }
        let text = f.stderr.trim();
        let lower = text.to_ascii_lowercase();
        let detail = if text.is_empty() {
            match f.exit {
                Some(c) => format!("exit status {c}, nothing on stderr"),
                None => "no output".into(),
            }
        } else {
            last_lines(text, 3)
        };
        let sudo_refused = [
            "password is required",
            "not allowed to",
            "not in the sudoers",
            "may not run",
            "a terminal is required",
            "sudo: not found",
        ];
        if lower.contains("sudo") && sudo_refused.iter().any(|s| lower.contains(s)) {
            return ConnectError::SudoRefused { device, detail };
        }
        if f.exit == Some(127)
            || lower.contains("command not found")
            || (lower.contains("docker") && lower.contains("not found"))
        {
            return ConnectError::DockerMissing {
                device,
                user: self.login.user.clone(),
                detail,
            };
        }
        if lower.contains("permission denied") {
            return ConnectError::PermissionDenied {
                device,
                socket: self.remote_socket.clone(),
                detail,
            };
        }
        if lower.contains("no such file or directory")
            || lower.contains("connection refused")
            || lower.contains("cannot connect to the docker daemon")
            || lower.contains("is the docker daemon running")
        {
            return ConnectError::DaemonNotRunning {
                device,
                socket: self.remote_socket.clone(),
                detail,
            };
        }
        ConnectError::RemoteCommand {
            device,
            command: self.command.clone(),
            detail,
        }
    }
}

/// How long `auto` uses dial-stdio on a session after the server refused a streamlocal
/// channel, before asking again.
const STREAMLOCAL_RETRY: Duration = Duration::from_secs(60);

/// The tunnel a device's channels use: its own setting, else the engine's. A sudo device
/// always runs dial-stdio (validation refuses its own streamlocal setting; an engine-wide
/// one yields); so does an agent-forwarding device on `auto`, since the agent is
/// forwarded for the remote docker command (an ssh:// context there), which a
/// streamlocal channel would bypass.
fn effective_tunnel(device: &Device, engine: SshTunnel) -> SshTunnel {
    let wanted = device.ssh_tunnel.unwrap_or(engine);
    if device.sudo {
        if wanted == SshTunnel::Streamlocal {
            tracing::debug!(device = %device.name, "the device runs docker through sudo: using dial-stdio, not streamlocal");
        }
        SshTunnel::DialStdio
    } else if device.agent_forwarding && wanted == SshTunnel::Auto {
        SshTunnel::DialStdio
    } else {
        wanted
    }
}

/// Why the server refused a streamlocal channel, in words.
fn streamlocal_refusal(f: &russh::ChannelOpenFailure, socket: &str) -> String {
    match f {
        russh::ChannelOpenFailure::AdministrativelyProhibited => format!(
            "the SSH server refused a streamlocal channel to {socket} (AllowStreamLocalForwarding no, DisableForwarding or a key restriction)"
        ),
        russh::ChannelOpenFailure::UnknownChannelType => {
            "the SSH server does not know direct-streamlocal channels".into()
        }
        // OpenSSH says this for a forbidden forwarding as well as for a failed connect.
        russh::ChannelOpenFailure::ConnectFailed => format!(
            "the SSH server did not connect a streamlocal channel to {socket} (its AllowStreamLocalForwarding or DisableForwarding forbids it, or there is no such socket, no daemon, or the user may not open it)"
        ),
        russh::ChannelOpenFailure::ResourceShortage => {
            "the SSH server is short of resources for another channel".into()
        }
        russh::ChannelOpenFailure::Other { code, reason } => {
            format!("the SSH server refused a streamlocal channel to {socket} ({code}: {reason})")
        }
    }
}

fn build_login(
    device: &str,
    user: &str,
    auth: SshAuth,
    keyboard_interactive: bool,
    secrets: &DeviceSecrets,
    [pw_field, key_field, pass_field]: [SecretField; 3],
) -> Result<Login, ConnectError> {
    let invalid = |detail: String| ConnectError::Invalid {
        device: device.to_string(),
        detail,
    };
    let method = match auth {
        SshAuth::Password => LoginMethod::Password {
            password: secrets
                .get(pw_field)
                .cloned()
                .ok_or_else(|| invalid(format!("no SSH password stored for {user}")))?,
            keyboard_interactive,
        },
        SshAuth::Key => {
            let key = secrets
                .get(key_field)
                .ok_or_else(|| invalid(format!("no SSH private key stored for {user}")))?;
            let text = key
                .expose_str()
                .map_err(|_| invalid("the stored SSH private key is not text".into()))?;
            let pass = match secrets.get(pass_field) {
                Some(p) => Some(
                    p.expose_str()
                        .map_err(|_| invalid("the stored key passphrase is not UTF-8".into()))?,
                ),
                None => None,
            };
            let key = russh::keys::decode_secret_key(text, pass).map_err(|e| match e {
                russh::keys::Error::KeyIsEncrypted => invalid(format!(
                    "the SSH key for {user} is encrypted and no passphrase is stored"
                )),
                other => invalid(format!("the SSH key for {user} is unusable: {other}")),
            })?;
            LoginMethod::Key(Arc::new(key))
        }
        SshAuth::Agent => LoginMethod::Agent,
        SshAuth::None => LoginMethod::None,
    };
    Ok(Login {
        user: user.to_string(),
        method,
    })
}

/// The RSA signature hash the server accepts, best first (SHA-256 when it does not say).
async fn rsa_hash(handle: &Handle<ClientHandler>) -> Option<HashAlg> {
    match handle.best_supported_rsa_hash().await {
        Ok(Some(h)) => h,
        _ => Some(HashAlg::Sha256),
    }
}

fn method_names(m: &MethodSet) -> Vec<String> {
    m.iter()
        .map(|k| <&'static str>::from(k).to_string())
        .collect()
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    let s = lines[start..].join(" / ");
    if s.len() > 600 {
        let cut = s.char_indices().nth(600).map(|(i, _)| i).unwrap_or(s.len());
        format!("{}…", &s[..cut])
    } else {
        s
    }
}

/// The fingerprint users compare (`SHA256:…`).
pub(crate) fn fingerprint(k: &PublicKey) -> String {
    k.fingerprint(HashAlg::Sha256).to_string()
}

/// The key as an OpenSSH public key line without comment, as pinned on devices.
pub(crate) fn openssh_line(k: &PublicKey) -> String {
    let bare = PublicKey::new(k.key_data().clone(), "");
    bare.to_openssh()
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[derive(Debug)]
enum HandlerError {
    Ssh(russh::Error),
    Refused(ConnectError),
}

impl From<russh::Error> for HandlerError {
    fn from(e: russh::Error) -> Self {
        HandlerError::Ssh(e)
    }
}

/// Verifies the host key and serves forwarded agent channels.
struct ClientHandler {
    device: String,
    addr: String,
    pinned: Option<PublicKey>,
    policy: HostKeyPolicy,
    presented: Arc<Mutex<Option<PublicKey>>>,
    agent_socket: Option<PathBuf>,
    agent_forwarding: bool,
}

impl client::Handler for ClientHandler {
    type Error = HandlerError;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let presented = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(c) => PublicKey::new(c.public_key().clone(), ""),
        };
        *self.presented.lock().unwrap_or_else(|e| e.into_inner()) = Some(presented.clone());
        let algorithm = presented.algorithm().to_string();
        match &self.pinned {
            // Key data only: the comment is not part of the key.
            Some(pinned) if pinned.key_data() == presented.key_data() => Ok(true),
            Some(pinned) => Err(HandlerError::Refused(ConnectError::HostKeyMismatch {
                device: self.device.clone(),
                addr: self.addr.clone(),
                expected: fingerprint(pinned),
                presented: fingerprint(&presented),
                algorithm,
            })),
            None if self.policy == HostKeyPolicy::TrustOnFirstUse => Ok(true),
            None => Err(HandlerError::Refused(ConnectError::HostKeyUnknown {
                device: self.device.clone(),
                addr: self.addr.clone(),
                presented: fingerprint(&presented),
                algorithm,
                key: openssh_line(&presented),
            })),
        }
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: russh::Channel<Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let Some(sock) = self.agent_socket.clone().filter(|_| self.agent_forwarding) else {
            // Dropping the reply refuses the channel.
            return Ok(());
        };
        reply.accept().await;
        tokio::spawn(async move {
            match tokio::net::UnixStream::connect(&sock).await {
                Ok(mut agent) => {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut agent).await;
                }
                Err(e) => tracing::warn!("agent forwarding: cannot reach {}: {e}", sock.display()),
            }
        });
        Ok(())
    }
}

/// Why a dial-stdio channel ended without an answer.
#[derive(Debug)]
pub(crate) struct DialStdioFailed {
    stderr: String,
    exit: Option<u32>,
    /// The channel vanished without an exit status: the session is gone.
    lost: bool,
}

impl std::fmt::Display for DialStdioFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.lost {
            return f.write_str("the SSH session ended");
        }
        write!(f, "docker system dial-stdio failed")?;
        if let Some(c) = self.exit {
            write!(f, " (exit status {c})")?;
        }
        if !self.stderr.trim().is_empty() {
            write!(f, ": {}", self.stderr.trim())?;
        }
        Ok(())
    }
}

impl std::error::Error for DialStdioFailed {}

const STDERR_KEEP: usize = 8 * 1024;

type MsgStream = Pin<Box<dyn Stream<Item = ChannelMsg> + Send>>;

/// A channel to the daemon as a byte stream: channel data in, data out. For dial-stdio,
/// that is the command's stdout and stdin, and its stderr and exit status are kept for
/// the error when the command fails before answering (a streamlocal channel has
/// neither).
struct ChannelIo {
    rx: MsgStream,
    tx: Pin<Box<dyn AsyncWrite + Send>>,
    write_half: Option<ChannelWriteHalf<Msg>>,
    pending: Option<Bytes>,
    stderr: Vec<u8>,
    exit: Option<u32>,
    saw_data: bool,
    eof: bool,
    done: bool,
    lost: bool,
}

impl ChannelIo {
    fn new(channel: russh::Channel<Msg>) -> ChannelIo {
        let (read_half, write_half) = channel.split();
        let tx = Box::pin(write_half.make_writer());
        let rx = Box::pin(futures_util::stream::unfold(
            read_half,
            |mut r| async move { r.wait().await.map(|m| (m, r)) },
        ));
        ChannelIo {
            rx,
            tx,
            write_half: Some(write_half),
            pending: None,
            stderr: Vec::new(),
            exit: None,
            saw_data: false,
            eof: false,
            done: false,
            lost: false,
        }
    }

    fn finish(&mut self) -> std::io::Result<()> {
        let failed = self.lost
            || (!self.saw_data && (!self.stderr.is_empty() || self.exit.is_some_and(|c| c != 0)));
        if failed {
            let err = DialStdioFailed {
                stderr: String::from_utf8_lossy(&self.stderr).into_owned(),
                exit: self.exit,
                lost: self.lost,
            };
            let kind = if self.lost {
                std::io::ErrorKind::ConnectionAborted
            } else {
                std::io::ErrorKind::Other
            };
            return Err(std::io::Error::new(kind, err));
        }
        Ok(())
    }
}

impl AsyncRead for ChannelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if let Some(data) = &mut this.pending {
                let n = data.len().min(buf.remaining());
                buf.put_slice(&data.split_to(n));
                if data.is_empty() {
                    this.pending = None;
                }
                return Poll::Ready(Ok(()));
            }
            if this.done {
                return Poll::Ready(this.finish());
            }
            match ready!(this.rx.as_mut().poll_next(cx)) {
                Some(ChannelMsg::Data { data }) => {
                    this.saw_data = true;
                    if !data.is_empty() {
                        this.pending = Some(data);
                    }
                }
                Some(ChannelMsg::ExtendedData { data, .. }) => {
                    let room = STDERR_KEEP.saturating_sub(this.stderr.len());
                    this.stderr.extend_from_slice(&data[..data.len().min(room)]);
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => this.exit = Some(exit_status),
                Some(ChannelMsg::Eof) => {
                    this.eof = true;
                    if this.saw_data {
                        // A normal end: the daemon closed the connection.
                        this.done = true;
                    }
                    // Otherwise keep reading: the exit status and stderr follow.
                }
                Some(ChannelMsg::Close) => this.done = true,
                Some(_) => {}
                None => {
                    this.lost = !this.eof && this.exit.is_none();
                    this.done = true;
                }
            }
        }
    }
}

impl AsyncWrite for ChannelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.tx.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.tx.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.tx.as_mut().poll_shutdown(cx)
    }
}

impl Drop for ChannelIo {
    fn drop(&mut self) {
        // Close the channel so the remote dial-stdio exits (or sshd closes its socket
        // connection) and the server's channel slot (MaxSessions) comes free.
        if let (Some(w), Ok(rt)) = (
            self.write_half.take(),
            tokio::runtime::Handle::try_current(),
        ) {
            rt.spawn(async move {
                let _ = w.close().await;
            });
        }
    }
}

impl SshTransport {
    /// Whether a session is open now; `None` while another task holds the session state
    /// (connecting or checking it). Read-only, for metrics.
    pub(crate) fn has_session(&self) -> Option<bool> {
        let st = self.state.try_lock().ok()?;
        Some(st.session.as_ref().is_some_and(|s| !s.handle.is_closed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(sudo: bool) -> SshTransport {
        transport_with(sudo, SshTunnel::Auto)
    }

    fn transport_with(sudo: bool, tunnel: SshTunnel) -> SshTransport {
        let d = Device {
            host: Some("10.0.0.5".into()),
            user: Some("ops".into()),
            auth: Some(SshAuth::None),
            sudo,
            ..Device::blank(crate::device::DeviceKind::Ssh, "web1")
        };
        SshTransport::new(
            &d,
            &DeviceSecrets::default(),
            &ConnectOptions {
                ssh_tunnel: tunnel,
                ..ConnectOptions::default()
            },
            HostKeyPolicy::PinnedOnly,
        )
        .unwrap()
    }

    fn kind_of(stderr: &str, exit: Option<u32>) -> &'static str {
        let f = DialStdioFailed {
            stderr: stderr.into(),
            exit,
            lost: false,
        };
        transport(false).classify_dial_failure(&f).kind()
    }

    #[test]
    fn dial_stdio_stderr_maps_to_the_failure_kinds() {
        assert_eq!(
            kind_of("sh: 1: docker: not found\n", Some(127)),
            "docker-missing"
        );
        assert_eq!(
            kind_of("bash: docker: command not found", Some(127)),
            "docker-missing"
        );
        assert_eq!(
            kind_of("sudo: docker: command not found", Some(1)),
            "docker-missing"
        );
        assert_eq!(
            kind_of(
                "failed to open the raw stream connection: dial unix /var/run/docker.sock: connect: permission denied",
                Some(1)
            ),
            "permission-denied"
        );
        assert_eq!(
            kind_of("sudo: a password is required", Some(1)),
            "permission-denied"
        );
        assert_eq!(
            kind_of(
                "failed to open the raw stream connection: dial unix /x.sock: connect: no such file or directory",
                Some(1)
            ),
            "daemon-not-running"
        );
        assert_eq!(
            kind_of(
                "dial unix /var/run/docker.sock: connect: connection refused",
                Some(1)
            ),
            "daemon-not-running"
        );
        assert_eq!(
            kind_of("something else entirely", Some(2)),
            "remote-command"
        );
        let lost = DialStdioFailed {
            stderr: String::new(),
            exit: None,
            lost: true,
        };
        assert_eq!(transport(false).classify_dial_failure(&lost).kind(), "ssh");
    }

    #[test]
    fn the_remote_command_uses_sudo_and_the_socket_path_when_asked() {
        assert_eq!(transport(false).command, "docker system dial-stdio");
        assert_eq!(transport(true).command, "sudo -n docker system dial-stdio");
    }

    #[test]
    fn sudo_devices_always_use_dial_stdio() {
        assert_eq!(transport(false).tunnel, SshTunnel::Auto);
        assert_eq!(transport(true).tunnel, SshTunnel::DialStdio);
        let forced = transport_with(true, SshTunnel::Streamlocal);
        assert_eq!(forced.tunnel, SshTunnel::DialStdio);
        let plain = transport_with(false, SshTunnel::Streamlocal);
        assert_eq!(plain.tunnel, SshTunnel::Streamlocal);
    }

    #[test]
    fn auto_uses_dial_stdio_when_the_agent_is_forwarded() {
        let d = Device {
            agent_forwarding: true,
            host: Some("10.0.0.5".into()),
            user: Some("ops".into()),
            auth: Some(SshAuth::None),
            ..Device::blank(crate::device::DeviceKind::Ssh, "web1")
        };
        let with = |tunnel| {
            let o = ConnectOptions {
                ssh_tunnel: tunnel,
                ..ConnectOptions::default()
            };
            SshTransport::new(&d, &DeviceSecrets::default(), &o, HostKeyPolicy::PinnedOnly)
                .unwrap()
                .tunnel
        };
        assert_eq!(with(SshTunnel::Auto), SshTunnel::DialStdio);
        assert_eq!(with(SshTunnel::Streamlocal), SshTunnel::Streamlocal);
    }

    #[test]
    fn a_device_setting_wins_over_the_engine_default() {
        let d = |t| Device {
            ssh_tunnel: t,
            ..Device::blank(crate::device::DeviceKind::Ssh, "web1")
        };
        for engine in [
            SshTunnel::Auto,
            SshTunnel::Streamlocal,
            SshTunnel::DialStdio,
        ] {
            assert_eq!(effective_tunnel(&d(None), engine), engine);
            for own in [
                SshTunnel::Auto,
                SshTunnel::Streamlocal,
                SshTunnel::DialStdio,
            ] {
                assert_eq!(effective_tunnel(&d(Some(own)), engine), own);
            }
        }
    }

    #[test]
    fn tunnel_names_parse_as_the_cli_spells_them() {
        for t in [
            SshTunnel::Auto,
            SshTunnel::Streamlocal,
            SshTunnel::DialStdio,
        ] {
            assert_eq!(t.to_string().parse::<SshTunnel>(), Ok(t));
        }
        assert!("stdio".parse::<SshTunnel>().is_err());
    }

    #[test]
    fn host_key_file_names_follow_the_algorithm() {
        use super::super::error::host_key_file_name;
        assert_eq!(host_key_file_name("ssh-ed25519"), "ed25519");
        assert_eq!(host_key_file_name("ecdsa-sha2-nistp256"), "ecdsa");
        assert_eq!(host_key_file_name("rsa-sha2-512"), "rsa");
    }
}
