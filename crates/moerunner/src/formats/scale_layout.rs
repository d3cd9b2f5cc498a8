//! Scale layouts: linear (canonical, what files store) and the 128×4 swizzle read by Blackwell
//! block-scaled MMA and FlashInfer kernels (`spec/formats.md`, "Scale layouts").

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Offset of (row m, block j) in the swizzled layout with `blocks_padded` blocks per row.
pub fn swizzled_offset(m: usize, j: usize, blocks_padded: usize) -> usize {
    let n_kt = blocks_padded / 4;
    (m / 128) * n_kt * 512 + (j / 4) * 512 + (m % 32) * 16 + ((m % 128) / 32) * 4 + (j % 4)
}

/// Size in bytes of the swizzled layout for `rows` × `blocks` (both padded).
pub fn swizzled_len(rows: usize, blocks: usize) -> usize {
    round_up(rows, 128) * round_up(blocks, 4)
}

/// Linear `[rows, blocks]` bytes → 128×4 swizzled (rows padded to 128, blocks to 4, padding 0).
///
/// Panics if `linear` holds fewer than `rows * blocks` bytes: callers pass a scale tensor whose
/// shape was validated with the layer, so a short one is a bug, not bad input.
pub fn swizzle_128x4(linear: &[u8], rows: usize, blocks: usize) -> Vec<u8> {
    let bp = round_up(blocks, 4);
    let mut out = vec![0u8; swizzled_len(rows, blocks)];
    for m in 0..rows {
        for j in 0..blocks {
            out[swizzled_offset(m, j, bp)] = linear[m * blocks + j];
        }
    }
    out
}

/// Inverse of [`swizzle_128x4`], dropping the padding. Panics if `swizzled` is shorter than
/// [`swizzled_len`]`(rows, blocks)`.
pub fn unswizzle_128x4(swizzled: &[u8], rows: usize, blocks: usize) -> Vec<u8> {
    let bp = round_up(blocks, 4);
    let mut out = vec![0u8; rows * blocks];
    for m in 0..rows {
        for j in 0..blocks {
            out[m * blocks + j] = swizzled[swizzled_offset(m, j, bp)];
        }
    }
    out
}
