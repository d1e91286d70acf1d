//! The schema the grammar is compiled from, and what was relaxed to get it.
//!
//! Strict: every keyword must be enforced while decoding, and the first one that cannot be is
//! refused with its path. Not strict: keywords that no token mask can enforce are left out of
//! the grammar and reported, and the answer is checked against the full schema afterwards
//! (`check.rs`). In both modes the formats the grammar enforces are rewritten into this
//! crate's own stricter regexes (`formats.rs`).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::formats;
use super::one_of;
use crate::error::{Error, Result};

/// One keyword the grammar does not enforce as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relaxation {
    pub keyword: String,
    /// Where it is: a JSON pointer into the schema, ending with the keyword.
    pub path: String,
    /// Whether the check after decoding covers it (an unknown format constrains nothing).
    pub checked: bool,
    /// What was done instead, for people.
    pub note: String,
}

/// The schema rewritten for the grammar, and what the rewrite relaxed.
#[derive(Debug, Clone)]
pub struct Relaxed {
    pub grammar_schema: Value,
    pub relaxed: Vec<Relaxation>,
    /// Whether the grammar may decode every `oneOf` as `anyOf`.
    pub one_of_as_any_of: bool,
    /// The `oneOf`s not proven exclusive, by path.
    pub unproven_one_of: Vec<String>,
}

/// Keywords no token mask enforces: each constrains a value by what else it holds (`not`,
/// `if`, `uniqueItems`, `contains`, dependencies) or by what other keywords evaluated.
const UNENFORCEABLE: [&str; 16] = [
    "not",
    "if",
    "then",
    "else",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "propertyNames",
    "dependencies",
    "dependentRequired",
    "dependentSchemas",
    "unevaluatedItems",
    "unevaluatedProperties",
    "$recursiveRef",
    "$dynamicRef",
];

/// Why a regex is left out: derivre, llguidance's regex engine, matches without backtracking.
const LOOK_AROUND: &str = "the regex uses look-around or back-references, which the decoder's regex engine lacks";

/// Anchors for the dynamic references above: names, not constraints.
const DYNAMIC_ANCHORS: [&str; 2] = ["$recursiveAnchor", "$dynamicAnchor"];

/// Rewrites `schema` for the grammar. `bad_patterns` are patterns the grammar's regex engine
/// cannot compile (look-around, back-references): left out when not strict.
pub fn relax(schema: &Value, strict: bool, bad_patterns: &HashSet<String>) -> Result<Relaxed> {
    let mut walk = Walk { root: schema, strict, bad_patterns, relaxed: Vec::new(), unproven_one_of: Vec::new() };
    let mut grammar_schema = schema.clone();
    if let Some(object) = grammar_schema.as_object_mut() {
        // Our compile options, never the client's.
        object.remove("x-guidance");
    }
    walk.schema(&mut grammar_schema, &mut String::new(), Draft::Latest)?;
    let one_of_as_any_of = !strict || walk.unproven_one_of.is_empty();
    Ok(Relaxed { grammar_schema, relaxed: walk.relaxed, one_of_as_any_of, unproven_one_of: walk.unproven_one_of })
}

/// The drafts whose keyword sets differ, as llguidance tells them apart (by `$schema`,
/// defaulting to 2020-12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Draft {
    Draft4,
    Draft6,
    Draft7,
    Draft201909,
    Latest,
}

impl Draft {
    /// The draft a `$schema` value names; `otherwise` when it names none we know.
    fn named(uri: Option<&Value>, otherwise: Draft) -> Draft {
        match uri.and_then(Value::as_str).map(|s| s.trim_end_matches('#')) {
            Some("http://json-schema.org/draft-04/schema") => Draft::Draft4,
            Some("http://json-schema.org/draft-06/schema") => Draft::Draft6,
            Some("http://json-schema.org/draft-07/schema") => Draft::Draft7,
            Some("https://json-schema.org/draft/2019-09/schema") => Draft::Draft201909,
            Some("https://json-schema.org/draft/2020-12/schema") => Draft::Latest,
            _ => otherwise,
        }
    }

    /// Whether `keyword` is one in this draft: elsewhere it is an unknown keyword, which
    /// both the grammar and the validator ignore.
    fn knows(self, keyword: &str) -> bool {
        match keyword {
            "not" | "uniqueItems" | "dependencies" => true,
            "contains" | "propertyNames" => self >= Draft::Draft6,
            "if" | "then" | "else" => self >= Draft::Draft7,
            "minContains"
            | "maxContains"
            | "dependentRequired"
            | "dependentSchemas"
            | "unevaluatedItems"
            | "unevaluatedProperties"
            | "$recursiveRef"
            | "$recursiveAnchor" => self >= Draft::Draft201909,
            "$dynamicRef" | "$dynamicAnchor" => self == Draft::Latest,
            _ => false,
        }
    }
}

