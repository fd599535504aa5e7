//! A fleet of SSH devices in little memory: a real `capstan serve` holding one SSH
//! session per device, and `capstan device check --all` across them.
//!
//! `cargo bench --bench fleet` (release), after `scripts/testinfra up`, whose private sshd
//! is configured for a fleet (`MaxStartups`; it fails naming what is missing otherwise).
//! `CAPSTAN_BENCH_DEVICES` (default 1000) SSH devices are registered through the API, all
//! pointing at that sshd (its key-only test user, the host key pinned), in a scratch data
//! directory of a release `capstan serve` whose `[docker] check_concurrency` is
//! `CAPSTAN_BENCH_CONCURRENCY` (default 16, also the CLI's `--concurrency`) and whose
//! `[docker] idle_timeout` is `CAPSTAN_BENCH_IDLE_SECS` (default 60). Then:
//!
//! 1. **Memory.** The engine's resident memory (`VmRSS` of the serve process) before
//!    connecting, with one session (what the first costs once: crypto tables, buffers of
//!    the runtime's threads), and after `capstan device check --all --pooled`, which has
//!    the engine open every device's pooled SSH session (the one plugins and proxies use)
//!    and keep it, with one kept Docker connection (an SSH channel) each; then once those
//!    connections have passed `idle_timeout` and closed, leaving the sessions alone and
//!    idle (`/metrics` says when: `capstan_ssh_sessions` N, `capstan_ssh_channels` 0).
//!    Printed per device: (RSS then − RSS before connecting) / N, and past the first:
//!    (RSS then − RSS with one) / (N − 1). Memory the allocator keeps after the kept
//!    connections closed still counts.
//! 2. **Checks.** `device check --all --pooled` again, over the kept sessions (a channel
//!    each, no login), then the wall time of `device check --all` (fresh: TCP, handshake,
//!    login, a channel to the Docker socket, ping, version, info, per device), every
//!    device reporting connected, each with the CPU per check of the engine, of dockerd
//!    and (fresh) of sshd's session processes: with every device on this one sshd and
//!    daemon, sharing two cores, the server side is the bound, not the engine, and the
//!    engine's CPU per check says how fast it alone would go.
//!
//! Baselines, measured in the same run against the same sshd:
//! - memory: what OpenSSH's own client holds per connection, `ssh -N` (no command, as a
//!   kept session is): the proportional set size (PSS: shared library pages divided among
//!   the processes sharing them, so the fair per-process cost) of
//!   `CAPSTAN_BENCH_SSH_CLIENTS` (default 100) such processes, each logged in (its
//!   `LocalCommand` says so), averaged. This is what the docker CLI's `ssh://` mode and
//!   tools that keep an `ssh` process per host pay. Also printed: the engine's RSS with
//!   no device.
//! - memory: the SSH library's own share: this bench, run again as a child process with
//!   the engine's allocator and session settings and no Docker client, logs the same
//!   number of bare russh sessions in and keeps them idle; its resident memory per
//!   session is printed beside the engine's, with the ratio.
//! - checks: the same number of OpenSSH logins running `true` (`ssh host true`), at the
//!   same concurrency: logging in to every host with the standard client, the sshd side
//!   included as it is for the checks.
//!
//! The sshd side (a process pair per session) is not the engine's memory; it is printed
//! for the machine's sake, with the memory available. Everything the bench started is
//! stopped at the end, on failure too; the sessions close with the engine, and the bench
//! waits until sshd is back to its own processes.

// Benchmarks set up environments for the processes they start.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// The engine's allocator (src/main.rs), so the SSH library's own sessions below are
// measured as the engine would hold them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Set in the environment of this bench's own child that holds bare SSH library sessions
/// (the number to open), see [`russh_held`].
const RUSSH_CHILD: &str = "CAPSTAN_BENCH_RUSSH_CHILD";

/// The longest any one step may take before the bench gives up.
const STEP_LIMIT: Duration = Duration::from_secs(600);

