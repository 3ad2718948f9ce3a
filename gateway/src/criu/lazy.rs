//! Ferry's lazy-pages daemon, in place of `criu lazy-pages`, inside the gateway: takes the
//! userfaultfds `criu restore --lazy-pages` hands over, answers each fault at once from a
//! [`Supply`] (the gateway's page cache, or the source for a page not there yet), and
//! meanwhile copies every other lazy page in large runs, from the last faulted address
//! on, as soon as the supply has it. Fork, mremap, madvise and munmap events are followed
//! as CRIU's daemon follows them.
//!
//! A thread waiting for a page must never read zeros where the page never came, and a
//! closed userfaultfd lets it do exactly that: so a small guard process (`ferry
//! lazy-guard`, [`guard`]) holds a duplicate of every userfaultfd until the gateway says
//! the process has every page. If the gateway dies (or gives up) first, the guard kills
//! the restored tree's cgroup before it lets go of them.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::image::{self, PageRun, PAGE_SIZE};
use crate::sys::uffd::{self, Event, Placed, Userfault};

/// The socket `criu restore --lazy-pages` connects to, in its image directory.
const SOCKET: &str = "lazy-pages.socket";
/// What the restore sends when every task has been handed over and runs.
const RESTORE_FINISHED: u32 = 0x5253_5446;
/// Pages a fault asks for at once: the faulting one and a few after it.
const FAULT_PAGES: u64 = 16;
/// Pages one background copy moves (the page server answers at most this many).
const BACKGROUND_PAGES: u64 = 256;
/// The background copier's nice value (the rest of the gateway runs at 0).
const COPIER_NICE: i32 = 10;

#[derive(Debug, Error)]
pub enum LazyError {
    #[error("cannot read the images: {0}")]
    Images(#[from] image::ImageError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> LazyError {
    move |source| LazyError::Io { what, source }
}

/// A run of pages still to place: `pages` pages at a destination address, whose content
/// is the image's process `src_pid` at `src` (they differ once `mremap` moved them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    pages: u64,
    src_pid: u32,
    src: u64,
}

/// The pages of one process still to place, by destination address.
#[derive(Debug, Clone, Default)]
struct Todo(BTreeMap<u64, Span>);

