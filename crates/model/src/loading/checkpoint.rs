//! Finding a checkpoint's files: a local directory, or a hub id downloaded (and cached) through
//! `hf-hub`, which honours `HF_HOME`, `HF_ENDPOINT` and `HF_TOKEN`. `HF_HUB_OFFLINE=1` reads the
//! cache only and says so when a file is missing.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::read_json;
use crate::error::{Error, Result};

/// The checkpoint `qwen-ocr` serves when none is named.
pub const DEFAULT_MODEL: &str = "Qwen/Qwen2-VL-2B-Instruct";

/// Paths of every file of a checkpoint that we read.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    /// Where the checkpoint came from, for messages and `/v1/models`.
    pub name: String,
    pub config: PathBuf,
    pub generation_config: Option<PathBuf>,
    pub preprocessor_config: Option<PathBuf>,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub chat_template_json: Option<PathBuf>,
    pub chat_template_jinja: Option<PathBuf>,
    pub weights: Vec<PathBuf>,
}

const SINGLE_WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// Where a checkpoint's files come from.
trait FileSource {
    fn get(&self, file: &str) -> Result<Option<PathBuf>>;
}

struct LocalDir(PathBuf);

impl FileSource for LocalDir {
    fn get(&self, file: &str) -> Result<Option<PathBuf>> {
        let path = self.0.join(file);
        Ok(path.is_file().then_some(path))
    }
}

struct Hub {
    repo: hf_hub::api::sync::ApiRepo,
    id: String,
    /// Files the repo lists; absent optional files are not requested.
    listing: Vec<String>,
}

struct HubCache(hf_hub::CacheRepo);

impl FileSource for Hub {
    fn get(&self, file: &str) -> Result<Option<PathBuf>> {
        if !self.listing.iter().any(|f| f == file) {
            return Ok(None);
        }
        self.repo.get(file).map(Some).map_err(|e| Error::Hub { repo: self.id.clone(), file: file.into(), reason: e.to_string() })
    }
}

impl FileSource for HubCache {
    fn get(&self, file: &str) -> Result<Option<PathBuf>> {
        Ok(self.0.get(file))
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").map(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on")).unwrap_or(false)
}

/// Resolves `model` (a directory, else a hub id such as `Qwen/Qwen2-VL-2B-Instruct`, optionally
/// `id@revision`) to its files, downloading what is not cached yet.
pub fn resolve(model: &str) -> Result<CheckpointFiles> {
    let (src, local) = source(model)?;
    collect(model, src.as_ref(), local)
}

/// One optional file of a checkpoint (e.g. `preprocessor_config.json`) without fetching weights.
pub fn resolve_file(model: &str, file: &str) -> Result<Option<PathBuf>> {
    source(model)?.0.get(file)
}

/// Files of a hub repo only, never a local directory of that name: for ids that come from
/// requests (adapters named `org/repo`). `None` for a file the repo (or, offline, the cache)
/// does not have.
pub fn hub_files(id: &str, files: &[&str]) -> Result<Vec<Option<PathBuf>>> {
    let src = hub_source(id)?;
    files.iter().map(|f| src.get(f)).collect()
}

fn source(model: &str) -> Result<(Box<dyn FileSource>, bool)> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok((Box::new(LocalDir(path.to_path_buf())), true));
    }
    let looks_like_id = model.split('/').count() == 2 && !model.starts_with('.') && !model.starts_with('/');
    if !looks_like_id {
        return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such model directory")));
    }
    Ok((hub_source(model)?, false))
}

/// `id`, optionally `id@revision`, on the hub (the local cache only when offline).
fn hub_source(model: &str) -> Result<Box<dyn FileSource>> {
    let (id, revision) = match model.split_once('@') {
        Some((id, rev)) => (id.to_string(), rev.to_string()),
        None => (model.to_string(), "main".to_string()),
    };
    let repo = hf_hub::Repo::with_revision(id.clone(), hf_hub::RepoType::Model, revision);
    if offline() {
        return Ok(Box::new(HubCache(hf_hub::Cache::from_env().repo(repo))));
    }
    let hub_err = |reason: String| Error::Hub { repo: id.clone(), file: String::new(), reason };
    let api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(true).build().map_err(|e| hub_err(e.to_string()))?;
    let repo = api.repo(repo);
    let listing = repo
        .info()
        .map_err(|e| hub_err(format!("{e} (set HF_HUB_OFFLINE=1 to use the local cache only)")))?
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .collect();
    Ok(Box::new(Hub { repo, id, listing }))
}

fn collect(name: &str, src: &dyn FileSource, local: bool) -> Result<CheckpointFiles> {
    let required = |file: &str| -> Result<PathBuf> {
        src.get(file)?.ok_or_else(|| {
            let why = if local {
                "not found"
            } else if offline() {
                "not in the local cache and HF_HUB_OFFLINE is set"
            } else {
                "not in the repository"
            };
            Error::io(Path::new(name).join(file), std::io::Error::new(std::io::ErrorKind::NotFound, why))
        })
    };
    let config = required("config.json")?;
    let weights = match src.get(WEIGHTS_INDEX)? {
        Some(index) => shard_names(&index)?.iter().map(|f| required(f)).collect::<Result<Vec<_>>>()?,
        None => vec![required(SINGLE_WEIGHTS)?],
    };
    Ok(CheckpointFiles {
        name: name.to_string(),
        config,
        generation_config: src.get("generation_config.json")?,
        preprocessor_config: src.get("preprocessor_config.json")?,
        tokenizer: required("tokenizer.json")?,
        tokenizer_config: src.get("tokenizer_config.json")?,
        chat_template_json: src.get("chat_template.json")?,
        chat_template_jinja: src.get("chat_template.jinja")?,
        weights,
    })
}

/// The distinct shard files named by `model.safetensors.index.json`, in a stable order.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let value = read_json(index)?;
    let map = value.get("weight_map").and_then(Value::as_object).ok_or_else(|| Error::config(WEIGHTS_INDEX, "missing `weight_map`"))?;
    let mut names: Vec<String> = map.values().filter_map(Value::as_str).map(str::to_string).collect();
    names.sort();
    names.dedup();
    if names.is_empty() || names.iter().any(|n| n.contains('/') || n.contains("..")) {
        return Err(Error::config(WEIGHTS_INDEX, "`weight_map` must name shard files in the checkpoint directory"));
    }
    Ok(names)
}
