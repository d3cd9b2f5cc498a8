// Weight formats WFMT_MXFP8, WFMT_MXFP4, WFMT_NVFP4: microscaling weights, which Hopper's tensor cores cannot
// multiply as they are (no block-scaled MMA before sm_100), decoded to bf16 in registers and fed to
// register-sourced wgmma (gemm/mainloop_wgmma_rs.cuh) against bf16 activations. Exact: E4M3 x 2^s, E2M1 x 2^s and
// E2M1 x E4M3 are all bf16 values (at most 4, 2 and 6 significant bits; a decoded weight that overflows f32, and so
// bf16, is refused at load), and the activations hold the exact values of the layer's activation format (quant.cu
// modes 3..5), so every product of the MMA is exact and only the f32 accumulation rounds. Powers of two and NVFP4's
// f32 globals factor out of the sum: the epilogue multiplies by the expert's factor (DEQUANT: a power of two, times
// NVFP4's weight global) and, for NVFP4, each column's (COL_SCALE: the activation row's global, per-token or the
// static one repeated).
//
// One multiply per bf16 pair: the element's bits moved into place are its value x 2^-120 (E4M3) or x 2^-126 (E2M1),
// and the tile's scale byte is already the block's bf16 decode factor in short (prepare.rs, `tile_decoded`): for
// UE8M0 the factor's exponent field (the factor 2^(120|126 + s - c), c the expert's shift, 2^c in the epilogue),
// for NVFP4 a code of scale x 2^110 (exponent - 228, 3 mantissa bits; 2^16 in the epilogue).
//
// Prepared layout (prepare.rs, `tile_decoded`): per expert, per 128 prepared rows, per 64-element K step, one
// contiguous block: 128 rows x W_ROW_BYTES element bytes, then 128 rows x S_ROW_BYTES scale bytes. A row's 64
// elements are ordered by the thread that decodes them: thread t (lane % 4) of the row's warp reads its
// W_ROW_BYTES / 4 bytes at t * W_ROW_BYTES / 4, the elements 16q + 2t + {0, 1, 8, 9} (q = 0..3) of the m16n8k16 A
// fragments of the step's four k16 sub-steps:
//   e4m3 (16 bytes): word q = elements 16q+2t, +1, +8, +9, one byte each
//   e2m1 (8 bytes):  word h (h = 0, 1) holds sub-steps 2h and 2h+1; its pair k (k = 0..3: sub-step 2h + k/2,
//                    first element 16q + 2t + 8(k%2)) has the first element in nibble k, the second in nibble k+4,
//                    so one shift and two masks make the bf16 pair
// Scale bytes of a row: MX 2 (the factors of the step's elements 0..31 and 32..63), NVFP4 4 (of each 16).
// (Members of every format piece: gemm/scale_bf16.cuh; these add W_ROW_BYTES, S_ROW_BYTES, decode_row from shared
// memory and decode from registers (Chunk: a thread's element bytes of a row's step; the fused small-batch kernel
// loads them from global memory itself, decode.cu).)
#pragma once
#include "gemm/scale_bf16.cuh"

__device__ __forceinline__ u32 dec_mul_bf16x2(u32 a, u32 b) {
    u32 r;
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
// bytes 0 and 1 (sel 0x4140) or 2 and 3 (0x4342) of x into bits 0-7 and 16-23
__device__ __forceinline__ u32 dec_spread(u32 x, u32 sel) {
    u32 r;
    asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r) : "r"(x), "r"(sel));
    return r;
}
// E4M3 bytes in bits 0-7 and 16-23 -> bf16 pair of their values x 2^-120: exponent and mantissa moved into place
// (E4M3 subnormals land on bf16 subnormals, zero stays zero)
__device__ __forceinline__ u32 dec_e4m3x2_raw(u32 x) { return ((x & 0x007F007Fu) << 4) | ((x & 0x00800080u) << 8); }
// E2M1 nibbles in bits 0-3 and 16-19 -> bf16 pair of their values x 2^-126 (the same, for E2M1)
__device__ __forceinline__ u32 dec_e2m1x2_raw(u32 x) { return ((x & 0x00070007u) << 6) | ((x & 0x00080008u) << 12); }
// an MX tile's scale byte (the factor's bf16 exponent field, 1..254) -> the factor as a bf16 pair
__device__ __forceinline__ u32 dec_exp_pair(u32 b) { return b * 0x00800080u; }
// an NVFP4 tile's scale code -> the factor (scale x 2^110) as a bf16 pair
__device__ __forceinline__ u32 dec_code_pair(u32 c) { return ((c << 4) + (228u << 7)) * 0x00010001u; }

