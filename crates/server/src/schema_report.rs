//! The schema part of a response, read from the compiled constraint's report and its full
//! check of the answer.

use axum::http::{HeaderName, HeaderValue};
use axum::response::Response;
use qwen_ocr_model::schema::Constraint;
use qwen_ocr_model::FinishReason;
use serde_json::Value;

use crate::api::schema::{RelaxedKeyword, SchemaReport, SCHEMA_RELAXED_HEADER};

/// What the grammar relaxed, before any answer.
pub fn relaxed(constraint: &Constraint) -> SchemaReport {
    let relaxed = constraint
        .relaxed
        .iter()
        .map(|r| RelaxedKeyword { keyword: r.keyword.clone(), path: r.path.clone(), checked: r.checked, note: r.note.clone() })
        .collect();
    SchemaReport { schema_relaxed: Some(relaxed), ..SchemaReport::default() }
}

/// The full report on a finished answer, and the answer's JSON when it has one.
pub fn checked(constraint: &Constraint, text: &str, finish: FinishReason) -> (SchemaReport, Option<Value>) {
    let mut report = relaxed(constraint);
    let (data, errors) = match serde_json::from_str::<Value>(text) {
        Ok(data) => {
            let errors = constraint.check(&data);
            (Some(data), errors)
        }
        Err(_) if finish == FinishReason::Length => {
            (None, vec!["max_tokens cut the answer before its JSON was complete: raise max_tokens".into()])
        }
        Err(e) => (None, vec![format!("the answer is not complete JSON (a stop string cut it?): {e}")]),
    };
    report.schema_valid = Some(errors.is_empty());
    report.schema_errors = errors;
    (report, data)
}

/// Names the relaxed keywords in the response's header, when there are any.
pub fn set_header(response: &mut Response, constraint: Option<&Constraint>) {
    let Some(constraint) = constraint else { return };
    let mut keywords: Vec<&str> = Vec::new();
    for relaxation in &constraint.relaxed {
        if !keywords.contains(&relaxation.keyword.as_str()) {
            keywords.push(&relaxation.keyword);
        }
    }
    if keywords.is_empty() {
        return;
    }
    // Keywords are JSON Schema's names: ASCII letters and `$`, always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&keywords.join(", ")) {
        response.headers_mut().insert(HeaderName::from_static(SCHEMA_RELAXED_HEADER), value);
    }
}
