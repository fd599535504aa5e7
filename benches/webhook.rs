//! Webhook-triggered runs under load: Capstan against adnanh/webhook, in the same run.
//!
//! `cargo bench --bench webhook` (release). Needs the test plugins built
//! (`cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release`)
//! and the Debian package `webhook` (`scripts/testinfra up` installs it).
//!
//! Capstan: a scratch data directory, `capstan vault init`, the `trivial` plugin
//! installed with one webhook (`auth = "hmac-sha256"`, GitHub-style
//! `X-Hub-Signature-256: sha256=<hex>`; the secret `capstan plugin install` prints once;
//! `replay = "allow"`, since the load repeats one signed delivery),
//! then the release `capstan serve` on a loopback port. A delivery is answered 202 once
//! its `queued` run is recorded; the run happens after.
//!
//! adnanh/webhook: one hook executing `/bin/true` behind the equivalent
//! `payload-hmac-sha256` rule on the same header, measured twice. First with its default
//! `include-command-output-in-response = false`: it answers 200 as soon as the rule
//! matched and runs the command in the background, which is what Capstan's 202 is (the
//! answer says the run will happen, not that it happened); but nothing bounds how many
//! commands run at once, so under a flood they pile up (and past the file descriptor
//! limit, fail). Then with `include-command-output-in-response = true`: the answer waits
//! for the command, so the connections bound the commands running. Its log (`-verbose`)
//! is its record: one `finished handling` line per command, `error occurred` per failure;
//! a calibration delivery first checks that a signed delivery does run the command and a
//! badly signed one is refused.
//!
//! The load: `CAPSTAN_BENCH_CONNECTIONS` (default 16) keep-alive connections, each
//! sending the same signed POST as soon as the previous answer arrived, for
//! `CAPSTAN_BENCH_SECONDS` (default 10). The generator is in this process (tokio + hyper,
//! one thread), not wrk: wrk stops with requests in flight that the server may have
//! accepted but whose answers it never reads, so its counts cannot be compared exactly
//! with the records. Here, at the end, no new request starts and every one in flight is
//! answered and counted. Latency is from sending a request to its complete answer.
//!
//! After the load, each server gets until every accepted delivery has run (Capstan: a
//! `?wait=true` delivery, which queues behind the others, then a graceful stop; webhook:
//! its log reaching the count). Then accepted deliveries are compared with the records:
//! every run of the plugin in Capstan's data directory, read page by page after the
//! engine stopped (all `ok`; the API has no run listing yet, and `capstan runs` lists one
//! page of at most 1000), and webhook's `finished handling` lines. Any difference is
//! printed as a MISMATCH line and the bench exits non-zero. Runs webhook lost (commands
//! that failed) are printed as a finding about the baseline, not a failure.
//!
//! Printed: requests/s, latency percentiles, accepted (202 / 200) and refused answers,
//! recorded runs, how long the backlog took to drain after the load, runs/s sustained
//! (recorded runs over the time from the first request to the last run's end), the
//! server's CPU time (with its children: webhook's `true` processes), and the ratios.

// Benchmarks set up environments for the processes they start.
#![allow(clippy::disallowed_methods)]

mod common;
use common::wasm_path;

// The engine's allocator (src/main.rs), so the stages measured in this process cost what
// they cost in `capstan serve`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use hmac::{KeyInit, Mac};
use http_body_util::{BodyExt, Full};

use capstan::runs::{RunQuery, RunStatus, RunStore, RunStoreConfig};
use capstan::store::Store;

const PLUGIN: &str = "webhook-bench";
/// How long the phase of wrongly signed deliveries lasts (HTTP + signature alone).
const BREAKDOWN_PHASE: Duration = Duration::from_secs(3);
/// Operations per in-process stage of the breakdown.
const BREAKDOWN_OPS: usize = 50_000;
const HOOK: &str = "bench";
const BODY: &[u8] = br#"{"ref":"refs/heads/main","after":"9b2e1c4f6a0d3e5b7c8a9f1e2d3c4b5a6f7e8d9c","repository":{"full_name":"capstan/bench"},"pusher":{"name":"bench"}}"#;

/// Engine settings raised for the flood, unless set in the environment, with why.
const ENGINE_SETTINGS: &[(&str, &str, &str)] = &[
    (
        "CAPSTAN_RUNS_MAX_QUEUED_PER_PLUGIN",
        "1000000",
        "default 1000: the whole flood may queue; a 503 (queue full) would count as refused",
    ),
    (
        "CAPSTAN_RUNS_KEEP_PER_PLUGIN",
        "100000000",
        "default 500: retention would delete the records being counted",
    ),
    (
        "CAPSTAN_RUNS_MAX_PER_PLUGIN",
        "4",
        "the default: 4 runs at once, on 2 cores",
    ),
    (
        "CAPSTAN_RUNS_MAX_CONCURRENT",
        "16",
        "the default; one plugin uses at most 4 of them",
    ),
];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The executable `name` on PATH, or a panic naming the Debian package that has it.
fn require_tool(name: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: install the Debian package `{package}` \
                 (apt-get install {package}, or `scripts/testinfra up`, which installs it)"
            )
        })
}

