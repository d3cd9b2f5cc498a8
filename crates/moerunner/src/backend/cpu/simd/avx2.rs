//! The AVX2+FMA kernels of the codecs decoded one row per register (f32, bf16, E4M3): register
//! tiles of `R` rows × `N` tokens over 16-element chunks, and row decoding into f32. E2M1 has its
//! own two-rows-per-register kernels (`avx2_e2m1`).

use std::arch::x86_64::*;

use super::{Codec, RowFormat, Scale, CHUNK, MAX_TILE_TOKENS};

/// One codec's in-register decoder: 16 elements at a row's element offset `c` into two
/// vectors of raw values (codec order).
trait Decode {
    const CODEC: Codec;
    /// # Safety
    /// `row` must be readable for `Self::CODEC.bytes(c + 16)` bytes; AVX2 must be available.
    unsafe fn load(row: *const u8, c: usize) -> (__m256, __m256);
}

struct F32;
struct Bf16;
struct E4m3;

impl Decode for F32 {
    const CODEC: Codec = Codec::F32;
    #[inline(always)]
    unsafe fn load(row: *const u8, c: usize) -> (__m256, __m256) {
        // SAFETY: the caller guarantees 16 f32 at element c ([16] f32, unaligned).
        unsafe {
            let p = row.add(4 * c) as *const f32;
            (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        }
    }
}

impl Decode for Bf16 {
    const CODEC: Codec = Codec::Bf16;
    #[inline(always)]
    unsafe fn load(row: *const u8, c: usize) -> (__m256, __m256) {
        // SAFETY: the caller guarantees 32 bytes ([16] bf16) at element c.
        unsafe {
            // Each 32-bit word holds elements 2i (low half) and 2i + 1 (high half); bf16 is
            // the top half of an f32, so a shift gives the evens and a mask the odds.
            let v = _mm256_loadu_si256(row.add(2 * c) as *const __m256i);
            let even = _mm256_slli_epi32::<16>(v);
            let odd = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF_0000_u32 as i32));
            (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
        }
    }
}

impl Decode for E4m3 {
    const CODEC: Codec = Codec::E4m3;
    #[inline(always)]
    unsafe fn load(row: *const u8, c: usize) -> (__m256, __m256) {
        // SAFETY: the caller guarantees 16 bytes ([16] E4M3) at element c.
        unsafe {
            // Sign-extend the bytes to 16 bits: each 32-bit lane holds element 2i (low half) and
            // 2i + 1 (high half), and bit 11 of each half is a copy of its sign. Shifting the
            // lane left by 20 (evens) or 4 (odds) puts that copy at bit 31 and the 7 magnitude
            // bits at 20..27; the mask keeps them and drops the other half (pair-split order, as
            // bf16): five ops per 16 elements where widening each byte to 32 bits took seven.
            let mask = _mm256_set1_epi32(0x87F0_0000_u32 as i32);
            let v = _mm256_cvtepi8_epi16(_mm_loadu_si128(row.add(c) as *const __m128i));
            let even = _mm256_and_si256(_mm256_slli_epi32::<20>(v), mask);
            let odd = _mm256_and_si256(_mm256_slli_epi32::<4>(v), mask);
            (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
        }
    }
}

/// Scale kinds as const parameters (the `Scale` variant, data hoisted out of the loops).
const NO_SCALE: u8 = 0;
const F32_SCALE: u8 = 1;
const TABLE_SCALE: u8 = 2;

/// What the loops need of a `Scale`: the multiplier of f32 scales, or the table.
#[derive(Clone, Copy)]
struct ScaleArgs {
    mul: f32,
    table: *const f32,
}

impl ScaleArgs {
    fn of(scale: Scale<'_>) -> ScaleArgs {
        match scale {
            Scale::None => ScaleArgs {
                mul: 1.0,
                table: std::ptr::null(),
            },
            Scale::F32 { mul } => ScaleArgs {
                mul,
                table: std::ptr::null(),
            },
            Scale::Table(t) => ScaleArgs {
                mul: 1.0,
                table: t.as_ptr(),
            },
        }
    }
    /// The factor of group `g` of a row whose scale bytes start at `scales`, broadcast.
    ///
    /// # Safety
    /// `scales` holds the row's scale bytes and `g` is one of its groups; for tables, the
    /// table holds 256 entries.
    #[inline(always)]
    unsafe fn factor<const S: u8>(self, scales: *const u8, g: usize) -> __m256 {
        // SAFETY: per the contract; f32 scales are read unaligned.
        unsafe {
            match S {
                F32_SCALE => {
                    _mm256_set1_ps((scales.add(4 * g) as *const f32).read_unaligned() * self.mul)
                }
                TABLE_SCALE => _mm256_broadcast_ss(&*self.table.add(usize::from(*scales.add(g)))),
                _ => _mm256_set1_ps(1.0),
            }
        }
    }
}

#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum(v: __m256) -> f32 {
    // Pairing: lanes l and l + 4, then l and l + 2, then the last two (the scalar twin's order).
    let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let s = _mm_add_ss(d, _mm_shuffle_ps::<0b01>(d, d));
    _mm_cvtss_f32(s)
}

