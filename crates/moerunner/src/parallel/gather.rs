//! Gather-scatter: every rank all-gathers every token (hidden row, ids, weights), computes the
//! partial sum of the slots it serves (its experts, its I slice), and the partial sums are
//! reduce-scattered back to the token owners, added in rank order. EP (mode b), TP and TEP.

use super::comm::{f32_bytes, f32_from_bytes, Communicator};
use super::{compute, Owned, RankLayer};
use crate::error::{MoeError, Result};
use crate::tensor::HostTensor;

/// This rank's tokens' outputs, f32 `[T_r, H]`.
pub(super) fn forward(
    comm: &dyn Communicator,
    layer: &RankLayer,
    own: &Owned<'_>,
) -> Result<Vec<f32>> {
    let (h, k) = (layer.global.hidden, own.routes.top_k);
    let dtype = own.hidden.dtype;
    // What travels: the rows in the caller's dtype, then ids (i32) and weights (f32).
    let mut mine = own.hidden.bytes.to_vec();
    mine.extend(own.routes.ids.iter().flat_map(|v| v.to_le_bytes()));
    mine.extend(f32_bytes(&own.routes.weights));
    let parts = comm.all_gather(&mine)?;

    let total: usize = own.counts.iter().sum();
    let (ep_rank, _) = layer.layout.coords(comm.rank());
    let map = &layer.layout.ep;
    let mut x = Vec::with_capacity(total * h);
    let mut ids = Vec::with_capacity(total * k);
    let mut weights = Vec::with_capacity(total * k);
    let mut g = 0;
    for (r, (part, &n)) in parts.iter().zip(&own.counts).enumerate() {
        let row_bytes = n * h * dtype.size();
        if part.len() != row_bytes + n * k * 8 {
            return Err(MoeError::Comm {
                rank: comm.rank(),
                why: format!(
                    "all_gather: rank {r} sent {} bytes for {n} tokens",
                    part.len()
                ),
            });
        }
        let rows = HostTensor::from_u8(dtype, vec![n, h], part[..row_bytes].to_vec());
        x.extend(rows.to_f32_vec("hidden_states")?);
        let id_bytes = &part[row_bytes..row_bytes + n * k * 4];
        let part_ids = id_bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        for (i, id) in part_ids.enumerate() {
            let token = g + i / k;
            // A slot this rank does not serve is padding here; its owner rank adds it.
            let local = (map.rank_for(id, token) == Some(ep_rank))
                .then(|| map.local_id(id as usize, ep_rank))
                .flatten();
            ids.push(local.map_or(-1, |l| l as i32));
        }
        weights.extend(f32_from_bytes(&part[row_bytes + n * k * 4..]));
        g += n;
    }
    let partial = compute(layer, &x, total, &ids, &weights)?;
    let partial = if partial.is_empty() {
        vec![0.0; total * h]
    } else {
        partial
    };
    let counts: Vec<usize> = own.counts.iter().map(|&n| n * h).collect();
    comm.reduce_scatter_sum(&partial, &counts)
}