struct Walk<'a> {
    root: &'a Value,
    strict: bool,
    bad_patterns: &'a HashSet<String>,
    relaxed: Vec<Relaxation>,
    unproven_one_of: Vec<String>,
}

impl Walk<'_> {
    /// Rewrites one schema (at JSON pointer `path`) and every schema inside it.
    fn schema(&mut self, node: &mut Value, path: &mut String, draft: Draft) -> Result<()> {
        let Some(object) = node.as_object_mut() else { return Ok(()) };
        let draft = Draft::named(object.get("$schema"), draft);
        for keyword in UNENFORCEABLE.iter().chain(&DYNAMIC_ANCHORS) {
            if !draft.knows(keyword) {
                continue;
            }
            let Some(value) = object.get(*keyword) else { continue };
            let no_op = DYNAMIC_ANCHORS.contains(keyword)
                || (*keyword == "uniqueItems" && value == &Value::Bool(false))
                || (matches!(*keyword, "dependencies" | "dependentRequired" | "dependentSchemas")
                    && value.as_object().is_some_and(Map::is_empty));
            if !no_op {
                self.relax(path, keyword, true, "no token mask can enforce it", "left out of the grammar, checked after decoding".into())?;
            }
            object.remove(*keyword);
        }
        bound_numbers(object);
        if let Some(Value::String(format)) = object.get("format") {
            let format = format.clone();
            object.remove("format");
            match formats::enforced(&format) {
                Some(regex) => add_pattern(object, format!("^(?:{regex})$")),
                None => {
                    let checked = super::check::knows_format(&format);
                    let (why, note) = match checked {
                        true => {
                            (format!("the grammar does not enforce format `{format}`"), format!("format `{format}` checked after decoding"))
                        }
                        false => (
                            format!("`{format}` is an unknown format"),
                            format!("unknown format `{format}`: an annotation, which constrains nothing"),
                        ),
                    };
                    self.relax(path, "format", checked, &why, note)?;
                }
            }
        }
        if let Some(Value::String(pattern)) = object.get("pattern") {
            if self.bad_patterns.contains(pattern) {
                let note = "left out of the grammar, checked after decoding".into();
                self.relax(path, "pattern", true, LOOK_AROUND, note)?;
                object.remove("pattern");
            }
        }
        if let Some(Value::Object(patterns)) = object.get_mut("patternProperties") {
            let bad: Vec<String> = patterns.keys().filter(|p| self.bad_patterns.contains(*p)).cloned().collect();
            for pattern in bad {
                patterns.remove(&pattern);
                let at = format!("{path}/patternProperties/{}", escape(&pattern));
                let note = "left out of the grammar (the properties it names are any value there), checked after decoding".into();
                self.relax_at(at, "patternProperties", true, LOOK_AROUND, note)?;
            }
        }
        if let Some(Value::Array(alternatives)) = object.get("oneOf") {
            let parent = self.root.pointer(path).unwrap_or(&Value::Null);
            let original = parent.get("oneOf").and_then(Value::as_array).unwrap_or(alternatives);
            let exact = match one_of::exclusive_within(parent, original, self.root) {
                Some(needs) => repair_empty_overlap(object, &needs),
                None => false,
            };
            if !exact {
                let at = format!("{path}/oneOf");
                self.unproven_one_of.push(at.clone());
                if !self.strict {
                    let note =
                        "decoded as anyOf: the alternatives may overlap, and a value matching two of them is caught only by the check"
                            .into();
                    self.relaxed.push(Relaxation { keyword: "oneOf".into(), path: at, checked: true, note });
                }
            }
        }
        self.children(object, path, draft)
    }

    fn children(&mut self, object: &mut Map<String, Value>, path: &mut String, draft: Draft) -> Result<()> {
        for (keyword, value) in object.iter_mut() {
            let kind = match keyword.as_str() {
                "properties" | "patternProperties" | "$defs" | "definitions" => Children::Map,
                "additionalProperties" | "additionalItems" | "items" | "contentSchema" => Children::One,
                "allOf" | "anyOf" | "oneOf" | "prefixItems" => Children::List,
                _ => continue,
            };
            let len = path.len();
            path.push('/');
            path.push_str(&escape(keyword));
            match (kind, value) {
                (Children::Map, Value::Object(map)) => {
                    for (name, child) in map.iter_mut() {
                        let inner = path.len();
                        path.push('/');
                        path.push_str(&escape(name));
                        self.schema(child, path, draft)?;
                        path.truncate(inner);
                    }
                }
                (Children::One | Children::List, Value::Array(list)) => {
                    for (i, child) in list.iter_mut().enumerate() {
                        let inner = path.len();
                        path.push_str(&format!("/{i}"));
                        self.schema(child, path, draft)?;
                        path.truncate(inner);
                    }
                }
                (Children::One, child) => self.schema(child, path, draft)?,
                _ => {}
            }
            path.truncate(len);
        }
        Ok(())
    }

    fn relax(&mut self, path: &str, keyword: &str, checked: bool, why: &str, note: String) -> Result<()> {
        self.relax_at(format!("{path}/{}", escape(keyword)), keyword, checked, why, note)
    }

    /// Records a relaxation, or refuses it when strict, saying `why` it cannot be enforced.
    fn relax_at(&mut self, at: String, keyword: &str, checked: bool, why: &str, note: String) -> Result<()> {
        if self.strict {
            let instead = if checked { "left out of the grammar and checked after decoding" } else { "an annotation" };
            return Err(Error::Schema(format!(
                "`{keyword}` at {at} cannot be enforced while decoding: {why}; without `strict` it is {instead}"
            )));
        }
        self.relaxed.push(Relaxation { keyword: keyword.into(), path: at, checked, note });
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Children {
    Map,
    One,
    List,
}

/// The magnitude below which a number without bounds is written. Without any bound the
/// grammar admits exponents (`24e434`), which most JSON parsers cannot read as a finite number;
/// with one it writes plain digits.
const NUMBER_BOUND: f64 = 1e15;

/// Bounds a number schema that has none, a narrowing every answer still satisfies.
fn bound_numbers(object: &mut Map<String, Value>) {
    let numbers = match object.get("type") {
        Some(Value::String(t)) => t == "number",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "number"),
        _ => false,
    };
    let bounded = ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"].iter().any(|k| object.contains_key(*k));
    if numbers && !bounded {
        object.insert("minimum".into(), Value::from(-NUMBER_BOUND));
        object.insert("maximum".into(), Value::from(NUMBER_BOUND));
    }
}

