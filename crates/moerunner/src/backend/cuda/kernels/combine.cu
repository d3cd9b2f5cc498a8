// Deterministic combine of the k expert outputs of each token (spec/layer.md, combine step); mirrors
// the CPU backend's phase D: acc = +0; for j in slot order, if the slot is local, acc += w * z
// (a multiply rounded to f32, then an add rounded to f32: never fused), stored with store_from_f32.
//
// ---------------------------------------------------------------------------------------------------
// combine_rows(z, z_dtype, z_stride, pair_pos, topk_w, T, K, H, out, out_dtype)
//   z        [P_sorted, z_stride] of z_dtype (ARG_DTYPE_F32, or ARG_DTYPE_BF16 when GEMM2 rounds its rows to
//            bf16 to halve their traffic), row p = GEMM2 output of sorted pair p
//   pair_pos [T*K]: sorted position of slot (t, j), or < 0 when the slot is not local (skipped)
//   topk_w   [T*K] f32, or nullptr for weight 1 (Llama-4: the weight went into GEMM1's input)
//   out      [T, H] of out_dtype (ARG_DTYPE_*), row stride H; a token with no local slot gets zeros
//   One thread per (token, 4 consecutive h) (float4 / 4×bf16 loads; 16-/8-byte stores) when H % 4 == 0,
//   z_stride % 4 == 0, z is 16-byte aligned and out is 16- (f32) or 8-byte (bf16/f16) aligned;
//   otherwise one thread per (token, h). Grid-stride over T * ceil(H / vec) items.
//   Slots are taken CB_CHUNK (8) at a time: the chunk's pair_pos and weights are loaded together, then
//   all of its z rows, then accumulated in slot order (two dependent loads per chunk, not per slot).
//   Launch: block B = 128 when T * ceil(H/4) <= 128 * num_SMs (small T: more blocks, more SMs), else
//   256 (any multiple of 32 works); grid = min(ceil(T * ceil(H/4) / B), 32 * num_SMs); no shared
//   memory.  Limits: T*K and P_sorted*z_stride < 2^63; K >= 0.
// ---------------------------------------------------------------------------------------------------

#define CB_CHUNK 8

// What a skipped slot's load reads instead of z (always valid memory, so the loads need no branch).
__device__ const float4 cb_zero4 = {0.0f, 0.0f, 0.0f, 0.0f};

__device__ __forceinline__ float cb_fma_free(float acc, float w, float v) {
    float p, r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(p) : "f"(w), "f"(v));
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(acc), "f"(p));
    return r;
}

// Four consecutive z values of row `pos` (a zero vector for a skipped slot), as f32.
__device__ __forceinline__ float4 cb_load4(const void* z, bool zbf, int z_stride, int pos, int h0) {
    if (pos < 0) return cb_zero4;
    const long long i = (long long)pos * z_stride + h0;
    if (!zbf) return *(const float4*)((const float*)z + i);
    const uint2 r = *(const uint2*)((const u16*)z + i);
    return make_float4(__uint_as_float(r.x << 16), __uint_as_float(r.x & 0xFFFF0000u),
                       __uint_as_float(r.y << 16), __uint_as_float(r.y & 0xFFFF0000u));
}

extern "C" __global__ void combine_rows(const void* z, int z_dtype, int z_stride, const int* pair_pos,
                                        const float* topk_w, int T, int K, int H, void* out, int out_dtype) {
    pdl_wait();  // inputs come from the previous kernel (common.cuh)
    pdl_launch_dependents();
    const bool zbf = z_dtype == ARG_DTYPE_BF16;
    const unsigned long long out_align = out_dtype == ARG_DTYPE_F32 ? 15ull : 7ull;
    const bool vec = (H % 4 == 0) && (z_stride % 4 == 0) && (((unsigned long long)z & 15ull) == 0) &&
                     (((unsigned long long)out & out_align) == 0);
    const int width = vec ? 4 : 1;
    const long long per_row = (H + width - 1) / width;
    const long long total = (long long)T * per_row;
    const bool small = total < 0x7fffffffll;  // 32-bit index arithmetic (no 64-bit division)
    for (long long it = (long long)blockIdx.x * blockDim.x + threadIdx.x; it < total;
         it += (long long)gridDim.x * blockDim.x) {
        long long t;
        int h0;
        if (small) {
            const u32 q = (u32)it / (u32)per_row;
            t = q;
            h0 = (int)((u32)it - q * (u32)per_row) * width;
        } else {
            t = it / per_row;
            h0 = (int)(it - t * per_row) * width;
        }
        const long long slot0 = t * K;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        for (int j0 = 0; j0 < K; j0 += CB_CHUNK) {
            int pos[CB_CHUNK];
            float w[CB_CHUNK];
#pragma unroll
            for (int u = 0; u < CB_CHUNK; ++u) {
                const bool in = j0 + u < K;
                pos[u] = in ? pair_pos[slot0 + j0 + u] : -1;
                w[u] = (in && topk_w != nullptr) ? topk_w[slot0 + j0 + u] : 1.0f;
            }
            if (vec) {
                float4 v[CB_CHUNK];
#pragma unroll
                for (int u = 0; u < CB_CHUNK; ++u) v[u] = cb_load4(z, zbf, z_stride, pos[u], h0);
#pragma unroll
                for (int u = 0; u < CB_CHUNK; ++u) {
                    if (pos[u] >= 0) {
                        a0 = cb_fma_free(a0, w[u], v[u].x);
                        a1 = cb_fma_free(a1, w[u], v[u].y);
                        a2 = cb_fma_free(a2, w[u], v[u].z);
                        a3 = cb_fma_free(a3, w[u], v[u].w);
                    }
                }
            } else {
                float v[CB_CHUNK];
#pragma unroll
                for (int u = 0; u < CB_CHUNK; ++u)
                    v[u] = pos[u] < 0 ? 0.0f : load_as_f32(z, z_dtype, (long long)pos[u] * z_stride + h0);
#pragma unroll
                for (int u = 0; u < CB_CHUNK; ++u)
                    if (pos[u] >= 0) a0 = cb_fma_free(a0, w[u], v[u]);
            }
        }
        const long long o = t * H + h0;
        if (vec) {
            if (out_dtype == ARG_DTYPE_F32) {
                *(float4*)((float*)out + o) = make_float4(a0, a1, a2, a3);
            } else {
                const bool bf = out_dtype == ARG_DTYPE_BF16;
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
