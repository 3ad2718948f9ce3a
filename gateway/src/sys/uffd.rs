//! userfaultfd, as a lazy-pages daemon uses it: the descriptors `criu restore
//! --lazy-pages` hands over (a pid, then the descriptor, on a Unix stream socket), their
//! events, and the ioctls that place pages (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`), wake
//! faulting threads and unregister removed ranges (linux/userfaultfd.h).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Event codes of `struct uffd_msg`.
const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;
/// `sizeof(struct uffd_msg)`.
const MSG_LEN: usize = 32;

/// ioctl numbers: `_IOR/_IOWR(0xAA, nr, struct)`; sizes 16 (`uffdio_range`), 40
/// (`uffdio_copy`), 32 (`uffdio_zeropage`).
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;

/// What a userfaultfd reports.
#[derive(Debug)]
pub enum Event {
    /// A thread waits for the page at `address` (not aligned).
    PageFault { address: u64 },
    /// The process forked; the child's missing pages fault on `child`.
    Fork { child: OwnedFd },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// `madvise(MADV_DONTNEED/REMOVE)`: the range reads as zeros from now on.
    Remove { start: u64, end: u64 },
    /// `munmap`: the range is gone.
    Unmap { start: u64, end: u64 },
}

/// How a page-placing ioctl ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Placed {
    /// All of it.
    Done,
    /// Some pages were there already (`EEXIST`): this many bytes went before them.
    Exists(u64),
    /// The range is being changed (an event is pending): try again after reading it.
    Again,
    /// The process is gone (`ESRCH`, `ENOSPC`).
    Gone,
    /// No registered mapping covers the whole range (`ENOENT`).
    NoMapping,
}

/// A userfaultfd handed over by a lazy restore (non-blocking, as CRIU opens it).
#[derive(Debug)]
pub struct Userfault(OwnedFd);

impl Userfault {
    pub fn new(fd: OwnedFd) -> Self {
        Self(fd)
    }

    /// Waits up to `timeout_ms` for events; true if some are there.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
        match n {
            -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => Ok(false),
            -1 => Err(io::Error::last_os_error()),
            0 => Ok(false),
            _ => Ok(true),
        }
    }

    /// Every event queued now (none if there are none).
    pub fn events(&self) -> io::Result<Vec<Event>> {
        let mut out = Vec::new();
        let mut buf = [0u8; MSG_LEN * 16];
        loop {
            // SAFETY: reading into a buffer of the given length.
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                    return Ok(out);
                }
                return Err(e);
            }
            let n = usize::try_from(n).unwrap_or(0);
            if n == 0 {
                return Ok(out);
            }
            for msg in buf[..n].chunks_exact(MSG_LEN) {
                if let Some(e) = decode(msg) {
                    out.push(e);
                }
            }
            if n < buf.len() {
                return Ok(out);
            }
        }
    }

    /// Places `src` (whole pages) at `dst` and wakes the threads waiting there.
    pub fn copy(&self, dst: u64, src: &[u8]) -> Placed {
        #[repr(C)]
        struct Copy {
            dst: u64,
            src: u64,
            len: u64,
            mode: u64,
            copy: i64,
        }
        let mut arg = Copy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: a valid uffdio_copy; `src` outlives the call.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), UFFDIO_COPY, &raw mut arg) };
        placed(rc, arg.copy)
    }

    /// Maps zero pages over `len` bytes at `dst` and wakes the threads waiting there.
    pub fn zero(&self, dst: u64, len: u64) -> Placed {
        #[repr(C)]
        struct Zero {
            start: u64,
            len: u64,
            mode: u64,
            zeropage: i64,
        }
        let mut arg = Zero {
            start: dst,
            len,
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: a valid uffdio_zeropage.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), UFFDIO_ZEROPAGE, &raw mut arg) };
        placed(rc, arg.zeropage)
    }

    /// Wakes threads waiting on a range whose pages are there already.
    pub fn wake(&self, start: u64, len: u64) {
        let mut range = [start, len];
        // SAFETY: a valid uffdio_range.
        unsafe { libc::ioctl(self.0.as_raw_fd(), UFFDIO_WAKE, range.as_mut_ptr()) };
    }

    /// Stops tracking a range (removed pages then fault as ordinary zero pages).
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = [start, len];
        // SAFETY: a valid uffdio_range.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), UFFDIO_UNREGISTER, range.as_mut_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

