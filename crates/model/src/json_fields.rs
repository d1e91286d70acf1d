//! Optional fields of the JSON files that checkpoints and adapters ship (`config.json`,
//! `generation_config.json`, `preprocessor_config.json`, `adapter_config.json`). Absent or
//! `null` means "the default", as transformers and PEFT read them; a value of the wrong type
//! (`"lora_alpha": "16"`, `"use_rslora": "true"`) is an error naming the field, never quietly
//! the default, which would load a different model than the file describes.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// `key` of `object` as a `T`; `None` when absent or null.
pub fn optional<T: DeserializeOwned>(object: &Value, key: &str) -> Result<Option<T>, String> {
    value(object.get(key), key)
}

/// A field already looked up (as `key`), read as a `T`; `None` when absent or null.
pub fn value<T: DeserializeOwned>(found: Option<&Value>, key: &str) -> Result<Option<T>, String> {
    match found {
        None | Some(Value::Null) => Ok(None),
        Some(v) => T::deserialize(v).map(Some).map_err(|e| format!("`{key}`: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn absent_and_null_are_none_and_a_wrong_type_names_the_field() {
        let v = json!({ "a": 2.5, "b": null, "c": "16" });
        assert_eq!(optional::<f64>(&v, "a"), Ok(Some(2.5)));
        assert_eq!(optional::<f64>(&v, "b"), Ok(None));
        assert_eq!(optional::<f64>(&v, "z"), Ok(None));
        let err = optional::<f64>(&v, "c").unwrap_err();
        assert!(err.contains("`c`") && err.contains("\"16\""), "{err}");
        assert!(optional::<u64>(&v, "a").is_err(), "a fraction is not an integer");
    }
}
