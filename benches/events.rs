//! Docker event to plugin run: how long from `docker kill` to the run started, beside
//! the Docker events round trip itself, measured in the same run.
//!
//! Run in release: `cargo bench --bench events` (after `scripts/testinfra up` and the
//! plugin build). The engine as `capstan serve` builds it (scheduler, the `trivial`
//! plugin with `[[triggers.docker]] events = ["container:die"] debounce = "0s"`, the
//! engine's event watchers) on a scratch data directory, with the test daemon as device
//! `local` (its socket) and `ssh` (the test sshd, pooled). For each device,
//! `CAPSTAN_BENCH_ROUNDS` (default 50) times: start a test container, then kill it
//! (`POST /containers/{id}/kill`) and take two times from the moment the kill is sent:
//! - **direct**: the `die` event arriving on a separate `/events` stream of our own on
//!   the same transport (the floor: what any event consumer pays);
//! - **run started**: the plugin run's recorded start (the engine's stream, matching,
//!   scopes, the scheduler's queued record, a slot, the `running` record).
//!
//! Printed: p50 and p99 of both, and the difference and ratio of the medians (the aim:
//! within 20 ms of the direct round trip). No assertions on timings.

// Benchmarks set up environments for the processes they start.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::query_parameters::EventsOptions;
use capstan::device::{Device, DeviceKind, DeviceSecrets, DeviceSpec, SecretField, SshAuth};
use capstan::docker::{ConnectOptions, DockerClient, HostKeyPolicy};
use capstan::plugin::PluginSource;
use capstan::scheduler::Scheduler;
use capstan::secret::Secret;
use futures_util::StreamExt;
use tokio::sync::mpsc;

