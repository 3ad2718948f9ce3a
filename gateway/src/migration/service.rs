//! The source side of a service-level move: the destination starts a fresh instance
//! (under its own runtime, which may differ from ours) and a service adapter there makes
//! it follow ours through a tunnel; once it is in sync, our clients' traffic is held just
//! long enough for the replica to catch up and be promoted. The source is never frozen:
//! until the destination confirms, it serves (or could serve again at once).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::source::{confirm, hold_clients, prepare_destination, request_switch};
use super::{Engine, MigrationError, Phase, Role};
use crate::peer::wire::{Request, Response};
use crate::spec::WorkloadSpec;

/// How often the replica's state is asked for while it syncs.
const SYNC_POLL: Duration = Duration::from_millis(100);

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

    engine
        .faults
        .enter(Role::Source, Phase::Preparing, &engine.cancel)
        .await?;
    engine.set_phase(id, Phase::Preparing)?;
    prepare_destination(
        engine,
        &target,
        Request::Prepare {
            migration: id.to_string(),
            workload: destination.clone(),
            service: Some(service.to_string()),
        },
    )
    .await?;

    engine
        .faults
        .enter(Role::Source, Phase::Syncing, &engine.cancel)
        .await?;
    engine.set_phase(id, Phase::Syncing)?;
    let sync_started = Instant::now();
    prepare_destination(
        engine,
        &target,
        Request::StartSync {
            migration: id.to_string(),
        },
    )
    .await?;
    wait_in_sync(engine, id, &target, sync_started).await?;
    engine.update(id, |m| m.timings.sync_ms = Some(ms(sync_started.elapsed())))?;

    // The switch: clients wait from here until the promoted replica serves them.
    let freeze = hold_clients(engine, &m.workload).await;
    request_switch(engine, id).await?;
    confirm(
        engine,
        id,
        &target,
        Request::Promote {
            migration: id.to_string(),
        },
    )
    .await?;
    Ok(freeze)
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
        tokio::select! {
            () = engine.cancel.cancelled() => return Err(MigrationError::Crashed { phase: Phase::Syncing }),
            () = tokio::time::sleep(SYNC_POLL) => {}
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
