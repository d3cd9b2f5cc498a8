//! `moerunner run`: one layer file × one input file → one output file (`spec/layer-file.md`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use moerunner::layer_file;
use moerunner::{BackendChoice, ForwardInput, Parallelism, Runner};

#[derive(clap::Args)]
pub struct Args {
    /// The layer file (`.safetensors`, spec/layer-file.md); with `--checkpoint`, the layer index.
    #[arg(long)]
    pub layer: String,
    /// A Hugging Face model folder (config.json, shards, index); `--layer` is then the layer index
    /// and the input may carry only `hidden_states` (logits come from the checkpoint's router).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// With `--checkpoint`: quantize the experts into this format at load (e.g. mxfp8, nvfp4).
    #[arg(long)]
    pub quantize: Option<String>,
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
    let (layer, input) = match &args.checkpoint {
        Some(dir) => super::convert::load_checkpoint_run(dir, &args.layer, par, args.quantize.as_deref(), &args.input)?,
        None => {
            if args.quantize.is_some() {
                anyhow::bail!("--quantize needs --checkpoint (a layer file is run in its own format)");
            }
            let path = PathBuf::from(&args.layer);
            let mut layer = layer_file::read_layer(&path).with_context(|| format!("reading layer {}", path.display()))?;
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
