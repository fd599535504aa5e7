//! Docker operations over each transport, against the real test infrastructure.
//!
//! Run in release: `cargo bench --bench docker` (after `scripts/testinfra up`).
//!
//! The same operations (list containers as `docker ps -a`, inspect one container) over
//! the local socket, the pooled SSH tunnel (the default `auto` tunnel, a streamlocal
//! channel on the test sshd, and forced `dial-stdio` for comparison) and TLS, and the
//! docker CLI over `ssh://` on the same sshd as the reference; then connection set-up per
//! transport and 100 concurrent operations on one SSH device. Prints medians and p99, and
//! the ratios the design sets targets for: pooled SSH / local (target ≤ 1.5×) and docker
//! CLI over ssh / pooled SSH (target ≥ 20×).
//!
//! For scale, the same calls also go through the daemon's socket behind one socat relay
//! (the cost of any extra process hop) and through OpenSSH's own client forwarding a
//! local socket over the same sshd (`ssh -L`, the reference SSH tunnel); and `docker ps`
//! on the idle daemon, an empty answer, shows the bare round trip: each transport's fixed
//! cost per call.

// Benchmarks set up environments for the processes they start.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions};
use capstan::device::{Device, DeviceKind, DeviceSecrets, SecretField, SshAuth};
use capstan::docker::{ConnectOptions, DockerClient, HostKeyPolicy, SshTunnel};
use capstan::secret::Secret;

const ROUNDS: usize = 400;
const WARMUP: usize = 30;
const CLI_ROUNDS: usize = 15;
const SETUP_ROUNDS: usize = 20;
const CONCURRENT: usize = 100;
const CONCURRENT_ROUNDS: usize = 10;

struct Infra(HashMap<String, String>);

impl Infra {
    fn load() -> Infra {
        let dir = std::env::var_os("CAPSTAN_TESTINFRA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/testinfra"));
        let path = dir.join("infra.env");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            eprintln!(
                "error: the test infrastructure is not set up ({}: {e}); run `scripts/testinfra up` first",
                path.display()
            );
            std::process::exit(2)
        });
        Infra(
            text.lines()
                .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect(),
        )
    }

    fn var(&self, k: &str) -> &str {
        self.0.get(k).unwrap_or_else(|| {
            eprintln!("error: infra.env has no {k}; re-run `scripts/testinfra up`");
            std::process::exit(2)
        })
    }

    fn secret(&self, k: &str) -> Secret {
        Secret::from_file(Path::new(self.var(k))).expect("read a secret file")
    }
}

struct Target {
    label: &'static str,
    device: Device,
    secrets: DeviceSecrets,
    /// For SSH targets: the tunnel to force (else the options' default, `auto`).
    tunnel: Option<SshTunnel>,
}

fn targets(i: &Infra) -> Vec<Target> {
    let mut local = Device::blank(DeviceKind::Local, "bench-local");
    local.docker_host = Some(format!("unix://{}", i.var("DOCKER_SOCKET")));

    // The same daemon behind one relay process (the test infrastructure's socat
    // forwarder): what any hop through another process costs, crypto aside.
    let mut relayed = Device::blank(DeviceKind::Local, "bench-relayed");
    relayed.docker_host = Some(format!("unix://{}", i.var("ALT_DOCKER_SOCKET")));

    let mut ssh = Device::blank(DeviceKind::Ssh, "bench-ssh");
    ssh.host = Some(i.var("SSH_HOST4").into());
    ssh.port = Some(i.var("SSH_PORT").parse().unwrap());
    ssh.user = Some(i.var("SSH_USER_KEY").into());
    ssh.auth = Some(SshAuth::Key);
    ssh.host_key = Some(
        std::fs::read_to_string(i.var("SSH_HOST_KEY_PUB"))
            .unwrap()
            .trim()
            .into(),
    );
    let mut ssh_secrets = DeviceSecrets::default();
    ssh_secrets.set(SecretField::PrivateKey, i.secret("SSH_KEY_ED25519"));

    let mut tls = Device::blank(DeviceKind::Tls, "bench-tls");
    tls.host = Some(i.var("TLS_HOST").into());
    tls.port = Some(i.var("TLS_PORT").parse().unwrap());
    let mut tls_secrets = DeviceSecrets::default();
    tls_secrets.set(SecretField::TlsCa, i.secret("TLS_CA"));
    tls_secrets.set(SecretField::TlsCert, i.secret("TLS_CERT"));
    tls_secrets.set(SecretField::TlsKey, i.secret("TLS_KEY"));

    vec![
        Target {
            label: "local socket",
            device: local,
            secrets: DeviceSecrets::default(),
            tunnel: None,
        },
        Target {
            label: "socket via socat relay",
            device: relayed,
            secrets: DeviceSecrets::default(),
            tunnel: None,
        },
        Target {
            label: "pooled SSH",
            device: ssh.clone(),
            secrets: ssh_secrets.clone(),
            tunnel: Some(SshTunnel::Auto),
        },
        Target {
            label: "pooled SSH dial-stdio",
            device: ssh,
            secrets: ssh_secrets,
            tunnel: Some(SshTunnel::DialStdio),
        },
        Target {
            label: "TLS",
            device: tls,
            secrets: tls_secrets,
            tunnel: None,
        },
    ]
}

