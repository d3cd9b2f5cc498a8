//! One work item's product: some rows of one expert's projection times that expert's token rows.
//!
//! Design decision: the path depends only on the token count. Few tokens (decode-like) stream
//! the rows once through in-register tiles, 4 rows × up to 4 tokens at a time; many tokens
//! decode a cache-sized block of rows to f32 once and hand it to a register-blocked sgemm. Either
//! way each weight byte is read from memory once per call, and the choice never depends on
//! threads, so results are bitwise reproducible.

use std::cell::RefCell;
use std::ops::Range;

use super::rows::{ProjectionPlan, Source};
use super::simd::{self, Codec, Isa, RowFormat, MAX_TILE_TOKENS};
use crate::weights::QuantizedTensor;

/// Token counts up to this run in-register tiles; more go through decode + sgemm.
pub const TILE_PATH_MAX_TOKENS: usize = 8;

/// f32 elements of a decoded row block for the sgemm path (~128 KiB: stays in L2 next to the
/// token rows while sgemm sweeps it).
const DECODED_BLOCK_ELEMS: usize = 32 * 1024;

/// Rows per call of the in-register path (their factors are computed together).
const TILE_BLOCK_ROWS: usize = 32;

/// Row blocks of the sgemm path are a multiple of this (sgemm's register tile is 8 wide).
const BLOCK_ROW_MULTIPLE: usize = 8;

/// The activation rows of a product: row `i < n` is `base[index[i] * k..]` (gathered tokens) or
/// `base[i * k..]` (already contiguous).
pub struct TokenRows<'a> {
    pub base: &'a [f32],
    pub k: usize,
    pub index: Option<&'a [u32]>,
    pub n: usize,
}

impl TokenRows<'_> {
    #[inline]
    fn row(&self, i: usize) -> &[f32] {
        let r = self.index.map_or(i, |ix| ix[i] as usize);
        &self.base[r * self.k..(r + 1) * self.k]
    }
}

