//! The engine's one sled database, every tree in it, the storage operations the engine
//! performs on them, and the data directory around it.
//!
//! Every persistent record but the vault lives here: devices and their name index, API
//! tokens, runs, plugin records, webhook deliveries ([`TREES`] lists each tree with its
//! key and value encoding). Nothing outside this module touches sled: each record family
//! has a type here with narrow, typed operations on the engine's own types —
//! [`devices::DeviceRecords`], [`tokens::TokenRecords`], [`runs::RunHistory`],
//! [`plugins::PluginRecords`], [`plugins::PluginState`], [`plugins::Audit`],
//! [`deliveries::Deliveries`] — and every atomic change (a device and its name, a run and
//! its indexes, a state value and its running size, a delivery claim) is one operation,
//! done in one sled transaction or compare-and-swap.
//!
//! Why concrete sled-backed types and not a trait per record family: there is one
//! backend today, and a trait now would fix the operations before a second backend has
//! said what it can do atomically (NATS JetStream KV has per-key compare-and-set by
//! revision, but no transaction over several keys, so "a run and its indexes" may
//! become one key plus derived views there). The seam is the operation set: callers
//! name only these types and their methods, never a tree, key layout or sled type, so a
//! cluster backend implements the same methods (then a trait, or an enum of backends,
//! is extracted from them) without touching a caller.
//!
//! The vault (header and sealed secrets) is a file of its own, owned by
//! [`crate::vault`], because sled is log-structured: an overwritten or removed value
//! stays in old log segments until sled's own garbage collection rewrites them, and sled
//! offers no way to force that. A vault kept in sled would keep every superseded header
//! (openable with an old passphrase) and every superseded ciphertext readable in the
//! data directory.
//!
//! Opening goes through [`Store::open`], which
//! - takes an exclusive lock on `DATA_DIR/lock` for as long as any clone of the store
//!   lives, so a data directory already held by a running engine gives a clear error
//!   instead of sled's raw lock failure, and no two processes ever repair or rewrite it
//!   at the same time;
//! - finishes or undoes an interrupted [compaction](Store::compact) (see below);
//! - moves the vault records of a data directory written by an older version out of the
//!   database into the vault file, then compacts the database once so that no copy of
//!   them is left in its log.
//!
//! Compaction copies every live record into a fresh database and replaces the old one,
//! crash-safely: the copy is built in `db.compact`, flushed and renamed to `db.next`
//! (the commit point: a complete copy); then `db` becomes `db.old`, `db.next` becomes
//! `db`, and `db.old` is overwritten with zeros and removed. A process killed at any step
//! leaves a directory that the next open repairs: an incomplete `db.compact` is removed,
//! a complete `db.next` is moved into place, a leftover `db.old` is scrubbed. No step
//! loses a record, because the old database is removed only once the new one is in place.
//!
//! Overwriting old files with zeros before removing them is the most a process can do;
//! a copy-on-write filesystem, snapshots or an SSD's wear levelling may still keep the
//! freed blocks, which is outside what Capstan controls.

pub mod commit;
pub mod deliveries;
pub mod devices;
pub mod legacy_vault;
pub mod notifiers;
pub mod plugins;
pub mod runs;
pub mod tokens;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    #[error(
        "cannot {what} {path}: {source}; check the data directory's permissions and free space"
    )]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make records durable: {0}")]
    Flush(String),
    #[error("cannot move the vault out of the database in {path}: {reason}")]
    Migration { path: PathBuf, reason: String },
}

/// One tree of the database: its name, and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tree {
    pub name: &'static str,
    /// What a record is: its key and its value, and their encodings.
    pub holds: &'static str,
}

