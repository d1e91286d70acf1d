//! Int8 matrix multiply with GGML Q8_0 numerics and our own packed layout.
//!
//! Why not candle's `QMatMul`: it computes one dot product per (row, column) pair and re-reads
//! weights per row, reaching ~0.35-0.44 TOP/s on our prefill shapes on 2 cores, well short of
//! the VNNI peak. Here weights are packed in 16-column panels (see [`pack`]) so a register-tiled
//! AVX-512 VNNI micro-kernel (see `avx512`) reuses every weight load across several rows and
//! every activation load across several columns; CPUs with AVX2 but no AVX-512 VNNI run an
//! 8-lane kernel over the same layout (see `avx2`).
//!
//! Numerics (the contract the tests check): W and x are both cut into blocks of 32 along k,
//! per row; `d = max|v|/127`, `q = round(v/d)` as GGML does it (times `1/d`); the weight
//! `d` is rounded to f16, the activation `d` stays f32 (slightly more accurate than GGML,
//! which stores it as f16 too). `y[i][j] = Σ_b dx[i,b]·dw[j,b]·(Σ_{t∈b} qx·qw)`, the inner
//! sum exact in i32, the outer one in f32 in block order. k is zero-padded to a multiple of 32.

mod f16;
mod pack;
mod portable;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

mod amx;

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use crate::stage_profile::{self, Op};
use pack::{panel_bytes, Line, PANEL, QK};

/// Quantized, packed weights W [n, k] (n output features).
pub struct Q8Weights {
    n: usize,
    k: usize,
    /// Blocks of 32 along (padded) k.
    kb: usize,
    /// Panels of 16 output columns (the last one zero-padded).
    np: usize,
    /// Bytes per panel (multiple of 64).
    pstride: usize,
    data: Vec<Line>,
}

/// Which kernel family runs a matmul; public to the crate so tests can force the fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Backend {
    /// Best backend for this CPU, detected once.
    pub(crate) fn detect() -> Backend {
        #[cfg(target_arch = "x86_64")]
        {
            let features = crate::kernels::features::cpu();
            if features.avx512_vnni {
                return Backend::Avx512Vnni;
            }
            if features.avx2_fma {
                return Backend::Avx2;
            }
        }
        Backend::Portable
    }
}

/// Whether this CPU runs Q8_0 products on a SIMD integer kernel (AVX2 or AVX-512 VNNI) rather
/// than the portable loops, which are about 10x slower than f32 products (`benches/README.md`).
pub fn fast_on_this_cpu() -> bool {
    Backend::detect() != Backend::Portable
}

/// Activations quantized once per matmul, row-major, k padded to `kb*32`.
pub(crate) struct ActQ {
    /// m × kb·32 signed quants.
    q: Vec<i8>,
    /// m × kb scales.
    d: Vec<f32>,
    /// m × kb values of `-128·Σq`: the initial i32 accumulator that cancels the +128 offset
    /// of the stored weights (see [`pack`]).
    s: Vec<i32>,
}

impl ActQ {
    /// Quantizes x [m, k], reusing this thread's buffers from the previous call: a prefill's
    /// buffers are megabytes, and fresh ones cost page faults on every call.
    fn new(backend: Backend, x: &[f32], m: usize, k: usize) -> ActQ {
        let kb = k.div_ceil(QK);
        let kp = kb * QK;
        let mut a = SCRATCH.with(|c| c.take()).unwrap_or(ActQ { q: Vec::new(), d: Vec::new(), s: Vec::new() });
        // Every element is overwritten below, so stale contents do not matter.
        a.q.resize(m * kp, 0);
        a.d.resize(m * kb, 0.0);
        a.s.resize(m * kb, 0);
        let row = |(((q, d), s), x): RowBufs| match backend {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: this backend is only chosen after feature detection; lengths as documented.
            Backend::Avx512Vnni => unsafe { avx512::quantize_row(x, q, d, s) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Backend::Avx2 => unsafe { avx2::quantize_row(x, q, d, s) },
            Backend::Portable => {
                for b in 0..kb {
                    let src = &x[b * QK..((b + 1) * QK).min(k)];
                    let (db, sum) = pack::quantize_block(src, &mut q[b * QK..][..QK]);
                    d[b] = db;
                    s[b] = -128 * sum;
                }
            }
        };
        let (q, d, s) = (&mut a.q[..m * kp], &mut a.d[..m * kb], &mut a.s[..m * kb]);
        if m * k < 1 << 16 {
            q.chunks_mut(kp).zip(d.chunks_mut(kb)).zip(s.chunks_mut(kb)).zip(x.chunks(k)).for_each(row);
        } else {
            q.par_chunks_mut(kp).zip(d.par_chunks_mut(kb)).zip(s.par_chunks_mut(kb)).zip(x.par_chunks(k)).for_each(row);
        }
        a
    }

    /// Keeps the buffers for this thread's next call, unless they are unusually large: a
    /// thread-local cache is never freed, so it must stay small for threads that call rarely.
    fn recycle(self) {
        if self.q.capacity() <= SCRATCH_MAX_BYTES {
            SCRATCH.with(|c| c.set(Some(self)));
        }
    }
}

/// Largest quantized-activation buffer kept between calls (a 1564 × 5120 prefill needs 8 MB).
const SCRATCH_MAX_BYTES: usize = 32 << 20;

/// One row's (quants, scales, offset sums) and its input, as zipped chunk iterators yield them.
type RowBufs<'a> = (((&'a mut [i8], &'a mut [f32]), &'a mut [i32]), &'a [f32]);

