//! AVX2 kernels for E2M1 (mxfp4, nvfp4) weights: two rows per register.
//!
//! Design decision: 16 bytes of a row (32 elements, one mxfp4 block or two nvfp4 blocks) fill one
//! 128-bit lane, the same 16 bytes of the next row the other lane. `vpshufb` looks the 32 nibbles
//! up in two 16-entry tables (high and low byte of each value's bf16 pattern), byte unpacks pair
//! them into bf16 words, and a shift or a mask widens those to f32: ~20 simple ops per 64 weights,
//! no cross-lane shuffle. Both lanes hold the same columns, so activations are 128-bit broadcasts
//! (pure loads); the lane order this produces is the E2M1 codec order of `Codec::order_index`.
//!
//! Each 32-element chunk yields 8 vectors; vector q holds positions 4q..4q+4 of each row's chunk,
//! elements 0..16 (the first nvfp4 block) for q in {0, 1, 4, 5}, 16..32 for q in {2, 3, 6, 7}.

use std::arch::x86_64::*;

use super::fixed::{FixedBlock, FixedRow, VECTORS_PER_BLOCK};
use super::{RowFormat, Scale, MAX_TILE_TOKENS};

/// Elements per chunk (16 bytes of one row).
const CHUNK32: usize = 32;
/// Tiles ahead that software prefetch reaches (hardware prefetch alone leaves the one-token
/// kernel waiting on memory).
const PREFETCH_TILES: usize = 2;

/// The two byte tables (high, low byte of the bf16 pattern of each E2M1 code), in both lanes.
#[derive(Clone, Copy)]
struct Tables {
    high: __m256i,
    low: __m256i,
}

#[target_feature(enable = "avx2,fma")]
fn tables() -> Tables {
    let mut high = [0u8; 16];
    let mut low = [0u8; 16];
    for code in 0..16u8 {
        let bits = (super::e2m1_value(code).to_bits() >> 16) as u16;
        high[usize::from(code)] = (bits >> 8) as u8;
        low[usize::from(code)] = bits as u8;
    }
    let lane = |t: [u8; 16]| {
        _mm256_broadcastsi128_si256(_mm_set_epi64x(
            i64::from_le_bytes(t[8..].try_into().unwrap_or_default()),
            i64::from_le_bytes(t[..8].try_into().unwrap_or_default()),
        ))
    };
    Tables {
        high: lane(high),
        low: lane(low),
    }
}

/// The packed bytes of the chunk at element `c` of two rows, one row per 128-bit lane.
///
/// # Safety
/// `r0` and `r1` readable for `c / 2 + 16` bytes; AVX2 available.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pair_chunk(r0: *const u8, r1: *const u8, c: usize) -> __m256i {
    // SAFETY: per the contract ([16] bytes of packed E2M1 pairs per row at element c).
    unsafe {
        _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(r0.add(c / 2) as *const __m128i)),
            _mm_loadu_si128(r1.add(c / 2) as *const __m128i),
        )
    }
}

/// The low and the high nibbles of each byte, as `vpshufb` indices (even and odd elements).
#[target_feature(enable = "avx2,fma")]
#[inline]
fn nibbles(v: __m256i) -> (__m256i, __m256i) {
    let nib = _mm256_set1_epi8(0x0F);
    (
        _mm256_and_si256(v, nib),
        _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib),
    )
}

/// The bf16 words of a chunk of two rows: `[lo nibbles 0..8, lo 8..16, hi 0..8, hi 8..16]` of
/// each lane's bytes.
///
/// # Safety
/// `r0` and `r1` readable for `c / 2 + 16` bytes; AVX2 available.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn words(t: Tables, r0: *const u8, r1: *const u8, c: usize) -> [__m256i; 4] {
    // SAFETY: forwarded.
    let (lo, hi) = nibbles(unsafe { pair_chunk(r0, r1, c) });
    let (hl, ll) = (
        _mm256_shuffle_epi8(t.high, lo),
        _mm256_shuffle_epi8(t.low, lo),
    );
    let (hh, lh) = (
        _mm256_shuffle_epi8(t.high, hi),
        _mm256_shuffle_epi8(t.low, hi),
    );
    [
        _mm256_unpacklo_epi8(ll, hl),
        _mm256_unpackhi_epi8(ll, hl),
        _mm256_unpacklo_epi8(lh, hh),
        _mm256_unpackhi_epi8(lh, hh),
    ]
}

