//! Post-copy, end to end: CRIU's lazy dump keeps Redis's memory in the frozen source,
//! the destination restores at once, and its `criu lazy-pages` daemon fetches the pages
//! through a tunnel over the QUIC peer link; the source is released only once every page
//! has arrived. The runc adapter does the same through runc's own lazy checkpoint.

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_e2e::{wait_for, Options, Outage, TwoSites};

const PORT: u16 = 6390;

#[test]
fn auto_mode_moves_a_large_tree_post_copy_and_keeps_a_small_one_stop_and_copy() -> Result<()> {
    let sites = TwoSites::start(Options::new("pcauto"))?;
    sites.run_redis_at_a("redis", PORT)?;
    let mode_of = |plan: &serde_json::Value| {
        plan["candidates"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["approach"] == "container"))
            .map(|c| (c["mode"].clone(), c["reason"].to_string()))
    };
    // A few MiB: stop-and-copy, and the plan says why.
    let plan = sites
        .a
        .ferry_json(&["migrate", "redis", "--to", "b", "--plan"])?;
    let (mode, reason) = mode_of(&plan).context("no container candidate")?;
    assert_eq!(mode, "stop-and-copy", "{plan}");
    assert!(reason.contains("auto"), "{reason}");
    // 100 MiB of values: post-copy, predicted shorter.
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "100000", "big", "1000"])?;
    let plan = sites
        .a
        .ferry_json(&["migrate", "redis", "--to", "b", "--plan"])?;
    let (mode, reason) = mode_of(&plan).context("no container candidate")?;
    assert_eq!(mode, "postcopy", "{plan}");
    assert!(reason.contains("predicted stall"), "{reason}");
    let before = sites.a.redis_dataset(PORT)?;
    let (ok, m) = sites.migrate("redis", "b")?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert_eq!(m["options"]["mode"], "postcopy", "{m}");
    assert!(m["timings"]["postcopy_ms"].is_u64(), "{m}");
    assert_eq!(sites.b.redis_dataset(PORT)?, before);
    Ok(())
}

#[test]
fn a_post_copy_move_to_a_warm_destination_sends_the_pages_it_holds_as_digests() -> Result<()> {
    let sites = TwoSites::start(Options::new("pcwarm"))?;
    // B keeps the pages a post-copy move brought; the next move sends them ahead as
    // digests (checked against the cold move's record, and every key at B).
    let (_, warm) = sites.warm_redis_round(PORT, &["--mode", "postcopy"])?;
    assert_eq!(warm["options"]["mode"], "postcopy", "{warm}");
    Ok(())
}

#[test]
fn redis_moves_post_copy_with_an_identical_dataset() -> Result<()> {
    let sites = TwoSites::start(Options::new("pcopy"))?;
    sites.run_redis_at_a("redis", PORT)?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "100000", "key", "200"])?;
    sites.a.redis(PORT, &["SET", "greeting", "lazily"])?;
    let before = sites.a.redis_dataset(PORT)?;
    let (ok, m) = sites.migrate_with("redis", "b", &["--mode", "postcopy"])?;
    assert!(ok, "{m}\n{}", sites.logs());
    eprintln!(
        "post-copy: timings {}, bytes {}",
        m["timings"], m["bytes_moved"]
    );
    assert_eq!(m["phase"], "completed", "{m}");
    assert!(m["timings"]["postcopy_ms"].is_u64(), "{m}");
    assert!(m["page_server"].is_string(), "{m}");
    // The pages count in what moved (100,000 values of 200 bytes), and crossed the link
    // compressed (DEBUG POPULATE's values compress well).
    let (moved, wire) = (
        m["bytes_moved"].as_u64().unwrap_or(0),
        m["bytes_on_wire"].as_u64().unwrap_or(0),
    );
    assert!(moved > 20_000_000, "{m}");
    assert!(wire > 0 && wire < moved / 2, "{m}");
    let after = sites.b.redis_dataset(PORT)?;
    assert_eq!(after, before);
    assert_eq!(sites.b.redis(PORT, &["GET", "greeting"])?, "lazily");
    // The source is released once every page is at B; nothing is left at A.
    wait_for("the source to go", Duration::from_secs(10), || {
        sites.a.redis(PORT, &["PING"]).is_err().then_some(())
    })?;
    assert!(sites.a.has_no_workloads()?);
    Ok(())
}

