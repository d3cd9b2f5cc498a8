// Grouping of (token, slot) pairs by local expert, and the GEMM tile list. Deterministic: within an
// expert, pairs are listed in ascending pair index (a stable counting sort), whatever the launch.
//
// ---------------------------------------------------------------------------------------------------
// sort_pairs_by_expert(topk_ids, P, expert_start, E_local, BN, max_tiles, expert_offsets,
//                      sorted_pair, pair_pos, tile_expert, tile_row_start, tile_row_end, num_tiles)
//   topk_ids [P] (P = T*K): pair i is local iff 0 <= topk_ids[i] - expert_start < E_local; other ids
//            (-1 padding, other ranks' experts, anything out of range) are skipped.
//   expert_offsets [E_local+1]: exclusive scan of the per-expert counts; [E_local] = local pairs.
//   sorted_pair [P]: sorted_pair[offsets[e] .. offsets[e+1]) = pair indices of local expert e,
//            ascending; entries past offsets[E_local] are left untouched.
//   pair_pos [P]: position of pair i in sorted_pair, or -1 when it is not local.
//   tiles: for each local expert e ascending, ceil(count_e / BN) tiles
//            tile_expert = e (LOCAL index), tile_row_start = offsets[e] + m*BN,
//            tile_row_end = min(start + BN, offsets[e+1])   (absolute positions in sorted_pair);
//            num_tiles[0] = total (clamped to max_tiles; ceil(P/BN) + E_local always suffices).
//   Launch: ONE block, 1024 threads (any multiple of 32 up to 1024 works; fewer is slower).
//   dyn smem bytes = 4 * (2*(E_local + 1) + S*E_local), S in [1, 32] = number of segments counted in
//            parallel (one warp each). The kernel reads its dynamic smem size and uses
//            S = min(32, warps, (smem/4 - 2*(E_local+1)) / E_local), so any size >= 4*(3*E_local + 2)
//            works. Fastest: S = 32, i.e. 4*(34*E_local + 2) bytes (E_local = 256: 34,824 B, under the
//            48 KiB default; E_local = 1024 needs 139,272 B and the opt-in attribute, or pass 48 KiB
//            and get S = 9). The launcher passes min(4*(34*E_local + 2), max(48 KiB, 4*(3*E_local + 2))).
//   Small P (P <= 32*S, i.e. P <= 1024 with 1024 threads and S = 32): one pair per thread, one load
//            each, counts by __match_any_sync per warp, only ceil(P/32)*E_local counters zeroed and
//            scanned, four block barriers. Larger P: two passes over topk_ids (counting, placing), each
//            warp walking its own contiguous segment 256 ids at a time.
//   Limits: P < 2^31; BN >= 1; E_local >= 1.
// ---------------------------------------------------------------------------------------------------