/// Durations in milliseconds, sorted.
struct Sample(Vec<f64>);

impl Sample {
    fn new(mut v: Vec<Duration>) -> Sample {
        v.sort();
        Sample(v.into_iter().map(|d| d.as_secs_f64() * 1000.0).collect())
    }
    fn pct(&self, p: f64) -> f64 {
        let idx = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[idx.min(self.0.len() - 1)]
    }
    fn median(&self) -> f64 {
        self.pct(0.5)
    }
    fn p99(&self) -> f64 {
        self.pct(0.99)
    }
}

fn row(what: &str, over: &str, s: &Sample) {
    println!(
        "{what:<26} {over:<22} n={:<4} median {:>9.3} ms   p99 {:>9.3} ms",
        s.0.len(),
        s.median(),
        s.p99()
    );
}

/// `docker ps -a`: every container, the bench's own among them (the docker CLI row
/// runs exactly this).
async fn list(d: &Docker) {
    d.list_containers(Some(ListContainersOptions {
        all: true,
        ..Default::default()
    }))
    .await
    .expect("list containers");
}

/// `docker ps`: running containers only; on the idle test daemon an empty answer, so
/// this is the bare round trip and shows each transport's fixed cost per call.
async fn list_running(d: &Docker) {
    d.list_containers(None::<ListContainersOptions>)
        .await
        .expect("list running containers");
}

async fn inspect(d: &Docker, name: &str) {
    d.inspect_container(name, None::<InspectContainerOptions>)
        .await
        .expect("inspect container");
}

/// `docker -H ssh://…` with the system ssh client made non-interactive: an `ssh` wrapper
/// first on PATH adds `-F <config>` naming the test key and known_hosts (ssh reads
/// `~/.ssh` from the password database, not from `$HOME`).
struct DockerCli {
    home: tempfile::TempDir,
    host: String,
}

