//! `ferry:adapter@0.1.0` (`wit/ferry-adapter@0.1.0`), frozen: its bindings, its host
//! interfaces as thin calls into the one implementation in `host.rs`, and the conversions
//! between its types and the current version's. Host errors become strings exactly as
//! 0.1.0 shipped them: a refusal is `"denied: …"`, anything else the bare detail.

use wasmtime::component::{HasSelf, Linker};
use wasmtime::Result as WtResult;

use super::current;
use crate::plugins::host::{HostError, State};

wasmtime::component::bindgen!({
    path: "../wit/ferry-adapter@0.1.0",
    world: "runtime-adapter",
    imports: { default: async | trappable },
    exports: { default: async },
});

use self::exports::ferry::adapter::runtime::{AdapterError, AdapterInfo, Plan, Workload};
use self::ferry::adapter::types::Approach;
use self::ferry::adapter::{criu, exec, log, process};

pub fn add_to_linker(linker: &mut Linker<State>) -> WtResult<()> {
    RuntimeAdapter::add_to_linker::<State, HasSelf<State>>(linker, |s| s)
}

/// A host error as 0.1.0 reports it. Its SDK (and any adapter written against it) finds a
/// refusal by the `"denied:"` prefix, so that text is part of the frozen contract.
pub fn message(e: HostError) -> String {
    match e {
        HostError::Denied(detail) => format!("denied: {detail}"),
        HostError::Failed(detail) | HostError::Invalid(detail) => detail,
    }
}

impl ferry::adapter::types::Host for State {}

impl log::Host for State {
    async fn log(&mut self, level: log::Level, message: String) -> WtResult<()> {
        let level = match level {
            log::Level::Debug => current::ferry::adapter::log::Level::Debug,
            log::Level::Info => current::ferry::adapter::log::Level::Info,
            log::Level::Warn => current::ferry::adapter::log::Level::Warn,
            log::Level::Error => current::ferry::adapter::log::Level::Error,
        };
        self.log_line(level, &message);
        Ok(())
    }
}

impl exec::Host for State {
    async fn run(&mut self, cmd: exec::Command) -> WtResult<Result<exec::Output, String>> {
        use current::ferry::adapter::exec as now;
        let cmd = now::Command {
            program: cmd.program,
            args: cmd.args,
            env: cmd.env,
            timeout_ms: cmd.timeout_ms,
            output: match cmd.output {
                exec::OutputMode::Capture => now::OutputMode::Capture,
                exec::OutputMode::WorkloadLog => now::OutputMode::WorkloadLog,
            },
        };
        Ok(self
            .exec(cmd)
            .await
            .map(|o| exec::Output {
                status: o.status,
                stdout: o.stdout,
                stderr_tail: o.stderr_tail,
            })
            .map_err(message))
    }
}

impl criu::Host for State {
    async fn dump(&mut self) -> WtResult<Result<u64, String>> {
        Ok(self.criu_dump().await.map_err(message))
    }

    async fn restore(&mut self) -> WtResult<Result<i32, String>> {
        Ok(self.criu_restore().await.map_err(message))
    }
}

impl process::Host for State {
    async fn spawn(&mut self) -> WtResult<Result<i32, String>> {
        Ok(self.process_spawn().await.map_err(message))
    }

    async fn resume(&mut self) -> WtResult<Result<(), String>> {
        Ok(self.process_resume().map_err(message))
    }

    async fn kill(&mut self) -> WtResult<Result<(), String>> {
        Ok(self.process_kill().map_err(message))
    }
}

// The records of both versions are the same; only their Rust types differ.

impl From<&super::Workload> for Workload {
    fn from(w: &super::Workload) -> Self {
        Workload {
            name: w.name.clone(),
            runtime: w.runtime.clone(),
            command: w.command.clone(),
            port: w.port,
            env: w.env.clone(),
            settings: w.settings.clone(),
            pid: w.pid,
            work_dir: w.work_dir.clone(),
            log_path: w.log_path.clone(),
            images_dir: w.images_dir.clone(),
            site: w.site.clone(),
            peer: w.peer.clone(),
        }
    }
}

impl From<Approach> for super::Approach {
    fn from(a: Approach) -> Self {
        match a {
            Approach::Orchestrator => super::Approach::Orchestrator,
            Approach::Container => super::Approach::Container,
        }
    }
}

impl From<AdapterInfo> for super::AdapterInfo {
    fn from(i: AdapterInfo) -> Self {
        super::AdapterInfo {
            name: i.name,
            version: i.version,
            approaches: i.approaches.into_iter().map(Into::into).collect(),
            runtimes: i.runtimes,
        }
    }
}

impl From<Plan> for super::Plan {
    fn from(p: Plan) -> Self {
        super::Plan {
            feasible: p.feasible,
            approach: p.approach.map(Into::into),
            reason: p.reason,
            expected_downtime_ms: p.expected_downtime_ms,
        }
    }
}

impl From<AdapterError> for super::AdapterError {
    fn from(e: AdapterError) -> Self {
        match e {
            AdapterError::Unsupported(d) => super::AdapterError::Unsupported(d),
            AdapterError::Denied(d) => super::AdapterError::Denied(d),
            AdapterError::Failed(d) => super::AdapterError::Failed(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_errors_keep_their_0_1_0_text() {
        assert_eq!(
            message(HostError::Denied(
                "capability exec is not granted to adapter x".into()
            )),
            "denied: capability exec is not granted to adapter x"
        );
        assert_eq!(
            message(HostError::Failed("cannot start runc: not found".into())),
            "cannot start runc: not found"
        );
        assert_eq!(
            message(HostError::Invalid("this call is about no workload".into())),
            "this call is about no workload"
        );
    }
}
