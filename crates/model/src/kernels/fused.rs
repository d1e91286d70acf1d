//! Fused CPU kernels for the element-wise and attention work around the projections.
//!
//! candle runs `x * sigmoid(1.702 x)` as four passes with a scalar `exp` each, and attention as
//! separate scale, softmax and matmul ops over a materialised `[heads, n, n]` score tensor. On
//! the 2B vision tower (1564 patches, 32 blocks) that was most of the tower's time. Here each
//! activation is one pass with a vectorised `exp`, and attention works on one block of queries
//! at a time, so its scores stay in cache and never exist for the whole image.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `e^x` for f32 to about 2 ulp, written so that LLVM vectorises loops over it: range
/// reduction to `2^n * e^r` with `|r| <= ln2 / 2`, a degree-6 polynomial for `e^r`, and the
/// exponent put in with integer arithmetic.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest with the 1.5 * 2^23 trick: the integer lands in the low mantissa bits,
    // so neither a rounding instruction nor a float-to-int conversion (which LLVM does not
    // vectorise well) is needed.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * LOG2E + MAGIC;
    let n_int = t.to_bits().wrapping_sub(MAGIC.to_bits());
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    f32::from_bits(p.to_bits().wrapping_add(n_int << 23))
}

/// Runs `f` compiled for AVX-512 (and FMA) where the CPU has all of it (LLVM then vectorises 16
/// lanes wide), else for AVX2 (8 lanes), otherwise for the baseline target (SSE2, 4 lanes).
/// The code is the same in every build and LLVM does not reorder float arithmetic, so all
/// three give the same bits.
macro_rules! dispatch {
    ($name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
                unsafe fn wide($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn middle($($arg: $ty),*) $body
                let features = $crate::kernels::features::cpu();
                if features.avx512_fma {
                    // SAFETY: `avx512_fma` holds exactly the features `wide` was compiled for.
                    return unsafe { wide($($arg),*) };
                }
                if features.avx2_fma {
                    // SAFETY: `avx2_fma` holds exactly the features `middle` was compiled for.
                    return unsafe { middle($($arg),*) };
                }
            }
            fn narrow($($arg: $ty),*) $body
            narrow($($arg),*)
        }
    };
}
pub(crate) use dispatch;

// Rotary embedding in the rotate-half convention, one head's row: `dst = src·cos +
// rotate_half(src)·sin` with `cos`/`sin` half as long. Sliced to equal lengths up front so the
// loop vectorises: in the vision attention's layout pass the scalar loop was half the time.
dispatch!(rotate_half(src: &[f32], cos: &[f32], sin: &[f32], dst: &mut [f32]) {
    let half = cos.len();
    let (a, b) = src[..2 * half].split_at(half);
    let (lo, hi) = dst[..2 * half].split_at_mut(half);
    let sin = &sin[..half];
    for i in 0..half {
        lo[i] = a[i] * cos[i] - b[i] * sin[i];
        hi[i] = b[i] * cos[i] + a[i] * sin[i];
    }
});

dispatch!(quick_gelu_in_place(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x /= 1.0 + exp(-1.702 * *x);
    }
});

dispatch!(gelu_tanh_in_place(xs: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for x in xs.iter_mut() {
        let u = SQRT_2_OVER_PI * (*x + 0.044_715 * *x * *x * *x);
        // tanh(u) = 1 - 2 / (1 + e^(2u)), with the vectorised exp.
        let tanh = 1.0 - 2.0 / (1.0 + exp(2.0 * u));
        *x = 0.5 * *x * (1.0 + tanh);
    }
});

dispatch!(silu_in_place(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x /= 1.0 + exp(-*x);
    }
});

