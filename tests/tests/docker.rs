//! Docker: Redis in a Docker container moves from site a to site b through the `docker`
//! adapter (the engine's own `docker checkpoint create` and `docker start --checkpoint`),
//! each site with a Docker daemon of its own in its network namespace.

use std::time::Duration;

use anyhow::Result;
use ferry_e2e::docker::Docker;
use ferry_e2e::{Options, TwoSites};

const PORT: u16 = 6379;
const ROUTE: &str = "0.0.0.0:16379";

/// Two sites with the `docker` adapter installed and granted.
fn docker_options(tag: &str) -> Options {
    let mut opts = Options::new(tag);
    opts.adapters.push("docker".into());
    opts.grants.push((
        "docker".into(),
        vec!["log".into(), "exec".into(), "files".into()],
        vec!["docker".into(), "cp".into()],
    ));
    opts
}

#[test]
fn redis_in_docker_moves_between_sites() -> Result<()> {
    let sites = TwoSites::start(docker_options("docker"))?;
    let docker = Docker::start(&sites)?;
    docker.run_redis_at_a(&sites, "redis", PORT, &["--route", ROUTE])?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "30000", "key", "64"])?;
    sites
        .a
        .redis(PORT, &["SET", "greeting", "from a docker container"])?;
    let before = sites.a.redis_dataset(PORT)?;
    assert!(
        docker.containers("a")?.iter().any(|c| c == "a-redis"),
        "the workload runs in site a's Docker"
    );

    // Clients of A's route during the move: their connections to the container are open
    // when it is checkpointed (CRIU's tcp-close), and the ingress holds them meanwhile.
    let acked = sites.root.join("acked.txt");
    let client = sites
        .a
        .start_load("redis", "127.0.0.1:16379", "200", "4", "2", &acked)?;
    std::thread::sleep(Duration::from_millis(1000));
    let (ok, m) = sites.migrate("redis", "b")?;
    let out = client.finish()?;
    assert!(ok, "{m}\n{}\n{}", sites.logs(), docker.logs());
    assert_eq!(m["approach"], "orchestrator", "{m}");
    assert!(out.ok, "{}", out.stderr);
    eprintln!(
        "client: {}\nmigration timings: {}",
        out.summary, m["timings"]
    );
    assert_eq!(out.summary["failed"], 0, "{}", out.summary);

    // The dataset at B is the one A had, plus what the clients wrote.
    let keys: Vec<String> = std::fs::read_to_string(&acked)?
        .lines()
        .map(str::to_string)
        .collect();
    for chunk in keys.chunks(500) {
        let mut args = vec!["EXISTS"];
        args.extend(chunk.iter().map(String::as_str));
        assert_eq!(sites.b.redis(PORT, &args)?, chunk.len().to_string());
    }
    let mut del = vec!["DEL"];
    del.extend(keys.iter().map(String::as_str));
    if keys.is_empty() {
        del.push("none");
    }
    sites.b.redis(PORT, &del)?;
    assert_eq!(sites.b.redis_dataset(PORT)?, before);
    assert_eq!(
        sites.b.redis(PORT, &["GET", "greeting"])?,
        "from a docker container"
    );
    // Served through the ingress at both sites: B's own route, and A's forwarding to B.
    let via_b = sites
        .b
        .exec("redis-cli", &["-p", "16379", "GET", "greeting"])?;
    assert_eq!(via_b.trim(), "from a docker container");
    let via_a = sites.a.exec("redis-cli", &["-p", "16379", "DBSIZE"])?;
    assert_eq!(via_a.trim(), before.0);

    // It runs in B's Docker, and nothing is left at A.
    assert!(
        docker.containers("b")?.iter().any(|c| c == "b-redis"),
        "{:?}",
        docker.containers("b")
    );
    let at_a = docker.containers("a")?;
    assert!(at_a.is_empty(), "containers left at a: {at_a:?}");
    assert!(sites.a.has_no_workloads()?);
    assert!(
        sites.a.redis(PORT, &["PING"]).is_err(),
        "nothing serves on A's port any more"
    );
    let rules = sites.a.exec("iptables", &["-S"]).unwrap_or_default();
    assert!(!rules.contains("CRIU"), "{rules}");
    Ok(())
}

#[test]
fn a_failed_restore_in_docker_resumes_the_source() -> Result<()> {
    let mut opts = docker_options("dkfail");
    // B's copy of the image into its new container fails (in B's gateway only).
    opts.b_mount_setup = Some(ferry_e2e::fail_when("dkfail", "/usr/bin/cp", "-a"));
    let sites = TwoSites::start(opts)?;
    let docker = Docker::start(&sites)?;
    docker.run_redis_at_a(&sites, "redis", PORT, &[])?;
    sites.a.redis(PORT, &["DEBUG", "POPULATE", "10000"])?;
    let before = sites.a.redis_dataset(PORT)?;

    let (ok, m) = sites.migrate("redis", "b")?;
    assert!(!ok, "{m}");
    assert_eq!(m["phase"], "rolled_back", "{m}\n{}", sites.logs());
    let error = m["error"].as_str().unwrap_or_default();
    assert!(error.contains("injected failure"), "{error}");
    // A serves its data again, unpaused, and takes writes.
    assert_eq!(sites.a.redis_dataset(PORT)?, before);
    sites.a.redis(PORT, &["SET", "after", "rollback"])?;
    let state = docker.docker(
        "a",
        &["inspect", "--format", "{{.State.Status}}", "a-redis"],
    )?;
    assert_eq!(state.trim(), "running");
    assert_eq!(
        sites.a.ferry_json(&["workload", "ls"])?[0]["state"],
        "running"
    );
    // B kept nothing: no workload, no container.
    assert!(sites.b.has_no_workloads()?);
    let at_b = docker.containers("b")?;
    assert!(at_b.is_empty(), "containers left at b: {at_b:?}");
    Ok(())
}

#[test]
fn a_docker_container_is_checkpointed_and_restored_at_its_site() -> Result<()> {
    let sites = TwoSites::start(docker_options("ckdock"))?;
    let docker = Docker::start(&sites)?;
    docker.run_redis_at_a(&sites, "redis", PORT, &[])?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "20000", "key", "100"])?;
    let digest = sites.a.redis(PORT, &["DEBUG", "DIGEST"])?;
    // Checkpointed into standby: its container is gone, its image kept by the site.
    sites.a.ferry_json(&["checkpoint", "redis"])?;
    assert!(
        sites.a.redis(PORT, &["PING"]).is_err(),
        "standby still answers"
    );
    let at_a = docker.containers("a")?;
    assert!(at_a.is_empty(), "standby left containers: {at_a:?}");
    // Restored from that checkpoint, in a new container of the same name.
    sites.a.ferry(&["workload", "start", "redis"])?;
    assert_eq!(sites.a.redis(PORT, &["DEBUG", "DIGEST"])?, digest);
    assert_eq!(docker.containers("a")?, vec!["a-redis".to_string()]);
    Ok(())
}
