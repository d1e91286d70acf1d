//! Intel AMX tile kernels: bf16 products with f32 accumulation, for prefill-sized work.
//!
//! Why: on Sapphire Rapids-class CPUs the tile unit multiplies bf16 at about 3 TFLOP/s per
//! core (measured here), 10-20x what AVX-512 reaches in f32 or int8 VNNI. transformers gets
//! its bf16 prefill speed from it through oneDNN. We use it where many rows share a matrix:
//! the vision tower's attention and the quantized projections' prefill (weights dequantized
//! to bf16 once per call). Decode stays on VNNI, where one row per matrix is bound by memory.
//! Numerics: operands rounded to bf16 (round to nearest even), products summed in f32 —
//! what torch's bf16 CPU matmul does; the exact mode (`--quant none`) never comes here.
//!
//! Operands are packed in blocks of one tile (16 rows × 64 bytes = 1 KiB):
//!   * A `[m, k]` in row tiles: block `(rt, s)` holds rows `16rt..16rt+16`, columns
//!     `32s..32s+32`, row-major (see [`pack::pack_a`]).
//!   * B `[k, n]` (for `x·Wᵀ`, B = Wᵀ) in column tiles: block `(ct, s)` row `p` holds, for each
//!     of the 16 columns `j`, the pair `B[32s+2p][j], B[32s+2p+1][j]` — the layout
//!     `tdpbf16ps` reads (see [`pack::pack_b_from_rows`]).
//!
//! Padding rows and columns are zero, so they add nothing to the sums.

pub(crate) mod attention;
pub(crate) mod pack;

#[cfg(test)]
pub(crate) mod tests;

use std::ops::Range;

/// Rows (and columns) of one tile.
pub(crate) const TILE: usize = 16;
/// k per tile step: 32 bf16 = 64 bytes per tile row.
pub(crate) const KSTEP: usize = 32;
/// u16 elements per packed block.
pub(crate) const BLOCK: usize = TILE * KSTEP;

/// Whether this process may run the tile kernels: the CPU has AMX-BF16 (and the AVX-512 the
/// packing uses) and Linux granted the tile state. `QWEN_OCR_AMX=0` turns them off, to
/// measure or compare against the AVX-512 paths (as does `QWEN_OCR_MAX_ISA` below AVX-512).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        let disabled = std::env::var("QWEN_OCR_AMX").is_ok_and(|v| matches!(v.as_str(), "0" | "off" | "false"));
        !disabled && detect()
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // `is_x86_feature_detected!` does not know AMX on stable Rust: read CPUID leaf 7 directly.
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    let (amx_bf16, amx_tile) = (edx >> 22 & 1 == 1, edx >> 24 & 1 == 1);
    if !(amx_bf16 && amx_tile && crate::kernels::features::cpu().avx512_bf16) {
        return false;
    }
    // Linux keeps the 8 KiB tile state off by default; a process asks once for all its threads.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// A 16 × 16 f32 result tile, row-major.
pub(crate) type OutTile = [f32; TILE * TILE];

/// `C(rt, ct) = Σ_s A(rt, s) · B(ct, s)` over k steps `steps` for every row tile in `rts` and
/// column tile in `cts`, handing each finished 16 × 16 tile to `sink(rt, ct, tile)`. `a` and
/// `b` are packed with `ksteps` steps (see the module docs), indexed from tile 0; steps left
/// out must add nothing (e.g. keys no query of a causal block sees). Runs on the calling thread.
///
/// # Safety
/// [`available`] must have returned true; `a` must hold every row tile in `rts` and `b` every
/// column tile in `cts`, each with `ksteps` blocks; `steps.end <= ksteps`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn gemm(
    a: &Aligned<u16>,
    b: &Aligned<u16>,
    ksteps: usize,
    steps: Range<usize>,
    rts: Range<usize>,
    cts: Range<usize>,
    mut sink: impl FnMut(usize, usize, &OutTile),
) {
    #[repr(C, align(64))]
    struct Staging(OutTile);
    let mut tile = Staging([0.0; TILE * TILE]);
    // SAFETY: forwarded; each store writes the 1 KiB staging tile.
    unsafe {
        gemm_tiles(a, b, ksteps, steps, rts, cts, None, |acc, rt, ct| {
            acc.store(tile.0.as_mut_ptr(), TILE);
            sink(rt, ct, &tile.0);
        })
    }
}

