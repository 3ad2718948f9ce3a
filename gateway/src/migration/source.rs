//! The source side of a migration: prepare the destination, checkpoint, stream the
//! image, ask for the restore, then release the source or roll back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{ms, remove_dir, Engine, MigrationError, Phase, Role};
use crate::criu::layout;
use crate::peer::wire::{Request, Response, TargetState};
use crate::plugins::AdapterCall;
use crate::proxy::Target;
use crate::spec::{WorkloadSpec, WorkloadState};
use crate::transfer::{self, FileMeta};
use crate::workload::WorkloadError;

/// What the destination says about a restore whose outcome the source did not hear.
pub(super) enum Verdict {
    Confirmed,
    NotRestored,
    /// Shutting down before the destination answered: stay frozen, recovery continues.
    Pending,
}

pub(super) async fn run(engine: Arc<Engine>, id: String) {
    let started = Instant::now();
    let driven = drive(&engine, &id).await;
    // Past this point an abort is refused: its token has nothing left to wake.
    super::locked(&engine.aborts).remove(&id);
    // A transfer that failed leaves its live counter behind.
    engine.sending.remove(&id);
    match driven {
        Ok(freeze) => {
            let postcopy = engine
                .get(&id)
                .is_some_and(|m| m.options.mode.as_deref() == Some("postcopy"));
            let finished = if postcopy {
                // The downtime ends at the confirmation; pages follow while B runs.
                let _ = engine.update(&id, |m| m.timings.freeze_ms = Some(ms(freeze.elapsed())));
                match engine.page_phase(&id).await {
                    Ok(super::postcopy::Paged::Complete) => cut_over(&engine, &id, None).await,
                    Ok(super::postcopy::Paged::DestinationLost(reason)) => {
                        let workload = engine.get(&id).map(|m| m.workload).unwrap_or_default();
                        finish_rollback(&engine, &id, &workload, reason).await;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            } else {
                cut_over(&engine, &id, Some(freeze)).await
            };
            if let Err(e) = finished {
                tracing::error!(error = %e, "cut-over failed; recovery finishes it on restart");
            } else {
                tracing::info!(
                    ms = started.elapsed().as_millis() as u64,
                    "migration completed"
                );
            }
        }
        Err(MigrationError::Crashed { phase }) => {
            tracing::warn!(%phase, "injected crash: the source's driver stops here");
        }
        Err(failure) => {
            tracing::warn!(error = %failure, "migration failed");
            rollback(&engine, &id, failure.to_string()).await;
        }
    }
}

/// Runs the forward path; returns the freeze start once the destination has confirmed.
async fn drive(engine: &Arc<Engine>, id: &str) -> Result<Instant, MigrationError> {
    let started = Instant::now();
    let m = engine
        .get(id)
        .ok_or_else(|| MigrationError::NotFound(id.to_string()))?;
    let target = m.target.clone();
    let workload = engine
        .workloads
        .get(&m.workload)
        .ok_or_else(|| MigrationError::Workload(WorkloadError::NotFound(m.workload.clone())))?;
    if workload.pid.is_none() {
        return Err(MigrationError::Workload(WorkloadError::NotRunning {
            name: m.workload.clone(),
            state: workload.state,
        }));
    }
    // Checked (and planned) as the move was asked for; planned here otherwise.
    let plan = match engine.take_early_plan(id) {
        Some(plan) => plan,
        None => engine.plan(&workload, &target, &m.options).await?,
    };
    let chosen = plan.chosen().cloned();
    engine.update(id, |m| {
        m.candidates.clone_from(&plan.candidates);
        m.approach = chosen.as_ref().map(|c| c.approach.clone());
        m.plan = Some(match &chosen {
            Some(c) => format!("{}: {} (adapter {})", plan.why, c.reason, c.adapter),
            None => plan.why.clone(),
        });
        if plan.destination != m.spec {
            m.destination = Some(plan.destination.clone());
        }
        if chosen.as_ref().is_some_and(|c| c.approach == "service") {
            m.service = chosen.as_ref().map(|c| c.adapter.clone());
        }
        // A checkpoint's mode as chosen (auto picks one): the record says which ran.
        if let Some(mode) = chosen.as_ref().and_then(|c| c.mode.clone()) {
            m.options.mode = Some(mode);
        }
    })?;
    let Some(chosen) = chosen else {
        return Err(MigrationError::Refused {
            site: engine.site.clone(),
            message: plan.why,
        });
    };
    if chosen.approach == "service" {
        return super::service::drive(engine, id, &plan.destination, &chosen.adapter).await;
    }
    let adapter = engine.plugins.adapter(&m.spec.runtime)?;
    let mut about = AdapterCall::for_workload(&workload).with_peer(&target);
    let postcopy = chosen.mode.as_deref() == Some("postcopy");
    if postcopy {
        engine
            .postcopy_capable(&m.spec.runtime)
            .map_err(|message| MigrationError::Refused {
                site: engine.site.clone(),
                message,
            })?;
        about.postcopy = true;
    }

    // A warm destination: the pages it holds for this workload go as their digests (asked
    // beside the preparation: one round trip less before the pages go ahead).
    let (prepared, held) = tokio::join!(
        prepare(engine, id, &target, &m.spec, None),
        held_at(engine, &target, &m.workload)
    );
    prepared?;

    let images = engine.images_dir.join(id);
    std::fs::create_dir_all(&images).map_err(|source| MigrationError::Io {
        what: "create the image directory",
        path: images.clone(),
        source,
    })?;

    // While it still runs: its volumes' files go ahead, so only what changes is left.
    let mut volume_scan = volumes_precopy(engine, id, &target, &m.spec).await?;

    if postcopy && engine.prepush {
        // While it still runs: its pages go ahead, so few are left for the switch.
        if let Some(pid) = workload.pid {
            engine
                .abortable(id, async {
                    engine.prepush(id, &target, pid, held.clone()).await;
                    Ok(())
                })
                .await?;
        }
    }
    engine.update(id, |m| m.timings.prepare_ms = Some(ms(started.elapsed())))?;
    // Clients see the pause from here: their traffic is held until the workload runs again.
    let freeze = hold_clients(engine, &m.workload).await;
    engine.enter_phase(id, Phase::Checkpointing).await?;
    // Page images go to the destination while the checkpoint writes them.
    let (dumped, dumping) = watch::channel(false);
    let channel = Arc::new(
        engine
            .peers
            .files(&target, id)?
            .with_held(held)
            .with_progress(engine.sending_progress(id)),
    );
    let layout = transfer::Layout {
        grows: layout::is_page_image,
        local_only: layout::is_local_only,
        parallel: engine.parallel_files,
    };
    let sending = {
        let images = images.clone();
        tokio::spawn(async move { transfer::send_image(channel, &images, layout, dumping).await })
    };
    // Post-copy: once CRIU has frozen the tree, the pages written since they went ahead
    // are found while it dumps.
    let dump_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let early = if postcopy {
        engine.settle_while_dumping(id, &target, workload.pid, Arc::clone(&dump_over))
    } else {
        None
    };
    let checkpoint = adapter
        .checkpoint(about.clone().with_images(images.clone()))
        .await;
    dump_over.store(true, std::sync::atomic::Ordering::Release);
    let _ = dumped.send(true);
    let notes = match checkpoint {
        Ok(notes) => notes,
        Err(e) => {
            sending.abort();
            return Err(e.into());
        }
    };
    // Off the freeze path: the site's and the adapter's post-checkpoint hooks run beside
    // the move.
    {
        let (hooks, site, workload, id) = (
            engine.hooks.clone(),
            engine.site.clone(),
            m.workload.clone(),
            id.to_string(),
        );
        let (adapter, call) = (adapter.clone(), about.clone());
        engine.tasks.spawn(async move {
            let about = crate::hooks::About {
                workload: &workload,
                site: &site,
                id: &id,
                adapter: Some((&adapter, &call)),
            };
            if let Err(e) = hooks.run(crate::hooks::Hook::PostCheckpoint, &about).await {
                tracing::warn!(migration = %id, error = %e, "post-checkpoint hook failed; the move goes on");
            }
        });
    }
    if postcopy {
        engine.adopt_lazy_dump(id, &images, workload.pid).await?;
        // Frozen now: which pages sent ahead were written since is found while the
        // destination restores, and opens its bulk page connection.
        engine.settle_stale(id, &target, workload.pid, early);
    }
    // Timings and counts go to the journal with the next step (one write less while
    // frozen).
    engine.note(id, |m| m.timings.dump_ms = Some(ms(freeze.elapsed())))?;

    if let Err(e) = engine.enter_phase(id, Phase::Transferring).await {
        sending.abort();
        return Err(e);
    }
    let t = Instant::now();
    let abort = sending.abort_handle();
    // Frozen: what changed in its volumes since the pre-copy goes beside the image.
    let (sent, delta) = tokio::join!(
        engine.abortable(id, async {
            Ok(sending.await.map_err(transfer::TransferError::Task)??)
        }),
        volumes_delta(engine, id, &target, &m.spec, volume_scan.as_mut())
    );
    let sent = sent.inspect_err(|_| abort.abort())?;
    delta?;
    // The record counts the transfer now; its live counter goes.
    engine.sending.remove(id);
    engine.note(id, |m| {
        m.timings.transfer_ms = Some(ms(t.elapsed()));
        m.bytes_moved += sent.iter().map(|f| f.meta.size).sum::<u64>();
        m.bytes_on_wire += sent.iter().map(|f| f.wire_bytes).sum::<u64>();
        m.bytes_deduped += sent.iter().map(|f| f.deduped).sum::<u64>();
        m.files = u32::try_from(sent.len()).unwrap_or(u32::MAX);
    })?;
    let manifest: Vec<FileMeta> = sent.into_iter().map(|f| f.meta).collect();

    request_switch(engine, id).await?;
    confirm(
        engine,
        id,
        &target,
        Request::Restore {
            migration: id.to_string(),
            workload: m.spec.clone(),
            source_log: workload.log.clone(),
            manifest,
            notes,
            postcopy,
            volumes: volume_scan.is_some(),
        },
    )
    .await?;
    Ok(freeze)
}

/// The page blocks `target` holds for `workload` (none when it holds none or cannot say:
/// every page then goes whole).
async fn held_at(engine: &Engine, target: &str, workload: &str) -> Option<Arc<transfer::HeldSet>> {
    let checkpoints = engine.checkpoints.as_ref()?;
    let started = Instant::now();
    match checkpoints.ask_held(target, workload).await {
        Ok(held) if held.is_empty() => None,
        Ok(held) => {
            tracing::info!(%target, %workload, blocks = held.len(), ms = ms(started.elapsed()), "the destination holds pages of this workload; they go as digests");
            Some(Arc::new(held))
        }
        Err(e) => {
            tracing::warn!(%target, %workload, error = %e, "cannot learn which pages the destination holds; every page goes whole");
            None
        }
    }
}

/// The site's checkpoints, through which volumes travel.
fn volume_store(engine: &Engine) -> Result<&Arc<crate::checkpoint::Checkpoints>, MigrationError> {
    engine
        .checkpoints
        .as_ref()
        .ok_or_else(|| MigrationError::Refused {
            site: engine.site.clone(),
            message: "this site has no block store to move volumes through".into(),
        })
}

fn volume_error(engine: &Engine, e: &crate::checkpoint::CheckpointError) -> MigrationError {
    MigrationError::Refused {
        site: engine.site.clone(),
        message: format!("moving the volumes: {e}"),
    }
}

/// Before the freeze: every file of the workload's volumes stored here, the blocks the
/// destination lacks sent (none: it has no volumes).
async fn volumes_precopy(
    engine: &Arc<Engine>,
    id: &str,
    target: &str,
    spec: &WorkloadSpec,
) -> Result<Option<crate::checkpoint::volume::Scan>, MigrationError> {
    if spec.volumes.is_empty() {
        return Ok(None);
    }
    let store = volume_store(engine)?;
    let mut scan = crate::checkpoint::volume::Scan::default();
    let started = Instant::now();
    let mut sync = engine
        .abortable(id, async {
            let (manifest, sync) = store
                .sync_volumes(&spec.name, &spec.volumes, target, &mut scan)
                .await
                .map_err(|e| volume_error(engine, &e))?;
            // The destination writes the files now, so the freeze only adds the delta.
            let wire = store
                .send_manifest(target, &spec.name, id, &manifest, true)
                .await
                .map_err(|e| volume_error(engine, &e))?;
            Ok(crate::checkpoint::volume::VolumeSync {
                wire_bytes: sync.wire_bytes + wire,
                ..sync
            })
        })
        .await?;
    sync.ms = ms(started.elapsed());
    engine.update(id, |m| {
        m.volumes.get_or_insert_with(Default::default).precopy = Some(sync);
        m.bytes_on_wire += sync.wire_bytes;
    })?;
    Ok(Some(scan))
}

/// While frozen: what changed in the volumes since the pre-copy, then the manifest.
async fn volumes_delta(
    engine: &Arc<Engine>,
    id: &str,
    target: &str,
    spec: &WorkloadSpec,
    scan: Option<&mut crate::checkpoint::volume::Scan>,
) -> Result<(), MigrationError> {
    let Some(scan) = scan else {
        return Ok(());
    };
    let store = volume_store(engine)?;
    let started = Instant::now();
    let (files, sync) = store
        .sync_volumes(&spec.name, &spec.volumes, target, scan)
        .await
        .map_err(|e| volume_error(engine, &e))?;
    let wire = store
        .send_manifest(target, &spec.name, id, &files, false)
        .await
        .map_err(|e| volume_error(engine, &e))?;
    engine.update(id, |m| {
        m.timings.volume_delta_ms = Some(ms(started.elapsed()));
        m.volumes.get_or_insert_with(Default::default).delta = Some(sync);
        m.bytes_on_wire += sync.wire_bytes + wire;
    })?;
    Ok(())
}

/// Holds the workload's client traffic (the freeze starts); returns when it started.
pub(super) async fn hold_clients(engine: &Engine, workload: &str) -> Instant {
    let freeze = Instant::now();
    let held = engine.ingress.hold(workload).await;
    if !held.drained {
        tracing::warn!(
            connections = held.connections,
            "some client connections were still busy at the drain deadline"
        );
    }
    freeze
}

/// From here the destination may run the workload (restore, promote): recorded before
/// it is asked, so a rollback knows to ask it first.
pub(super) async fn request_switch(engine: &Engine, id: &str) -> Result<(), MigrationError> {
    engine
        .faults
        .enter(Role::Source, Phase::Restoring, &engine.cancel)
        .await?;
    // One step with the abort check: an abort either lands before (and the move rolls
    // back) or is refused after.
    let m = engine.update(id, |m| {
        if !m.abort_requested {
            m.phase = Phase::Restoring;
            m.restore_requested = true;
        }
    })?;
    if m.abort_requested {
        return Err(MigrationError::Aborted);
    }
    Ok(())
}

/// Enters `preparing` and has `target` reserve the workload (with `service`, start a fresh
/// instance for that service adapter to sync).
pub(super) async fn prepare(
    engine: &Arc<Engine>,
    id: &str,
    target: &str,
    workload: &WorkloadSpec,
    service: Option<&str>,
) -> Result<(), MigrationError> {
    engine.enter_phase(id, Phase::Preparing).await?;
    let generation = prepare_destination(
        engine,
        target,
        Request::Prepare {
            migration: id.to_string(),
            workload: workload.clone(),
            service: service.map(str::to_string),
        },
    )
    .await?;
    if generation.is_some() {
        engine.update(id, |m| m.destination_generation = generation)?;
    }
    Ok(())
}

/// Asks `target` to prepare; anything but `Ready` (or `Prepared`, with the generation of
/// its journal) is its refusal.
pub(super) async fn prepare_destination(
    engine: &Arc<Engine>,
    target: &str,
    req: Request,
) -> Result<Option<u64>, MigrationError> {
    match engine.peers.request(target, &req).await? {
        Response::Ready => Ok(None),
        Response::Prepared { generation } => Ok(Some(generation)),
        Response::Error { message, .. } => Err(MigrationError::Refused {
            site: target.to_string(),
            message,
        }),
        other => Err(MigrationError::Refused {
            site: target.to_string(),
            message: format!("unexpected answer {other:?}"),
        }),
    }
}

/// Sends the request that makes the destination run the workload (a restore, a
/// promotion) and returns once it confirmed. If the answer is lost, only the destination
/// knows what happened: it is asked until it says.
pub(super) async fn confirm(
    engine: &Arc<Engine>,
    id: &str,
    target: &str,
    req: Request,
) -> Result<(), MigrationError> {
    let target = target.to_string();
    let stall = engine.stall_watch(id, &target, "whether it restored the workload");
    let answer = tokio::select! {
        a = engine.peers.request(&target, &req) => a,
        never = stall.watch(engine) => match never {},
    };
    if answer.is_ok() {
        stall.answered(engine);
    }
    match answer {
        Ok(Response::Restored { restore_ms, pid }) => {
            tracing::info!(
                peer_pid = pid,
                restore_ms,
                "destination confirmed the restore"
            );
            engine.note(id, |m| m.timings.restore_ms = Some(restore_ms))?;
            Ok(())
        }
        Ok(Response::Error { message, .. }) => Err(MigrationError::RestoreFailed {
            site: target,
            message,
        }),
        Ok(other) => Err(MigrationError::RestoreFailed {
            site: target,
            message: format!("unexpected answer {other:?}"),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "lost the restore answer; asking the destination");
            match resolve(engine, id, &target).await {
                Verdict::Confirmed => Ok(()),
                Verdict::NotRestored => Err(MigrationError::RestoreFailed {
                    site: target,
                    message: format!(
                        "link lost during the restore ({e}); destination holds no copy"
                    ),
                }),
                Verdict::Pending => Err(MigrationError::Peer(e)),
            }
        }
    }
}

/// Asks the destination, until it answers, whether it restored the workload.
pub(super) async fn resolve(engine: &Arc<Engine>, id: &str, target: &str) -> Verdict {
    let stall = engine.stall_watch(id, target, "whether it restored the workload");
    let verdict = tokio::select! {
        v = resolve_waiting(engine, id, target, &stall) => v,
        never = stall.watch(engine) => match never {},
    };
    stall.answered(engine);
    verdict
}

async fn resolve_waiting(
    engine: &Arc<Engine>,
    id: &str,
    target: &str,
    stall: &super::StallWatch,
) -> Verdict {
    let mut delay = Duration::from_millis(200);
    let mut noted = false;
    // The generation the destination's journal had once it recorded this migration.
    let fenced_at = engine.get(id).and_then(|m| m.destination_generation);
    loop {
        match engine
            .peers
            .request(
                target,
                &Request::Status {
                    migration: id.to_string(),
                    wait_ms: 0,
                },
            )
            .await
        {
            Ok(Response::Status {
                state: TargetState::Confirmed | TargetState::Paging,
                ..
            }) => return Verdict::Confirmed,
            Ok(Response::Status {
                state: TargetState::Restoring,
                ..
            }) => stall.answered(engine),
            Ok(Response::Status {
                generation: Some(now),
                ..
            }) if fenced_at.is_some_and(|then| now < then) => {
                // Its journal went back in time: it may run a copy it no longer knows.
                let _ = engine.update(id, |m| {
                    m.error = Some(format!(
                        "site {target}'s journal is older than this migration (generation {now}, it recorded the migration at {}): it may run a copy it no longer knows, so its word cannot end the move; the source stays frozen with its image. Check {target} for a copy of the workload",
                        fenced_at.unwrap_or_default()
                    ));
                });
            }
            Ok(Response::Status { .. }) => {
                match engine
                    .peers
                    .request(
                        target,
                        &Request::Abort {
                            migration: id.to_string(),
                        },
                    )
                    .await
                {
                    Ok(Response::Aborted) => return Verdict::NotRestored,
                    Ok(Response::Status {
                        state: TargetState::Confirmed,
                        ..
                    }) => return Verdict::Confirmed,
                    _ => {}
                }
            }
            Ok(_) | Err(_) => {
                if !noted {
                    noted = true;
                    let _ = engine.update(id, |m| {
                        m.error = Some(format!(
                            "waiting for site {target} to report the restore; the source stays frozen with its image until it does"
                        ));
                    });
                }
            }
        }
        tokio::select! {
            _ = engine.cancel.cancelled() => return Verdict::Pending,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The destination confirmed: end the source and drop its image.
pub(super) async fn cut_over(
    engine: &Arc<Engine>,
    id: &str,
    freeze: Option<Instant>,
) -> Result<(), MigrationError> {
    engine
        .faults
        .enter(Role::Source, Phase::CuttingOver, &engine.cancel)
        .await?;
    let m = engine.update(id, |m| {
        m.phase = Phase::CuttingOver;
        if let Some(f) = freeze {
            m.timings.freeze_ms = Some(ms(f.elapsed()));
        }
    })?;
    // Held and future clients of this site go to the destination through the peer link.
    engine
        .ingress
        .release(&m.workload, Target::Remote(m.target.clone()));
    engine.release_source(&m.workload).await?;
    remove_dir(&engine.images_dir.join(id));
    engine.update(id, |m| {
        m.phase = Phase::Completed;
        m.error = None;
    })?;
    Ok(())
}

/// Undoes a failed migration: the destination must hold no running copy, then the source
/// resumes. If the destination may have restored and cannot say, the source stays frozen.
pub(super) async fn rollback(engine: &Arc<Engine>, id: &str, reason: String) {
    // A rollback goes on even if the journal cannot record it (a full disk, no
    // descriptors): the source resumes, its clients are let go, the destination is told.
    // What the journal still holds (an earlier phase) rolls back the same way after a
    // restart.
    let Some(m) = engine.update_unjournaled_ok(id, |m| {
        m.phase = Phase::RollingBack;
        m.error = Some(reason.clone());
    }) else {
        tracing::error!("no record of this migration; leaving the source as it is");
        return;
    };
    if m.restore_requested {
        match resolve(engine, id, &m.target).await {
            Verdict::NotRestored => {}
            Verdict::Confirmed => {
                tracing::warn!("destination confirmed after all; completing instead");
                if let Err(e) = cut_over(engine, id, None).await {
                    tracing::error!(error = %e, "cut-over failed");
                }
                return;
            }
            Verdict::Pending => return,
        }
    } else {
        // Nothing can be running there (no restore or promotion was asked): the source
        // runs again at once, then the destination is told to drop what it has.
        finish_rollback(engine, id, &m.workload, reason).await;
        tell_abort(engine, &m.target, id).await;
        return;
    }
    finish_rollback(engine, id, &m.workload, reason).await;
}

/// Tells the destination to drop an abandoned migration (best effort: a destination that
/// cannot hear it drops it when its own gateway restarts and sees the source's record).
pub(super) async fn tell_abort(engine: &Arc<Engine>, target: &str, id: &str) {
    let req = Request::Abort {
        migration: id.to_string(),
    };
    match engine.peers.request(target, &req).await {
        Ok(Response::Aborted) => {}
        Ok(other) => tracing::warn!(?other, "destination did not confirm the abort"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell the destination to abort; it cleans up when asked again or on restart");
        }
    }
}

pub(super) async fn finish_rollback(
    engine: &Arc<Engine>,
    id: &str,
    workload: &str,
    reason: String,
) {
    // A service-level move never froze the source: it only stops being held.
    let service = engine
        .get(id)
        .is_some_and(|m| m.approach.as_deref() == Some("service"));
    let resumed = if service {
        super::service::unfence(engine, id).await;
        engine.unhold_workload(workload);
        Ok(())
    } else {
        // A lazy dump still holding the tree lets go of it first.
        super::locked(&engine.prepushed).remove(id);
        engine.stop_lazy_dump(id).await;
        engine.resume_source(workload).await
    };
    engine.ingress.release(workload, Target::Local);
    let running = engine
        .workloads
        .get(workload)
        .is_some_and(|w| w.state == WorkloadState::Running);
    remove_dir(&engine.images_dir.join(id));
    let outcome = engine.update_unjournaled_ok(id, |m| {
        m.phase = if running {
            Phase::RolledBack
        } else {
            Phase::Failed
        };
        m.error = Some(match &resumed {
            Ok(()) if running => reason.clone(),
            Ok(()) => format!("{reason}; the source had exited and could not be resumed"),
            Err(e) => format!("{reason}; resuming the source failed: {e}"),
        });
    });
    match outcome {
        Some(m) => tracing::info!(phase = %m.phase, "rolled back"),
        None => tracing::error!("no record of this migration to end"),
    }
}
