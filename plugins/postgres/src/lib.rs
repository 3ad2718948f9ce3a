//! `postgres` service adapter: moves a PostgreSQL server by logical replication instead
//! of a checkpoint.
//!
//! Physical (streaming) replication does not fit a service-level move: the destination's
//! runtime adapter starts a fresh instance on its own initdb'd data directory before the
//! sync begins, and a physical standby needs a base backup before its server starts. So at
//! the destination the fresh instance gets the source's schema (`pg_dump --schema-only`
//! through the migration's `tunnel`, applied locally), and per database a publication
//! `FOR ALL TABLES` at the source and a subscription here whose connection is the tunnel's
//! local endpoint: the destination's postgres server itself copies every table and then
//! streams the source's changes, while clients keep using the source.
//!
//! At the switch, while the source site's ingress holds every client, the adapter at the
//! source fences it (`default_transaction_read_only` through `ALTER SYSTEM`, checked to be
//! seen by new sessions, and any open write transaction ended) and hands over a mark: the
//! WAL position read after the fence, and every sequence's value (PostgreSQL 15's logical
//! replication does not carry sequences). The destination waits until its subscriptions
//! have applied everything up to that position, drops them without needing the source,
//! sets the sequences, and drops the source's replication slots best effort.
//!
//! Everything goes through `psql`, `pg_dump` and `rm` on the site's `exec` allow-list; at
//! each site `exec` runs in that site's network, so `127.0.0.1:PORT` is the local
//! instance. Names of publications, slots and subscriptions come from the workload and
//! the two sites ([`pg::Names`]), so every call finds them again without keeping state.

mod pg;
mod psql;

use std::time::{Duration, Instant};

use ferry_adapter_sdk::service::{feasible, infeasible, peer, probe_here, reason};
use ferry_adapter_sdk::*;
use pg::{caught_up, ident, literal, Lsn, Mark, Names, Progress, Subscription, Version};
use psql::{tool_version, Scratch, Server, QUICK_MS, SLOW_MS};

struct Postgres;

/// How long a fresh instance may take to accept sessions once its port is open.
const READY_MS: u64 = 30_000;
/// How long the replica may take to apply everything up to the fenced source's mark
/// while clients are held.
const CATCH_UP_MS: u64 = 5_000;
const POLL: Duration = Duration::from_millis(5);
/// The switch: psql sessions at the source (two, and one more per database), at the
/// destination (a catch-up poll, one per database, whose `DROP SUBSCRIPTION` waits for
/// its worker) and one through the tunnel, 30 to 60 ms each; the engine adds the link's
/// round trips.
fn expected_downtime_ms(databases: usize) -> u64 {
    120 + 100 * databases as u64
}
/// How soon the destination's launcher starts the apply worker of another subscription
/// during the sync (PostgreSQL 15 starts at most one round of workers per
/// `wal_retrieve_retry_interval`, 5 s by default: one database would wait for the other).
const SYNC_RETRY_INTERVAL: &str = "100ms";
/// Replication slots and WAL senders the source needs beyond one per database: the
/// table-copy workers of a subscription (`max_sync_workers_per_subscription`, 2).
const SYNC_WORKERS: i64 = 2;

/// User tables, in a catalog query over `pg_class c JOIN pg_namespace n`.
const USER_TABLES: &str =
    "c.relkind = 'r' AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'";

/// The migration's names, seen from the destination (the peer is the source).
fn names_at_destination(w: &Workload) -> Result<Names, AdapterError> {
    let source = w.peer.as_deref().ok_or_else(|| no_peer(w))?;
    Ok(Names::new(&w.name, source, &w.site))
}

/// The migration's names, seen from the source (the peer is the destination).
fn names_at_source(w: &Workload) -> Result<Names, AdapterError> {
    let destination = w.peer.as_deref().ok_or_else(|| no_peer(w))?;
    Ok(Names::new(&w.name, &w.site, destination))
}

fn no_peer(w: &Workload) -> AdapterError {
    AdapterError::Failed(format!(
        "the call about {} names no other site; the postgres adapter acts only during a migration",
        w.name
    ))
}

