//! Process-tree mechanics: start a command in its own PID namespace as session leader
//! inside a cgroup, find and signal its tree, wait for its end, and probe ports.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};

use thiserror::Error;

/// Starting a process tree failed.
#[derive(Debug, Error)]
pub enum SpawnError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the workload exited at once; see its log {log}")]
    ExitedEarly { log: PathBuf },
}

/// PATH given to every workload: the same on every site, whatever the gateway's own.
pub const WORKLOAD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `program` as a path: found in [`WORKLOAD_PATH`] when it is a bare name (as the child's
/// own PATH lookup would), else as given. Spawning an absolute path lets the standard
/// library use `posix_spawn` instead of forking the whole gateway (a fork copies its page
/// tables: milliseconds for a gateway with compiled adapters mapped, on every `exec`).
pub fn resolve(program: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return program.into();
    }
    WORKLOAD_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| program.into())
}

pub struct Started {
    /// `unshare`, the holder process that waits for the namespace's init; reaped by tokio.
    pub holder: Child,
    /// Host pid of the namespace's init: the workload's command itself.
    pub pid: i32,
}

pub struct Launch<'a> {
    pub command: &'a [String],
    pub env: &'a std::collections::BTreeMap<String, String>,
    pub work_dir: &'a Path,
    pub log: &'a Path,
    pub cgroup: Option<&'a Path>,
}

/// Starts `command` as PID 1 of a new PID namespace and leader of its own session, with
/// stdin from /dev/null and stdout/stderr appended to `log`. This is the shape CRIU can
/// dump and restore on another site without help from its parent.
pub async fn start(l: Launch<'_>) -> Result<Started, SpawnError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(l.log)
        .map_err(|source| SpawnError::Io {
            what: "open the workload log",
            path: l.log.to_path_buf(),
            source,
        })?;
    let log2 = log.try_clone().map_err(|source| SpawnError::Io {
        what: "duplicate the workload log",
        path: l.log.to_path_buf(),
        source,
    })?;
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--", "setsid"])
        .args(l.command)
        .env_clear()
        .env("PATH", WORKLOAD_PATH)
        .envs(l.env)
        .current_dir(l.work_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(false);
    // The holder leads a new session, so its forked child is not a group leader and
    // `setsid` makes the namespace init the leader of a session of its own.
    super::exec::new_session_in_cgroup(&mut cmd, l.cgroup).map_err(|source| SpawnError::Io {
        what: "use the cgroup",
        path: l.cgroup.map(Path::to_path_buf).unwrap_or_default(),
        source,
    })?;
    let holder = cmd.spawn().map_err(|source| SpawnError::Io {
        what: "start unshare (util-linux)",
        path: PathBuf::from("unshare"),
        source,
    })?;
    let holder_pid = holder.id().ok_or(SpawnError::ExitedEarly {
        log: l.log.to_path_buf(),
    })? as i32;
    let pid = find_child(holder_pid)
        .await
        .ok_or(SpawnError::ExitedEarly {
            log: l.log.to_path_buf(),
        })?;
    Ok(Started { holder, pid })
}

/// The holder's forked child (the namespace init), once it exists.
async fn find_child(holder: i32) -> Option<i32> {
    let path = format!("/proc/{holder}/task/{holder}/children");
    for _ in 0..200 {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
                    return Some(pid);
                }
            }
            Err(_) => return None,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat): with
/// the pid it identifies a process across pid reuse.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Is this exact process (pid + start time) still alive and not a zombie?
pub fn alive(pid: i32, started: u64) -> bool {
    start_time(pid) == Some(started)
}

/// Process state letter from /proc (R, S, T for stopped, …).
pub fn state(pid: i32) -> Option<char> {
    stat_state(&format!("/proc/{pid}/stat"))
}

/// The state letter of a `stat` file.
fn stat_state(path: &str) -> Option<char> {
    let stat = std::fs::read_to_string(path).ok()?;
    stat.get(stat.rfind(')')? + 2..)?.chars().next()
}

