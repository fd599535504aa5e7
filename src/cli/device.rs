//! `capstan device …`: add, list, show, edit and remove Docker hosts.
//!
//! Secrets come from a file (`--password-file`, `--ssh-key-file`, …), from stdin (one
//! `--…-stdin` flag per call) or from a prompt on a terminal, never from argv alone.
//!
//! Every command speaks the engine's API: the running engine's when `capstan serve`
//! holds the data directory (so a device added or edited is in effect at once), else
//! the data directory's opened in this process. The same requests, the same output.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use std::time::Duration;

use super::client::ApiClient;
use super::{GlobalArgs, check, print_table};
use crate::device::{
    Device, DeviceKind, DeviceSpec, Invalid, IpFamily, SecretField, SshAuth, SshTunnel,
};
use crate::docker::CheckReport;
use crate::secret::Secret;

const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// Register a Docker host.
    #[command(after_help = ADD_EXAMPLES)]
    Add {
        /// Unique name (letters, digits, '.', '_', '-').
        name: String,
        /// How to reach the daemon.
        #[arg(long, value_enum)]
        kind: DeviceKind,
        #[command(flatten)]
        opts: DeviceOpts,
        /// Connect once and pin the SSH host key the server presents (trust on first
        /// use; compare the printed fingerprint with the host's). Without it, or
        /// --host-key, connections are refused until a key is pinned.
        #[arg(long, conflicts_with_all = ["host_key", "host_key_file"])]
        trust_host_key: bool,
    },
    /// Check that the Docker daemon of a device (or of every device) answers: connect,
    /// ping, version and info, each step timed. Exits non-zero when a check fails.
    #[command(after_help = CHECK_EXAMPLES)]
    Check {
        /// Device name or id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Check every device, concurrently.
        #[arg(long)]
        all: bool,
        /// With --all: how many devices are checked at once, 1-1024 [default: 16]. The
        /// engine also runs at most `[docker] check_concurrency` checks at once (default
        /// 16); past that, checks wait for a slot.
        #[arg(long, value_name = "N",
              value_parser = clap::value_parser!(u16).range(1..=crate::docker::MAX_CHECK_CONCURRENCY as i64))]
        concurrency: Option<u16>,
        /// Check the engine's own connection to the device (the SSH session plugins and
        /// proxies use, opened if there is none and kept) instead of a fresh one.
        #[arg(long, conflicts_with = "trust_host_key")]
        pooled: bool,
        /// When no SSH host key is pinned yet, pin the one the server presents (trust on
        /// first use; compare the printed fingerprint with the host's).
        #[arg(long)]
        trust_host_key: bool,
        /// Seconds allowed for connecting and for each call.
        #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=120))]
        timeout: u64,
        /// Print the reports as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List devices.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one device (never its secrets: only which ones are stored).
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change a device's settings or secrets; options as for `add`.
    Edit {
        name: String,
        /// Rename the device.
        #[arg(long)]
        rename: Option<String>,
        #[command(flatten)]
        opts: DeviceOpts,
        #[command(flatten)]
        clear: ClearOpts,
    },
    /// Remove a device and its secrets.
    #[command(alias = "remove")]
    Rm { name: String },
}

const ADD_EXAMPLES: &str = "\
Examples:
  capstan device add web1 --kind ssh --host 10.0.0.5 --user deploy --ssh-key-file ~/.ssh/id_ed25519
  capstan device add web2 --kind ssh --host web2.example --user ops --password-file pw.txt --keyboard-interactive
  capstan device add db1 --kind ssh --host db1 --user ops --auth agent --sudo --socket /run/docker.sock
  capstan device add edge --kind tls --host 10.0.0.9 --tls-ca ca.pem --tls-cert cert.pem --tls-key key.pem
  capstan device add here --kind local --docker-host unix:///var/run/docker.sock";

const CHECK_EXAMPLES: &str = "\
Examples:
  capstan device check web1
  capstan device check web1 --trust-host-key     # pin the host key on first contact
  capstan device check --all --json
  capstan device check --all --concurrency 64   # with [docker] check_concurrency = 64
  capstan device check --all --pooled           # the engine's own kept connections";

