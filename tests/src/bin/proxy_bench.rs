//! `ferry-proxy-bench`: what Ferry's ingress costs a client, next to nginx (Debian) as a
//! reverse proxy, on the same machine in the same run.
//!
//! One HTTP backend (nginx answering a fixed 200, run as a Ferry workload at site A) is
//! reached four ways: directly, through an nginx reverse proxy (keep-alive upstream),
//! and through Ferry's ingress routes in HTTP mode and in TCP mode. Closed-loop clients
//! on keep-alive connections send `GET /` for a fixed time; the run prints requests/s and
//! p50/p99 latency for each way and each concurrency.
//!
//! The ways take turns: each round measures every way once, and a row gives the median
//! of the rounds (and the range of requests/s), so a slow moment of the machine falls on
//! every way alike rather than on one.
//!
//! With `FERRY_PROXY_BENCH_HTTP=2` the clients speak HTTP/2 with prior knowledge (h2c),
//! one request at a time per connection: directly to the backend's HTTP/2 listener, to
//! nginx's HTTP/2 listener and to Ferry's HTTP route (the backends still get HTTP/1.1);
//! the TCP mode, which passes bytes, is left out.
//!
//! Usage: ferry-proxy-bench [SECONDS]   (default 5, after 1 s of warm-up)
//!   FERRY_PROXY_BENCH_CONNS=1,32   concurrent connections
//!   FERRY_PROXY_BENCH_ROUNDS=3     measurements of each way at each concurrency
//!   FERRY_PROXY_BENCH_HTTP=1.1     the clients' HTTP version: 1.1 or 2
//!
//! Internal subcommand (run inside site A's namespace): load ADDR CONNS SECONDS [h2].

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_e2e::{Options, TwoSites};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BACKEND_PORT: u16 = 8080;
/// The backend's HTTP/2 (h2c) listener, for the direct way of an HTTP/2 run.
const BACKEND_H2: &str = "127.0.0.1:8082";
const NGINX_PROXY: &str = "127.0.0.1:18090";
const NGINX_PROXY_H2: &str = "127.0.0.1:18092";
const FERRY_HTTP: &str = "127.0.0.1:18080";
const FERRY_TCP: &str = "127.0.0.1:18081";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("load") => {
            anyhow::ensure!(
                (4..=5).contains(&args.len()),
                "usage: load ADDR CONNS SECONDS [h2]"
            );
            let h2 = args.get(4).is_some_and(|a| a == "h2");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let summary = rt.block_on(load(&args[1], args[2].parse()?, args[3].parse()?, h2))?;
            println!("{summary}");
            Ok(())
        }
        _ => bench(&args),
    }
}

/// Reads one HTTP/1.1 response (status line, headers, Content-Length body) from `conn`,
/// keeping whatever follows in `buf`. Returns the status code.
async fn read_response(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Result<u16> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("no status code")?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            let total = end + 4 + length;
            while buf.len() < total {
                read_more(conn, buf).await?;
            }
            buf.drain(..total);
            return Ok(status);
        }
        read_more(conn, buf).await?;
    }
}

async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 4096];
    let n = conn.read(&mut chunk).await?;
    anyhow::ensure!(n > 0, "connection closed");
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// A keep-alive client connection, HTTP/1.1 or HTTP/2 (prior knowledge, one stream at a
/// time).
enum Conn {
    H1 {
        conn: TcpStream,
        request: String,
        buf: Vec<u8>,
    },
    H2 {
        sender: hyper::client::conn::http2::SendRequest<http_body_util::Empty<hyper::body::Bytes>>,
        uri: hyper::Uri,
    },
}

impl Conn {
    async fn open(addr: &str, h2: bool) -> Result<Self> {
        let conn = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        conn.set_nodelay(true)?;
        if !h2 {
            return Ok(Conn::H1 {
                conn,
                request: format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
                buf: Vec::with_capacity(8192),
            });
        }
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(conn),
        )
        .await
        .with_context(|| format!("HTTP/2 handshake with {addr}"))?;
        tokio::spawn(connection);
        Ok(Conn::H2 {
            sender,
            uri: format!("http://{addr}/").parse()?,
        })
    }

    /// Sends `GET /` and reads the whole answer; returns its status code.
    async fn get(&mut self) -> Result<u16> {
        match self {
            Conn::H1 { conn, request, buf } => {
                conn.write_all(request.as_bytes()).await?;
                read_response(conn, buf).await
            }
            Conn::H2 { sender, uri } => {
                use http_body_util::BodyExt;
                let request = hyper::Request::get(uri.clone())
                    .body(http_body_util::Empty::new())
                    .context("request")?;
                let response = sender.send_request(request).await?;
                let status = response.status().as_u16();
                response.into_body().collect().await?;
                Ok(status)
            }
        }
    }
}

