//! JSON bodies of the REST API that are not records of their own module (workloads and
//! migrations serialize their durable records directly).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// `POST /v1/migrations`
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationRequest {
    pub workload: String,
    pub to: String,
    /// Run this approach ("orchestrator", "container", "service") or fail saying why not.
    #[serde(default)]
    pub approach: Option<String>,
    /// The runtime at the destination (service level only, when it differs).
    #[serde(default)]
    pub runtime: Option<String>,
    /// Runtime settings at the destination, replacing the source's.
    #[serde(default)]
    pub settings: Option<std::collections::BTreeMap<String, String>>,
    /// The command at the destination, replacing the source's.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// "stop-and-copy" (default) or "postcopy".
    #[serde(default)]
    pub mode: Option<String>,
}

impl MigrationRequest {
    pub fn options(&self) -> crate::migration::MoveOptions {
        crate::migration::MoveOptions {
            approach: self.approach.clone(),
            runtime: self.runtime.clone(),
            settings: self.settings.clone(),
            command: self.command.clone(),
            mode: self.mode.clone(),
        }
    }
}

/// `GET /v1/site`
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SiteInfo {
    pub name: String,
    pub version: String,
    pub fingerprint: String,
    #[schema(value_type = String)]
    pub api: SocketAddr,
    #[schema(value_type = String)]
    pub peer_listen: SocketAddr,
    pub peers: Vec<PeerInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PeerInfo {
    pub name: String,
    #[schema(value_type = String)]
    pub address: SocketAddr,
    pub fingerprint: String,
}

/// `GET /v1/peers`: each configured peer, probed now.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PeerStatus {
    pub name: String,
    #[schema(value_type = String)]
    pub address: SocketAddr,
    pub reachable: bool,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    #[serde(default)]
    pub error: Option<String>,
}

/// Every error response: a stable machine-readable `code` and a human `message`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// `GET /v1/routes`: a workload's ingress routes at this site and where they lead now.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RouteInfo {
    pub workload: String,
    pub routes: Vec<crate::spec::RouteSpec>,
    /// "local", "held" (the workload is moving) or "peer:NAME" (forwarded over the link).
    pub target: String,
    pub bound: usize,
    pub held: usize,
}

impl From<crate::proxy::RouteStats> for RouteInfo {
    fn from(r: crate::proxy::RouteStats) -> Self {
        Self {
            workload: r.workload,
            routes: r.routes,
            target: r.target.to_string(),
            bound: r.bound,
            held: r.held,
        }
    }
}

/// `POST /v1/workloads/{name}/checkpoints`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// Let the workload run on after the checkpoint (else it goes to standby).
    #[serde(default)]
    pub leave_running: bool,
}

/// `POST /v1/workloads/{name}/restore`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The checkpoint's id (default: the newest).
    #[serde(default)]
    pub from: Option<String>,
    /// Stop a running workload of that name and restore in its place.
    #[serde(default)]
    pub replace: bool,
}

/// `POST /v1/workloads/{name}/recover`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    /// The replicated checkpoint's id (default: the newest replicated here).
    #[serde(default)]
    pub from: Option<String>,
    /// Recover even though the workload's site answers on the peer link.
    #[serde(default)]
    pub force: bool,
}

/// One `progress` event of `GET /v1/migrations/{id}/events`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationEvent {
    pub id: String,
    pub workload: String,
    pub phase: String,
    /// Since the stream began.
    pub elapsed_ms: u64,
    /// What the move has put on the peer link so far (the image while it streams, the
    /// pages sent ahead and after the switch once counted).
    pub bytes_sent: u64,
    /// `bytes_sent`'s rate over the last half second.
    pub rate_mbit_s: f64,
    /// Bytes of the image read and sent so far (before compression and deduplication).
    #[serde(default)]
    pub bytes_read: u64,
    /// How big the image should be, as the source estimates it: its resident memory. None
    /// at the destination.
    #[serde(default)]
    pub expected_bytes: Option<u64>,
    /// Time left until `expected_bytes` are read and sent, at the rate of the last half
    /// second, while the image is being sent.
    #[serde(default)]
    pub eta_ms: Option<u64>,
    pub bytes_moved: u64,
    pub bytes_deduped: u64,
    #[serde(default)]
    pub pages: Option<crate::migration::PageStats>,
    #[serde(default)]
    pub error: Option<String>,
}

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// Always "ok".
    pub status: String,
}

/// `DELETE /v1/routes/{workload}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RouteClosed {
    pub workload: String,
    pub closed: bool,
}
