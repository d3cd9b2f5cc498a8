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
//            48 KiB default; E_local = 1024 needs 139,272 B and the opt-in attribute, or pass 47 KiB
//            and get S = 9). The launcher passes min(4*(34*E_local + 2), max(47 KiB, 4*(3*E_local + 2)))
//            (47, not 48: see "Shared memory" below).
//   Small P (P <= 32*S, i.e. P <= 1024 with 1024 threads and S = 32): one pair per thread, one load
//            each, counts by __match_any_sync per warp, only ceil(P/32)*E_local counters zeroed and
//            scanned, four block barriers. Larger P: two passes over topk_ids (counting, placing), each
//            warp walking its own contiguous segment 256 ids at a time.
//   Limits: P < 2^31; BN >= 1; E_local >= 1.
//   Shared memory: the kernel also has 256 B of static shared memory (warp_sums), and the 48 KiB that
//            needs no opt-in counts static + dynamic: the launcher caps the dynamic size at 47 KiB
//            (48 KiB of dynamic memory fails the launch with CUDA_ERROR_INVALID_VALUE).
//
// ---------------------------------------------------------------------------------------------------
// Multi-block path (large P; same outputs, bit for bit): three launches on the same stream.
//   Chunks: pair c*chunk .. min(P, (c+1)*chunk) belong to chunk c, num_chunks = ceil(P / chunk); any
//            chunk >= 1 works (the launcher: 1024 * ceil(P / (1024 * 256)), so num_chunks <= 256).
//   chunk_counts [num_chunks * E_local] ints of scratch: per-chunk expert counts, then (after
//            sort_scan) each chunk's first position within each expert, absolute in sorted_pair.
// sort_count(topk_ids, P, chunk, expert_start, E_local, chunk_counts)
//   grid num_chunks, any block size (launcher: 256); dyn smem 4 * E_local bytes (a histogram,
//   shared-memory atomics: counts only, order-free). Writes chunk_counts[c*E_local + e].
// sort_scan(chunk_counts, num_chunks, E_local, BN, max_tiles, expert_offsets, tile_expert,
//           tile_row_start, tile_row_end, num_tiles)
//   ONE block of 1024 threads (any multiple of 32 up to 1024). Per expert, the chunks are split into
//   G contiguous groups (G = min(32, max(1, blockDim/E_local), num_chunks, room in smem)): group sums,
//   st_count_scan over (group, expert), expert_offsets and the tile list (as the one-block kernel),
//   then chunk_counts rewritten in place as the chunks' starts. dyn smem >= 4 * (3*E_local + 2) bytes;
//   launcher: 4 * (2*(E_local+1) + max(E_local, min(1024, 32*E_local))) (G = min(32, 1024/E_local)).
// sort_scatter(topk_ids, P, chunk, expert_start, E_local, chunk_starts, sorted_pair, pair_pos)
//   grid num_chunks, same chunk as sort_count; block of any multiple of 32 (launcher: 256). The chunk
//   is split into S contiguous warp segments (S = min(warps, smem/(4*E_local)); dyn smem >=
//   4 * E_local bytes, launcher: 4 * 8 * E_local): per-(segment, expert) counts (smem atomics), cursors
//   = chunk start + counts of the segments before, then each warp walks its segment in ascending
//   order, ranking equal experts within 32 pairs by ballots (stable), and writes sorted_pair / pair_pos
//   (-1 for non-local pairs).
//   The launcher uses this path for P > 4096 and E_local <= 1024 (the one-block kernel otherwise).
// ---------------------------------------------------------------------------------------------------

