//! What a client can hold open on `capstan serve` and `capstan proxy`: half-open
//! connections beyond a 1,024 open-file limit, request heads that never end, bodies that
//! stop arriving, idle kept-alive connections, and unauthenticated bodies against the
//! pre-auth body budget. Every server here is the real release binary on loopback.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::proxy::{start_proxy_configured, with_local_device};
use crate::triggers::{generated_secret, install, sign};
use crate::util::*;

/// The open-file limit the servers under attack run with.
const SERVER_OPEN_FILES: u64 = 1024;
/// Half-open connections held against them: more than they have file descriptors.
const HALF_OPEN: usize = 1100;

/// A hook whose deliveries the trivial plugin runs.
const HOOK: &str = r#"name = "limited"
version = "1"

[[triggers.webhook]]
name = "gh"
auth = "hmac-sha256"
"#;

/// Starts the server with both open-file limits at `n`, as `ulimit -n n` would.
fn with_open_files(cmd: &mut Command, n: u64) {
    // SAFETY: runs in the forked child before exec; setrlimit is async-signal-safe and
    // reads only the struct on this stack.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The soft "Max open files" of a running process.
fn open_files_of(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open-file limit in /proc/{pid}/limits:\n{limits}"));
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// The resident memory of a running process, in bytes.
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kb * 1024
}

/// This test process holds more sockets than the usual 1,024: raises its soft limit.
fn allow_this_process(files: u64) {
    let soft = capstan::server::raise_open_file_limit();
    assert!(
        soft >= files,
        "these tests hold {files} sockets, but this process may open only {soft} files: raise the hard limit (ulimit -Hn)"
    );
}

/// Opens `n` connections that each send part of a request head and then nothing.
fn hold_half_open(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(addr)
                .unwrap_or_else(|e| panic!("half-open connection #{i} to {addr}: {e}"));
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect()
}

/// How many of `held` the server has closed.
fn closed_by_server(held: &[TcpStream]) -> usize {
    held.iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            !matches!((&**s).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count()
}

/// `GET path` on a fresh connection; the status line's code and how long it took.
fn timed_get(addr: &str, path: &str) -> (u16, Duration) {
    let t = Instant::now();
    let (status, _) = http(addr, "GET", path, &[], b"");
    (status, t.elapsed())
}

/// Reads from `s` until the peer closes or `within` passes; what arrived, and whether
/// it closed.
fn read_until_closed(s: &mut TcpStream, within: Duration) -> (String, bool) {
    s.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&got).into_owned(), true);
            }
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

