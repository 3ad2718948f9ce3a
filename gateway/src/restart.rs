//! Restart policies: when a workload's process ends unasked, its policy (`--restart`)
//! says whether it comes back, and a decider says how: restored from its newest
//! checkpoint, started fresh, or left in standby (its image kept, nothing running, until
//! `ferry workload start`). The built-in decider is [`default_action`]; a workload can
//! name a decider plugin instead. Crash loops back off: each restart within a minute of
//! the previous start waits twice as long (1 s, 2 s, … at most 60 s).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::checkpoint::{CheckpointError, Checkpoints};
use crate::plugins::PluginHost;
use crate::spec::{now_ms, RestartWhen, Workload, WorkloadState};
use crate::workload::{Exit, WorkloadError, Workloads};

pub use crate::spec::{ExitInfo, RestartAction as Action};

/// Does the policy bring this end back at all?
pub fn applies(when: RestartWhen, info: &ExitInfo) -> bool {
    match when {
        RestartWhen::Never => false,
        RestartWhen::OnFailure => !info.clean(),
        RestartWhen::Always => true,
    }
}

/// The built-in decider. A process a signal ended (the OOM killer, a crash, SIGKILL)
/// lost its memory without meaning to: its newest checkpoint is the best state there is.
/// One that exited failing may have failed on its own state: it starts fresh. One that
/// exited cleanly meant to: it waits in standby. (FastMig's defaults differ on the first
/// and last: restore on a clean exit, standby on a signal.)
pub fn default_action(info: &ExitInfo) -> Action {
    if info.signal.is_some() {
        Action::Restore
    } else if info.clean() {
        Action::Standby
    } else {
        Action::Fresh
    }
}

/// How long the `restarts`-th restart in a row waits.
pub fn backoff(restarts: u32) -> Duration {
    Duration::from_secs(1u64 << restarts.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// A start that ran this long resets the crash-loop count.
const STABLE: Duration = Duration::from_secs(60);

/// Watches workloads' ends and applies their restart policies.
pub struct Supervisor {
    workloads: Arc<Workloads>,
    checkpoints: Arc<Checkpoints>,
    /// Hosts the decider plugins a policy may name.
    plugins: Arc<PluginHost>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("workload {0:?} not found on this site")]
    NotFound(String),
    #[error("workload {name:?} is {state}; only an exited or standby workload is started")]
    NotStopped { name: String, state: WorkloadState },
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

impl Supervisor {
    pub fn new(
        workloads: Arc<Workloads>,
        checkpoints: Arc<Checkpoints>,
        plugins: Arc<PluginHost>,
    ) -> Arc<Self> {
        Arc::new(Self {
            workloads,
            checkpoints,
            plugins,
        })
    }

    /// Follows the registry's exits until `cancel`.
    pub fn start(self: &Arc<Self>, cancel: CancellationToken) {
        let mut exits = self.workloads.exits();
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let exit = tokio::select! {
                    () = cancel.cancelled() => return,
                    e = exits.recv() => e,
                };
                match exit {
                    Ok(exit) => {
                        let (me, c) = (Arc::clone(&this), cancel.clone());
                        tokio::spawn(async move { me.ended(exit, c).await });
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "restart supervisor missed workload exits");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    async fn ended(&self, exit: Exit, cancel: CancellationToken) {
        let Some(w) = self.workloads.get(&exit.name) else {
            return;
        };
        let Some(policy) = w.spec.restart.clone() else {
            return;
        };
        let ran = Duration::from_millis(now_ms().saturating_sub(w.started_at_ms));
        let restarts = if ran >= STABLE { 0 } else { w.restarts } + 1;
        let age = self.checkpoints.list(&exit.name).ok().and_then(|l| {
            l.last()
                .map(|c| now_ms().saturating_sub(c.created_at_ms) / 1000)
        });
        let info = ExitInfo::from_code(exit.code, restarts - 1, age);
        if !applies(policy.when, &info) {
            return;
        }
        let action = match &policy.decider {
            Some(name) => match self.plugins.decide_restart(name, &info).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(workload = %exit.name, decider = %name, error = %e, "the decider failed; the built-in one decides");
                    default_action(&info)
                }
            },
            None => default_action(&info),
        };
        let wait = if action == Action::Standby {
            Duration::ZERO
        } else {
            backoff(restarts)
        };
        tracing::info!(workload = %exit.name, ?action, exit_code = ?info.exit_code, signal = ?info.signal, restarts, wait_ms = wait.as_millis() as u64, "restart policy applies");
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        // Someone else acted meanwhile (removed, restored, moved it): leave it.
        let still = self
            .workloads
            .get(&exit.name)
            .is_some_and(|now| now.state == WorkloadState::Exited && now.pid == Some(exit.pid));
        if !still {
            return;
        }
        match self.apply(&w, action).await {
            Ok(()) => {
                let counted = self.workloads.modify(&exit.name, |w| {
                    w.restarts = restarts;
                    Ok(())
                });
                if let Err(e) = counted {
                    tracing::warn!(workload = %exit.name, error = %e, "cannot record the restart count");
                }
            }
            Err(e) => {
                tracing::error!(workload = %exit.name, ?action, error = %e, "restart failed; the workload stays stopped");
            }
        }
    }

    async fn apply(&self, w: &Workload, action: Action) -> Result<(), RestartError> {
        let name = w.spec.name.as_str();
        match action {
            Action::Standby => {
                self.workloads.standby(name)?;
                Ok(())
            }
            Action::Restore => match self.checkpoints.restore(name, None, true).await {
                Err(CheckpointError::NoSuchCheckpoint { .. }) => {
                    tracing::info!(
                        workload = name,
                        "no checkpoint to restore; starting it fresh"
                    );
                    self.fresh(w).await
                }
                other => other.map(|_| ()).map_err(Into::into),
            },
            Action::Fresh => self.fresh(w).await,
        }
    }

    async fn fresh(&self, w: &Workload) -> Result<(), RestartError> {
        crate::checkpoint::remove_for_restart(&self.workloads, &w.spec.name).await?;
        self.workloads.run(w.spec.clone()).await?;
        Ok(())
    }

    /// `ferry workload start NAME`: an exited or standby workload comes back, from its
    /// newest checkpoint if it has one, else fresh.
    pub async fn start_stopped(&self, name: &str) -> Result<Workload, RestartError> {
        let w = self
            .workloads
            .get(name)
            .ok_or_else(|| RestartError::NotFound(name.to_string()))?;
        if !matches!(w.state, WorkloadState::Exited | WorkloadState::Standby)
            || w.migration.is_some()
        {
            return Err(RestartError::NotStopped {
                name: name.to_string(),
                state: w.state,
            });
        }
        self.apply(&w, Action::Restore).await?;
        self.workloads
            .get(name)
            .ok_or_else(|| RestartError::NotFound(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_decider_restores_crashes_restarts_failures_and_keeps_clean_exits() {
        let killed = ExitInfo::from_code(Some(137), 0, Some(5));
        assert_eq!(killed.signal, Some(9));
        assert_eq!(default_action(&killed), Action::Restore);
        assert_eq!(
            default_action(&ExitInfo::from_code(Some(1), 0, None)),
            Action::Fresh
        );
        assert_eq!(
            default_action(&ExitInfo::from_code(Some(0), 0, None)),
            Action::Standby
        );
        assert!(!applies(
            RestartWhen::OnFailure,
            &ExitInfo::from_code(Some(0), 0, None)
        ));
        assert!(applies(RestartWhen::OnFailure, &killed));
        assert!(!applies(RestartWhen::Never, &killed));
    }

    #[test]
    fn crash_loops_back_off_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
