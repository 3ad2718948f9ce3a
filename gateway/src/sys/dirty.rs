//! Which pages a running process writes, as the kernel tracks them (no soft-dirty bits on
//! this kernel): a userfaultfd registered for *asynchronous* write protection
//! (`UFFD_FEATURE_WP_ASYNC`, Linux ≥ 6.7) over the process's private writable mappings,
//! and `PAGEMAP_SCAN` on its `/proc/PID/pagemap`, which write-protects pages and later
//! lists those written since. A write to a protected page only clears its bit in the
//! kernel; the process never waits.
//!
//! A userfaultfd acts on the memory of the process that made it, so one is made *in* the
//! tracked process: every thread of it is stopped with `PTRACE_SEIZE`/`PTRACE_INTERRUPT`
//! (another thread running where the code is written would run it too), the main thread
//! is made to run `userfaultfd(2)` (three instruction bytes, `syscall; int3`, written
//! where it stopped and put back after), the descriptor is copied out with
//! `pidfd_getfd(2)`, closed there the same way, and every thread resumes as it was (an
//! interrupted system call restarts).
//! The process is left with no descriptor of ours: CRIU dumps it as it would any other.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `_IOWR(0xAA, 0x3F, struct uffdio_api)` and `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFD_API: u64 = 0xAA;
const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const FEATURE_WP_ASYNC: u64 = 1 << 15;
const REGISTER_MODE_WP: u64 = 1 << 1;

/// `_IOWR('f', 16, struct pm_scan_arg)` (96 bytes), its flags and page categories.
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;
const SCAN_WP_MATCHING: u64 = 1 << 0;
const PAGE_IS_WPALLOWED: u64 = 1 << 0;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PAGE_IS_PRESENT: u64 = 1 << 3;
/// Highest user address on x86-64 (4-level paging), where a scan of everything ends.
const USER_END: u64 = 0x7fff_ffff_f000;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct ScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Region {
    start: u64,
    end: u64,
    categories: u64,
}

/// Write tracking of one process's private writable memory; ends when dropped (the
/// userfaultfd closes, and the process's mappings are unregistered).
#[derive(Debug)]
pub struct Tracker {
    pid: i32,
    _uffd: OwnedFd,
    pagemap: std::fs::File,
}

/// How long starting to track a process may take (its thread must stop for a moment).
const START_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

