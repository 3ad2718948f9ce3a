//! One client connection in HTTP mode, HTTP/1.x: Ferry forwards it itself, in the
//! connection's own task, with the syscalls of a plain relay (read the request, write it
//! to the workload, read the answer, write it back). Heads are parsed (httparse) and
//! rewritten; bodies pass as they are, framed by `Content-Length` or chunked encoding.
//! A connection that opens with HTTP/2's preface goes to the HTTP/2 path (`http`).
//!
//! Each request goes to where the workload runs now. While it moves, requests wait
//! (bounded); a request that cannot wait any longer, or finds the queue full, gets 503
//! with Retry-After: never a silent drop. After the move a route may answer 307 with the
//! new site's address instead of forwarding. Each client connection keeps one backend
//! connection (keep-alive) while the route's target stays the same; any change of target
//! drops it, so nothing outlives a move. A kept backend connection that turns out closed
//! is dialled again for a request that is safe to repeat (idempotent, no body) and that
//! got no byte of answer. As a proxy it drops hop-by-hop headers both ways (RFC 9110
//! §7.6.1), tells the workload who the client is (`X-Forwarded-For`, `Forwarded`), and
//! gives a client 30 s to send a request's headers (a slow or silent one is closed).
//! Requests with both `Content-Length` and `Transfer-Encoding`, or with conflicting
//! lengths, are refused (400), so no two parsers can disagree on where one ends. An
//! answer the workload gives before it has read the body, and closes, reaches the
//! client, whose connection then closes; a connection closed on a body not read lingers
//! (reads and drops) for a while first, so the client reads its answer. A
//! protocol switch the client asks for (`Connection: upgrade`, as a WebSocket opens)
//! reaches the workload; after its 101 the connection carries bytes both ways (as the
//! TCP mode does) and is closed, not re-bound, when the workload moves.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::http::{self, Forwarding, HEADER_READ_TIMEOUT, HOP_BY_HOP};
use super::tcp::{self, dial, Reader, Writer};
use super::{wait_for_target, HoldLimits, Routed, Target};
use crate::peer::PeerLink;
use crate::spec::RouteSpec;

/// Most bytes one request or response head may take.
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head.
pub(super) const MAX_HEADERS: usize = 100;
/// What a read asks for at a time.
pub(super) const CHUNK: usize = 16 * 1024;
/// How long a workload that stopped taking a request body has to show its answer.
const EARLY_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// Most time a closing connection's late input is read and dropped ([`Conn::linger`]).
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);
/// A closing connection quiet for this long is closed at once.
const LINGER_IDLE: std::time::Duration = std::time::Duration::from_secs(1);
/// How an HTTP/2 connection with prior knowledge opens.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub(super) async fn serve(
    conn: TcpStream,
    route: Arc<RouteSpec>,
    routed: Arc<Routed>,
    peers: Arc<PeerLink>,
    limits: HoldLimits,
) {
    let fwd = conn
        .peer_addr()
        .ok()
        .and_then(|a| Forwarding::new(a.ip()))
        .map(Arc::new);
    let mut c = Conn {
        rx: routed.target.subscribe(),
        client: conn,
        cbuf: Buffer::new(),
        unread: false,
        backend: None,
        fwd,
        route,
        routed,
        peers,
        limits,
    };
    match c.run().await {
        Ok(End::Closed) if c.unread => c.linger().await,
        Ok(End::Closed) => {}
        Ok(End::Http2) => {
            let Conn {
                client,
                cbuf,
                fwd,
                route,
                routed,
                peers,
                limits,
                ..
            } = c;
            // What was read already is read again first.
            let (r, w) = client.into_split();
            let io = tokio::io::join(std::io::Cursor::new(cbuf.filled().to_vec()).chain(r), w);
            super::h2::serve(io, fwd, route, routed, peers, limits).await;
        }
        Err(e) => tracing::debug!(error = %e, "client connection ended"),
    }
}

/// How a connection's loop ended without error.
enum End {
    Closed,
    /// The client speaks HTTP/2: what it sent so far is in the client buffer.
    Http2,
}

/// A byte buffer read into at its end and consumed from its start.
pub(super) struct Buffer {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buffer {
    pub(super) fn new() -> Self {
        Self {
            data: vec![0; CHUNK],
            start: 0,
            end: 0,
        }
    }