struct FmtDecoded {
    using Elem = Bf16;  // the activation operand, and what the weights are decoded to
    enum : int { STAGE_SCALE_FLOATS = 0 };
    using StageScales = NoStageScales;
    enum : bool { FOLD_EACH_STEP = false };
    enum : bool { FRAG_DB = false };
    enum : bool { DEQUANT = true };
    enum : bool { COL_SCALE = false };
    // w_scale: the experts' epilogue factors [E] (prepare.rs)
    static __device__ __forceinline__ float dequant(int e, const float* w_scale, const float*) { return w_scale[e]; }
};

// a[q][h]: sub-step q's bf16 pair of row r, h = 0: elements 16q+2t, +1; h = 1: 16q+2t+8, +9. `elems` and `scales`:
// the stage's BM rows of element bytes and of scale bytes.
struct FmtMxfp8 : FmtDecoded {
    enum : int { W_ROW_BYTES = 64, S_ROW_BYTES = 2 };
    using Chunk = uint4;  // a thread's element bytes of a row's K step
    static __device__ __forceinline__ void decode_row(const u8* elems, const u8* scales, int r, int t, u32 (&a)[4][2]) {
        decode(*(const uint4*)(elems + r * W_ROW_BYTES + t * 16), *(const u16*)(scales + r * S_ROW_BYTES), a);
    }
    // w: thread t's element bytes of the row's step, sb: the row's scale bytes of the step
    static __device__ __forceinline__ void decode(uint4 w, u32 sb, u32 (&a)[4][2]) {
        const u32 f[2] = {dec_exp_pair(sb & 0xFFu), dec_exp_pair(sb >> 8)};
        const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            a[q][0] = dec_mul_bf16x2(dec_e4m3x2_raw(dec_spread(words[q], 0x4140u)), f[q >> 1]);
            a[q][1] = dec_mul_bf16x2(dec_e4m3x2_raw(dec_spread(words[q], 0x4342u)), f[q >> 1]);
        }
    }
};

// The E2M1 element bytes of a row (both four-bit formats), with f[q] the bf16 scale pair of sub-step q.
__device__ __forceinline__ void dec_e2m1_row(uint2 w, const u32 (&f)[4], u32 (&a)[4][2]) {
    const u32 words[2] = {w.x, w.y};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int q = 2 * h + (k >> 1);
            a[q][k & 1] = dec_mul_bf16x2(dec_e2m1x2_raw(words[h] >> (4 * k)), f[q]);
        }
    }
}

struct FmtMxfp4 : FmtDecoded {
    enum : int { W_ROW_BYTES = 32, S_ROW_BYTES = 2 };
    using Chunk = uint2;
    static __device__ __forceinline__ void decode_row(const u8* elems, const u8* scales, int r, int t, u32 (&a)[4][2]) {
        decode(*(const uint2*)(elems + r * W_ROW_BYTES + t * 8), *(const u16*)(scales + r * S_ROW_BYTES), a);
    }
    static __device__ __forceinline__ void decode(uint2 w, u32 sb, u32 (&a)[4][2]) {
        const u32 f0 = dec_exp_pair(sb & 0xFFu), f1 = dec_exp_pair(sb >> 8);
        const u32 f[4] = {f0, f0, f1, f1};
        dec_e2m1_row(w, f, a);
    }
};

struct FmtNvfp4 : FmtDecoded {
    enum : int { W_ROW_BYTES = 32, S_ROW_BYTES = 4 };
    enum : bool { COL_SCALE = true };  // the activation globals, per column
    using Chunk = uint2;
    static __device__ __forceinline__ void decode_row(const u8* elems, const u8* scales, int r, int t, u32 (&a)[4][2]) {
        decode(*(const uint2*)(elems + r * W_ROW_BYTES + t * 8), *(const u32*)(scales + r * S_ROW_BYTES), a);
    }
    static __device__ __forceinline__ void decode(uint2 w, u32 sb, u32 (&a)[4][2]) {
        u32 f[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) f[q] = dec_code_pair((sb >> (8 * q)) & 0xFFu);
        dec_e2m1_row(w, f, a);
    }
};

template <>
struct WeightFormat<WFMT_MXFP8> {
    using type = FmtMxfp8;
};
template <>
struct WeightFormat<WFMT_MXFP4> {
    using type = FmtMxfp4;
};
template <>
struct WeightFormat<WFMT_NVFP4> {
    using type = FmtNvfp4;
};
#if MG_RS
static_assert(WeightFormat<WEIGHT_FORMAT>::type::W_ROW_BYTES + WeightFormat<WEIGHT_FORMAT>::type::S_ROW_BYTES == MG_DEC_ROW_BYTES,
              "MG_DEC_ROW_BYTES (gemm/config.cuh) is the format's bytes a row per K step");
#endif