/// Devices: device id (the UUID's 16 bytes) → [`crate::device::Device`] as JSON.
pub const DEVICES: Tree = Tree {
    name: "devices",
    holds: "device id (16 UUID bytes) → the device record (Device) as JSON",
};
/// The device name index: name (UTF-8) → device id (16 UUID bytes).
pub const DEVICE_NAMES: Tree = Tree {
    name: "device_names",
    holds: "device name (UTF-8) → device id (16 UUID bytes)",
};
/// API tokens: SHA-256 of the whole token (32 bytes) → [`crate::token::TokenInfo`] as JSON.
pub const API_TOKENS: Tree = Tree {
    name: "api_tokens",
    holds: "SHA-256 of the token (32 bytes) → TokenInfo as JSON",
};
/// Run records: run id (16 bytes, UUIDv7: key order is time order) → `RunRecord` JSON.
pub const RUNS: Tree = Tree {
    name: "runs",
    holds: "run id (16 UUIDv7 bytes, time-ordered) → the run record (RunRecord) as JSON",
};
/// Runs per plugin: `plugin \0 run id` → empty.
pub const RUNS_BY_PLUGIN: Tree = Tree {
    name: "runs_by_plugin",
    holds: "plugin name (UTF-8), NUL, run id (16 bytes) → empty",
};
/// Queued and running runs: run id → plugin name.
pub const RUNS_ACTIVE: Tree = Tree {
    name: "runs_active",
    holds: "run id (16 bytes) of a queued or running run → plugin name (UTF-8)",
};
/// The audit log of host calls.
pub const AUDIT: Tree = Tree {
    name: "audit",
    holds: "time (u64 nanoseconds, big-endian) and a sequence number (u64, big-endian) → AuditRecord as JSON",
};
/// Plugins' key-value state.
pub const PLUGIN_STATE: Tree = Tree {
    name: "plugin_state",
    holds: "plugin name (UTF-8), NUL, state key (UTF-8) → the value's bytes, as the plugin gave them",
};
/// The bytes each plugin's state takes.
pub const PLUGIN_STATE_SIZE: Tree = Tree {
    name: "plugin_state_size",
    holds: "plugin name (UTF-8) → bytes its state's keys and values take (u64, big-endian)",
};
/// Installed plugins.
pub const PLUGINS: Tree = Tree {
    name: "plugins",
    holds: "plugin name (UTF-8) → InstalledPlugin as JSON",
};
/// Webhook delivery ids already accepted.
pub const WEBHOOK_DELIVERIES: Tree = Tree {
    name: "webhook_deliveries",
    holds: "hook name (UTF-8), NUL, the sender's delivery id → when it was accepted, when it expires and its run id, as JSON",
};
/// Verified webhook signatures already accepted.
pub const WEBHOOK_SIGNATURES: Tree = Tree {
    name: "webhook_signatures",
    holds: "hook name (UTF-8), NUL, hex SHA-256 of the verified signature → as webhook_deliveries",
};
/// Notifier channels (their URLs are sealed in the vault).
pub const NOTIFIERS: Tree = Tree {
    name: "notifiers",
    holds: "channel name (UTF-8) → NotifierInfo as JSON (service and host; the URL is in the vault)",
};
/// The vault header of versions before the vault file; moved out at open.
pub const LEGACY_VAULT: Tree = Tree {
    name: "vault",
    holds: "(older versions only; moved into the vault file at open) `header` → the vault header as JSON",
};
/// The sealed secrets of versions before the vault file, one tree per key generation
/// (`secrets.g1`, `secrets.g2`, …); moved out at open.
pub const LEGACY_SECRETS_PREFIX: Tree = Tree {
    name: "secrets.g",
    holds: "(older versions only; moved into the vault file at open; the name is a prefix, then the key generation) secret name `kind/id/field` → ciphertext",
};

/// Every tree the engine keeps, each named once.
pub const TREES: &[Tree] = &[
    DEVICES,
    DEVICE_NAMES,
    API_TOKENS,
    RUNS,
    RUNS_BY_PLUGIN,
    RUNS_ACTIVE,
    AUDIT,
    PLUGIN_STATE,
    PLUGIN_STATE_SIZE,
    PLUGINS,
    WEBHOOK_DELIVERIES,
    WEBHOOK_SIGNATURES,
    NOTIFIERS,
    LEGACY_VAULT,
    LEGACY_SECRETS_PREFIX,
];

