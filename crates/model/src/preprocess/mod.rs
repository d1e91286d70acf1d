//! From a request to what the model reads: images decoded and patchified, the conversation
//! rendered and tokenized, and the M-RoPE positions of the prompt.

pub mod color_key;
pub mod image;
pub mod positions;
pub mod prompt;
