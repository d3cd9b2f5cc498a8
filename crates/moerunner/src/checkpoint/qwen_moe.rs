//! Qwen3-MoE (`qwen3_moe`) and Qwen2-MoE (`qwen2_moe`): per-expert `gate_proj` / `up_proj` /
//! `down_proj` under `model.layers.{N}.mlp.experts.{e}`, router `mlp.gate.weight`, shipped in BF16
//! or FP8 with `weight_scale_inv` 128×128 blocks. Keys: `num_experts`, `num_experts_per_tok`,
//! `moe_intermediate_size`, `norm_topk_prob`, `decoder_sparse_step`, `mlp_only_layers`.
//! Qwen2-MoE's shared expert (`mlp.shared_expert`) is a dense MLP outside this layer.

use super::config::{Family, HfConfig};
use super::experts::PerExpertNames;
use super::{Layout, Plan};
use crate::config::{RoutingConfig, RoutingMethod, W13Order};
use crate::error::{MoeError, Result};

pub(crate) fn plan(cfg: &HfConfig, family: Family, layer: usize) -> Result<Plan> {
    cfg.check_layer_index(layer, None)?;
    let num_experts = cfg.usize("num_experts")?;
    // A layer is sparse unless listed in `mlp_only_layers` or off the `decoder_sparse_step` grid.
    let step = cfg.usize_or("decoder_sparse_step", 1)?.max(1);
    let dense_only = cfg.usize_list("mlp_only_layers")?;
    if num_experts == 0 || dense_only.contains(&layer) || !(layer + 1).is_multiple_of(step) {
        return Err(MoeError::invalid(cfg.key_name("mlp_only_layers"), format!(
            "layer {layer} is a dense MLP layer, not a MoE layer (mlp_only_layers = {dense_only:?}, decoder_sparse_step = {step})")));
    }
    check_block_size(cfg)?;
    let norm = cfg.bool_or("norm_topk_prob", family == Family::Qwen3Moe)?;
    // Qwen3 renormalizes the selected softmax weights (= softmax over the top-k logits); Qwen2's
    // modeling renormalizes the full softmax's top-k (`renormalize_naive`); without
    // `norm_topk_prob` both keep the plain softmax weights.
    let method = match (norm, family) {
        (false, _) => RoutingMethod::Default,
        (true, Family::Qwen2Moe) => RoutingMethod::RenormalizeNaive,
        (true, _) => RoutingMethod::Renormalize,
    };
    let p = format!("model.layers.{layer}.mlp.");
    Ok(Plan {
        num_experts,
        hidden: cfg.usize("hidden_size")?,
        intermediate: cfg.usize("moe_intermediate_size")?,
        activation: cfg.gated_activation("hidden_act")?,
        w13_order: W13Order::GateUp,
        routing: RoutingConfig::new(method, cfg.usize("num_experts_per_tok")?),
        router_weight: format!("{p}gate.weight"),
        router_linear_bias: None,
        selection_bias: None,
        layout: Layout::PerExpert(PerExpertNames {
            prefix: format!("{p}experts."),
            w13_parts: vec!["gate_proj", "up_proj"],
            down: "down_proj",
        }),
    })
}

/// FP8 checkpoints must use the 128×128 blocks our fp8_block format stores.
pub(crate) fn check_block_size(cfg: &HfConfig) -> Result<()> {
    match cfg.weight_block_size()? {
        Some(b) if b != [128, 128] => Err(MoeError::invalid(
            cfg.key_name("quantization_config.weight_block_size"),
            format!("{b:?} is not supported; fp8_block uses [128, 128]"),
        )),
        _ => Ok(()),
    }
}
