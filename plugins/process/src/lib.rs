//! `process` adapter: bare process trees the gateway starts in their own PID namespace,
//! checkpointed and restored with CRIU through the host's `criu` interface.

use ferry_adapter_sdk::*;

struct Process;

impl Adapter for Process {
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

    fn start_fresh(_w: Workload) -> Result<i32, AdapterError> {
        Ok(process::spawn()?)
    }

    fn checkpoint(_w: Workload) -> Result<Notes, AdapterError> {
        let ms = criu::dump()?;
        Ok(vec![("dump-ms".into(), ms.to_string())])
    }

    fn restore(_w: Workload, _notes: Notes) -> Result<i32, AdapterError> {
        Ok(criu::restore()?)
    }

    fn resume_source(_w: Workload) -> Result<Option<i32>, AdapterError> {
        process::resume()?;
        Ok(None)
    }

    fn release_source(_w: Workload) -> Result<(), AdapterError> {
        Ok(process::kill()?)
    }
}

export_adapter!(Process);