impl Todo {
    fn from_runs(runs: &[PageRun]) -> Self {
        let mut t = Self::default();
        for r in runs {
            t.0.insert(
                r.vaddr,
                Span {
                    pages: r.nr_pages,
                    src_pid: r.pid,
                    src: r.vaddr,
                },
            );
        }
        t
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn end(at: u64, s: &Span) -> u64 {
        at + s.pages * PAGE_SIZE
    }

    /// Cuts the spans so that none crosses `addr`.
    fn split_at(&mut self, addr: u64) {
        let Some((&at, &s)) = self.0.range(..addr).next_back() else {
            return;
        };
        if Self::end(at, &s) <= addr {
            return;
        }
        let head = (addr - at) / PAGE_SIZE;
        self.0.insert(at, Span { pages: head, ..s });
        self.0.insert(
            addr,
            Span {
                pages: s.pages - head,
                src_pid: s.src_pid,
                src: s.src + head * PAGE_SIZE,
            },
        );
    }

    /// Removes and returns the spans within [start, end).
    fn cut(&mut self, start: u64, end: u64) -> Vec<(u64, Span)> {
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.0.range(start..end).map(|(k, _)| *k).collect();
        keys.into_iter()
            .filter_map(|k| self.0.remove(&k).map(|s| (k, s)))
            .collect()
    }

    /// Takes up to `max` pages from `addr` (which must be in a span), or `None`.
    fn take_at(&mut self, addr: u64, max: u64) -> Option<(u64, Span)> {
        let (&at, s) = self.0.range(..=addr).next_back()?;
        if Self::end(at, s) <= addr {
            return None;
        }
        let end = Self::end(at, s).min(addr + max * PAGE_SIZE);
        self.cut(addr, end).into_iter().next()
    }

    /// Takes up to `max` pages of the first span at or after `from` (wrapping around).
    fn take_next(&mut self, from: u64, max: u64) -> Option<(u64, Span)> {
        let at = self
            .0
            .range(from..)
            .next()
            .or_else(|| self.0.iter().next())
            .map(|(k, _)| *k)?;
        self.take_at(at, max)
    }

    fn put(&mut self, at: u64, s: Span) {
        if s.pages > 0 {
            self.0.insert(at, s);
        }
    }

    /// `mremap` moved [from, from+len) to `to`.
    fn remap(&mut self, from: u64, to: u64, len: u64) {
        for (at, s) in self.cut(from, from + len) {
            self.0.insert(at - from + to, s);
        }
    }
}

/// One restored process (or one forked since) and the pages it still lacks.
struct Proc {
    /// Closed (`None`) once the process is done: a process whose userfaultfd nobody
    /// reads would block on its next fork, madvise or munmap.
    uffd: Option<Arc<Userfault>>,
    todo: Todo,
    /// The span the background copier is fetching now, and whether an event since made
    /// it void (it was put back in `todo` first).
    in_flight: Option<(u64, Span)>,
    voided: bool,
    /// Faults on the span in flight: handled when it lands (or not).
    deferred: Vec<u64>,
    /// Where the last fault was: the background copy goes on from there.
    cursor: u64,
    gone: bool,
    /// Its number with the guard.
    index: u32,
}

impl Proc {
    fn new(uffd: Userfault, todo: Todo, cursor: u64) -> Self {
        Self {
            uffd: Some(Arc::new(uffd)),
            todo,
            in_flight: None,
            voided: false,
            deferred: Vec::new(),
            cursor,
            gone: false,
            index: 0,
        }
    }

    fn done(&self) -> bool {
        self.gone || (self.todo.is_empty() && self.in_flight.is_none())
    }

    /// Puts the span in flight back if it overlaps [start, end): an event changes it.
    fn void_in_flight(&mut self, start: u64, end: u64) {
        if let Some((at, s)) = self.in_flight {
            if at < end && Todo::end(at, &s) > start && !self.voided {
                self.todo.put(at, s);
                self.voided = true;
            }
        }
    }
}

/// Pages a supply hands over: in place where they arrived (no copy), or copied.
pub enum Pages {
    Owned(Vec<u8>),
    Shared(Arc<Vec<u8>>, std::ops::Range<usize>),
}

impl Pages {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            Self::Shared(v, range) => v.get(range.clone()).unwrap_or_default(),
        }
    }
}

/// Where the pages come from.
pub trait Supply: Send + Sync {
    /// Up to `pages` pages of image process `pid` from `vaddr`, at least the first; for a
    /// `background` request, none if they have not arrived (a fault's request waits).
    fn get(&self, pid: u32, vaddr: u64, pages: u64, background: bool) -> std::io::Result<Pages>;
    /// Every restored process has every page (`true`), or the daemon gave up.
    fn finished(&self, ok: bool);
}

/// What the gateway tells the guard: `[kind u8][index u32]`, a descriptor with `TAKE`.
const TAKE: u8 = b'U';
const RELEASE: u8 = b'R';
const DONE: u8 = b'D';
/// With a descriptor: the restored tree's `cgroup.kill`, once the gateway knows it (a
/// runtime's restore places the tree in a cgroup of its own choosing).
const KILL: u8 = b'K';

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Everything the daemon shares between its threads.
struct Daemon {
    supply: Arc<dyn Supply>,
    /// The guard's socket: every userfaultfd goes there too, and back out when done.
    guard: Mutex<OwnedFd>,
    next_index: std::sync::atomic::AtomicU32,
    procs: Mutex<Vec<Arc<Mutex<Proc>>>>,
    /// Set on the first fatal error (every thread then stops).
    failed: Mutex<Option<String>>,
    finished: Mutex<bool>,
    changed: Condvar,
    faults: std::sync::atomic::AtomicU64,
    copied: std::sync::atomic::AtomicU64,
    /// The restored tree's `cgroup.kill`, written on failure while the userfaultfds are
    /// still held.
    kill: Mutex<Option<std::fs::File>>,
}

