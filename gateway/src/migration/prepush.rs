//! Post-copy's pages sent ahead: while the source still runs, every present page of its
//! private memory goes to the destination's page cache; once the lazy dump has frozen it,
//! the source reads those pages again and lists the ones written since (by digest), while
//! the image travels and the destination restores. The list goes to the destination at
//! once with those pages as they are now (`Settle`), and then opens the bulk page
//! connection; the destination serves nothing sent ahead before it, then forgets the
//! stale pages and serves the rest at once, and only new pages are left to faults and the
//! bulk push. A source that cannot tell which are stale says "all": stale pages are never
//! served.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{locked, ms, Engine};
use crate::peer::wire::{ErrorCode, Request, Response};
use crate::peer::Body;
use crate::sys::{memory, process};
use crate::transfer::pages::{self, PageCache, Prepushed, Stale, TreeProcess};

/// Passes over the running tree's memory: all of it, then what changed during the first.
const PASSES: usize = 2;
/// Drops what it holds on a blocking thread (pages sent ahead: a large map, and write
/// tracking whose end makes the kernel unprotect every page), off the async threads and
/// after the work that needs speed.
struct ReleaseLater(Option<Prepushed>);

impl Drop for ReleaseLater {
    fn drop(&mut self) {
        if let Some(sent) = self.0.take() {
            tokio::task::spawn_blocking(move || drop(sent));
        }
    }
}

/// About what holding the clients and the lazy dump take before the image starts to
/// travel, for a tree of `bytes` sent ahead (measured here: 45-55 ms at 64 MiB, 62-92 ms at
/// 1 GiB): the freeze starts that long before the last page sent ahead should have left
/// the link's queue, so the dump overlaps the end of the push and the image then goes
/// out on a link the push has just left.
fn lead(bytes: u64) -> Duration {
    Duration::from_millis(50 + bytes / (32 << 20))
}

/// QUIC's packet headers, frame headers and tag: a little more than this share of the
/// payload (2.3 % measured), so that the estimate of what is left to send reaches zero.
const WIRE_OVERHEAD: f64 = 1.02;
/// How often the source looks how much of the pages sent ahead is still to travel.
const TAIL_POLL: Duration = Duration::from_millis(2);
/// Whatever the estimate says, the freeze waits no longer than this for the pages sent
/// ahead to leave.
const TAIL_WAIT_MAX: Duration = Duration::from_secs(5);

/// Time until a link that has sent `sent` bytes in `elapsed` (at that rate) has sent
/// all of `written` payload bytes; `None` before anything was sent.
fn unsent_for(written: u64, sent: u64, elapsed: Duration) -> Option<Duration> {
    let secs = elapsed.as_secs_f64();
    if sent == 0 || secs <= 0.0 {
        return None;
    }
    let rate = sent as f64 / secs;
    let unsent = (written as f64 * WIRE_OVERHEAD - sent as f64).max(0.0);
    Some(Duration::from_secs_f64(unsent / rate))
}

