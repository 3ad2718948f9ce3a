//! The peer link: one mutually authenticated QUIC endpoint per site. It dials configured
//! peers (pinning their certificate fingerprints), accepts only configured peers, and
//! carries one request per bidirectional stream: migration requests go to a [`Handler`]
//! (the migration engine), tunnels to a [`TunnelServer`] (the ingress).

mod early;
pub mod files;
pub mod wire;

pub use early::TunnelRecv;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use quinn::{RecvStream, SendStream};
use thiserror::Error;
use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{PeerConfig, SiteConfig};
use crate::identity::{self, Fingerprint, Identity, IdentityError};
use wire::{CloseCode, ErrorCode, Request, Response, ALPN, MAX_HEADER};

#[derive(Debug, Error)]
pub enum PeerError {
    #[error("site {0:?} is not a configured peer; add it to [[peers]] in site.toml")]
    UnknownPeer(String),
    #[error("cannot bind the peer link on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] IdentityError),
    #[error("QUIC TLS setup: {0}")]
    Quic(String),
    #[error("cannot reach peer {peer} at {addr}: {detail}")]
    Connect {
        peer: String,
        addr: SocketAddr,
        detail: String,
    },
    #[error("link to peer {peer} failed: {detail}")]
    Link { peer: String, detail: String },
    #[error("peer {peer} refused: {message}")]
    Refused { peer: String, message: String },
    #[error("peer {peer} sent an invalid message: {detail}")]
    Protocol { peer: String, detail: String },
    #[error("local file {path}: {source}")]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The bytes that follow a request's header (an image file's body).
pub type Body<'a> = &'a mut (dyn AsyncRead + Unpin + Send);

/// Serves migration requests arriving from peers.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        peer: String,
        req: Request,
        body: Body<'_>,
    ) -> impl Future<Output = Response> + Send;
}

/// What a tunnel reaches at the far end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelTarget {
    /// A client of `workload` (its port), wherever it runs now.
    Workload(String),
    /// `port` of the workload that `migration` moves (a replica following its source).
    Migration {
        migration: String,
        workload: String,
        port: u16,
    },
    /// The page server of `migration`'s frozen source (post-copy); `urgent` for pages a
    /// fault waits for, whose stream is sent ahead of every other on the link.
    Pages {
        migration: String,
        workload: String,
        urgent: bool,
    },
}

/// Serves the far end of tunnels: a connection to the workload here.
pub trait TunnelServer: Send + Sync + 'static {
    /// The local end of a tunnel arriving through `peer`, or why there is none.
    fn connect(
        &self,
        peer: &str,
        target: &TunnelTarget,
    ) -> impl Future<Output = Result<tokio::net::TcpStream, String>> + Send;
}

pub struct PeerLink {
    site: String,
    endpoint: quinn::Endpoint,
    identity: Arc<Identity>,
    peers: Vec<PeerConfig>,
    transport: Arc<quinn::TransportConfig>,
    connections: DashMap<String, quinn::Connection>,
    /// Per peer: the streams clients' tunnels may hold (all but [`CONTROL_STREAMS`]).
    client_credit: DashMap<String, Arc<tokio::sync::Semaphore>>,
    tasks: TaskTracker,
}

/// Stream priority of urgent page tunnels: their data leaves before any other stream's.
const URGENT: i32 = 100;
/// Stream priority of bulk page tunnels: behind clients' traffic and everything else.
const BULK: i32 = -10;
/// Stream priority of data that goes beside a frozen workload's image but is not needed
/// before its restore starts (post-copy's stale pages): behind the image and clients'
/// traffic (priority 0), ahead of bulk pages.
pub const BESIDE_IMAGE: i32 = -5;

/// Streams a peer may have open at once on the link.
const MAX_STREAMS: u32 = 4096;
/// Streams kept for the migrations' own traffic (requests, image files, page and
/// replication tunnels): clients' tunnels never take them, so however many clients a
/// route forwards, a Prepare or a Status still gets through.
const CONTROL_STREAMS: u32 = 256;

/// Socket buffer size for the UDP socket: the kernel default drops packets at 1 Gbit/s.
const UDP_BUFFER: usize = 16 << 20;

