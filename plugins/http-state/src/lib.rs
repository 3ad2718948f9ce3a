//! `http-state` service adapter: moves an HTTP service that serves its state as one
//! document (`GET PATH` exports it, `PUT PATH` replaces it; the workload names PATH with
//! `--setting state-path=PATH`) by export and import, snapshot-style.
//!
//! At the destination the fresh instance imports the source's document through a
//! `tunnel` while clients keep using the source (start-sync). At the switch, while the
//! source site's ingress holds every client so the source's state no longer changes, it
//! imports the whole document once more (the final delta of a snapshot is the snapshot),
//! and must then serve what the source serves: both are read back and compared by SHA-256.
//!
//! Everything runs through `curl`, `sha256sum` and `rm` on the site's `exec` allow-list,
//! in that site's network (`127.0.0.1:PORT` is the local instance). The document never
//! passes through the adapter, whatever its size: one curl process GETs it into a staging
//! file in the workload's work directory and then PUTs that file (`--next`,
//! `--fail-early`). A pipe from one curl into another would need `sh` on the allow-list,
//! and a site that lets an adapter run a shell lets it run anything; these three run no
//! other program.

mod curl;

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use curl::{Server, StatePath, Transfer};
use ferry_adapter_sdk::service::{feasible, infeasible, peer, probe_here};
use ferry_adapter_sdk::*;

struct HttpState;

/// The workload setting naming the state document's path.
const SETTING: &str = "state-path";
/// Reading the document's size at the source's probe.
const PROBE_MS: u32 = 30_000;
/// One copy of the document (the first import, the switch).
const COPY_MS: u32 = 60_000;
/// `sha256sum` of the staged copies, `rm` of them, `--version` checks.
const TOOL_MS: u32 = 30_000;

/// What this instance imported, by workload name, for `sync-progress`. The instance
/// lives from call to call; if it traps it starts afresh, `sync-progress` then finds no
/// import and fails, and the engine abandons the move (the source keeps serving).
static IMPORTS: Mutex<BTreeMap<String, Import>> = Mutex::new(BTreeMap::new());

#[derive(Debug, Clone)]
struct Import {
    /// The source's site.
    peer: String,
    /// The size of the document imported.
    bytes: u64,
}

fn imports() -> std::sync::MutexGuard<'static, BTreeMap<String, Import>> {
    IMPORTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The workload as this adapter knows it: where its state document is.
struct Service {
    path: StatePath,
    port: u16,
}

impl Service {
    /// The error says why this is not a service the adapter knows.
    fn of(w: &Workload) -> Result<Self, String> {
        let Some(path) = setting(w, SETTING) else {
            return Err(format!(
                "{} has no {SETTING} setting; the http-state adapter moves HTTP services that serve their state at GET and PUT PATH (--setting {SETTING}=PATH)",
                w.name
            ));
        };
        let path = StatePath::parse(path)?;
        let port = w.port.ok_or_else(|| {
            format!(
                "{} has no --port; the http-state adapter reaches its state at 127.0.0.1:PORT{path}",
                w.name
            )
        })?;
        Ok(Service { path, port })
    }

    /// For the calls after the probe: the engine only gets here with a workload whose
    /// probe was feasible, so this is the same check failing late.
    fn require(w: &Workload) -> Result<Self, AdapterError> {
        Self::of(w).map_err(AdapterError::Unsupported)
    }

    fn local(&self) -> Server {
        Server {
            host: "127.0.0.1".into(),
            port: self.port,
            what: "the local instance",
        }
    }

    /// The source, through the migration's tunnel to the workload's port at the peer.
    fn source(&self) -> Result<Server, AdapterError> {
        let ep = tunnel::open(self.port)?;
        Ok(Server {
            host: ep.host,
            port: ep.port,
            what: "the source (through the tunnel)",
        })
    }

