//! The engine service: webhooks and cron schedules running plugins in a real
//! `capstan serve`, the run history, graceful shutdown and hot install/remove. Every
//! request is real HTTP; every run is the real trivial plugin on wasmtime.

use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};
use serde_json::Value;

use crate::util::plugin::wasm;
use crate::util::*;

/// Writes `trivial.wasm` with `manifest` into a fresh directory and installs it with
/// `capstan plugin install` (local, or through the API when the engine runs). Returns
/// the CLI's output (which shows generated hook secrets once).
pub(crate) fn install(data: &DataDir, manifest: &str) -> String {
    install_plugin(data, "trivial", manifest)
}

/// [`install`] with another test plugin's component.
pub(crate) fn install_plugin(data: &DataDir, component: &str, manifest: &str) -> String {
    let dir = data.path().join(format!("src-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(wasm(component), dir.join("plugin.wasm")).unwrap();
    std::fs::write(dir.join("plugin.toml"), manifest).unwrap();
    let out = data.capstan(&[
        "plugin",
        "install",
        dir.join("plugin.wasm").to_str().unwrap(),
    ]);
    assert_success(&out, "plugin install");
    stdout(&out)
}

/// The secret printed once for `hook` by an install.
pub(crate) fn generated_secret(install_output: &str, hook: &str) -> String {
    let mut lines = install_output.lines();
    while let Some(l) = lines.next() {
        if l.contains(&format!("hook {hook}: generated secret")) {
            return lines.next().expect("the secret line").trim().to_string();
        }
    }
    panic!("no generated secret for hook {hook} in:\n{install_output}")
}

pub(crate) fn token_of(server: &Server) -> String {
    server
        .banner
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cap_"))
        .unwrap_or_else(|| panic!("no admin token in the banner:\n{}", server.banner))
        .to_string()
}

pub(crate) fn sign(secret: &str, payload: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(payload);
    hex::encode(mac.finalize().into_bytes())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The run history as `capstan runs --json` prints it (through the API when the engine
/// runs, from the data directory when it does not).
pub(crate) fn runs(data: &DataDir, plugin: &str) -> Vec<Value> {
    let out = data.capstan(&["runs", "--json", "--limit", "1000", "--plugin", plugin]);
    assert_success(&out, "capstan runs --json");
    match json(&stdout(&out)) {
        Value::Array(v) => v,
        other => panic!("not a list: {other}"),
    }
}

fn time(v: &Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str()
        .unwrap_or_else(|| panic!("not a time: {v}"))
        .parse()
        .unwrap()
}

/// Waits until `f` holds, up to `secs`, polling.
pub(crate) fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("not within {secs} s: {what}");
}

const HOOKS: &str = r#"
[[triggers.webhook]]
name = "gh"
auth = "hmac-sha256"
delivery_header = "X-GitHub-Delivery"
max_body = "1KiB"

[[triggers.webhook]]
name = "stamped"
auth = "hmac-sha256"
signature_header = "X-Signature"
signature_prefix = "v0="
signed_payload = "v0:{timestamp}:{body}"
timestamp_header = "X-Timestamp"
replay_window = "5m"

[[triggers.webhook]]
name = "tokened"
auth = "bearer"
"#;

#[test]
fn webhook_deliveries_are_verified_and_every_accepted_one_is_a_recorded_run() {
    let data = DataDir::with_vault();
    let out = install(
        &data,
        &format!("name = \"hooked\"\nversion = \"1\"\n{HOOKS}"),
    );
    let gh = generated_secret(&out, "gh");
    let stamped = generated_secret(&out, "stamped");
    let tokened = generated_secret(&out, "tokened");
    assert!(gh.len() >= 32 && gh != stamped && stamped != tokened);
    let server = Server::start(&data);
    let addr = server.addr.as_str();
    let post = |path: &str, headers: &[(&str, &str)], body: &[u8]| {
        let (status, body) = http(addr, "POST", path, headers, body);
        (status, body)
    };

    // A genuine GitHub-style delivery runs the plugin; ?wait=true answers with its end.
    let body = br#"{"ref":"main"}"#;
    let sig = format!("sha256={}", sign(&gh, body));
    let (status, resp) = post(
        "/hooks/gh?wait=true",
        &[("X-Hub-Signature-256", &sig), ("X-GitHub-Delivery", "d-1")],
        body,
    );
    assert_eq!(status, 200, "{resp}");
    let resp = json(&resp);
    assert_eq!(resp["status"], "ok", "{resp}");
    assert_eq!(resp["run"]["status"], "ok", "{resp}");
    let first_run = resp["run_id"].as_str().unwrap().to_string();
    let out = data.capstan(&["runs", "show", &first_run, "--json"]);
    assert_success(&out, "capstan runs show");
    let record = json(&stdout(&out));
    assert_eq!(record["trigger"]["kind"], "webhook");
    assert_eq!(record["trigger"]["hook"], "gh");
    assert_eq!(record["trigger"]["delivery"], "d-1");

    // The same delivery again is not run twice: 200, the first run's id.
    let (status, resp) = post(
        "/hooks/gh",
        &[("X-Hub-Signature-256", &sig), ("X-GitHub-Delivery", "d-1")],
        body,
    );
    assert_eq!(status, 200, "{resp}");
    let resp = json(&resp);
    assert_eq!(resp["status"], "duplicate");
    assert_eq!(resp["run_id"], first_run.as_str());

    // A new delivery (new id, new body) is a new run: 202 with its id.
    let body2 = br#"{"ref":"next"}"#;
    let (status, resp) = post(
        "/hooks/gh",
        &[
            (
                "X-Hub-Signature-256",
                &format!("sha256={}", sign(&gh, body2)),
            ),
            ("X-GitHub-Delivery", "d-2"),
        ],
        body2,
    );
    assert_eq!(status, 202, "{resp}");
    assert_ne!(json(&resp)["run_id"], first_run.as_str());

    // Refused: a wrong signature, a signature of another body, none at all, a signature
    // made with another secret, no delivery id, a body over the hook's limit.
    type Case<'a> = (Vec<(&'a str, String)>, Vec<u8>, u16);
    let refused: Vec<Case> = vec![
        (
            vec![
                ("X-Hub-Signature-256", "sha256=00".into()),
                ("X-GitHub-Delivery", "d-3".into()),
            ],
            body.to_vec(),
            401,
        ),
        (
            vec![
                ("X-Hub-Signature-256", sig.clone()),
                ("X-GitHub-Delivery", "d-4".into()),
            ],
            br#"{"ref":"evil"}"#.to_vec(),
            401,
        ),
        (
            vec![("X-GitHub-Delivery", "d-5".into())],
            body.to_vec(),
            401,
        ),
        (
            vec![
                (
                    "X-Hub-Signature-256",
                    format!("sha256={}", sign(&stamped, body)),
                ),
                ("X-GitHub-Delivery", "d-6".into()),
            ],
            body.to_vec(),
            401,
        ),
        (
            vec![("X-Hub-Signature-256", sig.clone())],
            body.to_vec(),
            422,
        ),
        (
            vec![
                (
                    "X-Hub-Signature-256",
                    format!("sha256={}", sign(&gh, &[b'x'; 2048])),
                ),
                ("X-GitHub-Delivery", "d-7".into()),
            ],
            vec![b'x'; 2048],
            413,
        ),
    ];
    for (i, (headers, body, want)) in refused.iter().enumerate() {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, resp) = post("/hooks/gh", &h, body);
        assert_eq!(status, *want, "case {i}: {resp}");
        let err = json(&resp);
        assert!(err["error"]["message"].is_string(), "case {i}: {resp}");
        assert!(!resp.contains(&gh), "the secret is never echoed");
    }

    // A signed timestamp inside the replay window runs; the same delivery replayed ten
    // minutes later (a captured request) is refused, as is a timestamp from the future.
    let stamp_at = |secs: i64| {
        let ts = secs.to_string();
        let payload = format!("v0:{ts}:{{}}");
        (ts, format!("v0={}", sign(&stamped, payload.as_bytes())))
    };
    let now = chrono::Utc::now().timestamp();
    for (at, want) in [(now, 202), (now - 600, 401), (now + 600, 401)] {
        let (ts, sig) = stamp_at(at);
        let (status, resp) = post(
            "/hooks/stamped",
            &[("X-Timestamp", &ts), ("X-Signature", &sig)],
            b"{}",
        );
        assert_eq!(status, want, "timestamp {at} (now {now}): {resp}");
    }

    // Bearer hooks: the right token runs, a wrong one does not.
    let bearer = format!("Bearer {tokened}");
    let (status, resp) = post("/hooks/tokened", &[("Authorization", &bearer)], b"x");
    assert_eq!(status, 202, "{resp}");
    let (status, _) = post("/hooks/tokened", &[("Authorization", "Bearer nope")], b"x");
    assert_eq!(status, 401);
    let (status, _) = post("/hooks/nope", &[], b"x");
    assert_eq!(status, 404);
    // A query that does not parse is refused as JSON, before anything runs.
    let (status, resp) = post(
        "/hooks/tokened?wait=perhaps",
        &[("Authorization", &bearer)],
        b"x",
    );
    assert_eq!(status, 422, "{resp}");
    let err: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(err["error"]["kind"], "invalid", "{resp}");

    // Accepted deliveries and recorded runs agree: d-1, d-2, one stamped, one bearer.
    eventually(20, "four runs recorded, all ok", || {
        let r = runs(&data, "hooked");
        r.len() == 4 && r.iter().all(|r| r["status"] == "ok")
    });
    let hooks: Vec<String> = runs(&data, "hooked")
        .iter()
        .map(|r| r["trigger"]["hook"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(hooks.iter().filter(|h| *h == "gh").count(), 2, "{hooks:?}");
    let exit = server.stop();
    assert!(exit.success(), "serve exits cleanly: {exit}");
}

const REPLAY_HOOKS: &str = r#"
[[triggers.webhook]]
name = "gh"
auth = "hmac-sha256"
delivery_header = "X-GitHub-Delivery"

[[triggers.webhook]]
name = "stamped"
auth = "hmac-sha256"
signature_header = "X-Signature"
signature_prefix = "v0="
signed_payload = "v0:{timestamp}:{body}"
timestamp_header = "X-Timestamp"

[[triggers.webhook]]
name = "again"
auth = "hmac-sha256"
delivery_header = "X-GitHub-Delivery"
replay = "allow"
"#;

/// Runs of `plugin` by hook, from the run history.
fn runs_by_hook(data: &DataDir, plugin: &str) -> std::collections::BTreeMap<String, usize> {
    let mut by = std::collections::BTreeMap::new();
    for r in runs(data, plugin) {
        *by.entry(r["trigger"]["hook"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    by
}

#[test]
fn a_captured_delivery_replayed_with_fresh_ids_or_resent_runs_once_even_after_a_restart() {
    let data = DataDir::with_vault();
    let out = install(
        &data,
        &format!("name = \"replayed\"\nversion = \"1\"\n{REPLAY_HOOKS}"),
    );
    let (gh, stamped, again) = (
        generated_secret(&out, "gh"),
        generated_secret(&out, "stamped"),
        generated_secret(&out, "again"),
    );
    let server = Server::start(&data);
    let post = |addr: &str, path: &str, headers: &[(&str, &str)], body: &[u8]| {
        let (status, body) = http(addr, "POST", path, headers, body);
        (status, json(&body))
    };

    // A GitHub-signed delivery runs; the same capture with 5 fresh X-GitHub-Delivery
    // values (not covered by the signature) answers duplicate with the first run's id.
    let body = br#"{"ref":"refs/heads/main","after":"9b2e1c4f"}"#;
    let sig = format!("sha256={}", sign(&gh, body));
    let with_id = |id: &str| -> Vec<(&str, String)> {
        vec![
            ("X-Hub-Signature-256", sig.clone()),
            ("X-GitHub-Delivery", id.to_string()),
        ]
    };
    let send = |addr: &str, hook: &str, h: Vec<(&str, String)>, body: &[u8]| {
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        post(addr, &format!("/hooks/{hook}"), &h, body)
    };
    let (status, first) = send(&server.addr, "gh", with_id("orig-1"), body);
    assert_eq!(status, 202, "{first}");
    let first_run = first["run_id"].as_str().unwrap().to_string();
    for i in 1..=5 {
        let (status, resp) = send(&server.addr, "gh", with_id(&format!("forged-{i}")), body);
        assert_eq!(status, 200, "replay {i}: {resp}");
        assert_eq!(resp["status"], "duplicate", "replay {i}: {resp}");
        assert_eq!(resp["matched"], "signature", "replay {i}: {resp}");
        assert_eq!(resp["run_id"], first_run.as_str(), "replay {i}: {resp}");
    }
    // GitHub's "Redeliver" (same id, same signature) answers with the first run too.
    let (status, resp) = send(&server.addr, "gh", with_id("orig-1"), body);
    assert_eq!(
        (status, resp["run_id"].as_str()),
        (200, Some(first_run.as_str()))
    );

    // A Slack-style timestamp-signed delivery sent twice within the window runs once.
    let ts = chrono::Utc::now().timestamp().to_string();
    let stamp_sig = format!("v0={}", sign(&stamped, format!("v0:{ts}:{{}}").as_bytes()));
    let stamped_headers = [
        ("X-Timestamp", ts.as_str()),
        ("X-Signature", stamp_sig.as_str()),
    ];
    let (status, stamped_first) = post(&server.addr, "/hooks/stamped", &stamped_headers, b"{}");
    assert_eq!(status, 202, "{stamped_first}");
    let (status, resp) = post(&server.addr, "/hooks/stamped", &stamped_headers, b"{}");
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["run_id"], stamped_first["run_id"]);

    // The documented opt-out: replay = "allow" runs each delivery id again.
    let again_sig = format!("sha256={}", sign(&again, body));
    for id in ["a-1", "a-2"] {
        let (status, resp) = post(
            &server.addr,
            "/hooks/again",
            &[
                ("X-Hub-Signature-256", &again_sig),
                ("X-GitHub-Delivery", id),
            ],
            body,
        );
        assert_eq!(status, 202, "{id}: {resp}");
    }

    let want: std::collections::BTreeMap<String, usize> = [
        ("again".to_string(), 2),
        ("gh".to_string(), 1),
        ("stamped".to_string(), 1),
    ]
    .into();
    eventually(20, "four runs recorded, all ok", || {
        let r = runs(&data, "replayed");
        r.len() == 4 && r.iter().all(|r| r["status"] == "ok")
    });
    assert_eq!(runs_by_hook(&data, "replayed"), want);

    // Remembered in the data directory: after a restart, the capture is still a replay.
    let exit = server.stop();
    assert!(exit.success(), "serve exits cleanly: {exit}");
    let server = Server::start(&data);
    let (status, resp) = send(&server.addr, "gh", with_id("after-restart"), body);
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["run_id"], first_run.as_str());
    let (status, resp) = post(&server.addr, "/hooks/stamped", &stamped_headers, b"{}");
    assert_eq!((status, &resp["run_id"]), (200, &stamped_first["run_id"]));
    assert_eq!(runs_by_hook(&data, "replayed"), want, "nothing else ran");
    drop(server);
}

const WAIT_HOOKS: &str = r#"
[[triggers.webhook]]
name = "summary"
auth = "hmac-sha256"

[[triggers.webhook]]
name = "full"
auth = "hmac-sha256"
wait_response = "full"

[[triggers.webhook]]
name = "bearer"
auth = "bearer"
"#;

#[test]
fn wait_true_answers_a_run_summary_unless_the_hook_opts_in_or_an_api_token_comes_along() {
    let data = DataDir::with_vault();
    let out = install_plugin(
        &data,
        "probe",
        &format!("name = \"waited\"\nversion = \"1\"\n{WAIT_HOOKS}"),
    );
    let secret = |hook: &str| generated_secret(&out, hook);
    let server = Server::start(&data);
    let token = token_of(&server);
    // The probe makes one host call, refused (no device is in its scope): the full
    // record shows it, with the device and the reason, in host_calls.
    let calls = |run: &Value| run["host_calls"].as_array().map_or(0, Vec::len);
    let n = std::cell::Cell::new(0);
    let delivery = |hook: &str, extra: &[(&str, &str)]| {
        n.set(n.get() + 1);
        let body = format!(
            r#"[{{"op": "connect", "device": "secret-host-{}"}}]"#,
            n.get()
        );
        let sig = format!("sha256={}", sign(&secret(hook), body.as_bytes()));
        let mut h = vec![("X-Hub-Signature-256", sig.as_str())];
        h.extend_from_slice(extra);
        let (status, resp) = http(
            &server.addr,
            "POST",
            &format!("/hooks/{hook}?wait=true"),
            &h,
            body.as_bytes(),
        );
        (status, json(&resp))
    };
    let summary_keys = [
        "duration_ms",
        "error",
        "finished_at",
        "id",
        "outcome",
        "plugin",
        "queued_at",
        "started_at",
        "status",
    ];

    // Without a token: the summary only; no logs, no host calls.
    let (status, resp) = delivery("summary", &[]);
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["detail"], "summary", "{resp}");
    let run = resp["run"].as_object().unwrap();
    let mut keys: Vec<&str> = run.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, summary_keys, "{resp}");
    assert!(
        run.get("logs").is_none() && run.get("host_calls").is_none(),
        "{resp}"
    );
    assert_eq!(resp["run_id"], run["id"]);
    assert!(run["finished_at"].is_string() && run["duration_ms"].is_number());
    let summarised = resp["run_id"].as_str().unwrap().to_string();

    // With a valid API token in X-Capstan-Token: the full record.
    let (status, resp) = delivery("summary", &[("X-Capstan-Token", &token)]);
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["detail"], "full", "{resp}");
    assert_eq!(calls(&resp["run"]), 1, "{resp}");
    assert!(resp["run"].get("logs").is_some(), "{resp}");

    // A token that does not verify is refused before anything runs.
    let (status, resp) = delivery("summary", &[("X-Capstan-Token", "cap_nope_nope")]);
    assert_eq!(status, 401, "{resp}");
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("X-Capstan-Token"),
        "{resp}"
    );

    // A hook that opts in (wait_response = "full") answers the full record.
    let (status, resp) = delivery("full", &[]);
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["detail"], "full", "{resp}");
    assert_eq!(calls(&resp["run"]), 1, "{resp}");

    // A bearer hook takes its own token in Authorization, and the API token beside it.
    let bearer = format!("Bearer {}", secret("bearer"));
    let body = br#"[{"op": "connect", "device": "elsewhere"}]"#;
    for (extra, detail) in [(None, "summary"), (Some(token.as_str()), "full")] {
        let mut h = vec![("Authorization", bearer.as_str())];
        h.extend(extra.map(|t| ("X-Capstan-Token", t)));
        let (status, resp) = http(&server.addr, "POST", "/hooks/bearer?wait=true", &h, body);
        assert_eq!(status, 200, "{resp}");
        assert_eq!(json(&resp)["detail"], detail, "{resp}");
    }

    // Five runs, the refused delivery none; the summarised run's record is whole in the
    // API (the summary withheld it, nothing was lost).
    let r = runs(&data, "waited");
    assert_eq!(r.len(), 5, "{r:?}");
    let whole = r.iter().find(|r| r["id"] == summarised.as_str()).unwrap();
    assert_eq!(calls(whole), 1, "{whole}");
    assert_eq!(whole["host_calls"][0]["device"], "secret-host-1", "{whole}");
    drop(server);
}