/// Gives the `oneOf` alternatives at `needs` `minProperties: 1` (they share only `{}`, which
/// `oneOf` refuses anyway); false when one is a `$ref`, which the grammar cannot add to.
fn repair_empty_overlap(object: &mut Map<String, Value>, needs: &[usize]) -> bool {
    let Some(Value::Array(alternatives)) = object.get_mut("oneOf") else { return false };
    if needs.iter().any(|&i| alternatives.get(i).is_none_or(|a| !a.is_object() || a.get("$ref").is_some())) {
        return false;
    }
    for &i in needs {
        let alternative = alternatives[i].as_object_mut().expect("checked above");
        if alternative.get("minProperties").and_then(Value::as_u64).unwrap_or(0) == 0 {
            alternative.insert("minProperties".into(), Value::from(1));
        }
    }
    true
}

/// Adds a pattern the value must also match; an existing `pattern` stays and both apply.
fn add_pattern(object: &mut Map<String, Value>, pattern: String) {
    if !object.contains_key("pattern") {
        object.insert("pattern".into(), Value::String(pattern));
        return;
    }
    let extra = Value::Object(Map::from_iter([("pattern".to_string(), Value::String(pattern))]));
    match object.get_mut("allOf") {
        Some(Value::Array(all)) => all.push(extra),
        _ => {
            object.insert("allOf".into(), Value::Array(vec![extra]));
        }
    }
}

