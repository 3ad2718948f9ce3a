//! Clients keep working through a migration: a constant-rate Redis client talks to the
//! workload through site A's ingress while it moves to site B, and sees no failed request;
//! every write it got an answer for is at B afterwards.

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_e2e::{Options, TwoSites};
use serde_json::Value;

const PORT: u16 = 6379;
const ROUTE: &str = "0.0.0.0:16379";

#[test]
fn clients_see_no_failed_request_while_redis_moves() -> Result<()> {
    let sites = TwoSites::start(Options::new("ingr"))?;
    sites.run_redis_at_a_with("redis", PORT, &["--route", ROUTE])?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "50000", "bulk", "100"])?;
    let acked = sites.root.join("acked.txt");
    // 500 requests/s for 4 s over 4 connections, through A's ingress.
    let client = sites
        .a
        .start_load("redis", "127.0.0.1:16379", "500", "4", "4", &acked)?;
    std::thread::sleep(Duration::from_millis(1200));
    let (ok, m) = sites.migrate("redis", "b")?;
    let out = client.finish()?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert!(out.ok, "{}", out.stderr);
    let summary = out.summary;
    eprintln!("client: {summary}\nmigration timings: {}", m["timings"]);
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["ok"], summary["requests"], "{summary}");

    // Every acknowledged write is at B.
    let keys: Vec<String> = std::fs::read_to_string(&acked)?
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(keys.len(), 2000);
    for chunk in keys.chunks(500) {
        let mut args = vec!["EXISTS"];
        args.extend(chunk.iter().map(String::as_str));
        assert_eq!(sites.b.redis(PORT, &args)?, chunk.len().to_string());
    }
    // B serves the route itself; A still forwards new clients to B through the peer link.
    let via_b = sites.b.exec("redis-cli", &["-p", "16379", "GET", "k0"])?;
    assert_eq!(via_b.trim(), "0");
    let via_a = sites.a.exec("redis-cli", &["-p", "16379", "GET", "k1"])?;
    assert_eq!(via_a.trim(), "1");
    // A lists the route as forwarded to B; B serves it.
    let routes = sites.a.ferry_json(&["route", "ls"])?;
    assert_eq!(routes[0]["workload"], "redis", "{routes}");
    assert_eq!(routes[0]["target"], "peer:b", "{routes}");
    assert_eq!(routes[0]["routes"][0]["listen"], ROUTE, "{routes}");
    let routes = sites.b.ferry_json(&["route", "ls"])?;
    assert_eq!(routes[0]["target"], "local", "{routes}");
    let table = sites.a.ferry(&["route", "ls"])?;
    assert!(
        table.contains("peer:b") && table.contains("0.0.0.0:16379"),
        "{table}"
    );
    // The metrics say so too.
    let at_a = sites.a.metrics()?;
    for line in [
        "ferry_migrations{role=\"source\",phase=\"completed\"} 1",
        "ferry_ingress_target{workload=\"redis\",target=\"peer:b\"} 1",
        "ferry_migration_freeze_milliseconds_count 1",
    ] {
        assert!(at_a.contains(line), "{line} missing:\n{at_a}");
    }
    let at_b = sites.b.metrics()?;
    for line in [
        "ferry_workloads{state=\"running\"} 1",
        "ferry_ingress_target{workload=\"redis\",target=\"local\"} 1",
    ] {
        assert!(at_b.contains(line), "{line} missing:\n{at_b}");
    }
    // B runs the workload: its routes are not forwarding routes to drop.
    let out = sites.b.ferry_output(&["route", "rm", "redis"])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ferry workload rm"), "{stderr}");
    // A stops forwarding: its route closes, B keeps serving.
    sites.a.ferry(&["route", "rm", "redis"])?;
    assert_eq!(sites.a.ferry_json(&["route", "ls"])?, serde_json::json!([]));
    assert!(
        sites
            .a
            .exec("bash", &["-c", "exec 3<>/dev/tcp/127.0.0.1/16379"])
            .is_err(),
        "A's route still accepts connections"
    );
    assert_eq!(sites.b.redis(PORT, &["GET", "k0"])?, "0");
    Ok(())
}

