//! Builds Ferry's adapters (WebAssembly components, ../plugins) from source for the
//! end-to-end tests and the demo; no `.wasm` file is ever committed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let plugins = manifest_dir.join("../plugins");
    let wit = manifest_dir.join("../wit");
    for dir in [&plugins, &wit] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    for krate in [
        "sdk",
        "process",
        "runc",
        "podman",
        "docker",
        "redis",
        "http-state",
        "postgres",
        "hostile",
        "legacy",
        "legacy2",
        "decider-standby",
        "examples/minimal",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            plugins.join(krate).join("src").display()
        );
        println!(
            "cargo:rerun-if-changed={}",
            plugins.join(krate).join("ferry-plugin.toml").display()
        );
    }
    println!(
        "cargo:rerun-if-changed={}",
        plugins.join("README.md").display()
    );
    readme_shows_the_minimal_adapter(&plugins);
    let target_dir = plugins.join("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(plugins.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .expect("cannot run cargo to build the adapters");
    assert!(
        status.success(),
        "building the adapters failed; is the wasm32-wasip2 target installed? (scripts/setup adds it)"
    );
    println!(
        "cargo:rustc-env=FERRY_PLUGIN_BUILD_DIR={}",
        target_dir.join("wasm32-wasip2/release").display()
    );
    println!("cargo:rustc-env=FERRY_PLUGIN_SRC_DIR={}", plugins.display());
}

/// plugins/README.md shows the minimal adapter's files; the crate in
/// plugins/examples/minimal is built with the others, so what the README shows compiles
/// only while the two are the same.
fn readme_shows_the_minimal_adapter(plugins: &Path) {
    let read = |p: &Path| {
        std::fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
    };
    let readme = read(&plugins.join("README.md"));
    let example = plugins.join("examples/minimal");
    for (file, lang) in [
        ("Cargo.toml", "toml"),
        ("ferry-plugin.toml", "toml"),
        ("src/lib.rs", "rust"),
    ] {
        let block = format!("```{lang}\n{}```\n", read(&example.join(file)));
        assert!(
            readme.contains(&block),
            "plugins/README.md does not show plugins/examples/minimal/{file} as it is; keep the two identical"
        );
    }
}
