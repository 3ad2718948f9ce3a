//! `ferry peer`: add a peer site to a config, and check the configured peers.

use std::net::SocketAddr;

use anyhow::Context;

use super::output::{self, Output};
use super::Connect;
use crate::api::types::PeerStatus;
use crate::config::{PeerConfig, SiteConfig};
use crate::identity::Fingerprint;
use crate::transfer::Compression;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Add (or replace) a peer in the site config given with --config; restart the gateway
    /// to apply it.
    Add {
        name: String,
        /// The peer gateway's QUIC address, HOST:PORT.
        address: SocketAddr,
        /// The peer's certificate fingerprint, as its `ferry init` printed it.
        fingerprint: Fingerprint,
        /// How image files sent to this peer travel: zstd (default) or none (links
        /// faster than this site's CPUs can compress).
        #[arg(long, default_value = "zstd")]
        compression: Compression,
    },
    /// Probe every configured peer over the QUIC link.
    Ls,
}

pub async fn run(cmd: Cmd, connect: &Connect, out: Output) -> anyhow::Result<()> {
    match cmd {
        Cmd::Add {
            name,
            address,
            fingerprint,
            compression,
        } => {
            let path = connect
                .config
                .as_ref()
                .context("peer add edits a site config: pass --config site.toml")?;
            let mut cfg = SiteConfig::read_raw(path)?;
            cfg.upsert_peer(PeerConfig {
                name: name.clone(),
                address,
                fingerprint,
                compression,
            })
            .map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?;
            cfg.save(path)?;
            println!("peer {name} ({address}) added to {}", path.display());
            Ok(())
        }
        Cmd::Ls => {
            let peers: Vec<PeerStatus> = connect.client()?.get("/v1/peers").await?;
            if out == Output::Json {
                return output::json(&peers);
            }
            output::table(
                &["PEER", "ADDRESS", "REACHABLE", "RTT", "VERSION", "ERROR"],
                peers
                    .iter()
                    .map(|p| {
                        vec![
                            p.name.clone(),
                            p.address.to_string(),
                            if p.reachable { "yes" } else { "no" }.into(),
                            p.rtt_ms
                                .map_or_else(|| "-".into(), |r| format!("{r:.1} ms")),
                            output::opt(p.version.as_ref()),
                            output::opt(p.error.as_ref()),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
    }
}
