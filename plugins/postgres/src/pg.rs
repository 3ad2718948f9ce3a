//! What the adapter reads from and says to PostgreSQL, as plain data: psql's output rows,
//! WAL positions (LSNs), versions, quoted identifiers and literals, connection strings,
//! the names it gives its publications and subscriptions, the fence mark handed from the
//! source to the destination, and a replica's progress. No host calls here, so it is
//! tested natively.

use std::fmt;

/// Field separator of psql's unaligned output (`-F`): the ASCII unit separator, which no
/// value the adapter asks for contains. Records end with a NUL byte (`-0`), so values may
/// hold newlines.
pub const FIELD_SEP: &str = "\u{1f}";

/// The rows of psql's unaligned, tuples-only output (`-A -t -F US -0`), each a list of
/// fields; SQL NULL reads as an empty field. Results of several `-c` follow each other.
pub fn rows(out: &str) -> Vec<Vec<&str>> {
    out.split('\0')
        .filter(|r| !r.trim().is_empty())
        // psql ends each result with a newline after its last NUL-terminated record.
        .map(|r| r.trim_start_matches('\n'))
        .map(|r| r.split(FIELD_SEP).collect())
        .collect()
}

/// A position in the write-ahead log, as PostgreSQL prints it (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub fn parse(text: &str) -> Option<Lsn> {
        let (hi, lo) = text.trim().split_once('/')?;
        let hi = u32::from_str_radix(hi, 16).ok()?;
        let lo = u32::from_str_radix(lo, 16).ok()?;
        Some(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }

    /// Bytes of WAL from `self` to `later` (0 if `later` is not later).
    pub fn bytes_to(self, later: Lsn) -> u64 {
        later.0.saturating_sub(self.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// A PostgreSQL release: major (15) and minor (18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
}

impl Version {
    /// `SHOW server_version_num`: 150018 is 15.18 (since PostgreSQL 10).
    pub fn from_num(text: &str) -> Option<Version> {
        let n: u32 = text.trim().parse().ok()?;
        (n >= 100_000).then_some(Version {
            major: n / 10_000,
            minor: n % 10_000,
        })
    }

    /// The banner of `psql --version` or `pg_dump --version`:
    /// `pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`.
    pub fn from_banner(text: &str) -> Option<Version> {
        let word = text
            .split_whitespace()
            .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
        let number = |part: &str| -> Option<u32> {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        let mut parts = word.split('.');
        let major = number(parts.next()?)?;
        let minor = parts.next().and_then(number).unwrap_or(0);
        Some(Version { major, minor })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// An identifier, double-quoted, as SQL reads it whatever it holds.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal (`standard_conforming_strings`, on by default since 9.1).
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A value in a libpq connection string, single-quoted.
fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A libpq connection string (for psql's and pg_dump's `-d`, and a subscription's
/// `CONNECTION`): a database name holding `=` is then never read as one.
pub fn conninfo(host: &str, port: u16, user: &str, dbname: &str) -> String {
    format!(
        "host={} port={port} user={} dbname={} connect_timeout=5 application_name=ferry-postgres",
        conninfo_value(host),
        conninfo_value(user),
        conninfo_value(dbname)
    )
}

/// Longest name PostgreSQL keeps (NAMEDATALEN - 1).
const MAX_NAME: usize = 63;

/// The names of one migration's publications, replication slots and subscriptions: one
/// of each per database, `ferry_<workload>_<source>_<destination>_<source database oid>`,
/// lower-case letters, digits and `_` only (what a replication slot's name may hold),
/// shortened with a hash when long. Both sites derive the same names from what each
/// call tells them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    base: String,
}

impl Names {
    pub fn new(workload: &str, source: &str, destination: &str) -> Self {
        let full = format!("ferry_{workload}_{source}_{destination}");
        let mut base: String = full
            .chars()
            .map(|c| match c.to_ascii_lowercase() {
                c @ ('a'..='z' | '0'..='9') => c,
                _ => '_',
            })
            .collect();
        // Room for "_" and a database oid (at most 10 digits).
        let room = MAX_NAME - 11;
        if base.len() > room {
            let hash = format!("_{:08x}", fnv1a(full.as_bytes()) as u32);
            base.truncate(room - hash.len());
            base.push_str(&hash);
        }
        Names { base }
    }

    /// What every name of this migration starts with.
    pub fn prefix(&self) -> String {
        format!("{}_", self.base)
    }

    /// The publication, slot and subscription for the source's database `oid`.
    pub fn for_database(&self, oid: u32) -> String {
        format!("{}_{oid}", self.base)
    }

    /// A SQL condition: `column` is one of this migration's names.
    pub fn matches(&self, column: &str) -> String {
        let prefix = self.prefix();
        format!(
            "left({column}::text, {}) = {}",
            prefix.len(),
            literal(&prefix)
        )
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Percent-encodes everything but letters, digits, `_`, `.` and `-`, so a name travels as
/// one word of the mark.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(word: &str) -> Option<String> {
    let bytes = word.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = word.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What the fenced source had, for the destination's cut-over: the WAL position read
/// after the fence (every change the source took is at or below it) and, per database,
/// how many tables each publication held (a table created during the move did not
/// replicate) and the value of every sequence (logical replication does not carry them).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mark {
    pub lsn: Lsn,
    pub databases: Vec<DatabaseMark>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DatabaseMark {
    pub name: String,
    /// (publication, number of tables it publishes).
    pub publications: Vec<(String, u64)>,
    /// (schema-qualified, quoted sequence name, its last value).
    pub sequences: Vec<(String, i64)>,
}

const MARK_HEADER: &str = "ferry-postgres-mark 1";

impl Mark {
    /// One line per fact, names percent-encoded: the header, `lsn X/Y`, then per database
    /// `db NAME`, `publication NAME TABLES`…, `sequence NAME VALUE`….
    pub fn encode(&self) -> String {
        let mut out = format!("{MARK_HEADER}\nlsn {}\n", self.lsn);
        for db in &self.databases {
            out.push_str(&format!("db {}\n", encode(&db.name)));
            for (name, tables) in &db.publications {
                out.push_str(&format!("publication {} {tables}\n", encode(name)));
            }
            for (name, value) in &db.sequences {
                out.push_str(&format!("sequence {} {value}\n", encode(name)));
            }
        }
        out
    }

    pub fn decode(text: &str) -> Result<Mark, MarkError> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        if lines.next() != Some(MARK_HEADER) {
            return Err(MarkError::NotAMark);
        }
        let mut mark = Mark::default();
        let mut lsn = None;
        for line in lines {
            let bad = || MarkError::BadLine(line.to_string());
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["lsn", at] => lsn = Some(Lsn::parse(at).ok_or_else(bad)?),
                ["db", name] => mark.databases.push(DatabaseMark {
                    name: decode(name).ok_or_else(bad)?,
                    ..DatabaseMark::default()
                }),
                ["publication", name, tables] => {
                    let db = mark.databases.last_mut().ok_or_else(bad)?;
                    db.publications.push((
                        decode(name).ok_or_else(bad)?,
                        tables.parse().map_err(|_| bad())?,
                    ));
                }
                ["sequence", name, value] => {
                    let db = mark.databases.last_mut().ok_or_else(bad)?;
                    db.sequences.push((
                        decode(name).ok_or_else(bad)?,
                        value.parse().map_err(|_| bad())?,
                    ));
                }
                _ => return Err(bad()),
            }
        }
        mark.lsn = lsn.ok_or(MarkError::NoLsn)?;
        Ok(mark)
    }
}

impl DatabaseMark {
    /// One statement setting every sequence to its value at the source (`is_called`:
    /// the next `nextval` returns a larger one).
    pub fn setval_sql(&self) -> Option<String> {
        if self.sequences.is_empty() {
            return None;
        }
        let calls: Vec<String> = self
            .sequences
            .iter()
            .map(|(name, value)| {
                format!(
                    "pg_catalog.setval({}::pg_catalog.regclass, {value}, true)",
                    literal(name)
                )
            })
            .collect();
        Some(format!("SELECT {}", calls.join(", ")))
    }

    /// A statement that fails unless the local subscription `name` holds as many tables
    /// as the source's publication of the same name published when it was fenced.
    pub fn tables_check_sql(&self) -> Option<String> {
        if self.publications.is_empty() {
            return None;
        }
        let checks: Vec<String> = self
            .publications
            .iter()
            .map(|(name, tables)| {
                format!(
                    "SELECT count(*) INTO n FROM pg_catalog.pg_subscription_rel r \
                     JOIN pg_catalog.pg_subscription s ON s.oid = r.srsubid WHERE s.subname = {lit}; \
                     IF n <> {tables} THEN RAISE EXCEPTION 'the source publishes % tables in %, the replica has %; a table was created or dropped at the source during the move (DDL does not replicate): move it again', {tables}, {lit}, n; END IF;",
                    lit = literal(name)
                )
            })
            .collect();
        Some(format!(
            "DO $ferry$ DECLARE n bigint; BEGIN {} END $ferry$",
            checks.join(" ")
        ))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkError {
    NotAMark,
    NoLsn,
    BadLine(String),
}

impl fmt::Display for MarkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MarkError::NotAMark => write!(
                f,
                "the fence mark is not the postgres adapter's (was the source fenced by another adapter?)"
            ),
            MarkError::NoLsn => write!(f, "the fence mark holds no WAL position"),
            MarkError::BadLine(l) => write!(f, "the fence mark has an unreadable line {l:?}"),
        }
    }
}

/// One subscription of the migration at the destination, as its catalogs say.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subscription {
    pub name: String,
    pub database: String,
    /// The apply worker runs.
    pub applying: bool,
    /// The last WAL position the source's sender reported and the apply worker had
    /// reached: every change before it is applied here.
    pub applied: Option<Lsn>,
    /// Tables by state (`pg_subscription_rel.srsubstate`): ready (`r`) and all.
    pub tables_ready: u64,
    pub tables: u64,
    /// Bytes the subscribed tables take here.
    pub bytes: u64,
}

/// How far the replica is, summed over the migration's subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub bytes: u64,
    pub lag: u64,
    pub in_sync: bool,
    pub detail: String,
}

impl Progress {
    /// In sync: at least one subscription, every one's apply worker running and every
    /// table copied and ready. The lag is the source's WAL position minus the least
    /// applied one (the whole position while a worker has reported none).
    pub fn of(subs: &[Subscription], source_at: Lsn) -> Progress {
        let bytes = subs.iter().map(|s| s.bytes).sum();
        let (ready, tables) = subs
            .iter()
            .fold((0, 0), |(r, t), s| (r + s.tables_ready, t + s.tables));
        let applied = subs.iter().map(|s| s.applied.unwrap_or_default()).min();
        let lag = applied.map_or(source_at.0, |a| a.bytes_to(source_at));
        let idle: Vec<&str> = subs
            .iter()
            .filter(|s| !s.applying)
            .map(|s| s.database.as_str())
            .collect();
        let in_sync = !subs.is_empty() && idle.is_empty() && ready == tables;
        let mut detail = format!(
            "{} database{}, {ready}/{tables} tables ready, {} copied, lag {} (source at {source_at}, applied to {})",
            subs.len(),
            if subs.len() == 1 { "" } else { "s" },
            size(bytes),
            size(lag),
            applied.map_or_else(|| "nothing yet".into(), |a| a.to_string())
        );
        if subs.is_empty() {
            detail = "no subscription of this migration here (start-sync has not run, or it was dropped)".into();
        } else if !idle.is_empty() {
            detail.push_str(&format!(
                "; no apply worker runs for {} (see the destination's postgres log: max_logical_replication_workers, or the link to the source)",
                idle.join(", ")
            ));
        }
        Progress {
            bytes,
            lag,
            in_sync,
            detail,
        }
    }
}

/// Every subscription has applied everything up to `mark`.
pub fn caught_up(subs: &[Subscription], mark: Lsn) -> bool {
    !subs.is_empty() && subs.iter().all(|s| s.applied.is_some_and(|a| a >= mark))
}

/// A byte count for people.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_split_on_nul_and_unit_separator_and_keep_newlines() {
        let out = "1\u{1f}a b\u{1f}\u{0}5\u{1f}c\u{1f}d\u{0}\n2\u{1f}x\ny\u{0}\n";
        assert_eq!(
            rows(out),
            vec![vec!["1", "a b", ""], vec!["5", "c", "d"], vec!["2", "x\ny"]]
        );
        assert!(rows("").is_empty());
        assert!(rows("\n").is_empty());
    }

    #[test]
    fn lsns_parse_print_and_subtract() {
        let a = Lsn::parse("16/B374D848").expect("lsn");
        assert_eq!(a.0, 0x16_B374_D848);
        assert_eq!(a.to_string(), "16/B374D848");
        assert_eq!(Lsn::parse("0/0"), Some(Lsn(0)));
        let b = Lsn::parse("17/0").expect("lsn");
        assert_eq!(a.bytes_to(b), 0x17_0000_0000 - 0x16_B374_D848);
        assert_eq!(b.bytes_to(a), 0);
        assert!(a < b);
        for bad in ["", "16", "x/1", "1/", "1/2/3", "100000000/0"] {
            assert_eq!(Lsn::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn versions_from_the_server_and_from_tools() {
        let v = Version::from_num("150018\n").expect("num");
        assert_eq!((v.major, v.minor), (15, 18));
        assert_eq!(v.to_string(), "15.18");
        assert_eq!(Version::from_num("90624"), None);
        let b = Version::from_banner("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n")
            .expect("banner");
        assert_eq!(
            b,
            Version {
                major: 15,
                minor: 18
            }
        );
        let beta = Version::from_banner("psql (PostgreSQL) 17beta1").expect("beta");
        assert_eq!(beta.major, 17);
        assert_eq!(Version::from_banner("no digits here"), None);
    }

    #[test]
    fn identifiers_literals_and_conninfo_are_quoted() {
        assert_eq!(ident("t"), "\"t\"");
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(
            conninfo("127.0.0.1", 5432, "postgres", "my db='x'\\"),
            "host='127.0.0.1' port=5432 user='postgres' dbname='my db=\\'x\\'\\\\' connect_timeout=5 application_name=ferry-postgres"
        );
    }

    #[test]
    fn names_are_slot_safe_short_and_the_same_at_both_sites() {
        let n = Names::new("pg", "a", "b");
        assert_eq!(n.for_database(5), "ferry_pg_a_b_5");
        assert_eq!(n.prefix(), "ferry_pg_a_b_");
        assert_eq!(
            Names::new("My-DB.1", "edge", "Cloud").for_database(1),
            "ferry_my_db_1_edge_cloud_1"
        );
        let long = Names::new(&"w".repeat(63), "site-a", "site-b");
        let name = long.for_database(4_294_967_295);
        assert!(name.len() <= 63, "{name}");
        assert!(name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        assert_ne!(
            long.for_database(1),
            Names::new(&"w".repeat(63), "site-a", "site-c").for_database(1),
            "a shortened name keeps what distinguishes it"
        );
        assert_eq!(
            n.matches("subname"),
            "left(subname::text, 13) = 'ferry_pg_a_b_'"
        );
    }

    fn sample_mark() -> Mark {
        Mark {
            lsn: Lsn(0x1_0000_0010),
            databases: vec![
                DatabaseMark {
                    name: "postgres".into(),
                    publications: vec![("ferry_pg_a_b_5".into(), 2)],
                    sequences: vec![
                        ("\"public\".\"t_id_seq\"".into(), 1234),
                        ("\"odd schema\".\"it's\"".into(), -5),
                    ],
                },
                DatabaseMark {
                    name: "app db\n%".into(),
                    publications: vec![],
                    sequences: vec![],
                },
            ],
        }
    }

    #[test]
    fn the_mark_round_trips_whatever_the_names_hold() {
        let mark = sample_mark();
        let text = mark.encode();
        assert!(
            text.starts_with("ferry-postgres-mark 1\nlsn 1/10\ndb postgres\n"),
            "{text}"
        );
        assert_eq!(Mark::decode(&text), Ok(mark));
    }

    #[test]
    fn a_foreign_or_damaged_mark_is_refused() {
        assert_eq!(Mark::decode("12345"), Err(MarkError::NotAMark));
        assert_eq!(
            Mark::decode("ferry-postgres-mark 1\ndb x\n"),
            Err(MarkError::NoLsn)
        );
        assert!(matches!(
            Mark::decode("ferry-postgres-mark 1\nlsn 0/1\nsequence s 1\n"),
            Err(MarkError::BadLine(_))
        ));
        assert!(matches!(
            Mark::decode("ferry-postgres-mark 1\nlsn 0/1\ndb %zz\n"),
            Err(MarkError::BadLine(_))
        ));
    }

    #[test]
    fn sequences_are_set_with_quoted_names() {
        let mark = sample_mark();
        assert_eq!(
            mark.databases[0].setval_sql().as_deref(),
            Some("SELECT pg_catalog.setval('\"public\".\"t_id_seq\"'::pg_catalog.regclass, 1234, true), pg_catalog.setval('\"odd schema\".\"it''s\"'::pg_catalog.regclass, -5, true)")
        );
        assert_eq!(mark.databases[1].setval_sql(), None);
        let check = mark.databases[0].tables_check_sql().expect("check");
        assert!(check.contains("s.subname = 'ferry_pg_a_b_5'"), "{check}");
        assert!(check.contains("IF n <> 2 THEN"), "{check}");
        assert_eq!(mark.databases[1].tables_check_sql(), None);
    }

    fn sub(
        db: &str,
        applying: bool,
        applied: Option<u64>,
        ready: u64,
        tables: u64,
    ) -> Subscription {
        Subscription {
            name: format!("ferry_{db}"),
            database: db.into(),
            applying,
            applied: applied.map(Lsn),
            tables_ready: ready,
            tables,
            bytes: 1024 * tables,
        }
    }

    #[test]
    fn in_sync_once_every_table_is_ready_and_every_worker_applies() {
        let p = Progress::of(&[sub("postgres", true, Some(100), 3, 3)], Lsn(164));
        assert!(p.in_sync, "{p:?}");
        assert_eq!(p.lag, 64);
        assert_eq!(p.bytes, 3072);
        assert!(
            p.detail
                .contains("1 database, 3/3 tables ready, 3.0 KiB copied, lag 64 B"),
            "{}",
            p.detail
        );
        let copying = Progress::of(
            &[
                sub("postgres", true, Some(100), 3, 3),
                sub("app", true, None, 1, 4),
            ],
            Lsn(164),
        );
        assert!(!copying.in_sync);
        assert_eq!(
            copying.lag, 164,
            "a worker that reported nothing lags by everything"
        );
        assert!(
            copying.detail.contains("2 databases, 4/7 tables ready"),
            "{}",
            copying.detail
        );
        let idle = Progress::of(&[sub("app", false, Some(164), 2, 2)], Lsn(164));
        assert!(!idle.in_sync);
        assert!(
            idle.detail.contains("no apply worker runs for app"),
            "{}",
            idle.detail
        );
        let none = Progress::of(&[], Lsn(1));
        assert!(!none.in_sync);
        assert!(none.detail.contains("no subscription"), "{}", none.detail);
    }

    #[test]
    fn caught_up_needs_every_subscription_at_the_mark() {
        let subs = [
            sub("a", true, Some(200), 1, 1),
            sub("b", true, Some(199), 1, 1),
        ];
        assert!(caught_up(&subs, Lsn(199)));
        assert!(!caught_up(&subs, Lsn(200)));
        assert!(!caught_up(&[sub("a", true, None, 1, 1)], Lsn(0)));
        assert!(!caught_up(&[], Lsn(0)));
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
