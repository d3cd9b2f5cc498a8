// Grouped MoE GEMM (GEMM1 with the fused activation, or GEMM2) on tensor cores: mma.sync, or on sm_90a wgmma.
//
// One CTA computes a BM (weight rows = output features) x BN (sorted (token, slot) positions) tile of one
// expert: acc[r][p] = sum_k W[e][r][k] * act[row(p)][k], f32 accumulation. Weight rows sit on the MMA's M side
// and tokens on its N side ("swap AB"), so both operands are K-contiguous in global and shared memory, and a
// 1-token expert does not pad to 64 rows. This file is the MoE part only: the work tile of the block (the sort's
// tile list), the gather of its activation rows and row weights, and the composition of the pieces:
//   gemm/config.cuh        the defines (WEIGHT_FORMAT, EPILOGUE, ACT, STORE, MAINLOOP, BM, BN, STAGES) and the
//                          tile shape, thread count and shared memory derived from them
//   gemm/ptx.cuh           cp.async, ldmatrix, mma.sync, mbarrier, fences      gemm/wgmma.cuh  wgmma (SS and RS)
//   gemm/scale_*.cuh       one piece per weight format: element type, stage scales, fold, dequantisation
//   gemm/epilogue.cuh      dequantisation, row weight, bias, activation, stores
//   gemm/loads.cuh         one stage's loads: weight rows, gathered / zero-filled activation rows, scales
//                          (gemm/loads_decoded.cuh: the same for the tiled layout of the decoded formats)
//   gemm/mainloop_*.cuh    mma.sync, pipelined wgmma, warp-specialised wgmma, register-sourced wgmma (plain or
//                          warp-specialised); gemm/ws_producer.cuh the loading warpgroup of both warp-specialised ones
// The last two are fragments of the kernel body (each header names what it reads and declares): written as
// functions, the same code compiled to different PTX (register order, placement of loop-invariant code), and
// this split was to change no code (scripts/gpu/kernel_identity.py). The others are functions and structs.
//
// Block: MG_NTHREADS threads (mma.sync 256; wgmma 2 * BM, + 128 warp-specialised), grid (Mp / BM, max_tiles).
// Dynamic shared memory MG_SMEM_BYTES (gemm/config.cuh), + 8 * BN bytes static (+ 8 * (2 * STAGES + 1) for the
// warp-specialised ring's mbarriers), e.g. BM = BN = 128 mma.sync: 4 stages x 32 KB = 131072 (block scales:
// + 4 x 4 x 144 = 133376); wgmma BN = 128, 6 stages: 197632. The same numbers are exported as `moe_gemm_meta` =
// {NTHREADS, SMEM, BM, BN, STAGES, WARPS_M, WARPS_N, WARPS_K} (an extern "C" __constant__ int[8]; read it with
// cuModuleGetGlobal + cuMemcpyDtoH if wanted; scripts/gpu/check_gemm.py checks it).
//
// Where a faster path would go: on sm_90a TMA loads instead of cp.async; on sm_100a tcgen05.mma with the
// accumulator in tensor memory (a new main loop piece; the loads' layout and the epilogue would stay).

#include "gemm/config.cuh"
#include "gemm/ptx.cuh"
#include "gemm/wgmma.cuh"
// the weight formats: one piece each, mapping its WFMT_* code to itself (WeightFormat<WFMT_*>)
#include "gemm/scale_bf16.cuh"
#include "gemm/scale_fp8_tensor.cuh"
#include "gemm/scale_fp8_block.cuh"
#include "gemm/scale_decoded.cuh"
#include "gemm/epilogue.cuh"

using Fmt = WeightFormat<WEIGHT_FORMAT>::type;

#define MG_PREFETCH_L2_BYTES (32ll << 20)  // under the L2 of H100 (50 MB) and H200 (60 MB)

static_assert(MG_LDT * (MG_WS ? 2 : 1) >= Fmt::STAGE_SCALE_FLOATS,
              "not enough loader threads for the stage scales");
static_assert(!(MG_WGMMA || MG_RS) || MG_SMEM_BYTES <= 232448, "too many stages for 227 KB of shared memory");

