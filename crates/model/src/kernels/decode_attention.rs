//! A decode step's attention on AVX-512, in the quantized modes: one new query per head over a
//! sequence's cached keys and values. The query heads that share a key/value head are one task,
//! so each cached key and value is read once per step, in order, where the general path (a
//! library GEMM per query head) read them once per query head (six times on the 2B decoder)
//! and packed them first. On the 2B seed task this took the decode phase's attention from 0.33
//! to 0.25-0.27 s a request (187 to about 145 µs per layer and step). What is left is the cache
//! coming from memory: a layer's 58 MB of weights pass between two visits to its 1 MB of cache,
//! which then reads at about 6 GB/s (`decode_shaped_attention_timing`; prefetching further
//! ahead, into L1 or L2, and huge pages did not change it).
//! Sums run in another order than the general path, so the exact mode (`--quant none`) keeps
//! that one.

use rayon::prelude::*;

/// Whether [`attend`] handles heads of `d` values on this CPU (the decoders' 128; 64 and 80
/// as the other kernels take).
pub(crate) fn handles(d: usize) -> bool {
    crate::kernels::features::cpu().avx512_fma && matches!(d, 64 | 80 | 128)
}

/// `[heads * d]`: each query head's attention over `total` cached positions. `queries` holds
/// the heads' rows (`[heads, d]`, rotated); `key(g)` and `value(g)` give key/value head `g`'s
/// `total` rows, row `j` at `j * stride`. Query head `h` reads key/value head `h / groups`.
///
/// # Panics
/// If [`handles`] is false for `d`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend<'a>(
    queries: &[f32],
    groups: usize,
    d: usize,
    total: usize,
    stride: usize,
    scale: f32,
    key: impl Fn(usize) -> &'a [f32] + Sync,
    value: impl Fn(usize) -> &'a [f32] + Sync,
) -> Vec<f32> {
    assert!(handles(d), "decode attention needs AVX-512 and heads of 64, 80 or 128");
    let mut out = vec![0f32; queries.len()];
    out.par_chunks_mut(groups * d).enumerate().for_each(|(g, out)| {
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.resize(groups * (total + 1), 0.0);
            let (scores, sums) = scratch.split_at_mut(groups * total);
            let (keys, values) = (key(g), value(g));
            assert!(keys.len() >= (total - 1) * stride + d && values.len() >= (total - 1) * stride + d, "cache rows out of range");
            let queries = &queries[g * groups * d..][..groups * d];
            // SAFETY: `handles` checked AVX-512 F and `d`; the rows were just checked to lie inside.
            unsafe {
                match d {
                    64 => attend_group::<4>(queries, keys, values, stride, scale, scores, sums, out),
                    80 => attend_group::<5>(queries, keys, values, stride, scale, scores, sums, out),
                    _ => attend_group::<8>(queries, keys, values, stride, scale, scores, sums, out),
                }
            }
        })
    });
    out
}

thread_local! {
    /// Each worker's scores and softmax sums, kept between steps (as large as the longest cache
    /// seen: a few hundred KB), so no step allocates scratch.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Keys whose scores one pass of the score loop computes: eight independent FMA chains, enough
/// to cover the FMA latency.
#[cfg(target_arch = "x86_64")]
const KEYS: usize = 8;
/// Query heads whose weighted sums one pass over the values keeps in registers (3 × 8 vectors
/// at `d` = 128).
#[cfg(target_arch = "x86_64")]
const HEADS: usize = 3;

/// One key/value head's share: `out` (`groups` rows of `d`) ← softmax(queries · keysᵀ ·
/// scale) · values, with `scores` (`groups` rows of `total`) and `sums` (`groups`) as scratch.
///
/// # Safety
/// AVX-512 F present; `d` = 16 · `DZ`; `total` rows of `d` at `stride` in keys and values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_group<const DZ: usize>(
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    scale: f32,
    scores: &mut [f32],
    sums: &mut [f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let d = DZ * 16;
    let groups = queries.len() / d;
    let total = scores.len() / groups;
    // SAFETY (whole body): AVX-512 F present; every load and store is a whole vector of 16
    // inside its row (rows checked by the caller; past the last key or head, the last one is
    // read again and its result dropped), and prefetches do not fault.
    unsafe {
        let key = |j: usize| keys.as_ptr().add(j.min(total - 1) * stride);
        let value = |j: usize| values.as_ptr().add(j.min(total - 1) * stride);
        for j0 in (0..total).step_by(KEYS) {
            for t in 0..KEYS {
                prefetch_row(key(j0 + KEYS + t), d);
            }
            for h in 0..groups {
                let q: [__m512; DZ] = std::array::from_fn(|c| _mm512_loadu_ps(queries.as_ptr().add(h * d + 16 * c)));
                let mut acc = [_mm512_setzero_ps(); KEYS];
                for (c, &q) in q.iter().enumerate() {
                    for (t, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_fmadd_ps(q, _mm512_loadu_ps(key(j0 + t).add(16 * c)), *acc);
                    }
                }
                for (t, acc) in acc.iter().enumerate().take(total - j0) {
                    scores[h * total + j0 + t] = _mm512_reduce_add_ps(*acc);
                }
            }
        }
        for (row, sum) in scores.chunks_exact_mut(total).zip(sums.iter_mut()) {
            *sum = crate::kernels::span_attention::softmax_row(row, scale);
        }
        for h0 in (0..groups).step_by(HEADS) {
            let head = |i: usize| (h0 + i).min(groups - 1);
            let mut acc = [[_mm512_setzero_ps(); DZ]; HEADS];
            for j in 0..total {
                let row = value(j);
                prefetch_row(value(j + KEYS), d);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let p = _mm512_set1_ps(scores[head(i) * total + j]);
                    for (c, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_fmadd_ps(p, _mm512_loadu_ps(row.add(16 * c)), *acc);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate().take(groups - h0) {
                let inv = _mm512_set1_ps(1.0 / sums[h0 + i]);
                for (c, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add((h0 + i) * d + 16 * c), _mm512_mul_ps(*acc, inv));
                }
            }
        }
    }
}

/// Asks for the `d` values at `row` to come into L1.
///
/// # Safety
/// AVX-512 F present (for the caller's sake only: prefetches never fault).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn prefetch_row(row: *const f32, d: usize) {
    use std::arch::x86_64::*;
    for c in (0..d).step_by(16) {
        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(c).cast());
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_group<const DZ: usize>(_: &[f32], _: &[f32], _: &[f32], _: usize, _: f32, _: &mut [f32], _: &mut [f32], _: &mut [f32]) {
    unreachable!("AVX-512 is only detected on x86_64")
}
