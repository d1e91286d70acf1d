//! The steps both generation routes share: choosing the adapter, decoding images, checking
//! limits, submitting to the engine and reporting what came back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use qwen_ocr_model::config::PreprocessorConfig;
use qwen_ocr_model::grammar::Grammar;
use qwen_ocr_model::image::{self, PreprocessedImage};
use qwen_ocr_model::lora::LoraAdapter;
use qwen_ocr_model::sampling::SamplingParams;
use qwen_ocr_model::{FinishReason, GenerateRequest};
use qwen_ocr_scheduler::{Completion, Request, RequestStream};
use serde_json::Value;

use crate::api;
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
    let config = preprocessor(state)?;
    let max_decoded = state.config.max_image_pixels;
    tokio::task::spawn_blocking(move || {
        images
            .iter()
            .map(|(bytes, budget)| image::preprocess(bytes, &config, &budget.image_options(max_decoded)))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::internal(format!("image decoding failed: {e}")))?
    .map_err(ApiError::from)
}

/// One upload decoded (EXIF orientation applied) and preprocessed, with its geometry: the size
/// the caller sees and the size the model will see.
pub async fn preprocess_upload(state: &Arc<AppState>, bytes: Vec<u8>, budget: PixelBudget) -> ApiResult<(PreprocessedImage, Geometry)> {
    let config = preprocessor(state)?;
    let max_decoded = state.config.max_image_pixels;
    tokio::task::spawn_blocking(move || {
        let rgb = image::decode_rgb(&bytes, max_decoded)?;
        let image = image::preprocess_rgb(&rgb, &config, &budget.image_options(max_decoded))?;
        let geometry = Geometry { width: rgb.width(), height: rgb.height(), resized: image.resized };
        Ok::<_, qwen_ocr_model::Error>((image, geometry))
    })
    .await
    .map_err(|e| ApiError::internal(format!("image decoding failed: {e}")))?
    .map_err(ApiError::from)
}

/// The checkpoint's image preprocessing settings (patch size, resize bounds).
pub fn preprocessor(state: &AppState) -> ApiResult<PreprocessorConfig> {
    Ok(state.engine()?.pipeline().preprocessor.clone())
}

/// A request's own resize bounds, each between one merged patch and the resize cap (400 naming
/// `prefix` + the field otherwise).
pub fn check_bounds(state: &AppState, bounds: PixelBounds, prefix: &str) -> ApiResult<PixelBounds> {
    bounds.checked(preprocessor(state)?.factor(), prefix)
}

/// The budget of one image of a request: the request's (checked) bounds over the adapter
/// profile's, the server's and the checkpoint's.
pub fn pixel_budget(state: &AppState, request: PixelBounds, profile: PixelBounds, prefix: &str) -> ApiResult<PixelBudget> {
    let checkpoint = preprocessor(state)?;
    let request = request.checked(checkpoint.factor(), prefix)?;
    let config = PixelBounds::new(state.config.min_pixels, state.config.max_pixels);
    pixel_budget::resolve(request, profile, config, &checkpoint, prefix)
}

/// Generated tokens as text with the special tokens kept (`raw` drops them; boxes are written
/// with them).
pub fn text_with_special_tokens(state: &AppState, ids: &[u32]) -> ApiResult<String> {
    state.engine()?.pipeline().prompt.tokenizer().decode(ids, false).map_err(|e| ApiError::internal(format!("decoding the answer: {e}")))
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
    let mut params = state.engine()?.pipeline().default_sampling();
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
/// compiled-schema cache is immediate). A schema that cannot be enforced is a 400.
pub async fn compile_schema(state: &AppState, schema: Value) -> ApiResult<Arc<Grammar>> {
    let pipeline = state.engine()?.pipeline().clone();
    tokio::task::spawn_blocking(move || pipeline.vocabulary()?.compile(&schema))
        .await
        .map_err(|e| ApiError::internal(format!("schema compilation failed: {e}")))?
        .map_err(ApiError::from)
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
