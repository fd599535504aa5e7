//! `capstan serve`: the engine process.
//!
//! On first start in an empty data directory this is the embedded default: it creates
//! the vault (a generated key file, mode 0600, unless a passphrase is given), registers
//! the local Docker daemon as device `local`, creates an admin API token and prints it
//! once, and installs the default plugins (`--default-plugins`, which `scripts/run`
//! points at the example plugins it builds). Every later start opens what is there and
//! loads the installed plugins from the compile cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use super::GlobalArgs;
use crate::config::ProxySettings;
use crate::device::{DeviceChanges, DeviceError, DeviceKind};
use crate::engine::Engine;
use crate::plugin::{PluginRuntime, RuntimeConfig};
use crate::policy::CompiledPolicy;
use crate::proxy::{Proxy, ProxyListener};
use crate::secret::Secret;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// API listen address [default: 127.0.0.1:7878].
    #[arg(long, env = "CAPSTAN_API_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// On first start, install every plugin found here: each subdirectory holding a
    /// plugin.toml and its .wasm (scripts/run stages the example plugins this way).
    #[arg(long, env = "CAPSTAN_DEFAULT_PLUGINS", value_name = "DIR")]
    default_plugins: Option<PathBuf>,
}

pub fn run(g: &GlobalArgs, args: ServeArgs) -> anyhow::Result<()> {
    let settings = g.settings(args.listen)?;
    let (engine, created) = Engine::open_or_init(settings, &g.passphrase())?;
    if let Some(k) = &created.key_file {
        println!(
            "created the vault with key file {} (mode 0600); back it up: without it the vault cannot be opened",
            k.display()
        );
    } else if created.vault {
        println!("created the vault (passphrase-protected)");
    }
    ensure_local_device(&engine)?;
    if engine.tokens.is_empty() {
        let (token, info) = engine.tokens.create("admin")?;
        println!(
            "admin API token (id {}), shown once, store it now:\n  {}",
            info.id,
            token.expose_str().expect("tokens are ASCII")
        );
    }
    engine.store.flush()?;

    // Policies are read and checked before anything starts listening.
    let mut policies = Vec::new();
    for p in &engine.settings.proxies {
        let policy = super::policy::load_policy_file(&p.policy_file)?.compile();
        let token = match &p.token_file {
            Some(f) => Some(
                Secret::from_file(f)
                    .with_context(|| format!("cannot read proxy token file {}", f.display()))?,
            ),
            None => None,
        };
        policies.push((p.clone(), policy, token));
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let engine = Arc::new(engine);
    let plugins = {
        let _guard = rt.enter();
        start_plugins(&engine, created.vault, args.default_plugins.as_deref())?
    };
    rt.block_on(serve(engine.clone(), policies))?;
    drop(plugins);
    engine.store.flush()?;
    tracing::info!("stopped");
    Ok(())
}

/// The plugin runtime: on first start the default plugins are installed, then every
/// installed plugin is loaded (compiled code from the cache). Triggers are recorded with
/// each plugin; firing them is the scheduler's job.
fn start_plugins(
    engine: &Arc<Engine>,
    first_start: bool,
    defaults: Option<&Path>,
) -> anyhow::Result<Arc<PluginRuntime>> {
    let runtime = PluginRuntime::new(engine.clone(), RuntimeConfig::default())?;
    if first_start && let Some(dir) = defaults {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| {
                format!(
                    "cannot read the default plugins directory {}",
                    dir.display()
                )
            })?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join(crate::plugin::manifest::MANIFEST_FILE).is_file())
            .collect();
        entries.sort();
        for p in entries {
            let installed = runtime
                .install(&p, None)
                .with_context(|| format!("installing the default plugin {}", p.display()))?;
            println!("installed plugin {} {}", installed.name, installed.version);
        }
    }
    let summary = runtime.load_installed()?;
    println!(
        "plugins: {} loaded ({} from the compile cache, {} compiled), {} instance allocator",
        summary.loaded,
        summary.from_cache,
        summary.compiled,
        runtime.allocator()
    );
    for (name, why) in &summary.failed {
        eprintln!("plugin {name} cannot be loaded: {why}");
    }
    Ok(Arc::new(runtime))
}

fn ensure_local_device(engine: &Engine) -> anyhow::Result<()> {
    let devices = engine.devices()?;
    match devices.get("local") {
        Ok(_) => Ok(()),
        Err(DeviceError::NotFound(_)) => {
            let d = devices.add(
                DeviceKind::Local,
                DeviceChanges {
                    name: Some("local".into()),
                    ..Default::default()
                },
            )?;
            println!(
                "registered the local Docker daemon as device `local` ({})",
                d.address()
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

async fn serve(
    engine: Arc<Engine>,
    proxies: Vec<(ProxySettings, CompiledPolicy, Option<Secret>)>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut proxy_tasks = Vec::new();
    for (p, policy, token) in proxies {
        let device = engine
            .devices()?
            .get(&p.device)
            .with_context(|| format!("[[proxy]] on {}", p.listen))?;
        let upstream = engine.docker_client(&device)?;
        let proxy = Arc::new(
            Proxy::new(&device.name, policy, upstream, &p.listen, token.as_ref())
                .with_context(|| format!("[[proxy]] for device {} on {}", device.name, p.listen))?,
        );
        let listener = ProxyListener::bind(&p.listen).await?;
        let mut rx = stop_rx.clone();
        println!(
            "proxy for device {} listening on {}",
            device.name,
            listener.local_listen()
        );
        proxy_tasks.push(tokio::spawn(proxy.serve(listener, async move {
            let _ = rx.wait_for(|stop| *stop).await;
        })));
    }

    let addr = engine.settings.listen;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr} (is another capstan running? choose another with --listen)"
        )
    })?;
    // Handlers first: a signal right after the banner must still shut down gracefully.
    let shutdown = shutdown_signal();
    println!("capstan API listening on http://{}", listener.local_addr()?);
    let app = crate::api::router(engine);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await
        .context("the API server failed")?;
    for t in proxy_tasks {
        match t.await {
            Ok(Err(e)) => tracing::error!(error = %e, "proxy failed"),
            Err(e) => tracing::error!(error = %e, "proxy task failed"),
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}

/// Installs the SIGINT and SIGTERM handlers now (not when first polled, so a signal that
/// arrives before the server starts polling is not fatal) and resolves on either.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    }
}
