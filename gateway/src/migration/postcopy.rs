//! Post-copy: the checkpoint leaves the workload's private memory in the frozen source
//! (CRIU's lazy dump); the destination restores at once and its `criu lazy-pages` daemon
//! gets pages (on fault, and in the background) from Ferry's page path: a cache filled
//! ahead of the freeze (`prepush`) and by a bulk push, and a priority tunnel for faults
//! the cache cannot answer yet. The source stays frozen, with every page it still has,
//! until the destination has them all and the lazy dump exits; only then is it released.
//! After the destination confirmed, a destination crash loses the writes made there since
//! the switch: that window is recorded (`timings.postcopy_ms`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::{locked, Engine, MigrationError, Phase, Role};
use crate::peer::wire::{Request, Response, TargetState};
use crate::proxy::Target;
use crate::sys::process;
use crate::transfer::pages::{self, PageCache, PageSource};

/// How often, at most, the source asks the destination about its copy during the page
/// phase (first after 100 ms, then less often).
const DESTINATION_CHECK: Duration = Duration::from_secs(1);
/// How long the source waits for a lazy dump to end once it has nothing left to do: a
/// restarted source for the previous gateway's (it ends once its client, the old gateway,
/// is gone), any source for its own once the destination holds every page.
const LAZY_DUMP_END: Duration = Duration::from_secs(10);

/// How long the destination's page follower waits for a restore's outcome.
const RESTORE_OUTCOME: Duration = Duration::from_secs(180);

/// How a page phase ended at the source.
#[derive(Debug)]
pub(super) enum Paged {
    /// The destination has every page: the source goes.
    Complete,
    /// The destination stopped its copy: the source resumes (why).
    DestinationLost(String),
}

/// The modes a checkpoint move can run in; "auto" (the default) picks one of the others.
pub const MODES: [&str; 3] = ["auto", "stop-and-copy", "postcopy"];

impl Engine {
    /// Can the adapter serving `runtime` checkpoint lazily: through the host's CRIU, or
    /// its runtime's own lazy dump (the `lazy` interface)?
    pub(super) fn postcopy_capable(&self, runtime: &str) -> Result<(), String> {
        crate::criu::lazy_dump_ready()?;
        let adapter = self.plugins.adapter(runtime).map_err(|e| e.to_string())?;
        if self.plugins.can_dump_lazily(adapter.name()) {
            Ok(())
        } else {
            Err(format!(
                "post-copy needs an adapter that checkpoints through the gateway's CRIU (the criu capability) or runs its runtime's lazy checkpoint through the lazy interface (with exec); adapter {} does neither",
                adapter.name()
            ))
        }
    }

    /// Source, after a lazy checkpoint: takes over the lazy dump CRIU left running,
    /// becomes its one client (Ferry's page source, which the destination reaches through
    /// page tunnels), and journals where that serves.
    pub(super) async fn adopt_lazy_dump(
        &self,
        id: &str,
        images: &std::path::Path,
        init: Option<i32>,
    ) -> Result<(), MigrationError> {
        let running =
            self.criu
                .take_running(images)
                .ok_or_else(|| MigrationError::RestoreFailed {
                    site: self.site.clone(),
                    message: "the lazy checkpoint left no page server running".into(),
                })?;
        let pid = running.child.id().and_then(|p| i32::try_from(p).ok());
        let dump = running.page_server;
        locked(&self.lazy).insert(id.to_string(), running);
        let dump = dump.ok_or_else(|| MigrationError::RestoreFailed {
            site: self.site.clone(),
            message: "the lazy dump names no page server".into(),
        })?;
        let (source, page_server) = PageSource::start(
            Some(dump),
            &init.map(super::prepush::tree_of).unwrap_or_default(),
        )
        .await
        .map_err(|e| MigrationError::RestoreFailed {
            site: self.site.clone(),
            message: format!("cannot reach the lazy dump's page server: {e}"),
        })?;
        locked(&self.page_sources).insert(id.to_string(), source);
        self.update(id, |m| {
            m.page_server = Some(page_server);
            m.lazy_dump_pid = pid;
            m.lazy_dump_pid_start = pid.and_then(process::start_time);
        })?;
        Ok(())
    }

