//! Service-level migration of PostgreSQL, end to end: the `postgres` service adapter makes
//! a fresh PostgreSQL at site B (its own initdb'd data directory) a logical replica of
//! site A's through a tunnel over the QUIC peer link, and promotes it while A's ingress
//! holds clients for the switch. Real gateways, real PostgreSQL 15 (run as the `postgres`
//! user: it refuses root), two network namespaces with no other path between them than the
//! peer link.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_e2e::{run, wait_for, Options, Site, TwoSites};

/// PostgreSQL's port at both sites (each site its own network) and its route at A.
const PORT: u16 = 5432;
const ROUTE_PORT: u16 = 15432;
const BIN: &str = "/usr/lib/postgresql/15/bin";
/// Rows written at A before the move (the table copy), and in a second database.
const BULK_ROWS: u64 = 20_000;
const APP_ROWS: u64 = 500;

/// Both sites run `process` and `postgres`; `ferry init` grants `postgres` nothing, so
/// the test grants what its manifest asks for, the programs it runs and the port of its
/// tunnel.
fn options(tag: &str) -> Options {
    let mut o = Options::new(tag);
    o.adapters = vec!["process".into(), "postgres".into()];
    let strings = |l: &[&str]| l.iter().map(ToString::to_string).collect();
    o.grants = vec![(
        "postgres".into(),
        strings(&["log", "exec", "tunnel", "files"]),
        strings(&["psql", "pg_dump"]),
    )];
    o.tunnel_ports = vec![("postgres".into(), vec![PORT])];
    o
}

/// Data and socket directories of one PostgreSQL instance per site, initdb'd as the
/// `postgres` user: both sites share this machine's filesystem, so each needs its own.
/// Removed when dropped, whatever the test's outcome (the instances are killed first,
/// with their gateways' cgroups, since `TwoSites` is declared after and dropped before).
struct Clusters {
    root: PathBuf,
}

