//! The destination side of a service-level move: a fresh instance started by the
//! workload's runtime adapter here, made a replica of the source by a service adapter,
//! promoted at the switch, or discarded. Until it is promoted it serves no client (no
//! routes, no registry entry but the reservation), and its process is journaled in the
//! migration record so a restarted gateway can discard it.

use std::time::Instant;

use super::{locked, remove_dir, Engine, Migration, Phase, Role};
use crate::peer::wire::{ErrorCode, Response, SyncInfo};
use crate::plugins::{AdapterCall, AdapterHandle, PluginError};
use crate::spec::{Origin, Workload, WorkloadSpec};
use crate::sys::process;
use crate::workload::Waiter;

impl Engine {
    /// Reserves the name, starts a fresh instance with its runtime adapter and waits for
    /// its port; journals the replica before answering `Ready`.
    pub(super) async fn prepare_replica(
        &self,
        peer: &str,
        id: &str,
        spec: WorkloadSpec,
        service: &str,
    ) -> Response {
        if let Err(answer) = self.admit_prepare(peer, id).await {
            return answer;
        }
        let (runtime, _service) = match (
            self.plugins.adapter(&spec.runtime),
            self.plugins.service(service),
        ) {
            (Ok(r), Ok(s)) => (r, s),
            (Err(e), _) | (_, Err(e)) => return Response::error(ErrorCode::Refused, e.to_string()),
        };
        let placement = match self.reserve_incoming(&spec) {
            Ok(p) => p,
            Err(e) => return Response::error(ErrorCode::Refused, e.to_string()),
        };
        let mut m = Migration::new(
            id,
            spec.clone(),
            Role::Target,
            peer,
            &self.site,
            Phase::Preparing,
        );
        m.service = Some(service.to_string());
        m.approach = Some("service".into());
        // Journaled before the instance exists: a crash from here on is cleaned up.
        if let Err(e) = self.insert(&m) {
            self.release_incoming(&spec.name);
            return Response::error(ErrorCode::Internal, e.to_string());
        }
        let started = runtime
            .start_fresh(AdapterCall::new(spec.clone(), placement, &self.site).with_peer(peer))
            .await;
        let spawned = match started {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("cannot start the replica: {e}");
                self.abort_local(id, &spec.name, &reason);
                return Response::error(ErrorCode::Refused, reason);
            }
        };
        let pid = spawned.pid;
        if let Some(holder) = spawned.holder {
            locked(&self.holders).insert(id.to_string(), holder);
        }
        let recorded = self.update(id, |m| {
            m.replica_pid = Some(pid);
            m.replica_pid_start = process::start_time(pid);
        });
        if let Err(e) = recorded {
            self.discard_replica(id).await;
            return Response::error(ErrorCode::Internal, e.to_string());
        }
        if let Err(why) = crate::health::wait(&spec, pid, self.health_timeout).await {
            let reason = format!("the fresh instance is not healthy: {why}");
            self.discard_replica(id).await;
            return Response::error(ErrorCode::Refused, reason);
        }
        tracing::info!(migration = id, workload = %spec.name, pid, service, from = peer, "replica started");
        Response::Ready
    }

    /// The replica of `id` as its adapters see it: the reservation with the replica's pid.
    fn replica_call(&self, m: &Migration) -> Result<(AdapterCall, AdapterHandle), PluginError> {
        let service = self
            .plugins
            .service(m.service.as_deref().unwrap_or_default())?;
        let reserved = self.workloads.get(&m.workload);
        let mut about = match reserved {
            Some(w) => AdapterCall::for_workload(&w),
            None => AdapterCall::new(
                m.spec.clone(),
                self.workloads.placement_of(&m.workload),
                &self.site,
            ),
        };
        about.pid = m.replica_pid;
        about.pid_start = m.replica_pid_start;
        Ok((about.with_peer(&m.source).with_migration(&m.id), service))
    }

    fn replica_migration(
        &self,
        peer: &str,
        id: &str,
        phases: &[Phase],
    ) -> Result<Migration, Response> {
        match self.incoming(peer, id) {
            Some(m) if m.service.is_some() && phases.contains(&m.phase) => Ok(m),
            Some(m) => Err(Response::error(
                ErrorCode::Refused,
                format!("migration {id} is {} here, not a replica in sync", m.phase),
            )),
            None => Err(Response::error(
                ErrorCode::Refused,
                format!("no migration {id} here"),
            )),
        }
    }

    pub(super) async fn start_sync(&self, peer: &str, id: &str) -> Response {
        let m = match self.replica_migration(peer, id, &[Phase::Preparing, Phase::Syncing]) {
            Ok(m) => m,
            Err(r) => return r,
        };
        if let Err(e) = self
            .faults
            .enter(Role::Target, Phase::Syncing, &self.cancel)
            .await
        {
            return Response::error(ErrorCode::Refused, e.to_string());
        }
        if let Err(e) = self.set_phase(id, Phase::Syncing) {
            return Response::error(ErrorCode::Internal, e.to_string());
        }
        let outcome = match self.replica_call(&m) {
            Ok((about, service)) => service.start_sync(about).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                tracing::info!(migration = id, "replica syncing");
                Response::Ready
            }
            Err(e) => Response::error(ErrorCode::Refused, e.to_string()),
        }
    }

    pub(super) async fn sync_status(&self, peer: &str, id: &str) -> Response {
        let m = match self.replica_migration(peer, id, &[Phase::Syncing]) {
            Ok(m) => m,
            Err(r) => return r,
        };
        let progress = match self.replica_call(&m) {
            Ok((about, service)) => service.sync_progress(about).await,
            Err(e) => Err(e),
        };
        match progress {
            Ok(p) => {
                let info = SyncInfo {
                    bytes: p.bytes,
                    lag: p.lag,
                    in_sync: p.in_sync,
                    detail: p.detail,
                };
                let _ = self.update(id, |m| {
                    m.bytes_moved = info.bytes;
                    m.sync = Some(info.clone());
                });
                Response::Sync(info)
            }
            Err(e) => Response::error(ErrorCode::Internal, e.to_string()),
        }
    }

    /// The switch, while the source holds its clients: the service adapter catches the
    /// replica up and promotes it; the adopted record is the confirmation.
    pub(super) async fn promote(&self, peer: &str, id: &str, mark: String) -> Response {
        let m = match self.incoming(peer, id) {
            Some(m) if m.phase == Phase::Completed => {
                return match self.workloads.get(&m.workload).and_then(|w| w.pid) {
                    Some(pid) => Response::Restored {
                        pid,
                        restore_ms: m.timings.restore_ms.unwrap_or(0),
                    },
                    None => Response::error(ErrorCode::Internal, "promoted workload vanished"),
                }
            }
            _ => match self.replica_migration(peer, id, &[Phase::Syncing]) {
                Ok(m) => m,
                Err(r) => return r,
            },
        };
        if let Err(e) = self
            .faults
            .enter(Role::Target, Phase::Restoring, &self.cancel)
            .await
        {
            let reason = e.to_string();
            self.discard_replica(id).await;
            return Response::error(ErrorCode::RestoreFailed, reason);
        }
        if let Err(e) = self.set_phase(id, Phase::Restoring) {
            return Response::error(ErrorCode::Internal, e.to_string());
        }
        let started = Instant::now();
        let promoted = match self.replica_call(&m) {
            Ok((about, service)) => service.cut_over(about, mark).await,
            Err(e) => Err(e),
        };
        if let Err(e) = promoted {
            let reason = format!("promotion failed: {e}");
            tracing::warn!(migration = id, error = %reason, "replica not promoted");
            self.discard_replica(id).await;
            return Response::error(ErrorCode::RestoreFailed, reason);
        }
        let Some(pid) = m
            .replica_pid
            .filter(|p| m.replica_pid_start.is_some_and(|s| process::alive(*p, s)))
        else {
            let reason = "the promoted replica's process is gone".to_string();
            self.discard_replica(id).await;
            return Response::error(ErrorCode::RestoreFailed, reason);
        };
        if let Err(e) = self.ingress.open(&m.spec).await {
            // The move stands: clients can still come through the source site's tunnel.
            tracing::warn!(migration = id, error = %e, "cannot open the workload's routes here");
        }
        let placement = self.workloads.placement_of(&m.workload);
        let waiter = match locked(&self.holders).remove(id) {
            Some(holder) => Waiter::Holder(holder),
            None => Waiter::Pid,
        };
        let w = self.workloads.record(
            &m.spec,
            &placement,
            Some(pid),
            Some(Origin {
                site: peer.to_string(),
                migration: id.to_string(),
            }),
        );
        if let Err(e) = self.workloads.insert_running(&w, waiter) {
            let reason = e.to_string();
            self.discard_replica(id).await;
            return Response::error(ErrorCode::RestoreFailed, reason);
        }
        let restore_ms = super::ms(started.elapsed());
        if let Err(e) = self.update(id, |m| {
            m.phase = Phase::Completed;
            m.timings.restore_ms = Some(restore_ms);
        }) {
            tracing::error!(error = %e, "promoted, but cannot journal the migration's end");
        }
        self.ingress.close_tunnels(id);
        remove_dir(&self.incoming_dir.join(id));
        tracing::info!(migration = id, pid, restore_ms, "replica promoted");
        Response::Restored { pid, restore_ms }
    }

    /// Ends a replica that will not be promoted: its service adapter stops the sync, its
    /// runtime adapter removes it, and its process is killed if it is still there; then the
    /// migration is recorded as rolled back here.
    pub(super) async fn discard_replica(&self, id: &str) {
        let Some(m) = self.get(id) else { return };
        if let Ok((about, service)) = self.replica_call(&m) {
            if let Err(e) = service.abort_sync(about.clone()).await {
                tracing::warn!(migration = id, error = %e, "service adapter could not stop the sync");
            }
            match self.plugins.adapter(&m.spec.runtime) {
                Ok(runtime) => {
                    if let Err(e) = runtime.release_source(about).await {
                        tracing::warn!(migration = id, error = %e, "runtime adapter could not remove the replica");
                    }
                }
                Err(e) => {
                    tracing::warn!(migration = id, error = %e, "no runtime adapter to remove the replica");
                }
            }
        }
        kill_replica(&m);
        if let Some(mut holder) = locked(&self.holders).remove(id) {
            let _ = holder.start_kill();
        }
        self.ingress.close_tunnels(id);
        if !m.phase.is_terminal() {
            self.abort_local(id, &m.workload, "the replica was discarded");
        }
        tracing::info!(migration = id, "replica discarded");
    }

    /// After a restart: a replica the journal names but no workload adopted is discarded.
    pub(super) fn recover_replica(self: &std::sync::Arc<Self>, m: &Migration) -> bool {
        if m.service.is_none() {
            return false;
        }
        let adopted = self.workloads.get(&m.workload).filter(|w: &Workload| {
            w.restored_from.as_ref().map(|o| o.migration.as_str()) == Some(m.id.as_str())
        });
        if adopted.is_some() {
            return false;
        }
        kill_replica(m);
        let this = std::sync::Arc::clone(self);
        let id = m.id.clone();
        self.tasks
            .spawn(async move { this.discard_replica(&id).await });
        true
    }
}

/// Kills the replica's process if it is still that very process.
fn kill_replica(m: &Migration) {
    if let (Some(pid), Some(start)) = (m.replica_pid, m.replica_pid_start) {
        if process::alive(pid, start) {
            process::kill(pid);
        }
    }
}
