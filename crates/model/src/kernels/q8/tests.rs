use super::f16::{f16_to_f32, f32_to_f16};
use super::reference::{quantize_rows, reference_matmul};
use super::{Backend, Q8Weights};

/// Small deterministic generator (xorshift) so tests need no RNG crate API.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.f()).collect()
    }
}

fn weights(w: &[f32], n: usize, k: usize) -> Q8Weights {
    Q8Weights::quantize(n, k, |i, row| row.copy_from_slice(&w[i * k..(i + 1) * k]))
}

/// Every backend this CPU can run, not only the one `detect` picks, so an AVX-512 host still
/// checks the AVX2 kernels.
fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        let features = crate::kernels::features::cpu();
        if features.avx2_fma {
            v.push(Backend::Avx2);
        }
        if features.avx512_vnni {
            v.push(Backend::Avx512Vnni);
        }
    }
    v
}

fn check_vs_reference(backend: Backend, m: usize, n: usize, k: usize, rng: &mut Rng) {
    let w = rng.vec(n * k);
    let x = rng.vec(m * k);
    let q = weights(&w, n, k);
    let want = reference_matmul(&w, n, k, &x, m);
    let mut y = vec![f32::NAN; m * n];
    q.matmul_with(backend, &x, m, &mut y, None);
    let scale = want.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
    for (idx, (a, b)) in y.iter().zip(&want).enumerate() {
        assert!((a - b).abs() <= 1e-5 * scale, "{backend:?} m={m} n={n} k={k} at ({}, {}): {a} vs {b} (scale {scale})", idx / n, idx % n);
    }
}

#[test]
fn kernels_match_reference() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for backend in backends() {
        for &k in &[16, 32, 48, 96, 1176, 1536] {
            for &n in &[1, 16, 17, 48, 100, 256] {
                for &m in &[1, 2, 3, 5, 7, 17, 64, 100] {
                    // Keep debug-build time down: the big-k cases only with a few m.
                    if k >= 1176 && m * n > 64 * 48 {
                        continue;
                    }
                    check_vs_reference(backend, m, n, k, &mut rng);
                }
            }
        }
    }
}

#[test]
fn larger_tiles_match_reference() {
    // Several row blocks and column blocks, odd panel counts, many threads' worth of tiles.
    let mut rng = Rng(7);
    for backend in backends() {
        check_vs_reference(backend, 100, 256, 1536, &mut rng);
        check_vs_reference(backend, 203, 80, 96, &mut rng);
        check_vs_reference(backend, 9, 272, 1176, &mut rng);
    }
}

#[test]
fn close_to_f32_matmul() {
    let mut rng = Rng(42);
    let (m, n, k) = (13, 70, 1176);
    let w = rng.vec(n * k);
    let x = rng.vec(m * k);
    let q = weights(&w, n, k);
    let mut y = vec![0f32; m * n];
    q.matmul(&x, m, &mut y);
    let (mut err, mut norm) = (0f64, 0f64);
    for i in 0..m {
        for j in 0..n {
            let exact: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
            err += (y[i * n + j] as f64 - exact).powi(2);
            norm += exact.powi(2);
        }
    }
    let rel = (err / norm).sqrt();
    assert!(rel < 0.01, "relative rms error {rel}");
}

