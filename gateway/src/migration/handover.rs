//! The hand-over of workloads between the registry and migrations: a source workload is
//! held (and later resumed or released), a destination name is reserved (and later
//! adopted or dropped). Each step is one journaled change of the workload's record.

use super::Engine;
use crate::plugins::AdapterCall;
use crate::spec::{Origin, Placement, Workload, WorkloadSpec, WorkloadState};
use crate::sys::process;
use crate::workload::{Waiter, WorkloadError};

impl Engine {
    /// Hands a running workload to migration `id`.
    pub(super) fn hold_workload(&self, name: &str, id: &str) -> Result<Workload, WorkloadError> {
        self.workloads.hold(name, id, true)
    }

    /// Drops a migration's hold on a workload that was never frozen.
    pub(super) fn unhold_workload(&self, name: &str) {
        let released = self.workloads.modify(name, |w| {
            w.migration = None;
            w.state = WorkloadState::Running;
            Ok(())
        });
        if let Err(e) = released {
            tracing::error!(workload = %name, error = %e, "cannot journal the released hold");
        }
    }

    /// Rollback: the migration failed; the adapter resumes the (possibly frozen) source.
    /// If it cannot, the gateway resumes the tree itself: a rolled-back source must run.
    pub(super) async fn resume_source(&self, name: &str) -> Result<(), WorkloadError> {
        let w = self
            .workloads
            .get(name)
            .ok_or_else(|| WorkloadError::NotFound(name.to_string()))?;
        // The adapter is asked even if the old process is gone: resuming may start a new
        // one (a local restore of the checkpoint it kept).
        let outcome = match self.plugins.adapter(&w.spec.runtime) {
            Ok(a) => a.resume_source(AdapterCall::for_workload(&w)).await,
            Err(e) => Err(e),
        };
        let (mut pid, mut pid_start) = (w.pid, w.pid_start);
        match outcome {
            Ok(Some(new_pid)) => {
                pid = Some(new_pid);
                pid_start = process::start_time(new_pid);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(workload = %name, error = %e, "adapter could not resume the source; resuming its tree");
            }
        }
        if let Some(p) = pid.filter(|p| process::state(*p) == Some('T')) {
            process::resume(p);
        }
        let alive = matches!((pid, pid_start), (Some(p), Some(s)) if process::alive(p, s));
        // The tree runs again whether or not the journal can say so.
        self.workloads.modify_even_unjournaled(name, |next| {
            next.migration = None;
            next.pid = pid;
            next.pid_start = pid_start;
            next.state = if alive {
                WorkloadState::Running
            } else {
                WorkloadState::Exited
            };
            Ok(())
        })?;
        if let (true, Some(p)) = (alive, pid) {
            if pid != w.pid {
                self.workloads.watch(name.to_string(), p, Waiter::Pid);
            }
            tracing::info!(workload = %name, pid = p, "source resumed");
        }
        Ok(())
    }

    /// Success: the destination runs the workload; end the source for good.
    pub(super) async fn release_source(&self, name: &str) -> Result<(), WorkloadError> {
        let Some(w) = self.workloads.get(name) else {
            return Ok(());
        };
        // Stopped before its record goes: a crash in between leaves a record (held by
        // the migration, so its exit is not recorded) that the restarted gateway releases
        // again, never a frozen source no record names, holding its port for ever.
        self.workloads.stop(&w).await;
        self.workloads.forget(name)?;
        tracing::info!(workload = %name, "source released");
        Ok(())
    }

    /// Reserves a name for an incoming restore (so nothing else takes it meanwhile).
    pub(super) fn reserve_incoming(&self, spec: &WorkloadSpec) -> Result<Placement, WorkloadError> {
        self.workloads.check_free(spec)?;
        let placement = self.workloads.place(&spec.name)?;
        self.workloads.reserve(spec, &placement)?;
        Ok(placement)
    }

    /// Drops a reservation made by [`Self::reserve_incoming`] if nothing was adopted.
    pub(super) fn release_incoming(&self, name: &str) {
        self.workloads.unreserve(name);
    }

    /// Registers a tree restored on this site by a migration, once it is healthy: this
    /// journaled record is the destination's confirmation.
    pub(super) fn adopt(
        &self,
        spec: &WorkloadSpec,
        placement: &Placement,
        pid: i32,
        origin: Origin,
    ) -> Result<Workload, WorkloadError> {
        let w = self
            .workloads
            .record(spec, placement, Some(pid), Some(origin));
        self.workloads.insert_running(&w, Waiter::Pid)?;
        Ok(w)
    }
}