/// A stateful HTTP workload: POST /inc counts, GET / answers the count. A thread per
/// connection and no Nagle delay, as keep-alive clients connecting directly would need
/// (the ingress keeps one backend connection per client connection).
const COUNTER: &str = r#"
import http.server, sys, threading
count = 0
lock = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def reply(self, body):
        body = str(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        global count
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with lock:
            count += 1
            now = count
        self.reply(now)
    def do_GET(self):
        if self.path == "/who":
            self.reply(self.headers.get("X-Forwarded-For", "-") + " " + str(self.headers.get("Connection")))
            return
        self.reply(count)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

fn run_counter(sites: &TwoSites, route: &str) -> Result<()> {
    let script = sites.work_root.join("counter.py");
    std::fs::create_dir_all(&sites.work_root)?;
    std::fs::write(&script, COUNTER)?;
    let script = script.display().to_string();
    sites.a.ferry(&[
        "workload", "run", "counter", "--port", "8080", "--route", route, "--", "python3", &script,
        "8080",
    ])?;
    Ok(())
}

fn http_load(sites: &TwoSites, rate: &str, seconds: &str) -> Result<ferry_e2e::Load> {
    load_as(sites, "http", rate, seconds)
}

/// `ferry-load` in `mode` (`http` or `http2`) over 4 connections to A's route on 18080.
fn load_as(sites: &TwoSites, mode: &str, rate: &str, seconds: &str) -> Result<ferry_e2e::Load> {
    let acked = sites.root.join(format!("acked-{mode}.txt"));
    sites
        .a
        .start_load(mode, "127.0.0.1:18080", rate, seconds, "4", &acked)
}

/// Moves the counter to B while `mode` clients send 300 requests/s for 4 s: none fails
/// or is turned away, and the count at B is the acknowledged increments, each once.
/// Returns the client's summary and the migration record.
fn counter_moves_under_load(sites: &TwoSites, mode: &str) -> Result<(Value, Value)> {
    let client = load_as(sites, mode, "300", "4")?;
    std::thread::sleep(Duration::from_millis(1200));
    let (ok, m) = sites.migrate("counter", "b")?;
    let out = client.finish()?;
    assert!(ok, "{m}\n{}", sites.logs());
    let summary = out.summary;
    eprintln!("client: {summary}\nmigration timings: {}", m["timings"]);
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["unavailable"], 0, "{summary}");
    assert_eq!(summary["ok"], summary["requests"], "{summary}");
    let count = sites.b.exec("curl", &["-s", "http://127.0.0.1:18080/"])?;
    assert_eq!(count.trim(), summary["ok"].to_string());
    Ok((summary, m))
}

#[test]
fn http_clients_see_no_failed_request_while_the_service_moves() -> Result<()> {
    // This pair of sites sends images uncompressed (the other tests use zstd).
    let mut opts = Options::new("ihttp");
    opts.compression = "none".into();
    let sites = TwoSites::start(opts)?;
    run_counter(&sites, "http:0.0.0.0:18080")?;
    let (summary, m) = counter_moves_under_load(&sites, "http")?;
    assert!(
        m["bytes_on_wire"].as_u64() > m["bytes_moved"].as_u64(),
        "uncompressed: every byte plus framing travels: {m}"
    );
    // Through A's route, clients reach B over the peer link.
    let via_a = sites.a.exec("curl", &["-s", "http://127.0.0.1:18080/"])?;
    assert_eq!(via_a.trim(), summary["ok"].to_string());
    // The workload learns who the client was, through either route; hop-by-hop
    // headers stop at the ingress.
    let who = sites.a.exec(
        "curl",
        &[
            "-s",
            "-H",
            "Connection: keep-alive",
            "http://127.0.0.1:18080/who",
        ],
    )?;
    assert_eq!(who.trim(), "127.0.0.1 None", "{who}");
    // HTTP/2 clients (prior knowledge) too, at either site.
    for site in [&sites.a, &sites.b] {
        let h2 = site.exec(
            "curl",
            &[
                "-s",
                "--http2-prior-knowledge",
                "-w",
                " %{http_version}",
                "http://127.0.0.1:18080/",
            ],
        )?;
        assert_eq!(
            h2.trim(),
            format!("{} 2", summary["ok"]),
            "at {}",
            site.name
        );
    }
    Ok(())
}

