//! Engine configuration: a strict TOML file, `CAPSTAN_*` environment variables and flags,
//! resolved once into typed [`Settings`].
//!
//! Precedence, highest first: command-line flag, environment variable, config file,
//! built-in default. The file is parsed with `deny_unknown_fields`, so a misspelt key is an
//! error that names it, not a silently ignored setting. Secrets never come from the config
//! file: the vault passphrase comes from `CAPSTAN_VAULT_PASSPHRASE`, a file or a prompt.
//!
//! This module is the only reader of the process environment (a clippy fence holds the
//! rest of `src/` to it): clap reads the flags' `CAPSTAN_*` variables, [`Settings::resolve`]
//! the table overrides and the Docker connection's `DOCKER_HOST`, `SSH_AUTH_SOCK` and
//! `CAPSTAN_SSH_TUNNEL`, and the functions at the end the secrets and switches that are
//! not settings (the vault passphrases, `CAPSTAN_API_TOKEN`, logging, the crash-test
//! pause). Everything else is handed these values.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "capstan-data";
/// Default API listen address (loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7878";
/// Name of the generated key file inside the data directory.
pub const DEFAULT_KEY_FILE_NAME: &str = "vault.key";

/// The config file (`capstan.toml`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Where the database (vault, devices, runs) lives. Default `./capstan-data`.
    pub data_dir: Option<PathBuf>,
    /// The HTTP API.
    #[serde(default)]
    pub api: ApiSection,
    /// How the vault's master key is found.
    #[serde(default)]
    pub vault: VaultSection,
    /// Docker API proxies `capstan serve` starts (`[[proxy]]` tables).
    #[serde(default, rename = "proxy")]
    pub proxies: Vec<ProxySection>,
    /// Plugin runs: concurrency, shutdown, history.
    #[serde(default)]
    pub runs: RunsSection,
    /// What clients may hold open on every listener (API, webhooks, proxies).
    #[serde(default)]
    pub server: ServerSection,
    /// How the engine connects to Docker daemons.
    #[serde(default)]
    pub docker: DockerSection,
    /// Notifications: run-end notices for every plugin, and how deliveries are limited.
    #[serde(default)]
    pub notify: crate::notify::NotifySection,
    /// The web dashboard served beside the API.
    #[serde(default)]
    pub dashboard: DashboardSection,
    /// Cluster mode: the NATS servers several engines share (none: the engine runs
    /// alone).
    #[serde(default)]
    pub cluster: crate::cluster::ClusterSection,
}

/// The `[dashboard]` table. Each key may also come from `CAPSTAN_DASHBOARD_<KEY>` (upper
/// case), which wins over the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardSection {
    /// How long a dashboard login lasts, seconds (1 to 31 days' worth). Default 43200
    /// (12 hours). Env `CAPSTAN_DASHBOARD_SESSION_TTL`.
    pub session_ttl: Option<u64>,
}

/// The dashboard's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardSettings {
    /// How long a session lasts after login.
    pub session_ttl: std::time::Duration,
}

impl Default for DashboardSettings {
    fn default() -> Self {
        DashboardSettings {
            session_ttl: std::time::Duration::from_secs(DEFAULT_SESSION_TTL_SECS),
        }
    }
}

/// Default dashboard session lifetime: 12 hours.
pub const DEFAULT_SESSION_TTL_SECS: u64 = 43_200;
/// Longest dashboard session lifetime: 31 days.
const MAX_SESSION_TTL_SECS: u64 = 31 * 24 * 3600;

/// The `[docker]` table: how every device's Docker connection is made. The timeouts and
/// `check_concurrency` may also come from `CAPSTAN_DOCKER_<KEY>` (upper case); `host`,
/// `agent_socket` and `ssh_tunnel` from the variables the Docker and SSH tools use
/// (`DOCKER_HOST`, `SSH_AUTH_SOCK`, `CAPSTAN_SSH_TUNNEL`). The environment wins over the
/// file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerSection {
    /// Address of the local daemon for `local` devices without their own `docker_host`:
    /// `unix:///path` or `tcp://host:port`. Env `DOCKER_HOST`. Default
    /// `unix:///var/run/docker.sock`.
    pub host: Option<String>,
    /// The ssh-agent socket for agent auth and agent forwarding. Env `SSH_AUTH_SOCK`.
    /// Default: none (agent auth then fails and says so).
    pub agent_socket: Option<PathBuf>,
    /// How SSH devices without their own setting reach the remote daemon: `auto`,
    /// `streamlocal` or `dial-stdio`. Env `CAPSTAN_SSH_TUNNEL` (an unknown value there is
    /// a warning and means `auto`). Default `auto`.
    pub ssh_tunnel: Option<String>,
    /// Time to establish a connection: name resolution, TCP connect, SSH handshake and
    /// authentication, channel open or TLS handshake. Default 10s.
    pub connect_timeout: Option<String>,
    /// Time a Docker API call (a ping, a version query) has to answer; streams then run
    /// for as long as they deliver. Default 120s.
    pub request_timeout: Option<String>,
    /// Idle connections to a daemon (and their SSH channels) older than this are closed.
    /// Default 90s.
    pub idle_timeout: Option<String>,
    /// Connection checks (`capstan device check`, `/api/docker/check`) the engine runs at
    /// once, 1-1024; more wait for a slot, so no client can start more SSH handshakes at
    /// once than this. Env `CAPSTAN_DOCKER_CHECK_CONCURRENCY`. Default 16.
    pub check_concurrency: Option<usize>,
}

