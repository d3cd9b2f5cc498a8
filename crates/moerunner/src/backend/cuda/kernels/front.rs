//! Launcher of `front.cu`: routing (or unpacking), the one-block sort and the input's quantization of a
//! small call in one launch — block 0 routes then sorts, the other blocks quantize.

use super::quant::QuantizeRows;
use super::routing::{self, RouteLogits};
use super::sort::SortPairsByExpert;
use super::{grid_cap, kernel_args, sort, In, Out, Shape, Void};

kernel_args! {
    /// route_logits / unpack_routes, sort_pairs_by_expert and quantize_rows of one call, fused.
    pub struct RouteSortQuantize for Front::"route_sort_quantize", pdl = true {
        /// `RouteSource` as i32.
        route_source: i32,
        // routing.cu's route_logits
        logits: In<Void>,
        logits_dtype: i32,
        bias: In<f32>,
        /// [T * K] FlashInfer's packed routes (route_source 1), else null.
        packed: In<i32>,
        T: i32,
        E: i32,
        K: i32,
        method: i32,
        n_group: i32,
        topk_group: i32,
        routed_scaling_factor: f32,
        norm_topk_prob: i32,
        /// [T, K]: written (sources 0, 1) or the caller's (2), then sorted.
        topk_ids: Out<i32>,
        topk_w: Out<f32>,
        // sort.cu's sort_pairs_by_expert over P = T * K
        expert_start: i32,
        E_local: i32,
        BN: i32,
        max_tiles: i32,
        expert_offsets: Out<i32>,
        sorted_pair: Out<i32>,
        pair_pos: Out<i32>,
        tile_expert: Out<i32>,
        tile_row_start: Out<i32>,
        tile_row_end: Out<i32>,
        num_tiles: Out<i32>,
        // quant.cu's quantize_rows over T rows
        x: In<Void>,
        x_dtype: i32,
        cols: i32,
        in_stride: i64,
        xq: Out<Void>,
        out_stride: i32,
        quant_mode: i32,
        static_scale: In<f32>,
        xq_scales: Out<f32>,
    }
}

impl RouteSortQuantize {
    /// The fused launch of what the three kernels' own arguments describe (the stages build those, so
    /// the fused launch cannot drift from them): `route`'s tokens, routing and outputs (its logits unused
    /// unless `source` is `Logits`; its `topk_ids` / `topk_w` are the caller's routes for `Given`),
    /// `sort` over all T * K pairs, `quant` over the T rows.
    pub fn from_parts(
        source: RouteSource,
        packed: u64,
        route: &RouteLogits,
        sort: &SortPairsByExpert,
        quant: &QuantizeRows,
    ) -> Self {
        debug_assert_eq!(sort.P, route.T * route.K, "the sort takes every pair");
        debug_assert_eq!(quant.rows, route.T, "the quantizer takes every row");
        debug_assert_eq!(
            sort.topk_ids.0, route.topk_ids.0,
            "the sort reads the routes"
        );
        RouteSortQuantize {
            route_source: source as i32,
            logits: route.logits,
            logits_dtype: route.logits_dtype,
            bias: route.bias,
            packed: In::new(packed),
            T: route.T,
            E: route.E,
            K: route.K,
            method: route.method,
            n_group: route.n_group,
            topk_group: route.topk_group,
            routed_scaling_factor: route.routed_scaling_factor,
            norm_topk_prob: route.norm_topk_prob,
            topk_ids: route.topk_ids,
            topk_w: route.topk_w,
            expert_start: sort.expert_start,
            E_local: sort.E_local,
            BN: sort.BN,
            max_tiles: sort.max_tiles,
            expert_offsets: sort.expert_offsets,
            sorted_pair: sort.sorted_pair,
            pair_pos: sort.pair_pos,
            tile_expert: sort.tile_expert,
            tile_row_start: sort.tile_row_start,
            tile_row_end: sort.tile_row_end,
            num_tiles: sort.num_tiles,
            x: quant.x,
            x_dtype: quant.x_dtype,
            cols: quant.cols,
            in_stride: quant.in_stride,
            xq: quant.out,
            out_stride: quant.out_stride,
            quant_mode: quant.mode,
            static_scale: quant.static_scale,
            xq_scales: quant.out_scales,
        }
    }
}

/// The most tokens a call may have to take the fused front unless `MOERUNNER_FUSED_FRONT` says
/// otherwise: 0, off, until a GPU has checked it bit-identical to the three launches it replaces and
/// measured what it saves (written 2026-12-08 without a GPU: docs/cuda.md, "The fused front").
pub const DEFAULT_MAX_TOKENS: usize = 0;

/// Where block 0 finds the routes it sorts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum RouteSource {
    Logits = 0,
    Packed = 1,
    Given = 2,
}

