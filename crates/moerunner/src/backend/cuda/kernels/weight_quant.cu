// Online weight quantization: expert weights [E, rows, cols] (bf16 or f32, row-major, already in device
// memory) into the canonical layout of a weight format, bit for bit what
// crates/moerunner/src/formats/weight_quant.rs `quantize_weights` writes on the CPU (that function is the
// definition; spec/formats.md "Scale rules").
//
// ---------------------------------------------------------------------------------------------------
// Arguments shared by the three entries
//   src          [experts, per_expert] elements of src_dtype (ARG_DTYPE_BF16 or ARG_DTYPE_F32); experts is
//                gridDim.y (weight_amax, quantize_weight_rows) or gridDim.z (quantize_weight_block128)
//   first_expert the index of this launch's expert 0 in the whole tensor: only for `bad` (the host offsets
//                every other pointer to this launch's experts)
//   bad          [1] the smallest flat index (expert, row, column over the whole tensor) of a non-finite
//                element seen, by atomicMin; the host sets it to ~0 before and refuses the tensor if it
//                changed (quantize_weights refuses non-finite weights). The outputs are then garbage.
//
// weight_amax(src, src_dtype, per_expert, first_expert, amax_bits, bad)
//   amax_bits[e] = max over expert e of the |x| bit patterns (monotonic for non-negative floats, so it is
//   weight_quant::amax's value), by atomicMax: the host zeroes amax_bits before. For fp8 per-tensor and
//   nvfp4 without given globals (the expert-wide scales).
//
// quantize_weight_rows(src, src_dtype, per_expert, mode, first_expert, amax_bits, given_globals, out,
//                      block_scales, expert_scales, bad)
//   mode 0  fp8 per-tensor: s = max(amax_e, 1e-10) / 448 from amax_bits[e]; out[e, i] = e4m3(x / s) (u8);
//           expert_scales[e] = s. per_expert: any.
//   mode 1  mxfp8: per 32 consecutive elements (a row's 1x32 block, since cols % 32 == 0) byte =
//           ue8m0_ceil(amax / 448) (amax = 0: byte 0), s = dec(byte), out = e4m3(x / s) (u8),
//           block_scales[(e * per_expert + i) / 32] = byte.
//   mode 2  mxfp4: as mode 1 with 6, out = e2m1(x / s), two per byte, element 2i in the low nibble.
//   mode 3  nvfp4: g = given_globals[e] if given_globals is not null, else g = amax_e / (448 * 6) from
//           amax_bits[e] (an all-zero expert: g = 1); per 16 elements byte = e4m3(amax / 6 / g),
//           s = dec(byte) * g, code = e2m1(x / s) (0 when s = 0), packed as mode 2;
//           block_scales[(e * per_expert + i) / 16] = byte; expert_scales[e] = g.
//   Modes 1-3 need per_expert % 32 (16) == 0, which cols % block == 0 gives.
//
// quantize_weight_block128(src, src_dtype, rows, cols, first_expert, out, scales, bad)
//   fp8_block: per expert and 128 x 128 block (partial blocks at the edges: the elements present),
//   s = max(amax_block, 1e-10) / 448, out[e, r, c] = e4m3(x / s), scales[(e * rb + bi) * cb + bj] = s with
//   rb = ceil(rows / 128), cb = ceil(cols / 128).
//
// e4m3 = round to nearest even saturating to +-448 (cvt.rn.satfinite); e2m1 = formats/e2m1.rs `encode`
// (ties to even, saturating to +-6, the sign kept for -0; common.cuh e2m1_code computes it from the bits). Every quotient is an IEEE division
// (div.rn.f32) — or, by a UE8M0 power of two (mxfp8, mxfp4), a multiply by its exact inverse, which rounds
// the same real number the same way; nvfp4's codes come from the reciprocal and two fmas where that gives the
// divided code for every x (common.cuh E2m1Divisor); f32::max(amax, 1e-10) is a max of bit patterns.
//
// Launch (kernels/weight_quant.rs): weight_amax and quantize_weight_rows: block 256, grid (x, experts)
// with x blocks striding over the expert's 16-element items; quantize_weight_block128: block 256, grid
// (cb, rb, experts), one block per 128 x 128 block. No shared memory beyond 8 words. Not launched with PDL
// (each launch reads what the previous one wrote: amax -> rows).
// Loads are 16-byte vectors where a thread's 16 elements are in bounds and aligned, scalar otherwise; the
// same for stores.
// ---------------------------------------------------------------------------------------------------

