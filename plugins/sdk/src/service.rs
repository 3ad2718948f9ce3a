//! The `service-adapter` world: bindings of its own interfaces (`tunnel`, the exported
//! `service`), the [`ServiceAdapter`] trait with defaults, and
//! [`export_service_adapter!`](crate::export_service_adapter).
//!
//! A service adapter moves a service by its own means (a live replica kept in sync through
//! a [`tunnel`], then promoted) instead of checkpointing processes. The engine calls
//! `probe` at both sites, then, at the destination, `start-sync` on a fresh instance,
//! `sync-progress` until it is in sync; then, while the source site holds all client
//! traffic, `fence` at the source (its mark goes to the destination) and `cut-over` at the
//! destination; `abort-sync` (destination) and `unfence` (source) when the move is
//! abandoned.

wit_bindgen::generate!({
    path: "../../wit/ferry-adapter@0.3.0",
    world: "service-adapter",
    pub_export_macro: true,
    export_macro_name: "export_service_world",
    default_bindings_module: "ferry_adapter_sdk::service",
    with: {
        "ferry:adapter/types@0.3.0": crate::ferry::adapter::types,
        "ferry:adapter/log@0.3.0": crate::ferry::adapter::log,
        "ferry:adapter/exec@0.3.0": crate::ferry::adapter::exec,
    },
});

pub use ferry::adapter::tunnel;

use crate::{AdapterError, AdapterInfo, Approach, Plan, SyncState, Workload};

/// A plan saying this adapter cannot move the workload, and why.
pub fn infeasible(reason: String) -> Plan {
    Plan {
        feasible: false,
        approach: None,
        reason,
        expected_downtime_ms: None,
    }
}

/// A service-level plan, with the switch's expected downtime if the adapter knows it.
pub fn feasible(reason: String, expected_downtime_ms: Option<u64>) -> Plan {
    Plan {
        feasible: true,
        approach: Some(Approach::Service),
        reason,
        expected_downtime_ms,
    }
}

/// The probe's usual shape: at the source (`w.pid` set) ask `at_source`, at the
/// destination `at_destination`; an error is an infeasible plan saying it.
pub fn probe_here(
    w: &Workload,
    at_source: impl FnOnce(&Workload) -> Result<Plan, AdapterError>,
    at_destination: impl FnOnce(&Workload) -> Result<Plan, AdapterError>,
) -> Plan {
    let plan = if w.pid.is_some() {
        at_source(w)
    } else {
        at_destination(w)
    };
    plan.unwrap_or_else(|e| infeasible(reason(e)))
}

/// What an error says, without its kind (for a plan's reason).
pub fn reason(e: AdapterError) -> String {
    match e {
        AdapterError::Unsupported(why) | AdapterError::Denied(why) | AdapterError::Failed(why) => {
            why
        }
    }
}

/// The migration's other site, for messages.
pub fn peer(w: &Workload) -> &str {
    w.peer.as_deref().unwrap_or("the other site")
}

/// What a service adapter implements. [`describe`](ServiceAdapter::describe) and
/// [`probe`](ServiceAdapter::probe) are required: a service adapter is chosen only by
/// what its probe says. The sync calls default to `unsupported`, so an adapter that only
/// probes (or is half written) makes the engine refuse the move instead of trapping.
pub trait ServiceAdapter {
    /// Name, version, approaches (`service`) and, in `runtimes`, the services it knows.
    fn describe() -> AdapterInfo;

    /// Is `w` a service this adapter knows, can it move this way, and at what cost? At the
    /// source `w.pid` is set (the running instance); at the destination it is not (can
    /// this site run the same service?).
    fn probe(w: Workload) -> Plan;

    /// At the destination, on a fresh instance: start following the source (through a
    /// [`tunnel`]); return once the sync has started. Default: unsupported.
    fn start_sync(_w: Workload) -> Result<(), AdapterError> {
        Err(unsupported::<Self>("start-sync"))
    }

    /// At the destination: how far the replica is. Default: unsupported.
    fn sync_progress(_w: Workload) -> Result<SyncState, AdapterError> {
        Err(unsupported::<Self>("sync-progress"))
    }

    /// At the source, while this site holds all client traffic: stop the source taking
    /// changes and return a mark of what it has, handed to [`cut_over`](ServiceAdapter::cut_over)
    /// at the destination. Default: no fence, an empty mark (for services whose cut-over
    /// reads the source's state itself, through the tunnel).
    fn fence(_w: Workload) -> Result<String, AdapterError> {
        Ok(String::new())
    }

    /// At the source, when the move is abandoned after [`fence`](ServiceAdapter::fence):
    /// take changes again. Default: nothing to undo.
    fn unfence(_w: Workload) -> Result<(), AdapterError> {
        Ok(())
    }

    /// At the destination, while the source site holds all client traffic and the source
    /// is fenced: catch up with the source up to `mark`, then become the primary.
    /// Default: unsupported.
    fn cut_over(_w: Workload, _mark: String) -> Result<(), AdapterError> {
        Err(unsupported::<Self>("cut-over"))
    }

    /// At the destination, when the move is abandoned: stop following the source (its
    /// runtime adapter then discards the instance). Default: nothing to undo.
    fn abort_sync(_w: Workload) -> Result<(), AdapterError> {
        Ok(())
    }
}

fn unsupported<A: ServiceAdapter + ?Sized>(call: &str) -> AdapterError {
    crate::not_implemented(&A::describe().name, call)
}

/// Exports a type implementing [`ServiceAdapter`] as the component's `service` interface:
/// implements the generated `Guest` trait (which has no defaults) by forwarding to it.
#[macro_export]
macro_rules! export_service_adapter {
    ($ty:ident) => {
        impl $crate::service::exports::ferry::adapter::service::Guest for $ty {
            fn describe() -> $crate::AdapterInfo {
                <$ty as $crate::ServiceAdapter>::describe()
            }
            fn probe(w: $crate::Workload) -> $crate::Plan {
                <$ty as $crate::ServiceAdapter>::probe(w)
            }
            fn start_sync(w: $crate::Workload) -> Result<(), $crate::AdapterError> {
                <$ty as $crate::ServiceAdapter>::start_sync(w)
            }
            fn sync_progress(w: $crate::Workload) -> Result<$crate::SyncState, $crate::AdapterError> {
                <$ty as $crate::ServiceAdapter>::sync_progress(w)
            }
            fn fence(w: $crate::Workload) -> Result<String, $crate::AdapterError> {
                <$ty as $crate::ServiceAdapter>::fence(w)
            }
            fn unfence(w: $crate::Workload) -> Result<(), $crate::AdapterError> {
                <$ty as $crate::ServiceAdapter>::unfence(w)
            }
            fn cut_over(w: $crate::Workload, mark: String) -> Result<(), $crate::AdapterError> {
                <$ty as $crate::ServiceAdapter>::cut_over(w, mark)
            }
            fn abort_sync(w: $crate::Workload) -> Result<(), $crate::AdapterError> {
                <$ty as $crate::ServiceAdapter>::abort_sync(w)
            }
        }
        $crate::service::export_service_world!($ty with_types_in $crate::service);
    };
}