/// The tile: `R` weight rows × `N` activation rows, accumulators in registers.
///
/// Register budget (16 ymm) decides the variants: one token of an unscaled codec gets two
/// FMA chains per row (the decode is cheap, FMA latency would bind); otherwise each decoded
/// vector is multiplied by its group's factor (E4M3 raw values are tiny, so the factor must
/// come before the products) and shared by all tokens.
///
/// # Safety
/// AVX2+FMA available; `rows[r]` points at `fmt.row_bytes()` bytes, `scales[r]` at
/// `fmt.scale_bytes()` (scaled codecs), `xs[t]` at `fmt.k` f32.
///
/// `DEFER` (one token of a scaled codec, [`deferred_x_mul`]): the products of a group are summed
/// raw against the activations times `x_mul` and the sum multiplied once by the group's factor
/// divided by `x_mul`, instead of multiplying every decoded vector by its factor first (two
/// fewer multiplies per 16 weights and row; E4M3 raw values carry 2^-120, which `x_mul` lifts
/// back so no product falls below the normal range).
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<D: Decode, const S: u8, const R: usize, const N: usize, const DEFER: bool>(
    fmt: &RowFormat<'_>,
    rows: [*const u8; R],
    scales: [*const u8; R],
    xs: [*const f32; N],
    x_mul: f32,
) -> [[f32; N]; R] {
    let scaled = S != NO_SCALE;
    let sa = ScaleArgs::of(fmt.scale);
    let two_chains = !scaled && N == 1;
    let (xm, group_mul) = (_mm256_set1_ps(x_mul), _mm256_set1_ps(1.0 / x_mul));
    let k = fmt.k;
    let group = if scaled { fmt.group } else { k };
    let vec_end = k - k % CHUNK;
    let zero = _mm256_setzero_ps();
    let mut acc = [[zero; N]; R];
    let mut acc2 = [[zero; N]; R];
    let mut start = 0;
    let mut g = 0;
    while start < vec_end {
        let end = (start + group).min(vec_end);
        {
            let mut f = [zero; R];
            if scaled {
                for r in 0..R {
                    // SAFETY: g is a group of the row.
                    f[r] = unsafe { sa.factor::<S>(scales[r], g) };
                    if DEFER {
                        f[r] = _mm256_mul_ps(f[r], group_mul);
                    }
                }
            }
            // DEFER: this group's raw sums.
            let mut sums = [zero; R];
            let mut c = start;
            while c < end {
                if D::CODEC != Codec::F32 && D::CODEC.bytes(c) % 64 == 0 {
                    // Stored weights stream from memory: hint the rows of the tile after the next
                    // (the next 2R rows when, as usual, they are consecutive) at this column, once
                    // per 64-byte line. A hint is never dereferenced, so an address past the
                    // tensor is harmless.
                    let ahead = 2 * R * fmt.row_bytes() + D::CODEC.bytes(c);
                    for row in rows {
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(ahead) as *const i8);
                    }
                }
                if DEFER {
                    // SAFETY: xs[0] holds k ≥ c + 16 f32.
                    let (x0, x1) = unsafe {
                        (
                            _mm256_mul_ps(_mm256_loadu_ps(xs[0].add(c)), xm),
                            _mm256_mul_ps(_mm256_loadu_ps(xs[0].add(c + 8)), xm),
                        )
                    };
                    for r in 0..R {
                        // SAFETY: c + 16 ≤ vec_end ≤ k.
                        let (a, b) = unsafe { D::load(rows[r], c) };
                        sums[r] = _mm256_fmadd_ps(b, x1, _mm256_fmadd_ps(a, x0, sums[r]));
                    }
                } else if N == 1 {
                    // One token: decode, scale and accumulate row by row, so only the current
                    // row's two vectors are live (the factors stay in registers).
                    // SAFETY: xs[0] holds k ≥ c + 16 f32.
                    let (x0, x1) = unsafe {
                        (
                            _mm256_loadu_ps(xs[0].add(c)),
                            _mm256_loadu_ps(xs[0].add(c + 8)),
                        )
                    };
                    for r in 0..R {
                        // SAFETY: c + 16 ≤ vec_end ≤ k.
                        let (a, b) = unsafe { D::load(rows[r], c) };
                        let (a, b) = if scaled {
                            (_mm256_mul_ps(a, f[r]), _mm256_mul_ps(b, f[r]))
                        } else {
                            (a, b)
                        };
                        acc[r][0] = _mm256_fmadd_ps(a, x0, acc[r][0]);
                        if two_chains {
                            acc2[r][0] = _mm256_fmadd_ps(b, x1, acc2[r][0]);
                        } else {
                            acc[r][0] = _mm256_fmadd_ps(b, x1, acc[r][0]);
                        }
                    }
                } else {
                    // Several tokens share each decoded vector.
                    let mut w = [(zero, zero); R];
                    for r in 0..R {
                        // SAFETY: c + 16 ≤ vec_end ≤ k.
                        let (a, b) = unsafe { D::load(rows[r], c) };
                        w[r] = if scaled {
                            (_mm256_mul_ps(a, f[r]), _mm256_mul_ps(b, f[r]))
                        } else {
                            (a, b)
                        };
                    }
                    for t in 0..N {
                        // SAFETY: xs[t] holds k ≥ c + 16 f32.
                        let (x0, x1) = unsafe {
                            (
                                _mm256_loadu_ps(xs[t].add(c)),
                                _mm256_loadu_ps(xs[t].add(c + 8)),
                            )
                        };
                        for r in 0..R {
                            acc[r][t] =
                                _mm256_fmadd_ps(w[r].1, x1, _mm256_fmadd_ps(w[r].0, x0, acc[r][t]));
                        }
                    }
                }
                c += CHUNK;
            }
            if DEFER {
                for r in 0..R {
                    acc[r][0] = _mm256_fmadd_ps(sums[r], f[r], acc[r][0]);
                }
            }
        }
        start = end;
        g += 1;
    }
    let mut out = [[0f32; N]; R];
    for r in 0..R {
        for t in 0..N {
            let v = if two_chains {
                _mm256_add_ps(acc[r][t], acc2[r][t])
            } else {
                acc[r][t]
            };
            out[r][t] = hsum(v);
        }
    }
    // The tail past the last whole chunk (K % 16 elements; never for E2M1), in natural order.
    for p in vec_end..k {
        for r in 0..R {
            // SAFETY: p < k; the row holds `fmt.row_bytes()` bytes and its scale bytes
            // cover group p / group.
            let (row, s) = unsafe {
                (
                    std::slice::from_raw_parts(rows[r], fmt.row_bytes()),
                    std::slice::from_raw_parts(scales[r], fmt.scale_bytes()),
                )
            };
            let raw = D::CODEC.raw(row, p, k);
            let wp = if scaled {
                raw * fmt.factor(s, p / group)
            } else {
                raw
            };
            for t in 0..N {
                // SAFETY: p < k.
                out[r][t] += wp * unsafe { *xs[t].add(p) };
            }
        }
    }
    if fmt.out_mul != 1.0 {
        for o in out.iter_mut().flatten() {
            *o *= fmt.out_mul;
        }
    }
    out
}