impl Clusters {
    fn create(tag: &str) -> Result<Self> {
        let root = std::env::temp_dir().join(format!("ferry-e2e-pg-{tag}"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let clusters = Clusters { root };
        run(Command::new("chown")
            .arg("postgres:postgres")
            .arg(&clusters.root))?;
        for site in ["a", "b"] {
            let sock = clusters.sock(site);
            std::fs::create_dir_all(&sock)?;
            run(Command::new("chown").arg("postgres:postgres").arg(&sock))?;
            run(as_postgres(&format!("{BIN}/initdb"))
                .arg("-D")
                .arg(clusters.data(site))
                .args([
                    "--auth=trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]))
            .with_context(|| format!("initdb for site {site}"))?;
        }
        Ok(clusters)
    }

    fn data(&self, site: &str) -> PathBuf {
        self.root.join(format!("data-{site}"))
    }

    fn sock(&self, site: &str) -> PathBuf {
        self.root.join(format!("sock-{site}"))
    }

    /// The command that runs site `site`'s instance as `postgres`, in the foreground.
    fn command(&self, site: &str, logical: bool) -> Vec<String> {
        let mut cmd: Vec<String> = [
            "setpriv",
            "--reuid",
            "postgres",
            "--regid",
            "postgres",
            "--clear-groups",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        cmd.push(format!("{BIN}/postgres"));
        cmd.extend([
            "-D".to_string(),
            self.data(site).display().to_string(),
            "-p".into(),
            PORT.to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-k".into(),
            self.sock(site).display().to_string(),
        ]);
        if logical {
            cmd.extend(["-c".to_string(), "wal_level=logical".into()]);
        }
        cmd
    }
}

impl Drop for Clusters {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn as_postgres(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        "postgres",
        "--regid",
        "postgres",
        "--clear-groups",
        program,
    ]);
    c
}

/// `psql` at `site` against its instance (or `port`), tuples only; the output, trimmed.
fn psql_at(site: &Site, port: u16, db: &str, sql: &str) -> Result<String> {
    let p = port.to_string();
    Ok(site
        .exec(
            "psql",
            &[
                "-X",
                "-w",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &p,
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ],
        )?
        .trim()
        .to_string())
}

fn psql(site: &Site, db: &str, sql: &str) -> Result<String> {
    psql_at(site, PORT, db, sql)
}

fn answers(site: &Site) -> bool {
    psql(site, "postgres", "SELECT 1").is_ok_and(|r| r == "1")
}

/// Starts `name` at A through the API with a route, and waits until it answers.
fn run_postgres_at_a(sites: &TwoSites, clusters: &Clusters, logical: bool) -> Result<()> {
    let (p, route) = (PORT.to_string(), format!("0.0.0.0:{ROUTE_PORT}"));
    let mut args = vec![
        "workload",
        "run",
        "pg",
        "--port",
        &p,
        "--route",
        &route,
        "--setting",
        "service=postgres",
        "--",
    ];
    let cmd = clusters.command("a", logical);
    args.extend(cmd.iter().map(String::as_str));
    sites.a.ferry(&args)?;
    wait_for("postgres at a", Duration::from_secs(20), || {
        answers(&sites.a).then_some(())
    })
}

/// `ferry migrate pg --to b` flags that run B's own instance (its data directory).
fn to_b(clusters: &Clusters) -> Vec<String> {
    let mut flags: Vec<String> = ["--setting", "service=postgres", "--"]
        .iter()
        .map(ToString::to_string)
        .collect();
    flags.extend(clusters.command("b", true));
    flags
}

/// What one client saw: every insert it tried, acknowledged with its id or not.
#[derive(Default)]
struct Inserts {
    acked: BTreeMap<String, i64>,
    failed: Vec<(String, String)>,
    /// Longest time between two acknowledgements.
    max_gap: Duration,
    /// Acknowledgements after `migrated` was set.
    acked_after: u64,
}

/// Inserts rows through A's route, one connection per insert (a PostgreSQL session does
/// not survive a re-bound connection: a new connection is what reaches B after the move),
/// until `stop`.
fn client(sites: &TwoSites, id: usize, stop: &AtomicBool, migrated: &AtomicBool) -> Inserts {
    let mut seen = Inserts::default();
    let mut last = Instant::now();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let v = format!("c{id}-{n}");
        let sql = format!("INSERT INTO items (v) VALUES ('{v}') RETURNING id");
        let outcome = sites
            .a
            .command("psql")
            .args([
                "-X",
                "-w",
                "-q",
                "-A",
                "-t",
                "-h",
                "127.0.0.1",
                "-p",
                &ROUTE_PORT.to_string(),
            ])
            .args(["-U", "postgres", "-d", "postgres", "-c", &sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .output();
        match outcome {
            Ok(out) if out.status.success() => {
                match String::from_utf8_lossy(&out.stdout).trim().parse() {
                    Ok(id) => {
                        seen.max_gap = seen.max_gap.max(last.elapsed());
                        last = Instant::now();
                        seen.acked.insert(v, id);
                        if migrated.load(Ordering::Relaxed) {
                            seen.acked_after += 1;
                        }
                    }
                    Err(_) => seen
                        .failed
                        .push((v, String::from_utf8_lossy(&out.stdout).into_owned())),
                }
            }
            Ok(out) => seen
                .failed
                .push((v, String::from_utf8_lossy(&out.stderr).into_owned())),
            Err(e) => seen.failed.push((v, e.to_string())),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    seen
}

/// Is a process running with `data_dir` on its command line (a postgres of that cluster)?
fn runs_with(data_dir: &Path) -> bool {
    let needle = data_dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()))
    })
}

#[test]
fn postgres_moves_by_logical_replication_while_clients_insert() -> Result<()> {
    let clusters = Clusters::create("pgsvc")?;
    let sites = TwoSites::start(options("pgsvc"))?;
    run_postgres_at_a(&sites, &clusters, true)?;
    psql(
        &sites.a,
        "postgres",
        "CREATE TABLE items (id bigserial PRIMARY KEY, v text NOT NULL UNIQUE, payload text)",
    )?;
    psql(
        &sites.a,
        "postgres",
        &format!(
            "INSERT INTO items (v, payload) SELECT 'bulk-' || i, repeat(md5(i::text), 8) FROM generate_series(1, {BULK_ROWS}) i"
        ),
    )?;
    psql(&sites.a, "postgres", "CREATE DATABASE app")?;
    psql(
        &sites.a,
        "app",
        "CREATE TABLE notes (id serial PRIMARY KEY, body text)",
    )?;
    psql(
        &sites.a,
        "app",
        &format!(
            "INSERT INTO notes (body) SELECT 'note ' || i FROM generate_series(1, {APP_ROWS}) i"
        ),
    )?;

    let stop = Arc::new(AtomicBool::new(false));
    let migrated = Arc::new(AtomicBool::new(false));
    let (ok, m, seen) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..2)
            .map(|id| {
                let (stop, migrated, sites) = (&stop, &migrated, &sites);
                scope.spawn(move || client(sites, id, stop, migrated))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1500));
        let flags = to_b(&clusters);
        let mut all = vec!["--approach", "service"];
        all.extend(flags.iter().map(String::as_str));
        let outcome = sites.migrate_with("pg", "b", &all);
        migrated.store(true, Ordering::Relaxed);
        // Clients keep inserting through A's route, which now leads to B.
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        let seen: Vec<Inserts> = clients.into_iter().filter_map(|c| c.join().ok()).collect();
        outcome.map(|(ok, m)| (ok, m, seen))
    })?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert_eq!(m["approach"], "service", "{m}");
    assert!(m["timings"]["dump_ms"].is_null(), "a checkpoint ran: {m}");
    eprintln!(
        "migration: approach {}, timings {}, sync {}",
        m["approach"], m["timings"], m["sync"]
    );
    assert_eq!(seen.len(), 2, "a client thread panicked");
    let acked: BTreeMap<&str, i64> = seen
        .iter()
        .flat_map(|s| s.acked.iter().map(|(v, id)| (v.as_str(), *id)))
        .collect();
    let failed: Vec<&(String, String)> = seen.iter().flat_map(|s| &s.failed).collect();
    let max_gap = seen.iter().map(|s| s.max_gap).max().unwrap_or_default();
    eprintln!(
        "clients: {} acknowledged, {} failed, longest gap between acknowledgements {} ms; failures: {:?}",
        acked.len(),
        failed.len(),
        max_gap.as_millis(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        acked.len() >= 20,
        "too few inserts to show anything: {}",
        acked.len()
    );
    assert!(
        seen.iter().map(|s| s.acked_after).sum::<u64>() > 0,
        "no insert was acknowledged through A's route after the move"
    );

    // Every acknowledged row is at B, with the id its client was told.
    let at_b: BTreeMap<String, i64> = psql(
        &sites.b,
        "postgres",
        "SELECT v, id FROM items WHERE v LIKE 'c%'",
    )?
    .lines()
    .filter_map(|l| l.split_once('|'))
    .map(|(v, id)| Ok((v.to_string(), id.parse()?)))
    .collect::<Result<_>>()?;
    for (v, id) in &acked {
        assert_eq!(
            at_b.get(*v),
            Some(id),
            "acknowledged row {v} (id {id}) is not at B as acknowledged"
        );
    }
    assert_eq!(
        psql(
            &sites.b,
            "postgres",
            "SELECT count(*) FROM items WHERE v LIKE 'bulk-%'"
        )?,
        BULK_ROWS.to_string()
    );
    assert_eq!(
        psql(&sites.b, "app", "SELECT count(*) FROM notes")?,
        APP_ROWS.to_string()
    );

    // B is the primary: it takes writes, its sequences continue past every id A gave out,
    // and it follows no one.
    let max_id: i64 = psql(&sites.b, "postgres", "SELECT max(id) FROM items")?.parse()?;
    let max_acked = acked.values().copied().max().unwrap_or(0);
    let next: i64 = psql(
        &sites.b,
        "postgres",
        "INSERT INTO items (v) VALUES ('after') RETURNING id",
    )?
    .parse()?;
    assert!(
        next > max_id && next > max_acked,
        "id {next} at B after the move, ids up to {max_id} before"
    );
    let note: i64 = psql(
        &sites.b,
        "app",
        "INSERT INTO notes (body) VALUES ('after') RETURNING id",
    )?
    .parse()?;
    assert!(note > APP_ROWS as i64, "{note}");
    assert_eq!(
        psql(&sites.b, "postgres", "SELECT count(*) FROM pg_subscription")?,
        "0"
    );
    assert_eq!(
        psql(&sites.b, "postgres", "SHOW default_transaction_read_only")?,
        "off"
    );
    let at_b = sites.b.ferry_json(&["workload", "ls"])?;
    assert_eq!(at_b[0]["name"], "pg", "{at_b}");

    // Nothing runs at A: no postgres of A's cluster, nothing answers on its port; A's
    // route leads to B.
    wait_for("the source to stop", Duration::from_secs(10), || {
        (!answers(&sites.a) && !runs_with(&clusters.data("a"))).then_some(())
    })?;
    assert_eq!(
        psql_at(
            &sites.a,
            ROUTE_PORT,
            "postgres",
            "SELECT v FROM items WHERE v = 'after'"
        )?,
        "after"
    );
    // The adapter's scratch files are gone.
    let work = sites.work_root.join("pg");
    if let Ok(entries) = std::fs::read_dir(&work) {
        let left: Vec<_> = entries
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".ferry-postgres")
            })
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "scratch files left: {left:?}");
    }
    Ok(())
}