/// The thread ids of `pid` (none if it cannot be read).
pub fn threads(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Every thread of `pid` is stopped (by a tracer, `t`, or a stop signal, `T`); false if
/// it cannot be read.
pub fn threads_stopped(pid: i32) -> bool {
    let tids = threads(pid);
    !tids.is_empty()
        && tids.iter().all(|tid| {
            matches!(
                stat_state(&format!("/proc/{pid}/task/{tid}/stat")),
                Some('t' | 'T')
            )
        })
}

fn pid_ns(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// Every host pid in the PID namespace whose init is `init`.
pub fn tree(init: i32) -> Vec<i32> {
    let Some(ns) = pid_ns(init) else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![init];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| pid_ns(*pid).as_ref() == Some(&ns))
        .collect()
}

/// The processes whose command line (`/proc/PID/cmdline`, split at NULs) `matches`, with
/// that command line.
pub fn with_cmdline(matches: impl Fn(&[String]) -> bool) -> Vec<(i32, Vec<String>)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            matches(&args).then_some((pid, args))
        })
        .collect()
}

/// Kills every process of the cgroup (v2) `dir` at once (`cgroup.kill`); false if it
/// has no such file (gone, or not a cgroup v2 directory).
pub fn kill_cgroup(dir: &Path) -> bool {
    std::fs::write(dir.join("cgroup.kill"), "1").is_ok()
}

/// The cgroup (v2) directory `pid` is in.
pub fn cgroup_of(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    cgroup2_dir(&text)
}

/// The v2 directory named by a `/proc/PID/cgroup` text (its `0::PATH` line).
fn cgroup2_dir(text: &str) -> Option<PathBuf> {
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(cgroup2_mount()?.join(path.trim_start_matches('/')))
}

/// Is `pid` held by a cgroup freezer (a paused container: `runc pause`)? Its state then
/// reads `D` or `S`, yet it runs no instruction until the cgroup is thawed.
pub fn frozen_by_cgroup(pid: i32) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    // cgroup v1: the freezer hierarchy's state.
    let v1 = text.lines().find_map(|line| {
        let (_, rest) = line.split_once(':')?;
        let (controllers, path) = rest.split_once(':')?;
        controllers
            .split(',')
            .any(|c| c == "freezer")
            .then(|| Path::new("/sys/fs/cgroup/freezer").join(path.trim_start_matches('/')))
    });
    if v1
        .and_then(|dir| std::fs::read_to_string(dir.join("freezer.state")).ok())
        .is_some_and(|s| s.trim() == "FROZEN")
    {
        return true;
    }
    // cgroup v2: the directory's events.
    cgroup2_dir(&text)
        .and_then(|dir| std::fs::read_to_string(dir.join("cgroup.events")).ok())
        .is_some_and(|e| e.lines().any(|l| l.trim() == "frozen 1"))
}

/// Is any process of the process group `pgid` still there?
pub fn group_alive(pgid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks; a negative pid names the group.
    pgid > 0 && unsafe { libc::kill(-pgid, 0) } == 0
}

/// The processes of `init`'s tree: every process of its PID namespace when it has one of
/// its own, else the process alone.
pub fn tree_pids(init: i32) -> Vec<i32> {
    let own_ns = pid_ns(std::process::id() as i32);
    if pid_ns(init).is_some() && pid_ns(init) != own_ns {
        tree(init)
    } else {
        vec![init]
    }
}

/// Resident memory of `init`'s tree in bytes: every process of its PID namespace when it
/// has one of its own, else the process alone.
pub fn tree_rss_bytes(init: i32) -> Option<u64> {
    let pids = tree_pids(init);
    let rss = |pid: i32| -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    let total: u64 = pids.into_iter().filter_map(rss).sum();
    (total > 0).then_some(total)
}

/// Resumes a tree CRIU left stopped.
pub fn resume(init: i32) -> usize {
    let pids = tree(init);
    for pid in &pids {
        // SAFETY: kill(2) with a valid signal.
        unsafe { libc::kill(*pid, libc::SIGCONT) };
    }
    pids.len()
}

/// Sends `signal` to one process (best effort: a process that is gone is not an error).
pub fn signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) takes any pid and signal number; a bad one is an error return.
    unsafe { libc::kill(pid, signal) };
}

