//! Codecs exhaustively against independent brute-force oracles; quantizers bit-exact against
//! straightforward block loops written from the spec text; scale layout against its 5-D view.

use moerunner::config::{ActivationFormat, WeightFormat};
use moerunner::formats::{bf16, e2m1, e4m3, quantize_rows, quantize_weights, scale_layout, ue8m0};
use moerunner::rng::SeededRng;
use moerunner::weights::BlockScales;

/// Nearest of `table` (ascending magnitudes indexed by code) to `a`, ties to the even code.
fn nearest_even(table: &[f64], a: f64) -> usize {
    let mut best = 0;
    for c in 1..table.len() {
        let (d_best, d_c) = ((table[best] - a).abs(), (table[c] - a).abs());
        if d_c < d_best || (d_c == d_best && c % 2 == 0 && best % 2 == 1) {
            best = c;
        }
    }
    best
}

fn e4m3_oracle(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return sign | 0x7F;
    }
    if x.abs() >= 448.0 {
        return sign | 0x7E;
    }
    // Positive codes 0..=126 in order, computed from the definition (not the codec's table).
    let table: Vec<f64> = (0..=126u32)
        .map(|c| {
            let (e, m) = ((c >> 3) as i32, (c & 7) as f64);
            if e == 0 { m / 8.0 * 2f64.powi(-6) } else { 2f64.powi(e - 7) * (1.0 + m / 8.0) }
        })
        .collect();
    sign | nearest_even(&table, x.abs() as f64) as u8
}

#[test]
fn e4m3_every_code_decodes_to_its_definition_and_reencodes() {
    for c in 0..=255u8 {
        let v = e4m3::decode(c);
        if c & 0x7F == 0x7F {
            assert!(v.is_nan(), "code {c:#x}");
            assert_eq!(e4m3::encode(v) & 0x7F, 0x7F);
            continue;
        }
        let (e, m) = (((c >> 3) & 0xF) as i32, (c & 7) as f64);
        let mag = if e == 0 { m / 8.0 * 2f64.powi(-6) } else { 2f64.powi(e - 7) * (1.0 + m / 8.0) };
        let want = if c & 0x80 != 0 { -mag } else { mag };
        assert_eq!(v as f64, want, "decode({c:#x})");
        assert_eq!(e4m3::encode(v), c, "encode(decode({c:#x}))");
    }
    assert_eq!(e4m3::decode(0x7E), 448.0);
}

#[test]
fn e4m3_ties_midpoints_saturation_and_specials() {
    for c in 0..126u8 {
        let (lo, hi) = (e4m3::decode(c) as f64, e4m3::decode(c + 1) as f64);
        let mid = ((lo + hi) / 2.0) as f32;
        assert_eq!(mid as f64, (lo + hi) / 2.0, "midpoint exact in f32");
        let even = if c % 2 == 0 { c } else { c + 1 };
        assert_eq!(e4m3::encode(mid), even, "tie between {c:#x} and {:#x}", c + 1);
        assert_eq!(e4m3::encode(-mid), 0x80 | even);
        assert_eq!(e4m3::encode(f32::from_bits(mid.to_bits() + 1)), c + 1, "just above midpoint {c:#x}");
        assert_eq!(e4m3::encode(f32::from_bits(mid.to_bits() - 1)), c, "just below midpoint {c:#x}");
    }
    for big in [448.0f32, 449.0, 464.0, 480.0, 1e6, f32::MAX, f32::INFINITY] {
        assert_eq!(e4m3::encode(big), 0x7E, "{big}");
        assert_eq!(e4m3::encode(-big), 0xFE, "-{big}");
    }
    assert_eq!(e4m3::encode(f32::NAN) & 0x7F, 0x7F);
    assert_eq!(e4m3::encode(0.0), 0x00);
    assert_eq!(e4m3::encode(-0.0), 0x80);
    assert_eq!(e4m3::encode(f32::from_bits(1)), 0x00, "f32 subnormal rounds to 0");
    assert_eq!(e4m3::encode(2f32.powi(-10)), 0x00, "half the smallest subnormal ties to 0 (even)");
    assert_eq!(e4m3::encode(3.0 * 2f32.powi(-10)), 0x02, "1.5 subnormal steps ties to 2 (even)");
}

#[test]
fn e4m3_encode_matches_oracle_on_random_values() {
    let seed = 0xE4_43;
    println!("seed {seed}");
    let mut rng = SeededRng::new(seed);
    for _ in 0..200_000 {
        // Exponents spread over the whole E4M3 range and beyond.
        let x = rng.uniform(-1.0, 1.0) * 2f32.powi(rng.below(30) as i32 - 14);
        assert_eq!(e4m3::encode(x), e4m3_oracle(x), "x = {x:e} ({:#x})", x.to_bits());
    }
}

