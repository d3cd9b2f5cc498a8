// The fused front of a small call: routing, the one-block sort and the input's quantization in ONE launch, where
// the standard pipeline launches route_logits (or unpack_routes), sort_pairs_by_expert and quantize_rows one
// after another. At decode sizes each of those is a few µs of launch ramp and drain around a few hundred ns of
// work; the sort needs every route, but the input's quantization needs none, so it runs beside them.
//
// ---------------------------------------------------------------------------------------------------
// route_sort_quantize(route_source, logits, logits_dtype, bias, packed, T, E, K, method, n_group, topk_group,
//                     routed_scaling_factor, norm_topk_prob, topk_ids, topk_w, expert_start, E_local, BN,
//                     max_tiles, expert_offsets, sorted_pair, pair_pos, tile_expert, tile_row_start,
//                     tile_row_end, num_tiles, x, x_dtype, cols, in_stride, xq, out_stride, quant_mode,
//                     static_scale, xq_scales)
//   route_source  0: route the T tokens' logits into topk_ids / topk_w (routing.cu's route_logits, same
//                    arguments); 1: unpack the T*K `packed` routes into them (unpack_routes); 2: topk_ids /
//                    topk_w are the caller's routes, only read.
//   The sort's arguments are sort_pairs_by_expert's (sort.cu) over the P = T*K pairs of topk_ids; the
//   quantizer's are quantize_rows' (quant.cu) over the T rows of x (out = xq, out_scales = xq_scales).
//   Block 0: routes with its first min(blockDim/32, dynamic smem / rt_warp_bytes(E, K)) warps (one warp per
//   token, each in its own rt_warp_bytes region), meets at a block barrier, then sorts in the whole dynamic
//   shared memory. Blocks 1 .. gridDim.x-1 quantize, as blocks 0 .. gridDim.x-2 of quantize_rows' grid.
//   Launch (kernels/front.rs `shape`): block FR_THREADS = 512 — the one-block sort and the quantizer take any
//   multiple of 32, and routing's register path needs ~104 registers a thread, which 1024 threads could not
//   have (65536 an SM; tests/cuda.rs checks every kernel's block against its compiled count); grid >= 2;
//   dynamic smem at least sort_pairs_by_expert's and one routing warp's.
//   Limits: P within the one-block sort's (sort.rs `multi_block` false); route_source 0 needs
//   rt_warp_bytes(E, K) <= dynamic smem.
//   Bit for bit the three kernels' results: each part is the device function its own kernel runs, and none of
//   them depends on how work is spread over warps or blocks (one warp per token; a stable counting sort whose
//   segment count changes only the work split; one thread per 16 columns, or one block per row in mode 5).
//   topk_ids is written and then read by block 0 through the same pointer after __syncthreads (which orders
//   a block's global memory accesses); the compiler keeps those reads coherent (no ld.global.nc) because the
//   kernel stores through that pointer.
// ---------------------------------------------------------------------------------------------------

#include "routing.cu"
#include "sort.cu"
#include "quant.cu"

#define FR_THREADS 512

extern "C" __global__ void __launch_bounds__(FR_THREADS, 1) route_sort_quantize(
    int route_source, const void* logits, int logits_dtype, const float* bias, const int* packed, int T, int E, int K,
    int method, int n_group, int topk_group, float routed_scaling_factor, int norm_topk_prob, int* topk_ids,
    float* topk_w, int expert_start, int E_local, int BN, int max_tiles, int* expert_offsets, int* sorted_pair,
    int* pair_pos, int* tile_expert, int* tile_row_start, int* tile_row_end, int* num_tiles, const void* x,
    int x_dtype, int cols, long long in_stride, void* xq, int out_stride, int quant_mode, const float* static_scale,
    float* xq_scales) {
    pdl_wait();  // inputs come from the previous kernel (common.cuh)
    pdl_launch_dependents();
    extern __shared__ __align__(16) unsigned char fr_smem[];
    if (blockIdx.x > 0) {
        qt_quantize_rows(x, x_dtype, T, cols, in_stride, xq, out_stride, quant_mode, static_scale, xq_scales,
                         (long long)blockIdx.x - 1, (long long)gridDim.x - 1);
        return;
    }
    const int warp = threadIdx.x >> 5;
    if (route_source == 0) {
        const size_t warp_bytes = rt_warp_bytes(E, K);
        const size_t by_smem = st_dyn_smem_bytes() / warp_bytes;
        const int warps = (int)min((size_t)(blockDim.x >> 5), by_smem);
        if (warp < warps)
            rt_route_tokens(logits, logits_dtype, bias, T, E, K, method, n_group, topk_group, routed_scaling_factor,
                            norm_topk_prob, topk_ids, topk_w, fr_smem + (size_t)warp * warp_bytes, warp, warps);
    } else if (route_source == 1) {
        rt_unpack(packed, T * K, topk_ids, topk_w, threadIdx.x, blockDim.x);
    }
    __syncthreads();  // every route is written (and the routing's shared memory free) before the sort
    st_sort_one_block(topk_ids, T * K, expert_start, E_local, BN, max_tiles, expert_offsets, sorted_pair, pair_pos,
                      tile_expert, tile_row_start, tile_row_end, num_tiles, (int*)fr_smem);
}
