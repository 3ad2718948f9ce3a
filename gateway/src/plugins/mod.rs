//! The adapter host: loads WebAssembly components (wasmtime, component model) from the
//! site's plugin folder, grants each only what its manifest asks for and the site allows,
//! and runs each in its own task under a call deadline and a memory limit. Every released
//! version of the WIT package is hosted at once; each component is served through the
//! version its manifest names. The migration engine reaches runtimes only through
//! [`AdapterHandle`]s.

mod actor;
mod bindings;
mod call;
mod containers;
mod decider;
pub mod grant;
mod host;
mod inflight;
mod manifest;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use wasmtime::component::Component;
use wasmtime::Engine;

use crate::criu::Criu;
use actor::{Actor, Limits, Request};
use bindings::Linkers;
pub use bindings::{AdapterInfo, Approach, Plan, SyncState, World};
pub use call::{AdapterCall, Call, Reply, Spawned};
use grant::capability_of;
pub use grant::{Capability, Grant, Granted};
pub use host::TunnelOpener;
pub use manifest::Manifest;

/// How an approach is named in records and listings.
pub fn approach_name(a: Approach) -> &'static str {
    match a {
        Approach::Orchestrator => "orchestrator",
        Approach::Container => "container",
        Approach::Service => "service",
    }
}

/// Granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Epoch ticks in a call deadline of `timeout` (at least one).
fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_millis() as u64)
        .div_ceil(EPOCH_TICK.as_millis() as u64)
        .max(1)
}

#[derive(Debug, Error)]
pub enum PluginError {
    #[error("cannot read plugin folder {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("plugin {name}: {detail}")]
    Load { name: String, detail: String },
    #[error("no adapter serves runtime {runtime:?} on this site (adapters: {installed}); install one in the plugin folder")]
    NoAdapter { runtime: String, installed: String },
    #[error("no service adapter {name:?} on this site (service adapters: {installed}); install it in the plugin folder")]
    NoService { name: String, installed: String },
    #[error("adapter {plugin}: {call} exceeded its {ms} ms deadline")]
    Deadline {
        plugin: String,
        call: &'static str,
        ms: u64,
    },
    #[error("adapter {plugin}: {call} exceeded its memory limit of {mb} MiB")]
    Memory {
        plugin: String,
        call: &'static str,
        mb: usize,
    },
    #[error("adapter {plugin}: {call} trapped: {detail}")]
    Trap {
        plugin: String,
        call: &'static str,
        detail: String,
    },
    #[error("adapter {plugin}: {call} denied: {detail}")]
    Denied {
        plugin: String,
        call: &'static str,
        detail: String,
    },
    #[error("adapter {plugin}: {call} is not supported: {detail}")]
    Unsupported {
        plugin: String,
        call: &'static str,
        detail: String,
    },
    #[error("adapter {plugin}: {call} failed: {detail}")]
    Failed {
        plugin: String,
        call: &'static str,
        detail: String,
    },
    #[error("adapter {plugin}: unexpected answer to {call}")]
    Protocol { plugin: String, call: &'static str },
    #[error("adapter {plugin} is not running (its task ended)")]
    Gone { plugin: String },
}

impl PluginError {
    fn from_adapter(plugin: &str, call: &'static str, e: bindings::AdapterError) -> Self {
        let plugin = plugin.to_string();
        match e {
            bindings::AdapterError::Denied(detail) => PluginError::Denied {
                plugin,
                call,
                detail,
            },
            bindings::AdapterError::Unsupported(detail) => PluginError::Unsupported {
                plugin,
                call,
                detail,
            },
            bindings::AdapterError::Failed(detail) => PluginError::Failed {
                plugin,
                call,
                detail,
            },
        }
    }
}

/// A loaded adapter, as `GET /v1/plugins` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    #[schema(value_type = String)]
    pub file: PathBuf,
    /// "runtime-adapter" or "service-adapter".
    pub world: String,
    /// Runtimes served (runtime adapters) or services known (service adapters).
    pub runtimes: Vec<String>,
    pub approaches: Vec<String>,
    pub asks: Vec<Capability>,
    pub granted: Granted,
    /// It runs its runtime's own lazy checkpoint through the `lazy` host interface
    /// (0.3.0 on), so it can move post-copy with the `exec` capability alone.
    pub lazy: bool,
    /// It exports workload hooks (`ferry:hooks@0.1.0`): post-checkpoint and pre-restore.
    pub hooks: bool,
    /// "loaded", or why it could not be.
    pub status: String,
}