    /// Source, rolling back: the lazy dump ends (its tracee tree is then released to the
    /// adapter's resume).
    pub(super) async fn stop_lazy_dump(&self, id: &str) {
        if let Some(source) = locked(&self.page_sources).remove(id) {
            source.stop();
        }
        let running = locked(&self.lazy).remove(id);
        if let Some(mut r) = running {
            match r.child.id().and_then(|p| i32::try_from(p).ok()) {
                Some(pid) => process::kill_with_group(pid).await,
                None => {
                    let _ = r.child.start_kill();
                }
            }
            let _ = r.child.wait().await;
        } else if let Some(m) = self.get(id) {
            if let (Some(pid), Some(start)) = (m.lazy_dump_pid, m.lazy_dump_pid_start) {
                if process::alive(pid, start) {
                    process::kill_with_group(pid).await;
                }
            }
        }
    }

    /// Source, once the destination confirmed: its clients go there now; the frozen
    /// source keeps serving pages until the destination has them all, or until the
    /// destination says its copy is gone (it stops a copy that can no longer get its
    /// pages): then the source, which still has every page, is to resume.
    pub(super) async fn page_phase(self: &Arc<Self>, id: &str) -> Result<Paged, MigrationError> {
        let m = self.update(id, |m| m.phase = Phase::Paging)?;
        tracing::info!(
            migration = id,
            "destination runs; serving the pages it lacks"
        );
        self.ingress
            .release(&m.workload, Target::Remote(m.target.clone()));
        let started = Instant::now();
        let running = locked(&self.lazy).remove(id);
        // After a restart the lazy dump ended with its client, leaving the tree stopped
        // with every page: the pages are served from the tree itself.
        let resumed = match running {
            Some(_) => None,
            None => self.resume_page_source(id, &m.workload).await,
        };
        let dump_ended = async {
            if let Some(source) = resumed {
                source.finished().await;
                return true;
            }
            let Some(mut r) = running else {
                return false;
            };
            match r.child.wait().await {
                Ok(status) if status.success() => true,
                Ok(status) => {
                    let log = std::fs::read_to_string(&r.log).unwrap_or_default();
                    tracing::error!(%status, tail = %crate::criu::error_tail(&log), "the lazy dump failed");
                    false
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot wait for the lazy dump");
                    false
                }
            }
        };
        tokio::pin!(dump_ended);
        let ended_state = |s| {
            matches!(
                s,
                TargetState::Confirmed | TargetState::Aborted | TargetState::Unknown
            )
        };
        let ok = tokio::select! {
            ok = &mut dump_ended => ok,
            state = self.destination_says(id, &m.target, ended_state) => {
                if state != TargetState::Confirmed {
                    self.stop_page_source(id);
                    return Ok(Paged::DestinationLost(lost_reason(&m.target, state)));
                }
                // The destination holds every page (or its copy ended with them): the
                // dump has nothing left to serve, and is closed here if the bulk
                // connection did not get to (the destination's copy may have every page
                // in place before that connection's last word). One that does not end
                // even so (its tree killed under it) is ended below.
                let source = locked(&self.page_sources).get(id).map(Arc::clone);
                if let Some(source) = source {
                    source.finish().await;
                }
                if let Ok(ok) = tokio::time::timeout(LAZY_DUMP_END, &mut dump_ended).await {
                    ok
                } else {
                    tracing::warn!(migration = id, "the destination has every page but the lazy dump does not end; ending it");
                    if let (Some(pid), Some(start)) = (m.lazy_dump_pid, m.lazy_dump_pid_start) {
                        if process::alive(pid, start) {
                            process::kill_group_now(pid);
                        }
                    }
                    // Reaped through its own wait (a killed dump reports failure).
                    let _ = tokio::time::timeout(LAZY_DUMP_END, &mut dump_ended).await;
                    false
                }
            }
        };
        // Every page crossed (or the page path failed): only the destination can say how
        // its copy ended, with every page in place (the source goes) or stopped (the
        // source, which CRIU may have let go already, runs on). The dump must not outlive
        // that word.
        let state = self.destination_says(id, &m.target, ended_state).await;
        if !ok {
            if let (Some(pid), Some(start)) = (m.lazy_dump_pid, m.lazy_dump_pid_start) {
                if process::alive(pid, start) {
                    process::kill_with_group(pid).await;
                }
            }
            wait_gone(m.lazy_dump_pid, m.lazy_dump_pid_start).await;
        }
        if state != TargetState::Confirmed {
            self.stop_page_source(id);
            return Ok(Paged::DestinationLost(lost_reason(&m.target, state)));
        }
        let (pages, wire) = self.stop_page_source(id);
        let window = super::ms(started.elapsed());
        // The pages crossed the link too, after the switch.
        self.update(id, |m| {
            m.timings.postcopy_ms = Some(window);
            m.bytes_moved += pages;
            m.bytes_on_wire += wire;
        })?;
        tracing::info!(
            migration = id,
            ms = window,
            "every page is at the destination"
        );
        Ok(Paged::Complete)
    }

