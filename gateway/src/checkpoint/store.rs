//! Content-addressed block store for checkpoint images. A file is cut into blocks (4 KiB
//! for CRIU's page images, where memory changes page by page, 1 MiB for the rest), each
//! named by its BLAKE3 digest; a block the store already holds is not stored again, so
//! checkpoints of one workload share what did not change between them.
//!
//! On disk: one pack per `put` batch (`packs/ID.pack`, the new blocks back to back) and
//! its index (`packs/ID.idx`: per block its digest, offset and length), written after the
//! pack is synced; a pack without an index is a torn write and is ignored (and removed).
//! The whole index is held in memory. A pack is deleted when no kept file references
//! any of its blocks ([`BlockStore::collect`]).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// A block's BLAKE3 digest.
pub type Digest = [u8; 32];

/// Block size of CRIU page images (`pages-*.img`): one memory page.
pub const PAGE_BLOCK: usize = 4096;
/// Block size of every other file.
pub const FILE_BLOCK: usize = 1 << 20;

/// One entry of an index file: digest, offset and length in its pack.
const INDEX_ENTRY: usize = 32 + 8 + 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("block store I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("block {0} is not in the store (its pack was removed or damaged)")]
    Missing(String),
    #[error("block {digest} read back from {pack} does not match its digest: the pack is damaged")]
    Damaged { digest: String, pack: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file kept in the store: its name, size and blocks (digests, in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    #[serde(with = "digests_hex")]
    pub blocks: Vec<Digest>,
}

/// What a [`BlockStore::put_dir`] stored: the files, and how many bytes were new.
#[derive(Debug, Clone, Default)]
pub struct Put {
    pub files: Vec<StoredFile>,
    pub bytes: u64,
    pub new_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Location {
    pack: u64,
    offset: u64,
    len: u32,
}

pub struct BlockStore {
    dir: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    index: HashMap<Digest, Location>,
    next_pack: u64,
}

impl BlockStore {
    /// Opens (or creates) the store at `dir`, loading every complete pack's index.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let packs = dir.join("packs");
        std::fs::create_dir_all(&packs).map_err(io(&packs))?;
        let mut state = State::default();
        let mut with_index = HashSet::new();
        let entries: Vec<_> = std::fs::read_dir(&packs)
            .map_err(io(&packs))?
            .flatten()
            .map(|e| e.path())
            .collect();
        for path in &entries {
            let Some(id) = pack_id(path, "idx") else {
                continue;
            };
            let bytes = std::fs::read(path).map_err(io(path))?;
            for entry in bytes.chunks_exact(INDEX_ENTRY) {
                let mut digest = [0u8; 32];
                digest.copy_from_slice(&entry[..32]);
                let offset = u64::from_le_bytes(entry[32..40].try_into().unwrap_or_default());
                let len = u32::from_le_bytes(entry[40..44].try_into().unwrap_or_default());
                state.index.entry(digest).or_insert(Location {
                    pack: id,
                    offset,
                    len,
                });
            }
            with_index.insert(id);
            state.next_pack = state.next_pack.max(id + 1);
        }
        for path in &entries {
            if let Some(id) = pack_id(path, "pack") {
                state.next_pack = state.next_pack.max(id + 1);
                if !with_index.contains(&id) {
                    tracing::warn!(pack = %path.display(), "a pack without its index (an interrupted checkpoint) removed");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            state: Mutex::new(state),
        })
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pack_path(&self, id: u64, ext: &str) -> PathBuf {
        self.dir.join("packs").join(format!("{id:016x}.{ext}"))
    }

    /// Where block `digest` is.
    fn locate(&self, digest: &Digest) -> Result<Location, StoreError> {
        self.locked()
            .index
            .get(digest)
            .copied()
            .ok_or_else(|| StoreError::Missing(hex(digest)))
    }

    pub fn has(&self, digest: &Digest) -> bool {
        self.locked().index.contains_key(digest)
    }

    /// Of `digests`, those the store lacks.
    pub fn missing(&self, digests: &[Digest]) -> Vec<Digest> {
        let state = self.locked();
        digests
            .iter()
            .filter(|d| !state.index.contains_key(*d))
            .copied()
            .collect()
    }

    /// One block's bytes, checked against its digest.
    pub fn read_block(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let at = self.locate(digest)?;
        let path = self.pack_path(at.pack, "pack");
        let mut buf = vec![0u8; at.len as usize];
        File::open(&path)
            .and_then(|f| f.read_exact_at(&mut buf, at.offset))
            .map_err(io(&path))?;
        checked(digest, &buf, &path)?;
        Ok(buf)
    }

    /// Many blocks, each pack opened once (None: absent, unreadable, or when `check`,
    /// damaged).
    pub fn read_blocks(&self, digests: &[Digest], check: bool) -> Vec<Option<Vec<u8>>> {
        let at: Vec<Option<Location>> = digests.iter().map(|d| self.locate(d).ok()).collect();
        let mut packs: HashMap<u64, Option<File>> = HashMap::new();
        digests
            .iter()
            .zip(at)
            .map(|(digest, at)| {
                let at = at?;
                let path = self.pack_path(at.pack, "pack");
                let file = packs
                    .entry(at.pack)
                    .or_insert_with(|| File::open(&path).ok())
                    .as_ref()?;
                let mut buf = vec![0u8; at.len as usize];
                file.read_exact_at(&mut buf, at.offset).ok()?;
                if check {
                    checked(digest, &buf, &path).ok()?;
                }
                Some(buf)
            })
            .collect()
    }

    /// A batch of blocks arriving one by one (replication): stored in one pack.
    pub fn batch(&self) -> Result<Batch<'_>, StoreError> {
        Batch::new(self)
    }

    /// Stores every regular file of `dir` (not below it), in name order.
    pub fn put_dir(&self, dir: &Path) -> Result<Put, StoreError> {
        self.put_dir_where(dir, |_| true)
    }

    /// [`Self::put_dir`] for the files whose names `keep` accepts.
    pub fn put_dir_where(
        &self,
        dir: &Path,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Put, StoreError> {
        let mut names: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
            .filter(|(name, _)| keep(name))
            .collect();
        names.sort();
        let mut batch = Batch::new(self)?;
        let mut put = Put::default();
        for (name, path) in names {
            let block = if is_page_image(&name) {
                PAGE_BLOCK
            } else {
                FILE_BLOCK
            };
            let file = batch.add_file(&name, &path, block)?;
            put.bytes += file.size;
            put.files.push(file);
        }
        put.new_bytes = batch.finish()?;
        Ok(put)
    }

    /// Writes `files` into `dir` from their blocks, each block checked against its digest.
    pub fn materialize(&self, files: &[StoredFile], dir: &Path) -> Result<(), StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut packs: HashMap<u64, File> = HashMap::new();
        for f in files {
            self.write_file(f, &dir.join(&f.name), &mut packs)?;
        }
        Ok(())
    }

    /// Writes file `f` at `path` from its blocks (each checked), synced.
    pub fn write_file(
        &self,
        f: &StoredFile,
        path: &Path,
        packs: &mut HashMap<u64, File>,
    ) -> Result<(), StoreError> {
        let mut out = File::create(path).map_err(io(path))?;
        let mut buf = Vec::new();
        for digest in &f.blocks {
            let at = self.locate(digest)?;
            let pack_path = self.pack_path(at.pack, "pack");
            let pack = match packs.entry(at.pack) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(File::open(&pack_path).map_err(io(&pack_path))?)
                }
            };
            buf.resize(at.len as usize, 0);
            pack.read_exact_at(&mut buf, at.offset)
                .map_err(io(&pack_path))?;
            checked(digest, &buf, &pack_path)?;
            out.write_all(&buf).map_err(io(path))?;
        }
        out.sync_data().map_err(io(path))
    }

    /// Removes every pack none of whose blocks `keep` references; returns the bytes freed.
    pub fn collect(&self, keep: &[&StoredFile]) -> Result<u64, StoreError> {
        let live: HashSet<&Digest> = keep.iter().flat_map(|f| f.blocks.iter()).collect();
        let mut state = self.locked();
        let mut used: HashSet<u64> = HashSet::new();
        for (digest, at) in &state.index {
            if live.contains(digest) {
                used.insert(at.pack);
            }
        }
        let dead: HashSet<u64> = state
            .index
            .values()
            .map(|at| at.pack)
            .filter(|p| !used.contains(p))
            .collect();
        let mut freed = 0;
        for pack in &dead {
            let path = self.pack_path(*pack, "pack");
            freed += std::fs::metadata(&path).map_or(0, |m| m.len());
            // The index goes first: a pack without one is dropped at the next open.
            let idx = self.pack_path(*pack, "idx");
            std::fs::remove_file(&idx).map_err(io(&idx))?;
            let _ = std::fs::remove_file(&path);
        }
        state.index.retain(|_, at| !dead.contains(&at.pack));
        Ok(freed)
    }

    /// Bytes of every pack in the store.
    pub fn disk_bytes(&self) -> u64 {
        std::fs::read_dir(self.dir.join("packs")).map_or(0, |d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
    }
}

/// One `put`: new blocks go to one pack, indexed once the pack is on disk.
pub struct Batch<'a> {
    store: &'a BlockStore,
    id: u64,
    pack: Option<File>,
    offset: u64,
    entries: Vec<(Digest, Location)>,
    /// Blocks new in this batch (a block repeated within the batch is stored once).
    fresh: HashSet<Digest>,
}

impl<'a> Batch<'a> {
    fn new(store: &'a BlockStore) -> Result<Self, StoreError> {
        let id = {
            let mut s = store.locked();
            s.next_pack += 1;
            s.next_pack - 1
        };
        Ok(Self {
            store,
            id,
            pack: None,
            offset: 0,
            entries: Vec::new(),
            fresh: HashSet::new(),
        })
    }

    /// Adds one block that arrived with its digest: refused if the bytes do not match,
    /// skipped if the store has it. Whether it was new.
    pub fn add_block(&mut self, digest: Digest, data: &[u8]) -> Result<bool, StoreError> {
        if blake3::hash(data).as_bytes() != &digest {
            return Err(StoreError::Damaged {
                digest: hex(&digest),
                pack: "the incoming batch".into(),
            });
        }
        self.add_hashed(digest, data)
    }

    /// Adds one block whose digest this site just computed from `data`. Whether it was
    /// new.
    pub fn add_hashed(&mut self, digest: Digest, data: &[u8]) -> Result<bool, StoreError> {
        if self.store.has(&digest) || !self.fresh.insert(digest) {
            return Ok(false);
        }
        self.write(digest, data)?;
        Ok(true)
    }

    /// Stores file `path` (as `name`) in blocks of `block` bytes; its record.
    pub fn add_file(
        &mut self,
        name: &str,
        path: &Path,
        block: usize,
    ) -> Result<StoredFile, StoreError> {
        let mut file = File::open(path).map_err(io(path))?;
        let mut buf = vec![0u8; block];
        let mut blocks = Vec::new();
        let mut size = 0u64;
        loop {
            let n = read_full(&mut file, &mut buf).map_err(io(path))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            let data = &buf[..n];
            let digest = *blake3::hash(data).as_bytes();
            if !self.store.has(&digest) && self.fresh.insert(digest) {
                self.write(digest, data)?;
            }
            blocks.push(digest);
            if n < block {
                break;
            }
        }
        Ok(StoredFile {
            name: name.to_string(),
            size,
            block_size: u32::try_from(block).unwrap_or(u32::MAX),
            blocks,
        })
    }

    fn write(&mut self, digest: Digest, data: &[u8]) -> Result<(), StoreError> {
        let path = self.store.pack_path(self.id, "pack");
        if self.pack.is_none() {
            self.pack = Some(File::create(&path).map_err(io(&path))?);
        }
        if let Some(pack) = self.pack.as_mut() {
            pack.write_all(data).map_err(io(&path))?;
        }
        self.entries.push((
            digest,
            Location {
                pack: self.id,
                offset: self.offset,
                len: u32::try_from(data.len()).unwrap_or(u32::MAX),
            },
        ));
        self.offset += data.len() as u64;
        Ok(())
    }

    /// Syncs the pack, writes its index, and makes its blocks known; the new bytes.
    pub fn finish(self) -> Result<u64, StoreError> {
        let Some(pack) = self.pack else { return Ok(0) };
        let path = self.store.pack_path(self.id, "pack");
        pack.sync_all().map_err(io(&path))?;
        let mut idx = Vec::with_capacity(self.entries.len() * INDEX_ENTRY);
        for (digest, at) in &self.entries {
            idx.extend_from_slice(digest);
            idx.extend_from_slice(&at.offset.to_le_bytes());
            idx.extend_from_slice(&at.len.to_le_bytes());
        }
        let final_path = self.store.pack_path(self.id, "idx");
        let tmp = final_path.with_extension("idx.tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&idx).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &final_path).map_err(io(&final_path))?;
        let packs = self.store.dir.join("packs");
        File::open(&packs)
            .and_then(|d| d.sync_all())
            .map_err(io(&packs))?;
        let mut s = self.store.locked();
        for (digest, at) in self.entries {
            s.index.entry(digest).or_insert(at);
        }
        Ok(self.offset)
    }
}

/// A block read back from `pack` must match its digest.
fn checked(digest: &Digest, data: &[u8], pack: &Path) -> Result<(), StoreError> {
    if blake3::hash(data).as_bytes() == digest {
        return Ok(());
    }
    Err(StoreError::Damaged {
        digest: hex(digest),
        pack: pack.display().to_string(),
    })
}

/// Reads until `buf` is full or the file ends; the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn pack_id(path: &Path, ext: &str) -> Option<u64> {
    if path.extension()? != ext {
        return None;
    }
    u64::from_str_radix(path.file_stem()?.to_str()?, 16).ok()
}

/// CRIU's page images, stored page by page.
impl crate::transfer::Held for BlockStore {
    /// Unchecked here: the file they go into is checked whole against the sender's digest
    /// (a damaged block fails that check, and the move rolls back).
    fn blocks(&self, digests: &[[u8; 32]]) -> Vec<Option<Vec<u8>>> {
        self.read_blocks(digests, false)
    }
}

pub fn is_page_image(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

pub fn hex(d: &Digest) -> String {
    blake3::Hash::from_bytes(*d).to_hex().to_string()
}

/// Digests as one hex string (64 characters each): compact in a JSON record.
mod digests_hex {
    use super::Digest;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Digest], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(v.len() * 64);
        for d in v {
            out.push_str(&super::hex(d));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Digest>, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() % 64 != 0 {
            return Err(serde::de::Error::custom(
                "block digests: not a multiple of 64 hex digits",
            ));
        }
        text.as_bytes()
            .chunks(64)
            .map(|c| {
                let s = std::str::from_utf8(c).map_err(serde::de::Error::custom)?;
                blake3::Hash::from_hex(s)
                    .map(|h| *h.as_bytes())
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap_or_default();
        d
    }

    #[test]
    fn a_second_put_stores_only_the_pages_that_changed_and_both_read_back() -> Result<(), StoreError>
    {
        let root = scratch("dedup");
        let store = BlockStore::open(&root.join("store"))?;
        let src = root.join("one");
        std::fs::create_dir_all(&src).map_err(io(&src))?;
        let mut pages: Vec<u8> = (0..256 * PAGE_BLOCK).map(|i| (i / 7 % 251) as u8).collect();
        std::fs::write(src.join("pages-1.img"), &pages).map_err(io(&src))?;
        std::fs::write(src.join("core-1.img"), b"core").map_err(io(&src))?;
        let first = store.put_dir(&src)?;
        assert_eq!(first.bytes, 256 * PAGE_BLOCK as u64 + 4);
        // Two pages change.
        pages[3 * PAGE_BLOCK] ^= 1;
        pages[200 * PAGE_BLOCK + 9] ^= 1;
        std::fs::write(src.join("pages-1.img"), &pages).map_err(io(&src))?;
        let second = store.put_dir(&src)?;
        assert_eq!(
            second.new_bytes,
            2 * PAGE_BLOCK as u64,
            "only the changed pages"
        );
        // Reopened from disk, both read back exactly.
        let store = BlockStore::open(&root.join("store"))?;
        let out = root.join("out");
        store.materialize(&second.files, &out)?;
        assert_eq!(
            std::fs::read(out.join("pages-1.img")).map_err(io(&out))?,
            pages
        );
        assert_eq!(
            std::fs::read(out.join("core-1.img")).map_err(io(&out))?,
            b"core"
        );
        // Keeping only the second: the first pack holds blocks it still uses, so it stays.
        let keep: Vec<&StoredFile> = second.files.iter().collect();
        store.collect(&keep)?;
        store.materialize(&second.files, &root.join("again"))?;
        // Keeping nothing frees everything.
        assert!(store.collect(&[])? > 0);
        assert_eq!(store.disk_bytes(), 0);
        Ok(())
    }

    #[test]
    fn a_damaged_pack_is_caught_on_read() -> Result<(), StoreError> {
        let root = scratch("damage");
        let store = BlockStore::open(&root.join("store"))?;
        let src = root.join("src");
        std::fs::create_dir_all(&src).map_err(io(&src))?;
        std::fs::write(src.join("core-1.img"), b"0123456789").map_err(io(&src))?;
        let put = store.put_dir(&src)?;
        let pack = std::fs::read_dir(root.join("store/packs"))
            .map_err(io(&root))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "pack"))
            .ok_or_else(|| StoreError::Missing("pack".into()))?;
        let mut bytes = std::fs::read(&pack).map_err(io(&pack))?;
        bytes[3] ^= 0xff;
        std::fs::write(&pack, bytes).map_err(io(&pack))?;
        let err = store.materialize(&put.files, &root.join("out"));
        assert!(matches!(err, Err(StoreError::Damaged { .. })), "{err:?}");
        // Asked for many at once, the damaged block and an unknown one are None.
        let asked = [put.files[0].blocks[0], [3u8; 32]];
        assert_eq!(store.read_blocks(&asked, true), vec![None, None]);
        Ok(())
    }

    #[test]
    fn many_blocks_read_at_once_come_back_in_order() -> Result<(), StoreError> {
        let root = scratch("many");
        let store = BlockStore::open(&root.join("store"))?;
        let src = root.join("src");
        std::fs::create_dir_all(&src).map_err(io(&src))?;
        let pages: Vec<u8> = (0..8 * PAGE_BLOCK)
            .map(|i| (i / PAGE_BLOCK * 31 + i % 7) as u8)
            .collect();
        std::fs::write(src.join("pages-1.img"), &pages).map_err(io(&src))?;
        let put = store.put_dir(&src)?;
        let mut asked = put.files[0].blocks.clone();
        asked.reverse();
        asked.push([1u8; 32]);
        let got = store.read_blocks(&asked, true);
        assert_eq!(got.len(), 9);
        for (i, block) in got[..8].iter().enumerate() {
            let page = 7 - i;
            assert_eq!(
                block.as_deref(),
                Some(&pages[page * PAGE_BLOCK..(page + 1) * PAGE_BLOCK])
            );
        }
        assert_eq!(got[8], None);
        Ok(())
    }

    #[test]
    fn digests_round_trip_through_json() {
        let f = StoredFile {
            name: "x".into(),
            size: 1,
            block_size: 4096,
            blocks: vec![[7u8; 32], [9u8; 32]],
        };
        let text = serde_json::to_string(&f).unwrap_or_default();
        let back: Result<StoredFile, _> = serde_json::from_str(&text);
        assert_eq!(back.ok(), Some(f));
    }
}
