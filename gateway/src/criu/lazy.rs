//! Ferry's lazy-pages daemon (`ferry lazy-pages`), in place of `criu lazy-pages`: takes
//! the userfaultfds `criu restore --lazy-pages` hands over, answers each fault at once
//! (one GET to the gateway's page server, which serves its cache or asks the source), and
//! meanwhile copies every other lazy page in large runs, from the last faulted address
//! on, as soon as the page server has it. Fork, mremap, madvise and munmap events are
//! followed as CRIU's daemon follows them. If it cannot finish, it kills the restored
//! tree's cgroup while it still holds the userfaultfds: a thread waiting for a page must
//! never read zeros where the page never came.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::image::{self, PageRun, PAGE_SIZE};
use super::pageproto::{Header, CMD_ADD_F, HEADER_LEN};
use crate::sys::uffd::{self, Event, Placed, Userfault};

/// The socket `criu restore --lazy-pages` connects to, in its image directory.
const SOCKET: &str = "lazy-pages.socket";
/// What the restore sends when every task has been handed over and runs.
const RESTORE_FINISHED: u32 = 0x5253_5446;
/// Pages a fault asks for at once: the faulting one and a few after it.
const FAULT_PAGES: u64 = 16;
/// Pages one background copy moves (the page server answers at most this many).
const BACKGROUND_PAGES: u64 = 256;

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
    #[error("the page server answered {got:?} to {asked:?}")]
    Protocol { asked: Header, got: Header },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> LazyError {
    move |source| LazyError::Io { what, source }
}

/// What the daemon did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub processes: usize,
    pub faults: u64,
    pub copied_pages: u64,
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

/// The two connections to the gateway's page server: faults, and the background copy.
struct Server {
    faults: Mutex<TcpStream>,
    background: Mutex<TcpStream>,
}

impl Server {
    fn connect(addr: SocketAddr) -> Result<Self, LazyError> {
        let open = || -> Result<TcpStream, LazyError> {
            let s = TcpStream::connect(addr).map_err(io("connect to the page server"))?;
            let _ = s.set_nodelay(true);
            Ok(s)
        };
        Ok(Self {
            faults: Mutex::new(open()?),
            background: Mutex::new(open()?),
        })
    }

    /// Asks for `pages` pages of image process `pid` at `vaddr`; the pages answered
    /// (fewer, or none for a background request whose pages have not arrived).
    fn get(
        &self,
        pid: u32,
        vaddr: u64,
        pages: u64,
        background: bool,
    ) -> Result<Vec<u8>, LazyError> {
        let (conn, req) = if background {
            (&self.background, Header::get_background(pid, vaddr, pages))
        } else {
            (&self.faults, Header::get(pid, vaddr, pages))
        };
        let mut conn = lock(conn);
        conn.write_all(&req.encode())
            .map_err(io("ask the page server"))?;
        let mut head = [0u8; HEADER_LEN];
        conn.read_exact(&mut head)
            .map_err(io("read the page server's answer"))?;
        let got = Header::decode(&head);
        let zero_ok = background && got.nr_pages == 0;
        if got.command() != CMD_ADD_F
            || got.vaddr != vaddr
            || got.nr_pages > pages
            || (got.nr_pages == 0 && !zero_ok)
        {
            return Err(LazyError::Protocol { asked: req, got });
        }
        let mut data = vec![0u8; usize::try_from(got.nr_pages * PAGE_SIZE).unwrap_or(0)];
        conn.read_exact(&mut data)
            .map_err(io("read pages from the page server"))?;
        Ok(data)
    }

