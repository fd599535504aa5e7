//! Webhook runs through a 3-node cluster against one engine alone, in the same run.
//!
//! `cargo bench --bench cluster` (release; `cargo build --benches` builds it too). Needs
//! the test plugins built (`cargo build --manifest-path plugins/Cargo.toml --target
//! wasm32-wasip2 --release`) and the loopback NATS cluster of `scripts/testinfra up`
//! (its `NATS_URLS`, read from `target/testinfra/infra.env` or the environment).
//!
//! Three phases of `CAPSTAN_BENCH_SECONDS` (default 10) each, with the `trivial` plugin
//! behind a signed GitHub-style hook (a distinct delivery id per request):
//! 1. **alone**: one `capstan serve`;
//! 2. **cluster**: three `capstan serve --cluster NATS_URLS` on their own data
//!    directories (a cluster name of their own), the requests spread round-robin; the
//!    hook allows replays (`replay = "allow"`), so only the delivery id is checked;
//! 3. **replays**: the same three-node set-up with a hook that rejects replays (the
//!    default), each request with a body of its own: every signature is also claimed in
//!    the cluster's replay bucket before the run is published, and marked after.
//!
//! In each, `CAPSTAN_BENCH_CONNECTIONS` (default 8) senders post deliveries one after
//! the other; every 20th asks `?wait=true`, whose answer comes once the run's final
//! record is in the answering node's history (alone: the run ended; cluster: the run was
//! published, taken by some node, run, its end published to the history stream and
//! applied on the answering node). Printed per phase: deliveries accepted per second,
//! 202 latency p50/p99, accept→final latency p50/p99 (the `?wait=true` ones), and runs/s
//! sustained (runs recorded over the time from the first request until every accepted
//! delivery's final record is listed on the first node). Then the ratios: cluster runs/s
//! over alone, and the added accept→final latency of going through JetStream.

// Benchmarks set up environments for the processes they start.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};

const MANIFEST: &str = "name = \"cluster-bench\"\nversion = \"1\"\n\n[[triggers.webhook]]\nname = \"gh\"\nauth = \"hmac-sha256\"\ndelivery_header = \"X-GitHub-Delivery\"\nreplay = \"allow\"\n";
/// The same hook rejecting replays (the default).
const MANIFEST_REJECT: &str = "name = \"cluster-bench\"\nversion = \"1\"\n\n[[triggers.webhook]]\nname = \"gh\"\nauth = \"hmac-sha256\"\ndelivery_header = \"X-GitHub-Delivery\"\n";
const BODY: &[u8] = br#"{"ref":"refs/heads/main","repository":{"full_name":"capstan/bench"}}"#;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn nats_urls() -> String {
    if let Ok(u) = std::env::var("NATS_URLS") {
        return u;
    }
    let env = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/testinfra/infra.env");
    std::fs::read_to_string(&env)
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("NATS_URLS=").map(str::to_string))
        })
        .unwrap_or_else(|| {
            panic!(
                "no NATS_URLS in the environment or {}: run `scripts/testinfra up`",
                env.display()
            )
        })
}

fn capstan(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capstan"));
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CAPSTAN_DATA_DIR", data)
        .env("CAPSTAN_LOG", "warn")
        .env("CAPSTAN_RUNS_KEEP_PER_PLUGIN", "1000000")
        .env("CAPSTAN_RUNS_MAX_QUEUED_PER_PLUGIN", "1000000")
        .stdin(Stdio::null());
    c
}