/// As [`gemm`], storing each tile straight into row-major `out` (row stride `stride`
/// elements), whose first element is that of tile `(rts.start, cts.start)`: no copy, for
/// outputs padded to whole tiles.
///
/// # Safety
/// As [`gemm`]; `out` must be writable for every row and column of every tile in range.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn gemm_into(
    a: &Aligned<u16>,
    b: &Aligned<u16>,
    ksteps: usize,
    rts: Range<usize>,
    cts: Range<usize>,
    out: *mut f32,
    stride: usize,
) {
    let (r0, c0) = (rts.start, cts.start);
    // SAFETY: forwarded.
    unsafe {
        gemm_tiles(a, b, ksteps, 0..ksteps, rts, cts, None, |acc, rt, ct| {
            acc.store(out.add((rt - r0) * TILE * stride + (ct - c0) * TILE), stride)
        })
    }
}

/// As [`gemm`] over k steps `kr` only, adding onto `acc`: the tiles of rows `rts` × columns
/// `cts`, tile `(rt, ct)` at `((rt - rts.start) · cts.len() + ct - cts.start) · 256`, each
/// 16 × 16 row-major. Blocking k keeps a task's operands in L2 when k is large.
///
/// # Safety
/// As [`gemm`]; `acc` holds `rts.len() · cts.len()` tiles.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn gemm_accumulate(
    a: &Aligned<u16>,
    b: &Aligned<u16>,
    ksteps: usize,
    kr: Range<usize>,
    rts: Range<usize>,
    cts: Range<usize>,
    acc: &mut Aligned<f32>,
) {
    let (r0, c0, nc) = (rts.start, cts.start, cts.len());
    assert!(acc.len() >= rts.len() * nc * TILE * TILE && kr.end <= ksteps, "amx::gemm_accumulate: sizes");
    let base = acc.as_mut_ptr();
    let at = move |rt: usize, ct: usize| ((rt - r0) * nc + ct - c0) * TILE * TILE;
    // SAFETY: forwarded; every tile offset lies inside `acc` (asserted).
    unsafe {
        let mut init = |t: Acc, rt: usize, ct: usize| t.load(base.add(at(rt, ct)), TILE);
        gemm_tiles(a, b, ksteps, kr, rts, cts, Some(&mut init), |t, rt, ct| t.store(base.add(at(rt, ct)), TILE))
    }
}

/// One of the four accumulator tiles of the 2 × 2 kernel.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Acc {
    T0,
    T1,
    T2,
    T3,
}

