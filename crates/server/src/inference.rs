//! The steps both generation routes share: choosing the adapter, decoding images, checking
//! limits, submitting to the engine and reporting what came back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use qwen_ocr_model::adapters::lora::LoraAdapter;
use qwen_ocr_model::config::PreprocessorConfig;
use qwen_ocr_model::decoding::sampling::SamplingParams;
use qwen_ocr_model::preprocess::image::{self, PreprocessedImage};
use qwen_ocr_model::schema::Constraint;
use qwen_ocr_model::{FinishReason, GenerateRequest, ImageError};
use qwen_ocr_scheduler::{Completion, Request, RequestStream};
use serde_json::Value;

use crate::api;
use crate::config::FREE_IMAGE_PIXELS;
use crate::documents::boxes::Geometry;
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::metrics;
use crate::on_demand::get_or_load;
use crate::pixel_budget::{self, PixelBounds, PixelBudget};
use crate::state::AppState;

/// The header that picks an adapter per request; it wins over the `model` field.
pub const ADAPTER_HEADER: &str = "x-adapter";
/// Names the base model (no adapter) wherever an adapter name is accepted.
pub const BASE_MODEL: &str = "base";

/// The adapter a request asked for: `X-Adapter`, else the `model` field; `base`, the served
/// model's own id or nothing mean no adapter. One not yet resident is loaded from the adapters
/// folder.
pub async fn resolve_adapter(state: &Arc<AppState>, headers: &HeaderMap, model: Option<&str>) -> ApiResult<Option<Arc<LoraAdapter>>> {
    if let Some(value) = headers.get(ADAPTER_HEADER) {
        let name = value.to_str().map_err(|_| ApiError::new(ErrorKind::InvalidAdapter, "X-Adapter is not valid text"))?.trim();
        if name.is_empty() || name == BASE_MODEL {
            return Ok(None);
        }
        return get_or_load(state, name)
            .await?
            .map(Some)
            .ok_or_else(|| ApiError::new(ErrorKind::AdapterNotFound, format!("adapter `{name}` is not loaded (see GET /v1/adapters)")));
    }
    match model {
        None | Some("") | Some(BASE_MODEL) => Ok(None),
        Some(m) if m == state.config.model => Ok(None),
        Some(name) => get_or_load(state, name).await?.map(Some).ok_or_else(|| {
            ApiError::new(ErrorKind::ModelNotFound, format!("model `{name}` does not exist: use `{BASE_MODEL}` or a loaded adapter's name"))
        }),
    }
}

/// Decodes and preprocesses images off the async threads, each within its own budget.
pub async fn preprocess_images(state: &Arc<AppState>, images: Vec<(Vec<u8>, PixelBudget)>) -> ApiResult<Vec<PreprocessedImage>> {
    let limit = state.config.max_images_per_request;
    if images.len() > limit {
        return Err(ApiError::new(ErrorKind::TooManyImages, format!("{} images, the limit is {limit} per request", images.len())));
    }
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let engine = state.engine()?;
        images
            .iter()
            .map(|(bytes, budget)| {
                // Each image may declare only as many pixels as its size pays for.
                let options = budget.image_options(state.config.image_pixel_budget(bytes.len()));
                engine.preprocess(bytes, &options).map_err(|e| over_budget(e, bytes.len(), &state))
            })
            .collect::<ApiResult<Vec<_>>>()
    })
    .await
    .map_err(|e| ApiError::internal(format!("image decoding failed: {e}")))?
}

/// An image refused for its declared size, saying which limit it passed: `max_image_pixels`,
/// or the budget its file size gives it.
fn over_budget(e: qwen_ocr_model::Error, file_bytes: usize, state: &AppState) -> ApiError {
    let config = &state.config;
    match e {
        qwen_ocr_model::Error::Image(ImageError::TooLarge { width, height, pixels, limit }) if limit < config.max_image_pixels => {
            let message = format!(
                "the image declares {width}x{height} = {pixels} pixels in a file of {file_bytes} bytes: a file that size may declare \
                 at most {limit} ({FREE_IMAGE_PIXELS} plus max_image_pixels_per_byte = {} a byte), so that a small upload cannot \
                 buy long decoding",
                config.max_image_pixels_per_byte
            );
            ApiError::new(ErrorKind::ImageTooLarge, message)
        }
        e => e.into(),
    }
}

/// One upload decoded (EXIF orientation applied) and preprocessed, with its geometry: the size
/// the caller sees and the size the model will see.
pub async fn preprocess_upload(state: &Arc<AppState>, bytes: Vec<u8>, budget: PixelBudget) -> ApiResult<(PreprocessedImage, Geometry)> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let engine = state.engine()?;
        let declared = state.config.image_pixel_budget(bytes.len());
        let options = budget.image_options(declared);
        let rgb = image::decode_rgb(&bytes, declared).map_err(|e| over_budget(e, bytes.len(), &state))?;
        let image = image::preprocess_rgb(&rgb, engine.preprocessor(), &options)?;
        let geometry = Geometry { width: rgb.width(), height: rgb.height(), resized: image.resized };
        Ok((image, geometry))
    })
    .await
    .map_err(|e| ApiError::internal(format!("image decoding failed: {e}")))?
}

