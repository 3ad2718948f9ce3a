//! `ferry-bench`: what clients see when a Redis server moves between two sites, the plain
//! way and Ferry's ways side by side, on the same link in the same run.
//!
//! Usage: ferry-bench [--svg FILE] [MIB…]   (default: 64 256)
//!   --svg FILE                the client's latency over time, a panel per way and size
//!   FERRY_BENCH_RATE=1gbit    link bandwidth (tc tbf on both sites' links)
//!   FERRY_BENCH_RTT_MS=10     round trip added by userspace delay relays (no netem here;
//!                             0 = no relay)
//!   FERRY_BENCH_LOAD=1000     client requests/s (SET, 16 connections, timeout 5 s)
//!   FERRY_BENCH_DATA=populate  Redis values: populate (DEBUG POPULATE, compressible) or
//!                             random (incompressible)
//!   FERRY_BENCH_WAYS=plain,criu-lazy,container,postcopy,service,warm   which ways run (default: all)
//!
//! Each size, each way on fresh sites (both with the `redis` service adapter):
//! - plain: the client talks to Redis at A directly; CRIU dumps it to disk, the image is
//!   copied over TCP through a delay relay, CRIU restores it at B, the client fails over.
//! - criu-lazy: the same by hand with CRIU's own post-copy (`criu dump --lazy-pages`, its
//!   page server reached from B's `criu lazy-pages` daemon through a delay relay).
//! - container: the client talks to A's ingress route; `ferry migrate --approach
//!   container` checkpoints, streams and restores it (stop-and-copy over QUIC).
//! - postcopy: the same, `--mode postcopy`: the destination runs at once and Ferry
//!   carries the pages from the frozen source after the switch.
//! - service: the same route; `ferry migrate --approach service`: a replica at B follows
//!   A through a tunnel over the peer link and is promoted while A's ingress holds clients.
//! - warm: `container` again, to a destination that holds the pages of an earlier move of
//!   the workload (moved to B, back to A, 1 % of its keys rewritten, then measured moving
//!   to B); its detail puts the cold first move and the warm one side by side.
//!
//! For each: the longest stall a client saw, failed requests, whether every acknowledged
//! write is at B, total migration time, bytes moved; for the service level the sync time
//! against what the link alone would take; and, per size, the approach Ferry picks on its
//! own (`ferry migrate --plan`) with its predicted stall. Gateway logs of every run are kept
//! in $TMPDIR/ferry-bench-logs.
//!
//! Internal subcommands (run inside a site's namespace): udp-relay, tcp-relay, send, recv.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_e2e::{run, Options, TwoSites};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A's way to B's gateway, and B's way to A's (delay relays in each site's namespace).
const RELAY_UDP: &str = "10.213.0.1:7555";
const RELAY_UDP_B: &str = "10.213.0.2:7555";
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

/// Redis's default `repl-diskless-sync-delay`: a replica's full copy starts this long
/// (checked once a second, so 4 to 6 s) after it asks; a service move's client runs longer.
const DISKLESS_DELAY_SECS: u64 = 5;

/// The link every way of a run crosses.
struct Link {
    /// As tc spells it ("1gbit").
    rate: String,
    bits_per_s: f64,
    /// Round trip added by the delay relays, in ms (0: no relays).
    rtt_ms: u64,
}

impl Link {
    /// How long `bytes` take at the link's rate, in ms.
    fn ms_for(&self, bytes: u64) -> f64 {
        bytes as f64 * 8.0 / self.bits_per_s * 1e3
    }
}

/// A tc rate ("1gbit", "500mbit", "10mbps") in bits per second.
fn bits_per_second(rate: &str) -> Result<f64> {
    let split = rate
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rate.len());
    let (number, unit) = rate.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("rate {rate:?}: expected a number and a tc unit"))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "bps" => 8.0,
        "kbps" => 8e3,
        "mbps" => 8e6,
        "gbps" => 8e9,
        other => bail!(
            "rate {rate:?}: unknown unit {other:?} (bit, kbit, mbit, gbit, bps, kbps, mbps, gbps)"
        ),
    };
    Ok(number * scale)
}

