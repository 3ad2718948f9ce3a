//! `redis` service adapter: moves a Redis server by replication instead of a checkpoint.
//!
//! At the destination a fresh, empty instance becomes a replica of the source through a
//! `tunnel` (`REPLICAOF`), streams the source's changes while clients keep using the
//! source, and at the switch, while the source site's ingress holds every client, the
//! adapter at the source fences it (`CLIENT PAUSE … WRITE`, bounded so a failed move
//! cannot leave it paused long) and hands its replication offset to the destination, where
//! the replica catches up to that offset and is promoted (`REPLICAOF NO ONE`). The switch
//! makes no call through the tunnel: each side talks to its own instance. Everything goes through `redis-cli` (and `redis-server
//! --version`) on the site's `exec` allow-list; at each site `exec` runs in that site's
//! network, so `redis-cli -h 127.0.0.1 -p PORT` is the local instance.

mod info;
mod resp;

use std::time::{Duration, Instant};

use ferry_adapter_sdk::service::{feasible, infeasible, peer, probe_here};
use ferry_adapter_sdk::*;
use info::{Info, Replica, Version};

struct Redis;

/// One `redis-cli` call; Redis answers these in microseconds unless it is unreachable.
const CLI_MS: u32 = 5_000;
/// How long the source stays fenced at most: `CLIENT PAUSE` lifts itself after this, so a
/// cut-over that dies half way (trap, deadline, lost link) cannot leave it paused long.
const PAUSE_MS: u64 = 10_000;
/// How long the replica may take to catch up once the source is paused; well inside
/// `PAUSE_MS`, so the source is still fenced when the replica is promoted.
const CATCH_UP_MS: u64 = 8_000;
const POLL: Duration = Duration::from_millis(2);
/// The switch itself: a few local `redis-cli` calls at each site while the ingress holds
/// clients (the engine adds the link's round trips).
const EXPECTED_DOWNTIME_MS: u64 = 15;

