//! How one image file travels on a byte stream: chunks hashed with BLAKE3 on both sides,
//! written under a temporary name and renamed only once the digest matches. With
//! `zstd`, each chunk travels as a block: `[kind u8][length u32][bytes]`, the kind saying
//! raw or zstd (a chunk that does not shrink goes raw), then an end block. The digest
//! always covers the file's own bytes, so it checks the decompression too. A file still
//! being written (a checkpoint's pages while CRIU dumps them) travels as it grows: always
//! in blocks, its size sent after the end block.
//!
//! Pages the receiver already holds ([`Held`]: blocks of its store, named by the BLAKE3
//! of their 4 KiB) travel as their digest: a *dedup* block is `[3][length u32]`, then
//! `[pages u16]`, a bitmap of which of those whole pages are digests, the digests, and
//! the other pages (and any tail shorter than a page) as `[kind u8]` raw or zstd bytes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::manifest::FileMeta;
use crate::names;

/// Largest image file a peer may send.
pub const MAX_FILE: u64 = 256 << 30;

pub(crate) const CHUNK: usize = 1 << 20;
const BLOCK_END: u8 = 0;
const BLOCK_RAW: u8 = 1;
const BLOCK_ZSTD: u8 = 2;
const BLOCK_DEDUP: u8 = 3;
/// The unit a dedup block names by digest: one memory page, as the block store keeps it.
pub const PAGE: usize = crate::criu::image::PAGE_SIZE as usize;

/// The digests of the page blocks a receiver holds (the sender's view of it).
pub type HeldSet = std::collections::HashSet<[u8; 32]>;

/// Where a receiver finds the pages a dedup block names by their digests.
pub trait Held: Send + Sync {
    /// Each block's bytes (None: not, or no longer, here), in the order asked. A wrong
    /// block fails the file's own digest check.
    fn blocks(&self, digests: &[[u8; 32]]) -> Vec<Option<Vec<u8>>>;
}
/// Fast enough to outrun a 1 Gbit/s link on one core with room to spare.
const ZSTD_LEVEL: i32 = 1;

thread_local! {
    /// One zstd context per thread, reused: making one costs more than compressing a
    /// page with it (a post-copy push compresses thousands of single pages).
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `data` compressed at Ferry's level, on this thread's context; `None` if zstd fails.
pub(crate) fn compress(data: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        slot.as_mut()?.compress(data).ok()
    })
}

/// `data` decompressed into at most `capacity` bytes, on this thread's context.
pub(crate) fn decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(data, capacity),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}
/// How often a growing file is looked at for new bytes.
const GROW_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// How image files travel on a link, chosen per peer in the site config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// The file's bytes as they are (for links faster than the CPUs can compress).
    None,
    /// Blocks of up to 1 MiB, each zstd-compressed (level 1) unless that does not make it
    /// smaller; CPU-cheap enough to gain on links up to several Gbit/s.
    #[default]
    Zstd,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "zstd" => Ok(Self::Zstd),
            other => Err(format!("unknown compression {other:?}: zstd or none")),
        }
    }
}

/// Why writing a file body stopped.
#[derive(Debug)]
pub enum BodyError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// A file body on its way out: hashes what it sends, counts its size and the bytes on
/// the wire, and frames chunks as blocks or as the bytes they are.
struct BodyWriter<'a, W> {
    out: &'a mut W,
    compression: Compression,
    blocks: bool,
    /// Pages the receiver holds: sent as their digest.
    held: Option<std::sync::Arc<HeldSet>>,
    hasher: blake3::Hasher,
    size: u64,
    wire: u64,
    /// Bytes sent as digests.
    deduped: u64,
}

impl<'a, W: AsyncWrite + Unpin> BodyWriter<'a, W> {
    fn new(out: &'a mut W, compression: Compression, blocks: bool) -> Self {
        Self {
            out,
            compression,
            blocks,
            held: None,
            hasher: blake3::Hasher::new(),
            size: 0,
            wire: 0,
            deduped: 0,
        }
    }