__device__ __forceinline__ u32 st_dyn_smem_bytes() {
    u32 r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// Tiles of BN positions that `count` pairs fill.
__device__ __forceinline__ int st_tiles(int count, int BN) { return count / BN + (count % BN != 0 ? 1 : 0); }

// Inclusive warp scans of two counters at once.
__device__ __forceinline__ void st_warp_scan2(int& a, int& b, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int va = __shfl_up_sync(0xffffffffu, a, o);
        const int vb = __shfl_up_sync(0xffffffffu, b, o);
        if (lane >= o) {
            a += va;
            b += vb;
        }
    }
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
        lt += st_tiles(run, BN);
    }
    // inclusive warp scans of (lc, lt)
    int ic = lc, it = lt;
    st_warp_scan2(ic, it, lane);
    if (lane == 31) {
        wsum[warp] = ic;
        wsum[32 + warp] = it;
    }
    __syncthreads();
    // every warp scans the warp totals itself (no second barrier)
    const int wc = lane < nw ? wsum[lane] : 0;
    const int wt = lane < nw ? wsum[32 + lane] : 0;
    int wic = wc, wit = wt;
    st_warp_scan2(wic, wit, lane);
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
        rt += st_tiles(c, BN);
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

// Local index of a routed id, or -1.
__device__ __forceinline__ int st_local_key(int id, int expert_start, int E) {
    const int e = id - expert_start;
    return (e >= 0 && e < E) ? e : -1;
}

// The keys of pairs b + 32u + lane (u < 8) of a segment ending at seg_hi (-1: past its end or not local).
__device__ __forceinline__ void st_segment_keys(int key[8], const int* topk_ids, long long b, long long seg_hi,
                                                int lane, int expert_start, int E) {
#pragma unroll
    for (int u = 0; u < 8; ++u) {
        const long long i = b + u * 32 + lane;
        key[u] = i < seg_hi ? st_local_key(topk_ids[i], expert_start, E) : -1;
    }
}

