//! `GET /api/cluster`: whether this engine is a node of a cluster, and if so the nodes
//! (alive or not, last seen), the runs stream's backlog and the device leases (see [`crate::cluster`]).
//! Read-only (`viewer`); the nodes span every device, so a device-scoped token is
//! refused as for `/metrics`.

use axum::Json;
use axum::extract::{Extension, State};
use serde::{Deserialize, Serialize};

use super::{AppError, AppState, authz};
use crate::cluster::NodeView;
use crate::cluster::history::HistoryView;
use crate::cluster::leases::LeaseView;
use crate::cluster::work::RunsView;
use crate::token::TokenInfo;

/// The cluster as the answering node sees it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterView {
    /// Whether this engine is a node of a cluster (`serve --cluster`); when not, the other
    /// fields are absent.
    pub in_cluster: bool,
    /// The answering node's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The NATS server the answering node is connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_server: Option<String>,
    /// Every node that renewed its entry in the last 5 minutes, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<NodeView>>,
    /// The runs stream and the shared consumer's backlog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<RunsView>,
    /// The device leases: which node owns each device, by device name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leases: Option<Vec<LeaseView>>,
    /// The lease time, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_secs: Option<u64>,
    /// The run history stream and how far the answering node has applied it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryView>,
}

/// Cluster status
///
/// The nodes of the cluster (alive when seen within 10 s) and the runs waiting in the
/// cluster's stream; `in_cluster: false` for an engine that runs alone.
#[utoipa::path(
    get,
    path = "/api/cluster",
    tag = "engine",
    responses(
        (status = 200, description = "The cluster, or that there is none", body = ClusterView),
        (status = 403, description = "The token is limited to devices; the cluster spans every device", body = super::ErrorBody),
        (status = 503, description = "NATS does not answer", body = super::ErrorBody),
    )
)]
pub async fn status(
    State(state): State<AppState>,
    Extension(token): Extension<TokenInfo>,
) -> Result<Json<ClusterView>, AppError> {
    authz::require_unscoped(&token, "/api/cluster")?;
    let Some(cluster) = state.scheduler.cluster() else {
        return Ok(Json(ClusterView {
            in_cluster: false,
            node: None,
            nats_server: None,
            nodes: None,
            runs: None,
            leases: None,
            lease_secs: None,
            history: None,
        }));
    };
    let unavailable = |e: crate::cluster::ClusterError| AppError::Unavailable(e.to_string());
    let nodes = cluster.nodes().await.map_err(unavailable)?;
    let runs = cluster.runs_view().await.map_err(unavailable)?;
    let leases = cluster.lease_views().await.map_err(unavailable)?;
    let history = cluster.history_view().await.map_err(unavailable)?;
    Ok(Json(ClusterView {
        in_cluster: true,
        node: Some(cluster.node_name().to_string()),
        nats_server: Some(cluster.connected_server()),
        nodes: Some(nodes),
        runs: Some(runs),
        leases: Some(leases),
        lease_secs: Some(cluster.lease_time().as_secs()),
        history: Some(history),
    }))
}