/// `postgres` (by path, or as the command itself) runs in the command, or `--setting
/// service=postgres` for a wrapper. `setpriv --reuid postgres …` names a user, not the
/// program, so a bare word counts only as the program.
fn is_postgres(w: &Workload) -> bool {
    let runs_postgres = w.command.iter().enumerate().any(|(i, arg)| {
        let base = arg.rsplit('/').next().unwrap_or(arg);
        base == "postgres" && (i == 0 || arg.contains('/'))
    });
    runs_postgres || setting(w, "service") == Some("postgres")
}


fn warn(message: &str) {
    log::log(log::Level::Warn, message);
}

/// A source database: its oid (which names its publication) and what recreates it.
struct Database {
    oid: u32,
    name: String,
    encoding: String,
    collate: String,
    ctype: String,
}

/// The databases a replica needs: every one that takes connections but the templates.
fn databases(server: &Server) -> Result<Vec<Database>, AdapterError> {
    let rows = server.query(
        &server.maintenance_db,
        &[
            "SELECT oid, datname, pg_catalog.pg_encoding_to_char(encoding), datcollate, datctype \
           FROM pg_catalog.pg_database WHERE datallowconn AND NOT datistemplate ORDER BY oid",
        ],
        QUICK_MS,
    )?;
    rows.into_iter()
        .map(|r| match r.as_slice() {
            [oid, name, encoding, collate, ctype] => Ok(Database {
                oid: oid
                    .parse()
                    .map_err(|_| server.bad(format!("database oid {oid:?}")))?,
                name: name.clone(),
                encoding: encoding.clone(),
                collate: collate.clone(),
                ctype: ctype.clone(),
            }),
            other => Err(server.bad(format!("unexpected pg_database row {other:?}"))),
        })
        .collect()
}

/// At the source: PostgreSQL that can publish logically, with room for a replica's
/// senders and slots, and tables logical replication can carry.
fn probe_source(w: &Workload) -> Result<Plan, AdapterError> {
    let local = Server::local(w)?;
    let row = local.query(
        &local.maintenance_db,
        &["SELECT current_setting('server_version_num'), current_setting('wal_level'), \
           pg_catalog.pg_is_in_recovery()::text, \
           current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_catalog.pg_replication_slots), \
           current_setting('max_wal_senders')::int - (SELECT count(*) FROM pg_catalog.pg_stat_replication)"],
        QUICK_MS,
    )?;
    let [version, wal_level, standby, free_slots, free_senders] =
        row.first().map(Vec::as_slice).unwrap_or_default()
    else {
        return Err(local.bad("the settings query answered no row"));
    };
    let version = Version::from_num(version)
        .ok_or_else(|| local.bad(format!("server_version_num {version:?}")))?;
    let at = format!("postgres {version} at {}", w.site);
    if wal_level != "logical" {
        return Ok(infeasible(format!(
            "{at} runs with wal_level={wal_level}; a logical replica needs wal_level=logical: restart it with -c wal_level=logical (or ALTER SYSTEM SET wal_level = logical and a restart)"
        )));
    }
    if standby == "true" {
        return Ok(infeasible(format!(
            "{at} is a standby (in recovery); move its primary instead"
        )));
    }
    let dbs = databases(&local)?;
    let needed = dbs.len() as i64 + SYNC_WORKERS;
    for (what, free, setting) in [
        ("replication slots", free_slots, "max_replication_slots"),
        ("WAL senders", free_senders, "max_wal_senders"),
    ] {
        let free: i64 = free.parse().unwrap_or(0);
        if free < needed {
            return Ok(infeasible(format!(
                "{at} has {free} free {what}; a replica of its {} database(s) needs {needed}: raise {setting} (needs a restart)",
                dbs.len()
            )));
        }
    }
    let mut problems = Vec::new();
    for db in &dbs {
        problems.extend(
            unreplicable(&local, &db.name)?
                .into_iter()
                .map(|p| format!("database {}: {p}", db.name)),
        );
    }
    if !problems.is_empty() {
        return Ok(infeasible(format!(
            "{at} holds what logical replication cannot carry: {}",
            problems.join("; ")
        )));
    }
    Ok(feasible(format!(
        "{at} (wal_level=logical, {} database{}): a logical replica at {} follows it through the tunnel, then is promoted while the ingress holds clients",
        dbs.len(),
        if dbs.len() == 1 { "" } else { "s" },
        peer(w)
    ), Some(expected_downtime_ms(dbs.len()))))
}

