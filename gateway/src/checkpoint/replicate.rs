//! Checkpoints replicated to a peer over the QUIC link, so a site that is lost can have
//! its workloads recovered elsewhere. Only the blocks the peer lacks travel (it is asked
//! first), zstd-compressed in batches, each checked against its digest on arrival; then
//! the checkpoint's record, accepted only once every block it names is there.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::store::{self, Digest};
use super::{Checkpoint, CheckpointError, Checkpoints};

/// Blocks one [`Checkpoints::send_missing`] sent.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Sent {
    pub blocks: u64,
    /// Their bytes, uncompressed.
    pub bytes: u64,
    /// What crossed the link.
    pub wire_bytes: u64,
}
use crate::peer::wire::{ErrorCode, Request, Response, MAX_WANTED};
use crate::peer::Body;

/// Blocks per compressed batch on the wire.
const BATCH_BLOCKS: usize = 256;
/// Bounds on what a peer may send in one batch and one record.
const MAX_BATCH_BYTES: usize = 16 << 20;
const MAX_RECORD: u64 = 64 << 20;

/// How a checkpoint's replication went (in the source's record).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Replication {
    pub to: String,
    /// Blocks and bytes the peer lacked (those that travelled), and bytes on the wire.
    pub blocks: u64,
    pub bytes: u64,
    pub wire_bytes: u64,
    pub ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub(super) fn refused(message: impl Into<String>) -> CheckpointError {
    CheckpointError::Replication(message.into())
}

pub(super) fn hex_list(digests: &[Digest]) -> String {
    digests.iter().map(store::hex).collect()
}

pub(super) fn parse_hex_list(text: &str, most: usize) -> Result<Vec<Digest>, String> {
    if !text.len().is_multiple_of(64) || text.len() / 64 > most {
        return Err(format!(
            "a digest list is a multiple of 64 hex digits, at most {most} digests"
        ));
    }
    text.as_bytes()
        .chunks(64)
        .map(|c| {
            std::str::from_utf8(c)
                .ok()
                .and_then(|s| blake3::Hash::from_hex(s).ok())
                .map(|h| *h.as_bytes())
                .ok_or_else(|| "a digest is not 64 hex digits".to_string())
        })
        .collect()
}

impl Checkpoints {
    /// Sends checkpoint `c` to `peer`: the blocks it lacks, then the record.
    pub(super) async fn replicate(&self, c: &Checkpoint, peer: &str) -> Replication {
        let started = Instant::now();
        let mut r = Replication {
            to: peer.to_string(),
            ..Replication::default()
        };
        if let Err(e) = self.replicate_into(c, peer, &mut r).await {
            tracing::warn!(workload = %c.workload, checkpoint = %c.id, peer, error = %e, "checkpoint not replicated");
            r.error = Some(e.to_string());
        }
        r.ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        r
    }

    async fn replicate_into(
        &self,
        c: &Checkpoint,
        peer: &str,
        r: &mut Replication,
    ) -> Result<(), CheckpointError> {
        let digests: Vec<Digest> = c
            .files
            .iter()
            .flat_map(|f| f.blocks.iter().copied())
            .collect();
        let sent = self.send_missing(peer, &c.workload, &digests).await?;
        r.blocks += sent.blocks;
        r.bytes += sent.bytes;
        r.wire_bytes += sent.wire_bytes;
        // Mostly block digests (64 hex digits a block): compressed, they travel as about
        // their binary size.
        r.wire_bytes += self
            .send_packed(peer, c, "the record", |size| Request::Replica {
                workload: c.workload.clone(),
                checkpoint: c.id.clone(),
                size,
            })
            .await?;
        Ok(())
    }

