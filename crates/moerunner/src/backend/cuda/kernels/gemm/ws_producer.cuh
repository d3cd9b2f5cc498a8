// The producer warpgroup of the warp-specialised main loops (gemm/mainloop_wgmma_ws.cuh, and
// gemm/mainloop_wgmma_rs.cuh's warp-specialised form), a fragment of a kernel body: warpgroup 2 (warps MG_NWARPS
// and up) gives back registers (setmaxnreg.dec to WG_WS_PREGS), loads every K step into the ring of STAGES slots
// through load_stage (cp.async, MG_LDT = 128 loader threads), signals full[s] one arrival per warp once its
// groups landed and were fenced for the async proxy, waits for empty[s] before refilling a slot, and returns.
//   reads  warp, lane, nk, load_stage, bar_full, bar_empty

    if (warp >= MG_NWARPS) {
        mg_setmaxnreg_dec<WG_WS_PREGS>();
        int slot_i = 0;  // slot of the step loaded next
        u32 ph_i = 0;    // parity of its use count (n = j / STAGES): wait for empty phase n - 1
        // iteration j: signal step j - LAG (its group landed), then load step j. Step j needs the release of
        // step j - STAGES, which the consumers give after issuing step j - STAGES + 1, signalled at iteration
        // j - STAGES + 1 + LAG = j - 1 (no deadlock for LAG <= STAGES - 1; the consumers hold two slots, so
        // at most STAGES - 2 can be loading anyway)
        constexpr int LAG = STAGES - 2;
        int slot_s = 0;  // slot of the step signalled next
        for (int j = 0; j < nk + LAG; ++j) {
            if (j >= LAG) {
                mg_cp_wait<LAG - 1>();  // this thread's group j - LAG has landed (j groups committed) ...
                mg_fence_proxy_async();  // ... and is visible to the async proxy ...
                __syncwarp();            // ... for the whole warp; lane 0 arrives for it
                mg_mbar_arrive_if(bar_full + 8 * slot_s, lane == 0);
                slot_s = slot_s + 1 == STAGES ? 0 : slot_s + 1;
            }
            if (j < nk) {
                if (j >= STAGES) mg_mbar_wait(bar_empty + 8 * slot_i, ph_i ^ 1u);
                load_stage(slot_i, j);
            }
            mg_cp_commit();  // (empty groups in the tail keep the group count uniform)
            slot_i = slot_i + 1 == STAGES ? 0 : slot_i + 1;
            ph_i ^= (u32)(slot_i == 0);
        }
        return;
    }
