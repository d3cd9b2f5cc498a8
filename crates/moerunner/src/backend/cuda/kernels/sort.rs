//! Launchers of `sort.cu`: the (token, slot) pairs grouped by local expert (a stable counting
//! sort), each pair's position, and the GEMM work list (per expert, tiles of BN rows). Up to
//! [`MULTI_MIN_PAIRS`] pairs one block does it all; above, three kernels: per-chunk counts, one scan
//! block, per-chunk stable scatter.

use super::{kernel_args, In, Out, Shape};

kernel_args! {
    /// The whole sort in one block of 1024 threads.
    pub struct SortPairsByExpert for Sort::"sort_pairs_by_expert", pdl = true {
        /// [P] expert id of each pair (non-local ids and -1 are skipped).
        topk_ids: In<i32>,
        P: i32,
        expert_start: i32,
        E_local: i32,
        BN: i32,
        max_tiles: i32,
        /// [E_local + 1]
        expert_offsets: Out<i32>,
        /// [P] pair index at each sorted position.
        sorted_pair: Out<i32>,
        /// [P] sorted position of each pair (-1: not local).
        pair_pos: Out<i32>,
        /// [max_tiles] each.
        tile_expert: Out<i32>,
        tile_row_start: Out<i32>,
        tile_row_end: Out<i32>,
        /// [1]
        num_tiles: Out<i32>,
    }
}

kernel_args! {
    /// Per-chunk expert counts (large P).
    pub struct SortCount for Sort::"sort_count", pdl = true {
        topk_ids: In<i32>,
        P: i32,
        chunk: i32,
        expert_start: i32,
        E_local: i32,
        /// [num_chunks, E_local]
        chunk_counts: Out<i32>,
    }
}

kernel_args! {
    /// One block: expert offsets, the tile list, and each chunk's start per expert (in place).
    pub struct SortScan for Sort::"sort_scan", pdl = true {
        /// [num_chunks, E_local] counts in, chunk starts out.
        chunk_counts: Out<i32>,
        num_chunks: i32,
        E_local: i32,
        BN: i32,
        max_tiles: i32,
        expert_offsets: Out<i32>,
        tile_expert: Out<i32>,
        tile_row_start: Out<i32>,
        tile_row_end: Out<i32>,
        num_tiles: Out<i32>,
    }
}

kernel_args! {
    /// Per-chunk stable scatter of the pairs to their sorted positions.
    pub struct SortScatter for Sort::"sort_scatter", pdl = true {
        topk_ids: In<i32>,
        P: i32,
        chunk: i32,
        expert_start: i32,
        E_local: i32,
        chunk_starts: In<i32>,
        sorted_pair: Out<i32>,
        pair_pos: Out<i32>,
    }
}

/// Dynamic shared memory the sort kernels may ask for without the opt-in attribute: the 48 KiB
/// default counts static memory too (256 B in sort_pairs_by_expert / sort_scan), so 47 KiB.
pub const SMEM_CAP: usize = 47 * 1024;
/// Pairs above which the sort runs as three multi-block kernels (sort_count, sort_scan,
/// sort_scatter); at or below, the one-block kernel (its small-P path is what decode needs).
pub const MULTI_MIN_PAIRS: usize = 4096;
/// Largest local expert count of the multi-block path (sort_scatter's 8 warp segments of
/// 4 * E_local bytes each stay within 32 KiB of shared memory).
pub const MULTI_MAX_EXPERTS: usize = 1024;
/// Pairs per sort_count / sort_scatter block at most chunks (the chunk grows past that, in steps of
/// CHUNK, so the one-block scan reads at most MAX_CHUNKS * E_local counts).
const CHUNK: usize = 1024;
const MAX_CHUNKS: usize = 256;
const BLOCK: u32 = 256;
const SEGMENTS: usize = 8; // = BLOCK / 32

/// sort_pairs_by_expert: one block of 1024; 32 counting segments when they fit under the cap (the
/// kernel takes its one-pair-per-thread path when P <= 32 * segments).
pub fn one_block_shape(experts: usize) -> Shape {
    let full = 4 * (34 * experts + 2);
    let min = 4 * (3 * experts + 2);
    Shape {
        grid: (1, 1, 1),
        block: 1024,
        smem: full.min(SMEM_CAP.max(min)) as u32,
        pdl: true,
    }
}

pub fn multi_block(pairs: usize, experts: usize) -> bool {
    pairs > MULTI_MIN_PAIRS && experts <= MULTI_MAX_EXPERTS
}

/// (chunk, num_chunks) for P pairs (P >= 1): chunk = CHUNK * ceil(P / (CHUNK * MAX_CHUNKS)),
/// num_chunks = ceil(P / chunk) <= min(MAX_CHUNKS, ceil(P / CHUNK)).
pub fn chunks(pairs: usize) -> (usize, usize) {
    let p = pairs.max(1);
    let chunk = CHUNK * p.div_ceil(CHUNK * MAX_CHUNKS);
    (chunk, p.div_ceil(chunk))
}

/// Ints of the chunk-count scratch for up to `pairs` pairs (the bound of `chunks` is monotone in
/// P, so a workspace sized for its capacity fits every smaller call); 0 when only the one-block
/// kernel can run.
pub fn scratch_ints(pairs: usize, experts: usize) -> usize {
    if !multi_block(pairs, experts) {
        return 0;
    }
    MAX_CHUNKS.min(pairs.div_ceil(CHUNK)) * experts
}

/// sort_count: one block of 256 per chunk, a histogram of E_local ints.
pub fn count_shape(pairs: usize, experts: usize) -> Shape {
    Shape {
        grid: (chunks(pairs).1 as u32, 1, 1),
        block: BLOCK,
        smem: (4 * experts) as u32,
        pdl: true,
    }
}

/// sort_scan: one block of 1024; 2*(E+1) ints plus G = min(32, 1024/E) groups of E.
pub fn scan_shape(experts: usize) -> Shape {
    let groups = experts.max((32 * experts).min(1024));
    Shape {
        grid: (1, 1, 1),
        block: 1024,
        smem: (4 * (2 * (experts + 1) + groups)) as u32,
        pdl: true,
    }
}

/// sort_scatter: same grid as sort_count, 8 warp segments of E_local cursors each.
pub fn scatter_shape(pairs: usize, experts: usize) -> Shape {
    Shape {
        grid: (chunks(pairs).1 as u32, 1, 1),
        block: BLOCK,
        smem: (4 * SEGMENTS * experts) as u32,
        pdl: true,
    }
}
