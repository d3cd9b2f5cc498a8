// Routing kernels (spec/routing.md). Mirrors crates/moerunner/src/routing/{methods.rs,topk.rs} bit for
// bit: same f32 operations in the same order, ties to the lower id (experts and DeepSeek groups).
//
// ---------------------------------------------------------------------------------------------------
// route_logits(logits, logits_dtype, bias, T, E, K, method, n_group, topk_group,
//              routed_scaling_factor, norm_topk_prob, topk_ids, topk_w)
//   logits   [T, E] ARG_DTYPE_F32 or ARG_DTYPE_BF16 (any dtype load_as_f32 knows works)
//   bias     [E] f32 or nullptr; read only by deepseek_v3 (3) and minimax2 (7), as the CPU does
//   method   0 default, 1 renormalize, 2 renormalize_naive, 3 deepseek_v3, 4 llama4, 5 topk,
//            6 sigmoid_renorm, 7 minimax2, 8 sigmoid, 9 topk_sigmoid
//   n_group, topk_group: deepseek_v3 only (groups when n_group > 1); norm_topk_prob: method 6 only
//   topk_ids [T, K] int, topk_w [T, K] f32: slots in decreasing selection key, ties lower id first.
//   One WARP per token (grid-stride over tokens), no block-wide barrier.
//   block  = 32 * W threads, W = warps per block in [1, 32]
//   dyn smem = W * warp_bytes,  warp_bytes = (12*E + 8*K + 15) & ~15
//            (per warp: u64 keys[E] | f32 scratch[E] | int sel_id[K] | f32 sel_key[K])
//   suggested W = clamp(49152 / warp_bytes, 1, 8) (stays under the 48 KiB default; E <= 512, K <= 32
//            gives W = 7..8), grid = min(ceil(T / W), 32 * num_SMs) (any grid >= 1 is correct).
//   limits  1 <= K <= E; warp_bytes <= 48 KiB without opting in (E up to ~4000), more with
//           cudaFuncAttributeMaxDynamicSharedMemorySize; deepseek_v3: E % n_group == 0 (as validated
//           on the host). Logits and bias must be finite (checked on the host, as on the CPU).
//   Register path (K <= 32 and E <= 512, i.e. every preset): lane l holds ids v*32 + l, v < NPL =
//   ceil(E/32) rounded up to 1/2/4/8/16, as order images of their keys in registers; all E/32 loads
//   of a lane are issued together; each of the K argmax rounds is two redux.sync (max key image, then
//   the lowest id holding it) and a rescan of NPL registers by the winner's lane only; exps only
//   where a method needs them (renormalize: the K selected ones); the renormalizing sum in slot
//   order over K lanes by shuffles. Shared memory only for the softmax sum (methods 0/2) and
//   DeepSeek's group scores (inside the same per-warp region). Otherwise (K > 32 or E > 512) the
//   shared-memory path: per warp u64 keys[E] and K warp argmax rounds of 5 u64 shuffles each.
//   Cost per token: E loads (+E exps for softmax/sigmoid keys), one sequential f32 sum over E
//   (softmax methods only: the CPU sums in id order and the selection of `default` /
//   `renormalize_naive` depends on that sum's exact bits), K argmax rounds.
//
// unpack_routes(packed, n, ids, w)
//   FlashInfer's packed routes: ids[i] = packed[i] >> 16 (arithmetic), w[i] = bf16 bits of the low
//   half as f32. Element-wise, grid-stride: block 256, grid = min(ceil(n / 256), 1024). Padding ids
//   (-1) keep the weight bits they carry (0xFFFF is a NaN): consumers must skip non-local slots
//   (combine does, through pair_pos = -1).
// ---------------------------------------------------------------------------------------------------
//
// Exactness notes.
// * exp is a port of glibc's expf (sysdeps/ieee754/flt-32/e_expf.c, the x86-64 FMA variant that
//   glibc's ifunc picks on any AVX2/FMA CPU, which is what Rust's f32::exp calls on Linux). Checked
//   bit-identical to libm's expf for all 2^32 inputs. CUDA's own expf is up to 2 ulp off and would
//   change softmax sums and near-tie selections.
// * All f32 arithmetic goes through explicit `.rn` PTX (no contraction into FMA, no flush to zero,
//   whatever the compile flags); comparisons run on order-preserving integer images of the keys
//   (-0 and +0 compare equal, like the CPU's float comparisons).

