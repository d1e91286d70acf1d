//! Liveness, readiness and metrics for orchestrators and scrapers.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

/// The process is up (the model may still be loading).
pub async fn health() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Ready to serve: the model is loaded and the server is not shutting down.
pub async fn ready(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    if !state.is_ready() {
        return Err(ApiError::unavailable("not ready: the model is loading or the server is shutting down"));
    }
    let stats = state.engine()?.stats();
    Ok((StatusCode::OK, Json(json!({ "status": "ready", "model": state.config.model, "engine": stats }))))
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