/// Vector q (0..8) of a chunk from its words: even words by a shift, odd words by a mask.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn vector(w: &[__m256i; 4], q: usize) -> __m256 {
    let word = w[q >> 1];
    let v = if q & 1 == 0 {
        _mm256_slli_epi32::<16>(word)
    } else {
        _mm256_and_si256(word, _mm256_set1_epi32(0xFFFF_0000_u32 as i32))
    };
    _mm256_castsi256_ps(v)
}

/// Whether vector q holds the chunk's second 16 elements.
#[inline(always)]
fn second_half(q: usize) -> bool {
    (q >> 1) & 1 == 1
}

/// The factors of group `g` of two rows, one per lane.
///
/// # Safety
/// `s0`, `s1` hold the rows' scale bytes (group `g` included); `table` has 256 entries.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn lane_factors(table: *const f32, s0: *const u8, s1: *const u8, g: usize) -> __m256 {
    // SAFETY: per the contract.
    // Two broadcast loads and a blend: no shuffle.
    unsafe {
        let lo = _mm256_broadcast_ss(&*table.add(usize::from(*s0.add(g))));
        let hi = _mm256_broadcast_ss(&*table.add(usize::from(*s1.add(g))));
        _mm256_blend_ps::<0xF0>(lo, hi)
    }
}

/// The sums of the 4 lanes of each 128-bit half: (row of lane 0, row of lane 1).
#[target_feature(enable = "avx2,fma")]
fn hsum_halves(v: __m256) -> (f32, f32) {
    let half = |h: __m128| {
        let d = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps::<0b01>(d, d)))
    };
    (
        half(_mm256_castps256_ps128(v)),
        half(_mm256_extractf128_ps::<1>(v)),
    )
}

