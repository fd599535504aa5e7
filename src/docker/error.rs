//! The failure kinds of a Docker connection, one variant each.
//!
//! A check reports the kind (`ConnectError::kind`) and the message; the message always
//! names the device, says what failed and what to do about it. Errors are `Clone` so a
//! transport can remember the last failure while it backs off before reconnecting.

use std::time::Duration;

/// Why a Docker connection (or a call through it) failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "device {device}: cannot resolve {host:?} ({detail}); check the host name or give an address"
    )]
    Resolve {
        device: String,
        host: String,
        detail: String,
    },

    #[error(
        "device {device}: {host:?} has no {family} address (it resolves to {found}); choose another --ip-family or give an address of that family"
    )]
    NoAddressInFamily {
        device: String,
        host: String,
        family: &'static str,
        found: String,
    },

    #[error(
        "device {device}: cannot reach {addr} ({detail}); check that the {service} runs there and that the port is open"
    )]
    Unreachable {
        device: String,
        addr: String,
        detail: String,
        service: &'static str,
    },

    #[error(
        "device {device}: timed out after {} while {step}; the host or the network is too slow or drops packets (a firewall?), or the service does not answer on that port",
        fmt_duration(*.after)
    )]
    Timeout {
        device: String,
        step: &'static str,
        after: Duration,
    },

    #[error(
        "device {device}: the SSH server refused {method} authentication for user {user:?}; it offers: {}. Check the user and the credentials stored for the device{}",
        fmt_methods(.offered),
        auth_hint(.method, .offered)
    )]
    AuthRejected {
        device: String,
        user: String,
        /// The method Capstan tried (`password`, `publickey`, `keyboard-interactive`, …).
        method: String,
        /// The methods the server said may continue.
        offered: Vec<String>,
    },

    #[error(
        "device {device}: the SSH host key of {addr} has CHANGED: expected {expected}, the server presented {presented} ({algorithm}). Someone may be intercepting the connection, or the host was reinstalled. If the change is expected, verify the new key out of band, then pin it: `capstan device edit {device} --clear-host-key` and `capstan device check {device} --trust-host-key`"
    )]
    HostKeyMismatch {
        device: String,
        addr: String,
        expected: String,
        presented: String,
        algorithm: String,
    },

    #[error(
        "device {device}: the SSH host key of {addr} is not pinned, so the server cannot be verified; it presented {presented} ({algorithm}). Compare it with `ssh-keygen -lf /etc/ssh/ssh_host_{}_key.pub` on the host, then pin it: `capstan device check {device} --trust-host-key` (or `capstan device edit {device} --host-key '<public key line>'`)",
        host_key_file_name(.algorithm)
    )]
    HostKeyUnknown {
        device: String,
        addr: String,
        presented: String,
        algorithm: String,
        /// The presented key as an OpenSSH public key line, to pin it.
        key: String,
    },

    #[error(
        "device {device}: the `docker` command was not found on the remote host for {user} ({detail}); install the Docker CLI there or put it on that user's PATH"
    )]
    DockerMissing {
        device: String,
        user: String,
        detail: String,
    },

    #[error(
        "device {device}: permission denied on the Docker socket {socket} ({detail}); add the user to the `docker` group, enable --sudo (with a NOPASSWD rule for docker), or give Docker-only credentials"
    )]
    PermissionDenied {
        device: String,
        socket: String,
        detail: String,
    },

    #[error(
        "device {device}: `sudo -n` refused to run docker ({detail}); allow the user to run docker without a password (a NOPASSWD sudoers rule) or turn --sudo off"
    )]
    SudoRefused { device: String, detail: String },

    #[error(
        "device {device}: the Docker daemon is not running or not listening on {socket} ({detail}); start it (`systemctl start docker`) or fix the socket path"
    )]
    DaemonNotRunning {
        device: String,
        socket: String,
        detail: String,
    },

    #[error("device {device}: TLS with {addr} failed: {detail}")]
    Tls {
        device: String,
        addr: String,
        detail: String,
    },

    #[error("device {device}: SSH failed with {addr}: {detail}")]
    Ssh {
        device: String,
        addr: String,
        detail: String,
    },

    #[error("device {device}: the remote command `{command}` failed: {detail}")]
    RemoteCommand {
        device: String,
        command: String,
        detail: String,
    },

    #[error("device {device}: the Docker daemon answered {status}: {message}")]
    Daemon {
        device: String,
        status: u16,
        message: String,
    },

    #[error("device {device}: the connection to the Docker daemon failed: {detail}")]
    Transport { device: String, detail: String },

    #[error("device {device}: {detail}")]
    Invalid { device: String, detail: String },

    #[error("device {device}: cannot read its secrets from the vault: {detail}")]
    Secrets { device: String, detail: String },

    #[error(
        "{last} (not retrying for another {}: {failures} connection attempt(s) failed in a row)",
        fmt_duration(*.retry_in)
    )]
    BackingOff {
        failures: u32,
        retry_in: Duration,
        last: Box<ConnectError>,
    },
}

