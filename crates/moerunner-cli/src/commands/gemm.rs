//! `moerunner gemm`: the dense linear layer beside the MoE (`moerunner::dense`), y = x · Wᵀ in mxfp8
//! or fp8_block, on seeded random W `[N, K]` and x `[M, K]`: checked against the float64 reference
//! (relative-norm error on a sample of rows, the format's tolerance; NaN never passes) and
//! benchmarked (median time, TFLOP/s = 2·M·N·K / t). On the GPU the same run times cuBLASLt's
//! per-tensor fp8 GEMM at the same M, N, K, the ceiling, and prints our fraction of it.

use std::time::Instant;

use anyhow::{bail, Context};
use moerunner::dense::{random_input, relative_error, within, DenseFormat, DenseLinear};
use moerunner::size::{self, Bytes};
use moerunner::tensor::DType;
use rayon::prelude::*;

#[derive(clap::Args)]
pub struct Args {
    /// Rows of x (tokens).
    #[arg(long, default_value_t = 64)]
    m: usize,
    /// Output features (rows of W).
    #[arg(long, default_value_t = 256)]
    n: usize,
    /// Input features (mxfp8: a multiple of 32).
    #[arg(long, default_value_t = 512)]
    k: usize,
    /// mxfp8 or fp8_block.
    #[arg(long, default_value = "mxfp8")]
    format: String,
    /// cpu, cuda, or auto (CUDA when a GPU is usable, else CPU).
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Seed of W and x.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Rows of x checked against the float64 reference (evenly spaced; all of them when M is smaller).
    #[arg(long, default_value_t = 64)]
    check_rows: usize,
    /// x's dtype: bf16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What one run measured.
struct Outcome {
    backend: &'static str,
    device: String,
    output: Vec<f32>,
    median_us: f64,
    cublas_fp8_us: Option<f64>,
    cublas_error: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let format: DenseFormat = args.format.parse()?;
    let dtype = match args.dtype.as_str() {
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        other => bail!("--dtype {other}: bf16 or f32"),
    };
    if args.m == 0 || args.n == 0 || args.k == 0 {
        bail!(
            "--m, --n and --k must be positive (got {} {} {})",
            args.m,
            args.n,
            args.k
        );
    }
    if !args.k.is_multiple_of(format.k_multiple()) {
        bail!("--k {}: {format} needs K % 32 == 0", args.k);
    }
    let (m, n, k) = (args.m, args.n, args.k);
    // f32 W while quantizing and its E4M3 bytes; x in f32 and dequantized; outputs and references.
    size::check(
        Bytes::of(&[n, k, 5])
            .plus(Bytes::of(&[m, k, 8]))
            .plus(Bytes::of(&[m, n, 8])),
        &format!("gemm's {m} × {n} × {k} operands and outputs"),
        &format!("--m {m} --n {n} --k {k}"),
    )?;
    let linear = DenseLinear::random(format, n, k, args.seed).context("random weights")?;
    let x = random_input(m, k, dtype, args.seed ^ 0x5EED).context("random x")?;
    let iters = args.iters.max(1);

    let outcome = match args.backend.as_str() {
        "cpu" => run_cpu(&linear, &x, iters)?,
        "cuda" => run_cuda(&linear, &x, iters)?,
        "auto" => match moerunner::backend::cuda::create() {
            Ok(_) => run_cuda(&linear, &x, iters)?,
            Err(why) => {
                if !args.json {
                    println!("no GPU ({why}); running on the CPU");
                }
                run_cpu(&linear, &x, iters)?
            }
        },
        other => bail!("--backend {other}: cpu, cuda or auto"),
    };

