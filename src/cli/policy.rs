//! `capstan policy …`: test a policy offline.

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
        /// A socket-proxy environment block: KEY=VALUE lines (or `KEY: VALUE`, `- KEY=VALUE`
        /// as pasted from a compose file).
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "policy",
            conflicts_with = "policy"
        )]
        env_file: Option<PathBuf>,
        /// A TOML policy (the variables as keys, plus `devices` and `[containers]` scopes).
        #[arg(long, value_name = "FILE.toml")]
        policy: Option<PathBuf>,
        /// Follow each answer with a tab and the reason.
        #[arg(long)]
        reasons: bool,
    },
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
    parsed.with_context(|| format!("invalid policy in {}", path.display()))
}

pub fn run(cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Decide {
            env_file,
            policy,
            reasons,
        } => {
            let policy = match (env_file, policy) {
                (Some(f), _) => read_policy(&f, false)?,
                (None, Some(f)) => read_policy(&f, true)?,
                (None, None) => unreachable!("clap requires one"),
            };
            let compiled = policy.compile();
            let stdin = std::io::stdin();
            let stdout = std::io::stdout();
            crate::policy::decide_stream(&compiled, stdin.lock(), stdout.lock(), reasons)?;
        }
    }
    Ok(())
}
