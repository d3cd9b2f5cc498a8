// Main loop with Hopper warpgroup MMA (sm_90a), every thread loading. A fragment of a kernel body (included where
// the main loop goes; moe_gemm.cu names what it reads). BM / 64 warpgroups; warpgroup q owns weight rows
// 64q..64q+63 and issues per 128-byte K step four wgmma m64n{BN}k16 bf16 or m64n{BN}k32 e4m3 (gemm/wgmma.cuh),
// both operands read from shared memory through descriptors (the tiles 1024-byte aligned at smem_al). Each K
// step: wait for its cp.async group, fence.proxy.async (cp.async writes are generic-proxy, wgmma reads through
// the async proxy; CUTLASS's cp.async + GMMA mainloop has no such fence, kept to be safe), __syncthreads. The
// wgmma of step ks stay in flight while step ks+1 is issued (wgmma.wait_group 1), so a stage is refilled two
// steps after it was consumed: prefetch distance STAGES - 2.
// A format that folds each K step (Fmt::FOLD_EACH_STEP) accumulates the step into a fresh partial
// set, waits for it (wait_group 0) and folds it (Fmt::fold_wgmma) before the next step is issued: the tensor
// cores idle during the fold, but overlapping it with the next step (two partial sets) needed many more
// registers and ran slower (docs/cuda.md, "Measurements behind the kernel choices").
// Warp w holds accumulator rows 16w + g, 16w + g + 8 (g = lane/4) and columns 8j + 2(lane%4) + {0,1}: the m16n8
// fragment layout, so the epilogue is the one of mma.sync. Declares `acc` (written only when nk > 0 unless
// folded).

    // ---- warpgroup MMA main loop (see the header)
    const int wgrp = warp >> 2;  // warpgroup: weight rows 64 * wgrp .. + 63
    (void)warp_k;
    constexpr int NACC = MG_MT * MG_NTL * 4;  // accumulator floats per thread per set (BN / 2)
    float acc[MG_MT][MG_NTL][4];
    float* const accf = &acc[0][0][0];

    // prologue: STAGES - 2 stages in flight (a slot is refilled two steps after its wgmma was issued)
#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) {
        if (s < nk) load_stage(s, s);
        mg_cp_commit();
    }

    int slot_c = 0;           // stage consumed this iteration
    int slot_l = STAGES - 2;  // stage refilled this iteration (consumed two iterations ago)
    // wait for step ks's stage, refill the slot of step ks - 2 (its wgmma are complete: every warpgroup
    // waited for them before this barrier)
    auto step_head = [&](int ks) {
        mg_cp_wait<STAGES - 3>();  // group ks has landed (for this thread) ...
        mg_fence_proxy_async();    // ... and is visible to the async proxy (wgmma) ...
        __syncthreads();           // ... for all threads; the wgmma of step ks-2 (slot_l) are complete
        if (ks + STAGES - 2 < nk) load_stage(slot_l, ks + STAGES - 2);
        mg_cp_commit();
    };
    auto advance = [&]() {
        slot_c = slot_c + 1 == STAGES ? 0 : slot_c + 1;
        slot_l = slot_l + 1 == STAGES ? 0 : slot_l + 1;
    };
    // the wgmma q0..q1-1 of one K step (all four by default; FOLD_K32: one) from stage `slot` into d;
    // acc_in = 0: the first overwrites d (scale-d = 0: promoted, every step; unpromoted, the first),
    // 1: all add to d
    auto issue = [&](float* d, int slot, int acc_in, int q0 = 0, int q1 = 4) {
        const u32 aW = sW + slot * MG_SW_BYTES + wgrp * (64 * 128);
        const u32 aA = sA + slot * MG_SA_BYTES;
#pragma unroll
        for (int i = 0; i < NACC; ++i) mg_reg_fence(d[i]);
        mg_wg_fence();
#pragma unroll
        for (int q = q0; q < q1; ++q) mg_wgmma<BN, Fmt::Elem>(d, mg_desc(aW + 32 * q), mg_desc(aA + 32 * q), acc_in | (q > q0));
        mg_wg_commit();
    };
    if constexpr (Fmt::FOLD_EACH_STEP) {
#pragma unroll
        for (int i = 0; i < NACC; ++i) accf[i] = 0.0f;  // never written by wgmma
        float part[NACC];                                // one K step's partial
        // wait for each step's wgmma (wait_group 0) and fold before the next step is issued
        for (int ks = 0; ks < nk; ++ks) {
            step_head(ks);
#if FOLD_K32
            // each k32 wgmma alone, waited for and folded: the tensor core accumulates 32 products
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                issue(part, slot_c, 0, q, q + 1);
                mg_wg_wait<0>();
                mg_fold_wgmma<Fmt>(acc, part, smem_al, slot_c, lane, wm0);
            }
#else
            issue(part, slot_c, false);
            mg_wg_wait<0>();
            mg_fold_wgmma<Fmt>(acc, part, smem_al, slot_c, lane, wm0);  // (the scales of the step's stage)
#endif
            advance();
        }
    } else {
        // (acc is not initialised here; the first wgmma runs with scale-d = 0; nk == 0 -> epilogue)
        for (int ks = 0; ks < nk; ++ks) {
            step_head(ks);
            issue(accf, slot_c, ks != 0);
            mg_wg_wait<1>();  // the wgmma of step ks-1 are complete: its slot may be refilled next iteration
#pragma unroll
            for (int i = 0; i < NACC; ++i) mg_reg_fence(accf[i]);
            advance();
        }
    }
    mg_wg_wait<0>();
#pragma unroll
    for (int i = 0; i < NACC; ++i) mg_reg_fence(accf[i]);