__device__ __forceinline__ u32 st_dyn_smem_bytes() {
    u32 r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// Per expert e (all threads; the caller has synchronized after writing seg): seg[s*E + e] for
// s < nseg (the counts of segment s) becomes the absolute cursor of segment s in sorted_pair
// (offs[e] + counts of e in the segments before s); offs[e] / toffs[e] = exclusive scans of the
// expert counts / tile counts ceil(count/BN); offs[E] / toffs[E] = totals. Each thread owns a
// contiguous run of experts (one when E <= blockDim.x); two __syncthreads (the last one ends it).
__device__ void st_count_scan(int* seg, int nseg, int* offs, int* toffs, int E, int BN, int* wsum) {
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
    const int per = (E + nt - 1) / nt;
    const int lo = min(E, tid * per), hi = min(E, lo + per);
    int lc = 0, lt = 0;
    for (int e = lo; e < hi; ++e) {
        int run = 0;
        for (int s = 0; s < nseg; ++s) {
            const int c = seg[s * E + e];
            seg[s * E + e] = run;
            run += c;
        }
        offs[e] = run;
        lc += run;
        lt += run / BN + (run % BN != 0 ? 1 : 0);
    }
    // inclusive warp scans of (lc, lt)
    int ic = lc, it = lt;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int vc = __shfl_up_sync(0xffffffffu, ic, o);
        const int vt = __shfl_up_sync(0xffffffffu, it, o);
        if (lane >= o) {
            ic += vc;
            it += vt;
        }
    }
    if (lane == 31) {
        wsum[warp] = ic;
        wsum[32 + warp] = it;
    }
    __syncthreads();
    // every warp scans the warp totals itself (no second barrier)
    const int wc = lane < nw ? wsum[lane] : 0;
    const int wt = lane < nw ? wsum[32 + lane] : 0;
    int wic = wc, wit = wt;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int vc = __shfl_up_sync(0xffffffffu, wic, o);
        const int vt = __shfl_up_sync(0xffffffffu, wit, o);
        if (lane >= o) {
            wic += vc;
            wit += vt;
        }
    }
    const int base_c = __shfl_sync(0xffffffffu, wic - wc, warp);
    const int base_t = __shfl_sync(0xffffffffu, wit - wt, warp);
    const int tot_c = __shfl_sync(0xffffffffu, wic, 31);
    const int tot_t = __shfl_sync(0xffffffffu, wit, 31);
    int rc = base_c + ic - lc, rt = base_t + it - lt;
    for (int e = lo; e < hi; ++e) {
        const int c = offs[e];
        offs[e] = rc;
        toffs[e] = rt;
        for (int s = 0; s < nseg; ++s) seg[s * E + e] += rc;
        rc += c;
        rt += c / BN + (c % BN != 0 ? 1 : 0);
    }
    if (tid == 0) {
        offs[E] = tot_c;
        toffs[E] = tot_t;
    }
    __syncthreads();
}

// expert_offsets, num_tiles and the tile list, from offs/toffs (after st_count_scan). No barrier.
__device__ __forceinline__ void st_write_tiles(const int* offs, const int* toffs, int E, int BN, int max_tiles,
                                               int* expert_offsets, int* tile_expert, int* tile_row_start,
                                               int* tile_row_end, int* num_tiles) {
    const int tid = threadIdx.x, nt = blockDim.x;
    for (int e = tid; e <= E; e += nt) expert_offsets[e] = offs[e];
    const int total_tiles = toffs[E];
    const int n_tiles = total_tiles < max_tiles ? total_tiles : max_tiles;
    if (tid == 0) num_tiles[0] = n_tiles;
    for (int x = tid; x < n_tiles; x += nt) {
        // expert e with toffs[e] <= x < toffs[e+1]: the last e with toffs[e] <= x
        int lo = 0, hi = E - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (toffs[mid] <= x) lo = mid;
            else hi = mid - 1;
        }
        const int start = offs[lo] + (x - toffs[lo]) * BN;
        const int end_e = offs[lo + 1];
        tile_expert[x] = lo;
        tile_row_start[x] = start;
        tile_row_end[x] = start + BN < end_e ? start + BN : end_e;
    }
}

