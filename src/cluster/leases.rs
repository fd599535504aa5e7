//! Device ownership in cluster mode: each device's Docker connections live on one node
//! at a time, the one holding the device's lease in the KV bucket `capstan_leases`
//! (`capstan_leases_NAME` with `[cluster] name`).
//!
//! - **One key per device name** ([`lease_key`]), its value the owner's name and
//!   process ([`Lease`]). A node takes a free device with `create` (which fails when the
//!   key exists), renews it every third of the lease time with `update` at the revision
//!   it wrote last (compare-and-swap: a node that lost the key cannot write it back), and
//!   the bucket's `max_age` (the lease time, `[cluster] lease`) removes the key of a
//!   node that stopped renewing. Then another node creates it: the device is taken
//!   over within the lease time plus one renewal period.
//! - **Spread.** A node claims a free device when it ranks first for it among the alive
//!   nodes by rendezvous hashing ([`rank`]), or when the device has stayed free for two
//!   renewal periods (its first-ranked node is not claiming it). A holder gives a device
//!   back when another node that ranks first for it has been alive for a lease time, so
//!   devices spread again after nodes join; the gap is one renewal period.
//! - **Fencing.** A node acts on a device (opens its connections, serves host calls
//!   for it, watches its events) only while [`Cluster::holds`] it: it holds the lease
//!   and its last successful renewal was *sent* less than the lease time minus a margin
//!   ago ([`fresh`]). The key expires on the servers a lease time after that renewal
//!   was *written*, which is later, so a node stops acting before anyone else can
//!   take the device over (as long as clocks run at about the same rate; no wall clock
//!   is compared). On losing a lease (the compare-and-swap fails, or renewals stop
//!   getting through, e.g. cut off from NATS) the node drops the device's pooled
//!   connections and stops its event stream.
//!
//! A node that lets a device go cleanly (gives it back, stops) first writes how far it
//! handed the device's Docker events over ([`super::cursors`]), while it still holds
//! the lease.
//!
//! Devices are still each node's own (sled): a node claims only devices it has, by
//! name; the same name must mean the same daemon on every node.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::kv::Operation;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{Cluster, ClusterError, nats};
use crate::scheduler::Scheduler;

/// A device's lease as stored in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The owner node's name.
    pub owner: String,
    /// The owner's process (a restarted node is a new owner).
    pub instance: String,
    /// When the owner took the device (its clock).
    pub since: DateTime<Utc>,
    /// When the owner last renewed the lease (its clock).
    pub renewed_at: DateTime<Utc>,
}

/// A lease as `capstan cluster status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseView {
    pub device: String,
    /// The owner node.
    pub owner: String,
    /// When the owner took the device (its clock).
    pub since: DateTime<Utc>,
    /// Seconds since the owner took the device.
    pub age_secs: f64,
    /// Seconds until the lease expires unless renewed (by the owner's last renewal).
    pub expires_in_secs: f64,
    /// The answering node owns it.
    pub this_node: bool,
}

/// Why this node cannot send a device's requests anywhere: it does not hold the device
/// and no other node does either (or it cannot tell).
#[derive(Debug, thiserror::Error)]
pub enum NoOwner {
    #[error(
        "device {device}: this node does not own it and cannot reach the cluster to find its owner ({detail})"
    )]
    Unknown { device: String, detail: String },
    #[error(
        "device {device} has no owner node in the cluster yet (a node takes it within {secs} s of its lease being free); try again"
    )]
    Free { device: String, secs: u64 },
    #[error(
        "device {device}: this node does not own it now (its lease renewals are not getting through to NATS), so it does not act on it"
    )]
    Fenced { device: String },
}

impl NoOwner {
    /// A short word for reports (`device check`): `unreachable`, `no-owner`, `not-owner`.
    pub fn kind(&self) -> &'static str {
        match self {
            NoOwner::Unknown { .. } => "unreachable",
            NoOwner::Free { .. } => "no-owner",
            NoOwner::Fenced { .. } => "not-owner",
        }
    }
}

/// This node's hold on one device.
#[derive(Debug, Clone)]
struct Held {
    /// The revision of our last write.
    revision: u64,
    /// When our last successful renewal (or the create) was sent.
    renewed: Instant,
    since: DateTime<Utc>,
}

