//! `ferry-checkpoint-bench`: what a second checkpoint costs once a workload has one, at
//! its site's block store and on the link to the peer it replicates to. For each size:
//! Redis at site a (`--replicate-to b`) filled with `DEBUG POPULATE` (values of
//! FERRY_BENCH_VALUE bytes, default 1024), a first checkpoint, then 1 % of the keys
//! rewritten (every 100th, values of the same size), and a second checkpoint. Prints the
//! image, the bytes new to the store, the bytes replicated (blocks and wire), freeze and
//! store times. Needs root (namespaces, CRIU), like the tests.
//!
//! Usage: ferry-checkpoint-bench [MIB…]   (default 256)

use std::io::Write;
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use ferry_e2e::{Options, TwoSites};
use serde_json::Value;

const PORT: u16 = 6379;

fn main() -> Result<()> {
    let (sizes, value) = ferry_e2e::bench_sizes_and_value()?;
    println!("| memory | keys | checkpoint | image | new to the store | replicated (blocks / wire) | freeze | store |");
    println!("|---|---|---|---|---|---|---|---|");
    for mib in sizes {
        let keys = mib * 1024 * 1024 / (value + 80);
        let sites = TwoSites::start(Options::new(&format!("ckb{mib}")))?;
        sites.run_redis_at_a_with("redis", PORT, &["--replicate-to", "b"])?;
        sites.a.redis(
            PORT,
            &[
                "DEBUG",
                "POPULATE",
                &keys.to_string(),
                "key",
                &value.to_string(),
            ],
        )?;
        let first = checkpoint(&sites)?;
        rewrite_one_percent(&sites, keys, value)?;
        let second = checkpoint(&sites)?;
        for (n, c) in [("first", &first), ("second", &second)] {
            let r = &c["replicated"];
            println!(
                "| {mib} MiB | {keys} | {n} | {} | {} ({:.1} %) | {} / {} | {} ms | {} ms |",
                mb(&c["bytes"]),
                mb(&c["new_bytes"]),
                100.0 * num(&c["new_bytes"]) / num(&c["bytes"]).max(1.0),
                mb(&r["bytes"]),
                mb(&r["wire_bytes"]),
                c["freeze_ms"],
                c["store_ms"],
            );
        }
        println!(
            "| {mib} MiB | | second / first, replicated blocks | | | {:.1} % | | |",
            100.0 * num(&second["replicated"]["bytes"])
                / num(&first["replicated"]["bytes"]).max(1.0)
        );
    }
    Ok(())
}

fn checkpoint(sites: &TwoSites) -> Result<Value> {
    let c = sites
        .a
        .ferry_json(&["checkpoint", "redis", "--leave-running"])?;
    if !c["replicated"]["error"].is_null() {
        bail!("replication failed: {c}");
    }
    Ok(c)
}

/// Rewrites every 100th key with a new value of the same size, through one pipe.
fn rewrite_one_percent(sites: &TwoSites, keys: u64, value: u64) -> Result<()> {
    let mut child = sites
        .a
        .command("redis-cli")
        .args(["-p", &PORT.to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    {
        let stdin = child.stdin.as_mut().context("redis-cli stdin")?;
        let v = "x".repeat(value as usize);
        for i in (0..keys).step_by(100) {
            let k = format!("key:{i}");
            write!(
                stdin,
                "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
                k.len(),
                v.len()
            )?;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("redis-cli --pipe failed: {status}");
    }
    Ok(())
}

fn num(v: &Value) -> f64 {
    v.as_u64().unwrap_or(0) as f64
}

fn mb(v: &Value) -> String {
    format!("{:.1} MB", num(v) / 1e6)
}
