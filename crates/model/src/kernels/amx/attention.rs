//! Attention on tiles, bidirectional within spans (one span per image: the vision towers) or
//! causal (the decoder's prefill): scores `Q·Kᵀ` and output `P·V` as bf16 tile products with
//! f32 sums, softmax in f32 between them. On the 2B vision tower (1564 patches, 16 heads of 80)
//! f32 attention was two thirds of the tower's time.

use rayon::prelude::*;

use super::pack::bf16x16;
use super::pack::{ksteps, pack_a_serial, pack_b_from_cols, pack_b_from_rows, pack_b_steps_from_cols, packed_len};
use super::{gemm, gemm_into, Aligned, BLOCK, KSTEP, TILE};
use crate::kernels::disjoint::Disjoint;
use crate::kernels::q8::OutPtr;

/// Query rows per task: their f32 scores (`64 × keys`) and bf16 probabilities stay in L2.
const QUERY_BLOCK: usize = 64;

/// One span's and head's operands, packed once and shared by its query blocks.
struct Packed {
    q: Aligned<u16>,
    k: Aligned<u16>,
    v: Aligned<u16>,
}

/// Attention of rows `start..start + len` of each span among themselves, all heads; `q(h, r,
/// out)` and `k(h, r, out)` write head `h`'s `d` values of row `r` (so the caller can rotate
/// them while they are packed, instead of in a pass of its own), `v(h, r)` gives them;
/// probabilities are `softmax(scale · q·k)`. Returns `[n, heads * d]`, rows outside every
/// span zero.
///
/// # Safety
/// [`super::available`] must be true.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn within_spans<'a>(
    heads: usize,
    n: usize,
    d: usize,
    spans: &[(usize, usize)],
    scale: f32,
    q: impl Fn(usize, usize, &mut [f32]) + Sync,
    k: impl Fn(usize, usize, &mut [f32]) + Sync,
    v: impl Fn(usize, usize) -> &'a [f32] + Sync,
) -> Vec<f32> {
    let width = heads * d;
    // One unit per (span, head): (head, span start, span length).
    let units: Vec<(usize, usize, usize)> = spans.iter().flat_map(|&(start, len)| (0..heads).map(move |h| (h, start, len))).collect();
    let mut packed: Vec<Packed> = units
        .par_iter()
        .map(|&(_, _, len)| Packed {
            q: Aligned::zeroed(packed_len(len, d)),
            k: Aligned::zeroed(packed_len(len, d)),
            v: Aligned::zeroed(packed_len(d, len)),
        })
        .collect();
    let ks = ksteps(d);
    {
        let parts: Vec<[Disjoint<u16>; 3]> =
            packed.iter_mut().map(|p| [Disjoint::new(&mut p.q), Disjoint::new(&mut p.k), Disjoint::new(&mut p.v)]).collect();
        row_chunks(spans, KSTEP).par_iter().for_each_init(Vec::new, |rows: &mut Vec<f32>, &(span, r0, chunk)| {
            let (start, len) = spans[span];
            // Row tiles of Q and key tiles of K in this chunk, and its one k step of V.
            let tiles = r0 / TILE * ks * BLOCK..(r0 + chunk).div_ceil(TILE) * ks * BLOCK;
            let step = r0 / KSTEP..r0 / KSTEP + 1;
            // Every head's rotated rows, [head][row][d], filled row by row so that each input
            // row is read once and in order.
            rows.resize(heads * chunk * d, 0.0);
            let rotate_all = |f: &(dyn Fn(usize, usize, &mut [f32]) + Sync), rows: &mut [f32]| {
                for r in 0..chunk {
                    for h in 0..heads {
                        f(h, start + r0 + r, &mut rows[(h * chunk + r) * d..][..d]);
                    }
                }
            };
            // SAFETY (both loops): AMX (hence AVX-512 with BF16) present, the caller's contract;
            // every part written is this chunk's own: its row tiles of Q, key tiles of K, k step of V.
            rotate_all(&q, rows);
            for h in 0..heads {
                unsafe { pack_a_serial(chunk, d, |r| &rows[(h * chunk + r) * d..][..d], parts[span * heads + h][0].part(tiles.clone())) };
            }
            rotate_all(&k, rows);
            for h in 0..heads {
                let [_, keys, values] = &parts[span * heads + h];
                unsafe {
                    pack_b_from_rows(chunk, d, |r| &rows[(h * chunk + r) * d..][..d], keys.part(tiles.clone()));
                    pack_b_steps_from_cols(len, d, step.clone(), |r| v(h, start + r), values);
                }
            }
        });
    }
    let tasks: Vec<(usize, usize)> =
        units.iter().enumerate().flat_map(|(u, &(_, _, len))| (0..len).step_by(QUERY_BLOCK).map(move |q0| (u, q0))).collect();
    let mut out = vec![0f32; n * width];
    // Every task writes its own rows of its own head's columns.
    let dst = OutPtr(out.as_mut_ptr());
    tasks.par_iter().for_each_init(
        || (Aligned::zeroed(0), Aligned::zeroed(0)),
        |(scores, probs): &mut (Aligned<f32>, Aligned<u16>), &(u, q0)| {
            let ((h, start, len), p) = (units[u], &packed[u]);
            let rows = QUERY_BLOCK.min(len - q0);
            // Scores padded to whole tiles so the tile stores land in place.
            let stride = len.div_ceil(TILE) * TILE;
            let row_tiles = q0 / TILE..(q0 + rows).div_ceil(TILE);
            scores.resize(row_tiles.len() * TILE * stride);
            // SAFETY: AMX present; Q holds row tiles up to len/16 (q0 is a multiple of 16),
            // K every key tile; `scores` covers every stored tile.
            unsafe { gemm_into(&p.q, &p.k, ksteps(d), row_tiles, 0..stride / TILE, scores.as_mut_ptr(), stride) };
            let mut sums = [0f32; QUERY_BLOCK];
            probs.resize(packed_len(rows, len));
            let ks = ksteps(len);
            // SAFETY: AVX-512 with BF16 present (`available` checks it with AMX); rows and blocks
            // inside `probs`.
            unsafe {
                for (r, sum) in sums.iter_mut().enumerate().take(rows) {
                    *sum = softmax_row_to_tiles(&scores[r * stride..][..len], scale, probs, r, ks, ks);
                }
            }
            zero_rows_past(probs, rows, ks, ks);
            let dst = &dst;
            // SAFETY: as above; each task writes rows start+q0.. of head h's columns only.
            unsafe {
                gemm(probs, &p.v, ks, 0..ks, 0..rows.div_ceil(TILE), 0..d.div_ceil(TILE), |rt, ct, tile| {
                    write_normalised(tile, rt, ct, rows, d, &sums, dst.0.add((start + q0) * width + h * d), width)
                })
            };
        },
    );
    out
}