fn env_or(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            fail(&format!("{name}={v:?} is not a number"));
        }),
        Err(_) => default,
    }
}

/// The processes this bench started and has not stopped yet: [`fail`] kills them.
static STARTED: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Stops what the bench started (by PID), prints `msg` and exits non-zero.
fn fail(msg: &str) -> ! {
    let pids = std::mem::take(&mut *STARTED.lock().unwrap_or_else(|e| e.into_inner()));
    for pid in pids {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    eprintln!("error: {msg}");
    std::process::exit(2)
}

// ---------------------------------------------------------------------------------------
// The test infrastructure

struct Infra(HashMap<String, String>);

impl Infra {
    fn load() -> Infra {
        let dir = std::env::var_os("CAPSTAN_TESTINFRA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/testinfra"));
        let path = dir.join("infra.env");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            fail(&format!(
                "the test infrastructure is not set up ({}: {e}); run `scripts/testinfra up` first (as root)",
                path.display()
            ))
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
        self.0.get(k).map(String::as_str).unwrap_or_else(|| {
            fail(&format!(
                "infra.env has no {k}; re-run `scripts/testinfra up`"
            ))
        })
    }

    fn read(&self, k: &str) -> String {
        let p = self.var(k);
        std::fs::read_to_string(p)
            .unwrap_or_else(|e| fail(&format!("{k} ({p}): {e}; re-run `scripts/testinfra up`")))
    }
}

/// What the fleet needs of the test sshd and of this machine, or a clear failure.
fn preflight(infra: &Infra, devices: usize, concurrency: usize) -> u32 {
    let port = infra.var("SSH_PORT");
    let sshd_pid: u32 = infra.var("SSH_PID").parse().unwrap_or(0);
    if !Path::new(&format!("/proc/{sshd_pid}")).exists() {
        fail(&format!(
            "the test sshd (pid {sshd_pid}) is not running; run `scripts/testinfra up`"
        ));
    }
    if TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap_or(0))).is_err() {
        fail(&format!(
            "nothing answers on the test sshd's port {port}; run `scripts/testinfra up`"
        ));
    }
    // sshd drops new connections past MaxStartups' first number of unauthenticated ones.
    let config = infra.read("SSH_CONFIG");
    let startups: usize = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("MaxStartups "))
        .and_then(|v| v.split(':').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(10);
    if startups < concurrency * 2 {
        fail(&format!(
            "the test sshd allows {startups} connections in their handshake (MaxStartups in {}); \
             {concurrency} checks at once need {}: re-run `scripts/testinfra up`, or lower CAPSTAN_BENCH_CONCURRENCY",
            infra.var("SSH_CONFIG"),
            concurrency * 2
        ));
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which lives on our stack.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let wanted = (devices + 512) as u64;
    if lim.rlim_max != libc::RLIM_INFINITY && lim.rlim_max < wanted {
        fail(&format!(
            "the open-file limit is {} (ulimit -Hn); the engine holds a socket per device and needs {wanted} for {devices} devices",
            lim.rlim_max
        ));
    }
    let ssh = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .any(|d| d.join("ssh").is_file());
    if !ssh {
        fail("`ssh` is not installed: apt-get install openssh-client (the baseline uses it)");
    }
    sshd_pid
}

// ---------------------------------------------------------------------------------------
// Processes and their memory

/// A process this bench started: killed (by its PID) and reaped when dropped, unless
/// stopped before.
struct Proc {
    name: &'static str,
    child: Option<Child>,
}

impl Proc {
    fn new(name: &'static str, child: Child) -> Proc {
        STARTED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Proc {
            name,
            child: Some(child),
        }
    }

    fn forget_pid(pid: u32) {
        STARTED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&p| p != pid);
    }

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
        let st = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            if Instant::now() > until {
                eprintln!("{} did not stop within {grace:?}: killed", self.name);
                let _ = child.kill();
                break child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Proc::forget_pid(child.id());
        st
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            Proc::forget_pid(c.id());
        }
    }
}

