//! Post-copy pages, carried by Ferry at both ends.
//!
//! At the source, [`PageSource`] is the only client of the lazy dump's page server (which
//! takes exactly one connection and answers strictly in order) and serves any number of
//! connections from the destination on loopback, through tunnels over the peer link: a
//! *priority* connection for the pages a fault is waiting for, which always go to CRIU
//! before any bulk request, and a *bulk* connection that pushes every lazy page in large
//! batches, in address order from the last faulted address ([`super::order`]). At the destination, [`PageCache`] holds what arrived and [`serve_daemon`]
//! stands in as the page server of the `criu lazy-pages` daemon: it answers from the
//! cache, and asks the priority connection for what is not there yet.
//!
//! Between the two ends, over each connection (the first byte says which kind):
//! - priority: the destination sends requests `[pid u32][vaddr u64][pages u64]`; the
//!   source answers each, in order, `[pid u32][vaddr u64][pages u64]` and the pages (maybe
//!   fewer than asked, never none);
//! - bulk: the source first says which pages it sent ahead are stale (written since, or
//!   all of them when it cannot tell): `[0 u8]` for all, or `[1 u8][count u32]` and
//!   `[pid u32][vaddr u64]` each, once its frozen tree has been compared (the destination
//!   serves nothing from the pages sent ahead before that); the destination then sends
//!   `[runs u32]` and the runs it lacks; the source answers chunks, each
//!   `[pid u32][vaddr u64][pages u64]` then a block `[kind u8][length u32][bytes]`, then a
//!   chunk of zero pages; the destination acknowledges each chunk with a zero byte, then
//!   sends one byte (it has all), and the source ends the lazy dump (the source's pages
//!   are no longer needed) and answers one byte. The block's kind says raw or zstd (only a
//!   *compressed* bulk connection compresses; pages that do not shrink go raw), and one
//!   run from `vaddr` or *gathered*: scattered pages, the block holding their addresses
//!   (`[vaddr u64]` each, increasing) before their bytes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};

use super::codec::{Held, HeldSet};
use super::order::{LastFault, PushOrder};
use super::Compression;
use crate::criu::image::{PageRun, PAGE_SIZE};
use crate::criu::pageproto::{Header, CMD_CLOSE, CMD_FORCE_CLOSE, CMD_GET, HEADER_LEN};
use crate::sys::memory::Memory;

/// Largest run asked of CRIU at once (its page pipes splice at most 4 MiB).
const MAX_GET_PAGES: u64 = 256;
/// Largest run a cache miss asks the source for on the priority connection: a fault needs
/// one page now; the bulk push brings the rest, so misses stay cheap and quick.
const MAX_MISS_PAGES: u64 = 16;
const KIND_PRIORITY: u8 = b'P';
/// Bulk pages in flight at once (4 MiB): counted in pages, not chunks, so a push of
/// scattered single pages (those written after they went ahead) is not held to a few
/// pages per round trip.
const BULK_WINDOW_PAGES: usize = 4 * MAX_GET_PAGES as usize;
/// The destination's acknowledgement of one bulk chunk.
const ACK: u8 = 0;
/// The destination's word that it has every page.
const HAS_ALL: u8 = 1;
const KIND_BULK: u8 = b'B';
const KIND_BULK_ZSTD: u8 = b'Z';
const BLOCK_RAW: u8 = 1;
const BLOCK_ZSTD: u8 = 2;
/// A gathered chunk's block (its pages' addresses, then the pages), raw or compressed.
const BLOCK_RAW_GATHERED: u8 = 3;
const BLOCK_ZSTD_GATHERED: u8 = 4;
/// A run's pages, some as the digests of blocks the destination holds
/// ([`super::codec`]'s dedup payload); only pages sent ahead go so.
const BLOCK_DEDUP: u8 = 5;
/// Runs shorter than this are gathered with others into one chunk on a bulk push: the
/// pages written after they went ahead lie scattered one or two at a time, and as
/// chunks of their own each cost a header, a compression, a hand-over and an
/// acknowledgement (3,400 such pages took 250 ms to push at 1 GiB; gathered, a few
/// chunks of 1 MiB).
const GATHER_BELOW: u64 = 16;

fn page_bytes(pages: u64) -> usize {
    usize::try_from(pages * PAGE_SIZE).unwrap_or(usize::MAX)
}

/// Pages and their bytes: one run from `vaddr`, or, gathered, one page at each address of
/// `at` (in increasing order).
#[derive(Debug)]
struct Chunk {
    pid: u32,
    vaddr: u64,
    data: Vec<u8>,
    at: Vec<u64>,
}

impl Chunk {
    fn run(pid: u32, vaddr: u64, data: Vec<u8>) -> Self {
        Self {
            pid,
            vaddr,
            data,
            at: Vec::new(),
        }
    }

    fn end() -> Self {
        Self::run(0, 0, Vec::new())
    }

    fn gathered(&self) -> bool {
        !self.at.is_empty()
    }

    /// The block a packed connection carries: a gathered chunk's addresses go first.
    fn body(&self) -> std::borrow::Cow<'_, [u8]> {
        if !self.gathered() {
            return std::borrow::Cow::Borrowed(&self.data);
        }
        let mut body = Vec::with_capacity(self.at.len() * 8 + self.data.len());
        for a in &self.at {
            body.extend_from_slice(&a.to_be_bytes());
        }
        body.extend_from_slice(&self.data);
        std::borrow::Cow::Owned(body)
    }

    /// Where each page goes.
    fn addresses(&self) -> impl Iterator<Item = u64> + '_ {
        let run = (!self.gathered())
            .then(|| (0..self.data.len() as u64 / PAGE_SIZE).map(|i| self.vaddr + i * PAGE_SIZE));
        run.into_iter().flatten().chain(self.at.iter().copied())
    }
}

async fn write_chunk(out: &mut (impl AsyncWrite + Unpin), c: &Chunk) -> std::io::Result<()> {
    let pages = c.data.len() as u64 / PAGE_SIZE;
    let mut head = [0u8; 20];
    head[0..4].copy_from_slice(&c.pid.to_be_bytes());
    head[4..12].copy_from_slice(&c.vaddr.to_be_bytes());
    head[12..20].copy_from_slice(&pages.to_be_bytes());
    out.write_all(&head).await?;
    out.write_all(&c.data).await
}

/// A chunk on a packed connection (pages sent ahead, the bulk push): the header, then its
/// block, compressed (`packed`, [`Chunk::body`] compressed) when that is smaller.
async fn write_chunk_packed(
    out: &mut (impl AsyncWrite + Unpin),
    c: &Chunk,
    packed: Option<&[u8]>,
) -> std::io::Result<usize> {
    let body = c.body();
    let (kind, body) = match (packed, c.gathered()) {
        (Some(p), false) if p.len() < body.len() => (BLOCK_ZSTD, p),
        (Some(p), true) if p.len() < body.len() => (BLOCK_ZSTD_GATHERED, p),
        (_, false) => (BLOCK_RAW, &*body),
        (_, true) => (BLOCK_RAW_GATHERED, &*body),
    };
    write_block(out, c, kind, body).await
}

/// A run chunk whose block is a dedup payload (pages the destination holds as digests).
async fn write_chunk_dedup(
    out: &mut (impl AsyncWrite + Unpin),
    c: &Chunk,
    payload: &[u8],
) -> std::io::Result<usize> {
    write_block(out, c, BLOCK_DEDUP, payload).await
}

/// `c`'s header, then its block `body` of `kind`; the bytes written.
async fn write_block(
    out: &mut (impl AsyncWrite + Unpin),
    c: &Chunk,
    kind: u8,
    body: &[u8],
) -> std::io::Result<usize> {
    write_run(
        out,
        &PageRun {
            pid: c.pid,
            vaddr: if c.gathered() { 0 } else { c.vaddr },
            nr_pages: c.data.len() as u64 / PAGE_SIZE,
        },
    )
    .await?;
    out.write_u8(kind).await?;
    out.write_u32(u32::try_from(body.len()).map_err(std::io::Error::other)?)
        .await?;
    out.write_all(body).await?;
    Ok(20 + 5 + body.len())
}

/// Compresses a chunk's pages off the async threads; `None` if zstd fails (sent raw).
async fn pack(data: Vec<u8>) -> std::io::Result<(Vec<u8>, Option<Vec<u8>>)> {
    tokio::task::spawn_blocking(move || {
        let packed = super::codec::compress(&data);
        (data, packed)
    })
    .await
    .map_err(std::io::Error::other)
}

async fn read_chunk_packed(inp: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Chunk> {
    read_chunk_held(inp, None).await
}

/// [`read_chunk_packed`], taking a dedup block's pages from `held`.
async fn read_chunk_held(
    inp: &mut (impl AsyncRead + Unpin),
    held: Option<&Arc<dyn Held>>,
) -> std::io::Result<Chunk> {
    let run = read_run(inp).await?;
    if run.nr_pages > MAX_GET_PAGES {
        return Err(std::io::Error::other(format!(
            "a chunk of {} pages exceeds the {MAX_GET_PAGES} page limit",
            run.nr_pages
        )));
    }
    let kind = inp.read_u8().await?;
    let gathered = match kind {
        BLOCK_RAW | BLOCK_ZSTD | BLOCK_DEDUP => false,
        BLOCK_RAW_GATHERED | BLOCK_ZSTD_GATHERED => true,
        other => {
            return Err(std::io::Error::other(format!("unknown block kind {other}")));
        }
    };
    let heads = if gathered {
        run.nr_pages as usize * 8
    } else {
        0
    };
    let want = heads + page_bytes(run.nr_pages);
    let len = inp.read_u32().await? as usize;
    // A dedup payload: a count, a bitmap and a digest per page besides the pages.
    let most = if kind == BLOCK_DEDUP {
        want + run.nr_pages as usize * 33 + 3
    } else {
        want
    };
    if len > most {
        return Err(std::io::Error::other(format!(
            "a block of {len} bytes for {} pages",
            run.nr_pages
        )));
    }
    let mut body = vec![0u8; len];
    inp.read_exact(&mut body).await?;
    let mut data = match kind {
        BLOCK_ZSTD | BLOCK_ZSTD_GATHERED if len <= INLINE_UNPACK => {
            super::codec::decompress(&body, want)?
        }
        BLOCK_ZSTD | BLOCK_ZSTD_GATHERED => {
            tokio::task::spawn_blocking(move || super::codec::decompress(&body, want))
                .await
                .map_err(std::io::Error::other)??
        }
        BLOCK_DEDUP => {
            let held = held.cloned();
            tokio::task::spawn_blocking(move || super::codec::undedup(&body, held.as_deref()))
                .await
                .map_err(std::io::Error::other)??
        }
        _ => body,
    };
    if data.len() != want {
        return Err(std::io::Error::other(format!(
            "{} bytes for {} pages",
            data.len() - heads.min(data.len()),
            run.nr_pages
        )));
    }
    if !gathered {
        return Ok(Chunk::run(run.pid, run.vaddr, data));
    }
    let at: Vec<u64> = data[..heads]
        .chunks_exact(8)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
        .collect();
    let ordered = at.windows(2).all(|w| w[0] < w[1]);
    if !ordered || at.iter().any(|a| a % PAGE_SIZE != 0) {
        return Err(std::io::Error::other(
            "a gathered chunk's page addresses are not page-aligned and increasing",
        ));
    }
    data.drain(..heads);
    Ok(Chunk {
        pid: run.pid,
        vaddr: 0,
        data,
        at,
    })
}

/// Compressed blocks up to this size are unpacked where they are read (a few tens of
/// microseconds); larger ones on a blocking thread.
const INLINE_UNPACK: usize = 64 * 1024;

async fn write_run(out: &mut (impl AsyncWrite + Unpin), r: &PageRun) -> std::io::Result<()> {
    let mut head = [0u8; 20];
    head[0..4].copy_from_slice(&r.pid.to_be_bytes());
    head[4..12].copy_from_slice(&r.vaddr.to_be_bytes());
    head[12..20].copy_from_slice(&r.nr_pages.to_be_bytes());
    out.write_all(&head).await
}

async fn read_run(inp: &mut (impl AsyncRead + Unpin)) -> std::io::Result<PageRun> {
    let mut head = [0u8; 20];
    inp.read_exact(&mut head).await?;
    let mut pid = [0u8; 4];
    pid.copy_from_slice(&head[0..4]);
    let mut vaddr = [0u8; 8];
    vaddr.copy_from_slice(&head[4..12]);
    let mut pages = [0u8; 8];
    pages.copy_from_slice(&head[12..20]);
    Ok(PageRun {
        pid: u32::from_be_bytes(pid),
        vaddr: u64::from_be_bytes(vaddr),
        nr_pages: u64::from_be_bytes(pages),
    })
}

async fn read_chunk(inp: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Chunk> {
    let run = read_run(inp).await?;
    if run.nr_pages > MAX_GET_PAGES {
        return Err(std::io::Error::other(format!(
            "a chunk of {} pages exceeds the {MAX_GET_PAGES} page limit",
            run.nr_pages
        )));
    }
    let mut data = vec![0u8; page_bytes(run.nr_pages)];
    inp.read_exact(&mut data).await?;
    Ok(Chunk::run(run.pid, run.vaddr, data))
}

/// One GET for CRIU's page server.
struct Fetch {
    run: PageRun,
    reply: oneshot::Sender<std::io::Result<Chunk>>,
}

/// Which pages sent ahead of the switch the destination must not serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    /// Every one (the source cannot tell which were written since).
    All,
    /// These (by CRIU's process id and address).
    Only(Vec<(u32, u64)>),
}

/// Longest a destination waits for the source's stale list before it gives up the pages.
const STALE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);
/// Most entries a stale list may have (a 64 GiB tree's every page).
const MAX_STALE: u32 = 1 << 24;

