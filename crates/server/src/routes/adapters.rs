//! Adapter administration at runtime: list, load (or atomically replace), unload. Requests
//! already running keep the adapter version they started with.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use qwen_ocr_model::adapter_registry::Residency;
use serde::Deserialize;
use serde_json::{json, Value};

use super::parse_json;
use crate::adapter_folder::{check_name, confine};
use crate::error::{ApiError, ApiResult};
use crate::on_demand;
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadRequest {
    name: String,
    /// Relative to `--adapters-dir` (or absolute, but inside it).
    path: PathBuf,
    prompt: Option<String>,
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    let prompts = state.adapter_prompts.read().expect("prompts lock").clone();
    let data: Vec<Value> = state
        .adapters
        .list()
        .into_iter()
        .map(|a| json!({ "name": a.name, "modules": a.matched, "bytes": a.bytes, "prompt": prompts.get(&a.name) }))
        .collect();
    Json(json!({ "object": "list", "data": data, "resident_bytes": state.adapters.resident_bytes() }))
}

pub async fn load(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> ApiResult<impl IntoResponse> {
    let request: LoadRequest = parse_json(body)?;
    check_name(&request.name)?;
    let root = state.config.adapters_dir.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "adapter_loading_disabled",
            "runtime adapter loading is off: start the server with --adapters-dir",
        )
    })?;
    let dir = confine(root, &request.path)?
        .ok_or_else(|| ApiError::bad_request("adapter_path_not_found", format!("no adapter directory at `{}`", request.path.display())))?;
    let engine = state.engine()?;
    let pipeline = engine.pipeline().clone();
    let task_state = state.clone();
    let name = request.name.clone();
    let loaded = tokio::task::spawn_blocking(move || on_demand::load(&task_state, &pipeline.model, &name, &dir, Residency::Pinned))
        .await
        .map_err(|e| ApiError::internal(format!("adapter loading failed: {e}")))??;
    on_demand::set_prompt(&state, &request.name, request.prompt);
    let (adapter, replaced) = (loaded.adapter, loaded.replaced);
    let status = if replaced.is_some() { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(json!({ "name": adapter.name, "modules": adapter.matched, "bytes": adapter.bytes, "replaced": replaced.is_some() }))))
}

pub async fn unload(State(state): State<Arc<AppState>>, UrlPath(name): UrlPath<String>) -> ApiResult<Json<Value>> {
    state.adapters.unload(&name).ok_or_else(|| ApiError::not_found("adapter_not_found", format!("adapter `{name}` is not loaded")))?;
    state.adapter_prompts.write().expect("prompts lock").remove(&name);
    tracing::info!(adapter = %name, "adapter unloaded");
    Ok(Json(json!({ "name": name, "deleted": true })))
}
