//! The one HTTP error type: every handler returns it, and it decides the status and the
//! OpenAI-style body `{"error": {"message", "type", "code"}}` for each kind of failure.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use qwen_ocr_model::{Error as ModelError, ImageError};
use qwen_ocr_scheduler::SubmitError;
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Machine-readable reason, e.g. `image_too_large`.
    pub code: &'static str,
    /// Seconds the client should wait before retrying (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), code, retry_after: None }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { retry_after: Some(5), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message) }
    }

    /// The OpenAI error `type` for this status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({ "error": { "message": self.message, "type": self.kind(), "code": self.code, "param": null } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, code = self.code, "{}", self.message);
        } else {
            tracing::info!(status = %self.status, code = self.code, "{}", self.message);
        }
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        let message = e.to_string();
        match e {
            ModelError::Image(ImageError::UnsupportedFormat) => Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_image", message),
            ModelError::Image(ImageError::TooLarge { .. }) => Self::new(StatusCode::PAYLOAD_TOO_LARGE, "image_too_large", message),
            ModelError::Image(_) => Self::bad_request("invalid_image", message),
            ModelError::InvalidRequest(_) | ModelError::Template(_) | ModelError::Tokenizer(_) => {
                Self::bad_request("invalid_request", message)
            }
            ModelError::Adapter { .. } => Self::bad_request("invalid_adapter", message),
            // Busy, not wrong: the slots free up as the requests holding them end.
            ModelError::AdaptersFull { .. } => Self { code: "adapters_full", ..Self::unavailable(message) },
            ModelError::Schema(_) => Self::bad_request("invalid_schema", message),
            ModelError::Io { .. } | ModelError::Config { .. } | ModelError::Hub { .. } | ModelError::Weights(_) | ModelError::Candle(_) => {
                Self::internal(message)
            }
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Invalid(e) => e.into(),
            SubmitError::QueueFull { .. } => {
                Self { retry_after: Some(1), ..Self::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", e.to_string()) }
            }
            SubmitError::ShuttingDown => Self::unavailable(e.to_string()),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