/// What `device edit` can drop.
#[derive(Debug, Args, Default)]
pub struct ClearOpts {
    /// Forget the pinned host key (the next check must pin one again).
    #[arg(long)]
    clear_host_key: bool,
    /// Drop the custom socket path.
    #[arg(long)]
    clear_socket: bool,
    /// Drop the Docker-only SSH credentials.
    #[arg(long)]
    clear_docker_login: bool,
    /// Drop the stored key passphrase.
    #[arg(long)]
    clear_key_passphrase: bool,
}

/// `--ssh-tunnel`: a device's own tunnel, or `default` for the engine's.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TunnelArg {
    Auto,
    Streamlocal,
    DialStdio,
    Default,
}

/// Device settings shared by `add` and `edit`. Booleans take an optional value, so
/// `--sudo` turns sudo on and `--sudo=false` turns it off.
#[derive(Debug, Args, Default)]
pub struct DeviceOpts {
    /// Host name or address (ssh, tls).
    #[arg(long, help_heading = "Address")]
    host: Option<String>,
    /// Port [default: 22 for ssh, 2376 for tls].
    #[arg(long, help_heading = "Address")]
    port: Option<u16>,
    /// Resolve the host to IPv4 or IPv6 addresses only.
    #[arg(long, value_enum, help_heading = "Address")]
    ip_family: Option<IpFamily>,
    /// SSH login user.
    #[arg(long, help_heading = "SSH login")]
    user: Option<String>,
    /// SSH auth method [default: inferred from --ssh-key-file / --password-*].
    #[arg(long, value_enum, help_heading = "SSH login")]
    auth: Option<SshAuth>,
    /// File with the SSH password.
    #[arg(long, value_name = "FILE", help_heading = "SSH login")]
    password_file: Option<PathBuf>,
    /// Read the SSH password from stdin.
    #[arg(long, help_heading = "SSH login")]
    password_stdin: bool,
    /// SSH private key file (ed25519, ECDSA, RSA; OpenSSH or PEM). Stored in the vault.
    #[arg(long, value_name = "FILE", help_heading = "SSH login")]
    ssh_key_file: Option<PathBuf>,
    /// File with the private key's passphrase.
    #[arg(long, value_name = "FILE", help_heading = "SSH login")]
    key_passphrase_file: Option<PathBuf>,
    /// Read the private key's passphrase from stdin.
    #[arg(long, help_heading = "SSH login")]
    key_passphrase_stdin: bool,
    /// Answer keyboard-interactive password prompts with the password.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "SSH login")]
    keyboard_interactive: Option<bool>,
    /// Request agent forwarding on the SSH session.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "SSH login")]
    agent_forwarding: Option<bool>,
    /// Pin the server's host key (an OpenSSH public key line, e.g. from ssh-keyscan).
    #[arg(
        long,
        value_name = "KEY",
        help_heading = "SSH login",
        conflicts_with = "host_key_file"
    )]
    host_key: Option<String>,
    /// Pin the server's host key from a .pub file.
    #[arg(long, value_name = "FILE", help_heading = "SSH login")]
    host_key_file: Option<PathBuf>,
    /// Log in as this user for Docker connections only (separate credentials).
    #[arg(long, help_heading = "Docker over SSH")]
    docker_user: Option<String>,
    /// Auth method of the Docker-only login [default: inferred].
    #[arg(long, value_enum, help_heading = "Docker over SSH")]
    docker_auth: Option<SshAuth>,
    /// File with the Docker-only login's password.
    #[arg(long, value_name = "FILE", help_heading = "Docker over SSH")]
    docker_password_file: Option<PathBuf>,
    /// Read the Docker-only login's password from stdin.
    #[arg(long, help_heading = "Docker over SSH")]
    docker_password_stdin: bool,
    /// The Docker-only login's private key file. Stored in the vault.
    #[arg(long, value_name = "FILE", help_heading = "Docker over SSH")]
    docker_key_file: Option<PathBuf>,
    /// File with the passphrase of the Docker-only login's private key.
    #[arg(long, value_name = "FILE", help_heading = "Docker over SSH")]
    docker_key_passphrase_file: Option<PathBuf>,
    /// Docker socket on the remote host, e.g. /run/user/1000/docker.sock.
    #[arg(long, value_name = "PATH", help_heading = "Docker over SSH")]
    socket: Option<String>,
    /// Run the remote docker client through `sudo -n`.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "Docker over SSH")]
    sudo: Option<bool>,
    /// How Docker connections cross the SSH session: `streamlocal` opens a channel
    /// straight to the remote socket (no remote process; sshd must allow stream-local
    /// forwarding), `dial-stdio` runs `docker system dial-stdio` there (the only way
    /// through sudo), `auto` tries streamlocal and falls back, `default` follows the
    /// engine (CAPSTAN_SSH_TUNNEL, else auto).
    #[arg(
        long,
        value_enum,
        value_name = "TUNNEL",
        help_heading = "Docker over SSH"
    )]
    ssh_tunnel: Option<TunnelArg>,
    /// CA certificate (PEM) that signed the daemon's certificate.
    #[arg(long, value_name = "FILE", help_heading = "TLS")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, value_name = "FILE", help_heading = "TLS")]
    tls_cert: Option<PathBuf>,
    /// Client private key (PEM). Stored in the vault.
    #[arg(long, value_name = "FILE", help_heading = "TLS")]
    tls_key: Option<PathBuf>,
    /// Name to verify in the daemon's certificate [default: the host].
    #[arg(long, help_heading = "TLS")]
    tls_server_name: Option<String>,
    /// Local daemon address: unix:///path or tcp://host:port [default: DOCKER_HOST or
    /// unix:///var/run/docker.sock].
    #[arg(long, value_name = "URL", help_heading = "Local")]
    docker_host: Option<String>,
}

