//! `capstan plugin …`: install, inspect, run and remove plugins; scaffold new ones.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;

use super::client::ApiClient;
use super::{GlobalArgs, print_table};
use crate::plugin::admin::Installed;
use crate::plugin::records::AuditRecord;
use crate::plugin::report::RunReport;
use crate::plugin::scaffold;
use crate::plugin::{InstalledPlugin, PluginSource};
use crate::runs::RunRecord;
use crate::trigger::cron::CronTrigger;

#[derive(Debug, Subcommand)]
pub enum PluginCmd {
    /// Install a plugin: a .wasm with plugin.toml beside it, or a plugin crate directory
    /// (after `cargo build --target wasm32-wasip2 --release`). Validates the manifest
    /// and compiles the component first; replaces an installed plugin of the same name.
    /// While the engine runs, it installs through its API and the plugin's triggers
    /// take effect at once. A webhook without a secret gets one, printed once; a Docker
    /// trigger is refused unless the policy allows EVENTS.
    Install {
        /// The .wasm file or the directory holding plugin.toml.
        path: PathBuf,
        /// The manifest, when it is not plugin.toml beside the .wasm.
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
    },
    /// List installed plugins.
    List,
    /// Show an installed plugin: manifest, limits, triggers.
    Show { name: String },
    /// Run a plugin once, now, and print what it did: outcome, logs, host calls, denials.
    /// A run that passes one of its manifest's `[limits]` (memory, time, host calls,
    /// log fields, the memory the engine holds for it) fails with the limit named.
    Run {
        name: String,
        /// Input for a manual run (often JSON).
        #[arg(long, conflicts_with = "input_file")]
        input: Option<String>,
        /// Read the input from a file (`-` for stdin).
        #[arg(long, value_name = "FILE")]
        input_file: Option<PathBuf>,
        /// Run as if webhook HOOK had received the input as its body.
        #[arg(long, value_name = "HOOK")]
        webhook: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an installed plugin, its compiled code and its state. Its triggers stop at
    /// once when the engine is running.
    Remove { name: String },
    /// Show a plugin's cron triggers and their next fire times (in UTC and in the
    /// trigger's time zone).
    Schedule {
        name: String,
        /// How many fire times per trigger.
        #[arg(long, default_value_t = 5)]
        count: usize,
    },
    /// Show the last audit records of plugin host calls.
    Audit {
        /// How many records (at most 10000).
        #[arg(long, default_value_t = 20)]
        tail: usize,
    },
    /// Secrets the plugin uses without seeing them: declared in its manifest
    /// (`[secrets.NAME] origins = ["https://…"]`), written by the plugin as
    /// `{{secret.NAME}}` in a URL or header value, filled in by the engine for the bound
    /// origins only. Values are sealed in the vault and never shown.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Create a new plugin crate (Cargo.toml, src/lib.rs, plugin.toml) that builds with
    /// `cargo build --target wasm32-wasip2 --release` and installs as it is.
    New {
        name: String,
        /// Parent directory [default: the current directory].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// The plugin SDK (plugins/sdk of a Capstan checkout) [default: the one this
        /// binary was built from].
        #[arg(long, env = "CAPSTAN_SDK_PATH", value_name = "PATH")]
        sdk: Option<PathBuf>,
    },
}

/// `capstan plugin secret …`.
#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Store a value for secret NAME of PLUGIN (replacing one stored before). The value
    /// comes from --file, from standard input when it is not a terminal, or from a
    /// prompt; never from the command line.
    Set {
        plugin: String,
        name: String,
        /// Read the value from this file (one trailing newline is dropped).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// List the secrets PLUGIN declares, the origins each may be sent to, and whether a
    /// value is stored (never the value).
    List { plugin: String },
    /// Remove the value of secret NAME of PLUGIN.
    Rm { plugin: String, name: String },
}

pub fn run(g: &GlobalArgs, cmd: PluginCmd) -> anyhow::Result<()> {
    if let PluginCmd::New { name, dir, sdk } = &cmd {
        let parent = dir.clone().unwrap_or_else(|| PathBuf::from("."));
        let sdk = sdk.clone().unwrap_or_else(scaffold::default_sdk_path);
        let s = scaffold::create(name, &parent, &sdk).map_err(anyhow::Error::msg)?;
        println!("created plugin crate {}", s.dir.display());
        for f in &s.files {
            println!("  {}", f.display());
        }
        println!(
            "build it:   (cd {} && cargo build --target wasm32-wasip2 --release)\ninstall it: capstan plugin install {}",
            s.dir.display(),
            s.dir.display()
        );
        return Ok(());
    }
    let settings = g.settings(None)?;
    let data_dir = settings.data_dir.clone();
    let rt = super::check::runtime()?;
    let api = {
        // The runtime's epoch ticker and pooled connections live inside the tokio runtime.
        let _guard = rt.enter();
        // Runs and secrets need the plugins loaded (secrets: their declarations).
        if matches!(cmd, PluginCmd::Run { .. } | PluginCmd::Secret(_)) {
            ApiClient::connect_with_plugins(settings, &g.passphrase())?
        } else {
            ApiClient::connect(settings, &g.passphrase())?
        }
    };
    rt.block_on(command(&api, &data_dir, cmd))
}

/// One command against the engine's API (running, or opened here).
async fn command(api: &ApiClient, data_dir: &Path, cmd: PluginCmd) -> anyhow::Result<()> {
    use base64::Engine as _;
    match cmd {
        PluginCmd::Install { path, manifest } => {
            let src = PluginSource::read(&path, manifest.as_deref())?;
            let body = serde_json::json!({
                "manifest": src.manifest,
                "wasm_base64": base64::engine::general_purpose::STANDARD.encode(&src.wasm),
            });
            let v = api.json("POST", "/api/plugins", Some(body)).await?;
            let p: InstalledPlugin = serde_json::from_value(v["plugin"].clone())
                .context("the engine's answer to the install")?;
            print_installed(&p);
            for s in v["generated_secrets"].as_array().into_iter().flatten() {
                print_generated_secret(
                    s["hook"].as_str().unwrap_or("?"),
                    s["secret"].as_str().unwrap_or("?"),
                );
            }
            if !api.is_in_process() {
                println!("  active now in the running engine");
            }
        }
        PluginCmd::List => {
            let v = api.json("GET", "/api/plugins", None).await?;
            let plugins: Vec<InstalledPlugin> =
                serde_json::from_value(v).context("the engine's plugin list")?;
            print_list(&plugins);
        }
        PluginCmd::Show { name } => {
            let p = plugin(api, &name).await?;
            let manifest = std::fs::read_to_string(
                data_dir
                    .join(crate::plugin::runtime::PLUGINS_DIR)
                    .join(&p.name)
                    .join(crate::plugin::manifest::MANIFEST_FILE),
            )
            .unwrap_or_default();
            print_show(&p, &manifest);
        }
        PluginCmd::Schedule { name, count } => print_schedule(&plugin(api, &name).await?, count)?,
        PluginCmd::Run {
            name,
            input,
            input_file,
            webhook,
            json,
        } => run_now(api, &name, read_input(input, input_file)?, webhook, json).await?,
        PluginCmd::Remove { name } => {
            let p = plugin(api, &name).await?;
            api.json("DELETE", &format!("/api/plugins/{name}"), None)
                .await?;
            if api.is_in_process() {
                println!("removed plugin {} {}", p.name, p.version);
            } else {
                println!(
                    "removed plugin {} {}; its triggers stopped",
                    p.name, p.version
                );
            }
        }
        PluginCmd::Audit { tail } => {
            let v = api
                .json("GET", &format!("/api/audit?tail={tail}"), None)
                .await?;
            let records: Vec<AuditRecord> =
                serde_json::from_value(v).context("the engine's audit records")?;
            let rows: Vec<Vec<String>> = records
                .into_iter()
                .map(|r| {
                    vec![
                        r.time.to_rfc3339(),
                        r.plugin,
                        r.call.device,
                        r.call.op,
                        r.call.decision.to_string(),
                        r.call.request,
                        r.call.reason,
                    ]
                })
                .collect();
            print_table(
                &[
                    "TIME", "PLUGIN", "DEVICE", "OP", "DECISION", "REQUEST", "REASON",
                ],
                &rows,
            );
        }
        PluginCmd::Secret(cmd) => secret_command(api, cmd).await?,
        PluginCmd::New { .. } => unreachable!("handled before"),
    }
    Ok(())
}

/// An installed plugin, as the engine describes it.
async fn secret_command(api: &ApiClient, cmd: SecretCmd) -> anyhow::Result<()> {
    match cmd {
        SecretCmd::Set { plugin, name, file } => {
            let value = read_secret_value(file.as_deref(), &plugin, &name)?;
            let body = serde_json::json!({
                "value": value.expose_str().context("the secret must be UTF-8 text")?,
            });
            api.json(
                "PUT",
                &format!("/api/plugins/{plugin}/secrets/{name}"),
                Some(body),
            )
            .await?;
            println!("plugin {plugin}: secret {name} stored in the vault");
        }
        SecretCmd::List { plugin } => {
            let v = api
                .json("GET", &format!("/api/plugins/{plugin}/secrets"), None)
                .await?;
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    let origins: Vec<&str> = s["origins"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|o| o.as_str())
                        .collect();
                    vec![
                        s["name"].as_str().unwrap_or_default().to_string(),
                        if s["set"].as_bool() == Some(true) {
                            "yes"
                        } else {
                            "no"
                        }
                        .to_string(),
                        origins.join(", "),
                    ]
                })
                .collect();
            if rows.is_empty() {
                println!("plugin {plugin} declares no secret ([secrets.NAME] in its manifest)");
            } else {
                print_table(&["SECRET", "SET", "ORIGINS"], &rows);
            }
        }
        SecretCmd::Rm { plugin, name } => {
            api.json(
                "DELETE",
                &format!("/api/plugins/{plugin}/secrets/{name}"),
                None,
            )
            .await?;
            println!("plugin {plugin}: secret {name} removed");
        }
    }
    Ok(())
}

