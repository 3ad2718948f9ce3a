//! `ferry-plugin-bench`: what a call into an adapter costs. Loads the `process` adapter
//! as a gateway does (compile, then from the compile cache), then times calls through
//! the adapter's owning task: `describe` (no host calls) and `probe` (a workload record
//! in, a plan out), against the same channel round trip without WebAssembly.
//!
//! Usage: ferry-plugin-bench [CALLS]   (default 5000)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry::config::SiteConfig;
use ferry::criu::Criu;
use ferry::gateway::plugin_settings;
use ferry::plugins::{AdapterCall, PluginHost};
use ferry::spec::{Placement, WorkloadSpec};

fn stats(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let n = samples.len();
    let total: Duration = samples.iter().sum();
    let pct = |p: f64| samples[((n as f64 * p) as usize).min(n - 1)].as_secs_f64() * 1e6;
    println!(
        "{name:<28} n={n:<6} mean {:>7.1} µs   p50 {:>7.1} µs   p99 {:>7.1} µs",
        total.as_secs_f64() * 1e6 / n as f64,
        pct(0.50),
        pct(0.99)
    );
}

fn workload() -> AdapterCall {
    let spec = WorkloadSpec {
        name: "redis".into(),
        runtime: "process".into(),
        command: vec!["redis-server".into(), "--port".into(), "6379".into()],
        port: Some(6379),
        env: [("LANG".to_string(), "C".to_string())].into(),
        settings: Default::default(),
        routes: Vec::new(),
        health: None,
        checkpoints: None,
        restart: None,
        volumes: Vec::new(),
    };
    let placement = Placement {
        work_dir: "/var/lib/ferry/workdirs/redis".into(),
        log: "/var/lib/ferry/logs/redis.log".into(),
        cgroup: None,
    };
    let mut call = AdapterCall::new(spec, placement, "a").with_peer("b");
    call.pid = Some(4242);
    call
}

#[tokio::main]
async fn main() -> Result<()> {
    let calls: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("CALLS must be a number")?
        .unwrap_or(5000);
    let dir = std::env::temp_dir().join("ferry-plugin-bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    ferry_e2e::install_adapter("process", &dir.join("plugins"))?;
    std::fs::write(
        dir.join("site.toml"),
        format!(
            "name = \"bench\"\ndata_dir = \"data\"\n[identity]\ncert = \"c\"\nkey = \"k\"\n[api]\nlisten = \"127.0.0.1:0\"\ntoken = \"0123456789abcdef0123\"\n[peer]\nlisten = \"127.0.0.1:0\"\n[workloads]\nwork_root = \"{}\"\n[plugins.grants.process]\ncapabilities = [\"log\", \"criu\", \"process\"]\n",
            dir.join("work").display()
        ),
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        // The config holds a token: owner-only, or it is refused.
        std::fs::set_permissions(
            dir.join("site.toml"),
            std::fs::Permissions::from_mode(0o600),
        )?;
    }
    let cfg = SiteConfig::load(&dir.join("site.toml"))?;

    let t = Instant::now();
    let host = PluginHost::load(&plugin_settings(&cfg), Criu::new(PathBuf::from("criu"))).await?;
    println!(
        "load, compiling the component      {:>8.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(host);
    let t = Instant::now();
    let host = PluginHost::load(&plugin_settings(&cfg), Criu::new(PathBuf::from("criu"))).await?;
    println!(
        "load, from the compile cache       {:>8.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let adapter = host.adapter("process")?;

    for _ in 0..200 {
        adapter.describe().await?;
    }
    let mut describe = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        adapter.describe().await?;
        describe.push(t.elapsed());
    }
    let mut probe = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        adapter.probe(workload()).await?;
        probe.push(t.elapsed());
    }
    // The same hop between tasks, with no WebAssembly: the floor a call cannot go under.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>(64);
    tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            let _ = reply.send(());
        }
    });
    let mut hop = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        let (r, w) = tokio::sync::oneshot::channel();
        tx.send(r).await?;
        w.await?;
        hop.push(t.elapsed());
    }
    stats("describe (wasm call)", describe);
    stats("probe (record in, plan out)", probe);
    stats("task round trip, no wasm", hop);
    Ok(())
}
