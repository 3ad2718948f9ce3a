//! Migrations: the durable record of each move, the engine that owns them, and the
//! rules both sides follow so that a service runs at exactly one site, or is frozen at
//! the source with a complete image, until the destination confirms a healthy restore.
//!
//! The source drives ([`source`]); the destination answers peer requests ([`target`]);
//! a restarted gateway finishes or rolls back what its journal says was under way
//! ([`recovery`]).

mod compat;
mod faults;
mod handover;
pub mod plan;
mod postcopy;
mod prepush;
mod recovery;
mod replica;
mod service;
mod source;
mod target;
#[cfg(test)]
mod tests_inprocess;
mod tunnels;

pub use compat::criu_version;
pub use faults::{Fault, Faults};
pub use plan::{Candidate, MoveOptions, MovePlan};

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::journal::{Collection, Journal, JournalError};
use crate::peer::wire::SyncInfo;
use crate::peer::{PeerError, PeerLink};
use crate::plugins::{PluginError, PluginHost};
use crate::proxy::Ingress;
use crate::spec::{now_ms, WorkloadSpec};
use crate::transfer::{FileMeta, TransferError};
use crate::workload::{WorkloadError, Workloads};

#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("site {0:?} is not a configured peer of this site")]
    UnknownSite(String),
    #[error("cannot migrate to this site itself")]
    SameSite,
    #[error("migration {0:?} not found")]
    NotFound(String),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error(transparent)]
    Adapter(#[from] PluginError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error("site {site} refused the migration: {message}")]
    Refused { site: String, message: String },
    #[error("site {site} cannot restore this workload, so nothing was frozen: {problems}")]
    Incompatible { site: String, problems: String },
    #[error("restore at site {site} failed: {message}")]
    RestoreFailed { site: String, message: String },
    #[error(
        "the replica did not get in sync within {secs} s (last: {last}); the source kept serving"
    )]
    SyncTimeout { secs: u64, last: String },
    #[error("injected fault entering {phase}: {message}")]
    Injected { phase: Phase, message: String },
    #[error("injected crash entering {phase}")]
    Crashed { phase: Phase },
    #[error("aborted by the operator")]
    Aborted,
    #[error("migration {id} cannot be aborted: {why}")]
    CannotAbort { id: String, why: String },
    #[error("workload {workload:?} cannot be removed here yet: {why}; removing it could leave the service nowhere, retry once the move has completed at its source")]
    NotReleased { workload: String, why: String },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Source,
    Target,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Target => "target",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Planned,
    Preparing,
    /// Service level: the destination's replica follows the source (which keeps serving).
    Syncing,
    Checkpointing,
    Transferring,
    Restoring,
    /// Post-copy: the destination runs; the source, frozen, serves it the pages it lacks.
    Paging,
    CuttingOver,
    Completed,
    RollingBack,
    RolledBack,
    /// Rolled back, but the source could not be resumed (it had exited).
    Failed,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::RolledBack | Phase::Failed)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Planned => "planned",
            Phase::Preparing => "preparing",
            Phase::Syncing => "syncing",
            Phase::Checkpointing => "checkpointing",
            Phase::Transferring => "transferring",
            Phase::Restoring => "restoring",
            Phase::Paging => "paging",
            Phase::CuttingOver => "cutting_over",
            Phase::Completed => "completed",
            Phase::RollingBack => "rolling_back",
            Phase::RolledBack => "rolled_back",
            Phase::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Phase durations in milliseconds. `freeze_ms` is the service's downtime: from the
/// start of the checkpoint until the destination confirmed a healthy restore.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Timings {
    /// Before the freeze, while clients were served: the plan, the destination prepared
    /// (name, port, reservation), volumes and pages sent ahead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare_ms: Option<u64>,
    pub freeze_ms: Option<u64>,
    pub dump_ms: Option<u64>,
    /// Service level: from the start of the sync until the replica was in sync.
    #[serde(default)]
    pub sync_ms: Option<u64>,
    pub transfer_ms: Option<u64>,
    pub restore_ms: Option<u64>,
    /// Post-copy: from the destination's confirmation until it held every page (the
    /// window in which a destination crash loses the writes made there).
    #[serde(default)]
    pub postcopy_ms: Option<u64>,
    /// Post-copy: sending the pages ahead, before the freeze.
    #[serde(default)]
    pub prepush_ms: Option<u64>,
    /// Volumes: the pass while the workload was frozen (what changed since the pre-copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_delta_ms: Option<u64>,
    pub total_ms: Option<u64>,
}

