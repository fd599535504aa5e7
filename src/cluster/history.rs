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
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{Cluster, ClusterError, ClusterSettings, nats, retry};
use crate::runs::{RunId, RunRecord, RunStore, RunTrigger};

/// How long the history applier waits before it reads the stream again after an error.
const REOPEN_DELAY: Duration = Duration::from_secs(1);
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

    /// Reads the history stream from its start and stores every run's end in `runs`,
    /// until `stopped`; reopened from the next record after an error.
    pub async fn apply_history(
        self: std::sync::Arc<Self>,
        runs: RunStore,
        stopped: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stopped);
        loop {
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
            tokio::select! {
                _ = &mut stopped => return,
                r = reading => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "cluster: reading the history stream failed; reading on shortly");
                    }
                }
            }
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep(REOPEN_DELAY) => {}
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