/// `(span, first row in the span, rows)` for each chunk of at most `chunk` rows of each span,
/// in order: the unit of work of a pass that lays out every head of the same rows, which then
/// come from memory once rather than once per head (a row of the vision towers' fused
/// projection is 15 KiB, a head's part of it 320 bytes).
pub(crate) fn row_chunks(spans: &[(usize, usize)], chunk: usize) -> Vec<(usize, usize, usize)> {
    spans.iter().enumerate().flat_map(|(i, &(_, len))| (0..len).step_by(chunk).map(move |r0| (i, r0, chunk.min(len - r0)))).collect()
}

/// Causal grouped-query attention of `n` new queries over `total` keys, the last `n` of which
/// are theirs (query `i` sees keys up to `total - n + i`): the decoder's prefill in the
/// quantized modes. `q(h, i)` is query `i` of head `h` (rotary applied), `k(g, j)`/`v(g, j)`
/// key/value `j` of key-value head `g`; head `h` reads key-value head `h / (heads / kv_heads)`.
/// Keys and values are packed once per key-value head; a query block computes the scores of
/// the keys its last row sees, and the probabilities of keys a row cannot see are exactly 0.
/// Returns `[n, heads * d]`.
///
/// # Safety
/// [`super::available`] must be true.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn causal<'a>(
    heads: usize,
    kv_heads: usize,
    n: usize,
    total: usize,
    d: usize,
    scale: f32,
    q: impl Fn(usize, usize) -> &'a [f32] + Sync,
    k: impl Fn(usize, usize) -> &'a [f32] + Sync,
    v: impl Fn(usize, usize) -> &'a [f32] + Sync,
) -> Vec<f32> {
    let (width, past, groups) = (heads * d, total - n, heads / kv_heads);
    let kv: Vec<(Aligned<u16>, Aligned<u16>)> = (0..kv_heads)
        .into_par_iter()
        .map(|g| {
            let (mut keys, mut values) = (Aligned::zeroed(packed_len(total, d)), Aligned::zeroed(packed_len(d, total)));
            // SAFETY: AMX (hence AVX-512) present, the caller's contract.
            unsafe {
                pack_b_from_rows(total, d, |j| k(g, j), &mut keys);
                pack_b_from_cols(total, d, |j| v(g, j), &mut values);
            }
            (keys, values)
        })
        .collect();
    let queries: Vec<Aligned<u16>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let mut packed = Aligned::zeroed(packed_len(n, d));
            // SAFETY: as above.
            unsafe { pack_a_serial(n, d, |i| q(h, i), &mut packed) };
            packed
        })
        .collect();
    let tasks: Vec<(usize, usize)> = (0..heads).flat_map(|h| (0..n).step_by(QUERY_BLOCK).map(move |q0| (h, q0))).collect();
    let key_steps = ksteps(total);
    let mut out = vec![0f32; n * width];
    // Every task writes its own rows of its own head's columns.
    let dst = OutPtr(out.as_mut_ptr());
    tasks.par_iter().for_each_init(
        || (Aligned::zeroed(0), Aligned::zeroed(0)),
        |(scores, probs): &mut (Aligned<f32>, Aligned<u16>), &(h, q0)| {
            let (keys, values) = &kv[h / groups];
            let rows = QUERY_BLOCK.min(n - q0);
            // The keys this block's last row sees, padded to whole tiles.
            let stride = (past + q0 + rows).div_ceil(TILE) * TILE;
            let row_tiles = q0 / TILE..(q0 + rows).div_ceil(TILE);
            scores.resize(row_tiles.len() * TILE * stride);
            // SAFETY: AMX present; the queries hold every row tile up to n/16 (q0 is a multiple
            // of 16), the keys every tile up to total/16 >= stride/16; `scores` covers them.
            unsafe { gemm_into(&queries[h], keys, ksteps(d), row_tiles, 0..stride / TILE, scores.as_mut_ptr(), stride) };
            let mut sums = [0f32; QUERY_BLOCK];
            probs.resize(packed_len(rows, total));
            // Key steps any row of the block sees; the rest of `probs` is neither written nor read.
            let seen = ksteps(past + q0 + rows);
            // SAFETY: AVX-512 with BF16 present (`available` checks it with AMX); rows and blocks
            // inside `probs`. A row's slice ends at the last key it sees, and its blocks up to
            // `seen` past it are 0.
            unsafe {
                for (r, sum) in sums.iter_mut().enumerate().take(rows) {
                    *sum = softmax_row_to_tiles(&scores[r * stride..][..past + q0 + r + 1], scale, probs, r, key_steps, seen);
                }
            }
            zero_rows_past(probs, rows, key_steps, seen);
            let dst = &dst;
            // SAFETY: as above; each task writes rows q0.. of head h's columns only.
            unsafe {
                gemm(probs, values, key_steps, 0..seen, 0..rows.div_ceil(TILE), 0..d.div_ceil(TILE), |rt, ct, tile| {
                    write_normalised(tile, rt, ct, rows, d, &sums, dst.0.add(q0 * width + h * d), width)
                })
            };
        },
    );
    out
}

