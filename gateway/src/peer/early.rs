//! The receiving half of a tunnel opened without waiting for the peer's `TunnelOpen`:
//! the caller writes at once (its bytes wait in the stream behind the request while the
//! peer connects), and the first read waits for the peer's answer before any byte of the
//! workload's. Saves a round trip on every tunnelled connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use quinn::RecvStream;
use tokio::io::{AsyncRead, ReadBuf};

use super::wire::Response;
use super::{read_response, PeerError};

type Opening = Pin<Box<dyn Future<Output = io::Result<RecvStream>> + Send>>;

pub struct TunnelRecv {
    state: State,
    /// A client tunnel's share of the link's stream credit, held while it lives.
    _credit: Option<tokio::sync::OwnedSemaphorePermit>,
}

enum State {
    /// The peer's answer has not been read yet.
    Opening(Opening),
    Open(RecvStream),
}

impl TunnelRecv {
    /// `recv` is the stream whose first frame is the peer's answer to the tunnel request.
    pub(super) fn new(peer: String, mut recv: RecvStream) -> Self {
        let opening = Box::pin(async move {
            match read_response(&peer, &mut recv).await {
                Ok(Response::TunnelOpen) => Ok(recv),
                Ok(Response::Error { message, .. }) => Err(io::Error::other(
                    PeerError::Refused { peer, message }.to_string(),
                )),
                Ok(other) => Err(io::Error::other(format!(
                    "unexpected answer from {peer} to a tunnel: {other:?}"
                ))),
                Err(e) => Err(io::Error::other(e.to_string())),
            }
        });
        Self {
            state: State::Opening(opening),
            _credit: None,
        }
    }

    /// Holds `credit` (a client tunnel's share of the link) while this stream lives.
    pub(super) fn with_credit(mut self, credit: tokio::sync::OwnedSemaphorePermit) -> Self {
        self._credit = Some(credit);
        self
    }

    /// Waits for the peer's answer: the stream, once the tunnel is open.
    pub async fn opened(self) -> io::Result<RecvStream> {
        match self.state {
            State::Opening(opening) => opening.await,
            State::Open(recv) => Ok(recv),
        }
    }
}

impl AsyncRead for TunnelRecv {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                State::Opening(opening) => {
                    let recv = ready!(opening.as_mut().poll(cx))?;
                    self.state = State::Open(recv);
                }
                State::Open(recv) => return Pin::new(recv).poll_read(cx, buf),
            }
        }
    }
}