/// The gateway's hold on a running daemon, to name the restored tree's cgroup once it
/// is known. It does not keep the daemon alive.
#[derive(Clone)]
pub struct Handle(std::sync::Weak<Daemon>);

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("lazy::Handle")
    }
}

impl Handle {
    /// On failure (of the daemon, or of the gateway: the guard), the restored tree is
    /// killed through `cgroup_kill`.
    pub fn kill_through(&self, cgroup_kill: &Path) -> std::io::Result<()> {
        let Some(daemon) = self.0.upgrade() else {
            // Ended: every page placed, or the failure already handled.
            return Ok(());
        };
        let file = std::fs::OpenOptions::new().write(true).open(cgroup_kill)?;
        let fd = OwnedFd::from(file.try_clone()?);
        uffd::send_message(&lock(&daemon.guard), &[KILL, 0, 0, 0, 0], Some(&fd))?;
        *lock(&daemon.kill) = Some(file);
        Ok(())
    }
}

/// Kills a cgroup through its open `cgroup.kill`.
fn kill_with(file: &mut std::fs::File) {
    let _ = std::io::Write::write_all(file, b"1");
}

impl Daemon {
    fn fail(&self, why: String) {
        let mut f = lock(&self.failed);
        if f.is_none() {
            *f = Some(why);
        }
        self.changed.notify_all();
    }

    fn failed(&self) -> bool {
        lock(&self.failed).is_some()
    }

    fn add(self: &Arc<Self>, mut proc: Proc) {
        let index = self
            .next_index
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        proc.index = index;
        if let Some(uffd) = &proc.uffd {
            let mut msg = [TAKE, 0, 0, 0, 0];
            msg[1..].copy_from_slice(&index.to_le_bytes());
            if let Err(e) = uffd::send_message(&lock(&self.guard), &msg, Some(uffd.fd())) {
                // Unguarded, a gateway crash would let its threads read zeros.
                self.fail(format!("cannot hand a userfaultfd to the guard: {e}"));
            }
        }
        let proc = Arc::new(Mutex::new(proc));
        lock(&self.procs).push(Arc::clone(&proc));
        let this = Arc::clone(self);
        std::thread::spawn(move || this.events(&proc));
    }

    /// Places `data` (the pages at `at`'s span start) for `proc`; puts back what is not
    /// placed. Returns pages placed.
    fn place(&self, p: &mut Proc, at: u64, span: Span, data: &[u8]) -> u64 {
        let Some(uffd) = p.uffd.clone() else {
            return 0;
        };
        let got = data.len() as u64 / PAGE_SIZE;
        let rest = Span {
            pages: span.pages - got,
            src_pid: span.src_pid,
            src: span.src + got * PAGE_SIZE,
        };
        let placed = match uffd.copy(at, data) {
            Placed::Done => got,
            Placed::Exists(bytes) => {
                // Some pages are there already (placed by another path): wake the
                // waiters on them, and place the rest one by one.
                uffd.wake(at, data.len() as u64);
                let mut n = bytes / PAGE_SIZE;
                for i in (n + 1)..got {
                    let page = &data[usize::try_from(i * PAGE_SIZE).unwrap_or(0)..]
                        [..usize::try_from(PAGE_SIZE).unwrap_or(0)];
                    if matches!(uffd.copy(at + i * PAGE_SIZE, page), Placed::Done) {
                        n += 1;
                    }
                }
                n
            }
            Placed::Again => {
                p.todo.put(at, Span { pages: got, ..span });
                p.todo.put(at + got * PAGE_SIZE, rest);
                return 0;
            }
            Placed::Gone => {
                p.gone = true;
                return 0;
            }
            Placed::NoMapping if got > 1 => {
                // Two mappings under one run: halves, until each fits one mapping.
                let half = got / 2;
                let cut = usize::try_from(half * PAGE_SIZE).unwrap_or(0);
                let first = self.place(
                    p,
                    at,
                    Span {
                        pages: half,
                        ..span
                    },
                    &data[..cut],
                );
                let second_span = Span {
                    pages: span.pages - half,
                    src_pid: span.src_pid,
                    src: span.src + half * PAGE_SIZE,
                };
                return first + self.place(p, at + half * PAGE_SIZE, second_span, &data[cut..]);
            }
            Placed::NoMapping => {
                tracing::debug!(address = at, "no mapping for a lazy page; dropped");
                0
            }
        };
        p.todo.put(at + got * PAGE_SIZE, rest);
        self.copied
            .fetch_add(placed, std::sync::atomic::Ordering::Relaxed);
        placed
    }

