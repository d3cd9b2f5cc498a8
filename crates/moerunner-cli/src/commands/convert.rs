//! `moerunner convert`: one MoE layer of a Hugging Face model folder → a layer file
//! (`spec/layer-file.md`), in its shipped format or quantized on the way (`docs/checkpoints.md`).

use std::path::PathBuf;

use anyhow::Context;
use moerunner::checkpoint::{self, LoadOptions};
use moerunner::{ActivationFormat, WeightFormat};

#[derive(clap::Args)]
pub struct Args {
    /// The model folder: `config.json`, `*.safetensors` and `model.safetensors.index.json`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The layer index (0-based, as in the tensor names `model.layers.N.`).
    #[arg(long)]
    pub layer: usize,
    /// Where to write the layer file (atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Quantize the experts into this weight format while loading.
    #[arg(long)]
    pub quantize: Option<WeightFormat>,
    /// Override the activation format (default: the weight format's natural one).
    #[arg(long)]
    pub activation_format: Option<ActivationFormat>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = LoadOptions {
        quantize: args.quantize,
        activation_format: args.activation_format,
        ..Default::default()
    };
    let loaded = checkpoint::load_layer(&args.checkpoint, args.layer, &opts).with_context(|| {
        format!("loading layer {} of {}", args.layer, args.checkpoint.display())
    })?;
    moerunner::layer_file::write_layer(&args.out, &loaded.layer)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "{} layer {} (read {:.1} MB of tensor data) → {}: {}",
        loaded.family,
        args.layer,
        loaded.bytes_read as f64 / 1e6,
        args.out.display(),
        loaded.layer.config()
    );
    Ok(())
}
