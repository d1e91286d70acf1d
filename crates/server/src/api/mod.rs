//! The HTTP contract: every request and response body of every route, as types. The handlers
//! build and parse these, the integration tests read responses into them, and the OpenAPI
//! document (`crate::openapi`) is generated from them, so the three cannot disagree.

pub mod adapters;
pub mod chat;
pub mod error;
pub mod extract;
pub mod logprobs;
pub mod models;
pub mod ops;
pub mod schema;

use serde::{Deserialize, Serialize};
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, ToSchema};

/// The schema of one server-sent event: its `data` is `[DONE]` or JSON text whose content is
/// `payload`.
pub(crate) fn sse_event_schema(payload: impl Serialize) -> RefOr<Schema> {
    let done = ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["[DONE]"]));
    let mut json = ObjectBuilder::new().schema_type(Type::String).content_media_type("application/json").build();
    // JSON Schema 2020-12's `contentSchema`, which utoipa has no field for.
    let payload = serde_json::to_value(payload).expect("schemas serialize");
    json.extensions = Some(Extensions::from_iter([("contentSchema", payload)]));
    let data = AnyOfBuilder::new().item(done).item(json);
    ObjectBuilder::new().property("data", data).required("data").into()
}

/// The `object` field: what kind of body this is, as OpenAI names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ObjectKind {
    #[serde(rename = "chat.completion")]
    ChatCompletion,
    #[serde(rename = "chat.completion.chunk")]
    ChatCompletionChunk,
    #[serde(rename = "extraction")]
    Extraction,
    #[serde(rename = "list")]
    List,
    #[serde(rename = "model")]
    Model,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// How generation ended: the model stopped (end of sequence or a stop string), or `max_tokens`
/// cut it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

/// The header that picks an adapter per request (`crate::inference::ADAPTER_HEADER`).
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct AdapterHeader {
    /// The adapter to read with, loaded on first use from the adapters folder; `base` or empty:
    /// none. Wins over the body's `model`.
    #[serde(rename = "X-Adapter")]
    #[param(value_type = String, required = false)]
    pub adapter: Option<String>,
}