#include "quant_rows.cuh"

#define WQ_FP8_AMAX_FLOOR_BITS 0x2edbe6ffu  // 1e-10f
#define WQ_INF_BITS 0x7f800000u

// The e4m3 bytes of lo (low byte) and hi (high byte): cvt packs its first source into the upper half.
__device__ __forceinline__ u32 wq_e4m3x2(float lo, float hi) {
    u16 pair;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(hi), "f"(lo));
    return (u32)pair;
}

// v[0..16) = element i .. i + 16 of p, zero from element i + n on (n <= 16 valid elements).
__device__ __forceinline__ void wq_load16(const void* p, int dtype, long long i, int n, float* v) {
    if (n >= 16) {
        if (dtype == ARG_DTYPE_F32) {
            const float* q = (const float*)p + i;
            if (((unsigned long long)q & 15ull) == 0) {
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const float4 f = ((const float4*)q)[k];
                    v[4 * k] = f.x;
                    v[4 * k + 1] = f.y;
                    v[4 * k + 2] = f.z;
                    v[4 * k + 3] = f.w;
                }
                return;
            }
        } else {
            const u16* q = (const u16*)p + i;
            if (((unsigned long long)q & 15ull) == 0) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const uint4 w = ((const uint4*)q)[h];
                    const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        v[8 * h + 2 * k] = __uint_as_float(words[k] << 16);
                        v[8 * h + 2 * k + 1] = __uint_as_float(words[k] & 0xffff0000u);
                    }
                }
                return;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < 16; ++k) v[k] = k < n ? load_as_f32(p, dtype, i + k) : 0.0f;
}

// Called when amax_bits16(v) says a non-finite value is among v[0..n): records the first one's index.
// (Inlined and unrolled so that v stays in registers.)
__device__ __forceinline__ void wq_report(const float* v, int n, long long index0, u64* bad) {
    int first = 16;
#pragma unroll
    for (int k = 15; k >= 0; --k) {
        if (k < n && (__float_as_uint(v[k]) & 0x7fffffffu) >= WQ_INF_BITS) first = k;
    }
    if (first < 16) atomicMin(bad, (u64)(index0 + first));
}

// x / s as the CPU computes it. Scale::divide: an IEEE division. Pow2Scale (UE8M0 scales, s = 2^k): a
// multiply by 2^-k, which is the same correctly rounded value of the same real number x * 2^-k (2^-k is an
// f32 for every UE8M0 byte, 2^-127 as a subnormal; no flush to zero) at a fraction of div.rn's cost.
struct Scale {
    float s;
    __device__ __forceinline__ float divide(float x) const { return div_rn(x, s); }
};
struct Pow2Scale {
    float inverse;  // 2^-k
    // the UE8M0 byte's scale 2^(byte - 127) (byte 0: 2^-127), as its exact inverse
    __device__ __forceinline__ static Pow2Scale of_byte(u32 byte) {
        const u32 field = 254u - byte;  // the biased exponent of 2^(127 - byte)
        return Pow2Scale{field == 0u ? __uint_as_float(1u << 22) : __uint_as_float(field << 23)};
    }
    __device__ __forceinline__ float divide(float x) const { return x * inverse; }
};