thread_local! {
    static SCRATCH: std::cell::Cell<Option<ActQ>> = const { std::cell::Cell::new(None) };
}

/// Work on a finished block of a product's output: called as `epilogue(row, first_column,
/// values)` for each row segment of the block, in parallel across blocks.
pub type Epilogue<'a> = &'a (dyn Fn(usize, usize, &mut [f32]) + Sync);

/// An output buffer shared between rayon tasks that write disjoint parts of it (tiles of a
/// product, blocks of attention output).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub *mut f32);

impl OutPtr {
    /// Runs `epilogue` over rows `rows`, columns `cols` of y (row stride `stride`).
    ///
    /// # Safety
    /// The block lies inside y and no other thread touches it meanwhile.
    pub(crate) unsafe fn finish(self, epilogue: Option<Epilogue>, rows: Range<usize>, cols: Range<usize>, stride: usize) {
        let Some(epilogue) = epilogue else { return };
        for r in rows {
            // SAFETY: the caller's contract.
            let seg = unsafe { std::slice::from_raw_parts_mut(self.0.add(r * stride + cols.start), cols.len()) };
            epilogue(r, cols.start, seg);
        }
    }
}
// SAFETY: its users write disjoint elements (e.g. the tiles of `for_each_tile`), so no two
// threads write the same element.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Quantized activation bytes per row block: a third of a Zen 4 L2 (1 MiB), leaving room for
/// the panel being reused and the one being prefetched.
const X_BLOCK_BYTES: usize = 192 << 10;

/// Rows handled per micro-kernel call in the AVX-512 path; row blocks are multiples of it.
pub(crate) const ROW_GROUP: usize = 6;

/// Splits the m × np output into (row range, panel range) tiles and runs them on rayon.
///
/// Row blocks are sized so their quantized activations (`rows × kp` bytes) stay in L2 while
/// a tile's panels stream past them; each panel (or pair) is then read from memory once per
/// row block and reused from L1/L2 for every row group inside it. For small m (decode) there
/// is a single row block and the split is over panels only, so both cores stream disjoint
/// parts of W at full bandwidth.
fn for_each_tile(m: usize, np: usize, kb: usize, f: impl Fn(Range<usize>, Range<usize>) + Sync) {
    let threads = rayon::current_num_threads().max(1);
    let kp = kb * QK;
    let mb = if m <= 8 {
        m
    } else {
        let fit = (X_BLOCK_BYTES / kp).max(ROW_GROUP) / ROW_GROUP * ROW_GROUP;
        fit.min(m.div_ceil(ROW_GROUP) * ROW_GROUP)
    };
    let rb = m.div_ceil(mb);
    let want_cols = (threads * 4).div_ceil(rb);
    let nbp = np.div_ceil(want_cols).clamp(2, 16).div_ceil(2) * 2;
    let cbn = np.div_ceil(nbp);
    let tiles = rb * cbn;
    let run = |t: usize| {
        let (ri, ci) = (t / cbn, t % cbn);
        f(ri * mb..((ri + 1) * mb).min(m), ci * nbp..((ci + 1) * nbp).min(np));
    };
    if tiles == 1 || threads == 1 {
        (0..tiles).for_each(run);
    } else {
        (0..tiles).into_par_iter().with_max_len(1).for_each(run);
    }
}

