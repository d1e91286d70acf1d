//! Error bodies, and the closed list of failures: an [`ErrorKind`] alone decides the status,
//! the OpenAI `type`, the `code` and the default `Retry-After` of an error response.

use std::fmt;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error the API can answer with; its snake_case name is the body's `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    // 400: the request is wrong.
    InvalidJson,
    InvalidBody,
    InvalidMultipart,
    InvalidQuery,
    InvalidField,
    UnknownField,
    InvalidRequest,
    InvalidMessages,
    InvalidRole,
    InvalidStop,
    InvalidLogprobs,
    UnsupportedN,
    InvalidMaxTokens,
    MissingImage,
    TooManyImages,
    InvalidImage,
    InvalidImageUrl,
    RemoteImageNotAllowed,
    ImageFetchFailed,
    InvalidSchema,
    InvalidAdapter,
    InvalidAdapterName,
    InvalidAdapterProfile,
    InvalidProfile,
    AdapterPathNotFound,
    InvalidPages,
    TruncatedPdf,
    PdfNeedsPassword,
    EmptyPdf,
    InvalidPdf,
    // 401
    MissingApiKey,
    InvalidApiKey,
    // 403
    AdapterLoadingDisabled,
    AdapterPathOutside,
    // 404
    UnknownRoute,
    ModelNotFound,
    AdapterNotFound,
    // 405
    MethodNotAllowed,
    // 408
    ReadTimeout,
    // 413
    BodyTooLarge,
    ImageTooLarge,
    TooManyPages,
    // 415
    UnsupportedImage,
    UnsupportedContentType,
    NotAPdf,
    // 429
    QueueFull,
    // 500
    InternalError,
    // 502: written by the gateway (docker/nginx.conf.template), never by a replica.
    NoReplicaAvailable,
    // 503: busy or not ready, not wrong.
    Unavailable,
    AdaptersFull,
    Cancelled,
    TooManyConnections,
    // 504
    Timeout,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        use ErrorKind::*;
        match self {
            InvalidJson
            | InvalidBody
            | InvalidMultipart
            | InvalidQuery
            | InvalidField
            | UnknownField
            | InvalidRequest
            | InvalidMessages
            | InvalidRole
            | InvalidStop
            | InvalidLogprobs
            | UnsupportedN
            | InvalidMaxTokens
            | MissingImage
            | TooManyImages
            | InvalidImage
            | InvalidImageUrl
            | RemoteImageNotAllowed
            | ImageFetchFailed
            | InvalidSchema
            | InvalidAdapter
            | InvalidAdapterName
            | InvalidAdapterProfile
            | InvalidProfile
            | AdapterPathNotFound
            | InvalidPages
            | TruncatedPdf
            | PdfNeedsPassword
            | EmptyPdf
            | InvalidPdf => StatusCode::BAD_REQUEST,
            MissingApiKey | InvalidApiKey => StatusCode::UNAUTHORIZED,
            AdapterLoadingDisabled | AdapterPathOutside => StatusCode::FORBIDDEN,
            UnknownRoute | ModelNotFound | AdapterNotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ReadTimeout => StatusCode::REQUEST_TIMEOUT,
            BodyTooLarge | ImageTooLarge | TooManyPages => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedImage | UnsupportedContentType | NotAPdf => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            QueueFull => StatusCode::TOO_MANY_REQUESTS,
            InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            NoReplicaAvailable => StatusCode::BAD_GATEWAY,
            Unavailable | AdaptersFull | Cancelled | TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
            Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// OpenAI's `type`, which clients branch on; it follows from the status.
    pub fn error_type(self) -> ErrorType {
        match self.status() {
            StatusCode::UNAUTHORIZED => ErrorType::AuthenticationError,
            StatusCode::NOT_FOUND => ErrorType::NotFoundError,
            StatusCode::TOO_MANY_REQUESTS => ErrorType::RateLimitError,
            s if s.is_server_error() => ErrorType::ServerError,
            _ => ErrorType::InvalidRequestError,
        }
    }

    /// Seconds a client should wait before retrying, for failures that pass by themselves:
    /// a full queue and open connections drain fast; loading, shutting down, held adapter
    /// slots and replicas that cannot be reached take longer.
    pub fn retry_after(self) -> Option<u64> {
        match self {
            ErrorKind::QueueFull | ErrorKind::TooManyConnections => Some(1),
            ErrorKind::Unavailable | ErrorKind::AdaptersFull | ErrorKind::NoReplicaAvailable => Some(5),
            _ => None,
        }
    }
}

