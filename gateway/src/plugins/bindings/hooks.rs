//! `ferry:hooks@0.1.0` (`wit/ferry-hooks@0.1.0`): the workload hooks an adapter of any
//! `ferry:adapter` version may export beside its world. Optional: the gateway looks for
//! the export in the instance it made through the adapter's own bindings.

wasmtime::component::bindgen!({
    path: "../wit/ferry-hooks@0.1.0",
    world: "workload-hooks",
    exports: { default: async },
});

/// The export's name in a component.
pub const EXPORT: &str = "ferry:hooks/hooks@0.1.0";

pub use exports::ferry::hooks::hooks::About;
