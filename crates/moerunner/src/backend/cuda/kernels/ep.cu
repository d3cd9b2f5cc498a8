// Expert-parallel dispatch on the device (parallel/device_ep.rs, docs/parallel.md "Device all-to-all"): which
// rank serves each (token, slot), and each token's row packed once per rank that serves any of its slots, with
// that rank's routes for it. The rank's tokens' outputs come back as one partial row per record and are added
// by combine.cu's combine_rows (the records' rows in rank order, weight 1).
//
// The expert map as tables: expert e's replicas are rep_rank[rep_start[e] .. rep_start[e+1]) (ascending ranks;
// one for an unreplicated expert), with the id the serving rank's layer knows it by in rep_id (the same
// index). Global token g picks replica g mod count, as parallel::ExpertMap::rank_for does. Ids outside
// [0, E) (the -1 padding) go nowhere.
//
// ---------------------------------------------------------------------------------------------------
// ep_plan(topk_ids, T, K, E, first_token, rep_start, rep_rank, G, dest_row, send_counts)
//   topk_ids     [T, K] global expert ids of this rank's tokens (global tokens first_token ..)
//   dest_row     [T, G]: the send-buffer row of token t's record for rank d, or -1 when none of its slots goes
//                to d. Records are grouped by destination (rank 0's first), tokens ascending within each.
//   send_counts  [2G]: records per destination, then each destination's first row (exclusive scan).
//   One block of 1024 threads (any multiple of 32 up to 1024); 1 <= G <= 32. Two passes over the tokens in
//   chunks of blockDim: counts (shared atomics: order-free), then positions (warp ballots and per-warp totals,
//   so a record's row depends only on the tokens before it).
//
// ep_pack(hidden, row_bytes, topk_ids, topk_w, T, K, E, first_token, rep_start, rep_rank, rep_id, G, dest_row,
//         send_rows, send_ids, send_w)
//   hidden       [T, row_bytes] the tokens' rows as given (bf16 or f32), copied unchanged
//   send_rows    [rows, row_bytes]; send_ids / send_w [rows, K]: record r's routes for the rank it goes to —
//                slot j's id as that rank knows it when slot j goes there, else -1 with weight 0
//   One block per token (grid-stride), 256 threads: 16-byte copies when row_bytes and both addresses allow,
//   else bytes.
// ---------------------------------------------------------------------------------------------------

// The replica of expert `id` that global token `tok` goes to (an index into rep_rank / rep_id), or -1.
__device__ __forceinline__ int ep_replica(int id, int E, long long tok, const int* rep_start) {
    if (id < 0 || id >= E) return -1;
    const int s = rep_start[id], c = rep_start[id + 1] - s;
    if (c <= 0) return -1;
    return s + (int)(tok % c);
}

// Bit d: some slot of token t goes to rank d.
__device__ __forceinline__ u32 ep_dest_mask(const int* topk_ids, int t, int K, int E, long long tok,
                                            const int* rep_start, const int* rep_rank) {
    u32 m = 0;
    for (int j = 0; j < K; ++j) {
        const int i = ep_replica(topk_ids[(long long)t * K + j], E, tok, rep_start);
        if (i >= 0) m |= 1u << rep_rank[i];
    }
    return m;
}

extern "C" __global__ void ep_plan(const int* topk_ids, int T, int K, int E, long long first_token,
                                   const int* rep_start, const int* rep_rank, int G, int* dest_row,
                                   int* send_counts) {
    pdl_wait();  // the routes may come from the previous kernel (common.cuh)
    pdl_launch_dependents();
    __shared__ int counts[32];
    __shared__ int base[32];
    __shared__ int warp_total[32][32];  // [destination][warp] records of one chunk
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    const u32 lt_mask = (1u << lane) - 1u;
    if (tid < 32) counts[tid] = 0;
    __syncthreads();
    // Pass 1: records per destination.
    for (int c0 = 0; c0 < T; c0 += blockDim.x) {
        const int t = c0 + tid;
        const u32 m = t < T ? ep_dest_mask(topk_ids, t, K, E, first_token + t, rep_start, rep_rank) : 0u;
        for (int d = 0; d < G; ++d) {
            const u32 bal = __ballot_sync(0xffffffffu, (m >> d) & 1u);
            if (lane == 0 && bal != 0) atomicAdd(&counts[d], __popc(bal));
        }
    }
    __syncthreads();
    if (tid == 0) {
        int run = 0;
        for (int d = 0; d < G; ++d) {
            base[d] = run;
            send_counts[d] = counts[d];
            send_counts[G + d] = run;
            run += counts[d];
        }
    }
    __syncthreads();
    // Pass 2: each record's row, tokens ascending within a destination.
    for (int c0 = 0; c0 < T; c0 += blockDim.x) {
        const int t = c0 + tid;
        const u32 m = t < T ? ep_dest_mask(topk_ids, t, K, E, first_token + t, rep_start, rep_rank) : 0u;
        u32 bal[32];
        for (int d = 0; d < G; ++d) {
            bal[d] = __ballot_sync(0xffffffffu, (m >> d) & 1u);
            if (lane == 0) warp_total[d][warp] = __popc(bal[d]);
        }
        __syncthreads();
        for (int d = 0; d < G; ++d) {
            if (t < T) {
                int row = -1;
                if ((m >> d) & 1u) {
                    int before = base[d];
                    for (int w = 0; w < warp; ++w) before += warp_total[d][w];
                    row = before + __popc(bal[d] & lt_mask);
                }
                dest_row[(long long)t * G + d] = row;
            }
        }
        __syncthreads();  // every thread has read base and warp_total
        if (tid < G) {
            int chunk = 0;
            for (int w = 0; w < nw; ++w) chunk += warp_total[tid][w];
            base[tid] += chunk;
        }
        __syncthreads();
    }
}

extern "C" __global__ void ep_pack(const void* hidden, int row_bytes, const int* topk_ids, const float* topk_w,
                                   int T, int K, int E, long long first_token, const int* rep_start,
                                   const int* rep_rank, const int* rep_id, int G, const int* dest_row,
                                   void* send_rows, int* send_ids, float* send_w) {
    pdl_wait();  // dest_row comes from ep_plan
    pdl_launch_dependents();
    const bool vec = (row_bytes % 16 == 0) && (((unsigned long long)hidden & 15ull) == 0) &&
                     (((unsigned long long)send_rows & 15ull) == 0);
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        const long long tok = first_token + t;
        const unsigned char* src = (const unsigned char*)hidden + (long long)t * row_bytes;
        for (int d = 0; d < G; ++d) {
            const int r = dest_row[(long long)t * G + d];
            if (r < 0) continue;
            unsigned char* dst = (unsigned char*)send_rows + (long long)r * row_bytes;
            if (vec) {
                for (int i = threadIdx.x; i < row_bytes / 16; i += blockDim.x)
                    ((uint4*)dst)[i] = ((const uint4*)src)[i];
            } else {
                for (int i = threadIdx.x; i < row_bytes; i += blockDim.x) dst[i] = src[i];
            }
            for (int j = threadIdx.x; j < K; j += blockDim.x) {
                const long long at = (long long)t * K + j;
                const int i = ep_replica(topk_ids[at], E, tok, rep_start);
                const bool here = i >= 0 && rep_rank[i] == d;
                send_ids[(long long)r * K + j] = here ? rep_id[i] : -1;
                send_w[(long long)r * K + j] = here ? topk_w[at] : 0.0f;
            }
        }
    }
}