/// How a migration moved the workload's volumes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeStats {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy: Option<crate::checkpoint::volume::VolumeSync>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<crate::checkpoint::volume::VolumeSync>,
    /// Destination: bytes written into the volumes before the restore (files already
    /// there with the same content are not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_bytes: Option<u64>,
}

/// Post-copy's pages: sent ahead, stale at the freeze, pushed after the switch, and how the
/// destination's faults were answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PageStats {
    /// Pages sent ahead of the freeze (source), or kept of them (destination).
    pub ahead: u64,
    /// Pages sent ahead that were written before the freeze (sent again after it).
    pub stale: u64,
    /// Destination: pages the bulk push brought after the switch.
    #[serde(default)]
    pub pushed: u64,
    /// Destination: page requests of the `criu lazy-pages` daemon (faults and its own
    /// background fetch), those answered from the cache at once, and those that waited for
    /// the source, with the wait's median and 99th percentile.
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub hits: u64,
    #[serde(default)]
    pub waits: u64,
    #[serde(default)]
    pub wait_p50_us: Option<u64>,
    #[serde(default)]
    pub wait_p99_us: Option<u64>,
    /// Source: what the pages sent ahead took on the wire.
    #[serde(default)]
    pub ahead_wire: u64,
    /// Source: what the pages sent after the switch (faults and the bulk push) took on
    /// the wire, and how long the bulk push ran (its first chunk to its last).
    #[serde(default)]
    pub after_wire: u64,
    #[serde(default)]
    pub push_ms: Option<u64>,
}

/// A migration's durable record, also what the API returns.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Migration {
    pub id: String,
    pub workload: String,
    pub role: Role,
    pub source: String,
    pub target: String,
    pub phase: Phase,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    /// Why the migration rolled back or failed, or what it is waiting for.
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub timings: Timings,
    /// The image's size.
    #[serde(default)]
    pub bytes_moved: u64,
    /// What the image took on the link (framing and compression included); source only.
    #[serde(default)]
    pub bytes_on_wire: u64,
    /// Bytes of the image that went as digests of page blocks the destination already
    /// held (a warm destination); source only.
    #[serde(default)]
    pub bytes_deduped: u64,
    #[serde(default)]
    pub files: u32,
    pub spec: WorkloadSpec,
    /// Source only: the restore request may have reached the destination, so a rollback
    /// needs the destination's word that it holds no running copy.
    #[serde(default)]
    pub restore_requested: bool,
    /// The approach the adapter chose, and why (from its probe).
    #[serde(default)]
    pub approach: Option<String>,
    #[serde(default)]
    pub plan: Option<String>,
    /// Target only: files received and verified so far.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub received: Vec<FileMeta>,
    /// What the caller asked (approach, destination runtime).
    #[serde(default)]
    pub options: MoveOptions,
    /// Every approach considered, and why (source only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<Candidate>,
    /// Service level: the service adapter that syncs the replica.
    #[serde(default)]
    pub service: Option<String>,
    /// The workload as it runs at the destination, when that differs (another runtime).
    #[serde(default)]
    pub destination: Option<WorkloadSpec>,
    /// Service level: the replica's last reported state.
    #[serde(default)]
    pub sync: Option<SyncInfo>,
    /// Post-copy: how the pages travelled (each site records its side).
    #[serde(default)]
    pub pages: Option<PageStats>,
    /// The workload's volumes: the pass while it ran (pre-copy) and the one while it was
    /// frozen (delta), at the source; what was written, at the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<VolumeStats>,
    /// Target, service level: the replica's process, until it is confirmed or discarded
    /// (so a restarted gateway can discard it).
    #[serde(default)]
    pub replica_pid: Option<i32>,
    #[serde(default)]
    pub replica_pid_start: Option<u64>,
    /// Post-copy (source): the lazy dump serving the frozen source's pages, on loopback.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub page_server: Option<std::net::SocketAddr>,
    #[serde(default)]
    pub lazy_dump_pid: Option<i32>,
    #[serde(default)]
    pub lazy_dump_pid_start: Option<u64>,
    /// Source: an operator asked to abort (honoured at the next step, before the
    /// destination is asked to run the workload; refused after).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abort_requested: bool,
    /// Source: since when (ms since the epoch) it has waited longer than the site's bound
    /// for a silent destination's word; cleared when the word comes.
    #[serde(default)]
    pub stalled_since_ms: Option<u64>,
    /// Source: the destination journal's generation once it recorded this migration (its
    /// answers from a journal with a lower one are not trusted).
    #[serde(default)]
    pub destination_generation: Option<u64>,
    /// Destination: the source said it released its copy (the restored workload may be
    /// removed here from then on).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub source_released: bool,
}

