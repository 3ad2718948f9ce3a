//! Restart policies with the built-in decider (real CRIU and Redis): a crash by a signal
//! is restored from the newest checkpoint, a clean exit waits in standby until
//! `ferry workload start`, and a crash loop backs off.

use std::time::Duration;

use anyhow::Result;
use ferry_e2e::{wait_for, Options, TwoSites};
use serde_json::Value;

const PORT: u16 = 6379;

fn workload(sites: &TwoSites) -> Result<Value> {
    Ok(sites.a.ferry_json(&["workload", "ls"])?[0].clone())
}

#[test]
fn a_redis_killed_by_sigkill_is_restored_from_its_newest_checkpoint() -> Result<()> {
    let sites = TwoSites::start(Options::new("rstkil"))?;
    sites.run_redis_at_a_with("redis", PORT, &["--restart", "on-failure"])?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "20000", "key", "100"])?;
    sites.a.ferry(&["checkpoint", "redis", "--leave-running"])?;
    let digest = sites.a.redis(PORT, &["DEBUG", "DIGEST"])?;
    // Written after the checkpoint: lost with the crash.
    sites.a.redis(PORT, &["SET", "late", "write"])?;
    let pid = workload(&sites)?["pid"].as_i64().unwrap_or(0);
    assert!(pid > 0);
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    let w = wait_for("the restore by the policy", Duration::from_secs(30), || {
        let w = workload(&sites).ok()?;
        (w["state"] == "running" && w["pid"].as_i64() != Some(pid) && w["restarts"] == 1)
            .then_some(w)
    })?;
    assert_eq!(w["restored_from"], Value::Null, "{w}");
    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    assert_eq!(sites.a.redis(PORT, &["EXISTS", "late"])?, "0");
    Ok(())
}

#[test]
fn a_clean_exit_waits_in_standby_until_it_is_started() -> Result<()> {
    let sites = TwoSites::start(Options::new("rststb"))?;
    sites.run_redis_at_a_with("redis", PORT, &["--restart", "always"])?;
    sites.a.redis(PORT, &["SET", "kept", "in the checkpoint"])?;
    sites.a.ferry(&["checkpoint", "redis", "--leave-running"])?;
    // SHUTDOWN: Redis exits 0 on its own.
    let _ = sites.a.redis(PORT, &["SHUTDOWN", "NOSAVE"]);
    wait_for("standby", Duration::from_secs(20), || {
        (workload(&sites).ok()?["state"] == "standby").then_some(())
    })?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        workload(&sites)?["state"],
        "standby",
        "it came back unasked"
    );
    sites.a.ferry(&["workload", "start", "redis"])?;
    assert_eq!(sites.a.redis(PORT, &["GET", "kept"])?, "in the checkpoint");
    Ok(())
}

#[test]
fn a_crash_loop_backs_off() -> Result<()> {
    let sites = TwoSites::start(Options::new("rstlop"))?;
    sites.a.ferry(&[
        "workload",
        "run",
        "flaky",
        "--restart",
        "on-failure",
        "--",
        "sh",
        "-c",
        "sleep 0.5; exit 3",
    ])?;
    std::thread::sleep(Duration::from_secs(10));
    // Without a backoff it would have started about 20 times; with one (1 s, 2 s, 4 s…)
    // three times.
    let w = workload(&sites)?;
    let restarts = w["restarts"].as_u64().unwrap_or(0);
    eprintln!("a workload exiting 3 after 0.5 s, 10 s later: {restarts} restarts");
    assert!((2..=4).contains(&restarts), "{w}");
    Ok(())
}

#[test]
fn a_decider_plugin_changes_what_a_crash_leads_to() -> Result<()> {
    let sites = TwoSites::start(Options::new("rstdec"))?;
    ferry_e2e::install_decider("decider-standby", &sites.a.dir.join("plugins"))?;
    sites.run_redis_at_a_with(
        "redis",
        PORT,
        &["--restart", "on-failure", "--decider", "decider-standby"],
    )?;
    sites.a.redis(PORT, &["SET", "kept", "in the checkpoint"])?;
    sites.a.ferry(&["checkpoint", "redis", "--leave-running"])?;
    let pid = workload(&sites)?["pid"].as_i64().unwrap_or(0);
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    // The built-in decider would restore it; this one keeps it in standby.
    wait_for("standby by the decider", Duration::from_secs(20), || {
        (workload(&sites).ok()?["state"] == "standby").then_some(())
    })?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(workload(&sites)?["state"], "standby");
    assert!(sites.a.redis(PORT, &["PING"]).is_err());
    sites.a.ferry(&["workload", "start", "redis"])?;
    assert_eq!(sites.a.redis(PORT, &["GET", "kept"])?, "in the checkpoint");
    Ok(())
}
