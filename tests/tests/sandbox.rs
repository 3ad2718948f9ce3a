//! The adapter sandbox, proved with a hostile guest built from ../plugins/hostile: an
//! endless loop hits the call deadline, unbounded memory growth hits the memory limit, an
//! ungranted capability is denied by name, a trap is contained, and the adapter keeps
//! serving calls afterwards.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use ferry::config::SiteConfig;
use ferry::criu::Criu;
use ferry::gateway::plugin_settings;
use ferry::plugins::{AdapterCall, PluginError, PluginHost};
use ferry::spec::{Placement, WorkloadSpec};

fn site(dir: &Path, call_timeout_ms: u64, memory_limit_mb: u64) -> Result<SiteConfig> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    ferry_e2e::install_adapter("hostile", &dir.join("plugins"))?;
    ferry_e2e::install_adapter("process", &dir.join("plugins"))?;
    let text = format!(
        r#"
name = "sandbox"
data_dir = "data"
[identity]
cert = "cert.pem"
key = "key.pem"
[api]
listen = "127.0.0.1:0"
token = "0123456789abcdef0123"
[peer]
listen = "127.0.0.1:0"
[workloads]
work_root = "{work}"
[plugins]
call_timeout_ms = {call_timeout_ms}
memory_limit_mb = {memory_limit_mb}
[plugins.grants.hostile]
capabilities = ["log", "criu", "process"]
[plugins.grants.process]
capabilities = ["log", "criu", "process"]
"#,
        work = dir.join("work").display()
    );
    std::fs::write(dir.join("site.toml"), text)?;
    Ok(SiteConfig::load(&dir.join("site.toml"))?)
}

fn workload(mode: &str) -> AdapterCall {
    let spec = WorkloadSpec {
        name: "victim".into(),
        runtime: "hostile".into(),
        command: vec!["sleep".into(), "60".into()],
        port: None,
        env: Default::default(),
        settings: [("mode".to_string(), mode.to_string())].into(),
        routes: Vec::new(),
    };
    let placement = Placement {
        work_dir: "/tmp".into(),
        log: "/tmp/victim.log".into(),
        cgroup: None,
    };
    AdapterCall::new(spec, placement, "sandbox")
}

async fn host(name: &str, call_timeout_ms: u64, memory_limit_mb: u64) -> Result<Arc<PluginHost>> {
    let dir = std::env::temp_dir().join(format!("ferry-sandbox-{name}"));
    let cfg = site(&dir, call_timeout_ms, memory_limit_mb)?;
    Ok(PluginHost::load(&plugin_settings(&cfg), Criu::new(PathBuf::from("criu"))).await?)
}

