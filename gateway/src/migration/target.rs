//! The destination side: answers the source's peer requests, receives and verifies the
//! image, restores it, and confirms only once the restored workload is healthy and
//! journaled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{remove_dir, Engine, Migration, MigrationError, Phase, Role};
use crate::checkpoint::warm::Received;
use crate::peer::wire::{ErrorCode, Request, Response, TargetState, MAX_STATUS_WAIT_MS};
use crate::peer::{Body, Handler};
use crate::plugins::{AdapterCall, AdapterHandle};
use crate::spec::{Origin, Workload, WorkloadSpec, WorkloadState};
use crate::sys::process;
use crate::transfer::{self, Compression, FileMeta};
use crate::workload::WorkloadError;

impl Handler for Engine {
    async fn handle(&self, peer: String, req: Request, body: Body<'_>) -> Response {
        // Nothing is answered from a journal not yet loaded: "unknown" must mean unknown.
        self.wait_recovered().await;
        match req {
            Request::Hello | Request::Tunnel { .. } | Request::Measure { .. } => {
                Response::error(ErrorCode::BadRequest, "answered by the link")
            }
            Request::BlocksWanted { .. }
            | Request::Blocks { .. }
            | Request::Replica { .. }
            | Request::Volumes { .. }
            | Request::Fence { .. }
            | Request::HeldPages { .. } => {
                Response::error(ErrorCode::BadRequest, "answered by the site's checkpoints")
            }
            Request::Prepare {
                migration,
                workload,
                service: None,
            } => self.prepare(&peer, &migration, workload).await,
            Request::Prepare {
                migration,
                workload,
                service: Some(service),
            } => {
                self.prepare_replica(&peer, &migration, workload, &service)
                    .await
            }
            Request::Probe {
                workload,
                service,
                needs,
            } => {
                self.probe_here(&peer, &workload, service.as_deref(), needs.as_ref())
                    .await
            }
            Request::StartSync { migration } => self.start_sync(&peer, &migration).await,
            Request::SyncStatus { migration } => self.sync_status(&peer, &migration).await,
            Request::Promote { migration, mark } => self.promote(&peer, &migration, mark).await,
            Request::File {
                migration,
                name,
                size,
                compression,
                growing,
            } => {
                let size = (!growing).then_some(size);
                self.receive(&peer, &migration, &name, size, compression, body)
                    .await
            }
            Request::Restore {
                migration,
                workload,
                source_log,
                manifest,
                notes,
                postcopy,
                volumes,
            } => {
                let ask = RestoreAsk {
                    spec: workload,
                    source_log,
                    manifest,
                    notes,
                    postcopy,
                    volumes,
                };
                self.restore(&peer, &migration, ask).await
            }
            Request::Prepush { migration } => self.receive_prepush(&peer, &migration, body).await,
            Request::Settle { migration } => self.receive_settled(&peer, &migration, body).await,
            Request::SourceState { migration } => self.source_state(&peer, &migration),
            Request::Status { migration, wait_ms } => Response::Status {
                state: self.status_after(&peer, &migration, wait_ms).await,
                generation: Some(self.journal.generation()),
            },
            Request::Abort { migration } => self.abort(&peer, &migration).await,
        }
    }
}

/// What a `Restore` request asks for.
struct RestoreAsk {
    spec: WorkloadSpec,
    source_log: std::path::PathBuf,
    manifest: Vec<FileMeta>,
    notes: Vec<(String, String)>,
    postcopy: bool,
    /// Its volumes' manifest was sent: place them first.
    volumes: bool,
}

