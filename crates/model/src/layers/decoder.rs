//! The decoder every family shares: Qwen2's (biased q/k/v) or Qwen3's (q/k RMSNorm per head),
//! with multimodal rotary positions (M-RoPE, chunked or interleaved) and grouped-query
//! attention; Qwen3-VL's DeepStack features are added after the first layers.
//!
//! `forward` takes a ragged batch: several sequences, each with its own new tokens, positions
//! and KV cache. Projections and MLPs run once over all rows; attention runs per sequence over
//! that sequence's cache, so prefill and decode steps of different lengths share one pass.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Embedding;

use crate::adapters::lora::{LoraAdapter, RowAdapters};
use crate::config::TextConfig;
use crate::families::DecoderSpec;
use crate::kernels::fused::{self, Activation, Combine};
use crate::layers::kv_cache::KvCache;
use crate::layers::linear::Linear;
use crate::layers::norm::RmsNorm;
use crate::layers::quant::Quant;
use crate::loading::weights::Loader;
use crate::stage_profile::{self, Op};

/// One sequence's part of a batch: its new input embeddings, their `(t, h, w)` positions and
/// its cache, which `forward` extends by `embeds.dim(0)` tokens.
pub struct SeqInput<'a> {
    pub embeds: Tensor,
    pub positions: &'a [[u32; 3]],
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a LoraAdapter>,
    /// DeepStack features of this sequence's image tokens (prefill only).
    pub deepstack: Option<Deepstack>,
    /// How many of its last rows get logits (1: the next token's; more: also the log-
    /// probabilities of tokens a grammar forced, which ran in this pass).
    pub logit_rows: usize,
}

/// What DeepStack adds to a sequence: after decoder layer `i`, `layers[i]` at `rows`.
pub struct Deepstack {
    /// Indexes of the image tokens among the sequence's new rows.
    pub rows: Vec<u32>,
    /// One `[rows, hidden]` tensor per layer, the sequence's images concatenated in order.
    pub layers: Vec<Tensor>,
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3: RMSNorm over each head of q and of k, before the rotary.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// The prefill's attention may run in bf16 on AMX tiles: in the quantized modes, never the
    /// exact one.
    bf16_tiles: bool,
}

impl Attention {
    fn load(vb: Loader, cfg: &TextConfig, spec: &DecoderSpec) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let qk_norm = if spec.qk_norm {
            Some((RmsNorm::load(vb.pp("q_norm"), d, cfg.rms_norm_eps)?, RmsNorm::load(vb.pp("k_norm"), d, cfg.rms_norm_eps)?))
        } else {
            None
        };
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), h, cfg.num_attention_heads * d, spec.qkv_bias)?,
            k_proj: Linear::load(vb.pp("k_proj"), h, cfg.num_key_value_heads * d, spec.qkv_bias)?,
            v_proj: Linear::load(vb.pp("v_proj"), h, cfg.num_key_value_heads * d, spec.qkv_bias)?,
            o_proj: Linear::load(vb.pp("o_proj"), cfg.num_attention_heads * d, h, spec.o_bias)?,
            qk_norm,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
            bf16_tiles: vb.quant() != Quant::None,
        })
    }

    /// `[n, heads * head_dim]` rows -> `[1, heads, n, head_dim]`.
    fn heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let n = x.dim(0)?;
        x.reshape((n, heads, self.head_dim))?.transpose(0, 1)?.unsqueeze(0)?.contiguous()
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        spans: &[(usize, usize)],
        rotary: &[(Tensor, Tensor)],
        masks: &[Option<Tensor>],
        caches: &mut [&mut KvCache],
        layer: usize,
        rows: &RowAdapters,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let mut q = self.q_proj.forward_with(x, rows)?;
        let mut k = self.k_proj.forward_with(x, rows)?;
        let v = self.v_proj.forward_with(x, rows)?;
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            let per_head = |t: &Tensor, norm: &RmsNorm| -> Result<Tensor> {
                let n = t.dim(0)?;
                norm.forward(&t.reshape(((), self.head_dim))?)?.reshape((n, ()))
            };
            q = per_head(&q, q_norm)?;
            k = per_head(&k, k_norm)?;
        }
        let groups = self.num_heads / self.num_kv_heads;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let attention = stage_profile::op(Op::Attention);
        let mut outs = Vec::with_capacity(spans.len());
        for (i, &(start, n)) in spans.iter().enumerate() {
            let (cos, sin) = &rotary[i];
            let q = candle_nn::rotary_emb::rope(&self.heads(&q.narrow(0, start, n)?, self.num_heads)?, cos, sin)?;
            let k = candle_nn::rotary_emb::rope(&self.heads(&k.narrow(0, start, n)?, self.num_kv_heads)?, cos, sin)?;
            let v = self.heads(&v.narrow(0, start, n)?, self.num_kv_heads)?;
            let (k_all, v_all) = caches[i].append(layer, &k, &v)?;
            // On the CPU attention is one fused kernel, masking included; elsewhere candle's ops
            // with an explicit mask.
            if fused::handles(x) {
                outs.push(fused::causal_attention(&q.squeeze(0)?, &k_all, &v_all, scale as f32, self.bf16_tiles)?);
                continue;
            }
            let total = k_all.dim(2)?;
            // Grouped-query attention without copying the cache: the query heads that share a
            // key/value head are stacked along the query axis.
            let q = q.reshape((1, self.num_kv_heads, groups * n, self.head_dim))?;
            let scores = (q.matmul(&k_all.t()?)? * scale)?.to_dtype(DType::F32)?;
            let scores = match &masks[i] {
                Some(mask) => scores.reshape((1, self.num_kv_heads, groups, n, total))?.broadcast_add(mask)?.reshape((
                    1,
                    self.num_kv_heads,
                    groups * n,
                    total,
                ))?,
                None => scores,
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(x.dtype())?;
            let out = probs.matmul(&v_all)?; // [1, kv, groups * n, d]
            let out = out.reshape((self.num_heads, n, self.head_dim))?.transpose(0, 1)?.reshape((n, self.num_heads * self.head_dim))?;
            outs.push(out);
        }
        let out = if outs.len() == 1 { outs.pop().expect("one output") } else { Tensor::cat(&outs, 0)? };
        drop(attention);
        self.o_proj.forward_fused(&out, rows, None, Some((Combine::Add, residual)))
    }
}

