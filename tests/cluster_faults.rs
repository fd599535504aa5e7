//! Cluster mode with every part in a container on a private Docker network of its own:
//! three NATS servers (a JetStream cluster routed by container name, from an image built
//! here from the `nats-server` binary `scripts/testinfra` installs) and three engines
//! from `capstan:test` (`serve --cluster` naming the three servers), each with a plugin
//! installed through the CLI inside its container. The tests
//!
//! - fire a cron trigger every second for a minute: each fire runs once in the cluster;
//! - give every engine the same SSH devices on the private sshd (which listens on
//!   loopback only: the engines reach it through [`SshRelay`], a TCP relay this process
//!   runs on the network's gateway) and show one owner per device, runs elsewhere
//!   reaching a device through its owner, and a `docker kill`ed owner taken over within
//!   the lease time;
//! - kill a NATS server, partition an engine from the network and kill an engine
//!   mid-deliveries, and read each node's history through its API (the CLI inside the
//!   container) to show that every delivery answered 202 runs once;
//! - cut off the owner of the machine's Docker daemon (`local`, its socket mounted into
//!   each engine) and show it stops acting on it while another engine takes it over.
//!
//! Every container, the network and the relay are removed or stopped when a test ends,
//! however it ends; the tests take turns with the other cluster tests (three engines and
//! three servers on two cores).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::Timelike;
use serde_json::Value;
use sha2::Digest;

use crate::cluster::{CRON_MANIFEST, MANIFEST, agreed, cluster_name, deliver_to, is_final, turn};
use crate::deploy::{docker_host, run_for};
use crate::triggers::{eventually, generated_secret};
use crate::util::plugin::{manifest, wasm};
use crate::util::{Infra, assert_success, http, stdout};

/// Built by `scripts/image build` (scripts/test runs it before the tests).
const CAPSTAN_IMAGE: &str = "capstan:test";
/// Built by [`nats_image`] from infra.env's `NATS_SERVER`.
const NATS_IMAGE: &str = "capstan-test/nats:latest";
/// On the NATS image and on every container and network these tests create, so what a
/// killed test run left behind can be found (`docker ps -a --filter label=…`).
const LABEL: &str = "org.capstan.test.cluster-faults";
/// The sha256 of the `nats-server` binary the NATS image holds.
const HASH_LABEL: &str = "org.capstan.test.nats.hash";
/// The API port inside an engine container (the image's `CAPSTAN_API_LISTEN`).
const API_PORT: u16 = 7878;
/// How long one docker command may take before the test fails.
const DOCKER_LIMIT: Duration = Duration::from_secs(60);
/// How long a sender keeps retrying one delivery (same delivery id) until it gets a 202.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// `docker ARGS` on the test daemon, bounded by [`DOCKER_LIMIT`].
fn docker(args: &[&str]) -> Output {
    let mut cmd = Command::new("docker");
    cmd.env("DOCKER_HOST", docker_host()).args(args);
    run_for(cmd, DOCKER_LIMIT)
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert_success(&out, &format!("docker {}", args.join(" ")));
    stdout(&out).trim().to_string()
}

/// The NATS image: `FROM scratch` with the static `nats-server` binary the test
/// infrastructure installed. Built once, and again only when the binary changes (its
/// hash is in [`HASH_LABEL`]); nothing is pulled.
pub(crate) fn nats_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let binary = Infra::get().fact("NATS_SERVER").unwrap_or_else(|| {
            panic!(
                "infra.env has no NATS_SERVER: run `scripts/testinfra up` (it installs nats-server)"
            )
        });
        let bytes = std::fs::read(binary)
            .unwrap_or_else(|e| panic!("cannot read the nats-server binary {binary}: {e}"));
        let hash = hex::encode(sha2::Sha256::digest(&bytes));
        let format = format!("{{{{index .Config.Labels \"{HASH_LABEL}\"}}}}");
        let have = docker(&["image", "inspect", "--format", &format, NATS_IMAGE]);
        if have.status.success() && stdout(&have).trim() == hash {
            return;
        }
        let ctx = tempfile::tempdir().unwrap();
        std::fs::write(ctx.path().join("nats-server"), &bytes).unwrap();
        std::fs::set_permissions(
            ctx.path().join("nats-server"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(
            ctx.path().join("Dockerfile"),
            "FROM scratch\nCOPY nats-server /nats-server\nENTRYPOINT [\"/nats-server\"]\n",
        )
        .unwrap();
        docker_ok(&[
            "build",
            "--quiet",
            "--label",
            &format!("{LABEL}=1"),
            "--label",
            &format!("{HASH_LABEL}={hash}"),
            "--tag",
            NATS_IMAGE,
            ctx.path().to_str().unwrap(),
        ]);
    });
    NATS_IMAGE
}

fn require_capstan_image() {
    let out = docker(&["image", "inspect", "--format", "{{.Id}}", CAPSTAN_IMAGE]);
    assert!(
        out.status.success(),
        "image {CAPSTAN_IMAGE} is missing: run `scripts/image build` (scripts/test does)"
    );
}

/// Three NATS containers and three engine containers on a network of their own, all
/// named after it (`NET-nats1`, `NET-n1`, ...); removed on drop.
struct Cluster {
    net: String,
    /// Every container created, removed on drop.
    containers: Vec<String>,
    /// Each engine's hook secret (its own vault generated it at install); none when the
    /// manifest has no hook.
    secrets: Vec<String>,
    /// Each engine's `IP:PORT` on the network; `None` while it is killed or cut off.
    addrs: Vec<Option<String>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.containers.is_empty() {
            let mut args = vec!["rm", "--force", "--volumes"];
            args.extend(self.containers.iter().map(String::as_str));
            let _ = docker(&args);
        }
        let _ = docker(&["network", "rm", &self.net]);
    }
}

impl Cluster {
    /// Starts the cluster, each engine with `env` and with `manifest` installed.
    fn start(manifest: &str, env: &[(&str, &str)]) -> Cluster {
        Cluster::start_with(manifest, env, &[])
    }