/// How a run moves Redis from A to B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// By hand: CRIU dump, copy over TCP, CRIU restore; the client fails over to B.
    Plain,
    /// `ferry migrate --approach container`: CRIU stop-and-copy driven by Ferry.
    Container,
    /// `ferry migrate --approach container --mode postcopy`: CRIU's lazy dump, pages
    /// carried by Ferry after the switch.
    Postcopy,
    /// `ferry migrate --approach service`: a live replica at B (the redis adapter).
    Service,
    /// By hand, CRIU's own post-copy: `criu dump --lazy-pages` at A, the other image files
    /// copied over TCP, `criu lazy-pages --page-server` and `criu restore --lazy-pages` at
    /// B, the daemon fetching pages from A's page server through a delay relay; the client
    /// fails over to B.
    CriuLazy,
    /// `container` to a warm destination: the workload moved to B once (cold), back to
    /// A, 1 % of its keys rewritten, then to B again, which still holds the pages of the
    /// first move; the row is the second move to B, its detail both moves side by side.
    Warm,
}

impl Way {
    const ALL: [Way; 6] = [
        Way::Plain,
        Way::CriuLazy,
        Way::Container,
        Way::Postcopy,
        Way::Service,
        Way::Warm,
    ];

    /// The ways named in a comma-separated list (all of them for an empty one).
    fn chosen(list: &str) -> Result<Vec<Way>> {
        if list.trim().is_empty() {
            return Ok(Way::ALL.to_vec());
        }
        list.split(',')
            .map(|name| {
                Way::ALL
                    .into_iter()
                    .find(|w| w.name() == name.trim())
                    .with_context(|| {
                        format!("no way named {name:?} (FERRY_BENCH_WAYS takes plain, criu-lazy, container, postcopy, service, warm)")
                    })
            })
            .collect()
    }

    fn name(self) -> &'static str {
        match self {
            Way::Plain => "plain",
            Way::Container => "container",
            Way::Postcopy => "postcopy",
            Way::Service => "service",
            Way::CriuLazy => "criu-lazy",
            Way::Warm => "warm",
        }
    }

    /// `ferry migrate` flags for Ferry's ways.
    fn flags(self) -> &'static [&'static str] {
        match self {
            Way::Plain | Way::CriuLazy => &["--approach", "container"],
            Way::Container | Way::Warm => &["--approach", "container", "--mode", "stop-and-copy"],
            Way::Postcopy => &["--approach", "container", "--mode", "postcopy"],
            Way::Service => &["--approach", "service"],
        }
    }
}

/// Acknowledged writes, and how many of them a Redis at B does not hold.
struct Acked {
    of: usize,
    missing: usize,
}

impl std::fmt::Display for Acked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.missing {
            0 => f.pad("yes"),
            n => f.pad(&format!("{n}/{} lost", self.of)),
        }
    }
}

/// One measured run: what the constant-rate client saw, and the migration's cost.
struct Outcome {
    client: Value,
    /// The client stopped before the move was over: it did not see the whole stall.
    client_too_short: bool,
    acked: Acked,
    total_ms: u64,
    /// The checkpoint image's size (none at the service level: no image).
    image: Option<u64>,
    /// What crossed the link: the image (compressed by Ferry), or the replica's stream.
    wire: u64,
    /// Ferry's account of the freeze (empty for the plain way).
    detail: String,
    /// `ferry migrate --plan` for the workload just before it moved (Ferry only).
    plan: Option<Value>,
    /// The migration's id at A (Ferry only): its timeline is drawn into the logs.
    id: Option<String>,
    /// Every request the client made (`ferry-load`'s trace), for `--svg`.
    trace: Vec<ferry_e2e::latency_svg::Sample>,
}

/// The constant-rate client (`ferry-load`) and when its last request is due.
struct Client {
    child: std::process::Child,
    ends: Instant,
}

