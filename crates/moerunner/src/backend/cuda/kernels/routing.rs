//! Launchers of `routing.cu`: routing from logits (one warp per token, all ten methods) and the
//! unpacking of FlashInfer's packed int32 routes.

use super::{grid_cap, kernel_args, In, Out, Shape, Void};
use crate::config::RoutingMethod;

kernel_args! {
    /// Top-k ids and weights of every token from its router logits.
    pub struct RouteLogits for Routing::"route_logits", pdl = true {
        /// [T, E] logits of `logits_dtype` (`ElemCode`: f32 or bf16).
        logits: In<Void>,
        logits_dtype: i32,
        /// [E] router bias (DeepSeek-V3's score correction), or null.
        bias: In<f32>,
        T: i32,
        E: i32,
        K: i32,
        /// `method_code(RoutingMethod)`.
        method: i32,
        n_group: i32,
        topk_group: i32,
        routed_scaling_factor: f32,
        norm_topk_prob: i32,
        /// [T, K] expert ids.
        topk_ids: Out<i32>,
        /// [T, K] routing weights.
        topk_w: Out<f32>,
    }
}

kernel_args! {
    /// Packed routes (id << 16 | bf16 weight bits) to ids and f32 weights.
    pub struct UnpackRoutes for Routing::"unpack_routes", pdl = true {
        /// [n] packed int32.
        packed: In<i32>,
        n: i32,
        ids: Out<i32>,
        w: Out<f32>,
    }
}

/// The kernel's number for each routing method (routing.cu's `method` switch).
pub fn method_code(m: RoutingMethod) -> i32 {
    match m {
        RoutingMethod::Default => 0,
        RoutingMethod::Renormalize => 1,
        RoutingMethod::RenormalizeNaive => 2,
        RoutingMethod::DeepseekV3 => 3,
        RoutingMethod::Llama4 => 4,
        RoutingMethod::TopK => 5,
        RoutingMethod::SigmoidRenorm => 6,
        RoutingMethod::Minimax2 => 7,
        RoutingMethod::Sigmoid => 8,
        RoutingMethod::TopkSigmoid => 9,
    }
}

/// Bytes of shared memory one routing warp uses (routing.cu's `rt_warp_bytes`): keys and scratch
/// of the shared-memory path; the register path uses it only for softmax / group scores.
pub fn warp_bytes(experts: usize, k: usize) -> usize {
    (12 * experts + 8 * k + 15) & !15
}

/// route_logits: one warp per token, W warps a block, each with its `warp_bytes` region.
pub fn route_shape(tokens: usize, experts: usize, k: usize, sms: u32) -> Shape {
    let warp_bytes = warp_bytes(experts, k);
    let warps = (49152 / warp_bytes).clamp(1, 8);
    Shape {
        grid: (grid_cap(tokens, warps, sms), 1, 1),
        block: 32 * warps as u32,
        smem: (warps * warp_bytes) as u32,
        pdl: true,
    }
}

/// unpack_routes: a grid-stride loop over the pairs.
pub fn unpack_shape(n: usize) -> Shape {
    Shape {
        grid: (n.div_ceil(256).clamp(1, 1024) as u32, 1, 1),
        block: 256,
        smem: 0,
        pdl: true,
    }
}