    /// A thread waits for the page at `address` of `p`.
    fn fault(&self, p: &mut Proc, address: u64) -> Result<(), LazyError> {
        let page = address & !(PAGE_SIZE - 1);
        p.cursor = page;
        if let Some((at, s)) = p.in_flight {
            if !p.voided && page >= at && page < Todo::end(at, &s) {
                p.deferred.push(page);
                return Ok(());
            }
        }
        self.faults
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(uffd) = p.uffd.clone() else {
            return Ok(());
        };
        let Some((at, span)) = p.todo.take_at(page, FAULT_PAGES) else {
            // Not a page of the image (or placed already): zeros, as CRIU's daemon does.
            match uffd.zero(page, PAGE_SIZE) {
                Placed::Exists(_) => uffd.wake(page, PAGE_SIZE),
                Placed::Again => p.deferred.push(page),
                _ => {}
            }
            return Ok(());
        };
        let data = self
            .supply
            .get(span.src_pid, span.src, span.pages, false)
            .map_err(io("fetch a faulted page"))?;
        self.place(p, at, span, data.bytes());
        if p.todo.0.contains_key(&at) {
            // An event is pending on the range (put back): again once it is read.
            p.deferred.push(page);
        }
        Ok(())
    }

    /// The event loop of one process's userfaultfd.
    fn events(self: &Arc<Self>, proc: &Arc<Mutex<Proc>>) {
        let Some(uffd) = lock(proc).uffd.clone() else {
            return;
        };
        loop {
            {
                let mut p = lock(proc);
                if self.failed() || p.done() {
                    // Closed (with this thread's handle, and the guard's) once done:
                    // nobody reads it now.
                    p.uffd = None;
                    if !self.failed() {
                        let mut msg = [RELEASE, 0, 0, 0, 0];
                        msg[1..].copy_from_slice(&p.index.to_le_bytes());
                        let _ = uffd::send_message(&lock(&self.guard), &msg, None);
                    }
                    drop(p);
                    self.changed.notify_all();
                    return;
                }
            }
            match uffd.wait(20) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => return self.fail(format!("waiting for page faults: {e}")),
            }
            let mut p = lock(proc);
            let events = match uffd.events() {
                Ok(e) => e,
                Err(e) => return self.fail(format!("reading page faults: {e}")),
            };
            if events.is_empty() {
                drop(p);
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            for event in events {
                let outcome = match event {
                    Event::PageFault { address } => self.fault(&mut p, address),
                    Event::Fork { child } => {
                        let mut todo = p.todo.clone();
                        if let (Some((at, s)), false) = (p.in_flight, p.voided) {
                            todo.put(at, s);
                        }
                        self.add(Proc::new(Userfault::new(child), todo, p.cursor));
                        Ok(())
                    }
                    Event::Remap { from, to, len } => {
                        p.void_in_flight(from, from + len);
                        p.todo.remap(from, to, len);
                        Ok(())
                    }
                    Event::Remove { start, end } => {
                        p.void_in_flight(start, end);
                        p.todo.cut(start, end);
                        if uffd.unregister(start, end - start).is_err() {
                            tracing::debug!(start, end, "unregistering a removed range failed");
                        }
                        Ok(())
                    }
                    Event::Unmap { start, end } => {
                        p.void_in_flight(start, end);
                        p.todo.cut(start, end);
                        Ok(())
                    }
                };
                if let Err(e) = outcome {
                    return self.fail(e.to_string());
                }
            }
            drop(p);
            self.changed.notify_all();
        }
    }

