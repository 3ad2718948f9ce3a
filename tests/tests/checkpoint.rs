//! Checkpoints outside migrations (issue: robust in normal operation): a workload's state
//! kept at its site in the content-addressed block store and restored from it, with real
//! CRIU and Redis.

use std::time::Duration;

use anyhow::Result;
use ferry_e2e::{wait_for, Options, TwoSites};
use serde_json::Value;

const PORT: u16 = 6379;
const ROUTE: &str = "0.0.0.0:16379";

fn checkpoint(sites: &TwoSites, flags: &[&str]) -> Result<Value> {
    let mut args = vec!["checkpoint", "redis"];
    args.extend_from_slice(flags);
    sites.a.ferry_json(&args)
}

#[test]
fn a_checkpoint_restores_the_dataset_it_took_and_the_next_one_stores_only_what_changed(
) -> Result<()> {
    let sites = TwoSites::start(Options::new("ckpt"))?;
    sites.run_redis_at_a("redis", PORT)?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "100000", "key", "100"])?;
    let first_digest = sites.a.redis(PORT, &["DEBUG", "DIGEST"])?;
    let first = checkpoint(&sites, &["--leave-running"])?;
    assert_eq!(first["left_running"], true, "{first}");
    // It runs on, and takes writes: 1 % of the keys change.
    for i in 0..1000 {
        sites
            .a
            .redis(PORT, &["SET", &format!("key:{}", i * 100), "changed"])?;
    }
    let second_digest = sites.a.redis(PORT, &["DEBUG", "DIGEST"])?;
    assert_ne!(second_digest, first_digest);
    // Without --leave-running: stopped into standby once its image is kept.
    let second = checkpoint(&sites, &[])?;
    let (bytes, new) = (
        second["bytes"].as_u64().unwrap_or(0),
        second["new_bytes"].as_u64().unwrap_or(u64::MAX),
    );
    eprintln!(
        "first checkpoint: {} bytes; second, after 1 % of the keys changed: {bytes} bytes, {new} new ({:.1} %)",
        first["bytes"],
        100.0 * new as f64 / bytes.max(1) as f64
    );
    assert!(bytes > 10_000_000, "{second}");
    // Every 100th key changed touches about one page in three of this small-valued
    // dataset (the new value, the freed old one, the entry): far from all of them.
    assert!(
        new * 2 < bytes,
        "the second checkpoint stored too much anew: {second}"
    );
    let w = &sites.a.ferry_json(&["workload", "ls"])?[0];
    assert_eq!(w["state"], "standby", "{w}");
    assert!(
        sites.a.redis(PORT, &["PING"]).is_err(),
        "standby still answers"
    );
    let list = sites.a.ferry_json(&["checkpoint", "ls", "redis"])?;
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");

    // Restored from the newest: the dataset as it was taken.
    sites.a.ferry(&["restore", "redis"])?;
    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, second_digest);
    // A running workload is not replaced unless asked.
    let first_id = first["id"].as_str().unwrap_or_default();
    let refused = sites
        .a
        .ferry_output(&["restore", "redis", "--from", first_id])?;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--replace"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    sites
        .a
        .ferry(&["restore", "redis", "--from", first_id, "--replace"])?;
    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, first_digest);
    sites.a.redis(PORT, &["SET", "after", "restore"])?;

    // Each workload keeps its newest three.
    for _ in 0..2 {
        checkpoint(&sites, &["--leave-running"])?;
    }
    let list = sites.a.ferry_json(&["checkpoint", "ls", "redis"])?;
    let ids: Vec<&str> = list
        .as_array()
        .map(|l| l.iter().filter_map(|c| c["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids.len(), 3, "{list}");
    assert!(!ids.contains(&first_id), "the oldest was kept: {list}");
    // What the dropped checkpoint alone used is freed: the newest still restores.
    sites.a.ferry(&["restore", "redis", "--replace"])?;
    wait_for("the restored copy", Duration::from_secs(10), || {
        sites.a.redis(PORT, &["GET", "after"]).ok()
    })?;
    Ok(())
}

#[test]
fn replicated_checkpoints_send_only_what_the_peer_lacks_and_recover_there_when_the_site_is_lost(
) -> Result<()> {
    let mut sites = TwoSites::start(Options::new("ckrepl"))?;
    sites.run_redis_at_a_with("redis", PORT, &["--replicate-to", "b", "--route", ROUTE])?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "100000", "key", "100"])?;
    let first = checkpoint(&sites, &["--leave-running"])?;
    assert!(first["replicated"]["error"].is_null(), "{first}");
    for i in 0..1000 {
        sites
            .a
            .redis(PORT, &["SET", &format!("key:{}", i * 100), "changed"])?;
    }
    let digest = sites.a.redis(PORT, &["DEBUG", "DIGEST"])?;
    let second = checkpoint(&sites, &["--leave-running"])?;
    assert!(second["replicated"]["error"].is_null(), "{second}");
    let sent = |c: &Value, what: &str| c["replicated"][what].as_u64().unwrap_or(0);
    eprintln!(
        "replicated to b: first checkpoint {} bytes of blocks ({} on the wire), second after 1 % of the keys changed {} ({} on the wire): {:.1} % of the first's blocks",
        sent(&first, "bytes"),
        sent(&first, "wire_bytes"),
        sent(&second, "bytes"),
        sent(&second, "wire_bytes"),
        100.0 * sent(&second, "bytes") as f64 / sent(&first, "bytes").max(1) as f64
    );
    assert!(sent(&first, "bytes") > 10_000_000, "{first}");
    assert!(
        sent(&second, "bytes") * 2 < sent(&first, "bytes"),
        "the second replication sent too much: {second}"
    );
    let at_b = sites.b.ferry_json(&["checkpoint", "ls", "redis"])?;
    let replicas: Vec<&Value> = at_b
        .as_array()
        .map(|l| l.iter().collect())
        .unwrap_or_default();
    assert_eq!(replicas.len(), 2, "{at_b}");
    assert!(replicas.iter().all(|c| c["from_site"] == "a"), "{at_b}");

    // While A answers, B refuses to take over: that is a migration's job.
    let refused = sites.b.ferry_output(&["workload", "recover", "redis"])?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("answers"));

    // A is cut off: its gateway is gone (its Redis still runs, unreachable from B's side).
    sites.a.crash_gateway();
    sites.b.ferry(&["workload", "recover", "redis"])?;
    assert_eq!(sites.b.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    let w = &sites.b.ferry_json(&["workload", "ls"])?[0];
    assert_eq!(w["restored_from"]["site"], "a", "{w}");
    sites.b.redis(PORT, &["SET", "after", "failover"])?;

    // A comes back: it learns the workload was recovered at B and stops its old copy.
    sites.start_gateway_a()?;
    wait_for("A to stop its old copy", Duration::from_secs(30), || {
        (sites.a.has_no_workloads().ok()? && sites.a.redis(PORT, &["PING"]).is_err()).then_some(())
    })?;
    assert_eq!(sites.b.redis(PORT, &["GET", "after"])?, "failover");
    // A's route now leads to B, as after a migration.
    let routes = sites.a.ferry_json(&["route", "ls"])?;
    assert_eq!(routes[0]["target"], "peer:b", "{routes}");
    let via_a = sites
        .a
        .exec("redis-cli", &["-p", "16379", "GET", "after"])?;
    assert_eq!(via_a.trim(), "failover");
    Ok(())
}