impl DockerSection {
    /// Checks the file's values; the environment's are checked as they are resolved.
    pub fn validate(&self) -> Result<(), ConfigError> {
        resolve_docker(self, |_| None).map(|_| ())
    }
}

/// The `[server]` table: bounds on what a client can hold open, for every listener of
/// the process (the API with its webhooks, and each proxy). Each key may also come from
/// `CAPSTAN_SERVER_<KEY>` (upper case), which wins over the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Time a client has to send a complete request head (and finish a TLS handshake),
    /// from connecting or from the first byte of a next request. Default 10s.
    pub header_timeout: Option<String>,
    /// Longest pause while a request body arrives. Default 30s.
    pub body_timeout: Option<String>,
    /// Time a kept-alive connection may wait for its next request. Default 60s.
    pub idle_timeout: Option<String>,
    /// Client connections open at once across all listeners; at the cap, the connection
    /// longest without a request in progress is closed for each new one. Default: the
    /// open-file limit less a reserve (768 at 1024), at most 16384.
    pub max_connections: Option<usize>,
    /// Bytes of request bodies held before authentication (webhook deliveries), all
    /// together, e.g. `"64MiB"`; past it deliveries get 503 with Retry-After. Default 64MiB.
    pub preauth_body_budget: Option<String>,
}

/// The `[runs]` table. Each key may also come from `CAPSTAN_RUNS_<KEY>` (upper case),
/// which wins over the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsSection {
    /// Runs executing at once across all plugins. Default 16.
    pub max_concurrent: Option<usize>,
    /// Runs of one plugin executing at once. Default 4.
    pub max_per_plugin: Option<usize>,
    /// Runs of one plugin waiting for a slot before new ones are refused. Default 1000.
    pub max_queued_per_plugin: Option<usize>,
    /// How long running runs may go on at shutdown (e.g. `"30s"`). Default 30s.
    pub shutdown_grace: Option<String>,
    /// The longest `?wait=true` waits for a run's end. Default 60s.
    pub max_wait: Option<String>,
    /// Finished runs kept per plugin (newest). Default 500.
    pub keep_per_plugin: Option<usize>,
    /// Finished runs older than this are removed (e.g. `"30d"`). Default 30d.
    pub max_age: Option<String>,
    /// Run-outcome triggers in a row (`[[triggers.run]]`): a run that would be deeper
    /// in such a chain is refused and recorded as `denied`. Default 3.
    pub max_chain_depth: Option<usize>,
}

/// One Docker API proxy: a device's daemon served behind a policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// The device to serve (name or id).
    pub device: String,
    /// Policy file: a socket-proxy environment block, or TOML when it ends in `.toml`.
    pub policy: PathBuf,
    /// `tcp://IP:PORT` or `unix:///path.sock`.
    pub listen: String,
    /// File holding the token clients must send; required on non-loopback addresses
    /// unless client certificates are.
    pub token_file: Option<PathBuf>,
    /// Serve TLS with this certificate (PEM); needs `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM).
    pub tls_key: Option<PathBuf>,
    /// Demand client certificates signed by this CA (PEM); needs `tls_cert`.
    pub tls_client_ca: Option<PathBuf>,
    /// Append a JSON line per request (allowed or denied) to this file, created with mode
    /// 0600. Without it, allowed requests are `info` log lines and denied ones `warn`.
    pub access_log: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// Listen address, e.g. `127.0.0.1:7878`.
    pub listen: Option<String>,
    /// Serve the API (with its webhooks and the dashboard) over TLS with this certificate
    /// chain (PEM); needs `tls_key`. Flag `serve --tls-cert`, env `CAPSTAN_API_TLS_CERT`.
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM). Flag `serve --tls-key`, env
    /// `CAPSTAN_API_TLS_KEY`.
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultSection {
    /// Key file holding the vault's master key (64 hex digits). Default
    /// `<data_dir>/vault.key` when the vault is key-file protected.
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<ConfigFile, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }
}

/// Settings after flags, environment and file have been merged.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// The API listener's TLS (`[api] tls_cert`/`tls_key`, or `serve --tls-cert/--tls-key`);
    /// `None`: plain HTTP.
    pub api_tls: Option<crate::server::tls::TlsFiles>,
    /// Explicit key file, if one was named anywhere.
    pub key_file: Option<PathBuf>,
    /// Proxies to start with the engine, checked at load.
    pub proxies: Vec<ProxySettings>,
    /// Run concurrency, shutdown grace and history retention.
    pub runs: crate::scheduler::SchedulerConfig,
    /// Timeouts, connection cap and pre-auth body budget of every listener.
    pub server: crate::server::ServerConfig,
    /// How Docker connections are made (the `[docker]` table and its variables).
    pub docker: crate::docker::ConnectOptions,
    /// `CAPSTAN_API_TOKEN`: the token the CLI sends to a running engine instead of the
    /// one in its CLI token file.
    pub api_token: Option<std::sync::Arc<crate::secret::Secret>>,
    /// The `[notify]` table: run-end notifications and delivery limits.
    pub notify: crate::notify::NotifySettings,
    /// The `[dashboard]` table.
    pub dashboard: DashboardSettings,
    /// The `[cluster]` table (with `serve --cluster`): `None` when the engine runs alone.
    pub cluster: Option<crate::cluster::ClusterSettings>,
}

