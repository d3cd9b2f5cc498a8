// Main loop with ldmatrix + mma.sync (m16n8k16 bf16, m16n8k32 e4m3), any sm_80+ target. A fragment of a kernel
// body (included where the main loop goes; moe_gemm.cu names what it reads): a cp.async pipeline of STAGES
// stages, prefetch distance STAGES - 1, one __syncthreads per 128-byte K step; a WARPS_M x WARPS_N x WARPS_K warp
// grid (gemm/config.cuh). Each K step is 4 k-sub-steps of 32 bytes; with WARPS_K > 1 they are split between warps
// and the partial sums are reduced through shared memory in a fixed order (deterministic); the k-split warps then
// return. A format that folds each K step (Fmt::FOLD_EACH_STEP) multiplies into a fresh partial, folded after
// the step (Fmt::fold_mma). Declares `acc`.

    // ldmatrix lane addressing (byte offsets inside a stage; chunk index is XORed with row & 7 = lane & 7)
    // A (x4): matrices {rows 0-7, rows 8-15} x {chunk 2kk, 2kk+1} -> a0..a3; lane l addresses row l & 15,
    //         chunk 2kk + (l >> 4).
    const u32 a_row_off = (u32)((wm0 + (lane & 15)) * 128);
    const u32 a_chi = (u32)(lane >> 4);
    // B (x4 over two n8 tiles): matrices {tile j chunk 2kk, tile j chunk 2kk+1, tile j+1 ...} -> b0,b1 of
    //         tile j then of tile j+1; lane l addresses row (l & 7) + 8 * (l >> 4), chunk 2kk + ((l >> 3) & 1).
    //   (x2, one n8 tile): lanes 0-15, row l & 7, same chunk rule.
    const u32 b_row_off = (u32)((wn0 + (lane & 7) + (MG_NTL >= 2 ? ((lane >> 4) << 3) : 0)) * 128);
    const u32 b_chi = (u32)((lane >> 3) & 1);
    const u32 lane7 = (u32)(lane & 7);

    float acc[MG_MT][MG_NTL][4];
#pragma unroll
    for (int i = 0; i < MG_MT; ++i)