/// The lease bucket and what this node holds in it.
pub struct Leases {
    kv: jetstream::kv::Store,
    /// The lease time: the bucket's `max_age` (the first node's setting).
    lease: Duration,
    held: Mutex<HashMap<String, Held>>,
    /// Devices seen free, since when (for the claim of a device whose first-ranked node
    /// does not take it).
    free_since: Mutex<HashMap<String, Instant>>,
    /// Nodes seen alive, since when (a node ranking first gets a device handed back only
    /// once it has been alive a while).
    alive_since: Mutex<HashMap<String, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Leases {
    /// Opens (or creates) the lease bucket `bucket` with `max_age` = `lease`. An existing
    /// bucket keeps its own lease time, which then applies here too.
    pub(super) async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
        lease: Duration,
    ) -> Result<Leases, ClusterError> {
        let kv = super::retry::kv_bucket(
            js,
            jetstream::kv::Config {
                bucket: bucket.to_string(),
                description: "Capstan device leases: one owner node per device".into(),
                history: 1,
                max_age: lease,
                num_replicas: replicas,
                ..Default::default()
            },
            "creating the lease bucket",
        )
        .await?;
        let kv_status = kv
            .status()
            .await
            .map_err(|e| nats("reading the lease bucket")(e.to_string()))?;
        let max_age = kv_status.info.config.max_age;
        let effective = if max_age.is_zero() { lease } else { max_age };
        if effective != lease {
            tracing::warn!(
                bucket,
                lease = ?effective,
                "cluster: the lease bucket exists with another lease time than this node's cluster.lease; the bucket's applies"
            );
        }
        Ok(Leases {
            kv,
            lease: effective,
            held: Mutex::new(HashMap::new()),
            free_since: Mutex::new(HashMap::new()),
            alive_since: Mutex::new(HashMap::new()),
        })
    }

    /// The lease time in force.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// How often a holder renews.
    pub fn renewal(&self) -> Duration {
        renewal(self.lease)
    }
}

/// How often a lease is renewed: a third of its time.
pub fn renewal(lease: Duration) -> Duration {
    lease / 3
}

/// How long before the lease time a holder stops acting: a fifth of it.
fn margin(lease: Duration) -> Duration {
    lease / 5
}

/// Whether a hold whose last renewal was sent at `renewed` still allows acting at `now`.
pub fn fresh(renewed: Instant, now: Instant, lease: Duration) -> bool {
    now.saturating_duration_since(renewed) < lease.saturating_sub(margin(lease))
}

/// The KV key of a device: its name when that is a valid key (device names are
/// letters, digits, `.`, `_`, `-`; a key may not end with `.` nor hold `..`), else
/// `x=` and the name in hex (`=` never occurs in a device name, so no clash).
pub fn lease_key(device: &str) -> String {
    let plain = !device.is_empty()
        && !device.starts_with('.')
        && !device.ends_with('.')
        && !device.contains("..")
        && device
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if plain {
        device.to_string()
    } else {
        format!("x={}", hex::encode(device.as_bytes()))
    }
}

/// The device of a key made by [`lease_key`].
pub fn device_of_key(key: &str) -> Option<String> {
    match key.strip_prefix("x=") {
        Some(h) => hex::decode(h).ok().and_then(|b| String::from_utf8(b).ok()),
        None => Some(key.to_string()),
    }
}

/// The rendezvous score of `node` for `device`: the first 8 bytes of
/// sha256(node NUL device), the same on every node and every version.
fn score(node: &str, device: &str) -> u64 {
    let mut h = sha2::Sha256::new();
    h.update(node.as_bytes());
    h.update([0u8]);
    h.update(device.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// `nodes` ordered by their claim on `device`, best first (ties by name).
pub fn rank<'a>(nodes: &'a [String], device: &str) -> Vec<&'a str> {
    let mut v: Vec<(u64, &str)> = nodes
        .iter()
        .map(|n| (score(n, device), n.as_str()))
        .collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    v.dedup_by(|a, b| a.1 == b.1);
    v.into_iter().map(|(_, n)| n).collect()
}

impl Cluster {
    fn lease_value(&self, since: DateTime<Utc>) -> Result<bytes::Bytes, ClusterError> {
        let lease = Lease {
            owner: self.settings.node_name.clone(),
            instance: self.instance.clone(),
            since,
            renewed_at: Utc::now(),
        };
        serde_json::to_vec(&lease)
            .map(Into::into)
            .map_err(|e| nats("encoding a lease")(e.to_string()))
    }