#[test]
fn cron_with_seconds_fires_every_second_on_the_second() {
    let data = DataDir::with_vault();
    install(
        &data,
        "name = \"ticker\"\nversion = \"1\"\n[[triggers.cron]]\nschedule = \"* * * * * *\"\n",
    );
    let server = Server::start(&data);
    std::thread::sleep(Duration::from_millis(4500));
    let list = runs(&data, "ticker");
    drop(server);
    assert!(list.len() >= 3, "at least 3 fires in 4.5 s: {}", list.len());
    let mut scheduled: Vec<chrono::DateTime<chrono::Utc>> = Vec::new();
    for r in &list {
        assert_eq!(r["trigger"]["kind"], "cron");
        assert_eq!(r["trigger"]["schedule"], "* * * * * *");
        let at = time(&r["trigger"]["scheduled_at"]);
        assert_eq!(at.timestamp_subsec_millis(), 0, "on a whole second: {at}");
        let queued = time(&r["queued_at"]);
        assert!(
            queued >= at && queued - at < chrono::Duration::seconds(1),
            "fired within its second: scheduled {at}, queued {queued}"
        );
        scheduled.push(at);
    }
    scheduled.sort();
    for w in scheduled.windows(2) {
        assert_eq!(
            w[1] - w[0],
            chrono::Duration::seconds(1),
            "one fire per second, none missed: {scheduled:?}"
        );
    }
}

