//! The engine's one sled database and the trees in it.
//!
//! Every persistent record lives here: the vault (header and sealed secrets, owned by
//! [`crate::vault`]), devices and their name index, API tokens. Opening goes through
//! [`Store::open`] so that a data directory already held by a running engine gives a clear
//! error instead of sled's raw lock failure.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the data directory {0} is in use by another capstan process (is `capstan serve` running?); stop it or use its HTTP API"
    )]
    Locked(PathBuf),
    #[error("cannot open the data directory {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
}

/// The open database, cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub db: sled::Db,
    pub data_dir: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the database under `data_dir/db`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Open {
            path: data_dir.to_path_buf(),
            source: e.into(),
        })?;
        restrict_permissions(data_dir);
        let path = data_dir.join("db");
        let db = sled::Config::new()
            .path(&path)
            .open()
            .map_err(|e| match &e {
                sled::Error::Io(io) if is_lock_error(io) => {
                    StoreError::Locked(data_dir.to_path_buf())
                }
                _ => StoreError::Open {
                    path: path.clone(),
                    source: e,
                },
            })?;
        Ok(Store {
            db,
            data_dir: data_dir.to_path_buf(),
        })
    }

    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

fn is_lock_error(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
        || e.raw_os_error() == Some(11)
        || e.to_string().contains("lock")
}

/// The data directory holds the vault: keep it private to the engine's user.
fn restrict_permissions(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(dir)
        && meta.permissions().mode() & 0o077 != 0
    {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
}

/// JSON (de)serialisation for records kept in trees.
pub fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize to JSON")
}
