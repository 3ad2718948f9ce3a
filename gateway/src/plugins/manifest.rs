//! An adapter's manifest (`NAME.toml` beside `NAME.wasm`): what the adapter asks for, and
//! which version of the `ferry:adapter` WIT package it was built against.

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::bindings::{WitVersion, World};
use super::grant::Capability;

/// What an adapter is and asks for. Read only through [`Manifest::load`], which parses
/// the whole file, `wit` included, and returns the WIT version beside it.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    /// The WIT world the component implements.
    pub world: String,
    /// Capabilities the adapter asks for.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
}

/// The file as written: a [`Manifest`] and the WIT package version it names, which is
/// read here and handed to the loader beside the manifest.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    name: String,
    version: String,
    world: String,
    /// Absent in manifests written before versions were named: those adapters were built
    /// against 0.1.0, the only version there was.
    wit: Option<String>,
    #[serde(default)]
    capabilities: Vec<Capability>,
}

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error(transparent)]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Parse(#[from] toml::de::Error),
    #[error(transparent)]
    Name(#[from] crate::names::NameError),
    #[error("world {world:?} is not supported by wit {wit} (this gateway hosts \"runtime-adapter\" and, from 0.2.0, \"service-adapter\")")]
    World { world: String, wit: WitVersion },
    #[error(
        "wit version {wit:?} is not supported; this gateway hosts {}",
        WitVersion::hosted_list()
    )]
    Wit { wit: String },
}

impl Manifest {
    /// Reads and checks a manifest; returns it with the WIT version the adapter was built
    /// against.
    pub fn load(path: &Path) -> Result<(Self, WitVersion), ManifestError> {
        Self::parse(&std::fs::read_to_string(path)?)
    }

    /// The world the manifest names (checked by [`Self::parse`]).
    pub fn world(&self) -> World {
        World::parse(&self.world).unwrap_or_default()
    }

    pub fn parse(text: &str) -> Result<(Self, WitVersion), ManifestError> {
        let f: ManifestFile = toml::from_str(text)?;
        crate::names::validate("plugin", &f.name)?;
        let wit = match f.wit {
            None => WitVersion::V0_1,
            Some(wit) => WitVersion::parse(&wit).ok_or(ManifestError::Wit { wit })?,
        };
        if !World::parse(&f.world).is_some_and(|w| w.exists_in(wit)) {
            return Err(ManifestError::World {
                world: f.world,
                wit,
            });
        }
        let manifest = Manifest {
            name: f.name,
            version: f.version,
            world: f.world,
            capabilities: f.capabilities,
        };
        Ok((manifest, wit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name = "runc"
version = "1.2.0"
world = "runtime-adapter"
capabilities = ["log", "exec"]
"#;

    #[test]
    fn a_manifest_without_wit_was_built_against_0_1_0() {
        let (m, wit) = Manifest::parse(BASE).expect("loads");
        assert_eq!(wit, WitVersion::V0_1);
        assert_eq!(m.name, "runc");
        assert_eq!(m.capabilities, vec![Capability::Log, Capability::Exec]);
    }

    #[test]
    fn a_manifest_names_a_hosted_wit_version() {
        let (_, wit) = Manifest::parse(&format!("wit = \"0.2.0\"\n{BASE}")).expect("loads");
        assert_eq!(wit, WitVersion::V0_2);
        let (_, wit) = Manifest::parse(&format!("wit = \"0.1.0\"\n{BASE}")).expect("loads");
        assert_eq!(wit, WitVersion::V0_1);
    }

    #[test]
    fn an_unknown_wit_version_is_refused_naming_the_hosted_ones() {
        let err = Manifest::parse(&format!("wit = \"9.9.9\"\n{BASE}")).unwrap_err();
        assert!(matches!(err, ManifestError::Wit { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            r#"wit version "9.9.9" is not supported; this gateway hosts 0.1.0, 0.2.0 and 0.3.0"#
        );
    }

    #[test]
    fn an_unknown_world_or_field_is_refused() {
        let err = Manifest::parse(&BASE.replace("runtime-adapter", "other")).unwrap_err();
        assert!(matches!(err, ManifestError::World { .. }), "{err}");
        let err = Manifest::parse(&format!("witt = \"0.2.0\"\n{BASE}")).unwrap_err();
        assert!(matches!(err, ManifestError::Parse(_)), "{err}");
    }
}