    /// Sends the first `len` bytes of `buf` (as one block: zstd when that makes it
    /// smaller); hands `buf` back.
    async fn chunk(&mut self, buf: Vec<u8>, len: usize) -> Result<Vec<u8>, BodyError> {
        self.hasher.update(&buf[..len]);
        self.size += len as u64;
        if !self.blocks {
            self.write(&buf[..len]).await?;
            return Ok(buf);
        }
        let buf = match self.held.clone().filter(|h| !h.is_empty()) {
            Some(held) => {
                let compression = self.compression;
                let (buf, framed) = tokio::task::spawn_blocking(move || {
                    let framed = dedup_block(&buf[..len], &held, compression);
                    (buf, framed)
                })
                .await
                .map_err(|e| BodyError::Read(std::io::Error::other(e)))?;
                if let Some((payload, deduped)) = framed {
                    self.deduped += deduped;
                    self.write(&[BLOCK_DEDUP]).await?;
                    self.write(&(payload.len() as u32).to_be_bytes()).await?;
                    self.write(&payload).await?;
                    return Ok(buf);
                }
                buf
            }
            None => buf,
        };
        self.framed(buf, len).await
    }

    /// Sends the first `len` bytes of `buf` as a raw or zstd block; hands `buf` back.
    async fn framed(&mut self, buf: Vec<u8>, len: usize) -> Result<Vec<u8>, BodyError> {
        let (buf, packed) = match self.compression {
            Compression::None => (buf, None),
            Compression::Zstd => tokio::task::spawn_blocking(move || {
                let packed = compress(&buf[..len]);
                (buf, packed)
            })
            .await
            .map_err(|e| BodyError::Read(std::io::Error::other(e)))?,
        };
        self.block(&buf[..len], packed.as_deref()).await?;
        Ok(buf)
    }

    /// One raw block, or zstd when `packed` is smaller.
    async fn block(&mut self, data: &[u8], packed: Option<&[u8]>) -> Result<(), BodyError> {
        let (kind, block) = match packed {
            Some(p) if p.len() < data.len() => (BLOCK_ZSTD, p),
            _ => (BLOCK_RAW, data),
        };
        self.write(&[kind]).await?;
        self.write(&(block.len() as u32).to_be_bytes()).await?;
        self.write(block).await
    }

    /// Ends the body: the end block and, when the peer does not know it yet, the size;
    /// then the digest.
    async fn finish(mut self, send_size: bool) -> Result<Written, BodyError> {
        if self.blocks {
            self.write(&[BLOCK_END]).await?;
        }
        if send_size {
            self.write(&self.size.to_be_bytes()).await?;
        }
        let digest = self.hasher.finalize();
        self.write(digest.as_bytes()).await?;
        Ok(Written {
            digest,
            size: self.size,
            wire: self.wire,
            deduped: self.deduped,
        })
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), BodyError> {
        self.out.write_all(bytes).await.map_err(BodyError::Write)?;
        self.wire += bytes.len() as u64;
        Ok(())
    }
}

/// A file body as it went out.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// BLAKE3 of the file's bytes.
    pub digest: blake3::Hash,
    pub size: u64,
    /// Bytes on the wire.
    pub wire: u64,
    /// Bytes of the file sent as the digests of pages the receiver holds.
    pub deduped: u64,
}

/// `data` (a chunk of a page image) as a dedup block's payload, if the receiver holds any
/// of its whole pages; with how many bytes went as digests.
pub(crate) fn dedup_block(
    data: &[u8],
    held: &HeldSet,
    compression: Compression,
) -> Option<(Vec<u8>, u64)> {
    let pages = data.len() / PAGE;
    let mut bitmap = vec![0u8; pages.div_ceil(8)];
    let mut refs = Vec::new();
    let mut literal = Vec::with_capacity(data.len());
    for (i, d) in page_digests(&data[..pages * PAGE]).iter().enumerate() {
        if held.contains(d) {
            bitmap[i / 8] |= 1 << (i % 8);
            refs.extend_from_slice(d);
        } else {
            literal.extend_from_slice(&data[i * PAGE..(i + 1) * PAGE]);
        }
    }
    if refs.is_empty() {
        return None;
    }
    literal.extend_from_slice(&data[pages * PAGE..]);
    let deduped = (refs.len() / 32 * PAGE) as u64;
    let mut payload = Vec::with_capacity(2 + bitmap.len() + refs.len() + 1 + literal.len());
    payload.extend_from_slice(&u16::try_from(pages).ok()?.to_be_bytes());
    payload.extend_from_slice(&bitmap);
    payload.extend_from_slice(&refs);
    let packed = match compression {
        Compression::Zstd if !literal.is_empty() => compress(&literal),
        _ => None,
    };
    match packed {
        Some(p) if p.len() < literal.len() => {
            payload.push(BLOCK_ZSTD);
            payload.extend_from_slice(&p);
        }
        _ => {
            payload.push(BLOCK_RAW);
            payload.extend_from_slice(&literal);
        }
    }
    Some((payload, deduped))
}