/// The checkpoint's image preprocessing settings (patch size, resize bounds).
pub fn preprocessor(state: &AppState) -> ApiResult<PreprocessorConfig> {
    Ok(state.engine()?.preprocessor().clone())
}

/// A request's own resize bounds, each between one merged patch and the resize cap (400 naming
/// `prefix` + the field otherwise).
pub fn check_bounds(state: &AppState, bounds: PixelBounds, prefix: &str) -> ApiResult<PixelBounds> {
    bounds.checked(state.engine()?.preprocessor().factor(), prefix)
}

/// The budget of one image of a request: the request's bounds (already through
/// [`check_bounds`]) over the adapter profile's, the server's and the checkpoint's.
pub fn pixel_budget(state: &AppState, request: PixelBounds, profile: PixelBounds, prefix: &str) -> ApiResult<PixelBudget> {
    let config = PixelBounds::new(state.config.min_pixels, state.config.max_pixels);
    pixel_budget::resolve(request, profile, config, state.engine()?.preprocessor(), prefix)
}

/// `max_tokens` must be between 1 and the configured limit.
pub fn check_max_tokens(state: &AppState, max_tokens: Option<i64>) -> ApiResult<Option<usize>> {
    let limit = state.config.max_tokens_limit;
    match max_tokens {
        None => Ok(None),
        Some(n) if n >= 1 && n as u64 <= limit as u64 => Ok(Some(n as usize)),
        Some(n) => Err(ApiError::new(ErrorKind::InvalidMaxTokens, format!("max_tokens must be between 1 and {limit}, got {n}"))),
    }
}

/// The checkpoint's sampling defaults with the request's overrides.
pub fn sampling(state: &AppState, temperature: Option<f64>, top_p: Option<f64>, seed: Option<u64>) -> ApiResult<SamplingParams> {
    let mut params = state.engine()?.default_sampling();
    if let Some(t) = temperature {
        params.temperature = t;
    }
    if let Some(p) = top_p {
        params.top_p = p;
    }
    params.seed = seed;
    params.validate()?;
    Ok(params)
}

/// Compiles a JSON Schema into a decoding constraint off the async threads (a hit in the
/// compiled-schema cache is immediate). A schema that cannot be used, or with `strict` one
/// that cannot be enforced while decoding, is a 400.
pub async fn compile_schema(state: &Arc<AppState>, schema: Value, strict: bool) -> ApiResult<Arc<Constraint>> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || Ok(Arc::new(state.engine()?.compile_schema(&schema, strict)?)))
        .await
        .map_err(|e| ApiError::internal(format!("schema compilation failed: {e}")))?
}

/// Queues the request with the configured deadline.
pub fn submit(state: &AppState, request: GenerateRequest) -> ApiResult<RequestStream> {
    let deadline = Some(Instant::now() + Duration::from_secs(state.config.request_timeout_secs));
    state.engine()?.submit(Request { generate: request, deadline }).map_err(|e| {
        let mut error = ApiError::from(e);
        if error.kind == ErrorKind::QueueFull {
            error.retry_after = Some(state.config.retry_after_secs);
        }
        error
    })
}

/// Waits for the request to end; a timeout or an engine failure becomes an error response.
pub async fn complete(stream: RequestStream, adapter: Option<&str>) -> ApiResult<Completion> {
    let completion = stream.completion().await.ok_or_else(|| ApiError::internal("the engine stopped before the request finished"))?;
    record(&completion, adapter);
    match failure(&completion) {
        Some(error) => Err(error),
        None => Ok(completion),
    }
}

/// The error a finished request ended with, if it did not end normally.
pub fn failure(completion: &Completion) -> Option<ApiError> {
    let detail = completion.error.clone().unwrap_or_default();
    match completion.finish_reason {
        FinishReason::Stop | FinishReason::Length => None,
        FinishReason::Timeout => Some(ApiError::new(ErrorKind::Timeout, format!("request timed out: {detail}"))),
        FinishReason::Cancelled => Some(ApiError::new(ErrorKind::Cancelled, "the request was cancelled")),
        FinishReason::Error => Some(ApiError::internal(detail)),
    }
}

/// Per-request metrics: time to first token and token counts, by adapter.
pub fn record(completion: &Completion, adapter: Option<&str>) {
    let t = &completion.timings;
    let adapter = adapter.unwrap_or(BASE_MODEL).to_string();
    if !completion.token_ids.is_empty() {
        ::metrics::histogram!(metrics::TIME_TO_FIRST_TOKEN, "adapter" => adapter.clone()).record((t.queued_ms + t.prefill_ms) / 1e3);
    }
    ::metrics::counter!(metrics::COMPLETION_TOKENS, "adapter" => adapter).increment(completion.token_ids.len() as u64);
}

/// How generation ended, as OpenAI reports it.
pub fn finish_reason(reason: FinishReason) -> api::FinishReason {
    match reason {
        FinishReason::Length => api::FinishReason::Length,
        _ => api::FinishReason::Stop,
    }
}
