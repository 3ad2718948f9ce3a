//! The destination side: answers the source's peer requests, receives and verifies the
//! image, restores it, and confirms only once the restored workload is healthy and
//! journaled.

use std::collections::BTreeMap;

use std::time::Instant;

use quinn::RecvStream;

use super::{remove_dir, Engine, Migration, MigrationError, Phase, Role};
use crate::journal::Collection;
use crate::peer::files;
use crate::peer::wire::{Compression, ErrorCode, FileMeta, Request, Response, TargetState};
use crate::peer::Handler;
use crate::workload::{process, Origin, WorkloadSpec};

impl Handler for Engine {
    async fn handle(&self, peer: String, req: Request, body: &mut RecvStream) -> Response {
        match req {
            Request::Hello => {
                Response::error(ErrorCode::BadRequest, "hello is answered by the link")
            }
            Request::Prepare {
                migration,
                workload,
            } => self.prepare(&peer, &migration, workload).await,
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
            } => {
                self.restore(&peer, &migration, &workload, &source_log, &manifest, notes)
                    .await
            }
            Request::Status { migration } => Response::Status {
                state: self.target_state(&peer, &migration),
            },
            Request::Abort { migration } => self.abort(&peer, &migration),
            Request::Tunnel { .. } => {
                Response::error(ErrorCode::BadRequest, "tunnels are answered by the link")
            }
        }
    }

    async fn tunnel(
        &self,
        peer: String,
        workload: String,
    ) -> Result<tokio::net::TcpStream, String> {
        let w = self
            .workloads
            .get(&workload)
            .filter(|w| w.state == crate::workload::WorkloadState::Running)
            .ok_or_else(|| format!("workload {workload} is not running at site {}", self.site))?;
        let port = w
            .spec
            .port
            .ok_or_else(|| format!("workload {workload} has no port"))?;
        tracing::debug!(peer, workload, port, "tunnel opened");
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("workload {workload} does not answer on port {port}: {e}"))
    }
}

