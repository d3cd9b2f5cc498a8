//! `moerunner convert`: one MoE layer of a Hugging Face model folder → one layer file
//! (docs/checkpoints.md), optionally quantized into another format.
//! Also the checkpoint path of `moerunner run --checkpoint`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use moerunner::checkpoint::{load_layer, CheckpointLayer, LoadOptions};
use moerunner::layer_file::{self, InputFile, MappedFile, RoutingTensors};
use moerunner::{ActivationFormat, DType, MoeLayer, Parallelism, WeightFormat};

#[derive(clap::Args)]
pub struct Args {
    /// The model folder: config.json, *.safetensors and model.safetensors.index.json.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The layer index (0-based, as in `model.layers.{N}`).
    #[arg(long)]
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

fn options(
    par: Parallelism,
    quantize: Option<&str>,
    activation: Option<&str>,
) -> anyhow::Result<LoadOptions> {
    let quantize = quantize.map(|q| q.parse::<WeightFormat>()).transpose()?;
    let activation_format = activation
        .map(|a| a.parse::<ActivationFormat>())
        .transpose()?;
    Ok(LoadOptions {
        parallelism: par,
        quantize,
        activation_format,
    })
}

fn load(dir: &Path, layer: usize, opts: &LoadOptions) -> anyhow::Result<CheckpointLayer> {
    load_layer(dir, layer, opts)
        .with_context(|| format!("loading layer {layer} of checkpoint {}", dir.display()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // A layer file holds a whole layer (`run --tp-size/--ep-size` slices it, or slices the
    // checkpoint itself with `run --checkpoint`).
    let opts = options(
        Parallelism::default(),
        args.quantize.as_deref(),
        args.activation_format.as_deref(),
    )?;
    let inputs = moerunner::checkpoint::input_files(&args.checkpoint)
        .with_context(|| format!("reading checkpoint {}", args.checkpoint.display()))?;
    let inputs: Vec<(&Path, &str)> = inputs
        .iter()
        .map(|p| (p.as_path(), "the checkpoint's"))
        .collect();
    layer_file::check_output_path(&args.out, "--out", &inputs)?;
    let loaded = load(&args.checkpoint, args.layer, &opts)?;
    layer_file::write_layer(&args.out, &loaded.layer)
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

/// `run --checkpoint`: the rank's layer from the checkpoint, and the input; an input holding only
/// `hidden_states` is routed by the checkpoint's router (logits in f32).
pub fn load_checkpoint_run(
    dir: &Path,
    layer: &str,
    par: Parallelism,
    quantize: Option<&str>,
    input: &Path,
) -> anyhow::Result<(MoeLayer, InputFile)> {
    let index: usize = layer
        .parse()
        .with_context(|| format!("--layer `{layer}` must be a layer index with --checkpoint"))?;
    let loaded = load(dir, index, &options(par, quantize, None)?)?;
    let file =
        MappedFile::open(input).with_context(|| format!("reading input {}", input.display()))?;
    let only_hidden = file.names().all(|n| n == "hidden_states");
    let input_file = if only_hidden {
        let hidden = file.require("hidden_states")?;
        hidden.expect_dtype("hidden_states", &[DType::BF16, DType::F16, DType::F32])?;
        let logits = loaded
            .router_logits(&hidden)
            .context("computing router logits from the checkpoint's router")?;
        InputFile {
            hidden,
            routing: RoutingTensors::Logits(logits),
        }
    } else {
        layer_file::read_input(input)
            .with_context(|| format!("reading input {}", input.display()))?
    };
    Ok((loaded.layer, input_file))
}
