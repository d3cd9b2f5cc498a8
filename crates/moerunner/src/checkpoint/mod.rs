//! Loading one MoE layer straight from a Hugging Face model folder (`config.json`, sharded
//! `*.safetensors`, `model.safetensors.index.json`) in the format it ships in (`docs/checkpoints.md`).
//!
//! Design decision: each family is one file that turns `config.json` into a [`Plan`] (tensor
//! names, sizes, routing, activation); the readers of the two storage layouts (one module per
//! expert, or GPT-OSS's fused MXFP4 tensors) do the rest. Every byte comes through
//! [`shards::Shards::read_box`], which reads only a rank's experts, rows, columns and scale blocks
//! and logs what it touched, so tensor/expert parallel slicing happens at load time.

pub mod config;
mod deepseek_v3;
pub mod experts;
mod gpt_oss;
mod minimax_m2;
mod mixtral;
mod nemotron_h;
mod qwen_moe;
pub mod shards;

use std::ops::Range;
use std::path::Path;

use crate::config::{
    Activation, ActivationFormat, LayerConfig, Parallelism, RoutingConfig, W13Order, WeightFormat,
};
use crate::error::{MoeError, Result};
use crate::formats::quantize_weights;
use crate::tensor::HostTensor;
use crate::weights::{LayerWeights, MoeLayer, QuantizedTensor};

pub use config::{Family, HfConfig};
pub use shards::{ReadRange, Shards};

/// How to load a layer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadOptions {
    /// The rank's slice: it reads only its experts (EP) and its part of I (TP).
    pub parallelism: Parallelism,
    /// Quantize a BF16 checkpoint into this format while loading, one expert at a time.
    pub quantize: Option<WeightFormat>,
    /// Overrides the activation format (default: the natural one of the weight format).
    pub activation_format: Option<ActivationFormat>,
    /// Static input scales (GEMM1, GEMM2) for activation formats that need them (`fp8`, static
    /// `nvfp4`) when the checkpoint has none (online quantization of BF16 weights).
    pub input_scales: Option<(f32, f32)>,
}

/// A loaded layer with its router, so logits can be computed from hidden states.
#[derive(Debug)]
pub struct CheckpointLayer {
    pub family: Family,
    pub layer_index: usize,
    /// The weight format the checkpoint ships (before any online quantization).
    pub shipped_format: WeightFormat,
    pub layer: MoeLayer,
    /// The router (gate) weight `[E, H]` as f32.
    pub router_weight: Vec<f32>,
    /// A bias added to the router logits (GPT-OSS's `router.bias`), `[E]`.
    pub router_linear_bias: Option<Vec<f32>>,
    /// Bytes of tensor data read from the shards.
    pub bytes_read: usize,
}

impl CheckpointLayer {
    /// Router logits `[T, E]` = x · routerᵀ (+ router bias), accumulated in f32, for f32 hidden
    /// states `x` `[T, H]` (the model's gate runs in f32 or with f32 accumulation).
    pub fn router_logits(&self, x: &[f32], tokens: usize) -> Vec<f32> {
        let (e, h) = (self.layer.config().num_experts, self.layer.config().hidden);
        let mut out = vec![0f32; tokens * e];
        for t in 0..tokens {
            let xt = &x[t * h..(t + 1) * h];
            for j in 0..e {
                let w = &self.router_weight[j * h..(j + 1) * h];
                let dot: f32 = xt.iter().zip(w).map(|(a, b)| a * b).sum();
                out[t * e + j] = dot + self.router_linear_bias.as_ref().map_or(0.0, |b| b[j]);
            }
        }
        out
    }

    /// [`router_logits`](Self::router_logits) for a `hidden_states` tensor, as an F32 `[T, E]` tensor.
    pub fn router_logits_tensor(&self, hidden: &HostTensor) -> Result<HostTensor> {
        let (x, tokens) = crate::forward::hidden_as_f32(&self.layer, hidden)?;
        let logits = self.router_logits(&x, tokens);
        Ok(HostTensor::from_f32(
            vec![tokens, self.layer.config().num_experts],
            &logits,
        ))
    }
}

/// Where a family's layer keeps its tensors and how it routes.
pub(crate) struct Plan {
    pub num_experts: usize,
    pub hidden: usize,
    /// I of the whole layer (before TP).
    pub intermediate: usize,
    pub activation: Activation,
    pub w13_order: W13Order,
    pub routing: RoutingConfig,
    pub router_weight: String,
    /// A linear bias of the router (added to logits).
    pub router_linear_bias: Option<String>,
    /// DeepSeek-style `e_score_correction_bias` (steers selection only).
    pub selection_bias: Option<String>,
    pub layout: Layout,
}

