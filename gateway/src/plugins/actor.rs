//! One task owns each adapter's store: calls arrive on a channel and run one at a time
//! under the call deadline and the memory limit. A trap poisons an instance, so the next
//! call gets a fresh one.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use wasmtime::component::Component;
use wasmtime::{Engine, Store};

use super::bindings::{hooks, Guest, Linkers, WitVersion, World};
use super::call::{AdapterCall, Call, Reply, Spawned};
use super::grant::Granted;
use super::host::{MemoryLimit, State, TunnelOpener};
use super::PluginError;
use crate::criu::Criu;
use crate::spec::Hook;
use crate::sys::process;

/// Splits the call into what the guest is told and what the host may act on.
fn split(call: Call) -> (Option<AdapterCall>, Op) {
    match call {
        Call::Describe => (None, Op::Describe),
        Call::Probe(c) => (Some(c), Op::Probe),
        Call::Prepare(c) => (Some(c), Op::Prepare),
        Call::StartFresh(c) => (Some(c), Op::StartFresh),
        Call::Checkpoint(c) => (Some(c), Op::Checkpoint),
        Call::Restore(c, notes) => (Some(c), Op::Restore(notes)),
        Call::ResumeSource(c) => (Some(c), Op::ResumeSource),
        Call::ReleaseSource(c) => (Some(c), Op::ReleaseSource),
        Call::StartSync(c) => (Some(c), Op::StartSync),
        Call::SyncProgress(c) => (Some(c), Op::SyncProgress),
        Call::Fence(c) => (Some(c), Op::Fence),
        Call::Unfence(c) => (Some(c), Op::Unfence),
        Call::CutOver(c, mark) => (Some(c), Op::CutOver(mark)),
        Call::AbortSync(c) => (Some(c), Op::AbortSync),
        Call::Hook(c, hook, id) => (Some(c), Op::Hook(hook, id)),
    }
}

/// A call's operation, once its [`AdapterCall`] is in the store.
enum Op {
    Describe,
    Probe,
    Prepare,
    StartFresh,
    Checkpoint,
    Restore(Vec<(String, String)>),
    ResumeSource,
    ReleaseSource,
    StartSync,
    SyncProgress,
    Fence,
    Unfence,
    CutOver(String),
    AbortSync,
    Hook(Hook, String),
}

/// How long past its deadline a call may stay in a host function before it is abandoned.
const HOST_GRACE: Duration = Duration::from_secs(1);

pub struct Request {
    pub call: Call,
    pub reply: oneshot::Sender<Result<Reply, PluginError>>,
}

pub struct Limits {
    pub call_timeout: Duration,
    pub memory_bytes: usize,
}

pub struct Actor {
    pub name: String,
    pub engine: Engine,
    pub component: Component,
    /// The version of `ferry:adapter` the manifest names: which linker and bindings serve it.
    pub wit: WitVersion,
    /// The world the component implements.
    pub world: World,
    pub linkers: Arc<Linkers>,
    pub tunnels: Option<Arc<dyn TunnelOpener>>,
    pub granted: Arc<Granted>,
    pub criu: Criu,
    pub limits: Limits,
    /// Where its `exec` programs are recorded while they run.
    pub inflight: Option<Arc<super::inflight::Inflight>>,
}

struct Instance {
    store: Store<State>,
    guest: Guest,
    /// Its `ferry:hooks` exports, if it has them.
    hooks: Option<hooks::WorkloadHooks>,
}

impl Actor {
    pub async fn run(self, mut rx: mpsc::Receiver<Request>) {
        let mut instance: Option<Instance> = None;
        while let Some(req) = rx.recv().await {
            let call_name = req.call.name();
            let started = std::time::Instant::now();
            let (result, healthy) = self.serve(&mut instance, req.call).await;
            if !healthy {
                instance = None;
            }
            tracing::debug!(plugin = %self.name, call = call_name, us = started.elapsed().as_micros() as u64, ok = result.is_ok(), "adapter call");
            let _ = req.reply.send(result);
        }
    }

