//! `ferry gateway`: run a site's gateway until SIGINT/SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::SiteConfig;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The site's configuration.
    #[arg(long, env = "FERRY_CONFIG")]
    config: PathBuf,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let cfg = SiteConfig::load(&args.config)?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        on_signal.cancel();
    });
    crate::gateway::run(cfg, cancel)
        .await
        .with_context(|| format!("gateway for {} stopped", args.config.display()))
}