    pub(super) fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads once more (room is made by moving the unread bytes to the front, or, for a
    /// head that needs it, by growing up to `MAX_HEAD`); returns the bytes read.
    pub(super) async fn fill<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        r: &mut R,
    ) -> io::Result<usize> {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.data.len() < MAX_HEAD + CHUNK {
                self.data.resize(self.data.len() + CHUNK, 0);
            } else {
                return Err(io::Error::other("head too large"));
            }
        }
        let n = r.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

/// How a message's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// At the end of the connection (responses only).
    UntilClose,
}

/// A request as the workload gets it.
struct Request {
    /// Its head, rewritten.
    head: Vec<u8>,
    head_len: usize,
    body: Framing,
    /// Where the request target, as the client sent it, stands in `head`.
    target: std::ops::Range<usize>,
    /// `HEAD`: the answer has no body whatever it says.
    is_head: bool,
    /// May be sent again if a kept backend connection turns out closed.
    repeatable: bool,
    /// The client's connection closes after the answer (HTTP/1.0, `Connection: close`).
    close: bool,
    expects_continue: bool,
    /// The client asks to switch protocols (`Connection: upgrade` with `Upgrade`, as a
    /// WebSocket handshake does): both fields go to the workload.
    upgrade: bool,
}

impl Request {
    /// What its answer must be read as.
    fn asked(&self) -> Asked {
        Asked {
            head: self.is_head,
            close: self.close,
            upgrade: self.upgrade,
        }
    }
}

/// Why a request is refused before it is forwarded.
#[derive(Debug, PartialEq, Eq)]
struct Refused(u16, &'static str);

pub(super) fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Header names the `Connection` fields list (each hop-by-hop too).
pub(super) fn connection_names<'h>(headers: &[httparse::Header<'h>]) -> Vec<&'h [u8]> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|n| !n.is_empty())
        .collect()
}

pub(super) fn hop_by_hop(name: &str, named: &[&[u8]]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || named
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
}

pub(super) fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A `Content-Length` value: digits only.
pub(super) fn content_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A `Transfer-Encoding` value whose last coding is chunked.
pub(super) fn ends_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|b| *b == b',')
        .next()
        .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The body framing that `Content-Length` and `Transfer-Encoding` fields give a request.
fn request_framing(headers: &[httparse::Header<'_>]) -> Result<Framing, Refused> {
    let mut length: Option<u64> = None;
    let mut te: Option<&[u8]> = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = content_length(h.value).ok_or(Refused(400, "invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Refused(400, "conflicting Content-Length fields"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if te.is_some() {
                return Err(Refused(400, "more than one Transfer-Encoding field"));
            }
            te = Some(h.value);
        }
    }
    match (te, length) {
        (Some(_), Some(_)) => Err(Refused(
            400,
            "both Content-Length and Transfer-Encoding are set",
        )),
        (Some(te), None) if ends_chunked(te) => Ok(Framing::Chunked),
        (Some(_), None) => Err(Refused(
            400,
            "a request body must end with chunked encoding",
        )),
        (None, Some(0) | None) => Ok(Framing::Empty),
        (None, Some(n)) => Ok(Framing::Length(n)),
    }
}

/// Parses a request head at the start of `buf`; None while it is incomplete.
fn parse_request(buf: &[u8], fwd: Option<&Forwarding>) -> Result<Option<Request>, Refused> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(Refused(431, "request head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refused(431, "too many header fields")),
        Err(_) => return Err(Refused(400, "malformed request")),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Refused(400, "malformed request"));
    };
    let headers = req.headers;
    let body = request_framing(headers)?;
    let named = connection_names(headers);
    let http10 = version == 0;
    let upgrade = !http10
        && named.iter().any(|n| n.eq_ignore_ascii_case(b"upgrade"))
        && headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade") && !h.value.is_empty());
    let close = if http10 {
        true
    } else {
        headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("connection") && has_token(h.value, "close"))
    };
    let mut expects_continue = false;
    let mut head = Vec::with_capacity(head_len + 96);
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(if http10 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    let mut xff: Option<Vec<u8>> = None;
    for h in headers.iter() {
        if upgrade && h.name.eq_ignore_ascii_case("upgrade") {
            push_header(&mut head, h.name, h.value);
            continue;
        }
        if hop_by_hop(h.name, &named) {
            continue;
        }
        if h.name.eq_ignore_ascii_case("expect") {
            // This proxy answers 100 Continue itself, before it reads the body.
            expects_continue |= has_token(h.value, "100-continue");
            continue;
        }
        if h.name.eq_ignore_ascii_case("x-forwarded-for") {
            let v = xff.get_or_insert_with(Vec::new);
            if !v.is_empty() {
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(h.value);
            continue;
        }
        push_header(&mut head, h.name, h.value);
    }
    if let Some(fwd) = fwd {
        match xff {
            Some(mut before) => {
                before.extend_from_slice(b", ");
                before.extend_from_slice(fwd.xff.as_bytes());
                push_header(&mut head, "x-forwarded-for", &before);
            }
            None => push_header(&mut head, "x-forwarded-for", fwd.xff.as_bytes()),
        }
        push_header(&mut head, "forwarded", fwd.forwarded.as_bytes());
    } else if let Some(before) = xff {
        push_header(&mut head, "x-forwarded-for", &before);
    }
    if http10 {
        push_header(&mut head, "connection", b"close");
    } else if upgrade {
        push_header(&mut head, "connection", b"upgrade");
    }
    head.extend_from_slice(b"\r\n");
    Ok(Some(Request {
        head,
        head_len,
        body,
        target: method.len() + 1..method.len() + 1 + target.len(),
        is_head: method == "HEAD",
        repeatable: body == Framing::Empty
            && matches!(
                method,
                "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
            ),
        close,
        expects_continue: expects_continue && body != Framing::Empty,
        upgrade,
    }))
}

/// A response head as the client gets it.
struct Response {
    head: Vec<u8>,
    head_len: usize,
    /// 1xx: another head follows.
    interim: bool,
    body: Framing,
    /// The backend connection can take another request after this answer.
    reusable: bool,
    /// 101: the connection now carries the protocol the client asked for.
    switched: bool,
}

/// What a response answers, as far as its framing goes.
#[derive(Debug, Clone, Copy, Default)]
struct Asked {
    /// `HEAD`: no body, whatever the head says.
    head: bool,
    /// The client's connection closes after the answer (said in the head).
    close: bool,
    /// The client asked to switch protocols: a 101 is carried.
    upgrade: bool,
}

/// A response head as parsed: its length, status code, minor version and fields.
pub(super) struct Head<'h, 'b> {
    pub(super) len: usize,
    pub(super) code: u16,
    pub(super) version: u8,
    pub(super) headers: &'h [httparse::Header<'b>],
}

