//! `capstan proxy`: serve the Docker API for one device behind a policy.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use super::GlobalArgs;
use crate::engine::Engine;
use crate::proxy::{AccessLog, Listen, Proxy, ProxyListener, TlsFiles};
use crate::secret::Secret;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  capstan proxy --device web1 --policy readonly.env --listen tcp://127.0.0.1:2375
  DOCKER_HOST=tcp://127.0.0.1:2375 docker ps

  # over the network, clients with certificates from ca.pem (as dockerd --tlsverify):
  capstan proxy --device web1 --policy readonly.env --listen tcp://10.0.0.2:2376 \\
    --tls-cert server.pem --tls-key server-key.pem --tls-client-ca ca.pem
  docker --tlsverify --tlscacert ca.pem --tlscert cert.pem --tlskey key.pem -H tcp://10.0.0.2:2376 ps

The policy file is a socket-proxy environment block (CONTAINERS=1, POST=0, ALLOW_RESTARTS=1,
…, as in a docker-compose `environment:` section) or a TOML file ending in .toml. Denied
requests get 403 with a message naming the variable that would allow them. The write gate
(POST) and the guards (ALLOW_LOGS, …) apply by what a request does, not by its method:
attaching to a container (POST or websocket GET) needs POST=1, and ALLOW_LOGS=1 as well when
it asks for logs; any connection upgrade needs POST=1; `docker save` needs ALLOW_EXPORT=1.

Container scopes ([containers] in TOML) hold for every container a request names: path,
query (commit?container=) and body (VolumesFrom, container:NAME modes, Links, network
connect/disconnect), and listings show only containers in scope. Creates pass the create
guard: privileged, host namespaces, devices, added capabilities and bind mounts are
refused unless [create] (or CREATE_PRIVILEGED=1, CREATE_BIND_ROOTS=/srv/app, … in an
environment block) allows them; `capstan policy show` prints it. Bodies read for these
checks are limited to 1 MiB (413 beyond).

Every allowed request is logged at `info` (denied ones at `warn`); with --access-log every
request is a JSON line in that file instead.

Timeouts and the connection cap come from the config file's [server] table or
CAPSTAN_SERVER_HEADER_TIMEOUT, _BODY_TIMEOUT, _IDLE_TIMEOUT and _MAX_CONNECTIONS.")]
pub struct ProxyArgs {
    /// The device whose daemon to serve (name or id).
    #[arg(long)]
    device: String,
    /// Policy file: an environment block, or TOML when it ends in .toml.
    #[arg(long, value_name = "FILE")]
    policy: PathBuf,
    /// Where to listen: tcp://IP:PORT or unix:///path.sock.
    #[arg(long, default_value = "tcp://127.0.0.1:2375", value_name = "URL")]
    listen: Listen,
    /// File with a token clients must send (`X-Capstan-Token: …` or `Authorization:
    /// Bearer …`); required when listening on a non-loopback address.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Serve TLS with this certificate (PEM, the chain from the server's own first).
    #[arg(long, value_name = "FILE", requires = "tls_key", help_heading = "TLS")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert", help_heading = "TLS")]
    tls_key: Option<PathBuf>,
    /// Demand client certificates signed by this CA (PEM), as `dockerd --tlsverify` does;
    /// they authenticate clients, so no token is needed.
    #[arg(long, value_name = "FILE", requires = "tls_cert", help_heading = "TLS")]
    tls_client_ca: Option<PathBuf>,
    /// Append a JSON line per request (allowed or denied) to FILE, created with mode 0600:
    /// time, client, device, method, path, decision, rule, variable, status. Bodies and
    /// headers are never recorded.
    #[arg(long, value_name = "FILE")]
    access_log: Option<PathBuf>,
}

pub fn run(g: &GlobalArgs, args: ProxyArgs) -> anyhow::Result<()> {
    let policy = super::policy::load_policy_file(&args.policy)?.compile();
    let token = match &args.token_file {
        Some(f) => Some(
            Secret::from_file(f)
                .with_context(|| format!("cannot read token file {}", f.display()))?,
        ),
        None => None,
    };
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert,
            key,
            client_ca: args.tls_client_ca,
        }),
        _ => None,
    };
    let access_log = args
        .access_log
        .as_deref()
        .map(AccessLog::open)
        .transpose()?;
    let settings = g.settings(None)?;
    crate::server::raise_open_file_limit();
    let limits = crate::server::Server::new(&settings.server)?;
    let engine = Engine::open(settings, &g.passphrase())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let device = engine.devices()?.get(&args.device)?;
        let upstream = engine.docker_client(&device)?;
        // The client holds what it needs (secrets in memory); release the data directory
        // so the engine and other proxies can use it.
        drop(engine);
        let mut proxy = Proxy::new(
            &device.name,
            policy,
            upstream,
            &args.listen,
            token.as_ref(),
            tls.as_ref(),
        )?;
        if let Some(log) = access_log {
            proxy = proxy.with_access_log(log);
        }
        let proxy = Arc::new(proxy);
        let listener = ProxyListener::bind(&args.listen).await?;
        println!(
            "serving the Docker API of device {} on {}{}",
            device.name,
            listener.local_listen(),
            crate::proxy::tls_note(tls.as_ref())
        );
        proxy
            .serve_on(&limits, listener, super::serve::shutdown_signal())
            .await?;
        anyhow::Ok(())
    })
}
