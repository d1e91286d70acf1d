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
use crate::profile::{read_schema_file, ProfileSpec};
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadRequest {
    name: String,
    /// Relative to `--adapters-dir` (or absolute, but inside it).
    path: PathBuf,
    /// The extraction profile, as in the configuration file; `schema` is the JSON Schema
    /// itself, `schema_file` a file inside `--adapters-dir`.
    prompt: Option<String>,
    schema: Option<Value>,
    schema_file: Option<PathBuf>,
    max_tokens: Option<usize>,
    temperature: Option<f64>,
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = state
        .adapters
        .list()
        .into_iter()
        .map(|a| {
            // The adapter and its extraction profile's settings, side by side.
            let mut entry = serde_json::to_value(&state.profile(Some(&a.name)).settings).expect("settings serialize");
            entry["name"] = json!(a.name);
            entry["modules"] = json!(a.matched);
            entry["bytes"] = json!(a.bytes);
            entry
        })
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
    let schema = match (request.schema, &request.schema_file) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("invalid_schema", "give `schema` or `schema_file`, not both")),
        (Some(schema), None) => Some(schema),
        (None, Some(file)) => {
            let path = confine(root, file)?
                .ok_or_else(|| ApiError::bad_request("invalid_schema", format!("no schema file at `{}`", file.display())))?;
            Some(read_schema_file(&path)?)
        }
        (None, None) => None,
    };
    let spec = ProfileSpec {
        prompt: request.prompt,
        schema,
        max_tokens: request.max_tokens,
        temperature: request.temperature,
        min_pixels: request.min_pixels,
        max_pixels: request.max_pixels,
    };
    // The profile is checked before the adapter is swapped in: a bad schema changes nothing.
    let compile_pipeline = pipeline.clone();
    let profile = tokio::task::spawn_blocking(move || spec.compile(&compile_pipeline))
        .await
        .map_err(|e| ApiError::internal(format!("schema compilation failed: {e}")))??;
    let task_state = state.clone();
    let name = request.name.clone();
    let loaded = tokio::task::spawn_blocking(move || on_demand::load(&task_state, &pipeline.model, &name, &dir, Residency::Pinned))
        .await
        .map_err(|e| ApiError::internal(format!("adapter loading failed: {e}")))??;
    state.set_profile(&request.name, Some(profile));
    let (adapter, replaced) = (loaded.adapter, loaded.replaced);
    let status = if replaced.is_some() { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(json!({ "name": adapter.name, "modules": adapter.matched, "bytes": adapter.bytes, "replaced": replaced.is_some() }))))
}

pub async fn unload(State(state): State<Arc<AppState>>, UrlPath(name): UrlPath<String>) -> ApiResult<Json<Value>> {
    state.adapters.unload(&name).ok_or_else(|| ApiError::not_found("adapter_not_found", format!("adapter `{name}` is not loaded")))?;
    state.set_profile(&name, None);
    tracing::info!(adapter = %name, "adapter unloaded");
    Ok(Json(json!({ "name": name, "deleted": true })))
}
