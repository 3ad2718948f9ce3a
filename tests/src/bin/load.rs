//! `ferry-load`: a constant-rate Redis client that records every request, to show what
//! clients see during a migration.
//!
//! Usage: ferry-load redis|http|http2 ADDR[,ADDR…] RATE SECONDS CONNECTIONS ACKED_FILE
//! (a failed connection reconnects to the next address: a client that fails over.)
//! Sends requests at RATE requests/s for SECONDS over CONNECTIONS keep-alive connections,
//! each with a 5 s timeout: `SET k<i> <i>` (redis) or `POST /inc` (http; http2: HTTP/2
//! with prior knowledge, one stream at a time per connection). Writes the
//! acknowledged requests to ACKED_FILE, prints a JSON summary: requests, ok, failed,
//! unavailable (HTTP 503 carrying Retry-After), and latency measured from each request's
//! scheduled time (so a stall shows in full, including the requests queued behind it).
//! With FERRY_LOAD_TRACE=FILE it also writes every request there, in the order they were
//! due: `DUE_MS LATENCY_MS`, or `DUE_MS failed`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// Per-request timeout (FERRY_LOAD_TIMEOUT_MS overrides it).
fn timeout() -> Duration {
    let ms = std::env::var("FERRY_LOAD_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    Duration::from_millis(ms)
}

#[derive(Default)]
struct Results {
    ok: Vec<(u64, Duration)>,
    failed: Vec<(u64, String)>,
    unavailable: u64,
    /// Longest time between two answers on one connection.
    max_gap: Duration,
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    Redis,
    Http,
    Http2,
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<hyper::body::Bytes>>;

/// One client connection.
enum Conn {
    Stream(BufReader<TcpStream>),
    H2(H2Sender),
}

enum Answer {
    Ok,
    /// 503 with Retry-After: an honest "not now".
    Unavailable,
}

/// Connects to the first address of a comma-separated list that answers, starting after
/// the one that failed last (so a client fails over to the next site).
async fn connect(addrs: &str, start: &mut usize, proto: Proto) -> Result<Conn> {
    let list: Vec<&str> = addrs.split(',').collect();
    let mut last = anyhow::anyhow!("no address");
    for k in 0..list.len() {
        let addr = list[(*start + k) % list.len()];
        match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                s.set_nodelay(true)?;
                *start = (*start + k) % list.len();
                if proto != Proto::Http2 {
                    return Ok(Conn::Stream(BufReader::new(s)));
                }
                let (sender, connection) = hyper::client::conn::http2::handshake(
                    hyper_util::rt::TokioExecutor::new(),
                    hyper_util::rt::TokioIo::new(s),
                )
                .await?;
                tokio::spawn(connection);
                return Ok(Conn::H2(sender));
            }
            Ok(Err(e)) => last = anyhow::Error::new(e).context(format!("connect {addr}")),
            Err(_) => last = anyhow::anyhow!("connect {addr}: timed out"),
        }
    }
    Err(last)
}

async fn http_post(conn: &mut BufReader<TcpStream>) -> Result<Answer> {
    conn.get_mut()
        .write_all(b"POST /inc HTTP/1.1\r\nHost: ferry-load\r\nContent-Length: 0\r\n\r\n")
        .await?;
    let mut line = String::new();
    anyhow::ensure!(conn.read_line(&mut line).await? > 0, "connection closed");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let (mut length, mut retry_after) = (0usize, false);
    loop {
        let mut h = String::new();
        anyhow::ensure!(
            conn.read_line(&mut h).await? > 0,
            "connection closed in headers"
        );
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        retry_after |= lower.starts_with("retry-after:");
    }
    let mut body = vec![0u8; length];
    tokio::io::AsyncReadExt::read_exact(conn, &mut body).await?;
    match status {
        200 => Ok(Answer::Ok),
        503 if retry_after => Ok(Answer::Unavailable),
        other => anyhow::bail!("HTTP {other}: {}", String::from_utf8_lossy(&body).trim()),
    }
}

/// `POST /inc` on an HTTP/2 connection.
async fn h2_post(sender: &mut H2Sender) -> Result<Answer> {
    use http_body_util::BodyExt;
    sender.ready().await?;
    let req = hyper::Request::post("http://ferry-load/inc").body(http_body_util::Empty::new())?;
    let resp = sender.send_request(req).await?;
    let (status, retry_after) = (
        resp.status().as_u16(),
        resp.headers().contains_key("retry-after"),
    );
    let body = resp.into_body().collect().await?.to_bytes();
    match status {
        200 => Ok(Answer::Ok),
        503 if retry_after => Ok(Answer::Unavailable),
        other => anyhow::bail!("HTTP {other}: {}", String::from_utf8_lossy(&body).trim()),
    }
}

