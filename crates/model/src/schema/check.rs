//! The full check of an answer against the schema as the client wrote it, after decoding: what
//! covers the keywords the grammar was relaxed of, with the `jsonschema` crate (every draft
//! from 4, formats asserted, no remote references).

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, OnceLock};

use jsonschema::{Draft, Validator};
use lru::LruCache;
use serde_json::Value;

use crate::error::{Error, Result};

/// Distinct schemas whose validators are kept, as the grammar cache keeps grammars.
const CACHE_ENTRIES: usize = 64;
/// Errors reported per answer; the first few say what is wrong.
const MAX_ERRORS: usize = 8;

/// A compiled validator for one schema.
pub struct Checker {
    validator: Validator,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Checker")
    }
}

impl Checker {
    /// The validator of `schema`, compiled once per distinct schema.
    pub fn cached(schema: &Value) -> Result<Arc<Checker>> {
        static CACHE: OnceLock<Mutex<LruCache<String, Arc<Checker>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(LruCache::new(NonZeroUsize::new(CACHE_ENTRIES).expect("nonzero"))));
        let key = schema.to_string();
        if let Some(hit) = cache.lock().expect("checker cache lock").get(&key) {
            return Ok(hit.clone());
        }
        let checker = Arc::new(Checker::build(schema)?);
        cache.lock().expect("checker cache lock").put(key, checker.clone());
        Ok(checker)
    }

    fn build(schema: &Value) -> Result<Checker> {
        let mut options = jsonschema::options().offline().should_validate_formats(true);
        // A `$schema` the crate does not know (draft 3, a vendor's meta-schema) would need a
        // download: read the schema as the grammar does, as 2020-12.
        let known = schema.get("$schema").and_then(Value::as_str).is_none_or(|uri| {
            let uri = uri.trim_end_matches('#');
            [
                "http://json-schema.org/draft-04/schema",
                "http://json-schema.org/draft-06/schema",
                "http://json-schema.org/draft-07/schema",
                "https://json-schema.org/draft/2019-09/schema",
                "https://json-schema.org/draft/2020-12/schema",
            ]
            .contains(&uri)
        });
        let validator = if known {
            options.build(schema)
        } else {
            options = options.with_draft(Draft::Draft202012);
            let mut schema = schema.clone();
            schema.as_object_mut().map(|o| o.remove("$schema"));
            options.build(&schema)
        };
        let validator = validator.map_err(|e| Error::Schema(format!("{e} (at {})", pointer_or_root(e.schema_path().as_str()))))?;
        Ok(Checker { validator })
    }

    /// Why `answer` does not validate (at most a few reasons, each with where); empty: it does.
    pub fn errors(&self, answer: &Value) -> Vec<String> {
        self.validator
            .iter_errors(answer)
            .take(MAX_ERRORS)
            .map(|e| format!("{}: {e}", pointer_or_root(e.instance_path().as_str())))
            .collect()
    }
}

fn pointer_or_root(pointer: &str) -> &str {
    if pointer.is_empty() {
        "/"
    } else {
        pointer
    }
}

/// Whether the check asserts this format (so leaving it out of the grammar loses nothing).
pub fn knows_format(format: &str) -> bool {
    jsonschema::options().is_known_format(Draft::Draft202012, format)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats_and_relaxed_keywords_are_checked_with_where_they_fail() {
        let checker = Checker::cached(&json!({
            "type": "object",
            "properties": { "when": { "format": "date-time" }, "tags": { "uniqueItems": true } }
        }))
        .unwrap();
        assert!(checker.errors(&json!({ "when": "2024-01-01T00:00:00Z", "tags": [1, 2] })).is_empty());
        let errors = checker.errors(&json!({ "when": "4441-12-16t21:16:60z", "tags": [1, 1] }));
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("/when:")) && errors.iter().any(|e| e.starts_with("/tags:")), "{errors:?}");
    }

    #[test]
    fn remote_references_and_malformed_schemas_are_refused_and_unknown_drafts_read_as_the_latest() {
        let remote = Checker::cached(&json!({ "$ref": "https://example.com/schema.json" })).unwrap_err().to_string();
        assert!(remote.contains("example.com"), "{remote}");
        assert!(Checker::cached(&json!({ "type": "strng" })).is_err());
        let draft3 = Checker::cached(&json!({ "$schema": "http://json-schema.org/draft-03/schema#", "type": "string" })).unwrap();
        assert!(draft3.errors(&json!("x")).is_empty() && !draft3.errors(&json!(1)).is_empty());
    }

    #[test]
    fn known_formats_are_those_the_crate_asserts() {
        assert!(knows_format("uri-reference") && knows_format("date-time") && !knows_format("int32"));
    }
}