    /// Source, after a restart in the page phase: serves the pages again from the frozen
    /// tree, which the lazy dump left stopped when its client (the old gateway) went. A
    /// tree that is gone or runs again cannot serve the pages the destination started
    /// from: `None`, and the destination's word decides.
    async fn resume_page_source(&self, id: &str, workload: &str) -> Option<Arc<PageSource>> {
        let init = self.workloads.get(workload).and_then(|w| w.pid)?;
        let deadline = Instant::now() + LAZY_DUMP_END;
        // The previous gateway's lazy dump: a `criu dump` of the tree, or the runtime's
        // (runc and the CRIU it started, a process group of its own).
        let dump = self
            .get(id)
            .and_then(|m| m.lazy_dump_pid.zip(m.lazy_dump_pid_start));
        let dump_runs = || {
            dump.is_some_and(|(pid, start)| process::alive(pid, start) || process::group_alive(pid))
        };
        while !crate::criu::dumps_of(init).is_empty() || dump_runs() {
            if Instant::now() > deadline {
                tracing::error!(migration = id, "the previous gateway's lazy dump does not end; the pages cannot be served again");
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let tree = super::prepush::tree_of(init);
        if let Some(p) = tree.iter().find(|p| {
            process::state(p.pid).is_none_or(|s| s != 'T' && s != 't')
                && !process::frozen_by_cgroup(p.pid)
        }) {
            tracing::error!(migration = id, pid = p.pid, state = ?process::state(p.pid), "the source tree is not stopped; its pages are not those the destination started from");
            return None;
        }
        // The destination's cache was settled against the old list, or is told "all".
        let (source, addr) = match PageSource::start(None, &tree).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(migration = id, error = %e, "cannot serve the pages again");
                return None;
            }
        };
        source.set_stale(pages::Stale::All);
        locked(&self.page_sources).insert(id.to_string(), Arc::clone(&source));
        if let Err(e) = self.update(id, |m| m.page_server = Some(addr)) {
            tracing::error!(migration = id, error = %e, "cannot journal the page path");
        }
        tracing::info!(
            migration = id,
            processes = tree.len(),
            "serving the frozen tree's pages again after the restart"
        );
        Some(source)
    }

    /// Stops serving pages for `id`; returns the page bytes sent and their wire bytes.
    fn stop_page_source(&self, id: &str) -> (u64, u64) {
        let Some(source) = locked(&self.page_sources).remove(id) else {
            return (0, 0);
        };
        source.stop();
        let (pages, wire) = source.bytes_sent();
        let push_ms = source.push_ms();
        let _ = self.update(id, |m| {
            let p = m.pages.get_or_insert_with(Default::default);
            p.after_wire += wire;
            if push_ms.is_some() {
                p.push_ms = push_ms;
            }
        });
        (pages, wire)
    }

