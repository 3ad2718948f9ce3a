//! `process` adapter: bare process trees the gateway starts in their own PID namespace,
//! checkpointed and restored with CRIU through the host's `criu` interface.

use ferry_adapter_sdk::*;

struct Process;

impl RuntimeAdapter for Process {
    fn describe() -> AdapterInfo {
        AdapterInfo {
            name: "process".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            approaches: vec![Approach::Container],
            runtimes: vec!["process".into()],
        }
    }

    fn probe(w: Workload) -> Plan {
        Plan {
            feasible: true,
            approach: Some(Approach::Container),
            reason: format!(
                "CRIU checkpoint of process tree {} (same executables needed at {})",
                w.name,
                w.peer.as_deref().unwrap_or("the destination")
            ),
            expected_downtime_ms: None,
        }
    }

    fn prepare(_w: Workload) -> Result<(), AdapterError> {
        Ok(())
    }

    fn start_fresh(_w: Workload) -> Result<i32, AdapterError> {
        process::spawn().map_err(host_error)
    }

    fn checkpoint(_w: Workload) -> Result<Notes, AdapterError> {
        let ms = criu::dump().map_err(host_error)?;
        Ok(vec![("dump-ms".into(), ms.to_string())])
    }

    fn restore(_w: Workload, _notes: Notes) -> Result<i32, AdapterError> {
        criu::restore().map_err(host_error)
    }

    fn resume_source(_w: Workload) -> Result<Option<i32>, AdapterError> {
        process::resume().map_err(host_error)?;
        Ok(None)
    }

    fn release_source(_w: Workload) -> Result<(), AdapterError> {
        process::kill().map_err(host_error)
    }
}

export_runtime_adapter!(Process with_types_in ferry_adapter_sdk);
