//! The adapter sandbox, proved with a hostile guest built from ../plugins/hostile: an
//! endless loop hits the call deadline, unbounded memory growth hits the memory limit, an
//! ungranted capability is denied by name, a trap is contained, and the adapter keeps
//! serving calls afterwards. And the WIT versions: adapters built against the frozen
//! 0.1.0 (../plugins/legacy) and 0.2.0 (../plugins/legacy2) still load and answer; a
//! manifest naming a version this gateway does not host, or not the one its component was
//! built against, is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use ferry::config::SiteConfig;
use ferry::criu::Criu;
use ferry::gateway::plugin_settings;
use ferry::plugins::{AdapterCall, PluginError, PluginHost};
use ferry::spec::{Hook, Placement, WorkloadSpec};

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
    // It holds a token: owner-only, or it is refused (later rewrites keep the mode).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join("site.toml"),
            std::fs::Permissions::from_mode(0o600),
        )?;
    }
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
        health: None,
        checkpoints: None,
        restart: None,
        volumes: Vec::new(),
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
async fn a_call_blocked_in_the_host_hits_the_deadline() -> Result<()> {
    // A peer that accepts and never answers: the guest's read waits in the host, where the
    // epoch deadline cannot reach it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = silent.local_addr()?;
    let dir = std::env::temp_dir().join("ferry-sandbox-hang");
    site(&dir, 500, 64)?;
    let path = dir.join("site.toml");
    let text = std::fs::read_to_string(&path)?.replace(
        "[plugins.grants.hostile]\ncapabilities = [\"log\", \"criu\", \"process\"]",
        &format!("[plugins.grants.hostile]\ncapabilities = [\"log\", \"criu\", \"process\", \"sockets\"]\nsockets = [\"{addr}\"]"),
    );
    std::fs::write(&path, text)?;
    let cfg = SiteConfig::load(&path)?;
    let host = PluginHost::load(&plugin_settings(&cfg), Criu::new(PathBuf::from("criu"))).await?;
    let adapter = host.adapter("hostile")?;
    let mut w = workload("hang");
    w.spec.settings.insert("target".into(), addr.to_string());
    let started = std::time::Instant::now();
    let err = adapter.checkpoint(w).await.unwrap_err();
    assert!(
        matches!(err, PluginError::Deadline { ms: 500, .. }),
        "{err}"
    );
    assert!(
        started.elapsed().as_millis() < 10_000,
        "the call stayed blocked in the host"
    );
    // The connection was made (so the wait was in the read), and the adapter still answers.
    silent.set_nonblocking(true)?;
    assert!(silent.accept().is_ok(), "the guest never connected");
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
async fn a_granted_container_runtime_cannot_start_a_privileged_or_host_mounting_container(
) -> Result<()> {
    let dir = std::env::temp_dir().join("ferry-sandbox-containers");
    site(&dir, 30_000, 64)?;
    let path = dir.join("site.toml");
    let text = std::fs::read_to_string(&path)?.replace(
        "[plugins.grants.hostile]\ncapabilities = [\"log\", \"criu\", \"process\"]",
        "[plugins.grants.hostile]\ncapabilities = [\"log\", \"criu\", \"process\", \"exec\"]\nexec = [\"podman\", \"runc\"]\nmounts = [\"/srv/ferry-granted\"]",
    );
    std::fs::write(&path, text)?;
    let cfg = SiteConfig::load(&path)?;
    let host = PluginHost::load(&plugin_settings(&cfg), Criu::new(PathBuf::from("criu"))).await?;
    let adapter = host.adapter("hostile")?;
    // A runc bundle whose config binds the host's /etc.
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs"))?;
    std::fs::write(
        bundle.join("config.json"),
        serde_json::json!({
            "root": {"path": "rootfs"},
            "mounts": [{"destination": "/host-etc", "type": "bind", "source": "/etc", "options": ["rbind"]}],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
        })
        .to_string(),
    )?;
    let runc_args = format!(
        "--root /run/ferry-sandbox run -d --bundle {} x",
        bundle.display()
    );
    for (program, args, why) in [
        ("podman", "run -d --privileged img", "--privileged"),
        ("podman", "run -d -v /:/host img", "host path /"),
        ("podman", "run -d --cap-add SYS_ADMIN img", "--cap-add"),
        ("runc", runc_args.as_str(), "host path /etc"),
    ] {
        let mut call = workload("container");
        call.spec.settings.insert("program".into(), program.into());
        call.spec.settings.insert("args".into(), args.into());
        let err = adapter.checkpoint(call).await.unwrap_err();
        match &err {
            PluginError::Denied { detail, .. } => {
                assert!(detail.contains(why), "{program} {args}: {detail}");
            }
            other => panic!("{program} {args}: expected a denial, got {other}"),
        }
    }
    // The runc container never came into being.
    assert!(!std::path::Path::new("/run/ferry-sandbox/x").exists());
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

/// Workload hooks (`ferry:hooks`) run inside the adapter's instance: under its deadline,
/// with its grants; an adapter that exports none answers at once.
#[tokio::test]
async fn adapter_hooks_run_under_the_adapters_deadline_and_grants() -> Result<()> {
    let host = host("hooks", 500, 64).await?;
    let exports_hooks = |name: &str| {
        host.list()
            .into_iter()
            .find(|p| p.name == name)
            .map(|p| p.hooks)
    };
    assert_eq!(exports_hooks("hostile"), Some(true));
    assert_eq!(exports_hooks("process"), Some(true));
    let hostile = host.adapter("hostile")?;
    hostile
        .hook(workload("plain"), Hook::PostCheckpoint, "c1")
        .await?;
    let err = hostile
        .hook(workload("loop"), Hook::PreRestore, "m1")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PluginError::Deadline {
                call: "pre-restore",
                ms: 500,
                ..
            }
        ),
        "{err}"
    );
    let err = hostile
        .hook(workload("exec"), Hook::PostCheckpoint, "c1")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("capability exec is not granted to adapter hostile"),
        "{err}"
    );
    // The process adapter runs the program a setting names, through exec: not granted here.
    let mut call = workload("plain");
    call.spec.runtime = "process".into();
    let process = host.adapter("process")?;
    process
        .hook(call.clone(), Hook::PreRestore, "m1")
        .await
        .map_err(|e| anyhow::anyhow!("no pre-restore setting, nothing to run: {e}"))?;
    call.spec
        .settings
        .insert("pre-restore".into(), "true {workload}".into());
    let err = process
        .hook(call, Hook::PreRestore, "m1")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("pre-restore hook of workload victim")
            && text.contains("capability exec is not granted to adapter process"),
        "{text}"
    );
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

