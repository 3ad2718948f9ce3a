//! Host bindings of every released version of the `ferry:adapter` WIT package (`wit/`):
//! which versions this gateway hosts, one linker per version, and the one entry point
//! through which the actor calls a component whatever version it was built against.
//!
//! The rest of the gateway speaks the current version's types ([`current`]); an older
//! version converts to and from them at its own edge (`v0_1.rs`), so the host interfaces
//! are implemented once (`host.rs`) and the engine never sees a version.

/// The `criu` and `process` host interfaces of a version whose errors are the typed
/// `host-error` (0.2.0 on): thin calls into `host.rs`, the same in every such version.
/// `$m` is the version's generated `ferry::adapter` module.
macro_rules! typed_criu_and_process {
    ($m:path) => {
        use $m as generated;

        impl generated::criu::Host for State {
            async fn dump(&mut self) -> WtResult<Result<u64, HostError>> {
                Ok(self.criu_dump().await.map_err(HostError::from))
            }

            async fn restore(&mut self) -> WtResult<Result<i32, HostError>> {
                Ok(self.criu_restore().await.map_err(HostError::from))
            }
        }

        impl generated::process::Host for State {
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
    };
}

/// A service world's `tunnel.open`, the same in every version that has it.
macro_rules! tunnel_open {
    ($m:path) => {
        impl $m for State {
            async fn open(&mut self, port: u16) -> WtResult<Result<Endpoint, HostError>> {
                Ok(self
                    .tunnel_open(port)
                    .await
                    .map(|addr| Endpoint {
                        host: addr.ip().to_string(),
                        port: addr.port(),
                    })
                    .map_err(HostError::from))
            }
        }
    };
}

pub mod hooks;
pub mod v0_1;
pub mod v0_2;
pub mod v0_2_service;
pub mod v0_3;
pub mod v0_3_service;

use std::fmt;

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store};

use super::host::State;

/// The version the gateway's own code speaks, and the guest SDK targets.
pub use v0_3 as current;

pub use current::exports::ferry::adapter::runtime::{AdapterError, AdapterInfo, Plan, Workload};
pub use current::ferry::adapter::types::{Approach, SyncState};

/// Which world a component implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum World {
    /// `runtime-adapter`: runs, checkpoints and restores workloads of some runtimes.
    #[default]
    Runtime,
    /// `service-adapter` (0.2.0 on): moves a service's own state (a live replica).
    Service,
}

impl World {
    pub fn as_str(self) -> &'static str {
        match self {
            World::Runtime => "runtime-adapter",
            World::Service => "service-adapter",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [World::Runtime, World::Service]
            .into_iter()
            .find(|w| w.as_str() == s)
    }

    /// Does `version` of the package define this world?
    pub fn exists_in(self, version: WitVersion) -> bool {
        self == World::Runtime || version >= WitVersion::V0_2
    }
}

/// A released version of the WIT package that this gateway hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum WitVersion {
    /// Host errors are strings; `"denied: "` marks a refusal. The version manifests without
    /// a `wit` field were written for.
    #[default]
    V0_1,
    /// Host errors are the typed `host-error` variant.
    V0_2,
    /// The `lazy` host interface: post-copy for runtimes that run CRIU themselves.
    V0_3,
}

impl WitVersion {
    /// Every version this gateway hosts, oldest first.
    pub const HOSTED: [WitVersion; 3] = [WitVersion::V0_1, WitVersion::V0_2, WitVersion::V0_3];

    pub fn as_str(self) -> &'static str {
        match self {
            WitVersion::V0_1 => "0.1.0",
            WitVersion::V0_2 => "0.2.0",
            WitVersion::V0_3 => "0.3.0",
        }
    }

    /// The version a manifest names, if this gateway hosts it (exact match: a released
    /// version is one frozen folder, not a range).
    pub fn parse(s: &str) -> Option<Self> {
        Self::HOSTED.into_iter().find(|v| v.as_str() == s)
    }

    /// "0.1.0, 0.2.0 and 0.3.0": the hosted versions, for messages.
    pub fn hosted_list() -> String {
        let names: Vec<&str> = Self::HOSTED.iter().map(|v| v.as_str()).collect();
        match names.split_last() {
            Some((last, [])) => (*last).to_string(),
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
            None => String::new(),
        }
    }
}

impl fmt::Display for WitVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One linker per hosted version: WASI plus that version's host interfaces, so a
/// component can only ever bind the interfaces of the version its manifest names.
pub struct Linkers {
    v0_1: Linker<State>,
    v0_2: Linker<State>,
    v0_2_service: Linker<State>,
    v0_3: Linker<State>,
    v0_3_service: Linker<State>,
}

