//! Devices: the Docker hosts Capstan knows, and how to reach each one.
//!
//! A [`Device`] record holds everything about a host that is not secret (address, user,
//! auth method, options, the pinned host key) and is stored by
//! [`DeviceRecords`](crate::store::devices::DeviceRecords).
//! Every secret field (password, private key and its passphrase, the Docker-only SSH
//! credentials, TLS material) lives only in the vault under `device/<uuid>/<field>`;
//! which secrets a device has is derived from its auth settings, never stored in clear.
//!
//! Adding and editing go through one path: a [`DeviceSpec`] applied to a blank or an
//! existing device, then [`validate`], so `add` and `edit` cannot disagree on what a valid
//! device is. The same spec is the CLI's flags, the API's device body and the pre-check's
//! unsaved device, and [`inferred_auth`] is the one place an auth method is inferred.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::secret::Secret;
use crate::store::devices::{DeviceRecords, Put};
use crate::store::{Store, StoreError};
use crate::vault::{SecretName, Vault, VaultError};

pub const VAULT_KIND: &str = "device";

#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A remote daemon reached over SSH with `docker system dial-stdio`.
    Ssh,
    /// A remote daemon reached over TCP with TLS client certificates.
    Tls,
    /// The local daemon: a unix socket or `DOCKER_HOST`.
    Local,
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Ssh => "ssh",
            DeviceKind::Tls => "tls",
            DeviceKind::Local => "local",
        })
    }
}

/// How an SSH login authenticates. The secrets each method needs live in the vault.
#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum SshAuth {
    /// A password (also used to answer keyboard-interactive prompts when enabled).
    Password,
    /// A private key (ed25519, ECDSA or RSA; OpenSSH or PEM), optionally with a passphrase.
    Key,
    /// Keys held by the ssh-agent at `SSH_AUTH_SOCK`.
    Agent,
    /// No authentication (servers that accept `none`).
    None,
}

impl std::fmt::Display for SshAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SshAuth::Password => "password",
            SshAuth::Key => "key",
            SshAuth::Agent => "agent",
            SshAuth::None => "none",
        })
    }
}

#[derive(
    Debug,
    Clone,
    Copy,
    Serialize,
    Deserialize,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    /// Whatever the name resolves to.
    #[default]
    Any,
    /// IPv4 addresses only.
    Ipv4,
    /// IPv6 addresses only.
    Ipv6,
}

/// How a Docker connection crosses an SSH session.
#[derive(
    Debug,
    Clone,
    Copy,
    Serialize,
    Deserialize,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum SshTunnel {
    /// A `direct-streamlocal@openssh.com` channel to the remote Docker socket when the
    /// server allows it, else `docker system dial-stdio`. Devices using sudo or agent
    /// forwarding use dial-stdio.
    #[default]
    Auto,
    /// Only a `direct-streamlocal@openssh.com` channel straight to the remote socket (no
    /// remote process; needs `AllowStreamLocalForwarding` and a user who may open the
    /// socket).
    Streamlocal,
    /// Only `docker system dial-stdio` run on the remote host (honours the remote user's
    /// Docker context; the only way through sudo).
    DialStdio,
}

impl std::fmt::Display for SshTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SshTunnel::Auto => "auto",
            SshTunnel::Streamlocal => "streamlocal",
            SshTunnel::DialStdio => "dial-stdio",
        })
    }
}

impl std::str::FromStr for SshTunnel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <SshTunnel as clap::ValueEnum>::from_str(s.trim(), true).map_err(|_| {
            format!("unknown SSH tunnel {s:?} (expected auto, streamlocal or dial-stdio)")
        })
    }
}

/// Separate SSH credentials used only for the Docker connection (dial-stdio).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DockerSshLogin {
    pub user: String,
    pub auth: SshAuth,
    /// Whether the private key has a passphrase (stored in the vault).
    #[serde(default)]
    pub key_has_passphrase: bool,
}

/// A Docker host and how to reach it. Contains no secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub id: Uuid,
    pub name: String,
    pub kind: DeviceKind,
    /// Host name or address (ssh, tls).
    pub host: Option<String>,
    /// Port; defaults: 22 for ssh, 2376 for tls.
    pub port: Option<u16>,
    /// SSH login user.
    pub user: Option<String>,
    /// SSH auth method.
    pub auth: Option<SshAuth>,
    /// Whether the private key has a passphrase (stored in the vault).
    #[serde(default)]
    pub key_has_passphrase: bool,
    /// Docker-only SSH credentials: when set, Docker connections log in with these.
    pub docker_login: Option<DockerSshLogin>,
    #[serde(default)]
    pub ip_family: IpFamily,
    #[serde(default)]
    pub agent_forwarding: bool,
    /// Answer keyboard-interactive password prompts with the password.
    #[serde(default)]
    pub keyboard_interactive: bool,
    /// Custom Docker socket on the remote host (ssh), e.g. `/run/user/1000/docker.sock`.
    pub socket_path: Option<String>,
    /// Run the remote Docker client through `sudo -n`.
    #[serde(default)]
    pub sudo: bool,
    /// How Docker connections cross the SSH session (ssh); unset means the engine's
    /// default (`CAPSTAN_SSH_TUNNEL`, else `auto`).
    #[serde(default)]
    pub ssh_tunnel: Option<SshTunnel>,
    /// The pinned SSH host key, OpenSSH public key format (`ssh-ed25519 AAAA…`).
    pub host_key: Option<String>,
    /// For local devices: `unix:///path`, `tcp://host:port`; unset means `DOCKER_HOST` or
    /// `/var/run/docker.sock` at connect time.
    pub docker_host: Option<String>,
    /// For tls devices: the server name to verify (default: the host).
    pub tls_server_name: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The secret fields a device may have, each a vault record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SecretField {
    Password,
    PrivateKey,
    KeyPassphrase,
    DockerPassword,
    DockerPrivateKey,
    DockerKeyPassphrase,
    TlsCa,
    TlsCert,
    TlsKey,
}

