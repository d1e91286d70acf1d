//! When `oneOf` means `anyOf`: alternatives no single value can match two of.
//!
//! The grammar can only enforce "at least one alternative matches". That is exactly `oneOf`
//! when the alternatives exclude each other, which this module proves for the common shapes:
//! different types, different `const`/`enum` values, and objects that require a property
//! whose schemas exclude each other (a discriminator, as pydantic writes tagged unions).
//! Local `$ref`s and `allOf` are followed. A `false` answer means "not proven", not
//! "overlapping".

use serde_json::Value;

/// How deep proofs follow `$ref`, `allOf` and nested properties before giving up.
const MAX_DEPTH: usize = 12;

/// Whether no value can match two of `alternatives` of the `oneOf` of schema `parent` (whose
/// other keywords every value also matches); `root` resolves local `$ref`s. One repair is
/// allowed: two closed objects (`additionalProperties: false`) with
/// no property in common share only `{}`, which `minProperties: 1` on both removes without
/// losing any valid answer. `Some(indices)`: exclusive once the alternatives at `indices` get
/// it; `None`: not proven.
pub fn exclusive_within(parent: &Value, alternatives: &[Value], root: &Value) -> Option<Vec<usize>> {
    let facts: Vec<Facts> = alternatives
        .iter()
        .map(|a| {
            let mut facts = Facts::of(a, root, 0);
            facts.merge(Facts::of(parent, root, 0));
            facts
        })
        .collect();
    let mut needs = Vec::new();
    for (i, a) in facts.iter().enumerate() {
        for (j, b) in facts.iter().enumerate().skip(i + 1) {
            if disjoint(a, b, root, 0) {
                continue;
            }
            let only_empty = match (&a.allowed, &b.allowed) {
                (Some(x), Some(y)) => a.only_objects() && b.only_objects() && !x.iter().any(|n| y.contains(n)),
                _ => false,
            };
            if !only_empty {
                return None;
            }
            needs.extend([i, j]);
        }
    }
    needs.sort_unstable();
    needs.dedup();
    Some(needs)
}

/// What every value matching a schema must satisfy, as far as the proofs need it.
#[derive(Default)]
struct Facts<'a> {
    /// The JSON types it may have; `None`: any.
    types: Option<Vec<&'a str>>,
    /// The only values it may be (`const`, `enum`); `None`: any.
    values: Option<Vec<&'a Value>>,
    /// Properties an object must have.
    required: Vec<&'a str>,
    /// Schemas a property must match when present (several when `allOf` adds more).
    properties: Vec<(&'a str, &'a Value)>,
    /// The only property names an object may have (`additionalProperties: false` without
    /// `patternProperties`); `None`: any.
    allowed: Option<Vec<&'a str>>,
}

impl<'a> Facts<'a> {
    fn of(schema: &'a Value, root: &'a Value, depth: usize) -> Self {
        let mut facts = Facts::default();
        let Some(object) = schema.as_object() else { return facts };
        if depth > MAX_DEPTH {
            return facts;
        }
        match object.get("type") {
            Some(Value::String(t)) => facts.types = Some(vec![t.as_str()]),
            Some(Value::Array(ts)) => facts.types = Some(ts.iter().filter_map(Value::as_str).collect()),
            _ => {}
        }
        if let Some(constant) = object.get("const") {
            facts.values = Some(vec![constant]);
        } else if let Some(Value::Array(options)) = object.get("enum") {
            facts.values = Some(options.iter().collect());
        }
        if let Some(Value::Array(names)) = object.get("required") {
            facts.required = names.iter().filter_map(Value::as_str).collect();
        }
        if let Some(Value::Object(properties)) = object.get("properties") {
            facts.properties = properties.iter().map(|(k, v)| (k.as_str(), v)).collect();
        }
        if object.get("additionalProperties") == Some(&Value::Bool(false)) && !object.contains_key("patternProperties") {
            facts.allowed = Some(facts.properties.iter().map(|(k, _)| *k).collect());
        }
        if let Some(target) = object.get("$ref").and_then(Value::as_str).and_then(|r| resolve(root, r)) {
            facts.merge(Facts::of(target, root, depth + 1));
        }
        if let Some(Value::Array(all)) = object.get("allOf") {
            for part in all {
                facts.merge(Facts::of(part, root, depth + 1));
            }
        }
        facts
    }