    /// [`Cluster::start`], each engine container also given the `docker run` options
    /// `opts` (a volume, a group).
    fn start_with(manifest: &str, env: &[(&str, &str)], opts: &[String]) -> Cluster {
        require_capstan_image();
        let nats = nats_image();
        let mut c = Cluster {
            net: format!("capstan-{}", cluster_name()),
            containers: Vec::new(),
            secrets: Vec::new(),
            addrs: vec![None; 3],
        };
        docker_ok(&[
            "network",
            "create",
            "--label",
            &format!("{LABEL}=1"),
            &c.net,
        ]);
        let net = c.net.clone();
        let routes = (1..=3)
            .map(|i| format!("nats://{}:6222", c.nats(i)))
            .collect::<Vec<_>>()
            .join(",");
        for i in 1..=3 {
            let name = c.nats(i);
            c.run(
                &name,
                &[],
                nats,
                &[
                    "--jetstream",
                    "--store_dir",
                    "/js",
                    "--server_name",
                    &name,
                    "--cluster_name",
                    &net,
                    "--cluster",
                    "nats://0.0.0.0:6222",
                    "--routes",
                    &routes,
                    "--http_port",
                    "8222",
                ],
            );
        }
        // Engines create replicated streams at start: first the JetStream meta group with
        // its three peers and a leader, as each server's monitoring endpoint tells.
        let started = Instant::now();
        eventually(
            60,
            "the three NATS servers formed a JetStream meta group",
            || (1..=3).all(|i| c.nats_meta_formed(i)),
        );
        eprintln!("NATS cluster up in {:.1}s", started.elapsed().as_secs_f64());

        let urls = (1..=3)
            .map(|i| format!("nats://{}:4222", c.nats(i)))
            .collect::<Vec<_>>()
            .join(",");
        let cluster = format!("CAPSTAN_CLUSTER_NAME={}", cluster_name());
        for i in 0..3 {
            let mut vars = vec![
                format!("CAPSTAN_CLUSTER_NODE_NAME=n{}", i + 1),
                cluster.clone(),
                // Each engine has a vault and key of its own and the plugin installed on
                // it: configuration is not shared here (tests/cluster_state.rs shares it).
                "CAPSTAN_CLUSTER_SHARED_STATE=false".to_string(),
            ];
            vars.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
            let name = c.node(i);
            c.run_with(
                &name,
                opts,
                &vars,
                CAPSTAN_IMAGE,
                &["serve", "--cluster", &urls],
            );
        }
        for i in 0..3 {
            c.wait_serving(i, 1);
            let installed = c.install_component(i, "trivial", manifest);
            if manifest.contains("[[triggers.webhook]]") {
                c.secrets.push(generated_secret(&installed, "gh"));
            }
        }
        eprintln!("cluster up in {:.1}s", started.elapsed().as_secs_f64());
        c
    }

    /// `docker run --detach` of `image` with `args` as container `name` on the network,
    /// labelled, with `env` (`KEY=VALUE`); removed on drop.
    fn run(&mut self, name: &str, env: &[String], image: &str, args: &[&str]) {
        self.run_with(name, &[], env, image, args);
    }

    /// [`Cluster::run`] with more `docker run` options.
    fn run_with(
        &mut self,
        name: &str,
        opts: &[String],
        env: &[String],
        image: &str,
        args: &[&str],
    ) {
        self.containers.push(name.to_string());
        let label = format!("{LABEL}=1");
        let mut all = vec![
            "run",
            "--detach",
            "--name",
            name,
            "--label",
            &label,
            "--network",
            &self.net,
        ];
        for e in env {
            all.extend(["--env", e.as_str()]);
        }
        all.extend(opts.iter().map(String::as_str));
        all.push(image);
        all.extend(args);
        docker_ok(&all);
    }

    fn nats(&self, i: usize) -> String {
        format!("{}-nats{i}", self.net)
    }

    /// Whether NATS server `i` sees a JetStream meta group of three with a leader
    /// (`/jsz` on its monitoring port).
    fn nats_meta_formed(&self, i: usize) -> bool {
        let ip = self.ip(&self.nats(i));
        let Ok(addr) = format!("{ip}:8222").parse() else {
            return false;
        };
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err() {
            return false;
        }
        let (status, body) = http(&format!("{ip}:8222"), "GET", "/jsz", &[], b"");
        let jsz: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let meta = &jsz["meta_cluster"];
        status == 200
            && meta["cluster_size"] == 3
            && meta["leader"].as_str().is_some_and(|l| !l.is_empty())
    }

    /// Engine `i` (0-based; its cluster node name is `n{i+1}`).
    fn node(&self, i: usize) -> String {
        format!("{}-n{}", self.net, i + 1)
    }

    fn logs(&self, container: &str) -> String {
        let out = docker(&["logs", container]);
        format!("{}{}", stdout(&out), crate::util::stderr(&out))
    }

    /// Waits until engine `i` has said `times` times that it joined, then notes its
    /// address on the network.
    fn wait_serving(&mut self, i: usize, times: usize) {
        let name = self.node(i);
        let joined = format!("cluster node n{} on NATS", i + 1);
        let mut logs = String::new();
        let until = Instant::now() + Duration::from_secs(60);
        while logs.matches(&joined).count() < times {
            let state = docker_ok(&["inspect", "--format", "{{.State.Running}}", &name]);
            if state != "true" {
                panic!("engine {name} exited:\n{}", self.logs(&name));
            }
            assert!(
                Instant::now() < until,
                "engine {name} did not join the cluster within 60 s:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(200));
            logs = self.logs(&name);
        }
        self.refresh_addr(i);
    }

    /// A container's address on the network ("" when it is not on it).
    fn ip(&self, container: &str) -> String {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.net
        );
        docker_ok(&["inspect", "--format", &format, container])
    }

    fn refresh_addr(&mut self, i: usize) {
        let ip = self.ip(&self.node(i));
        assert!(!ip.is_empty(), "engine {} has no address", self.node(i));
        self.addrs[i] = Some(format!("{ip}:{API_PORT}"));
    }

    /// Installs test plugin `component` with `manifest` on engine `i` (the CLI inside
    /// the container): what the install printed.
    fn install_component(&self, i: usize, component: &str, manifest: &str) -> String {
        let name = self.node(i);
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(wasm(component), dir.path().join("plugin.wasm")).unwrap();
        std::fs::write(dir.path().join("plugin.toml"), manifest).unwrap();
        for f in ["plugin.wasm", "plugin.toml"] {
            std::fs::set_permissions(
                dir.path().join(f),
                std::os::unix::fs::PermissionsExt::from_mode(0o644),
            )
            .unwrap();
        }
        docker_ok(&["exec", &name, "mkdir", "-p", "/tmp/plugin"]);
        for f in ["plugin.wasm", "plugin.toml"] {
            let src = dir.path().join(f);
            docker_ok(&[
                "cp",
                src.to_str().unwrap(),
                &format!("{name}:/tmp/plugin/{f}"),
            ]);
        }
        docker_ok(&[
            "exec",
            &name,
            "capstan",
            "plugin",
            "install",
            "/tmp/plugin/plugin.wasm",
        ])
    }

