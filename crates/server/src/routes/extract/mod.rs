//! `POST /v1/extract`: one image or PDF in (multipart `image` or `file` part, or a raw
//! `image/*` or `application/pdf` body), the JSON the model read from it out; for a PDF, page
//! by page, each page its own sequence in the engine so that the pages batch.

mod document;
mod input;

pub use input::{read_multipart, Upload, UploadKind};

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use qwen_ocr_model::adapters::lora::LoraAdapter;
use qwen_ocr_model::decoding::sampling::SamplingParams;
use qwen_ocr_model::preprocess::image::PreprocessedImage;
use qwen_ocr_model::preprocess::prompt::ChatMessage;
use qwen_ocr_model::schema::Constraint;
use qwen_ocr_model::GenerateRequest;

use crate::answer;
use crate::api::error::InferenceErrors;
use crate::api::extract::{DocumentExtraction, ExtractForm, ExtractOptions, Extraction, ExtractionEvent, RawImage, RawPdf, Timings};
use crate::api::{AdapterHeader, ObjectKind, Usage};
use crate::documents::pages::PageSelection;
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::inference::{self, finish_reason};
use crate::metrics::AdapterLabel;
use crate::pixel_budget::PixelBounds;
use crate::profile::parse_schema;
use crate::schema_report;
use crate::state::AppState;

/// Reads one image, or the pages of a PDF: the JSON the model found, checked against the
/// profile's schema.
#[utoipa::path(
    post,
    path = "/v1/extract",
    tag = "generation",
    params(AdapterHeader, ExtractOptions),
    request_body(description = "A multipart form, or the image or PDF itself with the options in the query string", content(
        (ExtractForm = "multipart/form-data"),
        (RawImage = "image/png"),
        (RawImage = "image/jpeg"),
        (RawImage = "image/webp"),
        (RawPdf = "application/pdf"),
        (RawImage = "application/octet-stream"),
    )),
    responses(
        (status = 200, description = "What the model read: an `Extraction` for an image, a `DocumentExtraction` (one result per page) for a PDF; with `stream`, `text/event-stream` events each carrying one page's `PageExtraction` as it finishes, then `[DONE]`", content(
            (crate::api::extract::ExtractResponse = "application/json"),
            (ExtractionEvent = "text/event-stream"),
        ), headers(
            ("x-qwen-ocr-schema-relaxed" = String, description = "The schema keywords the grammar did not enforce as written, comma-separated (each with its path in `schema_relaxed`); absent when none"),
        )),
        InferenceErrors,
    ),
)]
pub async fn extract(State(state): State<Arc<AppState>>, headers: HeaderMap, request: Request) -> ApiResult<Response> {
    let (upload, options) = input::read_request(&headers, request).await?;
    // Checked after reading the body, so that clients still sending it get the answer.
    let adapter = inference::resolve_adapter(&state, &headers, None).await?;
    if upload.bytes.is_empty() {
        return Err(ApiError::new(ErrorKind::MissingImage, "the upload is empty"));
    }
    let pages =
        options.pages.as_deref().map(str::parse::<PageSelection>).transpose().map_err(|e| ApiError::new(ErrorKind::InvalidPages, e))?;
    let adapter_name = adapter.as_ref().map(|a| a.name.clone());
    let profile = state.profile(adapter_name.as_deref());
    let request_bounds = inference::check_bounds(&state, PixelBounds::new(options.min_pixels, options.max_pixels), "")?;
    let profile_bounds = PixelBounds::new(profile.settings.min_pixels, profile.settings.max_pixels);
    let budget = inference::pixel_budget(&state, request_bounds, profile_bounds, "")?;
    let max_new_tokens = inference::check_max_tokens(&state, options.max_tokens.or(profile.settings.max_tokens.map(|n| n as i64)))?;
    let sampling = inference::sampling(&state, options.temperature.or(profile.settings.temperature), None, None)?;
    let constraint = match options.schema {
        Some(text) => Some(inference::compile_schema(&state, parse_schema(&text)?, options.strict.unwrap_or(false)).await?),
        None => profile.constraint.clone(),
    };
    let plan = Arc::new(Plan {
        id: format!("extract-{}", uuid::Uuid::new_v4().simple()),
        prompt: options.prompt.unwrap_or_else(|| state.extraction_prompt(adapter_name.as_deref())),
        max_new_tokens,
        sampling,
        constraint,
        adapter,
        adapter_name: adapter_name.clone(),
    });
    let streamed = options.stream.unwrap_or(false);
    let constraint = plan.constraint.clone();
    let mut response = match upload.kind {
        input::UploadKind::Pdf => document::respond(state.clone(), plan, upload.bytes, pages, budget, streamed).await?,
        input::UploadKind::Image if pages.is_some() => {
            return Err(ApiError::new(ErrorKind::InvalidPages, "pages selects pages of a PDF; this upload is an image"))
        }
        input::UploadKind::Image => {
            let (image, geometry) = inference::preprocess_upload(&state, upload.bytes, budget).await?;
            let stream = inference::submit(&state, plan.request(image))?;
            if streamed {
                let page = document::finish_page(state.clone(), plan.clone(), 1, geometry, None, stream);
                document::event_stream(futures_util::stream::once(page)).into_response()
            } else {
                let done = inference::complete(stream, plan.adapter_name.as_deref()).await?;
                let reading = answer::read(&state, &done, plan.constraint.as_deref(), &geometry, 1)?;
                Json(Extraction {
                    id: plan.id.clone(),
                    object: ObjectKind::Extraction,
                    model: state.config.model.clone(),
                    adapter: plan.adapter_name.clone(),
                    data: reading.data,
                    raw: done.text.clone(),
                    finish_reason: finish_reason(done.finish_reason),
                    usage: Usage::new(done.prompt_tokens, done.token_ids.len()),
                    timings: Timings::from(&done.timings),
                    error: reading.error,
                    confidence: reading.confidence,
                    schema: reading.schema,
                    boxes: reading.boxes,
                })
                .into_response()
            }
        }
    };
    schema_report::set_header(&mut response, constraint.as_deref());
    response.extensions_mut().insert(AdapterLabel(adapter_name.unwrap_or_default()));
    Ok(response)
}