#[test]
fn http2_clients_see_no_failed_request_while_the_service_moves() -> Result<()> {
    let sites = TwoSites::start(Options::new("ih2mv"))?;
    run_counter(&sites, "http:0.0.0.0:18080")?;
    // Four HTTP/2 connections (prior knowledge), one stream at a time each: the streams
    // due during the freeze are held, then answered by B through the peer link.
    counter_moves_under_load(&sites, "http2")?;
    Ok(())
}

#[test]
fn requests_held_past_the_bound_get_503_with_retry_after() -> Result<()> {
    let mut opts = Options::new("i503");
    opts.ingress_max_hold_ms = Some(100);
    let sites = TwoSites::start(opts)?;
    run_counter(&sites, "http:0.0.0.0:18080")?;
    // A slow link keeps the workload frozen for seconds, far past the 100 ms hold bound.
    sites.a.limit_egress("20mbit")?;
    let client = http_load(&sites, "100", "4")?;
    std::thread::sleep(Duration::from_millis(500));
    let (ok, m) = sites.migrate("counter", "b")?;
    let out = client.finish()?;
    assert!(ok, "{m}\n{}", sites.logs());
    let summary = out.summary;
    eprintln!("client: {summary}\nmigration timings: {}", m["timings"]);
    assert!(
        summary["unavailable"].as_u64().unwrap_or(0) > 0,
        "no request was held past the bound: {summary}"
    );
    // Every request got an answer: 200, or 503 with Retry-After; none silently dropped.
    assert_eq!(summary["failed"], 0, "{summary}");
    let answered =
        summary["ok"].as_u64().unwrap_or(0) + summary["unavailable"].as_u64().unwrap_or(0);
    assert_eq!(
        answered,
        summary["requests"].as_u64().unwrap_or(0),
        "{summary}"
    );
    Ok(())
}

