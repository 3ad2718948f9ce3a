//! What an adapter instance can reach: the store's state, and the host interfaces, each
//! checked against the adapter's grant on every call and confined to the workload the
//! current call is about. Implemented once; each WIT version's bindings (`bindings/`)
//! call in with the current version's records and map [`HostError`] to their own terms.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::AsyncReadExt;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Result as WtResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::current::ferry::adapter::{exec, log};
use super::call::AdapterCall;
use super::grant::{Capability, Granted};
use crate::criu::{Criu, DumpRequest, Inherit, RestoreRequest};
use crate::sys::process::{self, Started, WORKLOAD_PATH};

/// Most stdout an `exec` call returns.
const MAX_STDOUT: usize = 1 << 20;
/// How much of stderr an `exec` call returns (its end).
const STDERR_TAIL: usize = 4096;

/// Memory accounting for one instance; remembers whether the limit was hit so a trap can
/// be reported as what it is.
pub struct MemoryLimit {
    pub max_bytes: usize,
    pub hit: bool,
}

impl ResourceLimiter for MemoryLimit {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> WtResult<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> WtResult<bool> {
        Ok(desired <= 100_000)
    }
}

/// Opens the near end of tunnels for adapters (the ingress, over the peer link): a local
/// TCP endpoint whose connections reach `port` of `workload` at `peer`, scoped to
/// `migration` (closed when it ends).
pub trait TunnelOpener: Send + Sync {
    fn open(
        &self,
        peer: &str,
        migration: &str,
        workload: &str,
        port: u16,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<std::net::SocketAddr, String>> + Send + '_>,
    >;
}

pub struct State {
    pub plugin: String,
    /// Where `tunnel.open` goes; none on a host without a peer link.
    pub tunnels: Option<Arc<dyn TunnelOpener>>,
    pub granted: Arc<Granted>,
    pub criu: Criu,
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub memory: MemoryLimit,
    /// The call being served (none between calls and during `describe`).
    pub call: Option<AdapterCall>,
    /// What `process.spawn` started during this call.
    pub spawned: Option<Started>,
    /// The loopback port `lazy.dump-spec` gave this call's lazy dump.
    pub dump_port: Option<u16>,
    /// Where the programs `exec.run` starts are recorded while they run.
    pub inflight: Option<Arc<super::inflight::Inflight>>,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Why a host interface did not do what the adapter asked. Implemented once, here; each
/// WIT version reports it in its own terms (`bindings/`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HostError {
    /// The site refused: a capability it does not grant, a program not on the allow-list.
    #[error("denied: {0}")]
    Denied(String),
    /// Attempted, and it failed.
    #[error("{0}")]
    Failed(String),
    /// The request does not fit the current call (no workload, no process, no images).
    #[error("{0}")]
    Invalid(String),
}

impl State {
    fn check(&self, c: Capability) -> Result<(), HostError> {
        if self.granted.allows(c) {
            Ok(())
        } else {
            tracing::warn!(plugin = %self.plugin, capability = %c, "adapter denied a capability");
            Err(HostError::Denied(format!(
                "capability {c} is not granted to adapter {}; grant it in [plugins.grants.{}] of site.toml if the adapter should have it",
                self.plugin, self.plugin
            )))
        }
    }

    fn call(&self) -> Result<&AdapterCall, HostError> {
        self.call
            .as_ref()
            .ok_or_else(|| HostError::Invalid("this call is about no workload".into()))
    }

    fn pid(&self) -> Result<i32, HostError> {
        self.call()?
            .pid
            .ok_or_else(|| HostError::Invalid("the workload has no process at this site".into()))
    }

    /// The workload's pid if that very process is still alive.
    fn live_pid(&self) -> Option<i32> {
        self.call.as_ref().and_then(AdapterCall::live_pid)
    }

    fn images(&self) -> Result<PathBuf, HostError> {
        self.call()?
            .images
            .clone()
            .ok_or_else(|| HostError::Invalid("no migration image directory for this call".into()))
    }

