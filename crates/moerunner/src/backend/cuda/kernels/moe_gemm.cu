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
//   gemm/loads.cuh         one stage's loads: weight rows, gathered / zero-filled activation rows, scales
//   gemm/scale_*.cuh       one piece per weight format: element type, stage scales, fold, dequantisation
//   gemm/mainloop_*.cuh    mma.sync, pipelined wgmma, warp-specialised wgmma
//   gemm/epilogue.cuh      dequantisation, row weight, bias, activation, stores
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
#include "gemm/epilogue.cuh"

using Fmt = WeightFormat<WEIGHT_FORMAT>::type;

#define MG_PREFETCH_L2_BYTES (32ll << 20)  // under the L2 of H100 (50 MB) and H200 (60 MB)
// (the main loops below still choose by preprocessor; these two name the format's choices for them)
// a wgmma main loop whose format folds each K step (accumulates each step into a fresh partial)
#define MG_PROMOTE (MG_WGMMA && WEIGHT_FORMAT == WFMT_E4M3_BLOCK)
// mma.sync register double buffering of the fragments (Fmt::FRAG_DB)
#define FRAG_DB (WEIGHT_FORMAT == WFMT_BF16 || (WEIGHT_FORMAT == WFMT_E4M3_BLOCK && BM == 128 && BN == 128))

static_assert(MG_LDT * (MG_WS ? 2 : 1) >= Fmt::STAGE_SCALE_FLOATS,
              "not enough loader threads for the stage scales");
static_assert(!MG_WGMMA || MG_SMEM_BYTES <= 232448, "wgmma: too many stages for 227 KB of shared memory");

extern "C" {
__constant__ int moe_gemm_meta[8] = {MG_NTHREADS, MG_SMEM_BYTES, BM, BN, STAGES, WARPS_M, WARPS_N, WARPS_K};
}

// w          [E, Mp, Kp] prepared weights (Fmt::Elem; gated: rows interleaved 8 gate / 8 up)
// w_scale    the weight format's scales (per tensor: [E]; block: [E, Mp/8, Kp/128])
// act        [rows, Kp] activations (Fmt::Elem), act_scale their scales (per tensor: [1]; block: [rows, Kp/128])
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
    // prefetch would evict what other blocks are about to read (measured: T=16 on qwen3-30b-a3b
    // ran 12 % slower with it).
    if (threadIdx.x == 0 && nrows > 0 &&
        (long long)num_tiles[0] * Mp * Kp * ESZ <= MG_PREFETCH_L2_BYTES) {
        const long long row_bytes = (long long)Kp * ESZ;
        const u8* first = w + ((long long)e * Mp + m_base) * row_bytes;
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(first), "r"((u32)(BM * row_bytes)) : "memory");
    }
    pdl_wait();  // activations, row weights and the output buffers belong to earlier kernels
    pdl_launch_dependents();
    if (nrows <= 0) return;

    __shared__ int s_row[BN];     // activation row of each tile column, -1 when missing
    __shared__ float s_rw[BN];    // Llama-4 row weight of each tile column (1 when none)
    extern __shared__ __align__(128) u8 smem[];

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
#if MG_WS
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
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
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
        }
        s_row[tid] = r;
        s_rw[tid] = rw;
    }
    __syncthreads();

    // ---- loader setup: thread owns chunk (tid & 7) of rows (tid >> 3) + i * NTHREADS/8
    const long long kbytes = (long long)Kp * ESZ;  // bytes per row
    const int nk = (int)(kbytes >> 7);                // 128-byte K steps
    const int ld_c = ltid & 7;
    const int ld_r = ltid >> 3;
    constexpr int ROWS_PER_PASS = MG_LDT / 8;         // a multiple of 8: the swizzle is the same each pass
    const u32 swz = (u32)(((ld_c ^ (ld_r & 7)) << 4));

#if MG_WGMMA
    // operand tiles must sit on 1024-byte boundaries (128B swizzle atoms): round the base up (slack in SMEM)
    u8* const smem_al = smem + ((((mg_smem_addr(smem) + 1023u) & ~1023u)) - mg_smem_addr(smem));
    const u32 sW = mg_smem_addr(smem_al);
