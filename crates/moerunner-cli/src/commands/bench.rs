//! `moerunner bench`: presets × weight formats × token counts against the roofline, with the
//! ceilings measured in the same run. With no arguments it runs a default that finishes in under a
//! minute on a small CPU-only machine.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use moerunner::bench::{self, BenchPlan, BenchReport, Progress};
use moerunner::parallel::Transport;
use moerunner::presets::Preset;
use moerunner::{presets, BackendChoice, Parallelism, WeightFormat};

#[derive(clap::Args)]
pub struct Args {
    /// Preset(s) to run (repeatable or comma list). Default: qwen3-30b-a3b.
    #[arg(long, value_delimiter = ',')]
    preset: Vec<String>,
    /// Weight format(s) (repeatable or comma list). Default: bf16, fp8_block, mxfp4.
    #[arg(long = "weight-format", value_delimiter = ',')]
    weight_format: Vec<String>,
    /// Activation format(s) to pair with each weight format where legal (e.g. mxfp4 with bf16 and
    /// mxfp8; nvfp4 with nvfp4 and nvfp4_per_token). Default: each weight format's first legal one.
    #[arg(long = "activation-format", value_delimiter = ',')]
    activation_format: Vec<String>,
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
    /// Write the rows as CSV here (one line per row; the samples `;`-separated).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Benchmark the MoE layer a model's `config.json` describes (its first MoE layer, or
    /// `--layer-index`) instead of presets.
    #[arg(long, conflicts_with_all = ["preset", "checkpoint"])]
    config: Option<PathBuf>,
    /// The same from a model folder (its `config.json`; no weights are read).
    #[arg(long, conflicts_with = "preset")]
    checkpoint: Option<PathBuf>,
    /// With `--config` / `--checkpoint`: the layer whose shape to take.
    #[arg(long)]
    layer_index: Option<usize>,
    /// An explicit shape instead of presets: E (with --hidden, --intermediate and --top-k;
    /// swiglu, renormalize routing).
    #[arg(long, requires_all = ["hidden", "intermediate", "top_k"], conflicts_with_all = ["preset", "config", "checkpoint"])]
    experts: Option<usize>,
    #[arg(long, requires = "experts")]
    hidden: Option<usize>,
    #[arg(long, requires = "experts")]
    intermediate: Option<usize>,
    #[arg(long, requires = "experts")]
    top_k: Option<usize>,
    /// Tensor-parallel group size: each row is one rank's share (I / tp-size features).
    #[arg(long, default_value_t = 1)]
    tp_size: usize,
    /// Expert-parallel group size: each row is one rank's share (E / ep-size experts).
    #[arg(long, default_value_t = 1)]
    ep_size: usize,
    /// With --ep-size/--tp-size above 1: `none` benches rank 0's share alone; `thread` runs the
    /// whole layer over that many thread ranks of this process with real collectives (EP
    /// all-to-all, or gather-scatter with TP; on one GPU with the CUDA backend), `nccl` over one
    /// rank per GPU through NCCL, `device` over ranks sharing GPU 0 through device-to-device
    /// copies, and reports the whole call and the share of it spent communicating (`comm` columns).
    #[arg(long, default_value = "none", value_parser = ["none", "thread", "nccl", "device"])]
    comm: String,
    /// With --comm: how EP ranks exchange tokens — all-to-all (the default without TP),
    /// gather-scatter (the default with TP) or device-all-to-all (dispatch and combine on the GPU;
    /// --comm nccl or device, EP only).
    #[arg(long, requires = "comm")]
    ep_mode: Option<moerunner::parallel::EpMode>,
    /// Also time each stage of the GPU's launch sequence (route, sort, quantize, GEMM1, …,
    /// combine): every prefix of the stages replayed as the whole layer is, a stage's time being
    /// what it adds to the prefix before it (the standard pipeline, never the fused small-batch
    /// kernel). Rows of a backend without device stages (the CPU) have none.
    #[arg(long, conflicts_with = "comm")]
    stage_times: bool,
}

