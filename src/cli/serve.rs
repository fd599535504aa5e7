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
use std::time::Duration;

use anyhow::Context;

use super::GlobalArgs;
use crate::config::ProxySettings;
use crate::device::{DeviceError, DeviceKind, DeviceSpec};
use crate::engine::Engine;
use crate::plugin::PluginSource;
use crate::policy::CompiledPolicy;
use crate::proxy::{AccessLog, Proxy, ProxyListener};
use crate::scheduler::Scheduler;
use crate::secret::Secret;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Every listener (the API, webhooks, [[proxy]] entries) closes connections that do not send a
request head within 10s, pause a body for 30s or idle for 60s, holds at most a number of
connections derived from the open-file limit (shedding those without a request in
progress), and answers webhook deliveries 503 when 64MiB of unauthenticated bodies are
being read. Change them in the config file's [server] table or with
CAPSTAN_SERVER_HEADER_TIMEOUT, _BODY_TIMEOUT, _IDLE_TIMEOUT, _MAX_CONNECTIONS and
_PREAUTH_BODY_BUDGET. The soft open-file limit is raised to the hard limit at start.")]
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
    crate::server::raise_open_file_limit();
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

    let cli_token = create_cli_token(&engine)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let engine = Arc::new(engine);
    let scheduler = {
        let _guard = rt.enter();
        start_plugins(&engine, created.vault, args.default_plugins.as_deref())?
    };
    rt.block_on(serve(scheduler.clone(), policies, cli_token))?;
    drop(scheduler);
    engine.store.flush()?;
    let _ = std::fs::remove_file(engine.settings.data_dir.join(CLI_TOKEN_FILE));
    tracing::info!("stopped");
    Ok(())
}

/// The file the CLI on this host uses to reach the running engine (`capstan runs`,
/// `capstan plugin install` while the engine holds the data directory): the API's
/// address on the first line (once it listens), a token on the second. Replaced at every
/// start; mode 0600 in the data directory, beside the vault key file.
pub const CLI_TOKEN_FILE: &str = "cli.token";
/// The name of the token in that file.
pub const CLI_TOKEN_NAME: &str = "local-cli";

fn create_cli_token(engine: &Engine) -> anyhow::Result<Secret> {
    engine.tokens.revoke(CLI_TOKEN_NAME)?;
    Ok(engine.tokens.create(CLI_TOKEN_NAME)?.0)
}

fn write_cli_token(
    engine: &Engine,
    addr: std::net::SocketAddr,
    token: &Secret,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = engine.settings.data_dir.join(CLI_TOKEN_FILE);
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut text = zeroize::Zeroizing::new(format!("{addr}\n").into_bytes());
    text.extend_from_slice(token.expose());
    text.push(b'\n');
    f.write_all(&text)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The plugin runtime and the scheduler: on first start the default plugins are
/// installed, then every installed plugin is loaded (compiled code from the cache) and
/// its triggers activated.
fn start_plugins(
    engine: &Arc<Engine>,
    first_start: bool,
    defaults: Option<&Path>,
) -> anyhow::Result<Arc<Scheduler>> {
    let scheduler = Scheduler::with_defaults(engine.clone())?;
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
            let src = PluginSource::read(&p, None)?;
            let installed = scheduler
                .plugins()
                .install(&src)
                .with_context(|| format!("installing the default plugin {}", p.display()))?;
            println!(
                "installed plugin {} {}",
                installed.plugin.name, installed.plugin.version
            );
            super::plugin::print_generated_secrets(&installed);
        }
    }
    let (summary, problems) = scheduler.plugins().load_installed()?;
    println!(
        "plugins: {} loaded ({} from the compile cache, {} compiled), {} instance allocator; {} cron trigger(s), {} hook(s)",
        summary.loaded,
        summary.from_cache,
        summary.compiled,
        scheduler.runtime().allocator(),
        scheduler.cron().len(),
        scheduler.hooks().names().len(),
    );
    for (name, why) in &summary.failed {
        eprintln!("plugin {name} cannot be loaded: {why}");
    }
    for p in &problems {
        eprintln!("{p}");
    }
    Ok(scheduler)
}

