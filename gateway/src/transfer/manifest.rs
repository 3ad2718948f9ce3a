//! The image manifest: each file's name, size and BLAKE3 digest as the sender saw them.
//! The destination restores only when what it received matches the manifest exactly.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Checksum of one image file as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMeta {
    pub name: String,
    pub size: u64,
    pub blake3: String,
}

/// Every file of the manifest was received with the same size and digest, and nothing else.
pub fn check(manifest: &[FileMeta], received: &[FileMeta]) -> Result<(), String> {
    let got: BTreeMap<&str, &FileMeta> = received.iter().map(|f| (f.name.as_str(), f)).collect();
    for f in manifest {
        match got.get(f.name.as_str()) {
            None => return Err(format!("{} was never received", f.name)),
            Some(r) if *r != f => return Err(format!("{} differs from the manifest", f.name)),
            Some(_) => {}
        }
    }
    if manifest.len() != received.len() {
        return Err(format!(
            "received {} files, manifest lists {}",
            received.len(),
            manifest.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, size: u64) -> FileMeta {
        FileMeta {
            name: name.into(),
            size,
            blake3: format!("{size:064x}"),
        }
    }

    #[test]
    fn manifest_must_match_what_was_received() {
        let got = vec![f("a", 1), f("b", 2)];
        assert!(check(&[f("b", 2), f("a", 1)], &got).is_ok());
        assert!(check(&[f("a", 1), f("c", 2)], &got)
            .unwrap_err()
            .contains("c was never received"));
        assert!(check(&[f("a", 1), f("b", 3)], &got)
            .unwrap_err()
            .contains("differs"));
        assert!(check(&[f("a", 1)], &got).is_err());
    }
}
