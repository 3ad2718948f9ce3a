//! Ingress: clients reach a workload through its site's gateway. Each route is a listener
//! whose connections go to the workload's port here, or, once the workload has moved, to
//! the peer gateway now running it, through the QUIC link. During a migration the ingress
//! holds traffic: connections stop at a quiet point, wait, and are re-bound to wherever
//! the workload runs next, so clients keep their connections and see a pause, not an error.
//! Accepted connections are carried by `workers`, one single-threaded runtime per core.

mod h1;
mod h2;
mod http;
mod tcp;
mod tunnel;
mod workers;

pub use tunnel::connect_port;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use tokio_util::task::TaskTracker;

use crate::peer::PeerLink;
use crate::spec::{RouteMode, RouteSpec, WorkloadSpec};

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr} for workload {workload}: {source}; is the address in use?")]
    Bind {
        workload: String,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("this site has no routes for workload {0}")]
    NoRoutes(String),
    #[error("workload {workload}'s routes lead to {target}, not to another site: remove the workload (ferry workload rm) instead")]
    NotForwarded { workload: String, target: Target },
}

/// Where a route's connections go now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The workload's port at this site.
    Local,
    /// Nowhere yet: the workload is being moved; connections wait.
    Held,
    /// The peer site now running the workload, through the QUIC link.
    Remote(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Local => f.write_str("local"),
            Target::Held => f.write_str("held"),
            Target::Remote(peer) => write!(f, "peer:{peer}"),
        }
    }
}

/// Bounds on holding traffic.
#[derive(Debug, Clone)]
pub struct HoldLimits {
    /// Longest a connection waits for the workload to run again before it is closed.
    pub max_hold: Duration,
    /// Longest the ingress waits for busy connections to reach a quiet point.
    pub drain: Duration,
    /// Most connections held at once; more are closed rather than queued.
    pub max_held: usize,
}

impl Default for HoldLimits {
    fn default() -> Self {
        Self {
            max_hold: Duration::from_secs(30),
            drain: Duration::from_secs(2),
            max_held: 10_000,
        }
    }
}

/// A workload's routes at this site.
pub(crate) struct Routed {
    workload: String,
    port: u16,
    target: watch::Sender<Target>,
    /// Connections currently bound to a backend.
    bound: AtomicUsize,
    /// Connections waiting for the workload.
    held: AtomicUsize,
    unbound: Notify,
    cancel: CancellationToken,
    routes: Vec<RouteSpec>,
}

/// The site's ingress: every workload here that has a port (its routes, if any, and the
/// far end of tunnels to it), and where its traffic goes now.
pub struct Ingress {
    peers: Arc<PeerLink>,
    routed: DashMap<String, Arc<Routed>>,
    /// Adapter tunnels of running migrations, by (migration, port).
    tunnels: DashMap<(String, u16), tunnel::MigrationTunnel>,
    limits: HoldLimits,
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// The threads that carry client connections.
    workers: workers::Workers,
    /// Itself, for tasks started through a shared reference.
    me: std::sync::Weak<Ingress>,
}

/// A workload's routes now: where they lead and how many connections they carry.
#[derive(Debug, Clone)]
pub struct RouteStats {
    pub workload: String,
    pub routes: Vec<RouteSpec>,
    pub target: Target,
    pub bound: usize,
    pub held: usize,
}

/// What holding a workload's traffic took.
#[derive(Debug, Clone, Default)]
pub struct HoldReport {
    pub connections: usize,
    pub drained: bool,
    pub took: Duration,
}