    /// Copies every page not faulted yet, as the page server gets them.
    fn background(&self) -> Result<(), LazyError> {
        loop {
            if self.failed() {
                return Ok(());
            }
            let finished = *lock(&self.finished);
            if !finished {
                // Until the restore has set up every mapping (and registered it), a copy
                // would find no mapping: faults alone are answered meanwhile.
                let f = lock(&self.finished);
                let _ = self
                    .changed
                    .wait_timeout(f, Duration::from_millis(5))
                    .map_err(|_| ());
                continue;
            }
            let procs: Vec<_> = lock(&self.procs).clone();
            if procs.iter().all(|p| lock(p).done()) {
                return Ok(());
            }
            let mut progressed = false;
            for proc in &procs {
                let picked = {
                    let mut p = lock(proc);
                    if p.gone {
                        None
                    } else {
                        let cursor = p.cursor;
                        let next = p.todo.take_next(cursor, BACKGROUND_PAGES);
                        p.in_flight = next;
                        p.voided = false;
                        next
                    }
                };
                let Some((at, span)) = picked else {
                    let mut p = lock(proc);
                    for page in std::mem::take(&mut p.deferred) {
                        self.fault(&mut p, page)?;
                    }
                    continue;
                };
                let data = self
                    .supply
                    .get(span.src_pid, span.src, span.pages, true)
                    .map_err(io("fetch pages"));
                let mut p = lock(proc);
                let voided = std::mem::replace(&mut p.voided, false);
                p.in_flight = None;
                match data {
                    Ok(data) if !voided && !data.bytes().is_empty() => {
                        let data = data.bytes();
                        p.cursor = at + data.len() as u64;
                        if self.place(&mut p, at, span, data) > 0 {
                            progressed = true;
                        }
                    }
                    Ok(_) if !voided => {
                        // Not arrived yet: the next span meanwhile.
                        p.todo.put(at, span);
                        p.cursor = at + span.pages * PAGE_SIZE;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !voided {
                            p.todo.put(at, span);
                        }
                        return Err(e);
                    }
                }
                for page in std::mem::take(&mut p.deferred) {
                    self.fault(&mut p, page)?;
                }
            }
            if !progressed {
                // Nothing arrived yet (or nothing to do until the restore finishes).
                let f = lock(&self.finished);
                let _ = self
                    .changed
                    .wait_timeout(f, Duration::from_millis(5))
                    .map_err(|_| ());
            }
        }
    }
}

