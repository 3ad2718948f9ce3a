//! One client connection in HTTP mode that speaks HTTP/2 (prior knowledge), forwarded by
//! Ferry itself in the connection's own task, as HTTP/1.x is (`h1`): the `h2` crate
//! frames the client's side, and each stream becomes one HTTP/1.1 exchange with the
//! workload, written and read here (heads with httparse; bodies by `Content-Length`,
//! chunked encoding or the connection's end; trailers both ways in chunked encoding).
//! Streams that run at once each have a backend connection; one is kept between streams
//! while the route's target stays the same, so nothing outlives a move, and a kept one
//! the workload closed meanwhile is dialled again for a request safe to repeat. While
//! the workload moves, streams wait (bounded); one that cannot wait any longer, or finds
//! the queue full, gets 503 with Retry-After. After the move a route may answer 307
//! instead of forwarding. Hop-by-hop headers stop here both ways, and the workload learns
//! who the client is. An answer the workload gives before it has read the body (an
//! early 413) reaches the client; one cut off after its head resets the stream, so the
//! client never takes a part for the whole.

use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use ::h2::server::SendResponse;
use ::h2::{Reason, RecvStream, SendStream};
use futures_util::stream::{FuturesUnordered, StreamExt};
use hyper::body::Bytes;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, HOST, LOCATION, RETRY_AFTER,
    TRANSFER_ENCODING,
};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::h1::{
    answer_framing, connection_names, hop_by_hop, parse_head, push_header, AnswerFraming, Backend,
    Buffer, Framing, Head, MAX_HEAD, MAX_HEADERS,
};
use super::http::{
    proxy_headers, redirect_to, unavailable_text, unreachable_text, Forwarding, HEADER_READ_TIMEOUT,
};
use super::tcp::dial;
use super::{wait_for_target, HoldLimits, Routed, Target};
use crate::peer::PeerLink;
use crate::spec::RouteSpec;

/// Requests one connection may have open at once (each is held, then forwarded, at a
/// switch).
const MAX_STREAMS: u32 = 128;
/// What a client may send on a stream, and on the connection, before the proxy has
/// passed it on.
const WINDOW: u32 = 1024 * 1024;
/// The last piece of an answer, up to this size, is sent without waiting for the
/// client's flow-control window (it buffers at most this much).
const SMALL: usize = 16 * 1024;
/// Backend connections kept between streams, at most.
const MAX_IDLE: usize = 32;
/// Longest line of chunked encoding (a size, or a trailer field).
const MAX_LINE: usize = 8 * 1024;

/// What the streams of one client connection share.
struct Shared {
    client: Option<Arc<Forwarding>>,
    route: Arc<RouteSpec>,
    routed: Arc<Routed>,
    peers: Arc<PeerLink>,
    limits: HoldLimits,
    /// Backend connections between streams.
    idle: Mutex<Vec<Backend>>,
}

/// Serves an HTTP/2 client connection (`io` replays the preface already read): its
/// streams run in this task, beside the connection's own framing.
pub(super) async fn serve<I>(
    io: I,
    client: Option<Arc<Forwarding>>,
    route: Arc<RouteSpec>,
    routed: Arc<Routed>,
    peers: Arc<PeerLink>,
    limits: HoldLimits,
) where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = ::h2::server::Builder::new()
        .max_concurrent_streams(MAX_STREAMS)
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_header_list_size(MAX_HEAD as u32)
        .handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(HEADER_READ_TIMEOUT, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "HTTP/2 client connection failed at its start");
            return;
        }
        Err(_) => {
            tracing::debug!("HTTP/2 client sent no settings in time; closing");
            return;
        }
    };
    let shared = Shared {
        client,
        route,
        routed,
        peers,
        limits,
        idle: Mutex::new(Vec::new()),
    };
    let mut streams = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            Some(()) = streams.next(), if !streams.is_empty() => {}
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => streams.push(exchange(req, respond, &shared)),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "client connection ended");
                    break;
                }
                None => break,
            },
        }
    }
}

