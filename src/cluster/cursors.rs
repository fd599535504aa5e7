//! Docker event cursors in cluster mode: how far each device's event stream has got,
//! shared through the KV bucket `capstan_cursors` (`capstan_cursors_NAME` with
//! `[cluster] name`), so that a node taking a device over resumes its stream where the
//! previous owner stopped instead of at the daemon's present time. Events that happen
//! between the old owner dying and the new one starting its stream (about a lease time)
//! are then run too.
//!
//! - **One key per device** ([`super::leases::lease_key`]), its value ([`StoredCursor`])
//!   a time on the daemon's clock, in nanoseconds, before which every event of the
//!   device has been handed to the cluster (or matched no trigger), and the node that
//!   wrote it. Only the device's owner writes it, while it holds the lease
//!   ([`Cluster::save_cursor`]): when it moved, at most every [`WRITE_EVERY`] while
//!   events come and every [`IDLE_WRITE_EVERY`] while none do, and once more when the
//!   node gives the device back or stops cleanly, before its lease goes. When the
//!   owner stops watching a device it keeps (no plugin listens to it any more, or the
//!   device changed), the cursor goes: the next stream starts at the present.
//! - **Resuming** ([`resume_at`]): a node starting a device's stream without a cursor
//!   of its own reads the stored one. When it is at most [`REPLAY_BOUND`] older than
//!   the daemon's present time, the stream starts there (`/events?since=`); the events
//!   re-read that the previous owner had handed over already carry the same message id
//!   and are dropped by the runs stream's duplicate window ([`super::DUPLICATE_WINDOW`]),
//!   which the bound stays inside with a margin ([`REPLAY_MARGIN`]) for the hop and a
//!   short debounce. An older cursor (the device had no owner for longer, e.g. the
//!   whole cluster was down) is not replayed: the stream starts at the present and a
//!   warning names the span of events not replayed.
//! - **Bounded by the daemon.** `since=` replays from the daemon's in-memory buffer of
//!   recent events (the last 256 in dockerd): events beyond it are not replayed.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::kv::Operation;
use serde::{Deserialize, Serialize};

use super::leases::lease_key;
use super::{Cluster, ClusterError, DUPLICATE_WINDOW, nats};

/// How often the owner writes a cursor that moved while events come.
pub const WRITE_EVERY: Duration = Duration::from_secs(2);
/// How often the owner writes a cursor that moved only because time passed with no event.
pub const IDLE_WRITE_EVERY: Duration = Duration::from_secs(10);
/// What the replay bound keeps back from the duplicate window: the time from reading the
/// cursor to handing a re-read event over again (the stream's start, a debounce).
pub const REPLAY_MARGIN: Duration = Duration::from_secs(30);
/// The oldest stored cursor a new owner resumes from (on the daemon's clock).
pub const REPLAY_BOUND: Duration =
    Duration::from_secs(DUPLICATE_WINDOW.as_secs() - REPLAY_MARGIN.as_secs());
/// How long a cursor nobody writes stays in the bucket (it is not used past
/// [`REPLAY_BOUND`]; kept a while longer to say what was not replayed).
const KEEP: Duration = Duration::from_secs(3600);

/// A device's cursor as stored in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCursor {
    /// Daemon time (ns since the Unix epoch) before which every event was handed over.
    pub nanos: i64,
    /// The node that wrote it.
    pub node: String,
}

impl StoredCursor {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a cursor serializes")
    }

    /// The cursor in `bytes`, or `None` when they are not one.
    pub fn decode(bytes: &[u8]) -> Option<StoredCursor> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Where a device's stream starts on a node that has no cursor of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// At the stored cursor (daemon nanos).
    Stored(i64),
    /// At the present: nothing is stored.
    Fresh,
    /// At the present: the stored cursor is older than the bound by `age`.
    TooOld { age: Duration },
    /// At the present: the stored cursor is ahead of the daemon's clock by `by` (its
    /// clock was set back, or the name means another daemon now).
    Ahead { by: Duration },
}

/// Where to start, for `stored` and the daemon's present time `now` (both daemon nanos),
/// resuming only from a cursor at most `bound` old.
pub fn resume_at(stored: Option<i64>, now: i64, bound: Duration) -> Resume {
    let Some(at) = stored else {
        return Resume::Fresh;
    };
    let nanos = |n: i64| Duration::from_nanos(n.unsigned_abs());
    let age = now.saturating_sub(at);
    if age < 0 {
        Resume::Ahead { by: nanos(age) }
    } else if nanos(age) > bound {
        Resume::TooOld { age: nanos(age) }
    } else {
        Resume::Stored(at)
    }
}

/// The cursor bucket.
pub struct Cursors {
    kv: jetstream::kv::Store,
}

impl Cursors {
    /// Opens (or creates) the cursor bucket `bucket`.
    pub(super) async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
    ) -> Result<Cursors, ClusterError> {
        let kv = super::retry::kv_bucket(
            js,
            jetstream::kv::Config {
                bucket: bucket.to_string(),
                description:
                    "Capstan Docker event cursors: how far each device's events were handed over"
                        .into(),
                history: 1,
                max_age: KEEP,
                num_replicas: replicas,
                ..Default::default()
            },
            "creating the event cursor bucket",
        )
        .await?;
        Ok(Cursors { kv })
    }
}

