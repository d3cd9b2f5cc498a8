// Activation rows into a GEMM's input format; mirrors crates/moerunner/src/formats/act_quant.rs bit for
// bit (bf16, fp8 per-tensor static, fp8_block 1x128 dynamic, mxfp8 1x32, nvfp4 1x16 static or per token).
//
// ---------------------------------------------------------------------------------------------------
// quantize_rows(x, x_dtype, rows, cols, in_stride, out, out_stride, mode, static_scale, out_scales)
//   x        [rows, in_stride] elements of x_dtype (ARG_DTYPE_*), columns [0, cols) read
//   out      [rows, out_stride]: u16 (modes 0, 3, 4, 5) or u8 (modes 1, 2, 6); must be 16-byte aligned;
//            out_stride >= cols and a multiple of 128; columns [cols, out_stride) are written as 0
//   mode 0   bf16, round to nearest even                       (static_scale, out_scales unused)
//   mode 1   fp8 e4m3 per-tensor static: q = e4m3(x / s), s = *static_scale (device pointer)
//   mode 2   fp8 e4m3 1x128 dynamic: per row and 128-column block b,
//            s = max(amax, 1e-10) / 448, q = e4m3(x / s), out_scales[row*(out_stride/128) + b] = s
//            (padding columns count as zeros; a block wholly in the padding gets s = 1e-10/448)
//   mode 3   mxfp8 1x32 dynamic, stored as the bf16 of each element's value: per 32-column block,
//            s = ceil-pow2(amax / 448) (UE8M0; amax = 0 or NaN -> 2^-127), out = bf16(e4m3(x / s) * s)
//            (exact short of bf16's subnormals: an E4M3 value times 2^s is a bf16 value)
//   mode 4   nvfp4 1x16 with the static global g = *static_scale: per 16-column block
//            b = e4m3(amax / 6 / g), s = dec(b) * g, code = e2m1(x / s) (0 when s = 0),
//            out = bf16(e2m1(code) * dec(b)) (exact), out_scales[row] = g: the global is left to the GEMM's
//            epilogue, which multiplies each row's sum by it
//   mode 5   nvfp4 per token: as mode 4 with g = amax_row / (448 * 6) for each row (a zero row: g = 0,
//            zeros); one block per row (any block size up to 1024), out_scales[row] = g
//   mode 6   mxfp8 for the fp8 block-scale GEMM: mode 3's per-32 scale s and e4m3 element, re-expressed against
//            the largest s of its 128-column block, S: out = e4m3(e4m3(x / s) * (s / S)) (u8),
//            out_scales[row*(out_stride/128) + b] = S (prepare.rs `reexpress_e4m3`: exact above E4M3's
//            subnormals)
//   e4m3 = round to nearest even, saturating to ±448 (common.cuh f32_to_e4m3); e2m1 = round to nearest
//   even, saturating to ±6 (e2m1_code).
//   One thread per 16 consecutive output columns (16-byte stores; 32 bytes in mode 0), 8 threads
//   per 128-column block in modes 2 and 6 (amax reduced with shuffles among those 8 lanes), grid-stride over
//   rows * out_stride / 16 items.
//   Launch: block 256 (any multiple of 32 up to 1024), grid = min(ceil(rows*out_stride/16 / 256),
//   32 * num_SMs); no shared memory.
//   Loads are 16-byte vectors when a lane's 16 inputs are in bounds and aligned, scalar otherwise.
//   Exactness: x / s is an IEEE division (not a multiply by 1/s), as the CPU; amax is the max of
//   |x| bit patterns, NaN-propagating like weight_quant::amax, and the floor is f32::max (a NaN amax
//   becomes 1e-10, as on the CPU).
// ---------------------------------------------------------------------------------------------------

#include "quant_rows.cuh"