/// Parses the response head at the start of `buf` into `fields`; None while it is
/// incomplete.
pub(super) fn parse_head<'h, 'b>(
    buf: &'b [u8],
    fields: &'h mut [httparse::Header<'b>],
) -> Result<Option<Head<'h, 'b>>, String> {
    let mut resp = httparse::Response::new(fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err("the workload's response head is too large".into())
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("the workload sent a malformed response: {e}")),
    };
    let (Some(code), Some(version)) = (resp.code, resp.version) else {
        return Err("the workload sent a malformed response".into());
    };
    Ok(Some(Head {
        len,
        code,
        version,
        headers: resp.headers,
    }))
}

/// Parses a response head at the start of `buf`; None while it is incomplete.
fn parse_response(buf: &[u8], asked: Asked) -> Result<Option<Response>, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Some(Head {
        len: head_len,
        code,
        version,
        headers,
    }) = parse_head(buf, &mut fields)?
    else {
        return Ok(None);
    };
    let status_line = buf
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(&buf[..0], |end| &buf[..end + 2]);
    let switched = code == 101;
    if switched && !asked.upgrade {
        return Err("the workload switched protocols the client did not ask for".into());
    }
    let interim = !switched && (100..200).contains(&code);
    let AnswerFraming {
        body,
        reusable,
        coded: _,
    } = answer_framing(code, version, headers, interim || switched || asked.head)?;
    let reusable = reusable && !switched;
    let named = connection_names(headers);
    let mut head = Vec::with_capacity(head_len + 32);
    head.extend_from_slice(status_line);
    for h in headers {
        if !hop_by_hop(h.name, &named) || (switched && h.name.eq_ignore_ascii_case("upgrade")) {
            push_header(&mut head, h.name, h.value);
        }
    }
    if switched {
        push_header(&mut head, "connection", b"upgrade");
    } else if !interim && (asked.close || body == Framing::UntilClose) {
        push_header(&mut head, "connection", b"close");
    }
    head.extend_from_slice(b"\r\n");
    Ok(Some(Response {
        head,
        head_len,
        interim,
        body,
        reusable,
        switched,
    }))
}

/// What a response head's fields say of its body and of the connection after it.
pub(super) struct AnswerFraming {
    pub(super) body: Framing,
    /// The backend connection can take another request after this answer.
    pub(super) reusable: bool,
    /// The body has a transfer coding (any `Content-Length` beside it does not count).
    pub(super) coded: bool,
}

/// Reads a response head's framing fields. `no_body`: the answer has none whatever its
/// fields say (a HEAD's, an interim one, a switch); a 204 or 304 never has one.
pub(super) fn answer_framing(
    code: u16,
    version: u8,
    headers: &[httparse::Header<'_>],
    no_body: bool,
) -> Result<AnswerFraming, String> {
    let mut length: Option<u64> = None;
    let mut chunked: Option<bool> = None;
    let mut close = version == 0;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = content_length(h.value).ok_or("the workload sent an invalid Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("the workload sent conflicting Content-Length fields".into());
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = Some(ends_chunked(h.value));
        } else if h.name.eq_ignore_ascii_case("connection") {
            if has_token(h.value, "close") {
                close = true;
            } else if version == 0 && has_token(h.value, "keep-alive") {
                close = false;
            }
        }
    }
    let body = if no_body || code == 204 || code == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) | (None, None) => Framing::UntilClose,
            (None, Some(0)) => Framing::Empty,
            (None, Some(n)) => Framing::Length(n),
        }
    };
    // A length beside a transfer coding: the coding wins, and the connection is not
    // trusted with another request.
    let reusable =
        !(close || body == Framing::UntilClose || (chunked.is_some() && length.is_some()));
    Ok(AnswerFraming {
        body,
        reusable,
        coded: chunked.is_some(),
    })
}

/// Finds where a chunked body ends, a byte at a time as it streams past.
#[derive(Debug, Default)]
struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy)]
enum ChunkState {
    #[default]
    SizeStart,
    Size {
        size: u64,
        ext: bool,
    },
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// Inside the trailer section; `len` counts the current line.
    Trailer {
        len: usize,
    },
    TrailerLf {
        len: usize,
    },
    Done,
}

