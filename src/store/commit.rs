//! Group commit: records someone was promised made durable by an append-only journal of
//! our own, many writers per `fdatasync`.
//!
//! sled keeps writes in memory buffers and writes them out on its own schedule (every
//! 500 ms by default), so a record that [`sled::Tree::insert`] returned for can still be
//! lost by a crash. A flush of the whole database makes it durable, but costs much more
//! than the record (sled seals and writes its buffers through its own IO threads, then
//! `fsync`s; on Linux its "fsync" is `sync_file_range`, which writes the pages out but
//! does not flush the device's own write cache, so a power cut could still lose them), so
//! the records that must survive a crash — a run a webhook sender was told
//! was accepted, the delivery claim that keeps its copies from running twice — are also
//! appended to a journal ([`GroupCommit::append`]), and [`GroupCommit::durable`] waits
//! until the journal holds everything appended before the call, written and
//! `fdatasync`ed. sled is written as before, and flushes on its own schedule.
//!
//! **One flush thread** writes the journal. A caller appends (in memory), asks for the
//! next write and waits; while a write is under way, everyone who asks waits for the one
//! after it, and that one covers them all: under load, each `fdatasync` makes many
//! records durable (a group). When nobody asks, the thread sleeps; it is started on the
//! first request (a CLI command that never asks starts none).
//!
//! **Segments.** The journal is a sequence of files `journal/NNNNNNNNNNNNNNNN.log` in the
//! data directory. Once one holds [`SEGMENT_BYTES`], the next write goes to a new file and
//! the full one is *retired*: a checkpoint thread flushes sled (which then holds every
//! record of the retired file, see below) and removes the file. When the store is
//! dropped, sled is flushed and every segment removed, so a data directory at rest has no
//! journal.
//!
//! **Crash safety.** What makes a journal entry redundant is sled holding the same write
//! on disk. Each writer writes sled *first* and appends to the journal *after*, so every
//! entry's sled write happened before the entry was taken for writing, and so before its
//! segment was retired: the sled flush that starts after the retirement covers it, and
//! only then is the file removed. A new segment's directory entry is synced before
//! anything is written to it. At open ([`replay`]), every segment left by a crash is
//! read, entry by entry, and each entry whose key is *absent* from its tree is written
//! back (a key that is present holds the same write or a later one: a final run record,
//! an accepted delivery); then sled is flushed and the segments removed. A run restored
//! this way is `queued` in the active index, so it is handled as every run interrupted
//! by a crash is (marked `interrupted` at start-up). Each entry carries its length and a
//! CRC32 of its bytes: a torn last entry (the crash came during a write, whose callers
//! were therefore never answered) ends the replay of that segment.
//!
//! One consequence: a key *removed* from sled while its entry was still in an unretired
//! segment (a run deleted by retention within a segment's lifetime, a released claim)
//! comes back after a crash, as an `interrupted` run that the next retention pass
//! removes again, or a claim that answers copies "already accepted" until it expires.
//!
//! A journal write that fails (a full disk) is followed by a flush of sled, which holds
//! every appended write too: the waiters are answered by its outcome, and the failed
//! segment is retired (its complete entries stay valid).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tokio::sync::watch;

use super::{DB_DIR, StoreError, Tree, io_err, sync_dir};

/// The directory of the journal's segments, in the data directory.
pub const JOURNAL_DIR: &str = "journal";
/// A segment's size past which it is retired and the next write starts a new one.
pub const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// Bytes before an entry's payload: its length and its CRC32 (both u32, little-endian).
const HEADER: usize = 8;

/// What the waiters see: the journal position durable so far, and the error of the
/// latest write that could not be made durable (cleared by the next that could).
type Flushed = (u64, Option<Arc<str>>);

