//! Tunnels: how a client connection at one site reaches a workload running at another,
//! through the QUIC peer link (the sites need no other connectivity). The near end opens
//! the tunnel ([`open`], for routes whose workload moved away); the far end is this
//! site's ingress, which connects it to the workload's local port ([`TunnelServer`]),
//! only for a workload that runs here and is not being moved.

use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;

use super::{Ingress, Target};
use crate::peer::{PeerLink, TunnelServer};

/// The near end: a byte pipe to `workload` at `peer`.
pub(super) async fn open(
    peers: &PeerLink,
    peer: &str,
    workload: &str,
) -> Result<(RecvStream, SendStream), String> {
    peers
        .open_tunnel(peer, workload)
        .await
        .map_err(|e| format!("tunnel to {workload} at {peer}: {e}"))
}

impl TunnelServer for Ingress {
    async fn connect(&self, peer: &str, workload: &str) -> Result<TcpStream, String> {
        let port = self.local_port(workload).ok_or_else(|| {
            format!("workload {workload} is not running at this site (or is being moved)")
        })?;
        tracing::debug!(peer, workload, port, "tunnel opened");
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("workload {workload} does not answer on port {port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }
}

impl Ingress {
    /// The port of a workload that serves here now (not held, not moved away).
    fn local_port(&self, workload: &str) -> Option<u16> {
        self.routed
            .get(workload)
            .filter(|r| *r.target.borrow() == Target::Local)
            .map(|r| r.port)
    }
}