impl Migration {
    /// A fresh record of a migration of `spec` from `source` to `target`.
    fn new(
        id: &str,
        spec: WorkloadSpec,
        role: Role,
        source: &str,
        target: &str,
        phase: Phase,
    ) -> Self {
        let now = now_ms();
        Self {
            id: id.to_string(),
            workload: spec.name.clone(),
            role,
            source: source.to_string(),
            target: target.to_string(),
            phase,
            created_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: None,
            error: None,
            timings: Timings::default(),
            bytes_moved: 0,
            bytes_on_wire: 0,
            bytes_deduped: 0,
            files: 0,
            spec,
            restore_requested: false,
            approach: None,
            plan: None,
            received: Vec::new(),
            options: MoveOptions::default(),
            candidates: Vec::new(),
            service: None,
            destination: None,
            sync: None,
            pages: None,
            volumes: None,
            replica_pid: None,
            replica_pid_start: None,
            page_server: None,
            lazy_dump_pid: None,
            lazy_dump_pid_start: None,
            abort_requested: false,
            stalled_since_ms: None,
            destination_generation: None,
            source_released: false,
        }
    }
}

/// How a change to a migration's record reaches the journal ([`Engine::apply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durable {
    /// Journaled first; a journal failure is an error.
    Required,
    /// Journaled if the journal takes it; otherwise the failure is noted in the record's
    /// reason, and the record listed anyway.
    Tried,
    /// Listed only.
    No,
}

/// A source's wait for a destination's word: once the destination has said nothing for
/// the site's bound, the migration is reported `stalled` (its record and `/metrics`),
/// until it answers again.
pub(super) struct StallWatch {
    id: String,
    target: String,
    what: String,
    bound: std::time::Duration,
    /// The last answer (or the start of the wait).
    since: Mutex<std::time::Instant>,
    noted: std::sync::atomic::AtomicBool,
}

impl StallWatch {
    /// Runs alongside the wait (never returns): marks the migration stalled whenever the
    /// destination has been silent for the bound.
    pub(super) async fn watch(&self, engine: &Engine) -> std::convert::Infallible {
        use std::sync::atomic::Ordering::Relaxed;
        loop {
            let since = *locked(&self.since);
            tokio::time::sleep_until((since + self.bound).into()).await;
            if *locked(&self.since) != since || self.noted.swap(true, Relaxed) {
                continue;
            }
            let (target, what, secs) = (&self.target, &self.what, self.bound.as_secs());
            tracing::warn!(migration = %self.id, peer = %target, secs, "stalled: the destination is silent");
            let _ = engine.update(&self.id, |m| {
                m.stalled_since_ms = Some(crate::spec::now_ms());
                m.error = Some(format!(
                    "stalled: site {target} has not said {what} for over {secs} s; the source stays frozen with its image (it never resumes on silence: {target} may run the workload). Bring {target} or the link to it back, and the move ends on its word"
                ));
            });
        }
    }

