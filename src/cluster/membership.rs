//! Which nodes make up the cluster: each node keeps one entry in the KV bucket
//! `capstan_nodes` under its name (version, start time, API address, when it was last
//! seen), put again every [`HEARTBEAT`]. A node seen within [`NODE_TTL`] is alive; the
//! bucket's max-age ([`KEEP_DEPARTED`]) removes the entries of nodes gone for longer.
//! A node that stops cleanly removes its entry.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{Cluster, ClusterError, nats};

/// How often a node renews its entry.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A node not seen for this long is not alive.
pub const NODE_TTL: Duration = Duration::from_secs(10);
/// How long the entry of a node that stopped renewing it stays listed (as not alive).
pub const KEEP_DEPARTED: Duration = Duration::from_secs(300);

/// A node's entry in the bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEntry {
    pub name: String,
    /// Capstan's version on the node.
    pub version: String,
    pub started_at: DateTime<Utc>,
    /// Where its API listens (`host:port`).
    pub api: String,
    /// When the node last renewed its entry (its clock).
    pub seen_at: DateTime<Utc>,
    /// The process: a restarted node has a new one.
    pub instance: String,
}

/// A node as `capstan cluster status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeView {
    pub name: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    /// Where its API listens.
    pub api: String,
    pub last_seen: DateTime<Utc>,
    /// Seen within the node TTL (10 s).
    pub alive: bool,
    /// The node that answered.
    pub this_node: bool,
}

impl Cluster {
    fn entry(&self) -> NodeEntry {
        NodeEntry {
            name: self.settings.node_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: self.started_at,
            api: self.api.get().cloned().unwrap_or_default(),
            seen_at: Utc::now(),
            instance: self.instance.clone(),
        }
    }

    async fn put_entry(&self) -> Result<(), ClusterError> {
        let value = serde_json::to_vec(&self.entry())
            .map_err(|e| nats("encoding the node entry")(e.to_string()))?;
        self.nodes
            .put(&self.settings.node_name, value.into())
            .await
            .map_err(|e| nats("renewing the node entry")(e.to_string()))?;
        Ok(())
    }

    /// Enters this node, with its API address, in the bucket: the first entry is written
    /// before this returns (a failure fails the start).
    pub async fn join(&self, api: String) -> Result<(), ClusterError> {
        let _ = self.api.set(api);
        self.put_entry().await
    }

    /// Renews the entry every [`HEARTBEAT`] until `stopped`, then removes it.
    pub async fn heartbeat(self: Arc<Self>, stopped: impl std::future::Future<Output = ()>) {
        tokio::pin!(stopped);
        let mut every = tokio::time::interval(HEARTBEAT);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                _ = every.tick() => {}
            }
            if let Err(e) = self.put_entry().await {
                tracing::warn!(error = %e, "cluster: cannot renew this node's entry");
            }
        }
        if let Err(e) = self.nodes.delete(&self.settings.node_name).await {
            tracing::warn!(error = %e, "cluster: cannot remove this node's entry");
        }
    }

    /// Where node `name`'s API listens, as its entry says (`None`: no entry, or NATS
    /// does not answer).
    pub async fn api_of(&self, name: &str) -> Option<String> {
        let value = self.nodes.get(name).await.ok()??;
        serde_json::from_slice::<NodeEntry>(&value)
            .ok()
            .map(|e| e.api)
            .filter(|a| !a.is_empty())
    }

    /// Every node in the bucket, by name, alive or not.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, ClusterError> {
        let mut keys = self
            .nodes
            .keys()
            .await
            .map_err(|e| nats("listing the nodes")(e.to_string()))?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.map_err(|e| nats("listing the nodes")(e.to_string()))?);
        }
        names.sort();
        let now = Utc::now();
        let mut out = Vec::new();
        for name in names {
            let Some(value) = self
                .nodes
                .get(&name)
                .await
                .map_err(|e| nats("reading a node entry")(e.to_string()))?
            else {
                continue;
            };
            let Ok(e) = serde_json::from_slice::<NodeEntry>(&value) else {
                tracing::warn!(node = %name, "cluster: a node entry that is not Capstan's is ignored");
                continue;
            };
            out.push(view(e, now, &self.instance));
        }
        Ok(out)
    }
}

/// A node's entry as seen at `now` by the process `instance`.
fn view(e: NodeEntry, now: DateTime<Utc>, instance: &str) -> NodeView {
    let age = (now - e.seen_at).to_std().unwrap_or(Duration::ZERO);
    NodeView {
        alive: age <= NODE_TTL,
        this_node: e.instance == instance,
        name: e.name,
        version: e.version,
        started_at: e.started_at,
        api: e.api,
        last_seen: e.seen_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_alive_while_seen_within_the_ttl() {
        let now: DateTime<Utc> = "2026-12-07T12:00:00Z".parse().unwrap();
        let entry = |ago: i64| NodeEntry {
            name: "n1".into(),
            version: "0.1.0".into(),
            started_at: now - chrono::Duration::hours(1),
            api: "127.0.0.1:7878".into(),
            seen_at: now - chrono::Duration::seconds(ago),
            instance: "i-1".into(),
        };
        assert!(view(entry(0), now, "i-1").alive);
        assert!(view(entry(0), now, "i-1").this_node);
        assert!(!view(entry(0), now, "i-2").this_node);
        assert!(view(entry(NODE_TTL.as_secs() as i64), now, "x").alive);
        assert!(!view(entry(NODE_TTL.as_secs() as i64 + 1), now, "x").alive);
        // A clock a little ahead is not "seen in the future" trouble.
        assert!(view(entry(-2), now, "x").alive);
    }
}
