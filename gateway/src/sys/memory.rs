//! A running (or frozen) process's memory as `/proc` shows it to root: the private
//! anonymous regions CRIU's lazy dump leaves in the source, which of their pages are
//! present (`/proc/PID/pagemap`), and their bytes (`/proc/PID/mem`). Read while the
//! process runs, to send its pages ahead of a post-copy switch.

use std::io::Read;
use std::os::unix::fs::FileExt;

/// The page size CRIU's images and this kernel use.
pub const PAGE: u64 = 4096;

/// A run of present pages: its first address and how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Present {
    pub vaddr: u64,
    pub pages: u64,
}

/// Is this `/proc/PID/maps` line a private anonymous mapping CRIU would leave lazy
/// (heap, stack, anonymous memory), and its range?
fn lazy_region(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split_whitespace();
    let range = f.next()?;
    let perms = f.next()?;
    let (_offset, _dev, inode) = (f.next()?, f.next()?, f.next()?);
    let path = f.next().unwrap_or("");
    if !perms.ends_with('p') || !perms.starts_with('r') || inode != "0" {
        return None;
    }
    if !(path.is_empty() || path == "[heap]" || path.starts_with("[stack")) {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    ))
}

/// The present pages of `pid`'s private anonymous regions, in address order.
pub fn present_private_anon(pid: i32) -> std::io::Result<Vec<Present>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut runs: Vec<Present> = Vec::new();
    let mut entries = Vec::new();
    for (start, end) in maps.lines().filter_map(lazy_region) {
        let pages = (end - start) / PAGE;
        entries.resize(usize::try_from(pages * 8).unwrap_or(0), 0u8);
        pagemap.read_exact_at(&mut entries, start / PAGE * 8)?;
        for (i, e) in entries.chunks_exact(8).enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(e);
            // Bit 63: present in RAM (swapped pages are left to the fault path).
            if u64::from_ne_bytes(word) >> 63 == 0 {
                continue;
            }
            let vaddr = start + i as u64 * PAGE;
            match runs.last_mut() {
                Some(r) if r.vaddr + r.pages * PAGE == vaddr => r.pages += 1,
                _ => runs.push(Present { vaddr, pages: 1 }),
            }
        }
    }
    Ok(runs)
}

/// A process's memory, for reading its pages: `process_vm_readv` (one copy, no
/// per-page mapping of `/proc/PID/mem`, ~2.5x faster here), with `/proc/PID/mem`
/// kept open as the fallback and as the handle that names the process.
pub struct Memory {
    pid: i32,
    file: std::fs::File,
}

impl Memory {
    pub fn open(pid: i32) -> std::io::Result<Self> {
        let file = std::fs::File::open(format!("/proc/{pid}/mem"))?;
        Ok(Self { pid, file })
    }

    /// `pages` pages from `vaddr`.
    pub fn read(&self, vaddr: u64, pages: u64) -> std::io::Result<Vec<u8>> {
        let len = usize::try_from(pages * PAGE).map_err(std::io::Error::other)?;
        let mut buf = vec![0u8; len];
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: vaddr as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: `local` describes `buf`, which lives and is not otherwise borrowed for
        // the call; the kernel writes at most `len` bytes into it. `remote` names the
        // other process's addresses, which the kernel checks (it never dereferences them
        // here).
        let got = unsafe {
            libc::process_vm_readv(self.pid, &raw const local, 1, &raw const remote, 1, 0)
        };
        if usize::try_from(got).ok() != Some(len) {
            // A partial read (a page unmapped meanwhile) or a refusal: the slow path
            // says which.
            self.file.read_exact_at(&mut buf, vaddr)?;
        }
        Ok(buf)
    }
}

/// Memory this host can still give without swapping (`MemAvailable`), in bytes.
pub fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// `pid`'s id inside its own PID namespace (the last `NSpid` field): the id CRIU's images
/// and page requests name it by.
pub fn ns_pid(pid: i32) -> Option<u32> {
    let mut status = String::new();
    std::fs::File::open(format!("/proc/{pid}/status"))
        .ok()?
        .read_to_string(&mut status)
        .ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// The stack pointers of `pid`'s threads, as `/proc/PID/task/TID/syscall` shows them for
/// a stopped (or blocked) thread; threads it does not say it of are left out.
pub fn stack_pointers(pid: i32) -> Vec<u64> {
    super::process::threads(pid)
        .into_iter()
        .filter_map(|tid| std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok())
        .filter_map(|line| {
            // "NR ARG1..ARG6 SP PC", or "-1 SP PC" outside a system call.
            let fields: Vec<&str> = line.split_whitespace().collect();
            let sp = fields.len().checked_sub(2).and_then(|i| fields.get(i))?;
            u64::from_str_radix(sp.strip_prefix("0x")?, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_regions_are_private_anonymous_heap_and_stack() {
        assert_eq!(
            lazy_region(
                "55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]"
            ),
            Some((0x55d0_c0a0_0000, 0x55d0_c0a2_1000))
        );
        assert!(lazy_region("7f00-8f00 rw-p 00000000 00:00 0").is_some());
        assert!(lazy_region("7ffc0000-7ffd0000 rw-p 00000000 00:00 0   [stack]").is_some());
        // File-backed, shared, vdso and unreadable mappings are not CRIU's lazy pages.
        assert!(lazy_region("7f00-8f00 r--p 00000000 08:01 1234   /usr/lib/libc.so.6").is_none());
        assert!(lazy_region("7f00-8f00 rw-s 00000000 00:01 99   /dev/zero (deleted)").is_none());
        assert!(lazy_region("7f00-8f00 r-xp 00000000 00:00 0   [vdso]").is_none());
        assert!(lazy_region("7f00-8f00 ---p 00000000 00:00 0").is_none());
    }

    #[test]
    fn this_process_has_present_anonymous_pages_that_read_back() {
        let me = std::process::id() as i32;
        let mut v = vec![0x5au8; 64 * 1024];
        v[100] = 7;
        let runs = present_private_anon(me).expect("own maps");
        let addr = v.as_ptr() as u64 / PAGE * PAGE;
        let run = runs
            .iter()
            .find(|r| r.vaddr <= addr && addr < r.vaddr + r.pages * PAGE)
            .expect("the vector's first page is present");
        let mem = Memory::open(me).expect("own mem");
        // Two pages: the byte may sit past the first.
        let page = mem.read(addr, 2).expect("read");
        let off = v.as_ptr() as u64 - addr;
        assert_eq!(page[usize::try_from(off).unwrap() + 100], 7);
        assert!(run.pages >= 1);
        assert_eq!(ns_pid(me).map(|_| ()), Some(()));
        std::hint::black_box(&v);
    }
}
