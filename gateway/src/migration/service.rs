//! The source side of a service-level move: the destination starts a fresh instance
//! (under its own runtime, which may differ from ours) and a service adapter there makes
//! it follow ours through a tunnel; once it is in sync, our clients' traffic is held just
//! long enough for the replica to catch up and be promoted. The switch crosses the link
//! once each way: the service adapter here fences the source (it stops taking changes)
//! and hands back a mark of what it has; the destination catches up to that mark and
//! promotes. The source is never frozen: until the destination confirms, it serves reads
//! (or could serve again at once, unfenced).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::source::{confirm, hold_clients, prepare, prepare_destination, request_switch};
use super::{ms, Engine, MigrationError, Phase};
use crate::peer::wire::{Request, Response};
use crate::plugins::AdapterCall;
use crate::spec::WorkloadSpec;
use crate::workload::WorkloadError;

/// How often the replica's state is asked for while it syncs.
const SYNC_POLL: Duration = Duration::from_millis(25);

/// Runs a service-level move up to the destination's confirmation; returns when the
/// switch started (the hold), for the downtime.
pub(super) async fn drive(
    engine: &Arc<Engine>,
    id: &str,
    destination: &WorkloadSpec,
    service: &str,
) -> Result<Instant, MigrationError> {
    let m = engine
        .get(id)
        .ok_or_else(|| MigrationError::NotFound(id.to_string()))?;
    let target = m.target.clone();

    prepare(engine, id, &target, destination, Some(service)).await?;

    engine.enter_phase(id, Phase::Syncing).await?;
    let sync_started = Instant::now();
    prepare_destination(
        engine,
        &target,
        Request::StartSync {
            migration: id.to_string(),
        },
    )
    .await
    .map(|_| ())?;
    wait_in_sync(engine, id, &target, sync_started).await?;
    engine.update(id, |m| m.timings.sync_ms = Some(ms(sync_started.elapsed())))?;

    // The switch: clients wait from here until the promoted replica serves them.
    let freeze = hold_clients(engine, &m.workload).await;
    let mark = fence(engine, id, &m.workload, &target, service).await?;
    request_switch(engine, id).await?;
    confirm(
        engine,
        id,
        &target,
        Request::Promote {
            migration: id.to_string(),
            mark,
        },
    )
    .await?;
    Ok(freeze)
}

/// The call the service adapter here gets about the source of `id`.
fn source_call(
    engine: &Engine,
    id: &str,
    workload: &str,
    target: &str,
) -> Result<AdapterCall, MigrationError> {
    let w = engine
        .workloads
        .get(workload)
        .ok_or_else(|| MigrationError::Workload(WorkloadError::NotFound(workload.to_string())))?;
    Ok(AdapterCall::for_workload(&w)
        .with_peer(target)
        .with_migration(id))
}

/// Stops the source taking changes (its service adapter, here); the mark goes to the
/// destination, which catches up to it before it is promoted.
async fn fence(
    engine: &Arc<Engine>,
    id: &str,
    workload: &str,
    target: &str,
    service: &str,
) -> Result<String, MigrationError> {
    let started = Instant::now();
    let about = source_call(engine, id, workload, target)?;
    let mark = engine.plugins.service(service)?.fence(about).await?;
    tracing::info!(migration = id, %mark, ms = ms(started.elapsed()), "source fenced");
    Ok(mark)
}

/// A move abandoned after the fence: the source takes changes again (best effort; the
/// adapter's fence is bounded and lifts itself).
pub(super) async fn unfence(engine: &Arc<Engine>, id: &str) {
    let Some(m) = engine.get(id) else { return };
    let Some(service) = m.service.as_deref() else {
        return;
    };
    let outcome = match (
        source_call(engine, id, &m.workload, &m.target),
        engine.plugins.service(service),
    ) {
        (Ok(about), Ok(adapter)) => adapter.unfence(about).await.map_err(|e| e.to_string()),
        (Err(e), _) => Err(e.to_string()),
        (_, Err(e)) => Err(e.to_string()),
    };
    if let Err(e) = outcome {
        tracing::warn!(migration = id, error = %e, "could not unfence the source; its fence lifts by itself");
    }
}

/// Polls the replica until it is in sync, recording its progress; gives up (the move is
/// abandoned, the source still serving) past the site's sync bound.
async fn wait_in_sync(
    engine: &Arc<Engine>,
    id: &str,
    target: &str,
    started: Instant,
) -> Result<(), MigrationError> {
    loop {
        let answer = engine
            .peers
            .request(
                target,
                &Request::SyncStatus {
                    migration: id.to_string(),
                },
            )
            .await?;
        match answer {
            Response::Sync(info) => {
                let in_sync = info.in_sync;
                tracing::debug!(bytes = info.bytes, lag = info.lag, in_sync, detail = %info.detail, "replica progress");
                engine.update(id, |m| {
                    m.bytes_moved = info.bytes;
                    m.sync = Some(info);
                })?;
                if in_sync {
                    tracing::info!(ms = ms(started.elapsed()), "replica in sync");
                    return Ok(());
                }
            }
            Response::Error { message, .. } => {
                return Err(MigrationError::Refused {
                    site: target.to_string(),
                    message: format!("the replica failed: {message}"),
                })
            }
            other => {
                return Err(MigrationError::Refused {
                    site: target.to_string(),
                    message: format!("unexpected answer {other:?}"),
                })
            }
        }
        if started.elapsed() > engine.sync_timeout {
            let last = engine
                .get(id)
                .and_then(|m| m.sync)
                .map(|s| s.detail)
                .unwrap_or_default();
            return Err(MigrationError::SyncTimeout {
                secs: engine.sync_timeout.as_secs(),
                last,
            });
        }
        let aborted = engine.abort_token(id);
        tokio::select! {
            () = engine.cancel.cancelled() => return Err(MigrationError::Crashed { phase: Phase::Syncing }),
            () = aborted.cancelled() => return Err(MigrationError::Aborted),
            () = tokio::time::sleep(SYNC_POLL) => {}
        }
    }
}
