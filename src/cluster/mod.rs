//! Cluster mode (`capstan serve --cluster nats://…`): several engines on one NATS
//! JetStream system, each cron fire and each webhook delivery run once in the cluster,
//! and a run whose node died run again by another node.
//!
//! What goes through NATS in this first slice:
//! - **Runs** ([`work`]): a trigger on any node does not start its run; it publishes a
//!   [`Job`] to the work-queue stream `CAPSTAN_RUNS` with a `Nats-Msg-Id` that is the
//!   same on every node for the same fire ([`cron_msg_id`], [`delivery_msg_id`]), so
//!   the stream's duplicate window keeps one. The job carries the run id chosen at
//!   acceptance (what a webhook's 202 answers). Every node pulls from one durable
//!   consumer shared by all, runs the plugin (installed on that node), records the run
//!   under that id, publishes its end to the history stream and acks. A node that dies
//!   before its ack leaves the run to be delivered again after `ack_wait`; the retry
//!   records the same run id again, and its log says which attempt it is.
//! - **History** ([`history`]): the stream `CAPSTAN_HISTORY` keeps each run's latest
//!   end; every node applies it to its own history, so every node lists every run.
//! - **Membership** ([`membership`]): each node keeps an entry in the KV bucket
//!   `capstan_nodes` (name, version, start time, API address), renewed every few
//!   seconds; `capstan cluster status` lists them with the stream's backlog.
//!
//! - **Device ownership** ([`leases`], [`route`]): one node at a time holds each
//!   device's lease in `capstan_leases`; only it connects to the device and watches its
//!   events, and the other nodes send their Docker host calls for it to that node over
//!   NATS request/reply. A dead node's devices are taken over after the lease expires;
//!   the new owner resumes the device's Docker events where the old one stopped, from
//!   the cursor it kept in `capstan_cursors` ([`cursors`]).
//!   A `[[proxy]]` serves its device only on the owner (421 elsewhere, naming it), and
//!   `device check` on another node goes through the owner
//!   ([`Cluster::check_through_owner`]).
//! - **History** ([`history`]): each run's end is published to the `CAPSTAN_HISTORY`
//!   stream and every node copies it into its own history, so every node lists every run.
//! - **Replays** ([`replay`]): a webhook delivery's verified signature is claimed in
//!   the KV bucket `capstan_replays`, so a captured delivery replayed to another node
//!   is a duplicate there as on the node that took it first.
//! - **Shared configuration** ([`state`], with `[cluster] shared_state`): devices,
//!   plugins, tokens, notifiers and sealed vault secrets through the KV bucket
//!   `capstan_state`, applied on every node by a KV watch.
//!
//! Without `shared_state`, plugins, devices, tokens and hook secrets stay on each node
//! (sled): every node is set up with the same plugins and devices. Manual runs and the
//! runs of run-outcome triggers run on the node where they are asked for; their ends are
//! published to the history stream like the others ([`Cluster::publish_local_ends`]).

pub mod config;
pub mod cursors;
pub mod history;
pub mod leases;
pub mod membership;
pub mod replay;
pub mod retry;
pub mod route;
pub mod state;
pub mod work;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

pub use config::{ClusterSection, ClusterSettings};
pub use membership::{NodeEntry, NodeView};

use crate::plugin::TriggerEvent;

/// How long a connection attempt to the NATS servers may take at start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The window in which JetStream drops a second publish with the same `Nats-Msg-Id`.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// The durable consumer every node pulls runs from.
pub const CONSUMER: &str = "capstan-workers";

/// Why cluster mode could not start or a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cannot reach NATS at {urls}: {detail}; check --cluster (or [cluster] urls) and that the servers run"
    )]
    Connect { urls: String, detail: String },
    #[error("cannot read the NATS credentials file {path}: {detail}")]
    Credentials { path: String, detail: String },
    #[error(
        "NATS at {urls} answers but without JetStream ({detail}): start the servers with JetStream enabled"
    )]
    NoJetStream { urls: String, detail: String },
    #[error("NATS: {what}: {detail}")]
    Nats { what: &'static str, detail: String },
}

fn nats(what: &'static str) -> impl FnOnce(String) -> ClusterError {
    move |detail| ClusterError::Nats { what, detail }
}