/// The BLAKE3 digest of each page of `data`, on up to two threads (a chunk is 256 pages).
fn page_digests(data: &[u8]) -> Vec<[u8; 32]> {
    let hash = |part: &[u8]| -> Vec<[u8; 32]> {
        part.chunks_exact(PAGE)
            .map(|p| *blake3::hash(p).as_bytes())
            .collect()
    };
    let pages = data.len() / PAGE;
    if pages < 64 {
        return hash(data);
    }
    let (front, back) = data.split_at(pages / 2 * PAGE);
    std::thread::scope(|s| {
        let rest = s.spawn(|| hash(back));
        let mut all = hash(front);
        all.extend(rest.join().unwrap_or_else(|_| hash(back)));
        all
    })
}

/// A dedup block's payload back as the bytes it stands for, its pages found in `held`.
/// Its size is bounded by a chunk (1 MiB).
pub(crate) fn undedup(payload: &[u8], held: Option<&dyn Held>) -> std::io::Result<Vec<u8>> {
    let bad = |what: &str| std::io::Error::other(format!("bad dedup block: {what}"));
    let held = held.ok_or_else(|| bad("this site has no block store to resolve it"))?;
    let (count, rest) = payload
        .split_first_chunk::<2>()
        .ok_or_else(|| bad("too short"))?;
    let pages = usize::from(u16::from_be_bytes(*count));
    if pages * PAGE > CHUNK {
        return Err(bad("more pages than a block holds"));
    }
    let (bitmap, rest) = rest
        .split_at_checked(pages.div_ceil(8))
        .ok_or_else(|| bad("no bitmap"))?;
    let named = (0..pages)
        .filter(|i| bitmap[i / 8] & (1 << (i % 8)) != 0)
        .count();
    let (refs, rest) = rest
        .split_at_checked(named * 32)
        .ok_or_else(|| bad("digests missing"))?;
    let (kind, rest) = rest.split_first().ok_or_else(|| bad("no literal kind"))?;
    let literal = match *kind {
        BLOCK_RAW => rest.to_vec(),
        BLOCK_ZSTD => decompress(rest, CHUNK)?,
        other => return Err(bad(&format!("literal kind {other}"))),
    };
    if literal.len() + named * PAGE > CHUNK || literal.len() < (pages - named) * PAGE {
        return Err(bad("literal bytes do not fit its pages"));
    }
    let digests: Vec<[u8; 32]> = refs
        .chunks_exact(32)
        .filter_map(|r| r.try_into().ok())
        .collect();
    let mut found = held.blocks(&digests).into_iter();
    let mut named = digests.iter();
    let mut out = Vec::with_capacity(literal.len() + digests.len() * PAGE);
    let mut lit = literal.as_slice();
    for i in 0..pages {
        if bitmap[i / 8] & (1 << (i % 8)) != 0 {
            let d = named.next().ok_or_else(|| bad("digests missing"))?;
            let block = found.next().flatten().ok_or_else(|| {
                std::io::Error::other(format!(
                    "page block {} is not in this site's store (removed since it was offered, or unreadable)",
                    blake3::Hash::from_bytes(*d).to_hex()
                ))
            })?;
            if block.len() != PAGE {
                return Err(bad("a named block is not one page"));
            }
            out.extend_from_slice(&block);
        } else {
            let (page, rest) = lit.split_at(PAGE);
            out.extend_from_slice(page);
            lit = rest;
        }
    }
    out.extend_from_slice(lit);
    Ok(out)
}

