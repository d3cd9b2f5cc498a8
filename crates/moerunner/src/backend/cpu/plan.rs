//! Grouping (token, slot) pairs by local expert, and the partition of rows into work items.
//!
//! Design decision: a stable counting sort keeps each expert's pairs in token-then-slot order,
//! so every expert's weights are read once per call for all of its tokens, and the layout of
//! every buffer depends only on the routes — never on the number of threads.

use std::ops::Range;

use crate::routing::Routes;

/// Marks a (token, slot) that has no local expert.
pub const NO_PAIR: u32 = u32::MAX;

/// The pairs of one chunk of tokens, grouped by local expert.
pub struct Plan {
    /// Local experts (index = global id − start).
    pub experts: usize,
    /// Pairs of local expert `e` are `offsets[e]..offsets[e + 1]` (sorted order).
    pub offsets: Vec<usize>,
    /// Per sorted pair: its token, relative to the chunk's first token.
    pub pair_token: Vec<u32>,
    /// Per sorted pair: its routing weight.
    pub pair_weight: Vec<f32>,
    /// Per sorted pair: its local expert.
    pub pair_expert: Vec<u32>,
    /// Per (token, slot) of the chunk: the sorted pair, or [`NO_PAIR`].
    pub slot_pair: Vec<u32>,
}

impl Plan {
    /// Groups the pairs of `tokens` whose id is a held expert (`local`, global ids). Ids outside
    /// `[0, num_experts)` (padding) and experts of other ranks are skipped.
    pub fn build(
        routes: &Routes,
        tokens: Range<usize>,
        local: &Range<usize>,
        num_experts: usize,
    ) -> Plan {
        let k = routes.top_k;
        let experts = local.len();
        let local_of = |id: i32| -> Option<usize> {
            let id = usize::try_from(id).ok().filter(|&i| i < num_experts)?;
            local.contains(&id).then(|| id - local.start)
        };
        let mut counts = vec![0usize; experts + 1];
        for t in tokens.clone() {
            for &id in &routes.ids[t * k..(t + 1) * k] {
                if let Some(e) = local_of(id) {
                    counts[e + 1] += 1;
                }
            }
        }
        for e in 0..experts {
            counts[e + 1] += counts[e];
        }
        let offsets = counts.clone();
        let pairs = offsets[experts];
        let mut next = counts;
        let mut pair_token = vec![0u32; pairs];
        let mut pair_weight = vec![0f32; pairs];
        let mut pair_expert = vec![0u32; pairs];
        let mut slot_pair = vec![NO_PAIR; tokens.len() * k];
        for (ti, t) in tokens.enumerate() {
            for j in 0..k {
                if let Some(e) = local_of(routes.ids[t * k + j]) {
                    let p = next[e];
                    next[e] += 1;
                    pair_token[p] = ti as u32;
                    pair_weight[p] = routes.weights[t * k + j];
                    pair_expert[p] = e as u32;
                    slot_pair[ti * k + j] = p as u32;
                }
            }
        }
        Plan {
            experts,
            offsets,
            pair_token,
            pair_weight,
            pair_expert,
            slot_pair,
        }
    }

    pub fn pairs(&self) -> usize {
        self.offsets[self.experts]
    }

    /// The sorted pairs of local expert `e`.
    pub fn expert_pairs(&self, e: usize) -> Range<usize> {
        self.offsets[e]..self.offsets[e + 1]
    }
}

/// `0..len` cut into consecutive blocks of `per` (the last one shorter).
pub fn blocks(len: usize, per: usize) -> Vec<Range<usize>> {
    let per = per.max(1);
    (0..len.div_ceil(per))
        .map(|b| b * per..((b + 1) * per).min(len))
        .collect()
}

/// Rows per work item for a projection with `row_bytes` bytes a row: about `TARGET` bytes of
/// weights (big enough to amortize scheduling, small enough that one expert splits into many
/// items so both cores stream even at T = 1), a multiple of 16 rows.
pub fn rows_per_item(row_bytes: usize, rows: usize) -> usize {
    const TARGET: usize = 128 * 1024;
    let per = (TARGET / row_bytes.max(1)).clamp(16, 256) / 16 * 16;
    per.min(rows.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_pairs_by_expert_in_token_order_and_skips_foreign_ids() {
        // E = 6, rank holds 2..5; k = 2.
        let routes = Routes {
            tokens: 3,
            top_k: 2,
            ids: vec![3, 2, -1, 5, 4, 3],
            weights: vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            weight_on_input: false,
        };
        let p = Plan::build(&routes, 0..3, &(2..5), 6);
        assert_eq!(p.offsets, vec![0, 1, 3, 4]);
        assert_eq!(p.pair_token, vec![0, 0, 2, 2]);
        assert_eq!(p.pair_weight, vec![0.2, 0.1, 0.6, 0.5]);
        assert_eq!(p.slot_pair, vec![1, 0, NO_PAIR, NO_PAIR, 3, 2]);
        let q = Plan::build(&routes, 1..3, &(2..5), 6);
        assert_eq!(q.pair_token, vec![1, 1]);
        assert_eq!(q.slot_pair, vec![NO_PAIR, NO_PAIR, 1, 0]);
    }

    #[test]
    fn blocks_cover_the_range() {
        assert_eq!(blocks(10, 4), vec![0..4, 4..8, 8..10]);
        assert!(blocks(0, 4).is_empty());
        assert_eq!(rows_per_item(4096, 1536), 32);
        assert_eq!(rows_per_item(64, 8), 8);
    }
}