/// What in database `db` a publication would not carry, or would break: tables without a
/// primary key or replica identity (with a publication the source refuses their
/// `UPDATE`s and `DELETE`s), unlogged tables (never published) and large objects.
fn unreplicable(local: &Server, db: &str) -> Result<Vec<String>, AdapterError> {
    let rows = local.query(
        db,
        &[&format!(
            "SELECT 'tables without a primary key or replica identity (add one, or ALTER TABLE … REPLICA IDENTITY FULL)', \
                    pg_catalog.string_agg(pg_catalog.format('%I.%I', n.nspname, c.relname), ', ') \
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE {USER_TABLES} AND c.relpersistence = 'p' AND (c.relreplident = 'n' OR (c.relreplident = 'd' \
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))) \
             HAVING count(*) > 0 \
            UNION ALL \
             SELECT 'unlogged tables (never published)', \
                    pg_catalog.string_agg(pg_catalog.format('%I.%I', n.nspname, c.relname), ', ') \
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE {USER_TABLES} AND c.relpersistence = 'u' HAVING count(*) > 0 \
            UNION ALL \
             SELECT 'large objects (never published)', count(*)::text \
               FROM pg_catalog.pg_largeobject_metadata HAVING count(*) > 0"
        )],
        QUICK_MS,
    )?;
    Ok(rows.into_iter().map(|r| r.join(": ")).collect())
}

/// At the destination: this site has the tools that build a replica (the fresh server
/// itself is checked once it runs, at `start-sync`).
fn probe_destination(w: &Workload) -> Result<Plan, AdapterError> {
    let psql = tool_version("psql")?;
    let dump = tool_version("pg_dump")?;
    Ok(feasible(format!(
        "psql {psql} and pg_dump {dump} at {} can make a fresh PostgreSQL there a logical replica of {} at {}",
        w.site,
        w.name,
        peer(w)
    ), None))
}

/// The migration's subscriptions at the local instance (one catalog query: subscriptions
/// and their apply workers are cluster-wide), without their tables.
fn subscriptions(local: &Server, names: &Names) -> Result<Vec<(Subscription, u32)>, AdapterError> {
    let rows = local.query(
        &local.maintenance_db,
        &[&format!(
            "SELECT s.subname, d.datname, s.oid, (w.pid IS NOT NULL)::text, coalesce(w.latest_end_lsn::text, '') \
               FROM pg_catalog.pg_subscription s JOIN pg_catalog.pg_database d ON d.oid = s.subdbid \
               LEFT JOIN pg_catalog.pg_stat_subscription w ON w.subid = s.oid AND w.relid IS NULL \
              WHERE {} ORDER BY s.subname",
            names.matches("s.subname")
        )],
        QUICK_MS,
    )?;
    rows.into_iter()
        .map(|r| match r.as_slice() {
            [name, database, oid, applying, applied] => Ok((
                Subscription {
                    name: name.clone(),
                    database: database.clone(),
                    applying: applying == "true",
                    applied: Lsn::parse(applied),
                    ..Subscription::default()
                },
                oid.parse().unwrap_or(0),
            )),
            other => Err(local.bad(format!("unexpected pg_subscription row {other:?}"))),
        })
        .collect()
}

/// Fills in each subscription's tables (ready and all) and their size here: one query
/// per database, where `pg_subscription_rel` lives.
fn count_tables(
    local: &Server,
    names: &Names,
    subs: &mut [Subscription],
) -> Result<(), AdapterError> {
    let mut dbs: Vec<String> = subs.iter().map(|s| s.database.clone()).collect();
    dbs.dedup();
    for db in dbs {
        let rows = local.query(
            &db,
            &[&format!(
                "SELECT s.subname, count(*), count(*) FILTER (WHERE r.srsubstate = 'r'), \
                        coalesce(sum(pg_catalog.pg_total_relation_size(r.srrelid)), 0) \
                   FROM pg_catalog.pg_subscription_rel r JOIN pg_catalog.pg_subscription s ON s.oid = r.srsubid \
                  WHERE {} GROUP BY s.subname",
                names.matches("s.subname")
            )],
            QUICK_MS,
        )?;
        for r in rows {
            if let [name, tables, ready, bytes] = r.as_slice() {
                if let Some(sub) = subs.iter_mut().find(|s| &s.name == name) {
                    sub.tables = tables.parse().unwrap_or(0);
                    sub.tables_ready = ready.parse().unwrap_or(0);
                    sub.bytes = bytes.parse().unwrap_or(0);
                }
            }
        }
    }
    Ok(())
}

