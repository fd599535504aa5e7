//! `capstan token …`: API bearer tokens, each with a role and optionally a device scope.

use anyhow::bail;
use clap::Subcommand;

use super::{GlobalArgs, print_table};
use crate::store::Store;
use crate::token::{Role, Tokens};

/// What each role may do, for `--help`.
const ROLES_HELP: &str = "\
Roles (the API and the dashboard enforce them alike):
  viewer    read: devices, containers, plugins, runs, hooks and notifiers (never a secret),
            the API document; /metrics and the audit log too when not limited to devices
  operator  what viewer may, and run plugins and check devices
  admin     everything: add, change and remove devices, plugins, plugin secrets, hooks
            (rotate, retire) and notifiers; pin SSH host keys; pre-check new devices

--devices limits a viewer or operator to the devices its globs match (e.g. 'prod-*'):
other devices are not listed and answer 404; it sees and runs only plugins whose every
device is one it sees, and only their runs; /metrics and the audit log, which span every
device, are refused. An admin token cannot be limited to devices.";

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a token and print it once.
    #[command(after_help = ROLES_HELP)]
    Create {
        /// A name to recognise the token by (who or what uses it).
        name: String,
        /// What the token may do: admin, operator or viewer. Default admin, as every
        /// token was before roles.
        #[arg(long, default_value = "admin", value_parser = parse_role)]
        role: Role,
        /// Limit the token to the devices these globs match (`*` and `?`, as in plugin
        /// policies); repeat the flag or separate globs with commas. Not with admin.
        #[arg(long = "devices", value_name = "GLOB", value_delimiter = ',')]
        devices: Vec<String>,
    },
    /// List tokens: id, name, role and device scope (the tokens themselves are not
    /// stored).
    #[command(after_help = ROLES_HELP)]
    List,
    /// Revoke tokens by id or name.
    Revoke { id_or_name: String },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

/// The device globs of `--devices`, trimmed and each checked as a glob.
fn device_scope(role: Role, devices: Vec<String>) -> anyhow::Result<Vec<String>> {
    let mut globs = Vec::new();
    for d in devices.into_iter().map(|d| d.trim().to_string()) {
        if d.is_empty() {
            bail!(
                "--devices: an empty glob (a stray comma?); give device names or globs such as 'prod-*'"
            );
        }
        if let Err(e) = capstan_policy::Glob::new(&d, "device") {
            bail!("--devices {d:?}: {e}");
        }
        if !globs.contains(&d) {
            globs.push(d);
        }
    }
    if role == Role::Admin && !globs.is_empty() {
        bail!(
            "an admin token cannot be limited to devices: what admin changes (plugins, hooks, notifiers, devices) spans every device; give --role operator or --role viewer with --devices"
        );
    }
    Ok(globs)
}

pub fn run(g: &GlobalArgs, cmd: TokenCmd) -> anyhow::Result<()> {
    let settings = g.settings(None)?;
    let store = Store::open(&settings.data_dir)?;
    let tokens = Tokens::new(&store)?;
    match cmd {
        TokenCmd::Create {
            name,
            role,
            devices,
        } => {
            let devices = device_scope(role, devices)?;
            let (token, info) = tokens.create_with(&name, role, devices)?;
            let scope = if info.devices.is_empty() {
                "every device".to_string()
            } else {
                format!("devices {}", info.devices.join(", "))
            };
            eprintln!(
                "created token {} ({}, {} of {scope}); it is shown once:",
                info.id, info.name, info.role
            );
            println!("{}", token.expose_str().expect("tokens are ASCII"));
        }
        TokenCmd::List => {
            let rows: Vec<Vec<String>> = tokens
                .list()?
                .into_iter()
                .map(|t| {
                    let devices = if t.devices.is_empty() {
                        "*".to_string()
                    } else {
                        t.devices.join(",")
                    };
                    vec![
                        t.id,
                        t.name,
                        t.role.to_string(),
                        devices,
                        t.created_at.to_rfc3339(),
                    ]
                })
                .collect();
            print_table(&["ID", "NAME", "ROLE", "DEVICES", "CREATED"], &rows);
        }
        TokenCmd::Revoke { id_or_name } => match tokens.revoke(&id_or_name)? {
            0 => anyhow::bail!("no token with id or name {id_or_name:?}"),
            n => println!("revoked {n} token(s)"),
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_globs_are_checked_and_an_admin_cannot_be_scoped() {
        let globs = device_scope(Role::Viewer, vec!["prod-*".into(), " local ".into()]).unwrap();
        assert_eq!(globs, ["prod-*", "local"]);
        assert!(device_scope(Role::Viewer, vec!["".into()]).is_err());
        assert!(device_scope(Role::Viewer, vec!["prod 1".into()]).is_err());
        let e = device_scope(Role::Admin, vec!["prod-*".into()]).unwrap_err();
        assert!(e.to_string().contains("cannot be limited"), "{e}");
        assert!(device_scope(Role::Admin, vec![]).unwrap().is_empty());
    }
}
