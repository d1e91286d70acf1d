//! `POST /v1/chat/completions`, compatible with OpenAI's clients: text and image content
//! parts, sampling fields, stop strings, and SSE streaming.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures_util::stream;
use qwen_ocr_model::decoding::logprobs::{TokenLogprob, MAX_TOP_LOGPROBS};
use qwen_ocr_model::preprocess::prompt::{ChatMessage, Content, ContentPart};
use qwen_ocr_model::schema::Constraint;
use qwen_ocr_model::GenerateRequest;
use qwen_ocr_scheduler::{Completion, Event, RequestStream};
use serde::Serialize;

use super::parse_json;
use crate::api::chat::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionEvent, ChatCompletionRequest, Choice, ChunkChoice,
    ContentPart as InPart, Delta, Message, MessageContent, ResponseFormat, Role, Stop,
};
use crate::api::error::InferenceErrors;
use crate::api::logprobs::ChoiceLogprobs;
use crate::api::schema::SchemaReport;
use crate::api::{AdapterHeader, FinishReason, ObjectKind, Usage};
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::inference::{self, finish_reason};
use crate::logprobs::openai_logprobs;
use crate::metrics::AdapterLabel;
use crate::pixel_budget::{PixelBounds, PixelBudget};
use crate::remote_image;
use crate::schema_report;
use crate::state::AppState;

/// A chat completion, whole or streamed.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    operation_id = "create_chat_completion",
    tag = "generation",
    params(AdapterHeader),
    request_body(content = ChatCompletionRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The completion; with `stream: true`, `text/event-stream` events each carrying a chunk (a stream that fails after it started ends with an `ErrorResponse` event), then `[DONE]`", content(
            (ChatCompletion = "application/json"),
            (ChatCompletionEvent = "text/event-stream"),
        ), headers(
            ("x-qwen-ocr-schema-relaxed" = String, description = "The `response_format` schema's keywords the grammar did not enforce as written, comma-separated (each with its path in `schema_relaxed`); absent when none"),
        )),
        InferenceErrors,
    ),
)]
pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let request: ChatCompletionRequest = parse_json(body)?;
    let adapter = inference::resolve_adapter(&state, &headers, request.model.as_deref()).await?;
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::new(ErrorKind::UnsupportedN, "only n=1 is supported"));
    }
    let top_logprobs = match (request.logprobs, request.top_logprobs) {
        (false, None) => None,
        (false, Some(_)) => return Err(ApiError::new(ErrorKind::InvalidLogprobs, "top_logprobs needs logprobs: true")),
        (true, None) => Some(0),
        (true, Some(n)) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Some(n as usize),
        (true, Some(n)) => {
            return Err(ApiError::new(
                ErrorKind::InvalidLogprobs,
                format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
            ))
        }
    };
    if request.messages.is_empty() {
        return Err(ApiError::new(ErrorKind::InvalidMessages, "messages must not be empty"));
    }
    let max_new_tokens = inference::check_max_tokens(&state, request.max_completion_tokens.or(request.max_tokens))?;
    let sampling = inference::sampling(&state, request.temperature, request.top_p, request.seed)?;
    let stop = match request.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) if v.len() <= 4 => v,
        Some(Stop::Many(_)) => return Err(ApiError::new(ErrorKind::InvalidStop, "at most 4 stop strings")),
    };
    let constraint = match request.response_format.and_then(ResponseFormat::schema) {
        Some((schema, strict)) => Some(inference::compile_schema(&state, schema, strict).await?),
        None => None,
    };
    let grammar = constraint.as_ref().map(|c| c.grammar.clone());
    let kwargs = request.mm_processor_kwargs.unwrap_or_default();
    let kwargs = inference::check_bounds(&state, PixelBounds::new(kwargs.min_pixels, kwargs.max_pixels), KWARGS)?;
    let (messages, chat_images) = convert_messages(&state, request.messages).await?;
    let adapter_name = adapter.as_ref().map(|a| a.name.clone());
    let budgets = pixel_budgets(&state, adapter_name.as_deref(), kwargs, &chat_images)?;
    let images = inference::preprocess_images(&state, chat_images.into_iter().map(|i| i.bytes).zip(budgets).collect()).await?;
    let generate = GenerateRequest { messages, images, max_new_tokens, sampling, stop, adapter, grammar, top_logprobs };
    let stream = inference::submit(&state, generate)?;
    let vocabulary = top_logprobs.map(|_| state.clone());

    let reply = Reply {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: adapter_name.clone().or(request.model).unwrap_or_else(|| inference::BASE_MODEL.into()),
        adapter: adapter_name.clone(),
        vocabulary,
        constraint,
    };
    let constraint = reply.constraint.clone();
    let mut response = if request.stream {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        stream_reply(reply, stream, include_usage).await?.into_response()
    } else {
        let done = inference::complete(stream, adapter_name.as_deref()).await?;
        Json(reply.completion(&done)).into_response()
    };
    schema_report::set_header(&mut response, constraint.as_deref());
    response.extensions_mut().insert(AdapterLabel(adapter_name.unwrap_or_default()));
    Ok(response)
}