/// A JSON pointer token.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn relaxed(schema: Value) -> Relaxed {
        relax(&schema, false, &HashSet::new()).unwrap()
    }

    #[test]
    fn unenforceable_keywords_leave_the_grammar_with_their_paths_or_are_refused_when_strict() {
        let schema = json!({
            "type": "object",
            "properties": {
                "tags": { "type": "array", "items": { "type": "string", "not": { "const": "x" } }, "uniqueItems": true },
                "a/b": { "if": { "type": "string" }, "then": { "minLength": 2 } }
            },
            "dependentRequired": { "tags": ["a/b"] }
        });
        let out = relaxed(schema.clone());
        let paths: Vec<&str> = out.relaxed.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/dependentRequired",
                "/properties/tags/uniqueItems",
                "/properties/tags/items/not",
                "/properties/a~1b/if",
                "/properties/a~1b/then"
            ]
        );
        assert!(out.relaxed.iter().all(|r| r.checked));
        let grammar = out.grammar_schema.to_string();
        for keyword in ["uniqueItems", "\"not\"", "\"if\"", "\"then\"", "dependentRequired"] {
            assert!(!grammar.contains(keyword), "{keyword} left in {grammar}");
        }
        let error = relax(&schema, true, &HashSet::new()).unwrap_err().to_string();
        assert!(error.contains("`dependentRequired` at /dependentRequired"), "{error}");
    }

    #[test]
    fn keywords_of_later_drafts_and_no_op_values_are_not_relaxations() {
        // `if` is no keyword in draft 4, and `uniqueItems: false` asks for nothing.
        let schema = json!({ "$schema": "http://json-schema.org/draft-04/schema#", "if": {}, "uniqueItems": false, "$dynamicAnchor": "x" });
        let out = relax(&schema, true, &HashSet::new()).unwrap();
        assert!(out.relaxed.is_empty());
        assert_eq!(out.grammar_schema, json!({ "$schema": "http://json-schema.org/draft-04/schema#", "if": {}, "$dynamicAnchor": "x" }));
        let out = relax(&json!({ "uniqueItems": false, "$dynamicAnchor": "x" }), true, &HashSet::new()).unwrap();
        assert_eq!(out.grammar_schema, json!({}));
    }

    #[test]
    fn known_formats_become_patterns_beside_the_schemas_own_and_unknown_ones_are_annotations() {
        let out = relaxed(json!({
            "properties": {
                "when": { "type": "string", "format": "date-time" },
                "code": { "type": "string", "format": "uuid", "pattern": "^a" },
                "n": { "type": "integer", "format": "int32" },
                "link": { "type": "string", "format": "iri" }
            }
        }));
        let when = &out.grammar_schema["properties"]["when"];
        assert!(when.get("format").is_none() && when["pattern"].as_str().unwrap().starts_with("^(?:"));
        let code = &out.grammar_schema["properties"]["code"];
        assert_eq!(code["pattern"], "^a");
        assert!(code["allOf"][0]["pattern"].as_str().unwrap().contains("[0-9a-fA-F]{8}"));
        let formats: Vec<(&str, bool)> = out.relaxed.iter().map(|r| (r.path.as_str(), r.checked)).collect();
        assert_eq!(formats, [("/properties/n/format", false), ("/properties/link/format", true)]);
        let error = relax(&json!({ "format": "int32" }), true, &HashSet::new()).unwrap_err().to_string();
        assert!(error.contains("int32") && error.contains("/format"), "{error}");
    }

    #[test]
    fn one_of_is_relaxed_only_when_its_alternatives_may_overlap() {
        let exclusive = json!({ "oneOf": [{ "type": "string" }, { "type": "null" }] });
        let out = relax(&exclusive, true, &HashSet::new()).unwrap();
        assert!(out.relaxed.is_empty() && out.one_of_as_any_of);
        let overlapping = json!({ "properties": { "x": { "oneOf": [{ "type": "integer" }, { "type": "number" }] } } });
        let strict = relax(&overlapping, true, &HashSet::new()).unwrap();
        assert!(!strict.one_of_as_any_of && strict.unproven_one_of == ["/properties/x/oneOf"]);
        let loose = relaxed(overlapping);
        assert!(loose.one_of_as_any_of && loose.relaxed[0].path == "/properties/x/oneOf");
    }

    #[test]
    fn closed_alternatives_sharing_only_the_empty_object_are_repaired_instead_of_relaxed() {
        let schema = json!({ "type": "object", "oneOf": [
            { "properties": { "key": { "type": "string" } }, "additionalProperties": false },
            { "properties": { "keys": { "type": "array" } }, "additionalProperties": false }
        ] });
        let out = relax(&schema, true, &HashSet::new()).unwrap();
        assert!(out.relaxed.is_empty() && out.unproven_one_of.is_empty());
        assert_eq!(out.grammar_schema["oneOf"][0]["minProperties"], 1);
        assert_eq!(out.grammar_schema["oneOf"][1]["minProperties"], 1);
    }

    #[test]
    fn patterns_the_decoder_cannot_compile_are_left_out_when_named() {
        let bad: HashSet<String> = ["(?=a)b".to_string()].into();
        let schema = json!({ "properties": { "x": { "type": "string", "pattern": "(?=a)b" } }, "patternProperties": { "(?=a)b": {} } });
        let out = relax(&schema, false, &bad).unwrap();
        assert_eq!(out.relaxed.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(), ["/patternProperties/(?=a)b", "/properties/x/pattern"]);
        assert!(relax(&schema, true, &bad).is_err());
    }

    #[test]
    fn numbers_without_bounds_get_plain_digit_bounds_and_bounded_ones_keep_theirs() {
        let out = relaxed(json!({ "properties": { "a": { "type": "number" }, "b": { "type": ["number", "null"], "minimum": 0 } } }));
        assert_eq!(out.grammar_schema["properties"]["a"], json!({ "type": "number", "minimum": -1e15, "maximum": 1e15 }));
        assert_eq!(out.grammar_schema["properties"]["b"], json!({ "type": ["number", "null"], "minimum": 0 }));
        assert!(out.relaxed.is_empty());
    }

    #[test]
    fn the_clients_x_guidance_is_dropped() {
        assert_eq!(relaxed(json!({ "x-guidance": { "lenient": true }, "type": "string" })).grammar_schema, json!({ "type": "string" }));
    }
}
