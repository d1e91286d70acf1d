//! Everything after the forward pass: the logits processors, grammars, sampling,
//! log-probabilities, detokenizing, and one sequence's decoding state.

pub mod detokenize;
pub mod grammar;
pub mod logits;
pub mod logprobs;
pub mod sampling;
pub mod sequence;
pub mod state;
