// The fused small-batch kernel's body for the tiled formats: a fragment of decode.cu's `moe_decode` (included inside
// it, so the entry and its parameters are written once, there), reading the parameters and the helpers of
// decode_tiled.cuh, whose head comment describes the work.
    extern __shared__ __align__(16) u8 smem[];  // staged rows (bf16), their globals, the partials
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int P = T * K;
    const bool gated = EPILOGUE == EPI_GATED;
    const int M1p = gated ? 2 * Ip : Ip;
    const int G1 = M1p / 16, nk1 = Hp / 64;  // W13's 16-row groups and K steps
    const int G2 = (H + 15) / 16, nk2 = Ip / 64;
    const long long w13_expert = (long long)(M1p / 128) * nk1 * DT_TSTEP;
    const long long w2_expert = (long long)(Hp / 128) * nk2 * DT_TSTEP;
    constexpr bool COL = DtFmt::COL_SCALE;

    pdl_wait();  // the hidden states and the routes may come from the previous kernels

    // Phase 2's weight groups towards L2 now, while phase 1 streams W13 (only when all of them fit beside it).
    long long lo2, hi2;
    dc_range((long long)T * G2, lo2, hi2);
    if ((long long)P * w2_expert <= DC_PREFETCH_L2_BYTES) {
        const long long units = (hi2 - lo2) * K * nk2;
        for (long long u = threadIdx.x; u < units; u += DC_THREADS) {
            const long long it = lo2 + u / ((long long)K * nk2);
            const int j = (int)(u / nk2 % K), s = (int)(u % nk2);
            const int t = (int)(it / G2), grp = (int)(it % G2);
            int e;
            if (dc_local(topk_ids, t * K + j, expert_start, E_local, e)) {
                const u8* blk = w2 + e * w2_expert + ((long long)(grp >> 3) * nk2 + s) * DT_TSTEP;
                const int row0 = (grp & 7) * 16;
                asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(blk + row0 * DT_WB), "r"((u32)(16 * DT_WB))
                             : "memory");
                asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(blk + 128 * DT_WB + row0 * DT_SB),
                             "r"((u32)(16 * DT_SB))
                             : "memory");
            }
        }
    }

    // ---- phase 1: this CTA's tokens quantized into shared memory, then its (pair, group) items
    long long lo1, hi1;
    dc_range((long long)P * G1, lo1, hi1);
    const int t_first = lo1 < hi1 ? (int)(lo1 / G1) / K : 0;
    const int t_last = lo1 < hi1 ? (int)((hi1 - 1) / G1) / K : -1;
    const int ntok1 = t_last - t_first + 1;
    float* g1 = (float*)(smem + 2 * Hp * 2);  // the tokens' globals
    float* part = (float*)(smem + 2 * Hp * 2 + 16);
    const DtRows xrows{(const u8*)x + (long long)t_first * H * (x_dtype == ARG_DTYPE_F32 ? 4 : 2), H, x_dtype};
    dt_stage<IN_QUANT, false>(smem, g1, ntok1, H, Hp, IN_QUANT == 4 ? a1_scale[0] : 1.0f, warp, lane, xrows);
    __syncthreads();
    const int F1 = gated ? 8 : 16;  // features of a group
    for (long long b0 = lo1; b0 < hi1; b0 += DC_WARPS) {
        const int n = (int)(hi1 - b0 < DC_WARPS ? hi1 - b0 : DC_WARPS);
        const int S = dt_slices(nk1, DC_WARPS / n);
        for (int u = warp; u < n * S; u += DC_WARPS) {
            const long long it = b0 + u / S;
            const int p = (int)(it / G1), grp = (int)(it % G1);
            int e;
            if (!dc_local(topk_ids, p, expert_start, E_local, e)) continue;
            int slo, shi;
            dt_slice(nk1, u % S, S, slo, shi);
            const u8* tile = w13 + e * w13_expert + (long long)(grp >> 3) * nk1 * DT_TSTEP;
            dt_group_dot<DtFmt>(tile, (grp & 7) * 16, slo, shi, smem + (p / K - t_first) * Hp * 2, lane, part + u * 16);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < n * F1; i += DC_THREADS) {
            const int il = i / F1, f = i % F1;
            const long long it = b0 + il;
            const int p = (int)(it / G1), grp = (int)(it % G1);
            int e;
            if (!dc_local(topk_ids, p, expert_start, E_local, e)) continue;
            const float* pp = part + il * S * 16;
            const int ra = f, rb = gated ? f + 8 : f;  // gated: gate row f, up row f + 8; relu2: row f
            float v0 = pp[ra], v1 = pp[rb];
            for (int s = 1; s < S; ++s) {
                v0 += pp[s * 16 + ra];
                v1 += pp[s * 16 + rb];
            }
            const float dq = DtFmt::dequant(e, w13_scale, nullptr);
            v0 *= dq;
            v1 *= dq;
            if (llama4 || COL) {
                float rw = llama4 ? topk_w[p] : 1.0f;
                if (COL) rw *= g1[p / K - t_first];
                v0 *= rw;
                v1 *= rw;
            }
            const int m0 = grp * 16;
            if (b13 != nullptr) {
                v0 += b13[(long long)e * M1p + m0 + ra];
                v1 += b13[(long long)e * M1p + m0 + rb];
            }
            float* irow = inter + (long long)p * Ip;
            if (gated) {
                irow[grp * 8 + f] = mg_act(v0, v1, act_alpha, act_beta, act_limit);
            } else {
                const float q0 = fmaxf(v0, 0.0f);
                irow[m0 + f] = q0 * q0;
            }
        }
        __syncthreads();  // the partials are rewritten by the next batch
    }

    dc_grid_sync(barrier);
    pdl_launch_dependents();

    // ---- phase 2: the intermediate rows of this CTA's tokens' pairs quantized into shared memory (a pair of
    // another rank left its row unwritten: staged all the same, never read), then its (token, group) items
    const int u_first = lo2 < hi2 ? (int)(lo2 / G2) : 0;
    const int u_last = lo2 < hi2 ? (int)((hi2 - 1) / G2) : -1;
    const int nrow2 = (u_last - u_first + 1) * K;
    float* g2 = (float*)(smem + 2 * K * Ip * 2);
    float* part2 = (float*)(smem + 2 * K * Ip * 2 + 2 * K * 4);
    const DtRows irows{inter + (long long)u_first * K * Ip, Ip, ARG_DTYPE_F32};
    dt_stage<INTER_QUANT, true>(smem, g2, nrow2, Ip, Ip, INTER_QUANT == 4 ? a2_scale[0] : 1.0f, warp, lane, irows);
    __syncthreads();
    const int per_batch = K < DC_WARPS ? DC_WARPS / K : 1;  // items a batch
    for (long long b0 = lo2; b0 < hi2; b0 += per_batch) {
        const int n = (int)(hi2 - b0 < per_batch ? hi2 - b0 : per_batch);
        const int S = dt_slices(nk2, DC_WARPS / (n * K));
        for (int u = warp; u < n * K * S; u += DC_WARPS) {
            const long long it = b0 + u / (K * S);
            const int j = u / S % K;
            const int t = (int)(it / G2), grp = (int)(it % G2);
            int e;
            if (!dc_local(topk_ids, t * K + j, expert_start, E_local, e)) continue;
            int slo, shi;
            dt_slice(nk2, u % S, S, slo, shi);
            const u8* tile = w2 + e * w2_expert + (long long)(grp >> 3) * nk2 * DT_TSTEP;
            dt_group_dot<DtFmt>(tile, (grp & 7) * 16, slo, shi, smem + ((t - u_first) * K + j) * Ip * 2, lane, part2 + u * 16);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < n * 16; i += DC_THREADS) {
            const int il = i >> 4, r = i & 15;
            const long long it = b0 + il;
            const int t = (int)(it / G2), h = (int)(it % G2) * 16 + r;
            if (h >= H) continue;
            float sum = 0.0f;
            for (int j = 0; j < K; ++j) {
                int e;
                if (!dc_local(topk_ids, t * K + j, expert_start, E_local, e)) continue;
                const float* pp = part2 + (il * K + j) * S * 16 + r;
                float y = pp[0];
                for (int s = 1; s < S; ++s) y += pp[s * 16];
                y *= DtFmt::dequant(e, w2_scale, nullptr);
                if (COL) y *= g2[(t - u_first) * K + j];
                if (b2 != nullptr) y += b2[(long long)e * Hp + h];
                const float wj = llama4 ? 1.0f : topk_w[t * K + j];
                sum = __fadd_rn(sum, __fmul_rn(wj, y));
            }
            store_from_f32(out, out_dtype, (long long)t * H + h, sum);
        }
        __syncthreads();
    }
