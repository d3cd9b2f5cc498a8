// Shared by every kernel source of the CUDA backend. The loader pastes this file before each .cu (and the
// pieces a .cu includes in place, kernels.rs `translation_unit`), so NVRTC sees one translation unit and no
// header search path is needed (no CUDA headers are used at all: conversions are inline PTX, so the same
// source compiles on a machine with only libnvrtc).
#pragma once
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Element type of a row passed at run time as an int kernel argument (x, logits, GEMM2's rows, the output):
// the values of `dtype_code` in the launchers (layer.rs).
#define ARG_DTYPE_BF16 0
#define ARG_DTYPE_F16 1
#define ARG_DTYPE_F32 2

// Weight formats the GEMM is compiled for (-DWEIGHT_FORMAT=...; one piece each, gemm/scale_*.cuh). The values
// only tell the formats apart.
#define WFMT_BF16 0         // bf16 weights and activations
#define WFMT_E4M3_TENSOR 1  // e4m3, one f32 scale per expert's weights and one for the activations
#define WFMT_E4M3_BLOCK 2   // e4m3, f32 block scales (weights per 8 prepared rows x 128 K, activations 1 x 128)
// Microscaling weights decoded to bf16 in registers (gemm/scale_decoded.cuh) x bf16 activations that hold
// the exact values of the layer's activation format (quant.cu modes 3..5):
#define WFMT_MXFP8 3  // e4m3 elements, UE8M0 scale per 32 along K
#define WFMT_MXFP4 4  // e2m1 elements, UE8M0 scale per 32 along K
#define WFMT_NVFP4 5  // e2m1 elements, e4m3 scale per 16 along K, f32 global per expert (and per activation row)

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

// Round to nearest even, as `half::bf16::from_f32` (NaN stays NaN).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// E4M3 (float8_e4m3fn): round to nearest even, saturating to ±448 (spec/formats.md).
__device__ __forceinline__ u8 f32_to_e4m3(float f) {
    u16 pair;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %1;" : "=h"(pair) : "f"(f));
    return (u8)(pair & 0xFF);
}

// Exact: every E4M3 value is an f16 value.
__device__ __forceinline__ float e4m3_to_f32(u8 b) {
    u32 halves;
    u16 pair = (u16)b;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(halves) : "h"(pair));
    return f16_to_f32((u16)(halves & 0xFFFF));
}