#[test]
fn a_thread_asleep_on_a_page_aligned_stack_leaves_the_pages_lazy() -> Result<()> {
    // Released CRIU counted every page as stack, so none as lazy, whenever one thread's
    // stack pointer was page-aligned (a Redis main thread, in about 1 start of 256): the
    // move then copied every page in the freeze. Ferry's CRIU patch (2) keeps only the
    // stack pointers' own pages out of the lazy ones.
    let mut opts = Options::new("pcalgn");
    opts.prepush = Some(false);
    let sites = TwoSites::start(opts)?;
    let p = PORT.to_string();
    let program = env!("CARGO_BIN_EXE_ferry-aligned-stack");
    sites.a.ferry(&[
        "workload", "run", "held", "--port", &p, "--", program, &p, "64",
    ])?;
    let checksum = |site: &ferry_e2e::Site| {
        let read = format!("exec 3<>/dev/tcp/127.0.0.1/{PORT} && head -1 <&3");
        site.exec("bash", &["-c", &read])
            .map(|s| s.trim().to_string())
    };
    let before = wait_for("the workload to answer", Duration::from_secs(20), || {
        checksum(&sites.a).ok().filter(|s| s.len() == 16)
    })?;
    let (ok, m) = sites.migrate_with("held", "b", &["--mode", "postcopy"])?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert!(m["timings"]["postcopy_ms"].is_u64(), "{m}");
    // Nothing went ahead: the 64 MiB stayed lazy in A's frozen process, out of the
    // image B received, and came after the switch (pushed, or fetched for a fault).
    let id = m["id"].as_str().context("the record has no id")?;
    let at_b = sites.b.ferry_json(&["migration", "show", id])?;
    let image = at_b["bytes_moved"]
        .as_u64()
        .context("no bytes_moved at B")?;
    assert!(
        image < 4 << 20,
        "B received a {image}-byte image: the dump left (nearly) no page lazy\n{at_b}"
    );
    let paged = at_b["pages"]["pushed"].as_u64().unwrap_or(0)
        + at_b["pages"]["requests"].as_u64().unwrap_or(0);
    assert!(paged > 0, "no page came after the switch\n{at_b}");
    assert_eq!(checksum(&sites.b)?, before, "B's memory differs from A's");
    sites.b.ferry(&["workload", "rm", "held"])?;
    Ok(())
}

#[test]
fn redis_in_runc_moves_post_copy_through_runcs_lazy_checkpoint() -> Result<()> {
    let mut opts = Options::new("pcrunc");
    opts.adapters.push("runc".into());
    let sites = TwoSites::start(opts)?;
    let _cleanup = sites.run_redis_in_runc_at_a("redis", PORT)?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "100000", "key", "200"])?;
    sites
        .a
        .redis(PORT, &["SET", "greeting", "lazily, from a container"])?;
    let before = sites.a.redis_dataset(PORT)?;
    // runc's adapter runs runc's own lazy checkpoint: post-copy is on offer for it.
    let plan = sites
        .a
        .ferry_json(&["migrate", "redis", "--to", "b", "--plan"])?;
    let candidate = plan["candidates"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["approach"] == "orchestrator"))
        .cloned()
        .context("no orchestrator candidate")?;
    assert!(
        !candidate["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("post-copy needs an adapter"),
        "{plan}"
    );
    let (ok, m) = sites.migrate_with("redis", "b", &["--mode", "postcopy"])?;
    eprintln!("runc post-copy: {m}");
    assert!(ok, "{m}\n{}", sites.logs());
    assert_eq!(m["approach"], "orchestrator", "{m}");
    assert_eq!(m["options"]["mode"], "postcopy", "{m}");
    assert_eq!(m["phase"], "completed", "{m}");
    assert!(m["timings"]["postcopy_ms"].is_u64(), "{m}");
    assert!(m["page_server"].is_string(), "{m}");
    assert_eq!(sites.b.redis_dataset(PORT)?, before);
    assert_eq!(
        sites.b.redis(PORT, &["GET", "greeting"])?,
        "lazily, from a container"
    );
    // Every page arrived before the source went: B's copy takes writes and keeps them.
    sites.b.redis(PORT, &["SET", "after", "the move"])?;
    assert_eq!(sites.b.redis(PORT, &["GET", "after"])?, "the move");
    wait_for(
        "the source container to go",
        Duration::from_secs(20),
        || {
            let at_a = sites
                .a
                .exec("runc", &["--root", "/run/ferry-runc/a", "list", "-q"])
                .ok()?;
            (!at_a.contains("a-redis")).then_some(())
        },
    )?;
    assert!(sites.a.has_no_workloads()?);
    let at_b = sites
        .b
        .exec("runc", &["--root", "/run/ferry-runc/b", "list", "-q"])?;
    assert!(at_b.contains("b-redis"), "{at_b}");
    sites.b.ferry(&["workload", "rm", "redis"])?;
    Ok(())
}

