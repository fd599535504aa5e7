//! Group commit: many writers' records made durable by one flush.
//!
//! sled keeps writes in memory buffers and writes them out on its own schedule (every
//! 500 ms by default), so a record that [`sled::Tree::insert`] returned for can still be
//! lost by a crash. What must survive one — a run a webhook sender was told was
//! accepted — is made durable by [`GroupCommit::durable`], which returns once a flush of
//! the whole database (its log written and `fsync`ed) that *started after the call* has
//! finished. Every write made before the call is in that flush.
//!
//! One thread does the flushing. A caller asks for the next flush and waits; while a
//! flush is running, everyone who asks waits for the one after it, and that one covers
//! them all: under load, each flush makes many records durable (a group), so durability
//! costs one `fsync` per group instead of one per record. When nobody asks, the thread
//! sleeps, and it is started only on the first request (a CLI command that never asks
//! starts none).

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tokio::sync::watch;

use super::StoreError;

/// The outcome of the latest flush: its number, and its error if it failed.
type Flushed = (u64, Result<(), Arc<str>>);

struct State {
    /// The number of the latest flush started (0: none yet).
    started: u64,
    /// The highest flush number anyone waits for.
    wanted: u64,
    stop: bool,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    flushed: watch::Sender<Flushed>,
}

/// The flushing thread of one database; stopped (and joined) when dropped.
pub struct GroupCommit {
    db: sled::Db,
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

impl GroupCommit {
    pub fn new(db: sled::Db) -> GroupCommit {
        GroupCommit {
            db,
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    started: 0,
                    wanted: 0,
                    stop: false,
                    thread: None,
                }),
                wake: Condvar::new(),
                flushed: watch::channel((0, Ok(()))).0,
            }),
        }
    }

    /// Returns once every write made before this call is on disk (in a flush that
    /// started after it), or with the error of the flush that should have done it.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let mut flushed = self.shared.flushed.subscribe();
        // Tasks ready on this worker with records to write (other connections' requests
        // read in the same wake-up) get to write them first and join the same flush.
        tokio::task::yield_now().await;
        let target = self.request()?;
        let outcome = flushed
            .wait_for(|(n, _)| *n >= target)
            .await
            .map_err(|_| stopped())?;
        // A later flush covers ours too; the latest one's outcome is what counts.
        match &outcome.1 {
            Ok(()) => Ok(()),
            Err(e) => Err(StoreError::Flush(e.to_string())),
        }
    }

    /// Flushes started so far.
    pub fn flushes(&self) -> u64 {
        lock(&self.shared.state).started
    }

    /// Asks for a flush that starts after now; returns its number.
    fn request(&self) -> Result<u64, StoreError> {
        let mut state = lock(&self.shared.state);
        if state.stop {
            return Err(stopped());
        }
        let target = state.started + 1;
        if state.wanted < target {
            state.wanted = target;
            if state.thread.is_none() {
                let shared = self.shared.clone();
                let db = self.db.clone();
                let thread = std::thread::Builder::new()
                    .name("capstan-commit".into())
                    .spawn(move || flush_loop(&shared, &db))
                    .map_err(|e| {
                        StoreError::Flush(format!("cannot start the flush thread: {e}"))
                    })?;
                state.thread = Some(thread);
            }
            self.shared.wake.notify_one();
        }
        Ok(target)
    }
}

fn stopped() -> StoreError {
    StoreError::Flush("the database is closing".into())
}

fn flush_loop(shared: &Shared, db: &sled::Db) {
    loop {
        let number = {
            let mut state = lock(&shared.state);
            while state.wanted <= state.started && !state.stop {
                state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            if state.wanted <= state.started {
                return; // stopping, and nobody waits
            }
            state.started += 1;
            state.started
        };
        let outcome = db.flush().map(drop).map_err(|e| Arc::from(e.to_string()));
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "cannot flush the database: runs accepted meanwhile are answered 503");
        }
        let _previous = shared.flushed.send_replace((number, outcome));
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        let thread = {
            let mut state = lock(&self.shared.state);
            state.stop = true;
            state.thread.take()
        };
        self.shared.wake.notify_one();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_waiters_share_flushes_and_each_sees_its_write_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let commit = Arc::new(GroupCommit::new(store.db.clone()));
        let tree = store.tree("t").unwrap();
        let mut tasks = Vec::new();
        for i in 0u32..200 {
            let (commit, tree) = (commit.clone(), tree.clone());
            tasks.push(tokio::spawn(async move {
                tree.insert(i.to_be_bytes(), &b"v"[..]).unwrap();
                commit.durable().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let flushes = lock(&commit.shared.state).started;
        assert!(flushes >= 1, "no flush ran");
        assert!(
            flushes <= 100,
            "{flushes} flushes for 200 concurrent writers: they were not grouped"
        );
        assert_eq!(tree.len(), 200);
        // Dropping the commit stops its thread, so the database can be reopened.
        drop(commit);
        drop(tree);
        drop(store);
        let store = crate::store::Store::open(dir.path()).unwrap();
        assert_eq!(store.tree("t").unwrap().len(), 200);
    }

    #[tokio::test]
    async fn no_thread_until_asked() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let commit = GroupCommit::new(store.db.clone());
        assert!(lock(&commit.shared.state).thread.is_none());
        commit.durable().await.unwrap();
        assert!(lock(&commit.shared.state).thread.is_some());
    }
}
