//! Capabilities: what a site grants an adapter (`[plugins.grants.NAME]` in site.toml),
//! what the adapter's manifest asks for, and the intersection the host enforces at load
//! and on every call.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::manifest::Manifest;

/// What a site grants one adapter. An adapter gets a capability only if its manifest asks
/// for it too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    /// Programs the adapter may run through `exec` (names looked up on PATH, or paths).
    #[serde(default)]
    pub exec: Vec<String>,
    /// Addresses the adapter may connect to (with the `sockets` capability).
    #[serde(default)]
    pub sockets: Vec<SocketAddr>,
    /// Ports of the migrating workload at the peer site the adapter may open a tunnel to
    /// (with the `tunnel` capability).
    #[serde(default)]
    pub tunnel_ports: Vec<u16>,
    /// Host directories the containers an adapter starts (podman, runc) may bind; none
    /// by default (see `plugins::containers`).
    #[serde(default)]
    pub mounts: Vec<std::path::PathBuf>,
}

/// A host capability an adapter can be granted.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    Log,
    Exec,
    Criu,
    Process,
    /// WASI access to the workload's image and work directories (nothing else).
    Files,
    /// WASI TCP/UDP connections to the granted addresses only.
    Sockets,
    /// Tunnels through the peer link to granted ports of the migrating workload at the
    /// other site.
    Tunnel,
}

impl Capability {
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Log => "log",
            Capability::Exec => "exec",
            Capability::Criu => "criu",
            Capability::Process => "process",
            Capability::Files => "files",
            Capability::Sockets => "sockets",
            Capability::Tunnel => "tunnel",
        }
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an adapter may actually do: asked for by its manifest AND granted by the site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Granted {
    pub capabilities: Vec<Capability>,
    pub exec: Vec<String>,
    #[schema(value_type = Vec<String>)]
    pub sockets: Vec<SocketAddr>,
    pub tunnel_ports: Vec<u16>,
    #[schema(value_type = Vec<String>)]
    pub mounts: Vec<std::path::PathBuf>,
}

impl Granted {
    pub fn intersect(manifest: &Manifest, grant: Option<&Grant>) -> Self {
        let Some(grant) = grant else {
            return Self::default();
        };
        let mut capabilities: Vec<Capability> = manifest
            .capabilities
            .iter()
            .copied()
            .filter(|c| grant.capabilities.contains(c))
            .collect();
        capabilities.sort();
        capabilities.dedup();
        let (exec, mounts) = if capabilities.contains(&Capability::Exec) {
            (grant.exec.clone(), grant.mounts.clone())
        } else {
            (Vec::new(), Vec::new())
        };
        let sockets = if capabilities.contains(&Capability::Sockets) {
            grant.sockets.clone()
        } else {
            Vec::new()
        };
        let tunnel_ports = if capabilities.contains(&Capability::Tunnel) {
            grant.tunnel_ports.clone()
        } else {
            Vec::new()
        };
        Self {
            capabilities,
            exec,
            sockets,
            tunnel_ports,
            mounts,
        }
    }

    pub fn allows(&self, c: Capability) -> bool {
        self.capabilities.contains(&c)
    }

    /// May the adapter open a tunnel to `port` of the workload at the peer site?
    pub fn allows_tunnel(&self, port: u16) -> bool {
        self.allows(Capability::Tunnel) && self.tunnel_ports.contains(&port)
    }

    /// May the adapter run `program`? Only exact allow-list entries (a bare name or a path).
    pub fn allows_program(&self, program: &str) -> bool {
        self.allows(Capability::Exec) && self.exec.iter().any(|p| p == program)
    }
}

