//! Packing f32 operands into the tile layouts of [`super`], rounding to bf16.

use std::ops::Range;

use rayon::prelude::*;

use super::{BLOCK, KSTEP, TILE};
use crate::kernels::disjoint::Disjoint;

/// Packed k steps for an operand `k` wide.
pub(crate) fn ksteps(k: usize) -> usize {
    k.div_ceil(KSTEP)
}

/// Elements of a packed operand with `rows` rows (A) or columns (B) and inner size `k`.
pub(crate) fn packed_len(rows: usize, k: usize) -> usize {
    rows.div_ceil(TILE) * ksteps(k) * BLOCK
}

/// Packs A `[rows, k]` (row `i` given by `row(i)`, `k` long) as row tiles into `dst`
/// (`packed_len(rows, k)` long), zero-padding both ways. Parallel over row tiles.
///
/// # Safety
/// [`super::available`] must be true (the conversion uses AVX-512 BF16).
pub(crate) unsafe fn pack_a<'a>(rows: usize, k: usize, row: impl Fn(usize) -> &'a [f32] + Sync, dst: &mut [u16]) {
    // SAFETY: forwarded.
    unsafe { pack_a_with(rows, k, row, dst, rows * k >= 1 << 15) }
}

/// [`pack_a`] on the calling thread, for callers that are rayon tasks already.
///
/// # Safety
/// As [`pack_a`].
pub(crate) unsafe fn pack_a_serial<'a>(rows: usize, k: usize, row: impl Fn(usize) -> &'a [f32] + Sync, dst: &mut [u16]) {
    // SAFETY: forwarded.
    unsafe { pack_a_with(rows, k, row, dst, false) }
}

unsafe fn pack_a_with<'a>(rows: usize, k: usize, row: impl Fn(usize) -> &'a [f32] + Sync, dst: &mut [u16], parallel: bool) {
    let ks = ksteps(k);
    assert_eq!(dst.len(), packed_len(rows, k), "pack_a: destination size");
    let fill = |(rt, tile): (usize, &mut [u16])| {
        for r in 0..TILE {
            let i = rt * TILE + r;
            for s in 0..ks {
                let out = &mut tile[s * BLOCK + r * KSTEP..][..KSTEP];
                if i < rows {
                    let src = row(i);
                    debug_assert_eq!(src.len(), k);
                    // SAFETY: AVX-512 present (caller's contract); lengths as asserted.
                    unsafe { convert_32(&src[s * KSTEP..((s + 1) * KSTEP).min(k)], out) };
                } else {
                    out.fill(0);
                }
            }
        }
    };
    if parallel {
        dst.par_chunks_mut(ks * BLOCK).enumerate().for_each(fill);
    } else {
        dst.chunks_mut(ks * BLOCK).enumerate().for_each(fill);
    }
}

/// Packs B = Wᵀ for W `[n, k]` (row `j` given by `row(j)`, `k` long) as column tiles into
/// `dst` (`packed_len(n, k)` long): the right-hand side of `x · Wᵀ`, e.g. attention keys.
///
/// # Safety
/// [`super::available`] must be true (the conversion uses AVX-512 BF16).
pub(crate) unsafe fn pack_b_from_rows<'a>(n: usize, k: usize, row: impl Fn(usize) -> &'a [f32], dst: &mut [u16]) {
    let ks = ksteps(k);
    assert_eq!(dst.len(), packed_len(n, k), "pack_b_from_rows: destination size");
    // Each key's 32 values become 16 bf16 pairs (one u32 each); a block row holds pair `p` of
    // all 16 keys, so a block is the 16 × 16 transpose of those pairs.
    let mut pairs = [[0u32; TILE]; TILE];
    for (ct, tile) in dst.chunks_mut(ks * BLOCK).enumerate() {
        let keys = TILE.min(n - ct * TILE);
        for s in 0..ks {
            for (j, p) in pairs.iter_mut().enumerate() {
                if j < keys {
                    let src = row(ct * TILE + j);
                    // SAFETY: AVX-512 present (caller's contract); a u32 pair array is 32 u16.
                    unsafe {
                        let halves = std::slice::from_raw_parts_mut(p.as_mut_ptr() as *mut u16, KSTEP);
                        convert_32(&src[s * KSTEP..((s + 1) * KSTEP).min(k)], halves);
                    }
                } else {
                    *p = [0; TILE];
                }
            }
            let block = &mut tile[s * BLOCK..][..BLOCK];
            for p in 0..TILE {
                for (j, keyed) in pairs.iter().enumerate() {
                    let v = keyed[p];
                    block[p * KSTEP + 2 * j] = v as u16;
                    block[p * KSTEP + 2 * j + 1] = (v >> 16) as u16;
                }
            }
        }
    }
}