// sort_pairs_by_expert's body for the calling block, in the block's dynamic shared memory `st_smem` (all of
// it: the number of counting segments follows its size, the result does not). Every thread of the block
// must call it; it ends without a barrier (the caller syncs before reusing st_smem).
__device__ __forceinline__ void st_sort_one_block(const int* topk_ids, int P, int expert_start, int E_local,
                                                  int BN, int max_tiles, int* expert_offsets, int* sorted_pair,
                                                  int* pair_pos, int* tile_expert, int* tile_row_start,
                                                  int* tile_row_end, int* num_tiles, int* st_smem) {
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
            st_segment_keys(key, topk_ids, b, seg_hi, lane, expert_start, E);
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
            st_segment_keys(key, topk_ids, b, seg_hi, lane, expert_start, E);
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

extern "C" __global__ void sort_pairs_by_expert(const int* topk_ids, int P, int expert_start, int E_local, int BN,
                                                int max_tiles, int* expert_offsets, int* sorted_pair,
                                                int* pair_pos, int* tile_expert, int* tile_row_start,
                                                int* tile_row_end, int* num_tiles) {
    pdl_wait();  // inputs come from the previous kernel (common.cuh)
    pdl_launch_dependents();
    extern __shared__ __align__(16) int st_smem[];
    st_sort_one_block(topk_ids, P, expert_start, E_local, BN, max_tiles, expert_offsets, sorted_pair, pair_pos,
                      tile_expert, tile_row_start, tile_row_end, num_tiles, st_smem);
}

// ---------------------------------------------------------------------------------------------------
// Multi-block path (see the header).
// ---------------------------------------------------------------------------------------------------

// Pairs per lane per warp step of the multi-block kernels (a warp step covers 32 * SMB_U pairs).
#define SMB_U 4

// Lanes of the warp whose key equals this lane's (keys in [0, 2^nbits)); every lane must call it.
// nbits ballots (cheaper than __match_any_sync for the few bits of an expert index).
__device__ __forceinline__ u32 st_warp_match(int key, int nbits) {
    u32 peers = 0xffffffffu;
    for (int b = 0; b < nbits; ++b) {
        const u32 bal = __ballot_sync(0xffffffffu, (key >> b) & 1);
        peers &= ((key >> b) & 1) ? bal : ~bal;
    }
    return peers;
}

extern "C" __global__ void sort_count(const int* topk_ids, int P, int chunk, int expert_start, int E_local,
                                      int* chunk_counts) {
    pdl_wait();  // topk_ids come from the previous kernel (common.cuh)
    pdl_launch_dependents();
    extern __shared__ __align__(16) int st_smem[];
    const int tid = threadIdx.x, nt = blockDim.x, E = E_local;
    int* hist = st_smem;
    for (int e = tid; e < E; e += nt) hist[e] = 0;
    __syncthreads();
    const long long lo = (long long)blockIdx.x * chunk;
    const long long hi = lo + chunk < (long long)P ? lo + chunk : (long long)P;
    for (long long b = lo; b < hi; b += (long long)nt * SMB_U) {
        int key[SMB_U];
#pragma unroll
        for (int u = 0; u < SMB_U; ++u) {
            const long long i = b + (long long)u * nt + tid;
            key[u] = i < hi ? st_local_key(topk_ids[i], expert_start, E) : -1;
        }
#pragma unroll
        for (int u = 0; u < SMB_U; ++u)
            if (key[u] >= 0) atomicAdd(&hist[key[u]], 1);
    }
    __syncthreads();
    int* out = chunk_counts + (long long)blockIdx.x * E;
    for (int e = tid; e < E; e += nt) out[e] = hist[e];
}

extern "C" __global__ void sort_scan(int* chunk_counts, int num_chunks, int E_local, int BN, int max_tiles,
                                     int* expert_offsets, int* tile_expert, int* tile_row_start, int* tile_row_end,
                                     int* num_tiles) {
    pdl_wait();  // chunk_counts come from sort_count
    pdl_launch_dependents();
    extern __shared__ __align__(16) int st_smem[];
    __shared__ int warp_sums[64];
    const int tid = threadIdx.x, nt = blockDim.x, E = E_local;
    int* offs = st_smem;               // [E+1]
    int* toffs = st_smem + (E + 1);    // [E+1]
    int* part = st_smem + 2 * (E + 1); // [G][E] group sums, then group cursors
    const int words = (int)(st_dyn_smem_bytes() / 4u);
    int G = nt / E;
    G = G > 32 ? 32 : G;
    const int room = (words - 2 * (E + 1)) / E;
    G = G > room ? room : G;
    G = G > num_chunks ? num_chunks : G;
    G = G < 1 ? 1 : G;
    const int L = (num_chunks + G - 1) / G;  // chunks per group
    const int items = G * E;

    // Group sums: item (g, e) adds chunks [g*L, min(num_chunks, (g+1)*L)) of expert e (consecutive
    // threads read consecutive experts of a chunk).
    for (int it = tid; it < items; it += nt) {
        const int g = it / E, e = it - g * E;
        const int c0 = g * L, c1 = c0 + L < num_chunks ? c0 + L : num_chunks;
        const int* col = chunk_counts + e;
        int s = 0;
        int c = c0;
        for (; c + 4 <= c1; c += 4) {
            const int v0 = col[(long long)c * E], v1 = col[(long long)(c + 1) * E];
            const int v2 = col[(long long)(c + 2) * E], v3 = col[(long long)(c + 3) * E];
            s += v0 + v1 + v2 + v3;
        }
        for (; c < c1; ++c) s += col[(long long)c * E];
        part[it] = s;
    }
    __syncthreads();
    st_count_scan(part, G, offs, toffs, E, BN, warp_sums);
    st_write_tiles(offs, toffs, E, BN, max_tiles, expert_offsets, tile_expert, tile_row_start, tile_row_end,
                   num_tiles);
    // Chunk starts, in place: cursor of the group, plus the counts of the chunks before in it.
    for (int it = tid; it < items; it += nt) {
        const int g = it / E, e = it - g * E;
        const int c0 = g * L, c1 = c0 + L < num_chunks ? c0 + L : num_chunks;
        int* col = chunk_counts + e;
        int run = part[it];
        int c = c0;
        for (; c + 4 <= c1; c += 4) {
            const int v0 = col[(long long)c * E], v1 = col[(long long)(c + 1) * E];
            const int v2 = col[(long long)(c + 2) * E], v3 = col[(long long)(c + 3) * E];
            col[(long long)c * E] = run;
            run += v0;
            col[(long long)(c + 1) * E] = run;
            run += v1;
            col[(long long)(c + 2) * E] = run;
            run += v2;
            col[(long long)(c + 3) * E] = run;
            run += v3;
        }
        for (; c < c1; ++c) {
            const int v = col[(long long)c * E];
            col[(long long)c * E] = run;
            run += v;
        }
    }
}

extern "C" __global__ void sort_scatter(const int* topk_ids, int P, int chunk, int expert_start, int E_local,
                                        const int* chunk_starts, int* sorted_pair, int* pair_pos) {
    pdl_wait();  // chunk_starts come from sort_scan
    pdl_launch_dependents();
    extern __shared__ __align__(16) int st_smem[];
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
    const int E = E_local;
    const int words = (int)(st_dyn_smem_bytes() / 4u);
    int S = words / E;
    S = S > nw ? nw : S;
    S = S < 1 ? 1 : S;
    int* cur = st_smem;  // [S][E] per-segment counts, then cursors
    for (int i = tid; i < S * E; i += nt) cur[i] = 0;

    // Warp segment w < S: pairs [lo + w*Lw, min(hi, lo + (w+1)*Lw)), Lw a multiple of the warp step.
    const long long lo = (long long)blockIdx.x * chunk;
    const long long hi = lo + chunk < (long long)P ? lo + chunk : (long long)P;
    const long long step = 32 * SMB_U;
    const long long Lw = ((hi - lo + S - 1) / S + step - 1) / step * step;
    const long long seg_lo = lo + (long long)warp * Lw;
    const long long seg_hi = warp < S ? (seg_lo + Lw < hi ? seg_lo + Lw : hi) : seg_lo;
    __syncthreads();

    // Counts per (segment, expert): order-free, so shared-memory atomics.
    for (long long b = seg_lo; b < seg_hi; b += step) {
        int key[SMB_U];
#pragma unroll
        for (int u = 0; u < SMB_U; ++u) {
            const long long i = b + u * 32 + lane;
            key[u] = i < seg_hi ? st_local_key(topk_ids[i], expert_start, E) : -1;
        }
#pragma unroll
        for (int u = 0; u < SMB_U; ++u)
            if (key[u] >= 0) atomicAdd(&cur[warp * E + key[u]], 1);
    }
    __syncthreads();

    // Cursors: the chunk's start in expert e plus the counts of the segments before.
    const int* starts = chunk_starts + (long long)blockIdx.x * E;
    for (int e = tid; e < E; e += nt) {
        int run = starts[e];
        for (int s = 0; s < S; ++s) {
            const int c = cur[s * E + e];
            cur[s * E + e] = run;
            run += c;
        }
    }
    __syncthreads();

    // Place: ascending pair order within the segment; equal experts within 32 pairs ranked by lane.
    const int nbits = 32 - __clz(E);  // keys 0..E (E = not local)
    const u32 lt_mask = (1u << lane) - 1u;
    int* wcur = cur + warp * E;
    for (long long b = seg_lo; b < seg_hi; b += step) {
        int key[SMB_U];
#pragma unroll
        for (int u = 0; u < SMB_U; ++u) {
            const long long i = b + u * 32 + lane;
            key[u] = i < seg_hi ? st_local_key(topk_ids[i], expert_start, E) : -1;
        }
#pragma unroll
        for (int u = 0; u < SMB_U; ++u) {
            const long long i = b + u * 32 + lane;
            const u32 peers = st_warp_match(key[u] >= 0 ? key[u] : E, nbits);
            int pos = -1;
            if (key[u] >= 0) {
                pos = wcur[key[u]] + __popc(peers & lt_mask);
                sorted_pair[pos] = (int)i;
            }
            if (i < seg_hi) pair_pos[i] = pos;
            __syncwarp();
            if (key[u] >= 0 && (peers & lt_mask) == 0) wcur[key[u]] += __popc(peers);
            __syncwarp();
        }
    }
}