// Scales a row of scores, exponentiates it against its maximum, and returns the sum. The
// reductions keep 16 partial results so that they vectorise (a single f32 accumulator is a
// serial dependency the compiler may not reorder).
dispatch!(softmax_row_unnormalised(row: &mut [f32], scale: f32, sum: &mut f32) {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l = if x > *l { x } else { *l };
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).copied().fold(f32::NEG_INFINITY, f32::max);
    for s in row.iter_mut() {
        *s = exp((*s - max) * scale);
    }
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l += x;
        }
    }
    *sum = chunks.remainder().iter().sum::<f32>() + lanes.iter().sum::<f32>();
});

const PAR_CHUNK: usize = 1 << 14;

/// Whether these kernels handle `t`: f32 on the CPU. Elsewhere the callers use candle's ops.
pub fn handles(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{op} takes f32") };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("{op} needs a contiguous tensor") };
    Ok(&data[start..end])
}

/// An element-wise activation that a projection can apply to its output in the same pass
/// (see [`crate::layers::linear::Linear::forward_fused`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, the vision tower's MLP activation.
    QuickGelu,
    /// `x * sigmoid(x)`, the decoder's gate.
    Silu,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, transformers' `gelu_pytorch_tanh`
    /// (Qwen3-VL's vision MLP).
    GeluTanh,
}

impl Activation {
    pub fn apply_in_place(self, xs: &mut [f32]) {
        match self {
            Activation::QuickGelu => quick_gelu_in_place(xs),
            Activation::Silu => silu_in_place(xs),
            Activation::GeluTanh => gelu_tanh_in_place(xs),
        }
    }

    /// The activation of `x` as a new tensor: one parallel pass on the CPU, candle's ops
    /// elsewhere.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        if handles(x) {
            return x.contiguous()?.apply_op1_no_bwd(&ActivationOp(self));
        }
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Silu => x.silu(),
            Activation::GeluTanh => x.gelu(),
        }
    }
}

/// How a projection's output is combined with a second tensor of its shape, in the same pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    /// `y + other`: a residual connection.
    Add,
    /// `y * other`: the decoder's gated MLP (`up * silu(gate)`).
    Mul,
}

impl Combine {
    pub fn apply_in_place(self, ys: &mut [f32], other: &[f32]) {
        match self {
            Combine::Add => ys.iter_mut().zip(other).for_each(|(y, o)| *y += o),
            Combine::Mul => ys.iter_mut().zip(other).for_each(|(y, o)| *y *= o),
        }
    }

    pub fn apply(self, y: &Tensor, other: &Tensor) -> Result<Tensor> {
        match self {
            Combine::Add => y + other,
            Combine::Mul => y * other,
        }
    }
}

struct ActivationOp(Activation);

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        "activation"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        // Copied chunk by chunk in parallel: a serial `to_vec` of a 30 MB activation cost more
        // than the activation itself.
        let src = contiguous_f32(storage, layout, "activation")?;
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(PAR_CHUNK).zip(src.par_chunks(PAR_CHUNK)).for_each(|(o, s)| {
            o.copy_from_slice(s);
            self.0.apply_in_place(o);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Queries handled together: their scores (`QUERY_BLOCK x keys` f32) stay in L2.
const QUERY_BLOCK: usize = 128;

/// Where each head's `[rows, head_dim]` operand lives in a flat buffer: element `(r, c)` of
/// head `h` is at `offset + h * head_stride + r * row_stride + c`.
#[derive(Clone, Copy)]
struct Heads<'a> {
    data: &'a [f32],
    offset: usize,
    head_stride: usize,
    row_stride: usize,
}

impl<'a> Heads<'a> {
    fn contiguous(data: &'a [f32], n: usize, d: usize) -> Heads<'a> {
        Heads { data, offset: 0, head_stride: n * d, row_stride: d }
    }

    /// Where row `r` of head `h` starts in `data`.
    fn start(&self, h: usize, r: usize) -> usize {
        self.offset + h * self.head_stride + r * self.row_stride
    }

    /// Row `r` of head `h`: its first `d` values.
    fn row_slice(&self, h: usize, r: usize, d: usize) -> &'a [f32] {
        &self.data[self.start(h, r)..][..d]
    }

    /// Head `h`'s first `rows` rows of `d` values, with whatever lies between them.
    fn first_rows(&self, h: usize, rows: usize, d: usize) -> &'a [f32] {
        &self.data[self.start(h, 0)..][..(rows - 1) * self.row_stride + d]
    }

    /// Pointer to row `r` of head `h` (the strided kernels read on past it).
    fn row(&self, h: usize, r: usize) -> *const f32 {
        self.data[self.start(h, r)..].as_ptr()
    }
}

