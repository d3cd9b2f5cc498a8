//! One work item's product: some rows of one expert's projection times that expert's token rows.
//!
//! Design decision: everything is dot-product tiles (K in the vector lanes, up to 4 tokens per
//! tile), which need no packing or padding for any token count. Rows of cheap codecs (bf16) and
//! rows met by a single token tile are decoded in registers; rows of scaled codecs met by several
//! token tiles are decoded once into an L2-sized f32 block first. Either way each weight byte is
//! read from memory once per call, and the path depends only on the token count, never on the
//! threads, so results are bitwise reproducible.

use std::cell::RefCell;
use std::ops::Range;

use super::rows::{ProjectionPlan, Source};
use super::simd::{self, FixedRow, Isa, RowFormat, MAX_TILE_TOKENS};
use crate::config::ActivationFormat;
use crate::formats::QuantizedRows;
use crate::weights::QuantizedTensor;

/// f32 elements of a decoded row block (~128 KiB: stays in L2 while every token tile sweeps it).
const DECODED_BLOCK_ELEMS: usize = 32 * 1024;

/// Rows per call of the in-register path.
const TILE_BLOCK_ROWS: usize = 32;

/// The activation rows of a product: row `i < n` is `base[index[i] * k..]` (gathered tokens) or
/// `base[i * k..]` (already contiguous).
pub struct TokenRows<'a> {
    pub base: &'a [f32],
    pub k: usize,
    pub index: Option<&'a [u32]>,
    pub n: usize,
    /// Row 0 in fixed point, when `n == 1` and the weights have an integer kernel
    /// ([`simd::has_fixed_kernel`]): the one-token product then runs in integers.
    pub fixed: Option<FixedRow<'a>>,
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
pub struct Scratch {
    decoded: Vec<f32>,
    /// The item's product before its epilogue (bias, activation); used by `forward`.
    pub y: Vec<f32>,
    /// The activation quantizer's output, reused (`formats::quantize_rows_into`).
    pub quant: QuantizedRows,
}

impl Default for Scratch {
    fn default() -> Self {
        let quant = QuantizedRows {
            format: ActivationFormat::Bf16,
            rows: 0,
            cols: 0,
            block: 1,
            values: Vec::new(),
            scales: Vec::new(),
        };
        Scratch {
            decoded: Vec::new(),
            y: Vec::new(),
            quant,
        }
    }
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
    let fmt = plan.fmt_for(t, e);
    let k = fmt.k;
    if let (1, Some(fx), Source::Native) = (xs.n, xs.fixed, plan.source) {
        // One token with its fixed-point row: each range's rows back to back through the
        // integer kernel; `y`'s row 0 is contiguous.
        // (Row blocks exist for every range or for none: it depends on the scale kind only.)
        if plan.row_block(t, e, 0..0).is_some() {
            let mut j0 = 0;
            for r in ranges {
                if let Some((data, scales)) = plan.row_block(t, e, r.clone()) {
                    let dst = &mut y[j0..j0 + r.len()];
                    let pairs = plan.pair_scale_block(e, r.clone());
                    simd::dot_rows_fixed(isa, fmt, data, scales, pairs, xs.row(0), fx, dst);
                }
                j0 += r.len();
            }
            return;
        }
    }
    let decode_first =
        plan.source == Source::Decoded || (fmt.codec.scaled() && xs.n > MAX_TILE_TOKENS);
    if !decode_first {
        // Rows decoded in registers, once per token tile: cheap codecs, or one tile of tokens.
        for_row_blocks(ranges, TILE_BLOCK_ROWS, |j0, rows| {
            let mut rb: [&[u8]; TILE_BLOCK_ROWS] = [&[]; TILE_BLOCK_ROWS];
            let mut sb: [&[u8]; TILE_BLOCK_ROWS] = [&[]; TILE_BLOCK_ROWS];
            for (i, r) in rows.clone().enumerate() {
                rb[i] = plan.row(t, e, r);
                sb[i] = plan.scales(t, e, r);
            }
            let n = rows.len();
            tile_rows(isa, fmt, &rb[..n], &sb[..n], j0, xs, y, ldy);
        });
        return;
    }
    // Several token tiles of a scaled codec (or rows the kernels cannot fold): decode a block of
    // rows to f32 once, then run f32 tiles over it for every token tile.
    let per = (DECODED_BLOCK_ELEMS / k.max(1)).max(1);
    let dec_fmt = RowFormat {
        out_mul: fmt.out_mul,
        ..RowFormat::f32(k)
    };
    for_row_blocks(ranges, per, |j0, rows| {
        let n = rows.len();
        let dec = grow(&mut scratch.decoded, n * k);
        match plan.source {
            Source::Native => {
                let rb: Vec<&[u8]> = rows.clone().map(|r| plan.row(t, e, r)).collect();
                let sb: Vec<&[u8]> = rows.clone().map(|r| plan.scales(t, e, r)).collect();
                simd::decode_rows(isa, fmt, &rb, &sb, dec);
            }
            Source::Decoded => t.decode_rows_f32(e, rows.clone(), dec),
        }
        let bytes: Vec<&[u8]> = dec.chunks_exact(k).map(simd::f32_bytes).collect();
        tile_rows(isa, dec_fmt, &bytes, &[], j0, xs, y, ldy);
    });
}

/// Calls `f(first local row, global rows)` for blocks of at most `per` rows that never straddle
/// two ranges.
fn for_row_blocks(ranges: &[Range<usize>], per: usize, mut f: impl FnMut(usize, Range<usize>)) {
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

/// `rows` (local rows from `j0`) against all token rows, [`MAX_TILE_TOKENS`] at a time.
#[allow(clippy::too_many_arguments)]
fn tile_rows(
    isa: Isa,
    fmt: RowFormat<'_>,
    rows: &[&[u8]],
    scales: &[&[u8]],
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
            let sc = if scales.is_empty() {
                scales
            } else {
                &scales[r0..r0 + rn]
            };
            simd::dot_rows(
                isa,
                fmt,
                &rows[r0..r0 + rn],
                sc,
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