async fn write_stale(out: &mut (impl AsyncWrite + Unpin), stale: &Stale) -> std::io::Result<()> {
    match stale {
        Stale::All => out.write_u8(0).await,
        Stale::Only(keys) => {
            out.write_u8(1).await?;
            out.write_u32(u32::try_from(keys.len()).map_err(std::io::Error::other)?)
                .await?;
            for (id, vaddr) in keys {
                out.write_u32(*id).await?;
                out.write_u64(*vaddr).await?;
            }
            Ok(())
        }
    }
}

async fn read_stale(inp: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Stale> {
    match inp.read_u8().await? {
        0 => Ok(Stale::All),
        1 => {
            let count = inp.read_u32().await?;
            if count > MAX_STALE {
                return Err(std::io::Error::other(format!(
                    "a stale list of {count} pages (at most {MAX_STALE})"
                )));
            }
            let mut keys = Vec::with_capacity(count as usize);
            for _ in 0..count {
                keys.push((inp.read_u32().await?, inp.read_u64().await?));
            }
            Ok(Stale::Only(keys))
        }
        other => Err(std::io::Error::other(format!(
            "unknown stale list kind {other}"
        ))),
    }
}

/// The source's end: the lazy dump's one client, serving the destination's connections.
/// Pages of the frozen tree's processes it can read itself (`/proc/PID/mem`) it reads
/// there, in any order and without a round trip to CRIU per run; CRIU's page server is
/// asked for the others, and told when the destination has everything.
pub struct PageSource {
    /// The frozen tree's memory, by the ids CRIU's images name its processes by.
    memory: HashMap<u32, Arc<Memory>>,
    priority: mpsc::Sender<Fetch>,
    bulk: mpsc::Sender<Fetch>,
    /// Stops accepting the destination's connections.
    stop: tokio_util::sync::CancellationToken,
    /// Ends the lazy dump (CLOSE) once the destination has every page.
    close: Mutex<Option<oneshot::Sender<oneshot::Sender<()>>>>,
    /// Set once the destination said it has every page.
    done: tokio::sync::watch::Sender<bool>,
    /// Which pages sent ahead are stale, once the frozen tree has been compared, and the
    /// runs of them the lazy dump holds (pushed at once, before the destination asks).
    stale: tokio::sync::watch::Sender<Option<Arc<Stale>>>,
    /// Page bytes sent to the destination, faulted and pushed, and what they took on
    /// the connections (framing, compression).
    sent: std::sync::atomic::AtomicU64,
    wire: std::sync::atomic::AtomicU64,
    /// How long the last complete bulk push ran, in ms (0: none yet).
    push_ms: std::sync::atomic::AtomicU64,
    /// Where the destination last faulted: the bulk push goes on from there.
    faults: LastFault,
}

impl PageSource {
    /// Connects to the lazy dump's page server and listens for the destination's
    /// connections on loopback; returns where. Without a dump (after a restart, the lazy
    /// dump having ended and left the tree stopped) every page is read from the tree.
    pub async fn start(
        dump: Option<SocketAddr>,
        tree: &[TreeProcess],
    ) -> std::io::Result<(Arc<Self>, SocketAddr)> {
        let memory = open_memory(tree);
        let (prio_tx, prio_rx) = mpsc::channel(1024);
        let (bulk_tx, bulk_rx) = mpsc::channel(4);
        let (close_tx, close_rx) = oneshot::channel();
        if let Some(dump) = dump {
            let criu = TcpStream::connect(dump).await?;
            let _ = criu.set_nodelay(true);
            tokio::spawn(drive_criu(criu, prio_rx, bulk_rx, close_rx));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = tokio_util::sync::CancellationToken::new();
        let this = Arc::new(Self {
            memory,
            priority: prio_tx,
            bulk: bulk_tx,
            stop: stop.clone(),
            close: Mutex::new(Some(close_tx)),
            done: tokio::sync::watch::Sender::new(false),
            stale: tokio::sync::watch::Sender::new(None),
            sent: std::sync::atomic::AtomicU64::new(0),
            wire: std::sync::atomic::AtomicU64::new(0),
            push_ms: std::sync::atomic::AtomicU64::new(0),
            faults: LastFault::default(),
        });
        let serving = Arc::downgrade(&this);
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    () = stop.cancelled() => return,
                    c = listener.accept() => c,
                };
                let Ok((conn, _)) = conn else { continue };
                let _ = conn.set_nodelay(true);
                let Some(this) = serving.upgrade() else {
                    return;
                };
                tokio::spawn(async move {
                    if let Err(e) = this.serve(conn).await {
                        tracing::debug!(error = %e, "page connection ended");
                    }
                });
            }
        });
        Ok((this, addr))
    }

    /// Which pages sent ahead the destination must drop; its bulk connection waits for it.
    pub fn set_stale(&self, stale: Stale) {
        self.stale.send_replace(Some(Arc::new(stale)));
    }

    /// Sends on `out` the stale list of `s`, then its pages, then an empty chunk: see
    /// [`receive_settled`]. Returns the pages and bytes sent.
    pub async fn send_settlement(
        &self,
        out: &mut (impl AsyncWrite + Unpin),
        s: &Settlement,
    ) -> std::io::Result<(u64, u64)> {
        let stale = Stale::Only(s.stale.clone());
        write_stale(out, &stale).await?;
        let (mut pages, mut wire) = (0u64, 0u64);
        for (chunk, packed) in &s.chunks {
            pages += chunk.data.len() as u64 / PAGE_SIZE;
            let w = write_chunk_packed(out, chunk, packed.as_deref()).await?;
            self.count(chunk.data.len(), w);
            wire += w as u64;
        }
        wire += write_chunk_packed(out, &Chunk::end(), None).await? as u64;
        Ok((pages, wire))
    }

    async fn fetch(&self, queue: &mpsc::Sender<Fetch>, run: PageRun) -> std::io::Result<Chunk> {
        if let Some(mem) = self.memory.get(&run.pid).map(Arc::clone) {
            let pages = run.nr_pages.clamp(1, MAX_GET_PAGES);
            // A fault's few pages are a few microseconds to copy: no thread hop for them.
            let read = if pages <= MAX_MISS_PAGES {
                mem.read(run.vaddr, pages)
            } else {
                tokio::task::spawn_blocking(move || mem.read(run.vaddr, pages))
                    .await
                    .map_err(std::io::Error::other)?
            };
            if let Ok(data) = read {
                return Ok(Chunk::run(run.pid, run.vaddr, data));
            }
        }
        ask_criu(queue, run).await
    }

    async fn serve(&self, mut conn: TcpStream) -> std::io::Result<()> {
        match conn.read_u8().await? {
            KIND_PRIORITY => loop {
                let run = match read_run(&mut conn).await {
                    Ok(r) => r,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                };
                let run = PageRun {
                    nr_pages: run.nr_pages.clamp(1, MAX_GET_PAGES),
                    ..run
                };
                self.faults.set(run.pid, run.vaddr);
                let chunk = self.fetch(&self.priority, run).await?;
                write_chunk(&mut conn, &chunk).await?;
                self.count(chunk.data.len(), 20 + chunk.data.len());
            },
            kind @ (KIND_BULK | KIND_BULK_ZSTD) => {
                let started = std::time::Instant::now();
                let (mut read_here, mut asked) = (0u64, 0u64);
                let compressed = kind == KIND_BULK_ZSTD;
                let settled = self
                    .stale
                    .subscribe()
                    .wait_for(Option::is_some)
                    .await
                    .map_err(|_| std::io::Error::other("the source stopped"))?
                    .clone();
                let Some(settled) = settled else {
                    return Err(std::io::Error::other("no stale list"));
                };
                write_stale(&mut conn, &settled).await?;
                let pushing = std::time::Instant::now();
                // The destination's request (what it lacks), then its acknowledgements,
                // come on the other direction. Each chunk is acknowledged, in order; at
                // most BULK_WINDOW_PAGES are in flight, so bulk data never queues deep
                // enough on the link to delay a fault's pages. Its last byte (not an
                // acknowledgement) says it has all.
                let (mut rd, wr) = conn.into_split();
                let credits = Arc::new(tokio::sync::Semaphore::new(BULK_WINDOW_PAGES));
                let in_flight = Arc::new(Mutex::new(std::collections::VecDeque::<u32>::new()));
                let (has_all_tx, has_all) = oneshot::channel::<()>();
                let (acks, acked) = (Arc::clone(&credits), Arc::clone(&in_flight));
                let (runs_tx, runs_rx) = oneshot::channel::<Vec<PageRun>>();
                tokio::spawn(async move {
                    let asked = async {
                        let count = rd.read_u32().await?;
                        let mut runs = Vec::with_capacity(count.min(1 << 20) as usize);
                        for _ in 0..count {
                            runs.push(read_run(&mut rd).await?);
                        }
                        Ok::<_, std::io::Error>(runs)
                    }
                    .await;
                    match asked {
                        Ok(runs) => {
                            let _ = runs_tx.send(runs);
                        }
                        Err(_) => {
                            acks.close();
                            return;
                        }
                    }
                    let mut has_all_tx = Some(has_all_tx);
                    while let Ok(b) = rd.read_u8().await {
                        if b == ACK {
                            let pages = acked
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .pop_front()
                                .unwrap_or(0);
                            acks.add_permits(pages as usize);
                        } else if let Some(tx) = has_all_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    acks.close();
                });
                // Reading and compressing run ahead of the link, on a thread of their own.
                let (ready_tx, mut ready) = mpsc::channel(BULK_READ_AHEAD);
                let memory = self.memory.clone();
                let faults = self.faults.clone();
                let producer = tokio::task::spawn_blocking(move || {
                    if let Ok(runs) = runs_rx.blocking_recv() {
                        prepare_bulk(&memory, runs, faults, compressed, &ready_tx);
                    }
                });
                let mut wr = tokio::io::BufWriter::with_capacity(1 << 20, wr);
                loop {
                    let item = match ready.try_recv() {
                        Ok(item) => item,
                        Err(mpsc::error::TryRecvError::Empty) => {
                            wr.flush().await?;
                            match ready.recv().await {
                                Some(item) => item,
                                None => break,
                            }
                        }
                        Err(mpsc::error::TryRecvError::Disconnected) => break,
                    };
                    let prepared = match item {
                        Prepared::Read { chunk, packed } => {
                            read_here += 1;
                            vec![(chunk, packed)]
                        }
                        // Not readable here: CRIU's page server has it (maybe in parts).
                        Prepared::Ask(run) => {
                            asked += 1;
                            let mut parts = Vec::new();
                            let (mut vaddr, end) =
                                (run.vaddr, run.vaddr + run.nr_pages * PAGE_SIZE);
                            while vaddr < end {
                                let rest = PageRun {
                                    pid: run.pid,
                                    vaddr,
                                    nr_pages: (end - vaddr) / PAGE_SIZE,
                                };
                                let chunk = ask_criu(&self.bulk, rest).await?;
                                vaddr += chunk.data.len() as u64;
                                parts.push(if compressed {
                                    let (data, packed) = pack(chunk.data).await?;
                                    (Chunk::run(chunk.pid, chunk.vaddr, data), packed)
                                } else {
                                    (chunk, None)
                                });
                            }
                            parts
                        }
                    };
                    for (chunk, packed) in prepared {
                        let pages =
                            u32::try_from(chunk.data.len() as u64 / PAGE_SIZE).unwrap_or(u32::MAX);
                        let permit = if let Ok(p) = credits.try_acquire_many(pages) {
                            p
                        } else {
                            wr.flush().await?;
                            credits
                                .acquire_many(pages)
                                .await
                                .map_err(|_| std::io::Error::other("the destination went away"))?
                        };
                        permit.forget();
                        in_flight
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push_back(pages);
                        let wire = write_chunk_packed(&mut wr, &chunk, packed.as_deref()).await?;
                        self.count(chunk.data.len(), wire);
                    }
                }
                producer.await.map_err(std::io::Error::other)?;
                self.push_ms.store(
                    u64::try_from(pushing.elapsed().as_millis())
                        .unwrap_or(u64::MAX)
                        .max(1),
                    std::sync::atomic::Ordering::Relaxed,
                );
                tracing::debug!(
                    chunks_read_here = read_here,
                    chunks_from_criu = asked,
                    ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "bulk pages pushed"
                );
                write_chunk_packed(&mut wr, &Chunk::end(), None).await?;
                wr.flush().await?;
                // The destination has every page: the lazy dump may end.
                has_all
                    .await
                    .map_err(|_| std::io::Error::other("the destination went away"))?;
                let closing = std::time::Instant::now();
                self.finish().await;
                tracing::debug!(
                    us = u64::try_from(closing.elapsed().as_micros()).unwrap_or(u64::MAX),
                    "the destination has every page; the lazy dump is closed"
                );
                wr.write_u8(1).await?;
                wr.flush().await?;
                Ok(())
            }
            other => Err(std::io::Error::other(format!(
                "unknown page connection kind {other}"
            ))),
        }
    }

    fn count(&self, pages: usize, wire: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.sent.fetch_add(pages as u64, Relaxed);
        self.wire.fetch_add(wire as u64, Relaxed);
    }

    /// Page bytes sent to the destination so far, and what they took on the wire.
    pub fn bytes_sent(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.sent.load(Relaxed), self.wire.load(Relaxed))
    }

    /// How long the last complete bulk push ran (its connection's start to its last
    /// chunk), if one completed.
    pub fn push_ms(&self) -> Option<u64> {
        match self.push_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }

    /// Stops serving (the migration ended).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The destination has every page: ends the lazy dump (CLOSE, its answer, then the
    /// connection), if one serves, and says so to [`Self::finished`].
    pub async fn finish(&self) {
        let close = self
            .close
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(close) = close {
            let (done, wait) = oneshot::channel();
            if close.send(done).is_ok() {
                let _ = wait.await;
            }
        }
        self.done.send_replace(true);
    }

    /// Returns once the destination has said it has every page.
    pub async fn finished(&self) {
        let mut done = self.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }
}

