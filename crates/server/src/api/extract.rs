//! `POST /v1/extract`: one image or PDF in, as a multipart form or a raw `image/*` or
//! `application/pdf` body with the options in the query string; the JSON the model read from it
//! out, page by page for a PDF.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::{Ref, RefOr};
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
    /// PDF only: the pages to read, e.g. `1-3,7` or `5-` (to the last); default every page
    /// (at most the server's `max_pdf_pages`).
    pub pages: Option<String>,
    /// Fewest pixels the image (each page) may have once resized: with `max_pixels`, how many
    /// visual tokens it costs. At least one merged patch (784 for Qwen2-VL). Default: the
    /// adapter profile's, else the server's.
    pub min_pixels: Option<u64>,
    /// Most pixels the image (each page) may have once resized; a PDF page is rendered at the
    /// resolution that gives it this many.
    pub max_pixels: Option<u64>,
    /// Answer as `text/event-stream`: one event per page (an image is one page) as soon as it
    /// is read, in the order they finish, then `[DONE]`.
    pub stream: Option<bool>,
}

/// The multipart form: the `image` file part (`file` is accepted too), an image or a PDF, and
/// the options as text parts. Any other part is refused. Only its schema is needed: the handler reads the parts as
/// they stream in.
pub struct ExtractForm;

impl PartialSchema for ExtractForm {
    /// [`ExtractOptions`]' schema with the image added, so that the two cannot disagree.
    fn schema() -> RefOr<Schema> {
        let mut form = ExtractOptions::schema();
        if let RefOr::T(Schema::Object(form)) = &mut form {
            form.description =
                Some("The `image` file part (`file` is accepted too), an image or a PDF, and the options as text parts".into());
            let image = ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)));
            form.properties.insert("image".into(), image.into());
            form.required.insert(0, "image".into());
        }
        form
    }
}

impl ToSchema for ExtractForm {}

/// A raw image body (PNG, JPEG, WebP, GIF, BMP or TIFF), or with `application/octet-stream`
/// also a PDF (recognised by its header).
#[derive(Debug, Clone, ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct RawImage(pub Vec<u8>);

/// A raw PDF body.
#[derive(Debug, Clone, ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct RawPdf(pub Vec<u8>);

/// What `/v1/extract` answers: an [`Extraction`] for an image, a [`DocumentExtraction`] for a PDF.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)] // Built once per response, never stored.
pub enum ExtractResponse {
    Image(Extraction),
    Document(DocumentExtraction),
}

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
    /// The boxes the model wrote, in pixels of the image as it is shown (after its EXIF
    /// rotation); absent when it wrote none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boxes: Vec<BoundingBox>,
}

/// A PDF read page by page. Each page is its own sequence in the engine, so the pages batch.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DocumentExtraction {
    pub id: String,
    pub object: ObjectKind,
    pub model: String,
    pub adapter: Option<String>,
    /// Pages in the document; the selected ones are in `pages`.
    pub page_count: u32,
    /// The selected pages, ascending. A page that failed has `error` and null `data`; the
    /// others are unaffected.
    pub pages: Vec<PageExtraction>,
    /// Summed over the pages.
    pub usage: Usage,
}

/// One page's reading (and, streamed, one event's).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PageExtraction {
    /// Its number in the document, from 1 (1 for an image).
    pub page: u32,
    /// The page as the model's input was made from it, in pixels: the rendered page of a PDF,
    /// or the image after its EXIF rotation. Boxes are in these pixels. Absent when the page
    /// could not be rendered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// The resolution a PDF page was rendered at (its points times `dpi / 72` are its pixels);
    /// absent for an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpi: Option<f64>,
    /// As in [`Extraction`]: null when there is none, and then `error` says why.
    pub data: Value,
    pub raw: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<std::collections::HashMap<String, f64>>)]
    pub confidence: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub schema: SchemaReport,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boxes: Vec<BoundingBox>,
    /// Null when the page never reached the model (it could not be rendered); `error` says why.
    pub finish_reason: Option<FinishReason>,
    pub usage: Usage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    /// Why `data` is null: the page failed, or the answer held no JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A box the model wrote, in the caller's pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BoundingBox {
    /// What the model called it, if anything.
    pub label: Option<String>,
    /// `[x1, y1, x2, y2]`, top-left and bottom-right (x1 <= x2, y1 <= y2), from the image's
    /// top-left corner, within the image.
    pub bbox: [f64; 4],
    /// The page it is on (1 for an image).
    pub page: u32,
}

/// One server-sent event of a streamed `/v1/extract`: its `data` is a [`PageExtraction`] as
/// each page finishes (pages may finish out of order; each names its page), then `[DONE]`.
/// Only its schema is needed.
pub struct ExtractionEvent;

impl PartialSchema for ExtractionEvent {
    fn schema() -> RefOr<Schema> {
        super::sse_event_schema(Ref::from_schema_name(PageExtraction::name()))
    }
}

impl ToSchema for ExtractionEvent {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((PageExtraction::name().into(), PageExtraction::schema()));
        PageExtraction::schemas(schemas);
    }
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
