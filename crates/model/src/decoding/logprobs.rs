//! Log-probabilities of the chosen tokens: under the model's own distribution (what OpenAI's
//! `logprobs` report), and among the tokens the decoder was allowed to choose (what extraction
//! confidences are made of: a token the grammar forced has probability 1 there).

use serde::Serialize;

/// Most alternatives a request may ask for, as OpenAI allows.
pub const MAX_TOP_LOGPROBS: usize = 20;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token: u32,
    /// ln p(token) under the softmax of the model's logits, before any processing.
    pub logprob: f32,
    /// The most likely tokens under that same distribution, most likely first.
    pub top: Vec<(u32, f32)>,
    /// ln p(token) among the tokens still possible after the logits processors (grammar,
    /// top-k, top-p); 0 when only one was.
    pub choice_logprob: f32,
}

impl TokenLogprob {
    /// `raw` is the log-softmax of the model's logits, `processed` the logits the token was
    /// chosen from (minus infinity where ruled out).
    pub fn new(raw: &[f32], processed: &[f32], token: u32, top: usize) -> Self {
        let possible: Vec<f32> = raw.iter().zip(processed).filter(|(_, p)| **p > f32::NEG_INFINITY).map(|(r, _)| *r).collect();
        let choice_logprob = match possible.len() {
            0 | 1 => 0.0,
            // Nothing was ruled out: the model's own log-probability, without rounding.
            n if n == raw.len() => raw[token as usize],
            _ => raw[token as usize] - log_sum_exp(&possible),
        };
        Self { token, logprob: raw[token as usize], top: top_n(raw, top), choice_logprob: choice_logprob.min(0.0) }
    }

    /// A token the grammar forced: the only possible one, so `choice_logprob` is 0. `raw` is
    /// the log-softmax of the model's logits at its position.
    pub fn forced(raw: &[f32], token: u32, top: usize) -> Self {
        Self { token, logprob: raw[token as usize], top: top_n(raw, top), choice_logprob: 0.0 }
    }
}

/// `ln softmax(logits)`, computed stably.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(logits);
    logits.iter().map(|l| l - lse).collect()
}

fn log_sum_exp(values: &[f32]) -> f32 {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f64 = values.iter().map(|v| ((v - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The `n` largest entries as `(index, value)`, largest first; ties keep the lower index.
pub fn top_n(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &v) in values.iter().enumerate() {
        if top.len() == n && top.last().is_none_or(|last| v <= last.1) {
            continue;
        }
        let at = top.partition_point(|t| t.1 >= v);
        top.insert(at, (i as u32, v));
        top.truncate(n);
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_sums_to_one() {
        let lp = log_softmax(&[1.0, 2.0, 3.0, -1e9]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_n_is_sorted_and_stable() {
        assert_eq!(top_n(&[0.5, 2.0, 2.0, 1.0], 3), vec![(1, 2.0), (2, 2.0), (3, 1.0)]);
        assert!(top_n(&[1.0], 0).is_empty());
    }

    #[test]
    fn a_forced_token_has_choice_logprob_zero_and_a_free_one_is_renormalised() {
        let raw = log_softmax(&[0.0, 1.0, 2.0]);
        let forced = TokenLogprob::new(&raw, &[f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY], 1, 0);
        assert_eq!((forced.choice_logprob, forced.logprob), (0.0, raw[1]));
        let free = TokenLogprob::new(&raw, &[f32::NEG_INFINITY, 1.0, 2.0], 2, 1);
        let expected = (2.0f32.exp() / (1.0f32.exp() + 2.0f32.exp())).ln();
        assert!((free.choice_logprob - expected).abs() < 1e-6);
        assert_eq!(free.top, vec![(2, raw[2])]);
    }
}
