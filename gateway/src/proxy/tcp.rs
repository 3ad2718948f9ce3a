//! One client connection in TCP mode: bound to a backend (the local port, or a tunnel to
//! the peer running the workload), and re-bound when the route's target changes. A re-bind
//! happens only at a quiet point: the proxy stops reading the client, lets the backend
//! finish answering what it was sent, then closes the backend side. The client's next
//! bytes wait in its socket and go to the next backend.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{wait_for_target, HoldLimits, Routed, Target};
use crate::peer::PeerLink;

/// No backend bytes for this long after the last answer = a quiet point. Loopback
/// replies come in one piece or in chunks microseconds apart; this only has to outlast
/// the gaps inside one reply, and it is what an idle-but-recent connection adds to a hold.
const QUIET: Duration = Duration::from_millis(5);

pub(super) type Reader = Box<dyn AsyncRead + Unpin + Send>;
pub(super) type Writer = Box<dyn AsyncWrite + Unpin + Send>;

pub(super) enum Outcome {
    /// The client is gone (or the backend closed on it): the connection ends.
    Done,
    /// The target changed and the connection is quiet: bind it to the new target.
    Rebind,
}

pub(super) async fn serve(
    mut client: TcpStream,
    routed: Arc<Routed>,
    peers: Arc<PeerLink>,
    limits: HoldLimits,
) {
    let mut rx = routed.target.subscribe();
    loop {
        let Some(target) = wait_for_target(&mut rx, &routed, &limits).await else {
            tracing::warn!(workload = %routed.workload, "held connection closed: the workload did not run again in time");
            return;
        };
        let (br, bw) = match dial(&target, &routed, &peers).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(workload = %routed.workload, ?target, error = %e, "cannot reach the workload; closing the client connection");
                return;
            }
        };
        routed.bound.fetch_add(1, Ordering::SeqCst);
        let outcome = pump(&mut client, br, bw, &mut rx, &target, &limits).await;
        routed.bound.fetch_sub(1, Ordering::SeqCst);
        routed.unbound.notify_waiters();
        match outcome {
            Outcome::Done => return,
            Outcome::Rebind => tracing::debug!(workload = %routed.workload, "connection re-bound"),
        }
    }
}

pub(super) async fn dial(
    target: &Target,
    routed: &Routed,
    peers: &PeerLink,
) -> Result<(Reader, Writer), String> {
    match target {
        Target::Local => {
            let s = super::tunnel::connect_port(&routed.workload, routed.port).await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Target::Remote(peer) => {
            let (r, w) = super::tunnel::open(peers, peer, &routed.workload).await?;
            Ok((Box::new(r), Box::new(w)))
        }
        Target::Held => Err("route is held".into()),
    }
}

/// Sleeps until `at` (forever without one; the select arm is disabled then).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The next change of the target `rx` watches, and `rx` back.
type NextChange = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (Result<(), watch::error::RecvError>, watch::Receiver<Target>),
            > + Send,
    >,
>;

fn next_change(mut rx: watch::Receiver<Target>) -> NextChange {
    Box::pin(async move { (rx.changed().await, rx) })
}

pub(super) async fn pump(
    client: &mut TcpStream,
    mut br: Reader,
    mut bw: Writer,
    rx: &mut watch::Receiver<Target>,
    bound_to: &Target,
    limits: &HoldLimits,
) -> Outcome {
    let (mut cr, mut cw) = client.split();
    // The target's next change, armed once (not once per read: that registers and
    // unregisters a waiter on the watch each time).
    let mut changed = next_change(rx.clone());
    let mut cbuf = vec![0u8; 32 * 1024];
    let mut bbuf = vec![0u8; 32 * 1024];
    // Sent something the backend has not answered yet.
    let mut outstanding = false;
    let mut last_backend = Instant::now();
    let mut holding: Option<Instant> = None;
    loop {
        // While held: the next moment the connection may be quiet (or must be re-bound).
        let check = holding.map(|h| {
            let forced = h + limits.drain;
            if outstanding {
                forced
            } else {
                (last_backend + QUIET).min(forced)
            }
        });
        tokio::select! {
            r = cr.read(&mut cbuf), if holding.is_none() => match r {
                Ok(0) | Err(_) => {
                    let _ = bw.shutdown().await;
                    return Outcome::Done;
                }
                Ok(n) => {
                    if bw.write_all(&cbuf[..n]).await.is_err() {
                        return Outcome::Done;
                    }
                    outstanding = true;
                }
            },
            r = br.read(&mut bbuf) => match r {
                Ok(0) | Err(_) => {
                    // A backend that ends while the connection is being moved is re-bound.
                    return if holding.is_some() && !outstanding { Outcome::Rebind } else { Outcome::Done };
                }
                Ok(n) => {
                    if cw.write_all(&bbuf[..n]).await.is_err() {
                        return Outcome::Done;
                    }
                    outstanding = false;
                    last_backend = Instant::now();
                }
            },
            (result, watching) = &mut changed, if holding.is_none() => {
                if result.is_err() {
                    return Outcome::Done;
                }
                if &*rx.borrow_and_update() != bound_to {
                    // Not polled again: the arm is off while holding, until the return.
                    holding = Some(Instant::now());
                } else {
                    changed = next_change(watching);
                }
            },
            () = sleep_until(check), if check.is_some() => {
                let quiet = !outstanding && last_backend.elapsed() >= QUIET;
                let forced = holding.is_some_and(|h| h.elapsed() >= limits.drain);
                if quiet || forced {
                    if forced && outstanding {
                        tracing::warn!("connection still busy at the drain deadline; re-binding it anyway");
                    }
                    let _ = bw.shutdown().await;
                    return Outcome::Rebind;
                }
            },
        }
    }
}
