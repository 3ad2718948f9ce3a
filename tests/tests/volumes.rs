//! Volumes move with the workload (issue: state beyond memory): Redis keeping an
//! append-only file on a volume moves with every acknowledged write in memory and on disk
//! at the destination, whose view of the volume's path is its own (as another host's
//! would be); a second move to the same site sends only what changed.

use std::time::Duration;

use anyhow::Result;
use ferry_e2e::{Options, TwoSites};
use serde_json::Value;

const PORT: u16 = 6379;
const ROUTE: &str = "0.0.0.0:16379";

fn sent(m: &Value, pass: &str) -> u64 {
    m["volumes"][pass]["sent_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

#[test]
fn redis_with_its_aof_on_a_volume_moves_with_every_acknowledged_write_on_disk() -> Result<()> {
    let vol = std::env::temp_dir().join("ferry-volume-aof");
    let _ = std::fs::remove_dir_all(&vol);
    std::fs::create_dir_all(&vol)?;
    let v = vol.display().to_string();
    let mut opts = Options::new("volaof");
    // B is another host: its view of the volume's path starts empty.
    opts.b_mount_setup = Some(format!("mount -t tmpfs ferry-volaof {v}"));
    let sites = TwoSites::start(opts)?;
    sites
        .a
        .run_redis_with_aof("redis", PORT, &v, &["--volume", &v, "--route", ROUTE])?;

    // Writes go on through A's route while it moves: each acknowledged one is in the AOF.
    let acked = sites.root.join("acked.txt");
    let client = sites
        .a
        .start_load("redis", "127.0.0.1:16379", "300", "4", "2", &acked)?;
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, m) = sites.migrate_with("redis", "b", &["--mode", "stop-and-copy"])?;
    let out = client.finish()?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.summary["failed"], 0, "{}", out.summary);
    eprintln!("volumes: {}\ntimings: {}", m["volumes"], m["timings"]);
    assert!(m["volumes"]["precopy"]["files"].as_u64() >= Some(1), "{m}");
    assert!(sent(&m, "precopy") > 0, "{m}");
    // The AOF grew after the pre-copy: the delta re-read it, while frozen.
    assert!(
        m["volumes"]["delta"]["read_bytes"].as_u64() > Some(0),
        "{m}"
    );
    assert!(m["timings"]["volume_delta_ms"].is_u64(), "{m}");
    // The pre-copy is in the prepare time, before the freeze.
    assert!(
        m["timings"]["prepare_ms"].as_u64() >= m["volumes"]["precopy"]["ms"].as_u64(),
        "{m}"
    );
    let id = m["id"].as_str().unwrap_or_default();
    let at_b = sites.b.ferry_json(&["migration", "show", id])?;
    assert!(
        at_b["volumes"]["written_bytes"].as_u64() > Some(0),
        "{at_b}"
    );

    let keys: Vec<String> = std::fs::read_to_string(&acked)?
        .lines()
        .map(str::to_string)
        .collect();
    assert!(keys.len() > 500, "{} acknowledged writes", keys.len());
    let exists = |port: u16| -> Result<()> {
        for chunk in keys.chunks(500) {
            let mut args = vec!["EXISTS"];
            args.extend(chunk.iter().map(String::as_str));
            assert_eq!(sites.b.redis(port, &args)?, chunk.len().to_string());
        }
        Ok(())
    };
    // In memory at B.
    exists(PORT)?;
    // And on disk at B: a Redis started there from the volume alone loads every one.
    sites.b.ferry(&["workload", "rm", "redis"])?;
    sites.b.run_redis_with_aof("check", PORT + 1, &v, &[])?;
    exists(PORT + 1)?;
    sites.b.ferry(&["workload", "rm", "check"])?;

    // A second move to B of the same volume (Redis started again at A from what its
    // volume holds there): B kept the blocks it had, so it gets only what changed.
    sites
        .a
        .run_redis_with_aof("redis", PORT, &v, &["--volume", &v])?;
    sites.a.redis(PORT, &["SET", "second-move", "1"])?;
    let (ok, again) = sites.migrate_with("redis", "b", &["--mode", "stop-and-copy"])?;
    assert!(ok, "{again}\n{}", sites.logs());
    let total = |m: &Value| sent(m, "precopy") + sent(m, "delta");
    eprintln!(
        "volume blocks sent: first move to b {} bytes, the second {}",
        total(&m),
        total(&again)
    );
    assert!(total(&again) < total(&m), "first {m}\nagain {again}");
    assert_eq!(sites.b.redis(PORT, &["GET", "second-move"])?, "1");
    let _ = std::fs::remove_dir_all(&vol);
    Ok(())
}

