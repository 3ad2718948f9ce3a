//! The site configuration (`site.toml`): parsed, resolved and validated before anything binds.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::identity::Fingerprint;
use crate::names;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot write config {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "config {path} holds the API token (full control of this site) and other users can read it (mode {mode:03o}); run `chmod 600 {path}` and start again"
    )]
    Exposed { path: PathBuf, mode: u32 },
}

/// Refuses a config file other users can read or write: it holds the site's API token.
fn check_private(path: &Path, file: &std::fs::File) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = file
        .metadata()
        .map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Reads a config file that only its owner may read.
fn read_private(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let read = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read)?;
    check_private(path, &file)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read)?;
    Ok(text)
}

/// A site's configuration as written in `site.toml`. Relative paths are relative to the
/// directory holding the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// This site's name, as its peers list it.
    pub name: String,
    /// Where the gateway keeps its journal, images and workload logs.
    pub data_dir: PathBuf,
    pub identity: IdentityConfig,
    pub api: ApiConfig,
    pub peer: PeerListenConfig,
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    #[serde(default)]
    pub workloads: WorkloadConfig,
    #[serde(default)]
    pub criu: CriuConfig,
    #[serde(default)]
    pub plugins: PluginsConfig,
    #[serde(default)]
    pub ingress: IngressConfig,
    #[serde(default)]
    pub migration: MigrationConfig,
    /// Programs run after a checkpoint and before a restore (`crate::hooks`).
    #[serde(default)]
    pub hooks: crate::hooks::HooksConfig,
}

/// How this site lets workloads move.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// The approaches this site's authority allows: "orchestrator" (the orchestrator's
    /// checkpoint API), "container" (CRIU on the processes), "service" (a service
    /// adapter's live replica). The engine picks among these.
    #[serde(default = "default_approaches")]
    pub approaches: Vec<String>,
    /// Longest a service-level replica may take to get in sync before the move is
    /// abandoned; the source keeps serving throughout.
    #[serde(default = "default_sync_timeout")]
    pub sync_timeout_secs: u64,
    /// Post-copy: send the source's pages ahead while it still runs, so the switch leaves
    /// only the pages written since to faults and the bulk push (false: every page after
    /// the switch; less traffic for a workload that rewrites its memory fast).
    #[serde(default = "default_true")]
    pub prepush: bool,
    /// Post-copy, at the destination: which lazy-pages daemon places the pages, "ferry"
    /// (its own: faults answered at once, the rest copied in large runs) or "criu"
    /// (`criu lazy-pages`).
    #[serde(default = "default_lazy_pages")]
    pub lazy_pages: String,
    /// A source that has waited this long for a silent destination's word (its restore's
    /// outcome, or its page phase) reports the migration `stalled` (API and metrics); it
    /// stays frozen with its image until the destination answers.
    #[serde(default = "default_stall_after")]
    pub stall_after_secs: u64,
}

fn default_stall_after() -> u64 {
    60
}

fn default_lazy_pages() -> String {
    "ferry".into()
}

fn default_true() -> bool {
    true
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            approaches: default_approaches(),
            sync_timeout_secs: default_sync_timeout(),
            prepush: true,
            lazy_pages: default_lazy_pages(),
            stall_after_secs: default_stall_after(),
        }
    }
}

/// Every approach Ferry knows, from the one needing the most authority.
pub const APPROACHES: [&str; 3] = ["orchestrator", "container", "service"];

fn default_approaches() -> Vec<String> {
    APPROACHES.iter().map(ToString::to_string).collect()
}
fn default_sync_timeout() -> u64 {
    300
}

/// How long and how much client traffic the ingress holds while a workload moves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    /// Longest a connection or request waits; past it TCP connections close and HTTP
    /// requests get 503 with Retry-After.
    #[serde(default = "default_max_hold")]
    pub max_hold_ms: u64,
    /// Longest the ingress waits for busy connections and in-flight requests to finish
    /// before the freeze.
    #[serde(default = "default_drain")]
    pub drain_ms: u64,
    /// Most connections or requests held at once.
    #[serde(default = "default_max_held")]
    pub max_held: usize,
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            max_hold_ms: default_max_hold(),
            drain_ms: default_drain(),
            max_held: default_max_held(),
        }
    }
}