fn read_file_secret(path: &std::path::Path, what: &str) -> anyhow::Result<Secret> {
    Secret::from_file(path).with_context(|| format!("cannot read {what} file {}", path.display()))
}

impl DeviceOpts {
    /// Turns the flags into a change set, reading every secret they name.
    fn into_changes(
        self,
        kind: DeviceKind,
        existing: Option<&Device>,
    ) -> anyhow::Result<DeviceSpec> {
        let stdin_flags = [
            self.password_stdin,
            self.key_passphrase_stdin,
            self.docker_password_stdin,
        ];
        if stdin_flags.iter().filter(|b| **b).count() > 1 {
            bail!(
                "only one --…-stdin flag can be used at a time (stdin is one stream); use files for the others"
            );
        }
        let mut ch = DeviceSpec::default();
        let stdin_used = stdin_flags.iter().any(|b| *b);
        let from_stdin = |what: &str| -> anyhow::Result<Secret> {
            Secret::from_reader(std::io::stdin().lock())
                .with_context(|| format!("cannot read {what} from stdin"))
        };

        // SSH login secrets.
        if let Some(p) = &self.password_file {
            ch.set_secret(
                SecretField::Password,
                Some(read_file_secret(p, "password")?),
            );
        } else if self.password_stdin {
            ch.set_secret(SecretField::Password, Some(from_stdin("the password")?));
        }
        if let Some(p) = &self.ssh_key_file {
            ch.set_secret(
                SecretField::PrivateKey,
                Some(read_file_secret(p, "SSH key")?),
            );
        }
        if let Some(p) = &self.key_passphrase_file {
            ch.set_secret(
                SecretField::KeyPassphrase,
                Some(read_file_secret(p, "key passphrase")?),
            );
        } else if self.key_passphrase_stdin {
            ch.set_secret(
                SecretField::KeyPassphrase,
                Some(from_stdin("the key passphrase")?),
            );
        }
        let inferred_auth = crate::device::inferred_auth(
            self.auth,
            ch.secret(SecretField::PrivateKey).is_some(),
            ch.secret(SecretField::Password).is_some(),
        );
        let effective_auth = inferred_auth.or(existing.and_then(|d| d.auth));
        if kind == DeviceKind::Ssh
            && effective_auth == Some(SshAuth::Password)
            && ch.secret(SecretField::Password).is_none()
            && existing.is_none()
            && !stdin_used
            && std::io::stdin().is_terminal()
        {
            let pw = rpassword::prompt_password("SSH password: ")?;
            ch.set_secret(SecretField::Password, Some(Secret::from_str_owned(pw)));
        }
        if let Some(a) = inferred_auth {
            ch.auth = Some(Some(a));
        }

        // Docker-only login.
        if let Some(p) = &self.docker_password_file {
            ch.set_secret(
                SecretField::DockerPassword,
                Some(read_file_secret(p, "Docker password")?),
            );
        } else if self.docker_password_stdin {
            ch.set_secret(
                SecretField::DockerPassword,
                Some(from_stdin("the Docker password")?),
            );
        }
        if let Some(p) = &self.docker_key_file {
            ch.set_secret(
                SecretField::DockerPrivateKey,
                Some(read_file_secret(p, "Docker SSH key")?),
            );
        }
        if let Some(p) = &self.docker_key_passphrase_file {
            ch.set_secret(
                SecretField::DockerKeyPassphrase,
                Some(read_file_secret(p, "Docker key passphrase")?),
            );
        }
        let docker_secret_given = ch.secret(SecretField::DockerPassword).is_some()
            || ch.secret(SecretField::DockerPrivateKey).is_some();
        if let Some(user) = self.docker_user.clone() {
            let auth = crate::device::inferred_auth(
                self.docker_auth,
                ch.secret(SecretField::DockerPrivateKey).is_some(),
                ch.secret(SecretField::DockerPassword).is_some(),
            )
            .or_else(|| existing.and_then(|d| d.docker_login.as_ref()).map(|l| l.auth))
            .ok_or_else(|| {
                    anyhow::anyhow!("--docker-user needs --docker-key-file, --docker-password-file/--docker-password-stdin or --docker-auth agent|none")
                })?;
            let login = ch.docker_login_mut();
            login.user = Some(user);
            login.auth = Some(auth);
        } else if self.docker_auth.is_some() || docker_secret_given {
            match existing.and_then(|d| d.docker_login.as_ref()) {
                Some(l) => {
                    let auth = crate::device::inferred_auth(
                        self.docker_auth,
                        ch.secret(SecretField::DockerPrivateKey).is_some(),
                        ch.secret(SecretField::DockerPassword).is_some(),
                    )
                    .unwrap_or(l.auth);
                    let login = ch.docker_login_mut();
                    login.user = Some(l.user.clone());
                    login.auth = Some(auth);
                }
                None => bail!("Docker-only credentials need --docker-user"),
            }
        }

        // TLS material.
        for (path, field, what) in [
            (&self.tls_ca, SecretField::TlsCa, "TLS CA"),
            (&self.tls_cert, SecretField::TlsCert, "TLS certificate"),
            (&self.tls_key, SecretField::TlsKey, "TLS key"),
        ] {
            if let Some(p) = path {
                ch.set_secret(field, Some(read_file_secret(p, what)?));
            }
        }

        // Plain settings.
        if let Some(h) = self.host {
            ch.host = Some(Some(h));
        }
        if let Some(p) = self.port {
            ch.port = Some(Some(p));
        }
        if let Some(u) = self.user {
            ch.user = Some(Some(u));
        }
        ch.ip_family = self.ip_family;
        ch.keyboard_interactive = self.keyboard_interactive;
        ch.agent_forwarding = self.agent_forwarding;
        ch.sudo = self.sudo;
        ch.ssh_tunnel = self.ssh_tunnel.map(|t| match t {
            TunnelArg::Default => None,
            TunnelArg::Auto => Some(SshTunnel::Auto),
            TunnelArg::Streamlocal => Some(SshTunnel::Streamlocal),
            TunnelArg::DialStdio => Some(SshTunnel::DialStdio),
        });
        if let Some(s) = self.socket {
            ch.socket_path = Some(Some(s));
        }
        if let Some(k) = self.host_key {
            ch.host_key = Some(Some(k.trim().to_string()));
        } else if let Some(f) = self.host_key_file {
            let k = std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read host key file {}", f.display()))?;
            let line = k
                .lines()
                .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
                .unwrap_or("")
                .trim()
                .to_string();
            ch.host_key = Some(Some(line));
        }
        if let Some(h) = self.docker_host {
            ch.docker_host = Some(Some(h));
        }
        if let Some(n) = self.tls_server_name {
            ch.tls_server_name = Some(Some(n));
        }
        Ok(ch)
    }
}