fn transport(initial_window: u64) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Windows sized for 1 Gbit/s at up to ~100 ms round trip.
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20))
        .receive_window(quinn::VarInt::from_u32(64 << 20))
        .send_window(64 << 20)
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_STREAMS))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .keep_alive_interval(Some(Duration::from_secs(2)));
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(initial_window);
    t.congestion_controller_factory(Arc::new(cubic));
    // A dead peer is noticed within 10 s; keep-alives keep a quiet healthy link open.
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(10)) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// What a peer connection has put on the wire (UDP payload bytes, its packets' headers
/// included), its round-trip time as measured now (with the queues on the way) and the
/// least it measured (without them).
#[derive(Debug, Clone, Copy)]
pub struct LinkSent {
    pub bytes: u64,
    pub rtt: Duration,
    pub min_rtt: Duration,
}

impl LinkSent {
    /// How long what is sent now waits in the queues on the way (the bottleneck's).
    pub fn queued(&self) -> Duration {
        self.rtt.saturating_sub(self.min_rtt)
    }
}

impl PeerLink {
    /// Binds the peer endpoint. Only the configured peers' certificates are accepted.
    pub fn bind(cfg: &SiteConfig, identity: Arc<Identity>) -> Result<Arc<Self>, PeerError> {
        let allowed: Vec<Fingerprint> = cfg.peers.iter().map(|p| p.fingerprint).collect();
        let tls = identity::server_config(&identity, Some(allowed), ALPN)?;
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| PeerError::Quic(e.to_string()))?;
        let transport = Arc::new(transport(cfg.peer.initial_window_bytes));
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        server.transport_config(Arc::clone(&transport));
        let addr = cfg.peer.listen;
        let socket = crate::sys::net::udp_socket_with_buffers(addr, UDP_BUFFER)
            .map_err(|source| PeerError::Bind { addr, source })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| PeerError::Bind { addr, source })?;
        Ok(Arc::new(Self {
            site: cfg.name.clone(),
            endpoint,
            identity,
            peers: cfg.peers.clone(),
            transport,
            connections: DashMap::new(),
            client_credit: DashMap::new(),
            tasks: TaskTracker::new(),
        }))
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    pub fn peers(&self) -> &[PeerConfig] {
        &self.peers
    }

    fn peer_config(&self, name: &str) -> Result<&PeerConfig, PeerError> {
        self.peers
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| PeerError::UnknownPeer(name.to_string()))
    }

    /// How bulk data to and from `peer` is framed (its `compression` in the site config;
    /// the default for a peer not configured).
    pub fn compression(&self, peer: &str) -> crate::transfer::Compression {
        self.peer_config(peer)
            .map(|p| p.compression)
            .unwrap_or_default()
    }

    /// The round-trip time QUIC measures on the live connection to `peer`, if any.
    pub fn rtt(&self, peer: &str) -> Option<Duration> {
        self.live(peer).map(|c| c.rtt())
    }

    /// The connection to `peer` if it is open (none is dialled).
    fn live(&self, peer: &str) -> Option<quinn::Connection> {
        self.connections
            .get(peer)
            .filter(|c| c.close_reason().is_none())
            .map(|c| c.clone())
    }

    /// What the live connection to `peer` has sent so far, if there is one.
    pub fn sent(&self, peer: &str) -> Option<LinkSent> {
        self.live(peer).map(|c| {
            let stats = c.stats();
            LinkSent {
                bytes: stats.udp_tx.bytes,
                rtt: stats.path.rtt,
                min_rtt: stats.path.min_rtt,
            }
        })
    }

    /// Measures the link to `peer`: sends `bytes` bytes (a `Measure`), and from the
    /// answer's time and the peer's clock derives the rate and the clock skew.
    pub async fn measure(&self, peer: &str, bytes: u64) -> Result<LinkMeasure, PeerError> {
        let bytes = bytes.min(wire::MAX_MEASURE);
        // One round trip first: the QUIC connection is up and its RTT known.
        self.request(peer, &Request::Hello).await?;
        let rtt = self.rtt(peer).unwrap_or_default();
        let started = std::time::Instant::now();
        let mut req = self
            .request_with_body(peer, &Request::Measure { bytes })
            .await?;
        let chunk = vec![0x5au8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
            req.body()
                .write_all(&chunk[..n])
                .await
                .map_err(|e| PeerError::Link {
                    peer: peer.to_string(),
                    detail: e.to_string(),
                })?;
            left -= n as u64;
        }
        let answer = req.response().await?;
        let took = started.elapsed();
        let now = crate::spec::now_ms();
        match answer {
            Response::Measured {
                bytes: got,
                unix_ms,
            } if got == bytes => {
                // The peer read its clock about half a round trip before the answer came.
                let half = i64::try_from(rtt.as_millis() / 2).unwrap_or(0);
                let local = i64::try_from(now).unwrap_or(i64::MAX) - half;
                let skew_ms = i64::try_from(unix_ms).unwrap_or(i64::MAX) - local;
                let secs = took.saturating_sub(rtt).as_secs_f64().max(1e-6);
                Ok(LinkMeasure {
                    rtt_ms: rtt.as_secs_f64() * 1000.0,
                    mbit_s: bytes as f64 * 8.0 / secs / 1e6,
                    skew_ms,
                    bytes,
                })
            }
            other => Err(PeerError::Protocol {
                peer: peer.to_string(),
                detail: format!("unexpected answer to a link check: {other:?}"),
            }),
        }
    }

    /// The live connection to `peer`, dialled if needed.
    pub async fn connection(&self, peer: &str) -> Result<quinn::Connection, PeerError> {
        if let Some(c) = self.live(peer) {
            return Ok(c);
        }
        let pc = self.peer_config(peer)?;
        let tls = identity::client_config(pc.fingerprint, Some(&self.identity), ALPN)?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| PeerError::Quic(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        client.transport_config(Arc::clone(&self.transport));
        let connect_err = |detail: String| PeerError::Connect {
            peer: peer.to_string(),
            addr: pc.address,
            detail,
        };
        let connecting = self
            .endpoint
            .connect_with(client, pc.address, "ferry-peer")
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .map_err(|_| connect_err("no answer within 10 s".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        tracing::debug!(peer, addr = %pc.address, "peer link established");
        self.connections.insert(peer.to_string(), conn.clone());
        Ok(conn)
    }

    /// Sends one request and waits for its response.
    pub async fn request(&self, peer: &str, req: &Request) -> Result<Response, PeerError> {
        let (mut send, mut recv) = self.open(peer).await?;
        write_frame(peer, &mut send, req).await?;
        finish(peer, &mut send)?;
        read_response(peer, &mut recv).await
    }

    /// Sends a request whose body follows it: the caller writes the body to
    /// [`BodyRequest::body`], then [`BodyRequest::response`] ends it and reads the answer.
    pub async fn request_with_body(
        &self,
        peer: &str,
        req: &Request,
    ) -> Result<BodyRequest, PeerError> {
        let (mut send, recv) = self.open(peer).await?;
        write_frame(peer, &mut send, req).await?;
        Ok(BodyRequest {
            peer: peer.to_string(),
            send,
            recv,
        })
    }

    /// Opens a tunnel to `target` at `peer`: after the peer's `TunnelOpen` the streams
    /// are a raw byte pipe to the workload's port there.
    pub async fn open_tunnel(
        &self,
        peer: &str,
        target: &TunnelTarget,
    ) -> Result<(RecvStream, SendStream), PeerError> {
        let (recv, send) = self.open_tunnel_early(peer, target).await?;
        let recv = recv.opened().await.map_err(|e| PeerError::Refused {
            peer: peer.to_string(),
            message: e.to_string(),
        })?;
        Ok((recv, send))
    }

    /// Opens a tunnel without waiting for the peer's answer: bytes written at once follow
    /// the request; the first read waits for the answer (a refusal is a read error).
    pub async fn open_tunnel_early(
        &self,
        peer: &str,
        target: &TunnelTarget,
    ) -> Result<(TunnelRecv, SendStream), PeerError> {
        // A client's tunnel waits for a share of the clients' credit first.
        let credit = match target {
            TunnelTarget::Workload(_) => {
                let credit = self
                    .client_credit
                    .entry(peer.to_string())
                    .or_insert_with(|| {
                        Arc::new(tokio::sync::Semaphore::new(
                            (MAX_STREAMS - CONTROL_STREAMS) as usize,
                        ))
                    })
                    .clone();
                Some(credit.acquire_owned().await.map_err(|_| PeerError::Link {
                    peer: peer.to_string(),
                    detail: "the link is closing".into(),
                })?)
            }
            _ => None,
        };
        let (mut send, recv) = self.open(peer).await?;
        let req = match target.clone() {
            TunnelTarget::Workload(workload) => Request::Tunnel {
                workload,
                migration: None,
                port: None,
                pages: false,
                urgent: false,
            },
            TunnelTarget::Migration {
                migration,
                workload,
                port,
            } => Request::Tunnel {
                workload,
                migration: Some(migration),
                port: Some(port),
                pages: false,
                urgent: false,
            },
            TunnelTarget::Pages {
                migration,
                workload,
                urgent,
            } => Request::Tunnel {
                workload,
                migration: Some(migration),
                port: None,
                pages: true,
                urgent,
            },
        };
        if let TunnelTarget::Pages { urgent, .. } = target {
            let _ = send.set_priority(if *urgent { URGENT } else { BULK });
        }
        write_frame(peer, &mut send, &req).await?;
        let recv = TunnelRecv::new(peer.to_string(), recv);
        Ok((
            match credit {
                Some(c) => recv.with_credit(c),
                None => recv,
            },
            send,
        ))
    }

    /// Sends `req` on a stream of its own and returns the stream, for a body to follow;
    /// [`Self::answer`] ends it and reads the peer's answer.
    pub async fn open_request(
        &self,
        peer: &str,
        req: &Request,
    ) -> Result<(SendStream, RecvStream), PeerError> {
        let (mut send, recv) = self.open(peer).await?;
        write_frame(peer, &mut send, req).await?;
        Ok((send, recv))
    }

    /// Ends a request's body and reads the answer.
    pub async fn answer(
        &self,
        peer: &str,
        mut send: SendStream,
        mut recv: RecvStream,
    ) -> Result<Response, PeerError> {
        finish(peer, &mut send)?;
        read_response(peer, &mut recv).await
    }

    pub(crate) async fn open(&self, peer: &str) -> Result<(SendStream, RecvStream), PeerError> {
        let conn = self.connection(peer).await?;
        conn.open_bi().await.map_err(|e| PeerError::Link {
            peer: peer.to_string(),
            detail: e.to_string(),
        })
    }

    /// Accepts peers until `cancel` fires; each connection and each stream is a task.
    pub async fn serve<H: Handler, T: TunnelServer>(
        self: Arc<Self>,
        handler: Arc<H>,
        tunnels: Arc<T>,
        cancel: CancellationToken,
    ) {
        loop {
            let incoming = tokio::select! {
                _ = cancel.cancelled() => break,
                i = self.endpoint.accept() => match i { Some(i) => i, None => break },
            };
            let this = Arc::clone(&self);
            let handler = Arc::clone(&handler);
            let tunnels = Arc::clone(&tunnels);
            let cancel = cancel.clone();
            let remote = incoming.remote_address();
            self.tasks.spawn(
                async move {
                    let conn = match incoming.await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "peer handshake failed");
                            return;
                        }
                    };
                    let Some(peer) = this.identify(&conn) else {
                        conn.close(
                            quinn::VarInt::from_u32(CloseCode::Protocol as u32),
                            b"unknown peer",
                        );
                        return;
                    };
                    tracing::debug!(peer, "peer connected");
                    this.serve_connection(peer, conn, handler, tunnels, cancel)
                        .await;
                }
                .instrument(tracing::info_span!("peer_conn", %remote)),
            );
        }
        // The endpoint stays open: migrations still draining at shutdown use their
        // connections to finish or to tell the peer they rolled back; `shutdown` closes it.
    }

    fn identify(&self, conn: &quinn::Connection) -> Option<String> {
        let certs = conn
            .peer_identity()?
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()?;
        let fp = Fingerprint::of(certs.first()?);
        self.peers
            .iter()
            .find(|p| p.fingerprint == fp)
            .map(|p| p.name.clone())
    }

    async fn serve_connection<H: Handler, T: TunnelServer>(
        &self,
        peer: String,
        conn: quinn::Connection,
        handler: Arc<H>,
        tunnels: Arc<T>,
        cancel: CancellationToken,
    ) {
        loop {
            let (mut send, mut recv) = tokio::select! {
                _ = cancel.cancelled() => return,
                s = conn.accept_bi() => match s {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(peer, reason = %e, "peer connection closed");
                        return;
                    }
                },
            };
            let handler = Arc::clone(&handler);
            let tunnels = Arc::clone(&tunnels);
            let peer = peer.clone();
            let site = self.site.clone();
            self.tasks.spawn(
                async move {
                    let response = match read_frame::<Request>(&peer, &mut recv).await {
                        Ok(Request::Hello) => Response::Hello {
                            site,
                            version: crate::VERSION.to_string(),
                        },
                        Ok(Request::Measure { bytes }) => measured(&mut recv, bytes).await,
                        Ok(Request::Tunnel {
                            workload,
                            migration,
                            port,
                            pages,
                            urgent,
                        }) => {
                            if pages {
                                let _ = send.set_priority(if urgent { URGENT } else { BULK });
                            }
                            let target = match (migration, port, pages) {
                                (Some(migration), _, true) => TunnelTarget::Pages {
                                    migration,
                                    workload,
                                    urgent,
                                },
                                (Some(migration), Some(port), false) => TunnelTarget::Migration {
                                    migration,
                                    workload,
                                    port,
                                },
                                _ => TunnelTarget::Workload(workload),
                            };
                            match tunnels.connect(&peer, &target).await {
                                Ok(tcp) => return pipe(&peer, tcp, send, recv).await,
                                Err(message) => Response::error(ErrorCode::Refused, message),
                            }
                        }
                        Ok(req) => handler.handle(peer.clone(), req, &mut recv).await,
                        Err(e) => Response::error(ErrorCode::BadRequest, e.to_string()),
                    };
                    if let Err(e) = write_frame(&peer, &mut send, &response).await {
                        tracing::debug!(error = %e, "could not answer a peer request");
                        return;
                    }
                    let _ = send.finish();
                    // Let the response reach the peer before the stream is dropped.
                    let _ = send.stopped().await;
                }
                .instrument(tracing::debug_span!("peer_request")),
            );
        }
    }

    /// Closes the endpoint and waits briefly for connections and their tasks to drain.
    pub async fn shutdown(&self) {
        self.endpoint.close(
            quinn::VarInt::from_u32(CloseCode::Shutdown as u32),
            b"shutdown",
        );
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            self.endpoint.wait_idle().await;
            self.tasks.wait().await;
        })
        .await;
    }
}