impl Q8Weights {
    /// Quantizes W [n, k], row `i` supplied in f32 by `fill(i, row_buf)` so callers can
    /// convert from bf16/f16 one row at a time. Parallel over 16-row panels.
    pub fn quantize(n: usize, k: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        assert!(k > 0, "Q8Weights: k must be > 0");
        let kb = k.div_ceil(QK);
        let np = n.div_ceil(PANEL);
        let pstride = panel_bytes(kb);
        let mut data = vec![Line([0; 64]); np * pstride / 64];
        let bytes = lines_as_bytes_mut(&mut data);
        bytes.par_chunks_mut(pstride.max(1)).enumerate().for_each_init(
            || vec![0f32; kb * QK],
            |buf, (p, panel)| {
                let row0 = p * PANEL;
                pack::pack_panel(panel, row0, PANEL.min(n - row0), k, kb, &mut buf[..k], &fill);
            },
        );
        Q8Weights { n, k, kb, np, pstride, data }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held: 34 per 32 weights (k padded to 32, n to 16) plus the struct.
    pub fn bytes(&self) -> usize {
        self.data.len() * 64 + std::mem::size_of::<Self>()
    }

    fn raw(&self) -> &[u8] {
        lines_as_bytes(&self.data)
    }

    /// The packed bytes, to store quantized weights and skip quantizing next time.
    pub fn packed(&self) -> &[u8] {
        self.raw()
    }

    /// Weights of shape `[n, k]` from bytes that [`Q8Weights::packed`] returned for that shape;
    /// `None` when their length cannot be that.
    pub fn from_packed(n: usize, k: usize, bytes: &[u8]) -> Option<Self> {
        let kb = k.div_ceil(QK);
        let np = n.div_ceil(PANEL);
        let pstride = panel_bytes(kb);
        if k == 0 || bytes.len() != np * pstride {
            return None;
        }
        let mut data = vec![Line([0; 64]); bytes.len() / 64];
        lines_as_bytes_mut(&mut data).copy_from_slice(bytes);
        Some(Q8Weights { n, k, kb, np, pstride, data })
    }

    /// y[m, n] = x[m, k] · Wᵀ (row-major, y overwritten), on rayon's global pool.
    ///
    /// On CPUs with AMX, spans of at least [`amx::MIN_ROWS`] rows (prefill; see
    /// [`Q8Weights::matmul_spans`]) run on bf16 tiles from weights dequantized per call (see
    /// `amx`): the Q8_0 weights with bf16 rather than Q8_0 activations, which is no less
    /// accurate and several times faster.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.matmul_then(x, m, y, None)
    }

    /// As [`Q8Weights::matmul`], then `epilogue` on every finished block of the output while
    /// it is still in cache (bias, activation, residual: one pass over y saved each).
    pub fn matmul_then(&self, x: &[f32], m: usize, y: &mut [f32], epilogue: Option<Epilogue>) {
        self.matmul_spans(x, m, y, epilogue, &[])
    }

    /// As [`Q8Weights::matmul_then`] for rows that come in spans `(first row, rows)` (one per
    /// sequence or image; empty: all m rows are one). The kernel is chosen per span, by the
    /// span's own length, so a row gets the same numbers whatever else shares its batch: a
    /// sequence's prefill is computed the same alone and batched, and decode rows (spans of
    /// one) always take the integer kernel.
    pub fn matmul_spans(&self, x: &[f32], m: usize, y: &mut [f32], epilogue: Option<Epilogue>, spans: &[(usize, usize)]) {
        self.matmul_uninit(x, m, as_uninit(y), epilogue, spans)
    }

