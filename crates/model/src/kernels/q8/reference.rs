//! Scalar reference of the Q8_0 contract, written from the definition rather than the layout,
//! so the tests check packing and kernels against something independent of both.

use super::f16::{f16_to_f32, f32_to_f16};
use super::pack::{quantize_block, QK};

/// Quantizes row-major `v` [rows, k] into per-row blocks: (quants padded to kb·32, scales).
/// `f16_scales` rounds d through f16 (weights) or keeps it f32 (activations).
pub(crate) fn quantize_rows(v: &[f32], rows: usize, k: usize, f16_scales: bool) -> (Vec<i8>, Vec<f32>) {
    let kb = k.div_ceil(QK);
    let mut q = vec![0i8; rows * kb * QK];
    let mut d = vec![0f32; rows * kb];
    for r in 0..rows {
        for b in 0..kb {
            let src = &v[r * k + b * QK..r * k + ((b + 1) * QK).min(k)];
            let (db, _) = quantize_block(src, &mut q[(r * kb + b) * QK..][..QK]);
            d[r * kb + b] = if f16_scales { f16_to_f32(f32_to_f16(db)) } else { db };
        }
    }
    (q, d)
}

/// y[m, n] = x[m, k] · Wᵀ with Q8_0 numerics, W given in f32 [n, k].
pub(crate) fn reference_matmul(w: &[f32], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let kb = k.div_ceil(QK);
    let (qw, dw) = quantize_rows(w, n, k, true);
    let (qx, dx) = quantize_rows(x, m, k, false);
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for b in 0..kb {
                let mut s = 0i32;
                for t in 0..QK {
                    s += qx[(i * kb + b) * QK + t] as i32 * qw[(j * kb + b) * QK + t] as i32;
                }
                acc += s as f32 * (dw[j * kb + b] * dx[i * kb + b]);
            }
            y[i * n + j] = acc;
        }
    }
    y
}
