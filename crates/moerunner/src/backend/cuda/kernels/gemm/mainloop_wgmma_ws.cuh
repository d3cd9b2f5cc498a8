// Main loop with warp-specialised wgmma (sm_90a; BM = 128), a fragment of a kernel body (included where the main
// loop goes; moe_gemm.cu names what it reads). 384 threads: warpgroups 0 and 1 consume (wgmma as in
// gemm/mainloop_wgmma.cuh: warpgroup q owns weight rows 64q..64q+63, the epilogue is the same), warpgroup 2 only
// loads (the same cp.async gather / zero fill, 128 loader threads) into a ring of STAGES slots; mbarriers instead
// of __syncthreads: full[s] and empty[s] at bar_full / bar_empty, a spare at bar_spare (the kernel initialises
// them). Each producer thread waits for its cp.async group of step j (wait_group, STAGES - 2 groups behind the
// newest) and fences (fence.proxy.async.shared::cta), then lane 0 of each producer warp arrives on full[j] (after
// __syncwarp: one arrival per producer warp); the producer warps then return. Each consumer warp arrives on
// empty[s] once the wgmma reading the slot were retired by wgmma.wait_group (and a folding format's fold read its
// scales). setmaxnreg: producer WG_WS_PREGS (48), consumers MG_WS_CREGS (224). Unfolded, the consumers keep one
// K step's wgmma in flight (slot released one step late, so all STAGES - 2 other slots are loading); a folding
// format waits for and folds every step. Declares `acc`.

    // ---- warpgroup MMA main loop (see the header)
    const int wgrp = warp >> 2;  // warpgroup: weight rows 64 * wgrp .. + 63
    (void)warp_k;
    constexpr int NACC = MG_MT * MG_NTL * 4;  // accumulator floats per thread per set (BN / 2)
    float acc[MG_MT][MG_NTL][4];
    float* const accf = &acc[0][0][0];

    // ---- warp specialisation (WG_WS): warpgroup 2 loads, warpgroups 0 and 1 issue the wgmma (see the header)
#include "gemm/ws_producer.cuh"
    mg_setmaxnreg_inc<MG_WS_CREGS>();
    int slot_c = 0;  // slot of the step consumed next
    u32 ph_c = 0;    // parity of its fill count
    auto full_wait = [&]() { mg_mbar_wait(bar_full + 8 * slot_c, ph_c); };
    auto advance = [&]() {
        slot_c = slot_c + 1 == STAGES ? 0 : slot_c + 1;
        ph_c ^= (u32)(slot_c == 0);
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
            full_wait();
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
            mg_mbar_arrive_if(bar_empty + 8 * slot_c, lane == 0);  // wgmma retired, scales read
            advance();
        }
    } else {
        // (acc is not initialised here; the first wgmma runs with scale-d = 0; nk == 0 -> epilogue)
        u32 rel = bar_spare;  // slot of step ks-1, released once its wgmma retired (ks = 0: the spare barrier)
        for (int ks = 0; ks < nk; ++ks) {
            full_wait();
            issue(accf, slot_c, ks != 0);
            mg_wg_wait<1>();  // the wgmma of step ks-1 are complete: release its slot
#pragma unroll
            for (int i = 0; i < NACC; ++i) mg_reg_fence(accf[i]);
            mg_mbar_arrive_if(rel, lane == 0);
            rel = bar_empty + 8 * slot_c;
            advance();
        }
    }
    mg_wg_wait<0>();
#pragma unroll
    for (int i = 0; i < NACC; ++i) mg_reg_fence(accf[i]);