/// Starts the daemon for a restore from `images`: listens on the restore's socket there
/// at once, then (on its own threads) takes the hand-over, places the pages from `supply`
/// and, when every restored process has them all, tells the guard (`guard`, the gateway's
/// end of its socket) and `supply`. On failure it kills the tree's cgroup through `kill`
/// (or what [`Handle::kill_through`] names later) first, while the userfaultfds are
/// still held.
pub fn start(
    images: &Path,
    supply: Arc<dyn Supply>,
    guard: OwnedFd,
    kill: Option<PathBuf>,
) -> Result<Handle, LazyError> {
    let kill = match kill {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io("open the restored tree's cgroup.kill"))?,
        ),
        None => None,
    };
    let mut by_pid: HashMap<u32, Vec<PageRun>> = HashMap::new();
    for r in image::lazy_runs(images)? {
        by_pid.entry(r.pid).or_default().push(r);
    }
    let path = images.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(io("listen for the restore"))?;
    let log = images.join(super::layout::LAZY_PAGES_LOG);
    let daemon = Arc::new(Daemon {
        supply: Arc::clone(&supply),
        guard: Mutex::new(guard),
        next_index: 0.into(),
        procs: Mutex::new(Vec::new()),
        failed: Mutex::new(None),
        finished: Mutex::new(false),
        changed: Condvar::new(),
        faults: 0.into(),
        copied: 0.into(),
        kill: Mutex::new(kill),
    });
    let handle = Handle(Arc::downgrade(&daemon));
    std::thread::Builder::new()
        .name("lazy-pages".into())
        .spawn(move || {
            let started = Instant::now();
            let outcome = serve(&daemon, &listener, &by_pid);
            let line = match &outcome {
                Ok(()) => {
                    let _ = uffd::send_message(&lock(&daemon.guard), &[DONE, 0, 0, 0, 0], None);
                    let summary = format!(
                        "{} processes, {} faults, {} pages placed, {} ms",
                        lock(&daemon.procs).len(),
                        daemon.faults.load(std::sync::atomic::Ordering::Relaxed),
                        daemon.copied.load(std::sync::atomic::Ordering::Relaxed),
                        started.elapsed().as_millis()
                    );
                    tracing::info!(%summary, "every lazy page placed");
                    format!("Lazy pages transfer finished successfully: {summary}\n")
                }
                Err(e) => {
                    if let Some(kill) = lock(&daemon.kill).as_mut() {
                        // The userfaultfds are still open here (and at the guard): no
                        // thread has read a missing page.
                        kill_with(kill);
                    }
                    tracing::error!(error = %e, "lazy pages failed; the restored tree was killed");
                    format!("Error: lazy pages transfer FAILED: {e}\n")
                }
            };
            let _ = std::fs::write(&log, line);
            supply.finished(outcome.is_ok());
            // Dropping the daemon closes the guard's socket: after DONE it exits 0, else
            // it kills the cgroup (again) and exits 1.
        })
        .map_err(io("start the lazy-pages thread"))?;
    Ok(handle)
}

fn serve(
    daemon: &Arc<Daemon>,
    listener: &UnixListener,
    by_pid: &HashMap<u32, Vec<PageRun>>,
) -> Result<(), LazyError> {
    let (mut restore, _) = listener.accept().map_err(io("accept the restore"))?;
    let copier = {
        let d = Arc::clone(daemon);
        std::thread::spawn(move || {
            // Behind the restored workload, its faults and the gateway's forwarding of
            // its clients (which take the CPU first at the switch), not ahead of them.
            let _ = crate::sys::process::nice_this_thread(COPIER_NICE);
            if let Err(e) = d.background() {
                d.fail(e.to_string());
            }
        })
    };
    if let Err(e) = hand_over(daemon, &mut restore, by_pid) {
        daemon.fail(e.to_string());
    }
    // The copier ends once every process is done (or the daemon failed).
    let _ = copier.join();
    match lock(&daemon.failed).clone() {
        Some(why) => Err(LazyError::Io {
            what: "lazy pages",
            source: std::io::Error::other(why),
        }),
        None => Ok(()),
    }
}

