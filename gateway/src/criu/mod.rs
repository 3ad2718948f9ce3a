//! CRIU driver: checkpoint a process tree to an image directory and restore it, with the
//! options Ferry's workloads need. The only place that builds a `criu` command line;
//! [`layout`] holds what Ferry knows about CRIU's image directory.

pub mod image;
pub mod layout;
pub mod lazy;
pub mod pageproto;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::process::Command;

#[derive(Debug, Error)]
pub enum CriuError {
    #[error("cannot start criu ({bin}): {source}; run scripts/setup to install CRIU >= 4.2")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("criu {action} failed (exit {code:?}): {tail}")]
    Failed {
        action: &'static str,
        code: Option<i32>,
        /// The last error lines of CRIU's log, which name the cause.
        tail: String,
    },
    #[error("criu restore did not report the restored pid: {0}")]
    NoPid(String),
}

/// Files at the source that the restored tree must get from the destination instead,
/// keyed as CRIU names them (`--inherit-fd fd[N]:KEY`).
pub struct Inherit {
    pub fd: OwnedFd,
    /// Path of the file at checkpoint time.
    pub source_path: PathBuf,
}

pub struct DumpRequest<'a> {
    pub pid: i32,
    pub images: &'a Path,
}

pub struct RestoreRequest<'a> {
    pub images: &'a Path,
    /// Post-copy: pages missing from the images are fetched from this page server (a
    /// `criu lazy-pages` daemon is started for them before the restore).
    pub lazy_from: Option<std::net::SocketAddr>,
    pub inherit: Vec<Inherit>,
    /// cgroup (v2) directory the restored tree is placed in: criu joins it before
    /// forking, so every restored task starts inside it.
    pub cgroup: Option<&'a Path>,
}

#[derive(Debug, Clone)]
pub struct Restored {
    /// Host pid of the restored tree's root.
    pub pid: i32,
    pub took: Duration,
}

#[derive(Debug, Clone)]
pub struct Criu {
    bin: PathBuf,
    /// Ferry's own lazy-pages daemon (in the gateway; this executable runs its guard,
    /// `ferry lazy-guard`), or `None` for `criu lazy-pages`.
    lazy_daemon: Option<PathBuf>,
    /// Where Ferry's daemon gets the pages of a lazy restore, by image directory.
    supplies: std::sync::Arc<Supplies>,
    /// CRIU processes that outlive the call that started them (post-copy: a lazy dump
    /// serving the frozen source's pages, a lazy-pages daemon fetching them), by image
    /// directory, until the migration engine takes them.
    running: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<PathBuf, Running>>>,
    /// How much of Ferry's CRIU patch (which `scripts/setup` applies) this CRIU carries.
    /// With it, a lazy dump leaves its pages in the frozen tasks (`--lazy-pages-in-tasks`)
    /// rather than splicing each into a pipe while the tree is frozen: Ferry's page
    /// source reads them in the tasks.
    patch: FerryPatch,
}

/// The option of Ferry's CRIU patch (`scripts/criu-lazy-pages-in-tasks.patch`).
const LAZY_PAGES_IN_TASKS: &str = "--lazy-pages-in-tasks";
/// What the `--help` of a CRIU with the patch's second change (the stack pointers' pages)
/// says.
const STACK_FIX: &str = "Ferry's patch 2";

/// How much of Ferry's CRIU patch (`scripts/criu-lazy-pages-in-tasks.patch`) a CRIU
/// executable carries, as its `--help` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FerryPatch {
    /// None: released CRIU.
    None,
    /// `--lazy-pages-in-tasks` only. Its lazy dumps leave no page lazy whenever a thread's
    /// stack pointer is page-aligned (about 1 Redis start in 256): post-copy then copies
    /// every page in the freeze.
    LazyPagesInTasks,
    /// Both changes: also only the stack pointers' own pages are never lazy.
    Current,
}

