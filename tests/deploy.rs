//! The deployment files, run for real: each compose file in `examples/compose/` is
//! brought up with `docker-compose` on the test daemon from the image `capstan:test`
//! (built by `scripts/image build` from the repository's Dockerfile), exercised with a
//! docker CLI client container and the API, and taken down with its volumes whatever
//! the outcome. The systemd unit is checked with `systemd-analyze verify`.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::free_port;
use crate::util::{DataDir, Infra, assert_success, http_json, stderr, stdout};

/// Built by `scripts/image build`.
const CAPSTAN_IMAGE: &str = "capstan:test";
const CLIENT_IMAGE: &str = "capstan-test/docker-cli:latest";
/// The uid the image runs Capstan as: secret files must be readable by it.
const CAPSTAN_UID: u32 = 10001;
/// Label on the containers a test creates on the daemon itself.
const LABEL: &str = "org.capstan.test.deploy";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The test daemon's socket, as `DOCKER_HOST`.
pub(crate) fn docker_host() -> String {
    format!("unix://{}", Infra::get().var("DOCKER_SOCKET"))
}

/// `docker ARGS` on the test daemon, its output.
fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .env("DOCKER_HOST", docker_host())
        .args(args)
        .output()
        .expect("run docker")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert_success(&out, &format!("docker {}", args.join(" ")));
    stdout(&out).trim().to_string()
}

/// Fails, saying how to build them, when the images are missing.
fn require_images() {
    for image in [CAPSTAN_IMAGE, CLIENT_IMAGE] {
        let out = docker(&["image", "inspect", "--format", "{{.Id}}", image]);
        assert!(
            out.status.success(),
            "image {image} is missing: run `scripts/image build` (scripts/test does)"
        );
    }
}

