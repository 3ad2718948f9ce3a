//! Checkpoints outside migrations: a workload's state taken on demand through its adapter
//! (the same checkpoint a migration takes), kept in the site's content-addressed block
//! store ([`store`]) so checkpoints of one workload share what did not change, and
//! restored at the same site. Each workload keeps its newest `keep` checkpoints.
//!
//! While a checkpoint or a restore runs, the workload is held the way a migration holds
//! it (its record names the hold), so neither a migration nor a removal can interleave;
//! a gateway that stops mid-checkpoint finds the hold at restart and resumes the
//! workload (`migration::recovery`). A checkpoint that does not leave the workload
//! running puts it in `standby`: its image kept, nothing running, clients' connections
//! refused until `ferry restore` brings it back.

pub mod replicate;
pub mod store;
pub mod volume;
pub mod warm;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::journal::{Collection, Journal, JournalError};
use crate::plugins::{AdapterCall, PluginError, PluginHost};
use crate::proxy::{Ingress, Target};
use crate::spec::{now_ms, Workload, WorkloadSpec, WorkloadState};
use crate::workload::{Waiter, WorkloadError, Workloads};
use store::{BlockStore, StoreError, StoredFile};

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("workload {name:?} has no checkpoint {id:?}; `ferry checkpoint ls {name}` lists them")]
    NoSuchCheckpoint { name: String, id: String },
    #[error("workload {0:?} is running; stop it first, or restore with --replace to stop it and restore in its place")]
    Running(String),
    #[error("the checkpoint of {name:?} failed (the workload runs on): {source}")]
    Checkpoint {
        name: String,
        #[source]
        source: PluginError,
    },
    #[error("the restore of {name:?} from {id} failed (nothing runs in its place): {message}")]
    Restore {
        name: String,
        id: String,
        message: String,
    },
    #[error("site {0} answers on the peer link: it is not lost; move the workload with `ferry migrate` there, or recover with --force")]
    SiteAnswers(String),
    #[error("replication: {0}")]
    Replication(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A checkpoint as journaled: what was taken, from which workload, and its files' blocks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub id: String,
    pub workload: String,
    pub spec: WorkloadSpec,
    pub created_at_ms: u64,
    /// Whether the workload ran on after it (else it went to standby).
    pub left_running: bool,
    /// The adapter's notes from its checkpoint, handed back to its restore.
    pub notes: Vec<(String, String)>,
    /// The workload's log when it was taken (its restored stdio is re-pointed from it).
    pub log: PathBuf,
    /// How long the workload was frozen (clients held).
    pub freeze_ms: u64,
    /// Cutting the image into blocks and storing the new ones (after the freeze).
    pub store_ms: u64,
    /// The image's bytes, and those the store did not hold yet.
    pub bytes: u64,
    pub new_bytes: u64,
    pub files: Vec<StoredFile>,
    /// A replica: the peer site it came from (none: taken here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_site: Option<String>,
    /// How its replication to a peer went (taken here with `replicate_to`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicated: Option<replicate::Replication>,
}

/// What the API lists of a checkpoint (its block lists left out).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckpointInfo {
    pub id: String,
    pub workload: String,
    pub created_at_ms: u64,
    pub left_running: bool,
    pub freeze_ms: u64,
    pub store_ms: u64,
    pub bytes: u64,
    pub new_bytes: u64,
    pub files: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicated: Option<replicate::Replication>,
}

impl From<&Checkpoint> for CheckpointInfo {
    fn from(c: &Checkpoint) -> Self {
        Self {
            id: c.id.clone(),
            workload: c.workload.clone(),
            created_at_ms: c.created_at_ms,
            left_running: c.left_running,
            freeze_ms: c.freeze_ms,
            store_ms: c.store_ms,
            bytes: c.bytes,
            new_bytes: c.new_bytes,
            files: c.files.len(),
            from_site: c.from_site.clone(),
            replicated: c.replicated.clone(),
        }
    }
}