/// The lock file that marks a data directory as held by one process.
const LOCK_FILE: &str = "lock";
pub(crate) const DB_DIR: &str = "db";
/// A compaction's copy while it is being written.
const DB_COMPACT: &str = "db.compact";
/// A compaction's complete copy, not yet in place.
const DB_NEXT: &str = "db.next";
/// The database a compaction replaced, until it is scrubbed.
const DB_OLD: &str = "db.old";

/// The environment variable of the crash-safety tests: naming one of [`PAUSE_STEPS`]
/// makes the process stop there (saying so on stderr) until it is killed.
pub const PAUSE_ENV: &str = "CAPSTAN_TEST_PAUSE_AT";

/// Every step at which [`PAUSE_ENV`] can stop a process: the moments between the writes
/// of a vault file replacement and of a database compaction.
pub const PAUSE_STEPS: &[&str] = &[
    "vault-new-written",
    "vault-old-linked",
    "vault-replaced",
    "vault-old-zeroed",
    "db-copy-started",
    "db-copied",
    "db-next-ready",
    "db-old-moved",
    "db-replaced",
    "db-old-zeroed",
];

/// Stops here when the crash-safety tests ask for it (see [`PAUSE_ENV`]); nothing
/// otherwise.
pub(crate) fn pause_point(step: &'static str) {
    debug_assert!(PAUSE_STEPS.contains(&step), "unlisted pause step {step}");
    if crate::config::test_pause_at().is_some_and(|v| v == step) {
        eprintln!("capstan: paused at {step}");
        loop {
            std::thread::park();
        }
    }
}

/// The open database, cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub db: sled::Db,
    pub data_dir: PathBuf,
    /// Flushes for [`Store::durable`], shared by every clone.
    commit: Arc<commit::GroupCommit>,
    /// Held (locked) while any clone lives.
    _lock: Arc<File>,
}

/// What a compaction copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    pub trees: usize,
    pub records: usize,
}

impl Store {
    /// Opens (creating if needed) the data directory and its database under
    /// `data_dir/db`, repairing an interrupted compaction and moving an older version's
    /// vault records out of the database (see the module docs).
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| io_err("create", data_dir, e))?;
        restrict_permissions(data_dir);
        let lock = lock_data_dir(data_dir)?;
        recover(data_dir)?;
        let mut db = open_db(data_dir)?;
        let legacy = legacy_vault::LegacyVault::read(&db)?;
        if let Some(legacy) = legacy {
            crate::vault::move_out_of_database(data_dir, &legacy).map_err(|e| {
                StoreError::Migration {
                    path: data_dir.to_path_buf(),
                    reason: e.to_string(),
                }
            })?;
            tracing::info!(
                "the vault moved out of the database into its own file; compacting the database so no copy of it is left"
            );
            drop(db);
            compact_dir(data_dir, legacy.trees())?;
            db = open_db(data_dir)?;
        }
        commit::replay(data_dir, &db)?;
        Ok(Store {
            commit: Arc::new(commit::GroupCommit::new(db.clone(), data_dir)),
            db,
            data_dir: data_dir.to_path_buf(),
            _lock: Arc::new(lock),
        })
    }

    /// A tree by name: for the record types of this module, and for storage tests
    /// that look at raw records. Engine code uses the record types.
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    fn open_tree(&self, t: Tree) -> Result<sled::Tree, StoreError> {
        self.tree(t.name)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Returns once every write journaled before the call ([`Store::journal`]) is on
    /// disk, sharing one journal write with everyone else waiting (group commit,
    /// [`commit`]).
    pub async fn durable(&self) -> Result<(), StoreError> {
        self.commit.durable().await
    }

    /// The journal, for the record types of this module whose writes
    /// [`Store::durable`] must cover.
    pub(crate) fn journal(&self) -> Arc<commit::GroupCommit> {
        self.commit.clone()
    }

    /// Journal writes [`Store::durable`] has started so far (each makes a group durable).
    pub fn flushes(&self) -> u64 {
        self.commit.flushes()
    }

    /// Time the journal writes of [`Store::flushes`] took (write and `fdatasync`).
    pub fn journal_busy(&self) -> std::time::Duration {
        self.commit.busy()
    }

    /// The data directory's lock, for what writes to the directory beside the database
    /// (the vault file) and may outlive this handle.
    pub(crate) fn holder(&self) -> Arc<File> {
        self._lock.clone()
    }

    /// Rewrites every live record into a fresh database and scrubs the old files, so
    /// that nothing overwritten or removed stays in sled's log. Crash-safe (module docs).
    ///
    /// The caller must hold no other clone of this store nor any tree of it: they would
    /// keep the old database open.
    pub fn compact(self) -> Result<(Store, Compacted), StoreError> {
        let Store {
            db,
            data_dir,
            commit,
            _lock,
        } = self;
        // The flush thread holds the database open too: stopped first.
        drop(commit);
        drop(db);
        let done = compact_dir(&data_dir, &[])?;
        let db = open_db(&data_dir)?;
        Ok((
            Store {
                commit: Arc::new(commit::GroupCommit::new(db.clone(), &data_dir)),
                db,
                data_dir,
                _lock,
            },
            done,
        ))
    }
}