/// `P` pairs of rows × `N` tokens. One token sums each group's products before its factor (one
/// FMA per group); more tokens multiply each decoded vector by its factor and share it.
///
/// # Safety
/// AVX2+FMA; rows hold `fmt.row_bytes()`, scales `fmt.scale_bytes()`, xs `fmt.k` f32; the
/// format is E2M1 with a table scale and 16- or 32-element groups.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const P: usize, const N: usize>(
    fmt: &RowFormat<'_>,
    rows: [[*const u8; 2]; P],
    scales: [[*const u8; 2]; P],
    xs: [*const f32; N],
) -> [[[f32; N]; 2]; P] {
    let table = match fmt.scale {
        Scale::Table(t) => t.as_ptr(),
        // `check` pairs E2M1 with a table; a null table is never read when no group runs.
        _ => std::ptr::null(),
    };
    let t = tables();
    let k = fmt.k;
    let halves = fmt.group == 16;
    let vec_end = k - k % CHUNK32;
    let zero = _mm256_setzero_ps();
    let mut acc = [[zero; N]; P];
    // Groups per chunk (1 for mxfp4, 2 for nvfp4), stepped instead of divided per chunk.
    let groups_per_chunk = CHUNK32 / fmt.group;
    let mut c = 0;
    let mut g = 0;
    while c < vec_end {
        // `g`: the group of the chunk's first half (the second half's is g + 1 when halves).
        // Weights stream from memory: hint the rows of the tile after the next (the next rows
        // when, as usual, they are consecutive) at this column; a hint is never dereferenced.
        // One hint per 64-byte line of each row (a chunk is 16 bytes of a row).
        if c % (4 * CHUNK32) == 0 {
            let ahead = PREFETCH_TILES * 2 * P * fmt.row_bytes() + c / 2;
            for pair in &rows {
                for row in pair {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(ahead) as *const i8);
                }
            }
        }
        if N == 1 {
            // All pairs decoded first, so each activation broadcast serves every pair.
            let mut w = [[_mm256_setzero_si256(); 4]; P];
            for p in 0..P {
                // SAFETY: c + 32 ≤ k, and every row covers its row.
                w[p] = unsafe { words(t, rows[p][0], rows[p][1], c) };
            }
            let (mut sa, mut sb) = ([zero; P], [zero; P]);
            for q in 0..8 {
                // SAFETY: c + 4q + 4 ≤ k.
                let x = unsafe { _mm256_broadcast_ps(&*(xs[0].add(c + 4 * q) as *const __m128)) };
                for p in 0..P {
                    if second_half(q) {
                        sb[p] = _mm256_fmadd_ps(vector(&w[p], q), x, sb[p]);
                    } else {
                        sa[p] = _mm256_fmadd_ps(vector(&w[p], q), x, sa[p]);
                    }
                }
            }
            for p in 0..P {
                // SAFETY: the scale slices cover groups g (and g + 1 when halves).
                let fa = unsafe { lane_factors(table, scales[p][0], scales[p][1], g) };
                if halves {
                    let fb = unsafe { lane_factors(table, scales[p][0], scales[p][1], g + 1) };
                    acc[p][0] = _mm256_fmadd_ps(sb[p], fb, _mm256_fmadd_ps(sa[p], fa, acc[p][0]));
                } else {
                    acc[p][0] = _mm256_fmadd_ps(_mm256_add_ps(sa[p], sb[p]), fa, acc[p][0]);
                }
            }
        } else {
            for p in 0..P {
                // SAFETY: c + 32 ≤ k, and every row and scale slice covers its row.
                let w = unsafe { words(t, rows[p][0], rows[p][1], c) };
                let fa = unsafe { lane_factors(table, scales[p][0], scales[p][1], g) };
                let fb = if halves {
                    unsafe { lane_factors(table, scales[p][0], scales[p][1], g + 1) }
                } else {
                    fa
                };
                for q in 0..8 {
                    let wv = _mm256_mul_ps(vector(&w, q), if second_half(q) { fb } else { fa });
                    for tk in 0..N {
                        // SAFETY: c + 4q + 4 ≤ k.
                        let x = unsafe {
                            _mm256_broadcast_ps(&*(xs[tk].add(c + 4 * q) as *const __m128))
                        };
                        acc[p][tk] = _mm256_fmadd_ps(wv, x, acc[p][tk]);
                    }
                }
            }
        }
        c += CHUNK32;
        g += groups_per_chunk;
    }
    let mut out = [[[0f32; N]; 2]; P];
    for p in 0..P {
        for tk in 0..N {
            let (a, b) = hsum_halves(acc[p][tk]);
            out[p][0][tk] = a;
            out[p][1][tk] = b;
        }
    }
    // A last half chunk (nvfp4 rows of 16·odd elements), natural order, scalar.
    for pos in vec_end..k {
        for p in 0..P {
            for (l, o) in out[p].iter_mut().enumerate() {
                // SAFETY: the row holds k / 2 bytes and its scale bytes cover group pos / group.
                let (row, s) = unsafe {
                    (
                        std::slice::from_raw_parts(rows[p][l], fmt.row_bytes()),
                        std::slice::from_raw_parts(scales[p][l], fmt.scale_bytes()),
                    )
                };
                let wp = fmt.codec.raw(row, pos, k) * fmt.factor(s, pos / fmt.group);
                for (tk, v) in o.iter_mut().enumerate() {
                    // SAFETY: pos < k.
                    *v += wp * unsafe { *xs[tk].add(pos) };
                }
            }
        }
    }
    if fmt.out_mul != 1.0 {
        for v in out.iter_mut().flatten().flatten() {
            *v *= fmt.out_mul;
        }
    }
    out
}

/// Runs pair tiles over all rows (an odd last row is paired with itself and its copy dropped).
#[target_feature(enable = "avx2,fma")]
unsafe fn tiles<const P: usize, const N: usize>(
    fmt: &RowFormat<'_>,
    rows: &[&[u8]],
    scales: &[&[u8]],
    xs: &[&[f32]],
    out: &mut [f32],
) {
    let xs_arr: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    let step = 2 * P;
    let mut r0 = 0;
    while r0 < rows.len() {
        let nr = step.min(rows.len() - r0);
        let pick = |i: usize| r0 + if i < nr { i } else { nr - 1 };
        let rows_arr: [[*const u8; 2]; P] =
            std::array::from_fn(|p| [rows[pick(2 * p)].as_ptr(), rows[pick(2 * p + 1)].as_ptr()]);
        let scale_arr: [[*const u8; 2]; P] = std::array::from_fn(|p| {
            [
                scales[pick(2 * p)].as_ptr(),
                scales[pick(2 * p + 1)].as_ptr(),
            ]
        });
        // SAFETY: forwarded from the caller (lengths checked by `dot_rows`).
        let res = unsafe { tile::<P, N>(fmt, rows_arr, scale_arr, xs_arr) };
        for i in 0..nr {
            out[(r0 + i) * N..(r0 + i + 1) * N].copy_from_slice(&res[i / 2][i % 2]);
        }
        r0 += nr;
    }
}

