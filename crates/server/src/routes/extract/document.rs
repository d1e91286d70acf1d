//! A PDF on `/v1/extract`: checked and opened in the renderer (a refused document is a 4xx
//! before any model work), its pages rendered and preprocessed, then all submitted at once, so
//! that the engine admits them together and they batch. The answer collects the pages, or
//! streams each as it finishes.

use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, FuturesUnordered};
use futures_util::{Stream, StreamExt};
use qwen_ocr_model::config::PreprocessorConfig;
use qwen_ocr_model::preprocess::image::{self, ImageOptions, PreprocessedImage};
use qwen_ocr_scheduler::RequestStream;
use tokio::sync::mpsc;

use super::Plan;
use crate::answer;
use crate::api::extract::{PageExtraction, Timings};
use crate::api::Usage;
use crate::documents::boxes::Geometry;
use crate::documents::isolated::{PageOutcome, RenderJob};
use crate::documents::pages::PageSelection;
use crate::error::{ApiError, ApiResult};
use crate::inference::{self, finish_reason};
use crate::pixel_budget::PixelBudget;
use crate::state::AppState;

/// A page ready for the model, or why it is not.
struct PreparedPage {
    page: u32,
    image: Result<(PreprocessedImage, Geometry, f64), String>,
}

pub(super) async fn respond(
    state: Arc<AppState>,
    plan: Arc<Plan>,
    pdf: Vec<u8>,
    pages: Option<PageSelection>,
    budget: PixelBudget,
    streamed: bool,
) -> ApiResult<Response> {
    let renderer = state.renderer()?;
    let slot = state.render_slots.clone().acquire_owned().await.map_err(|_| ApiError::internal("the renderers are shut"))?;
    let job = RenderJob { pages, max_pages: state.config.max_pdf_pages, max_pixels: budget.max_pixels };
    let session = tokio::task::spawn_blocking(move || renderer.open(pdf.into(), job))
        .await
        .map_err(|e| ApiError::internal(format!("the renderer failed: {e}")))??;
    let page_count = session.info().page_count;

    let config = inference::preprocessor(&state)?;
    let options = budget.image_options(state.config.max_image_pixels);
    let deadline = Instant::now() + Duration::from_secs(state.config.request_timeout_secs);
    let (tx, mut rx) = mpsc::channel(1);
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        // Rendering stops when nobody waits for its pages any more (the client went away).
        session.render(Some(deadline), |outcome| match tx.blocking_send(prepare(outcome, &config, &options)) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        });
    });
    let mut prepared = Vec::new();
    while let Some(page) = rx.recv().await {
        prepared.push(page);
    }
    let results = page_results(&state, &plan, prepared);
    if streamed {
        return Ok(event_stream(results).into_response());
    }
    let mut pages: Vec<PageExtraction> = results.collect().await;
    pages.sort_by_key(|p| p.page);
    Ok(Json(plan.document(&state, page_count, pages)).into_response())
}

/// A rendered page preprocessed as an upload would be (its pixels as they are: no second
/// encoding), or why it could not be.
fn prepare(outcome: PageOutcome, config: &PreprocessorConfig, options: &ImageOptions) -> PreparedPage {
    match outcome {
        PageOutcome::Failed { page, error } => PreparedPage { page, image: Err(error) },
        PageOutcome::Rendered { page, rendered } => {
            let image = image::preprocess_rgb(&rendered.image, config, options).map_err(|e| e.to_string()).map(|image| {
                let (width, height) = rendered.image.dimensions();
                (Geometry { width, height, resized: image.resized }, image)
            });
            PreparedPage { page, image: image.map(|(geometry, image)| (image, geometry, rendered.dpi)) }
        }
    }
}

/// Each page's result as it finishes: the pages are submitted together and read as the engine
/// finishes them, in whatever order that is; pages that could not be submitted come first.
fn page_results(
    state: &Arc<AppState>,
    plan: &Arc<Plan>,
    prepared: Vec<PreparedPage>,
) -> impl Stream<Item = PageExtraction> + Send + 'static {
    let mut failed = Vec::new();
    let running: FuturesUnordered<BoxFuture<'static, PageExtraction>> = FuturesUnordered::new();
    for page in prepared {
        match submit(state, plan, page) {
            Ok(page) => running.push(page),
            Err(page) => failed.push(*page),
        }
    }
    stream::iter(failed).chain(running)
}

/// Queues a page; a page that cannot be (not rendered, queue full, too long for the cache)
/// fails on its own.
fn submit(
    state: &Arc<AppState>,
    plan: &Arc<Plan>,
    prepared: PreparedPage,
) -> Result<BoxFuture<'static, PageExtraction>, Box<PageExtraction>> {
    let page = prepared.page;
    let (image, geometry, dpi) = prepared.image.map_err(|error| Box::new(failed(page, None, None, error)))?;
    match inference::submit(state, plan.request(image)) {
        Ok(stream) => Ok(Box::pin(finish_page(state.clone(), plan.clone(), page, geometry, Some(dpi), stream))),
        Err(e) => Err(Box::new(failed(page, Some(&geometry), Some(dpi), e.message))),
    }
}

/// A submitted page's result once the engine is done with it.
pub(super) async fn finish_page(
    state: Arc<AppState>,
    plan: Arc<Plan>,
    page: u32,
    geometry: Geometry,
    dpi: Option<f64>,
    stream: RequestStream,
) -> PageExtraction {
    let done = match inference::complete(stream, plan.adapter_name.as_deref()).await {
        Ok(done) => done,
        Err(e) => return failed(page, Some(&geometry), dpi, e.message),
    };
    let reading = match answer::read(&state, &done, plan.constraint.as_deref(), &geometry, page) {
        Ok(reading) => reading,
        Err(e) => return failed(page, Some(&geometry), dpi, e.message),
    };
    PageExtraction {
        page,
        width: Some(geometry.width),
        height: Some(geometry.height),
        dpi,
        data: reading.data,
        raw: done.text.clone(),
        confidence: reading.confidence,
        schema: reading.schema,
        boxes: reading.boxes,
        finish_reason: Some(finish_reason(done.finish_reason)),
        usage: Usage::new(done.prompt_tokens, done.token_ids.len()),
        timings: Some(Timings::from(&done.timings)),
        error: reading.error,
    }
}

/// A page that never got an answer.
fn failed(page: u32, geometry: Option<&Geometry>, dpi: Option<f64>, error: String) -> PageExtraction {
    PageExtraction {
        page,
        width: geometry.map(|g| g.width),
        height: geometry.map(|g| g.height),
        dpi,
        data: serde_json::Value::Null,
        raw: String::new(),
        confidence: None,
        schema: Default::default(),
        boxes: Vec::new(),
        finish_reason: None,
        usage: Usage::new(0, 0),
        timings: None,
        error: Some(error),
    }
}

/// The SSE answer: one event per page as it finishes, then `[DONE]`. Dropping it (the client
/// went away) cancels the pages still running and stops the renderer.
pub(super) fn event_stream(
    pages: impl Stream<Item = PageExtraction> + Send + 'static,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    // The API types are plain structs with string keys: serializing them cannot fail.
    let events = pages
        .map(|page| Ok(SseEvent::default().json_data(&page).expect("API types serialize")))
        .chain(stream::once(async { Ok(SseEvent::default().data("[DONE]")) }));
    Sse::new(events).keep_alive(KeepAlive::default())
}
