//! The workload vocabulary every layer shares: what to run (`WorkloadSpec`), where clients
//! reach it (`RouteSpec`), where it lives on a site (`Placement`), and its durable record
//! (`Workload`). Plain data with validation; no behaviour that needs another module.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::names::{self, NameError};

/// A workload description was rejected; the message says what to change.
#[derive(Debug, Error)]
pub enum SpecError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("invalid workload: {0}")]
    Invalid(String),
}

/// Is `path` absolute, one name for one place (no empty, `.` or `..` part, no trailing
/// `/`), and not the root itself?
pub fn plain_absolute_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    !rest.is_empty()
        && rest
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// What to run, as given to `POST /v1/workloads`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: String,
    /// Program and arguments; the program is looked up on a fixed PATH.
    pub command: Vec<String>,
    /// TCP port the workload serves; checked free before start and answering after start
    /// and after a restore.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Which adapter runs it: "process" (a bare process tree), "runc", …
    #[serde(default = "default_runtime")]
    pub runtime: String,
    /// Runtime-specific settings handed to the adapter.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// Ingress routes: where clients reach the workload at its site. They move with it.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// What says it serves, after it starts and after a restore (none: a TCP connection
    /// to `port`, or, without a port, that it keeps running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// Periodic checkpoints and where they are replicated (none: only on demand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<CheckpointPolicy>,
    /// What the site does when the workload's process ends unasked (none: nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    /// Directories it keeps state in (absolute paths): a migration moves their files with
    /// it, to the same paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
}

/// What a decider is told about an ended workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Its exit code, when it exited (not when a signal ended it).
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Restarts since it last ran a minute or more.
    pub restarts: u32,
    /// Seconds since its newest checkpoint was taken (none: it has none).
    pub checkpoint_age_secs: Option<u64>,
}

impl ExitInfo {
    /// From a recorded code (128 + N for signal N, as the registry records it).
    pub fn from_code(code: Option<i32>, restarts: u32, checkpoint_age_secs: Option<u64>) -> Self {
        let (exit_code, signal) = match code {
            Some(c) if c > 128 && c < 128 + 65 => (None, Some(c - 128)),
            other => (other, None),
        };
        Self {
            exit_code,
            signal,
            restarts,
            checkpoint_age_secs,
        }
    }

    /// A clean exit: code 0.
    pub fn clean(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// Where a workload hook runs: the site's `[hooks]` and the adapter's `ferry:hooks` exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// After a checkpoint was taken (a migration's too); a failure is logged.
    PostCheckpoint,
    /// Before a restore; a failure refuses it.
    PreRestore,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::PostCheckpoint => "post_checkpoint",
            Hook::PreRestore => "pre_restore",
        }
    }
}

/// What happens to an ended workload (the restart decider's answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RestartAction {
    /// Restored from its newest checkpoint (a fresh start if it has none).
    Restore,
    /// Started anew from its spec.
    Fresh,
    /// Left stopped with its image kept, until `ferry workload start`.
    Standby,
}

/// When a workload whose process ended is brought back, and who decides how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    pub when: RestartWhen,
    /// A decider component (a `ferry:decider` plugin) that chooses restore, fresh start
    /// or standby; none: the built-in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decider: Option<String>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum RestartWhen {
    /// Never: an ended workload stays `exited`.
    Never,
    /// When it failed: a non-zero exit code, or killed by a signal.
    OnFailure,
    /// Whenever it ends, a clean exit too.
    Always,
}

/// When a workload is checkpointed without being asked, and which peer keeps a copy of
/// each checkpoint (to recover it there if this site is lost).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointPolicy {
    /// Seconds between checkpoints taken while it runs (left running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_secs: Option<u64>,
    /// The peer site each checkpoint is replicated to (only the blocks it lacks travel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicate_to: Option<String>,
    /// How many of its checkpoints a site keeps (the newest; default: the site's
    /// `[workloads] keep_checkpoints`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
}

/// How a site decides a workload it started or restored is healthy, beyond its process
/// running (which is always required).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum HealthCheck {
    /// The port accepts a TCP connection.
    Tcp,
    /// `GET path` on the port answers 2xx or 3xx.
    Http { path: String },
    /// This command, run by the gateway at the workload's site (its network, the
    /// workload's PATH, no environment), exits 0.
    Exec { command: Vec<String> },
}

impl std::fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HealthCheck::Tcp => f.write_str("tcp"),
            HealthCheck::Http { path } => write!(f, "http:{path}"),
            HealthCheck::Exec { command } => write!(f, "exec:{}", command.join(" ")),
        }
    }
}

impl std::str::FromStr for HealthCheck {
    type Err = String;