/// Bidirectional attention within each span of rows (one span per image), all heads, from
/// separate `[heads, n, head_dim]` f32 tensors; returns `[n, heads * head_dim]`. The model
/// uses [`vision_self_attention`]; the tests check the blocked kernel through this.
#[cfg(test)]
fn attention_within_spans(q: &Tensor, k: &Tensor, v: &Tensor, spans: &[(usize, usize)], scale: f32) -> Result<Tensor> {
    let (heads, n, d) = q.dims3()?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (qs, ks, vs) = (slice_of(&q)?, slice_of(&k)?, slice_of(&v)?);
    let (q, k, v) = (Heads::contiguous(qs, n, d), Heads::contiguous(ks, n, d), Heads::contiguous(vs, n, d));
    Tensor::from_vec(attend(q, k, v, heads, n, d, &span_tasks(heads, spans), scale), (n, heads * d), &candle_core::Device::Cpu)
}

/// The vision tower's attention from its fused projection `qkv` (`[n, 3 * heads * head_dim]`,
/// as `[n, 3, heads, head_dim]`): rotary on queries and keys (`cos`/`sin`: `[n, head_dim / 2]`,
/// rotate-half convention) in one pass that also lays them out per head (on tiles: per head
/// while it is packed), values read in place, then attention within each span. Returns `[n, heads * head_dim]`. With `bf16_tiles` (the
/// quantized modes) and a CPU with AMX, the two products run on tiles in bf16 (see
/// [`crate::kernels::amx`]); with it and AVX-512 but no AMX, on the f32 kernels of
/// [`crate::kernels::span_attention`]; otherwise (and always in the exact mode) in f32 here.
#[allow(clippy::too_many_arguments)]
pub fn vision_self_attention(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    spans: &[(usize, usize)],
    scale: f32,
    bf16_tiles: bool,
) -> Result<Tensor> {
    let (n, width) = qkv.dims2()?;
    let d = width / (3 * heads);
    let half = d / 2;
    let (qkv, cos, sin) = (qkv.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let (x, cos_v, sin_v) = (slice_of(&qkv)?, slice_of(&cos)?, slice_of(&sin)?);
    // Row r of head h of queries (which = 0) or keys (1), rotated into `dst`.
    let rotate = |which: usize, h: usize, r: usize, dst: &mut [f32]| {
        let src = &x[r * width + which * heads * d + h * d..][..d];
        rotate_half(src, &cos_v[r * half..][..half], &sin_v[r * half..][..half], dst);
    };
    let v = Heads { data: x, offset: 2 * heads * d, head_stride: d, row_stride: width };
    if bf16_tiles && crate::kernels::amx::available() {
        // SAFETY: AMX checked just above.
        let out = unsafe {
            crate::kernels::amx::attention::within_spans(
                heads,
                n,
                d,
                spans,
                scale,
                |h, r, dst| rotate(0, h, r, dst),
                |h, r, dst| rotate(1, h, r, dst),
                |h, r| v.row_slice(h, r, d),
            )
        };
        return Tensor::from_vec(out, (n, heads * d), qkv.device());
    }
    if bf16_tiles && crate::kernels::span_attention::handles(d) {
        let out = crate::kernels::span_attention::within_spans(
            heads,
            n,
            d,
            spans,
            scale,
            |h, r, dst| rotate(0, h, r, dst),
            |h, r, dst| rotate(1, h, r, dst),
            |h, r| v.row_slice(h, r, d),
        );
        return Tensor::from_vec(out, (n, heads * d), qkv.device());
    }
    let rotated = |which: usize| -> Vec<f32> {
        let mut out = vec![0f32; heads * n * d];
        out.par_chunks_mut(n * d).enumerate().for_each(|(h, head)| {
            for (r, dst) in head.chunks_exact_mut(d).enumerate() {
                rotate(which, h, r, dst);
            }
        });
        out
    };
    let (q, k) = (rotated(0), rotated(1));
    let out = attend(Heads::contiguous(&q, n, d), Heads::contiguous(&k, n, d), v, heads, n, d, &span_tasks(heads, spans), scale);
    Tensor::from_vec(out, (n, heads * d), qkv.device())
}

/// Causal grouped-query attention of a sequence's `n` new queries over its cached keys and
/// values. `q`: `[heads, n, head_dim]` (rotary applied); `k`, `v`: `[1, kv_heads, total,
/// head_dim]` views of the cache whose last `n` positions are the new tokens. Query `i` sees
/// keys up to `total - n + i`; the keys it cannot see get probability exactly 0. Returns
/// `[n, heads * head_dim]`. With `bf16_tiles`, a CPU with AMX and a prompt of at least a tile
/// of rows, the two products run on tiles in bf16; with it, AVX-512 and one new query (a decode
/// step), on the f32 kernel of [`crate::kernels::decode_attention`].
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, bf16_tiles: bool) -> Result<Tensor> {
    let (heads, n, d) = q.dims3()?;
    let (_, kv_heads, total, _) = k.dims4()?;
    let q = q.contiguous()?;
    let (k_heads, v_heads) = (strided_heads(k)?, strided_heads(v)?);
    if bf16_tiles && n >= crate::kernels::amx::TILE && crate::kernels::amx::available() {
        let qs = Heads::contiguous(slice_of(&q)?, n, d);
        // SAFETY: AMX checked just above.
        let out = unsafe {
            crate::kernels::amx::attention::causal(
                heads,
                kv_heads,
                n,
                total,
                d,
                scale,
                |h, i| qs.row_slice(h, i, d),
                |g, j| k_heads.row_slice(g, j, d),
                |g, j| v_heads.row_slice(g, j, d),
            )
        };
        return Tensor::from_vec(out, (n, heads * d), q.device());
    }
    if n == 1 && bf16_tiles && crate::kernels::decode_attention::handles(d) && k_heads.row_stride == v_heads.row_stride {
        let (groups, stride) = (heads / kv_heads, k_heads.row_stride);
        let (key, value) = (|g| k_heads.first_rows(g, total, d), |g| v_heads.first_rows(g, total, d));
        let out = crate::kernels::decode_attention::attend(slice_of(&q)?, groups, d, total, stride, scale, key, value);
        return Tensor::from_vec(out, (1, heads * d), q.device());
    }
    let past = total - n;
    let groups = heads / kv_heads;
    let mut tasks = Vec::new();
    for h in 0..heads {
        for q0 in (0..n).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(n - q0);
            tasks.push(Task { h, kv_head: h / groups, q0, rows, k0: 0, keys: past + q0 + rows, causal_past: Some(past) });
        }
    }
    let out = attend(Heads::contiguous(slice_of(&q)?, n, d), k_heads, v_heads, heads, n, d, &tasks, scale);
    Tensor::from_vec(out, (n, heads * d), q.device())
}