/// A request body parsed and its messages converted as [`completions`] does, without the
/// model: how the fuzz target reaches both.
pub async fn parse_messages(state: &AppState, body: Bytes) -> ApiResult<(Vec<ChatMessage>, Vec<Vec<u8>>)> {
    let request: ChatCompletionRequest = parse_json(Ok(body))?;
    let (messages, images) = convert_messages(state, request.messages).await?;
    Ok((messages, images.into_iter().map(|i| i.bytes).collect()))
}

/// An image of a chat request: its bytes and its own resize bounds.
struct ChatImage {
    bytes: Vec<u8>,
    bounds: PixelBounds,
    /// Where it is in the request, for errors about its bounds.
    field: String,
}

/// Where `mm_processor_kwargs`' bounds are, for errors about them.
const KWARGS: &str = "mm_processor_kwargs.";

/// Each image's visual budget: its own bounds, else `mm_processor_kwargs` (checked), else the
/// adapter profile's, the server's and the checkpoint's.
fn pixel_budgets(state: &AppState, adapter: Option<&str>, kwargs: PixelBounds, images: &[ChatImage]) -> ApiResult<Vec<PixelBudget>> {
    let profile = state.profile(adapter);
    let profile = PixelBounds::new(profile.settings.min_pixels, profile.settings.max_pixels);
    images
        .iter()
        .map(|image| {
            let own = inference::check_bounds(state, image.bounds, &image.field)?;
            let prefix = if own != PixelBounds::default() { image.field.as_str() } else { KWARGS };
            inference::pixel_budget(state, own.or(kwargs), profile, prefix)
        })
        .collect()
}

/// OpenAI messages as the chat template sees them, and their images in order.
async fn convert_messages(state: &AppState, messages: Vec<Message>) -> ApiResult<(Vec<ChatMessage>, Vec<ChatImage>)> {
    let mut out = Vec::with_capacity(messages.len());
    let mut images = Vec::new();
    for (i, message) in messages.into_iter().enumerate() {
        if !matches!(message.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::new(ErrorKind::InvalidRole, format!("messages[{i}].role must be system, user or assistant")));
        }
        let content = match message.content {
            None => Content::Text(String::new()),
            Some(MessageContent::Text(text)) => Content::Text(text),
            Some(MessageContent::Parts(parts)) => {
                let mut converted = Vec::with_capacity(parts.len());
                for (j, part) in parts.into_iter().enumerate() {
                    match part {
                        InPart::Text { text } => converted.push(ContentPart::Text { text }),
                        InPart::ImageUrl { image_url } => {
                            let (min_pixels, max_pixels) = image_url.pixel_bounds();
                            images.push(ChatImage {
                                bytes: image_bytes(state, image_url.url()).await?,
                                bounds: PixelBounds::new(min_pixels, max_pixels),
                                field: format!("messages[{i}].content[{j}].image_url."),
                            });
                            converted.push(ContentPart::Image);
                        }
                    }
                }
                Content::Parts(converted)
            }
        };
        out.push(ChatMessage { role: message.role, content });
    }
    Ok((out, images))
}

