//! Log-probabilities in OpenAI's shape: `{"content": [{"token", "logprob", "bytes",
//! "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.

use qwen_ocr_model::grammar::Vocabulary;
use qwen_ocr_model::logprobs::TokenLogprob;
use serde_json::{json, Value};

/// The `logprobs` object of a choice or a chunk.
pub fn openai_logprobs(vocabulary: &Vocabulary, tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut entry = token_entry(vocabulary, t.token, t.logprob);
            entry["top_logprobs"] = t.top.iter().map(|&(token, logprob)| token_entry(vocabulary, token, logprob)).collect();
            entry
        })
        .collect();
    json!({ "content": content })
}

/// A token as text (invalid UTF-8, from a token holding part of a character, is replaced),
/// its exact bytes, and its log-probability.
fn token_entry(vocabulary: &Vocabulary, token: u32, logprob: f32) -> Value {
    let bytes = vocabulary.token_bytes(token);
    json!({ "token": String::from_utf8_lossy(&bytes), "logprob": logprob, "bytes": bytes })
}