fn bad_id(id: &str) -> bool {
    id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Engine {
    /// This site's record of an incoming migration from `peer`.
    pub(super) fn incoming(&self, peer: &str, id: &str) -> Option<Migration> {
        self.get(id)
            .filter(|m| m.role == Role::Target && m.source == peer)
    }

    /// Whether a `Prepare` for `id` from `peer` is new work: a bad id is refused, a repeat
    /// of one already prepared is answered `Ready` again, any other id in use is refused.
    pub(super) async fn admit_prepare(&self, peer: &str, id: &str) -> Result<(), Response> {
        if bad_id(id) {
            return Err(Response::error(
                ErrorCode::BadRequest,
                format!("bad migration id {id:?}"),
            ));
        }
        if let Some(m) = self.get(id) {
            return Err(
                if m.role == Role::Target && m.source == peer && m.phase == Phase::Preparing {
                    Response::Ready
                } else {
                    Response::error(
                        ErrorCode::Refused,
                        format!("migration {id} already exists here"),
                    )
                },
            );
        }
        self.faults
            .enter(Role::Target, Phase::Preparing, &self.cancel)
            .await
            .map_err(|e| Response::error(ErrorCode::Refused, e.to_string()))
    }

    async fn prepare(&self, peer: &str, id: &str, spec: WorkloadSpec) -> Response {
        if let Err(answer) = self.admit_prepare(peer, id).await {
            return answer;
        }
        let adapter = match self.plugins.adapter(&spec.runtime) {
            Ok(a) => a,
            Err(e) => return Response::error(ErrorCode::Refused, e.to_string()),
        };
        if let Err(e) = self.reserve_incoming(&spec) {
            return Response::error(ErrorCode::Refused, e.to_string());
        }
        // Warm the destination: the adapter creates what it can before the freeze.
        if let Some(reserved) = self.workloads.get(&spec.name) {
            let about = AdapterCall::for_workload(&reserved).with_peer(peer);
            if let Err(e) = adapter.prepare(about).await {
                self.release_incoming(&spec.name);
                return Response::error(ErrorCode::Refused, e.to_string());
            }
        }
        let dir = self.incoming_dir.join(id);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            self.release_incoming(&spec.name);
            return Response::error(
                ErrorCode::Internal,
                format!("cannot create {}: {e}", dir.display()),
            );
        }
        let m = Migration::new(id, spec, Role::Target, peer, &self.site, Phase::Preparing);
        if let Err(e) = self.insert(&m) {
            self.release_incoming(&m.workload);
            remove_dir(&dir);
            return Response::error(ErrorCode::Internal, e.to_string());
        }
        // The journal's generation moves on with every migration taken in: the source
        // keeps it, and a later answer from a journal that went back in time shows less.
        let generation = match self.journal.advance_generation() {
            Ok(g) => g,
            Err(e) => {
                self.abort_local(id, &m.workload, "cannot journal the preparation");
                return Response::error(ErrorCode::Internal, e.to_string());
            }
        };
        tracing::info!(migration = id, workload = %m.workload, from = peer, generation, "incoming migration prepared");
        // This site's own connection to the source (a post-copy page phase, the status
        // it reports) is set up now, not as the copy starts to need pages.
        let peers = Arc::clone(&self.peers);
        let source = peer.to_string();
        self.tasks.spawn(async move {
            if let Err(e) = peers.connection(&source).await {
                tracing::debug!(peer = %source, error = %e, "no connection to the source yet; made when needed");
            }
        });
        Response::Prepared { generation }
    }

    async fn receive(
        &self,
        peer: &str,
        id: &str,
        name: &str,
        size: Option<u64>,
        compression: Compression,
        body: Body<'_>,
    ) -> Response {
        match self.incoming(peer, id) {
            Some(m) if m.phase == Phase::Preparing && m.files >= MAX_IMAGE_FILES => {
                return Response::error(
                    ErrorCode::Refused,
                    format!(
                        "migration {id} has sent {} image files, the most a migration may",
                        m.files
                    ),
                )
            }
            Some(m) if m.phase == Phase::Preparing => {}
            _ => {
                return Response::error(
                    ErrorCode::Refused,
                    format!("no transfer open for migration {id}"),
                )
            }
        }
        let dir = self.incoming_dir.join(id);
        if let Err(why) = room_for(&dir, size) {
            return Response::error(ErrorCode::Refused, why);
        }
        let held = self.checkpoints.as_ref().map(|c| c.held());
        match transfer::receive(&dir, name, size, compression, held, body).await {
            Ok(_) if self.incoming(peer, id).map(|m| m.phase) != Some(Phase::Preparing) => {
                Response::error(ErrorCode::Refused, format!("migration {id} was aborted"))
            }
            Ok(meta) => {
                let blake3 = meta.blake3.clone();
                // In memory: the restore request journals the list with its phase.
                let stored = self.note(id, |m| {
                    m.bytes_moved += meta.size;
                    m.files += 1;
                    m.received.retain(|f| f.name != meta.name);
                    m.received.push(meta);
                });
                match stored {
                    Ok(_) => Response::Stored {
                        name: name.to_string(),
                        blake3,
                    },
                    Err(e) => Response::error(ErrorCode::Internal, e.to_string()),
                }
            }
            Err(e @ transfer::ReceiveError::Digest { .. }) => {
                Response::error(ErrorCode::Integrity, e.to_string())
            }
            Err(e) => Response::error(ErrorCode::BadRequest, e.to_string()),
        }
    }

    async fn restore(&self, peer: &str, id: &str, ask: RestoreAsk) -> Response {
        let RestoreAsk {
            spec,
            source_log,
            manifest,
            notes,
            postcopy,
            volumes,
        } = ask;
        let (spec, source_log, manifest) = (&spec, source_log.as_path(), manifest.as_slice());
        let m = match self.incoming(peer, id) {
            Some(m) if m.phase == Phase::Preparing => m,
            Some(m) if m.phase == Phase::Completed => {
                return match self.workloads.get(&m.workload).and_then(|w| w.pid) {
                    Some(pid) => Response::Restored {
                        pid,
                        restore_ms: m.timings.restore_ms.unwrap_or(0),
                    },
                    None => Response::error(ErrorCode::Internal, "restored workload vanished"),
                }
            }
            _ => {
                return Response::error(
                    ErrorCode::Refused,
                    format!("migration {id} is not ready to restore"),
                )
            }
        };
        if &m.spec != spec {
            return Response::error(
                ErrorCode::BadRequest,
                "workload differs from the prepared one",
            );
        }
        if let Err(msg) = transfer::manifest::check(manifest, &m.received) {
            let reason = format!("image incomplete: {msg}");
            self.abort_local(id, &m.workload, &reason);
            return Response::error(ErrorCode::Integrity, reason);
        }
        if let Err(e) = self
            .faults
            .enter(Role::Target, Phase::Restoring, &self.cancel)
            .await
        {
            let reason = e.to_string();
            self.abort_local(id, &m.workload, &reason);
            return Response::error(ErrorCode::RestoreFailed, reason);
        }
        // What the disk holds now is what the restore reads.
        let images = self.incoming_dir.join(id);
        let owned = manifest.to_vec();
        let bytes: u64 = manifest.iter().map(|f| f.size).sum();
        let checked = Instant::now();
        let at_rest = tokio::task::spawn_blocking(move || {
            transfer::manifest::verify_at_rest(&images, &owned)
        })
        .await
        .unwrap_or_else(|e| Err(format!("the image check did not finish: {e}")));
        if let Err(msg) = at_rest {
            let reason = format!("image damaged at rest: {msg}");
            self.abort_local(id, &m.workload, &reason);
            return Response::error(ErrorCode::Integrity, reason);
        }
        tracing::info!(
            migration = id,
            bytes,
            ms = checked.elapsed().as_millis() as u64,
            "image re-verified and synced to disk"
        );
        if volumes || !spec.volumes.is_empty() {
            // Its files at the same paths as at the source, before anything reads them.
            if let Err(reason) = self.place_volumes(id, spec).await {
                self.abort_local(id, &m.workload, &reason);
                return Response::error(ErrorCode::RestoreFailed, reason);
            }
        }
        if let Err(e) = self.set_phase(id, Phase::Restoring) {
            return Response::error(ErrorCode::Internal, e.to_string());
        }
        let started = Instant::now();
        match self
            .restore_and_check(id, spec, source_log, peer, notes, postcopy)
            .await
        {
            Ok(pid) => {
                let restore_ms = started.elapsed().as_millis() as u64;
                // The workload record is journaled by adopt(); that is the confirmation.
                // Post-copy: running, but complete only once every page is here.
                let done = self.update(id, |m| {
                    m.phase = if postcopy {
                        Phase::Paging
                    } else {
                        Phase::Completed
                    };
                    m.timings.restore_ms = Some(restore_ms);
                    m.received.clear();
                });
                if !postcopy {
                    // (Post-copy: the lazy-pages daemon still reads it; removed when done.)
                    self.keep_received(id, &spec.name);
                }
                if let Err(e) = done {
                    tracing::error!(error = %e, "restored, but cannot journal the migration's end");
                }
                tracing::info!(migration = id, pid, restore_ms, "restore confirmed");
                Response::Restored { pid, restore_ms }
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(migration = id, error = %reason, "restore failed");
                self.abort_local(id, &m.workload, &reason);
                Response::error(ErrorCode::RestoreFailed, reason)
            }
        }
    }

    /// Writes the volumes' files the source's manifest lists (their blocks are here).
    async fn place_volumes(&self, id: &str, spec: &WorkloadSpec) -> Result<(), String> {
        let store = self
            .checkpoints
            .as_ref()
            .ok_or("this site has no block store to place volumes from")?;
        let started = Instant::now();
        let written = store
            .place_volumes(id, &spec.name, &spec.volumes)
            .await
            .map_err(|e| format!("placing the volumes at {}: {e}", self.site))?;
        tracing::info!(
            migration = id,
            written,
            ms = started.elapsed().as_millis() as u64,
            "volumes placed"
        );
        self.update(id, |m| {
            m.volumes.get_or_insert_with(Default::default).written_bytes = Some(written);
        })
        .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Restores the image, waits for the workload to answer, and adopts it.
    async fn restore_and_check(
        &self,
        id: &str,
        spec: &WorkloadSpec,
        source_log: &std::path::Path,
        peer: &str,
        notes: Vec<(String, String)>,
        postcopy: bool,
    ) -> Result<i32, MigrationError> {
        let adapter = self.plugins.adapter(&spec.runtime)?;
        let placement = self.workloads.place(&spec.name)?;
        // The reservation made at prepare time describes the workload as it will run here.
        let reserved = self
            .workloads
            .get(&spec.name)
            .ok_or_else(|| WorkloadError::NotFound(spec.name.clone()))?;
        let mut about = AdapterCall::for_workload(&reserved)
            .with_peer(peer)
            .with_images(self.incoming_dir.join(id))
            .with_source_log(source_log.to_path_buf());
        // The site's and the adapter's pre-restore hooks (a cache warmed, a lock taken):
        // a failure refuses the restore before anything starts, and the source resumes.
        let hook = crate::hooks::About {
            workload: &spec.name,
            site: &self.site,
            id,
            adapter: Some((&adapter, &about)),
        };
        if let Err(message) = self.hooks.run(crate::hooks::Hook::PreRestore, &hook).await {
            return Err(MigrationError::RestoreFailed {
                site: self.site.clone(),
                message,
            });
        }
        if postcopy {
            // The restored tree's missing pages come from the source, through Ferry.
            let images = self.incoming_dir.join(id);
            let endpoint = self
                .start_page_path(peer, id, &spec.name, &images)
                .await
                .map_err(|message| MigrationError::RestoreFailed {
                    site: self.site.clone(),
                    message,
                })?;
            about.page_server = Some(endpoint);
        }
        let started = Instant::now();
        let restored = adapter.restore(about, notes).await;
        if postcopy {
            let images = self.incoming_dir.join(id);
            if let Ok(pid) = restored {
                // A runtime's restore chose the tree's cgroup: killed through it if its
                // pages stop coming.
                self.criu.kill_lazy_through(&images, pid);
                // It fetches the rest while the tree runs; followed to its end.
                self.follow_lazy_pages(id, images);
            } else {
                self.criu.abandon_lazy(&images);
            }
        }
        let pid = match restored {
            Ok(pid) => pid,
            Err(e) => {
                // The runtime may have started the copy before the call failed (restored,
                // then an inspect failed; or the deadline fired after the host call
                // finished): whatever exists is discarded, by name and by cgroup.
                self.discard_by_name(&adapter, &reserved).await;
                return Err(e.into());
            }
        };
        tracing::debug!(
            migration = id,
            pid,
            ms = started.elapsed().as_millis() as u64,
            "adapter restored"
        );
        if let Err(why) = crate::health::wait(spec, pid, self.health_timeout).await {
            self.discard_restored(&adapter, &reserved, pid).await;
            return Err(MigrationError::RestoreFailed {
                site: self.site.clone(),
                message: format!("the restored workload is not healthy: {why}"),
            });
        }
        if let Err(e) = self.ingress.open(spec).await {
            // The restore stands: clients can still come through the source site's tunnel.
            tracing::warn!(migration = id, error = %e, "cannot open the workload's routes here");
        }
        // adopt() replaces the reservation with the running workload's record.
        let adopted = self.adopt(
            spec,
            &placement,
            pid,
            Origin {
                site: peer.to_string(),
                migration: id.to_string(),
            },
        );
        if let Err(e) = adopted {
            self.discard_restored(&adapter, &reserved, pid).await;
            return Err(e.into());
        }
        Ok(pid)
    }

    /// After a confirmed restore, off its path: the image's pages go into the block store
    /// (the next move of the workload here sends only other pages), then the image goes.
    fn keep_received(&self, id: &str, workload: &str) {
        let incoming = self.incoming_dir.join(id);
        let Some(checkpoints) = self.checkpoints.clone() else {
            remove_dir(&incoming);
            return;
        };
        // Out of the incoming directory at once (the move is over); stored from there.
        let dir = checkpoints.received_dir(id);
        if let Err(e) = std::fs::rename(&incoming, &dir) {
            tracing::warn!(migration = id, error = %e, "cannot keep the received image; the next move here sends every page");
            remove_dir(&incoming);
            return;
        }
        self.keep_in_background(id, workload, Received::Image(dir));
    }

    /// Destination, off the move's path: what it brought goes into the block store (a
    /// later move of the workload here sends only other pages); a kept image's directory
    /// goes then.
    pub(super) fn keep_in_background(&self, id: &str, workload: &str, received: Received) {
        let Some(checkpoints) = self.checkpoints.clone() else {
            return;
        };
        let dir = match &received {
            Received::Image(dir) => Some(dir.clone()),
            Received::Pages(_) => None,
        };
        let (id, workload) = (id.to_string(), workload.to_string());
        self.tasks.spawn(async move {
            let started = Instant::now();
            match checkpoints.keep_received(&workload, received).await {
                Ok(new_bytes) => tracing::info!(migration = %id, %workload, new_bytes, ms = started.elapsed().as_millis() as u64, "received pages kept for the next move here"),
                Err(e) => tracing::warn!(migration = %id, %workload, error = %e, "cannot keep the received pages; the next move here sends them all"),
            }
            if let Some(dir) = dir {
                remove_dir(&dir);
            }
        });
    }

    /// Ends a restored copy that will not be confirmed: through its adapter (which knows
    /// the runtime's own state), and by killing its tree if that is not enough.
    /// Destination, post-copy: the restored copy can never get the pages it lacks (the
    /// page path failed, or the gateway restarted): it is stopped, as its memory would
    /// read zeros where pages never came, and the migration fails here; the source, still
    /// frozen with every page, resumes when it hears so.
    pub(super) async fn fail_paging(&self, id: &str, reason: &str) {
        let Some(m) = self.get(id) else { return };
        if let Some(w) = self
            .workloads
            .get(&m.workload)
            .filter(|w| w.restored_from.as_ref().map(|o| o.migration.as_str()) == Some(id))
        {
            if let (Ok(adapter), Some(pid)) = (self.plugins.adapter(&w.spec.runtime), w.pid) {
                self.discard_restored(&adapter, &w, pid).await;
            }
            if let Err(e) = self.workloads.forget(&w.spec.name) {
                tracing::error!(workload = %w.spec.name, error = %e, "cannot forget the stopped copy");
            }
        }
        self.ingress.close_tunnels(id);
        remove_dir(&self.incoming_dir.join(id));
        tracing::error!(
            migration = id,
            reason,
            "post-copy copy stopped before it had every page"
        );
        if let Err(e) = self.update(id, |m| {
            m.phase = Phase::Failed;
            m.error = Some(reason.to_string());
        }) {
            tracing::error!(migration = id, error = %e, "cannot journal the failed page phase");
        }
    }

    /// Destination, in the page phase: does the copy restored by migration `id` still
    /// run? A copy that exited (killed, crashed) ends CRIU's lazy-pages daemon as if it
    /// had every page; it had not, and the source, which has them all, is to resume.
    pub(super) fn copy_runs(&self, id: &str) -> bool {
        let Some(m) = self.get(id) else { return false };
        self.workloads
            .get(&m.workload)
            .filter(|w| w.restored_from.as_ref().map(|o| o.migration.as_str()) == Some(id))
            .is_some_and(|w| {
                w.state != WorkloadState::Exited
                    && w.pid.is_some_and(|pid| {
                        w.pid_start.is_none_or(|start| process::alive(pid, start))
                            && process::state(pid).is_some_and(|s| s != 'Z' && s != 'X')
                    })
            })
    }

    /// Discards a copy a restore may have started without reporting it: the adapter's
    /// release by name (a container), then the workload's cgroup.
    pub(super) async fn discard_by_name(&self, adapter: &AdapterHandle, reserved: &Workload) {
        let about = AdapterCall::for_workload(reserved);
        if let Err(e) = adapter.release_source(about).await {
            tracing::warn!(workload = %reserved.spec.name, error = %e, "adapter could not discard a failed restore");
        }
        if let Some(cg) = &reserved.cgroup {
            process::kill_cgroup(cg);
        }
    }

    async fn discard_restored(&self, adapter: &AdapterHandle, reserved: &Workload, pid: i32) {
        let about = AdapterCall::for_workload(reserved).with_pid(pid);
        let pid_start = about.pid_start;
        if let Err(e) = adapter.release_source(about).await {
            tracing::warn!(error = %e, "adapter could not discard the restored copy");
        }
        if process::start_time(pid) == pid_start && pid_start.is_some() {
            process::kill(pid);
            let _ = process::wait_exit(pid).await;
        }
    }

    /// Forgets an incoming migration that will not complete: release the name, drop the
    /// image, record why.
    pub(super) fn abort_local(&self, id: &str, workload: &str, reason: &str) {
        self.release_incoming(workload);
        self.drop_precache(id);
        remove_dir(&self.incoming_dir.join(id));
        if let Err(e) = self.update(id, |m| {
            m.phase = Phase::RolledBack;
            m.error = Some(reason.to_string());
            m.received.clear();
        }) {
            tracing::error!(migration = id, error = %e, "cannot journal the abort");
        }
    }

    /// Source: whether the move `id` to `peer` is complete here (the source released).
    fn source_state(&self, peer: &str, id: &str) -> Response {
        match self
            .get(id)
            .filter(|m| m.role == Role::Source && m.target == peer)
        {
            Some(m) => Response::SourceState {
                released: m.phase == Phase::Completed,
                phase: m.phase.to_string(),
            },
            None => Response::SourceState {
                released: false,
                phase: "unknown".into(),
            },
        }
    }

    /// Destination: may the workload `name` be removed here? Not while the site it was
    /// moved from has not released its own copy: that site may still resume it, or cut
    /// over later and find nothing here (the service nowhere). The source is asked once;
    /// its yes is journaled.
    pub async fn check_removable(&self, name: &str) -> Result<(), MigrationError> {
        let Some(origin) = self.workloads.get(name).and_then(|w| w.restored_from) else {
            return Ok(());
        };
        let Some(m) = self
            .get(&origin.migration)
            .filter(|m| m.role == Role::Target)
        else {
            return Ok(());
        };
        if m.source_released {
            return Ok(());
        }
        let refuse = |why: String| MigrationError::NotReleased {
            workload: name.to_string(),
            why,
        };
        if m.phase != Phase::Completed {
            return Err(refuse(format!(
                "its move from site {} is still {} here",
                m.source, m.phase
            )));
        }
        let asked = self.ask_source_state(&m).await;
        match asked {
            Ok(Response::SourceState { released: true, .. }) => {
                self.update(&m.id, |m| m.source_released = true)?;
                Ok(())
            }
            Ok(Response::SourceState { phase, .. }) => Err(refuse(format!(
                "site {} has not released its copy yet (its migration {} is {phase})",
                m.source, m.id
            ))),
            Ok(other) => Err(refuse(format!(
                "site {} answered {other:?} about migration {}",
                m.source, m.id
            ))),
            Err(e) => Err(refuse(format!(
                "cannot ask site {} whether it released its copy: {e}",
                m.source
            ))),
        }
    }

    /// Does a workload here run as restored from migration `id` of `peer` (whatever the
    /// migration records say)?
    fn holds_copy_of(&self, peer: &str, id: &str) -> bool {
        self.workloads.list().iter().any(|w| {
            w.restored_from
                .as_ref()
                .is_some_and(|o| o.migration == id && o.site == peer)
        })
    }

    /// The state of `id` here; with `wait_ms`, that of a copy in its page phase once the
    /// phase ended, or once the wait (at most [`MAX_STATUS_WAIT_MS`]) is over: the
    /// source learns at once that every page is here.
    async fn status_after(&self, peer: &str, id: &str, wait_ms: u32) -> TargetState {
        let mut changes = self.changes.subscribe();
        let wait = Duration::from_millis(u64::from(wait_ms.min(MAX_STATUS_WAIT_MS)));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let state = self.target_state(peer, id);
            if state != TargetState::Paging {
                return state;
            }
            tokio::select! {
                changed = tokio::time::timeout_at(deadline, changes.changed()) => {
                    if !matches!(changed, Ok(Ok(()))) {
                        return self.target_state(peer, id);
                    }
                }
                () = self.cancel.cancelled() => return state,
            }
        }
    }

    fn target_state(&self, peer: &str, id: &str) -> TargetState {
        match self.incoming(peer, id).map(|m| m.phase) {
            // No record, but its copy runs here: never "unknown" (read as "no copy").
            None if self.holds_copy_of(peer, id) => TargetState::Confirmed,
            None => TargetState::Unknown,
            Some(Phase::Restoring) => TargetState::Restoring,
            Some(Phase::Paging) => TargetState::Paging,
            Some(Phase::Completed) => TargetState::Confirmed,
            Some(p) if p.is_terminal() => TargetState::Aborted,
            Some(_) => TargetState::Receiving,
        }
    }

    async fn abort(&self, peer: &str, id: &str) -> Response {
        let Some(m) = self.incoming(peer, id) else {
            if self.holds_copy_of(peer, id) {
                return Response::Status {
                    state: TargetState::Confirmed,
                    generation: None,
                };
            }
            return Response::Aborted;
        };
        match m.phase {
            Phase::Completed => Response::Status {
                state: TargetState::Confirmed,
                generation: None,
            },
            // The copy runs: never dropped on the source's word.
            Phase::Paging => Response::Status {
                state: TargetState::Paging,
                generation: None,
            },
            Phase::Restoring => Response::error(ErrorCode::Busy, "restore in progress; ask again"),
            p if p.is_terminal() => Response::Aborted,
            _ if m.service.is_some() => {
                self.discard_replica(id).await;
                tracing::info!(
                    migration = id,
                    "incoming service-level migration aborted by the source"
                );
                Response::Aborted
            }
            _ => {
                self.abort_local(id, &m.workload, "aborted by the source");
                tracing::info!(migration = id, "incoming migration aborted by the source");
                Response::Aborted
            }
        }
    }
}

