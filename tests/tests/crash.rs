//! The migration invariant across gateway crashes: the service runs at exactly one site,
//! or is frozen at the source with a complete image, until the destination confirms.
//! The link is slowed (tbf) so the crash lands while the image is in flight.

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_e2e::{slow_restore, wait_for, OneCopy, Options, Outage, Site, TwoSites, CRIU};
use serde_json::Value;

const PORT: u16 = 6379;

/// Redis at A with 100,000 keys (~20 MB); its dataset digest and pid.
fn redis_with_data(sites: &TwoSites) -> Result<(String, i64)> {
    sites.run_redis_at_a("redis", PORT)?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "100000", "key", "100"])?;
    let digest = sites.a.redis(PORT, &["DEBUG", "DIGEST"])?;
    let pid = sites.a.ferry_json(&["workload", "ls"])?[0]["pid"]
        .as_i64()
        .unwrap_or(0);
    Ok((digest, pid))
}

/// Redis at A with ~20 MB of data, a 4 Mbit/s link A→B, and a migration under way in
/// its transfer phase. Returns (migration id, source pid, dataset digest).
fn start_slow_migration(sites: &TwoSites) -> Result<(String, i64, String)> {
    let (digest, pid) = redis_with_data(sites)?;
    // The pages compress to about 2 MB on the wire: at 4 Mbit/s the transfer lasts some
    // 4 s, so a fault a test brings about lands in it (at 40 Mbit/s it took 0.4 s).
    sites.a.limit_egress("4mbit")?;
    let id = start_move_until(sites, &sites.a, "transferring", Duration::from_secs(20))?;
    Ok((id, pid, digest))
}

fn phase(site: &Site, id: &str) -> Result<Value> {
    Ok(site.ferry_json(&["migration", "show", id])?["phase"].clone())
}

/// Starts moving `redis` to B without waiting; returns its id once `site` reports
/// `wanted` for it.
fn start_move_until(
    sites: &TwoSites,
    site: &Site,
    wanted: &str,
    within: Duration,
) -> Result<String> {
    let m = sites
        .a
        .ferry_json(&["migrate", "redis", "--to", "b", "--no-wait"])?;
    let id = m["id"].as_str().unwrap_or_default().to_string();
    wait_for(&format!("the {wanted} phase"), within, || {
        (phase(site, &id).ok()? == wanted).then_some(())
    })?;
    Ok(id)
}

/// After a fault: waits (`within`) for the move `id` to end at A, checks the dataset
/// where it ended up and that exactly one site keeps the workload. Returns the end phase.
fn ends_with_one_copy(sites: &TwoSites, id: &str, digest: &str, within: Duration) -> Result<Value> {
    let end = wait_for("the move to end at A", within, || {
        let p = phase(&sites.a, id).ok()?;
        (p == "rolled_back" || p == "completed").then_some(p)
    })
    .with_context(|| sites.logs())?;
    let at = if end == "completed" {
        &sites.b
    } else {
        &sites.a
    };
    assert_eq!(at.redis(PORT, &["DEBUG", "DIGEST"])?, digest, "{end}");
    wait_for("one copy", within, || {
        let (a, b) = (
            sites.a.has_no_workloads().ok()?,
            sites.b.has_no_workloads().ok()?,
        );
        (a != b).then_some(())
    })
    .with_context(|| sites.logs())?;
    Ok(end)
}

/// After a rollback of move `id`: the source (`pid`) runs again, its clients are not
/// held, and neither site keeps anything of the move (B's received files, A's image).
fn released_everything(sites: &TwoSites, id: &str, pid: i64) -> Result<()> {
    assert_ne!(
        Site::process_state(pid),
        Some('T'),
        "the source stays frozen"
    );
    let w = &sites.a.ferry_json(&["workload", "ls"])?[0];
    assert_eq!(w["state"], "running", "{w}");
    wait_for(
        "B to drop what it received",
        Duration::from_secs(20),
        || (!sites.b.dir.join("data/incoming").join(id).exists()).then_some(()),
    )
    .with_context(|| sites.logs())?;
    assert!(sites.b.has_no_workloads()?);
    assert!(!sites.a.dir.join("data/images").join(id).exists());
    Ok(())
}