async fn request(conn: &mut BufReader<TcpStream>, i: u64) -> Result<()> {
    let key = format!("k{i}");
    let val = i.to_string();
    let cmd = format!(
        "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{val}\r\n",
        key.len(),
        val.len()
    );
    conn.get_mut().write_all(cmd.as_bytes()).await?;
    let mut line = String::new();
    let n = conn.read_line(&mut line).await?;
    anyhow::ensure!(n > 0, "connection closed");
    anyhow::ensure!(line == "+OK\r\n", "unexpected reply {line:?}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() == 6,
        "usage: ferry-load redis|http|http2 ADDR RATE SECONDS CONNECTIONS ACKED_FILE"
    );
    let proto = match args.remove(0).as_str() {
        "redis" => Proto::Redis,
        "http" => Proto::Http,
        "http2" => Proto::Http2,
        other => anyhow::bail!("unknown protocol {other}: redis, http or http2"),
    };
    let addr = args[0].clone();
    let rate: f64 = args[1].parse()?;
    let seconds: f64 = args[2].parse()?;
    let conns: u64 = args[3].parse()?;
    let total = (rate * seconds) as u64;
    let results = Arc::new(Mutex::new(Results::default()));
    let start = Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (addr, results) = (addr.clone(), Arc::clone(&results));
        tasks.push(tokio::spawn(async move {
            let mut at = 0usize;
            let mut last_answer = Instant::now();
            let mut conn = connect(&addr, &mut at, proto).await.ok();
            let mut i = c;
            while i < total {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let outcome = match conn.as_mut() {
                    Some(cn) => tokio::time::timeout(timeout(), async {
                        match cn {
                            Conn::Stream(cn) if proto == Proto::Redis => {
                                request(cn, i).await.map(|_| Answer::Ok)
                            }
                            Conn::Stream(cn) => http_post(cn).await,
                            Conn::H2(sender) => h2_post(sender).await,
                        }
                    })
                    .await
                    .map_err(|_| anyhow::anyhow!("timed out"))
                    .and_then(|r| r),
                    None => Err(anyhow::anyhow!("not connected")),
                };
                let mut r = results.lock().await;
                if outcome.is_ok() {
                    let gap = last_answer.elapsed();
                    if i >= conns && gap > r.max_gap {
                        r.max_gap = gap;
                    }
                    last_answer = Instant::now();
                }
                match outcome {
                    Ok(Answer::Ok) => r.ok.push((i, due.elapsed())),
                    Ok(Answer::Unavailable) => r.unavailable += 1,
                    Err(e) => {
                        r.failed.push((i, e.to_string()));
                        drop(r);
                        at += 1;
                        conn = connect(&addr, &mut at, proto).await.ok();
                    }
                }
                i += conns;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let r = results.lock().await;
    let mut lat: Vec<Duration> = r.ok.iter().map(|(_, d)| *d).collect();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    std::fs::write(
        &args[4],
        r.ok.iter()
            .map(|(i, _)| format!("k{i}\n"))
            .collect::<String>(),
    )?;
    // The first second after the switch: requests due within 1 s after the longest
    // wait ended (when the held requests were answered).
    let after_switch =
        r.ok.iter()
            .max_by_key(|(_, d)| *d)
            .map(|(i, d)| *i as f64 / rate + d.as_secs_f64())
            .map_or(0.0, |end| {
                let mut v: Vec<f64> =
                    r.ok.iter()
                        .filter(|(i, _)| {
                            let due = *i as f64 / rate;
                            due >= end && due < end + 1.0
                        })
                        .map(|(_, d)| d.as_secs_f64() * 1e3)
                        .collect();
                v.sort_by(f64::total_cmp);
                v.get(((v.len() as f64 * 0.99) as usize).min(v.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(0.0)
            });
    if let Ok(path) = std::env::var("FERRY_LOAD_TRACE") {
        let mut lines: Vec<(u64, String)> =
            r.ok.iter()
                .map(|(i, d)| (*i, format!("{:.3}", d.as_secs_f64() * 1e3)))
                .chain(r.failed.iter().map(|(i, _)| (*i, "failed".to_string())))
                .collect();
        lines.sort_by_key(|(i, _)| *i);
        let text: String = lines
            .iter()
            .map(|(i, v)| format!("{:.1} {v}\n", *i as f64 * 1e3 / rate))
            .collect();
        std::fs::write(&path, text)?;
    }
    let first_errors: Vec<String> = r
        .failed
        .iter()
        .take(5)
        .map(|(i, e)| format!("k{i}: {e}"))
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "requests": total,
            "ok": r.ok.len(),
            "failed": r.failed.len(),
            "unavailable": r.unavailable,
            "max_gap_ms": r.max_gap.as_secs_f64() * 1e3,
            "max_stall_ms": lat.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "p99_after_switch_ms": after_switch,
            "errors": first_errors,
        })
    );
    Ok(())
}
