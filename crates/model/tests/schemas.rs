//! Schemas made into constraints (`Vocabulary::constrain`): strict against relaxed on the same
//! schema, each relaxation, the size bound, and the formats the grammar enforces, walked at
//! random through the real vocabulary and checked by the `jsonschema` crate's format checks.

use std::path::Path;

use qwen_ocr_model::decoding::grammar::{GrammarState, Vocabulary};
use qwen_ocr_model::schema::{Constraint, MAX_SCHEMA_VALUES};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// `<|im_end|>` and `<|endoftext|>`, the tiny checkpoint's end tokens.
const END: [u32; 2] = [151645, 151643];

fn vocabulary() -> Vocabulary {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-tied");
    Vocabulary::load(&dir.join("tokenizer.json"), &END).unwrap()
}

/// A text the grammar accepts, built by choosing uniformly among the tokens it allows (the end
/// token one time in four once it is allowed); `None` if it has not ended in 400 tokens.
fn random_answer(vocabulary: &Vocabulary, constraint: &Constraint, rng: &mut StdRng) -> Option<String> {
    let mut state = GrammarState::new(&constraint.grammar);
    let mut logits = vec![0f32; vocabulary.len()];
    let mut text = Vec::new();
    for _ in 0..400 {
        logits.fill(0.0);
        state.mask(&mut logits);
        let end_allowed = logits[END[0] as usize].is_finite();
        let others: Vec<u32> = (0..logits.len() as u32).filter(|&t| !END.contains(&t) && logits[t as usize].is_finite()).collect();
        if end_allowed && (others.is_empty() || rng.random_bool(0.25)) {
            return Some(String::from_utf8(text).expect("the grammar writes UTF-8"));
        }
        let token = *others.get(rng.random_range(0..others.len().max(1)))?;
        text.extend(vocabulary.token_bytes(token));
        state.accept(token);
    }
    None
}

#[test]
fn every_value_of_an_enforced_format_passes_a_standard_format_check() {
    let vocabulary = vocabulary();
    let mut rng = StdRng::seed_from_u64(21);
    for format in ["date-time", "date", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri", "uri-reference"] {
        let schema = json!({ "type": "string", "format": format });
        let constraint = vocabulary.constrain(&schema, true).unwrap_or_else(|e| panic!("{format}: {e}"));
        assert!(constraint.relaxed.is_empty(), "{format} is enforced");
        let mut finished = 0;
        for _ in 0..16 {
            let Some(text) = random_answer(&vocabulary, &constraint, &mut rng) else { continue };
            let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{format}: {text}: {e}"));
            assert_eq!(constraint.check(&value), Vec::<String>::new(), "{format}: {text}");
            finished += 1;
        }
        assert!(finished >= 8, "{format}: only {finished} walks finished");
    }
}

