// The epilogue: from the f32 accumulators to stored rows. Every main loop leaves them in the mma.sync m16n8
// fragment layout (warp rows wm0 + 16i + g and + 8 with g = lane/4, columns wn0 + 8j + 2(lane%4) + {0,1}), so
// one epilogue serves all: the weight format's dequantisation factor, the row weight of the column (Llama-4),
// the bias of the row, then EPILOGUE: plain rows, a gated activation ACT of interleaved gate/up row pairs, or
// relu2; stored as STORE. Each thread stores its own fragments (staging GEMM2's rows through shared memory
// for 16-byte stores did not beat that).
#pragma once

// gate g, up u -> the activation (ACT_*: spec semantics; swiglu_oai clamps with alpha, beta, limit)
__device__ __forceinline__ float mg_act(float g, float u, float alpha, float beta, float limit) {
    if constexpr (ACT == ACT_SWIGLU) {
        return __fdiv_rn(g, 1.0f + __expf(-g)) * u;
    } else if constexpr (ACT == ACT_GEGLU) {
        return 0.5f * g * (1.0f + erff(g * 0.70710678118654752440f)) * u;
    } else {
        const float gc = fminf(g, limit);
        const float uc = fminf(fmaxf(u, -limit), limit);
        const float sig = __fdiv_rn(1.0f, 1.0f + __expf(-alpha * gc));
        return gc * sig * (uc + beta);
    }
}

// out[idx] = a as STORE (STORE_E4M3: a / oscale, rounded and saturated)
__device__ __forceinline__ void mg_store(void* out, long long idx, float a, float oscale) {
    if constexpr (STORE == STORE_F32) {
        ((float*)out)[idx] = a;
    } else if constexpr (STORE == STORE_BF16) {
        ((u16*)out)[idx] = f32_to_bf16(a);
    } else {
        ((u8*)out)[idx] = f32_to_e4m3(__fdiv_rn(a, oscale));
    }
}

// Where the tile's results go: output row of tile column n = (row0 + n) * out_stride, its features from m_base
// (EPI_GATED: m_base / 2, one feature per gate/up row pair).
struct EpilogueArgs {
    int e;                   // the expert (w_scale / bias index; a dense GEMM: 0)
    const float* w_scale;    // the weight format's scales (Fmt::dequant)
    const float* act_scale;
    const float* bias;       // [E, Mp] f32 or null
    const float* out_scale;  // [1] STORE_E4M3's divisor (EPI_GATED / EPI_RELU2 only)
    void* out;
    int Mp, m_base, row0, out_stride;
    float act_alpha, act_beta, act_limit;
};

// acc of this warp (unwritten when `acc_valid` is false: nk == 0 on a main loop that never zeroes it);
// s_rw: each tile column's row weight, used when has_rw; columns at or past nrows are not stored.
template <class Fmt>
__device__ __forceinline__ void mg_epilogue(const float (&acc)[MG_MT][MG_NTL][4], bool acc_valid, const EpilogueArgs& a,
                                            const float* s_rw, bool has_rw, int nrows, int lane, int wm0, int wn0) {
    const int g = lane >> 2;
    const int t2 = (lane & 3) * 2;
    const float dq = Fmt::DEQUANT ? Fmt::dequant(a.e, a.w_scale, a.act_scale) : 1.0f;
    const float oscale = EPILOGUE != EPI_DOWN && STORE == STORE_E4M3 ? a.out_scale[0] : 1.0f;
    const float* bias_e = a.bias != nullptr ? a.bias + (long long)a.e * a.Mp + a.m_base : nullptr;

#pragma unroll
    for (int i = 0; i < MG_MT; ++i) {
        const int rl = wm0 + 16 * i + g;  // local rows rl (h = 0) and rl + 8 (h = 1)
        const float b0 = bias_e != nullptr ? bias_e[rl] : 0.0f;
        const float b1 = bias_e != nullptr ? bias_e[rl + 8] : 0.0f;
#pragma unroll
        for (int j = 0; j < MG_NTL; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int n = wn0 + 8 * j + t2 + c;
                if (n < nrows) {
                    float v0 = acc_valid ? acc[i][j][c] : 0.0f;
                    float v1 = acc_valid ? acc[i][j][2 + c] : 0.0f;
                    if constexpr (Fmt::DEQUANT) {
                        v0 *= dq;
                        v1 *= dq;
                    }
                    if (has_rw) {
                        const float rw = s_rw[n];
                        v0 *= rw;
                        v1 *= rw;
                    }
                    v0 += b0;
                    v1 += b1;
                    const long long orow = (long long)(a.row0 + n) * a.out_stride;
                    if constexpr (EPILOGUE == EPI_DOWN) {
                        mg_store(a.out, orow + a.m_base + rl, v0, oscale);
                        mg_store(a.out, orow + a.m_base + rl + 8, v1, oscale);
                    } else if constexpr (EPILOGUE == EPI_GATED) {
                        const int jf = ((a.m_base + wm0 + 16 * i) >> 1) + g;
                        mg_store(a.out, orow + jf, mg_act(v0, v1, a.act_alpha, a.act_beta, a.act_limit), oscale);
                    } else {
                        const float r0 = fmaxf(v0, 0.0f);
                        const float r1 = fmaxf(v1, 0.0f);
                        mg_store(a.out, orow + a.m_base + rl, r0 * r0, oscale);
                        mg_store(a.out, orow + a.m_base + rl + 8, r1 * r1, oscale);
                    }
                }
            }
        }
    }
}
