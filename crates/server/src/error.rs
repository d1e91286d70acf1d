//! The one HTTP error type: every handler, middleware and fallback answers failures with it,
//! and its [`ErrorKind`] decides the status and the OpenAI-style body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use qwen_ocr_model::{Error as ModelError, ImageError};
use qwen_ocr_scheduler::SubmitError;

pub use crate::api::error::ErrorKind;
use crate::api::error::{ErrorObject, ErrorResponse};
use crate::documents::isolated::RenderError;
use crate::documents::pdf::DocumentError;

#[derive(Debug)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// Seconds the client should wait before retrying: the kind's default, unless the
    /// configuration says otherwise (`retry_after_secs` for a full queue).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), retry_after: kind.retry_after() }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InternalError, message)
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    pub fn body(&self) -> ErrorResponse {
        let error_type = self.kind.error_type();
        ErrorResponse { error: ErrorObject { message: self.message.clone(), error_type, code: self.kind, param: None } }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(%status, code = %self.kind, "{}", self.message);
        } else {
            tracing::info!(%status, code = %self.kind, "{}", self.message);
        }
        let mut response = (status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        let kind = match &e {
            ModelError::Image(ImageError::UnsupportedFormat) => ErrorKind::UnsupportedImage,
            ModelError::Image(ImageError::TooLarge { .. }) => ErrorKind::ImageTooLarge,
            ModelError::Image(_) => ErrorKind::InvalidImage,
            ModelError::InvalidRequest(_) | ModelError::Template(_) | ModelError::Tokenizer(_) => ErrorKind::InvalidRequest,
            ModelError::Adapter { .. } => ErrorKind::InvalidAdapter,
            // Busy, not wrong: the slots free up as the requests holding them end.
            ModelError::AdaptersFull { .. } => ErrorKind::AdaptersFull,
            ModelError::Schema(_) => ErrorKind::InvalidSchema,
            ModelError::Io { .. } | ModelError::Config { .. } | ModelError::Hub { .. } | ModelError::Weights(_) | ModelError::Candle(_) => {
                ErrorKind::InternalError
            }
        };
        Self::new(kind, e.to_string())
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Invalid(e) => e.into(),
            SubmitError::QueueFull { .. } => Self::new(ErrorKind::QueueFull, e.to_string()),
            SubmitError::ShuttingDown => Self::new(ErrorKind::Unavailable, e.to_string()),
        }
    }
}

impl From<DocumentError> for ApiError {
    fn from(e: DocumentError) -> Self {
        let kind = match &e {
            DocumentError::NotPdf(_) => ErrorKind::NotAPdf,
            DocumentError::Truncated(_) => ErrorKind::TruncatedPdf,
            DocumentError::NeedsPassword => ErrorKind::PdfNeedsPassword,
            DocumentError::NoPages => ErrorKind::EmptyPdf,
            DocumentError::PagesOutsideDocument(_) => ErrorKind::InvalidPages,
            DocumentError::TooManyPages { .. } => ErrorKind::TooManyPages,
            DocumentError::Unreadable(_) => ErrorKind::InvalidPdf,
        };
        Self::new(kind, e.to_string())
    }
}

impl From<RenderError> for ApiError {
    fn from(e: RenderError) -> Self {
        match e {
            RenderError::Document(e) => e.into(),
            RenderError::Internal(_) => Self::internal(e.to_string()),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