    /// A signed delivery to engine `i`: the status. A refused connection reads as 0.
    fn deliver_once(&self, i: usize, delivery: &str, body: &[u8]) -> u16 {
        let addr = self.addrs[i]
            .as_deref()
            .unwrap_or_else(|| panic!("engine n{} is down or cut off", i + 1));
        if std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))
            .is_err()
        {
            return 0;
        }
        let secret = self.secrets.get(i).expect("the manifest has hook gh");
        deliver_to(addr, secret, delivery, body)
    }

    /// Delivers as a sender that retries: the same delivery id to engine `i` until it
    /// answers 202, for up to [`RETRY_FOR`]. The number of attempts refused.
    fn deliver(&self, i: usize, delivery: &str, body: &[u8]) -> usize {
        let until = Instant::now() + RETRY_FOR;
        let mut refused = Vec::new();
        loop {
            let status = self.deliver_once(i, delivery, body);
            if status == 202 {
                return refused.len();
            }
            refused.push(status);
            assert!(
                Instant::now() < until,
                "delivery {delivery} to n{} not accepted within {RETRY_FOR:?}: {refused:?}",
                i + 1
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// All the runs of `plugin` engine `i` lists (paged by the CLI); empty while the
    /// engine does not answer.
    fn runs_all(&self, i: usize, plugin: &str) -> Vec<Value> {
        let out = docker(&[
            "exec",
            &self.node(i),
            "capstan",
            "runs",
            "--json",
            "--limit",
            "100000",
            "--plugin",
            plugin,
        ]);
        match serde_json::from_str(&stdout(&out)) {
            Ok(Value::Array(v)) if out.status.success() => v,
            _ => Vec::new(),
        }
    }

    /// `capstan cluster status --json` on engine `i`, or `Null` when it fails: while NATS
    /// elects new leaders after a server died, reading the node bucket may time out
    /// (the API answers 503), so callers poll.
    fn status(&self, i: usize) -> Value {
        let out = docker(&[
            "exec",
            &self.node(i),
            "capstan",
            "cluster",
            "status",
            "--json",
        ]);
        if !out.status.success() {
            return Value::Null;
        }
        serde_json::from_str(&stdout(&out))
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)))
    }

    /// The NATS server engine `i` is connected to (`None` while its status fails).
    fn nats_server_of(&self, i: usize) -> Option<String> {
        self.status(i)["nats_server"]
            .as_str()
            .and_then(|s| s.split_whitespace().next())
            .map(str::to_string)
    }

    /// The names of the nodes engine `i` sees alive.
    fn alive_seen_by(&self, i: usize) -> BTreeSet<String> {
        self.status(i)["nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter(|n| n["alive"] == true)
                    .filter_map(|n| n["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Device → owner, as engine `i`'s cluster status lists the leases (empty while the
    /// status fails).
    fn owners(&self, i: usize) -> BTreeMap<String, String> {
        self.status(i)["leases"]
            .as_array()
            .map(|leases| {
                leases
                    .iter()
                    .filter_map(|l| {
                        Some((
                            l["device"].as_str()?.to_string(),
                            l["owner"].as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The network's gateway: the address this host has on it, which the engines reach.
    fn gateway(&self) -> String {
        let gw = docker_ok(&[
            "network",
            "inspect",
            &self.net,
            "--format",
            "{{(index .IPAM.Config 0).Gateway}}",
        ]);
        assert!(!gw.is_empty(), "network {} has no gateway", self.net);
        gw
    }

    /// Adds SSH devices `names` to engine `i` (the CLI inside the container): the test
    /// sshd through `relay`, as user `SSH_USER_KEY` with the test ed25519 key, the
    /// sshd's real host key pinned. The key files are copied in and stored in the
    /// engine's vault by `device add`.
    fn add_ssh_devices(&self, i: usize, relay: std::net::SocketAddr, names: &[&str]) {
        let node = self.node(i);
        let infra = Infra::get();
        docker_ok(&[
            "cp",
            infra.var("SSH_KEY_ED25519"),
            &format!("{node}:/tmp/k"),
        ]);
        docker_ok(&[
            "cp",
            infra.var("SSH_HOST_KEY_PUB"),
            &format!("{node}:/tmp/hk.pub"),
        ]);
        // `docker cp` writes them as root; the CLI runs as the image's user.
        docker_ok(&[
            "exec",
            "--user",
            "0",
            &node,
            "chown",
            "capstan:capstan",
            "/tmp/k",
            "/tmp/hk.pub",
        ]);
        docker_ok(&["exec", &node, "chmod", "600", "/tmp/k"]);
        let (host, port) = (relay.ip().to_string(), relay.port().to_string());
        for name in names {
            docker_ok(&[
                "exec",
                &node,
                "capstan",
                "device",
                "add",
                name,
                "--kind",
                "ssh",
                "--host",
                &host,
                "--port",
                &port,
                "--user",
                infra.var("SSH_USER_KEY"),
                "--ssh-key-file",
                "/tmp/k",
                "--host-key-file",
                "/tmp/hk.pub",
            ]);
        }
    }

    /// `docker stop`s engines `nodes` (SIGTERM, as a clean shutdown) and checks that
    /// each exited 0.
    fn stop_cleanly(&mut self, nodes: &[usize]) {
        let names: Vec<String> = nodes.iter().map(|i| self.node(*i)).collect();
        let mut args = vec!["stop", "--time", "30"];
        args.extend(names.iter().map(String::as_str));
        docker_ok(&args);
        for (i, name) in nodes.iter().zip(&names) {
            self.addrs[*i] = None;
            let code = docker_ok(&["inspect", "--format", "{{.State.ExitCode}}", name]);
            assert_eq!(
                code,
                "0",
                "engine {name} did not stop cleanly:\n{}",
                self.logs(name)
            );
        }
    }

    /// The runs of `plugin` as every engine lists them, by run id, once the three list
    /// the same records (the same JSON), all ended, and `done` holds for them (up to
    /// `secs`).
    fn agreed_runs(
        &self,
        plugin: &str,
        secs: u64,
        what: &str,
        done: impl Fn(&BTreeMap<String, Value>) -> bool,
    ) -> BTreeMap<String, Value> {
        let names: Vec<String> = (1..=3).map(|i| format!("n{i}")).collect();
        agreed(&names, |i| self.runs_all(i, plugin), secs, what, done)
    }

    /// Waits until every engine lists the same records (the cluster's history), none
    /// still queued or running, and every accepted delivery among them (`ok_only`: ended
    /// ok): those records, each with the node that ran it (`node`).
    fn settled(&self, accepted: &BTreeSet<String>, ok_only: bool) -> Vec<(String, Value)> {
        let mut records = Vec::new();
        eventually(
            90,
            "every engine lists every accepted delivery, ended",
            || {
                let lists: Vec<BTreeMap<String, Value>> = (0..3)
                    .map(|i| {
                        self.runs_all(i, "clustered")
                            .into_iter()
                            .map(|r| (r["id"].as_str().unwrap_or_default().to_string(), r))
                            .collect()
                    })
                    .collect();
                let agree = lists.iter().all(|l| *l == lists[0]);
                records = lists[0]
                    .values()
                    .map(|r| (r["node"].as_str().unwrap_or("?").to_string(), r.clone()))
                    .collect();
                let done: BTreeSet<String> = records
                    .iter()
                    .filter(|(_, r)| !ok_only || r["status"] == "ok")
                    .filter_map(|(_, r)| r["trigger"]["delivery"].as_str().map(str::to_string))
                    .collect();
                agree && records.iter().all(|(_, r)| is_final(r)) && accepted.is_subset(&done)
            },
        );
        records
    }
}

/// A plain TCP relay from an address the engine containers reach (their network's
/// gateway, an address of this host) to the private sshd, which listens on loopback
/// only: each accepted connection is forwarded byte for byte to `to`, both ways, so the
/// engines speak SSH to the real sshd (its host key, its authentication; connections
/// arrive from 127.0.0.1 as it expects). Stopped on drop: the listener closes and every
/// relayed connection is shut down.
struct SshRelay {
    addr: std::net::SocketAddr,
    stopping: Arc<AtomicBool>,
    /// Both ends of every relayed connection.
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    /// The threads copying bytes, two per connection.
    pumps: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Connections relayed so far.
    relayed: Arc<AtomicUsize>,
    acceptor: Option<JoinHandle<()>>,
}

impl SshRelay {
    /// Listens on a free port of `host` and relays to `to`.
    fn start(host: &str, to: std::net::SocketAddr) -> SshRelay {
        let listener = TcpListener::bind((host, 0))
            .unwrap_or_else(|e| panic!("cannot listen on {host} for the SSH relay: {e}"));
        let addr = listener.local_addr().unwrap();
        let stopping = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let pumps = Arc::new(Mutex::new(Vec::new()));
        let relayed = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let (stopping, sockets, pumps, relayed) = (
                stopping.clone(),
                sockets.clone(),
                pumps.clone(),
                relayed.clone(),
            );
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(inbound) = conn else { continue };
                    let outbound = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
                        Ok(s) => s,
                        Err(e) => {
                            eprintln!("SSH relay: cannot reach sshd at {to}: {e}");
                            continue;
                        }
                    };
                    relayed.fetch_add(1, Ordering::SeqCst);
                    let mut sockets = sockets.lock().unwrap();
                    let mut pumps = pumps.lock().unwrap();
                    for (from, into) in [(&inbound, &outbound), (&outbound, &inbound)] {
                        let (Ok(mut from), Ok(mut into)) = (from.try_clone(), into.try_clone())
                        else {
                            continue;
                        };
                        pumps.push(std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut into);
                            // Pass the end of one direction on; the other ends by itself.
                            let _ = into.shutdown(std::net::Shutdown::Write);
                        }));
                    }
                    sockets.extend([inbound, outbound]);
                }
            })
        };
        SshRelay {
            addr,
            stopping,
            sockets,
            pumps,
            relayed,
            acceptor: Some(acceptor),
        }
    }

    fn relayed(&self) -> usize {
        self.relayed.load(Ordering::SeqCst)
    }
}

impl Drop for SshRelay {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // A connection of our own wakes the acceptor, which sees it is stopping.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let pumps: Vec<_> = self.pumps.lock().unwrap().drain(..).collect();
        for p in pumps {
            let _ = p.join();
        }
    }
}

/// The ok records of each delivery (or cron fire) in one engine's listing (which lists
/// every run of the cluster): the keys recorded ok more than once, and the set of keys
/// recorded ok.
fn ok_once(
    records: &[(String, Value)],
    key: &str,
) -> (Vec<(String, Vec<String>)>, BTreeSet<String>) {
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (node, r) in records {
        if r["status"] != "ok" {
            continue;
        }
        if let Some(k) = r["trigger"][key].as_str() {
            by.entry(k.to_string()).or_default().push(node.clone());
        }
    }
    let twice = by
        .iter()
        .filter(|(_, n)| n.len() > 1)
        .map(|(k, n)| (k.clone(), n.clone()))
        .collect();
    (twice, by.into_keys().collect())
}

/// Checks that each accepted delivery ran ok exactly once, and no other ran.
fn assert_each_ran_once(records: &[(String, Value)], accepted: &BTreeSet<String>) {
    let (twice, ran) = ok_once(records, "delivery");
    assert!(
        twice.is_empty(),
        "deliveries run ok more than once: {twice:?}"
    );
    assert_eq!(
        &ran, accepted,
        "the deliveries run ok are the accepted ones"
    );
    for (node, r) in records {
        assert!(
            matches!(r["status"].as_str(), Some("ok" | "interrupted")),
            "a run on {node} ended neither ok nor interrupted: {r}"
        );
    }
}

fn per_node(records: &[(String, Value)]) -> [usize; 3] {
    ["n1", "n2", "n3"].map(|n| records.iter().filter(|(x, _)| x == n).count())
}

#[test]
fn a_nats_container_killed_mid_deliveries_loses_no_accepted_delivery_and_runs_none_twice() {
    let _turn = turn();
    let c = Cluster::start(MANIFEST, &[]);
    // Kill the server n1 is connected to, so at least one engine has to reconnect.
    let server = c
        .nats_server_of(0)
        .expect("n1's status names its NATS server");
    assert!(server.starts_with(&c.net), "n1 is on {server}");
    // At least N deliveries, and on until n1 has moved to another server.
    const N: usize = 240;
    const KILL_AT: usize = 60;
    let mut accepted = BTreeSet::new();
    let mut refused = 0;
    let started = Instant::now();
    let mut moved = false;
    let mut i = 0;
    while i < N || !moved {
        if i == KILL_AT {
            docker_ok(&["kill", &server]);
        }
        if i > KILL_AT && i % 30 == 0 && !moved {
            moved = c.nats_server_of(0).is_some_and(|s| s != server);
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "n1 still on the killed {server} after {i} deliveries"
            );
        }
        let id = format!("nk-{i}");
        refused += c.deliver(i % 3, &id, format!("{{\"n\":{i}}}").as_bytes());
        accepted.insert(id);
        i += 1;
    }
    let took = started.elapsed();
    let records = c.settled(&accepted, true);
    assert_each_ran_once(&records, &accepted);
    eventually(30, "n2 reports a live NATS server", || {
        c.nats_server_of(1).is_some_and(|s| s != server)
    });
    eprintln!(
        "{i} deliveries in {:.1}s with {server} killed after {KILL_AT}: {refused} attempt(s) refused and retried; runs per node {:?}",
        took.as_secs_f64(),
        per_node(&records)
    );
}