#[test]
fn a_source_without_logical_wal_is_refused_and_keeps_serving() -> Result<()> {
    let clusters = Clusters::create("pgwal")?;
    let sites = TwoSites::start(options("pgwal"))?;
    run_postgres_at_a(&sites, &clusters, false)?;
    psql(
        &sites.a,
        "postgres",
        "CREATE TABLE t (id serial PRIMARY KEY)",
    )?;
    let flags = to_b(&clusters);
    let mut plan_args = vec!["migrate", "pg", "--to", "b", "--plan"];
    plan_args.extend(flags.iter().map(String::as_str));
    let plan = sites.a.ferry(&plan_args)?;
    eprintln!("{plan}");
    let service = plan
        .lines()
        .find(|l| l.starts_with("service") && l.contains("postgres"))
        .with_context(|| format!("no postgres service candidate: {plan}"))?;
    assert!(service.contains(" no "), "{plan}");
    assert!(service.contains("wal_level=replica"), "{plan}");
    assert!(service.contains("-c wal_level=logical"), "{plan}");

    let mut forced = vec!["--approach", "service"];
    forced.extend(flags.iter().map(String::as_str));
    let (ok, m) = sites.migrate_with("pg", "b", &forced)?;
    assert!(!ok, "{m}");
    let error = m["error"].as_str().unwrap_or_default();
    assert!(error.contains("wal_level=logical"), "{m}");
    // A kept serving and still takes writes; nothing was started at B.
    assert_eq!(
        psql(
            &sites.a,
            "postgres",
            "INSERT INTO t DEFAULT VALUES RETURNING id"
        )?,
        "1"
    );
    assert!(!answers(&sites.b));
    if runs_with(&clusters.data("b")) {
        bail!("a postgres of B's cluster runs");
    }
    Ok(())
}