/// At the source, best effort: ends the walsenders of this migration's replication
/// slots (and of the table-copy slots of subscriptions `suboids`) and drops the slots,
/// so the source does not keep WAL for a replica that is gone. Bounded to about two
/// seconds; what is left is logged with the statement that drops it.
fn drop_source_slots(source: &Server, names: &Names, suboids: &[u32]) {
    let mut cond = names.matches("slot_name");
    for oid in suboids {
        cond.push_str(&format!(" OR slot_name::text LIKE 'pg\\_{oid}\\_sync\\_%'"));
    }
    let drop = format!(
        "DO $ferry$ DECLARE s record; BEGIN \
           FOR i IN 1..200 LOOP \
             PERFORM pg_catalog.pg_terminate_backend(active_pid) FROM pg_catalog.pg_replication_slots \
               WHERE ({cond}) AND active_pid IS NOT NULL; \
             FOR s IN SELECT slot_name FROM pg_catalog.pg_replication_slots WHERE ({cond}) AND NOT active LOOP \
               BEGIN PERFORM pg_catalog.pg_drop_replication_slot(s.slot_name); \
               EXCEPTION WHEN OTHERS THEN NULL; END; \
             END LOOP; \
             EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE ({cond})); \
             PERFORM pg_catalog.pg_sleep(0.01); \
           END LOOP; END $ferry$"
    );
    let left = format!("SELECT count(*) FROM pg_catalog.pg_replication_slots WHERE ({cond})");
    let outcome = source.query(
        &source.maintenance_db,
        &["SET default_transaction_read_only = off", &drop, &left],
        QUICK_MS,
    );
    match outcome {
        Ok(rows) if rows.first().and_then(|r| r.first()).map(String::as_str) == Some("0") => {}
        Ok(_) | Err(_) => warn(&format!(
            "replication slots of this migration may be left at the source, keeping its WAL ({}); drop them there: SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE {cond}",
            match outcome {
                Err(e) => reason(e),
                Ok(_) => "still active".into(),
            }
        )),
    }
}

/// What the fence mark needs from database `db` of the source: every sequence's value
/// and the tables of this migration's publication, as rows tagged `sequence` and
/// `publication`.
fn mark_facts(names: &Names) -> String {
    format!(
        "SELECT 'sequence', pg_catalog.format('%I.%I', schemaname, sequencename), last_value::text \
           FROM pg_catalog.pg_sequences WHERE last_value IS NOT NULL \
         UNION ALL \
         SELECT 'publication', p.pubname::text, \
                (SELECT count(*) FROM pg_catalog.pg_publication_tables t WHERE t.pubname = p.pubname)::text \
           FROM pg_catalog.pg_publication p WHERE {}",
        names.matches("p.pubname")
    )
}

/// Checks the fence and reads the mark at the source, in a session opened after the
/// fence (so it sees what every new session sees): read-only by default, no write
/// transaction left (ended, up to 2 s each), the WAL position (every change the source
/// took is at or below it), then per database with a publication of this migration its
/// table count and every sequence's value. One session for the maintenance database, one
/// more per other database.
/// A committed transaction in the session's database, written after the mark was read,
/// so that every database's WAL sender has a transaction of its own database past the
/// mark to decode and reports a position past it to its subscriber. Without it, a
/// subscription of an idle database was once seen short of the mark (by the other
/// database's last commit) for the whole catch-up wait. The message is not published
/// (subscriptions do not ask for messages); it only moves each sender on.
const NUDGE: &str = "SELECT 'nudge', pg_catalog.pg_logical_emit_message(true, 'ferry', 'fence')::text";

