//! The chain of logits processors one sequence runs before each choice: repetition penalty,
//! grammar, temperature, top-k, top-p, in that order (transformers' order, with the grammar
//! mask before anything that reshapes the distribution). Each processor only edits logits;
//! tokens it rules out become minus infinity. Choosing the token is the sampler's job.

use crate::decoding::grammar::{Grammar, GrammarState};
use crate::decoding::sampling::SamplingParams;

pub trait LogitsProcessor: Send {
    /// Work that depends only on the tokens chosen so far, so it may run while the model
    /// computes this step's logits (on another thread).
    fn prepare(&mut self) {}

    /// Edits this step's logits; `history` is every token so far, prompt included.
    fn process(&mut self, logits: &mut [f32], history: &[u32]);

    /// Learns the token that was chosen.
    fn accept(&mut self, _token: u32) {}

    /// The token this processor leaves as the only possible one next, whatever the logits.
    fn forced_token(&mut self) -> Option<u32> {
        None
    }
}

/// The processors of one sequence, in order.
#[derive(Default)]
pub struct LogitsChain {
    processors: Vec<Box<dyn LogitsProcessor>>,
    /// Whether any processor does work in `prepare` (only the grammar does).
    prepares: bool,
}

impl LogitsChain {
    /// The chain a request's sampling settings and constraint ask for. Greedy decoding skips
    /// temperature, top-k and top-p: they never change which logit is largest.
    pub fn new(sampling: &SamplingParams, grammar: Option<&Grammar>) -> Self {
        let mut processors: Vec<Box<dyn LogitsProcessor>> = Vec::new();
        if sampling.repetition_penalty != 1.0 {
            processors.push(Box::new(RepetitionPenalty(sampling.repetition_penalty as f32)));
        }
        let prepares = grammar.is_some();
        if let Some(grammar) = grammar {
            processors.push(Box::new(GrammarState::new(grammar)));
        }
        if !sampling.is_greedy() {
            processors.push(Box::new(Temperature(sampling.temperature as f32)));
            if sampling.top_k > 0 {
                processors.push(Box::new(TopK(sampling.top_k)));
            }
            if sampling.top_p < 1.0 {
                processors.push(Box::new(TopP(sampling.top_p)));
            }
        }
        Self { processors, prepares }
    }

    pub fn has_preparation(&self) -> bool {
        self.prepares
    }

    pub fn prepare(&mut self) {
        self.processors.iter_mut().for_each(|p| p.prepare());
    }

    pub fn process(&mut self, logits: &mut [f32], history: &[u32]) {
        self.processors.iter_mut().for_each(|p| p.process(logits, history));
    }

    pub fn accept(&mut self, token: u32) {
        self.processors.iter_mut().for_each(|p| p.accept(token));
    }

    /// The next token, when a processor (the grammar) allows only one.
    pub fn forced_token(&mut self) -> Option<u32> {
        self.processors.iter_mut().find_map(|p| p.forced_token())
    }
}

impl LogitsProcessor for GrammarState {
    fn prepare(&mut self) {
        GrammarState::prepare(self);
    }

    fn process(&mut self, logits: &mut [f32], _history: &[u32]) {
        self.mask(logits);
    }

    fn accept(&mut self, token: u32) {
        GrammarState::accept(self, token);
    }

    fn forced_token(&mut self) -> Option<u32> {
        GrammarState::forced_token(self)
    }
}

/// Divides positive logits and multiplies negative ones of every token seen so far
/// (prompt included), as transformers does.
pub struct RepetitionPenalty(pub f32);

impl LogitsProcessor for RepetitionPenalty {
    fn process(&mut self, logits: &mut [f32], history: &[u32]) {
        let mut seen = std::collections::HashSet::with_capacity(history.len());
        for &id in history {
            if seen.insert(id) {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l < 0.0 { *l * self.0 } else { *l / self.0 };
                }
            }
        }
    }
}

pub struct Temperature(pub f32);

impl LogitsProcessor for Temperature {
    fn process(&mut self, logits: &mut [f32], _history: &[u32]) {
        logits.iter_mut().for_each(|l| *l /= self.0);
    }
}

/// Keeps the `k` largest logits (and any tied with the k-th).
pub struct TopK(pub usize);

impl LogitsProcessor for TopK {
    fn process(&mut self, logits: &mut [f32], _history: &[u32]) {
        if self.0 >= logits.len() {
            return;
        }
        let mut sorted = logits.to_vec();
        let (_, kth, _) = sorted.select_nth_unstable_by(self.0 - 1, |a, b| b.total_cmp(a));
        let kth = *kth;
        logits.iter_mut().filter(|l| **l < kth).for_each(|l| *l = f32::NEG_INFINITY);
    }
}

/// Keeps the smallest set of most likely tokens whose probability reaches `p` (at least one).
pub struct TopP(pub f64);

impl LogitsProcessor for TopP {
    fn process(&mut self, logits: &mut [f32], _history: &[u32]) {
        let mut order: Vec<usize> = (0..logits.len()).filter(|&i| logits[i] > f32::NEG_INFINITY).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let Some(&best) = order.first() else { return };
        let max = logits[best];
        let sum: f32 = order.iter().map(|&i| (logits[i] - max).exp()).sum();
        let mut mass = 0.0;
        let mut keep = order.len();
        for (n, &i) in order.iter().enumerate() {
            mass += (logits[i] - max).exp() / sum;
            if mass as f64 >= self.0 {
                keep = n + 1;
                break;
            }
        }
        order[keep..].iter().for_each(|&i| logits[i] = f32::NEG_INFINITY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_k_largest_and_ties() {
        let mut logits = [0.0, 3.0, 1.0, 3.0, 2.0];
        TopK(2).process(&mut logits, &[]);
        assert_eq!(logits.iter().filter(|l| l.is_finite()).count(), 2);
        let mut tied = [1.0, 2.0, 2.0, 0.0];
        TopK(2).process(&mut tied, &[]);
        assert_eq!(tied, [f32::NEG_INFINITY, 2.0, 2.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p() {
        // Probabilities about 0.64, 0.24, 0.09, 0.03.
        let mut logits = [3.0, 2.0, 1.0, 0.0];
        TopP(0.8).process(&mut logits, &[]);
        assert_eq!(logits, [3.0, 2.0, f32::NEG_INFINITY, f32::NEG_INFINITY]);
        let mut one = [3.0, 2.0];
        TopP(0.1).process(&mut one, &[]);
        assert_eq!(one, [3.0, f32::NEG_INFINITY]);
    }
}
