//! Plugin runtime overhead, measured against a bare wasmtime floor in the same run.
//!
//! `cargo bench --bench plugin` (release). Needs the test plugins built:
//! `cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release`.
//!
//! 1. Trigger to return: `PluginRuntime::run` of a trivial plugin (fresh store and
//!    instance, WASI context, limits, deadline, report) against a bare wasmtime
//!    instantiate-and-call of the same component on the same engine (a store with an
//!    empty WASI context, `instantiate_async`, `call_run`). Median, p99, runs/s; target:
//!    median ratio ≤ 1.3.
//! 2. One host call round trip: a run making 10,000 `host.now` calls minus a run making
//!    none, divided by 10,000.
//! 3. Start-up with 50 installed plugins: a new runtime loading them all from the compile
//!    cache (each a distinct component), against compiling them all.

mod common;
use common::{engine_in, wasm_path};

use std::time::{Duration, Instant};

use capstan::plugin::bindings::{Event, ManualEvent, PluginPre};
use capstan::plugin::{PluginRuntime, RuntimeConfig, TriggerEvent};
use wasmtime::Store;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

struct Bare {
    wasi: WasiCtx,
    table: ResourceTable,
    http: wasmtime_wasi_http::WasiHttpCtx,
    no_requests: NoRequests,
}

impl wasmtime_wasi_http::WasiHttpView for Bare {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.no_requests,
        }
    }
}

/// The floor sends no request (the trivial plugin makes none).
struct NoRequests;

type Sent = Result<
    (
        http::Response<wasmtime_wasi_http::WasiBody>,
        Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ),
    wasmtime_wasi_http::Error,
>;

