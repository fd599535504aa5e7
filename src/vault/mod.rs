//! The encrypted vault: every credential Capstan holds, sealed at rest.
//!
//! The vault is one file, `DATA_DIR/vault.json` (see [`file`]): the JSON [`Header`] —
//! format, key generation, how the master key is obtained (Argon2id parameters and salt,
//! or a key file), and the data key wrapped (sealed) under the master key — and one
//! record per secret, named `kind/id/field`, sealed under the data key with that name
//! as associated data.
//!
//! Why a file of its own and not trees in the engine's sled database: sled is
//! log-structured and keeps overwritten and removed values in old segments until its
//! garbage collection gets to them, with no way to force it. A vault in sled left every
//! superseded header (openable with the old passphrase) and every replaced or removed
//! ciphertext readable in the data directory. The vault is small (a few records per
//! device and hook), so each change rewrites the whole file and scrubs the old one: after
//! any call that changes the vault returns — put, remove, `change-passphrase`,
//! `rotate-key` — the data directory holds only the live header and ciphertexts. This
//! needs no reopening of the database in a running engine, and every path that changes a
//! secret (CLI in-process, the engine's API, hooks, plugins) gets it by construction.
//! Data directories written by older versions, with the vault in sled trees `vault` and
//! `secrets.g<N>`, are migrated when the store opens (see [`crate::store`]): the records
//! move into the file unchanged (no key is needed), then the database is compacted once.
//!
//! Envelope encryption keeps the maintenance operations cheap and crash-safe, with the
//! rename of the new file as the single commit point:
//! - `change-passphrase` re-wraps the data key under the new master key;
//! - `rotate-key` re-seals every secret under a fresh data key of generation N+1.
//!
//! A process killed at any point leaves a file that opens with the old or the new key
//! and loses nothing.
//!
//! A wrong master key fails at open with [`VaultError::WrongKey`]: unwrapping the data key
//! is the key check, so a wrong key never yields garbage.

pub mod crypto;
pub mod file;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use crypto::Argon2Params;
use crypto::{KEY_LEN, SymKey};
pub use file::Contents;

use crate::secret::Secret;
use crate::store::{Store, StoreError};

const FORMAT: u32 = 1;
const SALT_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("no vault here yet: run `capstan vault init` (or `capstan serve`, which creates one)")]
    NotInitialized,
    #[error("a vault already exists in this data directory")]
    AlreadyInitialized,
    #[error("wrong vault key: the {0} does not open this vault")]
    WrongKey(&'static str),
    #[error("this vault is protected by {expected}, but {given} was given{hint}")]
    KeySourceMismatch {
        expected: &'static str,
        given: &'static str,
        hint: &'static str,
    },
    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("passphrase rejected: {0}")]
    Passphrase(String),
    #[error("the vault is damaged: {0}")]
    Corrupt(String),
    #[error("vault storage error: {0}")]
    Storage(#[from] StoreError),
}

pub type Result<T, E = VaultError> = std::result::Result<T, E>;

/// Where the master key comes from.
pub enum KeySource {
    /// Derive the master key from a passphrase with Argon2id.
    Passphrase(Secret),
    /// Read the 256-bit master key (64 hex digits) from a file.
    KeyFile(PathBuf),
}

impl KeySource {
    fn describe(&self) -> &'static str {
        match self {
            KeySource::Passphrase(_) => "a passphrase",
            KeySource::KeyFile(_) => "a key file",
        }
    }
}

/// How this vault's master key is obtained, as recorded in the header.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Protection {
    Passphrase {
        #[serde(flatten)]
        params: Argon2Params,
        salt: String,
    },
    KeyFile,
}

/// The vault header (stored as JSON; contains no secret in the clear).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    pub generation: u64,
    pub protection: Protection,
    /// The data key sealed under the master key, hex.
    wrapped_data_key: String,
    pub created_at: DateTime<Utc>,
    pub rotated_at: Option<DateTime<Utc>>,
    pub master_key_changed_at: Option<DateTime<Utc>>,
}

impl Header {
    /// The wrapped data key as stored (hex): opens only with the master key.
    pub fn wrapped_data_key(&self) -> &str {
        &self.wrapped_data_key
    }
}

/// The name of one secret: `kind/id/field`, e.g. `device/<uuid>/password`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretName(String);

