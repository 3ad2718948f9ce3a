//! Clients keep working through a migration: a constant-rate Redis client talks to the
//! workload through site A's ingress while it moves to site B, and sees no failed request;
//! every write it got an answer for is at B afterwards.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_e2e::{Options, TwoSites};
use serde_json::Value;

const PORT: u16 = 6379;
const ROUTE: &str = "0.0.0.0:16379";

fn load_bin() -> Result<std::path::PathBuf> {
    Ok(ferry_e2e::ferry_bin()?.with_file_name("ferry-load"))
}

#[test]
fn clients_see_no_failed_request_while_redis_moves() -> Result<()> {
    let sites = TwoSites::start(Options::new("ingr"))?;
    sites.run_redis_at_a_with("redis", PORT, &["--route", ROUTE])?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "50000", "bulk", "100"])?;
    let acked = sites.root.join("acked.txt");
    // 500 requests/s for 4 s over 4 connections, through A's ingress.
    let client = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", sites.a.netns))
        .arg(load_bin()?)
        .args(["127.0.0.1:16379", "500", "4", "4"])
        .arg(&acked)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1200));
    let (ok, m) = sites.migrate("redis", "b")?;
    let out = client.wait_with_output()?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).context("client summary")?;
    eprintln!("client: {summary}\nmigration timings: {}", m["timings"]);
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["ok"], summary["requests"], "{summary}");

    // Every acknowledged write is at B.
    let keys: Vec<String> = std::fs::read_to_string(&acked)?
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(keys.len(), 2000);
    for chunk in keys.chunks(500) {
        let mut args = vec!["EXISTS"];
        args.extend(chunk.iter().map(String::as_str));
        assert_eq!(sites.b.redis(PORT, &args)?, chunk.len().to_string());
    }
    // B serves the route itself; A still forwards new clients to B through the peer link.
    let via_b = sites.b.exec("redis-cli", &["-p", "16379", "GET", "k0"])?;
    assert_eq!(via_b.trim(), "0");
    let via_a = sites.a.exec("redis-cli", &["-p", "16379", "GET", "k1"])?;
    assert_eq!(via_a.trim(), "1");
    Ok(())
}