/// # Safety
/// AVX2+FMA available and the lengths `super::dot_rows` checks; E2M1 format.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_rows(
    fmt: &RowFormat<'_>,
    rows: &[&[u8]],
    scales: &[&[u8]],
    xs: &[&[f32]],
    out: &mut [f32],
) {
    debug_assert!(xs.len() <= MAX_TILE_TOKENS);
    // SAFETY: forwarded. One token: 2 pairs (4 rows) share each activation load; more tokens:
    // 1 pair, so N accumulators, 4 word vectors and 2 factor vectors fit 16 registers.
    unsafe {
        match xs.len() {
            1 => tiles::<2, 1>(fmt, rows, scales, xs, out),
            2 => tiles::<1, 2>(fmt, rows, scales, xs, out),
            3 => tiles::<1, 3>(fmt, rows, scales, xs, out),
            _ => tiles::<1, 4>(fmt, rows, scales, xs, out),
        }
    }
}

/// 2 · value of every E2M1 code as a signed byte (the integer kernel's weights).
const DOUBLED_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Where the integer kernel's row factors come from.
#[derive(Clone, Copy, Debug)]
pub enum GroupFactors<'a> {
    /// Each row's scale bytes (`scale_bytes` a row, back to back) through the format's table,
    /// times the activation block's factor.
    Table(&'a [u8]),
    /// UE8M0 bytes of row pairs interleaved per 32-element group (`super::PairScales`): the
    /// factor is `2^(s - 127)` times the activation block's `2^exponent`, built as the f32 bits
    /// `(s + exponent) << 23`. The caller has checked that every such sum is a normal exponent
    /// (1..=254), so this is the same power of two the table path multiplies out.
    PairExponents(&'a [u8]),
}

/// One token against rows, in integers (`super::fixed`): two rows per register as in [`tile`]
/// (row `r` at `data + r · row_bytes`). Each 32-element chunk gives one 32-bit partial sum per 8
/// positions (lanes 0..4 row 0, 4..8 row 1; lane n holds positions 8n..8n + 8 of its row's
/// chunk), scaled by the row's group factor times the activation block's factor and added into
/// f32.
///
/// # Safety
/// AVX2+FMA; `data` holds `out.len()` rows of `fmt.row_bytes()`; the factors cover them
/// (`fmt.scale_bytes()` a row for a table; 2 bytes a group for each started row pair, with
/// `fmt.group == 32`); `x` (codec order, read for the tail) `fmt.k` f32; `fx` the fixed-point
/// form of `x` with `fmt.k / 32` blocks; E2M1 with a table scale and 16- or 32-element groups.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_rows_fixed(
    fmt: &RowFormat<'_>,
    data: &[u8],
    factors: GroupFactors<'_>,
    x: &[f32],
    fx: FixedRow<'_>,
    out: &mut [f32],
) {
    // SAFETY: forwarded; one monomorphic loop per factor source.
    unsafe {
        match factors {
            GroupFactors::Table(scales) => fixed_rows::<false>(fmt, data, scales, x, fx, out),
            GroupFactors::PairExponents(pairs) => fixed_rows::<true>(fmt, data, pairs, x, fx, out),
        }
    }
}

