//! How sure the model was of each top-level field of a constrained answer.
//!
//! A field's confidence is the probability the model gave to writing exactly that value,
//! given everything before it: the product, over the tokens that overlap the value's bytes,
//! of each token's probability among the tokens the grammar allowed at that step. A token the
//! grammar forced (a closing quote, a key, punctuation) has probability 1 there, so it carries
//! no weight: only the model's free choices count.

use std::ops::Range;

use qwen_ocr_model::decoding::logprobs::TokenLogprob;
use serde_json::{Map, Value};

/// `{field: confidence}` for a JSON object written by these tokens; `bytes` gives each
/// token's bytes (empty for tokens that wrote nothing, like the end of sequence).
pub fn field_confidences(tokens: &[TokenLogprob], bytes: impl Fn(u32) -> Vec<u8>) -> Map<String, Value> {
    let mut text = Vec::new();
    let mut spans = Vec::with_capacity(tokens.len());
    for t in tokens {
        let start = text.len();
        text.extend(bytes(t.token));
        spans.push(start..text.len());
    }
    top_level_fields(&text)
        .into_iter()
        .map(|(key, value)| {
            let logprob: f32 = tokens.iter().zip(&spans).filter(|(_, s)| overlaps(s, &value)).map(|(t, _)| t.choice_logprob).sum();
            (key, Value::from(f64::from(logprob.exp()).clamp(0.0, 1.0)))
        })
        .collect()
}

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

/// The keys of a JSON object and the byte range of each value; empty when `text` is not an
/// object (the grammar guarantees the syntax, so this scanner need not recover from errors).
fn top_level_fields(text: &[u8]) -> Vec<(String, Range<usize>)> {
    let mut fields = Vec::new();
    let mut i = skip_ws(text, 0);
    if text.get(i) != Some(&b'{') {
        return fields;
    }
    i += 1;
    loop {
        i = skip_ws(text, i);
        if text.get(i) != Some(&b'"') {
            return fields;
        }
        let key_end = skip_value(text, i);
        let Ok(key) = serde_json::from_slice::<String>(&text[i..key_end]) else { return fields };
        i = skip_ws(text, key_end);
        if text.get(i) != Some(&b':') {
            return fields;
        }
        let start = skip_ws(text, i + 1);
        let end = skip_value(text, start);
        fields.push((key, start..end));
        i = skip_ws(text, end);
        if text.get(i) != Some(&b',') {
            return fields;
        }
        i += 1;
    }
}

fn skip_ws(text: &[u8], mut i: usize) -> usize {
    while text.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// The end of the JSON value starting at `i` (a string, an object or array, or a scalar).
fn skip_value(text: &[u8], start: usize) -> usize {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut i = start;
    while let Some(&c) = text.get(i) {
        i += 1;
        if in_string {
            match c {
                b'\\' => i += 1,
                b'"' => {
                    in_string = false;
                    if depth == 0 {
                        return i;
                    }
                }
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            b',' | b'}' | b']' if depth == 0 => return i - 1,
            c if depth == 0 && c.is_ascii_whitespace() => return i - 1,
            _ => {}
        }
    }
    text.len().min(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: u32, choice_logprob: f32) -> TokenLogprob {
        TokenLogprob { token: id, logprob: choice_logprob, top: Vec::new(), choice_logprob }
    }

    #[test]
    fn fields_and_their_value_spans() {
        let text = br#"{"a":"x,\"}","b":[1,{"c":2}],"d":-3.5e2,"e":null}"#;
        let fields = top_level_fields(text);
        let spans: Vec<(&str, &[u8])> = fields.iter().map(|(k, r)| (k.as_str(), &text[r.clone()])).collect();
        assert_eq!(spans, vec![("a", &br#""x,\"}""#[..]), ("b", &b"[1,{\"c\":2}]"[..]), ("d", &b"-3.5e2"[..]), ("e", &b"null"[..])]);
        assert!(top_level_fields(b"[1,2]").is_empty());
    }

    #[test]
    fn only_free_choices_inside_a_value_count() {
        // Tokens: `{"a":"` forced, `x` (p=0.5), `y"` (p=0.5), `,"b":` forced, `7` (p=0.25), `}`.
        let pieces: [&[u8]; 6] = [b"{\"a\":\"", b"x", b"y\"", b",\"b\":", b"7", b"}"];
        let logprobs = [0.0, 0.5f32.ln(), 0.5f32.ln(), 0.0, 0.25f32.ln(), 0.0];
        let tokens: Vec<_> = logprobs.iter().enumerate().map(|(i, &l)| token(i as u32, l)).collect();
        let got = field_confidences(&tokens, |t| pieces[t as usize].to_vec());
        assert!((got["a"].as_f64().unwrap() - 0.25).abs() < 1e-6, "{got:?}");
        assert!((got["b"].as_f64().unwrap() - 0.25).abs() < 1e-6, "{got:?}");
    }
}
