//! Volumes: the directories a workload keeps state in (`workload run --volume PATH`),
//! moved with it by a migration in the site's content-addressed blocks. The source stores
//! every file of its volumes and sends the destination the blocks it lacks while the
//! workload runs (the pre-copy); once it is frozen, a second pass re-reads only the files
//! whose size, mtime or inode changed, sends their new blocks (the delta) and then the
//! manifest: each file's path, mode and blocks. Before the restore the destination writes
//! every file at the same path from its blocks (each checked against its BLAKE3 digest;
//! a file already there with the same content is left alone), and removes the volumes'
//! other files. Both sites keep the blocks of the workload's last manifest, so a later
//! move sends only what changed since.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::replicate::{read_packed, refused};
use super::store::{self, Digest, StoreError, StoredFile};
use super::{blocking, CheckpointError, Checkpoints};
use crate::peer::wire::{Request, Response};
use crate::peer::Body;
use serde::{Deserialize, Serialize};

/// Most files a workload's volumes may hold.
const MAX_FILES: usize = 100_000;

/// One file of a volume, as a manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeFile {
    /// Its absolute path, inside one of the workload's volumes.
    pub path: String,
    /// Its permission bits.
    pub mode: u32,
    pub file: StoredFile,
}

/// A directory of a volume (its root too): the restore gives it the same mode (CRIU
/// checks the mode of a restored process's working directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDir {
    pub path: String,
    pub mode: u32,
}

/// What a migration's volumes hold: every directory and file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub dirs: Vec<VolumeDir>,
    pub files: Vec<VolumeFile>,
}

/// One pass over a workload's volumes, as the migration record shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeSync {
    /// Files in the volumes, and their bytes.
    pub files: u64,
    pub bytes: u64,
    /// Bytes re-read and stored in this pass (new or changed files).
    pub read_bytes: u64,
    /// Bytes of blocks sent (the destination lacked them), and what crossed the link.
    pub sent_bytes: u64,
    pub wire_bytes: u64,
    pub ms: u64,
}

/// What identifies a file's content between passes: size, mtime (s, ns) and inode.
type Signature = (u64, i64, i64, u64);

/// What the last pass saw of each file, so the next one re-reads only the files that
/// changed.
#[derive(Debug, Default)]
pub struct Scan {
    files: HashMap<String, (Signature, VolumeFile)>,
}

/// Every regular file below `root` (symbolic links are not followed), appended to
/// `out`, and every directory from `root` down to `dirs`.
fn walk(root: &Path, out: &mut Vec<PathBuf>, dirs: &mut Vec<PathBuf>) -> Result<(), StoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(root)(e)),
    };
    dirs.push(root.to_path_buf());
    for entry in entries {
        let entry = entry.map_err(io(root))?;
        let ty = entry.file_type().map_err(io(&entry.path()))?;
        if ty.is_dir() {
            walk(&entry.path(), out, dirs)?;
        } else if ty.is_file() {
            out.push(entry.path());
        }
        if out.len() > MAX_FILES {
            return Err(StoreError::Missing(format!(
                "the volumes hold more than {MAX_FILES} files"
            )));
        }
    }
    Ok(())
}

