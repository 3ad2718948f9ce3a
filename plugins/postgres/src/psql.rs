//! The PostgreSQL servers the adapter talks to from its site, and the programs it talks
//! through (`psql`, `pg_dump`, `rm`, on the site's `exec` allow-list): the local instance
//! at `127.0.0.1:PORT`, or the source through the migration's tunnel. `exec` runs each
//! program in the site's network, so both addresses are this site's loopback.

use ferry_adapter_sdk::*;

use crate::pg::{self, rows, Version, FIELD_SEP};

/// One psql call that should take milliseconds (catalog reads, small DDL).
pub const QUICK_MS: u32 = 10_000;
/// Calls that copy a schema or wait for the source (a subscription's slot waits for the
/// source's running transactions to end).
pub const SLOW_MS: u32 = 120_000;

/// The superuser the adapter connects as, unless the workload says `--setting
/// postgres-user=NAME`.
const DEFAULT_USER: &str = "postgres";
/// The database every cluster has, to reach the cluster-wide catalogs, unless the
/// workload says `--setting postgres-database=NAME`.
pub const DEFAULT_DATABASE: &str = "postgres";

pub struct Server {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The database to connect to for cluster-wide questions.
    pub maintenance_db: String,
    /// For messages: "the local instance", "the source (through the tunnel)".
    pub what: &'static str,
}

fn port(w: &Workload) -> Result<u16, AdapterError> {
    w.port.ok_or_else(|| {
        AdapterError::Unsupported(format!(
            "workload {} has no --port; the postgres adapter needs PostgreSQL's port",
            w.name
        ))
    })
}

impl Server {
    pub fn local(w: &Workload) -> Result<Self, AdapterError> {
        Ok(Server {
            host: "127.0.0.1".into(),
            port: port(w)?,
            user: setting(w, "postgres-user")
                .unwrap_or(DEFAULT_USER)
                .to_string(),
            maintenance_db: setting(w, "postgres-database")
                .unwrap_or(DEFAULT_DATABASE)
                .to_string(),
            what: "the local instance",
        })
    }

    /// The source, through the migration's tunnel to the workload's port at the peer
    /// (the same endpoint for every call of the migration).
    pub fn source(w: &Workload) -> Result<Self, AdapterError> {
        let local = Server::local(w)?;
        let ep = tunnel::open(local.port)?;
        Ok(Server {
            host: ep.host,
            port: ep.port,
            what: "the source (through the tunnel)",
            ..local
        })
    }

    /// The connection string to database `db` of this server.
    pub fn conninfo(&self, db: &str) -> String {
        pg::conninfo(&self.host, self.port, &self.user, db)
    }

    /// Runs each statement in turn in one session on database `db` and returns the rows
    /// they answer; the first error stops it and fails with psql's message.
    pub fn query(
        &self,
        db: &str,
        statements: &[&str],
        timeout_ms: u32,
    ) -> Result<Vec<Vec<String>>, AdapterError> {
        let conn = self.conninfo(db);
        let mut args = vec![
            "-X",
            "-w",
            "-q",
            "-A",
            "-t",
            "-0",
            "-F",
            FIELD_SEP,
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &conn,
        ];
        for s in statements {
            args.extend_from_slice(&["-c", s]);
        }
        let out = self.run("psql", &args, timeout_ms, db, statements.join("; "))?;
        Ok(rows(&out)
            .into_iter()
            .map(|r| r.into_iter().map(str::to_string).collect())
            .collect())
    }

    /// Runs statements for their effect only.
    pub fn execute(
        &self,
        db: &str,
        statements: &[&str],
        timeout_ms: u32,
    ) -> Result<(), AdapterError> {
        self.query(db, statements, timeout_ms).map(drop)
    }

