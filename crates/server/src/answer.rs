//! What one image's answer becomes on `/v1/extract`: the JSON in it (with a schema, the answer
//! itself, and each field's confidence), and the boxes it wrote, on the caller's image.

use qwen_ocr_model::schema::Constraint;
use qwen_ocr_scheduler::Completion;
use serde_json::{Map, Value};

use crate::api::extract::BoundingBox;
use crate::api::schema::SchemaReport;
use crate::confidence::field_confidences;
use crate::documents::boxes::{boxes_in_json, boxes_in_text, BoxConvention, Geometry};
use crate::error::ApiResult;
use crate::extract_json::extract_json;
use crate::schema_report;
use crate::state::AppState;

pub struct Reading {
    pub data: Value,
    /// Why `data` is null, or why it does not pass the full schema check.
    pub error: Option<String>,
    pub confidence: Option<Map<String, Value>>,
    pub schema: SchemaReport,
    pub boxes: Vec<BoundingBox>,
}

/// Reads a finished answer to the image of `page` (1 for a photo). With a `constraint` the
/// answer was decoded under a JSON Schema, so it is the JSON, checked against the full schema.
pub fn read(state: &AppState, done: &Completion, constraint: Option<&Constraint>, geometry: &Geometry, page: u32) -> ApiResult<Reading> {
    let mut reading = Reading { data: Value::Null, error: None, confidence: None, schema: SchemaReport::default(), boxes: Vec::new() };
    match constraint {
        None => match extract_json(&done.text) {
            Ok(data) => reading.data = data,
            Err(why) => reading.error = Some(why),
        },
        Some(constraint) => {
            let (report, data) = schema_report::checked(constraint, &done.text, done.finish_reason);
            if let Some(data) = data {
                // The grammar admitted only JSON; the check covers what it was relaxed of.
                reading.data = data;
                let vocabulary = state.engine()?.vocabulary()?;
                let bytes = |t| if vocabulary.is_special(t) { Vec::new() } else { vocabulary.token_bytes(t) };
                reading.confidence = Some(field_confidences(&done.logprobs, bytes));
            }
            if !report.schema_errors.is_empty() {
                let what = if reading.data.is_null() { "" } else { "the answer does not pass the full schema check: " };
                reading.error = Some(format!("{what}{}", report.schema_errors.join("; ")));
            }
            reading.schema = report;
        }
    }
    reading.boxes = boxes(state, done, &reading.data, geometry, page)?;
    Ok(reading)
}

/// The boxes in the answer's special tokens and in its JSON, in the caller's pixels.
fn boxes(state: &AppState, done: &Completion, data: &Value, geometry: &Geometry, page: u32) -> ApiResult<Vec<BoundingBox>> {
    let convention = BoxConvention::of(state.engine()?.family());
    // The box tokens are special tokens, which `raw` leaves out.
    let mut written = boxes_in_text(&state.engine()?.text_with_special_tokens(&done.token_ids)?);
    written.extend(boxes_in_json(data));
    Ok(written.iter().map(|b| BoundingBox { label: b.label.clone(), bbox: b.on(geometry, convention), page }).collect())
}