/// Packs B `[k, n]` given row by row (`row(kk)`, `n` long) as column tiles into `dst`
/// (`packed_len(n, k)` long), e.g. attention values.
///
/// # Safety
/// [`super::available`] must be true (the conversion uses AVX-512 BF16).
pub(crate) unsafe fn pack_b_from_cols<'a>(k: usize, n: usize, row: impl Fn(usize) -> &'a [f32], dst: &mut [u16]) {
    assert_eq!(dst.len(), packed_len(n, k), "pack_b_from_cols: destination size");
    // SAFETY: forwarded; the one writer of the whole buffer.
    unsafe { pack_b_steps_from_cols(k, n, 0..ksteps(k), row, &Disjoint::new(dst)) }
}

/// As [`pack_b_from_cols`] for k steps `steps` only (rows `32·steps` of B): the blocks of
/// those steps in every column tile, so tasks can pack B's rows chunk by chunk.
///
/// # Safety
/// [`super::available`] must be true; `dst` is `packed_len(n, k)` long and no other task
/// writes these steps' blocks meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn pack_b_steps_from_cols<'a>(
    k: usize,
    n: usize,
    steps: Range<usize>,
    row: impl Fn(usize) -> &'a [f32],
    dst: &Disjoint<u16>,
) {
    use std::arch::x86_64::*;
    let tile_len = ksteps(k) * BLOCK;
    let zero = [0f32; 0];
    for s in steps {
        for p in 0..TILE {
            // Block row p pairs rows 32s+2p and 32s+2p+1 (zero past k) column by column.
            let kk = s * KSTEP + 2 * p;
            let (r0, r1): (&[f32], &[f32]) = (if kk < k { row(kk) } else { &zero }, if kk + 1 < k { row(kk + 1) } else { &zero });
            for ct in 0..n.div_ceil(TILE) {
                let load = |r: &[f32]| {
                    let cols = r.len().saturating_sub(ct * TILE).min(TILE);
                    let mask = ((1u32 << cols) - 1) as __mmask16;
                    // SAFETY: the mask keeps the load inside `r`.
                    unsafe { _mm512_cvtepu16_epi32(bf16x16(_mm512_maskz_loadu_ps(mask, r.as_ptr().wrapping_add(ct * TILE)))) }
                };
                let pair = _mm512_or_si512(load(r0), _mm512_slli_epi32::<16>(load(r1)));
                let at = ct * tile_len + s * BLOCK + p * KSTEP;
                // SAFETY: block row p of block (ct, s), which only this task writes (contract);
                // `part` checks it lies inside `dst`.
                unsafe { _mm512_storeu_si512(dst.part(at..at + KSTEP).as_mut_ptr() as *mut _, pair) };
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn pack_b_steps_from_cols<'a>(_: usize, _: usize, _: Range<usize>, _: impl Fn(usize) -> &'a [f32], _: &Disjoint<u16>) {
    unreachable!("AMX is only detected on x86_64")
}

/// Rounds up to 32 values to bf16 into `out` (32 long), zero-filling past `src`.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16 (as [`super::available`] checks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn convert_32(src: &[f32], out: &mut [u16]) {
    use std::arch::x86_64::*;
    debug_assert!(src.len() <= KSTEP && out.len() == KSTEP);
    let n = src.len();
    let m0 = if n >= 16 { 0xffff } else { (1u32 << n) - 1 } as __mmask16;
    let m1 = if n >= 32 { 0xffff } else { (1u32 << n.saturating_sub(16)) - 1 } as __mmask16;
    // SAFETY: masked loads touch only `src`'s elements; stores write `out`'s 32.
    unsafe {
        let v0 = _mm512_maskz_loadu_ps(m0, src.as_ptr());
        let v1 = _mm512_maskz_loadu_ps(m1, src.as_ptr().wrapping_add(16));
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, bf16x16(v0));
        _mm256_storeu_si256(out.as_mut_ptr().add(16) as *mut __m256i, bf16x16(v1));
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn convert_32(_: &[f32], _: &mut [u16]) {
    unreachable!("AMX is only detected on x86_64")
}

/// 16 f32 -> 16 bf16, rounding to nearest even as torch does; `vcvtneps2bf16` also flushes
/// subnormal inputs (below 1.2e-38) to zero, where torch keeps them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
pub(crate) fn bf16x16(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: both are 256 bits of plain lanes.
    unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)) }
}