/// One keep-alive connection sending requests back to back until `until`; latencies of
/// the requests answered after `measure_from`, in microseconds.
async fn client(addr: String, h2: bool, measure_from: Instant, until: Instant) -> Result<Vec<u32>> {
    let mut conn = Conn::open(&addr, h2).await?;
    let mut lat = Vec::new();
    loop {
        let sent = Instant::now();
        if sent >= until {
            return Ok(lat);
        }
        let status = conn.get().await?;
        if status != 200 {
            bail!("{addr} answered HTTP {status}");
        }
        if sent >= measure_from {
            lat.push(sent.elapsed().as_micros() as u32);
        }
    }
}

/// Closed-loop load: `conns` connections (HTTP/2 ones with `h2`) for 1 s of warm-up and
/// then `seconds`.
async fn load(addr: &str, conns: usize, seconds: f64, h2: bool) -> Result<Value> {
    let measure_from = Instant::now() + Duration::from_secs(1);
    let until = measure_from + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(client(addr.to_string(), h2, measure_from, until)))
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |us| f64::from(*us) / 1e3)
    };
    Ok(json!({
        "requests": lat.len(),
        "rps": lat.len() as f64 / seconds,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
    }))
}

/// An nginx configuration whose files all live under `dir`.
fn nginx_conf(dir: &Path, workers: u32, http: &str) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir.join("tmp"))?;
    let d = dir.display();
    let conf = format!(
        "user root;\nworker_processes {workers};\ndaemon off;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n\
         client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
         fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n\
         scgi_temp_path {d}/tmp/scgi;\n{http}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

fn nginx_args(dir: &Path, conf: &Path) -> Vec<String> {
    vec![
        "/usr/sbin/nginx".into(),
        "-e".into(),
        dir.join("error.log").display().to_string(),
        "-c".into(),
        conf.display().to_string(),
    ]
}

/// nginx stopped when the run ends, however it ends: SIGTERM lets the master stop its
/// workers (SIGKILL would leave them behind).
struct Nginx(std::process::Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        ferry::sys::process::signal(self.0.id() as i32, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The unit of /proc's CPU times: fixed at 100 per second in Linux's ABI.
const USER_HZ: f64 = 100.0;

/// CPU time (user + system, in clock ticks) used so far by process `pid` and its
/// children (nginx's workers); 0 for a process that is gone.
fn cpu_ticks(pid: u32) -> u64 {
    let own = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The fields after the command name, which is in parentheses and may hold spaces.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .map(cpu_ticks)
        .sum::<u64>();
    own + children
}

/// One measurement: the load's summary, plus the CPU the proxy (`proxy`, with its
/// children) spent per request, in microseconds.
fn measure(
    sites: &TwoSites,
    addr: &str,
    conns: usize,
    seconds: f64,
    proxy: Option<u32>,
    h2: bool,
) -> Result<Value> {
    let before = proxy.map(cpu_ticks);
    let mut r = load_from_site(sites, addr, conns, seconds, h2)?;
    if let (Some(pid), Some(before)) = (proxy, before) {
        let used_us = cpu_ticks(pid).saturating_sub(before) as f64 / USER_HZ * 1e6;
        // Warm-up requests count too: the CPU was measured over the whole run.
        let total = r["requests"].as_f64().unwrap_or(0.0) * (seconds + 1.0) / seconds;
        if total > 0.0 {
            r["cpu_us"] = json!(used_us / total);
        }
    }
    Ok(r)
}

fn load_from_site(
    sites: &TwoSites,
    addr: &str,
    conns: usize,
    seconds: f64,
    h2: bool,
) -> Result<Value> {
    let out = sites
        .a
        .command(std::env::current_exe()?)
        .args(["load", addr, &conns.to_string(), &seconds.to_string()])
        .args(h2.then_some("h2"))
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("load against {addr} failed\n{}", sites.logs());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The middle value of sorted `v` (the mean of the two middle ones for an even count).
fn median(v: &[f64]) -> Option<f64> {
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some(f64::midpoint(v[n / 2 - 1], v[n / 2])),
    }
}

fn wait_for_http(sites: &TwoSites, addr: &str, h2: bool) -> Result<()> {
    let version = if h2 {
        "--http2-prior-knowledge"
    } else {
        "--http1.1"
    };
    ferry_e2e::wait_for(addr, Duration::from_secs(10), || {
        sites
            .a
            .exec(
                "curl",
                &["-sf", "-m", "1", version, &format!("http://{addr}/")],
            )
            .ok()
            .filter(|body| body.trim() == "ok")
    })?;
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    let seconds: f64 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(5.0);
    let conns: Vec<usize> = std::env::var("FERRY_PROXY_BENCH_CONNS")
        .unwrap_or_else(|_| "1,32".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let rounds: usize = std::env::var("FERRY_PROXY_BENCH_ROUNDS")
        .ok()
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(3);
    anyhow::ensure!(rounds > 0, "FERRY_PROXY_BENCH_ROUNDS must be at least 1");
    let h2 = match std::env::var("FERRY_PROXY_BENCH_HTTP").as_deref() {
        Ok("2") => true,
        Ok("1.1") | Err(_) => false,
        Ok(other) => bail!("FERRY_PROXY_BENCH_HTTP is 1.1 or 2, not {other}"),
    };
    anyhow::ensure!(
        Path::new("/usr/sbin/nginx").exists(),
        "nginx is missing: run scripts/setup"
    );
    let sites = TwoSites::start(Options::new("pxb"))?;
    let backend_dir = sites.root.join("nginx-backend");
    let backend_conf = nginx_conf(
        &backend_dir,
        1,
        &format!(
            "  server {{ listen 127.0.0.1:{BACKEND_PORT}; listen {BACKEND_H2} http2; \
             location / {{ return 200 \"ok\\n\"; }} }}"
        ),
    )?;
    let port = BACKEND_PORT.to_string();
    let mut run = vec![
        "workload",
        "run",
        "web",
        "--port",
        &port,
        "--route",
        "http:0.0.0.0:18080",
        "--route",
        "tcp:0.0.0.0:18081",
        "--",
    ];
    let backend = nginx_args(&backend_dir, &backend_conf);
    run.extend(backend.iter().map(String::as_str));
    sites.a.ferry(&run)?;
    let proxy_dir = sites.root.join("nginx-proxy");
    let proxy_conf = nginx_conf(
        &proxy_dir,
        2,
        &format!(
            "  upstream backend {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 256; }}\n  \
             server {{ listen {NGINX_PROXY}; listen {NGINX_PROXY_H2} http2; \
             location / {{ proxy_pass http://backend; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        ),
    )?;
    let proxy = nginx_args(&proxy_dir, &proxy_conf);
    let nginx_proxy = Nginx(
        sites
            .a
            .command(&proxy[0])
            .args(&proxy[1..])
            .stdin(Stdio::null())
            .spawn()?,
    );
    let backend_addr = format!("127.0.0.1:{BACKEND_PORT}");
    let gateway = sites.a.gateway_pid();
    let nginx = Some(nginx_proxy.0.id());
    let ways = if h2 {
        vec![
            ("direct", BACKEND_H2, None),
            ("nginx reverse proxy", NGINX_PROXY_H2, nginx),
            ("ferry ingress http", FERRY_HTTP, gateway),
        ]
    } else {
        vec![
            ("direct", backend_addr.as_str(), None),
            ("nginx reverse proxy", NGINX_PROXY, nginx),
            ("ferry ingress http", FERRY_HTTP, gateway),
            ("ferry ingress tcp", FERRY_TCP, gateway),
        ]
    };
    for (_, addr, _) in &ways {
        wait_for_http(&sites, addr, h2)?;
    }
    println!(
        "GET / answered by nginx (1 worker) at site A; closed-loop keep-alive clients \
         (1 thread, {}), {seconds} s per measurement after 1 s warm-up, the median of \
         {rounds} rounds taken in turns; all on this machine's {} cores",
        if h2 {
            "HTTP/2 with prior knowledge, one stream at a time per connection"
        } else {
            "HTTP/1.1"
        },
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    println!(
        "{:<22} {:>6} {:>11} {:>15} {:>9} {:>9} {:>12}",
        "way", "conns", "requests/s", "range", "p50", "p99", "proxy CPU"
    );
    for &c in &conns {
        let mut runs: Vec<Vec<Value>> = vec![Vec::new(); ways.len()];
        for _ in 0..rounds {
            for ((_, addr, proxy), got) in ways.iter().zip(runs.iter_mut()) {
                got.push(measure(&sites, addr, c, seconds, *proxy, h2)?);
            }
        }
        for ((way, _, _), got) in ways.iter().zip(&runs) {
            let field = |k: &str| -> Vec<f64> {
                let mut v: Vec<f64> = got.iter().filter_map(|r| r[k].as_f64()).collect();
                v.sort_by(f64::total_cmp);
                v
            };
            let rps = field("rps");
            let cpu = median(&field("cpu_us"))
                .map_or_else(|| "-".to_string(), |us| format!("{us:.1} us/req"));
            println!(
                "{:<22} {:>6} {:>11.0} {:>15} {:>6.3} ms {:>6.3} ms {:>12}",
                way,
                c,
                median(&rps).unwrap_or(0.0),
                format!(
                    "{:.0}-{:.0}",
                    rps.first().unwrap_or(&0.0),
                    rps.last().unwrap_or(&0.0)
                ),
                median(&field("p50_ms")).unwrap_or(0.0),
                median(&field("p99_ms")).unwrap_or(0.0),
                cpu,
            );
        }
    }
    sites.a.ferry(&["workload", "rm", "web"])?;
    Ok(())
}