/// Page supplies by image directory.
#[derive(Default)]
pub struct Supplies(
    std::sync::Mutex<std::collections::HashMap<PathBuf, std::sync::Arc<dyn lazy::Supply>>>,
);

impl std::fmt::Debug for Supplies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Supplies")
    }
}

/// A CRIU process serving or fetching pages after its call returned.
#[derive(Debug)]
pub struct Running {
    pub child: tokio::process::Child,
    /// The lazy dump's page server, on loopback.
    pub page_server: Option<std::net::SocketAddr>,
    /// Its log, to explain a failure.
    pub log: PathBuf,
    /// Ferry's lazy-pages daemon, when this is its guard.
    pub daemon: Option<lazy::Handle>,
}

/// Runs `criu lazy-pages` ($3…), records its exit code in $1, and on failure kills the
/// cgroup whose `cgroup.kill` is $2.
const LAZY_GUARD: &str = r#"exit_file=$1; kill_file=$2; shift 2
"$@"; rc=$?
echo "$rc" > "$exit_file"
[ "$rc" -eq 0 ] || echo 1 > "$kill_file"
exit "$rc""#;

/// Runs a restore ($2…): joins the cgroup whose `cgroup.procs` is $0 (if any), moves its
/// standard input to fd $1 (if any; `/dev/null` then), and execs the rest.
const RESTORE_TRAMPOLINE: &str = r#"[ -z "$0" ] || echo $$ > "$0" || exit 125
fd=$1; shift
if [ -n "$fd" ]; then exec 3<&0 0</dev/null; fi
exec "$@""#;

/// Options shared by dump and restore. Established TCP connections are closed rather than
/// moved: clients reconnect through the ingress, and a moved connection would need the
/// same address at the destination. The network is never locked with firewall rules, so a
/// checkpoint leaves no DROP chain behind.
const COMMON: &[&str] = &["--tcp-close", "--manage-cgroups=ignore", "--file-locks"];

impl Criu {
    /// The CRIU executable this site runs.
    pub fn bin(&self) -> &std::path::Path {
        &self.bin
    }

    pub fn new(bin: PathBuf) -> Self {
        Self {
            bin,
            lazy_daemon: None,
            supplies: std::sync::Arc::default(),
            running: std::sync::Arc::default(),
            patch: FerryPatch::None,
        }
    }

    /// Asks the CRIU executable (`--help`) whether it can leave a lazy dump's pages in
    /// the frozen tasks, and uses that in lazy dumps if so: the freeze then no longer
    /// grows with the memory spliced into page pipes.
    #[must_use]
    pub fn probe_lazy_pages_in_tasks(mut self) -> Self {
        self.patch = ferry_patch(&self.bin);
        self
    }

    /// Do lazy dumps here leave their pages in the frozen tasks?
    pub fn lazy_pages_in_tasks(&self) -> bool {
        self.patch >= FerryPatch::LazyPagesInTasks
    }

    /// How much of Ferry's CRIU patch this CRIU carries (as probed).
    pub fn patch(&self) -> FerryPatch {
        self.patch
    }

    /// The pages of the lazy restore from `images` come from `supply` (with Ferry's
    /// daemon; `criu lazy-pages` asks the restore's page server instead).
    pub fn supply_pages(&self, images: &Path, supply: std::sync::Arc<dyn lazy::Supply>) {
        self.supplies
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(images.to_path_buf(), supply);
    }

    /// A lazy restore from `images` failed: its daemon (or guard) is killed, its page
    /// supply dropped, and Ferry's daemon, if it still waits for the restore, woken (it
    /// then finds no hand-over and ends).
    pub fn abandon_lazy(&self, images: &Path) {
        if let Some(mut daemon) = self.take_running(images) {
            let _ = daemon.child.start_kill();
        }
        self.supplies
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(images);
        let _ = std::os::unix::net::UnixStream::connect(lazy::socket(images));
    }

