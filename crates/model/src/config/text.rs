//! The decoder's configuration: the same fields in every family (Qwen2 and Qwen3 decoders),
//! read from the top level or `text_config`.

use serde::Deserialize;

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawRope {
    #[serde(default)]
    mrope_section: Option<Vec<usize>>,
    #[serde(default)]
    rope_theta: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawTextConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<RawRope>,
    #[serde(default)]
    rope_parameters: Option<RawRope>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: Option<bool>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// How M-RoPE assigns the rotary frequencies to the (t, h, w) position rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MropeLayout {
    /// Qwen2-VL, Qwen2.5-VL: the first `t` frequencies follow t, the next `h` h, the rest w.
    Chunked,
    /// Qwen3-VL: frequency `j` follows h when `j % 3 == 1 && j < 3h`, w when `j % 3 == 2 && j < 3w`,
    /// else t.
    Interleaved,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// How many rotary frequencies each of the temporal, height and width rows drives.
    pub mrope_section: [usize; 3],
    pub mrope_layout: MropeLayout,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (and o, in the Qwen3 decoder); `None`: the family's own default.
    pub attention_bias: Option<bool>,
}

impl TryFrom<RawTextConfig> for TextConfig {
    type Error = String;

    fn try_from(raw: RawTextConfig) -> Result<Self, String> {
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            None => return Err(format!("hidden_size {} is not divisible by num_attention_heads {heads}", raw.hidden_size)),
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {head_dim} must be even"));
        }
        let rope = raw.rope_scaling.or(raw.rope_parameters).ok_or("missing `rope_scaling.mrope_section`")?;
        let sections = rope.mrope_section.ok_or("missing `rope_scaling.mrope_section`")?;
        let mrope_section: [usize; 3] =
            sections.as_slice().try_into().map_err(|_| format!("mrope_section must have three entries, got {sections:?}"))?;
        if mrope_section.iter().sum::<usize>() * 2 != head_dim {
            return Err(format!("mrope_section {mrope_section:?} does not cover head_dim {head_dim} / 2"));
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: rope.rope_theta.or(raw.rope_theta).unwrap_or(1_000_000.0),
            mrope_section,
            // The family decides (Qwen3-VL interleaves whatever `mrope_interleaved` says).
            mrope_layout: MropeLayout::Chunked,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_bias: raw.attention_bias,
        })
    }
}

impl TextConfig {
    /// For each rotary frequency (`head_dim / 2` of them), which position row drives it:
    /// 0 = t, 1 = h, 2 = w.
    pub fn frequency_rows(&self) -> Vec<usize> {
        let [t, h, w] = self.mrope_section;
        (0..self.head_dim / 2)
            .map(|j| match self.mrope_layout {
                MropeLayout::Chunked if j < t => 0,
                MropeLayout::Chunked if j < t + h => 1,
                MropeLayout::Chunked => 2,
                MropeLayout::Interleaved if j % 3 == 1 && j < 3 * h => 1,
                MropeLayout::Interleaved if j % 3 == 2 && j < 3 * w => 2,
                MropeLayout::Interleaved => 0,
            })
            .collect()
    }
}
