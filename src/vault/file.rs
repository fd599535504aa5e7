//! The vault file, `DATA_DIR/vault.json`: the header and every sealed secret, replaced
//! as a whole on every change so that no superseded record outlives the change.
//!
//! A replacement writes `vault.json.new` (mode 0600) and syncs it; hard-links the live
//! file to `vault.json.old`; renames the new file over `vault.json` and syncs the
//! directory (the commit point); then overwrites `vault.json.old` with zeros, syncs and
//! removes it. A process killed at any step leaves `vault.json` complete, old or new, and
//! the next [`read`] tidies up: an uncommitted `vault.json.new` is scrubbed, a leftover
//! `vault.json.old` is scrubbed unless it still is the live file (killed between link
//! and rename), in which case only the extra name is removed.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Header, Result, VaultError};
use crate::store::{StoreError, pause_point, scrub_file, sync_dir, zero_file};

pub(super) const FILE: &str = "vault.json";
const NEW: &str = "vault.json.new";
const OLD: &str = "vault.json.old";
const FILE_FORMAT: u32 = 1;

/// The vault as stored: header and sealed secrets by name.
#[derive(Debug, Clone)]
pub struct Contents {
    pub header: Header,
    pub sealed: BTreeMap<String, Vec<u8>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    file_format: u32,
    header: Header,
    /// Sealed secrets by name, hex.
    secrets: BTreeMap<String, String>,
}

pub(super) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Reads the vault file after tidying what an interrupted replacement left; `None` when
/// there is no vault yet.
pub(super) fn read(dir: &Path) -> Result<Option<Contents>> {
    recover(dir)?;
    let live = path(dir);
    let bytes = match std::fs::read(&live) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", &live, e)),
    };
    let disk: OnDisk = serde_json::from_slice(&bytes)
        .map_err(|e| VaultError::Corrupt(format!("{} is unreadable: {e}", live.display())))?;
    if disk.file_format != FILE_FORMAT {
        return Err(VaultError::Corrupt(format!(
            "{} has file format {}; this version of capstan reads format {FILE_FORMAT}",
            live.display(),
            disk.file_format
        )));
    }
    let sealed = disk
        .secrets
        .into_iter()
        .map(|(name, hex_value)| {
            hex::decode(&hex_value)
                .map(|v| (name.clone(), v))
                .map_err(|_| VaultError::Corrupt(format!("secret {name} is not hex")))
        })
        .collect::<Result<_>>()?;
    Ok(Some(Contents {
        header: disk.header,
        sealed,
    }))
}

/// Replaces the vault file with `contents`, scrubbing the old one (module docs).
pub(super) fn write(dir: &Path, contents: &Contents) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let disk = OnDisk {
        file_format: FILE_FORMAT,
        header: contents.header.clone(),
        secrets: contents
            .sealed
            .iter()
            .map(|(k, v)| (k.clone(), hex::encode(v)))
            .collect(),
    };
    let bytes = serde_json::to_vec(&disk).expect("the vault serializes");
    let (live, new, old) = (path(dir), dir.join(NEW), dir.join(OLD));
    if new.exists() {
        scrub_file(&new)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&new)
        .map_err(|e| io("create", &new, e))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| io("write", &new, e))?;
    drop(f);
    pause_point("vault-new-written");
    let replacing = live.exists();
    if replacing {
        remove_old(&live, &old)?;
        std::fs::hard_link(&live, &old).map_err(|e| io("link", &old, e))?;
    }
    pause_point("vault-old-linked");
    std::fs::rename(&new, &live).map_err(|e| io("rename", &new, e))?;
    sync_dir(dir)?;
    pause_point("vault-replaced");
    if replacing {
        zero_file(&old)?;
        pause_point("vault-old-zeroed");
        std::fs::remove_file(&old).map_err(|e| io("remove", &old, e))?;
        sync_dir(dir)?;
    }
    Ok(())
}

fn recover(dir: &Path) -> Result<()> {
    let (live, new, old) = (path(dir), dir.join(NEW), dir.join(OLD));
    if new.exists() {
        tracing::info!("removing the uncommitted copy of an interrupted vault change");
        scrub_file(&new)?;
    }
    if old.exists() {
        if live.exists() {
            remove_old(&live, &old)?;
        } else {
            // Never happens through `write`; keep the only copy rather than scrub it.
            std::fs::rename(&old, &live).map_err(|e| io("rename", &old, e))?;
        }
        sync_dir(dir)?;
    }
    Ok(())
}

/// Removes `old`: only its name when it is still the live file, its contents otherwise.
fn remove_old(live: &Path, old: &Path) -> Result<()> {
    let meta = |p: &Path| std::fs::metadata(p).map_err(|e| io("stat", p, e));
    match std::fs::metadata(old) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("stat", old, e)),
        Ok(o) => {
            let l = meta(live)?;
            if (o.dev(), o.ino()) == (l.dev(), l.ino()) {
                std::fs::remove_file(old).map_err(|e| io("remove", old, e))
            } else {
                Ok(scrub_file(old)?)
            }
        }
    }
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> VaultError {
    VaultError::Storage(StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    })
}
