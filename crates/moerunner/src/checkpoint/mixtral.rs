//! Mixtral (`mixtral`): per-expert `w1` (gate) / `w3` (up) / `w2` (down) under
//! `model.layers.{N}.block_sparse_moe.experts.{e}`, router `block_sparse_moe.gate.weight`, BF16 or
//! FP8 (`weight_scale_inv` blocks, or static per-tensor `weight_scale` + `input_scale`). Keys:
//! `num_local_experts`, `num_experts_per_tok`, `intermediate_size`, `hidden_act`. Every layer is MoE.

use super::config::HfConfig;
use super::experts::PerExpertNames;
use super::{Layout, Plan};
use crate::config::{RoutingConfig, RoutingMethod, W13Order};
use crate::error::Result;

pub(crate) fn plan(cfg: &HfConfig, layer: usize) -> Result<Plan> {
    cfg.check_layer_index(layer, None)?;
    super::qwen_moe::check_block_size(cfg)?;
    let p = format!("model.layers.{layer}.block_sparse_moe.");
    Ok(Plan {
        num_experts: cfg.usize("num_local_experts")?,
        hidden: cfg.usize("hidden_size")?,
        intermediate: cfg.usize("intermediate_size")?,
        activation: cfg.gated_activation("hidden_act")?,
        w13_order: W13Order::GateUp,
        // Softmax over all experts, top-k, renormalized: equal to softmax over the top-k logits.
        routing: RoutingConfig::new(
            RoutingMethod::Renormalize,
            cfg.usize("num_experts_per_tok")?,
        ),
        router_weight: format!("{p}gate.weight"),
        router_linear_bias: None,
        selection_bias: None,
        layout: Layout::PerExpert(PerExpertNames {
            prefix: format!("{p}experts."),
            w13_parts: vec!["w1", "w3"],
            down: "w2",
        }),
    })
}
