//! The cluster's run history: every node lists every run of the cluster.
//!
//! A run's end travels through the stream `CAPSTAN_HISTORY` (`CAPSTAN_HISTORY_<NAME>`
//! for a named cluster), one subject per run, `capstan.history.<run id>`
//! (`capstan.<name>.history.<run id>`), keeping one message per subject (the run's
//! latest end) for the engine's history retention (`runs.max_age`).
//!
//! - The node that ran a run writes its final record to its own history first, then
//!   publishes it here and waits for JetStream's ack, and only then acks the run on
//!   the runs stream ([`super::work`]). So a run acked is a run whose end is in the
//!   cluster's history; a node that dies between the two leaves the run to be delivered
//!   again, and the retry publishes the same run id's end again (the stream keeps one).
//! - Every node reads the stream from its start with an ordered consumer
//!   ([`Cluster::apply_history`]) and stores each record in its own history
//!   ([`RunStore::apply_replicated`]): a final record replaces an earlier attempt's
//!   record held here (e.g. `interrupted` when this node died mid-run), never a run this
//!   process runs now. `capstan runs` and `GET /api/runs` on any node list every run
//!   that has ended anywhere; a run still queued or running is listed on its own node
//!   only (only ends are replicated).
//! - A webhook's `?wait=true` in cluster mode waits for its run id's final record to
//!   arrive here ([`wait_for_end`]).
//!
//! Delivery is at-least-once in both directions: a record may be published twice (a
//! retry after a lost ack) and applied twice (a node's consumer re-reads from the start
//! at every start); one record per run id is kept, so the listing is exactly-once per
//! run id.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{Cluster, ClusterError, ClusterSettings, nats, retry};
use crate::runs::{RunId, RunRecord, RunStore, RunTrigger};

/// How long the history applier waits before it reads the stream again after an error.
const REOPEN_DELAY: Duration = Duration::from_secs(1);
/// The file in the data directory holding how far this node applied the history stream.
pub const POSITION_FILE: &str = "cluster-history.json";
/// How often the applied position is stored while records arrive.
const SAVE_EVERY: Duration = Duration::from_secs(2);
/// How long the webhook ids of recently ended runs are remembered, to answer a
/// duplicate delivery with its run's id (longer than the runs stream's duplicate window).
const REMEMBER_DELIVERIES: Duration = Duration::from_secs(300);

/// The history stream's name and subject prefix for these settings.
pub fn names(settings: &ClusterSettings) -> (String, String) {
    match &settings.name {
        None => ("CAPSTAN_HISTORY".to_string(), "capstan.history".to_string()),
        Some(n) => (
            format!("CAPSTAN_HISTORY_{}", n.to_uppercase().replace('-', "_")),
            format!("capstan.{n}.history"),
        ),
    }
}

/// This node's side of the history stream.
pub struct HistoryStream {
    pub(super) stream: String,
    pub(super) prefix: String,
    /// The stream sequence of the last record this node applied (0: none yet).
    applied: AtomicU64,
    /// Delivery `Nats-Msg-Id` → run id of runs that ended lately (from the records
    /// applied), so a duplicate delivery is answered with its run's id.
    recent: Mutex<HashMap<String, (RunId, Instant)>>,
}