impl SecretName {
    pub fn new(kind: &str, id: &str, field: &str) -> Self {
        debug_assert!(!kind.contains('/') && !id.contains('/') && !field.contains('/'));
        SecretName(format!("{kind}/{id}/{field}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn aad(&self) -> Vec<u8> {
        aad(&self.0)
    }
}

fn aad(name: &str) -> Vec<u8> {
    format!("capstan-vault/v1/secret/{name}").into_bytes()
}

fn outside_aad(context: &str) -> Vec<u8> {
    format!("capstan-vault/v1/outside/{context}").into_bytes()
}

fn data_key_aad(generation: u64) -> Vec<u8> {
    format!("capstan-vault/v1/data-key/g{generation}").into_bytes()
}

/// An open vault: holds the data key in memory (zeroized on drop) and the sealed
/// records as they are in the file.
pub struct Vault {
    dir: PathBuf,
    /// Keeps the data directory locked for as long as the vault may write to it.
    _held: Arc<std::fs::File>,
    /// The sealed records; the lock also serialises the file's replacements.
    sealed: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Kept so a data-key rotation can re-wrap without asking for the key again; it opens
    /// nothing the data key (also in memory) does not already open.
    master: SymKey,
    data_key: SymKey,
    header: Header,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("generation", &self.header.generation)
            .finish_non_exhaustive()
    }
}

/// Reads the header without any key: for `vault status` and for choosing a key source.
pub fn read_header(store: &Store) -> Result<Option<Header>> {
    Ok(file::read(&store.data_dir)?.map(|c| c.header))
}

/// The vault exactly as stored (header and sealed bytes), without any key: for audits
/// and tests of what the data directory holds. Nothing in it opens without the key.
pub fn read_stored(store: &Store) -> Result<Option<Contents>> {
    file::read(&store.data_dir)
}

/// Makes `header` (the cluster's vault header) this data directory's vault header: for
/// a node joining a cluster. The key `source` must open it (the master key unwraps its
/// data key): a wrong passphrase or key file fails with [`VaultError::WrongKey`] and
/// nothing is written. Secrets the vault already holds (sealed under its own data key,
/// e.g. a hook secret made on the node's first start) are re-sealed under the cluster's
/// data key, which needs `source` to open this vault too; when it does not, the vault is
/// left as it is and [`VaultError::AlreadyInitialized`] says the two keys differ. The
/// new file replaces the old in one rename, as every vault change does. Returns how many
/// secrets were re-sealed.
pub fn adopt_header(store: &Store, header: &Header, source: &KeySource) -> Result<usize> {
    if header.format != FORMAT {
        return Err(VaultError::Corrupt(format!(
            "the cluster's vault format {} is not supported by this version of capstan (expects {FORMAT})",
            header.format
        )));
    }
    let master = master_key_for(&header.protection, source)?;
    let cluster_key = unwrap_data_key(header, &master, source)?;
    let mut sealed = BTreeMap::new();
    if let Some(existing) = file::read(&store.data_dir)?
        && !existing.sealed.is_empty()
    {
        let own_key = master_key_for(&existing.header.protection, source)
            .and_then(|m| unwrap_data_key(&existing.header, &m, source))
            .map_err(|_| VaultError::AlreadyInitialized)?;
        for (name, bytes) in &existing.sealed {
            let plain = own_key.open(bytes, &aad(name)).ok_or_else(|| {
                VaultError::Corrupt(format!(
                    "secret {name} does not open under this vault's key"
                ))
            })?;
            sealed.insert(name.clone(), cluster_key.seal(plain.expose(), &aad(name)));
        }
    }
    let resealed = sealed.len();
    file::write(
        &store.data_dir,
        &Contents {
            header: header.clone(),
            sealed,
        },
    )?;
    Ok(resealed)
}

/// Rewrites the vault file into a fresh one and scrubs the old (and whatever an
/// interrupted change left). Needs no key. Returns how many secrets it holds, or `None`
/// when there is no vault.
pub fn rewrite(store: &Store) -> Result<Option<usize>> {
    let Some(contents) = file::read(&store.data_dir)? else {
        return Ok(None);
    };
    file::write(&store.data_dir, &contents)?;
    Ok(Some(contents.sealed.len()))
}

/// Moves the vault of a data directory written by an older version out of the
/// database (read by the store: [`crate::store::legacy_vault`]) into the vault file
/// (unchanged: no key is needed). Called by [`Store::open`] with the data directory
/// locked; the store then compacts the old trees away.
pub(crate) fn move_out_of_database(
    dir: &Path,
    legacy: &crate::store::legacy_vault::LegacyVault,
) -> Result<()> {
    let Some(bytes) = &legacy.header else {
        return Ok(());
    };
    let header: Header = serde_json::from_slice(bytes)
        .map_err(|e| VaultError::Corrupt(format!("unreadable header in the database: {e}")))?;
    if file::read(dir)?.is_some() {
        // A migration killed after the file was written: the file is the vault.
        tracing::info!(
            "the vault file exists; dropping the older copy of the vault in the database"
        );
        return Ok(());
    }
    let sealed = legacy.secrets.get(&header.generation);
    if sealed.is_none() && header.generation != 1 {
        return Err(VaultError::Corrupt(format!(
            "the header names key generation {} but tree {} is missing",
            header.generation,
            legacy_secrets_tree_name(header.generation)
        )));
    }
    let sealed = sealed.cloned().unwrap_or_default();
    let n = sealed.len();
    file::write(dir, &Contents { header, sealed })?;
    tracing::info!(
        secrets = n,
        "moved the vault out of the database into {}",
        file::FILE
    );
    Ok(())
}

fn legacy_secrets_tree_name(generation: u64) -> String {
    format!("{}{generation}", crate::store::LEGACY_SECRETS_PREFIX.name)
}

/// A set of changes to the vault's secrets, written as one replacement of the file.
pub struct Changes<'a> {
    data_key: &'a SymKey,
    sealed: BTreeMap<String, Vec<u8>>,
    changed: bool,
}

