//! The image manifest: each file's name, size and BLAKE3 digest as the sender saw them.
//! The destination restores only when what it received matches the manifest exactly, and
//! what its disk holds right before the restore still does.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Checksum of one image file as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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

/// Right before a restore: every file of `manifest` in `dir` still has its size and
/// digest (a byte changed at rest since it arrived is caught here, not by the restored
/// workload), and is on disk (fsynced, then the directory). Files are hashed and synced
/// on up to two threads at once.
pub fn verify_at_rest(dir: &Path, manifest: &[FileMeta]) -> Result<(), String> {
    let (left, right) = manifest.split_at(manifest.len() / 2);
    std::thread::scope(|s| {
        let other = s.spawn(|| verify_files(dir, left));
        let here = verify_files(dir, right);
        other
            .join()
            .unwrap_or_else(|_| Err("a hashing thread panicked".into()))
            .and(here)
    })?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync the image directory {}: {e}", dir.display()))
}

fn verify_files(dir: &Path, files: &[FileMeta]) -> Result<(), String> {
    for f in files {
        let path = dir.join(&f.name);
        let (size, digest) = digest_of(&path).map_err(|e| format!("{}: {e}", f.name))?;
        if size != f.size || digest != f.blake3 {
            return Err(format!(
                "{} changed on disk since it arrived ({size} bytes, digest {digest}; the manifest says {} bytes, {})",
                f.name, f.size, f.blake3
            ));
        }
    }
    Ok(())
}

/// A file's size and BLAKE3 digest (hex), once its data is on disk.
fn digest_of(path: &Path) -> std::io::Result<(u64, String)> {
    let mut hasher = blake3::Hasher::new();
    let mut file = std::fs::File::open(path)?;
    let size = std::io::copy(&mut file, &mut hasher)?;
    file.sync_data()?;
    Ok((size, hasher.finalize().to_hex().to_string()))
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

    #[test]
    fn a_byte_changed_at_rest_is_caught() {
        let dir = std::env::temp_dir().join(format!("ferry-manifest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut manifest = Vec::new();
        for (name, len) in [
            ("pages-1.img", 3 << 20),
            ("core-1.img", 100),
            ("mm-1.img", 7),
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            std::fs::write(dir.join(name), &bytes).expect("write");
            manifest.push(FileMeta {
                name: name.into(),
                size: len as u64,
                blake3: blake3::hash(&bytes).to_hex().to_string(),
            });
        }
        assert!(verify_at_rest(&dir, &manifest).is_ok());
        let path = dir.join("pages-1.img");
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[2 << 20] ^= 1;
        std::fs::write(&path, bytes).expect("write");
        let err = verify_at_rest(&dir, &manifest).unwrap_err();
        assert!(err.contains("pages-1.img changed on disk"), "{err}");
        std::fs::remove_file(dir.join("mm-1.img")).expect("rm");
        assert!(verify_at_rest(&dir, &manifest).is_err(), "a missing file");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
