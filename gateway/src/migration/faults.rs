//! Fault injection at phase boundaries, the seam the in-process tests use to prove the
//! invariant: a step can fail, be delayed, or "crash" (the gateway stops right there and
//! a new one recovers from the journal). Empty in production: one map lookup per phase.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::{locked, MigrationError, Phase, Role};

/// What happens when a migration enters a phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The step fails with this message, as a real failure would.
    Fail(String),
    /// The step waits this long first.
    Delay(Duration),
    /// The gateway stops here: the source's driver ends without another step; the
    /// destination answers nothing until the engine is shut down. A new engine then
    /// recovers from the journal.
    Crash,
}

/// Faults by (role, phase entered).
#[derive(Debug, Default)]
pub struct Faults {
    table: Mutex<HashMap<(Role, Phase), Fault>>,
}

impl Faults {
    /// Adds a fault for `role` when it enters `phase`.
    pub fn at(self, role: Role, phase: Phase, fault: Fault) -> Self {
        locked(&self.table).insert((role, phase), fault);
        self
    }

    pub(super) fn replace(&self, other: Faults) {
        let other = other
            .table
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *locked(&self.table) = other;
    }

    /// Applies the fault set for entering `phase` as `role`, if any.
    pub(super) async fn enter(
        &self,
        role: Role,
        phase: Phase,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<(), MigrationError> {
        let fault = locked(&self.table).get(&(role, phase)).cloned();
        match fault {
            None => Ok(()),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(Fault::Fail(message)) => Err(MigrationError::Injected { phase, message }),
            Some(Fault::Crash) => {
                if role == Role::Target {
                    shutdown.cancelled().await;
                }
                Err(MigrationError::Crashed { phase })
            }
        }
    }
}
