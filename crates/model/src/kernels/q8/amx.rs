//! Q8_0 weights on AMX tiles, for prefill-sized calls: each call dequantizes the weights to
//! bf16 (`q·d`, rounded once) in the tile layout, rounds the activations to bf16, and sums in
//! f32 on the tile unit. Dequantizing costs O(n·k) per call against O(m·n·k) products, so it
//! pays from a few dozen rows; decode stays on the VNNI kernel, where memory is the limit and
//! the 1-byte weights are what it reads.

use rayon::prelude::*;

use super::pack::{BLOCK_BYTES, PANEL, SCALE_BYTES};
use super::{Epilogue, OutPtr, Q8Weights};
use crate::kernels::amx::pack::{pack_a, packed_len};
use crate::kernels::amx::{gemm, gemm_accumulate, gemm_into, Aligned, BLOCK, KSTEP, TILE};
use crate::stage_profile::{self, Op};
use std::mem::MaybeUninit;
use std::ops::Range;

const _: () = assert!(PANEL == TILE && super::pack::QK == KSTEP, "a Q8_0 panel block is one tile block");

/// Fewest rows for which the tiles beat the VNNI kernel. Dequantizing costs about 0.13 ns per
/// weight on two cores, paid per call; the tiles save 6-12 ns per row per thousand weights
/// over VNNI on the 2B shapes, so they break even at 110-145 rows (measured). Below that, and
/// for batched decode (at most `max_batch_size` rows), VNNI reads the 1-byte weights directly.
pub(crate) const MIN_ROWS: usize = 128;

/// Most bytes of dequantized weights held at once; wider matrices go in column chunks.
const MAX_B_BYTES: usize = 32 << 20;

/// Bytes of packed operand per task block: an A block and a B block together stay in L2.
const TASK_BLOCK_BYTES: usize = 512 << 10;

/// k steps per chunk when k is blocked (2048 of k: 64 KiB per tile row or column).
const K_CHUNK: usize = 64;

/// Row and column tiles per task when k is blocked: 512 KiB of A and of B per chunk.
const KBLOCK_TILES: usize = 8;

static A_SCRATCH: std::sync::Mutex<Option<Aligned<u16>>> = std::sync::Mutex::new(None);
static B_SCRATCH: std::sync::Mutex<Option<Aligned<u16>>> = std::sync::Mutex::new(None);

/// Takes a cached buffer (or a new one) of `len` elements; large packings would otherwise
/// page-fault on every call.
fn take(cache: &std::sync::Mutex<Option<Aligned<u16>>>, len: usize) -> Aligned<u16> {
    let mut buf = cache.try_lock().ok().and_then(|mut g| g.take()).unwrap_or_else(|| Aligned::zeroed(0));
    buf.resize(len);
    buf
}

fn give_back(cache: &std::sync::Mutex<Option<Aligned<u16>>>, buf: Aligned<u16>) {
    if let Ok(mut g) = cache.try_lock() {
        *g = Some(buf);
    }
}

/// y[m, n] = x[m, k] · Wᵀ on tiles (y overwritten).
///
/// # Safety
/// [`crate::kernels::amx::available`] must be true; `x` is m × k, `y` m × n.
pub(crate) unsafe fn matmul(w: &Q8Weights, x: &[f32], m: usize, y: &mut [MaybeUninit<f32>], epilogue: Option<Epilogue>) {
    let (n, k, kb) = (w.n, w.k, w.kb);
    let mut a = take(&A_SCRATCH, packed_len(m, k));
    let packing = stage_profile::op(Op::Packing);
    // SAFETY: AMX (with AVX-512) available, the caller's contract.
    unsafe { pack_a(m, k, |i| &x[i * k..][..k], &mut a) };
    drop(packing);
    let panels_per_chunk = (MAX_B_BYTES / (kb * BLOCK * 2)).max(1);
    let mut b = take(&B_SCRATCH, 0);
    let mut p0 = 0;
    while p0 < w.np {
        let panels = panels_per_chunk.min(w.np - p0);
        b.resize(panels * kb * BLOCK);
        let raw = w.raw();
        b.par_chunks_mut(kb * BLOCK).enumerate().for_each(|(i, dst)| {
            // SAFETY: AVX-512 with BF16 present (`available` checks it with AMX); each panel is
            // `pstride` bytes inside the weights.
            unsafe { dequantize_panel(&raw[(p0 + i) * w.pstride..][..w.pstride], kb, dst) }
        });
        let cols = (n - p0 * PANEL).min(panels * PANEL);
        // SAFETY: forwarded; the chunk's columns are p0·16.. of y.
        unsafe { run_tiles(&a, &b, kb, m, p0 * PANEL..p0 * PANEL + cols, y, n, epilogue) };
        p0 += panels;
    }
    give_back(&A_SCRATCH, a);
    give_back(&B_SCRATCH, b);
}

