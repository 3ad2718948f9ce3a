//! `ferry checkpoint` and `ferry restore`: a workload's state kept at its site, outside
//! any migration, and brought back from it.

use super::output::{self, Output};
use super::Connect;
use crate::api::types::{CheckpointRequest, RestoreRequest};
use crate::checkpoint::CheckpointInfo;
use crate::spec::Workload;

/// `ferry checkpoint NAME [--leave-running]`, or `ferry checkpoint ls NAME`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    list: Option<Sub>,
    /// The workload to checkpoint.
    name: Option<String>,
    /// Let it run on after the checkpoint (it is frozen only while CRIU dumps it).
    /// Without it the workload is stopped into standby: its image kept, nothing
    /// running, until `ferry restore NAME`.
    #[arg(long)]
    leave_running: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// List a workload's checkpoints, oldest first.
    Ls { name: String },
}

/// `ferry restore NAME [--from ID] [--replace]`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    name: String,
    /// The checkpoint (default: the newest; `ferry checkpoint ls NAME` lists them).
    #[arg(long, value_name = "ID")]
    from: Option<String>,
    /// Stop the running workload of that name and restore in its place.
    #[arg(long)]
    replace: bool,
}

pub async fn run(args: Args, connect: &Connect, out: Output) -> anyhow::Result<()> {
    let client = connect.client()?;
    if let Some(Sub::Ls { name }) = args.list {
        let list: Vec<CheckpointInfo> = client
            .get(&format!("/v1/workloads/{name}/checkpoints"))
            .await?;
        if out == Output::Json {
            return output::json(&list);
        }
        output::table(
            &[
                "ID",
                "TAKEN (ms since epoch)",
                "FREEZE",
                "BYTES",
                "NEW BYTES",
                "AFTER",
            ],
            list.iter()
                .map(|c| {
                    vec![
                        c.id.clone(),
                        c.created_at_ms.to_string(),
                        format!("{} ms", c.freeze_ms),
                        c.bytes.to_string(),
                        c.new_bytes.to_string(),
                        if c.left_running { "running" } else { "standby" }.into(),
                    ]
                })
                .collect(),
        );
        return Ok(());
    }
    let Some(name) = args.name else {
        anyhow::bail!("name the workload: ferry checkpoint NAME [--leave-running], or ferry checkpoint ls NAME");
    };
    let body = CheckpointRequest {
        leave_running: args.leave_running,
    };
    let (_, c): (_, CheckpointInfo) = client
        .post(&format!("/v1/workloads/{name}/checkpoints"), &body)
        .await?;
    if out == Output::Json {
        return output::json(&c);
    }
    println!(
        "checkpoint {} of {name}: {} bytes ({} new to the store), frozen {} ms; {}",
        c.id,
        c.bytes,
        c.new_bytes,
        c.freeze_ms,
        if c.left_running {
            "it runs on".to_string()
        } else {
            format!("it is in standby: ferry restore {name} brings it back")
        }
    );
    Ok(())
}

pub async fn restore(args: RestoreArgs, connect: &Connect, out: Output) -> anyhow::Result<()> {
    let client = connect.client()?;
    let body = RestoreRequest {
        from: args.from,
        replace: args.replace,
    };
    let (_, w): (_, Workload) = client
        .post(&format!("/v1/workloads/{}/restore", args.name), &body)
        .await?;
    if out == Output::Json {
        return output::json(&w);
    }
    println!(
        "workload {} restored (pid {}) at site {}",
        w.spec.name,
        output::opt(w.pid),
        w.site
    );
    Ok(())
}
