//! A client's JSON Schema made into a decoding constraint: strictly (every keyword enforced
//! while decoding, or the schema is refused) or not (what cannot be enforced is left out of the
//! grammar, reported, and checked after decoding).
//!
//! [`Vocabulary::constrain`] is the one entry point. It bounds the schema's size, rewrites it
//! for the grammar (`relax.rs`: formats into stricter regexes, `oneOf` as `anyOf`, keywords no
//! token mask can enforce), compiles it, and compiles the full check (`check.rs`) that every
//! finished answer goes through.

mod check;
mod formats;
mod one_of;
mod relax;

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{json, Value};

pub use self::check::Checker;
pub use self::relax::Relaxation;
use crate::decoding::grammar::{Grammar, Vocabulary};
use crate::error::{Error, Result};

/// The most JSON values (objects, arrays, strings, numbers...) a schema may hold. The largest
/// real-world schemas we measured (Kubernetes, JSON Schema Store) hold a few tens of
/// thousands; beyond this the compile time, not the answer, is what the client would wait for.
pub const MAX_SCHEMA_VALUES: usize = 100_000;
/// The most distinct regexes tried one by one when the grammar refuses a schema's regexes.
const MAX_PATTERNS_TRIED: usize = 256;

/// A compiled constraint with what it relaxed and the full check of its answers.
#[derive(Debug, Clone)]
pub struct Constraint {
    pub grammar: Arc<Grammar>,
    /// What the grammar does not enforce as written (empty when strict).
    pub relaxed: Vec<Relaxation>,
    checker: Arc<Checker>,
}

impl Constraint {
    /// Why a finished answer does not validate against the full schema; empty when it does.
    pub fn check(&self, answer: &Value) -> Vec<String> {
        self.checker.errors(answer)
    }
}

impl Vocabulary {
    /// Compiles `schema` into a constraint. `strict`: refuse any keyword the grammar cannot
    /// enforce, naming it and its path; otherwise relax it and report that.
    pub fn constrain(&self, schema: &Value, strict: bool) -> Result<Constraint> {
        if !schema.is_object() && !schema.is_boolean() {
            return Err(Error::Schema("a JSON Schema must be an object".into()));
        }
        let values = count_values(schema, MAX_SCHEMA_VALUES + 1);
        if values > MAX_SCHEMA_VALUES {
            return Err(Error::Schema(format!("schema too large: over {MAX_SCHEMA_VALUES} JSON values")));
        }
        let mut relaxed = relax::relax(schema, strict, &HashSet::new())?;
        let grammar = match self.compile_with(&relaxed.grammar_schema, relaxed.one_of_as_any_of) {
            Ok(grammar) => grammar,
            Err(error) if strict => return Err(self.strict_refusal(error, &relaxed)),
            Err(error) => {
                // The regex engine lacks look-around and back-references: find the regexes it
                // refuses, leave them to the check, and try once more.
                let bad = self.unenforceable_patterns(schema);
                if bad.is_empty() {
                    return Err(error);
                }
                relaxed = relax::relax(schema, strict, &bad)?;
                self.compile_with(&relaxed.grammar_schema, relaxed.one_of_as_any_of)?
            }
        };
        let checker = Checker::cached(schema)?;
        Ok(Constraint { grammar, relaxed: relaxed.relaxed, checker })
    }

    /// The error a strict schema gets: the grammar's own, or for a `oneOf` it could not decode
    /// exactly, which one.
    fn strict_refusal(&self, error: Error, relaxed: &relax::Relaxed) -> Error {
        match relaxed.unproven_one_of.first() {
            Some(path) if error.to_string().contains("oneOf") => Error::Schema(format!(
                "`oneOf` at {path} cannot be enforced while decoding: its alternatives may overlap (give them distinct types, or a property with distinct `const` values that each requires); without `strict` it is decoded as `anyOf` and checked after decoding"
            )),
            _ => error,
        }
    }

    /// The schema's regexes (`pattern`s and `patternProperties` names) the grammar cannot
    /// compile, each tried alone.
    fn unenforceable_patterns(&self, schema: &Value) -> HashSet<String> {
        let mut patterns = HashSet::new();
        collect_patterns(schema, &mut patterns);
        if patterns.len() > MAX_PATTERNS_TRIED {
            return HashSet::new();
        }
        patterns.into_iter().filter(|p| self.compile(&json!({ "type": "string", "pattern": p })).is_err()).collect()
    }
}

/// How many JSON values `value` holds, counting up to `limit`.
fn count_values(value: &Value, limit: usize) -> usize {
    let mut count = 0;
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        count += 1;
        if count >= limit {
            break;
        }
        match v {
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    count
}

/// Every `pattern` value and `patternProperties` name anywhere in the schema.
fn collect_patterns(value: &Value, out: &mut HashSet<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(p)) = map.get("pattern") {
                out.insert(p.clone());
            }
            if let Some(Value::Object(names)) = map.get("patternProperties") {
                out.extend(names.keys().cloned());
            }
            map.values().for_each(|v| collect_patterns(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_patterns(v, out)),
        _ => {}
    }
}
