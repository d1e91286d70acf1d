//! Pulling JSON out of model text (`/v1/extract`'s `data`), with the properties its callers
//! rely on: what it returns is an object or array that it finds again when written alone, and
//! text that is one such value (with no code fence inside to prefer) is always found.
//!
//! Input: the model's text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qwen_ocr_server::extract_json::extract_json;
use serde_json::Value;

fn found_alone(value: &Value) {
    let written = value.to_string();
    if !written.contains("```") {
        assert_eq!(extract_json(&written).as_ref(), Ok(value), "written alone: {written}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let result = extract_json(text);
    if let Ok(value) = &result {
        assert!(value.is_object() || value.is_array(), "not an object or array: {value}");
        found_alone(value);
    }
    if !text.contains("```") {
        if let Ok(whole) = serde_json::from_str::<Value>(text) {
            if whole.is_object() || whole.is_array() {
                assert_eq!(result.as_ref(), Ok(&whole), "the whole text is JSON");
            }
        }
    }
});