    /// `tcp`, `http:/PATH`, or `exec:PROGRAM ARGS…` (split at spaces).
    fn from_str(s: &str) -> Result<Self, String> {
        let check = if s == "tcp" {
            HealthCheck::Tcp
        } else if let Some(path) = s.strip_prefix("http:") {
            HealthCheck::Http { path: path.into() }
        } else if let Some(cmd) = s.strip_prefix("exec:") {
            HealthCheck::Exec {
                command: cmd.split_whitespace().map(String::from).collect(),
            }
        } else {
            return Err(format!(
                "health check {s:?}: use tcp, http:/PATH or exec:PROGRAM ARGS"
            ));
        };
        check.validate().map_err(|e| e.to_string())?;
        Ok(check)
    }
}

impl HealthCheck {
    fn validate(&self) -> Result<(), SpecError> {
        match self {
            HealthCheck::Tcp => Ok(()),
            HealthCheck::Http { path } => {
                let printable = path.bytes().all(|b| b.is_ascii_graphic());
                if path.starts_with('/') && printable && path.len() <= 1024 {
                    Ok(())
                } else {
                    Err(SpecError::Invalid(format!(
                        "health check path {path:?} must start with / and hold no spaces or control characters"
                    )))
                }
            }
            HealthCheck::Exec { command } => {
                let program = command.first().map(String::as_str).unwrap_or_default();
                if program.is_empty()
                    || program.starts_with('-')
                    || command.len() > 64
                    || command.iter().any(|a| a.contains('\0'))
                {
                    Err(SpecError::Invalid(
                        "health check command: a program, then at most 63 arguments".into(),
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// A listen address at the site whose traffic goes to the workload's `port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    #[schema(value_type = String)]
    pub listen: std::net::SocketAddr,
    #[serde(default)]
    pub mode: RouteMode,
    /// HTTP mode: once the workload has moved, answer 307 (with Alt-Svc) pointing at the
    /// new site instead of forwarding through the peer link.
    #[serde(default)]
    pub redirect: bool,
}

impl RouteSpec {
    /// The mode as `--route` spells it (the prefix `from_str` reads).
    pub fn mode_name(&self) -> &'static str {
        match (self.mode, self.redirect) {
            (RouteMode::Tcp, _) => "tcp",
            (RouteMode::Http, false) => "http",
            (RouteMode::Http, true) => "http-redirect",
        }
    }
}

impl std::str::FromStr for RouteSpec {
    type Err = String;
    /// `ADDR:PORT` (TCP), `tcp:ADDR:PORT`, `http:ADDR:PORT`, `http-redirect:ADDR:PORT`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mode, redirect, addr) = match s.split_once(':') {
            Some(("tcp", rest)) => (RouteMode::Tcp, false, rest),
            Some(("http", rest)) => (RouteMode::Http, false, rest),
            Some(("http-redirect", rest)) => (RouteMode::Http, true, rest),
            _ => (RouteMode::Tcp, false, s),
        };
        let listen = addr.parse().map_err(|_| {
            format!("route {s:?}: expected [tcp:|http:|http-redirect:]ADDRESS:PORT")
        })?;
        Ok(Self {
            listen,
            mode,
            redirect,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RouteMode {
    /// Bytes, connection by connection; held connections are re-bound after the move.
    #[default]
    Tcp,
    /// HTTP/1.1, request by request; held requests go to wherever the workload runs next.
    Http,
}

fn default_runtime() -> String {
    "process".to_string()
}

impl WorkloadSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        names::validate("workload", &self.name)?;
        let Some(program) = self.command.first() else {
            return Err(SpecError::Invalid("command must not be empty".into()));
        };
        if program.is_empty() || program.starts_with('-') {
            return Err(SpecError::Invalid(format!(
                "command must start with a program name, not {program:?}"
            )));
        }
        if self.command.len() > 256 || self.command.iter().any(|a| a.contains('\0')) {
            return Err(SpecError::Invalid(
                "command has more than 256 arguments or a NUL byte".into(),
            ));
        }
        names::validate("runtime", &self.runtime)?;
        if self.settings.len() > 64
            || self
                .settings
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 4096)
        {
            return Err(SpecError::Invalid(
                "settings: at most 64, keys 1-128 and values up to 4096 bytes".into(),
            ));
        }
        if !self.routes.is_empty() && self.port.is_none() {
            return Err(SpecError::Invalid(
                "routes need the workload's --port".into(),
            ));
        }
        if self
            .routes
            .iter()
            .any(|r| r.redirect && r.mode != RouteMode::Http)
        {
            return Err(SpecError::Invalid("only HTTP routes can redirect".into()));
        }
        if self.routes.len() > 16 {
            return Err(SpecError::Invalid("at most 16 routes".into()));
        }
        if self.port == Some(0) {
            return Err(SpecError::Invalid("port must be 1-65535".into()));
        }
        if let Some(policy) = &self.checkpoints {
            if policy
                .every_secs
                .is_some_and(|s| !(5..=7 * 24 * 3600).contains(&s))
            {
                return Err(SpecError::Invalid("checkpoints every 5 s to 7 days".into()));
            }
            if let Some(site) = &policy.replicate_to {
                names::validate("site", site)?;
            }
            if policy.keep.is_some_and(|k| !(1..=1000).contains(&k)) {
                return Err(SpecError::Invalid("keep 1 to 1000 checkpoints".into()));
            }
        }
        if self.volumes.len() > 16 {
            return Err(SpecError::Invalid("at most 16 volumes".into()));
        }
        for v in &self.volumes {
            if !plain_absolute_path(v) {
                return Err(SpecError::Invalid(format!(
                    "volume {v:?}: an absolute path without '.', '..' or a trailing '/'"
                )));
            }
        }
        if let Some(decider) = self.restart.as_ref().and_then(|r| r.decider.as_ref()) {
            names::validate("decider", decider)?;
        }
        if let Some(check) = &self.health {
            check.validate()?;
            if self.port.is_none() && !matches!(check, HealthCheck::Exec { .. }) {
                return Err(SpecError::Invalid(format!(
                    "health check {check} needs the workload's --port"
                )));
            }
        }
        for k in self.env.keys() {
            let ok = !k.is_empty()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !k.as_bytes()[0].is_ascii_digit();
            if !ok {
                return Err(SpecError::Invalid(format!(
                    "environment variable name {k:?} is not valid"
                )));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadState {
    Running,
    /// Held by a migration: frozen or about to be.
    Migrating,
    Exited,
    /// Checkpointed and stopped: its image is kept, nothing runs; restored on demand.
    Standby,
}

impl std::fmt::Display for WorkloadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkloadState::Running => "running",
            WorkloadState::Migrating => "migrating",
            WorkloadState::Exited => "exited",
            WorkloadState::Standby => "standby",
        })
    }
}

/// Where a workload came from when it was restored here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Origin {
    pub site: String,
    pub migration: String,
}

/// A workload's durable record, also what the API returns.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Workload {
    #[serde(flatten)]
    pub spec: WorkloadSpec,
    pub site: String,
    pub state: WorkloadState,
    /// Host pid of the process tree's root.
    pub pid: Option<i32>,
    /// Start time of `pid` (clock ticks since boot), so a reused pid is never mistaken
    /// for the workload after a gateway restart.
    pub pid_start: Option<u64>,
    pub started_at_ms: u64,
    #[schema(value_type = String)]
    pub work_dir: PathBuf,
    #[schema(value_type = String)]
    pub log: PathBuf,
    #[schema(value_type = Option<String>)]
    pub cgroup: Option<PathBuf>,
    #[serde(default)]
    pub migration: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub restored_from: Option<Origin>,
    /// Restarts by its restart policy since it last ran long enough (the crash-loop
    /// backoff's count).
    #[serde(default)]
    pub restarts: u32,
}

impl Workload {
    /// Where this workload lives on its site.
    pub fn placement(&self) -> Placement {
        Placement {
            work_dir: self.work_dir.clone(),
            log: self.log.clone(),
            cgroup: self.cgroup.clone(),
        }
    }
}

/// Paths a workload gets on a site.
#[derive(Debug, Clone)]
pub struct Placement {
    pub work_dir: PathBuf,
    pub log: PathBuf,
    pub cgroup: Option<PathBuf>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_modes_are_named_as_they_are_written() {
        for mode in ["tcp", "http", "http-redirect"] {
            let route: RouteSpec = format!("{mode}:0.0.0.0:80").parse().unwrap();
            assert_eq!(route.mode_name(), mode);
        }
        let bare: RouteSpec = "127.0.0.1:80".parse().unwrap();
        assert_eq!(bare.mode_name(), "tcp");
    }

    fn spec(name: &str, cmd: &[&str]) -> WorkloadSpec {
        WorkloadSpec {
            name: name.into(),
            command: cmd.iter().map(ToString::to_string).collect(),
            port: None,
            env: BTreeMap::new(),
            runtime: "process".into(),
            settings: BTreeMap::new(),
            routes: Vec::new(),
            health: None,
            checkpoints: None,
            restart: None,
            volumes: Vec::new(),
        }
    }

    #[test]
    fn spec_validation_names_the_problem() {
        assert!(spec("redis", &["redis-server"]).validate().is_ok());
        assert!(matches!(
            spec("Bad", &["x"]).validate(),
            Err(SpecError::Name(_))
        ));
        let e = spec("a", &[]).validate().unwrap_err().to_string();
        assert!(e.contains("command must not be empty"), "{e}");
        let e = spec("a", &["--flag"]).validate().unwrap_err().to_string();
        assert!(e.contains("program name"), "{e}");
        let mut s = spec("a", &["x"]);
        s.env.insert("1BAD".into(), "v".into());
        assert!(s.validate().is_err());
        s.env.clear();
        s.port = Some(0);
        assert!(s.validate().is_err());
    }

    #[test]
    fn spec_json_rejects_unknown_fields() {
        let err = serde_json::from_str::<WorkloadSpec>(r#"{"name":"a","command":["x"],"prot":1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot"), "{err}");
    }
}