/// Runs `cmd` for at most `limit`; kills it past that and fails.
pub(crate) fn run_for(mut cmd: Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let status = wait_bounded(&mut child, limit)
        .unwrap_or_else(|| panic!("{what} did not finish within {limit:?}"));
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A compose project from one of `examples/compose/`, under a unique project name, with
/// its secrets in a scratch directory; `down -v` when dropped, whatever happened.
struct Project {
    name: String,
    file: PathBuf,
    /// Override files after the example's own (`-f FILE -f OVERRIDE`).
    overrides: Vec<PathBuf>,
    env: Vec<(String, String)>,
    secrets: tempfile::TempDir,
    /// Containers the test created on the daemon itself, removed with the project.
    extra_containers: Vec<String>,
}

impl Project {
    fn new(example: &str) -> Project {
        require_images();
        let file = repo()
            .join("examples/compose")
            .join(example)
            .join("docker-compose.yml");
        assert!(file.is_file(), "missing {}", file.display());
        let name = format!(
            "capstan-deploy-{}-{}-{}",
            example.replace(|c: char| !c.is_ascii_alphanumeric(), ""),
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let secrets = tempfile::tempdir().expect("scratch directory");
        let gid = std::os::unix::fs::MetadataExt::gid(
            &std::fs::metadata(Infra::get().var("DOCKER_SOCKET")).expect("the Docker socket"),
        );
        let env = vec![
            ("CAPSTAN_IMAGE".to_string(), CAPSTAN_IMAGE.to_string()),
            ("DOCKER_CLI_IMAGE".to_string(), CLIENT_IMAGE.to_string()),
            ("DOCKER_GID".to_string(), gid.to_string()),
            (
                "CAPSTAN_SECRETS_DIR".to_string(),
                secrets.path().display().to_string(),
            ),
        ];
        Project {
            name,
            file,
            overrides: Vec::new(),
            env,
            secrets,
            extra_containers: Vec::new(),
        }
    }

    fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Adds a compose override file with `content`.
    fn override_with(&mut self, content: &str) {
        let path = self
            .secrets
            .path()
            .join(format!("override-{}.yml", self.overrides.len()));
        std::fs::write(&path, content).unwrap();
        self.overrides.push(path);
    }

    /// Writes a secret file readable by Capstan's uid only (mode 0400), as the compose
    /// files tell users to.
    fn secret(&self, name: &str, content: &[u8]) {
        let path = self.secrets.path().join(name);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        std::os::unix::fs::chown(&path, Some(CAPSTAN_UID), None).unwrap_or_else(|e| {
            panic!(
                "cannot give {} to uid {CAPSTAN_UID} (the tests run as root, as scripts/test does): {e}",
                path.display()
            )
        });
    }

    fn compose(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.env("DOCKER_HOST", docker_host())
            .env_remove("COMPOSE_FILE")
            .env_remove("COMPOSE_PROJECT_NAME")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("--no-ansi")
            .args(["-p", &self.name, "-f"])
            .arg(&self.file);
        for o in &self.overrides {
            cmd.arg("-f").arg(o);
        }
        cmd.args(args);
        cmd
    }

    /// `docker-compose ARGS`, which must succeed within `limit`.
    fn ok(&self, args: &[&str], limit: Duration) -> String {
        let out = run_for(self.compose(args), limit);
        assert_success(&out, &format!("docker-compose {}", args.join(" ")));
        stdout(&out)
    }

    fn up(&self) {
        // Never build here: the image comes from scripts/image.
        self.ok(&["up", "-d", "--no-build"], Duration::from_secs(180));
    }

    /// `up`, then waits for Capstan's health check and checks its hardening.
    fn up_healthy(&self) {
        self.up();
        self.wait_healthy("capstan");
        assert_hardened(&self.container("capstan"));
    }

    /// Fails unless the client container's `docker ps -a` lists `container`.
    fn client_lists(&self, container: &str) {
        let names = self.exec_ok("client", &["docker", "ps", "-a", "--format", "{{.Names}}"]);
        assert!(
            names.lines().any(|n| n == container),
            "{container} not listed:\n{names}"
        );
    }

    /// `docker-compose exec -T SERVICE ARGS`, its output (success or not).
    fn exec(&self, service: &str, args: &[&str]) -> Output {
        let mut full = vec!["exec", "-T", service];
        full.extend_from_slice(args);
        run_for(self.compose(&full), Duration::from_secs(60))
    }

    fn exec_ok(&self, service: &str, args: &[&str]) -> String {
        let out = self.exec(service, args);
        assert_success(&out, &format!("{service}: {}", args.join(" ")));
        stdout(&out)
    }

    fn container(&self, service: &str) -> String {
        let id = self.ok(&["ps", "-q", service], Duration::from_secs(30));
        let id = id.trim();
        assert!(!id.is_empty(), "service {service} has no container");
        id.to_string()
    }

    fn logs(&self, service: &str) -> String {
        let out = run_for(
            self.compose(&["logs", "--no-color", service]),
            Duration::from_secs(30),
        );
        format!("{}{}", stdout(&out), stderr(&out))
    }

    /// Waits (bounded) until the service's health check passes.
    fn wait_healthy(&self, service: &str) {
        let id = self.container(service);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let state = docker_ok(&[
                "inspect",
                "--format",
                "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
                &id,
            ]);
            match state.as_str() {
                "running healthy" => return,
                "running starting" if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(250))
                }
                _ => panic!(
                    "{service} is not healthy ({state}); its log:\n{}",
                    self.logs(service)
                ),
            }
        }
    }

    /// A container on the daemon itself (the test image), removed with the project.
    fn create_target(&mut self, suffix: &str) -> String {
        let name = format!("{}-{suffix}", self.name);
        let label = format!("{LABEL}={}", self.name);
        let image = Infra::get().var("TEST_IMAGE");
        docker_ok(&["create", "--name", &name, "--label", &label, image]);
        self.extra_containers.push(name.clone());
        name
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let out = run_for(
                self.compose(&["logs", "--no-color"]),
                Duration::from_secs(30),
            );
            eprintln!(
                "compose project {} logs:\n{}{}",
                self.name,
                stdout(&out),
                stderr(&out)
            );
        }
        let out = run_for(
            self.compose(&["down", "-v", "--remove-orphans", "--timeout", "5"]),
            Duration::from_secs(120),
        );
        if !out.status.success() {
            eprintln!("docker-compose down -v failed: {}", stderr(&out));
        }
        for c in &self.extra_containers {
            let _ = docker(&["rm", "-f", c]);
        }
    }
}

fn running(container: &str) -> bool {
    docker_ok(&["inspect", "--format", "{{.State.Running}}", container]) == "true"
}

/// 32 random bytes in hex, as `openssl rand -hex 32` makes them (a proxy token, a vault
/// key file).
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The container runs as the image's user, read-only, without capabilities or new
/// privileges: the settings the compose files promise.
fn assert_hardened(container: &str) {
    let got = docker_ok(&[
        "inspect",
        "--format",
        "{{.Config.User}}|{{.HostConfig.ReadonlyRootfs}}|{{json .HostConfig.CapDrop}}|{{json .HostConfig.SecurityOpt}}",
        container,
    ]);
    assert_eq!(
        got, r#"capstan:capstan|true|["ALL"]|["no-new-privileges:true"]"#,
        "container settings"
    );
}

