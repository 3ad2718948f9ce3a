//! Host bindings of every released version of the `ferry:adapter` WIT package (`wit/`):
//! which versions this gateway hosts, one linker per version, and the one entry point
//! through which the actor calls a component whatever version it was built against.
//!
//! The rest of the gateway speaks the current version's types ([`current`]); an older
//! version converts to and from them at its own edge (`v0_1.rs`), so the host interfaces
//! are implemented once (`host.rs`) and the engine never sees a version.

pub mod v0_1;
pub mod v0_2;
pub mod v0_2_service;

use std::fmt;

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store};

use super::host::State;

/// The version the gateway's own code speaks, and the guest SDK targets.
pub use v0_2 as current;

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
}

impl WitVersion {
    /// Every version this gateway hosts, oldest first.
    pub const HOSTED: [WitVersion; 2] = [WitVersion::V0_1, WitVersion::V0_2];

    pub fn as_str(self) -> &'static str {
        match self {
            WitVersion::V0_1 => "0.1.0",
            WitVersion::V0_2 => "0.2.0",
        }
    }

    /// The version a manifest names, if this gateway hosts it (exact match: a released
    /// version is one frozen folder, not a range).
    pub fn parse(s: &str) -> Option<Self> {
        Self::HOSTED.into_iter().find(|v| v.as_str() == s)
    }

    /// "0.1.0 and 0.2.0": the hosted versions, for messages.
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
}

impl Linkers {
    pub fn new(engine: &Engine) -> wasmtime::Result<Self> {
        let mut v0_1 = Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut v0_1)?;
        v0_1::add_to_linker(&mut v0_1)?;
        let mut v0_2 = Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut v0_2)?;
        v0_2::add_to_linker(&mut v0_2)?;
        let mut v0_2_service = Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut v0_2_service)?;
        v0_2_service::add_to_linker(&mut v0_2_service)?;
        Ok(Self {
            v0_1,
            v0_2,
            v0_2_service,
        })
    }

    pub fn get(&self, version: WitVersion, world: World) -> &Linker<State> {
        match (version, world) {
            (WitVersion::V0_1, _) => &self.v0_1,
            (WitVersion::V0_2, World::Runtime) => &self.v0_2,
            (WitVersion::V0_2, World::Service) => &self.v0_2_service,
        }
    }
}

/// An instantiated component, through the bindings of the version it was built against.
/// Each call converts the workload down to that version and the answer up to the current
/// one.
pub enum Guest {
    V0_1(v0_1::RuntimeAdapter),
    V0_2(v0_2::RuntimeAdapter),
    Service(v0_2_service::ServiceAdapter),
}

type Answer<T> = wasmtime::Result<Result<T, AdapterError>>;

impl Guest {
    pub async fn instantiate(
        version: WitVersion,
        world: World,
        store: &mut Store<State>,
        component: &Component,
        linkers: &Linkers,
    ) -> wasmtime::Result<Self> {
        let linker = linkers.get(version, world);
        Ok(match (version, world) {
            (WitVersion::V0_1, _) => Guest::V0_1(
                v0_1::RuntimeAdapter::instantiate_async(store, component, linker).await?,
            ),
            (WitVersion::V0_2, World::Runtime) => Guest::V0_2(
                v0_2::RuntimeAdapter::instantiate_async(store, component, linker).await?,
            ),
            (WitVersion::V0_2, World::Service) => Guest::Service(
                v0_2_service::ServiceAdapter::instantiate_async(store, component, linker).await?,
            ),
        })
    }

    /// What a service adapter answers to a runtime call, and the reverse.
    fn not_this_world(call: &str) -> AdapterError {
        AdapterError::Unsupported(format!("{call} is not part of this adapter's world"))
    }

    pub async fn start_sync(&self, store: &mut Store<State>, w: &Workload) -> Answer<()> {
        match self {
            Guest::Service(g) => g.ferry_adapter_service().call_start_sync(store, w).await,
            _ => Ok(Err(Self::not_this_world("start-sync"))),
        }
    }

    pub async fn sync_progress(&self, store: &mut Store<State>, w: &Workload) -> Answer<SyncState> {
        match self {
            Guest::Service(g) => g.ferry_adapter_service().call_sync_progress(store, w).await,
            _ => Ok(Err(Self::not_this_world("sync-progress"))),
        }
    }

    pub async fn fence(&self, store: &mut Store<State>, w: &Workload) -> Answer<String> {
        match self {
            Guest::Service(g) => g.ferry_adapter_service().call_fence(store, w).await,
            _ => Ok(Err(Self::not_this_world("fence"))),
        }
    }

