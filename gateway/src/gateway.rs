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
use crate::migration::{Engine, EngineSettings, MigrationError, Parts};
use crate::peer::{PeerError, PeerLink};
use crate::plugins::{PluginError, PluginHost};
use crate::proxy::Ingress;
use crate::sys::process;
use crate::workload::{WorkloadError, Workloads};

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
    #[error(transparent)]
    Checkpoints(#[from] crate::checkpoint::CheckpointError),
    #[error("cannot become the reaper of restored workloads: {0}")]
    Subreaper(#[source] std::io::Error),
    #[error("cannot make the data directory {path} owner-only (it holds checkpoint images of workload memory): {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The data directory holds checkpoint images (workload memory) and the journal: only
/// the gateway's user may enter it.
fn restrict_data_dir(dir: &std::path::Path) -> Result<(), GatewayError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        GatewayError::DataDir {
            path: dir.to_path_buf(),
            source,
        }
    })
}

/// Runs the gateway until `cancel` fires.
pub async fn run(cfg: SiteConfig, cancel: CancellationToken) -> Result<(), GatewayError> {
    if let Err(e) = process::close_inherited_on_exec() {
        tracing::warn!(error = %e, "cannot mark inherited descriptors close-on-exec; workloads may inherit them");
    }
    let identity = Arc::new(Identity::load(&cfg.identity.cert, &cfg.identity.key)?);
    let journal = Arc::new(Journal::open(&cfg.data_dir)?);
    restrict_data_dir(&cfg.data_dir)?;
    process::become_subreaper().map_err(GatewayError::Subreaper)?;
    match process::raise_nofile_limit() {
        Ok(n) => tracing::debug!(open_files = n, "open-file limit"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit; many clients may exhaust it");
        }
    }

    let peers = PeerLink::bind(&cfg, Arc::clone(&identity))?;
    let ingress = Ingress::new(Arc::clone(&peers), hold_limits(&cfg), cancel.clone());
    // Service adapters open their tunnels through the ingress.
    let tunnels: Arc<dyn crate::plugins::TunnelOpener> = ingress.clone();
    let mut criu = Criu::new(cfg.criu_path()).probe_lazy_pages_in_tasks();
    if criu.patch() == crate::criu::FerryPatch::LazyPagesInTasks {
        tracing::warn!("CRIU lacks the second change of Ferry's patch: a lazy dump leaves no page lazy whenever a thread's stack pointer is page-aligned, and post-copy then copies every page in the freeze (run scripts/setup: it rebuilds CRIU)");
    } else if criu.lazy_pages_in_tasks() {
        tracing::info!("CRIU leaves a lazy dump's pages in the frozen tasks (post-copy's freeze does not splice them)");
    } else {
        tracing::info!("CRIU lacks --lazy-pages-in-tasks: post-copy's freeze splices every page into pipes (scripts/setup builds CRIU with Ferry's patch)");
    }
    if cfg.migration.lazy_pages == "ferry" {
        match std::env::current_exe() {
            Ok(exe) => criu = criu.with_lazy_daemon(exe),
            Err(e) => {
                tracing::warn!(error = %e, "cannot find this executable; post-copy restores here use criu lazy-pages");
            }
        }
    }
    if let Err(why) = crate::criu::lazy_dump_ready() {
        tracing::warn!("{why}; post-copy migrations from this site will be refused");
    }
    let plugins =
        PluginHost::load_with_tunnels(&plugin_settings(&cfg), criu.clone(), Some(tunnels)).await?;
    let workloads = Workloads::new(
        registry_settings(&cfg),
        Arc::clone(&journal),
        Arc::clone(&plugins),
        Arc::clone(&ingress),
    )?;
    workloads.recover()?;
    let checkpoints = crate::checkpoint::Checkpoints::open(
        &cfg.name,
        &cfg.data_dir,
        cfg.workloads.keep_checkpoints,
        crate::hooks::Hooks::new(cfg.hooks.clone()),
        crate::checkpoint::Parts {
            journal: Arc::clone(&journal),
            peers: Arc::clone(&peers),
            workloads: Arc::clone(&workloads),
            plugins: Arc::clone(&plugins),
            ingress: Arc::clone(&ingress),
        },
    )?;
    let engine = Engine::new(
        EngineSettings {
            site: cfg.name.clone(),
            data_dir: cfg.data_dir.clone(),
            parallel_files: 4,
            approaches: cfg.migration.approaches.clone(),
            sync_timeout: Duration::from_secs(cfg.migration.sync_timeout_secs),
            prepush: cfg.migration.prepush,
            stall_after: Duration::from_secs(cfg.migration.stall_after_secs),
            hooks: crate::hooks::Hooks::new(cfg.hooks.clone()),
        },
        Parts {
            journal: Arc::clone(&journal),
            workloads: Arc::clone(&workloads),
            peers: Arc::clone(&peers),
            plugins: Arc::clone(&plugins),
            ingress: Arc::clone(&ingress),
            criu,
            checkpoints: Some(Arc::clone(&checkpoints)),
        },
        cancel.clone(),
    )?;
    let api = ApiServer::bind(cfg.api.listen, &identity).await?;
    let api_addr = api.local_addr().unwrap_or(cfg.api.listen);
    let peer_addr = peers.local_addr().unwrap_or(cfg.peer.listen);

    let peer_task = tokio::spawn(Arc::clone(&peers).serve(
        Arc::new(SiteRequests {
            engine: Arc::clone(&engine),
            checkpoints: Arc::clone(&checkpoints),
        }),
        Arc::clone(&engine),
        cancel.clone(),
    ));
    engine.recover()?;
    checkpoints.schedule(cancel.clone());
    let restarts = crate::restart::Supervisor::new(
        Arc::clone(&workloads),
        Arc::clone(&checkpoints),
        Arc::clone(&plugins),
    );
    restarts.start(cancel.clone());

    let state = Arc::new(ApiState {
        token: cfg.api.token.clone(),
        allowed_commands: cfg.api.allowed_commands.clone(),
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
        workloads: Arc::clone(&workloads),
        engine: Arc::clone(&engine),
        checkpoints: Arc::clone(&checkpoints),
        restarts,
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
    ingress.drain(Duration::from_secs(2)).await;
    workloads.drain(Duration::from_secs(2)).await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// What the plugin host needs from this config.
pub fn plugin_settings(cfg: &SiteConfig) -> crate::plugins::HostSettings {
    crate::plugins::HostSettings {
        dir: cfg.plugins.dir.clone(),
        cache_dir: cfg.plugin_cache_dir(),
        call_timeout: std::time::Duration::from_millis(cfg.plugins.call_timeout_ms),
        memory_limit_mb: cfg.plugins.memory_limit_mb,
        grants: cfg.plugins.grants.clone(),
        inflight_dir: Some(cfg.data_dir.join("plugins-inflight")),
    }
}

/// How long and how much traffic the ingress holds.
fn hold_limits(cfg: &SiteConfig) -> crate::proxy::HoldLimits {
    crate::proxy::HoldLimits {
        max_hold: std::time::Duration::from_millis(cfg.ingress.max_hold_ms),
        drain: std::time::Duration::from_millis(cfg.ingress.drain_ms),
        max_held: cfg.ingress.max_held,
    }
}

/// Where the workload registry keeps workloads; creates the site's cgroup (v2) if it
/// can, else workloads run without one.
fn registry_settings(cfg: &SiteConfig) -> crate::workload::RegistrySettings {
    let cgroup_base = match crate::sys::process::cgroup2_mount() {
        Some(mount) => {
            let base = mount.join(&cfg.workloads.cgroup_parent).join(&cfg.name);
            match std::fs::create_dir_all(&base) {
                Ok(()) => Some(base),
                Err(e) => {
                    tracing::warn!(path = %base.display(), error = %e, "cannot create the workloads' cgroup; running without one");
                    None
                }
            }
        }
        None => {
            tracing::warn!("no cgroup v2 hierarchy mounted; workloads run without a cgroup");
            None
        }
    };
    crate::workload::RegistrySettings {
        site: cfg.name.clone(),
        logs_dir: cfg.data_dir.join("logs"),
        work_root: cfg.workloads.work_root.clone(),
        cgroup_base,
        health_timeout: std::time::Duration::from_secs(cfg.workloads.health_timeout_secs),
    }
}

/// What a peer asks this site: checkpoint replication goes to the site's checkpoints,
/// everything else to the migration engine.
struct SiteRequests {
    engine: Arc<Engine>,
    checkpoints: Arc<crate::checkpoint::Checkpoints>,
}

impl crate::peer::Handler for SiteRequests {
    async fn handle(
        &self,
        peer: String,
        req: crate::peer::wire::Request,
        body: crate::peer::Body<'_>,
    ) -> crate::peer::wire::Response {
        use crate::peer::wire::Request;
        match req {
            Request::BlocksWanted { .. }
            | Request::Blocks { .. }
            | Request::Replica { .. }
            | Request::Volumes { .. }
            | Request::Fence { .. }
            | Request::HeldPages { .. } => self.checkpoints.handle_peer(&peer, req, body).await,
            other => self.engine.handle(peer, other, body).await,
        }
    }
}