#[tokio::test]
async fn an_endless_loop_hits_the_deadline() -> Result<()> {
    let host = host("loop", 500, 64).await?;
    let adapter = host.adapter("hostile")?;
    let started = std::time::Instant::now();
    let err = adapter.checkpoint(workload("loop")).await.unwrap_err();
    assert!(
        matches!(err, PluginError::Deadline { ms: 500, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("exceeded its 500 ms deadline"),
        "{err}"
    );
    assert!(
        started.elapsed().as_millis() < 5_000,
        "the deadline did not stop the loop"
    );
    // The poisoned instance is replaced: the adapter still answers.
    assert_eq!(adapter.describe().await?.name, "hostile");
    Ok(())
}

#[tokio::test]
async fn unbounded_memory_growth_hits_the_limit() -> Result<()> {
    let host = host("memory", 30_000, 32).await?;
    let adapter = host.adapter("hostile")?;
    let err = adapter.checkpoint(workload("memory")).await.unwrap_err();
    assert!(matches!(err, PluginError::Memory { mb: 32, .. }), "{err}");
    assert!(err.to_string().contains("memory limit of 32 MiB"), "{err}");
    assert_eq!(adapter.describe().await?.name, "hostile");
    Ok(())
}

#[tokio::test]
async fn an_ungranted_capability_is_denied_by_name() -> Result<()> {
    let host = host("denied", 30_000, 64).await?;
    let adapter = host.adapter("hostile")?;
    let err = adapter.checkpoint(workload("exec")).await.unwrap_err();
    match &err {
        PluginError::Denied { detail, .. } => {
            assert!(
                detail.contains("capability exec is not granted to adapter hostile"),
                "{detail}"
            );
        }
        other => panic!("expected a denial, got {other}"),
    }
    // The grant list shows why: asked for exec, not granted it.
    let info = host
        .list()
        .into_iter()
        .find(|p| p.name == "hostile")
        .expect("listed");
    assert!(info.asks.iter().any(|c| c.as_str() == "exec"));
    assert!(!info
        .granted
        .capabilities
        .iter()
        .any(|c| c.as_str() == "exec"));
    Ok(())
}

#[tokio::test]
async fn a_trap_is_contained() -> Result<()> {
    let host = host("trap", 30_000, 64).await?;
    let adapter = host.adapter("hostile")?;
    let err = adapter.checkpoint(workload("trap")).await.unwrap_err();
    assert!(matches!(err, PluginError::Trap { .. }), "{err}");
    assert_eq!(adapter.describe().await?.name, "hostile");
    Ok(())
}

#[tokio::test]
async fn a_component_importing_what_its_manifest_does_not_ask_for_is_not_loaded() -> Result<()> {
    let dir = std::env::temp_dir().join("ferry-sandbox-undeclared");
    let cfg = site(&dir, 30_000, 64)?;
    // The hostile component imports exec; a manifest that does not ask for it is refused.
    let manifest = dir.join("plugins/hostile.toml");
    let text = std::fs::read_to_string(&manifest)?.replace(r#", "exec""#, "");
    std::fs::write(&manifest, text)?;
    let host = PluginHost::load(&plugin_settings(&cfg), Criu::new(PathBuf::from("criu"))).await?;
    let info = host
        .list()
        .into_iter()
        .find(|p| p.name == "hostile")
        .expect("listed");
    assert!(
        info.status.contains("does not ask for exec"),
        "{}",
        info.status
    );
    assert!(host.adapter("hostile").is_err());
    assert!(host.adapter("process").is_ok(), "other adapters still load");
    Ok(())
}

#[tokio::test]
async fn sockets_reach_only_granted_addresses() -> Result<()> {
    let allowed = std::net::TcpListener::bind("127.0.0.1:0")?;
    let allowed_addr = allowed.local_addr()?;
    let other = std::net::TcpListener::bind("127.0.0.1:0")?;
    let other_addr = other.local_addr()?;
    let dir = std::env::temp_dir().join("ferry-sandbox-sockets");
    site(&dir, 30_000, 64)?;
    let path = dir.join("site.toml");
    let text = std::fs::read_to_string(&path)?.replace(
        "[plugins.grants.hostile]\ncapabilities = [\"log\", \"criu\", \"process\"]",
        &format!("[plugins.grants.hostile]\ncapabilities = [\"log\", \"criu\", \"process\", \"sockets\"]\nsockets = [\"{allowed_addr}\"]"),
    );
    std::fs::write(&path, text)?;
    let cfg = SiteConfig::load(&path)?;
    let host = PluginHost::load(&plugin_settings(&cfg), Criu::new(PathBuf::from("criu"))).await?;
    let adapter = host.adapter("hostile")?;
    let connect = |target: std::net::SocketAddr| {
        let mut w = workload("connect");
        w.spec.settings.insert("target".into(), target.to_string());
        w
    };
    // To a non-granted address: refused before any packet leaves.
    let err = adapter.checkpoint(connect(other_addr)).await.unwrap_err();
    assert!(matches!(err, PluginError::Denied { .. }), "{err}");
    assert!(err.to_string().contains(&other_addr.to_string()), "{err}");
    other.set_nonblocking(true)?;
    assert!(
        other.accept().is_err(),
        "the denied connection reached the listener"
    );
    // To the granted address: the connection is made (the checkpoint then fails for want
    // of a workload process, which is not what this test is about).
    let err = adapter.checkpoint(connect(allowed_addr)).await.unwrap_err();
    assert!(
        !err.to_string().contains("socket"),
        "granted connect failed: {err}"
    );
    allowed.set_nonblocking(true)?;
    assert!(
        allowed.accept().is_ok(),
        "the granted connection did not arrive"
    );
    Ok(())
}