/// Per-thread buffers reused across work items and calls (no allocation per token or item once
/// they have grown).
#[derive(Default)]
pub struct Scratch {
    factors: Vec<f32>,
    decoded: Vec<f32>,
    gathered: Vec<f32>,
    /// The item's product before its epilogue (bias, activation); used by `forward`.
    pub y: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch. Work items never nest (no rayon calls inside), so the
/// borrow is never re-entered.
pub fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// Global row of local row `j` when the item's rows are the ranges concatenated.
#[inline]
fn global_row(ranges: &[Range<usize>], mut j: usize) -> usize {
    for r in ranges {
        if j < r.len() {
            return r.start + j;
        }
        j -= r.len();
    }
    unreachable!("local row beyond the item's ranges")
}

/// `y[i * ldy + j] = Σ_c W_e[row j][c] · x_i[c]` for the item's rows (`ranges` concatenated, j
/// local) and every token row `x_i` (in the plan's codec order).
#[allow(clippy::too_many_arguments)]
pub fn project(
    isa: Isa,
    plan: &ProjectionPlan,
    t: &QuantizedTensor,
    e: usize,
    ranges: &[Range<usize>],
    xs: &TokenRows<'_>,
    y: &mut [f32],
    ldy: usize,
    scratch: &mut Scratch,
) {
    let m: usize = ranges.iter().map(|r| r.len()).sum();
    if xs.n == 0 || m == 0 {
        return;
    }
    if xs.n <= TILE_PATH_MAX_TOKENS {
        match plan.source {
            Source::Native => tiles_native(isa, plan, t, e, ranges, m, xs, y, ldy, scratch),
            Source::Decoded => {
                for_row_blocks(ranges, plan.fmt.k, |j0, rows| {
                    let k = plan.fmt.k;
                    let dec = grow(&mut scratch.decoded, rows.len() * k);
                    t.decode_rows_f32(e, rows.clone(), dec);
                    let fmt = RowFormat::new(Codec::F32, k, k);
                    let bytes: Vec<&[u8]> = dec.chunks(k).map(simd::f32_bytes).collect();
                    tile_rows(isa, fmt, &bytes, &[], j0, xs, y, ldy);
                });
            }
        }
        return;
    }
    // Many tokens: gather them once per item, then decode each block of rows once for all.
    let k = plan.fmt.k;
    let Scratch {
        factors,
        decoded,
        gathered,
        ..
    } = scratch;
    let x: &[f32] = match xs.index {
        None => &xs.base[..xs.n * k],
        Some(_) => {
            let g = grow(gathered, xs.n * k);
            for (i, dst) in g.chunks_exact_mut(k).enumerate() {
                dst.copy_from_slice(xs.row(i));
            }
            g
        }
    };
    for_row_blocks(ranges, k, |j0, rows| {
        let dec = grow(decoded, rows.len() * k);
        match plan.source {
            Source::Native => {
                let groups = plan.fmt.groups();
                let facs = grow(factors, rows.len() * groups);
                for (i, r) in rows.clone().enumerate() {
                    plan.factors(t, e, r, &mut facs[i * groups..]);
                }
                let row_bytes: Vec<&[u8]> = rows.clone().map(|r| plan.row(t, e, r)).collect();
                let fac: Vec<&[f32]> = if groups > 0 {
                    facs.chunks(groups).collect()
                } else {
                    Vec::new()
                };
                simd::decode_rows(isa, plan.fmt, &row_bytes, &fac, dec);
            }
            Source::Decoded => t.decode_rows_f32(e, rows.clone(), dec),
        }
        simd::sgemm_abt(xs.n, rows.len(), k, x, dec, &mut y[j0..], ldy);
    });
}

/// Calls `f(first local row, global rows)` for blocks of at most `DECODED_BLOCK_ELEMS / k` rows
/// (a multiple of the tile height) that never straddle two ranges.
fn for_row_blocks(ranges: &[Range<usize>], k: usize, mut f: impl FnMut(usize, Range<usize>)) {
    let per = (DECODED_BLOCK_ELEMS / k.max(1) / BLOCK_ROW_MULTIPLE * BLOCK_ROW_MULTIPLE)
        .max(BLOCK_ROW_MULTIPLE);
    let mut j0 = 0;
    for r in ranges {
        let mut s = r.start;
        while s < r.end {
            let end = (s + per).min(r.end);
            f(j0, s..end);
            j0 += end - s;
            s = end;
        }
    }
}

/// The in-register path over the stored bytes: blocks of rows with their factors, each block
/// against all tokens 4 at a time (the block's bytes stay in L1/L2 between token tiles).
#[allow(clippy::too_many_arguments)]
fn tiles_native(
    isa: Isa,
    plan: &ProjectionPlan,
    t: &QuantizedTensor,
    e: usize,
    ranges: &[Range<usize>],
    m: usize,
    xs: &TokenRows<'_>,
    y: &mut [f32],
    ldy: usize,
    scratch: &mut Scratch,
) {
    let groups = plan.fmt.groups();
    let facs = grow(&mut scratch.factors, TILE_BLOCK_ROWS * groups.max(1));
    let mut j0 = 0;
    while j0 < m {
        let nr = TILE_BLOCK_ROWS.min(m - j0);
        let mut rows: [&[u8]; TILE_BLOCK_ROWS] = [&[]; TILE_BLOCK_ROWS];
        for (i, row) in rows.iter_mut().enumerate().take(nr) {
            let r = global_row(ranges, j0 + i);
            *row = plan.row(t, e, r);
            if groups > 0 {
                plan.factors(t, e, r, &mut facs[i * groups..]);
            }
        }
        let mut fac: [&[f32]; TILE_BLOCK_ROWS] = [&[]; TILE_BLOCK_ROWS];
        if groups > 0 {
            for (i, f) in fac.iter_mut().enumerate().take(nr) {
                *f = &facs[i * groups..(i + 1) * groups];
            }
        }
        let fac: &[&[f32]] = if groups > 0 { &fac[..nr] } else { &[] };
        tile_rows(isa, plan.fmt, &rows[..nr], fac, j0, xs, y, ldy);
        j0 += nr;
    }
}

/// `rows` (local rows from `j0`) against all token rows, [`MAX_TILE_TOKENS`] at a time.
#[allow(clippy::too_many_arguments)]
fn tile_rows(
    isa: Isa,
    fmt: RowFormat,
    rows: &[&[u8]],
    factors: &[&[f32]],
    j0: usize,
    xs: &TokenRows<'_>,
    y: &mut [f32],
    ldy: usize,
) {
    let nr = rows.len();
    let mut out = [0f32; TILE_BLOCK_ROWS * MAX_TILE_TOKENS];
    let mut t0 = 0;
    while t0 < xs.n {
        let nt = MAX_TILE_TOKENS.min(xs.n - t0);
        let mut x: [&[f32]; MAX_TILE_TOKENS] = [&[]; MAX_TILE_TOKENS];
        for (i, xi) in x.iter_mut().enumerate().take(nt) {
            *xi = xs.row(t0 + i);
        }
        let mut r0 = 0;
        while r0 < nr {
            let rn = TILE_BLOCK_ROWS.min(nr - r0);
            let fac = if factors.is_empty() {
                factors
            } else {
                &factors[r0..r0 + rn]
            };
            simd::dot_rows(
                isa,
                fmt,
                &rows[r0..r0 + rn],
                fac,
                &x[..nt],
                &mut out[..rn * nt],
            );
            for r in 0..rn {
                for ti in 0..nt {
                    y[(t0 + ti) * ldy + j0 + r0 + r] = out[r * nt + ti];
                }
            }
            r0 += rn;
        }
        t0 += nt;
    }
}