impl ConnectError {
    /// The failure kind, as reported by checks and the API (`"auth"`, `"timeout"`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Resolve { .. } | ConnectError::NoAddressInFamily { .. } => "resolve",
            ConnectError::Unreachable { .. } => "unreachable",
            ConnectError::Timeout { .. } => "timeout",
            ConnectError::AuthRejected { .. } => "auth",
            ConnectError::HostKeyMismatch { .. } => "host-key-mismatch",
            ConnectError::HostKeyUnknown { .. } => "host-key-unknown",
            ConnectError::DockerMissing { .. } => "docker-missing",
            ConnectError::PermissionDenied { .. } | ConnectError::SudoRefused { .. } => {
                "permission-denied"
            }
            ConnectError::DaemonNotRunning { .. } => "daemon-not-running",
            ConnectError::Tls { .. } => "tls",
            ConnectError::Ssh { .. } => "ssh",
            ConnectError::RemoteCommand { .. } => "remote-command",
            ConnectError::Daemon { .. } => "daemon-error",
            ConnectError::Transport { .. } => "transport",
            ConnectError::Invalid { .. } => "invalid",
            ConnectError::Secrets { .. } => "secrets",
            ConnectError::BackingOff { last, .. } => last.kind(),
        }
    }

    /// Whether this is a timeout (the API answers 504 rather than 502).
    pub fn is_timeout(&self) -> bool {
        self.kind() == "timeout"
    }

    /// The underlying error when this one only says that reconnecting is paused.
    pub fn root(&self) -> &ConnectError {
        match self {
            ConnectError::BackingOff { last, .. } => last.root(),
            other => other,
        }
    }

    /// The auth methods the server offered, for an auth failure.
    pub fn offered_methods(&self) -> Option<&[String]> {
        match self.root() {
            ConnectError::AuthRejected { offered, .. } => Some(offered),
            _ => None,
        }
    }

    /// `(expected, presented)` host key fingerprints, for host key failures (`expected` is
    /// `None` when no key was pinned).
    pub fn host_key_fingerprints(&self) -> Option<(Option<&str>, &str)> {
        match self.root() {
            ConnectError::HostKeyMismatch {
                expected,
                presented,
                ..
            } => Some((Some(expected), presented)),
            ConnectError::HostKeyUnknown { presented, .. } => Some((None, presented)),
            _ => None,
        }
    }

    /// Whether a failed connection attempt should pause reconnecting (network and server
    /// failures). Settings errors are not retried with back-off: they fail every time.
    pub(crate) fn backs_off(&self) -> bool {
        !matches!(
            self,
            ConnectError::Invalid { .. } | ConnectError::Secrets { .. }
        )
    }

    /// Finds a `ConnectError` inside an error returned by bollard for a call made through a
    /// Capstan connection.
    pub fn from_bollard(e: &bollard::errors::Error) -> Option<&ConnectError> {
        match e {
            bollard::errors::Error::IOError { err } => err
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<ConnectError>()),
            _ => None,
        }
    }

    /// Wraps this error for bollard (custom transports return bollard's error type);
    /// [`ConnectError::from_bollard`] gets it back.
    pub(crate) fn into_bollard(self) -> bollard::errors::Error {
        bollard::errors::Error::IOError {
            err: std::io::Error::other(self),
        }
    }
}