impl SecretField {
    pub const ALL: [SecretField; 9] = [
        SecretField::Password,
        SecretField::PrivateKey,
        SecretField::KeyPassphrase,
        SecretField::DockerPassword,
        SecretField::DockerPrivateKey,
        SecretField::DockerKeyPassphrase,
        SecretField::TlsCa,
        SecretField::TlsCert,
        SecretField::TlsKey,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SecretField::Password => "password",
            SecretField::PrivateKey => "private-key",
            SecretField::KeyPassphrase => "key-passphrase",
            SecretField::DockerPassword => "docker-password",
            SecretField::DockerPrivateKey => "docker-private-key",
            SecretField::DockerKeyPassphrase => "docker-key-passphrase",
            SecretField::TlsCa => "tls-ca",
            SecretField::TlsCert => "tls-cert",
            SecretField::TlsKey => "tls-key",
        }
    }
}

/// Secret values for a device, keyed by field.
#[derive(Debug, Default, Clone)]
pub struct DeviceSecrets(pub BTreeMap<SecretField, Secret>);

impl DeviceSecrets {
    pub fn get(&self, f: SecretField) -> Option<&Secret> {
        self.0.get(&f)
    }
    pub fn set(&mut self, f: SecretField, s: Secret) {
        self.0.insert(f, s);
    }
}

impl Device {
    /// A device of `kind` with nothing set but its name and a fresh id (not validated).
    pub fn blank(kind: DeviceKind, name: &str) -> Device {
        let now = Utc::now();
        Device {
            id: Uuid::new_v4(),
            name: name.to_string(),
            kind,
            host: None,
            port: None,
            user: None,
            auth: None,
            key_has_passphrase: false,
            docker_login: None,
            ip_family: IpFamily::Any,
            agent_forwarding: false,
            keyboard_interactive: false,
            socket_path: None,
            sudo: false,
            ssh_tunnel: None,
            host_key: None,
            docker_host: None,
            tls_server_name: None,
            created_at: now,
            updated_at: now,
        }
    }

    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(match self.kind {
            DeviceKind::Ssh => 22,
            DeviceKind::Tls => 2376,
            DeviceKind::Local => 0,
        })
    }

    /// The secret fields this device's settings call for.
    pub fn required_secrets(&self) -> Vec<SecretField> {
        let mut v = Vec::new();
        match self.kind {
            DeviceKind::Ssh => {
                match self.auth {
                    Some(SshAuth::Password) => v.push(SecretField::Password),
                    Some(SshAuth::Key) => {
                        v.push(SecretField::PrivateKey);
                        if self.key_has_passphrase {
                            v.push(SecretField::KeyPassphrase);
                        }
                    }
                    _ => {}
                }
                if let Some(d) = &self.docker_login {
                    match d.auth {
                        SshAuth::Password => v.push(SecretField::DockerPassword),
                        SshAuth::Key => {
                            v.push(SecretField::DockerPrivateKey);
                            if d.key_has_passphrase {
                                v.push(SecretField::DockerKeyPassphrase);
                            }
                        }
                        _ => {}
                    }
                }
            }
            DeviceKind::Tls => v.extend([
                SecretField::TlsCa,
                SecretField::TlsCert,
                SecretField::TlsKey,
            ]),
            DeviceKind::Local => {}
        }
        v
    }

    /// `user@host:port` or the socket, for listings.
    pub fn address(&self) -> String {
        match self.kind {
            DeviceKind::Ssh => format!(
                "{}@{}",
                self.user.as_deref().unwrap_or("?"),
                host_port(self.host.as_deref().unwrap_or("?"), self.port_or_default())
            ),
            DeviceKind::Tls => format!(
                "tcp://{}",
                host_port(self.host.as_deref().unwrap_or("?"), self.port_or_default())
            ),
            DeviceKind::Local => self
                .docker_host
                .clone()
                .unwrap_or_else(|| "DOCKER_HOST or unix:///var/run/docker.sock".into()),
        }
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A device as a request describes it: every setting and secret `capstan device add` and
/// `device edit` take, the body of `POST`/`PATCH /api/devices` and of
/// `POST /api/docker/pre-check`. One type for all of them, so a new setting is one field
/// here (and one in [`Device`]).
///
/// Applied to a blank device (add) or an existing one (edit): an absent field (`None`) is
/// left as it is, `null` (`Some(None)`) clears it (a secret too), and a value replaces
/// it. On add, `name` and `kind` are required. Secrets are write-only: they serialize
/// (for the CLI's request to a running engine) but no response ever carries one.
#[derive(Debug, Default, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = DeviceBody)]
pub struct DeviceSpec {
    /// Unique name (letters, digits, `.`, `_`, `-`); on update, renames the device.
    #[schema(example = "web1")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// How to reach the daemon; cannot change on update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<DeviceKind>,
    /// Host name or address (ssh, tls).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, nullable)]
    pub host: Option<Option<String>>,
    /// Port; defaults: 22 for ssh, 2376 for tls.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<u16>, nullable, minimum = 1)]
    pub port: Option<Option<u16>>,
    /// SSH login user.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, nullable)]
    pub user: Option<Option<String>>,
    /// SSH auth method; inferred from `private_key` / `password` when absent.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<SshAuth>, nullable)]
    pub auth: Option<Option<SshAuth>>,
    /// SSH password (write-only).
    #[serde(
        default,
        deserialize_with = "nullable",
        serialize_with = "expose_secret",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    pub password: Option<Option<Secret>>,
    /// SSH private key, OpenSSH or PEM text (write-only).
    #[serde(
        default,
        deserialize_with = "nullable",
        serialize_with = "expose_secret",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    pub private_key: Option<Option<Secret>>,
    /// The private key's passphrase (write-only).
    #[serde(
        default,
        deserialize_with = "nullable",
        serialize_with = "expose_secret",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    pub key_passphrase: Option<Option<Secret>>,
    /// Separate SSH credentials for the Docker connection only; `null` drops them.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<DockerLoginSpec>, nullable)]
    pub docker_login: Option<Option<DockerLoginSpec>>,
    /// Resolve the host to IPv4 or IPv6 addresses only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_family: Option<IpFamily>,
    /// Request agent forwarding on the SSH session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_forwarding: Option<bool>,
    /// Answer keyboard-interactive password prompts with the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyboard_interactive: Option<bool>,
    /// Docker socket on the remote host, e.g. `/run/user/1000/docker.sock`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, nullable)]
    pub socket_path: Option<Option<String>>,
    /// Run the remote docker client through `sudo -n`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sudo: Option<bool>,
    /// How Docker connections cross the SSH session; `null` returns to the engine's
    /// default (`CAPSTAN_SSH_TUNNEL`, else `auto`).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<SshTunnel>, nullable)]
    pub ssh_tunnel: Option<Option<SshTunnel>>,
    /// The SSH host key to pin, an OpenSSH public key line (`ssh-ed25519 AAAA…`).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, nullable)]
    pub host_key: Option<Option<String>>,
    /// Local daemon address: `unix:///path` or `tcp://host:port`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, nullable)]
    pub docker_host: Option<Option<String>>,
    /// Name to verify in the daemon's TLS certificate (default: the host).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, nullable)]
    pub tls_server_name: Option<Option<String>>,
    /// CA certificate, PEM (write-only).
    #[serde(
        default,
        deserialize_with = "nullable",
        serialize_with = "expose_secret",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    pub tls_ca: Option<Option<Secret>>,
    /// Client certificate, PEM (write-only).
    #[serde(
        default,
        deserialize_with = "nullable",
        serialize_with = "expose_secret",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    pub tls_cert: Option<Option<Secret>>,
    /// Client private key, PEM (write-only).
    #[serde(
        default,
        deserialize_with = "nullable",
        serialize_with = "expose_secret",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    pub tls_key: Option<Option<Secret>>,
}

/// Docker-only SSH credentials in a [`DeviceSpec`]. On edit, `user` and `auth` default
/// to the device's current Docker login.
#[derive(Debug, Default, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = DockerLoginBody)]
pub struct DockerLoginSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Inferred from `private_key` / `password` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<SshAuth>,
    #[serde(
        default,
        deserialize_with = "nullable",
        serialize_with = "expose_secret",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    pub password: Option<Option<Secret>>,
    #[serde(
        default,
        deserialize_with = "nullable",
        serialize_with = "expose_secret",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    pub private_key: Option<Option<Secret>>,
    #[serde(
        default,
        deserialize_with = "nullable",
        serialize_with = "expose_secret",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = Password, write_only, nullable)]
    pub key_passphrase: Option<Option<Secret>>,
}

