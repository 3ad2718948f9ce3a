//! Durable record of the gateway's state: one JSON document per workload and per
//! migration, each replaced atomically (write, fsync, rename, fsync the directory) before
//! the step it describes is acted on, so a restarted gateway knows exactly where it was.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("journal I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal record {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Which collection a record belongs to.
#[derive(Debug, Clone, Copy)]
pub enum Collection {
    Workloads,
    Migrations,
    Checkpoints,
}

impl Collection {
    fn dir(self) -> &'static str {
        match self {
            Collection::Workloads => "workloads",
            Collection::Migrations => "migrations",
            Collection::Checkpoints => "checkpoints",
        }
    }
}

#[derive(Debug)]
pub struct Journal {
    root: PathBuf,
    /// The generation as last read or written (only this journal writes it).
    generation: std::sync::atomic::AtomicU64,
}

/// The file holding the journal's generation: a counter advanced (durably) each time the
/// site takes in a migration, so a journal that went back in time (lost, or an old copy
/// put back) shows a lower number than one a peer was told.
const GENERATION: &str = "generation";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Journal {
    pub fn open(data_dir: &Path) -> Result<Self, JournalError> {
        let root = data_dir.join("journal");
        for c in [
            Collection::Workloads,
            Collection::Migrations,
            Collection::Checkpoints,
        ] {
            let d = root.join(c.dir());
            fs::create_dir_all(&d).map_err(io(&d))?;
        }
        let generation = fs::read_to_string(root.join(GENERATION))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        Ok(Self {
            root,
            generation: generation.into(),
        })
    }

    /// The journal's generation (0 for a journal that never advanced it).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Durably advances the generation; returns the new one.
    pub fn advance_generation(&self) -> Result<u64, JournalError> {
        let next = self.generation() + 1;
        let path = self.root.join(GENERATION);
        let tmp = self.root.join("generation.tmp");
        {
            let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(next.to_string().as_bytes()).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&self.root)?;
        self.generation
            .store(next, std::sync::atomic::Ordering::SeqCst);
        Ok(next)
    }

    fn path(&self, c: Collection, key: &str) -> PathBuf {
        self.root.join(c.dir()).join(format!("{key}.json"))
    }

    /// Durably replaces the record `key` (keys are validated names or migration ids).
    pub fn put<T: Serialize>(
        &self,
        c: Collection,
        key: &str,
        value: &T,
    ) -> Result<(), JournalError> {
        let path = self.path(c, key);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| JournalError::Corrupt {
            path: path.clone(),
            source,
        })?;
        {
            let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&bytes).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&self.root.join(c.dir()))
    }

    pub fn remove(&self, c: Collection, key: &str) -> Result<(), JournalError> {
        let path = self.path(c, key);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.root.join(c.dir())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Every record of a collection. A corrupt record is an error, not skipped: losing a
    /// migration's state silently could break the one-site invariant.
    pub fn load_all<T: DeserializeOwned>(&self, c: Collection) -> Result<Vec<T>, JournalError> {
        let dir = self.root.join(c.dir());
        let mut out = Vec::new();
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .map_err(io(&dir))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(io(&dir))?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let bytes = fs::read(&path).map_err(io(&path))?;
            let value = serde_json::from_slice(&bytes)
                .map_err(|source| JournalError::Corrupt { path, source })?;
            out.push(value);
        }
        Ok(out)
    }
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Rec {
        id: String,
        phase: u32,
    }

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ferry-journal-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn records_survive_reopen_and_replace_atomically() {
        let dir = tmp();
        let j = Journal::open(&dir).expect("open");
        j.put(
            Collection::Migrations,
            "m1",
            &Rec {
                id: "m1".into(),
                phase: 1,
            },
        )
        .expect("put");
        j.put(
            Collection::Migrations,
            "m1",
            &Rec {
                id: "m1".into(),
                phase: 2,
            },
        )
        .expect("put");
        let j2 = Journal::open(&dir).expect("reopen");
        let all: Vec<Rec> = j2.load_all(Collection::Migrations).expect("load");
        assert_eq!(
            all,
            vec![Rec {
                id: "m1".into(),
                phase: 2
            }]
        );
        j2.remove(Collection::Migrations, "m1").expect("remove");
        assert!(j2
            .load_all::<Rec>(Collection::Migrations)
            .expect("load")
            .is_empty());
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_the_file() {
        let dir = tmp();
        let j = Journal::open(&dir).expect("open");
        fs::write(dir.join("journal/workloads/w.json"), b"{not json").expect("write");
        let err = j
            .load_all::<Rec>(Collection::Workloads)
            .unwrap_err()
            .to_string();
        assert!(err.contains("w.json"), "{err}");
        fs::remove_dir_all(&dir).ok();
    }
}