/// Does this process run with root's effective uid?
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Kills the whole tree: SIGKILL to a namespace's init takes every process in it along.
pub fn kill(init: i32) {
    // SAFETY: kill(2) with a valid signal.
    unsafe { libc::kill(init, libc::SIGKILL) };
}

/// Kills `pid` and, if it leads a process group, the whole group (a runtime's lazy dump:
/// `runc` and the CRIU it started, which would otherwise hold the frozen tree on), then
/// waits (up to a second) until the group's processes that are this gateway's children
/// have exited, and reaps them: a CRIU whose parent died is re-parented to the gateway.
pub async fn kill_with_group(pid: i32) {
    if pid <= 0 {
        return;
    }
    kill_group_now(pid);
    for _ in 0..50 {
        let mut status = 0;
        // SAFETY: waitpid on a process group, non-blocking.
        match unsafe { libc::waitpid(-pid, &mut status, libc::WNOHANG) } {
            // None of our children is in the group (any more).
            -1 => return,
            // Some are, still running.
            0 => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            // One reaped; look again at once.
            _ => {}
        }
    }
}

/// SIGKILL to `pid` and, if it leads one, its process group; neither waits nor reaps.
pub fn kill_group_now(pid: i32) {
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) with a valid signal; a negative pid names a process group, and
    // one this pid does not lead is an error return.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    kill(pid);
}

/// Waits until `pid` has exited, then reaps it if it is our child (a restored tree is
/// re-parented to the gateway). Returns the exit code when we reaped it.
pub async fn wait_exit(pid: i32) -> Option<i32> {
    // SAFETY: pidfd_open returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return reap(pid);
    }
    // SAFETY: fd is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the OwnedFd stays open and unchanged for the AsyncFd's whole life.
    if let Ok(async_fd) =
        unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
    {
        let _ = async_fd.readable().await;
    }
    reap(pid)
}

fn reap(pid: i32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waitpid on a specific pid, non-blocking.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r == pid {
        if libc::WIFEXITED(status) {
            Some(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            Some(128 + libc::WTERMSIG(status))
        } else {
            None
        }
    } else {
        None
    }
}

/// Lowers the calling thread's scheduling priority to `nice` (Linux applies nice values
/// per thread): it then gets the CPU mostly when nothing of normal priority wants it.
pub fn nice_this_thread(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid has no arguments; setpriority with integer arguments.
    let r = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, u32::try_from(tid).unwrap_or(0), nice)
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Makes the gateway the reaper of orphans in its subtree, so restored trees (whose
/// parent, criu, exits) become its children.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Marks every descriptor from 3 up close-on-exec: what the gateway inherited from whoever
/// started it (a shell's spare descriptors) must not reach the workloads it starts, where
/// CRIU would have to dump them (and cannot, when they were opened in another mount
/// namespace). Descriptors the gateway opens later are unaffected.
pub fn close_inherited_on_exec() -> std::io::Result<()> {
    // SAFETY: close_range with integer arguments only changes descriptor flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The cgroup v2 mount point, if any (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// Bytes free for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a zeroed statvfs filled by the call; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Can `port` be bound on this site right now?
pub fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub async fn wait_port(port: u16, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await;
        if matches!(attempt, Ok(Ok(_))) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Raises this process's open-file limit to its hard limit (each held or forwarded client
/// takes descriptors); returns the limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit fill or read one valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_identifies_this_process() {
        let me = std::process::id() as i32;
        let t = start_time(me).expect("own stat");
        assert!(alive(me, t));
        assert!(!alive(me, t + 1));
    }

    #[test]
    fn bare_names_resolve_in_the_workload_path_and_paths_stay() {
        let sh = resolve("sh");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{sh:?}");
        assert_eq!(resolve("./x"), PathBuf::from("./x"));
        assert_eq!(
            resolve("no-such-program-here"),
            PathBuf::from("no-such-program-here")
        );
    }

    #[test]
    fn own_tree_contains_self() {
        let me = std::process::id() as i32;
        assert!(tree(me).contains(&me));
    }
}
