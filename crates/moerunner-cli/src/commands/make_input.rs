//! `moerunner make-input`: a random input file for a layer file or preset, deterministic from `--seed`.

use std::path::PathBuf;

use anyhow::Context;
use moerunner::layer_file::{self, InputFile};
use moerunner::synth::{random_input, RoutingMode};
use moerunner::DType;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Routing {
    /// `router_logits` F32 [T, E]: the layer routes.
    Logits,
    /// `topk_ids` + `topk_weights`: routed by the caller.
    Topk,
    /// `topk_packed`: FlashInfer's packed int32 form.
    Packed,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum HiddenDtype {
    Bf16,
    F16,
    F32,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("shape").required(true).args(["layer", "preset"])))]
pub struct Args {
    /// Where to write the input file.
    #[arg(long)]
    pub out: PathBuf,
    /// The layer file the input is for (only its header is read: E, H and k).
    #[arg(long)]
    pub layer: Option<PathBuf>,
    /// Or a preset name (spec/models.md).
    #[arg(long)]
    pub preset: Option<String>,
    /// T (0 is allowed).
    #[arg(long)]
    pub tokens: usize,
    /// How the input carries its routing.
    #[arg(long, value_enum, default_value = "logits")]
    pub routing: Routing,
    /// The dtype of `hidden_states` (and so of the output).
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: HiddenDtype,
    /// The same seed and arguments give the same file, bit for bit.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = match (&args.layer, &args.preset) {
        (Some(path), _) => layer_file::read_layer_header(path)
            .with_context(|| format!("reading layer {}", path.display()))?,
        (None, Some(name)) => {
            let p = moerunner::presets::preset(name)?;
            p.config(p.shipped, None)
        }
        (None, None) => anyhow::bail!("give --layer FILE or --preset NAME"),
    };
    let inputs: Vec<(&std::path::Path, &str)> = args
        .layer
        .iter()
        .map(|p| (p.as_path(), "--layer"))
        .collect();
    layer_file::check_output_path(&args.out, "--out", &inputs)?;
    let mode = match args.routing {
        Routing::Logits => RoutingMode::Logits,
        Routing::Topk => RoutingMode::TopK,
        Routing::Packed => RoutingMode::Packed,
    };
    let dtype = match args.dtype {
        HiddenDtype::Bf16 => DType::BF16,
        HiddenDtype::F16 => DType::F16,
        HiddenDtype::F32 => DType::F32,
    };
    moerunner::size::check(
        moerunner::synth::input_bytes(&config, args.tokens, dtype),
        &format!("make-input's random input of {} tokens", args.tokens),
        &format!("--tokens {}", args.tokens),
    )?;
    let input = InputFile::try_from(random_input(&config, args.tokens, mode, dtype, args.seed)?)?;
    layer_file::write_input(&args.out, &input)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} ({} tokens × H = {}, seed {})",
        args.out.display(),
        args.tokens,
        config.hidden,
        args.seed
    );
    Ok(())
}