// a / b, IEEE round to nearest even (the quantizers' x / s: the CPU's division, bit for bit).
__device__ __forceinline__ float div_rn(float a, float b) {
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// The scale of a 1x128 fp8 block (quant.cu mode 2, decode.cu) from the max of its |x| bit patterns:
// f32::max(amax, 1e-10) / 448, a NaN amax giving 1e-10 / 448 as on the CPU (formats/act_quant.rs).
__device__ __forceinline__ float e4m3_block128_scale(u32 amax_bits) {
    const u32 floor_bits = 0x2edbe6ffu;  // 1e-10f
    const u32 m = amax_bits > 0x7f800000u ? floor_bits : (amax_bits > floor_bits ? amax_bits : floor_bits);
    return div_rn(__uint_as_float(m), 448.0f);
}

// The E2M1 code of |v| from |v|'s bits (sign bit clear): formats/e2m1.rs `encode` (ties to even, saturating to 6,
// NaN -> 7) from the bits instead of its comparison chain. |v| < 1 gives rint(2|v|) (codes 0, 1, 2; 2|v| is exact),
// as 2^23 + 2|v| rounded once by an fma (its ulp is 1, ties to even as cvt.rni, which runs on the quarter-rate
// conversion pipe and bound the nvfp4 weight quantizer); |v| >= 1 its bits rounded to one mantissa bit, to nearest
// even, are (2 + 2e + m) + 252 in bits 22 and up, saturated at 7 (inf and NaN, whose bits are largest, too). Equal
// to `encode` for every f32 (tests/kernel_arithmetic.rs mirrors it and checks all 2^32).
__device__ __forceinline__ u32 e2m1_magnitude_code(u32 abits) {
    const u32 small = __float_as_uint(__fmaf_rn(__uint_as_float(abits), 2.0f, 8388608.0f)) - 0x4b000000u;
    const u32 r = ((abits + 0x1fffffu + ((abits >> 22) & 1u)) >> 22) - 252u;
    return abits < 0x3f800000u ? small : (r < 7u ? r : 7u);
}

// The E2M1 code of v with v's sign bit (so -0 -> 8). Both quantizers' (quant_rows.cuh, weight_quant.cu).
__device__ __forceinline__ u32 e2m1_code(float v) {
    const u32 bits = __float_as_uint(v);
    return e2m1_magnitude_code(bits & 0x7fffffffu) | ((bits >> 28) & 8u);
}

// The E2M1 code of x / s for s > 0, e2m1_code(div_rn(x, s)) bit for bit, without the division (div.rn.f32 is a
// dozen instructions and bound the nvfp4 quantizers): with r = rcp.rn(s) (the correctly rounded 1/s, once per
// scale) and a = |x|, q0 = a r is within about 2.5 ulp of a / s, and q = q0 + r (a - s q0) (two fmas) within
// half an ulp plus O(2^-24) of it, so q's code differs from the correctly rounded quotient's only where a / s lies
// within about an ulp of a code boundary (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5). tests/kernel_arithmetic.rs
// checks every s mantissa at every boundary, x within 8 steps either side, against formats/e2m1.rs `encode`; the
// steps scale exactly with s's exponent while no intermediate leaves the normal range, which holds for s in
// [2^-90, 2^120] (E2m1Divisor::of). Outside it, and for s = 0, the callers divide. The sign is x's
// (as div.rn gives it for every finite x; non-finite x are refused by the quantizers).
struct E2m1Divisor {
    float s, r;  // r = rcp.rn(s), or 0 where the callers must divide
    __device__ __forceinline__ static E2m1Divisor of(float s) {
        const u32 b = __float_as_uint(s);
        float r = 0.0f;
        if (b >= 0x12800000u && b <= 0x7b800000u) asm("rcp.rn.f32 %0, %1;" : "=f"(r) : "f"(s));  // 2^-90 .. 2^120
        return E2m1Divisor{s, r};
    }
    __device__ __forceinline__ bool by_reciprocal() const { return r != 0.0f; }
    // e2m1_code(div_rn(x, s)); only where by_reciprocal()
    __device__ __forceinline__ u32 code(float x) const {
        const float a = fabsf(x);
        const float q0 = __fmul_rn(a, r);
        const float q = __fmaf_rn(__fmaf_rn(-s, q0, a), r, q0);
        return e2m1_magnitude_code(__float_as_uint(q)) | ((__float_as_uint(x) >> 28) & 8u);  // q >= 0 (or NaN)
    }
};

// max of the |x| bit patterns of v[0..16): monotonic for non-negative floats, NaN wins (weight_quant::amax);
// zeros beyond a short row's valid elements do not change it
__device__ __forceinline__ u32 amax_bits16(const float* v) {
    u32 a = 0;
#pragma unroll
    for (int k = 0; k < 16; ++k) {
        const u32 b = __float_as_uint(v[k]) & 0x7fffffffu;
        a = b > a ? b : a;
    }
    return a;
}

// Loads element i of a row whose element type is `dtype` (ARG_DTYPE_*), as f32.
__device__ __forceinline__ float load_as_f32(const void* p, int dtype, long long i) {
    if (dtype == ARG_DTYPE_F32) return ((const float*)p)[i];
    u16 b = ((const u16*)p)[i];
    return dtype == ARG_DTYPE_BF16 ? bf16_to_f32(b) : f16_to_f32(b);
}

__device__ __forceinline__ void store_from_f32(void* p, int dtype, long long i, float v) {
    if (dtype == ARG_DTYPE_F32) ((float*)p)[i] = v;
    else ((u16*)p)[i] = dtype == ARG_DTYPE_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
}

// Programmatic dependent launch (sm_90+): the launcher lets a kernel start while its predecessor on
// the stream finishes. `pdl_wait` blocks until the predecessor grid has completed and its writes are
// visible (every kernel calls it before touching memory another kernel wrote, and before it ends, so
// completion is transitive along the chain); `pdl_launch_dependents` lets the next kernel's blocks be
// scheduled now. Both are no-ops when the kernel was launched without the attribute.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" :::); }
