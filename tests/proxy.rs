//! Proxy mode with the real docker CLI: `DOCKER_HOST=tcp://127.0.0.1:PORT docker …`
//! through `capstan proxy`, under a working policy and a read-only one.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

pub(crate) struct ProxyProcess {
    pub(crate) child: Child,
    pub(crate) addr: String,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(data: &DataDir, device: &str, policy: &str, extra: &[&str]) -> ProxyProcess {
    start_proxy_configured(data, device, policy, "env", extra, |_| {})
}

/// Like [`start_proxy`], the policy file named `*.{ext}` (`toml` for a TOML policy).
fn start_proxy_with(
    data: &DataDir,
    device: &str,
    policy: &str,
    ext: &str,
    extra: &[&str],
) -> ProxyProcess {
    start_proxy_configured(data, device, policy, ext, extra, |_| {})
}

/// [`start_proxy_with`], with `configure` applied to the command before it starts.
pub(crate) fn start_proxy_configured(
    data: &DataDir,
    device: &str,
    policy: &str,
    ext: &str,
    extra: &[&str],
    configure: impl FnOnce(&mut Command),
) -> ProxyProcess {
    let policy_file = data.path().join(format!("policy-{}.{ext}", free_port()));
    std::fs::write(&policy_file, policy).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let listen = format!("tcp://{addr}");
    let mut cmd = data.cmd();
    cmd.args([
        "proxy",
        "--device",
        device,
        "--policy",
        policy_file.to_str().unwrap(),
        "--listen",
        &listen,
    ])
    .args(extra)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    configure(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(
        line.contains("serving the Docker API"),
        "proxy did not start: {line:?}"
    );
    // Wait until it accepts connections.
    let t = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "proxy never listened on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ProxyProcess { child, addr }
}

/// The docker CLI pointed at `addr`, with a private config directory.
fn docker(addr: &str, config: &std::path::Path) -> Command {
    let mut c = Command::new("docker");
    c.env("DOCKER_HOST", format!("tcp://{addr}"))
        .env("DOCKER_CONFIG", config)
        .env_remove("DOCKER_CONTEXT")
        .stdin(Stdio::null());
    c
}

/// A data directory with the local daemon as device `d`.
pub(crate) fn with_local_device() -> DataDir {
    let data = DataDir::with_vault();
    assert_success(
        &data.capstan(&["device", "add", "d", "--kind", "local"]),
        "device add",
    );
    data
}

pub(crate) fn remove_container(name: &str) {
    let _ = Command::new("docker").args(["rm", "-f", name]).output();
}

const WORKING: &str = "\
# what `docker run`, `logs`, `exec` and `ps` need
CONTAINERS=1
POST=1
EXEC=1
ALLOW_LOGS=1
";

fn run_cli_suite(device_setup: &[&str], tag: &str) {
    let infra = Infra::get();
    let image = infra.var("TEST_IMAGE");
    let data = DataDir::with_vault();
    let mut add = vec!["device", "add", "d"];
    add.extend_from_slice(device_setup);
    assert_success(&data.capstan(&add), "device add");
    let cfg = tempfile::tempdir().unwrap();
    let proxy = start_proxy(&data, "d", WORKING, &[]);

    let out = docker(&proxy.addr, cfg.path())
        .args(["ps"])
        .output()
        .unwrap();
    assert_success(&out, "docker ps through the proxy");
    assert!(stdout(&out).starts_with("CONTAINER ID"), "{}", stdout(&out));

    let out = docker(&proxy.addr, cfg.path())
        .args([
            "run",
            "--rm",
            image,
            "echo",
            &format!("hello-through-capstan-{tag}"),
        ])
        .output()
        .unwrap();
    assert_success(&out, "docker run --rm through the proxy");
    assert!(
        stdout(&out).contains(&format!("hello-through-capstan-{tag}")),
        "{}",
        stdout(&out)
    );

    let name = format!("capstan-proxy-test-{tag}-{}", std::process::id());
    remove_container(&name);
    let out = docker(&proxy.addr, cfg.path())
        .args([
            "run",
            "-d",
            "--name",
            &name,
            image,
            "sh",
            "-c",
            "trap 'exit 0' TERM; i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done",
        ])
        .output()
        .unwrap();
    assert_success(&out, "docker run -d");

    // logs -f streams: read three ticks as they arrive.
    let mut logs = docker(&proxy.addr, cfg.path())
        .args(["logs", "-f", &name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(logs.stdout.take().unwrap());
    let mut ticks = 0;
    let t = Instant::now();
    let mut line = String::new();
    while ticks < 3 && t.elapsed() < Duration::from_secs(20) {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.starts_with("tick ") {
            ticks += 1;
        }
    }
    let _ = logs.kill();
    let _ = logs.wait();
    assert!(ticks >= 3, "docker logs -f delivered {ticks} lines");

    let out = docker(&proxy.addr, cfg.path())
        .args(["exec", &name, "echo", "inside-the-container"])
        .output()
        .unwrap();
    assert_success(&out, "docker exec through the proxy");
    assert_eq!(stdout(&out).trim(), "inside-the-container");

    // A read-only policy: ps works, stop is refused with a readable message.
    let ro = start_proxy(&data, "d", "CONTAINERS=1\n", &[]);
    let out = docker(&ro.addr, cfg.path())
        .args(["ps", "--filter", &format!("name={name}")])
        .output()
        .unwrap();
    assert_success(&out, "docker ps under a read-only policy");
    assert!(stdout(&out).contains(&name));
    let out = docker(&ro.addr, cfg.path())
        .args(["stop", &name])
        .output()
        .unwrap();
    assert!(!out.status.success(), "docker stop must be refused");
    let err = stderr(&out);
    assert!(
        err.contains("capstan policy") && err.contains("ALLOW_STOP=1"),
        "readable refusal: {err}"
    );
    let still = Command::new("docker")
        .args(["inspect", "-f", "{{.State.Running}}", &name])
        .output()
        .unwrap();
    assert_eq!(stdout(&still).trim(), "true", "the container kept running");
    remove_container(&name);
}

#[test]
fn the_docker_cli_works_through_the_proxy_for_a_local_device() {
    run_cli_suite(&["--kind", "local"], "local");
}

#[test]
fn the_proxy_decides_on_the_normalised_path_and_denies_traversal() {
    let data = with_local_device();
    let proxy = start_proxy(&data, "d", "# the defaults: PING, VERSION, EVENTS\n", &[]);
    assert_eq!(http(&proxy.addr, "GET", "/_ping", &[], b"").0, 200);
    assert_eq!(http(&proxy.addr, "GET", "/v1.41/version", &[], b"").0, 200);
    for path in [
        "/version/../containers/json",
        "/containers/json",
        "/containersX/json",
        "/v1.41/versions",
        "/%63ontainers/json",
        "/containers%2Fjson",
    ] {
        let (status, body) = http(&proxy.addr, "GET", path, &[], b"");
        assert_eq!(status, 403, "{path}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("Docker error JSON: {body}"));
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .starts_with("capstan policy:"),
            "{body}"
        );
    }
    assert_eq!(
        http(&proxy.addr, "POST", "/containers/x/start", &[], b"").0,
        403
    );
}

#[test]
fn a_proxy_with_a_token_refuses_clients_without_it() {
    let data = with_local_device();
    let token = data.path().join("proxy.token");
    std::fs::write(&token, "proxy-secret-123\n").unwrap();
    let proxy = start_proxy(&data, "d", "", &["--token-file", token.to_str().unwrap()]);
    assert_eq!(http(&proxy.addr, "GET", "/_ping", &[], b"").0, 401);
    assert_eq!(
        http(
            &proxy.addr,
            "GET",
            "/_ping",
            &[("X-Capstan-Token", "wrong")],
            b""
        )
        .0,
        401
    );
    assert_eq!(
        http(
            &proxy.addr,
            "GET",
            "/_ping",
            &[("X-Capstan-Token", "proxy-secret-123")],
            b""
        )
        .0,
        200
    );
    assert_eq!(
        http(
            &proxy.addr,
            "GET",
            "/_ping",
            &[("Authorization", "Bearer proxy-secret-123")],
            b""
        )
        .0,
        200
    );
}

/// `curl` to the proxy's `/_ping` over https with `args`; its stdout, or its error.
fn curl_ping(addr: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .arg(format!("https://{addr}/_ping"))
        .output()
        .expect("run curl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn a_tls_proxy_serves_clients_with_certificates_from_its_ca_and_no_others() {
    let infra = Infra::get();
    let data = with_local_device();
    let (ca, cert, key) = (
        infra.var("TLS_CA"),
        infra.var("TLS_CERT"),
        infra.var("TLS_KEY"),
    );
    let proxy = start_proxy(
        &data,
        "d",
        "CONTAINERS=1\n",
        &[
            "--tls-cert",
            infra.var("TLS_SERVER_CERT"),
            "--tls-key",
            infra.var("TLS_SERVER_KEY"),
            "--tls-client-ca",
            ca,
        ],
    );

    // The docker CLI as it talks to `dockerd --tlsverify`, unchanged.
    let cfg = tempfile::tempdir().unwrap();
    let tls_docker = |args: &[&str]| {
        docker(&proxy.addr, cfg.path())
            .args([
                "--tlsverify",
                "--tlscacert",
                ca,
                "--tlscert",
                cert,
                "--tlskey",
                key,
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let out = tls_docker(&["version", "--format", "{{.Server.APIVersion}}"]);
    assert_success(&out, "docker version over TLS");
    assert_eq!(stdout(&out).trim(), infra.var("DOCKER_API_VERSION"));
    assert_success(&tls_docker(&["ps", "-a"]), "docker ps over TLS");
    // The policy still decides.
    let out = tls_docker(&["network", "create", "capstan-tls-denied"]);
    assert_failure_says(&out, "capstan policy");

    // curl: with the client certificate, yes; without one, from another CA, or in
    // plain HTTP, no.
    assert_eq!(
        curl_ping(&proxy.addr, &["--cacert", ca, "--cert", cert, "--key", key]).as_deref(),
        Ok("OK")
    );
    let e = curl_ping(&proxy.addr, &["--cacert", ca]).expect_err("no client certificate");
    assert!(!e.is_empty());
    curl_ping(
        &proxy.addr,
        &[
            "--cacert",
            ca,
            "--cert",
            infra.var("TLS_OTHER_CERT"),
            "--key",
            infra.var("TLS_OTHER_KEY"),
        ],
    )
    .expect_err("a client certificate from another CA");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{}/_ping", proxy.addr))
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("OK"),
        "plain HTTP must not reach the daemon"
    );
}

#[test]
fn a_tls_proxy_without_client_certificates_still_needs_its_token() {
    let infra = Infra::get();
    let data = with_local_device();
    let token = data.path().join("proxy.token");
    std::fs::write(&token, "tls-proxy-token-9\n").unwrap();
    let ca = infra.var("TLS_CA");
    let proxy = start_proxy(
        &data,
        "d",
        "",
        &[
            "--tls-cert",
            infra.var("TLS_SERVER_CERT"),
            "--tls-key",
            infra.var("TLS_SERVER_KEY"),
            "--token-file",
            token.to_str().unwrap(),
        ],
    );
    // Encrypted, no certificate asked for; the token decides.
    let err = curl_ping(&proxy.addr, &["--cacert", ca, "-f"]).expect_err("no token");
    assert!(err.contains("401"), "{err}");
    assert_eq!(
        curl_ping(
            &proxy.addr,
            &["--cacert", ca, "-H", "X-Capstan-Token: tls-proxy-token-9"]
        )
        .as_deref(),
        Ok("OK")
    );
}

#[test]
fn a_proxy_with_unusable_tls_files_refuses_to_start_saying_which() {
    let infra = Infra::get();
    let data = with_local_device();
    let policy = data.path().join("p.env");
    std::fs::write(&policy, "CONTAINERS=1\n").unwrap();
    let not_pem = data.path().join("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let proxy = |listen: &str, tls: &[&str]| {
        let mut args = vec![
            "proxy",
            "--device",
            "d",
            "--policy",
            policy.to_str().unwrap(),
            "--listen",
            listen,
        ];
        args.extend_from_slice(tls);
        data.capstan(&args)
    };
    let port = format!("tcp://127.0.0.1:{}", free_port());
    let server_cert = infra.var("TLS_SERVER_CERT");
    let server_key = infra.var("TLS_SERVER_KEY");
    // A key that belongs to another certificate.
    let out = proxy(
        &port,
        &["--tls-cert", server_cert, "--tls-key", infra.var("TLS_KEY")],
    );
    assert_failure_says(&out, "does not go with the certificate");
    // Not a certificate at all.
    let out = proxy(
        &port,
        &[
            "--tls-cert",
            not_pem.to_str().unwrap(),
            "--tls-key",
            server_key,
        ],
    );
    assert_failure_says(&out, "holds no certificate");
    // A client CA that is not there.
    let out = proxy(
        &port,
        &[
            "--tls-cert",
            server_cert,
            "--tls-key",
            server_key,
            "--tls-client-ca",
            "/nonexistent/ca.pem",
        ],
    );
    assert_failure_says(&out, "cannot read the CA certificate /nonexistent/ca.pem");
    // A certificate without its key.
    let out = proxy(&port, &["--tls-cert", server_cert]);
    assert_failure_says(&out, "--tls-key");
    // TLS on a unix socket.
    let sock = format!("unix://{}", data.path().join("p.sock").display());
    let out = proxy(&sock, &["--tls-cert", server_cert, "--tls-key", server_key]);
    assert_failure_says(&out, "TLS is for tcp:// listeners");
}

/// Runs `capstan proxy` for device `d` under `CONTAINERS=1` on `listen`, with `extra`
/// arguments, to its end (for settings it refuses at start).
fn proxy_refusing_to_start(data: &DataDir, listen: &str, extra: &[&str]) -> std::process::Output {
    let policy = data.path().join("p.env");
    std::fs::write(&policy, "CONTAINERS=1\n").unwrap();
    let mut args = vec![
        "proxy",
        "--device",
        "d",
        "--policy",
        policy.to_str().unwrap(),
        "--listen",
        listen,
    ];
    args.extend_from_slice(extra);
    data.capstan(&args)
}

#[test]
fn a_proxy_on_a_non_loopback_address_without_a_token_refuses_to_start() {
    let data = with_local_device();
    let out = proxy_refusing_to_start(&data, "tcp://0.0.0.0:0", &[]);
    assert_failure_says(
        &out,
        "refusing to serve the Docker API on the non-loopback address",
    );
}

#[test]
fn an_invalid_policy_file_is_refused_naming_the_variable() {
    let data = with_local_device();
    let policy = data.path().join("p.env");
    std::fs::write(&policy, "CONTAINERS=1\nPOST=true\n").unwrap();
    let out = data.capstan(&[
        "proxy",
        "--device",
        "d",
        "--policy",
        policy.to_str().unwrap(),
    ]);
    assert_failure_says(&out, "POST");
}

#[test]
fn serve_starts_the_proxies_declared_in_the_config() {
    let data = DataDir::empty();
    let sock = data.path().join("local-ro.sock");
    let policy = data.path().join("ro.env");
    std::fs::write(&policy, "CONTAINERS=1\n").unwrap();
    let cfg = data.path().join("capstan.toml");
    let infra = Infra::get();
    let tls_addr = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &cfg,
        format!(
            "[[proxy]]\ndevice = \"local\"\npolicy = \"{}\"\nlisten = \"unix://{}\"\n\
             [[proxy]]\ndevice = \"local\"\npolicy = \"{}\"\nlisten = \"tcp://{tls_addr}\"\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n",
            policy.display(),
            sock.display(),
            policy.display(),
            infra.var("TLS_SERVER_CERT"),
            infra.var("TLS_SERVER_KEY"),
            infra.var("TLS_CA"),
        ),
    )
    .unwrap();
    let server = Server::start_with(&data, |c| {
        c.env("CAPSTAN_CONFIG", &cfg);
    });
    assert!(
        server
            .banner
            .contains("proxy for device local listening on unix://"),
        "{}",
        server.banner
    );
    // The TLS proxy from the config answers clients with a certificate from its CA.
    let ca = infra.var("TLS_CA");
    assert_eq!(
        curl_ping(
            &tls_addr,
            &[
                "--cacert",
                ca,
                "--cert",
                infra.var("TLS_CERT"),
                "--key",
                infra.var("TLS_KEY")
            ]
        )
        .as_deref(),
        Ok("OK")
    );
    curl_ping(&tls_addr, &["--cacert", ca]).expect_err("no client certificate");
    let docker_cfg = tempfile::tempdir().unwrap();
    let host = format!("unix://{}", sock.display());
    let run = |args: &[&str]| {
        Command::new("docker")
            .env("DOCKER_HOST", &host)
            .env("DOCKER_CONFIG", docker_cfg.path())
            .args(args)
            .output()
            .unwrap()
    };
    assert_success(&run(&["ps"]), "docker ps through the configured proxy");
    let out = run(&["network", "ls"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("NETWORKS=1"), "{}", stderr(&out));
    assert!(server.stop().success());
    assert!(!sock.exists(), "the proxy removes its socket on shutdown");
}

#[test]
fn serve_refuses_to_start_when_a_configured_proxy_policy_is_invalid() {
    let data = DataDir::empty();
    let policy = data.path().join("bad.env");
    std::fs::write(&policy, "CONTAINERS=yes\n").unwrap();
    let cfg = data.path().join("capstan.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[proxy]]\ndevice = \"local\"\npolicy = \"{}\"\nlisten = \"tcp://127.0.0.1:0\"\n",
            policy.display()
        ),
    )
    .unwrap();
    let out = data
        .cmd()
        .env("CAPSTAN_CONFIG", &cfg)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_failure_says(&out, "CONTAINERS");
}

#[test]
fn the_docker_cli_works_through_the_proxy_for_an_ssh_device() {
    let infra = Infra::get();
    let host_key = std::fs::read_to_string(infra.path("SSH_HOST_KEY_PUB")).unwrap();
    run_cli_suite(
        &[
            "--kind",
            "ssh",
            "--host",
            infra.var("SSH_HOST4"),
            "--port",
            infra.var("SSH_PORT"),
            "--user",
            infra.var("SSH_USER_KEY"),
            "--ssh-key-file",
            infra.var("SSH_KEY_ED25519"),
            "--host-key",
            host_key.trim(),
        ],
        "ssh",
    );
}

#[test]
fn the_docker_cli_works_through_the_proxy_for_a_tls_device() {
    let infra = Infra::get();
    run_cli_suite(
        &[
            "--kind",
            "tls",
            "--host",
            infra.var("TLS_HOST"),
            "--port",
            infra.var("TLS_PORT"),
            "--tls-ca",
            infra.var("TLS_CA"),
            "--tls-cert",
            infra.var("TLS_CERT"),
            "--tls-key",
            infra.var("TLS_KEY"),
        ],
        "tls",
    );
}

#[test]
fn the_proxy_refuses_containers_outside_the_policy_container_scope() {
    let infra = Infra::get();
    let image = infra.var("TEST_IMAGE");
    let data = with_local_device();
    let policy = data.path().join("scoped.toml");
    std::fs::write(
        &policy,
        "CONTAINERS = 1\nPOST = 1\ndevices = [\"d\"]\n\n[containers]\nlabels = [\"capstan.test.scope=in\"]\n",
    )
    .unwrap();
    let tag = std::process::id();
    let inside = format!("capstan-scope-in-{tag}");
    let outside = format!("capstan-scope-out-{tag}");
    for (name, label) in [(&inside, "in"), (&outside, "out")] {
        remove_container(name);
        let out = Command::new("docker")
            .args([
                "run",
                "-d",
                "--name",
                name,
                "--label",
                &format!("capstan.test.scope={label}"),
                image,
            ])
            .output()
            .unwrap();
        assert_success(&out, "start a test container");
    }
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = data
        .cmd()
        .args([
            "proxy",
            "--device",
            "d",
            "--policy",
            policy.to_str().unwrap(),
            "--listen",
            &format!("tcp://{addr}"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("serving"), "{line}");
    let proxy = ProxyProcess { child, addr };
    let cfg = tempfile::tempdir().unwrap();

    let out = docker(&proxy.addr, cfg.path())
        .args(["restart", "-t", "1", &outside])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("outside the policy's container scope"),
        "{}",
        stderr(&out)
    );
    let out = docker(&proxy.addr, cfg.path())
        .args(["restart", "-t", "1", &inside])
        .output()
        .unwrap();
    assert_success(&out, "restart inside the scope");
    let out = docker(&proxy.addr, cfg.path())
        .args(["inspect", "does-not-exist-anywhere"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    remove_container(&inside);
    remove_container(&outside);
    drop(proxy);
}

/// The read-only example policy as shipped in the repository.
fn readonly_env() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/policies/readonly.env")
        .to_str()
        .unwrap()
        .to_string()
}

/// Starts `capstan proxy` for device `d` with a policy file as it is on disk.
fn start_proxy_with_file(data: &DataDir, policy_file: &str, extra: &[&str]) -> ProxyProcess {
    let policy = std::fs::read_to_string(policy_file).unwrap();
    start_proxy(data, "d", &policy, extra)
}

/// Runs a test container that reads shell commands from its stdin (`docker run -i … sh`)
/// and prints `marker` to its log first.
pub(crate) fn start_shell_container(name: &str, marker: &str) {
    let image = Infra::get().var("TEST_IMAGE");
    remove_container(name);
    let out = Command::new("docker")
        .args([
            "run",
            "-d",
            "-i",
            "--label",
            "capstan.test=effects",
            "--name",
            name,
            image,
            "sh",
            "-c",
            &format!("echo {marker}; exec sh"),
        ])
        .output()
        .unwrap();
    assert_success(&out, "start a container with an open stdin");
    // Ready when its log holds the marker.
    let t = Instant::now();
    loop {
        let logs = Command::new("docker")
            .args(["logs", name])
            .output()
            .unwrap();
        if stdout(&logs).contains(marker) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "container {name} never printed its marker"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `path` exists inside the container, asked of the daemon directly.
fn exists_in(container: &str, path: &str) -> bool {
    Command::new("docker")
        .args(["exec", container, "test", "-e", path])
        .status()
        .unwrap()
        .success()
}

/// A websocket attach written by hand: the HTTP/1.1 Upgrade request for `target`. Returns
/// the status, the response head and body as text, and the connection.
pub(crate) fn websocket_attach(addr: &str, target: &str) -> (u16, String, std::net::TcpStream) {
    websocket_attach_with(addr, target, "")
}

/// [`websocket_attach`] with more header lines (each ending in CRLF).
pub(crate) fn websocket_attach_with(
    addr: &str,
    target: &str,
    headers: &str,
) -> (u16, String, std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Origin: http://{addr}\r\n{headers}\r\n"
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap() == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; if status == 101 { 0 } else { length }];
    s.read_exact(&mut body).unwrap();
    (status, head + &String::from_utf8_lossy(&body), s)
}

/// Sends `text` as one masked websocket text frame (a client's frame).
pub(crate) fn websocket_send(s: &mut std::net::TcpStream, text: &str) {
    use std::io::Write;
    let payload = text.as_bytes();
    assert!(payload.len() < 126);
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).unwrap();
}

/// A command's output, or a failure when it has not ended within `limit` (an attach that
/// went through would not end by itself).
fn output_within(mut cmd: Command, limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?} (the request went through?): {}",
                stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn readonly_env_refuses_a_websocket_attach_that_would_run_commands_or_read_logs() {
    let data = with_local_device();
    let name = format!("capstan-effects-ws-{}", std::process::id());
    let marker = "capstan-effects-log-marker";
    start_shell_container(&name, marker);

    // The attack works when the policy allows writes: the websocket's stdin reaches the
    // container's shell.
    let open = start_proxy(&data, "d", "CONTAINERS=1\nPOST=1\n", &[]);
    let (status, head, mut ws) = websocket_attach(
        &open.addr,
        &format!("/v1.41/containers/{name}/attach/ws?stream=1&stdin=1&stdout=1"),
    );
    assert_eq!(status, 101, "{head}");
    websocket_send(&mut ws, "touch /tmp/reached-through-open-policy\n");
    let t = Instant::now();
    while !exists_in(&name, "/tmp/reached-through-open-policy") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the shell never ran the command"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(ws);

    // readonly.env: 403, naming POST=1, and nothing ran.
    let ro = start_proxy_with_file(&data, &readonly_env(), &[]);
    for target in [
        format!("/v1.41/containers/{name}/attach/ws?stream=1&stdin=1&stdout=1"),
        format!("/containers/{name}/attach/ws?stream=1&stdin=True&stdout=1"),
        format!("/containers/{name}/attach/ws?stream=1&stdout=1"),
    ] {
        let (status, response, mut ws) = websocket_attach(&ro.addr, &target);
        assert_eq!(status, 403, "{target}: {response}");
        assert!(
            response.contains("capstan policy")
                && response.contains("POST=1")
                && response.contains("attaching to a container is a write whatever the method"),
            "{response}"
        );
        // Bytes after the refusal go nowhere.
        use std::io::Write;
        let _ = ws.write_all(b"touch /tmp/x; id\n");
    }
    assert!(
        !exists_in(&name, "/tmp/x"),
        "the refused attach ran a command"
    );

    // The logs read of the audit: refused, the log not returned, both variables named.
    for proxy in [&ro, &open] {
        let (status, response, _) = websocket_attach(
            &proxy.addr,
            &format!("/containers/{name}/attach/ws?logs=1&stream=0&stdout=1"),
        );
        assert_eq!(status, 403, "{response}");
        assert!(!response.contains(marker), "{response}");
        assert!(response.contains("ALLOW_LOGS=1"), "{response}");
    }
    // Nor through a form body the policy does not read.
    let (status, body) = http(
        &open.addr,
        "POST",
        &format!("/containers/{name}/attach?stream=0&stdout=1"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"logs=1",
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        !body.contains(marker) && body.contains("ALLOW_LOGS=1"),
        "{body}"
    );
    remove_container(&name);
}

#[test]
fn readonly_env_refuses_docker_attach_exec_and_logs_and_still_serves_ps() {
    let data = with_local_device();
    let name = format!("capstan-effects-cli-{}", std::process::id());
    let marker = "capstan-effects-cli-marker";
    start_shell_container(&name, marker);
    let ro = start_proxy_with_file(&data, &readonly_env(), &[]);
    let cfg = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let mut c = docker(&ro.addr, cfg.path());
        c.args(args);
        output_within(c, Duration::from_secs(30))
    };

    let out = run(&["ps"]);
    assert_success(&out, "docker ps under readonly.env");
    assert!(stdout(&out).contains(&name), "{}", stdout(&out));

    // The CLI does not print the body of a refused upgrade, only its status; the message
    // (naming POST=1) is checked on the raw requests above.
    let out = run(&["attach", &name]);
    assert_failure_says(&out, "received 403");

    let out = run(&["exec", &name, "touch", "/tmp/x"]);
    assert_failure_says(&out, "capstan policy");
    assert!(!exists_in(&name, "/tmp/x"));

    let out = run(&["logs", &name]);
    assert_failure_says(&out, "ALLOW_LOGS=1");
    assert!(!stdout(&out).contains(marker));
    remove_container(&name);
}

#[test]
fn the_access_log_records_allowed_and_denied_requests_without_secrets() {
    let data = with_local_device();
    let log = data.path().join("access.jsonl");
    let proxy = start_proxy(
        &data,
        "d",
        "CONTAINERS=1\n",
        &["--access-log", log.to_str().unwrap()],
    );
    assert_eq!(
        http(&proxy.addr, "GET", "/v1.41/containers/json?all=1", &[], b"").0,
        200
    );
    assert_eq!(
        http(
            &proxy.addr,
            "POST",
            "/containers/abc/stop",
            &[("Authorization", "Bearer not-a-proxy-token-42")],
            b"body-text-43"
        )
        .0,
        403
    );
    assert_eq!(
        http(
            &proxy.addr,
            "POST",
            "/build?t=app&buildargs=%7B%22TOKEN%22%3A%22build-secret-44%22%7D",
            &[],
            b""
        )
        .0,
        403
    );
    let text = std::fs::read_to_string(&log).unwrap();
    for secret in ["not-a-proxy-token-42", "body-text-43", "build-secret-44"] {
        assert!(
            !text.contains(secret),
            "{secret} in the access log:\n{text}"
        );
    }
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(records.len(), 3, "{text}");
    let allowed = &records[0];
    assert!(
        allowed["client"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{allowed}"
    );
    assert_eq!(allowed["device"], "d");
    assert_eq!(allowed["method"], "GET");
    assert_eq!(allowed["path"], "/v1.41/containers/json?all=1");
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["rule"], "section");
    assert_eq!(allowed["variable"], "CONTAINERS");
    assert_eq!(allowed["status"], 200);
    assert!(
        chrono::DateTime::parse_from_rfc3339(allowed["time"].as_str().unwrap()).is_ok(),
        "{allowed}"
    );
    let denied = &records[1];
    assert_eq!(
        (
            &denied["method"],
            &denied["path"],
            &denied["decision"],
            &denied["rule"],
            &denied["variable"],
            &denied["status"]
        ),
        (
            &"POST".into(),
            &"/containers/abc/stop".into(),
            &"deny".into(),
            &"write-gate".into(),
            &"POST".into(),
            &403.into()
        )
    );
    assert_eq!(records[2]["path"], "/build?t=app&buildargs=***");
    assert_eq!(records[2]["variable"], "POST");
}

#[test]
fn a_proxy_whose_access_log_cannot_be_opened_refuses_to_start_saying_so() {
    let data = with_local_device();
    let listen = format!("tcp://127.0.0.1:{}", free_port());
    let out = proxy_refusing_to_start(
        &data,
        &listen,
        &["--access-log", "/nonexistent-dir/access.jsonl"],
    );
    assert_failure_says(
        &out,
        "cannot open the access log /nonexistent-dir/access.jsonl",
    );
}
/// `docker run -d --name NAME IMAGE` straight on the daemon (not through a proxy).
fn run_container(name: &str, image: &str) {
    remove_container(name);
    let out = Command::new("docker")
        .args(["run", "-d", "--name", name, image])
        .output()
        .unwrap();
    assert_success(&out, "start a test container");
}

fn json_header() -> [(&'static str, &'static str); 1] {
    [("Content-Type", "application/json")]
}

/// `POST path` with a JSON body; the status and the answer.
fn post_json(addr: &str, path: &str, body: &str) -> (u16, String) {
    http(addr, "POST", path, &json_header(), body.as_bytes())
}

#[test]
fn the_proxy_holds_the_container_scope_for_queries_bodies_and_listings() {
    let image = Infra::get().var("TEST_IMAGE");
    let tag = std::process::id();
    let inside = format!("rt-in-{tag}-a");
    let created = format!("rt-in-{tag}-new");
    let outside = format!("rt-out-{tag}");
    run_container(&inside, image);
    run_container(&outside, image);
    remove_container(&created);
    let data = with_local_device();
    let policy = format!(
        "CONTAINERS = 1\nPOST = 1\nNETWORKS = 1\nCOMMIT = 1\ndevices = [\"d\"]\n[containers]\nnames = [\"rt-in-{tag}-*\"]\n"
    );
    let proxy = start_proxy_with(&data, "d", &policy, "toml", &[]);
    let create = format!("/containers/create?name={created}");
    let refused = |method: &str, path: &str, body: String, status: u16, needle: &str| {
        let (got, answer) = http(&proxy.addr, method, path, &json_header(), body.as_bytes());
        assert_eq!(got, status, "{method} {path} {body}: {answer}");
        assert!(answer.contains(needle), "{method} {path} {body}: {answer}");
    };
    let outside_scope = "outside the policy's container scope";
    for host_config in [
        format!(r#"{{"VolumesFrom": ["{outside}:ro"]}}"#),
        format!(r#"{{"PidMode": "container:{outside}"}}"#),
        format!(r#"{{"NetworkMode": "container:{outside}"}}"#),
        format!(r#"{{"IpcMode": "container:{outside}"}}"#),
        format!(r#"{{"Links": ["/{outside}:db"]}}"#),
    ] {
        let body = format!(r#"{{"Image": "{image}", "HostConfig": {host_config}}}"#);
        refused("POST", &create, body, 403, outside_scope);
    }
    // Docker reads field names case-insensitively, and so does the check.
    refused(
        "POST",
        &create,
        format!(r#"{{"Image": "{image}", "hostconfig": {{"volumesfrom": ["{outside}"]}}}}"#),
        403,
        outside_scope,
    );
    // Two spellings of one field could be read either way: refused.
    refused(
        "POST",
        &create,
        format!(
            r#"{{"Image": "{image}", "HostConfig": {{"VolumesFrom": ["{inside}"], "volumesFrom": ["{outside}"]}}}}"#
        ),
        400,
        "more than once",
    );
    refused(
        "POST",
        "/networks/bridge/disconnect",
        format!(r#"{{"Container": "{outside}"}}"#),
        403,
        outside_scope,
    );
    refused(
        "POST",
        &format!("/commit?container={outside}&repo=capstan-test/commit-{tag}"),
        String::new(),
        403,
        outside_scope,
    );
    refused(
        "POST",
        "/containers/create?name=somewhere-else",
        format!(r#"{{"Image": "{image}"}}"#),
        403,
        "the new container somewhere-else would be outside",
    );
    // A body larger than the check reads is refused from its declared length.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&proxy.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "POST {create} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            2 << 20
        )
        .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("larger than"), "{answer}");
    }

    let (status, list) = http(&proxy.addr, "GET", "/containers/json?all=1", &[], b"");
    assert_eq!(status, 200, "{list}");
    assert!(list.contains(&format!("/{inside}")), "{list}");
    assert!(
        !list.contains(&outside),
        "the listing hides {outside}: {list}"
    );
    let outside_id = Command::new("docker")
        .args(["inspect", "-f", "{{.Id}}", &outside])
        .output()
        .unwrap();
    let outside_id = stdout(&outside_id).trim().to_string();
    let (status, network) = http(&proxy.addr, "GET", "/networks/bridge", &[], b"");
    assert_eq!(status, 200, "{network}");
    assert!(!network.contains(&outside_id), "{network}");

    // What stays inside the scope still works.
    let (status, answer) = http(
        &proxy.addr,
        "POST",
        &create,
        &json_header(),
        format!(r#"{{"Image": "{image}", "HostConfig": {{"VolumesFrom": ["{inside}"]}}}}"#)
            .as_bytes(),
    );
    assert_eq!(status, 201, "{answer}");
    remove_container(&created);
    remove_container(&inside);
    remove_container(&outside);
    drop(proxy);
}

#[test]
fn the_create_guard_refuses_host_privileges_naming_the_setting_that_allows_them() {
    let image = Infra::get().var("TEST_IMAGE");
    let data = with_local_device();
    let root = tempfile::tempdir().unwrap();
    let root_path = root.path().to_str().unwrap().to_string();
    let policy = format!(
        "CONTAINERS = 1\nPOST = 1\n[create]\nbind_roots = [\"{root_path}\"]\nimages = [\"{image}\"]\n"
    );
    let proxy = start_proxy_with(&data, "d", &policy, "toml", &[]);
    let name = format!("capstan-guard-{}", std::process::id());
    remove_container(&name);
    let create = format!("/containers/create?name={name}");
    for (host_config, needle) in [
        (r#"{"Privileged": true}"#.to_string(), "privileged = true"),
        (r#"{"PidMode": "host"}"#.to_string(), "host_namespaces = true"),
        (r#"{"NetworkMode": "host"}"#.to_string(), "host_namespaces = true"),
        (r#"{"UsernsMode": "host"}"#.to_string(), "host_namespaces = true"),
        (r#"{"CapAdd": ["SYS_ADMIN"]}"#.to_string(), "cap_add"),
        (
            r#"{"Devices": [{"PathOnHost": "/dev/null", "PathInContainer": "/dev/x", "CgroupPermissions": "rwm"}]}"#.to_string(),
            "devices = true",
        ),
        (r#"{"Binds": ["/etc:/host-etc:ro"]}"#.to_string(), "bind_roots"),
        (
            format!(r#"{{"Binds": ["{root_path}/../..:/up"]}}"#),
            "bind_roots",
        ),
        (
            r#"{"Mounts": [{"Type": "bind", "Source": "/", "Target": "/host"}]}"#.to_string(),
            "bind_roots",
        ),
        (r#"{"SecurityOpt": ["seccomp=unconfined"]}"#.to_string(), "privileged = true"),
    ] {
        let body = format!(r#"{{"Image": "{image}", "HostConfig": {host_config}}}"#);
        let (status, answer) = post_json(&proxy.addr, &create, &body);
        assert_eq!(status, 403, "{body}: {answer}");
        assert!(answer.contains(needle), "{body}: {answer}");
    }
    let (status, answer) = post_json(
        &proxy.addr,
        &create,
        r#"{"Image": "capstan-test/elsewhere:1"}"#,
    );
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("to `images`"), "{answer}");

    // The docker CLI shows the denial.
    let cfg = tempfile::tempdir().unwrap();
    let out = docker(&proxy.addr, cfg.path())
        .args(["run", "--rm", "--privileged", image, "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("privileged = true"),
        "{}",
        stderr(&out)
    );

    // A bind mount under an allowed root, of an allowed image, is created.
    let body =
        format!(r#"{{"Image": "{image}", "HostConfig": {{"Binds": ["{root_path}/data:/data"]}}}}"#);
    std::fs::create_dir(root.path().join("data")).unwrap();
    let (status, answer) = post_json(&proxy.addr, &create, &body);
    assert_eq!(status, 201, "{answer}");
    remove_container(&name);
    drop(proxy);

    // An environment-block policy gets the same guard, widened by CREATE_* names.
    let proxy = start_proxy(
        &data,
        "d",
        "CONTAINERS=1\nPOST=1\nCREATE_PRIVILEGED=1\n",
        &[],
    );
    let body = format!(r#"{{"Image": "{image}", "HostConfig": {{"Privileged": true}}}}"#);
    let (status, answer) = post_json(&proxy.addr, &create, &body);
    assert_eq!(status, 201, "{answer}");
    remove_container(&name);
    let body = format!(r#"{{"Image": "{image}", "HostConfig": {{"PidMode": "host"}}}}"#);
    let (status, answer) = post_json(&proxy.addr, &create, &body);
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("CREATE_HOST_NAMESPACES=1"), "{answer}");
    drop(proxy);
}
