//! `POST /v1/extract`: one image in (multipart `image` part, or a raw `image/*` body), the
//! JSON the model read from it out.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use qwen_ocr_model::preprocess::prompt::ChatMessage;
use qwen_ocr_model::GenerateRequest;
use serde_json::Value;

use super::{body_error, unreadable_body};
use crate::api::error::InferenceErrors;
use crate::api::extract::{ExtractForm, ExtractOptions, Extraction, RawImage, Timings};
use crate::api::schema::SchemaReport;
use crate::api::{AdapterHeader, ObjectKind, Usage};
use crate::confidence::field_confidences;
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::extract_json::extract_json;
use crate::inference::{self, finish_reason};
use crate::metrics::AdapterLabel;
use crate::profile::parse_schema;
use crate::schema_report;
use crate::state::AppState;

/// Reads one image: the JSON the model found in it, checked against the profile's schema.
#[utoipa::path(
    post,
    path = "/v1/extract",
    tag = "generation",
    params(AdapterHeader, ExtractOptions),
    request_body(description = "A multipart form, or the image itself with the options in the query string", content(
        (ExtractForm = "multipart/form-data"),
        (RawImage = "image/png"),
        (RawImage = "image/jpeg"),
        (RawImage = "image/webp"),
        (RawImage = "application/octet-stream"),
    )),
    responses(
        (status = 200, description = "What the model read", body = Extraction, headers(
            ("x-qwen-ocr-schema-relaxed" = String, description = "The schema keywords the grammar did not enforce as written, comma-separated (each with its path in `schema_relaxed`); absent when none"),
        )),
        InferenceErrors,
    ),
)]
pub async fn extract(State(state): State<Arc<AppState>>, headers: HeaderMap, request: Request) -> ApiResult<Response> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let (image, options) = if content_type.starts_with("multipart/form-data") {
        read_multipart(request).await?
    } else if content_type.starts_with("image/") || content_type == "application/octet-stream" {
        let options = Query::<ExtractOptions>::try_from_uri(request.uri())
            .map_err(|e| ApiError::new(ErrorKind::InvalidQuery, format!("invalid query string: {}", e.body_text())))?
            .0;
        let body = Bytes::from_request(request, &()).await.map_err(body_error)?;
        (body.to_vec(), options)
    } else {
        return Err(ApiError::new(
            ErrorKind::UnsupportedContentType,
            "send multipart/form-data with an `image` file part, or the image itself with an image/* content type",
        ));
    };
    // Checked after reading the body, so that clients still sending it get the answer.
    let adapter = inference::resolve_adapter(&state, &headers, None).await?;
    if image.is_empty() {
        return Err(ApiError::new(ErrorKind::MissingImage, "the image is empty"));
    }
    let adapter_name = adapter.as_ref().map(|a| a.name.clone());
    let profile = state.profile(adapter_name.as_deref());
    let max_new_tokens = inference::check_max_tokens(&state, options.max_tokens.or(profile.settings.max_tokens.map(|n| n as i64)))?;
    let sampling = inference::sampling(&state, options.temperature.or(profile.settings.temperature), None, None)?;
    let prompt = options.prompt.unwrap_or_else(|| state.extraction_prompt(adapter_name.as_deref()));
    let constraint = match options.schema {
        Some(text) => Some(inference::compile_schema(&state, parse_schema(&text)?, options.strict.unwrap_or(false)).await?),
        None => profile.constraint.clone(),
    };
    let pixels = (profile.settings.min_pixels, profile.settings.max_pixels);
    let images = inference::preprocess_images_within(&state, vec![image], pixels).await?;
    let request = GenerateRequest {
        messages: vec![ChatMessage::user_with_images(images.len(), &prompt)],
        images,
        max_new_tokens,
        sampling,
        stop: vec![],
        adapter,
        // Confidences are made of the chosen tokens' probabilities.
        top_logprobs: constraint.as_ref().map(|_| 0),
        grammar: constraint.as_ref().map(|c| c.grammar.clone()),
    };
    let stream = inference::submit(&state, request)?;
    let done = inference::complete(stream, adapter_name.as_deref()).await?;
    let mut body = Extraction {
        id: format!("extract-{}", uuid::Uuid::new_v4().simple()),
        object: ObjectKind::Extraction,
        model: state.config.model.clone(),
        adapter: adapter_name.clone(),
        data: Value::Null,
        raw: done.text.clone(),
        finish_reason: finish_reason(done.finish_reason),
        usage: Usage::new(done.prompt_tokens, done.token_ids.len()),
        timings: Timings::from(&done.timings),
        error: None,
        confidence: None,
        schema: SchemaReport::default(),
    };
    match constraint.as_deref() {
        None => match extract_json(&done.text) {
            Ok(data) => body.data = data,
            Err(why) => body.error = Some(why),
        },
        Some(constraint) => {
            let (report, data) = schema_report::checked(constraint, &done.text, done.finish_reason);
            if let Some(data) = data {
                // The grammar admitted only JSON; the check covers what it was relaxed of.
                body.data = data;
                let vocabulary = state.engine()?.vocabulary()?;
                let bytes = |t| if vocabulary.is_special(t) { Vec::new() } else { vocabulary.token_bytes(t) };
                body.confidence = Some(field_confidences(&done.logprobs, bytes));
            }
            if !report.schema_errors.is_empty() {
                let what = if body.data.is_null() { "" } else { "the answer does not pass the full schema check: " };
                body.error = Some(format!("{what}{}", report.schema_errors.join("; ")));
            }
            body.schema = report;
        }
    }
    let mut response = Json(body).into_response();
    schema_report::set_header(&mut response, constraint.as_deref());
    response.extensions_mut().insert(AdapterLabel(adapter_name.unwrap_or_default()));
    Ok(response)
}

