// The fused small-batch kernel's body for the tiled weight formats (mxfp8, mxfp4, nvfp4; WEIGHT_FORMAT >=
// WFMT_MXFP8), a piece of decode.cu: its entry, contract, helpers and launch are decode.cu's. The weights lie as
// weight preparation tiles them for the GEMM's register-sourced main loop (gemm/scale_decoded.cuh: per expert, per
// 128 prepared rows, per 64-element K step, the rows' element bytes then their scale bytes), so a single row's K
// step is only 32 or 64 bytes, scattered: the work is split by 16-row groups instead, whose step is one contiguous
// run (512 or 1024 element bytes, then 32 or 64 scale bytes). Lane l of a warp loads thread slot t = l % 4 (16
// bytes for mxfp8, 8 for the 4-bit formats) of rows l/4 and 8 + l/4 and decodes them with the GEMM's own
// Fmt::decode to bf16 pairs, exact (E4M3 x 2^s, E2M1 x 2^s and E2M1 x E4M3 are bf16 values): they are the lane's A
// fragments of m16n8k16 bf16 MMAs against the staged activations (dt_group_dot), so products are exact and the
// accumulation f32, as in the GEMM. The
// activation rows (the input, then the intermediate) are quantized into shared memory exactly as quant.cu's modes
// IN_QUANT and INTER_QUANT do (0 bf16, 3 mxfp8, 4 nvfp4 static, 5 nvfp4 per token: bf16 holding each quantized
// value), laid out in the decode's thread order (dt_pos), so a lane reads its 16 elements of a step as 32
// contiguous bytes. The epilogue is the GEMM's: the sum times the expert's factor (Fmt::dequant), times the
// activation row's global (nvfp4: COL_SCALE) and the Llama-4 weight, plus the bias, then the activation.
//
// Phase 1 items are (pair, 16-row group of W13): a gated group is 8 gate and 8 up rows, so 8 features; relu2 16.
// Phase 2 items are (token, 16 output rows of W2), each the token's K slots. A CTA takes a contiguous range of
// items, in batches of up to DC_WARPS items whose warps split each item's K steps (and, in phase 2, its slots)
// into units; every unit writes its 16 rows' partial sums to shared memory, and after a barrier the partials are
// added in unit order (deterministic for a given grid), so a call of few items still keeps every warp streaming.
// Shared memory (host: DecodeVariant::smem_bytes): the staged rows (bf16) and their globals, then the partials.
// This piece holds the helpers (file scope); the body is decode_tiled_body.cuh, included inside the entry.

#include "gemm/ptx.cuh"
#include "gemm/scale_decoded.cuh"
#include "quant_rows.cuh"

#ifndef IN_QUANT
#error "decode.cu (tiled formats): -DIN_QUANT=<quant.cu mode of GEMM1's input: 0, 3, 4 or 5>"
#endif
#ifndef INTER_QUANT
#error "decode.cu (tiled formats): -DINTER_QUANT=<quant.cu mode of the intermediate: 0, 3, 4 or 5>"
#endif

using DtFmt = WeightFormat<WEIGHT_FORMAT>::type;
constexpr int DT_WB = DtFmt::W_ROW_BYTES;
constexpr int DT_SB = DtFmt::S_ROW_BYTES;
constexpr long long DT_TSTEP = 128ll * (DT_WB + DT_SB);  // one 128-row tile's K step

static_assert(IN_QUANT == 0 || IN_QUANT == 3 || IN_QUANT == 4 || IN_QUANT == 5, "IN_QUANT: 0, 3, 4 or 5");
static_assert(INTER_QUANT == 0 || INTER_QUANT == 3 || INTER_QUANT == 4 || INTER_QUANT == 5, "INTER_QUANT: 0, 3, 4 or 5");

// Byte offset of element k of a staged row: its 64-element step (128 bytes), then the thread slot t's 32 bytes
// holding the 16 elements of its fragments in decode order (a[q][h] = elements 16q + 2t + 8h, + 1).
__device__ __forceinline__ int dt_pos(int k) {
    const int kk = k & 63, q = kk >> 4, r = kk & 15;
    return (k >> 6) * 128 + ((r & 7) >> 1) * 32 + q * 8 + (r >> 3) * 4 + (r & 1) * 2;
}