/// [`dot_rows_fixed`] for one factor source: `PAIRS` reads `scales` as
/// [`GroupFactors::PairExponents`], else as [`GroupFactors::Table`].
#[target_feature(enable = "avx2,fma")]
unsafe fn fixed_rows<const PAIRS: bool>(
    fmt: &RowFormat<'_>,
    data: &[u8],
    scales: &[u8],
    x: &[f32],
    fx: FixedRow<'_>,
    out: &mut [f32],
) {
    let table = match fmt.scale {
        Scale::Table(t) => t.as_ptr(),
        // `check` pairs E2M1 with a table; a null table is never read when no group runs.
        _ => std::ptr::null(),
    };
    let (k, rb, sb) = (fmt.k, fmt.row_bytes(), fmt.scale_bytes());
    let vec_end = k - k % CHUNK32;
    // SAFETY: 16 bytes.
    let doubled = _mm256_broadcastsi128_si256(unsafe {
        _mm_loadu_si128(DOUBLED_VALUES.as_ptr() as *const __m128i)
    });
    let high_weight = _mm256_set1_epi16(256);
    let ones = _mm256_set1_epi16(1);
    // A pair's 16-bit scale word spread to the low byte of each lane: byte 0 (row 0's scale)
    // to lanes 0..4, byte 1 (row 1's) to lanes 4..8; -1 zeroes the other bytes.
    let spread = _mm256_setr_epi8(
        0, -1, -1, -1, 0, -1, -1, -1, 0, -1, -1, -1, 0, -1, -1, -1, //
        1, -1, -1, -1, 1, -1, -1, -1, 1, -1, -1, -1, 1, -1, -1, -1,
    );
    let halves = fmt.group == 16;
    let groups_per_chunk = CHUNK32 / fmt.group;
    let xv = fx.vectors.as_ptr() as *const __m256i;
    let n = out.len();
    let mut r = 0;
    while r < n {
        let r1 = (r + 1).min(n - 1);
        let rows = [
            data.as_ptr().wrapping_add(r * rb),
            data.as_ptr().wrapping_add(r1 * rb),
        ];
        let srows = [
            scales.as_ptr().wrapping_add(r * sb),
            scales.as_ptr().wrapping_add(r1 * sb),
        ];
        // PAIRS: this pair's words (one per group; the pair starts at row r, r even).
        let words = scales.as_ptr().wrapping_add(r * sb) as *const i16;
        let mut acc = _mm256_setzero_ps();
        let (mut c, mut g, mut b) = (0, 0, 0);
        while c < vec_end {
            // Weights stream from memory: hint the rows two pairs ahead at this column (hints
            // past the end are never dereferenced), one per 64-byte line of each row.
            if c % (4 * CHUNK32) == 0 {
                let ahead = PREFETCH_TILES * 2 * rb + c / 2;
                for row in rows {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(ahead) as *const i8);
                }
            }
            // SAFETY: rows r, r1 < n hold k / 2 ≥ c / 2 + 16 bytes; block b < k / 32 has its
            // vectors, factor and exponent; the scale bytes cover group g (and g + 1 when
            // halves), the pair words word b of pair r / 2.
            unsafe {
                let xb = xv.add(b * VECTORS_PER_BLOCK);
                // The activations' signs flip the nibbles' sign bits: the lookup then gives
                // 2·value·sign(x) for the even positions (low nibbles) and the odd ones.
                let (lo, hi) = nibbles(_mm256_xor_si256(
                    pair_chunk(rows[0], rows[1], c),
                    _mm256_loadu_si256(xb.add(4)),
                ));
                let even = _mm256_shuffle_epi8(doubled, lo);
                let odd = _mm256_shuffle_epi8(doubled, hi);
                // |byte products| ≤ 255 · 12: pair sums, then even + odd, stay within i16.
                let high = _mm256_add_epi16(
                    _mm256_maddubs_epi16(_mm256_loadu_si256(xb), even),
                    _mm256_maddubs_epi16(_mm256_loadu_si256(xb.add(2)), odd),
                );
                let low = _mm256_add_epi16(
                    _mm256_maddubs_epi16(_mm256_loadu_si256(xb.add(1)), even),
                    _mm256_maddubs_epi16(_mm256_loadu_si256(xb.add(3)), odd),
                );
                let sums = _mm256_add_epi32(
                    _mm256_madd_epi16(high, high_weight),
                    _mm256_madd_epi16(low, ones),
                );
                let f = if PAIRS {
                    let word = _mm256_set1_epi16(words.add(b).read_unaligned());
                    let exponent = _mm256_add_epi32(
                        _mm256_shuffle_epi8(word, spread),
                        _mm256_set1_epi32(*fx.exponents.as_ptr().add(b)),
                    );
                    _mm256_castsi256_ps(_mm256_slli_epi32::<23>(exponent))
                } else {
                    let fa = lane_factors(table, srows[0], srows[1], g);
                    let f = if halves {
                        // Lanes 2, 3 (and 6, 7) hold the chunk's second 16 positions: group g + 1.
                        let fb = lane_factors(table, srows[0], srows[1], g + 1);
                        _mm256_blend_ps::<0b1100_1100>(fa, fb)
                    } else {
                        fa
                    };
                    _mm256_mul_ps(f, _mm256_broadcast_ss(&*fx.scales.as_ptr().add(b)))
                };
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), f, acc);
            }
            c += CHUNK32;
            g += groups_per_chunk;
            b += 1;
        }
        let (a0, a1) = hsum_halves(acc);
        let mut res = [a0, a1];
        // A last half chunk (nvfp4 rows of 16·odd elements): natural order, f32.
        for (pos, &xp) in x.iter().enumerate().take(k).skip(vec_end) {
            for (l, o) in res.iter_mut().enumerate() {
                let rl = if l == 0 { r } else { r1 };
                let row = &data[rl * rb..(rl + 1) * rb];
                // (A tail exists only for nvfp4 rows, whose factors are a table's.)
                let s = &scales[rl * sb..(rl + 1) * sb];
                *o += fmt.codec.raw(row, pos, k) * fmt.factor(s, pos / fmt.group) * xp;
            }
        }
        out[r] = res[0] * fmt.out_mul;
        if r1 != r {
            out[r1] = res[1] * fmt.out_mul;
        }
        r += 2;
    }
}