    async fn instantiate(&self) -> Result<Instance, PluginError> {
        let state = State {
            plugin: self.name.clone(),
            tunnels: self.tunnels.clone(),
            granted: Arc::clone(&self.granted),
            criu: self.criu.clone(),
            wasi: wasmtime_wasi::WasiCtxBuilder::new().build(),
            table: wasmtime::component::ResourceTable::new(),
            memory: MemoryLimit {
                max_bytes: self.limits.memory_bytes,
                hit: false,
            },
            call: None,
            spawned: None,
            dump_port: None,
            inflight: self.inflight.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.memory);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.deadline_ticks());
        let (guest, hooks) = Guest::instantiate(
            self.wit,
            self.world,
            &mut store,
            &self.component,
            &self.linkers,
        )
        .await
        .map_err(|e| PluginError::Load {
            name: self.name.clone(),
            detail: format!("cannot instantiate: {e:#}"),
        })?;
        Ok(Instance {
            store,
            guest,
            hooks,
        })
    }

    fn deadline_ticks(&self) -> u64 {
        super::deadline_ticks(self.limits.call_timeout)
    }

    /// Runs one call; returns its result and whether the instance may be reused.
    async fn serve(
        &self,
        slot: &mut Option<Instance>,
        call: Call,
    ) -> (Result<Reply, PluginError>, bool) {
        let name = call.name();
        if slot.is_none() {
            match self.instantiate().await {
                Ok(i) => *slot = Some(i),
                Err(e) => return (Err(e), false),
            }
        }
        let Some(inst) = slot.as_mut() else {
            return (
                Err(PluginError::Gone {
                    plugin: self.name.clone(),
                }),
                false,
            );
        };
        let (about, op) = split(call);
        let w = about.as_ref().map(AdapterCall::view);
        inst.store.data_mut().call = about;
        inst.store.data_mut().spawned = None;
        inst.store.data_mut().dump_port = None;
        inst.store.data_mut().memory.hit = false;
        inst.store.data_mut().reset_wasi();
        inst.store.set_epoch_deadline(self.deadline_ticks());
        let guest = &inst.guest;
        let hooks = inst.hooks.as_ref();
        let store = &mut inst.store;
        // The epoch deadline stops guest code; this bounds a call blocked in the host (a
        // socket read the guest waits on) too. Either way the instance is discarded.
        let limit = self.limits.call_timeout + HOST_GRACE;
        let outcome = tokio::time::timeout(limit, async {
            match (op, w) {
                (Op::Describe, _) => guest.describe(store).await.map(|i| Ok(Reply::Info(i))),
                (_, None) => Ok(Err(super::bindings::AdapterError::Failed(
                    "the call names no workload".into(),
                ))),
                (Op::Probe, Some(w)) => guest.probe(store, &w).await.map(|p| Ok(Reply::Plan(p))),
                (Op::Prepare, Some(w)) => guest
                    .prepare(store, &w)
                    .await
                    .map(|r| r.map(|()| Reply::Unit)),
                (Op::StartFresh, Some(w)) => guest
                    .start_fresh(store, &w)
                    .await
                    .map(|r| r.map(Reply::Pid)),
                (Op::Checkpoint, Some(w)) => guest
                    .checkpoint(store, &w)
                    .await
                    .map(|r| r.map(Reply::Notes)),
                (Op::Restore(notes), Some(w)) => guest
                    .restore(store, &w, notes)
                    .await
                    .map(|r| r.map(Reply::Pid)),
                (Op::ResumeSource, Some(w)) => guest
                    .resume_source(store, &w)
                    .await
                    .map(|r| r.map(Reply::MaybePid)),
                (Op::ReleaseSource, Some(w)) => guest
                    .release_source(store, &w)
                    .await
                    .map(|r| r.map(|()| Reply::Unit)),
                (Op::StartSync, Some(w)) => guest
                    .start_sync(store, &w)
                    .await
                    .map(|r| r.map(|()| Reply::Unit)),
                (Op::SyncProgress, Some(w)) => guest
                    .sync_progress(store, &w)
                    .await
                    .map(|r| r.map(Reply::Progress)),
                (Op::Fence, Some(w)) => guest.fence(store, &w).await.map(|r| r.map(Reply::Mark)),
                (Op::Unfence, Some(w)) => guest
                    .unfence(store, &w)
                    .await
                    .map(|r| r.map(|()| Reply::Unit)),
                (Op::CutOver(mark), Some(w)) => guest
                    .cut_over(store, &w, &mark)
                    .await
                    .map(|r| r.map(|()| Reply::Unit)),
                (Op::AbortSync, Some(w)) => guest
                    .abort_sync(store, &w)
                    .await
                    .map(|r| r.map(|()| Reply::Unit)),
                (Op::Hook(hook, id), Some(w)) => {
                    let about = hooks::About {
                        workload: w.name,
                        site: w.site,
                        id,
                        settings: w.settings,
                    };
                    let exports = hooks.map(hooks::WorkloadHooks::ferry_hooks_hooks);
                    match (exports, hook) {
                        (None, _) => Ok(Ok(())),
                        (Some(e), Hook::PostCheckpoint) => {
                            e.call_post_checkpoint(&mut *store, &about).await
                        }
                        (Some(e), Hook::PreRestore) => {
                            e.call_pre_restore(&mut *store, &about).await
                        }
                    }
                    .map(|r| {
                        r.map(|()| Reply::Unit)
                            .map_err(super::bindings::AdapterError::Failed)
                    })
                }
            }
        })
        .await;
        let Ok(outcome) = outcome else {
            let err = PluginError::Deadline {
                plugin: self.name.clone(),
                call: name,
                ms: self.limits.call_timeout.as_millis() as u64,
            };
            tracing::warn!(error = %err, "adapter call stuck in the host; the instance is discarded");
            if let Some(mut s) = inst.store.data_mut().spawned.take() {
                process::kill(s.pid);
                let _ = s.holder.start_kill();
            }
            return (Err(err), false);
        };
        store.data_mut().call = None;
        let spawned = store.data_mut().spawned.take();
        let plugin = self.name.clone();
        match outcome {
            // A start hands back the process it started, with the holder when the host's
            // `process.spawn` made it.
            Ok(Ok(Reply::Pid(pid))) if name == "start-fresh" => {
                let holder = spawned.filter(|s| s.pid == pid).map(|s| s.holder);
                (Ok(Reply::Started(Spawned { pid, holder })), true)
            }
            Ok(Ok(reply)) => (Ok(reply), true),
            Ok(Err(e)) => (Err(PluginError::from_adapter(&plugin, name, e)), true),
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
                // A process the guest started before it trapped is not left behind.
                if let Some(mut s) = spawned {
                    process::kill(s.pid);
                    let _ = s.holder.start_kill();
                }
                (Err(err), false)
            }
        }
    }
}
