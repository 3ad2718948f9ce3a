//! End-to-end migrations between two real sites (network namespaces joined by a veth
//! pair), each with a real `ferry gateway`, moving a real `redis-server` with real CRIU.

use std::time::Duration;

use anyhow::Result;
use ferry_e2e::{wait_for, Options, TwoSites};
use serde_json::Value;

const PORT: u16 = 6379;

fn dataset(site: &ferry_e2e::Site) -> Result<(String, String)> {
    Ok((
        site.redis(PORT, &["DBSIZE"])?,
        site.redis(PORT, &["DEBUG", "DIGEST"])?,
    ))
}

fn workloads(site: &ferry_e2e::Site) -> Result<Vec<Value>> {
    Ok(site
        .ferry_json(&["workload", "ls"])?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn pid_alive(pid: i64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn redis_moves_between_sites_with_its_data() -> Result<()> {
    let sites = TwoSites::start(Options::new("move"))?;
    sites.run_redis_at_a("redis", PORT)?;
    sites.a.redis(PORT, &["SET", "greeting", "hello from a"])?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "50000", "key", "64"])?;
    let before = dataset(&sites.a)?;
    assert_eq!(before.0, "50001");
    let source_pid = workloads(&sites.a)?[0]["pid"].as_i64().expect("pid");

    let (ok, m) = sites.migrate("redis", "b")?;
    assert!(ok, "migration failed: {m}\n{}", sites.logs());
    assert_eq!(m["phase"], "completed");
    for t in [
        "freeze_ms",
        "dump_ms",
        "transfer_ms",
        "restore_ms",
        "total_ms",
    ] {
        assert!(m["timings"][t].is_u64(), "timing {t} missing: {m}");
    }
    let (moved, wire) = (
        m["bytes_moved"].as_u64().unwrap_or(0),
        m["bytes_on_wire"].as_u64().unwrap_or(0),
    );
    assert!(moved > 1_000_000, "{m}");
    // The link compresses (zstd by default): a Redis heap shrinks on the wire.
    assert!(
        wire > 0 && wire < moved,
        "{moved} bytes took {wire} on the wire"
    );
    // The page image travelled while CRIU wrote it.
    assert!(
        sites
            .a
            .log()
            .contains("page image streamed while the checkpoint wrote it"),
        "{}",
        sites.a.log()
    );

    // The dataset at B equals the one A had; B answers; A has nothing left.
    assert_eq!(dataset(&sites.b)?, before);
    assert_eq!(sites.b.redis(PORT, &["GET", "greeting"])?, "hello from a");
    sites.b.redis(PORT, &["SET", "after", "move"])?;
    assert_eq!(sites.b.redis(PORT, &["GET", "after"])?, "move");
    assert!(workloads(&sites.a)?.is_empty(), "A still lists workloads");
    wait_for(
        "the source process to be gone",
        Duration::from_secs(5),
        || (!pid_alive(source_pid)).then_some(()),
    )?;
    assert!(
        sites.a.redis(PORT, &["PING"]).is_err(),
        "A still answers on the port"
    );

    let at_b = workloads(&sites.b)?;
    assert_eq!(at_b.len(), 1);
    assert_eq!(at_b[0]["state"], "running");
    assert_eq!(at_b[0]["restored_from"]["site"], "a");

    // Both sides recorded the migration; the destination's copy of the image is gone.
    let id = m["id"].as_str().expect("id");
    let at_b_m = sites.b.ferry_json(&["migration", "show", id])?;
    assert_eq!(at_b_m["role"], "target");
    assert_eq!(at_b_m["phase"], "completed");
    assert!(!sites.b.dir.join("data/incoming").join(id).exists());
    assert!(!sites.a.dir.join("data/images").join(id).exists());

    // And it can come back.
    let (ok, back) = {
        let out = sites
            .b
            .ferry_output(&["--output", "json", "migrate", "redis", "--to", "a"])?;
        (
            out.status.success(),
            ferry_e2e::migrate_record(&out.stdout).unwrap_or(Value::Null),
        )
    };
    assert!(ok, "migration back failed: {back}\n{}", sites.logs());
    assert_eq!(sites.a.redis(PORT, &["GET", "after"])?, "move");
    assert_eq!(sites.a.redis(PORT, &["DBSIZE"])?, "50002");
    Ok(())
}

#[test]
fn restore_failure_resumes_source() -> Result<()> {
    // Site B looks able to restore (same files, same CRIU), but its CRIU fails the
    // restore: the move rolls back after the freeze.
    let mut opts = Options::new("rfail");
    opts.b_mount_setup = Some(ferry_e2e::fail_when("rfail", ferry_e2e::CRIU, "restore"));
    let sites = TwoSites::start(opts)?;
    sites.run_redis_at_a("redis", PORT)?;
    sites.a.redis(PORT, &["DEBUG", "POPULATE", "20000"])?;
    sites.a.redis(PORT, &["SET", "k", "v"])?;
    let before = dataset(&sites.a)?;

    let (ok, m) = sites.migrate("redis", "b")?;
    assert!(!ok, "migration should fail: {m}");
    assert_eq!(m["phase"], "rolled_back", "{m}\n{}", sites.logs());
    let reason = m["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("restore at site b failed"),
        "reason: {reason}"
    );
    assert!(
        m["timings"]["dump_ms"].is_u64(),
        "the source was checkpointed: {m}"
    );

    // The source runs again at A with its data; B holds nothing.
    assert_eq!(dataset(&sites.a)?, before);
    sites.a.redis(PORT, &["SET", "still", "writable"])?;
    let at_a = workloads(&sites.a)?;
    assert_eq!(at_a[0]["state"], "running");
    assert!(workloads(&sites.b)?.is_empty());
    let id = m["id"].as_str().expect("id");
    let at_b = sites.b.ferry_json(&["migration", "show", id])?;
    assert_eq!(at_b["phase"], "rolled_back");
    Ok(())
}

/// A destination that cannot restore the workload (another redis-server binary, too little
/// disk for the image) is refused before anything is frozen: 409 with every reason, the
/// plan shows them, no migration starts, and the source never stops serving.
#[test]
fn an_incompatible_destination_is_refused_before_the_freeze() -> Result<()> {
    let mut opts = Options::new("incomp");
    let incoming = std::env::temp_dir().join("ferry-e2e-incomp/b/data/incoming");
    opts.b_mount_setup = Some(format!(
        "mount --bind /usr/bin/true /usr/bin/redis-server; mkdir -p {d}; mount -t tmpfs -o size=1m ferry-incomp {d}",
        d = incoming.display()
    ));
    let sites = TwoSites::start(opts)?;
    sites.run_redis_at_a("redis", PORT)?;
    sites.a.redis(PORT, &["DEBUG", "POPULATE", "20000"])?;
    let before = dataset(&sites.a)?;
    let pid = workloads(&sites.a)?[0]["pid"].clone();

    let out = sites.a.ferry_output(&["migrate", "redis", "--to", "b"])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("incompatible_destination") || err.contains("cannot restore this workload"),
        "{err}"
    );
    // (redis-server is a link to redis-check-rdb, the file the process maps.)
    assert!(
        err.contains("/usr/bin/redis-check-rdb differs here"),
        "{err}\n{}",
        sites.logs()
    );
    assert!(err.contains("not enough free disk"), "{err}");
    // The plan says the same, per candidate.
    let plan = sites
        .a
        .ferry_json(&["migrate", "redis", "--to", "b", "--plan"])?;
    let reasons = plan["candidates"][0]["incompatible"].to_string();
    assert!(reasons.contains("/usr/bin/redis-check-rdb"), "{plan}");
    // Nothing started, nothing froze: the same process serves, with its data.
    let migrations = sites.a.ferry_json(&["migration", "ls"])?;
    assert_eq!(migrations.as_array().map(Vec::len), Some(0), "{migrations}");
    let now = &workloads(&sites.a)?[0];
    assert_eq!(now["pid"], pid);
    assert_eq!(now["state"], "running");
    assert_eq!(dataset(&sites.a)?, before);
    assert!(workloads(&sites.b)?.is_empty());
    Ok(())
}