#[test]
fn a_table_created_during_the_move_fails_the_cut_over_and_the_source_takes_writes_again(
) -> Result<()> {
    let clusters = Clusters::create("pgddl")?;
    let sites = TwoSites::start(options("pgddl"))?;
    run_postgres_at_a(&sites, &clusters, true)?;
    psql(
        &sites.a,
        "postgres",
        "CREATE TABLE items (id bigserial PRIMARY KEY, v text, payload text)",
    )?;
    // Enough rows that copying them takes a while: the new table appears meanwhile.
    psql(
        &sites.a,
        "postgres",
        "INSERT INTO items (v, payload) SELECT 'bulk-' || i, repeat(md5(i::text), 8) FROM generate_series(1, 200000) i",
    )?;
    let flags = to_b(&clusters);
    let mut args = vec![
        "--output",
        "json",
        "migrate",
        "pg",
        "--to",
        "b",
        "--no-wait",
        "--approach",
        "service",
    ];
    args.extend(flags.iter().map(String::as_str));
    let m: serde_json::Value = serde_json::from_str(&sites.a.ferry(&args)?)?;
    let id = m["id"].as_str().context("id")?.to_string();
    // Once the replica subscribes (its slot exists at A, so its tables are fixed) and
    // while it still copies, a table the replica will not have.
    wait_for("the replica's slot at a", Duration::from_secs(30), || {
        psql(
            &sites.a,
            "postgres",
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'ferry\\_%'",
        )
        .is_ok_and(|n| n == "1")
        .then_some(())
    })?;
    psql(
        &sites.a,
        "postgres",
        "CREATE TABLE late (id int PRIMARY KEY)",
    )?;
    let m = wait_for("the move to end", Duration::from_secs(60), || {
        let m = sites.a.ferry_json(&["migration", "show", &id]).ok()?;
        matches!(m["phase"].as_str(), Some("rolled_back" | "completed")).then_some(m)
    })?;
    eprintln!("{m}");
    assert_eq!(m["phase"], "rolled_back", "{m}\n{}", sites.logs());
    let error = m["error"].as_str().unwrap_or_default();
    assert!(error.contains("DDL does not replicate"), "{m}");
    // The source was unfenced and takes writes; the adapter left no publication or slot
    // there; the replica was discarded.
    assert_eq!(
        psql(&sites.a, "postgres", "SHOW default_transaction_read_only")?,
        "off"
    );
    psql(&sites.a, "postgres", "INSERT INTO late VALUES (1)")?;
    assert_eq!(
        psql(&sites.a, "postgres", "SELECT count(*) FROM pg_publication")?,
        "0"
    );
    assert_eq!(
        psql(
            &sites.a,
            "postgres",
            "SELECT count(*) FROM pg_replication_slots"
        )?,
        "0"
    );
    wait_for("the replica to go", Duration::from_secs(15), || {
        (!answers(&sites.b) && !runs_with(&clusters.data("b"))).then_some(())
    })?;
    Ok(())
}