/// Calls into one adapter. Cheap to clone.
#[derive(Clone)]
pub struct AdapterHandle {
    name: String,
    tx: mpsc::Sender<Request>,
}

impl AdapterHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An adapter written in Rust, served one call at a time by its own task exactly as a
    /// loaded component is: the seam that lets the engine be tested without WebAssembly.
    pub fn native<F, Fut>(name: &str, serve: F) -> Self
    where
        F: Fn(Call) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Reply, PluginError>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Request>(64);
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let _ = req.reply.send(serve(req.call).await);
            }
        });
        Self {
            name: name.to_string(),
            tx,
        }
    }

    async fn call(&self, call: Call) -> Result<Reply, PluginError> {
        let (reply, rx) = oneshot::channel();
        let gone = || PluginError::Gone {
            plugin: self.name.clone(),
        };
        self.tx
            .send(Request { call, reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    fn protocol(&self, call: &'static str) -> PluginError {
        PluginError::Protocol {
            plugin: self.name.clone(),
            call,
        }
    }

    pub async fn describe(&self) -> Result<AdapterInfo, PluginError> {
        match self.call(Call::Describe).await? {
            Reply::Info(i) => Ok(i),
            _ => Err(self.protocol("describe")),
        }
    }

    pub async fn probe(&self, call: AdapterCall) -> Result<Plan, PluginError> {
        match self.call(Call::Probe(call)).await? {
            Reply::Plan(p) => Ok(p),
            _ => Err(self.protocol("probe")),
        }
    }

    pub async fn prepare(&self, call: AdapterCall) -> Result<(), PluginError> {
        self.call(Call::Prepare(call)).await.map(|_| ())
    }

    /// Starts a workload; returns the process it started.
    pub async fn start_fresh(&self, call: AdapterCall) -> Result<Spawned, PluginError> {
        match self.call(Call::StartFresh(call)).await? {
            Reply::Started(s) => Ok(s),
            _ => Err(self.protocol("start-fresh")),
        }
    }

    pub async fn checkpoint(
        &self,
        call: AdapterCall,
    ) -> Result<Vec<(String, String)>, PluginError> {
        match self.call(Call::Checkpoint(call)).await? {
            Reply::Notes(n) => Ok(n),
            _ => Err(self.protocol("checkpoint")),
        }
    }

    pub async fn restore(
        &self,
        call: AdapterCall,
        notes: Vec<(String, String)>,
    ) -> Result<i32, PluginError> {
        match self.call(Call::Restore(call, notes)).await? {
            Reply::Pid(p) => Ok(p),
            _ => Err(self.protocol("restore")),
        }
    }

    /// Returns the source's new pid if resuming started a new process.
    pub async fn resume_source(&self, call: AdapterCall) -> Result<Option<i32>, PluginError> {
        match self.call(Call::ResumeSource(call)).await? {
            Reply::MaybePid(p) => Ok(p),
            _ => Err(self.protocol("resume-source")),
        }
    }

    pub async fn release_source(&self, call: AdapterCall) -> Result<(), PluginError> {
        self.call(Call::ReleaseSource(call)).await.map(|_| ())
    }

    /// The adapter's own `hook` (`ferry:hooks`) about a checkpoint or migration `id`; Ok
    /// when it exports none.
    pub async fn hook(
        &self,
        call: AdapterCall,
        hook: crate::spec::Hook,
        id: &str,
    ) -> Result<(), PluginError> {
        self.call(Call::Hook(call, hook, id.to_string()))
            .await
            .map(|_| ())
    }

    /// Service adapters, at the destination: make the fresh instance follow the source.
    pub async fn start_sync(&self, call: AdapterCall) -> Result<(), PluginError> {
        self.call(Call::StartSync(call)).await.map(|_| ())
    }

    pub async fn sync_progress(&self, call: AdapterCall) -> Result<SyncState, PluginError> {
        match self.call(Call::SyncProgress(call)).await? {
            Reply::Progress(p) => Ok(p),
            _ => Err(self.protocol("sync-progress")),
        }
    }

    /// At the source, while its traffic is held: stop taking changes; the mark of what
    /// the source has goes to the destination's `cut_over`.
    pub async fn fence(&self, call: AdapterCall) -> Result<String, PluginError> {
        match self.call(Call::Fence(call)).await? {
            Reply::Mark(m) => Ok(m),
            _ => Err(self.protocol("fence")),
        }
    }

    /// At the source, when the move is abandoned after `fence`.
    pub async fn unfence(&self, call: AdapterCall) -> Result<(), PluginError> {
        self.call(Call::Unfence(call)).await.map(|_| ())
    }

    /// At the destination, while the source's traffic is held: catch up to `mark`,
    /// promote.
    pub async fn cut_over(&self, call: AdapterCall, mark: String) -> Result<(), PluginError> {
        self.call(Call::CutOver(call, mark)).await.map(|_| ())
    }

    pub async fn abort_sync(&self, call: AdapterCall) -> Result<(), PluginError> {
        self.call(Call::AbortSync(call)).await.map(|_| ())
    }
}

/// What a site's plugin host needs from its configuration.
#[derive(Debug, Clone)]
pub struct HostSettings {
    /// Folder of `NAME.wasm` components beside their `NAME.toml` manifests.
    pub dir: PathBuf,
    /// Where compiled components are cached.
    pub cache_dir: PathBuf,
    pub call_timeout: Duration,
    pub memory_limit_mb: u64,
    /// What the site grants each adapter, by name.
    pub grants: BTreeMap<String, Grant>,
    /// Where programs adapters run are recorded while they run (none: not recorded); at
    /// load, those a previous gateway left running are killed.
    pub inflight_dir: Option<PathBuf>,
}

/// What every adapter of a site is loaded with.
struct Common<'a> {
    engine: &'a Engine,
    linkers: &'a Arc<Linkers>,
    criu: &'a Criu,
    tunnels: &'a Option<Arc<dyn TunnelOpener>>,
    inflight: Option<Arc<inflight::Inflight>>,
}

/// All adapters of a site.
pub struct PluginHost {
    infos: Vec<PluginInfo>,
    by_runtime: BTreeMap<String, AdapterHandle>,
    /// Service adapters, each asked whether it knows a workload's service.
    services: Vec<AdapterHandle>,
    /// Restart deciders (`DIR/deciders/NAME.wasm`), loaded on first use.
    deciders: Option<decider::Deciders>,
}

fn engine() -> Result<Engine, PluginError> {
    let mut cfg = wasmtime::Config::new();
    cfg.epoch_interruption(true).wasm_component_model(true);
    let engine = Engine::new(&cfg).map_err(|e| PluginError::Load {
        name: "(engine)".into(),
        detail: e.to_string(),
    })?;
    // The epoch clock behind every call deadline; stops when the engine is dropped.
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("ferry-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match weak.upgrade() {
                Some(e) => e.increment_epoch(),
                None => return,
            }
        })
        .map_err(|e| PluginError::Load {
            name: "(engine)".into(),
            detail: format!("cannot start the epoch thread: {e}"),
        })?;
    Ok(engine)
}

