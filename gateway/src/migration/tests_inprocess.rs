//! The in-process tier: two sites' engines in one test process, joined by a real QUIC
//! peer link on loopback, with a native adapter standing in for the WebAssembly ones.
//! The adapter's "workloads" are real processes (`sleep`), frozen with SIGSTOP and
//! checkpointed into real image files, so the engine's journal, hand-over, transfer,
//! rollback and recovery run for real; faults are injected at phase boundaries (fail,
//! delay, crash and reload from the journal). No root, no CRIU, no namespaces.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{
    Engine, EngineSettings, Fault, Faults, Migration, MigrationError, MoveOptions, Parts, Phase,
    Role,
};
use crate::config::{
    ApiConfig, IdentityConfig, PeerConfig, PeerListenConfig, SiteConfig, WorkloadConfig,
};
use crate::identity::Identity;
use crate::journal::{Collection, Journal};
use crate::peer::{PeerLink, TunnelServer, TunnelTarget};
use crate::plugins::{
    AdapterCall, AdapterHandle, AdapterInfo, Approach, Call, Plan, PluginError, PluginHost, Reply,
    Spawned, SyncState,
};
use crate::proxy::{HoldLimits, Ingress};
use crate::spec::{Workload, WorkloadSpec, WorkloadState};
use crate::sys::process;
use crate::workload::{RegistrySettings, WorkloadError, Workloads};

const RUNTIME: &str = "fake";
/// A second runtime the fake adapter serves, for moves that change runtime.
const OTHER_RUNTIME: &str = "fake2";
const PAGE_BYTES: usize = 3 * (1 << 20) + 4321;

