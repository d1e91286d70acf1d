//! `GET /v1/models`: the base model and every loaded adapter, OpenAI-style.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::inference::BASE_MODEL;
use crate::state::AppState;

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    let base = &state.config.model;
    let mut data = vec![json!({ "id": BASE_MODEL, "object": "model", "created": 0, "owned_by": "qwen-ocr", "root": base })];
    for adapter in state.adapters.list() {
        data.push(
            json!({ "id": adapter.name, "object": "model", "created": 0, "owned_by": "qwen-ocr", "root": base, "parent": BASE_MODEL }),
        );
    }
    Json(json!({ "object": "list", "data": data }))
}
