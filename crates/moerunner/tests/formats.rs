//! `spec/formats.md` held against oracles written here from the spec text, not from the code:
//! codecs exhaustively against brute-force nearest-value search over tables built from the format
//! definitions, quantizers bit for bit against slow block loops, hand-computed boundary cases,
//! decoders against element × scale in f64, scale layouts against the 5-D view. Every random input
//! comes from a printed seed.

use std::ops::Range;
use std::sync::Arc;

use moerunner::config::{ActivationFormat, WeightFormat};
use moerunner::formats::{
    bf16, e2m1, e4m3, quantize_rows, quantize_rows_into, quantize_weights, scale_layout, ue8m0,
    QuantizedRows,
};
use moerunner::rng::SeededRng;
use moerunner::tensor::Bytes;
use moerunner::weights::{BlockScales, QuantizedTensor};

fn rng(test: &str, seed: u64) -> SeededRng {
    println!("{test}: seed {seed:#x}");
    SeededRng::new(seed)
}

// ---------------------------------------------------------------------------------------------
// Oracles from the definitions.

/// E4M3 magnitude of a code's low 7 bits per the definition (None for the NaN pattern).
fn e4m3_definition(code: u8) -> Option<f64> {
    let (e, m) = (((code >> 3) & 0xF) as i32, (code & 7) as f64);
    match (e, m as u8) {
        (15, 7) => None,
        (0, _) => Some(m / 8.0 * 2f64.powi(-6)),
        _ => Some(2f64.powi(e - 7) * (1.0 + m / 8.0)),
    }
}

/// E2M1 magnitude per the definition: 2 exponent bits (bias 1), 1 mantissa bit.
fn e2m1_definition(code: u8) -> f64 {
    let (e, m) = (((code >> 1) & 3) as i32, (code & 1) as f64);
    if e == 0 {
        m * 0.5
    } else {
        2f64.powi(e - 1) * (1.0 + m / 2.0)
    }
}

/// Index of the entry of ascending `table` nearest to `a` ≥ 0, ties to the even index; saturates
/// at the last entry (which also keeps huge `a`, where f64 distances collapse, exact). A plain scan:
/// slow and obviously right.
fn nearest_even(table: &[f64], a: f64) -> usize {
    if a >= table[table.len() - 1] {
        return table.len() - 1;
    }
    let mut best = 0;
    for c in 1..table.len() {
        let (d_best, d_c) = ((table[best] - a).abs(), (table[c] - a).abs());
        if d_c < d_best || (d_c == d_best && c % 2 == 0) {
            best = c;
        }
    }
    best
}

fn e4m3_table() -> Vec<f64> {
    (0..=126u8)
        .map(|c| e4m3_definition(c).unwrap_or(f64::NAN))
        .collect()
}

fn e2m1_table() -> Vec<f64> {
    (0..8u8).map(e2m1_definition).collect()
}

/// Encode by the spec: NaN → the NaN code of x's sign; ±inf and beyond → ±448; else nearest, ties
/// to even.
fn e4m3_oracle(table: &[f64], x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return sign | 0x7F;
    }
    if x.is_infinite() {
        return sign | 0x7E;
    }
    sign | nearest_even(table, x.abs() as f64) as u8
}

fn e2m1_oracle(table: &[f64], x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 8 } else { 0 };
    if x.is_infinite() {
        return sign | 7;
    }
    sign | nearest_even(table, x.abs() as f64) as u8
}

/// The UE8M0 byte of ceil-pow2(s) per the spec, searched in f64.
fn ue8m0_oracle(s: f32) -> u8 {
    if s == 0.0 {
        return 0;
    }
    let s = s as f64;
    let mut c = s.log2().ceil() as i32;
    while 2f64.powi(c - 1) >= s {
        c -= 1;
    }
    while 2f64.powi(c) < s {
        c += 1;
    }
    (c.clamp(-127, 127) + 127) as u8
}

/// f32 → bf16 by the bit recipe: add half an ulp minus one, plus the kept LSB, truncate.
fn bf16_oracle(x: f32) -> u16 {
    let b = x.to_bits();
    ((b as u64 + 0x7FFF + ((b as u64 >> 16) & 1)) >> 16) as u16
}

/// Every f32 whose low 16 bits are one of a few patterns: all bf16 values, every E4M3 / E2M1
/// midpoint (they need ≤ 5 mantissa bits) and their neighbours on both sides.
fn structured_f32() -> impl Iterator<Item = f32> {
    (0..=u16::MAX).flat_map(|hi| {
        [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF]
            .map(move |lo| f32::from_bits((hi as u32) << 16 | lo))
    })
}

// ---------------------------------------------------------------------------------------------
// E4M3

#[test]
fn e4m3_every_code_decodes_to_its_definition_and_reencodes_to_itself() {
    for c in 0..=255u8 {
        let v = e4m3::decode(c);
        assert_eq!(v.is_sign_negative(), c >= 0x80, "sign of code {c:#04x}");
        match e4m3_definition(c & 0x7F) {
            None => assert!(v.is_nan(), "code {c:#04x} is NaN"),
            Some(mag) => assert_eq!(v.abs() as f64, mag, "decode({c:#04x})"),
        }
        assert_eq!(e4m3::encode(v), c, "encode(decode({c:#04x}))");
    }
    assert_eq!(e4m3::decode(0x7E), 448.0);
    assert_eq!(e4m3::decode(0x01), 2f32.powi(-9), "smallest subnormal");
    assert_eq!(e4m3::decode(0x08), 2f32.powi(-6), "smallest normal");
}

#[test]
fn e4m3_every_midpoint_ties_to_even_and_its_neighbours_round_away_from_it() {
    for c in 0..0x7Eu8 {
        let (lo, hi) = (
            e4m3_definition(c).unwrap_or_default(),
            e4m3_definition(c + 1).unwrap_or_default(),
        );
        let mid = ((lo + hi) / 2.0) as f32;
        assert_eq!(
            mid as f64,
            (lo + hi) / 2.0,
            "midpoint of {c:#04x} exact in f32"
        );
        let even = if c % 2 == 0 { c } else { c + 1 };
        let (above, below) = (
            f32::from_bits(mid.to_bits() + 1),
            f32::from_bits(mid.to_bits() - 1),
        );
        for (sign, s) in [(1f32, 0u8), (-1.0, 0x80)] {
            assert_eq!(
                e4m3::encode(sign * mid),
                s | even,
                "tie {} between {c:#04x} and {:#04x}",
                sign * mid,
                c + 1
            );
            assert_eq!(
                e4m3::encode(sign * above),
                s | (c + 1),
                "just above midpoint {}",
                sign * mid
            );
            assert_eq!(
                e4m3::encode(sign * below),
                s | c,
                "just below midpoint {}",
                sign * mid
            );
        }
    }
}