/// Columns `ycols` of y (row stride `ystride`) = A · B over packed operands (B's column 0 is
/// y's `ycols.start`), then `epilogue`, in parallel tasks of (row block × column block) sized
/// so both blocks stay in L2.
#[allow(clippy::too_many_arguments)]
unsafe fn run_tiles(
    a: &Aligned<u16>,
    b: &Aligned<u16>,
    ks: usize,
    m: usize,
    ycols: Range<usize>,
    y: &mut [MaybeUninit<f32>],
    ystride: usize,
    epilogue: Option<Epilogue>,
) {
    let cols = ycols.len();
    let col0 = ycols.start;
    let (rts, cts) = (m.div_ceil(TILE), cols.div_ceil(TILE));
    // Up to K_CHUNK steps a task runs the whole of k; beyond, k is cut in chunks of K_CHUNK so
    // that blocks of KBLOCK_TILES row and column tiles fit L2 whatever k is.
    let kblocked = ks > K_CHUNK;
    let per_block = if kblocked { KBLOCK_TILES } else { (TASK_BLOCK_BYTES / (ks * BLOCK * 2)).clamp(2, 16) & !1 };
    let (rbs, cbs) = (rts.div_ceil(per_block), cts.div_ceil(per_block));
    let full_rows = m / TILE;
    let out = OutPtr(y[col0..].as_mut_ptr().cast());
    // Copies a 16 × 16 tile into y, clipped to m rows and `cols` columns.
    let copy_out = |out: &crate::kernels::q8::OutPtr, rt: usize, ct: usize, tile: &[f32]| {
        for r in 0..TILE.min(m - rt * TILE) {
            let c = TILE.min(cols - ct * TILE);
            // SAFETY: row rt·16+r < m and columns ct·16.. +c <= cols lie inside y.
            unsafe { std::ptr::copy_nonoverlapping(tile[r * TILE..].as_ptr(), out.0.add((rt * TILE + r) * ystride + ct * TILE), c) };
        }
    };
    (0..rbs * cbs).into_par_iter().with_max_len(1).for_each_init(
        || Aligned::<f32>::zeroed(0),
        |acc, t| {
            let out = &out;
            let rows = (t / cbs) * per_block..((t / cbs + 1) * per_block).min(rts);
            let tiles = (t % cbs) * per_block..((t % cbs + 1) * per_block).min(cts);
            let block_cols = tiles.start * TILE..(tiles.end * TILE).min(cols);
            // SAFETY: the task's own block of y, computed just before.
            let finish = || unsafe {
                OutPtr(out.0.wrapping_sub(col0)).finish(
                    epilogue,
                    rows.start * TILE..(rows.end * TILE).min(m),
                    col0 + block_cols.start..col0 + block_cols.end,
                    ystride,
                )
            };
            // SAFETY (both branches): AMX present; tasks write disjoint (row, column) blocks of y.
            if kblocked {
                acc.resize(rows.len() * tiles.len() * TILE * TILE);
                acc.fill_zero();
                for k0 in (0..ks).step_by(K_CHUNK) {
                    // SAFETY: see above; `acc` holds this task's tiles.
                    unsafe { gemm_accumulate(a, b, ks, k0..(k0 + K_CHUNK).min(ks), rows.clone(), tiles.clone(), acc) };
                }
                for (i, tile) in acc.chunks_exact(TILE * TILE).enumerate() {
                    copy_out(out, rows.start + i / tiles.len(), tiles.start + i % tiles.len(), tile);
                }
                return finish();
            }
            // Whole tiles go straight into y; a ragged last row or column tile through a copy.
            let inner_rows = rows.start..rows.end.min(full_rows);
            let whole_cols = cols.is_multiple_of(TILE) || tiles.end < cts;
            // SAFETY: see above; whole tiles are written only inside this task's block of y.
            unsafe {
                if whole_cols && !inner_rows.is_empty() {
                    gemm_into(
                        a,
                        b,
                        ks,
                        inner_rows.clone(),
                        tiles.clone(),
                        out.0.add(inner_rows.start * TILE * ystride + tiles.start * TILE),
                        ystride,
                    );
                }
                let ragged_rows = if whole_cols { inner_rows.end..rows.end } else { rows.clone() };
                if !ragged_rows.is_empty() {
                    gemm(a, b, ks, 0..ks, ragged_rows, tiles, |rt, ct, tile| copy_out(out, rt, ct, tile));
                }
            }
            finish();
        },
    );
}