    /// Runs `transfers` in one curl process; their reports, each a 2xx.
    fn curl(
        &self,
        transfers: &[Transfer<'_>],
        timeout_ms: u32,
    ) -> Result<Vec<curl::Report>, AdapterError> {
        let out = exec::run(&exec::Command {
            program: "curl".into(),
            args: curl::args(&self.path, transfers),
            env: Vec::new(),
            timeout_ms,
            output: exec::OutputMode::Capture,
        })?;
        if out.status != 0 {
            return Err(AdapterError::Failed(curl::failure(
                &self.path,
                transfers,
                out.status,
                &out.stdout,
                &out.stderr_tail,
            )));
        }
        curl::reports(&out.stdout, transfers.len())
            .map_err(|e| AdapterError::Failed(format!("copying {}: {e}", self.path)))
    }

    /// Copies the source's document into the local instance through `staging.export`;
    /// returns its size.
    fn import(
        &self,
        source: &Server,
        local: &Server,
        staging: &Staging,
    ) -> Result<u64, AdapterError> {
        let r = self.curl(
            &[
                Transfer::Get {
                    from: source,
                    into: &staging.export,
                },
                Transfer::Put {
                    from: &staging.export,
                    to: local,
                },
            ],
            COPY_MS,
        )?;
        check_put(&r[0], &r[1])?;
        Ok(r[0].downloaded)
    }
}

/// The `PUT` sent the whole file the `GET` wrote.
fn check_put(get: &curl::Report, put: &curl::Report) -> Result<(), AdapterError> {
    if put.uploaded != get.downloaded {
        return Err(AdapterError::Failed(format!(
            "the import sent {} of the {} document",
            curl::size(put.uploaded),
            curl::size(get.downloaded)
        )));
    }
    Ok(())
}

/// Files in the workload's work directory at this site holding the document between its
/// `GET` and its `PUT`, and the local instance's copy for the comparison. Named for the
/// site, since every site has the same work directory path (and may share the storage).
struct Staging {
    export: String,
    local: String,
}

impl Staging {
    fn new(w: &Workload) -> Self {
        let base = format!(
            "{}/.ferry-http-state.{}",
            w.work_dir.trim_end_matches('/'),
            w.site
        );
        Staging {
            export: format!("{base}.export"),
            local: format!("{base}.local"),
        }
    }

    /// Best effort: a failed removal leaves a file the next copy overwrites.
    fn remove(&self) {
        if let Err(e) = run("rm", &["-f", "--", &self.export, &self.local], TOOL_MS) {
            log::log(
                log::Level::Warn,
                &format!("cannot remove the staging files: {e:?}"),
            );
        }
    }
}



fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// At the source: the running instance serves its document; the switch copies it whole,
/// so its size sets the cost.
fn probe_source(w: &Workload, svc: &Service) -> Result<Plan, AdapterError> {
    let local = svc.local();
    let r = svc.curl(
        &[Transfer::Get {
            from: &local,
            into: "/dev/null",
        }],
        PROBE_MS,
    )?;
    let size = r[0].downloaded;
    Ok(feasible(
        format!(
            "state document {} of {} at {}: {}, imported by a fresh instance at {}, then once more while the ingress holds clients",
            svc.path,
            w.name,
            w.site,
            curl::size(size),
            peer(w)
        ),
        Some(curl::expected_downtime_ms(size)),
    ))
}

/// At the destination: every program the import needs runs here (the grant's allow-list
/// and the host's tools), so a missing one refuses the move before anything starts.
fn probe_destination(w: &Workload, svc: &Service) -> Result<Plan, AdapterError> {
    let out = run("curl", &["-q", "--version"], TOOL_MS)?;
    let version = out
        .stdout
        .split_whitespace()
        .nth(1)
        .unwrap_or("(unknown version)")
        .to_string();
    for tool in ["sha256sum", "rm"] {
        run(tool, &["--version"], TOOL_MS)?;
    }
    Ok(feasible(
        format!(
            "curl {version} at {} can import {}'s state document {} from {}",
            w.site,
            w.name,
            svc.path,
            peer(w)
        ),
        None,
    ))
}

/// The switch: import once more, then read the local instance's document and the
/// source's again, and compare. The source is held, so they are the same unless the
/// import lost something or the source changed behind the ingress.
fn import_and_compare(
    w: &Workload,
    svc: &Service,
    staging: &Staging,
) -> Result<(u64, String), AdapterError> {
    let (local, source) = (svc.local(), svc.source()?);
    let r = svc.curl(
        &[
            Transfer::Get {
                from: &source,
                into: &staging.export,
            },
            Transfer::Put {
                from: &staging.export,
                to: &local,
            },
            Transfer::Get {
                from: &local,
                into: &staging.local,
            },
            Transfer::Get {
                from: &source,
                into: &staging.export,
            },
        ],
        COPY_MS,
    )?;
    check_put(&r[0], &r[1])?;
    let out = run(
        "sha256sum",
        &["--", &staging.local, &staging.export],
        TOOL_MS,
    )?;
    let d = curl::digests(&out.stdout, 2).map_err(AdapterError::Failed)?;
    if d[0] != d[1] {
        return Err(AdapterError::Failed(format!(
            "after the import {} serves {} (sha256 {}) but the source at {} serves {} (sha256 {}): the source changed during the switch, or the service does not serve back what it was given",
            local,
            curl::size(r[2].downloaded),
            d[0],
            peer(w),
            curl::size(r[3].downloaded),
            d[1]
        )));
    }
    Ok((r[0].downloaded, d[0].clone()))
}

impl ServiceAdapter for HttpState {
    fn describe() -> AdapterInfo {
        AdapterInfo {
            name: "http-state".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            approaches: vec![Approach::Service],
            runtimes: vec!["http-state".into()],
        }
    }

