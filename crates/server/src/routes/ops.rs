//! Liveness, readiness and metrics for orchestrators and scrapers.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use crate::api::error::ErrorResponse;
use crate::api::ops::{Health, Ready};
use crate::error::{ApiError, ErrorKind};
use crate::state::AppState;

/// The process is up (the model may still be loading).
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, description = "Alive", body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok".into() })
}

/// Ready to serve: the model is loaded and the server is not shutting down.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "Ready, with the engine's state", body = Ready),
        (status = 503, description = "The model is loading or the server is shutting down (`unavailable`)", body = ErrorResponse, headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
)]
pub async fn ready(State(state): State<Arc<AppState>>) -> Result<Json<Ready>, ApiError> {
    if !state.is_ready() {
        return Err(ApiError::new(ErrorKind::Unavailable, "not ready: the model is loading or the server is shutting down"));
    }
    let engine = state.engine()?;
    Ok(Json(Ready {
        status: "ready".into(),
        model: state.config.model.clone(),
        architecture: engine.family().model_type().into(),
        engine: engine.stats(),
    }))
}

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus' text format", content_type = "text/plain", body = String)),
)]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