/// Stores the volumes' files that changed since `prev` (all of them the first time).
fn store_volumes(
    store: &store::BlockStore,
    volumes: &[String],
    prev: &HashMap<String, (Signature, VolumeFile)>,
) -> Result<(Manifest, Scan, u64), StoreError> {
    let (mut paths, mut dirs) = (Vec::new(), Vec::new());
    for v in volumes {
        walk(Path::new(v), &mut paths, &mut dirs)?;
    }
    paths.sort();
    let dirs = dirs
        .into_iter()
        .map(|d| {
            let meta = std::fs::symlink_metadata(&d).map_err(|source| StoreError::Io {
                path: d.clone(),
                source,
            })?;
            Ok(VolumeDir {
                path: d.display().to_string(),
                mode: meta.permissions().mode() & 0o7777,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let mut batch = store.batch()?;
    let mut next = Scan::default();
    let mut files = Vec::with_capacity(paths.len());
    let mut read = 0;
    for p in paths {
        let meta = std::fs::symlink_metadata(&p).map_err(|source| StoreError::Io {
            path: p.clone(),
            source,
        })?;
        let key = p.display().to_string();
        let sig = signature(&meta);
        let vf = match prev.get(&key) {
            Some((seen, vf)) if *seen == sig => vf.clone(),
            _ => {
                read += meta.len();
                VolumeFile {
                    path: key.clone(),
                    mode: meta.permissions().mode() & 0o7777,
                    file: batch.add_file(&key, &p, store::FILE_BLOCK)?,
                }
            }
        };
        next.files.insert(key, (sig, vf.clone()));
        files.push(vf);
    }
    batch.finish()?;
    Ok((Manifest { dirs, files }, next, read))
}

/// Is the file at `path` already `f` (same size, same blocks)?
fn holds(path: &Path, f: &StoredFile) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if meta.len() != f.size {
        return false;
    }
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let mut buf = vec![0u8; f.block_size as usize];
    for digest in &f.blocks {
        let mut n = 0;
        while n < buf.len() {
            match std::io::Read::read(&mut file, &mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(_) => return false,
            }
        }
        if blake3::hash(&buf[..n]).as_bytes() != digest {
            return false;
        }
    }
    true
}

/// Files this site wrote for a migration (during its pre-copy): what each was written from,
/// and how it looked right after, so a later pass skips it unread if nothing touched it.
pub type Placed = HashMap<String, (Signature, StoredFile)>;

fn signature(meta: &std::fs::Metadata) -> Signature {
    (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino())
}

/// Writes `files` at their paths (unless already there, or placed by this site and
/// untouched since), removes the other files of `volumes`; the bytes written.
fn place(
    store: &store::BlockStore,
    migration: &str,
    volumes: &[String],
    manifest: &Manifest,
    placed: &mut Placed,
) -> Result<u64, StoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    for d in &manifest.dirs {
        let path = Path::new(&d.path);
        std::fs::create_dir_all(path).map_err(io(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(d.mode))
            .map_err(io(path))?;
    }
    let files = &manifest.files;
    let mut packs = HashMap::new();
    let mut written = 0;
    for vf in files {
        let path = Path::new(&vf.path);
        let untouched = placed.get(&vf.path).is_some_and(|(sig, f)| {
            f == &vf.file && std::fs::symlink_metadata(path).is_ok_and(|m| signature(&m) == *sig)
        });
        if untouched || holds(path, &vf.file) {
            continue;
        }
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let tmp = dir.join(format!(".ferry-{migration}.tmp"));
        store.write_file(&vf.file, &tmp, &mut packs)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(vf.mode))
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            placed.insert(vf.path.clone(), (signature(&meta), vf.file.clone()));
        }
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        written += vf.file.size;
    }
    let listed: HashSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
    let (mut present, mut dirs) = (Vec::new(), Vec::new());
    for v in volumes {
        walk(Path::new(v), &mut present, &mut dirs)?;
    }
    for p in present {
        if !listed.contains(p.display().to_string().as_str()) {
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
    }
    Ok(written)
}

/// What a `Volumes` request names.
pub struct VolumesAsk<'a> {
    pub workload: &'a str,
    pub migration: &'a str,
    pub size: u64,
    /// The pre-copy's manifest (placed at once), or the final one (placed at the restore).
    pub precopy: bool,
}

/// A migration's volumes at the destination: what the pre-copy placed, and the final
/// manifest once it arrived.
#[derive(Debug)]
pub struct Incoming {
    workload: String,
    manifest: Option<Manifest>,
    placed: Placed,
}

/// Is every path of `manifest` inside one of `volumes` (files below a root, directories
/// below or at one)?
fn check_within(volumes: &[String], manifest: &Manifest) -> Result<(), String> {
    let within = |p: &str, strictly: bool| {
        volumes
            .iter()
            .any(|v| Path::new(p).starts_with(Path::new(v)) && (!strictly || p != v))
    };
    let outside = manifest
        .dirs
        .iter()
        .map(|d| (&d.path, false))
        .chain(manifest.files.iter().map(|f| (&f.path, true)))
        .find(|(p, strictly)| !within(p, *strictly))
        .map(|(p, _)| p);
    match outside {
        Some(p) => Err(format!(
            "volume path {p} is outside the workload's volumes {volumes:?}"
        )),
        None => Ok(()),
    }
}

impl Checkpoints {
    /// One pass over `workload`'s `volumes`: stores what changed since `scan`, sends
    /// `peer` the blocks it lacks; the manifest and what the pass did.
    pub async fn sync_volumes(
        &self,
        workload: &str,
        volumes: &[String],
        peer: &str,
        scan: &mut Scan,
    ) -> Result<(Manifest, VolumeSync), CheckpointError> {
        let started = Instant::now();
        let (store, vols, prev) = (
            Arc::clone(&self.store),
            volumes.to_vec(),
            std::mem::take(&mut scan.files),
        );
        let (manifest, next, read) = blocking(move || store_volumes(&store, &vols, &prev)).await?;
        *scan = next;
        let files = &manifest.files;
        let digests: Vec<Digest> = files
            .iter()
            .flat_map(|f| f.file.blocks.iter().copied())
            .collect();
        let sent = self.send_missing(peer, workload, &digests).await?;
        self.pin(workload, files);
        let sync = VolumeSync {
            files: files.len() as u64,
            bytes: files.iter().map(|f| f.file.size).sum(),
            read_bytes: read,
            sent_bytes: sent.bytes,
            wire_bytes: sent.wire_bytes,
            ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        tracing::info!(
            workload,
            peer,
            files = sync.files,
            bytes = sync.bytes,
            read_bytes = sync.read_bytes,
            sent_bytes = sync.sent_bytes,
            wire_bytes = sync.wire_bytes,
            ms = sync.ms,
            "volumes synced"
        );
        Ok((manifest, sync))
    }

    /// Sends `peer` the manifest of migration `migration`'s volumes (their blocks went
    /// before); the bytes on the wire.
    pub async fn send_manifest(
        &self,
        peer: &str,
        workload: &str,
        migration: &str,
        manifest: &Manifest,
        precopy: bool,
    ) -> Result<u64, CheckpointError> {
        self.send_packed(peer, manifest, "the volume manifest", |size| {
            Request::Volumes {
                workload: workload.to_string(),
                migration: migration.to_string(),
                size,
                precopy,
            }
        })
        .await
    }

    /// A peer's volume manifest for one of its migrations, checked (paths, every block
    /// here). The pre-copy's is placed at once, while the workload still runs at the
    /// source (into the volumes of the workload reserved here); the final one is kept
    /// until the migration's restore places it.
    pub(super) async fn receive_volumes(
        &self,
        peer: &str,
        ask: VolumesAsk<'_>,
        body: Body<'_>,
    ) -> Result<Response, String> {
        let VolumesAsk {
            workload,
            migration,
            size,
            precopy,
        } = ask;
        crate::names::validate("workload", workload).map_err(|e| e.to_string())?;
        if migration.is_empty()
            || migration.len() > 64
            || !migration
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!("bad migration id {migration:?}"));
        }
        let manifest: Manifest = read_packed(body, size, "volume manifest").await?;
        let files = &manifest.files;
        if files.len() > MAX_FILES {
            return Err(format!("more than {MAX_FILES} volume files"));
        }
        let paths = files
            .iter()
            .map(|f| &f.path)
            .chain(manifest.dirs.iter().map(|d| &d.path));
        if let Some(bad) = paths.clone().find(|p| !crate::spec::plain_absolute_path(p)) {
            return Err(format!("volume path {bad:?} is not a plain absolute path"));
        }
        if manifest.dirs.len() > MAX_FILES {
            return Err(format!("more than {MAX_FILES} volume directories"));
        }
        let named: Vec<Digest> = files
            .iter()
            .flat_map(|f| f.file.blocks.iter().copied())
            .collect();
        let lacking = self.store.missing(&named);
        if !lacking.is_empty() {
            return Err(format!(
                "{} blocks of the volumes are not here; send them first",
                lacking.len()
            ));
        }
        let blocks = named.len() as u64;
        let bytes = files.iter().map(|f| f.file.size).sum();
        self.pin(workload, files);
        if precopy {
            let volumes = self
                .parts
                .workloads
                .get(workload)
                .map(|w| w.spec.volumes)
                .unwrap_or_default();
            check_within(&volumes, &manifest)?;
            let mut placed = Placed::new();
            let started = Instant::now();
            let (store, id, vols) = (
                Arc::clone(&self.store),
                migration.to_string(),
                volumes.clone(),
            );
            let (written, placed) = blocking(move || {
                place(&store, &id, &vols, &manifest, &mut placed).map(|w| (w, placed))
            })
            .await
            .map_err(|e| e.to_string())?;
            tracing::info!(
                peer,
                workload,
                migration,
                written,
                ms = started.elapsed().as_millis() as u64,
                "volumes placed ahead of the freeze"
            );
            self.locked_staged().insert(
                migration.to_string(),
                Incoming {
                    workload: workload.to_string(),
                    manifest: None,
                    placed,
                },
            );
        } else {
            tracing::info!(
                peer,
                workload,
                migration,
                files = files.len(),
                bytes,
                "volume manifest kept for the restore"
            );
            let mut staged = self.locked_staged();
            let incoming = staged
                .entry(migration.to_string())
                .or_insert_with(|| Incoming {
                    workload: workload.to_string(),
                    manifest: None,
                    placed: Placed::new(),
                });
            if incoming.workload != workload {
                return Err(format!("migration {migration} moves another workload"));
            }
            incoming.manifest = Some(manifest);
        }
        Ok(Response::Kept { blocks, bytes })
    }

    /// Before migration `migration` restores `workload` here: writes its volumes' files
    /// (every path inside one of `volumes`); the bytes written.
    pub async fn place_volumes(
        &self,
        migration: &str,
        workload: &str,
        volumes: &[String],
    ) -> Result<u64, CheckpointError> {
        let staged = self.locked_staged().remove(migration);
        let Some(Incoming {
            manifest: Some(manifest),
            mut placed,
            ..
        }) = staged.filter(|i| i.workload == workload)
        else {
            return Err(refused(format!(
                "no volume manifest arrived for migration {migration}"
            )));
        };
        check_within(volumes, &manifest).map_err(refused)?;
        let (store, migration, volumes) = (
            Arc::clone(&self.store),
            migration.to_string(),
            volumes.to_vec(),
        );
        blocking(move || place(&store, &migration, &volumes, &manifest, &mut placed)).await
    }

    /// Keeps the blocks of `workload`'s newest volume manifest from the next collection.
    fn pin(&self, workload: &str, files: &[VolumeFile]) {
        self.pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                workload.to_string(),
                files.iter().map(|f| f.file.clone()).collect(),
            );
    }

    /// The blocks every pinned volume manifest needs.
    pub(super) fn pinned(&self) -> Vec<StoredFile> {
        self.pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    fn locked_staged(&self) -> std::sync::MutexGuard<'_, HashMap<String, Incoming>> {
        self.staged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_paths_are_plain_and_absolute() {
        use crate::spec::plain_absolute_path as plain;
        assert!(plain("/srv/redis"));
        assert!(!plain("srv/redis"));
        assert!(!plain("/srv/../etc"));
        assert!(!plain("/srv/./x"));
        assert!(!plain("/srv//x"));
        assert!(!plain("/srv/"));
        assert!(!plain("/"));
    }

    #[test]
    fn a_second_pass_rereads_only_changed_files_and_placing_mirrors_the_source() {
        let root = std::env::temp_dir().join(format!("ferry-volume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (src, dst) = (root.join("src"), root.join("dst"));
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("a"), vec![7u8; 3 << 20]).unwrap();
        std::fs::write(src.join("sub/b"), b"bee").unwrap();
        let store = store::BlockStore::open(&root.join("store")).unwrap();
        let vols = vec![src.display().to_string()];
        let (first, scan, read) = store_volumes(&store, &vols, &HashMap::new()).unwrap();
        assert_eq!(first.files.len(), 2);
        assert_eq!(first.dirs.len(), 2, "the root and sub/");
        assert_eq!(read, (3 << 20) + 3);
        std::fs::write(src.join("sub/b"), b"bees").unwrap();
        let (second, _, read) = store_volumes(&store, &vols, &scan.files).unwrap();
        assert_eq!(read, 4, "only the changed file is read again");
        assert_ne!(first, second);
        // Placed at another root: the same files, and a stray one removed.
        let moved: Vec<VolumeFile> = second
            .files
            .iter()
            .map(|f| VolumeFile {
                path: f
                    .path
                    .replacen(&src.display().to_string(), &dst.display().to_string(), 1),
                ..f.clone()
            })
            .collect();
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::write(dst.join("stray"), b"x").unwrap();
        let moved = Manifest {
            dirs: vec![VolumeDir {
                path: dst.display().to_string(),
                mode: 0o750,
            }],
            files: moved,
        };
        let mut placed = Placed::new();
        let written = place(
            &store,
            "m1",
            &[dst.display().to_string()],
            &moved,
            &mut placed,
        )
        .unwrap();
        assert_eq!(written, (3 << 20) + 4);
        assert_eq!(std::fs::read(dst.join("sub/b")).unwrap(), b"bees");
        assert_eq!(std::fs::read(dst.join("a")).unwrap().len(), 3 << 20);
        assert!(!dst.join("stray").exists());
        assert_eq!(
            std::fs::metadata(&dst).unwrap().permissions().mode() & 0o7777,
            0o750
        );
        // Placed again: nothing to write, the content is there.
        assert_eq!(
            place(
                &store,
                "m2",
                &[dst.display().to_string()],
                &moved,
                &mut placed
            )
            .unwrap(),
            0
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
