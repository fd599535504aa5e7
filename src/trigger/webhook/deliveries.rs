//! Delivery ids already accepted, so a sender's retry does not run a plugin twice.
//!
//! Senders retry on timeouts and 5xx, and GitHub lets a user redeliver by hand; each
//! delivery carries an id (`X-GitHub-Delivery`). The first delivery *claims* its id with
//! a compare-and-swap in sled — so two copies arriving at once cannot both run — and,
//! once its run exists, records the run id. A later copy within the retention window is
//! answered "already accepted" with that run id. If the run could not be started, the
//! claim is released and a retry may run. Entries carry their own expiry and are purged
//! by [`Deliveries::purge_expired`] (and replaced when found expired).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::runs::RunId;
use crate::store::{self, Store, StoreError};

const TREE: &str = "webhook_deliveries";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    accepted_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    /// `None` while the run is being started.
    run_id: Option<RunId>,
}

/// The outcome of claiming a delivery id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimResult {
    /// First time seen (or the earlier sighting expired): go ahead.
    Claimed,
    /// Seen within the window; the run it started, if it has one yet.
    Duplicate { run_id: Option<RunId> },
}

#[derive(Clone)]
pub struct Deliveries {
    tree: sled::Tree,
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries").finish_non_exhaustive()
    }
}

fn key(hook: &str, delivery: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(hook.len() + delivery.len() + 1);
    k.extend_from_slice(hook.as_bytes());
    k.push(0);
    k.extend_from_slice(delivery.as_bytes());
    k
}

impl Deliveries {
    pub fn open(store: &Store) -> Result<Deliveries, StoreError> {
        Ok(Deliveries {
            tree: store.tree(TREE)?,
        })
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
                Ok(()) => return Ok(ClaimResult::Claimed),
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

    /// Gives a claim up (the run could not be started), so a retry may run.
    pub fn release(&self, hook: &str, delivery: &str) -> Result<(), StoreError> {
        let k = key(hook, delivery);
        if let Some(bytes) = self.tree.get(&k)? {
            let seen: Seen = store::decode(&k, &bytes)?;
            if seen.run_id.is_none() {
                // Only if still pending: never forget an accepted delivery.
                let _ = self
                    .tree
                    .compare_and_swap(&k, Some(bytes), None as Option<&[u8]>)?;
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
        Ok(n)
    }

    /// Forgets every delivery of a hook (when it is removed).
    pub fn forget_hook(&self, hook: &str) -> Result<usize, StoreError> {
        let mut prefix = hook.as_bytes().to_vec();
        prefix.push(0);
        let mut n = 0;
        for k in self.tree.scan_prefix(&prefix).keys() {
            self.tree.remove(k?)?;
            n += 1;
        }
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
