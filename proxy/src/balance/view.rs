//! Which of a set's endpoints take traffic now, precomputed: the [`View`] an endpoint set rebuilds
//! whenever health, ejections or its endpoints change, and the draws a pick makes from it.
//!
//! `EndpointSet::refresh` computes a view from the set's members and their states (in `balance`)
//! and swaps it in; every pick reads the view serving then: the tier to draw from (with zone-aware
//! routing, a tier by share of traffic), its round-robin position, its smooth weighted schedule,
//! and its hash ring. A view is held by every cluster, so the common case, one tier of every
//! endpoint in order, needs no allocation beyond the view itself.

use std::sync::atomic::AtomicUsize;

use super::ring::Ring;

/// Longest precomputed schedule. Weights whose sum is larger are scaled down to fit (keeping every
/// non-zero weight at least 1), which keeps the proportions to within a part in a few thousand.
pub(super) const MAX_SCHEDULE: u64 = 4096;

/// Which endpoints take traffic now, precomputed. Rebuilt whenever health changes, and held by
/// every cluster: the common case (one tier) is kept in place, without an allocation of its own.
#[derive(Debug, Default)]
pub struct View {
    /// The nearest tier with endpoints taking traffic; none when no endpoint does.
    pub(super) first: Option<Tier>,
    /// With zone-aware routing, the tiers after the first.
    pub(super) farther: Vec<Tier>,
    /// Cumulative share of traffic of each tier, the last one 1.0; empty when the first tier takes
    /// everything.
    pub(super) shares: Vec<f64>,
    /// Endpoints with a weight above zero.
    pub(super) weighted: usize,
    /// Of those, the healthy ones.
    pub(super) healthy: usize,
    /// Of those, the ones outlier detection has ejected.
    pub(super) ejected: usize,
    /// Health is being ignored.
    pub(super) panic: bool,
}

#[derive(Debug)]
pub(super) struct Tier {
    /// Indices into the set's members: see [`Tier::members`].
    pub(super) members: Members,
    /// One smooth-WRR cycle over `members`, as member indices: the round-robin order, and the
    /// weighted urn random draws come from. Empty when it is `members` itself (equal weights, the
    /// common case): see [`Tier::schedule`].
    pub(super) schedule: Box<[u32]>,
    pub(super) cursor: AtomicUsize,
    pub(super) ring: Option<Ring>,
}

/// A tier's members, as indices into the set's.
#[derive(Debug)]
pub(super) enum Members {
    /// The set's first `n` members, every one in order: the common case (every endpoint weighted
    /// and healthy), which needs no list of its own.
    Leading(u32),
    /// Any others.
    Listed(Box<[u32]>),
}

/// The longest run of leading members [`Members::Leading`] stands for.
const LEADING_MAX: usize = 256;

/// `0, 1, 2, …`: the indices of the leading members.
static ASCENDING: [u32; LEADING_MAX] = {
    let mut indices = [0; LEADING_MAX];
    let mut i = 0;
    while i < LEADING_MAX {
        indices[i] = i as u32;
        i += 1;
    }
    indices
};

impl Members {
    pub(super) fn new(indices: Vec<u32>) -> Members {
        let leading = indices.len() <= LEADING_MAX && indices.iter().zip(0..).all(|(index, i)| *index == i);
        match u32::try_from(indices.len()) {
            Ok(n) if leading => Members::Leading(n),
            _ => Members::Listed(indices.into_boxed_slice()),
        }
    }
}

impl Tier {
    /// The indices of the tier's members.
    pub(super) fn members(&self) -> &[u32] {
        match &self.members {
            Members::Leading(n) => ASCENDING.get(..*n as usize).unwrap_or_default(),
            Members::Listed(indices) => indices,
        }
    }

    /// The tier's smooth-WRR cycle.
    pub(super) fn schedule(&self) -> &[u32] {
        if self.schedule.is_empty() { self.members() } else { &self.schedule }
    }
}

impl View {
    /// Endpoints with a weight above zero.
    pub fn weighted(&self) -> usize {
        self.weighted
    }

    /// Endpoints healthy now.
    pub fn healthy(&self) -> usize {
        self.healthy
    }

    /// Endpoints ejected by outlier detection now.
    pub fn ejected(&self) -> usize {
        self.ejected
    }

    /// Whether health is being ignored because too few endpoints are healthy.
    pub fn panic(&self) -> bool {
        self.panic
    }

    pub(super) fn tier(&self) -> Option<&Tier> {
        if self.shares.is_empty() {
            return self.first.as_ref();
        }
        let draw = fastrand::f64();
        match self.shares.partition_point(|share| *share <= draw).min(self.farther.len()) {
            0 => self.first.as_ref(),
            index => self.farther.get(index - 1),
        }
    }

    /// Adds the next tier, nearest first.
    pub(super) fn push(&mut self, tier: Tier) {
        if self.first.is_none() {
            self.first = Some(tier);
        } else {
            self.farther.push(tier);
        }
    }
}

/// Two different members of the tier (when it has two): the first a weighted draw, the second a
/// weighted draw too unless it repeats the first, then another member at random. Letting both
/// draws land on one endpoint would hand it a share of picks no comparison ever checked (1/9 of
/// them with three endpoints), however loaded it is.
pub(super) fn two_draws(tier: &Tier) -> Option<(u32, u32)> {
    let a = draw(tier)?;
    let mut b = draw(tier)?;
    let members = tier.members();
    if a == b && members.len() > 1 {
        let at = members.iter().position(|m| *m == a).unwrap_or(0);
        let offset = 1 + fastrand::usize(..members.len() - 1);
        b = members[(at + offset) % members.len()];
    }
    Some((a, b))
}

/// A weighted random member of the tier: a uniform draw from its schedule.
pub(super) fn draw(tier: &Tier) -> Option<u32> {
    match tier.members() {
        [] => None,
        [only] => Some(*only),
        _ => {
            let schedule = tier.schedule();
            schedule.get(fastrand::usize(..schedule.len().max(1))).copied()
        }
    }
}

/// One cycle of nginx's smooth weighted round robin: each turn every endpoint gains its weight, the
/// richest is chosen and pays the total back.
pub(super) fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let weights = scaled_weights(weights.iter().copied());
    let total: i64 = weights.iter().sum();
    let mut current = vec![0_i64; weights.len()];
    let mut schedule = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, weight) in weights.iter().enumerate() {
            current[i] += weight;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

/// Divides the weights by their common divisor, then scales them down if their sum is still above
/// [`MAX_SCHEDULE`].
fn scaled_weights(weights: impl Iterator<Item = u32>) -> Vec<i64> {
    let weights: Vec<u64> = weights.map(u64::from).collect();
    let divisor = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd).max(1);
    let reduced: Vec<u64> = weights.iter().map(|w| w / divisor).collect();
    let sum: u64 = reduced.iter().sum();
    reduced
        .into_iter()
        .map(|w| {
            let scaled = if sum > MAX_SCHEDULE && w > 0 { (w * MAX_SCHEDULE / sum).max(1) } else { w };
            i64::try_from(scaled).unwrap_or(0)
        })
        .collect()
}

pub(super) fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}
