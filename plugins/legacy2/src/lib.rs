//! `legacy2` adapter, for the sandbox tests only: written against the frozen
//! `ferry:adapter@0.2.0` (`wit/ferry-adapter@0.2.0`) with plain wit-bindgen, as a third
//! party's adapter from before 0.3.0 would be, so the tests prove a gateway still loads
//! and serves it. It serves runtime `legacy2`: `describe`, `probe`, and a `start-fresh`
//! that runs `true` through the host's `exec.run`, whose typed `host-error` it passes on.

wit_bindgen::generate!({
    path: "../../wit/ferry-adapter@0.2.0",
    world: "runtime-adapter",
});

use exports::ferry::adapter::runtime::Guest;
use ferry::adapter::exec;
use ferry::adapter::types::{
    AdapterError, AdapterInfo, Approach, HostError, Notes, Plan, Workload,
};

struct Legacy2;

fn host_error(e: HostError) -> AdapterError {
    match e {
        HostError::Denied(d) => AdapterError::Denied(d),
        HostError::Failed(d) | HostError::Invalid(d) => AdapterError::Failed(d),
    }
}

fn unsupported(call: &str) -> AdapterError {
    AdapterError::Unsupported(format!(
        "the legacy2 test adapter does not implement {call}"
    ))
}

impl Guest for Legacy2 {
    fn describe() -> AdapterInfo {
        AdapterInfo {
            name: "legacy2".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            approaches: vec![Approach::Container],
            runtimes: vec!["legacy2".into()],
        }
    }

    fn probe(w: Workload) -> Plan {
        Plan {
            feasible: true,
            approach: Some(Approach::Container),
            reason: format!(
                "legacy2 adapter would move {} to {}",
                w.name,
                w.peer.as_deref().unwrap_or("nowhere")
            ),
            expected_downtime_ms: Some(9),
        }
    }

    fn prepare(_w: Workload) -> Result<(), AdapterError> {
        Ok(())
    }

    fn start_fresh(_w: Workload) -> Result<i32, AdapterError> {
        let out = exec::run(&exec::Command {
            program: "true".into(),
            args: Vec::new(),
            env: Vec::new(),
            timeout_ms: 5_000,
            output: exec::OutputMode::Capture,
        })
        .map_err(host_error)?;
        Ok(out.status)
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

export!(Legacy2);