/// A secret's value: from `file`, from stdin when it is not a terminal, else a prompt.
fn read_secret_value(
    file: Option<&Path>,
    plugin: &str,
    name: &str,
) -> anyhow::Result<crate::secret::Secret> {
    use std::io::IsTerminal;
    let value = match file {
        Some(f) => crate::secret::Secret::from_file(f)
            .with_context(|| format!("cannot read {}", f.display()))?,
        None if !std::io::stdin().is_terminal() => {
            crate::secret::Secret::from_reader(std::io::stdin()).context("cannot read stdin")?
        }
        None => crate::secret::Secret::from_str_owned(
            rpassword::prompt_password(format!("value of secret {name} for plugin {plugin}: "))
                .context("cannot read the value from the terminal")?,
        ),
    };
    if value.is_empty() {
        bail!("the value of secret {name} is empty");
    }
    Ok(value)
}

async fn plugin(api: &ApiClient, name: &str) -> anyhow::Result<InstalledPlugin> {
    let v = api
        .json("GET", &format!("/api/plugins/{name}"), None)
        .await?;
    serde_json::from_value(v).context("the engine's plugin record")
}

/// `capstan plugin run`: a run through the engine's run path (queued, recorded in the run
/// history like any other run), waited for; prints the runtime's report of it.
async fn run_now(
    api: &ApiClient,
    name: &str,
    input: String,
    webhook: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let v = api
        .json("GET", &format!("/api/plugins/{name}"), None)
        .await?;
    if v["loaded"] == serde_json::Value::Bool(false) {
        bail!("plugin {name} cannot be loaded; reinstall it (`capstan plugin install`)");
    }
    let mut body = serde_json::json!({ "input": input });
    if let Some(hook) = webhook {
        body["webhook"] = serde_json::Value::String(hook);
    }
    let (status, mut v) = api
        .call(
            "POST",
            &format!("/api/plugins/{name}/run?wait=true&report=true"),
            Some(body),
        )
        .await?;
    if !status.is_success() {
        return Err(ApiClient::error_of(status, &v));
    }
    let report = v
        .as_object_mut()
        .and_then(|o| o.remove("report"))
        .filter(|r| !r.is_null());
    let record: RunRecord = serde_json::from_value(v).context("the engine's run record")?;
    if !record.status.is_final() {
        bail!(
            "plugin {name}: run {} is still {} after the engine's longest wait; see `capstan runs show {}`",
            record.id,
            record.status,
            record.id
        );
    }
    let Some(report) = report else {
        // The runtime could not run it at all: the record says why.
        if json {
            println!("{}", serde_json::to_string_pretty(&record)?);
        } else {
            print!("{}", super::runs::render(&record));
        }
        bail!("plugin {name} {}", record.status);
    };
    let report: RunReport = serde_json::from_value(report).context("the engine's run report")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
        println!("recorded as run {}", record.id);
    }
    if !report.succeeded() {
        bail!("plugin {name} {}", report.status);
    }
    Ok(())
}