impl Tracker {
    /// Starts tracking `pid` (the process, as root sees it): every page of its private
    /// writable mappings counts as unwritten from here. Errors if the kernel, the
    /// architecture or the process does not allow it, or it takes longer than
    /// [`START_WITHIN`] (a thread that does not stop); nothing of it is left in the
    /// process then. Not for a process under a seccomp filter (a filter may kill it for
    /// the system call), or one stopped or in uninterruptible sleep.
    pub fn start(pid: i32) -> io::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let seccomp = status.lines().find_map(|l| l.strip_prefix("Seccomp:"));
        if seccomp.map(str::trim) != Some("0") {
            return Err(io::Error::other("under a seccomp filter"));
        }
        if let Some(state @ ('T' | 't' | 'D')) = super::process::state(pid) {
            return Err(io::Error::other(format!("in state {state}")));
        }
        // On a thread of its own, which stays to hand the process back if it stops only
        // after the caller gave up (ptrace's requests come from the thread that seized).
        let cancelled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let gave_up = std::sync::Arc::clone(&cancelled);
        std::thread::Builder::new()
            .name("ferry-track".into())
            .spawn(move || {
                let _ = tx.send(Self::start_here(pid, &gave_up));
            })?;
        match rx.recv_timeout(START_WITHIN) {
            Ok(r) => r,
            Err(_) => {
                cancelled.store(true, std::sync::atomic::Ordering::Release);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the process did not stop to be tracked",
                ))
            }
        }
    }

    fn start_here(pid: i32, cancelled: &std::sync::atomic::AtomicBool) -> io::Result<Self> {
        let uffd = make_userfaultfd_in(pid, cancelled)?;
        let mut api = [UFFD_API, FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED, 0];
        // SAFETY: a valid `uffdio_api` for this descriptor.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, api.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
        let mut registered = 0;
        for (start, end) in maps.lines().filter_map(private_writable) {
            let mut reg = [start, end - start, REGISTER_MODE_WP, 0];
            // SAFETY: a valid `uffdio_register`. A mapping that cannot be registered
            // stays untracked (its pages are compared by content instead).
            if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, reg.as_mut_ptr()) } == 0 {
                registered += 1;
            }
        }
        if registered == 0 {
            return Err(io::Error::other(
                "no mapping could be registered for write tracking",
            ));
        }
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
        let tracker = Self {
            pid,
            _uffd: uffd,
            pagemap,
        };
        // Protect every present page now: from here on, a write marks its page (and a page
        // first touched later is written by nature). Holes are left alone: protected,
        // they would hold markers that `/proc/PID/pagemap` shows as swapped pages, which
        // CRIU would then dump.
        tracker.scan(
            SCAN_WP_MATCHING,
            PAGE_IS_WPALLOWED | PAGE_IS_PRESENT,
            PAGE_IS_WPALLOWED,
        )?;
        Ok(tracker)
    }

    /// The process tracked (its pid as root sees it).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The address ranges tracked now (mappings still registered: one replaced or moved
    /// since is not).
    pub fn tracked(&self) -> io::Result<Vec<(u64, u64)>> {
        self.scan(0, PAGE_IS_WPALLOWED, PAGE_IS_WPALLOWED)
    }

    /// The ranges of present tracked pages written since they were last protected (at
    /// the granularity the kernel maps them: a transparent huge page counts whole),
    /// protected again in the same pass: the next call lists only pages written after
    /// this one. Present pages only: an unpopulated page reads as written, and
    /// protecting it would leave a marker that looks swapped (see `start`).
    pub fn protect_written(&self) -> io::Result<Vec<(u64, u64)>> {
        self.scan(
            SCAN_WP_MATCHING,
            PAGE_IS_WPALLOWED | PAGE_IS_WRITTEN | PAGE_IS_PRESENT,
            PAGE_IS_WRITTEN,
        )
    }

    /// One `PAGEMAP_SCAN` over the whole address space, in as many calls as its output
    /// needs: the ranges of pages with every category of `mask`.
    fn scan(&self, flags: u64, mask: u64, report: u64) -> io::Result<Vec<(u64, u64)>> {
        Ok(merged(self.scan_with(flags, mask, report)?.into_iter()))
    }

    /// The ranges tracked now and, of them, those written since they were last
    /// protected (a page not populated now counts as written), in one pass over the
    /// page tables, protecting nothing.
    pub fn tracked_and_written(&self) -> io::Result<(Ranges, Ranges)> {
        let regions = self.scan_with(0, PAGE_IS_WPALLOWED, PAGE_IS_WPALLOWED | PAGE_IS_WRITTEN)?;
        let written = merged(
            regions
                .iter()
                .filter(|r| r.2 & PAGE_IS_WRITTEN != 0)
                .copied(),
        );
        Ok((merged(regions.into_iter()), written))
    }

    /// [`Self::scan`], each range with the categories of `report` it has.
    fn scan_with(&self, flags: u64, mask: u64, report: u64) -> io::Result<Vec<(u64, u64, u64)>> {
        let mut out: Vec<(u64, u64, u64)> = Vec::new();
        let mut regions = vec![Region::default(); 4096];
        let mut start = 0;
        while start < USER_END {
            let mut arg = ScanArg {
                size: std::mem::size_of::<ScanArg>() as u64,
                flags,
                start,
                end: USER_END,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                category_mask: mask,
                return_mask: report,
                ..ScanArg::default()
            };
            // SAFETY: `arg` is a valid `pm_scan_arg` whose `vec` points at `vec_len`
            // writable `page_region`s that outlive the call.
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &raw mut arg) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            out.extend(
                regions[..usize::try_from(n).unwrap_or(0)]
                    .iter()
                    .map(|r| (r.start, r.end, r.categories)),
            );
            if arg.walk_end <= start {
                break;
            }
            start = arg.walk_end;
        }
        Ok(out)
    }
}

/// Address ranges, `(start, end)`, sorted.
pub type Ranges = Vec<(u64, u64)>;

