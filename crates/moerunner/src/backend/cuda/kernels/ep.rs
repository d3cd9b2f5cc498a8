//! Launchers of `ep.cu`: expert-parallel dispatch on the device — each token's record per serving
//! rank (`ep_plan`), the rows and their routes packed by destination (`ep_pack`).

use super::{kernel_args, In, Out, Shape, Void};

kernel_args! {
    /// Each (token, destination rank) record's send-buffer row, and the records per destination.
    pub struct EpPlan for Ep::"ep_plan", pdl = true {
        /// [T, K] global expert ids.
        topk_ids: In<i32>,
        T: i32,
        K: i32,
        E: i32,
        /// The global index of this rank's first token (replicated experts pick by it).
        first_token: i64,
        /// [E + 1] each expert's first replica.
        rep_start: In<i32>,
        /// `[replicas]`: the rank of each replica.
        rep_rank: In<i32>,
        G: i32,
        /// [T, G] record rows, -1 for none.
        dest_row: Out<i32>,
        /// `[2G]`: records per destination, then each destination's first row.
        send_counts: Out<i32>,
    }
}

kernel_args! {
    /// The records: each token's row once per destination, with that destination's routes for it.
    pub struct EpPack for Ep::"ep_pack", pdl = true {
        /// [T, row_bytes] the rows as given.
        hidden: In<Void>,
        row_bytes: i32,
        topk_ids: In<i32>,
        topk_w: In<f32>,
        T: i32,
        K: i32,
        E: i32,
        first_token: i64,
        rep_start: In<i32>,
        rep_rank: In<i32>,
        /// `[replicas]`: the id each replica's rank knows the expert by.
        rep_id: In<i32>,
        G: i32,
        dest_row: In<i32>,
        /// [rows, row_bytes]
        send_rows: Out<Void>,
        /// [rows, K] ids (-1: the slot goes elsewhere) and weights.
        send_ids: Out<i32>,
        send_w: Out<f32>,
    }
}

/// Destinations `ep_plan` can tell apart (a 32-bit mask per token).
pub const MAX_RANKS: usize = 32;

/// ep_plan: one block of 1024 threads.
pub fn plan_shape() -> Shape {
    Shape {
        grid: (1, 1, 1),
        block: 1024,
        smem: 0,
        pdl: true,
    }
}

/// ep_pack: one block of 256 threads per token, at most 32 per SM (grid-stride beyond).
pub fn pack_shape(tokens: usize, sms: u32) -> Shape {
    Shape {
        grid: (tokens.clamp(1, 32 * sms as usize) as u32, 1, 1),
        block: 256,
        smem: 0,
        pdl: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_takes_a_block_per_token_up_to_the_grid_cap() {
        assert_eq!(pack_shape(0, 132).grid.0, 1);
        assert_eq!(pack_shape(37, 132).grid.0, 37);
        assert_eq!(pack_shape(1 << 20, 132).grid.0, 32 * 132);
        assert_eq!(plan_shape().block, 1024);
    }
}