/// Sets `[hooks]` in a site's config (a TOML snippet of its keys; the file stays
/// owner-only) and restarts its gateway.
fn with_hooks(sites: &mut TwoSites, site: &str, hooks: &str) -> Result<()> {
    let config = if site == "a" {
        sites.a.config.clone()
    } else {
        sites.b.config.clone()
    };
    let mut cfg: toml::Table = toml::from_str(&std::fs::read_to_string(&config)?)?;
    cfg.insert("hooks".into(), toml::Value::Table(toml::from_str(hooks)?));
    std::fs::write(&config, toml::to_string(&cfg)?)?;
    if site == "a" {
        sites.a.crash_gateway();
        sites.start_gateway_a()
    } else {
        sites.b.crash_gateway();
        sites.start_gateway_b()
    }
}

#[test]
fn site_hooks_run_after_a_checkpoint_and_a_failing_pre_restore_hook_rolls_a_move_back() -> Result<()>
{
    let mut sites = TwoSites::start(Options::new("hooks"))?;
    let marks = sites.root.join("hook-marks");
    with_hooks(
        &mut sites,
        "a",
        &format!(
            "post_checkpoint = [\"sh\", \"-c\", \"echo $FERRY_HOOK {{workload}} {{id}} >> {}\"]",
            marks.display()
        ),
    )?;
    with_hooks(
        &mut sites,
        "b",
        "pre_restore = [\"sh\", \"-c\", \"echo the cache warmer is down >&2; exit 1\"]",
    )?;
    sites.run_redis_at_a("redis", PORT)?;
    sites.a.redis(PORT, &["SET", "k", "v"])?;
    // A checkpoint at A runs A's post-checkpoint hook.
    let c = checkpoint(&sites, &["--leave-running"])?;
    let id = c["id"].as_str().unwrap_or_default().to_string();
    let ran = std::fs::read_to_string(&marks)?;
    assert!(
        ran.contains(&format!("post_checkpoint redis {id}")),
        "{ran}"
    );
    // A move to B: B's pre-restore hook fails, so nothing is restored there and the
    // source runs on.
    let (ok, m) = sites.migrate_with("redis", "b", &["--mode", "stop-and-copy"])?;
    assert!(!ok, "{m}");
    assert_eq!(m["phase"], "rolled_back", "{m}");
    assert!(
        m["error"]
            .as_str()
            .unwrap_or("")
            .contains("the cache warmer is down"),
        "{m}"
    );
    assert_eq!(sites.a.redis(PORT, &["GET", "k"])?, "v");
    assert!(sites.b.has_no_workloads()?);
    // The source's post-checkpoint hook ran for the move too.
    let mid = m["id"].as_str().unwrap_or_default();
    wait_for("the hook for the move", Duration::from_secs(10), || {
        std::fs::read_to_string(&marks)
            .ok()?
            .contains(&format!("post_checkpoint redis {mid}"))
            .then_some(())
    })?;
    Ok(())
}