pub struct Parts {
    pub journal: Arc<Journal>,
    pub peers: Arc<crate::peer::PeerLink>,
    pub workloads: Arc<Workloads>,
    pub plugins: Arc<PluginHost>,
    pub ingress: Arc<Ingress>,
}

pub struct Checkpoints {
    site: String,
    store: Arc<BlockStore>,
    /// Where an image is written before it is stored, and materialized before a restore.
    work_dir: PathBuf,
    keep: usize,
    hooks: crate::hooks::Hooks,
    /// Every checkpoint record of the site (the journal's, loaded once at start and kept
    /// in step by `keep_record` / `drop_record`), by journal key.
    records: std::sync::Mutex<std::collections::BTreeMap<String, Checkpoint>>,
    /// Volume manifests that arrived for incoming migrations, until their restore.
    staged: std::sync::Mutex<std::collections::HashMap<String, volume::Incoming>>,
    /// Each workload's newest volume manifest: its blocks survive collection, so the next
    /// move sends only what changed.
    pins: std::sync::Mutex<std::collections::HashMap<String, Vec<StoredFile>>>,
    /// Received migration images kept for the next move here ([`warm`]).
    warm: std::sync::Mutex<warm::Warm>,
    parts: Parts,
}

impl Checkpoints {
    /// Opens the site's checkpoints under `data_dir/checkpoints`; each workload keeps its
    /// newest `keep`.
    pub fn open(
        site: &str,
        data_dir: &std::path::Path,
        keep: usize,
        hooks: crate::hooks::Hooks,
        parts: Parts,
    ) -> Result<Arc<Self>, CheckpointError> {
        let root = data_dir.join("checkpoints");
        let store = Arc::new(BlockStore::open(&root.join("store"))?);
        let work_dir = root.join("work");
        // Images half written or materialized by a gateway that stopped: not needed.
        let _ = std::fs::remove_dir_all(&work_dir);
        std::fs::create_dir_all(&work_dir).map_err(|source| CheckpointError::Io {
            what: "create",
            path: work_dir.clone(),
            source,
        })?;
        let records = parts
            .journal
            .load_all::<Checkpoint>(Collection::Checkpoints)?
            .into_iter()
            .map(|c| (key(&c.workload, &c.id), c))
            .collect();
        Ok(Arc::new(Self {
            site: site.to_string(),
            store,
            work_dir,
            keep: keep.max(1),
            hooks,
            records: std::sync::Mutex::new(records),
            staged: std::sync::Mutex::default(),
            pins: std::sync::Mutex::default(),
            warm: std::sync::Mutex::default(),
            parts,
        }))
    }