/// One run handed to the cluster: what a node needs to start it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub plugin: String,
    pub event: TriggerEvent,
    /// The node that published it.
    pub from: String,
    /// The run's id, chosen when the run was accepted (a webhook's 202 answers it): the
    /// node that takes the job records the run under it, a retry too. Absent in jobs of
    /// nodes that did not carry it; the taking node then chooses one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<crate::runs::RunId>,
}

/// The `Nats-Msg-Id` of a cron fire: `plugin:trigger:fire-time`, the same on every node
/// (the fire time is the schedule's, without jitter, to the millisecond).
pub fn cron_msg_id(plugin: &str, trigger: u32, scheduled_at: DateTime<Utc>) -> String {
    format!(
        "{plugin}:{trigger}:{}",
        scheduled_at.to_rfc3339_opts(SecondsFormat::Millis, true)
    )
}

/// The `Nats-Msg-Id` of a webhook delivery: the sender's delivery id under the hook's
/// name, so a sender's retry to any node is dropped as a duplicate. A hook without a
/// delivery id header gets a fresh id (no cluster-wide duplicate check; each node still
/// refuses a replayed signature it has seen).
pub fn delivery_msg_id(hook: &str, delivery: Option<&str>) -> String {
    match delivery {
        Some(d) => format!("webhook:{hook}:{d}"),
        None => format!("webhook:{hook}:{}", uuid::Uuid::new_v4()),
    }
}

/// The subject a plugin's jobs are published on.
fn subject(prefix: &str, plugin: &str) -> String {
    format!("{prefix}.{plugin}")
}