/// How long to wait for sled's own lock when the data directory's lock is ours.
const SLED_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens sled under `data_dir/db`. The caller holds the data directory's lock, so sled's
/// own lock can only be held by a handle of this process that is still closing (sled
/// finishes its background writes after the last handle is dropped) or by a process of
/// an older version that took no directory lock: wait a little for the first, then
/// report the directory as in use.
#[allow(clippy::disallowed_methods)] // the one place that opens the database
fn open_db(data_dir: &Path) -> Result<sled::Db, StoreError> {
    let path = data_dir.join(DB_DIR);
    let started = std::time::Instant::now();
    loop {
        match sled::Config::new().path(&path).open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(io)) if is_lock_error(&io) => {
                if started.elapsed() > SLED_RELEASE_WAIT {
                    return Err(StoreError::Locked(data_dir.to_path_buf()));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(StoreError::Open { path, source: e }),
        }
    }
}

fn lock_data_dir(data_dir: &Path) -> Result<File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io_err("open", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked(data_dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err("lock", &path, e)),
    }
}

/// Brings a directory left by an interrupted compaction back to one database.
fn recover(data_dir: &Path) -> Result<(), StoreError> {
    let (db, next, old) = (
        data_dir.join(DB_DIR),
        data_dir.join(DB_NEXT),
        data_dir.join(DB_OLD),
    );
    let partial = data_dir.join(DB_COMPACT);
    if partial.exists() {
        tracing::info!("removing the incomplete copy of an interrupted database compaction");
        scrub_dir(&partial)?;
    }
    if next.exists() {
        tracing::info!("finishing an interrupted database compaction");
        if db.exists() {
            if old.exists() {
                scrub_dir(&old)?;
            }
            rename(&db, &old)?;
        }
        rename(&next, &db)?;
        sync_dir(data_dir)?;
    }
    if old.exists() {
        scrub_dir(&old)?;
    }
    Ok(())
}