/// Creates (or finds) the history stream, with the runs stream's replicas. Retried
/// while NATS elects leaders ([`retry::with_retry`]).
pub(super) async fn create(
    js: &jetstream::Context,
    settings: &ClusterSettings,
    replicas: usize,
) -> Result<HistoryStream, ClusterError> {
    let (stream, prefix) = names(settings);
    let config = jetstream::stream::Config {
        name: stream.clone(),
        description: Some(
            "Capstan run history: the latest end of each run, one subject per run id".into(),
        ),
        subjects: vec![format!("{prefix}.>")],
        retention: jetstream::stream::RetentionPolicy::Limits,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        max_messages_per_subject: 1,
        max_age: settings.history_max_age.unwrap_or_default(),
        ..Default::default()
    };
    retry::with_retry("creating the history stream", || {
        let config = config.clone();
        async move {
            js.get_or_create_stream(config)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await?;
    Ok(HistoryStream {
        stream,
        prefix,
        applied: AtomicU64::new(0),
        recent: Mutex::new(HashMap::new()),
    })
}

/// The history stream as `capstan cluster status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryView {
    /// The stream's name (`CAPSTAN_HISTORY`).
    pub stream: String,
    pub replicas: usize,
    /// Runs whose end it holds.
    pub messages: u64,
    /// Its last sequence.
    pub last_sequence: u64,
    /// The last sequence the answering node has applied to its own history.
    pub applied_sequence: u64,
    /// Records the answering node has not applied yet.
    pub lag: u64,
}

/// The `Nats-Msg-Id` a record's webhook delivery was published under, when it had a
/// delivery id.
fn delivery_of(record: &RunRecord) -> Option<String> {
    match &record.trigger {
        RunTrigger::Webhook {
            hook,
            delivery: Some(d),
        } => Some(super::delivery_msg_id(hook, Some(d))),
        _ => None,
    }
}

/// Whether a run with this trigger is started on the node where it was asked for (its
/// end published by [`Cluster::publish_local_ends`]) rather than taken from the runs
/// stream (cron fires, webhook deliveries and Docker events, whose ends the taking node
/// publishes before it acks).
pub fn started_here(trigger: &RunTrigger) -> bool {
    match trigger {
        RunTrigger::Manual { .. } | RunTrigger::Run { .. } => true,
        RunTrigger::Cron { .. } | RunTrigger::Webhook { .. } | RunTrigger::Docker { .. } => false,
    }
}

impl HistoryStream {
    fn remember(&self, record: &RunRecord) {
        let Some(msg_id) = delivery_of(record) else {
            return;
        };
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= 4_096 && recent.len().is_power_of_two() {
            recent.retain(|_, (_, at)| at.elapsed() < REMEMBER_DELIVERIES);
        }
        recent.insert(msg_id, (record.id, Instant::now()));
    }

    /// The run id of a delivery whose run ended lately, as this node knows it.
    pub fn recent_run(&self, msg_id: &str) -> Option<RunId> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.get(msg_id).map(|(id, _)| *id)
    }
}

impl Cluster {
    /// Publishes a run's final record to the history stream and waits for JetStream's
    /// ack.
    pub async fn publish_record(&self, record: &RunRecord) -> Result<(), ClusterError> {
        let payload =
            serde_json::to_vec(record).map_err(|e| nats("encoding a run record")(e.to_string()))?;
        let subject = format!("{}.{}", self.history.prefix, record.id);
        self.js
            .publish(subject, payload.into())
            .await
            .map_err(|e| nats("publishing a run record")(e.to_string()))?
            .await
            .map_err(|e| nats("waiting for the run record's publish ack")(e.to_string()))?;
        if let Some(m) = self.metrics.get() {
            m.history_published.inc();
        }
        Ok(())
    }

    /// Publishes a run's end to the history stream, trying again for a while (half the
    /// ack deadline, at least 2 s); when NATS does not take it the record stays on this
    /// node only, with a warning.
    pub(super) async fn publish_end(&self, record: &RunRecord) {
        let patience = (self.ack_wait / 2).max(Duration::from_secs(2));
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match self.publish_record(record).await {
                Ok(()) => return,
                Err(e) if started.elapsed() + pause > patience => {
                    tracing::warn!(run = %record.id, error = %e, "cluster: the run's end could not be published to the history stream; other nodes will not list it");
                    return;
                }
                Err(e) => {
                    tracing::debug!(run = %record.id, error = %e, "cluster: publishing the run's end failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Registers the run-end listener that publishes the ends of the runs this node
    /// starts itself rather than taking them from the runs stream: manual runs (API,
    /// CLI, dashboard) and the runs of run-outcome triggers (started on the node where
    /// the watched run ended, once in the cluster). Their ends go to the history stream
    /// like every other run's, so every node lists them; the publish happens on a task
    /// of its own after the record is final here.
    pub fn publish_local_ends(scheduler: &crate::scheduler::Scheduler) {
        scheduler.on_run_end(Box::new(|scheduler, ended| {
            if !started_here(&ended.trigger) {
                return;
            }
            let (Some(cluster), Ok(handle)) = (
                scheduler.cluster().cloned(),
                tokio::runtime::Handle::try_current(),
            ) else {
                return;
            };
            let mut record = ended.clone();
            record.node = Some(cluster.settings.node_name.clone());
            handle.spawn(async move { cluster.publish_end(&record).await });
        }));
    }

    /// Reads the history stream and stores every run's end in `runs`, until `stopped`;
    /// reopened from the next record after an error. It starts after the position this
    /// data directory stored at its last stop ([`POSITION_FILE`]) when that position is
    /// of the same stream (its name and creation time), else from the stream's start.
    /// The position is stored every [`SAVE_EVERY`] and at stop, each time only after
    /// the records applied up to it are on disk, so a crash re-reads a little and loses
    /// nothing.
    pub async fn apply_history(
        self: std::sync::Arc<Self>,
        engine: std::sync::Arc<crate::engine::Engine>,
        runs: RunStore,
        stopped: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stopped);
        let path = engine.settings.data_dir.join(POSITION_FILE);
        let mut created = None;
        let mut saved = 0;
        let mut save_tick = tokio::time::interval(SAVE_EVERY);
        save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if created.is_none() {
                tokio::select! {
                    _ = &mut stopped => return,
                    c = self.resume_from(&path) => {
                        created = c;
                        saved = self.history.applied.load(Ordering::SeqCst);
                    }
                }
            }
            let from = self.history.applied.load(Ordering::SeqCst) + 1;
            let reading = async {
                let stream = self
                    .js
                    .get_stream(&self.history.stream)
                    .await
                    .map_err(|e| e.to_string())?;
                let consumer = stream
                    .create_consumer(jetstream::consumer::pull::OrderedConfig {
                        deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                            start_sequence: from,
                        },
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
                while let Some(msg) = messages.next().await {
                    let msg = msg.map_err(|e| e.to_string())?;
                    self.apply_one(&runs, &msg);
                }
                Ok::<(), String>(())
            };
            tokio::pin!(reading);
            let read = loop {
                tokio::select! {
                    _ = &mut stopped => {
                        self.save_position(&engine, &path, created, &mut saved).await;
                        return;
                    }
                    _ = save_tick.tick() => {
                        self.save_position(&engine, &path, created, &mut saved).await;
                    }
                    r = &mut reading => break r,
                }
            };
            if let Err(e) = read {
                tracing::warn!(error = %e, "cluster: reading the history stream failed; reading on shortly");
            }
            tokio::select! {
                _ = &mut stopped => {
                    self.save_position(&engine, &path, created, &mut saved).await;
                    return;
                }
                _ = tokio::time::sleep(REOPEN_DELAY) => {}
            }
        }
    }

    /// Where to start reading: the stored position when it is of this stream, else the
    /// start. Returns the stream's creation time (`None` while the stream cannot be
    /// read: the caller asks again).
    async fn resume_from(&self, path: &std::path::Path) -> Option<DateTime<Utc>> {
        let info = match self.js.get_stream(&self.history.stream).await {
            Ok(mut s) => match s.info().await {
                Ok(i) => i.clone(),
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: cannot read the history stream's state; trying again");
                    tokio::time::sleep(REOPEN_DELAY).await;
                    return None;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot find the history stream; trying again");
                tokio::time::sleep(REOPEN_DELAY).await;
                return None;
            }
        };
        let created =
            DateTime::<Utc>::from_timestamp_nanos(info.created.unix_timestamp_nanos() as i64);
        let stored = load_position(path);
        let from = resume_at(
            stored.as_ref(),
            &self.history.stream,
            created,
            info.state.last_sequence,
        );
        match (&stored, from) {
            (_, Some(seq)) => {
                tracing::info!(stream = %self.history.stream, after = seq, "cluster: reading the history stream on from the position stored at the last stop");
                self.history.applied.fetch_max(seq, Ordering::SeqCst);
            }
            (Some(p), None) => {
                tracing::info!(stream = %self.history.stream, stored = %p.stream, "cluster: the stored history position is of another stream (or one created again); reading the stream from its start");
            }
            (None, None) => {}
        }
        Some(created)
    }

    /// Stores the applied position when it moved, once what was applied is on disk.
    async fn save_position(
        &self,
        engine: &crate::engine::Engine,
        path: &std::path::Path,
        created: Option<DateTime<Utc>>,
        saved: &mut u64,
    ) {
        let Some(created) = created else {
            return;
        };
        let applied = self.history.applied.load(Ordering::SeqCst);
        if applied == *saved {
            return;
        }
        if let Err(e) = engine.store.durable().await {
            tracing::warn!(error = %e, "cluster: the applied history is not on disk; its position is not stored");
            return;
        }
        let position = Position {
            stream: self.history.stream.clone(),
            created,
            applied,
        };
        match write_position(path, &position) {
            Ok(()) => *saved = applied,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cluster: cannot store the history position");
            }
        }
    }

    fn apply_one(&self, runs: &RunStore, msg: &jetstream::Message) {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        match serde_json::from_slice::<RunRecord>(&msg.payload) {
            Ok(record) if msg.subject.as_str().ends_with(&record.id.to_string()) => {
                self.history.remember(&record);
                match runs.apply_replicated(record) {
                    Ok(true) => {
                        if let Some(m) = self.metrics.get() {
                            m.history_applied.inc();
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(subject = %msg.subject, error = %e, "cluster: a run record from the history stream could not be stored");
                    }
                }
            }
            Ok(_) => {
                tracing::warn!(subject = %msg.subject, "cluster: a run record on another run's subject is ignored");
            }
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "cluster: a message on the history stream is not a run record; ignored");
            }
        }
        self.history.applied.fetch_max(seq, Ordering::SeqCst);
    }

    /// The history stream's state and how far this node has applied it.
    pub async fn history_view(&self) -> Result<HistoryView, ClusterError> {
        let mut stream = self
            .js
            .get_stream(&self.history.stream)
            .await
            .map_err(|e| nats("reading the history stream")(e.to_string()))?;
        let info = stream
            .info()
            .await
            .map_err(|e| nats("reading the history stream")(e.to_string()))?;
        let applied = self.history.applied.load(Ordering::SeqCst);
        Ok(HistoryView {
            stream: self.history.stream.clone(),
            replicas: info.config.num_replicas,
            messages: info.state.messages,
            last_sequence: info.state.last_sequence,
            applied_sequence: applied,
            lag: info.state.last_sequence.saturating_sub(applied),
        })
    }

    /// The run id of a delivery whose run ended lately, as this node knows it.
    pub fn recent_run(&self, msg_id: &str) -> Option<RunId> {
        self.history.recent_run(msg_id)
    }
}

/// How far a data directory applied a history stream, as [`POSITION_FILE`] holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// The stream's name.
    pub stream: String,
    /// When the stream was created: a stream deleted and created again under the same
    /// name starts its sequences again, and the stored position is not of it.
    pub created: DateTime<Utc>,
    /// The last stream sequence whose record is on disk here.
    pub applied: u64,
}

fn load_position(path: &std::path::Path) -> Option<Position> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cluster: the stored history position does not parse; reading the stream from its start");
            None
        }
    }
}