impl Chunked {
    fn done(&self) -> bool {
        matches!(self.state, ChunkState::Done)
    }

    /// How many bytes of `data` belong to the body (all, unless it ends inside).
    fn scan(&mut self, data: &[u8]) -> Result<usize, &'static str> {
        use ChunkState as S;
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            self.state = match self.state {
                S::Done => return Ok(i),
                S::Data(left) => {
                    let take = left.min((data.len() - i) as u64);
                    i += take as usize;
                    self.state = if take == left {
                        S::DataCr
                    } else {
                        S::Data(left - take)
                    };
                    continue;
                }
                S::SizeStart => match (b as char).to_digit(16) {
                    Some(d) => S::Size {
                        size: u64::from(d),
                        ext: false,
                    },
                    None => return Err("a chunk size is missing"),
                },
                S::Size { size, ext: false } => match (b as char).to_digit(16) {
                    Some(d) => S::Size {
                        size: size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(u64::from(d)))
                            .ok_or("a chunk size is too large")?,
                        ext: false,
                    },
                    None if b == b'\r' => S::SizeLf(size),
                    None if b == b';' || b == b' ' || b == b'\t' => S::Size { size, ext: true },
                    None => return Err("a chunk size is malformed"),
                },
                S::Size { size, ext: true } => match b {
                    b'\r' => S::SizeLf(size),
                    b'\n' => return Err("a chunk line ends without CR"),
                    _ => S::Size { size, ext: true },
                },
                S::SizeLf(size) => match (b, size) {
                    (b'\n', 0) => S::Trailer { len: 0 },
                    (b'\n', n) => S::Data(n),
                    _ => return Err("a chunk line ends without LF"),
                },
                S::DataCr if b == b'\r' => S::DataLf,
                S::DataLf if b == b'\n' => S::SizeStart,
                S::DataCr | S::DataLf => return Err("a chunk is longer than its size"),
                S::Trailer { len } => match b {
                    b'\r' => S::TrailerLf { len },
                    _ if len >= MAX_HEAD => return Err("the trailer section is too large"),
                    _ => S::Trailer { len: len + 1 },
                },
                S::TrailerLf { len } => match (b, len) {
                    (b'\n', 0) => S::Done,
                    (b'\n', _) => S::Trailer { len: 0 },
                    _ => return Err("a trailer line ends without LF"),
                },
            };
            i += 1;
        }
        Ok(i)
    }
}

/// Where copying a message broke.
#[derive(Debug)]
enum Broke {
    /// Reading the side that sends the message (or it ended early).
    Src(io::Error),
    /// Writing the side that receives it.
    Dst(io::Error),
    /// The body's framing is broken.
    Framing(&'static str),
}

impl std::fmt::Display for Broke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broke::Src(e) => write!(f, "reading: {e}"),
            Broke::Dst(e) => write!(f, "writing: {e}"),
            Broke::Framing(e) => f.write_str(e),
        }
    }
}

