//! A warm destination: the page blocks a site holds for a workload (those of its
//! checkpoints, replicated or taken here, and those of the last migration image it
//! received) are offered to the next migration's source, whose page images then carry
//! those pages as their digests ([`crate::transfer::codec`]) and only the rest as bytes.
//!
//! What is offered is only a hint: a block collected between the offer and the transfer
//! fails the receive with its digest named, and the migration rolls back (the source runs
//! on). Received images are kept in memory's pin list, like volume manifests: after a
//! restart the next move is cold until the site receives or checkpoints again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::replicate::{hex_list, parse_hex_list, refused};
use super::store::{is_page_image, Digest, StoredFile, PAGE_BLOCK};
use super::{blocking, CheckpointError, Checkpoints};
use crate::peer::wire::{Request, Response, MAX_WANTED};
use crate::transfer::{Held, HeldSet};

/// What a migration brought to this site, to keep.
pub enum Received {
    /// A stop-and-copy image's directory (its page files are kept).
    Image(std::path::PathBuf),
    /// The pages a post-copy move placed.
    Pages(Vec<crate::transfer::pages::CachedPage>),
}

/// Most pages of digests a source asks for at once.
const PAGES_AT_ONCE: u32 = 8;

/// The received images kept per workload, and the last list offered (a move asks for its
/// pages one after the other: listed at its first page, kept for the rest).
#[derive(Default)]
pub(super) struct Warm {
    received: HashMap<String, Vec<StoredFile>>,
    offered: Option<(String, Arc<Vec<Digest>>)>,
}

impl Checkpoints {
    fn warm(&self) -> std::sync::MutexGuard<'_, Warm> {
        self.warm
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The block store, as a receiver finds the pages a dedup block names.
    pub fn held(&self) -> Arc<dyn Held> {
        Arc::clone(&self.store) as Arc<dyn Held>
    }

    /// Keeps the pages a migration brought here for `workload` as blocks, in place of
    /// the previous ones: a later move here sends only other pages. Returns the bytes
    /// that were new to the store.
    pub async fn keep_received(
        &self,
        workload: &str,
        received: Received,
    ) -> Result<u64, CheckpointError> {
        let store = Arc::clone(&self.store);
        let (files, new_bytes) = blocking(move || match received {
            Received::Image(dir) => {
                let put = store.put_dir_where(&dir, is_page_image)?;
                Ok((put.files, put.new_bytes))
            }
            Received::Pages(pages) => {
                let mut batch = store.batch()?;
                let mut blocks = Vec::with_capacity(pages.len());
                for page in &pages {
                    let digest = *blake3::hash(page.bytes()).as_bytes();
                    batch.add_hashed(digest, page.bytes())?;
                    blocks.push(digest);
                }
                let new_bytes = batch.finish()?;
                let file = StoredFile {
                    name: "pages-postcopy.img".into(),
                    size: (blocks.len() * PAGE_BLOCK) as u64,
                    block_size: PAGE_BLOCK as u32,
                    blocks,
                };
                Ok((vec![file], new_bytes))
            }
        })
        .await?;
        let mut warm = self.warm();
        warm.received.insert(workload.to_string(), files);
        warm.offered = None;
        Ok(new_bytes)
    }

    /// Where a received image waits to be kept (the checkpoints' work directory: emptied
    /// when the gateway starts).
    pub fn received_dir(&self, migration: &str) -> std::path::PathBuf {
        self.work_dir.join(format!("received-{migration}"))
    }

    /// The blocks every kept received image needs (kept from collection).
    pub(super) fn received_pins(&self) -> Vec<StoredFile> {
        self.warm().received.values().flatten().cloned().collect()
    }

    /// The digests of every page block held here for `workload`, each once: listed anew
    /// for a move's first page (what was collected since is not offered), kept for the
    /// pages that follow.
    fn held_pages(&self, workload: &str, first: bool) -> Arc<Vec<Digest>> {
        if let Some((w, list)) = self.warm().offered.as_ref().filter(|_| !first) {
            if w == workload {
                return Arc::clone(list);
            }
        }
        let mut seen = HashSet::new();
        let mut list: Vec<Digest> = Vec::new();
        let mut take = |f: &StoredFile| {
            if is_page_image(&f.name) {
                list.extend(f.blocks.iter().copied().filter(|d| seen.insert(*d)));
            }
        };
        self.locked()
            .values()
            .filter(|c| c.workload == workload)
            .flat_map(|c| c.files.iter())
            .for_each(&mut take);
        self.warm()
            .received
            .get(workload)
            .into_iter()
            .flatten()
            .for_each(&mut take);
        let list = Arc::new(list);
        self.warm().offered = Some((workload.to_string(), Arc::clone(&list)));
        list
    }

    /// A peer's `HeldPages`: one page of the list.
    pub(super) fn answer_held(&self, workload: &str, page: u32) -> Result<Response, String> {
        crate::names::validate("workload", workload).map_err(|e| e.to_string())?;
        let list = self.held_pages(workload, page == 0);
        let pages = list.len().div_ceil(MAX_WANTED);
        let from = (page as usize).saturating_mul(MAX_WANTED).min(list.len());
        let to = (from + MAX_WANTED).min(list.len());
        Ok(Response::HeldPages {
            digests: hex_list(&list[from..to]),
            pages: u32::try_from(pages).unwrap_or(u32::MAX),
        })
    }

    /// The page blocks `peer` holds for `workload`, asked for before a freeze (a few
    /// pages at a time; one page is [`MAX_WANTED`] digests).
    pub async fn ask_held(&self, peer: &str, workload: &str) -> Result<HeldSet, CheckpointError> {
        let ask = |page: u32| {
            let (peers, peer) = (Arc::clone(&self.parts.peers), peer.to_string());
            let req = Request::HeldPages {
                workload: workload.to_string(),
                page,
            };
            async move {
                match peers.request(&peer, &req).await {
                    Ok(Response::HeldPages { digests, pages }) => Ok((
                        parse_hex_list(&digests, MAX_WANTED).map_err(refused)?,
                        pages,
                    )),
                    Ok(other) => Err(refused(format!("{peer} answered {other:?} to HeldPages"))),
                    Err(e) => Err(refused(e.to_string())),
                }
            }
        };
        let (first, pages) = ask(0).await?;
        let mut held: HeldSet = first.into_iter().collect();
        let mut next = 1u32;
        while next < pages {
            let upto = pages.min(next.saturating_add(PAGES_AT_ONCE));
            let mut asking = tokio::task::JoinSet::new();
            for page in next..upto {
                asking.spawn(ask(page));
            }
            while let Some(answer) = asking.join_next().await {
                let (digests, _) = answer.map_err(|e| refused(e.to_string()))??;
                held.extend(digests);
            }
            next = upto;
        }
        Ok(held)
    }
}
