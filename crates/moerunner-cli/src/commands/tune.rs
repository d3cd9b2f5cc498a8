//! `moerunner tune`: verified autotuning of the GPU's GEMM tactics for a preset × format
//! (`moerunner::backend::cuda::tactics`, docs/cuda.md "Tactics"). Every candidate's whole-layer
//! output must equal the default tactic's bit for bit on two seeded inputs before it is timed; the
//! fastest per shape class is written to the tactic table, which layers read under
//! `MOERUNNER_TACTICS=use`.

use anyhow::Context;
use moerunner::{presets, ActivationFormat, WeightFormat};

/// `tune`'s flags (the command's help is on its variant in main.rs).
#[derive(clap::Args)]
pub struct Args {
    /// The model preset (spec/models.md).
    #[arg(long, default_value = "qwen3-30b-a3b")]
    pub preset: String,
    /// Weight format.
    #[arg(long, default_value = "bf16")]
    pub format: String,
    /// Activation format (default: the weight format's own).
    #[arg(long)]
    pub activation_format: Option<String>,
    /// Token counts to tune at, comma-separated (each tunes its shape class).
    #[arg(long, value_delimiter = ',', default_value = "1,16,128,1024,8192")]
    pub tokens: Vec<usize>,
    /// Timed graph replays per candidate (the median is compared).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Seed of the layer and of the check inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Measure and print, but leave the tactic table as it is.
    #[arg(long)]
    pub no_store: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let preset = presets::preset(&args.preset)?;
    let wf: WeightFormat = args.format.parse().context("--format")?;
    let af: Option<ActivationFormat> = args
        .activation_format
        .as_deref()
        .map(str::parse)
        .transpose()
        .context("--activation-format")?;
    if args.iters == 0 || args.tokens.is_empty() {
        anyhow::bail!("--iters and --tokens need at least one");
    }
    let config = preset.config(wf, af);
    config.validate()?;
    gpu::run(&args, preset, config)
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use anyhow::Context;
    use moerunner::backend::cuda::layer::CudaLayer;
    use moerunner::backend::cuda::tune::{self, Verdict};
    use moerunner::presets::Preset;
    use moerunner::LayerConfig;

    pub fn run(args: &super::Args, preset: &Preset, config: LayerConfig) -> anyhow::Result<()> {
        let backend =
            moerunner::backend::cuda::create_concrete().context("tune needs the CUDA backend")?;
        eprintln!(
            "generating {} {}×{} (seed {})",
            preset.name, config.weight_format, config.activation_format, args.seed
        );
        let layer = moerunner::synth::random_layer(&config, args.seed, preset.biases)?;
        let loaded = CudaLayer::load_for_tuning(backend.device().clone(), Arc::new(layer))?;
        println!("{} | {}", backend.device().name, loaded.tactic_key());
        let mut rows = Vec::new();
        for &t in &args.tokens {
            let [a, b] = tune::check_seeds(args.seed, t);
            eprintln!(
                "T = {t}: every candidate checked bit for bit on inputs of seeds {a} and {b}"
            );
            rows.extend(loaded.tune(&[t], args.iters, args.seed)?);
        }
        println!(
            "{:>6} {:>5}  {:<16} {:>10}  {:<16} {:>10} {:>7}",
            "T", "class", "default", "µs", "chosen", "µs", "gain"
        );
        for r in &rows {
            println!(
                "{:>6} {:>5}  {:<16} {:>10.1}  {:<16} {:>10.1} {:>6.1}%",
                r.tokens,
                r.class,
                r.default.label(),
                r.default_us,
                r.winner.label(),
                r.winner_us,
                100.0 * (r.default_us / r.winner_us - 1.0)
            );
            for (c, v) in &r.candidates {
                let what = match v {
                    Verdict::Timed(us) => format!("{us:.1} µs, output identical"),
                    Verdict::Differs(w) => format!("REFUSED: output differs ({w})"),
                    Verdict::Failed(e) => format!("REFUSED: failed ({e})"),
                };
                println!("{:>14}{:<16} {what}", "", c.label());
            }
        }
        if args.no_store {
            println!("(--no-store: the tactic table is unchanged)");
        } else {
            let path = tune::store(&loaded, &rows, &moerunner::bench::today_utc())?;
            println!(
                "tactic table: {} (layers read it under MOERUNNER_TACTICS=use)",
                path.display()
            );
        }
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    pub fn run(
        _: &super::Args,
        _: &moerunner::presets::Preset,
        _: moerunner::LayerConfig,
    ) -> anyhow::Result<()> {
        anyhow::bail!("tune needs the CUDA backend: this build has no `cuda` feature")
    }
}