// ---- exact scalar helpers -------------------------------------------------------------------------
__device__ __forceinline__ float rt_add(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float rt_sub(float a, float b) {
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float rt_mul(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float rt_div(float a, float b) {
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ double rt_fma64(double a, double b, double c) {
    double r;
    asm("fma.rn.f64 %0, %1, %2, %3;" : "=d"(r) : "d"(a), "d"(b), "d"(c));
    return r;
}
__device__ __forceinline__ double rt_mul64(double a, double b) {
    double r;
    asm("mul.rn.f64 %0, %1, %2;" : "=d"(r) : "d"(a), "d"(b));
    return r;
}
__device__ __forceinline__ double rt_sub64(double a, double b) {
    double r;
    asm("sub.rn.f64 %0, %1, %2;" : "=d"(r) : "d"(a), "d"(b));
    return r;
}

// 2^(i/32) table of glibc's __exp2f_data (tab[i] = bits(2^(i/32)) - (i << 47)).
__device__ const u64 rt_exp2f_tab[32] = {
    0x3ff0000000000000ull, 0x3fefd9b0d3158574ull, 0x3fefb5586cf9890full, 0x3fef9301d0125b51ull,
    0x3fef72b83c7d517bull, 0x3fef54873168b9aaull, 0x3fef387a6e756238ull, 0x3fef1e9df51fdee1ull,
    0x3fef06fe0a31b715ull, 0x3feef1a7373aa9cbull, 0x3feedea64c123422ull, 0x3feece086061892dull,
    0x3feebfdad5362a27ull, 0x3feeb42b569d4f82ull, 0x3feeab07dd485429ull, 0x3feea47eb03a5585ull,
    0x3feea09e667f3bcdull, 0x3fee9f75e8ec5f74ull, 0x3feea11473eb0187ull, 0x3feea589994cce13ull,
    0x3feeace5422aa0dbull, 0x3feeb737b0cdc5e5ull, 0x3feec49182a3f090ull, 0x3feed503b23e255dull,
    0x3feee89f995ad3adull, 0x3feeff76f2fb5e47ull, 0x3fef199bdd85529cull, 0x3fef3720dcef9069ull,
    0x3fef5818dcfba487ull, 0x3fef7c97337b9b5full, 0x3fefa4afa2a490daull, 0x3fefd0765b6e4540ull,
};

// e^x in f32, bit-identical to glibc expf (FMA variant).
__device__ __forceinline__ float rt_expf(float x) {
    const u32 ux = __float_as_uint(x);
    const u32 abstop = (ux >> 20) & 0x7ff;
    if (abstop >= 0x42bu) {                          // |x| >= 88 or not finite
        if (ux == 0xff800000u) return 0.0f;           // -inf
        if (abstop >= 0x7f8u) return rt_add(x, x);    // +inf or NaN
        if (x > 0x1.62e42ep6f) return __uint_as_float(0x7f800000u);  // overflow
        if (x < -0x1.9fe368p6f) return 0.0f;          // underflow
    }
    const double inv_ln2_n = 0x1.71547652b82fep+0 * 32.0;
    const double shift = 0x1.8p+52;
    const double c0 = 0x1.c6af84b912394p-5 / 32.0 / 32.0 / 32.0;
    const double c1 = 0x1.ebfce50fac4f3p-3 / 32.0 / 32.0;
    const double c2 = 0x1.62e42ff0c52d6p-1 / 32.0;
    double xd;
    asm("cvt.f64.f32 %0, %1;" : "=d"(xd) : "f"(x));
    double kd = rt_fma64(inv_ln2_n, xd, shift);
    const u64 ki = (u64)__double_as_longlong(kd);
    kd = rt_sub64(kd, shift);
    const double r = rt_fma64(inv_ln2_n, xd, -kd);
    u64 t = rt_exp2f_tab[ki & 31];
    t += ki << 47;
    const double s = __longlong_as_double((long long)t);
    const double z = rt_fma64(c0, r, c1);
    const double r2 = rt_mul64(r, r);
    double y = rt_fma64(c2, r, 1.0);
    y = rt_fma64(z, r2, y);
    y = rt_mul64(y, s);
    float f;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(f) : "d"(y));
    return f;
}

// σ(x) = 1 / (1 + e^−x), as methods.rs::sigmoid.
__device__ __forceinline__ float rt_sigmoid(float x) {
    return rt_div(1.0f, rt_add(1.0f, rt_expf(-x)));
}

// Order-preserving image of a non-NaN float as u32 (-0 mapped to +0 so they compare equal).
__device__ __forceinline__ u32 rt_ord(float f) {
    u32 u = __float_as_uint(f);
    if (u == 0x80000000u) u = 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float rt_unord(u32 o) {
    return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}
// Selection composite: larger is better = larger key, then lower id. 0 marks "taken".
__device__ __forceinline__ u64 rt_comp(float key, int id) {
    return ((u64)rt_ord(key) << 32) | (u64)(0xffffffffu - (u32)id);
}
__device__ __forceinline__ int rt_comp_id(u64 c) { return (int)(0xffffffffu - (u32)(c & 0xffffffffull)); }

__device__ __forceinline__ u64 rt_warp_max_u64(u64 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const u64 w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}
__device__ __forceinline__ u32 rt_warp_max_u32(u32 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const u32 w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

__device__ __forceinline__ u32 rt_redux_max(u32 v) {
    u32 r;
    asm volatile("redux.sync.max.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(v));
    return r;
}
__device__ __forceinline__ u32 rt_redux_min(u32 v) {
    u32 r;
    asm volatile("redux.sync.min.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(v));
    return r;
}

// Register path (E <= 32*NPL, K <= 32): lane l holds ids v*32 + l (v < NPL) as the order-preserving
// images of their keys (0 = taken or no such id). Same arithmetic and tie rules as the shared-memory
// path below; shared memory only for the softmax sum (id order) and DeepSeek's group scores.
// DeepSeek-V3 group score: the sum of the two largest order keys of group g (`key(i)` for its
// `size` members; one key alone when size < 2), as rounded f32.
template <class Key>
__device__ __forceinline__ float rt_group_score(Key key, int g, int size) {
    const u32 neg_inf = rt_ord(__uint_as_float(0xff800000u));
    u32 first = neg_inf, second = neg_inf;
    for (int i = g * size; i < (g + 1) * size; ++i) {
        const u32 x = key(i);
        if (x > first) {
            second = first;
            first = x;
        } else if (x > second) {
            second = x;
        }
    }
    return size < 2 ? rt_unord(first) : rt_add(rt_unord(first), rt_unord(second));
}

// Rank of group g among the n_group scores (higher first, ties to the lower group).
__device__ __forceinline__ int rt_group_rank(const float* scores, int g, int n_group) {
    const u32 so = rt_ord(scores[g]);
    int rank = 0;
    for (int h = 0; h < n_group; ++h) {
        const u32 oh = rt_ord(scores[h]);
        rank += (oh > so || (oh == so && h < g)) ? 1 : 0;
    }
    return rank;
}

template <int NPL>
__device__ __forceinline__ void rt_route_reg(const void* logits, int dtype, const float* b, int T, int E, int K,
                                             int method, int n_group, int topk_group, float rsf, int norm,
                                             int* topk_ids, float* topk_w, unsigned char* base, long long t0,
                                             long long tstep) {
    const int lane = threadIdx.x & 31;
    const bool softmax_key = method == 0 || method == 2;
    const bool sigmoid_key = method == 3 || method == 6 || method == 7 || method == 8;
    const bool renorm = method == 1 || method == 2 || method == 3 || method == 7 || (method == 6 && norm != 0);
    for (long long t = t0; t < T; t += tstep) {
        const long long row = t * (long long)E;
        // 1. Logits (and bias) of this lane's ids, all loads issued together.
        float x[NPL];
        float bv[NPL];
        if (dtype == ARG_DTYPE_BF16 || dtype == ARG_DTYPE_F16) {
            const u16* p = (const u16*)logits + row;
#pragma unroll
            for (int v = 0; v < NPL; ++v) {
                const int id = v * 32 + lane;
                const u16 h = id < E ? p[id] : (u16)0;
                x[v] = dtype == ARG_DTYPE_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
            }
        } else {
            const float* p = (const float*)logits + row;
#pragma unroll
            for (int v = 0; v < NPL; ++v) {
                const int id = v * 32 + lane;
                x[v] = id < E ? p[id] : 0.0f;
            }
        }
#pragma unroll
        for (int v = 0; v < NPL; ++v) {
            const int id = v * 32 + lane;
            bv[v] = (b != nullptr && id < E) ? b[id] : 0.0f;
        }

        // 2. Selection keys (as order images).
        u32 ko[NPL];
        if (softmax_key) {
            u32 mo = 0;
#pragma unroll
            for (int v = 0; v < NPL; ++v) {
                const u32 o = rt_ord(x[v]);
                if (v * 32 + lane < E) mo = o > mo ? o : mo;
            }
            const float maxv = rt_unord(rt_redux_max(mo));
            float* scratch = (float*)(base + (size_t)8 * E);
            float ev[NPL];
#pragma unroll
            for (int v = 0; v < NPL; ++v) {
                const int id = v * 32 + lane;
                if (id < E) {
                    ev[v] = rt_expf(rt_sub(x[v], maxv));
                    scratch[id] = ev[v];
                } else {
                    ev[v] = 0.0f;
                }
            }
            __syncwarp();
            float sum = 0.0f;
            if (lane == 0) {
                sum = scratch[0];
#pragma unroll 8
                for (int i = 1; i < E; ++i) sum = rt_add(sum, scratch[i]);
            }
            sum = __shfl_sync(0xffffffffu, sum, 0);
#pragma unroll
            for (int v = 0; v < NPL; ++v) ko[v] = v * 32 + lane < E ? rt_ord(rt_div(ev[v], sum)) : 0u;
        } else {
#pragma unroll
            for (int v = 0; v < NPL; ++v) {
                float key = x[v];
                if (sigmoid_key) {
                    key = rt_sigmoid(x[v]);
                    if (b != nullptr) key = rt_add(key, bv[v]);
                }
                ko[v] = v * 32 + lane < E ? rt_ord(key) : 0u;
            }
        }

        // 3. DeepSeek-V3 group selection (as the shared-memory path): score = sum of the two largest
        // keys of each group, keep the topk_group best groups (ties to the lower group), -inf elsewhere.
        if (method == 3 && n_group > 1) {
            const int size = E / n_group;
            u32* gk = (u32*)base;                              // [E] key images
            int* keep = (int*)(base + (size_t)4 * E);          // [n_group]
            float* gs = (float*)(base + (size_t)8 * E);        // [n_group] scores
            const u32 neg_inf = rt_ord(__uint_as_float(0xff800000u));
#pragma unroll
            for (int v = 0; v < NPL; ++v)
                if (v * 32 + lane < E) gk[v * 32 + lane] = ko[v];
            __syncwarp();
            for (int g = lane; g < n_group; g += 32) gs[g] = rt_group_score([&](int i) { return gk[i]; }, g, size);
            __syncwarp();
            for (int g = lane; g < n_group; g += 32) keep[g] = rt_group_rank(gs, g, n_group) < topk_group ? 1 : 0;
            __syncwarp();
#pragma unroll
            for (int v = 0; v < NPL; ++v) {
                const int id = v * 32 + lane;
                if (id < E && keep[id / size] == 0) ko[v] = neg_inf;
            }
        }

        // 4. K rounds: warp max of the key image (redux), then the lowest id holding it (redux).
        u32 bo = 0;
        int bi = 0;
#pragma unroll
        for (int v = 0; v < NPL; ++v)
            if (ko[v] > bo) {
                bo = ko[v];
                bi = v;
            }
        int my_id = 0;
        u32 my_ord = 0;
        for (int j = 0; j < K; ++j) {
            const u32 m = rt_redux_max(bo);
            const u32 wid = rt_redux_min(bo == m ? (u32)(bi * 32 + lane) : 0xffffffffu);
            if (lane == j) {
                my_id = (int)wid;
                my_ord = m;
            }
            if ((int)(wid & 31u) == lane) {
                const int wv = (int)(wid >> 5);
                bo = 0;
                bi = 0;
#pragma unroll
                for (int v = 0; v < NPL; ++v) {
                    if (v == wv) ko[v] = 0u;
                    if (ko[v] > bo) {
                        bo = ko[v];
                        bi = v;
                    }
                }
            }
        }

        // 5. Weights in slot order (lane j = slot j), as methods.rs.
        float raw = 0.0f;
        if (!softmax_key && lane < K) raw = load_as_f32(logits, dtype, row + my_id);
        const float x0 = __shfl_sync(0xffffffffu, raw, 0);
        float w = 0.0f;
        switch (method) {
            case 0:
            case 2: w = rt_unord(my_ord); break;              // softmax prob
            case 1: w = rt_expf(rt_sub(raw, x0)); break;
            case 5: w = raw; break;                           // raw logit
            default: w = rt_sigmoid(raw); break;
        }
        if (renorm) {
            float s = __shfl_sync(0xffffffffu, w, 0);
#pragma unroll 4
            for (int j = 1; j < K; ++j) s = rt_add(s, __shfl_sync(0xffffffffu, w, j));
            if (method == 3 || method == 7) s = rt_add(s, 1e-20f);
            else if (method == 6) s = (s >= 1e-20f) ? s : 1e-20f;  // f32::max(s, 1e-20)
            if (method == 3 || method == 7) w = rt_div(rt_mul(w, rsf), s);
            else w = rt_div(w, s);
        }
        if (lane < K) {
            topk_ids[t * K + lane] = my_id;
            topk_w[t * K + lane] = w;
        }
        __syncwarp();  // smem is reused by the next token
    }
}

// Bytes of shared memory one routing warp uses (the header's warp_bytes).
__device__ __forceinline__ size_t rt_warp_bytes(int E, int K) {
    return ((size_t)12 * E + (size_t)8 * K + 15) & ~(size_t)15;
}

// route_logits' body for the calling warp: tokens t0, t0 + tstep, ... < T, in its rt_warp_bytes(E, K) bytes
// of shared memory at `base` (16-byte aligned). Warp-synchronous only (no block barrier), so any subset
// of a block's warps may call it: route_logits (every warp of the grid) and front.cu (block 0's warps).
__device__ __forceinline__ void rt_route_tokens(const void* logits, int logits_dtype, const float* bias, int T,
                                                int E, int K, int method, int n_group, int topk_group,
                                                float routed_scaling_factor, int norm_topk_prob, int* topk_ids,
                                                float* topk_w, unsigned char* base, long long t0,
                                                long long tstep) {
    const int lane = threadIdx.x & 31;
    u64* comp = (u64*)base;                                    // [E] selection composites
    float* scratch = (float*)(base + (size_t)8 * E);           // [E] exps / group scores / weights
    int* sel_id = (int*)(base + (size_t)12 * E);               // [K]
    float* sel_key = (float*)(base + (size_t)12 * E + (size_t)4 * K);  // [K]
    const bool softmax_key = method == 0 || method == 2;
    const bool sigmoid_key = method == 3 || method == 6 || method == 7 || method == 8;
    const float* b = (method == 3 || method == 7) ? bias : nullptr;

    if (K <= 32 && E <= 512) {
#define RT_REG(N) rt_route_reg<N>(logits, logits_dtype, b, T, E, K, method, n_group, topk_group, \
                                  routed_scaling_factor, norm_topk_prob, topk_ids, topk_w, base, t0, tstep)
        if (E <= 32) RT_REG(1);
        else if (E <= 64) RT_REG(2);
        else if (E <= 128) RT_REG(4);
        else if (E <= 256) RT_REG(8);
        else RT_REG(16);
#undef RT_REG
        return;
    }

    for (long long t = t0; t < T; t += tstep) {
        const long long row = t * (long long)E;

        // 1. Selection keys into comp[].
        if (softmax_key) {
            // max (exact, order-free), e^(x - max) in id order, sequential sum in id order, divide.
            u32 mo = 0;
            for (int i = lane; i < E; i += 32) {
                const u32 o = rt_ord(load_as_f32(logits, logits_dtype, row + i));
                mo = o > mo ? o : mo;
            }
            const float maxv = rt_unord(rt_warp_max_u32(mo));
            for (int i = lane; i < E; i += 32)
                scratch[i] = rt_expf(rt_sub(load_as_f32(logits, logits_dtype, row + i), maxv));
            __syncwarp();
            float sum = 0.0f;
            if (lane == 0) {
                sum = scratch[0];
                for (int i = 1; i < E; ++i) sum = rt_add(sum, scratch[i]);
            }
            sum = __shfl_sync(0xffffffffu, sum, 0);
            for (int i = lane; i < E; i += 32) comp[i] = rt_comp(rt_div(scratch[i], sum), i);
        } else {
            for (int i = lane; i < E; i += 32) {
                const float x = load_as_f32(logits, logits_dtype, row + i);
                float key = x;
                if (sigmoid_key) {
                    key = rt_sigmoid(x);
                    if (b != nullptr) key = rt_add(key, b[i]);
                }
                comp[i] = rt_comp(key, i);
            }
        }
        __syncwarp();

        // 2. DeepSeek-V3 group selection: score = sum of the two largest keys of each group, keep the
        // topk_group best groups (ties to the lower group), the others' keys become -inf.
        if (method == 3 && n_group > 1) {
            const int size = E / n_group;
            for (int g = lane; g < n_group; g += 32)
                scratch[g] = rt_group_score([&](int i) { return (u32)(comp[i] >> 32); }, g, size);
            __syncwarp();
            for (int g = lane; g < n_group; g += 32) {
                if (rt_group_rank(scratch, g, n_group) >= topk_group) {
                    const float ninf = __uint_as_float(0xff800000u);
                    for (int i = g * size; i < (g + 1) * size; ++i) comp[i] = rt_comp(ninf, i);
                }
            }
            __syncwarp();
        }

        // 3. K rounds of warp argmax over (key desc, id asc). Lane l owns ids ≡ l (mod 32) and caches
        // its best composite; only the winner's owner rescans.
        u64 best = 0;
        for (int i = lane; i < E; i += 32) {
            const u64 c = comp[i];
            best = c > best ? c : best;
        }
        for (int j = 0; j < K; ++j) {
            const u64 win = rt_warp_max_u64(best);
            const int id = rt_comp_id(win);
            if (lane == 0) {
                sel_id[j] = id;
                sel_key[j] = rt_unord((u32)(win >> 32));
            }
            if ((id & 31) == lane) {
                comp[id] = 0;
                best = 0;
                for (int i = lane; i < E; i += 32) {
                    const u64 c = comp[i];
                    best = c > best ? c : best;
                }
            }
        }
        __syncwarp();

        // 4. Weights, in slot order, as methods.rs.
        float max_sel = 0.0f;
        if (method == 1) max_sel = load_as_f32(logits, logits_dtype, row + sel_id[0]);
        for (int j = lane; j < K; j += 32) {
            const int id = sel_id[j];
            float v;
            switch (method) {
                case 0:
                case 2: v = sel_key[j]; break;                                  // softmax prob
                case 1: v = rt_expf(rt_sub(load_as_f32(logits, logits_dtype, row + id), max_sel)); break;
                case 5: v = load_as_f32(logits, logits_dtype, row + id); break;  // raw logit
                default: v = rt_sigmoid(load_as_f32(logits, logits_dtype, row + id)); break;
            }
            scratch[j] = v;
        }
        __syncwarp();
        const bool renorm = method == 1 || method == 2 || method == 3 || method == 7 ||
                            (method == 6 && norm_topk_prob != 0);
        float denom = 1.0f;
        if (renorm) {
            if (lane == 0) {
                float s = scratch[0];
                for (int j = 1; j < K; ++j) s = rt_add(s, scratch[j]);
                if (method == 3 || method == 7) s = rt_add(s, 1e-20f);
                else if (method == 6) s = (s >= 1e-20f) ? s : 1e-20f;  // f32::max(s, 1e-20)
                denom = s;
            }
            denom = __shfl_sync(0xffffffffu, denom, 0);
        }
        for (int j = lane; j < K; j += 32) {
            float v = scratch[j];
            if (renorm) {
                if (method == 3 || method == 7) v = rt_div(rt_mul(v, routed_scaling_factor), denom);
                else v = rt_div(v, denom);
            }
            topk_ids[t * K + j] = sel_id[j];
            topk_w[t * K + j] = v;
        }
        __syncwarp();  // smem is reused by the next token
    }
}

extern "C" __global__ void route_logits(const void* logits, int logits_dtype, const float* bias, int T, int E,
                                        int K, int method, int n_group, int topk_group,
                                        float routed_scaling_factor, int norm_topk_prob, int* topk_ids,
                                        float* topk_w) {
    pdl_wait();  // inputs come from the previous kernel (common.cuh)
    pdl_launch_dependents();
    extern __shared__ __align__(16) unsigned char rt_smem[];
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    rt_route_tokens(logits, logits_dtype, bias, T, E, K, method, n_group, topk_group, routed_scaling_factor,
                    norm_topk_prob, topk_ids, topk_w, rt_smem + (size_t)warp * rt_warp_bytes(E, K),
                    (long long)blockIdx.x * warps + warp, (long long)gridDim.x * warps);
}

// unpack_routes' body over items first, first + step, ... < n.
__device__ __forceinline__ void rt_unpack(const int* packed, int n, int* ids, float* w, long long first,
                                          long long step) {
    for (long long i = first; i < n; i += step) {
        const int p = packed[i];
        ids[i] = p >> 16;
        w[i] = bf16_to_f32((u16)(p & 0xffff));
    }
}

extern "C" __global__ void unpack_routes(const int* packed, int n, int* ids, float* w) {
    pdl_wait();  // inputs come from the previous kernel (common.cuh)
    pdl_launch_dependents();
    rt_unpack(packed, n, ids, w, (long long)blockIdx.x * blockDim.x + threadIdx.x,
              (long long)gridDim.x * blockDim.x);
}