impl Linkers {
    pub fn new(engine: &Engine) -> wasmtime::Result<Self> {
        let with_wasi = |add: fn(&mut Linker<State>) -> wasmtime::Result<()>| {
            let mut linker = Linker::new(engine);
            wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
            add(&mut linker)?;
            wasmtime::Result::<_>::Ok(linker)
        };
        Ok(Self {
            v0_1: with_wasi(v0_1::add_to_linker)?,
            v0_2: with_wasi(v0_2::add_to_linker)?,
            v0_2_service: with_wasi(v0_2_service::add_to_linker)?,
            v0_3: with_wasi(v0_3::add_to_linker)?,
            v0_3_service: with_wasi(v0_3_service::add_to_linker)?,
        })
    }

    pub fn get(&self, version: WitVersion, world: World) -> &Linker<State> {
        match (version, world) {
            (WitVersion::V0_1, _) => &self.v0_1,
            (WitVersion::V0_2, World::Runtime) => &self.v0_2,
            (WitVersion::V0_2, World::Service) => &self.v0_2_service,
            (WitVersion::V0_3, World::Runtime) => &self.v0_3,
            (WitVersion::V0_3, World::Service) => &self.v0_3_service,
        }
    }
}

/// An instantiated component, through the bindings of the version it was built against.
/// 0.2.0 and 0.3.0 share the current version's records; a 0.1.0 call converts the
/// workload down and the answer up.
pub enum Guest {
    V0_1(v0_1::RuntimeAdapter),
    V0_2(v0_2::RuntimeAdapter),
    V0_3(v0_3::RuntimeAdapter),
    ServiceV0_2(v0_2_service::ServiceAdapter),
    Service(v0_3_service::ServiceAdapter),
}

type Answer<T> = wasmtime::Result<Result<T, AdapterError>>;

/// `$call` on the `runtime` exports (`$r`) of a 0.2.0 or 0.3.0 component, `$old` on a
/// 0.1.0 one's (which converts); a service adapter does not export `runtime`.
macro_rules! runtime {
    ($guest:expr, $name:literal, |$r:ident| $call:expr, |$o:ident| $old:expr) => {
        match $guest {
            Guest::V0_1(g) => {
                let $o = g.ferry_adapter_runtime();
                $old
            }
            Guest::V0_2(g) => {
                let $r = g.ferry_adapter_runtime();
                $call
            }
            Guest::V0_3(g) => {
                let $r = g.ferry_adapter_runtime();
                $call
            }
            Guest::ServiceV0_2(_) | Guest::Service(_) => Ok(Err(Guest::not_this_world($name))),
        }
    };
}

/// `$call` on the `service` exports (`$s`) of a service adapter of any version.
macro_rules! service {
    ($guest:expr, $name:literal, |$s:ident| $call:expr) => {
        match $guest {
            Guest::ServiceV0_2(g) => {
                let $s = g.ferry_adapter_service();
                $call
            }
            Guest::Service(g) => {
                let $s = g.ferry_adapter_service();
                $call
            }
            _ => Ok(Err(Guest::not_this_world($name))),
        }
    };
}

impl Guest {
    /// Instantiates `component` through the bindings of `version`'s `world`, with its
    /// workload hooks when it exports `ferry:hooks` (with other types: an error).
    pub async fn instantiate(
        version: WitVersion,
        world: World,
        store: &mut Store<State>,
        component: &Component,
        linkers: &Linkers,
    ) -> wasmtime::Result<(Self, Option<hooks::WorkloadHooks>)> {
        let instance = linkers
            .get(version, world)
            .instantiate_async(&mut *store, component)
            .await?;
        let guest = match (version, world) {
            (WitVersion::V0_1, _) => {
                Guest::V0_1(v0_1::RuntimeAdapter::new(&mut *store, &instance)?)
            }
            (WitVersion::V0_2, World::Runtime) => {
                Guest::V0_2(v0_2::RuntimeAdapter::new(&mut *store, &instance)?)
            }
            (WitVersion::V0_2, World::Service) => {
                Guest::ServiceV0_2(v0_2_service::ServiceAdapter::new(&mut *store, &instance)?)
            }
            (WitVersion::V0_3, World::Runtime) => {
                Guest::V0_3(v0_3::RuntimeAdapter::new(&mut *store, &instance)?)
            }
            (WitVersion::V0_3, World::Service) => {
                Guest::Service(v0_3_service::ServiceAdapter::new(&mut *store, &instance)?)
            }
        };
        let hooks = if component.get_export_index(None, hooks::EXPORT).is_some() {
            let h = hooks::WorkloadHooks::new(&mut *store, &instance)
                .map_err(|e| e.context(format!("it exports {} with other types", hooks::EXPORT)))?;
            Some(h)
        } else {
            None
        };
        Ok((guest, hooks))
    }

    /// What a service adapter answers to a runtime call, and the reverse.
    fn not_this_world(call: &str) -> AdapterError {
        AdapterError::Unsupported(format!("{call} is not part of this adapter's world"))
    }

    pub async fn start_sync(&self, store: &mut Store<State>, w: &Workload) -> Answer<()> {
        service!(self, "start-sync", |s| s.call_start_sync(store, w).await)
    }