// 16 e4m3 bytes of v / s
template <class S>
__device__ __forceinline__ uint4 wq_e4m3x16(const float* v, S s) {
    u32 w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        w[k] = wq_e4m3x2(s.divide(v[4 * k]), s.divide(v[4 * k + 1])) |
               (wq_e4m3x2(s.divide(v[4 * k + 2]), s.divide(v[4 * k + 3])) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// the 16 e2m1 codes code_of(v[k]) in 8 bytes, element 2i in the low nibble; all 0 when `zero` (nvfp4's s = 0)
template <class CodeOf>
__device__ __forceinline__ uint2 wq_e2m1x16(const float* v, CodeOf code_of, bool zero = false) {
    u32 w[2] = {0u, 0u};
    if (!zero) {
#pragma unroll
        for (int k = 0; k < 16; ++k) w[k >> 3] |= code_of(v[k]) << (4 * (k & 7));
    }
    return make_uint2(w[0], w[1]);
}

// 16 bytes at out (16-byte stores where aligned), the first n only
__device__ __forceinline__ void wq_store16(u8* out, uint4 q, int n) {
    if (n >= 16 && ((unsigned long long)out & 15ull) == 0) {
        *(uint4*)out = q;
        return;
    }
    const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int k = 0; k < 16; ++k) {
        if (k < n) out[k] = (u8)(w[k >> 2] >> (8 * (k & 3)));
    }
}

__device__ __forceinline__ u32 wq_warp_max(u32 a) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const u32 b = __shfl_xor_sync(0xffffffffu, a, o);
        a = b > a ? b : a;
    }
    return a;
}

extern "C" __global__ void __launch_bounds__(256) weight_amax(const void* src, int src_dtype, long long per_expert,
                                                               int first_expert, u32* amax_bits, u64* bad) {
    const long long e = blockIdx.y;
    const long long base = e * per_expert;
    const long long items = (per_expert + 15) / 16;
    u32 a = 0;
    for (long long it = (long long)blockIdx.x * blockDim.x + threadIdx.x; it < items;
         it += (long long)gridDim.x * blockDim.x) {
        const long long i0 = it * 16;
        const int n = per_expert - i0 < 16 ? (int)(per_expert - i0) : 16;
        float v[16];
        wq_load16(src, src_dtype, base + i0, n, v);
        const u32 b = amax_bits16(v);
        if (b >= WQ_INF_BITS) wq_report(v, n, (first_expert + e) * per_expert + i0, bad);
        a = b > a ? b : a;
    }
    a = wq_warp_max(a);
    if ((threadIdx.x & 31) == 0 && a != 0u) atomicMax(&amax_bits[e], a);
}

