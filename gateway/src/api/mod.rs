//! The REST API over HTTPS: the TLS listener and one task per connection.

pub mod client;
mod endpoints;
pub mod error;
mod events;
mod openapi;
mod routes;
pub mod types;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::identity::{self, Identity, IdentityError};
use crate::migration::Engine;
use crate::peer::PeerLink;
use crate::workload::Workloads;

pub use routes::Api;

#[derive(Debug, Error)]
pub enum ApiServerError {
    #[error("cannot bind the API on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] IdentityError),
}

/// Everything a request handler may touch.
pub struct ApiState {
    pub token: String,
    /// `[api] allowed_commands`: the programs a workload started here may run (None: any).
    pub allowed_commands: Option<Vec<String>>,
    pub site: types::SiteInfo,
    pub workloads: Arc<Workloads>,
    pub engine: Arc<Engine>,
    pub checkpoints: Arc<crate::checkpoint::Checkpoints>,
    pub restarts: Arc<crate::restart::Supervisor>,
    pub peers: Arc<PeerLink>,
    pub plugins: Arc<crate::plugins::PluginHost>,
    pub ingress: Arc<crate::proxy::Ingress>,
}

pub struct ApiServer {
    listener: TcpListener,
    tls: TlsAcceptor,
}

impl ApiServer {
    pub async fn bind(addr: SocketAddr, identity: &Identity) -> Result<Self, ApiServerError> {
        let cfg = identity::server_config(identity, None, b"http/1.1")?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ApiServerError::Bind { addr, source })?;
        Ok(Self {
            listener,
            tls: TlsAcceptor::from(Arc::new(cfg)),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `cancel` fires, then lets open requests finish (bounded).
    pub async fn serve(self, state: Arc<ApiState>, cancel: CancellationToken) {
        let api = Api::new(state);
        let tracker = TaskTracker::new();
        loop {
            let (tcp, remote) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let tls = self.tls.clone();
            let api = api.clone();
            let cancel = cancel.clone();
            tracker.spawn(
                async move {
                    let stream = match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let api = api.clone();
                        async move {
                            use http_body_util::BodyExt;
                            // A migration's events stream; every other answer is whole.
                            if let Some(stream) = api.events(&req) {
                                return Ok::<_, std::convert::Infallible>(stream);
                            }
                            Ok(api.handle(req).await.map(BodyExt::boxed))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "API connection ended") },
                        _ = cancel.cancelled() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                        }
                    }
                }
                .instrument(tracing::debug_span!("api_conn", %remote)),
            );
        }
        tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    }
}
