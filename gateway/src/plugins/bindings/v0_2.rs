//! `ferry:adapter@0.2.0` (`wit/ferry-adapter@0.2.0`), the current version: its bindings,
//! and its host interfaces as thin calls into the one implementation in `host.rs`, whose
//! [`HostError`](crate::plugins::host::HostError) becomes the WIT `host-error` variant.

use wasmtime::component::{HasSelf, Linker};
use wasmtime::Result as WtResult;

use crate::plugins::host::{self, State};

wasmtime::component::bindgen!({
    path: "../wit/ferry-adapter@0.2.0",
    world: "runtime-adapter",
    imports: { default: async | trappable },
    exports: { default: async },
});

use self::ferry::adapter::types::HostError;
use self::ferry::adapter::{criu, exec, log, process};

pub fn add_to_linker(linker: &mut Linker<State>) -> WtResult<()> {
    RuntimeAdapter::add_to_linker::<State, HasSelf<State>>(linker, |s| s)
}

impl From<host::HostError> for HostError {
    fn from(e: host::HostError) -> Self {
        match e {
            host::HostError::Denied(d) => HostError::Denied(d),
            host::HostError::Failed(d) => HostError::Failed(d),
            host::HostError::Invalid(d) => HostError::Invalid(d),
        }
    }
}

impl ferry::adapter::types::Host for State {}

impl log::Host for State {
    async fn log(&mut self, level: log::Level, message: String) -> WtResult<()> {
        self.log_line(level, &message);
        Ok(())
    }
}

impl exec::Host for State {
    async fn run(&mut self, cmd: exec::Command) -> WtResult<Result<exec::Output, HostError>> {
        Ok(self.exec(cmd).await.map_err(HostError::from))
    }
}

impl criu::Host for State {
    async fn dump(&mut self) -> WtResult<Result<u64, HostError>> {
        Ok(self.criu_dump().await.map_err(HostError::from))
    }

    async fn restore(&mut self) -> WtResult<Result<i32, HostError>> {
        Ok(self.criu_restore().await.map_err(HostError::from))
    }
}

impl process::Host for State {
    async fn spawn(&mut self) -> WtResult<Result<i32, HostError>> {
        Ok(self.process_spawn().await.map_err(HostError::from))
    }

    async fn resume(&mut self) -> WtResult<Result<(), HostError>> {
        Ok(self.process_resume().map_err(HostError::from))
    }

    async fn kill(&mut self) -> WtResult<Result<(), HostError>> {
        Ok(self.process_kill().map_err(HostError::from))
    }
}