/// A shape given on the command line or read from a config, as a preset (names live as long as
/// the process: a bench run is short).
fn shape_preset(name: String, base: Preset) -> &'static Preset {
    Box::leak(Box::new(Preset {
        name: Box::leak(name.into_boxed_str()),
        ..base
    }))
}

/// The presets to run: `--preset`, an explicit shape, or a model config's layer.
fn presets_of(args: &Args) -> anyhow::Result<Vec<&'static Preset>> {
    let template = presets::preset("qwen3-30b-a3b")?.clone();
    if let (Some(e), Some(h), Some(i), Some(k)) =
        (args.experts, args.hidden, args.intermediate, args.top_k)
    {
        let base = Preset {
            num_experts: e,
            top_k: k,
            hidden: h,
            intermediate: i,
            biases: false,
            ..template
        };
        return Ok(vec![shape_preset(format!("E{e}-H{h}-I{i}-k{k}"), base)]);
    }
    let config = match (&args.config, &args.checkpoint) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(dir)) => Some(dir.join("config.json")),
        (None, None) => None,
    };
    if let Some(path) = config {
        let s = moerunner::checkpoint::describe(&path, args.layer_index)
            .with_context(|| format!("reading the layer shape from {}", path.display()))?;
        let base = Preset {
            num_experts: s.num_experts,
            top_k: s.routing.top_k,
            hidden: s.hidden,
            intermediate: s.intermediate,
            activation: s.activation,
            routing: s.routing.method,
            n_group: s.routing.n_group,
            topk_group: s.routing.topk_group,
            routed_scaling_factor: s.routing.routed_scaling_factor,
            biases: s.biases,
            ..template
        };
        return Ok(vec![shape_preset(
            format!("{}-layer{}", s.family, s.layer),
            base,
        )]);
    }
    if args.preset.is_empty() {
        return Ok(vec![presets::preset("qwen3-30b-a3b")?]);
    }
    Ok(args
        .preset
        .iter()
        .map(|n| presets::preset(n))
        .collect::<Result<Vec<_>, _>>()?)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let presets = presets_of(&args)?;
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
        args.tokens.clone()
    };
    // A JSON path that cannot be written fails now, not after the whole benchmark.
    for (path, flag) in [(&args.json, "--json"), (&args.csv, "--csv")] {
        if let Some(path) = path {
            moerunner::layer_file::check_output_path(path, flag, &[])?;
        }
    }
    let plan = BenchPlan {
        presets,
        weight_formats,
        activation_formats: args
            .activation_format
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<moerunner::ActivationFormat>, _>>()?,
        tokens,
        iters: args.iters,
        backend: args.backend.parse::<BackendChoice>()?,
        seed: args.seed,
        parallelism: Parallelism {
            ep_size: args.ep_size,
            ep_rank: 0,
            tp_size: args.tp_size,
            tp_rank: 0,
        },
        split: match args.comm.as_str() {
            "none" => None,
            comm => Some(comm.parse::<Transport>()?),
        },
        ep_mode: args.ep_mode,
        stage_times: args.stage_times,
    };
    if let Some(t) = plan.split.filter(|&t| t != Transport::Threads) {
        if !matches!(args.backend.as_str(), "auto" | "cuda") {
            anyhow::bail!("--comm {t} runs GPU ranks: use --backend cuda (or auto)");
        }
        let most = t.max_ranks().with_context(|| format!("--comm {t}"))?;
        if args.ep_size * args.tp_size > most {
            anyhow::bail!(
                "--comm {t}: {} ranks need as many GPUs, this machine has {most}",
                args.ep_size * args.tp_size
            );
        }
    }
    super::check_ep_mode(args.ep_mode, plan.split)?;
    if plan.split.is_some() && args.ep_size * args.tp_size == 1 {
        anyhow::bail!(
            "--comm {} splits the layer over --ep-size × --tp-size ranks: give one above 1",
            args.comm
        );
    }

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut report = bench::run(&plan, &mut |p| match p {
        Progress::Start { steps } => bar.set_length(steps as u64),
        Progress::Step { what } => {
            bar.inc(1);
            bar.set_message(what);
        }
        Progress::Row(row) => {
            // The roofline is provisional here: ceilings are measured again after the cases.
            bar.println(format!(
                "  {} {}×{} T={}: {:.0} µs, {:.2} GB/s, {:.3} TFLOP/s",
                row.preset,
                row.weight_format,
                row.activation_format,
                row.tokens,
                row.time_us,
                row.achieved_gbps(),
                row.achieved_tflops()
            ));
        }
    })?;
    bar.finish_and_clear();
    report.provenance = crate::commands::provenance();
    print_table(&report);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.csv {
        std::fs::write(path, csv(&report))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The rows as CSV: one header line, one line per row.
fn csv(r: &BenchReport) -> String {
    let mut out = String::from(
        "preset,weight_format,activation_format,tokens,tp_size,ep_size,active_experts,\
         time_us,min_us,max_us,bytes,flops,floor_us,roofline,rel_err,samples_us\n",
    );
    for row in &r.rows {
        let samples: Vec<String> = row.samples_us.iter().map(|s| format!("{s:.3}")).collect();
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{:.3},{:.3},{:.3},{},{},{:.3},{:.5},{:.3e},{}\n",
            row.preset,
            row.weight_format,
            row.activation_format,
            row.tokens,
            row.tp_size,
            row.ep_size,
            row.active_experts,
            row.time_us,
            row.min_us,
            row.max_us,
            row.bytes,
            row.flops,
            row.floor_us,
            row.roofline,
            row.rel_err,
            samples.join(";")
        ));
    }
    out
}