/// The `ferry:adapter` version an import or export names (`ferry:adapter/exec@0.2.0`),
/// if it is one of Ferry's.
fn wit_version_of(name: &str) -> Option<&str> {
    let (_, version) = name.strip_prefix("ferry:adapter/")?.split_once('@')?;
    Some(version)
}

/// Compiles a component, or loads its precompiled form from the cache, keyed by the
/// engine's compatibility hash (wasmtime version and settings) and the component's hash.
fn compile(
    engine: &Engine,
    name: &str,
    wasm: &Path,
    cache_dir: &Path,
) -> Result<Component, String> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(wasm).map_err(|e| format!("cannot read {}: {e}", wasm.display()))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let key = format!(
        "{name}-{:016x}-{}.cwasm",
        h.finish(),
        &blake3::hash(&bytes).to_hex()[..32]
    );
    let cached = cache_dir.join(key);
    if let Some(c) = from_cache(engine, name, cache_dir, &cached) {
        return Ok(c);
    }
    let component =
        Component::new(engine, &bytes).map_err(|e| format!("not a valid component: {e:#}"))?;
    if let Ok(ser) = component.serialize() {
        if let Err(e) = write_cache(cache_dir, &cached, &ser) {
            tracing::warn!(plugin = name, error = %e, "cannot write the compile cache");
        }
    }
    Ok(component)
}

