//! Workloads: what runs on a site, their durable records, and the registry that starts,
//! lists, removes and hands them over to migrations.

pub mod process;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::process::Child;

use crate::config::SiteConfig;
use crate::journal::{Collection, Journal, JournalError};
use crate::names::{self, NameError};
use crate::plugins::{self, CallContext, PluginError, PluginHost};
use crate::proxy::{Ingress, ProxyError};

#[derive(Debug, Error)]
pub enum WorkloadError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("invalid workload: {0}")]
    Invalid(String),
    #[error("workload {0:?} already exists on this site")]
    Exists(String),
    #[error("workload {0:?} not found on this site")]
    NotFound(String),
    #[error("workload {name:?} is being migrated by {migration}; wait for it to finish")]
    Busy { name: String, migration: String },
    #[error("workload {name:?} is not running (state {state})")]
    NotRunning { name: String, state: WorkloadState },
    #[error("port {0} is already in use on this site")]
    PortInUse(u16),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the workload exited at once; see its log {log}")]
    ExitedEarly { log: PathBuf },
    #[error("workload did not answer on port {port} within {secs} s; see its log {log}")]
    NotHealthy { port: u16, secs: u64, log: PathBuf },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Adapter(#[from] PluginError),
    #[error(transparent)]
    Route(#[from] ProxyError),
}

/// What to run, as given to `POST /v1/workloads`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: String,
    /// Program and arguments; the program is looked up on a fixed PATH.
    pub command: Vec<String>,
    /// TCP port the workload serves; checked free before start and answering after start
    /// and after a restore.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Which adapter runs it: "process" (a bare process tree), "runc", …
    #[serde(default = "default_runtime")]
    pub runtime: String,
    /// Runtime-specific settings handed to the adapter.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// Ingress routes: where clients reach the workload at its site. They move with it.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
}

/// A listen address at the site whose traffic goes to the workload's `port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub listen: std::net::SocketAddr,
    #[serde(default)]
    pub mode: RouteMode,
    /// HTTP mode: once the workload has moved, answer 307 (with Alt-Svc) pointing at the
    /// new site instead of forwarding through the peer link.
    #[serde(default)]
    pub redirect: bool,
}

impl RouteSpec {
    /// The mode as `--route` spells it (the prefix `from_str` reads).
    pub fn mode_name(&self) -> &'static str {
        match (self.mode, self.redirect) {
            (RouteMode::Tcp, _) => "tcp",
            (RouteMode::Http, false) => "http",
            (RouteMode::Http, true) => "http-redirect",
        }
    }
}

impl std::str::FromStr for RouteSpec {
    type Err = String;
    /// `ADDR:PORT` (TCP), `tcp:ADDR:PORT`, `http:ADDR:PORT`, `http-redirect:ADDR:PORT`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mode, redirect, addr) = match s.split_once(':') {
            Some(("tcp", rest)) => (RouteMode::Tcp, false, rest),
            Some(("http", rest)) => (RouteMode::Http, false, rest),
            Some(("http-redirect", rest)) => (RouteMode::Http, true, rest),
            _ => (RouteMode::Tcp, false, s),
        };
        let listen = addr.parse().map_err(|_| {
            format!("route {s:?}: expected [tcp:|http:|http-redirect:]ADDRESS:PORT")
        })?;
        Ok(Self {
            listen,
            mode,
            redirect,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteMode {
    /// Bytes, connection by connection; held connections are re-bound after the move.
    #[default]
    Tcp,
    /// HTTP/1.1, request by request; held requests go to wherever the workload runs next.
    Http,
}

fn default_runtime() -> String {
    "process".to_string()
}

impl WorkloadSpec {
    pub fn validate(&self) -> Result<(), WorkloadError> {
        names::validate("workload", &self.name)?;
        let Some(program) = self.command.first() else {
            return Err(WorkloadError::Invalid("command must not be empty".into()));
        };
        if program.is_empty() || program.starts_with('-') {
            return Err(WorkloadError::Invalid(format!(
                "command must start with a program name, not {program:?}"
            )));
        }
        if self.command.len() > 256 || self.command.iter().any(|a| a.contains('\0')) {
            return Err(WorkloadError::Invalid(
                "command has more than 256 arguments or a NUL byte".into(),
            ));
        }
        names::validate("runtime", &self.runtime)?;
        if self.settings.len() > 64
            || self
                .settings
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 4096)
        {
            return Err(WorkloadError::Invalid(
                "settings: at most 64, keys 1-128 and values up to 4096 bytes".into(),
            ));
        }
        if !self.routes.is_empty() && self.port.is_none() {
            return Err(WorkloadError::Invalid(
                "routes need the workload's --port".into(),
            ));
        }
        if self
            .routes
            .iter()
            .any(|r| r.redirect && r.mode != RouteMode::Http)
        {
            return Err(WorkloadError::Invalid(
                "only HTTP routes can redirect".into(),
            ));
        }
        if self.routes.len() > 16 {
            return Err(WorkloadError::Invalid("at most 16 routes".into()));
        }
        if self.port == Some(0) {
            return Err(WorkloadError::Invalid("port must be 1-65535".into()));
        }
        for k in self.env.keys() {
            let ok = !k.is_empty()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !k.as_bytes()[0].is_ascii_digit();
            if !ok {
                return Err(WorkloadError::Invalid(format!(
                    "environment variable name {k:?} is not valid"
                )));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadState {
    Running,
    /// Held by a migration: frozen or about to be.
    Migrating,
    Exited,
}

impl std::fmt::Display for WorkloadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkloadState::Running => "running",
            WorkloadState::Migrating => "migrating",
            WorkloadState::Exited => "exited",
        })
    }
}

/// Where a workload came from when it was restored here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Origin {
    pub site: String,
    pub migration: String,
}

