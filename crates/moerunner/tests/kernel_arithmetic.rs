//! The CUDA quantizers' arithmetic shortcuts, mirrored here in Rust and checked against the CPU codec
//! they must equal (formats/e2m1.rs `encode` of the IEEE quotient) over every input where they could
//! differ. The GPU tests (`gpu_*_quantizer*_bit_for_bit` in tests/cuda.rs) check the kernels against the
//! CPU quantizers on seeded draws; these checks cover the inputs no draw reaches. Each mirror names the
//! kernel function it copies: a change there must change the mirror too.

use moerunner::formats::e2m1;
use rayon::prelude::*;

/// The E2M1 codes' rounding boundaries: midpoints of neighbouring values (0, 0.5, 1, 1.5, 2, 3, 4, 6).
const BOUNDARIES: [f32; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];

/// common.cuh `e2m1_code`: the code from v's bits (|v| < 1: rint(2|v|) by a 2^23 fma; else the bits rounded to one
/// mantissa bit, ties to even, minus 252 in bits 22 and up, saturated at 7), with v's sign bit.
fn e2m1_code_from_bits(v: f32) -> u8 {
    let bits = v.to_bits();
    e2m1_magnitude_code(bits & 0x7fff_ffff) | ((bits >> 28) & 8) as u8
}

/// common.cuh `e2m1_magnitude_code`: `e2m1_code_from_bits` of |v|, from |v|'s bits.
fn e2m1_magnitude_code(abits: u32) -> u8 {
    let code = if abits < 0x3f80_0000 {
        // rint(2|v|) as 2^23 + 2|v| rounded once (an fma), less 2^23's bits
        f32::from_bits(abits).mul_add(2.0, 8_388_608.0).to_bits() - 0x4b00_0000
    } else {
        let r = ((abits + 0x1f_ffff + ((abits >> 22) & 1)) >> 22).wrapping_sub(252);
        r.min(7)
    };
    code as u8
}

/// common.cuh `E2m1Divisor::of`'s range for the reciprocal path: s's bits in [2^-90, 2^120].
fn by_reciprocal(s: f32) -> bool {
    (0x1280_0000..=0x7b80_0000).contains(&s.to_bits())
}

/// common.cuh `E2m1Divisor::code`: q0 = |x| r, q = q0 + r (|x| - s q0) (two fmas), r = rcp.rn(s).
fn e2m1_code_by_reciprocal(x: f32, s: f32, r: f32) -> u8 {
    let a = x.abs();
    let q0 = a * r;
    let q = (-s).mul_add(q0, a).mul_add(r, q0);
    e2m1_magnitude_code(q.to_bits()) | if x.is_sign_negative() { 8 } else { 0 }
}

/// The f32 bit patterns in `range` whose `code` differs from `encode` (NaN has no E2M1 code: `encode`
/// maps it to ±6, code 7, and so does the kernel).
fn bits_mismatches(code: fn(f32) -> u8, range: std::ops::RangeInclusive<u32>) -> Vec<u32> {
    range
        .into_par_iter()
        .filter(|&bits| code(f32::from_bits(bits)) != e2m1::encode(f32::from_bits(bits)))
        .collect()
}

#[test]
fn e2m1_code_from_bits_equals_encode_for_every_f32() {
    let mismatches = bits_mismatches(e2m1_code_from_bits, 0..=u32::MAX);
    assert!(
        mismatches.is_empty(),
        "{} f32 differ, the first {:#010x}",
        mismatches.len(),
        mismatches[0]
    );
}

/// The (x, s) with s's bits in `s_range` and x among the 17 f32 nearest b·s for a code boundary b where
/// `code(x, s, 1/s)` differs from `encode(x / s)`.
fn boundary_mismatches(
    code: fn(f32, f32, f32) -> u8,
    s_range: std::ops::Range<u32>,
) -> Vec<(f32, f32)> {
    s_range
        .into_par_iter()
        .flat_map_iter(|s_bits| {
            let s = f32::from_bits(s_bits);
            let r = 1.0 / s;
            BOUNDARIES.iter().flat_map(move |&b| {
                let centre = ((b as f64) * (s as f64)) as f32;
                (-8i32..=8).filter_map(move |d| {
                    let x = f32::from_bits(centre.to_bits().wrapping_add_signed(d));
                    (code(x, s, r) != e2m1::encode(x / s)).then_some((x, s))
                })
            })
        })
        .collect()
}