/// A `[1, heads, rows, head_dim]` f32 CPU view (rows may be strided, e.g. a cache's first
/// `total` positions) as [`Heads`].
fn strided_heads(t: &Tensor) -> Result<Heads<'_>> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::F32(data)) = &*storage else { candle_core::bail!("attention takes f32 CPU tensors") };
    let stride = layout.stride();
    if stride[3] != 1 {
        candle_core::bail!("attention needs contiguous head vectors")
    }
    // SAFETY: the storage is kept alive by `t`, which the caller holds for the whole kernel,
    // and nothing writes it meanwhile.
    let data = unsafe { std::slice::from_raw_parts(data.as_ptr(), data.len()) };
    Ok(Heads { data, offset: layout.start_offset(), head_stride: stride[1], row_stride: stride[2] })
}

/// One block of one head's queries and the keys it attends to.
struct Task {
    h: usize,
    kv_head: usize,
    q0: usize,
    rows: usize,
    /// Keys `k0..k0 + keys`.
    k0: usize,
    keys: usize,
    /// For causal attention: query `q0 + r` sees keys up to `causal_past + q0 + r`.
    causal_past: Option<usize>,
}

/// Query blocks of every head within each span (bidirectional, one span per image).
fn span_tasks(heads: usize, spans: &[(usize, usize)]) -> Vec<Task> {
    let mut tasks = Vec::new();
    for h in 0..heads {
        for &(start, len) in spans {
            for q0 in (start..start + len).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(start + len - q0);
                tasks.push(Task { h, kv_head: h, q0, rows, k0: start, keys: len, causal_past: None });
            }
        }
    }
    tasks
}

