//! Runs through the cluster: what a trigger hands over ([`Cluster::hand_over`]), how a
//! node takes runs from the shared consumer and runs them ([`Cluster::work`]), and the
//! stream's backlog for `capstan cluster status`.
//!
//! A node takes at most as many runs as it has run slots (`runs.max_concurrent`), so a
//! run never waits in one node's memory while others are idle. While a run goes on, the
//! node tells JetStream every third of `ack_wait` that it is still at it; it acks when
//! the run has ended and is recorded. A run the node could not start (plugin not
//! installed here, queue full, shutting down) is given back (nak) for another node or a
//! later try; a run interrupted by this node's shutdown is given back as well. The ack
//! comes once the run's final record is on disk and in the cluster's history stream
//! ([`super::history`]).
//! A node that dies sends nothing: after `ack_wait` JetStream delivers the run again,
//! to any node, up to `max_deliver` times; the retry records the same run id again
//! (replacing what the earlier attempt left), starting with a log line naming the
//! attempt and saying the previous one was interrupted.
//!
//! What is exactly-once and what is not: a delivery answered 202 is one run id, and
//! every node ends up with one record of it. The plugin itself runs at least once: a
//! node that dies mid-run (or after the run but before its ack) leaves the run to be
//! run again, from the start, by the next attempt.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::Message;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{Cluster, ClusterError, Job, nats};
use crate::plugin::TriggerEvent;
use crate::runs::{LogLevel, LogLine, RunId, RunStatus};
use crate::scheduler::{Scheduler, SubmitError};
use crate::trigger::webhook::Launched;

/// How long one pull waits for runs before asking again.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// How long a run given back waits before it is delivered again, when it could not be
/// started here.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// The runs stream as `capstan cluster status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunsView {
    /// The stream's name (`CAPSTAN_RUNS`).
    pub stream: String,
    /// Its replicas.
    pub replicas: usize,
    /// Runs stored: waiting for a node, or taken and not yet acked.
    pub messages: u64,
    /// Runs no node has taken yet (the lag).
    pub pending: u64,
    /// Runs taken by a node and not yet acked.
    pub ack_pending: usize,
    /// Runs delivered more than once so far (their node did not ack in time).
    pub redelivered: usize,
    /// `ack_wait`, seconds.
    pub ack_wait_secs: u64,
    /// `max_deliver`.
    pub max_deliver: i64,
}

/// What became of a run taken from the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    /// Ran and recorded: ack.
    Ran,
    /// Give it back now (this node is stopping).
    GiveBack,
    /// Give it back to be tried again after a moment (here or elsewhere).
    Retry,
    /// Cannot ever run (not a job): drop it.
    Drop,
}

/// How long a duplicate delivery waits for its first acceptance's run id to be known
/// here, when the run already ended elsewhere.
const DUPLICATE_LOOKUP: Duration = Duration::from_secs(5);

/// A verified webhook delivery in cluster mode: published under its delivery id with a
/// run id chosen now, and acked by JetStream before the sender gets its 202 with that
/// id. The node that takes it records the run under that id.
///
/// A delivery the cluster already has (same delivery id within the duplicate window)
/// runs nothing more and is answered with the first acceptance's run id: read from
/// the job still in the runs stream (JetStream's duplicate ack names its sequence), or,
/// when that run has ended and left the stream, from the history this node applied
/// ([`Cluster::recent_run`]). When neither knows it within a few seconds the sender
/// gets an error (503) and may retry: an id that names no run is never answered.
///
/// A delivery whose hook rejects replays also claims its verified signature in the
/// cluster first ([`super::replay`]): a copy another node accepted under another delivery
/// id is a replay, answered as a duplicate with the first run's id.
pub async fn accept_delivery(
    cluster: &Arc<Cluster>,
    delivery: crate::trigger::webhook::Delivery,
) -> Result<Launched, String> {
    use super::replay::Claimed;
    let msg_id = super::delivery_msg_id(&delivery.hook, delivery.delivery_id.as_deref());
    let run_id = RunId::new();
    // The signature, against replays under another delivery id on another node.
    let replay = delivery.replay_key.clone();
    let delivery_id = delivery.delivery_id.clone();
    let claim = match &replay {
        None => None,
        Some(r) => match cluster
            .claim_signature(&delivery.hook, r, delivery_id.as_deref(), run_id)
            .await
            .map_err(|e| e.to_string())?
        {
            Claimed::Mine { key, revision } => Some((key, revision)),
            Claimed::Retry => None,
            Claimed::Replay(first) => {
                return Ok(Launched::Replayed {
                    run_id: Some(first),
                });
            }
            Claimed::Accepted(first) => return Ok(Launched::Started(first)),
            Claimed::Busy => {
                return Err(
                    "another node of the cluster is accepting a delivery with this signature; retry shortly"
                        .into(),
                );
            }
        },
    };
    let job = Job {
        plugin: delivery.plugin.clone(),
        event: delivery.into_event(),
        from: cluster.settings.node_name.clone(),
        run_id: Some(run_id),
    };
    let ack = match cluster.publish_acked(&job, &msg_id).await {
        Ok(ack) => ack,
        Err(e) => {
            if let Some((key, revision)) = &claim {
                cluster.release_signature(key, *revision).await;
            }
            return Err(e.to_string());
        }
    };
    let accepted = if ack.duplicate {
        tracing::info!(
            msg_id,
            "cluster: a delivery the cluster already has is not run again"
        );
        cluster
            .first_run_id(ack.sequence, &msg_id)
            .await
            .ok_or_else(|| {
                format!(
                    "the cluster has this delivery already ({msg_id}) but its run id is not known here yet; retry shortly"
                )
            })?
    } else {
        run_id
    };
    // Marked on a task of its own: the 202 does not wait for it. Until it lands (a few
    // milliseconds), a copy under another delivery id is answered 503, not run.
    if let (Some((key, revision)), Some(r)) = (claim, replay) {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            cluster
                .mark_published(&key, revision, &r, delivery_id.as_deref(), accepted)
                .await;
        });
    }
    Ok(Launched::Started(accepted))
}

