//! `ferry migrate NAME --to SITE`: start a migration and follow it to its end.

use std::time::Duration;

use super::migration::print_migration;
use super::output::{self, Output};
use super::Connect;
use crate::api::types::MigrationRequest;
use crate::migration::{Migration, MovePlan, Phase};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The workload to move.
    workload: String,
    /// The destination site (a configured peer).
    #[arg(long)]
    to: String,
    /// Return once the migration is accepted instead of following it.
    #[arg(long)]
    no_wait: bool,
    /// Print every candidate approach, its predicted client stall and why it is (not)
    /// feasible, and the choice; move nothing.
    #[arg(long)]
    plan: bool,
    /// Run this approach (orchestrator, container, service) instead of the chosen one.
    #[arg(long)]
    approach: Option<String>,
    /// How a checkpoint moves memory: auto (default: post-copy where the adapter can and
    /// it is predicted to stall clients less, from the tree's memory and the link's RTT;
    /// `--plan` shows the predictions), stop-and-copy, or postcopy: the pages go ahead
    /// while the source runs (unless [migration] prepush = false), the destination runs as
    /// soon as the small state has moved and gets the pages written since from the frozen
    /// source. Post-copy needs an adapter that checkpoints through the gateway's CRIU or
    /// its lazy interface (process, runc; podman cannot). Until the destination holds every page, a destination crash loses the
    /// writes made there since the switch (its copy is stopped, the source resumes); the
    /// window is recorded (postcopy_ms). A source gateway restarted meanwhile serves the
    /// rest of the pages from the frozen tree.
    #[arg(long)]
    mode: Option<String>,
    /// Run the workload under this runtime at the destination (service level).
    #[arg(long)]
    runtime: Option<String>,
    /// A runtime setting at the destination (KEY=VALUE, repeatable; with --runtime).
    #[arg(long = "setting", value_name = "KEY=VALUE")]
    settings: Vec<String>,
    /// The command at the destination (after `--`), when its runtime needs another one.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn request(args: &Args) -> anyhow::Result<MigrationRequest> {
    let settings = if args.settings.is_empty() {
        None
    } else {
        let mut map = std::collections::BTreeMap::new();
        for kv in &args.settings {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--setting {kv:?}: expected KEY=VALUE"))?;
            map.insert(k.to_string(), v.to_string());
        }
        Some(map)
    };
    Ok(MigrationRequest {
        workload: args.workload.clone(),
        to: args.to.clone(),
        approach: args.approach.clone(),
        runtime: args.runtime.clone(),
        settings,
        command: (!args.command.is_empty()).then(|| args.command.clone()),
        mode: args.mode.clone(),
    })
}

/// Follows a migration by polling its record until it ends.
async fn poll(
    client: &crate::api::client::ApiClient,
    mut m: Migration,
) -> anyhow::Result<Migration> {
    let bar = output::spinner();
    while !m.phase.is_terminal() {
        bar.set_message(format!("{} -> {}: {}", m.source, m.target, m.phase));
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = client.get(&format!("/v1/migrations/{}", m.id)).await?;
    }
    bar.finish_and_clear();
    Ok(m)
}

/// The plan as a table and the choice.
fn print_plan(plan: &MovePlan) {
    output::table(
        &[
            "APPROACH",
            "ADAPTER",
            "FEASIBLE",
            "ALLOWED",
            "PREDICTED STALL",
            "WHY",
        ],
        plan.candidates
            .iter()
            .map(|c| {
                vec![
                    c.approach.clone(),
                    c.adapter.clone(),
                    if c.feasible { "yes" } else { "no" }.into(),
                    if c.allowed { "yes" } else { "no" }.into(),
                    c.predicted_stall_ms
                        .map_or_else(|| "-".into(), |ms| format!("{ms} ms")),
                    c.reason.clone(),
                ]
            })
            .collect(),
    );
    match plan.chosen() {
        Some(c) => println!("chosen: {} ({})", c.approach, plan.why),
        None => println!("no approach can run: {}", plan.why),
    }
}

pub async fn run(args: Args, connect: &Connect, out: Output) -> anyhow::Result<()> {
    let client = connect.client()?;
    let body = request(&args)?;
    if args.plan {
        let (_, plan): (_, MovePlan) = client.post("/v1/migrations/plan", &body).await?;
        return if out == Output::Json {
            output::json(&plan)
        } else {
            print_plan(&plan);
            Ok(())
        };
    }
    let (_, m): (_, Migration) = client.post("/v1/migrations", &body).await?;
    if args.no_wait {
        return if out == Output::Json {
            output::json(&m)
        } else {
            println!("migration {} accepted", m.id);
            Ok(())
        };
    }
    // Followed through its events (phase, bytes, rate, ETA), or by polling its record if
    // the gateway cannot stream them. With --output json every event is a JSON line as it
    // comes, the last one (`"event":"end"`) holding the final record.
    let m = match super::migration::follow(&client, &m.id, out).await {
        Ok(done) => done,
        Err(e) => {
            tracing::debug!(error = %e, "no event stream; polling the record");
            let m = poll(&client, m).await?;
            if out == Output::Json {
                println!(
                    "{{\"event\":\"end\",\"data\":{}}}",
                    serde_json::to_string(&m)?
                );
            }
            m
        }
    };
    if out != Output::Json {
        print_migration(&m);
    }
    match m.phase {
        Phase::Completed => Ok(()),
        phase => anyhow::bail!(
            "migration {} ended {phase}: {}",
            m.id,
            m.error.as_deref().unwrap_or("no reason recorded")
        ),
    }
}