    /// Takes the checkpoints workloads' policies ask for (`every_secs`, left running, the
    /// first one period after the gateway first sees the workload), one at a time, until
    /// `cancel`.
    pub fn schedule(self: &Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut last: std::collections::HashMap<String, Instant> =
                std::collections::HashMap::new();
            // At once after a start: a site back from a loss checks before anything else.
            let mut fenced = Instant::now()
                .checked_sub(FENCE_EVERY)
                .unwrap_or_else(Instant::now);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
                if fenced.elapsed() >= FENCE_EVERY {
                    this.fence().await;
                    fenced = Instant::now();
                }
                for w in this.parts.workloads.list() {
                    let every = w.spec.checkpoints.as_ref().and_then(|p| p.every_secs);
                    let Some(every) = every.map(std::time::Duration::from_secs) else {
                        continue;
                    };
                    let name = w.spec.name.clone();
                    let seen = *last.entry(name.clone()).or_insert_with(Instant::now);
                    let idle = w.state != WorkloadState::Running || w.migration.is_some();
                    if idle || seen.elapsed() < every {
                        continue;
                    }
                    last.insert(name.clone(), Instant::now());
                    if let Err(e) = this.take(&name, true).await {
                        tracing::warn!(workload = %name, error = %e, "periodic checkpoint failed; tried again next period");
                    }
                }
            }
        });
    }

    /// Every checkpoint of `workload`, oldest first.
    pub fn list(&self, workload: &str) -> Result<Vec<Checkpoint>, CheckpointError> {
        let mut all: Vec<Checkpoint> = self
            .locked()
            .values()
            .filter(|c| c.workload == workload)
            .cloned()
            .collect();
        all.sort_by(|a, b| a.created_at_ms.cmp(&b.created_at_ms).then(a.id.cmp(&b.id)));
        Ok(all)
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Checkpoint>> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Journals checkpoint record `c` (replacing one of the same id), then lists it.
    fn keep_record(&self, c: &Checkpoint) -> Result<(), CheckpointError> {
        let k = key(&c.workload, &c.id);
        self.parts.journal.put(Collection::Checkpoints, &k, c)?;
        self.locked().insert(k, c.clone());
        Ok(())
    }

    /// Removes a checkpoint record from the journal, then from the list.
    fn drop_record(&self, workload: &str, id: &str) -> Result<(), CheckpointError> {
        let k = key(workload, id);
        self.parts.journal.remove(Collection::Checkpoints, &k)?;
        self.locked().remove(&k);
        Ok(())
    }

    /// Takes a checkpoint of running workload `name`. The workload is frozen (its clients
    /// held) while the adapter checkpoints it; then it runs on (`leave_running`) or is
    /// stopped into standby. A failed checkpoint resumes it.
    pub async fn take(
        &self,
        name: &str,
        leave_running: bool,
    ) -> Result<Checkpoint, CheckpointError> {
        let id = format!("{:x}", now_ms() * 1000 + u64::from(rand_u16()));
        // Held as a migration holds it: it must run and not be held already.
        let w = self
            .parts
            .workloads
            .hold(name, &format!("checkpoint {id}"), false)?;
        let images = self.work_dir.join(&id);
        let outcome = self.checkpoint_held(&w, &id, &images, leave_running).await;
        let _ = std::fs::remove_dir_all(&images);
        match outcome {
            Ok(mut c) => {
                tracing::info!(workload = name, checkpoint = %c.id, freeze_ms = c.freeze_ms, store_ms = c.store_ms, bytes = c.bytes, new_bytes = c.new_bytes, left_running = leave_running, "checkpoint taken");
                let to = c
                    .spec
                    .checkpoints
                    .as_ref()
                    .and_then(|p| p.replicate_to.clone())
                    .filter(|to| *to != self.site);
                if let Some(to) = to {
                    let r = self.replicate(&c, &to).await;
                    tracing::info!(workload = name, checkpoint = %c.id, to = %r.to, blocks = r.blocks, bytes = r.bytes, wire_bytes = r.wire_bytes, ms = r.ms, error = ?r.error, "checkpoint replicated");
                    c.replicated = Some(r);
                    if let Err(e) = self.keep_record(&c) {
                        tracing::warn!(workload = name, error = %e, "cannot journal the replication");
                    }
                }
                if let Err(e) = self.retain(name) {
                    tracing::warn!(workload = name, error = %e, "cannot drop old checkpoints");
                }
                let adapter = self.parts.plugins.adapter(&w.spec.runtime).ok();
                let call = AdapterCall::for_workload(&w);
                let about = crate::hooks::About {
                    workload: name,
                    site: &self.site,
                    id: &c.id,
                    adapter: adapter.as_ref().map(|a| (a, &call)),
                };
                if let Err(e) = self
                    .hooks
                    .run(crate::hooks::Hook::PostCheckpoint, &about)
                    .await
                {
                    tracing::warn!(workload = name, error = %e, "post-checkpoint hook failed; the checkpoint stands");
                }
                Ok(c)
            }
            Err(e) => {
                tracing::warn!(workload = name, checkpoint = %id, error = %e, "checkpoint failed");
                Err(e)
            }
        }
    }

    async fn checkpoint_held(
        &self,
        w: &Workload,
        id: &str,
        images: &std::path::Path,
        leave_running: bool,
    ) -> Result<Checkpoint, CheckpointError> {
        let name = w.spec.name.as_str();
        let adapter = self
            .parts
            .plugins
            .adapter(&w.spec.runtime)
            .map_err(|source| {
                self.unhold(name, None);
                CheckpointError::Checkpoint {
                    name: name.to_string(),
                    source,
                }
            })?;
        std::fs::create_dir_all(images).map_err(|source| {
            self.unhold(name, None);
            CheckpointError::Io {
                what: "create",
                path: images.to_path_buf(),
                source,
            }
        })?;
        let call = AdapterCall::for_workload(w).with_images(images.to_path_buf());
        let frozen = Instant::now();
        self.parts.ingress.hold(name).await;
        let notes = match adapter.checkpoint(call.clone()).await {
            Ok(notes) => notes,
            Err(source) => {
                self.resume(&adapter, call, name).await;
                return Err(CheckpointError::Checkpoint {
                    name: name.to_string(),
                    source,
                });
            }
        };
        let freeze_ms;
        if leave_running {
            self.resume(&adapter, call.clone(), name).await;
            freeze_ms = ms(frozen.elapsed());
        } else {
            freeze_ms = 0;
        }
        // Stopped into standby only once the image is stored and journaled: a failure
        // before that resumes it instead, with nothing lost.
        let stored = Instant::now();
        let kept = async {
            let put = self.put(images.to_path_buf()).await?;
            let checkpoint = Checkpoint {
                id: id.to_string(),
                workload: name.to_string(),
                spec: w.spec.clone(),
                created_at_ms: now_ms(),
                left_running: leave_running,
                notes,
                log: w.log.clone(),
                freeze_ms,
                store_ms: ms(stored.elapsed()),
                bytes: put.bytes,
                new_bytes: put.new_bytes,
                files: put.files,
                from_site: None,
                replicated: None,
            };
            self.keep_record(&checkpoint)?;
            Ok::<_, CheckpointError>(checkpoint)
        }
        .await;
        if leave_running {
            return kept;
        }
        let mut checkpoint = match kept {
            Ok(c) => c,
            Err(e) => {
                self.resume(&adapter, call, name).await;
                return Err(e);
            }
        };
        if let Err(e) = adapter.release_source(call).await {
            tracing::warn!(workload = name, error = %e, "adapter could not stop the checkpointed workload");
        }
        if let (Some(pid), Some(start)) = (w.pid, w.pid_start) {
            if crate::sys::process::alive(pid, start) {
                crate::sys::process::kill(pid);
            }
        }
        self.parts.ingress.release(name, Target::Local);
        if let Err(e) = self.parts.workloads.standby(name) {
            tracing::error!(workload = name, error = %e, "cannot record the workload's standby");
        }
        // Frozen until here: the image was stored while it could not change.
        checkpoint.freeze_ms = ms(frozen.elapsed());
        Ok(checkpoint)
    }

    async fn put(&self, dir: PathBuf) -> Result<store::Put, CheckpointError> {
        let store = Arc::clone(&self.store);
        // Hashing a large image is CPU work: off the async threads.
        blocking(move || store.put_dir(&dir)).await
    }

    /// Resumes a workload frozen by a checkpoint and lifts the hold.
    async fn resume(&self, adapter: &crate::plugins::AdapterHandle, call: AdapterCall, name: &str) {
        let pid = match adapter.resume_source(call).await {
            Ok(pid) => pid,
            Err(e) => {
                tracing::error!(workload = name, error = %e, "cannot resume the workload after its checkpoint");
                None
            }
        };
        self.parts.ingress.release(name, Target::Local);
        self.unhold(name, pid);
    }

    /// Lifts a checkpoint's hold (with the pid the adapter resumed it as, if new).
    fn unhold(&self, name: &str, pid: Option<i32>) {
        let lifted = self.parts.workloads.modify_even_unjournaled(name, |w| {
            w.migration = None;
            if let Some(pid) = pid {
                w.pid = Some(pid);
                w.pid_start = crate::sys::process::start_time(pid);
            }
            Ok(())
        });
        if let Err(e) = lifted {
            tracing::error!(workload = name, error = %e, "cannot lift the checkpoint's hold");
        }
    }

    /// Keeps each workload's newest checkpoints (`keep`) and frees blocks no kept
    /// checkpoint uses.
    fn retain(&self, name: &str) -> Result<(), CheckpointError> {
        let mine = self.list(name)?;
        // The newest record's policy, as the workload asks for it now.
        let keep = mine
            .last()
            .and_then(|c| c.spec.checkpoints.as_ref()?.keep)
            .map_or(self.keep, |k| k.max(1) as usize);
        let drop = mine.len().saturating_sub(keep);
        for c in &mine[..drop] {
            self.drop_record(name, &c.id)?;
            tracing::info!(workload = name, checkpoint = %c.id, "old checkpoint dropped");
        }
        if drop > 0 {
            let mut pinned = self.pinned();
            pinned.extend(self.received_pins());
            let all = self.locked();
            let keep: Vec<&StoredFile> = all
                .values()
                .flat_map(|c| c.files.iter())
                .chain(pinned.iter())
                .collect();
            let freed = self.store.collect(&keep)?;
            tracing::debug!(freed, "block store collected");
        }
        Ok(())
    }

    /// Restores workload `name` at this site from checkpoint `from` (its newest if
    /// `None`). A running workload of that name is refused unless `replace`, which stops
    /// it first.
    pub async fn restore(
        &self,
        name: &str,
        from: Option<&str>,
        replace: bool,
    ) -> Result<Workload, CheckpointError> {
        let all = self.list(name)?;
        let checkpoint = match from {
            Some(id) => all.iter().find(|c| c.id == id),
            None => all.last(),
        }
        .cloned()
        .ok_or_else(|| CheckpointError::NoSuchCheckpoint {
            name: name.to_string(),
            id: from.unwrap_or("(any)").to_string(),
        })?;
        self.restore_from(checkpoint, replace, None).await
    }

    /// Failover: restores `name` here from the newest checkpoint replicated from another
    /// site (`from`: that checkpoint's id), when that site is lost. Refused while the
    /// site answers on the peer link (move it with `ferry migrate` instead) unless
    /// `force`. The restored workload records where it was recovered from, and the lost
    /// site, once back, learns it and releases its old copy ([`Self::fence`]).
    pub async fn recover(
        &self,
        name: &str,
        from: Option<&str>,
        force: bool,
    ) -> Result<Workload, CheckpointError> {
        let all = self.list(name)?;
        let checkpoint = all
            .iter()
            .rev()
            .filter(|c| c.from_site.is_some())
            .find(|c| from.is_none_or(|id| c.id == id))
            .cloned()
            .ok_or_else(|| CheckpointError::NoSuchCheckpoint {
                name: name.to_string(),
                id: from.unwrap_or("(any replicated here)").to_string(),
            })?;
        let site = checkpoint.from_site.clone().unwrap_or_default();
        if !force {
            let asked = tokio::time::timeout(
                std::time::Duration::from_secs(3),
                self.parts
                    .peers
                    .request(&site, &crate::peer::wire::Request::Hello),
            )
            .await;
            if matches!(asked, Ok(Ok(_))) {
                return Err(CheckpointError::SiteAnswers(site));
            }
        }
        let origin = crate::spec::Origin {
            site: site.clone(),
            migration: format!("{RECOVERED}{}", checkpoint.id),
        };
        tracing::warn!(workload = name, from = %site, checkpoint = %checkpoint.id, taken_at_ms = checkpoint.created_at_ms, "recovering a workload of a lost site from its replicated checkpoint");
        self.restore_from(checkpoint, false, Some(origin)).await
    }

    async fn restore_from(
        &self,
        checkpoint: Checkpoint,
        replace: bool,
        origin: Option<crate::spec::Origin>,
    ) -> Result<Workload, CheckpointError> {
        let name = checkpoint.workload.as_str();
        if let Some(w) = self.parts.workloads.get(name) {
            if let Some(by) = &w.migration {
                return Err(WorkloadError::Busy {
                    name: name.to_string(),
                    migration: by.clone(),
                }
                .into());
            }
            if w.state == WorkloadState::Running && !replace {
                return Err(CheckpointError::Running(name.to_string()));
            }
            remove_for_restart(&self.parts.workloads, name).await?;
        }
        let spec = checkpoint.spec.clone();
        let workloads = &self.parts.workloads;
        workloads.check_free(&spec)?;
        let placement = workloads.place(name)?;
        workloads.reserve(&spec, &placement)?;
        let images = self.work_dir.join(format!("restore-{}", checkpoint.id));
        let restored = self
            .restore_reserved(&checkpoint, &placement, &images, origin)
            .await;
        let _ = std::fs::remove_dir_all(&images);
        match restored {
            Ok(w) => {
                tracing::info!(workload = name, checkpoint = %checkpoint.id, pid = ?w.pid, "restored from a checkpoint");
                Ok(w)
            }
            Err(e) => {
                workloads.unreserve(name);
                if workloads.get(name).is_some_and(|w| w.pid.is_none()) {
                    let _ = workloads.forget(name);
                }
                Err(e)
            }
        }
    }

    async fn restore_reserved(
        &self,
        c: &Checkpoint,
        placement: &crate::spec::Placement,
        images: &std::path::Path,
        origin: Option<crate::spec::Origin>,
    ) -> Result<Workload, CheckpointError> {
        let failed = |message: String| CheckpointError::Restore {
            name: c.workload.clone(),
            id: c.id.clone(),
            message,
        };
        let (files, store, dir) = (
            c.files.clone(),
            Arc::clone(&self.store),
            images.to_path_buf(),
        );
        blocking(move || store.materialize(&files, &dir)).await?;
        let adapter = self
            .parts
            .plugins
            .adapter(&c.spec.runtime)
            .map_err(|e| failed(e.to_string()))?;
        let call = AdapterCall::new(c.spec.clone(), placement.clone(), &self.site)
            .with_images(images.to_path_buf())
            .with_source_log(c.log.clone());
        let about = crate::hooks::About {
            workload: &c.workload,
            site: &self.site,
            id: &c.id,
            adapter: Some((&adapter, &call)),
        };
        self.hooks
            .run(crate::hooks::Hook::PreRestore, &about)
            .await
            .map_err(failed)?;
        let pid = adapter
            .restore(call.clone(), c.notes.clone())
            .await
            .map_err(|e| failed(e.to_string()))?;
        let workloads = &self.parts.workloads;
        let w = workloads.record(&c.spec, placement, Some(pid), origin);
        if let Err(why) = crate::health::wait(&c.spec, pid, workloads.health_timeout()).await {
            workloads.stop(&w).await;
            return Err(failed(format!(
                "the restored workload is not healthy: {why}"
            )));
        }
        workloads.insert_running(&w, Waiter::Pid)?;
        if let Err(e) = self.parts.ingress.open(&c.spec).await {
            tracing::warn!(workload = %c.workload, error = %e, "cannot open the workload's routes");
        }
        Ok(workloads.get(&c.workload).unwrap_or(w))
    }
}

/// Stops and forgets workload `name` so it can start again under the same name: its
/// cgroup goes once empty (in the background), and the next start takes a new one.
pub async fn remove_for_restart(workloads: &Workloads, name: &str) -> Result<(), WorkloadError> {
    let removed = workloads.remove(name).await?;
    if let Some(cg) = removed.cgroup {
        for _ in 0..50 {
            if !cg.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Runs store work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, CheckpointError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(CheckpointError::Io {
            what: "finish the block store task for",
            path: PathBuf::from("checkpoints/store"),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// How often a site asks whether its replicated workloads were recovered elsewhere.
const FENCE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// How a workload recovered from a replicated checkpoint names its origin's "migration".
pub const RECOVERED: &str = "recovered-from-checkpoint-";

fn key(workload: &str, id: &str) -> String {
    format!("{workload}.{id}")
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A little randomness for checkpoint ids taken within one millisecond.
fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos % 1000) as u16
}
