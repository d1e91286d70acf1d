//! What one image's answer becomes on `/v1/extract`: the JSON in it (with a schema, the answer
//! itself, and each field's confidence), and the boxes it wrote, on the caller's image.

use qwen_ocr_model::FinishReason;
use qwen_ocr_scheduler::Completion;
use serde_json::{Map, Value};

use crate::api::extract::BoundingBox;
use crate::confidence::field_confidences;
use crate::documents::boxes::{boxes_in_json, boxes_in_text, Geometry};
use crate::error::{ApiError, ApiResult};
use crate::extract_json::extract_json;
use crate::inference;
use crate::state::AppState;

pub struct Reading {
    pub data: Value,
    /// Why `data` is null.
    pub error: Option<String>,
    pub confidence: Option<Map<String, Value>>,
    pub boxes: Vec<BoundingBox>,
}

/// Reads a finished answer to the image of `page` (1 for a photo). `constrained`: it was decoded
/// under a JSON Schema, so it is the JSON.
pub fn read(state: &AppState, done: &Completion, constrained: bool, geometry: &Geometry, page: u32) -> ApiResult<Reading> {
    let mut reading = Reading { data: Value::Null, error: None, confidence: None, boxes: Vec::new() };
    if !constrained {
        match extract_json(&done.text) {
            Ok(data) => reading.data = data,
            Err(why) => reading.error = Some(why),
        }
    } else if done.finish_reason != FinishReason::Stop {
        reading.error = Some("max_tokens cut the answer before its JSON was complete: raise max_tokens".into());
    } else {
        // The grammar admitted only text that parses and validates.
        reading.data = serde_json::from_str(&done.text).map_err(|e| ApiError::internal(format!("constrained output is not JSON: {e}")))?;
        let vocabulary = state.engine()?.pipeline().vocabulary()?;
        let bytes = |t| if vocabulary.is_special(t) { Vec::new() } else { vocabulary.token_bytes(t) };
        reading.confidence = Some(field_confidences(&done.logprobs, bytes));
    }
    reading.boxes = boxes(state, done, &reading.data, geometry, page)?;
    Ok(reading)
}

/// The boxes in the answer's special tokens and in its JSON, in the caller's pixels; none when
/// the model family's convention is not known.
fn boxes(state: &AppState, done: &Completion, data: &Value, geometry: &Geometry, page: u32) -> ApiResult<Vec<BoundingBox>> {
    let Some(convention) = state.box_convention() else { return Ok(Vec::new()) };
    // The box tokens are special tokens, which `raw` leaves out.
    let mut written = boxes_in_text(&inference::text_with_special_tokens(state, &done.token_ids)?);
    written.extend(boxes_in_json(data));
    Ok(written.iter().map(|b| BoundingBox { label: b.label.clone(), bbox: b.on(geometry, convention), page }).collect())
}
