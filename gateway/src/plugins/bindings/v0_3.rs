//! `ferry:adapter@0.3.0` (`wit/ferry-adapter@0.3.0`), the current version: its bindings,
//! and its host interfaces as thin calls into the one implementation in `host.rs`, whose
//! [`HostError`](crate::plugins::host::HostError) becomes the WIT `host-error` variant.

use wasmtime::component::{HasSelf, Linker};
use wasmtime::Result as WtResult;

use crate::plugins::host::{self, State};

wasmtime::component::bindgen!({
    path: "../wit/ferry-adapter@0.3.0",
    world: "runtime-adapter",
    imports: { default: async | trappable },
    exports: { default: async },
});

use self::ferry::adapter::types::HostError;
use self::ferry::adapter::{exec, lazy, log};

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

typed_criu_and_process!(self::ferry::adapter);

impl lazy::Host for State {
    async fn dump_spec(&mut self) -> WtResult<Option<lazy::LazyDump>> {
        Ok(self
            .lazy_dump_spec()
            .map(|(page_server, status_fd)| lazy::LazyDump {
                page_server: page_server.to_string(),
                status_fd,
            }))
    }

    async fn start_dump(&mut self, cmd: exec::Command) -> WtResult<Result<u64, HostError>> {
        Ok(self.lazy_start_dump(cmd).await.map_err(HostError::from))
    }

    async fn restore_work_dir(&mut self) -> WtResult<Result<Option<String>, HostError>> {
        Ok(self
            .lazy_restore_work_dir()
            .map(|dir| dir.map(|d| d.display().to_string()))
            .map_err(HostError::from))
    }
}
