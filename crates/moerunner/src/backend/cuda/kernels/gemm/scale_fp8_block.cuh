// Weight format WFMT_E4M3_BLOCK: e4m3 weights and activations with block scales, the weights' one f32 per 8
// prepared rows x 128 K (prepare.rs), the activations' one per row x 128 K (quant.cu). Each K step (128 e4m3)
// loads its BM/8 weight scales and BN activation scales beside the operand tiles (cp.async, zero for missing
// rows) and its partial product is folded into the f32 sum: acc += partial * w_scale(row group of 8) *
// act_scale(column). (Members: gemm/scale_bf16.cuh.)
#pragma once
#include "gemm/scale_bf16.cuh"

struct FmtE4m3Block {
    using Elem = E4m3;
    enum : int { STAGE_SCALE_FLOATS = BM / 8 + BN };
    enum : bool { FOLD_EACH_STEP = true };
    enum : bool { FRAG_DB = BM == 128 && BN == 128 };
    enum : bool { DEQUANT = false };
    enum : bool { COL_SCALE = false };
    static __device__ __forceinline__ float dequant(int, const float*, const float*) { return 1.0f; }

    // Loader thread ltid copies scale floats ltid (+ MG_LDT with the warp-specialised loader, whose 128 threads
    // are fewer than BM/8 + BN) of each stage: the BM/8 weight row groups, then the BN activation rows.
    struct StageScales {
        enum : int { H = MG_WS ? 2 : 1 };
        const float* src[H];
        u32 sz[H];
        // w_scale [E, Mp/8, Kp/128], act_scale [rows, Kp/128]; s_row: each tile column's activation row or -1
        __device__ __forceinline__ void init(int ltid, const float* w_scale, const float* act_scale, int e, int Mp,
                                             int m_base, int Kp, const int* s_row) {
            const int kblocks = Kp >> 7;
#pragma unroll
            for (int h = 0; h < H; ++h) {
                const int t = ltid + h * MG_LDT;
                src[h] = act_scale;
                sz[h] = 0;
                if (t < BM / 8) {
                    src[h] = w_scale + ((long long)e * (Mp / 8) + m_base / 8 + t) * kblocks;
                    sz[h] = 4;
                } else if (t < BM / 8 + BN) {
                    const int r = s_row[t - BM / 8];
                    if (r >= 0) {
                        src[h] = act_scale + (long long)r * kblocks;
                        sz[h] = 4;
                    }
                }
            }
        }
        // K step ks into stage `slot` of the scale area at shared address sS (ltid: as for init)
        __device__ __forceinline__ void load(u32 sS, int slot, int ks, int ltid) {
#pragma unroll
            for (int h = 0; h < H; ++h) {
                const int t = ltid + h * MG_LDT;
                if (t < BM / 8 + BN) mg_cp4z(sS + (slot * STAGE_SCALE_FLOATS + t) * 4, sz[h] ? src[h] + ks : src[h], sz[h]);
            }
        }
    };

    // The scales of stage `slot` (smem: the base the operand tiles start at).
    static __device__ __forceinline__ const float* stage_scales(const u8* smem, int slot) {
        return (const float*)(smem + STAGES * (MG_SW_BYTES + MG_SA_BYTES)) + slot * STAGE_SCALE_FLOATS;
    }

    // mma.sync: promote the K step's partial (this warp's MG_MT x MG_NTL m16n8 tiles at rows wm0, columns wn0)
    static __device__ __forceinline__ void fold_mma(float (&acc)[MG_MT][MG_NTL][4], const float (&part)[MG_MT][MG_NTL][4],
                                                    const u8* smem, int slot, int lane, int wm0, int wn0) {
        const float* sws = stage_scales(smem, slot);
        const float* sas = sws + BM / 8;
        const int t2 = (lane & 3) * 2;
#pragma unroll
        for (int i = 0; i < MG_MT; ++i) {
            const float ws0 = sws[(wm0 + 16 * i) / 8];
            const float ws1 = sws[(wm0 + 16 * i) / 8 + 1];
#pragma unroll
            for (int j = 0; j < MG_NTL; ++j) {
                const float as0 = sas[wn0 + 8 * j + t2];
                const float as1 = sas[wn0 + 8 * j + t2 + 1];
                acc[i][j][0] = fmaf(part[i][j][0], ws0 * as0, acc[i][j][0]);
                acc[i][j][1] = fmaf(part[i][j][1], ws0 * as1, acc[i][j][1]);
                acc[i][j][2] = fmaf(part[i][j][2], ws1 * as0, acc[i][j][2]);
                acc[i][j][3] = fmaf(part[i][j][3], ws1 * as1, acc[i][j][3]);
            }
        }
    }

    // wgmma: promote the K step's partial p (its wgmma complete; the warp's 16 rows at wm0, all BN columns)
    static __device__ __forceinline__ void fold_wgmma(float (&acc)[MG_MT][MG_NTL][4], float* p, const u8* smem, int slot,
                                                      int lane, int wm0) {
        constexpr int NACC = MG_MT * MG_NTL * 4;
#pragma unroll
        for (int i = 0; i < NACC; ++i) mg_reg_fence(p[i]);
        const float* sws = stage_scales(smem, slot);
        const float* sas = sws + BM / 8;
        const int t2 = (lane & 3) * 2;
        const float ws0 = sws[wm0 / 8];
        const float ws1 = sws[wm0 / 8 + 1];
#pragma unroll
        for (int j = 0; j < MG_NTL; ++j) {
            const float2 as = *(const float2*)(sas + 8 * j + t2);
            acc[0][j][0] = fmaf(p[4 * j + 0], ws0 * as.x, acc[0][j][0]);
            acc[0][j][1] = fmaf(p[4 * j + 1], ws0 * as.y, acc[0][j][1]);
            acc[0][j][2] = fmaf(p[4 * j + 2], ws1 * as.x, acc[0][j][2]);
            acc[0][j][3] = fmaf(p[4 * j + 3], ws1 * as.y, acc[0][j][3]);
        }
    }
};
template <>
struct WeightFormat<WFMT_E4M3_BLOCK> {
    using type = FmtE4m3Block;
};