/// Copies every tree but `leave_out` of the (closed) database into a fresh one and puts
/// it in place of the old, which is scrubbed. The caller holds the data directory's lock.
#[allow(clippy::disallowed_methods)] // the store writes its compacted copy itself
fn compact_dir(data_dir: &Path, leave_out: &[sled::IVec]) -> Result<Compacted, StoreError> {
    let partial = data_dir.join(DB_COMPACT);
    if partial.exists() {
        scrub_dir(&partial)?;
    }
    let mut done = Compacted::default();
    {
        let old = open_db(data_dir)?;
        let new = sled::Config::new()
            .path(&partial)
            .create_new(true)
            .open()
            .map_err(|e| StoreError::Open {
                path: partial.clone(),
                source: e,
            })?;
        pause_point("db-copy-started");
        for name in old.tree_names() {
            if leave_out.contains(&name) {
                continue;
            }
            let from = old.open_tree(&name)?;
            let to = new.open_tree(&name)?;
            let mut batch = sled::Batch::default();
            let mut in_batch = 0;
            for item in from.iter() {
                let (k, v) = item?;
                batch.insert(k, v);
                in_batch += 1;
                done.records += 1;
                if in_batch == 1024 {
                    to.apply_batch(std::mem::take(&mut batch))?;
                    in_batch = 0;
                }
            }
            to.apply_batch(batch)?;
            done.trees += 1;
        }
        new.flush()?;
    }
    sync_tree(&partial)?;
    pause_point("db-copied");
    let next = data_dir.join(DB_NEXT);
    rename(&partial, &next)?;
    sync_dir(data_dir)?;
    pause_point("db-next-ready");
    let (db, old) = (data_dir.join(DB_DIR), data_dir.join(DB_OLD));
    rename(&db, &old)?;
    pause_point("db-old-moved");
    rename(&next, &db)?;
    sync_dir(data_dir)?;
    pause_point("db-replaced");
    scrub_dir(&old)?;
    Ok(done)
}

fn rename(from: &Path, to: &Path) -> Result<(), StoreError> {
    std::fs::rename(from, to).map_err(|e| io_err("rename", from, e))
}

fn io_err(what: &'static str, path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Makes a directory's entries (created, renamed, removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("sync", dir, e))
}

/// Syncs every file and directory under `dir`.
fn sync_tree(dir: &Path) -> Result<(), StoreError> {
    for entry in std::fs::read_dir(dir).map_err(|e| io_err("read", dir, e))? {
        let path = entry.map_err(|e| io_err("read", dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err("sync", &path, e))?;
        }
    }
    sync_dir(dir)
}

/// Overwrites a file with zeros (synced) before removing it, so its old contents are
/// not left in the blocks it frees (on filesystems that overwrite in place).
pub(crate) fn scrub_file(path: &Path) -> Result<(), StoreError> {
    zero_file(path)?;
    std::fs::remove_file(path).map_err(|e| io_err("remove", path, e))
}

/// Overwrites a file's contents with zeros and syncs it; keeps the file.
pub(crate) fn zero_file(path: &Path) -> Result<(), StoreError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_err("open", path, e))?;
    let len = f.metadata().map_err(|e| io_err("stat", path, e))?.len();
    let zeros = [0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])
            .map_err(|e| io_err("overwrite", path, e))?;
        left -= n as u64;
    }
    f.sync_all().map_err(|e| io_err("sync", path, e))
}

