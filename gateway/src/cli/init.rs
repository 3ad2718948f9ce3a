//! `ferry init`: create a site's identity and a starter configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::config::{
    ApiConfig, CriuConfig, IdentityConfig, PeerListenConfig, PluginsConfig, SiteConfig,
    WorkloadConfig,
};
use crate::identity::Identity;
use crate::names;
use crate::plugins::{Capability, Grant};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The site's name (a-z, 0-9, '-').
    #[arg(long)]
    name: String,
    /// Directory for site.toml, the key and the certificate.
    #[arg(long)]
    dir: PathBuf,
    /// HTTPS listen address of the REST API.
    #[arg(long, default_value = "127.0.0.1:7443")]
    api_listen: SocketAddr,
    /// UDP listen address of the QUIC peer link.
    #[arg(long, default_value = "0.0.0.0:7444")]
    peer_listen: SocketAddr,
    /// Data directory (journal, images, logs); default DIR/data.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A program workloads started through the API may run (repeatable); none: the
    /// API starts nothing until `[api] allowed_commands` in site.toml lists some.
    #[arg(long = "allow-command", value_name = "PROGRAM")]
    allow_commands: Vec<String>,
    /// Overwrite an existing identity and config.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    names::validate("site", &args.name)?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let config_path = args.dir.join("site.toml");
    if config_path.exists() && !args.force {
        bail!(
            "{} already exists; pass --force to replace the site's identity and config",
            config_path.display()
        );
    }
    let cert = args.dir.join("cert.pem");
    let key = args.dir.join("key.pem");
    let identity = Identity::generate(&args.name, &cert, &key)?;
    let cfg = SiteConfig {
        name: args.name.clone(),
        data_dir: args.data_dir.unwrap_or_else(|| PathBuf::from("data")),
        identity: IdentityConfig {
            cert: PathBuf::from("cert.pem"),
            key: PathBuf::from("key.pem"),
        },
        api: ApiConfig {
            listen: args.api_listen,
            token: new_token()?,
            allowed_commands: Some(args.allow_commands.clone()),
        },
        peer: PeerListenConfig::on(args.peer_listen),
        peers: Vec::new(),
        workloads: WorkloadConfig::default(),
        criu: CriuConfig::default(),
        ingress: Default::default(),
        migration: Default::default(),
        hooks: Default::default(),
        plugins: PluginsConfig {
            grants: default_grants(),
            ..PluginsConfig::default()
        },
    };
    cfg.save(&config_path)?;
    println!("site        {}", args.name);
    println!("config      {}", config_path.display());
    println!("fingerprint {}", identity.fingerprint());
    println!();
    println!("Give the fingerprint to each peer site; add peers here with");
    println!(
        "  ferry peer add --config {} NAME ADDRESS:PORT FINGERPRINT",
        config_path.display()
    );
    Ok(())
}

/// Grants for the adapters Ferry ships; operators edit them in site.toml.
fn default_grants() -> std::collections::BTreeMap<String, Grant> {
    use Capability::*;
    let grant = |caps: &[Capability], exec: &[&str]| Grant {
        capabilities: caps.to_vec(),
        exec: exec.iter().map(std::string::ToString::to_string).collect(),
        sockets: Vec::new(),
        tunnel_ports: Vec::new(),
        mounts: Vec::new(),
    };
    let redis = Grant {
        tunnel_ports: vec![6379],
        sockets: vec![std::net::SocketAddr::from(([127, 0, 0, 1], 6379))],
        ..grant(
            &[Log, Exec, Tunnel, Sockets],
            &["redis-cli", "redis-server"],
        )
    };
    let postgres = Grant {
        tunnel_ports: vec![5432],
        ..grant(&[Log, Exec, Tunnel, Files], &["psql", "pg_dump"])
    };
    [
        ("process", grant(&[Log, Criu, Process], &[])),
        ("runc", grant(&[Log, Exec], &["runc"])),
        ("podman", grant(&[Log, Exec, Files], &["podman"])),
        // `cp` places a received checkpoint where Docker restores from (the one shape
        // `plugins::containers` lets through).
        ("docker", grant(&[Log, Exec, Files], &["docker", "cp"])),
        ("redis", redis),
        ("postgres", postgres),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn new_token() -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no system randomness for the API token"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(dir: &std::path::Path, allow: &[&str]) -> SiteConfig {
        run(Args {
            name: "edge".into(),
            dir: dir.to_path_buf(),
            api_listen: "127.0.0.1:7443".parse().expect("addr"),
            peer_listen: "0.0.0.0:7444".parse().expect("addr"),
            data_dir: None,
            allow_commands: allow.iter().map(ToString::to_string).collect(),
            force: true,
        })
        .expect("init");
        SiteConfig::load(&dir.join("site.toml")).expect("load")
    }

    #[test]
    fn a_new_site_starts_only_the_programs_it_was_told_through_its_api() {
        let dir = std::env::temp_dir().join(format!("ferry-init-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(init(&dir, &[]).api.allowed_commands, Some(Vec::new()));
        assert_eq!(
            init(&dir, &["redis-server"]).api.allowed_commands,
            Some(vec!["redis-server".to_string()])
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
