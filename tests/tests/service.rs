//! Service-level migration, end to end: the `redis` service adapter makes a fresh Redis
//! at site B replicate site A's through a tunnel over the QUIC peer link, and promotes it
//! while A's ingress holds clients for the switch. Real gateways, real Redis, two
//! network namespaces with no other path between them than the peer link.

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_e2e::{wait_for, Options, TwoSites};
use serde_json::Value;

/// The port the default `redis` grant (`ferry init`) lets the adapter tunnel to.
const PORT: u16 = 6379;
const ROUTE: &str = "0.0.0.0:16379";

fn options(tag: &str) -> Options {
    let mut o = Options::new(tag);
    o.adapters = vec!["process".into(), "redis".into()];
    o
}

/// Is anything answering Redis on `PORT` at this site?
fn redis_answers(site: &ferry_e2e::Site) -> bool {
    site.redis(PORT, &["PING"]).is_ok_and(|r| r == "PONG")
}

#[test]
fn redis_moves_at_the_service_level_while_clients_write() -> Result<()> {
    let sites = TwoSites::start(options("svc"))?;
    sites.run_redis_at_a_with("redis", PORT, &["--route", ROUTE])?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "20000", "bulk", "100"])?;
    let acked = sites.root.join("acked.txt");
    // 500 requests/s for 12 s over 4 connections, through A's ingress; the replica's
    // full sync waits Redis's 5 s diskless delay, so the writes span the sync and the switch.
    let client = sites
        .a
        .start_load("redis", "127.0.0.1:16379", "500", "12", "4", &acked)?;
    std::thread::sleep(Duration::from_millis(1000));
    let (ok, m) = sites.migrate("redis", "b")?;
    let out = client.finish()?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert_eq!(m["approach"], "service", "{m}");
    assert!(m["timings"]["dump_ms"].is_null(), "a checkpoint ran: {m}");
    eprintln!(
        "migration: approach {}, timings {}, sync {}",
        m["approach"], m["timings"], m["sync"]
    );
    assert!(out.ok, "{}", out.stderr);
    let summary = out.summary;
    eprintln!("client: {summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["ok"], summary["requests"], "{summary}");
    // Every acknowledged write is at B, and B is a primary holding the whole dataset.
    let keys: Vec<String> = std::fs::read_to_string(&acked)?
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(keys.len(), 6000);
    for chunk in keys.chunks(500) {
        let mut args = vec!["EXISTS"];
        args.extend(chunk.iter().map(String::as_str));
        assert_eq!(sites.b.redis(PORT, &args)?, chunk.len().to_string());
    }
    let role = sites.b.redis(PORT, &["ROLE"])?;
    assert!(role.starts_with("master"), "{role}");
    let size: u64 = sites.b.redis(PORT, &["DBSIZE"])?.trim().parse()?;
    assert!(size >= 20_000 + 6_000, "{size}");
    // The source is gone: nothing answers at A, clients reach B through A's route.
    wait_for("the source to stop", Duration::from_secs(10), || {
        (!redis_answers(&sites.a)).then_some(())
    })?;
    let via_a = sites
        .a
        .exec("redis-cli", &["-p", "16379", "EXISTS", &keys[0]])?;
    assert_eq!(via_a.trim(), "1");
    let shown = sites
        .a
        .ferry(&["migration", "show", m["id"].as_str().unwrap_or("")])?;
    assert!(shown.contains("approach    service"), "{shown}");
    assert!(shown.contains("sync"), "{shown}");
    Ok(())
}

