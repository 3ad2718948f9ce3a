//! Guest SDK for Ferry adapters, on `ferry:adapter@0.3.0` (`wit/ferry-adapter@0.3.0`): the
//! generated bindings of both worlds, the [`Adapter`] trait (world `runtime-adapter`) and
//! the [`ServiceAdapter`] trait (world `service-adapter`) with defaults for what an
//! adapter does not support, their export macros, and helpers for what every adapter does.
//!
//! ```ignore
//! use ferry_adapter_sdk::*;
//! struct MyAdapter;
//! impl Adapter for MyAdapter {
//!     fn describe() -> AdapterInfo { /* … */ }
//!     // only what it supports; the rest answers `unsupported`
//! }
//! export_adapter!(MyAdapter);
//! ```
//!
//! A service adapter implements [`ServiceAdapter`] and ends with
//! `export_service_adapter!(MyService);` instead.

// The runtime world's bindings own the interfaces both worlds share (`types`, `log`,
// `exec`); `service` reuses them, so one `Workload` or `exec::Output` type serves both and
// the helpers below work in either kind of adapter. `types` is generated whole, with the
// records only the service world uses (`SyncState`, `Endpoint`).
//
// With `pub_export_macro`, each world's custom section here carries only its imports
// (unused imports are dropped when the component is made); a world's exports enter a
// component only through its export macro, so a runtime adapter never claims to export
// `service`, nor a service adapter `runtime`.
wit_bindgen::generate!({
    path: "../../wit/ferry-adapter@0.3.0",
    world: "runtime-adapter",
    pub_export_macro: true,
    export_macro_name: "export_runtime_adapter",
    default_bindings_module: "ferry_adapter_sdk",
    generate_unused_types: true,
});

pub mod hooks;
pub mod service;

pub use ferry::adapter::types::{
    AdapterError, AdapterInfo, Approach, Endpoint, HostError, Notes, Plan, SyncState, Workload,
};
pub use ferry::adapter::{criu, exec, lazy, log, process};
pub use service::{tunnel, ServiceAdapter};

/// A host refusal stays a refusal, so the engine reports it as a denial naming the
/// capability; a request that does not fit the call is, to the engine, a failed call.
/// With this, adapters write `criu::dump()?` (and service adapters `tunnel::open(port)?`:
/// both worlds share these types).
impl From<HostError> for AdapterError {
    fn from(e: HostError) -> Self {
        match e {
            HostError::Denied(detail) => AdapterError::Denied(detail),
            HostError::Failed(detail) | HostError::Invalid(detail) => AdapterError::Failed(detail),
        }
    }
}

/// What an adapter implements. Only [`describe`](Adapter::describe) is required: the
/// others default to what an adapter that does not support them should answer, so the
/// engine can say so (and roll back) instead of the adapter trapping.
pub trait Adapter {
    /// Name, version, approaches and the runtimes served; called at load.
    fn describe() -> AdapterInfo;

    /// Can this workload migrate, how, and why. Default: it cannot.
    fn probe(w: Workload) -> Plan {
        Plan {
            feasible: false,
            approach: None,
            reason: format!(
                "adapter {} does not support migrating {} (it does not implement probe)",
                Self::describe().name,
                w.name
            ),
            expected_downtime_ms: None,
        }
    }

    /// Warm the destination before the freeze. Default: nothing to prepare.
    fn prepare(_w: Workload) -> Result<(), AdapterError> {
        Ok(())
    }

    /// Start the workload; returns its root's host pid. Default: unsupported.
    fn start_fresh(_w: Workload) -> Result<i32, AdapterError> {
        Err(unsupported::<Self>("start-fresh"))
    }

    /// Freeze and capture the workload into `w.images_dir`. Default: unsupported.
    fn checkpoint(_w: Workload) -> Result<Notes, AdapterError> {
        Err(unsupported::<Self>("checkpoint"))
    }

    /// Restore from `w.images_dir`; returns the root's host pid. Default: unsupported.
    fn restore(_w: Workload, _notes: Notes) -> Result<i32, AdapterError> {
        Err(unsupported::<Self>("restore"))
    }

    /// The migration failed: run the source again. Default: unsupported.
    fn resume_source(_w: Workload) -> Result<Option<i32>, AdapterError> {
        Err(unsupported::<Self>("resume-source"))
    }

    /// Stop the source and clean up. Default: unsupported.
    fn release_source(_w: Workload) -> Result<(), AdapterError> {
        Err(unsupported::<Self>("release-source"))
    }
}

fn unsupported<A: Adapter + ?Sized>(call: &str) -> AdapterError {
    not_implemented(&A::describe().name, call)
}

/// What both traits' defaults answer for a call an adapter does not implement.
fn not_implemented(adapter: &str, call: &str) -> AdapterError {
    AdapterError::Unsupported(format!("adapter {adapter} does not implement {call}"))
}

/// Exports a type implementing [`Adapter`] as the component's `runtime` interface:
/// implements the generated `Guest` trait (which has no defaults) by forwarding to it.
#[macro_export]
macro_rules! export_adapter {
    ($ty:ident) => {
        impl $crate::exports::ferry::adapter::runtime::Guest for $ty {
            fn describe() -> $crate::AdapterInfo {
                <$ty as $crate::Adapter>::describe()
            }
            fn probe(w: $crate::Workload) -> $crate::Plan {
                <$ty as $crate::Adapter>::probe(w)
            }
            fn prepare(w: $crate::Workload) -> Result<(), $crate::AdapterError> {
                <$ty as $crate::Adapter>::prepare(w)
            }
            fn start_fresh(w: $crate::Workload) -> Result<i32, $crate::AdapterError> {
                <$ty as $crate::Adapter>::start_fresh(w)
            }
            fn checkpoint(w: $crate::Workload) -> Result<$crate::Notes, $crate::AdapterError> {
                <$ty as $crate::Adapter>::checkpoint(w)
            }
            fn restore(w: $crate::Workload, notes: $crate::Notes) -> Result<i32, $crate::AdapterError> {
                <$ty as $crate::Adapter>::restore(w, notes)
            }
            fn resume_source(w: $crate::Workload) -> Result<Option<i32>, $crate::AdapterError> {
                <$ty as $crate::Adapter>::resume_source(w)
            }
            fn release_source(w: $crate::Workload) -> Result<(), $crate::AdapterError> {
                <$ty as $crate::Adapter>::release_source(w)
            }
        }
        $crate::export_runtime_adapter!($ty with_types_in $crate);
    };
}

/// A runtime-specific setting of the workload.
pub fn setting<'a>(w: &'a Workload, key: &str) -> Option<&'a str> {
    setting_in(&w.settings, key)
}

/// The value of `key` in a list of settings (a workload's, or a hook's `about`).
pub fn setting_in<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    settings
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
pub fn run_into_log(
    program: &str,
    args: &[&str],
    timeout_ms: u32,
) -> Result<exec::Output, AdapterError> {
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
    })?;
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