#[test]
fn the_image_runs_capstan_as_a_non_root_user_with_its_data_in_a_volume() {
    require_images();
    let got = docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}|{{json .Config.Volumes}}|{{json .Config.ExposedPorts}}|{{json .Config.Entrypoint}}|{{json .Config.Cmd}}|{{if .Config.Healthcheck}}health{{end}}",
        CAPSTAN_IMAGE,
    ]);
    assert_eq!(
        got,
        r#"capstan:capstan|{"/var/lib/capstan":{}}|{"2375/tcp":{},"7878/tcp":{}}|["/usr/local/bin/capstan"]|["serve"]|health"#
    );
    let uid = docker_ok(&["run", "--rm", "--entrypoint", "id", CAPSTAN_IMAGE, "-u"]);
    assert_eq!(uid, CAPSTAN_UID.to_string());
    let plugins = docker_ok(&[
        "run",
        "--rm",
        "--entrypoint",
        "ls",
        CAPSTAN_IMAGE,
        "/usr/share/capstan/plugins",
    ]);
    assert_eq!(
        plugins.split_whitespace().collect::<Vec<_>>(),
        ["autoheal", "crashloop", "inventory", "redeploy", "updates"]
    );
}

/// Capstan in place of linuxserver/socket-proxy: the docker CLI in another container
/// reaches the daemon as tcp://capstan:2375 under Dockman's block, pasted unchanged.
#[test]
fn socket_proxy_compose_serves_the_dockman_block_to_a_docker_cli_container() {
    let mut p = Project::new("socket-proxy");
    p.secret("proxy.token", format!("{}\n", random_token()).as_bytes());
    let target = p.create_target("target");
    p.up_healthy();

    // Lists, starts and stops containers.
    p.client_lists(&target);
    p.exec_ok("client", &["docker", "start", &target]);
    assert!(running(&target), "{target} was not started");
    p.exec_ok("client", &["docker", "stop", "-t", "5", &target]);
    assert!(!running(&target), "{target} was not stopped");

    // Outside the block: logs (ALLOW_LOGS=0) and plugins (PLUGINS=0) get the readable 403.
    let logs = p.exec("client", &["docker", "logs", &target]);
    assert!(!logs.status.success(), "docker logs was allowed");
    assert!(
        stderr(&logs).contains("ALLOW_LOGS=1"),
        "the refusal names the variable: {}",
        stderr(&logs)
    );
    let plugins = p.exec("client", &["docker", "plugin", "ls"]);
    assert!(!plugins.status.success(), "docker plugin ls was allowed");
    assert!(
        stderr(&plugins).contains("PLUGINS=1"),
        "the refusal names the variable: {}",
        stderr(&plugins)
    );

    // Without the token (no config.json with the header) the proxy refuses everything.
    let anonymous = p.exec(
        "client",
        &["env", "DOCKER_CONFIG=/tmp/no-config", "docker", "ps"],
    );
    assert!(
        !anonymous.status.success(),
        "a client without the token was served"
    );
    assert!(
        stderr(&anonymous).contains("missing or invalid proxy token"),
        "{}",
        stderr(&anonymous)
    );
}

/// The test daemon behind a read-only Capstan proxy, on a unix socket with the Docker
/// socket's group, as the engine example's `/var/run/docker.sock`. The example plugins
/// act on every container with their labels (`capstan.autoheal=true`, …) and other
/// tests run such containers at the same time: through this socket the engine sees the
/// daemon and changes nothing. Stopped when dropped.
struct ReadOnlyDocker {
    data: DataDir,
    child: Child,
}

