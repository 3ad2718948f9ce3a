//! Tunnels: how a connection at one site reaches a workload running at another, through
//! the QUIC peer link (the sites need no other connectivity).
//!
//! - Near end for clients ([`open`]): a route whose workload moved away carries each client
//!   connection to the peer now running it.
//! - Near end for adapters ([`TunnelOpener`]): during a migration, a service adapter at the
//!   destination asks for a local endpoint whose connections reach a (granted) port of the
//!   workload at the source, e.g. for a replica to follow its primary. The listener lives
//!   until the migration ends ([`Ingress::close_tunnels`]).
//! - Far end ([`Ingress::connect_local`]): the connection to the workload's port here, only
//!   for a workload that runs here and is not being moved. Tunnels that serve a
//!   migration are admitted by the migration engine, which knows whether it still runs.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::SendStream;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{Ingress, Target};
use crate::peer::{PeerLink, TunnelRecv, TunnelTarget};
use crate::plugins::TunnelOpener;

/// The near end for a client: a byte pipe to `workload` at `peer`. The client's bytes go
/// out with the request (no round trip waits for the peer's answer first); a refusal
/// shows as a read error.
pub(super) async fn open(
    peers: &PeerLink,
    peer: &str,
    workload: &str,
) -> Result<(TunnelRecv, SendStream), String> {
    peers
        .open_tunnel_early(peer, &TunnelTarget::Workload(workload.to_string()))
        .await
        .map_err(|e| format!("tunnel to {workload} at {peer}: {e}"))
}

/// A listener that forwards to a migration's tunnel target.
pub(super) struct MigrationTunnel {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Ingress {
    /// The far end of a client tunnel: the workload's port here, if it runs here unheld.
    pub async fn connect_local(&self, peer: &str, workload: &str) -> Result<TcpStream, String> {
        let port = self.local_port(workload).ok_or_else(|| {
            format!("workload {workload} is not running at this site (or is being moved)")
        })?;
        tracing::debug!(peer, workload, port, "tunnel opened");
        connect_port(workload, port).await
    }

    /// The port of a workload that serves here now (not held, not moved away).
    fn local_port(&self, workload: &str) -> Option<u16> {
        self.routed
            .get(workload)
            .filter(|r| *r.target.borrow() == Target::Local)
            .map(|r| r.port)
    }

    /// Closes the adapter tunnels of a migration that ended.
    pub fn close_tunnels(&self, migration: &str) {
        self.tunnels.retain(|(m, _), t| {
            let keep = m != migration;
            if !keep {
                t.stop.cancel();
            }
            keep
        });
    }

    /// A loopback endpoint whose connections reach the post-copy page server of
    /// `migration`'s frozen source at `peer` (for the `criu lazy-pages` daemon here).
    pub async fn open_page_tunnel(
        self: &Arc<Self>,
        peer: &str,
        migration: &str,
        workload: &str,
        urgent: bool,
    ) -> Result<SocketAddr, String> {
        let target = TunnelTarget::Pages {
            migration: migration.to_string(),
            workload: workload.to_string(),
            urgent,
        };
        // Port 0 and 1 name the two page tunnels of a migration (no workload port is 0).
        let key = u16::from(urgent);
        Arc::clone(self)
            .open_migration_tunnel(peer.to_string(), migration.to_string(), key, target)
            .await
    }

    async fn open_migration_tunnel(
        self: Arc<Self>,
        peer: String,
        migration: String,
        port: u16,
        target: TunnelTarget,
    ) -> Result<SocketAddr, String> {
        let key = (migration.clone(), port);
        if let Some(t) = self.tunnels.get(&key) {
            return Ok(t.addr);
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot listen for a tunnel on loopback: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("tunnel listener: {e}"))?;
        let stop = self.cancel.child_token();
        self.tunnels.insert(
            key,
            MigrationTunnel {
                addr,
                stop: stop.clone(),
            },
        );
        let this = Arc::clone(&self);
        self.tasks.spawn(
            async move {
                loop {
                    let conn = tokio::select! {
                        _ = stop.cancelled() => return,
                        c = listener.accept() => c,
                    };
                    let Ok((tcp, _)) = conn else { continue };
                    let _ = tcp.set_nodelay(true);
                    let (peers, peer, target, stop) = (
                        Arc::clone(&this.peers),
                        peer.clone(),
                        target.clone(),
                        stop.clone(),
                    );
                    this.tasks.spawn(async move {
                        // Early: the local client's first bytes go out with the request.
                        match peers.open_tunnel_early(&peer, &target).await {
                            Ok((recv, send)) => {
                                tokio::select! {
                                    () = pipe(tcp, recv, send) => {}
                                    () = stop.cancelled() => {}
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "migration tunnel refused"),
                        }
                    });
                }
            }
            .instrument(
                tracing::info_span!("migration_tunnel", migration = %migration, port, %addr),
            ),
        );
        tracing::info!(%migration, port, %addr, "migration tunnel open");
        Ok(addr)
    }
}

impl TunnelOpener for Ingress {
    fn open(
        &self,
        peer: &str,
        migration: &str,
        workload: &str,
        port: u16,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<SocketAddr, String>> + Send + '_>>
    {
        let (peer, migration, workload) = (
            peer.to_string(),
            migration.to_string(),
            workload.to_string(),
        );
        Box::pin(async move {
            let this = self
                .me
                .upgrade()
                .ok_or_else(|| "the ingress is shutting down".to_string())?;
            let target = TunnelTarget::Migration {
                migration: migration.clone(),
                workload,
                port,
            };
            this.open_migration_tunnel(peer, migration, port, target)
                .await
        })
    }
}

/// How long a dial to a local workload may take: a loopback connect answers at once
/// unless the listener's backlog is full (a stopped or overloaded workload), when the
/// kernel would retry for minutes.
const DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connects to a port of this site (a route's backend, a tunnel's far end), within
/// [`DIAL_TIMEOUT`].
pub async fn connect_port(workload: &str, port: u16) -> Result<TcpStream, String> {
    let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(("127.0.0.1", port)))
        .await
        .map_err(|_| {
            format!(
                "workload {workload} did not accept a connection on port {port} within {} s",
                DIAL_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("workload {workload} does not answer on port {port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Copies bytes both ways between a local connection and a tunnel until either ends.
async fn pipe(mut tcp: TcpStream, recv: TunnelRecv, send: SendStream) {
    match crate::peer::splice(&mut tcp, recv, send).await {
        Ok((up, down)) => tracing::debug!(up, down, "migration tunnel connection closed"),
        // A refusal by the peer shows here too, as the first read's error.
        Err(e) => tracing::debug!(error = %e, "migration tunnel connection ended"),
    }
}