pub(crate) enum Layout {
    PerExpert(experts::PerExpertNames),
    /// GPT-OSS: `{prefix}gate_up_proj_blocks` etc.
    GptOss {
        prefix: String,
    },
}

/// What the expert readers return: this rank's projections and extras.
pub(crate) struct LoadedExperts {
    pub shipped: WeightFormat,
    pub w13: QuantizedTensor,
    pub w2: QuantizedTensor,
    pub w13_bias: Option<Vec<f32>>,
    pub w2_bias: Option<Vec<f32>>,
    pub w13_input_scale: Option<f32>,
    pub w2_input_scale: Option<f32>,
}

/// A rank's share of the layer and what to do to each expert once read.
pub(crate) struct ExpertSlice {
    /// Global ids of the experts this rank holds.
    pub experts: Range<usize>,
    /// This rank's features of I (rows of each W13 half, columns of W2).
    pub features: Range<usize>,
    pub tp_rank: usize,
    pub quantize: Option<WeightFormat>,
}

impl ExpertSlice {
    /// Applies online quantization (if asked) to one expert's projection, as read.
    pub fn finish(&self, t: QuantizedTensor) -> Result<QuantizedTensor> {
        let Some(f) = self.quantize.filter(|f| *f != t.format) else {
            return Ok(t);
        };
        if t.format != WeightFormat::Bf16 {
            return Err(MoeError::invalid(
                "quantize",
                format!(
                    "online quantization reads BF16 checkpoints; this one ships {} weights",
                    t.format
                ),
            ));
        }
        let mut values = vec![0f32; t.rows * t.cols];
        t.decode_rows_f32(0, 0..t.rows, &mut values);
        quantize_weights(f, 1, t.rows, t.cols, &values, None)
    }
}

/// Reads `[E, H]` router weights (and checks the shape).
fn read_router(sh: &Shards, name: &str, e: usize, h: usize) -> Result<Vec<f32>> {
    let t = sh.info(name)?;
    t.expect_shape(&[e, h])?;
    sh.read_f32(&t)
}

fn read_vector(sh: &Shards, name: &str, e: usize) -> Result<Vec<f32>> {
    let t = sh.info(name)?;
    t.expect_shape(&[e])?;
    let v = sh.read_f32(&t)?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(MoeError::invalid(
            format!("tensor `{name}`"),
            format!("value at index {i} is {}, not finite", v[i]),
        ));
    }
    Ok(v)
}

/// The plan of layer `layer` of the model whose config is `cfg`.
fn plan(cfg: &HfConfig, family: Family, layer: usize) -> Result<Plan> {
    match family {
        Family::Qwen3Moe | Family::Qwen2Moe => qwen_moe::plan(cfg, family, layer),
        Family::Mixtral => mixtral::plan(cfg, layer),
        Family::DeepseekV3 => deepseek_v3::plan(cfg, layer),
        Family::GptOss => gpt_oss::plan(cfg, layer),
        Family::NemotronH => nemotron_h::plan(cfg, layer),
        Family::MinimaxM2 => minimax_m2::plan(cfg, layer),
    }
}

/// The family and layer config a checkpoint's `config.json` gives layer `layer` (no tensors read).
pub fn describe(
    dir: &Path,
    layer: usize,
) -> Result<(Family, RoutingConfig, Activation, [usize; 3])> {
    let cfg = HfConfig::open(dir)?;
    let family = cfg.family()?;
    let p = plan(&cfg, family, layer)?;
    Ok((
        family,
        p.routing,
        p.activation,
        [p.num_experts, p.hidden, p.intermediate],
    ))
}

/// Loads MoE layer `layer` of the model in `dir`, sliced for `opts.parallelism`.
pub fn load_layer(dir: &Path, layer: usize, opts: &LoadOptions) -> Result<CheckpointLayer> {
    let sh = Shards::open(dir)?;
    load_layer_from(&sh, layer, opts)
}

