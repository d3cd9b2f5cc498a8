//! The device memory a forward call uses besides the weights: scratch between the pipeline's
//! stages, sized from what each stage declares for a token capacity, and the staging buffers of
//! host calls (inputs copied in, the output copied out), allocated only when a host call needs them.

use super::device::{Buf, Device};
use crate::error::{MoeError, Result};

/// A named buffer of the workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// [P] expert id of each (token, slot) pair (routing's output, or a host call's routed ids).
    Ids,
    /// [P] f32 routing weight of each pair.
    Weights,
    /// [T, Hp] GEMM1's quantized input.
    Xq,
    /// [T, Hp / 128] its block scales.
    XqScales,
    /// [E_local + 1] expert offsets of the sorted pairs.
    Offsets,
    /// Per-(chunk, local expert) counts, then chunk starts, of the multi-block sort.
    SortChunks,
    SortedPair,
    PairPos,
    TileExpert,
    TileStart,
    TileEnd,
    NumTiles,
    /// [P, Ip] GEMM1's output (the intermediate).
    Inter,
    /// [P, Ip] the intermediate requantized for GEMM2, and its block scales.
    InterQ,
    InterScales,
    /// [P, Hp] GEMM2's rows.
    Z,
    /// [2] u32: the fused small-batch kernel's grid barrier (zero at allocation; the kernel leaves
    /// it ready for the next launch).
    GridBarrier,
}

/// The token capacity a workspace is sized for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub tokens: usize,
    pub pairs: usize,
}

/// Bytes each slot needs, gathered from the stages (the largest request per slot wins).
#[derive(Default, Debug)]
pub struct ScratchPlan {
    bytes: std::collections::BTreeMap<Slot, usize>,
}

impl ScratchPlan {
    pub fn need(&mut self, slot: Slot, bytes: usize) {
        let e = self.bytes.entry(slot).or_insert(0);
        *e = (*e).max(bytes);
    }
    pub fn total_bytes(&self) -> usize {
        self.bytes.values().sum()
    }
}

/// Scratch for up to `capacity.tokens` tokens.
pub struct Scratch {
    pub capacity: Capacity,
    bufs: std::collections::BTreeMap<Slot, Buf>,
}

impl Scratch {
    pub fn alloc(dev: &Device, capacity: Capacity, plan: &ScratchPlan) -> Result<Scratch> {
        let mut bufs = std::collections::BTreeMap::new();
        for (&slot, &bytes) in &plan.bytes {
            bufs.insert(slot, dev.alloc(bytes)?);
        }
        Ok(Scratch { capacity, bufs })
    }

    /// The device address of a slot (a stage asking for a slot no stage declared is a bug).
    pub fn ptr(&self, slot: Slot) -> Result<u64> {
        self.buf(slot).map(Buf::ptr)
    }

    pub fn buf(&self, slot: Slot) -> Result<&Buf> {
        self.bufs.get(&slot).ok_or_else(|| {
            MoeError::Cuda(format!(
                "internal: workspace slot {slot:?} was not declared"
            ))
        })
    }

    /// Bytes of device memory its buffers hold.
    pub fn bytes(&self) -> usize {
        self.bufs.values().map(|b| b.len).sum()
    }

    pub fn buf_mut(&mut self, slot: Slot) -> Result<&mut Buf> {
        self.bufs.get_mut(&slot).ok_or_else(|| {
            MoeError::Cuda(format!(
                "internal: workspace slot {slot:?} was not declared"
            ))
        })
    }
}

/// Device copies of a host call's inputs and output, for up to `tokens` tokens.
pub struct Staging {
    pub tokens: usize,
    /// [T, H] hidden states (any input dtype: 4 bytes an element reserved).
    pub x: Buf,
    /// [T, E] logits.
    pub logits: Buf,
    /// [T, K] packed routes.
    pub packed: Buf,
    /// [T, H] output.
    pub out: Buf,
}

impl Staging {
    pub fn alloc(
        dev: &Device,
        tokens: usize,
        hidden: usize,
        experts: usize,
        k: usize,
    ) -> Result<Staging> {
        let [x, logits, packed, out] = Self::sizes(tokens, hidden, experts, k);
        Ok(Staging {
            tokens,
            x: dev.alloc(x)?,
            logits: dev.alloc(logits)?,
            packed: dev.alloc(packed)?,
            out: dev.alloc(out)?,
        })
    }

    /// Bytes of `x`, `logits`, `packed` and `out` for `tokens` tokens (4 bytes an element: any
    /// input dtype fits).
    pub fn sizes(tokens: usize, hidden: usize, experts: usize, k: usize) -> [usize; 4] {
        [
            tokens * hidden * 4,
            tokens * experts * 4,
            tokens * k * 4,
            tokens * hidden * 4,
        ]
    }

    /// Bytes of device memory its buffers hold.
    pub fn bytes(&self) -> usize {
        [&self.x, &self.logits, &self.packed, &self.out]
            .iter()
            .map(|b| b.len)
            .sum()
    }
}

/// The workspace of a loaded layer: scratch, and staging once a host call has needed it.
pub struct Workspace {
    pub scratch: Scratch,
    pub staging: Option<Staging>,
}
