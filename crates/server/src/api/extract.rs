//! `POST /v1/extract`: one image in, as a multipart form or a raw `image/*` body with the
//! options in the query string; the JSON the model read from it out.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, PartialSchema, ToSchema};

use super::schema::SchemaReport;
use super::{FinishReason, ObjectKind, Usage};

/// The optional settings, from the form's text parts or (for a raw body) the query string.
/// Each overrides the profile of the adapter (`X-Adapter`) or of the base model.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams, ToSchema)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ExtractOptions {
    /// The instruction; default: the profile's, else the server's `extraction_prompt`.
    pub prompt: Option<String>,
    /// At most the server's `max_tokens_limit`.
    #[param(minimum = 1)]
    #[schema(minimum = 1)]
    pub max_tokens: Option<i64>,
    #[param(minimum = 0.0)]
    #[schema(minimum = 0.0)]
    pub temperature: Option<f64>,
    /// A JSON Schema, as JSON text, that the answer must validate against; it replaces the
    /// profile's for this request.
    pub schema: Option<String>,
    /// For `schema`: `true` refuses keywords the grammar cannot enforce while decoding;
    /// default `false` leaves them out of the grammar and checks the answer after decoding.
    pub strict: Option<bool>,
}

/// The multipart form: the `image` file part (`file` is accepted too) and the options as text
/// parts. Any other part is refused. Only its schema is needed: the handler reads the parts as
/// they stream in.
pub struct ExtractForm;

impl PartialSchema for ExtractForm {
    /// [`ExtractOptions`]' schema with the image added, so that the two cannot disagree.
    fn schema() -> RefOr<Schema> {
        let mut form = ExtractOptions::schema();
        if let RefOr::T(Schema::Object(form)) = &mut form {
            form.description = Some("The `image` file part (`file` is accepted too) and the options as text parts".into());
            let image = ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)));
            form.properties.insert("image".into(), image.into());
            form.required.insert(0, "image".into());
        }
        form
    }
}

impl ToSchema for ExtractForm {}

/// A raw image body (PNG, JPEG, WebP, GIF, BMP or TIFF).
#[derive(Debug, Clone, ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct RawImage(pub Vec<u8>);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Extraction {
    pub id: String,
    pub object: ObjectKind,
    /// The served checkpoint.
    pub model: String,
    /// The adapter that read the image; null for the base model.
    pub adapter: Option<String>,
    /// The JSON value found in the answer (with a schema: the answer itself); null when there
    /// is none, and then `error` says why.
    pub data: Value,
    /// The model's text as it wrote it.
    pub raw: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    /// Why `data` is null, or why it failed the full schema check (`data` is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// With a schema: for each top-level field, the probability the model gave its value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<std::collections::HashMap<String, f64>>)]
    pub confidence: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub schema: SchemaReport,
}

/// Where the request's time went, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    /// Submission to admission.
    pub queued_ms: f64,
    /// Vision tower, prompt and first token.
    pub prefill_ms: f64,
    /// The vision tower's part of `prefill_ms`.
    pub vision_ms: f64,
    /// Every later token.
    pub decode_ms: f64,
}

impl From<&qwen_ocr_model::Timings> for Timings {
    fn from(t: &qwen_ocr_model::Timings) -> Self {
        Self { queued_ms: t.queued_ms, prefill_ms: t.prefill_ms, vision_ms: t.vision_ms, decode_ms: t.decode_ms }
    }
}