/// `Some(value)` for a value, `Some(None)` for `null`; absent fields stay `None`
/// (with `#[serde(default)]`): "leave", "clear" and "set" in one field.
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Writes a secret of a spec as its text (`null` to clear it): only a spec serializes a
/// secret, for the CLI's request to the engine on this host.
fn expose_secret<S: serde::Serializer>(
    v: &Option<Option<Secret>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(Some(secret)) => s.serialize_str(secret.expose_str().map_err(|_| {
            serde::ser::Error::custom("a secret is not text (UTF-8) and cannot be sent")
        })?),
        _ => s.serialize_none(),
    }
}

/// The auth method a login uses: the one given, else the one its secrets imply (a
/// private key means key auth, a password password auth). The only place Capstan infers
/// it.
pub fn inferred_auth(given: Option<SshAuth>, has_key: bool, has_password: bool) -> Option<SshAuth> {
    given.or(if has_key {
        Some(SshAuth::Key)
    } else if has_password {
        Some(SshAuth::Password)
    } else {
        None
    })
}

impl DeviceSpec {
    /// The change that pins `key` (an OpenSSH public key line) as the host key.
    pub fn pin_host_key(key: &str) -> DeviceSpec {
        DeviceSpec {
            host_key: Some(Some(key.to_string())),
            ..Default::default()
        }
    }

    /// What the spec says about a secret field: `Some(Some(v))` sets it, `Some(None)`
    /// clears it, `None` leaves it.
    pub fn secret_change(&self, f: SecretField) -> Option<Option<&Secret>> {
        let login = self.docker_login.as_ref().and_then(|l| l.as_ref());
        let slot = match f {
            SecretField::Password => &self.password,
            SecretField::PrivateKey => &self.private_key,
            SecretField::KeyPassphrase => &self.key_passphrase,
            SecretField::DockerPassword => {
                return login.and_then(|l| l.password.as_ref()).map(Option::as_ref);
            }
            SecretField::DockerPrivateKey => {
                return login
                    .and_then(|l| l.private_key.as_ref())
                    .map(Option::as_ref);
            }
            SecretField::DockerKeyPassphrase => {
                return login
                    .and_then(|l| l.key_passphrase.as_ref())
                    .map(Option::as_ref);
            }
            SecretField::TlsCa => &self.tls_ca,
            SecretField::TlsCert => &self.tls_cert,
            SecretField::TlsKey => &self.tls_key,
        };
        slot.as_ref().map(Option::as_ref)
    }

    /// The secret value the spec gives for `f`, if any.
    pub fn secret(&self, f: SecretField) -> Option<&Secret> {
        self.secret_change(f).flatten()
    }

