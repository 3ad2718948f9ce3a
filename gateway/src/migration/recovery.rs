//! After a restart: load every journaled migration and bring the unfinished ones to an
//! end that keeps the service at exactly one site.

use std::sync::Arc;

use super::source::{self, Verdict};
use super::{Engine, Migration, MigrationError, Phase, Role};
use crate::criu::layout;
use crate::journal::Collection;
use crate::sys::process;

/// How long recovery waits for a `criu dump` the old gateway left running.
const DUMP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits for the CRIU dumps of `pid`'s tree to end; a lazy one (it never ends by itself)
/// or one past [`DUMP_WAIT`] is killed.
async fn end_dumps_of(pid: i32) {
    let deadline = std::time::Instant::now() + DUMP_WAIT;
    loop {
        let dumps = crate::criu::dumps_of(pid);
        if dumps.is_empty() {
            return;
        }
        let late = std::time::Instant::now() > deadline;
        for (dump, lazy) in &dumps {
            if *lazy || late {
                tracing::warn!(
                    dump,
                    lazy,
                    "ending a CRIU dump the previous gateway left running"
                );
                process::kill(*dump);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

impl Engine {
    /// Loads the journal and finishes or rolls back what was under way. Source migrations
    /// that need the destination's word continue in the background.
    pub fn recover(self: &Arc<Self>) -> Result<(), MigrationError> {
        let all: Vec<Migration> = self.journal.load_all(Collection::Migrations)?;
        let mut before_peers = Vec::new();
        for m in all {
            let id = m.id.clone();
            let unfinished = !m.phase.is_terminal();
            let role = m.role;
            self.migrations.insert(id.clone(), m);
            if !unfinished {
                continue;
            }
            tracing::info!(migration = %id, ?role, "recovering an unfinished migration");
            match role {
                Role::Target => before_peers.extend(self.recover_target(&id)),
                Role::Source => {
                    let this = Arc::clone(self);
                    self.tasks.spawn(tracing::Instrument::instrument(
                        async move { this.recover_source(&id).await },
                        tracing::info_span!("recovery", role = "source"),
                    ));
                }
            }
        }
        let this = Arc::clone(self);
        self.tasks
            .spawn(async move { this.reconcile_workloads().await });
        self.expire_reservations();
        // Peers get answers once interrupted restores here are ended.
        let this = Arc::clone(self);
        self.tasks.spawn(async move {
            for task in before_peers {
                let _ = task.await;
            }
            this.recovered.send_replace(true);
        });
        Ok(())
    }

    /// A workload held by a migration the journal does not know (the gateway stopped
    /// between the two writes that start a migration) was never frozen: release the hold.
    /// One held by a finished migration gets that migration's outcome.
    async fn reconcile_workloads(&self) {
        for w in self.workloads.list() {
            let Some(mid) = w.migration.as_deref() else {
                continue;
            };
            let outcome = match self.get(mid) {
                Some(m) if !m.phase.is_terminal() => continue,
                Some(m) if m.phase == Phase::Completed => self.release_source(&w.spec.name).await,
                _ => self.resume_source(&w.spec.name).await,
            };
            tracing::warn!(workload = %w.spec.name, migration = mid, "released a workload held by a finished or unknown migration");
            if let Err(e) = outcome {
                tracing::error!(workload = %w.spec.name, error = %e, "cannot release the workload");
            }
        }
    }

    fn recover_target(self: &Arc<Self>, id: &str) -> Option<tokio::task::JoinHandle<()>> {
        let m = self.get(id)?;
        if m.phase == Phase::Paging {
            self.recover_paging(id);
            return None;
        }
        let adopted = self
            .workloads
            .get(&m.workload)
            .filter(|w| w.restored_from.as_ref().map(|o| o.migration.as_str()) == Some(id));
        if m.phase == Phase::Restoring && adopted.is_some() {
            // The workload was journaled before the crash: that was the confirmation.
            if let Err(e) = self.update(id, |m| {
                m.phase = Phase::Completed;
                m.received.clear();
            }) {
                tracing::error!(migration = id, error = %e, "cannot journal the recovered restore");
            }
            super::remove_dir(&self.incoming_dir.join(id));
            return None;
        }
        if self.recover_replica(&m) {
            // A service-level replica never promoted: discarded in the background.
            return None;
        }
        if m.phase != Phase::Restoring {
            self.abort_local(
                id,
                &m.workload,
                "the destination gateway restarted before confirming",
            );
            return None;
        }
        // A restore interrupted by the crash may have left a copy running, whether or not
        // it wrote its pidfile: its cgroup and the adapter's own handle (a container by
        // name) end it, the pidfile's pid too. Peers hear nothing before that is done.
        let (this, id) = (Arc::clone(self), id.to_string());
        Some(tokio::spawn(async move {
            let pidfile = this.incoming_dir.join(&id).join(layout::RESTORE_PIDFILE);
            if let Some(pid) = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
            {
                if process::start_time(pid).is_some() {
                    process::kill(pid);
                }
            }
            if let Some(reserved) = this.workloads.get(&m.workload) {
                match this.plugins.adapter(&reserved.spec.runtime) {
                    Ok(adapter) => this.discard_by_name(&adapter, &reserved).await,
                    Err(_) => {
                        if let Some(cg) = &reserved.cgroup {
                            process::kill_cgroup(cg);
                        }
                    }
                }
            }
            this.abort_local(
                &id,
                &m.workload,
                "the destination gateway restarted before confirming",
            );
        }))
    }

    async fn recover_source(self: Arc<Self>, id: &str) {
        let Some(m) = self.get(id) else { return };
        if matches!(m.phase, Phase::Checkpointing | Phase::Transferring) {
            // A dump the old gateway started may still be running on the tree: nothing
            // is decided until it has ended (a late `--leave-stopped` would stop a
            // source already resumed).
            if let Some(pid) = self.workloads.get(&m.workload).and_then(|w| w.pid) {
                end_dumps_of(pid).await;
            }
        }
        if m.phase == Phase::Paging {
            // Post-copy after the confirmation: the page path went with the old gateway.
            // Only the destination can say how it ended: with every page (the source
            // goes) or with its copy stopped (the source resumes; if the lazy dump
            // already let it go, it runs on).
            let outcome = match self.page_phase(id).await {
                Ok(super::postcopy::Paged::Complete) => source::cut_over(&self, id, None).await,
                Ok(super::postcopy::Paged::DestinationLost(reason)) => {
                    source::finish_rollback(&self, id, &m.workload, reason).await;
                    Ok(())
                }
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                tracing::error!(migration = id, error = %e, "recovered page phase failed");
            }
            return;
        }
        let verdict = match m.phase {
            Phase::CuttingOver => Verdict::Confirmed,
            _ if m.restore_requested => source::resolve(&self, id, &m.target).await,
            _ => Verdict::NotRestored,
        };
        match verdict {
            Verdict::Confirmed => {
                if let Err(e) = source::cut_over(&self, id, None).await {
                    tracing::error!(migration = id, error = %e, "recovered cut-over failed");
                }
            }
            Verdict::NotRestored => {
                let reason = m
                    .error
                    .clone()
                    .unwrap_or_else(|| "the source gateway restarted during the migration".into());
                source::finish_rollback(&self, id, &m.workload, reason).await;
                if !m.restore_requested {
                    source::tell_abort(&self, &m.target, id).await;
                }
            }
            Verdict::Pending => {}
        }
    }
}
