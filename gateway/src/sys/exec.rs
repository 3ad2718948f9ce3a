//! What a child process does between fork and exec: only async-signal-safe calls.

use std::ffi::{CStr, CString};
use std::os::fd::RawFd;
use std::path::Path;

use tokio::process::Command;

fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
    })
}

/// The child starts a new session and, with `cgroup`, moves into that cgroup (v2
/// directory) before it execs, so everything it forks starts inside it.
pub fn new_session_in_cgroup(cmd: &mut Command, cgroup: Option<&Path>) -> std::io::Result<()> {
    let procs = cgroup
        .map(|d| cstring(&d.join("cgroup.procs")))
        .transpose()?;
    // SAFETY: setsid, open, write and close are async-signal-safe; `procs` is owned by the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(p) = &procs {
                join_cgroup(p)?;
            }
            Ok(())
        });
    }
    Ok(())
}

/// The child gets each `(source, target)` descriptor at `target` (its own copies of the
/// parent's `source`) and, with `cgroup`, joins that cgroup before it execs.
pub fn place_fds_in_cgroup(
    cmd: &mut Command,
    moves: Vec<(RawFd, RawFd)>,
    cgroup: Option<&Path>,
) -> std::io::Result<()> {
    let procs = cgroup
        .map(|d| cstring(&d.join("cgroup.procs")))
        .transpose()?;
    // SAFETY: only fcntl/dup2/close/open/write between fork and exec, all
    // async-signal-safe; the source descriptors stay open in the parent until the spawn.
    unsafe {
        cmd.pre_exec(move || {
            // Duplicate first to fds above the targets so a move cannot clobber a source.
            let mut staged = Vec::with_capacity(moves.len());
            for (src, _) in &moves {
                let tmp = libc::fcntl(*src, libc::F_DUPFD, 100);
                if tmp < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                staged.push(tmp);
            }
            for (tmp, (_, target)) in staged.iter().zip(&moves) {
                if libc::dup2(*tmp, *target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(*tmp);
            }
            if let Some(p) = &procs {
                join_cgroup(p)?;
            }
            Ok(())
        });
    }
    Ok(())
}

/// Writes "0" to a cgroup.procs file: moves the calling process into that cgroup.
/// Async-signal-safe (used between fork and exec).
fn join_cgroup(procs: &CStr) -> std::io::Result<()> {
    // SAFETY: plain syscalls on a valid NUL-terminated path and a 1-byte static buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
        if n != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes one byte to descriptor `fd` (a readiness pipe a parent gave this process) and
/// closes it.
pub fn tell_ready(fd: i32) {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: the parent gave us this descriptor for exactly this byte; nothing else
    // here owns it.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let _ = f.write_all(&[1]);
}
