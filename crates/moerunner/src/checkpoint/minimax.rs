//! MiniMax-M2 / M2.5 (`minimax_m2`): FP8 E4M3 experts
//! `model.layers.{N}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight` + `weight_scale_inv` (128×128),
//! router `block_sparse_moe.gate.weight`, selection bias `block_sparse_moe.e_score_correction_bias`.
//! Routing `minimax2` (sigmoid + bias selection, no groups) scaled by `routed_scaling_factor`.

use super::hf_config::HfConfig;
use super::{check_layer_index, swiglu, ExpertLayout, Plan};
use crate::config::{RoutingConfig, RoutingMethod};
use crate::error::Result;

pub(super) fn plan(cfg: &HfConfig, layer: usize) -> Result<Plan> {
    check_layer_index(cfg, layer)?;
    cfg.expect_str("scoring_func", &["sigmoid"])?;
    if !cfg.bool_or("use_routing_bias", true)? {
        return Err(cfg.unsupported(
            "use_routing_bias",
            "false is not supported: minimax2 routing selects with the bias",
        ));
    }
    let mut routing = RoutingConfig::new(RoutingMethod::Minimax2, cfg.top_k()?);
    // Absent in the shipped config: the routed weights are then used unscaled.
    routing.routed_scaling_factor = cfg.f32_or("routed_scaling_factor", 1.0)?;
    let p = format!("model.layers.{layer}.block_sparse_moe.");
    let (num_experts, experts_key) = cfg.num_experts("num_local_experts")?;
    Ok(Plan {
        family: "minimax_m2",
        num_experts,
        experts_key,
        hidden: cfg.usize("hidden_size")?,
        intermediate: cfg.usize("intermediate_size")?,
        routing,
        activation: swiglu(cfg)?,
        experts: ExpertLayout::PerExpert {
            prefix: format!("{p}experts."),
            gate: Some("w1"),
            up: "w3",
            down: "w2",
        },
        router_weight: format!("{p}gate.weight"),
        router_linear_bias: None,
        renamed: Some((".block_sparse_moe.", ".mlp.")),
        correction_bias: Some(format!("{p}e_score_correction_bias")),
    })
}
