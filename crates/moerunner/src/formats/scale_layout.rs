//! Scale layouts: linear (canonical) and the 128×4 swizzle read by Blackwell block-scaled MMA.

/// Linear `[rows, blocks]` bytes → 128×4 swizzled (rows padded to 128, blocks to 4, padding 0).
pub fn swizzle_128x4(linear: &[u8], rows: usize, blocks: usize) -> Vec<u8> {
    let _ = (linear, rows, blocks);
    unimplemented!("swizzle_128x4")
}

/// Inverse of [`swizzle_128x4`], dropping the padding.
pub fn unswizzle_128x4(swizzled: &[u8], rows: usize, blocks: usize) -> Vec<u8> {
    let _ = (swizzled, rows, blocks);
    unimplemented!("unswizzle_128x4")
}