extern "C" __global__ void __launch_bounds__(256) quantize_weight_rows(
    const void* src, int src_dtype, long long per_expert, int mode, int first_expert, const u32* amax_bits,
    const float* given_globals, u8* out, u8* block_scales, float* expert_scales, u64* bad) {
    const long long e = blockIdx.y;
    const long long base = e * per_expert;
    const long long items = (per_expert + 15) / 16;
    const int lane = threadIdx.x & 31;
    // The expert-wide scale: fp8's s, nvfp4's g (read once; unused by modes 1 and 2).
    float expert_scale = 1.0f;
    if (mode == 0) {
        const u32 a = amax_bits[e];
        expert_scale = div_rn(__uint_as_float(a > WQ_FP8_AMAX_FLOOR_BITS ? a : WQ_FP8_AMAX_FLOOR_BITS), 448.0f);
    } else if (mode == 3) {
        if (given_globals) {
            expert_scale = given_globals[e];
        } else {
            const u32 a = amax_bits[e];
            expert_scale = a == 0u ? 1.0f : div_rn(__uint_as_float(a), QT_NVFP4_GLOBAL_DIVISOR);
        }
    }
    if ((mode == 0 || mode == 3) && blockIdx.x == 0 && threadIdx.x == 0) expert_scales[e] = expert_scale;
    for (long long it = (long long)blockIdx.x * blockDim.x + threadIdx.x; it < items;
         it += (long long)gridDim.x * blockDim.x) {
        const long long i0 = it * 16;
        const int n = per_expert - i0 < 16 ? (int)(per_expert - i0) : 16;
        float v[16];
        wq_load16(src, src_dtype, base + i0, n, v);
        u32 a = amax_bits16(v);
        if (a >= WQ_INF_BITS) wq_report(v, n, (first_expert + e) * per_expert + i0, bad);
        if (mode == 0) {
            wq_store16(out + base + i0, wq_e4m3x16(v, Scale{expert_scale}), n);
        } else if (mode == 1 || mode == 2) {
            // the 32-element block's amax from this lane and its neighbour (items 2j, 2j + 1 are lanes
            // 2l, 2l + 1: the grid stride is even and every expert has an even number of items)
            const u32 b = __shfl_xor_sync(0x3u << (lane & 30), a, 1);
            a = b > a ? b : a;
            const u32 byte = a == 0u ? 0u : ue8m0_ceil_byte(div_rn(__uint_as_float(a), mode == 1 ? 448.0f : 6.0f));
            const Pow2Scale s = Pow2Scale::of_byte(byte);
            if (mode == 1) {
                *(uint4*)(out + base + i0) = wq_e4m3x16(v, s);
            } else {
                *(uint2*)(out + (base + i0) / 2) = wq_e2m1x16(v, [&](float x) { return e2m1_code(s.divide(x)); });
            }
            if ((it & 1) == 0) block_scales[(base + i0) / 32] = (u8)byte;
        } else {
            const float g = expert_scale;
            const u32 byte = f32_to_e4m3(div_rn(div_rn(__uint_as_float(a), 6.0f), g));
            const float s = e4m3_to_f32((u8)byte) * g;
            const E2m1Divisor d = E2m1Divisor::of(s);
            *(uint2*)(out + (base + i0) / 2) =
                d.by_reciprocal() ? wq_e2m1x16(v, [&](float x) { return d.code(x); })
                                  : wq_e2m1x16(v, [&](float x) { return e2m1_code(div_rn(x, s)); }, s == 0.0f);
            block_scales[(base + i0) / 16] = (u8)byte;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) quantize_weight_block128(const void* src, int src_dtype, int rows,
                                                                            int cols, int first_expert, u8* out,
                                                                            float* scales, u64* bad) {
    __shared__ u32 warp_amax[8];
    const long long e = blockIdx.z;
    const long long base = e * rows * (long long)cols;
    const int q = threadIdx.x & 7;         // which 16 columns of the block's 128
    const int r_in = threadIdx.x >> 3;     // rows r_in + 32 j, j = 0..3, of the block's 128
    const int c0 = blockIdx.x * 128 + q * 16;
    const int c_end = min((int)blockIdx.x * 128 + 128, cols);
    const int n = c_end - c0 < 0 ? 0 : (c_end - c0 > 16 ? 16 : c_end - c0);
    float v[4][16];
    u32 a = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int r = blockIdx.y * 128 + r_in + 32 * j;
        const int nr = r < rows ? n : 0;
        const long long i0 = (long long)r * cols + c0;
        wq_load16(src, src_dtype, base + i0, nr, v[j]);
        const u32 b = amax_bits16(v[j]);
        if (b >= WQ_INF_BITS) wq_report(v[j], nr, (first_expert + e) * rows * (long long)cols + i0, bad);
        a = b > a ? b : a;
    }
    a = wq_warp_max(a);
    if ((threadIdx.x & 31) == 0) warp_amax[threadIdx.x >> 5] = a;
    __syncthreads();
    a = 0;
#pragma unroll
    for (int w = 0; w < 8; ++w) a = warp_amax[w] > a ? warp_amax[w] : a;
    const float s = div_rn(__uint_as_float(a > WQ_FP8_AMAX_FLOOR_BITS ? a : WQ_FP8_AMAX_FLOOR_BITS), 448.0f);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int r = blockIdx.y * 128 + r_in + 32 * j;
        if (r < rows && n > 0) wq_store16(out + base + (long long)r * cols + c0, wq_e4m3x16(v[j], Scale{s}), n);
    }
    if (threadIdx.x == 0) {
        const long long rb = (rows + 127) / 128, cb = (cols + 127) / 128;
        scales[(e * rb + blockIdx.y) * cb + blockIdx.x] = s;
    }
}