/// `[n, total]`: query `i` (at absolute position `total - n + i`) sees keys up to itself.
fn causal_mask(n: usize, total: usize, device: &Device) -> Result<Tensor> {
    let past = total - n;
    let mask: Vec<f32> = (0..n).flat_map(|i| (0..total).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(mask, (n, total), device)
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(vb: Loader, cfg: &TextConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::load(vb.pp("gate_proj"), h, i, false)?,
            up_proj: Linear::load(vb.pp("up_proj"), h, i, false)?,
            down_proj: Linear::load(vb.pp("down_proj"), i, h, false)?,
        })
    }

    /// `residual` plus the gated MLP of `x`; the gate's activation, the gating and the residual
    /// add ride on the projections' output passes.
    fn forward(&self, x: &Tensor, rows: &RowAdapters, residual: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward_fused(x, rows, Some(Activation::Silu), None)?;
        let gated = self.up_proj.forward_fused(x, rows, None, Some((Combine::Mul, &gate)))?;
        self.down_proj.forward_fused(&gated, rows, None, Some((Combine::Add, residual)))
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

pub struct TextModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// For each rotary frequency, which position row (0 = t, 1 = h, 2 = w) drives it.
    freq_rows: Vec<usize>,
    inv_freq: Vec<f32>,
    /// Embeddings may be stored narrower than this; the decoder computes in it.
    compute_dtype: DType,
    cfg: TextConfig,
}