    /// Sets (`Some`) or clears (`None`) a secret field; a Docker-login secret creates the
    /// spec's Docker login if it has none.
    pub fn set_secret(&mut self, f: SecretField, value: Option<Secret>) {
        let slot = match f {
            SecretField::Password => &mut self.password,
            SecretField::PrivateKey => &mut self.private_key,
            SecretField::KeyPassphrase => &mut self.key_passphrase,
            SecretField::DockerPassword => &mut self.docker_login_mut().password,
            SecretField::DockerPrivateKey => &mut self.docker_login_mut().private_key,
            SecretField::DockerKeyPassphrase => &mut self.docker_login_mut().key_passphrase,
            SecretField::TlsCa => &mut self.tls_ca,
            SecretField::TlsCert => &mut self.tls_cert,
            SecretField::TlsKey => &mut self.tls_key,
        };
        *slot = Some(value);
    }

    /// The spec's Docker login, created empty (user and auth from the device) if absent.
    pub fn docker_login_mut(&mut self) -> &mut DockerLoginSpec {
        if !matches!(self.docker_login, Some(Some(_))) {
            self.docker_login = Some(Some(DockerLoginSpec::default()));
        }
        match &mut self.docker_login {
            Some(Some(l)) => l,
            _ => unreachable!("set just above"),
        }
    }

    /// The secret values the spec gives (for a check of an unsaved device).
    pub fn given_secrets(&self) -> DeviceSecrets {
        let mut s = DeviceSecrets::default();
        for f in SecretField::ALL {
            if let Some(v) = self.secret(f) {
                s.set(f, v.clone());
            }
        }
        s
    }

    /// The auth method of the device's own login this spec sets, given or inferred
    /// (`None`: the spec leaves it).
    pub fn auth_change(&self) -> Option<Option<SshAuth>> {
        match self.auth {
            Some(a) => Some(a),
            None => inferred_auth(
                None,
                self.secret(SecretField::PrivateKey).is_some(),
                self.secret(SecretField::Password).is_some(),
            )
            .map(Some),
        }
    }

