//! What a webhook's 202 promises: the run it names is on disk. A `capstan serve` under
//! a load of signed deliveries is killed with SIGKILL (no shutdown, no final flush),
//! and every run id it answered 202 for must be in the history afterwards.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::triggers::{generated_secret, install, sign};
use crate::util::*;

const BODY: &[u8] = br#"{"ref":"refs/heads/main","after":"9b2e1c4f"}"#;

/// One delivery on its own connection: `Some(run id)` for a 202, `None` for any
/// other answer or a connection that broke (the engine was killed mid-request: its
/// fate is unknown and nothing was promised).
fn deliver(addr: &str, sig: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let req = format!(
        "POST /hooks/load HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nX-Hub-Signature-256: sha256={sig}\r\n\
         Content-Length: {}\r\n\r\n",
        BODY.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    s.write_all(BODY).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    if !text.starts_with("HTTP/1.1 202") {
        return None;
    }
    let body = text.split_once("\r\n\r\n")?.1;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    Some(v["run_id"].as_str()?.to_string())
}

#[test]
fn every_run_answered_202_survives_a_kill_under_load() {
    let data = DataDir::with_vault();
    let out = install(
        &data,
        "name = \"durable\"\nversion = \"1\"\n\n[[triggers.webhook]]\nname = \"load\"\n\
         auth = \"hmac-sha256\"\nreplay = \"allow\"\n",
    );
    let sig = sign(&generated_secret(&out, "load"), BODY);
    let server = Server::start_with(&data, |c| {
        // Every delivery is accepted and every record kept, so any missing one is lost.
        c.env("CAPSTAN_RUNS_MAX_QUEUED_PER_PLUGIN", "1000000")
            .env("CAPSTAN_RUNS_KEEP_PER_PLUGIN", "1000000");
    });
    let addr = server.addr.clone();
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..8)
        .map(|_| {
            let (addr, sig, accepted, stop) =
                (addr.clone(), sig.clone(), accepted.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut broken = 0;
                while !stop.load(Ordering::SeqCst) && broken < 50 {
                    match deliver(&addr, &sig) {
                        Some(id) => accepted.lock().unwrap().push(id),
                        None => broken += 1,
                    }
                }
            })
        })
        .collect();

    // Killed in the middle of the load: once enough deliveries were accepted that the
    // engine is busy writing and flushing, while the senders keep going.
    let until = Instant::now() + Duration::from_secs(60);
    while accepted.lock().unwrap().len() < 1_500 {
        assert!(
            Instant::now() < until,
            "only {} deliveries accepted within 60 s",
            accepted.lock().unwrap().len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = server.child.id() as i32;
    unsafe_kill(pid, 9);
    let mut server = server;
    server.child.wait().unwrap();
    stop.store(true, Ordering::SeqCst);
    for s in senders {
        s.join().unwrap();
    }
    drop(server);
    let accepted = accepted.lock().unwrap().clone();

    // The history as the next process finds it (the CLI reads the data directory).
    let out = data.capstan(&[
        "runs", "--json", "--plugin", "durable", "--limit", "1000000",
    ]);
    assert_success(&out, "capstan runs --json");
    let runs: Vec<serde_json::Value> = serde_json::from_str(&stdout(&out)).unwrap();
    let recorded: std::collections::HashSet<&str> =
        runs.iter().filter_map(|r| r["id"].as_str()).collect();
    let lost: Vec<&String> = accepted
        .iter()
        .filter(|id| !recorded.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} runs answered 202 are not in the history after SIGKILL, e.g. {:?}",
        lost.len(),
        accepted.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(accepted.len() >= 1_500);
    eprintln!(
        "{} runs answered 202 before SIGKILL, all {} recorded ({} records in all)",
        accepted.len(),
        accepted.len(),
        runs.len()
    );
}