    /// Asks the destination about `id` until its answer is one `wanted` accepts (never,
    /// once this gateway shuts down). A copy in its page phase answers when the phase
    /// ends (or after [`DESTINATION_CHECK`]); other answers are asked again after a
    /// pause that grows to [`DESTINATION_CHECK`].
    async fn destination_says(
        &self,
        id: &str,
        target: &str,
        wanted: impl Fn(TargetState) -> bool,
    ) -> TargetState {
        let stall = self.stall_watch(id, target, "how its copy is doing in the page phase");
        tokio::select! {
            s = self.ask_until(id, target, &wanted, &stall) => s,
            never = stall.watch(self) => match never {},
        }
    }

    async fn ask_until(
        &self,
        id: &str,
        target: &str,
        wanted: &impl Fn(TargetState) -> bool,
        stall: &super::StallWatch,
    ) -> TargetState {
        let mut pause = Duration::from_millis(100);
        let wait_ms = u32::try_from(DESTINATION_CHECK.as_millis()).unwrap_or(u32::MAX);
        loop {
            let asking = Instant::now();
            let asked = self
                .peers
                .request(
                    target,
                    &Request::Status {
                        migration: id.to_string(),
                        wait_ms,
                    },
                )
                .await;
            if let Ok(Response::Status { state, .. }) = asked {
                stall.answered(self);
                if wanted(state) {
                    return state;
                }
            }
            tokio::select! {
                () = self.cancel.cancelled() => std::future::pending::<()>().await,
                () = tokio::time::sleep(pause.saturating_sub(asking.elapsed())) => {}
            }
            pause = (pause * 2).min(DESTINATION_CHECK);
        }
    }