fn sign(secret: &str, payload: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(payload);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A process this bench started: killed (by its PID) and reaped when dropped, unless
/// stopped before.
struct Proc {
    name: &'static str,
    child: Option<Child>,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM, then up to `grace` for it to exit (SIGKILL after that).
    fn stop(&mut self, grace: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let until = Instant::now() + grace;
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > until {
                eprintln!("{} did not stop within {grace:?}: killed", self.name);
                let _ = child.kill();
                return child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CPU time of a process and its reaped children, from /proc (10 ms ticks).
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..15)
        .map(|f| f.iter().filter_map(|x| x.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// One request with `Connection: close`, for the checks around the load.
fn post_once(addr: SocketAddr, path: &str, sig: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         X-Hub-Signature-256: {sig}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

// ---------------------------------------------------------------------------------------
// The load generator

/// What one server answered under load.
#[derive(Default)]
struct Load {
    /// Answers by status code.
    statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer (connection errors); each one's fate is unknown.
    errors: u64,
    /// Latency of every answered request, in microseconds.
    latencies_us: Vec<u32>,
    /// From the first request to the last answer.
    elapsed: Duration,
    /// Wall-clock time of the first request.
    started_at: Option<DateTime<Utc>>,
    /// CPU time of this process (the generator) during the load.
    cpu: Duration,
}

impl Load {
    fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    fn per_sec(&self) -> f64 {
        self.answered() as f64 / self.elapsed.as_secs_f64()
    }

    /// Latency at per-mille `pm`, in milliseconds.
    fn at(&self, pm: usize) -> f64 {
        let v = &self.latencies_us;
        if v.is_empty() {
            return f64::NAN;
        }
        v[(v.len() * pm / 1000).min(v.len() - 1)] as f64 / 1000.0
    }

    fn statuses_text(&self) -> String {
        let mut s: Vec<String> = self
            .statuses
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        if self.errors > 0 {
            s.push(format!("no answer: {}", self.errors));
        }
        s.join(", ")
    }
}

/// One connection's share of the counts.
#[derive(Default)]
struct ConnLoad {
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    latencies_us: Vec<u32>,
}

/// `connections` keep-alive connections POSTing `body` to `path` back to back until
/// `duration` is over; then the requests in flight are answered and nothing new starts.
fn drive(
    addr: SocketAddr,
    path: &str,
    signature: &str,
    connections: usize,
    duration: Duration,
) -> Load {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cpu0 = cpu_of(std::process::id());
    let started_at = Utc::now();
    let start = Instant::now();
    let deadline = start + duration;
    let conns: Vec<ConnLoad> = rt.block_on(async {
        let tasks: Vec<_> = (0..connections)
            .map(|_| {
                tokio::spawn(connection(
                    addr,
                    path.to_string(),
                    signature.to_string(),
                    deadline,
                ))
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("a load connection panicked"));
        }
        out
    });
    let elapsed = start.elapsed();
    let mut load = Load {
        elapsed,
        started_at: Some(started_at),
        cpu: cpu_of(std::process::id()).saturating_sub(cpu0),
        ..Load::default()
    };
    for c in conns {
        for (k, v) in c.statuses {
            *load.statuses.entry(k).or_default() += v;
        }
        load.errors += c.errors;
        load.latencies_us.extend(c.latencies_us);
    }
    load.latencies_us.sort_unstable();
    load
}

async fn connection(
    addr: SocketAddr,
    path: String,
    signature: String,
    deadline: Instant,
) -> ConnLoad {
    use hyper::header::{CONTENT_TYPE, HOST};
    let mut out = ConnLoad::default();
    let body = Bytes::from_static(BODY);
    let host = addr.to_string();
    'reconnect: while Instant::now() < deadline {
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
            out.errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut tx, conn)) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
        else {
            out.errors += 1;
            continue;
        };
        tokio::spawn(conn);
        while Instant::now() < deadline {
            if tx.ready().await.is_err() {
                continue 'reconnect;
            }
            let req = hyper::Request::post(path.as_str())
                .header(HOST, host.as_str())
                .header(CONTENT_TYPE, "application/json")
                .header("X-Hub-Signature-256", signature.as_str())
                .body(Full::new(body.clone()))
                .unwrap();
            let t0 = Instant::now();
            let answer = match tx.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    resp.into_body().collect().await.map(|_| status)
                }
                Err(e) => Err(e),
            };
            match answer {
                Ok(status) => {
                    let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    out.latencies_us.push(us);
                    *out.statuses.entry(status).or_default() += 1;
                }
                Err(_) => {
                    out.errors += 1;
                    continue 'reconnect;
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The two servers

/// One server's figures, for the table.
struct Outcome {
    name: &'static str,
    load: Load,
    /// Accepted deliveries: 202 (Capstan) or 200 (webhook).
    accepted: u64,
    /// Runs recorded (Capstan) or commands finished (webhook).
    recorded: u64,
    /// Of those, runs that did not end ok (Capstan) or commands that failed (webhook).
    failed: u64,
    /// From the end of the load until the last accepted delivery had run.
    drain: Duration,
    /// Runs that ended ok per second, from the first request to the last run's end.
    sustained: f64,
    /// Server CPU time over its whole life (with reaped children).
    server_cpu: Duration,
    /// Problems with the accounting, one line each.
    mismatches: Vec<String>,
    /// What the baseline did not do (runs lost), reported without failing the bench.
    notes: Vec<String>,
    /// The server's CPU from the first request to the last run's end, per recorded run.
    cpu_per_run: Option<Duration>,
    /// Capstan only: the server's CPU per delivery refused for its signature (HTTP and
    /// the HMAC check, nothing else), from a phase of its own.
    http_cpu: Option<Duration>,
}

fn capstan_cmd(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capstan"));
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CAPSTAN_DATA_DIR", data)
        .env("CAPSTAN_LOG", "warn")
        .stdin(Stdio::null());
    c
}

fn capstan_ok(data: &Path, args: &[&str]) -> String {
    let out = capstan_cmd(data).args(args).output().expect("run capstan");
    assert!(
        out.status.success(),
        "capstan {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Installs the trivial plugin with the bench hook; returns the hook's secret.
fn install_plugin(scratch: &Path, data: &Path) -> String {
    let src = scratch.join("plugin-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(wasm_path("trivial"), src.join("plugin.wasm")).unwrap();
    std::fs::write(
        src.join("plugin.toml"),
        format!(
            // Every request is the same signed delivery (as for adnanh/webhook), so the
            // hook must run replays: `replay = "allow"`.
            "name = \"{PLUGIN}\"\nversion = \"1\"\n\n[[triggers.webhook]]\nname = \"{HOOK}\"\nauth = \"hmac-sha256\"\nreplay = \"allow\"\n"
        ),
    )
    .unwrap();
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
        if l.contains(&format!("hook {HOOK}: generated secret")) {
            return lines.next().expect("the secret line").trim().to_string();
        }
    }
    panic!("no generated secret for hook {HOOK} in the install output:\n{out}")
}

/// `workers`: the async runtime's worker threads (tokio's `TOKIO_WORKER_THREADS`), or
/// its default, one per core.
fn bench_capstan(
    scratch: &Path,
    connections: usize,
    duration: Duration,
    workers: Option<&str>,
    name: &'static str,
) -> Outcome {
    let data = scratch.join(format!("data-{}", workers.unwrap_or("default")));
    capstan_ok(&data, &["vault", "init"]);
    let secret = install_plugin(scratch, &data);

    let mut cmd = capstan_cmd(&data);
    let mut settings = Vec::new();
    if let Some(w) = workers {
        cmd.env("TOKIO_WORKER_THREADS", w);
        settings.push(format!(
            "  TOKIO_WORKER_THREADS={w} (the async runtime's workers; default one per core)"
        ));
    }
    for (var, value, why) in ENGINE_SETTINGS {
        let (value, why) = match std::env::var(var) {
            Ok(v) => (v, "from the environment"),
            Err(_) => (value.to_string(), *why),
        };
        cmd.env(var, &value);
        settings.push(format!("  {var}={value} ({why})"));
    }
    println!("capstan serve settings:\n{}", settings.join("\n"));
    let stderr_path = scratch.join("serve.stderr");
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let mut server = Proc {
        name: "capstan serve",
        child: Some(cmd.spawn().expect("spawn capstan serve")),
    };
    let stdout = server.child.as_mut().unwrap().stdout.take().unwrap();
    let mut stdout = std::io::BufReader::new(stdout);
    let mut banner = String::new();
    let addr: SocketAddr = loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            panic!(
                "capstan serve exited before listening:\n{banner}\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        banner.push_str(&line);
        if let Some(a) = line.trim().strip_prefix("capstan API listening on http://") {
            break a.parse().expect("the API address");
        }
    };
    // The rest of stdout, kept for the shutdown report.
    let later: Arc<Mutex<Vec<String>>> = Arc::default();
    let reader = {
        let later = later.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                later.lock().unwrap().push(line);
            }
        })
    };
    let path = format!("/hooks/{HOOK}");
    let sig = sign(&secret, BODY);

    // The hook checks its signature: a wrong one is refused, and runs nothing.
    let (status, body) = post_once(addr, &path, &sign("not the secret", BODY), BODY);
    assert_eq!(status, 401, "a badly signed delivery: {body}");

    let cpu_before = cpu_of(server.pid());
    let load = drive(addr, &path, &sig, connections, duration);
    let load_end = Instant::now();

    // A delivery answered when its run ended: runs take their plugin's slots first come,
    // first served, so by then every delivery accepted before it has started.
    let mut sentinels = 0;
    loop {
        let (status, body) = post_once(addr, &format!("{path}?wait=true"), &sig, BODY);
        match status {
            200 => {
                sentinels += 1;
                break;
            }
            202 => sentinels += 1, // the longest wait passed: queued still; wait again
            _ => panic!("the closing ?wait=true delivery was answered {status}: {body}"),
        }
    }
    let drain = load_end.elapsed();
    let load_cpu = cpu_of(server.pid()).saturating_sub(cpu_before);

    // HTTP and the signature check alone: the same load, signed with the wrong secret,
    // so each delivery is read, its HMAC computed and compared, and it is answered 401.
    let cpu_before = cpu_of(server.pid());
    let refused = drive(
        addr,
        &path,
        &sign("not the secret", BODY),
        connections,
        BREAKDOWN_PHASE,
    );
    let http_cpu = cpu_of(server.pid()).saturating_sub(cpu_before);
    assert_eq!(
        refused.count(401),
        refused.answered(),
        "the wrongly signed load: {}",
        refused.statuses_text()
    );
    let http_cpu = http_cpu / (refused.answered().max(1) as u32);

    // The last ones started may still be running: a moment, then a graceful stop, which
    // says how many were still running or waiting (those are recorded `interrupted`).
    std::thread::sleep(Duration::from_millis(500));
    let server_cpu = cpu_of(server.pid());
    let st = server.stop(Duration::from_secs(60));
    let _ = reader.join();
    assert!(
        st.success(),
        "capstan serve exited with {st}:\n{}",
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );
    let report = later
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.starts_with("stopped:"))
        .cloned()
        .unwrap_or_else(|| "(no shutdown report)".into());
    println!("capstan serve {report}");

    // The records, from the data directory now that the engine has let it go.
    let store = Store::open(&data).expect("open the data directory");
    let runs = RunStore::open(
        &store,
        RunStoreConfig {
            keep_per_plugin: None,
            max_age: None,
            ..RunStoreConfig::default()
        },
    )
    .unwrap();
    let mut by_status: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut recorded = 0u64;
    let mut last_end: Option<DateTime<Utc>> = None;
    let mut before = None;
    loop {
        let page = runs
            .list(&RunQuery {
                plugin: Some(PLUGIN.into()),
                before,
                limit: capstan::runs::MAX_PAGE,
            })
            .unwrap();
        for r in &page.runs {
            recorded += 1;
            *by_status.entry(r.status.as_str()).or_default() += 1;
            last_end = last_end.max(r.finished_at);
        }
        match page.next {
            Some(n) => before = Some(n),
            None => break,
        }
    }
    let statuses: Vec<String> = by_status.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    println!(
        "capstan runs recorded for {PLUGIN}: {recorded} ({}); {sentinels} of them the closing ?wait=true deliveries",
        statuses.join(", ")
    );

    let accepted = load.count(202);
    let mut mismatches = Vec::new();
    if recorded != accepted + sentinels {
        mismatches.push(format!(
            "capstan: {accepted} deliveries accepted under load + {sentinels} closing, but {recorded} runs recorded"
        ));
    }
    let ok = by_status.get(RunStatus::Ok.as_str()).copied().unwrap_or(0);
    if ok != recorded {
        mismatches.push(format!(
            "capstan: {} of {recorded} recorded runs did not end ok ({})",
            recorded - ok,
            statuses.join(", ")
        ));
    }
    if load.errors > 0 {
        mismatches.push(format!(
            "capstan: {} requests got no answer; whether they ran is unknown",
            load.errors
        ));
    }
    let sustained = match (load.started_at, last_end) {
        (Some(a), Some(b)) => {
            ok as f64 / ((b - a).num_microseconds().unwrap_or(1).max(1) as f64 / 1e6)
        }
        _ => f64::NAN,
    };
    Outcome {
        name,
        accepted,
        recorded: recorded - sentinels,
        failed: recorded - ok,
        drain,
        sustained,
        server_cpu,
        mismatches,
        notes: Vec::new(),
        cpu_per_run: Some(load_cpu / ((recorded - sentinels).max(1) as u32)),
        http_cpu: Some(http_cpu),
        load,
    }
}

/// Counts lines of a growing log that contain given strings, reading only what was
/// appended since the last call (the log grows by several lines per delivery).
struct LogCounter {
    file: std::fs::File,
    partial: Vec<u8>,
    needles: Vec<String>,
    counts: Vec<u64>,
    /// The first line found for each needle.
    first: Vec<Option<String>>,
}

impl LogCounter {
    fn new(path: &Path, needles: &[String]) -> LogCounter {
        LogCounter {
            file: std::fs::File::open(path).expect("open the webhook log"),
            partial: Vec::new(),
            needles: needles.to_vec(),
            counts: vec![0; needles.len()],
            first: vec![None; needles.len()],
        }
    }

    /// Reads what was appended; returns the counts so far, one per needle.
    fn update(&mut self) -> &[u64] {
        let mut buf = Vec::new();
        self.file
            .read_to_end(&mut buf)
            .expect("read the webhook log");
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return &self.counts;
        };
        for line in self.partial[..end].split(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(line);
            for (n, needle) in self.needles.iter().enumerate() {
                if line.contains(needle.as_str()) {
                    self.counts[n] += 1;
                    if self.first[n].is_none() {
                        self.first[n] = Some(line.trim().to_string());
                    }
                }
            }
        }
        self.partial.drain(..=end);
        &self.counts
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How adnanh/webhook answers.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Its default: 200 once the rule matched, the command runs in the background.
    Background,
    /// `include-command-output-in-response`: 200 once the command ended.
    AfterCommand,
}

fn bench_webhook(scratch: &Path, mode: Mode, connections: usize, duration: Duration) -> Outcome {
    let after_command = mode == Mode::AfterCommand;
    let webhook = require_tool("webhook", "webhook");
    let truth = Path::new("/bin/true");
    assert!(truth.is_file(), "/bin/true is missing");
    let dir = scratch.join(if after_command {
        "webhook-after-command"
    } else {
        "webhook"
    });
    std::fs::create_dir_all(&dir).unwrap();
    let secret = hex::encode({
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).unwrap();
        b
    });
    let hooks = serde_json::json!([{
        "id": HOOK,
        "execute-command": truth,
        "command-working-directory": dir,
        "response-message": "accepted",
        "include-command-output-in-response": after_command,
        "trigger-rule-mismatch-http-response-code": 401,
        "trigger-rule": {"match": {
            "type": "payload-hmac-sha256",
            "secret": secret,
            "parameter": {"source": "header", "name": "X-Hub-Signature-256"},
        }},
    }]);
    let hooks_file = dir.join("hooks.json");
    std::fs::write(&hooks_file, serde_json::to_vec_pretty(&hooks).unwrap()).unwrap();
    let log = dir.join("webhook.log");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Its log goes to stderr; stdout shares the file, in case a version writes there.
    let log_file = std::fs::File::create(&log).unwrap();
    let mut server = Proc {
        name: "webhook",
        child: Some(
            Command::new(&webhook)
                .arg("-hooks")
                .arg(&hooks_file)
                .args(["-ip", "127.0.0.1", "-port", &port.to_string(), "-verbose"])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .expect("spawn webhook"),
        ),
    };
    let until = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if let Some(st) = server.child.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "webhook exited ({st}) before listening:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < until,
            "webhook did not listen on {addr} within 10 s:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    const DONE: usize = 0;
    const EXECUTING: usize = 1;
    const ERROR: usize = 2;
    let mut counter = LogCounter::new(
        &log,
        &[
            format!("finished handling {HOOK}"),
            format!("executing {}", truth.display()),
            "error occurred".to_string(),
        ],
    );

    // Calibration: a signed delivery runs /bin/true (its log says so), a badly signed one
    // is refused and runs nothing.
    let path = format!("/hooks/{HOOK}");
    let sig = sign(&secret, BODY);
    let (status, body) = post_once(addr, &path, &sig, BODY);
    assert_eq!(status, 200, "webhook refused a signed delivery: {body}");
    let (status, body) = post_once(addr, &path, &sign("not the secret", BODY), BODY);
    assert!(
        status >= 400,
        "webhook accepted a badly signed delivery: {status} {body}"
    );
    let until = Instant::now() + Duration::from_secs(10);
    while counter.update()[DONE] < 1 {
        assert!(
            Instant::now() < until,
            "webhook never logged running the command:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let calibration = counter.update().to_vec();
    assert!(
        calibration[DONE] == 1 && calibration[EXECUTING] == 1 && calibration[ERROR] == 0,
        "webhook's calibration: expected one execution of {} for two deliveries (one badly signed); \
         its log says {} executing, {} finished, {} errors",
        truth.display(),
        calibration[EXECUTING],
        calibration[DONE],
        calibration[ERROR]
    );
    println!(
        "{} calibration: a signed delivery ran {} (log: executing, finished), a badly signed one was refused",
        name(mode),
        truth.display()
    );

    let load = drive(addr, &path, &sig, connections, duration);
    let load_end = Instant::now();
    let accepted = load.count(200);
    // Its commands run in the background: wait until they all finished (the log's count),
    // or until nothing moved for 30 s.
    let mut recorded = counter.update()[DONE] - 1;
    let mut last_change = load_end;
    while recorded < accepted && last_change.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
        let n = counter.update()[DONE] - 1;
        if n != recorded {
            recorded = n;
            last_change = Instant::now();
        }
    }
    let drain = last_change.duration_since(load_end);
    let server_cpu = cpu_of(server.pid());
    server.stop(Duration::from_secs(10));
    let counts = counter.update().to_vec();
    recorded = counts[DONE] - 1;
    let failed = counts[ERROR];
    println!(
        "{}: {recorded} commands finished after the calibration, {} started; {failed} reported an error",
        name(mode),
        counts[EXECUTING] - 1
    );
    if let Some(first) = &counter.first[ERROR] {
        println!("{}: the first error: {first}", name(mode));
    }

    // Accounting: every delivery it accepted got its command started and finished (in
    // the background mode, a failed command was still accepted).
    let mut mismatches = Vec::new();
    let expected = if after_command {
        accepted + load.count(500).min(failed)
    } else {
        accepted
    };
    if recorded != expected {
        mismatches.push(format!(
            "{}: {accepted} deliveries accepted but {recorded} commands finished",
            name(mode)
        ));
    }
    let mut notes = Vec::new();
    if failed > 0 {
        notes.push(format!(
            "{} lost runs: {failed} of the {recorded} commands it started failed{}",
            name(mode),
            counter.first[ERROR]
                .as_deref()
                .and_then(|l| l.split("error occurred: ").nth(1))
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        ));
    }
    if load.errors > 0 {
        mismatches.push(format!(
            "{}: {} requests got no answer; whether they ran is unknown",
            name(mode),
            load.errors
        ));
    }
    let total = load.elapsed + drain;
    Outcome {
        name: name(mode),
        accepted,
        recorded,
        failed,
        drain,
        sustained: (recorded - failed) as f64 / total.as_secs_f64(),
        server_cpu,
        mismatches,
        notes,
        cpu_per_run: Some(server_cpu / (recorded.max(1) as u32)),
        http_cpu: None,
        load,
    }
}

fn name(mode: Mode) -> &'static str {
    match mode {
        Mode::Background => "webhook (/bin/true)",
        Mode::AfterCommand => "webhook, answer after cmd",
    }
}

fn print_table(outcomes: &[&Outcome]) {
    println!();
    println!(
        "{:<26} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "server",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "accepted",
        "refused",
        "recorded",
        "failed",
        "drain s",
        "runs/s",
        "srv CPU",
        "µs/run",
        "gen CPU"
    );
    for o in outcomes {
        let refused = o.load.answered() - o.accepted;
        println!(
            "{:<26} {:>7.0} {:>7.2} {:>7.2} {:>7.2} {:>7.1} {:>8} {:>7} {:>8} {:>7} {:>7.2} {:>7.0} {:>6.2}s {:>7.0} {:>6.0}%",
            o.name,
            o.load.per_sec(),
            o.load.at(500),
            o.load.at(900),
            o.load.at(990),
            o.load.latencies_us.last().copied().unwrap_or(0) as f64 / 1000.0,
            o.accepted,
            refused,
            o.recorded,
            o.failed,
            o.drain.as_secs_f64(),
            o.sustained,
            o.server_cpu.as_secs_f64(),
            o.cpu_per_run.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6),
            o.load.cpu.as_secs_f64() * 100.0 / o.load.elapsed.as_secs_f64(),
        );
    }
    for o in outcomes {
        println!("{:<26} answers: {}", o.name, o.load.statuses_text());
    }
    println!(
        "accepted: capstan 202 (the queued run recorded), webhook 200 (rule matched; default mode: \
         the command runs after the answer; `answer after cmd`: include-command-output-in-response, \
         the answer waits for the command). recorded: capstan's run records, webhook's `finished \
         handling` log lines; failed: not ok / command error. drain: from the end of the load to the \
         last run's end. runs/s: runs that ended ok / (first request .. last run's end). srv CPU: \
         the server and its children; µs/run: capstan, the server's CPU from the first request \
         to the last run's end per run; webhook, its whole CPU per command run; gen CPU: the load generator, of one core."
    );
}

fn ratio(a: Option<Duration>, b: Option<Duration>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) => a.as_secs_f64() / b.as_secs_f64(),
        _ => f64::NAN,
    }
}

