//! After a restart: load every journaled migration and bring the unfinished ones to an
//! end that keeps the service at exactly one site.

use std::sync::Arc;

use super::source::{self, Verdict};
use super::{Engine, Migration, MigrationError, Phase, Role};
use crate::criu::layout;
use crate::journal::Collection;
use crate::sys::process;

impl Engine {
    /// Loads the journal and finishes or rolls back what was under way. Source migrations
    /// that need the destination's word continue in the background.
    pub fn recover(self: &Arc<Self>) -> Result<(), MigrationError> {
        let all: Vec<Migration> = self.journal.load_all(Collection::Migrations)?;
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
                Role::Target => self.recover_target(&id),
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
        // Peers get answers from here on.
        self.recovered.send_replace(true);
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

    fn recover_target(self: &Arc<Self>, id: &str) {
        let Some(m) = self.get(id) else { return };
        if m.phase == Phase::Paging {
            self.recover_paging(id);
            return;
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
            return;
        }
        if self.recover_replica(&m) {
            // A service-level replica never promoted: discarded in the background.
            return;
        }
        if m.phase == Phase::Restoring {
            // A restore interrupted by the crash may have left a tree running: end it.
            let pidfile = self.incoming_dir.join(id).join(layout::RESTORE_PIDFILE);
            if let Some(pid) = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
            {
                if process::start_time(pid).is_some() {
                    process::kill(pid);
                }
            }
        }
        self.abort_local(
            id,
            &m.workload,
            "the destination gateway restarted before confirming",
        );
    }

    async fn recover_source(self: Arc<Self>, id: &str) {
        let Some(m) = self.get(id) else { return };
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