#[test]
fn e2m1_codes_ties_saturation() {
    let defined = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    for c in 0..16u8 {
        let want = if c >= 8 { -defined[(c - 8) as usize] } else { defined[c as usize] };
        assert_eq!(e2m1::decode(c), want);
        assert_eq!(e2m1::decode(c).is_sign_negative(), c >= 8, "code {c} sign");
        assert_eq!(e2m1::encode(e2m1::decode(c)), c);
    }
    // The spec's tie list.
    for (x, want) in [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)] {
        assert_eq!(e2m1::decode(e2m1::encode(x)), want, "{x}");
        assert_eq!(e2m1::decode(e2m1::encode(-x)), -want, "-{x}");
    }
    for big in [6.0f32, 7.0, 100.0, f32::INFINITY] {
        assert_eq!(e2m1::encode(big), 7);
        assert_eq!(e2m1::encode(-big), 15);
    }
    let table: Vec<f64> = defined.iter().map(|v| *v as f64).collect();
    let mut rng = SeededRng::new(0xE2_41);
    for _ in 0..100_000 {
        let x = rng.uniform(-7.0, 7.0);
        let want = nearest_even(&table, x.abs() as f64) as u8 | if x < 0.0 { 8 } else { 0 };
        assert_eq!(e2m1::encode(x), want, "x = {x}");
    }
    assert_eq!(e2m1::pack(0x3, 0xA), 0xA3, "element 2i in the low nibble");
}

#[test]
fn ue8m0_decode_and_ceil_rule() {
    for e in 0..=254u8 {
        assert_eq!(ue8m0::decode(e) as f64, 2f64.powi(e as i32 - 127), "decode({e})");
        assert_eq!(ue8m0::encode_ceil(ue8m0::decode(e)), e, "exact powers map to themselves");
    }
    assert!(ue8m0::decode(255).is_nan());
    assert_eq!(ue8m0::encode_ceil(0.0), 0);
    assert_eq!(ue8m0::encode_ceil(f32::INFINITY), 254);
    assert_eq!(ue8m0::encode_ceil(1e-45), 0, "clamped to 2^-127");
    let oracle = |s: f32| -> u8 {
        (-127..=127).find(|&c| 2f64.powi(c) >= s as f64).map_or(254, |c| (c + 127) as u8)
    };
    let mut rng = SeededRng::new(0x0E8);
    for _ in 0..100_000 {
        let s = rng.uniform(0.5, 1.0) * 2f32.powi(rng.below(280) as i32 - 150);
        if s > 0.0 {
            assert_eq!(ue8m0::encode_ceil(s), oracle(s), "s = {s:e}");
        }
    }
}

#[test]
fn bf16_is_round_to_nearest_even() {
    let oracle = |x: f32| -> u16 {
        let b = x.to_bits();
        ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    };
    let mut rng = SeededRng::new(0xBF16);
    for _ in 0..1_000_000 {
        let x = f32::from_bits(rng.next_u64() as u32);
        if x.is_nan() {
            assert!(bf16::decode(bf16::encode(x)).is_nan());
        } else if (oracle(x) & 0x7F80) != 0x7F80 || x.is_infinite() {
            assert_eq!(bf16::encode(x), oracle(x), "{:#x}", x.to_bits());
        }
    }
    // Exact ties: 1 + 2^-8 lies between 1 and 1 + 2^-7; goes to the even (1.0).
    assert_eq!(bf16::decode(bf16::encode(1.0 + 2f32.powi(-8))), 1.0);
    assert_eq!(bf16::decode(bf16::encode(1.0 + 3.0 * 2f32.powi(-8))), 1.0 + 2f32.powi(-6));
}

#[test]
fn swizzle_matches_the_permuted_view_and_round_trips() {
    for (rows, blocks) in [(128usize, 4usize), (130, 5), (256, 12), (1, 1), (300, 90)] {
        let bp = blocks.div_ceil(4) * 4;
        let n_kt = bp / 4;
        let linear: Vec<u8> = (0..rows * blocks).map(|i| (i % 251) as u8 + 1).collect();
        let sw = scale_layout::swizzle_128x4(&linear, rows, blocks);
        assert_eq!(sw.len(), rows.div_ceil(128) * 128 * bp);
        for m in 0..rows {
            for j in 0..blocks {
                // View [M/128, 4, 32, nB/4, 4] permuted to [M/128, nB/4, 32, 4, 4].
                let (a, b, c, d, e) = (m / 128, (m % 128) / 32, m % 32, j / 4, j % 4);
                let off = (((a * n_kt + d) * 32 + c) * 4 + b) * 4 + e;
                assert_eq!(sw[off], linear[m * blocks + j], "({m}, {j})");
            }
        }
        assert_eq!(sw.iter().filter(|&&b| b == 0).count(), sw.len() - rows * blocks, "padding is zero");
        assert_eq!(scale_layout::unswizzle_128x4(&sw, rows, blocks), linear);
    }
}

