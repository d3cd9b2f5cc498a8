//! Activation rows in 16-bit fixed point, the input of the integer one-token E2M1 kernel.
//!
//! Design decision: E2M1 weights are small integers in disguise (2·value ∈ {0, ±1, ±2, ±3, ±4,
//! ±6, ±8, ±12}), so one `vpshufb` turns 32 nibbles into signed bytes, and `vpmaddubsw` /
//! `vpmaddwd` multiply and add them against activation bytes with no widening to f32 per weight:
//! about 20 vector ops per 64 weights instead of ~36 for the f32 path. The activations go into
//! that form once per row: every 32-element block of natural positions gets the exponent `E` of
//! its largest magnitude (`max |x| < 2^E`) and each element becomes `q = round(x · 2^(15 - E))`,
//! `|q| ≤ 32767`, stored as a high and a low unsigned byte of `|q|`, its sign going into the
//! weight instead: a sign mask byte per weight byte (0x08 for a negative even element, 0x80 for a
//! negative odd one) is XORed into the packed nibbles before the lookup, which flips the E2M1 sign
//! bits so the table returns 2·value·sign(x) directly (one XOR for 64 weights). The error is at
//! most 2^-16 · 2^E ≤ 2^-15 · max |x| per element, and none at all for bf16 inputs whose
//! exponents in a block span at most 8 binades (bf16 has 8 significant bits). Every sum is an
//! exact integer (|Σ| ≤ 32 · 12 · 32767 < 2^24, so its f32 is exact too); only the per-block FMA
//! into f32 rounds.
//!
//! Layout per block (what the AVX2 kernel loads, each 16-byte vector repeated in both 128-bit
//! lanes because the kernel holds two weight rows, one per lane): high bytes of the even
//! positions, low bytes of the even positions, high and low bytes of the odd positions, the sign
//! masks; and one f32 per block: 2^(E - 16) (the ½ turns 2·value back into the E2M1 value).
//! That factor is also kept as its exponent `E - 16` (an i32 per block, with the row's least and
//! greatest), so a kernel whose weight factors are powers of two too (UE8M0) can form the product
//! of both by adding exponents instead of looking up and multiplying.

use rayon::prelude::*;

use super::Codec;

/// Vectors of 32 bytes per 32-element block.
pub const VECTORS_PER_BLOCK: usize = 5;

/// Elements per fixed-point block (and per chunk of the kernel).
pub const BLOCK: usize = 32;

/// Blocks converted per parallel task at least.
const MIN_BLOCKS_PER_TASK: usize = 512;

/// Blocks whose largest magnitude is below 2^-111 are not converted (their scale would be an f32
/// subnormal); such a row, or one holding a NaN or an infinity, takes the f32 path instead.
const MIN_EXPONENT: i32 = -110;

/// Fixed-point rows: `rows` rows of `k` elements, each a whole-block prefix of `k` (the tail past
/// the last whole block stays with the f32 row).
#[derive(Debug, Default)]
pub struct FixedRows {
    blocks: usize,
    vectors: Vec<[i8; 32]>,
    scales: Vec<f32>,
    exponents: Vec<i32>,
    /// Per row: the least and greatest of its blocks' exponents, or `None` for a row that could
    /// not be converted.
    ranges: Vec<Option<(i32, i32)>>,
}

/// One row of [`FixedRows`], as the kernel reads it.
#[derive(Clone, Copy, Debug)]
pub struct FixedRow<'a> {
    /// [`VECTORS_PER_BLOCK`] vectors per block.
    pub vectors: &'a [[i8; 32]],
    /// One factor per block.
    pub scales: &'a [f32],
    /// Per block, the factor's exponent: `scales[b] == 2^exponents[b]` (an all-zero block, whose
    /// factor is 0, carries the row's least exponent: its sums are zero whatever it multiplies).
    pub exponents: &'a [i32],
    /// The least and greatest of `exponents`.
    pub exponent_range: (i32, i32),
}

impl FixedRows {
    /// Resizes for `rows` rows of `k` elements (buffers are reused; contents are rewritten by
    /// [`FixedRows::fill`]).
    pub fn reset(&mut self, rows: usize, k: usize) {
        self.blocks = k / BLOCK;
        self.vectors
            .resize(rows * self.blocks * VECTORS_PER_BLOCK, [0; 32]);
        self.scales.resize(rows * self.blocks, 0.0);
        self.exponents.resize(rows * self.blocks, 0);
        self.ranges.clear();
        self.ranges.resize(rows, None);
    }