#[test]
fn a_capstan_container_cut_off_by_a_partition_leaves_the_others_running_and_rejoins() {
    let _turn = turn();
    let manifest = format!("{MANIFEST}\n[[triggers.cron]]\nschedule = \"* * * * * *\"\n");
    let mut c = Cluster::start(&manifest, &[]);
    let mut accepted = BTreeSet::new();
    let mut deliver = |c: &Cluster, nodes: &[usize], prefix: &str, n: usize| {
        for i in 0..n {
            let id = format!("{prefix}-{i}");
            c.deliver(
                nodes[i % nodes.len()],
                &id,
                format!("{{\"n\":{i}}}").as_bytes(),
            );
            accepted.insert(id);
        }
    };
    deliver(&c, &[0, 1, 2], "before", 60);

    let n3 = c.node(2);
    docker_ok(&["network", "disconnect", &c.net, &n3]);
    c.addrs[2] = None;
    let cut = chrono::Utc::now();
    let cut_at = Instant::now();
    deliver(&c, &[0, 1], "cut", 120);
    eventually(30, "n1 and n2 see n3 not alive", || {
        let names: BTreeSet<String> = ["n1", "n2"].map(String::from).into();
        c.alive_seen_by(0) == names && c.alive_seen_by(1) == names
    });
    deliver(&c, &[0, 1], "cut-late", 30);
    let healed = chrono::Utc::now();
    eprintln!("n3 cut off for {:.1}s", cut_at.elapsed().as_secs_f64());

    docker_ok(&["network", "connect", &c.net, &n3]);
    c.refresh_addr(2);
    let all: BTreeSet<String> = ["n1", "n2", "n3"].map(String::from).into();
    eventually(30, "every node sees the three alive again", || {
        (0..3).all(|i| c.alive_seen_by(i) == all)
    });
    deliver(&c, &[0, 1, 2], "after", 30);

    let records = c.settled(&accepted, true);
    let hooks: Vec<_> = records
        .iter()
        .filter(|(_, r)| r["trigger"]["kind"] == "webhook")
        .cloned()
        .collect();
    assert_each_ran_once(&hooks, &accepted);
    let crons: Vec<_> = records
        .iter()
        .filter(|(_, r)| r["trigger"]["kind"] == "cron")
        .cloned()
        .collect();
    let (twice, fires) = ok_once(&crons, "scheduled_at");
    assert!(
        twice.is_empty(),
        "cron fires run ok more than once: {twice:?}"
    );
    // Cron went on while n3 was away: the other two ran the fires of that time.
    let during: Vec<&(String, Value)> = crons
        .iter()
        .filter(|(_, r)| {
            r["trigger"]["scheduled_at"]
                .as_str()
                .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
                .is_some_and(|t| t > cut + chrono::Duration::seconds(1) && t < healed)
        })
        .collect();
    let span = (healed - cut).num_seconds();
    assert!(
        during.len() as i64 >= span / 2,
        "only {} cron runs in the {span} s n3 was cut off",
        during.len()
    );
    assert!(
        during.iter().all(|(n, _)| n != "n3"),
        "n3 ran a fire while cut off: {during:?}"
    );
    eprintln!(
        "{} deliveries, {} cron fires run; runs per node {:?}",
        accepted.len(),
        fires.len(),
        per_node(&records)
    );
}