#else
    const u32 sW = mg_smem_addr(smem);
#endif
    const u32 sA = sW + STAGES * MG_SW_BYTES;
    const u32 sS = sA + STAGES * MG_SA_BYTES;  // the stages' scales (a format that loads some)

    constexpr int WCH = BM * 8 / MG_LDT;
    const u8* wsrc = w + ((long long)e * Mp + m_base + ld_r) * kbytes + ld_c * 16;
    const long long wpass = (long long)ROWS_PER_PASS * kbytes;
    const u32 wdst = (u32)(ld_r * 128) + swz;

    constexpr int ACH = (BN * 8 + MG_LDT - 1) / MG_LDT;
    const u8* asrc[ACH];
    u32 asz[ACH];
#pragma unroll
    for (int i = 0; i < ACH; ++i) {
        const int n = ld_r + i * ROWS_PER_PASS;
        const int r = n < BN ? s_row[n] : -1;
        asrc[i] = r >= 0 ? act + (long long)r * kbytes + ld_c * 16 : act;
        asz[i] = r >= 0 ? 16u : 0u;
    }

    typename Fmt::StageScales scales;  // what a K step loads beside its operand tiles (the weight format's)
    scales.init(ltid, w_scale, act_scale, e, Mp, m_base, Kp, s_row);

    auto load_stage = [&](int slot, int ks) {
        const long long koff = (long long)ks * 128;
        const u32 dW = sW + slot * MG_SW_BYTES + wdst;
#pragma unroll
        for (int i = 0; i < WCH; ++i) mg_cp16(dW + i * ROWS_PER_PASS * 128, wsrc + koff + i * wpass);
        const u32 dA = sA + slot * MG_SA_BYTES + (u32)(ld_r * 128) + swz;
#pragma unroll
        for (int i = 0; i < ACH; ++i) {
            if ((BN * 8) % MG_NTHREADS == 0 || ld_r + i * ROWS_PER_PASS < BN)
                mg_cp16z(dA + i * ROWS_PER_PASS * 128, asz[i] ? asrc[i] + koff : asrc[i], asz[i]);
        }
        scales.load(sS, slot, ks, ltid);
    };

    // ---- warp placement
    const int warp_m = warp % WARPS_M;
    const int warp_n = (warp / WARPS_M) % WARPS_N;
    const int warp_k = warp / (WARPS_M * WARPS_N);
    const int wm0 = warp_m * MG_WTM;
    const int wn0 = warp_n * MG_WTN;
    const bool warp_active = wn0 < nrows;  // all its columns missing: skip the MMAs (loads still shared)

#if MG_WGMMA
    // ---- warpgroup MMA main loop (see WGMMA in the header)
    const int wgrp = warp >> 2;  // warpgroup: weight rows 64 * wgrp .. + 63
    (void)warp_k;
    constexpr int NACC = MG_MT * MG_NTL * 4;  // accumulator floats per thread per set (BN / 2)
    float acc[MG_MT][MG_NTL][4];
    float* const accf = &acc[0][0][0];

