//! `ferry-bench`: what clients see when a Redis server moves between two sites, Ferry
//! and the plain way side by side, on the same link in the same run.
//!
//! Usage: ferry-bench [MIB…]   (default: 64 256)
//!   FERRY_BENCH_RATE=1gbit    link bandwidth (tc tbf on both sites' links)
//!   FERRY_BENCH_RTT_MS=10     round trip added by a userspace delay relay (no netem here;
//!                             0 = no relay)
//!   FERRY_BENCH_LOAD=1000     client requests/s (SET, 16 connections, timeout 5 s)
//!   FERRY_BENCH_DATA=populate  Redis values: populate (DEBUG POPULATE, compressible) or
//!                             random (incompressible)
//!
//! Ferry: the client talks to site A's ingress route; `ferry migrate` moves the workload
//! (QUIC through the delay relay). Plain: the client talks to Redis at A directly; CRIU
//! dumps it to disk, the image is copied over TCP through the same relay, CRIU restores
//! it at B, and the client fails over to B. For each: the longest stall a client saw,
//! failed requests, total migration time, bytes moved.
//!
//! Internal subcommands (run inside a site's namespace): udp-relay, tcp-relay, send, recv.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_e2e::{run, Options, TwoSites};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RELAY_UDP: &str = "10.213.0.1:7555";
const RELAY_TCP: &str = "10.213.0.1:7556";
const RECV_TCP: &str = "10.213.0.2:7557";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Runtime::new()?;
    match args.first().map(String::as_str) {
        Some("udp-relay") => {
            rt.block_on(udp_relay(args[1].parse()?, args[2].parse()?, ms(&args[3])?))
        }
        Some("tcp-relay") => {
            rt.block_on(tcp_relay(args[1].parse()?, args[2].parse()?, ms(&args[3])?))
        }
        Some("send") => rt.block_on(send_dir(&args[1], Path::new(&args[2]))),
        Some("recv") => rt.block_on(recv_dir(&args[1], Path::new(&args[2]))),
        _ => bench(&args),
    }
}