#[test]
fn a_runc_copy_that_has_every_page_before_its_restore_returns_completes() -> Result<()> {
    // Every page goes ahead, so B's lazy-pages daemon is done at once; B's runtime then
    // takes a second longer to report the restore (`runc state` slowed): the move must
    // still end, completed, once the copy is adopted.
    let mut opts = Options::new("pcearl");
    opts.adapters.push("runc".into());
    opts.b_mount_setup = Some(ferry_e2e::slow_when("pcearl", "/usr/sbin/runc", "state", 1));
    let sites = TwoSites::start(opts)?;
    let _cleanup = sites.run_redis_in_runc_at_a("redis", PORT)?;
    sites.a.redis(PORT, &["SET", "greeting", "early"])?;
    let before = sites.a.redis_dataset(PORT)?;
    let (ok, m) = sites.migrate_with("redis", "b", &["--mode", "postcopy"])?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(sites.b.redis_dataset(PORT)?, before);
    assert_eq!(
        sites
            .b
            .migration_phase(m["id"].as_str().unwrap_or_default())
            .as_deref(),
        Some("completed")
    );
    sites.b.ferry(&["workload", "rm", "redis"])?;
    Ok(())
}

#[test]
fn post_copy_is_refused_for_an_adapter_without_the_hosts_criu() -> Result<()> {
    let mut opts = Options::new("pcref");
    // The process adapter without the criu grant cannot checkpoint at all; ask for
    // post-copy with an unknown mode first, then the real refusal.
    opts.grants = vec![(
        "process".into(),
        vec!["log".into(), "process".into()],
        Vec::new(),
    )];
    let sites = TwoSites::start(opts)?;
    sites.run_redis_at_a("redis", PORT)?;
    let out = sites
        .a
        .ferry_output(&["migrate", "redis", "--to", "b", "--mode", "sideways"])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown mode"), "{err}");
    let (ok, m) = sites.migrate_with("redis", "b", &["--mode", "postcopy"])?;
    assert!(!ok);
    assert_eq!(m["phase"], "rolled_back", "{m}");
    let error = m["error"].as_str().unwrap_or_default();
    assert!(error.contains("post-copy needs an adapter"), "{error}");
    assert_eq!(sites.a.redis(PORT, &["PING"])?, "PONG");
    Ok(())
}

#[test]
fn a_failed_post_copy_restore_resumes_the_source_with_its_data() -> Result<()> {
    // Site B looks able to restore (same files, same CRIU), but its CRIU fails the
    // restore (another binary would be refused before the freeze).
    let mut opts = Options::new("pcfail");
    opts.b_mount_setup = Some(ferry_e2e::fail_when("pcfail", ferry_e2e::CRIU, "restore"));
    let sites = TwoSites::start(opts)?;
    sites.run_redis_at_a("redis", PORT)?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "20000", "key", "100"])?;
    let digest = sites.a.redis(PORT, &["DEBUG", "DIGEST"])?;
    let (ok, m) = sites.migrate_with("redis", "b", &["--mode", "postcopy"])?;
    assert!(!ok, "{m}");
    assert_eq!(m["phase"], "rolled_back", "{m}\n{}", sites.logs());
    // The lazy dump let go of the frozen source, which runs again with all its memory.
    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    sites.a.redis(PORT, &["SET", "still", "writable"])?;
    let at_a = sites.a.ferry_json(&["workload", "ls"])?;
    assert_eq!(at_a[0]["state"], "running", "{at_a}");
    assert!(sites.b.has_no_workloads()?);
    Ok(())
}