/// CPU time of this process (all its threads: tokio's, sled's, the journal's).
fn own_cpu() -> Duration {
    cpu_of(std::process::id())
}

fn per_op(cpu: Duration, ops: usize) -> f64 {
    cpu.as_secs_f64() * 1e6 / ops.max(1) as f64
}

/// The run path's stages, each measured alone in this process on an engine of its own
/// (after the servers stopped): CPU per operation, in µs.
struct Stages {
    /// `RunStore::create`: the `queued` record and its two index entries.
    queued_record: f64,
    /// 16 writers each creating a record and waiting for [`Store::durable`] (group
    /// commit): the record and its share of the journal writes (write + fdatasync).
    queued_durable: f64,
    /// Journal writes the durable stage took, for its group size.
    flushes: u64,
    /// Their mean duration (write + fdatasync), µs.
    journal_write_us: f64,
    /// Durable records per second the 16 writers reached, without HTTP or runs: the
    /// ceiling the journal puts on 16 connections each waiting for its 202.
    durable_per_sec: f64,
    /// `PluginRuntime::run_as` of the trivial plugin: instantiate and call.
    instantiate_call: f64,
    /// `RunStore::finish`: the final record.
    final_record: f64,
    /// `Scheduler::submit_durable` to the run's end, 16 at a time: the whole run path
    /// without HTTP.
    submit_to_end: f64,
}

