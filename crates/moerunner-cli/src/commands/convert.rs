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
    /// Quantize a BF16 checkpoint into this weight format while loading.
    #[arg(long)]
    pub quantize: Option<WeightFormat>,
    /// Override the activation format (default: the weight format's natural one).
    #[arg(long)]
    pub activation_format: Option<ActivationFormat>,
    /// Static input scales `W13,W2` for `fp8` / static `nvfp4` activations of a quantized BF16
    /// checkpoint (checkpoints that ship them need none).
    #[arg(long, value_parser = parse_input_scales)]
    pub input_scales: Option<(f32, f32)>,
}

/// Parses `A,B` into two positive finite scales.
pub fn parse_input_scales(s: &str) -> Result<(f32, f32), String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let nums: Vec<f32> = parts
        .iter()
        .filter_map(|p| p.parse().ok())
        .filter(|v: &f32| v.is_finite() && *v > 0.0)
        .collect();
    match nums[..] {
        [a, b] if parts.len() == 2 => Ok((a, b)),
        _ => Err(format!("`{s}` is not two positive numbers `W13,W2`")),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = LoadOptions {
        quantize: args.quantize,
        activation_format: args.activation_format,
        input_scales: args.input_scales,
        ..Default::default()
    };
    let loaded =
        checkpoint::load_layer(&args.checkpoint, args.layer, &opts).with_context(|| {
            format!(
                "loading layer {} of {}",
                args.layer,
                args.checkpoint.display()
            )
        })?;
    moerunner::layer_file::write_layer(&args.out, &loaded.layer)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "{} layer {} (shipped {}, read {:.1} MB) → {}: {}",
        loaded.family,
        loaded.layer_index,
        loaded.shipped_format,
        loaded.bytes_read as f64 / 1e6,
        args.out.display(),
        loaded.layer.config()
    );
    Ok(())
}
