// Main loop of the decoded formats (MAINLOOP_WGMMA_RS, sm_90a), a fragment of a kernel body (included where the
// main loop goes; moe_gemm.cu names what it reads). BM / 64 warpgroups, every thread loading (gemm/loads_decoded.cuh)
// as in gemm/mainloop_wgmma.cuh, with the same cp.async pipeline (prefetch distance STAGES - 2). Per 64-element K
// step each thread decodes its A fragments — rows r0 = wm0 + lane/4 and r0 + 8, the elements of lane % 4 — from the
// stage's weight bytes to bf16 in registers (Fmt::decode_row), then its warpgroup issues four register-sourced
// wgmma m64n{BN}k16 against the activation tile (read through descriptors). Two register sets alternate: step ks
// decodes into set ks % 2 while the wgmma of step ks - 1, still in flight, read the other (wgmma.wait_group 1
// retires them before that set is written again; the register fences keep the compiler from reusing it sooner).
// Warp-specialised (MAINLOOP_WGMMA_RS_WS, BM = 128): warpgroup 2 only loads (gemm/ws_producer.cuh, the ring and
// mbarriers of gemm/mainloop_wgmma_ws.cuh) and warpgroups 0 and 1 only decode and issue, each on its own: a
// consumer waits for full[s] instead of a __syncthreads, and releases a step's slot (empty[s]) once the wgmma
// reading its activation tile retired, one step late as in the loop above.
// Declares `acc` (m16n8 fragment layout, written only when nk > 0).

#include "gemm/loads_decoded.cuh"

    // ---- register-sourced warpgroup MMA main loop (see the header)
    (void)warp_k;
    constexpr int NACC = MG_MT * MG_NTL * 4;
    float acc[MG_MT][MG_NTL][4];
    float* const accf = &acc[0][0][0];
#if MG_WS
#include "gemm/ws_producer.cuh"
    mg_setmaxnreg_inc<MG_WS_CREGS>();
#endif
    const int r0 = wm0 + (lane >> 2);
    const int tq = lane & 3;

#if MG_WS
    int slot_c = 0;        // slot of the step consumed next
    u32 ph_c = 0;          // parity of its fill count
    u32 rel = bar_spare;   // the slot of the step before, released once its wgmma retired (first: the spare)
    auto step_head = [&](int) { mg_mbar_wait(bar_full + 8 * slot_c, ph_c); };
    // the wgmma of the step before retired (wait_group 1): its slot may be refilled
    auto release = [&]() {
        mg_mbar_arrive_if(rel, lane == 0);
        rel = bar_empty + 8 * slot_c;
    };
    auto advance = [&]() {
        slot_c = slot_c + 1 == STAGES ? 0 : slot_c + 1;
        ph_c ^= (u32)(slot_c == 0);
    };
#else
#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) {
        if (s < nk) load_stage(s, s);
        mg_cp_commit();
    }
    int slot_c = 0;
    int slot_l = STAGES - 2;
    auto step_head = [&](int ks) {
        mg_cp_wait<STAGES - 3>();
        mg_fence_proxy_async();
        __syncthreads();
        if (ks + STAGES - 2 < nk) load_stage(slot_l, ks + STAGES - 2);
        mg_cp_commit();
    };
    auto release = [&]() {};  // (the __syncthreads of the next step head frees the slot)
    auto advance = [&]() {
        slot_c = slot_c + 1 == STAGES ? 0 : slot_c + 1;
        slot_l = slot_l + 1 == STAGES ? 0 : slot_l + 1;
    };
#endif
    // a[q] = the m16n8k16 A fragment {(r0, 2t), (r0+8, 2t), (r0, 2t+8), (r0+8, 2t+8)} of sub-step q
    auto decode = [&](u32 (&a)[4][4], int slot) {
        const u8* st = sWp + slot * MG_SW_BYTES;
        u32 lo[4][2], hi[4][2];
        Fmt::decode_row(st, st + BM * Fmt::W_ROW_BYTES, r0, tq, lo);
        Fmt::decode_row(st, st + BM * Fmt::W_ROW_BYTES, r0 + 8, tq, hi);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            a[q][0] = lo[q][0];
            a[q][1] = hi[q][0];
            a[q][2] = lo[q][1];
            a[q][3] = hi[q][1];
        }
    };
    auto issue = [&](u32 (&a)[4][4], int slot, int acc_in) {
        const u32 aA = sA + slot * MG_SA_BYTES;
#pragma unroll
        for (int i = 0; i < NACC; ++i) mg_reg_fence(accf[i]);
        mg_wg_fence();
#pragma unroll
        for (int q = 0; q < 4; ++q) mg_wgmma_rs<BN, Bf16>(accf, a[q], mg_desc(aA + 32 * q), acc_in | (q > 0));
        mg_wg_commit();
    };
    auto fence_set = [&](u32 (&a)[4][4]) {
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int i = 0; i < 4; ++i) mg_reg_fence_u(a[q][i]);
    };
    u32 set0[4][4], set1[4][4];
    // (acc is not initialised here; the first wgmma runs with scale-d = 0; nk == 0 -> epilogue)
    // step ks: decode into `cur` and issue; then retire step ks - 1, whose set `other` may be written again.
    // Every path back to a step's decode passes the wait that retired its set: the loop runs whole pairs
    // and the odd last step follows it (with a loop that could skip its second half, ptxas cannot tell
    // that set0 is free again and serializes every wgmma: C7513).
    auto step = [&](int ks, u32 (&cur)[4][4], u32 (&other)[4][4]) {
        step_head(ks);
        decode(cur, slot_c);
        issue(cur, slot_c, ks != 0);
        mg_wg_wait<1>();  // step ks - 1 retired: `other` and its stage are free
#pragma unroll
        for (int i = 0; i < NACC; ++i) mg_reg_fence(accf[i]);
        fence_set(other);
        release();
        advance();
    };
    int ks = 0;
    for (; ks + 1 < nk; ks += 2) {
        step(ks, set0, set1);
        step(ks + 1, set1, set0);
    }
    if (ks < nk) step(ks, set0, set1);
    mg_wg_wait<0>();
#pragma unroll
    for (int i = 0; i < NACC; ++i) mg_reg_fence(accf[i]);
    fence_set(set0);
    fence_set(set1);