/// Rows `rows..` of the last row tile of packed probabilities (`ks` steps), in steps
/// `..seen`: zero, so no stale NaN reaches a sum.
fn zero_rows_past(probs: &mut [u16], rows: usize, ks: usize, seen: usize) {
    for r in rows..rows.div_ceil(TILE) * TILE {
        for s in 0..seen {
            probs[((r / TILE) * ks + s) * BLOCK + (r % TILE) * KSTEP..][..KSTEP].fill(0);
        }
    }
}

/// Writes tile `(rt, ct)` of `P·V`, each row divided by its probabilities' sum, into `out`
/// (row stride `width`; row 0 is the block's first), leaving out rows past `rows` and columns
/// past `d`.
///
/// # Safety
/// `out` must be writable for those rows and columns.
#[allow(clippy::too_many_arguments)]
unsafe fn write_normalised(tile: &[f32], rt: usize, ct: usize, rows: usize, d: usize, sums: &[f32], out: *mut f32, width: usize) {
    let cols = TILE.min(d - ct * TILE);
    for r in 0..TILE.min(rows - rt * TILE) {
        let i = rt * TILE + r;
        let inv = 1.0 / sums[i];
        // SAFETY: the caller's contract.
        let o = unsafe { out.add(i * width + ct * TILE) };
        for (c, &x) in tile[r * TILE..][..cols].iter().enumerate() {
            // SAFETY: as above.
            unsafe { *o.add(c) = x * inv };
        }
    }
}