#[test]
fn a_capstan_container_killed_mid_deliveries_and_started_again_runs_each_accepted_once() {
    let _turn = turn();
    // Runs of a fifth of a second, two at once per node, and a short ack deadline (kept
    // alive while a node holds a run), as in tests/cluster.rs.
    let env = [
        ("CAPSTAN_CLUSTER_ACK_WAIT", "3s"),
        ("CAPSTAN_RUNS_MAX_PER_PLUGIN", "2"),
    ];
    let mut c = Cluster::start(MANIFEST, &env);
    let n3 = c.node(2);
    let mut accepted = BTreeSet::new();
    let started = Instant::now();
    for i in 0..150 {
        match i {
            30 => {
                docker_ok(&["kill", &n3]);
                c.addrs[2] = None;
            }
            90 => {
                docker_ok(&["start", &n3]);
                c.wait_serving(2, 2);
            }
            _ => {}
        }
        let to = if c.addrs[2].is_some() { i % 3 } else { i % 2 };
        let id = format!("ck-{i}");
        c.deliver(to, &id, b"sleep:200");
        accepted.insert(id);
    }
    let took = started.elapsed();
    let records = c.settled(&accepted, true);
    assert_each_ran_once(&records, &accepted);
    for (node, r) in &records {
        if r["status"] == "interrupted" {
            assert_eq!(node, "n3", "only the killed node has interrupted runs: {r}");
        }
    }
    let alive = c.alive_seen_by(0);
    assert_eq!(alive.len(), 3, "n3 is back in the cluster: {alive:?}");
    eprintln!(
        "150 deliveries in {:.1}s, n3 killed after 30 and started after 90; runs per node {:?}",
        took.as_secs_f64(),
        per_node(&records)
    );
}

