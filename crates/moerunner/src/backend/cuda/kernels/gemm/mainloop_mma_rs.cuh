// Main loop of the decoded formats without wgmma (MAINLOOP_MMA_RS; any sm_80+ target, so the microscaling formats
// run where Hopper's warpgroup MMA does not exist: Blackwell), a fragment of a kernel body (included where the
// main loop goes; moe_gemm.cu names what it reads). The register-sourced loop of gemm/mainloop_wgmma_rs.cuh with
// mma.sync in place of wgmma: BM / 16 warps, warp w owning weight rows 16w..16w+15 and every column of the tile,
// so each weight row is decoded once per CTA. Per 64-element K step each thread decodes its A fragments — rows
// r0 = wm0 + lane/4 and r0 + 8, the elements of lane % 4 — from the stage's weight bytes to bf16 in registers
// (Fmt::decode_row: exact values, as the wgmma loop), reads the activation fragments with ldmatrix (the tile is
// swizzled as gemm/loads.cuh stores it) and issues one mma.sync m16n8k16 per n8 tile and k16 sub-step. The
// activation fragments and the cp.async pipeline are gemm/mainloop_mma.cuh's, written out again: sharing them
// with it (a fragment of lambdas) changed that loop's machine code for the stored formats (kernel_identity.py). Every product is exact, as on wgmma; the f32 sums run in mma.sync's order,
// so the output is within the format's tolerance of the wgmma loop's, not bit-identical to it.
// Declares `acc` (m16n8 fragment layout).

#include "gemm/loads_decoded.cuh"

    static_assert(MG_MT == 1 && WARPS_N == 1 && WARPS_K == 1, "a warp decodes its 16 rows for every column");
    (void)warp_k;
    // B (the activation tile) by ldmatrix, as gemm/mainloop_mma.cuh: lane l addresses row (l & 7) + 8 * (l >> 4)
    // (x4 over two n8 tiles; x2, one tile: lanes 0-15, row l & 7), chunk 2kk + ((l >> 3) & 1) XORed with row & 7
    const u32 b_row_off = (u32)((lane & 7) + (MG_NTL >= 2 ? ((lane >> 4) << 3) : 0)) * 128u;
    const u32 b_chi = (u32)((lane >> 3) & 1);
    const u32 lane7 = (u32)(lane & 7);
    const int r0 = wm0 + (lane >> 2);
    const int tq = lane & 3;

    float acc[MG_MT][MG_NTL][4];
#pragma unroll
    for (int j = 0; j < MG_NTL; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[0][j][c] = 0.0f;

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
            const u8* st = sWp + slot_c * MG_SW_BYTES;
            u32 lo[4][2], hi[4][2];
            Fmt::decode_row(st, st + BM * Fmt::W_ROW_BYTES, r0, tq, lo);
            Fmt::decode_row(st, st + BM * Fmt::W_ROW_BYTES, r0 + 8, tq, hi);
            const u32 aA = sA + slot_c * MG_SA_BYTES + b_row_off;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                // the m16n8k16 A fragment {(r0, 2t), (r0+8, 2t), (r0, 2t+8), (r0+8, 2t+8)} of sub-step q
                const u32 a[4] = {lo[q][0], hi[q][0], lo[q][1], hi[q][1]};
                const u32 cb = ((2u * q + b_chi) ^ lane7) << 4;
                u32 bf[MG_NTL][2];
                if constexpr (MG_NTL == 1) {
                    mg_ldsm_x2(aA + cb, bf[0][0], bf[0][1]);
                } else {
#pragma unroll
                    for (int j = 0; j < MG_NTL; j += 2)
                        mg_ldsm_x4(aA + j * 8 * 128 + cb, bf[j][0], bf[j][1], bf[j + 1][0], bf[j + 1][1]);
                }
#pragma unroll
                for (int j = 0; j < MG_NTL; ++j) mg_mma<Bf16>(acc[0][j], a, bf[j][0], bf[j][1]);
            }
        }
        slot_c = slot_c + 1 == STAGES ? 0 : slot_c + 1;
        slot_l = slot_l + 1 == STAGES ? 0 : slot_l + 1;
    }