fn read_mark(local: &Server, names: &Names) -> Result<Mark, AdapterError> {
    let facts = mark_facts(names);
    let rows = local.query(
        &local.maintenance_db,
        &[
            "SELECT 'read-only', current_setting('default_transaction_read_only')",
            "SELECT 'writers left', count(*) FILTER (WHERE NOT pg_catalog.pg_terminate_backend(pid, 2000))::text \
               FROM pg_catalog.pg_stat_activity \
              WHERE backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid() AND backend_xid IS NOT NULL",
            "SELECT 'lsn', pg_catalog.pg_current_wal_lsn()::text",
            NUDGE,
            "SELECT 'db', datname FROM pg_catalog.pg_database WHERE datallowconn AND NOT datistemplate ORDER BY oid",
            &facts,
        ],
        QUICK_MS,
    )?;
    let field = |tag: &str| {
        rows.iter()
            .find(|r| r.first().map(String::as_str) == Some(tag))
            .and_then(|r| r.get(1))
            .map(String::as_str)
    };
    if field("read-only") != Some("on") || field("writers left") != Some("0") {
        return Err(local.bad(format!(
            "the fence did not take: default_transaction_read_only is {:?} in a new session, {:?} write transaction(s) could not be ended",
            field("read-only"),
            field("writers left")
        )));
    }
    let lsn = field("lsn")
        .and_then(Lsn::parse)
        .ok_or_else(|| local.bad(format!("pg_current_wal_lsn {:?}", field("lsn"))))?;
    let mut mark = Mark {
        lsn,
        databases: Vec::new(),
    };
    let dbs: Vec<&str> = rows
        .iter()
        .filter(|r| r.first().map(String::as_str) == Some("db"))
        .filter_map(|r| r.get(1).map(String::as_str))
        .collect();
    for db in dbs {
        let other;
        let facts_rows = if db == local.maintenance_db {
            &rows
        } else {
            other = local.query(db, &[NUDGE, &facts], QUICK_MS)?;
            &other
        };
        let mut d = pg::DatabaseMark {
            name: db.to_string(),
            ..pg::DatabaseMark::default()
        };
        for r in facts_rows {
            match r.as_slice() {
                [kind, name, value] if kind == "sequence" => {
                    let v = value
                        .parse()
                        .map_err(|_| local.bad(format!("sequence {name} at {value:?}")))?;
                    d.sequences.push((name.clone(), v));
                }
                [kind, name, value] if kind == "publication" => {
                    let v = value.parse().map_err(|_| {
                        local.bad(format!("publication {name} with {value:?} tables"))
                    })?;
                    d.publications.push((name.clone(), v));
                }
                _ => {}
            }
        }
        if !d.publications.is_empty() {
            mark.databases.push(d);
        }
    }
    if mark.databases.is_empty() {
        return Err(AdapterError::Failed(format!(
            "no publication of this migration ({}…) at the source; was start-sync run?",
            names.prefix()
        )));
    }
    Ok(mark)
}

/// Lifts the fence (the server-wide default set by `fence`).
fn lift_fence(local: &Server) -> Result<(), AdapterError> {
    local.execute(
        &local.maintenance_db,
        &[
            "ALTER SYSTEM RESET default_transaction_read_only",
            "SELECT pg_catalog.pg_reload_conf()",
        ],
        QUICK_MS,
    )
}

