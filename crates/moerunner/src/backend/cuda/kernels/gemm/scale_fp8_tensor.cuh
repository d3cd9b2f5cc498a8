// Weight format WFMT_E4M3_TENSOR: e4m3 weights and activations, one f32 scale per expert's weights and one for
// all activations. All of K accumulates in f32 (mma.sync; wgmma's e4m3 accumulation keeps ~14 bits, so the host
// keeps this format on mma.sync: kernels.rs, GemmVariant::choose); the epilogue multiplies by both scales.
// (Members: gemm/scale_bf16.cuh.)
#pragma once
#include "gemm/scale_bf16.cuh"

struct FmtE4m3Tensor {
    using Elem = E4m3;
    enum : int { STAGE_SCALE_FLOATS = 0 };
    using StageScales = NoStageScales;
    enum : bool { FOLD_EACH_STEP = false };
    // on sm_90 ptxas emulates the e4m3 mma.sync with F2FP unpacks + f16 HMMA; the extra registers of the double
    // buffer make the 128x128 tile spill
    enum : bool { FRAG_DB = false };
    enum : bool { DEQUANT = true };
    enum : bool { COL_SCALE = false };
    // w_scale [E] per expert, act_scale [1]
    static __device__ __forceinline__ float dequant(int e, const float* w_scale, const float* act_scale) {
        return w_scale[e] * act_scale[0];
    }
};
template <>
struct WeightFormat<WFMT_E4M3_TENSOR> {
    using type = FmtE4m3Tensor;
};
