//! The HTTP surface: routes, authentication and the layers every request passes through.

mod adapters;
pub mod chat;
pub mod extract;
mod models;
mod openapi;
mod ops;

pub use openapi::document;

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, BodyDataStream};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use futures_util::StreamExt;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::error::{ApiError, ErrorKind};
use crate::state::AppState;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// Which replica answered: behind a gateway, it shows where requests were routed.
pub const REPLICA_HEADER: HeaderName = HeaderName::from_static("x-qwen-ocr-replica");

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/extract", post(extract::extract))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/models", get(models::list))
        .route("/v1/adapters", get(adapters::list).post(adapters::load))
        .route("/v1/adapters/{name}", delete(adapters::unload))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let ops = Router::new()
        .route("/health", get(ops::health))
        .route("/openapi.json", get(openapi::openapi))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics));
    let trace = TraceLayer::new_for_http()
        .make_span_with(|request: &Request| {
            let id = request.headers().get(&REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
        })
        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO));
    let replica = HeaderValue::from_str(&state.config.replica_name()).expect("replica names are checked printable ASCII");
    api.merge(ops)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), read_body_within))
        // A bug in a handler answers 500 in the API's error shape instead of dropping the connection.
        .layer(CatchPanicLayer::custom(|_| ApiError::internal("internal error while handling the request").into_response()))
        .layer(middleware::from_fn(crate::metrics::track))
        .layer(middleware::map_response(move |mut response: Response| {
            let replica = replica.clone();
            async move {
                response.headers_mut().insert(REPLICA_HEADER, replica);
                response
            }
        }))
        // Outermost last: the id is set before tracing sees the request and copied to the response.
        .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER))
        .layer(trace)
        .layer(SetRequestIdLayer::new(REQUEST_ID_HEADER, MakeRequestUuid))
        .with_state(state)
}

/// `Authorization: Bearer KEY` on `/v1/*` when keys are configured.
async fn authenticate(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Result<Response, ApiError> {
    let keys = &state.config.api_keys;
    if keys.is_empty() {
        return Ok(next.run(request).await);
    }
    let presented = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(key) if keys.iter().any(|k| constant_time_eq(k.as_bytes(), key.trim().as_bytes())) => Ok(next.run(request).await),
        Some(_) => Err(ApiError::new(ErrorKind::InvalidApiKey, "the API key is not valid")),
        None => Err(ApiError::new(ErrorKind::MissingApiKey, "send an API key as `Authorization: Bearer KEY`")),
    }
}

/// Compares keys without leaking, through timing, how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorKind::UnknownRoute, "no such route; see the README for the API")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorKind::MethodNotAllowed, "this route does not accept that method")
}

/// Receives the whole body before the handler runs, within `read_timeout_secs` of the
/// headers: a client trickling its upload gets 408 instead of holding a worker (and, once
/// the handler submits it, a batch slot) for as long as it likes. Handlers buffer bodies
/// anyway, so reading them here costs no memory they would not use.
async fn read_body_within(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let within = Duration::from_secs(state.config.read_timeout_secs);
    let limit = state.config.max_body_bytes;
    let mut frames = body.into_data_stream();
    let read = tokio::time::timeout(within, read_body(&mut frames, limit)).await.map_err(|_| {
        let message = format!("the request body was not received within {} s (read_timeout_secs)", within.as_secs());
        ApiError::new(ErrorKind::ReadTimeout, message)
    })?;
    match read {
        Ok(bytes) => Ok(next.run(Request::from_parts(parts, Body::from(bytes))).await),
        Err(error) if error.kind == ErrorKind::BodyTooLarge => {
            // Most clients send the whole body before they read the answer: closing the
            // connection with the rest unread makes their write fail (broken pipe, reset) and
            // the 413 is never seen. So the rest is read and dropped first, as nginx does, up to
            // a bound in bytes and time; past it the connection closes after all.
            let drain = limit.max(DRAIN_AT_LEAST);
            let _ = tokio::time::timeout(within.min(DRAIN_FOR), discard(&mut frames, drain)).await;
            Err(error)
        }
        Err(error) => Err(error),
    }
}

/// How much of an oversized body is read and dropped at least (or `max_body_bytes` more, if
/// larger), and for how long at most, so that its sender can read the 413.
const DRAIN_AT_LEAST: usize = 8 << 20;
const DRAIN_FOR: Duration = Duration::from_secs(10);

/// The body's bytes, stopping as soon as they pass `limit` (413) so that an oversized
/// upload is never held whole.
async fn read_body(frames: &mut BodyDataStream, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut bytes = Vec::new();
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(|e| ApiError::new(ErrorKind::InvalidBody, format!("failed to read the request body: {e}")))?;
        if bytes.len() + frame.len() > limit {
            let message = format!("the request body is over max_body_bytes ({limit})");
            return Err(ApiError::new(ErrorKind::BodyTooLarge, message));
        }
        bytes.extend_from_slice(&frame);
    }
    Ok(bytes)
}

/// Reads and drops the rest of a body, until it ends or `budget` bytes have passed.
async fn discard(frames: &mut BodyDataStream, mut budget: usize) {
    while let Some(Ok(frame)) = frames.next().await {
        let Some(left) = budget.checked_sub(frame.len()) else { return };
        budget = left;
    }
}

/// A JSON body, with malformed JSON, wrong fields and oversized bodies as API errors. A field
/// of the wrong type is named with its path (`messages[0].content`, `max_tokens`).
fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(body_error)?;
    let invalid = |detail: String| ApiError::new(ErrorKind::InvalidJson, format!("invalid request body: {detail}"));
    let mut json = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut json).map_err(|e| match e.path().to_string().as_str() {
        "." => invalid(e.inner().to_string()),
        at => invalid(format!("`{at}`: {}", e.inner())),
    })?;
    // Data after the value is malformed too, as `serde_json::from_slice` has it.
    json.end().map_err(|e| invalid(e.to_string()))?;
    Ok(value)
}

fn body_error(rejection: axum::extract::rejection::BytesRejection) -> ApiError {
    unreadable_body(rejection.status(), rejection.body_text(), ErrorKind::InvalidBody)
}

/// A body that could not be read: over the size limit (`body_too_large`, as axum's extractor
/// found it) or broken (`kind`).
fn unreadable_body(status: StatusCode, detail: String, kind: ErrorKind) -> ApiError {
    let kind = if status == StatusCode::PAYLOAD_TOO_LARGE { ErrorKind::BodyTooLarge } else { kind };
    ApiError::new(kind, detail)
}
