//! Guest SDK for Ferry adapters: the bindings of the `ferry:adapter` WIT package, the
//! macro that exports an adapter, and helpers for what every adapter does.
//!
//! ```ignore
//! use ferry_adapter_sdk::*;
//! struct MyAdapter;
//! impl RuntimeAdapter for MyAdapter { /* … */ }
//! export_runtime_adapter!(MyAdapter with_types_in ferry_adapter_sdk);
//! ```

wit_bindgen::generate!({
    path: "../../wit",
    world: "runtime-adapter",
    pub_export_macro: true,
    export_macro_name: "export_runtime_adapter",
    default_bindings_module: "ferry_adapter_sdk",
});

pub use exports::ferry::adapter::runtime::Guest as RuntimeAdapter;
pub use ferry::adapter::types::{AdapterError, AdapterInfo, Approach, Notes, Plan, Workload};
pub use ferry::adapter::{criu, exec, log, process};

/// Maps a host error string to the adapter error the engine acts on: the host prefixes
/// refused capabilities with "denied:".
pub fn host_error(message: String) -> AdapterError {
    match message.strip_prefix("denied:") {
        Some(rest) => AdapterError::Denied(rest.trim().to_string()),
        None => AdapterError::Failed(message),
    }
}

/// A runtime-specific setting of the workload.
pub fn setting<'a>(w: &'a Workload, key: &str) -> Option<&'a str> {
    w.settings
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Runs an allowed program; a non-zero exit is a failure carrying its stderr tail.
pub fn run(program: &str, args: &[&str], timeout_ms: u32) -> Result<exec::Output, AdapterError> {
    run_with(program, args, timeout_ms, exec::OutputMode::Capture)
}

/// Runs an allowed program whose stdout and stderr go to the workload's log (for
/// programs that start the workload and leave it running, like `runc run -d`).
pub fn run_into_log(program: &str, args: &[&str], timeout_ms: u32) -> Result<exec::Output, AdapterError> {
    run_with(program, args, timeout_ms, exec::OutputMode::WorkloadLog)
}

fn run_with(
    program: &str,
    args: &[&str],
    timeout_ms: u32,
    output: exec::OutputMode,
) -> Result<exec::Output, AdapterError> {
    let out = exec::run(&exec::Command {
        program: program.to_string(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: Vec::new(),
        timeout_ms,
        output,
    })
    .map_err(host_error)?;
    if out.status != 0 {
        return Err(AdapterError::Failed(format!(
            "{program} {} exited with {}: {}",
            args.join(" "),
            out.status,
            out.stderr_tail.trim()
        )));
    }
    Ok(out)
}

/// Logs through the gateway's structured log, tagged with the adapter's name.
pub fn info(message: &str) {
    log::log(log::Level::Info, message);
}
