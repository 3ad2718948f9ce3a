//! Command-line interface: argument parsing and dispatch, one file per verb.

mod checkpoint;
mod docs;
mod doctor;
mod gateway;
mod init;
mod lazy_guard;
mod migrate;
mod migration;
mod output;
mod peer;
mod plugin;
mod route;
mod site;
mod timeline;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::api::client::ApiClient;
use crate::config::SiteConfig;
use crate::identity::{Fingerprint, Identity};

pub use output::Output;

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live migration of services between sites"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Output format of read verbs.
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(flatten)]
    connect: Connect,
}

/// How client verbs reach a gateway: a site config supplies all three, flags override.
#[derive(Debug, Clone, clap::Args)]
pub struct Connect {
    /// Site config (site.toml) of the gateway to talk to.
    #[arg(long, global = true, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// API URL, e.g. https://127.0.0.1:7443.
    #[arg(long, global = true, env = "FERRY_API")]
    api: Option<String>,
    /// API bearer token.
    #[arg(long, global = true, env = "FERRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// SHA-256 fingerprint of the gateway's certificate.
    #[arg(long, global = true, env = "FERRY_API_FINGERPRINT")]
    fingerprint: Option<Fingerprint>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a site identity (key + self-signed certificate) and a starter site.toml.
    Init(init::Args),
    /// Run a site's gateway.
    Gateway(gateway::Args),
    /// This site's identity and peers as the gateway sees them.
    Site,
    /// Configure and check peer sites.
    #[command(subcommand)]
    Peer(peer::Cmd),
    /// The site's adapters (WebAssembly plugins).
    #[command(subcommand)]
    Plugin(plugin::Cmd),
    /// Run, list and remove workloads.
    #[command(subcommand)]
    Workload(workload::Cmd),
    /// The site's ingress routes: served here, held, or forwarded to another site.
    #[command(subcommand)]
    Route(route::Cmd),
    /// Move a workload to another site, showing progress until it is done (phase, bytes
    /// sent, rate, ETA); with --output json, one JSON event per line as they come, the last
    /// one (`"event":"end"`) holding the final record.
    Migrate(migrate::Args),
    /// List and inspect migrations.
    #[command(subcommand)]
    Migration(migration::Cmd),
    /// Checkpoint a workload at its site (kept in the site's block store), or list its
    /// checkpoints (`ferry checkpoint ls NAME`).
    Checkpoint(checkpoint::Args),
    /// Restore a workload at this site from one of its checkpoints.
    Restore(checkpoint::RestoreArgs),
    /// Check this site: config and key modes, CRIU and `criu check`, userfaultfd,
    /// fs.pipe-max-size, cgroups, adapters and grants, ports, and (with the gateway
    /// running) each peer.
    Doctor,
    /// Print the completion script for a shell (bash, zsh, fish, elvish, powershell).
    Completions(docs::CompletionsArgs),
    /// Write the manual pages (ferry.1 and one per verb) into a directory.
    Man(docs::ManArgs),
    /// The guard of a post-copy restore's userfaultfds, started by the gateway.
    #[command(hide = true)]
    LazyGuard(lazy_guard::Args),
}

impl Connect {
    /// Builds an API client from flags and/or a site config.
    pub fn client(&self) -> anyhow::Result<ApiClient> {
        let cfg = match &self.config {
            Some(p) => Some(SiteConfig::load(p)?),
            None => None,
        };
        let url = match (&self.api, &cfg) {
            (Some(u), _) => u.clone(),
            (None, Some(c)) => c.api_url(),
            (None, None) => anyhow::bail!(
                "no gateway given: pass --config site.toml (or set FERRY_CONFIG), or --api, --token and --fingerprint"
            ),
        };
        let token = match (&self.token, &cfg) {
            (Some(t), _) => t.clone(),
            (None, Some(c)) => c.api.token.clone(),
            (None, None) => anyhow::bail!("no API token: pass --token or --config"),
        };
        let fingerprint = match (&self.fingerprint, &cfg) {
            (Some(f), _) => *f,
            (None, Some(c)) => Identity::cert_fingerprint(&c.identity.cert)?,
            (None, None) => anyhow::bail!("no gateway fingerprint: pass --fingerprint or --config"),
        };
        ApiClient::new(&url, &token, fingerprint).context("cannot set up the API client")
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The guard is small and runs without the async runtime; so do the generated docs.
    match &cli.command {
        Command::LazyGuard(args) => return lazy_guard::run(args),
        Command::Completions(args) => return finish(docs::completions(args)),
        Command::Man(args) => return finish(docs::man(args)),
        _ => {}
    }
    let is_gateway = matches!(cli.command, Command::Gateway(_));
    init_tracing(
        is_gateway,
        matches!(&cli.command, Command::Gateway(a) if a.log_json),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    finish(runtime.block_on(dispatch(cli)))
}

/// The exit code of a verb's outcome; an error is printed with its causes.
fn finish(outcome: anyhow::Result<()>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(gateway: bool, json: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if gateway { "info" } else { "warn" };
    let filter = EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let out = cli.output;
    match cli.command {
        Command::Init(args) => init::run(args),
        Command::Gateway(args) => gateway::run(args).await,
        Command::Site => site::run(&cli.connect, out).await,
        Command::Peer(cmd) => peer::run(cmd, &cli.connect, out).await,
        Command::Plugin(cmd) => plugin::run(cmd, &cli.connect, out).await,
        Command::Workload(cmd) => workload::run(cmd, &cli.connect, out).await,
        Command::Route(cmd) => route::run(cmd, &cli.connect, out).await,
        Command::Migrate(args) => migrate::run(args, &cli.connect, out).await,
        Command::Migration(cmd) => migration::run(cmd, &cli.connect, out).await,
        Command::Checkpoint(args) => checkpoint::run(args, &cli.connect, out).await,
        Command::Restore(args) => checkpoint::restore(args, &cli.connect, out).await,
        Command::Doctor => doctor::run(&cli.connect, out).await,
        // Handled in main, before the runtime starts.
        Command::LazyGuard(_) | Command::Completions(_) | Command::Man(_) => Ok(()),
    }
}
