//! The app `capstan serve` runs, built in the library: the engine opened (the embedded
//! default created on first start), the plugin runtime and scheduler with their triggers,
//! the API with its webhooks, the `[[proxy]]` listeners, the CLI token file and the
//! graceful shutdown.
//!
//! `serve` only prints what this reports ([`Notice`]); the integration tests and the
//! in-process CLI build the same app, so they exercise what users run.

pub mod cli_token;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::{ProxySettings, Settings};
use crate::device::{Device, DeviceError, DeviceKind, DeviceSpec};
use crate::engine::{Engine, PassphraseInput};
use crate::plugin::admin::Installed;
use crate::plugin::{LoadSummary, PluginSource};
use crate::policy::CompiledPolicy;
use crate::proxy::{AccessLog, Proxy, ProxyListener, TlsFiles};
use crate::scheduler::{Scheduler, StopReport};
use crate::secret::Secret;

/// How long shutdown waits for queued notifications.
const NOTIFY_DRAIN: Duration = Duration::from_secs(5);

/// What the app tells as it starts and stops, for `serve` to print.
pub enum Notice<'a> {
    /// The vault was created: with a key file (generated now, or given), or
    /// passphrase-protected (`key_file` None).
    VaultCreated {
        key_file: Option<&'a Path>,
        generated: bool,
    },
    /// The local Docker daemon was registered as device `local`.
    LocalDeviceAdded(&'a Device),
    /// The first admin API token, to be shown once.
    AdminToken { id: String, token: &'a Secret },
    /// A default plugin was installed on first start.
    PluginInstalled(&'a Installed),
    /// The installed plugins were loaded and their triggers activated.
    PluginsLoaded {
        summary: &'a LoadSummary,
        allocator: String,
        cron_triggers: usize,
        hooks: usize,
        /// Docker event triggers, over every plugin.
        docker_triggers: usize,
        /// Plugins with run-outcome triggers.
        run_watchers: usize,
    },
    /// Something a loaded plugin's setup got wrong (the engine goes on without it).
    PluginProblem(String),
    /// A `[[proxy]]` listens.
    ProxyListening {
        device: &'a str,
        listen: String,
        tls: Option<&'a TlsFiles>,
    },
    /// The API listens on a non-loopback address without TLS: tokens, session cookies
    /// and webhook secrets cross the network in clear.
    ApiExposedWithoutTls(SocketAddr),
    /// The API (with the webhooks) listens, over TLS or not; the CLI token file is
    /// written.
    ApiListening { addr: SocketAddr, tls: bool },
    /// A signal stopped the app: what became of the runs under way.
    Stopped(&'a StopReport),
}

/// Where the app sends its [`Notice`]s (`serve` prints them; tests ignore them).
pub type Notify<'n> = dyn FnMut(Notice<'_>) + Send + 'n;

/// How the app is built beyond the settings.
#[derive(Debug, Clone, Default)]
pub struct AppOptions {
    /// On first start, install every plugin found here (`--default-plugins`).
    pub default_plugins: Option<PathBuf>,
}

/// The built app: engine, scheduler, proxies checked, not yet listening.
pub struct App {
    scheduler: Arc<Scheduler>,
    proxies: Vec<(ProxySettings, CompiledPolicy, Option<Secret>)>,
    /// The API's TLS and the pin of its certificate for the CLI token file.
    api_tls: Option<(tokio_rustls::TlsAcceptor, cli_token::Pin)>,
    cli_token: Secret,
}

impl App {
    /// Opens the data directory (creating the embedded default vault, device `local` and
    /// an admin token on first start), reads and checks the proxies' policies, then
    /// starts the plugin runtime and scheduler with the installed plugins. Must be called
    /// within a tokio runtime.
    pub fn build(
        settings: Settings,
        pass: &PassphraseInput,
        options: &AppOptions,
        notify: &mut Notify<'_>,
    ) -> anyhow::Result<App> {
        // The API's certificate is read (and a bad one refused) before anything is done.
        let api_tls = match &settings.api_tls {
            Some(files) => Some((
                files
                    .acceptor()
                    .context("the API's TLS (--tls-cert, --tls-key)")?,
                cli_token::Pin::of_certificate(&files.cert)?,
            )),
            None => None,
        };
        let (engine, created) = Engine::open_or_init(settings, pass)?;
        if created.vault {
            notify(Notice::VaultCreated {
                key_file: created.key_file.as_deref(),
                generated: created.key_generated,
            });
        }
        ensure_local_device(&engine, notify)?;
        if engine.tokens.is_empty() {
            let (token, info) = engine.tokens.create("admin")?;
            notify(Notice::AdminToken {
                id: info.id.to_string(),
                token: &token,
            });
        }
        engine.store.flush()?;

        // Policies are read and checked before anything starts listening.
        let mut proxies = Vec::new();
        for p in &engine.settings.proxies {
            let policy = crate::cli::policy::load_policy_file(&p.policy_file)?.compile();
            let token = match &p.token_file {
                Some(f) => Some(
                    Secret::from_file(f)
                        .with_context(|| format!("cannot read proxy token file {}", f.display()))?,
                ),
                None => None,
            };
            proxies.push((p.clone(), policy, token));
        }

        let cli_token = cli_token::mint(&engine.tokens)?;
        let engine = Arc::new(engine);
        let scheduler = start_plugins(
            &engine,
            created.vault,
            options.default_plugins.as_deref(),
            notify,
        )?;
        Ok(App {
            scheduler,
            proxies,
            api_tls,
            cli_token,
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        self.scheduler.engine()
    }

    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.scheduler
    }

    /// Binds the proxies and the API (on `settings.listen`) and writes the CLI token
    /// file; serving starts with [`Listening::serve`].
    pub async fn listen(self, notify: &mut Notify<'_>) -> anyhow::Result<Listening> {
        let App {
            scheduler,
            proxies,
            api_tls,
            cli_token,
        } = self;
        let engine = scheduler.engine().clone();
        // One connection cap for every listener: they share the process's file descriptors.
        let limits = crate::server::Server::new(&engine.settings.server)?;
        let mut bound = Vec::new();
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
            if let Some(cluster) = scheduler.cluster() {
                proxy = proxy.in_cluster(cluster.clone());
            }
            let listener = ProxyListener::bind(&p.listen).await?;
            notify(Notice::ProxyListening {
                device: &device.name,
                listen: listener.local_listen().to_string(),
                tls: p.tls.as_ref(),
            });
            bound.push((Arc::new(proxy), listener));
        }

        let addr = engine.settings.listen;
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "cannot listen on {addr} (is another capstan running? choose another with --listen)"
            )
        })?;
        let local = listener.local_addr()?;
        if let Some(cluster) = scheduler.cluster() {
            cluster
                .join(local.to_string())
                .await
                .context("joining the cluster")?;
        }
        // Shared state: the cluster's configuration applied before the API answers.
        let state_watch = match scheduler.cluster().and_then(|c| c.state()) {
            Some(state) => Some(
                state
                    .sync(&scheduler)
                    .await
                    .context("bringing this node's configuration in step with the cluster")?,
            ),
            None => None,
        };
        let pin = api_tls.as_ref().map(|(_, pin)| pin);
        cli_token::write(&engine.settings.data_dir, local, pin, &cli_token)?;
        drop(cli_token);
        if api_tls.is_none() && !local.ip().is_loopback() {
            notify(Notice::ApiExposedWithoutTls(local));
        }
        notify(Notice::ApiListening {
            addr: local,
            tls: api_tls.is_some(),
        });
        Ok(Listening {
            scheduler,
            limits,
            proxies: bound,
            api: listener,
            api_tls: api_tls.map(|(acceptor, _)| acceptor),
            addr: local,
            state_watch,
        })
    }
}

