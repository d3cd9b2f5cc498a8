//! All-to-all dispatch and combine (EP mode a): each token's row travels once to each rank that
//! serves one of its slots, with those slots' (slot, local expert, weight); the serving rank
//! computes every (token, slot) pair as a row of its own (one slot, the others padding) and
//! sends each pair's output row back; the owner adds them in slot order from zero — the same
//! operations as the single-device combine, so the result is bitwise the same where the
//! backend computes each pair's row as it would on one device (docs/parallel.md).
//! With TP (TEP), an expert's EP group is `tp` ranks, each holding a slice of I: the record goes
//! to every rank of the group, each returns its partial row, and the owner sums a slot's partial
//! rows in TP-rank order before adding the slot (GEMM2's bias is in TP rank 0's slice only).

use super::comm::{f32_bytes, f32_from_bytes, Communicator};
use super::wire::Wire;
use super::{compute, Owned, RankLayer};
use crate::error::{MoeError, Result};

/// Bytes of a record's header (token, slot count) and of each slot's (slot, local id, weight).
const HEADER: usize = 8;
const SLOT: usize = 12;
/// In a record's slot count: its row travels as the caller gave it (the layer's wire encoding
/// could not hold it exactly).
const RAW_ROW: u32 = 1 << 31;

/// This rank's tokens' outputs, f32 `[T_r, H]`.
pub(super) fn forward(
    comm: &dyn Communicator,
    layer: &RankLayer,
    own: &Owned<'_>,
) -> Result<Vec<f32>> {
    let (me, ranks) = (comm.rank(), comm.size());
    let (h, k) = (layer.global.hidden, own.routes.top_k);
    let tp = layer.layout.tp;
    let dtype = own.hidden.dtype;
    let row_bytes = h * dtype.size();
    let wire = Wire::choose(
        layer.global.activation_format,
        layer.loaded.layer().weights().w13_input_scale,
        dtype,
        h,
    );
    let xf = match wire {
        Wire::AsGiven(_) => Vec::new(),
        _ => own.hidden.to_f32_vec("hidden_states")?,
    };
    let mut encoded = Vec::new();
    let map = &layer.layout.ep;
    let tokens = own.routes.tokens;

    // Dispatch: per destination, records `[token u32][n u32][n × (slot u32, local u32, w f32)][row]`,
    // the same records to every TP rank of an EP group. `back[t·k + j]`: where slot j of token t
    // comes back (EP group, index among that group's pairs).
    let groups = ranks / tp;
    let mut send = vec![Vec::new(); ranks];
    let mut pairs_to = vec![0usize; groups];
    let mut back = vec![None; tokens * k];
    let mut slots: Vec<Vec<(u32, u32, f32)>> = vec![Vec::new(); groups];
    for t in 0..tokens {
        for s in slots.iter_mut() {
            s.clear();
        }
        for j in 0..k {
            let id = own.routes.ids[t * k + j];
            let Some(d) = map.rank_for(id, own.first + t) else {
                continue; // padding
            };
            let Some(local) = map.local_id(id as usize, d) else {
                continue;
            };
            slots[d].push((j as u32, local as u32, own.routes.weights[t * k + j]));
            back[t * k + j] = Some((d, pairs_to[d]));
            pairs_to[d] += 1;
        }
        if slots.iter().all(|s| s.is_empty()) {
            continue;
        }
        let raw = &own.hidden.bytes[t * row_bytes..(t + 1) * row_bytes];
        encoded.clear();
        let exact = wire.encode(raw, xf.get(t * h..(t + 1) * h).unwrap_or(&[]), &mut encoded)?;
        let (flag, row) = if exact {
            (0, &encoded[..])
        } else {
            (RAW_ROW, raw)
        };
        for (d, s) in slots.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
            for buf in &mut send[d * tp..(d + 1) * tp] {
                buf.extend((t as u32).to_le_bytes());
                buf.extend((s.len() as u32 | flag).to_le_bytes());
                for &(j, local, w) in s {
                    buf.extend(j.to_le_bytes());
                    buf.extend(local.to_le_bytes());
                    buf.extend(w.to_le_bytes());
                }
                buf.extend_from_slice(row);
            }
        }
    }
    let received = comm.all_to_all_v(send)?;

    // Compute: one row per received pair, in (source rank, token, slot) order.
    let mut x = Vec::new();
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    let mut from = vec![0usize; ranks];
    for (src, buf) in received.iter().enumerate() {
        let bad = |at: usize| MoeError::Comm {
            rank: me,
            why: format!(
                "all_to_all_v: malformed dispatch from rank {src} at byte {at} of {}",
                buf.len()
            ),
        };
        let mut at = 0;
        while at < buf.len() {
            let count = read_u32(buf, at + 4).ok_or_else(|| bad(at))?;
            let (n, raw) = ((count & !RAW_ROW) as usize, count & RAW_ROW != 0);
            let body = at + HEADER;
            let row_at = body + n * SLOT;
            let (codec, len) = if raw {
                (Wire::AsGiven(dtype), row_bytes)
            } else {
                (wire, wire.row_bytes(h))
            };
            let row = buf.get(row_at..row_at + len).ok_or_else(|| bad(at))?;
            let row = codec.decode(row, h, dtype)?;
            for i in 0..n {
                let p = body + i * SLOT;
                let local = read_u32(buf, p + 4).ok_or_else(|| bad(p))?;
                let w = f32::from_bits(read_u32(buf, p + 8).ok_or_else(|| bad(p))?);
                x.extend_from_slice(&row);
                ids.push(local as i32);
                ids.extend(std::iter::repeat_n(-1, k - 1));
                weights.push(w);
                weights.extend(std::iter::repeat_n(0.0, k - 1));
                from[src] += 1;
            }
            at = row_at + len;
        }
    }
    let n: usize = from.iter().sum();
    let y = compute(layer, &x, n, &ids, &weights)?;

    // Return each pair's row to its owner, in the order it came.
    let mut replies = Vec::with_capacity(ranks);
    let mut start = 0;
    for &c in &from {
        replies.push(f32_bytes(&y[start * h..(start + c) * h]));
        start += c;
    }
    let got = comm.all_to_all_v(replies)?;
    for (r, g) in got.iter().enumerate() {
        if g.len() != pairs_to[r / tp] * h * 4 {
            return Err(MoeError::Comm {
                rank: me,
                why: format!(
                    "all_to_all_v: rank {r} returned {} bytes for {} pairs of {h} f32",
                    g.len(),
                    pairs_to[r / tp]
                ),
            });
        }
    }
    let got: Vec<Vec<f32>> = got.iter().map(|g| f32_from_bytes(g)).collect();

    // Combine in slot order from zero, as the single-device combine does; with TP a slot's row is
    // its group's partial rows summed in TP-rank order first.
    let mut out = vec![0.0f32; tokens * h];
    let mut slot_row = vec![0.0f32; h];
    for (t, row) in out.chunks_exact_mut(h).enumerate() {
        for &(d, i) in back[t * k..(t + 1) * k].iter().flatten() {
            let part = |q: usize| &got[d * tp + q][i * h..(i + 1) * h];
            if tp == 1 {
                for (acc, &v) in row.iter_mut().zip(part(0)) {
                    *acc += v;
                }
                continue;
            }
            slot_row.copy_from_slice(part(0));
            for q in 1..tp {
                for (s, &v) in slot_row.iter_mut().zip(part(q)) {
                    *s += v;
                }
            }
            for (acc, &v) in row.iter_mut().zip(&slot_row) {
                *acc += v;
            }
        }
    }
    Ok(out)
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}
