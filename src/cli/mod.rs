//! The command line: clap definitions, resolved into typed settings, then dispatched.
//!
//! Raw flags (with their `CAPSTAN_*` environment variables) are parsed here and merged
//! with the config file into [`Settings`] before any command runs; commands never read
//! the environment themselves: what it gives beyond the flags (the vault passphrase,
//! `CAPSTAN_API_TOKEN`, the Docker variables) comes from [`crate::config`].

mod check;
mod client;
mod cluster;
mod device;
mod hook;
mod notifier;
mod plugin;
pub(crate) mod policy;
mod proxy;
mod runs;
mod serve;
mod token;
mod vault;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{ConfigFile, Settings};
use crate::engine::PassphraseInput;

const ABOUT: &str = "Capstan: a WebAssembly-extensible automation engine for Docker hosts";

const LONG_ABOUT: &str = "\
Capstan keeps an encrypted vault of credentials, holds connections to Docker hosts (SSH,
TLS, local socket) and runs sandboxed WebAssembly plugins against them under a socket-proxy
style permission policy.

Quick start: `capstan serve` creates ./capstan-data with a vault (key file
./capstan-data/vault.key, mode 0600), registers the local Docker daemon as device `local`,
prints an admin API token once, and serves the API on 127.0.0.1:7878.";

const AFTER_HELP: &str = "\
Environment:
  CAPSTAN_CONFIG            config file (TOML), same as --config
  CAPSTAN_DATA_DIR          data directory, same as --data-dir (default ./capstan-data)
  CAPSTAN_VAULT_KEY_FILE    vault key file, same as --vault-key-file
  CAPSTAN_VAULT_PASSPHRASE  vault passphrase (for passphrase-protected vaults)
  CAPSTAN_LOG               log filter, e.g. info, capstan=debug (default info)";

#[derive(Debug, Parser)]
#[command(name = "capstan", version, about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args)]
pub struct GlobalArgs {
    /// Config file (TOML); unknown keys are errors.
    #[arg(long, global = true, env = "CAPSTAN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory holding the database and vault [default: ./capstan-data].
    #[arg(long, global = true, env = "CAPSTAN_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Key file holding the vault's master key [default: DATA_DIR/vault.key].
    #[arg(
        long,
        global = true,
        env = "CAPSTAN_VAULT_KEY_FILE",
        value_name = "FILE"
    )]
    pub vault_key_file: Option<PathBuf>,
    /// File holding the vault passphrase (passphrase-protected vaults; or set
    /// CAPSTAN_VAULT_PASSPHRASE, or answer the prompt).
    #[arg(long, global = true, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the engine: vault, devices and the HTTP API.
    Serve(serve::ServeArgs),
    /// Create and maintain the encrypted vault.
    #[command(subcommand)]
    Vault(vault::VaultCmd),
    /// Add, inspect, change and remove Docker hosts.
    #[command(subcommand)]
    Device(Box<device::DeviceCmd>),
    /// Manage API bearer tokens (stored hashed; shown once at creation).
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Test socket-proxy style policies offline.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Serve the Docker API of one device behind a policy (for the docker CLI, Portainer, …).
    Proxy(proxy::ProxyArgs),
    /// Install, run and manage WebAssembly plugins; scaffold new ones.
    #[command(subcommand)]
    Plugin(plugin::PluginCmd),
    /// The run history: `capstan runs [--plugin NAME] [--follow]`, `capstan runs show ID`.
    Runs(runs::RunsArgs),
    /// Webhook secrets: list hooks, rotate and retire their secrets.
    #[command(subcommand, after_help = hook::DELIVERIES_HELP)]
    Hook(hook::HookCmd),
    /// Notifier channels (ntfy, Slack, Discord, Gotify, Teams, webhook, email): add, list,
    /// remove, test.
    #[command(subcommand)]
    Notifier(notifier::NotifierCmd),
    /// Cluster mode: `capstan cluster status` lists the nodes and the runs backlog.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
}

impl GlobalArgs {
    fn settings(&self, listen: Option<String>) -> anyhow::Result<Settings> {
        self.serve_settings(listen, None)
    }

    /// [`GlobalArgs::settings`] with `serve --cluster URLS` over the `[cluster]` table.
    fn serve_settings(
        &self,
        listen: Option<String>,
        cluster: Option<&str>,
    ) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(p) => ConfigFile::load(p)?,
            None => ConfigFile::default(),
        };
        let settings = Settings::resolve(
            &file,
            self.data_dir.clone(),
            listen,
            self.vault_key_file.clone(),
        )?;
        Ok(match cluster {
            Some(urls) => settings.with_cluster_urls(&file, urls)?,
            None => settings,
        })
    }

    fn passphrase(&self) -> PassphraseInput {
        PassphraseInput::new(self.passphrase_file.clone())
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Serve(args) => serve::run(g, args),
        Command::Vault(cmd) => vault::run(g, cmd),
        Command::Device(cmd) => device::run(g, *cmd),
        Command::Token(cmd) => token::run(g, cmd),
        Command::Policy(cmd) => policy::run(cmd),
        Command::Proxy(args) => proxy::run(g, args),
        Command::Plugin(cmd) => plugin::run(g, cmd),
        Command::Runs(args) => runs::run(g, args),
        Command::Hook(cmd) => hook::run(g, cmd),
        Command::Notifier(cmd) => notifier::run(g, cmd),
        Command::Cluster(cmd) => cluster::run(g, cmd),
    }
}

/// Prints rows as aligned columns.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", table_text(header, rows));
}

/// Rows as aligned columns, one line each after the header.
pub(crate) fn table_text(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        format!("{}\n", s.trim_end())
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}