struct State {
    /// Entries appended and not yet taken for writing.
    buf: Vec<u8>,
    /// Bytes appended so far (the position a caller of `durable` waits for).
    appended: u64,
    /// The highest position anyone waits for.
    wanted: u64,
    /// Writes started so far.
    flushes: u64,
    /// Time spent in journal writes so far (write + `fdatasync`), for the benchmarks.
    busy: std::time::Duration,
    /// Segments full or failed, whose entries sled holds once flushed.
    retired: Vec<PathBuf>,
    /// The flush thread waits for a request (so a request must wake it; while it
    /// writes, it looks at `wanted` again before it waits, and no wake-up is needed).
    idle: bool,
    stop: bool,
    thread: Option<JoinHandle<()>>,
    checkpoint: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    flushed: watch::Sender<Flushed>,
    dir: PathBuf,
    /// The database's own directory.
    db_dir: PathBuf,
    db: sled::Db,
}

/// The journal of one database and its flush thread; both stopped (and the journal
/// removed once sled is flushed) when dropped.
pub struct GroupCommit {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One write to restore at open if its key is absent: its tree, key and value.
pub struct Entry<'a> {
    pub tree: Tree,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

/// Appends `entry` to `buf` in the journal's format: length, CRC32, then the payload
/// (tree name length u8, tree name, key length u16 little-endian, key, value).
fn encode_entry(buf: &mut Vec<u8>, entry: &Entry<'_>) {
    let name = entry.tree.name.as_bytes();
    let len = 1 + name.len() + 2 + entry.key.len() + entry.value.len();
    let start = buf.len();
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.push(name.len() as u8);
    buf.extend_from_slice(name);
    buf.extend_from_slice(&(entry.key.len() as u16).to_le_bytes());
    buf.extend_from_slice(entry.key);
    buf.extend_from_slice(entry.value);
    let crc = crc32fast::hash(&buf[start + HEADER..]);
    buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// The entries of one segment's bytes, up to the end or the first entry that is
/// incomplete or does not match its CRC (a write torn by a crash): (tree, key, value).
fn decode_entries(bytes: &[u8]) -> Vec<(&[u8], &[u8], &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + HEADER].try_into().expect("4 bytes"));
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if len == 0 || crc32fast::hash(payload) != crc {
            break;
        }
        let name_len = payload[0] as usize;
        let Some(name) = payload.get(1..1 + name_len) else {
            break;
        };
        let Some(key_len) = payload.get(1 + name_len..3 + name_len) else {
            break;
        };
        let key_len = u16::from_le_bytes([key_len[0], key_len[1]]) as usize;
        let Some(key) = payload.get(3 + name_len..3 + name_len + key_len) else {
            break;
        };
        out.push((name, key, &payload[3 + name_len + key_len..]));
        at += HEADER + len;
    }
    out
}

/// The segments in `dir`, oldest first.
fn segments(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io_err("read", dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| io_err("read", dir, e))?.path();
        if path.extension().is_some_and(|x| x == "log") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Restores what a crash left in the journal under `data_dir` (module docs): each entry
/// whose key is absent from its tree is written back; then sled is flushed and the
/// segments removed. Returns how many entries were restored.
pub fn replay(data_dir: &Path, db: &sled::Db) -> Result<usize, StoreError> {
    let dir = data_dir.join(JOURNAL_DIR);
    let found = segments(&dir)?;
    let mut restored = 0;
    for path in &found {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| io_err("read", path, e))?;
        for (tree, key, value) in decode_entries(&bytes) {
            let tree = db.open_tree(tree)?;
            if tree
                .compare_and_swap(key, None as Option<&[u8]>, Some(value))?
                .is_ok()
            {
                restored += 1;
            }
        }
    }
    if !found.is_empty() {
        flush_db(db, &data_dir.join(DB_DIR))?;
        for path in &found {
            std::fs::remove_file(path).map_err(|e| io_err("remove", path, e))?;
        }
        sync_dir(&dir)?;
        if restored > 0 {
            tracing::info!(
                restored,
                "restored records the journal held and the database had not yet written (the engine had stopped abruptly)"
            );
        }
    }
    Ok(restored)
}