/// Ranges that touch joined into one, whatever their categories.
fn merged(regions: impl Iterator<Item = (u64, u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end, _) in regions {
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// A private, writable mapping of `/proc/PID/maps` (anonymous or not: private file pages
/// written become anonymous), as (start, end).
fn private_writable(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split_whitespace();
    let (range, perms) = (f.next()?, f.next()?);
    let p = perms.as_bytes();
    if p.len() < 4 || p[1] != b'w' || p[3] != b'p' {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    ))
}

/// Makes a userfaultfd in `pid` and returns a copy of it here (closed there).
#[cfg(target_arch = "x86_64")]
fn make_userfaultfd_in(pid: i32, cancelled: &std::sync::atomic::AtomicBool) -> io::Result<OwnedFd> {
    let stopped = Stopped::seize(pid)?;
    if cancelled.load(std::sync::atomic::Ordering::Acquire) {
        stopped.resume()?;
        return Err(io::Error::new(io::ErrorKind::TimedOut, "stopped too late"));
    }
    let fd = stopped.syscall(
        libc::SYS_userfaultfd,
        [(libc::O_CLOEXEC | libc::O_NONBLOCK) as u64, 0],
    )?;
    let fd =
        i32::try_from(fd).map_err(|_| io::Error::other("userfaultfd returned no descriptor"))?;
    let copied = pidfd_getfd(pid, fd);
    // Closed there whatever happened here: the process keeps no descriptor of ours.
    let closed = stopped.syscall(libc::SYS_close, [fd as u64, 0]);
    let copied = copied?;
    closed?;
    stopped.resume()?;
    Ok(copied)
}

#[cfg(not(target_arch = "x86_64"))]
fn make_userfaultfd_in(
    _pid: i32,
    _cancelled: &std::sync::atomic::AtomicBool,
) -> io::Result<OwnedFd> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "write tracking injects a system call, written for x86-64 only",
    ))
}

fn pidfd_getfd(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we own from here.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: pidfd_getfd returns a new descriptor (close-on-exec) or -1.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) } as i32;
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(got) })
}

/// A process stopped under `PTRACE_SEIZE`, every thread of it (one resuming where code
/// is injected would run it): resumed (its main thread with its registers, each with any
/// signal that came meanwhile) when dropped. Code runs in the main thread.
#[cfg(target_arch = "x86_64")]
struct Stopped {
    pid: i32,
    regs: libc::user_regs_struct,
    /// A signal that arrived while it was stopped, delivered when it resumes.
    pending: std::cell::Cell<i32>,
    resumed: std::cell::Cell<bool>,
    /// Its other threads, each with a signal to deliver when it resumes.
    others: Vec<(i32, std::cell::Cell<i32>)>,
}

#[cfg(target_arch = "x86_64")]
impl Stopped {
    fn seize(pid: i32) -> io::Result<Self> {
        ptrace(libc::PTRACE_SEIZE, pid, 0, 0)?;
        let mut stopped = Self {
            pid,
            // SAFETY: a plain C struct of integers, all-zero valid.
            regs: unsafe { std::mem::zeroed() },
            pending: std::cell::Cell::new(0),
            resumed: std::cell::Cell::new(false),
            others: Vec::new(),
        };
        ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0)?;
        stopped.wait_for(|status| status >> 16 == libc::PTRACE_EVENT_STOP)?;
        stopped.regs = stopped.get_regs()?;
        // Then every other thread, until a listing shows none new (one not stopped yet
        // may have started another).
        loop {
            let new: Vec<i32> = super::process::threads(pid)
                .into_iter()
                .filter(|t| *t != pid && !stopped.others.iter().any(|(o, _)| o == t))
                .collect();
            if new.is_empty() {
                return Ok(stopped);
            }
            for tid in new {
                if ptrace(libc::PTRACE_SEIZE, tid, 0, 0).is_err() {
                    continue; // ended meanwhile
                }
                let pending = std::cell::Cell::new(0);
                let stop = ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0).and_then(|()| {
                    wait_stop(tid, &pending, |status| {
                        status >> 16 == libc::PTRACE_EVENT_STOP
                    })
                });
                stopped.others.push((tid, pending));
                stop?;
            }
        }
    }

    /// Waits for a stop of the main thread `wanted` accepts.
    fn wait_for(&self, wanted: impl Fn(i32) -> bool) -> io::Result<()> {
        wait_stop(self.pid, &self.pending, wanted)
    }

    fn get_regs(&self) -> io::Result<libc::user_regs_struct> {
        // SAFETY: a plain C struct of integers, all-zero valid; filled by the kernel.
        let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        ptrace(libc::PTRACE_GETREGS, self.pid, 0, &raw mut regs as usize)?;
        Ok(regs)
    }

    fn set_regs(&self, regs: &libc::user_regs_struct) -> io::Result<()> {
        ptrace(
            libc::PTRACE_SETREGS,
            self.pid,
            0,
            std::ptr::from_ref(regs) as usize,
        )
    }

    /// Runs system call `nr` with `args` in the stopped thread; its return value.
    fn syscall(&self, nr: libc::c_long, args: [u64; 2]) -> io::Result<i64> {
        let at = self.regs.rip;
        let word = peek(self.pid, at)?;
        // `syscall` (0f 05), then `int3` (cc): the stop that hands the thread back.
        let code = (word & !0x00ff_ffff) | 0x00cc_050f;
        poke(self.pid, at, code)?;
        let ran = (|| {
            let mut regs = self.regs;
            regs.rip = at;
            regs.rax = nr as u64;
            regs.orig_rax = u64::MAX;
            regs.rdi = args[0];
            regs.rsi = args[1];
            self.set_regs(&regs)?;
            ptrace(libc::PTRACE_CONT, self.pid, 0, 0)?;
            self.wait_for(|status| status >> 16 == 0 && libc::WSTOPSIG(status) == libc::SIGTRAP)?;
            self.get_regs()
        })();
        let restored = poke(self.pid, at, word).and_then(|()| self.set_regs(&self.regs));
        let regs = ran?;
        restored?;
        let rc = regs.rax as i64;
        if rc < 0 && rc > -4096 {
            return Err(io::Error::from_raw_os_error(
                i32::try_from(-rc).unwrap_or(libc::EIO),
            ));
        }
        Ok(rc)
    }

    fn resume(self) -> io::Result<()> {
        self.resumed.set(true);
        let main = self.set_regs(&self.regs).and_then(|()| {
            ptrace(
                libc::PTRACE_DETACH,
                self.pid,
                0,
                self.pending.get() as usize,
            )
        });
        self.let_others_go();
        main
    }

    fn let_others_go(&self) {
        for (tid, pending) in &self.others {
            let _ = ptrace(libc::PTRACE_DETACH, *tid, 0, pending.get() as usize);
        }
    }
}

