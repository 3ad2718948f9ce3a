//! `docker` adapter, orchestrator level: the Docker engine's own (experimental)
//! `docker checkpoint create` and `docker start --checkpoint`.
//!
//! Workloads name their image with `--setting image=REF` (present at every site) and,
//! where the site's daemon is not the default one, its socket with
//! `--setting docker-host=unix:///PATH`, in which `{site}` stands for the site's name (one
//! daemon per site on one machine: `unix:///run/ferry-docker/{site}/docker.sock`). The
//! container is named `SITE-WORKLOAD` and uses the network of the daemon that runs it
//! (`--network host`; the site's daemon runs in the site's network), so a restore lands in
//! the destination's network.
//!
//! The checkpoint pauses the source, then dumps it with `--leave-running` into the
//! migration's image directory, so a failed migration only unpauses it and a confirmed one
//! removes it. Docker writes its checkpoint into a directory of its own name, which this
//! adapter lays out flat (the gateway moves the files of the image directory). Docker's
//! engine restores only from the container's own checkpoint directory (`docker start
//! --checkpoint-dir` answers "custom checkpointdir is not supported"), so the restore
//! creates the container, copies the received image there with `cp` (the one copy the
//! gateway lets a Docker adapter make, `plugins::containers`) and starts it from it.
//!
//! CRIU options cannot travel as an annotation (Docker 20.10 sets none): the daemon's
//! `CRIU_CONFIG_FILE` names them (`tcp-close`, so open connections are closed and clients
//! reconnect through the ingress). Docker's checkpoint holds the processes, not the
//! container's root filesystem changes: keep state on disk in `--volume` directories bound
//! with `--setting mounts=HOST:CONTAINER[,HOST:CONTAINER…]` (each host path under the
//! grant's `mounts`), whose files move with the container.

use ferry_adapter_sdk::*;

struct Docker;

const QUICK_MS: u32 = 60_000;
const IMAGE_MS: u32 = 600_000;
/// The checkpoint's name, at both sites.
const CHECKPOINT: &str = "ferry";

fn id(w: &Workload) -> String {
    format!("{}-{}", w.site, w.name)
}

fn image(w: &Workload) -> Result<&str, AdapterError> {
    setting(w, "image").ok_or_else(|| {
        AdapterError::Unsupported(
            "docker workloads need --setting image=REF (present at every site)".into(),
        )
    })
}

/// `-H SOCKET` for the site's daemon, if the workload names one (`{site}` replaced).
fn host(w: &Workload) -> Result<Vec<String>, AdapterError> {
    let Some(host) = setting(w, "docker-host") else {
        return Ok(Vec::new());
    };
    let host = host.replace("{site}", &w.site);
    if !host.starts_with("unix:///") {
        return Err(AdapterError::Unsupported(format!(
            "docker-host {host:?}: name the site's daemon by its socket, unix:///PATH"
        )));
    }
    Ok(vec!["-H".into(), host])
}

