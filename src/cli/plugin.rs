//! `capstan plugin …`: install, inspect, run and remove plugins; scaffold new ones.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Subcommand;

use super::{GlobalArgs, print_table};
use crate::engine::Engine;
use crate::plugin::scaffold;
use crate::plugin::{PluginRuntime, RuntimeConfig, TriggerEvent};

#[derive(Debug, Subcommand)]
pub enum PluginCmd {
    /// Install a plugin: a .wasm with plugin.toml beside it, or a plugin crate directory
    /// (after `cargo build --target wasm32-wasip2 --release`). Validates the manifest
    /// and compiles the component first; replaces an installed plugin of the same name.
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
    /// Remove an installed plugin, its compiled code and its state.
    Remove { name: String },
    /// Show the last audit records of plugin host calls.
    Audit {
        /// How many records.
        #[arg(long, default_value_t = 20)]
        tail: usize,
    },
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
    let engine = Arc::new(Engine::open(g.settings(None)?, &g.passphrase())?);
    let rt = super::check::runtime()?;
    // The runtime's epoch ticker and pooled connections live inside the tokio runtime.
    let _guard = rt.enter();
    let runtime = PluginRuntime::new(engine.clone(), RuntimeConfig::default())?;
    match cmd {
        PluginCmd::Install { path, manifest } => {
            let p = runtime.install(&path, manifest.as_deref())?;
            println!(
                "installed plugin {} {} ({} bytes, sha256 {})",
                p.name,
                p.version,
                p.size,
                &p.sha256[..16]
            );
            for c in &p.triggers.cron {
                println!(
                    "  cron {} ({})",
                    c.schedule,
                    c.timezone.as_deref().unwrap_or("UTC")
                );
            }
            for h in &p.triggers.webhooks {
                println!("  webhook {h}");
            }
        }
        PluginCmd::List => {
            let rows: Vec<Vec<String>> = runtime
                .installed()?
                .into_iter()
                .map(|p| {
                    let mut triggers: Vec<String> = p
                        .triggers
                        .cron
                        .iter()
                        .map(|c| format!("cron {}", c.schedule))
                        .collect();
                    triggers.extend(p.triggers.webhooks.iter().map(|h| format!("webhook {h}")));
                    vec![
                        p.name,
                        p.version,
                        p.devices.join(","),
                        if triggers.is_empty() {
                            "manual".into()
                        } else {
                            triggers.join("; ")
                        },
                        p.description,
                    ]
                })
                .collect();
            print_table(
                &["NAME", "VERSION", "DEVICES", "TRIGGERS", "DESCRIPTION"],
                &rows,
            );
        }
        PluginCmd::Show { name } => {
            let p = runtime.installed_plugin(&name)?;
            let manifest = std::fs::read_to_string(
                engine
                    .settings
                    .data_dir
                    .join(crate::plugin::runtime::PLUGINS_DIR)
                    .join(&name)
                    .join(crate::plugin::manifest::MANIFEST_FILE),
            )
            .unwrap_or_default();
            println!("name:        {}", p.name);
            println!("version:     {}", p.version);
            println!("description: {}", p.description);
            println!("installed:   {}", p.installed_at.to_rfc3339());
            println!("wasm:        {} bytes, sha256 {}", p.size, p.sha256);
            println!(
                "limits:      memory {} MiB, timeout {} s, logs {} B, output {} B, state {} B, host calls {}",
                p.limits.memory_mib,
                p.limits.timeout_secs,
                p.limits.max_log_bytes,
                p.limits.max_output_bytes,
                p.limits.max_state_bytes,
                p.limits.max_host_calls
            );
            println!("devices:     {}", p.devices.join(", "));
            println!("manifest:\n{}", indent(&manifest));
        }
        PluginCmd::Run {
            name,
            input,
            input_file,
            webhook,
            json,
        } => {
            let input = match (input, input_file) {
                (Some(i), _) => i,
                (None, Some(f)) if f.as_os_str() == "-" => {
                    std::io::read_to_string(std::io::stdin()).context("cannot read stdin")?
                }
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read {}", f.display()))?,
                (None, None) => String::new(),
            };
            let event = match webhook {
                Some(hook) => TriggerEvent::Webhook {
                    hook,
                    headers: vec![("content-type".into(), "application/json".into())],
                    body: input.into_bytes(),
                },
                None => TriggerEvent::manual(input),
            };
            let summary = runtime.load_installed()?;
            if let Some((_, why)) = summary.failed.iter().find(|(n, _)| *n == name) {
                bail!("plugin {name} cannot be loaded: {why}");
            }
            let report = rt.block_on(runtime.run(&name, event))?;
            engine.store.flush()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            if !report.succeeded() {
                bail!("plugin {name} {}", report.status);
            }
        }
        PluginCmd::Remove { name } => {
            let p = runtime.remove(&name)?;
            println!("removed plugin {} {}", p.name, p.version);
        }
        PluginCmd::Audit { tail } => {
            let rows: Vec<Vec<String>> = runtime
                .audit()
                .tail(tail)?
                .into_iter()
                .map(|r| {
                    vec![
                        r.time.to_rfc3339(),
                        r.plugin,
                        r.device,
                        r.op,
                        r.decision,
                        r.request,
                        r.reason,
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
        PluginCmd::New { .. } => unreachable!("handled above"),
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}
