//! AVX-512 VNNI micro-kernels.
//!
//! A call computes an R-row × C-panel (16·C columns) tile over the whole of k, keeping
//! R·C i32 block accumulators and R·C f32 accumulators in registers (R·C ≤ 12: with the C
//! weight and C scale vectors that nearly fills the 32 zmm; LLVM spills about three f32
//! accumulators per block at 6×2, which measured no slower than the spill-free 4×2 and
//! halves the weight reloads of 3×2). Per 32-block:
//! the i32 accumulators start at `-128·Σq_x` (cancelling the u8 weight offset exactly), take
//! 8 `vpdpbusd` each, and are folded into f32 with one convert, one scale multiply
//! (`dw·dx`) and one FMA. Each weight zmm load is reused R times, each activation broadcast
//! C times.

#![allow(clippy::needless_range_loop)] // index loops over the R × C register tile read clearer

use std::arch::x86_64::*;
use std::ops::Range;

use super::pack::{BLOCK_BYTES, PANEL, QK, SCALE_BYTES};
use super::{ActQ, OutPtr, Q8Weights, ROW_GROUP};

/// # Safety
/// CPU must have avx512f/bw/vnni; `wp` points at C consecutive panels `pstride` apart;
/// `pf` is null or the next panel group, prefetched into L2 block by block (never dereferenced);
/// `xq`/`xd`/`xs` at R rows (strides `kb·32` bytes / `kb` elements); `y` at R rows of
/// `ystride` with at least `ncols` writable columns each.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const R: usize, const C: usize>(
    wp: *const u8,
    pstride: usize,
    kb: usize,
    pf: *const u8,
    xq: *const i8,
    xd: *const f32,
    xs: *const i32,
    y: *mut f32,
    ystride: usize,
    ncols: usize,
) {
    // SAFETY: the caller upholds this function's contract (features, pointers, strides).
    unsafe {
        let kp = kb * QK;
        let sc = wp.add(kb * BLOCK_BYTES);
        let mut facc = [[_mm512_setzero_ps(); C]; R];
        for b in 0..kb {
            let mut acc = [[_mm512_setzero_si512(); C]; R];
            for r in 0..R {
                let s = _mm512_set1_epi32(*xs.add(r * kb + b));
                for c in 0..C {
                    acc[r][c] = s;
                }
            }
            let wb = wp.add(b * BLOCK_BYTES);
            if !pf.is_null() {
                for c in 0..C {
                    let nb = pf.wrapping_add(c * pstride + b * BLOCK_BYTES);
                    for l in 0..BLOCK_BYTES / 64 {
                        _mm_prefetch::<_MM_HINT_T1>(nb.wrapping_add(l * 64) as *const i8);
                    }
                    _mm_prefetch::<_MM_HINT_T1>(nb.wrapping_add((kb - b) * BLOCK_BYTES + b * SCALE_BYTES) as *const i8);
                }
            }
            let xb = xq.add(b * QK);
            for g in 0..QK / 4 {
                let mut wv = [_mm512_setzero_si512(); C];
                for c in 0..C {
                    wv[c] = _mm512_loadu_si512(wb.add(c * pstride + g * 64) as *const _);
                }
                for r in 0..R {
                    let xv = _mm512_set1_epi32((xb.add(r * kp + g * 4) as *const i32).read_unaligned());
                    for c in 0..C {
                        acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], wv[c], xv);
                    }
                }
            }
            let mut dw = [_mm512_setzero_ps(); C];
            for c in 0..C {
                dw[c] = _mm512_cvtph_ps(_mm256_loadu_si256(sc.add(c * pstride + b * SCALE_BYTES) as *const _));
            }
            for r in 0..R {
                let dx = _mm512_set1_ps(*xd.add(r * kb + b));
                for c in 0..C {
                    facc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][c]), _mm512_mul_ps(dw[c], dx), facc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                if ncols <= c * PANEL {
                    break;
                }
                let dst = y.add(r * ystride + c * PANEL);
                let left = ncols - c * PANEL;
                if left >= PANEL {
                    _mm512_storeu_ps(dst, facc[r][c]);
                } else {
                    _mm512_mask_storeu_ps(dst, ((1u32 << left) - 1) as __mmask16, facc[r][c]);
                }
            }
        }
    }
}

type Kern = unsafe fn(*const u8, usize, usize, *const u8, *const i8, *const f32, *const i32, *mut f32, usize, usize);

