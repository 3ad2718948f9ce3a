//! Host bindings of the `ferry:adapter` WIT package (`wit/`).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "runtime-adapter",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use self::exports::ferry::adapter::runtime::{AdapterError, AdapterInfo, Plan, Workload};
pub use self::ferry::adapter::types::Approach;