/// Converts one 32-element block of an activation row, given in E2M1 codec order (vector q of
/// the chunk holds natural elements `16·(q/2 mod 2) + 4i + 2·(q mod 2) + q/4`), into the five
/// fixed-point vectors `super::fixed` describes — the same bytes as its scalar conversion (tested).
///
/// Codec vectors 0..4 hold the even elements and 4..8 the odd ones, each pair of vectors in the
/// pair order j = [0, 2, 4, 6, 1, 3, 5, 7] (+8 for the second pair): a 32 → 16-bit pack puts
/// even j in the low lane and odd j in the high lane, a 16 → 8-bit pack puts high bytes beside
/// low bytes, and one byte unpack of the two lanes interleaves them back into j order.
///
/// # Safety
/// AVX2 available; `x` readable for 32 f32.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn fixed_block(x: *const f32, min_exponent: i32, vs: &mut [[i8; 32]; 5]) -> FixedBlock {
    // SAFETY: 32 f32 readable per the contract.
    let xv: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.add(8 * i)) });
    // Magnitudes as bits: for non-negative floats their order is the integers' order, and
    // anything from 0x7F80_0000 up is an infinity or a NaN.
    let magnitude = _mm256_set1_epi32(0x7FFF_FFFF);
    let bits = xv.map(|v| _mm256_and_si256(_mm256_castps_si256(v), magnitude));
    let mut m = _mm256_max_epi32(
        _mm256_max_epi32(bits[0], bits[1]),
        _mm256_max_epi32(bits[2], bits[3]),
    );
    m = _mm256_max_epi32(m, _mm256_permute2x128_si256::<1>(m, m));
    m = _mm256_max_epi32(m, _mm256_shuffle_epi32::<0b0100_1110>(m));
    m = _mm256_max_epi32(m, _mm256_shuffle_epi32::<0b1011_0001>(m));
    let max_bits = _mm256_cvtsi256_si32(m) as u32;
    if max_bits >= 0x7F80_0000 {
        return FixedBlock::Refused;
    }
    if max_bits == 0 {
        *vs = [[0; 32]; 5];
        return FixedBlock::Zero;
    }
    let e = super::exponent_above(max_bits);
    if e < min_exponent {
        return FixedBlock::Refused;
    }
    // × 2^(15 - e) is exact (a normal power of two for e in -110..=129), and the conversion
    // rounds to nearest, ties to even, as the scalar path does.
    let mul = _mm256_castsi256_ps(_mm256_set1_epi32((142 - e) << 23));
    let (lo_q, hi_q) = (_mm256_set1_epi32(-32767), _mm256_set1_epi32(32767));
    let q = xv.map(|v| {
        let r = _mm256_cvtps_epi32(_mm256_mul_ps(v, mul));
        _mm256_min_epi32(_mm256_max_epi32(r, lo_q), hi_q)
    });
    let zero = _mm256_setzero_si256();
    let negative = q.map(|v| _mm256_cmpgt_epi32(zero, v));
    let low_byte = _mm256_set1_epi16(0x00FF);
    // Packed bytes come out with even j in the low lane and odd j in the high one, each lane's
    // low 8 bytes one quantity and high 8 another: interleaving the lanes gives both in j order.
    let in_j_order = |packed: __m256i| {
        let (even_j, odd_j) = (
            _mm256_castsi256_si128(packed),
            _mm256_extracti128_si256::<1>(packed),
        );
        (
            _mm_unpacklo_epi8(even_j, odd_j),
            _mm_unpackhi_epi8(even_j, odd_j),
        )
    };
    // (High bytes, low bytes) of |q| for 16 elements from two codec vectors, in j order.
    let bytes = |a: __m256i, b: __m256i| {
        let words = _mm256_packus_epi32(_mm256_abs_epi32(a), _mm256_abs_epi32(b));
        in_j_order(_mm256_packus_epi16(
            _mm256_srli_epi16::<8>(words),
            _mm256_and_si256(words, low_byte),
        ))
    };
    let both_lanes = |v: __m128i| _mm256_set_m128i(v, v);
    let (even_high, even_low) = bytes(q[0], q[1]);
    let (odd_high, odd_low) = bytes(q[2], q[3]);
    // Sign masks: -1 bytes for negative elements (even elements, odd elements), in j order.
    let (even_signs, odd_signs) = in_j_order(_mm256_packs_epi16(
        _mm256_packs_epi32(negative[0], negative[1]),
        _mm256_packs_epi32(negative[2], negative[3]),
    ));
    let flips = _mm_or_si128(
        _mm_and_si128(even_signs, _mm_set1_epi8(0x08)),
        _mm_and_si128(odd_signs, _mm_set1_epi8(0x80u8 as i8)),
    );
    for (dst, v) in vs
        .iter_mut()
        .zip([even_high, even_low, odd_high, odd_low, flips])
    {
        // SAFETY: 32 writable bytes.
        unsafe { _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, both_lanes(v)) };
    }
    FixedBlock::Scaled(e)
}