fn capstan_ok(data: &Path, args: &[&str]) -> String {
    let out = capstan(data).args(args).output().expect("run capstan");
    assert!(
        out.status.success(),
        "capstan {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A data directory with a vault and the plugin installed: its hook secret.
fn prepare(data: &Path, manifest: &str) -> String {
    capstan_ok(data, &["vault", "init"]);
    let src = data.join("plugin-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(common::wasm_path("trivial"), src.join("plugin.wasm")).unwrap();
    std::fs::write(src.join("plugin.toml"), manifest).unwrap();
    let out = capstan_ok(
        data,
        &[
            "plugin",
            "install",
            src.join("plugin.wasm").to_str().unwrap(),
        ],
    );
    let mut lines = out.lines();
    while let Some(l) = lines.next() {
        if l.contains("hook gh: generated secret") {
            return lines.next().expect("the secret line").trim().to_string();
        }
    }
    panic!("no generated secret in:\n{out}")
}

/// A `capstan serve` on a free loopback port; killed when dropped.
struct Engine {
    child: Child,
    addr: String,
    secret: String,
    data: PathBuf,
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(data: &Path, secret: String, cluster: Option<(&str, &str, &str)>) -> Engine {
    let mut c = capstan(data);
    c.args(["serve", "--listen", "127.0.0.1:0"]);
    if let Some((urls, name, node)) = cluster {
        c.args(["--cluster", urls])
            .env("CAPSTAN_CLUSTER_NAME", name)
            .env("CAPSTAN_CLUSTER_NODE_NAME", node)
            // Each node is set up on its own (its vault, the plugin, the hook secret).
            .env("CAPSTAN_CLUSTER_SHARED_STATE", "false");
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start capstan serve");
    let out = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(out).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("serve exited before it listened")
            .unwrap();
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep reading so a full pipe never stalls the engine.
    std::thread::spawn(move || for _ in lines {});
    Engine {
        child,
        addr,
        secret,
        data: data.to_path_buf(),
    }
}

fn post(addr: &str, secret: &str, delivery: &str, wait: bool, distinct: bool) -> Option<u16> {
    let owned;
    let body: &[u8] = if distinct {
        owned = format!(r#"{{"ref":"refs/heads/main","delivery":"{delivery}"}}"#);
        owned.as_bytes()
    } else {
        BODY
    };
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(body);
    let sig = hex::encode(mac.finalize().into_bytes());
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let _ = s.set_nodelay(true);
    let path = if wait {
        "/hooks/gh?wait=true"
    } else {
        "/hooks/gh"
    };
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\nX-Hub-Signature-256: sha256={sig}\r\nX-GitHub-Delivery: {delivery}\r\nContent-Type: application/json\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    String::from_utf8_lossy(&buf)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
}

struct Outcome {
    name: &'static str,
    accepted: usize,
    refused: usize,
    load: Duration,
    accept: Vec<Duration>,
    to_final: Vec<Duration>,
    runs_per_sec: f64,
}

fn pct(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let mut s = v.to_vec();
    s.sort();
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs of the plugin listed final on `e` (the CLI pages through the API).
fn final_runs(e: &Engine) -> usize {
    let out = capstan(&e.data)
        .args([
            "runs",
            "--json",
            "--limit",
            "1000000",
            "--plugin",
            "cluster-bench",
        ])
        .output()
        .expect("capstan runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|r| !matches!(r["status"].as_str(), Some("queued" | "running")))
                .count()
        })
        .unwrap_or(0)
}

fn phase(
    name: &'static str,
    engines: &[Engine],
    tag: &str,
    secs: u64,
    senders: usize,
    distinct: bool,
) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let accept = Arc::new(Mutex::new(Vec::new()));
    let to_final = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(AtomicUsize::new(0));
    let targets: Arc<Vec<(String, String)>> = Arc::new(
        engines
            .iter()
            .map(|e| (e.addr.clone(), e.secret.clone()))
            .collect(),
    );
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let threads: Vec<_> = (0..senders)
        .map(|_| {
            let (next, accept, to_final, refused, targets) = (
                next.clone(),
                accept.clone(),
                to_final.clone(),
                refused.clone(),
                targets.clone(),
            );
            let tag = tag.to_string();
            std::thread::spawn(move || {
                while Instant::now() < until {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let (addr, secret) = &targets[i % targets.len()];
                    let wait = i % 20 == 19;
                    let t = Instant::now();
                    match post(addr, secret, &format!("{tag}-{i}"), wait, distinct) {
                        Some(202) if !wait => accept.lock().unwrap().push(t.elapsed()),
                        Some(200) if wait => to_final.lock().unwrap().push(t.elapsed()),
                        _ => {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let load = started.elapsed();
    let accept = accept.lock().unwrap().clone();
    let to_final = to_final.lock().unwrap().clone();
    let accepted = accept.len() + to_final.len();
    // Every accepted delivery's end listed on the first engine.
    let drain = Instant::now() + Duration::from_secs(120);
    loop {
        let n = final_runs(&engines[0]);
        if n >= accepted {
            break;
        }
        assert!(
            Instant::now() < drain,
            "{name}: only {n} of {accepted} runs final after 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let all = started.elapsed();
    Outcome {
        name,
        accepted,
        refused: refused.load(Ordering::SeqCst),
        load,
        accept,
        to_final,
        runs_per_sec: accepted as f64 / all.as_secs_f64(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print(o: &Outcome) {
    println!(
        "{:<8} accepted {:>6} ({:>7.1}/s) refused {:>4}  202 p50 {:>6.2} ms p99 {:>7.2} ms  accept→final p50 {:>7.2} ms p99 {:>7.2} ms  runs/s sustained {:>7.1}",
        o.name,
        o.accepted,
        o.accepted as f64 / o.load.as_secs_f64(),
        o.refused,
        ms(pct(&o.accept, 0.5)),
        ms(pct(&o.accept, 0.99)),
        ms(pct(&o.to_final, 0.5)),
        ms(pct(&o.to_final, 0.99)),
        o.runs_per_sec
    );
}

fn main() -> ExitCode {
    let secs = env_or("CAPSTAN_BENCH_SECONDS", 10);
    let senders = env_or("CAPSTAN_BENCH_CONNECTIONS", 8) as usize;
    let urls = nats_urls();
    let scratch = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();

    let alone = {
        let data = scratch.path().join("alone");
        let secret = prepare(&data, MANIFEST);
        let e = serve(&data, secret, None);
        phase("alone", &[e], &format!("a{tag}"), secs, senders, false)
    };
    print(&alone);

    let three = |phase_name: &'static str, manifest: &str, distinct: bool| {
        let name = format!("bench{phase_name}{tag}");
        let engines: Vec<Engine> = (1..=3)
            .map(|i| {
                let data = scratch.path().join(format!("{phase_name}-n{i}"));
                let secret = prepare(&data, manifest);
                serve(&data, secret, Some((&urls, &name, &format!("n{i}"))))
            })
            .collect();
        phase(
            phase_name,
            &engines,
            &format!("{phase_name}{tag}"),
            secs,
            senders,
            distinct,
        )
    };
    let cluster = three("cluster", MANIFEST, false);
    print(&cluster);
    let replays = three("replays", MANIFEST_REJECT, true);
    print(&replays);

    println!(
        "cluster/alone runs/s sustained: {:.2}x; accept→final added by JetStream: p50 {:+.2} ms, p99 {:+.2} ms",
        cluster.runs_per_sec / alone.runs_per_sec,
        ms(pct(&cluster.to_final, 0.5)) - ms(pct(&alone.to_final, 0.5)),
        ms(pct(&cluster.to_final, 0.99)) - ms(pct(&alone.to_final, 0.99)),
    );
    println!(
        "replays/cluster runs/s sustained: {:.2}x; 202 p50 added by the cross-node replay claim: {:+.2} ms",
        replays.runs_per_sec / cluster.runs_per_sec,
        ms(pct(&replays.accept, 0.5)) - ms(pct(&cluster.accept, 0.5)),
    );
    if alone.accepted == 0 || cluster.accepted == 0 || replays.accepted == 0 {
        eprintln!("MISMATCH: a phase accepted nothing");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
