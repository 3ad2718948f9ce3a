//! Host bindings of the `ferry:adapter` WIT package (`wit/`).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "runtime-adapter",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use exports::ferry::adapter::runtime::{AdapterError, AdapterInfo, Plan, Workload};
pub use ferry::adapter::types::Approach;
