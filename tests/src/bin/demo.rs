//! `ferry-demo`: Ferry's main job on one machine. Builds two sites (network namespaces
//! joined by a veth pair), runs a gateway in each, starts Redis with data at site a, live
//! migrates it to site b with `ferry migrate`, and checks the dataset arrived intact.
//!
//! Usage: ferry-demo [KEYS] [VALUE_BYTES]   (default 200000 keys of 100 bytes)
//! FERRY_DEMO_RATE=1gbit caps the link from a to b (tc tbf), as a WAN link would.

use anyhow::{bail, Context, Result};
use ferry_e2e::{Options, TwoSites};

const PORT: u16 = 6379;

fn step(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let keys: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()
        .context("KEYS must be a number")?
        .unwrap_or(200_000);
    let value: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()
        .context("VALUE_BYTES must be a number")?
        .unwrap_or(100);

    step("Creating sites a (10.213.0.1) and b (10.213.0.2): network namespaces joined by a veth pair, one gateway each");
    let sites = TwoSites::start(Options::new("demo"))?;
    for s in [&sites.a, &sites.b] {
        println!("site {}  fingerprint {}", s.name, s.fingerprint);
    }
    if let Ok(rate) = std::env::var("FERRY_DEMO_RATE") {
        sites.a.limit_egress(&rate)?;
        println!("link a -> b limited to {rate}");
    }
    print!("{}", sites.a.ferry(&["peer", "ls"])?);

    step("Starting redis-server at site a through a's REST API");
    sites.run_redis_at_a("redis", PORT)?;
    print!("{}", sites.a.ferry(&["workload", "ls"])?);

    step(&format!("Writing {keys} keys of {value} bytes"));
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
    sites
        .a
        .redis(PORT, &["SET", "greeting", "written at site a"])?;
    let size_a = sites.a.redis(PORT, &["DBSIZE"])?;
    let digest_a = sites.a.redis(PORT, &["DEBUG", "DIGEST"])?;
    let mem = sites.a.redis(PORT, &["MEMORY", "STATS"])?;
    let used = mem
        .lines()
        .skip_while(|l| *l != "total.allocated")
        .nth(1)
        .unwrap_or("?")
        .to_string();
    println!("site a: DBSIZE {size_a}, DEBUG DIGEST {digest_a}, {used} bytes allocated");

    step("Migrating redis from a to b (ferry migrate redis --to b)");
    let status = sites
        .a
        .ferry_cmd(&["migrate", "redis", "--to", "b"])?
        .status()?;
    if !status.success() {
        bail!("migration failed\n{}", sites.logs());
    }

    step("Checking site b");
    let size_b = sites.b.redis(PORT, &["DBSIZE"])?;
    let digest_b = sites.b.redis(PORT, &["DEBUG", "DIGEST"])?;
    println!("site b: DBSIZE {size_b}, DEBUG DIGEST {digest_b}");
    println!(
        "GET greeting at b: {}",
        sites.b.redis(PORT, &["GET", "greeting"])?
    );
    print!("{}", sites.b.ferry(&["workload", "ls"])?);
    let left_at_a = sites.a.ferry_json(&["workload", "ls"])?;
    if (size_a, digest_a) != (size_b, digest_b) {
        bail!("dataset differs between a and b");
    }
    if left_at_a.as_array().is_some_and(|l| !l.is_empty()) {
        bail!("site a still lists workloads: {left_at_a}");
    }
    println!("\x1b[1;32mdataset identical at b; nothing left at a\x1b[0m");
    Ok(())
}