/// Each direction's buffer where a tunnel meets a TCP connection: a replica's full copy
/// crosses at line rate, and tokio's default (8 KiB) costs a syscall and a stream write
/// every 8 KiB.
const TUNNEL_BUFFER: usize = 256 * 1024;

/// Copies bytes both ways between a TCP connection and a tunnel's streams until both
/// ends are done; the bytes each way (up: TCP to tunnel). Each way ends on its own: an
/// end of input is passed on (half-close), and a TCP side that stops taking bytes stops
/// the tunnel's sender while what the TCP side still says goes on up (a workload that
/// answers a request early and closes before it has read the body: the answer gets
/// through). Any other failure (a side that cannot be read, a tunnel that cannot be
/// written) ends both ways.
pub async fn splice(
    tcp: &mut tokio::net::TcpStream,
    recv: impl AsyncRead + Unpin,
    mut send: SendStream,
) -> std::io::Result<(u64, u64)> {
    let (tr, mut tw) = tcp.split();
    // Its end drops the tunnel's receiver: the peer is told to stop sending.
    let down = async move { one_way(recv, &mut tw).await };
    tokio::pin!(down);
    let up = one_way(tr, &mut send);
    tokio::pin!(up);
    tokio::select! {
        u = &mut up => {
            let u = u.map_err(Broken::error)?;
            Ok((u, down.await.map_err(Broken::error)?))
        }
        d = &mut down => match d {
            Ok(d) => Ok((up.await.map_err(Broken::error)?, d)),
            // The TCP side takes no more: what it still says goes on up.
            Err(Broken::Writing(e)) => {
                up.await.map_err(Broken::error)?;
                Err(e)
            }
            Err(Broken::Reading(e)) => Err(e),
        },
    }
}

