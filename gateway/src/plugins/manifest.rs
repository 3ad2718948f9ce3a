//! An adapter's manifest (`NAME.toml` beside `NAME.wasm`): what the adapter asks for.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::grant::Capability;

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
