//! `ferry workload`: run, list, show and remove workloads.

use anyhow::Context;

use super::output::{self, Output};
use super::Connect;
use crate::spec::{Workload, WorkloadSpec};

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Start a process workload: `ferry workload run NAME [--port P] -- CMD ARGS…`.
    Run {
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
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List this site's workloads.
    Ls,
    /// Show one workload.
    Show { name: String },
    /// Stop and remove a workload.
    Rm { name: String },
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
        Cmd::Run {
            name,
            port,
            env,
            runtime,
            settings,
            routes,
            health,
            command,
        } => {
            let spec = WorkloadSpec {
                name,
                command,
                port,
                env: pairs("--env", env)?,
                runtime,
                settings: pairs("--setting", settings)?,
                routes,
                health,
            };
            let (_, w): (_, Workload) = client.post("/v1/workloads", &spec).await?;
            if out == Output::Json {
                return output::json(&w);
            }
            println!(
                "workload {} running (pid {}) at site {}",
                w.spec.name,
                output::opt(w.pid),
                w.site
            );
            Ok(())
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
