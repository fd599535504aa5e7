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
//! comes once the run's final record is on disk.
//! A node that dies sends nothing: after `ack_wait` JetStream delivers the run again,
//! to any node, up to `max_deliver` times; that run's record starts with a log line
//! naming the attempt.

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

/// A verified webhook delivery in cluster mode: published under its delivery id and
/// acked by JetStream before the sender gets its 202. The id answered is a fresh one
/// that names the acceptance, not a run record: the run is recorded by the node that
/// takes it, under an id of its own, with the delivery id in its trigger.
pub async fn accept_delivery(
    cluster: &Cluster,
    delivery: crate::trigger::webhook::Delivery,
) -> Result<RunId, String> {
    let msg_id = super::delivery_msg_id(&delivery.hook, delivery.delivery_id.as_deref());
    let plugin = delivery.plugin.clone();
    match cluster
        .hand_over(&plugin, delivery.into_event(), &msg_id)
        .await
    {
        Ok(duplicate) => {
            if duplicate {
                tracing::info!(
                    msg_id,
                    "cluster: a delivery the cluster already has is not run again"
                );
            }
            Ok(RunId::new())
        }
        Err(e) => Err(e.to_string()),
    }
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
        };
        self.publish(&job, msg_id).await
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
        let submitted = if attempt > 1 {
            let note = LogLine {
                at: chrono::Utc::now(),
                level: LogLevel::Warn,
                message: format!(
                    "cluster: attempt {attempt} of this run (the node that took it before did not finish it within cluster.ack_wait); published by node {}",
                    job.from
                ),
            };
            scheduler.submit_noted(&job.plugin, job.event, note)
        } else {
            scheduler.submit(&job.plugin, job.event)
        };
        match submitted {
            Ok(id) => {
                scheduler.until_ended(id).await;
                if let Ok(Some(r)) = scheduler.runs().get(id)
                    && r.status == RunStatus::Interrupted
                {
                    return Done::GiveBack;
                }
                // The ack promises the run is recorded: its end is on disk first.
                if let Err(e) = scheduler.engine().store.durable().await {
                    tracing::warn!(run = %id, error = %e, "cluster: the run's record could not be made durable; acked all the same (it ran)");
                }
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
