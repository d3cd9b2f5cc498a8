//! [`ExpertMap`]: which EP ranks hold which experts — an even split, an explicit (possibly
//! uneven) map, and redundant replicas of an expert on several ranks.
//!
//! Design decision: a replicated expert is served for token `t` (global index) by replica
//! `t mod n` of its `n` holders (in ascending rank order): deterministic, needs no communication,
//! and spreads a hot expert's tokens evenly over its replicas.

use crate::error::{MoeError, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertMap {
    ranks: usize,
    /// Expert → the ranks holding it, ascending, at least one.
    holders: Vec<Vec<usize>>,
    /// Rank → its experts, ascending (its local expert j is global `experts[rank][j]`).
    experts: Vec<Vec<usize>>,
}

impl ExpertMap {
    /// Contiguous ranges over `ranks` ranks: E/R each when R divides E, otherwise the first
    /// `E mod R` ranks hold one more.
    pub fn even(num_experts: usize, ranks: usize) -> Result<Self> {
        if ranks == 0 {
            return Err(MoeError::invalid("ep", "needs at least one rank"));
        }
        let (base, extra) = (num_experts / ranks, num_experts % ranks);
        let mut holders = Vec::with_capacity(num_experts);
        for r in 0..ranks {
            let n = base + usize::from(r < extra);
            holders.extend(std::iter::repeat_n(vec![r], n));
        }
        Self::from_holders(ranks, holders)
    }

    /// An explicit map: `holders[e]` lists the ranks holding expert `e` (more than one:
    /// replicas). Every expert needs a holder, every rank an expert, ranks are `< ranks`, and a
    /// rank is listed once per expert.
    pub fn from_holders(ranks: usize, holders: Vec<Vec<usize>>) -> Result<Self> {
        let what = "expert map";
        if ranks == 0 {
            return Err(MoeError::invalid(what, "needs at least one rank"));
        }
        let mut experts = vec![Vec::new(); ranks];
        let mut sorted = Vec::with_capacity(holders.len());
        for (e, hs) in holders.into_iter().enumerate() {
            let mut hs = hs;
            hs.sort_unstable();
            if hs.is_empty() {
                return Err(MoeError::invalid(what, format!("expert {e} is on no rank")));
            }
            if let Some(&r) = hs.iter().find(|&&r| r >= ranks) {
                return Err(MoeError::invalid(
                    what,
                    format!(
                        "expert {e} is on rank {r}, but there are {ranks} ranks (0..={})",
                        ranks - 1
                    ),
                ));
            }
            if let Some(w) = hs.windows(2).find(|w| w[0] == w[1]) {
                return Err(MoeError::invalid(
                    what,
                    format!("expert {e} is listed twice on rank {}", w[0]),
                ));
            }
            for &r in &hs {
                experts[r].push(e);
            }
            sorted.push(hs);
        }
        if let Some(r) = experts.iter().position(|x| x.is_empty()) {
            return Err(MoeError::invalid(
                what,
                format!(
                    "rank {r} holds no expert ({} experts over {ranks} ranks); every rank needs one",
                    sorted.len()
                ),
            ));
        }
        Ok(ExpertMap {
            ranks,
            holders: sorted,
            experts,
        })
    }

    /// Parses `spec`: one entry per expert, comma-separated, each the rank holding it or several
    /// ranks joined by `+` (replicas). `0,0,1,1+0` puts experts 0–1 on rank 0, expert 2 on rank 1
    /// and expert 3 on ranks 0 and 1.
    pub fn parse(spec: &str, num_experts: usize, ranks: usize) -> Result<Self> {
        let entries: Vec<&str> = spec.split(',').map(str::trim).collect();
        if entries.len() != num_experts {
            return Err(MoeError::invalid(
                "expert map",
                format!(
                    "`{spec}` has {} entries; the layer has E = {num_experts} experts (one entry each)",
                    entries.len()
                ),
            ));
        }
        let holders = entries
            .iter()
            .enumerate()
            .map(|(e, entry)| {
                entry
                    .split('+')
                    .map(|r| {
                        r.trim().parse::<usize>().map_err(|_| {
                            MoeError::invalid(
                                "expert map",
                                format!("entry {e} `{entry}` is not a rank or ranks joined by `+`"),
                            )
                        })
                    })
                    .collect::<Result<Vec<usize>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_holders(ranks, holders)
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }
    pub fn num_experts(&self) -> usize {
        self.holders.len()
    }
    /// The experts rank `rank` holds, ascending: its local expert j is `experts_of(rank)[j]`.
    pub fn experts_of(&self, rank: usize) -> &[usize] {
        self.experts.get(rank).map_or(&[], |v| v)
    }
    /// The rank that computes expert `expert` for global token `token` (None for an id outside
    /// the map, such as −1 padding).
    pub fn rank_for(&self, expert: i32, token: usize) -> Option<usize> {
        let hs = self.holders.get(usize::try_from(expert).ok()?)?;
        Some(hs[token % hs.len()])
    }
    /// The ranks that hold expert `expert`, ascending (global token g goes to the one at
    /// g mod their count: [`Self::rank_for`]); empty for an id outside the map.
    pub fn holders(&self, expert: usize) -> &[usize] {
        self.holders.get(expert).map_or(&[], |v| v)
    }
    /// Expert `expert`'s local id on `rank`, if the rank holds it.
    pub fn local_id(&self, expert: usize, rank: usize) -> Option<usize> {
        self.experts_of(rank).binary_search(&expert).ok()
    }
}
