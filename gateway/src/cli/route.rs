//! `ferry route ls`: the site's ingress routes and where they lead now.

use super::output::{self, Output};
use super::Connect;
use crate::api::types::RouteInfo;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// List routes: served here, held during a move, or forwarded to the peer now running
    /// the workload.
    Ls,
    /// Stop forwarding a workload that now runs at another site (its routes here close).
    Rm { workload: String },
}

pub async fn run(cmd: Cmd, connect: &Connect, out: Output) -> anyhow::Result<()> {
    match cmd {
        Cmd::Ls => {
            let routes: Vec<RouteInfo> = connect.client()?.get("/v1/routes").await?;
            if out == Output::Json {
                return output::json(&routes);
            }
            output::table(
                &["WORKLOAD", "LISTEN", "MODE", "TARGET", "BOUND", "HELD"],
                routes
                    .iter()
                    .flat_map(|r| {
                        r.routes.iter().map(move |spec| {
                            vec![
                                r.workload.clone(),
                                spec.listen.to_string(),
                                spec.mode_name().to_string(),
                                r.target.clone(),
                                r.bound.to_string(),
                                r.held.to_string(),
                            ]
                        })
                    })
                    .collect(),
            );
            Ok(())
        }
        Cmd::Rm { workload } => {
            let _: serde_json::Value = connect
                .client()?
                .delete(&format!("/v1/routes/{workload}"))
                .await?;
            println!("routes of {workload} closed at this site");
            Ok(())
        }
    }
}