/// The `code`, as the body spells it.
impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::String(code)) => f.write_str(&code),
            _ => Err(fmt::Error),
        }
    }
}

/// OpenAI's error `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    InvalidRequestError,
    AuthenticationError,
    NotFoundError,
    RateLimitError,
    ServerError,
}

/// Every error body: `{"error": {"message", "type", "code", "param"}}`, OpenAI's shape. A
/// stream that fails after it started sends one as its last event before `[DONE]`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorObject,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorObject {
    /// For people: what went wrong and, where it helps, what to do instead.
    pub message: String,
    #[serde(rename = "type")]
    pub error_type: ErrorType,
    pub code: ErrorKind,
    /// Always null: kept because OpenAI's clients read it.
    pub param: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_is_the_snake_case_name() {
        assert_eq!(ErrorKind::QueueFull.to_string(), "queue_full");
        assert_eq!(ErrorKind::InternalError.to_string(), "internal_error");
        assert_eq!(serde_json::to_string(&ErrorKind::AdaptersFull).unwrap(), "\"adapters_full\"");
    }
}

/// The failures `/v1/extract` and `/v1/chat/completions` document, described once for both.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Only its OpenAPI description is used.
pub enum InferenceErrors {
    #[response(
        status = 400,
        description = "Malformed or out-of-range fields (`min_pixels`/`max_pixels` name themselves), a missing or corrupt image, a JSON Schema that does not parse, is too large or with `strict` cannot be enforced; on `/v1/extract`, a PDF that is truncated, needs a password, has no pages or cannot be read, or `pages` outside it (`truncated_pdf`, `pdf_needs_password`, `empty_pdf`, `invalid_pdf`, `invalid_pages`)"
    )]
    BadRequest(ErrorResponse),
    #[response(status = 403, description = "An adapter name that leads outside the adapters folder (`adapter_path_outside`)")]
    Forbidden(ErrorResponse),
    #[response(status = 404, description = "No such adapter or model (`adapter_not_found`, `model_not_found`)")]
    NotFound(ErrorResponse),
    #[response(
        status = 413,
        description = "The body is over `max_body_bytes`, an image declares more than `max_image_pixels`, or a PDF request selects more than `max_pdf_pages` pages (`body_too_large`, `image_too_large`, `too_many_pages`)"
    )]
    TooLarge(ErrorResponse),
    #[response(
        status = 415,
        description = "Not an image the server decodes (`unsupported_image`); on `/v1/extract`, also a body that is neither multipart, an image nor a PDF (`unsupported_content_type`), or a body sent as a PDF that is not one (`not_a_pdf`)"
    )]
    UnsupportedMedia(ErrorResponse),
    #[response(status = 429, description = "The queue is full (`queue_full`)", headers(("Retry-After" = u64, description = "Seconds to wait before retrying")))]
    QueueFull(ErrorResponse),
    #[response(
        status = 503,
        description = "The model is loading, the server is shutting down, or every adapter slot is held (`unavailable`, `adapters_full`, `cancelled`)",
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))
    )]
    Unavailable(ErrorResponse),
    #[response(status = 504, description = "The request ran past `request_timeout_secs` (`timeout`)")]
    Timeout(ErrorResponse),
}