#[test]
fn redis_in_podman_with_its_aof_on_a_bind_mount_moves_with_its_writes_on_disk() -> Result<()> {
    let vol = std::env::temp_dir().join("ferry-volume-podman");
    let _ = std::fs::remove_dir_all(&vol);
    std::fs::create_dir_all(&vol)?;
    let v = vol.display().to_string();
    let mut opts = Options::new("volpod");
    opts.adapters.push("podman".into());
    opts.mounts.push(("podman".into(), vec![v.clone()]));
    // B is another host: its view of the volume's path starts empty.
    opts.b_mount_setup = Some(format!("mount -t tmpfs ferry-volpod {v}"));
    let sites = TwoSites::start(opts)?;
    let _cleanup = sites.podman_redis("redis")?;
    let image = ferry_e2e::PODMAN_REDIS;
    let (setting, mounts, p) = (
        format!("image={image}"),
        format!("mounts={v}:/data"),
        PORT.to_string(),
    );
    let mut args = vec![
        "workload",
        "run",
        "redis",
        "--runtime",
        "podman",
        "--setting",
        &setting,
        "--setting",
        &mounts,
        "--volume",
        &v,
        "--port",
        &p,
        "--",
    ];
    let server = ferry_e2e::redis_container_args(PORT);
    args.extend(server.iter().map(String::as_str));
    // The AOF in /data, the bind-mounted volume.
    args.extend(["--appendonly", "yes", "--appendfsync", "everysec"]);
    sites.a.ferry(&args)?;
    ferry_e2e::wait_for("Redis in podman at A", Duration::from_secs(30), || {
        sites.a.redis(PORT, &["PING"]).ok().filter(|r| r == "PONG")
    })?;
    sites
        .a
        .redis(PORT, &["SET", "on-disk", "in a podman volume"])?;
    // appendfsync everysec: on disk within a second.
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, m) = sites.migrate_with("redis", "b", &["--mode", "stop-and-copy"])?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert!(sent(&m, "precopy") > 0, "{m}");
    assert_eq!(
        sites.b.redis(PORT, &["GET", "on-disk"])?,
        "in a podman volume"
    );
    // B's own view of the volume holds the AOF: reloaded from it alone, the key is there.
    sites.b.redis(PORT, &["DEBUG", "LOADAOF"])?;
    assert_eq!(
        sites.b.redis(PORT, &["GET", "on-disk"])?,
        "in a podman volume"
    );
    let _ = std::fs::remove_dir_all(&vol);
    Ok(())
}

#[test]
fn what_a_runc_container_writes_in_its_rootfs_moves_when_named_as_a_volume() -> Result<()> {
    // The bundle first: B's view of the container's /data is its own from the start.
    let bundle = std::env::temp_dir().join("ferry-volume-runc-bundle");
    let bundle = ferry_e2e::redis_oci_bundle(&bundle, PORT)?;
    let data = bundle.join("rootfs/data").display().to_string();
    let mut opts = Options::new("volrnc");
    opts.adapters.push("runc".into());
    opts.b_mount_setup = Some(format!("mount -t tmpfs ferry-volrnc {data}"));
    let sites = TwoSites::start(opts)?;
    let _cleanup = sites.run_in_runc_bundle_at_a("redis", PORT, &bundle, &["--volume", &data])?;
    ferry_e2e::wait_for("Redis in runc at A", Duration::from_secs(30), || {
        sites.a.redis(PORT, &["PING"]).ok().filter(|r| r == "PONG")
    })?;
    // Written into the container's root filesystem: /data/dump.rdb.
    sites.a.redis(PORT, &["SET", "saved", "in the rootfs"])?;
    sites.a.redis(PORT, &["SAVE"])?;
    let (ok, m) = sites.migrate_with("redis", "b", &["--mode", "stop-and-copy"])?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert!(sent(&m, "precopy") > 0, "{m}");
    assert_eq!(sites.b.redis(PORT, &["GET", "saved"])?, "in the rootfs");
    // B's own view of the rootfs's /data holds the file now. (On one host the restored
    // container's root is a plain bind of the bundle's rootfs, so it sees the host's
    // directory, not B's view; on a second host that directory is B's own.)
    let rdb = format!("{data}/dump.rdb");
    let at_b = sites.b.file_size_here(&rdb)?;
    assert!(at_b.is_some_and(|n| n > 0), "{rdb} at B: {at_b:?}");
    drop(sites);
    let _ = std::fs::remove_dir_all(&bundle);
    Ok(())
}