/// A pre-forked server: the parent fills a shared mapping and a private buffer, forks
/// `WORKERS` workers that each fill a private buffer of their own and take turns on the
/// listening socket. Each connection is answered with the worker's index and the CRC32s of
/// its private buffer, the parent's (inherited, copy-on-write) buffer and the shared
/// mapping, all computed afresh: every page of every process is read.
const FORKED_SERVER: &str = r#"
import mmap, os, socket, sys, zlib
MB = 1 << 20
port, workers = int(sys.argv[1]), int(sys.argv[2])
def fill(buf, seed):
    block = bytes((seed * 131 + i * 7) % 251 for i in range(4096))
    for off in range(0, len(buf), 4096):
        buf[off:off + 4096] = block[(off // 4096) % 97:] + block[:(off // 4096) % 97]
shared = mmap.mmap(-1, 16 * MB, flags=mmap.MAP_SHARED)
fill(shared, 1)
inherited = bytearray(16 * MB)
fill(inherited, 2)
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("0.0.0.0", port))
sock.listen(64)
for index in range(workers):
    if os.fork() == 0:
        own = bytearray(24 * MB)
        fill(own, 10 + index)
        while True:
            conn, _ = sock.accept()
            conn.recv(16)
            answer = "%d %08x %08x %08x\n" % (index, zlib.crc32(own), zlib.crc32(inherited), zlib.crc32(shared))
            conn.sendall(answer.encode())
            conn.close()
while True:
    os.wait()
"#;

/// Asks the server `n` times; the distinct answers, sorted.
const ASK: &str = r#"
import socket, sys
seen = set()
for _ in range(int(sys.argv[2])):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
    s.sendall(b"?")
    seen.add(s.makefile().readline().strip())
    s.close()
print("\n".join(sorted(seen)))
"#;

const WORKERS: usize = 3;

fn ask(site: &ferry_e2e::Site, port: u16) -> Result<Vec<String>> {
    let out = site.exec("python3", &["-c", ASK, &port.to_string(), "60"])?;
    Ok(out.lines().map(str::to_string).collect())
}

#[test]
fn a_pre_forked_server_moves_post_copy_with_every_process_and_its_memory() -> Result<()> {
    moves_a_pre_forked_server("pcfork", "postcopy")
}

/// The same service, stop-and-copy (issue: multi-process services move with every
/// process, its shared memory and its files).
#[test]
fn a_pre_forked_server_moves_stop_and_copy_with_every_process_and_its_memory() -> Result<()> {
    moves_a_pre_forked_server("scfork", "stop-and-copy")
}

fn moves_a_pre_forked_server(tag: &str, mode: &str) -> Result<()> {
    let sites = TwoSites::start(Options::new(tag))?;
    let p = PORT.to_string();
    let workers = WORKERS.to_string();
    sites.a.ferry(&[
        "workload",
        "run",
        "forked",
        "--port",
        &p,
        "--",
        "python3",
        "-c",
        FORKED_SERVER,
        &p,
        &workers,
    ])?;
    // Every worker has answered at least once (the kernel spreads the accepts).
    let before = wait_for("every worker to answer", Duration::from_secs(30), || {
        ask(&sites.a, PORT)
            .ok()
            .filter(|seen| seen.len() == WORKERS)
    })?;
    let (ok, m) = sites.migrate_with("forked", "b", &["--mode", mode])?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(m["options"]["mode"], mode, "{m}");
    if mode == "postcopy" {
        assert!(m["timings"]["postcopy_ms"].is_u64(), "{m}");
    }
    // At B the same workers answer with the same memory, private and shared.
    let after = wait_for(
        "every worker to answer at B",
        Duration::from_secs(30),
        || {
            ask(&sites.b, PORT)
                .ok()
                .filter(|seen| seen.len() == WORKERS)
        },
    )?;
    assert_eq!(after, before);
    wait_for("the source to go", Duration::from_secs(10), || {
        ask(&sites.a, PORT).is_err().then_some(())
    })?;
    Ok(())
}

#[test]
fn a_link_lost_for_5_s_during_the_page_phase_only_delays_the_move() -> Result<()> {
    // Every page after the switch (none sent ahead) over a slow link, so the page phase
    // lasts longer than the outage.
    let mut opts = Options::new("pcdrop");
    opts.prepush = Some(false);
    let sites = TwoSites::start(opts)?;
    let (id, before) = into_the_page_phase(&sites)?;
    let phase = |site: &ferry_e2e::Site| site.migration_phase(&id);
    {
        let _outage = Outage::start(&sites.a, &sites.b.addr)?;
        std::thread::sleep(Duration::from_secs(5));
        assert_eq!(
            phase(&sites.a).as_deref(),
            Some("paging"),
            "the move must wait out the outage"
        );
    }
    let end = wait_for("the move to end", Duration::from_secs(120), || {
        phase(&sites.a).filter(|p| ended(p))
    })?;
    assert_eq!(end, "completed", "{}", sites.logs());
    let after = sites.b.redis_dataset(PORT)?;
    assert_eq!(after, before);
    assert_eq!(sites.b.redis(PORT, &["GET", "greeting"])?, "kept at A");
    Ok(())
}

/// Starts a post-copy move of a 60 MB Redis over a 50 Mbit/s link with no pages sent
/// ahead, and returns once the source is in the page phase (the migration's id).
fn into_the_page_phase(sites: &TwoSites) -> Result<(String, (String, String))> {
    sites.run_redis_at_a("redis", PORT)?;
    page_phase_of_redis(sites)
}

/// [`into_the_page_phase`] for the Redis already running at A.
fn page_phase_of_redis(sites: &TwoSites) -> Result<(String, (String, String))> {
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "300000", "key", "200"])?;
    sites.a.redis(PORT, &["SET", "greeting", "kept at A"])?;
    let before = sites.a.redis_dataset(PORT)?;
    // The populated values compress to about 2 MB on the wire: at 5 Mbit/s the page
    // phase lasts some 4 s, so what a test does in it lands in it (at 50 Mbit/s it took
    // 0.36 s, and a CI run's kills came after the last page).
    sites.a.limit_egress("5mbit")?;
    let id = sites.start_migration("redis", "b", &["--mode", "postcopy"])?;
    // A move that ends (or stalls) before it pages says why, with both gateways' logs.
    let phase = wait_for("the page phase", Duration::from_secs(60), || {
        sites
            .a
            .migration_phase(&id)
            .filter(|p| p == "paging" || ended(p))
    })
    .with_context(|| sites.logs())?;
    anyhow::ensure!(
        phase == "paging",
        "the move ended {phase} before its page phase\n{}",
        sites.logs()
    );
    Ok((id, before))
}

