//! Loading one MoE layer straight from a Hugging Face model folder (`config.json`, sharded
//! `*.safetensors`, `model.safetensors.index.json`) in the format it ships in: Qwen2/3-MoE,
//! Mixtral, DeepSeek-V3, GPT-OSS, Nemotron-H (ModelOpt NVFP4) and MiniMax-M2. See
//! docs/checkpoints.md for each family's tensor names and their mapping.
//!
//! Design decision: each family file only *describes* a layer (a [`Plan`]: sizes, routing,
//! activation, tensor names); the loaders here read exactly the rank's slice of every tensor
//! through [`shards::Shards::read_box`], which counts the bytes it copies, so tensor- and
//! expert-parallel ranks provably read only their rows, columns, experts and scale blocks.

mod deepseek;
mod experts;
mod fused;
mod gpt_oss;
pub mod hf_config;
mod input;
pub use input::read_input_routed_by;
mod minimax;
mod mixtral;
mod nemotron_h;
mod qwen;
pub mod shards;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{
    Activation, ActivationFormat, LayerConfig, Parallelism, RoutingConfig, W13Order, WeightFormat,
};
use crate::error::{MoeError, Result};
use crate::formats::quantize_weights;
use crate::tensor::{DType, HostTensor};
use crate::weights::{LayerWeights, MoeLayer, QuantizedTensor};
use hf_config::HfConfig;
use shards::Shards;

/// How to load: which rank's slice, and optionally a format to quantize into.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub parallelism: Parallelism,
    /// Quantize the (sliced) experts into this format at load; None keeps the shipped format.
    pub quantize: Option<WeightFormat>,
    /// None: the natural activation format of the resulting weight format.
    pub activation_format: Option<ActivationFormat>,
    /// With `quantize`: who quantizes (None, or a format it does not support: the CPU pass,
    /// `quantize_weights` expert by expert).
    pub quantizer: Option<Arc<dyn ExpertQuantizer>>,
    /// The global experts to read, ascending (an expert map's rank:
    /// [`crate::parallel::ExpertMap::experts_of`], uneven or with replicas), renumbered `0..n` in
    /// the loaded layer as [`crate::shard::shard_experts`] numbers them; None: `parallelism`'s
    /// even EP slice, which keeps its global ids.
    pub experts: Option<Vec<usize>>,
}

/// A quantizer that replaces the CPU pass of `LoadOptions::quantize`: it must return exactly what
/// `quantize_weights` returns for the tensor's experts decoded to f32 (`decode_rows_f32`), with no
/// given globals. The CLI passes the GPU's (`backend::cuda::online_quant`); a loader never names
/// a backend.
pub trait ExpertQuantizer: Send + Sync + std::fmt::Debug {
    /// Whether it quantizes into `format` (else the CPU pass runs).
    fn supports(&self, format: WeightFormat) -> bool;
    /// `t`'s experts quantized into `format`; `name` names the tensor in errors.
    fn quantize(
        &self,
        t: &QuantizedTensor,
        format: WeightFormat,
        name: &str,
    ) -> Result<QuantizedTensor>;
}

/// One layer loaded from a checkpoint, with the router that turns hidden states into logits.
#[derive(Clone, Debug)]
pub struct CheckpointLayer {
    pub layer: MoeLayer,
    /// The router's linear weight `[E, H]`, as shipped (BF16 or F32).
    pub router_weight: Option<HostTensor>,
    /// The router's linear bias `[E]` (GPT-OSS), added to the logits. DeepSeek-style selection
    /// biases (`e_score_correction_bias`) are not this: they live in the layer's `router_bias`.
    pub router_bias: Option<Vec<f32>>,
    /// The family that mapped the layer (`config.json`'s `model_type`).
    pub family: &'static str,
    /// Tensor bytes copied out of the shards (element data, scales, biases, router).
    pub bytes_read: u64,
}