fn write_position(path: &std::path::Path, p: &Position) -> std::io::Result<()> {
    let tmp = path.with_extension("json.new");
    std::fs::write(&tmp, serde_json::to_vec(p).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

/// The sequence to read on after: the stored one when it is of `stream` as created at
/// `created` and not past its `last` sequence; `None` to read from the start.
pub fn resume_at(
    stored: Option<&Position>,
    stream: &str,
    created: DateTime<Utc>,
    last: u64,
) -> Option<u64> {
    let p = stored?;
    (p.stream == stream && p.created == created && p.applied <= last && p.applied > 0)
        .then_some(p.applied)
}

/// Waits up to `timeout` for run `id`'s final record to be in `runs` (written here, or
/// arrived from the history stream), and returns the record as it is then, if any.
pub async fn wait_for_end(runs: &RunStore, id: RunId, timeout: Duration) -> Option<RunRecord> {
    let mut updates = runs.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let now = runs.get(id).ok().flatten();
        if now.as_ref().is_some_and(|r| r.status.is_final()) {
            return now;
        }
        // Woken by any change; a lagging receiver just looks again.
        let next = tokio::time::timeout_at(deadline, async {
            loop {
                match updates.recv().await {
                    Ok(r) if r.id == id => return true,
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return true,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
                }
            }
        })
        .await;
        match next {
            Ok(true) => continue,
            _ => return runs.get(id).ok().flatten(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_position_is_used_only_for_the_same_stream_as_created() {
        let created: DateTime<Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        let p = Position {
            stream: "CAPSTAN_HISTORY".into(),
            created,
            applied: 40,
        };
        assert_eq!(
            resume_at(Some(&p), "CAPSTAN_HISTORY", created, 90),
            Some(40)
        );
        assert_eq!(
            resume_at(Some(&p), "CAPSTAN_HISTORY", created, 40),
            Some(40)
        );
        // None stored, another stream, the stream made again, or a position past its end.
        assert_eq!(resume_at(None, "CAPSTAN_HISTORY", created, 90), None);
        assert_eq!(resume_at(Some(&p), "CAPSTAN_HISTORY_B", created, 90), None);
        let again = created + chrono::Duration::seconds(5);
        assert_eq!(resume_at(Some(&p), "CAPSTAN_HISTORY", again, 90), None);
        assert_eq!(resume_at(Some(&p), "CAPSTAN_HISTORY", created, 39), None);
        let zero = Position { applied: 0, ..p };
        assert_eq!(resume_at(Some(&zero), "CAPSTAN_HISTORY", created, 90), None);
    }

    #[test]
    fn a_position_written_reads_back_and_a_torn_file_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(POSITION_FILE);
        let p = Position {
            stream: "CAPSTAN_HISTORY".into(),
            created: "2026-12-01T10:00:00Z".parse().unwrap(),
            applied: 7,
        };
        write_position(&path, &p).unwrap();
        assert_eq!(load_position(&path), Some(p));
        std::fs::write(&path, b"{\"stream\":").unwrap();
        assert_eq!(load_position(&path), None);
    }

    #[test]
    fn manual_and_run_outcome_runs_are_published_by_the_node_that_ran_them() {
        assert!(started_here(&RunTrigger::Manual { by: "cli".into() }));
        assert!(started_here(&RunTrigger::Run {
            run_id: "r".into(),
            plugin: "p".into(),
            status: "ok".into(),
            depth: 1,
        }));
        assert!(!started_here(&RunTrigger::Webhook {
            hook: "h".into(),
            delivery: None,
        }));
    }

    #[test]
    fn the_history_stream_is_named_after_the_cluster() {
        let mut s = ClusterSettings {
            urls: vec!["nats://127.0.0.1:4222".into()],
            node_name: "n1".into(),
            name: None,
            credentials: None,
            tls_ca: None,
            tls_client: None,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            lease: crate::cluster::config::DEFAULT_LEASE,
            history_max_age: None,
            shared_state: false,
        };
        assert_eq!(
            names(&s),
            ("CAPSTAN_HISTORY".to_string(), "capstan.history".to_string())
        );
        s.name = Some("blue-1".into());
        assert_eq!(
            names(&s),
            (
                "CAPSTAN_HISTORY_BLUE_1".to_string(),
                "capstan.blue-1.history".to_string()
            )
        );
    }
}
