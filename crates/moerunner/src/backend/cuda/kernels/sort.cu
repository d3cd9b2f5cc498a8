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
//            and get S = 9).
//   Limits: P < 2^31; BN >= 1; E_local >= 1. Cost: two passes over topk_ids (counting, placing),
//            each warp walking its own contiguous segment 256 ids at a time; P <= 8192 takes a few µs.
// ---------------------------------------------------------------------------------------------------

__device__ __forceinline__ u32 st_dyn_smem_bytes() {
    u32 r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// In-place exclusive scan of a[0..n) by the whole block; a[n] = total. All threads must call it.
__device__ void st_block_exclusive_scan(int* a, int n, int* warp_sums) {
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
    const int per = (n + nt - 1) / nt;
    const int lo = min(n, tid * per), hi = min(n, lo + per);
    int local = 0;
    for (int i = lo; i < hi; ++i) local += a[i];
    // inclusive warp scan of `local`
    int incl = local;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int ws = lane < nw ? warp_sums[lane] : 0;
        int wi = ws;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int v = __shfl_up_sync(0xffffffffu, wi, o);
            if (lane >= o) wi += v;
        }
        if (lane < nw) warp_sums[lane] = wi - ws;  // exclusive warp prefix
        if (lane == 31) warp_sums[32] = wi;        // total
    }
    __syncthreads();
    int run = warp_sums[warp] + incl - local;
    for (int i = lo; i < hi; ++i) {
        const int c = a[i];
        a[i] = run;
        run += c;
    }
    if (tid == 0) a[n] = warp_sums[32];
    __syncthreads();
}

extern "C" __global__ void sort_pairs_by_expert(const int* topk_ids, int P, int expert_start, int E_local, int BN,
                                                int max_tiles, int* expert_offsets, int* sorted_pair,
                                                int* pair_pos, int* tile_expert, int* tile_row_start,
                                                int* tile_row_end, int* num_tiles) {
    pdl_wait();  // inputs come from the previous kernel (common.cuh)
    pdl_launch_dependents();
    extern __shared__ __align__(16) int st_smem[];
    __shared__ int warp_sums[33];
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

    for (int i = tid; i < S * E; i += nt) seg[i] = 0;
    __syncthreads();

    // Segment s = pairs [s*L, min(P, (s+1)*L)), L a multiple of 256 (8 batches of 32 per step).
    const long long per_seg = ((long long)P + S - 1) / S;
    const long long L = (per_seg + 255) / 256 * 256;
    const long long seg_lo = (long long)warp * L;
    const long long seg_hi = warp < S ? (seg_lo + L < P ? seg_lo + L : (long long)P) : 0;
    const u32 lt_mask = (1u << lane) - 1u;

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

    // Per expert: exclusive scan over segments (segment cursors relative to the expert), counts.
    for (int e = tid; e < E; e += nt) {
        int run = 0;
        for (int s = 0; s < S; ++s) {
            const int c = seg[s * E + e];
            seg[s * E + e] = run;
            run += c;
        }
        offs[e] = run;
        toffs[e] = (run + BN - 1) / BN;
    }
    __syncthreads();
    st_block_exclusive_scan(offs, E, warp_sums);
    st_block_exclusive_scan(toffs, E, warp_sums);

    for (int e = tid; e <= E; e += nt) expert_offsets[e] = offs[e];
    for (int i = tid; i < S * E; i += nt) seg[i] += offs[i % E];
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
    __syncthreads();

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