/// A phase a migration ends in (not one it passes through, such as `cutting_over`).
fn ended(phase: &str) -> bool {
    matches!(phase, "completed" | "rolled_back" | "failed")
}

/// Kills B's gateway in the page phase of move `id`: B's copy, lacking pages it can no
/// longer get, is stopped at once by its guard (its memory would read zeros where pages
/// never came); A, frozen with every page, waits for B's word, and once B is back the
/// move has rolled back.
fn kill_b_in_the_page_phase(sites: &mut TwoSites, id: &str) -> Result<()> {
    sites.b.crash_gateway();
    wait_for("B's copy to stop", Duration::from_secs(20), || {
        sites.b.redis(PORT, &["PING"]).is_err().then_some(())
    })?;
    assert_eq!(sites.a.migration_phase(id).as_deref(), Some("paging"));
    sites.start_gateway_b()?;
    let end = wait_for("the move to end", Duration::from_secs(60), || {
        sites.a.migration_phase(id).filter(|p| ended(p))
    })?;
    assert_eq!(end, "rolled_back", "{}", sites.logs());
    Ok(())
}

/// Kills A's gateway in the page phase of move `id` and restarts it 2 s later: the
/// restarted source serves the rest of the pages from its frozen tree and the move
/// completes with B's dataset `before`.
fn kill_a_in_the_page_phase(
    sites: &mut TwoSites,
    id: &str,
    before: &(String, String),
) -> Result<()> {
    sites.a.crash_gateway();
    // B keeps its copy (a fault waits for the source) while A's gateway is down.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sites.b.migration_phase(id).as_deref(), Some("paging"));
    sites.start_gateway_a()?;
    let end = wait_for("the move to end", Duration::from_secs(120), || {
        sites.a.migration_phase(id).filter(|p| ended(p))
    })?;
    assert_eq!(end, "completed", "{}", sites.logs());
    assert_eq!(&sites.b.redis_dataset(PORT)?, before);
    assert_eq!(sites.b.redis(PORT, &["GET", "greeting"])?, "kept at A");
    Ok(())
}