/// Asks CRIU's page server (through `queue`, to its connection's owner) for a run.
async fn ask_criu(queue: &mpsc::Sender<Fetch>, run: PageRun) -> std::io::Result<Chunk> {
    let (reply, rx) = oneshot::channel();
    queue
        .send(Fetch { run, reply })
        .await
        .map_err(|_| std::io::Error::other("the lazy dump's connection is gone"))?;
    rx.await
        .map_err(|_| std::io::Error::other("the lazy dump's connection is gone"))?
}

/// Bulk chunks prepared ahead of the link.
const BULK_READ_AHEAD: usize = 16;

/// A bulk chunk, read (and compressed, on a compressed connection) or to ask CRIU for.
enum Prepared {
    Read {
        chunk: Chunk,
        packed: Option<Vec<u8>>,
    },
    Ask(PageRun),
}

/// Blocking: reads every run from the frozen tree's memory in chunks of at most
/// [`MAX_GET_PAGES`] (short runs gathered into one chunk), compresses them, and hands them
/// to the sender, in address order from the last fault served ([`PushOrder`]); a run it
/// cannot read goes to CRIU. Ends early when the sender is gone.
fn prepare_bulk(
    memory: &HashMap<u32, Arc<Memory>>,
    runs: Vec<PageRun>,
    faults: LastFault,
    compressed: bool,
    out: &mpsc::Sender<Prepared>,
) {
    let order = PushOrder::new(runs, faults, MAX_GET_PAGES);
    prepare(memory, order, compressed, |item| {
        out.blocking_send(item).is_ok()
    });
}

/// [`prepare_bulk`], handing each item to `out` (false: stop).
fn prepare(
    memory: &HashMap<u32, Arc<Memory>>,
    runs: impl IntoIterator<Item = PageRun>,
    compressed: bool,
    mut out: impl FnMut(Prepared) -> bool,
) {
    let read = |chunk: Chunk| {
        let packed = if compressed {
            super::codec::compress(&chunk.body())
        } else {
            None
        };
        Prepared::Read { chunk, packed }
    };
    let mut gather = Chunk::end();
    for run in runs {
        if run.nr_pages < GATHER_BELOW {
            let data = memory
                .get(&run.pid)
                .and_then(|m| m.read(run.vaddr, run.nr_pages).ok());
            let Some(data) = data else {
                if !out(Prepared::Ask(run)) {
                    return;
                }
                continue;
            };
            // One process's pages, in increasing order, at most MAX_GET_PAGES.
            let full = gather.at.len() as u64 + run.nr_pages > MAX_GET_PAGES;
            let behind = gather.at.last().is_some_and(|&last| last >= run.vaddr);
            if gather.gathered()
                && (gather.pid != run.pid || full || behind)
                && !out(read(std::mem::replace(&mut gather, Chunk::end())))
            {
                return;
            }
            gather.pid = run.pid;
            gather
                .at
                .extend((0..run.nr_pages).map(|i| run.vaddr + i * PAGE_SIZE));
            gather.data.extend_from_slice(&data);
            continue;
        }
        if gather.gathered() && !out(read(std::mem::replace(&mut gather, Chunk::end()))) {
            return;
        }
        let (mut vaddr, end) = (run.vaddr, run.vaddr + run.nr_pages * PAGE_SIZE);
        while vaddr < end {
            let piece = PageRun {
                pid: run.pid,
                vaddr,
                nr_pages: ((end - vaddr) / PAGE_SIZE).min(MAX_GET_PAGES),
            };
            vaddr += piece.nr_pages * PAGE_SIZE;
            let data = memory
                .get(&piece.pid)
                .and_then(|m| m.read(piece.vaddr, piece.nr_pages).ok());
            let sent = match data {
                Some(data) => out(read(Chunk::run(piece.pid, piece.vaddr, data))),
                None => out(Prepared::Ask(piece)),
            };
            if !sent {
                return;
            }
        }
    }
    if gather.gathered() {
        out(read(gather));
    }
}

/// Owns the connection to CRIU: faults first, then bulk; strictly one GET at a time, as
/// CRIU answers in order.
async fn drive_criu(
    mut criu: TcpStream,
    mut priority: mpsc::Receiver<Fetch>,
    mut bulk: mpsc::Receiver<Fetch>,
    mut close: oneshot::Receiver<oneshot::Sender<()>>,
) {
    loop {
        let fetch = tokio::select! {
            biased;
            Some(f) = priority.recv() => f,
            Some(f) = bulk.recv() => f,
            done = &mut close => {
                // CRIU corks its answer and, before it flushes it, waits for this end to
                // close: the write side ends first, or the answer waits out the cork
                // (200 ms).
                let _ = criu.write_all(&Header::close().encode()).await;
                let _ = criu.shutdown().await;
                let _ = criu.read_i32().await;
                drop(criu);
                if let Ok(done) = done {
                    let _ = done.send(());
                }
                return;
            }
            else => return,
        };
        let result = get(&mut criu, fetch.run).await;
        let failed = result.is_err();
        let _ = fetch.reply.send(result);
        if failed {
            // CRIU drops the connection on a bad request: nothing more can be asked.
            return;
        }
    }
}

async fn get(criu: &mut TcpStream, run: PageRun) -> std::io::Result<Chunk> {
    let req = Header::get(run.pid, run.vaddr, run.nr_pages);
    criu.write_all(&req.encode()).await?;
    let mut head = [0u8; HEADER_LEN];
    criu.read_exact(&mut head).await?;
    let reply = Header::decode(&head);
    if reply.vaddr != run.vaddr || reply.nr_pages == 0 || reply.nr_pages > run.nr_pages {
        return Err(std::io::Error::other(format!(
            "the page server answered {reply:?} to {req:?}"
        )));
    }
    let mut data = vec![0u8; page_bytes(reply.nr_pages)];
    criu.read_exact(&mut data).await?;
    Ok(Chunk::run(run.pid, run.vaddr, data))
}

/// Where a cached page is: the chunk it arrived in and its index there.
type PageAt = (Arc<Vec<u8>>, usize);

/// One page of a [`PageCache::snapshot`].
pub struct CachedPage(Arc<Vec<u8>>, usize);

impl CachedPage {
    pub fn bytes(&self) -> &[u8] {
        let start = self.1 * page_bytes(1);
        &self.0[start..start + page_bytes(1)]
    }
}

/// The destination's pages, as they arrive.
pub struct PageCache {
    pages: Mutex<HashMap<(u32, u64), PageAt>>,
    arrived: Notify,
    /// Holding pages sent ahead that may be stale: nothing is served until the source's
    /// stale list came ([`bulk_fetch`] releases it).
    held: tokio::sync::watch::Sender<bool>,
    /// Pages sent ahead still arriving (the source starts its freeze once it has written
    /// them, not once they came): no stale list is applied before the last one came, or
    /// a page that came after the list would be served stale.
    arriving: tokio::sync::watch::Sender<bool>,
}

impl Default for PageCache {
    fn default() -> Self {
        Self {
            pages: Mutex::default(),
            arrived: Notify::new(),
            held: tokio::sync::watch::Sender::new(false),
            arriving: tokio::sync::watch::Sender::new(false),
        }
    }
}

/// Waits (at most [`STALE_DEADLINE`], else `late` is the error) until `flag` is false.
/// Every page request asks: once cleared, no subscription.
async fn cleared(
    flag: &tokio::sync::watch::Sender<bool>,
    late: &'static str,
) -> std::io::Result<()> {
    if !*flag.borrow() {
        return Ok(());
    }
    let mut set = flag.subscribe();
    tokio::time::timeout(STALE_DEADLINE, set.wait_for(|on| !*on))
        .await
        .map_err(|_| std::io::Error::other(late))?
        .map_err(|_| std::io::Error::other("the page cache is gone"))?;
    Ok(())
}

/// Marks the pages sent ahead as all come (or never to come) when dropped.
struct ArrivalEnds<'a>(&'a PageCache);

impl Drop for ArrivalEnds<'_> {
    fn drop(&mut self) {
        self.0.arriving.send_replace(false);
    }
}

impl PageCache {
    /// A cache for pages sent ahead: held until the stale list has been applied.
    pub fn held() -> Self {
        let cache = Self::default();
        cache.held.send_replace(true);
        cache
    }

    /// A held cache whose pages sent ahead are about to arrive ([`receive_prepush`]
    /// fills it): a stale list waits until they all came.
    pub fn arriving() -> Self {
        let cache = Self::held();
        cache.arriving.send_replace(true);
        cache
    }

    /// Waits until no page sent ahead is still on its way (the stream ended, whole or
    /// not), so that a stale list applied next forgets every stale page.
    async fn all_arrived(&self) -> std::io::Result<()> {
        cleared(
            &self.arriving,
            "the pages sent ahead never finished arriving; the stale list cannot be applied",
        )
        .await
    }

    /// Applies the source's stale list and serves from then on; true if it did. A cache
    /// already serving holds only pages read from the frozen source: a later list (a
    /// reconnection's, maybe a restarted source's "all") changes nothing.
    fn settle(&self, stale: &Stale) -> bool {
        // Under the lock: two lists (the early one, the bulk connection's) never both
        // forget, and no page inserted after the first is forgotten by the second.
        let mut map = self
            .pages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !*self.held.borrow() {
            return false;
        }
        match stale {
            Stale::All => map.clear(),
            Stale::Only(keys) => {
                for key in keys {
                    map.remove(key);
                }
            }
        }
        self.held.send_replace(false);
        true
    }

