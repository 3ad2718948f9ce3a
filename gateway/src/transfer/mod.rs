//! Image transfer: how a checkpoint's files get from one site's image directory to the
//! other's, over any byte channel. Files that the checkpoint is still writing (page
//! images) travel while they grow; the rest follow once it is done, largest first, a
//! bounded number at a time; each is framed ([`codec`]), compressed per link, and
//! verified with BLAKE3 against the [`manifest`] before the destination restores.
//!
//! The peer link provides the channel ([`Channel`]); the migration engine decides when
//! to send. Post-copy page streaming belongs here too.

pub mod codec;
pub mod manifest;
pub mod order;
pub mod pages;

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::AsyncWrite;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

pub use codec::{receive, Compression, Held, HeldSet, ReceiveError};
pub use manifest::FileMeta;

/// Files up to this size travel without waiting for one of the `parallel` slots.
const SMALL_FILE_BYTES: u64 = 64 * 1024;
/// Small files in flight at once (streams of the peer link's allowance).
const SMALL_FILES_AT_ONCE: usize = 32;

/// How often the image directory is listed for new files while the checkpoint runs.
const DIR_POLL: Duration = Duration::from_millis(5);

#[derive(Debug, Error)]
pub enum TransferError {
    #[error("cannot read image file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list the image directory {path}: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sending image file {file} failed: {source}")]
    Link {
        file: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the destination refused image file {file}: {detail}")]
    Refused { file: String, detail: String },
    #[error("the destination stored image file {file} with digest {got}, not {sent}")]
    Digest {
        file: String,
        sent: String,
        got: String,
    },
    #[error("a send task ended abnormally: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// One image file as its sender announces it.
#[derive(Debug, Clone)]
pub struct Announce {
    pub name: String,
    /// None for a file that is still growing (its size follows its last block).
    pub size: Option<u64>,
    pub compression: Compression,
}

/// Where image files go: one stream per file. The peer link implements it.
pub trait Channel: Send + Sync + 'static {
    type Stream: AsyncWrite + Unpin + Send;

    /// How files travel on this channel.
    fn compression(&self) -> Compression;

    /// The page blocks the receiver holds: pages of a growing page image among them go
    /// as their digests. None: every page goes whole.
    fn held(&self) -> Option<Arc<HeldSet>> {
        None
    }

    /// Where the transfer's progress is counted, if anywhere.
    fn progress(&self) -> Option<Arc<Progress>> {
        None
    }

    /// Opens a stream for one file and announces it.
    fn open(
        &self,
        file: &Announce,
    ) -> impl Future<Output = Result<Self::Stream, TransferError>> + Send;

    /// Ends a file's stream and returns the BLAKE3 digest (hex) the receiver stored.
    fn close(
        &self,
        file: &str,
        stream: Self::Stream,
    ) -> impl Future<Output = Result<String, TransferError>> + Send;
}

/// What an image transfer has done so far, for live progress.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes put on the channel's streams (framing and compression included).
    pub wire: std::sync::atomic::AtomicU64,
    /// Bytes of the image's files read and sent (before compression).
    pub read: std::sync::atomic::AtomicU64,
}