/// Ends a [`OneCopy`] watch: never two copies, and a copy served at some point.
fn served_by_one_copy(watch: OneCopy) -> Result<()> {
    let answered = watch.finish()?;
    anyhow::ensure!(answered > 0, "the watch never saw a serving copy");
    Ok(())
}

/// Does `site` run a copy of a workload (a listed workload with a process)?
fn runs_a_copy(site: &Site) -> Result<bool> {
    let list = site.ferry_json(&["workload", "ls"])?;
    Ok(list
        .as_array()
        .is_some_and(|l| l.iter().any(|w| !w["pid"].is_null())))
}

#[test]
fn source_gateway_crash_during_transfer_rolls_back_on_restart() -> Result<()> {
    let mut sites = TwoSites::start(Options::new("crasha"))?;
    let (id, pid, digest) = start_slow_migration(&sites)?;
    let watch = OneCopy::watch(&sites, PORT);

    sites.a.crash_gateway();
    // Gateway gone, migration unfinished: the source is frozen, not running, not lost.
    assert_eq!(
        Site::process_state(pid),
        Some('T'),
        "source must stay frozen"
    );
    assert!(
        sites.b.ferry_json(&["workload", "ls"])?[0]["pid"].is_null(),
        "B must not run it"
    );

    sites.start_gateway_a()?;
    wait_for("the rollback", Duration::from_secs(30), || {
        (phase(&sites.a, &id).ok()? == "rolled_back").then_some(())
    })?;
    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    assert_eq!(Site::process_state(pid).map(|s| s != 'T'), Some(true));
    let m = sites.a.ferry_json(&["migration", "show", &id])?;
    assert!(
        m["error"].as_str().unwrap_or("").contains("restarted"),
        "{m}"
    );
    // B dropped what it had received.
    wait_for("B to abort", Duration::from_secs(15), || {
        (phase(&sites.b, &id).ok()? == "rolled_back").then_some(())
    })?;
    assert!(sites.b.has_no_workloads()?);
    assert!(!sites.b.dir.join("data/incoming").join(&id).exists());
    served_by_one_copy(watch)?;
    Ok(())
}

