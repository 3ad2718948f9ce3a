//! `ferry-volume-bench`: what moving a workload's disk state adds to a migration. For each
//! size, two stop-and-copy moves of Redis filled with random values to about that much
//! memory (values of FERRY_BENCH_VALUE bytes, default 1024), in the same run: without
//! persistence, and with its AOF (`appendfsync everysec`, rewritten once so its base file
//! holds the whole dataset) on a volume that B sees on its own tmpfs. A client writes 1,000
//! keys/s through A's route during each move. Prints the freeze, the volume's pre-copy and
//! delta, and checks that every acknowledged write is at B, in memory and in the AOF.
//! Needs root (namespaces, CRIU), like the tests.
//!
//! Usage: ferry-volume-bench [MIB…]   (default 256)

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_e2e::{wait_for, Options, TwoSites};
use serde_json::Value;

const PORT: u16 = 6379;
const ROUTE: &str = "0.0.0.0:16379";

fn main() -> Result<()> {
    let (sizes, value) = ferry_e2e::bench_sizes_and_value()?;
    println!("| memory | volume | requests / failed | freeze | volume pre-copy (bytes, ms) | volume delta (read, sent, ms) | acked writes at B (memory / AOF) |");
    println!("|---|---|---|---|---|---|---|");
    for mib in sizes {
        let keys = mib * 1024 * 1024 / (value + 80);
        for with_volume in [false, true] {
            let row = run(mib, keys, value, with_volume)?;
            println!("{row}");
        }
    }
    Ok(())
}

fn run(mib: u64, keys: u64, value: u64, with_volume: bool) -> Result<String> {
    let tag = format!("vb{}{mib}", if with_volume { "v" } else { "n" });
    let vol = std::env::temp_dir().join(format!("ferry-volume-bench-{mib}"));
    let _ = std::fs::remove_dir_all(&vol);
    std::fs::create_dir_all(&vol)?;
    let v = vol.display().to_string();
    let mut opts = Options::new(&tag[..tag.len().min(6)]);
    if with_volume {
        opts.b_mount_setup = Some(format!("mount -t tmpfs ferry-vbench {v}"));
    }
    let sites = TwoSites::start(opts)?;
    if with_volume {
        sites
            .a
            .run_redis_with_aof("redis", PORT, &v, &["--volume", &v, "--route", ROUTE])?;
    } else {
        sites.run_redis_at_a_with("redis", PORT, &["--route", ROUTE])?;
    }
    // Random values: the AOF's base file is as large as the dataset.
    ferry_e2e::redis_fill_random(&sites.a, &sites.root, PORT, keys, value as usize)?;
    let filled = sites.a.redis(PORT, &["DBSIZE"])?;
    if filled.trim() != keys.to_string() {
        bail!("Redis holds {filled} keys, not the {keys} written");
    }
    if with_volume {
        // The dataset goes into the AOF's base file: rewritten (again, if Redis was
        // already rewriting it while it filled) until the incremental file is small.
        wait_for("the AOF rewrite", Duration::from_secs(600), || {
            let info = sites.a.redis(PORT, &["INFO", "persistence"]).ok()?;
            let field = |name: &str| -> Option<u64> {
                info.lines()
                    .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))?
                    .parse()
                    .ok()
            };
            let busy =
                field("aof_rewrite_in_progress")? == 1 || field("aof_rewrite_scheduled")? == 1;
            // What the incremental files hold (not the base).
            let appended: u64 = std::fs::read_dir(vol.join("appendonlydir"))
                .ok()?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".incr.aof"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum();
            if busy {
                std::thread::sleep(Duration::from_millis(200));
                return None;
            }
            if appended < (1 << 20) {
                return Some(());
            }
            let _ = sites.a.redis(PORT, &["BGREWRITEAOF"]);
            std::thread::sleep(Duration::from_millis(200));
            None
        })?;
    }
    let acked = sites.root.join("acked.txt");
    let client = sites
        .a
        .start_load("redis", "127.0.0.1:16379", "1000", "12", "8", &acked)?;
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let (ok, m) = sites.migrate_with("redis", "b", &["--mode", "stop-and-copy"])?;
    let took = started.elapsed();
    let out = client.finish()?;
    if !ok {
        bail!("the move failed: {m}\n{}", sites.logs());
    }
    let acked: Vec<String> = std::fs::read_to_string(&acked)?
        .lines()
        .map(str::to_string)
        .collect();
    let in_memory = count_present(&sites, PORT, &acked)?;
    let on_disk = if with_volume {
        // A Redis started at B from the volume alone.
        sites.b.ferry(&["workload", "rm", "redis"])?;
        sites.b.run_redis_with_aof("check", PORT + 1, &v, &[])?;
        wait_for("the AOF loaded at B", Duration::from_secs(300), || {
            let info = sites.b.redis(PORT + 1, &["INFO", "persistence"]).ok()?;
            info.lines().any(|l| l.trim() == "loading:0").then_some(())
        })?;
        format!("{}", count_present(&sites, PORT + 1, &acked)?)
    } else {
        "-".into()
    };
    let _ = std::fs::remove_dir_all(&vol);
    let vols = &m["volumes"];
    let mb = |v: &Value| format!("{:.1} MB", v.as_u64().unwrap_or(0) as f64 / 1e6);
    Ok(format!(
        "| {mib} MiB | {} | {} / {} | {} ms | {} | {} |  {} / {} of {} |",
        if with_volume {
            "AOF on a volume"
        } else {
            "none"
        },
        out.summary["requests"],
        out.summary["failed"],
        m["timings"]["freeze_ms"],
        if with_volume {
            format!(
                "{}, {} ms",
                mb(&vols["precopy"]["sent_bytes"]),
                vols["precopy"]["ms"]
            )
        } else {
            "-".into()
        },
        if with_volume {
            format!(
                "{}, {}, {} ms",
                mb(&vols["delta"]["read_bytes"]),
                mb(&vols["delta"]["sent_bytes"]),
                m["timings"]["volume_delta_ms"]
            )
        } else {
            "-".into()
        },
        in_memory,
        on_disk,
        acked.len(),
    ) + &format!(
        " <!-- move {} ms; dump {} transfer {} restore {} -->",
        took.as_millis(),
        m["timings"]["dump_ms"],
        m["timings"]["transfer_ms"],
        m["timings"]["restore_ms"]
    ))
}

/// How many of `keys` the Redis at B on `port` holds.
fn count_present(sites: &TwoSites, port: u16, keys: &[String]) -> Result<u64> {
    let mut n = 0;
    for chunk in keys.chunks(500) {
        let mut args = vec!["EXISTS"];
        args.extend(chunk.iter().map(String::as_str));
        let answer = sites.b.redis(port, &args)?;
        n += answer
            .trim()
            .parse::<u64>()
            .with_context(|| format!("EXISTS on port {port} at b answered {answer:?}"))?;
    }
    Ok(n)
}
