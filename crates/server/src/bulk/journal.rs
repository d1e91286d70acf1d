//! The results file: one JSON line per image or page, written whole as each finishes, so that a
//! run stopped at any point (a crash, Ctrl-C) leaves only complete lines. Starting again with
//! the same file keeps its `ok` lines, drops the `failed` ones (they are tried again) and any
//! line a crash cut short, and skips what is already `ok`.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::api::extract::BoundingBox;
use crate::api::Usage;

/// One line: an image (`page` null) or a PDF page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub file: String,
    pub page: Option<u32>,
    pub status: Status,
    pub data: Value,
    pub raw: Option<String>,
    pub confidence: Option<Map<String, Value>>,
    pub boxes: Vec<BoundingBox>,
    pub usage: Option<Usage>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// It went through the model (its `error` may still say the text held no JSON).
    Ok,
    /// It could not be processed; `error` says why.
    Failed,
}

impl Line {
    pub fn failed(file: &str, page: Option<u32>, error: impl Into<String>) -> Self {
        Self {
            file: file.to_string(),
            page,
            status: Status::Failed,
            data: Value::Null,
            raw: None,
            confidence: None,
            boxes: Vec::new(),
            usage: None,
            error: Some(error.into()),
        }
    }
}

/// The results file, open for appending.
pub struct Journal {
    file: Mutex<File>,
    /// What earlier runs finished: `(file, page)`.
    done: HashSet<Key>,
}

/// An image (`None`) or a page of a file.
type Key = (String, Option<u32>);

impl Journal {
    /// Opens `path`, keeping the `ok` lines already there (the last line of an item wins) and
    /// dropping the rest; the file is rewritten through a temporary one and a rename, so a
    /// crash here loses nothing either.
    pub fn open(path: &Path) -> Result<Self> {
        let mut kept: Vec<(Key, String)> = Vec::new();
        if path.exists() {
            let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            // A line a crash cut short does not parse, and is dropped.
            let lines: Vec<(Line, &[u8])> =
                text.split(|&b| b == b'\n').filter_map(|raw| serde_json::from_slice::<Line>(raw).ok().map(|line| (line, raw))).collect();
            let last: HashMap<Key, usize> = lines.iter().enumerate().map(|(i, (line, _))| ((line.file.clone(), line.page), i)).collect();
            for (i, (line, raw)) in lines.iter().enumerate() {
                let key = (line.file.clone(), line.page);
                if line.status == Status::Ok && last[&key] == i {
                    kept.push((key, String::from_utf8_lossy(raw).into_owned()));
                }
            }
            let temporary = sibling(path, ".partial");
            let mut compacted = String::new();
            for (_, line) in &kept {
                compacted.push_str(line);
                compacted.push('\n');
            }
            std::fs::write(&temporary, compacted).with_context(|| format!("writing {}", temporary.display()))?;
            std::fs::rename(&temporary, path).with_context(|| format!("replacing {}", path.display()))?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file: Mutex::new(file), done: kept.into_iter().map(|(key, _)| key).collect() })
    }

    /// Whether an earlier run read this image or page.
    pub fn is_done(&self, file: &str, page: Option<u32>) -> bool {
        self.done.contains(&(file.to_string(), page))
    }

    /// Appends one line with a single write.
    pub fn write(&self, line: &Line) -> Result<()> {
        let mut text = serde_json::to_vec(line)?;
        text.push(b'\n');
        let mut file = self.file.lock().expect("journal lock");
        file.write_all(&text)?;
        file.flush()?;
        Ok(())
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(file: &str, page: Option<u32>) -> Line {
        Line { status: Status::Ok, error: None, ..Line::failed(file, page, "") }
    }

    #[test]
    fn reopening_keeps_ok_lines_and_drops_failed_and_torn_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let journal = Journal::open(&path).unwrap();
        journal.write(&ok("a.png", None)).unwrap();
        journal.write(&Line::failed("b.pdf", Some(1), "render failed")).unwrap();
        journal.write(&ok("b.pdf", Some(2))).unwrap();
        journal.write(&Line::failed("c.png", None, "corrupt")).unwrap();
        journal.write(&ok("c.png", None)).unwrap(); // a retry that worked: the last line wins
        drop(journal);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"file\": \"d.png\", \"page\": null, \"sta"); // a crash mid-line
        std::fs::write(&path, text).unwrap();

        let journal = Journal::open(&path).unwrap();
        assert!(journal.is_done("a.png", None) && journal.is_done("b.pdf", Some(2)) && journal.is_done("c.png", None));
        assert!(!journal.is_done("b.pdf", Some(1)) && !journal.is_done("d.png", None));
        let lines: Vec<Line> = std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines, [ok("a.png", None), ok("b.pdf", Some(2)), ok("c.png", None)]);
        assert!(!sibling(&path, ".partial").exists());
    }
}
