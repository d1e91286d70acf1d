//! How far a quantized model's next-token distributions are from the exact model's: the
//! reference generates greedily, and the candidate is fed the same tokens (teacher forcing), so
//! every position compares like with like even after the first disagreement.

use candle_core::{Tensor, D};

use crate::error::Result;
use crate::layers::decoder::SeqInput;
use crate::layers::kv_cache::KvCache;
use crate::pipeline::{GenerateRequest, Pipeline};
use crate::preprocess::positions::decode_position;

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Agreement {
    /// Positions compared: the prompt's last one and every generated one.
    pub positions: usize,
    /// Share of positions where both models' most likely token is the same.
    pub greedy_agreement: f64,
    /// Mean KL(reference || candidate) of the next-token distributions, in nats.
    pub mean_kl: f64,
    /// Mean over positions of |candidate logits - reference logits| / |reference logits|.
    pub logits_rel_error: f64,
}

/// Log-probabilities `[positions, vocab]` of `pipeline` for the request's prompt followed by
/// `forced` tokens, one row per next-token prediction.
pub fn next_token_logprobs(pipeline: &Pipeline, request: &GenerateRequest, forced: &[u32]) -> Result<Tensor> {
    let prompt = pipeline.prepare(request)?;
    let model = &pipeline.model;
    let images: Vec<_> = request.images.iter().collect();
    let embeds = model.encode_images(&images, &vec![None; images.len()])?;
    let mut cache = KvCache::new(model.num_layers());
    let mut rows = Vec::with_capacity(forced.len() + 1);
    let (embeds, deepstack) = model.prompt_embeds(&prompt.ids, &embeds)?;
    let first = SeqInput { embeds, positions: &prompt.positions, cache: &mut cache, adapter: None, deepstack, logit_rows: 1 };
    rows.push(model.forward(&mut [first])?);
    for &token in forced {
        let position = [decode_position(cache.len(), prompt.delta)];
        let input = SeqInput {
            embeds: model.token_embeds(&[token])?,
            positions: &position,
            cache: &mut cache,
            adapter: None,
            deepstack: None,
            logit_rows: 1,
        };
        rows.push(model.forward(&mut [input])?);
    }
    Ok(candle_nn::ops::log_softmax(&Tensor::cat(&rows, 0)?, D::Minus1)?)
}

/// Greedy `steps` tokens from `reference`, then both models' distributions along them.
pub fn compare(reference: &Pipeline, candidate: &Pipeline, request: &GenerateRequest, steps: usize) -> Result<Agreement> {
    let mut greedy = request.clone();
    greedy.max_new_tokens = Some(steps);
    greedy.stop.clear();
    let tokens = reference.generate(&greedy)?.token_ids;
    // The last generated token is never fed back: nothing predicts after it.
    let forced = &tokens[..tokens.len().saturating_sub(1)];
    let p = next_token_logprobs(reference, request, forced)?;
    let q = next_token_logprobs(candidate, request, forced)?;
    let positions = p.dim(0)?;
    let same = p.argmax(D::Minus1)?.eq(&q.argmax(D::Minus1)?)?.to_dtype(candle_core::DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    let kl = (p.exp()? * (&p - &q)?)?.sum(D::Minus1)?.mean_all()?.to_scalar::<f32>()?;
    // Log-probabilities differ from logits by a per-row constant; centring each row removes it.
    let centre = |t: &Tensor| -> Result<Tensor> { Ok(t.broadcast_sub(&t.mean_keepdim(D::Minus1)?)?) };
    let (pc, qc) = (centre(&p)?, centre(&q)?);
    let norm = |t: &Tensor| -> Result<Tensor> { Ok(t.sqr()?.sum(D::Minus1)?.sqrt()?) };
    let rel = (norm(&(&qc - &pc)?)? / norm(&pc)?)?.mean_all()?.to_scalar::<f32>()?;
    Ok(Agreement { positions, greedy_agreement: same as f64 / positions as f64, mean_kl: kl as f64, logits_rel_error: rel as f64 })
}