impl Ingress {
    pub fn new(peers: Arc<PeerLink>, limits: HoldLimits, cancel: CancellationToken) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            peers,
            routed: DashMap::new(),
            tunnels: DashMap::new(),
            limits,
            workers: workers::Workers::start(),
            cancel,
            tasks: TaskTracker::new(),
            me: me.clone(),
        })
    }

    /// Could `spec`'s routes be served here (addresses free)?
    pub fn check_free(&self, spec: &WorkloadSpec) -> Result<(), ProxyError> {
        if self.routed.contains_key(&spec.name) {
            return Ok(());
        }
        for r in &spec.routes {
            std::net::TcpListener::bind(r.listen).map_err(|source| ProxyError::Bind {
                workload: spec.name.clone(),
                addr: r.listen,
                source,
            })?;
        }
        Ok(())
    }

    /// Serves `spec`'s routes (and tunnels from peers) to the workload's local port. If
    /// this site still forwards them (the workload left and came back), they simply point
    /// here again.
    pub async fn open(self: &Arc<Self>, spec: &WorkloadSpec) -> Result<(), ProxyError> {
        let Some(port) = spec.port else {
            return Ok(());
        };
        if let Some(r) = self.routed.get(&spec.name) {
            r.target.send_replace(Target::Local);
            return Ok(());
        }
        let mut listeners = Vec::new();
        for r in &spec.routes {
            let l = TcpListener::bind(r.listen)
                .await
                .map_err(|source| ProxyError::Bind {
                    workload: spec.name.clone(),
                    addr: r.listen,
                    source,
                })?;
            listeners.push((l, r.clone()));
        }
        let routed = Arc::new(Routed {
            workload: spec.name.clone(),
            port,
            target: watch::channel(Target::Local).0,
            bound: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            unbound: Notify::new(),
            cancel: self.cancel.child_token(),
            routes: spec.routes.clone(),
        });
        for (l, route) in listeners {
            let this = Arc::clone(self);
            let routed = Arc::clone(&routed);
            let addr = l.local_addr().ok();
            self.tasks.spawn(
                async move { this.accept(l, route, routed).await }.instrument(
                    tracing::info_span!("route", workload = %spec.name, listen = ?addr),
                ),
            );
        }
        if !spec.routes.is_empty() {
            tracing::info!(workload = %spec.name, routes = spec.routes.len(), port, "ingress routes open");
        }
        self.routed.insert(spec.name.clone(), routed);
        Ok(())
    }

    async fn accept(self: Arc<Self>, listener: TcpListener, route: RouteSpec, routed: Arc<Routed>) {
        let route = Arc::new(route);
        loop {
            let (conn, remote) = tokio::select! {
                _ = routed.cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let _ = conn.set_nodelay(true);
            let routed = Arc::clone(&routed);
            let peers = Arc::clone(&self.peers);
            let limits = self.limits.clone();
            let route = Arc::clone(&route);
            let span = tracing::debug_span!("client", %remote);
            let Some(worker) = self.workers.next() else {
                self.tasks
                    .spawn(serve(conn, route, routed, peers, limits).instrument(span));
                continue;
            };
            // The socket moves to the worker's runtime: registered there, polled there.
            let conn = match conn.into_std() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot hand a client connection to a worker");
                    continue;
                }
            };
            self.tasks.spawn_on(
                async move {
                    match TcpStream::from_std(conn) {
                        Ok(conn) => serve(conn, route, routed, peers, limits).await,
                        Err(e) => tracing::warn!(error = %e, "cannot take a client connection"),
                    }
                }
                .instrument(span),
                worker,
            );
        }
    }

    /// Stops a workload's routes (its connections close).
    pub fn close(&self, workload: &str) {
        if let Some((_, r)) = self.routed.remove(workload) {
            r.cancel.cancel();
            if !r.routes.is_empty() {
                tracing::info!(workload, "ingress routes closed");
            }
        }
    }

    /// Stops forwarding a workload that now runs at another site: its routes here close
    /// (and their connections with them). Refused while it runs or moves here.
    pub fn close_forwarded(&self, workload: &str) -> Result<(), ProxyError> {
        let removed = self.routed.remove_if(workload, |_, r| {
            !r.routes.is_empty() && matches!(*r.target.borrow(), Target::Remote(_))
        });
        if let Some((_, r)) = removed {
            r.cancel.cancel();
            tracing::info!(workload, "forwarding routes closed");
            return Ok(());
        }
        match self.routed.get(workload).filter(|r| !r.routes.is_empty()) {
            Some(r) => Err(ProxyError::NotForwarded {
                workload: workload.to_string(),
                target: r.target.borrow().clone(),
            }),
            None => Err(ProxyError::NoRoutes(workload.to_string())),
        }
    }

    /// Holds a workload's traffic: new connections wait, and bound ones stop at their next
    /// quiet point (bounded by the drain limit). Returns once nothing reaches the workload.
    pub async fn hold(&self, workload: &str) -> HoldReport {
        let Some(r) = self.routed.get(workload).map(|r| Arc::clone(&r)) else {
            return HoldReport {
                drained: true,
                ..HoldReport::default()
            };
        };
        let started = Instant::now();
        let connections = r.bound.load(Ordering::SeqCst);
        r.target.send_replace(Target::Held);
        let deadline = started + self.limits.drain + Duration::from_millis(200);
        let mut drained = true;
        loop {
            let wait = r.unbound.notified();
            if r.bound.load(Ordering::SeqCst) == 0 {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, wait).await.is_err() {
                drained = r.bound.load(Ordering::SeqCst) == 0;
                break;
            }
        }
        let report = HoldReport {
            connections,
            drained,
            took: started.elapsed(),
        };
        tracing::info!(
            workload,
            connections,
            drained,
            ms = report.took.as_millis() as u64,
            "traffic held"
        );
        report
    }

    /// Lets held traffic go to `target`. A workload without routes that moved away is
    /// forgotten here: nothing at this site leads to it any more.
    pub fn release(&self, workload: &str, target: Target) {
        if let Some(r) = self.routed.get(workload).map(|r| Arc::clone(&r)) {
            let held = r.held.load(Ordering::SeqCst);
            tracing::info!(workload, ?target, held, "traffic released");
            let moved = matches!(target, Target::Remote(_));
            r.target.send_replace(target);
            if moved && r.routes.is_empty() {
                self.close(workload);
            }
        }
    }

    /// At shutdown: waits (bounded) for the route and connection tasks to end.
    pub async fn drain(&self, timeout: Duration) {
        self.cancel.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(timeout, self.tasks.wait()).await;
        self.workers.stop();
    }

    /// Each workload's routes: target and connections.
    pub fn stats(&self) -> Vec<RouteStats> {
        let mut v: Vec<RouteStats> = self
            .routed
            .iter()
            .filter(|e| !e.routes.is_empty())
            .map(|e| RouteStats {
                workload: e.key().clone(),
                routes: e.routes.clone(),
                target: e.target.borrow().clone(),
                bound: e.bound.load(Ordering::SeqCst),
                held: e.held.load(Ordering::SeqCst),
            })
            .collect();
        v.sort_by(|a, b| a.workload.cmp(&b.workload));
        v
    }
}