    /// Waits until the cache may be served from.
    async fn ready(&self) -> std::io::Result<()> {
        cleared(
            &self.held,
            "the source never said which pages sent ahead are stale; none may be served",
        )
        .await
    }

    fn insert(&self, chunk: Chunk) {
        let at: Vec<u64> = chunk.addresses().collect();
        let pid = chunk.pid;
        let data = Arc::new(chunk.data);
        {
            let mut map = self
                .pages
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (i, vaddr) in at.into_iter().enumerate() {
                map.insert((pid, vaddr), (Arc::clone(&data), i));
            }
        }
        self.arrived.notify_waiters();
    }

    /// The cached pages of `pid` from `vaddr`, contiguous, at most `max`.
    /// Every page held, in address order by process (shared with the cache, not copied).
    pub fn snapshot(&self) -> Vec<CachedPage> {
        let map = self
            .pages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut keys: Vec<&(u32, u64)> = map.keys().collect();
        keys.sort_unstable();
        keys.into_iter()
            .filter_map(|k| map.get(k))
            .map(|(data, at)| CachedPage(Arc::clone(data), *at))
            .collect()
    }

    fn run_from(&self, pid: u32, vaddr: u64, max: u64) -> Vec<u8> {
        let map = self
            .pages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = Vec::new();
        for i in 0..max {
            match map.get(&(pid, vaddr + i * PAGE_SIZE)) {
                Some((data, at)) => {
                    let start = at * page_bytes(1);
                    out.extend_from_slice(&data[start..start + page_bytes(1)]);
                }
                None => break,
            }
        }
        out
    }

    /// The cached pages of `pid` from `vaddr` (at most `max`): without copying them when
    /// they lie one after the other in the chunk they arrived in, else copied into one
    /// run (as [`Self::run_from`]).
    fn run_shared(&self, pid: u32, vaddr: u64, max: u64) -> crate::criu::lazy::Pages {
        use crate::criu::lazy::Pages;
        let map = self
            .pages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((chunk, first)) = map.get(&(pid, vaddr)).map(|(c, i)| (Arc::clone(c), *i)) else {
            return Pages::Owned(Vec::new());
        };
        let mut n = 1;
        while (n as u64) < max {
            match map.get(&(pid, vaddr + n as u64 * PAGE_SIZE)) {
                Some((c, i)) if Arc::ptr_eq(c, &chunk) && *i == first + n => n += 1,
                _ => break,
            }
        }
        let page = page_bytes(1);
        let next = vaddr + n as u64 * PAGE_SIZE;
        if (n as u64) < max && map.contains_key(&(pid, next)) {
            // More follow in other chunks: one copied run beats several short ones.
            drop(map);
            return Pages::Owned(self.run_from(pid, vaddr, max));
        }
        Pages::Shared(chunk, first * page..(first + n) * page)
    }

    /// `runs` without the pages this cache holds: what the bulk push still has to bring.
    pub fn missing(&self, runs: &[PageRun]) -> Vec<PageRun> {
        let map = self
            .pages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        coalesce(runs.iter().flat_map(|r| {
            (0..r.nr_pages)
                .map(move |i| (r.pid, r.vaddr + i * PAGE_SIZE))
                .filter(|k| !map.contains_key(k))
        }))
    }