/// Runs `docker` against the workload's daemon.
fn docker(w: &Workload, args: &[&str], timeout_ms: u32) -> Result<exec::Output, AdapterError> {
    let host = host(w)?;
    let mut all: Vec<&str> = host.iter().map(String::as_str).collect();
    all.extend_from_slice(args);
    run("docker", &all, timeout_ms)
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

fn images(w: &Workload) -> Result<&str, AdapterError> {
    w.images_dir
        .as_deref()
        .ok_or_else(|| AdapterError::Failed("no image directory for this call".into()))
}

/// The container's options and command, the same for `run` and `create`, so a restored
/// container is the one that was checkpointed.
fn container_args(w: &Workload) -> Result<Vec<String>, AdapterError> {
    let img = image(w)?.to_string();
    let mut args: Vec<String> = [
        "--name",
        &id(w),
        "--network",
        "host",
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=32768:32768",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    for m in mounts(w)? {
        args.push("-v".into());
        args.push(m);
    }
    for (k, v) in &w.env {
        args.push("-e".into());
        args.push(format!("{k}={v}"));
    }
    args.push(img);
    args.extend(w.command.iter().cloned());
    Ok(args)
}

fn inspect(w: &Workload, format: &str) -> Result<String, AdapterError> {
    let out = docker(w, &["inspect", "--format", format, &id(w)], QUICK_MS)?;
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

/// Moves Docker's checkpoint (`/images/ferry/*`) up into the image directory itself,
/// where the gateway sends every file from.
fn flatten() -> Result<(), AdapterError> {
    let denied = |e: std::io::Error| {
        AdapterError::Denied(format!(
            "cannot lay the checkpoint out in the image directory ({e}); grant the files capability"
        ))
    };
    let dir = format!("/images/{CHECKPOINT}");
    for entry in std::fs::read_dir(&dir).map_err(denied)? {
        let entry = entry.map_err(denied)?;
        let to = format!("/images/{}", entry.file_name().to_string_lossy());
        std::fs::rename(entry.path(), &to).map_err(|e| {
            AdapterError::Failed(format!(
                "cannot move {} to {to}: {e}",
                entry.path().display()
            ))
        })?;
    }
    std::fs::remove_dir(&dir).map_err(|e| AdapterError::Failed(format!("cannot remove {dir}: {e}")))
}

/// Copies the received image into the checkpoint directory of the new container
/// `created` (its full id), the only place `docker start --checkpoint` reads one from.
fn place_checkpoint(w: &Workload, created: &str, images: &str) -> Result<(), AdapterError> {
    let root = docker(w, &["info", "--format", "{{.DockerRootDir}}"], QUICK_MS)?
        .stdout
        .trim()
        .to_string();
    if created.len() != 64 || !created.bytes().all(|b| b.is_ascii_hexdigit()) || root.is_empty() {
        return Err(AdapterError::Failed(format!(
            "docker create printed no container id ({created:?}) or docker info no root ({root:?})"
        )));
    }
    let into = format!("{root}/containers/{created}/checkpoints/{CHECKPOINT}");
    run("cp", &["-a", images, &into], IMAGE_MS).map(|_| ())
}

impl Adapter for Docker {
    fn describe() -> AdapterInfo {
        AdapterInfo {
            name: "docker".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            approaches: vec![Approach::Orchestrator],
            runtimes: vec!["docker".into()],
        }
    }

    fn probe(w: Workload) -> Plan {
        match image(&w).and_then(|img| host(&w).map(|_| img)) {
            Ok(img) => Plan {
                feasible: true,
                approach: Some(Approach::Orchestrator),
                reason: format!(
                    "docker checkpoint of {} (image {img} needed at the destination; the container's root filesystem changes stay behind, --volume directories move); stop-and-copy only: Docker's checkpoint has no lazy-pages mode",
                    id(&w)
                ),
                expected_downtime_ms: None,
            },
            Err(
                AdapterError::Unsupported(why)
                | AdapterError::Failed(why)
                | AdapterError::Denied(why),
            ) => Plan {
                feasible: false,
                approach: None,
                reason: why,
                expected_downtime_ms: None,
            },
        }
    }

    fn prepare(w: Workload) -> Result<(), AdapterError> {
        let img = image(&w)?;
        if docker(
            &w,
            &["image", "inspect", "--format", "{{.Id}}", img],
            QUICK_MS,
        )
        .is_err()
        {
            return Err(AdapterError::Failed(format!(
                "image {img} is not present at site {}; docker load or import it there first",
                w.site
            )));
        }
        Ok(())
    }

    fn start_fresh(w: Workload) -> Result<i32, AdapterError> {
        let mut args = vec!["run".to_string(), "-d".to_string()];
        args.extend(container_args(&w)?);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&w, &refs, QUICK_MS)?;
        pid(&w)
    }

    fn checkpoint(w: Workload) -> Result<Notes, AdapterError> {
        let images = images(&w)?.to_string();
        let id = id(&w);
        // Paused first and left paused: a failed migration unpauses it.
        docker(&w, &["pause", &id], QUICK_MS)?;
        let dir = format!("--checkpoint-dir={images}");
        docker(
            &w,
            &[
                "checkpoint",
                "create",
                "--leave-running",
                &dir,
                &id,
                CHECKPOINT,
            ],
            IMAGE_MS,
        )?;
        flatten()?;
        Ok(vec![("source-container".into(), id)])
    }

    fn restore(w: Workload, _notes: Notes) -> Result<i32, AdapterError> {
        let images = images(&w)?.to_string();
        let id = id(&w);
        // A container left by an earlier failed attempt would block the name.
        let _ = docker(&w, &["rm", "-f", &id], QUICK_MS);
        let mut args = vec!["create".to_string()];
        args.extend(container_args(&w)?);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let created = docker(&w, &refs, QUICK_MS)?.stdout.trim().to_string();
        // A container that could not be restored is not left behind at this site.
        let placed = place_checkpoint(&w, &created, &images)
            .and_then(|()| docker(&w, &["start", "--checkpoint", CHECKPOINT, &id], IMAGE_MS));
        if let Err(e) = placed {
            let _ = docker(&w, &["rm", "-f", &id], QUICK_MS);
            return Err(e);
        }
        pid(&w)
    }

    fn resume_source(w: Workload) -> Result<Option<i32>, AdapterError> {
        match inspect(&w, "{{.State.Status}}")?.as_str() {
            "running" => Ok(None),
            "paused" => {
                docker(&w, &["unpause", &id(&w)], QUICK_MS)?;
                Ok(None)
            }
            other => Err(AdapterError::Failed(format!(
                "container {} is {other}, not paused: nothing to resume",
                id(&w)
            ))),
        }
    }

    fn release_source(w: Workload) -> Result<(), AdapterError> {
        docker(&w, &["rm", "-f", &id(&w)], QUICK_MS).map(|_| ())
    }
}

export_adapter!(Docker);
