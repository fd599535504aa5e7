//! `capstan token …`: API bearer tokens.

use clap::Subcommand;

use super::{GlobalArgs, print_table};
use crate::store::Store;
use crate::token::Tokens;

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a token and print it once.
    Create {
        /// A name to recognise the token by (who or what uses it).
        name: String,
    },
    /// List tokens (ids and names; the tokens themselves are not stored).
    List,
    /// Revoke tokens by id or name.
    Revoke { id_or_name: String },
}

pub fn run(g: &GlobalArgs, cmd: TokenCmd) -> anyhow::Result<()> {
    let settings = g.settings(None)?;
    let store = Store::open(&settings.data_dir)?;
    let tokens = Tokens::new(&store)?;
    match cmd {
        TokenCmd::Create { name } => {
            let (token, info) = tokens.create(&name)?;
            eprintln!(
                "created token {} ({}); it is shown once:",
                info.id, info.name
            );
            println!("{}", token.expose_str().expect("tokens are ASCII"));
        }
        TokenCmd::List => {
            let rows: Vec<Vec<String>> = tokens
                .list()?
                .into_iter()
                .map(|t| vec![t.id, t.name, t.created_at.to_rfc3339()])
                .collect();
            print_table(&["ID", "NAME", "CREATED"], &rows);
        }
        TokenCmd::Revoke { id_or_name } => match tokens.revoke(&id_or_name)? {
            0 => anyhow::bail!("no token with id or name {id_or_name:?}"),
            n => println!("revoked {n} token(s)"),
        },
    }
    Ok(())
}