    /// Converts every row, row `r` from `x_of(r)`, on the rayon pool when there are enough
    /// (rows are independent, so the split changes no bit).
    pub fn fill_all<'x>(&mut self, codec: Codec, x_of: impl Fn(usize) -> &'x [f32] + Sync) {
        if self.blocks == 0 {
            // Rows shorter than a block are all tail: the kernel reads their f32 values only.
            self.ranges.fill(Some((0, 0)));
            return;
        }
        let per = self.blocks * VECTORS_PER_BLOCK;
        let blocks = self.blocks;
        self.vectors
            .par_chunks_mut(per)
            .zip(self.scales.par_chunks_mut(blocks))
            .zip(self.exponents.par_chunks_mut(blocks))
            .zip(self.ranges.par_iter_mut())
            .enumerate()
            // A block converts in a few nanoseconds: splitting fewer than ~16 K elements
            // across threads costs more in wake-ups than it saves.
            .with_min_len(MIN_BLOCKS_PER_TASK.div_ceil(blocks))
            .for_each(|(r, (((vectors, scales), exponents), range))| {
                let out = BlockOut {
                    vectors,
                    scales,
                    exponents,
                };
                *range = fill_row(x_of(r), codec, out);
            });
    }

    /// Row `row`, or `None` when it could not be converted (non-finite or tiny values).
    pub fn row(&self, row: usize) -> Option<FixedRow<'_>> {
        let exponent_range = (*self.ranges.get(row)?)?;
        let (b0, b1) = (row * self.blocks, (row + 1) * self.blocks);
        Some(FixedRow {
            vectors: &self.vectors[b0 * VECTORS_PER_BLOCK..b1 * VECTORS_PER_BLOCK],
            scales: &self.scales[b0..b1],
            exponents: &self.exponents[b0..b1],
            exponent_range,
        })
    }
}

/// What a conversion made of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FixedBlock {
    /// Every element is ±0: all bytes zero.
    Zero,
    /// The block's largest magnitude is below `2^e` (and at least `2^(e-1)`); bytes written.
    Scaled(i32),
    /// A NaN or an infinity, or a largest magnitude whose exponent `e` is below `min_exponent`:
    /// the bytes are unspecified and the row takes the f32 path.
    Refused,
}

/// One row's share of the [`FixedRows`] buffers.
struct BlockOut<'a> {
    vectors: &'a mut [[i8; 32]],
    scales: &'a mut [f32],
    exponents: &'a mut [i32],
}

/// Fills one row's blocks and returns the range of their exponents; `None` when the row cannot
/// be represented.
fn fill_row(x: &[f32], codec: Codec, out: BlockOut<'_>) -> Option<(i32, i32)> {
    let mut range: Option<(i32, i32)> = None;
    for (b, ((vs, scale), exponent)) in out
        .vectors
        .chunks_exact_mut(VECTORS_PER_BLOCK)
        .zip(out.scales.iter_mut())
        .zip(out.exponents.iter_mut())
        .enumerate()
    {
        // (`chunks_exact_mut` yields whole blocks only.)
        let Ok(vs) = <&mut [[i8; 32]; VECTORS_PER_BLOCK]>::try_from(vs) else {
            return None;
        };
        let block = super::fixed_block(codec, &x[b * BLOCK..(b + 1) * BLOCK], MIN_EXPONENT, vs)
            .unwrap_or_else(|| scalar_block(x, codec, b, vs));
        (*scale, *exponent) = match block {
            FixedBlock::Refused => return None,
            FixedBlock::Zero => (0.0, i32::MAX),
            FixedBlock::Scaled(e) => {
                range = Some(range.map_or((e - 16, e - 16), |(lo, hi)| {
                    (lo.min(e - 16), hi.max(e - 16))
                }));
                (2f32.powi(e - 16), e - 16)
            }
        };
    }
    // All-zero blocks (and an all-zero row: exponent 0) take a value already in the range.
    let range = range.unwrap_or((0, 0));
    for e in out.exponents.iter_mut().filter(|e| **e == i32::MAX) {
        *e = range.0;
    }
    Some(range)
}

