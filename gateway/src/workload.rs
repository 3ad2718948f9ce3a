//! The workload registry: what runs on this site, journaled before every change. It
//! starts workloads through their adapter, watches their processes, stops and removes
//! them. Migrations hand workloads over through the primitives at the end
//! (`modify`, `reserve`, `insert_running`, `forget`); the hand-over rules themselves live
//! in `migration::handover`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use thiserror::Error;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::journal::{Collection, Journal, JournalError};
use crate::plugins::{AdapterCall, PluginError, PluginHost};
use crate::proxy::{Ingress, ProxyError};
use crate::spec::{now_ms, Origin, Placement, SpecError, Workload, WorkloadSpec, WorkloadState};
use crate::sys::process;

#[derive(Debug, Error)]
pub enum WorkloadError {
    #[error(transparent)]
    Spec(#[from] SpecError),
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
    #[error("workload {0:?} changed meanwhile (moved, replaced or removed); nothing was done")]
    Changed(String),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Spawn(#[from] process::SpawnError),
    #[error("workload is not healthy: {why}; see its log {log}")]
    NotHealthy { why: String, log: PathBuf },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Adapter(#[from] PluginError),
    #[error(transparent)]
    Route(#[from] ProxyError),
}

/// Where a site keeps its workloads.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub site: String,
    /// Each workload's stdout/stderr go to `logs_dir/NAME.log`.
    pub logs_dir: PathBuf,
    /// Parent of each workload's working directory (the same path on every site).
    pub work_root: PathBuf,
    /// cgroup v2 directory under which each workload gets its own group, if any.
    pub cgroup_base: Option<PathBuf>,
    /// How long a started workload has to answer on its port.
    pub health_timeout: Duration,
}

/// The site's workloads. Cheap to share (`Arc`); every change is journaled first.
pub struct Workloads {
    settings: RegistrySettings,
    journal: Arc<Journal>,
    map: DashMap<String, Workload>,
    /// Serializes changes, so a record is journaled without holding a map lock and two
    /// changes cannot interleave between the journal and the map.
    writes: Mutex<()>,
    plugins: Arc<PluginHost>,
    ingress: Arc<Ingress>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// Unasked ends of workloads' processes, for the restart supervisor.
    exits: tokio::sync::broadcast::Sender<Exit>,
}

/// A workload's process ended unasked (recorded as `exited`).
#[derive(Debug, Clone)]
pub struct Exit {
    pub name: String,
    pub pid: i32,
    /// Its exit code; 128 + N when signal N ended it.
    pub code: Option<i32>,
}

/// How the end of a workload's process is noticed.
pub enum Waiter {
    /// Our own child (the PID namespace holder): wait for it.
    Holder(Child),
    /// Any other process: a pidfd.
    Pid,
}

impl Workloads {
    pub fn new(
        settings: RegistrySettings,
        journal: Arc<Journal>,
        plugins: Arc<PluginHost>,
        ingress: Arc<Ingress>,
    ) -> Result<Arc<Self>, WorkloadError> {
        mkdir(&settings.logs_dir)?;
        mkdir(&settings.work_root)?;
        Ok(Arc::new(Self {
            settings,
            journal,
            map: DashMap::new(),
            writes: Mutex::new(()),
            plugins,
            ingress,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            exits: tokio::sync::broadcast::channel(64).0,
        }))
    }

    pub fn site(&self) -> &str {
        &self.settings.site
    }

    pub fn health_timeout(&self) -> Duration {
        self.settings.health_timeout
    }

    /// Loads the journaled workloads and re-adopts the ones still alive.
    pub fn recover(self: &Arc<Self>) -> Result<(), WorkloadError> {
        for mut w in self.journal.load_all::<Workload>(Collection::Workloads)? {
            let alive = matches!((w.pid, w.pid_start), (Some(p), Some(s)) if process::alive(p, s));
            if alive {
                tracing::info!(workload = %w.spec.name, pid = ?w.pid, state = %w.state, "re-adopted workload");
                if let Some(pid) = w.pid {
                    self.watch(w.spec.name.clone(), pid, Waiter::Pid);
                }
                let (this, spec) = (Arc::clone(self), w.spec.clone());
                self.tasks.spawn(async move {
                    if let Err(e) = this.ingress.open(&spec).await {
                        tracing::error!(workload = %spec.name, error = %e, "cannot reopen the workload's routes");
                    }
                });
            } else if !matches!(
                w.state,
                WorkloadState::Exited | WorkloadState::Migrating | WorkloadState::Standby
            ) {
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
        let work_dir = self.settings.work_root.join(name);
        mkdir(&work_dir)?;
        let cgroup = match &self.settings.cgroup_base {
            Some(base) => {
                let dir = base.join(name);
                mkdir(&dir)?;
                Some(dir)
            }
            None => None,
        };
        Ok(Placement {
            work_dir,
            log: self.settings.logs_dir.join(format!("{name}.log")),
            cgroup,
        })
    }

    /// Where a workload named `name` would live here (nothing is created).
    pub fn placement_of(&self, name: &str) -> Placement {
        Placement {
            work_dir: self.settings.work_root.join(name),
            log: self.settings.logs_dir.join(format!("{name}.log")),
            cgroup: self.settings.cgroup_base.as_ref().map(|b| b.join(name)),
        }
    }

    /// A record for `spec` placed at `placement`: running as `pid`, or without a pid a
    /// reservation (shown as migrating) that no one else may take.
    pub fn record(
        &self,
        spec: &WorkloadSpec,
        placement: &Placement,
        pid: Option<i32>,
        origin: Option<Origin>,
    ) -> Workload {
        Workload {
            spec: spec.clone(),
            site: self.settings.site.clone(),
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
            restarts: 0,
        }
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, ()> {
        // A panic while journaling leaves nothing half-written in the map: recover the lock.
        self.writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Journals a running workload, lists it (replacing a reservation), and watches its
    /// process.
    pub fn insert_running(
        self: &Arc<Self>,
        w: &Workload,
        waiter: Waiter,
    ) -> Result<(), WorkloadError> {
        {
            let _w = self.writer();
            self.journal.put(Collection::Workloads, &w.spec.name, w)?;
            self.map.insert(w.spec.name.clone(), w.clone());
        }
        if let Some(pid) = w.pid {
            self.watch(w.spec.name.clone(), pid, waiter);
        }
        Ok(())
    }

    /// Reserves `spec.name` (it must be free) with a placeholder record, so two concurrent
    /// starts or restores of one name cannot both win. Not journaled: a reservation does
    /// not outlive the gateway.
    pub fn reserve(&self, spec: &WorkloadSpec, placement: &Placement) -> Result<(), WorkloadError> {
        let _w = self.writer();
        match self.map.entry(spec.name.clone()) {
            Entry::Occupied(_) => Err(WorkloadError::Exists(spec.name.clone())),
            Entry::Vacant(v) => {
                v.insert(self.record(spec, placement, None, None));
                Ok(())
            }
        }
    }

    /// Drops a reservation made by [`Self::reserve`] if nothing replaced it.
    pub fn unreserve(&self, name: &str) {
        let _w = self.writer();
        self.map.remove_if(name, |_, w| {
            w.pid.is_none() && w.state == WorkloadState::Migrating
        });
    }

    /// Applies `f` to a workload's record and journals the result before anyone sees it.
    /// `f` may refuse the change.
    pub fn modify(
        &self,
        name: &str,
        f: impl FnOnce(&mut Workload) -> Result<(), WorkloadError>,
    ) -> Result<Workload, WorkloadError> {
        self.modify_with(name, f, true)
    }

    /// As [`Self::modify`], but a change the journal cannot take (a full disk) still
    /// holds in memory: for what has happened anyway (a source resumed). The journal's
    /// older record is reconciled the same way after a restart.
    pub fn modify_even_unjournaled(
        &self,
        name: &str,
        f: impl FnOnce(&mut Workload) -> Result<(), WorkloadError>,
    ) -> Result<Workload, WorkloadError> {
        self.modify_with(name, f, false)
    }

    fn modify_with(
        &self,
        name: &str,
        f: impl FnOnce(&mut Workload) -> Result<(), WorkloadError>,
        journaled: bool,
    ) -> Result<Workload, WorkloadError> {
        let _w = self.writer();
        let mut next = self
            .get(name)
            .ok_or_else(|| WorkloadError::NotFound(name.to_string()))?;
        f(&mut next)?;
        if let Err(e) = self.journal.put(Collection::Workloads, name, &next) {
            if journaled {
                return Err(e.into());
            }
            tracing::error!(workload = name, error = %e, "cannot journal the workload's state; going on");
        }
        self.map.insert(name.to_string(), next.clone());
        Ok(next)
    }

    /// Holds running workload `name` for `by` (a migration's id, a checkpoint): no other
    /// migration, checkpoint or removal takes it until the hold is lifted. A migration's
    /// hold also shows it as `migrating`.
    pub fn hold(&self, name: &str, by: &str, migrating: bool) -> Result<Workload, WorkloadError> {
        self.modify(name, |w| {
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
            if migrating {
                w.state = WorkloadState::Migrating;
            }
            w.migration = Some(by.to_string());
            Ok(())
        })
    }

    /// Records that workload `name` stands by: nothing runs (its process ended or was
    /// stopped), its image is kept for a restore, and no hold remains. Kept in memory even
    /// if the journal cannot take it: the process is gone either way.
    pub fn standby(&self, name: &str) -> Result<Workload, WorkloadError> {
        self.modify_even_unjournaled(name, |w| {
            w.migration = None;
            w.state = WorkloadState::Standby;
            w.pid = None;
            w.pid_start = None;
            Ok(())
        })
    }

    /// Forgets a workload's record (journal first).
    pub fn forget(&self, name: &str) -> Result<(), WorkloadError> {
        let _w = self.writer();
        self.journal.remove(Collection::Workloads, name)?;
        self.map.remove(name);
        Ok(())
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
                if let Err(j) = self.forget(&spec.name) {
                    tracing::error!(workload = %spec.name, error = %j, "cannot forget a workload that failed to start");
                }
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
        let started = adapter
            .start_fresh(AdapterCall::new(
                spec.clone(),
                placement.clone(),
                &self.settings.site,
            ))
            .await?;
        let pid = started.pid;
        let waiter = match started.holder {
            Some(holder) => Waiter::Holder(holder),
            None => Waiter::Pid,
        };
        let w = self.record(spec, placement, Some(pid), None);
        self.insert_running(&w, waiter)?;
        if let Err(why) = crate::health::wait(spec, pid, self.settings.health_timeout).await {
            self.stop(&w).await;
            return Err(WorkloadError::NotHealthy {
                why,
                log: placement.log.clone(),
            });
        }
        if let Err(e) = self.ingress.open(spec).await {
            self.stop(&w).await;
            return Err(e.into());
        }
        tracing::info!(workload = %spec.name, pid, adapter = adapter.name(), "workload started");
        Ok(self.get(&spec.name).unwrap_or(w))
    }

    /// Has the adapter stop the workload; if it cannot, the gateway kills the tree itself
    /// (a removed or moved workload must not keep running).
    pub async fn stop(&self, w: &Workload) {
        // Asked even when the process is gone: a checkpointed container still has state
        // (a stopped container, a kept checkpoint) only the adapter knows how to remove.
        let outcome = match self.plugins.adapter(&w.spec.runtime) {
            Ok(a) => a.release_source(AdapterCall::for_workload(w)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            tracing::warn!(workload = %w.spec.name, error = %e, "adapter could not release the workload; killing its tree");
        }
        if let (Some(pid), Some(start)) = (w.pid, w.pid_start) {
            if process::alive(pid, start) {
                process::kill(pid);
            }
        }
        if let Some(cg) = w.cgroup.clone() {
            self.remove_cgroup_later(cg);
        }
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
        self.forget(name)?;
        self.ingress.close(name);
        self.stop(&w).await;
        tracing::info!(workload = %name, "workload removed");
        Ok(w)
    }

    /// Unasked ends of workloads' processes from now on.
    pub fn exits(&self) -> tokio::sync::broadcast::Receiver<Exit> {
        self.exits.subscribe()
    }

    /// Watches a workload's root process; an unexpected exit is recorded.
    pub fn watch(self: &Arc<Self>, name: String, pid: i32, waiter: Waiter) {
        let this = Arc::clone(self);
        let log = self.placement_of(&name).log;
        let cancel = self.cancel.clone();
        let span = tracing::info_span!("workload", workload = %name, pid);
        self.tasks.spawn(tracing::Instrument::instrument(
            async move {
                let exited = async {
                    match waiter {
                        Waiter::Holder(mut child) => {
                            let code = child.wait().await.ok().and_then(|s| {
                                use std::os::unix::process::ExitStatusExt;
                                s.code().or(s.signal().map(|sig| 128 + sig))
                            });
                            holder_code(code, &log)
                        }
                        Waiter::Pid => process::wait_exit(pid).await,
                    }
                };
                // At shutdown the workload keeps running; the next gateway re-adopts it.
                let code = tokio::select! {
                    code = exited => code,
                    _ = cancel.cancelled() => return,
                };
                let recorded = this.modify(&name, |w| {
                    if w.pid != Some(pid) || w.migration.is_some() {
                        return Err(WorkloadError::Changed(name.clone()));
                    }
                    w.state = WorkloadState::Exited;
                    w.exit_code = code;
                    Ok(())
                });
                match recorded {
                    Ok(_) => {
                        tracing::warn!(exit_code = ?code, "workload exited");
                        let _ = this.exits.send(Exit { name, pid, code });
                    }
                    // Moved on (migrated, removed, replaced): not this process's record.
                    Err(WorkloadError::NotFound(_) | WorkloadError::Changed(_)) => {}
                    Err(e) => tracing::error!(error = %e, "cannot journal the workload's exit"),
                }
            },
            span,
        ));
    }

    /// A cgroup can be removed only once its processes are gone; try for a few seconds.
    fn remove_cgroup_later(&self, dir: PathBuf) {
        self.tasks.spawn(async move {
            for _ in 0..50 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tracing::debug!(path = %dir.display(), "cgroup still busy; left in place");
        });
    }

    /// Stops watching (at shutdown; workloads keep running) and waits briefly for the
    /// registry's other tasks.
    pub async fn drain(&self, timeout: Duration) {
        self.cancel.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(timeout, self.tasks.wait()).await;
    }

    /// The ingress serving this site's workloads.
    pub fn ingress(&self) -> &Arc<Ingress> {
        &self.ingress
    }
}

fn mkdir(p: &Path) -> Result<(), WorkloadError> {
    std::fs::create_dir_all(p).map_err(|source| WorkloadError::Io {
        what: "create directory",
        path: p.to_path_buf(),
        source,
    })
}
/// Whether `list` (`[api] allowed_commands`; `None`: any program) allows `spec`'s program:
/// a listed name allows that program as PATH finds it, and the same program named by its
/// path. The refusal says what was asked and what is allowed.
/// The exit code of a workload as its holder (`unshare -p -f`) reports it. A signal that
/// ends the namespace's init is passed on by the holder killing itself with it, except
/// SIGKILL, which it cannot re-raise: util-linux then exits 1 after writing "sigprocmask
/// unblock failed" to its stderr (the workload's log). That case is read as SIGKILL.
fn holder_code(code: Option<i32>, log: &Path) -> Option<i32> {
    if code != Some(1) {
        return code;
    }
    let tail = std::fs::File::open(log).ok().and_then(|mut f| {
        use std::io::{Read, Seek, SeekFrom};
        let len = f.metadata().ok()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(512))).ok()?;
        let mut text = String::new();
        f.read_to_string(&mut text).ok()?;
        Some(text)
    });
    let killed = tail.is_some_and(|t| {
        t.lines()
            .last()
            .is_some_and(|l| l.contains("unshare: sigprocmask unblock failed"))
    });
    if killed {
        Some(128 + 9)
    } else {
        code
    }
}

pub fn program_allowed(spec: &WorkloadSpec, list: Option<&[String]>) -> Result<(), String> {
    let Some(list) = list else {
        return Ok(());
    };
    let mut programs = vec![spec.command.first().map(String::as_str).unwrap_or_default()];
    if let Some(crate::spec::HealthCheck::Exec { command }) = &spec.health {
        // The gateway runs a health command too.
        programs.push(command.first().map(String::as_str).unwrap_or_default());
    }
    for program in programs {
        let found = process::resolve(program);
        if !list
            .iter()
            .any(|a| a == program || process::resolve(a) == found)
        {
            return Err(format!(
                "this site does not start {program:?} through its API (allowed: {list:?})"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod allow_tests {
    use super::*;

    fn spec(program: &str) -> WorkloadSpec {
        WorkloadSpec {
            name: "w".into(),
            command: vec![program.into(), "1".into()],
            port: None,
            env: std::collections::BTreeMap::new(),
            runtime: "process".into(),
            settings: std::collections::BTreeMap::new(),
            routes: Vec::new(),
            health: None,
            checkpoints: None,
            restart: None,
            volumes: Vec::new(),
        }
    }

    #[test]
    fn only_listed_programs_start_by_name_or_by_path() {
        assert!(program_allowed(&spec("sleep"), None).is_ok());
        let list = vec!["sleep".to_string()];
        assert!(program_allowed(&spec("sleep"), Some(&list)).is_ok());
        let path = process::resolve("sleep").display().to_string();
        assert!(path.starts_with('/'), "{path}");
        assert!(program_allowed(&spec(&path), Some(&list)).is_ok());
        let e = program_allowed(&spec("sh"), Some(&list)).unwrap_err();
        assert!(e.contains("\"sh\"") && e.contains("sleep"), "{e}");
        assert!(program_allowed(&spec("sleep"), Some(&[])).is_err());
        // The gateway runs an exec health check's program too: it must be listed.
        let mut checked = spec("sleep");
        checked.health = Some(crate::spec::HealthCheck::Exec {
            command: vec!["sh".into(), "-c".into(), "true".into()],
        });
        let e = program_allowed(&checked, Some(&list)).unwrap_err();
        assert!(e.contains("\"sh\""), "{e}");
        let both = vec!["sleep".to_string(), "sh".to_string()];
        assert!(program_allowed(&checked, Some(&both)).is_ok());
    }
}