/// Runs `R × N` tiles over all `rows` (a last partial tile repeats its first row and drops
/// the extra results) and writes `out[r * N + t]`.
#[target_feature(enable = "avx2,fma")]
unsafe fn tiles<D: Decode, const S: u8, const R: usize, const N: usize, const DEFER: bool>(
    fmt: &RowFormat<'_>,
    rows: &[&[u8]],
    scales: &[&[u8]],
    xs: &[&[f32]],
    x_mul: f32,
    out: &mut [f32],
) {
    let xs_arr: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    let mut r0 = 0;
    while r0 < rows.len() {
        let nr = R.min(rows.len() - r0);
        let pick = |r: usize| r0 + if r < nr { r } else { 0 };
        let rows_arr: [*const u8; R] = std::array::from_fn(|r| rows[pick(r)].as_ptr());
        let scale_arr: [*const u8; R] = std::array::from_fn(|r| {
            if S != NO_SCALE {
                scales[pick(r)].as_ptr()
            } else {
                [].as_ptr()
            }
        });
        // SAFETY: forwarded from the caller (lengths checked by `dot_rows`); unscaled codecs
        // never read their (empty) scale pointers.
        let res = unsafe { tile::<D, S, R, N, DEFER>(fmt, rows_arr, scale_arr, xs_arr, x_mul) };
        for r in 0..nr {
            out[(r0 + r) * N..(r0 + r + 1) * N].copy_from_slice(&res[r]);
        }
        r0 += nr;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn for_shape<D: Decode, const S: u8>(
    fmt: &RowFormat<'_>,
    rows: &[&[u8]],
    scales: &[&[u8]],
    xs: &[&[f32]],
    out: &mut [f32],
) {
    debug_assert!(xs.len() <= MAX_TILE_TOKENS);
    // SAFETY: forwarded from the caller. One token gets 4 rows (4-8 FMA chains); more tokens
    // get 2 rows so accumulators, decoded weights and activations fit 16 registers.
    unsafe {
        match xs.len() {
            1 if S != NO_SCALE => match deferred_x_mul(&xs[0][..fmt.k]) {
                Some(m) => tiles::<D, S, 4, 1, true>(fmt, rows, scales, xs, m, out),
                None => tiles::<D, S, 4, 1, false>(fmt, rows, scales, xs, 1.0, out),
            },
            1 => tiles::<D, S, 4, 1, false>(fmt, rows, scales, xs, 1.0, out),
            2 => tiles::<D, S, 2, 2, false>(fmt, rows, scales, xs, 1.0, out),
            3 => tiles::<D, S, 2, 3, false>(fmt, rows, scales, xs, 1.0, out),
            _ => tiles::<D, S, 2, 4, false>(fmt, rows, scales, xs, 1.0, out),
        }
    }
}

/// The activation multiplier of a deferred-factor tile: `2^(120 - E)` for `max |x| < 2^E`
/// (at most 2^127), so that `x · x_mul < 2^120` and an E4M3 raw value (value · 2^-120) times it
/// stays a normal f32 unless the product is below `max |x| · 2^-126`; `None` when `x` holds a
/// NaN or an infinity (the factor-first tile then propagates them as the reference does) or
/// reaches 2^120.
#[target_feature(enable = "avx2,fma")]
pub(super) fn deferred_x_mul(x: &[f32]) -> Option<f32> {
    let magnitude = _mm256_set1_epi32(0x7FFF_FFFF);
    let mut m = _mm256_setzero_si256();
    let whole = x.len() - x.len() % 8;
    for c in (0..whole).step_by(8) {
        // SAFETY: c + 8 ≤ x.len().
        let v = unsafe { _mm256_loadu_si256(x.as_ptr().add(c) as *const __m256i) };
        m = _mm256_max_epi32(m, _mm256_and_si256(v, magnitude));
    }
    let mut lanes = [0u32; 8];
    // SAFETY: 32 writable bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, m) };
    // Magnitude bits order as the values do; 0x7F80_0000 and up are infinities and NaNs.
    let max_bits = x[whole..]
        .iter()
        .map(|v| v.to_bits() & 0x7FFF_FFFF)
        .chain(lanes)
        .max()
        .unwrap_or(0);
    let e = super::exponent_above(max_bits);
    if max_bits >= 0x7F80_0000 || e > 120 {
        // Non-finite, or so large that a group's factor / x_mul (scale · 2^e) could overflow
        // where the factor itself (scale · 2^120) does not.
        return None;
    }
    let c = (120 - e).min(127);
    Some(f32::from_bits(((c + 127) as u32) << 23))
}

/// # Safety
/// AVX2+FMA available and the lengths `dot_rows` checks.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_rows(
    fmt: RowFormat<'_>,
    rows: &[&[u8]],
    scales: &[&[u8]],
    xs: &[&[f32]],
    out: &mut [f32],
) {
    let f = &fmt;
    // SAFETY: forwarded from the caller; `check` paired scaled codecs with a scale kind.
    unsafe {
        match (fmt.codec, fmt.scale) {
            (Codec::F32, _) => for_shape::<F32, NO_SCALE>(f, rows, scales, xs, out),
            (Codec::Bf16, _) => for_shape::<Bf16, NO_SCALE>(f, rows, scales, xs, out),
            (Codec::E4m3, Scale::F32 { .. }) => {
                for_shape::<E4m3, F32_SCALE>(f, rows, scales, xs, out)
            }
            (Codec::E4m3, _) => for_shape::<E4m3, TABLE_SCALE>(f, rows, scales, xs, out),
            (Codec::E2m1, _) => super::avx2_e2m1::dot_rows(f, rows, scales, xs, out),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn decode_with<D: Decode, const S: u8>(
    fmt: &RowFormat<'_>,
    row: &[u8],
    scales: &[u8],
    out: &mut [f32],
) {
    let scaled = S != NO_SCALE;
    let sa = ScaleArgs::of(fmt.scale);
    let k = fmt.k;
    let group = if scaled { fmt.group } else { k };
    let vec_end = k - k % CHUNK;
    let mut start = 0;
    let mut g = 0;
    while start < vec_end {
        let end = (start + group).min(vec_end);
        // SAFETY: g is a group of the row; its scale bytes are in `scales`.
        let f = if scaled {
            unsafe { sa.factor::<S>(scales.as_ptr(), g) }
        } else {
            _mm256_set1_ps(1.0)
        };
        let mut c = start;
        while c < end {
            // SAFETY: c + 16 ≤ k: the row holds the bytes and `out` the 16 f32.
            unsafe {
                let (a, b) = D::load(row.as_ptr(), c);
                let (a, b) = if scaled {
                    (_mm256_mul_ps(a, f), _mm256_mul_ps(b, f))
                } else {
                    (a, b)
                };
                _mm256_storeu_ps(out.as_mut_ptr().add(c), a);
                _mm256_storeu_ps(out.as_mut_ptr().add(c + 8), b);
            }
            c += CHUNK;
        }
        start = end;
        g += 1;
    }
    for (p, o) in out.iter_mut().enumerate().take(k).skip(vec_end) {
        let raw = D::CODEC.raw(row, p, k);
        *o = if scaled {
            raw * fmt.factor(scales, p / group)
        } else {
            raw
        };
    }
}

/// # Safety
/// AVX2+FMA available; `row` holds `fmt.row_bytes()`, `scales` `fmt.scale_bytes()`, `out`
/// `fmt.k`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn decode_row(fmt: RowFormat<'_>, row: &[u8], scales: &[u8], out: &mut [f32]) {
    let f = &fmt;
    // SAFETY: forwarded from the caller.
    unsafe {
        match (fmt.codec, fmt.scale) {
            (Codec::F32, _) => decode_with::<F32, NO_SCALE>(f, row, scales, out),
            (Codec::Bf16, _) => decode_with::<Bf16, NO_SCALE>(f, row, scales, out),
            (Codec::E4m3, Scale::F32 { .. }) => decode_with::<E4m3, F32_SCALE>(f, row, scales, out),
            (Codec::E4m3, _) => decode_with::<E4m3, TABLE_SCALE>(f, row, scales, out),
            (Codec::E2m1, _) => super::avx2_e2m1::decode_rows(f, &[row], &[scales], out),
        }
    }
}
