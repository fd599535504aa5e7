//! Replay memory across the nodes of a cluster: a webhook delivery's verified signature
//! (hooks with `replay = "reject"`, the default for HMAC hooks) is claimed in the KV
//! bucket `capstan_replays` (`capstan_replays_NAME`), so a captured delivery replayed to
//! another node, under a delivery id of the replayer's choosing, is answered as a
//! duplicate there too, as it is on the node that took it first.
//!
//! Each node checks its own memory first ([`crate::trigger::webhook`], in sled); a
//! signature new there is claimed here with create-if-absent, a per-key TTL that ends
//! when the hook stops remembering it (its `delivery_retention`, or its signed
//! timestamp leaving `replay_window`), and the run id chosen for it. Once the run is
//! published to the runs stream the claim is marked published (on a task of its own,
//! after the 202). Another node that finds
//! the claim:
//! - published, under another delivery id (or none): a replay, answered `duplicate`
//!   with the first run's id, and nothing runs;
//! - published, under the same delivery id: the sender's retry or GitHub's "Redeliver",
//!   answered with the first run's id (as the runs stream's duplicate window does);
//! - not yet published, same delivery id: a retry while (or after) the first node was
//!   publishing: published again under the delivery id, which the runs stream's
//!   duplicate window keeps once;
//! - not yet published, another delivery id: 503 for [`PATIENCE`] (the first node may
//!   be publishing), then the claim is taken over: a node that died between its claim
//!   and its publish does not block the delivery for its whole retention.
//!
//! Values are JSON ([`Seen`]): the run id, the delivery id, the node and time of the
//! claim and whether it was published. They hold no body and no signature (the key is
//! the SHA-256 of the hook name and the signature's SHA-256).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Cluster, ClusterError, nats, retry};
use crate::runs::RunId;
use crate::trigger::webhook::ReplayKey;

/// How long a claim not yet published holds off a copy under another delivery id.
pub const PATIENCE: Duration = Duration::from_secs(30);
/// How long the marker of an expired claim stays in the bucket.
const MARKER_TTL: Duration = Duration::from_secs(60);
/// How many times a claim is tried when the key changes under it.
const ATTEMPTS: usize = 4;

/// The replay bucket's name for a cluster named `name`.
pub fn bucket(name: Option<&str>) -> String {
    match name {
        None => "capstan_replays".to_string(),
        Some(n) => format!("capstan_replays_{n}"),
    }
}

/// Opens (or creates) the bucket: one entry per remembered signature, each with its
/// own TTL.
pub(super) async fn open(
    js: &jetstream::Context,
    name: Option<&str>,
    replicas: usize,
) -> Result<kv::Store, ClusterError> {
    retry::kv_bucket(
        js,
        kv::Config {
            bucket: bucket(name),
            description: "Capstan webhook signatures accepted, against replays across nodes".into(),
            history: 1,
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::File,
            limit_markers: Some(MARKER_TTL),
            ..Default::default()
        },
        "creating the replay bucket",
    )
    .await
}

/// The bucket key of `hook`'s signature `signature` (hex SHA-256 of the signature).
pub fn key(hook: &str, signature: &str) -> String {
    let mut text = Vec::with_capacity(hook.len() + 1 + signature.len());
    text.extend_from_slice(hook.as_bytes());
    text.push(0);
    text.extend_from_slice(signature.as_bytes());
    format!("sig.{}", crate::plugin::cache::sha256_hex(&text))
}

/// A claim as the bucket holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub run_id: RunId,
    pub delivery: Option<String>,
    pub node: String,
    pub at: DateTime<Utc>,
    pub published: bool,
}

/// What the cluster makes of a delivery's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// New in the cluster: claimed by this node (the key and its revision).
    Mine { key: String, revision: u64 },
    /// Accepted before under another delivery id: a replay.
    Replay(RunId),
    /// Accepted and published before under the same delivery id.
    Accepted(RunId),
    /// Claimed under the same delivery id and not marked published: publish again (the
    /// runs stream's duplicate window keeps one).
    Retry,
    /// Claimed under another delivery id a moment ago: answer 503.
    Busy,
}

/// What to do on finding `other` when claiming for `delivery` at `now` (pure: the
/// rules of the module docs).
pub fn decide(other: &Seen, delivery: Option<&str>, now: DateTime<Utc>) -> Claimed {
    let same = delivery.is_some() && other.delivery.as_deref() == delivery;
    let patience = chrono::Duration::from_std(PATIENCE).unwrap_or_default();
    match (other.published, same) {
        (true, true) => Claimed::Accepted(other.run_id),
        (true, false) => Claimed::Replay(other.run_id),
        (false, true) => Claimed::Retry,
        (false, false) if now < other.at + patience => Claimed::Busy,
        // Abandoned: the caller takes it over.
        (false, false) => Claimed::Mine {
            key: String::new(),
            revision: 0,
        },
    }
}

/// The seconds of TTL for a claim remembered until `until` (at least one).
fn ttl(until: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    (until - now).num_seconds().max(1) as u64
}