#[test]
fn destination_killed_in_the_page_phase_stops_its_copy_and_the_source_resumes() -> Result<()> {
    let mut opts = Options::new("pcdkil");
    opts.prepush = Some(false);
    let mut sites = TwoSites::start(opts)?;
    let (id, before) = into_the_page_phase(&sites)?;
    kill_b_in_the_page_phase(&mut sites, &id)?;
    let m = sites.a.ferry_json(&["migration", "show", &id])?;
    assert!(
        m["error"].as_str().unwrap_or("").contains("lost its copy"),
        "{m}"
    );
    // The source runs on with its data; B holds nothing.
    assert_eq!(sites.a.redis_dataset(PORT)?, before);
    assert_eq!(sites.a.redis(PORT, &["GET", "greeting"])?, "kept at A");
    assert_eq!(sites.b.migration_phase(&id).as_deref(), Some("failed"));
    assert!(sites.b.has_no_workloads()?);
    Ok(())
}

#[test]
fn destination_killed_in_a_runc_page_phase_stops_the_container_and_the_source_resumes() -> Result<()>
{
    let mut opts = Options::new("pcdrun");
    opts.prepush = Some(false);
    opts.adapters.push("runc".into());
    let mut sites = TwoSites::start(opts)?;
    let _cleanup = sites.run_redis_in_runc_at_a("redis", PORT)?;
    let (id, before) = page_phase_of_redis(&sites)?;
    // runc chose the container's cgroup; the guard learnt it after the restore and kills
    // the copy through it.
    kill_b_in_the_page_phase(&mut sites, &id)?;
    // runc's lazy dump let go of the paused container, which runs again with its data.
    assert_eq!(sites.a.redis_dataset(PORT)?, before);
    sites.a.redis(PORT, &["SET", "still", "writable"])?;
    let at_a = sites
        .a
        .exec("runc", &["--root", "/run/ferry-runc/a", "list"])?;
    assert!(at_a.contains("running"), "{at_a}");
    assert!(sites.b.has_no_workloads()?);
    Ok(())
}

#[test]
fn destination_killed_before_it_confirmed_leaves_the_source_to_resume_with_its_data() -> Result<()>
{
    let mut opts = Options::new("pcdcon");
    // B's restore starts 4 s late: long enough to kill its gateway before it confirms.
    opts.b_mount_setup = Some(ferry_e2e::slow_restore("pcdcon", ferry_e2e::CRIU));
    opts.stall_after_secs = Some(2);
    let mut sites = TwoSites::start(opts)?;
    sites.run_redis_at_a("redis", PORT)?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "100000", "key", "200"])?;
    sites.a.redis(PORT, &["SET", "greeting", "kept at A"])?;
    let before = sites.a.redis_dataset(PORT)?;
    let id = sites.start_migration("redis", "b", &["--mode", "postcopy"])?;
    wait_for("B to restore", Duration::from_secs(60), || {
        (sites.b.migration_phase(&id)? == "restoring").then_some(())
    })?;
    sites.b.crash_gateway();
    // No confirmation came: A stays frozen with every page, waiting for B's word; past
    // the site's bound (2 s here) it reports the migration stalled.
    let stalled = wait_for("A to report the stall", Duration::from_secs(20), || {
        let m = sites.a.ferry_json(&["migration", "show", &id]).ok()?;
        m["stalled_since_ms"].is_u64().then_some(m)
    })?;
    assert_eq!(stalled["phase"], "restoring", "{stalled}");
    assert!(
        stalled["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("stalled"),
        "{stalled}"
    );
    sites.start_gateway_b()?;
    let end = wait_for("the move to end", Duration::from_secs(90), || {
        sites.a.migration_phase(&id).filter(|p| ended(p))
    })?;
    assert_eq!(end, "rolled_back", "{}", sites.logs());
    let m = sites.a.ferry_json(&["migration", "show", &id])?;
    assert!(m["stalled_since_ms"].is_null(), "still stalled: {m}");
    assert_eq!(sites.a.redis_dataset(PORT)?, before);
    assert_eq!(sites.a.redis(PORT, &["GET", "greeting"])?, "kept at A");
    // The restore the crash interrupted never runs a copy at B, even after its delay.
    std::thread::sleep(Duration::from_secs(5));
    assert!(sites.b.has_no_workloads()?, "B holds a workload");
    assert!(sites.b.redis(PORT, &["PING"]).is_err(), "two copies run");
    let _ = std::fs::remove_dir_all("/tmp/ferry-e2e-pcdcon-slow");
    Ok(())
}

