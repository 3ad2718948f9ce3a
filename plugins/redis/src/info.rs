//! What the adapter reads from Redis, as plain data: `INFO` replies (`key:value` lines
//! separated by `\r\n`, `# Section` headers), versions, the modules a server has loaded,
//! and a replica's progress towards its source. No host calls here, so it is tested
//! natively.

use std::fmt;

/// An `INFO` reply: its `key:value` lines in order. A key may repeat (`module:` once per
/// loaded module).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Info(Vec<(String, String)>);

impl Info {
    pub fn parse(text: &str) -> Self {
        Info(
            text.lines()
                .map(|l| l.trim_end_matches('\r'))
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// A numeric field; absent or unparsable is `None`.
    pub fn num(&self, key: &str) -> Option<i64> {
        self.get(key)?.trim().parse().ok()
    }

    /// A field that must be there, for messages that name what was missing.
    pub fn require(&self, key: &str) -> Result<&str, InfoError> {
        self.get(key).ok_or_else(|| InfoError::Missing(key.to_string()))
    }

    pub fn require_num(&self, key: &str) -> Result<i64, InfoError> {
        let v = self.require(key)?;
        v.trim().parse().map_err(|_| InfoError::NotANumber {
            key: key.to_string(),
            value: v.to_string(),
        })
    }

    /// `redis_version` of `INFO server`.
    pub fn version(&self) -> Result<Version, InfoError> {
        let v = self.require("redis_version")?;
        Version::parse(v).ok_or_else(|| InfoError::BadVersion(v.to_string()))
    }

    /// `role` of `INFO replication`: `master` or `slave`.
    pub fn role(&self) -> Result<&str, InfoError> {
        self.require("role")
    }

    /// Names of the modules in `INFO modules` (`module:name=search,ver=20606,…`).
    pub fn modules(&self) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == "module")
            .filter_map(|(_, v)| v.split(',').find_map(|kv| kv.strip_prefix("name=")).map(str::to_string))
            .collect()
    }
}

/// Why an `INFO` reply did not say what the adapter needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoError {
    Missing(String),
    NotANumber { key: String, value: String },
    BadVersion(String),
}

impl fmt::Display for InfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InfoError::Missing(key) => write!(f, "INFO has no {key} field"),
            InfoError::NotANumber { key, value } => write!(f, "INFO field {key} is not a number: {value:?}"),
            InfoError::BadVersion(v) => write!(f, "unrecognised Redis version {v:?}"),
        }
    }
}

/// A Redis version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    /// `CLIENT PAUSE … WRITE`, which fences the source at the cut-over, came in 6.2.
    pub const PAUSE_WRITE: Version = Version {
        major: 6,
        minor: 2,
        patch: 0,
    };

    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('.');
        let mut next = || -> Option<u32> { parts.next().map_or(Some(0), |p| p.parse().ok()) };
        let v = Version {
            major: next()?,
            minor: next()?,
            patch: next()?,
        };
        Some(v)
    }

    /// The version `redis-server --version` prints: `Redis server v=7.0.15 sha=… bits=64 …`.
    pub fn from_server_banner(text: &str) -> Option<Self> {
        text.split_whitespace()
            .find_map(|t| t.strip_prefix("v="))
            .and_then(Self::parse)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The local instance as a replica, from its `INFO replication` (and `INFO stats`, in the
/// same reply when `INFO` is asked for its default sections).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// `master_link_status:up`: it follows the source's stream live.
    pub link_up: bool,
    /// `master_sync_in_progress:1`: the full copy is being received or loaded.
    pub syncing: bool,
    /// `slave_repl_offset`: how much of the source's replication stream it has applied.
    pub offset: u64,
    /// `master_sync_read_bytes` / `master_sync_total_bytes` during a full copy; the total
    /// is unknown (0 or less) when the source streams it without a file (diskless sync).
    pub sync_read: u64,
    pub sync_total: Option<u64>,
    /// `total_net_repl_input_bytes` (Redis 7.0 and later): every byte received from the
    /// source, full copy and stream.
    pub repl_input: Option<u64>,
}

impl Replica {
    pub fn from_info(info: &Info) -> Result<Self, ReplicaError> {
        let role = info.role().map_err(ReplicaError::Info)?;
        if role != "slave" {
            return Err(ReplicaError::NotAReplica(role.to_string()));
        }
        let positive = |key: &str| info.num(key).filter(|n| *n > 0).map(|n| n as u64);
        Ok(Replica {
            link_up: info.get("master_link_status") == Some("up"),
            syncing: info.num("master_sync_in_progress") == Some(1),
            offset: positive("slave_repl_offset").unwrap_or(0),
            sync_read: positive("master_sync_read_bytes").unwrap_or(0),
            sync_total: positive("master_sync_total_bytes"),
            repl_input: info.num("total_net_repl_input_bytes").map(|n| n.max(0) as u64),
        })
    }

    /// It holds a complete copy and follows the source's stream live.
    pub fn in_sync(&self) -> bool {
        self.link_up && !self.syncing
    }

    /// It has everything the source had when the source said `source_offset`: nothing
    /// written at the source before that is missing here.
    pub fn caught_up(&self, source_offset: u64) -> bool {
        self.in_sync() && self.offset >= source_offset
    }

    /// How far it is from a source whose `master_repl_offset` is `source_offset`.
    pub fn progress(&self, source_offset: u64) -> Progress {
        let bytes = self
            .repl_input
            .unwrap_or(if self.syncing { self.sync_read } else { self.offset });
        let lag = source_offset.saturating_sub(self.offset);
        // Following live is not enough: right after a full copy the replica still applies
        // the writes the source buffered meanwhile, and a switch then would hold clients
        // until it has.
        let in_sync = self.in_sync() && lag <= MAX_SWITCH_LAG;
        let detail = if self.syncing {
            // A replica loading the copy as it arrives (diskless load) counts no copy
            // bytes of its own; what it received from the source says the same.
            let read = match (self.sync_read, self.repl_input) {
                (0, Some(input)) => input,
                (read, _) => read,
            };
            match self.sync_total {
                Some(total) => format!("full copy: {} of {} received", mb(read), mb(total)),
                None => format!("full copy: {} received", mb(read)),
            }
        } else if !self.link_up {
            "link to the source down (connecting, or waiting for the source to start a full copy)".to_string()
        } else if lag == 0 {
            format!("in sync at offset {}", self.offset)
        } else {
            format!(
                "streaming: {lag} bytes behind (offset {} of {source_offset})",
                self.offset
            )
        };
        Progress {
            bytes,
            lag,
            in_sync,
            detail,
        }
    }
}

/// How far behind (bytes of replication stream) a live replica may be for the switch to
/// start: what it applies in a few milliseconds. A client writing steadily keeps it a
/// little behind between the two offsets read.
pub const MAX_SWITCH_LAG: u64 = 64 * 1024;

/// A replica's progress, in the shape of the WIT `sync-state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub bytes: u64,
    pub lag: u64,
    pub in_sync: bool,
    pub detail: String,
}

