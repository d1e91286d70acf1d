//! Quantized weights kept on disk between starts, so that a restart or a new replica reads
//! them instead of quantizing the checkpoint again (seconds of both cores for a 2B model).
//!
//! One file per (checkpoint files, quantization, layout version), named `{slot}-{version}.{quant}`:
//! the slot hashes where the checkpoint lives (its folder; for a hub snapshot, the repository's
//! folder, so every revision shares one slot) and the quantization, the version hashes the
//! weight files' canonical paths, sizes and modification times (hub snapshots point at blobs
//! named by their content hash) and the layout version. A slot keeps one version: writing or
//! reading one deletes the others, so a checkpoint that is updated, re-downloaded or moved to a
//! new revision replaces its cache file instead of adding one (a 2B model's is 2.5 GB). The file
//! is an index followed by each tensor's packed bytes; it is written to a temporary name and
//! renamed, so readers never see half a file.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use memmap2::{Mmap, UncheckedAdvice};
use serde::{Deserialize, Serialize};

use crate::kernels::q8::Q8Weights;
use crate::layers::quant::Quant;

/// Bumped whenever the packed layout or this file format changes.
const FORMAT: &str = "qwen-ocr-q8-cache-v1";
const ALIGN: usize = 64;
/// A temporary file older than this is a crashed writer's, not a concurrent replica's.
const ABANDONED: Duration = Duration::from_secs(3600);

#[derive(Serialize, Deserialize)]
struct Entry {
    name: String,
    n: usize,
    k: usize,
    /// Byte range from the start of the file.
    offset: usize,
    len: usize,
}

#[derive(Serialize, Deserialize)]
struct Index {
    format: String,
    entries: Vec<Entry>,
}

pub struct QuantCache {
    path: PathBuf,
    /// `{slot}-`: the prefix every version of this checkpoint's file shares.
    slot: String,
    stored: Option<(Mmap, HashMap<String, Entry>)>,
    fresh: Mutex<Vec<(String, Arc<Q8Weights>)>>,
}

impl QuantCache {
    /// The cache entry in `dir` for these weight files and `quant`; reads it if it exists.
    pub fn open(dir: &Path, weights: &[PathBuf], quant: Quant) -> Self {
        let mut version = std::collections::hash_map::DefaultHasher::new();
        FORMAT.hash(&mut version);
        for path in weights {
            let path = path.canonicalize().unwrap_or_else(|_| path.clone());
            let meta = std::fs::metadata(&path).ok();
            (path, meta.as_ref().map(|m| m.len()), meta.and_then(|m| m.modified().ok())).hash(&mut version);
        }
        let mut slot = std::collections::hash_map::DefaultHasher::new();
        (weights.first().map(|w| checkpoint_home(w)), quant.as_str()).hash(&mut slot);
        let slot = format!("{:016x}-", slot.finish());
        let path = dir.join(format!("{slot}{:016x}.{}", version.finish(), quant.as_str()));
        let stored = read(&path).map_err(|e| tracing::debug!(path = %path.display(), "no quantized cache: {e}")).ok();
        let cache = Self { path, slot, stored, fresh: Mutex::new(Vec::new()) };
        if cache.hit() {
            cache.prune();
        }
        cache
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the weights came from the file.
    pub fn hit(&self) -> bool {
        self.stored.is_some()
    }

    /// The stored weights of `name`, if the file has them with this shape.
    pub fn get(&self, name: &str, n: usize, k: usize) -> Option<Q8Weights> {
        let (map, index) = self.stored.as_ref()?;
        let e = index.get(name).filter(|e| e.n == n && e.k == k)?;
        let weights = Q8Weights::from_packed(n, k, map.get(e.offset..e.offset + e.len)?);
        // SAFETY: read-only private mapping; the range was copied out above and is not borrowed.
        let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, e.offset, e.len) };
        weights
    }

    /// Remembers weights quantized during this load, for [`QuantCache::save`].
    pub fn record(&self, name: &str, weights: Arc<Q8Weights>) {
        self.fresh.lock().expect("cache lock").push((name.to_string(), weights));
    }

    /// Writes what this load quantized, unless it came from the file already.
    pub fn save(&self) -> std::io::Result<bool> {
        let fresh = std::mem::take(&mut *self.fresh.lock().expect("cache lock"));
        if self.hit() || fresh.is_empty() {
            return Ok(false);
        }
        let mut entries = Vec::with_capacity(fresh.len());
        let mut offset = 0;
        for (name, w) in &fresh {
            let len = w.packed().len();
            entries.push(Entry { name: name.clone(), n: w.n(), k: w.k(), offset, len });
            offset = (offset + len).next_multiple_of(ALIGN);
        }
        // Offsets so far are relative to the data; the header length depends on them, so fix
        // the header's size first (offsets are written with a fixed width).
        let header = |base: usize| -> Vec<u8> {
            let mut index = Index { format: FORMAT.into(), entries: Vec::new() };
            index.entries = entries.iter().map(|e| Entry { name: e.name.clone(), offset: e.offset + base, ..*e }).collect();
            serde_json::to_vec(&index).expect("index serialises")
        };
        let mut base = 16 + header(1 << 40).len();
        base = base.next_multiple_of(ALIGN);
        let index = header(base);
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        // Unique per writer, threads of one process included: two loads of one checkpoint at
        // once each write their own file, and the later rename wins with a whole one.
        static WRITES: AtomicU64 = AtomicU64::new(0);
        let tmp = self.path.with_extension(format!("tmp-{}-{}", std::process::id(), WRITES.fetch_add(1, Ordering::Relaxed)));
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        file.write_all(&(index.len() as u64).to_le_bytes())?;
        file.write_all(&(base as u64).to_le_bytes())?;
        file.write_all(&index)?;
        let mut written = 16 + index.len();
        for ((_, w), e) in fresh.iter().zip(&entries) {
            let at = base + e.offset;
            file.write_all(&vec![0u8; at - written])?;
            file.write_all(w.packed())?;
            written = at + e.len;
        }
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        self.prune();
        Ok(true)
    }

    /// Deletes this slot's other versions, its temporary files abandoned by a crashed writer,
    /// and files named by this module's earlier scheme (`{hash}.{quant}`, never read again).
    /// Failures only leave a file behind.
    fn prune(&self) {
        let (Some(dir), Some(ours)) = (self.path.parent(), self.path.file_name()) else { return };
        let Ok(listing) = std::fs::read_dir(dir) else { return };
        let now = SystemTime::now();
        for entry in listing.flatten() {
            let name = entry.file_name();
            let Some(text) = name.to_str() else { continue };
            let stale = if text.contains(".tmp-") {
                let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| now.duration_since(t).ok());
                text.starts_with(&self.slot) && age.is_some_and(|age| age > ABANDONED)
            } else {
                name != ours && (text.starts_with(&self.slot) || is_legacy_name(text))
            };
            if stale {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => tracing::info!(path = %entry.path().display(), "removed a stale quantized cache file"),
                    Err(e) => tracing::debug!(path = %entry.path().display(), "cannot remove a stale cache file: {e}"),
                }
            }
        }
    }
}

