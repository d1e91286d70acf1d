//! `GET /v1/models`: the base model, every loaded adapter and every adapter the adapters folder
//! would load on first use, OpenAI-style (`loaded` tells them apart).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::adapter_folder;
use crate::inference::BASE_MODEL;
use crate::state::AppState;

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    let base = &state.config.model;
    let mut data = vec![json!({ "id": BASE_MODEL, "object": "model", "created": 0, "owned_by": "qwen-ocr", "root": base, "loaded": true })];
    let loaded: Vec<String> = state.adapters.list().into_iter().map(|a| a.name).collect();
    let loadable = state.config.adapters_dir.as_deref().map(adapter_folder::loadable).unwrap_or_default();
    let adapter = |name: &String, loaded: bool| json!({ "id": name, "object": "model", "created": 0, "owned_by": "qwen-ocr", "root": base, "parent": BASE_MODEL, "loaded": loaded });
    data.extend(loaded.iter().map(|name| adapter(name, true)));
    data.extend(loadable.iter().filter(|name| !loaded.contains(name)).map(|name| adapter(name, false)));
    Json(json!({ "object": "list", "data": data }))
}
