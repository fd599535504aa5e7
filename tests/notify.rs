//! Notifications end to end: a real engine (`capstan serve`), channels added with
//! `capstan notifier add`, the `notifier` test plugin calling `host.notify`, and
//! receivers on loopback started here — an HTTP server that records what each service
//! would receive, and Debian's aiosmtpd for email. The channel tokens are grepped for
//! in everything the engine shows or writes.

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::util::plugin::wasm;
use crate::util::*;

/// One request a receiver got.
#[derive(Clone)]
pub(crate) struct Received {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("path", &self.path)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

impl Received {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{} sent no JSON ({e}): {:?}", self.path, self.body))
    }
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

#[derive(Default)]
struct Log {
    got: Vec<Received>,
    /// Requests still to be answered 500.
    fail_next: usize,
}

/// An HTTP server on 127.0.0.1 that records every request and answers 200 (or 500 while
/// `fail_next` lasts). Its runtime stops when it is dropped.
pub(crate) struct Receiver {
    pub(crate) addr: String,
    log: Arc<(Mutex<Log>, Condvar)>,
    _rt: tokio::runtime::Runtime,
}

impl Receiver {
    pub(crate) fn start(fail_first: usize) -> Receiver {
        use hyper::service::service_fn;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let log = Arc::new((
            Mutex::new(Log {
                got: Vec::new(),
                fail_next: fail_first,
            }),
            Condvar::new(),
        ));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = log.clone();
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let path = req.uri().to_string();
                            let headers = req
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())
                                })
                                .collect();
                            let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                            let (m, cv) = &*log;
                            let mut l = m.lock().unwrap();
                            let status = if l.fail_next > 0 {
                                l.fail_next -= 1;
                                500
                            } else {
                                200
                            };
                            l.got.push(Received {
                                path,
                                headers,
                                body,
                            });
                            cv.notify_all();
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                        b"{}",
                                    )))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver { addr, log, _rt: rt }
    }

    /// Waits (bounded) until `n` requests have come; returns them all.
    fn wait_for(&self, n: usize, secs: u64) -> Vec<Received> {
        let (m, cv) = &*self.log;
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut l = m.lock().unwrap();
        while l.got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the receiver got {} requests in {secs}s, expected {n}: {:?}",
                l.got.len(),
                l.got.iter().map(|r| &r.path).collect::<Vec<_>>()
            );
            l = cv.wait_timeout(l, left).unwrap().0;
        }
        l.got.clone()
    }

    pub(crate) fn received(&self) -> Vec<Received> {
        self.log.0.lock().unwrap().got.clone()
    }
}

/// A running engine with a config file, its admin token, and where its data lives.
pub(crate) struct Engine {
    data: DataDir,
    server: Server,
    auth: String,
}

impl Engine {
    /// `capstan serve` with `config` as its config file and capstan's own logs at debug
    /// (so the secret greps see everything it logs).
    pub(crate) fn start(config: &str) -> Engine {
        let data = DataDir::empty();
        let file = data.path().join("capstan.toml");
        std::fs::write(&file, config).unwrap();
        let server = Server::start_with(&data, |c| {
            c.env("CAPSTAN_CONFIG", &file)
                .env("CAPSTAN_LOG", "capstan=debug");
        });
        let auth = format!("Bearer {}", server.admin_token());
        Engine { data, server, auth }
    }

    fn api(&self, method: &str, path: &str, body: &serde_json::Value) -> (u16, String) {
        http_json(&self.server.addr, &self.auth, method, path, body)
    }

    /// `capstan notifier add NAME --url-stdin` against the running engine.
    pub(crate) fn add_channel(&self, name: &str, url: &str) {
        let out = self.data.capstan_stdin(
            &["notifier", "add", name, "--url-stdin"],
            format!("{url}\n").as_bytes(),
        );
        assert_success(&out, &format!("notifier add {name}"));
    }

    /// Installs the `notifier` test plugin under `name` with `rest` added to its manifest.
    fn install(&self, name: &str, rest: &str) {
        self.install_crate("notifier", name, rest)
    }

