//! Migrations driven through adapters: the engine reaches runtimes only through them, and
//! a misbehaving adapter fails the migration while the source keeps running with its data.

use anyhow::Result;
use ferry_e2e::{Options, TwoSites};

const PORT: u16 = 6379;

fn hostile_sites(tag: &str, call_timeout_ms: u64) -> Result<TwoSites> {
    let mut opts = Options::new(tag);
    opts.adapters.push("hostile".into());
    opts.grants.push((
        "hostile".into(),
        vec!["log".into(), "criu".into(), "process".into()],
        Vec::new(),
    ));
    opts.call_timeout_ms = Some(call_timeout_ms);
    TwoSites::start(opts)
}

fn misbehaving_checkpoint_keeps_the_source(tag: &str, mode: &str, reason: &str) -> Result<()> {
    let sites = hostile_sites(tag, 2_000)?;
    let setting = format!("mode={mode}");
    sites.run_redis_at_a_with(
        "redis",
        PORT,
        &["--runtime", "hostile", "--setting", &setting],
    )?;
    sites.a.redis(PORT, &["DEBUG", "POPULATE", "10000"])?;
    sites.a.redis(PORT, &["SET", "k", "v"])?;
    let digest = sites.a.redis(PORT, &["DEBUG", "DIGEST"])?;

    let (ok, m) = sites.migrate("redis", "b")?;
    assert!(!ok, "{m}");
    assert_eq!(m["phase"], "rolled_back", "{m}\n{}", sites.logs());
    let error = m["error"].as_str().unwrap_or_default();
    assert!(error.contains(reason), "error {error:?} lacks {reason:?}");

    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    sites.a.redis(PORT, &["SET", "after", "rollback"])?;
    assert_eq!(
        sites.a.ferry_json(&["workload", "ls"])?[0]["state"],
        "running"
    );
    assert!(sites.b.has_no_workloads()?);
    Ok(())
}

#[test]
fn a_trap_in_checkpoint_fails_the_migration_and_the_source_keeps_running() -> Result<()> {
    misbehaving_checkpoint_keeps_the_source("trap", "trap", "adapter hostile: checkpoint trapped")
}

#[test]
fn an_endless_checkpoint_hits_the_deadline_and_the_source_keeps_running() -> Result<()> {
    misbehaving_checkpoint_keeps_the_source("loop", "loop", "exceeded its 2000 ms deadline")
}

#[test]
fn adapters_are_listed_with_their_grants() -> Result<()> {
    let sites = hostile_sites("plist", 2_000)?;
    let list = sites.a.ferry_json(&["plugin", "ls"])?;
    let by_name = |n: &str| {
        list.as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == n)
            .cloned()
    };
    let process = by_name("process").expect("process adapter listed");
    assert_eq!(process["status"], "loaded");
    assert_eq!(process["runtimes"][0], "process");
    assert_eq!(
        process["granted"]["capabilities"],
        serde_json::json!(["log", "criu", "process"])
    );
    let hostile = by_name("hostile").expect("hostile adapter listed");
    assert!(hostile["asks"]
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c == "exec")));
    assert!(!hostile["granted"]["capabilities"]
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c == "exec")));
    let text = sites.a.ferry(&["plugin", "ls"])?;
    assert!(
        text.contains("process") && text.contains("loaded"),
        "{text}"
    );
    // A workload for a runtime no adapter serves is refused with what to do.
    let out = sites.a.ferry_output(&[
        "workload",
        "run",
        "x",
        "--runtime",
        "nosuch",
        "--",
        "sleep",
        "1",
    ])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no adapter serves runtime \"nosuch\""),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn redis_in_runc_moves_between_sites() -> Result<()> {
    let mut opts = Options::new("runc");
    opts.adapters.push("runc".into());
    let sites = TwoSites::start(opts)?;
    let _cleanup = sites.run_redis_in_runc_at_a("redis", PORT)?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "30000", "key", "64"])?;
    sites
        .a
        .redis(PORT, &["SET", "greeting", "from a container"])?;
    let before = sites.a.redis_dataset(PORT)?;

    let (ok, m) = sites.migrate("redis", "b")?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert_eq!(m["approach"], "orchestrator", "{m}");
    let after = sites.b.redis_dataset(PORT)?;
    assert_eq!(after, before);
    assert_eq!(
        sites.b.redis(PORT, &["GET", "greeting"])?,
        "from a container"
    );
    // The source container is gone from A's runc state; A lists no workload.
    let at_a = sites
        .a
        .exec("runc", &["--root", "/run/ferry-runc/a", "list", "-q"])?;
    assert!(
        !at_a.contains("a-redis"),
        "source container still there: {at_a}"
    );
    assert!(sites.a.has_no_workloads()?);
    let at_b = sites
        .b
        .exec("runc", &["--root", "/run/ferry-runc/b", "list", "-q"])?;
    assert!(at_b.contains("b-redis"), "{at_b}");
    sites.b.ferry(&["workload", "rm", "redis"])?;
    let at_b = sites
        .b
        .exec("runc", &["--root", "/run/ferry-runc/b", "list", "-q"])?;
    assert!(
        !at_b.contains("b-redis"),
        "removal left the container: {at_b}"
    );
    Ok(())
}

#[test]
fn redis_in_podman_moves_between_sites() -> Result<()> {
    let mut opts = Options::new("podman");
    opts.adapters.push("podman".into());
    let sites = TwoSites::start(opts)?;
    let _cleanup = sites.podman_redis("redis")?;
    let image = ferry_e2e::PODMAN_REDIS;
    sites.run_redis_in_podman_at_a("redis", PORT, image)?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "30000", "key", "64"])?;
    sites
        .a
        .redis(PORT, &["SET", "greeting", "from a podman container"])?;
    // A file the container wrote into its own root filesystem (its /data).
    sites.a.redis(PORT, &["SAVE"])?;
    let before = sites.a.redis_dataset(PORT)?;

    let (ok, m) = sites.migrate("redis", "b")?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert_eq!(m["approach"], "orchestrator");
    let after = sites.b.redis_dataset(PORT)?;
    assert_eq!(after, before);
    assert_eq!(
        sites.b.redis(PORT, &["GET", "greeting"])?,
        "from a podman container"
    );
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
    assert!(containers.lines().any(|c| c == "b-redis"), "{containers}");
    // The container's root filesystem changes came along (podman's rootfs diff).
    let mounted = ferry_e2e::run(std::process::Command::new("podman").args(["mount", "b-redis"]))?;
    let rdb = std::path::Path::new(mounted.trim()).join("data/dump.rdb");
    let size = std::fs::metadata(&rdb).map_or(0, |m| m.len());
    let _ = ferry_e2e::run(std::process::Command::new("podman").args(["umount", "b-redis"]));
    assert!(size > 1000, "{} at B holds {size} bytes", rdb.display());
    assert!(sites.a.has_no_workloads()?);
    // No CRIU firewall chain is left in the source's namespace.
    let rules = sites.a.exec("iptables", &["-S"]).unwrap_or_default();
    assert!(!rules.contains("CRIU"), "{rules}");
    Ok(())
}