/// Block `b` of `x` (codec order) converted element by element: the definition the vector
/// conversion (`avx2_e2m1::fixed_block`) is tested against, and the path without AVX2.
fn scalar_block(
    x: &[f32],
    codec: Codec,
    b: usize,
    vs: &mut [[i8; 32]; VECTORS_PER_BLOCK],
) -> FixedBlock {
    let k = x.len();
    let vals: [f32; BLOCK] = std::array::from_fn(|i| x[codec.order_index(b * BLOCK + i, k)]);
    if vals.iter().any(|v| !v.is_finite()) {
        return FixedBlock::Refused;
    }
    let max = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
    *vs = [[0; 32]; VECTORS_PER_BLOCK];
    if max == 0.0 {
        return FixedBlock::Zero;
    }
    let e = super::exponent_above(max.to_bits());
    if e < MIN_EXPONENT {
        return FixedBlock::Refused;
    }
    let mul = 2f64.powi(15 - e);
    for (i, &v) in vals.iter().enumerate() {
        let q = round_to_i32(f64::from(v) * mul).clamp(-32767, 32767);
        let m = q.unsigned_abs();
        let (j, odd) = (i / 2, i % 2);
        // The E2M1 sign bit of this element's nibble: bit 3 (low nibble) or 7 (high).
        let flip = if q < 0 { 0x08u8 << (4 * odd) } else { 0 };
        for lane in [j, j + 16] {
            vs[2 * odd][lane] = (m >> 8) as i8;
            vs[2 * odd + 1][lane] = (m & 0xFF) as i8;
            vs[4][lane] = (vs[4][lane] as u8 | flip) as i8;
        }
    }
    FixedBlock::Scaled(e)
}

/// `y` rounded to the nearest integer, ties to even, for |y| < 2^51 (`|y| ≤ 2^15` here): adding
/// and removing 1.5 · 2^52 leaves no fraction bits, and the addition rounds as the FPU does.
/// (`f64::round_ties_even` is a libm call on baseline x86-64.)
#[inline]
fn round_to_i32(y: f64) -> i32 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52
    ((y + MAGIC) - MAGIC) as i32
}