#[allow(clippy::too_many_arguments)]
fn attend(q: Heads, k: Heads, v: Heads, heads: usize, n: usize, d: usize, tasks: &[Task], scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; n * heads * d];
    let out_ptr = crate::kernels::q8::OutPtr(out.as_mut_ptr());
    tasks.par_iter().for_each_init(Vec::new, |scores: &mut Vec<f32>, t| {
        let (len, rows) = (t.keys, t.rows);
        scores.resize(rows * len, 0.0);
        // SAFETY: all pointers stay inside their buffers (the task's rows and keys exist in
        // every operand); every task writes a disjoint set of output elements.
        // scores[rows, len] = Q[q0.., :] · K[k0.., :]ᵀ
        unsafe {
            matmul_1t(rows, len, d, scores.as_mut_ptr(), len, q.row(t.h, t.q0), q.row_stride, k.row(t.kv_head, t.k0), 1, k.row_stride)
        };
        let mut sums = [0f32; QUERY_BLOCK];
        for (r, (row, sum)) in scores.chunks_exact_mut(len).zip(sums.iter_mut()).enumerate() {
            let visible = t.causal_past.map_or(len, |past| (past + t.q0 + r + 1 - t.k0).min(len));
            let (seen, unseen) = row.split_at_mut(visible);
            softmax_row_unnormalised(seen, scale, sum);
            unseen.fill(0.0);
        }
        let out_ptr = &out_ptr;
        let out_row_stride = (heads * d) as isize;
        // SAFETY: as above; the destination is rows q0..q0+rows, columns h*d..(h+1)*d.
        unsafe {
            let dst = out_ptr.0.add(t.q0 * heads * d + t.h * d);
            matmul_1t(rows, d, len, dst, heads * d, scores.as_ptr(), len, v.row(t.kv_head, t.k0), v.row_stride, 1);
            for (r, sum) in sums.iter().take(rows).enumerate() {
                let row = std::slice::from_raw_parts_mut(dst.offset(r as isize * out_row_stride), d);
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
            }
        }
    });
    out
}