#[test]
fn the_same_schema_is_refused_strictly_and_relaxed_otherwise_with_the_full_check_after() {
    let vocabulary = vocabulary();
    let schema = json!({
        "type": "object",
        "properties": {
            "tags": { "type": "array", "items": { "enum": ["a", "b"] }, "uniqueItems": true, "maxItems": 2 },
            "kind": { "oneOf": [{ "type": "integer" }, { "type": "number", "maximum": 3 }] },
            "code": { "type": "string", "pattern": "^(?!x)[a-z]$", "maxLength": 1 },
            "ref": { "type": "string", "format": "uri-template", "maxLength": 8 },
            "size": { "type": "integer", "format": "int32", "not": { "const": 0 } }
        },
        "required": ["tags", "kind", "code", "ref", "size"],
        "additionalProperties": false,
        "dependentRequired": { "code": ["ref"] }
    });
    let error = vocabulary.constrain(&schema, true).unwrap_err().to_string();
    assert!(error.contains("`dependentRequired` at /dependentRequired cannot be enforced"), "{error}");

    let constraint = vocabulary.constrain(&schema, false).unwrap();
    let relaxed: Vec<(&str, &str, bool)> = constraint.relaxed.iter().map(|r| (r.keyword.as_str(), r.path.as_str(), r.checked)).collect();
    assert_eq!(
        relaxed,
        [
            ("dependentRequired", "/dependentRequired", true),
            ("uniqueItems", "/properties/tags/uniqueItems", true),
            ("oneOf", "/properties/kind/oneOf", true),
            ("pattern", "/properties/code/pattern", true),
            ("format", "/properties/ref/format", true),
            ("not", "/properties/size/not", true),
            ("format", "/properties/size/format", false),
        ]
    );
    // Every answer of the relaxed grammar is JSON of the right shape; the check catches what
    // the grammar let through.
    assert!(constraint.check(&json!({ "tags": ["a"], "kind": 1.5, "code": "a", "ref": "{x}", "size": 1 })).is_empty());
    for (answer, at) in [
        (json!({ "tags": ["a", "a"], "kind": 1.5, "code": "a", "ref": "{x}", "size": 1 }), "/tags"),
        (json!({ "tags": ["a"], "kind": 2, "code": "a", "ref": "{x}", "size": 1 }), "/kind"),
        (json!({ "tags": ["a"], "kind": 1.5, "code": "x", "ref": "{x}", "size": 1 }), "/code"),
        (json!({ "tags": ["a"], "kind": 1.5, "code": "a", "ref": "{x", "size": 1 }), "/ref"),
        (json!({ "tags": ["a"], "kind": 1.5, "code": "a", "ref": "{x}", "size": 0 }), "/size"),
    ] {
        let errors = constraint.check(&answer);
        assert!(errors.len() == 1 && errors[0].starts_with(at), "{answer}: {errors:?}");
    }
    let mut rng = StdRng::seed_from_u64(7);
    let answers: Vec<Value> =
        (0..12).filter_map(|_| random_answer(&vocabulary, &constraint, &mut rng)).map(|t| serde_json::from_str(&t).unwrap()).collect();
    assert!(answers.len() >= 6 && answers.iter().all(|a| a.as_object().is_some_and(|o| o.len() == 5)), "{answers:?}");
}

#[test]
fn a_tagged_union_through_refs_is_exact_so_strict_accepts_it() {
    let vocabulary = vocabulary();
    // What pydantic writes for `pet: Cat | Dog = Field(discriminator="pet_type")`.
    let schema = json!({
        "$defs": {
            "Cat": { "properties": { "pet_type": { "const": "cat", "type": "string" }, "meows": { "type": "integer" } }, "required": ["pet_type", "meows"], "type": "object", "additionalProperties": false },
            "Dog": { "properties": { "pet_type": { "const": "dog", "type": "string" }, "barks": { "type": "number" } }, "required": ["pet_type", "barks"], "type": "object", "additionalProperties": false }
        },
        "properties": { "pet": { "discriminator": { "mapping": { "cat": "#/$defs/Cat", "dog": "#/$defs/Dog" }, "propertyName": "pet_type" }, "oneOf": [{ "$ref": "#/$defs/Cat" }, { "$ref": "#/$defs/Dog" }] } },
        "required": ["pet"], "type": "object", "additionalProperties": false
    });
    let constraint = vocabulary.constrain(&schema, true).unwrap();
    assert!(constraint.relaxed.is_empty());
    // An overlapping oneOf is refused strictly, by path.
    let overlapping = json!({ "properties": { "n": { "oneOf": [{ "type": "integer" }, { "type": "number" }] } } });
    let error = vocabulary.constrain(&overlapping, true).unwrap_err().to_string();
    assert!(error.contains("`oneOf` at /properties/n/oneOf"), "{error}");
}

#[test]
fn a_schema_over_the_size_bound_is_refused_at_once_with_the_reason() {
    let vocabulary = vocabulary();
    let properties: serde_json::Map<String, Value> =
        (0..MAX_SCHEMA_VALUES / 2).map(|i| (format!("p{i}"), json!({ "type": "string" }))).collect();
    let schema = json!({ "type": "object", "properties": properties });
    let error = vocabulary.constrain(&schema, false).unwrap_err().to_string();
    assert!(error.contains("too large") && error.contains(&MAX_SCHEMA_VALUES.to_string()), "{error}");
}

#[test]
fn malformed_and_remote_schemas_are_refused_in_both_modes() {
    let vocabulary = vocabulary();
    for strict in [true, false] {
        for (schema, needle) in
            [(json!({ "type": "strng" }), "strng"), (json!({ "$ref": "https://example.com/s.json" }), "example.com"), (json!(3), "object")]
        {
            let error = vocabulary.constrain(&schema, strict).unwrap_err().to_string();
            assert!(error.contains(needle), "{schema} strict={strict}: {error}");
        }
    }
}