/// The digest file beside a cache entry: BLAKE3 of its bytes, as this gateway wrote them.
fn digest_path(cached: &Path) -> PathBuf {
    cached.with_extension("blake3")
}

/// A cache entry, only if it is what this gateway wrote: its directory and file owned by
/// this user and writable by no one else, its bytes matching the digest written beside
/// them. Precompiled code is run as it is, so anything else is recompiled.
fn from_cache(engine: &Engine, name: &str, cache_dir: &Path, cached: &Path) -> Option<Component> {
    if !cached.is_file() {
        return None;
    }
    let digest = std::fs::read_to_string(digest_path(cached)).unwrap_or_default();
    let trusted = crate::sys::wasm::owned_and_private(cache_dir)
        && crate::sys::wasm::owned_and_private(cached)
        && crate::sys::wasm::owned_and_private(&digest_path(cached));
    let bytes = std::fs::read(cached).ok()?;
    if !trusted || blake3::hash(&bytes).to_hex().as_str() != digest.trim() {
        tracing::warn!(plugin = name, cache = %cached.display(), "compile cache entry not as this gateway wrote it (owner, modes or digest); recompiling");
        return None;
    }
    match crate::sys::wasm::load_precompiled(engine, &bytes) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(plugin = name, error = %e, "stale compile cache entry; recompiling");
            None
        }
    }
}

/// Writes a cache entry and its digest (the directory private to this user).
fn write_cache(cache_dir: &Path, cached: &Path, ser: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(cache_dir)?;
    std::fs::set_permissions(cache_dir, std::fs::Permissions::from_mode(0o700))?;
    let write = |path: &Path, bytes: &[u8]| -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)
    };
    write(&digest_path(cached), blake3::hash(ser).to_hex().as_bytes())?;
    write(cached, ser)
}

impl PluginHost {
    /// A host serving each runtime with the given adapter (native adapters in tests).
    pub fn from_handles(handles: Vec<(String, AdapterHandle)>) -> Arc<Self> {
        let infos = handles
            .iter()
            .map(|(runtime, h)| PluginInfo {
                name: h.name.clone(),
                version: String::new(),
                file: PathBuf::new(),
                world: World::Runtime.as_str().into(),
                runtimes: vec![runtime.clone()],
                approaches: Vec::new(),
                asks: Vec::new(),
                granted: Granted::default(),
                lazy: false,
                hooks: false,
                status: "native".into(),
            })
            .collect();
        Arc::new(Self {
            infos,
            by_runtime: handles.into_iter().collect(),
            services: Vec::new(),
            deciders: None,
        })
    }