    /// The destination answered: not stalled (any more).
    pub(super) fn answered(&self, engine: &Engine) {
        *locked(&self.since) = std::time::Instant::now();
        if self.noted.swap(false, std::sync::atomic::Ordering::Relaxed) {
            let _ = engine.update(&self.id, |m| m.stalled_since_ms = None);
        }
    }
}

/// What the engine needs from the site's configuration.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub site: String,
    /// Images of outgoing migrations go to `DATA_DIR/images/ID`, incoming ones to
    /// `DATA_DIR/incoming/ID`.
    pub data_dir: PathBuf,
    /// Image files in flight at once.
    pub parallel_files: usize,
    /// The approaches this site allows ("orchestrator", "container", "service").
    pub approaches: Vec<String>,
    /// Longest a service-level replica may take to get in sync before the move is
    /// abandoned (the source never stopped serving).
    pub sync_timeout: std::time::Duration,
    /// Post-copy: send the pages ahead of the freeze.
    pub prepush: bool,
    /// A source waiting this long for a silent destination reports `stalled`.
    pub stall_after: std::time::Duration,
    /// The site's hooks: post-checkpoint at the source, pre-restore at the destination.
    pub hooks: crate::hooks::Hooks,
}

/// The parts of a site the engine drives.
pub struct Parts {
    pub journal: Arc<Journal>,
    pub workloads: Arc<Workloads>,
    pub peers: Arc<PeerLink>,
    pub plugins: Arc<PluginHost>,
    pub ingress: Arc<Ingress>,
    /// The CRIU driver the plugin host uses (post-copy takes over the processes it leaves
    /// running).
    pub criu: crate::criu::Criu,
    /// The site's checkpoints and block store: workloads' volumes travel through it (none:
    /// a workload with volumes cannot move from or to this engine).
    pub checkpoints: Option<Arc<crate::checkpoint::Checkpoints>>,
}

/// Why `m` cannot be aborted now, if it cannot.
fn abort_refusal(m: &Migration) -> Option<String> {
    if m.role == Role::Target {
        return Some(format!(
            "this site is its destination; abort it at its source, site {}",
            m.source
        ));
    }
    if m.phase.is_terminal() {
        return Some(format!("it has already ended ({})", m.phase));
    }
    if m.restore_requested {
        return Some(format!(
            "site {} was already asked to run the workload (phase {}): only its word can end the move now (it completes, or rolls back if the destination fails)",
            m.target, m.phase
        ));
    }
    None
}

