// Weight format WFMT_BF16: bf16 weights and activations, no scales. Every weight-format piece defines the same
// members (the main loops and the epilogue use nothing else), and maps its WFMT_* code to itself:
//   Elem                 the tensor-core operand type (ptx.cuh tags: Bf16, E4m3)
//   STAGE_SCALE_FLOATS   f32 scales a K step loads into shared memory beside its operand tiles
//   StageScales          init(...) / load(sS, slot, ks, ltid): the cp.async of those scales (part of a stage)
//   FOLD_EACH_STEP       each 128-wide K step's partial is folded into the f32 sum (fold_mma / fold_wgmma)
//   FRAG_DB              mma.sync: double-buffer the fragments in registers (fewest spills where true)
//   DEQUANT / dequant()  a factor the epilogue multiplies every accumulator by
//   COL_SCALE            the epilogue also multiplies column n by act_scale[activation row of n]
#pragma once

template <int WFMT>
struct WeightFormat;  // ::type is the piece of weight format WFMT

// The scales of a format that loads none with its stages.
struct NoStageScales {
    __device__ __forceinline__ void init(int, const float*, const float*, int, int, int, int, const int*) {}
    __device__ __forceinline__ void load(u32, int, int, int) {}
};

// The fold of a format that folds each K step, callable for any format (the main loops are kernel-body fragments,
// not templates, so a discarded `if constexpr` branch there must still name something that exists).
template <class F, class... A>
__device__ __forceinline__ void mg_fold_mma(A&&... a) {
    if constexpr (F::FOLD_EACH_STEP) F::fold_mma(a...);
}
template <class F, class... A>
__device__ __forceinline__ void mg_fold_wgmma(A&&... a) {
    if constexpr (F::FOLD_EACH_STEP) F::fold_wgmma(a...);
}

struct FmtBf16 {
    using Elem = Bf16;
    enum : int { STAGE_SCALE_FLOATS = 0 };
    using StageScales = NoStageScales;
    enum : bool { FOLD_EACH_STEP = false };
    enum : bool { FRAG_DB = true };
    enum : bool { DEQUANT = false };
    enum : bool { COL_SCALE = false };
    static __device__ __forceinline__ float dequant(int, const float*, const float*) { return 1.0f; }
};
template <>
struct WeightFormat<WFMT_BF16> {
    using type = FmtBf16;
};