/// Where one way of a [`splice`] broke.
enum Broken {
    Reading(std::io::Error),
    Writing(std::io::Error),
}

impl Broken {
    fn error(self) -> std::io::Error {
        match self {
            Broken::Reading(e) | Broken::Writing(e) => e,
        }
    }
}

/// Copies `from` to `to` until `from` ends, then shuts `to` for writing; the bytes copied.
async fn one_way(
    from: impl AsyncRead + Unpin,
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> Result<u64, Broken> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut from = tokio::io::BufReader::with_capacity(TUNNEL_BUFFER, from);
    let mut copied = 0u64;
    loop {
        let chunk = from.fill_buf().await.map_err(Broken::Reading)?;
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        to.write_all(chunk).await.map_err(Broken::Writing)?;
        from.consume(n);
        copied += n as u64;
    }
    to.shutdown().await.map_err(Broken::Writing)?;
    Ok(copied)
}

/// Answers a tunnel request, then copies bytes both ways until either side ends.
async fn pipe(peer: &str, mut tcp: tokio::net::TcpStream, mut send: SendStream, recv: RecvStream) {
    if write_frame(peer, &mut send, &Response::TunnelOpen)
        .await
        .is_err()
    {
        return;
    }
    let _ = tcp.set_nodelay(true);
    match splice(&mut tcp, recv, send).await {
        Ok((up, down)) => tracing::debug!(peer, up, down, "tunnel closed"),
        Err(e) => tracing::debug!(peer, error = %e, "tunnel ended"),
    }
}