    pub async fn sync_progress(&self, store: &mut Store<State>, w: &Workload) -> Answer<SyncState> {
        service!(self, "sync-progress", |s| s
            .call_sync_progress(store, w)
            .await)
    }

    pub async fn fence(&self, store: &mut Store<State>, w: &Workload) -> Answer<String> {
        service!(self, "fence", |s| s.call_fence(store, w).await)
    }

    pub async fn unfence(&self, store: &mut Store<State>, w: &Workload) -> Answer<()> {
        service!(self, "unfence", |s| s.call_unfence(store, w).await)
    }

    pub async fn cut_over(&self, store: &mut Store<State>, w: &Workload, mark: &str) -> Answer<()> {
        service!(self, "cut-over", |s| s.call_cut_over(store, w, mark).await)
    }

    pub async fn abort_sync(&self, store: &mut Store<State>, w: &Workload) -> Answer<()> {
        service!(self, "abort-sync", |s| s.call_abort_sync(store, w).await)
    }

    pub async fn describe(&self, store: &mut Store<State>) -> wasmtime::Result<AdapterInfo> {
        match self {
            Guest::V0_1(g) => Ok(g.ferry_adapter_runtime().call_describe(store).await?.into()),
            Guest::V0_2(g) => g.ferry_adapter_runtime().call_describe(store).await,
            Guest::V0_3(g) => g.ferry_adapter_runtime().call_describe(store).await,
            Guest::ServiceV0_2(g) => g.ferry_adapter_service().call_describe(store).await,
            Guest::Service(g) => g.ferry_adapter_service().call_describe(store).await,
        }
    }

    pub async fn probe(&self, store: &mut Store<State>, w: &Workload) -> wasmtime::Result<Plan> {
        match self {
            Guest::V0_1(g) => Ok(g
                .ferry_adapter_runtime()
                .call_probe(store, &w.into())
                .await?
                .into()),
            Guest::V0_2(g) => g.ferry_adapter_runtime().call_probe(store, w).await,
            Guest::V0_3(g) => g.ferry_adapter_runtime().call_probe(store, w).await,
            Guest::ServiceV0_2(g) => g.ferry_adapter_service().call_probe(store, w).await,
            Guest::Service(g) => g.ferry_adapter_service().call_probe(store, w).await,
        }
    }

    pub async fn prepare(&self, store: &mut Store<State>, w: &Workload) -> Answer<()> {
        runtime!(self, "prepare", |r| r.call_prepare(store, w).await, |o| Ok(
            o.call_prepare(store, &w.into()).await?.map_err(Into::into)
        ))
    }

    pub async fn start_fresh(&self, store: &mut Store<State>, w: &Workload) -> Answer<i32> {
        runtime!(
            self,
            "start-fresh",
            |r| r.call_start_fresh(store, w).await,
            |o| Ok(o
                .call_start_fresh(store, &w.into())
                .await?
                .map_err(Into::into))
        )
    }

    pub async fn checkpoint(
        &self,
        store: &mut Store<State>,
        w: &Workload,
    ) -> Answer<Vec<(String, String)>> {
        runtime!(
            self,
            "checkpoint",
            |r| r.call_checkpoint(store, w).await,
            |o| Ok(o
                .call_checkpoint(store, &w.into())
                .await?
                .map_err(Into::into))
        )
    }

    pub async fn restore(
        &self,
        store: &mut Store<State>,
        w: &Workload,
        notes: Vec<(String, String)>,
    ) -> Answer<i32> {
        runtime!(
            self,
            "restore",
            |r| r.call_restore(store, w, &notes).await,
            |o| Ok(o
                .call_restore(store, &w.into(), &notes)
                .await?
                .map_err(Into::into))
        )
    }

    pub async fn resume_source(
        &self,
        store: &mut Store<State>,
        w: &Workload,
    ) -> Answer<Option<i32>> {
        runtime!(
            self,
            "resume-source",
            |r| r.call_resume_source(store, w).await,
            |o| Ok(o
                .call_resume_source(store, &w.into())
                .await?
                .map_err(Into::into))
        )
    }

    pub async fn release_source(&self, store: &mut Store<State>, w: &Workload) -> Answer<()> {
        runtime!(
            self,
            "release-source",
            |r| r.call_release_source(store, w).await,
            |o| Ok(o
                .call_release_source(store, &w.into())
                .await?
                .map_err(Into::into))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::WitVersion;

    #[test]
    fn hosted_versions_are_named_exactly() {
        assert_eq!(WitVersion::parse("0.1.0"), Some(WitVersion::V0_1));
        assert_eq!(WitVersion::parse("0.2.0"), Some(WitVersion::V0_2));
        assert_eq!(WitVersion::parse("0.2"), None);
        assert_eq!(WitVersion::parse("9.9.9"), None);
        assert_eq!(WitVersion::parse("0.3.0"), Some(WitVersion::V0_3));
        assert_eq!(WitVersion::hosted_list(), "0.1.0, 0.2.0 and 0.3.0");
        assert_eq!(WitVersion::default(), WitVersion::V0_1);
    }
}
