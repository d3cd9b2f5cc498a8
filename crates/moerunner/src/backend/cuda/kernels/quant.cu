// Activation rows into a GEMM's input format; mirrors crates/moerunner/src/formats/act_quant.rs bit for
// bit (bf16, fp8 per-tensor static, fp8_block 1x128 dynamic).
//
// ---------------------------------------------------------------------------------------------------
// quantize_rows(x, x_dtype, rows, cols, in_stride, out, out_stride, mode, static_scale, out_scales)
//   x        [rows, in_stride] elements of x_dtype (ARG_DTYPE_*), columns [0, cols) read
//   out      [rows, out_stride]: u16 (mode 0) or u8 (modes 1, 2); must be 16-byte aligned;
//            out_stride >= cols and a multiple of 128; columns [cols, out_stride) are written as 0
//   mode 0   bf16, round to nearest even                       (static_scale, out_scales unused)
//   mode 1   fp8 e4m3 per-tensor static: q = e4m3(x / s), s = *static_scale (device pointer)
//   mode 2   fp8 e4m3 1x128 dynamic: per row and 128-column block b,
//            s = max(amax, 1e-10) / 448, q = e4m3(x / s), out_scales[row*(out_stride/128) + b] = s
//            (padding columns count as zeros; a block wholly in the padding gets s = 1e-10/448)
//   e4m3 = round to nearest even, saturating to ±448 (common.cuh f32_to_e4m3).
//   One thread per 16 consecutive output columns (16-byte stores; 32 bytes in mode 0), 8 threads
//   per 128-column block in mode 2 (amax reduced with shuffles among those 8 lanes), grid-stride over
//   rows * out_stride / 16 items.
//   Launch: block 256 (any multiple of 32 up to 1024), grid = min(ceil(rows*out_stride/16 / 256),
//   32 * num_SMs); no shared memory.
//   Loads are 16-byte vectors when a lane's 16 inputs are in bounds and aligned, scalar otherwise.
//   Exactness: x / s is an IEEE division (not a multiply by 1/s), as the CPU; amax is the max of
//   |x| bit patterns, NaN-propagating like weight_quant::amax, and the floor is f32::max (a NaN amax
//   becomes 1e-10, as on the CPU).
// ---------------------------------------------------------------------------------------------------

__device__ __forceinline__ float qt_div(float a, float b) {
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

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
        w[k] = (u32)f32_to_e4m3(qt_div(v[4 * k], s)) | ((u32)f32_to_e4m3(qt_div(v[4 * k + 1], s)) << 8) |
               ((u32)f32_to_e4m3(qt_div(v[4 * k + 2], s)) << 16) |
               ((u32)f32_to_e4m3(qt_div(v[4 * k + 3], s)) << 24);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

extern "C" __global__ void quantize_rows(const void* x, int x_dtype, int rows, int cols, long long in_stride,
                                         void* out, int out_stride, int mode, const float* static_scale,
                                         float* out_scales) {
    pdl_wait();  // inputs come from the previous kernel (common.cuh)
    pdl_launch_dependents();
    const long long chunks = out_stride / 16;  // 16-column items per row (a multiple of 8)
    const long long total = (long long)rows * chunks;
    const float stat = mode == 1 ? *static_scale : 1.0f;
    const int lane = threadIdx.x & 31;
    const u32 group_mask = 0xffu << (lane & 24);
    for (long long it = (long long)blockIdx.x * blockDim.x + threadIdx.x; it < total;
         it += (long long)gridDim.x * blockDim.x) {
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
        } else {
            // amax as the max of |x| bit patterns: monotonic for non-negative floats, NaN wins.
            u32 a = 0;
#pragma unroll
            for (int k = 0; k < 16; ++k) {
                const u32 b = __float_as_uint(v[k]) & 0x7fffffffu;
                a = b > a ? b : a;
            }
#pragma unroll
            for (int o = 4; o > 0; o >>= 1) {
                const u32 b = __shfl_xor_sync(group_mask, a, o);
                a = b > a ? b : a;
            }
            const u32 floor_bits = __float_as_uint(1e-10f);
            // f32::max(amax, 1e-10): NaN -> 1e-10, else the larger
            const u32 m = a > 0x7f800000u ? floor_bits : (a > floor_bits ? a : floor_bits);
            const float s = qt_div(__uint_as_float(m), 448.0f);
            *(uint4*)((u8*)out + row * out_stride + c0) = qt_pack_e4m3(v, s);
            if ((ch & 7) == 0) out_scales[row * (out_stride / 128) + (ch >> 3)] = s;
        }
    }
}
