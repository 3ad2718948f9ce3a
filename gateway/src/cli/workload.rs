//! `ferry workload`: run, list, show and remove workloads.

use anyhow::Context;

use super::output::{self, Output};
use super::Connect;
use crate::spec::{Workload, WorkloadSpec};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Its name, unique at this site (1-63 of a-z, 0-9 and '-').
    name: String,
    /// TCP port the workload serves (checked free, then waited for).
    #[arg(long)]
    port: Option<u16>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The adapter that runs it: process (default), runc, …
    #[arg(long, default_value = "process")]
    runtime: String,
    /// Runtime-specific setting KEY=VALUE for the adapter (repeatable).
    #[arg(long = "setting", value_name = "KEY=VALUE")]
    settings: Vec<String>,
    /// Ingress route at this site to --port (repeatable): ADDR:PORT or tcp:ADDR:PORT
    /// for TCP, http:ADDR:PORT for HTTP/1.1, http-redirect:ADDR:PORT to send clients
    /// to the new site after a move. Clients are held, not refused, during a migration.
    #[arg(long = "route", value_name = "[MODE:]ADDR:PORT")]
    routes: Vec<crate::spec::RouteSpec>,
    /// What says it serves, after it starts and after every restore: tcp (the default
    /// with --port), http:/PATH (a 2xx or 3xx answer on --port), or exec:PROGRAM ARGS
    /// (run at the site, exit 0). Without --port and without a check: that it keeps
    /// running. A restore that fails it is discarded and the source resumes.
    #[arg(long, value_name = "CHECK")]
    health: Option<crate::spec::HealthCheck>,
    /// Checkpoint it every DURATION while it runs (30s, 5m, 1h; left running), kept as
    /// `ferry checkpoint` keeps them.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    checkpoint_every: Option<u64>,
    /// Replicate each of its checkpoints to peer SITE (only the blocks SITE lacks
    /// travel), from where `ferry workload recover NAME` brings it back if this site
    /// is lost.
    #[arg(long, value_name = "SITE")]
    replicate_to: Option<String>,
    /// Keep its N newest checkpoints (here and at the replica's site); default: the
    /// site's `[workloads] keep_checkpoints`.
    #[arg(long, value_name = "N")]
    keep_checkpoints: Option<u32>,
    /// When its process ends unasked, bring it back: never (the default), on-failure
    /// (a non-zero exit or a signal) or always. How is the decider's call: by
    /// default a crash by a signal restores its newest checkpoint (a fresh start
    /// without one), a failing exit starts it fresh, a clean exit leaves it in
    /// standby; crash loops back off (1 s, doubling, at most 60 s).
    #[arg(long, value_enum, value_name = "WHEN")]
    restart: Option<crate::spec::RestartWhen>,
    /// A decider plugin (world `restart-decider`) that makes that call instead.
    #[arg(long, value_name = "PLUGIN", requires = "restart")]
    decider: Option<String>,
    /// A directory it keeps state in (absolute path, repeatable): a migration moves its
    /// files to the same path at the destination (copied while it runs, then only what
    /// changed, while it is frozen).
    #[arg(long = "volume", value_name = "PATH")]
    volumes: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Start a process workload: `ferry workload run NAME [--port P] -- CMD ARGS…`.
    Run(Box<RunArgs>),
    /// List this site's workloads.
    Ls,
    /// Show one workload.
    Show { name: String },
    /// Stop and remove a workload.
    Rm { name: String },
    /// Bring back an exited or standby workload: from its newest checkpoint if it has
    /// one, else started fresh.
    Start { name: String },
    /// Failover, at the site that takes over: run NAME here from the newest checkpoint
    /// its lost site replicated here (`--replicate-to`). An operator's decision:
    /// refused while that site answers, unless --force; the site, once back, stops its
    /// old copy instead of resuming it. Writes made there since that checkpoint are lost.
    Recover {
        name: String,
        /// The replicated checkpoint (default: the newest).
        #[arg(long, value_name = "ID")]
        from: Option<String>,
        /// Recover even though the workload's site answers on the peer link.
        #[arg(long)]
        force: bool,
    },
}