/// One panel's weights (16 columns × `kb` blocks of 32) as B tile blocks of bf16 `q·d`.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16 (as [`crate::kernels::amx::available`] checks);
/// `panel` is one packed panel, `dst` `kb · 512` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dequantize_panel(panel: &[u8], kb: usize, dst: &mut [u16]) {
    use crate::kernels::amx::pack::bf16x16;
    use std::arch::x86_64::*;
    debug_assert!(dst.len() == kb * BLOCK);
    // A weight group is 64 bytes: column j's 4 consecutive k at bytes 4j..4j+4. Lane l of the
    // quarter c holds column 4c + l/4, so its scale is lane 4c + l/4 of the scale vector.
    let scale_idx: [__m512i; 4] = std::array::from_fn(|c| {
        let lanes: [i32; 16] = std::array::from_fn(|l| (4 * c + l / 4) as i32);
        // SAFETY: an unaligned load of 16 i32 from a local array.
        unsafe { _mm512_loadu_si512(lanes.as_ptr() as *const _) }
    });
    // Tile row 2g holds the pairs (k = 4g, 4g+1) of all 16 columns, row 2g+1 (4g+2, 4g+3): the
    // even and odd u32 of the group's bf16 quads.
    let even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    let offset = _mm512_set1_epi32(128);
    // SAFETY (whole body): reads stay inside the panel (kb blocks then kb scale rows), writes
    // inside dst.
    unsafe {
        let scales = panel.as_ptr().add(kb * BLOCK_BYTES);
        for b in 0..kb {
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(b * SCALE_BYTES) as *const __m256i));
            let ds: [__m512; 4] = std::array::from_fn(|c| _mm512_permutexvar_ps(scale_idx[c], d));
            for g in 0..KSTEP / 4 {
                let src = panel.as_ptr().add(b * BLOCK_BYTES + g * 64);
                let quarter = |c: usize| {
                    let q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(src.add(16 * c) as *const __m128i)), offset);
                    bf16x16(_mm512_mul_ps(_mm512_cvtepi32_ps(q), ds[c]))
                };
                let lo = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(quarter(0)), quarter(1));
                let hi = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(quarter(2)), quarter(3));
                let out = dst.as_mut_ptr().add(b * BLOCK + 2 * g * KSTEP);
                _mm512_storeu_si512(out as *mut _, _mm512_permutex2var_epi32(lo, even, hi));
                _mm512_storeu_si512(out.add(KSTEP) as *mut _, _mm512_permutex2var_epi32(lo, odd, hi));
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dequantize_panel(_: &[u8], _: usize, _: &mut [u16]) {
    unreachable!("AMX is only detected on x86_64")
}