    /// Rebuilds the WASI context for the next call: no environment; connections only to
    /// granted addresses; file access only to the current workload's work and image
    /// directories; each only if granted.
    pub fn reset_wasi(&mut self) {
        let mut b = wasmtime_wasi::WasiCtxBuilder::new();
        b.allow_ip_name_lookup(false);
        if self.granted.allows(Capability::Sockets) {
            // TCP and UDP sockets exist only with the grant; each address is checked too.
            b.allow_tcp(true).allow_udp(true);
            let allowed = Arc::new(self.granted.sockets.clone());
            let plugin = self.plugin.clone();
            b.socket_addr_check(move |addr, use_| {
                use wasmtime_wasi::sockets::SocketAddrUse as U;
                let ok = match use_ {
                    U::TcpConnect | U::UdpSend | U::UdpReceive => allowed.contains(&addr),
                    // The implicit bind a connect performs: wildcard address, any port.
                    U::TcpBind | U::UdpBind => addr.ip().is_unspecified() && addr.port() == 0,
                    _ => false,
                };
                if !ok {
                    tracing::warn!(plugin = %plugin, %addr, ?use_, "adapter denied a socket address");
                }
                Box::pin(async move { ok })
            });
        }
        if self.granted.allows(Capability::Files) {
            let dirs = [
                (
                    self.call.as_ref().map(|c| c.placement.work_dir.clone()),
                    "/work",
                ),
                (self.call.as_ref().and_then(|c| c.images.clone()), "/images"),
            ];
            for (dir, guest) in dirs {
                if let Some(dir) = dir.filter(|d| d.is_dir()) {
                    if let Err(e) = b.preopened_dir(&dir, guest, wasmtime_wasi::FsPerms::ReadWrite)
                    {
                        tracing::warn!(plugin = %self.plugin, dir = %dir.display(), error = %e, "cannot preopen");
                    }
                }
            }
        }
        self.wasi = b.build();
    }
}

/// The host interfaces, implemented once for every WIT version (which call these with
/// the current version's records and map [`HostError`] to their own error type).
impl State {
    /// `log.log`: a line in the gateway's log, tagged with the adapter; dropped silently
    /// without the capability (logging is not worth failing a call over).
    pub fn log_line(&self, level: log::Level, message: &str) {
        if !self.granted.allows(Capability::Log) {
            return;
        }
        let message: String = message.chars().take(4096).collect();
        let plugin = &self.plugin;
        match level {
            log::Level::Debug => tracing::debug!(plugin, "{message}"),
            log::Level::Info => tracing::info!(plugin, "{message}"),
            log::Level::Warn => tracing::warn!(plugin, "{message}"),
            log::Level::Error => tracing::error!(plugin, "{message}"),
        }
    }

    /// `exec.run`: a program from the adapter's allow-list, under its timeout.
    pub async fn exec(&mut self, cmd: exec::Command) -> Result<exec::Output, HostError> {
        self.check_program(&cmd)?;
        let plugin = self.plugin.clone();
        if cmd.output == exec::OutputMode::WorkloadLog {
            let Some(log) = self.call.as_ref().map(|c| c.placement.log.clone()) else {
                return Err(HostError::Invalid("no workload log for this call".into()));
            };
            return run_into_log(&plugin, cmd, &log, self.inflight.as_deref())
                .await
                .map_err(HostError::Failed);
        }
        run_program(&plugin, cmd, self.inflight.as_deref())
            .await
            .map_err(HostError::Failed)
    }

    /// May this adapter run `cmd`: the exec capability, the program on its allow-list, no
    /// environment variable that changes the code it runs.
    fn check_program(&self, cmd: &exec::Command) -> Result<(), HostError> {
        self.check(Capability::Exec)?;
        if !self.granted.allows_program(&cmd.program) {
            tracing::warn!(plugin = %self.plugin, program = %cmd.program, "adapter denied a program");
            return Err(HostError::Denied(format!(
                "adapter {} may not run {:?}; its exec allow-list is {:?}",
                self.plugin, cmd.program, self.granted.exec
            )));
        }
        if let Some((name, _)) = cmd.env.iter().find(|(k, _)| super::grant::env_refused(k)) {
            tracing::warn!(plugin = %self.plugin, program = %cmd.program, variable = %name, "adapter denied an environment variable");
            return Err(HostError::Denied(format!(
                "adapter {} may not set {name} for {:?}: it changes the code the program runs",
                self.plugin, cmd.program
            )));
        }
        let images = self.call.as_ref().and_then(|c| c.images.as_deref());
        if let Err(why) =
            super::containers::check(&cmd.program, &cmd.args, &self.granted.mounts, images)
        {
            tracing::warn!(plugin = %self.plugin, program = %cmd.program, args = ?cmd.args, %why, "adapter denied a container");
            return Err(HostError::Denied(format!(
                "adapter {} may not run {} so: {why}",
                self.plugin, cmd.program
            )));
        }
        Ok(())
    }

