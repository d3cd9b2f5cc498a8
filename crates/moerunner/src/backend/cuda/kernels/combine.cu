// Deterministic combine of the k expert outputs of each token (spec/layer.md, combine step); mirrors
// the CPU backend's phase D: acc = +0; for j in slot order, if the slot is local, acc += w * z
// (a multiply rounded to f32, then an add rounded to f32: never fused), stored with store_from_f32.
//
// ---------------------------------------------------------------------------------------------------
// combine_rows(z, z_stride, pair_pos, topk_w, T, K, H, out, out_dtype)
//   z        [P_sorted, z_stride] f32, row p = GEMM2 output of sorted pair p
//   pair_pos [T*K]: sorted position of slot (t, j), or < 0 when the slot is not local (skipped)
//   topk_w   [T*K] f32, or nullptr for weight 1 (Llama-4: the weight went into GEMM1's input)
//   out      [T, H] of out_dtype (DTYPE_*), row stride H; a token with no local slot gets zeros
//   One thread per (token, 4 consecutive h) (float4 loads; 16-/8-byte stores) when H % 4 == 0,
//   z_stride % 4 == 0, z is 16-byte aligned and out is 16- (f32) or 8-byte (bf16/f16) aligned;
//   otherwise one thread per (token, h). Grid-stride over T * ceil(H / vec) items.
//   Launch: block 256 (any multiple of 32), grid = min(ceil(T * ceil(H/4) / 256), 32 * num_SMs);
//   no shared memory.  Limits: T*K and P_sorted*z_stride < 2^63; K >= 0.
// ---------------------------------------------------------------------------------------------------

__device__ __forceinline__ float cb_fma_free(float acc, float w, float v) {
    float p, r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(p) : "f"(w), "f"(v));
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(acc), "f"(p));
    return r;
}

extern "C" __global__ void combine_rows(const float* z, int z_stride, const int* pair_pos, const float* topk_w,
                                        int T, int K, int H, void* out, int out_dtype) {
    pdl_wait();  // inputs come from the previous kernel (common.cuh)
    pdl_launch_dependents();
    const unsigned long long out_align = out_dtype == DTYPE_F32 ? 15ull : 7ull;
    const bool vec = (H % 4 == 0) && (z_stride % 4 == 0) && (((unsigned long long)z & 15ull) == 0) &&
                     (((unsigned long long)out & out_align) == 0);
    const int width = vec ? 4 : 1;
    const long long per_row = (H + width - 1) / width;
    const long long total = (long long)T * per_row;
    for (long long it = (long long)blockIdx.x * blockDim.x + threadIdx.x; it < total;
         it += (long long)gridDim.x * blockDim.x) {
        const long long t = it / per_row;
        const int h0 = (int)(it - t * per_row) * width;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        for (int j = 0; j < K; ++j) {
            const long long slot = t * K + j;
            const int pos = pair_pos[slot];
            if (pos < 0) continue;
            const float w = topk_w != nullptr ? topk_w[slot] : 1.0f;
            const float* zr = z + (long long)pos * z_stride + h0;
            if (vec) {
                const float4 v = *(const float4*)zr;
                a0 = cb_fma_free(a0, w, v.x);
                a1 = cb_fma_free(a1, w, v.y);
                a2 = cb_fma_free(a2, w, v.z);
                a3 = cb_fma_free(a3, w, v.w);
            } else {
                a0 = cb_fma_free(a0, w, zr[0]);
            }
        }
        const long long o = t * H + h0;
        if (vec) {
            if (out_dtype == DTYPE_F32) {
                *(float4*)((float*)out + o) = make_float4(a0, a1, a2, a3);
            } else {
                const bool bf = out_dtype == DTYPE_BF16;
                const u32 lo = (u32)(bf ? f32_to_bf16(a0) : f32_to_f16(a0)) |
                               ((u32)(bf ? f32_to_bf16(a1) : f32_to_f16(a1)) << 16);
                const u32 hi = (u32)(bf ? f32_to_bf16(a2) : f32_to_f16(a2)) |
                               ((u32)(bf ? f32_to_bf16(a3) : f32_to_f16(a3)) << 16);
                *(uint2*)((u16*)out + o) = make_uint2(lo, hi);
            }
        } else {
            store_from_f32(out, out_dtype, o, a0);
        }
    }
}