#[test]
fn the_plan_shows_both_approaches_and_why_service_wins() -> Result<()> {
    let sites = TwoSites::start(options("plan"))?;
    sites.run_redis_at_a("redis", PORT)?;
    let table = sites
        .a
        .ferry(&["migrate", "redis", "--to", "b", "--plan"])?;
    eprintln!("{table}");
    let line = |approach: &str| {
        table
            .lines()
            .find(|l| l.starts_with(approach))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line("container").contains("yes"), "{table}");
    assert!(line("service").contains("yes"), "{table}");
    assert!(table.contains("chosen: service"), "{table}");
    let plan = sites
        .a
        .ferry_json(&["migrate", "redis", "--to", "b", "--plan"])?;
    assert_eq!(
        plan["candidates"].as_array().map(Vec::len),
        Some(2),
        "{plan}"
    );
    // Nothing moved.
    assert!(redis_answers(&sites.a));
    assert_eq!(
        sites.a.ferry_json(&["migration", "ls"])?,
        serde_json::json!([])
    );
    Ok(())
}

#[test]
fn the_tunnel_refuses_a_port_the_site_did_not_grant() -> Result<()> {
    let sites = TwoSites::start(options("tport"))?;
    // 6380 is not in the redis adapter's tunnel_ports.
    sites.run_redis_at_a("redis", 6380)?;
    let (ok, m) = sites.migrate_with("redis", "b", &["--approach", "service"])?;
    assert!(!ok, "{m}");
    assert_eq!(m["phase"], "rolled_back", "{m}");
    let error = m["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("may not open a tunnel to port 6380"),
        "{error}\n{}",
        sites.logs()
    );
    // The source served throughout and still does; nothing runs at B.
    assert_eq!(sites.a.redis(6380, &["PING"])?, "PONG");
    assert!(sites.b.redis(6380, &["PING"]).is_err());
    Ok(())
}

#[test]
fn a_replica_that_cannot_sync_in_time_aborts_and_the_source_keeps_serving() -> Result<()> {
    let mut opts = options("slow");
    opts.sync_timeout_secs = Some(1);
    let sites = TwoSites::start(opts)?;
    // A source whose CONFIG command is disabled keeps Redis's default 5 s wait before a
    // diskless full sync (the adapter cannot lower it): longer than the 1 s bound.
    sites.run_redis_at_a_without_config("redis", PORT)?;
    sites.a.redis(PORT, &["SET", "before", "1"])?;
    let (ok, m) = sites.migrate_with("redis", "b", &["--approach", "service"])?;
    assert!(!ok, "{m}");
    assert_eq!(m["phase"], "rolled_back", "{m}");
    let error = m["error"].as_str().unwrap_or_default();
    assert!(error.contains("did not get in sync within 1 s"), "{error}");
    assert!(
        m["timings"]["freeze_ms"].is_null(),
        "the source was held: {m}"
    );
    assert_eq!(sites.a.redis(PORT, &["GET", "before"])?, "1");
    sites.a.redis(PORT, &["SET", "after", "2"])?;
    // The replica was discarded.
    wait_for("the replica to go", Duration::from_secs(10), || {
        (!redis_answers(&sites.b)).then_some(())
    })?;
    Ok(())
}

#[test]
fn a_destination_killed_during_the_sync_leaves_the_source_untouched() -> Result<()> {
    let mut sites = TwoSites::start(options("kill"))?;
    // CONFIG disabled: the source keeps Redis's 5 s wait before the full sync, so the
    // destination can be killed while it syncs.
    sites.run_redis_at_a_without_config("redis", PORT)?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "1000", "k", "10"])?;
    let out = sites.a.ferry(&[
        "--output",
        "json",
        "migrate",
        "redis",
        "--to",
        "b",
        "--no-wait",
    ])?;
    let m: Value = serde_json::from_str(&out)?;
    let id = m["id"].as_str().context("id")?.to_string();
    wait_for("the sync", Duration::from_secs(20), || {
        let m = sites.a.ferry_json(&["migration", "show", &id]).ok()?;
        (m["phase"] == "syncing").then_some(())
    })?;
    sites.b.crash_gateway();
    let m = wait_for("the source to give up", Duration::from_secs(30), || {
        let m = sites.a.ferry_json(&["migration", "show", &id]).ok()?;
        (m["phase"] == "rolled_back").then_some(m)
    })?;
    eprintln!("{m}");
    assert_eq!(sites.a.redis(PORT, &["DBSIZE"])?, "1000");
    // The restarted destination discards the replica its journal names.
    sites.start_gateway_b()?;
    wait_for("the replica to go", Duration::from_secs(15), || {
        (!redis_answers(&sites.b)).then_some(())
    })?;
    let at_b = wait_for("b to record the abort", Duration::from_secs(15), || {
        let m = sites.b.ferry_json(&["migration", "show", &id]).ok()?;
        (m["phase"] == "rolled_back").then_some(m)
    })?;
    assert!(at_b["error"].is_string(), "{at_b}");
    assert_eq!(
        sites.b.ferry_json(&["workload", "ls"])?,
        serde_json::json!([])
    );
    Ok(())
}