/// `--input`, `--input-file` (`-` for stdin), or nothing.
fn read_input(input: Option<String>, input_file: Option<PathBuf>) -> anyhow::Result<String> {
    Ok(match (input, input_file) {
        (Some(i), _) => i,
        (None, Some(f)) if f.as_os_str() == "-" => {
            std::io::read_to_string(std::io::stdin()).context("cannot read stdin")?
        }
        (None, Some(f)) => {
            std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?
        }
        (None, None) => String::new(),
    })
}

fn print_installed(p: &InstalledPlugin) {
    println!(
        "installed plugin {} {} ({} bytes, sha256 {})",
        p.name,
        p.version,
        p.size,
        &p.sha256[..16.min(p.sha256.len())]
    );
    for c in &p.triggers.cron {
        println!(
            "  cron {} ({})",
            c.schedule,
            c.timezone.as_deref().unwrap_or("UTC")
        );
    }
    for h in &p.triggers.webhook {
        println!("  webhook POST /hooks/{}", h.name);
    }
    for d in &p.triggers.docker {
        println!("  docker {}", d.events.join(", "));
    }
    for r in &p.triggers.run {
        println!("  {}", r.describe());
    }
}

/// Prints hook secrets generated at install: shown once, never stored in the clear.
pub(crate) fn print_generated_secrets(installed: &Installed) {
    for (hook, secret) in &installed.generated_secrets {
        print_generated_secret(hook, secret.expose_str().unwrap_or("(not text)"));
    }
}