/// The runs of a plugin as (scheduled, started, finished), oldest first.
fn spans(
    list: &[Value],
) -> Vec<(
    chrono::DateTime<chrono::Utc>,
    chrono::DateTime<chrono::Utc>,
    chrono::DateTime<chrono::Utc>,
)> {
    let mut v: Vec<_> = list
        .iter()
        .filter(|r| r["status"] == "ok")
        .map(|r| {
            (
                time(&r["trigger"]["scheduled_at"]),
                time(&r["started_at"]),
                time(&r["finished_at"]),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn each_overlap_policy_does_what_it_says() {
    let data = DataDir::with_vault();
    // Each run takes 2.5 s; the schedule fires every second.
    for (name, overlap) in [
        ("skipper", "skip"),
        ("queuer", "queue"),
        ("allower", "allow"),
    ] {
        install(
            &data,
            &format!(
                "name = \"{name}\"\nversion = \"1\"\n[[triggers.cron]]\nschedule = \"* * * * * *\"\noverlap = \"{overlap}\"\n[config]\nsleep_ms = 2500\n"
            ),
        );
    }
    let server = Server::start(&data);
    std::thread::sleep(Duration::from_secs(8));
    // Stopping lets the running ones finish (grace 30 s); their records are final.
    assert!(server.stop().success());

    let skip = spans(&runs(&data, "skipper"));
    assert!(skip.len() >= 2, "{skip:?}");
    for w in skip.windows(2) {
        assert!(
            w[1].1 >= w[0].2,
            "skip: a run started while another ran: {w:?}"
        );
    }
    let fires_skipped = runs(&data, "skipper").len();
    assert!(
        fires_skipped <= 4,
        "skip: fires during a run are dropped, not recorded: {fires_skipped} runs in 8 s"
    );

    let queue = spans(&runs(&data, "queuer"));
    assert!(queue.len() >= 2, "{queue:?}");
    for w in queue.windows(2) {
        assert!(w[1].1 >= w[0].2, "queue: runs overlapped: {w:?}");
    }
    assert!(
        queue.windows(2).any(|w| w[1].0 < w[0].2),
        "queue: a fire that came during a run waited and ran after it: {queue:?}"
    );

    let allow = spans(&runs(&data, "allower"));
    assert!(
        allow.windows(2).any(|w| w[1].1 < w[0].2),
        "allow: runs overlapped: {allow:?}"
    );
}

#[test]
fn shutdown_lets_short_runs_finish_and_records_the_rest_as_interrupted() {
    let data = DataDir::with_vault();
    let out = install(
        &data,
        "name = \"sleeper\"\nversion = \"1\"\n[[triggers.webhook]]\nname = \"sleep\"\nauth = \"bearer\"\n",
    );
    let bearer = format!("Bearer {}", generated_secret(&out, "sleep"));
    let server = Server::start_with(&data, |c| {
        c.env("CAPSTAN_RUNS_SHUTDOWN_GRACE", "2s");
    });
    for ms in ["sleep:300", "sleep:30000"] {
        let (status, resp) = http(
            &server.addr,
            "POST",
            "/hooks/sleep",
            &[("Authorization", &bearer)],
            ms.as_bytes(),
        );
        assert_eq!(status, 202, "{resp}");
    }
    eventually(10, "both runs running", || {
        runs(&data, "sleeper")
            .iter()
            .filter(|r| r["status"] == "running" || r["status"] == "ok")
            .count()
            == 2
    });
    let started = Instant::now();
    assert!(server.stop().success(), "SIGTERM is a clean stop");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the 30 s run did not hold the engine past its grace period"
    );
    let list = runs(&data, "sleeper");
    let mut statuses: Vec<&str> = list.iter().map(|r| r["status"].as_str().unwrap()).collect();
    statuses.sort();
    assert_eq!(statuses, ["interrupted", "ok"], "{list:?}");
    let interrupted = list.iter().find(|r| r["status"] == "interrupted").unwrap();
    assert!(
        interrupted["error"]
            .as_str()
            .unwrap()
            .contains("shutdown grace period"),
        "{interrupted}"
    );
    assert!(interrupted["finished_at"].is_string());
}

#[test]
fn the_run_history_survives_a_restart_and_lists_the_same_runs() {
    let data = DataDir::with_vault();
    let out = install(
        &data,
        "name = \"kept\"\nversion = \"1\"\n[[triggers.webhook]]\nname = \"kept\"\nauth = \"bearer\"\n",
    );
    let bearer = format!("Bearer {}", generated_secret(&out, "kept"));
    let server = Server::start(&data);
    let mut ids = Vec::new();
    for i in 0..12 {
        let (status, resp) = http(
            &server.addr,
            "POST",
            "/hooks/kept?wait=true",
            &[("Authorization", &bearer)],
            format!("delivery {i}").as_bytes(),
        );
        assert_eq!(status, 200, "{resp}");
        ids.push(json(&resp)["run_id"].as_str().unwrap().to_string());
    }
    let before = runs(&data, "kept");
    assert!(server.stop().success());

    // Stopped: read from the data directory.
    let offline = runs(&data, "kept");
    assert_eq!(offline, before, "the same records with the engine stopped");
    // Started again: the same records through the API, and each shows in full.
    let server = Server::start(&data);
    let after = runs(&data, "kept");
    assert_eq!(after, before);
    let mut listed: Vec<String> = after
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    let out = data.capstan(&["runs", "show", &ids[0]]);
    assert_success(&out, "runs show");
    let text = stdout(&out);
    assert!(
        text.contains("status:   ok") && text.contains("webhook kept"),
        "{text}"
    );
    drop(server);
}

#[test]
fn plugins_installed_and_removed_while_the_engine_runs_take_effect_at_once() {
    let data = DataDir::with_vault();
    let server = Server::start(&data);
    let token = token_of(&server);
    // Installed through the running engine (the CLI finds it and uses its API).
    let out = install(
        &data,
        "name = \"late\"\nversion = \"1\"\n[[triggers.cron]]\nschedule = \"* * * * * *\"\n[[triggers.webhook]]\nname = \"late\"\nauth = \"bearer\"\n",
    );
    assert!(out.contains("active now"), "{out}");
    let bearer = format!("Bearer {}", generated_secret(&out, "late"));
    eventually(10, "the new cron trigger fires", || {
        runs(&data, "late")
            .iter()
            .any(|r| r["trigger"]["kind"] == "cron" && r["status"] == "ok")
    });
    let (status, resp) = http(
        &server.addr,
        "POST",
        "/hooks/late?wait=true",
        &[("Authorization", &bearer)],
        b"",
    );
    assert_eq!(status, 200, "the new hook answers: {resp}");
    let (status, resp) = http(
        &server.addr,
        "GET",
        "/api/hooks",
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    );
    assert_eq!(status, 200, "{resp}");
    assert!(resp.contains("\"late\""), "{resp}");
    assert!(
        !resp.contains(bearer.trim_start_matches("Bearer ")),
        "no secret in the list"
    );

    let out = data.capstan(&["plugin", "remove", "late"]);
    assert_success(&out, "plugin remove");
    let (status, _) = http(
        &server.addr,
        "POST",
        "/hooks/late",
        &[("Authorization", &bearer)],
        b"",
    );
    assert_eq!(status, 404, "the removed plugin's hook is gone");
    // Runs already under way may end; no new fire starts after that.
    std::thread::sleep(Duration::from_millis(1500));
    let settled = runs(&data, "late").len();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(runs(&data, "late").len(), settled, "no fire after removal");
    drop(server);
}

#[test]
fn plugin_schedule_shows_next_fire_times_and_bad_schedules_are_refused_at_install() {
    let data = DataDir::with_vault();
    install(
        &data,
        "name = \"office\"\nversion = \"1\"\n[[triggers.cron]]\nschedule = \"0 30 9 * * Mon-Fri\"\ntimezone = \"Europe/Berlin\"\n[[triggers.cron]]\nschedule = \"@hourly\"\n",
    );
    let out = data.capstan(&["plugin", "schedule", "office", "--count", "3"]);
    assert_success(&out, "plugin schedule");
    let text = stdout(&out);
    let berlin: Vec<&str> = text.lines().filter(|l| l.contains("09:30:00 CE")).collect();
    assert_eq!(
        berlin.len(),
        3,
        "three fire times at 09:30 Berlin time:\n{text}"
    );
    assert!(
        text.contains("Europe/Berlin") && text.contains("@hourly"),
        "{text}"
    );
    assert!(text.contains("(overlap skip)"), "{text}");
    let hourly = text
        .lines()
        .filter(|l| l.trim_start().starts_with("20") && l.contains(":00:00 UTC"))
        .count();
    assert!(hourly >= 3, "{text}");

    let dir = data.path().join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(wasm("trivial"), dir.join("plugin.wasm")).unwrap();
    for (schedule, needle) in [
        ("61 * * * *", "triggers.cron[0].schedule"),
        ("* * *", "3 fields"),
        ("@fortnightly", "triggers.cron[0].schedule"),
    ] {
        std::fs::write(
            dir.join("plugin.toml"),
            format!(
                "name = \"bad\"\nversion = \"1\"\n[[triggers.cron]]\nschedule = \"{schedule}\"\n"
            ),
        )
        .unwrap();
        let out = data.capstan(&[
            "plugin",
            "install",
            dir.join("plugin.wasm").to_str().unwrap(),
        ]);
        assert_failure_says(&out, needle);
    }
    let out = data.capstan(&["plugin", "list"]);
    assert!(!stdout(&out).contains("bad"), "nothing installed");
}

#[test]
fn runs_follow_prints_each_run_as_it_is_queued_starts_and_ends() {
    use std::io::BufRead;
    let data = DataDir::with_vault();
    let out = install(
        &data,
        "name = \"followed\"\nversion = \"1\"\n[[triggers.webhook]]\nname = \"f\"\nauth = \"bearer\"\n",
    );
    let bearer = format!("Bearer {}", generated_secret(&out, "f"));
    let server = Server::start(&data);
    let mut follower = data
        .cmd()
        .args(["runs", "--follow", "--json", "--plugin", "followed"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(follower.stdout.take().unwrap()).lines();
    // The list comes first (empty), then the stream: give it a moment to subscribe.
    assert_eq!(lines.next().unwrap().unwrap().trim(), "[]");
    std::thread::sleep(Duration::from_millis(500));
    let (status, resp) = http(
        &server.addr,
        "POST",
        "/hooks/f",
        &[("Authorization", &bearer)],
        b"sleep:200",
    );
    assert_eq!(status, 202, "{resp}");
    let run_id = json(&resp)["run_id"].as_str().unwrap().to_string();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let v = json(&line.unwrap());
        assert_eq!(v["id"], run_id.as_str());
        seen.push(v["status"].as_str().unwrap().to_string());
        if v["status"] == "ok" {
            break;
        }
    }
    assert_eq!(seen, ["queued", "running", "ok"]);
    let _ = follower.kill();
    let _ = follower.wait();
    drop(server);
}

#[test]
fn a_hook_secret_rotated_while_the_engine_runs_overlaps_until_the_old_one_is_retired() {
    let data = DataDir::with_vault();
    let out = install(
        &data,
        "name = \"rotated\"\nversion = \"1\"\n[[triggers.webhook]]\nname = \"r\"\nauth = \"bearer\"\n",
    );
    let old = generated_secret(&out, "r");
    let server = Server::start(&data);
    let deliver = |secret: &str| {
        http(
            &server.addr,
            "POST",
            "/hooks/r",
            &[("Authorization", &format!("Bearer {secret}"))],
            b"",
        )
        .0
    };
    assert_eq!(deliver(&old), 202);

    // Rotated through the running engine: both secrets work.
    let out = data.capstan(&["hook", "rotate", "r"]);
    assert_success(&out, "hook rotate");
    let text = stdout(&out);
    let new = text
        .lines()
        .skip_while(|l| !l.contains("generated secret"))
        .nth(1)
        .unwrap_or_else(|| panic!("no generated secret:\n{text}"))
        .trim()
        .to_string();
    assert_ne!(new, old);
    assert_eq!(deliver(&new), 202, "the new secret works at once");
    assert_eq!(deliver(&old), 202, "the old one still works until retired");

    // A chosen secret that is too short is refused and changes nothing.
    let out = data.capstan_stdin(&["hook", "rotate", "r", "--secret-stdin"], b"short");
    assert_failure_says(&out, "at least 16 bytes");
    assert!(!stderr(&out).contains("short"), "the secret is not echoed");
    assert_eq!(deliver(&new), 202);

    let out = data.capstan(&["hook", "retire", "r"]);
    assert_success(&out, "hook retire");
    assert!(
        stdout(&out).contains("no longer accepted"),
        "{}",
        stdout(&out)
    );
    assert_eq!(deliver(&old), 401, "the retired secret is refused");
    assert_eq!(deliver(&new), 202);

    let out = data.capstan(&["hook", "rotate", "nope"]);
    assert_failure_says(&out, "no installed plugin declares hook");
    let out = data.capstan(&["hook", "list"]);
    assert_success(&out, "hook list");
    assert!(stdout(&out).contains("/hooks/r"), "{}", stdout(&out));
    assert!(!stdout(&out).contains(&new), "no secret in the list");
    drop(server);

    // Stopped: the vault keeps the new secret; the engine started again accepts it.
    let server = Server::start(&data);
    let (status, _) = http(
        &server.addr,
        "POST",
        "/hooks/r",
        &[("Authorization", &format!("Bearer {new}"))],
        b"",
    );
    assert_eq!(status, 202);
}

#[test]
fn runs_with_a_limit_past_the_page_size_pages_through_the_history() {
    use capstan::runs::{RunStore, RunStoreConfig, RunTrigger};
    let data = DataDir::with_vault();
    // 1,350 runs over three plugins: more than one page of the API (1,000), and within
    // each plugin's retention (500).
    let mut ids = Vec::new();
    {
        let store = crate::cli_vault::open_store(&data);
        let history = RunStore::open(&store, RunStoreConfig::default()).unwrap();
        for i in 0..1350 {
            let by = RunTrigger::Manual { by: "test".into() };
            let r = history.create(["a", "b", "c"][i % 3], by).unwrap();
            ids.push(r.id.to_string());
        }
        store.flush().unwrap();
    }
    ids.reverse(); // newest first, as the list is
    let list = |limit: &str| -> Vec<String> {
        let out = data.capstan(&["runs", "--json", "--limit", limit]);
        assert_success(&out, "capstan runs --json");
        match json(&stdout(&out)) {
            Value::Array(v) => v
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_string())
                .collect(),
            other => panic!("not a list: {other}"),
        }
    };
    assert_eq!(list("1000"), ids[..1000], "one full page");
    assert_eq!(list("1200"), ids[..1200], "a page and part of the next");
    assert_eq!(list("5000"), ids, "past the end: every run, once");
    // One plugin's runs page the same way (450 of them: one page).
    let out = data.capstan(&["runs", "--json", "--limit", "2000", "--plugin", "b"]);
    assert_success(&out, "capstan runs --plugin b");
    let b = json(&stdout(&out));
    assert_eq!(b.as_array().unwrap().len(), 450, "{b}");
}
