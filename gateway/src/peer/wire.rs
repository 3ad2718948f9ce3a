//! The peer protocol's messages and framing: one request per bidirectional stream, a
//! length-prefixed JSON header (bounded), then for image files the bytes (raw, or in
//! zstd-compressed blocks) and a BLAKE3 trailer over the file's own bytes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::WorkloadSpec;
use crate::transfer::{Compression, FileMeta};

/// ALPN of the peer protocol; a new incompatible protocol gets a new version here.
pub const ALPN: &[u8] = b"ferry/1";

/// Largest header a peer may send.
pub const MAX_HEADER: usize = 1 << 20;
/// Most bytes one `Measure` may send.
pub const MAX_MEASURE: u64 = 64 << 20;
/// Most block digests one `BlocksWanted` may ask about (512 KiB of hex).
pub const MAX_WANTED: usize = 8192;

/// What restoring a workload's checkpoint needs of the destination, as the source measured
/// it before the freeze.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointNeeds {
    /// The source's kernel release (`uname -r`).
    pub kernel: String,
    /// The source's CRIU version, when it could tell.
    #[serde(default)]
    pub criu: Option<String>,
    /// The source CPU's feature flags (`/proc/cpuinfo`): a restored process may use any.
    pub cpu_flags: Vec<String>,
    /// Files the tree maps (its executables and libraries) with their sizes, when it sees
    /// the host's filesystem (a container's come with its image): CRIU restores them only
    /// from the same path with the same size.
    pub files: Vec<(String, u64)>,
    /// The tree's resident memory.
    pub memory_bytes: u64,
    /// Disk its image takes at the destination.
    pub image_bytes: u64,
    /// What the source's adapter for the workload's runtime is granted (capabilities
    /// other than `log`, and its `exec` allow-list): the restore through the same adapter
    /// needs no less.
    #[serde(default)]
    pub adapter_capabilities: Vec<String>,
    #[serde(default)]
    pub adapter_exec: Vec<String>,
}

