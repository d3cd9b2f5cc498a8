//! Model presets (`spec/models.md`): real MoE layer shapes used by `bench`, `make-layer` and tests.

use crate::config::{
    Activation, ActivationFormat, LayerConfig, Parallelism, RoutingConfig, RoutingMethod, W13Order,
    WeightFormat,
};
use crate::error::{MoeError, Result};

#[derive(Clone, Debug)]
pub struct Preset {
    pub name: &'static str,
    pub num_experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub activation: Activation,
    pub routing: RoutingMethod,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f32,
    /// GPT-OSS ships expert biases.
    pub biases: bool,
    pub shipped: WeightFormat,
}

#[allow(clippy::too_many_arguments)] // a table row constructor: one argument per column of spec/models.md
const fn p(
    name: &'static str,
    e: usize,
    k: usize,
    h: usize,
    i: usize,
    activation: Activation,
    routing: RoutingMethod,
    groups: (usize, usize),
    rsf: f32,
    biases: bool,
    shipped: WeightFormat,
) -> Preset {
    Preset {
        name,
        num_experts: e,
        top_k: k,
        hidden: h,
        intermediate: i,
        activation,
        routing,
        n_group: groups.0,
        topk_group: groups.1,
        routed_scaling_factor: rsf,
        biases,
        shipped,
    }
}

pub const PRESETS: &[Preset] = &[
    p(
        "qwen3-30b-a3b",
        128,
        8,
        2048,
        768,
        Activation::Swiglu,
        RoutingMethod::Renormalize,
        (1, 1),
        1.0,
        false,
        WeightFormat::Bf16,
    ),
    p(
        "deepseek-v3",
        256,
        8,
        7168,
        2048,
        Activation::Swiglu,
        RoutingMethod::DeepseekV3,
        (8, 4),
        2.5,
        false,
        WeightFormat::Fp8Block,
    ),
    p(
        "gpt-oss-120b",
        128,
        4,
        2880,
        2880,
        Activation::OAI_DEFAULT,
        RoutingMethod::Renormalize,
        (1, 1),
        1.0,
        true,
        WeightFormat::Mxfp4,
    ),
    p(
        "mixtral-8x7b",
        8,
        2,
        4096,
        14336,
        Activation::Swiglu,
        RoutingMethod::Renormalize,
        (1, 1),
        1.0,
        false,
        WeightFormat::Bf16,
    ),
    p(
        "nemotron-3-nano",
        128,
        6,
        2688,
        1856,
        Activation::Relu2,
        RoutingMethod::DeepseekV3,
        (1, 1),
        2.5,
        false,
        WeightFormat::Nvfp4,
    ),
    p(
        "minimax-m2.5",
        256,
        8,
        3072,
        1536,
        Activation::Swiglu,
        RoutingMethod::Minimax2,
        (1, 1),
        1.0,
        false,
        WeightFormat::Fp8Block,
    ),
    p(
        "qwen3-235b-a22b",
        128,
        8,
        4096,
        1536,
        Activation::Swiglu,
        RoutingMethod::Renormalize,
        (1, 1),
        1.0,
        false,
        WeightFormat::Fp8Block,
    ),
];

pub fn preset(name: &str) -> Result<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        MoeError::invalid(
            "preset",
            format!(
                "unknown preset `{name}`; known: {}",
                PRESETS
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })
}

impl Preset {
    pub fn routing_config(&self) -> RoutingConfig {
        RoutingConfig {
            n_group: self.n_group,
            topk_group: self.topk_group,
            routed_scaling_factor: self.routed_scaling_factor,
            ..RoutingConfig::new(self.routing, self.top_k)
        }
    }
    /// The full (unsharded) layer config for a format pairing (`None`: the weight format's default).
    pub fn config(
        &self,
        weight: WeightFormat,
        activation: Option<ActivationFormat>,
    ) -> LayerConfig {
        LayerConfig {
            num_experts: self.num_experts,
            hidden: self.hidden,
            intermediate: self.intermediate,
            weight_format: weight,
            activation_format: activation.unwrap_or(weight.default_activation_format()),
            activation: self.activation,
            w13_order: if matches!(self.activation, Activation::SwigluOai { .. }) {
                W13Order::Interleaved
            } else {
                W13Order::GateUp
            },
            routing: self.routing_config(),
            local_experts: 0..self.num_experts,
            parallelism: Parallelism::default(),
        }
    }
}
