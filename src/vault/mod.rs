//! The encrypted vault: every credential Capstan holds, sealed at rest.
//!
//! Layout inside the engine's sled database:
//! - tree `vault`, key `header`: JSON [`Header`] — format, key generation, how the master
//!   key is obtained (Argon2id parameters and salt, or a key file), and the data key
//!   wrapped (sealed) under the master key.
//! - tree `secrets.g<generation>`: one record per secret, named `kind/id/field`, sealed
//!   under the data key with that name as associated data.
//!
//! Envelope encryption keeps both maintenance operations crash-safe with a single-key
//! write as the commit point:
//! - `change-passphrase` re-wraps the data key: one header write.
//! - `rotate-key` re-seals every secret into a fresh `secrets.g<N+1>` tree, flushes it, and
//!   only then writes the header that names generation N+1; the old tree is dropped last.
//!   A process killed at any point leaves a header that names a complete tree, so the
//!   vault opens with the old or the new key and nothing is lost. Leftover trees of an
//!   interrupted rotation are removed at the next open.
//!
//! A wrong master key fails at open with [`VaultError::WrongKey`]: unwrapping the data key
//! is the key check, so a wrong key never yields garbage.

pub mod crypto;

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use crypto::Argon2Params;
use crypto::{KEY_LEN, SymKey};

use crate::secret::Secret;

const META_TREE: &str = "vault";
const HEADER_KEY: &[u8] = b"header";
const SECRETS_TREE_PREFIX: &str = "secrets.g";
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
    Store(#[from] sled::Error),
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
        format!("capstan-vault/v1/secret/{}", self.0).into_bytes()
    }
}

fn data_key_aad(generation: u64) -> Vec<u8> {
    format!("capstan-vault/v1/data-key/g{generation}").into_bytes()
}

/// An open vault: holds the data key in memory (zeroized on drop).
pub struct Vault {
    db: sled::Db,
    meta: sled::Tree,
    secrets: sled::Tree,
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
pub fn read_header(db: &sled::Db) -> Result<Option<Header>> {
    let meta = db.open_tree(META_TREE)?;
    match meta.get(HEADER_KEY)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| VaultError::Corrupt(format!("unreadable header: {e}"))),
    }
}

