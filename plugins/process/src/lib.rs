//! `process` adapter: bare process trees the gateway starts in their own PID namespace,
//! checkpointed and restored with CRIU through the host's `criu` interface.
//!
//! Its workload hooks (`ferry:hooks`) run what the workload's settings name:
//! `--setting post-checkpoint="PROGRAM ARGS…"` after each checkpoint and
//! `--setting pre-restore="PROGRAM ARGS…"` before each restore, with `{workload}`, `{site}`
//! and `{id}` filled in. They run through `exec`, so only programs the site's grant allows
//! (`[plugins.grants.process] exec = [...]`); a pre-restore program that fails refuses the
//! restore.

use ferry_adapter_sdk::hooks::{About, Hooks};
use ferry_adapter_sdk::service::reason;
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

/// How long a hook program may run.
const HOOK_MS: u32 = 30_000;

impl Hooks for Process {
    fn post_checkpoint(about: About) -> Result<(), String> {
        run_setting(&about, "post-checkpoint")
    }

    fn pre_restore(about: About) -> Result<(), String> {
        run_setting(&about, "pre-restore")
    }
}

/// Runs the program setting `key` names, if it names one.
fn run_setting(about: &About, key: &str) -> Result<(), String> {
    let Some(line) = setting_in(&about.settings, key) else {
        return Ok(());
    };
    let fill = |w: &str| {
        w.replace("{workload}", &about.workload)
            .replace("{site}", &about.site)
            .replace("{id}", &about.id)
    };
    let words: Vec<String> = line.split_whitespace().map(fill).collect();
    let Some((program, args)) = words.split_first() else {
        return Ok(());
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(program, &args, HOOK_MS)
        .map(|_| info(&format!("{key} hook {program} ran for {}", about.workload)))
        .map_err(|e| format!("{key} hook of workload {}: {}", about.workload, reason(e)))
}

export_adapter!(Process);
ferry_adapter_sdk::export_hooks!(Process);
