//! `moerunner quantize-bench`: the GPU's online weight quantizer (bf16 expert weights already on the
//! device → a weight format, bit-identical to the CPU's `quantize_weights`) timed on a preset's
//! expert tensors, beside the device's copy bandwidth (docs/cuda.md, "Online quantization on the
//! GPU").

use std::path::PathBuf;

use anyhow::Context;
use moerunner::{presets, WeightFormat};

/// `quantize-bench`'s flags (the command's help is on its variant in main.rs).
#[derive(clap::Args)]
pub struct Args {
    /// The model preset whose expert tensors are quantized (spec/models.md).
    #[arg(long, default_value = "deepseek-v3")]
    pub preset: String,
    /// Target formats, comma-separated: fp8, fp8_block, mxfp8, mxfp4, nvfp4.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fp8,fp8_block,mxfp8,mxfp4,nvfp4"
    )]
    pub format: Vec<String>,
    /// Quantize this many experts instead of the preset's (for a GPU with less memory).
    #[arg(long)]
    pub experts: Option<usize>,
    /// Timed runs per (tensor, format); the median is reported.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Seed of the random source values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let preset = presets::preset(&args.preset)?;
    let formats = args
        .format
        .iter()
        .map(|f| f.trim().parse::<WeightFormat>())
        .collect::<Result<Vec<_>, _>>()
        .context("--format")?;
    if formats.contains(&WeightFormat::Bf16) {
        anyhow::bail!("--format bf16: the source is bf16 already (nothing to quantize)");
    }
    let experts = args.experts.unwrap_or(preset.num_experts);
    if experts == 0 || args.iters == 0 {
        anyhow::bail!("--experts and --iters must be at least 1");
    }
    let (h, i) = (preset.hidden, preset.intermediate);
    let tensors = [("W13", 2 * i, h), ("W2", h, i)];
    gpu::run(&args, preset.name, experts, &tensors, &formats)
}

#[cfg(feature = "cuda")]
mod gpu {
    use anyhow::Context;
    use moerunner::backend::cuda::quant_bench::{self, BenchTensor};
    use moerunner::WeightFormat;

    pub fn run(
        args: &super::Args,
        preset: &str,
        experts: usize,
        tensors: &[(&str, usize, usize)],
        formats: &[WeightFormat],
    ) -> anyhow::Result<()> {
        let backend = moerunner::backend::cuda::create_concrete()
            .context("quantize-bench needs the CUDA backend")?;
        let tensors: Vec<BenchTensor> = tensors
            .iter()
            .map(|&(name, rows, cols)| BenchTensor {
                name: name.to_string(),
                rows,
                cols,
            })
            .collect();
        let report = quant_bench::bench(
            backend.device(),
            experts,
            &tensors,
            formats,
            args.iters,
            args.seed,
        )?;
        println!(
            "{} | {preset}, {experts} experts, bf16 source | copy {:.0} GB/s (read + write)",
            report.device, report.copy_gbps
        );
        println!(
            "{:<6} {:<10} {:>6} {:>14} {:>6} {:>9} {:>9} {:>10} {:>9} {:>7}",
            "tensor",
            "format",
            "E",
            "rows x cols",
            "passes",
            "src GB",
            "out GB",
            "ms",
            "GB/s",
            "% copy"
        );
        let pct = |gbps: f64| 100.0 * gbps / report.copy_gbps;
        for r in &report.rows {
            println!(
                "{:<6} {:<10} {:>6} {:>14} {:>6} {:>9.2} {:>9.2} {:>10.3} {:>9.0} {:>6.1}%",
                r.tensor,
                r.format.to_string(),
                r.experts,
                format!("{}x{}", r.rows, r.cols),
                r.passes,
                r.src_bytes as f64 / 1e9,
                r.out_bytes as f64 / 1e9,
                r.us / 1e3,
                r.gbps(),
                pct(r.gbps())
            );
        }
        // The layer: every tensor of a format, times and bytes summed.
        let mut layer = Vec::new();
        for f in formats {
            let rows: Vec<_> = report.rows.iter().filter(|r| r.format == *f).collect();
            let us: f64 = rows.iter().map(|r| r.us).sum();
            let bytes: usize = rows.iter().map(|r| r.src_bytes + r.out_bytes).sum();
            let gbps = bytes as f64 / us / 1e3;
            println!(
                "{:<6} {:<10} {:>6} {:>14} {:>6} {:>9} {:>9} {:>10.3} {:>9.0} {:>6.1}%",
                "layer",
                f.to_string(),
                experts,
                "",
                "",
                "",
                "",
                us / 1e3,
                gbps,
                pct(gbps)
            );
            layer.push(serde_json::json!({
                "format": f.to_string(), "us": us, "bytes": bytes, "gbps": gbps,
                "fraction_of_copy": gbps / report.copy_gbps,
            }));
        }
        if let Some(path) = &args.json {
            let rows: Vec<serde_json::Value> = report
                .rows
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "tensor": r.tensor, "format": r.format.to_string(), "experts": r.experts,
                        "rows": r.rows, "cols": r.cols, "passes": r.passes,
                        "src_bytes": r.src_bytes, "out_bytes": r.out_bytes, "us": r.us,
                        "gbps": r.gbps(), "fraction_of_copy": r.gbps() / report.copy_gbps,
                    })
                })
                .collect();
            let json = crate::commands::with_provenance(serde_json::json!({
                "device": report.device, "preset": preset, "experts": experts,
                "iters": args.iters, "copy_gbps": report.copy_gbps,
                "rows": rows, "layer": layer,
            }));
            std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    pub fn run(
        _: &super::Args,
        _: &str,
        _: usize,
        _: &[(&str, usize, usize)],
        _: &[moerunner::WeightFormat],
    ) -> anyhow::Result<()> {
        anyhow::bail!("quantize-bench needs the CUDA backend: this build has no `cuda` feature")
    }
}