/// The process adapter's own hooks (`ferry:hooks`): the programs a workload's settings
/// name, run through the adapter's `exec` grant after a checkpoint at A and before the
/// restore at B; a failing pre-restore program rolls the next move back.
#[test]
fn adapter_hooks_run_the_workloads_programs_and_a_failing_one_refuses_the_restore() -> Result<()> {
    let dir = std::env::temp_dir().join("ferry-adapter-hook-script");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (script, marks, refuse) = (dir.join("hook"), dir.join("marks"), dir.join("refuse"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$@\" >> {marks}\nif [ -e {refuse} ]; then echo the warm-up is refused >&2; exit 3; fi\n",
            marks = marks.display(),
            refuse = refuse.display()
        ),
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    }
    let script = script.display().to_string();
    let mut opts = Options::new("adhook");
    opts.grants.push((
        "process".into(),
        ["log", "criu", "process", "exec"]
            .map(String::from)
            .to_vec(),
        vec![script.clone()],
    ));
    let sites = TwoSites::start(opts)?;
    let post = format!("post-checkpoint={script} post {{workload}} {{site}} {{id}}");
    let pre = format!("pre-restore={script} pre {{workload}} {{site}} {{id}}");
    sites.run_redis_at_a_with("redis", PORT, &["--setting", &post, "--setting", &pre])?;
    sites.a.redis(PORT, &["SET", "k", "v"])?;
    let c = checkpoint(&sites, &["--leave-running"])?;
    let id = c["id"].as_str().unwrap_or_default().to_string();
    let ran = std::fs::read_to_string(&marks).unwrap_or_default();
    assert!(
        ran.contains(&format!("post redis a {id}")),
        "{ran}\n{}",
        sites.logs()
    );
    // A move: B's adapter runs the pre-restore program before it restores.
    let (ok, m) = sites.migrate_with("redis", "b", &["--mode", "stop-and-copy"])?;
    assert!(ok, "{m}");
    let mid = m["id"].as_str().unwrap_or_default().to_string();
    let ran = std::fs::read_to_string(&marks)?;
    assert!(ran.contains(&format!("pre redis b {mid}")), "{ran}");
    assert_eq!(sites.b.redis(PORT, &["GET", "k"])?, "v");
    // Refused now: the move back rolls back, and B serves on.
    std::fs::write(&refuse, "")?;
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
    let m = ferry_e2e::migrate_record(&out.stdout)?;
    assert!(!out.status.success(), "{m}");
    assert_eq!(m["phase"], "rolled_back", "{m}");
    assert!(
        m["error"]
            .as_str()
            .unwrap_or("")
            .contains("the warm-up is refused"),
        "{m}"
    );
    assert_eq!(sites.b.redis(PORT, &["GET", "k"])?, "v");
    assert!(sites.a.has_no_workloads()?);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn periodic_checkpoints_are_taken_while_it_runs() -> Result<()> {
    let sites = TwoSites::start(Options::new("ckper"))?;
    sites.run_redis_at_a_with(
        "redis",
        PORT,
        &["--checkpoint-every", "5s", "--keep-checkpoints", "1"],
    )?;
    sites.a.redis(PORT, &["SET", "k", "v"])?;
    // Two taken one after the other, and only the newest kept each time.
    let mut seen = std::collections::BTreeSet::new();
    let list = wait_for("two periodic checkpoints", Duration::from_secs(30), || {
        let list = sites.a.ferry_json(&["checkpoint", "ls", "redis"]).ok()?;
        let ids: Vec<String> = list
            .as_array()?
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_string))
            .collect();
        assert!(ids.len() <= 1, "kept more than one: {list}");
        seen.extend(ids);
        (seen.len() >= 2).then_some(list)
    })?;
    assert!(
        list.as_array()
            .is_some_and(|l| l.iter().all(|c| c["left_running"] == true)),
        "{list}"
    );
    // It ran on throughout.
    assert_eq!(sites.a.redis(PORT, &["GET", "k"])?, "v");
    Ok(())
}