impl ReadOnlyDocker {
    fn start() -> ReadOnlyDocker {
        let data = DataDir::with_vault();
        let out = data.capstan(&["device", "add", "local", "--kind", "local"]);
        assert_success(&out, "device add local");
        let policy = data.path().join("read-only.env");
        std::fs::write(
            &policy,
            "CONTAINERS=1\nIMAGES=1\nINFO=1\nEVENTS=1\nPOST=0\n",
        )
        .unwrap();
        let listen = format!("unix://{}", data.path().join("docker.sock").display());
        let child = data
            .cmd()
            .args(["proxy", "--device", "local", "--policy"])
            .arg(&policy)
            .args(["--listen", &listen])
            .stdout(Stdio::null())
            .spawn()
            .expect("start capstan proxy");
        let ro = ReadOnlyDocker { data, child };
        let socket = ro.socket();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "capstan proxy did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let gid = std::os::unix::fs::MetadataExt::gid(
            &std::fs::metadata(Infra::get().var("DOCKER_SOCKET")).unwrap(),
        );
        std::os::unix::fs::chown(&socket, None, Some(gid)).unwrap();
        ro
    }

    fn socket(&self) -> PathBuf {
        self.data.path().join("docker.sock")
    }
}

impl Drop for ReadOnlyDocker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The engine with the example plugins, the vault key from a Compose secret, and the
/// API on a host port: the admin token printed on first start lists the `local` device
/// and the plugins and runs one; after a restart the same vault and token still work.
/// The engine reaches the daemon read-only here (see [`ReadOnlyDocker`]).
#[test]
fn engine_compose_serves_the_api_with_the_example_plugins_and_a_vault_key_secret() {
    let docker = ReadOnlyDocker::start();
    let mut p = Project::new("engine");
    p.override_with(&format!(
        "services:\n  capstan:\n    volumes:\n      - {}:/var/run/docker.sock\n",
        docker.socket().display()
    ));
    let key = random_token();
    p.secret("vault.key", format!("{key}\n").as_bytes());
    let port = free_port();
    p.set_env("CAPSTAN_API_PORT", &port.to_string());
    p.up_healthy();
    let mounted = docker_ok(&[
        "inspect",
        "--format",
        r#"{{range .Mounts}}{{if eq .Destination "/var/run/docker.sock"}}{{.Source}}{{end}}{{end}}"#,
        &p.container("capstan"),
    ]);
    assert_eq!(
        Path::new(&mounted),
        docker.socket(),
        "the read-only socket is mounted"
    );

    let logs = p.logs("capstan");
    let token = logs
        .lines()
        .skip_while(|l| !l.contains("admin API token"))
        .nth(1)
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("no admin token in the first start's log:\n{logs}"))
        .to_string();
    assert!(token.starts_with("cap_"), "{token}");
    assert!(
        !logs.contains("created the vault with key file") && !logs.contains(&key),
        "the vault key was taken from the secret (not generated), and never printed:\n{logs}"
    );
    assert!(
        logs.contains("created the vault with the existing key file"),
        "the first start says which key protects the new vault:\n{logs}"
    );
    let addr = format!("127.0.0.1:{port}");
    let auth = format!("Bearer {token}");

    let api = |method: &str, path: &str, body: Value| {
        let (status, body) = http_json(&addr, &auth, method, path, &body);
        (
            status,
            serde_json::from_str::<Value>(&body).unwrap_or(Value::String(body)),
        )
    };
    let (status, devices) = api("GET", "/api/devices", Value::Null);
    assert_eq!(status, 200, "{devices}");
    assert!(devices.to_string().contains("\"local\""), "{devices}");
    let (status, plugins) = api("GET", "/api/plugins", Value::Null);
    assert_eq!(status, 200, "{plugins}");
    for name in ["autoheal", "redeploy", "inventory", "crashloop", "updates"] {
        assert!(
            plugins.to_string().contains(&format!("\"{name}\"")),
            "{name} not installed: {plugins}"
        );
    }
    let (status, run) = api(
        "POST",
        "/api/plugins/inventory/run?wait=true",
        serde_json::json!({}),
    );
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "ok", "{run}");

    // The CLI inside the container speaks to the running engine (its own CLI token).
    let listed = p.exec_ok("capstan", &["capstan", "device", "list"]);
    assert!(listed.contains("local"), "{listed}");

    // A restart opens the same vault with the key from the secret; no second admin token.
    p.ok(&["restart", "-t", "10", "capstan"], Duration::from_secs(60));
    p.wait_healthy("capstan");
    let (status, devices) = api("GET", "/api/devices", Value::Null);
    assert_eq!(status, 200, "after a restart: {devices}");
    assert_eq!(
        p.logs("capstan").matches("admin API token").count(),
        1,
        "the admin token is printed on the first start only"
    );
}

