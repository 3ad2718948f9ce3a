//! `runc` adapter: OCI bundles run with runc, moved with runc's own checkpoint/restore.
//!
//! Workloads name their bundle with `--setting bundle=/path/to/bundle` (the same path at
//! both sites). Each site keeps its runc state under `/run/ferry-runc/SITE` and names the
//! container `SITE-WORKLOAD`, so two sites on one host never collide. The source is
//! paused (cgroup freezer) before the checkpoint and left paused, so a failed migration
//! resumes it and a confirmed one deletes it. The container's stdio are pipes the
//! gateway drains into the workload's log, which CRIU can carry across.
//!
//! Post-copy (when the engine chooses it, through the `lazy` host interface): the
//! checkpoint is runc's own lazy one (`--lazy-pages`, its page server where the gateway
//! says, readiness on the status descriptor), which the gateway keeps running and serves
//! the paused container's pages from; the restore is `runc restore --lazy-pages` with the
//! image directory as CRIU's work directory, where the gateway's lazy-pages daemon waits.

use ferry_adapter_sdk::*;

struct Runc;

const QUICK_MS: u32 = 30_000;
const IMAGE_MS: u32 = 600_000;

fn root(w: &Workload) -> String {
    format!("/run/ferry-runc/{}", w.site)
}

fn id(w: &Workload) -> String {
    format!("{}-{}", w.site, w.name)
}

fn bundle(w: &Workload) -> Result<&str, AdapterError> {
    setting(w, "bundle").ok_or_else(|| {
        AdapterError::Unsupported(
            "runc workloads need --setting bundle=/path/to/oci-bundle (the same path at every site)".into(),
        )
    })
}

fn images(w: &Workload) -> Result<&str, AdapterError> {
    w.images_dir
        .as_deref()
        .ok_or_else(|| AdapterError::Failed("no image directory for this call".into()))
}

fn runc(w: &Workload, args: &[&str], timeout_ms: u32) -> Result<exec::Output, AdapterError> {
    let root = root(w);
    let mut all = vec!["--root", root.as_str()];
    all.extend_from_slice(args);
    run("runc", &all, timeout_ms)
}

fn runc_into_log(w: &Workload, args: &[&str], timeout_ms: u32) -> Result<(), AdapterError> {
    let root = root(w);
    let mut all = vec!["--root", root.as_str()];
    all.extend_from_slice(args);
    run_into_log("runc", &all, timeout_ms).map(|_| ())
}

/// The container's init pid, from `runc state` (JSON with a `"pid": N` field).
fn pid(w: &Workload) -> Result<i32, AdapterError> {
    let out = runc(w, &["state", &id(w)], QUICK_MS)?;
    let text = out.stdout;
    let at = text
        .find("\"pid\"")
        .ok_or_else(|| AdapterError::Failed(format!("runc state has no pid: {text}")))?;
    let digits: String = text[at + 5..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits
        .parse()
        .map_err(|_| AdapterError::Failed(format!("runc state has no pid: {text}")))
}

impl Adapter for Runc {
    fn describe() -> AdapterInfo {
        AdapterInfo {
            name: "runc".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            approaches: vec![Approach::Orchestrator],
            runtimes: vec!["runc".into()],
        }
    }

    fn probe(w: Workload) -> Plan {
        match bundle(&w) {
            Ok(b) => Plan {
                feasible: true,
                approach: Some(Approach::Orchestrator),
                reason: format!(
                    "runc checkpoint of container {} (bundle {b} needed at the destination)",
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
        bundle(&w).map(|_| ())
    }

    fn start_fresh(w: Workload) -> Result<i32, AdapterError> {
        let b = bundle(&w)?.to_string();
        runc_into_log(&w, &["run", "-d", "--bundle", &b, &id(&w)], QUICK_MS)?;
        pid(&w)
    }

    fn checkpoint(w: Workload) -> Result<Notes, AdapterError> {
        let images = images(&w)?.to_string();
        let id = id(&w);
        runc(&w, &["pause", &id], QUICK_MS)?;
        let mut args = vec![
            "checkpoint",
            "--image-path",
            &images,
            "--leave-running",
            "--file-locks",
        ];
        match lazy::dump_spec() {
            None => {
                args.push(&id);
                runc(&w, &args, IMAGE_MS)?;
            }
            Some(spec) => {
                // The dump goes on serving the pages after this call; the gateway owns it.
                let status_fd = spec.status_fd.to_string();
                args.extend([
                    "--lazy-pages",
                    "--page-server",
                    &spec.page_server,
                    "--status-fd",
                    &status_fd,
                    "--work-path",
                    &images,
                    &id,
                ]);
                let root = root(&w);
                let mut all = vec!["--root", root.as_str()];
                all.extend_from_slice(&args);
                lazy::start_dump(&exec::Command {
                    program: "runc".into(),
                    args: all.iter().map(ToString::to_string).collect(),
                    env: Vec::new(),
                    timeout_ms: IMAGE_MS,
                    output: exec::OutputMode::Capture,
                })?;
            }
        }
        Ok(vec![("source-container".into(), id)])
    }

    fn restore(w: Workload, _notes: Notes) -> Result<i32, AdapterError> {
        let images = images(&w)?.to_string();
        let b = bundle(&w)?.to_string();
        let id = id(&w);
        // A container left by an earlier failed attempt would block the name.
        let _ = runc(&w, &["delete", "-f", &id], QUICK_MS);
        let mut args = vec!["restore", "-d", "--image-path", &images, "--bundle", &b];
        // Post-copy: the pages come later, through the gateway's daemon in this directory.
        let work = lazy::restore_work_dir()?;
        if let Some(work) = &work {
            args.extend(["--lazy-pages", "--work-path", work]);
        }
        args.push(&id);
        runc_into_log(&w, &args, IMAGE_MS)?;
        pid(&w)
    }

    fn resume_source(w: Workload) -> Result<Option<i32>, AdapterError> {
        let id = id(&w);
        let state = runc(&w, &["state", &id], QUICK_MS)?.stdout;
        if state.contains("\"paused\"") {
            runc(&w, &["resume", &id], QUICK_MS)?;
        }
        Ok(None)
    }

    fn release_source(w: Workload) -> Result<(), AdapterError> {
        let id = id(&w);
        let _ = runc(&w, &["kill", &id, "KILL"], QUICK_MS);
        runc(&w, &["delete", "-f", &id], QUICK_MS).map(|_| ())
    }
}

export_adapter!(Runc);