#if MG_WS
    // ---- warp specialisation (WG_WS): warpgroup 2 loads, warpgroups 0 and 1 issue the wgmma (see the header)
    if (warp >= MG_NWARPS) {
        mg_setmaxnreg_dec<WG_WS_PREGS>();
        int slot_i = 0;  // slot of the step loaded next
        u32 ph_i = 0;    // parity of its use count (n = j / STAGES): wait for empty phase n - 1
        // iteration j: signal step j - LAG (its group landed), then load step j. Step j needs the release of
        // step j - STAGES, which the consumers give after issuing step j - STAGES + 1, signalled at iteration
        // j - STAGES + 1 + LAG = j - 1 (no deadlock for LAG <= STAGES - 1; the consumers hold two slots, so
        // at most STAGES - 2 can be loading anyway)
        constexpr int LAG = STAGES - 2;
        int slot_s = 0;  // slot of the step signalled next
        for (int j = 0; j < nk + LAG; ++j) {
            if (j >= LAG) {
                mg_cp_wait<LAG - 1>();  // this thread's group j - LAG has landed (j groups committed) ...
                mg_fence_proxy_async();  // ... and is visible to the async proxy ...
                __syncwarp();            // ... for the whole warp; lane 0 arrives for it
                mg_mbar_arrive_if(bar_full + 8 * slot_s, lane == 0);
                slot_s = slot_s + 1 == STAGES ? 0 : slot_s + 1;
            }
            if (j < nk) {
                if (j >= STAGES) mg_mbar_wait(bar_empty + 8 * slot_i, ph_i ^ 1u);
                load_stage(slot_i, j);
            }
            mg_cp_commit();  // (empty groups in the tail keep the group count uniform)
            slot_i = slot_i + 1 == STAGES ? 0 : slot_i + 1;
            ph_i ^= (u32)(slot_i == 0);
        }
        return;
    }
    mg_setmaxnreg_inc<MG_WS_CREGS>();
    int slot_c = 0;  // slot of the step consumed next
    u32 ph_c = 0;    // parity of its fill count
    auto full_wait = [&]() { mg_mbar_wait(bar_full + 8 * slot_c, ph_c); };
    auto advance = [&]() {
        slot_c = slot_c + 1 == STAGES ? 0 : slot_c + 1;
        ph_c ^= (u32)(slot_c == 0);
    };
#else
    // prologue: STAGES - 2 stages in flight (a slot is refilled two steps after its wgmma was issued)
#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) {
        if (s < nk) load_stage(s, s);
        mg_cp_commit();
    }

    int slot_c = 0;           // stage consumed this iteration
    int slot_l = STAGES - 2;  // stage refilled this iteration (consumed two iterations ago)
    // wait for step ks's stage, refill the slot of step ks - 2 (its wgmma are complete: every warpgroup
    // waited for them before this barrier)
    auto step_head = [&](int ks) {
        mg_cp_wait<STAGES - 3>();  // group ks has landed (for this thread) ...
        mg_fence_proxy_async();    // ... and is visible to the async proxy (wgmma) ...
        __syncthreads();           // ... for all threads; the wgmma of step ks-2 (slot_l) are complete
        if (ks + STAGES - 2 < nk) load_stage(slot_l, ks + STAGES - 2);
        mg_cp_commit();
    };
    auto advance = [&]() {
        slot_c = slot_c + 1 == STAGES ? 0 : slot_c + 1;
        slot_l = slot_l + 1 == STAGES ? 0 : slot_l + 1;
    };
#endif  // MG_WS
    // the four wgmma of one K step from stage `slot` into d; acc_in = 0: the first overwrites d
    // (scale-d = 0: promoted, every step; unpromoted, the first), 1: all add to d
    auto issue = [&](float* d, int slot, int acc_in) {
        const u32 aW = sW + slot * MG_SW_BYTES + wgrp * (64 * 128);
        const u32 aA = sA + slot * MG_SA_BYTES;
#pragma unroll
        for (int i = 0; i < NACC; ++i) mg_reg_fence(d[i]);
        mg_wg_fence();
#pragma unroll
        for (int q = 0; q < 4; ++q) mg_wgmma<BN, Fmt::Elem>(d, mg_desc(aW + 32 * q), mg_desc(aA + 32 * q), acc_in | (q > 0));
        mg_wg_commit();
    };
#if MG_PROMOTE
#pragma unroll
    for (int i = 0; i < NACC; ++i) accf[i] = 0.0f;  // never written by wgmma
    float part[NACC];                                // one K step's partial
    // wait for each step's wgmma (wait_group 0) and fold before the next step is issued
    for (int ks = 0; ks < nk; ++ks) {
#if MG_WS
        full_wait();
#else
        step_head(ks);
#endif
        issue(part, slot_c, false);
        mg_wg_wait<0>();
        Fmt::fold_wgmma(acc, part, smem_al, slot_c, lane, wm0);  // (the scales of the step's stage)
#if MG_WS
        mg_mbar_arrive_if(bar_empty + 8 * slot_c, lane == 0);  // wgmma retired, scales read
#endif
        advance();
    }
#else
    // (acc is not initialised here; the first wgmma runs with scale-d = 0; nk == 0 -> epilogue)
