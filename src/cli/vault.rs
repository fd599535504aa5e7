//! `capstan vault …`: create the vault, report on it, rotate its keys, compact the data
//! directory.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;

use super::GlobalArgs;
use crate::engine::{PassphraseInput, key_source_for};
use crate::secret::Secret;
use crate::store::Store;
use crate::vault::{self, Argon2Params, KeySource, Protection, Vault};

#[derive(Debug, Subcommand)]
pub enum VaultCmd {
    /// Create the vault. With --passphrase it is protected by a passphrase (Argon2id,
    /// 64 MiB, 3 passes); otherwise by a newly generated key file (mode 0600).
    Init {
        /// Protect the vault with a passphrase (from CAPSTAN_VAULT_PASSPHRASE,
        /// --passphrase-file or a prompt) instead of a key file.
        #[arg(long)]
        passphrase: bool,
    },
    /// Show how the vault is protected, its key generation and how many secrets it holds.
    Status,
    /// Generate a new data key and re-seal every secret under it (crash-safe: an
    /// interrupted rotation leaves the vault as it was). The old header and ciphertexts
    /// are overwritten and removed from the data directory.
    RotateKey {
        /// Also replace the master key with a newly generated key file at this path.
        #[arg(long, value_name = "FILE")]
        new_key_file: Option<PathBuf>,
    },
    /// Change the passphrase of a passphrase-protected vault. The old header is
    /// overwritten and removed from the data directory, so the old passphrase opens
    /// nothing left there.
    ChangePassphrase {
        /// File with the new passphrase (or set CAPSTAN_VAULT_NEW_PASSPHRASE, or answer
        /// the prompt).
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Rewrite the vault and the database into fresh files and overwrite and remove the
    /// old ones, so nothing replaced or removed stays readable in the data directory.
    /// Every vault change already does this for the vault; `compact` also clears the
    /// database's log of superseded records (devices, tokens, runs). Needs no key; the
    /// engine must be stopped. Crash-safe: a killed compaction is finished or undone at
    /// the next open, nothing lost.
    Compact,
}

pub fn run(g: &GlobalArgs, cmd: VaultCmd) -> anyhow::Result<()> {
    let settings = g.settings(None)?;
    let store = Store::open(&settings.data_dir)?;
    let pass = g.passphrase();
    match cmd {
        VaultCmd::Init { passphrase } => {
            if vault::read_header(&store)?.is_some() {
                bail!(
                    "a vault already exists in {}; use `capstan vault status`",
                    settings.data_dir.display()
                );
            }
            let source = if passphrase {
                let p = pass.read("New vault passphrase: ")?;
                if !pass.is_given() {
                    let again = PassphraseInput::default().read("Repeat the passphrase: ")?;
                    if again != p {
                        bail!("the passphrases do not match; nothing was created");
                    }
                }
                KeySource::Passphrase(p)
            } else {
                let path = settings
                    .key_file
                    .clone()
                    .unwrap_or_else(|| settings.default_key_file());
                if path.exists() {
                    bail!(
                        "{} already exists; refusing to reuse or overwrite a key file. Move it away or name another with --vault-key-file",
                        path.display()
                    );
                }
                vault::generate_key_file(&path)?;
                println!(
                    "generated vault key file {} (mode 0600): back it up; without it the vault cannot be opened",
                    path.display()
                );
                KeySource::KeyFile(path)
            };
            Vault::init(&store, &source, Argon2Params::DEFAULT)?;
            println!("vault created in {}", settings.data_dir.display());
        }
        VaultCmd::Status => {
            let Some(header) = vault::read_header(&store)? else {
                println!(
                    "no vault in {} (run `capstan vault init`)",
                    settings.data_dir.display()
                );
                return Ok(());
            };
            println!("data directory: {}", settings.data_dir.display());
            match &header.protection {
                Protection::KeyFile => println!(
                    "protection:     key file ({})",
                    settings
                        .key_file
                        .clone()
                        .unwrap_or_else(|| settings.default_key_file())
                        .display()
                ),
                Protection::Passphrase { params, .. } => println!(
                    "protection:     passphrase (Argon2id, {} MiB, {} passes, {} lanes)",
                    params.m_cost_kib / 1024,
                    params.t_cost,
                    params.p_cost
                ),
            }
            println!("key generation: {}", header.generation);
            println!("created:        {}", header.created_at.to_rfc3339());
            if let Some(t) = header.rotated_at {
                println!("data key rotated: {}", t.to_rfc3339());
            }
            if let Some(t) = header.master_key_changed_at {
                println!("master key changed: {}", t.to_rfc3339());
            }
            let source = key_source_for(&settings, &header.protection, &pass)?;
            let v = Vault::open(&store, &source)?;
            println!("key check:      ok");
            println!("secrets:        {}", v.len());
        }
        VaultCmd::RotateKey { new_key_file } => {
            refuse_in_shared_cluster(&settings.data_dir, "vault rotate-key")?;
            let header = vault::read_header(&store)?.ok_or(vault::VaultError::NotInitialized)?;
            let source = key_source_for(&settings, &header.protection, &pass)?;
            let mut v = Vault::open(&store, &source)?;
            let n = match &new_key_file {
                Some(path) => {
                    vault::generate_key_file(path)?;
                    let n = v.rotate_data_key(Some((
                        &KeySource::KeyFile(path.clone()),
                        Argon2Params::DEFAULT,
                    )))?;
                    println!(
                        "the vault is now protected by the key file {}; set CAPSTAN_VAULT_KEY_FILE or --vault-key-file to it",
                        path.display()
                    );
                    n
                }
                None => v.rotate_data_key(None)?,
            };
            println!(
                "re-sealed {n} secrets under a new data key (generation {})",
                v.header().generation
            );
        }
        VaultCmd::Compact => {
            let secrets = vault::rewrite(&store)?;
            let (_store, done) = store.compact()?;
            match secrets {
                Some(n) => println!("vault rewritten ({n} secrets)"),
                None => println!("no vault in {}", settings.data_dir.display()),
            }
            println!(
                "database rewritten ({} records in {} trees); old files overwritten and removed",
                done.records, done.trees
            );
        }
        VaultCmd::ChangePassphrase {
            new_passphrase_file,
        } => {
            refuse_in_shared_cluster(&settings.data_dir, "vault change-passphrase")?;
            let header = vault::read_header(&store)?.ok_or(vault::VaultError::NotInitialized)?;
            if header.protection == Protection::KeyFile {
                bail!(
                    "this vault is protected by a key file, not a passphrase; use `capstan vault rotate-key --new-key-file PATH` to replace the key"
                );
            }
            let source = key_source_for(&settings, &header.protection, &pass)?;
            let mut v = Vault::open(&store, &source)?;
            let new = read_new_passphrase(new_passphrase_file)?;
            let params = match header.protection {
                Protection::Passphrase { params, .. } if params.is_at_least_minimum() => params,
                _ => Argon2Params::DEFAULT,
            };
            v.change_master_key(&KeySource::Passphrase(new), params)?;
            println!("passphrase changed");
        }
    }
    Ok(())
}

/// Refuses a key change on the data directory of a shared-state cluster node: the
/// vault key is the cluster's, and changing it on one node would not reach the others
/// (at its next start the node takes the cluster's key back, or is refused).
fn refuse_in_shared_cluster(data_dir: &std::path::Path, what: &str) -> anyhow::Result<()> {
    let marker = data_dir.join(crate::cluster::state::DIGESTS_FILE);
    if marker.exists() {
        bail!(
            "`capstan {what}` refused: {} is the data directory of a node of a shared-state cluster ({} is there), whose vault key is the cluster's; changing it on one node would not reach the others (at its next start the node would take the cluster's key back, or be refused). Changing a cluster's vault key is not supported yet. To take this node out of the cluster for good, remove {} and start it without [cluster] shared_state; nothing was changed",
            data_dir.display(),
            crate::cluster::state::DIGESTS_FILE,
            marker.display()
        );
    }
    Ok(())
}

fn read_new_passphrase(file: Option<PathBuf>) -> anyhow::Result<Secret> {
    if let Some(p) = crate::config::new_vault_passphrase() {
        return Ok(p);
    }
    if let Some(f) = file {
        return Secret::from_file(&f).with_context(|| format!("cannot read {}", f.display()));
    }
    let input = PassphraseInput::default();
    // PassphraseInput reads CAPSTAN_VAULT_PASSPHRASE first; that is the *old* one here, so
    // prompt directly.
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        bail!("give the new passphrase with --new-passphrase-file or CAPSTAN_VAULT_NEW_PASSPHRASE");
    }
    let _ = input;
    let a = rpassword::prompt_password("New vault passphrase: ")?;
    let b = rpassword::prompt_password("Repeat the new passphrase: ")?;
    if a != b {
        bail!("the passphrases do not match; nothing was changed");
    }
    Ok(Secret::from_str_owned(a))
}
