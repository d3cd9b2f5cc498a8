//! `moerunner bench`: presets × weight formats × token counts against the roofline, with the
//! ceilings measured in the same run. With no arguments it runs a default that finishes in under a
//! minute on a small CPU-only machine.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use moerunner::bench::{self, BenchPlan, BenchReport, Progress};
use moerunner::{presets, BackendChoice, WeightFormat};

#[derive(clap::Args)]
pub struct Args {
    /// Preset(s) to run (repeatable or comma list). Default: qwen3-30b-a3b.
    #[arg(long, value_delimiter = ',')]
    preset: Vec<String>,
    /// Weight format(s) (repeatable or comma list). Default: bf16, fp8_block, mxfp4.
    #[arg(long = "weight-format", value_delimiter = ',')]
    weight_format: Vec<String>,
    /// Token counts, comma list. Default: 1,16,256.
    #[arg(long, value_delimiter = ',')]
    tokens: Vec<usize>,
    /// Timed runs per case (median reported), after one warm-up run.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Backend: cpu, cuda or auto (CUDA when available, else CPU).
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Seed of the synthetic weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let preset_names = if args.preset.is_empty() {
        vec!["qwen3-30b-a3b".to_string()]
    } else {
        args.preset
    };
    let presets = preset_names
        .iter()
        .map(|n| presets::preset(n))
        .collect::<Result<Vec<_>, _>>()?;
    let weight_formats = if args.weight_format.is_empty() {
        vec![
            WeightFormat::Bf16,
            WeightFormat::Fp8Block,
            WeightFormat::Mxfp4,
        ]
    } else {
        args.weight_format
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<WeightFormat>, _>>()?
    };
    let tokens = if args.tokens.is_empty() {
        vec![1, 16, 256]
    } else {
        args.tokens
    };
    // A JSON path that cannot be written fails now, not after the whole benchmark.
    if let Some(path) = &args.json {
        moerunner::layer_file::check_output_path(path, "--json", &[])?;
    }
    let plan = BenchPlan {
        presets,
        weight_formats,
        tokens,
        iters: args.iters,
        backend: args.backend.parse::<BackendChoice>()?,
        seed: args.seed,
    };

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report = bench::run(&plan, &mut |p| match p {
        Progress::Start { steps } => bar.set_length(steps as u64),
        Progress::Step { what } => {
            bar.inc(1);
            bar.set_message(what);
        }
        Progress::Row(row) => {
            // The roofline is provisional here: ceilings are measured again after the cases.
            bar.println(format!(
                "  {} {} T={}: {:.0} µs, {:.2} GB/s, {:.3} TFLOP/s",
                row.preset,
                row.weight_format,
                row.tokens,
                row.time_us,
                row.achieved_gbps(),
                row.achieved_tflops()
            ));
        }
    })?;
    bar.finish_and_clear();
    print_table(&report);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn print_table(r: &BenchReport) {
    let c = &r.ceilings;
    println!(
        "device: {}   backend: {}   date: {}",
        r.device, r.backend, r.date
    );
    println!("{}", ceilings_line(c));
    println!(
        "{:<16} {:<10} {:<9} {:>6} {:>7} {:>11} {:>8} {:>8} {:>11} {:>9} {:>9}",
        "preset",
        "weights",
        "acts",
        "T",
        "experts",
        "time µs",
        "GB/s",
        "TFLOP/s",
        "floor µs",
        "roofline",
        "rel_err"
    );
    for row in &r.rows {
        println!(
            "{:<16} {:<10} {:<9} {:>6} {:>7} {:>11.1} {:>8.2} {:>8.3} {:>11.1} {:>8.1}% {:>9.2e}",
            row.preset,
            row.weight_format,
            row.activation_format,
            row.tokens,
            row.active_experts,
            row.time_us,
            row.achieved_gbps(),
            row.achieved_tflops(),
            row.floor_us,
            100.0 * row.roofline,
            row.rel_err
        );
    }
}

/// The ceilings in words: on the CPU one matrix rate (every format computes in f32 there), on a
/// GPU the bf16 and fp8 rates; a rate the device does not have is left out, never "n/a".
fn ceilings_line(c: &moerunner::bench::Ceilings) -> String {
    let mut line = format!("ceilings: read {:.1} GB/s", c.read_gbps);
    match c.f32_tflops {
        Some(f32) => line.push_str(&format!(
            ", matrix {f32:.3} TFLOP/s (dense f32 GEMM: on the CPU every format computes in f32)"
        )),
        None => {
            line.push_str(&format!(", bf16 {:.3} TFLOP/s", c.bf16_tflops));
            if let Some(fp8) = c.fp8_tflops {
                line.push_str(&format!(", fp8 {fp8:.3} TFLOP/s"));
            }
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::ceilings_line;
    use moerunner::bench::Ceilings;

    #[test]
    fn ceilings_name_one_cpu_rate_and_no_missing_one() {
        let cpu = Ceilings {
            read_gbps: 25.0,
            bf16_tflops: 0.1,
            fp8_tflops: None,
            f32_tflops: Some(0.1),
        };
        let line = ceilings_line(&cpu);
        assert!(!line.contains("n/a") && !line.contains("fp8"), "{line}");
        assert!(
            line.contains("matrix 0.100 TFLOP/s (dense f32 GEMM"),
            "{line}"
        );
        let gpu = Ceilings {
            read_gbps: 4000.0,
            bf16_tflops: 790.0,
            fp8_tflops: Some(1450.0),
            f32_tflops: None,
        };
        let line = ceilings_line(&gpu);
        assert!(
            line.contains("bf16 790.000") && line.contains("fp8 1450.000"),
            "{line}"
        );
    }
}