#if MG_WS
    u32 rel = bar_spare;  // slot of step ks-1, released once its wgmma retired (ks = 0: the spare barrier)
    for (int ks = 0; ks < nk; ++ks) {
        full_wait();
        issue(accf, slot_c, ks != 0);
        mg_wg_wait<1>();  // the wgmma of step ks-1 are complete: release its slot
#pragma unroll
        for (int i = 0; i < NACC; ++i) mg_reg_fence(accf[i]);
        mg_mbar_arrive_if(rel, lane == 0);
        rel = bar_empty + 8 * slot_c;
        advance();
    }
#else
    for (int ks = 0; ks < nk; ++ks) {
        step_head(ks);
        issue(accf, slot_c, ks != 0);
        mg_wg_wait<1>();  // the wgmma of step ks-1 are complete: its slot may be refilled next iteration
#pragma unroll
        for (int i = 0; i < NACC; ++i) mg_reg_fence(accf[i]);
        advance();
    }
#endif
#endif
    mg_wg_wait<0>();
#pragma unroll
    for (int i = 0; i < NACC; ++i) mg_reg_fence(accf[i]);
#else
    // ldmatrix lane addressing (byte offsets inside a stage; chunk index is XORed with row & 7 = lane & 7)
    // A (x4): matrices {rows 0-7, rows 8-15} x {chunk 2kk, 2kk+1} -> a0..a3; lane l addresses row l & 15,
    //         chunk 2kk + (l >> 4).
    const u32 a_row_off = (u32)((wm0 + (lane & 15)) * 128);
    const u32 a_chi = (u32)(lane >> 4);
    // B (x4 over two n8 tiles): matrices {tile j chunk 2kk, tile j chunk 2kk+1, tile j+1 ...} -> b0,b1 of
    //         tile j then of tile j+1; lane l addresses row (l & 7) + 8 * (l >> 4), chunk 2kk + ((l >> 3) & 1).
    //   (x2, one n8 tile): lanes 0-15, row l & 7, same chunk rule.
    const u32 b_row_off = (u32)((wn0 + (lane & 7) + (MG_NTL >= 2 ? ((lane >> 4) << 3) : 0)) * 128);
    const u32 b_chi = (u32)((lane >> 3) & 1);
    const u32 lane7 = (u32)(lane & 7);

    float acc[MG_MT][MG_NTL][4];
#pragma unroll
    for (int i = 0; i < MG_MT; ++i)