/// The app with its listeners bound.
pub struct Listening {
    scheduler: Arc<Scheduler>,
    limits: crate::server::Server,
    proxies: Vec<(Arc<Proxy>, ProxyListener)>,
    api: tokio::net::TcpListener,
    api_tls: Option<tokio_rustls::TlsAcceptor>,
    addr: SocketAddr,
    /// The shared-state watch, in step at listen, for the task that follows it.
    state_watch: Option<async_nats::jetstream::kv::Watch>,
}

impl Listening {
    /// The API's address (the port chosen when `settings.listen` asked for port 0).
    pub fn api_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn engine(&self) -> &Arc<Engine> {
        self.scheduler.engine()
    }

    /// Serves until `shutdown` resolves; then stops triggering, lets runs finish within
    /// the grace period (webhook callers waiting on them get their answer), stops
    /// serving, flushes the store and removes the CLI token file.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()>,
        notify: &mut Notify<'_>,
    ) -> anyhow::Result<()> {
        let Listening {
            scheduler,
            limits,
            proxies,
            api,
            api_tls,
            addr: _,
            state_watch,
        } = self;
        let engine = scheduler.engine().clone();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        let mut proxy_tasks = Vec::new();
        for (proxy, listener) in proxies {
            let limits = limits.clone();
            let stopped = stopped();
            proxy_tasks.push(tokio::spawn(async move {
                proxy.serve_on(&limits, listener, stopped).await
            }));
        }

        let cron = tokio::spawn(crate::trigger::cron::fire_runs(
            scheduler.clone(),
            stopped(),
        ));
        let docker_events = tokio::spawn(crate::trigger::docker::watch::run(
            scheduler.clone(),
            stopped(),
        ));
        let housekeeping = tokio::spawn(housekeeping(scheduler.clone(), stopped()));
        // Cluster mode: this node's entry renewed, and runs taken from the cluster.
        let cluster_tasks = scheduler.cluster().map(|c| {
            [
                tokio::spawn(c.clone().heartbeat(stopped())),
                tokio::spawn(c.clone().work(scheduler.clone(), stopped())),
                tokio::spawn(c.clone().keep_leases(scheduler.clone(), stopped())),
                tokio::spawn(c.clone().serve_docker(scheduler.clone(), stopped())),
                tokio::spawn(c.clone().apply_history(
                    scheduler.engine().clone(),
                    scheduler.runs().clone(),
                    stopped(),
                )),
            ]
        });
        let state_task = match (scheduler.cluster().and_then(|c| c.state()), state_watch) {
            (Some(state), Some(watch)) => Some(tokio::spawn(state.clone().run(
                scheduler.clone(),
                watch,
                stopped(),
            ))),
            _ => None,
        };
        let listen = crate::api::ListenInfo {
            tls: api_tls.is_some(),
        };
        let app = router(&scheduler, listen);
        let make = move |_peer: &str| hyper_util::service::TowerToHyperService::new(app.clone());
        let server = limits.serve(crate::server::Listener::Tcp(api), api_tls, make, stopped());
        let mut server = std::pin::pin!(server);

        let report = tokio::select! {
            () = &mut server => None,
            () = shutdown => {
                let _ = stop_tx.send(true);
                let report = scheduler.shutdown().await;
                // Notifications of the runs just ended (and interrupted) go out first.
                let undelivered = engine.notifier.drain(NOTIFY_DRAIN).await;
                if undelivered > 0 {
                    tracing::warn!(undelivered, "notifications still queued at shutdown are dropped");
                }
                // Open requests (a follower's stream) get a moment, then the server goes.
                if tokio::time::timeout(Duration::from_secs(2), &mut server).await.is_err() {
                    tracing::debug!("open API connections closed at shutdown");
                }
                Some(report)
            }
        };
        let _ = stop_tx.send(true);
        let _ = cron.await;
        let _ = docker_events.await;
        let _ = housekeeping.await;
        for t in cluster_tasks.into_iter().flatten() {
            let _ = t.await;
        }
        if let Some(t) = state_task {
            let _ = t.await;
        }
        for t in proxy_tasks {
            match t.await {
                Ok(Err(e)) => tracing::error!(error = %e, "proxy failed"),
                Err(e) => tracing::error!(error = %e, "proxy task failed"),
                Ok(Ok(())) => {}
            }
        }
        if let Some(r) = &report {
            notify(Notice::Stopped(r));
        }
        drop(scheduler);
        engine.store.flush()?;
        cli_token::remove(&engine.settings.data_dir);
        tracing::info!("stopped");
        Ok(())
    }
}