extern "C" {
__constant__ int moe_gemm_meta[8] = {MG_NTHREADS, MG_SMEM_BYTES, BM, BN, STAGES, WARPS_M, WARPS_N, WARPS_K};
}

// w          [E, Mp, Kp] prepared weights (Fmt::Elem; gated: rows interleaved 8 gate / 8 up)
// w          (decoded formats: the tiled layout of gemm/scale_decoded.cuh, scales inside)
// w_scale    the weight format's scales (per tensor: [E]; block: [E, Mp/8, Kp/128]; NVFP4: the globals [E])
// act        [rows, Kp] activations (Fmt::Elem), act_scale their scales (per tensor: [1]; block: [rows, Kp/128];
//            NVFP4: each row's global [rows])
// sorted_pair, gather_div   the pair of each sorted position; activation row = pair / gather_div (0: the position)
// tile_*, num_tiles         the work list (sort.cu): expert and sorted-position range of each tile
// bias       [E, Mp] f32 or null; row_weight [pairs] f32 or null (Llama-4: multiplies GEMM1's rows)
// out        rows of out_stride elements (STORE), out_scale [1] (STORE_E4M3's divisor)
extern "C" __global__ void __launch_bounds__(MG_NTHREADS, 1) moe_gemm(
    const u8* __restrict__ w, const float* __restrict__ w_scale, const u8* __restrict__ act,
    const float* __restrict__ act_scale, const int* __restrict__ sorted_pair, int gather_div,
    const int* __restrict__ tile_expert, const int* __restrict__ tile_row_start,
    const int* __restrict__ tile_row_end, const int* __restrict__ num_tiles, const float* __restrict__ bias,
    const float* __restrict__ row_weight, void* __restrict__ out, const float* __restrict__ out_scale, int Mp,
    int Kp, int out_stride, float act_alpha, float act_beta, float act_limit) {
    constexpr int ESZ = Fmt::Elem::BYTES;
    const int y = blockIdx.y;
    // The tile list comes from the sort kernel, which completed before our predecessor (quantize,
    // GEMM1 or the requantization) passed its own pdl_wait: it may be read before ours. So may the
    // weights, which no kernel writes: pull this block's rows towards L2 while the predecessor ends.
    if (y >= num_tiles[0]) {
        pdl_wait();  // keep completion transitive (common.cuh) even for an idle block
        return;
    }
    const int e = tile_expert[y];
    const int row0 = tile_row_start[y];
    const int nrows = min(tile_row_end[y] - row0, BN);
    const int m_base = blockIdx.x * BM;
    // Only when every tile's weights fit in L2 together (decode: a few experts); beyond that the
    // prefetch would evict what other blocks are about to read (docs/cuda.md, "Measurements behind the
    // kernel choices").
#if MG_DECODED
    (void)ESZ;
    // (the tiled layout: the CTA's rows are part of their 128-row tile's steps; prefetch the whole tile)
    const long long tile_bytes = (long long)(Kp >> 6) * 128 * (Fmt::W_ROW_BYTES + Fmt::S_ROW_BYTES);
    if (threadIdx.x == 0 && nrows > 0 && (long long)num_tiles[0] * (Mp / BM) * tile_bytes <= MG_PREFETCH_L2_BYTES) {
        const u8* first = w + ((long long)e * (Mp >> 7) + (m_base >> 7)) * tile_bytes;
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(first), "r"((u32)tile_bytes) : "memory");
    }
#else
    if (threadIdx.x == 0 && nrows > 0 &&
        (long long)num_tiles[0] * Mp * Kp * ESZ <= MG_PREFETCH_L2_BYTES) {
        const long long row_bytes = (long long)Kp * ESZ;
        const u8* first = w + ((long long)e * Mp + m_base) * row_bytes;
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(first), "r"((u32)(BM * row_bytes)) : "memory");
    }