fn print_table(r: &BenchReport) {
    let c = &r.ceilings;
    println!(
        "moerunner {}{}   device: {}   backend: {}   date: {}",
        r.provenance.moerunner_version,
        r.provenance
            .commit
            .as_deref()
            .map_or(String::new(), |c| format!(" ({})", &c[..c.len().min(12)])),
        r.device,
        r.backend,
        r.provenance.date
    );
    println!("{}", ceilings_line(c));
    println!(
        "{:<16} {:<10} {:<15} {:>6} {:>7} {:>11} {:>17} {:>8} {:>8} {:>11} {:>9} {:>9}",
        "preset",
        "weights",
        "acts",
        "T",
        "experts",
        "median µs",
        "min–max µs",
        "GB/s",
        "TFLOP/s",
        "floor µs",
        "roofline",
        "rel_err"
    );
    for row in &r.rows {
        println!(
            "{:<16} {:<10} {:<15} {:>6} {:>7} {:>11.1} {:>17} {:>8.2} {:>8.3} {:>11.1} {:>8.1}% {:>9.2e}",
            row.preset,
            row.weight_format,
            row.activation_format,
            row.tokens,
            row.active_experts,
            row.time_us,
            format!("{:.1}–{:.1}", row.min_us, row.max_us),
            row.achieved_gbps(),
            row.achieved_tflops(),
            row.floor_us,
            100.0 * row.roofline,
            row.rel_err
        );
        if let (Some(us), Some(share)) = (row.comm_us, row.comm_share) {
            println!(
                "{:<16} ep {} × tp {} ranks: {us:.1} µs communicating, {:.1}% of the call",
                "",
                row.ep_size,
                row.tp_size,
                100.0 * share
            );
        }
        if let Some(stages) = &row.stages {
            println!("{:<16} {}", "", stages_line(stages));
        }
    }
}

/// A row's stage times in words: each stage's added µs, then the whole standard sequence's.
fn stages_line(stages: &[moerunner::backend::StageTime]) -> String {
    let parts: Vec<String> = stages
        .iter()
        .map(|s| format!("{} {:+.1}", s.stage, s.marginal_us))
        .collect();
    let total = stages.last().map_or(0.0, |s| s.cumulative_us);
    format!(
        "stages (µs each adds): {} = {total:.1} µs standard",
        parts.join(" · ")
    )
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
