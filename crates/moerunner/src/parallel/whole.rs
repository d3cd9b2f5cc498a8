//! One rank of a group whose every rank holds the whole input and wants the whole output: ranks
//! that are separate processes ([`super::SocketComm`], `moerunner run --comm process`), each
//! reading the same input file.
//!
//! Design decision: each rank takes its own token slice of the input (as the thread ranks of
//! [`super::forward_split`] are handed theirs), runs [`super::forward_rank`], and the ranks'
//! outputs are all-gathered and joined in rank order — the same join as the in-process split, so
//! a process split gives the thread split's output bit for bit.

use super::{dtype_from_tag, dtype_tag, RankLayer};
use super::{forward_rank, guarded, join_outputs, rows, token_slice, Communicator, OwnedRouting};
use crate::error::{MoeError, Result};
use crate::forward::{ForwardInput, ForwardOutput};
use crate::routing::Routes;
use crate::tensor::HostTensor;

/// Rank `comm.rank()`'s share of one forward call over the whole `input` (every rank passes the
/// same); returns the whole output, on every rank.
pub fn forward_rank_whole(
    comm: &dyn Communicator,
    layer: &RankLayer,
    input: &ForwardInput<'_>,
) -> Result<ForwardOutput> {
    let tokens = input.hidden.shape.first().copied().unwrap_or(0);
    let mine = token_slice(tokens, comm.size(), comm.rank());
    let (hidden, routing) = guarded(comm, || {
        Ok((
            rows(input.hidden, mine.clone())?,
            OwnedRouting::slice(&input.routing, mine.clone())?,
        ))
    })?;
    let out = forward_rank(
        comm,
        layer,
        &ForwardInput {
            hidden: &hidden,
            routing: routing.input(),
        },
    )?;
    let parts = comm.all_gather(&encode(&out))?;
    let outs = parts
        .iter()
        .enumerate()
        .map(|(r, b)| {
            decode(b).map_err(|why| MoeError::Comm {
                rank: comm.rank(),
                why: format!("rank {r}'s output: {why}"),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    join_outputs(outs.into_iter().map(Ok).collect())
}

/// A rank's output as bytes: dtype tag, weight-on-input flag, then u64 tokens, H, top-k and the
/// output's byte count, then the output, the ids and the weights.
fn encode(o: &ForwardOutput) -> Vec<u8> {
    let h = o.output.shape.get(1).copied().unwrap_or(0);
    let mut b = vec![
        dtype_tag(o.output.dtype),
        u8::from(o.routes.weight_on_input),
    ];
    for n in [o.routes.tokens, h, o.routes.top_k, o.output.bytes.len()] {
        b.extend_from_slice(&(n as u64).to_le_bytes());
    }
    b.extend_from_slice(&o.output.bytes);
    b.extend(o.routes.ids.iter().flat_map(|i| i.to_le_bytes()));
    b.extend(o.routes.weights.iter().flat_map(|w| w.to_le_bytes()));
    b
}

fn decode(b: &[u8]) -> std::result::Result<ForwardOutput, String> {
    let short = || format!("{} bytes are too few", b.len());
    let (&tag, &on_input) = (b.first().ok_or_else(short)?, b.get(1).ok_or_else(short)?);
    let dtype = dtype_from_tag(tag).ok_or_else(|| format!("dtype tag {tag}"))?;
    let word = |i: usize| -> std::result::Result<usize, String> {
        let at = 2 + 8 * i;
        let w = b.get(at..at + 8).ok_or_else(short)?;
        Ok(u64::from_le_bytes(w.try_into().unwrap_or_default()) as usize)
    };
    let (tokens, h, top_k, out_len) = (word(0)?, word(1)?, word(2)?, word(3)?);
    let pairs = tokens.checked_mul(top_k).ok_or_else(short)?;
    let want = tokens
        .checked_mul(h)
        .and_then(|n| n.checked_mul(dtype.size()))
        .filter(|&n| n == out_len)
        .ok_or_else(|| format!("{out_len} output bytes for {tokens} × {h} {dtype}"))?;
    let body = &b[34..];
    if body.len() as u128 != want as u128 + 8 * pairs as u128 {
        return Err(format!(
            "{} bytes after the header, expected {} for {tokens} tokens × {top_k} slots",
            body.len(),
            want as u128 + 8 * pairs as u128
        ));
    }
    let (out, rest) = body.split_at(want);
    let (ids, weights) = rest.split_at(4 * pairs);
    Ok(ForwardOutput {
        output: HostTensor::from_u8(dtype, vec![tokens, h], out.to_vec()),
        routes: Routes {
            tokens,
            top_k,
            ids: ids
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            weights: weights
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            weight_on_input: on_input != 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    #[test]
    fn an_output_survives_the_trip_and_a_cut_one_is_refused() {
        let o = ForwardOutput {
            output: HostTensor::from_f32(vec![2, 3], &[1.0, -2.0, 3.5, 0.0, 7.0, f32::MIN]),
            routes: Routes {
                tokens: 2,
                top_k: 2,
                ids: vec![3, -1, 0, 7],
                weights: vec![0.25, 0.0, 0.5, 0.5],
                weight_on_input: true,
            },
        };
        let b = encode(&o);
        let back = decode(&b).unwrap();
        assert_eq!(&back.output.bytes[..], &o.output.bytes[..]);
        assert_eq!(back.output.shape, vec![2, 3]);
        assert_eq!(back.output.dtype, DType::F32);
        assert_eq!(back.routes.ids, o.routes.ids);
        assert_eq!(back.routes.weights, o.routes.weights);
        assert!(back.routes.weight_on_input);
        for cut in [0, 1, 10, 33, b.len() - 1] {
            assert!(decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut lying = b.clone();
        lying[2..10].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&lying).is_err());
    }
}