impl Client {
    fn start(sites: &TwoSites, addrs: &str, load: &str, seconds: u64) -> Result<Self> {
        let child = sites
            .a
            .command(ferry_e2e::ferry_bin()?.with_file_name("ferry-load"))
            .args(["redis", addrs, load, &seconds.to_string(), "16"])
            .arg(sites.root.join("acked.txt"))
            .env("FERRY_LOAD_TRACE", sites.root.join("trace.txt"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        Ok(Self {
            child,
            ends: Instant::now() + Duration::from_secs(seconds),
        })
    }

    /// The client's summary, and whether it stopped less than a second after the move
    /// ended at `moved` (then the stall it reports may be short of the truth).
    fn finish(self, moved: Instant) -> Result<(Value, bool)> {
        let out = self.child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "load client failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let too_short = moved + Duration::from_secs(1) > self.ends;
        Ok((serde_json::from_slice(&out.stdout)?, too_short))
    }
}

/// Checks every write the client saw acknowledged against the Redis on `port` at B.
fn acked_at_b(sites: &TwoSites, port: u16) -> Result<Acked> {
    let text = std::fs::read_to_string(sites.root.join("acked.txt"))?;
    let keys: Vec<&str> = text.lines().collect();
    let mut present = 0;
    for chunk in keys.chunks(500) {
        let mut args = vec!["EXISTS"];
        args.extend_from_slice(chunk);
        present += sites
            .b
            .redis(port, &args)?
            .parse::<usize>()
            .context("EXISTS at B")?;
    }
    Ok(Acked {
        of: keys.len(),
        missing: keys.len() - present,
    })
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
    ferry_e2e::redis_fill_random(&sites.a, &sites.root, port, keys, 1000)
}

/// The port Ferry's Redis listens on: the one the redis adapter's default grant lets its
/// tunnel reach (`tunnel_ports = [6379]`).
const PORT: u16 = 6379;
/// Site A's route to it, and where the client reaches that route.
const ROUTE: &str = "0.0.0.0:16379";
const ROUTE_AT_A: &str = "10.213.0.1:16379";

/// Ferry moves Redis with `way`'s approach while the client writes through A's route.
fn ferry_run(
    sites: &TwoSites,
    way: Way,
    mib: u64,
    load: &str,
    seconds: u64,
    link: &Link,
) -> Result<Outcome> {
    sites.run_redis_at_a_with("redis", PORT, &["--route", ROUTE])?;
    populate(sites, PORT, mib)?;
    let plan = sites
        .a
        .ferry_json(&["migrate", "redis", "--to", "b", "--plan"])?;
    let client = Client::start(sites, ROUTE_AT_A, load, seconds)?;
    std::thread::sleep(Duration::from_secs(1));
    let (ok, m) = sites.migrate_with("redis", "b", way.flags())?;
    let (client, client_too_short) = client.finish(Instant::now())?;
    if !ok {
        bail!("ferry migration failed: {m}");
    }
    let bytes = |k: &str| m[k].as_u64().unwrap_or(0);
    // A checkpoint moves an image (compressed on the wire); a replica only its stream.
    let (image, wire, redis) = if m["approach"] == "service" {
        (None, bytes("bytes_moved"), RedisSync::from_logs(sites))
    } else {
        (Some(bytes("bytes_moved")), bytes("bytes_on_wire"), None)
    };
    Ok(Outcome {
        trace: Vec::new(),
        client,
        client_too_short,
        acked: acked_at_b(sites, PORT)?,
        total_ms: m["timings"]["total_ms"].as_u64().unwrap_or(0),
        image,
        wire,
        detail: freeze_detail(&m, link, redis.as_ref()),
        plan: Some(plan),
        id: m["id"].as_str().map(str::to_string),
    })
}

/// The warm way: a cold move to B, back to A, 1 % of the keys rewritten, then the measured
/// move to B, which holds the first move's pages.
fn warm_run(sites: &TwoSites, mib: u64, load: &str, seconds: u64, link: &Link) -> Result<Outcome> {
    sites.run_redis_at_a_with("redis", PORT, &["--route", ROUTE])?;
    populate(sites, PORT, mib)?;
    let keys = mib * 1024 * 1024 / 1000;
    let flags = Way::Warm.flags();
    let cold = sites.warm_up("redis", PORT, keys, 1000, flags)?;
    let client = Client::start(sites, ROUTE_AT_A, load, seconds)?;
    std::thread::sleep(Duration::from_secs(1));
    let (ok, m) = sites.migrate_with("redis", "b", flags)?;
    let (client, client_too_short) = client.finish(Instant::now())?;
    if !ok {
        bail!("the warm move failed: {m}");
    }
    let changed = keys.div_ceil(100);
    let n = |m: &Value, k: &str| m[k].as_u64().unwrap_or(0);
    let mb = |b: u64| b as f64 / 1e6;
    let side_by_side = format!(
        "   cold: {:.1} MB on the wire, freeze {} ms | warm ({} keys of {keys} rewritten): {:.1} MB on the wire ({:.1} % of cold), {:.1} MB as digests, freeze {} ms",
        mb(n(&cold, "bytes_on_wire")),
        cold["timings"]["freeze_ms"],
        changed,
        mb(n(&m, "bytes_on_wire")),
        100.0 * n(&m, "bytes_on_wire") as f64 / n(&cold, "bytes_on_wire").max(1) as f64,
        mb(n(&m, "bytes_deduped")),
        m["timings"]["freeze_ms"],
    );
    Ok(Outcome {
        trace: Vec::new(),
        client,
        client_too_short,
        acked: acked_at_b(sites, PORT)?,
        total_ms: m["timings"]["total_ms"].as_u64().unwrap_or(0),
        image: Some(n(&m, "bytes_moved")),
        wire: n(&m, "bytes_on_wire"),
        detail: format!("{}{side_by_side}", freeze_detail(&m, link, None)),
        plan: None,
        id: m["id"].as_str().map(str::to_string),
    })
}

/// A Redis full sync as the two servers' logs tell it: how long the source waited before
/// it started the copy (`repl-diskless-sync-delay`), and the copy until the replica had
/// loaded it (the replica loads as the copy arrives: `repl-diskless-load`).
struct RedisSync {
    wait_ms: i64,
    copy_ms: i64,
}

impl RedisSync {
    /// Reads the source's and the replica's logs (`data/logs/redis.log` at each site).
    fn from_logs(sites: &TwoSites) -> Option<Self> {
        let read = |site: &ferry_e2e::Site| {
            std::fs::read_to_string(site.dir.join("data/logs/redis.log")).unwrap_or_default()
        };
        let (source, replica) = (read(&sites.a), read(&sites.b));
        let asked = log_time(&source, "asks for synchronization")?;
        let started = log_time(&source, "Starting BGSAVE for SYNC")?;
        let done = log_time(&replica, "MASTER <-> REPLICA sync: Finished with success")?;
        Some(Self {
            wait_ms: started - asked,
            copy_ms: done - started,
        })
    }
}

/// When the first Redis log line containing `what` was written, in ms of its day
/// ("1:M 29 Nov 2026 18:11:19.914 * …"; the two sites share this machine's clock).
fn log_time(log: &str, what: &str) -> Option<i64> {
    let line = log.lines().find(|l| l.contains(what))?;
    let (hms, millis) = line.split_whitespace().nth(4)?.split_once('.')?;
    let mut parts = hms.split(':').map(str::parse::<i64>);
    let (h, m, s) = (
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok()?,
    );
    Some(((h * 60 + m) * 60 + s) * 1000 + millis.parse::<i64>().ok()?)
}

/// Ferry's record of the freeze: its phases (a checkpoint), or, at the service level, the
/// sync before it against what the link alone would take for the replica's stream, and
/// (from Redis's logs) what the sync spent its time on.
fn freeze_detail(m: &Value, link: &Link, redis: Option<&RedisSync>) -> String {
    let t = |k: &str| m["timings"][k].as_u64().unwrap_or(0);
    if m["approach"] != "service" {
        let pages = m["timings"]["postcopy_ms"]
            .as_u64()
            .map_or_else(String::new, |ms| format!("; every page at B {ms} ms later"));
        // Link utilisation while pages went ahead and during the push after the switch.
        let use_of = |wire: u64, ms: u64| {
            if ms == 0 || wire == 0 {
                return String::from("-");
            }
            format!(
                "{:.0}% ({:.1} MB in {ms} ms)",
                link.ms_for(wire) / ms as f64 * 100.0,
                wire as f64 / 1e6
            )
        };
        let p = &m["pages"];
        let link_use = if p.is_object() {
            format!(
                "; link use: ahead {}, push {}",
                use_of(
                    p["ahead_wire"].as_u64().unwrap_or(0),
                    m["timings"]["prepush_ms"].as_u64().unwrap_or(0)
                ),
                use_of(
                    p["after_wire"].as_u64().unwrap_or(0),
                    p["push_ms"].as_u64().unwrap_or(0)
                )
            )
        } else {
            String::new()
        };
        let pages = format!("{pages}{link_use}");
        return format!(
            "   (freeze {} ms: dump {}, transfer {}, restore {}{pages})",
            t("freeze_ms"),
            t("dump_ms"),
            t("transfer_ms"),
            t("restore_ms")
        );
    }
    let bytes = m["sync"]["bytes"].as_u64().unwrap_or(0);
    let ideal = link.ms_for(bytes).max(1.0);
    let sync = t("sync_ms");
    let parts = redis.map_or_else(String::new, |r| {
        format!(
            ": Redis's diskless-sync wait {}, copy and load {} = {:.1}x",
            r.wait_ms,
            r.copy_ms,
            r.copy_ms as f64 / ideal,
        )
    });
    format!(
        "   (freeze {} ms; sync {sync} ms = {:.1}x {:.1} MB at {} ({ideal:.0} ms){parts})",
        t("freeze_ms"),
        sync as f64 / ideal,
        bytes as f64 / 1e6,
        link.rate,
    )
}

/// What Ferry would do on its own: the chosen candidate of `ferry migrate --plan` and
/// every candidate's predicted stall.
fn choice(plan: &Value) -> String {
    let none = Vec::new();
    let candidates = plan["candidates"].as_array().unwrap_or(&none);
    let stall = |c: &Value| {
        c["predicted_stall_ms"]
            .as_u64()
            .map_or_else(|| "-".to_string(), |ms| format!("{ms} ms"))
    };
    let all: Vec<String> = candidates
        .iter()
        .map(|c| {
            let feasible = if c["feasible"] == true && c["allowed"] == true {
                ""
            } else {
                ", not feasible"
            };
            format!(
                "{} {}{feasible}",
                c["approach"].as_str().unwrap_or("?"),
                stall(c)
            )
        })
        .collect();
    let chosen = plan["chosen"]
        .as_u64()
        .and_then(|i| candidates.get(usize::try_from(i).ok()?));
    match chosen {
        Some(c) => format!(
            "Ferry's choice: {}, predicted stall {} (candidates: {})",
            c["approach"].as_str().unwrap_or("?"),
            stall(c),
            all.join(", ")
        ),
        None => format!(
            "Ferry's choice: none ({}; candidates: {})",
            plan["why"].as_str().unwrap_or(""),
            all.join(", ")
        ),
    }
}

/// The CRIU both hand-driven ways run (the one `scripts/setup` builds).
const CRIU: &str = "/usr/local/sbin/criu";

/// Redis on 6380 at A as the hand-driven ways run it: its own PID namespace and session,
/// like Ferry's. Returns its pid and what stops it when the run ends.
fn plain_redis(sites: &TwoSites, work: &Path) -> Result<(String, (Reaped, KillPid))> {
    let holder = sites
        .a
        .command("setsid")
        .args(["unshare", "--pid", "--fork", "--", "setsid"])
        .args(ferry_e2e::redis_process_args(6380))
        .args(["--protected-mode", "no"])
        .current_dir(work)
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
    let guard = (Reaped(holder), KillPid(pid.parse()?));
    Ok((pid, guard))
}

/// A hand-driven way's Redis at A, filled, and its image directories at each site.
struct HandRun {
    img_a: PathBuf,
    img_b: PathBuf,
    pid: String,
    _redis: (Reaped, KillPid),
}

fn hand_start(sites: &TwoSites, way: &str, mib: u64) -> Result<HandRun> {
    let work = sites.root.join(way);
    let (img_a, img_b) = (work.join("a"), work.join("b"));
    std::fs::create_dir_all(&img_a)?;
    let (pid, _redis) = plain_redis(sites, &work)?;
    populate(sites, 6380, mib)?;
    Ok(HandRun {
        img_a,
        img_b,
        pid,
        _redis,
    })
}

/// Receives image files at B, and the way A sends them there: through a delay relay
/// when the link has a round trip.
fn image_path(
    sites: &TwoSites,
    img_b: &Path,
    rtt: u64,
) -> Result<(Reaped, Option<Reaped>, &'static str)> {
    let recv = Reaped(
        sites
            .b
            .command(self_exe()?)
            .args(["recv", RECV_TCP])
            .arg(img_b)
            .spawn()?,
    );
    if rtt == 0 {
        return Ok((recv, None, RECV_TCP));
    }
    let relay = sites
        .a
        .command(self_exe()?)
        .args(["tcp-relay", RELAY_TCP, RECV_TCP, &(rtt / 2).to_string()])
        .spawn()?;
    Ok((recv, Some(Reaped(relay)), RELAY_TCP))
}

fn plain_run(sites: &TwoSites, mib: u64, load: &str, seconds: u64, rtt: u64) -> Result<Outcome> {
    let criu = CRIU;
    let HandRun {
        img_a,
        img_b,
        pid,
        _redis,
        ..
    } = hand_start(sites, "plain", mib)?;
    let (mut recv, _relay, send_to) = image_path(sites, &img_b, rtt)?;
    std::thread::sleep(Duration::from_millis(300));
    let client = Client::start(sites, "10.213.0.1:6380,10.213.0.2:6380", load, seconds)?;
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    run(sites
        .a
        .command(criu)
        .args(["dump", "-t", &pid, "-D"])
        .arg(&img_a)
        .args(DUMP_FLAGS)
        .args(["-o", "dump.log"]))
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
        .args(RESTORE_FLAGS)
        .args(["-o", "restore.log"]))
    .with_context(|| std::fs::read_to_string(img_b.join("restore.log")).unwrap_or_default())?;
    let total = started.elapsed();
    let (client, client_too_short) = client.finish(Instant::now())?;
    let acked = acked_at_b(sites, 6380)?;
    let bytes: u64 = std::fs::read_dir(&img_a)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    // The restored Redis at B: stop it.
    let _ = sites.b.redis(6380, &["SHUTDOWN", "NOSAVE"]);
    Ok(Outcome {
        trace: Vec::new(),
        client,
        client_too_short,
        acked,
        total_ms: total.as_millis() as u64,
        image: Some(bytes),
        wire: bytes,
        detail: String::new(),
        plan: None,
        id: None,
    })
}

/// A's lazy dump's page server, and where B's `criu lazy-pages` reaches it (a delay relay
/// in B's namespace, when the link has a round trip).
const PAGE_SERVER: &str = "10.213.0.1:7560";
const PAGE_RELAY: &str = "10.213.0.2:7559";

/// How the hand-driven ways dump Redis (open connections closed, as Ferry does).
const DUMP_FLAGS: [&str; 5] = [
    "--tcp-close",
    "--network-lock",
    "skip",
    "--skip-in-flight",
    "--file-locks",
];
/// And restore it.
const RESTORE_FLAGS: [&str; 2] = ["--tcp-close", "--file-locks"];

/// Starts CRIU in `site`'s namespace on the images in `dir`, logging to `dir/log`, and
/// returns once it serves (its `--status-fd` byte, written to a file in `dir`), failing
/// early if it exits first.
fn criu_until_ready(
    site: &ferry_e2e::Site,
    args: &[&str],
    dir: &Path,
    log: &str,
    limit: Duration,
) -> Result<Reaped> {
    let (status, name) = (dir.join(format!("{log}.status")), log);
    let log = dir.join(name);
    let _ = std::fs::remove_file(&status);
    let mut child = Reaped(
        site.command("sh")
            .args([
                "-c",
                r#"exec "$0" "$@" --status-fd 3 3>"$FERRY_BENCH_STATUS""#,
                CRIU,
            ])
            .args(args)
            .arg("-D")
            .arg(dir)
            .args(["-o", name])
            .env("FERRY_BENCH_STATUS", &status)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + limit;
    loop {
        if std::fs::metadata(&status).is_ok_and(|m| m.len() > 0) {
            return Ok(child);
        }
        if let Some(st) = child.0.try_wait()? {
            bail!(
                "criu exited ({st}) before it was ready: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!("criu not ready within {limit:?}; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn criu_lazy_run(
    sites: &TwoSites,
    mib: u64,
    load: &str,
    seconds: u64,
    rtt: u64,
) -> Result<Outcome> {
    let HandRun {
        img_a,
        img_b,
        pid,
        _redis,
    } = hand_start(sites, "lazy", mib)?;
    let (mut recv, _relay, send_to) = image_path(sites, &img_b, rtt)?;
    let (_page_relay, pages_from) = if rtt == 0 {
        (None, PAGE_SERVER)
    } else {
        let relay = sites
            .b
            .command(self_exe()?)
            .args(["tcp-relay", PAGE_RELAY, PAGE_SERVER, &(rtt / 2).to_string()])
            .spawn()?;
        (Some(Reaped(relay)), PAGE_RELAY)
    };
    let (ps_ip, ps_port) = PAGE_SERVER.split_once(':').context("page server address")?;
    let (from_ip, from_port) = pages_from.split_once(':').context("page relay address")?;
    std::thread::sleep(Duration::from_millis(300));
    let client = Client::start(sites, "10.213.0.1:6380,10.213.0.2:6380", load, seconds)?;
    std::thread::sleep(Duration::from_secs(1));
    let memory = ferry::sys::process::tree_rss_bytes(pid.parse()?).unwrap_or(0);
    let started = Instant::now();
    // The dump freezes Redis, writes all but the lazy pages, then serves those.
    let dump_args: Vec<&str> = ["dump", "-t", &pid, "--lazy-pages", "--address", ps_ip]
        .into_iter()
        .chain(["--port", ps_port])
        .chain(DUMP_FLAGS)
        .collect();
    let mut dump = criu_until_ready(
        &sites.a,
        &dump_args,
        &img_a,
        "dump.log",
        Duration::from_secs(120),
    )?;
    let mut send = sites.a.command(self_exe()?);
    send.args(["send", send_to]).arg(&img_a);
    run(&mut send)?;
    recv.0.wait()?;
    let daemon_args = [
        "lazy-pages",
        "--page-server",
        "--address",
        from_ip,
        "--port",
        from_port,
    ];
    let mut daemon = criu_until_ready(
        &sites.b,
        &daemon_args,
        &img_b,
        "lazy-pages.log",
        Duration::from_secs(30),
    )?;
    run(sites
        .b
        .command(CRIU)
        .args(["restore", "-d", "--lazy-pages", "-D"])
        .arg(&img_b)
        .args(RESTORE_FLAGS)
        .args(["-o", "restore.log"]))
    .with_context(|| std::fs::read_to_string(img_b.join("restore.log")).unwrap_or_default())?;
    let restored = started.elapsed();
    // The source stays frozen until the daemon has fetched every page.
    let limit = Instant::now() + Duration::from_secs(180);
    while dump.0.try_wait()?.is_none() {
        if Instant::now() > limit {
            bail!(
                "CRIU's lazy dump still serving pages 180 s after the freeze (B restored after {} ms)",
                restored.as_millis()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let total = started.elapsed();
    let _ = daemon.0.wait();
    let (client, client_too_short) = client.finish(Instant::now())?;
    let acked = acked_at_b(sites, 6380)?;
    let files: u64 = std::fs::read_dir(&img_a)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    // What the daemon fetched: the source's memory (CRIU's log does not count it).
    let lazy = memory;
    let _ = sites.b.redis(6380, &["SHUTDOWN", "NOSAVE"]);
    Ok(Outcome {
        trace: Vec::new(),
        client,
        client_too_short,
        acked,
        total_ms: total.as_millis() as u64,
        image: Some(files + lazy),
        wire: files + lazy,
        detail: format!(
            "   (restored {} ms after the freeze; every page at B {} ms after it)",
            restored.as_millis(),
            total.as_millis()
        ),
        plan: None,
        id: None,
    })
}

/// Starts a UDP delay relay in `site`'s namespace: `listen` there, on to `target`.
fn udp_relay_at(site: &ferry_e2e::Site, listen: &str, target: &str, rtt: u64) -> Result<Reaped> {
    Ok(Reaped(
        site.command(self_exe()?)
            .args(["udp-relay", listen, target, &(rtt / 2).to_string()])
            .spawn()?,
    ))
}

/// Two sites with the redis adapter installed, whose gateways reach each other only over
/// the link: tbf on both ends and, with a round trip, a delay relay in each direction
/// (each gateway dials its own QUIC connection; the service level's tunnel rides B's).
fn start_sites(link: &Link) -> Result<(TwoSites, Vec<Reaped>)> {
    let mut opts = Options::new("bench");
    opts.adapters = vec!["process".into(), "redis".into()];
    if link.rtt_ms > 0 {
        opts.b_address_at_a = Some(RELAY_UDP.to_string());
    }
    let compression = opts.compression.clone();
    let mut sites = TwoSites::start(opts)?;
    let mut relays = Vec::new();
    if link.rtt_ms > 0 {
        let (a, b) = (
            format!("{}:7444", sites.a.addr),
            format!("{}:7444", sites.b.addr),
        );
        relays.push(udp_relay_at(&sites.a, RELAY_UDP, &b, link.rtt_ms)?);
        relays.push(udp_relay_at(&sites.b, RELAY_UDP_B, &a, link.rtt_ms)?);
        // A gateway reads its peers when it starts: point B at its relay, then restart it.
        sites.b.stop_gateway();
        sites.b.ferry(&[
            "peer",
            "add",
            "a",
            RELAY_UDP_B,
            &sites.a.fingerprint,
            "--compression",
            &compression,
        ])?;
        sites.start_gateway_b()?;
    }
    sites.a.limit_egress(&link.rate)?;
    sites.b.limit_egress(&link.rate)?;
    Ok((sites, relays))
}

/// One way at one size on fresh sites; the gateways' logs are kept in `logs`.
fn measure(
    way: Way,
    mib: u64,
    load: &str,
    seconds: u64,
    link: &Link,
    logs: &Path,
) -> Result<Outcome> {
    let (sites, _relays) = start_sites(link)?;
    let mut outcome = match way {
        Way::Plain => plain_run(&sites, mib, load, seconds, link.rtt_ms),
        Way::CriuLazy => criu_lazy_run(&sites, mib, load, seconds, link.rtt_ms),
        Way::Container | Way::Postcopy | Way::Service => {
            ferry_run(&sites, way, mib, load, seconds, link)
        }
        Way::Warm => warm_run(&sites, mib, load, seconds, link),
    };
    if let Ok(o) = outcome.as_mut() {
        let trace = std::fs::read_to_string(sites.root.join("trace.txt")).unwrap_or_default();
        o.trace = ferry_e2e::latency_svg::parse_trace(&trace);
    }
    std::fs::write(
        logs.join(format!("{mib}mib-{}.log", way.name())),
        sites.logs(),
    )?;
    // Ferry's moves: the migration's timeline, drawn from its record.
    if let Some(id) = outcome.as_ref().ok().and_then(|o| o.id.as_deref()) {
        let svg = logs.join(format!("{mib}mib-{}-timeline.svg", way.name()));
        let svg = svg.display().to_string();
        if let Err(e) = sites
            .a
            .ferry(&["migration", "show", id, "--timeline", &svg])
        {
            println!("(no timeline for {id}: {e:#})");
        }
    }
    outcome
}

fn print_row(mib: u64, way: Way, o: &Outcome) {
    let c = &o.client;
    println!(
        "{:<8} {:<9} {:>9} {:>7} {:>7.0} ms {:>7.0} ms {:>7.0} ms {:>10} {:>7} ms {:>10} {:>7.1} MB{}{}",
        format!("{mib} MiB"),
        way.name(),
        c["requests"].as_u64().unwrap_or(0),
        c["failed"].as_u64().unwrap_or(0),
        c["max_gap_ms"].as_f64().unwrap_or(0.0),
        c["max_stall_ms"].as_f64().unwrap_or(0.0),
        c["p99_after_switch_ms"].as_f64().unwrap_or(0.0),
        o.acked,
        o.total_ms,
        o.image
            .map_or_else(|| "-".to_string(), |b| format!("{:.1} MB", b as f64 / 1e6)),
        o.wire as f64 / 1e6,
        o.detail,
        if o.client_too_short {
            "   [the client stopped before the move ended: stall not fully seen]"
        } else {
            ""
        },
    );
}

fn bench(args: &[String]) -> Result<()> {
    let mut args = args.to_vec();
    let svg = match args.iter().position(|a| a == "--svg") {
        Some(i) => {
            if i + 1 >= args.len() {
                bail!("--svg needs a file name");
            }
            let file = PathBuf::from(args.remove(i + 1));
            args.remove(i);
            Some(file)
        }
        None => None,
    };
    let mut panels = Vec::new();
    let sizes: Vec<u64> = if args.is_empty() {
        vec![64, 256]
    } else {
        args.iter().map(|a| a.parse()).collect::<Result<_, _>>()?
    };
    let rate = env("FERRY_BENCH_RATE", "1gbit");
    let link = Link {
        bits_per_s: bits_per_second(&rate)?,
        rate,
        rtt_ms: env("FERRY_BENCH_RTT_MS", "10").parse()?,
    };
    let load = env("FERRY_BENCH_LOAD", "1000");
    let data = env("FERRY_BENCH_DATA", "populate");
    let ways = Way::chosen(&env("FERRY_BENCH_WAYS", ""))?;
    let logs = std::env::temp_dir().join("ferry-bench-logs");
    std::fs::create_dir_all(&logs)?;
    println!(
        "link {}, round trip +{} ms (userspace relays), client {load} requests/s over 16 connections, 5 s timeout, data: {data}",
        link.rate, link.rtt_ms
    );
    println!("stall: longest gap between two answers on one connection; late: longest time a request was answered after it was due; p99 1s: p99 latency of the requests due in the first second after the switch; acked at B: every acknowledged write is at B");
    println!("gateway logs of each run: {}", logs.display());
    println!(
        "{:<8} {:<9} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "memory",
        "way",
        "requests",
        "failed",
        "stall",
        "late",
        "p99 1s",
        "acked at B",
        "total",
        "image",
        "on wire"
    );
    for mib in sizes {
        // Long enough for the slowest way: a service move first waits for Redis's
        // diskless-sync delay, then streams the dataset (allow 3x the link's time).
        let state = mib * 1024 * 1024 * 11 / 10;
        let seconds =
            6 + mib / 64 + DISKLESS_DELAY_SECS + (3.0 * link.ms_for(state) / 1e3).ceil() as u64;
        let mut plan = None;
        for way in ways.iter().copied() {
            match measure(way, mib, &load, seconds, &link, &logs) {
                Ok(o) => {
                    print_row(mib, way, &o);
                    panels.push(ferry_e2e::latency_svg::Series {
                        name: format!("{mib} MiB, {}", way.name()),
                        samples: o.trace,
                    });
                    plan = plan.or(o.plan);
                }
                Err(e) => println!(
                    "{:<8} {:<9} failed: {e:#} (gateway logs in {})",
                    format!("{mib} MiB"),
                    way.name(),
                    logs.display()
                ),
            }
        }
        if let Some(plan) = plan {
            println!("{:<8} {}", format!("{mib} MiB"), choice(&plan));
        }
    }
    if let Some(file) = svg {
        let title = format!(
            "What a client saw: Redis moved from A to B, {load} requests/s, link {} +{} ms RTT, data: {data}",
            link.rate, link.rtt_ms
        );
        std::fs::write(&file, ferry_e2e::latency_svg::render(&title, &panels))?;
        println!("client latency over time: {}", file.display());
    }
    Ok(())
}