impl DockerCli {
    fn new(i: &Infra) -> DockerCli {
        let home = tempfile::tempdir().unwrap();
        let ssh_dir = home.path().join(".ssh");
        std::fs::create_dir(&ssh_dir).unwrap();
        let config = format!(
            "Host {host}\n  Port {port}\n  User {user}\n  IdentityFile {key}\n  IdentitiesOnly yes\n  IdentityAgent none\n  UserKnownHostsFile {kh}\n  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  BatchMode yes\n",
            host = i.var("SSH_HOST4"),
            port = i.var("SSH_PORT"),
            user = i.var("SSH_USER_KEY"),
            key = i.var("SSH_KEY_ED25519"),
            kh = i.var("SSH_KNOWN_HOSTS"),
        );
        let cfg = ssh_dir.join("config");
        std::fs::write(&cfg, config).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ssh_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
        let bin = home.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let wrapper = bin.join("ssh");
        std::fs::write(
            &wrapper,
            format!("#!/bin/sh\nexec /usr/bin/ssh -F {} \"$@\"\n", cfg.display()),
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        DockerCli {
            host: format!(
                "ssh://{}@{}:{}",
                i.var("SSH_USER_KEY"),
                i.var("SSH_HOST4"),
                i.var("SSH_PORT")
            ),
            home,
        }
    }

    /// `ssh -N -L <tmp>/docker.sock:/var/run/docker.sock` with the same configuration;
    /// waits for the local socket. Stopped (by its pid) when dropped.
    fn forward(&self, i: &Infra) -> Forward {
        let socket = self.home.path().join("forward.sock");
        let child = Command::new("/usr/bin/ssh")
            .arg("-F")
            .arg(self.home.path().join(".ssh/config"))
            .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
            .arg(format!("{}:{}", socket.display(), i.var("DOCKER_SOCKET")))
            .arg(i.var("SSH_HOST4"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start ssh -L");
        let mut forward = Forward { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !forward.socket.exists() {
            if let Ok(Some(status)) = forward.child.try_wait() {
                panic!("ssh -L exited ({status}) before forwarding");
            }
            assert!(
                Instant::now() < deadline,
                "ssh -L did not forward within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        forward
    }

    fn path(&self) -> std::ffi::OsString {
        let mut p = self.home.path().join("bin").into_os_string();
        p.push(":");
        p.push(std::env::var_os("PATH").unwrap_or_default());
        p
    }

    fn run(&self, args: &[&str]) {
        let out = Command::new("docker")
            .env_clear()
            .env("PATH", self.path())
            .env("HOME", self.home.path())
            .env("DOCKER_CONFIG", self.home.path().join(".docker"))
            .args(["-H", &self.host])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run the docker CLI");
        assert!(
            out.status.success(),
            "docker {args:?} over ssh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn time(&self, args: &[&str]) -> Sample {
        self.run(args);
        let mut v = Vec::new();
        for _ in 0..CLI_ROUNDS {
            let t = Instant::now();
            self.run(args);
            v.push(t.elapsed());
        }
        Sample::new(v)
    }
}

fn main() {
    let infra = Infra::load();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(&infra));
}

async fn run(i: &Infra) {
    let base = ConnectOptions {
        docker_host_env: None,
        agent_socket: None,
        ..ConnectOptions::default()
    };
    let opts = |t: &Target| ConnectOptions {
        ssh_tunnel: t.tunnel.unwrap_or(SshTunnel::Auto),
        ..base.clone()
    };
    let name = format!("capstan-bench-{}", &uuid::Uuid::new_v4().to_string()[..8]);
    let out = Command::new("docker")
        .args([
            "create",
            "--name",
            &name,
            "--label",
            "org.capstan.test=bench",
        ])
        .arg(i.var("TEST_IMAGE"))
        .args(["sleep", "300"])
        .output()
        .expect("docker create");
    assert!(
        out.status.success(),
        "docker create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _cleanup = Cleanup(name.clone());

    println!(
        "Docker operations, {ROUNDS} rounds after {WARMUP} warm-up (docker CLI: {CLI_ROUNDS}); daemon {} (API {})\n",
        i.var("DOCKER_SERVER_VERSION"),
        i.var("DOCKER_API_VERSION")
    );
    let mut medians: HashMap<(&str, &str), f64> = HashMap::new();
    let cli = DockerCli::new(i);
    // OpenSSH's own client forwarding a local socket to the remote one over the same
    // sshd: the reference implementation of an SSH tunnel, for comparison.
    let forward = cli.forward(i);
    let mut forwarded = Device::blank(DeviceKind::Local, "bench-openssh-forward");
    forwarded.docker_host = Some(format!("unix://{}", forward.socket.display()));
    let mut all_targets = targets(i);
    all_targets.push(Target {
        label: "OpenSSH -L forward",
        device: forwarded,
        secrets: DeviceSecrets::default(),
        tunnel: None,
    });
    let mut clients = Vec::new();
    for t in all_targets {
        let c = DockerClient::new(&t.device, &t.secrets, &opts(&t), HostKeyPolicy::PinnedOnly)
            .expect("client");
        let d = c.docker().await.expect("connect");
        clients.push((t.label, c, d));
    }
    // The transports take turns call by call, so a busy moment on the machine falls on
    // all of them alike.
    for (op, what) in [
        ("list", "list containers (ps -a)"),
        ("running", "list running (ps)"),
        ("inspect", "inspect container"),
    ] {
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); clients.len()];
        for round in 0..WARMUP + ROUNDS {
            for (k, (_, _, d)) in clients.iter().enumerate() {
                let t = Instant::now();
                match op {
                    "list" => list(d).await,
                    "running" => list_running(d).await,
                    _ => inspect(d, &name).await,
                }
                if round >= WARMUP {
                    samples[k].push(t.elapsed());
                }
            }
        }
        for ((label, _, _), v) in clients.iter().zip(samples) {
            let s = Sample::new(v);
            row(what, label, &s);
            medians.insert((op, label), s.median());
        }
    }
    for (label, c, _) in &clients {
        let ch = c.ssh_channels();
        let how = if ch.streamlocal + ch.dial_stdio > 0 {
            format!(
                " ({} streamlocal, {} dial-stdio)",
                ch.streamlocal, ch.dial_stdio
            )
        } else {
            String::new()
        };
        println!(
            "{:<26} {:<22} {} connection(s){how} opened for {} sequential calls",
            "",
            label,
            c.connections_opened(),
            3 * (ROUNDS + WARMUP) + 1
        );
    }
    let clients: HashMap<&str, _> = clients.into_iter().map(|(l, c, d)| (l, (c, d))).collect();
    drop(forward);

    let s = cli.time(&["ps", "-a"]);
    row("list containers (ps -a)", "docker CLI ssh://", &s);
    medians.insert(("list", "cli"), s.median());
    let s = cli.time(&["inspect", &name]);
    row("inspect container", "docker CLI ssh://", &s);
    medians.insert(("inspect", "cli"), s.median());

    println!();
    for t in targets(i) {
        let mut v = Vec::new();
        for _ in 0..SETUP_ROUNDS {
            let start = Instant::now();
            let c = DockerClient::new(&t.device, &t.secrets, &opts(&t), HostKeyPolicy::PinnedOnly)
                .expect("client");
            let d = c.docker().await.expect("connect");
            list(&d).await;
            v.push(start.elapsed());
        }
        row("set-up + first list", t.label, &Sample::new(v));
    }

    println!();
    let (ssh_client, ssh_docker) = clients.get("pooled SSH").unwrap();
    let mut per_op = Vec::new();
    let mut walls = Vec::new();
    for _ in 0..CONCURRENT_ROUNDS {
        let start = Instant::now();
        let tasks: Vec<_> = (0..CONCURRENT)
            .map(|_| {
                let d = ssh_docker.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    list(&d).await;
                    t.elapsed()
                })
            })
            .collect();
        for t in tasks {
            per_op.push(t.await.unwrap());
        }
        walls.push(start.elapsed());
    }
    let walls = Sample::new(walls);
    row(
        &format!("{CONCURRENT} concurrent lists"),
        "pooled SSH (wall)",
        &walls,
    );
    row("  each of them", "pooled SSH", &Sample::new(per_op));
    println!(
        "  throughput {:.0} ops/s over {} channels of one session",
        CONCURRENT as f64 / (walls.median() / 1000.0),
        ssh_client.open_connections()
    );
    let (_, local_docker) = clients.get("local socket").unwrap();
    let mut walls = Vec::new();
    for _ in 0..CONCURRENT_ROUNDS {
        let start = Instant::now();
        let tasks: Vec<_> = (0..CONCURRENT)
            .map(|_| {
                let d = local_docker.clone();
                tokio::spawn(async move { list(&d).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        walls.push(start.elapsed());
    }
    row(
        &format!("{CONCURRENT} concurrent lists"),
        "local socket (wall)",
        &Sample::new(walls),
    );

    println!("\nratios (medians)");
    for op in ["list", "running", "inspect"] {
        let local = medians[&(op, "local socket")];
        let ssh = medians[&(op, "pooled SSH")];
        let dial = medians[&(op, "pooled SSH dial-stdio")];
        let tls = medians[&(op, "TLS")];
        let relay = medians[&(op, "socket via socat relay")];
        let openssh = medians[&(op, "OpenSSH -L forward")];
        match medians.get(&(op, "cli")) {
            Some(cli) => println!(
                "  {op:<8} pooled SSH / local = {:.2}x (target <= 1.5x)   docker CLI ssh / pooled SSH = {:.0}x (target >= 20x)",
                ssh / local,
                cli / ssh,
            ),
            None => println!(
                "  {op:<8} pooled SSH / local = {:.2}x (the bare round trip: pooled SSH adds {:.3} ms a call, OpenSSH -L adds {:.3} ms)",
                ssh / local,
                ssh - local,
                openssh - local,
            ),
        }
        println!(
            "  {:<8} for comparison: SSH dial-stdio / local = {:.2}x   OpenSSH -L forward / local = {:.2}x   socat relay / local = {:.2}x   TLS / local = {:.2}x",
            "",
            dial / local,
            openssh / local,
            relay / local,
            tls / local,
        );
    }
}

struct Forward {
    child: std::process::Child,
    socket: PathBuf,
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