impl CheckpointLayer {
    /// Router logits `[T, E]` f32 = hidden · router_weightᵀ (+ router bias), accumulated in f32.
    pub fn router_logits(&self, hidden: &HostTensor) -> Result<HostTensor> {
        router_logits(
            &self.layer,
            self.router_weight.as_ref(),
            self.router_bias.as_deref(),
            hidden,
        )
    }
}

/// [`CheckpointLayer::router_logits`] for a caller that keeps the router apart from the layer
/// (the Python package hands the layer to a backend and keeps the router).
pub fn router_logits(
    layer: &MoeLayer,
    router_weight: Option<&HostTensor>,
    router_bias: Option<&[f32]>,
    hidden: &HostTensor,
) -> Result<HostTensor> {
    let w = router_weight
        .ok_or_else(|| MoeError::missing("router weight (the checkpoint layer has none)"))?;
    let (e, h) = (layer.config().num_experts, layer.config().hidden);
    // Dtype, shape [T, H] and finite values: an inf in the input is the input's error.
    crate::forward::check_hidden(layer, hidden)?;
    let x = hidden.to_f32_vec("hidden_states")?;
    let wv = w.to_f32_vec("router weight")?;
    let t = hidden.shape[0];
    let mut out = vec![0f32; t * e];
    for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(e)) {
        for (j, oj) in o.iter_mut().enumerate() {
            let dot: f32 = row
                .iter()
                .zip(&wv[j * h..(j + 1) * h])
                .map(|(a, b)| a * b)
                .sum();
            *oj = dot + router_bias.map_or(0.0, |b| b[j]);
        }
    }
    // These logits are ours, not the user's `router_logits`: an overflow is reported as the
    // checkpoint router's, with the token.
    if let Some(idx) = out.iter().position(|v| !v.is_finite()) {
        return Err(MoeError::invalid(
            "the checkpoint's router",
            format!(
                "token {} (expert {}): `hidden_states` · router weight gives {}, beyond f32",
                idx / e.max(1),
                idx % e.max(1),
                out[idx]
            ),
        ));
    }
    Ok(HostTensor::from_f32(vec![t, e], &out))
}

/// What a family file says about one layer; the loaders do the reading.
pub(crate) struct Plan {
    pub family: &'static str,
    pub num_experts: usize,
    /// The `config.json` key `num_experts` was read from (for errors).
    pub experts_key: &'static str,
    pub hidden: usize,
    /// Full (unsliced) I.
    pub intermediate: usize,
    pub routing: RoutingConfig,
    pub activation: Activation,
    pub experts: ExpertLayout,
    pub router_weight: String,
    /// GPT-OSS: a linear bias of the router.
    pub router_linear_bias: Option<String>,
    /// DeepSeek-style selection bias `[E]`.
    pub correction_bias: Option<String>,
    /// transformers 5's rename of this family's module path (`(from, to)`), under which its fused
    /// experts (`save_original_format=False`) and router are found.
    pub renamed: Option<(&'static str, &'static str)>,
}

/// How the experts are stored.
pub(crate) enum ExpertLayout {
    /// One tensor per expert and projection: `{prefix}{e}.{name}.weight` (+ scale tensors).
    /// `gate` is None for non-gated activations.
    PerExpert {
        prefix: String,
        gate: Option<&'static str>,
        up: &'static str,
        down: &'static str,
    },
    /// transformers 5's fused experts (`save_original_format=False`): `{prefix}gate_up_proj`
    /// `[E, 2I, H]` (gate rows, then up rows) or `{prefix}up_proj` `[E, I, H]` when not gated,
    /// and `{prefix}down_proj` `[E, H, I]`.
    Fused { prefix: String, gated: bool },
    /// GPT-OSS: all experts stacked, gate/up interleaved, biases; MXFP4 blocks and scales, or
    /// BF16 `gate_up_proj [E, H, 2I]` / `down_proj [E, I, H]` (input-major).
    GptOss { prefix: String },
}

/// The rank's slice: global experts, and features of I.
pub(crate) struct Slice {
    pub experts: Experts,
    pub features: Range<usize>,
    pub tp_rank: usize,
}