extern "C" __global__ void sort_pairs_by_expert(const int* topk_ids, int P, int expert_start, int E_local, int BN,
                                                int max_tiles, int* expert_offsets, int* sorted_pair,
                                                int* pair_pos, int* tile_expert, int* tile_row_start,
                                                int* tile_row_end, int* num_tiles) {
    pdl_wait();  // inputs come from the previous kernel (common.cuh)
    pdl_launch_dependents();
    extern __shared__ __align__(16) int st_smem[];
    __shared__ int warp_sums[64];
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
    const int E = E_local;
    int* offs = st_smem;              // [E+1] counts, then offsets
    int* toffs = st_smem + (E + 1);   // [E+1] tiles per expert, then tile offsets
    int* seg = st_smem + 2 * (E + 1); // [S][E] per-segment counts, then per-segment cursors
    const int words = (int)(st_dyn_smem_bytes() / 4u);
    int S = (words - 2 * (E + 1)) / E;
    S = S < 1 ? 1 : S;
    S = S > 32 ? 32 : S;
    S = S > nw ? nw : S;

    const u32 lt_mask = (1u << lane) - 1u;

    // Small P (P <= 32 * S, e.g. decode): one pair per thread, warp w = segment w. Counts by
    // __match_any_sync, so within an expert the order is (warp, lane) = ascending pair index.
    const int nwp = (P + 31) >> 5;  // warps that hold pairs
    if (nwp <= S) {
        int key = -1;
        if (tid < P) {
            const int e = topk_ids[tid] - expert_start;
            key = (e >= 0 && e < E) ? e : -1;
        }
        for (int i = tid; i < nwp * E; i += nt) seg[i] = 0;
        __syncthreads();
        u32 peers = 0;
        if (warp < nwp) {
            peers = __match_any_sync(0xffffffffu, key);
            if (key >= 0 && (peers & lt_mask) == 0) seg[warp * E + key] = __popc(peers);
        }
        __syncthreads();
        st_count_scan(seg, nwp, offs, toffs, E, BN, warp_sums);
        st_write_tiles(offs, toffs, E, BN, max_tiles, expert_offsets, tile_expert, tile_row_start, tile_row_end,
                       num_tiles);
        if (tid < P) {
            int pos = -1;
            if (key >= 0) {
                pos = seg[warp * E + key] + __popc(peers & lt_mask);
                sorted_pair[pos] = tid;
            }
            pair_pos[tid] = pos;
        }
        return;
    }

    for (int i = tid; i < S * E; i += nt) seg[i] = 0;
    __syncthreads();

    // Segment s = pairs [s*L, min(P, (s+1)*L)), L a multiple of 256 (8 batches of 32 per step).
    const long long per_seg = ((long long)P + S - 1) / S;
    const long long L = (per_seg + 255) / 256 * 256;
    const long long seg_lo = (long long)warp * L;
    const long long seg_hi = warp < S ? (seg_lo + L < P ? seg_lo + L : (long long)P) : 0;

    // Pass A: per-segment, per-expert counts.
    if (warp < S) {
        for (long long b = seg_lo; b < seg_hi; b += 256) {
            int key[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const long long i = b + u * 32 + lane;
                const int e = i < seg_hi ? topk_ids[i] - expert_start : -1;
                key[u] = (e >= 0 && e < E) ? e : -1;
            }
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const u32 peers = __match_any_sync(0xffffffffu, key[u]);
                if (key[u] >= 0 && (peers & lt_mask) == 0) seg[warp * E + key[u]] += __popc(peers);
                __syncwarp();
            }
        }
    }
    __syncthreads();

    // Segment cursors, expert offsets and tile offsets; then the tile list.
    st_count_scan(seg, S, offs, toffs, E, BN, warp_sums);
    st_write_tiles(offs, toffs, E, BN, max_tiles, expert_offsets, tile_expert, tile_row_start, tile_row_end,
                   num_tiles);

    // Pass B: place each pair (same walk as pass A, so order within an expert = pair index order).
    if (warp < S) {
        for (long long b = seg_lo; b < seg_hi; b += 256) {
            int key[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const long long i = b + u * 32 + lane;
                const int e = i < seg_hi ? topk_ids[i] - expert_start : -1;
                key[u] = (e >= 0 && e < E) ? e : -1;
            }
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const long long i = b + u * 32 + lane;
                const u32 peers = __match_any_sync(0xffffffffu, key[u]);
                int pos = -1;
                if (key[u] >= 0) {
                    pos = seg[warp * E + key[u]] + __popc(peers & lt_mask);
                    sorted_pair[pos] = (int)i;
                }
                if (i < seg_hi) pair_pos[i] = pos;
                __syncwarp();
                if (key[u] >= 0 && (peers & lt_mask) == 0) seg[warp * E + key[u]] += __popc(peers);
                __syncwarp();
            }
        }
    }
}
