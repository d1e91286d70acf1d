//! `POST /v1/chat/completions`: OpenAI's request, its completion, and the chunks of a stream.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use utoipa::openapi::schema::{AnyOfBuilder, Schema};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use super::error::ErrorResponse;
use super::logprobs::ChoiceLogprobs;
use super::schema::SchemaReport;
use super::{FinishReason, ObjectKind, Usage};

/// OpenAI's chat completion request; fields OpenAI has and this server does not use are
/// accepted and ignored, so that OpenAI's clients work unchanged.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// `base` (or the served model's id), or an adapter's name; `X-Adapter` wins over it.
    pub model: Option<String>,
    #[schema(min_items = 1)]
    pub messages: Vec<Message>,
    /// At most the server's `max_tokens_limit`.
    #[schema(minimum = 1)]
    pub max_tokens: Option<i64>,
    /// OpenAI's newer name for `max_tokens`; wins over it.
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<i64>,
    #[schema(minimum = 0.0)]
    pub temperature: Option<f64>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    /// Answer as `text/event-stream` chunks.
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub logprobs: bool,
    /// Needs `logprobs: true`.
    #[schema(minimum = 0)]
    pub top_logprobs: Option<i64>,
    /// Only 1 is supported.
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<u32>,
    /// The image processor's settings, as vLLM takes them: the resize bounds of every image of
    /// this request (an image's own `image_url` bounds win).
    pub mm_processor_kwargs: Option<MmProcessorKwargs>,
}

/// vLLM's `mm_processor_kwargs`; keys other than these are ignored.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
pub struct MmProcessorKwargs {
    /// Fewest pixels an image may have once resized, at least one merged patch (784 for
    /// Qwen2-VL); default the adapter profile's, else the server's.
    pub min_pixels: Option<u64>,
    /// Most pixels an image may have once resized.
    pub max_pixels: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Message {
    /// Checked by the handler, so that a wrong role gets its own error code.
    #[schema(value_type = Role)]
    pub role: String,
    pub content: Option<MessageContent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

/// A `data:` URL (base64), or an `http(s)` URL from a host in `allowed_image_hosts`; as an
/// object, optionally with this image's resize bounds, as LMDeploy takes them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ImageUrl {
    Object {
        url: String,
        /// Fewest pixels this image may have once resized (wins over `mm_processor_kwargs`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min_pixels: Option<u64>,
        /// Most pixels this image may have once resized.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_pixels: Option<u64>,
    },
    Url(String),
}

impl ImageUrl {
    pub fn url(&self) -> &str {
        match self {
            ImageUrl::Object { url, .. } | ImageUrl::Url(url) => url,
        }
    }

    /// This image's own resize bounds.
    pub fn pixel_bounds(&self) -> (Option<u64>, Option<u64>) {
        match self {
            ImageUrl::Object { min_pixels, max_pixels, .. } => (*min_pixels, *max_pixels),
            ImageUrl::Url(_) => (None, None),
        }
    }
}

/// One stop string, or at most 4.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with the usage (and `"usage": null` in the others).
    #[serde(default)]
    pub include_usage: bool,
}

/// OpenAI's `response_format`: `json_object` and `json_schema` are enforced while decoding.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// OpenAI's `json_schema` object. Its `name` and `description` are accepted and not needed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JsonSchemaFormat {
    /// A JSON Schema; absent: any JSON value.
    pub schema: Option<Value>,
    /// `true`: every keyword is enforced while decoding, and a schema with one that cannot be
    /// (`not`, `uniqueItems`, `if`, an unknown `format`, a `oneOf` whose alternatives may
    /// overlap, ...) is refused with 400 `invalid_schema` naming it and its path. `false` or
    /// absent: such keywords are left out of the grammar and listed in `schema_relaxed`, and
    /// the answer is checked against the full schema after decoding (`schema_valid`).
    #[serde(default)]
    pub strict: Option<bool>,
}

impl ResponseFormat {
    /// The schema to enforce, if any, and whether strictly; OpenAI's `json_object` is any
    /// object.
    pub fn schema(self) -> Option<(Value, bool)> {
        match self {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some((Value::Object(Map::from_iter([("type".into(), "object".into())])), true)),
            ResponseFormat::JsonSchema { json_schema } => {
                Some((json_schema.schema.unwrap_or_else(|| Value::Object(Map::new())), json_schema.strict.unwrap_or(false)))
            }
        }
    }
}

/// A whole (not streamed) completion.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: ObjectKind,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
    /// Always null.
    pub system_fingerprint: Option<String>,
    #[serde(flatten)]
    pub schema: SchemaReport,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: FinishReason,
    /// Null unless the request set `logprobs`.
    pub logprobs: Option<ChoiceLogprobs>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AssistantMessage {
    pub role: Role,
    pub content: String,
}

/// One `data:` event of a stream: the role first, then text deltas, then the finish reason,
/// then (with `include_usage`) the usage with no choices. After it, `data: [DONE]`; a request
/// that fails mid-stream sends an `ErrorResponse` event before `[DONE]`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: ObjectKind,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    /// Present only with `stream_options.include_usage`: null, except in the last chunk.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
    /// With a schema, in the chunk with the `finish_reason`.
    #[serde(flatten)]
    pub schema: SchemaReport,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<FinishReason>,
    pub logprobs: Option<ChoiceLogprobs>,
}

/// One server-sent event of a stream, as OpenAPI 3.1 describes an event (`data`, `event`,
/// `id`, `retry`): its `data` is a [`ChatCompletionChunk`], an [`ErrorResponse`] when the
/// request fails after the stream started, or `[DONE]` last. Only its schema is needed.
pub struct ChatCompletionEvent;

impl PartialSchema for ChatCompletionEvent {
    fn schema() -> RefOr<Schema> {
        let payload = AnyOfBuilder::new()
            .item(Ref::from_schema_name(ChatCompletionChunk::name()))
            .item(Ref::from_schema_name(ErrorResponse::name()))
            .build();
        super::sse_event_schema(payload)
    }
}

impl ToSchema for ChatCompletionEvent {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((ChatCompletionChunk::name().into(), ChatCompletionChunk::schema()));
        ChatCompletionChunk::schemas(schemas);
        schemas.push((ErrorResponse::name().into(), ErrorResponse::schema()));
        ErrorResponse::schemas(schemas);
    }
}

/// What a chunk adds to the message; both absent in the finish chunk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A field that is there (possibly null) as opposed to absent.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}