/// A validated `[[proxy]]` entry.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub device: String,
    pub policy_file: PathBuf,
    pub listen: crate::proxy::Listen,
    pub token_file: Option<PathBuf>,
    pub tls: Option<crate::proxy::TlsFiles>,
    /// JSON-lines access log, if one is set.
    pub access_log: Option<PathBuf>,
}

impl Settings {
    /// Merges the three layers. `flag_*` values already include their `CAPSTAN_*`
    /// environment variables (clap reads them).
    pub fn resolve(
        file: &ConfigFile,
        flag_data_dir: Option<PathBuf>,
        flag_listen: Option<String>,
        flag_key_file: Option<PathBuf>,
    ) -> Result<Settings, ConfigError> {
        let data_dir = flag_data_dir
            .or_else(|| file.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                field: "data_dir",
                message: "must not be empty".into(),
            });
        }
        let listen_text = flag_listen
            .or_else(|| file.api.listen.clone())
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = listen_text.parse().map_err(|_| ConfigError::Invalid {
            field: "api.listen",
            message: format!("{listen_text:?} is not an address like 127.0.0.1:7878 or [::1]:7878"),
        })?;
        let mut proxies = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, p) in file.proxies.iter().enumerate() {
            let listen: crate::proxy::Listen =
                p.listen.parse().map_err(|message| ConfigError::Invalid {
                    field: "proxy.listen",
                    message: format!("[[proxy]] #{} ({}): {message}", i + 1, p.device),
                })?;
            if !seen.insert(listen.to_string()) {
                return Err(ConfigError::Invalid {
                    field: "proxy.listen",
                    message: format!("[[proxy]] #{}: {listen} is used by another proxy", i + 1),
                });
            }
            let tls = match (&p.tls_cert, &p.tls_key, &p.tls_client_ca) {
                (Some(cert), Some(key), ca) => Some(crate::proxy::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: ca.clone(),
                }),
                (None, None, None) => None,
                (Some(_), None, _) | (None, Some(_), _) => {
                    return Err(ConfigError::Invalid {
                        field: "proxy.tls_cert",
                        message: format!(
                            "[[proxy]] #{} ({}): tls_cert and tls_key go together",
                            i + 1,
                            p.device
                        ),
                    });
                }
                (None, None, Some(_)) => {
                    return Err(ConfigError::Invalid {
                        field: "proxy.tls_client_ca",
                        message: format!(
                            "[[proxy]] #{} ({}): tls_client_ca needs tls_cert and tls_key (client certificates are asked for in the TLS handshake)",
                            i + 1,
                            p.device
                        ),
                    });
                }
            };
            if p.access_log
                .as_ref()
                .is_some_and(|f| f.as_os_str().is_empty())
            {
                return Err(ConfigError::Invalid {
                    field: "proxy.access_log",
                    message: format!(
                        "[[proxy]] #{} ({}): access_log must name a file (or be left out to log requests as `info` lines)",
                        i + 1,
                        p.device
                    ),
                });
            }
            proxies.push(ProxySettings {
                device: p.device.clone(),
                policy_file: p.policy.clone(),
                listen,
                token_file: p.token_file.clone(),
                tls,
                access_log: p.access_log.clone(),
            });
        }
        let api_tls = api_tls(file.api.tls_cert.clone(), file.api.tls_key.clone())?;
        Ok(Settings {
            data_dir,
            listen,
            api_tls,
            key_file: flag_key_file.or_else(|| file.vault.key_file.clone()),
            proxies,
            runs: resolve_runs(&file.runs, env)?,
            server: resolve_server(&file.server, env)?,
            docker: resolve_docker(&file.docker, env)?,
            api_token: env("CAPSTAN_API_TOKEN")
                .map(|t| std::sync::Arc::new(crate::secret::Secret::from_str_owned(t))),
            notify: file
                .notify
                .resolve()
                .map_err(|(field, message)| ConfigError::Invalid { field, message })?,
            dashboard: resolve_dashboard(&file.dashboard, env)?,
            cluster: crate::cluster::config::resolve(&file.cluster, None, env)?,
        })
    }

    /// Cluster mode from `serve --cluster URLS` (its variable `CAPSTAN_CLUSTER` read by
    /// clap), over the `[cluster]` table and its variables.
    pub fn with_cluster_urls(
        mut self,
        file: &ConfigFile,
        urls: &str,
    ) -> Result<Settings, ConfigError> {
        self.cluster = crate::cluster::config::resolve(&file.cluster, Some(urls), env)?;
        Ok(self)
    }

    pub fn default_key_file(&self) -> PathBuf {
        self.data_dir.join(DEFAULT_KEY_FILE_NAME)
    }
}

/// The API's TLS from a certificate and a key, which go together (from the file, or
/// from `serve`'s flags, which replace the file's pair).
pub fn api_tls(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<crate::server::tls::TlsFiles>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(crate::server::tls::TlsFiles {
            cert,
            key,
            client_ca: None,
        })),
        (None, None) => Ok(None),
        _ => Err(ConfigError::Invalid {
            field: "api.tls_cert",
            message: "tls_cert and tls_key go together (--tls-cert and --tls-key)".into(),
        }),
    }
}