    /// `lazy.dump-spec`: in a post-copy checkpoint, the loopback address its dump's page
    /// server must listen on (one per call) and the status descriptor's number.
    pub fn lazy_dump_spec(&mut self) -> Option<(std::net::SocketAddr, u32)> {
        if !self.call.as_ref()?.postcopy {
            return None;
        }
        let port = match self.dump_port {
            Some(port) => port,
            None => {
                let port = crate::criu::free_loopback_port().ok()?;
                self.dump_port = Some(port);
                port
            }
        };
        Some((std::net::SocketAddr::from(([127, 0, 0, 1], port)), 3))
    }

    /// `lazy.start-dump`: runs the runtime's lazy checkpoint and returns once it serves
    /// the frozen tree's pages; the migration engine takes it from there.
    pub async fn lazy_start_dump(&mut self, cmd: exec::Command) -> Result<u64, HostError> {
        self.check_program(&cmd)?;
        let images = self.images()?;
        let port = self
            .dump_port
            .filter(|_| self.call.as_ref().is_some_and(|c| c.postcopy));
        let Some(port) = port else {
            return Err(HostError::Invalid(
                "start-dump belongs to a post-copy checkpoint, after dump-spec".into(),
            ));
        };
        let output_path = images.join(crate::criu::layout::RUNTIME_DUMP_LOG);
        let output = std::fs::File::create(&output_path).map_err(|e| {
            HostError::Failed(format!("cannot create {}: {e}", output_path.display()))
        })?;
        let mut program = command(&cmd);
        // The program holds a frozen tree's pages: it must outlive this call.
        program.kill_on_drop(false);
        tracing::debug!(plugin = %self.plugin, program = %cmd.program, args = ?cmd.args, "adapter starts a lazy dump");
        let criu = self.criu.clone();
        let started = criu.start_runtime_lazy_dump(program, &images, port, output);
        let timeout = Duration::from_millis(u64::from(cmd.timeout_ms.max(1)));
        match tokio::time::timeout(timeout, started).await {
            Ok(Ok(took)) => Ok(took.as_millis() as u64),
            Ok(Err(e)) => Err(HostError::Failed(e.to_string())),
            Err(_) => Err(HostError::Failed(format!(
                "{} did not report its page server ready within {} ms",
                cmd.program, cmd.timeout_ms
            ))),
        }
    }

    /// `lazy.restore-work-dir`: in a post-copy restore, Ferry's daemon now waits in the
    /// image directory for the runtime's lazy restore; the directory is the answer.
    pub fn lazy_restore_work_dir(&mut self) -> Result<Option<PathBuf>, HostError> {
        let call = self.call()?;
        if call.page_server.is_none() {
            return Ok(None);
        }
        let images = self.images()?;
        self.criu
            .await_lazy_restore(&images)
            .map_err(|e| HostError::Failed(e.to_string()))?;
        Ok(Some(images))
    }

    /// `criu.dump`: the current workload's tree into the migration's image directory,
    /// left stopped. Returns the dump's duration in ms.
    /// `tunnel.open`: a local endpoint reaching `port` of the current workload at the
    /// migration's other site.
    pub async fn tunnel_open(&mut self, port: u16) -> Result<std::net::SocketAddr, HostError> {
        self.check(Capability::Tunnel)?;
        if !self.granted.allows_tunnel(port) {
            tracing::warn!(plugin = %self.plugin, port, "adapter denied a tunnel port");
            return Err(HostError::Denied(format!(
                "adapter {} may not open a tunnel to port {port}; its tunnel_ports grant is {:?} (add the port to [plugins.grants.{}] tunnel_ports in site.toml)",
                self.plugin, self.granted.tunnel_ports, self.plugin
            )));
        }
        let call = self.call()?;
        let (Some(peer), Some(migration)) = (call.peer.clone(), call.migration.clone()) else {
            return Err(HostError::Invalid(
                "a tunnel exists only during a migration".into(),
            ));
        };
        let workload = call.spec.name.clone();
        let tunnels = self
            .tunnels
            .clone()
            .ok_or_else(|| HostError::Failed("this gateway has no peer link".into()))?;
        tunnels
            .open(&peer, &migration, &workload, port)
            .await
            .map_err(HostError::Failed)
    }

