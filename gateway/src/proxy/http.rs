//! One client connection in HTTP mode that speaks HTTP/2 (prior knowledge; HTTP/1.x
//! connections are forwarded by `h1`): served by hyper, each stream goes to the workload
//! as an HTTP/1.1 request. Each request goes to where the workload runs now; while it
//! moves, requests wait (bounded), and one that cannot wait any longer, or finds the
//! queue full, gets 503 with Retry-After: never a silent drop. After the move a route may
//! answer 307 with the new site's address instead of forwarding. The connection keeps one
//! backend connection (keep-alive) while the route's target stays the same; any change of
//! target drops it, so nothing outlives a move. As a proxy it drops the hop-by-hop
//! headers (RFC 9110 §7.6.1) and tells the workload who the client is
//! (`X-Forwarded-For`, `Forwarded`); a connection may have at most 128 requests at once.
//! What both paths say to clients (texts, redirect address, client address) is here.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, LOCATION, RETRY_AFTER};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Mutex};

use super::tcp::dial;
use super::{wait_for_target, HoldLimits, Routed, Target};
use crate::peer::PeerLink;
use crate::spec::RouteSpec;

type Body = BoxBody<Bytes, hyper::Error>;

/// What one client connection remembers between its requests (HTTP/1.1 serves them one
/// at a time; HTTP/2 streams that run at once get a state, and a backend connection, of
/// their own).
struct ClientState {
    /// The route's target as this connection last saw it.
    rx: watch::Receiver<Target>,
    /// The backend connection kept alive for the target it was dialled to.
    backend: Option<(Target, SendRequest<Incoming>)>,
}

impl ClientState {
    fn new(routed: &Routed) -> Self {
        Self {
            rx: routed.target.subscribe(),
            backend: None,
        }
    }
}

/// The client's address as the workload is told it, made once per connection.
pub(super) struct Forwarding {
    pub(super) ip: IpAddr,
    /// `X-Forwarded-For` when the request names no proxy before.
    pub(super) xff: HeaderValue,
    pub(super) forwarded: HeaderValue,
}

impl Forwarding {
    pub(super) fn new(ip: IpAddr) -> Option<Self> {
        let node = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        Some(Self {
            ip,
            xff: HeaderValue::from_str(&ip.to_string()).ok()?,
            forwarded: HeaderValue::from_str(&format!("for={node};proto=http")).ok()?,
        })
    }
}

/// Serves an HTTP/2 client connection (`io` replays the preface already read).
pub(super) async fn serve_h2<I>(
    io: I,
    client: Option<Arc<Forwarding>>,
    route: Arc<RouteSpec>,
    routed: Arc<Routed>,
    peers: Arc<PeerLink>,
    limits: HoldLimits,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(Mutex::new(ClientState::new(&routed)));
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        proxy_headers(req.headers_mut(), client.as_deref());
        let (route, routed, peers, limits, state) = (
            Arc::clone(&route),
            Arc::clone(&routed),
            Arc::clone(&peers),
            limits.clone(),
            Arc::clone(&state),
        );
        async move {
            let answer = match state.try_lock() {
                Ok(mut kept) => handle(req, &mut kept, &route, &routed, &peers, &limits).await,
                Err(_) => {
                    let mut own = ClientState::new(&routed);
                    handle(req, &mut own, &route, &routed, &peers, &limits).await
                }
            };
            Ok::<_, Infallible>(answer)
        }
    });
    let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "client connection ended");
    }
}

/// Requests one HTTP/2 client connection may have open at once (each is held, then
/// forwarded, at a switch).
const MAX_STREAMS: u32 = 128;

/// Longest a client may take to send a request's headers.
pub(super) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers for one hop only (RFC 9110 §7.6.1), besides those `Connection` names.
pub(super) const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// A request's headers as the workload gets them: without the hop-by-hop ones, with
/// the client's address appended to `X-Forwarded-For` and in `Forwarded`.
fn proxy_headers(headers: &mut HeaderMap, client: Option<&Forwarding>) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let Some(client) = client else { return };
    let xff = match headers.get("x-forwarded-for").map(HeaderValue::to_str) {
        Some(Ok(before)) => HeaderValue::from_str(&format!("{before}, {}", client.ip)).ok(),
        // Not text: replaced by the one address this proxy knows.
        Some(Err(_)) | None => Some(client.xff.clone()),
    };
    if let Some(v) = xff {
        headers.insert("x-forwarded-for", v);
    }
    headers.append("forwarded", client.forwarded.clone());
}

fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

async fn handle(
    req: Request<Incoming>,
    state: &mut ClientState,
    route: &RouteSpec,
    routed: &Routed,
    peers: &PeerLink,
    limits: &HoldLimits,
) -> Response<Body> {
    if state.rx.has_changed().unwrap_or(true) {
        state.backend = None;
    }
    let Some(target) = wait_for_target(&mut state.rx, routed, limits).await else {
        let mut r = plain(
            StatusCode::SERVICE_UNAVAILABLE,
            unavailable_text(&routed.workload),
        );
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    };
    if let (Target::Remote(peer), true) = (&target, route.redirect) {
        if let Some(r) = redirect(&req, route, peer, peers) {
            return r;
        }
    }
    routed.bound.fetch_add(1, Ordering::SeqCst);
    let answer = forward(req, &mut state.backend, &target, routed, peers).await;
    routed.bound.fetch_sub(1, Ordering::SeqCst);
    routed.unbound.notify_waiters();
    answer.unwrap_or_else(|e| {
        tracing::warn!(workload = %routed.workload, ?target, error = %e, "cannot forward a request");
        plain(StatusCode::BAD_GATEWAY, unreachable_text(&routed.workload, &e))
    })
}