    fn close(&self) {
        let mut conn = lock(&self.faults);
        let _ = conn.write_all(&Header::close().encode());
        let mut ack = [0u8; 4];
        let _ = conn.read_exact(&mut ack);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Everything the daemon shares between its threads.
struct Daemon {
    server: Server,
    procs: Mutex<Vec<Arc<Mutex<Proc>>>>,
    /// Set on the first fatal error (every thread then stops).
    failed: Mutex<Option<String>>,
    finished: Mutex<bool>,
    changed: Condvar,
    faults: std::sync::atomic::AtomicU64,
    copied: std::sync::atomic::AtomicU64,
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

    fn add(self: &Arc<Self>, proc: Proc) {
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
        let data = self.server.get(span.src_pid, span.src, span.pages, false)?;
        self.place(p, at, span, &data);
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
                    // Closed (with this thread's handle) once done: nobody reads it now.
                    p.uffd = None;
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
            let procs: Vec<_> = lock(&self.procs).clone();
            let all_done = procs.iter().all(|p| lock(p).done());
            if all_done && *lock(&self.finished) {
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
                let data = self.server.get(span.src_pid, span.src, span.pages, true);
                let mut p = lock(proc);
                let voided = std::mem::replace(&mut p.voided, false);
                p.in_flight = None;
                match data {
                    Ok(data) if !voided && !data.is_empty() => {
                        p.cursor = at + data.len() as u64;
                        if self.place(&mut p, at, span, &data) > 0 {
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

/// Where the daemon runs and what it does on failure.
#[derive(Debug, Clone)]
pub struct Options {
    pub images: PathBuf,
    pub page_server: SocketAddr,
    /// `cgroup.kill` of the restored tree: written before the daemon gives up.
    pub kill: Option<PathBuf>,
    /// Told (one byte) once the daemon listens.
    pub status_fd: Option<i32>,
}

/// Runs the daemon until every restored process has every page (or is gone).
pub fn run(opts: &Options) -> Result<Summary, LazyError> {
    let outcome = serve(opts);
    if let Err(e) = &outcome {
        if let Some(kill) = &opts.kill {
            // The userfaultfds are still open here: no thread has read a missing page.
            let _ = std::fs::write(kill, "1");
        }
        tracing::error!(error = %e, "the lazy-pages daemon failed; the restored tree was killed");
    }
    outcome
}

fn serve(opts: &Options) -> Result<Summary, LazyError> {
    let started = Instant::now();
    let mut by_pid: HashMap<u32, Vec<PageRun>> = HashMap::new();
    for r in image::lazy_runs(&opts.images)? {
        by_pid.entry(r.pid).or_default().push(r);
    }
    let path = opts.images.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(io("listen for the restore"))?;
    let server = Server::connect(opts.page_server)?;
    if let Some(fd) = opts.status_fd {
        crate::sys::exec::tell_ready(fd);
    }
    let (mut restore, _) = listener.accept().map_err(io("accept the restore"))?;
    drop(listener);
    let daemon = Arc::new(Daemon {
        server,
        procs: Mutex::new(Vec::new()),
        failed: Mutex::new(None),
        finished: Mutex::new(false),
        changed: Condvar::new(),
        faults: 0.into(),
        copied: 0.into(),
    });
    let copier = {
        let d = Arc::clone(&daemon);
        std::thread::spawn(move || {
            if let Err(e) = d.background() {
                d.fail(e.to_string());
            }
        })
    };
    let handed = hand_over(&daemon, &mut restore, &by_pid);
    if let Err(e) = handed {
        daemon.fail(e.to_string());
    }
    let _ = copier.join();
    // Every event thread ends once its process is done.
    loop {
        let procs: Vec<_> = lock(&daemon.procs).clone();
        if daemon.failed() || procs.iter().all(|p| lock(p).done()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Some(why) = lock(&daemon.failed).clone() {
        return Err(LazyError::Io {
            what: "lazy pages",
            source: std::io::Error::other(why),
        });
    }
    daemon.server.close();
    let summary = Summary {
        processes: lock(&daemon.procs).len(),
        faults: daemon.faults.load(std::sync::atomic::Ordering::Relaxed),
        copied_pages: daemon.copied.load(std::sync::atomic::Ordering::Relaxed),
    };
    tracing::info!(
        processes = summary.processes,
        faults = summary.faults,
        pages = summary.copied_pages,
        ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "every lazy page placed"
    );
    Ok(summary)
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

/// The image directory's socket path (for callers that wait for it).
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