/// Waits for a stop of thread `tid` that `wanted` accepts; other signal stops are
/// remembered in `pending` (delivered at resume) and let go.
#[cfg(target_arch = "x86_64")]
fn wait_stop(
    tid: i32,
    pending: &std::cell::Cell<i32>,
    wanted: impl Fn(i32) -> bool,
) -> io::Result<()> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our tracee, writing `status`.
        let r = unsafe { libc::waitpid(tid, &raw mut status, libc::__WALL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if !libc::WIFSTOPPED(status) {
            return Err(io::Error::other("the process ended while it was stopped"));
        }
        if wanted(status) {
            return Ok(());
        }
        let sig = libc::WSTOPSIG(status);
        if status >> 16 == 0 && sig != libc::SIGTRAP {
            pending.set(sig);
        }
        ptrace(libc::PTRACE_CONT, tid, 0, 0)?;
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.resumed.get() {
            let _ = self.set_regs(&self.regs);
            let _ = ptrace(
                libc::PTRACE_DETACH,
                self.pid,
                0,
                self.pending.get() as usize,
            );
            self.let_others_go();
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn ptrace(req: libc::c_uint, pid: i32, addr: usize, data: usize) -> io::Result<()> {
    // SAFETY: ptrace requests whose pointers (if any) the callers made valid.
    let r = unsafe {
        libc::ptrace(
            req,
            pid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(target_arch = "x86_64")]
fn peek(pid: i32, at: u64) -> io::Result<u64> {
    // SAFETY: errno is cleared first: PEEKTEXT's word may be -1.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: PEEKTEXT reads a word of the tracee.
    let w = unsafe {
        libc::ptrace(
            libc::PTRACE_PEEKTEXT,
            pid,
            at as *mut libc::c_void,
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    let e = io::Error::last_os_error();
    if w == -1 && e.raw_os_error().unwrap_or(0) != 0 {
        return Err(e);
    }
    Ok(w as u64)
}

#[cfg(target_arch = "x86_64")]
fn poke(pid: i32, at: u64, word: u64) -> io::Result<()> {
    ptrace(libc::PTRACE_POKETEXT, pid, at as usize, word as usize)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A `python3 -c script` child, and the address its script printed first (a region
    /// of its memory the test then reads, writes or tracks).
    pub(crate) fn python_with_region(script: &str) -> (std::process::Child, u64) {
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("its address");
        (child, line.trim().parse().expect("an address"))
    }

    /// Pages of `pid`'s private writable mappings `/proc/PID/pagemap` shows present, and
    /// shows swapped (what CRIU would dump besides).
    fn present_and_swapped(pid: i32) -> (u64, u64) {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).expect("pagemap");
        let (mut present, mut swapped) = (0, 0);
        for (start, end) in maps.lines().filter_map(private_writable) {
            let mut entries = vec![0u8; usize::try_from((end - start) / 4096 * 8).unwrap()];
            if pagemap
                .read_exact_at(&mut entries, start / 4096 * 8)
                .is_err()
            {
                continue;
            }
            for e in entries.chunks_exact(8) {
                let v = u64::from_ne_bytes(e.try_into().unwrap());
                if v >> 63 == 1 {
                    present += 1;
                } else if (v >> 62) & 1 == 1 {
                    swapped += 1;
                }
            }
        }
        (present, swapped)
    }

    #[test]
    fn a_process_whose_threads_all_run_the_same_code_survives_being_tracked() {
        // Eight threads sleeping 50 µs at a time in the same libc call as the main
        // thread: one resuming where the main thread stopped would meet the injected
        // instructions if it ran meanwhile.
        let script = "import threading, time, ctypes, mmap\n\
            m = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE)\n\
            m[0] = 1\n\
            stop = time.time() + 3\n\
            def spin():\n\
            \x20   while time.time() < stop: time.sleep(0.00005)\n\
            ts = [threading.Thread(target=spin) for _ in range(8)]\n\
            [t.start() for t in ts]\n\
            print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)\n\
            while time.time() < stop: time.sleep(0.00005)\n\
            [t.join() for t in ts]\n";
        let (mut child, _) = python_with_region(script);
        let pid = child.id() as i32;
        for i in 0..20 {
            match Tracker::start(pid) {
                Ok(t) => drop(t),
                Err(e) => panic!("write tracking, time {i}: {e}"),
            }
        }
        let status = child.wait().expect("wait");
        assert!(status.success(), "it ended {status}");
    }

    #[test]
    fn a_stopped_process_is_not_tracked_and_stays_stopped() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep runs");
        let pid = child.id() as i32;
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        std::thread::sleep(std::time::Duration::from_millis(100));
        let e = Tracker::start(pid).expect_err("tracked while stopped");
        assert!(e.to_string().contains("state T"), "{e}");
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        assert!(state.contains(") T "), "{state}");
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn a_page_written_after_tracking_starts_is_listed_and_the_process_goes_on() {
        // A process with a private region of which every 7th page is populated, asleep in
        // a system call (which must restart after the stop); it prints the region's
        // address and exits 0 after its sleep.
        let script = "import mmap, sys, time\n\
            m = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE)\n\
            for i in range(0, 8 << 20, 4096 * 7): m[i] = 1\n\
            import ctypes\n\
            a = ctypes.addressof(ctypes.c_char.from_buffer(m))\n\
            print(a, flush=True)\n\
            time.sleep(2)\n";
        let (mut child, region) = python_with_region(script);
        let pid = child.id() as i32;
        std::thread::sleep(std::time::Duration::from_millis(100));
        let before = present_and_swapped(pid);
        let tracker = Tracker::start(pid).unwrap_or_else(|e| panic!("write tracking: {e}"));
        let tracked = tracker.tracked().expect("scan");
        assert!(
            tracked.iter().any(|&(s, e)| s <= region && region < e),
            "the region is not tracked: {tracked:x?}"
        );
        let idle = tracker.protect_written().expect("scan");
        assert!(
            !idle.iter().any(|&(s, e)| s <= region && region < e),
            "written before any write: {idle:x?}"
        );
        // Write a populated page of it (the same byte: it must not notice).
        let page = region + 7 * 4096;
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .expect("mem");
        let mut buf = [0u8; 1];
        mem.read_exact_at(&mut buf, page).expect("read");
        mem.write_all_at(&buf, page).expect("write");
        let (_, written) = tracker.tracked_and_written().expect("scan");
        let in_region: Vec<_> = written
            .iter()
            .filter(|&&(s, e)| e > region && s < region + (8 << 20))
            .collect();
        assert!(
            in_region.iter().any(|&&(s, e)| s <= page && page < e),
            "the written page {page:#x} is not listed: {written:x?}"
        );
        // Protecting leaves no marker that pagemap (and so CRIU) would show as a swapped
        // page, and touches no page.
        assert_eq!(present_and_swapped(pid), before);
        // No descriptor of ours was left in it, and its sleep ends as it would have.
        let ours = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fds")
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .any(|l| l.to_string_lossy().contains("userfaultfd"));
        assert!(!ours, "a userfaultfd was left in the process");
        drop(tracker);
        let status = child.wait().expect("wait");
        assert!(status.success(), "it ended {status}");
    }
}