impl Cluster {
    /// `device`'s event cursor as the bucket has it (`None`: nothing stored, or not a
    /// cursor).
    pub async fn load_cursor(&self, device: &str) -> Result<Option<StoredCursor>, ClusterError> {
        let entry = self
            .cursors
            .kv
            .entry(lease_key(device))
            .await
            .map_err(|e| nats("reading a device's event cursor")(e.to_string()))?;
        Ok(entry
            .filter(|e| e.operation == Operation::Put)
            .and_then(|e| StoredCursor::decode(&e.value)))
    }

    /// Stores `device`'s event cursor at `nanos` if this node holds the device now;
    /// whether it was written.
    pub async fn save_cursor(&self, device: &str, nanos: i64) -> Result<bool, ClusterError> {
        if !self.holds(device) {
            return Ok(false);
        }
        let value = StoredCursor {
            nanos,
            node: self.settings.node_name.clone(),
        };
        self.cursors
            .kv
            .put(lease_key(device), value.encode().into())
            .await
            .map_err(|e| nats("writing a device's event cursor")(e.to_string()))?;
        Ok(true)
    }

    /// Removes `device`'s event cursor if this node holds the device: its stream stopped
    /// here for good (no plugin listens to it any more, or it changed), so a later
    /// stream starts at the present.
    pub async fn forget_cursor(&self, device: &str) {
        if !self.holds(device) {
            return;
        }
        if let Err(e) = self.cursors.kv.delete(lease_key(device)).await {
            tracing::debug!(%device, error = %e, "cluster: cannot remove the device's event cursor");
        }
    }

    /// Writes `device`'s event cursor one last time, as the node's event stream has it,
    /// before the node lets go of the device's lease (called while it still holds it).
    pub(super) async fn release_cursor(
        &self,
        scheduler: &crate::scheduler::Scheduler,
        device: &str,
    ) {
        let Some(nanos) = scheduler.triggers().docker.position(device) else {
            return;
        };
        match self.save_cursor(device, nanos).await {
            Ok(_) => {
                tracing::debug!(%device, nanos, "cluster: device's event cursor written at release")
            }
            Err(e) => {
                tracing::warn!(%device, error = %e, "cluster: cannot write the device's event cursor at release; its next owner resumes from the one written before")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_travels_as_json_with_its_nanoseconds_exact() {
        let c = StoredCursor {
            nanos: 1_700_000_000_123_456_789,
            node: "n2".into(),
        };
        let wire = c.encode();
        assert_eq!(
            String::from_utf8(wire.clone()).unwrap(),
            r#"{"nanos":1700000000123456789,"node":"n2"}"#
        );
        assert_eq!(StoredCursor::decode(&wire), Some(c));
        assert_eq!(StoredCursor::decode(b"not json"), None);
        assert_eq!(StoredCursor::decode(br#"{"nanos":"1"}"#), None);
    }

    #[test]
    fn a_stored_cursor_is_resumed_from_only_within_the_bound_and_not_from_the_future() {
        let s = 1_000_000_000i64;
        let now = 1_700_000_000 * s;
        let bound = REPLAY_BOUND;
        assert_eq!(resume_at(None, now, bound), Resume::Fresh);
        assert_eq!(resume_at(Some(now), now, bound), Resume::Stored(now));
        assert_eq!(
            resume_at(Some(now - 20 * s), now, bound),
            Resume::Stored(now - 20 * s)
        );
        let edge = now - i64::try_from(bound.as_nanos()).unwrap();
        assert_eq!(resume_at(Some(edge), now, bound), Resume::Stored(edge));
        assert_eq!(
            resume_at(Some(edge - 1), now, bound),
            Resume::TooOld {
                age: bound + Duration::from_nanos(1)
            }
        );
        assert_eq!(
            resume_at(Some(now + 3 * s), now, bound),
            Resume::Ahead {
                by: Duration::from_secs(3)
            }
        );
        // Far apart clocks do not overflow.
        assert!(matches!(
            resume_at(Some(i64::MIN), i64::MAX, bound),
            Resume::TooOld { .. }
        ));
        assert!(matches!(
            resume_at(Some(i64::MAX), i64::MIN, bound),
            Resume::Ahead { .. }
        ));
    }

    #[test]
    fn the_bound_leaves_a_margin_inside_the_duplicate_window() {
        assert!(REPLAY_BOUND + REPLAY_MARGIN <= DUPLICATE_WINDOW);
        assert!(REPLAY_BOUND >= Duration::from_secs(60));
        // A cursor written while idle (held back by the slack) is still young enough
        // after a default takeover (a 15 s lease and three renewal periods).
        let idle = IDLE_WRITE_EVERY + crate::trigger::docker::watch::IDLE_SLACK;
        assert!(idle + Duration::from_secs(15 + 15) < REPLAY_BOUND);
    }
}