#[test]
fn destination_gateway_crash_during_transfer_resumes_source() -> Result<()> {
    let mut sites = TwoSites::start(Options::new("crashb"))?;
    let (id, pid, digest) = start_slow_migration(&sites)?;
    let watch = OneCopy::watch(&sites, PORT);

    sites.b.crash_gateway();
    // A notices the dead link, and since no restore was requested, resumes the source.
    wait_for("the rollback at A", Duration::from_secs(40), || {
        (phase(&sites.a, &id).ok()? == "rolled_back").then_some(())
    })?;
    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    assert_ne!(Site::process_state(pid), Some('T'));

    // B, restarted, aborts what its journal says was half received.
    sites.start_gateway_b()?;
    assert_eq!(phase(&sites.b, &id)?, "rolled_back");
    assert!(sites.b.has_no_workloads()?);
    assert!(!sites.b.dir.join("data/incoming").join(&id).exists());
    // And the next migration goes through.
    sites
        .a
        .exec("tc", &["qdisc", "del", "dev", &sites.a.dev, "root"])?;
    let (ok, m) = sites.migrate("redis", "b")?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert_eq!(sites.b.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    served_by_one_copy(watch)?;
    Ok(())
}

#[test]
fn sigterm_of_either_gateway_during_a_transfer_leaves_one_copy_and_a_next_move_succeeds(
) -> Result<()> {
    let mut sites = TwoSites::start(Options::new("sigtrm"))?;
    let (id, pid, digest) = start_slow_migration(&sites)?;
    let watch = OneCopy::watch(&sites, PORT);
    // The destination's gateway is asked to stop mid-transfer (SIGTERM): nothing was
    // restored there, so the source resumes, and B, restarted, has dropped its part.
    sites.b.stop_gateway();
    wait_for("the rollback at A", Duration::from_secs(60), || {
        (phase(&sites.a, &id).ok()? == "rolled_back").then_some(())
    })
    .with_context(|| sites.logs())?;
    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    assert_ne!(
        Site::process_state(pid),
        Some('T'),
        "the source stays frozen"
    );
    sites.start_gateway_b()?;
    wait_for("B to drop its part", Duration::from_secs(20), || {
        (phase(&sites.b, &id).ok()? == "rolled_back" && sites.b.has_no_workloads().ok()?)
            .then_some(())
    })
    .with_context(|| sites.logs())?;

    // Then the source's gateway, during the next move's transfer. It drains the move (up
    // to 10 s) before it goes; after its restart the move has ended one way or the other,
    // with exactly one copy.
    let id = start_move_until(&sites, &sites.a, "transferring", Duration::from_secs(20))?;
    sites.a.stop_gateway();
    let source = Site::process_state(pid).filter(|s| *s != 'Z');
    assert!(
        !(runs_a_copy(&sites.b)? && source.is_some()),
        "two copies: B runs one and the source is {source:?}"
    );
    sites.start_gateway_a()?;
    ends_with_one_copy(&sites, &id, &digest, Duration::from_secs(60))?;
    served_by_one_copy(watch)?;
    Ok(())
}

#[test]
fn a_link_lost_for_15_s_during_a_transfer_leaves_one_copy_and_a_next_move_succeeds() -> Result<()> {
    let sites = TwoSites::start(Options::new("link15"))?;
    let (id, pid, digest) = start_slow_migration(&sites)?;
    let watch = OneCopy::watch(&sites, PORT);
    {
        let _outage = Outage::start(&sites.a, &sites.b.addr)?;
        // No restore was asked: B runs nothing, and the source is frozen or runs again.
        for _ in 0..15 {
            std::thread::sleep(Duration::from_secs(1));
            assert!(!runs_a_copy(&sites.b)?, "B runs a copy during the outage");
            assert!(Site::process_state(pid).is_some(), "the source is gone");
        }
    }
    let end = ends_with_one_copy(&sites, &id, &digest, Duration::from_secs(60))?;
    eprintln!("a 15 s link outage mid-transfer: the move ended {end}");
    served_by_one_copy(watch)?;
    if end == "rolled_back" {
        sites
            .a
            .exec("tc", &["qdisc", "del", "dev", &sites.a.dev, "root"])?;
        let (ok, m) = sites.migrate("redis", "b")?;
        assert!(ok, "{m}\n{}", sites.logs());
        assert_eq!(sites.b.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    }
    Ok(())
}

#[test]
fn workload_held_by_an_unknown_migration_is_released_on_restart() -> Result<()> {
    // The gateway stopped between journaling the workload as held by a migration and
    // journaling the migration itself: the journal names a migration that does not exist.
    let mut sites = TwoSites::start(Options::new("recon"))?;
    sites.run_redis_at_a("redis", PORT)?;
    sites.a.redis(PORT, &["SET", "k", "v"])?;
    sites.a.stop_gateway();
    let record = sites.a.dir.join("data/journal/workloads/redis.json");
    let mut w: Value = serde_json::from_str(&std::fs::read_to_string(&record)?)?;
    w["state"] = "migrating".into();
    w["migration"] = "00000000deadbeef".into();
    std::fs::write(&record, serde_json::to_vec(&w)?)?;

    sites.start_gateway_a()?;
    let w = &sites.a.ferry_json(&["workload", "ls"])?[0];
    assert_eq!(w["state"], "running", "{w}");
    assert!(w["migration"].is_null(), "{w}");
    // It is free to move again.
    let (ok, m) = sites.migrate("redis", "b")?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert_eq!(sites.b.redis(PORT, &["GET", "k"])?, "v");
    Ok(())
}

#[test]
fn source_gateway_killed_mid_dump_leaves_the_source_running_after_its_restart() -> Result<()> {
    // The image (~660 MB) needs room at both sites whatever the machine's free disk.
    let mut sites = TwoSites::start(Options {
        disk_mb: Some(2048),
        ..Options::new("crdump")
    })?;
    sites.run_redis_at_a("redis", PORT)?;
    // Enough memory that the dump lasts well beyond the moment the gateway dies.
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "600000", "key", "1000"])?;
    let digest = sites.a.redis(PORT, &["DEBUG", "DIGEST"])?;
    let watch = OneCopy::watch(&sites, PORT);
    let pid = sites.a.ferry_json(&["workload", "ls"])?[0]["pid"]
        .as_i64()
        .unwrap_or(0);
    // The dump of this source's tree, as the process list shows it.
    let dump = format!("criu dump -t {pid} ");
    let dumping = || {
        ferry_e2e::run(std::process::Command::new("pgrep").args(["-f", &dump]))
            .is_ok_and(|out| !out.trim().is_empty())
    };
    let id = sites.start_migration("redis", "b", &["--mode", "stop-and-copy"])?;
    wait_for("the checkpoint", Duration::from_secs(20), || {
        (sites.a.migration_phase(&id)? == "checkpointing").then_some(())
    })?;
    sites.a.crash_gateway();
    eprintln!("criu dump still running after the crash: {}", dumping());
    // Restarted, the gateway waits for the dump the old one left, then rolls back: the
    // source runs with its data (not left stopped by a late --leave-stopped).
    sites.start_gateway_a()?;
    wait_for("the rollback", Duration::from_secs(90), || {
        (sites.a.migration_phase(&id)? == "rolled_back").then_some(())
    })?;
    assert!(!dumping(), "the rollback did not wait for the dump");
    assert_ne!(
        Site::process_state(pid),
        Some('T'),
        "the source was left stopped"
    );
    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    served_by_one_copy(watch)?;
    Ok(())
}