thread_local! {
    /// The source's `repl-diskless-sync-delay` before the sync set it to 0 (so the full
    /// copy starts at once rather than after Redis's default 5 s wait), to put back once
    /// the replica is in sync or the move is abandoned.
    static SAVED_DELAY: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Makes the source start a replica's full sync at once; remembers its setting.
fn no_sync_delay(source: &Server) -> Result<(), AdapterError> {
    let got = source.cli(&["CONFIG", "GET", "repl-diskless-sync-delay"])?;
    let old = got.lines().nth(1).map(|v| v.trim().to_string());
    source.ok(&["CONFIG", "SET", "repl-diskless-sync-delay", "0"])?;
    SAVED_DELAY.with(|d| *d.borrow_mut() = old);
    Ok(())
}

/// Puts the source's sync delay back (best effort: the source is released after a move).
fn restore_sync_delay(source: &Server) {
    if let Some(old) = SAVED_DELAY.with(|d| d.borrow_mut().take()) {
        if let Err(e) = source.ok(&["CONFIG", "SET", "repl-diskless-sync-delay", &old]) {
            log::log(log::Level::Warn, &format!("could not restore the source's sync delay: {e:?}"));
        }
    }
}

/// A Redis server `redis-cli` can reach from this site: the local instance, or the
/// source through the tunnel's local endpoint.
struct Server {
    host: String,
    port: u16,
    /// For messages: "the local instance", "the source (through the tunnel)".
    what: &'static str,
    /// Talk to it over a connection of our own (the site's `sockets` grant) before falling
    /// back to `redis-cli`: the local instance, during the switch.
    direct: bool,
}

impl Server {
    fn local(w: &Workload) -> Result<Self, AdapterError> {
        Ok(Server {
            host: "127.0.0.1".into(),
            port: port(w)?,
            what: "the local instance",
            direct: true,
        })
    }

    /// The source, through the migration's tunnel to the workload's port at the peer.
    fn source(w: &Workload) -> Result<Self, AdapterError> {
        let ep = tunnel::open(port(w)?)?;
        Ok(Server {
            host: ep.host,
            port: ep.port,
            what: "the source (through the tunnel)",
            direct: false,
        })
    }

    /// Runs one command: over a connection of our own when the site grants one, else with
    /// `redis-cli`.
    fn cli(&self, args: &[&str]) -> Result<String, AdapterError> {
        if self.direct {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
            match resp::command(addr, args) {
                Ok(reply) => return Ok(reply),
                // Nothing was sent: redis-cli may still get through (no `sockets` grant).
                Err(resp::RespError::Connect(_)) => {}
                Err(e) => {
                    return Err(AdapterError::Failed(format!(
                        "{} at {} ({}:{}): {e}",
                        args.join(" "),
                        self.what,
                        self.host,
                        self.port
                    )))
                }
            }
        }
        self.redis_cli(args)
    }

    /// Runs one command with `redis-cli`. `-e` makes it exit non-zero on an error reply,
    /// which it prints on stdout; so a failure carries both streams.
    fn redis_cli(&self, args: &[&str]) -> Result<String, AdapterError> {
        let port = self.port.to_string();
        let mut argv = vec!["-e", "-h", self.host.as_str(), "-p", port.as_str()];
        argv.extend_from_slice(args);
        let out = exec::run(&exec::Command {
            program: "redis-cli".into(),
            args: argv.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
            timeout_ms: CLI_MS,
            output: exec::OutputMode::Capture,
        })?;
        if out.status != 0 {
            let said = [out.stdout.trim(), out.stderr_tail.trim()]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(AdapterError::Failed(format!(
                "redis-cli {} at {} ({}:{}) exited with {}: {said}",
                args.join(" "),
                self.what,
                self.host,
                self.port,
                out.status
            )));
        }
        Ok(out.stdout)
    }

    /// A command whose reply is `OK` (or `OK Already connected to specified master`, a
    /// repeated `REPLICAOF`).
    fn ok(&self, args: &[&str]) -> Result<(), AdapterError> {
        let reply = self.cli(args)?;
        if !reply.trim().starts_with("OK") {
            return Err(AdapterError::Failed(format!(
                "{} answered {:?} to {}",
                self.what,
                reply.trim(),
                args.join(" ")
            )));
        }
        Ok(())
    }

    fn info(&self, section: Option<&str>) -> Result<Info, AdapterError> {
        let args: &[&str] = match section {
            Some(s) => &["INFO", s],
            None => &["INFO"],
        };
        Ok(Info::parse(&self.cli(args)?))
    }

    fn version(&self) -> Result<Version, AdapterError> {
        self.info(Some("server"))?.version().map_err(|e| self.bad(e))
    }

    fn master_offset(&self) -> Result<u64, AdapterError> {
        let info = self.info(Some("replication"))?;
        let offset = info.require_num("master_repl_offset").map_err(|e| self.bad(e))?;
        Ok(offset.max(0) as u64)
    }

    /// The local instance as a replica: `INFO` with its default sections, which hold both
    /// replication and stats, in one call.
    fn replica(&self) -> Result<Replica, AdapterError> {
        Replica::from_info(&self.info(None)?).map_err(|e| self.bad(e))
    }

    /// The local instance's replication state only (`INFO replication`: cheap, for the
    /// switch; it lacks the byte counters).
    fn replica_state(&self) -> Result<Replica, AdapterError> {
        Replica::from_info(&self.info(Some("replication"))?).map_err(|e| self.bad(e))
    }

    fn bad(&self, e: impl std::fmt::Display) -> AdapterError {
        AdapterError::Failed(format!("{} ({}:{}): {e}", self.what, self.host, self.port))
    }
}

fn port(w: &Workload) -> Result<u16, AdapterError> {
    w.port.ok_or_else(|| {
        AdapterError::Unsupported(format!(
            "workload {} has no --port; the redis adapter needs Redis's port",
            w.name
        ))
    })
}

/// `redis-server` as the command, or `--setting service=redis` for a wrapper.
fn is_redis(w: &Workload) -> bool {
    let program = w.command.first().map(|c| c.rsplit('/').next().unwrap_or(c));
    program == Some("redis-server") || setting(w, "service") == Some("redis")
}


/// At the source: the running instance is a primary, new enough to be fenced, with no
/// module whose state or commands a replica elsewhere might not have.
fn probe_source(w: &Workload) -> Result<Plan, AdapterError> {
    let local = Server::local(w)?;
    let server = local.info(Some("server"))?;
    let version = server.version().map_err(|e| local.bad(e))?;
    // A cluster node or a sentinel is not one self-contained primary.
    let mode = server.get("redis_mode").unwrap_or("standalone");
    if mode != "standalone" {
        return Ok(infeasible(format!(
            "redis at {} runs in {mode} mode; the redis adapter moves standalone servers only",
            w.site
        )));
    }
    if version < Version::PAUSE_WRITE {
        return Ok(infeasible(format!(
            "redis {version} at {} cannot be fenced for the switch (CLIENT PAUSE WRITE needs Redis {} or later)",
            w.site,
            Version::PAUSE_WRITE
        )));
    }
    let modules = local.info(Some("modules"))?.modules();
    if !modules.is_empty() {
        return Ok(infeasible(format!(
            "modules {} are not known to the redis adapter (loaded in redis {version} at {})",
            modules.join(", "),
            w.site
        )));
    }
    let role = local.info(Some("replication"))?;
    let role = role.role().map_err(|e| local.bad(e))?;
    if role != "master" {
        return Ok(infeasible(format!(
            "redis at {} is a replica (role:{role}), not a primary; move its primary instead",
            w.site
        )));
    }
    Ok(feasible(format!(
        "redis {version} at {}: a live replica at {} follows it, then is promoted while the ingress holds clients",
        w.site,
        peer(w)
    ), Some(EXPECTED_DOWNTIME_MS)))
}

/// At the destination: this site can run the same service.
fn probe_destination(w: &Workload) -> Result<Plan, AdapterError> {
    let out = run("redis-server", &["--version"], CLI_MS)?;
    let version = Version::from_server_banner(&out.stdout).ok_or_else(|| {
        AdapterError::Failed(format!(
            "redis-server --version printed no version: {:?}",
            out.stdout.trim()
        ))
    })?;
    Ok(feasible(format!(
        "redis-server {version} at {} can run a replica of {} from {}",
        w.site,
        w.name,
        peer(w)
    ), Some(EXPECTED_DOWNTIME_MS)))
}

/// Waits, with the source paused, until the replica has everything up to `mark` (the
/// source's `master_repl_offset` read after the pause: every write the source took is at
/// or below it). A replica whose link to the source is down cannot get there: that fails
/// at once rather than holding clients for the whole bound.
fn catch_up(local: &Server, mark: u64) -> Result<(), AdapterError> {
    let deadline = Instant::now() + Duration::from_millis(CATCH_UP_MS);
    loop {
        let replica = local.replica_state()?;
        if replica.caught_up(mark) {
            return Ok(());
        }
        if !replica.in_sync() {
            return Err(AdapterError::Failed(format!(
                "the replica is not in sync with the source ({}); cut-over needs sync-progress to report in-sync first",
                replica.progress(mark).detail
            )));
        }
        if Instant::now() >= deadline {
            return Err(AdapterError::Failed(format!(
                "the replica did not catch up with the paused source within {CATCH_UP_MS} ms: {}",
                replica.progress(mark).detail
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// Makes the local replica a primary (`OK` is Redis's word that it is one now).
fn promote(local: &Server) -> Result<(), AdapterError> {
    local.ok(&["REPLICAOF", "NO", "ONE"])
}

/// The source's fence mark: its replication offset, as text.
fn parse_mark(mark: &str) -> Result<u64, AdapterError> {
    mark.trim().parse().map_err(|_| {
        AdapterError::Failed(format!(
            "the source's fence mark {mark:?} is not a replication offset (was the source fenced by the redis adapter?)"
        ))
    })
}

impl ServiceAdapter for Redis {
    fn describe() -> AdapterInfo {
        AdapterInfo {
            name: "redis".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            approaches: vec![Approach::Service],
            runtimes: vec!["redis".into()],
        }
    }

    fn probe(w: Workload) -> Plan {
        if !is_redis(&w) {
            return infeasible(format!(
                "{} is not a Redis server (its command is not redis-server; say --setting service=redis if it is one)",
                w.name
            ));
        }
        probe_here(&w, probe_source, probe_destination)
    }

    fn start_sync(w: Workload) -> Result<(), AdapterError> {
        let local = Server::local(&w)?;
        let source = Server::source(&w)?;
        let (here, there) = (local.version()?, source.version()?);
        if here.major != there.major {
            return Err(AdapterError::Unsupported(format!(
                "redis {there} at {} and redis {here} at {} differ in major version; a replica needs the same",
                peer(&w),
                w.site
            )));
        }
        let port = source.port.to_string();
        // Best effort: a source with CONFIG disabled syncs after its own delay.
        if let Err(e) = no_sync_delay(&source) {
            log::log(
                log::Level::Warn,
                &format!("the full sync waits for the source's repl-diskless-sync-delay: {e:?}"),
            );
        }
        // Best effort: the fresh (empty) replica loads the copy as it arrives instead of
        // writing it to disk first and loading it after the transfer.
        if let Err(e) = local.ok(&["CONFIG", "SET", "repl-diskless-load", "on-empty-db"]) {
            log::log(
                log::Level::Warn,
                &format!("the replica loads the copy only once it has all of it: {e:?}"),
            );
        }
        if let Err(e) = local.ok(&["REPLICAOF", &source.host, &port]) {
            restore_sync_delay(&source);
            return Err(e);
        }
        info(&format!(
            "redis {here} at {} replicates redis {there} at {} through {}:{port}",
            w.site,
            peer(&w),
            source.host
        ));
        Ok(())
    }

    fn sync_progress(w: Workload) -> Result<SyncState, AdapterError> {
        let local = Server::local(&w)?;
        let replica = local.replica()?;
        let source = Server::source(&w)?;
        let p = replica.progress(source.master_offset()?);
        if p.in_sync {
            restore_sync_delay(&source);
        }
        Ok(SyncState {
            bytes: p.bytes,
            lag: p.lag,
            in_sync: p.in_sync,
            detail: p.detail,
        })
    }

    /// At the source: writes wait (`CLIENT PAUSE … WRITE`, lifted by Redis itself after
    /// `PAUSE_MS` if nothing else does); the offset read after the pause covers every
    /// write it took.
    fn fence(w: Workload) -> Result<String, AdapterError> {
        let local = Server::local(&w)?;
        let pause = PAUSE_MS.to_string();
        local.ok(&["CLIENT", "PAUSE", &pause, "WRITE"])?;
        match local.master_offset() {
            Ok(offset) => Ok(offset.to_string()),
            Err(e) => {
                let _ = local.ok(&["CLIENT", "UNPAUSE"]);
                Err(e)
            }
        }
    }

    fn unfence(w: Workload) -> Result<(), AdapterError> {
        Server::local(&w)?.ok(&["CLIENT", "UNPAUSE"])
    }

    /// At the destination: catch up to the source's offset, then become the primary. The
    /// source stays paused until it is released (its pause lifts itself after `PAUSE_MS`
    /// whatever happens next).
    fn cut_over(w: Workload, mark: String) -> Result<(), AdapterError> {
        let offset = parse_mark(&mark)?;
        let local = Server::local(&w)?;
        catch_up(&local, offset)?;
        promote(&local)?;
        info(&format!(
            "redis at {} promoted at replication offset {offset}; {} stays paused",
            w.site,
            peer(&w)
        ));
        Ok(())
    }

    fn abort_sync(w: Workload) -> Result<(), AdapterError> {
        // Best effort both: the instance is discarded next. The source's fence is the
        // source site's to lift (`unfence`).
        match Server::local(&w).and_then(|local| local.ok(&["REPLICAOF", "NO", "ONE"])) {
            Ok(()) => {}
            Err(e) => log::log(log::Level::Warn, &format!("could not stop replicating: {e:?}")),
        }
        match Server::source(&w) {
            Ok(source) => restore_sync_delay(&source),
            Err(e) => log::log(log::Level::Warn, &format!("no tunnel to the source: {e:?}")),
        }
        Ok(())
    }
}

export_service_adapter!(Redis);
