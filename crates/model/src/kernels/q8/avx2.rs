//! AVX2 micro-kernels, for x86 servers without AVX-512 VNNI (AMD before Zen 4, Intel before
//! Ice Lake): the same packed layout and the same exact integer sums as the other backends.
//!
//! AVX2 has no u8 × s8 dot product into i32. `vpmaddubsw` multiplies u8 by s8 into i16 pair
//! sums that saturate, and the stored weights are `q + 128` (for VNNI, see `pack`): 255·127·2
//! would overflow. So the kernel takes the offset back off (`xor 0x80` restores q) and uses
//! GGML's sign trick: |x| (u8) times q·sign(x) (s8), whose pair sums are at most 2·127·127,
//! then `vpmaddwd` by ones sums each column's 4 products into i32. With q restored, the i32
//! accumulators start at 0 rather than at the offset correction `-128·Σq_x`.
//!
//! A call computes an R-row × 16-column tile (two ymm of 8 columns) over the whole of k, each
//! weight load reused for R rows. R ≤ 4 keeps the 8 i32 accumulators, 2 weight vectors and the
//! temporaries within the 16 ymm registers; the f32 accumulators are touched once per 32-block,
//! so their spills cost little.

#![allow(clippy::needless_range_loop)] // index loops over the R × 2 register tile read clearer

use std::arch::x86_64::*;
use std::ops::Range;

use super::pack::{BLOCK_BYTES, PANEL, QK, SCALE_BYTES};
use super::{ActQ, OutPtr, Q8Weights};

/// Rows per micro-kernel call.
const ROWS: usize = 4;

/// # Safety
/// CPU must have avx2/fma/f16c; `wp` points at one panel; `xq`/`xd` at R rows (strides
/// `kb·32` bytes / `kb` elements); `y` at R rows of `ystride` with `ncols` (≤ 16) writable
/// columns each.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const R: usize>(wp: *const u8, kb: usize, xq: *const i8, xd: *const f32, y: *mut f32, ystride: usize, ncols: usize) {
    // SAFETY: the caller upholds this function's contract (features, pointers, strides).
    unsafe {
        let kp = kb * QK;
        let sc = wp.add(kb * BLOCK_BYTES);
        let offset = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        let mut facc = [[_mm256_setzero_ps(); 2]; R];
        for b in 0..kb {
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            let wb = wp.add(b * BLOCK_BYTES);
            let xb = xq.add(b * QK);
            for g in 0..QK / 4 {
                let w = [0, 1].map(|h| _mm256_xor_si256(_mm256_loadu_si256(wb.add(g * 64 + h * 32) as *const _), offset));
                for r in 0..R {
                    let x = _mm256_set1_epi32((xb.add(r * kp + g * 4) as *const i32).read_unaligned());
                    let magnitude = _mm256_abs_epi8(x);
                    for h in 0..2 {
                        let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w[h], x));
                        acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
            let dw = [0, 1].map(|h| _mm256_cvtph_ps(_mm_loadu_si128(sc.add(b * SCALE_BYTES + h * 16) as *const _)));
            for r in 0..R {
                let dx = _mm256_set1_ps(*xd.add(r * kb + b));
                for h in 0..2 {
                    facc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][h]), _mm256_mul_ps(dw[h], dx), facc[r][h]);
                }
            }
        }
        for r in 0..R {
            let dst = y.add(r * ystride);
            if ncols == PANEL {
                _mm256_storeu_ps(dst, facc[r][0]);
                _mm256_storeu_ps(dst.add(8), facc[r][1]);
            } else {
                let mut row = [0f32; PANEL];
                _mm256_storeu_ps(row.as_mut_ptr(), facc[r][0]);
                _mm256_storeu_ps(row.as_mut_ptr().add(8), facc[r][1]);
                std::ptr::copy_nonoverlapping(row.as_ptr(), dst, ncols);
            }
        }
    }
}