/// The guard (`ferry lazy-guard`): holds the userfaultfds the gateway sends on `sock`
/// until it says the process has every page; if the gateway goes first (the socket ends
/// without DONE), kills the cgroup through `kill` before letting go of them. Writes its
/// verdict (0: every page placed) to `exit_file` and returns it.
pub fn guard(sock: &OwnedFd, kill: Option<&Path>, exit_file: &Path) -> i32 {
    let mut held: HashMap<u32, OwnedFd> = HashMap::new();
    let mut kill_later: Option<std::fs::File> = None;
    let mut msg = [0u8; 5];
    let code = loop {
        match uffd::recv_message(std::os::fd::AsFd::as_fd(sock), &mut msg) {
            Ok((5, fd)) => {
                let index = u32::from_le_bytes([msg[1], msg[2], msg[3], msg[4]]);
                match (msg[0], fd) {
                    (TAKE, Some(fd)) => {
                        held.insert(index, fd);
                    }
                    (RELEASE, _) => {
                        held.remove(&index);
                    }
                    (KILL, Some(fd)) => kill_later = Some(std::fs::File::from(fd)),
                    (DONE, _) => break 0,
                    _ => {}
                }
            }
            Ok(_) | Err(_) => break 1,
        }
    };
    if code != 0 {
        if let Some(kill) = kill {
            let _ = std::fs::write(kill, "1");
        }
        if let Some(file) = kill_later.as_mut() {
            kill_with(file);
        }
    }
    let _ = std::fs::write(exit_file, format!("{code}\n"));
    drop(held);
    code
}

/// Reads the restore's hand-over: (pid, userfaultfd) per task, then "finished".
fn hand_over(
    daemon: &Arc<Daemon>,
    restore: &mut UnixStream,
    runs: &HashMap<u32, Vec<PageRun>>,
) -> Result<(), LazyError> {
    loop {
        let mut word = [0u8; 4];
        restore
            .read_exact(&mut word)
            .map_err(io("read the restore's hand-over"))?;
        if u32::from_ne_bytes(word) == RESTORE_FINISHED {
            *lock(&daemon.finished) = true;
            daemon.changed.notify_all();
            return Ok(());
        }
        let pid = i32::from_ne_bytes(word);
        if pid < 0 {
            // A zombie: no memory.
            continue;
        }
        let fd = uffd::recv_fd(restore).map_err(io("receive a userfaultfd"))?;
        let todo = u32::try_from(pid)
            .ok()
            .and_then(|p| runs.get(&p))
            .map(|r| Todo::from_runs(r))
            .unwrap_or_default();
        daemon.add(Proc::new(Userfault::new(fd), todo, 0));
    }
}

/// The socket a lazy restore from `images` connects to.
pub fn socket(images: &Path) -> PathBuf {
    images.join(SOCKET)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(pages: u64, src: u64) -> Span {
        Span {
            pages,
            src_pid: 1,
            src,
        }
    }

    const P: u64 = PAGE_SIZE;

    #[test]
    fn a_fault_takes_its_pages_and_leaves_the_rest() {
        let mut t = Todo::default();
        t.put(10 * P, span(10, 10 * P));
        let (at, s) = t.take_at(12 * P, 3).unwrap();
        assert_eq!((at, s.pages, s.src), (12 * P, 3, 12 * P));
        assert_eq!(t.0.len(), 2);
        assert_eq!(t.0[&(10 * P)].pages, 2);
        assert_eq!(t.0[&(15 * P)], span(5, 15 * P));
        assert!(t.take_at(13 * P, 1).is_none(), "taken already");
        assert!(t.take_at(30 * P, 1).is_none(), "not an image page");
    }

    #[test]
    fn removed_and_remapped_ranges_follow_the_events() {
        let mut t = Todo::default();
        t.put(0, span(8, 0));
        t.cut(2 * P, 4 * P);
        assert!(
            t.take_at(3 * P, 1).is_none(),
            "removed pages are not placed"
        );
        // mremap moves pages 4..8 to 100: their content is still the image's 4..8.
        t.remap(4 * P, 100 * P, 4 * P);
        assert!(t.take_at(5 * P, 1).is_none());
        let (at, s) = t.take_at(101 * P, 1).unwrap();
        assert_eq!((at, s.src), (101 * P, 5 * P));
        let (at, _) = t.take_next(50 * P, 100).unwrap();
        assert_eq!(at, 100 * P, "the next span after the cursor");
        let (at, _) = t.take_next(200 * P, 100).unwrap();
        assert_eq!(at, 0, "wraps around");
    }
}