pub fn run(g: &GlobalArgs, cmd: DeviceCmd) -> anyhow::Result<()> {
    let settings = g.settings(None)?;
    let rt = check::runtime()?;
    let api = {
        let _guard = rt.enter();
        ApiClient::connect(settings, &g.passphrase())?
    };
    rt.block_on(run_cmd(&api, cmd))
}

/// One command, through the engine's API (running, or opened in this process).
async fn run_cmd(api: &ApiClient, cmd: DeviceCmd) -> anyhow::Result<()> {
    match cmd {
        DeviceCmd::Add {
            name,
            kind,
            opts,
            trust_host_key,
        } => {
            let ch = add_changes(name, kind, opts, trust_host_key)?;
            let view = request(
                api,
                "POST",
                "/api/devices",
                Some(request_body(Some(kind), &ch)?),
            )
            .await?;
            let (d, _) = device_of(view)?;
            print_added(&d);
            if trust_host_key {
                // The engine pins the key the check trusted.
                let how = CheckHow {
                    trust_host_key: true,
                    pooled: false,
                    timeout: DEFAULT_CHECK_TIMEOUT,
                };
                let report = check_one(api, &d.id.to_string(), how).await?;
                if let Err(why) = pinned_on_first_use(&report) {
                    request(api, "DELETE", &format!("/api/devices/{}", d.id), None).await?;
                    bail!("{why}");
                }
            }
        }
        DeviceCmd::Check {
            name,
            all,
            concurrency,
            pooled,
            trust_host_key,
            timeout,
            json,
        } => {
            if concurrency.is_some() && !all {
                bail!("--concurrency goes with --all (checking one device is one check)");
            }
            let ids: Vec<String> = if all {
                devices_of(request(api, "GET", "/api/devices", None).await?)?
                    .into_iter()
                    .map(|d| d.id.to_string())
                    .collect()
            } else {
                vec![name.unwrap_or_default()]
            };
            let how = CheckHow {
                trust_host_key,
                pooled,
                timeout: Duration::from_secs(timeout),
            };
            let reports = check::run_all(
                ids,
                |id| async move { check_one(api, &id, how).await },
                usize::from(concurrency.unwrap_or(check::DEFAULT_CONCURRENCY)),
                all,
            )
            .await?;
            finish_checks(&reports, all, json)?;
        }
        DeviceCmd::List { json } => {
            print_list(
                &devices_of(request(api, "GET", "/api/devices", None).await?)?,
                json,
            )?;
        }
        DeviceCmd::Show { name, json } => {
            let (d, stored) = device_of(request(api, "GET", &device_path(&name)?, None).await?)?;
            print_show(&d, &stored, json)?;
        }
        DeviceCmd::Edit {
            name,
            rename,
            opts,
            clear,
        } => {
            let (old, _) = device_of(request(api, "GET", &device_path(&name)?, None).await?)?;
            let ch = edit_changes(&old, opts, rename, clear)?;
            let path = format!("/api/devices/{}", old.id);
            let (d, _) =
                device_of(request(api, "PATCH", &path, Some(request_body(None, &ch)?)).await?)?;
            println!("updated device {} ({})", d.name, d.address());
        }
        DeviceCmd::Rm { name } => {
            let (d, _) = device_of(request(api, "GET", &device_path(&name)?, None).await?)?;
            request(api, "DELETE", &format!("/api/devices/{}", d.id), None).await?;
            println!("removed device {} and its secrets", d.name);
        }
    }
    Ok(())
}

