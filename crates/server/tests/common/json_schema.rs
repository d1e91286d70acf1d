//! A small JSON Schema validator for the keywords the tests use (type, properties, required,
//! additionalProperties, items, enum, const, pattern, minLength/maxLength, minimum/maximum,
//! $ref to $defs), written independently of the server's constraint engine so that a passing
//! test is evidence, not an echo.

use serde_json::Value;

/// Why `value` does not validate against `schema`, or `Ok`.
pub fn validate(value: &Value, schema: &Value) -> Result<(), String> {
    check(value, schema, schema, "$")
}

fn check(value: &Value, schema: &Value, root: &Value, at: &str) -> Result<(), String> {
    let fail = |why: String| Err(format!("{at}: {why} (value {value})"));
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let target = reference.strip_prefix("#/").unwrap_or_default().split('/').try_fold(root, |node, key| node.get(key));
        return check(value, target.ok_or(format!("{at}: unresolved {reference}"))?, root, at);
    }
    if let Some(kind) = schema.get("type").and_then(Value::as_str) {
        let ok = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            other => return fail(format!("the validator does not know type {other}")),
        };
        if !ok {
            return fail(format!("not of type {kind}"));
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            return fail(format!("not one of {options:?}"));
        }
    }
    if let Some(constant) = schema.get("const") {
        if constant != value {
            return fail(format!("not {constant}"));
        }
    }
    if let Some(s) = value.as_str() {
        let chars = s.chars().count() as u64;
        if schema.get("minLength").and_then(Value::as_u64).is_some_and(|n| chars < n) {
            return fail("shorter than minLength".into());
        }
        if schema.get("maxLength").and_then(Value::as_u64).is_some_and(|n| chars > n) {
            return fail("longer than maxLength".into());
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            if !regex::Regex::new(pattern).unwrap().is_match(s) {
                return fail(format!("does not match {pattern}"));
            }
        }
    }
    if let Some(n) = value.as_f64() {
        if schema.get("minimum").and_then(Value::as_f64).is_some_and(|m| n < m) {
            return fail("below minimum".into());
        }
        if schema.get("maximum").and_then(Value::as_f64).is_some_and(|m| n > m) {
            return fail("above maximum".into());
        }
    }
    if let Some(object) = value.as_object() {
        let properties = schema.get("properties").and_then(Value::as_object);
        for key in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            if !object.contains_key(key.as_str().unwrap()) {
                return fail(format!("missing required {key}"));
            }
        }
        for (key, item) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(sub) => check(item, sub, root, &format!("{at}.{key}"))?,
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return fail(format!("unexpected property {key}"));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(sub)) = (value.as_array(), schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            check(item, sub, root, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}