#[test]
fn source_killed_in_the_page_phase_serves_the_pages_after_its_restart() -> Result<()> {
    let mut opts = Options::new("pcskil");
    opts.prepush = Some(false);
    let mut sites = TwoSites::start(opts)?;
    let (id, before) = into_the_page_phase(&sites)?;
    kill_a_in_the_page_phase(&mut sites, &id, &before)?;
    assert_eq!(sites.b.migration_phase(&id).as_deref(), Some("completed"));
    wait_for("the source to go", Duration::from_secs(10), || {
        sites.a.redis(PORT, &["PING"]).is_err().then_some(())
    })?;
    assert!(sites.a.has_no_workloads()?, "two copies");
    Ok(())
}

#[test]
fn source_killed_in_a_runc_page_phase_serves_the_pages_after_its_restart() -> Result<()> {
    let mut opts = Options::new("pcsrun");
    opts.prepush = Some(false);
    opts.adapters.push("runc".into());
    let mut sites = TwoSites::start(opts)?;
    let _cleanup = sites.run_redis_in_runc_at_a("redis", PORT)?;
    let (id, before) = page_phase_of_redis(&sites)?;
    // runc's lazy dump ends with its client; the paused container (held by its cgroup
    // freezer, not stopped) still has every page, and the restarted source serves them.
    kill_a_in_the_page_phase(&mut sites, &id, &before)?;
    wait_for(
        "the source container to go",
        Duration::from_secs(20),
        || {
            let at_a = sites
                .a
                .exec("runc", &["--root", "/run/ferry-runc/a", "list", "-q"])
                .ok()?;
            (!at_a.contains("a-redis")).then_some(())
        },
    )?;
    assert!(sites.a.has_no_workloads()?, "two copies");
    Ok(())
}