/// A site's journal directory on a small tmpfs of its own while it lives (unmounted after).
struct SmallJournal {
    journal: std::path::PathBuf,
    disk: std::path::PathBuf,
}

impl SmallJournal {
    fn mount(sites: &TwoSites, site: &Site) -> Result<Self> {
        let journal = site.dir.join("data/journal");
        let disk = sites.root.join(format!("small-disk-{}", site.name));
        std::fs::create_dir_all(&disk)?;
        run_sh(&format!(
            "mount -t tmpfs -o size=4m tmpfs {}",
            disk.display()
        ))?;
        run_sh(&format!(
            "cp -a {}/. {}/",
            journal.display(),
            disk.display()
        ))?;
        run_sh(&format!(
            "mount --bind {} {}",
            disk.display(),
            journal.display()
        ))?;
        Ok(Self { journal, disk })
    }

    /// Fills the disk to the last byte.
    fn fill(&self) {
        let _ = std::process::Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}/fill", self.disk.display()))
            .args(["bs=64k", "status=none"])
            .status();
    }

    /// Frees what [`Self::fill`] took.
    fn free(&self) -> Result<()> {
        Ok(std::fs::remove_file(self.disk.join("fill"))?)
    }
}

impl Drop for SmallJournal {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.journal)
            .status();
        let _ = std::process::Command::new("umount")
            .arg(&self.disk)
            .status();
    }
}