    /// Sends `peer` `value` as zstd-compressed JSON in the body of the request `ask`
    /// makes from its size (`Replica`, `Volumes`), which it must answer `Kept`; the bytes
    /// on the wire.
    pub(super) async fn send_packed(
        &self,
        peer: &str,
        value: &impl Serialize,
        what: &str,
        ask: impl FnOnce(u64) -> Request,
    ) -> Result<u64, CheckpointError> {
        let json = serde_json::to_vec(value).map_err(|e| refused(e.to_string()))?;
        let packed = zstd::bulk::compress(&json, 3).map_err(|e| refused(e.to_string()))?;
        let mut req = self
            .parts
            .peers
            .request_with_body(peer, &ask(packed.len() as u64))
            .await
            .map_err(|e| refused(e.to_string()))?;
        req.body()
            .write_all(&packed)
            .await
            .map_err(|e| refused(format!("sending {what} to {peer}: {e}")))?;
        match req.response().await.map_err(|e| refused(e.to_string()))? {
            Response::Kept { .. } => Ok(packed.len() as u64),
            Response::Error { message, .. } => Err(refused(format!("{peer}: {message}"))),
            other => Err(refused(format!("{peer} answered {other:?} to {what}"))),
        }
    }

    /// Sends `peer` those of `digests` (blocks of `workload`, in this site's store) it
    /// lacks: asked first, then sent zstd-compressed in batches, checked there.
    pub(super) async fn send_missing(
        &self,
        peer: &str,
        workload: &str,
        digests: &[Digest],
    ) -> Result<Sent, CheckpointError> {
        let peers = &self.parts.peers;
        let mut seen = std::collections::HashSet::new();
        let unique: Vec<Digest> = digests
            .iter()
            .copied()
            .filter(|d| seen.insert(*d))
            .collect();
        let mut sent = Sent::default();
        let mut missing = Vec::new();
        for chunk in unique.chunks(MAX_WANTED) {
            let asked = Request::BlocksWanted {
                workload: workload.to_string(),
                digests: hex_list(chunk),
            };
            match peers
                .request(peer, &asked)
                .await
                .map_err(|e| refused(e.to_string()))?
            {
                Response::Missing { digests } => {
                    missing.extend(parse_hex_list(&digests, MAX_WANTED).map_err(refused)?);
                }
                other => {
                    return Err(refused(format!(
                        "{peer} answered {other:?} to BlocksWanted"
                    )))
                }
            }
        }
        if missing.is_empty() {
            return Ok(sent);
        }
        let mut req = peers
            .request_with_body(
                peer,
                &Request::Blocks {
                    workload: workload.to_string(),
                },
            )
            .await
            .map_err(|e| refused(e.to_string()))?;
        let mut rest = missing.as_slice();
        while !rest.is_empty() {
            let store = std::sync::Arc::clone(&self.store);
            let digests = rest[..rest.len().min(BATCH_BLOCKS)].to_vec();
            let frame = super::blocking(move || encode_batch(&store, &digests)).await?;
            rest = &rest[frame.blocks.max(1).min(rest.len())..];
            sent.blocks += frame.blocks as u64;
            sent.bytes += frame.raw;
            sent.wire_bytes += frame.bytes.len() as u64;
            req.body()
                .write_all(&frame.bytes)
                .await
                .map_err(|e| refused(format!("sending blocks to {peer}: {e}")))?;
        }
        req.body()
            .write_all(&0u32.to_le_bytes())
            .await
            .map_err(|e| refused(format!("sending blocks to {peer}: {e}")))?;
        match req.response().await.map_err(|e| refused(e.to_string()))? {
            Response::Kept { .. } => Ok(sent),
            Response::Error { message, .. } => Err(refused(format!("{peer}: {message}"))),
            other => Err(refused(format!("{peer} answered {other:?} to Blocks"))),
        }
    }

    /// A peer's replication request (`BlocksWanted`, `Blocks`, `Replica`).
    pub async fn handle_peer(&self, peer: &str, req: Request, body: Body<'_>) -> Response {
        let answered = match req {
            Request::BlocksWanted { workload, digests } => self.wanted(&workload, &digests),
            Request::Blocks { workload } => self.receive_blocks(&workload, body).await,
            Request::Replica {
                workload,
                checkpoint,
                size,
            } => {
                self.receive_record(peer, &workload, &checkpoint, size, body)
                    .await
            }
            Request::Fence { workload } => Ok(Response::Recovered {
                since_ms: self.recovered_here(peer, &workload),
            }),
            Request::HeldPages { workload, page } => self.answer_held(&workload, page),
            Request::Volumes {
                workload,
                migration,
                size,
                precopy,
            } => {
                let ask = super::volume::VolumesAsk {
                    workload: &workload,
                    migration: &migration,
                    size,
                    precopy,
                };
                self.receive_volumes(peer, ask, body).await
            }
            _ => Err("not a replication request".to_string()),
        };
        answered.unwrap_or_else(|message| {
            tracing::warn!(peer, %message, "replication request refused");
            Response::error(ErrorCode::BadRequest, message)
        })
    }