/// `target`'s answer to a request whose body went on `send`: `Ready`, else why not.
async fn ready(
    peers: &crate::peer::PeerLink,
    target: &str,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), String> {
    match peers.answer(target, send, recv).await {
        Ok(Response::Ready) => Ok(()),
        Ok(Response::Error { message, .. }) => Err(message),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether a link that sent `step` bytes in the last `dt` went idle: under a tenth of its
/// average (`sent` bytes in `elapsed`).
fn went_idle(step: u64, dt: Duration, sent: u64, elapsed: Duration) -> bool {
    let (dt, elapsed) = (dt.as_secs_f64(), elapsed.as_secs_f64());
    dt > 0.0 && elapsed > 0.0 && (step as f64 / dt) < (sent as f64 / elapsed) / 10.0
}

/// How often the source looks whether CRIU has frozen the tree yet.
const FREEZE_POLL: Duration = Duration::from_millis(2);

/// What the source found while the dump ran: the pages sent ahead, and the settlement
/// made of the frozen tree (if it was frozen in time and could be compared).
pub(super) type Early = tokio::task::JoinHandle<(Prepushed, Option<pages::Settlement>)>;

/// How long the bulk page connection waits for the stale pages to have gone early before
/// it is told the list (it then asks for what it lacks, maybe some of those again).
const SETTLE_FIRST: Duration = Duration::from_secs(2);

/// The processes of `init`'s tree, with their ids in CRIU's images.
pub(super) fn tree_of(init: i32) -> Vec<TreeProcess> {
    let mut pids = process::tree(init);
    if pids.is_empty() {
        pids.push(init);
    }
    pids.into_iter()
        .filter_map(|pid| memory::ns_pid(pid).map(|id| TreeProcess { pid, id }))
        .collect()
}

/// How far around a thread's stack pointer its pages count as the first to be needed.
const STACK_REACH: u64 = 64 * 1024;

/// `runs` with those near a thread's stack pointer (of `tree`, frozen) first, each part in
/// its order.
fn stacks_first(
    runs: Vec<crate::criu::image::PageRun>,
    tree: &[TreeProcess],
) -> Vec<crate::criu::image::PageRun> {
    let near: Vec<(u32, u64, u64)> = tree
        .iter()
        .flat_map(|p| {
            memory::stack_pointers(p.pid).into_iter().map(move |sp| {
                (
                    p.id,
                    sp.saturating_sub(STACK_REACH),
                    sp.saturating_add(STACK_REACH),
                )
            })
        })
        .collect();
    let (first, rest): (Vec<_>, Vec<_>) = runs.into_iter().partition(|r| {
        let end = r.vaddr + r.nr_pages * memory::PAGE;
        near.iter()
            .any(|&(id, lo, hi)| id == r.pid && r.vaddr < hi && end > lo)
    });
    first.into_iter().chain(rest).collect()
}

impl Engine {
    /// Sends `req` to `target` with the body `write` puts on its stream; the body's
    /// result and the open stream, whose answer [`ready`] reads.
    async fn write_body<T>(
        &self,
        target: &str,
        req: &Request,
        write: impl AsyncFnOnce(&mut quinn::SendStream) -> std::io::Result<T>,
    ) -> Result<(T, quinn::SendStream, quinn::RecvStream), String> {
        let (mut send, recv) = self
            .peers
            .open_request(target, req)
            .await
            .map_err(|e| e.to_string())?;
        let out = write(&mut send).await.map_err(|e| e.to_string())?;
        Ok((out, send, recv))
    }

    /// As [`Self::write_body`], then `target`'s answer: the body's result once it
    /// answers `Ready`, else why not.
    async fn with_body<T>(
        &self,
        target: &str,
        req: &Request,
        write: impl AsyncFnOnce(&mut quinn::SendStream) -> std::io::Result<T>,
    ) -> Result<T, String> {
        let (out, send, recv) = self.write_body(target, req, write).await?;
        ready(&self.peers, target, send, recv).await.map(|()| out)
    }

    /// Source, before the freeze: sends the running tree's pages ahead, and returns once
    /// they are all written, not once they came: the freeze starts while the link still
    /// carries the last of them (the destination applies no stale list before they all
    /// came; see [`PageCache::arriving`]). The destination's answer is awaited beside the
    /// move. Best effort: a failure only means the destination gets every page after the
    /// switch.
    pub(super) async fn prepush(
        &self,
        id: &str,
        target: &str,
        init: i32,
        held: Option<Arc<crate::transfer::HeldSet>>,
    ) {
        let started = Instant::now();
        let tree = tree_of(init);
        let req = Request::Prepush {
            migration: id.to_string(),
        };
        let written = self
            .write_body(target, &req, async |send| {
                let before = self.peers.sent(target);
                // The kernel tracks writes from here (where it can), before any page is
                // read.
                let (mut sent, tracked) = tokio::task::spawn_blocking({
                    let tree = tree.clone();
                    move || {
                        let mut sent = Prepushed::with_held(held);
                        let tracked = sent.track(&tree);
                        (sent, tracked)
                    }
                })
                .await
                .map_err(std::io::Error::other)?;
                tracing::debug!(
                    migration = id,
                    processes = tree.len(),
                    tracked,
                    "write tracking"
                );
                // A first pass sends every page; a second only those written during the
                // first, so the freeze finds few written since.
                let mut wire = 0;
                for pass in 0..PASSES {
                    let (pages, bytes) = pages::prepush(send, &tree, &mut sent).await?;
                    wire += bytes;
                    tracing::debug!(
                        migration = id,
                        pass,
                        pages,
                        wire = bytes,
                        ms = ms(started.elapsed()),
                        "pass over the running tree written"
                    );
                }
                wire += pages::end_prepush(send).await?;
                let lead = lead(sent.pages() as u64 * memory::PAGE);
                let waited = self
                    .until_tail_within(target, before, started, wire, lead)
                    .await;
                tracing::debug!(
                    migration = id,
                    ms = ms(started.elapsed()),
                    waited_ms = ms(waited),
                    "pages sent ahead written; the freeze starts while the last of them travel"
                );
                Ok((sent, wire))
            })
            .await;
        let ((sent, wire), send, recv) = match written {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(migration = id, error = %e, "could not send pages ahead; they all follow the switch");
                return;
            }
        };
        let ahead = sent.pages() as u64;
        let deduped = sent.deduped();
        locked(&self.prepushed).insert(id.to_string(), sent);
        let _ = self.note(id, |m| {
            let p = m.pages.get_or_insert_with(Default::default);
            p.ahead = ahead;
            p.ahead_wire = wire;
            m.bytes_moved += ahead * memory::PAGE;
            m.bytes_on_wire += wire;
            m.bytes_deduped += deduped;
        });
        let Some(engine) = self.this() else {
            return;
        };
        let (id, target) = (id.to_string(), target.to_string());
        self.tasks.spawn(async move {
            match ready(&engine.peers, &target, send, recv).await {
                Ok(()) => {
                    let ms = ms(started.elapsed());
                    tracing::info!(
                        migration = %id,
                        pages = ahead,
                        wire,
                        ms,
                        "pages sent ahead"
                    );
                    let _ = engine.note(&id, |m| m.timings.prepush_ms = Some(ms));
                }
                Err(e) => {
                    tracing::warn!(migration = %id, error = %e, "the destination did not keep the pages sent ahead; they follow the switch");
                }
            }
        });
    }

    /// Source: waits until the `wire` bytes written to `target` since `started` (when the
    /// link had sent `before`) should all be across within `lead`, at the rate the link
    /// has carried them. Returns how long it waited.
    async fn until_tail_within(
        &self,
        target: &str,
        before: Option<crate::peer::LinkSent>,
        started: Instant,
        wire: u64,
        lead: Duration,
    ) -> Duration {
        let waiting = Instant::now();
        let Some(before) = before else {
            return Duration::ZERO;
        };
        // Once all is sent, the last byte leaves the queue the push filled on the way
        // (at the bottleneck) as long after as the queue holds.
        let mut all_sent: Option<Instant> = None;
        let mut last: Option<(Instant, u64)> = None;
        while waiting.elapsed() < TAIL_WAIT_MAX {
            let Some(now) = self.peers.sent(target) else {
                break;
            };
            let sent = now.bytes.saturating_sub(before.bytes);
            let Some(unsent) = unsent_for(wire, sent, started.elapsed()) else {
                break;
            };
            // All is sent when the estimate says so, or when the link, busy so far,
            // went idle (the estimate of the headers is only an estimate).
            let idle = last.is_some_and(|(at, then)| {
                went_idle(
                    sent.saturating_sub(then),
                    at.elapsed(),
                    sent,
                    started.elapsed(),
                )
            });
            if unsent.is_zero() || idle {
                all_sent.get_or_insert_with(Instant::now);
            }
            last = Some((Instant::now(), sent));
            let travelling = now
                .queued()
                .saturating_sub(all_sent.map_or(Duration::ZERO, |t| t.elapsed()));
            if unsent + travelling <= lead {
                break;
            }
            tokio::time::sleep(TAIL_POLL).await;
        }
        waiting.elapsed()
    }

    /// Source, as the checkpoint starts (the tree still runs): waits until CRIU has
    /// frozen every process of the tree, then, while the dump goes on, finds the pages
    /// sent ahead that were written since and reads them (see [`Self::settle_stale`]).
    /// Ends without a result if the tree is not frozen by the time `dumped` is set.
    pub(super) fn settle_while_dumping(
        &self,
        id: &str,
        target: &str,
        init: Option<i32>,
        dumped: Arc<std::sync::atomic::AtomicBool>,
    ) -> Option<Early> {
        let init = init?;
        let sent = locked(&self.prepushed).remove(id)?;
        let compressed = self.peers.compression(target) == crate::transfer::Compression::Zstd;
        Some(tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let stopped = |tree: &[TreeProcess]| {
                !tree.is_empty() && tree.iter().all(|p| process::threads_stopped(p.pid))
            };
            // Polled: the tree as it was (listing a PID namespace reads all of /proc);
            // listed again once it looks frozen, to take in what it forked meanwhile.
            let mut tree = tree_of(init);
            loop {
                if stopped(&tree) {
                    tree = tree_of(init);
                }
                if stopped(&tree) {
                    let settled = sent.settle(&tree, |r| stacks_first(r, &tree), compressed);
                    tracing::debug!(
                        ms = ms(started.elapsed()),
                        stale = settled.as_ref().map(|s| s.stale.len()),
                        "stale pages found while the dump ran"
                    );
                    return (sent, settled);
                }
                if dumped.load(std::sync::atomic::Ordering::Acquire) {
                    return (sent, None);
                }
                std::thread::sleep(FREEZE_POLL);
            }
        }))
    }

    /// Source, once the lazy dump froze the tree and its page source runs: the stale
    /// pages (found while the dump ran, `early`, brought up to date; else found now,
    /// off the freeze's path: the image travels and the destination restores meanwhile,
    /// serving nothing sent ahead until it has the list) go to `target` with the list,
    /// then the page source's bulk connection gets the list: all of them if the
    /// comparison failed, none if nothing went ahead.
    pub(super) fn settle_stale(
        &self,
        id: &str,
        target: &str,
        init: Option<i32>,
        early: Option<Early>,
    ) {
        let Some(source) = locked(&self.page_sources).get(id).map(Arc::clone) else {
            return;
        };
        let (Some(init), Some(early)) = (init, early) else {
            source.set_stale(Stale::All);
            return;
        };
        let compressed = self.peers.compression(target) == crate::transfer::Compression::Zstd;
        let (id, target, this) = (id.to_string(), target.to_string(), self.this());
        self.tasks.spawn(async move {
            let started = Instant::now();
            let settled = async {
                let (sent, found) = early.await.ok()?;
                tokio::task::spawn_blocking(move || {
                    let tree = tree_of(init);
                    let early = found
                        .and_then(|mut s| sent.refresh(&mut s, &tree, compressed).then_some(s));
                    let fresh = early.is_none();
                    let settled = early.or_else(|| {
                        sent.settle(&tree, |r| stacks_first(r, &tree), compressed)
                    });
                    // Handed back: letting go of it (the write tracking ends, the
                    // kernel unprotects every page) waits until the list has gone.
                    settled.map(|s| (sent, s, fresh))
                })
                .await
                .ok()
                .flatten()
            }
            .await;
            let Some((sent, settled, fresh)) = settled else {
                tracing::warn!(
                    migration = %id,
                    "comparing the pages sent ahead failed; the destination drops them"
                );
                source.set_stale(Stale::All);
                return;
            };
            tracing::info!(
                migration = %id,
                ahead = sent.pages(),
                stale = settled.stale.len(),
                found_while_dumping = !fresh,
                ms = ms(started.elapsed()),
                "pages written since they went ahead"
            );
            let stale = Stale::Only(settled.stale.clone());
            let Some(engine) = this else {
                source.set_stale(stale);
                return;
            };
            let _release = ReleaseLater(Some(sent));
            let count = settled.stale.len() as u64;
            let _ = engine.update(&id, |m| {
                m.pages.get_or_insert_with(Default::default).stale = count;
            });
            let early = {
                let (engine, source, id) = (Arc::clone(&engine), Arc::clone(&source), id.clone());
                tokio::spawn(async move { engine.send_settled(&id, &target, &source, &settled).await })
            };
            if tokio::time::timeout(SETTLE_FIRST, early).await.is_err() {
                tracing::warn!(migration = %id, "the stale pages are slow to go; the bulk connection gets the list meanwhile");
            }
            source.set_stale(stale);
        });
    }

    /// Source: sends `target` the stale list and the stale pages at once (`Settle`). Best
    /// effort: what does not arrive this way the bulk push brings.
    async fn send_settled(
        &self,
        id: &str,
        target: &str,
        source: &pages::PageSource,
        settled: &pages::Settlement,
    ) {
        let started = Instant::now();
        let req = Request::Settle {
            migration: id.to_string(),
        };
        let outcome = self
            .with_body(target, &req, async |send| {
                // The restore needs the image first; the stale pages only once the copy
                // runs (the destination serves nothing sent ahead until they came).
                let _ = send.set_priority(crate::peer::BESIDE_IMAGE);
                source.send_settlement(send, settled).await
            })
            .await;
        match outcome {
            Ok((pages, wire)) => {
                tracing::info!(
                    migration = id,
                    pages,
                    wire,
                    ms = ms(started.elapsed()),
                    "stale list and pages sent"
                );
            }
            Err(e) => {
                tracing::warn!(migration = id, error = %e, "could not send the stale pages early; the bulk push brings them");
            }
        }
    }

    /// Destination: keeps the pages the source sends ahead for an incoming migration.
    pub(super) async fn receive_prepush(
        &self,
        peer: &str,
        id: &str,
        mut body: Body<'_>,
    ) -> Response {
        let Some(m) = self.incoming(peer, id) else {
            return Response::error(ErrorCode::Refused, format!("no migration {id} here"));
        };
        if m.phase.is_terminal() {
            return Response::error(
                ErrorCode::Refused,
                format!("migration {id} has ended ({})", m.phase),
            );
        }
        // At most half of what this host can still give: the restored tree needs the rest.
        let max_pages = memory::available_bytes().map_or(0, |b| b / 2 / memory::PAGE);
        let cache = Arc::new(PageCache::arriving());
        locked(&self.precaches).insert(id.to_string(), Arc::clone(&cache));
        let held = self.checkpoints.as_ref().map(|c| c.held());
        match pages::receive_prepush(&mut body, &cache, max_pages, held).await {
            Ok(pages) => {
                tracing::info!(migration = id, pages, "pages received ahead");
                Response::Ready
            }
            Err(e) => {
                self.drop_precache(id);
                Response::error(ErrorCode::BadRequest, format!("pages sent ahead: {e}"))
            }
        }
    }

    /// Destination: the source's stale list and the stale pages' contents now, for the
    /// pages sent ahead for `id`.
    pub(super) async fn receive_settled(
        &self,
        peer: &str,
        id: &str,
        mut body: Body<'_>,
    ) -> Response {
        let cache = match self.incoming(peer, id) {
            Some(m) if !m.phase.is_terminal() => self.precache(id),
            _ => None,
        };
        let Some(cache) = cache else {
            return Response::error(
                ErrorCode::Refused,
                format!("no pages sent ahead for migration {id} here"),
            );
        };
        match pages::receive_settled(&mut body, &cache).await {
            Ok((stale, pages)) => {
                tracing::info!(
                    migration = id,
                    stale,
                    pages,
                    "stale list and pages received"
                );
                Response::Ready
            }
            Err(e) => Response::error(ErrorCode::BadRequest, format!("stale pages: {e}")),
        }
    }

    /// Destination: the pages sent ahead for `id`, held until the source's stale list
    /// came; kept (for that list) until the page phase ends.
    pub(super) fn precache(&self, id: &str) -> Option<Arc<PageCache>> {
        locked(&self.precaches).get(id).map(Arc::clone)
    }

    pub(super) fn drop_precache(&self, id: &str) {
        locked(&self.precaches).remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::image::PageRun;

    #[test]
    fn the_time_left_to_send_is_what_is_unsent_at_the_rate_so_far() {
        let ms = Duration::from_millis;
        // Nothing sent yet: no rate, no estimate.
        assert_eq!(unsent_for(1_000_000, 0, ms(5)), None);
        // 100 MB/s so far; 1 MB written (1.02 MB with headers), 0.52 MB sent: 0.5 MB
        // unsent -> 5 ms.
        let left = unsent_for(1_000_000, 520_000, Duration::from_micros(5_200)).expect("a rate");
        assert!((left.as_secs_f64() * 1000.0 - 5.0).abs() < 0.01, "{left:?}");
        // Everything sent: nothing left to send.
        assert_eq!(unsent_for(1_000, 2_000, ms(1_000)), Some(Duration::ZERO));
        // 100 MB/s on average: 10 kB in 2 ms is idle (5 MB/s), 100 kB is not.
        assert!(went_idle(10_000, ms(2), 100_000_000, ms(1_000)));
        assert!(!went_idle(100_000, ms(2), 100_000_000, ms(1_000)));
        // The lead grows with the memory sent ahead.
        assert_eq!(lead(0), ms(50));
        assert_eq!(lead(1 << 30), ms(82));
    }

    #[test]
    fn the_runs_at_a_threads_stack_pointer_go_first() {
        let mut child = std::process::Command::new("sleep")
            .arg("2")
            .spawn()
            .expect("sleep runs");
        let pid = child.id() as i32;
        std::thread::sleep(Duration::from_millis(100));
        let sp = memory::stack_pointers(pid);
        assert_eq!(sp.len(), 1, "one thread, one stack pointer: {sp:x?}");
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
        let stack = maps
            .lines()
            .find(|l| l.ends_with("[stack]"))
            .expect("a stack");
        let (lo, hi) = stack
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'))
            .map(|(a, b)| {
                (
                    u64::from_str_radix(a, 16).unwrap(),
                    u64::from_str_radix(b, 16).unwrap(),
                )
            })
            .expect("its range");
        assert!(
            (lo..hi).contains(&sp[0]),
            "{:#x} outside the stack {lo:#x}-{hi:#x}",
            sp[0]
        );
        let page = sp[0] & !(memory::PAGE - 1);
        let run = |vaddr| PageRun {
            pid: 7,
            vaddr,
            nr_pages: 1,
        };
        let tree = [TreeProcess { pid, id: 7 }];
        let ordered = stacks_first(vec![run(0x1000), run(0x2000), run(page)], &tree);
        assert_eq!(
            ordered.iter().map(|r| r.vaddr).collect::<Vec<_>>(),
            vec![page, 0x1000, 0x2000]
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}