impl wasmtime_wasi_http::WasiHttpHooks for NoRequests {
    fn send_request(
        &mut self,
        _request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<dyn std::future::Future<Output = Sent> + Send> {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

impl WasiView for Bare {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

struct Stats {
    median: Duration,
    p99: Duration,
    per_sec: f64,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let total: Duration = samples.iter().sum();
    Stats {
        median: samples[samples.len() / 2],
        p99: samples[(samples.len() * 99 / 100).min(samples.len() - 1)],
        per_sec: samples.len() as f64 / total.as_secs_f64(),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A copy of a component with a custom section appended, so each copy is a distinct
/// component (its own SHA-256 and cache entry).
fn distinct(wasm: &[u8], n: usize) -> Vec<u8> {
    let name = b"capstan-bench";
    let payload = format!("copy {n}");
    let mut section = vec![name.len() as u8];
    section.extend_from_slice(name);
    section.extend_from_slice(payload.as_bytes());
    let mut out = wasm.to_vec();
    out.push(0);
    out.push(section.len() as u8);
    out.extend_from_slice(&section);
    out
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
    let runtime = PluginRuntime::new(engine.clone(), RuntimeConfig::default()).unwrap();
    println!("instance allocator: {}", runtime.allocator());

    let trivial = wasm_path("trivial");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(&trivial, src.join("plugin.wasm")).unwrap();
    std::fs::write(
        src.join("plugin.toml"),
        "name = \"trivial\"\nversion = \"1\"\n",
    )
    .unwrap();
    runtime.install(&src.join("plugin.wasm"), None).unwrap();

    // The floor: the same component on the same engine, no Capstan in between.
    let wasm_engine = runtime.wasm_engine().clone();
    let component = Component::from_file(&wasm_engine, &trivial).unwrap();
    let mut linker = Linker::<Bare>::new(&wasm_engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    // The SDK links wasi:http (for plugins' outbound requests), so the floor links it too;
    // the trivial plugin makes no request.
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).unwrap();
    // Capstan's own imports (the host and Docker functions) as traps: the trivial plugin
    // calls none. (Not `define_unknown_imports_as_traps`, which would also stub WASI
    // interfaces the component names by a newer patch version than the linker's, with
    // resource types of their own that do not match.)
    let imports = component.component_type();
    for (name, item) in imports.imports(&wasm_engine) {
        let (true, ComponentItem::ComponentInstance(instance)) =
            (name.starts_with("capstan:"), item.ty)
        else {
            continue;
        };
        let mut defined = linker.instance(name).unwrap();
        for (func, item) in instance.exports(&wasm_engine) {
            if let ComponentItem::ComponentFunc(_) = item.ty {
                defined
                    .func_new(func, |_, _, _, _| {
                        Err(wasmtime::Error::msg("not linked in the floor"))
                    })
                    .unwrap();
            }
        }
    }
    let bare_pre = PluginPre::new(linker.instantiate_pre(&component).unwrap()).unwrap();
    let event = Event::Manual(ManualEvent {
        input: String::new(),
    });

    let bare_once = || async {
        let t = Instant::now();
        let mut store = Store::new(
            &wasm_engine,
            Bare {
                wasi: WasiCtx::builder().build(),
                table: ResourceTable::new(),
                http: wasmtime_wasi_http::WasiHttpCtx::new(),
                no_requests: NoRequests,
            },
        );
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = bare_pre.instantiate_async(&mut store).await.unwrap();
        let out = instance.call_run(&mut store, &event).await.unwrap();
        assert!(out.is_ok());
        drop(store);
        t.elapsed()
    };
    let capstan_once = || async {
        let t = Instant::now();
        let r = runtime
            .run("trivial", TriggerEvent::manual(""))
            .await
            .unwrap();
        assert!(r.succeeded());
        t.elapsed()
    };

    const WARMUP: usize = 300;
    const ROUNDS: usize = 10;
    const PER_ROUND: usize = 500;
    let (bare, capstan) = rt.block_on(async {
        for _ in 0..WARMUP {
            bare_once().await;
            capstan_once().await;
        }
        let (mut bare, mut capstan) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            for _ in 0..PER_ROUND {
                bare.push(bare_once().await);
            }
            for _ in 0..PER_ROUND {
                capstan.push(capstan_once().await);
            }
        }
        (stats(bare), stats(capstan))
    });
    println!(
        "\ntrigger to return, trivial plugin, {} runs each, fresh instance per run:",
        ROUNDS * PER_ROUND
    );
    println!(
        "  bare wasmtime       median {:7.1} µs  p99 {:7.1} µs  {:8.0} runs/s",
        us(bare.median),
        us(bare.p99),
        bare.per_sec
    );
    println!(
        "  PluginRuntime::run  median {:7.1} µs  p99 {:7.1} µs  {:8.0} runs/s",
        us(capstan.median),
        us(capstan.p99),
        capstan.per_sec
    );
    let ratio = capstan.median.as_secs_f64() / bare.median.as_secs_f64();
    println!(
        "  ratio (median)      {ratio:.2}x  (target <= 1.30x: {})",
        if ratio <= 1.3 { "met" } else { "NOT met" }
    );

    // Host call round trip.
    const CALLS: u64 = 10_000;
    let (zero, many) = rt.block_on(async {
        let (mut zero, mut many) = (Vec::new(), Vec::new());
        for _ in 0..30 {
            let t = Instant::now();
            runtime
                .run("trivial", TriggerEvent::manual("calls:0"))
                .await
                .unwrap();
            zero.push(t.elapsed());
            let t = Instant::now();
            let r = runtime
                .run("trivial", TriggerEvent::manual(format!("calls:{CALLS}")))
                .await
                .unwrap();
            assert_eq!(r.host_calls_total, CALLS);
            many.push(t.elapsed());
        }
        (stats(zero), stats(many))
    });
    let per_call = (many.median.saturating_sub(zero.median)).as_secs_f64() / CALLS as f64;
    println!("\nhost call round trip (host.now, {CALLS} calls per run, median of 30 runs):");
    println!("  {:.3} µs per call", per_call * 1e6);

    // Start-up with 50 installed plugins.
    let fleet_dir = tmp.path().join("fleet");
    let fleet_engine = engine_in(&fleet_dir);
    let wasm = std::fs::read(&trivial).unwrap();
    {
        let installer = PluginRuntime::new(fleet_engine.clone(), RuntimeConfig::default()).unwrap();
        for n in 0..50 {
            let dir = tmp.path().join(format!("p{n}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("plugin.wasm"), distinct(&wasm, n)).unwrap();
            std::fs::write(
                dir.join("plugin.toml"),
                format!("name = \"p{n}\"\nversion = \"1\"\n"),
            )
            .unwrap();
            installer.install(&dir.join("plugin.wasm"), None).unwrap();
        }
    }
    let mut warm = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let r = PluginRuntime::new(fleet_engine.clone(), RuntimeConfig::default()).unwrap();
        let s = r.load_installed().unwrap();
        assert_eq!((s.loaded, s.from_cache), (50, 50));
        warm.push(t.elapsed());
    }
    let cache_dir = fleet_dir.join("plugin-cache");
    std::fs::remove_dir_all(&cache_dir).unwrap();
    let t = Instant::now();
    let r = PluginRuntime::new(fleet_engine.clone(), RuntimeConfig::default()).unwrap();
    let s = r.load_installed().unwrap();
    assert_eq!(s.compiled, 50);
    let cold = t.elapsed();
    let warm = stats(warm);
    println!("\nstart-up with 50 installed plugins (runtime + load_installed):");
    println!(
        "  from the compile cache  median {:8.1} ms",
        warm.median.as_secs_f64() * 1e3
    );
    println!(
        "  compiling all (no cache)       {:8.1} ms",
        cold.as_secs_f64() * 1e3
    );
    println!(
        "  cache speed-up                 {:8.1}x",
        cold.as_secs_f64() / warm.median.as_secs_f64()
    );
}