/// A node's link to the cluster: the NATS connection, the runs stream and its consumer,
/// and the membership bucket.
pub struct Cluster {
    settings: ClusterSettings,
    client: async_nats::Client,
    js: jetstream::Context,
    nodes: jetstream::kv::Store,
    consumer: jetstream::consumer::PullConsumer,
    stream_name: String,
    subjects: String,
    /// The consumer's ack deadline (the first node's `ack_wait`).
    ack_wait: Duration,
    /// This process (a restarted node has a new one).
    instance: String,
    started_at: DateTime<Utc>,
    /// The API address, once it listens.
    api: OnceLock<String>,
    /// Device leases: which node owns which device ([`leases`]).
    leases: leases::Leases,
    /// How far each device's Docker events were handed over ([`cursors`]).
    cursors: cursors::Cursors,
    /// The cluster's run history (see [`history`]).
    history: history::HistoryStream,
    /// This node's `capstan_cluster_*` series, once it joined an engine.
    metrics: OnceLock<crate::metrics::ClusterSeries>,
    /// The shared configuration, with `[cluster] shared_state`.
    state: Option<Arc<state::SharedState>>,
    /// Webhook signatures accepted anywhere in the cluster ([`replay`]).
    replays: jetstream::kv::Store,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.settings.node_name)
            .field("stream", &self.stream_name)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects to the NATS servers and makes sure the runs stream, its consumer and the
    /// node bucket exist (created by the first node, with 3 replicas when the NATS system
    /// has 3 or more servers, else 1). Fails when no server answers within a few
    /// seconds, or answers without JetStream.
    pub async fn connect(settings: ClusterSettings) -> Result<Arc<Cluster>, ClusterError> {
        let urls = settings.urls.join(",");
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("capstan {}", settings.node_name))
            .connection_timeout(CONNECT_TIMEOUT);
        if let Some(path) = &settings.credentials {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|e| ClusterError::Credentials {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })?;
        }
        if let Some(ca) = &settings.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &settings.tls_client {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        let client =
            opts.connect(settings.urls.as_slice())
                .await
                .map_err(|e| ClusterError::Connect {
                    urls: urls.clone(),
                    detail: e.to_string(),
                })?;
        let js = jetstream::new(client.clone());
        js.query_account()
            .await
            .map_err(|e| ClusterError::NoJetStream {
                urls: urls.clone(),
                detail: e.to_string(),
            })?;
        let known = client
            .server_info()
            .connect_urls
            .len()
            .max(settings.urls.len());
        let replicas = if known >= 3 { 3 } else { 1 };
        let (stream_name, subjects, bucket) = match &settings.name {
            None => (
                "CAPSTAN_RUNS".to_string(),
                "capstan.runs".to_string(),
                "capstan_nodes".to_string(),
            ),
            Some(n) => (
                format!("CAPSTAN_RUNS_{}", n.to_uppercase().replace('-', "_")),
                format!("capstan.{n}.runs"),
                format!("capstan_nodes_{n}"),
            ),
        };
        // Right after a leader election creation may fail for a moment: retried.
        let stream_config = jetstream::stream::Config {
            name: stream_name.clone(),
            description: Some(
                "Capstan runs: one message per cron fire or webhook delivery, taken by one node"
                    .into(),
            ),
            subjects: vec![format!("{subjects}.>")],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        };
        let stream = retry::with_retry("creating the runs stream", || {
            let c = stream_config.clone();
            let js = &js;
            async move { js.get_or_create_stream(c).await.map_err(|e| e.to_string()) }
        })
        .await?;
        let consumer_config = jetstream::consumer::pull::Config {
            durable_name: Some(CONSUMER.to_string()),
            description: Some("every Capstan node pulls its runs here".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            max_deliver: settings.max_deliver,
            ..Default::default()
        };
        let consumer: jetstream::consumer::PullConsumer =
            retry::with_retry("creating the runs consumer", || {
                let c = consumer_config.clone();
                let stream = &stream;
                async move {
                    stream
                        .get_or_create_consumer(CONSUMER, c)
                        .await
                        .map_err(|e| e.to_string())
                }
            })
            .await?;
        // The consumer is the first node's: its deadline is the one JetStream keeps.
        let config = &consumer.cached_info().config;
        let ack_wait = config.ack_wait;
        if ack_wait != settings.ack_wait || config.max_deliver != settings.max_deliver {
            tracing::warn!(
                ack_wait = ?ack_wait,
                max_deliver = config.max_deliver,
                "cluster: the runs consumer exists with other settings than this node's cluster.ack_wait / max_deliver; its own apply"
            );
        }
        let nodes = retry::kv_bucket(
            &js,
            jetstream::kv::Config {
                bucket: bucket.clone(),
                description: "Capstan nodes: one entry per node, renewed while it runs".into(),
                history: 1,
                max_age: membership::KEEP_DEPARTED,
                num_replicas: replicas,
                ..Default::default()
            },
            "creating the node bucket",
        )
        .await?;
        let leases = leases::Leases::open(
            &js,
            &match &settings.name {
                None => "capstan_leases".to_string(),
                Some(n) => format!("capstan_leases_{n}"),
            },
            replicas,
            settings.lease,
        )
        .await?;
        let cursors = cursors::Cursors::open(
            &js,
            &match &settings.name {
                None => "capstan_cursors".to_string(),
                Some(n) => format!("capstan_cursors_{n}"),
            },
            replicas,
        )
        .await?;
        let history = history::create(&js, &settings, replicas).await?;
        let replays = replay::open(&js, settings.name.as_deref(), replicas).await?;
        let state = match settings.shared_state {
            true => Some(Arc::new(
                state::open(&js, settings.name.as_deref(), replicas)
                    .await
                    .map_err(|e| nats("opening the shared state")(e.to_string()))?,
            )),
            false => None,
        };
        Ok(Arc::new(Cluster {
            state,
            settings,
            client,
            js,
            nodes,
            consumer,
            stream_name,
            subjects,
            ack_wait,
            instance: uuid::Uuid::new_v4().to_string(),
            started_at: Utc::now(),
            api: OnceLock::new(),
            leases,
            cursors,
            history,
            metrics: OnceLock::new(),
            replays,
        }))
    }

    pub fn node_name(&self) -> &str {
        &self.settings.node_name
    }

    /// The shared configuration, when `[cluster] shared_state` is on.
    pub fn state(&self) -> Option<&Arc<state::SharedState>> {
        self.state.as_ref()
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// This process's id in the cluster (a restarted node has a new one).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The NATS server this node is connected to now (its name and client address).
    pub fn connected_server(&self) -> String {
        let info = self.client.server_info();
        format!("{} ({}:{})", info.server_name, info.host, info.port)
    }

    /// Publishes a run and waits for JetStream's ack: once this returns `Ok`, the run is
    /// stored on the stream's replicas and will be run by some node. A second publish
    /// with the same `msg_id` within the duplicate window is acked as a duplicate
    /// (`Ok(true)`) and runs nothing more.
    pub async fn publish(&self, job: &Job, msg_id: &str) -> Result<bool, ClusterError> {
        Ok(self.publish_acked(job, msg_id).await?.duplicate)
    }

    /// [`Cluster::publish`], with JetStream's ack: for a duplicate, its `sequence` is
    /// the first publish's.
    pub async fn publish_acked(
        &self,
        job: &Job,
        msg_id: &str,
    ) -> Result<jetstream::publish::PublishAck, ClusterError> {
        let payload = serde_json::to_vec(job).map_err(|e| nats("encoding a run")(e.to_string()))?;
        let ack = self
            .js
            .send_publish(
                subject(&self.subjects, &job.plugin),
                jetstream::message::PublishMessage::build()
                    .payload(payload.into())
                    .message_id(msg_id),
            )
            .await
            .map_err(|e| nats("publishing a run")(e.to_string()))?
            .await
            .map_err(|e| nats("waiting for the run's publish ack")(e.to_string()))?;
        if !ack.duplicate
            && let Some(m) = self.metrics.get()
        {
            m.published.inc();
        }
        Ok(ack)
    }

    /// Counts this node's cluster work in `series` (once, when the engine joins).
    pub fn count_in(&self, series: crate::metrics::ClusterSeries) {
        let _ = self.metrics.set(series);
    }

    /// Sets the gauges of this node's cluster series from NATS (at scrape time): the
    /// runs no node has taken, the history records not applied here, the live nodes.
    pub async fn refresh_gauges(&self) {
        let Some(m) = self.metrics.get() else {
            return;
        };
        if let Ok(r) = self.runs_view().await {
            m.stream_pending
                .set(i64::try_from(r.pending).unwrap_or(i64::MAX));
        }
        if let Ok(h) = self.history_view().await {
            m.history_lag.set(i64::try_from(h.lag).unwrap_or(i64::MAX));
        }
        if let Ok(nodes) = self.nodes().await {
            m.nodes_alive
                .set(nodes.iter().filter(|n| n.alive).count() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cron_fire_has_the_same_message_id_on_every_node() {
        let at: DateTime<Utc> = "2026-12-07T16:40:05Z".parse().unwrap();
        assert_eq!(
            cron_msg_id("inventory", 0, at),
            "inventory:0:2026-12-07T16:40:05.000Z"
        );
        assert_eq!(
            cron_msg_id("inventory", 0, at),
            cron_msg_id("inventory", 0, at)
        );
        // Another trigger of the plugin, or another fire, is another message.
        assert_ne!(
            cron_msg_id("inventory", 1, at),
            cron_msg_id("inventory", 0, at)
        );
        let next = at + chrono::Duration::seconds(1);
        assert_ne!(
            cron_msg_id("inventory", 0, next),
            cron_msg_id("inventory", 0, at)
        );
        // Sub-second schedules are told apart.
        let half = at + chrono::Duration::milliseconds(500);
        assert_ne!(
            cron_msg_id("inventory", 0, half),
            cron_msg_id("inventory", 0, at)
        );
    }

    #[test]
    fn a_delivery_is_known_by_its_hook_and_delivery_id() {
        assert_eq!(delivery_msg_id("gh", Some("d-1")), "webhook:gh:d-1");
        assert_ne!(
            delivery_msg_id("gh", Some("d-1")),
            delivery_msg_id("gl", Some("d-1"))
        );
        // Without a delivery id, every delivery is its own message.
        assert_ne!(delivery_msg_id("gh", None), delivery_msg_id("gh", None));
    }

    #[test]
    fn a_job_travels_as_json_and_comes_back_the_same() {
        let job = Job {
            plugin: "inventory".into(),
            event: TriggerEvent::Cron {
                schedule: "* * * * * *".into(),
                scheduled_at: "2026-12-07T16:40:05Z".parse().unwrap(),
            },
            from: "n1".into(),
            run_id: Some(crate::runs::RunId::new()),
        };
        let wire = serde_json::to_vec(&job).unwrap();
        let back: Job = serde_json::from_slice(&wire).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&job).unwrap()
        );
        assert_eq!(back.plugin, "inventory");
        assert_eq!(back.run_id, job.run_id);
        // A job from a node that did not carry the run id still reads.
        let mut wire = serde_json::to_value(&job).unwrap();
        wire.as_object_mut().unwrap().remove("run_id");
        let back: Job = serde_json::from_value(wire).unwrap();
        assert_eq!(back.run_id, None);
    }
}
