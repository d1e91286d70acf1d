//! `GET /v1/models`: the base model, every loaded adapter and every adapter the adapters folder
//! would load on first use, OpenAI-style (`loaded` tells them apart).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use crate::adapter_folder;
use crate::api::models::{Model, ModelList};
use crate::api::ObjectKind;
use crate::inference::BASE_MODEL;
use crate::state::AppState;

#[utoipa::path(
    get,
    path = "/v1/models",
    operation_id = "list_models",
    tag = "generation",
    responses((status = 200, description = "The models a request can name", body = ModelList)),
)]
pub async fn list(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let base = &state.config.model;
    let architecture = state.engine().ok().map(|e| e.family().model_type().to_string());
    let model = |id: &str, parent: Option<&str>, loaded: bool| Model {
        id: id.to_string(),
        object: ObjectKind::Model,
        created: 0,
        owned_by: "qwen-ocr".into(),
        root: base.clone(),
        architecture: architecture.clone(),
        parent: parent.map(str::to_string),
        loaded,
    };
    let mut data = vec![model(BASE_MODEL, None, true)];
    let loaded: Vec<String> = state.adapters.list().into_iter().map(|a| a.name).collect();
    let loadable = state.config.adapters_dir.as_deref().map(adapter_folder::loadable).unwrap_or_default();
    data.extend(loaded.iter().map(|name| model(name, Some(BASE_MODEL), true)));
    data.extend(loadable.iter().filter(|name| !loaded.contains(name)).map(|name| model(name, Some(BASE_MODEL), false)));
    Json(ModelList { object: ObjectKind::List, data })
}