/// The bytes a workload's "memory" holds: different per workload, checked at restore.
fn pages(workload: &str) -> Vec<u8> {
    let mut x = blake3::hash(workload.as_bytes()).as_bytes()[0] as u64 | 1;
    (0..PAGE_BYTES)
        .map(|i| {
            if i % 4096 < 2048 {
                0
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

/// Every process the fake adapter started, and the failures a test scripts per
/// (site, call).
#[derive(Default)]
struct World {
    children: Mutex<Vec<std::process::Child>>,
    failures: Mutex<HashMap<(String, &'static str), String>>,
    /// When each replica started syncing, by (site, migration).
    syncing: Mutex<HashMap<(String, String), Instant>>,
    /// Replicas whose sync was stopped.
    aborted: Mutex<Vec<String>>,
    /// Sources fenced for a switch and not unfenced since, by (site, migration).
    fenced: Mutex<Vec<(String, String)>>,
    /// Sources unfenced after a switch that failed, by migration.
    unfenced: Mutex<Vec<String>>,
    /// Sites get the service adapter too (else only checkpoints can move workloads).
    with_services: std::sync::atomic::AtomicBool,
    /// Copies a restore started, by (site, workload): a runtime knows its containers by
    /// name, and its release finds them so.
    started: Mutex<HashMap<(String, String), i32>>,
    /// Sites whose restore starts the copy and then fails (an inspect after the start).
    fail_after_start: Mutex<Vec<String>>,
}

impl World {
    fn fail(&self, site: &str, call: &'static str, message: &str) {
        self.failures
            .lock()
            .unwrap()
            .insert((site.to_string(), call), message.to_string());
    }

    fn scripted(&self, site: &str, call: &'static str) -> Option<String> {
        self.failures
            .lock()
            .unwrap()
            .get(&(site.to_string(), call))
            .cloned()
    }

    fn spawn(&self) -> i32 {
        let child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("sleep starts");
        let pid = child.id() as i32;
        self.children.lock().unwrap().push(child);
        pid
    }

    /// An adapter for `site` serving the `fake` runtime.
    fn adapter(self: &Arc<Self>, site: &str) -> AdapterHandle {
        let (world, site) = (Arc::clone(self), site.to_string());
        AdapterHandle::native(&format!("fake@{site}"), move |call| {
            let (world, site) = (Arc::clone(&world), site.clone());
            async move { world.serve(&site, call).await }
        })
    }

    /// A service adapter for `site` that knows the `fake` workloads: its replica gets in
    /// sync 200 ms after the sync starts (never, if "never-in-sync" is scripted).
    fn service(self: &Arc<Self>, site: &str) -> AdapterHandle {
        let (world, site) = (Arc::clone(self), site.to_string());
        AdapterHandle::native("fakesvc", move |call| {
            let (world, site) = (Arc::clone(&world), site.clone());
            async move { world.serve_service(&site, call) }
        })
    }

    fn serve_service(&self, site: &str, call: Call) -> Result<Reply, PluginError> {
        let name = call.name();
        let failed = |detail: String| PluginError::Failed {
            plugin: "fakesvc".into(),
            call: name,
            detail,
        };
        if let Some(detail) = self.scripted(site, name) {
            return Err(failed(detail));
        }
        let key = |c: &AdapterCall| (site.to_string(), c.migration.clone().unwrap_or_default());
        match call {
            Call::Describe => Ok(Reply::Info(AdapterInfo {
                name: "fakesvc".into(),
                version: "0".into(),
                approaches: vec![Approach::Service],
                runtimes: vec![RUNTIME.into()],
            })),
            Call::Probe(_) => Ok(Reply::Plan(Plan {
                feasible: true,
                approach: Some(Approach::Service),
                reason: "a fake replica".into(),
                expected_downtime_ms: Some(10),
            })),
            Call::StartSync(c) => {
                if c.live_pid().is_none() || c.migration.is_none() || c.peer.is_none() {
                    return Err(failed(format!("no replica process or migration: {c:?}")));
                }
                self.syncing.lock().unwrap().insert(key(&c), Instant::now());
                Ok(Reply::Unit)
            }
            Call::SyncProgress(c) => {
                let since = self.syncing.lock().unwrap().get(&key(&c)).copied();
                let since = since.ok_or_else(|| failed("not syncing".into()))?;
                let never = self.scripted(site, "never-in-sync").is_some();
                let in_sync = !never && since.elapsed() >= Duration::from_millis(200);
                Ok(Reply::Progress(SyncState {
                    bytes: since.elapsed().as_millis() as u64 * 1000,
                    lag: u64::from(!in_sync),
                    in_sync,
                    detail: if in_sync {
                        "in sync".into()
                    } else {
                        "copying".into()
                    },
                }))
            }
            Call::Fence(c) => {
                if c.live_pid().is_none() || c.migration.is_none() {
                    return Err(failed(format!("no source process or migration: {c:?}")));
                }
                self.fenced.lock().unwrap().push(key(&c));
                Ok(Reply::Mark(format!("fenced {}", key(&c).1)))
            }
            Call::Unfence(c) => {
                let k = key(&c);
                self.fenced.lock().unwrap().retain(|f| f != &k);
                self.unfenced.lock().unwrap().push(k.1);
                Ok(Reply::Unit)
            }
            Call::CutOver(c, mark) => {
                if c.live_pid().is_none() {
                    return Err(failed("the replica is gone".into()));
                }
                let expected = format!("fenced {}", key(&c).1);
                if mark != expected {
                    return Err(failed(format!(
                        "mark {mark:?}, not the source's {expected:?}"
                    )));
                }
                Ok(Reply::Unit)
            }
            Call::AbortSync(c) => {
                self.aborted.lock().unwrap().push(key(&c).1);
                Ok(Reply::Unit)
            }
            other => Err(PluginError::Unsupported {
                plugin: "fakesvc".into(),
                call: other.name(),
                detail: "a service adapter".into(),
            }),
        }
    }

    async fn serve(&self, site: &str, call: Call) -> Result<Reply, PluginError> {
        let name = call.name();
        if let Some(detail) = self.scripted(site, name) {
            return Err(PluginError::Failed {
                plugin: format!("fake@{site}"),
                call: name,
                detail,
            });
        }
        let failed = |detail: String| PluginError::Failed {
            plugin: format!("fake@{site}"),
            call: name,
            detail,
        };
        match call {
            Call::Describe => Ok(Reply::Info(AdapterInfo {
                name: "fake".into(),
                version: "0".into(),
                approaches: vec![Approach::Container],
                runtimes: vec![RUNTIME.into()],
            })),
            Call::Probe(_) => Ok(Reply::Plan(Plan {
                feasible: true,
                approach: Some(Approach::Container),
                reason: "fake checkpoint".into(),
                expected_downtime_ms: Some(300),
            })),
            Call::Prepare(_) => Ok(Reply::Unit),
            Call::StartFresh(_) => Ok(Reply::Started(Spawned {
                pid: self.spawn(),
                holder: None,
            })),
            Call::Checkpoint(c) => {
                let pid = c.live_pid().ok_or_else(|| failed("no process".into()))?;
                process::signal(pid, libc::SIGSTOP);
                let dir = c.images.clone().ok_or_else(|| failed("no images".into()))?;
                write_image(&dir, &c.spec.name)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                Ok(Reply::Notes(vec![("fake".into(), "1".into())]))
            }
            Call::Restore(c, notes) => {
                let dir = c.images.clone().ok_or_else(|| failed("no images".into()))?;
                check_image(&dir, &c.spec.name).map_err(failed)?;
                if notes != [("fake".to_string(), "1".to_string())] {
                    return Err(failed(format!("notes lost: {notes:?}")));
                }
                let pid = self.spawn();
                self.started
                    .lock()
                    .unwrap()
                    .insert((site.to_string(), c.spec.name.clone()), pid);
                if self
                    .fail_after_start
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|s| s == site)
                {
                    return Err(failed("started, then the inspect failed".into()));
                }
                Ok(Reply::Pid(pid))
            }
            Call::ResumeSource(c) => {
                if let Some(pid) = c.live_pid() {
                    process::signal(pid, libc::SIGCONT);
                }
                Ok(Reply::MaybePid(None))
            }
            Call::ReleaseSource(c) => {
                if let Some(pid) = c.live_pid() {
                    process::kill(pid);
                }
                let by_name = self
                    .started
                    .lock()
                    .unwrap()
                    .remove(&(site.to_string(), c.spec.name.clone()));
                if let Some(pid) = by_name {
                    process::kill(pid);
                }
                Ok(Reply::Unit)
            }
            // It exports no hooks.
            Call::Hook(..) => Ok(Reply::Unit),
            other => Err(failed(format!("{} is not a runtime call", other.name()))),
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for c in self.children.lock().unwrap().iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes a fake image the way CRIU does: the page file grows while the "dump" runs; a
/// log sits beside it that must never travel.
async fn write_image(dir: &Path, workload: &str) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    tokio::fs::write(dir.join("inventory.img"), workload.as_bytes()).await?;
    tokio::fs::write(dir.join("dump.log"), b"local only").await?;
    let data = pages(workload);
    let mut f = tokio::fs::File::create(dir.join("pages-1.img")).await?;
    for piece in data.chunks(1 << 20) {
        f.write_all(piece).await?;
        f.flush().await?;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    Ok(())
}

fn check_image(dir: &Path, workload: &str) -> Result<(), String> {
    let got = std::fs::read(dir.join("pages-1.img")).map_err(|e| format!("pages: {e}"))?;
    if got != pages(workload) {
        return Err("page image differs from what was dumped".into());
    }
    if dir.join("dump.log").exists() {
        return Err("the dump's log travelled".into());
    }
    match std::fs::read(dir.join("inventory.img")) {
        Ok(b) if b == workload.as_bytes() => Ok(()),
        _ => Err("inventory missing".into()),
    }
}

/// One site: its directories and the parts of a running gateway (minus the API).
struct Site {
    name: String,
    dir: PathBuf,
    cfg: SiteConfig,
    cancel: CancellationToken,
    engine: Arc<Engine>,
    workloads: Arc<Workloads>,
    ingress: Arc<Ingress>,
    peers: Arc<PeerLink>,
    plugins: Arc<PluginHost>,
}

fn free_udp_port() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr")
}

fn site_config(name: &str, dir: &Path, listen: SocketAddr, peer: PeerConfig) -> SiteConfig {
    SiteConfig {
        name: name.into(),
        data_dir: dir.join("data"),
        identity: IdentityConfig {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        },
        api: ApiConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            token: "0123456789abcdef0123".into(),
            allowed_commands: None,
        },
        peer: PeerListenConfig::on(listen),
        peers: vec![peer],
        workloads: WorkloadConfig {
            work_root: dir.join("work"),
            ..WorkloadConfig::default()
        },
        criu: Default::default(),
        plugins: Default::default(),
        ingress: Default::default(),
        migration: Default::default(),
        hooks: Default::default(),
    }
}

impl Site {
    /// Builds a site's parts from its directory (journal included) and starts serving
    /// peers; `recover` as a restarted gateway does.
    async fn start(cfg: SiteConfig, world: &Arc<World>) -> Self {
        let identity =
            Arc::new(Identity::load(&cfg.identity.cert, &cfg.identity.key).expect("identity"));
        let journal = Arc::new(Journal::open(&cfg.data_dir).expect("journal"));
        // The previous instance's socket closes once its last task has ended.
        let deadline = Instant::now() + Duration::from_secs(10);
        let peers = loop {
            match PeerLink::bind(&cfg, Arc::clone(&identity)) {
                Ok(p) => break p,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot bind the peer link: {e}"),
            }
        };
        let cancel = CancellationToken::new();
        let mut plugins = PluginHost::from_handles(vec![
            (RUNTIME.into(), world.adapter(&cfg.name)),
            (OTHER_RUNTIME.into(), world.adapter(&cfg.name)),
        ]);
        if world
            .with_services
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            plugins = plugins.with_services(vec![world.service(&cfg.name)]);
        }
        let ingress = Ingress::new(Arc::clone(&peers), HoldLimits::default(), cancel.clone());
        let workloads = Workloads::new(
            RegistrySettings {
                site: cfg.name.clone(),
                logs_dir: cfg.data_dir.join("logs"),
                work_root: cfg.workloads.work_root.clone(),
                cgroup_base: None,
                health_timeout: Duration::from_secs(5),
            },
            Arc::clone(&journal),
            Arc::clone(&plugins),
            Arc::clone(&ingress),
        )
        .expect("workloads");
        workloads.recover().expect("recover workloads");
        let engine = Engine::new(
            EngineSettings {
                site: cfg.name.clone(),
                data_dir: cfg.data_dir.clone(),
                parallel_files: 2,
                approaches: crate::config::APPROACHES.map(String::from).to_vec(),
                sync_timeout: Duration::from_secs(1),
                prepush: true,
                stall_after: std::time::Duration::from_secs(60),
                hooks: crate::hooks::Hooks::default(),
            },
            Parts {
                journal,
                workloads: Arc::clone(&workloads),
                peers: Arc::clone(&peers),
                plugins: Arc::clone(&plugins),
                ingress: Arc::clone(&ingress),
                criu: crate::criu::Criu::new("criu".into()),
                checkpoints: None,
            },
            cancel.clone(),
        )
        .expect("engine");
        tokio::spawn(Arc::clone(&peers).serve(
            Arc::clone(&engine),
            Arc::clone(&engine),
            cancel.clone(),
        ));
        engine.recover().expect("recover migrations");
        Self {
            name: cfg.name.clone(),
            dir: cfg.data_dir.clone(),
            cfg,
            cancel,
            engine,
            workloads,
            ingress,
            peers,
            plugins,
        }
    }

    /// The gateway process dies: everything in memory is gone, the journal and the
    /// workloads' processes stay. Returns the config to start it again.
    async fn crash(self) -> SiteConfig {
        self.cancel.cancel();
        self.peers.shutdown().await;
        self.ingress.drain(Duration::from_secs(1)).await;
        self.workloads.drain(Duration::from_secs(1)).await;
        self.engine.drain(Duration::from_secs(2)).await;
        self.cfg
    }

    async fn run(&self, name: &str) -> Workload {
        self.workloads
            .run(WorkloadSpec {
                name: name.into(),
                command: vec!["sleep".into(), "600".into()],
                port: None,
                env: BTreeMap::new(),
                runtime: RUNTIME.into(),
                settings: BTreeMap::new(),
                routes: Vec::new(),
                health: None,
                checkpoints: None,
                restart: None,
                volumes: Vec::new(),
            })
            .await
            .expect("workload starts")
    }

    fn state_of(&self, name: &str) -> Option<(WorkloadState, Option<char>)> {
        self.workloads
            .get(name)
            .map(|w| (w.state, w.pid.and_then(process::state)))
    }
}

/// Two sites, `a` and `b`, that know each other.
struct Pair {
    sa: Option<Site>,
    sb: Option<Site>,
    world: Arc<World>,
    _root: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Pair {
    async fn new(tag: &str) -> Self {
        Self::build(tag, false).await
    }

    /// Two sites that also have a service adapter for the fake workloads.
    async fn with_services(tag: &str) -> Self {
        Self::build(tag, true).await
    }

    async fn build(tag: &str, services: bool) -> Self {
        let root = std::env::temp_dir().join(format!("ferry-tier-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (da, db) = (root.join("a"), root.join("b"));
        std::fs::create_dir_all(&da).expect("dir");
        std::fs::create_dir_all(&db).expect("dir");
        let ia = Identity::generate("a", &da.join("cert.pem"), &da.join("key.pem")).expect("id");
        let ib = Identity::generate("b", &db.join("cert.pem"), &db.join("key.pem")).expect("id");
        let (pa, pb) = (free_udp_port(), free_udp_port());
        let peer = |name: &str, address, id: &Identity| PeerConfig {
            name: name.into(),
            address,
            fingerprint: id.fingerprint(),
            compression: Default::default(),
        };
        let world = Arc::new(World::default());
        world
            .with_services
            .store(services, std::sync::atomic::Ordering::SeqCst);
        let a = Site::start(site_config("a", &da, pa, peer("b", pb, &ib)), &world).await;
        let b = Site::start(site_config("b", &db, pb, peer("a", pa, &ia)), &world).await;
        Self {
            sa: Some(a),
            sb: Some(b),
            world,
            _root: TempDir(root),
        }
    }

    fn a(&self) -> &Site {
        self.sa.as_ref().expect("site a is up")
    }

    fn b(&self) -> &Site {
        self.sb.as_ref().expect("site b is up")
    }

    /// Site `name`'s gateway dies and a new one starts from its journal.
    async fn crash_and_restart(&mut self, name: &str) {
        let slot = if name == "a" {
            &mut self.sa
        } else {
            &mut self.sb
        };
        let cfg = slot.take().expect("site is up").crash().await;
        *slot = Some(Site::start(cfg, &self.world).await);
    }

    /// Site `name`'s gateway dies; it stays down until [`Self::restart`].
    async fn crash(&mut self, name: &str) -> SiteConfig {
        let slot = if name == "a" {
            &mut self.sa
        } else {
            &mut self.sb
        };
        slot.take().expect("site is up").crash().await
    }

    async fn restart(&mut self, cfg: SiteConfig) {
        let site = Site::start(cfg, &self.world).await;
        if site.name == "a" {
            self.sa = Some(site);
        } else {
            self.sb = Some(site);
        }
    }
}

/// Waits until migration `id` at `site` reaches a terminal phase.
async fn finished(site: &Site, id: &str) -> Migration {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(m) = site.engine.get(id).filter(|m| m.phase.is_terminal()) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "migration {id} at {} stuck: {:?}",
            site.name,
            site.engine.get(id)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The invariant after a migration ended: the service runs at exactly one site.
fn runs_only_at(pair: &Pair, at: &str, name: &str) {
    let (here, there) = if at == "a" {
        (pair.a(), pair.b())
    } else {
        (pair.b(), pair.a())
    };
    let w = here
        .workloads
        .get(name)
        .expect("workload listed where it runs");
    assert_eq!(w.state, WorkloadState::Running, "{w:?}");
    let pid = w.pid.expect("pid");
    assert!(
        matches!(process::state(pid), Some('S' | 'R')),
        "process at {at} is {:?}",
        process::state(pid)
    );
    assert!(
        there.workloads.get(name).is_none(),
        "a record of {name} left at {}",
        there.name
    );
}

async fn rolled_back_with(pair: &Pair, id: &str, reason: &str) {
    let m = finished(pair.a(), id).await;
    assert_eq!(m.phase, Phase::RolledBack, "{m:?}");
    assert!(
        m.error.as_deref().is_some_and(|e| e.contains(reason)),
        "{:?}",
        m.error
    );
    // The source runs again first; the destination is told to drop its part after.
    until("the destination to drop its reservation", || {
        pair.b().workloads.get("svc").is_none()
    })
    .await;
    runs_only_at(pair, "a", "svc");
    assert!(!pair.a().dir.join("images").join(id).exists(), "image kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_moves_and_the_source_is_released() {
    let pair = Pair::new("move").await;
    let src = pair.a().run("svc").await;
    let m = pair.a().engine.start("svc", "b").expect("planned");
    let m = finished(pair.a(), &m.id).await;
    assert_eq!(m.phase, Phase::Completed, "{m:?}");
    runs_only_at(&pair, "b", "svc");
    let at_b = pair.b().workloads.get("svc").expect("at b");
    assert_eq!(at_b.restored_from.map(|o| o.site), Some("a".into()));
    // The page image and the inventory travelled (the dump's log did not), verified
    // against the manifest.
    assert_eq!(m.files, 2, "{m:?}");
    assert!(m.bytes_moved >= PAGE_BYTES as u64);
    assert!(m.bytes_on_wire > 0 && m.bytes_on_wire < m.bytes_moved);
    assert!(m.timings.freeze_ms.is_some() && m.timings.dump_ms.is_some());
    until("the source process to end", || {
        process::start_time(src.pid.expect("pid")).is_none()
    })
    .await;
    let at_b = finished(pair.b(), &m.id).await;
    assert_eq!(at_b.phase, Phase::Completed);
    assert!(!pair.b().dir.join("incoming").join(&m.id).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_moves_there_and_back() {
    let pair = Pair::new("back").await;
    pair.a().run("svc").await;
    let there = pair.a().engine.start("svc", "b").expect("planned");
    assert_eq!(finished(pair.a(), &there.id).await.phase, Phase::Completed);
    let back = pair.b().engine.start("svc", "a").expect("planned back");
    assert_eq!(finished(pair.b(), &back.id).await.phase, Phase::Completed);
    runs_only_at(&pair, "a", "svc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_failure_resumes_the_source() {
    let pair = Pair::new("ckpt").await;
    pair.a().run("svc").await;
    pair.world.fail("a", "checkpoint", "disk full");
    let m = pair.a().engine.start("svc", "b").expect("planned");
    rolled_back_with(&pair, &m.id, "disk full").await;
    // The destination dropped its reservation and its half-received image.
    let at_b = finished(pair.b(), &m.id).await;
    assert_eq!(at_b.phase, Phase::RolledBack);
    assert!(!pair.b().dir.join("incoming").join(&m.id).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_failure_at_the_destination_resumes_the_source() {
    let pair = Pair::new("restore").await;
    pair.a().run("svc").await;
    pair.world.fail("b", "restore", "image rejected");
    let m = pair.a().engine.start("svc", "b").expect("planned");
    rolled_back_with(&pair, &m.id, "image rejected").await;
    assert_eq!(finished(pair.b(), &m.id).await.phase, Phase::RolledBack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_started_the_copy_then_failed_discards_it() {
    let pair = Pair::new("restore-late").await;
    pair.a().run("svc").await;
    pair.world
        .fail_after_start
        .lock()
        .unwrap()
        .push("b".to_string());
    let m = pair.a().engine.start("svc", "b").expect("planned");
    rolled_back_with(&pair, &m.id, "inspect failed").await;
    // The copy the runtime started at B is gone: the source alone runs.
    until("the copy at B to end", || {
        pair.world
            .started
            .lock()
            .unwrap()
            .get(&("b".to_string(), "svc".to_string()))
            .is_none_or(|pid| process::start_time(*pid).is_none())
    })
    .await;
    runs_only_at(&pair, "a", "svc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_refuses_to_prepare_never_freezes_the_source() {
    let pair = Pair::new("refuse").await;
    pair.a().run("svc").await;
    // The name is taken at b.
    pair.b().run("svc").await;
    let m = pair.a().engine.start("svc", "b").expect("planned");
    let m = finished(pair.a(), &m.id).await;
    assert_eq!(m.phase, Phase::RolledBack);
    assert!(
        m.error.as_deref().is_some_and(|e| e.contains("refused")),
        "{m:?}"
    );
    assert!(m.timings.dump_ms.is_none(), "the source was checkpointed");
    assert_eq!(
        pair.a().state_of("svc").map(|s| s.0),
        Some(WorkloadState::Running)
    );
}

/// A failure injected as the source enters `phase` rolls the migration back.
async fn failing_at(phase: Phase) {
    let pair = Pair::new(&format!("fail-{phase}")).await;
    pair.a().run("svc").await;
    pair.a().engine.set_faults(Faults::default().at(
        Role::Source,
        phase,
        Fault::Fail("injected".into()),
    ));
    let m = pair.a().engine.start("svc", "b").expect("planned");
    rolled_back_with(&pair, &m.id, "injected").await;
    // Whatever the destination had was dropped.
    until("the destination to drop the migration", || {
        pair.b()
            .engine
            .get(&m.id)
            .is_none_or(|m| m.phase == Phase::RolledBack)
    })
    .await;
    assert!(pair.b().workloads.get("svc").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_entering_preparing_rolls_back() {
    failing_at(Phase::Preparing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_entering_checkpointing_rolls_back() {
    failing_at(Phase::Checkpointing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_entering_transferring_rolls_back() {
    failing_at(Phase::Transferring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_before_the_restore_request_rolls_back() {
    failing_at(Phase::Restoring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_failing_as_it_restores_rolls_back() {
    let pair = Pair::new("tfail").await;
    pair.a().run("svc").await;
    pair.b().engine.set_faults(Faults::default().at(
        Role::Target,
        Phase::Restoring,
        Fault::Fail("no room".into()),
    ));
    let m = pair.a().engine.start("svc", "b").expect("planned");
    rolled_back_with(&pair, &m.id, "no room").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_byte_changed_at_rest_at_the_destination_rolls_back() {
    let pair = Pair::new("atrest").await;
    pair.a().run("svc").await;
    // The destination waits before it restores: the image is then complete on its disk.
    pair.b().engine.set_faults(Faults::default().at(
        Role::Target,
        Phase::Restoring,
        Fault::Delay(Duration::from_millis(1500)),
    ));
    let m = pair.a().engine.start("svc", "b").expect("planned");
    let file = pair
        .b()
        .dir
        .join("incoming")
        .join(&m.id)
        .join("inventory.img");
    until("the image at the destination", || {
        // The source asked for the restore: every file is in.
        pair.a()
            .engine
            .get(&m.id)
            .is_some_and(|r| r.phase == Phase::Restoring)
            && file.exists()
    })
    .await;
    let mut bytes = std::fs::read(&file).expect("read the image");
    bytes[0] ^= 0x20;
    std::fs::write(&file, bytes).expect("write the image");
    rolled_back_with(&pair, &m.id, "changed on disk since it arrived").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_whose_source_ended_the_move_unheard_expires() {
    let pair = Pair::new("expire").await;
    pair.a().run("svc").await;
    // The source's driver stops once B has prepared; its record then says it rolled back
    // without B hearing a word (an Abort lost with the link).
    pair.a().engine.set_faults(Faults::default().at(
        Role::Source,
        Phase::Checkpointing,
        Fault::Crash,
    ));
    let m = pair.a().engine.start("svc", "b").expect("planned");
    until("B to reserve", || pair.b().workloads.get("svc").is_some()).await;
    pair.a()
        .engine
        .update(&m.id, |m| m.phase = Phase::RolledBack)
        .expect("journaled");
    // B asks the source about a quiet reservation and drops it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while pair.b().workloads.get("svc").is_some() {
        assert!(Instant::now() < deadline, "B kept the reservation");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at_b = pair.b().engine.get(&m.id).expect("B's record");
    assert!(at_b.phase.is_terminal(), "{at_b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_counts_in_the_freeze_and_the_move_completes() {
    let pair = Pair::new("delay").await;
    pair.a().run("svc").await;
    pair.a().engine.set_faults(Faults::default().at(
        Role::Source,
        Phase::Transferring,
        Fault::Delay(Duration::from_millis(300)),
    ));
    let m = pair.a().engine.start("svc", "b").expect("planned");
    let m = finished(pair.a(), &m.id).await;
    assert_eq!(m.phase, Phase::Completed);
    assert!(m.timings.freeze_ms.is_some_and(|f| f >= 300), "{m:?}");
    runs_only_at(&pair, "b", "svc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_workload_cannot_be_moved_or_removed_twice() {
    let pair = Pair::new("busy").await;
    pair.a().run("svc").await;
    pair.a().engine.set_faults(Faults::default().at(
        Role::Source,
        Phase::Preparing,
        Fault::Delay(Duration::from_millis(500)),
    ));
    let m = pair.a().engine.start("svc", "b").expect("planned");
    let again = pair.a().engine.start("svc", "b").unwrap_err();
    assert!(
        matches!(again, MigrationError::Workload(WorkloadError::Busy { .. })),
        "{again}"
    );
    let rm = pair.a().workloads.remove("svc").await.unwrap_err();
    assert!(matches!(rm, WorkloadError::Busy { .. }), "{rm}");
    assert_eq!(finished(pair.a(), &m.id).await.phase, Phase::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_own_sites_are_refused_before_anything_is_held() {
    let pair = Pair::new("sites").await;
    pair.a().run("svc").await;
    assert!(matches!(
        pair.a().engine.start("svc", "zz"),
        Err(MigrationError::UnknownSite(_))
    ));
    assert!(matches!(
        pair.a().engine.start("svc", "a"),
        Err(MigrationError::SameSite)
    ));
    let w = pair.a().workloads.get("svc").expect("listed");
    assert!(w.migration.is_none() && w.state == WorkloadState::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_crash_before_the_restore_request_rolls_back_on_restart() {
    let mut pair = Pair::new("crash-src").await;
    pair.a().run("svc").await;
    pair.a().engine.set_faults(Faults::default().at(
        Role::Source,
        Phase::Transferring,
        Fault::Crash,
    ));
    let m = pair.a().engine.start("svc", "b").expect("planned");
    until("the source to be frozen", || {
        pair.a().state_of("svc") == Some((WorkloadState::Migrating, Some('T')))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Frozen with its image while no gateway runs: nothing may resume it but recovery.
    pair.crash_and_restart("a").await;
    rolled_back_with(&pair, &m.id, "restarted").await;
    until("the destination to abort", || {
        pair.b().engine.get(&m.id).map(|m| m.phase) == Some(Phase::RolledBack)
    })
    .await;
    assert!(pair.b().workloads.get("svc").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_crash_after_the_destination_confirmed_completes_on_restart() {
    let mut pair = Pair::new("crash-cut").await;
    let src = pair.a().run("svc").await;
    pair.a().engine.set_faults(Faults::default().at(
        Role::Source,
        Phase::CuttingOver,
        Fault::Crash,
    ));
    let m = pair.a().engine.start("svc", "b").expect("planned");
    assert_eq!(finished(pair.b(), &m.id).await.phase, Phase::Completed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Both a frozen source and a confirmed copy exist: allowed, the source is frozen.
    assert_eq!(pair.a().state_of("svc").and_then(|s| s.1), Some('T'));
    // B must not drop its copy while A may still cut over to it.
    let refused = pair.b().engine.check_removable("svc").await;
    assert!(
        matches!(&refused, Err(MigrationError::NotReleased { why, .. }) if why.contains("not released")),
        "{refused:?}"
    );
    pair.crash_and_restart("a").await;
    let done = finished(pair.a(), &m.id).await;
    assert_eq!(done.phase, Phase::Completed, "{done:?}");
    runs_only_at(&pair, "b", "svc");
    // A released its source: now B may remove it, and remembers that it may.
    pair.b()
        .engine
        .check_removable("svc")
        .await
        .expect("removable once A released");
    assert!(pair
        .b()
        .engine
        .get(&m.id)
        .is_some_and(|m| m.source_released));
    until("the source process to end", || {
        process::start_time(src.pid.expect("pid")).is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_crash_before_restoring_rolls_the_source_back() {
    let mut pair = Pair::new("crash-dst").await;
    pair.a().run("svc").await;
    pair.b()
        .engine
        .set_faults(Faults::default().at(Role::Target, Phase::Restoring, Fault::Crash));
    let m = pair.a().engine.start("svc", "b").expect("planned");
    until("the restore request", || {
        pair.a()
            .engine
            .get(&m.id)
            .is_some_and(|m| m.restore_requested)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cfg = pair.crash("b").await;
    // The source stays frozen while the destination cannot say what it holds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pair.a().state_of("svc").and_then(|s| s.1), Some('T'));
    pair.restart(cfg).await;
    rolled_back_with(&pair, &m.id, "").await;
    assert_eq!(finished(pair.b(), &m.id).await.phase, Phase::RolledBack);
}

/// A record of migration `id` into b from a, in `phase`.
fn incoming_record(id: &str, phase: Phase) -> Migration {
    Migration::new(
        id,
        WorkloadSpec {
            name: "svc".into(),
            command: vec!["sleep".into()],
            port: None,
            env: BTreeMap::new(),
            runtime: RUNTIME.into(),
            settings: BTreeMap::new(),
            routes: Vec::new(),
            health: None,
            checkpoints: None,
            restart: None,
            volumes: Vec::new(),
        },
        Role::Target,
        "a",
        "b",
        phase,
    )
}

/// A second engine for b (as after a restart) on `journal`, sharing b's other parts.
fn engine_b(pair: &Pair, journal: Journal) -> Arc<Engine> {
    Engine::new(
        EngineSettings {
            site: "b".into(),
            data_dir: pair.b().dir.clone(),
            parallel_files: 1,
            approaches: crate::config::APPROACHES.map(String::from).to_vec(),
            prepush: true,
            stall_after: std::time::Duration::from_secs(60),
            hooks: crate::hooks::Hooks::default(),
            sync_timeout: Duration::from_secs(5),
        },
        Parts {
            journal: Arc::new(journal),
            workloads: Arc::clone(&pair.b().workloads),
            peers: Arc::clone(&pair.b().peers),
            plugins: PluginHost::from_handles(Vec::new()),
            ingress: Arc::clone(&pair.b().ingress),
            criu: crate::criu::Criu::new("criu".into()),
            checkpoints: None,
        },
        CancellationToken::new(),
    )
    .expect("engine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_get_no_answer_before_the_journal_is_loaded() {
    let pair = Pair::new("gate").await;
    // A record from "before a crash" of b, written straight into a fresh engine's journal.
    let journal = Journal::open(&pair.b().dir).expect("journal");
    let mut m = incoming_record("feedbeef", Phase::Completed);
    m.timings.restore_ms = Some(1);
    journal
        .put(Collection::Migrations, "feedbeef", &m)
        .expect("put");
    let engine = engine_b(&pair, journal);
    let ask = || async {
        use crate::peer::Handler;
        let mut empty: &[u8] = &[];
        engine
            .handle(
                "a".into(),
                crate::peer::wire::Request::Status {
                    migration: "feedbeef".into(),
                    wait_ms: 0,
                },
                &mut empty,
            )
            .await
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(300), ask())
            .await
            .is_err(),
        "answered before recovery"
    );
    engine.recover().expect("recover");
    let answer = tokio::time::timeout(Duration::from_secs(2), ask())
        .await
        .expect("answered after recovery");
    assert!(
        matches!(
            answer,
            crate::peer::wire::Response::Status {
                state: crate::peer::wire::TargetState::Confirmed,
                ..
            }
        ),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_asked_with_a_wait_is_answered_as_the_page_phase_ends() {
    let pair = Pair::new("lpoll").await;
    let journal = Journal::open(&pair.b().dir).expect("journal");
    let engine = engine_b(&pair, journal);
    engine.recover().expect("recover");
    engine
        .insert(&incoming_record("pagingid", Phase::Paging))
        .expect("insert");
    let ask = |wait_ms| {
        let engine = Arc::clone(&engine);
        async move {
            use crate::peer::Handler;
            let mut empty: &[u8] = &[];
            let asked = Instant::now();
            let answer = engine
                .handle(
                    "a".into(),
                    crate::peer::wire::Request::Status {
                        migration: "pagingid".into(),
                        wait_ms,
                    },
                    &mut empty,
                )
                .await;
            match answer {
                crate::peer::wire::Response::Status { state, .. } => (state, asked.elapsed()),
                other => panic!("unexpected answer {other:?}"),
            }
        }
    };
    use crate::peer::wire::TargetState;
    // Without a wait: the state now.
    let (state, took) = ask(0).await;
    assert_eq!(state, TargetState::Paging);
    assert!(took < Duration::from_millis(500), "{took:?}");
    // With one: answered once the phase ends, not at the end of the wait.
    let waiting = tokio::spawn(ask(5_000));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "answered while still paging");
    engine
        .update("pagingid", |m| m.phase = Phase::Completed)
        .expect("update");
    let (state, took) = waiting.await.expect("ask");
    assert_eq!(state, TargetState::Confirmed);
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(took < Duration::from_millis(1_500), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_by_a_migration_the_journal_never_recorded_is_released_on_restart() {
    let mut pair = Pair::new("orphan").await;
    let w = pair.a().run("svc").await;
    // The gateway stopped between journaling the hold and journaling the migration.
    pair.a()
        .workloads
        .modify("svc", |w| {
            w.state = WorkloadState::Migrating;
            w.migration = Some("0000000000000000".into());
            Ok(())
        })
        .expect("held");
    pair.crash_and_restart("a").await;
    until("the hold to be released", || {
        pair.a()
            .workloads
            .get("svc")
            .is_some_and(|x| x.migration.is_none() && x.state == WorkloadState::Running)
    })
    .await;
    assert_eq!(pair.a().workloads.get("svc").and_then(|x| x.pid), w.pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_reach_a_workload_only_where_it_runs_unheld() {
    let pair = Pair::new("tunnel").await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let spec = WorkloadSpec {
        name: "web".into(),
        command: vec!["sleep".into()],
        port: Some(port),
        env: BTreeMap::new(),
        runtime: RUNTIME.into(),
        settings: BTreeMap::new(),
        routes: Vec::new(),
        health: None,
        checkpoints: None,
        restart: None,
        volumes: Vec::new(),
    };
    // The ingress serves whatever listens on the workload's port here.
    pair.b().ingress.open(&spec).await.expect("open");
    let web = TunnelTarget::Workload("web".into());
    assert!(pair.b().engine.connect("a", &web).await.is_ok());
    let err = pair.a().engine.connect("b", &web).await.unwrap_err();
    assert!(err.contains("not running at this site"), "{err}");
    // Through the peer link from a, as a moved route would.
    let (_r, _w) = pair
        .a()
        .peers
        .open_tunnel("b", &web)
        .await
        .expect("tunnel through the link");
    listener.set_nonblocking(true).expect("nonblocking");
    until("the tunnelled connection", || listener.accept().is_ok()).await;
    // While held (a migration freezes it), nothing is let through.
    pair.b().ingress.hold("web").await;
    assert!(pair.b().engine.connect("a", &web).await.is_err());
    assert!(pair.a().peers.open_tunnel("b", &web).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_lists_every_approach_and_prefers_the_lowest_stall() {
    let pair = Pair::with_services("plan").await;
    pair.a().run("svc").await;
    let plan = pair
        .a()
        .engine
        .plan_only("svc", "b", &MoveOptions::default())
        .await
        .expect("plan");
    let approaches: Vec<&str> = plan
        .candidates
        .iter()
        .map(|c| c.approach.as_str())
        .collect();
    assert_eq!(approaches, ["container", "service"], "{plan:?}");
    assert!(
        plan.candidates.iter().all(|c| c.feasible && c.allowed),
        "{plan:?}"
    );
    assert_eq!(
        plan.chosen().map(|c| c.approach.as_str()),
        Some("service"),
        "{plan:?}"
    );
    // (The prediction counts the link's measured round trip: its milliseconds vary with
    // the machine's load.)
    assert!(
        plan.why
            .contains("service has the lowest predicted stall ("),
        "{}",
        plan.why
    );
    // A workload that allows only checkpoints gets one.
    pair.a()
        .workloads
        .modify("svc", |w| {
            w.spec
                .settings
                .insert("approaches".into(), "container".into());
            Ok(())
        })
        .expect("modify");
    let plan = pair
        .a()
        .engine
        .plan_only("svc", "b", &MoveOptions::default())
        .await
        .expect("plan");
    assert_eq!(
        plan.chosen().map(|c| c.approach.as_str()),
        Some("container"),
        "{plan:?}"
    );
    assert!(
        plan.candidates[1]
            .reason
            .contains("not allowed by the workload"),
        "{plan:?}"
    );
}

/// The replica's process recorded at the destination for migration `id`.
fn replica_of(site: &Site, id: &str) -> Option<(i32, u64)> {
    site.engine
        .get(id)
        .and_then(|m| Some((m.replica_pid?, m.replica_pid_start?)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_level_move_promotes_the_replica_and_never_freezes_the_source() {
    let pair = Pair::with_services("svc-move").await;
    let src = pair.a().run("svc").await;
    let src_pid = src.pid.expect("pid");
    let m = pair.a().engine.start("svc", "b").expect("planned");
    // While it syncs, the source is never stopped.
    let mut saw_syncing = false;
    while !pair
        .a()
        .engine
        .get(&m.id)
        .is_some_and(|m| m.phase.is_terminal())
    {
        saw_syncing |= pair
            .a()
            .engine
            .get(&m.id)
            .is_some_and(|m| m.phase == Phase::Syncing);
        assert_ne!(process::state(src_pid), Some('T'), "the source was frozen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(saw_syncing);
    let m = finished(pair.a(), &m.id).await;
    assert_eq!(m.phase, Phase::Completed, "{m:?}");
    assert_eq!(m.approach.as_deref(), Some("service"));
    assert_eq!(m.service.as_deref(), Some("fakesvc"));
    assert!(m.timings.sync_ms.is_some_and(|ms| ms >= 200), "{m:?}");
    assert!(m.timings.dump_ms.is_none(), "a checkpoint ran: {m:?}");
    assert!(m.sync.as_ref().is_some_and(|s| s.in_sync));
    // The source was fenced at A (the fake cut-over refuses any other mark) and stays so.
    assert!(pair
        .world
        .fenced
        .lock()
        .unwrap()
        .contains(&("a".to_string(), m.id.clone())));
    assert!(pair.world.unfenced.lock().unwrap().is_empty());
    runs_only_at(&pair, "b", "svc");
    let at_b = pair.b().workloads.get("svc").expect("at b");
    assert_eq!(
        at_b.pid.map(|p| (p, process::start_time(p).unwrap_or(0))),
        replica_of(pair.b(), &m.id)
    );
    until("the source process to end", || {
        process::start_time(src_pid).is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_catch_up_aborts_and_the_source_keeps_serving() {
    let pair = Pair::with_services("svc-lag").await;
    pair.a().run("svc").await;
    pair.world.fail("b", "never-in-sync", "");
    let m = pair.a().engine.start("svc", "b").expect("planned");
    rolled_back_with(&pair, &m.id, "did not get in sync within 1 s").await;
    let m = finished(pair.a(), &m.id).await;
    assert!(
        m.timings.freeze_ms.is_none() && m.timings.dump_ms.is_none(),
        "{m:?}"
    );
    until("the replica to be discarded", || {
        pair.b()
            .engine
            .get(&m.id)
            .is_some_and(|t| t.phase == Phase::RolledBack)
    })
    .await;
    let (pid, start) = replica_of(pair.b(), &m.id).expect("replica recorded");
    until("the replica process to end", || !process::alive(pid, start)).await;
    assert!(pair.world.aborted.lock().unwrap().contains(&m.id));
    assert!(pair.b().workloads.get("svc").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_promotion_discards_the_replica_and_resumes_serving_at_the_source() {
    let pair = Pair::with_services("svc-promote").await;
    pair.a().run("svc").await;
    pair.world.fail("b", "cut-over", "offsets never met");
    let m = pair.a().engine.start("svc", "b").expect("planned");
    rolled_back_with(&pair, &m.id, "offsets never met").await;
    let (pid, start) = replica_of(pair.b(), &m.id).expect("replica recorded");
    until("the replica process to end", || !process::alive(pid, start)).await;
    // The source was fenced for the switch, then takes changes again.
    assert!(pair.world.unfenced.lock().unwrap().contains(&m.id));
    assert!(pair.world.fenced.lock().unwrap().is_empty());
    // The hold was released: the ingress serves the source again.
    assert!(pair.a().ingress.stats().is_empty() || pair.a().workloads.get("svc").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_crash_during_the_sync_leaves_the_source_untouched() {
    let mut pair = Pair::with_services("svc-crash").await;
    let src = pair.a().run("svc").await;
    let m = pair.a().engine.start("svc", "b").expect("planned");
    until("the sync", || {
        pair.b()
            .engine
            .get(&m.id)
            .is_some_and(|t| t.phase == Phase::Syncing)
    })
    .await;
    let replica = replica_of(pair.b(), &m.id).expect("replica recorded");
    let cfg = pair.crash("b").await;
    // The source gives up on its own and keeps serving, whatever the destination holds.
    let at_a = finished(pair.a(), &m.id).await;
    assert_eq!(at_a.phase, Phase::RolledBack, "{at_a:?}");
    let w = pair.a().workloads.get("svc").expect("still at a");
    assert_eq!((w.state, w.pid), (WorkloadState::Running, src.pid));
    // The restarted destination discards the replica its journal names.
    pair.restart(cfg).await;
    until("the replica process to end", || {
        !process::alive(replica.0, replica.1)
    })
    .await;
    until("the destination to record the abort", || {
        pair.b()
            .engine
            .get(&m.id)
            .is_some_and(|t| t.phase == Phase::RolledBack)
    })
    .await;
    assert!(pair.b().workloads.get("svc").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_changes_runtime_only_through_the_service_level() {
    let pair = Pair::with_services("svc-runtime").await;
    pair.a().run("svc").await;
    let options = MoveOptions {
        runtime: Some(OTHER_RUNTIME.into()),
        ..MoveOptions::default()
    };
    let plan = pair
        .a()
        .engine
        .plan_only("svc", "b", &options)
        .await
        .expect("plan");
    let container = &plan.candidates[0];
    assert!(!container.feasible, "{plan:?}");
    assert!(
        container.reason.contains("restores only under the runtime"),
        "{plan:?}"
    );
    assert_eq!(plan.chosen().map(|c| c.approach.as_str()), Some("service"));
    let forced = MoveOptions {
        approach: Some("container".into()),
        ..options.clone()
    };
    let m = pair
        .a()
        .engine
        .start_with("svc", "b", forced)
        .expect("planned");
    let m = finished(pair.a(), &m.id).await;
    assert_eq!(
        m.phase,
        Phase::RolledBack,
        "a checkpoint cannot change runtime: {m:?}"
    );
    assert!(
        m.error
            .as_deref()
            .is_some_and(|e| e.contains("container was asked but cannot run")),
        "{m:?}"
    );
    let m = pair
        .a()
        .engine
        .start_with("svc", "b", options)
        .expect("planned");
    assert_eq!(finished(pair.a(), &m.id).await.phase, Phase::Completed);
    let at_b = pair.b().workloads.get("svc").expect("at b");
    assert_eq!(at_b.spec.runtime, OTHER_RUNTIME);
    runs_only_at(&pair, "b", "svc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_checkpoint_runs_even_when_a_replica_would_be_faster() {
    let pair = Pair::with_services("svc-forced").await;
    pair.a().run("svc").await;
    let forced = MoveOptions {
        approach: Some("container".into()),
        ..MoveOptions::default()
    };
    let m = pair
        .a()
        .engine
        .start_with("svc", "b", forced)
        .expect("planned");
    let m = finished(pair.a(), &m.id).await;
    assert_eq!(m.phase, Phase::Completed, "{m:?}");
    assert_eq!(m.approach.as_deref(), Some("container"));
    assert!(m.timings.dump_ms.is_some() && m.timings.sync_ms.is_none());
    assert_eq!(m.candidates.len(), 2);
}

/// A fixed-seed xorshift generator: the fuzz below is the same on every run (unless
/// `FERRY_FUZZ_SEED` picks another seed; `FERRY_FUZZ_ITERATIONS` runs longer).
struct Fuzz(u64);

/// Inputs per fuzz test: 10,000, or `FERRY_FUZZ_ITERATIONS`.
fn fuzz_iterations() -> u32 {
    std::env::var("FERRY_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

impl Fuzz {
    fn seeded(default: u64) -> Self {
        let seed = std::env::var("FERRY_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default);
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// A name: plain, empty, a path escape, very long, or odd characters.
    fn name(&mut self) -> String {
        match self.below(6) {
            0 => String::new(),
            1 => format!("../../fuzz-escape-{}", self.below(1000)),
            2 => "x".repeat(5000),
            3 => format!("a/b/{}", self.below(100)),
            4 => String::from_utf8_lossy(&self.bytes(12)).into_owned(),
            _ => format!("m{}", self.below(50)),
        }
    }

    fn spec(&mut self) -> WorkloadSpec {
        WorkloadSpec {
            name: self.name(),
            command: (0..self.below(3)).map(|_| self.name()).collect(),
            port: (self.below(2) == 0).then(|| self.next() as u16),
            env: BTreeMap::new(),
            runtime: format!("no-such-runtime-{}", self.below(5)),
            settings: BTreeMap::new(),
            routes: Vec::new(),
            health: None,
            checkpoints: None,
            restart: None,
            volumes: Vec::new(),
        }
    }

    /// A well-formed request with hostile field values.
    fn request(&mut self) -> crate::peer::wire::Request {
        use crate::peer::wire::Request;
        match self.below(14) {
            0 => Request::Hello,
            9 => Request::Probe {
                workload: self.spec(),
                service: (self.below(2) == 0).then(|| self.name()),
                needs: (self.below(2) == 0).then(|| crate::peer::wire::CheckpointNeeds {
                    kernel: self.name(),
                    criu: (self.below(2) == 0).then(|| self.name()),
                    cpu_flags: vec![self.name()],
                    files: vec![(format!("/{}", self.name()), self.below(4096))],
                    memory_bytes: self.below(u64::MAX),
                    image_bytes: self.below(u64::MAX),
                    adapter_capabilities: vec![self.name()],
                    adapter_exec: vec![self.name()],
                }),
            },
            10 => Request::SyncStatus {
                migration: self.name(),
            },
            11 => Request::Promote {
                migration: self.name(),
                mark: self.name(),
            },
            12 => Request::Prepush {
                migration: self.name(),
            },
            13 => Request::Settle {
                migration: self.name(),
            },
            1 => Request::Status {
                migration: self.name(),
                wait_ms: 0,
            },
            2 => Request::Abort {
                migration: self.name(),
            },
            3 => Request::File {
                migration: self.name(),
                name: self.name(),
                size: self.next(),
                compression: Default::default(),
                growing: self.below(2) == 0,
            },
            4 => Request::Prepare {
                migration: self.name(),
                workload: self.spec(),
                service: (self.below(2) == 0).then(|| self.name()),
            },
            5 => Request::StartSync {
                migration: self.name(),
            },
            6 => Request::SourceState {
                migration: self.name(),
            },
            7 => Request::Restore {
                migration: self.name(),
                workload: self.spec(),
                source_log: PathBuf::from(self.name()),
                manifest: Vec::new(),
                notes: Vec::new(),
                postcopy: self.below(2) == 0,
                volumes: self.below(2) == 0,
            },
            _ => Request::Tunnel {
                workload: self.name(),
                migration: (self.below(2) == 0).then(|| self.name()),
                port: (self.below(2) == 0).then(|| self.next() as u16),
                pages: self.below(2) == 0,
                urgent: self.below(2) == 0,
            },
        }
    }

    /// Bytes for one stream: a mutated or random frame, or a well-formed hostile one.
    fn frame(&mut self) -> Vec<u8> {
        let good = crate::peer::wire::encode(&self.request()).expect("encode");
        match self.below(5) {
            0 => good,
            1 => {
                // A few bytes flipped (the length prefix included, sometimes).
                let mut f = good;
                for _ in 0..=self.below(4) {
                    let i = self.below(f.len() as u64) as usize;
                    f[i] ^= (self.next() as u8) | 1;
                }
                f
            }
            2 => {
                let cut = self.below(good.len() as u64) as usize;
                good[..cut].to_vec()
            }
            3 => {
                // A length prefix past the header limit, then a little.
                let mut f =
                    ((crate::peer::wire::MAX_HEADER as u32) + 1 + self.below(1 << 20) as u32)
                        .to_be_bytes()
                        .to_vec();
                f.extend(self.bytes(64));
                f
            }
            _ => {
                let n = self.below(300) as usize;
                self.bytes(n)
            }
        }
    }
}

/// Every file under `dir`.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_or_hostile_peer_messages_are_refused_and_change_nothing() {
    let pair = Pair::new("fuzzpeer").await;
    let mut fuzz = Fuzz::seeded(0x5EED_F00D_CAFE_D00D);
    let before = {
        let mut v = Vec::new();
        files_under(&pair.b().dir, &mut v);
        v.len()
    };
    let (mut refused, mut answered) = (0u32, 0u32);
    let n = fuzz_iterations();
    for _ in 0..n {
        let frame = fuzz.frame();
        let (mut send, mut recv) = pair.a().peers.open("b").await.expect("a stream");
        let _ = send.write_all(&frame).await;
        let _ = send.finish();
        let reply = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 16))
            .await
            .expect("the peer answers or closes every stream within 5 s");
        match reply {
            Ok(bytes) if bytes.len() > 4 => {
                match serde_json::from_slice::<crate::peer::wire::Response>(&bytes[4..]) {
                    Ok(crate::peer::wire::Response::Error { .. }) => refused += 1,
                    Ok(_) => answered += 1,
                    Err(e) => panic!("an answer that is not a response: {e}"),
                }
            }
            _ => refused += 1,
        }
    }
    // The peer still serves, and nothing it refused left a trace.
    let hello = pair
        .a()
        .peers
        .request("b", &crate::peer::wire::Request::Hello)
        .await;
    assert!(
        matches!(hello, Ok(crate::peer::wire::Response::Hello { .. })),
        "{hello:?}"
    );
    eprintln!("peer fuzz: {refused} refused, {answered} answered");
    assert!(refused > n / 2, "refused {refused}, answered {answered}");
    assert!(
        pair.b().workloads.list().is_empty(),
        "a workload was created"
    );
    assert!(
        pair.b().engine.list().is_empty(),
        "a migration record was created"
    );
    let mut after = Vec::new();
    files_under(&pair.b().dir, &mut after);
    assert_eq!(after.len(), before, "files appeared: {after:?}");
    let root = pair
        .b()
        .dir
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    if let Some(root) = root {
        let mut all = Vec::new();
        files_under(&root, &mut all);
        assert!(
            !all.iter()
                .any(|p| p.to_string_lossy().contains("fuzz-escape")),
            "a file escaped the data directory"
        );
    }
}

impl Fuzz {
    /// An API path: the routes', with hostile segments, and others.
    fn api_path(&mut self) -> String {
        let seg = match self.below(5) {
            0 => "..".to_string(),
            1 => "%2e%2e%2f%2e%2e".to_string(),
            2 => "y".repeat(3000),
            3 => format!("m{}", self.below(9)),
            _ => String::from_utf8_lossy(&self.bytes(6))
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .collect(),
        };
        match self.below(12) {
            0 => "/v1/workloads".into(),
            1 => format!("/v1/workloads/{seg}"),
            2 => "/v1/migrations".into(),
            3 => format!("/v1/migrations/{seg}"),
            4 => format!("/v1/routes/{seg}"),
            5 => "/v1/peers".into(),
            6 => "/v1/site".into(),
            7 => "/metrics".into(),
            8 => format!("/v1/{seg}/{seg}/{seg}"),
            9 => format!("/v1/plan/{seg}"),
            10 => "/healthz".into(),
            _ => format!("/{seg}"),
        }
    }

    /// A body: random bytes, a mutated request, or one past the size limit.
    fn api_body(&mut self) -> Vec<u8> {
        let spec = serde_json::to_vec(&self.spec()).expect("json");
        let req = serde_json::to_vec(&serde_json::json!({
            "workload": self.name(), "to": self.name(), "approach": self.name(),
        }))
        .expect("json");
        match self.below(6) {
            0 => Vec::new(),
            1 => spec,
            2 => req,
            3 => {
                let mut b = if self.below(2) == 0 { spec } else { req };
                for _ in 0..=self.below(4) {
                    let i = self.below(b.len() as u64) as usize;
                    b[i] ^= (self.next() as u8) | 1;
                }
                b
            }
            4 => vec![b'{'; 70 * 1024],
            _ => {
                let n = self.below(400) as usize;
                self.bytes(n)
            }
        }
    }
}

fn checkpoints_of(b: &Site) -> Arc<crate::checkpoint::Checkpoints> {
    crate::checkpoint::Checkpoints::open(
        "b",
        &b.cfg.data_dir,
        3,
        crate::hooks::Hooks::default(),
        crate::checkpoint::Parts {
            journal: Arc::new(Journal::open(&b.cfg.data_dir).expect("journal")),
            peers: Arc::clone(&b.peers),
            workloads: Arc::clone(&b.workloads),
            plugins: Arc::clone(&b.plugins),
            ingress: Arc::clone(&b.ingress),
        },
    )
    .expect("checkpoints")
}

/// Serves `b`'s API (token "fuzz-token", `allowed` as `[api] allowed_commands`) on a
/// loopback port: a client with the token, the site's identity, the address, and what
/// stops it.
async fn api_of(
    b: &Site,
    allowed: Option<Vec<String>>,
) -> (
    crate::api::client::ApiClient,
    Identity,
    std::net::SocketAddr,
    CancellationToken,
) {
    let identity = Identity::load(&b.cfg.identity.cert, &b.cfg.identity.key).expect("identity");
    let server = crate::api::ApiServer::bind("127.0.0.1:0".parse().expect("addr"), &identity)
        .await
        .expect("bind the API");
    let addr = server.local_addr().expect("addr");
    let state = Arc::new(crate::api::ApiState {
        allowed_commands: allowed,
        token: "fuzz-token".into(),
        site: crate::api::types::SiteInfo {
            name: "b".into(),
            version: "fuzz".into(),
            fingerprint: identity.fingerprint().to_string(),
            api: addr,
            peer_listen: addr,
            peers: Vec::new(),
        },
        workloads: Arc::clone(&b.workloads),
        engine: Arc::clone(&b.engine),
        checkpoints: checkpoints_of(b),
        restarts: crate::restart::Supervisor::new(
            Arc::clone(&b.workloads),
            checkpoints_of(b),
            Arc::clone(&b.plugins),
        ),
        peers: Arc::clone(&b.peers),
        plugins: Arc::clone(&b.plugins),
        ingress: Arc::clone(&b.ingress),
    });
    let cancel = CancellationToken::new();
    tokio::spawn(server.serve(state, cancel.clone()));
    let client = crate::api::client::ApiClient::new(
        &format!("https://{addr}"),
        "fuzz-token",
        identity.fingerprint(),
    )
    .expect("client");
    (client, identity, addr, cancel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_starts_no_program_its_site_does_not_list() {
    use hyper::Method;
    let pair = Pair::new("allow").await;
    let b = pair.b();
    let (client, _, _, cancel) = api_of(b, Some(vec!["sleep".into()])).await;
    let spec = serde_json::json!({
        "name": "shell",
        "command": ["sh", "-c", "sleep 600"],
        "runtime": RUNTIME,
    });
    let (status, body) = client
        .send_raw(Method::POST, "/v1/workloads", spec.to_string().into_bytes())
        .await
        .expect("an answer");
    assert_eq!(status.as_u16(), 403, "{body:?}");
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("command_not_allowed") && text.contains("sh"),
        "{text}"
    );
    assert!(b.workloads.list().is_empty(), "a workload was created");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_or_hostile_api_requests_get_4xx_and_change_nothing() {
    use hyper::Method;
    let pair = Pair::new("fuzzapi").await;
    let b = pair.b();
    let (client, identity, addr, cancel) = api_of(b, None).await;
    let stranger = crate::api::client::ApiClient::new(
        &format!("https://{addr}"),
        "not-the-token",
        identity.fingerprint(),
    )
    .expect("client");
    let mut fuzz = Fuzz::seeded(0xA11C_E5ED_0BAD_F00D);
    let methods = [
        Method::GET,
        Method::POST,
        Method::DELETE,
        Method::PUT,
        Method::PATCH,
    ];
    let (mut by_class, mut unauthorized) = ([0u32; 6], 0u32);
    let n = fuzz_iterations();
    for i in 0..n {
        let method = methods[fuzz.below(methods.len() as u64) as usize].clone();
        let (path, body) = (fuzz.api_path(), fuzz.api_body());
        let who = if i % 10 == 0 { &stranger } else { &client };
        let (status, _) = who
            .send_raw(method.clone(), &path, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: no answer: {e}"));
        assert!(status.as_u16() < 500, "{method} {path} answered {status}");
        by_class[usize::from(status.as_u16() / 100)] += 1;
        if i % 10 == 0 && path != "/healthz" {
            assert_eq!(status.as_u16(), 401, "{method} {path} without the token");
            unauthorized += 1;
        }
    }
    eprintln!(
        "api fuzz: 2xx {}, 4xx {}, 401 without the token {unauthorized}",
        by_class[2], by_class[4]
    );
    assert!(by_class[4] > n / 2, "{by_class:?}");
    assert!(b.workloads.list().is_empty(), "a workload was created");
    assert!(b.engine.list().is_empty(), "a migration was recorded");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_file_past_the_free_space_or_the_file_limit_is_refused_before_a_byte_is_written() {
    use crate::peer::wire::{Request, Response};
    let pair = Pair::new("room").await;
    let spec = WorkloadSpec {
        name: "big".into(),
        command: vec!["sleep".into(), "600".into()],
        port: None,
        env: BTreeMap::new(),
        runtime: RUNTIME.into(),
        settings: BTreeMap::new(),
        routes: Vec::new(),
        health: None,
        checkpoints: None,
        restart: None,
        volumes: Vec::new(),
    };
    let prepared = pair
        .a()
        .peers
        .request(
            "b",
            &Request::Prepare {
                migration: "00000000feedf00d".into(),
                workload: spec,
                service: None,
            },
        )
        .await;
    assert!(
        matches!(prepared, Ok(Response::Prepared { .. })),
        "{prepared:?}"
    );
    let answer = pair
        .a()
        .peers
        .request(
            "b",
            &Request::File {
                migration: "00000000feedf00d".into(),
                name: "pages-1.img".into(),
                size: 1 << 60,
                compression: Default::default(),
                growing: false,
            },
        )
        .await;
    match answer {
        Ok(Response::Error { message, .. }) => assert!(message.contains("no room"), "{message}"),
        other => panic!("a file larger than the disk was not refused: {other:?}"),
    }
    let dir = pair.b().dir.join("incoming").join("00000000feedf00d");
    assert!(!dir.join("pages-1.img").exists(), "bytes were written");
    // Past the most files a migration may send, another (small) one is refused too.
    pair.b()
        .engine
        .update("00000000feedf00d", |m| {
            m.files = super::target::MAX_IMAGE_FILES;
        })
        .expect("journaled");
    let answer = pair
        .a()
        .peers
        .request(
            "b",
            &Request::File {
                migration: "00000000feedf00d".into(),
                name: "core-1.img".into(),
                size: 10,
                compression: Default::default(),
                growing: false,
            },
        )
        .await;
    match answer {
        Ok(Response::Error { message, .. }) => {
            assert!(message.contains("the most a migration may"), "{message}");
        }
        other => panic!("a file past the limit was not refused: {other:?}"),
    }
    assert!(!dir.join("core-1.img").exists(), "bytes were written");
}