/// Counts a request as reaching the workload while it lives (a hold waits for none).
struct Bound<'a>(&'a Routed);

impl<'a> Bound<'a> {
    fn new(routed: &'a Routed) -> Self {
        routed.bound.fetch_add(1, Ordering::SeqCst);
        Self(routed)
    }
}

impl Drop for Bound<'_> {
    fn drop(&mut self) {
        self.0.bound.fetch_sub(1, Ordering::SeqCst);
        self.0.unbound.notify_waiters();
    }
}

/// Why a stream got no whole answer from the workload.
enum Failed {
    /// Before its head went to the client: it can be told (502).
    Early(String),
    /// After: the stream is reset.
    Late(String),
}

/// One stream: held while the workload moves, redirected, or forwarded.
async fn exchange(req: Request<RecvStream>, mut respond: SendResponse<Bytes>, s: &Shared) {
    let (mut parts, body) = req.into_parts();
    proxy_headers(&mut parts.headers, s.client.as_deref());
    let mut rx = s.routed.target.subscribe();
    let Some(target) = wait_for_target(&mut rx, &s.routed, &s.limits).await else {
        let text = unavailable_text(&s.routed.workload);
        answer_text(
            &mut respond,
            StatusCode::SERVICE_UNAVAILABLE,
            text,
            &[(RETRY_AFTER, HeaderValue::from_static("1"))],
        );
        return;
    };
    if let (Target::Remote(peer), true) = (&target, s.route.redirect) {
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", hyper::http::uri::PathAndQuery::as_str);
        let to = redirect_to(&s.route, peer, &s.peers, path).and_then(|(location, alt)| {
            Some((
                HeaderValue::from_str(&location).ok()?,
                HeaderValue::from_str(&alt).ok()?,
            ))
        });
        if let Some((location, alt)) = to {
            answer_text(
                &mut respond,
                StatusCode::TEMPORARY_REDIRECT,
                format!("moved to site {peer}\n"),
                &[
                    (LOCATION, location),
                    (HeaderName::from_static("alt-svc"), alt),
                ],
            );
            return;
        }
    }
    let _bound = Bound::new(&s.routed);
    match forward(&parts, body, &mut respond, &target, s).await {
        Ok(()) => {}
        Err(Failed::Early(e)) => {
            tracing::warn!(workload = %s.routed.workload, ?target, error = %e, "cannot forward a request");
            let text = unreachable_text(&s.routed.workload, &e);
            answer_text(&mut respond, StatusCode::BAD_GATEWAY, text, &[]);
        }
        Err(Failed::Late(e)) => {
            tracing::debug!(workload = %s.routed.workload, error = %e, "answer cut off; stream reset");
        }
    }
}

/// A short text answer of the proxy's own.
fn answer_text(
    respond: &mut SendResponse<Bytes>,
    status: StatusCode,
    text: String,
    extra: &[(HeaderName, HeaderValue)],
) {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(text.len()));
    for (name, value) in extra {
        r.headers_mut().insert(name.clone(), value.clone());
    }
    if let Ok(mut send) = respond.send_response(r, false) {
        let _ = send.send_data(Bytes::from(text), true);
    }
}

/// How a request's body goes to the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// The stream ended with its headers.
    None,
    /// The client gave its length.
    Length,
    /// Chunked encoding, trailers at its end.
    Chunked,
}