/// Owns every migration of this site, as source or as destination.
pub struct Engine {
    me: std::sync::Weak<Engine>,
    site: String,
    journal: Arc<Journal>,
    workloads: Arc<Workloads>,
    peers: Arc<PeerLink>,
    plugins: Arc<PluginHost>,
    ingress: Arc<Ingress>,
    criu: crate::criu::Criu,
    checkpoints: Option<Arc<crate::checkpoint::Checkpoints>>,
    /// Post-copy: the CRIU processes serving or fetching pages, by migration.
    lazy: Mutex<std::collections::HashMap<String, crate::criu::Running>>,
    /// Post-copy, source: Ferry's end of the page path, by migration.
    page_sources: Mutex<std::collections::HashMap<String, Arc<crate::transfer::pages::PageSource>>>,
    /// Post-copy, source: the pages sent ahead of the freeze, by migration.
    prepushed: Mutex<std::collections::HashMap<String, crate::transfer::pages::Prepushed>>,
    /// Source: wakes a migration's long waits when an operator aborts it.
    aborts: Mutex<std::collections::HashMap<String, CancellationToken>>,
    /// Source: bytes the image transfer under way has put on the link, by migration (its
    /// record counts them once the transfer is over).
    sending: DashMap<String, Arc<crate::transfer::Progress>>,
    /// Source: the plan a move was checked with before it started, by migration (its
    /// driver takes it instead of planning again).
    early_plans: Mutex<std::collections::HashMap<String, MovePlan>>,
    /// Post-copy, destination: the pages the source sent ahead, by migration.
    precaches: Mutex<std::collections::HashMap<String, Arc<crate::transfer::pages::PageCache>>>,
    images_dir: PathBuf,
    incoming_dir: PathBuf,
    health_timeout: std::time::Duration,
    parallel_files: usize,
    approaches: Vec<String>,
    sync_timeout: std::time::Duration,
    prepush: bool,
    stall_after: std::time::Duration,
    hooks: crate::hooks::Hooks,
    migrations: DashMap<String, Migration>,
    /// Serializes record changes so none is journaled while a map lock is held.
    writes: Mutex<()>,
    /// Answers to peers wait until the journal is loaded.
    recovered: tokio::sync::watch::Sender<bool>,
    /// Counts the changes to records: a peer's status request waits on it.
    changes: tokio::sync::watch::Sender<u64>,
    faults: Faults,
    /// Holders of replicas this site started for service-level moves (their PID
    /// namespace's parent), reaped once the replica is adopted or discarded.
    holders: Mutex<std::collections::HashMap<String, tokio::process::Child>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

/// Milliseconds of `d`, for records and logs (saturating).
pub(crate) fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Engine {
    pub fn new(
        settings: EngineSettings,
        parts: Parts,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, MigrationError> {
        let images_dir = settings.data_dir.join("images");
        let incoming_dir = settings.data_dir.join("incoming");
        for d in [&images_dir, &incoming_dir] {
            std::fs::create_dir_all(d).map_err(|source| MigrationError::Io {
                what: "create directory",
                path: d.clone(),
                source,
            })?;
        }
        Ok(Arc::new_cyclic(|me| Self {
            me: me.clone(),
            site: settings.site,
            health_timeout: parts.workloads.health_timeout(),
            journal: parts.journal,
            workloads: parts.workloads,
            peers: parts.peers,
            plugins: parts.plugins,
            ingress: parts.ingress,
            criu: parts.criu,
            checkpoints: parts.checkpoints,
            lazy: Mutex::new(std::collections::HashMap::new()),
            page_sources: Mutex::new(std::collections::HashMap::new()),
            prepushed: Mutex::new(std::collections::HashMap::new()),
            precaches: Mutex::new(std::collections::HashMap::new()),
            early_plans: Mutex::new(std::collections::HashMap::new()),
            sending: DashMap::new(),
            aborts: Mutex::new(std::collections::HashMap::new()),
            images_dir,
            incoming_dir,
            parallel_files: settings.parallel_files.max(1),
            approaches: settings.approaches,
            sync_timeout: settings.sync_timeout,
            prepush: settings.prepush,
            stall_after: settings.stall_after,
            hooks: settings.hooks,
            migrations: DashMap::new(),
            writes: Mutex::new(()),
            recovered: tokio::sync::watch::channel(false).0,
            changes: tokio::sync::watch::channel(0).0,
            faults: Faults::default(),
            holders: Mutex::new(std::collections::HashMap::new()),
            tasks: TaskTracker::new(),
            cancel,
        }))
    }

    /// This engine, for tasks that outlive the call that starts them (none once it is
    /// dropped).
    fn this(&self) -> Option<Arc<Self>> {
        self.me.upgrade()
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    pub fn list(&self) -> Vec<Migration> {
        let mut v: Vec<Migration> = self.migrations.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.created_at_ms.cmp(&b.created_at_ms).then(a.id.cmp(&b.id)));
        v
    }

    pub fn get(&self, id: &str) -> Option<Migration> {
        self.migrations.get(id).map(|e| e.value().clone())
    }

    /// Plans a migration of `workload` to `to` and starts driving it in the background.
    pub fn start(self: &Arc<Self>, workload: &str, to: &str) -> Result<Migration, MigrationError> {
        self.start_with(workload, to, MoveOptions::default())
    }

    fn check_destination(&self, to: &str) -> Result<(), MigrationError> {
        if to == self.site {
            return Err(MigrationError::SameSite);
        }
        if !self.peers.peers().iter().any(|p| p.name == to) {
            return Err(MigrationError::UnknownSite(to.to_string()));
        }
        Ok(())
    }

    /// What the image transfer of `id` has done so far (zeros when none runs): bytes put
    /// on the link, and bytes of the image read and sent.
    pub fn sending_now(&self, id: &str) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.sending
            .get(id)
            .map_or((0, 0), |p| (p.wire.load(Relaxed), p.read.load(Relaxed)))
    }

    /// What moving `m` should put on the link, as far as this site can tell before it is
    /// done: the source's resident memory now (the image before compression); unknown at
    /// the destination.
    pub async fn expected_bytes(&self, m: &Migration) -> Option<u64> {
        if m.role != Role::Source {
            return None;
        }
        let pid = self.workloads.get(&m.workload)?.pid?;
        tokio::task::spawn_blocking(move || crate::sys::process::tree_rss_bytes(pid))
            .await
            .ok()
            .flatten()
    }

    /// Where the image transfer of `id` counts its progress.
    fn sending_progress(&self, id: &str) -> Arc<crate::transfer::Progress> {
        Arc::clone(self.sending.entry(id.to_string()).or_default().value())
    }

    /// The plan a move was checked with before it started, if any (once).
    fn take_early_plan(&self, id: &str) -> Option<MovePlan> {
        locked(&self.early_plans).remove(id)
    }

    /// The plan for moving `workload` to `to`, without moving anything (`--plan`).
    pub async fn plan_only(
        &self,
        workload: &str,
        to: &str,
        options: &MoveOptions,
    ) -> Result<MovePlan, MigrationError> {
        self.check_destination(to)?;
        let w = self
            .workloads
            .get(workload)
            .ok_or_else(|| WorkloadError::NotFound(workload.to_string()))?;
        self.plan(&w, to, options).await
    }

    /// Refuses a move the destination could not restore in any way (every candidate
    /// infeasible, and the checkpoint because the destination said why): before anything
    /// is held or frozen. Returns the plan, for [`Self::start_planned`].
    pub async fn refuse_incompatible(
        &self,
        workload: &str,
        to: &str,
        options: &MoveOptions,
    ) -> Result<MovePlan, MigrationError> {
        let plan = self.plan_only(workload, to, options).await?;
        let problems: Vec<String> = plan
            .candidates
            .iter()
            .flat_map(|c| c.incompatible.iter().cloned())
            .collect();
        if plan.chosen.is_none() && !problems.is_empty() {
            tracing::info!(
                workload,
                to,
                ?problems,
                "migration refused before any freeze: the destination cannot restore it"
            );
            return Err(MigrationError::Incompatible {
                site: to.to_string(),
                problems: problems.join("; "),
            });
        }
        Ok(plan)
    }

    /// Plans a migration of `workload` to `to` as `options` ask and starts driving it.
    pub fn start_with(
        self: &Arc<Self>,
        workload: &str,
        to: &str,
        options: MoveOptions,
    ) -> Result<Migration, MigrationError> {
        self.start_planned(workload, to, options, None)
    }

    /// [`Self::start_with`], with the plan the move was just checked with (taken instead
    /// of planning again: the probes of both sites are not repeated).
    pub fn start_planned(
        self: &Arc<Self>,
        workload: &str,
        to: &str,
        options: MoveOptions,
        plan: Option<MovePlan>,
    ) -> Result<Migration, MigrationError> {
        self.check_destination(to)?;
        if let Some(mode) = options
            .mode
            .as_deref()
            .filter(|m| !postcopy::MODES.contains(m))
        {
            return Err(MigrationError::Refused {
                site: self.site.clone(),
                message: format!("unknown mode {mode:?}: {}", postcopy::MODES.join(" or ")),
            });
        }
        if let Some(rt) = &options.runtime {
            crate::names::validate("runtime", rt)
                .map_err(crate::spec::SpecError::from)
                .map_err(WorkloadError::from)?;
        }
        let id = new_id();
        let held = self.hold_workload(workload, &id)?;
        let mut m = Migration::new(&id, held.spec, Role::Source, &self.site, to, Phase::Planned);
        m.options = options;
        if let Err(e) = self.insert(&m) {
            // Nothing was frozen yet: only the hold is released.
            self.unhold_workload(workload);
            return Err(e);
        }
        tracing::info!(migration = %id, workload, to, "migration planned");
        if let Some(plan) = plan {
            locked(&self.early_plans).insert(id.clone(), plan);
        }
        let this = Arc::clone(self);
        self.tasks.spawn(tracing::Instrument::instrument(
            async move { source::run(this, id).await },
            tracing::info_span!("migration", migration = %m.id, workload = %m.workload, role = "source"),
        ));
        Ok(m)
    }

    /// Applies `f` to a migration's record and journals the result before anyone acts on it.
    fn update(
        &self,
        id: &str,
        f: impl FnOnce(&mut Migration),
    ) -> Result<Migration, MigrationError> {
        self.apply(id, f, Durable::Required)
    }

    /// As [`Self::update`], but only in memory: for what a restart need not know (it
    /// ends the step anyway) and the next journaled step writes (a destination's received
    /// files, which a restart before the restore request aborts).
    fn note(&self, id: &str, f: impl FnOnce(&mut Migration)) -> Result<Migration, MigrationError> {
        self.apply(id, f, Durable::No)
    }

    /// As [`Self::update`], but a record the journal cannot take (a full disk) is still
    /// updated in memory, with the journal's error in its reason: for the steps that must
    /// happen anyway (a rollback releasing the source). `None` if there is no such record.
    fn update_unjournaled_ok(&self, id: &str, f: impl FnOnce(&mut Migration)) -> Option<Migration> {
        self.apply(id, f, Durable::Tried).ok()
    }

    /// Applies `f` to the record of `id`, journals it (as `durable` says) and lists it.
    fn apply(
        &self,
        id: &str,
        f: impl FnOnce(&mut Migration),
        durable: Durable,
    ) -> Result<Migration, MigrationError> {
        let _w = self.writer();
        let mut next = self
            .get(id)
            .ok_or_else(|| MigrationError::NotFound(id.to_string()))?;
        f(&mut next);
        next.updated_at_ms = now_ms();
        if next.phase.is_terminal() && next.finished_at_ms.is_none() {
            next.finished_at_ms = Some(next.updated_at_ms);
            next.timings.total_ms = Some(next.updated_at_ms.saturating_sub(next.created_at_ms));
        }
        let journaled = match durable {
            Durable::No => Ok(()),
            Durable::Required | Durable::Tried => {
                self.journal.put(Collection::Migrations, id, &next)
            }
        };
        if let Err(e) = journaled {
            if durable == Durable::Required {
                return Err(e.into());
            }
            tracing::error!(migration = id, error = %e, "cannot journal this step; going on");
            let reason = next.error.take().unwrap_or_default();
            next.error = Some(format!(
                "{reason} (not journaled: {e}; free space in the data directory: a restart rolls back the same way)"
            ));
        }
        self.migrations.insert(id.to_string(), next.clone());
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(next)
    }

    /// Journals and lists a new migration record.
    fn insert(&self, m: &Migration) -> Result<(), MigrationError> {
        let _w = self.writer();
        self.journal.put(Collection::Migrations, &m.id, m)?;
        self.migrations.insert(m.id.clone(), m.clone());
        Ok(())
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, ()> {
        locked(&self.writes)
    }

    /// Test seam: faults to inject at phase boundaries.
    pub fn set_faults(&self, faults: Faults) {
        self.faults.replace(faults);
    }

    /// Source: moves `id` on to `phase` (after the fault a test may inject on entering it).
    async fn enter_phase(&self, id: &str, phase: Phase) -> Result<Migration, MigrationError> {
        self.faults.enter(Role::Source, phase, &self.cancel).await?;
        self.check_abort(id)?;
        self.set_phase(id, phase)
    }

    /// Operator abort of a migration this site drives: safe at any phase. Before the
    /// destination is asked to run the workload, the migration rolls back (at its next
    /// step; long waits wake at once) and the source runs on; after, it is refused, as
    /// only the destination's word can end it then. Returns the record.
    pub fn operator_abort(&self, id: &str) -> Result<Migration, MigrationError> {
        let mut refused = None;
        let m = self.update(id, |m| match abort_refusal(m) {
            Some(why) => refused = Some(why),
            None => m.abort_requested = true,
        })?;
        if let Some(why) = refused {
            return Err(MigrationError::CannotAbort {
                id: id.to_string(),
                why,
            });
        }
        tracing::warn!(migration = id, phase = %m.phase, "abort requested by the operator");
        self.abort_token(id).cancel();
        Ok(m)
    }

    /// Starts timing a source's wait for `target`'s word about `what`.
    pub(super) fn stall_watch(&self, id: &str, target: &str, what: &str) -> StallWatch {
        StallWatch {
            id: id.to_string(),
            target: target.to_string(),
            what: what.to_string(),
            bound: self.stall_after,
            since: Mutex::new(std::time::Instant::now()),
            // A stall reported before (by an earlier wait, or before a restart) is this
            // watch's to clear.
            noted: self
                .get(id)
                .is_some_and(|m| m.stalled_since_ms.is_some())
                .into(),
        }
    }

    /// Fails with `Aborted` if an operator asked to abort `id`.
    fn check_abort(&self, id: &str) -> Result<(), MigrationError> {
        if self.get(id).is_some_and(|m| m.abort_requested) {
            return Err(MigrationError::Aborted);
        }
        Ok(())
    }

    /// Cancelled when an operator aborts `id`: long waits select on it.
    fn abort_token(&self, id: &str) -> CancellationToken {
        locked(&self.aborts)
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// Runs `step` unless (or until) an operator aborts `id`: the step is dropped then.
    async fn abortable<T>(
        &self,
        id: &str,
        step: impl std::future::Future<Output = Result<T, MigrationError>>,
    ) -> Result<T, MigrationError> {
        let token = self.abort_token(id);
        tokio::select! {
            r = step => r,
            () = token.cancelled() => Err(MigrationError::Aborted),
        }
    }

    fn set_phase(&self, id: &str, phase: Phase) -> Result<Migration, MigrationError> {
        tracing::info!(migration = %id, phase = %phase, "phase");
        self.update(id, |m| m.phase = phase)
    }

    /// Waits until the journal is loaded (peers are answered only after that).
    async fn wait_recovered(&self) {
        let mut rx = self.recovered.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Waits (bounded) for running migrations to reach a stopping point.
    pub async fn drain(&self, timeout: std::time::Duration) {
        self.tasks.close();
        if tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "migrations still running at shutdown; the journal resumes them on restart"
            );
        }
    }
}

/// Locks `m`; a holder that panicked left nothing half-done in these maps, so a poisoned
/// lock is taken over rather than propagated.
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn new_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // Fall back to time + pid; ids only need to be unique per site.
        let t = now_ms() ^ ((std::process::id() as u64) << 40);
        bytes = t.to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes a directory tree, logging rather than failing (cleanup is best effort).
fn remove_dir(path: &std::path::Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_hex() {
        let a = new_id();
        let b = new_id();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn an_abort_is_refused_once_the_destination_may_run_the_workload() {
        let spec: WorkloadSpec =
            serde_json::from_str(r#"{"name":"w","runtime":"process","command":["x"]}"#)
                .expect("spec");
        let mut m = Migration::new("m1", spec, Role::Source, "a", "b", Phase::Transferring);
        assert_eq!(abort_refusal(&m), None);
        m.restore_requested = true;
        m.phase = Phase::Restoring;
        assert!(abort_refusal(&m).is_some_and(|why| why.contains("only its word")));
        m.phase = Phase::Completed;
        m.restore_requested = false;
        assert!(abort_refusal(&m).is_some_and(|why| why.contains("already ended")));
        m.role = Role::Target;
        m.phase = Phase::Transferring;
        assert!(abort_refusal(&m).is_some_and(|why| why.contains("at its source")));
    }

    #[test]
    fn only_final_phases_are_terminal() {
        assert!(Phase::Completed.is_terminal());
        assert!(Phase::RolledBack.is_terminal());
        assert!(!Phase::Restoring.is_terminal());
        assert_eq!(
            serde_json::to_string(&Phase::RolledBack).expect("json"),
            "\"rolled_back\""
        );
    }
}