    /// Since when `workload` runs here recovered from a checkpoint `peer` replicated.
    fn recovered_here(&self, peer: &str, workload: &str) -> Option<u64> {
        let w = self.parts.workloads.get(workload)?;
        let o = w.restored_from.as_ref()?;
        (o.site == peer && o.migration.starts_with(super::RECOVERED)).then_some(w.started_at_ms)
    }

    /// The lost site, back: asks the peer each of its workloads replicates to whether it
    /// recovered that workload meanwhile; an older copy here is then stopped and
    /// forgotten (the service runs there now), never resumed.
    pub(super) async fn fence(&self) {
        for w in self.parts.workloads.list() {
            let Some(peer) = w
                .spec
                .checkpoints
                .as_ref()
                .and_then(|p| p.replicate_to.clone())
                .filter(|p| *p != self.site)
            else {
                continue;
            };
            let asked = Request::Fence {
                workload: w.spec.name.clone(),
            };
            let answer = tokio::time::timeout(
                std::time::Duration::from_secs(3),
                self.parts.peers.request(&peer, &asked),
            )
            .await;
            let Ok(Ok(Response::Recovered {
                since_ms: Some(since),
            })) = answer
            else {
                continue;
            };
            if w.started_at_ms >= since || w.migration.is_some() {
                continue;
            }
            tracing::warn!(workload = %w.spec.name, site = %peer, since_ms = since, "this workload was recovered at another site while this one was lost; the old copy here is stopped, not resumed, and its routes lead there");
            // As a migration's source ends: stopped before its record goes, and this
            // site's routes forward to where it runs now.
            self.parts.workloads.stop(&w).await;
            if let Err(e) = self.parts.workloads.forget(&w.spec.name) {
                tracing::error!(workload = %w.spec.name, error = %e, "cannot forget the fenced copy");
            }
            self.parts
                .ingress
                .release(&w.spec.name, crate::proxy::Target::Remote(peer));
        }
    }

    fn wanted(&self, workload: &str, digests: &str) -> Result<Response, String> {
        crate::names::validate("workload", workload).map_err(|e| e.to_string())?;
        let asked = parse_hex_list(digests, MAX_WANTED)?;
        Ok(Response::Missing {
            digests: hex_list(&self.store.missing(&asked)),
        })
    }

    async fn receive_blocks(&self, workload: &str, body: Body<'_>) -> Result<Response, String> {
        crate::names::validate("workload", workload).map_err(|e| e.to_string())?;
        let mut batches = Vec::new();
        let mut total = 0usize;
        loop {
            let Some(batch) = read_batch(body).await? else {
                break;
            };
            total += batch.len();
            batches.push(batch);
            // Stored as they come: at most one batch's blocks are held at once per 64.
            if batches.len() >= 64 {
                self.store_batches(std::mem::take(&mut batches)).await?;
            }
        }
        let (blocks, bytes) = self.store_batches(batches).await?;
        tracing::debug!(workload, total, blocks, bytes, "replicated blocks kept");
        Ok(Response::Kept { blocks, bytes })
    }

    async fn store_batches(
        &self,
        batches: Vec<Vec<(Digest, Vec<u8>)>>,
    ) -> Result<(u64, u64), String> {
        let store = std::sync::Arc::clone(&self.store);
        super::blocking(move || {
            let mut batch = store.batch()?;
            let mut blocks = 0;
            for (digest, data) in batches.iter().flatten() {
                if batch.add_block(*digest, data)? {
                    blocks += 1;
                }
            }
            let bytes = batch.finish()?;
            Ok((blocks, bytes))
        })
        .await
        .map_err(|e| e.to_string())
    }