    /// The kind of the device this spec adds (`existing` `None`) or edits.
    fn kind_for(&self, existing: Option<&Device>) -> Result<DeviceKind, DeviceError> {
        match (self.kind, existing) {
            (Some(k), Some(d)) if k != d.kind => Err(DeviceError::Spec(format!(
                "device {} is a {} device; a device's kind cannot change (delete it and create it again)",
                d.name, d.kind
            ))),
            (_, Some(d)) => Ok(d.kind),
            (Some(k), None) => Ok(k),
            (None, None) => Err(DeviceError::Spec(
                "a new device needs a kind: ssh, tls or local".into(),
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("invalid device: {0}")]
    Invalid(Invalid),
    #[error("no device named {0:?} (see `capstan device list`)")]
    NotFound(String),
    #[error("a device named {0:?} already exists")]
    Duplicate(String),
    /// A spec that does not say enough to apply (no kind or name for a new device, a
    /// kind change, a Docker login without user or auth): the request's own mistake.
    #[error("{0}")]
    Spec(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Vault(#[from] VaultError),
}

fn invalid(msg: impl Into<String>) -> DeviceError {
    DeviceError::Invalid(Invalid(msg.into()))
}

/// Why a device is invalid. The message names settings as `[[setting]]`, which reads as
/// the command-line flag (`Display`, for the CLI) or as the request body's field
/// ([`Invalid::for_api`]), so each audience is told what it can actually give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(String);

/// Each setting a message can name: as the CLI spells it, and as the API body does.
const SETTING_NAMES: &[(&str, &str, &str)] = &[
    ("host", "--host", "`host`"),
    ("user", "--user", "`user`"),
    ("auth", "--auth", "`auth`"),
    (
        "password",
        "--password-file or --password-stdin",
        "`password`",
    ),
    ("private-key", "--ssh-key-file", "`private_key`"),
    (
        "key-passphrase",
        "--key-passphrase-file or --key-passphrase-stdin",
        "`key_passphrase`",
    ),
    ("docker-user", "--docker-user", "`docker_login`"),
    (
        "docker-password",
        "--docker-password-file or --docker-password-stdin",
        "`docker_login.password`",
    ),
    (
        "docker-private-key",
        "--docker-key-file",
        "`docker_login.private_key`",
    ),
    (
        "docker-key-passphrase",
        "--docker-key-passphrase-file",
        "`docker_login.key_passphrase`",
    ),
    (
        "keyboard-interactive",
        "--keyboard-interactive",
        "`keyboard_interactive`",
    ),
    (
        "agent-forwarding",
        "--agent-forwarding",
        "`agent_forwarding`",
    ),
    ("sudo", "--sudo", "`sudo`"),
    ("ssh-tunnel", "--ssh-tunnel", "`ssh_tunnel`"),
    ("host-key", "--host-key", "`host_key`"),
    ("docker-host", "--docker-host", "`docker_host`"),
    ("tls-server-name", "--tls-server-name", "`tls_server_name`"),
    ("tls-ca", "--tls-ca", "`tls_ca`"),
    ("tls-cert", "--tls-cert", "`tls_cert`"),
    ("tls-key", "--tls-key", "`tls_key`"),
];

impl Invalid {
    /// The message as the API tells it: settings named by their body fields.
    pub fn for_api(&self) -> String {
        self.render(|&(_, _, api)| api)
    }

    /// The setting this is about (the first the message names), as the API body names
    /// it: `host`, `private_key`, `docker_login.private_key`, …
    pub fn setting(&self) -> Option<&'static str> {
        let mut rest = self.0.as_str();
        while let Some(start) = rest.find("[[") {
            let Some(len) = rest[start + 2..].find("]]") else {
                break;
            };
            let key = &rest[start + 2..start + 2 + len];
            if let Some((_, _, api)) = SETTING_NAMES.iter().find(|(k, _, _)| *k == key) {
                return Some(api.trim_matches('`'));
            }
            rest = &rest[start + 4 + len..];
        }
        None
    }

    /// A message as the API told it ([`Invalid::for_api`]), with every setting named
    /// by its command-line flag instead: the words `Display` would have used.
    pub fn api_message_in_cli_words(api_message: &str) -> String {
        SETTING_NAMES
            .iter()
            .fold(api_message.to_string(), |msg, (_, cli, api)| {
                msg.replace(api, cli)
            })
    }

    fn render(
        &self,
        pick: impl Fn(&(&'static str, &'static str, &'static str)) -> &'static str,
    ) -> String {
        let mut out = String::with_capacity(self.0.len());
        let mut rest = self.0.as_str();
        while let Some(start) = rest.find("[[") {
            let Some(len) = rest[start + 2..].find("]]") else {
                break;
            };
            let key = &rest[start + 2..start + 2 + len];
            out.push_str(&rest[..start]);
            match SETTING_NAMES.iter().find(|(k, _, _)| *k == key) {
                Some(names) => out.push_str(pick(names)),
                None => out.push_str(&rest[start..start + 4 + len]),
            }
            rest = &rest[start + 4 + len..];
        }
        out.push_str(rest);
        out
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render(|&(_, cli, _)| cli))
    }
}

/// Checks a device name: 1–64 characters of letters, digits, `.`, `_`, `-`, starting with a
/// letter or digit (names appear in URLs, policies and globs).
pub fn validate_name(name: &str) -> Result<(), DeviceError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let starts_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 64 || !ok_chars || !starts_ok {
        return Err(invalid(format!(
            "device name {name:?} must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
        )));
    }
    Ok(())
}

/// Applies `spec` to `dev` (secrets aside) and records which key passphrases exist.
/// `has_secret` says which secrets the device holds now.
fn apply(
    dev: &mut Device,
    spec: &DeviceSpec,
    has_secret: &dyn Fn(SecretField) -> bool,
) -> Result<(), DeviceError> {
    if let Some(v) = &spec.name {
        dev.name = v.clone();
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = &spec.$f { dev.$f = v.clone(); } )* };
    }
    set!(
        host,
        port,
        user,
        ip_family,
        agent_forwarding,
        keyboard_interactive,
        socket_path,
        sudo,
        ssh_tunnel,
        docker_host,
        tls_server_name
    );
    if let Some(a) = spec.auth_change() {
        dev.auth = a;
    }
    if let Some(k) = &spec.host_key {
        dev.host_key = k.as_ref().map(|k| k.trim().to_string());
    }
    match &spec.docker_login {
        None => {}
        Some(None) => dev.docker_login = None,
        Some(Some(l)) => {
            let current = dev.docker_login.as_ref();
            let user = l
                .user
                .clone()
                .or_else(|| current.map(|c| c.user.clone()))
                .ok_or_else(|| DeviceError::Spec("docker_login needs a user".into()))?;
            let auth = inferred_auth(
                l.auth,
                spec.secret(SecretField::DockerPrivateKey).is_some(),
                spec.secret(SecretField::DockerPassword).is_some(),
            )
            .or_else(|| current.map(|c| c.auth))
            .ok_or_else(|| {
                DeviceError::Spec(
                    "docker_login needs private_key, password or an auth method".into(),
                )
            })?;
            dev.docker_login = Some(DockerSshLogin {
                user,
                auth,
                key_has_passphrase: false,
            });
        }
    }
    let will_have = |f: SecretField| match spec.secret_change(f) {
        Some(v) => v.is_some(),
        None => has_secret(f),
    };
    dev.key_has_passphrase =
        dev.auth == Some(SshAuth::Key) && will_have(SecretField::KeyPassphrase);
    if let Some(d) = &mut dev.docker_login {
        d.key_has_passphrase =
            d.auth == SshAuth::Key && will_have(SecretField::DockerKeyPassphrase);
    }
    Ok(())
}

/// The device `spec` describes as a new device, validated (store aside): what `add`
/// would store, for callers that send it elsewhere (the CLI to a running engine) or only
/// check it (the pre-check of an unsaved device).
pub fn new_device(spec: &DeviceSpec) -> Result<Device, DeviceError> {
    let kind = spec.kind_for(None)?;
    if spec.name.is_none() {
        return Err(DeviceError::Spec("a new device needs a name".into()));
    }
    let mut dev = Device::blank(kind, "");
    apply(&mut dev, spec, &|_| false)?;
    validate(&dev, &|f| spec.secret(f).cloned())?;
    Ok(dev)
}

/// Validates a device and the secrets it will have. `secret` looks up a secret value
/// (new or stored).
pub fn validate(
    dev: &Device,
    secret: &dyn Fn(SecretField) -> Option<Secret>,
) -> Result<(), DeviceError> {
    validate_name(&dev.name)?;
    let need_host = |what: &str| -> Result<&str, DeviceError> {
        match dev.host.as_deref().map(str::trim) {
            Some(h) if !h.is_empty() => Ok(h),
            _ => Err(invalid(format!(
                "{} devices need a host: give [[host]]",
                what
            ))),
        }
    };
    if dev.port == Some(0) {
        return Err(invalid("port 0 is not a port"));
    }
    match dev.kind {
        DeviceKind::Ssh => {
            let host = need_host("ssh")?;
            if host.starts_with('-') || host.contains(char::is_whitespace) {
                return Err(invalid(format!(
                    "host {host:?} is not a host name or address"
                )));
            }
            match dev.user.as_deref() {
                Some(u) if !u.is_empty() && !u.starts_with('-') => {}
                _ => return Err(invalid("ssh devices need a login user: give [[user]]")),
            }
            let auth = dev.auth.ok_or_else(|| {
                invalid("ssh devices need an auth method: give [[private-key]] or [[password]], or [[auth]] agent or none")
            })?;
            check_login_secrets(
                auth,
                SecretField::Password,
                SecretField::PrivateKey,
                SecretField::KeyPassphrase,
                "",
                secret,
            )?;
            if dev.keyboard_interactive && auth != SshAuth::Password {
                return Err(invalid(
                    "[[keyboard-interactive]] answers prompts with the password: use it with password auth",
                ));
            }
            if let Some(d) = &dev.docker_login {
                if d.user.is_empty() {
                    return Err(invalid("Docker-only SSH credentials need a user"));
                }
                check_login_secrets(
                    d.auth,
                    SecretField::DockerPassword,
                    SecretField::DockerPrivateKey,
                    SecretField::DockerKeyPassphrase,
                    "docker-",
                    secret,
                )?;
            }
            if let Some(p) = &dev.socket_path {
                validate_socket_path(p)?;
            }
            if dev.ssh_tunnel == Some(SshTunnel::Streamlocal) {
                if dev.sudo {
                    return Err(invalid(
                        "[[ssh-tunnel]] streamlocal cannot go through sudo: a sudo device reaches Docker only by running `sudo -n docker system dial-stdio` (use [[ssh-tunnel]] auto or dial-stdio, or turn [[sudo]] off)",
                    ));
                }
                if dev.agent_forwarding {
                    return Err(invalid(
                        "[[ssh-tunnel]] streamlocal runs no remote command, so a forwarded agent would serve nothing (use [[ssh-tunnel]] auto or dial-stdio, or turn [[agent-forwarding]] off)",
                    ));
                }
            }
            if let Some(k) = &dev.host_key {
                parse_host_key(k)?;
            }
            if dev.docker_host.is_some() || dev.tls_server_name.is_some() {
                return Err(invalid(
                    "[[docker-host]] and [[tls-server-name]] are for local and tls devices",
                ));
            }
        }
        DeviceKind::Tls => {
            need_host("tls")?;
            for (f, flag) in [
                (SecretField::TlsCa, "[[tls-ca]]"),
                (SecretField::TlsCert, "[[tls-cert]]"),
                (SecretField::TlsKey, "[[tls-key]]"),
            ] {
                let s = secret(f)
                    .ok_or_else(|| invalid(format!("tls devices need {flag} (a PEM file)")))?;
                check_pem(&s, f, flag)?;
            }
            if dev.user.is_some()
                || dev.auth.is_some()
                || dev.docker_login.is_some()
                || dev.sudo
                || dev.ssh_tunnel.is_some()
                || dev.host_key.is_some()
            {
                return Err(invalid(
                    "SSH options ([[user]], [[auth]], [[docker-user]], [[sudo]], [[ssh-tunnel]], [[host-key]]) do not apply to tls devices",
                ));
            }
        }
        DeviceKind::Local => {
            if dev.host.is_some()
                || dev.user.is_some()
                || dev.auth.is_some()
                || dev.sudo
                || dev.ssh_tunnel.is_some()
                || dev.docker_login.is_some()
            {
                return Err(invalid(
                    "local devices take only [[docker-host]] (unix:///path or tcp://host:port); host, user and auth are for ssh and tls devices",
                ));
            }
            if let Some(h) = &dev.docker_host {
                validate_docker_host(h)?;
            }
        }
    }
    Ok(())
}

fn check_login_secrets(
    auth: SshAuth,
    password: SecretField,
    key: SecretField,
    passphrase: SecretField,
    flag_prefix: &str,
    secret: &dyn Fn(SecretField) -> Option<Secret>,
) -> Result<(), DeviceError> {
    match auth {
        SshAuth::Password => {
            if secret(password).is_none_or(|s| s.is_empty()) {
                return Err(invalid(format!(
                    "password auth needs a password: give [[{flag_prefix}password]]"
                )));
            }
        }
        SshAuth::Key => {
            let k = secret(key)
                .ok_or_else(|| invalid(format!("key auth needs [[{flag_prefix}private-key]]")))?;
            let pass = secret(passphrase);
            check_private_key(&k, pass.as_ref(), flag_prefix)?;
        }
        SshAuth::Agent | SshAuth::None => {}
    }
    Ok(())
}

/// Checks that `key` is an SSH private key the connector can use, and that the passphrase
/// (if any) opens it.
pub fn check_private_key(
    key: &Secret,
    passphrase: Option<&Secret>,
    flag_prefix: &str,
) -> Result<(), DeviceError> {
    let text = key.expose_str().map_err(|_| {
        invalid(format!(
            "the key given as [[{flag_prefix}private-key]] is not a private key (not text)"
        ))
    })?;
    if !text.contains("PRIVATE KEY") && !text.starts_with("PuTTY-User-Key-File-") {
        return Err(invalid(format!(
            "the key given as [[{flag_prefix}private-key]] is not a private key (expected an OpenSSH or PEM private key; a .pub file is the public half)"
        )));
    }
    let pass = match passphrase {
        Some(p) => Some(
            p.expose_str()
                .map_err(|_| invalid("the key passphrase is not UTF-8"))?,
        ),
        None => None,
    };
    match russh::keys::decode_secret_key(text, pass) {
        Ok(_) => Ok(()),
        Err(russh::keys::Error::KeyIsEncrypted) => Err(invalid(format!(
            "the key given as [[{flag_prefix}private-key]] is encrypted: give its passphrase as [[{flag_prefix}key-passphrase]]"
        ))),
        Err(e) if pass.is_some() => Err(invalid(format!(
            "the key given as [[{flag_prefix}private-key]] does not open with the given passphrase, or is not a supported private key ({e})"
        ))),
        Err(e) => Err(invalid(format!(
            "the key given as [[{flag_prefix}private-key]] is not a usable private key: {e}"
        ))),
    }
}

/// Parses a pinned host key in OpenSSH public key format.
pub fn parse_host_key(k: &str) -> Result<russh::keys::PublicKey, DeviceError> {
    russh::keys::PublicKey::from_openssh(k.trim()).map_err(|e| {
        invalid(format!(
            "host key is not an OpenSSH public key line like 'ssh-ed25519 AAAA…' ({e})"
        ))
    })
}

fn check_pem(s: &Secret, f: SecretField, flag: &str) -> Result<(), DeviceError> {
    let text = s.expose_str().unwrap_or("");
    let want_key = f == SecretField::TlsKey;
    let ok = if want_key {
        text.contains("-----BEGIN") && text.contains("PRIVATE KEY-----")
    } else {
        text.contains("-----BEGIN CERTIFICATE-----")
    };
    if !ok {
        let what = if want_key {
            "a PEM private key"
        } else {
            "a PEM certificate"
        };
        return Err(invalid(format!("{flag} must be {what}")));
    }
    Ok(())
}

fn validate_socket_path(p: &str) -> Result<(), DeviceError> {
    if !p.starts_with('/')
        || p.contains(char::is_whitespace)
        || p.contains(['\'', '"', '`', '$', ';', '&', '|', '\\'])
    {
        return Err(invalid(format!(
            "socket path {p:?} must be an absolute path without spaces or shell characters"
        )));
    }
    Ok(())
}

pub fn validate_docker_host(h: &str) -> Result<(), DeviceError> {
    let ok = match (h.strip_prefix("unix://"), h.strip_prefix("tcp://")) {
        (Some(p), _) => p.starts_with('/'),
        (None, Some(rest)) => rest
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()),
        (None, None) => false,
    };
    if ok {
        return Ok(());
    }
    Err(invalid(format!(
        "docker host {h:?} must be unix:///absolute/path or tcp://host:port"
    )))
}

/// The device registry: records in the store, secrets in the vault.
pub struct Devices<'a> {
    records: DeviceRecords,
    vault: &'a Vault,
}