/// Space kept free in the data directory whatever arrives (the journal needs room).
const DISK_RESERVE: u64 = 64 << 20;

/// How often the destination looks at reservations whose record stopped changing.
const RESERVATION_CHECK: Duration = Duration::from_secs(5);

impl Engine {
    /// Destination: an incoming move that has not reached its restore holds a name, a port
    /// and a partial image here. While such a record stays unchanged, the source is asked
    /// every few seconds how the move stands; one that ended it (rolled back, failed) or
    /// does not know it, its Abort lost with the link or with its gateway, gets the same
    /// treatment here as its Abort would have: the reservation and the image go. Nothing
    /// runs here before the restore request (a service-level replica serves no client),
    /// so this never ends a copy that serves. An unreachable source is asked again later.
    pub(super) fn expire_reservations(self: &Arc<Self>) {
        let this = Arc::clone(self);
        self.tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = this.cancel.cancelled() => return,
                    () = tokio::time::sleep(RESERVATION_CHECK) => {}
                }
                this.check_reservations().await;
            }
        });
    }

    /// Asks the source of incoming move `m` how that move stands there.
    async fn ask_source_state(&self, m: &Migration) -> Result<Response, crate::peer::PeerError> {
        self.peers
            .request(
                &m.source,
                &Request::SourceState {
                    migration: m.id.clone(),
                },
            )
            .await
    }

    async fn check_reservations(&self) {
        let now = super::now_ms();
        let quiet = self.list().into_iter().filter(|m| {
            m.role == Role::Target
                && matches!(
                    m.phase,
                    Phase::Planned
                        | Phase::Preparing
                        | Phase::Syncing
                        | Phase::Checkpointing
                        | Phase::Transferring
                )
                && now.saturating_sub(m.updated_at_ms) >= RESERVATION_CHECK.as_millis() as u64
        });
        for m in quiet {
            let Ok(Response::SourceState { phase, .. }) = self.ask_source_state(&m).await else {
                continue;
            };
            if matches!(phase.as_str(), "rolled_back" | "failed" | "unknown") {
                tracing::info!(migration = %m.id, source = %m.source, source_phase = %phase, "the source ended this move without a word here; dropping its reservation");
                let _ = self.abort(&m.source, &m.id).await;
            }
        }
    }
}