    pub async fn criu_dump(&mut self) -> Result<u64, HostError> {
        self.check(Capability::Criu)?;
        // Owned copies: nothing of the call is borrowed while CRIU runs.
        let (pid, images, criu) = (self.pid()?, self.images()?, self.criu.clone());
        let postcopy = self.call()?.postcopy;
        let req = DumpRequest {
            pid,
            images: &images,
        };
        // Post-copy is the engine's choice, not the adapter's: the same call dumps lazily.
        let dumped = if postcopy {
            criu.dump_lazy(req).await
        } else {
            criu.dump(req).await
        };
        dumped
            .map(|took| took.as_millis() as u64)
            .map_err(|e| HostError::Failed(e.to_string()))
    }

    /// `criu.restore`: the migration's image here, its stdio re-pointed at this site's log.
    pub async fn criu_restore(&mut self) -> Result<i32, HostError> {
        self.check(Capability::Criu)?;
        let images = self.images()?;
        let call = self.call()?;
        let placement = call.placement.clone();
        let source_log = call
            .source_log
            .clone()
            .ok_or_else(|| HostError::Invalid("no source log path".into()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&placement.log)
            .map_err(|e| {
                HostError::Failed(format!("cannot open {}: {e}", placement.log.display()))
            })?;
        let criu = self.criu.clone();
        criu.restore(RestoreRequest {
            images: &images,
            lazy_from: call.page_server,
            inherit: vec![Inherit {
                fd: log.into(),
                source_path: source_log,
            }],
            cgroup: placement.cgroup.as_deref(),
        })
        .await
        .map(|r| r.pid)
        .map_err(|e| HostError::Failed(e.to_string()))
    }

    /// `process.spawn`: the current workload's command in the gateway's own process tree.
    pub async fn process_spawn(&mut self) -> Result<i32, HostError> {
        self.check(Capability::Process)?;
        let call = self.call()?;
        let (spec, placement) = (call.spec.clone(), call.placement.clone());
        let started = process::start(process::Launch {
            command: &spec.command,
            env: &spec.env,
            work_dir: &placement.work_dir,
            log: &placement.log,
            cgroup: placement.cgroup.as_deref(),
        })
        .await
        .map_err(|e| HostError::Failed(e.to_string()))?;
        let pid = started.pid;
        self.spawned = Some(started);
        Ok(pid)
    }

    /// `process.resume`: the current workload's stopped tree runs again.
    pub fn process_resume(&mut self) -> Result<(), HostError> {
        self.check(Capability::Process)?;
        let pid = self
            .live_pid()
            .ok_or_else(|| HostError::Failed("the workload's process is gone".into()))?;
        process::resume(pid);
        Ok(())
    }

    /// `process.kill`: the current workload's tree, if that very process still lives.
    pub fn process_kill(&mut self) -> Result<(), HostError> {
        self.check(Capability::Process)?;
        if let Some(pid) = self.live_pid() {
            process::kill(pid);
        }
        Ok(())
    }
}

fn command(cmd: &exec::Command) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(process::resolve(&cmd.program));
    c.args(&cmd.args)
        .env_clear()
        .env("PATH", WORKLOAD_PATH)
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        // Its own process group: what it starts can be found and ended with it.
        .process_group(0)
        .kill_on_drop(true);
    c
}

/// Records a program `exec.run` started, until the call is done with it.
fn record(
    inflight: Option<&super::inflight::Inflight>,
    child: &tokio::process::Child,
) -> Option<super::inflight::Record> {
    let pid = i32::try_from(child.id()?).ok()?;
    inflight?.record(pid)
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or(status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Runs a program whose stdout/stderr (and those of what it leaves running) flow through a
/// pipe into the workload's log; waits for the program only, not for the pipe to close.
async fn run_into_log(
    plugin: &str,
    cmd: exec::Command,
    log: &std::path::Path,
    inflight: Option<&super::inflight::Inflight>,
) -> Result<exec::Output, String> {
    let (reader, writer) = std::io::pipe().map_err(|e| format!("cannot create a pipe: {e}"))?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let writer2 = writer
        .try_clone()
        .map_err(|e| format!("cannot duplicate a pipe: {e}"))?;
    let mut c = command(&cmd);
    c.stdout(Stdio::from(writer)).stderr(Stdio::from(writer2));
    tracing::debug!(plugin, program = %cmd.program, args = ?cmd.args, log = %log.display(), "adapter runs a program into the workload log");
    let mut child = c
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", cmd.program))?;
    let _recorded = record(inflight, &child);
    // Our copies of the write end went into the child; the drain ends when the last
    // holder (the workload) closes it. A plain thread: it may outlive any runtime task.
    let mut reader = reader;
    let drained = std::thread::Builder::new()
        .name("ferry-log-drain".into())
        .spawn(move || {
            let _ = std::io::copy(&mut reader, &mut file);
        });
    if let Err(e) = drained {
        return Err(format!("cannot start the log drain: {e}"));
    }
    let timeout = Duration::from_millis(u64::from(cmd.timeout_ms.max(1)));
    let status = tokio::time::timeout(timeout, child.wait())
        .await
        .map_err(|_| {
            format!(
                "{} did not finish within {} ms",
                cmd.program, cmd.timeout_ms
            )
        })?
        .map_err(|e| format!("waiting for {}: {e}", cmd.program))?;
    let code = exit_code(status);
    let stderr_tail = if code == 0 {
        String::new()
    } else {
        format!("{} failed; its output is in {}", cmd.program, log.display())
    };
    Ok(exec::Output {
        status: code,
        stdout: String::new(),
        stderr_tail,
    })
}

async fn run_program(
    plugin: &str,
    cmd: exec::Command,
    inflight: Option<&super::inflight::Inflight>,
) -> Result<exec::Output, String> {
    let mut c = command(&cmd);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    tracing::debug!(plugin, program = %cmd.program, args = ?cmd.args, "adapter runs a program");
    let mut child = c
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", cmd.program))?;
    let _recorded = record(inflight, &child);
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    // Both pipes are drained at once to their end (a program filling one while the other
    // is read would block), keeping a bounded part of each.
    let collect = async {
        let (out, err) = tokio::join!(
            read_bounded(stdout, MAX_STDOUT, false),
            read_bounded(stderr, STDERR_TAIL, true)
        );
        let status = child.wait().await;
        (out, err, status)
    };
    let timeout = Duration::from_millis(u64::from(cmd.timeout_ms.max(1)));
    let (out, err, status) = tokio::time::timeout(timeout, collect).await.map_err(|_| {
        format!(
            "{} did not finish within {} ms",
            cmd.program, cmd.timeout_ms
        )
    })?;
    let code = exit_code(status.map_err(|e| format!("waiting for {}: {e}", cmd.program))?);
    Ok(exec::Output {
        status: code,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr_tail: String::from_utf8_lossy(&err).into_owned(),
    })
}

/// Reads `from` to its end, keeping at most `keep` bytes: the first ones, or the last
/// ones with `tail`.
async fn read_bounded(
    from: Option<impl tokio::io::AsyncRead + Unpin>,
    keep: usize,
    tail: bool,
) -> Vec<u8> {
    let Some(mut from) = from else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => n,
        };
        if tail {
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > keep {
                kept.drain(..kept.len() - keep);
            }
        } else if kept.len() < keep {
            let room = keep - kept.len();
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_program_filling_both_pipes_is_drained_with_bounded_output() {
        // A writer far past both bounds, on both pipes: nothing blocks, the head of one
        // and the tail of the other are kept.
        let (mut out_w, out_r) = tokio::io::duplex(4096);
        let (mut err_w, err_r) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for i in 0..200u32 {
                let line = format!("{i:08}\n").repeat(128);
                let _ = err_w.write_all(line.as_bytes()).await;
                let _ = out_w.write_all(line.as_bytes()).await;
            }
        });
        let (out, err) = tokio::join!(
            read_bounded(Some(out_r), 1000, false),
            read_bounded(Some(err_r), 18, true)
        );
        writer.await.expect("writer");
        assert_eq!(out.len(), 1000);
        assert!(out.starts_with(b"00000000\n"));
        assert_eq!(err, b"00000199\n00000199\n");
    }
}