// v[0..16) = x[base + c0 .. base + c0 + 16), zero at columns >= cols.
__device__ __forceinline__ void qt_load16(const void* x, int dtype, long long base, int c0, int cols, float* v) {
    if (c0 + 16 <= cols) {
        if (dtype == ARG_DTYPE_F32) {
            const float* p = (const float*)x + base + c0;
            if (((unsigned long long)p & 15ull) == 0) {
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const float4 f = ((const float4*)p)[q];
                    v[4 * q] = f.x;
                    v[4 * q + 1] = f.y;
                    v[4 * q + 2] = f.z;
                    v[4 * q + 3] = f.w;
                }
                return;
            }
        } else {
            const u16* p = (const u16*)x + base + c0;
            if (((unsigned long long)p & 15ull) == 0) {
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    const uint4 w = ((const uint4*)p)[q];
                    const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        const u16 lo = (u16)(words[k] & 0xffffu), hi = (u16)(words[k] >> 16);
                        v[8 * q + 2 * k] = dtype == ARG_DTYPE_BF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
                        v[8 * q + 2 * k + 1] = dtype == ARG_DTYPE_BF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
                    }
                }
                return;
            }
        }
#pragma unroll
        for (int k = 0; k < 16; ++k) v[k] = load_as_f32(x, dtype, base + c0 + k);
        return;
    }
#pragma unroll
    for (int k = 0; k < 16; ++k) v[k] = (c0 + k < cols) ? load_as_f32(x, dtype, base + c0 + k) : 0.0f;
}