#[test]
fn a_full_disk_under_the_sources_journal_rolls_back_and_releases_everything() -> Result<()> {
    let sites = TwoSites::start(Options::new("dskful"))?;
    let disk = SmallJournal::mount(&sites, &sites.a)?;
    let (id, pid, digest) = start_slow_migration(&sites)?;
    let watch = OneCopy::watch(&sites, PORT);
    // The journal can take no more: the next step's record fails.
    disk.fill();
    wait_for("the rollback at A", Duration::from_secs(60), || {
        let p = phase(&sites.a, &id).ok()?;
        (p == "rolled_back" || p == "failed").then_some(p)
    })?;
    let m = sites.a.ferry_json(&["migration", "show", &id])?;
    assert_eq!(m["phase"], "rolled_back", "{m}\n{}", sites.logs());
    assert!(
        m["error"].as_str().unwrap_or("").contains("not journaled"),
        "{m}"
    );
    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    released_everything(&sites, &id, pid)?;
    served_by_one_copy(watch)?;
    Ok(())
}

#[test]
fn a_full_disk_under_the_destinations_journal_refuses_the_move_and_keeps_nothing() -> Result<()> {
    let sites = TwoSites::start(Options::new("dskfub"))?;
    let disk = SmallJournal::mount(&sites, &sites.b)?;
    let (digest, pid) = redis_with_data(&sites)?;
    let watch = OneCopy::watch(&sites, PORT);
    // B can record nothing: the move cannot start there (its first record fails), and
    // the source runs on. (Filled mid-move instead, the outcome depends on which of B's
    // records comes next: a restore already journaled completes, with one copy.)
    disk.fill();
    let (ok, m) = sites.migrate("redis", "b")?;
    assert!(!ok, "{m}");
    assert!(
        m["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left")),
        "{m}\n{}",
        sites.logs()
    );
    let id = m["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    released_everything(&sites, &id, pid)?;
    served_by_one_copy(watch)?;
    // Room again at B: the next move goes through.
    disk.free()?;
    next_move_succeeds(&sites, &digest)?;
    Ok(())
}

#[test]
fn an_old_journal_put_back_at_the_destination_never_makes_two_copies() -> Result<()> {
    let mut opts = Options::new("oldjnl");
    opts.b_mount_setup = Some(slow_restore("oldjnl", CRIU));
    let mut sites = TwoSites::start(opts)?;
    sites.run_redis_at_a("redis", PORT)?;
    sites.a.redis(PORT, &["SET", "k", "v"])?;
    let pid = sites.a.ferry_json(&["workload", "ls"])?[0]["pid"]
        .as_i64()
        .unwrap_or(0);
    // B's journal as it was before the migration.
    let journal = sites.b.dir.join("data/journal");
    let old = sites.root.join("old-journal");
    run_sh(&format!("cp -a {} {}", journal.display(), old.display()))?;
    let id = start_move_until(&sites, &sites.b, "restoring", Duration::from_secs(30))?;
    let watch = OneCopy::watch(&sites, PORT);
    sites.b.crash_gateway();
    run_sh(&format!(
        "rm -rf {j} && cp -a {o} {j}",
        j = journal.display(),
        o = old.display()
    ))?;
    sites.start_gateway_b()?;
    // The interrupted restore goes on without B's gateway and starts a copy B no longer
    // knows. B answers "unknown" about the migration, from a journal older than the one
    // that recorded it: A must not take that for "no copy".
    let m = wait_for(
        "A to distrust B's old journal",
        Duration::from_secs(60),
        || {
            let m = sites.a.ferry_json(&["migration", "show", &id]).ok()?;
            let distrusted = m["error"]
                .as_str()
                .is_some_and(|e| e.contains("journal is older"));
            (distrusted || m["phase"] != "restoring").then_some(m)
        },
    )?;
    let restored_pid = std::fs::read_to_string(
        sites
            .b
            .dir
            .join("data/incoming")
            .join(&id)
            .join("restore.pid"),
    )
    .ok()
    .and_then(|t| t.trim().parse::<i32>().ok());
    if let Some(p) = restored_pid {
        // The orphan copy goes with the test.
        let _ = std::process::Command::new("kill")
            .args(["-9", &p.to_string()])
            .status();
    }
    assert_eq!(m["phase"], "restoring", "{m}\n{}", sites.logs());
    assert!(
        m["error"]
            .as_str()
            .unwrap_or("")
            .contains("journal is older"),
        "{m}"
    );
    assert_eq!(Site::process_state(pid), Some('T'), "the source resumed");
    // The copy B's old journal forgot answered, alone: the source stayed frozen.
    watch.finish()?;
    Ok(())
}