    pub async fn unfence(&self, store: &mut Store<State>, w: &Workload) -> Answer<()> {
        match self {
            Guest::Service(g) => g.ferry_adapter_service().call_unfence(store, w).await,
            _ => Ok(Err(Self::not_this_world("unfence"))),
        }
    }

    pub async fn cut_over(&self, store: &mut Store<State>, w: &Workload, mark: &str) -> Answer<()> {
        match self {
            Guest::Service(g) => {
                g.ferry_adapter_service()
                    .call_cut_over(store, w, mark)
                    .await
            }
            _ => Ok(Err(Self::not_this_world("cut-over"))),
        }
    }

    pub async fn abort_sync(&self, store: &mut Store<State>, w: &Workload) -> Answer<()> {
        match self {
            Guest::Service(g) => g.ferry_adapter_service().call_abort_sync(store, w).await,
            _ => Ok(Err(Self::not_this_world("abort-sync"))),
        }
    }

    pub async fn describe(&self, store: &mut Store<State>) -> wasmtime::Result<AdapterInfo> {
        match self {
            Guest::V0_1(g) => Ok(g.ferry_adapter_runtime().call_describe(store).await?.into()),
            Guest::V0_2(g) => g.ferry_adapter_runtime().call_describe(store).await,
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
            Guest::Service(g) => g.ferry_adapter_service().call_probe(store, w).await,
        }
    }

    pub async fn prepare(&self, store: &mut Store<State>, w: &Workload) -> Answer<()> {
        match self {
            Guest::Service(_) => Ok(Err(Self::not_this_world("prepare"))),
            Guest::V0_1(g) => Ok(g
                .ferry_adapter_runtime()
                .call_prepare(store, &w.into())
                .await?
                .map_err(Into::into)),
            Guest::V0_2(g) => g.ferry_adapter_runtime().call_prepare(store, w).await,
        }
    }

    pub async fn start_fresh(&self, store: &mut Store<State>, w: &Workload) -> Answer<i32> {
        match self {
            Guest::Service(_) => Ok(Err(Self::not_this_world("start-fresh"))),
            Guest::V0_1(g) => Ok(g
                .ferry_adapter_runtime()
                .call_start_fresh(store, &w.into())
                .await?
                .map_err(Into::into)),
            Guest::V0_2(g) => g.ferry_adapter_runtime().call_start_fresh(store, w).await,
        }
    }

    pub async fn checkpoint(
        &self,
        store: &mut Store<State>,
        w: &Workload,
    ) -> Answer<Vec<(String, String)>> {
        match self {
            Guest::Service(_) => Ok(Err(Self::not_this_world("checkpoint"))),
            Guest::V0_1(g) => Ok(g
                .ferry_adapter_runtime()
                .call_checkpoint(store, &w.into())
                .await?
                .map_err(Into::into)),
            Guest::V0_2(g) => g.ferry_adapter_runtime().call_checkpoint(store, w).await,
        }
    }

    pub async fn restore(
        &self,
        store: &mut Store<State>,
        w: &Workload,
        notes: Vec<(String, String)>,
    ) -> Answer<i32> {
        match self {
            Guest::Service(_) => Ok(Err(Self::not_this_world("restore"))),
            Guest::V0_1(g) => Ok(g
                .ferry_adapter_runtime()
                .call_restore(store, &w.into(), &notes)
                .await?
                .map_err(Into::into)),
            Guest::V0_2(g) => {
                g.ferry_adapter_runtime()
                    .call_restore(store, w, &notes)
                    .await
            }
        }
    }

    pub async fn resume_source(
        &self,
        store: &mut Store<State>,
        w: &Workload,
    ) -> Answer<Option<i32>> {
        match self {
            Guest::Service(_) => Ok(Err(Self::not_this_world("resume-source"))),
            Guest::V0_1(g) => Ok(g
                .ferry_adapter_runtime()
                .call_resume_source(store, &w.into())
                .await?
                .map_err(Into::into)),
            Guest::V0_2(g) => g.ferry_adapter_runtime().call_resume_source(store, w).await,
        }
    }

    pub async fn release_source(&self, store: &mut Store<State>, w: &Workload) -> Answer<()> {
        match self {
            Guest::Service(_) => Ok(Err(Self::not_this_world("release-source"))),
            Guest::V0_1(g) => Ok(g
                .ferry_adapter_runtime()
                .call_release_source(store, &w.into())
                .await?
                .map_err(Into::into)),
            Guest::V0_2(g) => {
                g.ferry_adapter_runtime()
                    .call_release_source(store, w)
                    .await
            }
        }
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
        assert_eq!(WitVersion::hosted_list(), "0.1.0 and 0.2.0");
        assert_eq!(WitVersion::default(), WitVersion::V0_1);
    }
}
