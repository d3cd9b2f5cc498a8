// One pipeline stage's loads for the decoded formats (MAINLOOP_WGMMA_RS), a fragment of a kernel body (included
// by gemm/mainloop_wgmma_rs.cuh): the BM rows of one 64-element K step of the tiled weights (element bytes, then
// scale bytes: gemm/scale_decoded.cuh), copied as they lie, and the BN x 128-byte bf16 activation tile, gathered,
// zero-filled and swizzled exactly as gemm/loads.cuh does (wgmma reads it through descriptors, so the activation
// tiles come first in shared memory, 1024-byte aligned; the weight tiles, read by ordinary loads, follow).
//   reads     w, act, e, Mp, m_base, Kp, s_row, smem, ltid, Fmt
//   declares  nk (64-element K steps), smem_al, sA, sW (stage 0's tiles), sWp (sW as a pointer), and
//             load_stage(slot, ks): the cp.async of K step ks into stage `slot` (not committed)

    const int nk = Kp >> 6;  // Kp is a multiple of 128
    u8* const smem_al = smem + ((((mg_smem_addr(smem) + 1023u) & ~1023u)) - mg_smem_addr(smem));
    const u32 sA = mg_smem_addr(smem_al);
    const u32 sW = sA + STAGES * MG_SA_BYTES;
    const u8* const sWp = smem_al + STAGES * MG_SA_BYTES;

    // ---- weights: the CTA's BM rows sit at row roff of their 128-row tile; a K step of the tile is TSTEP bytes
    constexpr int WB = Fmt::W_ROW_BYTES, SB = Fmt::S_ROW_BYTES;
    constexpr long long TSTEP = 128ll * (WB + SB);
    const u8* const wtile = w + ((long long)e * (Mp >> 7) + (m_base >> 7)) * nk * TSTEP;
    const int roff = m_base & 127;
    constexpr int ECH = BM * WB / 16, SCH = BM * SB / 16;  // 16-byte chunks of a stage: elements, then scales
    constexpr int WPASS = (ECH + SCH + MG_LDT - 1) / MG_LDT;
    static_assert((BM * WB) % 16 == 0 && (BM * SB) % 16 == 0, "decoded weight tiles are 16-byte chunks");
    int woff[WPASS];  // chunk ltid + i * MG_LDT: its offset in a K step of the tile (-1: none)
#pragma unroll
    for (int i = 0; i < WPASS; ++i) {
        const int c = ltid + i * MG_LDT;
        woff[i] = c < ECH ? roff * WB + 16 * c : (c < ECH + SCH ? 128 * WB + roff * SB + 16 * (c - ECH) : -1);
    }

    // ---- activations: bf16 rows of Kp, 128 bytes (64 elements) a step (as gemm/loads.cuh)
    const long long kbytes = (long long)Kp * 2;
    const int ld_c = ltid & 7;
    const int ld_r = ltid >> 3;
    constexpr int ROWS_PER_PASS = MG_LDT / 8;
    const u32 swz = (u32)(((ld_c ^ (ld_r & 7)) << 4));
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

    auto load_stage = [&](int slot, int ks) {
        const u8* src = wtile + ks * TSTEP;
        const u32 dW = sW + slot * MG_SW_BYTES;
#pragma unroll
        for (int i = 0; i < WPASS; ++i) {
            if (woff[i] >= 0) mg_cp16(dW + 16 * (ltid + i * MG_LDT), src + woff[i]);
        }
        const long long koff = (long long)ks * 128;
        const u32 dA = sA + slot * MG_SA_BYTES + (u32)(ld_r * 128) + swz;
#pragma unroll
        for (int i = 0; i < ACH; ++i) {
            if ((BN * 8) % MG_LDT == 0 || ld_r + i * ROWS_PER_PASS < BN)
                mg_cp16z(dA + i * ROWS_PER_PASS * 128, asz[i] ? asrc[i] + koff : asrc[i], asz[i]);
        }
    };