/// A request to the device routes; an error answer becomes [`error_of`].
async fn request(
    api: &ApiClient,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let (status, v) = api.call(method, path, body).await?;
    if status.is_success() {
        return Ok(v);
    }
    Err(error_of(status, &v))
}

/// The error an error answer stands for, in this command's words: an invalid setting
/// names its flag (the engine names the body field), and a mistake in the request
/// (invalid, a name in use, no such device) is told as the engine's message alone.
fn error_of(status: hyper::StatusCode, v: &serde_json::Value) -> anyhow::Error {
    let error = &v["error"];
    match (error["kind"].as_str(), error["message"].as_str()) {
        (Some("invalid"), Some(message)) if error["setting"].is_string() => {
            anyhow::anyhow!("{}", Invalid::api_message_in_cli_words(message))
        }
        (Some("invalid" | "conflict"), Some(message)) => anyhow::anyhow!("{message}"),
        (Some("not-found"), Some(message)) if message.starts_with("no device named ") => {
            anyhow::anyhow!("{message} (see `capstan device list`)")
        }
        _ => ApiClient::error_of(status, v),
    }
}

/// `/api/devices/NAME`. Device names and ids need no escaping; anything else cannot
/// name a device.
fn device_path(name: &str) -> anyhow::Result<String> {
    Ok(format!("/api/devices/{}", device_segment(name)?))
}