#[test]
fn e4m3_saturates_and_keeps_nan_by_sign() {
    let (next_up, next_down) = (
        |x: f32| f32::from_bits(x.to_bits() + 1),
        |x: f32| f32::from_bits(x.to_bits() - 1),
    );
    // 464 is the midpoint to the 480 E4M3 does not have; saturation makes both sides 448.
    for big in [
        448.0f32,
        next_up(448.0),
        next_down(464.0),
        464.0,
        480.0,
        1e6,
        f32::MAX,
        f32::INFINITY,
    ] {
        assert_eq!(e4m3::encode(big), 0x7E, "{big}");
        assert_eq!(e4m3::encode(-big), 0xFE, "-{big}");
    }
    assert_eq!(e4m3::encode(f32::NAN), 0x7F);
    assert_eq!(e4m3::encode(-f32::NAN), 0xFF);
    assert_eq!(
        e4m3::encode(f32::from_bits(0x7F80_0001)),
        0x7F,
        "signalling NaN"
    );
    assert_eq!(e4m3::encode(f32::from_bits(0xFFFF_FFFF)), 0xFF);
}

#[test]
fn e4m3_subnormals_and_zeros() {
    assert_eq!(e4m3::encode(0.0), 0x00);
    assert_eq!(e4m3::encode(-0.0), 0x80);
    assert_eq!(
        e4m3::encode(f32::from_bits(1)),
        0x00,
        "f32 subnormal rounds to 0"
    );
    assert_eq!(e4m3::encode(-f32::from_bits(1)), 0x80, "and keeps its sign");
    assert_eq!(e4m3::encode(f32::MIN_POSITIVE), 0x00);
    assert_eq!(
        e4m3::encode(2f32.powi(-10)),
        0x00,
        "half the smallest subnormal ties to 0 (even)"
    );
    assert_eq!(
        e4m3::encode(3.0 * 2f32.powi(-10)),
        0x02,
        "1.5 subnormal steps ties to 2 (even)"
    );
    assert_eq!(
        e4m3::encode(15.0 * 2f32.powi(-10)),
        0x08,
        "7.5 steps ties up into the smallest normal"
    );
    for m in 0..8u8 {
        assert_eq!(
            e4m3::encode(m as f32 * 2f32.powi(-9)),
            m,
            "subnormal {m}/8 · 2^-6"
        );
    }
}

