//! The dashboard's server time at fleet scale: 200 devices and 10,000 recorded runs.
//!
//! Run with `cargo bench --bench dashboard` (release; well under a minute). A scratch
//! engine gets 200 registered devices (not connected: each gets a last check
//! synthesized through the engine's own check history, as a real check records it), the
//! example plugins `inventory` and `redeploy` installed, and `CAPSTAN_BENCH_RUNS`
//! (default 10000) finished runs recorded as the scheduler records them (create, start,
//! finish), one in ten failed. A session is opened by logging in through the router.
//!
//! Then each page is rendered `CAPSTAN_BENCH_REPEATS` (default 200) times through the
//! dashboard's router in-process (`tower::ServiceExt::oneshot`, the whole response body
//! read): the overview, the runs page (first page, and filtered by status), a plugin
//! page and a run page. Printed per page: p50 and p99 milliseconds and the body size.
//! No assertion on timing: the figures are for reading (the overview's target is well
//! under 50 ms).

// Benchmarks set up environments for the processes they start.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use chrono::Utc;
use tower::ServiceExt;

use capstan::device::{DeviceKind, DeviceSpec};
use capstan::docker::{CheckReport, DockerFacts, Step};
use capstan::plugin::PluginSource;
use capstan::runs::{
    CallDecision, HostCall, LogLevel, LogLine, RunEnd, RunLogs, RunStatus, RunTrigger,
};
use capstan::token::Role;

const DEVICES: usize = 200;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn check_of(device: &str, n: usize) -> CheckReport {
    let ok = n % 25 != 7;
    CheckReport {
        device: device.to_string(),
        device_id: None,
        kind: DeviceKind::Ssh,
        address: format!("deploy@10.0.{}.{}:22", n / 250, n % 250),
        connected: ok,
        docker: ok.then(|| DockerFacts {
            version: "27.3.1".into(),
            api_version: "1.47".into(),
            min_api_version: Some("1.24".into()),
            negotiated_api_version: "1.47".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            kernel_version: None,
            operating_system: None,
            name: Some(device.to_string()),
            containers: Some(12),
            containers_running: Some(10),
            images: Some(30),
        }),
        latency_ms: ok.then_some(0.4 + (n % 17) as f64 * 0.3),
        total_ms: 38.0,
        steps: vec![
            Step {
                step: "tcp".into(),
                ms: 0.3,
            },
            Step {
                step: "ssh-handshake".into(),
                ms: 20.0,
            },
        ],
        failed_step: None,
        error: None,
        host_key: None,
        pooled: false,
        owner: None,
    }
}

fn end_of(n: usize) -> RunEnd {
    let mut logs = RunLogs::default();
    logs.push(
        LogLine {
            at: Utc::now(),
            level: LogLevel::Info,
            message: format!("inventory pass {n}: 12 containers on 200 devices"),
        },
        capstan::runs::DEFAULT_LOG_CAP_BYTES,
    );
    let call = HostCall {
        op: "docker.list-containers".into(),
        device: format!("dev-{:03}", n % DEVICES),
        request: "GET /containers/json".into(),
        decision: CallDecision::Allow,
        result: "ok".into(),
        ms: 1.2,
        reason: String::new(),
    };
    let mut end = if n % 10 == 9 {
        RunEnd::error(RunStatus::Failed, "dev-042: the daemon answered 500")
    } else {
        RunEnd::ok(Some(serde_json::json!({"containers": 12})))
    };
    end.logs = logs;
    end.host_calls = vec![call];
    end
}

async fn body_of(
    router: &axum::Router,
    req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, headers, body.to_vec())
}