#[test]
fn with_1100_half_open_connections_healthz_answers_within_a_second_and_a_signed_delivery_runs() {
    allow_this_process(HALF_OPEN as u64 + 200);
    let data = DataDir::with_vault();
    let secret = generated_secret(&install(&data, HOOK), "gh");
    let server = Server::start_with(&data, |c| {
        with_open_files(c, SERVER_OPEN_FILES);
        // Long enough that only the connection cap can make room during the test.
        c.env("CAPSTAN_SERVER_HEADER_TIMEOUT", "5m");
    });
    assert_eq!(open_files_of(server.child.id()), SERVER_OPEN_FILES);
    let addr = server.addr.as_str();

    let held = hold_half_open(addr, HALF_OPEN);
    let (status, took) = timed_get(addr, "/healthz");
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "/healthz took {took:?}");

    // A genuine delivery is accepted and its run recorded, read back with the token.
    let body = br#"{"ref":"main"}"#;
    let sig = format!("sha256={}", sign(&secret, body));
    let (status, resp) = http(
        addr,
        "POST",
        "/hooks/gh",
        &[("X-Hub-Signature-256", &sig)],
        body,
    );
    assert_eq!(status, 202, "{resp}");
    let resp: serde_json::Value = serde_json::from_str(&resp).unwrap();
    let run = resp["run_id"].as_str().expect("a run id").to_string();
    let auth = format!("Bearer {}", server.admin_token());
    let until = Instant::now() + Duration::from_secs(30);
    let record = loop {
        let (status, body) = http(
            addr,
            "GET",
            &format!("/api/runs/{run}"),
            &[("Authorization", &auth)],
            b"",
        );
        assert_eq!(status, 200, "{body}");
        let r: serde_json::Value = serde_json::from_str(&body).unwrap();
        if r["status"] != "queued" && r["status"] != "running" {
            break r;
        }
        assert!(Instant::now() < until, "run {run} did not end: {r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(record["status"], "ok", "{record}");

    // The server made room by closing half-open connections, not by holding them all.
    let closed = closed_by_server(&held);
    assert!(
        closed >= HALF_OPEN - SERVER_OPEN_FILES as usize * 3 / 4,
        "only {closed} of {HALF_OPEN} half-open connections were closed"
    );
    drop(held);
    assert!(server.stop().success());
}

#[test]
fn with_1100_half_open_connections_the_proxy_still_answers_ping() {
    allow_this_process(HALF_OPEN as u64 + 200);
    let data = with_local_device();
    let proxy = start_proxy_configured(&data, "d", "CONTAINERS=1\n", "env", &[], |c| {
        with_open_files(c, SERVER_OPEN_FILES);
        c.env("CAPSTAN_SERVER_HEADER_TIMEOUT", "5m");
    });
    assert_eq!(open_files_of(proxy.child.id()), SERVER_OPEN_FILES);
    let held = hold_half_open(&proxy.addr, HALF_OPEN);
    let (status, took) = timed_get(&proxy.addr, "/_ping");
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "/_ping took {took:?}");
    // And again: the proxy keeps answering while they are held.
    let (status, took) = timed_get(&proxy.addr, "/version");
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "/version took {took:?}");
    drop(held);
}

#[test]
fn a_request_head_not_finished_within_the_header_timeout_is_closed_unanswered() {
    let data = DataDir::empty();
    let server = Server::start_with(&data, |c| {
        c.env("CAPSTAN_SERVER_HEADER_TIMEOUT", "1s");
    });
    let mut slow = TcpStream::connect(&server.addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut silent = TcpStream::connect(&server.addr).unwrap();
    for s in [&mut slow, &mut silent] {
        let (got, closed) = read_until_closed(s, Duration::from_secs(15));
        assert!(closed, "still open after 15 s with a 1 s header timeout");
        assert_eq!(got, "", "a request never finished got an answer");
    }
    // A request sent in time is served.
    assert_eq!(http(&server.addr, "GET", "/healthz", &[], b"").0, 200);
}

#[test]
fn a_body_that_stops_arriving_and_an_idle_kept_alive_connection_are_ended() {
    let data = DataDir::with_vault();
    install(&data, HOOK);
    let server = Server::start_with(&data, |c| {
        c.env("CAPSTAN_SERVER_BODY_TIMEOUT", "1s")
            .env("CAPSTAN_SERVER_IDLE_TIMEOUT", "1s");
    });

    // A delivery promising 1,000 bytes that sends 10.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.write_all(b"POST /hooks/gh HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        .unwrap();
    let (got, _) = read_until_closed(&mut s, Duration::from_secs(15));
    assert!(
        got.starts_with("HTTP/1.1 422") && got.contains("server.body_timeout"),
        "{got}"
    );

    // A kept-alive connection, answered, then left idle.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (got, closed) = read_until_closed(&mut s, Duration::from_secs(15));
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(closed, "an idle connection still open after 15 s");
}

#[test]
fn an_unauthenticated_api_request_is_refused_without_its_body_being_read() {
    let data = DataDir::empty();
    let server = Server::start(&data);
    // 100 MiB announced, none sent: the answer cannot have waited for the body.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.write_all(
        b"POST /api/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n",
    )
    .unwrap();
    let (got, _) = read_until_closed(&mut s, Duration::from_secs(5));
    assert!(got.starts_with("HTTP/1.1 401"), "{got:?}");
}

/// What became of one unauthenticated delivery of a large body.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Answered before its body was complete (the status and head), or closed (status
    /// 0: an answer sent while the body was still arriving can be lost to the reset
    /// that closing a socket with unread data sends).
    Refused(u16, String),
    /// The body (all but its last byte) was taken in, awaiting the rest.
    Held,
}

