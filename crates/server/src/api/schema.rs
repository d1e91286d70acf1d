//! What a response says about the JSON Schema that constrained it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The response header listing the keywords the grammar did not enforce as written (each
/// once, comma-separated); absent when it enforced them all. The body's `schema_relaxed` has
/// each one with its path.
pub const SCHEMA_RELAXED_HEADER: &str = "x-qwen-ocr-schema-relaxed";

/// A schema keyword the grammar did not enforce as written. With `strict` there are none:
/// such a schema is refused instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RelaxedKeyword {
    /// `oneOf` (decoded as `anyOf`), `format` (a format the grammar does not know), `not`,
    /// `uniqueItems`, `if`/`then`/`else`, `contains`, `dependencies`, `pattern` (a regex the
    /// decoder cannot compile), ...
    pub keyword: String,
    /// A JSON pointer into the schema, ending with the keyword.
    pub path: String,
    /// Whether the check after decoding covers it; false only for a format no validator knows
    /// (an annotation, which constrains nothing).
    pub checked: bool,
    /// What was done instead.
    pub note: String,
}

/// Present when a schema (`response_format`, `schema`, a profile's) constrained the answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SchemaReport {
    /// The keywords the grammar did not enforce as written; empty when it enforced them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_relaxed: Option<Vec<RelaxedKeyword>>,
    /// Whether the answer is complete JSON that passed the full check against the schema as
    /// written, relaxed keywords and formats included. In a stream, only the last chunk with a
    /// `finish_reason` has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_valid: Option<bool>,
    /// Why it did not (at most a few reasons, each with where in the answer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schema_errors: Vec<String>,
}