/// Scrubs every file under `dir`, then removes it.
fn scrub_dir(dir: &Path) -> Result<(), StoreError> {
    fn zero_all(dir: &Path) -> Result<(), StoreError> {
        for entry in std::fs::read_dir(dir).map_err(|e| io_err("read", dir, e))? {
            let path = entry.map_err(|e| io_err("read", dir, e))?.path();
            let meta = std::fs::symlink_metadata(&path).map_err(|e| io_err("stat", &path, e))?;
            if meta.is_dir() {
                zero_all(&path)?;
            } else if meta.is_file() {
                zero_file(&path)?;
            }
        }
        Ok(())
    }
    zero_all(dir)?;
    pause_point("db-old-zeroed");
    std::fs::remove_dir_all(dir).map_err(|e| io_err("remove", dir, e))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
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

/// A raw database at `path`, for tests that lay out what older versions wrote.
#[cfg(test)]
pub(crate) fn open_raw(path: &Path) -> sled::Db {
    #[allow(clippy::disallowed_methods)] // the store's own raw open, for tests
    sled::open(path).expect("a fresh test database opens")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_of_a_held_data_directory_says_it_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let held = Store::open(dir.path()).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Locked(_))
        ));
        drop(held);
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn compaction_keeps_every_live_record_and_drops_removed_ones_from_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = store.tree("things").unwrap();
        for i in 0..2_000u32 {
            t.insert(i.to_be_bytes(), format!("value-{i:05}").into_bytes())
                .unwrap();
        }
        t.insert(b"gone", b"removed-marker-77231".to_vec()).unwrap();
        store.flush().unwrap();
        t.remove(b"gone").unwrap();
        store.flush().unwrap();
        drop(t);
        let (store, done) = store.compact().unwrap();
        assert!(done.records >= 2_000, "{done:?}");
        let t = store.tree("things").unwrap();
        assert_eq!(t.len(), 2_000);
        assert_eq!(
            &t.get(7u32.to_be_bytes()).unwrap().unwrap()[..],
            b"value-00007"
        );
        for entry in walk(dir.path()) {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(
                !bytes.windows(20).any(|w| w == b"removed-marker-77231"),
                "{} still holds a removed value",
                entry.display()
            );
        }
        for leftover in [DB_COMPACT, DB_NEXT, DB_OLD] {
            assert!(
                !dir.path().join(leftover).exists(),
                "{leftover} left behind"
            );
        }
    }

    #[test]
    fn an_interrupted_compaction_is_finished_or_undone_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .tree("t")
                .unwrap()
                .insert(b"k", b"v".to_vec())
                .unwrap();
            store.flush().unwrap();
        }
        // A complete copy that was not yet moved into place, and the old one moved aside.
        let copy = |to: &str| {
            #[allow(clippy::disallowed_methods)] // a database as a crash left it
            let db = sled::open(dir.path().join(to)).unwrap();
            db.open_tree("t")
                .unwrap()
                .insert(b"k", b"v".to_vec())
                .unwrap();
            db.flush().unwrap();
        };
        copy(DB_NEXT);
        std::fs::rename(dir.path().join(DB_DIR), dir.path().join(DB_OLD)).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            &store.tree("t").unwrap().get(b"k").unwrap().unwrap()[..],
            b"v"
        );
        drop(store);
        assert!(!dir.path().join(DB_OLD).exists() && !dir.path().join(DB_NEXT).exists());
        // An incomplete copy is dropped; the database stays.
        std::fs::create_dir(dir.path().join(DB_COMPACT)).unwrap();
        std::fs::write(dir.path().join(DB_COMPACT).join("db"), b"partial").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            &store.tree("t").unwrap().get(b"k").unwrap().unwrap()[..],
            b"v"
        );
        assert!(!dir.path().join(DB_COMPACT).exists());
    }

    #[test]
    fn every_tree_the_engine_opens_is_listed_once() {
        let mut names: Vec<&str> = TREES.iter().map(|t| t.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), TREES.len(), "a tree is listed twice");
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        devices::DeviceRecords::open(&store).unwrap();
        tokens::TokenRecords::open(&store).unwrap();
        runs::RunHistory::open(&store).unwrap();
        plugins::Audit::open(&store).unwrap();
        plugins::PluginState::open(&store).unwrap();
        plugins::PluginRecords::open(&store).unwrap();
        deliveries::Deliveries::open(&store).unwrap();
        deliveries::Deliveries::open_signatures(&store).unwrap();
        notifiers::NotifierRecords::open(&store).unwrap();
        for name in store.db.tree_names() {
            let name = String::from_utf8_lossy(&name).into_owned();
            assert!(
                name == "__sled__default" || names.contains(&name.as_str()),
                "tree {name} is not in TREES"
            );
        }
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
