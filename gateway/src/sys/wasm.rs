//! Loading a precompiled WebAssembly component from the gateway's own compile cache.

use std::path::Path;

use wasmtime::component::Component;
use wasmtime::Engine;

/// Loads a component this gateway serialized earlier, from `bytes` the caller has read
/// from its cache and checked.
///
/// Only for bytes from files under the gateway's own cache directory (owned by this
/// user, writable by no one else), named by the engine's compatibility hash and the
/// source component's BLAKE3 hash, whose own BLAKE3 digest matches the one the gateway
/// wrote beside them; a failure is an error the caller answers by recompiling.
pub fn load_precompiled(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: wasmtime requires the bytes to come from `Component::serialize` of a
    // compatible engine; the caller checked they are what this gateway wrote (owner,
    // modes, digest), the name carries the engine's compatibility hash, and wasmtime
    // checks the header before use.
    unsafe { Component::deserialize(engine, bytes) }
}

/// Is `path` owned by this process's user and writable by no one else?
pub fn owned_and_private(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    std::fs::symlink_metadata(path).is_ok_and(|m| m.uid() == me && m.mode() & 0o022 == 0)
}
