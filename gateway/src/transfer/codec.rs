//! How one image file travels on a byte stream: chunks hashed with BLAKE3 on both sides,
//! written under a temporary name and renamed only once the digest matches. With
//! `zstd`, each chunk travels as a block: `[kind u8][length u32][bytes]`, the kind saying
//! raw or zstd (a chunk that does not shrink goes raw), then an end block. The digest
//! always covers the file's own bytes, so it checks the decompression too. A file still
//! being written (a checkpoint's pages while CRIU dumps them) travels as it grows: always
//! in blocks, its size sent after the end block.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::manifest::FileMeta;
use crate::names;

/// Largest image file a peer may send.
pub const MAX_FILE: u64 = 256 << 30;

const CHUNK: usize = 1 << 20;
const BLOCK_END: u8 = 0;
const BLOCK_RAW: u8 = 1;
const BLOCK_ZSTD: u8 = 2;
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
    hasher: blake3::Hasher,
    size: u64,
    wire: u64,
}

impl<'a, W: AsyncWrite + Unpin> BodyWriter<'a, W> {
    fn new(out: &'a mut W, compression: Compression, blocks: bool) -> Self {
        Self {
            out,
            compression,
            blocks,
            hasher: blake3::Hasher::new(),
            size: 0,
            wire: 0,
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
        let (buf, packed) = match self.compression {
            Compression::None => (buf, None),
            Compression::Zstd => tokio::task::spawn_blocking(move || {
                let packed = compress(&buf[..len]);
                (buf, packed)
            })
            .await
            .map_err(|e| BodyError::Read(std::io::Error::other(e)))?,
        };
        let (kind, block) = match &packed {
            Some(p) if p.len() < len => (BLOCK_ZSTD, p.as_slice()),
            _ => (BLOCK_RAW, &buf[..len]),
        };
        self.write(&[kind]).await?;
        self.write(&(block.len() as u32).to_be_bytes()).await?;
        self.write(block).await?;
        Ok(buf)
    }

    /// Ends the body: the end block and, when the peer does not know it yet, the size;
    /// then the digest. Returns the digest, the size and the bytes written.
    async fn finish(mut self, send_size: bool) -> Result<(blake3::Hash, u64, u64), BodyError> {
        if self.blocks {
            self.write(&[BLOCK_END]).await?;
        }
        if send_size {
            self.write(&self.size.to_be_bytes()).await?;
        }
        let digest = self.hasher.finalize();
        self.write(digest.as_bytes()).await?;
        Ok((digest, self.size, self.wire))
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), BodyError> {
        self.out.write_all(bytes).await.map_err(BodyError::Write)?;
        self.wire += bytes.len() as u64;
        Ok(())
    }
}

/// Writes a file that is still growing, in blocks, until `done` and end-of-file; then the
/// end block, the size and the digest. Returns the digest, the size and the bytes written.
pub async fn write_growing(
    file: &mut (impl AsyncRead + Unpin),
    mut done: watch::Receiver<bool>,
    compression: Compression,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<(blake3::Hash, u64, u64), BodyError> {
    let mut body = BodyWriter::new(out, compression, true);
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
/// trailer; returns the digest, the size and the bytes written.
pub async fn write_body(
    file: &mut (impl AsyncRead + Unpin),
    size: u64,
    compression: Compression,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<(blake3::Hash, u64, u64), BodyError> {
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
pub async fn receive<R: AsyncRead + Unpin + ?Sized>(
    dir: &Path,
    name: &str,
    size: Option<u64>,
    compression: Compression,
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
                if len > CHUNK {
                    return Err(ReceiveError::Stream(format!(
                        "block of {len} bytes exceeds the 1 MiB limit"
                    )));
                }
                buf.resize(len, 0);
                body.read_exact(&mut buf).await.map_err(stream)?;
                match kind {
                    BLOCK_RAW => {}
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
        let (_, _, wire_bytes) =
            write_body(&mut &data[..], data.len() as u64, compression, &mut wire)
                .await
                .unwrap();
        assert_eq!(wire_bytes, wire.len() as u64);
        let got = receive(
            &dir,
            "pages-1.img",
            Some(data.len() as u64),
            compression,
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
        let e = receive(&dir, "x.img", Some(size), Compression::Zstd, &mut &wire[..])
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
        let e = receive(&dir, "x.img", Some(1000), Compression::Zstd, &mut &wire[..])
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
            write_growing(&mut file, done, Compression::Zstd, &mut tx)
                .await
                .unwrap()
        });
        let target = dir.join("in");
        let receiver = tokio::spawn(async move {
            receive(&target, "pages-1.img", None, Compression::Zstd, &mut rx).await
        });
        // The writer appends in pieces while the sender follows, then says it is done.
        let mut f = std::fs::OpenOptions::new().append(true).open(&src).unwrap();
        for piece in data[1000..].chunks(300_000) {
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            std::io::Write::write_all(&mut f, piece).unwrap();
        }
        done_tx.send(true).unwrap();
        let (digest, size, _) = sender.await.unwrap();
        let meta = receiver.await.unwrap().unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(meta.size, data.len() as u64);
        assert_eq!(meta.blake3, digest.to_hex().as_str());
        assert_eq!(std::fs::read(dir.join("in/pages-1.img")).unwrap(), data);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_growing_file_whose_size_disagrees_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferry-files-grow-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = vec![BLOCK_RAW, 0, 0, 0, 3, 1, 2, 3, BLOCK_END];
        w.extend_from_slice(&5u64.to_be_bytes());
        let e = receive(&dir, "x.img", None, Compression::Zstd, &mut &w[..])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("2 bytes missing"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