#[test]
fn e4m3_encode_matches_the_oracle_on_structured_and_random_bit_patterns() {
    let table = e4m3_table();
    for x in structured_f32() {
        assert_eq!(
            e4m3::encode(x),
            e4m3_oracle(&table, x),
            "x = {x:e} ({:#010x})",
            x.to_bits()
        );
    }
    let mut rng = rng("e4m3 random", 0xE4_43);
    for _ in 0..500_000 {
        // Half the draws over all bit patterns, half with exponents near E4M3's range.
        let x = if rng.below(2) == 0 {
            f32::from_bits(rng.next_u64() as u32)
        } else {
            rng.uniform(-1.0, 1.0) * 2f32.powi(rng.below(30) as i32 - 14)
        };
        assert_eq!(
            e4m3::encode(x),
            e4m3_oracle(&table, x),
            "x = {x:e} ({:#010x})",
            x.to_bits()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// E2M1

#[test]
fn e2m1_every_code_decodes_to_its_definition_and_reencodes_to_itself() {
    let spec_values = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    for c in 0..16u8 {
        let v = e2m1::decode(c);
        assert_eq!(v.abs(), spec_values[(c & 7) as usize], "decode({c})");
        assert_eq!(v.abs() as f64, e2m1_definition(c & 7), "definition of {c}");
        assert_eq!(v.is_sign_negative(), c >= 8, "sign of code {c} (8 is -0)");
        assert_eq!(e2m1::encode(v), c, "encode(decode({c}))");
        assert_eq!(e2m1::decode(c | 0xF0), v, "decode ignores the high nibble");
    }
}

#[test]
fn e2m1_ties_follow_the_spec_list_and_neighbours_round_away() {
    // (tie, code it goes to, lower code, upper code) from the spec: 0.25→0, 0.75→1, 1.25→1,
    // 1.75→2, 2.5→2, 3.5→4, 5→4.
    let ties = [
        (0.25f32, 0u8, 0u8, 1u8),
        (0.75, 2, 1, 2),
        (1.25, 2, 2, 3),
        (1.75, 4, 3, 4),
        (2.5, 4, 4, 5),
        (3.5, 6, 5, 6),
        (5.0, 6, 6, 7),
    ];
    for (x, to, lo, hi) in ties {
        let (above, below) = (
            f32::from_bits(x.to_bits() + 1),
            f32::from_bits(x.to_bits() - 1),
        );
        for (sign, s) in [(1f32, 0u8), (-1.0, 8)] {
            assert_eq!(e2m1::encode(sign * x), s | to, "tie {}", sign * x);
            assert_eq!(
                e2m1::encode(sign * above),
                s | hi,
                "just above {}",
                sign * x
            );
            assert_eq!(
                e2m1::encode(sign * below),
                s | lo,
                "just below {}",
                sign * x
            );
        }
    }
}

#[test]
fn e2m1_saturates_zeros_keep_their_sign() {
    for big in [
        6.0f32,
        f32::from_bits(6f32.to_bits() + 1),
        7.0,
        100.0,
        f32::MAX,
        f32::INFINITY,
    ] {
        assert_eq!(e2m1::encode(big), 7, "{big}");
        assert_eq!(e2m1::encode(-big), 15, "-{big}");
    }
    assert_eq!(e2m1::encode(0.0), 0);
    assert_eq!(e2m1::encode(-0.0), 8, "-0 is code 8");
    assert_eq!(e2m1::encode(-0.1), 8, "a small negative rounds to -0");
    assert_eq!(e2m1::encode(-f32::from_bits(1)), 8);
    // E2M1 has no NaN; the codec saturates it (quantizers reject NaN or carry it in the scale).
    assert_eq!(e2m1::encode(f32::NAN) & 7, 7);
}

#[test]
fn e2m1_encode_matches_the_oracle_on_structured_and_random_values() {
    let table = e2m1_table();
    for x in structured_f32().filter(|x| !x.is_nan()) {
        assert_eq!(
            e2m1::encode(x),
            e2m1_oracle(&table, x),
            "x = {x:e} ({:#010x})",
            x.to_bits()
        );
    }
    let mut rng = rng("e2m1 random", 0xE2_41);
    for _ in 0..300_000 {
        let x = rng.uniform(-7.0, 7.0);
        assert_eq!(e2m1::encode(x), e2m1_oracle(&table, x), "x = {x}");
    }
}

#[test]
fn e2m1_packing_puts_element_2i_in_the_low_nibble() {
    assert_eq!(e2m1::pack(0x3, 0xA), 0xA3);
    for b in 0..=255u8 {
        let [lo, hi] = e2m1::unpack(b);
        assert_eq!(e2m1::pack(lo, hi), b);
        assert_eq!(
            e2m1::PAIRS[b as usize],
            [e2m1::decode(b & 0xF), e2m1::decode(b >> 4)],
            "pair table at {b:#04x}"
        );
    }
    assert_eq!(
        e2m1::pack(0x13, 0x0),
        0x03,
        "only the low 4 bits of `lo` are kept"
    );
}

// ---------------------------------------------------------------------------------------------
// UE8M0

#[test]
fn ue8m0_decodes_every_byte_and_powers_of_two_map_to_themselves() {
    for e in 0..=254u8 {
        let v = ue8m0::decode(e);
        assert_eq!(v as f64, 2f64.powi(e as i32 - 127), "decode({e})");
        assert_eq!(
            ue8m0::encode_ceil(v),
            e,
            "2^{} maps to itself",
            e as i32 - 127
        );
        let up = f32::from_bits(v.to_bits() + 1);
        assert_eq!(
            ue8m0::encode_ceil(up),
            e.saturating_add(1).min(254),
            "just above 2^{}",
            e as i32 - 127
        );
        if e > 0 {
            let down = f32::from_bits(v.to_bits() - 1);
            assert_eq!(
                ue8m0::encode_ceil(down),
                e,
                "just below 2^{}",
                e as i32 - 127
            );
        }
    }
    assert!(ue8m0::decode(255).is_nan());
}

#[test]
fn ue8m0_ceil_clamps_and_handles_f32_subnormals() {
    assert_eq!(ue8m0::encode_ceil(0.0), 0, "s = 0 → byte 0");
    assert_eq!(
        ue8m0::encode_ceil(f32::from_bits(1)),
        0,
        "2^-149 clamps up to 2^-127"
    );
    assert_eq!(
        ue8m0::encode_ceil(2f32.powi(-127)),
        0,
        "2^-127 is itself an f32 subnormal"
    );
    assert_eq!(
        ue8m0::encode_ceil(f32::from_bits((1 << 22) + 1)),
        1,
        "just above 2^-127 → 2^-126"
    );
    assert_eq!(
        ue8m0::encode_ceil(f32::from_bits(0x007F_FFFF)),
        1,
        "largest subnormal → 2^-126"
    );
    assert_eq!(ue8m0::encode_ceil(f32::MIN_POSITIVE), 1, "2^-126");
    assert_eq!(ue8m0::encode_ceil(0.75), 127, "ceil(0.75) = 2^0");
    assert_eq!(ue8m0::encode_ceil(3.0), 129);
    assert_eq!(ue8m0::encode_ceil(2f32.powi(127)), 254);
    assert_eq!(ue8m0::encode_ceil(f32::MAX), 254, "2^128 clamps to 2^127");
    assert_eq!(ue8m0::encode_ceil(f32::INFINITY), 254);
}

#[test]
fn ue8m0_encode_ceil_matches_the_oracle() {
    for x in structured_f32().filter(|x| x.is_finite() && *x >= 0.0) {
        assert_eq!(
            ue8m0::encode_ceil(x),
            ue8m0_oracle(x),
            "s = {x:e} ({:#010x})",
            x.to_bits()
        );
    }
    let mut rng = rng("ue8m0 random", 0x0E8);
    for _ in 0..500_000 {
        let s = f32::from_bits(rng.next_u64() as u32 & 0x7FFF_FFFF);
        if s.is_finite() {
            assert_eq!(
                ue8m0::encode_ceil(s),
                ue8m0_oracle(s),
                "s = {s:e} ({:#010x})",
                s.to_bits()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// BF16

fn check_bf16(x: f32) {
    let got = bf16::encode(x);
    let half = half::bf16::from_f32(x);
    if x.is_nan() {
        assert!(
            bf16::decode(got).is_nan() && half.is_nan(),
            "NaN {:#010x}",
            x.to_bits()
        );
        assert_eq!(
            got >> 15,
            (x.to_bits() >> 31) as u16,
            "NaN sign {:#010x}",
            x.to_bits()
        );
    } else {
        assert_eq!(
            got,
            half.to_bits(),
            "vs half: {x:e} ({:#010x})",
            x.to_bits()
        );
        assert_eq!(
            got,
            bf16_oracle(x),
            "vs bit recipe: {x:e} ({:#010x})",
            x.to_bits()
        );
    }
}

#[test]
fn bf16_matches_half_and_the_bit_recipe_on_random_bit_patterns() {
    let mut rng = rng("bf16 random", 0xBF16);
    for _ in 0..4_000_000 {
        check_bf16(f32::from_bits(rng.next_u64() as u32));
    }
}

#[test]
fn bf16_every_tie_goes_to_even() {
    // Every f32 exactly between two bf16 neighbours (low half 0x8000), and both of its neighbours.
    for x in structured_f32() {
        check_bf16(x);
    }
    for hi in 0..=u16::MAX {
        let x = f32::from_bits((hi as u32) << 16 | 0x8000);
        if x.is_finite() {
            let want = if hi % 2 == 0 { hi } else { hi + 1 };
            assert_eq!(bf16::encode(x), want, "tie {x:e}");
        }
    }
    assert_eq!(bf16::round(1.0 + 2f32.powi(-8)), 1.0);
    assert_eq!(bf16::round(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
    assert_eq!(bf16::encode(f32::MAX), 0x7F80, "overflow rounds to +inf");
    assert_eq!(
        bf16::encode(f32::from_bits(0x7F7F_7FFF)),
        0x7F7F,
        "below the overflow tie stays finite"
    );
}

// ---------------------------------------------------------------------------------------------
// Scale layouts

#[test]
fn swizzle_matches_the_permuted_view_pads_with_zero_and_round_trips() {
    for (rows, blocks) in [
        (128usize, 4usize),
        (130, 5),
        (256, 12),
        (1, 1),
        (300, 90),
        (2880, 90),
        (5, 180),
        (0, 3),
    ] {
        let bp = blocks.div_ceil(4) * 4;
        let n_kt = bp / 4;
        // Nonzero linear bytes, so the only zeros in the result are padding.
        let linear: Vec<u8> = (0..rows * blocks).map(|i| (i % 255) as u8 + 1).collect();
        let sw = scale_layout::swizzle_128x4(&linear, rows, blocks);
        assert_eq!(
            sw.len(),
            rows.div_ceil(128) * 128 * bp,
            "[{rows}, {blocks}] length"
        );
        assert_eq!(sw.len(), scale_layout::swizzled_len(rows, blocks));
        let mut seen = vec![false; sw.len()];
        for m in 0..rows {
            for j in 0..blocks {
                // View [M/128, 4, 32, nB/4, 4] permuted to [M/128, nB/4, 32, 4, 4].
                let (a, b, c, d, e) = (m / 128, (m % 128) / 32, m % 32, j / 4, j % 4);
                let off = (((a * n_kt + d) * 32 + c) * 4 + b) * 4 + e;
                assert_eq!(
                    off,
                    scale_layout::swizzled_offset(m, j, bp),
                    "formula at ({m}, {j})"
                );
                assert_eq!(
                    sw[off],
                    linear[m * blocks + j],
                    "[{rows}, {blocks}] at ({m}, {j})"
                );
                assert!(!seen[off], "offset {off} used twice");
                seen[off] = true;
            }
        }
        for (i, &b) in sw.iter().enumerate() {
            assert_eq!(
                b == 0,
                !seen[i],
                "[{rows}, {blocks}] byte {i}: padding exactly where nothing landed"
            );
        }
        assert_eq!(
            scale_layout::unswizzle_128x4(&sw, rows, blocks),
            linear,
            "[{rows}, {blocks}] round trip"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Weight quantizers: a slow implementation from the spec text.

fn amax(xs: impl IntoIterator<Item = f32>) -> f32 {
    xs.into_iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// What a weight quantizer must produce, computed block by block from the spec's table.
struct SpecWeights {
    data: Vec<u8>,
    scales: BlockScales,
    globals: Vec<f32>,
}

fn spec_quantize_weights(
    fmt: WeightFormat,
    experts: usize,
    rows: usize,
    cols: usize,
    w: &[f32],
    given: Option<&[f32]>,
) -> SpecWeights {
    let at = |x: usize, r: usize, c: usize| w[(x * rows + r) * cols + c];
    let fp4 = fmt == WeightFormat::Mxfp4 || fmt == WeightFormat::Nvfp4;
    let mut codes = vec![0u8; experts * rows * cols]; // one code per element, packed at the end
    let mut f32_scales = Vec::new();
    let mut byte_scales = Vec::new();
    let mut globals = Vec::new();
    for x in 0..experts {
        let expert_amax = amax((0..rows * cols).map(|i| w[x * rows * cols + i]));
        match fmt {
            WeightFormat::Bf16 => {} // encoded whole below
            WeightFormat::Fp8 => {
                let s = expert_amax.max(1e-10) / 448.0;
                f32_scales.push(s);
                for i in 0..rows * cols {
                    codes[x * rows * cols + i] = e4m3::encode(w[x * rows * cols + i] / s);
                }
            }
            WeightFormat::Fp8Block => {
                for bi in 0..rows.div_ceil(128) {
                    for bj in 0..cols.div_ceil(128) {
                        let (rr, cc) = (
                            bi * 128..(bi * 128 + 128).min(rows),
                            bj * 128..(bj * 128 + 128).min(cols),
                        );
                        let a = amax(
                            rr.clone()
                                .flat_map(|r| cc.clone().map(move |c| at(x, r, c))),
                        );
                        let s = a.max(1e-10) / 448.0;
                        f32_scales.push(s);
                        for r in rr.clone() {
                            for c in cc.clone() {
                                codes[(x * rows + r) * cols + c] = e4m3::encode(at(x, r, c) / s);
                            }
                        }
                    }
                }
            }
            WeightFormat::Mxfp8 | WeightFormat::Mxfp4 => {
                let elem_max = if fmt == WeightFormat::Mxfp8 {
                    448.0
                } else {
                    6.0
                };
                for r in 0..rows {
                    for j in 0..cols / 32 {
                        let a = amax((j * 32..j * 32 + 32).map(|c| at(x, r, c)));
                        let byte = if a == 0.0 {
                            0
                        } else {
                            ue8m0::encode_ceil(a / elem_max)
                        };
                        byte_scales.push(byte);
                        let s = ue8m0::decode(byte);
                        for c in j * 32..j * 32 + 32 {
                            let v = at(x, r, c) / s;
                            codes[(x * rows + r) * cols + c] = if fp4 {
                                e2m1::encode(v)
                            } else {
                                e4m3::encode(v)
                            };
                        }
                    }
                }
            }
            WeightFormat::Nvfp4 => {
                let g = match given {
                    Some(g) => g[x],
                    None if expert_amax == 0.0 => 1.0,
                    None => expert_amax / (448.0 * 6.0),
                };
                globals.push(g);
                for r in 0..rows {
                    for j in 0..cols / 16 {
                        let a = amax((j * 16..j * 16 + 16).map(|c| at(x, r, c)));
                        let byte = e4m3::encode(a / 6.0 / g);
                        byte_scales.push(byte);
                        let s = e4m3::decode(byte) * g;
                        for c in j * 16..j * 16 + 16 {
                            codes[(x * rows + r) * cols + c] = if s == 0.0 {
                                0
                            } else {
                                e2m1::encode(at(x, r, c) / s)
                            };
                        }
                    }
                }
            }
        }
    }
    let data = match fmt {
        WeightFormat::Bf16 => w
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ if fp4 => codes.chunks(2).map(|p| p[0] | p[1] << 4).collect(),
        _ => codes,
    };
    let scales = match fmt {
        WeightFormat::Bf16 => BlockScales::None,
        WeightFormat::Fp8 => BlockScales::PerExpert(f32_scales),
        WeightFormat::Fp8Block => BlockScales::Block128(f32_scales),
        WeightFormat::Mxfp8 | WeightFormat::Mxfp4 => BlockScales::Ue8m0(byte_scales),
        WeightFormat::Nvfp4 => BlockScales::E4m3(byte_scales),
    };
    SpecWeights {
        data,
        scales,
        globals,
    }
}

/// Random weights: mostly uniform in ±amp, some exact zeros, some 20× outliers, and one all-zero
/// 32-block per expert (row 1, columns 32..64) so the amax = 0 rules run.
fn random_weights(
    rng: &mut SeededRng,
    experts: usize,
    rows: usize,
    cols: usize,
    amp: f32,
) -> Vec<f32> {
    let mut w: Vec<f32> = (0..experts * rows * cols)
        .map(|_| match rng.below(64) {
            0..=3 => 0.0,
            4 => rng.uniform(-20.0, 20.0) * amp,
            _ => rng.uniform(-amp, amp),
        })
        .collect();
    if rows > 1 && cols >= 64 {
        for x in 0..experts {
            w[(x * rows + 1) * cols + 32..(x * rows + 1) * cols + 64].fill(0.0);
        }
    }
    w
}

struct WeightCase {
    format: WeightFormat,
    experts: usize,
    rows: usize,
    cols: usize,
    amp: f32,
    globals: Option<Vec<f32>>,
    seed: u64,
}

fn check_weights(case: &WeightCase) -> QuantizedTensor {
    let WeightCase {
        format,
        experts,
        rows,
        cols,
        amp,
        seed,
        ..
    } = *case;
    let mut r = rng(
        &format!("{format} [{experts}, {rows}, {cols}] amp {amp}"),
        seed,
    );
    let w = random_weights(&mut r, experts, rows, cols, amp);
    let q = quantize_weights(format, experts, rows, cols, &w, case.globals.as_deref()).unwrap();
    let want = spec_quantize_weights(format, experts, rows, cols, &w, case.globals.as_deref());
    assert_eq!(
        (q.format, q.experts, q.rows, q.cols),
        (format, experts, rows, cols)
    );
    assert_eq!(
        q.data.len(),
        experts * q.expert_data_bytes(),
        "{format} data length"
    );
    if let Some(i) = (0..want.data.len()).find(|&i| q.data[i] != want.data[i]) {
        panic!("{format}: first differing data byte {i} (expert-row {}, byte {} of the row): got {:#04x}, want {:#04x}",
            i / q.row_data_bytes(), i % q.row_data_bytes(), q.data[i], want.data[i]);
    }
    match (&q.scales, &want.scales) {
        (BlockScales::PerExpert(a), BlockScales::PerExpert(b))
        | (BlockScales::Block128(a), BlockScales::Block128(b)) => {
            assert_eq!(a.len(), b.len(), "{format} scale count");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_eq!(
                    x.to_bits(),
                    y.to_bits(),
                    "{format} scale {i}: {x:e} vs {y:e}"
                );
            }
        }
        (got, want) => assert_eq!(got, want, "{format} scales"),
    }
    assert_eq!(
        q.global_scales
            .iter()
            .map(|g| g.to_bits())
            .collect::<Vec<_>>(),
        want.globals.iter().map(|g| g.to_bits()).collect::<Vec<_>>(),
        "{format} globals"
    );
    check_decoders(&q, &w);
    q
}

/// Element (x, r, c) from its code and the scale fields, without the library's decoders: (element
/// value, block scale as the quantizer computed it in f32, exact block scale × global in f64).
fn spec_dequant(q: &QuantizedTensor, x: usize, r: usize, c: usize) -> (f64, f32, f64) {
    let (rows, cols) = (q.rows, q.cols);
    let i = (x * rows + r) * cols + c;
    let elem = |fp4: bool| -> f64 {
        if fp4 {
            let b = q.data[i / 2];
            let code = if c & 1 == 0 { b & 0xF } else { b >> 4 };
            let mag = e2m1_definition(code & 7);
            if code >= 8 {
                -mag
            } else {
                mag
            }
        } else {
            e4m3::decode(q.data[i]) as f64
        }
    };
    let (elem, s32) = match &q.scales {
        BlockScales::None => (
            half::bf16::from_le_bytes([q.data[2 * i], q.data[2 * i + 1]]).to_f64(),
            1.0,
        ),
        BlockScales::PerExpert(s) => (elem(false), s[x]),
        BlockScales::Block128(s) => (
            elem(false),
            s[(x * rows.div_ceil(128) + r / 128) * cols.div_ceil(128) + c / 128],
        ),
        BlockScales::Ue8m0(b) => (
            elem(q.format == WeightFormat::Mxfp4),
            ue8m0::decode(b[(x * rows + r) * (cols / 32) + c / 32]),
        ),
        BlockScales::E4m3(b) => {
            let dec = e4m3::decode(b[(x * rows + r) * (cols / 16) + c / 16]);
            let g = q.global_scales[x];
            return (elem(true), dec * g, dec as f64 * g as f64);
        }
    };
    (elem, s32, s32 as f64)
}

/// Decoders against element × scale: f64 exact (nvfp4: element × dec(byte) × g, all in f64), f32
/// the same product rounded once with the f32 block scale; row ranges agree with whole decodes;
/// and the quantization error stays within the format's bound.
fn check_decoders(q: &QuantizedTensor, w: &[f32]) {
    let (rows, cols, fmt) = (q.rows, q.cols, q.format);
    let (max_elem, rel, abs) = match fmt {
        WeightFormat::Bf16 => (f64::INFINITY, 2f64.powi(-8), 0.0),
        WeightFormat::Mxfp4 | WeightFormat::Nvfp4 => (6.0, 0.25, 0.25),
        _ => (448.0, 2f64.powi(-4), 2f64.powi(-10)),
    };
    let mut d32 = vec![f32::NAN; rows * cols];
    let mut d64 = vec![f64::NAN; rows * cols];
    for x in 0..q.experts {
        q.decode_rows_f32(x, 0..rows, &mut d32);
        q.decode_rows_f64(x, 0..rows, &mut d64);
        for r in 0..rows {
            for c in 0..cols {
                let i = r * cols + c;
                let (elem, s32, s64) = spec_dequant(q, x, r, c);
                let (want64, want32) = (elem * s64, (elem * s32 as f64) as f32);
                assert_eq!(d64[i], want64, "{fmt} f64 decode [{x}, {r}, {c}]");
                assert_eq!(
                    d32[i].to_bits(),
                    want32.to_bits(),
                    "{fmt} f32 decode [{x}, {r}, {c}]"
                );
                let v = w[(x * rows + r) * cols + c] as f64;
                let s = s32 as f64;
                let bound = (v.abs() - max_elem * s).max(0.0) + rel * v.abs() + abs * s;
                assert!(
                    (d64[i] - v).abs() <= bound,
                    "{fmt} error at [{x}, {r}, {c}]: {v:e} → {:e} (bound {bound:e})",
                    d64[i]
                );
            }
        }
        // Any row range decodes to the same values as the whole expert.
        for range in [0..1, rows / 3..rows / 2 + 1, rows - 1..rows, 2..2] {
            let range: Range<usize> = range.start.min(rows)..range.end.min(rows);
            let mut part32 = vec![0f32; range.len() * cols];
            let mut part64 = vec![0f64; range.len() * cols];
            q.decode_rows_f32(x, range.clone(), &mut part32);
            q.decode_rows_f64(x, range.clone(), &mut part64);
            assert_eq!(
                part32[..],
                d32[range.start * cols..range.end * cols],
                "{fmt} f32 rows {range:?}"
            );
            assert_eq!(
                part64[..],
                d64[range.start * cols..range.end * cols],
                "{fmt} f64 rows {range:?}"
            );
        }
    }
}

#[test]
fn weight_quantizers_match_the_spec_loops_bit_for_bit() {
    let mut seed = 0x5EED_0000;
    for format in WeightFormat::ALL.iter().copied() {
        // Partial 128-blocks both ways; a GPT-OSS-like 2880-wide K; a tiny-amplitude expert set.
        for (experts, rows, cols, amp) in [
            (2, 160, 352, 0.3f32),
            (1, 130, 2880, 1.0),
            (3, 4, 64, 1e-6),
            (1, 2, 32, 2e4),
        ] {
            seed += 1;
            check_weights(&WeightCase {
                format,
                experts,
                rows,
                cols,
                amp,
                globals: None,
                seed,
            });
        }
    }
}

#[test]
fn nvfp4_weights_with_given_global_scales() {
    // ModelOpt's g, a g far too small (every scale byte saturates to 448) and one far too large
    // (most scale bytes round to 0, so those blocks quantize to zeros).
    for (i, g) in [[0.3f32 / 2688.0, 1.0 / 2688.0], [1e-9, 1e-8], [1e3, 5.0]]
        .into_iter()
        .enumerate()
    {
        let q = check_weights(&WeightCase {
            format: WeightFormat::Nvfp4,
            experts: 2,
            rows: 48,
            cols: 96,
            amp: 0.3,
            globals: Some(g.to_vec()),
            seed: 0x9_0000 + i as u64,
        });
        assert_eq!(q.global_scales, g.to_vec());
    }
}

fn data_bytes(q: &QuantizedTensor) -> Vec<u8> {
    q.data.to_vec()
}

#[test]
fn mxfp4_block_whose_amax_is_exactly_6_times_a_power_of_two() {
    // amax = 24 = 6·2^2 → s = ceil-pow2(4) = 4, byte 129; 24/4 = 6 (code 7), -3/4 = -0.75 ties to
    // -1 (code 10), 1.5/4 = 0.375 → 0.5 (code 1), 0.5/4 = 0.125 → 0 (code 0).
    let mut w = vec![0f32; 32];
    w[..4].copy_from_slice(&[24.0, -3.0, 1.5, 0.5]);
    let q = quantize_weights(WeightFormat::Mxfp4, 1, 1, 32, &w, None).unwrap();
    assert_eq!(q.scales, BlockScales::Ue8m0(vec![129]));
    assert_eq!(data_bytes(&q)[..2], [0xA7, 0x01]);
    // One ulp more and the scale doubles: 24.000002/8 ≈ 3 (code 5), -3/8 = -0.375 → -0.5 (9).
    w[0] = f32::from_bits(24f32.to_bits() + 1);
    let q = quantize_weights(WeightFormat::Mxfp4, 1, 1, 32, &w, None).unwrap();
    assert_eq!(q.scales, BlockScales::Ue8m0(vec![130]));
    assert_eq!(
        data_bytes(&q)[..2],
        [0x95, 0x00],
        "1.5/8 and 0.5/8 both round to 0"
    );
}

#[test]
fn mxfp8_block_whose_amax_is_448_times_a_power_of_two() {
    // amax = 56 = 448·2^-3 → byte 124, 56/2^-3 = 448 (0x7E); 1/2^-3 = 8 → 0x50.
    let mut w = vec![0f32; 32];
    w[5] = -56.0;
    w[6] = 1.0;
    let q = quantize_weights(WeightFormat::Mxfp8, 1, 1, 32, &w, None).unwrap();
    assert_eq!(q.scales, BlockScales::Ue8m0(vec![124]));
    assert_eq!(data_bytes(&q)[5..7], [0xFE, 0x50]);
}

#[test]
fn mx_blocks_with_amax_zero_get_byte_zero() {
    for format in [WeightFormat::Mxfp8, WeightFormat::Mxfp4] {
        let mut w = vec![0f32; 64];
        w[40] = 1.0;
        let q = quantize_weights(format, 1, 1, 64, &w, None).unwrap();
        let BlockScales::Ue8m0(b) = &q.scales else {
            panic!("{format}: {:?}", q.scales)
        };
        assert_eq!(b[0], 0, "{format}: all-zero block");
        assert_eq!(
            b[1],
            127 - if format == WeightFormat::Mxfp8 { 8 } else { 2 },
            "{format}: ceil-pow2(1/max)"
        );
        let mut d = vec![f32::NAN; 64];
        q.decode_rows_f32(0, 0..1, &mut d);
        assert!(
            d[..32].iter().all(|v| *v == 0.0),
            "{format}: zeros decode to zero"
        );
        assert_eq!(d[40], 1.0);
    }
}

#[test]
fn nvfp4_block_with_a_zero_scale_byte_decodes_to_zeros() {
    // g = 1: the first block has amax 6 → byte E4M3(1) = 0x38; the second has amax/6 = 2^-10, half
    // the smallest E4M3 subnormal, which ties to 0 → s = 0 → every element 0 though inputs are not.
    let mut w = vec![0f32; 32];
    w[0] = 6.0;
    w[1] = -2.0;
    for (i, v) in w[16..].iter_mut().enumerate() {
        *v = if i % 2 == 0 {
            6.0 * 2f32.powi(-10)
        } else {
            -1e-4
        };
    }
    let q = quantize_weights(WeightFormat::Nvfp4, 1, 1, 32, &w, Some(&[1.0])).unwrap();
    assert_eq!(q.scales, BlockScales::E4m3(vec![0x38, 0x00]));
    assert_eq!(data_bytes(&q)[0], 0xC7, "6 → code 7, -2 → code 12");
    assert!(
        data_bytes(&q)[8..].iter().all(|b| *b == 0),
        "zero-scale block has code-0 elements"
    );
    let mut d = vec![f64::NAN; 32];
    q.decode_rows_f64(0, 0..1, &mut d);
    assert_eq!(d[..2], [6.0, -2.0]);
    assert!(d[16..].iter().all(|v| *v == 0.0));
}

#[test]
fn all_zero_experts_get_floor_scales_and_unit_globals() {
    let w = vec![0f32; 2 * 16 * 32];
    let fp8 = quantize_weights(WeightFormat::Fp8, 2, 16, 32, &w, None).unwrap();
    assert_eq!(fp8.scales, BlockScales::PerExpert(vec![1e-10 / 448.0; 2]));
    let block = quantize_weights(WeightFormat::Fp8Block, 2, 16, 32, &w, None).unwrap();
    assert_eq!(block.scales, BlockScales::Block128(vec![1e-10 / 448.0; 2]));
    let nv = quantize_weights(WeightFormat::Nvfp4, 2, 16, 32, &w, None).unwrap();
    assert_eq!(nv.global_scales, vec![1.0, 1.0], "g = 1 instead of 0/0");
    assert_eq!(nv.scales, BlockScales::E4m3(vec![0; 2 * 16 * 2]));
    for q in [&fp8, &block, &nv] {
        assert!(q.data.iter().all(|b| *b == 0), "{}", q.format);
    }
}

#[test]
fn fp8_block_partial_2880_wide_row() {
    // [1, 130, 2880]: 2 × 23 blocks; the last column block is 64 wide, the last row block 2 rows.
    let (rows, cols) = (130, 2880);
    let mut w = vec![0.5f32; rows * cols];
    w[129 * cols + 2879] = -7.0; // the only value above 0.5 in block (1, 22)
    w[3 * cols + 2870] = 1.0; // block (0, 22)
    let q = quantize_weights(WeightFormat::Fp8Block, 1, rows, cols, &w, None).unwrap();
    let BlockScales::Block128(s) = &q.scales else {
        panic!("{:?}", q.scales)
    };
    assert_eq!(s.len(), 2 * 23);
    assert_eq!(s[22], 1.0 / 448.0);
    assert_eq!(
        s[23 + 22],
        7.0 / 448.0,
        "scale over the 2 × 64 elements present"
    );
    assert_eq!(s[23 + 21], 0.5 / 448.0);
    assert_eq!(q.data[129 * cols + 2879], 0xFE, "-7 / (7/448) = -448");
    assert_eq!(
        q.data[128 * cols + 2816],
        e4m3::encode(32.0),
        "0.5 / (7/448) = 32"
    );
    assert_eq!(e4m3::encode(32.0), 0x60);
}

#[test]
fn weight_quantizers_are_deterministic_and_f32_equals_repeated_runs() {
    let mut r = rng("determinism", 0xDE7);
    let w = random_weights(&mut r, 2, 64, 256, 1.0);
    for format in WeightFormat::ALL.iter().copied() {
        let a = quantize_weights(format, 2, 64, 256, &w, None).unwrap();
        let b = quantize_weights(format, 2, 64, 256, &w, None).unwrap();
        assert_eq!(
            (&a.data[..], &a.scales, &a.global_scales),
            (&b.data[..], &b.scales, &b.global_scales),
            "{format}"
        );
    }
}

#[test]
fn decoders_read_unaligned_mapped_bytes() {
    let mut r = rng("unaligned", 0x0DD);
    let w = random_weights(&mut r, 2, 8, 64, 1.0);
    for format in WeightFormat::ALL.iter().copied() {
        let q = quantize_weights(format, 2, 8, 64, &w, None).unwrap();
        // Put the data at an odd offset of a memory-mapped file, as a layer file may.
        let path = std::env::temp_dir().join(format!(
            "moerunner-formats-{}-{format}.bin",
            std::process::id()
        ));
        let mut bytes = vec![0xAAu8];
        bytes.extend_from_slice(&q.data);
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the file is private to this test and not modified while mapped.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
        let mapped = QuantizedTensor {
            data: Bytes::Mapped {
                map,
                start: 1,
                len: q.data.len(),
            },
            ..q.clone()
        };
        for x in 0..2 {
            let (mut a, mut b) = (vec![0f32; 8 * 64], vec![0f32; 8 * 64]);
            q.decode_rows_f32(x, 0..8, &mut a);
            mapped.decode_rows_f32(x, 0..8, &mut b);
            assert_eq!(a, b, "{format} expert {x}");
        }
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn weight_quantizer_errors_name_the_problem() {
    let cases: Vec<(Result<QuantizedTensor, moerunner::MoeError>, &str)> = vec![
        (
            quantize_weights(WeightFormat::Fp8, 1, 2, 2, &[0.5; 3], None),
            "3 values do not match [1, 2, 2]",
        ),
        (
            quantize_weights(WeightFormat::Bf16, 1, 1, 2, &[0.5, f32::NAN], None),
            "element [0, 0, 1] is NaN",
        ),
        (
            quantize_weights(
                WeightFormat::Fp8Block,
                1,
                2,
                2,
                &[0.5, 1.0, f32::INFINITY, 0.0],
                None,
            ),
            "element [0, 1, 0] is inf",
        ),
        (
            quantize_weights(WeightFormat::Mxfp8, 1, 2, 48, &[0.5; 96], None),
            "multiple of 32",
        ),
        (
            quantize_weights(WeightFormat::Mxfp4, 1, 2, 48, &[0.5; 96], None),
            "multiple of 32",
        ),
        (
            quantize_weights(WeightFormat::Nvfp4, 1, 1, 24, &[0.5; 24], None),
            "multiple of 16",
        ),
        (
            quantize_weights(WeightFormat::Nvfp4, 1, 1, 16, &[0.5; 16], Some(&[f32::NAN])),
            "global_scales",
        ),
        (
            quantize_weights(WeightFormat::Nvfp4, 1, 1, 16, &[0.5; 16], Some(&[0.0])),
            "not a finite positive",
        ),
        (
            quantize_weights(WeightFormat::Nvfp4, 2, 1, 16, &[0.5; 32], Some(&[1.0])),
            "1 values for 2 experts",
        ),
        (
            quantize_weights(WeightFormat::Fp8, usize::MAX, 2, 2, &[], None),
            "overflows",
        ),
    ];
    for (i, (result, want)) in cases.into_iter().enumerate() {
        let err = result
            .err()
            .unwrap_or_else(|| panic!("case {i} should fail with `{want}`"))
            .to_string();
        assert!(
            err.contains(want),
            "case {i}: `{err}` should contain `{want}`"
        );
    }
    // fp8_block takes partial blocks, so any K works; global scales are ignored by other formats.
    assert!(quantize_weights(WeightFormat::Fp8Block, 1, 1, 3, &[1.0; 3], None).is_ok());
    assert!(quantize_weights(WeightFormat::Fp8, 1, 1, 3, &[1.0; 3], Some(&[])).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Activation quantizers

/// What an activation quantizer must produce, row by row and block by block from the spec text.
fn spec_quantize_rows(
    fmt: ActivationFormat,
    x: &[f32],
    rows: usize,
    cols: usize,
    stat: f32,
) -> (usize, Vec<f32>, Vec<f32>) {
    let block = match fmt {
        ActivationFormat::Bf16 | ActivationFormat::Fp8 => cols,
        ActivationFormat::Fp8Block => 128,
        ActivationFormat::Mxfp8 => 32,
        ActivationFormat::Nvfp4 | ActivationFormat::Nvfp4PerToken => 16,
    };
    let (mut values, mut scales) = (Vec::new(), Vec::new());
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let g = if fmt == ActivationFormat::Nvfp4PerToken {
            amax(row.iter().copied()) / (448.0 * 6.0)
        } else {
            stat
        };
        for blk in row.chunks(block) {
            let a = amax(blk.iter().copied());
            let s = match fmt {
                ActivationFormat::Bf16 => 1.0,
                ActivationFormat::Fp8 => stat,
                ActivationFormat::Fp8Block => a.max(1e-10) / 448.0,
                ActivationFormat::Mxfp8 => ue8m0::decode(if a == 0.0 {
                    0
                } else {
                    ue8m0::encode_ceil(a / 448.0)
                }),
                ActivationFormat::Nvfp4 | ActivationFormat::Nvfp4PerToken if g == 0.0 => 0.0,
                ActivationFormat::Nvfp4 | ActivationFormat::Nvfp4PerToken => {
                    e4m3::decode(e4m3::encode(a / 6.0 / g)) * g
                }
            };
            scales.push(s);
            for &v in blk {
                values.push(match fmt {
                    ActivationFormat::Bf16 => half::bf16::from_f32(v).to_f32(),
                    ActivationFormat::Nvfp4 | ActivationFormat::Nvfp4PerToken if s == 0.0 => 0.0,
                    ActivationFormat::Nvfp4 | ActivationFormat::Nvfp4PerToken => {
                        e2m1::decode(e2m1::encode(v / s))
                    }
                    _ => e4m3::decode(e4m3::encode(v / s)),
                });
            }
        }
    }
    (block, values, scales)
}

/// Activation-like rows: uniform ±amp with outliers, one all-zero row and one all-zero 32-block.
fn random_rows(rng: &mut SeededRng, rows: usize, cols: usize, amp: f32) -> Vec<f32> {
    let mut x: Vec<f32> = (0..rows * cols)
        .map(|_| {
            if rng.below(50) == 0 {
                rng.uniform(-30.0, 30.0) * amp
            } else {
                rng.uniform(-amp, amp)
            }
        })
        .collect();
    if rows >= 3 {
        x[2 * cols..3 * cols].fill(0.0);
        x[32..64.min(cols)].fill(0.0);
    }
    x
}

fn check_rows(fmt: ActivationFormat, rows: usize, cols: usize, amp: f32, seed: u64) {
    let mut r = rng(&format!("{fmt} [{rows}, {cols}] amp {amp}"), seed);
    let x = random_rows(&mut r, rows, cols, amp);
    let stat = amp * 8.0
        / if fmt == ActivationFormat::Nvfp4 {
            2688.0
        } else {
            448.0
        };
    let q = quantize_rows(fmt, &x, rows, cols, fmt.needs_input_scale().then_some(stat)).unwrap();
    let (block, values, scales) = spec_quantize_rows(fmt, &x, rows, cols, stat);
    assert_eq!(
        (q.format, q.rows, q.cols, q.block),
        (fmt, rows, cols, block)
    );
    assert_eq!(q.blocks_per_row(), cols.div_ceil(block));
    assert_eq!(q.scales.len(), scales.len(), "{fmt} scale count");
    for (i, (a, b)) in q.scales.iter().zip(&scales).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{fmt} scale [{}, {}]: {a:e} vs {b:e}",
            i / q.blocks_per_row(),
            i % q.blocks_per_row()
        );
    }
    assert_eq!(q.values.len(), values.len());
    for (i, (a, b)) in q.values.iter().zip(&values).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{fmt} value [{}, {}]: {a:e} vs {b:e}",
            i / cols,
            i % cols
        );
    }
    // Dequantized rows: f32 is the f64 product rounded once; and close to the input.
    let deq = q.dequantize();
    let mut row64 = vec![0f64; cols];
    let (max_elem, rel, abs) = match fmt {
        ActivationFormat::Bf16 => (f64::INFINITY, 2f64.powi(-8), 0.0),
        ActivationFormat::Nvfp4 | ActivationFormat::Nvfp4PerToken => (6.0, 0.25, 0.25),
        _ => (448.0, 2f64.powi(-4), 2f64.powi(-10)),
    };
    for rr in 0..rows {
        q.dequantize_row_f64(rr, &mut row64);
        for c in 0..cols {
            let (v, d) = (x[rr * cols + c] as f64, row64[c]);
            assert_eq!(deq[rr * cols + c], d as f32, "{fmt} dequantize [{rr}, {c}]");
            let s = q.scales[rr * q.blocks_per_row() + c / block] as f64;
            if s == 0.0 {
                continue; // nvfp4 zero-scale blocks quantize to 0 by definition
            }
            let bound = (v.abs() - max_elem * s).max(0.0) + rel * v.abs() + abs * s;
            assert!(
                (d - v).abs() <= bound,
                "{fmt} error at [{rr}, {c}]: {v:e} → {d:e} (bound {bound:e})"
            );
        }
    }
    // Reusing a dirty, larger buffer gives the same result.
    let mut reused = quantize_rows(fmt, &vec![3.0; 5 * 4096], 5, 4096, Some(1.0)).unwrap();
    reused.rows = rows;
    reused.cols = cols;
    quantize_rows_into(&x, fmt.needs_input_scale().then_some(stat), &mut reused).unwrap();
    assert_eq!(reused, q, "{fmt} quantize_rows_into into a reused buffer");
}

#[test]
fn activation_quantizers_match_the_spec_loops_bit_for_bit() {
    let mut seed = 0xAC7_0000;
    for fmt in ActivationFormat::ALL.iter().copied() {
        for (rows, cols, amp) in [
            (3, 288, 3.0f32),
            (4, 2880, 1.0),
            (5, 64, 1e-5),
            (1, 32, 5e3),
        ] {
            seed += 1;
            check_rows(fmt, rows, cols, amp, seed);
        }
    }
}

#[test]
fn activation_hand_computed_cases() {
    // fp8_block over a 2880-wide row: 22 full blocks and a partial one of 64.
    let mut x = vec![0.25f32; 2880];
    x[2879] = -7.0;
    let q = quantize_rows(ActivationFormat::Fp8Block, &x, 1, 2880, None).unwrap();
    assert_eq!(q.scales.len(), 23);
    assert_eq!(q.scales[0], 0.25 / 448.0);
    assert_eq!(q.scales[22], 7.0 / 448.0);
    assert_eq!(q.values[2879], -448.0);
    assert_eq!(q.values[2816], 16.0, "0.25 / (7/448)");

    // mxfp8: a zero block keeps byte 0 (scale 2^-127) and zero values.
    let mut x = vec![0f32; 64];
    x[33] = 3.0;
    let q = quantize_rows(ActivationFormat::Mxfp8, &x, 1, 64, None).unwrap();
    assert_eq!(
        q.scales,
        vec![2f32.powi(-127), 2f32.powi(-7)],
        "3/448 → ceil-pow2 = 2^-7"
    );
    assert_eq!(q.values[33], 384.0);
    assert!(q.values[..32].iter().all(|v| *v == 0.0));

    // nvfp4 per token: g_row = amax/2688; a zero row gets scales 0 and values 0.
    let mut x = vec![0f32; 32];
    x[0] = 2688.0 * 0.5; // g = 0.5; block 0: amax/6/g = 448 → byte 0x7E, s = 224
    x[1] = 224.0 * 3.0;
    let q = quantize_rows(ActivationFormat::Nvfp4PerToken, &x, 2, 16, None).unwrap();
    assert_eq!(q.scales, vec![224.0, 0.0]);
    assert_eq!(q.values[..2], [6.0, 3.0]);
    assert!(q.values[16..].iter().all(|v| v.to_bits() == 0));

    // bf16 rounds each value to nearest even, one block per row with scale 1.
    let x = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -0.0];
    let q = quantize_rows(ActivationFormat::Bf16, &x, 1, 3, None).unwrap();
    assert_eq!((q.block, &q.scales[..]), (3, &[1.0][..]));
    assert_eq!(q.values, vec![1.0, 1.0 + 2f32.powi(-6), -0.0]);

    // fp8 static: x / s with s the given scale, saturating at ±448.
    let q = quantize_rows(
        ActivationFormat::Fp8,
        &[1.0, -100.0, 0.017],
        1,
        3,
        Some(0.125),
    )
    .unwrap();
    assert_eq!(q.scales, vec![0.125]);
    assert_eq!(q.values, vec![8.0, -448.0, 0.140_625], "0.136 → 9 · 2^-6");
}

#[test]
fn activation_nan_poisons_its_block_instead_of_vanishing() {
    for fmt in ActivationFormat::ALL.iter().copied() {
        let mut x = vec![0.5f32; 64];
        x[3] = f32::NAN;
        let q = quantize_rows(fmt, &x, 1, 64, Some(0.01)).unwrap();
        let deq = q.dequantize();
        assert!(deq[..16].iter().any(|v| v.is_nan()), "{fmt}: NaN lost");
        // Per-token NVFP4's row global is poisoned too, so the whole row is NaN there.
        let contained = q.block <= 32 && fmt != ActivationFormat::Nvfp4PerToken;
        assert!(
            !contained || !deq[32..].iter().any(|v| v.is_nan()),
            "{fmt}: NaN leaked to another block"
        );
    }
}

#[test]
fn activation_quantizer_errors_name_the_problem() {
    let x = [0.5f32; 64];
    for fmt in [ActivationFormat::Fp8, ActivationFormat::Nvfp4] {
        for bad in [
            None,
            Some(f32::NAN),
            Some(f32::INFINITY),
            Some(0.0),
            Some(-1.0),
        ] {
            let err = quantize_rows(fmt, &x, 2, 32, bad).unwrap_err().to_string();
            assert!(
                err.contains("input_scale") && err.contains("static"),
                "{fmt} with {bad:?}: {err}"
            );
        }
    }
    let err = quantize_rows(ActivationFormat::Bf16, &x, 3, 32, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("64 values do not match [3, 32]"), "{err}");
    for (fmt, k) in [
        (ActivationFormat::Mxfp8, 40),
        (ActivationFormat::Nvfp4PerToken, 24),
    ] {
        let err = quantize_rows(fmt, &x[..k], 1, k, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("multiple of"), "{fmt}: {err}");
    }
    // fp8_block and the row-wide formats take any K; the static scale is ignored where unused.
    for fmt in [
        ActivationFormat::Bf16,
        ActivationFormat::Fp8Block,
        ActivationFormat::Mxfp8,
    ] {
        assert!(
            quantize_rows(fmt, &x[..32], 1, 32, Some(f32::NAN)).is_ok(),
            "{fmt}"
        );
    }
    // On error, a reused buffer is left as it was.
    let mut q = quantize_rows(ActivationFormat::Fp8Block, &x, 1, 64, None).unwrap();
    let before = q.clone();
    q.rows = 7;
    assert!(quantize_rows_into(&x, None, &mut q).is_err());
    q.rows = 1;
    assert_eq!(q, before);
}

#[test]
fn empty_inputs_are_fine() {
    for fmt in ActivationFormat::ALL.iter().copied() {
        let q = quantize_rows(fmt, &[], 0, 64, Some(1.0)).unwrap();
        assert!(
            q.values.is_empty() && q.scales.is_empty() && q.dequantize().is_empty(),
            "{fmt}"
        );
    }
    let mut q = QuantizedRows::empty(ActivationFormat::Mxfp8);
    quantize_rows_into(&[], None, &mut q).unwrap();
    for format in WeightFormat::ALL.iter().copied() {
        let q = quantize_weights(format, 0, 4, 32, &[], None).unwrap();
        assert_eq!(q.data.len(), 0, "{format}");
    }
}