/// Sends the request to `target` and relays the answer to the client.
async fn forward(
    parts: &hyper::http::request::Parts,
    mut body: RecvStream,
    respond: &mut SendResponse<Bytes>,
    target: &Target,
    s: &Shared,
) -> Result<(), Failed> {
    let framing = if body.is_end_stream() {
        Body::None
    } else if parts.headers.contains_key(CONTENT_LENGTH) {
        Body::Length
    } else {
        Body::Chunked
    };
    let head = request_head(parts, framing);
    let is_head = parts.method == Method::HEAD;
    let repeatable = framing == Body::None
        && matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
    let mut retried = false;
    let (mut b, answer, sent_whole) = loop {
        let (mut b, kept) = match take_idle(s, target) {
            Some(b) => (b, true),
            None => {
                let (r, w) = dial(target, &s.routed, &s.peers)
                    .await
                    .map_err(Failed::Early)?;
                let b = Backend {
                    target: target.clone(),
                    r,
                    w,
                    buf: Buffer::new(),
                };
                (b, false)
            }
        };
        let sent = send_request(&mut b, &head, &mut body, framing).await;
        if let Err(Broke::Client(e)) = sent {
            return Err(Failed::Late(format!("client request body: {e}")));
        }
        match read_answer(&mut b, is_head).await {
            // A workload that answered before it took the whole body keeps no connection.
            Ok(answer) => break (b, answer, sent.is_ok()),
            Err((_, nothing)) if nothing && kept && repeatable && !retried => {
                tracing::debug!("kept backend connection closed; dialling again");
                retried = true;
            }
            Err((reason, _)) => {
                // The workload stopped taking the body and gave no answer first: the
                // body's error says why.
                return Err(Failed::Early(match sent {
                    Err(Broke::Backend(e)) => format!("sending the request: {e}"),
                    _ => reason,
                }));
            }
        }
    };
    let reusable = answer.reusable && sent_whole;
    let mut r = Response::new(());
    *r.status_mut() = answer.status;
    *r.headers_mut() = answer.headers;
    let mut send = respond
        .send_response(r, answer.body == Framing::Empty)
        .map_err(|e| Failed::Late(e.to_string()))?;
    let relayed = match answer.body {
        Framing::Empty => Ok(()),
        Framing::Length(n) => relay_length(&mut b, &mut send, n).await,
        Framing::UntilClose => relay_until_close(&mut b, &mut send).await,
        Framing::Chunked => relay_chunked(&mut b, &mut send).await,
    };
    if let Err(e) = relayed {
        send.send_reset(Reason::INTERNAL_ERROR);
        return Err(Failed::Late(e));
    }
    if reusable && b.buf.is_empty() {
        keep(s, b);
    }
    Ok(())
}

/// A kept backend connection to `target`, if one is still open. Those kept for another
/// target go: nothing outlives a move.
fn take_idle(s: &Shared, target: &Target) -> Option<Backend> {
    let mut idle = s.idle.lock().ok()?;
    idle.retain(|b| b.target == *target);
    while let Some(mut b) = idle.pop() {
        if !b.went_away() {
            return Some(b);
        }
    }
    None
}

fn keep(s: &Shared, b: Backend) {
    if let Ok(mut idle) = s.idle.lock() {
        if idle.len() < MAX_IDLE {
            idle.push(b);
        }
    }
}

/// The request's HTTP/1.1 head: origin-form target, `Host` from the `:authority` it came
/// with (first), its fields, and the body's framing.
fn request_head(parts: &hyper::http::request::Parts, body: Body) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", hyper::http::uri::PathAndQuery::as_str);
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = parts.headers.get(HOST) {
        push_header(&mut out, "host", host.as_bytes());
    } else if let Some(authority) = parts.uri.authority() {
        push_header(&mut out, "host", authority.as_str().as_bytes());
    }
    for (name, value) in &parts.headers {
        if name == HOST
            || name == TRANSFER_ENCODING
            || (name == CONTENT_LENGTH && body == Body::Chunked)
        {
            continue;
        }
        push_header(&mut out, name.as_str(), value.as_bytes());
    }
    if body == Body::Chunked {
        push_header(&mut out, "transfer-encoding", b"chunked");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Which side a transfer broke on.
enum Broke {
    Client(String),
    Backend(std::io::Error),
}

/// Writes the head and the client's body (as it arrives) to the workload.
async fn send_request(
    b: &mut Backend,
    head: &[u8],
    body: &mut RecvStream,
    framing: Body,
) -> Result<(), Broke> {
    b.w.write_all(head).await.map_err(Broke::Backend)?;
    if framing == Body::None {
        return Ok(());
    }
    while let Some(data) = body.data().await {
        let data = data.map_err(|e| Broke::Client(e.to_string()))?;
        let n = data.len();
        if framing == Body::Chunked && n > 0 {
            b.w.write_all(format!("{n:x}\r\n").as_bytes())
                .await
                .map_err(Broke::Backend)?;
            b.w.write_all(&data).await.map_err(Broke::Backend)?;
            b.w.write_all(b"\r\n").await.map_err(Broke::Backend)?;
        } else {
            b.w.write_all(&data).await.map_err(Broke::Backend)?;
        }
        let _ = body.flow_control().release_capacity(n);
    }
    if framing == Body::Chunked {
        let trailers = body
            .trailers()
            .await
            .map_err(|e| Broke::Client(e.to_string()))?;
        let mut end = b"0\r\n".to_vec();
        for (name, value) in trailers.iter().flatten() {
            push_header(&mut end, name.as_str(), value.as_bytes());
        }
        end.extend_from_slice(b"\r\n");
        b.w.write_all(&end).await.map_err(Broke::Backend)?;
    }
    Ok(())
}

/// An answer's head, as the client gets it.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Framing,
    /// The backend connection can take another request after this answer.
    reusable: bool,
}