/// Kernel for an R × C tile (C = 1 only for an odd last panel). Wider C for decode
/// (R = 1) was measured no faster: decode is bound by DRAM, not by streams per core.
fn pick(r: usize, c: usize) -> Kern {
    macro_rules! table {
        ($(($r:literal, $c:literal)),*) => {
            match (r, c) {
                $(($r, $c) => kernel::<$r, $c> as Kern,)*
                _ => unreachable!("no q8 kernel for {r}x{c}"),
            }
        };
    }
    table!((1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2), (4, 1), (4, 2), (5, 1), (5, 2), (6, 1), (6, 2))
}

/// # Safety
/// As `kernel`, for the whole tile: CPU features checked, `y` m × n, tile owned by the caller.
pub(crate) unsafe fn run_tile(w: &Q8Weights, a: &ActQ, rows: Range<usize>, panels: Range<usize>, y: OutPtr) {
    let kb = w.kb;
    let kp = kb * QK;
    let cstep = 2;
    let base = w.raw().as_ptr();
    let mut p = panels.start;
    while p < panels.end {
        let c = cstep.min(panels.end - p);
        let col0 = p * PANEL;
        let ncols = w.n.min((p + c) * PANEL) - col0;
        let mut r = rows.start;
        while r < rows.end {
            let rr = ROW_GROUP.min(rows.end - r);
            // The first row group pulls the next panel group towards L2 while it computes, so
            // the following group does not start with a DRAM/L3 stall (hardware prefetchers
            // do not guess the jump to the next panel).
            let pf = if r == rows.start && p + c < panels.end { base.wrapping_add((p + c) * w.pstride) } else { std::ptr::null() };
            // SAFETY: pointers stay inside the panel data, ActQ and y (caller's contract).
            unsafe {
                pick(rr, c)(
                    base.add(p * w.pstride),
                    w.pstride,
                    kb,
                    pf,
                    a.q.as_ptr().add(r * kp),
                    a.d.as_ptr().add(r * kb),
                    a.s.as_ptr().add(r * kb),
                    y.0.add(r * w.n + col0),
                    w.n,
                    ncols,
                );
            }
            r += rr;
        }
        p += c;
    }
}

/// Quantizes one activation row (Q8_0 blocks, d kept f32) bit-identically to
/// `pack::quantize_block`; the scalar version is slow enough (f32::round does not
/// vectorise) to cost several percent of a prefill matmul.
///
/// # Safety
/// CPU must have avx512f/bw/vnni (what it is compiled for); `q.len() == 32·d.len()`, `s.len() == d.len()`, `x.len() <= q.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [i32]) {
    let k = x.len();
    let half = _mm512_set1_ps(0.5);
    let one = _mm512_set1_ps(1.0);
    let sign = _mm512_set1_epi32(i32::MIN);
    // f32::round (ties away from zero), exactly: truncate, then step away from zero when the
    // (exactly representable) fraction is at least one half.
    let round = |v: __m512| {
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, half);
        // (and/or on ps are AVX512DQ, which we do not enable; the integer forms are AVX512F)
        let away = _mm512_or_si512(_mm512_castps_si512(one), _mm512_and_si512(_mm512_castps_si512(v), sign));
        _mm512_mask_add_ps(t, up, t, _mm512_castsi512_ps(away))
    };
    for b in 0..d.len() {
        let lo = b * QK;
        let n = k.saturating_sub(lo).min(QK);
        let m0 = if n >= 16 { 0xffff } else { (1u32 << n) - 1 } as __mmask16;
        let m1 = if n >= 32 {
            0xffff
        } else if n > 16 {
            (1u32 << (n - 16)) - 1
        } else {
            0
        } as __mmask16;
        // SAFETY: the masks load only elements below `x.len()`; `q`, `d`, `s` are as long as the
        // contract says.
        unsafe {
            let v0 = _mm512_maskz_loadu_ps(m0, x.as_ptr().add(lo));
            let v1 = _mm512_maskz_loadu_ps(m1, x.as_ptr().wrapping_add(lo + 16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let db = amax / 127.0;
            let id = _mm512_set1_ps(if db != 0.0 { 1.0 / db } else { 0.0 });
            let i0 = _mm512_cvtps_epi32(round(_mm512_mul_ps(v0, id)));
            let i1 = _mm512_cvtps_epi32(round(_mm512_mul_ps(v1, id)));
            d[b] = db;
            s[b] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
            _mm_storeu_si128(q.as_mut_ptr().add(lo) as *mut _, _mm512_cvtepi32_epi8(i0));
            _mm_storeu_si128(q.as_mut_ptr().add(lo + 16) as *mut _, _mm512_cvtepi32_epi8(i1));
        }
    }
}