impl TextModel {
    /// `vb` points at the decoder (`model` or `model.language_model`); `lm_head` is separate
    /// and absent when tied.
    pub fn load(vb: Loader, lm_head_vb: Option<Loader>, cfg: &TextConfig, spec: &DecoderSpec) -> Result<Self> {
        let quantized = vb.quant() != Quant::None;
        // Quantized, the table stays in its stored dtype (bf16 in published checkpoints) and only
        // looked-up rows are widened: an f32 copy would be the largest tensor of the model.
        let embed_weight = if quantized {
            vb.get_stored((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?
        } else {
            vb.get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?
        };
        let embed_tokens = Embedding::new(embed_weight.clone(), cfg.hidden_size);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                Ok(DecoderLayer {
                    input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?,
                    self_attn: Attention::load(vb.pp("self_attn"), cfg, spec)?,
                    post_attention_layernorm: RmsNorm::load(vb.pp("post_attention_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?,
                    mlp: Mlp::load(vb.pp("mlp"), cfg)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(vb.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = match lm_head_vb {
            Some(vb) if !cfg.tie_word_embeddings => Linear::load(vb, cfg.hidden_size, cfg.vocab_size, false)?,
            // Tied and dense: share the embedding table; tied and quantized: quantize it.
            _ if quantized => {
                Linear::from_checkpoint(&vb, &vb.path("embed_tokens.weight"), None, cfg.vocab_size, cfg.hidden_size, "lm_head")?
            }
            _ => Linear::from_weights(embed_weight, None, "lm_head")?,
        };
        let half = cfg.head_dim / 2;
        let inv_freq = (0..half).map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / cfg.head_dim as f32)).collect();
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            freq_rows: cfg.frequency_rows(),
            inv_freq,
            compute_dtype: vb.dtype(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)?.to_dtype(self.compute_dtype)
    }

    /// cos/sin `[n, head_dim / 2]` for M-RoPE: frequency `j` rotates by the position row that
    /// `mrope_section` assigns to it.
    fn rotary(&self, positions: &[[u32; 3]], device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let angles: Vec<f32> =
            positions.iter().flat_map(|p| self.inv_freq.iter().zip(&self.freq_rows).map(move |(f, &row)| p[row] as f32 * f)).collect();
        let angles = Tensor::from_vec(angles, (positions.len(), half), device)?;
        Ok((angles.cos()?.to_dtype(dtype)?, angles.sin()?.to_dtype(dtype)?))
    }

    /// Runs the batch and returns f32 logits `[rows, vocab]`: each sequence's last
    /// `logit_rows` rows, in order.
    pub fn forward(&self, batch: &mut [SeqInput]) -> Result<Tensor> {
        let first = batch.first().ok_or_else(|| candle_core::Error::Msg("empty batch".into()))?;
        let (device, dtype) = (first.embeds.device().clone(), first.embeds.dtype());
        let mut spans = Vec::with_capacity(batch.len());
        let mut start = 0;
        let mut rotary = Vec::with_capacity(batch.len());
        for s in batch.iter() {
            let n = s.embeds.dim(0)?;
            if n != s.positions.len() {
                candle_core::bail!("{n} embeddings but {} positions", s.positions.len());
            }
            spans.push((start, n));
            start += n;
            rotary.push(self.rotary(s.positions, &device, dtype)?);
        }
        let logit_rows: Vec<usize> = batch.iter().zip(&spans).map(|(s, &(_, n))| s.logit_rows.clamp(1, n)).collect();
        let embeds: Vec<&Tensor> = batch.iter().map(|s| &s.embeds).collect();
        let mut x = if embeds.len() == 1 { embeds[0].clone() } else { Tensor::cat(&embeds, 0)? };
        let adapters: Vec<Option<&LoraAdapter>> = batch.iter().map(|s| s.adapter).collect();
        let rows = RowAdapters::from_spans(spans.iter().zip(adapters).map(|(&(_, n), a)| (n, a)));
        // One causal mask per multi-token sequence, shared by every layer.
        let masks: Vec<Option<Tensor>> = batch
            .iter()
            .zip(&spans)
            .map(
                |(s, &(_, n))| {
                    if n > 1 && !fused::handles(&s.embeds) {
                        causal_mask(n, s.cache.len() + n, &device).map(Some)
                    } else {
                        Ok(None)
                    }
                },
            )
            .collect::<Result<_>>()?;
        let deepstack = deepstack_rows(batch, &spans, &device)?;
        let mut caches: Vec<&mut KvCache> = batch.iter_mut().map(|s| &mut *s.cache).collect();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.self_attn.forward(&layer.input_layernorm.forward(&x)?, &spans, &rotary, &masks, &mut caches, i, &rows, &x)?;
            x = layer.mlp.forward(&layer.post_attention_layernorm.forward(&x)?, &rows, &x)?;
            if let Some((rows, features)) = deepstack.as_ref().and_then(|(rows, layers)| layers.get(i).map(|f| (rows, f))) {
                x = x.index_add(rows, features, 0)?;
            }
        }
        for (cache, &(_, n)) in caches.iter_mut().zip(&spans) {
            cache.advance(n);
        }
        let last_rows: Vec<Tensor> =
            spans.iter().zip(logit_rows).map(|(&(s, n), rows)| x.narrow(0, s + n - rows, rows)).collect::<Result<_>>()?;
        let last = Tensor::cat(&last_rows, 0)?;
        self.lm_head.forward(&self.norm.forward(&last)?)?.to_dtype(DType::F32)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The projections adapters may target (not the output head).
    pub fn adaptable(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| {
            let (a, m) = (&l.self_attn, &l.mlp);
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
        })
    }
}

/// The batch's DeepStack rows (offset to their place in the batch) and, per layer, the features
/// to add there; `None` when no sequence brings any.
fn deepstack_rows(batch: &[SeqInput], spans: &[(usize, usize)], device: &Device) -> Result<Option<(Tensor, Vec<Tensor>)>> {
    let with: Vec<(&Deepstack, usize)> =
        batch.iter().zip(spans).filter_map(|(s, &(start, _))| s.deepstack.as_ref().map(|d| (d, start))).collect();
    if with.is_empty() {
        return Ok(None);
    }
    let layers = with.iter().map(|(d, _)| d.layers.len()).max().unwrap_or(0);
    if with.iter().any(|(d, _)| d.layers.len() != layers) {
        candle_core::bail!("sequences bring DeepStack features for different numbers of layers");
    }
    let rows: Vec<u32> = with.iter().flat_map(|(d, start)| d.rows.iter().map(move |&r| r + *start as u32)).collect();
    let per_layer = (0..layers)
        .map(|l| {
            let parts: Vec<&Tensor> = with.iter().map(|(d, _)| &d.layers[l]).collect();
            Tensor::cat(&parts, 0)
        })
        .collect::<Result<_>>()?;
    Ok(Some((Tensor::new(rows, device)?, per_layer)))
}