/// The answer to a request held past the bound (503).
pub(super) fn unavailable_text(workload: &str) -> String {
    format!("{workload} is moving to another site and did not resume in time; retry shortly\n")
}

/// The answer to a request the workload did not take (502).
pub(super) fn unreachable_text(workload: &str, reason: &str) -> String {
    format!("{workload} cannot be reached: {reason}\n")
}

/// Where a redirect route sends a request for `path` of a workload now at `peer`: its
/// `Location` (the peer's address with the route's port) and `Alt-Svc` values.
pub(super) fn redirect_to(
    route: &RouteSpec,
    peer: &str,
    peers: &PeerLink,
    path: &str,
) -> Option<(String, String)> {
    let ip = peers.peers().iter().find(|p| p.name == peer)?.address.ip();
    let authority = std::net::SocketAddr::new(ip, route.listen.port());
    Some((
        format!("http://{authority}{path}"),
        format!("http/1.1=\"{authority}\"; ma=3600"),
    ))
}

/// 307 to the same path at the peer site's route, with Alt-Svc naming it.
fn redirect(
    req: &Request<Incoming>,
    route: &RouteSpec,
    peer: &str,
    peers: &PeerLink,
) -> Option<Response<Body>> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", hyper::http::uri::PathAndQuery::as_str);
    let (location, alt_svc) = redirect_to(route, peer, peers, path)?;
    let mut r = plain(
        StatusCode::TEMPORARY_REDIRECT,
        format!("moved to site {peer}\n"),
    );
    r.headers_mut()
        .insert(LOCATION, HeaderValue::from_str(&location).ok()?);
    r.headers_mut()
        .insert("alt-svc", HeaderValue::from_str(&alt_svc).ok()?);
    Some(r)
}

/// Sends one request to the workload (its local port, or the tunnel to its peer) and
/// streams the answer back. The kept backend connection is used when it leads to
/// `target`; a request it could not take (closed meanwhile) goes on a new connection.
async fn forward(
    mut req: Request<Incoming>,
    backend: &mut Option<(Target, SendRequest<Incoming>)>,
    target: &Target,
    routed: &Routed,
    peers: &PeerLink,
) -> Result<Response<Body>, String> {
    as_http1(&mut req);
    if let Some((kept, sender)) = backend.as_mut().filter(|(t, _)| t == target) {
        if sender.ready().await.is_ok() {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(http_body_util::BodyExt::boxed)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => {
                        *backend = None;
                        return Err(e.into_error().to_string());
                    }
                },
            }
        } else {
            tracing::debug!(target = ?kept, "kept backend connection closed; dialling again");
        }
    }
    *backend = None;
    let (r, w) = dial(target, routed, peers).await?;
    let io = TokioIo::new(tokio::io::join(r, w));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    *backend = Some((target.clone(), sender));
    Ok(resp.map(http_body_util::BodyExt::boxed))
}

/// An HTTP/2 request as the workload gets it: HTTP/1.1, origin-form target, `Host` from
/// the `:authority` it came with.
fn as_http1<B>(req: &mut Request<B>) {
    if req.version() != Version::HTTP_2 {
        return;
    }
    if let Some(authority) = req.uri().authority() {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            req.headers_mut().entry(HOST).or_insert(host);
        }
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    if let Ok(uri) = path.parse::<Uri>() {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = Version::HTTP_11;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_the_client_is_named() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("for this hop"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.7"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        proxy_headers(
            &mut h,
            Forwarding::new("10.213.0.9".parse().unwrap()).as_ref(),
        );
        for gone in ["connection", "keep-alive", "x-secret", "upgrade"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(h["x-forwarded-for"], "192.0.2.7, 10.213.0.9");
        assert_eq!(h["forwarded"], "for=10.213.0.9;proto=http");
        let mut h = HeaderMap::new();
        proxy_headers(
            &mut h,
            Forwarding::new("2001:db8::1".parse().unwrap()).as_ref(),
        );
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=http");
    }

    #[test]
    fn http2_requests_reach_the_workload_as_http1_with_a_host() {
        let mut req = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://shop.example:8080/cart?id=7")
            .body(())
            .unwrap();
        as_http1(&mut req);
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.uri(), "/cart?id=7");
        assert_eq!(req.headers()[HOST], "shop.example:8080");
        // HTTP/1.1 requests pass as they are.
        let mut req = Request::builder()
            .uri("/x")
            .header(HOST, "a")
            .body(())
            .unwrap();
        as_http1(&mut req);
        assert_eq!(
            (req.uri().path(), &req.headers()[HOST]),
            ("/x", &HeaderValue::from_static("a"))
        );
    }
}