impl Changes<'_> {
    /// Seals and stores a secret under `name`, replacing any previous value.
    pub fn put(&mut self, name: &SecretName, value: &Secret) {
        let sealed = self.data_key.seal(value.expose(), &name.aad());
        self.sealed.insert(name.0.clone(), sealed);
        self.changed = true;
    }

    /// Removes the secret under `name`; whether there was one.
    pub fn remove(&mut self, name: &SecretName) -> bool {
        let had = self.sealed.remove(name.as_str()).is_some();
        self.changed |= had;
        had
    }

    /// Removes every secret of one record (`kind/id/…`); how many there were.
    pub fn remove_record(&mut self, kind: &str, id: &str) -> usize {
        let prefix = format!("{kind}/{id}/");
        let before = self.sealed.len();
        self.sealed.retain(|k, _| !k.starts_with(&prefix));
        let n = before - self.sealed.len();
        self.changed |= n > 0;
        n
    }
}

impl Vault {
    /// Creates a new vault protected by `source`. Fails if one exists.
    pub fn init(store: &Store, source: &KeySource, params: Argon2Params) -> Result<Vault> {
        if read_header(store)?.is_some() {
            return Err(VaultError::AlreadyInitialized);
        }
        let (protection, master) = new_master_key(source, params)?;
        let data_key = SymKey::random();
        let header = Header {
            format: FORMAT,
            generation: 1,
            protection,
            wrapped_data_key: hex::encode(master.seal(data_key.bytes(), &data_key_aad(1))),
            created_at: Utc::now(),
            rotated_at: None,
            master_key_changed_at: None,
        };
        let contents = Contents {
            header,
            sealed: BTreeMap::new(),
        };
        file::write(&store.data_dir, &contents)?;
        Ok(Vault {
            dir: store.data_dir.clone(),
            _held: store.holder(),
            sealed: Mutex::new(contents.sealed),
            master,
            data_key,
            header: contents.header,
        })
    }