#[cfg(target_arch = "x86_64")]
impl Acc {
    /// Stores the tile's 16 × 16 f32 at `dst`, rows `stride` elements apart.
    ///
    /// # Safety
    /// `dst` writable as described; tiles configured.
    unsafe fn store(self, dst: *mut f32, stride: usize) {
        use std::arch::asm;
        let st = stride * 4;
        // SAFETY: the caller's contract; tile numbers must be literals, hence the match.
        unsafe {
            match self {
                Acc::T0 => asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) dst, s = in(reg) st, options(nostack)),
                Acc::T1 => asm!("tilestored [{p} + {s}*1], tmm1", p = in(reg) dst, s = in(reg) st, options(nostack)),
                Acc::T2 => asm!("tilestored [{p} + {s}*1], tmm2", p = in(reg) dst, s = in(reg) st, options(nostack)),
                Acc::T3 => asm!("tilestored [{p} + {s}*1], tmm3", p = in(reg) dst, s = in(reg) st, options(nostack)),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Acc {
    /// Loads the tile's 16 × 16 f32 from `src`, rows `stride` elements apart.
    ///
    /// # Safety
    /// `src` readable as described; tiles configured.
    unsafe fn load(self, src: *const f32, stride: usize) {
        use std::arch::asm;
        let st = stride * 4;
        // SAFETY: the caller's contract; tile numbers must be literals, hence the match.
        unsafe {
            match self {
                Acc::T0 => asm!("tileloadd tmm0, [{p} + {s}*1]", p = in(reg) src, s = in(reg) st, options(nostack, readonly)),
                Acc::T1 => asm!("tileloadd tmm1, [{p} + {s}*1]", p = in(reg) src, s = in(reg) st, options(nostack, readonly)),
                Acc::T2 => asm!("tileloadd tmm2, [{p} + {s}*1]", p = in(reg) src, s = in(reg) st, options(nostack, readonly)),
                Acc::T3 => asm!("tileloadd tmm3, [{p} + {s}*1]", p = in(reg) src, s = in(reg) st, options(nostack, readonly)),
            }
        }
    }
}

/// The 2 × 2 tile kernel: 4 accumulators (tmm0-3), 2 A (tmm4-5), 2 B (tmm6-7), all 8 tiles.
/// Sums k steps `kr` onto zero, or onto what `init` loads into each accumulator. An odd last
/// row or column tile is computed twice and its copy not emitted.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_tiles(
    a: &[u16],
    b: &[u16],
    ksteps: usize,
    kr: Range<usize>,
    rts: Range<usize>,
    cts: Range<usize>,
    mut init: Option<&mut dyn FnMut(Acc, usize, usize)>,
    mut emit: impl FnMut(Acc, usize, usize),
) {
    use std::arch::asm;
    assert!(rts.end * ksteps * BLOCK <= a.len() && cts.end * ksteps * BLOCK <= b.len(), "amx::gemm: operands too short");
    debug_assert!(
        (a.as_ptr() as usize).is_multiple_of(64) && (b.as_ptr() as usize).is_multiple_of(64),
        "amx::gemm: operands must be 64-byte aligned"
    );
    let stride = (KSTEP * 2) as isize;
    let step = (BLOCK * 2) as isize; // bytes from one k step's block to the next
                                     // SAFETY (whole body): the caller guarantees AMX is enabled and the operands' extent;
                                     // every tile load reads one 1 KiB block inside `a` or `b`.
    unsafe {
        configure_tiles();
        for rt in rts.clone().step_by(2) {
            let rt1 = (rt + 1).min(rts.end - 1);
            for ct in cts.clone().step_by(2) {
                let ct1 = (ct + 1).min(cts.end - 1);
                let mut pa0 = a.as_ptr().add((rt * ksteps + kr.start) * BLOCK) as *const u8;
                let mut pa1 = a.as_ptr().add((rt1 * ksteps + kr.start) * BLOCK) as *const u8;
                let mut pb0 = b.as_ptr().add((ct * ksteps + kr.start) * BLOCK) as *const u8;
                let mut pb1 = b.as_ptr().add((ct1 * ksteps + kr.start) * BLOCK) as *const u8;
                match init.as_mut() {
                    None => asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem)),
                    Some(init) => {
                        init(Acc::T0, rt, ct);
                        init(Acc::T1, rt, ct1);
                        init(Acc::T2, rt1, ct);
                        init(Acc::T3, rt1, ct1);
                    }
                }
                for _ in kr.clone() {
                    asm!(
                        "tileloadd tmm4, [{a0} + {st}*1]",
                        "tileloadd tmm5, [{a1} + {st}*1]",
                        "tileloadd tmm6, [{b0} + {st}*1]",
                        "tileloadd tmm7, [{b1} + {st}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) pa0, a1 = in(reg) pa1, b0 = in(reg) pb0, b1 = in(reg) pb1, st = in(reg) stride,
                        options(nostack, readonly),
                    );
                    pa0 = pa0.offset(step);
                    pa1 = pa1.offset(step);
                    pb0 = pb0.offset(step);
                    pb1 = pb1.offset(step);
                }
                emit(Acc::T0, rt, ct);
                if ct1 != ct {
                    emit(Acc::T1, rt, ct1);
                }
                if rt1 != rt {
                    emit(Acc::T2, rt1, ct);
                    if ct1 != ct {
                        emit(Acc::T3, rt1, ct1);
                    }
                }
            }
        }
    }
}