    /// Installs the built plugin `crate_name` under `name`, `rest` added to its manifest.
    pub(crate) fn install_crate(&self, crate_name: &str, name: &str, rest: &str) {
        use base64::Engine as _;
        let manifest = format!("name = \"{name}\"\nversion = \"1\"\n{rest}\n");
        let wasm = std::fs::read(wasm(crate_name)).unwrap();
        let (status, body) = self.api(
            "POST",
            "/api/plugins",
            &serde_json::json!({
                "manifest": manifest,
                "wasm_base64": base64::engine::general_purpose::STANDARD.encode(wasm),
            }),
        );
        assert!(
            status == 200 || status == 201,
            "install {name}: {status} {body}"
        );
    }

    /// Runs plugin `name` with `input` and waits for its record.
    pub(crate) fn run(&self, name: &str, input: serde_json::Value) -> serde_json::Value {
        let (status, body) = self.api(
            "POST",
            &format!("/api/plugins/{name}/run?wait=true"),
            &serde_json::json!({ "input": input.to_string() }),
        );
        assert_eq!(status, 200, "run {name}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The audit records of notification deliveries.
    fn deliveries(&self) -> Vec<serde_json::Value> {
        let (status, body) = self.api("GET", "/api/audit?tail=1000", &serde_json::Value::Null);
        assert_eq!(status, 200, "{body}");
        let all: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        all.into_iter()
            .filter(|r| r["op"] == "notify.delivery")
            .collect()
    }

    /// Waits (bounded) until the audit holds `n` delivery outcomes.
    pub(crate) fn wait_for_deliveries(&self, n: usize, secs: u64) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let d = self.deliveries();
            if d.len() >= n {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "{} delivery outcomes in the audit after {secs}s, expected {n}: {d:?}",
                d.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn metrics(&self) -> String {
        self.api("GET", "/metrics", &serde_json::Value::Null).1
    }
}

fn send(channel: &str, title: &str, key: Option<&str>) -> serde_json::Value {
    let mut n = serde_json::json!({
        "channel": channel,
        "title": title,
        "message": "web1: / at 99%",
        "priority": "high",
        "tags": ["disk", "web1"],
    });
    if let Some(k) = key {
        n["dedup_key"] = k.into();
    }
    n
}

/// Config with quick retries (the tests wait for them).
pub(crate) const QUICK: &str = "[notify]\nretry_backoff = \"100ms\"\ntimeout = \"5s\"\n";

#[test]
fn every_service_receives_its_documented_payload_and_no_token_leaks() {
    let rx = Receiver::start(0);
    let engine = Engine::start(QUICK);
    let a = &rx.addr;
    let tokens = [
        "tk_N7fyS3cr3t",
        "Sl4ckS3cr3t",
        "D1sc0rdS3cr3t",
        "G0t1fyS3cr3t",
        "T34msS3cr3t",
        "G3n3r1cS3cr3t",
    ];
    let channels = [
        ("ntfy", format!("ntfy+http://:{}@{a}/alerts", tokens[0])),
        (
            "slack",
            format!("slack+http://{a}/services/T0/B0/{}", tokens[1]),
        ),
        (
            "discord",
            format!("discord+http://{a}/api/webhooks/42/{}", tokens[2]),
        ),
        ("gotify", format!("gotify+http://{a}/{}", tokens[3])),
        ("teams", format!("teams+http://{a}/webhookb2/{}", tokens[4])),
        (
            "generic",
            format!("generic+http://ops:{}@{a}/hook", tokens[5]),
        ),
    ];
    for (name, url) in &channels {
        engine.add_channel(name, url);
    }
    engine.install(
        "notifier",
        "[notify]\nchannels = [\"ntfy\", \"slack\", \"discord\", \"gotify\", \"teams\", \"generic\"]",
    );
    let sends: Vec<_> = channels
        .iter()
        .map(|(name, _)| send(name, "Disk full", None))
        .collect();
    let record = engine.run("notifier", serde_json::json!({ "send": sends }));
    assert_eq!(record["status"], "ok", "{record}");
    assert_eq!(
        record["outcome"]["details"],
        serde_json::json!(vec!["queued"; 6]),
        "{record}"
    );
    let calls: Vec<&serde_json::Value> = record["host_calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["op"] == "host.notify")
        .collect();
    assert_eq!(calls.len(), 6, "{record}");
    assert!(
        calls
            .iter()
            .all(|c| c["decision"] == "allow" && c["reason"] == "queued"),
        "{calls:?}"
    );

    let got = rx.wait_for(6, 30);
    let by_path = |p: &str| {
        got.iter()
            .find(|r| r.path.starts_with(p))
            .unwrap_or_else(|| panic!("nothing came to {p}: {got:?}"))
    };
    // ntfy: the message as the body, the rest in headers, the token as a bearer.
    let ntfy = by_path("/alerts");
    assert_eq!(ntfy.body, b"web1: / at 99%");
    assert_eq!(
        (
            ntfy.header("title"),
            ntfy.header("priority"),
            ntfy.header("tags")
        ),
        ("Disk full", "4", "disk,web1")
    );
    assert_eq!(
        ntfy.header("authorization"),
        format!("Bearer {}", tokens[0])
    );
    assert_eq!(
        by_path("/services/T0/B0/").json()["text"],
        "*Disk full*\nweb1: / at 99%"
    );
    assert_eq!(
        by_path("/api/webhooks/42/").json()["content"],
        "**Disk full**\nweb1: / at 99%"
    );
    let gotify = by_path("/message");
    assert_eq!(gotify.header("x-gotify-key"), tokens[3]);
    let g = gotify.json();
    assert_eq!(
        (
            g["title"].as_str(),
            g["message"].as_str(),
            g["priority"].as_u64()
        ),
        (Some("Disk full"), Some("web1: / at 99%"), Some(8))
    );
    let t = by_path("/webhookb2/").json();
    assert_eq!(
        (t["@type"].as_str(), t["title"].as_str(), t["text"].as_str()),
        (
            Some("MessageCard"),
            Some("Disk full"),
            Some("web1: / at 99%")
        )
    );
    let generic = by_path("/hook");
    assert!(
        generic.header("authorization").starts_with("Basic "),
        "{generic:?}"
    );
    let j = generic.json();
    assert_eq!(j["priority"], "high");
    assert_eq!(j["tags"], serde_json::json!(["disk", "web1"]));
    assert_eq!(
        (j["plugin"].as_str(), j["channel"].as_str()),
        (Some("notifier"), Some("generic"))
    );
    for r in &got {
        let want = if r.path == "/alerts" {
            "text/plain; charset=utf-8"
        } else {
            "application/json"
        };
        assert_eq!(r.header("content-type"), want, "{r:?}");
    }

    // Each delivery is in the audit and counted.
    let audit = engine.wait_for_deliveries(6, 30);
    assert!(
        audit
            .iter()
            .all(|r| r["reason"].as_str().unwrap().starts_with("delivered")),
        "{audit:?}"
    );
    // ... each naming the run that sent it, and the generic payload carries that id too.
    let run_id = record["id"].as_str().unwrap();
    assert!(
        audit.iter().all(|r| r["request"]
            .as_str()
            .unwrap()
            .ends_with(&format!(" for run {run_id}"))),
        "{audit:?}"
    );
    assert_eq!(j["run_id"], run_id, "{j}");
    let metrics = engine.metrics();
    for (name, _) in &channels {
        let series =
            format!("capstan_notifications_total{{channel=\"{name}\",result=\"delivered\"}} 1");
        assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
    }
    assert!(metrics.contains("op=\"host.notify\""), "{metrics}");

    // The tokens are nowhere the engine shows or writes.
    let list = engine.data.capstan(&["notifier", "list"]);
    assert_success(&list, "notifier list");
    assert!(
        stdout(&list).contains("ntfy+http://127.0.0.1"),
        "{}",
        stdout(&list)
    );
    let (_, api_list) = engine.api("GET", "/api/notifiers", &serde_json::Value::Null);
    let (status, refused) = engine.api(
        "POST",
        "/api/notifiers",
        &serde_json::json!({"name": "bad", "url": format!("discord://{}@", tokens[2])}),
    );
    assert_eq!(status, 422, "{refused}");
    let (_, audit_text) = engine.api("GET", "/api/audit?tail=1000", &serde_json::Value::Null);
    let (_, runs) = engine.api("GET", "/api/runs", &serde_json::Value::Null);
    let log = engine.server.stop_and_collect_stderr();
    let seen = [
        ("notifier list", stdout(&list)),
        ("GET /api/notifiers", api_list),
        ("a refused URL's error", refused),
        ("the run record", record.to_string()),
        ("the run list", runs),
        ("the audit", audit_text),
        ("/metrics", metrics),
        ("the engine's log", log.clone()),
    ];
    for token in tokens {
        for (what, text) in &seen {
            assert!(
                !text.contains(token),
                "{what} holds the channel token {token}:\n{text}"
            );
        }
    }
    assert!(
        log.contains("notification delivered"),
        "the log is at debug:\n{log}"
    );
}

#[test]
fn a_dedup_key_is_sent_once_within_the_window_and_a_channel_is_held_to_its_rate() {
    let rx = Receiver::start(0);
    let engine = Engine::start(&format!(
        "{QUICK}rate_limit = {{ requests = 3, per = \"1h\" }}\n"
    ));
    engine.add_channel("ops", &format!("generic+http://{}/ops", rx.addr));
    engine.install("notifier", "[notify]\nchannels = [\"ops\"]");
    let record = engine.run(
        "notifier",
        serde_json::json!({ "send": [
            send("ops", "a", Some("disk:web1")),
            send("ops", "a again", Some("disk:web1")),
            send("ops", "b", Some("disk:web2")),
            send("ops", "c", None),
            send("ops", "d", None),
        ]}),
    );
    assert_eq!(
        record["outcome"]["details"],
        serde_json::json!(["queued", "duplicate", "queued", "queued", "rate-limited"]),
        "{record}"
    );
    // The run record says what became of each; the audit also says why.
    let results: Vec<&str> = record["host_calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["reason"].as_str())
        .collect();
    assert_eq!(
        results,
        ["queued", "duplicate", "queued", "queued", "rate-limited"]
    );
    let (_, audit) = engine.api("GET", "/api/audit?tail=100", &serde_json::Value::Null);
    assert!(audit.contains("notify.dedup_window"), "{audit}");
    assert!(audit.contains("notify.rate_limit"), "{audit}");
    engine.wait_for_deliveries(3, 30);
    let titles: Vec<String> = rx
        .received()
        .iter()
        .map(|r| r.json()["title"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(titles.len(), 3, "{titles:?}");
    for t in ["a", "b", "c"] {
        assert!(
            titles.iter().any(|x| x == t),
            "{t} not delivered: {titles:?}"
        );
    }
    let metrics = engine.metrics();
    for series in [
        "capstan_notifications_total{channel=\"ops\",result=\"duplicate\"} 1",
        "capstan_notifications_total{channel=\"ops\",result=\"rate-limited\"} 1",
        "capstan_notifications_total{channel=\"ops\",result=\"queued\"} 3",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
}

#[test]
fn a_receiver_that_first_answers_500_gets_the_notification_on_a_later_attempt() {
    let rx = Receiver::start(2);
    let engine = Engine::start(QUICK);
    engine.add_channel("ops", &format!("slack+http://{}/services/T/B/X", rx.addr));
    engine.install("notifier", "[notify]\nchannels = [\"ops\"]");
    engine.run(
        "notifier",
        serde_json::json!({ "send": [send("ops", "retry me", None)] }),
    );
    let got = rx.wait_for(3, 30);
    assert_eq!(got.len(), 3);
    assert!(
        got.iter()
            .all(|r| r.json()["text"] == "*retry me*\nweb1: / at 99%")
    );
    let audit = engine.wait_for_deliveries(1, 30);
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert!(
        audit[0]["reason"]
            .as_str()
            .unwrap()
            .contains("delivered on attempt 3"),
        "{audit:?}"
    );
    let metrics = engine.metrics();
    assert!(
        metrics.contains("capstan_notifications_total{channel=\"ops\",result=\"retried\"} 2"),
        "{metrics}"
    );
}

#[test]
fn a_receiver_that_always_fails_is_given_up_on_after_max_attempts() {
    let rx = Receiver::start(usize::MAX);
    let engine = Engine::start(&format!("{QUICK}max_attempts = 3\n"));
    engine.add_channel(
        "ops",
        &format!("discord+http://{}/api/webhooks/1/Tok", rx.addr),
    );
    engine.install("notifier", "[notify]\nchannels = [\"ops\"]");
    engine.run(
        "notifier",
        serde_json::json!({ "send": [send("ops", "never", None)] }),
    );
    let audit = engine.wait_for_deliveries(1, 30);
    let reason = audit[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("gave up after 3 attempts") && reason.contains("500"),
        "{reason}"
    );
    assert_eq!(rx.received().len(), 3);
}

#[test]
fn a_channel_the_manifest_does_not_name_is_denied_and_an_unknown_one_is_not_found() {
    let rx = Receiver::start(0);
    let engine = Engine::start(QUICK);
    engine.add_channel("other", &format!("generic+http://{}/other", rx.addr));
    engine.install("notifier", "[notify]\nchannels = [\"ops\"]");
    let record = engine.run(
        "notifier",
        serde_json::json!({ "send": [send("other", "x", None), send("ops", "y", None)] }),
    );
    let details = record["outcome"]["details"].as_array().unwrap();
    let denied = details[0].as_str().unwrap();
    assert!(
        denied.starts_with("error: denied") && denied.contains("[notify] channels"),
        "{denied}"
    );
    assert!(
        details[1].as_str().unwrap().starts_with("error: not found"),
        "{details:?}"
    );
    let calls = record["host_calls"].as_array().unwrap();
    assert_eq!(calls[0]["decision"], "deny", "{calls:?}");
    assert_eq!(calls[1]["reason"], "not-found", "{calls:?}");
    // Nothing was sent: the denied channel's receiver saw nothing.
    let (_, audit) = engine.api("GET", "/api/audit?tail=100", &serde_json::Value::Null);
    assert!(audit.contains("\"decision\":\"deny\""), "{audit}");
    assert!(rx.received().is_empty());
    // A manifest naming a bad channel or statuses without channels is refused at install.
    for (rest, says) in [
        ("[notify]\nchannels = [\"o/ps\"]", "notify.channels[0]"),
        ("[notify]\non = [\"failed\"]", "notify.on"),
        (
            "[notify]\nchannels = [\"ops\"]\non = [\"runnin\"]",
            "runnin",
        ),
    ] {
        use base64::Engine as _;
        let wasm = std::fs::read(wasm("notifier")).unwrap();
        let (status, body) = engine.api(
            "POST",
            "/api/plugins",
            &serde_json::json!({
                "manifest": format!("name = \"bad\"\nversion = \"1\"\n{rest}\n"),
                "wasm_base64": base64::engine::general_purpose::STANDARD.encode(wasm),
            }),
        );
        assert_eq!(status, 422, "{body}");
        assert!(body.contains(says), "{body}");
    }
}

#[test]
fn a_failing_run_notifies_the_channels_of_notify_on_without_plugin_code() {
    let rx = Receiver::start(0);
    // Every plugin's failures go to `all`; plugin `watched` also notifies `ops`.
    let engine = Engine::start(&format!("{QUICK}on = [\"failed\"]\nchannels = [\"all\"]\n"));
    engine.add_channel("all", &format!("generic+http://{}/all", rx.addr));
    engine.add_channel("ops", &format!("generic+http://{}/ops", rx.addr));
    engine.install(
        "watched",
        "[notify]\nchannels = [\"ops\"]\non = [\"failed\", \"timed-out\"]",
    );
    engine.install("plain", "");
    let failed = engine.run("watched", serde_json::json!({ "fail": true }));
    assert_eq!(failed["status"], "failed", "{failed}");
    let got = rx.wait_for(2, 30);
    let mut paths: Vec<&str> = got.iter().map(|r| r.path.as_str()).collect();
    paths.sort();
    assert_eq!(paths, ["/all", "/ops"]);
    for r in &got {
        let j = r.json();
        assert_eq!(j["run_id"], failed["id"], "{j}");
        assert_eq!(j["plugin"], "watched");
        assert_eq!(j["priority"], "high");
        assert!(
            j["title"].as_str().unwrap().contains("watched: run failed"),
            "{j}"
        );
        assert!(
            j["message"].as_str().unwrap().contains("asked to fail"),
            "{j}"
        );
    }
    // A successful run sends nothing; another plugin's failure goes to `all` only.
    let ok = engine.run("watched", serde_json::json!({}));
    assert_eq!(ok["status"], "ok");
    let plain = engine.run("plain", serde_json::json!({ "fail": true }));
    let got = rx.wait_for(3, 30);
    let last = &got[2];
    assert_eq!(last.path, "/all");
    assert_eq!(last.json()["run_id"], plain["id"]);
    engine.wait_for_deliveries(3, 30);
    assert_eq!(rx.received().len(), 3, "the ok run notified nobody");
}

#[test]
fn a_run_refused_at_the_chain_limit_notifies_the_channels_of_notify_on_denied() {
    let rx = Receiver::start(0);
    let engine = Engine::start(&format!(
        "[runs]\nmax_chain_depth = 1\n{QUICK}on = [\"denied\"]\nchannels = [\"ops\"]\n"
    ));
    engine.add_channel("ops", &format!("generic+http://{}/ops", rx.addr));
    engine.install_crate("relay", "first", "");
    // `chain` fails on every run event and follows `first` and itself: its second link
    // is past the limit of 1.
    engine.install_crate(
        "relay",
        "chain",
        "[[triggers.run]]\nplugins = [\"first\", \"chain\"]\nstatus = [\"failed\"]\n[config]\nfail_on_run = true",
    );
    let (status, body) = engine.api(
        "POST",
        "/api/plugins/first/run?wait=true",
        &serde_json::json!({ "input": "fail:broken" }),
    );
    assert_eq!(status, 200, "{body}");
    let first: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(first["status"], "failed", "{first}");

    // Failures are not in `on`: the one message is the refusal's.
    let got = rx.wait_for(1, 30);
    let j = got[0].json();
    assert_eq!(got[0].path, "/ops");
    assert_eq!(j["plugin"], "chain", "{j}");
    assert!(
        j["title"].as_str().unwrap().contains("chain: run denied"),
        "{j}"
    );
    assert!(
        j["message"]
            .as_str()
            .unwrap()
            .contains("runs.max_chain_depth"),
        "the message says what to change: {j}"
    );
    let (_, run) = engine.api(
        "GET",
        &format!("/api/runs/{}", j["run_id"].as_str().unwrap()),
        &serde_json::Value::Null,
    );
    let run: serde_json::Value = serde_json::from_str(&run).unwrap();
    assert_eq!(
        (run["status"].as_str(), run["trigger"]["depth"].as_u64()),
        (Some("denied"), Some(2)),
        "{run}"
    );
    engine.wait_for_deliveries(1, 30);
    assert_eq!(rx.received().len(), 1, "nothing else was notified");
}

#[test]
fn a_run_the_shutdown_interrupts_is_notified_before_the_engine_exits() {
    // The first attempt fails: the retry a second later must happen before the engine
    // exits, which it does only because shutdown waits for the queue.
    let rx = Receiver::start(1);
    let engine = Engine::start(
        "[runs]\nshutdown_grace = \"1s\"\n[notify]\nretry_backoff = \"1s\"\non = [\"interrupted\"]\nchannels = [\"ops\"]\n",
    );
    engine.add_channel("ops", &format!("generic+http://{}/ops", rx.addr));
    engine.install_crate("hostile", "spinner", "[limits]\ntimeout_secs = 300");
    let (status, body) = engine.api(
        "POST",
        "/api/plugins/spinner/run",
        &serde_json::json!({ "input": "spin" }),
    );
    assert_eq!(status, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, run) = engine.api("GET", &format!("/api/runs/{id}"), &serde_json::Value::Null);
        if run.contains("\"status\":\"running\"") {
            break;
        }
        assert!(Instant::now() < deadline, "the run did not start: {run}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(engine.server.stop().success());
    // The engine has exited: the notification went out before it did.
    let got = rx.received();
    assert_eq!(got.len(), 2, "refused once, then delivered: {got:?}");
    let j = got[0].json();
    assert_eq!(
        (j["run_id"].as_str(), j["plugin"].as_str()),
        (Some(id.as_str()), Some("spinner"))
    );
    assert!(
        j["title"].as_str().unwrap().contains("run interrupted"),
        "{j}"
    );
}

/// Debian's aiosmtpd on a free loopback port, printing each mail to its stdout.
struct SmtpServer {
    child: Child,
    port: u16,
    lines: std::sync::mpsc::Receiver<String>,
}

impl SmtpServer {
    fn start() -> SmtpServer {
        let port = free_port();
        // Debian's own script (/usr/bin/aiosmtpd), whatever other python3 is on PATH.
        let mut child = Command::new("aiosmtpd")
            .args(["-n", "-c", "aiosmtpd.handlers.Debugging", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .env("PYTHONUNBUFFERED", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run aiosmtpd (Debian's python3-aiosmtpd; `scripts/testinfra up` installs it)");
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).ok();
                panic!(
                    "aiosmtpd exited ({st}) before listening (is python3-aiosmtpd installed? `scripts/testinfra up` installs it):\n{err}"
                );
            }
            assert!(
                Instant::now() < deadline,
                "aiosmtpd did not listen on {port} within 20s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        SmtpServer { child, port, lines }
    }

    /// Reads its output (bounded) until a whole mail holding `needle` has been printed;
    /// returns that mail.
    fn wait_for(&self, needle: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut mail = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains("END MESSAGE") => {
                    if mail.contains(needle) {
                        return mail;
                    }
                    mail.clear();
                }
                Ok(line) => {
                    mail.push_str(&line);
                    mail.push('\n');
                }
                Err(_) => {
                    panic!("aiosmtpd printed no mail with {needle:?} within {secs}s:\n{mail}")
                }
            }
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        unsafe_kill(self.child.id() as i32, 15);
        let _ = self.child.wait();
    }
}

#[test]
fn email_reaches_a_local_smtp_server_from_notifier_test_and_from_a_plugin() {
    let smtp = SmtpServer::start();
    let engine = Engine::start(QUICK);
    engine.add_channel(
        "mail",
        &format!(
            "smtp://127.0.0.1:{}/?to=ops@example.org,oncall@example.org&from=capstan@example.org&tls=none",
            smtp.port
        ),
    );
    let out = engine.data.capstan(&["notifier", "test", "mail"]);
    assert_success(&out, "notifier test mail");
    assert!(stdout(&out).contains("delivered"), "{}", stdout(&out));
    let mail = smtp.wait_for("Capstan test message for channel mail", 30);
    assert!(mail.contains("From: capstan@example.org"), "{mail}");
    assert!(
        mail.contains("ops@example.org") && mail.contains("oncall@example.org"),
        "{mail}"
    );

    engine.install("notifier", "[notify]\nchannels = [\"mail\"]");
    engine.run(
        "notifier",
        serde_json::json!({ "send": [send("mail", "Disk full on web1", None)] }),
    );
    let mail = smtp.wait_for("web1: / at 99%", 30);
    assert!(
        mail.contains("Subject: [capstan] Disk full on web1"),
        "{mail}"
    );
    let audit = engine.wait_for_deliveries(2, 30);
    assert!(
        audit
            .iter()
            .all(|r| r["reason"].as_str().unwrap().starts_with("delivered")),
        "{audit:?}"
    );
}

#[test]
fn the_cli_refuses_a_url_on_the_command_line_and_never_prints_one() {
    // No engine runs: the CLI opens the data directory itself.
    let d = DataDir::with_vault();
    let token = "S3cr3tT0k3nNtfy";
    let url = format!("ntfy+http://:{token}@127.0.0.1:9/alerts");
    let out = d.capstan(&["notifier", "add", "ops", "--url", &url]);
    assert_failure_says(&out, "--url is not accepted");
    assert!(!stderr(&out).contains(token));
    let file = d.path().join("ops.url");
    std::fs::write(&file, format!("{url}\n")).unwrap();
    let add = || {
        d.capstan(&[
            "notifier",
            "add",
            "ops",
            "--url-file",
            file.to_str().unwrap(),
        ])
    };
    let out = add();
    assert_success(&out, "notifier add --url-file");
    assert!(
        stdout(&out).contains("ntfy at ntfy+http://127.0.0.1:9"),
        "{}",
        stdout(&out)
    );
    let out = add();
    assert_failure_says(&out, "exists");
    let out = d.capstan_stdin(
        &["notifier", "add", "bad", "--url-stdin"],
        format!("ntfy://:{token}@h/").as_bytes(),
    );
    assert_failure_says(&out, "names no topic");
    assert!(!stderr(&out).contains(token), "{}", stderr(&out));
    // Nothing listens on port 9: the test fails, saying where, not the URL.
    let out = d.capstan(&["notifier", "test", "ops"]);
    assert_failure_says(&out, "ntfy+http://127.0.0.1:9");
    assert!(!stderr(&out).contains(token), "{}", stderr(&out));
    let out = d.capstan(&["notifier", "list", "--json"]);
    assert_success(&out, "notifier list");
    let list: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list[0]["at"], "ntfy+http://127.0.0.1:9");
    assert!(!stdout(&out).contains(token) && !stdout(&out).contains("alerts"));
    // The URL is in the vault, sealed: not in any file of the data directory in clear.
    let hits = crate::cli_vault::files_holding(&d.data(), &[token.as_bytes().to_vec()]);
    assert!(hits.is_empty(), "{hits:?}");
    assert_success(&d.capstan(&["notifier", "rm", "ops"]), "notifier rm");
    let out = d.capstan(&["notifier", "test", "ops"]);
    assert_failure_says(&out, "no notifier channel named `ops`");
}
