//! Connection checks: connect, ping, read the version and system info, timing each step.
//!
//! A check opens a fresh connection (it does not borrow the engine's pooled one), so it
//! proves that the stored credentials, host key and daemon work now. A *pooled* check
//! ([`CheckOptions::pooled`]) instead asks the engine's own connection to the device, the
//! one plugins and proxies use: it reuses the live SSH session (opening one when there is
//! none, which then stays open) and so says whether the engine's connection works. The
//! report says which steps succeeded and how long each took, and on failure the kind
//! ([`ConnectError::kind`]), the step that failed and a message saying what to do. The
//! HTTP status follows from it: 200 connected, 504 timed out, 502 anything else.
//!
//! The engine runs at most `[docker] check_concurrency` checks at once
//! ([`Pool::check`](super::Pool::check)); more wait for a slot.

use std::borrow::Cow;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ssh::{self, LoginChoice, SshTransport};
use super::{
    ConnectError, ConnectOptions, DockerClient, HostKeyPolicy, Step, Steps, classify_bollard,
    within,
};
use crate::device::{Device, DeviceKind, DeviceSecrets};

/// How to run a check.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// Accept the SSH server's key when none is pinned (trust on first use). The report's
    /// `host_key.trusted_now` then tells the caller to record it.
    pub trust_host_key: bool,
    pub connect: ConnectOptions,
    /// Check the engine's pooled connection to the device instead of a fresh one (see
    /// the module doc); never with `trust_host_key`.
    pub pooled: bool,
}

/// The outcome of a check.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckReport {
    /// Device name.
    pub device: String,
    /// Device id (absent for a pre-check of an unsaved device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<Uuid>,
    pub kind: DeviceKind,
    pub address: String,
    /// Whether the daemon answered ping, version and info.
    pub connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerFacts>,
    /// The ping round trip on the new connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// The whole check.
    pub total_ms: f64,
    /// The steps that succeeded, in order.
    pub steps: Vec<Step>,
    /// The step that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub failed_step: Option<Cow<'static, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<CheckFailure>,
    /// The SSH server's host key (ssh devices).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_key: Option<HostKeyReport>,
    /// The check went over the engine's pooled connection, not a fresh one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pooled: bool,
    /// Cluster mode: the node that owns the device and answered the check over NATS
    /// (the node asked does not own it); the steps are timed from the node asked, so
    /// they include the hop to the owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl CheckReport {
    /// A report for `device` before any step ran: not connected, nothing measured.
    pub fn starting(device: &Device) -> CheckReport {
        CheckReport {
            device: device.name.clone(),
            device_id: None,
            kind: device.kind,
            address: device.address(),
            connected: false,
            docker: None,
            latency_ms: None,
            total_ms: 0.0,
            steps: Vec::new(),
            failed_step: None,
            error: None,
            host_key: None,
            pooled: false,
            owner: None,
        }
    }
}

/// Why a check failed.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckFailure {
    /// `resolve`, `unreachable`, `timeout`, `auth`, `host-key-mismatch`,
    /// `host-key-unknown`, `docker-missing`, `permission-denied`, `daemon-not-running`,
    /// `tls`, `ssh`, …
    #[schema(value_type = String)]
    pub kind: Cow<'static, str>,
    /// What failed, on which device, and what to do.
    pub message: String,
    /// For `auth`: the methods the server offered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offered_methods: Option<Vec<String>>,
    /// For host key failures: the pinned key's fingerprint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_fingerprint: Option<String>,
    /// For host key failures: the fingerprint of the key the server presented.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presented_fingerprint: Option<String>,
}

impl From<&ConnectError> for CheckFailure {
    fn from(e: &ConnectError) -> Self {
        let fps = e.host_key_fingerprints();
        CheckFailure {
            kind: e.kind().into(),
            message: e.to_string(),
            offered_methods: e.offered_methods().map(|m| m.to_vec()),
            expected_fingerprint: fps.and_then(|(x, _)| x.map(str::to_string)),
            presented_fingerprint: fps.map(|(_, p)| p.to_string()),
        }
    }
}

/// What the daemon says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DockerFacts {
    /// Engine version, e.g. `20.10.24`.
    pub version: String,
    /// The daemon's API version.
    pub api_version: String,
    /// The oldest API version the daemon accepts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_api_version: Option<String>,
    /// The API version Capstan speaks with it.
    pub negotiated_api_version: String,
    pub os: String,
    pub arch: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operating_system: Option<String>,
    /// The daemon host's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containers: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containers_running: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub images: Option<i64>,
}

/// The SSH server's host key as seen by the check.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostKeyReport {
    pub algorithm: String,
    /// `SHA256:…`
    pub fingerprint: String,
    /// The key as an OpenSSH public key line, to pin it.
    pub key: String,
    /// The server presented the key pinned on the device.
    pub pinned: bool,
    /// No key was pinned, trust on first use was asked for and the login succeeded: the
    /// caller should pin `key` now.
    pub trusted_now: bool,
}

impl CheckReport {
    /// 200 when connected, 504 when the failure was a timeout, 502 otherwise.
    pub fn http_status(&self) -> u16 {
        match &self.error {
            None if self.connected => 200,
            Some(e) if e.kind == "timeout" => 504,
            _ => 502,
        }
    }
}

