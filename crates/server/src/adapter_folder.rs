//! Adapter names and where they lead: a subfolder of the adapters folder (`--adapters-dir`),
//! confined to it, with its optional profile; or a hub id `org/repo`.

use std::path::{Path, PathBuf};

use crate::config::AdapterConfig;
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::inference::BASE_MODEL;

/// The optional profile beside an adapter's weights, in `[adapters.NAME]`'s format less `path`.
pub const PROFILE_FILE: &str = "qwen-ocr.toml";
/// What makes a folder an adapter: PEFT writes these two.
pub const PEFT_CONFIG: &str = "adapter_config.json";
pub const PEFT_WEIGHTS: &str = "adapter_model.safetensors";

/// Names of the adapters the folder holds, sorted.
pub fn loadable(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| check_name(name).is_ok() && find(root, name).is_ok_and(|d| d.is_some()))
        .collect();
    names.sort();
    names
}

/// `root/name` when it holds an adapter; `..` and symlinks out of the folder are refused.
pub fn find(root: &Path, name: &str) -> ApiResult<Option<PathBuf>> {
    if name == "." {
        return Ok(None);
    }
    Ok(confine(root, Path::new(name))?.filter(|dir| dir.join(PEFT_CONFIG).is_file()))
}

/// The profile beside the adapter, if any. It is an `[adapters.NAME]` table whose `path` is
/// the folder itself, so profiles accept exactly what the configuration file accepts.
pub fn read_profile(dir: &Path) -> ApiResult<AdapterConfig> {
    let text = match std::fs::read_to_string(dir.join(PROFILE_FILE)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(invalid_profile(dir, e.to_string())),
    };
    parse_profile(&text, dir)
}

/// A profile's text (empty: no profile) for the adapter in `dir`.
pub fn parse_profile(text: &str, dir: &Path) -> ApiResult<AdapterConfig> {
    let invalid = |reason: String| invalid_profile(dir, reason);
    let mut table = text.parse::<toml::Table>().map_err(|e| invalid(e.to_string()))?;
    if table.contains_key("path") {
        return Err(invalid("`path` is the folder the profile is in; leave it out".into()));
    }
    table.insert("path".into(), toml::Value::String(dir.display().to_string()));
    toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| invalid(e.to_string()))
}

fn invalid_profile(dir: &Path, reason: String) -> ApiError {
    ApiError::new(ErrorKind::InvalidAdapterProfile, format!("{}: {reason}", dir.join(PROFILE_FILE).display()))
}

/// Adapter names are 1-64 of `[A-Za-z0-9._-]`, not `base`: safe as a folder name and a label.
pub fn check_name(name: &str) -> ApiResult<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name != BASE_MODEL
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorKind::InvalidAdapterName,
            format!("adapter names are 1-64 of [A-Za-z0-9._-] and not `{BASE_MODEL}`, got `{name}`"),
        ))
    }
}

/// `org/repo`, each part a name as `check_name` allows it and not starting with a dot, so it
/// can only ever name a hub repo.
pub fn is_hub_id(name: &str) -> bool {
    let part = |p: &str| check_name(p).is_ok() && !p.starts_with('.');
    name.split_once('/').is_some_and(|(org, repo)| part(org) && part(repo))
}

/// `path` resolved inside `root`, following symlinks: `None` when nothing is there, 403 when it
/// lands outside.
pub fn confine(root: &Path, path: &Path) -> ApiResult<Option<PathBuf>> {
    let root = root.canonicalize().map_err(|e| ApiError::internal(format!("adapters dir {}: {e}", root.display())))?;
    let Ok(resolved) = root.join(path).canonicalize() else { return Ok(None) };
    if !resolved.starts_with(&root) {
        return Err(ApiError::new(ErrorKind::AdapterPathOutside, "adapter paths must stay inside the adapters directory"));
    }
    Ok(Some(resolved))
}