fn placed(rc: libc::c_int, done: i64) -> Placed {
    if rc == 0 {
        return Placed::Done;
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EEXIST) => Placed::Exists(u64::try_from(done).unwrap_or(0)),
        Some(libc::EAGAIN) => Placed::Again,
        Some(libc::ESRCH | libc::ENOSPC) => Placed::Gone,
        _ => Placed::NoMapping,
    }
}

fn decode(msg: &[u8]) -> Option<Event> {
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&msg[at..at + 8]);
        u64::from_ne_bytes(b)
    };
    Some(match msg[0] {
        EVENT_PAGEFAULT => Event::PageFault {
            address: u64_at(16),
        },
        EVENT_FORK => {
            let mut b = [0u8; 4];
            b.copy_from_slice(&msg[8..12]);
            let fd = i32::from_ne_bytes(b);
            // SAFETY: the kernel installed this descriptor in our table for us.
            Event::Fork {
                child: unsafe { OwnedFd::from_raw_fd(fd) },
            }
        }
        EVENT_REMAP => Event::Remap {
            from: u64_at(8),
            to: u64_at(16),
            len: u64_at(24),
        },
        EVENT_REMOVE => Event::Remove {
            start: u64_at(8),
            end: u64_at(16),
        },
        EVENT_UNMAP => Event::Unmap {
            start: u64_at(8),
            end: u64_at(16),
        },
        _ => return None,
    })
}

/// Can this process make a userfaultfd, as a post-copy restore does? Makes one and closes
/// it.
pub fn available() -> io::Result<()> {
    // SAFETY: userfaultfd(2) takes flags only; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    let fd =
        i32::try_from(fd).map_err(|_| io::Error::other("userfaultfd returned no descriptor"))?;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just made by this call and nothing else owns it.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// One descriptor sent with `SCM_RIGHTS` (and a byte of data, as CRIU's `send_fd` does).
pub fn recv_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    match recv_message(sock.as_fd(), &mut byte)? {
        (0, _) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the restore closed its socket",
        )),
        (_, Some(fd)) => Ok(fd),
        (_, None) => Err(io::Error::other("no descriptor came with the message")),
    }
}

/// A connected pair of `SOCK_SEQPACKET` Unix sockets (messages keep their boundaries and
/// their descriptors), close-on-exec.
pub fn message_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair fills the two-int array.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one message (`data`), with descriptor `fd` attached if given.
pub fn send_message(sock: &OwnedFd, data: &[u8], fd: Option<&OwnedFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: zeroed msghdr, then every pointer set to live buffers.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &raw mut iov;
    hdr.msg_iovlen = 1;
    if let Some(fd) = fd {
        hdr.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure size computation.
        hdr.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
        // SAFETY: the control buffer is large enough for one int's message.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd.as_raw_fd());
        }
    }
    // SAFETY: hdr points at live buffers.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &raw const hdr, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message into `buf` (its length; 0 at the end), with its descriptor if
/// one came.
pub fn recv_message(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: zeroed msghdr, then every pointer set to live buffers.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &raw mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: hdr points at live buffers.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut hdr, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: the kernel filled the control buffer of hdr.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const hdr) };
    // SAFETY: cmsg, if not null, points into `control`; an SCM_RIGHTS message holds an int.
    let fd = unsafe {
        (!cmsg.is_null()
            && (*cmsg).cmsg_level == libc::SOL_SOCKET
            && (*cmsg).cmsg_type == libc::SCM_RIGHTS)
            .then(|| {
                OwnedFd::from_raw_fd(std::ptr::read_unaligned(
                    libc::CMSG_DATA(cmsg).cast::<libc::c_int>(),
                ))
            })
    };
    Ok((usize::try_from(n).unwrap_or(0), fd))
}

impl Userfault {
    /// The descriptor, to hand a duplicate to a guard.
    pub fn fd(&self) -> &OwnedFd {
        &self.0
    }
}