/// Environment variables an adapter may not set for a program it runs: they change which
/// code the program loads or how its shell and C library behave (`LD_PRELOAD`, `PATH`,
/// `GLIBC_TUNABLES`…), so an allow-listed program would run something else; or which
/// engine and configuration a container CLI talks to (`DOCKER_HOST=ssh://…`,
/// `DOCKER_CONFIG`, `CONTAINER_HOST`, `CONTAINERS_CONF`), which the argument checks of
/// `plugins::containers` cannot see.
pub fn env_refused(name: &str) -> bool {
    const REFUSED: [&str; 10] = [
        "PATH",
        "GCONV_PATH",
        "GLIBC_TUNABLES",
        "LOCPATH",
        "NLSPATH",
        "HOSTALIASES",
        "BASH_ENV",
        "ENV",
        "IFS",
        "SHELLOPTS",
    ];
    const PREFIXES: [&str; 5] = ["LD_", "MALLOC_", "DOCKER_", "CONTAINER_", "CONTAINERS_"];
    PREFIXES.iter().any(|p| name.starts_with(p)) || REFUSED.contains(&name)
}

/// How an interface of the `ferry:adapter` package maps to a capability: `None` if the
/// import is not Ferry's, `Some(None)` for Ferry interfaces anyone may import (types).
pub fn capability_of(import: &str) -> Option<Option<Capability>> {
    let iface = import.strip_prefix("ferry:adapter/")?;
    let iface = iface.split('@').next().unwrap_or(iface);
    Some(match iface {
        "log" => Some(Capability::Log),
        // `lazy.start-dump` runs a program like `exec`, from the same allow-list.
        "exec" | "lazy" => Some(Capability::Exec),
        "criu" => Some(Capability::Criu),
        "process" => Some(Capability::Process),
        "tunnel" => Some(Capability::Tunnel),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(caps: &[Capability]) -> Manifest {
        Manifest {
            name: "x".into(),
            version: "1".into(),
            world: super::super::World::Runtime.as_str().into(),
            capabilities: caps.to_vec(),
        }
    }

    #[test]
    fn imports_map_to_capabilities() {
        assert_eq!(
            capability_of("ferry:adapter/exec@0.1.0"),
            Some(Some(Capability::Exec))
        );
        assert_eq!(
            capability_of("ferry:adapter/lazy@0.3.0"),
            Some(Some(Capability::Exec))
        );
        assert_eq!(capability_of("ferry:adapter/types@0.1.0"), Some(None));
        assert_eq!(capability_of("wasi:cli/environment@0.2.6"), None);
    }

    #[test]
    fn a_capability_needs_both_the_ask_and_the_grant() {
        let m = manifest(&[Capability::Log, Capability::Exec, Capability::Criu]);
        let g = Grant {
            capabilities: vec![Capability::Log, Capability::Process, Capability::Criu],
            exec: vec!["runc".into()],
            sockets: Vec::new(),
            tunnel_ports: Vec::new(),
            mounts: Vec::new(),
        };
        let got = Granted::intersect(&m, Some(&g));
        assert_eq!(got.capabilities, vec![Capability::Log, Capability::Criu]);
        assert!(!got.allows(Capability::Process), "granted but not asked");
        assert!(!got.allows(Capability::Exec), "asked but not granted");
        assert!(
            !got.allows_program("runc"),
            "exec list needs the exec capability"
        );
        assert_eq!(Granted::intersect(&m, None), Granted::default());
    }

    #[test]
    fn no_adapter_sets_what_changes_the_code_a_program_runs() {
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "PATH",
            "GLIBC_TUNABLES",
            "BASH_ENV",
            "DOCKER_HOST",
            "DOCKER_CONFIG",
            "DOCKER_CONTEXT",
            "CONTAINER_HOST",
            "CONTAINERS_CONF",
        ] {
            assert!(env_refused(name), "{name}");
        }
        for name in ["HOME", "XDG_RUNTIME_DIR", "REDIS_PORT", "LANG"] {
            assert!(!env_refused(name), "{name}");
        }
    }

    #[test]
    fn programs_must_be_listed_exactly() {
        let m = manifest(&[Capability::Exec]);
        let g = Grant {
            capabilities: vec![Capability::Exec],
            exec: vec!["runc".into()],
            sockets: Vec::new(),
            tunnel_ports: Vec::new(),
            mounts: Vec::new(),
        };
        let got = Granted::intersect(&m, Some(&g));
        assert!(got.allows_program("runc"));
        assert!(!got.allows_program("/usr/sbin/runc"));
        assert!(!got.allows_program("sh"));
    }
}
