//! The dense linear layer (`moerunner::dense`) on the CPU: the fast path against the float64
//! reference over seeded odd shapes, the reference against an independent f64 product, and bad
//! weights and inputs refused with errors naming the tensor. (Its GPU test lives in tests/cuda.rs
//! beside the other GPU tests.)

use moerunner::dense::{random_input, relative_error, DenseFormat, DenseLinear};
use moerunner::formats::act_quant::quantize_rows;
use moerunner::rng::SeededRng;
use moerunner::tensor::{DType, HostTensor};
use moerunner::weights::BlockScales;

/// Seeded shapes: odd M, N not a multiple of 128, K = 32·odd (mxfp8) or any K (fp8_block).
fn shapes(format: DenseFormat, seed: u64) -> Vec<(usize, usize, usize)> {
    let mut rng = SeededRng::new(seed);
    let mut out = vec![(1, 1, 32), (7, 129, 96), (33, 200, 160)];
    for _ in 0..4 {
        let m = 2 * rng.below(40) as usize + 1;
        let n = 128 * rng.below(3) as usize + 1 + rng.below(127) as usize;
        let k = match format {
            DenseFormat::Mxfp8 => 32 * (2 * rng.below(10) as usize + 1),
            DenseFormat::Fp8Block => 1 + rng.below(400) as usize,
        };
        out.push((m, n, k));
    }
    out
}

#[test]
fn forward_cpu_matches_the_reference_for_both_formats() {
    for format in DenseFormat::ALL {
        for (i, (m, n, k)) in shapes(format, 7).into_iter().enumerate() {
            let seed = 100 + i as u64;
            let lin = DenseLinear::random(format, n, k, seed).expect("weights");
            for dtype in [DType::F32, DType::BF16] {
                let x = random_input(m, k, dtype, seed ^ 0xABCD).expect("x");
                let want = lin.reference(&x).expect("reference");
                let got = lin.forward_cpu(&x).expect("forward_cpu");
                assert_eq!(got.len(), m * n);
                let got: Vec<f64> = got.iter().map(|&v| v as f64).collect();
                let err = relative_error(&got, &want);
                println!("{format} M={m} N={n} K={k} {dtype}: rel_err {err:.3e}");
                assert!(
                    err <= format.tolerance(),
                    "{format} M={m} N={n} K={k} {dtype} seed {seed}: rel_err {err:.3e} over {}",
                    format.tolerance()
                );
                // bf16 output rounding is the only difference that large products leave
                assert!(err < 1e-2, "{format} M={m} N={n} K={k}: {err:.3e}");
            }
        }
    }
}

/// The reference is y = dequant(quant(x)) · dequant(W)ᵀ: checked against an independent product
/// from the library's quantizers and decoders; and a sample of rows is the same rows of the whole.
#[test]
fn the_reference_is_the_product_of_the_quantized_operands() {
    for format in DenseFormat::ALL {
        let (m, n, k) = (5, 130, 96);
        let lin = DenseLinear::random(format, n, k, 3).expect("weights");
        let x = random_input(m, k, DType::F32, 4).expect("x");
        let xf = x.to_f32_vec("x").expect("f32");
        let q = quantize_rows(format.activation_format(), &xf, m, k, None).expect("quantize");
        let mut w = vec![0f64; n * k];
        lin.weights().decode_rows_f64(0, 0..n, &mut w);
        let mut xr = vec![0f64; k];
        let want = lin.reference(&x).expect("reference");
        for r in 0..m {
            q.dequantize_row_f64(r, &mut xr);
            for j in 0..n {
                let y: f64 = (0..k).map(|c| xr[c] * w[j * k + c]).sum();
                assert_eq!(want[r * n + j], y, "{format} ({r}, {j})");
            }
        }
        let rows = [4, 0, 2];
        let some = lin.reference_rows(&x, &rows).expect("rows");
        for (i, &r) in rows.iter().enumerate() {
            assert_eq!(some[i * n..(i + 1) * n], want[r * n..(r + 1) * n]);
        }
    }
}