/// The fresh local instance's version once it accepts sessions: its port opens (what the
/// engine waits for) before it has finished starting up ("the database system is
/// starting up").
fn ready(local: &Server) -> Result<Version, AdapterError> {
    let deadline = Instant::now() + Duration::from_millis(READY_MS);
    loop {
        match local.version() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(AdapterError::Failed(format!(
                    "the fresh instance did not accept sessions within {READY_MS} ms: {}",
                    reason(e)
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Sets (during the sync) or resets the destination's `wal_retrieve_retry_interval`.
fn retry_interval(local: &Server, value: Option<&str>) -> Result<(), AdapterError> {
    let set = match value {
        Some(v) => format!(
            "ALTER SYSTEM SET wal_retrieve_retry_interval = {}",
            literal(v)
        ),
        None => "ALTER SYSTEM RESET wal_retrieve_retry_interval".into(),
    };
    local.execute(
        &local.maintenance_db,
        &[&set, "SELECT pg_catalog.pg_reload_conf()"],
        QUICK_MS,
    )
}

/// At the destination, before anything is copied: a replica starts from an instance with
/// no table of its own and no subscription of an earlier attempt.
fn check_fresh(
    local: &Server,
    names: &Names,
    dbs: &[Database],
    present: &[String],
    site: &str,
) -> Result<(), AdapterError> {
    let mut found = Vec::new();
    let leftovers = subscriptions(local, names)?;
    if !leftovers.is_empty() {
        found.push(format!(
            "{} subscription(s) of an earlier attempt",
            leftovers.len()
        ));
    }
    for db in dbs.iter().filter(|d| present.contains(&d.name)) {
        let n = local.query(
            &db.name,
            &[&format!(
                "SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE {USER_TABLES}"
            )],
            QUICK_MS,
        )?;
        let n = n
            .first()
            .and_then(|r| r.first())
            .map_or("0", String::as_str);
        if n != "0" {
            found.push(format!("{n} table(s) in database {}", db.name));
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(AdapterError::Failed(format!(
        "the postgres instance at {site} is not fresh ({}); a logical replica must start from an empty cluster: start it on a new data directory (initdb) and migrate again",
        found.join(", ")
    )))
}

/// Copies database `db`'s schema from the source and subscribes to its publication.
fn replicate_database(
    w: &Workload,
    local: &Server,
    source: &Server,
    names: &Names,
    db: &Database,
    present: bool,
) -> Result<(), AdapterError> {
    let name = names.for_database(db.oid);
    if !present {
        local.execute(
            &local.maintenance_db,
            &[&format!(
                "CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}",
                ident(&db.name),
                literal(&db.encoding),
                literal(&db.collate),
                literal(&db.ctype)
            )],
            SLOW_MS,
        )?;
    }
    // An earlier attempt's publication and idle slot, which the dump would copy and the
    // subscription would collide with.
    source.execute(
        &db.name,
        &[
            "SET default_transaction_read_only = off",
            &format!(
                "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots \
                  WHERE slot_name = {} AND NOT active",
                literal(&name)
            ),
            &format!("DROP PUBLICATION IF EXISTS {}", ident(&name)),
        ],
        QUICK_MS,
    )?;
    {
        let scratch = Scratch::new(w, db.oid);
        source.dump_schema(&db.name, &scratch.path)?;
        local.apply_file(&db.name, &scratch.path)?;
    }
    source.execute(
        &db.name,
        &[&format!(
            "CREATE PUBLICATION {} FOR ALL TABLES",
            ident(&name)
        )],
        QUICK_MS,
    )?;
    // The local server connects to the source itself, through the tunnel's endpoint.
    local.execute(
        &db.name,
        &[&format!(
            "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {}",
            ident(&name),
            literal(&source.conninfo(&db.name)),
            ident(&name)
        )],
        SLOW_MS,
    )
}

impl ServiceAdapter for Postgres {
    fn describe() -> AdapterInfo {
        AdapterInfo {
            name: "postgres".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            approaches: vec![Approach::Service],
            runtimes: vec!["postgres".into()],
        }
    }

    fn probe(w: Workload) -> Plan {
        if !is_postgres(&w) {
            return infeasible(format!(
                "{} is not a PostgreSQL server (its command does not run postgres; say --setting service=postgres if it is one)",
                w.name
            ));
        }
        probe_here(&w, probe_source, probe_destination)
    }

    fn start_sync(w: Workload) -> Result<(), AdapterError> {
        let names = names_at_destination(&w)?;
        let local = Server::local(&w)?;
        let source = Server::source(&w)?;
        let (here, there, dump) = (ready(&local)?, source.version()?, tool_version("pg_dump")?);
        if here.major < there.major || dump.major < there.major {
            return Err(AdapterError::Unsupported(format!(
                "postgres {there} at {} is newer than postgres {here} (pg_dump {dump}) at {}; a logical replica needs the same major version or a newer one",
                peer(&w),
                w.site
            )));
        }
        let dbs = databases(&source)?;
        // The databases this instance has (asked once: the freshness check and the
        // copy both need them).
        let present: Vec<String> = local
            .query(
                &local.maintenance_db,
                &["SELECT datname FROM pg_catalog.pg_database"],
                QUICK_MS,
            )?
            .into_iter()
            .filter_map(|r| r.into_iter().next())
            .collect();
        check_fresh(&local, &names, &dbs, &present, &w.site)?;
        if let Err(e) = retry_interval(&local, Some(SYNC_RETRY_INTERVAL)) {
            warn(&format!(
                "each database's replication may wait up to wal_retrieve_retry_interval to start: {}",
                reason(e)
            ));
        }
        for db in &dbs {
            replicate_database(&w, &local, &source, &names, db, present.contains(&db.name))
                .map_err(|e| {
                    AdapterError::Failed(format!("replicating database {}: {}", db.name, reason(e)))
                })?;
        }
        info(&format!(
            "postgres {here} at {} subscribes to postgres {there} at {} through {}:{} ({} database(s), publications {}…)",
            w.site,
            peer(&w),
            source.host,
            source.port,
            dbs.len(),
            names.prefix()
        ));
        Ok(())
    }

    fn sync_progress(w: Workload) -> Result<SyncState, AdapterError> {
        let names = names_at_destination(&w)?;
        let local = Server::local(&w)?;
        let mut subs: Vec<Subscription> = subscriptions(&local, &names)?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        count_tables(&local, &names, &mut subs)?;
        let source = Server::source(&w)?;
        let at = source.value(
            &source.maintenance_db,
            "SELECT pg_catalog.pg_current_wal_lsn()",
        )?;
        let at = Lsn::parse(&at).ok_or_else(|| source.bad(format!("pg_current_wal_lsn {at:?}")))?;
        let p = Progress::of(&subs, at);
        if p.in_sync {
            // Every worker runs: the instance's own setting is back before it is promoted.
            if let Err(e) = retry_interval(&local, None) {
                warn(&format!(
                    "wal_retrieve_retry_interval stays at {SYNC_RETRY_INTERVAL}: {}",
                    reason(e)
                ));
            }
        }
        Ok(SyncState {
            bytes: p.bytes,
            lag: p.lag,
            in_sync: p.in_sync,
            detail: p.detail,
        })
    }

    /// At the source, while its site's ingress holds every client: new transactions are
    /// read-only (checked in a new session), open write transactions are ended (their
    /// clients get an error, not a lost commit), and the WAL position read then covers
    /// every change the source took. PostgreSQL has no write pause that lifts itself: the
    /// fence stays until `unfence` (or, after a move, the source is released).
    fn fence(w: Workload) -> Result<String, AdapterError> {
        let names = names_at_source(&w)?;
        let local = Server::local(&w)?;
        local.execute(
            &local.maintenance_db,
            &[
                "ALTER SYSTEM SET default_transaction_read_only = on",
                "SELECT pg_catalog.pg_reload_conf()",
            ],
            QUICK_MS,
        )?;
        let fenced = read_mark(&local, &names);
        match fenced {
            Ok(mark) => {
                info(&format!(
                    "postgres at {} fenced (read-only) at WAL {} for {}",
                    w.site,
                    mark.lsn,
                    peer(&w)
                ));
                Ok(mark.encode())
            }
            Err(e) => {
                if let Err(lift) = lift_fence(&local) {
                    warn(&format!(
                        "the source stays read-only ({}); lift it with ALTER SYSTEM RESET default_transaction_read_only; SELECT pg_reload_conf()",
                        reason(lift)
                    ));
                }
                Err(e)
            }
        }
    }

    fn unfence(w: Workload) -> Result<(), AdapterError> {
        lift_fence(&Server::local(&w)?)
    }

    /// At the destination: waits until every subscription has applied the source's
    /// changes up to the mark, checks that no table appeared at the source meanwhile, then
    /// ends the subscriptions here without the source (disabled, slot detached, dropped),
    /// sets the sequences and drops the source's slots best effort.
    fn cut_over(w: Workload, mark: String) -> Result<(), AdapterError> {
        let mark = Mark::decode(&mark).map_err(|e| AdapterError::Failed(e.to_string()))?;
        let names = names_at_destination(&w)?;
        let local = Server::local(&w)?;
        let started = Instant::now();
        let deadline = started + Duration::from_millis(CATCH_UP_MS);
        let subs = loop {
            let subs: Vec<Subscription> = subscriptions(&local, &names)?
                .into_iter()
                .map(|(s, _)| s)
                .collect();
            if caught_up(&subs, mark.lsn) {
                break subs;
            }
            if Instant::now() >= deadline {
                let state: Vec<String> = subs
                    .iter()
                    .map(|s| {
                        format!(
                            "{} ({}) applied to {}{}",
                            s.name,
                            s.database,
                            s.applied
                                .map_or_else(|| "nothing".into(), |a| a.to_string()),
                            if s.applying { "" } else { ", no apply worker" }
                        )
                    })
                    .collect();
                return Err(AdapterError::Failed(format!(
                    "the replica did not apply the fenced source's changes up to WAL {} within {CATCH_UP_MS} ms: {}",
                    mark.lsn,
                    if state.is_empty() { "no subscription of this migration here".into() } else { state.join("; ") }
                )));
            }
            std::thread::sleep(POLL);
        };
        let caught_up_ms = started.elapsed().as_millis();
        for db in &mark.databases {
            let mine: Vec<&Subscription> = subs.iter().filter(|s| s.database == db.name).collect();
            if mine.is_empty() {
                return Err(AdapterError::Failed(format!(
                    "database {} at the source has no subscription here; it was created during the move: move it again",
                    db.name
                )));
            }
            let mut statements: Vec<String> = db.tables_check_sql().into_iter().collect();
            for s in &mine {
                let sub = ident(&s.name);
                statements.push(format!("ALTER SUBSCRIPTION {sub} DISABLE"));
                statements.push(format!("ALTER SUBSCRIPTION {sub} SET (slot_name = NONE)"));
                statements.push(format!("DROP SUBSCRIPTION {sub}"));
            }
            statements.extend(db.setval_sql());
            let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
            local.execute(&db.name, &refs, QUICK_MS)?;
        }
        let promoted_ms = started.elapsed().as_millis();
        match Server::source(&w) {
            Ok(source) => drop_source_slots(&source, &names, &[]),
            Err(e) => warn(&format!(
                "no tunnel to the source to drop its replication slots: {}",
                reason(e)
            )),
        }
        info(&format!(
            "postgres at {} promoted at WAL {} (caught up in {caught_up_ms} ms, subscriptions dropped and {} sequence(s) set by {promoted_ms} ms); {} stays read-only",
            w.site,
            mark.lsn,
            mark.databases.iter().map(|d| d.sequences.len()).sum::<usize>(),
            peer(&w)
        ));
        Ok(())
    }

    /// At the destination: ends the subscriptions (dropping their slots at the source
    /// through the tunnel when it answers, else detached and dropped here), then, best
    /// effort, the source's slots and publications of this migration.
    fn abort_sync(w: Workload) -> Result<(), AdapterError> {
        let names = names_at_destination(&w)?;
        let local = Server::local(&w)?;
        let subs = subscriptions(&local, &names).unwrap_or_else(|e| {
            warn(&format!(
                "cannot list the replica's subscriptions: {}",
                reason(e)
            ));
            Vec::new()
        });
        for (s, _) in &subs {
            let sub = ident(&s.name);
            let disable = format!("ALTER SUBSCRIPTION {sub} DISABLE");
            let drop = format!("DROP SUBSCRIPTION {sub}");
            if local
                .execute(&s.database, &[&disable, &drop], QUICK_MS)
                .is_ok()
            {
                continue;
            }
            let detach = format!("ALTER SUBSCRIPTION {sub} SET (slot_name = NONE)");
            if let Err(e) = local.execute(&s.database, &[&disable, &detach, &drop], QUICK_MS) {
                warn(&format!(
                    "cannot drop subscription {} here: {}",
                    s.name,
                    reason(e)
                ));
            }
        }
        if let Err(e) = retry_interval(&local, None) {
            warn(&format!(
                "wal_retrieve_retry_interval stays at {SYNC_RETRY_INTERVAL}: {}",
                reason(e)
            ));
        }
        let source = match Server::source(&w) {
            Ok(source) => source,
            Err(e) => {
                warn(&format!(
                    "no tunnel to the source: its publications and replication slots {}… stay ({})",
                    names.prefix(),
                    reason(e)
                ));
                return Ok(());
            }
        };
        let suboids: Vec<u32> = subs.iter().map(|(_, oid)| *oid).collect();
        drop_source_slots(&source, &names, &suboids);
        let drop_publications = format!(
            "DO $ferry$ DECLARE p text; BEGIN \
               FOR p IN SELECT pubname FROM pg_catalog.pg_publication WHERE {} LOOP \
                 EXECUTE pg_catalog.format('DROP PUBLICATION %I', p); \
               END LOOP; END $ferry$",
            names.matches("pubname")
        );
        match databases(&source) {
            Ok(dbs) => {
                for db in dbs {
                    if let Err(e) = source.execute(
                        &db.name,
                        &[
                            "SET default_transaction_read_only = off",
                            &drop_publications,
                        ],
                        QUICK_MS,
                    ) {
                        warn(&format!(
                            "cannot drop the publication in database {} at the source: {}",
                            db.name,
                            reason(e)
                        ));
                    }
                }
            }
            Err(e) => warn(&format!(
                "cannot list the source's databases to drop publications: {}",
                reason(e)
            )),
        }
        Ok(())
    }
}

export_service_adapter!(Postgres);