    /// Does this site place lazy pages with Ferry's daemon?
    pub fn ferry_lazy_pages(&self) -> bool {
        self.lazy_daemon.is_some()
    }

    /// Post-copy restores fetch their pages with Ferry's daemon (`exe lazy-pages`).
    #[must_use]
    pub fn with_lazy_daemon(mut self, exe: PathBuf) -> Self {
        self.lazy_daemon = Some(exe);
        self
    }

    /// The CRIU process left running for the image directory `images`, if any.
    pub fn take_running(&self, images: &Path) -> Option<Running> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(images)
    }

    fn keep_running(&self, images: &Path, running: Running) {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(images.to_path_buf(), running);
    }

    /// Post-copy checkpoint: dumps everything but the lazy pages (private anonymous
    /// memory) and returns once CRIU serves those from the frozen tree on a loopback page
    /// server (with [`Self::lazy_pages_in_tasks`], it leaves them unspliced in the tree,
    /// and serves only the others: its client reads them there); that `criu dump` keeps
    /// running (see [`Self::take_running`]) until its one client has fetched every page,
    /// and then leaves the tree stopped, never killed.
    pub async fn dump_lazy(&self, req: DumpRequest<'_>) -> Result<Duration, CriuError> {
        let start = Instant::now();
        let port = free_loopback_port().map_err(|e| {
            CriuError::NoPid(format!("no free loopback port for the page server: {e}"))
        })?;
        let mut cmd = self.dump_command(&req);
        cmd.args(["--lazy-pages", "--address", "127.0.0.1", "--port"])
            .arg(port.to_string());
        // Ferry's page source, the dump's one client, reads them in the tree.
        if self.lazy_pages_in_tasks() {
            cmd.arg(LAZY_PAGES_IN_TASKS);
        }
        let log = req.images.join(layout::DUMP_LOG);
        let child = self.start_with_status(cmd, "dump", &log).await?;
        self.keep_running(
            req.images,
            Running {
                child,
                page_server: Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
                log,
                daemon: None,
            },
        );
        Ok(start.elapsed())
    }

    /// Post-copy through a runtime that runs CRIU itself (`runc checkpoint --lazy-pages`):
    /// starts `cmd`, which reports on fd 3 (CRIU's status fd, passed on) once everything
    /// but the lazy pages is in `images` and its page server on loopback `port` serves the
    /// frozen tree. It keeps running as the lazy dump of `images` (see
    /// [`Self::take_running`]); its output goes to `output`.
    pub async fn start_runtime_lazy_dump(
        &self,
        mut cmd: Command,
        images: &Path,
        port: u16,
        output: std::fs::File,
    ) -> Result<Duration, CriuError> {
        let start = Instant::now();
        let spawn_error = |source| CriuError::Spawn {
            bin: PathBuf::from(cmd_program(&cmd)),
            source,
        };
        let errors = output.try_clone().map_err(spawn_error)?;
        // Its own process group, so ending it ends the CRIU it started too.
        cmd.stdout(output).stderr(errors).process_group(0);
        let log = images.join(layout::DUMP_LOG);
        let child = self
            .spawn_until_ready(cmd, "dump", &[&images.join(layout::RUNTIME_DUMP_LOG), &log])
            .await?;
        self.keep_running(
            images,
            Running {
                child,
                page_server: Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
                log,
                daemon: None,
            },
        );
        Ok(start.elapsed())
    }

    /// Starts `cmd` with `--status-fd 3` and waits for CRIU's readiness byte; a CRIU that
    /// exits first failed, and its log says why. The child is not killed when dropped: it
    /// holds a frozen tree's pages.
    async fn start_with_status(
        &self,
        mut cmd: Command,
        action: &'static str,
        log: &Path,
    ) -> Result<tokio::process::Child, CriuError> {
        cmd.args(["--status-fd", "3"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        self.spawn_until_ready(cmd, action, &[log]).await
    }

    /// Starts `cmd` with the write end of a pipe at fd 3 and waits for one byte on it; a
    /// program that exits first failed, and its `logs` say why. The child is not killed
    /// when dropped.
    async fn spawn_until_ready(
        &self,
        mut cmd: Command,
        action: &'static str,
        logs: &[&Path],
    ) -> Result<tokio::process::Child, CriuError> {
        let program = PathBuf::from(cmd_program(&cmd));
        let spawn_error = |source| CriuError::Spawn {
            bin: program.clone(),
            source,
        };
        let (reader, writer) = std::io::pipe().map_err(spawn_error)?;
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(false);
        crate::sys::exec::place_fds_in_cgroup(&mut cmd, vec![(writer.as_raw_fd(), 3)], None)
            .map_err(spawn_error)?;
        tracing::debug!(?cmd, "starting a program that reports readiness");
        let mut child = cmd.spawn().map_err(spawn_error)?;
        drop(writer);
        // Until it is ready, a caller giving up (a call deadline) ends it: nothing else
        // would, and it may hold a frozen tree.
        let mut unready = EndUnlessReady(child.id().and_then(|p| i32::try_from(p).ok()));
        let ready = tokio::task::spawn_blocking(move || {
            let mut byte = [0u8; 1];
            std::io::Read::read(&mut &reader, &mut byte).map(|n| n == 1)
        })
        .await
        .unwrap_or(Ok(false))
        .unwrap_or(false);
        // Ready, or its end of the pipe closed: either way the wait is over.
        unready.0 = None;
        if ready {
            return Ok(child);
        }
        let status = child.wait().await.ok();
        let log_text: String = logs
            .iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        Err(CriuError::Failed {
            action,
            code: status.and_then(|s| s.code()),
            tail: error_tail(&log_text),
        })
    }

    /// `criu dump` of the tree rooted at `req.pid` into `req.images`, leaving it stopped
    /// (never killed), without firewall rules. A connection not yet accepted (a client
    /// reaching the workload's port directly, not through the ingress, as the tree froze)
    /// is left out rather than failing the checkpoint: its client sees it reset.
    fn dump_command(&self, req: &DumpRequest<'_>) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("dump")
            .arg("-t")
            .arg(req.pid.to_string())
            .arg("-D")
            .arg(req.images)
            .args([
                "-o",
                layout::DUMP_LOG,
                "--leave-stopped",
                "--network-lock",
                "skip",
                "--skip-in-flight",
            ])
            .args(COMMON);
        cmd
    }

    /// Checkpoints the tree rooted at `pid` and leaves it stopped (not killed), so the
    /// source can be resumed if the migration fails.
    pub async fn dump(&self, req: DumpRequest<'_>) -> Result<Duration, CriuError> {
        let start = Instant::now();
        let cmd = self.dump_command(&req);
        self.run(cmd, "dump", &req.images.join(layout::DUMP_LOG))
            .await?;
        Ok(start.elapsed())
    }

    /// Restores the tree detached from criu; it is re-parented to the gateway (a child
    /// subreaper), which reaps it.
    pub async fn restore(&self, req: RestoreRequest<'_>) -> Result<Restored, CriuError> {
        let start = Instant::now();
        let pidfile = req.images.join(layout::RESTORE_PIDFILE);
        let _ = std::fs::remove_file(&pidfile);
        let supply = req.lazy_from.and_then(|_| {
            self.supplies
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(req.images)
        });
        if let (Some(supply), Some(exe)) = (supply, &self.lazy_daemon) {
            self.serve_lazy(req.images, supply, exe, req.cgroup)?;
        } else if let Some(server) = req.lazy_from {
            // The daemon that fetches pages for the restored tree's page faults; it must
            // listen on its socket in the image directory before the restore connects.
            // A guard (a shell, not the gateway) waits for it and writes its exit code;
            // if it failed (its page server, the gateway, went away before the tree had
            // every page) the guard kills the restored tree's cgroup: pages that never
            // came would read as zeros (CRIU's daemon lets go of the userfaultfds as it
            // exits, a moment before: Ferry's own daemon, above, does not).
            let mut daemon = match req.cgroup {
                Some(cgroup) => {
                    let mut sh = Command::new("/bin/sh");
                    sh.arg("-c")
                        .arg(LAZY_GUARD)
                        .arg("ferry-lazy-guard")
                        .arg(req.images.join(layout::LAZY_PAGES_EXIT))
                        .arg(cgroup.join("cgroup.kill"));
                    sh
                }
                None => Command::new("/usr/bin/env"),
            };
            daemon
                .arg(&self.bin)
                .arg("lazy-pages")
                .arg("--page-server")
                .arg("--address")
                .arg(server.ip().to_string())
                .arg("--port")
                .arg(server.port().to_string())
                .arg("-D")
                .arg(req.images)
                .args(["-o", layout::LAZY_PAGES_LOG]);
            let log = req.images.join(layout::LAZY_PAGES_LOG);
            let child = self.start_with_status(daemon, "lazy-pages", &log).await?;
            self.keep_running(
                req.images,
                Running {
                    child,
                    page_server: None,
                    log,
                    daemon: None,
                },
            );
        }
        // The restore's process joins the tree's cgroup and gets its inherited file at
        // fd 3 through a shell trampoline (spawned without forking the gateway, whose
        // memory may be large: post-copy's page cache), or, with more than one inherited
        // file, in a pre-exec hook (a fork).
        let trampoline = req.inherit.len() <= 1;
        let mut cmd = if trampoline {
            let mut sh = Command::new("/bin/sh");
            sh.arg("-c")
                .arg(RESTORE_TRAMPOLINE)
                .arg(
                    req.cgroup
                        .map(|c| c.join("cgroup.procs"))
                        .unwrap_or_default(),
                )
                .arg(if req.inherit.is_empty() { "" } else { "3" })
                .arg(&self.bin);
            sh
        } else {
            Command::new(&self.bin)
        };
        cmd.arg("restore")
            .arg("-D")
            .arg(req.images)
            .args(["-o", layout::RESTORE_LOG, "--restore-detached", "--pidfile"])
            .arg(&pidfile)
            .args(COMMON);
        if req.lazy_from.is_some() {
            cmd.arg("--lazy-pages");
        }
        // Inherited files go to fds 3.. in the criu process.
        let mut moves: Vec<(i32, i32)> = Vec::new();
        for (i, inh) in req.inherit.iter().enumerate() {
            let target = 3 + i as i32;
            let key = inh.source_path.to_string_lossy();
            cmd.arg("--inherit-fd")
                .arg(format!("fd[{target}]:{}", key.trim_start_matches('/')));
            moves.push((inh.fd.as_raw_fd(), target));
        }
        let stdin =
            if trampoline {
                match req.inherit.first() {
                    Some(inh) => Some(inh.fd.try_clone().map_err(|e| {
                        CriuError::NoPid(format!("cannot prepare the restore: {e}"))
                    })?),
                    None => None,
                }
            } else {
                crate::sys::exec::place_fds_in_cgroup(&mut cmd, moves, req.cgroup)
                    .map_err(|e| CriuError::NoPid(format!("cannot prepare the restore: {e}")))?;
                None
            };
        self.run_with(cmd, "restore", &req.images.join(layout::RESTORE_LOG), stdin)
            .await?;
        drop(req.inherit);
        let text = tokio::fs::read_to_string(&pidfile)
            .await
            .map_err(|e| CriuError::NoPid(e.to_string()))?;
        let pid = text
            .trim()
            .parse()
            .map_err(|_| CriuError::NoPid(format!("pidfile holds {text:?}")))?;
        Ok(Restored {
            pid,
            took: start.elapsed(),
        })
    }

    /// Starts Ferry's lazy-pages daemon (in this process) for a restore from `images`,
    /// listening on its socket there, with its guard; kept as that directory's running
    /// CRIU helper. On failure the restored tree's cgroup (`cgroup`, or one named later
    /// with [`Self::kill_lazy_through`]) is killed.
    fn serve_lazy(
        &self,
        images: &Path,
        supply: std::sync::Arc<dyn lazy::Supply>,
        exe: &Path,
        cgroup: Option<&Path>,
    ) -> Result<(), CriuError> {
        let (ours, theirs) = crate::sys::uffd::message_pair()
            .map_err(|e| CriuError::NoPid(format!("cannot set up the lazy-pages guard: {e}")))?;
        let mut guard = Command::new(exe);
        guard
            .arg("lazy-guard")
            .arg("--exit-file")
            .arg(images.join(layout::LAZY_PAGES_EXIT));
        let kill = cgroup.map(|c| c.join("cgroup.kill"));
        if let Some(kill) = &kill {
            guard.arg("--kill").arg(kill);
        }
        guard
            .stdin(std::process::Stdio::from(theirs))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(false);
        let child = guard.spawn().map_err(|source| CriuError::Spawn {
            bin: exe.to_path_buf(),
            source,
        })?;
        let daemon = lazy::start(images, supply, ours, kill)
            .map_err(|e| CriuError::NoPid(format!("cannot start the lazy-pages daemon: {e}")))?;
        self.keep_running(
            images,
            Running {
                child,
                page_server: None,
                log: images.join(layout::LAZY_PAGES_LOG),
                daemon: Some(daemon),
            },
        );
        Ok(())
    }

    /// Post-copy through a runtime that runs CRIU itself: Ferry's daemon waits for the
    /// runtime's `criu restore --lazy-pages` whose work directory is `images` (where its
    /// socket is), with the pages supplied for `images`.
    pub fn await_lazy_restore(&self, images: &Path) -> Result<(), CriuError> {
        let waiting = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(images)
            .is_some_and(|r| r.daemon.is_some());
        if waiting {
            return Ok(());
        }
        let supply = self
            .supplies
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(images)
            .ok_or_else(|| CriuError::NoPid("this restore has no page supply".into()))?;
        let exe = self.lazy_daemon.as_deref().ok_or_else(|| {
            CriuError::NoPid(
                "a runtime's lazy restore needs Ferry's lazy-pages daemon, which this site does not run ([migration] lazy_pages = \"criu\"); set lazy_pages = \"ferry\" there".into(),
            )
        })?;
        self.serve_lazy(images, supply, exe, None)
    }

    /// The lazy restore from `images` ran: its tree, rooted at `pid`, is killed through
    /// its cgroup if its pages stop coming (a runtime's restore chose that cgroup).
    pub fn kill_lazy_through(&self, images: &Path, pid: i32) {
        let daemon = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(images)
            .and_then(|r| r.daemon.clone());
        let (Some(daemon), Some(cgroup)) = (daemon, crate::sys::process::cgroup_of(pid)) else {
            return;
        };
        if let Err(e) = daemon.kill_through(&cgroup.join("cgroup.kill")) {
            tracing::warn!(pid, cgroup = %cgroup.display(), error = %e, "cannot arm the lazy restore's kill switch");
        }
    }

    async fn run(&self, cmd: Command, action: &'static str, log: &Path) -> Result<(), CriuError> {
        self.run_with(cmd, action, log, None).await
    }

    /// [`Self::run`], with `stdin` as the command's standard input (else none).
    async fn run_with(
        &self,
        mut cmd: Command,
        action: &'static str,
        log: &Path,
        stdin: Option<std::os::fd::OwnedFd>,
    ) -> Result<(), CriuError> {
        cmd.stdin(stdin.map_or_else(std::process::Stdio::null, std::process::Stdio::from))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        tracing::debug!(?cmd, "running criu");
        let out = cmd.output().await.map_err(|source| CriuError::Spawn {
            bin: self.bin.clone(),
            source,
        })?;
        if out.status.success() {
            return Ok(());
        }
        let log_text = std::fs::read_to_string(log).unwrap_or_default();
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(CriuError::Failed {
            action,
            code: out.status.code(),
            tail: error_tail(&format!("{stderr}\n{log_text}")),
        })
    }
}

/// Kills a started program (and its process group) when dropped while it still holds
/// a pid: see [`Criu::spawn_until_ready`].
struct EndUnlessReady(Option<i32>);

impl Drop for EndUnlessReady {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            crate::sys::process::kill_group_now(pid);
        }
    }
}