    /// Whether this node may act on `device` now: it holds the lease and renewed it
    /// recently enough (see the module docs).
    pub fn holds(&self, device: &str) -> bool {
        let leases = &self.leases;
        lock(&leases.held)
            .get(device)
            .is_some_and(|h| fresh(h.renewed, Instant::now(), leases.lease))
    }

    /// The lease time in force (the lease bucket's).
    pub fn lease_time(&self) -> Duration {
        self.leases.lease
    }

    /// The device's lease as the bucket has it now (`None`: no node owns it).
    pub async fn lease_of(&self, device: &str) -> Result<Option<Lease>, ClusterError> {
        let entry = self
            .leases
            .kv
            .entry(lease_key(device))
            .await
            .map_err(|e| nats("reading a device lease")(e.to_string()))?;
        Ok(entry
            .filter(|e| e.operation == Operation::Put)
            .and_then(|e| serde_json::from_slice::<Lease>(&e.value).ok()))
    }

    /// The other node that owns `device`, for a device this node does not hold now
    /// ([`Cluster::holds`] is false): its lease, or why there is none to send to. A
    /// lease still naming this process (renewals not getting through) is no owner.
    pub async fn owner_elsewhere(&self, device: &str) -> Result<Lease, NoOwner> {
        match self.lease_of(device).await {
            Err(e) => Err(NoOwner::Unknown {
                device: device.to_string(),
                detail: e.to_string(),
            }),
            Ok(None) => Err(NoOwner::Free {
                device: device.to_string(),
                secs: self.leases.lease.as_secs(),
            }),
            Ok(Some(l)) if l.instance == self.instance => Err(NoOwner::Fenced {
                device: device.to_string(),
            }),
            Ok(Some(l)) => Ok(l),
        }
    }

