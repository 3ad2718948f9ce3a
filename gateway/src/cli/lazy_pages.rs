//! `ferry lazy-pages` (hidden): Ferry's lazy-pages daemon, which the gateway starts for a
//! post-copy restore (see `criu::lazy`); not a command for people.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args as ClapArgs;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The restore's image directory (its pagemaps; the socket the restore connects to).
    #[arg(long)]
    images: PathBuf,
    /// The gateway's page server for this restore.
    #[arg(long)]
    page_server: SocketAddr,
    /// `cgroup.kill` of the restored tree, written if the daemon cannot finish.
    #[arg(long)]
    kill: Option<PathBuf>,
    /// A descriptor to write one byte to once listening.
    #[arg(long)]
    status_fd: Option<i32>,
}

/// Runs the daemon; its log (for the gateway to quote) is `lazy-pages.log` in the images.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let opts = crate::criu::lazy::Options {
        images: args.images.clone(),
        page_server: args.page_server,
        kill: args.kill.clone(),
        status_fd: args.status_fd,
    };
    let log = args.images.join(crate::criu::layout::LAZY_PAGES_LOG);
    let outcome = crate::criu::lazy::run(&opts);
    let line = match &outcome {
        Ok(s) => format!(
            "Lazy pages transfer finished successfully: {} processes, {} faults, {} pages placed\n",
            s.processes, s.faults, s.copied_pages
        ),
        Err(e) => format!("Error: lazy pages transfer FAILED: {e}\n"),
    };
    let _ = std::fs::write(&log, line);
    outcome?;
    Ok(())
}