__device__ __forceinline__ u32 dc_ldg_u16(const u8* p) {
    u16 v;
    asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ u32 dc_ldg_u32(const u8* p) {
    u32 v;
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

// Where dt_stage reads its rows: row r at base + r * stride elements of dtype (ARG_DTYPE_*). CG: f32 rows written
// earlier in this kernel by other CTAs, read through L2 (dc_ldcg).
struct DtRows {
    const void* base;
    long long stride;
    int dtype;
};

// n (<= 32: unrolled, every load in flight before any is used) elements of row r from column c0 on, `gap` apart,
// zero at columns >= cols
template <bool CG, int N>
__device__ __forceinline__ void dt_load(const DtRows& src, int r, int c0, int gap, int cols, float (&v)[N]) {
    const long long i0 = (long long)r * src.stride;
    if (CG || src.dtype == ARG_DTYPE_F32) {
        const float* p = (const float*)src.base + i0;
#pragma unroll
        for (int k = 0; k < N; ++k) {
            const int c = c0 + k * gap;
            v[k] = c < cols ? (CG ? dc_ldcg(p + c) : p[c]) : 0.0f;
        }
    } else {
        const u16* p = (const u16*)src.base + i0;
        u16 b[N];
#pragma unroll
        for (int k = 0; k < N; ++k) {
            const int c = c0 + k * gap;
            b[k] = c < cols ? p[c] : (u16)0;
        }
        const bool bf = src.dtype == ARG_DTYPE_BF16;
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] = bf ? bf16_to_f32(b[k]) : f16_to_f32(b[k]);
    }
}

// Rows [0, nrows) of src (cols columns, zero up to cols_p) quantized as quant.cu mode MODE into dst (row r at
// r * cols_p * 2 bytes, dt_pos order), each row's global into g[r] (modes 4, 5; otherwise 1). One thread per
// 32-column block; mode 5 first takes each row's amax, a warp a row.
template <int MODE, bool CG>
__device__ __forceinline__ void dt_stage(u8* dst, float* g, int nrows, int cols, int cols_p, float static_g, int warp,
                                         int lane, const DtRows& src) {
    if (MODE == 5) {
        for (int r = warp; r < nrows; r += DC_WARPS) {
            u32 a = 0;
            for (int c0 = lane; c0 < cols; c0 += 32 * 8) {
                float v[8];
                dt_load<CG>(src, r, c0, 32, cols, v);
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    const u32 b = __float_as_uint(v[k]) & 0x7fffffffu;
                    a = b > a ? b : a;
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const u32 b = __shfl_xor_sync(0xffffffffu, a, o);
                a = b > a ? b : a;
            }
            if (lane == 0) g[r] = div_rn(__uint_as_float(a), QT_NVFP4_GLOBAL_DIVISOR);
        }
        __syncthreads();
    } else {
        for (int r = threadIdx.x; r < nrows; r += DC_THREADS) g[r] = MODE == 4 ? static_g : 1.0f;
    }
    const int blocks = cols_p / 32;
    for (int b = threadIdx.x; b < nrows * blocks; b += DC_THREADS) {
        const int r = b / blocks, c0 = (b - r * blocks) * 32;
        float v[32];
        dt_load<CG>(src, r, c0, 1, cols, v);
        u16 o[32];
        if (MODE == 0) {
#pragma unroll
            for (int k = 0; k < 32; ++k) o[k] = f32_to_bf16(v[k]);
        } else if (MODE == 3) {
            const u32 a0 = amax_bits16(v), a1 = amax_bits16(v + 16);
            const float s = qt_mxfp8_scale(a0 > a1 ? a0 : a1);
#pragma unroll
            for (int k = 0; k < 32; ++k) o[k] = qt_mxfp8_as_bf16(v[k], s);
        } else {
            const float gr = MODE == 4 ? static_g : g[r];
            if (MODE == 5 && gr == 0.0f) {
#pragma unroll
                for (int k = 0; k < 32; ++k) o[k] = 0;
            } else {
                qt_nvfp4_block(v, gr, o);
                qt_nvfp4_block(v + 16, gr, o + 16);
            }
        }
        u8* row = dst + (long long)r * cols_p * 2;
#pragma unroll
        for (int k = 0; k < 32; k += 2) *(u32*)(row + dt_pos(c0 + k)) = (u32)o[k] | ((u32)o[k + 1] << 16);
    }
}

// A thread slot's element bytes of a row's step (Fmt::Chunk: 16 bytes for mxfp8, 8 for the 4-bit formats),
// streamed past L1
template <class C>
__device__ __forceinline__ C dt_ldg(const u8* p);
template <>
__device__ __forceinline__ uint4 dt_ldg<uint4>(const u8* p) {
    return dc_ldg_stream(p);
}
template <>
__device__ __forceinline__ uint2 dt_ldg<uint2>(const u8* p) {
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

// One unit: the 16-row group at row0 (within its 128-row tile, whose K steps start at `tile`) over K steps
// [s_lo, s_hi) against the staged row xrow; the group's 16 sums to part[0..16). On the tensor cores: lane (g, t)
// = (lane / 4, lane % 4) loads and decodes thread slot t of rows g and g + 8, which is exactly its A fragment of
// an m16n8k16 bf16 MMA per 16-element sub-step q ({row g, row g + 8} x {elements 16q + 2t, + 1; + 8, + 9}); the
// B fragment is the activation's words of slot t from shared memory (dt_pos order), the same for every column,
// so each of the 8 columns of D holds the group's sums (f32 accumulation of exact products, as the GEMM's).
template <class Fmt>
__device__ __forceinline__ void dt_group_dot(const u8* tile, int row0, int s_lo, int s_hi, const u8* xrow, int lane,
                                             float* part) {
    constexpr int WB = Fmt::W_ROW_BYTES, SB = Fmt::S_ROW_BYTES;
    constexpr int STEPS = WB == 64 ? 4 : 8;  // K steps a lane has in flight
    constexpr long long TSTEP = 128ll * (WB + SB);
    using Chunk = typename Fmt::Chunk;
    const int g = lane >> 2, t = lane & 3;
    const int eoff = (row0 + g) * WB + t * (WB / 4);  // row g's slot t; row g + 8's 8 rows on
    const int soff = 128 * WB + (row0 + g) * SB;      // row g's scale bytes; row g + 8's likewise
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int s0 = s_lo; s0 < s_hi; s0 += STEPS) {
        Chunk w[STEPS][2];
        u32 sb[STEPS][2];
#pragma unroll
        for (int u = 0; u < STEPS; ++u) {
            const u8* blk = tile + (long long)(s0 + u) * TSTEP;
            const bool in = s0 + u < s_hi;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                w[u][i] = in ? dt_ldg<Chunk>(blk + eoff + i * 8 * WB) : Chunk{};
                const u8* sp = blk + soff + i * 8 * SB;
                sb[u][i] = !in ? 0u : (SB == 2 ? dc_ldg_u16(sp) : dc_ldg_u32(sp));
            }
        }
#pragma unroll
        for (int u = 0; u < STEPS; ++u) {
            if (s0 + u >= s_hi) break;
            const uint4* xs = (const uint4*)(xrow + (s0 + u) * 128 + t * 32);
            const uint4 x0 = xs[0], x1 = xs[1];
            const u32 xw[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
            u32 ra[4][2], rb[4][2];
            Fmt::decode(w[u][0], sb[u][0], ra);
            Fmt::decode(w[u][1], sb[u][1], rb);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const u32 a[4] = {ra[q][0], rb[q][0], ra[q][1], rb[q][1]};
                mg_mma<Bf16>(c, a, xw[2 * q], xw[2 * q + 1]);
            }
        }
    }
    if (t == 0) {
        part[g] = c[0];
        part[8 + g] = c[2];
    }
}

// K slices a unit's item is split into: `want` (the warps per item), at least 1 and at most the nk steps
__device__ __forceinline__ int dt_slices(int nk, int want) { return want < 1 ? 1 : (want > nk ? nk : want); }

// The K steps [lo, hi) of slice `slice` of `slices` over nk steps
__device__ __forceinline__ void dt_slice(int nk, int slice, int slices, int& lo, int& hi) {
    lo = (int)((long long)nk * slice / slices);
    hi = (int)((long long)nk * (slice + 1) / slices);
}
