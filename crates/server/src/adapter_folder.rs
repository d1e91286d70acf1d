//! The adapters folder (`--adapters-dir`): adapter names map to its subfolders, which are
//! loaded on their first request, once however many requests ask at the same time, and may be
//! evicted again when cold (see `AdapterRegistry`). This is what lets replicas behind a gateway
//! be interchangeable: every replica can serve every adapter of a shared folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::StatusCode;
use qwen_ocr_model::adapter_registry::{Loaded, Residency};
use qwen_ocr_model::lora::LoraAdapter;
use qwen_ocr_model::model::Qwen2VL;

use crate::config::AdapterConfig;
use crate::error::{ApiError, ApiResult};
use crate::inference::BASE_MODEL;
use crate::metrics;
use crate::state::AppState;

/// The optional profile beside an adapter's weights, in `[adapters.NAME]`'s format less `path`.
pub const PROFILE_FILE: &str = "qwen-ocr.toml";
/// What makes a subfolder an adapter (PEFT writes it beside the weights).
const PEFT_CONFIG: &str = "adapter_config.json";

/// The adapter named `name`: resident, else loaded now from the adapters folder. `None` when
/// neither has it.
pub async fn get_or_load(state: &Arc<AppState>, name: &str) -> ApiResult<Option<Arc<LoraAdapter>>> {
    if let Some(adapter) = state.adapters.get(name) {
        return Ok(Some(adapter));
    }
    let Some(root) = state.config.adapters_dir.as_deref() else { return Ok(None) };
    check_name(name)?;
    let Some(dir) = adapter_folder(root, name)? else { return Ok(None) };
    let gate = state.first_loads.gate(name);
    let result = {
        let _turn = gate.lock().await;
        match state.adapters.get(name) {
            // Loaded by the request that held the gate before us.
            Some(adapter) => Ok(Some(adapter)),
            None => load_from_folder(state, name, dir).await.map(Some),
        }
    };
    state.first_loads.release(name, &gate);
    result
}

async fn load_from_folder(state: &Arc<AppState>, name: &str, dir: PathBuf) -> ApiResult<Arc<LoraAdapter>> {
    let pipeline = state.engine()?.pipeline().clone();
    // The prompt is in place before the adapter is visible, so no request sees it without.
    set_prompt(state, name, read_profile(&dir)?.prompt);
    let (task_state, task_name) = (state.clone(), name.to_string());
    let loaded = tokio::task::spawn_blocking(move || load(&task_state, &pipeline.model, &task_name, &dir, Residency::Evictable))
        .await
        .map_err(|e| ApiError::internal(format!("adapter loading failed: {e}")))??;
    Ok(loaded.adapter)
}

/// Loads an adapter into the registry, counting the load, its time and any eviction. Every
/// way in (start-up, `POST /v1/adapters`, first use) goes through here.
pub fn load(state: &AppState, model: &Qwen2VL, name: &str, dir: &Path, residency: Residency) -> qwen_ocr_model::Result<Loaded> {
    let started = Instant::now();
    let loaded = state.adapters.load_as(model, name, dir, residency)?;
    ::metrics::counter!(metrics::ADAPTER_LOADS).increment(1);
    ::metrics::histogram!(metrics::ADAPTER_LOAD_SECONDS).record(started.elapsed().as_secs_f64());
    if let Some(evicted) = &loaded.evicted {
        ::metrics::counter!(metrics::ADAPTER_EVICTIONS).increment(1);
        tracing::info!(adapter = %evicted, "adapter evicted: least recently used");
    }
    ::metrics::gauge!(metrics::ADAPTERS_RESIDENT).set(state.adapters.list().len() as f64);
    tracing::info!(adapter = %name, seconds = started.elapsed().as_secs_f64(), path = %dir.display(), "adapter loaded");
    Ok(loaded)
}

/// Records (or clears) an adapter's own extraction prompt.
pub fn set_prompt(state: &AppState, name: &str, prompt: Option<String>) {
    let mut prompts = state.adapter_prompts.write().expect("prompts lock");
    match prompt {
        Some(p) => prompts.insert(name.to_string(), p),
        None => prompts.remove(name),
    };
}

/// Names of the adapters the folder holds, sorted.
pub fn loadable(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| check_name(name).is_ok() && adapter_folder(root, name).is_ok_and(|d| d.is_some()))
        .collect();
    names.sort();
    names
}

/// `root/name` when it holds an adapter; `..` and symlinks out of the folder are refused.
fn adapter_folder(root: &Path, name: &str) -> ApiResult<Option<PathBuf>> {
    Ok(confine(root, Path::new(name))?.filter(|dir| dir != root && dir.join(PEFT_CONFIG).is_file()))
}

/// The profile beside the adapter, if any. It is an `[adapters.NAME]` table whose `path` is
/// the folder itself, so profiles accept exactly what the configuration file accepts.
fn read_profile(dir: &Path) -> ApiResult<AdapterConfig> {
    let file = dir.join(PROFILE_FILE);
    let invalid = |reason: String| ApiError::bad_request("invalid_adapter_profile", format!("{}: {reason}", file.display()));
    let mut table = match std::fs::read_to_string(&file) {
        Ok(text) => text.parse::<toml::Table>().map_err(|e| invalid(e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => return Err(invalid(e.to_string())),
    };
    if table.contains_key("path") {
        return Err(invalid("`path` is the folder the profile is in; leave it out".into()));
    }
    table.insert("path".into(), toml::Value::String(dir.display().to_string()));
    toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| invalid(e.to_string()))
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
        Err(ApiError::bad_request(
            "invalid_adapter_name",
            format!("adapter names are 1-64 of [A-Za-z0-9._-] and not `{BASE_MODEL}`, got `{name}`"),
        ))
    }
}

/// `path` resolved inside `root`, following symlinks: `None` when nothing is there, 403 when it
/// lands outside.
pub fn confine(root: &Path, path: &Path) -> ApiResult<Option<PathBuf>> {
    let root = root.canonicalize().map_err(|e| ApiError::internal(format!("adapters dir {}: {e}", root.display())))?;
    let Ok(resolved) = root.join(path).canonicalize() else { return Ok(None) };
    if !resolved.starts_with(&root) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "adapter_path_outside", "adapter paths must stay inside the adapters directory"));
    }
    Ok(Some(resolved))
}

/// One gate per adapter being loaded on first use: the first request through loads it, the
/// others wait and then find it resident.
#[derive(Default)]
pub struct FirstLoads {
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl FirstLoads {
    fn gate(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.gates.lock().expect("first-load gates lock").entry(name.to_string()).or_default().clone()
    }

    /// Forgets the gate once its load is over, so the map holds only loads in progress. A
    /// request arriving later checks the registry before taking a fresh gate.
    fn release(&self, name: &str, gate: &Arc<tokio::sync::Mutex<()>>) {
        let mut gates = self.gates.lock().expect("first-load gates lock");
        if gates.get(name).is_some_and(|g| Arc::ptr_eq(g, gate)) && Arc::strong_count(gate) == 2 {
            gates.remove(name);
        }
    }
}
