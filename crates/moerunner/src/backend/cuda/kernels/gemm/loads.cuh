// One pipeline stage's loads, a fragment of a kernel body (included before the main loop): a BM x 128-byte weight
// tile (rows m_base.. of expert e, contiguous; a dense GEMM: e = 0) and a BN x 128-byte activation tile whose
// rows are gathered (s_row: each tile column's row, -1 = missing: zero-filled, nothing read), plus the weight
// format's scales of the step (Fmt::StageScales). Loader thread ltid owns 16-byte chunk (ltid & 7) of rows
// (ltid >> 3) + i * MG_LDT/8, so each thread's addresses are computed once.
//   reads     w, act, w_scale, act_scale, e, Mp, m_base, Kp, ESZ (element bytes), s_row, smem, ltid, Fmt
//   declares  kbytes, nk (128-byte K steps), smem_al, sW, sA, sS (stage 0's tiles and scales), scales, and
//             load_stage(slot, ks): the cp.async of K step ks into stage `slot` (not committed)
//
// Shared memory per stage: the weight tile, then the activation tile (then, after all stages' tiles, the scales);
// each 128-byte row holds eight 16-byte chunks, chunk c of row r stored at chunk slot c ^ (r & 7) (XOR swizzle),
// so the 8 row addresses of every ldmatrix phase hit 8 distinct 16-byte bank groups, and so do the cp.async
// writes. With 1024-byte aligned tiles this IS wgmma's 128-byte swizzle atom (8 rows x 128 bytes), which its
// descriptors read directly. One K step = 128 bytes = 64 bf16 or 128 e4m3 = 4 MMA k-sub-steps of 32 bytes.
// (A fragment, not a function, for the reason the main loops are: moe_gemm.cu.)

    // ---- loader setup: thread owns chunk (tid & 7) of rows (tid >> 3) + i * NTHREADS/8
    const long long kbytes = (long long)Kp * ESZ;  // bytes per row
    const int nk = (int)(kbytes >> 7);                // 128-byte K steps
    const int ld_c = ltid & 7;
    const int ld_r = ltid >> 3;
    constexpr int ROWS_PER_PASS = MG_LDT / 8;         // a multiple of 8: the swizzle is the same each pass
    const u32 swz = (u32)(((ld_c ^ (ld_r & 7)) << 4));

    // wgmma: operand tiles must sit on 1024-byte boundaries (128B swizzle atoms): round the base up (slack in
    // MG_SMEM_BYTES)
    u8* const smem_al = MG_WGMMA ? smem + ((((mg_smem_addr(smem) + 1023u) & ~1023u)) - mg_smem_addr(smem)) : smem;
    const u32 sW = mg_smem_addr(smem_al);
    const u32 sA = sW + STAGES * MG_SW_BYTES;
    const u32 sS = sA + STAGES * MG_SA_BYTES;  // the stages' scales (a format that loads some)

    constexpr int WCH = BM * 8 / MG_LDT;
    const u8* wsrc = w + ((long long)e * Mp + m_base + ld_r) * kbytes + ld_c * 16;
    const long long wpass = (long long)ROWS_PER_PASS * kbytes;
    const u32 wdst = (u32)(ld_r * 128) + swz;

    constexpr int ACH = (BN * 8 + MG_LDT - 1) / MG_LDT;
    const u8* asrc[ACH];
    u32 asz[ACH];
#pragma unroll
    for (int i = 0; i < ACH; ++i) {
        const int n = ld_r + i * ROWS_PER_PASS;
        const int r = n < BN ? s_row[n] : -1;
        asrc[i] = r >= 0 ? act + (long long)r * kbytes + ld_c * 16 : act;
        asz[i] = r >= 0 ? 16u : 0u;
    }

    typename Fmt::StageScales scales;  // what a K step loads beside its operand tiles (the weight format's)
    scales.init(ltid, w_scale, act_scale, e, Mp, m_base, Kp, s_row);

    auto load_stage = [&](int slot, int ks) {
        const long long koff = (long long)ks * 128;
        const u32 dW = sW + slot * MG_SW_BYTES + wdst;
#pragma unroll
        for (int i = 0; i < WCH; ++i) mg_cp16(dW + i * ROWS_PER_PASS * 128, wsrc + koff + i * wpass);
        const u32 dA = sA + slot * MG_SA_BYTES + (u32)(ld_r * 128) + swz;
#pragma unroll
        for (int i = 0; i < ACH; ++i) {
            if ((BN * 8) % MG_NTHREADS == 0 || ld_r + i * ROWS_PER_PASS < BN)
                mg_cp16z(dA + i * ROWS_PER_PASS * 128, asz[i] ? asrc[i] + koff : asrc[i], asz[i]);
        }
        scales.load(sS, slot, ks, ltid);
    };