type Kern = unsafe fn(*const u8, usize, *const i8, *const f32, *mut f32, usize, usize);

fn pick(rows: usize) -> Kern {
    match rows {
        1 => kernel::<1>,
        2 => kernel::<2>,
        3 => kernel::<3>,
        4 => kernel::<4>,
        _ => unreachable!("no AVX2 q8 kernel for {rows} rows"),
    }
}

/// # Safety
/// As `kernel`, for the whole tile: CPU features checked, `y` m × n, tile owned by the caller.
pub(crate) unsafe fn run_tile(w: &Q8Weights, a: &ActQ, rows: Range<usize>, panels: Range<usize>, y: OutPtr) {
    let kb = w.kb;
    let kp = kb * QK;
    let base = w.raw().as_ptr();
    // Panel by panel, so a panel's weights stay in L1/L2 while every row group of the tile
    // passes over them (the tile's rows are sized to keep their activations in L2).
    for p in panels {
        let col0 = p * PANEL;
        let ncols = PANEL.min(w.n - col0);
        let mut r = rows.start;
        while r < rows.end {
            let rr = ROWS.min(rows.end - r);
            // SAFETY: pointers stay inside the panel data, ActQ and y (caller's contract).
            unsafe {
                pick(rr)(
                    base.add(p * w.pstride),
                    kb,
                    a.q.as_ptr().add(r * kp),
                    a.d.as_ptr().add(r * kb),
                    y.0.add(r * w.n + col0),
                    w.n,
                    ncols,
                )
            };
            r += rr;
        }
    }
}

/// Quantizes one activation row (Q8_0 blocks, d kept f32) bit-identically to
/// `pack::quantize_block`, as the AVX-512 `quantize_row` does (f32::round does not vectorise).
///
/// # Safety
/// CPU must have avx2/fma/f16c; `q.len() == 32·d.len()`, `s.len() == d.len()`, `x.len() <= q.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [i32]) {
    let k = x.len();
    let magnitude_bits = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    let sign_bit = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    // f32::round (ties away from zero), exactly: truncate, then step away from zero when the
    // (exactly representable) fraction is at least one half.
    let round = |v: __m256| {
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let up = _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_and_ps(_mm256_sub_ps(v, t), magnitude_bits), half);
        let away = _mm256_or_ps(one, _mm256_and_ps(v, sign_bit));
        _mm256_add_ps(t, _mm256_and_ps(up, away))
    };
    // The two packs leave each input vector's two 4-byte halves a lane apart (0a 1a 2a 3a |
    // 0b 1b 2b 3b); this puts them back in order.
    let unshuffle = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut tail = [0f32; QK];
    for b in 0..d.len() {
        let lo = b * QK;
        let n = k.saturating_sub(lo).min(QK);
        let src = if n == QK {
            &x[lo..lo + QK]
        } else {
            tail[..n].copy_from_slice(&x[lo..lo + n]);
            tail[n..].fill(0.0);
            &tail[..]
        };
        // SAFETY: `src` holds 32 floats; `q[lo..lo + 32]` exists by the contract.
        unsafe {
            let v = [0, 1, 2, 3].map(|i| _mm256_loadu_ps(src.as_ptr().add(8 * i)));
            let m = [0, 1, 2, 3].map(|i| _mm256_and_ps(v[i], magnitude_bits));
            let m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
            let db = amax / 127.0;
            let id = _mm256_set1_ps(if db != 0.0 { 1.0 / db } else { 0.0 });
            let i = v.map(|v| _mm256_cvtps_epi32(round(_mm256_mul_ps(v, id))));
            let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256::<1>(sum));
            let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b01_00_11_10>(sum));
            let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b10_11_00_01>(sum));
            d[b] = db;
            s[b] = -128 * _mm_cvtsi128_si32(sum);
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            _mm256_storeu_si256(q.as_mut_ptr().add(lo) as *mut _, _mm256_permutevar8x32_epi32(packed, unshuffle));
        }
    }
}