#[tokio::test]
async fn an_adapter_built_against_0_1_0_still_loads_and_answers() -> Result<()> {
    let dir = std::env::temp_dir().join("ferry-sandbox-legacy");
    site(&dir, 30_000, 64)?;
    ferry_e2e::install_adapter("legacy", &dir.join("plugins"))?;
    // Its manifest has no `wit` field, as manifests from before 0.2.0 do. Granted log
    // only: it asks for process too, so a spawn is refused in 0.1.0's terms.
    let path = dir.join("site.toml");
    let mut text = std::fs::read_to_string(&path)?;
    text.push_str("[plugins.grants.legacy]\ncapabilities = [\"log\"]\n");
    std::fs::write(&path, text)?;
    let cfg = SiteConfig::load(&path)?;
    let host = PluginHost::load(&plugin_settings(&cfg), Criu::new(PathBuf::from("criu"))).await?;
    let info = host
        .list()
        .into_iter()
        .find(|p| p.name == "legacy")
        .expect("listed");
    assert_eq!(info.status, "loaded");
    assert_eq!(info.runtimes, vec!["legacy".to_string()]);

    let adapter = host.adapter("legacy")?;
    let described = adapter.describe().await?;
    assert_eq!(described.name, "legacy");
    assert_eq!(described.runtimes, vec!["legacy".to_string()]);

    let mut call = workload("none").with_peer("far");
    call.spec.runtime = "legacy".into();
    let plan = adapter.probe(call.clone()).await?;
    assert!(plan.feasible, "{}", plan.reason);
    assert_eq!(plan.reason, "legacy adapter would move victim to far");
    assert_eq!(plan.expected_downtime_ms, Some(7));
    assert!(plan
        .approach
        .is_some_and(|a| ferry::plugins::approach_name(a) == "container"));

    // A host refusal reaches a 0.1.0 adapter as a "denied:" string, which it reports as a
    // denial: the engine sees the same error as from a 0.2.0 adapter.
    let err = adapter.start_fresh(call).await.unwrap_err();
    match &err {
        PluginError::Denied { detail, .. } => assert!(
            detail.starts_with("capability process is not granted to adapter legacy"),
            "{detail}"
        ),
        other => panic!("expected a denial, got {other}"),
    }
    // The current version's adapters load beside it.
    assert_eq!(host.adapter("hostile")?.describe().await?.name, "hostile");
    Ok(())
}

