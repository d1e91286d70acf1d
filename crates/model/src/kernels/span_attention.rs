//! The vision towers' attention in f32 on AVX-512 CPUs without AMX, in the quantized modes:
//! each head's keys and values are laid out once for register-blocked kernels that every
//! query block shares. The general f32 path (a library GEMM per query block) repacked a head's
//! keys and values for each of its 25 query blocks on the 2B tower and reached a third of the
//! FMA peak; attention was half the tower's time there. Here a layer takes 60 ms against 88.
//! Sums run in another order than the general path, so the exact mode (`--quant none`) keeps
//! that one.
//!
//! Per (span, head), queries (rotated) and values are laid out row-major `[len, d]` (copied,
//! not read in place: in the fused projection the 2B tower's rows lie 15 KiB apart, and the
//! weighted sum ran 40% slower on them), keys in panels of 16, panel `p` holding `[d][16]` (key
//! `16p + j`'s value `i` at `i·16 + j`, zero past the span). `d` must be 64, 80 or 128 (whole
//! vectors of 16).

use rayon::prelude::*;

use crate::kernels::amx::attention::row_chunks;
#[cfg(target_arch = "x86_64")]
use crate::kernels::amx::attention::{exp_lanes, lanes, softmax_shift};
use crate::kernels::disjoint::Disjoint;
use crate::kernels::q8::OutPtr;

/// Query rows per task: their scores (`64 × keys`) stay in L2.
const QUERY_BLOCK: usize = 64;
/// Keys per chunk of the weighted sum: their values (20 KiB at d = 80) stay in L1.
const KEY_CHUNK: usize = 64;
/// Most buffers kept (a 2B layer's 16 heads, three each).
const POOL_BUFFERS: usize = 48;
/// Rows per chunk of the layout pass: two key panels, laid out whole by one task.
const LAYOUT_ROWS: usize = 2 * PANEL;
/// Keys per panel: one AVX-512 vector.
const PANEL: usize = 16;
/// Query rows and key panels per score micro-kernel call: 8 × 3, 24 accumulators, 11 loads per
/// 24 FMAs (on the 2B tower's shapes 8 × 2 reached 59% of the FMA peak, 8 × 3 64%).
const SCORE_ROWS: usize = 8;
const SCORE_PANELS: usize = 3;

/// One span's and head's queries (rotated), keys and values, laid out once and shared by its
/// query blocks.
struct Laid {
    queries: Vec<f32>,
    key_panels: Vec<f32>,
    values: Vec<f32>,
}

