//! Adapter administration at runtime: list, load (or atomically replace), unload. Requests
//! already running keep the adapter version they started with.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use qwen_ocr_model::adapter_registry::Residency;

use super::parse_json;
use crate::adapter_folder::{check_name, confine};
use crate::api::adapters::{modules, Adapter, AdapterList, LoadAdapterRequest, LoadedAdapter, UnloadedAdapter};
use crate::api::error::ErrorResponse;
use crate::api::ObjectKind;
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::on_demand;
use crate::profile::{read_schema_file, ProfileSpec};
use crate::state::AppState;

/// The loaded adapters with their profiles.
#[utoipa::path(
    get,
    path = "/v1/adapters",
    operation_id = "list_adapters",
    tag = "adapters",
    responses((status = 200, description = "The loaded adapters", body = AdapterList)),
)]
pub async fn list(State(state): State<Arc<AppState>>) -> Json<AdapterList> {
    let data = state
        .adapters
        .list()
        .into_iter()
        .map(|a| Adapter {
            profile: state.profile(Some(&a.name)).settings.clone(),
            modules: modules(&a.matched),
            bytes: a.bytes,
            name: a.name,
        })
        .collect();
    Json(AdapterList { object: ObjectKind::List, data, resident_bytes: state.adapters.resident_bytes() })
}

/// Loads an adapter from the adapters folder, or atomically replaces the one of that name.
#[utoipa::path(
    post,
    path = "/v1/adapters",
    operation_id = "load_adapter",
    tag = "adapters",
    request_body(content = LoadAdapterRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Replaced an adapter of that name", body = LoadedAdapter),
        (status = 201, description = "Loaded", body = LoadedAdapter),
        (status = 400, description = "Malformed fields, a bad name, no adapter at `path`, a profile or schema that cannot be used", body = ErrorResponse),
        (status = 403, description = "Runtime loading is off (no `--adapters-dir`), or `path` leads outside it", body = ErrorResponse),
        (status = 503, description = "The model is loading, or every adapter slot is held (`unavailable`, `adapters_full`)", body = ErrorResponse, headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
)]
pub async fn load(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> ApiResult<impl IntoResponse> {
    let request: LoadAdapterRequest = parse_json(body)?;
    check_name(&request.name)?;
    let root = state.config.adapters_dir.as_deref().ok_or_else(|| {
        ApiError::new(ErrorKind::AdapterLoadingDisabled, "runtime adapter loading is off: start the server with --adapters-dir")
    })?;
    let dir = confine(root, &request.path)?
        .ok_or_else(|| ApiError::new(ErrorKind::AdapterPathNotFound, format!("no adapter directory at `{}`", request.path.display())))?;
    let engine = state.engine()?;
    let pipeline = engine.pipeline().clone();
    let schema = match (request.schema, &request.schema_file) {
        (Some(_), Some(_)) => return Err(ApiError::new(ErrorKind::InvalidSchema, "give `schema` or `schema_file`, not both")),
        (Some(schema), None) => Some(schema),
        (None, Some(file)) => {
            let path = confine(root, file)?
                .ok_or_else(|| ApiError::new(ErrorKind::InvalidSchema, format!("no schema file at `{}`", file.display())))?;
            Some(read_schema_file(&path)?)
        }
        (None, None) => None,
    };
    let spec = ProfileSpec {
        prompt: request.prompt,
        schema,
        strict: request.strict,
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
    let body = LoadedAdapter {
        name: adapter.name.clone(),
        modules: modules(&adapter.matched),
        bytes: adapter.bytes,
        replaced: replaced.is_some(),
    };
    Ok((status, Json(body)))
}

/// Unloads an adapter; requests already running finish with it.
#[utoipa::path(
    delete,
    path = "/v1/adapters/{name}",
    operation_id = "unload_adapter",
    tag = "adapters",
    params(("name" = String, Path, description = "The adapter's name")),
    responses(
        (status = 200, description = "Unloaded", body = UnloadedAdapter),
        (status = 404, description = "No adapter of that name is loaded (`adapter_not_found`)", body = ErrorResponse),
    ),
)]
pub async fn unload(State(state): State<Arc<AppState>>, UrlPath(name): UrlPath<String>) -> ApiResult<Json<UnloadedAdapter>> {
    state.adapters.unload(&name).ok_or_else(|| ApiError::new(ErrorKind::AdapterNotFound, format!("adapter `{name}` is not loaded")))?;
    state.set_profile(&name, None);
    tracing::info!(adapter = %name, "adapter unloaded");
    Ok(Json(UnloadedAdapter { name, deleted: true }))
}