fn ms(s: &str) -> Result<Duration> {
    Ok(Duration::from_millis(s.parse()?))
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Big socket buffers: a relay that drops datagrams would measure itself, not the link.
fn big_buffers(s: &tokio::net::UdpSocket) {
    ferry::sys::net::set_buffers(s, 32 << 20);
}

/// Kills a process by pid when dropped (the plain run's Redis, if the run fails early).
struct KillPid(i32);

impl Drop for KillPid {
    fn drop(&mut self) {
        ferry::sys::process::signal(self.0, libc::SIGKILL);
    }
}

/// Datagrams received in one read (with GRO, several of `stride` bytes each), waiting to
/// be sent on once `due`.
struct Batch {
    due: Instant,
    data: Vec<u8>,
    stride: usize,
    to: SocketAddr,
}

/// One relay socket, read and written in batches (recvmmsg + GRO, GSO): at 1 Gbit/s a
/// datagram at a time would make the relay, not the link, the bottleneck.
struct RelaySocket {
    io: tokio::net::UdpSocket,
    state: quinn::udp::UdpSocketState,
}

impl RelaySocket {
    async fn bind(addr: SocketAddr) -> Result<Arc<Self>> {
        let io = tokio::net::UdpSocket::bind(addr).await?;
        big_buffers(&io);
        let state = quinn::udp::UdpSocketState::new((&io).into())?;
        Ok(Arc::new(Self { io, state }))
    }

    /// Reads everything waiting and hands each batch to `forward`, stamped with when it is
    /// due; returns when the socket fails.
    async fn drain_into(&self, delay: Duration, mut forward: impl FnMut(Batch)) {
        use std::io::IoSliceMut;
        let n = quinn::udp::BATCH_SIZE;
        let mut bufs = vec![vec![0u8; 64 * 1024]; n];
        let mut meta = vec![quinn::udp::RecvMeta::default(); n];
        loop {
            if self.io.readable().await.is_err() {
                return;
            }
            loop {
                let mut slices: Vec<IoSliceMut> =
                    bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                let got = self.io.try_io(tokio::io::Interest::READABLE, || {
                    self.state.recv((&self.io).into(), &mut slices, &mut meta)
                });
                match got {
                    Ok(count) => {
                        let due = Instant::now() + delay;
                        for (slice, m) in slices.iter().zip(&meta).take(count) {
                            forward(Batch {
                                due,
                                data: slice[..m.len].to_vec(),
                                stride: m.stride,
                                to: m.addr,
                            });
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => return,
                }
            }
        }
    }

    async fn send(&self, b: &Batch) {
        let transmit = quinn::udp::Transmit {
            destination: b.to,
            ecn: None,
            contents: &b.data,
            segment_size: (b.data.len() > b.stride).then_some(b.stride),
            src_ip: None,
        };
        loop {
            if self.io.writable().await.is_err() {
                return;
            }
            match self.io.try_io(tokio::io::Interest::WRITABLE, || {
                self.state.send((&self.io).into(), &transmit)
            }) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                _ => return,
            }
        }
    }
}

/// Sends batches from a queue once each is due, in order (a fixed delay keeps order).
async fn delayed_sender(
    socket: Arc<RelaySocket>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Batch>,
) {
    while let Some(b) = rx.recv().await {
        if b.due > Instant::now() {
            tokio::time::sleep_until(b.due.into()).await;
        }
        socket.send(&b).await;
    }
}

/// Forwards UDP between a client (whoever sends to `listen`) and `target`, delaying each
/// datagram by `delay` in each direction.
async fn udp_relay(listen: SocketAddr, target: SocketAddr, delay: Duration) -> Result<()> {
    let front = RelaySocket::bind(listen).await?;
    let back = RelaySocket::bind(SocketAddr::new(listen.ip(), 0)).await?;
    let (to_target, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(delayed_sender(Arc::clone(&back), rx));
    let (to_client, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(delayed_sender(Arc::clone(&front), rx));
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let (f, c) = (Arc::clone(&front), Arc::clone(&client));
    let up = tokio::spawn(async move {
        f.drain_into(delay, |mut b| {
            if let Ok(mut c) = c.lock() {
                *c = Some(b.to);
            }
            b.to = target;
            let _ = to_target.send(b);
        })
        .await;
    });
    back.drain_into(delay, |mut b| {
        if let Some(to) = client.lock().ok().and_then(|c| *c) {
            b.to = to;
            let _ = to_client.send(b);
        }
    })
    .await;
    up.abort();
    Ok(())
}

/// Forwards each TCP connection to `target`, delaying bytes by `delay` in each direction.
async fn tcp_relay(listen: SocketAddr, target: SocketAddr, delay: Duration) -> Result<()> {
    let l = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (client, _) = l.accept().await?;
        let server = tokio::net::TcpStream::connect(target).await?;
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        tokio::spawn(delayed_copy(cr, sw, delay));
        tokio::spawn(delayed_copy(sr, cw, delay));
    }
}

async fn delayed_copy(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0
                || tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    });
    while let Some((due, data)) = rx.recv().await {
        tokio::time::sleep_until(due.into()).await;
        if w.write_all(&data).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
    reader.abort();
}

/// Sends every file of `dir` as (name length, name, size, bytes).
async fn send_dir(addr: &str, dir: &Path) -> Result<()> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("file name")?
            .to_string();
        let data = tokio::fs::read(&path).await?;
        s.write_u32(name.len() as u32).await?;
        s.write_all(name.as_bytes()).await?;
        s.write_u64(data.len() as u64).await?;
        s.write_all(&data).await?;
    }
    s.shutdown().await?;
    Ok(())
}

async fn recv_dir(listen: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let l = tokio::net::TcpListener::bind(listen).await?;
    let (mut s, _) = l.accept().await?;
    loop {
        let len = match s.read_u32().await {
            Ok(n) => n as usize,
            Err(_) => return Ok(()),
        };
        let mut name = vec![0u8; len];
        s.read_exact(&mut name).await?;
        let size = s.read_u64().await? as usize;
        let mut data = vec![0u8; size];
        s.read_exact(&mut data).await?;
        tokio::fs::write(dir.join(String::from_utf8(name)?), data).await?;
    }
}

/// A helper process killed when the run ends, however it ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn self_exe() -> Result<PathBuf> {
    Ok(std::env::current_exe()?)
}

/// One measured run: what the constant-rate client saw, and the migration's cost.
struct Outcome {
    client: Value,
    total_ms: u64,
    /// Ferry's freeze and its phases (dump, transfer, restore), in ms.
    phases: Option<[u64; 4]>,
    bytes: u64,
    /// What the image took on the link (the plain way sends it as it is).
    wire: u64,
}