/// A workload's durable record, also what the API returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workload {
    #[serde(flatten)]
    pub spec: WorkloadSpec,
    pub site: String,
    pub state: WorkloadState,
    /// Host pid of the process tree's root.
    pub pid: Option<i32>,
    /// Start time of `pid` (clock ticks since boot), so a reused pid is never mistaken
    /// for the workload after a gateway restart.
    pub pid_start: Option<u64>,
    pub started_at_ms: u64,
    pub work_dir: PathBuf,
    pub log: PathBuf,
    pub cgroup: Option<PathBuf>,
    #[serde(default)]
    pub migration: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub restored_from: Option<Origin>,
}

/// Paths a workload gets on a site.
#[derive(Debug, Clone)]
pub struct Placement {
    pub work_dir: PathBuf,
    pub log: PathBuf,
    pub cgroup: Option<PathBuf>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The site's workloads. Cheap to share (`Arc`); every change is journaled first.
pub struct Workloads {
    site: String,
    journal: Arc<Journal>,
    map: DashMap<String, Workload>,
    logs_dir: PathBuf,
    work_root: PathBuf,
    cgroup_base: Option<PathBuf>,
    health_timeout: Duration,
    plugins: Arc<PluginHost>,
    ingress: Arc<Ingress>,
}

enum Waiter {
    Holder(Child),
    Pid,
}

impl Workloads {
    pub fn new(
        cfg: &SiteConfig,
        journal: Arc<Journal>,
        plugins: Arc<PluginHost>,
        ingress: Arc<Ingress>,
    ) -> Result<Arc<Self>, WorkloadError> {
        let logs_dir = cfg.data_dir.join("logs");
        mkdir(&logs_dir)?;
        mkdir(&cfg.workloads.work_root)?;
        let cgroup_base = match process::cgroup2_mount() {
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
        Ok(Arc::new(Self {
            site: cfg.name.clone(),
            journal,
            map: DashMap::new(),
            logs_dir,
            work_root: cfg.workloads.work_root.clone(),
            cgroup_base,
            health_timeout: Duration::from_secs(cfg.workloads.health_timeout_secs),
            plugins,
            ingress,
        }))
    }

    /// Loads the journaled workloads and re-adopts the ones still alive.
    pub fn recover(self: &Arc<Self>) -> Result<(), WorkloadError> {
        for mut w in self.journal.load_all::<Workload>(Collection::Workloads)? {
            let alive = matches!((w.pid, w.pid_start), (Some(p), Some(s)) if process::alive(p, s));
            if alive {
                tracing::info!(workload = %w.spec.name, pid = ?w.pid, state = %w.state, "re-adopted workload");
                if let Some(pid) = w.pid {
                    self.monitor(w.spec.name.clone(), pid, Waiter::Pid);
                }
                let (this, spec) = (Arc::clone(self), w.spec.clone());
                tokio::spawn(async move {
                    if let Err(e) = this.ingress.open(&spec).await {
                        tracing::error!(workload = %spec.name, error = %e, "cannot reopen the workload's routes");
                    }
                });
            } else if w.state != WorkloadState::Exited && w.state != WorkloadState::Migrating {
                tracing::warn!(workload = %w.spec.name, "workload exited while the gateway was down");
                w.state = WorkloadState::Exited;
                self.journal.put(Collection::Workloads, &w.spec.name, &w)?;
            }
            self.map.insert(w.spec.name.clone(), w);
        }
        Ok(())
    }

    pub fn list(&self) -> Vec<Workload> {
        let mut v: Vec<Workload> = self.map.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        v
    }

    pub fn get(&self, name: &str) -> Option<Workload> {
        self.map.get(name).map(|e| e.value().clone())
    }

    /// Work directory, log and cgroup for a workload named `name`, created if missing.
    pub fn place(&self, name: &str) -> Result<Placement, WorkloadError> {
        let work_dir = self.work_root.join(name);
        mkdir(&work_dir)?;
        let cgroup = match &self.cgroup_base {
            Some(base) => {
                let dir = base.join(name);
                mkdir(&dir)?;
                Some(dir)
            }
            None => None,
        };
        Ok(Placement {
            work_dir,
            log: self.logs_dir.join(format!("{name}.log")),
            cgroup,
        })
    }

    /// A record for `spec` placed at `placement`: running as `pid`, or without a pid a
    /// reservation (shown as migrating) that no one else may take.
    fn record(
        &self,
        spec: &WorkloadSpec,
        placement: &Placement,
        pid: Option<i32>,
        origin: Option<Origin>,
    ) -> Workload {
        Workload {
            spec: spec.clone(),
            site: self.site.clone(),
            state: if pid.is_some() {
                WorkloadState::Running
            } else {
                WorkloadState::Migrating
            },
            pid,
            pid_start: pid.and_then(process::start_time),
            started_at_ms: now_ms(),
            work_dir: placement.work_dir.clone(),
            log: placement.log.clone(),
            cgroup: placement.cgroup.clone(),
            migration: None,
            exit_code: None,
            restored_from: origin,
        }
    }

    /// Journals a running workload, lists it, and watches its process.
    fn register(
        self: &Arc<Self>,
        w: &Workload,
        pid: i32,
        waiter: Waiter,
    ) -> Result<(), WorkloadError> {
        self.journal.put(Collection::Workloads, &w.spec.name, w)?;
        self.map.insert(w.spec.name.clone(), w.clone());
        self.monitor(w.spec.name.clone(), pid, waiter);
        Ok(())
    }

    /// Reserves `spec.name` (it must be free) with a placeholder record, so two concurrent
    /// starts or restores of one name cannot both win.
    fn reserve(&self, spec: &WorkloadSpec, placement: &Placement) -> Result<(), WorkloadError> {
        match self.map.entry(spec.name.clone()) {
            Entry::Occupied(_) => Err(WorkloadError::Exists(spec.name.clone())),
            Entry::Vacant(v) => {
                v.insert(self.record(spec, placement, None, None));
                Ok(())
            }
        }
    }

    /// Can a workload like `spec` be placed here (name free, port free)?
    pub fn check_free(&self, spec: &WorkloadSpec) -> Result<(), WorkloadError> {
        spec.validate()?;
        if self.map.contains_key(&spec.name) {
            return Err(WorkloadError::Exists(spec.name.clone()));
        }
        if let Some(port) = spec.port {
            if !process::port_free(port) {
                return Err(WorkloadError::PortInUse(port));
            }
        }
        self.ingress.check_free(spec)?;
        Ok(())
    }

    /// Starts a new workload and waits until it answers on its port (when it has one).
    pub async fn run(self: &Arc<Self>, spec: WorkloadSpec) -> Result<Workload, WorkloadError> {
        self.check_free(&spec)?;
        let placement = self.place(&spec.name)?;
        self.reserve(&spec, &placement)?;
        match self.start_reserved(&spec, &placement).await {
            Ok(w) => Ok(w),
            Err(e) => {
                self.map.remove(&spec.name);
                let _ = self.journal.remove(Collection::Workloads, &spec.name);
                Err(e)
            }
        }
    }

    async fn start_reserved(
        self: &Arc<Self>,
        spec: &WorkloadSpec,
        placement: &Placement,
    ) -> Result<Workload, WorkloadError> {
        let adapter = self.plugins.adapter(&spec.runtime)?;
        let draft = self.record(spec, placement, None, None);
        let ctx = CallContext {
            spec: Some(spec.clone()),
            placement: Some(placement.clone()),
            ..CallContext::default()
        };
        let (pid, ctx) = adapter
            .start_fresh(self.view(&draft, None, None), ctx)
            .await;
        let pid = pid?;
        let waiter = match ctx.spawned {
            Some(started) => Waiter::Holder(started.holder),
            None => Waiter::Pid,
        };
        let w = self.record(spec, placement, Some(pid), None);
        self.register(&w, pid, waiter)?;
        if let Some(port) = spec.port {
            if !process::wait_port(port, self.health_timeout).await {
                self.stop(&w).await;
                return Err(WorkloadError::NotHealthy {
                    port,
                    secs: self.health_timeout.as_secs(),
                    log: placement.log.clone(),
                });
            }
        }
        if let Err(e) = self.ingress.open(spec).await {
            self.stop(&w).await;
            return Err(e.into());
        }
        tracing::info!(workload = %spec.name, pid, adapter = adapter.name(), "workload started");
        Ok(self.get(&spec.name).unwrap_or(w))
    }

    /// How an adapter sees workload `w` at this site.
    pub fn view(
        &self,
        w: &Workload,
        images: Option<&Path>,
        peer: Option<&str>,
    ) -> plugins::Workload {
        let pairs =
            |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        plugins::Workload {
            name: w.spec.name.clone(),
            runtime: w.spec.runtime.clone(),
            command: w.spec.command.clone(),
            port: w.spec.port,
            env: pairs(&w.spec.env),
            settings: pairs(&w.spec.settings),
            pid: w.pid,
            work_dir: w.work_dir.display().to_string(),
            log_path: w.log.display().to_string(),
            images_dir: images.map(|p| p.display().to_string()),
            site: self.site.clone(),
            peer: peer.map(str::to_string),
        }
    }

    /// What the host lets an adapter act on during a call about `w`.
    pub fn context(&self, w: &Workload) -> CallContext {
        CallContext {
            spec: Some(w.spec.clone()),
            pid: w.pid,
            pid_start: w.pid_start,
            placement: Some(Placement {
                work_dir: w.work_dir.clone(),
                log: w.log.clone(),
                cgroup: w.cgroup.clone(),
            }),
            ..CallContext::default()
        }
    }

    /// Has the adapter stop the workload; if it cannot, the gateway kills the tree itself
    /// (a removed or moved workload must not keep running).
    async fn stop(&self, w: &Workload) {
        // Asked even when the process is gone: a checkpointed container still has state
        // (a stopped container, a kept checkpoint) only the adapter knows how to remove.
        let outcome = match self.plugins.adapter(&w.spec.runtime) {
            Ok(a) => {
                a.release_source(self.view(w, None, None), self.context(w))
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            tracing::warn!(workload = %w.spec.name, error = %e, "adapter could not release the workload; killing its tree");
        }
        end_process(w);
    }

    /// Registers a tree restored on this site by a migration, once it is healthy.
    pub fn adopt(
        self: &Arc<Self>,
        spec: &WorkloadSpec,
        placement: &Placement,
        pid: i32,
        origin: Origin,
    ) -> Result<Workload, WorkloadError> {
        let w = self.record(spec, placement, Some(pid), Some(origin));
        self.register(&w, pid, Waiter::Pid)?;
        Ok(w)
    }

    /// Serves a workload's routes at this site (after a restore here).
    pub async fn open_routes(&self, spec: &WorkloadSpec) -> Result<(), WorkloadError> {
        Ok(self.ingress.open(spec).await?)
    }

    /// Reserves a name for an incoming restore (so nothing else takes it meanwhile).
    pub fn reserve_incoming(&self, spec: &WorkloadSpec) -> Result<Placement, WorkloadError> {
        self.check_free(spec)?;
        let placement = self.place(&spec.name)?;
        self.reserve(spec, &placement)?;
        Ok(placement)
    }

    /// Drops a reservation made by [`Self::reserve_incoming`] if nothing was adopted.
    pub fn release_incoming(&self, name: &str) {
        self.map.remove_if(name, |_, w| {
            w.pid.is_none() && w.state == WorkloadState::Migrating
        });
    }

    /// Hands a running workload to a migration.
    pub fn begin_migration(&self, name: &str, migration: &str) -> Result<Workload, WorkloadError> {
        let mut entry = self
            .map
            .get_mut(name)
            .ok_or_else(|| WorkloadError::NotFound(name.to_string()))?;
        let w = entry.value_mut();
        if let Some(m) = &w.migration {
            return Err(WorkloadError::Busy {
                name: name.to_string(),
                migration: m.clone(),
            });
        }
        if w.state != WorkloadState::Running || w.pid.is_none() {
            return Err(WorkloadError::NotRunning {
                name: name.to_string(),
                state: w.state,
            });
        }
        let mut next = w.clone();
        next.state = WorkloadState::Migrating;
        next.migration = Some(migration.to_string());
        self.journal.put(Collection::Workloads, name, &next)?;
        *w = next.clone();
        Ok(next)
    }

    /// Drops a migration's hold on a workload that was never frozen.
    pub fn unhold(&self, name: &str) {
        if let Some(mut entry) = self.map.get_mut(name) {
            let w = entry.value_mut();
            w.migration = None;
            w.state = WorkloadState::Running;
            if let Err(e) = self.journal.put(Collection::Workloads, name, &*w) {
                tracing::error!(workload = %name, error = %e, "cannot journal the released hold");
            }
        }
    }

    /// Rollback: the migration failed; the adapter resumes the (possibly frozen) source.
    /// If it cannot, the gateway resumes the tree itself: a rolled-back source must run.
    pub async fn resume_after_migration(self: &Arc<Self>, name: &str) -> Result<(), WorkloadError> {
        let w = self
            .get(name)
            .ok_or_else(|| WorkloadError::NotFound(name.to_string()))?;
        // The adapter is asked even if the old process is gone: resuming may start a new
        // one (a local restore of the checkpoint it kept).
        let outcome = match self.plugins.adapter(&w.spec.runtime) {
            Ok(a) => {
                a.resume_source(self.view(&w, None, None), self.context(&w))
                    .await
            }
            Err(e) => Err(e),
        };
        let mut pid = w.pid;
        let mut pid_start = w.pid_start;
        match outcome {
            Ok(Some(new_pid)) => {
                pid = Some(new_pid);
                pid_start = process::start_time(new_pid);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(workload = %name, error = %e, "adapter could not resume the source; resuming its tree")
            }
        }
        if let Some(p) = pid.filter(|p| process::state(*p) == Some('T')) {
            process::resume(p);
        }
        let alive = matches!((pid, pid_start), (Some(p), Some(s)) if process::alive(p, s));
        let Some(mut entry) = self.map.get_mut(name) else {
            return Err(WorkloadError::NotFound(name.to_string()));
        };
        let mut next = entry.value().clone();
        next.migration = None;
        next.pid = pid;
        next.pid_start = pid_start;
        next.state = if alive {
            WorkloadState::Running
        } else {
            WorkloadState::Exited
        };
        self.journal.put(Collection::Workloads, name, &next)?;
        *entry.value_mut() = next;
        drop(entry);
        if let (true, Some(p)) = (alive, pid) {
            if pid != w.pid {
                self.monitor(name.to_string(), p, Waiter::Pid);
            }
            tracing::info!(workload = %name, pid = p, "source resumed");
        }
        Ok(())
    }

    /// Success: the destination runs the workload; end the source for good.
    pub async fn release_after_migration(&self, name: &str) -> Result<(), WorkloadError> {
        let Some(w) = self.get(name) else {
            return Ok(());
        };
        self.journal.remove(Collection::Workloads, name)?;
        self.map.remove(name);
        self.stop(&w).await;
        tracing::info!(workload = %name, "source released");
        Ok(())
    }

    /// Stops and forgets a workload (refused while a migration holds it).
    pub async fn remove(&self, name: &str) -> Result<Workload, WorkloadError> {
        let w = self
            .get(name)
            .ok_or_else(|| WorkloadError::NotFound(name.to_string()))?;
        if let Some(m) = &w.migration {
            return Err(WorkloadError::Busy {
                name: name.to_string(),
                migration: m.clone(),
            });
        }
        if w.state == WorkloadState::Migrating {
            return Err(WorkloadError::Busy {
                name: name.to_string(),
                migration: "an incoming migration".into(),
            });
        }
        self.journal.remove(Collection::Workloads, name)?;
        self.map.remove(name);
        self.ingress.close(name);
        self.stop(&w).await;
        tracing::info!(workload = %name, "workload removed");
        Ok(w)
    }

    /// Watches a workload's root process; an unexpected exit is recorded.
    fn monitor(self: &Arc<Self>, name: String, pid: i32, waiter: Waiter) {
        let this = Arc::clone(self);
        let span = tracing::info_span!("workload", workload = %name, pid);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let code = match waiter {
                    Waiter::Holder(mut child) => child.wait().await.ok().and_then(|s| {
                        use std::os::unix::process::ExitStatusExt;
                        s.code().or(s.signal().map(|sig| 128 + sig))
                    }),
                    Waiter::Pid => process::wait_exit(pid).await,
                };
                let Some(mut entry) = this.map.get_mut(&name) else {
                    return;
                };
                let w = entry.value_mut();
                if w.pid != Some(pid) || w.migration.is_some() {
                    return;
                }
                tracing::warn!(exit_code = ?code, "workload exited");
                w.state = WorkloadState::Exited;
                w.exit_code = code;
                let snapshot = w.clone();
                drop(entry);
                if let Err(e) = this.journal.put(Collection::Workloads, &name, &snapshot) {
                    tracing::error!(error = %e, "cannot journal the workload's exit");
                }
            },
            span,
        ));
    }
}