#[test]
fn a_restore_failing_its_health_check_is_discarded_and_the_source_resumes() -> Result<()> {
    // B's health command fails (its redis-cli is `false`), though Redis restores there
    // and answers on its port: the copy is not healthy by the workload's own check.
    let mut opts = Options::new("health");
    opts.b_mount_setup = Some("mount --bind /usr/bin/false /usr/bin/redis-cli".into());
    let sites = TwoSites::start(opts)?;
    let check = format!("exec:redis-cli -p {PORT} ping");
    sites.run_redis_at_a_with("redis", PORT, &["--health", &check])?;
    sites.a.redis(PORT, &["SET", "k", "v"])?;
    let before = dataset(&sites.a)?;
    let shown = sites.a.ferry_json(&["workload", "show", "redis"])?;
    assert_eq!(shown["health"]["kind"], "exec", "{shown}");

    let (ok, m) = sites.migrate("redis", "b")?;
    assert!(!ok, "migration should fail: {m}");
    assert_eq!(m["phase"], "rolled_back", "{m}\n{}", sites.logs());
    let reason = m["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("not healthy") && reason.contains("redis-cli -p"),
        "reason: {reason}"
    );
    // B discarded its copy; A serves again with its data.
    assert!(workloads(&sites.b)?.is_empty());
    assert!(
        sites.b.redis(PORT, &["PING"]).is_err(),
        "B's copy still runs"
    );
    assert_eq!(dataset(&sites.a)?, before);
    sites.a.redis(PORT, &["SET", "still", "writable"])?;
    // A check that fails at the start refuses the workload there.
    let out = sites.a.ferry_output(&[
        "workload",
        "run",
        "never",
        "--port",
        "6399",
        "--health",
        "http:/ready",
        "--",
        "redis-server",
        "--port",
        "6399",
        "--save",
        "",
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not healthy") && err.contains("GET /ready"),
        "{err}"
    );
    Ok(())
}

#[test]
fn port_taken_at_destination_refuses_before_freeze() -> Result<()> {
    let sites = TwoSites::start(Options::new("port"))?;
    sites.run_redis_at_a("redis", PORT)?;
    sites.a.redis(PORT, &["SET", "k", "v"])?;
    // Something else already serves the port at B.
    let mut blocker = sites
        .b
        .command("redis-server")
        .args(["--port", "6379", "--save", "", "--daemonize", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    wait_for("the blocker at B", Duration::from_secs(10), || {
        sites.b.redis(PORT, &["PING"]).ok().filter(|r| r == "PONG")
    })?;

    let result = sites.migrate("redis", "b");
    let _ = blocker.kill();
    let _ = blocker.wait();
    let (ok, m) = result?;
    assert!(!ok, "migration should fail: {m}");
    assert_eq!(m["phase"], "rolled_back", "{m}");
    let reason = m["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("port 6379 is already in use"),
        "reason: {reason}"
    );
    assert!(
        m["timings"]["dump_ms"].is_null(),
        "the source must not be frozen: {m}"
    );
    assert_eq!(sites.a.redis(PORT, &["GET", "k"])?, "v");
    Ok(())
}

#[test]
fn an_operator_abort_rolls_back_before_the_switch_and_is_refused_after() -> Result<()> {
    // Uncompressed over a slow link, so the image transfer lasts.
    let mut opts = Options::new("abort");
    opts.compression = "none".into();
    let sites = TwoSites::start(opts)?;
    sites.run_redis_at_a("redis", 6391)?;
    sites
        .a
        .redis(6391, &["DEBUG", "POPULATE", "60000", "key", "1000"])?;
    let before = sites.a.redis_dataset(6391)?;
    sites.a.limit_egress("20mbit")?;
    let id = sites.start_migration("redis", "b", &["--mode", "stop-and-copy"])?;
    let phase = |site: &ferry_e2e::Site| site.migration_phase(&id);
    wait_for("the transfer", Duration::from_secs(60), || {
        (phase(&sites.a)? == "transferring").then_some(())
    })?;
    // The destination cannot abort it; the source can.
    let out = sites.b.ferry_output(&["migration", "abort", &id])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("abort it at its source"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sites.a.ferry(&["migration", "abort", &id])?;
    let end = wait_for("the rollback", Duration::from_secs(30), || {
        phase(&sites.a).filter(|p| p == "rolled_back" || p == "failed" || p == "completed")
    })?;
    assert_eq!(end, "rolled_back", "{}", sites.logs());
    let m = sites.a.ferry_json(&["migration", "show", &id])?;
    assert!(
        m["error"]
            .as_str()
            .unwrap_or("")
            .contains("aborted by the operator"),
        "{m}"
    );
    // The source runs on with its data; B lets go of its reservation when the source's
    // abort reaches it (on this slow link, behind the image data already sent); an ended
    // move cannot be aborted.
    assert_eq!(sites.a.redis_dataset(6391)?, before);
    wait_for(
        "B to let go of its reservation",
        Duration::from_secs(15),
        || sites.b.has_no_workloads().ok()?.then_some(()),
    )?;
    let out = sites.a.ferry_output(&["migration", "abort", &id])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already ended"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn a_second_move_to_a_site_sends_only_the_pages_it_lacks() -> Result<()> {
    let sites = TwoSites::start(Options::new("warm"))?;
    // Checks the warm move's record against the cold one's, and every key at B.
    let (_, warm) = sites.warm_redis_round(PORT, &["--mode", "stop-and-copy"])?;
    let show = sites
        .a
        .ferry(&["migration", "show", warm["id"].as_str().unwrap_or("")])?;
    assert!(show.contains("went as their digests"), "{show}");
    Ok(())
}

#[test]
fn a_migration_is_followed_through_its_events() -> Result<()> {
    let sites = TwoSites::start(Options::new("events"))?;
    sites.run_redis_at_a("redis", PORT)?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "50000", "key", "100"])?;
    let accepted = sites.a.ferry_json(&[
        "migrate",
        "redis",
        "--to",
        "b",
        "--no-wait",
        "--mode",
        "stop-and-copy",
    ])?;
    let id = accepted["id"].as_str().unwrap_or_default().to_string();
    // One JSON event per line, as they come, until the end.
    let text = sites
        .a
        .ferry(&["--output", "json", "migration", "watch", &id])?;
    let events: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    let progress: Vec<&Value> = events.iter().filter(|e| e["event"] == "progress").collect();
    assert!(!progress.is_empty(), "{text}");
    assert!(
        progress.iter().all(|e| e["data"]["id"] == id.as_str()),
        "{text}"
    );
    assert!(
        progress
            .iter()
            .any(|e| e["data"]["bytes_sent"].as_u64() > Some(0)),
        "{text}"
    );
    let last = events.last().cloned().unwrap_or_default();
    assert_eq!(last["event"], "end", "{text}");
    assert_eq!(last["data"]["phase"], "completed", "{text}");
    assert_eq!(sites.b.redis(PORT, &["DBSIZE"])?, "50000");
    // `ferry migrate --output json` streams the same events, one per line: the source
    // estimates what it will send (its memory) and the time left at the current rate.
    let out = sites.b.ferry_output(&[
        "--output",
        "json",
        "migrate",
        "redis",
        "--to",
        "a",
        "--mode",
        "stop-and-copy",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let events: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    let progress: Vec<&Value> = events.iter().filter(|e| e["event"] == "progress").collect();
    assert!(
        progress
            .iter()
            .any(|e| e["data"]["expected_bytes"].as_u64() > Some(5 << 20)),
        "no estimate of Redis's memory: {text}"
    );
    for e in progress.iter().map(|e| &e["data"]) {
        let read = e["bytes_read"].as_u64().unwrap_or(0);
        if let (Some(eta), Some(expected)) = (e["eta_ms"].as_u64(), e["expected_bytes"].as_u64()) {
            assert!(read <= expected || eta == 0, "{e}");
            assert!(eta < 60_000, "{e}");
        }
    }
    let end = ferry_e2e::migrate_record(&out.stdout)?;
    assert_eq!(end["phase"], "completed", "{text}");
    // Once sent, what was read of the image is the image.
    let last = progress
        .last()
        .map(|e| &e["data"])
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["bytes_read"], end["bytes_moved"], "{text}");
    assert_eq!(sites.a.redis(PORT, &["DBSIZE"])?, "50000");
    // Watching an ended migration prints its summary at once; an unknown one is a 404.
    let summary = sites.a.ferry(&["migration", "watch", &id])?;
    assert!(summary.contains("completed"), "{summary}");
    let out = sites.a.ferry_output(&["migration", "watch", "nosuch"])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no migration nosuch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