/// The folder that identifies a checkpoint across its versions: the weights' folder, or for a
/// Hugging Face hub snapshot (`models--org--name/snapshots/{revision}/`) the repository's.
fn checkpoint_home(weights: &Path) -> PathBuf {
    let absolute = std::path::absolute(weights).unwrap_or_else(|_| weights.to_path_buf());
    let folder = absolute.parent().unwrap_or(Path::new("")).to_path_buf();
    match folder.parent() {
        Some(snapshots) if snapshots.file_name().is_some_and(|n| n == "snapshots") => snapshots.parent().unwrap_or(snapshots).to_path_buf(),
        _ => folder,
    }
}

/// `{16 hex digits}.{quant}`: the name this cache gave its files before slots.
fn is_legacy_name(name: &str) -> bool {
    name.split_once('.').is_some_and(|(hash, quant)| {
        hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) && [Quant::Q8_0, Quant::Q4K].iter().any(|q| q.as_str() == quant)
    })
}

fn read(path: &Path) -> std::io::Result<(Mmap, HashMap<String, Entry>)> {
    let file = std::fs::File::open(path)?;
    // SAFETY: mapped read-only; cache files are replaced by rename, never rewritten in place.
    let map = unsafe { Mmap::map(&file)? };
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {why}", path.display()));
    let word = |at: usize| -> std::io::Result<usize> {
        Ok(u64::from_le_bytes(map.get(at..at + 8).ok_or_else(|| bad("truncated"))?.try_into().expect("8 bytes")) as usize)
    };
    let len = word(0)?;
    let index: Index =
        serde_json::from_slice(map.get(16..16 + len).ok_or_else(|| bad("truncated index"))?).map_err(|_| bad("bad index"))?;
    if index.format != FORMAT {
        return Err(bad("another format version"));
    }
    if index.entries.iter().any(|e| e.offset + e.len > map.len()) {
        return Err(bad("truncated data"));
    }
    let entries = index.entries.into_iter().map(|e| (e.name.clone(), e)).collect();
    Ok((map, entries))
}
