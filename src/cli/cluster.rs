//! `capstan cluster status`: the nodes of the cluster this engine is a node of (alive or
//! not, when last seen) and the runs waiting in the cluster's stream. Asks the running
//! engine's API (`GET /api/cluster`); an engine that runs alone, or a data directory
//! with no engine running, is not in a cluster, and the command says so.

use anyhow::Context;

use super::GlobalArgs;
use super::client::ApiClient;
use crate::api::cluster::ClusterView;

#[derive(Debug, clap::Subcommand)]
pub enum ClusterCmd {
    /// The nodes (alive when seen within 10 s, last seen), the runs stream's backlog and
    /// which node owns each device.
    Status {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(g: &GlobalArgs, cmd: ClusterCmd) -> anyhow::Result<()> {
    let ClusterCmd::Status { json } = cmd;
    let settings = g.settings(None)?;
    let rt = super::check::runtime()?;
    let api = {
        let _guard = rt.enter();
        ApiClient::connect(settings, &g.passphrase())?
    };
    rt.block_on(async {
        let v = api.json("GET", "/api/cluster", None).await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        let view: ClusterView = serde_json::from_value(v).context("the engine's answer")?;
        print!("{}", render(&view, api.is_in_process()));
        Ok(())
    })
}

/// The status as the command prints it.
fn render(view: &ClusterView, in_process: bool) -> String {
    let (Some(node), Some(nodes), Some(runs)) = (&view.node, &view.nodes, &view.runs) else {
        return if in_process {
            "no engine is running on this data directory; not in a cluster (start one with `capstan serve --cluster nats://…`)\n".into()
        } else {
            "the engine runs alone: not in a cluster (start it with `capstan serve --cluster nats://…` to make it a node)\n".into()
        };
    };
    let now = chrono::Utc::now();
    let alive = nodes.iter().filter(|n| n.alive).count();
    let mut out = format!(
        "cluster: {} node(s), {alive} alive; this is node {node}, on NATS server {}\n",
        nodes.len(),
        view.nats_server.as_deref().unwrap_or("?")
    );
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let ago = (now - n.last_seen).num_milliseconds().max(0) as f64 / 1000.0;
            vec![
                format!("{}{}", n.name, if n.this_node { " *" } else { "" }),
                if n.alive { "alive" } else { "not alive" }.to_string(),
                format!("{ago:.1}s ago"),
                n.api.clone(),
                n.version.clone(),
                n.started_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            ]
        })
        .collect();
    out.push_str(&super::table_text(
        &["NODE", "STATE", "LAST SEEN", "API", "VERSION", "STARTED"],
        &rows,
    ));
    out.push_str(&format!(
        "runs stream {} ({} replica(s)): {} waiting for a node (lag), {} taken and not yet acked, {} delivered again; ack_wait {}s, max_deliver {}\n",
        runs.stream,
        runs.replicas,
        runs.pending,
        runs.ack_pending,
        runs.redelivered,
        runs.ack_wait_secs,
        runs.max_deliver
    ));
    if let Some(leases) = &view.leases {
        let lease = view.lease_secs.unwrap_or_default();
        if leases.is_empty() {
            out.push_str(&format!(
                "device leases ({lease}s): none (no node owns a device yet)\n"
            ));
        } else {
            out.push_str(&format!("device leases ({lease}s):\n"));
            let rows: Vec<Vec<String>> = leases
                .iter()
                .map(|l| {
                    vec![
                        l.device.clone(),
                        format!("{}{}", l.owner, if l.this_node { " *" } else { "" }),
                        format!("{:.1}s", l.age_secs),
                        format!("{:.1}s", l.expires_in_secs),
                    ]
                })
                .collect();
            out.push_str(&super::table_text(
                &["DEVICE", "OWNER", "HELD FOR", "EXPIRES IN"],
                &rows,
            ));
        }
    }
    if let Some(h) = &view.history {
        out.push_str(&format!(
            "history stream {} ({} replica(s)): {} run(s) recorded, last sequence {}; this node applied up to {} ({} behind)\n",
            h.stream, h.replicas, h.messages, h.last_sequence, h.applied_sequence, h.lag
        ));
    }
    out
}