/// `dst[m, n] = lhs[m, k] · rhs[k, n]` on this thread, for row-major `dst` and `lhs` with the
/// given row strides and `rhs` with any strides (element `(i, j)` at `i * rhs_rs + j * rhs_cs`).
///
/// # Safety
/// Every addressed element must lie inside its buffer, and nothing else may write `dst`'s.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_1t(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
) {
    // SAFETY: forwarded to the caller; gemm computes `alpha * dst + beta * lhs · rhs` and
    // does not read `dst` when told so.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs,
            1,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

fn slice_of(t: &Tensor) -> Result<&[f32]> {
    // The tensors are contiguous CPU f32 and outlive the returned slice's use.
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::F32(data)) = &*storage else { candle_core::bail!("attention takes f32 CPU tensors") };
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("attention needs contiguous tensors".into()))?;
    // SAFETY: the storage is kept alive by `t`, which the caller holds for the whole kernel;
    // the guard only protects against concurrent mutation, which never happens to these.
    Ok(unsafe { std::slice::from_raw_parts(data[start..end].as_ptr(), end - start) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn exp_matches_std_within_a_few_ulp() {
        for i in -8000..8000 {
            let x = i as f32 * 0.0107;
            let (got, want) = (exp(x), x.exp());
            assert!(((got - want) / want).abs() < 4e-7, "exp({x}) = {got}, std {want}");
        }
    }

    /// `cargo test --release -p qwen-ocr-model --lib vision_shaped -- --ignored --nocapture`
    #[test]
    #[ignore = "timing, not a check"]
    fn vision_shaped_attention_timing() {
        let (heads, n, d) = (16, 1564, 80);
        let q = Tensor::randn(0f32, 1.0, (heads, n, d), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (n, 5120), &Device::Cpu).unwrap();
        let qkv = Tensor::randn(0f32, 1.0, (n, 3 * heads * d), &Device::Cpu).unwrap();
        let angles = Tensor::randn(0f32, 1.0, (n, d / 2), &Device::Cpu).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        for _ in 0..3 {
            let t = std::time::Instant::now();
            attention_within_spans(&q, &q, &q, &[(0, n)], 0.1).unwrap();
            let a = t.elapsed();
            let t = std::time::Instant::now();
            vision_self_attention(&qkv, &cos, &sin, heads, &[(0, n)], 0.1, true).unwrap();
            let tiles = t.elapsed();
            let t = std::time::Instant::now();
            Activation::QuickGelu.apply(&x).unwrap();
            println!("attention f32 {a:?}, bf16 tiles (AMX: {}) {tiles:?}, quick_gelu {:?}", crate::kernels::amx::available(), t.elapsed());
        }
    }

    /// `cargo test --release -p qwen-ocr-model --lib decode_shaped -- --ignored --nocapture`:
    /// one decode step's attention on the 2B decoder's shapes, a cache per layer visited in
    /// turn as decode does (so each comes from memory), the quantized modes' kernel against the
    /// exact mode's.
    #[test]
    #[ignore = "timing, not a check"]
    fn decode_shaped_attention_timing() {
        let (heads, kv_heads, d, total, cap, layers) = (12, 2, 128, 500, 1024, 28);
        let cache = || Tensor::randn(0f32, 1.0, (1, kv_heads, cap, d), &Device::Cpu).unwrap().narrow(2, 0, total).unwrap();
        let caches: Vec<(Tensor, Tensor)> = (0..layers).map(|_| (cache(), cache())).collect();
        let q = Tensor::randn(0f32, 1.0, (heads, 1, d), &Device::Cpu).unwrap();
        let weights = vec![1u8; (8 * 58) << 20];
        let steps = 10 * layers;
        for _ in 0..3 {
            let mut line = String::new();
            for bf16_tiles in [true, false] {
                let mut spent = std::time::Duration::ZERO;
                for (i, (k, v)) in caches.iter().cycle().take(steps).enumerate() {
                    // As the layer's weights would (58 MB on the 2B decoder), evict the cache.
                    let chunk = &weights[(i % 8) * (weights.len() / 8)..][..weights.len() / 8];
                    std::hint::black_box(
                        chunk.par_chunks(1 << 16).map(|c| c.iter().step_by(16).fold(0u8, |a, &b| a ^ b)).reduce(|| 0, |a, b| a ^ b),
                    );
                    let t = std::time::Instant::now();
                    causal_attention(&q, k, v, 0.1, bf16_tiles).unwrap();
                    spent += t.elapsed();
                }
                line += &format!(" {}: {:?}", if bf16_tiles { "quantized modes" } else { "exact mode" }, spent / steps as u32);
            }
            println!("per layer and step,{line}");
        }
    }

    #[test]
    fn fused_activations_match_candle() {
        let x = Tensor::randn(0f32, 3.0, (37, 129), &Device::Cpu).unwrap();
        let y = Tensor::randn(0f32, 1.0, (37, 129), &Device::Cpu).unwrap();
        let want = (&x * candle_nn::ops::sigmoid(&(&x * 1.702).unwrap()).unwrap()).unwrap();
        let diff = (Activation::QuickGelu.apply(&x).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "quick_gelu differs by {diff}");
        let want = (x.silu().unwrap() * &y).unwrap();
        let got = Combine::Mul.apply(&y, &Activation::Silu.apply(&x).unwrap()).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "silu(x) * y differs by {diff}");
    }

    /// The vision tower's attention through the fused kernel, f32 or (AMX CPUs) bf16 tiles,
    /// against candle's rotary and the span-blocked f32 kernel. `d` = 80 and spans that start
    /// mid-tile, as the real tower has (16 heads of 80, one span per image).
    fn check_vision_attention(bf16_tiles: bool, max_abs: f32, rel_rms: f32) {
        let (heads, d, n) = (3, 80, 183);
        let spans = [(0, 115), (115, 68)];
        let qkv = Tensor::randn(0f32, 1.0, (n, 3 * heads * d), &Device::Cpu).unwrap();
        let angles = Tensor::randn(0f32, 1.0, (n, d / 2), &Device::Cpu).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let got = vision_self_attention(&qkv, &cos, &sin, heads, &spans, 0.3, bf16_tiles).unwrap();
        let parts = qkv.reshape((n, 3, heads, d)).unwrap().permute((1, 2, 0, 3)).unwrap();
        let rot = |i: usize| {
            let t = parts.get(i).unwrap().unsqueeze(0).unwrap().contiguous().unwrap();
            candle_nn::rotary_emb::rope(&t, &cos, &sin).unwrap().squeeze(0).unwrap()
        };
        let v = parts.get(2).unwrap().contiguous().unwrap();
        let want = attention_within_spans(&rot(0), &rot(1), &v, &spans, 0.3).unwrap();
        assert_close(&got, &want, max_abs, rel_rms, &format!("fused vision attention (bf16 tiles: {bf16_tiles})"));
    }

    /// `got` within `max_abs` of `want` everywhere and within `rel_rms` of it in rms.
    fn assert_close(got: &Tensor, want: &Tensor, max_abs: f32, rel_rms: f32, what: &str) {
        let err = (got - want).unwrap();
        let diff = err.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < max_abs, "{what} differs by up to {diff}");
        let rms = |t: &Tensor| t.sqr().unwrap().mean_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        let rel = rms(&err) / rms(want);
        assert!(rel < rel_rms, "{what}: relative rms error {rel}");
    }

    #[test]
    fn vision_attention_applies_rotary_and_reads_the_fused_projection() {
        check_vision_attention(false, 1e-5, 1e-5);
    }

    /// bf16 operands carry 8 significant bits: outputs (averages of unit-variance values) stay
    /// within about 0.5% of f32 in rms, a few hundredths at worst. A broken layout or mask
    /// gives errors of order one. Without AMX this runs the f32 path again.
    #[test]
    fn vision_attention_on_bf16_tiles_stays_close_to_f32() {
        check_vision_attention(true, 0.1, 1e-2);
    }

    /// Causal attention of `n` new queries over a cache with `past` earlier keys (grouped-query,
    /// a view of a larger cache), f32 or (AMX CPUs) bf16 tiles, against masked dense attention.
    fn check_causal_attention(d: usize, n: usize, bf16_tiles: bool, max_abs: f32, rel_rms: f32) {
        check_grouped_attention(6, 2, d, n, bf16_tiles, max_abs, rel_rms)
    }

    /// As [`check_causal_attention`] with `heads` query heads over `kv_heads` key/value heads.
    fn check_grouped_attention(heads: usize, kv_heads: usize, d: usize, n: usize, bf16_tiles: bool, max_abs: f32, rel_rms: f32) {
        let (past, cap) = (37, 256);
        let cache_k = Tensor::randn(0f32, 1.0, (1, kv_heads, cap, d), &Device::Cpu).unwrap();
        let cache_v = Tensor::randn(0f32, 1.0, (1, kv_heads, cap, d), &Device::Cpu).unwrap();
        let total = past + n;
        let (k, v) = (cache_k.narrow(2, 0, total).unwrap(), cache_v.narrow(2, 0, total).unwrap());
        let q = Tensor::randn(0f32, 1.0, (heads, n, d), &Device::Cpu).unwrap();
        let got = causal_attention(&q, &k, &v, 0.2, bf16_tiles).unwrap();
        let groups = heads / kv_heads;
        let mask: Vec<f32> = (0..n).flat_map(|i| (0..total).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY })).collect();
        let mask = Tensor::from_vec(mask, (n, total), &Device::Cpu).unwrap();
        let mut outs = Vec::new();
        for h in 0..heads {
            let (k, v) = (k.get(0).unwrap().get(h / groups).unwrap(), v.get(0).unwrap().get(h / groups).unwrap());
            let scores = (q.get(h).unwrap().matmul(&k.t().unwrap()).unwrap() * 0.2).unwrap().broadcast_add(&mask).unwrap();
            outs.push(candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v.contiguous().unwrap()).unwrap());
        }
        let want = Tensor::stack(&outs, 0).unwrap().transpose(0, 1).unwrap().reshape((n, heads * d)).unwrap();
        assert_close(&got, &want, max_abs, rel_rms, &format!("causal attention (bf16 tiles: {bf16_tiles})"));
    }

    #[test]
    fn causal_attention_matches_masked_dense_attention_over_a_cache() {
        check_causal_attention(16, 150, false, 1e-5, 1e-5);
    }

    /// A decode step (one query per head): in the quantized modes on AVX-512, the kernel of
    /// `decode_attention` for heads of 80 and 128 (16 and 20 take the general path there too).
    #[test]
    fn one_query_attention_matches_masked_dense_attention_over_a_cache() {
        for (d, bf16_tiles) in [(16, false), (16, true), (80, true), (128, true), (20, true)] {
            check_causal_attention(d, 1, bf16_tiles, 1e-5, 1e-5);
        }
        // The decoders' groupings: Qwen2.5-VL-3B's 8 query heads per key/value head (passes of
        // 3, 3 and 2 over the values), Qwen3-VL-2B's 2, and one key/value head per query head.
        for (heads, kv_heads) in [(16, 2), (16, 8), (4, 4)] {
            check_grouped_attention(heads, kv_heads, 128, 1, true, 1e-5, 1e-5);
        }
    }

    /// As the vision attention's bound; `d` = 80 is not a whole number of tile steps, and
    /// neither the past nor the queries fill whole tiles. Without AMX this runs f32 again.
    #[test]
    fn causal_attention_on_bf16_tiles_stays_close_to_f32() {
        check_causal_attention(80, 150, true, 0.1, 1e-2);
    }

    #[test]
    fn blocked_attention_matches_dense_attention_per_span() {
        let (heads, d) = (3, 16);
        let spans = [(0, 70), (70, 5), (75, 130)];
        let n = 205;
        let q = Tensor::randn(0f32, 1.0, (heads, n, d), &Device::Cpu).unwrap();
        let k = Tensor::randn(0f32, 1.0, (heads, n, d), &Device::Cpu).unwrap();
        let v = Tensor::randn(0f32, 1.0, (heads, n, d), &Device::Cpu).unwrap();
        let scale = 0.25;
        let got = attention_within_spans(&q, &k, &v, &spans, scale).unwrap();
        let mut parts = Vec::new();
        for &(s, len) in &spans {
            let (q, k, v) = (q.narrow(1, s, len).unwrap(), k.narrow(1, s, len).unwrap(), v.narrow(1, s, len).unwrap());
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            parts.push(probs.matmul(&v).unwrap()); // [heads, len, d]
        }
        let want = Tensor::cat(&parts, 1).unwrap().transpose(0, 1).unwrap().reshape((n, heads * d)).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "attention differs by {diff}");
    }
}