/// Connection close codes.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum CloseCode {
    Shutdown = 0,
    Protocol = 1,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness and identity check.
    Hello,
    /// A link check: `bytes` bytes follow (at most [`MAX_MEASURE`]), read and dropped;
    /// answered with `Measured` (this site's clock) once all arrived.
    Measure { bytes: u64 },
    /// Reserve the workload's name and port for an incoming migration. With the service
    /// approach, also start a fresh instance of `workload` there (under its runtime, which
    /// may differ from the source's) for `service` (a service adapter) to sync.
    Prepare {
        migration: String,
        workload: WorkloadSpec,
        #[serde(default)]
        service: Option<String>,
    },
    /// Could this site take `workload` (its runtime adapter present; with `service`, can
    /// that service adapter run it here)? Answered with `Probed`.
    Probe {
        workload: WorkloadSpec,
        #[serde(default)]
        service: Option<String>,
        /// With a checkpoint: what restoring it needs of this site (checked before the
        /// source freezes; a mismatch is a `runtime_error`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        needs: Option<CheckpointNeeds>,
    },
    /// Service approach: make the prepared instance follow the source.
    StartSync { migration: String },
    /// Service approach: how far the replica is. Answered with `Sync`.
    SyncStatus { migration: String },
    /// Service approach, while the source holds its clients' traffic and is fenced: catch
    /// up to `mark` (what the source's service adapter answered to `fence`), promote, and
    /// confirm like a restore (answered with `Restored`).
    Promote {
        migration: String,
        #[serde(default)]
        mark: String,
    },
    /// One image file follows: `size` bytes (as `compression` frames them), then the
    /// 32-byte BLAKE3 digest of those bytes. A `growing` file's size is unknown when it
    /// starts: it comes in blocks, its size after the end block.
    File {
        migration: String,
        name: String,
        size: u64,
        #[serde(default)]
        compression: Compression,
        #[serde(default)]
        growing: bool,
    },
    /// Post-copy, before the freeze: the source's pages follow, sent ahead while it still
    /// runs (compressed bulk page framing, an empty chunk at the end); the destination
    /// keeps them for the page path, and serves them only once the source's list of the
    /// ones written since (which opens the bulk page connection) has come. Answered with
    /// `Ready`.
    Prepush { migration: String },
    /// Post-copy, once the lazy dump froze the source: which pages sent ahead are stale
    /// (the bulk page connection's list), then those pages as the frozen source holds them
    /// (packed page chunks, an empty one at the end). The destination forgets the stale
    /// pages sent ahead and serves its page cache from then on, usually before its restore
    /// touches a page. Answered with `Ready`.
    Settle { migration: String },
    /// Destination → source: has the source of this migration released its copy (the
    /// move is complete there)? Answered with `SourceState`.
    SourceState { migration: String },
    /// Every file is sent; verify them against the manifest and restore.
    Restore {
        migration: String,
        workload: WorkloadSpec,
        /// Path of the workload's log at the source (its stdout/stderr are re-pointed to
        /// the destination's log).
        source_log: PathBuf,
        manifest: Vec<FileMeta>,
        /// What the source adapter's checkpoint handed to the destination's restore.
        #[serde(default)]
        notes: Vec<(String, String)>,
        /// Post-copy: the image lacks the lazy pages; fetch them from the source's page
        /// server through a tunnel as the restored tree faults on them.
        #[serde(default)]
        postcopy: bool,
        /// The workload's volumes were sent (`Volumes`): place them before restoring.
        #[serde(default)]
        volumes: bool,
    },
    /// Checkpoint replication: which of these blocks (64 hex digits each, at most
    /// [`MAX_WANTED`]) of `workload`'s checkpoints does this site lack? Answered with
    /// `Missing`.
    BlocksWanted { workload: String, digests: String },
    /// Checkpoint replication: blocks follow (batches: a count, the digests, their
    /// lengths, then the blocks zstd-compressed together; a zero count ends). Each is
    /// checked against its digest. Answered with `Kept`.
    Blocks { workload: String },
    /// Checkpoint replication: the record of checkpoint `checkpoint` of `workload` follows
    /// (`size` bytes: its JSON, zstd-compressed); every block it names must be here
    /// already. Answered with `Kept`.
    Replica {
        workload: String,
        checkpoint: String,
        size: u64,
    },
    /// A migration's volume manifest (`size` bytes of zstd JSON follow): which files, at
    /// which paths, from which blocks (sent before with `Blocks`); the restore places them
    /// first. Answered with `Kept`.
    Volumes {
        workload: String,
        migration: String,
        size: u64,
        /// The pre-copy's manifest: placed at once, while the workload still runs at the
        /// source (the final one is placed at the restore).
        #[serde(default)]
        precopy: bool,
    },
    /// Failover fence: does this site run `workload` recovered from a checkpoint the
    /// asking site replicated here (a failover while it was lost)? Answered with
    /// `Recovered`.
    Fence { workload: String },
    /// A warm destination: page `page` (of [`MAX_WANTED`] digests each) of the page blocks
    /// this site holds for `workload` (its checkpoints, the last image it received).
    /// Answered with `HeldPages`; a migration's source sends those pages as digests.
    HeldPages { workload: String, page: u32 },
    /// What is the destination's state for this migration? With `wait_ms`, a copy in its
    /// page phase answers once that phase ends, or after `wait_ms` (at most
    /// [`MAX_STATUS_WAIT_MS`]) if it has not.
    Status {
        migration: String,
        #[serde(default, skip_serializing_if = "is_zero")]
        wait_ms: u32,
    },
    /// Give up this migration (refused once the destination has confirmed).
    Abort { migration: String },
    /// Carry one connection to `workload` at the peer: after the `TunnelOpen` answer the
    /// stream is a raw byte pipe to the workload's port there. With `migration`, the
    /// tunnel serves that migration (a replica at the destination following its source),
    /// reaches `port`, and is refused once the migration has ended.
    Tunnel {
        workload: String,
        #[serde(default)]
        migration: Option<String>,
        #[serde(default)]
        port: Option<u16>,
        /// With `migration`: reach the post-copy page server of that migration's frozen
        /// source instead of a port of the workload.
        #[serde(default)]
        pages: bool,
        /// With `pages`: the pages a fault waits for (sent ahead of everything else).
        #[serde(default)]
        urgent: bool,
    },
}