impl GroupCommit {
    /// The journal of `db` under `data_dir` ([`replay`] it first).
    pub fn new(db: sled::Db, data_dir: &Path) -> GroupCommit {
        GroupCommit {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    buf: Vec::new(),
                    appended: 0,
                    wanted: 0,
                    flushes: 0,
                    busy: std::time::Duration::ZERO,
                    retired: Vec::new(),
                    idle: false,
                    stop: false,
                    thread: None,
                    checkpoint: None,
                }),
                wake: Condvar::new(),
                flushed: watch::channel((0, None)).0,
                dir: data_dir.join(JOURNAL_DIR),
                db_dir: data_dir.join(DB_DIR),
                db,
            }),
        }
    }

    /// Adds writes already made to sled to the journal (in memory until the next
    /// [`GroupCommit::durable`] writes them). Make the sled writes first: see the module
    /// docs for why the order matters.
    pub fn append(&self, entries: &[Entry<'_>]) {
        let mut state = lock(&self.shared.state);
        let before = state.buf.len();
        for e in entries {
            encode_entry(&mut state.buf, e);
        }
        state.appended += (state.buf.len() - before) as u64;
    }

    /// Returns once every entry appended before this call is on disk (in a journal
    /// write that started after it), or with the error of the write that should have
    /// done it.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let mut flushed = self.shared.flushed.subscribe();
        // Tasks ready on this worker with records to write (other connections' requests
        // read in the same wake-up) get to append them first and join the same write.
        tokio::task::yield_now().await;
        let Some(target) = self.request()? else {
            return Ok(());
        };
        let outcome = flushed
            .wait_for(|(upto, error)| *upto >= target || error.is_some())
            .await
            .map_err(|_| stopped())?;
        match &*outcome {
            (upto, _) if *upto >= target => Ok(()),
            (_, Some(e)) => Err(StoreError::Flush(e.to_string())),
            (_, None) => Err(stopped()),
        }
    }

    /// Journal writes started so far.
    pub fn flushes(&self) -> u64 {
        lock(&self.shared.state).flushes
    }

    /// Time spent in journal writes so far (each a write and its `fdatasync`).
    pub fn busy(&self) -> std::time::Duration {
        lock(&self.shared.state).busy
    }

    /// Asks for a write covering everything appended so far; returns the position to
    /// wait for, or `None` when it is durable already.
    fn request(&self) -> Result<Option<u64>, StoreError> {
        let mut state = lock(&self.shared.state);
        if state.stop {
            return Err(stopped());
        }
        let target = state.appended;
        if self.shared.flushed.borrow().0 >= target {
            return Ok(None);
        }
        if state.wanted < target {
            state.wanted = target;
            if state.thread.is_none() {
                let shared = self.shared.clone();
                let thread = std::thread::Builder::new()
                    .name("capstan-commit".into())
                    .spawn(move || flush_loop(&shared))
                    .map_err(|e| {
                        StoreError::Flush(format!("cannot start the flush thread: {e}"))
                    })?;
                state.thread = Some(thread);
            }
            // A wake-up is a system call: only for a thread that sleeps.
            if state.idle {
                self.shared.wake.notify_one();
            }
        }
        Ok(Some(target))
    }
}

fn stopped() -> StoreError {
    StoreError::Flush("the database is closing".into())
}

/// The segment being written: its file, path and size.
struct Segment {
    file: File,
    path: PathBuf,
    bytes: u64,
}