fn device_segment(name: &str) -> anyhow::Result<&str> {
    if crate::device::validate_name(name).is_err() {
        bail!("no device named {name:?} (see `capstan device list`)");
    }
    Ok(name)
}

/// The change set of `device add`.
fn add_changes(
    name: String,
    kind: DeviceKind,
    opts: DeviceOpts,
    trust_host_key: bool,
) -> anyhow::Result<DeviceSpec> {
    if trust_host_key && kind != DeviceKind::Ssh {
        bail!("--trust-host-key is for ssh devices");
    }
    let mut ch = opts.into_changes(kind, None)?;
    ch.name = Some(name);
    ch.kind = Some(kind);
    Ok(ch)
}

/// The change set of `device edit`.
fn edit_changes(
    old: &Device,
    opts: DeviceOpts,
    rename: Option<String>,
    clear: ClearOpts,
) -> anyhow::Result<DeviceSpec> {
    let mut ch = opts.into_changes(old.kind, Some(old))?;
    ch.name = rename;
    if clear.clear_host_key {
        ch.host_key = Some(None);
    }
    if clear.clear_socket {
        ch.socket_path = Some(None);
    }
    if clear.clear_docker_login {
        ch.docker_login = Some(None);
    }
    if clear.clear_key_passphrase {
        ch.set_secret(SecretField::KeyPassphrase, None);
    }
    Ok(ch)
}

/// How to check a device.
#[derive(Debug, Clone, Copy)]
struct CheckHow {
    trust_host_key: bool,
    pooled: bool,
    timeout: Duration,
}

/// A check through the engine's API, which pins a trusted key itself.
async fn check_one(api: &ApiClient, id: &str, how: CheckHow) -> anyhow::Result<CheckReport> {
    let mut body = serde_json::json!({
        "trust_host_key": how.trust_host_key,
        "timeout_secs": how.timeout.as_secs(),
    });
    if how.pooled {
        body["pooled"] = true.into();
    }
    let path = format!("/api/docker/check/{}", device_segment(id)?);
    let (status, v) = api.call("POST", &path, Some(body)).await?;
    // 502 and 504 carry a report too: the check ran and failed.
    if matches!(status.as_u16(), 200 | 502 | 504) {
        return serde_json::from_value(v)
            .context("the engine sent a check report this CLI cannot read");
    }
    Err(error_of(status, &v))
}

/// The API's view of a device: the record, and the names of its stored secrets.
fn device_of(mut v: serde_json::Value) -> anyhow::Result<(Device, Vec<String>)> {
    let secrets = match v.as_object_mut().and_then(|o| o.remove("secrets")) {
        Some(s) => serde_json::from_value(s)?,
        None => Vec::new(),
    };
    let d = serde_json::from_value(v).context("the engine sent a device this CLI cannot read")?;
    Ok((d, secrets))
}

fn devices_of(v: serde_json::Value) -> anyhow::Result<Vec<Device>> {
    let serde_json::Value::Array(items) = v else {
        bail!("the engine sent a device list this CLI cannot read");
    };
    items
        .into_iter()
        .map(|i| device_of(i).map(|(d, _)| d))
        .collect()
}

/// The API request body for a change set (`kind` for a new device). Secrets go in the
/// body: the CLI reaches the engine on this host only (its token file is local).
fn request_body(kind: Option<DeviceKind>, ch: &DeviceSpec) -> anyhow::Result<serde_json::Value> {
    let mut spec = ch.clone();
    spec.kind = kind;
    serde_json::to_value(&spec).context("cannot send the device's settings")
}

fn print_added(d: &Device) {
    println!(
        "added device {} ({}, {}) id {}",
        d.name,
        d.kind,
        d.address(),
        d.id
    );
}