    /// The far end of a page tunnel: the lazy dump's page server of a running migration.
    pub(super) async fn connect_pages(
        &self,
        peer: &str,
        migration: &str,
    ) -> Result<TcpStream, String> {
        let m = self
            .get(migration)
            .filter(|m| m.role == Role::Source && m.target == peer)
            .ok_or_else(|| format!("no post-copy migration {migration} to {peer} here"))?;
        if m.phase.is_terminal() {
            return Err(format!("migration {migration} has ended ({})", m.phase));
        }
        let server: SocketAddr = m
            .page_server
            .filter(|_| locked(&self.page_sources).contains_key(migration))
            .ok_or_else(|| format!("migration {migration} serves no pages (yet)"))?;
        let tcp = TcpStream::connect(server)
            .await
            .map_err(|e| format!("the page server of {migration} does not answer: {e}"))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// Destination, before a lazy restore: Ferry stands in as the page server of the
    /// `criu lazy-pages` daemon (answering from a cache, asking the source's priority
    /// connection for pages a fault waits for) and pushes every lazy page into the cache
    /// in bulk meanwhile. Returns the address the daemon is to use.
    pub(super) async fn start_page_path(
        &self,
        peer: &str,
        id: &str,
        workload: &str,
        images: &std::path::Path,
    ) -> Result<SocketAddr, String> {
        let urgent = self
            .ingress
            .open_page_tunnel(peer, id, workload, true)
            .await?;
        let bulk = self
            .ingress
            .open_page_tunnel(peer, id, workload, false)
            .await?;
        let runs = crate::criu::image::lazy_runs(images).map_err(|e| e.to_string())?;
        let total: u64 = runs.iter().map(|r| r.nr_pages).sum();
        if total == 0 {
            // Said, as it should not happen: the move then has no page phase.
            tracing::warn!(
                migration = id,
                "the lazy dump left no page in the source: CRIU wrote every page into the image"
            );
        }
        // Pages the source sent ahead (less those written since) are served at once; the
        // bulk push brings the rest.
        let cache = self
            .precache(id)
            .unwrap_or_else(|| Arc::new(PageCache::default()));
        // Once the daemon has every page, the bulk push (which may still bring pages a
        // fault fetched first) stops: the source is released then.
        let placed = tokio_util::sync::CancellationToken::new();
        let record = {
            let (id, this, placed) = (id.to_string(), self.this(), placed.clone());
            let (kept, workload) = (Arc::clone(&cache), workload.to_string());
            move |stats: pages::ServeStats| {
                placed.cancel();
                // Off the page path: the pages stay for a later move here.
                if let Some(engine) = &this {
                    engine.keep_in_background(
                        &id,
                        &workload,
                        crate::checkpoint::warm::Received::Pages(kept.snapshot()),
                    );
                }
                tracing::info!(
                    migration = %id,
                    gets = stats.gets,
                    hits = stats.hits,
                    misses = stats.misses,
                    miss_wait_p50_us = ?stats.miss_wait_us(0.5),
                    miss_wait_p99_us = ?stats.miss_wait_us(0.99),
                    "the lazy-pages daemon has every page"
                );
                if let Some(engine) = this {
                    let _ = engine.update(&id, |m| {
                        let p = m.pages.get_or_insert_with(Default::default);
                        p.requests = stats.gets;
                        p.hits = stats.hits;
                        p.waits = stats.misses;
                        p.wait_p50_us = stats.miss_wait_us(0.5);
                        p.wait_p99_us = stats.miss_wait_us(0.99);
                    });
                }
            }
        };
        let local = if self.criu.ferry_lazy_pages() {
            // Ferry's daemon, in this gateway, reads the cache itself.
            let supply = Arc::new(pages::CacheSupply::new(Arc::clone(&cache), urgent));
            self.criu.supply_pages(images, Arc::clone(&supply) as _);
            let (id_owned, ended) = (id.to_string(), placed.clone());
            self.tasks.spawn(async move {
                match supply.finished().await {
                    (true, stats) => record(stats),
                    (false, _) => {
                        ended.cancel();
                        tracing::error!(migration = %id_owned, "the lazy-pages daemon gave up");
                    }
                }
            });
            urgent
        } else {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| format!("cannot listen for the lazy-pages daemon: {e}"))?;
            let local = listener
                .local_addr()
                .map_err(|e| format!("page server address: {e}"))?;
            let (served, id_owned, ended) = (Arc::clone(&cache), id.to_string(), placed.clone());
            self.tasks.spawn(async move {
                match pages::serve_daemon(listener, urgent, served).await {
                    Ok(stats) => record(stats),
                    Err(e) => {
                        ended.cancel();
                        tracing::error!(migration = %id_owned, error = %e, "serving the lazy-pages daemon failed");
                    }
                }
            });
            local
        };
        let (id_owned, this) = (id.to_string(), self.this());
        let compression = self.peers.compression(peer);
        self.tasks.spawn(async move {
            let started = Instant::now();
            let settled = {
                let (id, this) = (id_owned.clone(), this.clone());
                move |p: pages::Pushed| {
                    tracing::info!(
                        migration = %id,
                        kept = p.kept,
                        stale = p.stale,
                        "pages sent ahead, less those written since"
                    );
                    if let Some(engine) = this {
                        let _ = engine.update(&id, |m| {
                            let pages = m.pages.get_or_insert_with(Default::default);
                            pages.ahead = p.kept;
                            pages.stale = p.stale;
                        });
                    }
                }
            };
            let fetched = tokio::select! {
                f = pages::bulk_fetch(bulk, runs, cache, compression, settled) => f,
                () = placed.cancelled() => {
                    tracing::debug!(migration = %id_owned, "every page placed; the bulk push stops");
                    return;
                }
            };
            match fetched {
                Ok(pushed) => {
                    let pages = pushed.pages;
                    tracing::info!(
                        migration = %id_owned,
                        pages,
                        of = total,
                        ms = super::ms(started.elapsed()),
                        "every lazy page pushed"
                    );
                    if let Some(engine) = this {
                        let _ = engine.update(&id_owned, |m| {
                            m.pages.get_or_insert_with(Default::default).pushed = pages;
                        });
                    }
                }
                Err(e) => {
                    tracing::error!(migration = %id_owned, error = %e, "the bulk page push failed");
                }
            }
        });
        Ok(local)
    }

