//! `capstan serve`: the engine process.
//!
//! On first start in an empty data directory this is the embedded default: it creates
//! the vault (a generated key file, mode 0600, unless a passphrase is given), registers
//! the local Docker daemon as device `local`, creates an admin API token and prints it
//! once, and installs the default plugins (`--default-plugins`, which `scripts/run`
//! points at the example plugins it builds). Every later start opens what is there and
//! loads the installed plugins from the compile cache. The app itself is built in the
//! library ([`crate::app`]); this command prints what it reports.
//!
//! With `--tls-cert`/`--tls-key` the API, its webhooks and the dashboard are served over
//! HTTPS only. Listening on a non-loopback address without them prints a warning: tokens,
//! session cookies and webhook secrets would cross the network in clear.

use std::path::PathBuf;

use anyhow::Context;

use super::GlobalArgs;
use crate::app::{App, AppOptions, Notice};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Every listener (the API, webhooks, [[proxy]] entries) closes connections that do not send a
request head within 10s, pause a body for 30s or idle for 60s, holds at most a number of
connections derived from the open-file limit (shedding those without a request in
progress), and answers webhook deliveries 503 when 64MiB of unauthenticated bodies are
being read. Change them in the config file's [server] table or with
CAPSTAN_SERVER_HEADER_TIMEOUT, _BODY_TIMEOUT, _IDLE_TIMEOUT, _MAX_CONNECTIONS and
_PREAUTH_BODY_BUDGET. The soft open-file limit is raised to the hard limit at start.

With --tls-cert and --tls-key the API, webhooks and dashboard are served over HTTPS only
(TLS 1.2 and 1.3); the CLI on this host keeps working (it pins the certificate through the
CLI token file). Listening on an address other than loopback without TLS prints a warning:
use the TLS flags, or keep the listener on loopback behind a reverse proxy that terminates
TLS.")]
pub struct ServeArgs {
    /// API listen address [default: 127.0.0.1:7878].
    #[arg(long, env = "CAPSTAN_API_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM, the server's certificate first);
    /// needs --tls-key. Replaces `[api] tls_cert`.
    #[arg(
        long,
        env = "CAPSTAN_API_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM). Replaces `[api] tls_key`.
    #[arg(
        long,
        env = "CAPSTAN_API_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// On first start, install every plugin found here: each subdirectory holding a
    /// plugin.toml and its .wasm (scripts/run stages the example plugins this way).
    #[arg(long, env = "CAPSTAN_DEFAULT_PLUGINS", value_name = "DIR")]
    default_plugins: Option<PathBuf>,
    /// Run as a node of a cluster on these NATS servers (JetStream enabled),
    /// comma-separated, e.g. nats://10.0.0.1:4222,nats://10.0.0.2:4222. Replaces
    /// `[cluster] urls`; the rest of `[cluster]` (node name, credentials, TLS) applies.
    #[arg(long, env = "CAPSTAN_CLUSTER", value_name = "URLS")]
    cluster: Option<String>,
}

pub fn run(g: &GlobalArgs, args: ServeArgs) -> anyhow::Result<()> {
    let mut settings = g.serve_settings(args.listen, args.cluster.as_deref())?;
    if args.tls_cert.is_some() || args.tls_key.is_some() {
        settings.api_tls = crate::config::api_tls(args.tls_cert, args.tls_key)?;
    }
    crate::server::raise_open_file_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let options = AppOptions {
        default_plugins: args.default_plugins,
    };
    // Cluster mode: NATS answers (with JetStream) before anything is created or started.
    let cluster = match settings.cluster.clone() {
        Some(mut c) => {
            c.history_max_age = settings.runs.history.max_age;
            Some(rt.block_on(crate::cluster::Cluster::connect(c))?)
        }
        None => None,
    };
    let app = {
        let _guard = rt.enter();
        App::build(settings, &g.passphrase(), &options, &mut print)?
    };
    if let Some(c) = cluster {
        println!(
            "cluster node {} on NATS {}",
            c.node_name(),
            c.settings().urls.join(",")
        );
        app.scheduler().join_cluster(c);
    }
    rt.block_on(async {
        // Handlers first: a signal right after the banner must still shut down gracefully.
        let shutdown = shutdown_signal();
        app.listen(&mut print)
            .await?
            .serve(shutdown, &mut print)
            .await
    })
}

/// Tells the user what the app reports.
fn print(notice: Notice<'_>) {
    match notice {
        Notice::VaultCreated {
            key_file: Some(k),
            generated: true,
        } => println!(
            "created the vault with key file {} (mode 0600); back it up: without it the vault cannot be opened",
            k.display()
        ),
        Notice::VaultCreated {
            key_file: Some(k),
            generated: false,
        } => println!(
            "created the vault with the existing key file {}; keep it: without it the vault cannot be opened",
            k.display()
        ),
        Notice::VaultCreated { key_file: None, .. } => {
            println!("created the vault (passphrase-protected)")
        }
        Notice::LocalDeviceAdded(d) => println!(
            "registered the local Docker daemon as device `local` ({})",
            d.address()
        ),
        Notice::AdminToken { id, token } => println!(
            "admin API token (id {id}), shown once, store it now:\n  {}",
            token.expose_str().expect("tokens are ASCII")
        ),
        Notice::PluginInstalled(installed) => {
            println!(
                "installed plugin {} {}",
                installed.plugin.name, installed.plugin.version
            );
            super::plugin::print_generated_secrets(installed);
        }
        Notice::PluginsLoaded {
            summary,
            allocator,
            cron_triggers,
            hooks,
            docker_triggers,
            run_watchers,
        } => {
            println!(
                "plugins: {} loaded ({} from the compile cache, {} compiled), {allocator} instance allocator; {cron_triggers} cron trigger(s), {hooks} hook(s), {docker_triggers} Docker event trigger(s), {run_watchers} plugin(s) watching other runs",
                summary.loaded, summary.from_cache, summary.compiled,
            );
            for (name, why) in &summary.failed {
                eprintln!("plugin {name} cannot be loaded: {why}");
            }
        }
        Notice::PluginProblem(p) => eprintln!("{p}"),
        Notice::ProxyListening {
            device,
            listen,
            tls,
        } => println!(
            "proxy for device {device} listening on {listen}{}",
            crate::proxy::tls_note(tls)
        ),
        Notice::ApiExposedWithoutTls(addr) => eprintln!(
            "warning: the API listens on {addr}, reachable from other hosts, without TLS: API tokens, dashboard sessions and webhook secrets cross the network in clear. Serve HTTPS with --tls-cert and --tls-key, or listen on 127.0.0.1 behind a reverse proxy that terminates TLS"
        ),
        Notice::ApiListening { addr, tls } => {
            let scheme = if tls { "https" } else { "http" };
            println!("capstan API listening on {scheme}://{addr}");
            println!("webhooks: POST {scheme}://{addr}/hooks/NAME");
        }
        Notice::Stopped(r) => println!(
            "stopped: {} run(s) finished during shutdown, {} interrupted",
            r.finished, r.interrupted
        ),
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