    /// The first field of the first row a statement answers.
    pub fn value(&self, db: &str, statement: &str) -> Result<String, AdapterError> {
        self.query(db, &[statement], QUICK_MS)?
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next())
            .ok_or_else(|| self.bad(format!("{statement:?} answered no row")))
    }

    pub fn version(&self) -> Result<Version, AdapterError> {
        let v = self.value(&self.maintenance_db, "SHOW server_version_num")?;
        Version::from_num(&v)
            .ok_or_else(|| self.bad(format!("server_version_num {v:?} is not a version")))
    }

    /// `pg_dump --schema-only` of database `db` into `file` (a path at this site).
    pub fn dump_schema(&self, db: &str, file: &str) -> Result<(), AdapterError> {
        let conn = self.conninfo(db);
        self.run(
            "pg_dump",
            &[
                "--schema-only",
                "--no-subscriptions",
                "-f",
                file,
                "-d",
                &conn,
            ],
            SLOW_MS,
            db,
            format!("dump the schema into {file}"),
        )
        .map(drop)
    }

    /// Applies an SQL file (pg_dump's output) to database `db`, stopping at the first
    /// error.
    pub fn apply_file(&self, db: &str, file: &str) -> Result<(), AdapterError> {
        let conn = self.conninfo(db);
        self.run(
            "psql",
            &[
                "-X",
                "-w",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-o",
                "/dev/null",
                "-f",
                file,
                "-d",
                &conn,
            ],
            SLOW_MS,
            db,
            format!("apply {file}"),
        )
        .map(drop)
    }

    /// One program against database `db`; a failure names what was asked, of whom, and
    /// what the program said.
    fn run(
        &self,
        program: &str,
        args: &[&str],
        timeout_ms: u32,
        db: &str,
        what: String,
    ) -> Result<String, AdapterError> {
        let out = exec::run(&exec::Command {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
            timeout_ms,
            output: exec::OutputMode::Capture,
        })
        .map_err(|e| match AdapterError::from(e) {
            AdapterError::Failed(why) => {
                AdapterError::Failed(format!("{program} for {}: {why}", self.what))
            }
            other => other,
        })?;
        if out.status != 0 {
            return Err(AdapterError::Failed(format!(
                "{program} at {} ({}:{}, database {db}) exited with {} while asked to {what}: {}",
                self.what,
                self.host,
                self.port,
                out.status,
                out.stderr_tail.trim()
            )));
        }
        Ok(out.stdout)
    }

    pub fn bad(&self, e: impl std::fmt::Display) -> AdapterError {
        AdapterError::Failed(format!("{} ({}:{}): {e}", self.what, self.host, self.port))
    }
}

/// The version of an allowed PostgreSQL tool at this site (`psql`, `pg_dump`).
pub fn tool_version(program: &str) -> Result<Version, AdapterError> {
    let out = run(program, &["--version"], QUICK_MS)?;
    Version::from_banner(&out.stdout).ok_or_else(|| {
        AdapterError::Failed(format!(
            "{program} --version printed no version: {:?}",
            out.stdout.trim()
        ))
    })
}

/// A scratch file in the workload's work directory at this site, for what `exec` cannot
/// pipe from one program into another (pg_dump's schema into psql). Named for the site
/// and the database, since every site has the same work directory path (and may share its
/// storage); removed when dropped, through the `files` grant (the work directory is the
/// adapter's `/work`).
pub struct Scratch {
    /// The file as the programs `exec` runs see it.
    pub path: String,
    /// Its name in the work directory.
    name: String,
}

impl Scratch {
    pub fn new(w: &Workload, oid: u32) -> Self {
        let name = format!(".ferry-postgres.{}.{oid}.schema.sql", w.site);
        Scratch {
            path: format!("{}/{name}", w.work_dir.trim_end_matches('/')),
            name,
        }
    }
}

impl Drop for Scratch {
    /// Best effort: a file left behind is overwritten by the next dump.
    fn drop(&mut self) {
        let path = std::path::Path::new("/work").join(&self.name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::log(
                log::Level::Warn,
                &format!(
                    "cannot remove the scratch file {} (grant the adapter \"files\"): {e}",
                    self.path
                ),
            ),
        }
    }
}