/// A socat forwarder on the Docker bridge's address to the test sshd (which listens on
/// loopback only), so containers reach it as a remote host; it logs each connection, so
/// the test counts SSH connections made through it. Stopped when dropped.
struct Forwarder {
    child: Child,
    host: String,
    port: u16,
    log: tempfile::NamedTempFile,
}

impl Forwarder {
    fn to_sshd() -> Forwarder {
        let infra = Infra::get();
        let host = bridge_address();
        let port = std::net::TcpListener::bind((host.as_str(), 0))
            .unwrap_or_else(|e| panic!("cannot bind on the bridge address {host}: {e}"))
            .local_addr()
            .unwrap()
            .port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("socat")
            .args(["-d", "-d"])
            .arg(format!("TCP-LISTEN:{port},bind={host},reuseaddr,fork"))
            .arg(format!("TCP:127.0.0.1:{}", infra.var("SSH_PORT")))
            .stdin(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start socat (scripts/testinfra installs it)");
        let fwd = Forwarder {
            child,
            host,
            port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fwd.said("listening on") {
            assert!(
                Instant::now() < deadline,
                "socat did not listen on {}:{}: {}",
                fwd.host,
                fwd.port,
                std::fs::read_to_string(fwd.log.path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        fwd
    }

    fn said(&self, what: &str) -> bool {
        std::fs::read_to_string(self.log.path()).is_ok_and(|l| l.contains(what))
    }

    /// TCP connections (so SSH sessions) made through the forwarder so far.
    fn connections(&self) -> usize {
        std::fs::read_to_string(self.log.path())
            .unwrap_or_default()
            .matches("accepting connection from")
            .count()
    }
}

/// The host's address on Docker's default bridge (`docker0`), which every container
/// can reach through its gateway.
fn bridge_address() -> String {
    let device = docker_ok(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        r#"{{index .Options "com.docker.network.bridge.name"}}"#,
    ]);
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", &device])
        .output()
        .expect("run ip");
    assert_success(&out, &format!("ip -4 addr show dev {device}"));
    stdout(&out)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no IPv4 address on {device}: {}", stdout(&out)))
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy for a remote SSH device: the client container lists the remote host's
/// containers through Capstan's pooled tunnel (one SSH session for many requests).
#[test]
fn remote_proxy_compose_serves_a_remote_ssh_host_through_one_pooled_session() {
    let infra = Infra::get();
    let fwd = Forwarder::to_sshd();
    let mut p = Project::new("remote-proxy");
    p.secret("proxy.token", random_token().as_bytes());
    p.secret(
        "ssh_key",
        &std::fs::read(infra.path("SSH_KEY_ED25519")).unwrap(),
    );
    p.secret(
        "ssh_host_key",
        &std::fs::read(infra.path("SSH_HOST_KEY_PUB")).unwrap(),
    );
    let target = p.create_target("on-remote");

    // Register the device in one-off containers on the data volume, as the file says.
    let setup = Duration::from_secs(120);
    p.ok(&["run", "--rm", "capstan", "vault", "init"], setup);
    let user = infra.var("SSH_USER_KEY");
    let port = fwd.port.to_string();
    p.ok(
        &[
            "run",
            "--rm",
            "capstan",
            "device",
            "add",
            "remote",
            "--kind",
            "ssh",
            "--host",
            &fwd.host,
            "--port",
            &port,
            "--user",
            user,
            "--ssh-key-file",
            "/run/secrets/ssh_key",
            "--host-key-file",
            "/run/secrets/ssh_host_key",
        ],
        setup,
    );
    p.up_healthy();

    p.client_lists(&target);
    let sessions = fwd.connections();
    assert!(
        sessions >= 1,
        "the requests did not go over SSH to the remote host"
    );
    for _ in 0..3 {
        p.client_lists(&target);
        p.exec_ok(
            "client",
            &["docker", "inspect", "--format", "{{.Id}}", &target],
        );
    }
    assert_eq!(
        fwd.connections(),
        sessions,
        "later requests reuse the pooled SSH session"
    );
    // The Watchtower policy leaves SYSTEM off: the refusal names it.
    let df = p.exec("client", &["docker", "system", "df"]);
    assert!(!df.status.success(), "docker system df was allowed");
    assert!(stderr(&df).contains("SYSTEM=1"), "{}", stderr(&df));
}

/// The systemd unit parses cleanly: `systemd-analyze verify` in a scratch root holding
/// the unit, the system's own units and a stand-in for the binary (verify wants the
/// ExecStart command to exist), with no warning at all.
#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    assert!(
        analyze.exists(),
        "systemd-analyze is missing: install Debian's `systemd` package (scripts/image build does)"
    );
    let unit = repo().join("deploy/systemd/capstan.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for want in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "StateDirectory=capstan",
        "SupplementaryGroups=docker",
    ] {
        assert!(text.lines().any(|l| l == want), "{want} missing");
    }
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("MemoryDenyWriteExecute=")),
        "wasmtime compiles plugins at run time: MemoryDenyWriteExecute must stay unset"
    );

    let root = tempfile::tempdir().unwrap();
    let units = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::copy(&unit, units.join("capstan.service")).unwrap();
    let system_units = root.path().join("usr/lib/systemd");
    std::fs::create_dir_all(&system_units).unwrap();
    let copied = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(&system_units)
        .output()
        .unwrap();
    assert_success(&copied, "copy the system's units");
    let bin = root.path().join("usr/local/bin/capstan");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::write(&bin, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

    let out = Command::new(analyze)
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .arg("capstan.service")
        .output()
        .unwrap();
    assert_success(&out, "systemd-analyze verify");
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify warns:\n{said}"
    );
}

/// The cluster compose file: three NATS servers (from the image the cluster tests build
/// from the installed `nats-server`, as `NATS_IMAGE`) and three engines on one vault key
/// come up; each engine is healthy and hardened, and each sees all three nodes alive.
#[test]
fn cluster_compose_starts_three_engines_that_form_one_cluster() {
    let _turn = crate::cluster::turn();
    let mut p = Project::new("cluster");
    p.set_env("NATS_IMAGE", crate::cluster_faults::nats_image());
    p.secret("vault.key", format!("{}\n", random_token()).as_bytes());
    let services = ["capstan1", "capstan2", "capstan3"];
    for i in 1..=3 {
        p.set_env(&format!("CAPSTAN_API_PORT_{i}"), &free_port().to_string());
    }
    p.up();
    for s in services {
        // An engine may start before the NATS servers have formed their cluster, exit
        // and be restarted (the file's restart policy): wait through that, bounded.
        let id = p.container(s);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let state = docker_ok(&[
                "inspect",
                "--format",
                "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
                &id,
            ]);
            if state == "running healthy" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{s} is not healthy within 120 s ({state}); its log:\n{}",
                p.logs(s)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        assert_hardened(&id);
    }
    for s in services {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = p.exec(s, &["capstan", "cluster", "status", "--json"]);
            let v: Value = serde_json::from_str(&stdout(&out)).unwrap_or(Value::Null);
            let mut alive: Vec<&str> = v["nodes"]
                .as_array()
                .map(|n| {
                    n.iter()
                        .filter(|n| n["alive"] == true)
                        .filter_map(|n| n["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            alive.sort_unstable();
            if v["in_cluster"] == true
                && v["node"] == s
                && alive == services
                && v["state"]["up_to_date"] == true
            {
                assert_eq!(v["runs"]["replicas"], 3, "{v}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{s} does not see the three nodes alive: {v} {}",
                stderr(&out)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    // The configuration is shared: capstan1's admin token works on capstan3, and every
    // engine lists the same plugins (the example plugins, installed once per cluster).
    let logs = p.logs("capstan1");
    let token = logs
        .lines()
        .skip_while(|l| !l.contains("admin API token"))
        .nth(1)
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("no admin token in capstan1's first start:\n{logs}"))
        .to_string();
    let auth = format!("Bearer {token}");
    let plugins_on = |i: usize| -> Vec<String> {
        let port = p
            .env
            .iter()
            .find(|(k, _)| *k == format!("CAPSTAN_API_PORT_{i}"))
            .map(|(_, v)| v.clone())
            .unwrap();
        let (status, body) = http_json(
            &format!("127.0.0.1:{port}"),
            &auth,
            "GET",
            "/api/plugins",
            &Value::Null,
        );
        assert_eq!(status, 200, "capstan{i} with capstan1's token: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let mut names: Vec<String> = v
            .as_array()
            .or_else(|| v["plugins"].as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let first = plugins_on(1);
    for name in ["autoheal", "crashloop", "inventory", "redeploy", "updates"] {
        assert!(
            first.iter().any(|n| n == name),
            "{name} not on capstan1: {first:?}"
        );
    }
    assert_eq!(plugins_on(2), first);
    assert_eq!(plugins_on(3), first);
}