thread_local! {
    /// Each worker's scores, kept between tasks and calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers kept between calls (fresh ones page-fault: a vision layer lays out 16 MB).
static POOL: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// Whether [`within_spans`] handles heads of `d` values on this CPU.
pub(crate) fn handles(d: usize) -> bool {
    crate::kernels::features::cpu().avx512_fma && matches!(d, 64 | 80 | 128)
}

/// Attention of rows `start..start + len` of each span among themselves, all heads, as
/// [`crate::kernels::amx::attention::within_spans`] takes it (`q`, `k` write head `h`'s row
/// `r` rotated, `v` gives it); returns `[n, heads * d]`, rows outside every span zero.
///
/// # Panics
/// If [`handles`] is false for `d`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn within_spans<'a>(
    heads: usize,
    n: usize,
    d: usize,
    spans: &[(usize, usize)],
    scale: f32,
    q: impl Fn(usize, usize, &mut [f32]) + Sync,
    k: impl Fn(usize, usize, &mut [f32]) + Sync,
    v: impl Fn(usize, usize) -> &'a [f32] + Sync,
) -> Vec<f32> {
    assert!(handles(d), "span_attention: head size {d} on this CPU");
    let width = heads * d;
    let units: Vec<(usize, usize, usize)> = spans.iter().flat_map(|&(start, len)| (0..heads).map(move |h| (h, start, len))).collect();
    let pooled = |len: usize| {
        let mut buf: Vec<f32> = POOL.lock().ok().and_then(|mut pool| pool.pop()).unwrap_or_default();
        buf.resize(len, 0.0);
        buf
    };
    let mut laid: Vec<Laid> = units
        .iter()
        .map(|&(_, _, len)| Laid { queries: pooled(len * d), key_panels: pooled(len.div_ceil(PANEL) * d * PANEL), values: pooled(len * d) })
        .collect();
    {
        let parts: Vec<[Disjoint<f32>; 3]> = laid
            .iter_mut()
            .map(|l| [Disjoint::new(&mut l.queries), Disjoint::new(&mut l.key_panels), Disjoint::new(&mut l.values)])
            .collect();
        row_chunks(spans, LAYOUT_ROWS).par_iter().for_each_init(Vec::new, |key: &mut Vec<f32>, &(span, r0, chunk)| {
            let start = spans[span].0;
            let rows = r0 * d..(r0 + chunk) * d;
            let panels = r0 / PANEL * d * PANEL..(r0 + chunk).div_ceil(PANEL) * d * PANEL;
            key.resize(d, 0.0);
            // SAFETY: each chunk writes only its own rows and its own whole panels.
            let head_parts = |h: usize| unsafe {
                let [queries, key_panels, values] = &parts[span * heads + h];
                (queries.part(rows.clone()), key_panels.part(panels.clone()), values.part(rows.clone()))
            };
            let mut chunk_parts: Vec<_> = (0..heads).map(head_parts).collect();
            // Keys past the span in the last panel stay zero (buffers come back dirty).
            chunk_parts.iter_mut().for_each(|(_, key_panels, _)| key_panels.fill(0.0));
            // Row by row over all heads, so each input row is read once and in order.
            for r in 0..chunk {
                for (h, (queries, key_panels, values)) in chunk_parts.iter_mut().enumerate() {
                    q(h, start + r0 + r, &mut queries[r * d..][..d]);
                    k(h, start + r0 + r, key);
                    let panel = &mut key_panels[r / PANEL * d * PANEL..][..d * PANEL];
                    for (i, &x) in key.iter().enumerate() {
                        panel[i * PANEL + r % PANEL] = x;
                    }
                    values[r * d..][..d].copy_from_slice(v(h, start + r0 + r));
                }
            }
        });
    }
    let tasks: Vec<(usize, usize)> =
        units.iter().enumerate().flat_map(|(u, &(_, _, len))| (0..len).step_by(QUERY_BLOCK).map(move |q0| (u, q0))).collect();
    let mut out = vec![0f32; n * width];
    let dst = OutPtr(out.as_mut_ptr());
    tasks.par_iter().for_each(|&(u, q0)| {
        SCRATCH.with_borrow_mut(|scores| {
            let (dst, (h, start, len), laid) = (&dst, units[u], &laid[u]);
            let rows = QUERY_BLOCK.min(len - q0);
            // Whole panel groups per row, so the kernel's stores stay inside.
            let group = SCORE_PANELS * PANEL;
            let stride = len.div_ceil(group) * group;
            scores.resize(QUERY_BLOCK * stride, 0.0);
            let queries = &laid.queries[q0 * d..(q0 + rows) * d];
            // Panel groups outer: a group (15 KiB at d = 80) and the block's queries stay in L1.
            for g in 0..stride / group {
                for r0 in (0..rows).step_by(SCORE_ROWS) {
                    // SAFETY: AVX-512 F present (`handles`); the stores hit rows r0..r0 + 8 of
                    // `scores`, which holds QUERY_BLOCK rows.
                    unsafe {
                        scores_8x48(
                            queries,
                            rows,
                            r0,
                            d,
                            &laid.key_panels,
                            g * SCORE_PANELS,
                            &mut scores[r0 * stride + g * group..],
                            stride,
                        )
                    };
                }
            }
            let mut sums = [0f32; QUERY_BLOCK];
            for (row, sum) in scores.chunks_exact_mut(stride).zip(sums.iter_mut()).take(rows) {
                // SAFETY: AVX-512 F present.
                *sum = unsafe { softmax_row(&mut row[..len], scale) };
            }
            let out = dst.0.wrapping_add((start + q0) * width + h * d);
            // SAFETY: AVX-512 F present; `scores` holds `rows` rows of `len` probabilities, the
            // values `len` rows of `d`; each task writes rows start+q0.. of head h's columns only.
            unsafe {
                match d {
                    64 => weighted_values::<4, 6>(scores, stride, rows, &laid.values, &sums, out, width),
                    80 => weighted_values::<5, 5>(scores, stride, rows, &laid.values, &sums, out, width),
                    _ => weighted_values::<8, 3>(scores, stride, rows, &laid.values, &sums, out, width),
                }
            }
        })
    });
    if let Ok(mut pool) = POOL.lock() {
        pool.extend(laid.into_iter().flat_map(|l| [l.queries, l.key_panels, l.values]));
        let keep = pool.len().min(POOL_BUFFERS);
        pool.truncate(keep);
    }
    out
}

