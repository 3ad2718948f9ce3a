//! Post-copy's pages sent ahead: while the source still runs, every present page of its
//! private memory goes to the destination's page cache; once the lazy dump has frozen it,
//! the source reads those pages again and lists the ones written since (by digest), while
//! the destination already restores. The list opens the bulk page connection; the
//! destination serves nothing sent ahead before it, then forgets those pages and serves
//! the rest at once, and only written and new pages are left to faults and the bulk push.
//! A source that cannot tell which are stale says "all": stale pages are never served.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::{locked, Engine};
use crate::peer::wire::{ErrorCode, Request, Response};
use crate::peer::Body;
use crate::sys::{memory, process};
use crate::transfer::pages::{self, PageCache, Prepushed, Stale, TreeProcess};

/// Passes over the running tree's memory: all of it, then what changed during the first.
const PASSES: usize = 2;

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

impl Engine {
    /// Source, before the freeze: sends the running tree's pages ahead. Best effort: a
    /// failure only means the destination gets every page after the switch.
    pub(super) async fn prepush(&self, id: &str, target: &str, init: i32) {
        let started = Instant::now();
        let tree = tree_of(init);
        let req = Request::Prepush {
            migration: id.to_string(),
        };
        let outcome = async {
            let (mut send, recv) = self
                .peers
                .open_request(target, &req)
                .await
                .map_err(|e| e.to_string())?;
            // A first pass sends every page; a second only those written during the
            // first, so the freeze finds few written since.
            let mut sent = Prepushed::default();
            let mut wire = 0;
            for _ in 0..PASSES {
                let (_, w) = pages::prepush(&mut send, &tree, &mut sent)
                    .await
                    .map_err(|e| e.to_string())?;
                wire += w;
            }
            wire += pages::end_prepush(&mut send)
                .await
                .map_err(|e| e.to_string())?;
            match self.peers.answer(target, send, recv).await {
                Ok(Response::Ready) => Ok((sent, wire)),
                Ok(Response::Error { message, .. }) => Err(message),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        }
        .await;
        match outcome {
            Ok((sent, wire)) => {
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                tracing::info!(
                    migration = id,
                    pages = sent.pages(),
                    wire,
                    ms,
                    "pages sent ahead"
                );
                let ahead = sent.pages() as u64;
                let pages = ahead * memory::PAGE;
                locked(&self.prepushed).insert(id.to_string(), sent);
                let _ = self.update(id, |m| {
                    m.timings.prepush_ms = Some(ms);
                    let p = m.pages.get_or_insert_with(Default::default);
                    p.ahead = ahead;
                    p.ahead_wire = wire;
                    m.bytes_moved += pages;
                    m.bytes_on_wire += wire;
                });
            }
            Err(e) => {
                tracing::warn!(migration = id, error = %e, "could not send pages ahead; they all follow the switch");
            }
        }
    }

    /// Source, once the lazy dump froze the tree and its page source runs: compares the
    /// pages sent ahead with what the tree holds now, off the freeze's path (the
    /// destination restores meanwhile and serves nothing sent ahead until it has the
    /// list), and hands the page source the list of those written since: all of them if
    /// the comparison failed, none if nothing went ahead.
    pub(super) fn settle_stale(&self, id: &str, images: &Path, init: Option<i32>) {
        let Some(source) = locked(&self.page_sources).get(id).map(Arc::clone) else {
            return;
        };
        let sent = locked(&self.prepushed).remove(id);
        let lazy = crate::criu::image::lazy_runs(images);
        let (Some(sent), Some(init), Ok(lazy)) = (sent, init, lazy) else {
            source.set_stale(Stale::All, Vec::new());
            return;
        };
        let (id, this) = (id.to_string(), self.this());
        self.tasks.spawn(async move {
            let started = Instant::now();
            let tree = tree_of(init);
            let compared = tokio::task::spawn_blocking(move || {
                let stale = sent.stale(&tree);
                // The stale pages the lazy dump holds go unasked, first.
                let push = stale.as_ref().map(|s| pages::within(&lazy, s));
                (sent.pages(), stale, push)
            })
            .await;
            let Ok((ahead, Some(stale), Some(push))) = compared else {
                tracing::warn!(
                    migration = %id,
                    "comparing the pages sent ahead failed; the destination drops them"
                );
                source.set_stale(Stale::All, Vec::new());
                return;
            };
            let count = stale.len();
            source.set_stale(Stale::Only(stale), push);
            if let Some(engine) = this {
                let _ = engine.update(&id, |m| {
                    m.pages.get_or_insert_with(Default::default).stale = count as u64;
                });
            }
            tracing::info!(
                migration = %id,
                ahead,
                stale = count,
                ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "pages written since they went ahead"
            );
        });
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
        let cache = Arc::new(PageCache::held());
        locked(&self.precaches).insert(id.to_string(), Arc::clone(&cache));
        match pages::receive_prepush(&mut body, &cache, max_pages).await {
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

    /// Destination: the pages sent ahead for `id`, held until the source's stale list came.
    pub(super) fn take_precache(&self, id: &str) -> Option<Arc<PageCache>> {
        locked(&self.precaches).remove(id)
    }

    pub(super) fn drop_precache(&self, id: &str) {
        locked(&self.precaches).remove(id);
    }
}