    fn probe(w: Workload) -> Plan {
        let svc = match Service::of(&w) {
            Ok(svc) => svc,
            Err(why) => return infeasible(why),
        };
        probe_here(&w, |w| probe_source(w, &svc), |w| probe_destination(w, &svc))
    }

    fn start_sync(w: Workload) -> Result<(), AdapterError> {
        let svc = Service::require(&w)?;
        let (local, source) = (svc.local(), svc.source()?);
        let staging = Staging::new(&w);
        let started = Instant::now();
        let copied = svc.import(&source, &local, &staging);
        staging.remove();
        let size = copied?;
        imports().insert(
            w.name.clone(),
            Import {
                peer: peer(&w).to_string(),
                bytes: size,
            },
        );
        info(&format!(
            "imported {}'s state document {} ({}) from {} at {} in {} ms",
            w.name,
            svc.path,
            curl::size(size),
            peer(&w),
            w.site,
            elapsed_ms(started)
        ));
        Ok(())
    }

    fn sync_progress(w: Workload) -> Result<SyncState, AdapterError> {
        let svc = Service::require(&w)?;
        let found = imports()
            .get(&w.name)
            .filter(|i| i.peer == peer(&w))
            .cloned();
        let Some(import) = found else {
            return Err(AdapterError::Failed(format!(
                "no import of {} from {} recorded here: start-sync has not run, or the adapter was restarted since",
                w.name,
                peer(&w)
            )));
        };
        Ok(SyncState {
            bytes: import.bytes,
            lag: 0,
            in_sync: true,
            detail: format!(
                "imported state document {} ({}); imported whole once more at the switch",
                svc.path,
                curl::size(import.bytes)
            ),
        })
    }

    // No fence (the default): the held source takes no request, and the state is read
    // whole through the tunnel here, so the mark is not needed.
    fn cut_over(w: Workload, _mark: String) -> Result<(), AdapterError> {
        let svc = Service::require(&w)?;
        let staging = Staging::new(&w);
        let started = Instant::now();
        let switched = import_and_compare(&w, &svc, &staging);
        staging.remove();
        let (size, digest) = switched?;
        imports().remove(&w.name);
        info(&format!(
            "{} at {} serves the state document {} of {} ({}, sha256 {digest}) after {} ms",
            w.name,
            w.site,
            svc.path,
            peer(&w),
            curl::size(size),
            elapsed_ms(started)
        ));
        Ok(())
    }

    fn abort_sync(w: Workload) -> Result<(), AdapterError> {
        // The instance is discarded next; only this adapter's own traces are left to go.
        imports().remove(&w.name);
        Staging::new(&w).remove();
        Ok(())
    }
}

export_service_adapter!(HttpState);
