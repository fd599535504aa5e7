//! Deliveries already accepted, so neither a sender's retry nor a captured request
//! replayed by someone else runs a plugin twice.
//!
//! Two things identify a delivery, each in its own tree with the same shape
//! ([`super::WEBHOOK_DELIVERIES`], [`super::WEBHOOK_SIGNATURES`]):
//! - the sender's **delivery id** (`X-GitHub-Delivery`, tree `webhook_deliveries`):
//!   senders retry on timeouts and 5xx, and GitHub's "Redeliver" sends the same id;
//! - the **verified signature** (tree `webhook_signatures`, keyed by its SHA-256): the
//!   delivery id is not covered by any sender's signature, so a replay with a fresh id
//!   is recognised by the signature, which is (for timestamp-signed templates, the
//!   signed timestamp is part of what it signs).
//!
//! The first delivery *claims* its keys with a compare-and-swap in sled — so two copies
//! arriving at once cannot both run — and, once its run exists, records the run id. A
//! later copy before the entry expires is answered "already accepted" with that run id.
//! If the run could not be started, the claim is released and a retry may run. Entries
//! carry their own expiry and are purged by [`Deliveries::purge_expired`] (and replaced
//! when found expired). Being in sled, they outlive a restart.
//!
//! Only verified deliveries make entries, so an unauthenticated sender cannot fill a
//! tree; still, each hook keeps at most [`MAX_REMEMBERED_PER_HOOK`] per tree: past that,
//! expired entries go first, then those closest to expiry (so a genuine sender sending
//! faster than that over the retention period shortens how long its deliveries are
//! remembered; nothing else changes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::commit::{Entry, GroupCommit};
use super::{Store, StoreError, Tree, WEBHOOK_DELIVERIES, WEBHOOK_SIGNATURES};
use crate::runs::RunId;
use crate::store;

/// Entries kept per hook in each tree; beyond, the oldest are forgotten first.
pub const MAX_REMEMBERED_PER_HOOK: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    accepted_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    /// `None` while the run is being started.
    run_id: Option<RunId>,
}

/// The outcome of claiming a delivery id or signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimResult {
    /// First time seen (or the earlier sighting expired): go ahead.
    Claimed,
    /// Seen within the window; the run it started, if it has one yet.
    Duplicate { run_id: Option<RunId> },
}

/// One tree of remembered deliveries: by delivery id ([`Deliveries::open`]) or by
/// signature ([`Deliveries::open_signatures`]).
#[derive(Clone)]
pub struct Deliveries {
    tree: sled::Tree,
    /// Which tree, for the journal's entries.
    which: Tree,
    /// Claims are journaled, so that a claim made before a run was promised (a 202)
    /// is as durable as the run ([`Store::durable`]).
    journal: Arc<GroupCommit>,
    cap: usize,
    /// Entries per hook, counted on first use; approximate under races, which only
    /// moves the moment the cap is enforced by a few entries.
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries").finish_non_exhaustive()
    }
}

fn prefix(hook: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(hook.len() + 1);
    k.extend_from_slice(hook.as_bytes());
    k.push(0);
    k
}

fn key(hook: &str, delivery: &str) -> Vec<u8> {
    let mut k = prefix(hook);
    k.extend_from_slice(delivery.as_bytes());
    k
}

impl Deliveries {
    /// Delivery ids.
    pub fn open(store: &Store) -> Result<Deliveries, StoreError> {
        Self::open_tree(store, WEBHOOK_DELIVERIES, MAX_REMEMBERED_PER_HOOK)
    }

    /// Verified signatures (their hex SHA-256 as the "delivery").
    pub fn open_signatures(store: &Store) -> Result<Deliveries, StoreError> {
        Self::open_tree(store, WEBHOOK_SIGNATURES, MAX_REMEMBERED_PER_HOOK)
    }

