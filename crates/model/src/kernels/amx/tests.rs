use super::pack::{convert_32, ksteps, pack_a, pack_b_from_cols, pack_b_from_rows, packed_len};
use super::{available, gemm, Aligned, TILE};

/// f32 -> bf16 bits, rounding to nearest even, written from the definition.
fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn from_bf16(h: u16) -> f64 {
    f32::from_bits((h as u32) << 16) as f64
}

/// Deterministic values in [-1, 1) with all 23 mantissa bits used, so rounding matters.
pub(crate) fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Runs the tile gemm over packed operands into a dense `[m, n]`.
fn run(m: usize, n: usize, k: usize, a: &Aligned<u16>, b: &Aligned<u16>) -> Vec<f32> {
    let mut y = vec![f32::NAN; m * n];
    // SAFETY: callers check `available()`; the operands were packed for these sizes.
    unsafe {
        gemm(a, b, ksteps(k), 0..ksteps(k), 0..m.div_ceil(TILE), 0..n.div_ceil(TILE), |rt, ct, tile| {
            for r in 0..TILE.min(m - rt * TILE) {
                for c in 0..TILE.min(n - ct * TILE) {
                    y[(rt * TILE + r) * n + ct * TILE + c] = tile[r * TILE + c];
                }
            }
        })
    };
    y
}

#[test]
fn bf16_rounds_to_nearest_even() {
    assert_eq!(bf16(1.0), 0x3f80);
    // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
    assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3f80);
    assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3f82);
    assert_eq!(bf16(-2.5), 0xc020);
    if !available() {
        return;
    }
    // The vector conversion the packing uses agrees with the definition, tail zero-filled.
    let src = values(29, 3);
    let mut out = [7u16; 32];
    // SAFETY: AMX (hence AVX-512) available.
    unsafe { convert_32(&src, &mut out) };
    let want: Vec<u16> = src.iter().map(|&v| bf16(v)).chain([0; 3]).collect();
    assert_eq!(out[..], want[..]);
}

#[test]
fn tile_gemm_matches_a_bf16_reference_with_every_edge() {
    if !available() {
        eprintln!("no AMX on this CPU: nothing to check");
        return;
    }
    for &(m, n, k) in &[(1, 1, 1), (16, 16, 32), (17, 33, 80), (50, 40, 100), (5, 70, 31), (64, 48, 1280)] {
        let (x, w) = (values(m * k, 7 + m as u64), values(n * k, 11 + n as u64));
        let (mut a, mut b) = (Aligned::zeroed(packed_len(m, k)), Aligned::zeroed(packed_len(n, k)));
        a.fill(7);
        b.fill(7);
        // SAFETY: `available()` checked above.
        unsafe {
            pack_a(m, k, |i| &x[i * k..][..k], &mut a);
            pack_b_from_rows(n, k, |j| &w[j * k..][..k], &mut b);
        }
        let y = run(m, n, k, &a, &b);
        // The same product from B given as [k, n] columns must agree exactly.
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let mut b2 = Aligned::zeroed(packed_len(n, k));
        b2.fill(7);
        // SAFETY: as above.
        unsafe { pack_b_from_cols(k, n, |kk| &wt[kk * n..][..n], &mut b2) };
        assert_eq!(b[..], b2[..], "the two B packings disagree for {m}x{n}x{k}");
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|t| from_bf16(bf16(x[i * k + t])) * from_bf16(bf16(w[j * k + t]))).sum();
                let got = y[i * n + j] as f64;
                assert!((got - want).abs() <= 1e-5 * (k as f64).sqrt(), "{m}x{n}x{k} at ({i}, {j}): {got} vs {want}");
            }
        }
    }
}

/// `cargo test --release -p qwen-ocr-model --lib amx::tests::timing -- --ignored --nocapture`
#[test]
#[ignore = "timing, not a check"]
fn timing() {
    if !available() {
        return;
    }
    for (m, n, k) in [(64, 1564, 80), (64, 1564, 1280), (256, 256, 1280)] {
        let (x, w) = (values(m * k, 1), values(n * k, 2));
        let (mut a, mut b) = (Aligned::zeroed(packed_len(m, k)), Aligned::zeroed(packed_len(n, k)));
        // SAFETY: AMX checked above; the buffers are sized by `packed_len` for these shapes.
        unsafe {
            pack_a(m, k, |i| &x[i * k..][..k], &mut a);
            pack_b_from_rows(n, k, |j| &w[j * k..][..k], &mut b);
        }
        let mut s = vec![0f32; m * n];
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let reps = 200;
            for _ in 0..reps {
                // SAFETY: AMX checked above; `a` and `b` hold every tile of the ranges.
                unsafe {
                    gemm(&a, &b, ksteps(k), 0..ksteps(k), 0..m / TILE, 0..n.div_ceil(TILE), |rt, ct, tile| {
                        let cols = TILE.min(n - ct * TILE);
                        for r in 0..TILE {
                            s[(rt * TILE + r) * n + ct * TILE..][..cols].copy_from_slice(&tile[r * TILE..][..cols]);
                        }
                    })
                }
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            let t = std::time::Instant::now();
            let mut p = Aligned::<u16>::zeroed(packed_len(m, n));
            for _ in 0..reps {
                // SAFETY: AMX checked above; `p` is sized for `m x n`.
                unsafe { super::pack::pack_a_serial(m, n, |i| &s[i * n..][..n], &mut p) };
            }
            let dp = t.elapsed().as_secs_f64() / reps as f64;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                // SAFETY: AMX checked above; `b` is sized for `n x k`.
                unsafe { pack_b_from_rows(n, k, |j| &w[j * k..][..k], &mut b) };
            }
            let db = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "QK^T {m}x{n}x{k}: {:.1} us = {:.0} GFLOP/s; pack P {:.1} us; pack K {:.1} us",
                dt * 1e6,
                2.0 * (m * n * ksteps(k) * 32) as f64 / dt / 1e9,
                dp * 1e6,
                db * 1e6
            );
        }
    }
}