    async fn receive_record(
        &self,
        peer: &str,
        workload: &str,
        id: &str,
        size: u64,
        body: Body<'_>,
    ) -> Result<Response, String> {
        crate::names::validate("workload", workload).map_err(|e| e.to_string())?;
        if id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("bad checkpoint id {id:?}"));
        }
        let mut c: Checkpoint = read_packed(body, size, "checkpoint record").await?;
        if c.workload != workload || c.id != id || c.spec.name != workload {
            return Err("the record names another workload or checkpoint".into());
        }
        c.spec.validate().map_err(|e| e.to_string())?;
        let named: Vec<Digest> = c
            .files
            .iter()
            .flat_map(|f| f.blocks.iter().copied())
            .collect();
        let lacking = self.store.missing(&named);
        if !lacking.is_empty() {
            return Err(format!(
                "{} of its blocks are not here; send them first",
                lacking.len()
            ));
        }
        c.from_site = Some(peer.to_string());
        c.replicated = None;
        self.keep_record(&c).map_err(|e| e.to_string())?;
        tracing::info!(
            workload,
            checkpoint = id,
            from = peer,
            bytes = c.bytes,
            "checkpoint replica kept"
        );
        if let Err(e) = self.retain(workload) {
            tracing::warn!(workload, error = %e, "cannot drop old checkpoints");
        }
        Ok(Response::Kept {
            blocks: named.len() as u64,
            bytes: c.bytes,
        })
    }
}

/// Reads a body of `size` bytes of zstd-compressed JSON (a `Replica`'s record, a
/// `Volumes` manifest), at most [`MAX_RECORD`] bytes either way.
pub(super) async fn read_packed<T: serde::de::DeserializeOwned>(
    body: Body<'_>,
    size: u64,
    what: &str,
) -> Result<T, String> {
    if size > MAX_RECORD {
        return Err(format!(
            "a {what} of {size} bytes is over the {MAX_RECORD} byte limit"
        ));
    }
    let mut packed = vec![0u8; usize::try_from(size).map_err(|e| e.to_string())?];
    body.read_exact(&mut packed)
        .await
        .map_err(|e| format!("reading the {what}: {e}"))?;
    let bytes = zstd::bulk::decompress(&packed, MAX_RECORD as usize).map_err(|e| {
        format!("the {what} does not decompress (or is over {MAX_RECORD} bytes): {e}")
    })?;
    serde_json::from_slice(&bytes).map_err(|e| format!("the {what} is not valid: {e}"))
}

/// One batch as it goes on the wire, the raw bytes it carries, and how many of the
/// digests it was given it holds.
struct Frame {
    bytes: Vec<u8>,
    raw: u64,
    blocks: usize,
}

/// Raw bytes one batch holds at most: under the receiver's bound with room for zstd's
/// worst case on incompressible blocks.
const BATCH_RAW_BYTES: usize = MAX_BATCH_BYTES - store::FILE_BLOCK;

