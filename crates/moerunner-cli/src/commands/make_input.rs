//! `moerunner make-input`: a random input file for a layer file or preset, deterministic from `--seed`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use moerunner::layer_file::{self, InputFile, MappedFile, RoutingTensors};
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
pub struct Args {
    /// Where to write the input file.
    #[arg(long)]
    pub out: PathBuf,
    /// The layer file the input is for (its E, H and k are used).
    #[arg(long)]
    pub layer: Option<PathBuf>,
    /// Or a preset name.
    #[arg(long)]
    pub preset: Option<String>,
    #[arg(long)]
    pub tokens: usize,
    #[arg(long, value_enum, default_value = "logits")]
    pub routing: Routing,
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: HiddenDtype,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = match (&args.layer, &args.preset) {
        (Some(path), None) => {
            let file = MappedFile::open(path)?;
            layer_file::read_layer_config(&file).with_context(|| format!("reading {}", path.display()))?
        }
        (None, Some(name)) => {
            let p = moerunner::presets::preset(name)?;
            p.config(p.shipped, None)
        }
        _ => bail!("give exactly one of --layer FILE or --preset NAME"),
    };
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
    let s = random_input(&config, args.tokens, mode, dtype, args.seed)?;
    let routing = match (s.router_logits, s.topk_ids, s.topk_weights, s.topk_packed) {
        (Some(l), ..) => RoutingTensors::Logits(l),
        (_, Some(ids), Some(weights), _) => RoutingTensors::TopK { ids, weights },
        (.., Some(p)) => RoutingTensors::Packed(p),
        _ => bail!("internal: synthetic input without routing"),
    };
    layer_file::write_input(&args.out, &InputFile { hidden: s.hidden, routing })?;
    eprintln!("wrote {} ({} tokens, seed {})", args.out.display(), args.tokens, args.seed);
    Ok(())
}