/// [`load_layer`] from already opened shards (tests read the byte log afterwards).
pub fn load_layer_from(sh: &Shards, layer: usize, opts: &LoadOptions) -> Result<CheckpointLayer> {
    let cfg = HfConfig::open(sh.dir())?;
    let family = cfg.family()?;
    let p = plan(&cfg, family, layer)?;
    let par = opts.parallelism;
    par.validate()?;
    let (e, h, i) = (p.num_experts, p.hidden, p.intermediate);
    if e % par.ep_size != 0 {
        return Err(MoeError::invalid(
            "ep_size",
            format!(
                "E = {e} experts cannot be split evenly over {} ranks",
                par.ep_size
            ),
        ));
    }
    if i % par.tp_size != 0 {
        return Err(MoeError::invalid(
            "tp_size",
            format!("I = {i} cannot be split evenly over {} ranks", par.tp_size),
        ));
    }
    let (per_rank, local_i) = (e / par.ep_size, i / par.tp_size);
    let slice = ExpertSlice {
        experts: par.ep_rank * per_rank..(par.ep_rank + 1) * per_rank,
        features: par.tp_rank * local_i..(par.tp_rank + 1) * local_i,
        tp_rank: par.tp_rank,
        quantize: opts.quantize,
    };

    // Routing runs over all E on every rank, so the router and its biases are read whole.
    let router_weight = read_router(sh, &p.router_weight, e, h)?;
    let router_linear_bias = p
        .router_linear_bias
        .as_deref()
        .map(|n| read_vector(sh, n, e))
        .transpose()?;
    let router_bias = p
        .selection_bias
        .as_deref()
        .map(|n| read_vector(sh, n, e))
        .transpose()?;

    let loaded = match &p.layout {
        Layout::PerExpert(names) => experts::load(sh, names, e, h, i, &slice)?,
        Layout::GptOss { prefix } => gpt_oss::load(sh, prefix, e, h, i, &slice)?,
    };
    let weight_format = loaded.w13.format;
    let activation_format = match opts.activation_format {
        Some(f) => f,
        None if weight_format == loaded.shipped => match weight_format {
            // MXFP4 checkpoints (GPT-OSS) run W4A16 unless asked otherwise.
            WeightFormat::Mxfp4 => ActivationFormat::Bf16,
            f => f.default_activation_format(),
        },
        // Online quantization has no calibrated input scales: nvfp4 then quantizes per token.
        None if weight_format == WeightFormat::Nvfp4 && opts.input_scales.is_none() => {
            ActivationFormat::Nvfp4PerToken
        }
        None => weight_format.default_activation_format(),
    };
    let (mut w13_input_scale, mut w2_input_scale) = (loaded.w13_input_scale, loaded.w2_input_scale);
    if let Some((a, b)) = opts.input_scales {
        w13_input_scale = Some(a);
        w2_input_scale = Some(b);
    }
    if activation_format.needs_input_scale() && w13_input_scale.is_none() {
        return Err(MoeError::missing(format!(
            "input_scales: activation format `{activation_format}` needs static input scales and the checkpoint has none (give them: `moerunner convert --input-scales W13,W2`, or `LoadOptions::input_scales`)")));
    }
    let config = LayerConfig {
        num_experts: e,
        hidden: h,
        intermediate: local_i,
        weight_format,
        activation_format,
        activation: p.activation,
        w13_order: p.w13_order,
        routing: p.routing,
        local_experts: slice.experts.clone(),
        parallelism: par,
    };
    let weights = LayerWeights {
        w13: loaded.w13,
        w2: loaded.w2,
        w13_bias: loaded.w13_bias,
        w2_bias: loaded.w2_bias,
        w13_input_scale,
        w2_input_scale,
        router_bias,
    };
    let layer_obj = MoeLayer::new(config, weights)?;
    Ok(CheckpointLayer {
        family,
        layer_index: layer,
        shipped_format: loaded.shipped,
        layer: layer_obj,
        router_weight,
        router_linear_bias,
        bytes_read: sh.bytes_read(),
    })
}

/// Reads an input file for a checkpoint layer. A file that carries only `hidden_states` gets
/// `router_logits` = hidden · routerᵀ (+ router bias) computed in f32 from the checkpoint's
/// router; a file with a routing source is read as `layer_file::read_input` reads it.
pub fn read_input(path: &Path, layer: &CheckpointLayer) -> Result<crate::layer_file::InputFile> {
    use crate::layer_file::{InputFile, MappedFile, RoutingTensors};
    let file = MappedFile::open(path)?;
    let has_routing = ["router_logits", "topk_ids", "topk_weights", "topk_packed"]
        .iter()
        .any(|n| file.has(n));
    if has_routing {
        return crate::layer_file::read_input(path);
    }
    let hidden = file.require("hidden_states")?;
    let logits = layer.router_logits_tensor(&hidden)?;
    Ok(InputFile {
        hidden,
        routing: RoutingTensors::Logits(logits),
    })
}