/// Writes row `r` of the probabilities, `exp(scale·(s − max))` over `scores`, as bf16 into
/// steps `..seen` of packed A `probs` (`ks` steps; zero past `scores.len()`), and returns
/// their f32 sum. One pass for the maximum, one that exponentiates, sums, rounds and packs.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16 (as [`super::available`] checks); `probs` must
/// hold row tile `r / 16` with `ks` blocks and `ks >= seen`, `seen · 32 >= scores.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn softmax_row_to_tiles(scores: &[f32], scale: f32, probs: &mut [u16], r: usize, ks: usize, seen: usize) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY (whole body): AVX-512 present; stores write row r of blocks inside `probs`.
    unsafe {
        let shift = softmax_shift(scores, scale);
        let mut vsum = _mm512_setzero_ps();
        let (rt, row) = (r / TILE, r % TILE);
        for s in 0..seen {
            let out = probs.as_mut_ptr().add((rt * ks + s) * BLOCK + row * KSTEP);
            for half in 0..2 {
                let e = exp_lanes(scores, s * KSTEP + half * 16, scale, shift);
                vsum = _mm512_add_ps(vsum, e);
                _mm256_storeu_si256(out.add(half * 16) as *mut __m256i, bf16x16(e));
            }
        }
        _mm512_reduce_add_ps(vsum)
    }
}

/// Lanes `at..at + 16` of a row `len` long that exist.
#[cfg(target_arch = "x86_64")]
pub(crate) fn lanes(len: usize, at: usize) -> std::arch::x86_64::__mmask16 {
    ((1u32 << len.saturating_sub(at).min(16)) - 1) as std::arch::x86_64::__mmask16
}

/// `−scale · max(row)`: the shift that keeps a softmax's exponents at most 0.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn softmax_shift(row: &[f32], scale: f32) -> f32 {
    use std::arch::x86_64::*;
    let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
    for at in (0..row.len()).step_by(16) {
        let m = lanes(row.len(), at);
        // SAFETY: the mask keeps the load inside `row`.
        vmax = _mm512_mask_max_ps(vmax, m, vmax, unsafe { _mm512_maskz_loadu_ps(m, row.as_ptr().add(at)) });
    }
    -_mm512_reduce_max_ps(vmax) * scale
}

/// `exp(scale · row[at..at + 16] + shift)`, zero in lanes past the row's end.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn exp_lanes(row: &[f32], at: usize, scale: f32, shift: f32) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let m = lanes(row.len(), at);
    // SAFETY: the mask keeps the load inside `row`.
    let x = unsafe { _mm512_maskz_loadu_ps(m, row.as_ptr().wrapping_add(at)) };
    _mm512_maskz_mov_ps(m, exp16(_mm512_fmadd_ps(x, _mm512_set1_ps(scale), _mm512_set1_ps(shift))))
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn softmax_row_to_tiles(_: &[f32], _: f32, _: &mut [u16], _: usize, _: usize, _: usize) -> f32 {
    unreachable!("AMX is only detected on x86_64")
}

/// `e^x` for `x <= 0`, 16 lanes: `2^n · p(r)` with `|r| <= ln2/2` and a degree-5 polynomial,
/// relative error below 3e-6 — far inside the bf16 rounding that follows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.0 / 120.0);
    for c in [1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}