/// The program a command runs, for messages.
fn cmd_program(cmd: &Command) -> String {
    cmd.as_std().get_program().to_string_lossy().into_owned()
}

/// CRIU dumps of the tree rooted at `pid` still running (a gateway killed mid-dump does
/// not take its `criu dump` with it), and whether each is a lazy one (which, its dump
/// done, waits for a page client for ever).
pub fn dumps_of(pid: i32) -> Vec<(i32, bool)> {
    let target = pid.to_string();
    crate::sys::process::with_cmdline(|args| {
        args.first()
            .is_some_and(|a| a.rsplit('/').next() == Some("criu"))
            && args.iter().any(|a| a == "dump")
            && args.windows(2).any(|w| w[0] == "-t" && w[1] == target)
    })
    .into_iter()
    .map(|(p, args)| (p, args.iter().any(|a| a == "--lazy-pages")))
    .collect()
}

/// How much of Ferry's patch the CRIU executable `bin` carries (its `--help` names
/// `--lazy-pages-in-tasks`, and the second change); `None` if it does not run.
pub fn ferry_patch(bin: &Path) -> FerryPatch {
    let Ok(out) = std::process::Command::new(bin)
        .arg("--help")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
    else {
        return FerryPatch::None;
    };
    let help = String::from_utf8_lossy(&out.stdout);
    match (help.contains(LAZY_PAGES_IN_TASKS), help.contains(STACK_FIX)) {
        (false, _) => FerryPatch::None,
        (true, false) => FerryPatch::LazyPagesInTasks,
        (true, true) => FerryPatch::Current,
    }
}

