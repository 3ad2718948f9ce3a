//! `ferry:adapter@0.2.0`, world `service-adapter`, frozen: the same as 0.3.0's. Its
//! `types` are the current version's, `log` and `exec` the ones generated in
//! [`super::v0_2`]; `tunnel` is a thin call into `host.rs`.

use wasmtime::component::{HasSelf, Linker};
use wasmtime::Result as WtResult;

use super::current::ferry::adapter::types::{Endpoint, HostError};
use crate::plugins::host::State;

wasmtime::component::bindgen!({
    path: "../wit/ferry-adapter@0.2.0",
    world: "service-adapter",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "ferry:adapter/types": super::current::ferry::adapter::types,
        "ferry:adapter/log": super::v0_2::ferry::adapter::log,
        "ferry:adapter/exec": super::v0_2::ferry::adapter::exec,
    },
});

pub fn add_to_linker(linker: &mut Linker<State>) -> WtResult<()> {
    ServiceAdapter::add_to_linker::<State, HasSelf<State>>(linker, |s| s)
}

tunnel_open!(ferry::adapter::tunnel::Host);