#[tokio::test]
async fn an_adapter_built_against_0_2_0_still_loads_and_answers() -> Result<()> {
    let dir = std::env::temp_dir().join("ferry-sandbox-legacy2");
    site(&dir, 30_000, 64)?;
    ferry_e2e::install_adapter("legacy2", &dir.join("plugins"))?;
    // Granted log only: it asks for exec too, so its `exec.run` is refused, in 0.2.0's
    // typed host-error.
    let path = dir.join("site.toml");
    let mut text = std::fs::read_to_string(&path)?;
    text.push_str("[plugins.grants.legacy2]\ncapabilities = [\"log\"]\n");
    std::fs::write(&path, text)?;
    let cfg = SiteConfig::load(&path)?;
    let host = PluginHost::load(&plugin_settings(&cfg), Criu::new(PathBuf::from("criu"))).await?;
    let info = host
        .list()
        .into_iter()
        .find(|p| p.name == "legacy2")
        .expect("listed");
    assert_eq!(info.status, "loaded");
    assert!(!info.lazy, "0.2.0 has no lazy interface");
    let adapter = host.adapter("legacy2")?;
    let mut call = workload("none").with_peer("far");
    call.spec.runtime = "legacy2".into();
    let plan = adapter.probe(call.clone()).await?;
    assert_eq!(plan.reason, "legacy2 adapter would move victim to far");
    assert_eq!(plan.expected_downtime_ms, Some(9));
    let err = adapter.start_fresh(call.clone()).await.unwrap_err();
    match &err {
        PluginError::Denied { detail, .. } => assert!(
            detail.starts_with("capability exec is not granted to adapter legacy2"),
            "{detail}"
        ),
        other => panic!("expected a denial, got {other}"),
    }
    // Granted, the same call runs the program through 0.2.0's exec records.
    let mut text = std::fs::read_to_string(&path)?;
    text = text.replace(
        "[plugins.grants.legacy2]\ncapabilities = [\"log\"]\n",
        "[plugins.grants.legacy2]\ncapabilities = [\"log\", \"exec\"]\nexec = [\"true\"]\n",
    );
    std::fs::write(&path, text)?;
    let cfg = SiteConfig::load(&path)?;
    let host = PluginHost::load(&plugin_settings(&cfg), Criu::new(PathBuf::from("criu"))).await?;
    let started = host.adapter("legacy2")?.start_fresh(call).await?;
    assert_eq!(started.pid, 0, "`true` exits 0");
    Ok(())
}

#[tokio::test]
async fn a_manifest_must_name_a_hosted_wit_version_and_the_one_built_against() -> Result<()> {
    let dir = std::env::temp_dir().join("ferry-sandbox-wit");
    let cfg = site(&dir, 30_000, 64)?;
    let plugins = dir.join("plugins");
    let edit = |name: &str, from: &str, to: &str| -> Result<()> {
        let manifest = plugins.join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&manifest)?;
        assert!(text.contains(from), "{text}");
        std::fs::write(&manifest, text.replace(from, to))?;
        Ok(())
    };
    edit("hostile", r#"wit = "0.3.0""#, r#"wit = "9.9.9""#)?;
    // Without the field the manifest means 0.1.0, but the component is built against 0.3.0.
    edit("process", "wit = \"0.3.0\"\n", "")?;
    let host = PluginHost::load(&plugin_settings(&cfg), Criu::new(PathBuf::from("criu"))).await?;
    let status = |name: &str| {
        host.list()
            .into_iter()
            .find(|p| p.name == name)
            .map(|p| p.status)
            .unwrap_or_default()
    };
    let hostile = status("hostile");
    assert!(
        hostile.contains(
            r#"wit version "9.9.9" is not supported; this gateway hosts 0.1.0, 0.2.0 and 0.3.0"#
        ),
        "{hostile}"
    );
    let process = status("process");
    assert!(
        process.contains("is built against ferry:adapter@0.3.0")
            && process.contains(r#"wit = "0.1.0""#),
        "{process}"
    );
    assert!(host.adapter("hostile").is_err());
    assert!(host.adapter("process").is_err());
    Ok(())
}
