//! The one place where errors become HTTP responses.

use hyper::StatusCode;

use super::types::ErrorBody;
use crate::checkpoint::CheckpointError;
use crate::migration::MigrationError;
use crate::workload::WorkloadError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code.to_string(),
            message: self.message.clone(),
        }
    }
}

impl From<WorkloadError> for ApiError {
    fn from(e: WorkloadError) -> Self {
        use WorkloadError as W;
        let (status, code) = match &e {
            W::Spec(_) => (StatusCode::BAD_REQUEST, "invalid_workload"),
            W::Exists(_) => (StatusCode::CONFLICT, "workload_exists"),
            W::NotFound(_) => (StatusCode::NOT_FOUND, "workload_not_found"),
            W::Busy { .. } | W::Changed(_) => (StatusCode::CONFLICT, "workload_busy"),
            W::NotRunning { .. } => (StatusCode::CONFLICT, "workload_not_running"),
            W::PortInUse(_) | W::Route(_) => (StatusCode::CONFLICT, "port_in_use"),
            W::Spawn(_) | W::NotHealthy { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "workload_failed_to_start")
            }
            W::Adapter(crate::plugins::PluginError::NoAdapter { .. }) => {
                (StatusCode::BAD_REQUEST, "no_adapter")
            }
            W::Adapter(_) => (StatusCode::UNPROCESSABLE_ENTITY, "adapter_failed"),
            W::Io { .. } | W::Journal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<CheckpointError> for ApiError {
    fn from(e: CheckpointError) -> Self {
        use CheckpointError as C;
        let e = match e {
            C::Workload(w) => return w.into(),
            other => other,
        };
        let (status, code) = match &e {
            C::Workload(_) | C::Store(_) | C::Journal(_) | C::Io { .. } | C::Replication(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
            C::NoSuchCheckpoint { .. } => (StatusCode::NOT_FOUND, "checkpoint_not_found"),
            C::Running(_) => (StatusCode::CONFLICT, "workload_running"),
            C::SiteAnswers(_) => (StatusCode::CONFLICT, "site_answers"),
            C::Checkpoint { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "checkpoint_failed"),
            C::Restore { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "restore_failed"),
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<crate::restart::RestartError> for ApiError {
    fn from(e: crate::restart::RestartError) -> Self {
        use crate::restart::RestartError as R;
        match e {
            R::Workload(w) => w.into(),
            R::Checkpoint(c) => c.into(),
            R::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "workload_not_found", e.to_string()),
            R::NotStopped { .. } => {
                Self::new(StatusCode::CONFLICT, "workload_not_stopped", e.to_string())
            }
        }
    }
}

impl From<MigrationError> for ApiError {
    fn from(e: MigrationError) -> Self {
        use MigrationError as M;
        match e {
            M::Workload(w) => w.into(),
            M::UnknownSite(_) => Self::new(StatusCode::BAD_REQUEST, "unknown_site", e.to_string()),
            M::SameSite => Self::new(StatusCode::BAD_REQUEST, "same_site", e.to_string()),
            M::NotFound(_) => {
                Self::new(StatusCode::NOT_FOUND, "migration_not_found", e.to_string())
            }
            M::CannotAbort { .. } => Self::new(StatusCode::CONFLICT, "cannot_abort", e.to_string()),
            M::NotReleased { .. } => {
                Self::new(StatusCode::CONFLICT, "workload_not_released", e.to_string())
            }
            M::Incompatible { .. } => Self::new(
                StatusCode::CONFLICT,
                "incompatible_destination",
                e.to_string(),
            ),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        }
    }
}
