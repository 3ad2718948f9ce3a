//! `ferry:adapter@0.3.0`, world `service-adapter`: the bindings of service adapters. The
//! interfaces it shares with `runtime-adapter` (types, log, exec) are the ones generated
//! in [`super::v0_3`], so their host implementations are not repeated; `tunnel` is
//! implemented here, as a thin call into `host.rs`.

use wasmtime::component::{HasSelf, Linker};
use wasmtime::Result as WtResult;

use super::v0_3::ferry::adapter::types::{Endpoint, HostError};
use crate::plugins::host::State;

wasmtime::component::bindgen!({
    path: "../wit/ferry-adapter@0.3.0",
    world: "service-adapter",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "ferry:adapter/types": super::v0_3::ferry::adapter::types,
        "ferry:adapter/log": super::v0_3::ferry::adapter::log,
        "ferry:adapter/exec": super::v0_3::ferry::adapter::exec,
    },
});

pub fn add_to_linker(linker: &mut Linker<State>) -> WtResult<()> {
    ServiceAdapter::add_to_linker::<State, HasSelf<State>>(linker, |s| s)
}

tunnel_open!(ferry::adapter::tunnel::Host);
