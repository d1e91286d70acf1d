//! Log-probabilities from the engine's token ids into OpenAI's shape ([`ChoiceLogprobs`]).

use qwen_ocr_model::decoding::grammar::Vocabulary;
use qwen_ocr_model::decoding::logprobs::TokenLogprob;

use crate::api::logprobs::{self as api, ChoiceLogprobs};

/// The `logprobs` object of a choice or a chunk.
pub fn openai_logprobs(vocabulary: &Vocabulary, tokens: &[TokenLogprob]) -> ChoiceLogprobs {
    let content = tokens
        .iter()
        .map(|t| {
            let api::TopLogprob { token, logprob, bytes } = token_entry(vocabulary, t.token, t.logprob);
            let top_logprobs = t.top.iter().map(|&(token, logprob)| token_entry(vocabulary, token, logprob)).collect();
            api::TokenLogprob { token, logprob, bytes, top_logprobs }
        })
        .collect();
    ChoiceLogprobs { content }
}

/// A token as text (invalid UTF-8, from a token holding part of a character, is replaced),
/// its exact bytes, and its log-probability.
fn token_entry(vocabulary: &Vocabulary, token: u32, logprob: f32) -> api::TopLogprob {
    let bytes = vocabulary.token_bytes(token);
    api::TopLogprob { token: String::from_utf8_lossy(&bytes).into_owned(), logprob, bytes }
}
