//! `moerunner convert`: one MoE layer of a Hugging Face model folder → one layer file
//! (docs/checkpoints.md), optionally quantized into another format.

use std::path::PathBuf;

use anyhow::Context;
use moerunner::layer_file;
use moerunner::Parallelism;

use super::{load_checkpoint, load_options};

#[derive(clap::Args)]
pub struct Args {
    /// The model folder: config.json, *.safetensors and model.safetensors.index.json.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The layer index (0-based, as in `model.layers.{N}`); also spelled `--layer-index`, as in
    /// `run --checkpoint`.
    #[arg(long, visible_alias = "layer-index")]
    pub layer: usize,
    /// Where to write the layer file (atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Quantize the experts into this format (bf16, fp8_block, mxfp8, mxfp4, nvfp4).
    #[arg(long)]
    pub quantize: Option<String>,
    /// The activation format (default: the weight format's natural one).
    #[arg(long)]
    pub activation_format: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // A layer file holds a whole layer (`run --tp-size/--ep-size` slices it, or slices the
    // checkpoint itself with `run --checkpoint`).
    let opts = load_options(
        Parallelism::default(),
        args.quantize.as_deref(),
        args.activation_format.as_deref(),
    )?;
    let inputs = moerunner::checkpoint::input_files(&args.checkpoint)
        .with_context(|| format!("reading checkpoint {}", args.checkpoint.display()))?;
    let inputs: Vec<(&std::path::Path, &str)> = inputs
        .iter()
        .map(|p| (p.as_path(), "the checkpoint's"))
        .collect();
    layer_file::check_output_path(&args.out, "--out", &inputs)?;
    let loaded = load_checkpoint(&args.checkpoint, args.layer, &opts)?;
    // The router goes along, so an input of hidden states alone runs on the file as on the checkpoint.
    layer_file::write_layer_with_router(&args.out, &loaded.layer, loaded.router().as_ref())
        .with_context(|| format!("writing layer file {}", args.out.display()))?;
    eprintln!(
        "converted {} layer {} ({}; read {} bytes) → {}",
        loaded.family,
        args.layer,
        loaded.layer.config(),
        loaded.bytes_read,
        args.out.display()
    );
    Ok(())
}