fn bad_id(id: &str) -> bool {
    id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Engine {
    /// This site's record of an incoming migration from `peer`.
    fn incoming(&self, peer: &str, id: &str) -> Option<Migration> {
        self.get(id)
            .filter(|m| m.role == Role::Target && m.source == peer)
    }

    async fn prepare(&self, peer: &str, id: &str, spec: WorkloadSpec) -> Response {
        if bad_id(id) {
            return Response::error(ErrorCode::BadRequest, format!("bad migration id {id:?}"));
        }
        if let Some(m) = self.get(id) {
            return if m.role == Role::Target && m.source == peer && m.phase == Phase::Preparing {
                Response::Ready
            } else {
                Response::error(
                    ErrorCode::Refused,
                    format!("migration {id} already exists here"),
                )
            };
        }
        let adapter = match self.plugins.adapter(&spec.runtime) {
            Ok(a) => a,
            Err(e) => return Response::error(ErrorCode::Refused, e.to_string()),
        };
        if let Err(e) = self.workloads.reserve_incoming(&spec) {
            return Response::error(ErrorCode::Refused, e.to_string());
        }
        // Warm the destination: the adapter creates what it can before the freeze.
        if let Some(reserved) = self.workloads.get(&spec.name) {
            let ctx = self.workloads.context(&reserved);
            if let Err(e) = adapter
                .prepare(self.workloads.view(&reserved, None, Some(peer)), ctx)
                .await
            {
                self.workloads.release_incoming(&spec.name);
                return Response::error(ErrorCode::Refused, e.to_string());
            }
        }
        let dir = self.incoming_dir.join(id);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            self.workloads.release_incoming(&spec.name);
            return Response::error(
                ErrorCode::Internal,
                format!("cannot create {}: {e}", dir.display()),
            );
        }
        let m = Migration::new(id, spec, Role::Target, peer, &self.site, Phase::Preparing);
        if let Err(e) = self.journal.put(Collection::Migrations, id, &m) {
            self.workloads.release_incoming(&m.workload);
            remove_dir(&dir);
            return Response::error(ErrorCode::Internal, e.to_string());
        }
        tracing::info!(migration = id, workload = %m.workload, from = peer, "incoming migration prepared");
        self.migrations.insert(id.to_string(), m);
        Response::Ready
    }

    async fn receive(
        &self,
        peer: &str,
        id: &str,
        name: &str,
        size: Option<u64>,
        compression: Compression,
        body: &mut RecvStream,
    ) -> Response {
        match self.incoming(peer, id) {
            Some(m) if m.phase == Phase::Preparing => {}
            _ => {
                return Response::error(
                    ErrorCode::Refused,
                    format!("no transfer open for migration {id}"),
                )
            }
        }
        match files::receive(&self.incoming_dir.join(id), name, size, compression, body).await {
            Ok(_) if self.incoming(peer, id).map(|m| m.phase) != Some(Phase::Preparing) => {
                Response::error(ErrorCode::Refused, format!("migration {id} was aborted"))
            }
            Ok(meta) => {
                let blake3 = meta.blake3.clone();
                let stored = self.update(id, |m| {
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
            Err(e @ files::ReceiveError::Digest { .. }) => {
                Response::error(ErrorCode::Integrity, e.to_string())
            }
            Err(e) => Response::error(ErrorCode::BadRequest, e.to_string()),
        }
    }

    async fn restore(
        &self,
        peer: &str,
        id: &str,
        spec: &WorkloadSpec,
        source_log: &std::path::Path,
        manifest: &[FileMeta],
        notes: Vec<(String, String)>,
    ) -> Response {
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
        if let Err(msg) = check_manifest(manifest, &m.received) {
            let reason = format!("image incomplete: {msg}");
            self.abort_local(id, &m.workload, &reason);
            return Response::error(ErrorCode::Integrity, reason);
        }
        if let Err(e) = self.set_phase(id, Phase::Restoring) {
            return Response::error(ErrorCode::Internal, e.to_string());
        }
        let started = Instant::now();
        match self
            .restore_and_check(id, spec, source_log, peer, notes)
            .await
        {
            Ok(pid) => {
                let restore_ms = started.elapsed().as_millis() as u64;
                // The workload record is journaled by adopt(); that is the confirmation.
                let done = self.update(id, |m| {
                    m.phase = Phase::Completed;
                    m.timings.restore_ms = Some(restore_ms);
                    m.received.clear();
                });
                remove_dir(&self.incoming_dir.join(id));
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

    /// Restores the image, waits for the workload to answer, and adopts it.
    async fn restore_and_check(
        &self,
        id: &str,
        spec: &WorkloadSpec,
        source_log: &std::path::Path,
        peer: &str,
        notes: Vec<(String, String)>,
    ) -> Result<i32, MigrationError> {
        let adapter = self.plugins.adapter(&spec.runtime)?;
        let placement = self.workloads.place(&spec.name)?;
        // The reservation made at prepare time describes the workload as it will run here.
        let reserved = self.workloads.get(&spec.name).ok_or_else(|| {
            MigrationError::Workload(crate::workload::WorkloadError::NotFound(spec.name.clone()))
        })?;
        let images = self.incoming_dir.join(id);
        let mut ctx = self.workloads.context(&reserved);
        ctx.images = Some(images.clone());
        ctx.source_log = Some(source_log.to_path_buf());
        let started = Instant::now();
        let pid = adapter
            .restore(
                self.workloads.view(&reserved, Some(&images), Some(peer)),
                notes,
                ctx,
            )
            .await?;
        tracing::debug!(
            migration = id,
            pid,
            ms = started.elapsed().as_millis() as u64,
            "adapter restored"
        );
        if let Some(port) = spec.port {
            if !process::wait_port(port, self.health_timeout).await {
                self.discard_restored(&adapter, &reserved, pid).await;
                return Err(MigrationError::RestoreFailed {
                    site: self.site.clone(),
                    message: format!(
                        "restored workload did not answer on port {port} within {} s",
                        self.health_timeout.as_secs()
                    ),
                });
            }
        }
        if let Err(e) = self.workloads.open_routes(spec).await {
            // The restore stands: clients can still come through the source site's tunnel.
            tracing::warn!(migration = id, error = %e, "cannot open the workload's routes here");
        }
        // adopt() replaces the reservation with the running workload's record.
        let adopted = self.workloads.adopt(
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

    /// Ends a restored copy that will not be confirmed: through its adapter (which knows
    /// the runtime's own state), and by killing its tree if that is not enough.
    async fn discard_restored(
        &self,
        adapter: &crate::plugins::AdapterHandle,
        reserved: &crate::workload::Workload,
        pid: i32,
    ) {
        let mut w = reserved.clone();
        w.pid = Some(pid);
        w.pid_start = process::start_time(pid);
        if let Err(e) = adapter
            .release_source(
                self.workloads.view(&w, None, None),
                self.workloads.context(&w),
            )
            .await
        {
            tracing::warn!(error = %e, "adapter could not discard the restored copy");
        }
        if process::start_time(pid) == w.pid_start && w.pid_start.is_some() {
            process::kill(pid);
            let _ = process::wait_exit(pid).await;
        }
    }

    /// Forgets an incoming migration that will not complete: release the name, drop the
    /// image, record why.
    pub(super) fn abort_local(&self, id: &str, workload: &str, reason: &str) {
        self.workloads.release_incoming(workload);
        remove_dir(&self.incoming_dir.join(id));
        if let Err(e) = self.update(id, |m| {
            m.phase = Phase::RolledBack;
            m.error = Some(reason.to_string());
            m.received.clear();
        }) {
            tracing::error!(migration = id, error = %e, "cannot journal the abort");
        }
    }

    fn target_state(&self, peer: &str, id: &str) -> TargetState {
        match self.incoming(peer, id).map(|m| m.phase) {
            None => TargetState::Unknown,
            Some(Phase::Restoring) => TargetState::Restoring,
            Some(Phase::Completed) => TargetState::Confirmed,
            Some(p) if p.is_terminal() => TargetState::Aborted,
            Some(_) => TargetState::Receiving,
        }
    }

    fn abort(&self, peer: &str, id: &str) -> Response {
        let Some(m) = self.incoming(peer, id) else {
            return Response::Aborted;
        };
        match m.phase {
            Phase::Completed => Response::Status {
                state: TargetState::Confirmed,
            },
            Phase::Restoring => Response::error(ErrorCode::Busy, "restore in progress; ask again"),
            p if p.is_terminal() => Response::Aborted,
            _ => {
                self.abort_local(id, &m.workload, "aborted by the source");
                tracing::info!(migration = id, "incoming migration aborted by the source");
                Response::Aborted
            }
        }
    }
}

/// Every file of the manifest was received with the same size and digest, and nothing else.
fn check_manifest(manifest: &[FileMeta], received: &[FileMeta]) -> Result<(), String> {
    let got: BTreeMap<&str, &FileMeta> = received.iter().map(|f| (f.name.as_str(), f)).collect();
    for f in manifest {
        match got.get(f.name.as_str()) {
            None => return Err(format!("{} was never received", f.name)),
            Some(r) if *r != f => return Err(format!("{} differs from the manifest", f.name)),
            Some(_) => {}
        }
    }
    if manifest.len() != received.len() {
        return Err(format!(
            "received {} files, manifest lists {}",
            received.len(),
            manifest.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, size: u64) -> FileMeta {
        FileMeta {
            name: name.into(),
            size,
            blake3: format!("{size:064x}"),
        }
    }

    #[test]
    fn manifest_must_match_what_was_received() {
        let got = vec![f("a", 1), f("b", 2)];
        assert!(check_manifest(&[f("b", 2), f("a", 1)], &got).is_ok());
        assert!(check_manifest(&[f("a", 1), f("c", 2)], &got)
            .unwrap_err()
            .contains("c was never received"));
        assert!(check_manifest(&[f("a", 1), f("b", 3)], &got)
            .unwrap_err()
            .contains("differs"));
        assert!(check_manifest(&[f("a", 1)], &got).is_err());
    }

    #[test]
    fn migration_ids_from_peers_are_checked() {
        assert!(!bad_id("0123abcd"));
        assert!(bad_id("../x"));
        assert!(bad_id(""));
    }
}
