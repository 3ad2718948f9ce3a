//! Image files over the peer link: streamed in chunks, hashed with BLAKE3 on both sides,
//! written under a temporary name and renamed only once the digest matches.

use std::path::{Path, PathBuf};

use quinn::RecvStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::wire::{FileMeta, Request, Response, MAX_FILE};
use super::{finish, read_frame, write_frame, PeerError, PeerLink};
use crate::names;

const CHUNK: usize = 1 << 20;

impl PeerLink {
    /// Streams `path` to `peer` as image file `name` of `migration`; returns its manifest
    /// entry once the peer has verified and stored it.
    pub async fn send_file(
        &self,
        peer: &str,
        migration: &str,
        path: &Path,
    ) -> Result<FileMeta, PeerError> {
        let ferr = |source| PeerError::File {
            path: path.to_path_buf(),
            source,
        };
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let mut file = tokio::fs::File::open(path).await.map_err(ferr)?;
        let size = file.metadata().await.map_err(ferr)?.len();
        let (mut send, mut recv) = self.open(peer).await?;
        write_frame(
            peer,
            &mut send,
            &Request::File {
                migration: migration.to_string(),
                name: name.clone(),
                size,
            },
        )
        .await?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        let mut left = size;
        while left > 0 {
            let want = CHUNK.min(left as usize);
            let n = file.read(&mut buf[..want]).await.map_err(ferr)?;
            if n == 0 {
                return Err(ferr(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank while it was sent",
                )));
            }
            hasher.update(&buf[..n]);
            send.write_all(&buf[..n])
                .await
                .map_err(|e| PeerError::Link {
                    peer: peer.to_string(),
                    detail: e.to_string(),
                })?;
            left -= n as u64;
        }
        let digest = hasher.finalize();
        send.write_all(digest.as_bytes())
            .await
            .map_err(|e| PeerError::Link {
                peer: peer.to_string(),
                detail: e.to_string(),
            })?;
        finish(peer, &mut send)?;
        match read_frame::<Response>(peer, &mut recv).await? {
            Response::Stored { blake3, .. } if blake3 == digest.to_hex().as_str() => {
                Ok(FileMeta { name, size, blake3 })
            }
            Response::Error { code, message } => Err(PeerError::Link {
                peer: peer.to_string(),
                detail: format!("peer refused image file {name} ({code:?}): {message}"),
            }),
            other => Err(PeerError::Protocol {
                peer: peer.to_string(),
                detail: format!("unexpected answer to a file: {other:?}"),
            }),
        }
    }
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

/// Receives one file announced as `name`/`size` into `dir`, verifying its digest.
pub async fn receive(
    dir: &Path,
    name: &str,
    size: u64,
    body: &mut RecvStream,
) -> Result<FileMeta, ReceiveError> {
    names::validate_file_name(name)?;
    if size > MAX_FILE {
        return Err(ReceiveError::TooLarge(size));
    }
    let final_path = dir.join(name);
    let part = dir.join(format!("{name}.part"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReceiveError::Io { path, source }
    };
    let mut out = tokio::fs::File::create(&part).await.map_err(io(&part))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let want = CHUNK.min(left as usize);
        let n = match body.read(&mut buf[..want]).await {
            Ok(Some(n)) => n,
            Ok(None) => return Err(ReceiveError::Stream(format!("{left} bytes missing"))),
            Err(e) => return Err(ReceiveError::Stream(e.to_string())),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).await.map_err(io(&part))?;
        left -= n as u64;
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
        size,
        blake3: actual.to_hex().to_string(),
    })
}