fn random(seed: u64, n: usize, amp: f32) -> Vec<f32> {
    let mut rng = SeededRng::new(seed);
    (0..n).map(|_| rng.uniform(-amp, amp)).collect()
}

#[test]
fn weight_quantizers_are_bit_exact_with_the_spec_rules() {
    let (e, rows, cols) = (2, 160, 352); // partial 128-blocks in both directions
    let seed = 0x5EED;
    println!("seed {seed}");
    let mut w = random(seed, e * rows * cols, 0.3);
    w[7] = 0.0; // and one all-zero mx block in expert 1
    for v in &mut w[rows * cols + 64..rows * cols + 96] {
        *v = 0.0;
    }
    let at = |x: usize, r: usize, c: usize| w[(x * rows + r) * cols + c];
    for fmt in WeightFormat::ALL.iter().copied() {
        let q = quantize_weights(fmt, e, rows, cols, &w, None).unwrap();
        for x in 0..e {
            let expert = &w[x * rows * cols..(x + 1) * rows * cols];
            let amax_e = expert.iter().fold(0f32, |m, v| m.max(v.abs()));
            for r in 0..rows {
                for c in 0..cols {
                    let v = at(x, r, c);
                    let (elem, scale): (u8, f64) = match (&q.scales, fmt) {
                        (BlockScales::None, _) => {
                            let b = &q.data[((x * rows + r) * cols + c) * 2..][..2];
                            assert_eq!(u16::from_le_bytes([b[0], b[1]]), bf16::encode(v));
                            continue;
                        }
                        (BlockScales::PerExpert(s), _) => {
                            assert_eq!(s[x], amax_e.max(1e-10) / 448.0);
                            (e4m3::encode(v / s[x]), s[x] as f64)
                        }
                        (BlockScales::Block128(s), _) => {
                            let (bi, bj) = (r / 128, c / 128);
                            let mut a = 0f32;
                            for rr in bi * 128..((bi + 1) * 128).min(rows) {
                                for cc in bj * 128..((bj + 1) * 128).min(cols) {
                                    a = a.max(at(x, rr, cc).abs());
                                }
                            }
                            let sv = s[(x * rows.div_ceil(128) + bi) * cols.div_ceil(128) + bj];
                            assert_eq!(sv, a.max(1e-10) / 448.0);
                            (e4m3::encode(v / sv), sv as f64)
                        }
                        (BlockScales::Ue8m0(s), _) => {
                            let j = c / 32;
                            let a = (j * 32..j * 32 + 32).fold(0f32, |m, cc| m.max(at(x, r, cc).abs()));
                            let elem_max = if fmt == WeightFormat::Mxfp8 { 448.0 } else { 6.0 };
                            let want = if a == 0.0 { 0 } else { ue8m0::encode_ceil(a / elem_max) };
                            let byte = s[(x * rows + r) * (cols / 32) + j];
                            assert_eq!(byte, want);
                            let sv = ue8m0::decode(byte);
                            let code = if fmt == WeightFormat::Mxfp8 { e4m3::encode(v / sv) } else { e2m1::encode(v / sv) };
                            (code, sv as f64)
                        }
                        (BlockScales::E4m3(s), _) => {
                            let g = q.global_scales[x];
                            assert_eq!(g, amax_e / 2688.0);
                            let j = c / 16;
                            let a = (j * 16..j * 16 + 16).fold(0f32, |m, cc| m.max(at(x, r, cc).abs()));
                            let byte = s[(x * rows + r) * (cols / 16) + j];
                            assert_eq!(byte, e4m3::encode(a / 6.0 / g));
                            let sv = e4m3::decode(byte) * g;
                            (if sv == 0.0 { 0 } else { e2m1::encode(v / sv) }, sv as f64)
                        }
                    };
                    let got = if fmt.is_fp4() {
                        let b = q.data[((x * rows + r) * cols + c) / 2];
                        if c % 2 == 0 { b & 0xF } else { b >> 4 }
                    } else {
                        q.data[(x * rows + r) * cols + c]
                    };
                    assert_eq!(got, elem, "{fmt} element [{x}, {r}, {c}]");
                    let _ = scale;
                }
            }
            // Decoders agree with each other and with element × scale.
            let mut d32 = vec![0f32; rows * cols];
            let mut d64 = vec![0f64; rows * cols];
            q.decode_rows_f32(x, 0..rows, &mut d32);
            q.decode_rows_f64(x, 0..rows, &mut d64);
            for i in 0..rows * cols {
                // nvfp4's f32 path rounds dec(byte)·g to f32 first: one ulp apart at most.
                assert!((d32[i] as f64 - d64[i]).abs() <= d64[i].abs() * 2f64.powi(-23), "{fmt} decode [{x}, {i}]");
                let tol = match fmt {
                    WeightFormat::Bf16 => 2f64.powi(-8),
                    WeightFormat::Mxfp4 | WeightFormat::Nvfp4 => 0.26,
                    _ => 2f64.powi(-4),
                };
                assert!((d64[i] - expert[i] as f64).abs() <= tol * amax_e as f64 + 1e-30, "{fmt} round trip [{x}, {i}]");
            }
            let mut part = vec![0f32; 3 * cols];
            q.decode_rows_f32(x, 5..8, &mut part);
            assert_eq!(part[..], d32[5 * cols..8 * cols], "{fmt} row range");
        }
    }
}