/// The value row `r` stands for at natural position `n` (tests and the scalar check).
#[cfg(test)]
pub fn value(rows: &FixedRows, r: usize, n: usize) -> Option<f32> {
    let row = rows.row(r)?;
    let (b, i) = (n / BLOCK, n % BLOCK);
    let vs = &row.vectors[b * VECTORS_PER_BLOCK..(b + 1) * VECTORS_PER_BLOCK];
    let (j, odd) = (i / 2, i % 2);
    let m = (i32::from(vs[2 * odd][j] as u8) << 8) | i32::from(vs[2 * odd + 1][j] as u8);
    let negative = vs[4][j] as u8 & (0x08 << (4 * odd)) != 0;
    let q = if negative { -m } else { m };
    // factor = 2^(e - 16) carries the E2M1 ½: the value is q · 2^(e - 15) = q · 2 · factor.
    Some(q as f32 * 2.0 * row.scales[b])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;

    #[test]
    fn values_within_2_pow_minus_15_of_the_block_max_and_exact_for_narrow_bf16() {
        let k = 96;
        let mut rng = SeededRng::new(21);
        // Row 0: any f32 over six binades; row 1: bf16 values spanning at most 8 binades.
        let wide: Vec<f32> = (0..k)
            .map(|_| rng.uniform(-1.0, 1.0) * 2f32.powi(rng.below(6) as i32 - 3))
            .collect();
        let narrow: Vec<f32> = (0..k)
            .map(|_| {
                // |v| in [2^j / 2, 2^j), j < 8: exponents span at most 8 binades.
                let v = rng.uniform(0.5, 1.0)
                    * 2f32.powi(rng.below(8) as i32)
                    * if rng.below(2) == 0 { -1.0 } else { 1.0 };
                f32::from_bits(v.to_bits() & 0xFFFF_0000)
            })
            .collect();
        let mut rows_of = [FixedRows::default(), FixedRows::default()];
        for (r, x) in [&wide, &narrow].into_iter().enumerate() {
            // Codec order in, natural order back: the permutation is undone.
            let mut codec_x = vec![0f32; k];
            for (n, &v) in x.iter().enumerate() {
                codec_x[Codec::E2m1.order_index(n, k)] = v;
            }
            let mut one = FixedRows::default();
            one.reset(1, k);
            one.fill_all(Codec::E2m1, |_| &codec_x);
            let row = one.row(0).expect("finite");
            let nonzero: Vec<i32> = (0..k / BLOCK)
                .filter(|&b| row.scales[b] != 0.0)
                .map(|b| row.exponents[b])
                .collect();
            for b in (0..k / BLOCK).filter(|&b| row.scales[b] != 0.0) {
                assert_eq!(2f32.powi(row.exponents[b]), row.scales[b], "block {b}");
            }
            let (lo, hi) = (nonzero.iter().min(), nonzero.iter().max());
            assert_eq!(Some(row.exponent_range), lo.zip(hi).map(|(&l, &h)| (l, h)));
            rows_of[r] = one;
            for b in 0..k / BLOCK {
                let max = x[b * BLOCK..(b + 1) * BLOCK]
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()));
                for (n, &want) in x.iter().enumerate().skip(b * BLOCK).take(BLOCK) {
                    let got = value(&rows_of[r], 0, n).unwrap();
                    let err = (got - want).abs();
                    if r == 1 {
                        assert_eq!(got, want, "bf16 row, element {n}");
                    } else {
                        assert!(err <= max * 2f32.powi(-15), "element {n}: {got} vs {want}");
                    }
                }
            }
        }
    }

    /// The vector conversion writes the scalar conversion's bytes and verdict for every kind of
    /// block: random magnitudes over many binades, exact ties (x · 2^(15-e) = n + ½), the largest
    /// magnitude rounding up to 2^15 (clamped), signed zeros, tiny and subnormal maxima, NaN, ±∞.
    #[test]
    fn vector_conversion_writes_the_scalar_bytes() {
        let probe = [[0i8; 32]; VECTORS_PER_BLOCK];
        if super::super::fixed_block(Codec::E2m1, &[0.0; BLOCK], MIN_EXPONENT, &mut probe.clone())
            .is_none()
        {
            eprintln!("skipped: no vector conversion on this CPU");
            return;
        }
        let mut rng = SeededRng::new(33);
        eprintln!("seed 33");
        let mut blocks: Vec<[f32; BLOCK]> = Vec::new();
        for case in 0..2000 {
            let e = rng.below(40) as i32 - 20;
            let mut v: [f32; BLOCK] = std::array::from_fn(|_| {
                let mag = rng.uniform(0.0, 1.0) * 2f32.powi(e - rng.below(12) as i32);
                if rng.below(2) == 0 {
                    -mag
                } else {
                    mag
                }
            });
            match case % 8 {
                // Ties: with max in [2^(e-1), 2^e), x = (n + ½) · 2^(e-15) is exactly a tie.
                1 => {
                    v[0] = 1.5 * 2f32.powi(e - 1);
                    for (i, x) in v.iter_mut().enumerate().skip(1) {
                        let n = rng.below(20000) as f32 + 0.5;
                        *x = n * 2f32.powi(e - 15) * if i % 2 == 0 { 1.0 } else { -1.0 };
                    }
                }
                // A largest magnitude just below 2^e rounds to 2^15 and is clamped.
                2 => v[5] = -f32::from_bits((2f32.powi(e).to_bits()) - 1),
                3 => v
                    .iter_mut()
                    .for_each(|x| *x = if rng.below(2) == 0 { 0.0 } else { -0.0 }),
                4 => v.iter_mut().for_each(|x| *x *= 2f32.powi(-100)),
                5 => v
                    .iter_mut()
                    .for_each(|x| *x = f32::from_bits(rng.below(1 << 23) as u32)),
                6 => {
                    v[rng.below(32) as usize] =
                        [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][case % 3]
                }
                _ => {}
            }
            blocks.push(v);
        }
        for (n, block) in blocks.iter().enumerate() {
            let (mut by_vector, mut by_scalar) = (probe, probe);
            let got = super::super::fixed_block(Codec::E2m1, block, MIN_EXPONENT, &mut by_vector);
            let want = scalar_block(block, Codec::E2m1, 0, &mut by_scalar);
            assert_eq!(got, Some(want), "block {n}: {block:?}");
            if want != FixedBlock::Refused {
                assert_eq!(by_vector, by_scalar, "block {n}: {block:?}");
            }
        }
    }

    #[test]
    fn zero_blocks_are_zero_and_unrepresentable_rows_are_refused() {
        let k = 64;
        let mut rows = FixedRows::default();
        rows.reset(4, k);
        let zeros = vec![0f32; k];
        let mut nan = vec![1f32; k];
        nan[40] = f32::NAN;
        let mut inf = vec![1f32; k];
        inf[3] = f32::NEG_INFINITY;
        let tiny = vec![1e-35f32; k];
        let all = [&zeros, &nan, &inf, &tiny];
        rows.fill_all(Codec::E2m1, |r| all[r]);
        assert!((0..k).all(|n| value(&rows, 0, n) == Some(0.0)));
        // An all-zero row's blocks carry exponent 0 (any finite factor serves a zero sum).
        let zero_row = rows.row(0).expect("zeros convert");
        assert_eq!(zero_row.exponent_range, (0, 0));
        assert!(zero_row.exponents.iter().all(|&e| e == 0));
        assert!(rows.row(1).is_none(), "NaN");
        assert!(rows.row(2).is_none(), "infinity");
        assert!(rows.row(3).is_none(), "below 2^-111");
        assert!(rows.row(4).is_none(), "past the last row");
    }
}