#pragma unroll
        for (int j = 0; j < MG_NTL; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

    auto load_frags = [&](u32 aW, u32 aA, int kk, u32 (&af)[MG_MT][4], u32 (&bf)[MG_NTL][2]) {
        const u32 ca = ((2u * kk + a_chi) ^ lane7) << 4;
#pragma unroll
        for (int i = 0; i < MG_MT; ++i)
            mg_ldsm_x4(aW + a_row_off + i * 16 * 128 + ca, af[i][0], af[i][1], af[i][2], af[i][3]);
        const u32 cb = ((2u * kk + b_chi) ^ lane7) << 4;
        if constexpr (MG_NTL == 1) {
            mg_ldsm_x2(aA + b_row_off + cb, bf[0][0], bf[0][1]);
        } else {
#pragma unroll
            for (int j = 0; j < MG_NTL; j += 2)
                mg_ldsm_x4(aA + b_row_off + j * 8 * 128 + cb, bf[j][0], bf[j][1], bf[j + 1][0], bf[j + 1][1]);
        }
    };

    // ---- pipeline prologue
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < nk) load_stage(s, s);
        mg_cp_commit();
    }

    int slot_c = 0;           // stage consumed this iteration
    int slot_l = STAGES - 1;  // stage refilled this iteration (the one consumed in the previous iteration)
    for (int ks = 0; ks < nk; ++ks) {
        mg_cp_wait<STAGES - 2>();  // group ks has landed (for this thread) ...
        __syncthreads();           // ... for all threads; and everyone is done reading slot_l
        if (ks + STAGES - 1 < nk) load_stage(slot_l, ks + STAGES - 1);
        mg_cp_commit();

        if (warp_active) {
            const u32 aW = sW + slot_c * MG_SW_BYTES;
            const u32 aA = sA + slot_c * MG_SA_BYTES;
            // A format that folds each K step multiplies into a fresh partial `part`, the others into acc.
            // NOTE: a preprocessor choice on purpose: declaring `part` for every format and choosing the target
            // with `if constexpr` / a reference changed the code of every mma.sync variant (kernel_identity.py)
            static_assert(MG_FOLD_EACH_STEP == Fmt::FOLD_EACH_STEP, "gemm/config.cuh MG_FOLD_EACH_STEP");
#if MG_FOLD_EACH_STEP
            float part[MG_MT][MG_NTL][4];
#pragma unroll
            for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                for (int j = 0; j < MG_NTL; ++j)
#pragma unroll
                    for (int c = 0; c < 4; ++c) part[i][j][c] = 0.0f;
#define MG_TGT part
#else
#define MG_TGT acc
#endif
            if constexpr (Fmt::FRAG_DB) {
                // register double buffer: fragments of sub-step q+1 are loaded before the MMAs of sub-step q
                u32 af[2][MG_MT][4];
                u32 bf[2][MG_NTL][2];
                load_frags(aW, aA, warp_k, af[0], bf[0]);
#pragma unroll
                for (int q = 0; q < MG_KPW; ++q) {
                    if (q + 1 < MG_KPW) load_frags(aW, aA, warp_k + (q + 1) * WARPS_K, af[(q + 1) & 1], bf[(q + 1) & 1]);
#pragma unroll
                    for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                        for (int j = 0; j < MG_NTL; ++j) mg_mma<Fmt::Elem>(MG_TGT[i][j], af[q & 1][i], bf[q & 1][j][0], bf[q & 1][j][1]);
                }
            } else {
#pragma unroll
                for (int q = 0; q < MG_KPW; ++q) {
                    u32 af[MG_MT][4];
                    u32 bf[MG_NTL][2];
                    load_frags(aW, aA, warp_k + q * WARPS_K, af, bf);
#pragma unroll
                    for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                        for (int j = 0; j < MG_NTL; ++j) mg_mma<Fmt::Elem>(MG_TGT[i][j], af[i], bf[j][0], bf[j][1]);
                }
            }
#undef MG_TGT
#if MG_FOLD_EACH_STEP
            Fmt::fold_mma(acc, part, smem, slot_c, lane, wm0, wn0);  // promote the 128-wide K step
#endif
        }
        slot_c = slot_c + 1 == STAGES ? 0 : slot_c + 1;
        slot_l = slot_l + 1 == STAGES ? 0 : slot_l + 1;
    }

    if constexpr (WARPS_K > 1) {
        // ---- fixed-order reduction of the k-split warps through shared memory (reuses the pipeline buffers)
        mg_cp_wait<0>();
        __syncthreads();
        {
            float* red = (float*)smem;
            constexpr int NACC = MG_MT * MG_NTL * 4;
            const int wmn = warp % (WARPS_M * WARPS_N);
            if (warp_k > 0) {
                float* dst = red + ((warp_k - 1) * (WARPS_M * WARPS_N) + wmn) * NACC * 32 + lane;
#pragma unroll
                for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                    for (int j = 0; j < MG_NTL; ++j)
#pragma unroll
                        for (int c = 0; c < 4; ++c) dst[((i * MG_NTL + j) * 4 + c) * 32] = acc[i][j][c];
            }
            __syncthreads();
            if (warp_k > 0) return;
#pragma unroll
            for (int kq = 1; kq < WARPS_K; ++kq) {
                const float* src = red + ((kq - 1) * (WARPS_M * WARPS_N) + wmn) * NACC * 32 + lane;
#pragma unroll
                for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                    for (int j = 0; j < MG_NTL; ++j)
#pragma unroll
                        for (int c = 0; c < 4; ++c) acc[i][j][c] += src[((i * MG_NTL + j) * 4 + c) * 32];
            }
        }
    }