/// What the launch shape depends on.
#[derive(Clone, Copy, Debug)]
pub struct FrontDims {
    pub tokens: usize,
    /// The router's experts (E of the logits) and the layer's top-k.
    pub experts: usize,
    pub top_k: usize,
    /// Experts this rank holds (the sort's E_local).
    pub local_experts: usize,
    /// GEMM1's padded K: the quantized rows' length.
    pub hp: usize,
    /// quant.cu's mode (5, per-token nvfp4, takes one block per row).
    pub quant_mode: i32,
}

/// Dynamic shared memory the front may ask for without the opt-in attribute: the sort's own cap
/// (the 48 KiB default less static memory; the front's is the sort's 256 B and the per-token
/// quantizer's 128 B).
const SMEM_CAP: usize = sort::SMEM_CAP;

/// The launch for `d`, or None where the front cannot take the call: more pairs than the one-block
/// sort takes, or (routing from logits) a routing warp's shared memory over the cap.
pub fn shape(d: FrontDims, source: RouteSource, sms: u32) -> Option<Shape> {
    let pairs = d.tokens * d.top_k;
    if d.tokens == 0 || sort::multi_block(pairs, d.local_experts) {
        return None;
    }
    let sort_smem = sort::one_block_shape(d.local_experts).smem as usize;
    let mut smem = sort_smem;
    if source == RouteSource::Logits {
        let warp_bytes = routing::warp_bytes(d.experts, d.top_k);
        if warp_bytes > SMEM_CAP {
            return None;
        }
        // a warp per token, up to the block's, as many as fit under the cap
        let wanted = d.tokens.min(BLOCK as usize / 32) * warp_bytes;
        smem = smem.max(wanted.min(SMEM_CAP / warp_bytes * warp_bytes));
    }
    let mut quant_blocks = grid_cap(d.tokens * d.hp / 16, BLOCK as usize, sms);
    if d.quant_mode == 5 {
        quant_blocks = quant_blocks.max(grid_cap(d.tokens, 1, sms));
    }
    Some(Shape {
        grid: (1 + quant_blocks, 1, 1),
        block: BLOCK,
        smem: smem as u32,
        pdl: true,
    })
}

/// Threads of every block (`front.cu`'s FR_THREADS): the one-block sort and the quantizer take any
/// multiple of 32, and routing's register path needs ~104 registers a thread, more than 1024
/// threads can have (`tests/cuda.rs` checks the compiled count against it).
pub const BLOCK: u32 = 512;

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(tokens: usize, experts: usize, quant_mode: i32) -> FrontDims {
        FrontDims {
            tokens,
            experts,
            top_k: 8,
            local_experts: experts,
            hp: 2048,
            quant_mode,
        }
    }

    #[test]
    fn block_zero_gets_a_warp_per_token_up_to_the_cap() {
        let s = shape(dims(4, 128, 0), RouteSource::Logits, 132).unwrap();
        let wb = routing::warp_bytes(128, 8);
        assert_eq!(s.block, 512);
        // the sort's 4 * (34 * 128 + 2) bytes hold 10 routing warps, more than 4 tokens need
        assert_eq!(s.smem as usize, sort::one_block_shape(128).smem as usize);
        assert!(s.smem as usize / wb >= 4);
        // 64 tokens: the block's 16 warps' keys (25.6 KB), more than the sort's 17.4 KB
        let s = shape(dims(64, 128, 0), RouteSource::Logits, 132).unwrap();
        assert_eq!(s.smem as usize, 16 * wb);
        // given routes: no routing memory beyond the sort's
        let s = shape(dims(64, 128, 0), RouteSource::Given, 132).unwrap();
        assert_eq!(s.smem, sort::one_block_shape(128).smem);
    }

    #[test]
    fn the_quantizer_gets_every_block_but_the_first() {
        // 64 rows of 2048: 8192 items of 16 columns, 512 threads a block
        let s = shape(dims(64, 128, 0), RouteSource::Logits, 132).unwrap();
        assert_eq!(s.grid, (1 + 16, 1, 1));
        // per-token nvfp4 reduces a row per block
        let s = shape(dims(64, 128, 5), RouteSource::Logits, 132).unwrap();
        assert_eq!(s.grid, (1 + 64, 1, 1));
        let s = shape(dims(1, 128, 0), RouteSource::Given, 132).unwrap();
        assert_eq!(s.grid, (2, 1, 1));
    }

    #[test]
    fn calls_the_one_block_sort_cannot_take_are_refused() {
        assert!(shape(dims(0, 128, 0), RouteSource::Logits, 132).is_none());
        let big = dims(sort::MULTI_MIN_PAIRS / 8 + 1, 128, 0);
        assert!(shape(big, RouteSource::Given, 132).is_none());
        // a router so wide that one warp's keys overflow the shared memory (a rank holding 256 of them)
        let wide = FrontDims {
            local_experts: 256,
            ..dims(1, 4096, 0)
        };
        assert!(shape(wide, RouteSource::Logits, 132).is_none());
        assert!(shape(wide, RouteSource::Given, 132).is_some());
    }
}