/// After `add --trust-host-key`: the key to pin, or why nothing was added.
fn pinned_on_first_use(report: &CheckReport) -> Result<&str, String> {
    match &report.host_key {
        Some(k) if k.trusted_now => {
            println!("pinned host key {} {}", k.algorithm, k.fingerprint);
            if let Some(e) = &report.error {
                eprintln!(
                    "warning: the SSH login works, but Docker does not answer yet: {}",
                    e.message
                );
            }
            Ok(&k.key)
        }
        _ => {
            let why = report
                .error
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_else(|| "the server presented no host key".into());
            Err(format!(
                "could not log in to pin the host key, so nothing was added: {why}"
            ))
        }
    }
}

/// Prints check reports (and the keys pinned on first use); fails when any check did.
fn finish_checks(reports: &[CheckReport], all: bool, json: bool) -> anyhow::Result<()> {
    if !json {
        for r in reports {
            if let Some(k) = r.host_key.as_ref().filter(|k| k.trusted_now) {
                println!(
                    "pinned host key {} {} for device {}",
                    k.algorithm, k.fingerprint, r.device
                );
            }
        }
    }
    let failed = reports.iter().filter(|r| !r.connected).count();
    if json {
        let v = if all {
            serde_json::to_string_pretty(reports)?
        } else {
            serde_json::to_string_pretty(&reports[0])?
        };
        println!("{v}");
    } else if all {
        check::print_table(reports);
    } else {
        check::print_one(&reports[0]);
    }
    if failed > 0 {
        if all {
            bail!("{failed} of {} devices failed the check", reports.len());
        }
        let e = reports[0].error.as_ref().map(|e| e.message.clone());
        bail!("{}", e.unwrap_or_else(|| "the check failed".into()));
    }
    Ok(())
}

fn print_list(list: &[Device], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(list)?);
    } else {
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|d| {
                vec![
                    d.name.clone(),
                    d.kind.to_string(),
                    d.address(),
                    d.auth.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                    d.id.to_string(),
                ]
            })
            .collect();
        print_table(&["NAME", "KIND", "ADDRESS", "AUTH", "ID"], &rows);
    }
    Ok(())
}

fn print_show(d: &Device, stored: &[String], json: bool) -> anyhow::Result<()> {
    if json {
        let mut v = serde_json::to_value(d)?;
        v["secrets"] = serde_json::json!(stored);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_device(d, stored);
    }
    Ok(())
}

fn print_device(d: &Device, stored: &[String]) {
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    println!("name:        {}", d.name);
    println!("id:          {}", d.id);
    println!("kind:        {}", d.kind);
    println!("address:     {}", d.address());
    if d.kind == DeviceKind::Ssh {
        println!(
            "auth:        {}",
            d.auth.map(|a| a.to_string()).unwrap_or_default()
        );
        if let Some(l) = &d.docker_login {
            println!("docker login: {} ({})", l.user, l.auth);
        }
        println!("ip family:   {:?}", d.ip_family);
        println!("keyboard-interactive: {}", d.keyboard_interactive);
        println!("agent forwarding: {}", d.agent_forwarding);
        println!("sudo:        {}", d.sudo);
        match d.ssh_tunnel {
            Some(t) => println!("ssh tunnel:  {t}"),
            None => println!("ssh tunnel:  engine default (CAPSTAN_SSH_TUNNEL, else auto)"),
        }
        println!("socket:      {}", opt(&d.socket_path));
        match &d.host_key {
            Some(k) => match crate::device::parse_host_key(k) {
                Ok(pk) => println!(
                    "host key:    {} {}",
                    pk.algorithm(),
                    pk.fingerprint(russh::keys::HashAlg::Sha256)
                ),
                Err(_) => println!("host key:    (unreadable)"),
            },
            None => println!("host key:    not pinned"),
        }
    }
    if d.kind == DeviceKind::Tls {
        println!(
            "server name: {}",
            d.tls_server_name
                .clone()
                .or(d.host.clone())
                .unwrap_or_default()
        );
    }
    println!(
        "secrets:     {}",
        if stored.is_empty() {
            "none".to_string()
        } else {
            format!("{} (stored in the vault)", stored.join(", "))
        }
    );
    println!("created:     {}", d.created_at.to_rfc3339());
    println!("updated:     {}", d.updated_at.to_rfc3339());
}