/// Writes a file that is still growing, in blocks, until `done` and end-of-file; then the
/// end block, the size and the digest. Pages `held` names go as their digests.
pub async fn write_growing(
    file: &mut (impl AsyncRead + Unpin),
    mut done: watch::Receiver<bool>,
    compression: Compression,
    held: Option<std::sync::Arc<HeldSet>>,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<Written, BodyError> {
    let mut body = BodyWriter::new(out, compression, true);
    body.held = held;
    let mut buf = vec![0u8; CHUNK];
    let mut filled = 0usize;
    loop {
        // Seen before the read: a writer that had finished wrote everything this read sees.
        let finished = *done.borrow_and_update();
        let n = file
            .read(&mut buf[filled..])
            .await
            .map_err(BodyError::Read)?;
        filled += n;
        if filled == CHUNK || (finished && n == 0 && filled > 0) {
            buf = body.chunk(buf, filled).await?;
            filled = 0;
            continue;
        }
        if n > 0 {
            continue;
        }
        if finished {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(GROW_POLL) => {}
            _ = done.changed() => {}
        }
    }
    body.finish(true).await
}

/// Writes `size` bytes of `file` to `out` as `compression` frames them, then the BLAKE3
/// trailer.
pub async fn write_body(
    file: &mut (impl AsyncRead + Unpin),
    size: u64,
    compression: Compression,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<Written, BodyError> {
    let mut body = BodyWriter::new(out, compression, compression == Compression::Zstd);
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let want = CHUNK.min(left as usize);
        file.read_exact(&mut buf[..want]).await.map_err(|e| {
            BodyError::Read(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                std::io::Error::new(e.kind(), "file shrank while it was sent")
            } else {
                e
            })
        })?;
        buf = body.chunk(buf, want).await?;
        left -= want as u64;
    }
    body.finish(false).await
}

