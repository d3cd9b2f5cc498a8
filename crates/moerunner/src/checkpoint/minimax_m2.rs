//! MiniMax-M2 / M2.5 (`minimax_m2`): per-expert `w1` / `w3` / `w2` under
//! `model.layers.{N}.block_sparse_moe.experts.{e}` in FP8 with `weight_scale_inv` 128×128 blocks,
//! router `block_sparse_moe.gate.weight` (F32), selection bias
//! `block_sparse_moe.e_score_correction_bias`. Routing `minimax2`: σ(logits) + bias selects, the
//! selected σ are renormalized. Keys: `num_local_experts`, `num_experts_per_tok`,
//! `intermediate_size`, `scoring_func` (must be sigmoid), `use_routing_bias` (must be true).

use super::config::HfConfig;
use super::experts::PerExpertNames;
use super::{Layout, Plan};
use crate::config::{RoutingConfig, RoutingMethod, W13Order};
use crate::error::{MoeError, Result};

pub(crate) fn plan(cfg: &HfConfig, layer: usize) -> Result<Plan> {
    cfg.check_layer_index(layer, None)?;
    super::qwen_moe::check_block_size(cfg)?;
    cfg.expect_str("scoring_func", "sigmoid", &["sigmoid"])?;
    if !cfg.bool_or("use_routing_bias", true)? {
        return Err(MoeError::invalid(
            cfg.key_name("use_routing_bias"),
            "false is not supported: minimax2 routing selects with e_score_correction_bias",
        ));
    }
    let mut routing =
        RoutingConfig::new(RoutingMethod::Minimax2, cfg.usize("num_experts_per_tok")?);
    // The shipped configs have no scaling key; SGLang applies 1.0.
    routing.routed_scaling_factor = cfg.f32_or("routed_scaling_factor", 1.0)?;
    let p = format!("model.layers.{layer}.block_sparse_moe.");
    Ok(Plan {
        num_experts: cfg.usize("num_local_experts")?,
        hidden: cfg.usize("hidden_size")?,
        intermediate: cfg.usize("intermediate_size")?,
        activation: cfg.gated_activation("hidden_act")?,
        w13_order: W13Order::GateUp,
        routing,
        router_weight: format!("{p}gate.weight"),
        router_linear_bias: None,
        selection_bias: Some(format!("{p}e_score_correction_bias")),
        layout: Layout::PerExpert(PerExpertNames {
            prefix: format!("{p}experts."),
            w13_parts: vec!["w1", "w3"],
            down: "w2",
        }),
    })
}