/// What every image (every page) of one request is read with.
struct Plan {
    id: String,
    prompt: String,
    max_new_tokens: Option<usize>,
    sampling: SamplingParams,
    constraint: Option<Arc<Constraint>>,
    adapter: Option<Arc<LoraAdapter>>,
    adapter_name: Option<String>,
}

impl Plan {
    fn request(&self, image: PreprocessedImage) -> GenerateRequest {
        GenerateRequest {
            messages: vec![ChatMessage::user_with_images(1, &self.prompt)],
            images: vec![image],
            max_new_tokens: self.max_new_tokens,
            sampling: self.sampling.clone(),
            stop: vec![],
            adapter: self.adapter.clone(),
            // Confidences are made of the chosen tokens' probabilities.
            top_logprobs: self.constraint.as_ref().map(|_| 0),
            grammar: self.constraint.as_ref().map(|c| c.grammar.clone()),
        }
    }

    fn document(&self, state: &AppState, page_count: u32, pages: Vec<crate::api::extract::PageExtraction>) -> DocumentExtraction {
        let usage = pages.iter().fold(Usage::new(0, 0), |sum, p| {
            Usage::new(sum.prompt_tokens + p.usage.prompt_tokens, sum.completion_tokens + p.usage.completion_tokens)
        });
        DocumentExtraction {
            id: self.id.clone(),
            object: ObjectKind::Extraction,
            model: state.config.model.clone(),
            adapter: self.adapter_name.clone(),
            page_count,
            pages,
            usage,
        }
    }
}
