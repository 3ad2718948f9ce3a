//! One task owns each adapter's store: calls arrive on a channel and run one at a time
//! under the call deadline and the memory limit. A trap poisons an instance, so the next
//! call gets a fresh one.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store};

use super::bindings::{AdapterInfo, Plan, RuntimeAdapter, Workload};
use super::host::{CallContext, MemoryLimit, State};
use super::manifest::Granted;
use super::{PluginError, EPOCH_TICK};
use crate::criu::Criu;

/// A call into an adapter.
pub enum Call {
    Describe,
    Probe(Workload),
    Prepare(Workload),
    StartFresh(Workload),
    Checkpoint(Workload),
    Restore(Workload, Vec<(String, String)>),
    ResumeSource(Workload),
    ReleaseSource(Workload),
}

impl Call {
    pub fn name(&self) -> &'static str {
        match self {
            Call::Describe => "describe",
            Call::Probe(_) => "probe",
            Call::Prepare(_) => "prepare",
            Call::StartFresh(_) => "start-fresh",
            Call::Checkpoint(_) => "checkpoint",
            Call::Restore(..) => "restore",
            Call::ResumeSource(_) => "resume-source",
            Call::ReleaseSource(_) => "release-source",
        }
    }
}

pub enum Reply {
    Info(AdapterInfo),
    Plan(Plan),
    Unit,
    Pid(i32),
    MaybePid(Option<i32>),
    Notes(Vec<(String, String)>),
}

pub struct Request {
    pub call: Call,
    pub ctx: CallContext,
    pub reply: oneshot::Sender<(Result<Reply, PluginError>, CallContext)>,
}

pub struct Limits {
    pub call_timeout: Duration,
    pub memory_bytes: usize,
}

pub struct Actor {
    pub name: String,
    pub engine: Engine,
    pub component: Component,
    pub linker: Arc<Linker<State>>,
    pub granted: Arc<Granted>,
    pub criu: Criu,
    pub limits: Limits,
}

struct Instance {
    store: Store<State>,
    bindings: RuntimeAdapter,
}

impl Actor {
    pub async fn run(self, mut rx: mpsc::Receiver<Request>) {
        let mut instance: Option<Instance> = None;
        while let Some(req) = rx.recv().await {
            let call_name = req.call.name();
            let started = std::time::Instant::now();
            let (result, ctx, healthy) = self.serve(&mut instance, req.call, req.ctx).await;
            if !healthy {
                instance = None;
            }
            tracing::debug!(plugin = %self.name, call = call_name, us = started.elapsed().as_micros() as u64, ok = result.is_ok(), "adapter call");
            let _ = req.reply.send((result, ctx));
        }
    }

    async fn instantiate(&self) -> Result<Instance, PluginError> {
        let state = State {
            plugin: self.name.clone(),
            granted: Arc::clone(&self.granted),
            criu: self.criu.clone(),
            wasi: wasmtime_wasi::WasiCtxBuilder::new().build(),
            table: wasmtime::component::ResourceTable::new(),
            memory: MemoryLimit {
                max_bytes: self.limits.memory_bytes,
                hit: false,
            },
            ctx: CallContext::default(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.memory);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.deadline_ticks());
        let bindings = RuntimeAdapter::instantiate_async(&mut store, &self.component, &self.linker)
            .await
            .map_err(|e| PluginError::Load {
                name: self.name.clone(),
                detail: format!("cannot instantiate: {e:#}"),
            })?;
        Ok(Instance { store, bindings })
    }

    fn deadline_ticks(&self) -> u64 {
        (self.limits.call_timeout.as_millis() as u64)
            .div_ceil(EPOCH_TICK.as_millis() as u64)
            .max(1)
    }

    /// Runs one call; returns its result, the context back, and whether the instance may
    /// be reused.
    async fn serve(
        &self,
        slot: &mut Option<Instance>,
        call: Call,
        ctx: CallContext,
    ) -> (Result<Reply, PluginError>, CallContext, bool) {
        let name = call.name();
        if slot.is_none() {
            match self.instantiate().await {
                Ok(i) => *slot = Some(i),
                Err(e) => return (Err(e), ctx, false),
            }
        }
        let Some(inst) = slot.as_mut() else {
            return (
                Err(PluginError::Gone {
                    plugin: self.name.clone(),
                }),
                ctx,
                false,
            );
        };
        inst.store.data_mut().ctx = ctx;
        inst.store.data_mut().memory.hit = false;
        inst.store.data_mut().reset_wasi();
        inst.store.set_epoch_deadline(self.deadline_ticks());
        let rt = inst.bindings.ferry_adapter_runtime();
        let store = &mut inst.store;
        let outcome = match call {
            Call::Describe => rt
                .call_describe(&mut *store)
                .await
                .map(|i| Ok(Reply::Info(i))),
            Call::Probe(w) => rt
                .call_probe(&mut *store, &w)
                .await
                .map(|p| Ok(Reply::Plan(p))),
            Call::Prepare(w) => rt
                .call_prepare(&mut *store, &w)
                .await
                .map(|r| r.map(|_| Reply::Unit)),
            Call::StartFresh(w) => rt
                .call_start_fresh(&mut *store, &w)
                .await
                .map(|r| r.map(Reply::Pid)),
            Call::Checkpoint(w) => rt
                .call_checkpoint(&mut *store, &w)
                .await
                .map(|r| r.map(Reply::Notes)),
            Call::Restore(w, notes) => rt
                .call_restore(&mut *store, &w, &notes)
                .await
                .map(|r| r.map(Reply::Pid)),
            Call::ResumeSource(w) => rt
                .call_resume_source(&mut *store, &w)
                .await
                .map(|r| r.map(Reply::MaybePid)),
            Call::ReleaseSource(w) => rt
                .call_release_source(&mut *store, &w)
                .await
                .map(|r| r.map(|_| Reply::Unit)),
        };
        let ctx = std::mem::take(&mut store.data_mut().ctx);
        let plugin = self.name.clone();
        match outcome {
            Ok(Ok(reply)) => (Ok(reply), ctx, true),
            Ok(Err(e)) => (Err(PluginError::from_adapter(&plugin, name, e)), ctx, true),
            Err(trap) => {
                let err = if store.data().memory.hit {
                    PluginError::Memory {
                        plugin,
                        call: name,
                        mb: self.limits.memory_bytes >> 20,
                    }
                } else if matches!(
                    trap.downcast_ref::<wasmtime::Trap>(),
                    Some(wasmtime::Trap::Interrupt)
                ) {
                    PluginError::Deadline {
                        plugin,
                        call: name,
                        ms: self.limits.call_timeout.as_millis() as u64,
                    }
                } else {
                    PluginError::Trap {
                        plugin,
                        call: name,
                        detail: format!("{trap:#}")
                            .lines()
                            .take(3)
                            .collect::<Vec<_>>()
                            .join(" "),
                    }
                };
                tracing::warn!(error = %err, "adapter call aborted; the instance is discarded");
                (Err(err), ctx, false)
            }
        }
    }
}
