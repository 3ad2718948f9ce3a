//! `legacy` adapter, for the sandbox tests only: written against the frozen
//! `ferry:adapter@0.1.0` (`wit/ferry-adapter@0.1.0`) with plain wit-bindgen, as a third
//! party's adapter from before 0.2.0 would be, so the tests prove a gateway still loads
//! and serves it. It serves runtime `legacy`: `describe`, `probe`, and a `start-fresh`
//! through the host's `process.spawn`, whose 0.1.0 errors are strings with a "denied:"
//! prefix for refusals.

wit_bindgen::generate!({
    path: "../../wit/ferry-adapter@0.1.0",
    world: "runtime-adapter",
});

use exports::ferry::adapter::runtime::Guest;
use ferry::adapter::process;
use ferry::adapter::types::{AdapterError, AdapterInfo, Approach, Notes, Plan, Workload};

struct Legacy;

/// How 0.1.0 adapters read a host error: the host prefixes refusals with "denied:".
fn host_error(message: String) -> AdapterError {
    match message.strip_prefix("denied:") {
        Some(rest) => AdapterError::Denied(rest.trim().to_string()),
        None => AdapterError::Failed(message),
    }
}

fn unsupported(call: &str) -> AdapterError {
    AdapterError::Unsupported(format!("the legacy test adapter does not implement {call}"))
}

impl Guest for Legacy {
    fn describe() -> AdapterInfo {
        AdapterInfo {
            name: "legacy".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            approaches: vec![Approach::Container],
            runtimes: vec!["legacy".into()],
        }
    }

    fn probe(w: Workload) -> Plan {
        Plan {
            feasible: true,
            approach: Some(Approach::Container),
            reason: format!(
                "legacy adapter would move {} to {}",
                w.name,
                w.peer.as_deref().unwrap_or("nowhere")
            ),
            expected_downtime_ms: Some(7),
        }
    }

    fn prepare(_w: Workload) -> Result<(), AdapterError> {
        Ok(())
    }

    fn start_fresh(_w: Workload) -> Result<i32, AdapterError> {
        process::spawn().map_err(host_error)
    }

    fn checkpoint(_w: Workload) -> Result<Notes, AdapterError> {
        Err(unsupported("checkpoint"))
    }

    fn restore(_w: Workload, _notes: Notes) -> Result<i32, AdapterError> {
        Err(unsupported("restore"))
    }

    fn resume_source(_w: Workload) -> Result<Option<i32>, AdapterError> {
        Err(unsupported("resume-source"))
    }

    fn release_source(_w: Workload) -> Result<(), AdapterError> {
        Err(unsupported("release-source"))
    }
}

export!(Legacy);