/// Creates the next segment, its directory entry synced. It is filled with zeros up to
/// [`SEGMENT_BYTES`] (written and synced) first: the writes that follow change neither
/// its size nor its block map, so each `fdatasync` writes data alone, without a
/// filesystem metadata commit. Replay ends at the zeros (an entry of length 0).
fn new_segment(dir: &Path, number: &mut u64) -> Result<Segment, StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
    loop {
        *number += 1;
        let path = dir.join(format!("{:016}.log", *number));
        match std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
        {
            Ok(mut file) => {
                let zeros = [0u8; 64 * 1024];
                for _ in 0..SEGMENT_BYTES / zeros.len() as u64 {
                    file.write_all(&zeros)
                        .map_err(|e| io_err("write", &path, e))?;
                }
                file.sync_all().map_err(|e| io_err("sync", &path, e))?;
                sync_dir(dir)?;
                if let Some(parent) = dir.parent() {
                    sync_dir(parent)?;
                }
                return Ok(Segment {
                    file,
                    path,
                    bytes: 0,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("create", &path, e)),
        }
    }
}

fn write_out(segment: &mut Segment, bytes: &[u8]) -> Result<(), StoreError> {
    use std::os::unix::fs::FileExt;
    segment
        .file
        .write_all_at(bytes, segment.bytes)
        .and_then(|()| segment.file.sync_data())
        .map_err(|e| io_err("write", &segment.path, e))?;
    segment.bytes += bytes.len() as u64;
    Ok(())
}

fn flush_loop(shared: &Arc<Shared>) {
    let mut segment: Option<Segment> = None;
    let mut number = 0u64;
    let mut spare: Vec<u8> = Vec::new();
    // After a failed write: sled is flushed until that succeeds.
    let mut degraded = false;
    // The journal position taken for writing so far (written, or failed and answered).
    let mut taken = 0u64;
    loop {
        let end = {
            let mut state = lock(&shared.state);
            while state.wanted <= taken && !state.stop {
                state.idle = true;
                state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                state.idle = false;
            }
            if state.wanted <= taken {
                return; // stopping, and nobody waits
            }
            state.flushes += 1;
            spare.clear();
            std::mem::swap(&mut state.buf, &mut spare);
            taken = state.appended;
            taken
        };
        let began = std::time::Instant::now();
        let written = match segment.take() {
            Some(s) => Ok(s),
            None => new_segment(&shared.dir, &mut number),
        }
        .and_then(|mut s| write_out(&mut s, &spare).map(|()| s));
        lock(&shared.state).busy += began.elapsed();
        let outcome = match written {
            Ok(s) if !degraded => {
                if s.bytes >= SEGMENT_BYTES {
                    retire(shared, s.path);
                } else {
                    segment = Some(s);
                }
                Ok(())
            }
            other => {
                if let Err(e) = &other {
                    tracing::error!(error = %e, "cannot write the journal; flushing the database instead");
                }
                // The failed segment's complete entries stay valid; sled takes over.
                if let Ok(s) = other {
                    segment = Some(s);
                }
                let flushed = flush_db(&shared.db, &shared.db_dir);
                degraded = flushed.is_err();
                flushed.map_err(|e| Arc::<str>::from(e.to_string()))
            }
        };
        let outcome = match outcome {
            Ok(()) => (end, None),
            Err(e) => {
                tracing::error!(error = %e, "cannot flush the database: runs accepted meanwhile are answered 503");
                (shared.flushed.borrow().0, Some(e))
            }
        };
        shared.flushed.send_replace(outcome);
    }
}

/// Flushes sled, then `fsync`s its log (the file `db` in its directory, from which it
/// recovers): sled's own flush does not flush the device's write cache (module docs),
/// and what it wrote must be as durable as the journal it replaces.
fn flush_db(db: &sled::Db, db_dir: &Path) -> Result<(), StoreError> {
    db.flush()?;
    let log = db_dir.join(SLED_LOG);
    File::open(&log)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("sync", &log, e))
}

/// sled's log file in its directory.
const SLED_LOG: &str = "db";

