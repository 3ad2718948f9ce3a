//! A site's gateway: builds every part from the validated config, recovers from the
//! journal, serves the API and the peer link until shutdown, then drains.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::api::types::{PeerInfo, SiteInfo};
use crate::api::{ApiServer, ApiServerError, ApiState};
use crate::config::SiteConfig;
use crate::criu::Criu;
use crate::identity::{Identity, IdentityError};
use crate::journal::{Journal, JournalError};
use crate::migration::{Engine, MigrationError};
use crate::peer::{PeerError, PeerLink};
use crate::plugins::{PluginError, PluginHost};
use crate::proxy::{HoldLimits, Ingress};
use crate::workload::{process, WorkloadError, Workloads};

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error(transparent)]
    Api(#[from] ApiServerError),
    #[error(transparent)]
    Plugins(#[from] PluginError),
    #[error("cannot become the reaper of restored workloads: {0}")]
    Subreaper(#[source] std::io::Error),
}

/// Runs the gateway until `cancel` fires.
pub async fn run(cfg: SiteConfig, cancel: CancellationToken) -> Result<(), GatewayError> {
    let identity = Arc::new(Identity::load(&cfg.identity.cert, &cfg.identity.key)?);
    let journal = Arc::new(Journal::open(&cfg.data_dir)?);
    process::become_subreaper().map_err(GatewayError::Subreaper)?;

    let plugins = PluginHost::load(&cfg, Criu::new(cfg.criu_path())).await?;
    let peers = PeerLink::bind(&cfg, Arc::clone(&identity))?;
    let limits = HoldLimits {
        max_hold: std::time::Duration::from_millis(cfg.ingress.max_hold_ms),
        drain: std::time::Duration::from_millis(cfg.ingress.drain_ms),
        max_held: cfg.ingress.max_held,
    };
    let ingress = Ingress::new(Arc::clone(&peers), limits, cancel.clone());
    let workloads = Workloads::new(
        &cfg,
        Arc::clone(&journal),
        Arc::clone(&plugins),
        Arc::clone(&ingress),
    )?;
    workloads.recover()?;
    let engine = Engine::new(
        &cfg,
        Arc::clone(&journal),
        Arc::clone(&workloads),
        Arc::clone(&peers),
        Arc::clone(&plugins),
        Arc::clone(&ingress),
        cancel.clone(),
    )?;
    let api = ApiServer::bind(cfg.api.listen, &identity).await?;
    let api_addr = api.local_addr().unwrap_or(cfg.api.listen);
    let peer_addr = peers.local_addr().unwrap_or(cfg.peer.listen);

    let peer_task = tokio::spawn(Arc::clone(&peers).serve(Arc::clone(&engine), cancel.clone()));
    engine.recover()?;

    let state = Arc::new(ApiState {
        token: cfg.api.token.clone(),
        site: SiteInfo {
            name: cfg.name.clone(),
            version: crate::VERSION.to_string(),
            fingerprint: identity.fingerprint().to_string(),
            api: api_addr,
            peer_listen: peer_addr,
            peers: cfg
                .peers
                .iter()
                .map(|p| PeerInfo {
                    name: p.name.clone(),
                    address: p.address,
                    fingerprint: p.fingerprint.to_string(),
                })
                .collect(),
        },
        workloads,
        engine: Arc::clone(&engine),
        peers: Arc::clone(&peers),
        plugins,
        ingress: Arc::clone(&ingress),
    });
    tracing::info!(site = %cfg.name, api = %api_addr, peer = %peer_addr, fingerprint = %identity.fingerprint(), "gateway ready");
    api.serve(state, cancel.clone()).await;

    tracing::info!("shutting down");
    engine.drain(Duration::from_secs(10)).await;
    tracing::debug!("migrations drained");
    peers.shutdown().await;
    let _ = peer_task.await;
    tracing::info!("gateway stopped");
    Ok(())
}