/// The `[docker]` table over the defaults, with its variables from `env` winning.
fn resolve_docker(
    file: &DockerSection,
    env: impl Fn(&str) -> Option<String>,
) -> Result<crate::docker::ConnectOptions, ConfigError> {
    use crate::trigger::units::parse_duration;
    let mut c = crate::docker::ConnectOptions::default();
    for (field, var, value, slot) in [
        (
            "docker.connect_timeout",
            "CAPSTAN_DOCKER_CONNECT_TIMEOUT",
            &file.connect_timeout,
            &mut c.connect_timeout,
        ),
        (
            "docker.request_timeout",
            "CAPSTAN_DOCKER_REQUEST_TIMEOUT",
            &file.request_timeout,
            &mut c.request_timeout,
        ),
        (
            "docker.idle_timeout",
            "CAPSTAN_DOCKER_IDLE_TIMEOUT",
            &file.idle_timeout,
            &mut c.idle_timeout,
        ),
    ] {
        if let Some(v) = env(var).or_else(|| value.clone()) {
            let d = parse_duration(&v).map_err(|m| ConfigError::Invalid {
                field,
                message: format!("{m} (write e.g. \"10s\", \"2m\")"),
            })?;
            if d.is_zero() {
                return Err(ConfigError::Invalid {
                    field,
                    message: "must be longer than 0s".into(),
                });
            }
            *slot = d;
        }
    }
    // As the docker CLI does: an empty DOCKER_HOST is no address.
    c.docker_host_env = match env("DOCKER_HOST").filter(|s| !s.is_empty()) {
        Some(h) => Some(h),
        None => match &file.host {
            Some(h) if h.trim().is_empty() => {
                return Err(ConfigError::Invalid {
                    field: "docker.host",
                    message:
                        "must name an address like unix:///var/run/docker.sock (or be left out)"
                            .into(),
                });
            }
            other => other.clone(),
        },
    };
    let concurrency = match env("CAPSTAN_DOCKER_CHECK_CONCURRENCY") {
        Some(v) => Some(
            v.trim()
                .parse::<usize>()
                .map_err(|_| ConfigError::Invalid {
                    field: "docker.check_concurrency",
                    message: format!(
                        "CAPSTAN_DOCKER_CHECK_CONCURRENCY={v:?} is not a number of checks (1-{})",
                        crate::docker::MAX_CHECK_CONCURRENCY
                    ),
                })?,
        ),
        None => file.check_concurrency,
    };
    if let Some(n) = concurrency {
        if !(1..=crate::docker::MAX_CHECK_CONCURRENCY).contains(&n) {
            return Err(ConfigError::Invalid {
                field: "docker.check_concurrency",
                message: format!(
                    "{n} is out of range: checks at once must be 1-{}",
                    crate::docker::MAX_CHECK_CONCURRENCY
                ),
            });
        }
        c.check_concurrency = n;
    }
    c.agent_socket = env("SSH_AUTH_SOCK")
        .map(PathBuf::from)
        .or_else(|| file.agent_socket.clone());
    c.ssh_tunnel = match env("CAPSTAN_SSH_TUNNEL").filter(|v| !v.trim().is_empty()) {
        // A bad value in the environment has always been a warning, not a failed start.
        Some(v) => v.parse().unwrap_or_else(|e| {
            tracing::warn!("CAPSTAN_SSH_TUNNEL: {e}; using auto");
            crate::docker::SshTunnel::Auto
        }),
        None => match &file.ssh_tunnel {
            Some(v) => v.parse().map_err(|message| ConfigError::Invalid {
                field: "docker.ssh_tunnel",
                message,
            })?,
            None => crate::docker::SshTunnel::Auto,
        },
    };
    Ok(c)
}

/// The `[server]` table over the defaults, with `CAPSTAN_SERVER_*` from `env` winning.
fn resolve_server(
    file: &ServerSection,
    env: impl Fn(&str) -> Option<String>,
) -> Result<crate::server::ServerConfig, ConfigError> {
    use crate::trigger::units::{parse_byte_size, parse_duration};
    let mut c = crate::server::ServerConfig::default();
    let text = |var: &str, file: &Option<String>| env(var).or_else(|| file.clone());
    for (field, var, value, slot) in [
        (
            "server.header_timeout",
            "CAPSTAN_SERVER_HEADER_TIMEOUT",
            &file.header_timeout,
            &mut c.header_timeout,
        ),
        (
            "server.body_timeout",
            "CAPSTAN_SERVER_BODY_TIMEOUT",
            &file.body_timeout,
            &mut c.body_timeout,
        ),
        (
            "server.idle_timeout",
            "CAPSTAN_SERVER_IDLE_TIMEOUT",
            &file.idle_timeout,
            &mut c.idle_timeout,
        ),
    ] {
        if let Some(v) = text(var, value) {
            let d = parse_duration(&v).map_err(|m| ConfigError::Invalid {
                field,
                message: format!("{m} (write e.g. \"10s\", \"1m\")"),
            })?;
            if d.is_zero() {
                return Err(ConfigError::Invalid {
                    field,
                    message: "must be longer than 0s".into(),
                });
            }
            *slot = d;
        }
    }
    let var = "CAPSTAN_SERVER_MAX_CONNECTIONS";
    c.max_connections = match env(var) {
        Some(v) => Some(
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ConfigError::Invalid {
                    field: "server.max_connections",
                    message: format!("{var}={v:?} is not a positive whole number"),
                })?,
        ),
        None => match file.max_connections {
            Some(0) => {
                return Err(ConfigError::Invalid {
                    field: "server.max_connections",
                    message: "must be at least 1".into(),
                });
            }
            other => other,
        },
    };
    if let Some(v) = text(
        "CAPSTAN_SERVER_PREAUTH_BODY_BUDGET",
        &file.preauth_body_budget,
    ) {
        let field = "server.preauth_body_budget";
        c.preauth_body_budget =
            parse_byte_size(&v).map_err(|message| ConfigError::Invalid { field, message })?;
        if c.preauth_body_budget == 0 {
            return Err(ConfigError::Invalid {
                field,
                message: "must be larger than 0 (webhook deliveries need their body read)".into(),
            });
        }
    }
    Ok(c)
}