/// One client connection of a route, in the route's mode.
async fn serve(
    conn: TcpStream,
    route: Arc<RouteSpec>,
    routed: Arc<Routed>,
    peers: Arc<PeerLink>,
    limits: HoldLimits,
) {
    match route.mode {
        RouteMode::Tcp => tcp::serve(conn, routed, peers, limits).await,
        RouteMode::Http => h1::serve(conn, route, routed, peers, limits).await,
    }
}

/// Waits until the route has a target other than `Held` (bounded).
pub(super) async fn wait_for_target(
    rx: &mut watch::Receiver<Target>,
    routed: &Routed,
    limits: &HoldLimits,
) -> Option<Target> {
    let now = rx.borrow_and_update().clone();
    if now != Target::Held {
        return Some(now);
    }
    if routed.held.fetch_add(1, Ordering::SeqCst) >= limits.max_held {
        routed.held.fetch_sub(1, Ordering::SeqCst);
        return None;
    }
    let waited = tokio::time::timeout(limits.max_hold, async {
        loop {
            if rx.changed().await.is_err() {
                return None;
            }
            let t = rx.borrow_and_update().clone();
            if t != Target::Held {
                return Some(t);
            }
        }
    })
    .await;
    routed.held.fetch_sub(1, Ordering::SeqCst);
    waited.ok().flatten()
}