    /// Every lease in the bucket, by device.
    pub async fn lease_views(&self) -> Result<Vec<LeaseView>, ClusterError> {
        let mut keys = match self.leases.kv.keys().await {
            Ok(k) => k,
            Err(e) => return Err(nats("listing the leases")(e.to_string())),
        };
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.map_err(|e| nats("listing the leases")(e.to_string()))?);
        }
        let now = Utc::now();
        let lease = self.leases.lease;
        let mut out = Vec::new();
        for key in names {
            let Some(device) = device_of_key(&key) else {
                continue;
            };
            let Some(l) = self.lease_of(&device).await? else {
                continue;
            };
            let secs = |d: chrono::Duration| d.num_milliseconds() as f64 / 1000.0;
            let expires = secs(chrono::Duration::from_std(lease).unwrap_or_default())
                - secs(now - l.renewed_at);
            out.push(LeaseView {
                this_node: l.instance == self.instance,
                device,
                owner: l.owner,
                since: l.since,
                age_secs: secs(now - l.since).max(0.0),
                expires_in_secs: expires.max(0.0),
            });
        }
        out.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(out)
    }

    /// Keeps this node's leases until `stopped`: every renewal period, renews what it
    /// holds, claims the free devices it ranks first for, gives back what another node
    /// should have, and drops what it lost. Releases everything it holds when stopped.
    pub async fn keep_leases(
        self: Arc<Self>,
        scheduler: Arc<Scheduler>,
        stopped: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stopped);
        let mut every = tokio::time::interval(self.leases.renewal());
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                _ = every.tick() => {}
            }
            if self.lease_round(&scheduler).await {
                scheduler.triggers().docker.reconcile();
            }
        }
        // Each device's event cursor is written while the lease is still held, so that
        // the next owner resumes where this node stopped.
        let devices: Vec<String> = lock(&self.leases.held).keys().cloned().collect();
        for device in &devices {
            self.release_cursor(&scheduler, device).await;
        }
        let held: Vec<(String, Held)> = lock(&self.leases.held).drain().collect();
        for (device, h) in held {
            // Only our own write is removed: a purge at our revision would be a race,
            // a plain delete is what a clean stop owes (it still holds the key).
            if let Err(e) = self.leases.kv.delete(lease_key(&device)).await {
                tracing::warn!(%device, error = %e, "cluster: cannot release a device lease at shutdown; it expires by itself");
            }
            tracing::debug!(%device, revision = h.revision, "cluster: device lease released");
        }
        scheduler.triggers().docker.reconcile();
    }

    /// One renewal period's work; whether what this node holds changed.
    async fn lease_round(&self, scheduler: &Arc<Scheduler>) -> bool {
        let engine = scheduler.engine();
        let devices = match engine.devices().and_then(|d| d.list()) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot list the devices for their leases");
                return self.drop_stale(scheduler);
            }
        };
        let mut alive: Vec<String> = match self.nodes().await {
            Ok(n) => n.into_iter().filter(|n| n.alive).map(|n| n.name).collect(),
            Err(e) => {
                tracing::debug!(error = %e, "cluster: cannot read the nodes for the leases");
                Vec::new()
            }
        };
        if !alive.contains(&self.settings.node_name) {
            alive.push(self.settings.node_name.clone());
        }
        let now = Instant::now();
        {
            let mut seen = lock(&self.leases.alive_since);
            seen.retain(|n, _| alive.contains(n));
            for n in &alive {
                seen.entry(n.clone()).or_insert(now);
            }
        }
        let mut changed = false;
        let names: HashSet<String> = devices.iter().map(|d| d.name.clone()).collect();
        for dev in &devices {
            changed |= self.lease_device(scheduler, dev, &alive).await;
        }
        // Devices removed here: their leases go.
        let gone: Vec<String> = lock(&self.leases.held)
            .keys()
            .filter(|d| !names.contains(*d))
            .cloned()
            .collect();
        for device in gone {
            lock(&self.leases.held).remove(&device);
            let _ = self.leases.kv.delete(lease_key(&device)).await;
            changed = true;
        }
        lock(&self.leases.free_since).retain(|d, _| names.contains(d));
        changed | self.drop_stale(scheduler)
    }

    /// Drops holds whose renewals have not got through for too long.
    fn drop_stale(&self, scheduler: &Arc<Scheduler>) -> bool {
        let lease = self.leases.lease;
        let now = Instant::now();
        let stale: Vec<String> = lock(&self.leases.held)
            .iter()
            .filter(|(_, h)| !fresh(h.renewed, now, lease))
            .map(|(d, _)| d.clone())
            .collect();
        for device in &stale {
            tracing::warn!(%device, "cluster: this node's lease on the device could not be renewed in time; it stops acting on it");
            self.lose(scheduler, device);
        }
        !stale.is_empty()
    }

    /// This node no longer owns `device`: its connections go (the event stream stops
    /// at the next reconcile).
    fn lose(&self, scheduler: &Arc<Scheduler>, device: &str) {
        lock(&self.leases.held).remove(device);
        if let Ok(d) = scheduler.engine().devices().and_then(|d| d.get(device)) {
            scheduler.engine().docker.forget(d.id);
        }
    }

    /// Renews, claims or gives back one device's lease; whether the hold changed.
    async fn lease_device(
        &self,
        scheduler: &Arc<Scheduler>,
        dev: &crate::device::Device,
        alive: &[String],
    ) -> bool {
        let device = dev.name.as_str();
        let key = lease_key(device);
        let kv = &self.leases.kv;
        let me = self.settings.node_name.as_str();
        let held = lock(&self.leases.held).get(device).cloned();
        if let Some(h) = held {
            let ranking = rank(alive, device);
            let first = ranking.first().copied().unwrap_or(me);
            let settled = lock(&self.leases.alive_since)
                .get(first)
                .is_some_and(|t| t.elapsed() >= self.leases.lease);
            if first != me && settled {
                tracing::info!(%device, to = first, "cluster: device lease given back to the node it belongs to");
                self.release_cursor(scheduler, device).await;
                self.lose(scheduler, device);
                let _ = kv.delete(&key).await;
                return true;
            }
            let sent = Instant::now();
            let value = match self.lease_value(h.since) {
                Ok(v) => v,
                Err(_) => return false,
            };
            return match kv.update(&key, value, h.revision).await {
                Ok(revision) => {
                    if let Some(x) = lock(&self.leases.held).get_mut(device) {
                        x.revision = revision;
                        x.renewed = sent;
                    }
                    false
                }
                Err(e) => {
                    use async_nats::jetstream::kv::UpdateErrorKind;
                    if e.kind() == UpdateErrorKind::WrongLastRevision {
                        tracing::warn!(%device, "cluster: another node holds the device's lease now; this node stops acting on it");
                        self.lose(scheduler, device);
                        true
                    } else {
                        // NATS unreachable: keep trying; fencing drops it when too old.
                        tracing::warn!(%device, error = %e, "cluster: cannot renew the device lease");
                        false
                    }
                }
            };
        }
        let entry = match kv.entry(&key).await {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(%device, error = %e, "cluster: cannot read the device lease");
                return false;
            }
        };
        if let Some(e) = entry.filter(|e| e.operation == Operation::Put) {
            lock(&self.leases.free_since).remove(device);
            if let Ok(l) = serde_json::from_slice::<Lease>(&e.value)
                && l.instance == self.instance
            {
                // Ours (written before a hiccup forgot it): adopt it at its revision.
                lock(&self.leases.held).insert(
                    device.to_string(),
                    Held {
                        revision: e.revision,
                        renewed: Instant::now() - self.leases.lease,
                        since: l.since,
                    },
                );
            }
            return false;
        }
        let free_for = lock(&self.leases.free_since)
            .entry(device.to_string())
            .or_insert_with(Instant::now)
            .elapsed();
        let first = rank(alive, device).first().copied() == Some(me);
        if !first && free_for <= self.leases.renewal() * 2 {
            return false;
        }
        let since = Utc::now();
        let sent = Instant::now();
        let Ok(value) = self.lease_value(since) else {
            return false;
        };
        match kv.create(&key, value).await {
            Ok(revision) => {
                lock(&self.leases.free_since).remove(device);
                lock(&self.leases.held).insert(
                    device.to_string(),
                    Held {
                        revision,
                        renewed: sent,
                        since,
                    },
                );
                tracing::info!(%device, node = me, "cluster: this node owns the device now");
                true
            }
            Err(e) => {
                tracing::debug!(%device, error = %e, "cluster: another node took the device first");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_ranking_is_stable_and_spreads_devices() {
        let nodes: Vec<String> = ["n1", "n2", "n3"].map(String::from).into();
        let r = rank(&nodes, "web-1");
        assert_eq!(r.len(), 3);
        assert_eq!(r, rank(&nodes, "web-1"), "the same on every call");
        let shuffled: Vec<String> = ["n3", "n1", "n2"].map(String::from).into();
        assert_eq!(
            r,
            rank(&shuffled, "web-1"),
            "the order of the list does not matter"
        );
        // Removing a node that does not rank first leaves the first in place.
        let without: Vec<String> = nodes.iter().filter(|n| *n != r[2]).cloned().collect();
        assert_eq!(rank(&without, "web-1")[0], r[0]);
        // Many devices spread over all three nodes, none taking nearly all.
        let mut per: HashMap<&str, usize> = HashMap::new();
        for i in 0..300 {
            *per.entry(rank(&nodes, &format!("dev-{i}"))[0]).or_default() += 1;
        }
        assert_eq!(per.len(), 3, "{per:?}");
        assert!(per.values().all(|&n| (50..=150).contains(&n)), "{per:?}");
    }

    #[test]
    fn a_hold_allows_acting_only_until_the_lease_time_less_the_margin() {
        let lease = Duration::from_secs(15);
        let t = Instant::now();
        assert!(fresh(t, t, lease));
        assert!(fresh(t, t + Duration::from_secs(11), lease));
        assert!(
            !fresh(t, t + Duration::from_secs(12), lease),
            "margin of 3s"
        );
        assert!(!fresh(t, t + Duration::from_secs(15), lease));
        // One missed renewal (every 5s) still holds; two do not.
        assert!(fresh(t, t + renewal(lease) * 2, lease));
        assert!(!fresh(t, t + renewal(lease) * 3, lease));
    }

    #[test]
    fn device_names_map_to_valid_keys_and_back() {
        for name in ["web-1", "a.b_c", "x", "prod.eu-1"] {
            assert_eq!(lease_key(name), name);
            assert_eq!(device_of_key(&lease_key(name)).as_deref(), Some(name));
        }
        for name in ["ends.", "a..b"] {
            let key = lease_key(name);
            assert!(key.starts_with("x="), "{key}");
            assert!(!key.ends_with('.') && !key.contains(".."));
            assert_eq!(device_of_key(&key).as_deref(), Some(name));
        }
    }
}