/// Hands a full segment to the checkpoint thread (started if none is running), which
/// flushes sled and removes every retired segment.
fn retire(shared: &Arc<Shared>, path: PathBuf) {
    let mut state = lock(&shared.state);
    state.retired.push(path);
    if state.checkpoint.as_ref().is_some_and(|t| !t.is_finished()) {
        return; // it takes this one too when it is done with its own
    }
    if let Some(t) = state.checkpoint.take() {
        let _ = t.join();
    }
    let worker = shared.clone();
    match std::thread::Builder::new()
        .name("capstan-checkpoint".into())
        .spawn(move || checkpoint(&worker))
    {
        Ok(t) => state.checkpoint = Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the journal checkpoint; it is retried at the next segment")
        }
    }
}

fn checkpoint(shared: &Shared) {
    loop {
        let retired = std::mem::take(&mut lock(&shared.state).retired);
        if retired.is_empty() {
            return;
        }
        if let Err(e) = remove_covered(shared, &retired) {
            tracing::warn!(error = %e, "cannot retire journal segments; they are replayed at the next start if left");
            lock(&shared.state).retired.extend(retired);
            return;
        }
    }
}

/// Flushes sled, which then holds every entry of `retired`, and removes them.
fn remove_covered(shared: &Shared, retired: &[PathBuf]) -> Result<(), StoreError> {
    flush_db(&shared.db, &shared.db_dir)?;
    for path in retired {
        std::fs::remove_file(path).map_err(|e| io_err("remove", path, e))?;
    }
    sync_dir(&shared.dir)
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        let (thread, checkpoint) = {
            let mut state = lock(&self.shared.state);
            state.stop = true;
            (state.thread.take(), state.checkpoint.take())
        };
        self.shared.wake.notify_one();
        for t in [thread, checkpoint].into_iter().flatten() {
            let _ = t.join();
        }
        // At rest, sled holds everything: the journal is removed.
        match segments(&self.shared.dir) {
            Ok(found) if !found.is_empty() => {
                if let Err(e) = remove_covered(&self.shared, &found) {
                    tracing::warn!(error = %e, "cannot remove the journal; it is replayed at the next start");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the journal directory"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    const T: Tree = Tree {
        name: "t",
        holds: "test",
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_waiters_share_writes_and_each_write_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let commit = Arc::new(GroupCommit::new(store.db.clone(), dir.path()));
        let tree = store.tree("t").unwrap();
        let mut tasks = Vec::new();
        for i in 0u32..200 {
            let (commit, tree) = (commit.clone(), tree.clone());
            tasks.push(tokio::spawn(async move {
                let key = i.to_be_bytes();
                tree.insert(key, &b"v"[..]).unwrap();
                commit.append(&[Entry {
                    tree: T,
                    key: &key,
                    value: b"v",
                }]);
                commit.durable().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let flushes = commit.flushes();
        assert!(flushes >= 1, "no write ran");
        assert!(
            flushes <= 100,
            "{flushes} writes for 200 concurrent writers: they were not grouped"
        );
        // Every entry is in the journal as it is on disk.
        let mut entries = 0;
        for path in segments(&dir.path().join(JOURNAL_DIR)).unwrap() {
            entries += decode_entries(&std::fs::read(&path).unwrap()).len();
        }
        assert_eq!(entries, 200);
        // Dropping the commit stops its thread and removes the journal (sled holds it).
        drop(commit);
        assert!(
            segments(&dir.path().join(JOURNAL_DIR)).unwrap().is_empty(),
            "the journal is left at rest"
        );
        drop(tree);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.tree("t").unwrap().len(), 200);
    }

    #[tokio::test]
    async fn no_thread_until_asked_and_nothing_to_wait_for_without_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let commit = GroupCommit::new(store.db.clone(), dir.path());
        commit.durable().await.unwrap();
        assert!(lock(&commit.shared.state).thread.is_none());
        commit.append(&[Entry {
            tree: T,
            key: b"k",
            value: b"v",
        }]);
        commit.durable().await.unwrap();
        assert!(lock(&commit.shared.state).thread.is_some());
        assert_eq!(commit.flushes(), 1);
    }

    /// A journal as a crash leaves it: entries, and a last one cut short.
    fn crashed_journal(data_dir: &Path, entries: &[Entry<'_>], torn: bool) {
        let dir = data_dir.join(JOURNAL_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let mut bytes = Vec::new();
        for e in entries {
            encode_entry(&mut bytes, e);
        }
        if torn {
            let mut last = Vec::new();
            encode_entry(
                &mut last,
                &Entry {
                    tree: T,
                    key: b"torn",
                    value: b"half-written",
                },
            );
            bytes.extend_from_slice(&last[..last.len() - 5]);
        }
        std::fs::write(dir.join("0000000000000001.log"), bytes).unwrap();
    }

    #[test]
    fn replay_restores_absent_keys_keeps_present_ones_and_stops_at_a_torn_entry() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            // A later write of the same key (a final record) that sled did keep.
            let t = store.tree("t").unwrap();
            t.insert(b"kept", &b"final"[..]).unwrap();
            store.flush().unwrap();
        }
        crashed_journal(
            dir.path(),
            &[
                Entry {
                    tree: T,
                    key: b"lost",
                    value: b"queued",
                },
                Entry {
                    tree: T,
                    key: b"kept",
                    value: b"queued",
                },
            ],
            true,
        );
        let store = Store::open(dir.path()).unwrap();
        let t = store.tree("t").unwrap();
        assert_eq!(&t.get(b"lost").unwrap().unwrap()[..], b"queued");
        assert_eq!(&t.get(b"kept").unwrap().unwrap()[..], b"final");
        assert!(
            t.get(b"torn").unwrap().is_none(),
            "a torn entry was applied"
        );
        assert!(
            segments(&dir.path().join(JOURNAL_DIR)).unwrap().is_empty(),
            "replayed segments are removed"
        );
        // What was restored was made durable before the journal went.
        drop(t);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            &store.tree("t").unwrap().get(b"lost").unwrap().unwrap()[..],
            b"queued"
        );
    }

    #[test]
    fn a_corrupted_entry_ends_the_segment_and_nothing_after_it_is_applied() {
        let mut bytes = Vec::new();
        for key in [&b"a"[..], b"b", b"c"] {
            encode_entry(
                &mut bytes,
                &Entry {
                    tree: T,
                    key,
                    value: b"v",
                },
            );
        }
        let one = bytes.len() / 3;
        assert_eq!(decode_entries(&bytes).len(), 3);
        bytes[one + HEADER + 2] ^= 0xff;
        let read = decode_entries(&bytes);
        assert_eq!(read.len(), 1, "entries past a bad CRC were read");
        assert_eq!(read[0], (&b"t"[..], &b"a"[..], &b"v"[..]));
        // Zeros (a preallocated or truncated tail) end it too.
        assert!(decode_entries(&[0u8; 64]).is_empty());
    }

    #[tokio::test]
    async fn a_full_segment_is_retired_once_sled_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let commit = GroupCommit::new(store.db.clone(), dir.path());
        let tree = store.tree("t").unwrap();
        let value = vec![7u8; 64 * 1024];
        let n = (SEGMENT_BYTES / value.len() as u64) as u32 + 8;
        for i in 0..n {
            let key = i.to_be_bytes();
            tree.insert(key, value.as_slice()).unwrap();
            commit.append(&[Entry {
                tree: T,
                key: &key,
                value: &value,
            }]);
            commit.durable().await.unwrap();
        }
        let journal = dir.path().join(JOURNAL_DIR);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while segments(&journal).unwrap().len() > 1 {
            assert!(
                std::time::Instant::now() < until,
                "the full segment was not retired"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let left = segments(&journal).unwrap();
        assert_eq!(left.len(), 1);
        let entries = decode_entries(&std::fs::read(&left[0]).unwrap()).len() as u32;
        assert!(entries < n, "the current segment holds every entry");
    }
}