/// Why the local instance cannot be read as a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaError {
    Info(InfoError),
    NotAReplica(String),
}

impl fmt::Display for ReplicaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaError::Info(e) => e.fmt(f),
            ReplicaError::NotAReplica(role) => {
                write!(
                    f,
                    "the local instance is not a replica (role:{role}); start-sync has not run or was undone"
                )
            }
        }
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_000_000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Replies captured from redis-server 7.0.15 through redis-cli (trimmed).
    const SERVER: &str = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\nredis_mode:standalone\r\nos:Linux 6.1.0 x86_64\r\ntcp_port:7001\r\n";
    const MASTER: &str = "# Replication\r\nrole:master\r\nconnected_slaves:1\r\nslave0:ip=127.0.0.1,port=7002,state=online,offset=8555,lag=0\r\nmaster_failover_state:no-failover\r\nmaster_replid:9cd85489df08eb4ae17f66e7e4d5c31d4ee80107\r\nmaster_repl_offset:10036\r\nsecond_repl_offset:-1\r\n";
    const WAITING: &str = "# Replication\r\nrole:slave\r\nmaster_host:127.0.0.1\r\nmaster_port:7001\r\nmaster_link_status:down\r\nmaster_last_io_seconds_ago:-1\r\nmaster_sync_in_progress:0\r\nslave_read_repl_offset:0\r\nslave_repl_offset:0\r\n# Stats\r\ntotal_net_input_bytes:101\r\ntotal_net_repl_input_bytes:0\r\n";
    const COPYING: &str = "# Replication\r\nrole:slave\r\nmaster_link_status:down\r\nmaster_sync_in_progress:1\r\nslave_read_repl_offset:0\r\nslave_repl_offset:0\r\nmaster_sync_total_bytes:0\r\nmaster_sync_read_bytes:1442324\r\nmaster_sync_left_bytes:-1442324\r\nmaster_sync_perc:0.00\r\n# Stats\r\ntotal_net_repl_input_bytes:1868520\r\n";
    const STREAMING: &str = "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\nmaster_sync_in_progress:0\r\nslave_read_repl_offset:10954\r\nslave_repl_offset:10954\r\n# Stats\r\ntotal_net_repl_input_bytes:17780335\r\n";

    #[test]
    fn info_lines_are_read_without_headers_or_carriage_returns() {
        let info = Info::parse(SERVER);
        assert_eq!(info.get("redis_version"), Some("7.0.15"));
        assert_eq!(info.get("os"), Some("Linux 6.1.0 x86_64"));
        assert_eq!(info.num("tcp_port"), Some(7001));
        assert_eq!(info.get("# Server"), None);
        assert_eq!(
            info.version(),
            Ok(Version {
                major: 7,
                minor: 0,
                patch: 15
            })
        );
    }

    #[test]
    fn a_value_may_hold_colons_and_a_missing_field_is_named() {
        let info = Info::parse("# Replication\r\nslave0:ip=::1,port=7002\r\nrole:master\r\n");
        assert_eq!(info.get("slave0"), Some("ip=::1,port=7002"));
        assert_eq!(info.role(), Ok("master"));
        let err = info.require_num("master_repl_offset").unwrap_err();
        assert_eq!(err.to_string(), "INFO has no master_repl_offset field");
        assert_eq!(Info::parse(MASTER).require_num("master_repl_offset"), Ok(10036));
    }

    #[test]
    fn loaded_modules_are_named() {
        assert!(Info::parse("# Modules\r\n").modules().is_empty());
        let info = Info::parse(
            "# Modules\r\nmodule:name=tinymod,ver=3,api=1,filters=0,usedby=[],using=[],options=[]\r\nmodule:name=search,ver=20606,api=1,filters=0,usedby=[],using=[ReJSON],options=[]\r\n",
        );
        assert_eq!(info.modules(), vec!["tinymod", "search"]);
    }

    #[test]
    fn versions_parse_from_info_and_from_the_server_banner() {
        assert_eq!(
            Version::parse("6.2"),
            Some(Version {
                major: 6,
                minor: 2,
                patch: 0
            })
        );
        assert_eq!(Version::parse("7.x"), None);
        let banner = "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=ae4d7c971a948f0\n";
        assert_eq!(Version::from_server_banner(banner), Version::parse("7.0.15"));
        assert_eq!(Version::from_server_banner("redis-server: not found"), None);
        assert!(Version::parse("6.0.16").unwrap() < Version::PAUSE_WRITE);
        assert!(Version::parse("7.0.15").unwrap() >= Version::PAUSE_WRITE);
        assert_eq!(Version::parse("7.2.4").unwrap().to_string(), "7.2.4");
    }

    #[test]
    fn a_primary_is_not_read_as_a_replica() {
        let err = Replica::from_info(&Info::parse(MASTER)).unwrap_err();
        assert_eq!(err, ReplicaError::NotAReplica("master".into()));
    }

    #[test]
    fn a_replica_waiting_for_the_copy_is_not_in_sync() {
        let r = Replica::from_info(&Info::parse(WAITING)).unwrap();
        let p = r.progress(3317);
        assert!(!p.in_sync);
        assert_eq!((p.bytes, p.lag), (0, 3317));
        assert_eq!(
            p.detail,
            "link to the source down (connecting, or waiting for the source to start a full copy)"
        );
        assert!(!r.caught_up(0), "a replica without a link has caught up with nothing");
    }

    #[test]
    fn a_diskless_full_copy_reports_bytes_without_a_total() {
        let r = Replica::from_info(&Info::parse(COPYING)).unwrap();
        assert!(r.syncing && r.sync_total.is_none());
        let p = r.progress(8686);
        assert!(!p.in_sync);
        assert_eq!(p.bytes, 1_868_520, "all replication input counts, not only the copy");
        assert_eq!(p.detail, "full copy: 1.4 MB received");
        let with_total = Replica {
            sync_total: Some(4_000_000),
            ..r
        };
        assert_eq!(with_total.progress(0).detail, "full copy: 1.4 MB of 4.0 MB received");
        // Loading as it arrives, the replica counts no copy bytes: its input says it.
        let loading = Replica { sync_read: 0, ..r };
        assert_eq!(loading.progress(0).detail, "full copy: 1.9 MB received");
    }

    #[test]
    fn a_streaming_replica_is_in_sync_and_reports_its_lag() {
        let r = Replica::from_info(&Info::parse(STREAMING)).unwrap();
        let p = r.progress(10981);
        assert!(p.in_sync);
        assert_eq!((p.bytes, p.lag), (17_780_335, 27));
        assert_eq!(p.detail, "streaming: 27 bytes behind (offset 10954 of 10981)");
        assert!(!r.caught_up(10981));
        assert!(r.caught_up(10954));
        // The source's offset is read first; a PING it sends after that can put the
        // replica ahead of the number read, which is still caught up, with no lag.
        assert!(r.caught_up(10940));
        assert_eq!(r.progress(10940).lag, 0);
        assert_eq!(r.progress(10954).detail, "in sync at offset 10954");
        // Live, but with the writes of a long copy still to apply: not ready to switch.
        let behind = r.progress(10954 + MAX_SWITCH_LAG + 1);
        assert!(!behind.in_sync, "{behind:?}");
        assert!(behind.detail.starts_with("streaming: "), "{}", behind.detail);
        assert!(r.progress(10954 + MAX_SWITCH_LAG).in_sync);
    }

    #[test]
    fn without_repl_input_bytes_fall_back_to_the_copy_then_the_offset() {
        let old = |text: &str| {
            let mut r = Replica::from_info(&Info::parse(text)).unwrap();
            r.repl_input = None;
            r
        };
        assert_eq!(old(COPYING).progress(0).bytes, 1_442_324);
        assert_eq!(old(STREAMING).progress(0).bytes, 10_954);
    }
}