/// Reads the answer's head (past any 1xx); on failure, also whether nothing came at all.
async fn read_answer(b: &mut Backend, is_head: bool) -> Result<Answer, (String, bool)> {
    let mut received = false;
    loop {
        if !b.buf.is_empty() {
            match parse_answer(b.buf.filled(), is_head) {
                Ok(Some((len, None))) => {
                    b.buf.consume(len);
                    continue;
                }
                Ok(Some((len, Some(answer)))) => {
                    b.buf.consume(len);
                    return Ok(answer);
                }
                Ok(None) => {}
                Err(reason) => return Err((reason, false)),
            }
        }
        match b.buf.fill(&mut b.r).await {
            Ok(0) => {
                return Err((
                    "the workload closed the connection without answering".into(),
                    !received,
                ))
            }
            Ok(_) => received = true,
            Err(e) => return Err((format!("reading the answer: {e}"), !received)),
        }
    }
}

/// Parses a response head at the start of `buf`: its length, and the answer (None for
/// an interim 1xx, which the client does not get); None while it is incomplete.
fn parse_answer(buf: &[u8], is_head: bool) -> Result<Option<(usize, Option<Answer>)>, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Some(head) = parse_head(buf, &mut fields)? else {
        return Ok(None);
    };
    let Head {
        len, code, headers, ..
    } = head;
    if code == 101 {
        return Err("the workload switched protocols, which HTTP/2 cannot carry".into());
    }
    if (100..200).contains(&code) {
        return Ok(Some((len, None)));
    }
    let status = StatusCode::from_u16(code)
        .map_err(|_| format!("the workload answered with status {code}"))?;
    let AnswerFraming {
        body,
        reusable,
        coded,
    } = answer_framing(code, head.version, headers, is_head)?;
    let named = connection_names(headers);
    let mut kept = HeaderMap::with_capacity(headers.len());
    for h in headers {
        if hop_by_hop(h.name, &named)
            || h.name.eq_ignore_ascii_case("transfer-encoding")
            || (coded && h.name.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("the workload sent an invalid header name {:?}", h.name))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| format!("the workload sent an invalid value for {}", h.name))?;
        kept.append(name, value);
    }
    Ok(Some((
        len,
        Some(Answer {
            status,
            headers: kept,
            body,
            reusable,
        }),
    )))
}

/// Sends `data` on the client's stream, within its flow-control window (the last small
/// piece goes at once).
async fn send_data(send: &mut SendStream<Bytes>, mut data: Bytes, end: bool) -> Result<(), String> {
    let closed = |e: ::h2::Error| format!("sending the answer: {e}");
    if data.is_empty() || (end && data.len() <= SMALL) {
        return send.send_data(data, end).map_err(closed);
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let room = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(closed(e)),
            None => return Err("the client's stream closed".into()),
        };
        if room == 0 {
            continue;
        }
        let piece = data.split_to(room.min(data.len()));
        send.send_data(piece, end && data.is_empty())
            .map_err(closed)?;
    }
    Ok(())
}

