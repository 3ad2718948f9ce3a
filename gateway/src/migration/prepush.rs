//! Post-copy's pages sent ahead: while the source still runs, every present page of its
//! private memory goes to the destination's page cache; once the lazy dump has frozen it,
//! the source reads those pages again and lists the ones written since (by digest). The
//! list travels with the image; the destination forgets those pages, so its page path
//! serves the rest at once, and only written and new pages are left to faults and the
//! bulk push. A destination without the list (the sending failed, the list is missing)
//! drops what it was sent ahead: stale pages are never served.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::{locked, Engine};
use crate::peer::wire::{ErrorCode, Request, Response};
use crate::peer::Body;
use crate::sys::{memory, process};
use crate::transfer::pages::{self, PageCache, Prepushed, TreeProcess};

/// Passes over the running tree's memory: all of it, then what changed during the first.
const PASSES: usize = 2;

/// The stale-page list in the image directory (Ferry's, not CRIU's).
const STALE_PAGES: &str = "ferry-stale-pages";

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
                    m.pages.get_or_insert_with(Default::default).ahead = ahead;
                    m.bytes_moved += pages;
                    m.bytes_on_wire += wire;
                });
            }
            Err(e) => {
                tracing::warn!(migration = id, error = %e, "could not send pages ahead; they all follow the switch");
            }
        }
    }

    /// Source, once the lazy dump froze the tree: lists the pages sent ahead that it no
    /// longer holds as sent, into the image directory (nothing, if none were sent).
    pub(super) async fn list_stale(&self, id: &str, images: &Path, init: i32) {
        let Some(sent) = locked(&self.prepushed).remove(id) else {
            return;
        };
        let started = Instant::now();
        let tree = tree_of(init);
        let stale = tokio::task::spawn_blocking(move || {
            let stale = sent.stale(&tree);
            (sent.pages(), stale)
        })
        .await;
        let Ok((ahead, Some(stale))) = stale else {
            tracing::warn!(
                migration = id,
                "comparing the pages sent ahead failed; the destination drops them"
            );
            return;
        };
        if let Err(e) = std::fs::write(images.join(STALE_PAGES), pages::encode_stale(&stale)) {
            tracing::warn!(migration = id, error = %e, "cannot write the stale-page list; the destination drops the pages sent ahead");
            return;
        }
        let _ = self.update(id, |m| {
            m.pages.get_or_insert_with(Default::default).stale = stale.len() as u64;
        });
        tracing::info!(
            migration = id,
            ahead,
            stale = stale.len(),
            ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "pages written since they went ahead"
        );
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
        let cache = Arc::new(PageCache::default());
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

    /// Destination: the pages sent ahead for `id`, with the ones the image's list names
    /// forgotten; none without a list (they may be stale).
    pub(super) fn take_precache(&self, id: &str, images: &Path) -> Option<Arc<PageCache>> {
        let cache = locked(&self.precaches).remove(id)?;
        let list = std::fs::read(images.join(STALE_PAGES))
            .map_err(|e| e.to_string())
            .and_then(|b| pages::decode_stale(&b));
        match list {
            Ok(stale) => {
                cache.forget(&stale);
                let kept = cache.len() as u64;
                let _ = self.update(id, |m| {
                    let p = m.pages.get_or_insert_with(Default::default);
                    p.ahead = kept;
                    p.stale = stale.len() as u64;
                });
                tracing::info!(
                    migration = id,
                    kept = cache.len(),
                    stale = stale.len(),
                    "pages sent ahead, less those written since"
                );
                Some(cache)
            }
            Err(e) => {
                tracing::warn!(migration = id, error = %e, "no usable stale-page list; dropping the pages sent ahead");
                None
            }
        }
    }

    pub(super) fn drop_precache(&self, id: &str) {
        locked(&self.precaches).remove(id);
    }
}
