//! Mixtral (`mixtral`): per-expert `model.layers.{N}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`
//! (w1 gate, w3 up, w2 down; BF16, or F8_E4M3 + `weight_scale_inv`), router
//! `block_sparse_moe.gate.weight`; softmax over the top k (`renormalize`).

use super::hf_config::HfConfig;
use super::{check_layer_index, swiglu, ExpertLayout, Plan};
use crate::config::{RoutingConfig, RoutingMethod};
use crate::error::Result;

pub(super) fn plan(cfg: &HfConfig, layer: usize) -> Result<Plan> {
    check_layer_index(cfg, layer)?;
    let p = format!("model.layers.{layer}.block_sparse_moe.");
    let (num_experts, experts_key) = cfg.num_experts("num_local_experts")?;
    Ok(Plan {
        family: "mixtral",
        num_experts,
        experts_key,
        hidden: cfg.usize("hidden_size")?,
        intermediate: cfg.usize("intermediate_size")?,
        routing: RoutingConfig::new(RoutingMethod::Renormalize, cfg.top_k()?),
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
        correction_bias: None,
    })
}