/// Image files one migration may send (CRIU writes a few dozen per process).
pub(super) const MAX_IMAGE_FILES: u32 = 8192;

/// Is there room in `dir` for a file of `size` bytes (unknown: a growing file), besides
/// [`DISK_RESERVE`]?
fn room_for(dir: &std::path::Path, size: Option<u64>) -> Result<(), String> {
    let free = process::free_bytes(dir)
        .map_err(|e| format!("cannot see the free space in {}: {e}", dir.display()))?;
    fits(size.unwrap_or(0), free)
        .map_err(|why| format!("{why} in {}; free space there", dir.display()))
}

fn fits(size: u64, free: u64) -> Result<(), String> {
    if free >= DISK_RESERVE && size <= free - DISK_RESERVE {
        return Ok(());
    }
    Err(format!(
        "no room for an image file of {} MB: {} MB free, {} MB kept free",
        size >> 20,
        free >> 20,
        DISK_RESERVE >> 20
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_needs_its_size_and_the_reserve() {
        assert!(fits(10 << 20, 100 << 20).is_ok());
        let err = fits(50 << 20, 100 << 20).unwrap_err();
        assert!(
            err.contains("50 MB") && err.contains("100 MB free"),
            "{err}"
        );
        assert!(fits(0, 10 << 20).is_err(), "the reserve itself is kept");
        assert!(fits(u64::MAX, u64::MAX).is_err());
    }

    #[test]
    fn migration_ids_from_peers_are_checked() {
        assert!(!bad_id("0123abcd"));
        assert!(bad_id("../x"));
        assert!(bad_id(""));
    }
}