    /// Both sets of facts hold.
    fn merge(&mut self, other: Facts<'a>) {
        self.types = match (self.types.take(), other.types) {
            (Some(a), Some(b)) => Some(a.into_iter().filter(|t| b.iter().any(|u| types_overlap(t, u))).collect()),
            (a, b) => a.or(b),
        };
        self.values = match (self.values.take(), other.values) {
            (Some(a), Some(b)) => Some(a.into_iter().filter(|v| b.iter().any(|w| same_value(v, w))).collect()),
            (a, b) => a.or(b),
        };
        self.allowed = match (self.allowed.take(), other.allowed) {
            (Some(a), Some(b)) => Some(a.into_iter().filter(|n| b.contains(n)).collect()),
            (a, b) => a.or(b),
        };
        self.required.extend(other.required);
        self.properties.extend(other.properties);
    }

    /// Whether these facts rule `value` out.
    fn excludes(&self, value: &Value, root: &Value, depth: usize) -> bool {
        if self.types.as_ref().is_some_and(|ts| !ts.iter().any(|t| has_type(value, t))) {
            return true;
        }
        if self.values.as_ref().is_some_and(|vs| !vs.iter().any(|v| same_value(v, value))) {
            return true;
        }
        let Some(object) = value.as_object() else { return false };
        if self.required.iter().any(|name| !object.contains_key(*name)) {
            return true;
        }
        if self.allowed.as_ref().is_some_and(|names| object.keys().any(|k| !names.contains(&k.as_str()))) {
            return true;
        }
        depth < MAX_DEPTH
            && self
                .properties
                .iter()
                .any(|(name, schema)| object.get(*name).is_some_and(|v| Facts::of(schema, root, depth + 1).excludes(v, root, depth + 1)))
    }

    /// Whether every value these facts allow is an object.
    fn only_objects(&self) -> bool {
        self.types.as_ref().is_some_and(|ts| !ts.is_empty() && ts.iter().all(|t| *t == "object"))
    }
}

fn disjoint(a: &Facts, b: &Facts, root: &Value, depth: usize) -> bool {
    if let (Some(ta), Some(tb)) = (&a.types, &b.types) {
        if !ta.iter().any(|t| tb.iter().any(|u| types_overlap(t, u))) {
            return true;
        }
    }
    if a.values.as_ref().is_some_and(|vs| vs.iter().all(|v| b.excludes(v, root, depth))) {
        return true;
    }
    if b.values.as_ref().is_some_and(|vs| vs.iter().all(|v| a.excludes(v, root, depth))) {
        return true;
    }
    // A value matching both is an object (one side says so), so it has every property either
    // side requires, and that property's value must match both sides' schemas for it.
    if a.only_objects() || b.only_objects() {
        // One side requires a property the other, closed, does not allow.
        let refuses = |x: &Facts, y: &Facts| x.allowed.as_ref().is_some_and(|names| y.required.iter().any(|r| !names.contains(r)));
        if refuses(a, b) || refuses(b, a) {
            return true;
        }
    }
    if depth < MAX_DEPTH && (a.only_objects() || b.only_objects()) {
        let required = a.required.iter().chain(&b.required);
        for name in required {
            for (_, sa) in a.properties.iter().filter(|(n, _)| n == name) {
                for (_, sb) in b.properties.iter().filter(|(n, _)| n == name) {
                    if disjoint(&Facts::of(sa, root, depth + 1), &Facts::of(sb, root, depth + 1), root, depth + 1) {
                        return true;
                    }
                }
            }
        }
    }
    false
}

/// A local `$ref` (`#/...`, a JSON pointer, percent-decoded) in `root`.
pub fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    let pointer = reference.strip_prefix('#')?;
    if !pointer.contains('%') {
        return root.pointer(pointer);
    }
    let bytes = pointer.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    root.pointer(std::str::from_utf8(&decoded).ok()?)
}

fn types_overlap(a: &str, b: &str) -> bool {
    a == b || matches!((a, b), ("integer", "number") | ("number", "integer"))
}

fn has_type(value: &Value, kind: &str) -> bool {
    match kind {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.as_f64().is_some_and(|n| n.fract() == 0.0),
        _ => true,
    }
}

