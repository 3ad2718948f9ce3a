//! `ferry plugin ls`: the site's adapters, their versions and what they are granted.

use super::output::{self, Output};
use super::Connect;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// List loaded adapters with their runtimes and effective grants.
    Ls,
}

pub async fn run(cmd: Cmd, connect: &Connect, out: Output) -> anyhow::Result<()> {
    match cmd {
        Cmd::Ls => {
            let list: serde_json::Value = connect.client()?.get("/v1/plugins").await?;
            if out == Output::Json {
                return output::json(&list);
            }
            let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
            let join = |v: &serde_json::Value| {
                v.as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .filter(|j| !j.is_empty())
                    .unwrap_or_else(|| "-".into())
            };
            output::table(
                &[
                    "NAME",
                    "VERSION",
                    "WORLD",
                    "RUNTIMES/SERVICES",
                    "APPROACHES",
                    "GRANTED",
                    "EXEC",
                    "STATUS",
                ],
                list.as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        vec![
                            s(&p["name"]),
                            s(&p["version"]),
                            if p["hooks"] == true {
                                format!("{} + hooks", s(&p["world"]))
                            } else {
                                s(&p["world"])
                            },
                            join(&p["runtimes"]),
                            join(&p["approaches"]),
                            join(&p["granted"]["capabilities"]),
                            join(&p["granted"]["exec"]),
                            s(&p["status"]),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
    }
}
