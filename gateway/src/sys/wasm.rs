//! Loading a precompiled WebAssembly component from the gateway's own compile cache.

use std::path::Path;

use wasmtime::component::Component;
use wasmtime::Engine;

/// Loads a component this gateway serialized earlier.
///
/// Only for files under the gateway's own cache directory, named by the engine's
/// compatibility hash and the source component's BLAKE3 hash; a file that fails to load
/// is an error the caller answers by recompiling.
pub fn load_precompiled(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    // SAFETY: wasmtime requires the bytes to come from `Component::serialize` of a
    // compatible engine; the cache holds only what this gateway wrote, keyed by the
    // engine's compatibility hash, and wasmtime checks the header before use.
    unsafe { Component::deserialize_file(engine, path) }
}
