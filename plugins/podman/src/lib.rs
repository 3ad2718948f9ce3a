//! `podman` adapter, orchestrator level: Podman's own `container checkpoint --export` and
//! `container restore --import`.
//!
//! Workloads name their image with `--setting image=REF` (present at every site). The
//! container is named `SITE-WORKLOAD` and uses the network of the site it runs on (host
//! networking inside the site's namespace), so a restore needs no network rewriting and
//! lands in the destination's network. CRIU options go through the `org.criu.config`
//! annotation, a file in the workload's work directory (the same path at every site).
//! The checkpoint stops the source and keeps its image: a failed migration restores it
//! locally; a confirmed one removes it.
//!
//! Bind mounts: `--setting mounts=HOST:CONTAINER[,HOST:CONTAINER…]` (each host path under
//! the grant's `mounts`). Name the host paths with `--volume` too, and their files move
//! with the container.

use ferry_adapter_sdk::*;

struct Podman;

const QUICK_MS: u32 = 60_000;
const IMAGE_MS: u32 = 600_000;
const CRIU_CONF: &str = "ferry-criu.conf";

fn id(w: &Workload) -> String {
    format!("{}-{}", w.site, w.name)
}

fn image(w: &Workload) -> Result<&str, AdapterError> {
    setting(w, "image").ok_or_else(|| {
        AdapterError::Unsupported(
            "podman workloads need --setting image=REF (present at every site)".into(),
        )
    })
}

/// The bind mounts the workload asks for (`mounts=HOST:CONTAINER,…`), as `-v` values.
fn mounts(w: &Workload) -> Result<Vec<String>, AdapterError> {
    let Some(list) = setting(w, "mounts") else {
        return Ok(Vec::new());
    };
    list.split(',')
        .filter(|m| !m.trim().is_empty())
        .map(|m| {
            let m = m.trim();
            match m.split_once(':') {
                Some((host, inside)) if host.starts_with('/') && inside.starts_with('/') => {
                    Ok(m.to_string())
                }
                _ => Err(AdapterError::Unsupported(format!(
                    "mount {m:?}: write mounts=/host/path:/container/path[,…]"
                ))),
            }
        })
        .collect()
}

fn archive(w: &Workload) -> Result<String, AdapterError> {
    w.images_dir
        .as_deref()
        .map(|d| format!("{d}/checkpoint.tar.gz"))
        .ok_or_else(|| AdapterError::Failed("no image directory for this call".into()))
}

/// Writes the CRIU options file the container's annotation points at: open TCP
/// connections are closed rather than moved (clients reconnect through the ingress), and
/// in-flight connections are skipped.
fn write_criu_conf() -> Result<(), AdapterError> {
    std::fs::write(format!("/work/{CRIU_CONF}"), "tcp-close\nskip-in-flight\n").map_err(|e| {
        AdapterError::Denied(format!(
            "cannot write the CRIU options file into the work directory ({e}); grant the files capability"
        ))
    })
}

fn inspect(w: &Workload, format: &str) -> Result<String, AdapterError> {
    let out = run("podman", &["inspect", "--format", format, &id(w)], QUICK_MS)?;
    Ok(out.stdout.trim().to_string())
}

fn pid(w: &Workload) -> Result<i32, AdapterError> {
    let text = inspect(w, "{{.State.Pid}}")?;
    match text.parse::<i32>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(AdapterError::Failed(format!(
            "container {} has no running process ({text})",
            id(w)
        ))),
    }
}

impl Adapter for Podman {
    fn describe() -> AdapterInfo {
        AdapterInfo {
            name: "podman".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            approaches: vec![Approach::Orchestrator],
            runtimes: vec!["podman".into()],
        }
    }

    fn probe(w: Workload) -> Plan {
        match image(&w) {
            Ok(img) => Plan {
                feasible: true,
                approach: Some(Approach::Orchestrator),
                reason: format!(
                    "podman checkpoint --export of {} (image {img} needed at the destination); stop-and-copy only: podman's checkpoint has no lazy-pages mode, so it cannot move post-copy",
                    id(&w)
                ),
                expected_downtime_ms: None,
            },
            Err(AdapterError::Unsupported(why) | AdapterError::Failed(why) | AdapterError::Denied(why)) => Plan {
                feasible: false,
                approach: None,
                reason: why,
                expected_downtime_ms: None,
            },
        }
    }

    fn prepare(w: Workload) -> Result<(), AdapterError> {
        let img = image(&w)?;
        if run("podman", &["image", "exists", img], QUICK_MS).is_err() {
            return Err(AdapterError::Failed(format!(
                "image {img} is not present at site {}; podman load or import it there first",
                w.site
            )));
        }
        write_criu_conf()
    }

    fn start_fresh(w: Workload) -> Result<i32, AdapterError> {
        let img = image(&w)?.to_string();
        write_criu_conf()?;
        let id = id(&w);
        let annotation = format!("org.criu.config={}/{CRIU_CONF}", w.work_dir);
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &id,
            "--network",
            "host",
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=32768:32768",
            "--annotation",
            &annotation,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for m in mounts(&w)? {
            args.push("-v".into());
            args.push(m);
        }
        for (k, v) in &w.env {
            args.push("-e".into());
            args.push(format!("{k}={v}"));
        }
        args.push(img);
        args.extend(w.command.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run("podman", &refs, QUICK_MS)?;
        pid(&w)
    }

    fn checkpoint(w: Workload) -> Result<Notes, AdapterError> {
        let export = format!("--export={}", archive(&w)?);
        run(
            "podman",
            &["container", "checkpoint", &export, &id(&w)],
            IMAGE_MS,
        )?;
        Ok(vec![("source-container".into(), id(&w))])
    }

    fn restore(w: Workload, _notes: Notes) -> Result<i32, AdapterError> {
        let import = format!("--import={}", archive(&w)?);
        let id = id(&w);
        // A container left by an earlier failed attempt would block the name.
        let _ = run("podman", &["rm", "-f", &id], QUICK_MS);
        run(
            "podman",
            &["container", "restore", &import, "--name", &id],
            IMAGE_MS,
        )?;
        pid(&w)
    }

    fn resume_source(w: Workload) -> Result<Option<i32>, AdapterError> {
        let id = id(&w);
        match inspect(&w, "{{.State.Status}}")?.as_str() {
            "running" => Ok(None),
            "paused" => {
                run("podman", &["unpause", &id], QUICK_MS)?;
                Ok(None)
            }
            _ => {
                // Checkpointed and stopped: restore the checkpoint it kept locally.
                run("podman", &["container", "restore", &id], IMAGE_MS)?;
                pid(&w).map(Some)
            }
        }
    }

    fn release_source(w: Workload) -> Result<(), AdapterError> {
        run("podman", &["rm", "-f", "-t", "0", &id(&w)], QUICK_MS).map(|_| ())
    }
}

export_adapter!(Podman);