/// The `image` file part and the optional text fields.
pub async fn read_multipart(request: Request) -> ApiResult<(Vec<u8>, ExtractOptions)> {
    let mut form = Multipart::from_request(request, &())
        .await
        .map_err(|e| unreadable_body(e.status(), format!("invalid multipart body: {}", e.body_text()), ErrorKind::InvalidMultipart))?;
    let mut image = None;
    let mut options = ExtractOptions::default();
    let broken = |e: axum::extract::multipart::MultipartError| {
        unreadable_body(e.status(), format!("invalid multipart body: {}", e.body_text()), ErrorKind::InvalidMultipart)
    };
    while let Some(field) = form.next_field().await.map_err(broken)? {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "image" | "file" => {
                if image.is_some() {
                    return Err(ApiError::new(
                        ErrorKind::TooManyImages,
                        "/v1/extract takes one image; use /v1/chat/completions for several",
                    ));
                }
                image = Some(field.bytes().await.map_err(broken)?.to_vec());
            }
            "prompt" => options.prompt = Some(field.text().await.map_err(broken)?),
            "max_tokens" => options.max_tokens = Some(parse_field(&name, &field.text().await.map_err(broken)?)?),
            "temperature" => options.temperature = Some(parse_field(&name, &field.text().await.map_err(broken)?)?),
            "schema" => options.schema = Some(field.text().await.map_err(broken)?),
            "strict" => options.strict = Some(parse_field(&name, &field.text().await.map_err(broken)?.to_ascii_lowercase())?),
            other => return Err(ApiError::new(ErrorKind::UnknownField, format!("unknown form field `{other}`"))),
        }
    }
    let image = image.ok_or_else(|| ApiError::new(ErrorKind::MissingImage, "the form has no `image` file part"))?;
    Ok((image, options))
}

fn parse_field<T: std::str::FromStr>(name: &str, value: &str) -> ApiResult<T> {
    value.trim().parse().map_err(|_| {
        let kind = if name == "strict" { "`true` or `false`" } else { "a valid number" };
        ApiError::new(ErrorKind::InvalidField, format!("form field `{name}` is not {kind}: `{value}`"))
    })
}