#[test]
fn forward_cpu_is_the_same_for_any_thread_count() {
    let lin = DenseLinear::random(DenseFormat::Mxfp8, 300, 256, 9).expect("weights");
    let x = random_input(17, 256, DType::BF16, 10).expect("x");
    let many = lin.forward_cpu(&x).expect("forward");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let one = pool.install(|| lin.forward_cpu(&x)).expect("forward");
    assert!(many
        .iter()
        .zip(&one)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn zero_rows_give_an_empty_output() {
    let lin = DenseLinear::random(DenseFormat::Fp8Block, 10, 64, 1).expect("weights");
    let x = HostTensor::from_f32(vec![0, 64], &[]);
    assert!(lin.forward_cpu(&x).expect("forward").is_empty());
    assert!(lin.reference(&x).expect("reference").is_empty());
}

fn err_text<T: std::fmt::Debug>(r: moerunner::Result<T>) -> String {
    r.expect_err("must be refused").to_string()
}

#[test]
fn bad_inputs_are_refused_naming_the_tensor() {
    let lin = DenseLinear::random(DenseFormat::Mxfp8, 16, 64, 1).expect("weights");
    // x: wrong K, wrong rank, wrong dtype, not finite
    let e = err_text(lin.forward_cpu(&HostTensor::from_f32(vec![2, 32], &[0.0; 64])));
    assert!(e.contains("tensor `x`") && e.contains("[M, 64]"), "{e}");
    let e = err_text(lin.reference(&HostTensor::from_f32(vec![128], &[0.0; 128])));
    assert!(e.contains("tensor `x`"), "{e}");
    let e = err_text(lin.forward_cpu(&HostTensor::from_i32(vec![1, 64], &[0; 64])));
    assert!(e.contains("tensor `x`") && e.contains("I32"), "{e}");
    let mut v = vec![1.0f32; 128];
    v[70] = f32::NAN;
    let e = err_text(lin.forward_cpu(&HostTensor::from_f32(vec![2, 64], &v)));
    assert!(e.contains("tensor `x`") && e.contains("x[1, 6]"), "{e}");
    let e = err_text(lin.reference_rows(&HostTensor::from_f32(vec![2, 64], &[0.0; 128]), &[2]));
    assert!(e.contains("row 2"), "{e}");
}

#[test]
fn bad_weights_are_refused_naming_the_tensor() {
    // mxfp8 needs K % 32 == 0
    let e = err_text(DenseLinear::quantize(
        DenseFormat::Mxfp8,
        4,
        40,
        &[0.5; 160],
    ));
    assert!(e.contains("tensor `weight`") && e.contains("K % 32"), "{e}");
    // values that do not match [N, K]
    let e = err_text(DenseLinear::quantize(
        DenseFormat::Fp8Block,
        4,
        40,
        &[0.5; 100],
    ));
    assert!(e.contains("tensor `weight`"), "{e}");
    let good = DenseLinear::random(DenseFormat::Mxfp8, 8, 64, 2).expect("weights");
    // two experts
    let mut t = good.weights().clone();
    t.experts = 2;
    let e = err_text(DenseLinear::new(DenseFormat::Mxfp8, t));
    assert!(
        e.contains("tensor `weight`") && e.contains("one expert"),
        "{e}"
    );
    // the other format's weights
    let e = err_text(DenseLinear::new(
        DenseFormat::Fp8Block,
        good.weights().clone(),
    ));
    assert!(e.contains("tensor `weight`") && e.contains("mxfp8"), "{e}");
    // a NaN scale
    let mut t = good.weights().clone();
    if let BlockScales::Ue8m0(b) = &mut t.scales {
        b[3] = 0xFF;
    }
    let e = err_text(DenseLinear::new(DenseFormat::Mxfp8, t));
    assert!(
        e.contains("tensor `weight_scale`") && e.contains("[1, 1]"),
        "{e}"
    );
    // a NaN element code
    let mut t = good.weights().clone();
    let mut data = t.data.to_vec();
    data[65] = 0x7F;
    t.data = data.into();
    let e = err_text(DenseLinear::new(DenseFormat::Mxfp8, t));
    assert!(e.contains("tensor `weight`") && e.contains("[1, 1]"), "{e}");
    // fp8_block: a zero block scale, a short scale list
    let fb = DenseLinear::random(DenseFormat::Fp8Block, 130, 64, 2).expect("weights");
    let mut t = fb.weights().clone();
    t.scales = BlockScales::Block128(vec![1.0, 0.0]);
    let e = err_text(DenseLinear::new(DenseFormat::Fp8Block, t));
    assert!(
        e.contains("tensor `weight_scale`") && e.contains("index 1"),
        "{e}"
    );
    let mut t = fb.weights().clone();
    t.scales = BlockScales::Block128(vec![1.0]);
    let e = err_text(DenseLinear::new(DenseFormat::Fp8Block, t));
    assert!(e.contains("tensor `weight_scale`"), "{e}");
    // the format's name
    let e = err_text("mxfp4".parse::<DenseFormat>());
    assert!(e.contains("mxfp8, fp8_block"), "{e}");
}
