//! A test workload: `ferry-aligned-stack PORT MIB` holds MIB MiB of pseudo-random memory,
//! answers each TCP connection on PORT with one line (a checksum of that memory, read
//! afresh), and keeps one thread asleep in `pause(2)` with a page-aligned stack pointer.
//!
//! Released CRIU's lazy dump counted every page as stack (so none as lazy) whenever one
//! thread's stack pointer was page-aligned; Ferry's CRIU patch keeps only the stack
//! pointers' own pages out of the lazy ones. A Redis main thread is so aligned in about
//! one start of 256; this program is so every time.

use std::io::Write;
use std::net::TcpListener;

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let usage = "usage: ferry-aligned-stack PORT MIB";
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().context(usage)?.parse().context(usage)?;
    let mib: usize = args.next().context(usage)?.parse().context(usage)?;
    let memory = filled(mib);
    std::thread::spawn(sleep_on_a_page_aligned_stack);
    let listener =
        TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("cannot listen on {port}"))?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let sum = memory.iter().fold(0u64, |a, w| a.rotate_left(5) ^ w);
        let _ = writeln!(conn, "{sum:016x}");
    }
    Ok(())
}

/// `mib` MiB of xorshift output: no page is zero, so every page is dumped.
fn filled(mib: usize) -> Vec<u64> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..mib << 17)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        })
        .collect()
}

/// Moves this thread's stack pointer to the top of a page-aligned stack of its own and
/// sleeps there in `pause(2)` for good (again after each interruption).
#[cfg(target_arch = "x86_64")]
fn sleep_on_a_page_aligned_stack() {
    const STACK: usize = 64 << 10;
    let Ok(layout) = std::alloc::Layout::from_size_align(STACK, 4096) else {
        return;
    };
    // SAFETY (why unsafe is allowed here): the stack is allocated, never freed, and this
    // thread never returns into Rust code after moving onto it.
    #[allow(unsafe_code)]
    unsafe {
        let base = std::alloc::alloc(layout);
        if base.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        let top = base as usize + STACK;
        std::arch::asm!(
            "mov rsp, {top}",
            "2:",
            "mov eax, 34", // SYS_pause
            "syscall",
            "jmp 2b",
            top = in(reg) top,
            options(noreturn)
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn sleep_on_a_page_aligned_stack() {
    compile_error!("ferry-aligned-stack sets its stack pointer in x86_64 assembly");
}
