//! The crate's only `unsafe` code and raw system calls: process trees in their own PID
//! namespace and session, signals and pidfds, cgroup membership set between fork and exec,
//! descriptor placement for CRIU, userfaultfd (post-copy pages), write tracking of a running
//! process (`dirty`), socket buffer sizes, and
//! loading our own precompiled
//! WebAssembly components. Everything above this module is safe Rust (the crate denies
//! `unsafe_code`; this module alone allows it, and each block says why it is sound).
#![allow(unsafe_code)]

pub mod dirty;
pub mod exec;
pub mod memory;
pub mod net;
pub mod process;
pub mod uffd;
pub mod wasm;
