//! Restart deciders: `ferry:decider@0.1.0` components (`wit/ferry-decider@0.1.0`, world
//! `restart-decider`), one pure function each, installed as `DIR/deciders/NAME.wasm`
//! beside the adapters. A decider is given WASI that reaches nothing (no preopened
//! directory, no socket, no environment) and runs under the site's call deadline and
//! memory limit; it is compiled (and cached) on first use.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::host::MemoryLimit;
use crate::spec::RestartAction;

wasmtime::component::bindgen!({
    path: "../wit/ferry-decider@0.1.0",
    world: "restart-decider",
    exports: { default: async },
});

struct DeciderState {
    wasi: WasiCtx,
    table: ResourceTable,
    memory: MemoryLimit,
}

impl WasiView for DeciderState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

pub struct Deciders {
    engine: Engine,
    linker: Linker<DeciderState>,
    dir: PathBuf,
    cache_dir: PathBuf,
    call_timeout: Duration,
    memory_bytes: usize,
    loaded: Mutex<HashMap<String, Component>>,
}

impl Deciders {
    pub fn new(
        engine: &Engine,
        plugins_dir: &std::path::Path,
        cache_dir: &std::path::Path,
        call_timeout: Duration,
        memory_limit_mb: u64,
    ) -> Result<Self, String> {
        let mut linker = Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| e.to_string())?;
        Ok(Self {
            engine: engine.clone(),
            linker,
            dir: plugins_dir.join("deciders"),
            cache_dir: cache_dir.to_path_buf(),
            call_timeout,
            memory_bytes: usize::try_from(memory_limit_mb << 20).unwrap_or(usize::MAX),
            loaded: Mutex::new(HashMap::new()),
        })
    }

    fn component(&self, name: &str) -> Result<Component, String> {
        crate::names::validate("decider", name).map_err(|e| e.to_string())?;
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = loaded.get(name) {
            return Ok(c.clone());
        }
        let wasm = self.dir.join(format!("{name}.wasm"));
        if !wasm.is_file() {
            return Err(format!(
                "no decider {name:?}: install it as {}",
                wasm.display()
            ));
        }
        let c = super::compile(&self.engine, name, &wasm, &self.cache_dir)?;
        loaded.insert(name.to_string(), c.clone());
        Ok(c)
    }

    /// Asks decider `name` what to do with an ended workload.
    pub async fn decide(
        &self,
        name: &str,
        info: &crate::spec::ExitInfo,
    ) -> Result<RestartAction, String> {
        let component = self.component(name)?;
        let state = DeciderState {
            wasi: wasmtime_wasi::WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
            memory: MemoryLimit {
                max_bytes: self.memory_bytes,
                hit: false,
            },
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.memory);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(super::deadline_ticks(self.call_timeout));
        let input = ExitInfo {
            exit_code: info.exit_code,
            signal: info.signal,
            restarts: info.restarts,
            checkpoint_age_secs: info.checkpoint_age_secs,
        };
        let call = async {
            let d = RestartDecider::instantiate_async(&mut store, &component, &self.linker)
                .await
                .map_err(|e| format!("decider {name} does not instantiate: {e:#}"))?;
            d.call_decide(&mut store, input)
                .await
                .map_err(|e| format!("decider {name} failed: {e:#}"))
        };
        let action = tokio::time::timeout(self.call_timeout + Duration::from_secs(1), call)
            .await
            .map_err(|_| format!("decider {name} exceeded its deadline"))??;
        Ok(match action {
            Action::Restore => RestartAction::Restore,
            Action::Fresh => RestartAction::Fresh,
            Action::Standby => RestartAction::Standby,
        })
    }
}