/// Checks `device` with `secrets` over a fresh connection.
pub async fn run_check(
    device: &Device,
    secrets: &DeviceSecrets,
    opts: &CheckOptions,
) -> CheckReport {
    let policy = if opts.trust_host_key {
        HostKeyPolicy::TrustOnFirstUse
    } else {
        HostKeyPolicy::PinnedOnly
    };
    let start = Instant::now();
    let client = DockerClient::new(device, secrets, &opts.connect, policy);
    // Boxed: the check's future is large, and unoptimised builds would otherwise move it
    // across the stack frames of whatever awaits it.
    Box::pin(check_client(
        device,
        Some(secrets),
        client,
        policy,
        opts,
        start,
    ))
    .await
}

/// Checks `device` over `client`, the engine's pooled connection to it: no fresh login,
/// so neither trust on first use nor the main login of a device with Docker-only
/// credentials.
pub(crate) async fn run_pooled_check(
    device: &Device,
    client: Result<std::sync::Arc<DockerClient>, ConnectError>,
    opts: &CheckOptions,
) -> CheckReport {
    let start = Instant::now();
    let mut report = Box::pin(check_client(
        device,
        None,
        client,
        HostKeyPolicy::PinnedOnly,
        opts,
        start,
    ))
    .await;
    report.pooled = true;
    report
}

/// The check itself. `secrets` is given for a fresh check (the main login of a device
/// with Docker-only credentials is verified with them); a pooled check goes over the
/// connection it is given.
async fn check_client(
    device: &Device,
    secrets: Option<&DeviceSecrets>,
    client: Result<std::sync::Arc<DockerClient>, ConnectError>,
    policy: HostKeyPolicy,
    opts: &CheckOptions,
    start: Instant,
) -> CheckReport {
    let steps = Steps::default();
    let mut report = CheckReport::starting(device);
    let client = match client {
        Ok(c) => Some(c),
        Err(e) => {
            report.failed_step = Some("configure".into());
            report.error = Some(CheckFailure::from(&e));
            None
        }
    };
    if let Some(client) = &client {
        match probe(device, secrets, client, policy, opts, &steps).await {
            Ok((facts, latency)) => {
                report.connected = true;
                report.docker = Some(facts);
                report.latency_ms = Some(latency);
            }
            Err(e) => {
                report.failed_step = Some(steps.current().unwrap_or("connect").into());
                report.error = Some(CheckFailure::from(&e));
            }
        }
        if let Some(k) = client.transport().presented_host_key() {
            let authenticated = client.transport().ssh_authenticated();
            let pinned = device
                .host_key
                .as_deref()
                .and_then(|p| crate::device::parse_host_key(p).ok())
                .is_some_and(|p| p.key_data() == k.key_data());
            report.host_key = Some(HostKeyReport {
                algorithm: k.algorithm().to_string(),
                fingerprint: ssh::fingerprint(&k),
                key: ssh::openssh_line(&k),
                pinned,
                trusted_now: device.host_key.is_none()
                    && policy == HostKeyPolicy::TrustOnFirstUse
                    && authenticated,
            });
        }
    }
    report.steps = steps.done();
    report.total_ms = crate::millis(start.elapsed());
    report
}

async fn probe(
    device: &Device,
    secrets: Option<&DeviceSecrets>,
    client: &DockerClient,
    policy: HostKeyPolicy,
    opts: &CheckOptions,
    steps: &Steps,
) -> Result<(DockerFacts, f64), ConnectError> {
    let name = device.name.as_str();
    let limit = opts.connect.connect_timeout;

    let Some(secrets) = secrets else {
        // Pooled: over a kept connection; else a new one is opened (on the live session,
        // or on a new one), its steps recorded, and kept.
        if client.idle_connections() == 0 {
            client.connect_traced(steps).await?;
        }
        return facts(name, limit, client, steps).await;
    };
    // With Docker-only credentials, the device's own login is verified too.
    if device.kind == DeviceKind::Ssh && device.docker_login.is_some() {
        let main =
            SshTransport::with_login(device, secrets, &opts.connect, policy, LoginChoice::Main)?;
        steps
            .run("main-login", main.login_only(&Steps::default()))
            .await?;
    }

    client.connect_traced(steps).await?;
    facts(name, limit, client, steps).await
}

/// Ping, version and info, each within `limit`; the facts and the ping's round trip.
async fn facts(
    name: &str,
    limit: std::time::Duration,
    client: &DockerClient,
    steps: &Steps,
) -> Result<(DockerFacts, f64), ConnectError> {
    let t = Instant::now();
    let ping = within(name, limit, steps, steps.run("ping", client.ping())).await?;
    let latency = crate::millis(t.elapsed());
    let docker = client.bollard_for(ping.api_version.as_deref()).await?;
    let version = within(
        name,
        limit,
        steps,
        steps.run("version", async {
            docker
                .version()
                .await
                .map_err(|e| classify_bollard(name, "reading the version", limit, e))
        }),
    )
    .await?;
    let info = within(
        name,
        limit,
        steps,
        steps.run("info", async {
            docker
                .info()
                .await
                .map_err(|e| classify_bollard(name, "reading the system info", limit, e))
        }),
    )
    .await?;
    let facts = DockerFacts {
        version: version.version.clone().unwrap_or_default(),
        api_version: version
            .api_version
            .clone()
            .or(ping.api_version.clone())
            .unwrap_or_default(),
        min_api_version: version.min_api_version.clone(),
        negotiated_api_version: docker.client_version().to_string(),
        os: version
            .os
            .clone()
            .or(ping.os_type.clone())
            .unwrap_or_default(),
        arch: version.arch.clone().unwrap_or_default(),
        kernel_version: version.kernel_version.clone(),
        operating_system: info.operating_system.clone(),
        name: info.name.clone(),
        containers: info.containers,
        containers_running: info.containers_running,
        images: info.images,
    };
    Ok((facts, latency))
}
