//! Outbound HTTP overhead: a plugin's request through the host (`wasi:http` → our
//! checks → loopback server) against the same request made directly with hyper, in the
//! same run.
//!
//! `cargo bench --bench outbound` (release). Needs the test plugins built:
//! `cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release`.
//!
//! Both sides open a fresh connection per request (the host does not pool plugin
//! connections) to a hyper server on 127.0.0.1 answering `ok`. The host's cost per
//! request is the median run of the `fetcher` plugin making 20 requests, minus the
//! median run making none, divided by 20: the allow-list, the address check, the
//! record, the guest's side of wasi:http and the copies in and out of the guest.
//! Bounded: a fixed number of runs and requests.

mod common;
use common::{engine_in, wasm_path};

use std::time::{Duration, Instant};

use bytes::Bytes;
use capstan::plugin::{PluginRuntime, RuntimeConfig, TriggerEvent};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;

/// Requests per plugin run.
const PER_RUN: usize = 20;
/// Runs measured (each kind), after as many to warm up.
const RUNS: usize = 60;
/// Direct requests measured.
const DIRECT: usize = PER_RUN * RUNS;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A hyper server on 127.0.0.1 answering `ok` to everything; its port.
async fn server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

/// One GET on a fresh connection, body read: what the host does per request.
async fn direct(port: u16) -> Duration {
    let t = Instant::now();
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/hello")
        .header("host", format!("127.0.0.1:{port}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    t.elapsed()
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let engine = engine_in(&tmp.path().join("data"));
    let runtime = PluginRuntime::new(engine, RuntimeConfig::default()).unwrap();
    let port = rt.block_on(server());

    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(wasm_path("fetcher"), src.join("plugin.wasm")).unwrap();
    std::fs::write(
        src.join("plugin.toml"),
        format!(
            "name = \"fetcher\"\nversion = \"1\"\n[policy]\noutbound = [\"http://127.0.0.1:{port}\"]\n[limits]\nmax_http_requests = {PER_RUN}\n"
        ),
    )
    .unwrap();
    runtime.install(&src.join("plugin.wasm"), None).unwrap();
    let requests: Vec<serde_json::Value> = (0..PER_RUN)
        .map(|_| serde_json::json!({"url": format!("http://127.0.0.1:{port}/hello")}))
        .collect();
    let with = serde_json::Value::from(requests).to_string();

    let run = |input: String| {
        let runtime = &runtime;
        async move {
            let t = Instant::now();
            let r = runtime
                .run("fetcher", TriggerEvent::manual(input))
                .await
                .unwrap();
            assert!(r.succeeded(), "{}", r.render());
            t.elapsed()
        }
    };
    let (direct_med, empty_med, full_med) = rt.block_on(async {
        for _ in 0..RUNS {
            run("[]".into()).await;
            run(with.clone()).await;
            direct(port).await;
        }
        let (mut empty, mut full, mut plain) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            empty.push(run("[]".into()).await);
            full.push(run(with.clone()).await);
            for _ in 0..PER_RUN {
                plain.push(direct(port).await);
            }
        }
        (median(plain), median(empty), median(full))
    });
    assert_eq!(DIRECT, PER_RUN * RUNS);
    let through = full_med.saturating_sub(empty_med) / PER_RUN as u32;
    println!(
        "\noutbound HTTP GET on loopback, fresh connection per request ({DIRECT} direct, {RUNS} runs of {PER_RUN} through the host):"
    );
    println!(
        "  hyper directly            median {:7.1} µs per request",
        us(direct_med)
    );
    println!(
        "  plugin through the host   median {:7.1} µs per request  (run of {PER_RUN}: {:.1} µs, empty run: {:.1} µs)",
        us(through),
        us(full_med),
        us(empty_med)
    );
    println!(
        "  ratio (median)            {:.2}x",
        through.as_secs_f64() / direct_med.as_secs_f64()
    );
}