fn start_client(
    sites: &TwoSites,
    addrs: &str,
    load: &str,
    seconds: u64,
) -> Result<std::process::Child> {
    Ok(sites
        .a
        .command(ferry_e2e::ferry_bin()?.with_file_name("ferry-load"))
        .args(["redis", addrs, load, &seconds.to_string(), "16"])
        .arg(sites.root.join("acked.txt"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

fn finish_client(child: std::process::Child) -> Result<Value> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "load client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Fills Redis with `mib` MiB of 1000-byte values: `DEBUG POPULATE` (zero-padded values,
/// which compress very well) or, with FERRY_BENCH_DATA=random, random bytes (which do not
/// compress at all): the two ends of what a link's compression can gain.
fn populate(sites: &TwoSites, port: u16, mib: u64) -> Result<()> {
    let keys = mib * 1024 * 1024 / 1000;
    if env("FERRY_BENCH_DATA", "populate") != "random" {
        sites.a.redis(
            port,
            &["DEBUG", "POPULATE", &keys.to_string(), "bulk", "1000"],
        )?;
        return Ok(());
    }
    let path = sites.root.join(format!("fill-{port}.resp"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut value = vec![0u8; 1000];
    for k in 0..keys {
        for b in &mut value {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let key = format!("bulk:{k}");
        write!(
            out,
            "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$1000\r\n",
            key.len()
        )?;
        out.write_all(&value)?;
        out.write_all(b"\r\n")?;
    }
    out.flush()?;
    drop(out);
    run(sites
        .a
        .command("redis-cli")
        .args(["-p", &port.to_string(), "--pipe"])
        .stdin(std::fs::File::open(&path)?))?;
    std::fs::remove_file(&path)?;
    Ok(())
}

fn ferry_run(sites: &TwoSites, mib: u64, load: &str, seconds: u64) -> Result<Outcome> {
    sites.run_redis_at_a_with("redis", 6379, &["--route", "0.0.0.0:16379"])?;
    populate(sites, 6379, mib)?;
    let client = start_client(sites, "10.213.0.1:16379", load, seconds)?;
    std::thread::sleep(Duration::from_secs(1));
    let (ok, m) = sites.migrate("redis", "b")?;
    let client = finish_client(client)?;
    if !ok {
        bail!("ferry migration failed: {m}");
    }
    Ok(Outcome {
        client,
        total_ms: m["timings"]["total_ms"].as_u64().unwrap_or(0),
        phases: Some(
            ["freeze_ms", "dump_ms", "transfer_ms", "restore_ms"]
                .map(|k| m["timings"][k].as_u64().unwrap_or(0)),
        ),
        bytes: m["bytes_moved"].as_u64().unwrap_or(0),
        wire: m["bytes_on_wire"].as_u64().unwrap_or(0),
    })
}

fn plain_run(sites: &TwoSites, mib: u64, load: &str, seconds: u64, rtt: u64) -> Result<Outcome> {
    let criu = "/usr/local/sbin/criu";
    let work = sites.root.join("plain");
    let (img_a, img_b) = (work.join("a"), work.join("b"));
    std::fs::create_dir_all(&img_a)?;
    // Redis as the plain way runs it: its own PID namespace and session, like Ferry's.
    let holder = sites
        .a
        .command("setsid")
        .args([
            "unshare",
            "--pid",
            "--fork",
            "--",
            "setsid",
            "redis-server",
            "--port",
            "6380",
        ])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
            "--protected-mode",
            "no",
        ])
        .current_dir(&work)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let holder_pid = holder.id();
    let pid = ferry_e2e::wait_for("plain redis", Duration::from_secs(10), || {
        let kids =
            std::fs::read_to_string(format!("/proc/{holder_pid}/task/{holder_pid}/children"))
                .ok()?;
        let pid = kids.split_whitespace().next()?.to_string();
        sites
            .a
            .redis(6380, &["PING"])
            .ok()
            .filter(|r| r == "PONG")
            .map(|_| pid)
    })?;
    let _plain_redis = (Reaped(holder), KillPid(pid.parse()?));
    populate(sites, 6380, mib)?;
    let mut recv = Reaped(
        sites
            .b
            .command(self_exe()?)
            .args(["recv", RECV_TCP])
            .arg(&img_b)
            .spawn()?,
    );
    let (_relay, send_to) = if rtt == 0 {
        (None, RECV_TCP)
    } else {
        let relay = sites
            .a
            .command(self_exe()?)
            .args(["tcp-relay", RELAY_TCP, RECV_TCP, &(rtt / 2).to_string()])
            .spawn()?;
        (Some(Reaped(relay)), RELAY_TCP)
    };
    std::thread::sleep(Duration::from_millis(300));
    let client = start_client(sites, "10.213.0.1:6380,10.213.0.2:6380", load, seconds)?;
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    run(sites
        .a
        .command(criu)
        .args(["dump", "-t", &pid, "-D"])
        .arg(&img_a)
        .args([
            "--tcp-close",
            "--network-lock",
            "skip",
            "--skip-in-flight",
            "--file-locks",
            "-o",
            "dump.log",
        ]))
    .with_context(|| std::fs::read_to_string(img_a.join("dump.log")).unwrap_or_default())?;
    let mut send = sites.a.command(self_exe()?);
    send.args(["send", send_to]).arg(&img_a);
    run(&mut send)?;
    recv.0.wait()?;
    run(sites
        .b
        .command(criu)
        .args(["restore", "-d", "-D"])
        .arg(&img_b)
        .args(["--tcp-close", "--file-locks", "-o", "restore.log"]))
    .with_context(|| std::fs::read_to_string(img_b.join("restore.log")).unwrap_or_default())?;
    let total = started.elapsed();
    let client = finish_client(client)?;
    let bytes: u64 = std::fs::read_dir(&img_a)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    // The restored Redis at B: stop it.
    let _ = sites.b.redis(6380, &["SHUTDOWN", "NOSAVE"]);
    Ok(Outcome {
        client,
        total_ms: total.as_millis() as u64,
        phases: None,
        bytes,
        wire: bytes,
    })
}

fn bench(args: &[String]) -> Result<()> {
    let sizes: Vec<u64> = if args.is_empty() {
        vec![64, 256]
    } else {
        args.iter().map(|a| a.parse()).collect::<Result<_, _>>()?
    };
    let rate = env("FERRY_BENCH_RATE", "1gbit");
    let rtt: u64 = env("FERRY_BENCH_RTT_MS", "10").parse()?;
    let load = env("FERRY_BENCH_LOAD", "1000");
    let data = env("FERRY_BENCH_DATA", "populate");
    println!("link {rate}, round trip +{rtt} ms (userspace relay), client {load} requests/s over 16 connections, 5 s timeout, data: {data}");
    println!("stall: longest gap between two answers on one connection; late: longest time a request was answered after it was due");
    println!(
        "{:<8} {:<7} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "memory", "way", "requests", "failed", "stall", "late", "total", "image", "on wire"
    );
    for mib in sizes {
        for way in ["ferry", "plain"] {
            let mut opts = Options::new("bench");
            if rtt > 0 {
                opts.b_address_at_a = Some(RELAY_UDP.to_string());
            }
            let sites = TwoSites::start(opts)?;
            let _relay = if rtt > 0 {
                let relay = sites
                    .a
                    .command(self_exe()?)
                    .args([
                        "udp-relay",
                        RELAY_UDP,
                        &format!("{}:7444", sites.b.addr),
                        &(rtt / 2).to_string(),
                    ])
                    .spawn()?;
                Some(Reaped(relay))
            } else {
                None
            };
            sites.a.limit_egress(&rate)?;
            sites.b.limit_egress(&rate)?;
            let seconds = 6 + mib / 64;
            let outcome = if way == "ferry" {
                ferry_run(&sites, mib, &load, seconds)
            } else {
                plain_run(&sites, mib, &load, seconds, rtt)
            };
            let o = outcome.with_context(|| format!("{way} run at {mib} MiB\n{}", sites.logs()))?;
            let c = &o.client;
            println!(
                "{:<8} {:<7} {:>9} {:>7} {:>7.0} ms {:>7.0} ms {:>7} ms {:>7.1} MB {:>7.1} MB{}",
                format!("{mib} MiB"),
                way,
                c["requests"],
                c["failed"],
                c["max_gap_ms"].as_f64().unwrap_or(0.0),
                c["max_stall_ms"].as_f64().unwrap_or(0.0),
                o.total_ms,
                o.bytes as f64 / 1e6,
                o.wire as f64 / 1e6,
                o.phases
                    .map(|[f, d, t, r]| format!(
                        "   (freeze {f} ms: dump {d}, transfer {t}, restore {r})"
                    ))
                    .unwrap_or_default(),
            );
        }
    }
    Ok(())
}