impl<'a> Devices<'a> {
    pub fn new(store: &Store, vault: &'a Vault) -> Result<Self, DeviceError> {
        Ok(Devices {
            records: DeviceRecords::open(store)?,
            vault,
        })
    }

    fn secret_name(id: Uuid, f: SecretField) -> SecretName {
        SecretName::new(VAULT_KIND, &id.to_string(), f.as_str())
    }

    pub fn list(&self) -> Result<Vec<Device>, DeviceError> {
        let mut v = self.records.list()?;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Finds a device by name or by UUID.
    pub fn get(&self, name_or_id: &str) -> Result<Device, DeviceError> {
        let id = match Uuid::parse_str(name_or_id) {
            Ok(id) => Some(id),
            Err(_) => self.records.id_of(name_or_id)?,
        };
        let id = id.ok_or_else(|| DeviceError::NotFound(name_or_id.into()))?;
        self.records
            .get(id)?
            .ok_or_else(|| DeviceError::NotFound(name_or_id.into()))
    }

    /// The secrets this device holds (for connecting; never for display).
    pub fn secrets(&self, dev: &Device) -> Result<DeviceSecrets, DeviceError> {
        let mut s = DeviceSecrets::default();
        for f in SecretField::ALL {
            if let Some(v) = self.vault.get(&Self::secret_name(dev.id, f))? {
                s.set(f, v);
            }
        }
        Ok(s)
    }

    /// Which secret fields are stored (names only).
    pub fn stored_secret_fields(&self, dev: &Device) -> Result<Vec<SecretField>, DeviceError> {
        let mut v = Vec::new();
        for f in SecretField::ALL {
            if self.vault.contains(&Self::secret_name(dev.id, f))? {
                v.push(f);
            }
        }
        Ok(v)
    }

    /// Adds the device `spec` describes (its `kind` and `name` are required).
    pub fn add(&self, spec: DeviceSpec) -> Result<Device, DeviceError> {
        let dev = new_device(&spec)?;
        self.write(None, &dev, &spec)?;
        Ok(dev)
    }

    /// Applies `spec` to a stored device; its kind cannot change.
    pub fn edit(&self, name_or_id: &str, spec: DeviceSpec) -> Result<Device, DeviceError> {
        let old = self.get(name_or_id)?;
        spec.kind_for(Some(&old))?;
        let stored = self.secrets(&old)?;
        let mut dev = old.clone();
        apply(&mut dev, &spec, &|f| stored.get(f).is_some())?;
        dev.updated_at = Utc::now();
        let lookup = |f: SecretField| match spec.secret_change(f) {
            Some(given) => given.cloned(),
            None => stored.get(f).cloned(),
        };
        validate(&dev, &lookup)?;
        self.write(Some(&old), &dev, &spec)?;
        Ok(dev)
    }

    pub fn remove(&self, name_or_id: &str) -> Result<Device, DeviceError> {
        let dev = self.get(name_or_id)?;
        let id = dev.id;
        self.records.remove(id, &dev.name)?;
        self.vault.remove_record(VAULT_KIND, &id.to_string())?;
        Ok(dev)
    }

    /// Stores secrets first, then the record and its name atomically; drops secrets the
    /// device no longer calls for. Each vault step is one replacement of the vault file,
    /// so a replaced or dropped secret leaves no copy in the data directory.
    fn write(
        &self,
        old: Option<&Device>,
        dev: &Device,
        spec: &DeviceSpec,
    ) -> Result<(), DeviceError> {
        self.vault.change(|c| {
            for f in SecretField::ALL {
                if let Some(v) = spec.secret(f) {
                    c.put(&Self::secret_name(dev.id, f), v);
                }
            }
        })?;
        let id = dev.id;
        if self.records.put(old.map(|o| o.name.as_str()), dev)? == Put::NameTaken {
            return Err(DeviceError::Duplicate(dev.name.clone()));
        }
        let keep = dev.required_secrets();
        self.vault.change(|c| {
            for f in SecretField::ALL {
                if !keep.contains(&f) {
                    c.remove(&Self::secret_name(id, f));
                }
            }
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_names_that_would_break_urls_and_globs() {
        for bad in ["", "-x", "a b", "a/b", "a*", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} should be rejected");
        }
        for good in ["local", "prod-web.1", "a_b", "9lives"] {
            validate_name(good).unwrap();
        }
    }

    #[test]
    fn docker_host_must_be_unix_or_tcp_with_port() {
        validate_docker_host("unix:///var/run/docker.sock").unwrap();
        validate_docker_host("tcp://127.0.0.1:2375").unwrap();
        for bad in [
            "/var/run/docker.sock",
            "unix://relative",
            "tcp://host",
            "http://x:1",
            "tcp://:1",
        ] {
            assert!(validate_docker_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn socket_path_refuses_shell_characters() {
        assert!(validate_socket_path("/run/docker.sock").is_ok());
        for bad in ["run/docker.sock", "/x;rm -rf /", "/a b", "/$(id)"] {
            assert!(validate_socket_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_public_key_is_not_accepted_as_a_private_key() {
        let pubkey = Secret::from_str_owned(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ me"
                .into(),
        );
        let err = check_private_key(&pubkey, None, "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a private key"), "{err}");
    }

    fn agent_ssh_device() -> Device {
        let mut d = Device::blank(DeviceKind::Ssh, "web1");
        d.host = Some("10.0.0.5".into());
        d.user = Some("ops".into());
        d.auth = Some(SshAuth::Agent);
        d
    }

    #[test]
    fn the_tunnel_setting_is_for_ssh_devices_and_streamlocal_excludes_sudo_and_agent_forwarding() {
        let none = |_: SecretField| None;
        let mut d = agent_ssh_device();
        for t in [
            None,
            Some(SshTunnel::Auto),
            Some(SshTunnel::Streamlocal),
            Some(SshTunnel::DialStdio),
        ] {
            d.ssh_tunnel = t;
            validate(&d, &none).unwrap();
        }
        for t in [SshTunnel::Auto, SshTunnel::DialStdio] {
            d.ssh_tunnel = Some(t);
            d.sudo = true;
            d.agent_forwarding = true;
            validate(&d, &none).unwrap();
        }
        d.ssh_tunnel = Some(SshTunnel::Streamlocal);
        d.agent_forwarding = false;
        let err = validate(&d, &none).unwrap_err().to_string();
        assert!(err.contains("sudo") && err.contains("dial-stdio"), "{err}");
        d.sudo = false;
        d.agent_forwarding = true;
        let err = validate(&d, &none).unwrap_err().to_string();
        assert!(err.contains("--agent-forwarding"), "{err}");

        let mut local = Device::blank(DeviceKind::Local, "here");
        local.ssh_tunnel = Some(SshTunnel::DialStdio);
        let err = validate(&local, &none).unwrap_err().to_string();
        assert!(err.contains("local devices take only"), "{err}");
    }

    #[test]
    fn records_written_before_the_tunnel_setting_still_read() {
        let mut v = serde_json::to_value(agent_ssh_device()).unwrap();
        v.as_object_mut().unwrap().remove("ssh_tunnel");
        let d: Device = serde_json::from_value(v).unwrap();
        assert_eq!(d.ssh_tunnel, None);
    }

    #[test]
    fn invalid_messages_name_flags_for_the_cli_and_fields_for_the_api() {
        let none = |_: SecretField| None;
        let mut d = agent_ssh_device();
        d.auth = None;
        let DeviceError::Invalid(why) = validate(&d, &none).unwrap_err() else {
            panic!("not an Invalid")
        };
        let cli = why.to_string();
        assert!(
            cli.contains(
                "--ssh-key-file or --password-file or --password-stdin, or --auth agent or none"
            ),
            "{cli}"
        );
        let api = why.for_api();
        assert!(
            api.contains("`private_key` or `password`, or `auth` agent or none"),
            "{api}"
        );
        assert!(!api.contains("--") && !api.contains("[["), "{api}");

        // The Docker-only login's flags and fields.
        d.auth = Some(SshAuth::Agent);
        d.docker_login = Some(DockerSshLogin {
            user: "docker".into(),
            auth: SshAuth::Key,
            key_has_passphrase: false,
        });
        let DeviceError::Invalid(why) = validate(&d, &none).unwrap_err() else {
            panic!("not an Invalid")
        };
        assert!(
            why.to_string()
                .ends_with("key auth needs --docker-key-file"),
            "{why}"
        );
        assert!(
            why.for_api()
                .ends_with("key auth needs `docker_login.private_key`"),
            "{}",
            why.for_api()
        );

        // Text that only looks like a marker is left alone.
        let odd = Invalid("a [[nothing]] b [[unclosed".into());
        assert_eq!(odd.to_string(), "a [[nothing]] b [[unclosed");
    }

    #[test]
    fn the_api_wording_turns_back_into_the_cli_wording_and_names_the_first_setting() {
        for (msg, setting) in [
            ("ssh devices need a host: give [[host]]", Some("host")),
            (
                "key auth needs [[docker-private-key]] (see [[docker-user]])",
                Some("docker_login.private_key"),
            ),
            (
                "[[ssh-tunnel]] streamlocal cannot go through sudo: `sudo -n docker system dial-stdio` (or turn [[sudo]] off)",
                Some("ssh_tunnel"),
            ),
            ("[[nothing]] then [[tls-key]]", Some("tls_key")),
            ("port 0 is not a port", None),
        ] {
            let why = Invalid(msg.into());
            assert_eq!(why.setting(), setting, "{msg}");
            assert_eq!(
                Invalid::api_message_in_cli_words(&why.for_api()),
                why.to_string(),
                "{msg}"
            );
        }
    }
}