/// Every s in [1, 2) (all 2^23 mantissas) at every code boundary b, x the 17 f32 nearest b·s. Outside this
/// window the reciprocal's quotient (within about an ulp of x / s) cannot cross a boundary that the correctly
/// rounded one does not, and in [2^-90, 2^120] every step scales exactly with s's exponent, so this is
/// every (x, s) the kernels take by the reciprocal.
#[test]
fn e2m1_code_by_reciprocal_equals_the_divided_code_at_every_boundary() {
    let mismatches = boundary_mismatches(e2m1_code_by_reciprocal, 0x3f80_0000..0x4000_0000);
    assert!(
        mismatches.is_empty(),
        "{} (x, s) differ, the first {:?}",
        mismatches.len(),
        mismatches.first()
    );
}

/// Both checks find a formula one step short of the kernel's: rounding without the tie-to-even bit, and
/// the reciprocal's quotient without its fma correction.
#[test]
fn the_checks_catch_a_broken_mirror() {
    fn ties_away(v: f32) -> u8 {
        let abits = v.to_bits() & 0x7fff_ffff;
        if abits < 0x3f80_0000 {
            return e2m1_code_from_bits(v);
        }
        let code = ((abits + 0x20_0000) >> 22).wrapping_sub(252).min(7) as u8;
        code | ((v.to_bits() >> 28) & 8) as u8
    }
    assert!(
        !bits_mismatches(ties_away, 0x3fa0_0000..=0x3fa0_0000).is_empty(),
        "1.25 rounds to even"
    );
    fn uncorrected(x: f32, _s: f32, r: f32) -> u8 {
        e2m1_magnitude_code((x.abs() * r).to_bits()) | if x.is_sign_negative() { 8 } else { 0 }
    }
    assert!(!boundary_mismatches(uncorrected, 0x3f80_0000..0x3f81_0000).is_empty());
}

/// Seeded (x, s) over the whole range the kernels take by the reciprocal, both signs, quotients from far
/// below the smallest boundary to far above the largest, and the range's edges.
#[test]
fn e2m1_code_by_reciprocal_equals_the_divided_code_over_the_range() {
    let seed = 0x5eed_e2f1u64;
    println!("seed={seed}");
    let mut state = seed;
    let mut next = move || {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (lo, hi) = (0x1280_0000u32, 0x7b80_0000u32);
    let mut checked = 0u64;
    for i in 0..4_000_000u64 {
        let bits = match i {
            0 => lo,
            1 => hi,
            _ => lo + (next() % (hi - lo + 1) as u64) as u32,
        };
        let s = f32::from_bits(bits);
        assert!(by_reciprocal(s));
        // half at a boundary (x then within 16 steps of it), half anywhere from 1e-5 / 16 to 10 · 16
        let quotient = if next() & 1 == 1 {
            BOUNDARIES[(next() % 7) as usize]
        } else {
            (next() % 1_000_000) as f32 / 100_000.0 * 2f32.powi((next() % 9) as i32 - 4)
        };
        let x = f32::from_bits(
            ((quotient * s).to_bits() as i64 + (next() % 33) as i64 - 16).max(0) as u32,
        );
        let x = if next() & 1 == 1 { -x } else { x };
        if !x.is_finite() {
            continue;
        }
        assert_eq!(
            e2m1_code_by_reciprocal(x, s, 1.0 / s),
            e2m1::encode(x / s),
            "x = {x:e}, s = {s:e}"
        );
        checked += 1;
    }
    assert!(checked > 3_900_000, "only {checked} finite draws");
    assert!(
        !by_reciprocal(f32::from_bits(lo - 1))
            && !by_reciprocal(f32::from_bits(hi + 1))
            && !by_reciprocal(0.0)
    );
}