fn mkdir(p: &Path) -> Result<(), WorkloadError> {
    std::fs::create_dir_all(p).map_err(|source| WorkloadError::Io {
        what: "create directory",
        path: p.to_path_buf(),
        source,
    })
}

/// Kills a workload's tree (if it is still the same process) and removes its cgroup.
fn end_process(w: &Workload) {
    if let (Some(pid), Some(start)) = (w.pid, w.pid_start) {
        if process::alive(pid, start) {
            process::kill(pid);
        }
    }
    if let Some(cg) = w.cgroup.clone() {
        remove_cgroup_later(cg);
    }
}

/// A cgroup can be removed only once its processes are gone; try for a few seconds.
fn remove_cgroup_later(dir: PathBuf) {
    tokio::spawn(async move {
        for _ in 0..50 {
            if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::debug!(path = %dir.display(), "cgroup still busy; left in place");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_modes_are_named_as_they_are_written() {
        for mode in ["tcp", "http", "http-redirect"] {
            let route: RouteSpec = format!("{mode}:0.0.0.0:80").parse().unwrap();
            assert_eq!(route.mode_name(), mode);
        }
        let bare: RouteSpec = "127.0.0.1:80".parse().unwrap();
        assert_eq!(bare.mode_name(), "tcp");
    }

    fn spec(name: &str, cmd: &[&str]) -> WorkloadSpec {
        WorkloadSpec {
            name: name.into(),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            port: None,
            env: BTreeMap::new(),
            runtime: "process".into(),
            settings: BTreeMap::new(),
            routes: Vec::new(),
        }
    }

    #[test]
    fn spec_validation_names_the_problem() {
        assert!(spec("redis", &["redis-server"]).validate().is_ok());
        assert!(matches!(
            spec("Bad", &["x"]).validate(),
            Err(WorkloadError::Name(_))
        ));
        let e = spec("a", &[]).validate().unwrap_err().to_string();
        assert!(e.contains("command must not be empty"), "{e}");
        let e = spec("a", &["--flag"]).validate().unwrap_err().to_string();
        assert!(e.contains("program name"), "{e}");
        let mut s = spec("a", &["x"]);
        s.env.insert("1BAD".into(), "v".into());
        assert!(s.validate().is_err());
        s.env.clear();
        s.port = Some(0);
        assert!(s.validate().is_err());
    }

    #[test]
    fn spec_json_rejects_unknown_fields() {
        let err = serde_json::from_str::<WorkloadSpec>(r#"{"name":"a","command":["x"],"prot":1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot"), "{err}");
    }
}