fn run_sh(script: &str) -> Result<()> {
    let out = ferry_e2e::output(std::process::Command::new("sh").args(["-c", script]))?;
    anyhow::ensure!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// After a move that rolled back: the next one goes through and B has the dataset.
fn next_move_succeeds(sites: &TwoSites, digest: &str) -> Result<()> {
    let _ = sites
        .a
        .exec("tc", &["qdisc", "del", "dev", &sites.a.dev, "root"]);
    let (ok, m) = sites.migrate("redis", "b")?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert_eq!(sites.b.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    Ok(())
}

/// The restoring cell for `runtime`: B's gateway is killed while the restore runs
/// (slowed by 4 s) and started again `after` later. The copy B's runtime goes on to
/// start without its gateway is either adopted (the move completes) or discarded (the
/// source resumes): never two copies at any moment, none only while the source is frozen.
fn destination_killed_while_restoring(runtime: &str, tag: &str, after: Duration) -> Result<()> {
    let mut opts = Options::new(tag);
    let slowed = if runtime == "process" {
        CRIU
    } else {
        "/usr/sbin/runc"
    };
    opts.b_mount_setup = Some(slow_restore(tag, slowed));
    let mut cleanup = None;
    if runtime != "process" {
        opts.adapters.push(runtime.into());
    }
    let mut sites = TwoSites::start(opts)?;
    match runtime {
        "runc" => cleanup = Some(sites.run_redis_in_runc_at_a("redis", PORT)?),
        "podman" => {
            cleanup = Some(sites.podman_redis("redis")?);
            let image = ferry_e2e::PODMAN_REDIS;
            sites.run_redis_in_podman_at_a("redis", PORT, image)?;
        }
        _ => sites.run_redis_at_a("redis", PORT)?,
    }
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "20000", "key", "100"])?;
    let digest = sites.a.redis(PORT, &["DEBUG", "DIGEST"])?;
    let id = start_move_until(&sites, &sites.b, "restoring", Duration::from_secs(60))?;
    let watch = OneCopy::watch(&sites, PORT);
    sites.b.crash_gateway();
    std::thread::sleep(after);
    sites.start_gateway_b()?;
    let end = ends_with_one_copy(&sites, &id, &digest, Duration::from_secs(120))?;
    eprintln!("{runtime}: B killed while restoring, back after {after:?}: the move ended {end}");
    served_by_one_copy(watch)?;
    assert_eq!(
        phase(&sites.b, &id)?,
        if end == "completed" {
            "completed"
        } else {
            "rolled_back"
        },
        "both sites agree on how the move ended"
    );
    if end == "rolled_back" {
        next_move_succeeds(&sites, &digest)?;
    }
    drop(cleanup);
    Ok(())
}

#[test]
fn destination_killed_while_restoring_and_back_after_15_s_leaves_one_copy() -> Result<()> {
    destination_killed_while_restoring("process", "rst15", Duration::from_secs(15))
}

#[test]
fn destination_killed_while_restoring_a_runc_container_leaves_one_copy() -> Result<()> {
    destination_killed_while_restoring("runc", "rstrnc", Duration::ZERO)
}

#[test]
fn destination_killed_while_restoring_a_podman_container_leaves_one_copy() -> Result<()> {
    destination_killed_while_restoring("podman", "rstpod", Duration::ZERO)
}
