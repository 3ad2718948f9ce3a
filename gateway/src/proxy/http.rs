//! What the HTTP mode's two paths (`h1` for HTTP/1.x, `h2` for HTTP/2) share: the
//! client's address as the workload is told it, the hop-by-hop headers, the texts of the
//! proxy's own answers and a redirect's address.

use std::net::IpAddr;
use std::time::Duration;

use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION};

use crate::peer::PeerLink;
use crate::spec::RouteSpec;

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
pub(super) fn proxy_headers(headers: &mut HeaderMap, client: Option<&Forwarding>) {
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
}