/// Decodes rows (weights = value × factor, codec order) into `out[r * k..]`, two at a time.
///
/// # Safety
/// AVX2+FMA; rows hold `fmt.row_bytes()`, scales `fmt.scale_bytes()`, `out` `rows.len() * k`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn decode_rows(fmt: &RowFormat<'_>, rows: &[&[u8]], scales: &[&[u8]], out: &mut [f32]) {
    let table = match fmt.scale {
        Scale::Table(t) => t.as_ptr(),
        _ => std::ptr::null(),
    };
    let t = tables();
    let k = fmt.k;
    let halves = fmt.group == 16;
    let vec_end = k - k % CHUNK32;
    let mut r = 0;
    while r < rows.len() {
        let r1 = (r + 1).min(rows.len() - 1);
        let groups_per_chunk = CHUNK32 / fmt.group;
        let mut c = 0;
        let mut g = 0;
        while c < vec_end {
            // SAFETY: c + 32 ≤ k; rows r and r1 and their scales cover the chunk and group(s).
            unsafe {
                let w = words(t, rows[r].as_ptr(), rows[r1].as_ptr(), c);
                let fa = lane_factors(table, scales[r].as_ptr(), scales[r1].as_ptr(), g);
                let fb = if halves {
                    lane_factors(table, scales[r].as_ptr(), scales[r1].as_ptr(), g + 1)
                } else {
                    fa
                };
                for q in 0..8 {
                    let v = _mm256_mul_ps(vector(&w, q), if second_half(q) { fb } else { fa });
                    _mm_storeu_ps(
                        out.as_mut_ptr().add(r * k + c + 4 * q),
                        _mm256_castps256_ps128(v),
                    );
                    if r1 != r {
                        _mm_storeu_ps(
                            out.as_mut_ptr().add(r1 * k + c + 4 * q),
                            _mm256_extractf128_ps::<1>(v),
                        );
                    }
                }
            }
            c += CHUNK32;
            g += groups_per_chunk;
        }
        for row in [r, r1] {
            for pos in vec_end..k {
                out[row * k + pos] =
                    fmt.codec.raw(rows[row], pos, k) * fmt.factor(scales[row], pos / fmt.group);
            }
        }
        r += 2;
    }
}