/// Sends delivery `id` with a wrong signature and all but the last byte of `body`, and
/// reports on `settled` once it is refused or held; a held one keeps its connection open
/// (reporting again if it is answered after all) until the task is aborted.
async fn send_all_but_the_last_byte(
    id: usize,
    addr: String,
    body: std::sync::Arc<Vec<u8>>,
    settled: tokio::sync::mpsc::UnboundedSender<(usize, Outcome)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let head = format!(
        "POST /hooks/gh HTTP/1.1\r\nHost: x\r\nX-Hub-Signature-256: sha256={}\r\nContent-Length: {}\r\n\r\n",
        "0".repeat(64),
        body.len()
    );
    let answer = async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Outcome::Refused(status, text)
    };
    tokio::pin!(answer);
    let write = async {
        w.write_all(head.as_bytes()).await?;
        w.write_all(&body[..body.len() - 1]).await
    };
    tokio::select! {
        o = &mut answer => {
            let _ = settled.send((id, o));
            return;
        }
        r = write => if r.is_err() {
            // Refused and closed while the body was still being sent.
            let _ = settled.send((id, answer.await));
            return;
        },
    }
    // Everything but the last byte is written: a held body gets no answer.
    let _ = settled.send((id, Outcome::Held));
    let late = answer.await;
    let _ = settled.send((id, late));
    std::future::pending::<()>().await;
}

#[test]
fn unauthenticated_webhook_bodies_stay_within_the_preauth_budget_and_the_rest_get_503() {
    const BODIES: usize = 400;
    allow_this_process(BODIES as u64 + 200);
    let data = DataDir::with_vault();
    install(&data, HOOK);
    let server = Server::start(&data);
    let pid = server.child.id();
    assert_eq!(http(&server.addr, "GET", "/healthz", &[], b"").0, 200);
    let before = rss_of(pid);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let body = std::sync::Arc::new(vec![b'x'; 1 << 20]);
    let (outcomes, during) = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let tasks: Vec<_> = (0..BODIES)
            .map(|id| {
                tokio::spawn(send_all_but_the_last_byte(
                    id,
                    server.addr.clone(),
                    body.clone(),
                    tx.clone(),
                ))
            })
            .collect();
        let mut outcomes = std::collections::HashMap::new();
        while outcomes.len() < BODIES {
            match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                Ok(Some((id, o))) => {
                    outcomes.insert(id, o);
                }
                _ => panic!(
                    "only {} of {BODIES} deliveries refused or held within 60 s",
                    outcomes.len()
                ),
            }
        }
        // A body written into the kernel's buffers before the engine read it looks held
        // until the engine gets to it: settle until nothing changes for 3 s.
        while let Ok(Some((id, o))) = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await
        {
            outcomes.insert(id, o);
        }
        // Measured while the held bodies are held.
        let during = rss_of(pid);
        for t in tasks {
            t.abort();
        }
        (outcomes.into_values().collect::<Vec<_>>(), during)
    });
    drop(rt);

    let held = outcomes.iter().filter(|o| **o == Outcome::Held).count();
    let busy: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Refused(503, head) => Some(head),
            _ => None,
        })
        .collect();
    let others: Vec<_> = outcomes
        .iter()
        .filter(|o| !matches!(o, Outcome::Held | Outcome::Refused(503 | 0, _)))
        .collect();
    // 64 MiB of budget holds at most 64 bodies of 1 MiB at once.
    assert!(held <= 64, "{held} bodies held at once");
    assert!(others.is_empty(), "other answers: {others:?}");
    assert!(!busy.is_empty(), "no delivery was answered 503");
    assert!(
        busy[0].to_ascii_lowercase().contains("retry-after: 1"),
        "{}",
        busy[0]
    );
    let grew = during.saturating_sub(before);
    assert!(
        grew < 200 << 20,
        "the engine grew by {} MiB holding {held} bodies",
        grew >> 20
    );
    // Afterwards the engine still serves.
    assert_eq!(http(&server.addr, "GET", "/healthz", &[], b"").0, 200);
}
