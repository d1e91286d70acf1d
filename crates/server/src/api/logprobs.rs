//! Log-probabilities in OpenAI's shape: `{"content": [{"token", "logprob", "bytes",
//! "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The `logprobs` of a choice or a chunk: one entry per generated token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChoiceLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenLogprob {
    /// The token as text; invalid UTF-8 (a token holding part of a character) is replaced.
    pub token: String,
    pub logprob: f32,
    /// The token's exact bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this step, most likely first (`top_logprobs` of them).
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}