/// Non-x86 builds never call this ([`available`] is false there); it exists so callers need
/// no `cfg` of their own.
///
/// # Safety
/// Never safe to call: it panics.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn gemm(
    _: &Aligned<u16>,
    _: &Aligned<u16>,
    _: usize,
    _: Range<usize>,
    _: Range<usize>,
    _: Range<usize>,
    _: impl FnMut(usize, usize, &OutTile),
) {
    unreachable!("AMX is only detected on x86_64")
}

/// See [`gemm`]'s non-x86 stand-in.
///
/// # Safety
/// Never safe to call: it panics.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn gemm_accumulate(
    _: &Aligned<u16>,
    _: &Aligned<u16>,
    _: usize,
    _: Range<usize>,
    _: Range<usize>,
    _: Range<usize>,
    _: &mut Aligned<f32>,
) {
    unreachable!("AMX is only detected on x86_64")
}

/// See [`gemm`]'s non-x86 stand-in.
///
/// # Safety
/// Never safe to call: it panics.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn gemm_into(_: &Aligned<u16>, _: &Aligned<u16>, _: usize, _: Range<usize>, _: Range<usize>, _: *mut f32, _: usize) {
    unreachable!("AMX is only detected on x86_64")
}

/// Loads the one tile shape every kernel uses: all 8 tiles 16 rows × 64 bytes. Cheap next to a
/// gemm call, and per call means no thread ever runs a kernel with another configuration.
#[cfg(target_arch = "x86_64")]
unsafe fn configure_tiles() {
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }
    let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
    cfg.colsb[..8].fill((KSTEP * 2) as u16);
    cfg.rows[..8].fill(TILE as u8);
    // SAFETY: a valid palette-1 configuration; AMX enabled (caller's contract).
    unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly)) };
}

/// A 64-byte aligned buffer of `u16` (packed bf16) or `f32`. Alignment is not optional: a
/// tile row that straddles two cache lines made `tileloadd` ten times slower here.
pub(crate) struct Aligned<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _type: std::marker::PhantomData<T>,
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Element types for which every bit pattern, zero included, is a valid value.
pub(crate) trait Plain: Copy {}
impl Plain for u16 {}
impl Plain for f32 {}

impl<T: Plain> Aligned<T> {
    /// `len` zeros.
    pub(crate) fn zeroed(len: usize) -> Self {
        let mut a = Aligned { lines: Vec::new(), len: 0, _type: std::marker::PhantomData };
        a.resize(len);
        a.fill_zero();
        a
    }

    /// Sets the length to `len`, keeping the allocation when it is large enough; elements
    /// beyond the old length are zero or left over from earlier use. Lines are never given
    /// back, so a buffer that alternates between sizes (the projections of one layer) is not
    /// zeroed again on every call: on the 2B prefill that zeroing cost 0.3 s.
    pub(crate) fn resize(&mut self, len: usize) {
        let lines = Self::lines_for(len);
        if lines > self.lines.len() {
            self.lines.resize(lines, Line([0; 64]));
        }
        self.len = len;
    }

    pub(crate) fn fill_zero(&mut self) {
        let lines = Self::lines_for(self.len);
        self.lines[..lines].fill(Line([0; 64]));
    }

    fn lines_for(len: usize) -> usize {
        (len * std::mem::size_of::<T>()).div_ceil(64)
    }
}

impl<T: Plain> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `lines` holds at least `len` T (see `resize`), any bit pattern is a valid T,
        // and 64-byte alignment satisfies T's.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Plain> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }
}