/// Seconds from "90", "30s", "5m", "2h" or "1d".
fn parse_duration(text: &str) -> Result<u64, String> {
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30s, 5m or 1h"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// Prints a workload that runs now (its record as JSON with `--output json`).
fn running(w: &Workload, out: Output) -> anyhow::Result<()> {
    if out == Output::Json {
        return output::json(w);
    }
    println!(
        "workload {} running (pid {}) at site {}",
        w.spec.name,
        output::opt(w.pid),
        w.site
    );
    Ok(())
}

fn pairs(
    flag: &str,
    items: Vec<String>,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for kv in items {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("{flag} {kv:?} must be KEY=VALUE"))?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

pub async fn run(cmd: Cmd, connect: &Connect, out: Output) -> anyhow::Result<()> {
    let client = connect.client()?;
    match cmd {
        Cmd::Run(args) => {
            let RunArgs {
                name,
                port,
                env,
                runtime,
                settings,
                routes,
                health,
                checkpoint_every,
                replicate_to,
                keep_checkpoints,
                restart,
                decider,
                volumes,
                command,
            } = *args;
            let checkpoints = (checkpoint_every.is_some()
                || replicate_to.is_some()
                || keep_checkpoints.is_some())
            .then_some(crate::spec::CheckpointPolicy {
                every_secs: checkpoint_every,
                replicate_to,
                keep: keep_checkpoints,
            });
            let spec = WorkloadSpec {
                name,
                command,
                port,
                env: pairs("--env", env)?,
                runtime,
                settings: pairs("--setting", settings)?,
                routes,
                health,
                checkpoints,
                restart: restart.map(|when| crate::spec::RestartPolicy { when, decider }),
                volumes,
            };
            let (_, w): (_, Workload) = client.post("/v1/workloads", &spec).await?;
            running(&w, out)
        }
        Cmd::Ls => {
            let list: Vec<Workload> = client.get("/v1/workloads").await?;
            if out == Output::Json {
                return output::json(&list);
            }
            output::table(
                &["NAME", "STATE", "PID", "PORT", "ORIGIN", "COMMAND"],
                list.iter()
                    .map(|w| {
                        vec![
                            w.spec.name.clone(),
                            w.state.to_string(),
                            output::opt(w.pid),
                            output::opt(w.spec.port),
                            w.restored_from.as_ref().map_or_else(
                                || "-".into(),
                                |o| format!("{} ({})", o.site, o.migration),
                            ),
                            w.spec.command.join(" "),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        Cmd::Show { name } => {
            let w: Workload = client.get(&format!("/v1/workloads/{name}")).await?;
            output::json(&w)
        }
        Cmd::Recover { name, from, force } => {
            let body = crate::api::types::RecoverRequest { from, force };
            let (_, w): (_, Workload) = client
                .post(&format!("/v1/workloads/{name}/recover"), &body)
                .await?;
            if out == Output::Json {
                return output::json(&w);
            }
            println!(
                "workload {} recovered here (pid {}) from {}",
                w.spec.name,
                output::opt(w.pid),
                w.restored_from.as_ref().map_or_else(
                    || "-".to_string(),
                    |o| format!("site {} ({})", o.site, o.migration)
                )
            );
            Ok(())
        }
        Cmd::Start { name } => {
            let (_, w): (_, Workload) = client
                .post(
                    &format!("/v1/workloads/{name}/start"),
                    &serde_json::json!({}),
                )
                .await?;
            running(&w, out)
        }
        Cmd::Rm { name } => {
            let w: Workload = client.delete(&format!("/v1/workloads/{name}")).await?;
            if out == Output::Json {
                return output::json(&w);
            }
            println!("workload {} removed", w.spec.name);
            Ok(())
        }
    }
}