    fn open_tree(store: &Store, tree: Tree, cap: usize) -> Result<Deliveries, StoreError> {
        Ok(Deliveries {
            tree: store.open_tree(tree)?,
            which: tree,
            journal: store.journal(),
            cap: cap.max(1),
            counts: Arc::default(),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `delivery` for `hook` until `expires_at`, atomically.
    pub fn claim(
        &self,
        hook: &str,
        delivery: &str,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<ClaimResult, StoreError> {
        let k = key(hook, delivery);
        let fresh = store::encode(&Seen {
            accepted_at: now,
            expires_at,
            run_id: None,
        });
        let mut expected: Option<sled::IVec> = None;
        loop {
            match self
                .tree
                .compare_and_swap(&k, expected.as_ref(), Some(fresh.as_slice()))?
            {
                Ok(()) => {
                    self.journal.append(&[Entry {
                        tree: self.which,
                        key: &k,
                        value: &fresh,
                    }]);
                    if expected.is_none() {
                        self.added(hook, &k, now)?;
                    }
                    return Ok(ClaimResult::Claimed);
                }
                Err(cas) => {
                    let Some(current) = cas.current else {
                        expected = None;
                        continue;
                    };
                    let seen: Seen = store::decode(&k, &current)?;
                    if seen.expires_at > now {
                        return Ok(ClaimResult::Duplicate {
                            run_id: seen.run_id,
                        });
                    }
                    // Expired: replace it, unless someone else just did.
                    expected = Some(current);
                }
            }
        }
    }

    /// Counts a new entry of `hook` (`just` is its key) and keeps the hook within the
    /// cap: expired entries go first, then those closest to expiry, down to 90 % of the
    /// cap so that this scan happens once per tenth of the cap, not on every delivery.
    fn added(&self, hook: &str, just: &[u8], now: DateTime<Utc>) -> Result<(), StoreError> {
        let over = {
            let mut counts = self.counts();
            let n = match counts.get_mut(hook) {
                Some(n) => {
                    *n += 1;
                    *n
                }
                None => {
                    let n = self.tree.scan_prefix(prefix(hook)).count();
                    counts.insert(hook.to_string(), n);
                    n
                }
            };
            n > self.cap
        };
        if !over {
            return Ok(());
        }
        let mut entries: Vec<(DateTime<Utc>, sled::IVec, sled::IVec)> = Vec::new();
        for item in self.tree.scan_prefix(prefix(hook)) {
            let (k, bytes) = item?;
            if &k[..] == just {
                continue;
            }
            let expires = store::decode::<Seen>(&k, &bytes)
                .map(|s| s.expires_at)
                .unwrap_or(now);
            entries.push((expires, k, bytes));
        }
        entries.sort_by_key(|e| e.0);
        let keep = self.cap - self.cap / 10;
        let excess = (entries.len() + 1).saturating_sub(keep);
        let mut removed = 0;
        for (_, k, bytes) in entries.into_iter().take(excess) {
            if self
                .tree
                .compare_and_swap(&k, Some(bytes), None as Option<&[u8]>)?
                .is_ok()
            {
                removed += 1;
            }
        }
        if let Some(n) = self.counts().get_mut(hook) {
            *n = n.saturating_sub(removed);
        }
        tracing::info!(
            hook,
            removed,
            cap = self.cap,
            "webhook hook at its cap of remembered deliveries; the oldest were forgotten"
        );
        Ok(())
    }

    /// Records the run a claimed delivery started.
    pub fn accept(&self, hook: &str, delivery: &str, run_id: RunId) -> Result<(), StoreError> {
        let k = key(hook, delivery);
        if let Some(bytes) = self.tree.get(&k)? {
            let mut seen: Seen = store::decode(&k, &bytes)?;
            seen.run_id = Some(run_id);
            self.tree.insert(&k, store::encode(&seen))?;
        }
        Ok(())
    }

    /// Gives a claim up (the run could not be started, or the delivery turned out to be
    /// a replay), so a retry may run.
    pub fn release(&self, hook: &str, delivery: &str) -> Result<(), StoreError> {
        let k = key(hook, delivery);
        if let Some(bytes) = self.tree.get(&k)? {
            let seen: Seen = store::decode(&k, &bytes)?;
            // Only if still pending: never forget an accepted delivery.
            if seen.run_id.is_none()
                && self
                    .tree
                    .compare_and_swap(&k, Some(bytes), None as Option<&[u8]>)?
                    .is_ok()
                && let Some(n) = self.counts().get_mut(hook)
            {
                *n = n.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Removes entries past their expiry. Returns how many.
    pub fn purge_expired(&self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.tree.iter() {
            let (k, bytes) = item?;
            let expired = match store::decode::<Seen>(&k, &bytes) {
                Ok(seen) => seen.expires_at <= now,
                Err(_) => true,
            };
            if expired
                && self
                    .tree
                    .compare_and_swap(&k, Some(bytes), None as Option<&[u8]>)?
                    .is_ok()
            {
                n += 1;
            }
        }
        // Counted again on next use.
        self.counts().clear();
        Ok(n)
    }

    /// Forgets every delivery of a hook (when it is removed).
    pub fn forget_hook(&self, hook: &str) -> Result<usize, StoreError> {
        let mut n = 0;
        for k in self.tree.scan_prefix(prefix(hook)).keys() {
            self.tree.remove(k?)?;
            n += 1;
        }
        self.counts().remove(hook);
        Ok(n)
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn open() -> (tempfile::TempDir, Deliveries) {
        let dir = tempfile::tempdir().unwrap();
        let d = Deliveries::open(&Store::open(dir.path()).unwrap()).unwrap();
        (dir, d)
    }

    #[test]
    fn a_repeated_delivery_within_the_window_is_a_duplicate_with_the_first_run_id() {
        let (_dir, d) = open();
        assert_eq!(
            d.claim("gh", "abc", at(0), at(100)).unwrap(),
            ClaimResult::Claimed
        );
        assert_eq!(
            d.claim("gh", "abc", at(1), at(101)).unwrap(),
            ClaimResult::Duplicate { run_id: None },
            "a copy arriving while the run is being started"
        );
        let run = RunId::new();
        d.accept("gh", "abc", run).unwrap();
        assert_eq!(
            d.claim("gh", "abc", at(50), at(150)).unwrap(),
            ClaimResult::Duplicate { run_id: Some(run) }
        );
        assert_eq!(
            d.claim("other", "abc", at(50), at(150)).unwrap(),
            ClaimResult::Claimed
        );
    }

    #[test]
    fn an_expired_delivery_may_run_again_and_is_purged() {
        let (_dir, d) = open();
        d.claim("gh", "abc", at(0), at(100)).unwrap();
        d.accept("gh", "abc", RunId::new()).unwrap();
        d.claim("gh", "old", at(0), at(10)).unwrap();
        assert_eq!(
            d.claim("gh", "abc", at(100), at(200)).unwrap(),
            ClaimResult::Claimed
        );
        assert_eq!(
            d.purge_expired(at(50)).unwrap(),
            1,
            "only 'old' had expired"
        );
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn a_released_claim_lets_a_retry_run_but_an_accepted_one_is_kept() {
        let (_dir, d) = open();
        d.claim("gh", "abc", at(0), at(100)).unwrap();
        d.release("gh", "abc").unwrap();
        assert_eq!(
            d.claim("gh", "abc", at(1), at(101)).unwrap(),
            ClaimResult::Claimed
        );
        d.accept("gh", "abc", RunId::new()).unwrap();
        d.release("gh", "abc").unwrap();
        assert!(matches!(
            d.claim("gh", "abc", at(2), at(102)).unwrap(),
            ClaimResult::Duplicate { run_id: Some(_) }
        ));
        assert_eq!(d.forget_hook("gh").unwrap(), 1);
        assert!(d.is_empty());
    }

    #[test]
    fn a_hook_at_its_cap_forgets_its_oldest_entries_first_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let capped = Tree {
            name: "capped",
            holds: "a test's deliveries",
        };
        let d = Deliveries::open_tree(&store, capped, 10).unwrap();
        for i in 0..10 {
            d.claim("gh", &format!("d{i}"), at(i), at(1000 + i))
                .unwrap();
        }
        d.claim("other", "x", at(0), at(5)).unwrap();
        assert_eq!(d.len(), 11, "at the cap, nothing is forgotten");
        d.claim("gh", "d10", at(10), at(1010)).unwrap();
        assert_eq!(
            d.tree.scan_prefix(prefix("gh")).count(),
            9,
            "trimmed to 90 % of the cap"
        );
        for gone in ["d0", "d1"] {
            assert_eq!(
                d.claim("gh", gone, at(11), at(1011)).unwrap(),
                ClaimResult::Claimed,
                "{gone} was the closest to expiry"
            );
        }
        for kept in ["d9", "d10"] {
            assert!(matches!(
                d.claim("gh", kept, at(12), at(1012)).unwrap(),
                ClaimResult::Duplicate { .. }
            ));
        }
        assert!(
            matches!(
                d.claim("other", "x", at(1), at(6)).unwrap(),
                ClaimResult::Duplicate { .. }
            ),
            "another hook's entries are not touched"
        );
    }

    #[test]
    fn remembered_signatures_outlive_a_restart_and_are_kept_apart_from_delivery_ids() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunId::new();
        {
            let store = Store::open(dir.path()).unwrap();
            let sigs = Deliveries::open_signatures(&store).unwrap();
            sigs.claim("gh", "ab12", at(0), at(100)).unwrap();
            sigs.accept("gh", "ab12", run).unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let sigs = Deliveries::open_signatures(&store).unwrap();
        assert_eq!(
            sigs.claim("gh", "ab12", at(5), at(105)).unwrap(),
            ClaimResult::Duplicate { run_id: Some(run) }
        );
        let ids = Deliveries::open(&store).unwrap();
        assert_eq!(
            ids.claim("gh", "ab12", at(5), at(105)).unwrap(),
            ClaimResult::Claimed
        );
    }

    #[test]
    fn concurrent_copies_of_one_delivery_claim_it_exactly_once() {
        let (_dir, d) = open();
        let claimed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| d.claim("gh", "same", at(0), at(100)).unwrap()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|r| *r == ClaimResult::Claimed)
                .count()
        });
        assert_eq!(claimed, 1);
    }
}
