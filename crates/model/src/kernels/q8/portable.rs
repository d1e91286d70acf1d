//! Fallback for x86 CPUs without AVX2 and for other targets: same packed layout, same integer
//! numerics, plain loops the compiler can vectorise over the 16 panel columns. Correctness
//! over speed; x86 servers take the AVX2 or AVX-512 VNNI kernels.

use std::ops::Range;

use super::f16::f16_to_f32;
use super::pack::{BLOCK_BYTES, PANEL, QK, SCALE_BYTES};
use super::{ActQ, OutPtr, Q8Weights};

/// # Safety
/// `y` must point to an m × n buffer of which this call alone writes `rows × panels`.
pub(crate) unsafe fn run_tile(w: &Q8Weights, a: &ActQ, rows: Range<usize>, panels: Range<usize>, y: OutPtr) {
    let kb = w.kb;
    let kp = kb * QK;
    let mut dw = vec![0f32; kb * PANEL];
    for p in panels {
        let panel = &w.raw()[p * w.pstride..][..w.pstride];
        let scales = &panel[kb * BLOCK_BYTES..];
        for (b, d) in dw.chunks_mut(PANEL).enumerate() {
            for (j, d) in d.iter_mut().enumerate() {
                let s = &scales[b * SCALE_BYTES + 2 * j..];
                *d = f16_to_f32(u16::from_le_bytes([s[0], s[1]]));
            }
        }
        let col0 = p * PANEL;
        let ncols = PANEL.min(w.n - col0);
        for r in rows.clone() {
            let xq = &a.q[r * kp..][..kp];
            let mut out = [0f32; PANEL];
            for b in 0..kb {
                let mut acc = [a.s[r * kb + b]; PANEL];
                let blk = &panel[b * BLOCK_BYTES..][..BLOCK_BYTES];
                let xb = &xq[b * QK..][..QK];
                for g in 0..QK / 4 {
                    let wg = &blk[g * 64..][..64];
                    for t in 0..4 {
                        let xv = xb[g * 4 + t] as i32;
                        for j in 0..PANEL {
                            acc[j] += wg[j * 4 + t] as i32 * xv;
                        }
                    }
                }
                let dx = a.d[r * kb + b];
                for j in 0..PANEL {
                    out[j] += acc[j] as f32 * (dw[b * PANEL + j] * dx);
                }
            }
            // SAFETY: row r, columns col0..col0+ncols are inside y and owned by this tile.
            let dst = unsafe { std::slice::from_raw_parts_mut(y.0.add(r * w.n + col0), ncols) };
            dst.copy_from_slice(&out[..ncols]);
        }
    }
}