#[test]
fn dequantize_round_trip() {
    let mut rng = Rng(3);
    for &(n, k) in &[(17, 16), (33, 1176), (5, 96)] {
        let mut w = rng.vec(n * k);
        // An all-zero row, an all-zero block and a block with one huge value.
        w[k..2 * k].fill(0.0);
        w[2 * k..2 * k + 16].fill(0.0);
        w[3 * k + 1] = 1e4;
        let q = weights(&w, n, k);
        assert_eq!((q.n(), q.k()), (n, k));
        let (qw, dw) = quantize_rows(&w, n, k, true);
        let kb = k.div_ceil(32);
        let mut out = vec![0f32; k];
        for i in 0..n {
            q.dequantize_row(i, &mut out);
            for t in 0..k {
                let want = qw[(i * kb + t / 32) * 32 + t % 32] as f32 * dw[i * kb + t / 32];
                assert_eq!(out[t], want, "row {i} col {t}");
                // Q8_0 round-trip error: at most half a step (plus f16 scale rounding).
                let step = dw[i * kb + t / 32];
                assert!((out[t] - w[i * k + t]).abs() <= 0.51 * step + 1e-3 * step * 127.0);
            }
        }
        assert!(out.iter().all(|v| v.is_finite()));
        q.dequantize_row(1, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
    }
}

#[test]
fn zero_inputs_give_zero() {
    let (m, n, k) = (3, 20, 48);
    let q = Q8Weights::quantize(n, k, |_, row| row.fill(0.0));
    let x = vec![1.0f32; m * k];
    for backend in backends() {
        let mut y = vec![f32::NAN; m * n];
        q.matmul_with(backend, &x, m, &mut y, None);
        assert!(y.iter().all(|&v| v == 0.0));
    }
    let mut rng = Rng(5);
    let w = rng.vec(n * k);
    let q = weights(&w, n, k);
    let mut y = vec![f32::NAN; m * n];
    q.matmul(&vec![0.0; m * k], m, &mut y);
    assert!(y.iter().all(|&v| v == 0.0));
    q.matmul(&[], 0, &mut []);
}

#[test]
fn memory_is_ggml_sized() {
    let q = Q8Weights::quantize(256, 1536, |_, row| row.fill(0.5));
    // 34 bytes per 32 weights.
    let payload = 256 * 1536 / 32 * 34;
    assert!(q.bytes() >= payload && q.bytes() < payload + 256);
}

#[test]
fn f16_conversion_is_ieee() {
    // Exhaustive round trip over halves; NaNs only need to stay NaN.
    for h in 0..=u16::MAX {
        let f = f16_to_f32(h);
        if f.is_nan() {
            assert!(f16_to_f32(f32_to_f16(f)).is_nan());
        } else {
            assert_eq!(f32_to_f16(f), h, "{h:#x}");
        }
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") {
        let mut rng = Rng(11);
        #[target_feature(enable = "f16c")]
        fn hw(x: f32) -> (u16, f32) {
            use std::arch::x86_64::*;
            let h = _mm_extract_epi16::<0>(_mm_cvtps_ph::<0>(_mm_set1_ps(x))) as u16;
            (h, _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(h as i16))))
        }
        for i in 0..200_000u32 {
            // Random bit patterns concentrated around the half range, plus ties.
            let bits = match i % 3 {
                0 => rng.next() as u32,
                1 => 0x3000_0000 + (rng.next() as u32 % 0x1800_0000),
                _ => (0x3000_0000 + (rng.next() as u32 % 0x1800_0000)) & !0xfff | 0x1000,
            };
            let x = f32::from_bits(bits);
            if x.is_nan() {
                continue;
            }
            // SAFETY: f16c detected.
            let (h, back) = unsafe { hw(x) };
            assert_eq!(f32_to_f16(x), h, "{x:e} ({bits:#x})");
            assert_eq!(f16_to_f32(h).to_bits(), back.to_bits());
        }
    }
}

#[test]
fn activation_quantizers_agree() {
    // Block maxima of 127 make 1/d exactly 1, so the .5 values are exact rounding ties.
    let mut rng = Rng(9);
    let k = 1176;
    let mut x = rng.vec(3 * k);
    for (i, v) in x[..k].iter_mut().enumerate() {
        *v = if i % 32 == 0 { 127.0 } else { (i % 255) as f32 - 127.0 + 0.5 * (i % 2) as f32 };
    }
    x[k + 40] = 1e-30; // tiny block scale
    let portable = super::ActQ::new(Backend::Portable, &x, 3, k);
    for backend in backends() {
        let other = super::ActQ::new(backend, &x, 3, k);
        assert_eq!(portable.q, other.q, "{backend:?}");
        assert_eq!(portable.s, other.s, "{backend:?}");
        let bits = |d: &[f32]| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&portable.d), bits(&other.d), "{backend:?}");
    }
}