__device__ __forceinline__ uint4 qt_pack_e4m3(const float* v, float s) {
    u32 w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        w[k] = (u32)f32_to_e4m3(div_rn(v[4 * k], s)) | ((u32)f32_to_e4m3(div_rn(v[4 * k + 1], s)) << 8) |
               ((u32)f32_to_e4m3(div_rn(v[4 * k + 2], s)) << 16) | ((u32)f32_to_e4m3(div_rn(v[4 * k + 3], s)) << 24);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ void qt_store16_bf16(void* out, long long idx, const u16* o) {
    u32 w[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) w[k] = (u32)o[2 * k] | ((u32)o[2 * k + 1] << 16);
    uint4* p = (uint4*)((u16*)out + idx);
    p[0] = make_uint4(w[0], w[1], w[2], w[3]);
    p[1] = make_uint4(w[4], w[5], w[6], w[7]);
}

// quantize_rows' body for the calling block as block `block` of `blocks` (the grid-stride loops run over
// those): quantize_rows (every block of its grid) and front.cu (blocks 1.. of its grid). Every thread of
// such a block must call it (mode 5 meets at block barriers).
__device__ __forceinline__ void qt_quantize_rows(const void* x, int x_dtype, int rows, int cols, long long in_stride,
                                                 void* out, int out_stride, int mode, const float* static_scale,
                                                 float* out_scales, long long block, long long blocks) {
    const long long chunks = out_stride / 16;  // 16-column items per row (a multiple of 8)
    const long long total = (long long)rows * chunks;
    const float stat = (mode == 1 || mode == 4) ? *static_scale : 1.0f;
    const int lane = threadIdx.x & 31;
    if (mode == 5) {
        // one block per row (the row's amax is a block reduction; a warp per row was latency-bound at
        // decode sizes): the amax, then the row's 16-column blocks with g = amax / 2688
        __shared__ u32 s_amax[32];
        for (long long row = block; row < rows; row += blocks) {
            u32 a = 0;
            for (int ch = threadIdx.x; ch < chunks; ch += blockDim.x) {
                float v[16];
                qt_load16(x, x_dtype, row * in_stride, ch * 16, cols, v);
                const u32 b = amax_bits16(v);
                a = b > a ? b : a;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const u32 b = __shfl_xor_sync(0xffffffffu, a, o);
                a = b > a ? b : a;
            }
            if (lane == 0) s_amax[threadIdx.x >> 5] = a;
            __syncthreads();
            a = 0;
            for (int w = 0; w < (int)(blockDim.x >> 5); ++w) a = s_amax[w] > a ? s_amax[w] : a;
            __syncthreads();  // (s_amax is rewritten for the next row)
            const float g = div_rn(__uint_as_float(a), QT_NVFP4_GLOBAL_DIVISOR);
            for (int ch = threadIdx.x; ch < chunks; ch += blockDim.x) {
                float v[16];
                qt_load16(x, x_dtype, row * in_stride, ch * 16, cols, v);
                u16 o[16];
                if (g == 0.0f) {
#pragma unroll
                    for (int k = 0; k < 16; ++k) o[k] = 0;
                } else {
                    qt_nvfp4_block(v, g, o);
                }
                qt_store16_bf16(out, row * out_stride + ch * 16, o);
            }
            if (threadIdx.x == 0) out_scales[row] = g;
        }
        return;
    }
    const u32 group_mask = 0xffu << (lane & 24);
    for (long long it = block * blockDim.x + threadIdx.x; it < total; it += blocks * blockDim.x) {
        const long long row = it / chunks;
        const int ch = (int)(it - row * chunks);
        const int c0 = ch * 16;
        float v[16];
        qt_load16(x, x_dtype, row * in_stride, c0, cols, v);
        if (mode == 0) {
            u32 w[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) w[k] = (u32)f32_to_bf16(v[2 * k]) | ((u32)f32_to_bf16(v[2 * k + 1]) << 16);
            uint4* o = (uint4*)((u16*)out + row * out_stride + c0);
            o[0] = make_uint4(w[0], w[1], w[2], w[3]);
            o[1] = make_uint4(w[4], w[5], w[6], w[7]);
        } else if (mode == 1) {
            *(uint4*)((u8*)out + row * out_stride + c0) = qt_pack_e4m3(v, stat);
        } else if (mode == 3) {
            // the 32-column block's amax from this lane and its neighbour (lanes 2i, 2i+1: columns 32i..32i+31)
            u32 a = amax_bits16(v);
            const u32 b = __shfl_xor_sync(0x3u << (lane & 30), a, 1);
            a = b > a ? b : a;
            const float s = qt_mxfp8_scale(a);
            u16 o[16];
#pragma unroll
            for (int k = 0; k < 16; ++k) o[k] = qt_mxfp8_as_bf16(v[k], s);
            qt_store16_bf16(out, row * out_stride + c0, o);
        } else if (mode == 6) {
            // mode 3's 32-column block scale s (lanes 2i, 2i+1), then the 128-column block's largest S
            // (the 8 lanes of the block): elements e4m3(e4m3(x / s) * (s / S)), the block's scale S
            u32 a = amax_bits16(v);
            const u32 b = __shfl_xor_sync(0x3u << (lane & 30), a, 1);
            a = b > a ? b : a;
            const float s = qt_mxfp8_scale(a);
            u32 top = __float_as_uint(s);  // powers of two: bit patterns order as values
#pragma unroll
            for (int o = 2; o < 8; o <<= 1) {
                const u32 t = __shfl_xor_sync(group_mask, top, o);
                top = t > top ? t : top;
            }
            const float S = __uint_as_float(top);
            const float ratio = div_rn(s, S);
            u32 w[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                u32 word = 0;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const u8 q = f32_to_e4m3(div_rn(v[4 * k + j], s));
                    const u8 r = ratio == 1.0f ? q : f32_to_e4m3(e4m3_to_f32(q) * ratio);
                    word |= (u32)r << (8 * j);
                }
                w[k] = word;
            }
            *(uint4*)((u8*)out + row * out_stride + c0) = make_uint4(w[0], w[1], w[2], w[3]);
            if ((ch & 7) == 0) out_scales[row * (out_stride / 128) + (ch >> 3)] = S;
        } else if (mode == 4) {
            u16 o[16];
            qt_nvfp4_block(v, stat, o);
            qt_store16_bf16(out, row * out_stride + c0, o);
            if (ch == 0) out_scales[row] = stat;
        } else {
            // the 128-column block's amax over its 8 lanes
            u32 a = amax_bits16(v);
#pragma unroll
            for (int o = 4; o > 0; o >>= 1) {
                const u32 b = __shfl_xor_sync(group_mask, a, o);
                a = b > a ? b : a;
            }
            const float s = e4m3_block128_scale(a);
            *(uint4*)((u8*)out + row * out_stride + c0) = qt_pack_e4m3(v, s);
            if ((ch & 7) == 0) out_scales[row * (out_stride / 128) + (ch >> 3)] = s;
        }
    }
}

extern "C" __global__ void quantize_rows(const void* x, int x_dtype, int rows, int cols, long long in_stride,
                                         void* out, int out_stride, int mode, const float* static_scale,
                                         float* out_scales) {
    pdl_wait();  // inputs come from the previous kernel (common.cuh)
    pdl_launch_dependents();
    qt_quantize_rows(x, x_dtype, rows, cols, in_stride, out, out_stride, mode, static_scale, out_scales,
                     blockIdx.x, gridDim.x);
}