    // The check: evenly spaced rows against the float64 reference, one task per row.
    let step = m.div_ceil(args.check_rows.max(1)).max(1);
    let rows: Vec<usize> = (0..m).step_by(step).collect();
    let want: Vec<Vec<f64>> = rows
        .par_iter()
        .map(|&r| linear.reference_rows(&x, &[r]))
        .collect::<Result<_, _>>()?;
    let want: Vec<f64> = want.concat();
    let got: Vec<f64> = rows
        .iter()
        .flat_map(|&r| outcome.output[r * n..(r + 1) * n].iter().map(|&v| v as f64))
        .collect();
    let err = relative_error(&got, &want);
    let tol = format.tolerance();
    let passed = within(err, tol);
    let tflops = linear.flops(m) / outcome.median_us / 1e6;
    let cublas_tflops = outcome.cublas_fp8_us.map(|us| linear.flops(m) / us / 1e6);
    let fraction = cublas_tflops.map(|c| tflops / c);

    if args.json {
        let j = crate::commands::with_provenance(serde_json::json!({
            "m": m, "n": n, "k": k,
            "format": format.name(),
            "dtype": dtype.name(),
            "backend": outcome.backend,
            "device": outcome.device,
            "seed": args.seed,
            "checked_rows": rows.len(),
            "rel_err": if err.is_finite() { serde_json::json!(err) } else { serde_json::json!(err.to_string()) },
            "tolerance": tol,
            "passed": passed,
            "iters": iters,
            "median_us": outcome.median_us,
            "tflops": tflops,
            "cublas_fp8_us": outcome.cublas_fp8_us,
            "cublas_fp8_tflops": cublas_tflops,
            "fraction_of_cublas_fp8": fraction,
            "cublas_error": outcome.cublas_error,
        }));
        println!("{j}");
    } else {
        println!(
            "gemm {format}: y[{m}, {n}] = x[{m}, {k}] ({}) · W[{n}, {k}]ᵀ, seed {}, on {} ({})",
            dtype.name(),
            args.seed,
            outcome.backend,
            outcome.device
        );
        println!(
            "check: rel_err {err:.3e} against the float64 reference on {} of {m} rows (tolerance {tol:.0e}): {}",
            rows.len(),
            if passed { "ok" } else { "FAIL" }
        );
        println!(
            "time: median {:.1} µs of {iters} runs, {tflops:.2} TFLOP/s",
            outcome.median_us
        );
        match (outcome.cublas_fp8_us, &outcome.cublas_error) {
            (Some(us), _) => println!(
                "cuBLASLt fp8 (per-tensor) at the same M, N, K: {us:.1} µs, {:.2} TFLOP/s; ours is {:.1} % of it",
                cublas_tflops.unwrap_or(0.0),
                100.0 * fraction.unwrap_or(0.0)
            ),
            (None, Some(e)) => println!("cuBLASLt fp8 ceiling unavailable: {e}"),
            (None, None) => {}
        }
    }
    if !passed {
        bail!(
            "rel_err {err:.3e} over the tolerance {tol:.0e} of {format} (seed {})",
            args.seed
        );
    }
    Ok(())
}

fn run_cpu(
    linear: &DenseLinear,
    x: &moerunner::HostTensor,
    iters: usize,
) -> anyhow::Result<Outcome> {
    let output = linear.forward_cpu(x)?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        std::hint::black_box(linear.forward_cpu(x)?);
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok(Outcome {
        backend: "cpu",
        device: format!("{} threads", rayon::current_num_threads()),
        output,
        median_us: times[times.len() / 2],
        cublas_fp8_us: None,
        cublas_error: None,
    })
}

fn run_cuda(
    linear: &DenseLinear,
    x: &moerunner::HostTensor,
    iters: usize,
) -> anyhow::Result<Outcome> {
    let r = moerunner::backend::cuda::dense_bench(linear, x, iters)
        .context("the dense GEMM on the GPU")?;
    Ok(Outcome {
        backend: "cuda",
        device: r.device,
        output: r.output,
        median_us: r.median_us,
        cublas_fp8_us: r.cublas_fp8_us,
        cublas_error: r.cublas_error,
    })
}
