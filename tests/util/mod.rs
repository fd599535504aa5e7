//! Shared helpers for the integration tests: the test infrastructure's facts, the
//! capstan binary, scratch data directories.

#![allow(dead_code)]

pub mod browser;
pub mod plugin;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// Facts written by `scripts/testinfra up` to `target/testinfra/infra.env`.
pub struct Infra {
    vars: HashMap<String, String>,
}

impl Infra {
    /// The running test infrastructure. Panics with what to do when it is not up: a test
    /// that needs sshd or the TLS endpoint must fail, never skip, when they are missing.
    pub fn get() -> &'static Infra {
        static INFRA: OnceLock<Infra> = OnceLock::new();
        INFRA.get_or_init(|| {
            let dir = std::env::var_os("CAPSTAN_TESTINFRA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/testinfra"));
            let path = dir.join("infra.env");
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "test infrastructure is not set up ({}: {e}): run `scripts/testinfra up` (the README's test command does)",
                    path.display()
                )
            });
            let vars = text
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            Infra { vars }
        })
    }

    /// One fact; panics naming the key when the infrastructure did not write it.
    pub fn var(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .unwrap_or_else(|| panic!("infra.env has no {key}: re-run `scripts/testinfra up`"))
    }

    /// One fact, if the infrastructure wrote it.
    pub fn fact(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    pub fn path(&self, key: &str) -> PathBuf {
        PathBuf::from(self.var(key))
    }
}

/// The test NATS cluster's client URLs, comma-separated as `serve --cluster` takes them
/// (`NATS_URLS`: three JetStream nodes on loopback). Panics with what to do when the
/// infrastructure did not start them: cluster tests fail, never skip, without NATS.
pub fn nats_urls() -> &'static str {
    Infra::get()
        .fact("NATS_URLS")
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "infra.env has no NATS_URLS: the NATS cluster is not up; run `scripts/testinfra up` (it installs nats-server and starts three JetStream nodes)"
            )
        })
}

/// The `capstan` binary built for these tests.
pub fn capstan_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_capstan"))
}

/// A scratch data directory with a key-file vault.
pub struct DataDir {
    pub dir: tempfile::TempDir,
}

impl DataDir {
    /// An empty directory (no vault yet).
    pub fn empty() -> DataDir {
        DataDir {
            dir: tempfile::tempdir().expect("create a temp dir"),
        }
    }

    /// A directory with a key-file vault created by `capstan vault init`.
    pub fn with_vault() -> DataDir {
        let d = DataDir::empty();
        let out = d.capstan(&["vault", "init"]);
        assert_success(&out, "vault init");
        d
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A `capstan` command pointed at this data directory, with a clean environment.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(capstan_bin());
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CAPSTAN_DATA_DIR", self.data())
            .env("CAPSTAN_LOG", "warn")
            .stdin(Stdio::null());
        c
    }

    pub fn capstan(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run capstan")
    }

    /// Runs capstan with `input` on stdin.
    pub fn capstan_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn capstan");
        // A process that refuses its input may exit before reading all of it: a broken
        // pipe here is its answer, not a test failure.
        let _ = child.stdin.take().unwrap().write_all(input);
        child.wait_with_output().expect("wait for capstan")
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
pub fn assert_success(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

#[track_caller]
pub fn assert_failure_says(o: &Output, needle: &str) {
    assert!(
        !o.status.success(),
        "expected failure, got success:\n{}",
        stdout(o)
    );
    let err = stderr(o);
    assert!(
        err.contains(needle),
        "expected stderr to contain {needle:?}, got:\n{err}"
    );
}

/// [`http`] with a JSON body (none when `body` is null) and `auth` as the
/// `Authorization` header.
pub fn http_json(
    addr: &str,
    auth: &str,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> (u16, String) {
    let body = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(body).unwrap()
    };
    http(
        addr,
        method,
        path,
        &[
            ("Authorization", auth),
            ("Content-Type", "application/json"),
        ],
        &body,
    )
}

/// A minimal HTTP/1.1 client for tests: one request per connection, whole response read.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let text = http_raw(addr, method, path, headers, body);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    (status, body)
}

/// One request on a connection of its own; the whole response as text (head and body,
/// as sent).
pub fn http_raw(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> String {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

/// A chunked body's content.
pub fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n.min(after.len())]);
        rest = after.get(n + 2..).unwrap_or("");
    }
    out
}

/// A `capstan serve` process on a free loopback port; killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub addr: String,
    /// Everything serve printed on stdout before it started listening.
    pub banner: String,
}

impl Server {
    pub fn start(data: &DataDir) -> Server {
        Self::start_with(data, |_| {})
    }

    pub fn start_with(data: &DataDir, configure: impl FnOnce(&mut Command)) -> Server {
        use std::io::BufRead;
        let mut cmd = data.cmd();
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        configure(&mut cmd);
        let mut child = cmd.spawn().expect("spawn capstan serve");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        let addr = loop {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).ok();
                panic!("capstan serve exited before listening:\n{banner}\n{err}");
            }
            banner.push_str(&line);
            let line_now = line.trim();
            if let Some(a) = line_now
                .strip_prefix("capstan API listening on http://")
                .or_else(|| line_now.strip_prefix("capstan API listening on https://"))
            {
                break a.to_string();
            }
        };
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Server {
            child,
            addr,
            banner,
        }
    }

    /// The admin token `serve` printed on first start.
    pub fn admin_token(&self) -> String {
        self.banner
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("cap_"))
            .unwrap_or_else(|| panic!("no admin token in the banner:\n{}", self.banner))
            .to_string()
    }

    /// Sends SIGTERM, waits, and returns everything serve wrote to stderr (its log).
    pub fn stop_and_collect_stderr(mut self) -> String {
        unsafe_kill(self.child.id() as i32, 15);
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err).ok();
        }
        self.child.wait().unwrap();
        std::mem::forget(self);
        err
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        unsafe_kill(pid, 15);
        let st = self.child.wait().unwrap();
        std::mem::forget(self);
        st
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal to a process this test started.
pub fn unsafe_kill(pid: i32, sig: i32) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// A loopback TCP port free at the time of the call (the OS's pick), for a server a test
/// starts itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}
