//! An adapter's manifest (`NAME.toml` beside `NAME.wasm`): what the adapter asks for.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{Capability, Grant};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    /// The WIT world the component implements.
    pub world: String,
    /// Capabilities the adapter asks for.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
}

/// The only world this gateway hosts.
pub const WORLD: &str = "runtime-adapter";

impl Manifest {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let m: Manifest = toml::from_str(&text).map_err(|e| e.to_string())?;
        crate::names::validate("plugin", &m.name).map_err(|e| e.to_string())?;
        if m.world != WORLD {
            return Err(format!(
                "world {:?} is not supported (this gateway hosts {WORLD:?})",
                m.world
            ));
        }
        Ok(m)
    }
}

/// What an adapter may actually do: asked for by its manifest AND granted by the site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Granted {
    pub capabilities: Vec<Capability>,
    pub exec: Vec<String>,
    pub sockets: Vec<std::net::SocketAddr>,
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
        let exec = if capabilities.contains(&Capability::Exec) {
            grant.exec.clone()
        } else {
            Vec::new()
        };
        let sockets = if capabilities.contains(&Capability::Sockets) {
            grant.sockets.clone()
        } else {
            Vec::new()
        };
        Self {
            capabilities,
            exec,
            sockets,
        }
    }

    pub fn allows(&self, c: Capability) -> bool {
        self.capabilities.contains(&c)
    }

    /// May the adapter run `program`? Only exact allow-list entries (a bare name or a path).
    pub fn allows_program(&self, program: &str) -> bool {
        self.allows(Capability::Exec) && self.exec.iter().any(|p| p == program)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(caps: &[Capability]) -> Manifest {
        Manifest {
            name: "x".into(),
            version: "1".into(),
            world: WORLD.into(),
            capabilities: caps.to_vec(),
        }
    }

    #[test]
    fn a_capability_needs_both_the_ask_and_the_grant() {
        let m = manifest(&[Capability::Log, Capability::Exec, Capability::Criu]);
        let g = Grant {
            capabilities: vec![Capability::Log, Capability::Process, Capability::Criu],
            exec: vec!["runc".into()],
            sockets: Vec::new(),
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
    fn programs_must_be_listed_exactly() {
        let m = manifest(&[Capability::Exec]);
        let g = Grant {
            capabilities: vec![Capability::Exec],
            exec: vec!["runc".into()],
            sockets: Vec::new(),
        };
        let got = Granted::intersect(&m, Some(&g));
        assert!(got.allows_program("runc"));
        assert!(!got.allows_program("/usr/sbin/runc"));
        assert!(!got.allows_program("sh"));
    }
}