/// A batch of the first of `digests` (at least one) that fit [`BATCH_RAW_BYTES`].
fn encode_batch(store: &store::BlockStore, digests: &[Digest]) -> Result<Frame, store::StoreError> {
    let mut raw = Vec::new();
    let mut lens = Vec::with_capacity(digests.len());
    for d in digests {
        let block = store.read_block(d)?;
        if !lens.is_empty() && raw.len() + block.len() > BATCH_RAW_BYTES {
            break;
        }
        lens.push(u32::try_from(block.len()).unwrap_or(u32::MAX));
        raw.extend_from_slice(&block);
    }
    let digests = &digests[..lens.len()];
    let packed = zstd::bulk::compress(&raw, 1).map_err(|source| store::StoreError::Io {
        path: "zstd".into(),
        source,
    })?;
    let mut bytes = Vec::with_capacity(8 + digests.len() * 36 + packed.len());
    bytes.extend_from_slice(&u32::try_from(digests.len()).unwrap_or(0).to_le_bytes());
    for d in digests {
        bytes.extend_from_slice(d);
    }
    for l in &lens {
        bytes.extend_from_slice(&l.to_le_bytes());
    }
    bytes.extend_from_slice(
        &u32::try_from(packed.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    bytes.extend_from_slice(&packed);
    Ok(Frame {
        bytes,
        raw: raw.len() as u64,
        blocks: lens.len(),
    })
}

/// Reads one batch (`None` at the end marker), bounded, each block split out.
async fn read_batch(
    body: &mut (dyn AsyncRead + Unpin + Send),
) -> Result<Option<Vec<(Digest, Vec<u8>)>>, String> {
    let read_err = |e: std::io::Error| format!("reading blocks: {e}");
    let n = body.read_u32_le().await.map_err(read_err)? as usize;
    if n == 0 {
        return Ok(None);
    }
    if n > BATCH_BLOCKS {
        return Err(format!(
            "a batch of {n} blocks is over the {BATCH_BLOCKS} limit"
        ));
    }
    let mut digests = vec![[0u8; 32]; n];
    for d in &mut digests {
        body.read_exact(d).await.map_err(read_err)?;
    }
    let mut lens = Vec::with_capacity(n);
    for _ in 0..n {
        lens.push(body.read_u32_le().await.map_err(read_err)? as usize);
    }
    let raw_len: usize = lens.iter().sum();
    let zlen = body.read_u32_le().await.map_err(read_err)? as usize;
    if raw_len > MAX_BATCH_BYTES
        || zlen > MAX_BATCH_BYTES
        || lens.iter().any(|l| *l > store::FILE_BLOCK)
    {
        return Err("a batch is over its size limits".into());
    }
    let mut packed = vec![0u8; zlen];
    body.read_exact(&mut packed).await.map_err(read_err)?;
    let raw = zstd::bulk::decompress(&packed, raw_len)
        .map_err(|e| format!("a batch does not decompress: {e}"))?;
    if raw.len() != raw_len {
        return Err("a batch holds fewer bytes than its lengths say".into());
    }
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    for (d, l) in digests.into_iter().zip(lens) {
        out.push((d, raw[at..at + l].to_vec()));
        at += l;
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_lists_are_bounded_and_exact() {
        let d = [[1u8; 32], [2u8; 32]];
        assert_eq!(parse_hex_list(&hex_list(&d), 2), Ok(d.to_vec()));
        assert!(parse_hex_list(&hex_list(&d), 1).is_err());
        assert!(parse_hex_list("abc", 10).is_err());
        assert!(parse_hex_list(&"zz".repeat(32), 10).is_err());
    }

    #[tokio::test]
    async fn a_batch_round_trips_and_a_lying_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferry-batch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = store::BlockStore::open(&dir).expect("store");
        let mut b = store.batch().expect("batch");
        let blocks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 4096]).collect();
        let digests: Vec<Digest> = blocks.iter().map(|b| *blake3::hash(b).as_bytes()).collect();
        for (d, data) in digests.iter().zip(&blocks) {
            assert!(b.add_block(*d, data).expect("add"));
        }
        b.finish().expect("finish");
        let frame = encode_batch(&store, &digests).expect("encode");
        let mut wire: &[u8] = &frame.bytes;
        let got = read_batch(&mut wire).await.expect("read").expect("a batch");
        assert_eq!(
            got.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(),
            blocks
        );
        // A block whose bytes do not match its digest is refused by the store.
        let mut b = store.batch().expect("batch");
        assert!(b.add_block([9u8; 32], &blocks[0]).is_err());
        // Blocks of 1 MiB (a volume's, a large image file's): a batch takes only what
        // the receiver accepts, and what it leaves goes in the next.
        let mut b = store.batch().expect("batch");
        let big: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; store::FILE_BLOCK]).collect();
        let big_digests: Vec<Digest> = big.iter().map(|b| *blake3::hash(b).as_bytes()).collect();
        for (d, data) in big_digests.iter().zip(&big) {
            b.add_block(*d, data).expect("add");
        }
        b.finish().expect("finish");
        let frame = encode_batch(&store, &big_digests).expect("encode");
        assert_eq!(frame.blocks, BATCH_RAW_BYTES / store::FILE_BLOCK);
        let mut wire: &[u8] = &frame.bytes;
        let got = read_batch(&mut wire)
            .await
            .expect("accepted")
            .expect("a batch");
        assert_eq!(got.len(), frame.blocks);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