/// Turns an error from a bollard call on a device into a `ConnectError`: connection
/// failures come back as they were raised; answers from the daemon become `Daemon`.
pub fn classify_bollard(
    device: &str,
    step: &'static str,
    timeout: Duration,
    e: bollard::errors::Error,
) -> ConnectError {
    if let Some(c) = ConnectError::from_bollard(&e) {
        return c.clone();
    }
    match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code,
            message,
        } => ConnectError::Daemon {
            device: device.to_string(),
            status: status_code,
            message,
        },
        bollard::errors::Error::RequestTimeoutError => ConnectError::Timeout {
            device: device.to_string(),
            step,
            after: timeout,
        },
        other => ConnectError::Transport {
            device: device.to_string(),
            detail: other.to_string(),
        },
    }
}

/// The part of `/etc/ssh/ssh_host_<x>_key.pub` that names the algorithm.
pub(crate) fn host_key_file_name(algorithm: &str) -> &'static str {
    if algorithm.contains("ed25519") {
        "ed25519"
    } else if algorithm.starts_with("ecdsa") {
        "ecdsa"
    } else if algorithm.contains("rsa") {
        "rsa"
    } else {
        "*"
    }
}

fn fmt_methods(m: &[String]) -> String {
    if m.is_empty() {
        "nothing more (it closed authentication)".into()
    } else {
        m.join(", ")
    }
}

fn auth_hint(method: &str, offered: &[String]) -> String {
    let has = |m: &str| offered.iter().any(|o| o == m);
    if method == "password" && !has("password") && has("keyboard-interactive") {
        "; this server asks passwords through keyboard-interactive: enable --keyboard-interactive"
            .into()
    } else if !method.starts_with("publickey") && has("publickey") && !has("password") {
        "; this server accepts keys only: give --ssh-key-file or use --auth agent".into()
    } else {
        String::new()
    }
}

pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_refused_where_only_keyboard_interactive_is_offered_says_so() {
        let e = ConnectError::AuthRejected {
            device: "web1".into(),
            user: "ops".into(),
            method: "password".into(),
            offered: vec!["keyboard-interactive".into()],
        };
        let msg = e.to_string();
        assert!(
            msg.contains("web1") && msg.contains("--keyboard-interactive"),
            "{msg}"
        );
        assert_eq!(e.kind(), "auth");
        assert_eq!(e.offered_methods().unwrap(), ["keyboard-interactive"]);
    }

    #[test]
    fn backing_off_keeps_the_kind_of_the_failure_behind_it() {
        let last = ConnectError::Timeout {
            device: "db".into(),
            step: "ssh-handshake",
            after: Duration::from_secs(10),
        };
        let e = ConnectError::BackingOff {
            failures: 3,
            retry_in: Duration::from_millis(1500),
            last: Box::new(last),
        };
        assert_eq!(e.kind(), "timeout");
        assert!(e.is_timeout());
        let msg = e.to_string();
        assert!(
            msg.contains("ssh-handshake") && msg.contains("1.5 s"),
            "{msg}"
        );
    }

    #[test]
    fn a_connect_error_survives_the_trip_through_bollard() {
        let e = ConnectError::DockerMissing {
            device: "d".into(),
            user: "u".into(),
            detail: "sh: 1: docker: not found".into(),
        };
        let b = e.into_bollard();
        let back = ConnectError::from_bollard(&b).expect("the same error");
        assert_eq!(back.kind(), "docker-missing");
        let c = classify_bollard("d", "x", Duration::from_secs(1), b);
        assert_eq!(c.kind(), "docker-missing");
    }
}
