//! `ferry:adapter@0.2.0` (`wit/ferry-adapter@0.2.0`), frozen: 0.3.0 without the `lazy`
//! interface. Its `types` are the current version's (the interface is the same, and the
//! component model compares records by structure), so only `exec`'s records convert here;
//! each host interface is a thin call into `host.rs`.

use wasmtime::component::{HasSelf, Linker};
use wasmtime::Result as WtResult;

use super::current::ferry::adapter::exec as current_exec;
use super::current::ferry::adapter::types::HostError;
use crate::plugins::host::State;

wasmtime::component::bindgen!({
    path: "../wit/ferry-adapter@0.2.0",
    world: "runtime-adapter",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "ferry:adapter/types": super::current::ferry::adapter::types,
    },
});

use self::ferry::adapter::{exec, log};

pub fn add_to_linker(linker: &mut Linker<State>) -> WtResult<()> {
    RuntimeAdapter::add_to_linker::<State, HasSelf<State>>(linker, |s| s)
}

impl From<log::Level> for super::current::ferry::adapter::log::Level {
    fn from(l: log::Level) -> Self {
        match l {
            log::Level::Debug => Self::Debug,
            log::Level::Info => Self::Info,
            log::Level::Warn => Self::Warn,
            log::Level::Error => Self::Error,
        }
    }
}

impl log::Host for State {
    async fn log(&mut self, level: log::Level, message: String) -> WtResult<()> {
        self.log_line(level.into(), &message);
        Ok(())
    }
}

impl From<exec::Command> for current_exec::Command {
    fn from(c: exec::Command) -> Self {
        Self {
            program: c.program,
            args: c.args,
            env: c.env,
            timeout_ms: c.timeout_ms,
            output: match c.output {
                exec::OutputMode::Capture => current_exec::OutputMode::Capture,
                exec::OutputMode::WorkloadLog => current_exec::OutputMode::WorkloadLog,
            },
        }
    }
}

impl exec::Host for State {
    async fn run(&mut self, cmd: exec::Command) -> WtResult<Result<exec::Output, HostError>> {
        Ok(self
            .exec(cmd.into())
            .await
            .map(|o| exec::Output {
                status: o.status,
                stdout: o.stdout,
                stderr_tail: o.stderr_tail,
            })
            .map_err(HostError::from))
    }
}

typed_criu_and_process!(self::ferry::adapter);