#[test]
fn a_runc_container_is_checkpointed_and_restored_at_its_site() -> Result<()> {
    let mut opts = Options::new("ckrunc");
    opts.adapters.push("runc".into());
    let sites = TwoSites::start(opts)?;
    let _cleanup = sites.run_redis_in_runc_at_a("redis", PORT)?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "20000", "key", "100"])?;
    let digest = sites.a.redis(PORT, &["DEBUG", "DIGEST"])?;
    checkpoint(&sites, &["--leave-running"])?;
    sites.a.redis(PORT, &["SET", "late", "write"])?;
    // Back to the checkpoint, in place of the running container.
    sites.a.ferry(&["restore", "redis", "--replace"])?;
    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    // And into standby and back.
    checkpoint(&sites, &[])?;
    assert!(sites.a.redis(PORT, &["PING"]).is_err());
    sites.a.ferry(&["workload", "start", "redis"])?;
    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    Ok(())
}

#[test]
fn a_podman_container_is_checkpointed_and_restored_at_its_site() -> Result<()> {
    let mut opts = Options::new("ckpod");
    opts.adapters.push("podman".into());
    let sites = TwoSites::start(opts)?;
    let _cleanup = sites.podman_redis("redis")?;
    let image = ferry_e2e::PODMAN_REDIS;
    sites.run_redis_in_podman_at_a("redis", PORT, image)?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "20000", "key", "100"])?;
    let digest = sites.a.redis(PORT, &["DEBUG", "DIGEST"])?;
    checkpoint(&sites, &[])?;
    assert!(
        sites.a.redis(PORT, &["PING"]).is_err(),
        "standby still answers"
    );
    sites.a.ferry(&["workload", "start", "redis"])?;
    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    Ok(())
}