fn rounds() -> usize {
    std::env::var("CAPSTAN_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// The test infrastructure's facts (`infra.env`).
fn infra() -> HashMap<String, String> {
    let dir = std::env::var_os("CAPSTAN_TESTINFRA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/testinfra"));
    let text = std::fs::read_to_string(dir.join("infra.env")).unwrap_or_else(|e| {
        eprintln!(
            "error: the test infrastructure is not set up ({e}); run `scripts/testinfra up` first"
        );
        std::process::exit(2)
    });
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The two devices: their specs for the engine, and the same as a device record with
/// secrets for the direct stream.
fn devices(i: &HashMap<String, String>) -> Vec<(DeviceSpec, Device, DeviceSecrets)> {
    let socket = format!("unix://{}", i["DOCKER_SOCKET"]);
    let local_spec = DeviceSpec {
        kind: Some(DeviceKind::Local),
        name: Some("local".into()),
        docker_host: Some(Some(socket.clone())),
        ..Default::default()
    };
    let mut local = Device::blank(DeviceKind::Local, "local");
    local.docker_host = Some(socket);

    let key = read(&i["SSH_KEY_ED25519"]);
    let host_key = read(&i["SSH_HOST_KEY_PUB"]).trim().to_string();
    let port: u16 = i["SSH_PORT"].parse().unwrap();
    let ssh_spec = DeviceSpec {
        kind: Some(DeviceKind::Ssh),
        name: Some("ssh".into()),
        host: Some(Some(i["SSH_HOST4"].clone())),
        port: Some(Some(port)),
        user: Some(Some(i["SSH_USER_KEY"].clone())),
        auth: Some(Some(SshAuth::Key)),
        private_key: Some(Some(Secret::from_str_owned(key.clone()))),
        host_key: Some(Some(host_key.clone())),
        ..Default::default()
    };
    let mut ssh = Device::blank(DeviceKind::Ssh, "ssh");
    ssh.host = Some(i["SSH_HOST4"].clone());
    ssh.port = Some(port);
    ssh.user = Some(i["SSH_USER_KEY"].clone());
    ssh.auth = Some(SshAuth::Key);
    ssh.host_key = Some(host_key);
    let mut ssh_secrets = DeviceSecrets::default();
    ssh_secrets.set(SecretField::PrivateKey, Secret::from_str_owned(key));
    vec![
        (local_spec, local, DeviceSecrets::default()),
        (ssh_spec, ssh, ssh_secrets),
    ]
}

fn manifest(plugin: &str, device: &str, container: &str) -> String {
    format!(
        "name = \"{plugin}\"\nversion = \"0.0.1\"\n\
         [[triggers.docker]]\nevents = [\"container:die\"]\ndebounce = \"0s\"\n\
         [policy]\ndevices = [\"{device}\"]\n[policy.containers]\nnames = [\"{container}\"]\n"
    )
}

fn percentile(sorted: &[f64], pm: usize) -> f64 {
    sorted[(sorted.len() * pm / 1000).min(sorted.len() - 1)]
}

struct Measured {
    direct_ms: Vec<f64>,
    run_ms: Vec<f64>,
}

/// Kills and restarts `container` `rounds` times, timing the direct event and the run.
async fn measure(
    scheduler: &Arc<Scheduler>,
    device: &Device,
    secrets: &DeviceSecrets,
    container: &str,
    started: &mut mpsc::UnboundedReceiver<chrono::DateTime<chrono::Utc>>,
    rounds: usize,
) -> Measured {
    let engine = scheduler.engine();
    let stored = engine.devices().unwrap().get(&device.name).unwrap();
    let docker = engine.docker(&stored).await.expect("the device answers");
    let own = DockerClient::new(
        device,
        secrets,
        &ConnectOptions::default(),
        HostKeyPolicy::PinnedOnly,
    )
    .expect("a client");
    let own = own.docker().await.expect("our own connection");
    let filters = HashMap::from([
        ("container".to_string(), vec![container.to_string()]),
        ("event".to_string(), vec!["die".to_string()]),
    ]);
    // Read on a task of its own from the start (bollard sends the request when the
    // stream is first polled; `since` covers the moment before that).
    let since = (chrono::Utc::now() - chrono::Duration::seconds(1)).timestamp();
    let mut stream = own.events(Some(EventsOptions {
        since: Some(since.to_string()),
        filters: Some(filters),
        ..Default::default()
    }));
    let (seen_tx, mut direct) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(Ok(e)) = stream.next().await {
            if seen_tx.send((Instant::now(), e.action)).is_err() {
                return;
            }
        }
    });
    let mut out = Measured {
        direct_ms: Vec::new(),
        run_ms: Vec::new(),
    };
    for round in 0..rounds + 3 {
        // Already running in the first round (304): the kill below says if it is not.
        let _ = docker
            .start_container(
                container,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await;
        // Let the stream and the previous run settle.
        tokio::time::sleep(Duration::from_millis(50)).await;
        while started.try_recv().is_ok() {}
        while direct.try_recv().is_ok() {}
        let sent_wall = chrono::Utc::now();
        let sent = Instant::now();
        docker
            .kill_container(
                container,
                None::<bollard::query_parameters::KillContainerOptions>,
            )
            .await
            .expect("kill");
        let (at, action) = tokio::time::timeout(Duration::from_secs(10), direct.recv())
            .await
            .expect("the die event on our own stream")
            .expect("our stream ended");
        assert_eq!(action.as_deref(), Some("die"));
        let direct_ms = at.duration_since(sent).as_secs_f64() * 1000.0;
        let run_started = tokio::time::timeout(Duration::from_secs(10), started.recv())
            .await
            .expect("a run within 10 s")
            .expect("runs are reported");
        let run_ms = (run_started - sent_wall).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        if round >= 3 {
            out.direct_ms.push(direct_ms);
            out.run_ms.push(run_ms);
        }
    }
    reader.abort();
    out.direct_ms.sort_by(f64::total_cmp);
    out.run_ms.sort_by(f64::total_cmp);
    out
}

fn main() {
    let i = infra();
    let rounds = rounds().max(1);
    let wasm = common::wasm_path("trivial");
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let container = format!(
        "capstan-bench-events-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let run = Command::new("docker")
        .args([
            "run",
            "-d",
            "--name",
            &container,
            "--label",
            "org.capstan.test=bench",
        ])
        .arg(&i["TEST_IMAGE"])
        .output()
        .expect("docker run");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let _removed = Removed(container.clone());

    println!(
        "Docker event → run started: {rounds} kills per device (after 3 warm-up), debounce 0s, {} build",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "{:<24} {:>9} {:>9} {:>12} {:>12} {:>10} {:>8}",
        "device", "direct p50", "p99", "run p50", "p99", "p50 diff", "ratio"
    );
    rt.block_on(async {
        let engine = common::engine_in(&dir.path().join("data"));
        let specs = devices(&i);
        for (spec, _, _) in &specs {
            engine.devices().unwrap().add(spec.clone()).unwrap();
        }
        let scheduler = Scheduler::with_defaults(engine).unwrap();
        let (tx, mut started) = mpsc::unbounded_channel();
        scheduler.on_run_end(Box::new(move |_, record| {
            if let Some(t) = record.started_at {
                let _ = tx.send(t);
            }
        }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let watchers = tokio::spawn(capstan::trigger::docker::watch::run(
            scheduler.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        let src_dir = dir.path().join("plugin");
        std::fs::create_dir_all(&src_dir).unwrap();
        for (spec, device, secrets) in &specs {
            let name = spec.name.clone().unwrap();
            let plugin = format!("bench-{name}");
            let src = PluginSource {
                manifest: manifest(&plugin, &name, &container),
                manifest_file: "plugin.toml".into(),
                wasm: std::fs::read(&wasm).unwrap(),
                wasm_file: wasm.display().to_string(),
            };
            scheduler
                .plugins()
                .install(&src)
                .expect("install the bench plugin");
            // The engine's stream for the device is open.
            let line = format!("capstan_docker_event_stream_up{{device=\"{name}\"}} 1");
            let until = Instant::now() + Duration::from_secs(30);
            while !scheduler
                .metrics()
                .render(&scheduler.engine().docker)
                .contains(&line)
            {
                assert!(
                    Instant::now() < until,
                    "the event stream of {name} did not open"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let m = measure(
                &scheduler,
                device,
                secrets,
                &container,
                &mut started,
                rounds,
            )
            .await;
            scheduler
                .plugins()
                .remove(&plugin)
                .expect("remove the bench plugin");
            let (d50, r50) = (percentile(&m.direct_ms, 500), percentile(&m.run_ms, 500));
            let label = if name == "ssh" {
                "pooled SSH"
            } else {
                "local socket"
            };
            println!(
                "{label:<24} {d50:>7.2}ms {:>7.2}ms {r50:>10.2}ms {:>10.2}ms {:>8.2}ms {:>7.2}x",
                percentile(&m.direct_ms, 990),
                percentile(&m.run_ms, 990),
                r50 - d50,
                r50 / d50.max(0.001),
            );
        }
        let _ = stop.send(());
        let _ = watchers.await;
        scheduler.shutdown().await;
    });
}

/// Removes the bench's container however the bench ends.
struct Removed(String);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}