/// One signed delivery to hook `gh` at `addr` that never panics: the status and body,
/// or why no answer came (refused, reset, timed out).
fn try_deliver(
    addr: &str,
    secret: &str,
    delivery: &str,
    body: &[u8],
) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let sock = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| e.to_string())?;
    let sig = format!("sha256={}", crate::triggers::sign(secret, body));
    let req = format!(
        "POST /hooks/gh HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\nX-Hub-Signature-256: {sig}\r\nX-GitHub-Delivery: {delivery}\r\nContent-Type: application/json\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    s.write_all(body).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The load test: 10,000 signed deliveries with distinct ids from eight senders
/// spread over the three engines, n3 `docker kill`ed after 30 % of them were accepted
/// and `docker start`ed after 60 %. A sender whose delivery is refused or gets no
/// answer sends the same delivery id to another engine, for a bounded time. At the end
/// every delivery answered 202 has exactly one run record, under the run id its 202
/// answered (a duplicate answers the first acceptance's), ended ok, listed the same on
/// every engine.
#[test]
fn ten_thousand_deliveries_with_an_engine_killed_and_restarted_are_each_recorded_once() {
    use std::sync::RwLock;
    let _turn = turn();
    const N: usize = 10_000;
    const SENDERS: usize = 8;
    let env = [
        ("CAPSTAN_CLUSTER_ACK_WAIT", "3s"),
        ("CAPSTAN_RUNS_KEEP_PER_PLUGIN", "100000"),
        ("CAPSTAN_RUNS_MAX_QUEUED_PER_PLUGIN", "100000"),
    ];
    let mut c = Cluster::start(MANIFEST, &env);
    let addrs = Arc::new(RwLock::new(c.addrs.clone()));
    let secrets = Arc::new(c.secrets.clone());
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    // Delivery id → the run id its 202 answered.
    let answered = Arc::new(Mutex::new(BTreeMap::<String, String>::new()));
    let retried = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (addrs, secrets, next, done, answered, retried) = (
                addrs.clone(),
                secrets.clone(),
                next.clone(),
                done.clone(),
                answered.clone(),
                retried.clone(),
            );
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= N {
                        return;
                    }
                    let id = format!("big-{i}");
                    let body = format!("{{\"n\":{i}}}");
                    let until = Instant::now() + RETRY_FOR;
                    let mut node = i % 3;
                    let mut failures = Vec::new();
                    loop {
                        let addr = addrs.read().unwrap()[node].clone();
                        let answer = match addr {
                            Some(a) => try_deliver(&a, &secrets[node], &id, body.as_bytes()),
                            None => Err("down".into()),
                        };
                        match answer {
                            Ok((202, text)) => {
                                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                                let run = v["run_id"].as_str().unwrap_or_default().to_string();
                                assert!(!run.is_empty(), "202 without a run id: {text}");
                                answered.lock().unwrap().insert(id, run);
                                break;
                            }
                            other => failures.push(format!("n{}: {other:?}", node + 1)),
                        }
                        retried.fetch_add(1, Ordering::SeqCst);
                        assert!(
                            Instant::now() < until,
                            "delivery {id} not accepted within {RETRY_FOR:?}: {failures:?}"
                        );
                        node = (node + 1) % 3;
                        if failures.len() % 3 == 0 {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let n3 = c.node(2);
    let wait_for = |n: usize| {
        while done.load(Ordering::SeqCst) < n {
            assert!(
                started.elapsed() < Duration::from_secs(150),
                "only {} deliveries accepted in 150 s",
                done.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(N * 3 / 10);
    addrs.write().unwrap()[2] = None;
    docker_ok(&["kill", &n3]);
    c.addrs[2] = None;
    let killed_at = done.load(Ordering::SeqCst);
    wait_for(N * 6 / 10);
    docker_ok(&["start", &n3]);
    c.wait_serving(2, 2);
    addrs.write().unwrap()[2] = c.addrs[2].clone();
    let started_at = done.load(Ordering::SeqCst);
    for s in senders {
        s.join().expect("a sender failed");
    }
    let took = started.elapsed();
    let answered = answered.lock().unwrap().clone();
    assert_eq!(answered.len(), N, "every delivery was accepted");
    eprintln!(
        "{N} deliveries accepted in {:.1}s ({:.0}/s), {} attempt(s) retried; n3 killed after {killed_at}, started after {started_at}",
        took.as_secs_f64(),
        N as f64 / took.as_secs_f64(),
        retried.load(Ordering::SeqCst)
    );

    // Every engine lists one ok record per delivery, under its answered run id.
    let want: BTreeMap<String, String> = answered
        .iter()
        .map(|(d, run)| (run.clone(), d.clone()))
        .collect();
    assert_eq!(want.len(), N, "each delivery has a run id of its own");
    let mut lists = Vec::new();
    eventually(120, "every engine lists every run, ended ok", || {
        lists = (0..3)
            .map(|i| {
                c.runs_all(i, "clustered")
                    .into_iter()
                    .map(|r| (r["id"].as_str().unwrap_or_default().to_string(), r))
                    .collect::<BTreeMap<String, Value>>()
            })
            .collect::<Vec<_>>();
        lists.iter().all(|l| {
            l.len() == N
                && l.values().all(|r| r["status"] == "ok")
                && l.keys().all(|k| want.contains_key(k))
        })
    });
    for (i, l) in lists.iter().enumerate() {
        let recorded: BTreeMap<String, String> = l
            .iter()
            .map(|(id, r)| {
                (
                    id.clone(),
                    r["trigger"]["delivery"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        assert_eq!(
            recorded,
            want,
            "n{} lists each delivery once under its run id",
            i + 1
        );
    }
    let runs_again = lists[0]
        .values()
        .filter(|r| {
            r["logs"]["lines"].as_array().is_some_and(|l| {
                l.iter().any(|x| {
                    x["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("cluster: attempt "))
                })
            })
        })
        .count();
    let per: BTreeMap<&str, usize> = lists[0].values().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r["node"].as_str().unwrap_or("?")).or_default() += 1;
        m
    });
    eprintln!(
        "every engine lists the {N} runs once, ok; {runs_again} run again after the kill; runs per node {per:?}; all in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// The probe plugin as the partition test installs it: it may check devices and stop
/// the containers carrying `label`.
fn probe_manifest(label: &str) -> String {
    format!(
        "name = \"probe\"\nversion = \"0.0.1\"\n\
         [policy]\nCONTAINERS = 1\nINFO = 1\nPOST = 1\nALLOW_STOP = 1\ndevices = [\"*\"]\n\
         [policy.containers]\nlabels = [\"{label}\"]\n"
    )
}

/// A manual run of the probe on engine `i` with `calls` (the CLI inside the container
/// asks its own engine): the run's report.
fn probe_run(c: &Cluster, i: usize, calls: &Value) -> Value {
    let out = docker(&[
        "exec",
        &c.node(i),
        "capstan",
        "plugin",
        "run",
        "probe",
        "--input",
        &calls.to_string(),
        "--json",
    ]);
    assert_success(&out, &format!("plugin run probe on n{}", i + 1));
    serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)))
}

/// The results of a probe run's calls.
fn probe_results(report: &Value) -> Vec<Value> {
    let details = report["outcome"]["details"]
        .as_str()
        .unwrap_or_else(|| panic!("the run has no outcome: {report}"));
    match serde_json::from_str(details) {
        Ok(Value::Array(v)) => v,
        _ => panic!("the probe's details are not a list: {report}"),
    }
}

/// The owner of `local` as engine `i`'s cluster status lists it (`None` while there is
/// none or the status fails).
fn local_owner(c: &Cluster, i: usize) -> Option<String> {
    c.owners(i).remove("local")
}

#[test]
fn an_engine_cut_off_from_nats_stops_acting_on_its_device_another_takes_it_over_and_it_rejoins() {
    let _turn = turn();
    // Each engine has the default `local` device on the machine's daemon, through its
    // socket mounted in the container.
    let socket = Infra::get().var("DOCKER_SOCKET");
    let gid = std::os::unix::fs::MetadataExt::gid(
        &std::fs::metadata(socket).unwrap_or_else(|e| panic!("the Docker socket {socket}: {e}")),
    );
    let opts = [
        "--volume".to_string(),
        format!("{socket}:/var/run/docker.sock"),
        "--group-add".to_string(),
        gid.to_string(),
    ];
    let lease = 6;
    let mut c = Cluster::start_with(
        MANIFEST,
        &[("CAPSTAN_CLUSTER_LEASE", &format!("{lease}s"))],
        &opts,
    );
    let label = format!("{LABEL}.partition={}", c.net);
    for i in 0..3 {
        c.install_component(i, "probe", &probe_manifest(&label));
    }
    // A container the cut-off engine will try to stop.
    let target = format!("{}-target", c.net);
    c.run_with(
        &target,
        &["--label".to_string(), label.clone()],
        &[],
        Infra::get().var("TEST_IMAGE"),
        &[],
    );
    let mut owner = String::new();
    eventually(30, "the three engines agree on local's owner", || {
        owner = local_owner(&c, 0).unwrap_or_default();
        !owner.is_empty() && (1..3).all(|i| local_owner(&c, i).as_deref() == Some(&owner))
    });
    let cut: usize = owner
        .strip_prefix('n')
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("owner {owner}"))
        - 1;
    let others: Vec<usize> = (0..3).filter(|i| *i != cut).collect();

    // The owner is cut off: within the lease time (and the renewals a claim waits for)
    // another node owns local, as the connected nodes' status says.
    let cut_name = c.node(cut);
    docker_ok(&["network", "disconnect", &c.net, &cut_name]);
    c.addrs[cut] = None;
    let cut_at = Instant::now();
    let mut next = String::new();
    eventually(40, "a connected node owns local", || {
        next = local_owner(&c, others[0]).unwrap_or_default();
        !next.is_empty() && next != owner
    });
    let took = cut_at.elapsed();
    assert!(
        took <= Duration::from_secs(lease * 3 + 5),
        "takeover took {took:?} with a {lease}s lease"
    );
    eventually(20, "both connected nodes name the new owner", || {
        local_owner(&c, others[1]).as_deref() == Some(&next)
    });

    // A manual run on the cut-off engine that calls the device fails with the fencing
    // error, and the container it tried to stop still runs.
    let report = probe_run(
        &c,
        cut,
        &serde_json::json!([{"op": "stop", "device": "local", "container": target}]),
    );
    let results = probe_results(&report);
    let error = results[0]["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.starts_with("unreachable:")
            && (error.contains("cannot reach the cluster to find its owner")
                || error.contains("does not own it now")),
        "{results:?}"
    );
    assert_eq!(
        docker_ok(&["inspect", "--format", "{{.State.Running}}", &target]),
        "true",
        "the cut-off engine stopped the container"
    );
    let run_id = report["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("the run has no id: {report}"))
        .to_string();

    // Reconnected: it rejoins, every node names one and the same owner, and the manual
    // run is recorded once (on the node asked).
    docker_ok(&["network", "connect", &c.net, &cut_name]);
    c.refresh_addr(cut);
    let all: BTreeSet<String> = ["n1", "n2", "n3"].map(String::from).into();
    eventually(30, "every node sees the three alive again", || {
        (0..3).all(|i| c.alive_seen_by(i) == all)
    });
    let mut agreed = String::new();
    eventually(30, "the three engines agree on one owner of local", || {
        agreed = local_owner(&c, 0).unwrap_or_default();
        !agreed.is_empty() && (1..3).all(|i| local_owner(&c, i).as_deref() == Some(&agreed))
    });
    let listed: Vec<usize> = (0..3)
        .map(|i| {
            c.runs_all(i, "probe")
                .iter()
                .filter(|r| r["id"] == run_id.as_str())
                .count()
        })
        .collect();
    assert_eq!(
        listed[cut], 1,
        "the manual run on the node asked: {listed:?}"
    );
    assert!(listed.iter().all(|n| *n <= 1), "recorded twice: {listed:?}");
    // The rejoined engine reaches the device again (itself or through the owner).
    let mut results = Vec::new();
    eventually(20, "the rejoined engine reaches local", || {
        results = probe_results(&probe_run(
            &c,
            cut,
            &serde_json::json!([{"op": "check", "device": "local"}]),
        ));
        results[0].get("ok").is_some()
    });
    let total = cut_at.elapsed();
    assert!(
        total < Duration::from_secs(90),
        "the partition test took {total:?}"
    );
    eprintln!(
        "{owner} cut off: local taken over by {next} in {:.1}s; its manual run got \"{error}\"; after the rejoin {agreed} owns it; {:.1}s from the cut to the end",
        took.as_secs_f64(),
        total.as_secs_f64()
    );
}

/// The cron scenario: a trigger firing every second on the three engines, for a
/// minute. Every fire while the three ran has exactly one run (one run id), ended ok,
/// naming the node that ran it, and every engine lists the same records.
#[test]
fn each_cron_fire_runs_once_across_three_nodes() {
    let _turn = turn();
    let mut c = Cluster::start(CRON_MANIFEST, &[]);
    let all_up = chrono::Utc::now();
    // The window: a fire every second for a minute.
    std::thread::sleep(Duration::from_secs(60));
    let until = chrono::Utc::now();
    // Every engine lists the same runs (the cluster's history), the fires so far ended.
    let listed = c.agreed_runs("ticker", 30, "every engine lists the fires", |m| {
        m.values().any(|r| {
            r["trigger"]["scheduled_at"]
                .as_str()
                .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
                .is_some_and(|t| t >= until - chrono::Duration::seconds(1))
        })
    });
    c.stop_cleanly(&[0, 1, 2]);
    let records: Vec<(String, Value)> = listed.into_iter().collect();

    // One run id per fire.
    let mut by_fire: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (id, r) in &records {
        assert_eq!(r["trigger"]["kind"], "cron", "{r}");
        assert!(
            r["node"].as_str().is_some(),
            "the record names its node: {r}"
        );
        let at = r["trigger"]["scheduled_at"].as_str().unwrap().to_string();
        by_fire.entry(at).or_default().push(id);
    }
    let twice: Vec<_> = by_fire.iter().filter(|(_, n)| n.len() > 1).collect();
    assert!(twice.is_empty(), "fires run more than once: {twice:?}");
    // Every second while all three ran has its one run.
    let first = all_up + chrono::Duration::seconds(1);
    let last = until - chrono::Duration::seconds(1);
    let mut t = first.with_nanosecond(0).unwrap() + chrono::Duration::seconds(1);
    let mut missing = Vec::new();
    let mut seen = 0;
    while t <= last {
        let key = t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let found = by_fire
            .keys()
            .any(|k| k.parse::<chrono::DateTime<chrono::Utc>>().ok() == Some(t));
        if found {
            seen += 1;
        } else {
            missing.push(key);
        }
        t += chrono::Duration::seconds(1);
    }
    assert!(
        missing.is_empty(),
        "fires with no run: {missing:?} (runs: {by_fire:?})"
    );
    assert!(seen >= 57, "only {seen} fires in a 60 s window");
    assert!(
        records.iter().all(|(_, r)| r["status"] == "ok"),
        "every fire's run ended ok: {records:?}"
    );
    let per: BTreeMap<&str, usize> = records.iter().fold(BTreeMap::new(), |mut m, (_, r)| {
        *m.entry(r["node"].as_str().unwrap_or("?")).or_default() += 1;
        m
    });
    eprintln!(
        "{seen} fires in the window, {} runs listed alike on the three engines, one per fire, all ok; runs per node {per:?}",
        records.len()
    );
}

/// The lease time the device test runs with (renewed every 2 s).
const LEASE_SECS: u64 = 6;

/// The probe plugin may check and list containers on every device.
const PROBE_POLICY: &str = "[policy]\nCONTAINERS = 1\nINFO = 1\ndevices = [\"*\"]\n";

/// The calls that reach a device: a check (ping and version) and a container list.
fn reach(device: &str) -> Value {
    serde_json::json!([
        {"op": "check", "device": device},
        {"op": "list-containers", "device": device},
    ])
}

fn all_ok(results: &[Value]) -> bool {
    results.len() == 2 && results.iter().all(|r| r.get("ok").is_some())
}

/// The engine index of node `name` (`n1` is 0).
fn index_of(name: &str) -> usize {
    name.strip_prefix('n')
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| (1..=3).contains(n))
        .unwrap_or_else(|| panic!("no node {name}"))
        - 1
}

/// The device scenario with the engines in containers: the same SSH devices on
/// each engine (the private sshd, reached through [`SshRelay`] on the network's gateway,
/// its host key pinned) and the probe plugin. Each device gets one owner, spread over the
/// engines, the same on each; a run on an engine that does not own a device reaches it
/// through the owner; the owner is `docker kill`ed and another engine owns the device
/// within the lease time and its renewals, and a run through the third engine reaches
/// it.
#[test]
fn each_device_has_one_owner_runs_elsewhere_reach_it_through_the_owner_and_a_killed_owner_is_taken_over()
 {
    let _turn = turn();
    let devices = ["ssh-a", "ssh-b", "ssh-c", "ssh-d", "ssh-e", "ssh-f"];
    let mut c = Cluster::start(
        MANIFEST,
        &[("CAPSTAN_CLUSTER_LEASE", &format!("{LEASE_SECS}s"))],
    );
    let infra = Infra::get();
    let sshd: std::net::SocketAddr = format!("127.0.0.1:{}", infra.var("SSH_PORT"))
        .parse()
        .unwrap();
    let relay = SshRelay::start(&c.gateway(), sshd);
    for i in 0..3 {
        c.add_ssh_devices(i, relay.addr, &devices);
        c.install_component(i, "probe", &manifest("probe", PROBE_POLICY));
    }

    // Every device gets an owner, and (once the three have been alive a lease time)
    // they spread over the nodes; every node sees the same owners. Each engine also has
    // the default `local` device (no daemon behind it here: no socket is mounted).
    let want: BTreeSet<String> = devices
        .iter()
        .chain(&["local"])
        .map(|d| d.to_string())
        .collect();
    let mut seen = BTreeMap::new();
    let mut last = BTreeMap::new();
    eventually(45, "every device owned, spread over the nodes", || {
        seen = c.owners(0);
        if seen != last {
            eprintln!("owners: {seen:?}");
            last = seen.clone();
        }
        let spread: BTreeSet<&String> = seen.values().collect();
        seen.keys().cloned().collect::<BTreeSet<_>>() == want && spread.len() >= 2
    });
    for i in 1..3 {
        assert_eq!(c.owners(i), seen, "node n{} sees other owners", i + 1);
    }
    let text = docker_ok(&["exec", &c.node(1), "capstan", "cluster", "status"]);
    assert!(
        text.contains("device leases (6s):") && text.contains("ssh-a"),
        "{text}"
    );

    // A run on a node that does not own the device reaches it through the owner.
    let device = "ssh-a";
    let owner = index_of(&seen[device]);
    let other = (owner + 1) % 3;
    let results = probe_results(&probe_run(&c, other, &reach(device)));
    assert!(
        all_ok(&results),
        "run on n{} for {device} owned by n{}: {results:?}",
        other + 1,
        owner + 1
    );
    assert!(
        results[0]["ok"]["server_version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{results:?}"
    );

    // The owner is killed: another node owns the device within the lease time (plus
    // the renewal periods a claim waits), and a run through the third node reaches it.
    let killed_name = seen[device].clone();
    docker_ok(&["kill", &c.node(owner)]);
    c.addrs[owner] = None;
    let killed = Instant::now();
    let live: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let mut taken_by = String::new();
    eventually(60, "the killed owner's device taken over", || {
        match c.owners(live[0]).get(device) {
            Some(n) if *n != killed_name => {
                taken_by = n.clone();
                true
            }
            _ => false,
        }
    });
    let took = killed.elapsed();
    let bound = Duration::from_secs(LEASE_SECS * 3 + 5);
    assert!(
        took <= bound,
        "takeover took {took:?}, more than the lease ({LEASE_SECS}s) and its renewals ({bound:?})"
    );
    let new_owner = index_of(&taken_by);
    let third = *live.iter().find(|i| **i != new_owner).unwrap();
    let mut results = Vec::new();
    eventually(
        20,
        "a run through the third node reaches the device",
        || {
            results = probe_results(&probe_run(&c, third, &reach(device)));
            all_ok(&results)
        },
    );
    // Both owners of the device reached sshd through the relay.
    assert!(
        relay.relayed() >= 2,
        "{} connection(s) through the SSH relay; the first and the new owner each open one",
        relay.relayed()
    );
    // Every device of the killed node has a live owner.
    eventually(30, "every device owned by a live node", || {
        let o = c.owners(live[0]);
        o.len() == want.len() && o.values().all(|n| *n != killed_name)
    });
    eprintln!(
        "{device} taken over by {taken_by} {:.1}s after {killed_name} was killed (lease {LEASE_SECS}s, bound {bound:?}); {} SSH connection(s) relayed",
        took.as_secs_f64(),
        relay.relayed()
    );
    c.stop_cleanly(&live);
}