fn cookie_of(headers: &axum::http::HeaderMap, name: &str) -> String {
    headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| {
            c.split(';')
                .next()
                .and_then(|kv| kv.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no {name} cookie"))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() {
    let runs_total = env_or("CAPSTAN_BENCH_RUNS", 10_000) as usize;
    let repeats = env_or("CAPSTAN_BENCH_REPEATS", 200) as usize;
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let engine = common::engine_in(&dir.path().join("data"));
    {
        let devices = engine.devices().unwrap();
        for i in 0..DEVICES {
            let name = format!("dev-{i:03}");
            devices
                .add(DeviceSpec {
                    kind: Some(DeviceKind::Local),
                    name: Some(name.clone()),
                    docker_host: Some(Some(format!("unix:///run/bench-{i}.sock"))),
                    ..Default::default()
                })
                .unwrap();
            for k in 0..20 {
                engine.docker.history().record_at(
                    check_of(&name, i + k),
                    Utc::now() - chrono::Duration::seconds(60 * (20 - k as i64)),
                );
            }
        }
    }
    let scheduler = capstan::scheduler::Scheduler::with_defaults(engine.clone()).unwrap();
    for name in ["inventory", "redeploy"] {
        let d = dir.path().join("plugins").join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(common::wasm_path(name), d.join(format!("{name}.wasm"))).unwrap();
        std::fs::copy(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("plugins/examples")
                .join(name)
                .join("plugin.toml"),
            d.join("plugin.toml"),
        )
        .unwrap();
        scheduler
            .plugins()
            .install(&PluginSource::read(&d, None).unwrap())
            .unwrap();
    }
    scheduler.plugins().load_installed().unwrap();

    let fill = Instant::now();
    let store = scheduler.runs();
    let mut last = None;
    for n in 0..runs_total {
        let plugin = if n % 3 == 0 { "redeploy" } else { "inventory" };
        let rec = store
            .create(
                plugin,
                RunTrigger::Cron {
                    schedule: "0 * * * *".into(),
                    scheduled_at: Utc::now(),
                },
            )
            .unwrap();
        store.start(rec.id).unwrap();
        store.finish(rec.id, end_of(n)).unwrap();
        last = Some(rec.id);
    }
    println!(
        "filled: {DEVICES} devices (20 checks each), {runs_total} runs in {:.1} s",
        fill.elapsed().as_secs_f64()
    );

    let state = capstan::api::AppState::new(scheduler.clone());
    let router = capstan::web::router(
        state,
        capstan::web::WebOptions {
            session_ttl: Duration::from_secs(3600),
        },
    );
    let (token, _) = engine
        .tokens
        .create_with("bench", Role::Viewer, Vec::new())
        .unwrap();
    let session = rt.block_on(async {
        let (_, h, _) = body_of(&router, Request::get("/login").body(Body::empty()).unwrap()).await;
        let nonce = cookie_of(&h, "capstan_login");
        let form = format!("token={}&csrf={nonce}", token.expose_str().unwrap());
        let (status, h, _) = body_of(
            &router,
            Request::post("/login")
                .header(header::COOKIE, format!("capstan_login={nonce}"))
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(form))
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        cookie_of(&h, "capstan_session")
    });

    let run_page = format!("/runs/{}", last.expect("at least one run"));
    let pages = [
        ("overview /", "/".to_string()),
        ("runs /runs", "/runs".to_string()),
        ("runs ?status=failed", "/runs?status=failed".to_string()),
        (
            "plugin /plugins/inventory",
            "/plugins/inventory".to_string(),
        ),
        ("run /runs/{id}", run_page),
        ("hooks /hooks", "/hooks".to_string()),
    ];
    println!(
        "{:<28} {:>9} {:>9} {:>10}   ({repeats} renders each, server time in-process)",
        "page", "p50 ms", "p99 ms", "bytes"
    );
    for (what, path) in pages {
        let mut times = Vec::with_capacity(repeats);
        let mut bytes = 0;
        rt.block_on(async {
            for _ in 0..repeats {
                let req = Request::get(path.as_str())
                    .header(header::COOKIE, format!("capstan_session={session}"))
                    .body(Body::empty())
                    .unwrap();
                let t = Instant::now();
                let (status, _, body) = body_of(&router, req).await;
                times.push(t.elapsed());
                assert_eq!(status, StatusCode::OK, "{path}");
                bytes = body.len();
            }
        });
        times.sort();
        println!(
            "{:<28} {:>9.2} {:>9.2} {:>10}",
            what,
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            bytes
        );
    }
}
