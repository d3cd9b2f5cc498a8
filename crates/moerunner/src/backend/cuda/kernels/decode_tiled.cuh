// The fused small-batch kernel's body for the tiled weight formats (mxfp8, mxfp4, nvfp4; WEIGHT_FORMAT >=
// WFMT_MXFP8), a piece of decode.cu: its entry, contract, helpers and launch are decode.cu's. The weights lie as
// weight preparation tiles them for the GEMM's register-sourced main loop (gemm/scale_decoded.cuh: per expert, per
// 128 prepared rows, per 64-element K step, the rows' element bytes then their scale bytes), so a single row's K
// step is only 32 or 64 bytes, scattered: the work is split by 16-row groups instead, whose step is one contiguous
// run (512 or 1024 element bytes, then 32 or 64 scale bytes) that a warp loads in 16-byte chunks:
//   mxfp8   lane l holds rows l/4 and 8 + l/4, thread slot t = l % 4 of both (16 bytes each)
//   e2m1    lane l holds row l/2, thread slots 2(l % 2) and 2(l % 2) + 1 (8 bytes each)
// and decodes them with the GEMM's own Fmt::decode to bf16 pairs, exact (E4M3 x 2^s, E2M1 x 2^s and E2M1 x E4M3
// are bf16 values), whose products with the bf16 activations are exact in f32; the sums are f32 FMAs. The
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

// Rows [0, nrows) of cols_p columns, value (r, c) = load(r, c) for c < cols and 0 beyond, quantized as quant.cu
// mode MODE into dst (row r at r * cols_p * 2 bytes, dt_pos order), each row's global into g[r] (modes 4, 5;
// otherwise 1). One thread per 32-column block; mode 5 first takes each row's amax, a warp a row.
template <int MODE, class Load>
__device__ __forceinline__ void dt_stage(u8* dst, float* g, int nrows, int cols, int cols_p, float static_g, int warp,
                                         int lane, Load load) {
    if (MODE == 5) {
        for (int r = warp; r < nrows; r += DC_WARPS) {
            u32 a = 0;
            for (int c = lane; c < cols; c += 32) {
                const u32 b = __float_as_uint(load(r, c)) & 0x7fffffffu;
                a = b > a ? b : a;
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
#pragma unroll
        for (int k = 0; k < 32; ++k) v[k] = c0 + k < cols ? load(r, c0 + k) : 0.0f;
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

// sum over the 16 elements of a thread slot: decoded weight pairs a against the staged activation words x (the
// same decode order), f32 FMAs of exact products
__device__ __forceinline__ float dt_dot16(const u32 (&a)[4][2], const uint4 (&x)[2], float acc) {
    const u32 xv[8] = {x[0].x, x[0].y, x[0].z, x[0].w, x[1].x, x[1].y, x[1].z, x[1].w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 w = a[q][h], xx = xv[2 * q + h];
            acc = fmaf(__uint_as_float(w << 16), __uint_as_float(xx << 16), acc);
            acc = fmaf(__uint_as_float(w & 0xFFFF0000u), __uint_as_float(xx & 0xFFFF0000u), acc);
        }
    }
    return acc;
}

// One unit: the 16-row group at row0 (within its 128-row tile, whose K steps start at `tile`) over K steps
// [s_lo, s_hi) against the staged row xrow; the warp's 16 partial sums to part[0..16). (A template, so that the
// branch of the other element width is discarded.)
template <class Fmt>
__device__ __forceinline__ void dt_group_dot(const u8* tile, int row0, int s_lo, int s_hi, const u8* xrow, int lane,
                                             float* part) {
    constexpr bool WIDE = Fmt::W_ROW_BYTES == 64;                    // mxfp8: two rows a lane
    constexpr int STEPS = WIDE ? 4 : 8;                              // K steps a lane has in flight
    constexpr long long TSTEP = 128ll * (Fmt::W_ROW_BYTES + Fmt::S_ROW_BYTES);
    float acc0 = 0.0f, acc1 = 0.0f;
    // this lane's chunk(s) and scale rows within a step
    const int ch = row0 * Fmt::W_ROW_BYTES + lane * 16;
    const int r0 = WIDE ? lane >> 2 : lane >> 1;
    const int sc0 = 128 * Fmt::W_ROW_BYTES + (row0 + r0) * Fmt::S_ROW_BYTES;
    const int xoff = WIDE ? (lane & 3) * 32 : (lane & 1) * 64;
    for (int s0 = s_lo; s0 < s_hi; s0 += STEPS) {
        uint4 w[STEPS][WIDE ? 2 : 1];
        u32 sb[STEPS][WIDE ? 2 : 1];
#pragma unroll
        for (int u = 0; u < STEPS; ++u) {
            const u8* blk = tile + (long long)(s0 + u) * TSTEP;
            const bool in = s0 + u < s_hi;
#pragma unroll
            for (int i = 0; i < (WIDE ? 2 : 1); ++i) {
                w[u][i] = in ? dc_ldg_stream(blk + ch + i * 512) : make_uint4(0, 0, 0, 0);
                const u8* sp = blk + sc0 + i * 8 * Fmt::S_ROW_BYTES;
                sb[u][i] = !in ? 0u : (Fmt::S_ROW_BYTES == 2 ? dc_ldg_u16(sp) : dc_ldg_u32(sp));
            }
        }
#pragma unroll
        for (int u = 0; u < STEPS; ++u) {
            if (s0 + u >= s_hi) break;
            const uint4* xs = (const uint4*)(xrow + (s0 + u) * 128 + xoff);
            u32 a[4][2];
            if constexpr (WIDE) {
                const uint4 x[2] = {xs[0], xs[1]};
                Fmt::decode(w[u][0], sb[u][0], a);
                acc0 = dt_dot16(a, x, acc0);
                Fmt::decode(w[u][1], sb[u][1], a);
                acc1 = dt_dot16(a, x, acc1);
            } else {
                const uint4 x0[2] = {xs[0], xs[1]}, x1[2] = {xs[2], xs[3]};
                Fmt::decode(make_uint2(w[u][0].x, w[u][0].y), sb[u][0], a);
                acc0 = dt_dot16(a, x0, acc0);
                Fmt::decode(make_uint2(w[u][0].z, w[u][0].w), sb[u][0], a);
                acc0 = dt_dot16(a, x1, acc0);
            }
        }
    }
    if constexpr (WIDE) {
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            acc0 += __shfl_xor_sync(0xffffffffu, acc0, o);
            acc1 += __shfl_xor_sync(0xffffffffu, acc1, o);
        }
        if ((lane & 3) == 0) {
            part[r0] = acc0;
            part[8 + r0] = acc1;
        }
    } else {
        acc0 += __shfl_xor_sync(0xffffffffu, acc0, 1);
        if ((lane & 1) == 0) part[r0] = acc0;
    }
}

// K slices a unit's item is split into: `want` (the warps per item), at least 1 and at most the nk steps
__device__ __forceinline__ int dt_slices(int nk, int want) { return want < 1 ? 1 : (want > nk ? nk : want); }

// The K steps [lo, hi) of slice `slice` of `slices` over nk steps
__device__ __forceinline__ void dt_slice(int nk, int slice, int slices, int& lo, int& hi) {
    lo = (int)((long long)nk * slice / slices);
    hi = (int)((long long)nk * (slice + 1) / slices);
}