/// The bytes behind an image URL: `data:` URLs always, `http(s)` as `remote_image` allows.
async fn image_bytes(state: &AppState, url: &str) -> ApiResult<Vec<u8>> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest.split_once(',').ok_or_else(|| ApiError::new(ErrorKind::InvalidImageUrl, "malformed data: URL"))?;
        if !meta.ends_with(";base64") {
            return Err(ApiError::new(ErrorKind::InvalidImageUrl, "data: URLs must be base64-encoded"));
        }
        return base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| ApiError::new(ErrorKind::InvalidImageUrl, format!("data: URL is not valid base64: {e}")));
    }
    if remote_image::is_remote(url) {
        let policy = state.config.image_fetch_policy().map_err(ApiError::internal)?;
        let url = url.to_string();
        return tokio::task::spawn_blocking(move || remote_image::fetch(&url, &policy))
            .await
            .map_err(|e| ApiError::internal(format!("image fetching failed: {e}")))?;
    }
    Err(ApiError::new(ErrorKind::InvalidImageUrl, "image_url must be a data: URL (or an http(s) URL from an allowed host)"))
}

/// What every response and chunk of one request shares.
struct Reply {
    id: String,
    created: u64,
    model: String,
    adapter: Option<String>,
    /// Where token bytes come from, when the request asked for log-probabilities.
    vocabulary: Option<Arc<AppState>>,
    /// The `response_format` schema's constraint, whose report and check the answer gets.
    constraint: Option<Arc<Constraint>>,
}

impl Reply {
    fn completion(&self, done: &Completion) -> ChatCompletion {
        ChatCompletion {
            id: self.id.clone(),
            object: ObjectKind::ChatCompletion,
            created: self.created,
            model: self.model.clone(),
            choices: vec![Choice {
                index: 0,
                message: AssistantMessage { role: Role::Assistant, content: done.text.clone() },
                finish_reason: finish_reason(done.finish_reason),
                logprobs: self.logprobs(&done.logprobs),
            }],
            usage: usage(done),
            system_fingerprint: None,
            schema: self.schema_report(done),
        }
    }

    /// With a schema: what it relaxed and whether the finished answer passed the full check.
    fn schema_report(&self, done: &Completion) -> SchemaReport {
        match &self.constraint {
            Some(constraint) => schema_report::checked(constraint, &done.text, done.finish_reason).0,
            None => SchemaReport::default(),
        }
    }

    /// The choice's `logprobs`: null unless asked for.
    fn logprobs(&self, tokens: &[TokenLogprob]) -> Option<ChoiceLogprobs> {
        let engine = self.vocabulary.as_ref()?.engine().ok()?;
        Some(openai_logprobs(engine.vocabulary().ok()?, tokens))
    }

    fn chunk(&self, delta: Delta, logprobs: &[TokenLogprob], finish_reason: Option<FinishReason>, include_usage: bool) -> SseEvent {
        let logprobs = if logprobs.is_empty() { None } else { self.logprobs(logprobs) };
        let choices = vec![ChunkChoice { index: 0, delta, finish_reason, logprobs }];
        self.chunk_event(choices, include_usage.then_some(None), SchemaReport::default())
    }

    /// A `chat.completion.chunk` event; `usage` is present (possibly null) only when asked for.
    fn chunk_event(&self, choices: Vec<ChunkChoice>, usage: Option<Option<Usage>>, schema: SchemaReport) -> SseEvent {
        let chunk = ChatCompletionChunk {
            id: self.id.clone(),
            object: ObjectKind::ChatCompletionChunk,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            schema,
        };
        data_event(&chunk)
    }
}

/// An SSE event carrying `body` as JSON.
fn data_event(body: &impl Serialize) -> SseEvent {
    // The API types are plain structs with string keys: serializing them cannot fail.
    SseEvent::default().json_data(body).expect("API types serialize")
}