/// Why a received file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Name(#[from] names::NameError),
    #[error("image file of {0} bytes exceeds the limit")]
    TooLarge(u64),
    #[error("stream ended early: {0}")]
    Stream(String),
    #[error("BLAKE3 mismatch for {name}: sender {expected}, received {actual}")]
    Digest {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Receives one file announced as `name` into `dir`, verifying its digest: `size` bytes
/// framed as `compression` says, or (`size` None) a growing file's blocks and then its size.
/// Dedup blocks take their pages from `held`.
pub async fn receive<R: AsyncRead + Unpin + ?Sized>(
    dir: &Path,
    name: &str,
    size: Option<u64>,
    compression: Compression,
    held: Option<std::sync::Arc<dyn Held>>,
    body: &mut R,
) -> Result<FileMeta, ReceiveError> {
    names::validate_file_name(name)?;
    if let Some(size) = size.filter(|s| *s > MAX_FILE) {
        return Err(ReceiveError::TooLarge(size));
    }
    let final_path = dir.join(name);
    let part = dir.join(format!("{name}.part"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReceiveError::Io { path, source }
    };
    let stream = |e: std::io::Error| ReceiveError::Stream(e.to_string());
    let mut out = tokio::fs::File::create(&part).await.map_err(io(&part))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    match (size, compression) {
        (Some(size), Compression::None) => {
            while got < size {
                let want = CHUNK.min((size - got) as usize);
                let n = body.read(&mut buf[..want]).await.map_err(stream)?;
                if n == 0 {
                    return Err(ReceiveError::Stream(format!(
                        "{} bytes missing",
                        size - got
                    )));
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).await.map_err(io(&part))?;
                got += n as u64;
            }
        }
        _ => {
            loop {
                let kind = body.read_u8().await.map_err(stream)?;
                if kind == BLOCK_END {
                    break;
                }
                let len = body.read_u32().await.map_err(stream)? as usize;
                // A dedup block carries a chunk's page digests beside its bytes.
                let limit = if kind == BLOCK_DEDUP {
                    CHUNK + CHUNK / PAGE * 33 + 3
                } else {
                    CHUNK
                };
                if len > limit {
                    return Err(ReceiveError::Stream(format!(
                        "block of {len} bytes exceeds the {limit}-byte limit"
                    )));
                }
                buf.resize(len, 0);
                body.read_exact(&mut buf).await.map_err(stream)?;
                match kind {
                    BLOCK_RAW => {}
                    BLOCK_DEDUP => {
                        let held = held.clone();
                        buf = tokio::task::spawn_blocking(move || undedup(&buf, held.as_deref()))
                            .await
                            .map_err(|e| ReceiveError::Stream(e.to_string()))?
                            .map_err(|e| ReceiveError::Stream(e.to_string()))?;
                    }
                    BLOCK_ZSTD => {
                        buf = tokio::task::spawn_blocking(move || decompress(&buf, CHUNK))
                            .await
                            .map_err(|e| ReceiveError::Stream(e.to_string()))?
                            .map_err(|e| {
                                ReceiveError::Stream(format!("corrupt zstd block: {e}"))
                            })?;
                    }
                    other => {
                        return Err(ReceiveError::Stream(format!("unknown block kind {other}")))
                    }
                }
                got += buf.len() as u64;
                match size {
                    Some(size) if got > size => {
                        return Err(ReceiveError::Stream(format!(
                            "more bytes than the {size} announced"
                        )))
                    }
                    None if got > MAX_FILE => return Err(ReceiveError::TooLarge(got)),
                    _ => {}
                }
                hasher.update(&buf);
                out.write_all(&buf).await.map_err(io(&part))?;
            }
            let total = match size {
                Some(size) => size,
                None => body.read_u64().await.map_err(stream)?,
            };
            if got < total {
                return Err(ReceiveError::Stream(format!(
                    "{} bytes missing",
                    total - got
                )));
            }
            if got > total {
                return Err(ReceiveError::Stream(format!(
                    "more bytes than the {total} announced"
                )));
            }
        }
    }
    let mut trailer = [0u8; 32];
    body.read_exact(&mut trailer)
        .await
        .map_err(|e| ReceiveError::Stream(format!("digest trailer: {e}")))?;
    let actual = hasher.finalize();
    let expected = blake3::Hash::from_bytes(trailer);
    if actual != expected {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(ReceiveError::Digest {
            name: name.to_string(),
            expected: expected.to_hex().to_string(),
            actual: actual.to_hex().to_string(),
        });
    }
    out.flush().await.map_err(io(&part))?;
    drop(out);
    tokio::fs::rename(&part, &final_path)
        .await
        .map_err(io(&final_path))?;
    Ok(FileMeta {
        name: name.to_string(),
        size: got,
        blake3: actual.to_hex().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `data` through the framing into a fresh directory; returns what arrived.
    async fn round_trip(
        data: &[u8],
        compression: Compression,
    ) -> (Result<FileMeta, ReceiveError>, u64, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "ferry-files-{}-{:?}-{}",
            std::process::id(),
            compression,
            data.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut wire = Vec::new();
        let wire_bytes = write_body(&mut &data[..], data.len() as u64, compression, &mut wire)
            .await
            .unwrap()
            .wire;
        assert_eq!(wire_bytes, wire.len() as u64);
        let got = receive(
            &dir,
            "pages-1.img",
            Some(data.len() as u64),
            compression,
            None,
            &mut &wire[..],
        )
        .await;
        (got, wire_bytes, dir)
    }

    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[tokio::test]
    async fn compressible_files_shrink_on_the_wire_and_arrive_whole() {
        let data: Vec<u8> = (0..3 * CHUNK + 123).map(|i| (i / 4096) as u8).collect();
        let (got, wire, dir) = round_trip(&data, Compression::Zstd).await;
        let meta = got.unwrap();
        assert_eq!(meta.size, data.len() as u64);
        assert!(wire < data.len() as u64 / 10, "{wire} bytes on the wire");
        assert_eq!(std::fs::read(dir.join("pages-1.img")).unwrap(), data);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn incompressible_files_go_raw_in_blocks() {
        let data = noise(2 * CHUNK + 7);
        let (got, wire, dir) = round_trip(&data, Compression::Zstd).await;
        got.unwrap();
        // Three raw blocks (5 bytes of header each), the end block, the digest.
        assert_eq!(wire, data.len() as u64 + 3 * 5 + 1 + 32);
        assert_eq!(std::fs::read(dir.join("pages-1.img")).unwrap(), data);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn uncompressed_links_send_the_bytes_as_they_are() {
        let data = noise(CHUNK + 1);
        let (got, wire, dir) = round_trip(&data, Compression::None).await;
        got.unwrap();
        assert_eq!(wire, data.len() as u64 + 32);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn empty_files_arrive() {
        for c in [Compression::None, Compression::Zstd] {
            let (got, _, dir) = round_trip(&[], c).await;
            assert_eq!(got.unwrap().size, 0);
            assert!(dir.join("pages-1.img").exists());
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    async fn receive_raw(wire: &[u8], size: u64) -> ReceiveError {
        let dir = std::env::temp_dir().join(format!("ferry-files-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = receive(
            &dir,
            "x.img",
            Some(size),
            Compression::Zstd,
            None,
            &mut &wire[..],
        )
        .await
        .unwrap_err();
        let _ = std::fs::remove_dir_all(dir);
        e
    }

    #[tokio::test]
    async fn hostile_blocks_are_refused() {
        // A block longer than a chunk: refused before it is read.
        let mut big = vec![BLOCK_RAW];
        big.extend_from_slice(&((CHUNK as u32) + 1).to_be_bytes());
        let e = receive_raw(&big, 10).await;
        assert!(e.to_string().contains("exceeds"), "{e}");
        // A zstd block that decompresses past a chunk (a bomb).
        let bomb = zstd::bulk::compress(&vec![0u8; 2 * CHUNK], 1).unwrap();
        let mut w = vec![BLOCK_ZSTD];
        w.extend_from_slice(&(bomb.len() as u32).to_be_bytes());
        w.extend_from_slice(&bomb);
        let e = receive_raw(&w, 4 * CHUNK as u64).await;
        assert!(e.to_string().contains("corrupt zstd block"), "{e}");
        // Garbage where zstd is announced.
        let mut w = vec![BLOCK_ZSTD, 0, 0, 0, 4, 1, 2, 3, 4];
        w.push(BLOCK_END);
        let e = receive_raw(&w, 4).await;
        assert!(e.to_string().contains("corrupt zstd block"), "{e}");
        // More bytes than announced.
        let mut w = vec![BLOCK_RAW, 0, 0, 0, 8];
        w.extend_from_slice(&[7; 8]);
        let e = receive_raw(&w, 4).await;
        assert!(e.to_string().contains("more bytes"), "{e}");
        // An unknown block kind.
        let e = receive_raw(&[9, 0, 0, 0, 1, 0], 1).await;
        assert!(e.to_string().contains("unknown block kind"), "{e}");
        // The stream ends early.
        let e = receive_raw(&[BLOCK_END], 10).await;
        assert!(e.to_string().contains("10 bytes missing"), "{e}");
    }

    #[tokio::test]
    async fn a_wrong_digest_leaves_no_file() {
        let data = noise(1000);
        let mut wire = Vec::new();
        write_body(&mut &data[..], 1000, Compression::Zstd, &mut wire)
            .await
            .unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let dir = std::env::temp_dir().join(format!("ferry-files-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = receive(
            &dir,
            "x.img",
            Some(1000),
            Compression::Zstd,
            None,
            &mut &wire[..],
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ReceiveError::Digest { .. }), "{e}");
        assert!(!dir.join("x.img").exists() && !dir.join("x.img.part").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_growing_file_is_sent_as_it_is_written_and_ends_when_done() {
        let dir = std::env::temp_dir().join(format!("ferry-files-grow-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("in")).unwrap();
        let src = dir.join("pages-1.img");
        let data = noise(2 * CHUNK + 4321);
        std::fs::write(&src, &data[..1000]).unwrap();
        let (done_tx, done) = watch::channel(false);
        let (mut tx, mut rx) = tokio::io::duplex(1 << 16);
        let mut file = tokio::fs::File::open(&src).await.unwrap();
        let sender = tokio::spawn(async move {
            write_growing(&mut file, done, Compression::Zstd, None, &mut tx)
                .await
                .unwrap()
        });
        let target = dir.join("in");
        let receiver = tokio::spawn(async move {
            receive(
                &target,
                "pages-1.img",
                None,
                Compression::Zstd,
                None,
                &mut rx,
            )
            .await
        });
        // The writer appends in pieces while the sender follows, then says it is done.
        let mut f = std::fs::OpenOptions::new().append(true).open(&src).unwrap();
        for piece in data[1000..].chunks(300_000) {
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            std::io::Write::write_all(&mut f, piece).unwrap();
        }
        done_tx.send(true).unwrap();
        let written = sender.await.unwrap();
        let meta = receiver.await.unwrap().unwrap();
        assert_eq!(written.size, data.len() as u64);
        assert_eq!(meta.size, data.len() as u64);
        assert_eq!(meta.blake3, written.digest.to_hex().as_str());
        assert_eq!(std::fs::read(dir.join("in/pages-1.img")).unwrap(), data);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_growing_file_whose_size_disagrees_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferry-files-grow-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = vec![BLOCK_RAW, 0, 0, 0, 3, 1, 2, 3, BLOCK_END];
        w.extend_from_slice(&5u64.to_be_bytes());
        let e = receive(&dir, "x.img", None, Compression::Zstd, None, &mut &w[..])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("2 bytes missing"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A receiver's store of page blocks, by digest.
    struct Blocks(std::collections::HashMap<[u8; 32], Vec<u8>>);

    impl Held for Blocks {
        fn blocks(&self, digests: &[[u8; 32]]) -> Vec<Option<Vec<u8>>> {
            digests
                .iter()
                .map(|d| {
                    self.0
                        .get(d)
                        .filter(|b| blake3::hash(b).as_bytes() == d)
                        .cloned()
                })
                .collect()
        }
    }

    /// Sends `data` as a growing page image to a receiver holding `held`'s pages.
    async fn dedup_round_trip(
        data: &[u8],
        offered: &HeldSet,
        held: Arc<dyn Held>,
        tag: &str,
    ) -> (Result<FileMeta, ReceiveError>, Written, PathBuf) {
        let dir = std::env::temp_dir().join(format!("ferry-dedup-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (_done_tx, done) = watch::channel(true);
        let mut wire = Vec::new();
        let written = write_growing(
            &mut &data[..],
            done,
            Compression::Zstd,
            Some(Arc::new(offered.clone())),
            &mut wire,
        )
        .await
        .unwrap();
        assert_eq!(written.wire, wire.len() as u64);
        let got = receive(
            &dir,
            "pages-1.img",
            None,
            Compression::Zstd,
            Some(held),
            &mut &wire[..],
        )
        .await;
        (got, written, dir)
    }

    use std::sync::Arc;

    #[tokio::test]
    async fn pages_the_receiver_holds_go_as_digests_and_the_file_arrives_whole() {
        // 600 pages of noise and a tail; the receiver holds every third page.
        let data = noise(600 * PAGE + 100);
        let pages: Vec<&[u8]> = data.chunks_exact(PAGE).collect();
        let blocks: std::collections::HashMap<[u8; 32], Vec<u8>> = pages
            .iter()
            .step_by(3)
            .map(|p| (*blake3::hash(p).as_bytes(), p.to_vec()))
            .collect();
        let offered: HeldSet = blocks.keys().copied().collect();
        let (got, written, dir) =
            dedup_round_trip(&data, &offered, Arc::new(Blocks(blocks)), "some").await;
        let meta = got.unwrap();
        assert_eq!(meta.size, data.len() as u64);
        assert_eq!(std::fs::read(dir.join("pages-1.img")).unwrap(), data);
        assert_eq!(written.deduped, 200 * PAGE as u64);
        // Noise does not compress: the wire holds the other 400 pages, not the 200.
        assert!(
            written.wire < 401 * PAGE as u64 + 100 + 200 * 40,
            "{} on the wire",
            written.wire
        );
        assert!(
            written.wire > 400 * PAGE as u64,
            "{} on the wire",
            written.wire
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_page_offered_but_gone_at_the_receiver_fails_the_file_naming_it() {
        let data = noise(8 * PAGE);
        let digest = *blake3::hash(&data[..PAGE]).as_bytes();
        let offered: HeldSet = [digest].into();
        // Gone from the store since it was offered.
        let (got, _, dir) = dedup_round_trip(
            &data,
            &offered,
            Arc::new(Blocks(Default::default())),
            "gone",
        )
        .await;
        let e = got.unwrap_err().to_string();
        assert!(e.contains("is not in this site's store"), "{e}");
        assert!(!dir.join("pages-1.img").exists());
        // Damaged in the store: refused too.
        let damaged = Blocks([(digest, vec![0u8; PAGE])].into());
        let (got, _, dir) = dedup_round_trip(&data, &offered, Arc::new(damaged), "damaged").await;
        let e = got.unwrap_err().to_string();
        assert!(e.contains("removed since it was offered"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_dedup_block_without_a_store_or_malformed_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferry-dedup-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let payload = [0u8, 1, 1];
        let mut w = vec![BLOCK_DEDUP];
        w.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        w.extend_from_slice(&payload);
        let e = receive(&dir, "x.img", None, Compression::Zstd, None, &mut &w[..])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no block store"), "{e}");
        let held: Arc<dyn Held> = Arc::new(Blocks(Default::default()));
        let e = receive(
            &dir,
            "x.img",
            None,
            Compression::Zstd,
            Some(held),
            &mut &w[..],
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("digests missing"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