    /// Opens an existing vault. A wrong key fails with [`VaultError::WrongKey`].
    pub fn open(store: &Store, source: &KeySource) -> Result<Vault> {
        let contents = file::read(&store.data_dir)?.ok_or(VaultError::NotInitialized)?;
        let header = contents.header;
        if header.format != FORMAT {
            return Err(VaultError::Corrupt(format!(
                "vault format {} is not supported by this version of capstan (expects {FORMAT})",
                header.format
            )));
        }
        let master = master_key_for(&header.protection, source)?;
        let data_key = unwrap_data_key(&header, &master, source)?;
        Ok(Vault {
            dir: store.data_dir.clone(),
            _held: store.holder(),
            sealed: Mutex::new(contents.sealed),
            master,
            data_key,
            header,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    fn records(&self) -> MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.sealed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f`'s changes as one replacement of the vault file; when this returns
    /// `Ok`, no superseded ciphertext is left in the data directory. Writes nothing when
    /// `f` changed nothing.
    pub fn change<R>(&self, f: impl FnOnce(&mut Changes<'_>) -> R) -> Result<R> {
        let mut records = self.records();
        let mut changes = Changes {
            data_key: &self.data_key,
            sealed: records.clone(),
            changed: false,
        };
        let out = f(&mut changes);
        if changes.changed {
            let contents = Contents {
                header: self.header.clone(),
                sealed: changes.sealed,
            };
            file::write(&self.dir, &contents)?;
            *records = contents.sealed;
        }
        Ok(out)
    }

    /// Seals and stores a secret under `name`, replacing any previous value.
    pub fn put(&self, name: &SecretName, value: &Secret) -> Result<()> {
        self.change(|c| c.put(name, value))
    }

    /// Opens the secret stored under `name`.
    pub fn get(&self, name: &SecretName) -> Result<Option<Secret>> {
        match self.records().get(name.as_str()) {
            None => Ok(None),
            Some(sealed) => self
                .data_key
                .open(sealed, &name.aad())
                .map(Some)
                .ok_or_else(|| {
                    VaultError::Corrupt(format!(
                        "secret {} does not open (tampered or copied from another record)",
                        name.as_str()
                    ))
                }),
        }
    }

    pub fn contains(&self, name: &SecretName) -> Result<bool> {
        Ok(self.records().contains_key(name.as_str()))
    }

    pub fn remove(&self, name: &SecretName) -> Result<()> {
        self.change(|c| c.remove(name)).map(|_| ())
    }

    /// Removes every secret of one record (`kind/id/…`).
    pub fn remove_record(&self, kind: &str, id: &str) -> Result<usize> {
        self.change(|c| c.remove_record(kind, id))
    }

    /// Number of secrets held.
    pub fn len(&self) -> usize {
        self.records().len()
    }

    pub fn is_empty(&self) -> bool {
        self.records().is_empty()
    }

    /// Every secret as stored: name → sealed bytes (nonce and ciphertext), opening only
    /// with this vault's data key. What cluster mode replicates: nothing in it is clear.
    pub fn sealed_records(&self) -> BTreeMap<String, Vec<u8>> {
        self.records().clone()
    }

    /// Stores `sealed` under `name` as it is, without opening it: a record sealed by
    /// another node of the cluster under the same data key. Checked first: a record that
    /// does not open under this vault's data key (with `name` as associated data) is
    /// refused and nothing is written. Whether anything changed.
    pub fn put_sealed(&self, name: &str, sealed: &[u8]) -> Result<bool> {
        if name.split('/').count() != 3 || name.split('/').any(str::is_empty) {
            return Err(VaultError::Corrupt(format!(
                "{name:?} is not a secret name (kind/id/field)"
            )));
        }
        if self.data_key.open(sealed, &aad(name)).is_none() {
            return Err(VaultError::Corrupt(format!(
                "the sealed record {name} does not open under this vault's data key"
            )));
        }
        self.change(|c| {
            if c.sealed.get(name).map(Vec::as_slice) == Some(sealed) {
                return false;
            }
            c.sealed.insert(name.to_string(), sealed.to_vec());
            c.changed = true;
            true
        })
    }

    /// Seals `plaintext` under this vault's data key for a record kept outside the
    /// vault file (a plugin's state value as cluster mode replicates it), with
    /// `context` bound to it as associated data (in a namespace of its own: it never
    /// opens as a secret, nor a secret as it).
    pub fn seal_outside(&self, context: &str, plaintext: &[u8]) -> Vec<u8> {
        self.data_key.seal(plaintext, &outside_aad(context))
    }

    /// Opens what [`Vault::seal_outside`] sealed with the same `context`; `None` when
    /// it does not open (another data key, another context, altered bytes).
    pub fn open_outside(&self, context: &str, sealed: &[u8]) -> Option<Secret> {
        self.data_key.open(sealed, &outside_aad(context))
    }

    /// Removes the secret stored under `name` (as [`Vault::sealed_records`] names it);
    /// whether there was one.
    pub fn remove_named(&self, name: &str) -> Result<bool> {
        self.change(|c| {
            let had = c.sealed.remove(name).is_some();
            c.changed |= had;
            had
        })
    }

    /// Whether `header` (another vault's, e.g. the cluster's) wraps this vault's data
    /// key: the same wrapped bytes, so sealed records move between the two as they are.
    pub fn shares_data_key_with(&self, header: &Header) -> bool {
        self.header.wrapped_data_key == header.wrapped_data_key
            && self.header.generation == header.generation
    }

    /// Names of all secrets (the names are not secret; the values are).
    pub fn names(&self) -> Result<Vec<String>> {
        Ok(self.records().keys().cloned().collect())
    }

    /// Generates a fresh data key and re-seals every secret under it. With `new_master`,
    /// the master key is replaced in the same commit. Crash-safe: see the module docs.
    pub fn rotate_data_key(
        &mut self,
        new_master: Option<(&KeySource, Argon2Params)>,
    ) -> Result<usize> {
        let next_gen = self.header.generation + 1;
        let new_key = SymKey::random();
        let mut records = self.sealed.lock().unwrap_or_else(|p| p.into_inner());
        let mut resealed = BTreeMap::new();
        for (name, sealed) in records.iter() {
            let plain = self.data_key.open(sealed, &aad(name)).ok_or_else(|| {
                VaultError::Corrupt(format!(
                    "secret {name} does not open; rotation aborted, nothing changed"
                ))
            })?;
            resealed.insert(name.clone(), new_key.seal(plain.expose(), &aad(name)));
        }
        let count = resealed.len();

        let mut header = self.header.clone();
        let now = Utc::now();
        let master = match new_master {
            Some((source, params)) => {
                let (protection, master) = new_master_key(source, params)?;
                header.protection = protection;
                header.master_key_changed_at = Some(now);
                master
            }
            None => SymKey::from_bytes(*self.master.bytes()),
        };
        header.generation = next_gen;
        header.wrapped_data_key =
            hex::encode(master.seal(new_key.bytes(), &data_key_aad(next_gen)));
        header.rotated_at = Some(now);
        let contents = Contents {
            header,
            sealed: resealed,
        };
        file::write(&self.dir, &contents)?;
        *records = contents.sealed;
        drop(records);
        self.header = contents.header;
        self.master = master;
        self.data_key = new_key;
        Ok(count)
    }

    /// Re-wraps the data key under a new master key (new passphrase or key file). One
    /// replacement of the file; the sealed secrets are unchanged.
    pub fn change_master_key(&mut self, source: &KeySource, params: Argon2Params) -> Result<()> {
        let (protection, master) = new_master_key(source, params)?;
        let mut header = self.header.clone();
        header.protection = protection;
        header.wrapped_data_key =
            hex::encode(master.seal(self.data_key.bytes(), &data_key_aad(header.generation)));
        header.master_key_changed_at = Some(Utc::now());
        let records = self.sealed.lock().unwrap_or_else(|p| p.into_inner());
        let contents = Contents {
            header,
            sealed: records.clone(),
        };
        file::write(&self.dir, &contents)?;
        drop(records);
        self.header = contents.header;
        self.master = master;
        Ok(())
    }
}

fn new_master_key(source: &KeySource, params: Argon2Params) -> Result<(Protection, SymKey)> {
    match source {
        KeySource::Passphrase(p) => {
            validate_passphrase(p)?;
            if !params.is_at_least_minimum() {
                return Err(VaultError::Passphrase(format!(
                    "Argon2id parameters below the minimum ({} KiB, {} passes)",
                    Argon2Params::MINIMUM.m_cost_kib,
                    Argon2Params::MINIMUM.t_cost
                )));
            }
            let mut salt = [0u8; SALT_LEN];
            crypto::random_fill(&mut salt);
            let key = crypto::derive_key(p, &salt, params).map_err(VaultError::Passphrase)?;
            Ok((
                Protection::Passphrase {
                    params,
                    salt: hex::encode(salt),
                },
                key,
            ))
        }
        KeySource::KeyFile(path) => Ok((Protection::KeyFile, read_key_file(path)?)),
    }
}

fn master_key_for(protection: &Protection, source: &KeySource) -> Result<SymKey> {
    match (protection, source) {
        (Protection::Passphrase { params, salt }, KeySource::Passphrase(p)) => {
            let salt = hex::decode(salt)
                .map_err(|_| VaultError::Corrupt("header salt is not hex".into()))?;
            crypto::derive_key(p, &salt, *params).map_err(VaultError::Corrupt)
        }
        (Protection::KeyFile, KeySource::KeyFile(path)) => read_key_file(path),
        (Protection::Passphrase { .. }, other) => Err(VaultError::KeySourceMismatch {
            expected: "a passphrase",
            given: other.describe(),
            hint: ": set CAPSTAN_VAULT_PASSPHRASE, pass --passphrase-file, or run on a terminal to be prompted",
        }),
        (Protection::KeyFile, other) => Err(VaultError::KeySourceMismatch {
            expected: "a key file",
            given: other.describe(),
            hint: ": set CAPSTAN_VAULT_KEY_FILE or pass --key-file",
        }),
    }
}

fn unwrap_data_key(header: &Header, master: &SymKey, source: &KeySource) -> Result<SymKey> {
    let wrapped = hex::decode(&header.wrapped_data_key)
        .map_err(|_| VaultError::Corrupt("wrapped data key is not hex".into()))?;
    let plain = master
        .open(&wrapped, &data_key_aad(header.generation))
        .ok_or(VaultError::WrongKey(match source {
            KeySource::Passphrase(_) => "passphrase",
            KeySource::KeyFile(_) => "key file",
        }))?;
    let bytes: [u8; KEY_LEN] = plain
        .expose()
        .try_into()
        .map_err(|_| VaultError::Corrupt("data key has the wrong length".into()))?;
    Ok(SymKey::from_bytes(bytes))
}

fn validate_passphrase(p: &Secret) -> Result<()> {
    if p.expose().len() < 8 {
        return Err(VaultError::Passphrase("use at least 8 characters".into()));
    }
    Ok(())
}

/// Reads a key file: 64 hex digits, optionally followed by a newline.
pub fn read_key_file(path: &Path) -> Result<SymKey> {
    let err = |reason: String| VaultError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?,
    );
    let hex_part = text.trim();
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    hex::decode_to_slice(hex_part, &mut bytes[..]).map_err(|_| {
        err(format!(
            "expected {} hex digits (as `capstan vault init` writes)",
            KEY_LEN * 2
        ))
    })?;
    warn_if_readable_by_others(path);
    Ok(SymKey::from_bytes(*bytes))
}

/// Writes a new random key file with mode 0600. Refuses to overwrite an existing file.
pub fn generate_key_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |reason: String| VaultError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("cannot create its directory: {e}")))?;
    }
    let key = SymKey::random();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| err(format!("cannot create it: {e}")))?;
    let text = Zeroizing::new(format!("{}\n", hex::encode(key.bytes())));
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| err(format!("cannot write it: {e}")))?;
    Ok(())
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "vault key file is readable by group or others; run `chmod 600` on it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    fn key_file(dir: &Path) -> KeySource {
        let p = dir.join("vault.key");
        generate_key_file(&p).unwrap();
        KeySource::KeyFile(p)
    }

    fn pass(s: &str) -> KeySource {
        KeySource::Passphrase(Secret::from_str_owned(s.into()))
    }

    #[test]
    fn secrets_round_trip_and_survive_reopening() {
        let (dir, db) = db();
        let src = key_file(dir.path());
        let v = Vault::init(&db, &src, Argon2Params::DEFAULT).unwrap();
        let name = SecretName::new("device", "abc", "password");
        v.put(&name, &Secret::from_str_owned("s3cret".into()))
            .unwrap();
        drop(v);
        let v = Vault::open(&db, &src).unwrap();
        assert_eq!(v.get(&name).unwrap().unwrap().expose(), b"s3cret");
        assert!(
            v.get(&SecretName::new("device", "abc", "other"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn adopting_a_clusters_header_reseals_own_secrets_when_the_same_key_opens_both() {
        // Two vaults on one key file: each has a data key of its own.
        let (dir_a, a) = db();
        let src = key_file(dir_a.path());
        Vault::init(&a, &src, Argon2Params::DEFAULT).unwrap();
        let (_dir_b, b) = db();
        let vb = Vault::init(&b, &src, Argon2Params::DEFAULT).unwrap();
        let name = SecretName::new("hook", "deploy", "secret");
        vb.put(&name, &Secret::from_str_owned("whsec-b".into()))
            .unwrap();
        drop(vb);
        let cluster = read_header(&a).unwrap().unwrap();
        assert_ne!(
            read_header(&b).unwrap().unwrap().wrapped_data_key(),
            cluster.wrapped_data_key()
        );
        assert_eq!(adopt_header(&b, &cluster, &src).unwrap(), 1);
        let stored = read_stored(&b).unwrap().unwrap();
        assert_eq!(stored.header.wrapped_data_key(), cluster.wrapped_data_key());
        // The secret is kept, sealed under the cluster's data key: a's key opens it.
        let va = Vault::open(&a, &src).unwrap();
        va.put_sealed(name.as_str(), &stored.sealed[name.as_str()])
            .unwrap();
        assert_eq!(va.get(&name).unwrap().unwrap().expose(), b"whsec-b");
        assert_eq!(
            Vault::open(&b, &src)
                .unwrap()
                .get(&name)
                .unwrap()
                .unwrap()
                .expose(),
            b"whsec-b"
        );

        // A vault whose own key is another one is left as it is.
        let (dir_c, c) = db();
        let other = key_file(dir_c.path());
        let vc = Vault::init(&c, &other, Argon2Params::DEFAULT).unwrap();
        vc.put(&name, &Secret::from_str_owned("whsec-c".into()))
            .unwrap();
        drop(vc);
        let before = read_stored(&c).unwrap().unwrap();
        let err = adopt_header(&c, &cluster, &src).unwrap_err();
        assert!(matches!(err, VaultError::AlreadyInitialized), "{err}");
        assert_eq!(
            read_stored(&c).unwrap().unwrap().header.wrapped_data_key(),
            before.header.wrapped_data_key()
        );
    }

    #[test]
    fn a_wrong_key_file_fails_with_wrong_vault_key() {
        let (dir, db) = db();
        Vault::init(&db, &key_file(dir.path()), Argon2Params::DEFAULT).unwrap();
        let other = dir.path().join("other.key");
        generate_key_file(&other).unwrap();
        let err = Vault::open(&db, &KeySource::KeyFile(other)).unwrap_err();
        assert!(err.to_string().starts_with("wrong vault key"), "{err}");
    }

    #[test]
    fn a_wrong_passphrase_fails_with_wrong_vault_key_and_params_are_recorded() {
        let (_dir, db) = db();
        Vault::init(&db, &pass("correct horse"), Argon2Params::DEFAULT).unwrap();
        let err = Vault::open(&db, &pass("wrong horse")).unwrap_err();
        assert!(matches!(err, VaultError::WrongKey("passphrase")), "{err}");
        Vault::open(&db, &pass("correct horse")).unwrap();
        let h = read_header(&db).unwrap().unwrap();
        match h.protection {
            Protection::Passphrase { params, salt } => {
                assert!(params.m_cost_kib >= 64 * 1024 && params.t_cost >= 3);
                assert_eq!(salt.len(), SALT_LEN * 2);
            }
            other => panic!("unexpected protection {other:?}"),
        }
    }

    #[test]
    fn a_key_of_the_other_kind_is_refused_with_a_hint() {
        let (_dir, db) = db();
        Vault::init(&db, &pass("correct horse"), Argon2Params::DEFAULT).unwrap();
        let err = Vault::open(&db, &KeySource::KeyFile("/nonexistent".into())).unwrap_err();
        assert!(
            err.to_string().contains("protected by a passphrase"),
            "{err}"
        );
    }

    #[test]
    fn short_passphrases_and_weak_parameters_are_refused() {
        let (_dir, db) = db();
        assert!(matches!(
            Vault::init(&db, &pass("short"), Argon2Params::DEFAULT),
            Err(VaultError::Passphrase(_))
        ));
        let weak = Argon2Params {
            m_cost_kib: 1024,
            t_cost: 1,
            p_cost: 1,
        };
        assert!(matches!(
            Vault::init(&db, &pass("long enough"), weak),
            Err(VaultError::Passphrase(_))
        ));
    }

    #[test]
    fn a_ciphertext_copied_onto_another_record_does_not_open() {
        let (dir, db) = db();
        let v = Vault::init(&db, &key_file(dir.path()), Argon2Params::DEFAULT).unwrap();
        let a = SecretName::new("device", "a", "password");
        let b = SecretName::new("device", "b", "password");
        v.put(&a, &Secret::from_str_owned("alpha".into())).unwrap();
        v.put(&b, &Secret::from_str_owned("beta".into())).unwrap();
        let sealed_a = v.records()[a.as_str()].clone();
        v.records().insert(b.as_str().to_string(), sealed_a);
        let err = v.get(&b).unwrap_err();
        assert!(err.to_string().contains("does not open"), "{err}");
    }

    #[test]
    fn a_value_sealed_outside_opens_only_in_its_context_and_never_as_a_secret() {
        let (dir, db) = db();
        let v = Vault::init(&db, &key_file(dir.path()), Argon2Params::DEFAULT).unwrap();
        let sealed = v.seal_outside("pstate.p.k", b"3 restarts");
        assert!(!sealed.windows(10).any(|w| w == b"3 restarts"));
        assert_eq!(
            v.open_outside("pstate.p.k", &sealed).unwrap().expose(),
            b"3 restarts"
        );
        assert!(v.open_outside("pstate.p.other", &sealed).is_none());
        // Not a secret of any name, nor a secret's ciphertext a value outside.
        assert!(v.put_sealed("device/a/password", &sealed).is_err());
        let name = SecretName::new("device", "a", "password");
        v.put(&name, &Secret::from_str_owned("alpha".into()))
            .unwrap();
        let secret = v.sealed_records()[name.as_str()].clone();
        assert!(v.open_outside(name.as_str(), &secret).is_none());
    }

    #[test]
    fn rotation_reseals_every_secret_under_a_new_generation() {
        let (dir, db) = db();
        let src = key_file(dir.path());
        let mut v = Vault::init(&db, &src, Argon2Params::DEFAULT).unwrap();
        for i in 0..50 {
            v.put(
                &SecretName::new("t", &i.to_string(), "f"),
                &Secret::new(vec![i as u8; 10]),
            )
            .unwrap();
        }
        let before = v.records()["t/7/f"].clone();
        assert_eq!(v.rotate_data_key(None).unwrap(), 50);
        assert_eq!(v.header().generation, 2);
        drop(v);
        let v = Vault::open(&db, &src).unwrap();
        assert_ne!(v.records()["t/7/f"], before);
        for i in 0..50 {
            let got = v
                .get(&SecretName::new("t", &i.to_string(), "f"))
                .unwrap()
                .unwrap();
            assert_eq!(got.expose(), &vec![i as u8; 10][..]);
        }
    }

    #[test]
    fn changing_the_passphrase_keeps_every_secret_and_retires_the_old_one() {
        let (_dir, db) = db();
        let mut v = Vault::init(&db, &pass("first passphrase"), Argon2Params::DEFAULT).unwrap();
        let n = SecretName::new("device", "x", "password");
        v.put(&n, &Secret::from_str_owned("kept".into())).unwrap();
        v.change_master_key(&pass("second passphrase"), Argon2Params::DEFAULT)
            .unwrap();
        drop(v);
        assert!(matches!(
            Vault::open(&db, &pass("first passphrase")),
            Err(VaultError::WrongKey(_))
        ));
        let v = Vault::open(&db, &pass("second passphrase")).unwrap();
        assert_eq!(v.get(&n).unwrap().unwrap().expose(), b"kept");
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Every file under `dir` that holds `needle` raw or hex-encoded.
    fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
        let hexed = hex::encode(needle).into_bytes();
        let mut hits = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let bytes = std::fs::read(&p).unwrap();
                    if contains(&bytes, needle) || contains(&bytes, &hexed) {
                        hits.push(p);
                    }
                }
            }
        }
        hits
    }

    #[test]
    fn every_change_leaves_only_the_live_ciphertexts_in_the_data_directory() {
        let (dir, store) = db();
        let src = key_file(dir.path());
        let v = Vault::init(&store, &src, Argon2Params::DEFAULT).unwrap();
        let (a, b) = (
            SecretName::new("d", "1", "p"),
            SecretName::new("d", "2", "p"),
        );
        v.put(&a, &Secret::new(b"first".to_vec())).unwrap();
        v.put(&b, &Secret::new(b"other".to_vec())).unwrap();
        let first = v.records()[a.as_str()].clone();
        v.put(&a, &Secret::new(b"second".to_vec())).unwrap();
        let second = v.records()[a.as_str()].clone();
        assert!(
            !files_holding(dir.path(), &second).is_empty(),
            "the scan finds live records"
        );
        assert!(
            files_holding(dir.path(), &first).is_empty(),
            "replaced value left"
        );
        v.change(|c| {
            c.remove(&a);
            c.put(
                &SecretName::new("d", "3", "p"),
                &Secret::new(b"third".to_vec()),
            );
        })
        .unwrap();
        assert!(
            files_holding(dir.path(), &second).is_empty(),
            "removed value left"
        );
        assert_eq!(v.get(&b).unwrap().unwrap().expose(), b"other");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("vault.json"))
            .collect();
        assert_eq!(
            names,
            ["vault.json"],
            "no copy of the vault besides the live file"
        );
    }

    #[test]
    fn a_vault_kept_in_the_database_by_an_older_version_moves_into_the_file_and_leaves_nothing_behind()
     {
        let dir = tempfile::tempdir().unwrap();
        let src = key_file(dir.path());
        let KeySource::KeyFile(path) = &src else {
            unreachable!()
        };
        let master = read_key_file(path).unwrap();
        // The layout older versions wrote: header in tree `vault`, secrets in
        // `secrets.g<generation>`, with superseded records still in sled's log.
        let data_key = SymKey::random();
        let header = Header {
            format: FORMAT,
            generation: 2,
            protection: Protection::KeyFile,
            wrapped_data_key: hex::encode(master.seal(data_key.bytes(), &data_key_aad(2))),
            created_at: Utc::now(),
            rotated_at: Some(Utc::now()),
            master_key_changed_at: None,
        };
        let name = SecretName::new("device", "x", "password");
        let replaced = data_key.seal(b"old password", &name.aad());
        let live = data_key.seal(b"new password", &name.aad());
        let removed = data_key.seal(b"gone", &SecretName::new("device", "y", "password").aad());
        let stale = data_key.seal(b"stale generation", &name.aad());
        {
            let db = crate::store::open_raw(&dir.path().join("db"));
            db.open_tree("vault")
                .unwrap()
                .insert("header", serde_json::to_vec(&header).unwrap())
                .unwrap();
            let g2 = db.open_tree("secrets.g2").unwrap();
            g2.insert(name.as_str(), replaced.clone()).unwrap();
            g2.insert("device/y/password", removed.clone()).unwrap();
            db.flush().unwrap();
            g2.insert(name.as_str(), live.clone()).unwrap();
            g2.remove("device/y/password").unwrap();
            db.open_tree("secrets.g1")
                .unwrap()
                .insert(name.as_str(), stale.clone())
                .unwrap();
            db.open_tree("devices")
                .unwrap()
                .insert("k", b"device record".to_vec())
                .unwrap();
            db.flush().unwrap();
        }
        assert!(
            !files_holding(dir.path(), &replaced).is_empty(),
            "the old layout keeps it"
        );

        let store = Store::open(dir.path()).unwrap();
        for n in store.db.tree_names() {
            assert!(
                &n[..] != b"vault" && !n.starts_with(b"secrets.g"),
                "{n:?} left"
            );
        }
        assert_eq!(
            &store.tree("devices").unwrap().get("k").unwrap().unwrap()[..],
            b"device record"
        );
        let v = Vault::open(&store, &src).unwrap();
        assert_eq!(v.header().generation, 2);
        assert_eq!(v.names().unwrap(), [name.as_str()]);
        assert_eq!(v.get(&name).unwrap().unwrap().expose(), b"new password");
        for gone in [&replaced, &removed, &stale] {
            let hits = files_holding(dir.path(), gone);
            assert!(hits.is_empty(), "superseded ciphertext in {hits:?}");
        }
        assert_eq!(
            files_holding(dir.path(), &live),
            [dir.path().join("vault.json")]
        );
        drop((v, store));
        // Opening again changes nothing.
        let store = Store::open(dir.path()).unwrap();
        let v = Vault::open(&store, &src).unwrap();
        assert_eq!(v.get(&name).unwrap().unwrap().expose(), b"new password");
    }

    #[test]
    fn key_files_are_created_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        generate_key_file(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(generate_key_file(&p).is_err());
        std::fs::write(dir.path().join("bad"), "not hex").unwrap();
        let err = read_key_file(&dir.path().join("bad")).unwrap_err();
        assert!(err.to_string().contains("hex digits"), "{err}");
    }
}