fn text(content: impl Into<String>) -> Delta {
    Delta { role: None, content: Some(content.into()) }
}

fn usage(done: &Completion) -> Usage {
    Usage::new(done.prompt_tokens, done.token_ids.len())
}

/// The SSE response: a role chunk, one chunk per text delta, the finish chunk, the usage
/// chunk when asked for, then `[DONE]`. Dropping it (client gone) cancels the request.
///
/// It waits for the first event before answering, so that a request that fails before its
/// first token (timeout, engine failure) gets a real error status instead of a 200 stream.
async fn stream_reply(
    reply: Reply,
    mut events: RequestStream,
    include_usage: bool,
) -> ApiResult<Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>>> {
    let first = events.next().await;
    if let Some(Event::Done(done)) = &first {
        if let Some(error) = inference::failure(done) {
            inference::record(done, reply.adapter.as_deref());
            return Err(error);
        }
    }
    let mut out = Outbox {
        pending: VecDeque::from([reply.chunk(
            Delta { role: Some(Role::Assistant), content: Some(String::new()) },
            &[],
            None,
            include_usage,
        )]),
        held_logprobs: Vec::new(),
        include_usage,
    };
    let mut events = Some(events);
    reply.push_event(first, &mut out, &mut events);
    let body = stream::unfold((reply, events, out), move |(reply, mut events, mut out)| async move {
        loop {
            if let Some(event) = out.pending.pop_front() {
                return Some((Ok(event), (reply, events, out)));
            }
            let event = events.as_mut()?.next().await;
            reply.push_event(event, &mut out, &mut events);
        }
    });
    Ok(Sse::new(body).keep_alive(KeepAlive::default()))
}

/// SSE events ready to send, and what the next text chunk must carry.
struct Outbox {
    pending: VecDeque<SseEvent>,
    /// Log-probabilities of tokens whose text is still held back (part of a character or of a
    /// possible stop string): they go out with the chunk that releases it.
    held_logprobs: Vec<TokenLogprob>,
    include_usage: bool,
}

impl Reply {
    /// Turns one engine event (`None`: the engine went away) into SSE events; ends the stream
    /// (`events = None`) after the last one.
    fn push_event(&self, event: Option<Event>, out: &mut Outbox, events: &mut Option<RequestStream>) {
        let (pending, include_usage) = (&mut out.pending, out.include_usage);
        match event {
            Some(Event::Token { text, logprob, .. }) => {
                out.held_logprobs.extend(logprob);
                if !text.is_empty() {
                    let logprobs = std::mem::take(&mut out.held_logprobs);
                    pending.push_back(self.chunk(self::text(text), &logprobs, None, include_usage));
                }
            }
            Some(Event::Done(done)) => {
                inference::record(&done, self.adapter.as_deref());
                if let Some(error) = inference::failure(&done) {
                    pending.push_back(data_event(&error.body()));
                } else {
                    let logprobs = std::mem::take(&mut out.held_logprobs);
                    if !done.tail.is_empty() || !logprobs.is_empty() {
                        pending.push_back(self.chunk(self::text(done.tail.as_str()), &logprobs, None, include_usage));
                    }
                    let finish = vec![ChunkChoice {
                        index: 0,
                        delta: Delta::default(),
                        finish_reason: Some(finish_reason(done.finish_reason)),
                        logprobs: None,
                    }];
                    pending.push_back(self.chunk_event(finish, include_usage.then_some(None), self.schema_report(&done)));
                    if include_usage {
                        pending.push_back(self.chunk_event(vec![], Some(Some(usage(&done))), SchemaReport::default()));
                    }
                }
                pending.push_back(SseEvent::default().data("[DONE]"));
                *events = None;
            }
            None => {
                let error = ApiError::internal("the engine stopped before the request finished");
                pending.push_back(data_event(&error.body()));
                pending.push_back(SseEvent::default().data("[DONE]"));
                *events = None;
            }
        }
    }
}
