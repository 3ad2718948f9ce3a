//! One call into an adapter, as a single value: the workload it is about as this site
//! sees it, and what the host may act on while the call runs (that process, that
//! placement, that image directory). The WIT `workload` record the guest receives is
//! derived from it in exactly one place ([`AdapterCall::view`]).

use std::path::PathBuf;

use crate::spec::{Hook, Placement, Workload, WorkloadSpec};
use crate::sys::process;

use super::bindings::{self, AdapterInfo, Plan, SyncState};

#[derive(Debug, Clone)]
pub struct AdapterCall {
    pub spec: WorkloadSpec,
    /// This site's name.
    pub site: String,
    /// During a migration, the other site.
    pub peer: Option<String>,
    /// During a migration, its id (what a tunnel is scoped to).
    pub migration: Option<String>,
    /// The workload's root process here, if it runs here.
    pub pid: Option<i32>,
    /// Start time of `pid`: the host signals only that exact process, never a reused pid.
    pub pid_start: Option<u64>,
    pub placement: Placement,
    /// The migration's image directory at this site (checkpoint and restore).
    pub images: Option<PathBuf>,
    /// The workload's log path at the source (a restore re-points it to `placement.log`).
    pub source_log: Option<PathBuf>,
    /// Post-copy checkpoint: dump everything but the lazy pages, serve those from the
    /// frozen source.
    pub postcopy: bool,
    /// Post-copy restore: fetch missing pages from this page server.
    pub page_server: Option<std::net::SocketAddr>,
}

impl AdapterCall {
    /// A call about a workload that does not run yet (a start, a test).
    pub fn new(spec: WorkloadSpec, placement: Placement, site: &str) -> Self {
        Self {
            spec,
            site: site.to_string(),
            peer: None,
            migration: None,
            pid: None,
            pid_start: None,
            placement,
            images: None,
            source_log: None,
            postcopy: false,
            page_server: None,
        }
    }

    /// A call about workload `w` as this site records it.
    pub fn for_workload(w: &Workload) -> Self {
        Self {
            spec: w.spec.clone(),
            site: w.site.clone(),
            peer: None,
            migration: None,
            pid: w.pid,
            pid_start: w.pid_start,
            placement: w.placement(),
            images: None,
            source_log: None,
            postcopy: false,
            page_server: None,
        }
    }

    pub fn with_peer(mut self, peer: &str) -> Self {
        self.peer = Some(peer.to_string());
        self
    }

    pub fn with_migration(mut self, id: &str) -> Self {
        self.migration = Some(id.to_string());
        self
    }

    pub fn with_images(mut self, dir: PathBuf) -> Self {
        self.images = Some(dir);
        self
    }

    pub fn with_source_log(mut self, log: PathBuf) -> Self {
        self.source_log = Some(log);
        self
    }

    /// The call is about process `pid` (identified with its start time from now on).
    pub fn with_pid(mut self, pid: i32) -> Self {
        self.pid = Some(pid);
        self.pid_start = process::start_time(pid);
        self
    }

    /// The workload's pid if that very process is still alive.
    pub fn live_pid(&self) -> Option<i32> {
        match (self.pid, self.pid_start) {
            (Some(p), Some(s)) if process::alive(p, s) => Some(p),
            _ => None,
        }
    }

    /// The WIT record the guest receives, in the current version's types; the records of
    /// all versions are the same, and an older version converts it at its edge
    /// (`bindings/v0_1.rs`).
    pub(super) fn view(&self) -> bindings::Workload {
        let pairs = |m: &std::collections::BTreeMap<String, String>| {
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        bindings::Workload {
            name: self.spec.name.clone(),
            runtime: self.spec.runtime.clone(),
            command: self.spec.command.clone(),
            port: self.spec.port,
            env: pairs(&self.spec.env),
            settings: pairs(&self.spec.settings),
            pid: self.pid,
            work_dir: self.placement.work_dir.display().to_string(),
            log_path: self.placement.log.display().to_string(),
            images_dir: self.images.as_ref().map(|p| p.display().to_string()),
            site: self.site.clone(),
            peer: self.peer.clone(),
        }
    }
}

/// A process an adapter's `start-fresh` started.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    /// The holder of the gateway's own process tree (`process.spawn`), to reap and watch;
    /// none when the runtime started it (runc, podman).
    pub holder: Option<tokio::process::Child>,
}

/// A call into an adapter.
pub enum Call {
    Describe,
    Probe(AdapterCall),
    Prepare(AdapterCall),
    StartFresh(AdapterCall),
    Checkpoint(AdapterCall),
    Restore(AdapterCall, Vec<(String, String)>),
    ResumeSource(AdapterCall),
    ReleaseSource(AdapterCall),
    /// Service adapters (the `service` interface).
    StartSync(AdapterCall),
    SyncProgress(AdapterCall),
    /// At the source: stop taking changes; answers a mark for the destination.
    Fence(AdapterCall),
    Unfence(AdapterCall),
    /// At the destination: catch up to the source's mark, then become the primary.
    CutOver(AdapterCall, String),
    AbortSync(AdapterCall),
    /// The adapter's own hook (`ferry:hooks`), with the checkpoint's or migration's id; an
    /// adapter that exports none answers `Unit`.
    Hook(AdapterCall, Hook, String),
}

impl Call {
    pub fn name(&self) -> &'static str {
        match self {
            Call::Describe => "describe",
            Call::Probe(_) => "probe",
            Call::Prepare(_) => "prepare",
            Call::StartFresh(_) => "start-fresh",
            Call::Checkpoint(_) => "checkpoint",
            Call::Restore(..) => "restore",
            Call::ResumeSource(_) => "resume-source",
            Call::ReleaseSource(_) => "release-source",
            Call::StartSync(_) => "start-sync",
            Call::SyncProgress(_) => "sync-progress",
            Call::Fence(_) => "fence",
            Call::Unfence(_) => "unfence",
            Call::CutOver(..) => "cut-over",
            Call::AbortSync(_) => "abort-sync",
            Call::Hook(_, Hook::PostCheckpoint, _) => "post-checkpoint",
            Call::Hook(_, Hook::PreRestore, _) => "pre-restore",
        }
    }
}

/// What an adapter answered.
#[derive(Debug)]
pub enum Reply {
    Info(AdapterInfo),
    Plan(Plan),
    Unit,
    Pid(i32),
    Started(Spawned),
    MaybePid(Option<i32>),
    Notes(Vec<(String, String)>),
    Progress(SyncState),
    /// A service's fence mark.
    Mark(String),
}