/// A peer's link check (`Measure`): its bytes read and dropped, then this site's clock.
async fn measured(recv: &mut RecvStream, bytes: u64) -> Response {
    let mut body = tokio::io::AsyncReadExt::take(recv, bytes.min(wire::MAX_MEASURE));
    match tokio::io::copy(&mut body, &mut tokio::io::sink()).await {
        Ok(got) => Response::Measured {
            bytes: got,
            unix_ms: crate::spec::now_ms(),
        },
        Err(e) => Response::error(ErrorCode::BadRequest, format!("link check: {e}")),
    }
}

/// What [`PeerLink::measure`] found.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct LinkMeasure {
    /// Round trip QUIC measures.
    pub rtt_ms: f64,
    /// The rate the test bytes reached, less one round trip.
    pub mbit_s: f64,
    /// The peer's clock minus this site's (positive: the peer is ahead).
    pub skew_ms: i64,
    /// Bytes sent.
    pub bytes: u64,
}

/// A request under way whose body the caller writes (see
/// [`PeerLink::request_with_body`]).
pub struct BodyRequest {
    peer: String,
    send: SendStream,
    recv: RecvStream,
}

impl BodyRequest {
    pub fn body(&mut self) -> &mut SendStream {
        &mut self.send
    }

    /// Ends the body and waits for the peer's answer.
    pub async fn response(mut self) -> Result<Response, PeerError> {
        finish(&self.peer, &mut self.send)?;
        read_response(&self.peer, &mut self.recv).await
    }
}