    /// Adds service adapters (native ones in tests).
    pub fn with_services(self: Arc<Self>, services: Vec<AdapterHandle>) -> Arc<Self> {
        let mut this = Arc::try_unwrap(self).unwrap_or_else(|shared| Self {
            infos: shared.infos.clone(),
            by_runtime: shared.by_runtime.clone(),
            services: shared.services.clone(),
            deciders: None,
        });
        this.services.extend(services);
        Arc::new(this)
    }

    /// Loads every `NAME.wasm` with a `NAME.toml` manifest from the plugin folder. A plugin
    /// that fails to load is reported (and listed with its reason), not fatal.
    pub async fn load(cfg: &HostSettings, criu: Criu) -> Result<Arc<Self>, PluginError> {
        Self::load_with_tunnels(cfg, criu, None).await
    }

    /// [`Self::load`], with the peer link's tunnels for service adapters.
    pub async fn load_with_tunnels(
        cfg: &HostSettings,
        criu: Criu,
        tunnels: Option<Arc<dyn TunnelOpener>>,
    ) -> Result<Arc<Self>, PluginError> {
        let dir = &cfg.dir;
        let mut infos = Vec::new();
        let mut by_runtime = BTreeMap::new();
        let mut services = Vec::new();
        if !dir.is_dir() {
            tracing::warn!(dir = %dir.display(), "no plugin folder: no adapters, so no workloads can run; install adapters with scripts/plugins");
            return Ok(Arc::new(Self {
                infos,
                by_runtime,
                services,
                deciders: None,
            }));
        }
        let engine = engine()?;
        let deciders = decider::Deciders::new(
            &engine,
            dir,
            &cfg.cache_dir,
            cfg.call_timeout,
            cfg.memory_limit_mb,
        )
        .map_err(|detail| PluginError::Load {
            name: "(deciders)".into(),
            detail,
        })?;
        let linkers = Arc::new(Linkers::new(&engine).map_err(|e| PluginError::Load {
            name: "(linker)".into(),
            detail: e.to_string(),
        })?);
        // Programs a previous gateway's adapters left running: their answers have no
        // reader any more, and what they would still do (start a container) is stale.
        let inflight = cfg.inflight_dir.as_deref().and_then(|d| {
            inflight::Inflight::open(d)
                .inspect_err(|e| {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot keep a record of running adapter programs");
                })
                .ok()
        });
        if let Some(i) = &inflight {
            let killed = i.reap_orphans();
            if killed > 0 {
                tracing::warn!(
                    killed,
                    "killed adapter programs a previous gateway left running"
                );
            }
        }
        let common = Common {
            engine: &engine,
            linkers: &linkers,
            criu: &criu,
            tunnels: &tunnels,
            inflight: inflight.map(Arc::new),
        };
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| PluginError::Dir {
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("wasm"))
            .collect();
        entries.sort();
        for wasm in entries {
            let stem = wasm
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            match Self::load_one(cfg, &common, &wasm, &stem).await {
                Ok((info, handle)) if info.world == World::Service.as_str() => {
                    tracing::info!(plugin = %info.name, version = %info.version, services = ?info.runtimes, granted = ?info.granted.capabilities, "service adapter loaded");
                    services.push(handle);
                    infos.push(info);
                }
                Ok((info, handle)) => {
                    for rt in &info.runtimes {
                        if let Some(other) = by_runtime.get(rt) {
                            let other: &AdapterHandle = other;
                            tracing::warn!(runtime = %rt, kept = %other.name, ignored = %info.name, "two adapters serve one runtime");
                            continue;
                        }
                        by_runtime.insert(rt.clone(), handle.clone());
                    }
                    tracing::info!(plugin = %info.name, version = %info.version, runtimes = ?info.runtimes, granted = ?info.granted.capabilities, "adapter loaded");
                    infos.push(info);
                }
                Err(info) => infos.push(*info),
            }
        }
        Ok(Arc::new(Self {
            infos,
            by_runtime,
            services,
            deciders: Some(deciders),
        }))
    }