    pub fn len(&self) -> usize {
        self.pages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Pages, in order, as runs of consecutive pages of one process.
fn coalesce(pages: impl Iterator<Item = (u32, u64)>) -> Vec<PageRun> {
    let mut out: Vec<PageRun> = Vec::new();
    for (pid, vaddr) in pages {
        match out.last_mut() {
            Some(last) if last.pid == pid && last.vaddr + last.nr_pages * PAGE_SIZE == vaddr => {
                last.nr_pages += 1;
            }
            _ => out.push(PageRun {
                pid,
                vaddr,
                nr_pages: 1,
            }),
        }
    }
    out
}

/// What the bulk push brought: pages, and how many sent ahead were stale.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pushed {
    pub pages: u64,
    pub stale: u64,
    /// Pages of the cache still served from what went ahead.
    pub kept: u64,
}

/// The destination's bulk fetch: takes the source's stale list (and lets the cache serve),
/// asks for every lazy page of `lazy` the cache then lacks, and fills the cache; then
/// tells the source to end the lazy dump. `settled` hears about the list as soon as it
/// is applied. A connection lost on the way (the link, or the source's gateway restarting)
/// is opened again, for what the cache still lacks, until [`SOURCE_PATIENCE`] passes
/// without one that brings anything.
pub async fn bulk_fetch(
    source: SocketAddr,
    lazy: Vec<PageRun>,
    cache: Arc<PageCache>,
    compression: Compression,
    settled: impl FnOnce(Pushed) + Send,
) -> std::io::Result<Pushed> {
    let mut settled = Some(settled);
    let mut pushed = Pushed::default();
    let mut since = std::time::Instant::now();
    loop {
        let before = (pushed.pages, settled.is_some());
        match bulk_attempt(
            source,
            &lazy,
            &cache,
            compression,
            &mut settled,
            &mut pushed,
        )
        .await
        {
            Ok(()) => return Ok(pushed),
            Err(e) => {
                if (pushed.pages, settled.is_some()) != before {
                    since = std::time::Instant::now();
                }
                if since.elapsed() > SOURCE_PATIENCE {
                    return Err(e);
                }
                tracing::warn!(error = %e, pages = pushed.pages, "the bulk page connection was lost; opening it again");
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }
}

/// How long the destination's page path keeps trying to reach a source that went away
/// (its gateway restarting, the link down) before it gives up on the copy.
pub const SOURCE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);
/// Between two attempts to reach the source.
const RECONNECT_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// One bulk connection: see [`bulk_fetch`].
async fn bulk_attempt(
    source: SocketAddr,
    lazy: &[PageRun],
    cache: &PageCache,
    compression: Compression,
    settled: &mut Option<impl FnOnce(Pushed) + Send>,
    pushed: &mut Pushed,
) -> std::io::Result<()> {
    let mut conn = TcpStream::connect(source).await?;
    let _ = conn.set_nodelay(true);
    let compressed = compression == Compression::Zstd;
    conn.write_u8(if compressed {
        KIND_BULK_ZSTD
    } else {
        KIND_BULK
    })
    .await?;
    let stale = read_stale(&mut conn).await?;
    cache.all_arrived().await?;
    if cache.settle(&stale) || settled.is_some() {
        pushed.stale = match &stale {
            Stale::All => 0,
            Stale::Only(keys) => keys.len() as u64,
        };
        pushed.kept = cache.len() as u64;
    }
    if let Some(tell) = settled.take() {
        tell(*pushed);
    }
    // Everything still lacking (the stale pages too, unless they came early: see
    // `receive_settled`).
    let runs = cache.missing(lazy);
    let mut out = tokio::io::BufWriter::new(&mut conn);
    out.write_u32(u32::try_from(runs.len()).map_err(std::io::Error::other)?)
        .await?;
    for r in &runs {
        write_run(&mut out, r).await?;
    }
    out.flush().await?;
    drop(out);
    loop {
        let chunk = read_chunk_packed(&mut conn).await?;
        if chunk.data.is_empty() {
            tracing::debug!(pages = pushed.pages, "bulk pages received");
            break;
        }
        pushed.pages += chunk.data.len() as u64 / PAGE_SIZE;
        cache.insert(chunk);
        conn.write_u8(ACK).await?;
    }
    conn.write_u8(HAS_ALL).await?;
    let asked = std::time::Instant::now();
    conn.read_u8().await?;
    tracing::debug!(
        us = u64::try_from(asked.elapsed().as_micros()).unwrap_or(u64::MAX),
        "the source closed its lazy dump"
    );
    Ok(())
}

/// A process of the tree whose pages go ahead: its host pid, and its id in CRIU's images.
#[derive(Debug, Clone, Copy)]
pub struct TreeProcess {
    pub pid: i32,
    pub id: u32,
}

/// The stale list of a frozen tree and the stale pages' contents, ready to go
/// ([`Prepushed::settle`], [`PageSource::send_settlement`]).
pub struct Settlement {
    pub stale: Vec<(u32, u64)>,
    /// The processes it was made of.
    tree: Vec<TreeProcess>,
    /// The kernel's written ranges it was made with, by process id.
    written: HashMap<u32, Vec<(u64, u64)>>,
    chunks: Vec<(Chunk, Option<Vec<u8>>)>,
}

/// The pages the source sent ahead of the switch, each by a digest of what it held then,
/// and, where the kernel tracks it, which of its processes' pages were written since.
#[derive(Default)]
pub struct Prepushed {
    /// In address order, by process: the pages a tracked process may have written are
    /// found by range.
    digests: std::collections::BTreeMap<(u32, u64), [u8; 16]>,
    /// By CRIU's process id: write tracking started before the first page was read.
    trackers: HashMap<u32, crate::sys::dirty::Tracker>,
    /// Passes made over the tree.
    passes: usize,
    /// Pages the destination holds (blocks of its store): sent as their digests.
    held: Option<Arc<HeldSet>>,
    /// Bytes of pages that went as digests.
    deduped: u64,
}

/// A chunk's block as it goes out: compressed (when that was smaller), or with the pages
/// the destination holds as digests (and how many bytes those were).
enum Packed {
    Zstd(Option<Vec<u8>>),
    Dedup(Vec<u8>, u64),
}

impl Prepushed {
    /// Pages among `held` go as their digests.
    pub fn with_held(held: Option<Arc<HeldSet>>) -> Self {
        Self {
            held,
            ..Self::default()
        }
    }

    /// Bytes of pages that went as digests.
    pub fn deduped(&self) -> u64 {
        self.deduped
    }
}

/// The memory of each process of `tree` that can be opened, by its id in CRIU's images.
fn open_memory(tree: &[TreeProcess]) -> HashMap<u32, Arc<Memory>> {
    tree.iter()
        .filter_map(|p| Some((p.id, Arc::new(Memory::open(p.pid).ok()?))))
        .collect()
}

/// Blocking: `runs` as `tree` holds them, read and (`compressed`) compressed as
/// [`prepare_bulk`] does; a page the tree does not give here is left out (to the bulk
/// push).
fn read_runs(
    tree: &[TreeProcess],
    runs: Vec<PageRun>,
    compressed: bool,
) -> Vec<(Chunk, Option<Vec<u8>>)> {
    let mut chunks = Vec::new();
    prepare(&open_memory(tree), runs, compressed, |item| {
        if let Prepared::Read { chunk, packed } = item {
            chunks.push((chunk, packed));
        }
        true
    });
    chunks
}

/// Is `addr` in one of `ranges` (sorted, disjoint)?
fn within_ranges(ranges: &[(u64, u64)], addr: u64) -> bool {
    let i = ranges.partition_point(|&(_, end)| end <= addr);
    ranges.get(i).is_some_and(|&(start, _)| start <= addr)
}

/// Sorted, disjoint ranges covering both `a` and `b` (each sorted, disjoint).
fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in all {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The gaps between sorted, disjoint `ranges`, over the whole address space.
fn gaps(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    for &(s, e) in ranges {
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
    }
    out.push((at, u64::MAX));
    out
}

/// What the kernel says about a tracked process's pages: the ranges tracked now and those
/// written since they were last protected (`protect`: protected again).
struct Writes {
    tracked: Vec<(u64, u64)>,
    written: Vec<(u64, u64)>,
}

impl Writes {
    fn of(tracker: &crate::sys::dirty::Tracker, protect: bool) -> Option<Self> {
        if !protect {
            let (tracked, written) = tracker.tracked_and_written().ok()?;
            return Some(Self { tracked, written });
        }
        // Written (and protected again) first: a range that stops being tracked after
        // this still counts as untracked below (compared by content), never as unwritten.
        let written = tracker.protect_written().ok()?;
        let tracked = tracker.tracked().ok()?;
        Some(Self { tracked, written })
    }

    /// Known unchanged: tracked and not written.
    fn unchanged(&self, addr: u64) -> bool {
        within_ranges(&self.tracked, addr) && !within_ranges(&self.written, addr)
    }

    /// Where pages may have changed: written, or not tracked.
    fn suspect(&self) -> Vec<(u64, u64)> {
        union(&self.written, &gaps(&self.tracked))
    }
}

/// A page's fingerprint: 128-bit XXH3 (a page written since differs from the one sent
/// with probability 2^-128; ~5x faster than BLAKE3 here, and this runs while the source
/// is frozen).
fn digest(page: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(page).to_le_bytes()
}

impl Prepushed {
    pub fn pages(&self) -> usize {
        self.digests.len()
    }

    /// Blocking: starts the kernel's write tracking of every process of `tree` that allows
    /// it (before any page is read); returns how many. The others' pages are compared by
    /// content.
    pub fn track(&mut self, tree: &[TreeProcess]) -> usize {
        for p in tree {
            match crate::sys::dirty::Tracker::start(p.pid) {
                Ok(t) => {
                    self.trackers.insert(p.id, t);
                }
                Err(e) => {
                    tracing::debug!(pid = p.pid, error = %e, "no write tracking; pages compared by content");
                }
            }
        }
        self.trackers.len()
    }

    /// The pages sent ahead that the (now frozen) tree no longer holds as sent: written
    /// since, or gone. Where the kernel tracked writes, its list decides; elsewhere every
    /// page is read once and compared, on every core (the source is frozen meanwhile).
    /// `None` if a part of it failed: then no page sent ahead may be trusted.
    pub fn stale(&self, tree: &[TreeProcess]) -> Option<Vec<(u32, u64)>> {
        self.stale_with(tree, &self.writes(tree))
    }

    /// What the kernel says now of the writes of each process of `tree` it tracked (not
    /// another process with the same id).
    fn writes(&self, tree: &[TreeProcess]) -> HashMap<u32, Writes> {
        self.trackers
            .iter()
            .filter(|(id, t)| tree.iter().any(|p| p.id == **id && p.pid == t.pid()))
            .filter_map(|(id, t)| Some((*id, Writes::of(t, false)?)))
            .collect()
    }

    /// [`Self::stale`], with the kernel's word `writes`.
    fn stale_with(
        &self,
        tree: &[TreeProcess],
        writes: &HashMap<u32, Writes>,
    ) -> Option<Vec<(u32, u64)>> {
        // The pages to compare: every page of a process the kernel did not track, only
        // the suspect ranges of the others.
        let mut keys: Vec<(u32, u64)> = Vec::new();
        let mut next = self.digests.keys().next().map(|k| k.0);
        while let Some(id) = next {
            next = id
                .checked_add(1)
                .and_then(|n| self.digests.range((n, 0)..).next().map(|(k, _)| k.0));
            match writes.get(&id) {
                Some(w) => {
                    for (s, e) in w.suspect() {
                        keys.extend(self.digests.range((id, s)..(id, e)).map(|(k, _)| *k));
                    }
                }
                None => keys.extend(
                    self.digests
                        .range((id, 0)..=(id, u64::MAX))
                        .map(|(k, _)| *k),
                ),
            }
        }
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let part = keys.len().div_ceil(threads.max(1)).max(1);
        std::thread::scope(|s| {
            let parts: Vec<_> = keys
                .chunks(part)
                .map(|keys| s.spawn(move || self.stale_in(keys, tree)))
                .collect();
            let mut stale = Vec::new();
            for p in parts {
                stale.extend(p.join().ok()?);
            }
            Some(stale)
        })
    }

    /// Blocking, once `tree` is frozen: the stale list, and the stale pages as the tree
    /// holds them, read and (`compressed`) compressed in the order `order` gives their
    /// runs. `None` if the comparison failed (no page sent ahead may be trusted then).
    pub fn settle(
        &self,
        tree: &[TreeProcess],
        order: impl FnOnce(Vec<PageRun>) -> Vec<PageRun>,
        compressed: bool,
    ) -> Option<Settlement> {
        let writes = self.writes(tree);
        let stale = self.stale_with(tree, &writes)?;
        let runs = order(coalesce(stale.iter().copied()));
        Some(Settlement {
            stale,
            tree: tree.to_vec(),
            written: writes.into_iter().map(|(id, w)| (id, w.written)).collect(),
            chunks: read_runs(tree, runs, compressed),
        })
    }

    /// Blocking: brings `s` (made while the dump ran) up to what `tree` holds now that it
    /// is over: pages the kernel reports written since are compared, and those changed
    /// join the list with their contents (a thread the dump ran code in may have had a
    /// page written, its `rseq` area for one). False if it cannot be (other processes, a
    /// failed scan): make a new one then. Where the kernel tracked nothing, `s` was made
    /// with the tree frozen, as now.
    pub fn refresh(&self, s: &mut Settlement, tree: &[TreeProcess], compressed: bool) -> bool {
        let same = s.tree.len() == tree.len()
            && s.tree
                .iter()
                .all(|p| tree.iter().any(|q| q.pid == p.pid && q.id == p.id));
        let now = self.writes(tree);
        if !same || now.len() != s.written.len() {
            return false;
        }
        let listed: std::collections::HashSet<(u32, u64)> = s.stale.iter().copied().collect();
        let mut keys: Vec<(u32, u64)> = Vec::new();
        for (id, w) in &now {
            let Some(before) = s.written.get(id) else {
                return false;
            };
            for &(start, end) in &w.written {
                keys.extend(
                    self.digests
                        .range((*id, start)..(*id, end))
                        .map(|(k, _)| *k)
                        .filter(|k| !within_ranges(before, k.1) && !listed.contains(k)),
                );
            }
        }
        if !keys.is_empty() {
            keys.sort_unstable();
            let fresh = self.stale_in(&keys, tree);
            s.chunks
                .extend(read_runs(tree, coalesce(fresh.iter().copied()), compressed));
            s.stale.extend(fresh);
            s.stale.sort_unstable();
        }
        s.written = now.into_iter().map(|(id, w)| (id, w.written)).collect();
        true
    }

    /// Of `keys` (sorted), those whose page now differs from what was sent.
    fn stale_in(&self, keys: &[(u32, u64)], tree: &[TreeProcess]) -> Vec<(u32, u64)> {
        let memory = open_memory(tree);
        let mut stale = Vec::new();
        let mut i = 0;
        while i < keys.len() {
            let (id, start) = keys[i];
            // A run of consecutive pages of one process, read at once.
            let mut n = 1;
            while i + n < keys.len()
                && n < MAX_GET_PAGES as usize
                && keys[i + n] == (id, start + n as u64 * PAGE_SIZE)
            {
                n += 1;
            }
            let data = memory
                .get(&id)
                .and_then(|mem| mem.read(start, n as u64).ok());
            for k in 0..n {
                let key = keys[i + k];
                let same = data.as_ref().is_some_and(|d| {
                    let page = &d[page_bytes(k as u64)..page_bytes(k as u64 + 1)];
                    self.digests.get(&key) == Some(&digest(page))
                });
                if !same {
                    stale.push(key);
                }
            }
            i += n;
        }
        stale
    }
}

/// Sends the present private anonymous pages of the running `tree` on `out`, framed as
/// a compressed bulk connection, and records their digests in `sent`: every page the
/// first time, then (called again with the same `sent`) only those whose content changed
/// or that are new (where the kernel tracks writes, only the pages it says were written
/// are read again, and protected again). Returns the pages and bytes it sent. The caller
/// ends the stream with [`end_prepush`].
pub async fn prepush(
    out: &mut (impl AsyncWrite + Unpin),
    tree: &[TreeProcess],
    sent: &mut Prepushed,
) -> std::io::Result<(u64, u64)> {
    let (mut pages, mut wire) = (0u64, 0u64);
    let again = sent.passes > 0;
    sent.passes += 1;
    for p in tree {
        let writes = sent
            .trackers
            .get(&p.id)
            .filter(|_| again)
            .and_then(|t| Writes::of(t, true));
        let runs = tokio::task::spawn_blocking({
            let pid = p.pid;
            move || {
                let runs = crate::sys::memory::present_private_anon(pid)?;
                let Some(w) = writes else {
                    return Ok(runs);
                };
                // Unchanged since the last pass: not read again.
                let mut left: Vec<crate::sys::memory::Present> = Vec::new();
                for r in runs {
                    for vaddr in (0..r.pages).map(|i| r.vaddr + i * PAGE_SIZE) {
                        if w.unchanged(vaddr) {
                            continue;
                        }
                        match left.last_mut() {
                            Some(l) if l.vaddr + l.pages * PAGE_SIZE == vaddr => l.pages += 1,
                            _ => left.push(crate::sys::memory::Present { vaddr, pages: 1 }),
                        }
                    }
                }
                Ok::<_, std::io::Error>(left)
            }
        })
        .await
        .map_err(std::io::Error::other)??;
        let mem = Arc::new(Memory::open(p.pid)?);
        for run in runs {
            let mut vaddr = run.vaddr;
            let end = run.vaddr + run.pages * PAGE_SIZE;
            while vaddr < end {
                let n = ((end - vaddr) / PAGE_SIZE).min(MAX_GET_PAGES);
                let mem = Arc::clone(&mem);
                let known: Vec<Option<[u8; 16]>> = (0..n)
                    .map(|k| sent.digests.get(&(p.id, vaddr + k * PAGE_SIZE)).copied())
                    .collect();
                let held = sent.held.clone();
                // Read, digest and compress off the async threads: the runs of pages not
                // sent yet as they are now. A page that cannot be read (unmapped
                // meanwhile) is not sent ahead.
                let read = tokio::task::spawn_blocking(move || {
                    let data = mem.read(vaddr, n).ok()?;
                    let digests: Vec<[u8; 16]> = data.chunks(page_bytes(1)).map(digest).collect();
                    let mut runs: Vec<(u64, u64)> = Vec::new();
                    for (k, d) in digests.iter().enumerate() {
                        if known[k] == Some(*d) {
                            continue;
                        }
                        match runs.last_mut() {
                            Some((first, count)) if *first + *count == k as u64 => *count += 1,
                            _ => runs.push((k as u64, 1)),
                        }
                    }
                    let chunks: Vec<(Chunk, Packed)> = runs
                        .into_iter()
                        .map(|(first, count)| {
                            let bytes = data[page_bytes(first)..page_bytes(first + count)].to_vec();
                            let dedup = held.as_deref().and_then(|h| {
                                super::codec::dedup_block(&bytes, h, Compression::Zstd)
                            });
                            let packed = match dedup {
                                Some((payload, deduped)) => Packed::Dedup(payload, deduped),
                                None => Packed::Zstd(super::codec::compress(&bytes)),
                            };
                            let chunk = Chunk::run(0, vaddr + first * PAGE_SIZE, bytes);
                            (chunk, packed)
                        })
                        .collect();
                    Some((digests, chunks))
                })
                .await
                .map_err(std::io::Error::other)?;
                if let Some((digests, chunks)) = read {
                    for (k, d) in digests.into_iter().enumerate() {
                        sent.digests.insert((p.id, vaddr + k as u64 * PAGE_SIZE), d);
                    }
                    for (chunk, packed) in chunks {
                        let chunk = Chunk { pid: p.id, ..chunk };
                        pages += chunk.data.len() as u64 / PAGE_SIZE;
                        wire += match packed {
                            Packed::Zstd(packed) => {
                                write_chunk_packed(out, &chunk, packed.as_deref()).await?
                            }
                            Packed::Dedup(payload, deduped) => {
                                sent.deduped += deduped;
                                write_chunk_dedup(out, &chunk, &payload).await?
                            }
                        } as u64;
                    }
                }
                vaddr += n * PAGE_SIZE;
            }
        }
    }
    Ok((pages, wire))
}

/// Ends a stream of pages sent ahead; returns the bytes it took.
pub async fn end_prepush(out: &mut (impl AsyncWrite + Unpin)) -> std::io::Result<u64> {
    Ok(write_chunk_packed(out, &Chunk::end(), None).await? as u64)
}

/// Receives what [`prepush`] sends into `cache`, at most `max_pages` pages; returns the
/// pages received.
pub async fn receive_prepush(
    inp: &mut (impl AsyncRead + Unpin),
    cache: &PageCache,
    max_pages: u64,
    held: Option<Arc<dyn Held>>,
) -> std::io::Result<u64> {
    let _ends = ArrivalEnds(cache);
    let mut pages = 0;
    loop {
        let chunk = read_chunk_held(inp, held.as_ref()).await?;
        if chunk.data.is_empty() {
            return Ok(pages);
        }
        pages += chunk.data.len() as u64 / PAGE_SIZE;
        if pages > max_pages {
            return Err(std::io::Error::other(format!(
                "more than {max_pages} pages sent ahead (what this site can hold besides the restored workload)"
            )));
        }
        cache.insert(chunk);
    }
}

/// Destination: applies what [`PageSource::send_settled`] sends to `cache`. The stale
/// pages sent ahead are forgotten and the cache serves from then on (unless the bulk
/// connection's list came first); then the stale pages' contents of the frozen source
/// are kept. No more pages than the list names are taken. Returns (stale, pages).
pub async fn receive_settled(
    inp: &mut (impl AsyncRead + Unpin),
    cache: &PageCache,
) -> std::io::Result<(u64, u64)> {
    let stale = read_stale(inp).await?;
    let named = match &stale {
        Stale::All => 0,
        Stale::Only(keys) => keys.len() as u64,
    };
    cache.all_arrived().await?;
    cache.settle(&stale);
    let mut pages = 0;
    loop {
        let chunk = read_chunk_packed(inp).await?;
        if chunk.data.is_empty() {
            return Ok((named, pages));
        }
        pages += chunk.data.len() as u64 / PAGE_SIZE;
        if pages > named {
            return Err(std::io::Error::other(format!(
                "more pages than the {named} the stale list names"
            )));
        }
        cache.insert(chunk);
    }
}

/// What serving the lazy-pages daemon took.
#[derive(Debug, Clone, Default)]
pub struct ServeStats {
    /// GETs the daemon sent (faults and its own background fetch).
    pub gets: u64,
    /// GETs answered from the cache at once.
    pub hits: u64,
    /// Waits for the source (pages not pushed yet), and how long they took.
    pub misses: u64,
    pub miss_wait: Vec<std::time::Duration>,
}

impl ServeStats {
    /// The `q` quantile (0..=1) of the miss waits, in microseconds.
    pub fn miss_wait_us(&self, q: f64) -> Option<u64> {
        let mut v: Vec<u64> = self
            .miss_wait
            .iter()
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .collect();
        v.sort_unstable();
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v.get(i).copied()
    }
}

/// The destination's priority connection to the source; opened again when lost (the
/// link, the source's gateway restarting), for up to [`SOURCE_PATIENCE`] per request.
struct Priority {
    source: SocketAddr,
    conn: Option<TcpStream>,
}

impl Priority {
    /// Opens the connection at once (a first fault then does not wait for it).
    async fn new(source: SocketAddr) -> Self {
        let conn = Self::open(source).await.ok();
        Self { source, conn }
    }

    async fn open(source: SocketAddr) -> std::io::Result<TcpStream> {
        let mut conn = TcpStream::connect(source).await?;
        let _ = conn.set_nodelay(true);
        conn.write_u8(KIND_PRIORITY).await?;
        Ok(conn)
    }

    /// The pages of `run` (at least its first).
    async fn fetch(&mut self, run: &PageRun) -> std::io::Result<Chunk> {
        let since = std::time::Instant::now();
        loop {
            let attempt = async {
                let conn = match &mut self.conn {
                    Some(c) => c,
                    None => self.conn.insert(Self::open(self.source).await?),
                };
                write_run(conn, run).await?;
                read_chunk(conn).await
            }
            .await;
            match attempt {
                Ok(chunk) if chunk.vaddr == run.vaddr && chunk.pid == run.pid && !chunk.data.is_empty() => {
                    return Ok(chunk)
                }
                Ok(chunk) => {
                    return Err(std::io::Error::other(format!(
                        "the source answered {} pages at {:#x} of process {} to a fault at {:#x} of process {}",
                        chunk.data.len() as u64 / PAGE_SIZE,
                        chunk.vaddr,
                        chunk.pid,
                        run.vaddr,
                        run.pid
                    )))
                }
                Err(e) => {
                    self.conn = None;
                    if since.elapsed() > SOURCE_PATIENCE {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, vaddr = run.vaddr, "the priority page connection was lost; opening it again");
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                }
            }
        }
    }
}

/// The destination's pages for Ferry's own lazy-pages daemon (`criu::lazy`), which runs
/// in the gateway: the cache, read directly, and the source's priority connection for a
/// fault on a page not there yet. Its daemon's threads block; the priority fetch runs on
/// the gateway's runtime.
pub struct CacheSupply {
    cache: Arc<PageCache>,
    source: SocketAddr,
    runtime: tokio::runtime::Handle,
    priority: tokio::sync::Mutex<Option<Priority>>,
    stats: Mutex<ServeStats>,
    done: tokio::sync::watch::Sender<Option<bool>>,
}

impl CacheSupply {
    pub fn new(cache: Arc<PageCache>, source: SocketAddr) -> Self {
        Self {
            cache,
            source,
            runtime: tokio::runtime::Handle::current(),
            priority: tokio::sync::Mutex::new(None),
            stats: Mutex::default(),
            done: tokio::sync::watch::Sender::new(None),
        }
    }

    /// Waits until the daemon is done: true if every page was placed; with what the
    /// supply served.
    pub async fn finished(&self) -> (bool, ServeStats) {
        let mut done = self.done.subscribe();
        let ok = done
            .wait_for(Option::is_some)
            .await
            .is_ok_and(|d| d.unwrap_or(false));
        let stats = std::mem::take(
            &mut *self
                .stats
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        (ok, stats)
    }
}

impl crate::criu::lazy::Supply for CacheSupply {
    fn get(
        &self,
        pid: u32,
        vaddr: u64,
        pages: u64,
        background: bool,
    ) -> std::io::Result<crate::criu::lazy::Pages> {
        use crate::criu::lazy::Pages;
        let count = |f: &dyn Fn(&mut ServeStats)| {
            f(&mut self
                .stats
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner));
        };
        if *self.cache.held.borrow() {
            // Pages sent ahead may be stale until the source's list came.
            if background {
                return Ok(Pages::Owned(Vec::new()));
            }
            self.runtime.block_on(self.cache.ready())?;
        }
        let want = pages.clamp(1, MAX_GET_PAGES);
        let data = self.cache.run_shared(pid, vaddr, want);
        if background || !data.bytes().is_empty() {
            if !data.bytes().is_empty() {
                count(&|s| {
                    s.gets += 1;
                    s.hits += 1;
                });
            }
            return Ok(data);
        }
        let waited = std::time::Instant::now();
        let run = PageRun {
            pid,
            vaddr,
            nr_pages: want.min(MAX_MISS_PAGES),
        };
        let chunk = self.runtime.block_on(async {
            let mut p = self.priority.lock().await;
            if p.is_none() {
                *p = Some(Priority::new(self.source).await);
            }
            match p.as_mut() {
                Some(p) => p.fetch(&run).await,
                None => Err(std::io::Error::other("no priority connection")),
            }
        })?;
        self.cache.insert(chunk);
        let took = waited.elapsed();
        count(&|s| {
            s.gets += 1;
            s.misses += 1;
            s.miss_wait.push(took);
        });
        let data = self.cache.run_shared(pid, vaddr, want);
        if data.bytes().is_empty() {
            return Err(std::io::Error::other(format!(
                "no page at {vaddr:#x} of process {pid}"
            )));
        }
        Ok(data)
    }

    fn finished(&self, ok: bool) {
        self.done.send_replace(Some(ok));
    }
}

/// Stands in as the page server of the destination's `criu lazy-pages` daemon: answers
/// its GETs from the cache, and asks the source's priority connection for pages a fault
/// waits for that are not there yet. Returns when the daemon closes, with what it took.
pub async fn serve_daemon(
    listener: TcpListener,
    source: SocketAddr,
    cache: Arc<PageCache>,
) -> std::io::Result<ServeStats> {
    let (conn, _) = listener.accept().await?;
    drop(listener);
    let _ = conn.set_nodelay(true);
    let stats = Mutex::new(ServeStats::default());
    let priority = tokio::sync::Mutex::new(None::<Priority>);
    serve_daemon_conn(conn, source, &cache, &priority, &stats).await?;
    Ok(stats
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// One connection of the daemon; true if it ended with CLOSE.
async fn serve_daemon_conn(
    mut daemon: TcpStream,
    source: SocketAddr,
    cache: &PageCache,
    priority: &tokio::sync::Mutex<Option<Priority>>,
    stats: &Mutex<ServeStats>,
) -> std::io::Result<bool> {
    let count = |f: &dyn Fn(&mut ServeStats)| {
        f(&mut stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    };
    loop {
        let mut head = [0u8; HEADER_LEN];
        match daemon.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        }
        let req = Header::decode(&head);
        match req.command() {
            CMD_GET => {
                cache.ready().await?;
                let pid = u32::try_from(req.dst_id).map_err(std::io::Error::other)?;
                let want = req.nr_pages.clamp(1, MAX_GET_PAGES);
                let mut data = cache.run_from(pid, req.vaddr, want);
                if data.is_empty() {
                    let waited = std::time::Instant::now();
                    // A fault waits for this page: ask for it ahead of any bulk.
                    let run = PageRun {
                        pid,
                        vaddr: req.vaddr,
                        nr_pages: want.min(MAX_MISS_PAGES),
                    };
                    let chunk = {
                        let mut p = priority.lock().await;
                        if p.is_none() {
                            *p = Some(Priority::new(source).await);
                        }
                        match p.as_mut() {
                            Some(p) => p.fetch(&run).await?,
                            None => return Err(std::io::Error::other("no priority connection")),
                        }
                    };
                    cache.insert(chunk);
                    data = cache.run_from(pid, req.vaddr, want);
                    let took = waited.elapsed();
                    count(&|s| {
                        s.gets += 1;
                        s.misses += 1;
                        s.miss_wait.push(took);
                    });
                    tracing::debug!(
                        pid,
                        vaddr = req.vaddr,
                        pages = req.nr_pages,
                        us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                        "page miss"
                    );
                    if data.is_empty() {
                        return Err(std::io::Error::other(format!(
                            "no page at {:#x} of process {pid}",
                            req.vaddr
                        )));
                    }
                } else {
                    count(&|s| {
                        s.gets += 1;
                        s.hits += 1;
                    });
                }
                let pages = data.len() as u64 / PAGE_SIZE;
                daemon.write_all(&req.reply(pages).encode()).await?;
                daemon.write_all(&data).await?;
            }
            CMD_CLOSE | CMD_FORCE_CLOSE => {
                daemon.write_i32(0).await?;
                // The daemon closes after reading the answer.
                let mut rest = Vec::new();
                let _ = daemon.read_to_end(&mut rest).await;
                return Ok(true);
            }
            other => {
                return Err(std::io::Error::other(format!(
                    "unexpected page-server command {other:#x}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte at offset `i` of page `vaddr` of process `pid` in the fake memory.
    fn byte(pid: u32, vaddr: u64, i: usize) -> u8 {
        (u64::from(pid) * 31 + vaddr / PAGE_SIZE * 7 + i as u64) as u8
    }

    fn page(pid: u32, vaddr: u64) -> Vec<u8> {
        (0..page_bytes(1)).map(|i| byte(pid, vaddr, i)).collect()
    }

    /// A stand-in for CRIU's lazy page server: one connection, answers GETs in order
    /// (at most 5 pages at once, as a page pipe's end clamps them), then CLOSE, whose
    /// answer (corked in CRIU) goes only once the client closed its end.
    async fn fake_criu() -> (SocketAddr, tokio::task::JoinHandle<(u64, bool)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut gets = 0;
            loop {
                let mut head = [0u8; HEADER_LEN];
                if s.read_exact(&mut head).await.is_err() {
                    return (gets, false);
                }
                let h = Header::decode(&head);
                if h.command() == CMD_CLOSE {
                    let mut rest = [0u8; 1];
                    let closed =
                        tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut rest))
                            .await
                            .is_ok_and(|r| matches!(r, Ok(0)));
                    s.write_all(&0i32.to_ne_bytes()).await.unwrap();
                    return (gets, closed);
                }
                gets += 1;
                let n = h.nr_pages.min(5);
                s.write_all(&h.reply(n).encode()).await.unwrap();
                for i in 0..n {
                    let pid = u32::try_from(h.dst_id).unwrap();
                    s.write_all(&page(pid, h.vaddr + i * PAGE_SIZE))
                        .await
                        .unwrap();
                }
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn faults_and_bulk_fill_the_cache_and_the_dump_is_closed_at_the_end() {
        faults_and_bulk(Compression::None).await;
    }

    #[tokio::test]
    async fn a_compressed_bulk_push_brings_the_same_pages_in_fewer_bytes() {
        faults_and_bulk(Compression::Zstd).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pages_sent_ahead_that_the_destination_holds_go_as_digests_and_arrive_whole() {
        struct One(Vec<u8>);
        impl Held for One {
            fn blocks(&self, digests: &[[u8; 32]]) -> Vec<Option<Vec<u8>>> {
                digests
                    .iter()
                    .map(|d| (blake3::hash(&self.0).as_bytes() == d).then(|| self.0.clone()))
                    .collect()
            }
        }
        let me = std::process::id() as i32;
        let tree = [TreeProcess { pid: me, id: 1 }];
        // A buffer of pages whose content the destination holds.
        let pattern: Vec<u8> = (0..page_bytes(1)).map(|i| (i % 253) as u8 ^ 0x5a).collect();
        let mut held_here = vec![0u8; 9 * page_bytes(1)];
        let at = (held_here.as_ptr() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let from = usize::try_from(at - held_here.as_ptr() as u64).unwrap();
        for page in held_here[from..from + 8 * page_bytes(1)].chunks_exact_mut(page_bytes(1)) {
            page.copy_from_slice(&pattern);
        }
        let offered: HeldSet = [*blake3::hash(&pattern).as_bytes()].into();
        let cache = Arc::new(PageCache::held());
        let (mut tx, mut rx) = tokio::io::duplex(1 << 20);
        let receiving = {
            let (cache, held) = (Arc::clone(&cache), Arc::new(One(pattern.clone())));
            tokio::spawn(async move {
                receive_prepush(&mut rx, &cache, u64::MAX, Some(held as Arc<dyn Held>)).await
            })
        };
        let mut sent = Prepushed::with_held(Some(Arc::new(offered)));
        let (pages, _) = prepush(&mut tx, &tree, &mut sent).await.unwrap();
        end_prepush(&mut tx).await.unwrap();
        assert_eq!(receiving.await.unwrap().unwrap(), pages);
        assert!(
            sent.deduped() >= 8 * PAGE_SIZE,
            "{} bytes went as digests",
            sent.deduped()
        );
        assert_eq!(cache.run_from(1, at, 8), pattern.repeat(8));
        std::hint::black_box(&held_here);
    }

    #[tokio::test]
    async fn pages_sent_ahead_arrive_and_those_written_since_are_stale() {
        let me = std::process::id() as i32;
        let tree = [TreeProcess { pid: me, id: 1 }];
        // Two buffers of whole pages: one is written after it went ahead, one is not.
        let mut written = vec![0x11u8; 8 * page_bytes(1)];
        let kept = vec![0x22u8; 8 * page_bytes(1)];
        let page_of = |v: &Vec<u8>| (v.as_ptr() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let (w_page, k_page) = (page_of(&written), page_of(&kept));
        let w_at = usize::try_from(w_page - written.as_ptr() as u64).unwrap();
        let cache = Arc::new(PageCache::held());
        let (mut tx, mut rx) = tokio::io::duplex(1 << 20);
        let receiving = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { receive_prepush(&mut rx, &cache, u64::MAX, None).await })
        };
        let mut sent = Prepushed::default();
        let (first, wire) = prepush(&mut tx, &tree, &mut sent).await.unwrap();
        assert_eq!(first as usize, sent.pages());
        assert!(wire > 0);
        // Again, after one page changed: it goes again, the untouched ones do not.
        written[w_at + 1] = 0x77;
        std::hint::black_box(&written);
        let mut again: Vec<u8> = Vec::new();
        let (second, _) = prepush(&mut again, &tree, &mut sent).await.unwrap();
        let mut resent = Vec::new();
        let mut rest = again.as_slice();
        while !rest.is_empty() {
            let c = read_chunk_packed(&mut rest).await.unwrap();
            resent.extend((0..c.data.len() as u64 / PAGE_SIZE).map(|k| c.vaddr + k * PAGE_SIZE));
        }
        assert_eq!(resent.len() as u64, second);
        assert!(
            resent.contains(&w_page),
            "the changed page was not sent again"
        );
        assert!(
            !resent.contains(&k_page),
            "an untouched page was sent again"
        );
        end_prepush(&mut tx).await.unwrap();
        let received = receiving.await.unwrap().unwrap();
        assert_eq!(received, first);
        written[w_at + 1] = 0x11;
        assert_eq!(cache.run_from(1, k_page, 1), vec![0x22u8; page_bytes(1)]);
        // Written after it went ahead: stale; untouched: not.
        let at = usize::try_from(w_page - written.as_ptr() as u64).unwrap();
        written[at] = 0x99;
        std::hint::black_box(&written);
        let stale = tokio::task::spawn_blocking(move || sent.stale(&tree))
            .await
            .unwrap()
            .expect("every part compared");
        assert!(
            stale.contains(&(1, w_page)),
            "the written page is not stale"
        );
        assert!(!stale.contains(&(1, k_page)), "an untouched page is stale");
        // The cache forgets the stale pages (and serves again); the bulk push then
        // brings only those.
        let mut wire = Vec::new();
        write_stale(&mut wire, &Stale::Only(stale)).await.unwrap();
        cache.settle(&read_stale(&mut wire.as_slice()).await.unwrap());
        cache.ready().await.unwrap();
        let runs = [PageRun {
            pid: 1,
            vaddr: w_page,
            nr_pages: 2,
        }];
        let missing = cache.missing(&runs);
        assert_eq!(missing.first().map(|r| (r.vaddr, r.pid)), Some((w_page, 1)));
        // A later list (a restarted source's "all") leaves a serving cache as it is: it
        // holds only pages read from the frozen source.
        let kept_pages = cache.len();
        assert!(!cache.settle(&Stale::All));
        assert_eq!(cache.len(), kept_pages);
        assert!(read_stale(&mut [1u8, 0, 0, 0, 1, 0].as_slice())
            .await
            .is_err());
        std::hint::black_box((&written, &kept));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_source_reads_the_frozen_trees_pages_itself_without_asking_criu() {
        let (criu, criu_done) = fake_criu().await;
        let me = std::process::id() as i32;
        let (source, _) = PageSource::start(Some(criu), &[TreeProcess { pid: me, id: 9 }])
            .await
            .unwrap();
        let buf = vec![0x3cu8; 4 * page_bytes(1)];
        let vaddr = (buf.as_ptr() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let chunk = source
            .fetch(
                &source.bulk,
                PageRun {
                    pid: 9,
                    vaddr,
                    nr_pages: 2,
                },
            )
            .await
            .unwrap();
        assert_eq!(chunk.data, vec![0x3cu8; 2 * page_bytes(1)]);
        // A process it cannot read goes to CRIU's page server.
        let other = source
            .fetch(
                &source.bulk,
                PageRun {
                    pid: 2,
                    vaddr: 0x40_000,
                    nr_pages: 1,
                },
            )
            .await
            .unwrap();
        assert_eq!(other.data, page(2, 0x40_000));
        source.finish().await;
        let (gets, closed) = criu_done.await.unwrap();
        assert_eq!((gets, closed), (1, true));
        std::hint::black_box(&buf);
    }

    #[tokio::test]
    async fn a_tracked_process_has_its_written_pages_stale_and_no_other() {
        // A process with a private region of 64 populated pages, asleep.
        let script = "import mmap, time, ctypes\n\
            m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE)\n\
            for i in range(64): m[i * 4096] = i + 1\n\
            print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)\n\
            time.sleep(3)\n";
        let (mut child, region) = crate::sys::dirty::tests::python_with_region(script);
        let pid = child.id() as i32;
        let tree = [TreeProcess { pid, id: 1 }];
        let mut sent = Prepushed::default();
        assert_eq!(sent.track(&tree), 1, "not tracked");
        prepush(&mut tokio::io::sink(), &tree, &mut sent)
            .await
            .unwrap();
        assert!(sent.digests.contains_key(&(1, region)));
        // One page written with new bytes, one with the bytes it held.
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .expect("mem");
        use std::os::unix::fs::FileExt;
        let (changed, same) = (region + 5 * PAGE_SIZE, region + 9 * PAGE_SIZE);
        mem.write_all_at(&[0xee], changed).expect("write");
        let mut b = [0u8; 1];
        mem.read_exact_at(&mut b, same).expect("read");
        mem.write_all_at(&b, same).expect("write");
        let (mut settled, holds, sent) = tokio::task::spawn_blocking(move || {
            let mut s = sent.settle(&tree, |r| r, true).expect("compared");
            let holds = sent.refresh(&mut s, &tree, true);
            (s, holds, sent)
        })
        .await
        .unwrap();
        let here: Vec<u64> = settled
            .stale
            .iter()
            .filter(|(id, a)| *id == 1 && *a >= region && *a < region + 64 * PAGE_SIZE)
            .map(|(_, a)| *a)
            .collect();
        assert_eq!(here, vec![changed], "stale in the region");
        assert!(
            holds,
            "nothing was written since, yet it cannot be brought up to date"
        );
        let before = settled.stale.len();
        // A write after it was made (as while the dump ran): brought in by a refresh.
        let late = region + 20 * PAGE_SIZE;
        mem.write_all_at(&[0xdd], late).expect("write");
        let (settled, holds) = tokio::task::spawn_blocking(move || {
            let holds = sent.refresh(&mut settled, &tree, true);
            (settled, holds)
        })
        .await
        .unwrap();
        assert!(holds);
        assert!(
            settled.stale.contains(&(1, late)),
            "a write since it was made went unseen"
        );
        assert_eq!(settled.stale.len(), before + 1);
        assert!(
            settled
                .chunks
                .iter()
                .any(|(c, _)| c.addresses().any(|a| a == late)),
            "its page was not read"
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    #[tokio::test]
    async fn the_stale_list_comes_with_the_stale_pages_as_they_are_now() {
        let me = std::process::id() as i32;
        let tree = [TreeProcess { pid: me, id: 3 }];
        let (source, _) = PageSource::start(None, &tree).await.unwrap();
        let now = vec![0x5au8; 5 * page_bytes(1)];
        let base = (now.as_ptr() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let (a, b, c) = (base, base + PAGE_SIZE, base + 3 * PAGE_SIZE);
        // Sent ahead: three pages; two of them were written since.
        let old = vec![0x01u8; page_bytes(1)];
        let cache = PageCache::held();
        let mut sent = Prepushed::default();
        for at in [a, b, c] {
            let then = if at == b {
                vec![0x5au8; page_bytes(1)]
            } else {
                old.clone()
            };
            sent.digests.insert((3, at), digest(&then));
            cache.insert(Chunk::run(3, at, then));
        }
        let settled = tokio::task::spawn_blocking(move || sent.settle(&tree, |r| r, true))
            .await
            .unwrap()
            .expect("compared");
        assert_eq!(settled.stale, vec![(3, a), (3, c)]);
        let mut wire: Vec<u8> = Vec::new();
        let (pages, _) = source.send_settlement(&mut wire, &settled).await.unwrap();
        assert_eq!(pages, 2);
        let (named, got) = receive_settled(&mut wire.as_slice(), &cache).await.unwrap();
        assert_eq!((named, got), (2, 2));
        cache.ready().await.unwrap();
        for at in [a, b, c] {
            assert_eq!(
                cache.run_from(3, at, 1),
                vec![0x5au8; page_bytes(1)],
                "{at:#x}"
            );
        }
        // Nothing left for the bulk push; the bulk connection's list changes nothing now.
        let lazy = [PageRun {
            pid: 3,
            vaddr: a,
            nr_pages: 4,
        }];
        assert_eq!(
            cache.missing(&lazy).iter().map(|r| r.nr_pages).sum::<u64>(),
            1
        );
        assert!(!cache.settle(&Stale::Only(settled.stale.clone())));
        assert_eq!(cache.run_from(3, c, 1), vec![0x5au8; page_bytes(1)]);
        // More pages than the list names are refused.
        let more = Settlement {
            stale: vec![(3, a)],
            tree: Vec::new(),
            written: HashMap::new(),
            chunks: vec![(Chunk::run(3, a, vec![1u8; page_bytes(2)]), None)],
        };
        let mut wire: Vec<u8> = Vec::new();
        source.send_settlement(&mut wire, &more).await.unwrap();
        let e = receive_settled(&mut wire.as_slice(), &PageCache::held())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("more pages than the 1"), "{e}");
        std::hint::black_box(&now);
    }

    #[tokio::test]
    async fn a_stale_list_waits_for_the_pages_sent_ahead_still_on_their_way() {
        let at = 0x7000_0000u64;
        let cache = Arc::new(PageCache::arriving());
        // The push is written but its last page is still on the link.
        let (mut tx, mut rx) = tokio::io::duplex(1 << 20);
        let arriving = tokio::spawn({
            let cache = Arc::clone(&cache);
            async move { receive_prepush(&mut rx, &cache, u64::MAX, None).await }
        });
        // Meanwhile the stale list names that page, with its content as frozen.
        let mut settle: Vec<u8> = Vec::new();
        write_stale(&mut settle, &Stale::Only(vec![(4, at)]))
            .await
            .unwrap();
        write_chunk_packed(
            &mut settle,
            &Chunk::run(4, at, vec![2u8; page_bytes(1)]),
            None,
        )
        .await
        .unwrap();
        write_chunk_packed(&mut settle, &Chunk::end(), None)
            .await
            .unwrap();
        let settling = tokio::spawn({
            let cache = Arc::clone(&cache);
            async move { receive_settled(&mut settle.as_slice(), &cache).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !settling.is_finished(),
            "the list was applied before the push came"
        );
        // The old content arrives last, then the push ends.
        write_chunk_packed(&mut tx, &Chunk::run(4, at, vec![1u8; page_bytes(1)]), None)
            .await
            .unwrap();
        write_chunk_packed(&mut tx, &Chunk::end(), None)
            .await
            .unwrap();
        assert_eq!(arriving.await.unwrap().unwrap(), 1);
        assert_eq!(settling.await.unwrap().unwrap(), (1, 1));
        cache.ready().await.unwrap();
        assert_eq!(
            cache.run_from(4, at, 1),
            vec![2u8; page_bytes(1)],
            "served stale"
        );
        // A push that breaks off also lets the list through.
        let cache = Arc::new(PageCache::arriving());
        let (tx, mut rx) = tokio::io::duplex(1 << 10);
        let arriving = tokio::spawn({
            let cache = Arc::clone(&cache);
            async move { receive_prepush(&mut rx, &cache, u64::MAX, None).await }
        });
        drop(tx);
        assert!(arriving.await.unwrap().is_err());
        let mut settle: Vec<u8> = Vec::new();
        write_stale(&mut settle, &Stale::All).await.unwrap();
        write_chunk_packed(&mut settle, &Chunk::end(), None)
            .await
            .unwrap();
        receive_settled(&mut settle.as_slice(), &cache)
            .await
            .unwrap();
        cache.ready().await.unwrap();
    }

    #[tokio::test]
    async fn scattered_pages_go_gathered_in_few_chunks_and_land_at_their_addresses() {
        let me = std::process::id() as i32;
        let memory: HashMap<u32, Arc<Memory>> = [(9, Arc::new(Memory::open(me).unwrap()))].into();
        let pages = 600u64;
        let buf: Vec<u8> = (0..(pages as usize + 1) * page_bytes(1))
            .map(|i| (i / page_bytes(1) * 7 + i % 251) as u8)
            .collect();
        let base = (buf.as_ptr() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        // Every third page, one at a time, and one run long enough to go as it is.
        let mut runs: Vec<PageRun> = (0..pages / 2)
            .step_by(3)
            .map(|i| PageRun {
                pid: 9,
                vaddr: base + i * PAGE_SIZE,
                nr_pages: 1,
            })
            .collect();
        runs.push(PageRun {
            pid: 9,
            vaddr: base + (pages / 2) * PAGE_SIZE,
            nr_pages: 40,
        });
        for compressed in [false, true] {
            let (tx, mut rx) = mpsc::channel(64);
            let (m, r) = (memory.clone(), runs.clone());
            tokio::task::spawn_blocking(move || {
                prepare_bulk(&m, r, LastFault::default(), compressed, &tx);
            })
            .await
            .unwrap();
            let mut wire: Vec<u8> = Vec::new();
            let mut chunks = 0;
            while let Ok(Prepared::Read { chunk, packed }) = rx.try_recv() {
                chunks += 1;
                write_chunk_packed(&mut wire, &chunk, packed.as_deref())
                    .await
                    .unwrap();
            }
            // 100 single pages: one gathered chunk of 100; the long run: one chunk.
            assert_eq!(chunks, 2, "compressed {compressed}");
            let cache = PageCache::default();
            let mut inp = wire.as_slice();
            for _ in 0..chunks {
                cache.insert(read_chunk_packed(&mut inp).await.unwrap());
            }
            assert_eq!(cache.len(), 100 + 40);
            for r in &runs {
                let got = cache.run_from(9, r.vaddr, r.nr_pages);
                let at = usize::try_from(r.vaddr - buf.as_ptr() as u64).unwrap();
                assert_eq!(
                    got,
                    buf[at..at + page_bytes(r.nr_pages)],
                    "at {:#x}",
                    r.vaddr
                );
            }
            assert!(
                cache.run_from(9, base + PAGE_SIZE, 1).is_empty(),
                "a page not pushed is there"
            );
        }
        // Runs out of address order (a stack's pages first) start a new gathered chunk.
        let (tx, mut rx) = mpsc::channel(64);
        let back = vec![
            PageRun {
                pid: 9,
                vaddr: base + 9 * PAGE_SIZE,
                nr_pages: 1,
            },
            PageRun {
                pid: 9,
                vaddr: base,
                nr_pages: 1,
            },
        ];
        let m = memory.clone();
        tokio::task::spawn_blocking(move || {
            prepare_bulk(&m, back, LastFault::default(), true, &tx);
        })
        .await
        .unwrap();
        let mut wire: Vec<u8> = Vec::new();
        while let Ok(Prepared::Read { chunk, packed }) = rx.try_recv() {
            write_chunk_packed(&mut wire, &chunk, packed.as_deref())
                .await
                .unwrap();
        }
        let cache = PageCache::default();
        let mut inp = wire.as_slice();
        while !inp.is_empty() {
            cache.insert(read_chunk_packed(&mut inp).await.unwrap());
        }
        assert_eq!(cache.len(), 2);
        std::hint::black_box(&buf);
    }

    #[tokio::test]
    async fn a_gathered_chunk_out_of_order_is_refused() {
        let chunk = Chunk {
            pid: 1,
            vaddr: 0,
            data: vec![5u8; page_bytes(2)],
            at: vec![0x20_000, 0x10_000],
        };
        let mut wire: Vec<u8> = Vec::new();
        write_chunk_packed(&mut wire, &chunk, None).await.unwrap();
        let e = read_chunk_packed(&mut wire.as_slice()).await.unwrap_err();
        assert!(e.to_string().contains("increasing"), "{e}");
    }

    #[tokio::test]
    async fn no_more_pages_are_kept_than_the_site_can_hold() {
        let mut stream: Vec<u8> = Vec::new();
        for i in 0..3u64 {
            let chunk = Chunk::run(1, 0x10_000 + i * PAGE_SIZE, vec![1u8; page_bytes(1)]);
            write_chunk_packed(&mut stream, &chunk, None).await.unwrap();
        }
        end_prepush(&mut stream).await.unwrap();
        let cache = PageCache::default();
        let e = receive_prepush(&mut stream.as_slice(), &cache, 2, None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("more than 2 pages"), "{e}");
        let cache = PageCache::default();
        assert_eq!(
            receive_prepush(&mut stream.as_slice(), &cache, 3, None)
                .await
                .unwrap(),
            3
        );
    }

    #[tokio::test]
    async fn a_bad_compressed_chunk_is_an_error_not_pages() {
        let head = |pages: u64| {
            let mut h = Vec::new();
            h.extend_from_slice(&7u32.to_be_bytes());
            h.extend_from_slice(&0x1000u64.to_be_bytes());
            h.extend_from_slice(&pages.to_be_bytes());
            h
        };
        // A block longer than its pages.
        let mut long = head(1);
        long.push(BLOCK_RAW);
        long.extend_from_slice(&(page_bytes(1) as u32 + 1).to_be_bytes());
        let e = read_chunk_packed(&mut long.as_slice()).await.unwrap_err();
        assert!(e.to_string().contains("block of"), "{e}");
        // An unknown kind.
        let mut odd = head(1);
        odd.push(9);
        odd.extend_from_slice(&1u32.to_be_bytes());
        odd.push(0);
        let e = read_chunk_packed(&mut odd.as_slice()).await.unwrap_err();
        assert!(e.to_string().contains("unknown block kind 9"), "{e}");
        // zstd that does not unpack to the pages it claims.
        let small = zstd::bulk::compress(&[1u8; 100], 1).unwrap();
        let mut short = head(1);
        short.push(BLOCK_ZSTD);
        short.extend_from_slice(&(small.len() as u32).to_be_bytes());
        short.extend_from_slice(&small);
        let e = read_chunk_packed(&mut short.as_slice()).await.unwrap_err();
        assert!(e.to_string().contains("100 bytes for 1 pages"), "{e}");
    }

    #[tokio::test]
    async fn pages_sent_ahead_are_served_only_after_the_stale_list_and_all_drops_them() {
        let cache = Arc::new(PageCache::held());
        cache.insert(Chunk::run(1, 0x10_000, page(1, 0x10_000)));
        let waiting = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.ready().await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a held cache was served from");
        cache.settle(&Stale::All);
        waiting.await.unwrap().unwrap();
        assert!(
            cache.is_empty(),
            "pages sent ahead were kept when none may be trusted"
        );
    }

    async fn faults_and_bulk(compression: Compression) {
        let (criu, criu_done) = fake_criu().await;
        let (source, at) = PageSource::start(Some(criu), &[]).await.unwrap();
        // Nothing went ahead: none is stale.
        source.set_stale(Stale::Only(Vec::new()));
        let runs = vec![
            PageRun {
                pid: 1,
                vaddr: 0x10_000,
                nr_pages: 12,
            },
            PageRun {
                pid: 2,
                vaddr: 0x40_000,
                nr_pages: 3,
            },
        ];
        let cache = Arc::new(PageCache::default());
        // The daemon's side: a fault for a page of process 2 before the bulk push.
        let daemon_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let daemon_at = daemon_listener.local_addr().unwrap();
        let serving = tokio::spawn(serve_daemon(daemon_listener, at, Arc::clone(&cache)));
        let mut daemon = TcpStream::connect(daemon_at).await.unwrap();
        daemon
            .write_all(&Header::get(2, 0x41_000, 2).encode())
            .await
            .unwrap();
        let mut head = [0u8; HEADER_LEN];
        daemon.read_exact(&mut head).await.unwrap();
        let reply = Header::decode(&head);
        assert_eq!(
            (reply.command(), reply.vaddr, reply.dst_id),
            (6, 0x41_000, 2)
        );
        let mut data = vec![0u8; page_bytes(reply.nr_pages)];
        daemon.read_exact(&mut data).await.unwrap();
        assert_eq!(&data[..page_bytes(1)], page(2, 0x41_000).as_slice());
        let faulted = reply.nr_pages;
        // The bulk push brings every lazy page the fault did not, then ends the lazy dump.
        let pushed = bulk_fetch(at, runs, Arc::clone(&cache), compression, |_| {})
            .await
            .unwrap();
        assert_eq!(pushed.pages + faulted, 15);
        // The fault's pages and the pushed ones, counted; compressed, the (patterned)
        // pages take fewer bytes on the wire than they hold.
        let (sent, wire) = source.bytes_sent();
        assert!(sent >= 15 * PAGE_SIZE, "{sent}");
        match compression {
            Compression::Zstd => assert!(wire < sent, "{wire} of {sent}"),
            Compression::None => assert!(wire > sent, "{wire} of {sent}"),
        }
        assert!(cache.len() >= 15);
        let (gets, closed) = criu_done.await.unwrap();
        assert!(closed, "the lazy dump was not closed");
        assert!(gets >= 5, "{gets} GETs");
        // Later faults are answered from the cache, though the dump is gone.
        daemon
            .write_all(&Header::get(1, 0x10_000, 12).encode())
            .await
            .unwrap();
        daemon.read_exact(&mut head).await.unwrap();
        let reply = Header::decode(&head);
        assert_eq!(reply.nr_pages, 12);
        let mut data = vec![0u8; page_bytes(12)];
        daemon.read_exact(&mut data).await.unwrap();
        for i in 0..12u64 {
            let at = page_bytes(i);
            assert_eq!(
                &data[at..at + page_bytes(1)],
                page(1, 0x10_000 + i * PAGE_SIZE).as_slice()
            );
        }
        daemon.write_all(&Header::close().encode()).await.unwrap();
        let mut ack = [0u8; 4];
        daemon.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack, [0; 4]);
        drop(daemon);
        let stats = serving.await.unwrap().unwrap();
        assert_eq!((stats.gets, stats.misses), (2, 1), "{stats:?}");
        source.stop();
    }
}
