//! Docker connections against the real test infrastructure: every SSH auth method, host
//! key pinning, TLS client certificates, local sockets, the pool, streaming, the check
//! endpoints over HTTP and the `device check` command.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptions, LogsOptionsBuilder};
use capstan::device::{
    Device, DeviceKind, DeviceSecrets, DeviceSpec, DockerSshLogin, IpFamily, SecretField, SshAuth,
};
use capstan::docker::{
    CheckOptions, CheckReport, ConnectError, ConnectOptions, DockerClient, HostKeyPolicy,
    SshChannels, SshTunnel, run_check,
};
use capstan::engine::Engine;
use capstan::secret::Secret;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::util::free_port;
use crate::util::{DataDir, Infra, assert_success, stderr, stdout};

// ---------------------------------------------------------------------------------------
// fixtures

fn infra() -> &'static Infra {
    Infra::get()
}

fn secret(key: &str) -> Secret {
    let p = infra().path(key);
    Secret::from_file(&p).unwrap_or_else(|e| panic!("cannot read {} ({key}): {e}", p.display()))
}

fn text(key: &str) -> String {
    let p = infra().path(key);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("cannot read {} ({key}): {e}", p.display()))
}

fn host_key_line() -> String {
    text("SSH_HOST_KEY_PUB").trim().to_string()
}

fn fingerprint_of(pub_line: &str) -> String {
    russh::keys::PublicKey::from_openssh(pub_line.trim())
        .expect("a public key line")
        .fingerprint(russh::keys::HashAlg::Sha256)
        .to_string()
}

fn ssh_port() -> u16 {
    infra().var("SSH_PORT").parse().expect("SSH_PORT is a port")
}

/// An ssh device on the test sshd with its host key pinned.
fn ssh_device(name: &str, user_var: &str, auth: SshAuth) -> Device {
    Device {
        host: Some(infra().var("SSH_HOST4").into()),
        port: Some(ssh_port()),
        user: Some(infra().var(user_var).into()),
        auth: Some(auth),
        host_key: Some(host_key_line()),
        ..Device::blank(DeviceKind::Ssh, name)
    }
}

fn secrets(list: &[(SecretField, &str)]) -> DeviceSecrets {
    let mut s = DeviceSecrets::default();
    for (f, key) in list {
        s.set(*f, secret(key));
    }
    s
}

/// capstan-key with the ed25519 key, pinned host key.
fn key_device(name: &str) -> (Device, DeviceSecrets) {
    (
        ssh_device(name, "SSH_USER_KEY", SshAuth::Key),
        secrets(&[(SecretField::PrivateKey, "SSH_KEY_ED25519")]),
    )
}

fn tls_device(name: &str) -> Device {
    Device {
        host: Some(infra().var("TLS_HOST").into()),
        port: Some(infra().var("TLS_PORT").parse().unwrap()),
        ..Device::blank(DeviceKind::Tls, name)
    }
}

fn tls_secrets(ca: &str, cert: &str, key: &str) -> DeviceSecrets {
    secrets(&[
        (SecretField::TlsCa, ca),
        (SecretField::TlsCert, cert),
        (SecretField::TlsKey, key),
    ])
}

fn opts() -> ConnectOptions {
    ConnectOptions {
        connect_timeout: Duration::from_secs(15),
        request_timeout: Duration::from_secs(30),
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
        agent_socket: Some(infra().path("SSH_AGENT_SOCK")),
        docker_host_env: None,
        ..ConnectOptions::default()
    }
}

async fn check(d: &Device, s: &DeviceSecrets) -> CheckReport {
    check_with(d, s, false).await
}

async fn check_with(d: &Device, s: &DeviceSecrets, trust_host_key: bool) -> CheckReport {
    run_check(
        d,
        s,
        &CheckOptions {
            trust_host_key,
            connect: opts(),
            ..CheckOptions::default()
        },
    )
    .await
}

#[track_caller]
fn assert_connected(r: &CheckReport) {
    assert!(
        r.connected && r.http_status() == 200,
        "expected a connection, got:\n{}",
        serde_json::to_string_pretty(r).unwrap()
    );
    let d = r.docker.as_ref().expect("docker facts");
    assert_eq!(d.version, infra().var("DOCKER_SERVER_VERSION"));
    assert_eq!(d.negotiated_api_version, infra().var("DOCKER_API_VERSION"));
}

#[track_caller]
fn assert_fails(r: &CheckReport, kind: &str) -> String {
    let e = r.error.as_ref().unwrap_or_else(|| {
        panic!(
            "expected a {kind} failure, got:\n{}",
            serde_json::to_string_pretty(r).unwrap()
        )
    });
    assert!(!r.connected);
    assert_eq!(
        e.kind,
        kind,
        "wrong failure kind:\n{}",
        serde_json::to_string_pretty(r).unwrap()
    );
    assert!(
        e.message.contains(&r.device),
        "the message names the device: {}",
        e.message
    );
    e.message.clone()
}

fn client(d: &Device, s: &DeviceSecrets) -> Arc<DockerClient> {
    DockerClient::new(d, s, &opts(), HostKeyPolicy::PinnedOnly).expect("a client")
}

async fn list(docker: &Docker) -> Result<usize, bollard::errors::Error> {
    docker
        .list_containers(None::<ListContainersOptions>)
        .await
        .map(|v| v.len())
}

/// A container on the local daemon, removed (with the docker CLI) when dropped.
struct TestContainer {
    name: String,
}