/// `row` ← `exp(scale·(row − max))`, returning the sum: one pass for the maximum, one that
/// exponentiates and sums.
///
/// # Safety
/// AVX-512 F present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn softmax_row(row: &mut [f32], scale: f32) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY (whole body): AVX-512 F present; the masked store stays inside `row`.
    unsafe {
        let shift = softmax_shift(row, scale);
        let mut vsum = _mm512_setzero_ps();
        for at in (0..row.len()).step_by(PANEL) {
            let e = exp_lanes(row, at, scale, shift);
            vsum = _mm512_add_ps(vsum, e);
            _mm512_mask_storeu_ps(row.as_mut_ptr().add(at), lanes(row.len(), at), e);
        }
        _mm512_reduce_add_ps(vsum)
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn softmax_row(_: &mut [f32], _: f32) -> f32 {
    unreachable!("AVX-512 is only detected on x86_64")
}

/// Scores of query rows `r0..r0 + 8` of `queries` (`rows` rows of `d`; rows past them repeat
/// the last, and their scores are not read) against key panels `p..p + 3` into `out` (row
/// stride `stride`), unscaled.
///
/// # Safety
/// AVX-512 F present; `out` holds 8 rows of 48 at that stride.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_8x48(queries: &[f32], rows: usize, r0: usize, d: usize, panels: &[f32], p: usize, out: &mut [f32], stride: usize) {
    use std::arch::x86_64::*;
    // The last group's panels past the keys may not exist: read its first again, drop their scores.
    let first = panels.get(p * d * PANEL..(p + 1) * d * PANEL).expect("a group's first panel exists");
    let k: [&[f32]; SCORE_PANELS] = std::array::from_fn(|c| panels.get((p + c) * d * PANEL..(p + c + 1) * d * PANEL).unwrap_or(first));
    let q: [&[f32]; SCORE_ROWS] = std::array::from_fn(|r| &queries[(r0 + r).min(rows - 1) * d..][..d]);
    let mut acc = [[_mm512_setzero_ps(); SCORE_PANELS]; SCORE_ROWS];
    for i in 0..d {
        // SAFETY: i·16 + 16 <= d·16, the panels' length.
        let w: [__m512; SCORE_PANELS] = std::array::from_fn(|c| unsafe { _mm512_loadu_ps(k[c].as_ptr().add(i * PANEL)) });
        for (acc, q) in acc.iter_mut().zip(&q) {
            let x = _mm512_set1_ps(q[i]);
            for (a, w) in acc.iter_mut().zip(&w) {
                *a = _mm512_fmadd_ps(x, *w, *a);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let row = &mut out[r * stride..][..SCORE_PANELS * PANEL];
        for (c, a) in acc.iter().enumerate() {
            // SAFETY: vector c inside `row`.
            unsafe { _mm512_storeu_ps(row.as_mut_ptr().add(c * PANEL), *a) };
        }
    }
}

/// `out[r] = Σ_j P[r][j] · V[j] / sums[r]` for rows `0..rows` and the rows of `values`
/// (`d = 16·DZ` each), `R` rows at a time with `R × DZ` accumulators; `probs` rows `stride`
/// apart, `out` rows `width` apart.
///
/// # Safety
/// AVX-512 F present; `out` writable for `rows` rows of `d` at that stride, and no other
/// thread writes them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_values<const DZ: usize, const R: usize>(
    probs: &[f32],
    stride: usize,
    rows: usize,
    values: &[f32],
    row_sums: &[f32],
    out: *mut f32,
    width: usize,
) {
    use std::arch::x86_64::*;
    const { assert!(DZ * PANEL <= 128 && R <= 8, "the sums buffer's bounds") };
    let d = DZ * PANEL;
    let len = values.len() / d;
    // Keys in chunks whose values stay in L1 while every row group passes over them; the
    // sums wait in `acc` (rows × d, in L1) between chunks.
    // One row group past QUERY_BLOCK: the last group's rows past `rows` are scratch.
    let mut acc = [0f32; (QUERY_BLOCK + 8) * 128];
    for j0 in (0..len).step_by(KEY_CHUNK) {
        let keys = j0..(j0 + KEY_CHUNK).min(len);
        for r0 in (0..rows).step_by(R) {
            let p: [&[f32]; R] = std::array::from_fn(|r| &probs[(r0 + r).min(rows - 1) * stride..][..len]);
            let mut sums: [[__m512; DZ]; R] = [[_mm512_setzero_ps(); DZ]; R];
            if j0 > 0 {
                for (r, s) in sums.iter_mut().enumerate() {
                    // SAFETY: row r0 + r of `acc` (rows past `rows` are scratch) holds d.
                    *s = std::array::from_fn(|c| unsafe { _mm512_loadu_ps(acc.as_ptr().add((r0 + r) * d + c * PANEL)) });
                }
            }
            for j in keys.clone() {
                // SAFETY: DZ vectors of 16 make up value row j.
                let w: [__m512; DZ] = std::array::from_fn(|c| unsafe { _mm512_loadu_ps(values.as_ptr().add(j * d + c * PANEL)) });
                for (s, p) in sums.iter_mut().zip(&p) {
                    let x = _mm512_set1_ps(p[j]);
                    for (a, w) in s.iter_mut().zip(&w) {
                        *a = _mm512_fmadd_ps(x, *w, *a);
                    }
                }
            }
            for (r, s) in sums.iter().enumerate() {
                for (c, a) in s.iter().enumerate() {
                    // SAFETY: as above.
                    unsafe { _mm512_storeu_ps(acc.as_mut_ptr().add((r0 + r) * d + c * PANEL), *a) };
                }
            }
        }
    }
    for r in 0..rows {
        let inv = 1.0 / row_sums[r];
        for c in 0..d {
            // SAFETY: row r < rows, column c < d: the caller's block.
            unsafe { *out.add(r * width + c) = acc[r * d + c] * inv };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_8x48(_: &[f32], _: usize, _: usize, _: usize, _: &[f32], _: usize, _: &mut [f32], _: usize) {
    unreachable!("AVX-512 is only detected on x86_64")
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_values<const DZ: usize, const R: usize>(_: &[f32], _: usize, _: usize, _: &[f32], _: &[f32], _: *mut f32, _: usize) {
    unreachable!("AVX-512 is only detected on x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::amx::tests::values;

    /// Against attention written from its definition in f64, for every head size the kernels
    /// take, spans that fill neither a query block nor a key panel, and rows outside any span.
    #[test]
    fn span_attention_matches_its_definition() {
        for d in [64, 80, 128] {
            if !handles(d) {
                eprintln!("no AVX-512 on this CPU: nothing to check");
                return;
            }
            let (heads, n, scale) = (2, 140, 0.3f32);
            let spans = [(0, 37), (40, 100)];
            let (q, k, v) = (values(n * heads * d, 1), values(n * heads * d, 2), values(n * heads * d, 3));
            // Row r of head h in `[n, heads, d]` operands.
            let row = |h: usize, r: usize| (r * heads + h) * d..(r * heads + h + 1) * d;
            let got = within_spans(
                heads,
                n,
                d,
                &spans,
                scale,
                |h, r, dst| dst.copy_from_slice(&q[row(h, r)]),
                |h, r, dst| dst.copy_from_slice(&k[row(h, r)]),
                |h, r| &v[row(h, r)],
            );
            let mut want = vec![0f64; n * heads * d];
            for &(start, len) in &spans {
                for h in 0..heads {
                    for i in start..start + len {
                        let dot = |j: usize| q[row(h, i)].iter().zip(&k[row(h, j)]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
                        let scores: Vec<f64> = (start..start + len).map(|j| dot(j) * scale as f64).collect();
                        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                        let total: f64 = weights.iter().sum();
                        for (j, w) in (start..start + len).zip(&weights) {
                            for (o, x) in want[row(h, i)].iter_mut().zip(&v[row(h, j)]) {
                                *o += w / total * *x as f64;
                            }
                        }
                    }
                }
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() < 1e-5, "d = {d}, element {i}: {g} vs {w}");
            }
        }
    }
}