/// The longest chain of run-outcome triggers `runs.max_chain_depth` may allow.
const MAX_CHAIN_DEPTH: u32 = 100;

/// The `[dashboard]` table over the defaults, with `CAPSTAN_DASHBOARD_*` from `env`
/// winning.
fn resolve_dashboard(
    file: &DashboardSection,
    env: impl Fn(&str) -> Option<String>,
) -> Result<DashboardSettings, ConfigError> {
    let var = "CAPSTAN_DASHBOARD_SESSION_TTL";
    let secs = match env(var) {
        Some(v) => Some(v.trim().parse::<u64>().map_err(|_| ConfigError::Invalid {
            field: "dashboard.session_ttl",
            message: format!("{var}={v:?} is not a number of seconds"),
        })?),
        None => file.session_ttl,
    };
    let mut d = DashboardSettings::default();
    if let Some(secs) = secs {
        if !(1..=MAX_SESSION_TTL_SECS).contains(&secs) {
            return Err(ConfigError::Invalid {
                field: "dashboard.session_ttl",
                message: format!(
                    "{secs} is not between 1 and {MAX_SESSION_TTL_SECS} seconds (31 days)"
                ),
            });
        }
        d.session_ttl = std::time::Duration::from_secs(secs);
    }
    Ok(d)
}