#[test]
fn redis_in_podman_moves_to_a_plain_process_through_the_service_level() -> Result<()> {
    let mut opts = options("xrt");
    opts.adapters.push("podman".into());
    let sites = TwoSites::start(opts)?;
    let _cleanup = sites.podman_redis("redis")?;
    let image = ferry_e2e::PODMAN_REDIS;
    sites.run_redis_in_podman_at_a("redis", PORT, image)?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "5000", "key", "64"])?;
    let before = sites.a.redis_dataset(PORT)?;
    // At B it runs as a plain process: another runtime, and a host path for the binary.
    let server = ferry_e2e::redis_process_args(PORT);
    let mut to_process = vec!["--runtime", "process", "--"];
    to_process.extend(server.iter().map(String::as_str));
    let mut plan_args = vec!["migrate", "redis", "--to", "b", "--plan"];
    plan_args.extend_from_slice(&to_process);
    let plan = sites.a.ferry(&plan_args)?;
    assert!(plan.contains("restores only under the runtime"), "{plan}");
    assert!(plan.contains("chosen: service"), "{plan}");
    let (ok, m) = sites.migrate_with("redis", "b", &to_process)?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert_eq!(m["approach"], "service", "{m}");
    assert_eq!(m["destination"]["runtime"], "process", "{m}");
    let after = sites.b.redis_dataset(PORT)?;
    assert_eq!(after, before);
    let at_b = sites.b.ferry_json(&["workload", "ls"])?;
    assert_eq!(at_b[0]["runtime"], "process", "{at_b}");
    // The source container is gone.
    let containers = ferry_e2e::run(std::process::Command::new("podman").args([
        "ps",
        "-a",
        "--format",
        "{{.Names}}",
    ]))?;
    assert!(
        !containers.lines().any(|c| c == "a-redis"),
        "source container left: {containers}"
    );
    Ok(())
}

#[test]
fn redis_in_runc_moves_at_the_service_level() -> Result<()> {
    let mut opts = options("svrunc");
    opts.adapters.push("runc".into());
    let sites = TwoSites::start(opts)?;
    let _cleanup = sites.run_redis_in_runc_at_a("redis", PORT)?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "20000", "key", "64"])?;
    sites.a.redis(PORT, &["SET", "greeting", "from runc"])?;
    let before = sites.a.redis_dataset(PORT)?;
    let (ok, m) = sites.migrate_with("redis", "b", &["--approach", "service"])?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert_eq!(m["approach"], "service", "{m}");
    assert!(m["timings"]["dump_ms"].is_null(), "a checkpoint ran: {m}");
    let after = sites.b.redis_dataset(PORT)?;
    assert_eq!(after, before);
    // B's instance is a fresh runc container of its own, now a primary.
    let role = sites.b.redis(PORT, &["ROLE"])?;
    assert!(role.starts_with("master"), "{role}");
    let at_b = sites
        .b
        .exec("runc", &["--root", "/run/ferry-runc/b", "list", "-q"])?;
    assert!(at_b.contains("b-redis"), "{at_b}");
    // The source container is gone from A.
    let at_a = sites
        .a
        .exec("runc", &["--root", "/run/ferry-runc/a", "list", "-q"])?;
    assert!(!at_a.contains("a-redis"), "source container left: {at_a}");
    assert!(!redis_answers(&sites.a), "Redis still answers at A");
    Ok(())
}