    async fn load_one(
        cfg: &HostSettings,
        common: &Common<'_>,
        wasm: &Path,
        stem: &str,
    ) -> Result<(PluginInfo, AdapterHandle), Box<PluginInfo>> {
        let Common {
            engine,
            linkers,
            criu,
            tunnels,
            inflight,
        } = common;
        let (engine, criu, tunnels): (&Engine, &Criu, &Option<Arc<dyn TunnelOpener>>) =
            (engine, criu, tunnels);
        let mut info = PluginInfo {
            name: stem.to_string(),
            version: String::new(),
            file: wasm.to_path_buf(),
            world: String::new(),
            runtimes: Vec::new(),
            approaches: Vec::new(),
            asks: Vec::new(),
            granted: Granted::default(),
            lazy: false,
            hooks: false,
            status: String::new(),
        };
        // A plugin that cannot load is listed with the reason, and logged.
        let fail = |mut info: PluginInfo, detail: String| {
            let err = PluginError::Load {
                name: info.name.clone(),
                detail: detail.clone(),
            };
            tracing::error!(error = %err, "adapter not loaded");
            info.status = format!("not loaded: {detail}");
            Err(Box::new(info))
        };
        let (manifest, wit) = match Manifest::load(&wasm.with_extension("toml")) {
            Ok((m, wit)) if m.name == stem => (m, wit),
            Ok((m, _)) => {
                return fail(
                    info,
                    format!("manifest names {:?}, file is {stem}.wasm", m.name),
                )
            }
            Err(e) => {
                return fail(
                    info,
                    format!("manifest {}: {e}", wasm.with_extension("toml").display()),
                )
            }
        };
        info.version = manifest.version.clone();
        info.world = manifest.world.clone();
        info.asks = manifest.capabilities.clone();
        let granted = Granted::intersect(&manifest, cfg.grants.get(&manifest.name));
        info.granted = granted.clone();
        let component = match compile(engine, &manifest.name, wasm, &cfg.cache_dir) {
            Ok(c) => c,
            Err(e) => return fail(info, e),
        };
        // Checked at load: a component may import only host interfaces its manifest asks for.
        let ty = component.component_type();
        info.hooks = ty
            .exports(engine)
            .any(|(name, _)| name == bindings::hooks::EXPORT);
        for (import, _) in ty.imports(engine) {
            info.lazy |= import.starts_with("ferry:adapter/lazy@");
            if let Some(Some(cap)) = capability_of(import) {
                if !manifest.capabilities.contains(&cap) {
                    return fail(
                        info,
                        format!("imports {import} but its manifest does not ask for {cap}"),
                    );
                }
            }
        }
        // And it was built against the version its manifest names: said here, rather than
        // as the linker's "no matching implementation" when it is instantiated.
        let names = ty.imports(engine).chain(ty.exports(engine)).map(|(n, _)| n);
        for name in names {
            if let Some(built) = wit_version_of(name) {
                if built != wit.as_str() {
                    return fail(
                        info,
                        format!(
                            "is built against ferry:adapter@{built} but its manifest says wit = \"{wit}\" (0.1.0 when absent); set wit = \"{built}\""
                        ),
                    );
                }
            }
        }
        let (tx, rx) = mpsc::channel(64);
        let actor = Actor {
            name: manifest.name.clone(),
            engine: engine.clone(),
            component,
            wit,
            world: manifest.world(),
            linkers: Arc::clone(linkers),
            tunnels: tunnels.clone(),
            granted: Arc::new(granted),
            criu: criu.clone(),
            inflight: inflight.clone(),
            limits: Limits {
                call_timeout: cfg.call_timeout,
                memory_bytes: (cfg.memory_limit_mb as usize) << 20,
            },
        };
        tokio::spawn(tracing::Instrument::instrument(
            actor.run(rx),
            tracing::info_span!("plugin", plugin = %manifest.name, wit = %wit),
        ));
        let handle = AdapterHandle {
            name: manifest.name.clone(),
            tx,
        };
        match handle.describe().await {
            Ok(d) => {
                info.runtimes = d.runtimes;
                info.approaches = d
                    .approaches
                    .iter()
                    .map(|a| approach_name(*a).to_string())
                    .collect();
                info.status = "loaded".into();
                Ok((info, handle))
            }
            Err(e) => fail(info, e.to_string()),
        }
    }

