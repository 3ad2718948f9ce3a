//! Image files on the peer link: one bidirectional stream per file, announced with a
//! `File` request, answered with the digest the destination stored. The framing and
//! verification are the transfer module's; this is only the channel.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::{RecvStream, SendStream};
use tokio::io::AsyncWrite;

use super::wire::{Request, Response};
use super::{finish, read_frame, write_frame, PeerError, PeerLink};
use crate::transfer::{Announce, Channel, Compression, HeldSet, Progress, TransferError};

/// The image files of one migration, going to one peer.
pub struct PeerFiles {
    link: Arc<PeerLink>,
    peer: String,
    migration: String,
    compression: Compression,
    held: Option<Arc<HeldSet>>,
    /// Live progress: bytes read of the files and written on their streams.
    progress: Option<Arc<Progress>>,
}

impl PeerFiles {
    /// Pages among `held` (blocks the peer holds) go as their digests.
    pub fn with_held(mut self, held: Option<Arc<HeldSet>>) -> Self {
        self.held = held;
        self
    }

    /// What the files' transfer reads and writes is counted into `progress`.
    pub fn with_progress(mut self, progress: Arc<Progress>) -> Self {
        self.progress = Some(progress);
        self
    }
}

impl PeerLink {
    /// A channel for `migration`'s image files to `peer`, framed as the peer's configured
    /// compression says.
    pub fn files(self: &Arc<Self>, peer: &str, migration: &str) -> Result<PeerFiles, PeerError> {
        Ok(PeerFiles {
            compression: self.peer_config(peer)?.compression,
            link: Arc::clone(self),
            peer: peer.to_string(),
            migration: migration.to_string(),
            held: None,
            progress: None,
        })
    }
}

/// One file's stream: bytes go out on `send`; the verdict comes back on `recv`.
pub struct FileStream {
    send: SendStream,
    recv: RecvStream,
}

impl AsyncWrite for FileStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.get_mut().send), cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().send), cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.get_mut().send), cx)
    }
}

fn link_error(file: &str, e: PeerError) -> TransferError {
    TransferError::Link {
        file: file.to_string(),
        source: Box::new(e),
    }
}

impl Channel for PeerFiles {
    type Stream = FileStream;

    fn compression(&self) -> Compression {
        self.compression
    }

    fn held(&self) -> Option<Arc<HeldSet>> {
        self.held.clone()
    }

    fn progress(&self) -> Option<Arc<Progress>> {
        self.progress.clone()
    }

    async fn open(&self, file: &Announce) -> Result<FileStream, TransferError> {
        let (mut send, recv) = self
            .link
            .open(&self.peer)
            .await
            .map_err(|e| link_error(&file.name, e))?;
        write_frame(
            &self.peer,
            &mut send,
            &Request::File {
                migration: self.migration.clone(),
                name: file.name.clone(),
                size: file.size.unwrap_or(0),
                compression: file.compression,
                growing: file.size.is_none(),
            },
        )
        .await
        .map_err(|e| link_error(&file.name, e))?;
        Ok(FileStream { send, recv })
    }

    async fn close(&self, file: &str, mut stream: FileStream) -> Result<String, TransferError> {
        finish(&self.peer, &mut stream.send).map_err(|e| link_error(file, e))?;
        match read_frame::<Response>(&self.peer, &mut stream.recv)
            .await
            .map_err(|e| link_error(file, e))?
        {
            Response::Stored { blake3, .. } => Ok(blake3),
            Response::Error { code, message } => Err(TransferError::Refused {
                file: file.to_string(),
                detail: format!("{message} ({code:?})"),
            }),
            other => Err(link_error(
                file,
                PeerError::Protocol {
                    peer: self.peer.clone(),
                    detail: format!("unexpected answer to a file: {other:?}"),
                },
            )),
        }
    }
}
