//! The engine's shared state: what every API handler, trigger and CLI command works on.
//!
//! One [`Engine`] per process, built once from [`Settings`] with the vault open. Opening
//! is the only place that decides between "create the embedded default" and "open what
//! is there", so `serve` and the CLI commands agree on where things live.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::config::Settings;
use crate::device::{Device, DeviceError, Devices};
use crate::docker::{ConnectError, DockerClient};
use crate::secret::Secret;
use crate::store::Store;
use crate::token::Tokens;
use crate::vault::{self, Argon2Params, KeySource, Protection, Vault};

pub struct Engine {
    pub settings: Settings,
    pub store: Store,
    pub vault: Vault,
    pub tokens: Tokens,
    /// Docker connections, one client per device, opened on first use.
    pub docker: crate::docker::Pool,
    /// Notifier channels and the delivery queue.
    pub notifier: crate::notify::Notifier,
}

/// Where a passphrase may come from when the vault needs one.
#[derive(Debug, Clone, Default)]
pub struct PassphraseInput {
    /// `--passphrase-file`.
    pub file: Option<PathBuf>,
    /// `CAPSTAN_VAULT_PASSPHRASE`, as [`crate::config::vault_passphrase`] read it.
    pub given: Option<std::sync::Arc<Secret>>,
}

impl PassphraseInput {
    /// `--passphrase-file`, with the passphrase the environment gives.
    pub fn new(file: Option<PathBuf>) -> PassphraseInput {
        PassphraseInput {
            file,
            given: crate::config::vault_passphrase().map(std::sync::Arc::new),
        }
    }

    /// `CAPSTAN_VAULT_PASSPHRASE`, then `--passphrase-file`, then a prompt on a terminal.
    pub fn read(&self, prompt: &str) -> anyhow::Result<Secret> {
        if let Some(p) = &self.given {
            return Ok(Secret::new(p.expose().to_vec()));
        }
        if let Some(f) = &self.file {
            return Secret::from_file(f)
                .with_context(|| format!("cannot read passphrase file {}", f.display()));
        }
        if std::io::stdin().is_terminal() {
            let p = rpassword::prompt_password(prompt)
                .context("cannot read the passphrase from the terminal")?;
            return Ok(Secret::from_str_owned(p));
        }
        bail!(
            "the vault needs a passphrase: set CAPSTAN_VAULT_PASSPHRASE, pass --passphrase-file, or run on a terminal to be prompted"
        )
    }

    pub fn is_given(&self) -> bool {
        self.file.is_some() || self.given.is_some()
    }
}

/// What `open_or_init` created, so `serve` can tell the user once.
#[derive(Debug, Default)]
pub struct Created {
    /// The key file the new vault was created with, when not a passphrase.
    pub key_file: Option<PathBuf>,
    /// Whether that key file was generated now (rather than given, e.g. a mounted secret).
    pub key_generated: bool,
    pub vault: bool,
}

impl Engine {
    /// Opens the data directory and its vault; fails if there is no vault yet.
    pub fn open(settings: Settings, pass: &PassphraseInput) -> anyhow::Result<Engine> {
        let store = Store::open(&settings.data_dir)?;
        let header = vault::read_header(&store)?.ok_or(vault::VaultError::NotInitialized)?;
        let source = key_source_for(&settings, &header.protection, pass)?;
        let vault = Vault::open(&store, &source)?;
        let tokens = Tokens::new(&store)?;
        let notifier = crate::notify::Notifier::open(&store, settings.notify.clone())?;
        Ok(Engine {
            store,
            vault,
            tokens,
            notifier,
            docker: crate::docker::Pool::new(settings.docker.clone()),
            settings,
        })
    }

    /// Opens the data directory, creating the embedded default vault if there is none:
    /// passphrase-protected when a passphrase is given, otherwise with a generated key
    /// file (mode 0600).
    pub fn open_or_init(
        settings: Settings,
        pass: &PassphraseInput,
    ) -> anyhow::Result<(Engine, Created)> {
        let store = Store::open(&settings.data_dir)?;
        let mut created = Created::default();
        let vault = match vault::read_header(&store)? {
            Some(header) => {
                let source = key_source_for(&settings, &header.protection, pass)?;
                Vault::open(&store, &source)?
            }
            None => {
                let source = if pass.is_given() {
                    KeySource::Passphrase(pass.read("New vault passphrase: ")?)
                } else {
                    let path = settings
                        .key_file
                        .clone()
                        .unwrap_or_else(|| settings.default_key_file());
                    if !path.exists() {
                        vault::generate_key_file(&path)?;
                        created.key_generated = true;
                    }
                    created.key_file = Some(path.clone());
                    KeySource::KeyFile(path)
                };
                created.vault = true;
                Vault::init(&store, &source, Argon2Params::DEFAULT)?
            }
        };
        let tokens = Tokens::new(&store)?;
        let notifier = crate::notify::Notifier::open(&store, settings.notify.clone())?;
        Ok((
            Engine {
                store,
                vault,
                tokens,
                notifier,
                docker: crate::docker::Pool::new(settings.docker.clone()),
                settings,
            },
            created,
        ))
    }

    pub fn devices(&self) -> Result<Devices<'_>, DeviceError> {
        Devices::new(&self.store, &self.vault)
    }

    /// A bollard client for `device` over its pooled connection (SSH session, TLS or
    /// local socket), its API version negotiated on first use.
    pub async fn docker(&self, device: &Device) -> Result<bollard::Docker, ConnectError> {
        self.docker_client(device)?.docker().await
    }

    /// An engine on `dir/data` with the default settings and a generated key file, for
    /// unit tests.
    #[cfg(test)]
    pub(crate) fn scratch(dir: &std::path::Path) -> Engine {
        let settings = Settings::resolve(
            &crate::config::ConfigFile::default(),
            Some(dir.join("data")),
            None,
            None,
        )
        .expect("default settings");
        Engine::open_or_init(settings, &PassphraseInput::default())
            .expect("a scratch engine")
            .0
    }

    /// The pooled connections to `device`'s daemon, for raw requests (proxying) as well
    /// as bollard.
    pub fn docker_client(
        &self,
        device: &Device,
    ) -> Result<std::sync::Arc<DockerClient>, ConnectError> {
        self.docker.client(device, || {
            self.devices()
                .and_then(|d| d.secrets(device))
                .map_err(|e| ConnectError::Secrets {
                    device: device.name.clone(),
                    detail: e.to_string(),
                })
        })
    }
}

/// Chooses the key source the vault header asks for.
pub fn key_source_for(
    settings: &Settings,
    protection: &Protection,
    pass: &PassphraseInput,
) -> anyhow::Result<KeySource> {
    Ok(match protection {
        Protection::KeyFile => {
            let path = settings
                .key_file
                .clone()
                .unwrap_or_else(|| settings.default_key_file());
            if !path.exists() {
                bail!(
                    "this vault is protected by a key file, and {} does not exist: set CAPSTAN_VAULT_KEY_FILE or pass --key-file",
                    path.display()
                );
            }
            KeySource::KeyFile(path)
        }
        Protection::Passphrase { .. } => KeySource::Passphrase(pass.read("Vault passphrase: ")?),
    })
}
