//! `ferry migrate NAME --to SITE`: start a migration and follow it to its end.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::migration::print_migration;
use super::output::{self, Output};
use super::Connect;
use crate::api::types::MigrationRequest;
use crate::migration::{Migration, Phase};

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
}

pub async fn run(args: Args, connect: &Connect, out: Output) -> anyhow::Result<()> {
    let client = connect.client()?;
    let (_, mut m): (_, Migration) = client
        .post(
            "/v1/migrations",
            &MigrationRequest {
                workload: args.workload.clone(),
                to: args.to.clone(),
            },
        )
        .await?;
    if args.no_wait {
        return if out == Output::Json {
            output::json(&m)
        } else {
            println!("migration {} accepted", m.id);
            Ok(())
        };
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let mut last = None;
    loop {
        if last != Some(m.phase) {
            let line = format!("{} -> {}: {}", m.source, m.target, m.phase);
            if bar.is_hidden() {
                eprintln!("{line}");
            }
            bar.set_message(line);
            last = Some(m.phase);
        }
        if m.phase.is_terminal() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = client.get(&format!("/v1/migrations/{}", m.id)).await?;
    }
    bar.finish_and_clear();
    if out == Output::Json {
        output::json(&m)?;
    } else {
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