#[test]
fn pages_written_after_they_went_ahead_reach_b_as_written() -> Result<()> {
    let sites = TwoSites::start(Options::new("pcwrit"))?;
    sites.run_redis_at_a_with("redis", PORT, &["--route", "0.0.0.0:16390"])?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "200000", "key", "200"])?;
    // Writes through A's route before, during and after the pages go ahead, so some of
    // what went ahead is stale by the freeze.
    let acked = sites.root.join("acked.txt");
    let client = sites
        .a
        .start_load("redis", "127.0.0.1:16390", "500", "8", "4", &acked)?;
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, m) = sites.migrate_with("redis", "b", &["--mode", "postcopy"])?;
    let out = client.finish()?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert!(
        m["timings"]["prepush_ms"].is_u64(),
        "no pages went ahead: {m}"
    );
    // The source's record: pages sent ahead, some written before the freeze.
    let (ahead, stale) = (
        m["pages"]["ahead"].as_u64().unwrap_or(0),
        m["pages"]["stale"].as_u64().unwrap_or(0),
    );
    assert!(ahead > 10_000, "{m}");
    assert!(stale > 0, "no page was written after it went ahead: {m}");
    let logs = ferry_e2e::strip_ansi(&sites.logs());
    let listed: u64 = logs
        .lines()
        .filter(|l| l.contains("pages written since they went ahead"))
        .find_map(|l| {
            l.split("stale=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .context("the source logged no stale pages")?;
    assert_eq!(listed, stale);
    // The destination's record: how its lazy-pages daemon was answered.
    let id = m["id"].as_str().unwrap_or_default().to_string();
    let at_b = wait_for("B's page statistics", Duration::from_secs(20), || {
        let r = sites.b.ferry_json(&["migration", "show", &id]).ok()?;
        (r["pages"]["requests"].as_u64()? > 0).then_some(r)
    })?;
    assert!(at_b["pages"]["hits"].as_u64() > Some(0), "{at_b}");
    assert_eq!(at_b["pages"]["stale"], stale, "{at_b}");
    let shown = sites.b.ferry(&["migration", "show", &id])?;
    assert!(shown.contains("sent ahead"), "{shown}");
    assert!(shown.contains("from the cache"), "{shown}");
    let summary = out.summary;
    assert_eq!(summary["failed"], 0, "{summary}");
    // Every acknowledged write is at B with its value, and nothing else changed.
    let keys: Vec<String> = std::fs::read_to_string(&acked)?
        .lines()
        .map(str::to_string)
        .collect();
    assert!(keys.len() > 1000, "{}", keys.len());
    for chunk in keys.chunks(500) {
        let mut args = vec!["MGET"];
        args.extend(chunk.iter().map(String::as_str));
        let values = sites.b.redis(PORT, &args)?;
        let expected: Vec<&str> = chunk.iter().map(|k| k.trim_start_matches('k')).collect();
        assert_eq!(values.lines().collect::<Vec<_>>(), expected);
    }
    let size: usize = sites.b.redis(PORT, &["DBSIZE"])?.trim().parse()?;
    assert_eq!(size, 200_000 + keys.len());
    assert_eq!(
        sites.b.redis(PORT, &["GET", "key:4242"])?.len(),
        200,
        "a populated value changed"
    );
    Ok(())
}

/// A runc Redis at A moving post-copy (no pages sent ahead) over a slow link, in its
/// page phase: the sites, the containers' cleanup, the move's id and A's dataset.
fn runc_in_the_page_phase(
    tag: &str,
) -> Result<(TwoSites, ferry_e2e::Cleanup, String, (String, String))> {
    let mut opts = Options::new(tag);
    opts.prepush = Some(false);
    opts.adapters.push("runc".into());
    let sites = TwoSites::start(opts)?;
    let cleanup = sites.run_redis_in_runc_at_a("redis", PORT)?;
    let (id, before) = page_phase_of_redis(&sites)?;
    Ok((sites, cleanup, id, before))
}

/// `runc kill -9` of site `site`'s Redis container, from outside Ferry.
fn kill_container(sites: &TwoSites, site: &str) -> Result<String> {
    sites.a.exec(
        "runc",
        &[
            "--root",
            &format!("/run/ferry-runc/{site}"),
            "kill",
            &format!("{site}-redis"),
            "KILL",
        ],
    )
}

#[test]
fn destination_copy_killed_in_a_runc_page_phase_resumes_the_source() -> Result<()> {
    let (sites, _cleanup, id, before) = runc_in_the_page_phase("pcbdie")?;
    // B's copy dies before it has every page: its lazy-pages daemon ends as if it had
    // them all, but the copy is gone; the source, frozen with every page, resumes.
    kill_container(&sites, "b")?;
    let end = wait_for("the move to end", Duration::from_secs(60), || {
        sites.a.migration_phase(&id).filter(|p| ended(p))
    })?;
    assert_eq!(end, "rolled_back", "{}", sites.logs());
    let m = sites.a.ferry_json(&["migration", "show", &id])?;
    assert!(
        m["error"].as_str().unwrap_or("").contains("lost its copy"),
        "{m}"
    );
    assert_eq!(sites.a.redis_dataset(PORT)?, before);
    assert_eq!(sites.a.redis(PORT, &["GET", "greeting"])?, "kept at A");
    assert_eq!(sites.b.migration_phase(&id).as_deref(), Some("failed"));
    assert!(sites.b.has_no_workloads()?, "B keeps a dead copy");
    Ok(())
}

#[test]
fn both_copies_killed_in_a_runc_page_phase_end_the_move() -> Result<()> {
    let (sites, _cleanup, id, _) = runc_in_the_page_phase("pc2die")?;
    // Killed from outside at both sites (a lost service, not Ferry's doing): the source's
    // lazy dump, left with no tree and no client, must not hold the move for ever.
    kill_container(&sites, "a")?;
    kill_container(&sites, "b")?;
    let end = wait_for("the move to end", Duration::from_secs(60), || {
        sites.a.migration_phase(&id).filter(|p| ended(p))
    })?;
    eprintln!("ended {end}");
    let m = sites.a.ferry_json(&["migration", "show", &id])?;
    assert_ne!(
        m["phase"], "completed",
        "a move whose copy died cannot complete: {m}"
    );
    // The site's lazy dump is gone with it: nothing holds A's ingress or a runc process.
    let left = sites
        .a
        .exec("pgrep", &["-f", "runc --root /run/ferry-runc/a checkpoint"]);
    assert!(left.is_err(), "the lazy dump outlived the move: {left:?}");
    Ok(())
}