fn measure_stages(scratch: &Path) -> Stages {
    use capstan::plugin::TriggerEvent;
    use capstan::runs::{RunEnd, RunTrigger};
    use capstan::scheduler::Scheduler;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let engine = common::engine_in(&scratch.join("stages"));
    // The settings `capstan serve` had under the load (ENGINE_SETTINGS): no retention.
    let config = capstan::scheduler::SchedulerConfig {
        max_queued_per_plugin: 1_000_000,
        history: RunStoreConfig {
            keep_per_plugin: None,
            ..RunStoreConfig::default()
        },
        ..Default::default()
    };
    let runtime = std::sync::Arc::new(
        capstan::plugin::PluginRuntime::new(
            engine.clone(),
            capstan::plugin::RuntimeConfig {
                max_concurrent_runs: config.max_concurrent_runs as u32,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let scheduler = Scheduler::new(
        engine.clone(),
        runtime,
        std::sync::Arc::new(capstan::metrics::Metrics::new()),
        config,
    )
    .unwrap();
    let src = scratch.join("stages-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(wasm_path("trivial"), src.join("plugin.wasm")).unwrap();
    std::fs::write(
        src.join("plugin.toml"),
        "name = \"stages\"\nversion = \"1\"\n",
    )
    .unwrap();
    scheduler
        .runtime()
        .install(&src.join("plugin.wasm"), None)
        .unwrap();
    let runs = scheduler.runs().clone();
    let webhook = || RunTrigger::Webhook {
        hook: HOOK.into(),
        delivery: None,
    };

    // The queued record alone.
    let t = own_cpu();
    let ids: Vec<_> = (0..BREAKDOWN_OPS)
        .map(|_| runs.create("stages", webhook()).unwrap().id)
        .collect();
    let queued_record = per_op(own_cpu() - t, BREAKDOWN_OPS);

    // The final record alone.
    let t = own_cpu();
    for id in &ids {
        runs.finish(*id, RunEnd::ok(Some(serde_json::json!({"ok": true}))))
            .unwrap();
    }
    let final_record = per_op(own_cpu() - t, BREAKDOWN_OPS);

    // The queued record made durable, 16 writers at a time.
    let flushes_before = engine.store.flushes();
    let busy_before = engine.store.journal_busy();
    let t = own_cpu();
    let wall = Instant::now();
    rt.block_on(async {
        let per = BREAKDOWN_OPS / 16;
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (runs, store) = (runs.clone(), engine.store.clone());
                tokio::spawn(async move {
                    for _ in 0..per {
                        let r = runs.create("stages", webhook()).unwrap();
                        store.durable().await.unwrap();
                        runs.finish(r.id, RunEnd::ok(None)).unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let durable_per_sec = BREAKDOWN_OPS as f64 / wall.elapsed().as_secs_f64();
    let flushes = engine.store.flushes() - flushes_before;
    let journal_write_us =
        (engine.store.journal_busy() - busy_before).as_secs_f64() * 1e6 / flushes.max(1) as f64;
    // The finish of each is the final record stage, measured above: not counted here.
    let queued_durable = per_op(own_cpu() - t, BREAKDOWN_OPS) - final_record;

    // Instantiate and call, one after another.
    let n = BREAKDOWN_OPS / 2;
    let t = own_cpu();
    rt.block_on(async {
        for _ in 0..n {
            let event = TriggerEvent::manual("");
            scheduler
                .runtime()
                .run_as("stages", event, uuid::Uuid::now_v7())
                .await
                .unwrap();
        }
    });
    let instantiate_call = per_op(own_cpu() - t, n);

    // The whole path without HTTP: 16 submitters, each waiting for its run's end.
    let t = own_cpu();
    rt.block_on(async {
        let per = n / 16;
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let scheduler = scheduler.clone();
                tokio::spawn(async move {
                    for _ in 0..per {
                        let event = TriggerEvent::Webhook {
                            hook: HOOK.into(),
                            delivery: None,
                            headers: Vec::new(),
                            body: BODY.to_vec(),
                        };
                        let id = scheduler.submit_durable("stages", event).await.unwrap();
                        scheduler.until_ended(id).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let submit_to_end = per_op(own_cpu() - t, n / 16 * 16);
    Stages {
        queued_record,
        queued_durable,
        flushes,
        journal_write_us,
        durable_per_sec,
        instantiate_call,
        final_record,
        submit_to_end,
    }
}

fn print_breakdown(capstan: &Outcome, stages: &Stages) {
    let http = capstan.http_cpu.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
    let total = capstan
        .cpu_per_run
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
    println!();
    println!("where a webhook run's CPU goes (µs of CPU per run; each stage measured alone):");
    let rows = [
        (
            "HTTP + signature (a delivery refused 401, in the server)",
            http,
        ),
        (
            "admission + queued record (RunStore::create)",
            stages.queued_record,
        ),
        (
            "  + group commit (16 writers, Store::durable: journal)",
            stages.queued_durable - stages.queued_record,
        ),
        (
            "instantiate + call (the trivial plugin)",
            stages.instantiate_call,
        ),
        ("final record (RunStore::finish)", stages.final_record),
    ];
    let mut sum = 0.0;
    for (what, us) in rows {
        sum += us;
        println!("  {what:<58} {us:>8.1}");
    }
    println!("  {:<58} {sum:>8.1}", "sum of the stages");
    println!(
        "  {:<58} {:>8.1}",
        "in-process run path (submit_durable .. run end, 16 at once)", stages.submit_to_end
    );
    println!(
        "  {:<58} {total:>8.1}",
        "capstan serve under the load (server CPU / recorded run)"
    );
    println!(
        "  group commit: {} journal writes (write + fdatasync) for {BREAKDOWN_OPS} durable records ({:.1} records per write)",
        stages.flushes,
        BREAKDOWN_OPS as f64 / stages.flushes.max(1) as f64
    );
    println!(
        "  journal write (write + fdatasync): {:.0} µs wall on average; 16 writers alone \
         (no HTTP, no runs) made {:.0} records/s durable, the ceiling for 16 connections",
        stages.journal_write_us, stages.durable_per_sec
    );
    println!(
        "  the rest ({:.1} µs): task hand-offs between the HTTP task, the run task and the \
         journal thread, sled's background flushes (its own, and the journal's checkpoints), metrics",
        total - sum
    );
}

fn main() -> ExitCode {
    if std::env::var("CAPSTAN_BENCH_ONLY").as_deref() == Ok("stages") {
        // The in-process stages alone (for working on one of them).
        let scratch = tempfile::tempdir().unwrap();
        let s = measure_stages(scratch.path());
        println!(
            "queued record {:.1} µs, + durable {:.1} µs ({} flushes), instantiate + call {:.1} µs, final record {:.1} µs, submit..end {:.1} µs",
            s.queued_record,
            s.queued_durable,
            s.flushes,
            s.instantiate_call,
            s.final_record,
            s.submit_to_end
        );
        return ExitCode::SUCCESS;
    }
    let seconds = env_or("CAPSTAN_BENCH_SECONDS", 10);
    let connections = env_or("CAPSTAN_BENCH_CONNECTIONS", 16) as usize;
    let duration = Duration::from_secs(seconds);
    // Fail before anything starts when a tool or the plugin is missing.
    require_tool("webhook", "webhook");
    wasm_path("trivial");
    let scratch = tempfile::tempdir().unwrap();
    println!(
        "load: {connections} keep-alive connections, back-to-back signed POSTs for {seconds} s \
         (CAPSTAN_BENCH_CONNECTIONS, CAPSTAN_BENCH_SECONDS), from a tokio + hyper generator \
         on one thread of this process; {} cores shared by the generator, the server and its runs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // The engine as configured by default (one async worker per core), and with one
    // worker: on a small machine whose load is many tiny runs, the wake-ups between
    // workers cost more than the second worker gives.
    let capstan = bench_capstan(
        scratch.path(),
        connections,
        duration,
        None,
        "capstan (trivial plugin)",
    );
    let one_worker = bench_capstan(
        scratch.path(),
        connections,
        duration,
        Some("1"),
        "capstan, 1 worker thread",
    );
    let background = bench_webhook(scratch.path(), Mode::Background, connections, duration);
    let after = bench_webhook(scratch.path(), Mode::AfterCommand, connections, duration);
    let all = [&capstan, &one_worker, &background, &after];

    print_table(&all);
    let stages = measure_stages(scratch.path());
    print_breakdown(&capstan, &stages);
    for c in [&capstan, &one_worker] {
        for base in [&background, &after] {
            println!(
                "{} / {}: {:.2}x requests/s, {:.2}x runs/s; p50 latency {:.2}x, p99 {:.2}x; CPU per run {:.2}x",
                c.name,
                base.name,
                c.load.per_sec() / base.load.per_sec(),
                c.sustained / base.sustained,
                c.load.at(500) / base.load.at(500),
                c.load.at(990) / base.load.at(990),
                ratio(c.cpu_per_run, base.cpu_per_run),
            );
        }
    }
    for n in all.iter().flat_map(|o| &o.notes) {
        println!("{n}");
    }
    let mismatches: Vec<&String> = all.iter().flat_map(|o| &o.mismatches).collect();
    if mismatches.is_empty() {
        println!(
            "capstan recorded every accepted delivery's run, all ok; webhook's log accounts for every accepted delivery"
        );
        ExitCode::SUCCESS
    } else {
        for m in mismatches {
            println!("MISMATCH {m}");
        }
        ExitCode::FAILURE
    }
}