/// The API with the webhook deliveries and the dashboard beside it: what the listener
/// serves, set up as `listen` says (over TLS or not).
pub fn router(scheduler: &Arc<Scheduler>, listen: crate::api::ListenInfo) -> axum::Router {
    // Webhook bodies are read before they are authenticated: they share one budget.
    let budget =
        crate::server::PreauthBudget::new(scheduler.engine().settings.server.preauth_body_budget);
    let state = crate::api::AppState::new(scheduler.clone()).with_listen(listen);
    let web = crate::web::WebOptions::from_settings(&scheduler.engine().settings);
    crate::api::router(state.clone())
        .merge(budget.wrap(crate::api::hook_router(state.clone())))
        .merge(crate::web::router(state, web))
}

/// The engine the CLI opened in this process (no engine runs on the data directory): the
/// scheduler `serve` builds, and with `load_plugins` the installed plugins loaded and
/// their triggers registered as [`App::build`] does, but none of what fires on its own
/// (cron loop, housekeeping) is started and nothing listens. Problems loading a plugin
/// are logged; the plugin stays unloaded. Must be called within a tokio runtime.
pub fn open_in_process(engine: Engine, load_plugins: bool) -> anyhow::Result<Arc<Scheduler>> {
    let scheduler = Scheduler::with_defaults(Arc::new(engine))?;
    crate::notify::attach(&scheduler);
    if load_plugins {
        let (summary, problems) = scheduler.plugins().load_installed()?;
        for (name, why) in &summary.failed {
            tracing::warn!(plugin = %name, "plugin cannot be loaded: {why}");
        }
        for p in problems {
            tracing::warn!("{p}");
        }
    }
    Ok(scheduler)
}