    /// As [`Q8Weights::matmul_spans`] into memory not yet written: the kernels write every
    /// element of y before the epilogue reads it, so a fresh output needs no zeroing (which,
    /// for the prefill's outputs of tens of MB, cost a fifth of the product's time).
    pub fn matmul_uninit(&self, x: &[f32], m: usize, y: &mut [MaybeUninit<f32>], epilogue: Option<Epilogue>, spans: &[(usize, usize)]) {
        assert!(x.len() == m * self.k && y.len() == m * self.n, "Q8Weights::matmul: x must be m × k, y m × n");
        let tiles = crate::kernels::amx::available();
        let whole = [(0, m)];
        // Spans must tile 0..m in order; anything else is treated as one span.
        let tiling = spans.iter().try_fold(0, |at, &(first, rows)| (first == at).then_some(at + rows)) == Some(m);
        let spans = if tiling { spans } else { &whole[..] };
        // Consecutive spans of the same kind run as one call, so a decode batch reads the
        // weights once.
        let mut i = 0;
        while i < spans.len() {
            let on_tiles = tiles && spans[i].1 >= amx::MIN_ROWS;
            let start = spans[i].0;
            let mut end = start + spans[i].1;
            i += 1;
            while i < spans.len() && (tiles && spans[i].1 >= amx::MIN_ROWS) == on_tiles {
                end = spans[i].0 + spans[i].1;
                i += 1;
            }
            let (xs, ys) = (&x[start * self.k..end * self.k], &mut y[start * self.n..end * self.n]);
            let shifted = epilogue.map(|e| move |row: usize, col: usize, seg: &mut [f32]| e(start + row, col, seg));
            let shifted = shifted.as_ref().map(|e| e as Epilogue);
            if on_tiles {
                // SAFETY: AMX checked; the slices are these rows of x and y.
                unsafe { amx::matmul(self, xs, end - start, ys, shifted) };
            } else {
                self.matmul_with_uninit(Backend::detect(), xs, end - start, ys, shifted);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn matmul_with(&self, backend: Backend, x: &[f32], m: usize, y: &mut [f32], epilogue: Option<Epilogue>) {
        self.matmul_with_uninit(backend, x, m, as_uninit(y), epilogue)
    }

    fn matmul_with_uninit(&self, backend: Backend, x: &[f32], m: usize, y: &mut [MaybeUninit<f32>], epilogue: Option<Epilogue>) {
        assert_eq!(x.len(), m * self.k, "Q8Weights::matmul: x must be m × k");
        assert_eq!(y.len(), m * self.n, "Q8Weights::matmul: y must be m × n");
        if m == 0 || self.n == 0 {
            return;
        }
        let packing = stage_profile::op(Op::Packing);
        let act = ActQ::new(backend, x, m, self.k);
        drop(packing);
        let out = OutPtr(y.as_mut_ptr().cast());
        let n = self.n;
        for_each_tile(m, self.np, self.kb, |rows, panels| {
            let cols = panels.start * PANEL..(panels.end * PANEL).min(n);
            match backend {
                // SAFETY: tiles are disjoint and inside y (asserted above).
                Backend::Portable => unsafe { portable::run_tile(self, &act, rows.clone(), panels, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: only selected after runtime detection; tiles as above.
                Backend::Avx512Vnni => unsafe { avx512::run_tile(self, &act, rows.clone(), panels, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Backend::Avx2 => unsafe { avx2::run_tile(self, &act, rows.clone(), panels, out) },
            }
            // SAFETY: this task's own tile of y.
            unsafe { out.finish(epilogue, rows, cols, n) };
        });
        act.recycle();
    }

    /// Row `i` of W dequantized (`q·f16(d)`), e.g. for embedding look-ups.
    pub fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        assert!(i < self.n && out.len() == self.k);
        let (p, j) = (i / PANEL, i % PANEL);
        let panel = &self.raw()[p * self.pstride..][..self.pstride];
        let scales = &panel[self.kb * pack::BLOCK_BYTES..];
        for (b, chunk) in out.chunks_mut(QK).enumerate() {
            let h = u16::from_le_bytes([scales[b * pack::SCALE_BYTES + 2 * j], scales[b * pack::SCALE_BYTES + 2 * j + 1]]);
            let d = f16::f16_to_f32(h);
            let blk = &panel[b * pack::BLOCK_BYTES..];
            for (t, o) in chunk.iter_mut().enumerate() {
                *o = (blk[(t / 4) * 64 + j * 4 + t % 4] as i32 - 128) as f32 * d;
            }
        }
    }
}

/// Initialised floats seen as possibly uninitialised ones, for the one kernel entry point.
fn as_uninit(y: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same layout; the kernels only ever write initialised values through it.
    unsafe { &mut *(y as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

fn lines_as_bytes(l: &[Line]) -> &[u8] {
    // SAFETY: Line is repr(C) [u8; 64] with no padding.
    unsafe { std::slice::from_raw_parts(l.as_ptr() as *const u8, l.len() * 64) }
}

fn lines_as_bytes_mut(l: &mut [Line]) -> &mut [u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts_mut(l.as_mut_ptr() as *mut u8, l.len() * 64) }
}

/// Benchmark hook: runs only the tiled kernels (activations quantized once) `reps` times on
/// the calling thread, to measure kernel efficiency apart from quantization and threading.
#[doc(hidden)]
pub fn __bench_kernels_only(w: &Q8Weights, x: &[f32], m: usize, y: &mut [f32], reps: usize) {
    let backend = Backend::detect();
    let act = ActQ::new(backend, x, m, w.k);
    let out = OutPtr(y.as_mut_ptr());
    assert_eq!(y.len(), m * w.n);
    for _ in 0..reps {
        match backend {
            // SAFETY: as in `matmul_with`; the whole output is one tile.
            Backend::Portable => unsafe { portable::run_tile(w, &act, 0..m, 0..w.np, out) },
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512Vnni => unsafe { avx512::run_tile(w, &act, 0..m, 0..w.np, out) },
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => unsafe { avx2::run_tile(w, &act, 0..m, 0..w.np, out) },
        }
    }
}