/// The longest a `Status` request waits for a page phase to end.
pub const MAX_STATUS_WAIT_MS: u32 = 2_000;

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The destination's view of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    Unknown,
    Receiving,
    Restoring,
    /// Post-copy: the restored copy runs and its pages are still arriving.
    Paging,
    Confirmed,
    Aborted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Refused,
    Integrity,
    RestoreFailed,
    Busy,
    Internal,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Hello {
        site: String,
        version: String,
    },
    Ready,
    /// The answer to `Measure`: the bytes read, and this site's clock (ms since the Unix
    /// epoch) when the last arrived.
    Measured {
        bytes: u64,
        unix_ms: u64,
    },
    /// The answer to `Prepare`: ready, and the destination journal's generation after it
    /// recorded the migration (see `Status`).
    Prepared {
        generation: u64,
    },
    Stored {
        name: String,
        blake3: String,
    },
    Restored {
        pid: i32,
        restore_ms: u64,
    },
    Probed {
        /// Why the runtime cannot run here, if it cannot.
        runtime_error: Option<String>,
        /// Asked with a checkpoint's needs: why this site cannot restore it (empty: it
        /// can).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        incompatible: Vec<String>,
        /// The service adapter's plan at this site, when asked.
        service: Option<PlanInfo>,
    },
    Sync(SyncInfo),
    Status {
        state: TargetState,
        /// The destination journal's generation now: lower than the one it answered to
        /// `Prepare` means its journal went back in time (lost, or an old copy put back),
        /// and its word on this migration cannot be trusted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generation: Option<u64>,
    },
    Aborted,
    /// The source's word on a migration: whether it released its copy, and its phase.
    SourceState {
        released: bool,
        phase: String,
    },
    TunnelOpen,
    /// The blocks asked about that this site lacks (64 hex digits each).
    Missing {
        digests: String,
    },
    /// One page of the page blocks held for a workload (64 hex digits each), and how many
    /// pages the whole list takes.
    HeldPages {
        digests: String,
        pages: u32,
    },
    /// The answer to `Fence`: since when this site runs the workload recovered from the
    /// asking site's checkpoint (none: it does not).
    Recovered {
        since_ms: Option<u64>,
    },
    /// What a replication request stored.
    Kept {
        blocks: u64,
        bytes: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// An adapter's plan, on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanInfo {
    pub feasible: bool,
    pub reason: String,
    pub expected_downtime_ms: Option<u64>,
}

/// A replica's state, on the wire and in the migration record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncInfo {
    pub bytes: u64,
    pub lag: u64,
    pub in_sync: bool,
    pub detail: String,
}

impl Response {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Error {
            code,
            message: message.into(),
        }
    }
}

/// Encodes a header frame: big-endian u32 length, then JSON.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_vec(msg)?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknown_fields() {
        let req = Request::Status {
            migration: "m1".into(),
            wait_ms: 0,
        };
        let frame = encode(&req).expect("encode");
        let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        assert_eq!(len, frame.len() - 4);
        let back: Request = serde_json::from_slice(&frame[4..]).expect("decode");
        assert!(matches!(back, Request::Status { migration, wait_ms: 0 } if migration == "m1"));
        // A plain status request is as it always was; the wait is optional.
        assert_eq!(
            serde_json::to_string(&req).expect("json"),
            r#"{"type":"status","migration":"m1"}"#
        );
        let bad = br#"{"type":"status","migration":"m1","extra":1}"#;
        assert!(serde_json::from_slice::<Request>(bad).is_err());
        assert!(serde_json::from_slice::<Request>(br#"{"type":"launch"}"#).is_err());
    }
}