/// The `[runs]` table over the defaults, with `CAPSTAN_RUNS_*` from `env` winning.
fn resolve_runs(
    file: &RunsSection,
    env: impl Fn(&str) -> Option<String>,
) -> Result<crate::scheduler::SchedulerConfig, ConfigError> {
    use crate::trigger::units::parse_duration;
    let mut c = crate::scheduler::SchedulerConfig::default();
    let count = |field: &'static str,
                 var: &str,
                 file: Option<usize>|
     -> Result<Option<usize>, ConfigError> {
        match env(var) {
            Some(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .map(Some)
                .ok_or_else(|| ConfigError::Invalid {
                    field,
                    message: format!("{var}={v:?} is not a positive whole number"),
                }),
            None => match file {
                Some(0) => Err(ConfigError::Invalid {
                    field,
                    message: "must be at least 1".into(),
                }),
                other => Ok(other),
            },
        }
    };
    let duration = |field: &'static str,
                    var: &str,
                    file: &Option<String>|
     -> Result<Option<std::time::Duration>, ConfigError> {
        match env(var).or_else(|| file.clone()) {
            Some(v) => parse_duration(&v)
                .map(Some)
                .map_err(|m| ConfigError::Invalid {
                    field,
                    message: format!("{m} (write e.g. \"30s\", \"5m\", \"30d\")"),
                }),
            None => Ok(None),
        }
    };
    if let Some(n) = count(
        "runs.max_concurrent",
        "CAPSTAN_RUNS_MAX_CONCURRENT",
        file.max_concurrent,
    )? {
        c.max_concurrent_runs = n;
    }
    if let Some(n) = count(
        "runs.max_per_plugin",
        "CAPSTAN_RUNS_MAX_PER_PLUGIN",
        file.max_per_plugin,
    )? {
        c.max_runs_per_plugin = n;
    }
    if let Some(n) = count(
        "runs.max_queued_per_plugin",
        "CAPSTAN_RUNS_MAX_QUEUED_PER_PLUGIN",
        file.max_queued_per_plugin,
    )? {
        c.max_queued_per_plugin = n;
    }
    if let Some(n) = count(
        "runs.keep_per_plugin",
        "CAPSTAN_RUNS_KEEP_PER_PLUGIN",
        file.keep_per_plugin,
    )? {
        c.history.keep_per_plugin = Some(n);
    }
    if let Some(d) = duration(
        "runs.shutdown_grace",
        "CAPSTAN_RUNS_SHUTDOWN_GRACE",
        &file.shutdown_grace,
    )? {
        c.shutdown_grace = d;
    }
    if let Some(d) = duration("runs.max_wait", "CAPSTAN_RUNS_MAX_WAIT", &file.max_wait)? {
        c.max_wait = d;
    }
    if let Some(d) = duration("runs.max_age", "CAPSTAN_RUNS_MAX_AGE", &file.max_age)? {
        c.history.max_age = Some(d);
    }
    if let Some(n) = count(
        "runs.max_chain_depth",
        "CAPSTAN_RUNS_MAX_CHAIN_DEPTH",
        file.max_chain_depth,
    )? {
        c.max_chain_depth = u32::try_from(n)
            .ok()
            .filter(|n| *n <= MAX_CHAIN_DEPTH)
            .ok_or_else(|| ConfigError::Invalid {
                field: "runs.max_chain_depth",
                message: format!("{n} is more than {MAX_CHAIN_DEPTH}"),
            })?;
    }
    Ok(c)
}

/// One variable of the process environment, if it is set and text. The one reader of
/// the environment in `src/`.
#[allow(clippy::disallowed_methods)] // the owner of the environment
fn env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// `CAPSTAN_VAULT_PASSPHRASE`: the passphrase of a passphrase-protected vault.
pub fn vault_passphrase() -> Option<crate::secret::Secret> {
    env("CAPSTAN_VAULT_PASSPHRASE").map(crate::secret::Secret::from_str_owned)
}

/// `CAPSTAN_VAULT_NEW_PASSPHRASE`: the new passphrase for `vault change-passphrase`.
pub fn new_vault_passphrase() -> Option<crate::secret::Secret> {
    env("CAPSTAN_VAULT_NEW_PASSPHRASE").map(crate::secret::Secret::from_str_owned)
}

/// How the binary logs: read before any command (and so before the config file).
#[derive(Debug, Clone)]
pub struct Logging {
    /// `CAPSTAN_LOG`: an `EnvFilter` directive such as `info` or `capstan=debug`.
    pub filter: Option<String>,
    /// `NO_COLOR` is set: never colour, even on a terminal.
    pub no_color: bool,
}

impl Logging {
    pub fn from_env() -> Logging {
        #[allow(clippy::disallowed_methods)] // the owner of the environment
        let no_color = std::env::var_os("NO_COLOR").is_some();
        Logging {
            filter: env("CAPSTAN_LOG"),
            no_color,
        }
    }
}

/// `CAPSTAN_TEST_PAUSE_AT` ([`crate::store::PAUSE_ENV`]): the step at which the
/// crash-safety tests stop a process, read once.
pub fn test_pause_at() -> Option<&'static std::ffi::OsStr> {
    static PAUSE: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();
    PAUSE
        .get_or_init(|| {
            #[allow(clippy::disallowed_methods)] // the owner of the environment
            let v = std::env::var_os(crate::store::PAUSE_ENV);
            v
        })
        .as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dashboard_session_lifetime_comes_from_the_environment_then_the_file() {
        let d = resolve_dashboard(&DashboardSection::default(), |_| None).unwrap();
        assert_eq!(d.session_ttl, std::time::Duration::from_secs(43_200));
        let file = ConfigFile::parse("[dashboard]\nsession_ttl = 600\n").unwrap();
        let d = resolve_dashboard(&file.dashboard, |_| None).unwrap();
        assert_eq!(d.session_ttl, std::time::Duration::from_secs(600));
        let d = resolve_dashboard(&file.dashboard, |k| {
            (k == "CAPSTAN_DASHBOARD_SESSION_TTL").then(|| "2".to_string())
        })
        .unwrap();
        assert_eq!(d.session_ttl, std::time::Duration::from_secs(2));
        let err = resolve_dashboard(&file.dashboard, |_| Some("soon".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("CAPSTAN_DASHBOARD_SESSION_TTL"), "{err}");
        let file = ConfigFile::parse("[dashboard]\nsession_ttl = 0\n").unwrap();
        assert!(resolve_dashboard(&file.dashboard, |_| None).is_err());
    }

    #[test]
    fn unknown_keys_in_the_config_file_are_errors_that_name_them() {
        let err = ConfigFile::parse("data_dirr = \"x\"\n").unwrap_err();
        assert!(err.contains("data_dirr"), "{err}");
        let err = ConfigFile::parse("[api]\nlisten_on = \"x\"\n").unwrap_err();
        assert!(err.contains("listen_on"), "{err}");
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let file =
            ConfigFile::parse("data_dir = \"/srv/capstan\"\n[api]\nlisten = \"127.0.0.1:9000\"\n")
                .unwrap();
        let s = Settings::resolve(&file, None, None, None).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/srv/capstan"));
        assert_eq!(s.listen.port(), 9000);
        let s = Settings::resolve(
            &file,
            Some("/tmp/x".into()),
            Some("[::1]:1234".into()),
            None,
        )
        .unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(s.listen.to_string(), "[::1]:1234");
        let s = Settings::resolve(&ConfigFile::default(), None, None, None).unwrap();
        assert_eq!(s.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
    }

    #[test]
    fn the_example_config_parses() {
        let file = ConfigFile::parse(include_str!("../examples/capstan.toml")).unwrap();
        let s = Settings::resolve(&file, None, None, None).unwrap();
        assert_eq!(s.proxies.len(), 2);
    }

    #[test]
    fn a_proxy_with_a_bad_listen_address_or_a_clash_is_refused() {
        let one =
            "[[proxy]]\ndevice = \"local\"\npolicy = \"p.env\"\nlisten = \"127.0.0.1:2375\"\n";
        let err =
            Settings::resolve(&ConfigFile::parse(one).unwrap(), None, None, None).unwrap_err();
        assert!(err.to_string().contains("expected tcp://"), "{err}");
        let two = "[[proxy]]\ndevice = \"a\"\npolicy = \"p.env\"\nlisten = \"tcp://127.0.0.1:2375\"\n\
                   [[proxy]]\ndevice = \"b\"\npolicy = \"p.env\"\nlisten = \"tcp://127.0.0.1:2375\"\n";
        let err =
            Settings::resolve(&ConfigFile::parse(two).unwrap(), None, None, None).unwrap_err();
        assert!(err.to_string().contains("used by another proxy"), "{err}");
        let typo = "[[proxy]]\ndevice = \"a\"\npolicy = \"p.env\"\nlisten = \"tcp://127.0.0.1:1\"\ntoken = \"x\"\n";
        assert!(ConfigFile::parse(typo).unwrap_err().contains("token"));
    }

    #[test]
    fn the_apis_tls_files_come_as_certificate_and_key() {
        let resolve =
            |text: &str| Settings::resolve(&ConfigFile::parse(text).unwrap(), None, None, None);
        let s = resolve("[api]\ntls_cert = \"api.pem\"\ntls_key = \"api.key\"\n").unwrap();
        let tls = s.api_tls.expect("TLS from the file");
        assert_eq!(tls.cert, PathBuf::from("api.pem"));
        assert_eq!(tls.key, PathBuf::from("api.key"));
        assert_eq!(resolve("").unwrap().api_tls, None);
        let err = resolve("[api]\ntls_key = \"api.key\"\n").unwrap_err();
        assert!(
            err.to_string().contains("tls_cert and tls_key go together"),
            "{err}"
        );
    }

    /// Settings from one `[[proxy]]` table with `extra` lines.
    fn resolve_proxy(extra: &str) -> Result<Settings, ConfigError> {
        let base =
            "[[proxy]]\ndevice = \"a\"\npolicy = \"p.env\"\nlisten = \"tcp://127.0.0.1:2376\"\n";
        Settings::resolve(
            &ConfigFile::parse(&format!("{base}{extra}")).unwrap(),
            None,
            None,
            None,
        )
    }

    #[test]
    fn a_proxys_tls_files_come_as_certificate_and_key() {
        let resolve = resolve_proxy;
        let s = resolve("tls_cert = \"s.pem\"\ntls_key = \"s.key\"\ntls_client_ca = \"ca.pem\"\n")
            .unwrap();
        assert_eq!(
            s.proxies[0].tls,
            Some(crate::proxy::TlsFiles {
                cert: "s.pem".into(),
                key: "s.key".into(),
                client_ca: Some("ca.pem".into()),
            })
        );
        assert_eq!(resolve("").unwrap().proxies[0].tls, None);
        let err = resolve("tls_cert = \"s.pem\"\n").unwrap_err().to_string();
        assert!(err.contains("tls_cert and tls_key go together"), "{err}");
        let err = resolve("tls_client_ca = \"ca.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tls_client_ca needs tls_cert and tls_key"),
            "{err}"
        );
    }

    #[test]
    fn a_proxys_access_log_is_a_file_name_or_left_out() {
        let resolve = resolve_proxy;
        let s = resolve("access_log = \"/var/log/capstan/proxy.jsonl\"\n").unwrap();
        assert_eq!(
            s.proxies[0].access_log.as_deref(),
            Some(Path::new("/var/log/capstan/proxy.jsonl"))
        );
        assert_eq!(resolve("").unwrap().proxies[0].access_log, None);
        let err = resolve("access_log = \"\"\n").unwrap_err().to_string();
        assert!(err.contains("access_log must name a file"), "{err}");
    }

    #[test]
    fn the_runs_table_takes_env_overrides_and_names_bad_fields() {
        let file = ConfigFile::parse(
            "[runs]\nmax_concurrent = 3\nshutdown_grace = \"5s\"\nmax_age = \"7d\"\n",
        )
        .unwrap();
        let c = resolve_runs(&file.runs, |_| None).unwrap();
        assert_eq!(c.max_concurrent_runs, 3);
        assert_eq!(c.shutdown_grace, std::time::Duration::from_secs(5));
        assert_eq!(
            c.history.max_age,
            Some(std::time::Duration::from_secs(7 * 86400))
        );
        assert_eq!(c.max_runs_per_plugin, 4, "default kept");
        let c = resolve_runs(&file.runs, |k| {
            (k == "CAPSTAN_RUNS_MAX_CONCURRENT").then(|| "9".to_string())
        })
        .unwrap();
        assert_eq!(c.max_concurrent_runs, 9);
        let err = resolve_runs(&file.runs, |k| {
            (k == "CAPSTAN_RUNS_SHUTDOWN_GRACE").then(|| "soon".to_string())
        })
        .unwrap_err();
        assert!(err.to_string().starts_with("runs.shutdown_grace:"), "{err}");
        let zero = ConfigFile::parse("[runs]\nmax_per_plugin = 0\n").unwrap();
        let err = resolve_runs(&zero.runs, |_| None).unwrap_err();
        assert!(err.to_string().starts_with("runs.max_per_plugin:"), "{err}");
        assert!(
            ConfigFile::parse("[runs]\nmax_concurent = 1\n")
                .unwrap_err()
                .contains("max_concurent")
        );
    }

    #[test]
    fn the_chain_depth_of_run_outcome_triggers_defaults_to_3_and_is_bounded() {
        let none = ConfigFile::parse("").unwrap();
        assert_eq!(
            resolve_runs(&none.runs, |_| None).unwrap().max_chain_depth,
            3
        );
        let five = ConfigFile::parse("[runs]\nmax_chain_depth = 5\n").unwrap();
        assert_eq!(
            resolve_runs(&five.runs, |_| None).unwrap().max_chain_depth,
            5
        );
        let c = resolve_runs(&five.runs, |k| {
            (k == "CAPSTAN_RUNS_MAX_CHAIN_DEPTH").then(|| "1".to_string())
        })
        .unwrap();
        assert_eq!(c.max_chain_depth, 1);
        for bad in [
            "[runs]\nmax_chain_depth = 0\n",
            "[runs]\nmax_chain_depth = 101\n",
        ] {
            let f = ConfigFile::parse(bad).unwrap();
            let err = resolve_runs(&f.runs, |_| None).unwrap_err();
            assert!(
                err.to_string().starts_with("runs.max_chain_depth:"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_server_table_takes_env_overrides_and_names_bad_fields() {
        use std::time::Duration;
        let file = ConfigFile::parse(
            "[server]\nheader_timeout = \"2s\"\nmax_connections = 100\npreauth_body_budget = \"8MiB\"\n",
        )
        .unwrap();
        let c = resolve_server(&file.server, |_| None).unwrap();
        assert_eq!(c.header_timeout, Duration::from_secs(2));
        assert_eq!(c.max_connections, Some(100));
        assert_eq!(c.preauth_body_budget, 8 << 20);
        assert_eq!(
            c.idle_timeout,
            crate::server::DEFAULT_IDLE_TIMEOUT,
            "default kept"
        );
        let c = resolve_server(&file.server, |k| match k {
            "CAPSTAN_SERVER_IDLE_TIMEOUT" => Some("5m".into()),
            "CAPSTAN_SERVER_MAX_CONNECTIONS" => Some("7".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.max_connections, Some(7));
        let defaults = resolve_server(&ServerSection::default(), |_| None).unwrap();
        assert_eq!(defaults, crate::server::ServerConfig::default());
        for (toml, field) in [
            ("body_timeout = \"soon\"", "server.body_timeout:"),
            ("header_timeout = \"0s\"", "server.header_timeout:"),
            ("max_connections = 0", "server.max_connections:"),
            (
                "preauth_body_budget = \"lots\"",
                "server.preauth_body_budget:",
            ),
        ] {
            let f = ConfigFile::parse(&format!("[server]\n{toml}\n")).unwrap();
            let err = resolve_server(&f.server, |_| None).unwrap_err().to_string();
            assert!(err.starts_with(field), "{toml}: {err}");
        }
        assert!(
            ConfigFile::parse("[server]\nheader_timout = \"1s\"\n")
                .unwrap_err()
                .contains("header_timout")
        );
    }

    #[test]
    fn the_docker_table_takes_its_variables_and_names_bad_fields() {
        use crate::docker::SshTunnel;
        use std::time::Duration;
        let defaults = resolve_docker(&DockerSection::default(), |_| None).unwrap();
        assert_eq!(
            defaults.connect_timeout,
            crate::docker::DEFAULT_CONNECT_TIMEOUT
        );
        assert_eq!(
            defaults.request_timeout,
            crate::docker::DEFAULT_REQUEST_TIMEOUT
        );
        assert_eq!(defaults.idle_timeout, crate::docker::DEFAULT_IDLE_TIMEOUT);
        assert_eq!(defaults.docker_host_env, None);
        assert_eq!(defaults.agent_socket, None);
        assert_eq!(defaults.ssh_tunnel, SshTunnel::Auto);
        assert_eq!(
            defaults.check_concurrency,
            crate::docker::DEFAULT_CHECK_CONCURRENCY
        );
        let file = ConfigFile::parse(
            "[docker]\nhost = \"unix:///run/d.sock\"\nssh_tunnel = \"dial-stdio\"\nconnect_timeout = \"3s\"\n",
        )
        .unwrap();
        file.docker.validate().unwrap();
        let c = resolve_docker(&file.docker, |_| None).unwrap();
        assert_eq!(c.docker_host_env.as_deref(), Some("unix:///run/d.sock"));
        assert_eq!(c.ssh_tunnel, SshTunnel::DialStdio);
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        let c = resolve_docker(&file.docker, |k| match k {
            "DOCKER_HOST" => Some("tcp://127.0.0.1:2375".into()),
            "SSH_AUTH_SOCK" => Some("/tmp/agent".into()),
            "CAPSTAN_SSH_TUNNEL" => Some("nonsense".into()),
            "CAPSTAN_DOCKER_IDLE_TIMEOUT" => Some("5m".into()),
            "CAPSTAN_DOCKER_CHECK_CONCURRENCY" => Some("64".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.docker_host_env.as_deref(), Some("tcp://127.0.0.1:2375"));
        assert_eq!(c.agent_socket, Some(PathBuf::from("/tmp/agent")));
        assert_eq!(
            c.ssh_tunnel,
            SshTunnel::Auto,
            "an unknown env value means auto"
        );
        assert_eq!(c.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.check_concurrency, 64);
        let empty = resolve_docker(&DockerSection::default(), |k| {
            (k == "DOCKER_HOST").then(String::new)
        })
        .unwrap();
        assert_eq!(
            empty.docker_host_env, None,
            "an empty DOCKER_HOST is no address"
        );
        for (toml, field) in [
            ("ssh_tunnel = \"tunnel\"", "docker.ssh_tunnel:"),
            ("connect_timeout = \"0s\"", "docker.connect_timeout:"),
            ("request_timeout = \"soon\"", "docker.request_timeout:"),
            ("host = \"\"", "docker.host:"),
            ("check_concurrency = 0", "docker.check_concurrency:"),
            ("check_concurrency = 5000", "docker.check_concurrency:"),
        ] {
            let f = ConfigFile::parse(&format!("[docker]\n{toml}\n")).unwrap();
            let err = f.docker.validate().unwrap_err().to_string();
            assert!(err.starts_with(field), "{toml}: {err}");
        }
        assert!(
            ConfigFile::parse("[docker]\nconect_timeout = \"1s\"\n")
                .unwrap_err()
                .contains("conect_timeout")
        );
    }

    #[test]
    fn a_bad_listen_address_names_the_field() {
        let err = Settings::resolve(&ConfigFile::default(), None, Some("localhost".into()), None)
            .unwrap_err();
        assert!(err.to_string().starts_with("api.listen:"), "{err}");
    }
}