#[test]
fn http_redirect_routes_send_clients_to_the_new_site() -> Result<()> {
    let sites = TwoSites::start(Options::new("iredir"))?;
    run_counter(&sites, "http-redirect:0.0.0.0:18080")?;
    sites
        .a
        .exec("curl", &["-s", "-X", "POST", "http://127.0.0.1:18080/inc"])?;
    let (ok, m) = sites.migrate("counter", "b")?;
    assert!(ok, "{m}");
    let head = sites.a.exec(
        "curl",
        &[
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "http://127.0.0.1:18080/x?y=1",
        ],
    )?;
    assert!(head.starts_with("HTTP/1.1 307"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains(&format!("location: http://{}:18080/x?y=1", sites.b.addr)),
        "{head}"
    );
    assert!(lower.contains("alt-svc:"), "{head}");
    // Following the redirect reaches the moved service, state intact.
    let count = sites
        .a
        .exec("curl", &["-s", "-L", "http://127.0.0.1:18080/"])?;
    assert_eq!(count.trim(), "1");
    Ok(())
}

/// Holds `n` client connections open through the route at `addr` (each answered once).
const HOLD_CLIENTS: &str = r#"
import socket, sys, time
socks = []
for i in range(int(sys.argv[2])):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
    s.sendall(b"PING\r\n")
    s.recv(64)
    socks.append(s)
print("open", flush=True)
time.sleep(120)
"#;

#[test]
fn many_forwarded_clients_do_not_starve_the_peer_link() -> Result<()> {
    let sites = TwoSites::start(Options::new("credit"))?;
    sites.run_redis_at_a_with("redis", PORT, &["--route", ROUTE])?;
    let (ok, m) = sites.migrate("redis", "b")?;
    assert!(ok, "{m}");
    // 150 idle clients of A's route, each a tunnel (a QUIC stream) to B.
    let mut holder = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", sites.a.netns))
        .args(["python3", "-c", HOLD_CLIENTS, "16379", "150"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    if let Some(out) = holder.stdout.take() {
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
    }
    let held = line.trim() == "open";
    // The link still carries control requests (a probe, then a migration back).
    let started = std::time::Instant::now();
    let mut probe = sites.a.ferry_cmd(&["--output", "json", "peer", "ls"])?;
    let mut child = probe.stdout(std::process::Stdio::piped()).spawn()?;
    let answered = loop {
        if let Some(status) = child.try_wait()? {
            break status.success();
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let back = if answered {
        let out = sites
            .b
            .ferry_output(&["--output", "json", "migrate", "redis", "--to", "a"])?;
        let m = ferry_e2e::migrate_record(&out.stdout).unwrap_or(serde_json::Value::Null);
        (m["phase"] == "completed", m)
    } else {
        (false, serde_json::Value::Null)
    };
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(held, "the clients could not all connect through A's route");
    assert!(
        answered,
        "a peer probe did not get through while 150 clients were tunnelled"
    );
    assert!(
        back.0,
        "a migration could not run while 150 clients were tunnelled: {}",
        back.1
    );
    Ok(())
}

/// An HTTP/1.1 workload that frames its answers every way: `/echo` answers the request's
/// body chunked, with a trailer; `/big` 1 MiB with a length; `/close` a body that runs
/// to the end of the connection; `/bye` answers, then closes the connection as an idle
/// timeout would; `/small` answers 413 at once and closes without reading the body;
/// `/ws` accepts a WebSocket handshake, says "hi" in the same write, and
/// then echoes what it gets; anything else says what it was told
/// (version, X-Forwarded-For, Expect).
const FRAMINGS_SERVER: &str = r#"
import base64, hashlib, socket, sys, threading
def head(f):
    lines = []
    while True:
        l = f.readline()
        if not l:
            return None
        if l == b"\r\n":
            return lines
        lines.append(l.decode().rstrip("\r\n"))
def body(f, h):
    if h.get("transfer-encoding", "").endswith("chunked"):
        out = b""
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b""):
                    pass
                return out
            out += f.read(size)
            f.readline()
    return f.read(int(h.get("content-length", "0")))
def serve(c):
    f = c.makefile("rb")
    while True:
        lines = head(f)
        if lines is None:
            return
        method, path, version = lines[0].split(" ")
        h = {}
        for l in lines[1:]:
            k, v = l.split(":", 1)
            h[k.strip().lower()] = v.strip()
        if path == "/small":
            c.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\n\r\ntoo large")
            f.close()
            c.close()
            return
        data = body(f, h)
        if path == "/ws" and "upgrade" in h.get("connection", "").lower():
            magic = h["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            accept = base64.b64encode(hashlib.sha1(magic.encode()).digest())
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\nhi")
            while True:
                got = f.read1(65536)
                if not got:
                    c.close()
                    return
                c.sendall(got)
        if path == "/echo":
            c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                      + b"%x\r\n" % len(data) + data + b"\r\n0\r\nX-Sum: %d\r\n\r\n" % len(data))
        elif path == "/big":
            big = b"x" * 1048576
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n" % len(big)
                      + (b"" if method == "HEAD" else big))
        elif path == "/close":
            c.sendall(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
            c.close()
            return
        elif path == "/bye":
            # Answered as if the connection stayed open, then closed (an idle timeout).
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye")
            c.close()
            return
        else:
            seen = ("%s %s %s" % (version, h.get("x-forwarded-for"), h.get("expect"))).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(seen) + seen)
        if version == "HTTP/1.0":
            c.close()
            return
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// What the Python clients of the route on port argv[1] share: `conn()` opens a
/// connection, `response(f)` reads one answer (code, head fields, body, trailers).
const CLIENT_HELPERS: &str = r#"
import socket, sys, threading, time
port = int(sys.argv[1])
def conn():
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    return s, s.makefile("rb")
def response(f, head_only=False):
    status = f.readline()
    assert status, "connection closed"
    h = {}
    while True:
        l = f.readline()
        if l in (b"\r\n", b""):
            break
        k, v = l.decode().split(":", 1)
        h[k.strip().lower()] = v.strip()
    code = int(status.split()[1])
    trailers = {}
    if head_only or code < 200:
        data = b""
    elif "content-length" in h:
        data = f.read(int(h["content-length"]))
    elif h.get("transfer-encoding") == "chunked":
        data = b""
        while True:
            size = int(f.readline(), 16)
            if size == 0:
                break
            data += f.read(size)
            f.readline()
        while True:
            l = f.readline()
            if l == b"\r\n":
                break
            k, v = l.decode().split(":", 1)
            trailers[k.strip().lower()] = v.strip()
    else:
        data = f.read()
    return code, h, data, trailers
"#;

/// A client that sends requests of every framing and checks each answer; prints "ok".
const FRAMINGS_CLIENT: &str = r#"
s, f = conn()
# Two requests in one write; the second has a chunked body, echoed chunked with a trailer.
s.sendall(b"GET /seen HTTP/1.1\r\nHost: t\r\n\r\n"
          b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
          b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n")
code, h, data, _ = response(f)
assert (code, data) == (200, b"HTTP/1.1 127.0.0.1 None"), (code, data)
code, h, data, trailers = response(f)
assert (code, data, trailers) == (200, b"hello world", {"x-sum": "11"}), (code, data, trailers)
# Expect: 100-continue is answered before the body is sent.
s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
code, _, _, _ = response(f)
assert code == 100, code
s.sendall(b"ping")
code, _, data, _ = response(f)
assert (code, data) == (200, b"ping"), (code, data)
# The workload closes its side after an answer: the next request, not one to repeat,
# still reaches it (on a new connection).
s.sendall(b"GET /bye HTTP/1.1\r\nHost: t\r\n\r\n")
code, _, data, _ = response(f)
assert (code, data) == (200, b"bye"), (code, data)
time.sleep(0.3)
s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nagain")
code, _, data, _ = response(f)
assert (code, data) == (200, b"again"), (code, data)
# A large answer with a length; the workload's hop-by-hop fields stop at the ingress.
s.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
code, h, data, _ = response(f)
assert (code, len(data)) == (200, 1048576) and "connection" not in h, (code, len(data), h)
s.sendall(b"HEAD /big HTTP/1.1\r\nHost: t\r\n\r\n")
code, h, data, _ = response(f, head_only=True)
assert (code, h["content-length"]) == (200, "1048576"), (code, h)
# A workload that answers before it reads the body, and closes: its answer reaches the
# client, whose body is still on its way.
s2, f2 = conn()
def send_body():
    try:
        s2.sendall(b"POST /small HTTP/1.1\r\nHost: t\r\nContent-Length: 8388608\r\n\r\n" + b"x" * 8388608)
    except OSError:
        pass
threading.Thread(target=send_body, daemon=True).start()
code, h, data, _ = response(f2)
assert (code, data) == (413, b"too large"), (code, data, h)
# A body framed two ways is refused, and the connection closes.
s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
code, h, _, _ = response(f)
assert code == 400 and h.get("connection") == "close", (code, h)
assert f.read() == b""
# An answer that runs to the end of its connection ends the client's connection too.
s, f = conn()
s.sendall(b"GET /close HTTP/1.1\r\nHost: t\r\n\r\n")
code, h, data, _ = response(f)
assert (code, data, h.get("connection")) == (200, b"until close", "close"), (code, data, h)
# HTTP/1.0: answered, then closed.
s, f = conn()
s.sendall(b"GET /seen HTTP/1.0\r\n\r\n")
code, h, data, _ = response(f)
assert (code, data) == (200, b"HTTP/1.0 127.0.0.1 None"), (code, data)
assert f.read() == b""
print("ok")
"#;

/// A WebSocket client of the route on port argv[1]: the handshake (RFC 6455's sample key),
/// the server's greeting sent with the 101, then two messages echoed (the first sent
/// with the handshake, before its answer). Prints "ok"; with argv[2] == "hold" it prints
/// "open", waits for the connection to end and prints "closed".
const WEBSOCKET_CLIENT: &str = r#"
s, f = conn()
s.sendall(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nearly")
code, h, _, _ = response(f, head_only=True)
assert code == 101, (code, h)
assert h.get("upgrade") == "websocket" and h.get("connection", "").lower() == "upgrade", h
assert h.get("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", h
assert f.read(2) == b"hi"
assert f.read(5) == b"early"
big = bytes(range(256)) * 4096
s.sendall(big)
assert f.read(len(big)) == big
if sys.argv[2:] == ["hold"]:
    print("open", flush=True)
    rest = f.read()
    print("closed", len(rest), flush=True)
else:
    print("ok")
"#;

/// A Python client's program: the shared helpers, then `script`.
fn client(script: &str) -> String {
    format!("{CLIENT_HELPERS}{script}")
}

/// Runs the Python client `script` at A against the route on port 18080: it must say "ok".
fn passes(sites: &TwoSites, script: &str) -> Result<()> {
    let out = sites.a.exec("python3", &["-c", &client(script), "18080"])?;
    anyhow::ensure!(out.trim() == "ok", "the client said: {out}");
    Ok(())
}

/// Starts the framings workload at A behind an HTTP route (`kind`: `http` or
/// `http-redirect`) on port 18080.
fn run_framings(sites: &TwoSites, kind: &str) -> Result<()> {
    std::fs::create_dir_all(&sites.work_root)?;
    let server = sites.work_root.join("framings.py");
    std::fs::write(&server, FRAMINGS_SERVER)?;
    let server = server.display().to_string();
    sites.a.ferry(&[
        "workload",
        "run",
        "framings",
        "--port",
        "8080",
        "--route",
        &format!("{kind}:0.0.0.0:18080"),
        "--",
        "python3",
        &server,
        "8080",
    ])?;
    ferry_e2e::wait_for("the workload's port", Duration::from_secs(10), || {
        sites
            .a
            .exec("curl", &["-sf", "-m", "1", "http://127.0.0.1:18080/seen"])
            .ok()
    })?;
    Ok(())
}

#[test]
fn http_messages_of_every_framing_pass_the_ingress_whole() -> Result<()> {
    let sites = TwoSites::start(Options::new("ih1"))?;
    run_framings(&sites, "http")?;
    // To the workload's port here, then through the peer link once it runs at B.
    passes(&sites, FRAMINGS_CLIENT)?;
    let (ok, m) = sites.migrate("framings", "b")?;
    assert!(ok, "{m}\n{}", sites.logs());
    passes(&sites, FRAMINGS_CLIENT)?;
    Ok(())
}

/// An HTTP/2 client's checks (curl, prior knowledge) against the framings workload's
/// route on port 18080, run by `sh`: it prints "ok" when every answer came whole.
const H2_CLIENT: &str = r#"
set -eu
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
u=http://127.0.0.1:18080
c="curl -s --http2-prior-knowledge"
fail() { echo "$*"; exit 0; }
head -c 300000 /dev/urandom > "$t/body"
# A request body (no length given: it ends with the stream) to a chunked answer with a trailer.
got=$($c -H 'Content-Length:' --data-binary @"$t/body" -D "$t/head" -o "$t/out" -w '%{http_version} %{http_code}' $u/echo)
[ "$got" = "2 200" ] || fail "echo: $got"
cmp -s "$t/body" "$t/out" || fail "echo: the body came back different ($(wc -c < "$t/out") bytes)"
grep -qi '^x-sum: 300000' "$t/head" || fail "echo: no trailer: $(cat "$t/head")"
# A body with its length, to the plain answer.
got=$($c --data-binary 'hello' $u/seen)
[ "$got" = "HTTP/1.1 127.0.0.1 None" ] || fail "seen: $got"
# 1 MiB with a length; HEAD gets the length and no body.
got=$($c -o /dev/null -w '%{http_code} %{size_download}' $u/big)
[ "$got" = "200 1048576" ] || fail "big: $got"
got=$($c -I -o /dev/null -w '%{http_code} %{size_download}' $u/big)
[ "$got" = "200 0" ] || fail "HEAD big: $got"
$c -I $u/big | grep -qi '^content-length: 1048576' || fail "HEAD big: no length"
# An answer that ends with its connection.
got=$($c $u/close)
[ "$got" = "until close" ] || fail "close: $got"
# An early answer (413) before the body was read, and the workload closing.
got=$($c --data-binary @"$t/body" -o /dev/null -w '%{http_code}' $u/small)
[ "$got" = "413" ] || fail "small: $got"
# Twenty clients at once (curl 7.88 cannot multiplex prior-knowledge streams: its
# framing layer fails them, against nginx as well).
set --
for i in $(seq 20); do set -- "$@" -o /dev/null $u/big; done
got=$($c --parallel --parallel-immediate --parallel-max 20 -w '%{http_code} %{size_download}\n' "$@" 2>/dev/null | sort | uniq -c | tr -s ' ')
[ "$got" = " 20 200 1048576" ] || fail "parallel: $got"
echo ok
"#;

/// Runs the HTTP/2 client's checks at A against the route on port 18080.
fn h2_passes(sites: &TwoSites) -> Result<()> {
    let out = sites.a.exec("sh", &["-c", H2_CLIENT])?;
    anyhow::ensure!(out.trim() == "ok", "the HTTP/2 client said: {out}");
    Ok(())
}

#[test]
fn http2_messages_of_every_framing_pass_the_ingress_whole() -> Result<()> {
    let sites = TwoSites::start(Options::new("ih2"))?;
    run_framings(&sites, "http")?;
    // To the workload's port here, then through the peer link once it runs at B.
    h2_passes(&sites)?;
    let (ok, m) = sites.migrate("framings", "b")?;
    assert!(ok, "{m}\n{}", sites.logs());
    h2_passes(&sites)?;
    Ok(())
}

#[test]
fn a_websocket_passes_the_ingress_and_is_reopened_after_a_move() -> Result<()> {
    let sites = TwoSites::start(Options::new("iws"))?;
    // A redirect route: after the move it sends plain requests to B, but carries a
    // WebSocket's handshake there (WebSocket clients do not follow redirects).
    run_framings(&sites, "http-redirect")?;
    passes(&sites, WEBSOCKET_CLIENT)?;
    // An open WebSocket when the workload moves: closed at the hold (its session cannot
    // go on at another copy) without holding up the freeze; a new one reaches B.
    let mut holder = sites
        .a
        .command("python3")
        .args(["-c", &client(WEBSOCKET_CLIENT), "18080", "hold"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        holder.stdout.take().context("the client's output")?,
    ));
    let first = lines.next().transpose()?.unwrap_or_default();
    assert_eq!(first, "open");
    let (ok, m) = sites.migrate("framings", "b")?;
    assert!(ok, "{m}\n{}", sites.logs());
    let last = lines.next().transpose()?.unwrap_or_default();
    let status = holder.wait()?;
    assert!(status.success() && last == "closed 0", "{last}");
    let logs = ferry_e2e::strip_ansi(&sites.a.log());
    let held = logs
        .lines()
        .find(|l| l.contains("traffic held") && l.contains("framings"))
        .context("A logged no hold")?;
    assert!(
        held.contains("connections=1") && held.contains("drained=true"),
        "{held}"
    );
    let head = sites.a.exec(
        "curl",
        &[
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "http://127.0.0.1:18080/seen",
        ],
    )?;
    assert!(head.starts_with("HTTP/1.1 307"), "{head}");
    passes(&sites, WEBSOCKET_CLIENT)?;
    Ok(())
}

/// The ingress benchmark against nginx runs (briefly, in a debug build) with HTTP/1.1
/// and HTTP/2 clients: every way answers every request with 200 at 1 and 4 connections,
/// and the proxies' CPU is measured. Its speed is the benchmark's to print, not this
/// test's to judge.
#[test]
fn the_ingress_benchmark_measures_every_way() -> Result<()> {
    for (http, ways) in [
        (
            "1.1",
            &[
                "direct",
                "nginx reverse proxy",
                "ferry ingress http",
                "ferry ingress tcp",
            ][..],
        ),
        (
            "2",
            &["direct", "nginx reverse proxy", "ferry ingress http"][..],
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-proxy-bench"))
            .arg("1")
            .env("FERRY_PROXY_BENCH_CONNS", "1,4")
            .env("FERRY_PROXY_BENCH_ROUNDS", "1")
            .env("FERRY_PROXY_BENCH_HTTP", http)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "HTTP/{http}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows = |way: &str| -> Vec<String> {
            stdout
                .lines()
                .filter(|l| l.starts_with(way))
                .map(str::to_string)
                .collect()
        };
        assert!(
            rows("ferry ingress tcp").is_empty() == (http == "2"),
            "{stdout}"
        );
        for way in ways {
            let rows = rows(way);
            assert_eq!(rows.len(), 2, "HTTP/{http} {way}:\n{stdout}");
            for row in rows {
                let rps: f64 = row[way.len()..]
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
                assert!(rps > 0.0, "{row}");
                assert_eq!(row.contains("us/req"), *way != "direct", "{row}");
            }
        }
    }
    Ok(())
}