impl Vault {
    /// Creates a new vault protected by `source`. Fails if one exists.
    pub fn init(db: &sled::Db, source: &KeySource, params: Argon2Params) -> Result<Vault> {
        if read_header(db)?.is_some() {
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
        let meta = db.open_tree(META_TREE)?;
        let secrets = db.open_tree(secrets_tree_name(1))?;
        secrets.clear()?;
        let bytes = serde_json::to_vec(&header).expect("header serializes");
        if meta
            .compare_and_swap(HEADER_KEY, None as Option<&[u8]>, Some(bytes))?
            .is_err()
        {
            return Err(VaultError::AlreadyInitialized);
        }
        db.flush()?;
        Ok(Vault {
            db: db.clone(),
            meta,
            secrets,
            master,
            data_key,
            header,
        })
    }

    /// Opens an existing vault. A wrong key fails with [`VaultError::WrongKey`].
    pub fn open(db: &sled::Db, source: &KeySource) -> Result<Vault> {
        let header = read_header(db)?.ok_or(VaultError::NotInitialized)?;
        if header.format != FORMAT {
            return Err(VaultError::Corrupt(format!(
                "vault format {} is not supported by this version of capstan (expects {FORMAT})",
                header.format
            )));
        }
        let master = master_key_for(&header.protection, source)?;
        let data_key = unwrap_data_key(&header, &master, source)?;
        let meta = db.open_tree(META_TREE)?;
        let secrets = db.open_tree(secrets_tree_name(header.generation))?;
        let vault = Vault {
            db: db.clone(),
            meta,
            secrets,
            master,
            data_key,
            header,
        };
        vault.drop_stale_generations()?;
        Ok(vault)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Seals and stores a secret under `name`, replacing any previous value.
    pub fn put(&self, name: &SecretName, value: &Secret) -> Result<()> {
        let sealed = self.data_key.seal(value.expose(), &name.aad());
        self.secrets.insert(name.as_str().as_bytes(), sealed)?;
        Ok(())
    }

    /// Opens the secret stored under `name`.
    pub fn get(&self, name: &SecretName) -> Result<Option<Secret>> {
        match self.secrets.get(name.as_str().as_bytes())? {
            None => Ok(None),
            Some(sealed) => self
                .data_key
                .open(&sealed, &name.aad())
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
        Ok(self.secrets.contains_key(name.as_str().as_bytes())?)
    }

    pub fn remove(&self, name: &SecretName) -> Result<()> {
        self.secrets.remove(name.as_str().as_bytes())?;
        Ok(())
    }

    /// Removes every secret of one record (`kind/id/…`).
    pub fn remove_record(&self, kind: &str, id: &str) -> Result<usize> {
        let prefix = format!("{kind}/{id}/");
        let mut n = 0;
        for item in self.secrets.scan_prefix(prefix.as_bytes()) {
            let (k, _) = item?;
            self.secrets.remove(k)?;
            n += 1;
        }
        Ok(n)
    }

    /// Number of secrets held.
    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Names of all secrets (the names are not secret; the values are).
    pub fn names(&self) -> Result<Vec<String>> {
        self.secrets
            .iter()
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?).into_owned()))
            .collect()
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// Generates a fresh data key and re-seals every secret under it. With `new_master`,
    /// the master key is replaced in the same commit. Crash-safe: see the module docs.
    pub fn rotate_data_key(
        &mut self,
        new_master: Option<(&KeySource, Argon2Params)>,
    ) -> Result<usize> {
        let next_gen = self.header.generation + 1;
        let next_tree = self.db.open_tree(secrets_tree_name(next_gen))?;
        next_tree.clear()?;
        let new_key = SymKey::random();
        let mut count = 0;
        for item in self.secrets.iter() {
            let (k, sealed) = item?;
            let name = SecretName(String::from_utf8_lossy(&k).into_owned());
            let plain = self.data_key.open(&sealed, &name.aad()).ok_or_else(|| {
                VaultError::Corrupt(format!(
                    "secret {} does not open; rotation aborted, nothing changed",
                    name.as_str()
                ))
            })?;
            next_tree.insert(k, new_key.seal(plain.expose(), &name.aad()))?;
            count += 1;
        }
        next_tree.flush()?;

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
        self.commit_header(&header)?;

        let old_gen = self.header.generation;
        self.header = header;
        self.master = master;
        self.secrets = next_tree;
        self.data_key = new_key;
        self.db.drop_tree(secrets_tree_name(old_gen))?;
        self.db.flush()?;
        Ok(count)
    }

    /// Re-wraps the data key under a new master key (new passphrase or key file). One
    /// header write; the secrets are untouched.
    pub fn change_master_key(&mut self, source: &KeySource, params: Argon2Params) -> Result<()> {
        let (protection, master) = new_master_key(source, params)?;
        let mut header = self.header.clone();
        header.protection = protection;
        header.wrapped_data_key =
            hex::encode(master.seal(self.data_key.bytes(), &data_key_aad(header.generation)));
        header.master_key_changed_at = Some(Utc::now());
        self.commit_header(&header)?;
        self.header = header;
        self.master = master;
        Ok(())
    }

    fn commit_header(&self, header: &Header) -> Result<()> {
        let bytes = serde_json::to_vec(header).expect("header serializes");
        self.meta.insert(HEADER_KEY, bytes)?;
        self.db.flush()?;
        Ok(())
    }

    fn drop_stale_generations(&self) -> Result<()> {
        let current = secrets_tree_name(self.header.generation);
        for name in self.db.tree_names() {
            let name = String::from_utf8_lossy(&name).into_owned();
            if name.starts_with(SECRETS_TREE_PREFIX) && name != current {
                tracing::info!(tree = %name, "removing secrets left by an interrupted key rotation");
                self.db.drop_tree(name.as_bytes())?;
            }
        }
        Ok(())
    }
}

fn secrets_tree_name(generation: u64) -> String {
    format!("{SECRETS_TREE_PREFIX}{generation}")
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

    fn db() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        (dir, db)
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
        let sealed_a = v.secrets.get(a.as_str()).unwrap().unwrap();
        v.secrets.insert(b.as_str(), sealed_a).unwrap();
        let err = v.get(&b).unwrap_err();
        assert!(err.to_string().contains("does not open"), "{err}");
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
        let before = v.secrets.get("t/7/f").unwrap().unwrap();
        assert_eq!(v.rotate_data_key(None).unwrap(), 50);
        assert_eq!(v.header().generation, 2);
        drop(v);
        let v = Vault::open(&db, &src).unwrap();
        assert_ne!(v.secrets.get("t/7/f").unwrap().unwrap(), before);
        for i in 0..50 {
            let got = v
                .get(&SecretName::new("t", &i.to_string(), "f"))
                .unwrap()
                .unwrap();
            assert_eq!(got.expose(), &vec![i as u8; 10][..]);
        }
        let names: Vec<_> = db
            .tree_names()
            .into_iter()
            .map(|n| String::from_utf8_lossy(&n).into_owned())
            .collect();
        assert!(
            !names.contains(&"secrets.g1".to_string()),
            "old generation dropped: {names:?}"
        );
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

    #[test]
    fn leftovers_of_an_interrupted_rotation_are_removed_at_open() {
        let (dir, db) = db();
        let src = key_file(dir.path());
        let v = Vault::init(&db, &src, Argon2Params::DEFAULT).unwrap();
        v.put(&SecretName::new("a", "b", "c"), &Secret::new(b"v".to_vec()))
            .unwrap();
        db.open_tree("secrets.g2")
            .unwrap()
            .insert("a/b/c", b"half-done".to_vec())
            .unwrap();
        drop(v);
        let v = Vault::open(&db, &src).unwrap();
        assert_eq!(
            v.get(&SecretName::new("a", "b", "c"))
                .unwrap()
                .unwrap()
                .expose(),
            b"v"
        );
        assert!(!db.tree_names().iter().any(|n| &n[..] == b"secrets.g2"));
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