    /// What the site grants the adapter named `name` (none: no such adapter loaded).
    pub fn granted_to(&self, name: &str) -> Option<Granted> {
        self.infos
            .iter()
            .find(|p| p.name == name && p.status == "loaded")
            .map(|p| p.granted.clone())
    }

    pub fn list(&self) -> Vec<PluginInfo> {
        self.infos.clone()
    }

    /// Whether the adapter named `name` was granted capability `c` here.
    pub fn grants(&self, name: &str, c: Capability) -> bool {
        self.infos
            .iter()
            .any(|p| p.name == name && p.granted.allows(c))
    }

    /// Whether the adapter named `name` can checkpoint post-copy here: through the
    /// gateway's CRIU (`criu`), or its runtime's own lazy dump (`lazy`, with `exec`).
    pub fn can_dump_lazily(&self, name: &str) -> bool {
        self.infos.iter().any(|p| {
            p.name == name
                && (p.granted.allows(Capability::Criu)
                    || (p.lazy && p.granted.allows(Capability::Exec)))
        })
    }

    /// Every service adapter of this site.
    /// Asks decider plugin `name` what to do with an ended workload.
    pub async fn decide_restart(
        &self,
        name: &str,
        info: &crate::spec::ExitInfo,
    ) -> Result<crate::spec::RestartAction, String> {
        match &self.deciders {
            Some(d) => d.decide(name, info).await,
            None => Err(format!(
                "no decider {name:?}: this site has no plugin folder"
            )),
        }
    }

    pub fn services(&self) -> &[AdapterHandle] {
        &self.services
    }

    /// The service adapter named `name`.
    pub fn service(&self, name: &str) -> Result<AdapterHandle, PluginError> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| PluginError::NoService {
                name: name.to_string(),
                installed: self
                    .services
                    .iter()
                    .map(|s| s.name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The adapter serving `runtime`.
    pub fn adapter(&self, runtime: &str) -> Result<AdapterHandle, PluginError> {
        self.by_runtime
            .get(runtime)
            .cloned()
            .ok_or_else(|| PluginError::NoAdapter {
                runtime: runtime.to_string(),
                installed: if self.by_runtime.is_empty() {
                    "none".into()
                } else {
                    self.by_runtime
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest component there is: its preamble.
    const EMPTY_COMPONENT: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

    #[test]
    fn a_compile_cache_entry_changed_after_it_was_written_is_not_loaded() {
        let dir = std::env::temp_dir().join(format!("ferry-cwasm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let wasm = dir.join("empty.wasm");
        std::fs::write(&wasm, EMPTY_COMPONENT).expect("write");
        let cache = dir.join("cache");
        let engine = engine().expect("engine");
        compile(&engine, "empty", &wasm, &cache).expect("compiles");
        let entry = std::fs::read_dir(&cache)
            .expect("cache")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .expect("a cache entry");
        assert!(
            from_cache(&engine, "empty", &cache, &entry).is_some(),
            "its own entry loads"
        );
        // One byte changed at rest: the entry is not loaded (it would run as it is).
        let mut bytes = std::fs::read(&entry).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x5a;
        std::fs::write(&entry, &bytes).expect("tamper");
        assert!(from_cache(&engine, "empty", &cache, &entry).is_none());
        // Recompiling writes it afresh.
        compile(&engine, "empty", &wasm, &cache).expect("compiles");
        assert!(from_cache(&engine, "empty", &cache, &entry).is_some());
        // Writable by others: not trusted either.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(from_cache(&engine, "empty", &cache, &entry).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