/// Quants at ±127 on both sides, the largest products there are: a kernel whose 16-bit pair
/// sums saturated (AVX2's `vpmaddubsw` on the stored `q + 128`) would be off here.
#[test]
fn extreme_quants_sum_exactly() {
    let (m, n, k) = (5, 33, 96);
    let w: Vec<f32> = (0..n * k).map(|i| if (i / 3) % 2 == 0 { 1.0 } else { -1.0 }).collect();
    let x: Vec<f32> = (0..m * k).map(|i| if (i / 5) % 2 == 0 { -1.0 } else { 1.0 }).collect();
    let want = reference_matmul(&w, n, k, &x, m);
    let q = weights(&w, n, k);
    for backend in backends() {
        let mut y = vec![f32::NAN; m * n];
        q.matmul_with(backend, &x, m, &mut y, None);
        for (a, b) in y.iter().zip(&want) {
            // Only the f32 rounding of the block sums may differ (FMA or not); a saturated
            // pair sum would be off by thousands of quant units.
            assert!((a - b).abs() <= 1e-5 * k as f32, "{backend:?}: {a} vs {b}");
        }
    }
}

/// The AMX path (prefill on CPUs that have it): bf16 activations against the dequantized Q8_0
/// weights, so within bf16 rounding of the f32 product with those weights, for ragged shapes.
#[test]
fn amx_tiles_match_the_dequantized_weights_within_bf16() {
    if !crate::kernels::amx::available() {
        eprintln!("no AMX on this CPU: nothing to check");
        return;
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for &(m, n, k) in &[(128, 16, 32), (129, 17, 48), (150, 48, 1176), (144, 256, 1536), (143, 100, 96), (136, 150, 4100)] {
        let (w, x) = (rng.vec(n * k), rng.vec(m * k));
        let q = weights(&w, n, k);
        let mut row = vec![0f32; k];
        let deq: Vec<f32> = (0..n)
            .flat_map(|j| {
                q.dequantize_row(j, &mut row);
                row.clone()
            })
            .collect();
        let mut y = vec![f32::NAN; m * n];
        q.matmul(&x, m, &mut y);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|t| x[i * k + t] * deq[j * k + t]).sum();
                // bf16 keeps 8 significant bits: each product is off by up to ~2^-8 relative.
                let bound = 8e-3 * (0..k).map(|t| (x[i * k + t] * deq[j * k + t]).abs()).sum::<f32>().max(1e-6);
                assert!((y[i * n + j] - want).abs() <= bound, "m={m} n={n} k={k} at ({i}, {j}): {} vs {want}", y[i * n + j]);
            }
        }
    }
}

/// The epilogue sees every output element exactly once, with its row and column, after the
/// product: on the VNNI path (few rows) and the tile path (many rows, when the CPU has AMX).
#[test]
fn epilogue_runs_once_on_every_element_after_the_product() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for &(m, n, k) in &[(3, 40, 64), (140, 40, 64), (129, 300, 96)] {
        let (w, x) = (rng.vec(n * k), rng.vec(m * k));
        let q = weights(&w, n, k);
        let mut plain = vec![0f32; m * n];
        q.matmul(&x, m, &mut plain);
        let mut y = vec![0f32; m * n];
        let epilogue = |row: usize, col0: usize, seg: &mut [f32]| {
            for (c, v) in seg.iter_mut().enumerate() {
                *v = *v * 2.0 + (row * 1000 + col0 + c) as f32;
            }
        };
        q.matmul_then(&x, m, &mut y, Some(&epilogue));
        for i in 0..m {
            for j in 0..n {
                let want = plain[i * n + j] * 2.0 + (i * 1000 + j) as f32;
                assert_eq!(y[i * n + j], want, "m={m} n={n} at ({i}, {j})");
            }
        }
    }
}

/// A row's result does not depend on what shares its call: each span (a sequence or an image)
/// gets exactly the numbers it gets alone, whichever kernel its length selects.
#[test]
fn spans_get_the_numbers_they_get_alone() {
    let mut rng = Rng(0x0bad_cafe_f00d_1234);
    let (n, k) = (48, 96);
    let spans = [(0, 3), (3, 130), (133, 1), (134, 1), (135, 140)];
    let m = 275;
    let (w, x) = (rng.vec(n * k), rng.vec(m * k));
    let q = weights(&w, n, k);
    let mut batched = vec![f32::NAN; m * n];
    q.matmul_spans(&x, m, &mut batched, None, &spans);
    for &(first, rows) in &spans {
        let mut alone = vec![f32::NAN; rows * n];
        q.matmul(&x[first * k..(first + rows) * k], rows, &mut alone);
        assert_eq!(&batched[first * n..(first + rows) * n], &alone[..], "span ({first}, {rows})");
    }
}