/// A file being sent, or its stream: what is read of the file counts into
/// [`Progress::read`], what is written on the stream into [`Progress::wire`].
struct Counted<T> {
    inner: T,
    progress: Option<Arc<Progress>>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (std::task::Poll::Ready(Ok(())), Some(p)) = (&polled, &this.progress) {
            let n = (buf.filled().len() - before) as u64;
            p.read.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Counted<W> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let (std::task::Poll::Ready(Ok(n)), Some(p)) = (&written, &this.progress) {
            p.wire
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        written
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A file the receiver verified and stored, and what it cost on the wire.
#[derive(Debug, Clone)]
pub struct Sent {
    pub meta: FileMeta,
    pub wire_bytes: u64,
    /// Bytes of the file that went as digests of blocks the receiver holds.
    pub deduped: u64,
}

/// What an image directory holds and how to send it.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Files written front to back while the checkpoint runs: they travel as they grow.
    pub grows: fn(&str) -> bool,
    /// Files that are not part of the image (logs): never sent.
    pub local_only: fn(&str) -> bool,
    /// Files in flight at once.
    pub parallel: usize,
}

/// Sends a whole file, or one still being written (it ends at the first end of file
/// after `done` turns true); returns it as the receiver verified it.
pub async fn send_file<C: Channel>(
    channel: &C,
    path: &Path,
    growing: Option<watch::Receiver<bool>>,
) -> Result<Sent, TransferError> {
    let read = |source| TransferError::Read {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let compression = channel.compression();
    let file = tokio::fs::File::open(path).await.map_err(read)?;
    let size = match growing {
        Some(_) => None,
        None => Some(file.metadata().await.map_err(read)?.len()),
    };
    let progress = channel.progress();
    let mut file = Counted {
        inner: file,
        progress: progress.clone(),
    };
    let mut stream = Counted {
        inner: channel
            .open(&Announce {
                name: name.clone(),
                size,
                compression,
            })
            .await?,
        progress,
    };
    let written = match (growing, size) {
        (Some(done), _) => {
            let held = channel.held();
            codec::write_growing(&mut file, done, compression, held, &mut stream).await
        }
        (None, size) => {
            codec::write_body(&mut file, size.unwrap_or(0), compression, &mut stream).await
        }
    };
    let written = written.map_err(|e| match e {
        codec::BodyError::Read(source) => read(source),
        codec::BodyError::Write(source) => TransferError::Link {
            file: name.clone(),
            source: Box::new(source),
        },
    })?;
    let stored = channel.close(&name, stream.inner).await?;
    let blake3 = written.digest.to_hex().to_string();
    if stored != blake3 {
        return Err(TransferError::Digest {
            file: name,
            sent: blake3,
            got: stored,
        });
    }
    Ok(Sent {
        meta: FileMeta {
            name,
            size: written.size,
            blake3,
        },
        wire_bytes: written.wire,
        deduped: written.deduped,
    })
}

/// Sends the image in `dir` while a checkpoint writes it: growing files as soon as they
/// appear, everything else once `dumped` turns true (largest first), at most
/// `layout.parallel` files at a time. Returns every file as the receiver verified it.
pub async fn send_image<C: Channel>(
    channel: Arc<C>,
    dir: &Path,
    layout: Layout,
    mut dumped: watch::Receiver<bool>,
) -> Result<Vec<Sent>, TransferError> {
    let permits = Arc::new(Semaphore::new(layout.parallel.max(1)));
    // Small files cost a round trip each, not bandwidth: they go at once, on their own
    // (larger) allowance, so the last ones of a checkpoint do not queue behind each other.
    let small_permits = Arc::new(Semaphore::new(SMALL_FILES_AT_ONCE));
    let mut started = HashSet::new();
    let mut set = JoinSet::new();
    let spawn = |set: &mut JoinSet<Result<Sent, TransferError>>,
                 path: PathBuf,
                 growing: Option<watch::Receiver<bool>>| {
        let small = growing.is_none() && path.metadata().is_ok_and(|m| m.len() <= SMALL_FILE_BYTES);
        let permits = Arc::clone(if small { &small_permits } else { &permits });
        let channel = Arc::clone(&channel);
        set.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let grew = growing.is_some();
            let sent = send_file(&*channel, &path, growing).await?;
            if grew {
                tracing::info!(
                    file = %sent.meta.name,
                    bytes = sent.meta.size,
                    wire_bytes = sent.wire_bytes,
                    "page image streamed while the checkpoint wrote it"
                );
            }
            Ok(sent)
        });
    };
    loop {
        // Seen before listing: once the checkpoint is over, this listing is complete.
        let finished = *dumped.borrow_and_update();
        for (name, path) in list(dir)? {
            if (layout.grows)(&name) && started.insert(name) {
                spawn(&mut set, path, Some(dumped.clone()));
            }
        }
        if finished {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(DIR_POLL) => {}
            _ = dumped.changed() => {}
        }
    }
    let mut rest: Vec<(u64, PathBuf)> = list(dir)?
        .into_iter()
        .filter(|(name, _)| !started.contains(name) && !(layout.local_only)(name))
        .map(|(_, p)| (p.metadata().map_or(0, |m| m.len()), p))
        .collect();
    // Largest first, so the long transfers start at once.
    rest.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
    for (_, path) in rest {
        spawn(&mut set, path, None);
    }
    let mut sent: Vec<Sent> = Vec::new();
    // The first failure ends the transfer; dropping the set cancels the other sends.
    while let Some(done) = set.join_next().await {
        sent.push(done??);
    }
    Ok(sent)
}

/// The regular files of `dir`, by name.
fn list(dir: &Path) -> Result<Vec<(String, PathBuf)>, TransferError> {
    let entries = std::fs::read_dir(dir).map_err(|source| TransferError::List {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use tokio::io::{AsyncWriteExt, DuplexStream};
    use tokio::sync::oneshot;

    use super::*;

    type Verdict = oneshot::Receiver<Result<FileMeta, ReceiveError>>;

    /// Receives into a local directory through an in-memory pipe per file, counting how
    /// many files are open at once.
    struct DirChannel {
        dir: PathBuf,
        open: AtomicUsize,
        most: AtomicUsize,
        verdicts: Mutex<Vec<(String, Verdict)>>,
        refuse: Option<&'static str>,
    }

    impl DirChannel {
        fn new(dir: PathBuf) -> Self {
            std::fs::create_dir_all(&dir).expect("dir");
            Self {
                dir,
                open: AtomicUsize::new(0),
                most: AtomicUsize::new(0),
                verdicts: Mutex::new(Vec::new()),
                refuse: None,
            }
        }
    }

    impl Channel for DirChannel {
        type Stream = DuplexStream;

        fn compression(&self) -> Compression {
            Compression::Zstd
        }

        async fn open(&self, file: &Announce) -> Result<DuplexStream, TransferError> {
            let now = self.open.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            let (tx, mut rx) = tokio::io::duplex(64 << 10);
            let (done, verdict) = oneshot::channel();
            let (dir, a) = (self.dir.clone(), file.clone());
            tokio::spawn(async move {
                let r = receive(&dir, &a.name, a.size, a.compression, None, &mut rx).await;
                let _ = done.send(r);
            });
            self.verdicts
                .lock()
                .expect("lock")
                .push((file.name.clone(), verdict));
            Ok(tx)
        }

        async fn close(
            &self,
            file: &str,
            mut stream: DuplexStream,
        ) -> Result<String, TransferError> {
            stream.shutdown().await.map_err(|e| TransferError::Link {
                file: file.into(),
                source: Box::new(e),
            })?;
            let verdict = {
                let mut v = self.verdicts.lock().expect("lock");
                let i = v.iter().position(|(n, _)| n == file).expect("opened");
                v.remove(i).1
            };
            self.open.fetch_sub(1, Ordering::SeqCst);
            if self.refuse == Some(file) {
                return Err(TransferError::Refused {
                    file: file.into(),
                    detail: "no room".into(),
                });
            }
            match verdict.await.expect("receiver ran") {
                Ok(meta) => Ok(meta.blake3),
                Err(e) => Err(TransferError::Refused {
                    file: file.into(),
                    detail: e.to_string(),
                }),
            }
        }
    }

    fn layout(parallel: usize) -> Layout {
        Layout {
            grows: |n| n.starts_with("pages-"),
            local_only: |n| n.ends_with(".log"),
            parallel,
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-transfer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("out")).expect("dir");
        d
    }

    #[tokio::test]
    async fn an_image_arrives_whole_while_it_is_written_and_logs_stay() {
        let d = scratch("whole");
        let (out, inn) = (d.join("out"), d.join("in"));
        let channel = Arc::new(DirChannel::new(inn.clone()));
        let (dumped, dumping) = watch::channel(false);
        let sending = tokio::spawn({
            let (channel, out) = (Arc::clone(&channel), out.clone());
            async move { send_image(channel, &out, layout(4), dumping).await }
        });
        // The "dump": a page file that grows, then the small files, then the log.
        let pages: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        for piece in pages.chunks(700_000) {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(out.join("pages-1.img"))
                .expect("open");
            f.write_all(piece).expect("write");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::write(out.join("core-1.img"), b"core").expect("write");
        std::fs::write(out.join("dump.log"), b"log").expect("write");
        dumped.send(true).expect("send");
        let sent = sending.await.expect("task").expect("sent");
        let mut names: Vec<&str> = sent.iter().map(|s| s.meta.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["core-1.img", "pages-1.img"]);
        assert_eq!(
            std::fs::read(inn.join("pages-1.img")).expect("pages"),
            pages
        );
        assert!(!inn.join("dump.log").exists());
        std::fs::remove_dir_all(d).expect("cleanup");
    }

    #[tokio::test]
    async fn no_more_files_travel_at_once_than_the_limit() {
        let d = scratch("parallel");
        let out = d.join("out");
        for i in 0..9 {
            std::fs::write(out.join(format!("f{i}.img")), vec![i as u8; 300_000]).expect("write");
        }
        let channel = Arc::new(DirChannel::new(d.join("in")));
        let (_dumped, dumping) = watch::channel(true);
        let sent = send_image(Arc::clone(&channel), &out, layout(2), dumping)
            .await
            .expect("sent");
        assert_eq!(sent.len(), 9);
        let most = channel.most.load(Ordering::SeqCst);
        assert!((1..=2).contains(&most), "{most} files in flight at once");
        std::fs::remove_dir_all(d).expect("cleanup");
    }

    #[tokio::test]
    async fn a_refused_file_fails_the_transfer() {
        let d = scratch("refused");
        let out = d.join("out");
        std::fs::write(out.join("a.img"), b"a").expect("write");
        std::fs::write(out.join("b.img"), b"b").expect("write");
        let mut channel = DirChannel::new(d.join("in"));
        channel.refuse = Some("b.img");
        let (_dumped, dumping) = watch::channel(true);
        let err = send_image(Arc::new(channel), &out, layout(4), dumping)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, TransferError::Refused { file, .. } if file == "b.img"),
            "{err}"
        );
        std::fs::remove_dir_all(d).expect("cleanup");
    }
}