fn ensure_local_device(engine: &Engine) -> anyhow::Result<()> {
    let devices = engine.devices()?;
    match devices.get("local") {
        Ok(_) => Ok(()),
        Err(DeviceError::NotFound(_)) => {
            let d = devices.add(DeviceSpec {
                kind: Some(DeviceKind::Local),
                name: Some("local".into()),
                ..Default::default()
            })?;
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
    scheduler: Arc<Scheduler>,
    proxies: Vec<(ProxySettings, CompiledPolicy, Option<Secret>)>,
    cli_token: Secret,
) -> anyhow::Result<()> {
    let engine = scheduler.engine().clone();
    // One connection cap for every listener: they share the process's file descriptors.
    let limits = crate::server::Server::new(&engine.settings.server)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let mut proxy_tasks = Vec::new();
    for (p, policy, token) in proxies {
        let device = engine
            .devices()?
            .get(&p.device)
            .with_context(|| format!("[[proxy]] on {}", p.listen))?;
        let upstream = engine.docker_client(&device)?;
        let context = || format!("[[proxy]] for device {} on {}", device.name, p.listen);
        let mut proxy = Proxy::new(
            &device.name,
            policy,
            upstream,
            &p.listen,
            token.as_ref(),
            p.tls.as_ref(),
        )
        .with_context(context)?;
        if let Some(file) = &p.access_log {
            proxy = proxy.with_access_log(AccessLog::open(file).with_context(context)?);
        }
        let proxy = Arc::new(proxy);
        let listener = ProxyListener::bind(&p.listen).await?;
        println!(
            "proxy for device {} listening on {}{}",
            device.name,
            listener.local_listen(),
            crate::proxy::tls_note(p.tls.as_ref())
        );
        let limits = limits.clone();
        let stopped = stopped();
        proxy_tasks.push(tokio::spawn(async move {
            proxy.serve_on(&limits, listener, stopped).await
        }));
    }

    let addr = engine.settings.listen;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr} (is another capstan running? choose another with --listen)"
        )
    })?;
    // Handlers first: a signal right after the banner must still shut down gracefully.
    let shutdown = shutdown_signal();
    write_cli_token(&engine, listener.local_addr()?, &cli_token)?;
    drop(cli_token);
    println!("capstan API listening on http://{}", listener.local_addr()?);
    println!(
        "webhooks: POST http://{}/hooks/NAME",
        listener.local_addr()?
    );

    let cron = tokio::spawn(crate::trigger::cron::fire_runs(
        scheduler.clone(),
        stopped(),
    ));
    let housekeeping = tokio::spawn(housekeeping(scheduler.clone(), stopped()));
    // Webhook bodies are read before they are authenticated: they share one budget.
    let budget = crate::server::PreauthBudget::new(engine.settings.server.preauth_body_budget);
    let state = crate::api::AppState::new(scheduler.clone());
    let app = crate::api::router(state.clone()).merge(budget.wrap(crate::api::hook_router(state)));
    let make = move |_peer: &str| hyper_util::service::TowerToHyperService::new(app.clone());
    let server = limits.serve(
        crate::server::Listener::Tcp(listener),
        None,
        make,
        stopped(),
    );
    let mut server = std::pin::pin!(server);

    // Serve until a signal; then stop triggering, let runs finish within the grace
    // period (webhook callers waiting on them get their answer), and stop serving.
    let report = tokio::select! {
        () = &mut server => None,
        () = shutdown => {
            let _ = stop_tx.send(true);
            let report = scheduler.shutdown().await;
            // Open requests (a follower's stream) get a moment, then the server goes.
            if tokio::time::timeout(Duration::from_secs(2), &mut server).await.is_err() {
                tracing::debug!("open API connections closed at shutdown");
            }
            Some(report)
        }
    };
    let _ = stop_tx.send(true);
    let _ = cron.await;
    let _ = housekeeping.await;
    for t in proxy_tasks {
        match t.await {
            Ok(Err(e)) => tracing::error!(error = %e, "proxy failed"),
            Err(e) => tracing::error!(error = %e, "proxy task failed"),
            Ok(Ok(())) => {}
        }
    }
    if let Some(r) = report {
        println!(
            "stopped: {} run(s) finished during shutdown, {} interrupted",
            r.finished, r.interrupted
        );
    }
    Ok(())
}

/// Hourly: run-history retention and expired webhook delivery ids.
async fn housekeeping(scheduler: Arc<Scheduler>, stopped: impl std::future::Future<Output = ()>) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = every.tick() => {}
        }
        match scheduler.runs().apply_retention() {
            Ok(r) if r.removed_over_count + r.removed_over_age > 0 => {
                tracing::info!(
                    over_count = r.removed_over_count,
                    over_age = r.removed_over_age,
                    "old runs removed"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "run retention failed"),
        }
        if let Err(e) = scheduler.hooks().purge_expired() {
            tracing::warn!(error = %e, "purging webhook delivery ids failed");
        }
    }
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
