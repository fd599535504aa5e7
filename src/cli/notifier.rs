//! `capstan notifier …`: the channels notifications go to (ntfy, Slack, Discord, Gotify,
//! Teams, a generic JSON webhook, email).
//!
//! A channel URL holds the service's token, so it is a secret and follows the rule for
//! every secret: it comes from a file (`--url-file`), stdin (`--url-stdin`) or a prompt
//! on a terminal, never from the command line itself (shell history, `ps`). `list`
//! shows each channel's service and the URL's scheme and host, nothing more.
//!
//! Every command speaks the engine's API (the running engine's, or the data directory's
//! opened here): a channel added is in effect at once.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;

use super::client::ApiClient;
use super::{GlobalArgs, print_table};
use crate::secret::Secret;

const URL_HELP: &str = "\
Channel URLs (HTTPS unless SERVICE+http:// says otherwise):
  ntfy://[:TOKEN@ | USER:PASSWORD@]HOST[:PORT]/TOPIC
  slack://T000/B000/XXXX              or https://hooks.slack.com/services/…
  discord://TOKEN@WEBHOOK_ID          or https://discord.com/api/webhooks/ID/TOKEN
  gotify://HOST[:PORT][/PATH]/APP_TOKEN
  teams+https://HOST/…                (a Teams Workflows or connector webhook's URL; the
                                      bare https:// URL of either is recognised too)
  generic+https://HOST[:PORT]/PATH    (POSTs the whole notification as JSON)
  smtp://[USER:PASSWORD@]HOST[:PORT]/?to=A@X,B@Y&from=CAPSTAN@X[&tls=none]
                                      (STARTTLS on 587; smtps:// for TLS on 465)
  SERVICE+https://HOST[:PORT]/PATH    a service's full endpoint (self-hosted, under a path)
  SERVICE+http://…                    plain HTTP: for a receiver on loopback or a trusted
                                      network only (the token crosses the wire in clear)

Examples:
  capstan notifier add ops --url-file ops.url
  echo 'ntfy://ntfy.sh/my-alerts' | capstan notifier add ops --url-stdin
  capstan notifier test ops";

#[derive(Debug, Subcommand)]
pub enum NotifierCmd {
    /// Add a channel: its URL from --url-file, --url-stdin or a prompt (never the
    /// command line: it holds the service's token). Stored in the vault.
    #[command(after_help = URL_HELP)]
    Add {
        /// The channel's name, as manifests name it (`[notify] channels = ["ops"]`).
        name: String,
        /// File holding the channel URL.
        #[arg(long, value_name = "FILE", conflicts_with = "url_stdin")]
        url_file: Option<PathBuf>,
        /// Read the channel URL from stdin.
        #[arg(long)]
        url_stdin: bool,
        /// Refused: a channel URL holds a token, and the command line is visible to other
        /// users (`ps`) and kept in shell history. Use --url-file or --url-stdin.
        #[arg(long, value_name = "URL", hide = true)]
        url: Option<String>,
    },
    /// List channels: name, service, and the URL's scheme and host (never its token).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a channel and its URL.
    #[command(alias = "remove")]
    Rm { name: String },
    /// Send a test message to a channel now; exits non-zero when it is not delivered.
    Test { name: String },
}

pub fn run(g: &GlobalArgs, cmd: NotifierCmd) -> anyhow::Result<()> {
    // Read before any engine is opened: a refused or unreadable URL touches nothing.
    let url = match &cmd {
        NotifierCmd::Add {
            url_file,
            url_stdin,
            url,
            ..
        } => Some(read_url(url_file.as_deref(), *url_stdin, url.is_some())?),
        _ => None,
    };
    let rt = super::check::runtime()?;
    let api = {
        let _guard = rt.enter();
        ApiClient::connect(g.settings(None)?, &g.passphrase())?
    };
    rt.block_on(command(&api, cmd, url))
}

/// The channel URL from a file, stdin or a prompt.
fn read_url(file: Option<&std::path::Path>, stdin: bool, on_argv: bool) -> anyhow::Result<Secret> {
    if on_argv {
        bail!(
            "--url is not accepted: a channel URL holds the service's token, and the command line is visible in `ps` and shell history; use --url-file FILE or --url-stdin (or run on a terminal to be prompted)"
        );
    }
    let url = match (file, stdin) {
        (Some(f), _) => {
            Secret::from_file(f).with_context(|| format!("cannot read {}", f.display()))?
        }
        (None, true) => Secret::from_reader(std::io::stdin().lock())
            .context("cannot read the URL from stdin")?,
        (None, false) if std::io::stdin().is_terminal() => Secret::from_str_owned(
            rpassword::prompt_password("Channel URL: ")
                .context("cannot read the URL from the terminal")?,
        ),
        (None, false) => {
            bail!(
                "give the channel URL with --url-file FILE or --url-stdin (or run on a terminal to be prompted)"
            )
        }
    };
    if url.is_empty() {
        bail!("the channel URL is empty");
    }
    Ok(url)
}

async fn command(api: &ApiClient, cmd: NotifierCmd, url: Option<Secret>) -> anyhow::Result<()> {
    match cmd {
        NotifierCmd::Add { name, .. } => {
            let url = url.expect("read above");
            let body = serde_json::json!({
                "name": name,
                "url": url.expose_str().context("the channel URL is not UTF-8 text")?,
            });
            let v = api.json("POST", "/api/notifiers", Some(body)).await?;
            println!(
                "notifier {} added: {} at {}",
                v["name"].as_str().unwrap_or_default(),
                v["service"].as_str().unwrap_or_default(),
                v["at"].as_str().unwrap_or_default()
            );
            println!("  send a test message: capstan notifier test {name}");
        }
        NotifierCmd::List { json } => {
            let v = api.json("GET", "/api/notifiers", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    ["name", "service", "at", "added_at"]
                        .iter()
                        .map(|k| c[*k].as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .collect();
            print_table(&["NAME", "SERVICE", "AT", "ADDED"], &rows);
        }
        NotifierCmd::Rm { name } => {
            api.json("DELETE", &path(&name)?, None).await?;
            println!("notifier {name} removed");
        }
        NotifierCmd::Test { name } => {
            let v = api
                .json("POST", &format!("{}/test", path(&name)?), None)
                .await?;
            println!(
                "test message delivered to {name} ({} at {})",
                v["channel"]["service"].as_str().unwrap_or_default(),
                v["channel"]["at"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// `/api/notifiers/NAME`; a name that is not one cannot become another route.
fn path(name: &str) -> anyhow::Result<String> {
    if !crate::notify::valid_name(name) {
        bail!("`{name}` is not a channel name: letters, digits, `.`, `_` and `-`, at most 64");
    }
    Ok(format!("/api/notifiers/{name}"))
}