#endif
    pdl_wait();  // activations, row weights and the output buffers belong to earlier kernels
    pdl_launch_dependents();
    if (nrows <= 0) return;

    __shared__ int s_row[BN];     // activation row of each tile column, -1 when missing
    __shared__ float s_rw[BN];    // Llama-4 row weight of each tile column (1 when none)
    extern __shared__ __align__(128) u8 smem[];

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
#if MG_WS  // (the ring exists only in the warp-specialised kernel)
    // full[s] (s < STAGES), empty[s], and a spare one (arrived on in place of a release that has no slot)
    __shared__ __align__(8) u64 s_bar[2 * STAGES + 1];
    const u32 bar_full = mg_smem_addr(&s_bar[0]);
    const u32 bar_empty = bar_full + 8 * STAGES;
    const u32 bar_spare = bar_full + 16 * STAGES;
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mg_mbar_init(bar_full + 8 * s, MG_LDT / 32);  // lane 0 of each producer warp
            mg_mbar_init(bar_empty + 8 * s, MG_NWARPS);
        }
        mg_mbar_init(bar_spare, MG_NWARPS);
        mg_mbar_init_fence();
    }
    // loader thread index (warpgroup 2 loads; the consumers' copy of the setup below is never used)
    const int ltid = tid & (MG_LDT - 1);
#else
    const int ltid = tid;
#endif

    if (tid < BN) {
        int r = -1;
        float rw = 1.0f;
        if (tid < nrows) {
            const int p = row0 + tid;
            if (gather_div > 0 || row_weight != nullptr) {
                const int pair = sorted_pair[p];
                r = gather_div > 0 ? pair / gather_div : p;
                if (row_weight != nullptr) rw = row_weight[pair];
            } else {
                r = p;
            }
            if constexpr (Fmt::COL_SCALE) rw *= act_scale[r];  // the activation row's global (NVFP4)
        }
        s_row[tid] = r;
        s_rw[tid] = rw;
    }
    __syncthreads();

    // ---- the loads of a pipeline stage (declares nk, sW, sA, smem_al, load_stage: see the piece; the decoded
    // formats' main loop includes its own)
#if !MG_RS
#include "gemm/loads.cuh"
#endif

    // ---- warp placement
    const int warp_m = warp % WARPS_M;
    const int warp_n = (warp / WARPS_M) % WARPS_N;
    const int warp_k = warp / (WARPS_M * WARPS_N);
    const int wm0 = warp_m * MG_WTM;
    const int wn0 = warp_n * MG_WTN;
    const bool warp_active = wn0 < nrows;  // all its columns missing: skip the MMAs (loads still shared)

    // ---- the main loop, one per MAINLOOP (a fragment, see the top): reads load_stage, sW, sA, smem / smem_al, nk,
    // lane, warp, wm0, wn0, warp_k, warp_active (and the ring's barriers), declares `acc` (float[MG_MT][MG_NTL][4],
    // the m16n8 fragment layout) for the epilogue. (A choice by preprocessor: each instantiates wgmma shapes
    // that exist only for its tile widths.)
#if MAINLOOP == MAINLOOP_MMA_RS
#include "gemm/mainloop_mma_rs.cuh"
#elif MG_RS
#include "gemm/mainloop_wgmma_rs.cuh"
#elif MAINLOOP == MAINLOOP_WGMMA_WS
#include "gemm/mainloop_wgmma_ws.cuh"
#elif MAINLOOP == MAINLOOP_WGMMA
#include "gemm/mainloop_wgmma.cuh"
#else
#include "gemm/mainloop_mma.cuh"
#endif


    // ---- epilogue: thread holds rows (g, g+8) x columns (2t, 2t+1) of every m16 x n8 tile
    if (!warp_active) return;
    const EpilogueArgs ea{e, w_scale, act_scale, bias, out_scale, out, Mp, m_base, row0, out_stride,
                          act_alpha, act_beta, act_limit};
    // a wgmma main loop writes acc only when nk > 0 (its first wgmma overwrites), unless the format folds
    const bool acc_valid = MG_WGMMA && !Fmt::FOLD_EACH_STEP ? nk > 0 : true;
    mg_epilogue<Fmt>(acc, acc_valid, ea, s_rw, row_weight != nullptr || Fmt::COL_SCALE, nrows, lane, wm0, wn0);
}
