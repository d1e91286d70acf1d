//! IEEE binary16 conversion, scalar.
//!
//! Own code rather than the `half` crate so the kernel adds no dependency; only the weight
//! scales go through it (once per block at pack time and in the portable path), so speed
//! is irrelevant. The AVX-512 path converts scales with `vcvtph2ps`, which agrees bit for
//! bit with `f16_to_f32` (checked in the tests).

/// Round-to-nearest-even f32 -> f16 bits, like `half::f16::from_f32` and `vcvtps2ph`.
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let a = b & 0x7fff_ffff;
    if a >= 0x7f80_0000 {
        // Inf stays Inf; NaN stays a (quiet) NaN.
        return sign | 0x7c00 | if a > 0x7f80_0000 { 0x0200 } else { 0 };
    }
    if a >= 0x477f_f000 {
        // >= 65520 rounds past the largest finite half.
        return sign | 0x7c00;
    }
    if a < 0x3880_0000 {
        // Below 2^-14: subnormal half. Scaling by 2^24 is exact, so one
        // ties-to-even rounding gives the mantissa (0x400 encodes the smallest normal).
        let q = (f32::from_bits(a) * 16_777_216.0).round_ties_even() as u16;
        return sign | q;
    }
    let mut h = (a >> 13) - ((127 - 15) << 10);
    let rem = a & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && (h & 1) == 1) {
        h += 1; // a mantissa carry correctly bumps the exponent
    }
    sign | h as u16
}

pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let e = ((h >> 10) & 0x1f) as u32;
    let m = (h & 0x3ff) as u32;
    if e == 0 {
        let v = m as f32 * (1.0 / 16_777_216.0);
        return if sign != 0 { -v } else { v };
    }
    let bits = if e == 31 { sign | 0x7f80_0000 | (m << 13) } else { sign | ((e + 112) << 23) | (m << 13) };
    f32::from_bits(bits)
}