impl TestContainer {
    fn run(cmd: &[&str], labels: &[(&str, &str)]) -> TestContainer {
        let name = format!(
            "capstan-docker-test-{}",
            &uuid::Uuid::new_v4().to_string()[..8]
        );
        let mut c = Command::new("docker");
        c.args([
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            "org.capstan.test=docker",
        ]);
        for (k, v) in labels {
            c.args(["--label", &format!("{k}={v}")]);
        }
        c.arg(infra().var("TEST_IMAGE")).args(cmd);
        let out = c.output().expect("run docker");
        assert!(
            out.status.success(),
            "docker run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestContainer { name }
    }
}

impl Drop for TestContainer {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------------------
// SSH auth methods

#[tokio::test]
async fn connects_over_ssh_with_an_ed25519_key() {
    let (d, s) = key_device("ed25519");
    let r = check(&d, &s).await;
    assert_connected(&r);
    let names: Vec<&str> = r.steps.iter().map(|s| s.step.as_ref()).collect();
    for step in [
        "resolve",
        "tcp-connect",
        "ssh-handshake",
        "authenticate",
        "open-channel",
        "ping",
        "version",
        "info",
    ] {
        assert!(names.contains(&step), "step {step} is timed: {names:?}");
    }
    let k = r.host_key.expect("host key report");
    assert!(k.pinned && !k.trusted_now);
    assert_eq!(k.fingerprint, fingerprint_of(&host_key_line()));
}

#[tokio::test]
async fn connects_over_ssh_with_an_ecdsa_key() {
    let d = ssh_device("ecdsa", "SSH_USER_KEY", SshAuth::Key);
    let s = secrets(&[(SecretField::PrivateKey, "SSH_KEY_ECDSA")]);
    assert_connected(&check(&d, &s).await);
}

#[tokio::test]
async fn connects_over_ssh_with_an_rsa_pem_key() {
    assert!(text("SSH_KEY_RSA_PEM").contains("BEGIN RSA PRIVATE KEY"));
    let d = ssh_device("rsa-pem", "SSH_USER_KEY", SshAuth::Key);
    let s = secrets(&[(SecretField::PrivateKey, "SSH_KEY_RSA_PEM")]);
    assert_connected(&check(&d, &s).await);
}

#[tokio::test]
async fn connects_over_ssh_with_a_passphrase_protected_key() {
    let mut d = ssh_device("keypass", "SSH_USER_KEYPASS", SshAuth::Key);
    d.key_has_passphrase = true;
    let s = secrets(&[
        (SecretField::PrivateKey, "SSH_KEY_PASSPHRASE_PROTECTED"),
        (SecretField::KeyPassphrase, "SSH_KEY_PASSPHRASE_FILE"),
    ]);
    assert_connected(&check(&d, &s).await);

    let without = secrets(&[(SecretField::PrivateKey, "SSH_KEY_PASSPHRASE_PROTECTED")]);
    let msg = assert_fails(&check(&d, &without).await, "invalid");
    assert!(msg.contains("encrypted"), "{msg}");
}

#[tokio::test]
async fn connects_over_ssh_with_a_password() {
    let d = ssh_device("password", "SSH_USER_PASSWORD", SshAuth::Password);
    let s = secrets(&[(SecretField::Password, "SSH_PASSWORD_FILE")]);
    assert_connected(&check(&d, &s).await);
}

#[tokio::test]
async fn connects_over_ssh_with_keyboard_interactive_answering_the_password_prompt() {
    let mut d = ssh_device("kbd", "SSH_USER_KBD", SshAuth::Password);
    let s = secrets(&[(SecretField::Password, "SSH_KBD_PASSWORD_FILE")]);
    // This user may only log in keyboard-interactive: plain password auth is refused,
    // and the error says what the server offers.
    let r = check(&d, &s).await;
    assert_fails(&r, "auth");
    let offered = r.error.as_ref().unwrap().offered_methods.clone().unwrap();
    assert!(
        offered.contains(&"keyboard-interactive".to_string()),
        "{offered:?}"
    );
    assert!(r.error.unwrap().message.contains("--keyboard-interactive"));

    d.keyboard_interactive = true;
    assert_connected(&check(&d, &s).await);

    let mut wrong = DeviceSecrets::default();
    wrong.set(
        SecretField::Password,
        Secret::from_str_owned("not-it".into()),
    );
    let r = check(&d, &wrong).await;
    let msg = assert_fails(&r, "auth");
    assert!(msg.contains("keyboard-interactive"), "{msg}");
}

#[tokio::test]
async fn connects_over_ssh_through_the_ssh_agent() {
    let d = ssh_device("agent", "SSH_USER_KEY", SshAuth::Agent);
    assert_connected(&check(&d, &DeviceSecrets::default()).await);
}

#[tokio::test]
async fn requests_agent_forwarding_when_asked_and_still_connects() {
    let (mut d, s) = key_device("forwarding");
    d.agent_forwarding = true;
    assert_connected(&check(&d, &s).await);
    // The agent is forwarded for the remote docker command: auto runs dial-stdio.
    let cl = tunnel_client(&d, &s, SshTunnel::Auto);
    some_calls(&cl).await;
    assert_eq!(cl.ssh_channels().streamlocal, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_agent_serves_the_remote_docker_command_and_only_when_asked() {
    // An sshd that runs `ssh-add -l` (what a remote docker command with an ssh://
    // context would use the agent for) before the requested command, recording what
    // the agent it finds holds.
    let seen = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(seen.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let record = seen.path().join("agent.txt");
    let sshd = PrivateSshd::start_with(&format!(
        "ForceCommand ssh-add -l >>{} 2>&1; exec $SSH_ORIGINAL_COMMAND",
        record.display()
    ));
    let agent_key = fingerprint_of(
        &std::fs::read_to_string(format!("{}.pub", infra().var("SSH_KEY_ED25519"))).unwrap(),
    );

    // Without forwarding the remote command finds no agent.
    let (d, s) = sshd.device("no-forwarding");
    let cl = tunnel_client(&d, &s, SshTunnel::DialStdio);
    some_calls(&cl).await;
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(!text.is_empty(), "the forced command ran");
    assert!(!text.contains(&agent_key), "no agent was forwarded: {text}");
    assert!(text.contains("Could not open a connection"), "{text}");
    std::fs::remove_file(&record).unwrap();

    // With it, every docker command on the remote host reaches the engine's agent.
    let (mut d, s) = sshd.device("forwarding");
    d.agent_forwarding = true;
    let cl = tunnel_client(&d, &s, SshTunnel::Auto);
    some_calls(&cl).await;
    let ch = cl.ssh_channels();
    assert_eq!(ch.streamlocal, 0, "{ch:?}");
    let text = std::fs::read_to_string(&record).unwrap();
    let runs = text.lines().filter(|l| l.contains(&agent_key)).count();
    assert_eq!(
        runs, ch.dial_stdio,
        "each dial-stdio command saw the agent's key {agent_key}: {text}"
    );
    assert!(!text.contains("Could not open a connection"), "{text}");
}

#[tokio::test]
async fn a_wrong_key_is_an_auth_failure_listing_the_offered_methods() {
    let d = ssh_device("wrong-key", "SSH_USER_KEY", SshAuth::Key);
    let s = secrets(&[(SecretField::PrivateKey, "SSH_USER_NODOCKER_KEY")]);
    let r = check(&d, &s).await;
    let msg = assert_fails(&r, "auth");
    assert_eq!(r.failed_step.as_deref(), Some("authenticate"));
    assert!(msg.contains("publickey"), "{msg}");
    assert_eq!(
        r.error.unwrap().offered_methods.unwrap(),
        vec!["publickey".to_string()]
    );
}

// ---------------------------------------------------------------------------------------
// addresses

#[tokio::test]
async fn connects_over_ipv4_and_over_ipv6() {
    let (mut d, s) = key_device("v6");
    d.host = Some(infra().var("SSH_HOST6").into());
    d.ip_family = IpFamily::Ipv6;
    let r = check(&d, &s).await;
    assert_connected(&r);
    assert!(r.address.contains("[::1]"), "{}", r.address);

    d.host = Some("localhost".into());
    d.ip_family = IpFamily::Ipv4;
    assert_connected(&check(&d, &s).await);
}

#[tokio::test]
async fn forcing_a_family_the_host_lacks_is_a_clear_resolve_failure() {
    let (mut d, s) = key_device("no-v6");
    d.host = Some(infra().var("SSH_HOST4").into());
    d.ip_family = IpFamily::Ipv6;
    let r = check(&d, &s).await;
    let msg = assert_fails(&r, "resolve");
    assert!(msg.contains("no IPv6 address"), "{msg}");
    assert_eq!(r.failed_step.as_deref(), Some("resolve"));
}

#[tokio::test]
async fn an_unknown_host_name_is_a_resolve_failure() {
    let (mut d, s) = key_device("nxdomain");
    d.host = Some("no-such-host.invalid".into());
    assert_fails(&check(&d, &s).await, "resolve");
}

// ---------------------------------------------------------------------------------------
// remote docker: socket path, sudo, Docker-only credentials, failures

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_the_docker_command_is_reported_as_docker_missing() {
    // A real sshd whose users have no `docker` on their PATH (the remote host of a
    // device whose Docker CLI is not installed).
    let sshd = PrivateSshd::start_with(
        "ForceCommand PATH=/usr/lib/capstan-nothing-here; export PATH; eval \"$SSH_ORIGINAL_COMMAND\"",
    );
    let (mut d, s) = sshd.device("no-docker-cli");
    d.ssh_tunnel = Some(SshTunnel::DialStdio);
    let r = check(&d, &s).await;
    let msg = assert_fails(&r, "docker-missing");
    assert!(msg.contains("install the Docker CLI"), "{msg}");
    // The login itself worked: the report says so.
    assert!(
        r.steps.iter().any(|st| st.step == "authenticate"),
        "{}",
        serde_json::to_string_pretty(&r).unwrap()
    );
}

#[tokio::test]
async fn reaches_a_custom_socket_path_over_ssh() {
    let (mut d, s) = key_device("alt-socket");
    d.socket_path = Some(infra().var("ALT_DOCKER_SOCKET").into());
    assert_connected(&check(&d, &s).await);

    d.socket_path = Some("/run/capstan-no-such-dir/docker.sock".into());
    let msg = assert_fails(&check(&d, &s).await, "daemon-not-running");
    assert!(
        msg.contains("/run/capstan-no-such-dir/docker.sock"),
        "{msg}"
    );
}

#[tokio::test]
async fn runs_docker_through_sudo_for_a_user_outside_the_docker_group() {
    let mut d = ssh_device("sudo", "SSH_USER_SUDO", SshAuth::Key);
    let s = secrets(&[(SecretField::PrivateKey, "SSH_USER_SUDO_KEY")]);
    let msg = assert_fails(&check(&d, &s).await, "permission-denied");
    assert!(msg.contains("docker.sock"), "{msg}");

    d.sudo = true;
    assert_connected(&check(&d, &s).await);
}

#[tokio::test]
async fn reports_permission_denied_when_the_user_cannot_use_the_socket() {
    let d = ssh_device("nodocker", "SSH_USER_NODOCKER", SshAuth::Key);
    let s = secrets(&[(SecretField::PrivateKey, "SSH_USER_NODOCKER_KEY")]);
    let r = check(&d, &s).await;
    let msg = assert_fails(&r, "permission-denied");
    assert!(msg.contains("permission denied"), "{msg}");
    // The SSH part worked: the steps up to the channel succeeded.
    assert!(r.steps.iter().any(|s| s.step == "open-channel"));
}

#[tokio::test]
async fn reports_sudo_refusing_to_run_docker_as_permission_denied() {
    let mut d = ssh_device("nosudo", "SSH_USER_NODOCKER", SshAuth::Key);
    d.sudo = true;
    let s = secrets(&[(SecretField::PrivateKey, "SSH_USER_NODOCKER_KEY")]);
    let msg = assert_fails(&check(&d, &s).await, "permission-denied");
    assert!(msg.contains("sudo"), "{msg}");
}

#[tokio::test]
async fn uses_the_docker_only_credentials_for_the_docker_connection() {
    let mut d = ssh_device("docker-login", "SSH_USER_NODOCKER", SshAuth::Key);
    d.docker_login = Some(DockerSshLogin {
        user: infra().var("SSH_USER_KEY").into(),
        auth: SshAuth::Key,
        key_has_passphrase: false,
    });
    let s = secrets(&[
        (SecretField::PrivateKey, "SSH_USER_NODOCKER_KEY"),
        (SecretField::DockerPrivateKey, "SSH_KEY_ED25519"),
    ]);
    let r = check(&d, &s).await;
    assert_connected(&r);
    // The device's own login was verified as well.
    assert!(
        r.steps.iter().any(|s| s.step == "main-login"),
        "{:?}",
        r.steps
    );

    // Without them, the main user gets permission denied.
    d.docker_login = None;
    assert_fails(&check(&d, &s).await, "permission-denied");
}

// ---------------------------------------------------------------------------------------
// host keys

#[tokio::test]
async fn accepts_the_pinned_host_key_whatever_its_comment() {
    let (mut d, s) = key_device("pinned");
    let mut parts = host_key_line()
        .split_whitespace()
        .map(str::to_string)
        .collect::<Vec<_>>();
    parts.truncate(2);
    d.host_key = Some(format!("{} {} some-other-comment", parts[0], parts[1]));
    assert_connected(&check(&d, &s).await);
}

#[tokio::test]
async fn refuses_a_changed_host_key_showing_both_fingerprints() {
    let (mut d, s) = key_device("changed");
    let other = text("SSH_OTHER_HOST_KEY_PUB");
    d.host_key = Some(other.trim().into());
    let r = check(&d, &s).await;
    let msg = assert_fails(&r, "host-key-mismatch");
    let expected = fingerprint_of(&other);
    let presented = fingerprint_of(&host_key_line());
    assert!(msg.contains(&expected) && msg.contains(&presented), "{msg}");
    let e = r.error.unwrap();
    assert_eq!(e.expected_fingerprint.as_deref(), Some(expected.as_str()));
    assert_eq!(e.presented_fingerprint.as_deref(), Some(presented.as_str()));
    assert_eq!(r.failed_step.as_deref(), Some("ssh-handshake"));
    // Trust on first use never overrides a pinned key.
    assert_fails(&check_with(&d, &s, true).await, "host-key-mismatch");
}

#[tokio::test]
async fn refuses_an_unpinned_host_key_unless_trust_on_first_use_is_asked() {
    let (mut d, s) = key_device("unpinned");
    d.host_key = None;
    let r = check(&d, &s).await;
    let msg = assert_fails(&r, "host-key-unknown");
    let fp = fingerprint_of(&host_key_line());
    assert!(msg.contains(&fp), "shows the presented fingerprint: {msg}");
    assert!(
        msg.contains("--trust-host-key"),
        "says how to pin it: {msg}"
    );

    let r = check_with(&d, &s, true).await;
    assert_connected(&r);
    let k = r.host_key.expect("the presented key");
    assert!(k.trusted_now && !k.pinned);
    assert_eq!(fingerprint_of(&k.key), fp);
}

// ---------------------------------------------------------------------------------------
// TLS

#[tokio::test]
async fn connects_over_tls_with_the_client_certificate() {
    let s = tls_secrets("TLS_CA", "TLS_CERT", "TLS_KEY");
    let d = tls_device("tls");
    let r = check(&d, &s).await;
    assert_connected(&r);
    assert!(r.steps.iter().any(|s| s.step == "tls-handshake"));

    let mut named = tls_device("tls-named");
    named.tls_server_name = Some(infra().var("TLS_SERVER_NAME").into());
    assert_connected(&check(&named, &s).await);

    let mut misnamed = tls_device("tls-misnamed");
    misnamed.tls_server_name = Some("not-the-daemon.example".into());
    let msg = assert_fails(&check(&misnamed, &s).await, "tls");
    assert!(msg.contains("--tls-server-name"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_tls_connections_to_one_daemon_all_complete_their_handshake() {
    let cl = client(
        &tls_device("tls-many"),
        &tls_secrets("TLS_CA", "TLS_CERT", "TLS_KEY"),
    );
    let docker = cl.docker().await.unwrap();
    let calls = (0..12).map(|_| {
        let docker = docker.clone();
        async move { list(&docker).await }
    });
    let results = futures_util::future::join_all(calls).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert!(
        cl.connections_opened() >= 2,
        "several connections were opened"
    );
}

#[tokio::test]
async fn tls_with_the_wrong_ca_is_refused_clearly() {
    let s = tls_secrets("TLS_OTHER_CA", "TLS_CERT", "TLS_KEY");
    let r = check(&tls_device("tls-wrong-ca"), &s).await;
    let msg = assert_fails(&r, "tls");
    assert!(msg.contains("not signed by the CA"), "{msg}");
    assert_eq!(r.failed_step.as_deref(), Some("tls-handshake"));
}

#[tokio::test]
async fn tls_refuses_a_client_certificate_from_another_ca() {
    let s = tls_secrets("TLS_CA", "TLS_OTHER_CERT", "TLS_OTHER_KEY");
    let r = check(&tls_device("tls-other-cert"), &s).await;
    let msg = assert_fails(&r, "tls");
    assert!(msg.contains("rejected the client certificate"), "{msg}");
}

// ---------------------------------------------------------------------------------------
// local sockets

#[tokio::test]
async fn connects_to_the_local_socket_and_to_another_unix_socket() {
    let mut d = Device::blank(DeviceKind::Local, "local");
    d.docker_host = Some(format!("unix://{}", infra().var("DOCKER_SOCKET")));
    assert_connected(&check(&d, &DeviceSecrets::default()).await);

    d.docker_host = Some(format!("unix://{}", infra().var("ALT_DOCKER_SOCKET")));
    assert_connected(&check(&d, &DeviceSecrets::default()).await);

    d.docker_host = Some("unix:///run/capstan-no-such.sock".into());
    assert_fails(
        &check(&d, &DeviceSecrets::default()).await,
        "daemon-not-running",
    );
}

#[tokio::test]
async fn a_local_device_without_address_follows_docker_host() {
    let d = Device::blank(DeviceKind::Local, "env");
    let mut o = opts();
    o.docker_host_env = Some(format!("unix://{}", infra().var("ALT_DOCKER_SOCKET")));
    let r = run_check(
        &d,
        &DeviceSecrets::default(),
        &CheckOptions {
            trust_host_key: false,
            connect: o.clone(),
            ..CheckOptions::default()
        },
    )
    .await;
    assert_connected(&r);

    o.docker_host_env = Some("unix:///run/capstan-from-docker-host.sock".into());
    let r = run_check(
        &d,
        &DeviceSecrets::default(),
        &CheckOptions {
            trust_host_key: false,
            connect: o.clone(),
            ..CheckOptions::default()
        },
    )
    .await;
    let msg = assert_fails(&r, "daemon-not-running");
    assert!(msg.contains("capstan-from-docker-host.sock"), "{msg}");

    o.docker_host_env = Some("ssh://me@host".into());
    let r = run_check(
        &d,
        &DeviceSecrets::default(),
        &CheckOptions {
            trust_host_key: false,
            connect: o,
            ..CheckOptions::default()
        },
    )
    .await;
    assert_fails(&r, "invalid");
}

/// Forwards TCP connections on a loopback port to a unix socket; counts them.
async fn tcp_to_unix_forwarder(
    socket: PathBuf,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let socket = socket.clone();
            tokio::spawn(async move {
                if let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_check_command_reads_docker_host_unix_and_tcp() {
    let dir = DataDir::with_vault();
    assert_success(
        &dir.capstan(&["device", "add", "here", "--kind", "local"]),
        "device add",
    );

    let alt = format!("unix://{}", infra().var("ALT_DOCKER_SOCKET"));
    let out = dir
        .cmd()
        .env("DOCKER_HOST", &alt)
        .args(["device", "check", "here"])
        .output()
        .unwrap();
    assert_success(&out, "device check with DOCKER_HOST=unix://");

    let (addr, count) = tcp_to_unix_forwarder(infra().path("DOCKER_SOCKET")).await;
    let mut cmd = dir.cmd();
    cmd.env("DOCKER_HOST", format!("tcp://{addr}"))
        .args(["device", "check", "here", "--json"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert_success(&out, "device check with DOCKER_HOST=tcp://");
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["connected"], true);
    assert!(
        count.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "went through the tcp address"
    );

    let out = dir
        .cmd()
        .env("DOCKER_HOST", "unix:///run/capstan-nothing-here.sock")
        .args(["device", "check", "here"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("capstan-nothing-here.sock"),
        "{}",
        stderr(&out)
    );
}

// ---------------------------------------------------------------------------------------
// the pooled connection

#[tokio::test]
async fn the_api_version_is_negotiated_down_to_the_daemons() {
    let (d, s) = key_device("negotiate");
    let docker = client(&d, &s).docker().await.unwrap();
    assert_eq!(
        docker.client_version().to_string(),
        infra().var("DOCKER_API_VERSION")
    );
    let v = docker.version().await.unwrap();
    assert_eq!(
        v.api_version.as_deref(),
        Some(infra().var("DOCKER_API_VERSION"))
    );
}

#[tokio::test]
async fn every_transport_serves_the_same_calls() {
    let (sd, ss) = key_device("same-ssh");
    let mut ld = Device::blank(DeviceKind::Local, "same-local");
    ld.docker_host = Some(format!("unix://{}", infra().var("DOCKER_SOCKET")));
    let td = tls_device("same-tls");
    let ts = tls_secrets("TLS_CA", "TLS_CERT", "TLS_KEY");
    let c = TestContainer::run(&["sleep", "300"], &[]);
    for (d, s) in [(sd, ss), (ld, DeviceSecrets::default()), (td, ts)] {
        let docker = client(&d, &s).docker().await.unwrap();
        let found = docker
            .inspect_container(
                &c.name,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .unwrap_or_else(|e| panic!("inspect over {}: {e}", d.kind));
        assert_eq!(found.name.as_deref(), Some(format!("/{}", c.name).as_str()));
        assert!(list(&docker).await.unwrap() >= 1);
    }
}

#[tokio::test]
async fn raw_requests_and_upgraded_exec_streams_use_the_pooled_connections() {
    let (d, s) = key_device("raw");
    let cl = client(&d, &s);
    let req = hyper::Request::get(format!(
        "/v{}/containers/json",
        infra().var("DOCKER_API_VERSION")
    ))
    .body(capstan::docker::empty_body())
    .unwrap();
    let resp = cl.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(serde_json::from_slice::<Value>(&body).unwrap().is_array());

    // exec start is an HTTP upgrade: bollard takes it over the same connections.
    let c = TestContainer::run(&["sleep", "300"], &[]);
    let docker = cl.docker().await.unwrap();
    let exec = docker
        .create_exec(
            &c.name,
            bollard::exec::CreateExecOptions {
                cmd: Some(vec!["echo", "hello from exec"]),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let started = docker.start_exec(&exec.id, None).await.unwrap();
    let bollard::exec::StartExecResults::Attached { mut output, .. } = started else {
        panic!("expected an attached exec");
    };
    let mut got = String::new();
    while let Some(Ok(chunk)) = tokio::time::timeout(Duration::from_secs(15), output.next())
        .await
        .unwrap()
    {
        got.push_str(&chunk.to_string());
    }
    assert!(got.contains("hello from exec"), "{got:?}");
    assert!(cl.open_connections() <= capstan::docker::SSH_CHANNELS_PER_SESSION);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_share_one_session_within_the_channel_cap() {
    let (d, s) = key_device("concurrent");
    let cl = client(&d, &s);
    let docker = cl.docker().await.unwrap();
    let watcher = {
        let cl = cl.clone();
        tokio::spawn(async move {
            let mut most = 0;
            for _ in 0..400 {
                most = most.max(cl.open_connections());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        })
    };
    let calls = (0..40).map(|_| {
        let docker = docker.clone();
        async move { list(&docker).await }
    });
    let results = futures_util::future::join_all(calls).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let most = watcher.await.unwrap();
    assert!(
        (1..=capstan::docker::SSH_CHANNELS_PER_SESSION).contains(&most),
        "at most {} channels, saw {most}",
        capstan::docker::SSH_CHANNELS_PER_SESSION
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_with_follow_stream_through_the_ssh_tunnel() {
    let (d, s) = key_device("logs");
    let docker = client(&d, &s).docker().await.unwrap();
    let c = TestContainer::run(
        &[
            "sh",
            "-c",
            "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.2; done",
        ],
        &[],
    );
    let opts = LogsOptionsBuilder::new().follow(true).stdout(true).build();
    let mut logs = docker.logs(&c.name, Some(opts));
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lines.len() < 5 {
        let left = deadline.saturating_duration_since(Instant::now());
        let item = tokio::time::timeout(left, logs.next())
            .await
            .expect("log lines keep coming")
            .expect("the stream stays open")
            .unwrap();
        lines.push(item.to_string());
    }
    assert!(lines.iter().any(|l| l.contains("line 4")), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_through_the_ssh_tunnel() {
    let (d, s) = key_device("events");
    let docker = client(&d, &s).docker().await.unwrap();
    let tag = uuid::Uuid::new_v4().to_string();
    let filters = HashMap::from([("label", vec![format!("org.capstan.test.events={tag}")])]);
    let mut events = docker.events(Some(EventsOptionsBuilder::new().filters(&filters).build()));
    // The stream is open once the daemon answered; then make an event.
    let first =
        tokio::spawn(
            async move { tokio::time::timeout(Duration::from_secs(20), events.next()).await },
        );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _c = tokio::task::spawn_blocking(move || {
        TestContainer::run(&["true"], &[("org.capstan.test.events", &tag)])
    })
    .await
    .unwrap();
    let ev = first
        .await
        .unwrap()
        .expect("an event arrives")
        .expect("the stream stays open")
        .unwrap();
    assert_eq!(ev.action.as_deref(), Some("create"), "{ev:?}");
}

// ---------------------------------------------------------------------------------------
// one session per device, reconnecting

/// An sshd of our own, from the test infrastructure's config, on another port: it can be
/// stopped and started without touching the shared one.
pub(crate) struct PrivateSshd {
    _dir: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
    pub(crate) port: u16,
    child: Option<Child>,
}

impl PrivateSshd {
    pub(crate) fn start() -> PrivateSshd {
        Self::start_with("")
    }

    /// With `extra` server-wide settings (placed before the config's own, so they win).
    fn start_with(extra: &str) -> PrivateSshd {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let base = std::fs::read_to_string(infra().path("SSH_CONFIG")).unwrap();
        let config_text: String = base
            .lines()
            .filter(|l| !l.starts_with("ListenAddress") && !l.starts_with("PidFile"))
            .map(|l| format!("{l}\n"))
            .collect();
        let config_text = format!(
            "ListenAddress 127.0.0.1:{port}\nPidFile {}\n{extra}\n{config_text}",
            dir.path().join("sshd.pid").display()
        );
        let config = dir.path().join("sshd_config");
        std::fs::write(&config, config_text).unwrap();
        let log = dir.path().join("sshd.log");
        let mut s = PrivateSshd {
            _dir: dir,
            config,
            log,
            port,
            child: None,
        };
        s.spawn();
        s
    }

    pub(crate) fn spawn(&mut self) {
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-f")
            .arg(&self.config)
            .arg("-E")
            .arg(&self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sshd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::Read;
                let mut b = [0u8; 8];
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                if s.read(&mut b)
                    .is_ok_and(|n| n > 0 && b.starts_with(b"SSH-"))
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "our sshd did not come up: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the listener and the sessions it started (all by pid).
    pub(crate) fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        let mut victims = descendants(pid);
        victims.reverse();
        for p in victims {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(p.to_string())
                .stderr(Stdio::null())
                .status();
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn accepted_sessions(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Accepted publickey for"))
            .count()
    }

    fn device(&self, name: &str) -> (Device, DeviceSecrets) {
        let (mut d, s) = key_device(name);
        d.port = Some(self.port);
        (d, s)
    }
}

impl Drop for PrivateSshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every process below `pid`, parents before children.
fn descendants(pid: u32) -> Vec<u32> {
    let mut by_parent: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) else {
            continue;
        };
        if let Some(ppid) = after.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
            by_parent.entry(ppid).or_default().push(p);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in by_parent.get(&p).cloned().unwrap_or_default() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

fn tunnel_client(d: &Device, s: &DeviceSecrets, tunnel: SshTunnel) -> Arc<DockerClient> {
    let o = ConnectOptions {
        ssh_tunnel: tunnel,
        ..opts()
    };
    DockerClient::new(d, s, &o, HostKeyPolicy::PinnedOnly).expect("client")
}

/// A few sequential and concurrent calls, so the client opens more than one channel.
async fn some_calls(cl: &DockerClient) {
    let docker = cl.docker().await.expect("connect");
    for i in 0..3 {
        list(&docker)
            .await
            .unwrap_or_else(|e| panic!("operation {i}: {e}"));
    }
    let lists = (0..4).map(|_| {
        let docker = docker.clone();
        async move { list(&docker).await }
    });
    for r in futures_util::future::join_all(lists).await {
        r.expect("concurrent list");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_connections_go_straight_to_the_socket_when_the_server_allows_streamlocal() {
    let (d, s) = key_device("streamlocal");
    let cl = tunnel_client(&d, &s, SshTunnel::Auto);
    some_calls(&cl).await;
    let ch = cl.ssh_channels();
    assert!(ch.streamlocal >= 1, "{ch:?}");
    assert_eq!(ch.dial_stdio, 0, "{ch:?}");

    // A custom socket path is the streamlocal target too.
    let (mut d, s) = key_device("streamlocal-alt");
    d.socket_path = Some(infra().var("ALT_DOCKER_SOCKET").into());
    let cl = tunnel_client(&d, &s, SshTunnel::Streamlocal);
    some_calls(&cl).await;
    assert_eq!(cl.ssh_channels().dial_stdio, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forcing_dial_stdio_never_opens_a_streamlocal_channel() {
    let (d, s) = key_device("forced-dial-stdio");
    let cl = tunnel_client(&d, &s, SshTunnel::DialStdio);
    some_calls(&cl).await;
    let ch = cl.ssh_channels();
    assert_eq!(ch.streamlocal, 0, "{ch:?}");
    assert!(ch.dial_stdio >= 1, "{ch:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_own_tunnel_setting_wins_over_the_engines() {
    // The engine says streamlocal; the device says dial-stdio, and gets it.
    let (mut d, s) = key_device("device-dial-stdio");
    d.ssh_tunnel = Some(SshTunnel::DialStdio);
    let cl = tunnel_client(&d, &s, SshTunnel::Streamlocal);
    some_calls(&cl).await;
    let ch = cl.ssh_channels();
    assert_eq!(ch.streamlocal, 0, "{ch:?}");
    assert!(ch.dial_stdio >= 1, "{ch:?}");

    // And the other way round.
    let (mut d, s) = key_device("device-streamlocal");
    d.ssh_tunnel = Some(SshTunnel::Streamlocal);
    let cl = tunnel_client(&d, &s, SshTunnel::DialStdio);
    some_calls(&cl).await;
    let ch = cl.ssh_channels();
    assert!(ch.streamlocal >= 1, "{ch:?}");
    assert_eq!(ch.dial_stdio, 0, "{ch:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_dial_stdio_when_the_server_refuses_streamlocal() {
    let sshd = PrivateSshd::start_with("AllowStreamLocalForwarding no");
    let (d, s) = sshd.device("no-streamlocal");
    let cl = tunnel_client(&d, &s, SshTunnel::Auto);
    some_calls(&cl).await;
    let ch = cl.ssh_channels();
    assert_eq!(ch.streamlocal, 0, "{ch:?}");
    assert!(ch.dial_stdio >= 1, "{ch:?}");
    assert_eq!(
        sshd.accepted_sessions(),
        1,
        "the fallback keeps the session"
    );

    // Forced streamlocal has nothing to fall back to, and says why.
    let cl = tunnel_client(&d, &s, SshTunnel::Streamlocal);
    let e = cl.docker().await.expect_err("streamlocal is refused");
    assert_eq!(e.kind(), "ssh", "{e}");
    let msg = e.to_string();
    assert!(msg.contains("streamlocal"), "{msg}");
    assert!(msg.contains("AllowStreamLocalForwarding"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sudo_devices_use_dial_stdio_whatever_the_tunnel_setting() {
    let mut d = ssh_device("sudo-tunnel", "SSH_USER_SUDO", SshAuth::Key);
    d.sudo = true;
    let s = secrets(&[(SecretField::PrivateKey, "SSH_USER_SUDO_KEY")]);
    for tunnel in [SshTunnel::Auto, SshTunnel::Streamlocal] {
        let cl = tunnel_client(&d, &s, tunnel);
        some_calls(&cl).await;
        let ch = cl.ssh_channels();
        assert_eq!(ch.streamlocal, 0, "{tunnel}: {ch:?}");
        assert!(ch.dial_stdio >= 1, "{tunnel}: {ch:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_may_not_open_the_socket_gets_dial_stdios_diagnosis() {
    // sshd cannot open the socket for this user either: auto falls back, and the error
    // is the one dial-stdio gives.
    let d = ssh_device("nodocker-tunnel", "SSH_USER_NODOCKER", SshAuth::Key);
    let s = secrets(&[(SecretField::PrivateKey, "SSH_USER_NODOCKER_KEY")]);
    let cl = tunnel_client(&d, &s, SshTunnel::Auto);
    let e = cl.docker().await.expect_err("no access to the socket");
    assert_eq!(e.kind(), "permission-denied", "{e}");
    assert_eq!(
        cl.ssh_channels(),
        SshChannels {
            streamlocal: 0,
            dial_stdio: 1
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_operations_on_one_device_reuse_one_ssh_session() {
    let sshd = PrivateSshd::start();
    let (d, s) = sshd.device("reuse");
    let before = sshd.accepted_sessions();
    let cl = client(&d, &s);
    let docker = cl.docker().await.unwrap();
    for i in 0..50 {
        list(&docker)
            .await
            .unwrap_or_else(|e| panic!("operation {i}: {e}"));
    }
    // Reuse, not one channel per call. hyper hands a connection back to its pool after
    // the answer is read, so on a loaded machine the next call may now and then find the
    // pool empty and open another: a few channels, never one per call.
    assert!(
        cl.connections_opened() <= 10,
        "sequential calls reuse their channels ({} opened for 50 calls)",
        cl.connections_opened()
    );
    let pings = (0..10).map(|_| {
        let docker = docker.clone();
        async move { docker.ping().await }
    });
    assert!(
        futures_util::future::join_all(pings)
            .await
            .iter()
            .all(|r| r.is_ok())
    );
    assert_eq!(
        sshd.accepted_sessions() - before,
        1,
        "one SSH login for 60 operations"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_sshd_gives_a_clear_error_and_the_next_operation_reconnects() {
    let mut sshd = PrivateSshd::start();
    let (d, s) = sshd.device("restart");
    let docker = client(&d, &s).docker().await.unwrap();
    list(&docker).await.unwrap();
    assert_eq!(sshd.accepted_sessions(), 1);
    // Only events of a label nothing carries: other tests' containers on the shared
    // daemon must not break the quiet.
    let quiet =
        std::collections::HashMap::from([("label", vec!["org.capstan.test.no-such-label"])]);
    let mut events = docker.events(Some(
        bollard::query_parameters::EventsOptionsBuilder::new()
            .filters(&quiet)
            .build(),
    ));
    let pending = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
    assert!(pending.is_err(), "the event stream is open and quiet");

    sshd.stop();
    // A stream through the dead session ends instead of hanging.
    let ended = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("the event stream ends when the session dies");
    assert!(ended.as_ref().is_none_or(|r| r.is_err()), "{ended:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..2 {
        let e = list(&docker).await.expect_err("sshd is down");
        let c = ConnectError::from_bollard(&e)
            .unwrap_or_else(|| panic!("a connection error, got {e:?}"))
            .root()
            .clone();
        let msg = c.to_string();
        eprintln!("while sshd is down: {msg}");
        assert!(msg.contains("device restart"), "{msg}");
        assert!(
            ["unreachable", "ssh", "transport"].contains(&c.kind()),
            "a clear kind, got {} ({msg})",
            c.kind()
        );
    }

    sshd.spawn();
    // Past the (test-sized) back-off, the next operation reconnects.
    tokio::time::sleep(opts().backoff_max + Duration::from_millis(100)).await;
    list(&docker).await.expect("reconnected");
    list(&docker).await.expect("and stays connected");
    assert_eq!(sshd.accepted_sessions(), 2, "one new session");
}

// ---------------------------------------------------------------------------------------
// the check endpoints over HTTP

/// The API on a real loopback socket, with its own data directory.
struct Api {
    addr: SocketAddr,
    token: String,
    engine: Arc<Engine>,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn start() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let settings = capstan::config::Settings::resolve(
            &capstan::config::ConfigFile::default(),
            Some(dir.path().join("data")),
            Some("127.0.0.1:0".into()),
            None,
        )
        .unwrap();
        // The app `capstan serve` runs, on a loopback port of its own.
        let app = capstan::app::App::build(
            settings,
            &capstan::engine::PassphraseInput::default(),
            &capstan::app::AppOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        let engine = app.engine().clone();
        // These tests start from no devices: the embedded default `local` goes.
        engine.devices().unwrap().remove("local").unwrap();
        let (token, _) = engine.tokens.create("tests").unwrap();
        let token = token.expose_str().unwrap().to_string();
        let listening = app.listen(&mut |_| {}).await.unwrap();
        let addr = listening.api_addr();
        tokio::spawn(async move { listening.serve(std::future::pending(), &mut |_| {}).await });
        Api {
            addr,
            token,
            engine,
            _dir: dir,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value, String) {
        http(self.addr, method, path, Some(&self.token), body).await
    }

    fn add_key_device(&self, name: &str) -> Device {
        let changes = DeviceSpec {
            kind: Some(DeviceKind::Ssh),
            name: Some(name.into()),
            host: Some(Some(infra().var("SSH_HOST4").into())),
            port: Some(Some(ssh_port())),
            user: Some(Some(infra().var("SSH_USER_KEY").into())),
            auth: Some(Some(SshAuth::Key)),
            host_key: Some(Some(host_key_line())),
            private_key: Some(Some(secret("SSH_KEY_ED25519"))),
            ..Default::default()
        };
        self.engine.devices().unwrap().add(changes).unwrap()
    }
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "capstan")
        .header("content-type", "application/json");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let body = body.map(|v| v.to_string()).unwrap_or_default();
    let req = b
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let raw = String::from_utf8_lossy(&bytes).into_owned();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        raw,
    )
}

fn pre_check_spec() -> Value {
    json!({
        "name": "candidate",
        "kind": "ssh",
        "host": infra().var("SSH_HOST4"),
        "port": ssh_port(),
        "user": infra().var("SSH_USER_PASSWORD"),
        "password": text("SSH_PASSWORD_FILE"),
        "host_key": host_key_line(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_check_connects_with_unsaved_credentials_and_never_echoes_them() {
    let api = Api::start().await;
    let (status, body, raw) = api
        .call("POST", "/api/docker/pre-check", Some(pre_check_spec()))
        .await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(body["connected"], true);
    assert_eq!(
        body["docker"]["version"],
        infra().var("DOCKER_SERVER_VERSION")
    );
    assert_eq!(
        body["docker"]["negotiated_api_version"],
        infra().var("DOCKER_API_VERSION")
    );
    assert!(body["docker"]["os"].is_string() && body["docker"]["arch"].is_string());
    assert!(body["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(body["steps"].as_array().unwrap().len() >= 6);
    assert!(
        !raw.contains(&text("SSH_PASSWORD_FILE")),
        "the password is not echoed"
    );
    assert!(
        api.engine.devices().unwrap().list().unwrap().is_empty(),
        "nothing stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_check_with_a_wrong_password_is_502_with_kind_auth_and_the_offered_methods() {
    let api = Api::start().await;
    let mut spec = pre_check_spec();
    spec["password"] = json!("not-the-password-5f3a");
    let (status, body, raw) = api.call("POST", "/api/docker/pre-check", Some(spec)).await;
    assert_eq!(status, 502, "{raw}");
    assert_eq!(body["connected"], false);
    assert_eq!(body["error"]["kind"], "auth");
    assert_eq!(body["failed_step"], "authenticate");
    assert!(
        body["error"]["offered_methods"]
            .as_array()
            .unwrap()
            .contains(&json!("password")),
        "{raw}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("candidate")
    );
    let done: Vec<&str> = body["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(done, ["resolve", "tcp-connect", "ssh-handshake"]);
    assert!(!raw.contains("not-the-password-5f3a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_check_with_trust_host_key_shows_the_key_to_pin() {
    let api = Api::start().await;
    let mut spec = pre_check_spec();
    spec.as_object_mut().unwrap().remove("host_key");
    let (status, body, raw) = api
        .call("POST", "/api/docker/pre-check", Some(spec.clone()))
        .await;
    assert_eq!(status, 502, "{raw}");
    assert_eq!(body["error"]["kind"], "host-key-unknown");
    spec["trust_host_key"] = json!(true);
    let (status, body, raw) = api.call("POST", "/api/docker/pre-check", Some(spec)).await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(body["host_key"]["trusted_now"], true);
    assert_eq!(
        body["host_key"]["fingerprint"],
        fingerprint_of(&host_key_line())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_check_of_an_invalid_spec_is_422() {
    let api = Api::start().await;
    for bad in [
        json!({"kind": "ssh"}),
        json!({"kind": "teleport"}),
        json!({"kind": "ssh", "host": "h", "user": "u", "password": "p", "colour": "red"}),
        json!({"kind": "tls", "host": "h"}),
        json!({"kind": "ssh", "host": "h", "user": "u", "private_key": "ssh-ed25519 AAAA not private"}),
    ] {
        let (status, body, raw) = api
            .call("POST", "/api/docker/pre-check", Some(bad.clone()))
            .await;
        assert_eq!(status, 422, "{bad} -> {raw}");
        assert_eq!(body["error"]["kind"], "invalid");
    }
    let (status, _, raw) = http(
        api.addr,
        "POST",
        "/api/docker/pre-check",
        Some(&api.token),
        None,
    )
    .await;
    assert_eq!(status, 422, "{raw}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docker_routes_need_a_bearer_token() {
    let api = Api::start().await;
    for (method, path) in [
        ("POST", "/api/docker/pre-check"),
        ("GET", "/api/docker/check/local"),
    ] {
        let (status, _, _) = http(api.addr, method, path, None, Some(pre_check_spec())).await;
        assert_eq!(status, 401, "{method} {path}");
        let (status, _, _) = http(
            api.addr,
            method,
            path,
            Some("cap_not-a-token"),
            Some(pre_check_spec()),
        )
        .await;
        assert_eq!(status, 401, "{method} {path} with a wrong token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_of_a_stored_device_answers_by_id_and_by_name() {
    let api = Api::start().await;
    let d = api.add_key_device("stored");
    for key in [d.id.to_string(), d.name.clone()] {
        let (status, body, raw) = api
            .call("GET", &format!("/api/docker/check/{key}"), None)
            .await;
        assert_eq!(status, 200, "{raw}");
        assert_eq!(body["connected"], true);
        assert_eq!(body["device_id"], d.id.to_string());
        assert_eq!(body["host_key"]["pinned"], true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_of_an_unknown_device_is_404() {
    let api = Api::start().await;
    for key in [
        uuid::Uuid::new_v4().to_string(),
        "no-such-device".to_string(),
    ] {
        let (status, body, raw) = api
            .call("GET", &format!("/api/docker/check/{key}"), None)
            .await;
        assert_eq!(status, 404, "{raw}");
        assert_eq!(body["error"]["kind"], "not-found");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_check_of_a_closed_port_is_502_unreachable() {
    let api = Api::start().await;
    let port = free_port();
    let mut spec = pre_check_spec();
    spec["port"] = json!(port);
    let (status, body, raw) = api.call("POST", "/api/docker/pre-check", Some(spec)).await;
    assert_eq!(status, 502, "{raw}");
    assert_eq!(body["error"]["kind"], "unreachable");
    assert_eq!(body["failed_step"], "tcp-connect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_check_of_a_listener_that_never_answers_is_504() {
    let api = Api::start().await;
    // Accepts connections and says nothing: the SSH handshake never starts.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let mut spec = pre_check_spec();
    spec["port"] = json!(port);
    spec["timeout_secs"] = json!(2);
    let start = Instant::now();
    let (status, body, raw) = api.call("POST", "/api/docker/pre-check", Some(spec)).await;
    assert_eq!(status, 504, "{raw}");
    assert_eq!(body["error"]["kind"], "timeout");
    assert_eq!(body["failed_step"], "ssh-handshake");
    assert!(start.elapsed() < Duration::from_secs(10));
    silent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_connections_close_after_idle_timeout_and_the_session_stays_for_the_next() {
    let (d, s) = key_device("reaped");
    let pool = capstan::docker::Pool::new(ConnectOptions {
        idle_timeout: Duration::from_secs(1),
        ..opts()
    });
    // The pool's own signature: its error is the connection error, however large.
    #[allow(clippy::result_large_err)]
    let c = pool.client(&d, || Ok(s.clone())).unwrap();
    // Polls (bounded) until the pool's SSH sessions and channels are as wanted.
    let until = |sessions: usize, channels: usize| {
        let pool = &pool;
        async move {
            let limit = Instant::now() + Duration::from_secs(15);
            loop {
                let st = pool.stats();
                if (st.ssh_sessions, st.ssh_channels) == (sessions, channels) {
                    return;
                }
                assert!(
                    Instant::now() < limit,
                    "wanted {sessions} session(s) and {channels} channel(s), have {st:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    for round in 0..2 {
        c.ping()
            .await
            .unwrap_or_else(|e| panic!("ping {round}: {e}"));
        until(1, 1).await;
        // Past idle_timeout the kept connection (its channel) closes; the session stays.
        until(1, 0).await;
    }
    assert_eq!(c.connections_opened(), 2, "one connection per round");
}

// ---------------------------------------------------------------------------------------
// the engine and the CLI

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_hands_out_one_pooled_client_per_device() {
    let api = Api::start().await;
    let d = api.add_key_device("engine");
    let a = api.engine.docker_client(&d).unwrap();
    let b = api.engine.docker_client(&d).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    let docker = api.engine.docker(&d).await.unwrap();
    list(&docker).await.unwrap();
    // The client hands the connection back to the pool once the answer is read, on its
    // own task: wait for that (bounded) rather than race it.
    let kept = Instant::now() + Duration::from_secs(5);
    while a.idle_connections() < 1 && Instant::now() < kept {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(a.idle_connections() >= 1, "the connection is kept");

    let edited = api
        .engine
        .devices()
        .unwrap()
        .edit(
            "engine",
            DeviceSpec {
                sudo: Some(false),
                ..Default::default()
            },
        )
        .unwrap();
    let c = api.engine.docker_client(&edited).unwrap();
    assert!(!Arc::ptr_eq(&a, &c), "an edited device gets a new client");
}

fn add_key_device_cli(dir: &DataDir, name: &str, extra: &[&str]) -> std::process::Output {
    let port = ssh_port().to_string();
    let key = infra().var("SSH_KEY_ED25519").to_string();
    let mut args = vec![
        "device",
        "add",
        name,
        "--kind",
        "ssh",
        "--host",
        infra().var("SSH_HOST4"),
        "--port",
        &port,
        "--user",
        infra().var("SSH_USER_KEY"),
        "--ssh-key-file",
        &key,
    ];
    args.extend_from_slice(extra);
    dir.capstan(&args)
}

#[test]
fn device_add_with_trust_host_key_pins_the_presented_key() {
    let dir = DataDir::with_vault();
    let out = add_key_device_cli(&dir, "tofu", &["--trust-host-key"]);
    assert_success(&out, "device add --trust-host-key");
    let fp = fingerprint_of(&host_key_line());
    assert!(
        stdout(&out).contains(&format!("pinned host key ssh-ed25519 {fp}")),
        "{}",
        stdout(&out)
    );
    let show = dir.capstan(&["device", "show", "tofu", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&show)).unwrap();
    assert_eq!(fingerprint_of(v["host_key"].as_str().unwrap()), fp);
    assert_success(
        &dir.capstan(&["device", "check", "tofu"]),
        "device check after pinning",
    );

    // A failed login adds nothing.
    let bad = dir.capstan(&[
        "device",
        "add",
        "tofu-bad",
        "--kind",
        "ssh",
        "--host",
        infra().var("SSH_HOST4"),
        "--port",
        &ssh_port().to_string(),
        "--user",
        infra().var("SSH_USER_KEY"),
        "--ssh-key-file",
        infra().var("SSH_USER_NODOCKER_KEY"),
        "--trust-host-key",
    ]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("nothing was added"),
        "{}",
        stderr(&bad)
    );
    assert!(
        !dir.capstan(&["device", "show", "tofu-bad"])
            .status
            .success()
    );
}

#[test]
fn device_check_refuses_an_unpinned_key_until_asked_to_trust_it() {
    let dir = DataDir::with_vault();
    assert_success(&add_key_device_cli(&dir, "web", &[]), "device add");
    let out = dir.capstan(&["device", "check", "web"]);
    assert!(!out.status.success());
    let fp = fingerprint_of(&host_key_line());
    assert!(
        stderr(&out).contains(&fp) && stderr(&out).contains("not pinned"),
        "{}",
        stderr(&out)
    );

    let out = dir.capstan(&["device", "check", "web", "--trust-host-key"]);
    assert_success(&out, "device check --trust-host-key");
    assert!(stdout(&out).contains("pinned host key"), "{}", stdout(&out));
    let out = dir.capstan(&["device", "check", "web"]);
    assert_success(&out, "device check");
    assert!(stdout(&out).contains("connected"), "{}", stdout(&out));
    assert!(stdout(&out).contains("(pinned)"), "{}", stdout(&out));
}

#[test]
fn device_check_all_prints_a_table_and_fails_when_any_device_failed() {
    let dir = DataDir::with_vault();
    let key = infra().var("SSH_HOST_KEY_PUB").to_string();
    assert_success(
        &add_key_device_cli(&dir, "good", &["--host-key-file", &key]),
        "add good",
    );
    let other = infra().var("SSH_OTHER_HOST_KEY_PUB").to_string();
    assert_success(
        &add_key_device_cli(&dir, "spoofed", &["--host-key-file", &other]),
        "add spoofed",
    );
    let docker_sock = format!("unix://{}", infra().var("DOCKER_SOCKET"));
    assert_success(
        &dir.capstan(&[
            "device",
            "add",
            "here",
            "--kind",
            "local",
            "--docker-host",
            &docker_sock,
        ]),
        "add local",
    );

    let out = dir.capstan(&["device", "check", "--all"]);
    assert!(!out.status.success());
    let table = stdout(&out);
    assert!(
        table.contains("DEVICE") && table.contains("RESULT"),
        "{table}"
    );
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} row in {table}"))
            .to_string()
    };
    assert!(row("good").contains(" ok "), "{table}");
    assert!(row("here").contains(" ok "), "{table}");
    assert!(
        row("spoofed").contains("FAILED (host-key-mismatch)"),
        "{table}"
    );
    assert!(
        stderr(&out).contains("1 of 3 devices failed"),
        "{}",
        stderr(&out)
    );

    assert_success(&dir.capstan(&["device", "rm", "spoofed"]), "rm");
    let out = dir.capstan(&["device", "check", "--all", "--json"]);
    assert_success(&out, "check --all");
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
}
