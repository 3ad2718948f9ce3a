//! The far end of tunnels at this site, as the engine admits them: a client tunnel goes to
//! the ingress (the workload must run here unheld); a migration's tunnel (a replica at the
//! destination following this site's instance) only while that migration, moving that
//! workload from here to that peer, is still running, and only to the workload's own port.

use tokio::net::TcpStream;

use super::{Engine, Role};
use crate::peer::{TunnelServer, TunnelTarget};
use crate::proxy;

impl TunnelServer for Engine {
    async fn connect(&self, peer: &str, target: &TunnelTarget) -> Result<TcpStream, String> {
        self.wait_recovered().await;
        match target {
            TunnelTarget::Workload(workload) => self.ingress.connect_local(peer, workload).await,
            TunnelTarget::Pages { migration, .. } => self.connect_pages(peer, migration).await,
            TunnelTarget::Migration {
                migration,
                workload,
                port,
            } => {
                let m = self
                    .get(migration)
                    .filter(|m| {
                        m.role == Role::Source && m.target == peer && m.workload == *workload
                    })
                    .ok_or_else(|| {
                        format!("no migration {migration} of {workload} to {peer} here")
                    })?;
                if m.phase.is_terminal() {
                    return Err(format!("migration {migration} has ended ({})", m.phase));
                }
                if m.spec.port != Some(*port) {
                    return Err(format!(
                        "port {port} is not the port of workload {workload}; a migration tunnel reaches only that"
                    ));
                }
                tracing::debug!(peer, %migration, port, "migration tunnel connection");
                proxy::connect_port(workload, *port).await
            }
        }
    }
}