/// Reads more of the answer when nothing is buffered; an early end is an error.
async fn more(b: &mut Backend) -> Result<(), String> {
    if b.buf.is_empty() {
        match b.buf.fill(&mut b.r).await {
            Ok(0) => return Err("the workload closed the connection mid-answer".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
    Ok(())
}

/// Takes up to `n` buffered bytes of the answer.
fn take(b: &mut Backend, n: u64) -> Bytes {
    let have = b.buf.filled();
    let k = usize::try_from(n).map_or(have.len(), |n| n.min(have.len()));
    let piece = Bytes::copy_from_slice(&have[..k]);
    b.buf.consume(k);
    piece
}

async fn relay_length(b: &mut Backend, send: &mut SendStream<Bytes>, n: u64) -> Result<(), String> {
    let mut left = n;
    while left > 0 {
        more(b).await?;
        let piece = take(b, left);
        left -= piece.len() as u64;
        send_data(send, piece, left == 0).await?;
    }
    Ok(())
}

async fn relay_until_close(b: &mut Backend, send: &mut SendStream<Bytes>) -> Result<(), String> {
    loop {
        if b.buf.is_empty() {
            match b.buf.fill(&mut b.r).await {
                Ok(0) => return send_data(send, Bytes::new(), true).await,
                Ok(_) => {}
                Err(e) => return Err(format!("reading the answer: {e}")),
            }
        }
        let piece = take(b, u64::MAX);
        send_data(send, piece, false).await?;
    }
}

/// Decodes a chunked answer: its data, then its trailers as HTTP/2 trailers.
async fn relay_chunked(b: &mut Backend, send: &mut SendStream<Bytes>) -> Result<(), String> {
    loop {
        let line = read_line(b).await?;
        let size = chunk_size(&line)?;
        if size == 0 {
            break;
        }
        let mut left = size;
        while left > 0 {
            more(b).await?;
            let piece = take(b, left);
            left -= piece.len() as u64;
            send_data(send, piece, false).await?;
        }
        if !read_line(b).await?.is_empty() {
            return Err("the workload's chunk did not end where its size said".into());
        }
    }
    let mut trailers = HeaderMap::new();
    loop {
        let line = read_line(b).await?;
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = trailer_field(&line) {
            trailers.append(name, value);
        }
    }
    if trailers.is_empty() {
        send_data(send, Bytes::new(), true).await
    } else {
        send.send_trailers(trailers)
            .map_err(|e| format!("sending the answer's trailers: {e}"))
    }
}

/// The next line of the answer, without its CRLF.
async fn read_line(b: &mut Backend) -> Result<Vec<u8>, String> {
    loop {
        let have = b.buf.filled();
        if let Some(at) = have.windows(2).position(|w| w == b"\r\n") {
            let line = have[..at].to_vec();
            b.buf.consume(at + 2);
            return Ok(line);
        }
        if have.len() > MAX_LINE {
            return Err("the workload sent an over-long line of chunked encoding".into());
        }
        match b.buf.fill(&mut b.r).await {
            Ok(0) => return Err("the workload closed the connection mid-answer".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
}

/// A chunk's size line (hex digits, then any extensions).
fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let digits = line
        .split(|c| *c == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    std::str::from_utf8(digits)
        .ok()
        .filter(|d| !d.is_empty() && d.len() <= 16)
        .and_then(|d| u64::from_str_radix(d, 16).ok())
        .ok_or_else(|| "the workload sent an invalid chunk size".into())
}

/// A trailer field the client may get (not one HTTP/2 forbids, nor framing).
fn trailer_field(line: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    let colon = line.iter().position(|c| *c == b':')?;
    let name = HeaderName::from_bytes(line[..colon].trim_ascii()).ok()?;
    if hop_by_hop(name.as_str(), &[])
        || name == TRANSFER_ENCODING
        || name == CONTENT_LENGTH
        || name == HOST
    {
        return None;
    }
    let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).ok()?;
    Some((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: Request<()>) -> hyper::http::request::Parts {
        req.into_parts().0
    }

    #[test]
    fn a_request_reaches_the_workload_as_http1_with_its_host_and_framing() {
        let p = parts(
            Request::builder()
                .version(hyper::Version::HTTP_2)
                .uri("http://shop.example:8080/cart?id=7")
                .header("x-kept", "yes")
                .body(())
                .unwrap(),
        );
        let head = String::from_utf8(request_head(&p, Body::None)).unwrap();
        assert_eq!(
            head,
            "GET /cart?id=7 HTTP/1.1\r\nhost: shop.example:8080\r\nx-kept: yes\r\n\r\n"
        );
        // A body without a length goes chunked; a length given stays.
        let p = parts(
            Request::builder()
                .method("POST")
                .uri("http://a/up")
                .header(CONTENT_LENGTH, "5")
                .body(())
                .unwrap(),
        );
        let chunked = String::from_utf8(request_head(&p, Body::Chunked)).unwrap();
        assert!(
            chunked.ends_with("host: a\r\ntransfer-encoding: chunked\r\n\r\n"),
            "{chunked}"
        );
        assert!(!chunked.contains("content-length"), "{chunked}");
        let length = String::from_utf8(request_head(&p, Body::Length)).unwrap();
        assert!(length.contains("content-length: 5\r\n"), "{length}");
    }

    fn answer(raw: &str, is_head: bool) -> (usize, Option<Answer>) {
        parse_answer(raw.as_bytes(), is_head)
            .expect("parses")
            .expect("complete")
    }

    #[test]
    fn an_answer_loses_its_connection_fields_and_is_framed() {
        let raw = "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\n5\r\n";
        let (len, a) = answer(raw, false);
        let a = a.expect("a final answer");
        assert_eq!(len, raw.len() - 3);
        assert_eq!(a.body, Framing::Chunked);
        assert!(a.reusable);
        assert_eq!(a.headers.len(), 1, "{:?}", a.headers);
        assert_eq!(a.headers["x-kept"], "yes");
        // A length; HEAD has no body whatever the head says; 1xx is interim.
        let (_, a) = answer("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", false);
        assert_eq!(a.expect("final").body, Framing::Length(9));
        let (_, a) = answer("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true);
        let a = a.expect("final");
        assert_eq!(
            (a.body, &a.headers[CONTENT_LENGTH]),
            (Framing::Empty, &HeaderValue::from_static("9"))
        );
        assert!(answer("HTTP/1.1 100 Continue\r\n\r\n", false).1.is_none());
        // Neither: until the connection closes, which is then not kept.
        let (_, a) = answer("HTTP/1.1 200 OK\r\n\r\n", false);
        let a = a.expect("final");
        assert_eq!(a.body, Framing::UntilClose);
        assert!(!a.reusable);
        let (_, a) = answer(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
        );
        assert!(!a.expect("final").reusable);
        // No protocol switch over HTTP/2; an incomplete head is waited for.
        assert!(parse_answer(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", false).is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-Le", false)
            .expect("parses")
            .is_none());
    }

    #[test]
    fn chunk_sizes_and_trailers_are_read_strictly() {
        assert_eq!(chunk_size(b"1a").unwrap(), 26);
        assert_eq!(chunk_size(b"0;ext=1").unwrap(), 0);
        assert!(chunk_size(b"").is_err());
        assert!(chunk_size(b"zz").is_err());
        assert!(chunk_size(b"11111111111111111").is_err());
        let (name, value) = trailer_field(b"X-Sum: 300").expect("kept");
        assert_eq!((name.as_str(), value.to_str().unwrap()), ("x-sum", "300"));
        assert!(trailer_field(b"Connection: close").is_none());
        assert!(trailer_field(b"Content-Length: 3").is_none());
        assert!(trailer_field(b"no colon").is_none());
    }
}