impl Cluster {
    /// A trigger's run, handed to the cluster instead of started here: published with
    /// `msg_id` and acked by JetStream. Returns whether JetStream already had it (another
    /// node's publish of the same fire or delivery).
    pub async fn hand_over(
        &self,
        plugin: &str,
        event: TriggerEvent,
        msg_id: &str,
    ) -> Result<bool, ClusterError> {
        let job = Job {
            plugin: plugin.to_string(),
            event,
            from: self.settings.node_name.clone(),
            run_id: Some(RunId::new()),
        };
        self.publish(&job, msg_id).await
    }

    /// The run id of the first acceptance of a delivery: from its job at `sequence` in
    /// the runs stream while it is there, else from the records applied here.
    async fn first_run_id(&self, sequence: u64, msg_id: &str) -> Option<RunId> {
        let deadline = tokio::time::Instant::now() + DUPLICATE_LOOKUP;
        loop {
            if let Ok(stream) = self.js.get_stream(&self.stream_name).await
                && let Ok(m) = stream.get_raw_message(sequence).await
                && let Ok(job) = serde_json::from_slice::<Job>(&m.payload)
                && let Some(id) = job.run_id
            {
                return Some(id);
            }
            if let Some(id) = self.recent_run(msg_id) {
                return Some(id);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The runs stream's state and the shared consumer's backlog.
    pub async fn runs_view(&self) -> Result<RunsView, ClusterError> {
        let mut stream = self
            .js
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| nats("reading the runs stream")(e.to_string()))?;
        let info = stream
            .info()
            .await
            .map_err(|e| nats("reading the runs stream")(e.to_string()))?;
        let messages = info.state.messages;
        let replicas = info.config.num_replicas;
        let c = self
            .consumer
            .get_info()
            .await
            .map_err(|e| nats("reading the runs consumer")(e.to_string()))?;
        Ok(RunsView {
            stream: self.stream_name.clone(),
            replicas,
            messages,
            pending: c.num_pending,
            ack_pending: c.num_ack_pending,
            redelivered: c.num_redelivered,
            ack_wait_secs: c.config.ack_wait.as_secs(),
            max_deliver: c.config.max_deliver,
        })
    }

    /// Takes runs from the shared consumer and runs them until `stopped`: at most as many
    /// at once as the engine runs (`runs.max_concurrent`).
    pub async fn work(
        self: Arc<Self>,
        scheduler: Arc<Scheduler>,
        stopped: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stopped);
        let slots = Arc::new(Semaphore::new(
            scheduler.config().max_concurrent_runs.max(1),
        ));
        loop {
            let first = tokio::select! {
                _ = &mut stopped => return,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let free = 1 + slots.available_permits();
            let batch = self
                .consumer
                .batch()
                .max_messages(free)
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: cannot pull runs; retrying");
                    drop(first);
                    tokio::select! {
                        _ = &mut stopped => return,
                        _ = tokio::time::sleep(RETRY_DELAY) => continue,
                    }
                }
            };
            let mut first = Some(first);
            // A batch ends within PULL_EXPIRES; what it brought is handled (a run taken
            // while stopping is given back).
            while let Some(msg) = batch.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(error = %e, "cluster: pull ended");
                        break;
                    }
                };
                let permit = match first.take() {
                    Some(p) => p,
                    None => match slots.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                let (this, scheduler) = (self.clone(), scheduler.clone());
                tokio::spawn(async move {
                    this.take(&scheduler, msg).await;
                    drop(permit);
                });
            }
        }
    }

    /// One run from the stream: started here, kept alive while it runs, acked when
    /// recorded (or given back).
    async fn take(&self, scheduler: &Arc<Scheduler>, msg: Message) {
        let msg = Arc::new(msg);
        let attempt = msg.info().map(|i| i.delivered).unwrap_or(1).max(1);
        if let Some(m) = self.metrics.get() {
            m.taken.inc();
            if attempt > 1 {
                m.redelivered.inc();
            }
        }
        // Still at it: JetStream waits another ack_wait.
        let keepalive = {
            let msg = msg.clone();
            let every = (self.ack_wait / 3).max(Duration::from_millis(300));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %e, "cluster: cannot extend a run's ack deadline");
                    }
                }
            })
        };
        let done = self.run_job(scheduler, &msg, attempt).await;
        keepalive.abort();
        let answer = match done {
            Done::Ran => msg.double_ack().await,
            Done::GiveBack => msg.ack_with(AckKind::Nak(None)).await,
            Done::Retry => {
                if attempt >= self.settings.max_deliver {
                    tracing::warn!(
                        subject = %msg.subject,
                        attempt,
                        "cluster: a run could not be started on any try; JetStream gives it up (cluster.max_deliver)"
                    );
                }
                msg.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await
            }
            Done::Drop => msg.ack_with(AckKind::Term).await,
        };
        if let Err(e) = answer {
            tracing::warn!(error = %e, ?done, "cluster: cannot answer JetStream for a run; it may be delivered again");
        }
    }

    async fn run_job(&self, scheduler: &Arc<Scheduler>, msg: &Message, attempt: i64) -> Done {
        let job: Job = match serde_json::from_slice(&msg.payload) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "cluster: a message on the runs stream is not a run; dropped");
                return Done::Drop;
            }
        };
        let id = job.run_id.unwrap_or_default();
        let mut notes = Vec::new();
        if attempt > 1 {
            // What an earlier attempt left here, if it was this node's.
            let before = match scheduler.runs().get(id) {
                Ok(Some(r)) => format!(" (its record here: {})", r.status),
                _ => String::new(),
            };
            notes.push(LogLine {
                at: chrono::Utc::now(),
                level: LogLevel::Warn,
                message: format!(
                    "cluster: attempt {attempt} of this run on node {}; the previous attempt was interrupted: its node did not finish it within cluster.ack_wait{before}; published by node {}",
                    self.settings.node_name, job.from
                ),
            });
        }
        match scheduler.submit_as(id, &job.plugin, job.event, notes) {
            Ok(id) => {
                scheduler.until_ended(id).await;
                let record = match scheduler.runs().get(id) {
                    Ok(Some(r)) => r,
                    Ok(None) => return Done::Ran,
                    Err(e) => {
                        tracing::warn!(run = %id, error = %e, "cluster: cannot read the run's record; acked all the same (it ran)");
                        return Done::Ran;
                    }
                };
                if record.status == RunStatus::Interrupted {
                    return Done::GiveBack;
                }
                // The ack promises the run is recorded: its end is on disk and in the
                // cluster's history first.
                if let Err(e) = scheduler.engine().store.durable().await {
                    tracing::warn!(run = %id, error = %e, "cluster: the run's record could not be made durable; acked all the same (it ran)");
                }
                let mut record = record;
                record.node = Some(self.settings.node_name.clone());
                self.publish_end(&record).await;
                Done::Ran
            }
            Err(SubmitError::ShuttingDown) => Done::GiveBack,
            Err(e @ SubmitError::NotInstalled(_)) => {
                tracing::warn!(node = %self.settings.node_name, error = %e, "cluster: a run for a plugin this node does not have is given back; install the same plugins on every node");
                Done::Retry
            }
            Err(e) => {
                tracing::warn!(error = %e, "cluster: a run could not be started here; given back");
                Done::Retry
            }
        }
    }
}
