//! `moerunner run`: one layer file × one input file → one output file (`spec/layer-file.md`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use moerunner::checkpoint::{self, LoadOptions};
use moerunner::layer_file;
use moerunner::{BackendChoice, ForwardInput, Parallelism, Runner, WeightFormat};

#[derive(clap::Args)]
pub struct Args {
    /// The layer file (`.safetensors`, spec/layer-file.md); with `--checkpoint`, the layer index.
    #[arg(long)]
    pub layer: PathBuf,
    /// Load layer `--layer N` from this Hugging Face model folder (docs/checkpoints.md), sliced
    /// for the rank at load time. The input file may then carry only `hidden_states`.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// With `--checkpoint`: quantize BF16 weights into this format while loading.
    #[arg(long)]
    pub quantize: Option<WeightFormat>,
    /// The input file: `hidden_states` and one routing source.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the output file (atomically).
    #[arg(long)]
    pub output: PathBuf,
    /// cpu, cuda, reference, or auto (the best available).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Use the float64 quantization-aware reference (same as `--backend reference`).
    #[arg(long)]
    pub reference: bool,
    /// Expert-parallel group size; the output is this rank's partial sum.
    #[arg(long, default_value_t = 1)]
    pub ep_size: usize,
    #[arg(long, default_value_t = 0)]
    pub ep_rank: usize,
    /// Tensor-parallel group size; the output is this rank's partial sum.
    #[arg(long, default_value_t = 1)]
    pub tp_size: usize,
    #[arg(long, default_value_t = 0)]
    pub tp_rank: usize,
    /// Also write the chosen `topk_ids` and `topk_weights`.
    #[arg(long)]
    pub save_routing: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let choice: BackendChoice = if args.reference { BackendChoice::Named("reference".into()) } else { args.backend.parse()? };
    let par = Parallelism { ep_size: args.ep_size, ep_rank: args.ep_rank, tp_size: args.tp_size, tp_rank: args.tp_rank };
    if args.quantize.is_some() && args.checkpoint.is_none() {
        anyhow::bail!("--quantize needs --checkpoint (layer files are already in their format)");
    }
    let (layer, input) = match &args.checkpoint {
        Some(dir) => {
            let index: usize = args.layer.to_str().and_then(|s| s.parse().ok()).context("with --checkpoint, --layer is a layer index")?;
            let opts = LoadOptions { parallelism: par, quantize: args.quantize, ..Default::default() };
            let ck = checkpoint::load_layer(dir, index, &opts).with_context(|| format!("loading layer {index} of {}", dir.display()))?;
            let input = checkpoint::read_input(&args.input, &ck).with_context(|| format!("reading input {}", args.input.display()))?;
            (ck.layer, input)
        }
        None => {
            let mut layer = layer_file::read_layer(&args.layer).with_context(|| format!("reading layer {}", args.layer.display()))?;
            if !par.is_single() {
                layer = moerunner::shard::shard(&layer, par).context("slicing the layer for this rank")?;
            }
            let input = layer_file::read_input(&args.input).with_context(|| format!("reading input {}", args.input.display()))?;
            (layer, input)
        }
    };
    let loaded = Runner::new().load(layer, &choice)?;
    let started = Instant::now();
    let out = loaded.forward(&ForwardInput { hidden: &input.hidden, routing: input.routing_input() })?;
    let elapsed = started.elapsed();
    layer_file::write_output(&args.output, &out.output, args.save_routing.then_some(&out.routes))
        .with_context(|| format!("writing output {}", args.output.display()))?;
    eprintln!(
        "ran {} on {} tokens with backend `{}` in {:.3} ms → {}",
        loaded.layer().config(),
        out.routes.tokens,
        loaded.backend(),
        elapsed.as_secs_f64() * 1e3,
        args.output.display()
    );
    Ok(())
}
