//! `capstan policy …`: test a policy offline: decide requests, or show what it allows.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;

use crate::policy::Policy;

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Read `METHOD PATH` lines from stdin and print `allow` or `deny` for each.
    #[command(
        after_help = "Example:\n  printf 'GET /containers/json\\nPOST /containers/web/restart\\n' | capstan policy decide --env-file proxy.env --reasons"
    )]
    Decide {
        #[command(flatten)]
        source: PolicySource,
        /// Follow each answer with a tab and the reason.
        #[arg(long)]
        reasons: bool,
    },
    /// Print what a policy allows: the variables that are on, the device and container
    /// scopes, and the create guard (what a container create may ask of the host).
    #[command(
        after_help = "Example:\n  capstan policy show --policy proxy.toml\n\nThe create guard refuses privileged containers, host namespaces, devices, added\ncapabilities and bind mounts unless the policy's [create] table (CREATE_* names in an\nenvironment block) allows them."
    )]
    Show {
        #[command(flatten)]
        source: PolicySource,
    },
}

/// Which policy file a `capstan policy` command reads.
#[derive(Debug, clap::Args)]
pub struct PolicySource {
    /// A socket-proxy environment block: KEY=VALUE lines (or `KEY: VALUE`, `- KEY=VALUE`
    /// as pasted from a compose file).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "policy",
        conflicts_with = "policy"
    )]
    env_file: Option<PathBuf>,
    /// A TOML policy (the variables as keys, plus `devices`, `[containers]` and
    /// `[create]`).
    #[arg(long, value_name = "FILE.toml")]
    policy: Option<PathBuf>,
}

/// The policy named by `--env-file` or `--policy`.
fn chosen(source: PolicySource) -> anyhow::Result<Policy> {
    match (source.env_file, source.policy) {
        (Some(f), _) => read_policy(&f, false),
        (None, Some(f)) => read_policy(&f, true),
        (None, None) => unreachable!("clap requires one"),
    }
}

/// `capstan policy show`'s text.
pub fn describe(policy: &Policy) -> String {
    use std::fmt::Write;
    let on: Vec<&str> = crate::policy::Var::ALL
        .iter()
        .filter(|&&v| policy.get(v))
        .map(|v| v.name())
        .collect();
    let devices: Vec<&str> = policy.devices().patterns().collect();
    let mut out = String::new();
    let _ = writeln!(out, "variables on: {}", on.join(", "));
    let _ = writeln!(
        out,
        "devices: {}",
        if devices.is_empty() {
            "none".to_string()
        } else {
            devices.join(", ")
        }
    );
    let containers = policy.containers();
    let _ = writeln!(
        out,
        "containers: {}",
        if containers.is_all() {
            "every container".to_string()
        } else {
            containers.describe()
        }
    );
    let _ = writeln!(out, "create guard:");
    for line in policy.create().describe() {
        let _ = writeln!(out, "  {line}");
    }
    if let Some(note) = inert_note(policy) {
        let _ = writeln!(out, "{note}");
    }
    out
}

/// The variables of linuxserver's block the policy accepted without effect, and why;
/// `None` when it set none.
pub fn inert_note(policy: &Policy) -> Option<String> {
    use crate::policy::InertKind;
    let listed = |kind: InertKind| -> Vec<String> {
        policy
            .inert()
            .iter()
            .filter(|(v, _)| v.kind() == kind)
            .map(|(v, value)| format!("{}={value}", v.name()))
            .collect()
    };
    let libpod = listed(InertKind::Libpod);
    let process = listed(InertKind::ProcessSetting);
    let mut parts = Vec::new();
    if !libpod.is_empty() {
        parts.push(format!(
            "{} accepted without effect: Capstan serves the Docker Engine API only and denies \
             every /libpod/… (Podman) request",
            libpod.join(", ")
        ));
    }
    if !process.is_empty() {
        parts.push(format!(
            "{} accepted without effect: they configure linuxserver's proxy process, not \
             what it allows",
            process.join(", ")
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// Loads a policy file: TOML when the name ends in `.toml`, else an environment block.
pub fn load_policy_file(path: &Path) -> anyhow::Result<Policy> {
    read_policy(path, path.extension().is_some_and(|e| e == "toml"))
}

fn read_policy(path: &Path, toml: bool) -> anyhow::Result<Policy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    let parsed = if toml {
        Policy::from_toml_str(&text)
    } else {
        Policy::from_env_block(&text)
    };
    let policy = parsed.with_context(|| format!("invalid policy in {}", path.display()))?;
    if let Some(note) = inert_note(&policy) {
        tracing::info!(file = %path.display(), "{note}");
    }
    Ok(policy)
}

pub fn run(cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Decide { source, reasons } => {
            let policy = chosen(source)?;
            if let Some(note) = inert_note(&policy) {
                eprintln!("note: {note}");
            }
            let compiled = policy.compile();
            let stdin = std::io::stdin();
            let stdout = std::io::stdout();
            crate::policy::decide_stream(&compiled, stdin.lock(), stdout.lock(), reasons)?;
        }
        PolicyCmd::Show { source } => {
            print!("{}", describe(&chosen(source)?));
        }
    }
    Ok(())
}