fn default_max_hold() -> u64 {
    30_000
}
fn default_drain() -> u64 {
    2_000
}
fn default_max_held() -> usize {
    10_000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// PEM certificate (self-signed); its SHA-256 fingerprint is what peers pin.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// HTTPS listen address of the REST API.
    pub listen: SocketAddr,
    /// Bearer token every API call must present.
    pub token: String,
    /// The programs a workload started through the API may run (its command's first
    /// word: a name found on PATH, or an absolute path); absent: any. `ferry init`
    /// writes the list it is given (`--allow-command`), empty by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_commands: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerListenConfig {
    /// UDP listen address of the QUIC peer link.
    pub listen: SocketAddr,
    /// The peer link's initial congestion window, in bytes. Sites are joined by
    /// provisioned links, and the pages post-copy sends ahead start on a link that was
    /// idle: QUIC's usual 14,720 bytes take some ten round trips to grow to a
    /// 1 Gbit/s × 10 ms link's share. Lower it on a shared path.
    #[serde(
        default = "default_initial_window",
        skip_serializing_if = "is_default_initial_window"
    )]
    pub initial_window_bytes: u64,
}

/// The smallest and largest initial congestion windows a site may set.
pub const INITIAL_WINDOW_RANGE: std::ops::RangeInclusive<u64> = 14_720..=(16 << 20);

fn default_initial_window() -> u64 {
    1 << 20
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_default_initial_window(w: &u64) -> bool {
    *w == default_initial_window()
}

impl PeerListenConfig {
    /// Listening on `listen`, with the default initial window.
    pub fn on(listen: SocketAddr) -> Self {
        Self {
            listen,
            initial_window_bytes: default_initial_window(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: String,
    /// The peer gateway's QUIC address.
    pub address: SocketAddr,
    /// SHA-256 fingerprint of the peer's certificate (printed by its `ferry init`).
    pub fingerprint: Fingerprint,
    /// How image files sent to this peer travel: "zstd" (default) or "none".
    #[serde(default)]
    pub compression: crate::transfer::Compression,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Parent of each workload's working directory. The same path on every site, because a
    /// restored process keeps the working directory it had when it was checkpointed.
    #[serde(default = "default_work_root")]
    pub work_root: PathBuf,
    /// cgroup (v2) under which each workload gets its own group.
    #[serde(default = "default_cgroup_parent")]
    pub cgroup_parent: String,
    /// Seconds a restored workload has to answer on its port before the restore counts as
    /// failed.
    #[serde(default = "default_health_timeout")]
    pub health_timeout_secs: u64,
    /// Checkpoints kept per workload (`ferry checkpoint`); older ones are dropped.
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: usize,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            work_root: default_work_root(),
            cgroup_parent: default_cgroup_parent(),
            health_timeout_secs: default_health_timeout(),
            keep_checkpoints: default_keep_checkpoints(),
        }
    }
}

fn default_keep_checkpoints() -> usize {
    3
}

fn default_work_root() -> PathBuf {
    PathBuf::from("/var/lib/ferry/workdirs")
}
fn default_cgroup_parent() -> String {
    "ferry".to_string()
}
fn default_health_timeout() -> u64 {
    10
}

/// Adapters (WebAssembly components) and what this site lets each of them do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// Folder of `NAME.wasm` components, each beside its `NAME.toml` manifest.
    #[serde(default = "default_plugin_dir")]
    pub dir: PathBuf,
    /// Where precompiled components are cached (default: DATA_DIR/plugin-cache).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Deadline of one call into an adapter.
    #[serde(default = "default_call_timeout")]
    pub call_timeout_ms: u64,
    /// Linear-memory limit of one adapter instance.
    #[serde(default = "default_memory_limit")]
    pub memory_limit_mb: u64,
    /// Capabilities granted per adapter name; nothing is granted by default.
    #[serde(default)]
    pub grants: std::collections::BTreeMap<String, crate::plugins::grant::Grant>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dir: default_plugin_dir(),
            cache_dir: None,
            call_timeout_ms: default_call_timeout(),
            memory_limit_mb: default_memory_limit(),
            grants: Default::default(),
        }
    }
}