fn print_generated_secret(hook: &str, secret: &str) {
    println!(
        "  hook {hook}: generated secret, shown once; configure the sender with it:\n    {secret}"
    );
}

fn print_list(plugins: &[InstalledPlugin]) {
    let rows: Vec<Vec<String>> = plugins
        .iter()
        .map(|p| {
            let mut triggers: Vec<String> = p
                .triggers
                .cron
                .iter()
                .map(|c| format!("cron {}", c.schedule))
                .collect();
            triggers.extend(
                p.triggers
                    .webhook
                    .iter()
                    .map(|h| format!("webhook {}", h.name)),
            );
            triggers.extend(
                p.triggers
                    .docker
                    .iter()
                    .map(|d| format!("docker {}", d.events.join(","))),
            );
            triggers.extend(p.triggers.run.iter().map(|r| r.describe()));
            vec![
                p.name.clone(),
                p.version.clone(),
                p.devices.join(","),
                if triggers.is_empty() {
                    "manual".into()
                } else {
                    triggers.join("; ")
                },
                p.description.clone(),
            ]
        })
        .collect();
    print_table(
        &["NAME", "VERSION", "DEVICES", "TRIGGERS", "DESCRIPTION"],
        &rows,
    );
}

fn print_schedule(p: &InstalledPlugin, count: usize) -> anyhow::Result<()> {
    if p.triggers.cron.is_empty() {
        println!("plugin {} has no cron trigger", p.name);
        return Ok(());
    }
    let now = chrono::Utc::now();
    for (i, c) in p.triggers.cron.iter().enumerate() {
        let t = CronTrigger::from_config(c)?;
        println!(
            "trigger {i}: {:?} in {} (overlap {}{}{})",
            c.schedule,
            t.timezone(),
            serde_json::to_value(t.overlap())?.as_str().unwrap_or("?"),
            if t.jitter().is_zero() {
                String::new()
            } else {
                format!(
                    ", jitter up to {}",
                    crate::trigger::units::format_duration(t.jitter())
                )
            },
            if t.run_on_start() {
                ", runs on start"
            } else {
                ""
            }
        );
        for at in t.next_fire_times(now, count.max(1)) {
            let local = at.with_timezone(&t.timezone());
            println!(
                "  {}   {}",
                at.format("%Y-%m-%d %H:%M:%S UTC"),
                local.format("%Y-%m-%d %H:%M:%S %Z")
            );
        }
    }
    Ok(())
}

fn print_show(p: &InstalledPlugin, manifest: &str) {
    println!("name:        {}", p.name);
    println!("version:     {}", p.version);
    println!("description: {}", p.description);
    println!("installed:   {}", p.installed_at.to_rfc3339());
    println!("wasm:        {} bytes, sha256 {}", p.size, p.sha256);
    println!(
        "limits:      memory {} MiB, timeout {} s, logs {} B ({} records of {} fields), output {} B, state {} B, host calls {}, host memory {} B",
        p.limits.memory_mib,
        p.limits.timeout_secs,
        p.limits.max_log_bytes,
        p.limits.max_log_records,
        p.limits.max_log_fields,
        p.limits.max_output_bytes,
        p.limits.max_state_bytes,
        p.limits.max_host_calls,
        p.limits.max_host_bytes
    );
    println!(
        "http limits: {} requests per run, {} ms per request, responses up to {} B",
        p.limits.max_http_requests, p.limits.http_timeout_ms, p.limits.max_http_response_bytes
    );
    println!("devices:     {}", p.devices.join(", "));
    println!("manifest:\n{}", indent(manifest));
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}