/// The plugin runtime and the scheduler, listening for run ends for the run-outcome
/// triggers: on first start the default plugins are installed, then every installed
/// plugin is loaded (compiled code from the cache) and its triggers activated.
fn start_plugins(
    engine: &Arc<Engine>,
    first_start: bool,
    defaults: Option<&Path>,
    notify: &mut Notify<'_>,
) -> anyhow::Result<Arc<Scheduler>> {
    let scheduler = Scheduler::with_defaults(engine.clone())?;
    // `[notify] on`: run-end notifications, and deliveries counted in /metrics.
    crate::notify::attach(&scheduler);
    crate::trigger::run::listen(&scheduler);
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
            notify(Notice::PluginInstalled(&installed));
        }
    }
    let (summary, problems) = scheduler.plugins().load_installed()?;
    notify(Notice::PluginsLoaded {
        summary: &summary,
        allocator: scheduler.runtime().allocator().to_string(),
        cron_triggers: scheduler.cron().len(),
        hooks: scheduler.hooks().names().len(),
        docker_triggers: scheduler.triggers().docker.len(),
        run_watchers: scheduler.triggers().run.len(),
    });
    for p in problems {
        notify(Notice::PluginProblem(p));
    }
    Ok(scheduler)
}

fn ensure_local_device(engine: &Engine, notify: &mut Notify<'_>) -> anyhow::Result<()> {
    let devices = engine.devices()?;
    match devices.get("local") {
        Ok(_) => Ok(()),
        Err(DeviceError::NotFound(_)) => {
            let d = devices.add(DeviceSpec {
                kind: Some(DeviceKind::Local),
                name: Some("local".into()),
                ..Default::default()
            })?;
            notify(Notice::LocalDeviceAdded(&d));
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
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