    /// Destination, after a lazy restore: the `criu lazy-pages` daemon fetching the pages
    /// runs on; when it has them all, the migration is complete here and the image and
    /// the tunnels go. If it fails, the copy is stopped (see [`Engine::fail_paging`]).
    pub(super) fn follow_lazy_pages(&self, id: &str, images: std::path::PathBuf) {
        let Some(mut running) = self.criu.take_running(&images) else {
            self.drop_precache(id);
            return;
        };
        let (ingress, id, this) = (Arc::clone(&self.ingress), id.to_string(), self.this());
        self.tasks.spawn(async move {
            let status = running.child.wait().await;
            let ok = matches!(&status, Ok(s) if s.success());
            if ok {
                tracing::info!(migration = %id, "every page fetched");
            } else {
                let log = std::fs::read_to_string(&running.log).unwrap_or_default();
                tracing::error!(migration = %id, status = ?status, tail = %crate::criu::error_tail(&log), "the lazy-pages daemon failed");
            }
            let Some(engine) = this else { return };
            engine.drop_precache(&id);
            // With every page sent ahead, the daemon can be done before the runtime's
            // restore returns and the copy is adopted: its outcome is waited for first
            // (a restore that fails is cleaned up on its own path).
            let waited = Instant::now();
            while engine.get(&id).is_some_and(|m| m.phase == Phase::Restoring)
                && waited.elapsed() < RESTORE_OUTCOME
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let paging = engine.get(&id).is_some_and(|m| m.phase == Phase::Paging);
            if ok && paging && !engine.copy_runs(&id) {
                engine
                    .fail_paging(&id, "the copy here exited before it had every page; the source, which has them all, resumes (writes made here since the switch are lost)")
                    .await;
                return;
            }
            if ok {
                let _ = engine.update(&id, |m| {
                    if m.phase == Phase::Paging {
                        m.phase = Phase::Completed;
                    }
                });
                ingress.close_tunnels(&id);
                super::remove_dir(&images);
            } else {
                engine
                    .fail_paging(&id, "the lazy-pages daemon failed before the copy had every page; the copy here was stopped and the source resumes (writes made here since the switch are lost)")
                    .await;
            }
        });
    }

    /// Destination, after a restart during the page phase: the daemon's guard wrote how
    /// it ended. Every page here: complete. Otherwise (or unknown) the copy cannot be
    /// trusted and is stopped.
    pub(super) fn recover_paging(self: &Arc<Self>, id: &str) {
        let exit = std::fs::read_to_string(
            self.incoming_dir
                .join(id)
                .join(crate::criu::layout::LAZY_PAGES_EXIT),
        )
        .ok();
        if exit.as_deref().map(str::trim) == Some("0") {
            if let Err(e) = self.update(id, |m| m.phase = Phase::Completed) {
                tracing::error!(migration = id, error = %e, "cannot journal the completed page phase");
            }
            super::remove_dir(&self.incoming_dir.join(id));
            return;
        }
        let (this, id) = (Arc::clone(self), id.to_string());
        self.tasks.spawn(async move {
            this.fail_paging(&id, "the destination gateway restarted before the copy had every page; the copy here was stopped and the source resumes (writes made here since the switch are lost)").await;
        });
    }
}

/// Why the source resumes: the destination's copy is gone (`state`).
fn lost_reason(target: &str, state: TargetState) -> String {
    format!(
        "site {target} lost its copy during the page phase ({state:?}: its page path or gateway stopped before it had every page); the source, frozen with every page, resumed here, and the writes made at {target} since the switch are lost"
    )
}

/// Waits until process `pid` (with that start time) is gone.
async fn wait_gone(pid: Option<i32>, start: Option<u64>) {
    let (Some(pid), Some(start)) = (pid, start) else {
        return;
    };
    while process::alive(pid, start) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
