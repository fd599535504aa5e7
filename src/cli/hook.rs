//! `capstan hook …`: the webhook secrets in the vault. A hook is declared by its
//! plugin's manifest (`[[triggers.webhook]]`); its secret lives in the vault and never
//! in a file. Rotation keeps the previous secret valid until it is retired, so senders
//! can be switched over without dropping deliveries. The commands speak the engine's API
//! (the running engine's, or the data directory's opened here with its plugins loaded);
//! a change to a running engine takes effect at once.

use anyhow::Context;
use clap::Subcommand;

use super::GlobalArgs;
use super::client::ApiClient;
use crate::secret::Secret;

/// How deliveries are answered, for `capstan hook --help`.
pub const DELIVERIES_HELP: &str = "\
Deliveries (POST /hooks/NAME):
  A delivery whose delivery id, or (HMAC hooks) whose signature, was accepted before
  answers 200 {\"status\": \"duplicate\", \"run_id\": <first run>} and does not run again,
  whatever its delivery id: signatures are remembered while their signed timestamp is
  within replay_window, or for delivery_retention (default 24h) without one. Set
  replay = \"allow\" on a hook whose sender signs identical bodies on purpose. Bearer
  hooks cannot detect replays; they rely on delivery_header.
  ?wait=true answers with the run's summary (status, times, outcome or error); the full
  record (logs, host calls) needs wait_response = \"full\" on the hook, or an API token
  in the X-Capstan-Token header.";

#[derive(Debug, Subcommand)]
pub enum HookCmd {
    /// List the hooks of the installed plugins: plugin, auth, the path senders post to, and
    /// which secrets each accepts (current, current + previous, none).
    List,
    /// Give a hook a new secret; the old one stays valid (as `previous`) until
    /// `capstan hook retire`. Without --secret-file/--secret-stdin a random secret is
    /// generated and printed once.
    Rotate {
        name: String,
        /// Read the new secret from this file.
        #[arg(long, value_name = "FILE", conflicts_with = "secret_stdin")]
        secret_file: Option<std::path::PathBuf>,
        /// Read the new secret from standard input.
        #[arg(long)]
        secret_stdin: bool,
    },
    /// Stop accepting a hook's previous secret.
    Retire { name: String },
}

pub fn run(g: &GlobalArgs, cmd: HookCmd) -> anyhow::Result<()> {
    let rt = super::check::runtime()?;
    let api = {
        let _guard = rt.enter();
        // The hooks are the loaded plugins' hooks.
        ApiClient::connect_with_plugins(g.settings(None)?, &g.passphrase())?
    };
    rt.block_on(command(&api, cmd))
}

/// One command against the engine's API (running, or opened here).
async fn command(api: &ApiClient, cmd: HookCmd) -> anyhow::Result<()> {
    match cmd {
        HookCmd::List => {
            let v = api.json("GET", "/api/hooks?secrets=true", None).await?;
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| {
                    ["name", "plugin", "auth", "url_path", "secrets"]
                        .iter()
                        .map(|k| h[*k].as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .collect();
            super::print_table(&["HOOK", "PLUGIN", "AUTH", "PATH", "SECRETS"], &rows);
        }
        HookCmd::Rotate {
            name,
            secret_file,
            secret_stdin,
        } => {
            let body = match read_secret(secret_file, secret_stdin)? {
                Some(s) => serde_json::json!({
                    "secret": s.expose_str().context("the secret must be text")?
                }),
                None => serde_json::json!({}),
            };
            let v = api
                .json("POST", &format!("/api/hooks/{name}/rotate"), Some(body))
                .await?;
            print_rotated(&name, v["generated_secret"].as_str());
        }
        HookCmd::Retire { name } => {
            let v = api
                .json("POST", &format!("/api/hooks/{name}/retire"), None)
                .await?;
            print_retired(&name, v["retired"].as_bool() == Some(true));
        }
    }
    Ok(())
}

/// `--secret-file` or `--secret-stdin`; `None` asks for a generated secret.
fn read_secret(file: Option<std::path::PathBuf>, stdin: bool) -> anyhow::Result<Option<Secret>> {
    Ok(match (file, stdin) {
        (Some(f), _) => {
            Some(Secret::from_file(&f).with_context(|| format!("cannot read {}", f.display()))?)
        }
        (None, true) => Some(Secret::from_reader(std::io::stdin()).context("cannot read stdin")?),
        (None, false) => None,
    })
}

fn print_rotated(name: &str, generated: Option<&str>) {
    println!(
        "hook {name}: new secret in effect; the previous one stays valid until `capstan hook retire {name}`"
    );
    if let Some(s) = generated {
        println!("  generated secret, shown once:\n    {s}");
    }
}

fn print_retired(name: &str, retired: bool) {
    if retired {
        println!("hook {name}: the previous secret is no longer accepted");
    } else {
        println!("hook {name} has no previous secret");
    }
}