impl Cluster {
    /// Puts `value` under `key` in the replay bucket only if the key's last revision is
    /// `expected` (0: the key has never been written or its last message is gone), with
    /// a TTL of `ttl_secs`. The new revision.
    async fn put_expecting(
        &self,
        key: &str,
        value: &Seen,
        expected: u64,
        ttl_secs: u64,
    ) -> Result<u64, String> {
        let kv = &self.replays;
        let subject = format!("{}{key}", kv.put_prefix.as_deref().unwrap_or(&kv.prefix));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        headers.insert("Nats-TTL", format!("{ttl_secs}s").as_str());
        let payload = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        Ok(ack.sequence)
    }

    /// Claims a delivery's verified signature across the cluster for run `run_id` (see
    /// the module docs).
    pub async fn claim_signature(
        &self,
        hook: &str,
        replay: &ReplayKey,
        delivery: Option<&str>,
        run_id: RunId,
    ) -> Result<Claimed, ClusterError> {
        let key = key(hook, &replay.signature);
        for _ in 0..ATTEMPTS {
            let now = Utc::now();
            let entry = self
                .replays
                .entry(&key)
                .await
                .map_err(|e| nats("reading the replay bucket")(e.to_string()))?;
            let expected = match &entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    match serde_json::from_slice::<Seen>(&e.value) {
                        Err(_) => {
                            tracing::warn!(%key, "cluster: a replay claim that does not parse is replaced");
                            e.revision
                        }
                        Ok(other) => match decide(&other, delivery, now) {
                            Claimed::Mine { .. } => {
                                tracing::warn!(hook, node = %other.node, "cluster: a delivery claim its node never published is taken over");
                                e.revision
                            }
                            verdict => return Ok(verdict),
                        },
                    }
                }
                // A delete marker, or nothing.
                Some(e) => e.revision,
                None => 0,
            };
            let seen = Seen {
                run_id,
                delivery: delivery.map(str::to_string),
                node: self.settings.node_name.clone(),
                at: now,
                published: false,
            };
            match self
                .put_expecting(&key, &seen, expected, ttl(replay.until, now))
                .await
            {
                Ok(revision) => return Ok(Claimed::Mine { key, revision }),
                Err(e) => {
                    tracing::debug!(%key, error = %e, "cluster: the replay claim changed under this node; looking again");
                }
            }
        }
        Ok(Claimed::Busy)
    }

    /// Marks this node's claim published under `run_id` (the run the cluster has for the
    /// delivery). A claim that cannot be marked stays unpublished: a replay under
    /// another delivery id is held off for [`PATIENCE`] and then taken over.
    pub async fn mark_published(
        &self,
        key: &str,
        revision: u64,
        replay: &ReplayKey,
        delivery: Option<&str>,
        run_id: RunId,
    ) {
        let now = Utc::now();
        let seen = Seen {
            run_id,
            delivery: delivery.map(str::to_string),
            node: self.settings.node_name.clone(),
            at: now,
            published: true,
        };
        if let Err(e) = self
            .put_expecting(key, &seen, revision, ttl(replay.until, now))
            .await
        {
            tracing::warn!(%key, error = %e, "cluster: cannot mark a delivery's signature claim published; a replay elsewhere is held off for a while, then may run");
        }
    }

    /// Gives up this node's claim (its run could not be published), so a retry runs.
    pub async fn release_signature(&self, key: &str, revision: u64) {
        if let Err(e) = self
            .replays
            .delete_expect_revision(key, Some(revision))
            .await
        {
            tracing::warn!(%key, error = %e, "cluster: cannot release a delivery's signature claim; a retry under another delivery id waits for it to be taken over");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(delivery: Option<&str>, published: bool, at: DateTime<Utc>) -> Seen {
        Seen {
            run_id: RunId::new(),
            delivery: delivery.map(str::to_string),
            node: "n1".into(),
            at,
            published,
        }
    }

    #[test]
    fn a_claim_found_is_a_replay_a_retry_or_busy_by_its_delivery_id_and_state() {
        let now: DateTime<Utc> = "2026-12-07T12:00:00Z".parse().unwrap();
        let p = seen(Some("d1"), true, now);
        assert_eq!(decide(&p, Some("d1"), now), Claimed::Accepted(p.run_id));
        assert_eq!(decide(&p, Some("d2"), now), Claimed::Replay(p.run_id));
        assert_eq!(decide(&p, None, now), Claimed::Replay(p.run_id));
        let no_id = seen(None, true, now);
        assert_eq!(decide(&no_id, None, now), Claimed::Replay(no_id.run_id));
        let pending = seen(Some("d1"), false, now);
        assert_eq!(decide(&pending, Some("d1"), now), Claimed::Retry);
        assert_eq!(decide(&pending, Some("d2"), now), Claimed::Busy);
        let later = now + chrono::Duration::seconds(31);
        assert!(matches!(
            decide(&pending, Some("d2"), later),
            Claimed::Mine { .. }
        ));
    }

    #[test]
    fn keys_hide_the_signature_and_differ_per_hook() {
        let sig = "ab".repeat(32);
        let k = key("gh", &sig);
        assert!(k.starts_with("sig.") && k.len() == 4 + 64, "{k}");
        assert!(!k.contains(&sig));
        assert_ne!(k, key("gh2", &sig));
        assert_eq!(
            ttl(Utc::now() - chrono::Duration::seconds(5), Utc::now()),
            1
        );
    }
}