fn default_plugin_dir() -> PathBuf {
    PathBuf::from("plugins")
}
fn default_call_timeout() -> u64 {
    120_000
}
fn default_memory_limit() -> u64 {
    64
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriuConfig {
    /// Path of the criu binary; by default /usr/local/sbin/criu (where `scripts/setup`
    /// installs it), else `criu` on PATH.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

impl SiteConfig {
    /// Reads, resolves relative paths against the file's directory, and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_private(path)?;
        let mut cfg: SiteConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve(base);
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    /// Reads the file as written, relative paths unresolved (for editing it in place).
    pub fn read_raw(path: &Path) -> Result<Self, ConfigError> {
        let text = read_private(path)?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Adds a peer (or replaces the one of the same name) after validating it.
    pub fn upsert_peer(&mut self, peer: PeerConfig) -> Result<(), String> {
        self.peers.retain(|p| p.name != peer.name);
        self.peers.push(peer);
        self.validate()
    }

    /// Writes the config as TOML (used by `ferry init` and `ferry peer add`).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        // Owner-only from its first byte (it holds the API token), and whole: written
        // beside it, then renamed over it.
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let write = |source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(write)
    }

    fn resolve(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.data_dir);
        abs(&mut self.identity.cert);
        abs(&mut self.identity.key);
        abs(&mut self.workloads.work_root);
        abs(&mut self.plugins.dir);
        if let Some(c) = self.plugins.cache_dir.as_mut() {
            abs(c);
        }
    }

    pub fn plugin_cache_dir(&self) -> PathBuf {
        self.plugins
            .cache_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("plugin-cache"))
    }

    fn validate(&self) -> Result<(), String> {
        names::validate("site", &self.name).map_err(|e| e.to_string())?;
        if self.api.token.len() < 16 {
            return Err("api.token must be at least 16 characters".into());
        }
        if !INITIAL_WINDOW_RANGE.contains(&self.peer.initial_window_bytes) {
            return Err(format!(
                "peer.initial_window_bytes must be between {} and {}",
                INITIAL_WINDOW_RANGE.start(),
                INITIAL_WINDOW_RANGE.end()
            ));
        }
        let mut seen = HashSet::new();
        for p in &self.peers {
            names::validate("peer", &p.name).map_err(|e| e.to_string())?;
            if p.name == self.name {
                return Err(format!("peer {:?} has this site's own name", p.name));
            }
            if !seen.insert(p.name.as_str()) {
                return Err(format!("peer {:?} is listed twice", p.name));
            }
        }
        if self.workloads.cgroup_parent.contains("..") || self.workloads.cgroup_parent.is_empty() {
            return Err("workloads.cgroup_parent must be a plain relative cgroup path".into());
        }
        if self.plugins.call_timeout_ms < 10 || self.plugins.memory_limit_mb == 0 {
            return Err("plugins.call_timeout_ms must be at least 10 and plugins.memory_limit_mb at least 1".into());
        }
        if let Some(a) = self
            .migration
            .approaches
            .iter()
            .find(|a| !APPROACHES.contains(&a.as_str()))
        {
            return Err(format!(
                "migration.approaches: unknown approach {a:?} (known: {})",
                APPROACHES.join(", ")
            ));
        }
        if !["ferry", "criu"].contains(&self.migration.lazy_pages.as_str()) {
            return Err(format!(
                "migration.lazy_pages: unknown daemon {:?} (known: ferry, criu)",
                self.migration.lazy_pages
            ));
        }
        if !self.workloads.work_root.is_absolute() {
            return Err("workloads.work_root must be an absolute path".into());
        }
        Ok(())
    }

    pub fn peer(&self, name: &str) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.name == name)
    }

    pub fn criu_path(&self) -> PathBuf {
        if let Some(p) = &self.criu.path {
            return p.clone();
        }
        let local = PathBuf::from("/usr/local/sbin/criu");
        if local.exists() {
            local
        } else {
            PathBuf::from("criu")
        }
    }

    /// The URL clients use to reach this site's API (a wildcard listen address is reached
    /// through loopback).
    pub fn api_url(&self) -> String {
        let mut addr = self.api.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("https://{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        r#"
name = "a"
data_dir = "data"
[identity]
cert = "cert.pem"
key = "key.pem"
[api]
listen = "127.0.0.1:7443"
token = "0123456789abcdef0123"
[peer]
listen = "0.0.0.0:7444"
[[peers]]
name = "b"
address = "10.0.0.2:7444"
fingerprint = "aa:bb"
"#
        .to_string()
    }

    fn load_str(text: &str) -> Result<SiteConfig, ConfigError> {
        let dir = std::env::temp_dir().join(format!("ferry-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join(format!("site-{}.toml", text.len()));
        std::fs::write(&path, text).expect("write");
        set_mode(&path, 0o600);
        SiteConfig::load(&path)
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn a_config_others_can_read_is_refused_and_saving_makes_it_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ferry-cfg-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("site.toml");
        std::fs::write(&path, sample().replace("aa:bb", &"ab".repeat(32))).expect("write");
        set_mode(&path, 0o644);
        let err = SiteConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600") && err.contains("644"), "{err}");
        assert!(SiteConfig::read_raw(&path).is_err());
        // Saved again (by init or an edit): owner-only, and loadable.
        set_mode(&path, 0o600);
        let cfg = SiteConfig::read_raw(&path).expect("owner-only");
        set_mode(&path, 0o644);
        cfg.save(&path).expect("save");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        SiteConfig::load(&path).expect("loads");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let text = sample().replace("aa:bb", &"ab".repeat(32));
        let cfg = load_str(&text).expect("valid");
        assert!(cfg.data_dir.is_absolute());
        assert!(cfg.identity.cert.ends_with("cert.pem"));
        assert_eq!(cfg.peer("b").map(|p| p.address.port()), Some(7444));
    }

    #[test]
    fn a_bad_fingerprint_is_rejected_with_the_field() {
        let err = load_str(&sample()).unwrap_err().to_string();
        assert!(err.contains("fingerprint"), "{err}");
    }

    #[test]
    fn the_peer_links_initial_window_defaults_to_1_mib_and_is_bounded() {
        let valid = sample().replace("aa:bb", &"ab".repeat(32));
        let cfg = load_str(&valid).expect("valid");
        assert_eq!(cfg.peer.initial_window_bytes, 1 << 20);
        let set = valid.replace(
            "listen = \"0.0.0.0:7444\"",
            "listen = \"0.0.0.0:7444\"\ninitial_window_bytes = 14720",
        );
        assert_eq!(
            load_str(&set).expect("valid").peer.initial_window_bytes,
            14720
        );
        let tiny = valid.replace(
            "listen = \"0.0.0.0:7444\"",
            "listen = \"0.0.0.0:7444\"\ninitial_window_bytes = 1000",
        );
        let err = load_str(&tiny).unwrap_err().to_string();
        assert!(err.contains("peer.initial_window_bytes"), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let text = sample().replace("aa:bb", &"ab".repeat(32)) + "\nbogus = 1\n";
        let err = load_str(&text).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn short_tokens_are_rejected() {
        let text = sample()
            .replace("aa:bb", &"ab".repeat(32))
            .replace("0123456789abcdef0123", "short");
        let err = load_str(&text).unwrap_err().to_string();
        assert!(err.contains("api.token"), "{err}");
    }
}
