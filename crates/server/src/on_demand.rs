//! Adapters loaded on their first request, from the adapters folder or (when `hub_adapters`
//! allows it) the Hugging Face hub: once however many requests ask at the same time, and
//! evicted again when cold (see `AdapterRegistry`). This is what lets replicas behind a gateway
//! be interchangeable: every replica can serve every adapter of a shared folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use qwen_ocr_model::adapters::lora::LoraAdapter;
use qwen_ocr_model::adapters::registry::{Loaded, Residency};
use qwen_ocr_model::loading::checkpoint::hub_files;
use qwen_ocr_model::Error as ModelError;
use qwen_ocr_scheduler::Engine;

use crate::adapter_folder::{self, PEFT_CONFIG, PEFT_WEIGHTS, PROFILE_FILE};
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::metrics;
use crate::profile::ProfileSpec;
use crate::state::AppState;

/// Where an adapter that is not resident can be loaded from.
enum Source {
    /// A subfolder of the adapters folder.
    Folder(PathBuf),
    /// A hub repo, `org/repo`.
    Hub,
}

/// The adapter named `name`: resident, else loaded now. `None` when no source has it.
pub async fn get_or_load(state: &Arc<AppState>, name: &str) -> ApiResult<Option<Arc<LoraAdapter>>> {
    if let Some(adapter) = state.adapters.get(name) {
        return Ok(Some(adapter));
    }
    let Some(source) = locate(state, name)? else { return Ok(None) };
    let gate = state.first_loads.gate(name);
    let result = {
        let _turn = gate.lock().await;
        match state.adapters.get(name) {
            // Loaded by the request that held the gate before us.
            Some(adapter) => Ok(Some(adapter)),
            None => load_from(state, name, source).await.map(Some),
        }
    };
    state.first_loads.release(name, &gate);
    result
}

fn locate(state: &AppState, name: &str) -> ApiResult<Option<Source>> {
    let (hub, root) = (state.config.hub_adapters, state.config.adapters_dir.as_deref());
    if hub && adapter_folder::is_hub_id(name) {
        return Ok(Some(Source::Hub));
    }
    if !hub && root.is_none() {
        return Ok(None);
    }
    // Wherever names can lead to files, a name that could leave its place is refused as such.
    adapter_folder::check_name(name)?;
    match root {
        Some(root) => Ok(adapter_folder::find(root, name)?.map(Source::Folder)),
        None => Ok(None),
    }
}

async fn load_from(state: &Arc<AppState>, name: &str, source: Source) -> ApiResult<Arc<LoraAdapter>> {
    let (state, name) = (state.clone(), name.to_string());
    // Off the async threads: hub downloads and weight reading block.
    tokio::task::spawn_blocking(move || {
        let dir = match source {
            Source::Folder(dir) => dir,
            Source::Hub => download(&name)?,
        };
        // The profile is in place before the adapter is visible, so no request sees it without;
        // a bad profile leaves the adapter unloaded.
        let spec = ProfileSpec::from_config(&adapter_folder::read_profile(&dir)?, &dir)?;
        let engine = state.engine()?;
        state.set_profile(&name, Some(spec.compile(Some(&name), &state.config, engine)?));
        Ok(load(&state, engine, &name, &dir, Residency::Evictable)?.adapter)
    })
    .await
    .map_err(|e| ApiError::internal(format!("adapter loading failed: {e}")))?
}

/// The hub repo's files in the local cache (fetched unless `HF_HUB_OFFLINE`); the folder they
/// share.
fn download(id: &str) -> ApiResult<PathBuf> {
    let not_found = |reason: String| ApiError::new(ErrorKind::AdapterNotFound, format!("adapter `{id}` is not on the hub: {reason}"));
    let files = hub_files(id, &[PEFT_CONFIG, PEFT_WEIGHTS, PROFILE_FILE]).map_err(|e| match e {
        ModelError::Hub { .. } => not_found(e.to_string()),
        e => e.into(),
    })?;
    match (&files[0], &files[1]) {
        (Some(config), Some(_)) => Ok(config.parent().expect("a file in a folder").to_path_buf()),
        _ => Err(not_found(format!("it has no {PEFT_CONFIG} and {PEFT_WEIGHTS} (or, offline, they are not cached)"))),
    }
}

/// Loads an adapter into the registry, counting the load, its time and any eviction. Every
/// way in (start-up, `POST /v1/adapters`, first use) goes through here.
pub fn load(state: &AppState, engine: &Engine, name: &str, dir: &Path, residency: Residency) -> qwen_ocr_model::Result<Loaded> {
    let started = Instant::now();
    let loaded = state.adapters.insert(name, engine.load_adapter(name, dir)?, residency)?;
    ::metrics::counter!(metrics::ADAPTER_LOADS).increment(1);
    ::metrics::histogram!(metrics::ADAPTER_LOAD_SECONDS).record(started.elapsed().as_secs_f64());
    if let Some(evicted) = &loaded.evicted {
        state.set_profile(evicted, None);
        ::metrics::counter!(metrics::ADAPTER_EVICTIONS).increment(1);
        tracing::info!(adapter = %evicted, "adapter evicted: least recently used");
    }
    ::metrics::gauge!(metrics::ADAPTERS_RESIDENT).set(state.adapters.list().len() as f64);
    tracing::info!(adapter = %name, seconds = started.elapsed().as_secs_f64(), path = %dir.display(), "adapter loaded");
    Ok(loaded)
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
