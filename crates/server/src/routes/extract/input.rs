//! What a `/v1/extract` request sends: the upload (the multipart `image` or `file` part, or the
//! body itself) and its options (the form's text parts, or the query string).

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Query, Request};
use axum::http::{header, HeaderMap};

use crate::api::extract::ExtractOptions;
use crate::documents::pdf::is_pdf;
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::routes::{body_error, unreadable_body};

/// An uploaded file and what it is.
pub struct Upload {
    pub bytes: Vec<u8>,
    pub kind: UploadKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadKind {
    Image,
    Pdf,
}

impl Upload {
    /// A PDF when its content type says so (and then it must be one) or its header does; an
    /// image otherwise, for the image decoder to accept or refuse.
    fn new(bytes: Vec<u8>, content_type: Option<&str>) -> ApiResult<Self> {
        let declared_pdf = content_type.is_some_and(|t| t.trim().to_ascii_lowercase().starts_with("application/pdf"));
        let kind = if is_pdf(&bytes) { UploadKind::Pdf } else { UploadKind::Image };
        if declared_pdf && kind != UploadKind::Pdf && !bytes.is_empty() {
            return Err(ApiError::new(ErrorKind::NotAPdf, "sent as application/pdf, but it has no %PDF- header: it is not a PDF"));
        }
        Ok(Self { bytes, kind })
    }
}

/// The upload and its options, from a multipart form or a raw body.
pub async fn read_request(headers: &HeaderMap, request: Request) -> ApiResult<(Upload, ExtractOptions)> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if content_type.starts_with("multipart/form-data") {
        read_multipart(request).await
    } else if content_type.starts_with("image/")
        || content_type.starts_with("application/pdf")
        || content_type == "application/octet-stream"
    {
        let options = Query::<ExtractOptions>::try_from_uri(request.uri())
            .map_err(|e| ApiError::new(ErrorKind::InvalidQuery, format!("invalid query string: {}", e.body_text())))?
            .0;
        let body = Bytes::from_request(request, &()).await.map_err(body_error)?;
        Ok((Upload::new(body.to_vec(), Some(&content_type))?, options))
    } else {
        Err(ApiError::new(
            ErrorKind::UnsupportedContentType,
            "send multipart/form-data with an `image` file part, or the image or PDF itself with an image/* or application/pdf content type",
        ))
    }
}

/// The `image` (or `file`) part and the optional text fields.
pub async fn read_multipart(request: Request) -> ApiResult<(Upload, ExtractOptions)> {
    let mut form = Multipart::from_request(request, &())
        .await
        .map_err(|e| unreadable_body(e.status(), format!("invalid multipart body: {}", e.body_text()), ErrorKind::InvalidMultipart))?;
    let mut upload = None;
    let mut options = ExtractOptions::default();
    let broken = |e: axum::extract::multipart::MultipartError| {
        unreadable_body(e.status(), format!("invalid multipart body: {}", e.body_text()), ErrorKind::InvalidMultipart)
    };
    while let Some(field) = form.next_field().await.map_err(broken)? {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "image" | "file" => {
                if upload.is_some() {
                    return Err(ApiError::new(
                        ErrorKind::TooManyImages,
                        "/v1/extract takes one image or PDF; use /v1/chat/completions for several images",
                    ));
                }
                let content_type = field.content_type().map(str::to_string);
                let bytes = field.bytes().await.map_err(broken)?.to_vec();
                upload = Some(Upload::new(bytes, content_type.as_deref())?);
            }
            "prompt" => options.prompt = Some(field.text().await.map_err(broken)?),
            "max_tokens" => options.max_tokens = Some(parse_field(&name, &field.text().await.map_err(broken)?)?),
            "temperature" => options.temperature = Some(parse_field(&name, &field.text().await.map_err(broken)?)?),
            "schema" => options.schema = Some(field.text().await.map_err(broken)?),
            "strict" => options.strict = Some(parse_field(&name, &field.text().await.map_err(broken)?.to_ascii_lowercase())?),
            "pages" => options.pages = Some(field.text().await.map_err(broken)?),
            "min_pixels" => options.min_pixels = Some(parse_field(&name, &field.text().await.map_err(broken)?)?),
            "max_pixels" => options.max_pixels = Some(parse_field(&name, &field.text().await.map_err(broken)?)?),
            "stream" => options.stream = Some(parse_field(&name, &field.text().await.map_err(broken)?)?),
            other => return Err(ApiError::new(ErrorKind::UnknownField, format!("unknown form field `{other}`"))),
        }
    }
    let upload = upload.ok_or_else(|| ApiError::new(ErrorKind::MissingImage, "the form has no `image` file part"))?;
    Ok((upload, options))
}

fn parse_field<T: std::str::FromStr>(name: &str, value: &str) -> ApiResult<T> {
    value.trim().parse().map_err(|_| ApiError::new(ErrorKind::InvalidField, format!("form field `{name}` is not valid: `{value}`")))
}