/// JSON Schema's equality: numbers by value (`1` equals `1.0`), the rest structurally.
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y)),
        (Value::Object(x), Value::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w))),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one_of(schema: &Value) -> bool {
        exclusive_within(&Value::Null, schema["oneOf"].as_array().unwrap(), schema) == Some(vec![])
    }

    #[test]
    fn pydantic_tagged_unions_through_refs_are_exclusive() {
        let schema = json!({
            "oneOf": [{ "$ref": "#/$defs/Cat" }, { "$ref": "#/$defs/Dog" }],
            "discriminator": { "propertyName": "pet_type" },
            "$defs": {
                "Cat": { "type": "object", "properties": { "pet_type": { "const": "cat", "type": "string" }, "meows": { "type": "integer" } }, "required": ["pet_type", "meows"] },
                "Dog": { "type": "object", "properties": { "pet_type": { "const": "dog", "type": "string" }, "barks": { "type": "number" } }, "required": ["pet_type", "barks"] }
            }
        });
        assert!(one_of(&schema));
    }

    #[test]
    fn different_types_and_values_are_exclusive_and_overlaps_are_not_proven() {
        assert!(one_of(&json!({ "oneOf": [{ "type": "string" }, { "type": "integer" }, { "type": "null" }] })));
        assert!(one_of(&json!({ "oneOf": [{ "const": 1 }, { "enum": [2, 3] }, { "type": "string" }] })));
        assert!(!one_of(&json!({ "oneOf": [{ "type": "integer" }, { "type": "number" }] })), "every integer is a number");
        assert!(!one_of(&json!({ "oneOf": [{ "const": 1 }, { "enum": [1.0, 2] }] })), "1 and 1.0 are the same value");
        assert!(!one_of(&json!({ "oneOf": [{ "type": "string", "minLength": 1 }, { "type": "string", "maxLength": 3 }] })));
    }

    #[test]
    fn a_shared_property_separates_objects_only_when_one_side_requires_it_and_both_are_objects() {
        let tagged = |required: Value, kind: Value| {
            json!({ "oneOf": [
                { "type": kind, "properties": { "k": { "const": "a" } }, "required": required },
                { "type": "object", "properties": { "k": { "const": "b" } } }
            ] })
        };
        assert!(one_of(&tagged(json!(["k"]), json!("object"))));
        assert!(!one_of(&tagged(json!([]), json!("object"))), "an object without `k` matches both");
        assert!(one_of(&tagged(json!(["k"]), json!(["object", "null"]))), "the second side is objects only");
        let untyped = json!({ "oneOf": [
            { "properties": { "k": { "const": "a" } }, "required": ["k"] },
            { "properties": { "k": { "const": "b" } }, "required": ["k"] }
        ] });
        assert!(!one_of(&untyped), "a string matches both");
    }

    #[test]
    fn closed_objects_are_told_apart_by_required_names_or_repaired_when_they_share_only_the_empty_object() {
        let closed = |name: &str, required: bool| {
            let required = if required { json!([name]) } else { json!([]) };
            json!({ "properties": { name: { "type": "string" } }, "required": required, "additionalProperties": false })
        };
        let parent = json!({ "type": "object" });
        assert_eq!(exclusive_within(&parent, &[closed("key", true), closed("keys", false)], &json!({})), Some(vec![]));
        assert_eq!(exclusive_within(&parent, &[closed("key", false), closed("keys", false)], &json!({})), Some(vec![0, 1]));
        assert_eq!(
            exclusive_within(&Value::Null, &[closed("key", false), closed("keys", false)], &json!({})),
            None,
            "a string matches both"
        );
        let shared = json!({ "properties": { "key": {}, "keys": {} }, "additionalProperties": false });
        assert_eq!(exclusive_within(&parent, &[closed("key", false), shared], &json!({})), None);
    }

    #[test]
    fn refs_are_percent_decoded_json_pointers() {
        let root = json!({ "$defs": { "a b": { "type": "string" }, "c/d": { "type": "null" } } });
        assert_eq!(resolve(&root, "#/$defs/a%20b"), Some(&json!({ "type": "string" })));
        assert_eq!(resolve(&root, "#/$defs/c~1d"), Some(&json!({ "type": "null" })));
        assert_eq!(resolve(&root, "other.json#/x"), None);
    }
}
