//! Packed weight layout and the GGML Q8_0 block quantizer shared by weights and activations.
//!
//! Layout: output columns are grouped in panels of [`PANEL`] = 16. A panel is one contiguous,
//! 64-byte aligned run of bytes holding
//!   * `kb` weight blocks of 512 bytes: for each group `g` of 4 consecutive k (8 groups per
//!     32-block), 64 bytes in which column `j` owns bytes `4j..4j+4`. One 512-bit load then
//!     feeds `vpdpbusd` for all 16 columns against 4 broadcast activation bytes.
//!   * then `kb` scale rows of 16 f16 (32 bytes), padded to 64 bytes at the end.
//!
//! Weights are stored offset as `u8 = q + 128` because `vpdpbusd` multiplies u8 × s8 and only
//! its *second* (s8) operand can be an embedded `{1to16}` memory broadcast; putting the
//! activations there saves a register and a shuffle per group. The offset is undone with
//! `-128·Σq_x` per (row, block), a per-row quantity computed once while quantizing the
//! activations, so no per-column correction has to be stored or streamed: a panel costs
//! exactly 34 bytes per 32 weights, like GGML's `block_q8_0`, which is what matters for
//! memory-bound decode.
//!
//! Scales sit at the end of the panel rather than interleaved so every weight load stays on a
//! 64-byte boundary (544-byte interleaved blocks would split every other load across lines).

use super::f16::f32_to_f16;

/// Q8_0 block length along k.
pub(crate) const QK: usize = 32;
/// Output columns per panel: one zmm of i32 / f32 lanes.
pub(crate) const PANEL: usize = 16;
/// Bytes of weights per (panel, block).
pub(crate) const BLOCK_BYTES: usize = QK * PANEL;
/// Bytes of f16 scales per (panel, block).
pub(crate) const SCALE_BYTES: usize = PANEL * 2;

/// One cache line; a `Vec<Line>` is a 64-byte aligned byte buffer without `unsafe` allocation.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Line(pub [u8; 64]);

/// Bytes per panel, a multiple of 64.
pub(crate) fn panel_bytes(kb: usize) -> usize {
    (kb * (BLOCK_BYTES + SCALE_BYTES)).div_ceil(64) * 64
}

/// GGML `quantize_row_q8_0_ref` for one block: `d = amax/127`, `q = round(x · (1/d))`.
/// `src` may be shorter than 32 (k padding); the missing tail of `dst` becomes 0.
/// GGML multiplies by the reciprocal rather than dividing; we do the same so packed weights
/// are bit-identical to GGML/candle Q8_0 blocks. Returns `(d, Σq)`.
#[inline]
pub(crate) fn quantize_block(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    debug_assert!(src.len() <= QK && dst.len() == QK);
    let amax = src.iter().fold(0f32, |a, &x| a.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &x) in dst.iter_mut().zip(src) {
        *q = (x * id).round() as i8;
        sum += *q as i32;
    }
    for q in dst[src.len()..].iter_mut() {
        *q = 0;
    }
    (d, sum)
}

/// Fills one panel (`panel.len() == panel_bytes(kb)`) from rows `row0..row0+rows` of W.
pub(crate) fn pack_panel(
    panel: &mut [u8],
    row0: usize,
    rows: usize,
    k: usize,
    kb: usize,
    buf: &mut [f32],
    fill: &(impl Fn(usize, &mut [f32]) + Sync),
) {
    let (wts, scales) = panel.split_at_mut(kb * BLOCK_BYTES);
    wts.fill(128); // padding columns and padding k: q = 0
    scales.fill(0);
    let mut q = [0i8; QK];
    for j in 0..rows {
        fill(row0 + j, buf);
        for b in 0..kb {
            let src = &buf[b * QK..((b + 1) * QK).min(k)];
            let (d, _) = quantize_block(src, &mut q);
            let h = f32_to_f16(d).to_le_bytes();
            scales[b * SCALE_BYTES + 2 * j..][..2].copy_from_slice(&h);
            let blk = &mut wts[b * BLOCK_BYTES..][..BLOCK_BYTES];
            for g in 0..QK / 4 {
                for t in 0..4 {
                    blk[g * 64 + j * 4 + t] = (q[g * 4 + t] as i32 + 128) as u8;
                }
            }
        }
    }
}
