//! Sampling settings, and choosing the next token from processed logits: greedy, or a draw.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::GenerationConfig;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// 0 means no top-k cut.
    pub top_k: usize,
    pub top_p: f64,
    pub repetition_penalty: f64,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: None }
    }
}

impl SamplingParams {
    /// The checkpoint's defaults: greedy unless `do_sample` is set.
    pub fn from_generation_config(g: &GenerationConfig) -> Self {
        let mut p = Self { repetition_penalty: g.repetition_penalty.unwrap_or(1.0), ..Self::default() };
        if g.do_sample == Some(true) {
            p.temperature = g.temperature.unwrap_or(1.0);
            p.top_k = g.top_k.unwrap_or(0);
            p.top_p = g.top_p.unwrap_or(1.0);
        }
        p
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }

    /// Whether the choice is always the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// Chooses the token from logits the [`LogitsChain`](crate::decoding::logits::LogitsChain) has
/// already processed: the largest when greedy, else a draw from their softmax.
pub struct Sampler {
    greedy: bool,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self { greedy: params.is_greedy(), rng }
    }

    /// A token chosen for the sampler (the grammar's only choice): takes the draw `choose`
    /// would have, so that a seeded sequence samples the same tokens after it.
    pub fn skip(&mut self) {
        if !self.greedy {
            let _: f32 = self.rng.random();
        }
    }

    pub fn choose(&mut self, logits: &[f32]) -> u32 {
        if self.greedy {
            return argmax(logits);
        }
        // Walk the candidates from the most likely down, so one draw maps to one token
        // whatever the vocabulary order.
        let mut candidates: Vec<(u32, f32)> =
            logits.iter().enumerate().filter(|(_, l)| **l > f32::NEG_INFINITY).map(|(i, &l)| (i as u32, l)).collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let mut u: f32 = self.rng.random();
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return candidates[i].0;
            }
            u -= p;
        }
        candidates[probs.len() - 1].0
    }
}

/// Index of the largest logit; the first one on ties, as `torch.argmax`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoding::logits::LogitsChain;

    fn next_token(params: &SamplingParams, sampler: &mut Sampler, logits: &[f32], history: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        LogitsChain::new(params, None).process(&mut logits, history);
        sampler.choose(&logits)
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let params = SamplingParams::default();
        assert_eq!(next_token(&params, &mut Sampler::new(&params), &[0.1, 2.0, 2.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let params = SamplingParams { repetition_penalty: 4.0, ..Default::default() };
        assert_eq!(next_token(&params, &mut Sampler::new(&params), &[1.0, 2.0, 0.9], &[1]), 0);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let params = SamplingParams { temperature: 1.0, top_k: 2, seed: Some(3), ..Default::default() };
        let draw = || {
            let mut s = Sampler::new(&params);
            (0..50).map(|_| next_token(&params, &mut s, &[0.0, 1.0, 1.1, -5.0], &[])).collect::<Vec<_>>()
        };
        let a = draw();
        assert_eq!(a, draw());
        assert!(a.iter().all(|&t| t == 1 || t == 2));
        assert!(a.contains(&1) && a.contains(&2));
    }
}