pub(crate) async fn write_frame<T: serde::Serialize>(
    peer: &str,
    send: &mut SendStream,
    msg: &T,
) -> Result<(), PeerError> {
    let frame = wire::encode(msg).map_err(|e| PeerError::Protocol {
        peer: peer.to_string(),
        detail: e.to_string(),
    })?;
    send.write_all(&frame).await.map_err(|e| PeerError::Link {
        peer: peer.to_string(),
        detail: e.to_string(),
    })
}

pub(crate) fn finish(peer: &str, send: &mut SendStream) -> Result<(), PeerError> {
    send.finish().map_err(|e| PeerError::Link {
        peer: peer.to_string(),
        detail: e.to_string(),
    })
}

pub(crate) async fn read_frame<T: serde::de::DeserializeOwned>(
    peer: &str,
    recv: &mut RecvStream,
) -> Result<T, PeerError> {
    let link = |detail: String| PeerError::Link {
        peer: peer.to_string(),
        detail,
    };
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| link(e.to_string()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HEADER {
        return Err(PeerError::Protocol {
            peer: peer.to_string(),
            detail: format!("header of {len} bytes exceeds the {MAX_HEADER} byte limit"),
        });
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf)
        .await
        .map_err(|e| link(e.to_string()))?;
    serde_json::from_slice(&buf).map_err(|e| PeerError::Protocol {
        peer: peer.to_string(),
        detail: e.to_string(),
    })
}

async fn read_response(peer: &str, recv: &mut RecvStream) -> Result<Response, PeerError> {
    read_frame(peer, recv).await
}