/// A rank's global experts, ascending: an even EP split's range (kept as a range: a hostile
/// `config.json` may claim 10^12 experts, refused once a tensor's shape is checked, so nothing is
/// sized by E before that), or an expert map's list.
pub(crate) enum Experts {
    Range(Range<usize>),
    List(Vec<usize>),
}

impl Experts {
    pub fn len(&self) -> usize {
        match self {
            Experts::Range(r) => r.len(),
            Experts::List(l) => l.len(),
        }
    }
    pub fn iter(&self) -> Box<dyn Iterator<Item = usize> + '_> {
        match self {
            Experts::Range(r) => Box::new(r.clone()),
            Experts::List(l) => Box::new(l.iter().copied()),
        }
    }
    /// Maximal runs of consecutive experts, in order: one box of a stacked tensor each.
    pub fn runs(&self) -> Vec<Range<usize>> {
        match self {
            Experts::Range(r) => vec![r.clone()],
            Experts::List(l) => {
                let mut runs: Vec<Range<usize>> = Vec::new();
                for &x in l {
                    match runs.last_mut() {
                        Some(run) if run.end == x => run.end += 1,
                        _ => runs.push(x..x + 1),
                    }
                }
                runs
            }
        }
    }
}

/// What the expert loaders return, before optional requantization.
pub(crate) struct LoadedExperts {
    pub w13: QuantizedTensor,
    pub w2: QuantizedTensor,
    pub w13_order: W13Order,
    pub w13_bias: Option<Vec<f32>>,
    pub w2_bias: Option<Vec<f32>>,
    pub w13_input_scale: Option<f32>,
    pub w2_input_scale: Option<f32>,
}

/// Describes layer `layer` of the model in `dir` (reads only `config.json`).
fn plan(cfg: &HfConfig, layer: usize) -> Result<Plan> {
    let model_type = cfg.str("model_type")?;
    match model_type {
        "qwen3_moe" | "qwen2_moe" => qwen::plan(cfg, layer, model_type == "qwen2_moe"),
        "mixtral" => mixtral::plan(cfg, layer),
        "deepseek_v3" => deepseek::plan(cfg, layer),
        "gpt_oss" => gpt_oss::plan(cfg, layer),
        "nemotron_h" => nemotron_h::plan(cfg, layer),
        "minimax_m2" => minimax::plan(cfg, layer),
        other => Err(cfg.unsupported(
            "model_type",
            format!(
                "`{other}` is not a model family this loader maps; known: {}",
                hf_config::MODEL_TYPES.join(", ")
            ),
        )),
    }
}

/// The shape of one MoE layer as a `config.json` describes it (no shard is read): what
/// `bench --config` / `bench --checkpoint` benchmarks.
#[derive(Clone, Debug)]
pub struct LayerShape {
    pub family: &'static str,
    /// The layer described: the one asked for, or the model's first MoE layer.
    pub layer: usize,
    pub num_experts: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub routing: RoutingConfig,
    pub activation: Activation,
    /// GPT-OSS's experts carry biases.
    pub biases: bool,
}