/// Pipe size a lazy dump asks for (CRIU's PIPE_MAX_SIZE pages, rounded up by the kernel).
const LAZY_PIPE_BYTES: u64 = 4 << 20;

/// Can this host serve a lazy (post-copy) dump? CRIU's page pipes need
/// `fs.pipe-max-size` of at least 4 MiB, and root here lacks CAP_SYS_RESOURCE to exceed it.
pub fn lazy_dump_ready() -> Result<(), String> {
    let text = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .map_err(|e| format!("cannot read fs.pipe-max-size: {e}"))?;
    let size: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("fs.pipe-max-size reads {text:?}"))?;
    if size >= LAZY_PIPE_BYTES {
        Ok(())
    } else {
        Err(format!(
            "post-copy needs fs.pipe-max-size >= {LAZY_PIPE_BYTES} (it is {size}); run `sysctl -w fs.pipe-max-size={LAZY_PIPE_BYTES}` (scripts/setup does)"
        ))
    }
}

/// A loopback port nothing listens on now (CRIU's page server needs one named in advance).
pub fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The lines of a CRIU log that explain a failure: its `Error` lines (without the harmless
/// RLIMIT_NOFILE complaint every run makes), else its last lines.
pub fn error_tail(log: &str) -> String {
    let noise = |l: &&str| l.contains("RLIMIT_NOFILE") || l.trim().is_empty();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error"))
        .filter(|l| !noise(l))
        .collect();
    let chosen: Vec<&str> = if errors.is_empty() {
        let all: Vec<&str> = log.lines().filter(|l| !noise(l)).collect();
        all[all.len().saturating_sub(5)..].to_vec()
    } else {
        errors[errors.len().saturating_sub(5)..].to_vec()
    };
    let text = chosen
        .iter()
        .map(|l| l.trim())
        .collect::<Vec<_>>()
        .join(" | ");
    if text.is_empty() {
        "criu printed nothing".to_string()
    } else {
        text.chars().take(2000).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_criu_whose_help_names_the_option_leaves_lazy_pages_in_tasks() {
        let dir = std::env::temp_dir().join(format!("ferry-criu-help-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Each fake is written by a shell of its own, not by this process: a file this
        // process held open for writing could be inherited by a child another test
        // thread forks at that moment, and running it would then fail with "Text file
        // busy".
        let fake = |name: &str, help: &str| {
            let path = dir.join(name);
            let script = format!("#!/bin/sh\nprintf '%s\\n' '{help}'\n");
            let written = std::process::Command::new("sh")
                .args([
                    "-c",
                    "printf '%s' \"$1\" > \"$2\" && chmod 755 \"$2\"",
                    "sh",
                ])
                .arg(&script)
                .arg(&path)
                .status()
                .unwrap();
            assert!(written.success());
            path
        };
        let patched = fake(
            "patched",
            // (the quote closed, escaped and opened again: the fake prints it in quotes)
            "  --lazy-pages-in-tasks dump: leave lazy pages (Ferry'\\''s patch 2: only",
        );
        let first = fake("first", "  --lazy-pages-in-tasks dump: leave lazy pages");
        let released = fake(
            "released",
            "  --lazy-pages          restore pages on demand",
        );
        let probed = Criu::new(patched).probe_lazy_pages_in_tasks();
        assert!(probed.lazy_pages_in_tasks());
        assert_eq!(probed.patch(), FerryPatch::Current);
        let probed = Criu::new(first).probe_lazy_pages_in_tasks();
        assert!(probed.lazy_pages_in_tasks());
        assert_eq!(probed.patch(), FerryPatch::LazyPagesInTasks);
        assert!(!Criu::new(released)
            .probe_lazy_pages_in_tasks()
            .lazy_pages_in_tasks());
        assert!(!Criu::new(dir.join("missing"))
            .probe_lazy_pages_in_tasks()
            .lazy_pages_in_tasks());
        assert!(
            !Criu::new(dir.join("missing")).lazy_pages_in_tasks(),
            "not probed"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_program_given_up_on_before_it_is_ready_is_ended_with_its_group() {
        let pidfile = std::env::temp_dir().join(format!("ferry-unready-{}", std::process::id()));
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("echo $$ > \"$0\"; exec sleep 30")
            .arg(&pidfile)
            .process_group(0);
        let criu = Criu::new(PathBuf::from("criu"));
        let started = criu.spawn_until_ready(cmd, "dump", &[]);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), started)
                .await
                .is_err(),
            "it never reports ready"
        );
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pidfile")
            .trim()
            .parse()
            .expect("pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        while crate::sys::process::start_time(pid).is_some() {
            assert!(
                Instant::now() < deadline,
                "the abandoned program still runs"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_file(&pidfile);
    }

    #[test]
    fn error_tail_keeps_errors_and_drops_rlimit_noise() {
        let log = "(00.0) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self\n\
                   (00.1) info\n\
                   (00.2) Error (criu/sk-inet.c:1): Can't bind inet socket: Address already in use\n";
        let tail = error_tail(log);
        assert!(tail.contains("Address already in use"), "{tail}");
        assert!(!tail.contains("RLIMIT"), "{tail}");
    }

    #[test]
    fn error_tail_falls_back_to_the_last_lines() {
        assert_eq!(error_tail("a\nb\n"), "a | b");
        assert_eq!(error_tail(""), "criu printed nothing");
    }
}