/// A `kB` field of `/proc/<pid>/status` or `smaps_rollup`, in KiB.
fn proc_kib(pid: u32, file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn rss_kib(pid: u32) -> u64 {
    proc_kib(pid, "status", "VmRSS:").unwrap_or_else(|| fail(&format!("no VmRSS for pid {pid}")))
}

fn pss_kib(pid: u32) -> Option<u64> {
    proc_kib(pid, "smaps_rollup", "Pss:")
}

/// Every process below `root` (not `root` itself), from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or("");
        if let Some(pp) = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            parent.insert(pid, pp);
        }
    }
    parent
        .keys()
        .copied()
        .filter(|&p| {
            let mut at = p;
            for _ in 0..64 {
                match parent.get(&at) {
                    Some(&pp) if pp == root => return true,
                    Some(&pp) if pp > 1 => at = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

/// The processes sshd forked for sessions, and their memory (RSS, PSS) in MiB.
fn sshd_side(sshd: u32) -> (usize, f64, f64) {
    let procs = descendants(sshd);
    let rss: u64 = procs
        .iter()
        .filter_map(|&p| proc_kib(p, "status", "VmRSS:"))
        .sum();
    let pss: u64 = procs.iter().filter_map(|&p| pss_kib(p)).sum();
    (procs.len(), rss as f64 / 1024.0, pss as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------
// The engine and its API

fn capstan_cmd(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capstan"));
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CAPSTAN_DATA_DIR", data)
        .env("CAPSTAN_LOG", "warn")
        .stdin(Stdio::null());
    c
}

/// Runs the CLI to its end within [`STEP_LIMIT`]: exit status, stdout, stderr, wall time.
fn capstan_timed(data: &Path, args: &[&str]) -> (bool, String, String, Duration) {
    let start = Instant::now();
    let mut child = capstan_cmd(data)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capstan");
    let pid = child.id();
    STARTED.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > STEP_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            fail(&format!(
                "capstan {} did not finish within {STEP_LIMIT:?}",
                args.join(" ")
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = start.elapsed();
    Proc::forget_pid(pid);
    (
        status.success(),
        out_reader.join().unwrap(),
        err_reader.join().unwrap(),
        wall,
    )
}

fn capstan_ok(data: &Path, args: &[&str]) -> String {
    let (ok, out, err, _) = capstan_timed(data, args);
    if !ok {
        fail(&format!("capstan {} failed:\n{out}{err}", args.join(" ")));
    }
    out
}

struct Api {
    addr: SocketAddr,
    token: String,
}

impl Api {
    /// One request with `Connection: close`: status and body.
    fn call(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, String) {
        let mut s = TcpStream::connect(self.addr)
            .unwrap_or_else(|e| fail(&format!("cannot reach the engine on {}: {e}", self.addr)));
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            self.token,
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| fail(&format!("not an HTTP response: {text:?}")));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// A gauge of `/metrics`.
    fn gauge(&self, name: &str) -> f64 {
        let (status, body) = self.call("GET", "/metrics", None);
        if status != 200 {
            fail(&format!("GET /metrics answered {status}: {body}"));
        }
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| fail(&format!("no {name} in /metrics")))
    }

    /// Waits (polling `/metrics`) until `cond` holds for the SSH sessions and channels.
    fn wait_for(&self, what: &str, limit: Duration, cond: impl Fn(f64, f64) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            let (s, c) = (
                self.gauge("capstan_ssh_sessions"),
                self.gauge("capstan_ssh_channels"),
            );
            if cond(s, c) {
                return start.elapsed();
            }
            if start.elapsed() > limit {
                fail(&format!(
                    "{what} did not happen within {limit:?}: {s} SSH sessions, {c} channels"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Starts `capstan serve` on a loopback port with `env`; its process and API.
fn start_engine(data: &Path, scratch: &Path, env: &[(&str, String)]) -> (Proc, Api) {
    let mut cmd = capstan_cmd(data);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let stderr_path = scratch.join("serve.stderr");
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let mut server = Proc::new("capstan serve", cmd.spawn().expect("spawn capstan serve"));
    let stdout = server.child.as_mut().unwrap().stdout.take().unwrap();
    let mut stdout = BufReader::new(stdout);
    let mut banner = String::new();
    let addr: SocketAddr = loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            fail(&format!(
                "capstan serve exited before listening:\n{banner}\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            ));
        }
        banner.push_str(&line);
        if let Some(a) = line.trim().strip_prefix("capstan API listening on http://") {
            break a.parse().expect("the API address");
        }
    };
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    // The CLI's token file: the API's address, then the token.
    let token_file = std::fs::read_to_string(data.join("cli.token"))
        .unwrap_or_else(|e| fail(&format!("serve wrote no cli.token: {e}")));
    let token = token_file
        .lines()
        .nth(1)
        .unwrap_or_else(|| fail("cli.token has no token line"))
        .trim()
        .to_string();
    (server, Api { addr, token })
}

/// Registers `n` SSH devices `fleet-00001…` through the API, 8 requests at a time.
fn register(api: &Api, infra: &Infra, n: usize) -> Vec<String> {
    let names: Vec<String> = (1..=n).map(|i| format!("fleet-{i:05}")).collect();
    let spec = serde_json::json!({
        "kind": "ssh",
        "host": infra.var("SSH_HOST4"),
        "port": infra.var("SSH_PORT").parse::<u16>().unwrap(),
        "user": infra.var("SSH_USER_KEY"),
        "private_key": infra.read("SSH_KEY_ED25519"),
        "host_key": infra.read("SSH_HOST_KEY_PUB").trim(),
    });
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(name) = names.get(i) else { break };
                    let mut body = spec.clone();
                    body["name"] = name.as_str().into();
                    let (status, answer) = api.call("POST", "/api/devices", Some(&body));
                    if status != 201 {
                        fail(&format!("adding device {name} answered {status}: {answer}"));
                    }
                }
            });
        }
    });
    names
}

/// Parses `device check --all --json` and fails naming the devices that did not connect.
fn all_connected(what: &str, out: &str, err: &str, expected: usize) -> Vec<serde_json::Value> {
    let reports: Vec<serde_json::Value> = serde_json::from_str(out).unwrap_or_else(|e| {
        fail(&format!(
            "{what}: not a JSON list of reports ({e}):\n{}\n{err}",
            &out[..out.len().min(2000)]
        ))
    });
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| r["connected"] != true)
        .map(|r| format!("{}: {}", r["device"], r["error"]["message"]))
        .collect();
    if !failed.is_empty() || reports.len() != expected {
        fail(&format!(
            "{what}: {} of {} reports, {} failed, e.g.:\n{}",
            reports.len(),
            expected,
            failed.len(),
            failed
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    reports
}

// ---------------------------------------------------------------------------------------
// The OpenSSH baselines

fn ssh_args(infra: &Infra) -> Vec<String> {
    [
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        &format!("UserKnownHostsFile={}", infra.var("SSH_KNOWN_HOSTS")),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ControlMaster=no",
        "-o",
        "ControlPath=none",
        "-i",
        infra.var("SSH_KEY_ED25519"),
        "-p",
        infra.var("SSH_PORT"),
        "-l",
        infra.var("SSH_USER_KEY"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `ssh -N` × `k`, each logged in: their mean PSS and RSS, in KiB.
fn openssh_held(infra: &Infra, k: usize) -> (f64, f64) {
    let mut procs = Vec::new();
    for _ in 0..k {
        let child = Command::new("ssh")
            .args(ssh_args(infra))
            .args([
                "-N",
                "-o",
                "PermitLocalCommand=yes",
                "-o",
                "LocalCommand=echo logged-in",
                infra.var("SSH_HOST4"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ssh");
        procs.push(Proc::new("ssh -N", child));
    }
    for p in &mut procs {
        let child = p.child.as_mut().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "logged-in" {
            let mut err = String::new();
            let _ = child.stderr.as_mut().unwrap().read_to_string(&mut err);
            fail(&format!("ssh -N did not log in: {err}"));
        }
    }
    let pss: u64 = procs.iter().filter_map(|p| pss_kib(p.pid())).sum();
    let rss: u64 = procs.iter().map(|p| rss_kib(p.pid())).sum();
    (pss as f64 / k as f64, rss as f64 / k as f64)
}

/// What the SSH library alone holds per idle session: this bench run again as a child
/// ([`russh_child`]) that logs `k` russh sessions in to the test sshd and keeps them.
/// Returns KiB of resident memory per session, and per session past the first.
fn russh_held(k: usize) -> (f64, f64) {
    let exe = std::env::current_exe().expect("the bench's own path");
    let child = Command::new(exe)
        .env(RUSSH_CHILD, k.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the bench's russh child");
    let mut p = Proc::new("russh sessions", child);
    let child = p.child.as_mut().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let nums: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    if nums.len() != 3 {
        let mut err = String::new();
        let _ = child.stderr.as_mut().unwrap().read_to_string(&mut err);
        fail(&format!("the russh child failed: {line}{err}"));
    }
    let (before, one, all) = (nums[0], nums[1], nums[2]);
    drop(p);
    ((all - before) / k as f64, (all - one) / (k - 1) as f64)
}

/// A logged-in session, kept (its handle is a future of the session's end).
struct Held(#[allow(dead_code)] russh::client::Handle<PinnedHost>);

/// Accepts the test sshd's own host key only.
struct PinnedHost(russh::keys::PublicKey);

impl russh::client::Handler for PinnedHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(
            matches!(key, russh::keys::PublicKeyOrCertificate::PublicKey { key, .. }
            if key.key_data() == self.0.key_data()),
        )
    }
}

/// The child of [`russh_held`]: logs `k` sessions in (16 at once) with the engine's
/// session settings (`src/docker/ssh.rs`), keeps them idle, and prints its resident KiB
/// before, with one session and with all of them, then waits to be killed.
fn russh_child(k: usize) -> ! {
    let infra = Infra::load();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let key = Arc::new(
        russh::keys::decode_secret_key(&infra.read("SSH_KEY_ED25519"), None)
            .expect("the test user's key"),
    );
    let host = russh::keys::PublicKey::from_openssh(infra.read("SSH_HOST_KEY_PUB").trim())
        .expect("the test sshd's host key");
    let config = Arc::new(russh::client::Config {
        nodelay: true,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        ..Default::default()
    });
    let addr = format!("{}:{}", infra.var("SSH_HOST4"), infra.var("SSH_PORT"));
    let user = infra.var("SSH_USER_KEY").to_string();
    let me = std::process::id();
    let login = || {
        let (config, key, host, addr, user) = (
            config.clone(),
            key.clone(),
            host.clone(),
            addr.clone(),
            user.clone(),
        );
        async move {
            let mut h = russh::client::connect(config, addr.as_str(), PinnedHost(host))
                .await
                .expect("russh connect");
            let auth = h
                .authenticate_publickey(user, russh::keys::PrivateKeyWithHashAlg::new(key, None))
                .await
                .expect("russh authenticate");
            assert!(auth.success(), "the test user's key was refused");
            Held(h)
        }
    };
    let before = rss_kib(me);
    let mut held = vec![rt.block_on(login())];
    std::thread::sleep(Duration::from_secs(1));
    let one = rss_kib(me);
    while held.len() < k {
        let batch = (k - held.len()).min(16);
        let handles: Vec<_> = (0..batch).map(|_| rt.spawn(login())).collect();
        for h in handles {
            held.push(rt.block_on(h).expect("a login task"));
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    println!("{before} {one} {}", rss_kib(me));
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// `ssh host true` × `n`, `concurrency` at once: the wall time.
fn openssh_logins(infra: &Infra, n: usize, concurrency: usize) -> Duration {
    let args = ssh_args(infra);
    let next = AtomicUsize::new(0);
    let failures = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let ok = Command::new("ssh")
                        .args(&args)
                        .args([infra.var("SSH_HOST4"), "true"])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success());
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let wall = start.elapsed();
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        fail(&format!("{failed} of {n} `ssh host true` logins failed"));
    }
    wall
}

// ---------------------------------------------------------------------------------------

fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

fn main() -> ExitCode {
    if let Ok(k) = std::env::var(RUSSH_CHILD) {
        russh_child(k.parse().expect("a session count"));
    }
    let n = env_or("CAPSTAN_BENCH_DEVICES", 1000);
    let concurrency = env_or("CAPSTAN_BENCH_CONCURRENCY", 16);
    let clients = env_or("CAPSTAN_BENCH_SSH_CLIENTS", 100).min(n).max(1);
    let idle_secs = env_or("CAPSTAN_BENCH_IDLE_SECS", 60).max(1) as u64;
    if n < 2 {
        fail("CAPSTAN_BENCH_DEVICES must be at least 2");
    }
    let infra = Infra::load();
    let sshd = preflight(&infra, n, concurrency);
    let sshd_before = descendants(sshd).len();
    println!(
        "fleet: {n} SSH devices (CAPSTAN_BENCH_DEVICES) on the test sshd (pid {sshd}, port {}), \
         {concurrency} checks at once (CAPSTAN_BENCH_CONCURRENCY); {} cores; {} MiB available",
        infra.var("SSH_PORT"),
        std::thread::available_parallelism().map_or(0, |c| c.get()),
        mem_available_mib()
    );

    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    capstan_ok(&data, &["vault", "init"]);
    let env = [
        ("CAPSTAN_DOCKER_CHECK_CONCURRENCY", concurrency.to_string()),
        ("CAPSTAN_DOCKER_IDLE_TIMEOUT", format!("{idle_secs}s")),
    ];
    let (mut server, api) = start_engine(&data, scratch.path(), &env);
    let pid = server.pid();
    let rss_empty = rss_kib(pid);

    let t = Instant::now();
    let names = register(&api, &infra, n);
    println!(
        "registered {} devices through the API in {:.1} s",
        names.len(),
        t.elapsed().as_secs_f64()
    );
    let rss_before = rss_kib(pid);

    // One session first: what the first costs once.
    let (ok, out, err, _) =
        capstan_timed(&data, &["device", "check", &names[0], "--pooled", "--json"]);
    if !ok {
        fail(&format!("the first pooled check failed:\n{out}{err}"));
    }
    let rss_one = rss_kib(pid);

    // Every device's pooled session, each with one kept Docker connection.
    let (_, out, err, connect_wall) = capstan_timed(
        &data,
        &[
            "device",
            "check",
            "--all",
            "--pooled",
            "--json",
            "--concurrency",
            &concurrency.to_string(),
        ],
    );
    all_connected("device check --all --pooled", &out, &err, n + 1);
    let rss_kept = rss_kib(pid);
    let kept = api.gauge("capstan_ssh_channels") as usize;

    // The kept connections pass idle_timeout and close (the reaper looks every half of
    // it): the sessions alone remain.
    let waited = api.wait_for(
        "the kept connections closing after idle_timeout",
        Duration::from_secs(idle_secs * 2 + 30),
        |s, c| s as usize == n && c == 0.0,
    );
    let rss_idle = rss_kib(pid);
    let (sshd_procs, sshd_rss, sshd_pss) = sshd_side(sshd);

    // Checks over the kept sessions: no handshake, a channel each.
    let dockerd = dockerd_pid();
    let (engine0, dockerd0) = (cpu_of(pid), dockerd.map(cpu_of));
    let (_, out, err, pooled_wall) = capstan_timed(
        &data,
        &[
            "device",
            "check",
            "--all",
            "--pooled",
            "--json",
            "--concurrency",
            &concurrency.to_string(),
        ],
    );
    all_connected("device check --all --pooled, again", &out, &err, n + 1);
    let pooled_engine_cpu = cpu_of(pid) - engine0;
    let pooled_dockerd_cpu = dockerd.zip(dockerd0).map(|(p, c)| cpu_of(p) - c);

    let engine_cpu_before = cpu_of(pid);
    let sshd_cpu_before = reaped_cpu_of(sshd);
    let dockerd_cpu_before = dockerd.map(cpu_of);

    // Fresh checks of every device.
    let (_, out, err, check_wall) = capstan_timed(
        &data,
        &[
            "device",
            "check",
            "--all",
            "--json",
            "--concurrency",
            &concurrency.to_string(),
        ],
    );
    let reports = all_connected("device check --all", &out, &err, n + 1);
    let mut totals: Vec<f64> = reports
        .iter()
        .filter_map(|r| r["total_ms"].as_f64())
        .collect();
    totals.sort_by(f64::total_cmp);
    let pct = |p: f64| totals[((totals.len() - 1) as f64 * p).round() as usize];
    let rss_checked = rss_kib(pid);
    let engine_cpu = cpu_of(pid) - engine_cpu_before;
    let sshd_cpu = reaped_cpu_of(sshd) - sshd_cpu_before;
    let dockerd_cpu = dockerd.zip(dockerd_cpu_before).map(|(p, c)| cpu_of(p) - c);

    // Stop the engine: its sessions close with it.
    let st = server.stop(Duration::from_secs(60));
    if !st.success() {
        fail(&format!(
            "capstan serve exited with {st}:\n{}",
            std::fs::read_to_string(scratch.path().join("serve.stderr")).unwrap_or_default()
        ));
    }
    sshd_back(sshd, sshd_before, "the engine stopped");

    // Baselines: OpenSSH's client against the same sshd.
    let (ssh_pss, ssh_rss) = openssh_held(&infra, clients);
    sshd_back(sshd, sshd_before, "the `ssh -N` clients ended");
    let ssh_wall = openssh_logins(&infra, n, concurrency);
    sshd_back(sshd, sshd_before, "the `ssh host true` logins ended");
    let (bare_per, bare_marginal) = russh_held(n);
    sshd_back(sshd, sshd_before, "the russh baseline ended");

    let per = |after: u64, before: u64, count: usize| (after as f64 - before as f64) / count as f64;
    let idle_per = per(rss_idle, rss_before, n);
    let idle_marginal = per(rss_idle, rss_one, n - 1);
    let kept_per = per(rss_kept, rss_before, n);
    let kept_marginal = per(rss_kept, rss_one, n - 1);

    println!();
    println!(
        "engine RSS: {} with no device; {} with {n} devices registered, none connected; \
              {} with one session",
        mib(rss_empty as f64),
        mib(rss_before as f64),
        mib(rss_one as f64)
    );
    println!(
        "sessions opened (device check --all --pooled): {n} in {:.2} s, {concurrency} at once",
        connect_wall.as_secs_f64()
    );
    println!(
        "  just after, with {kept} kept Docker connections (SSH channels): RSS {} -> {:.1} KiB per device ({:.1} KiB past the first)",
        mib(rss_kept as f64),
        kept_per,
        kept_marginal
    );
    println!(
        "  idle sessions alone ({:.0} s later, the kept connections closed): RSS {} -> {:.1} KiB per idle device session ({:.1} KiB past the first); goal < 100 KB",
        waited.as_secs_f64(),
        mib(rss_idle as f64),
        idle_per,
        idle_marginal
    );
    println!(
        "  sshd side (not the engine's): {sshd_procs} processes, RSS {sshd_rss:.0} MiB, PSS {sshd_pss:.0} MiB; {} MiB available",
        mem_available_mib()
    );
    let per_check = |d: Duration| d.as_secs_f64() * 1000.0 / (n + 1) as f64;
    let dockerd_text = |d: Option<Duration>| match d {
        Some(d) => format!("{:.1} ms", per_check(d)),
        None => "? (no dockerd process found)".into(),
    };
    println!(
        "device check --all --pooled (over the kept sessions): {n} devices (+ local) in {:.2} s; \
         CPU per check: engine {:.1} ms, dockerd {} (ping, version, info: the one daemon is the bound)",
        pooled_wall.as_secs_f64(),
        per_check(pooled_engine_cpu),
        dockerd_text(pooled_dockerd_cpu),
    );
    println!(
        "device check --all (fresh connections): {n} devices (+ local) in {:.2} s with --concurrency {concurrency} (engine check_concurrency {concurrency}); \
         per check p50 {:.1} ms, p99 {:.1} ms; {:.1} checks/s",
        check_wall.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        (n + 1) as f64 / check_wall.as_secs_f64()
    );
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
    println!(
        "  CPU per check: engine {:.1} ms, sshd (its session processes) {:.1} ms, dockerd {}: the one sshd on this \
         machine is the bound; the engine alone would check {:.0} devices/s on {cores} cores. Engine RSS after the checks {}",
        per_check(engine_cpu),
        sshd_cpu.as_secs_f64() * 1000.0 / n as f64,
        dockerd_text(dockerd_cpu),
        (n + 1) as f64 * cores / engine_cpu.as_secs_f64().max(0.001),
        mib(rss_checked as f64),
    );
    println!(
        "baseline OpenSSH: `ssh -N` holding a connection: PSS {:.0} KiB, RSS {:.0} KiB per process (mean of {clients}); \
         `ssh host true` x {n}, {concurrency} at once: {:.2} s",
        ssh_pss,
        ssh_rss,
        ssh_wall.as_secs_f64()
    );
    println!(
        "baseline the SSH library alone (russh, the engine's allocator and session settings, \
         no Docker client, in a process of its own): {n} sessions logged in and idle: \
         {bare_per:.1} KiB per session ({bare_marginal:.1} KiB past the first); \
         capstan's idle device session / the library's bare session: {:.2}x",
        idle_marginal / bare_marginal.max(0.1)
    );
    println!(
        "ratios: OpenSSH PSS per connection / capstan RSS per idle session: {:.1}x; \
         capstan device check --all / OpenSSH logins: {:.2}x the time",
        ssh_pss / idle_per.max(0.1),
        check_wall.as_secs_f64() / ssh_wall.as_secs_f64()
    );
    ExitCode::SUCCESS
}

/// Waits (up to a minute, else fails) until sshd has no more session processes than
/// `before`: what `after` left has closed.
fn sshd_back(sshd: u32, before: usize, after: &str) {
    let t = Instant::now();
    while descendants(sshd).len() > before {
        if t.elapsed() > Duration::from_secs(60) {
            fail(&format!(
                "sshd still has {} session processes a minute after {after}",
                descendants(sshd).len() - before
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// CPU time of a process (`own`: itself; else its reaped children), from /proc (10 ms
/// ticks).
fn ticks_of(pid: u32, own: bool) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let range = if own { 11..13 } else { 13..15 };
    let ticks: u64 = fields
        .get(range)
        .map(|f| f.iter().filter_map(|x| x.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// The Docker daemon's process (the first `dockerd` in /proc), whose CPU the checks use.
fn dockerd_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "dockerd")
        })
}

/// CPU time of a process itself.
fn cpu_of(pid: u32) -> Duration {
    ticks_of(pid, true)
}

/// CPU time of the children a process has reaped (sshd: its session processes that
/// ended, with theirs).
fn reaped_cpu_of(pid: u32) -> Duration {
    ticks_of(pid, false)
}