/// Describes layer `layer` of the model whose `config.json` is `config` (None: its first MoE
/// layer; a dense layer asked for by index is refused as `load_layer` refuses it).
pub fn describe(config: &Path, layer: Option<usize>) -> Result<LayerShape> {
    let cfg = HfConfig::open_file(config)?;
    let (index, plan) = match layer {
        Some(l) => (l, plan(&cfg, l)?),
        None => {
            let (n, _) = cfg.num_layers()?;
            let mut first_err = None;
            let mut found = None;
            for l in 0..n {
                match plan(&cfg, l) {
                    Ok(p) => {
                        found = Some((l, p));
                        break;
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            match (found, first_err) {
                (Some(f), _) => f,
                (None, Some(e)) => return Err(e),
                (None, None) => {
                    return Err(cfg.unsupported("num_hidden_layers", "the model has no layers"))
                }
            }
        }
    };
    check_plan(&cfg, &plan)?;
    Ok(LayerShape {
        family: plan.family,
        layer: index,
        num_experts: plan.num_experts,
        hidden: plan.hidden,
        intermediate: plan.intermediate,
        routing: plan.routing,
        activation: plan.activation,
        biases: matches!(plan.experts, ExpertLayout::GptOss { .. }),
    })
}

/// Checks `layer` against `num_hidden_layers` (a typo'd index should not read as "dense").
pub(crate) fn check_layer_index(cfg: &HfConfig, layer: usize) -> Result<()> {
    let (n, key) = cfg.num_layers()?;
    if layer >= n {
        return Err(cfg.unsupported(
            key,
            format!("layer {layer} does not exist: the model has {n} layers"),
        ));
    }
    Ok(())
}

/// Loads layer `layer_index` of the model folder `dir` for the rank in `opts.parallelism`.
pub fn load_layer(dir: &Path, layer_index: usize, opts: &LoadOptions) -> Result<CheckpointLayer> {
    let cfg = HfConfig::open(dir)?;
    let mut plan = plan(&cfg, layer_index)?;
    check_plan(&cfg, &plan)?;
    let par = opts.parallelism;
    par.validate()?;
    let (e, inter) = (plan.num_experts, plan.intermediate);
    let (experts, local_experts) = match &opts.experts {
        None => {
            par.check_splits(e, inter)?;
            let per_rank = e / par.ep_size;
            let range = par.ep_rank * per_rank..(par.ep_rank + 1) * per_rank;
            (Experts::Range(range.clone()), range)
        }
        Some(list) => {
            // Any number of experts per rank: only I's split is checked.
            Parallelism {
                ep_size: 1,
                ep_rank: 0,
                ..par
            }
            .check_splits(e, inter)?;
            check_expert_list(list, e)?;
            (Experts::List(list.clone()), 0..list.len())
        }
    };
    let local_i = inter / par.tp_size;
    let slice = Slice {
        experts,
        features: par.tp_rank * local_i..(par.tp_rank + 1) * local_i,
        tp_rank: par.tp_rank,
    };
    let shards = Shards::open(dir)?;
    fused::resolve_layout(&shards, &mut plan)?;
    let loaded = match &plan.experts {
        ExpertLayout::PerExpert { .. } => experts::load(&shards, &plan, &slice)?,
        ExpertLayout::Fused { prefix, gated } => {
            fused::load(&shards, &plan, prefix, *gated, &slice)?
        }
        ExpertLayout::GptOss { prefix } => gpt_oss::load(&shards, &plan, prefix, &slice)?,
    };

    // The router is global: every rank routes over all E experts.
    let router_weight =
        shards.read_all(&plan.router_weight, &[DType::BF16, DType::F32, DType::F16])?;
    router_weight.expect_shape(&plan.router_weight, &[e, plan.hidden])?;
    let router_bias = read_vector(&shards, plan.router_linear_bias.as_deref(), e)?;
    let correction = read_vector(&shards, plan.correction_bias.as_deref(), e)?;

    let loaded = match opts.quantize {
        Some(f) if f != loaded.w13.format || f != loaded.w2.format => {
            let quantizer = opts.quantizer.as_deref().filter(|q| q.supports(f));
            requantize(loaded, f, quantizer, layer_index)?
        }
        _ => loaded,
    };
    let weight_format = loaded.w13.format;
    let activation_format = match opts.activation_format {
        Some(a) => a,
        // Without calibrated input scales, NVFP4 activations are quantized per token.
        None if weight_format == WeightFormat::Nvfp4 && loaded.w13_input_scale.is_none() => {
            ActivationFormat::Nvfp4PerToken
        }
        None => weight_format.default_activation_format(),
    };
    let config = LayerConfig {
        num_experts: e,
        hidden: plan.hidden,
        intermediate: local_i,
        weight_format,
        activation_format,
        activation: plan.activation,
        w13_order: loaded.w13_order,
        routing: plan.routing.clone(),
        local_experts,
        parallelism: par,
    };
    let weights = LayerWeights {
        w13: loaded.w13,
        w2: loaded.w2,
        w13_bias: loaded.w13_bias,
        w2_bias: loaded.w2_bias,
        w13_input_scale: loaded.w13_input_scale,
        w2_input_scale: loaded.w2_input_scale,
        router_bias: correction,
    };
    let layer = MoeLayer::new(config, weights).map_err(|e| checkpoint_names(e, &plan))?;
    Ok(CheckpointLayer {
        layer,
        router_weight: Some(router_weight),
        router_bias,
        family: plan.family,
        bytes_read: shards.bytes_read(),
    })
}

/// `LoadOptions::experts`: at least one, ascending without repeats, each below E.
fn check_expert_list(list: &[usize], num_experts: usize) -> Result<()> {
    let what = "experts to load";
    if list.is_empty() {
        return Err(MoeError::invalid(
            what,
            "the list is empty; a rank needs an expert",
        ));
    }
    if let Some(&x) = list.iter().find(|&&x| x >= num_experts) {
        return Err(MoeError::invalid(
            what,
            format!("expert {x} is out of range (E = {num_experts})"),
        ));
    }
    if let Some(w) = list.windows(2).find(|w| w[0] >= w[1]) {
        return Err(MoeError::invalid(
            what,
            format!(
                "{list:?} is not ascending without repeats ({} then {})",
                w[0], w[1]
            ),
        ));
    }
    Ok(())
}

/// Every file [`load_layer`] reads in `dir`: `config.json`, the index and the shards (what an
/// output path must never be).
pub fn input_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = vec![dir.join("config.json"), dir.join(shards::INDEX_FILE)];
    files.extend(Shards::open(dir)?.files());
    Ok(files)
}

/// The checkpoint's names of a layer-file tensor, for errors of the layer's validation (which
/// names `w13_scale`, `w2_global_scale`, ...): the user knows only the checkpoint's.
fn checkpoint_tensor(plan: &Plan, layer_tensor: &str) -> Option<String> {
    let (proj, what) = layer_tensor.split_once('_').unwrap_or((layer_tensor, ""));
    match &plan.experts {
        ExpertLayout::PerExpert {
            prefix,
            gate,
            up,
            down,
        } => {
            let projs = match (proj, gate) {
                ("w13", Some(g)) => format!("{{{g},{up}}}"),
                ("w13", None) => up.to_string(),
                ("w2", _) => down.to_string(),
                _ => {
                    return plan
                        .correction_bias
                        .clone()
                        .filter(|_| layer_tensor == "router_bias")
                }
            };
            let suffix = match what {
                "" => "weight",
                "scale" => "weight_scale (or weight_scale_inv)",
                "global_scale" => "weight_scale_2",
                "input_scale" => "input_scale",
                _ => return None,
            };
            Some(format!("{prefix}{{e}}.{projs}.{suffix}"))
        }
        ExpertLayout::Fused { prefix, gated } => {
            let p = match (proj, gated) {
                ("w13", true) => "gate_up_proj",
                ("w13", false) => "up_proj",
                ("w2", _) => "down_proj",
                _ => return None,
            };
            Some(format!("{prefix}{p}"))
        }
        ExpertLayout::GptOss { prefix } => {
            let p = match proj {
                "w13" => "gate_up_proj",
                "w2" => "down_proj",
                _ => return None,
            };
            let suffix = match what {
                "" => "blocks",
                "scale" => "scales",
                "bias" => "bias",
                _ => return None,
            };
            Some(format!("{prefix}{p}_{suffix}"))
        }
    }
}

/// Adds the checkpoint's tensor names to an error of the layer's validation.
fn checkpoint_names(err: MoeError, plan: &Plan) -> MoeError {
    let MoeError::Invalid { what, why } = err else {
        return err;
    };
    let mut what = what;
    for t in [
        "w13_global_scale",
        "w2_global_scale",
        "w13_input_scale",
        "w2_input_scale",
        "w13_scale",
        "w2_scale",
        "w13_bias",
        "w2_bias",
        "router_bias",
    ] {
        let quoted = format!("`{t}`");
        if what.contains(&quoted) {
            if let Some(name) = checkpoint_tensor(plan, t) {
                what = what.replace(&quoted, &format!("`{name}` (the layer's `{t}`)"));
                break;
            }
        }
    }
    MoeError::Invalid { what, why }
}

/// The checks of `LayerConfig::validate` that concern `config.json`, run before any shard is
/// opened so that their errors name the checkpoint's keys (`num_experts_per_tok`), not the layer
/// file's (`top_k`), and sizes that overflow are refused before anything is allocated.
fn check_plan(cfg: &HfConfig, plan: &Plan) -> Result<()> {
    let (e, h, i) = (plan.num_experts, plan.hidden, plan.intermediate);
    if e == 0 {
        return Err(cfg.unsupported(plan.experts_key, "the layer has no experts (E = 0)"));
    }
    crate::size::product(
        &format!("{} keys for E × 2I × H", cfg.path().display()),
        &[e, i, 2, h],
    )?;
    let top_k_key = ["num_experts_per_tok", "experts_per_token"]
        .into_iter()
        .find(|k| cfg.get(k).is_some())
        .unwrap_or("num_experts_per_tok");
    plan.routing.validate(e).map_err(|err| match err {
        MoeError::Invalid { what, why } => {
            let key = if what == "top_k" {
                top_k_key
            } else {
                what.as_str()
            };
            cfg.unsupported(key, why.replace("top_k", top_k_key))
        }
        other => other,
    })
}

fn read_vector(shards: &Shards, name: Option<&str>, len: usize) -> Result<Option<Vec<f32>>> {
    let Some(name) = name else { return Ok(None) };
    let (shape, v) = shards.read_f32(name)?;
    if shape != [len] {
        return Err(MoeError::shape(name, format!("[{len}]"), &shape));
    }
    Ok(Some(v))
}

/// Online quantization: decode the loaded (already sliced) experts and quantize them into `f`
/// (by `quantizer` when given). Scales come from the slice, so a TP rank's fp8 / nvfp4 global
/// scales are its own. Static input scales are dropped: they are calibrated for the shipped
/// format, not for `f`.
fn requantize(
    l: LoadedExperts,
    f: WeightFormat,
    quantizer: Option<&dyn ExpertQuantizer>,
    layer_index: usize,
) -> Result<LoadedExperts> {
    if f == WeightFormat::Fp8 {
        return Err(MoeError::Unsupported(
            "--quantize fp8 (per-tensor) needs calibrated static input scales, which a checkpoint does not carry for it; \
             use fp8_block, mxfp8, mxfp4 or nvfp4"
                .into(),
        ));
    }
    // One expert at a time: the f32 copy is one expert's, not the layer's (a DeepSeek layer's
    // experts in f32 would be ~11 GB). Every quantizer's scales are per expert or finer, so this
    // equals quantizing all experts at once.
    let convert = |t: &QuantizedTensor, name: &str| -> Result<QuantizedTensor> {
        if let Some(q) = quantizer {
            return q.quantize(t, f, &format!("layer {layer_index} {name}"));
        }
        let mut values = vec![0f32; t.rows * t.cols];
        let mut parts = Vec::with_capacity(t.experts);
        for x in 0..t.experts {
            t.decode_rows_f32(x, 0..t.rows, &mut values);
            parts.push(quantize_weights(f, 1, t.rows, t.cols, &values, None)?);
        }
        crate::weights::QuantizedTensor::concat_experts(parts)
    };
    Ok(LoadedExperts {
        w13: convert(&l.w13, "w13")?,
        w2: convert(&l.w2, "w2")?,
        w13_input_scale: None,
        w2_input_scale: None,
        ..l
    })
}

/// SwiGLU experts: `hidden_act` must be SiLU (absent: the families' default, silu).
pub(crate) fn swiglu(cfg: &HfConfig) -> Result<Activation> {
    cfg.expect_str("hidden_act", &["silu", "swish"])?;
    Ok(Activation::Swiglu)
}