#pragma unroll
        for (int j = 0; j < MG_NTL; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

    auto load_frags = [&](u32 aW, u32 aA, int kk, u32 (&af)[MG_MT][4], u32 (&bf)[MG_NTL][2]) {
        const u32 ca = ((2u * kk + a_chi) ^ lane7) << 4;
#pragma unroll
        for (int i = 0; i < MG_MT; ++i)
            mg_ldsm_x4(aW + a_row_off + i * 16 * 128 + ca, af[i][0], af[i][1], af[i][2], af[i][3]);
        const u32 cb = ((2u * kk + b_chi) ^ lane7) << 4;
#if MG_NTL == 1
        mg_ldsm_x2(aA + b_row_off + cb, bf[0][0], bf[0][1]);
#else
#pragma unroll
        for (int j = 0; j < MG_NTL; j += 2)
            mg_ldsm_x4(aA + b_row_off + j * 8 * 128 + cb, bf[j][0], bf[j][1], bf[j + 1][0], bf[j + 1][1]);
#endif
    };

    // ---- pipeline prologue
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < nk) load_stage(s, s);
        mg_cp_commit();
    }

    int slot_c = 0;           // stage consumed this iteration
    int slot_l = STAGES - 1;  // stage refilled this iteration (the one consumed in the previous iteration)
    for (int ks = 0; ks < nk; ++ks) {
        mg_cp_wait<STAGES - 2>();  // group ks has landed (for this thread) ...
        __syncthreads();           // ... for all threads; and everyone is done reading slot_l
        if (ks + STAGES - 1 < nk) load_stage(slot_l, ks + STAGES - 1);
        mg_cp_commit();

        if (warp_active) {
            const u32 aW = sW + slot_c * MG_SW_BYTES;
            const u32 aA = sA + slot_c * MG_SA_BYTES;
#if WEIGHT_FORMAT == WFMT_E4M3_BLOCK
            float part[MG_MT][MG_NTL][4];
#pragma unroll
            for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                for (int j = 0; j < MG_NTL; ++j)
#pragma unroll
                    for (int c = 0; c < 4; ++c) part[i][j][c] = 0.0f;
#define MG_TGT part
#else
#define MG_TGT acc
#endif
#if FRAG_DB
            // register double buffer: fragments of sub-step q+1 are loaded before the MMAs of sub-step q
            u32 af[2][MG_MT][4];
            u32 bf[2][MG_NTL][2];
            load_frags(aW, aA, warp_k, af[0], bf[0]);
#pragma unroll
            for (int q = 0; q < MG_KPW; ++q) {
                if (q + 1 < MG_KPW) load_frags(aW, aA, warp_k + (q + 1) * WARPS_K, af[(q + 1) & 1], bf[(q + 1) & 1]);
#pragma unroll
                for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                    for (int j = 0; j < MG_NTL; ++j) mg_mma<Fmt::Elem>(MG_TGT[i][j], af[q & 1][i], bf[q & 1][j][0], bf[q & 1][j][1]);
            }
#else
#pragma unroll
            for (int q = 0; q < MG_KPW; ++q) {
                u32 af[MG_MT][4];
                u32 bf[MG_NTL][2];
                load_frags(aW, aA, warp_k + q * WARPS_K, af, bf);
#pragma unroll
                for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                    for (int j = 0; j < MG_NTL; ++j) mg_mma<Fmt::Elem>(MG_TGT[i][j], af[i], bf[j][0], bf[j][1]);
            }
#endif
#undef MG_TGT
#if WEIGHT_FORMAT == WFMT_E4M3_BLOCK
            Fmt::fold_mma(acc, part, smem, slot_c, lane, wm0, wn0);  // promote the 128-wide K step
#endif
        }
        slot_c = slot_c + 1 == STAGES ? 0 : slot_c + 1;
        slot_l = slot_l + 1 == STAGES ? 0 : slot_l + 1;
    }
#endif  // MG_WGMMA

#if WARPS_K > 1
    // ---- fixed-order reduction of the k-split warps through shared memory (reuses the pipeline buffers)
    mg_cp_wait<0>();
    __syncthreads();
    {
        float* red = (float*)smem;
        constexpr int NACC = MG_MT * MG_NTL * 4;
        const int wmn = warp % (WARPS_M * WARPS_N);
        if (warp_k > 0) {
            float* dst = red + ((warp_k - 1) * (WARPS_M * WARPS_N) + wmn) * NACC * 32 + lane;
#pragma unroll
            for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                for (int j = 0; j < MG_NTL; ++j)
#pragma unroll
                    for (int c = 0; c < 4; ++c) dst[((i * MG_NTL + j) * 4 + c) * 32] = acc[i][j][c];
        }
        __syncthreads();
        if (warp_k > 0) return;
#pragma unroll
        for (int kq = 1; kq < WARPS_K; ++kq) {
            const float* src = red + ((kq - 1) * (WARPS_M * WARPS_N) + wmn) * NACC * 32 + lane;
#pragma unroll
            for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                for (int j = 0; j < MG_NTL; ++j)
#pragma unroll
                    for (int c = 0; c < 4; ++c) acc[i][j][c] += src[((i * MG_NTL + j) * 4 + c) * 32];
        }
    }
#endif

    // ---- epilogue: thread holds rows (g, g+8) x columns (2t, 2t+1) of every m16 x n8 tile
    if (!warp_active) return;
    const EpilogueArgs ea{e, w_scale, act_scale, bias, out_scale, out, Mp, m_base, row0, out_stride,
                          act_alpha, act_beta, act_limit};
    // a wgmma main loop writes acc only when nk > 0 (its first wgmma overwrites), unless the format folds
    const bool acc_valid = MG_WGMMA && !Fmt::FOLD_EACH_STEP ? nk > 0 : true;
    mg_epilogue<Fmt>(acc, acc_valid, ea, s_rw, row_weight != nullptr, nrows, lane, wm0, wn0);
}
