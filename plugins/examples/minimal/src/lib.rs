//! A minimal Ferry adapter: it serves runtime `my-runtime`, whose own CLI starts,
//! checkpoints, restores and removes workloads (`my-runtime start NAME` prints the pid).
//! It implements only what it supports; the SDK's defaults answer the rest (`prepare`
//! does nothing; `resume-source` is unsupported, so a migration that fails after the
//! checkpoint cannot resume the source until it is added).

use ferry_adapter_sdk::*;

struct Minimal;

const TIMEOUT_MS: u32 = 120_000;

/// The pid `my-runtime` prints for what it started or restored.
fn pid(out: exec::Output) -> Result<i32, AdapterError> {
    out.stdout
        .trim()
        .parse()
        .map_err(|_| AdapterError::Failed(format!("my-runtime printed no pid: {:?}", out.stdout)))
}

fn images(w: &Workload) -> Result<&str, AdapterError> {
    w.images_dir
        .as_deref()
        .ok_or_else(|| AdapterError::Failed("no image directory for this call".into()))
}

impl Adapter for Minimal {
    fn describe() -> AdapterInfo {
        AdapterInfo {
            name: "minimal".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            approaches: vec![Approach::Orchestrator],
            runtimes: vec!["my-runtime".into()],
        }
    }

    fn probe(w: Workload) -> Plan {
        Plan {
            feasible: true,
            approach: Some(Approach::Orchestrator),
            reason: format!("my-runtime checkpoint of {}", w.name),
            expected_downtime_ms: None,
        }
    }

    // `run` needs the exec capability and `my-runtime` on the site's allow-list; a host
    // refusal comes back as AdapterError::Denied through `?`.
    fn start_fresh(w: Workload) -> Result<i32, AdapterError> {
        pid(run("my-runtime", &["start", &w.name], TIMEOUT_MS)?)
    }

    fn checkpoint(w: Workload) -> Result<Notes, AdapterError> {
        let args = ["checkpoint", &w.name, "--to", images(&w)?];
        run("my-runtime", &args, TIMEOUT_MS)?;
        Ok(Vec::new())
    }

    fn restore(w: Workload, _notes: Notes) -> Result<i32, AdapterError> {
        let args = ["restore", &w.name, "--from", images(&w)?];
        pid(run("my-runtime", &args, TIMEOUT_MS)?)
    }

    fn release_source(w: Workload) -> Result<(), AdapterError> {
        run("my-runtime", &["rm", &w.name], TIMEOUT_MS).map(|_| ())
    }
}

export_adapter!(Minimal);