#[test]
fn weight_quantizer_errors_name_the_problem() {
    assert!(quantize_weights(WeightFormat::Mxfp4, 1, 2, 48, &[0.5; 96], None).unwrap_err().to_string().contains("multiple of 32"));
    assert!(quantize_weights(WeightFormat::Fp8, 1, 2, 2, &[0.5; 3], None).is_err());
    assert!(quantize_weights(WeightFormat::Bf16, 1, 1, 2, &[0.5, f32::NAN], None).unwrap_err().to_string().contains("not finite"));
    assert!(quantize_weights(WeightFormat::Nvfp4, 1, 1, 16, &[0.5; 16], Some(&[f32::NAN])).is_err());
}

#[test]
fn activation_quantizers_follow_their_rules() {
    let (rows, cols) = (3, 288); // 2.25 fp8 blocks
    let mut x = random(0xAC7, rows * cols, 3.0);
    for v in &mut x[2 * cols..] {
        *v = 0.0; // a zero row
    }
    for fmt in ActivationFormat::ALL.iter().copied() {
        let stat = fmt.needs_input_scale().then_some(0.01f32);
        let q = quantize_rows(fmt, &x, rows, cols, stat).unwrap();
        let nb = q.blocks_per_row();
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let row_amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            for c in 0..cols {
                let (j, v) = (c / q.block, row[c]);
                let block = &row[j * q.block..((j + 1) * q.block).min(cols)];
                let a = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = q.scales[r * nb + j];
                let (want_s, want_v) = match fmt {
                    ActivationFormat::Bf16 => (1.0, bf16::decode(bf16::encode(v))),
                    ActivationFormat::Fp8 => (0.01, e4m3::decode(e4m3::encode(v / 0.01))),
                    ActivationFormat::Fp8Block => {
                        let s = a.max(1e-10) / 448.0;
                        (s, e4m3::decode(e4m3::encode(v / s)))
                    }
                    ActivationFormat::Mxfp8 => {
                        let s = if a == 0.0 { ue8m0::decode(0) } else { ue8m0::decode(ue8m0::encode_ceil(a / 448.0)) };
                        (s, e4m3::decode(e4m3::encode(v / s)))
                    }
                    ActivationFormat::Nvfp4 | ActivationFormat::Nvfp4PerToken => {
                        let g = if fmt == ActivationFormat::Nvfp4 { 0.01 } else { row_amax / 2688.0 };
                        let s = if g == 0.0 { 0.0 } else { e4m3::decode(e4m3::encode(a / 6.0 / g)) * g };
                        (s, if s == 0.0 { 0.0 } else { e2m1::decode(e2m1::encode(v / s)) })
                    }
                };
                assert_eq!(s.to_bits(), want_s.to_bits(), "{fmt} scale [{r}, {j}]");
                assert_eq!(q.values[r * cols + c], want_v, "{fmt} value [{r}, {c}]");
            }
        }
        let deq = q.dequantize();
        let mut row64 = vec![0f64; cols];
        q.dequantize_row_f64(1, &mut row64);
        for c in 0..cols {
            assert!(((deq[cols + c] as f64) - row64[c]).abs() <= row64[c].abs() * 1e-7);
        }
    }
    assert!(quantize_rows(ActivationFormat::Fp8, &x, rows, cols, None).unwrap_err().to_string().contains("static input scale"));
    assert!(quantize_rows(ActivationFormat::Nvfp4, &x, rows, cols, Some(f32::NAN)).is_err());
    assert!(quantize_rows(ActivationFormat::Mxfp8, &x[..40], 1, 40, None).is_err());
}