/// Sends `head` and then the body framed by `body`, from what `buf` holds and then from
/// `src`, to `dst`. The head goes out with the body's first bytes, in one write.
async fn relay<R, W>(
    head: &mut Vec<u8>,
    body: Framing,
    src: &mut R,
    buf: &mut Buffer,
    dst: &mut W,
) -> Result<(), Broke>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut left = match body {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut chunks = Chunked::default();
    loop {
        let avail = buf.filled();
        let take = match body {
            Framing::Empty => 0,
            Framing::Length(_) => left.min(avail.len() as u64) as usize,
            Framing::Chunked => chunks.scan(avail).map_err(Broke::Framing)?,
            Framing::UntilClose => avail.len(),
        };
        if head.is_empty() {
            if take > 0 {
                dst.write_all(&avail[..take]).await.map_err(Broke::Dst)?;
            }
        } else {
            head.extend_from_slice(&avail[..take]);
            dst.write_all(head).await.map_err(Broke::Dst)?;
            head.clear();
        }
        buf.consume(take);
        if let Framing::Length(_) = body {
            left -= take as u64;
        }
        let finished = match body {
            Framing::Empty => true,
            Framing::Length(_) => left == 0,
            Framing::Chunked => chunks.done(),
            Framing::UntilClose => false,
        };
        if finished {
            return Ok(());
        }
        match buf.fill(src).await {
            Ok(0) if body == Framing::UntilClose => return Ok(()),
            Ok(0) => {
                return Err(Broke::Src(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the message ended before its body",
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(Broke::Src(e)),
        }
    }
}

/// A connection to the workload (its port here, or a tunnel to its peer), kept between
/// requests while the route's target stays the same.
pub(super) struct Backend {
    pub(super) target: Target,
    pub(super) r: Reader,
    pub(super) w: Writer,
    pub(super) buf: Buffer,
}

impl Backend {
    /// The workload closed this kept connection (or sent bytes nobody asked for) since
    /// its last answer: it takes no more requests. Looks without waiting: a connection
    /// with nothing to read, the usual case, costs no syscall.
    pub(super) fn went_away(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let mut probe = tokio::io::ReadBuf::new(&mut byte);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::pin::Pin::new(&mut self.r)
            .poll_read(&mut cx, &mut probe)
            .is_ready()
    }
}

/// Why a request got no answer from the workload.
enum Failed {
    /// Before any byte of the answer reached the client: it can be told (502).
    /// `retry`: nothing came back at all on a kept connection.
    Early { reason: String, retry: bool },
    /// The client got part of an answer, or is gone: the connection ends.
    Late(String),
}

struct Conn {
    client: TcpStream,
    cbuf: Buffer,
    /// The connection is closed with a request's body (or more) maybe still coming: the
    /// client gets time to read its answer before the close (see [`Conn::linger`]).
    unread: bool,
    backend: Option<Backend>,
    rx: watch::Receiver<Target>,
    fwd: Option<Arc<Forwarding>>,
    route: Arc<RouteSpec>,
    routed: Arc<Routed>,
    peers: Arc<PeerLink>,
    limits: HoldLimits,
}

impl Conn {
    async fn run(&mut self) -> io::Result<End> {
        let mut first = true;
        // One timer per connection, moved on only when it fires: a request does not
        // pay for arming one.
        let mut deadline = Instant::now() + HEADER_READ_TIMEOUT;
        let timer = tokio::time::sleep_until(deadline.into());
        tokio::pin!(timer);
        loop {
            deadline = Instant::now() + HEADER_READ_TIMEOUT;
            let req = loop {
                if first && !self.cbuf.is_empty() {
                    let got = self.cbuf.filled();
                    let n = got.len().min(PREFACE.len());
                    if got[..n] == PREFACE[..n] {
                        if n == PREFACE.len() {
                            return Ok(End::Http2);
                        }
                    } else {
                        first = false;
                    }
                }
                if !first && !self.cbuf.is_empty() {
                    match parse_request(self.cbuf.filled(), self.fwd.as_deref()) {
                        Ok(Some(r)) => break r,
                        Ok(None) => {}
                        Err(Refused(status, why)) => {
                            self.answer(status, why, &[], true).await?;
                            self.unread = true;
                            return Ok(End::Closed);
                        }
                    }
                }
                tokio::select! {
                    biased;
                    r = self.cbuf.fill(&mut self.client) => {
                        if r? == 0 {
                            return Ok(End::Closed);
                        }
                    }
                    () = &mut timer => {
                        if Instant::now() >= deadline {
                            tracing::debug!("client sent no complete request head in time; closing");
                            return Ok(End::Closed);
                        }
                        timer.as_mut().reset(deadline.into());
                    }
                }
            };
            self.cbuf.consume(req.head_len);
            if !self.exchange(req).await? {
                return Ok(End::Closed);
            }
        }
    }

    /// One request: held while the workload moves, then redirected or forwarded.
    /// Returns whether the client connection stays open.
    async fn exchange(&mut self, req: Request) -> io::Result<bool> {
        if self.rx.has_changed().unwrap_or(true) {
            self.backend = None;
        }
        let with_body = req.body != Framing::Empty;
        let Some(target) = wait_for_target(&mut self.rx, &self.routed, &self.limits).await else {
            let text = http::unavailable_text(&self.routed.workload);
            self.answer(503, &text, &[("retry-after", "1")], req.close || with_body)
                .await?;
            self.unread = with_body;
            return Ok(!(req.close || with_body));
        };
        // A protocol switch is carried, not redirected: WebSocket clients do not follow
        // redirects.
        if let (Target::Remote(peer), true) = (&target, self.route.redirect && !req.upgrade) {
            let path = std::str::from_utf8(&req.head[req.target.clone()]).unwrap_or("/");
            if let Some((location, alt_svc)) =
                http::redirect_to(&self.route, peer, &self.peers, path)
            {
                let close = req.close || with_body;
                self.answer(
                    307,
                    &format!("moved to site {peer}\n"),
                    &[("location", &location), ("alt-svc", &alt_svc)],
                    close,
                )
                .await?;
                self.unread = with_body;
                return Ok(!close);
            }
        }
        self.routed.bound.fetch_add(1, Ordering::SeqCst);
        let outcome = self.forward(req, &target).await;
        self.routed.bound.fetch_sub(1, Ordering::SeqCst);
        self.routed.unbound.notify_waiters();
        match outcome {
            Ok(keep) => Ok(keep),
            Err(Failed::Early { reason, .. }) => {
                tracing::warn!(workload = %self.routed.workload, ?target, error = %reason, "cannot forward a request");
                let text = http::unreachable_text(&self.routed.workload, &reason);
                self.answer(502, &text, &[], true).await?;
                Ok(false)
            }
            Err(Failed::Late(reason)) => {
                tracing::debug!(workload = %self.routed.workload, error = %reason, "answer cut off; closing the client connection");
                Ok(false)
            }
        }
    }

    /// Sends `req` to `target` and relays the answer. A kept connection that fails
    /// before answering is dialled again once, for a request that may be repeated.
    async fn forward(&mut self, mut req: Request, target: &Target) -> Result<bool, Failed> {
        if self
            .backend
            .as_mut()
            .is_some_and(|b| b.target != *target || b.went_away())
        {
            self.backend = None;
        }
        let mut retried = false;
        loop {
            let kept = self.backend.is_some();
            let backend = match self.backend.take() {
                Some(b) => b,
                None => {
                    let (r, w) =
                        dial(target, &self.routed, &self.peers)
                            .await
                            .map_err(|reason| Failed::Early {
                                reason,
                                retry: false,
                            })?;
                    Backend {
                        target: target.clone(),
                        r,
                        w,
                        buf: Buffer::new(),
                    }
                }
            };
            match self.forward_on(&mut req, backend, kept).await {
                Err(Failed::Early { retry: true, .. }) if req.repeatable && !retried => {
                    tracing::debug!("kept backend connection closed; dialling again");
                    retried = true;
                }
                other => return other,
            }
        }
    }

    async fn forward_on(
        &mut self,
        req: &mut Request,
        mut b: Backend,
        kept: bool,
    ) -> Result<bool, Failed> {
        let early = |reason: String, retry: bool| Failed::Early {
            reason,
            retry: retry && kept,
        };
        if req.body == Framing::Empty {
            b.w.write_all(&req.head)
                .await
                .map_err(|e| early(format!("sending the request: {e}"), true))?;
        } else {
            if req.expects_continue && self.cbuf.is_empty() {
                self.client
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await
                    .map_err(|e| Failed::Late(e.to_string()))?;
            }
            let mut head = std::mem::take(&mut req.head);
            let sent = relay(
                &mut head,
                req.body,
                &mut self.client,
                &mut self.cbuf,
                &mut b.w,
            )
            .await;
            match sent {
                Ok(()) => {}
                Err(Broke::Dst(e)) => {
                    // The workload stopped taking the body: it may have answered first.
                    let reason = format!("sending the request: {e}");
                    return self.relay_early_answer(b, req.asked(), reason).await;
                }
                Err(other) => return Err(Failed::Late(format!("client request body: {other}"))),
            }
        }
        let asked = req.asked();
        let mut received = false;
        loop {
            let resp = loop {
                if !b.buf.is_empty() {
                    match parse_response(b.buf.filled(), asked) {
                        Ok(Some(r)) => break r,
                        Ok(None) => {}
                        Err(reason) => return Err(early(reason, false)),
                    }
                }
                match b.buf.fill(&mut b.r).await {
                    Ok(0) => {
                        return Err(early(
                            "the workload closed the connection without answering".into(),
                            !received,
                        ))
                    }
                    Ok(_) => received = true,
                    Err(e) => return Err(early(format!("reading the answer: {e}"), !received)),
                }
            };
            b.buf.consume(resp.head_len);
            let mut head = resp.head;
            relay(&mut head, resp.body, &mut b.r, &mut b.buf, &mut self.client)
                .await
                .map_err(|e| Failed::Late(format!("relaying the answer: {e}")))?;
            if resp.interim {
                continue;
            }
            if resp.switched {
                self.carry_switched(b).await;
                return Ok(false);
            }
            if resp.reusable && b.buf.is_empty() {
                self.backend = Some(b);
            }
            return Ok(!req.close && resp.body != Framing::UntilClose);
        }
    }

    /// The workload closed its side before it had the whole request body: if it
    /// answered first (an early 413, say), the client gets that answer and the connection
    /// closes after it; otherwise 502 (`reason`).
    async fn relay_early_answer(
        &mut self,
        mut b: Backend,
        asked: Asked,
        reason: String,
    ) -> Result<bool, Failed> {
        let asked = Asked {
            close: true,
            upgrade: false,
            ..asked
        };
        let resp = loop {
            match parse_response(b.buf.filled(), asked) {
                Ok(Some(r)) if r.interim => b.buf.consume(r.head_len),
                Ok(Some(r)) => break Some(r),
                Ok(None) => {}
                Err(_) => break None,
            }
            // What it sent before it closed is in the socket already.
            match tokio::time::timeout(EARLY_ANSWER_WAIT, b.buf.fill(&mut b.r)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => break None,
            }
        };
        let Some(resp) = resp else {
            return Err(Failed::Early {
                reason,
                retry: false,
            });
        };
        tracing::debug!(workload = %self.routed.workload, "the workload answered before it read the whole request body");
        self.unread = true;
        b.buf.consume(resp.head_len);
        let mut head = resp.head;
        relay(&mut head, resp.body, &mut b.r, &mut b.buf, &mut self.client)
            .await
            .map_err(|e| Failed::Late(format!("relaying the answer: {e}")))?;
        Ok(false)
    }

    /// Closes a connection whose client may still be sending (a body nobody reads):
    /// the write side first, then what still comes is read and dropped, for a while,
    /// so the kernel does not answer it with a reset that could destroy the answer
    /// before the client has read it.
    async fn linger(&mut self) {
        if self.client.shutdown().await.is_err() {
            return;
        }
        let until = tokio::time::Instant::now() + LINGER;
        loop {
            self.cbuf.clear();
            let read = tokio::time::timeout_at(
                until.min(tokio::time::Instant::now() + LINGER_IDLE),
                self.cbuf.fill(&mut self.client),
            );
            if !matches!(read.await, Ok(Ok(n)) if n > 0) {
                break;
            }
        }
    }

    /// After a 101: the connection carries the new protocol (a WebSocket, say) both ways,
    /// bytes as they come, until either side ends it. When the workload is about to move
    /// the client's bytes stop reaching it, what it already sent reaches the client (up
    /// to its next quiet moment, bounded by the drain limit), and the connection closes:
    /// a switched protocol's session cannot go on at another copy, and a closed
    /// connection tells the client to open a new one, which is held until the move ends.
    async fn carry_switched(&mut self, mut b: Backend) {
        // Bytes that came with the handshake, either way, go first.
        if !b.buf.is_empty() && self.client.write_all(b.buf.filled()).await.is_err() {
            return;
        }
        if !self.cbuf.is_empty() && b.w.write_all(self.cbuf.filled()).await.is_err() {
            return;
        }
        self.cbuf.clear();
        let outcome = tcp::pump(
            &mut self.client,
            b.r,
            b.w,
            &mut self.rx,
            &b.target,
            &self.limits,
        )
        .await;
        if let tcp::Outcome::Rebind = outcome {
            tracing::debug!(workload = %self.routed.workload, "switched-protocol connection closed: the workload moves");
        }
        let _ = self.client.shutdown().await;
    }

    /// A short answer from the proxy itself.
    async fn answer(
        &mut self,
        status: u16,
        text: &str,
        headers: &[(&str, &str)],
        close: bool,
    ) -> io::Result<()> {
        let reason = hyper::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let mut out = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
            text.len()
        );
        for (name, value) in headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        if close {
            out.push_str("connection: close\r\n");
        }
        out.push_str("\r\n");
        out.push_str(text);
        self.client.write_all(out.as_bytes()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd() -> Forwarding {
        Forwarding::new("10.213.0.9".parse().unwrap()).unwrap()
    }

    fn asked(head: bool, close: bool) -> Asked {
        Asked {
            head,
            close,
            upgrade: false,
        }
    }

    fn text(v: &[u8]) -> &str {
        std::str::from_utf8(v).unwrap()
    }

    #[test]
    fn a_request_head_loses_hop_by_hop_fields_and_names_the_client() {
        let raw = b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\n\
                    Keep-Alive: timeout=5\r\nX-Secret: hop\r\nUpgrade: websocket\r\n\
                    X-Forwarded-For: 192.0.2.7\r\nX-Kept: yes\r\n\r\nNEXT";
        let r = parse_request(raw, Some(&fwd())).unwrap().unwrap();
        assert_eq!(r.head_len, raw.len() - 4);
        assert_eq!(
            text(&r.head),
            "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Kept: yes\r\n\
             x-forwarded-for: 192.0.2.7, 10.213.0.9\r\nforwarded: for=10.213.0.9;proto=http\r\n\r\n"
        );
        assert_eq!(&r.head[r.target.clone()], b"/a?b=1");
        assert_eq!(r.body, Framing::Empty);
        assert!(r.repeatable && !r.close && !r.is_head);
        // Not complete yet.
        assert!(parse_request(&raw[..20], None).unwrap().is_none());
    }

    #[test]
    fn request_bodies_are_framed_once_or_refused() {
        let parse = |h: &str| parse_request(format!("POST / HTTP/1.1\r\n{h}\r\n").as_bytes(), None);
        assert_eq!(
            parse("Content-Length: 5\r\n").unwrap().unwrap().body,
            Framing::Length(5)
        );
        let chunked = parse("Transfer-Encoding: gzip, chunked\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(chunked.body, Framing::Chunked);
        assert!(!chunked.repeatable);
        for bad in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: +5\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
        ] {
            assert_eq!(parse(bad).err().map(|r| r.0), Some(400), "{bad}");
        }
        // An HTTP/1.0 client's connection closes after its answer, and the workload is told.
        let old = parse_request(b"GET / HTTP/1.0\r\n\r\n", None)
            .unwrap()
            .unwrap();
        assert!(old.close);
        assert!(text(&old.head).contains("connection: close\r\n"));
        let expect = parse("Content-Length: 3\r\nExpect: 100-continue\r\n")
            .unwrap()
            .unwrap();
        assert!(expect.expects_continue);
        assert!(!text(&expect.head).to_ascii_lowercase().contains("expect"));
    }

    #[test]
    fn a_response_head_is_framed_and_says_whether_the_backend_can_be_kept() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nok\n", asked(false, false))
        .unwrap()
        .unwrap();
        assert_eq!(
            text(&r.head),
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
        );
        assert_eq!(r.body, Framing::Length(3));
        assert!(r.reusable && !r.interim);
        // No length: the body runs to the end, and both connections close after it.
        let r = parse_response(b"HTTP/1.1 200 OK\r\n\r\n", asked(false, false))
            .unwrap()
            .unwrap();
        assert_eq!(r.body, Framing::UntilClose);
        assert!(!r.reusable);
        assert!(text(&r.head).ends_with("connection: close\r\n\r\n"));
        // An answer to HEAD has no body, whatever its length says.
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            asked(true, true),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.body, Framing::Empty);
        assert!(text(&r.head).ends_with("connection: close\r\n\r\n"));
        let r = parse_response(b"HTTP/1.1 100 Continue\r\n\r\n", asked(false, false))
            .unwrap()
            .unwrap();
        assert!(r.interim);
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            asked(false, false),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.body, Framing::Chunked);
        assert!(!r.reusable);
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            asked(false, false)
        )
        .is_err());
    }

    #[test]
    fn a_protocol_switch_keeps_its_upgrade_fields_both_ways() {
        let raw = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n\
                    Upgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n";
        let r = parse_request(raw, None).unwrap().unwrap();
        assert!(r.upgrade);
        assert_eq!(
            text(&r.head),
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\
             connection: upgrade\r\n\r\n"
        );
        // `Upgrade` alone, not named by `Connection`, is a hop-by-hop field like any other;
        // and HTTP/1.0 cannot switch.
        for raw in [
            &b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"[..],
            b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        ] {
            let r = parse_request(raw, None).unwrap().unwrap();
            assert!(!r.upgrade && !text(&r.head).to_ascii_lowercase().contains("upgrade"));
        }
        let switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                       Connection: Upgrade\r\nSec-WebSocket-Accept: a\r\n\r\nframes";
        let asked_upgrade = Asked {
            upgrade: true,
            ..Asked::default()
        };
        let r = parse_response(switch, asked_upgrade).unwrap().unwrap();
        assert!(r.switched && !r.interim && !r.reusable);
        assert_eq!(r.body, Framing::Empty);
        assert_eq!(r.head_len, switch.len() - b"frames".len());
        assert_eq!(
            text(&r.head),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Accept: a\r\nconnection: upgrade\r\n\r\n"
        );
        // A switch nobody asked for is the workload's error.
        assert!(parse_response(switch, asked(false, false)).is_err());
    }

    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_and_trailers_end() {
        let body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\nGET /next";
        let end = body.len() - b"GET /next".len();
        // Whole, and a byte at a time.
        let mut c = Chunked::default();
        assert_eq!(c.scan(body), Ok(end));
        assert!(c.done());
        let mut c = Chunked::default();
        let mut taken = 0;
        for b in body {
            taken += c.scan(std::slice::from_ref(b)).unwrap();
            if c.done() {
                break;
            }
        }
        assert_eq!(taken, end);
        let mut c = Chunked::default();
        assert_eq!(c.scan(b"3\r\nabc\r\n"), Ok(8));
        assert!(!c.done());
        for bad in [
            &b"x\r\n"[..],
            b"3\r\nabcd\r\n",
            b"3\nabc",
            b"fffffffffffffffff\r\n",
        ] {
            assert!(Chunked::default().scan(bad).is_err(), "{:?}", text(bad));
        }
    }

    #[tokio::test]
    async fn a_kept_backend_the_workload_closed_is_not_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = |s: TcpStream| {
            let (r, w) = s.into_split();
            Backend {
                target: Target::Local,
                r: Box::new(r),
                w: Box::new(w),
                buf: Buffer::new(),
            }
        };
        let mut open = backend(TcpStream::connect(addr).await.unwrap());
        let (kept, _) = listener.accept().await.unwrap();
        let mut closed = backend(TcpStream::connect(addr).await.unwrap());
        drop(listener.accept().await.unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!open.went_away());
        assert!(closed.went_away());
        drop(kept);
    }

    #[tokio::test]
    async fn relay_sends_the_head_with_the_first_body_bytes_and_keeps_what_follows() {
        let mut buf = Buffer::new();
        let pipelined = b"hello world!GET / HTTP/1.1\r\n";
        buf.data[..pipelined.len()].copy_from_slice(pipelined);
        buf.end = pipelined.len();
        let mut head = b"HEAD\r\n".to_vec();
        let mut out = Vec::new();
        let mut src: &[u8] = b"";
        relay(&mut head, Framing::Length(12), &mut src, &mut buf, &mut out)
            .await
            .unwrap();
        assert_eq!(out, b"HEAD\r\nhello world!");
        assert_eq!(buf.filled(), b"GET / HTTP/1.1\r\n");
        // A chunked body that arrives in pieces.
        let mut buf = Buffer::new();
        let mut src: &[u8] = b"\r\nabc\r\n0\r\n\r\nrest";
        buf.data[..1].copy_from_slice(b"3");
        buf.end = 1;
        let mut out = Vec::new();
        relay(
            &mut Vec::new(),
            Framing::Chunked,
            &mut src,
            &mut buf,
            &mut out,
        )
        .await
        .unwrap();
        assert_eq!(out, b"3\r\nabc\r\n0\r\n\r\n");
        assert_eq!(buf.filled(), b"rest");
        // A body cut short is an error, not a short message.
        let mut src: &[u8] = b"abc";
        let mut buf = Buffer::new();
        let err = relay(
            &mut Vec::new(),
            Framing::Length(10),
            &mut src,
            &mut buf,
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Broke::Src(_)), "{err}");
    }
}
