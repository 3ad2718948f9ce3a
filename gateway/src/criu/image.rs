//! Reading CRIU image files Ferry needs to understand: the pagemaps, which say where each
//! process's lazy (post-copy) pages are. An image is two magic numbers, then entries, each
//! a little-endian u32 length and a protobuf message; a pagemap's first entry is its head.

use std::path::Path;

use thiserror::Error;

/// Magic of every regular CRIU image.
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// Magic of a pagemap image.
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
/// Pagemap entry flags (criu/include/pagemap.h).
const PE_LAZY: u32 = 1 << 1;
/// The page size of the images this host writes and restores.
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a CRIU pagemap image: {detail}")]
    Format { path: String, detail: String },
}

/// A run of pages of one process: `nr_pages` pages from `vaddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// The process's id inside the dump (its virtual pid: what the page protocol names).
    pub pid: u32,
    pub vaddr: u64,
    pub nr_pages: u64,
}

/// Every lazy page run of every process of a dump, from its `pagemap-<pid>.img` files,
/// in address order per process.
pub fn lazy_runs(images: &Path) -> Result<Vec<PageRun>, ImageError> {
    let read = |path: &Path| ImageError::Read {
        path: path.display().to_string(),
        source: std::io::Error::other("unreadable"),
    };
    let mut runs = Vec::new();
    let entries = std::fs::read_dir(images).map_err(|source| ImageError::Read {
        path: images.display().to_string(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("pagemap-")
            .and_then(|r| r.strip_suffix(".img"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        let bytes = std::fs::read(&path).map_err(|_| read(&path))?;
        let mut mine = parse_pagemap(&bytes)
            .map_err(|detail| ImageError::Format {
                path: path.display().to_string(),
                detail,
            })?
            .into_iter()
            .filter(|e| e.flags & PE_LAZY != 0 && e.nr_pages > 0)
            .map(|e| PageRun {
                pid,
                vaddr: e.vaddr,
                nr_pages: e.nr_pages,
            })
            .collect::<Vec<_>>();
        mine.sort_by_key(|r| r.vaddr);
        runs.extend(mine);
    }
    Ok(runs)
}

/// One pagemap entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct PagemapEntry {
    vaddr: u64,
    nr_pages: u64,
    flags: u32,
}

/// The entries of a pagemap image (its head skipped).
fn parse_pagemap(bytes: &[u8]) -> Result<Vec<PagemapEntry>, String> {
    let u32_at = |at: usize| -> Result<u32, String> {
        bytes
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| format!("truncated at byte {at}"))
    };
    if u32_at(0)? != IMG_COMMON_MAGIC || u32_at(4)? != PAGEMAP_MAGIC {
        return Err("wrong magic".into());
    }
    let mut at = 8;
    let mut out = Vec::new();
    let mut head = true;
    while at < bytes.len() {
        let len = u32_at(at)? as usize;
        let msg = bytes
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| format!("entry at byte {at} runs past the end"))?;
        at += 4 + len;
        if head {
            head = false;
            continue;
        }
        out.push(parse_entry(msg)?);
    }
    Ok(out)
}

/// `pagemap_entry { vaddr = 1; compat_nr_pages = 2; in_parent = 3; flags = 4; nr_pages = 5 }`
/// (images/pagemap.proto); absent flags mean present pages, absent nr_pages the compat one.
fn parse_entry(msg: &[u8]) -> Result<PagemapEntry, String> {
    let mut e = PagemapEntry::default();
    let (mut compat, mut flags, mut nr) = (0u64, None, None);
    let mut at = 0;
    while at < msg.len() {
        let (key, n) = varint(&msg[at..])?;
        at += n;
        let (field, wire) = (key >> 3, key & 7);
        if wire != 0 {
            return Err(format!("unexpected wire type {wire} for field {field}"));
        }
        let (value, n) = varint(&msg[at..])?;
        at += n;
        match field {
            1 => e.vaddr = value,
            2 => compat = value,
            4 => flags = Some(u32::try_from(value).map_err(|_| "flags overflow")?),
            5 => nr = Some(value),
            _ => {}
        }
    }
    e.nr_pages = nr.unwrap_or(compat);
    e.flags = flags.unwrap_or(1 << 2);
    Ok(e)
}

/// A protobuf base-128 varint and its length.
fn varint(bytes: &[u8]) -> Result<(u64, usize), String> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err("bad varint".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start of a real lazy dump's pagemap-1.img (CRIU 4.2.1).
    const REAL: &[u8] = &[
        0x19, 0x43, 0x56, 0x54, 0x25, 0x40, 0x08, 0x56, 0x02, 0x00, 0x00, 0x00, 0x08, 0x01, 0x0e,
        0x00, 0x00, 0x00, 0x08, 0x80, 0x80, 0xa3, 0xab, 0x88, 0xaf, 0x15, 0x10, 0x00, 0x20, 0x04,
        0x28, 0x01, 0x0f, 0x00, 0x00, 0x00, 0x08, 0x80, 0xc0, 0xed, 0x89, 0x8a, 0xaf, 0x15, 0x10,
        0x00, 0x20, 0x02, 0x28, 0x82, 0x03,
    ];

    #[test]
    fn a_real_pagemap_parses_with_its_lazy_runs() {
        let entries = parse_pagemap(REAL).expect("parses");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].flags, 4, "present");
        assert_eq!(entries[0].nr_pages, 1);
        assert_eq!(entries[0].vaddr % PAGE_SIZE, 0);
        assert_eq!(entries[1].flags, PE_LAZY);
        assert_eq!(entries[1].nr_pages, 386);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(parse_pagemap(&[1, 2, 3]).is_err());
        let mut bad = REAL.to_vec();
        bad.truncate(20);
        assert!(parse_pagemap(&bad).is_err());
    }
}
