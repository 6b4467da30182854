//! Choosing an endpoint for a request, and a backend cluster for a route.
//!
//! An [`EndpointSet`] is built when a snapshot is built, from an Endpoints resource; the data path
//! calls [`EndpointSet::pick`] once per request (or TCP connection) and gets an address back. The set
//! survives a snapshot swap when its endpoints did not change, so the rotation carries on where it
//! was. [`WeightedChoice`] splits a route's traffic between clusters.
//!
//! Round robin here is nginx's *smooth* weighted round robin, precomputed into a schedule: weights
//! 5:1:1 give `a a b a c a a`, never `a a a a a b c`, so a heavy endpoint's share is spread evenly in
//! time. A pick is one atomic increment and an index; no lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Longest precomputed schedule. Weights whose sum is larger are scaled down to fit (keeping every
/// non-zero weight at least 1), which keeps the proportions to within a part in a few thousand.
const MAX_SCHEDULE: u64 = 4096;

/// One endpoint as the balancer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Where to connect.
    pub address: SocketAddr,
    /// Relative share of requests; 0 gets none.
    pub weight: u32,
}

/// How an [`EndpointSet`] picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Smooth weighted round robin.
    RoundRobin,
    /// Weighted random.
    Random,
}

/// The endpoints of one cluster with their round-robin position.
#[derive(Debug)]
pub struct EndpointSet {
    strategy: Strategy,
    endpoints: Vec<Endpoint>,
    /// Indices into `endpoints`, one full smooth-WRR cycle.
    schedule: Vec<u32>,
    cursor: AtomicUsize,
}

impl EndpointSet {
    /// Builds the set and its schedule.
    pub fn new(endpoints: Vec<Endpoint>, strategy: Strategy) -> Self {
        let schedule = smooth_schedule(&endpoints);
        EndpointSet { strategy, endpoints, schedule, cursor: AtomicUsize::new(0) }
    }

    /// How it picks.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The endpoints, in configuration order.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The next endpoint in rotation (or at random, weighted: a uniform draw from the weighted
    /// schedule), or `None` when no endpoint has a weight above zero.
    pub fn pick(&self) -> Option<SocketAddr> {
        if self.schedule.is_empty() {
            return None;
        }
        let turn = match self.strategy {
            Strategy::RoundRobin => self.cursor.fetch_add(1, Ordering::Relaxed) % self.schedule.len(),
            Strategy::Random => fastrand::usize(..self.schedule.len()),
        };
        let index = self.schedule[turn] as usize;
        self.endpoints.get(index).map(|e| e.address)
    }
}

/// One cycle of nginx's smooth weighted round robin: each turn every endpoint gains its weight, the
/// richest is chosen and pays the total back.
fn smooth_schedule(endpoints: &[Endpoint]) -> Vec<u32> {
    let weights = scaled_weights(endpoints.iter().map(|e| e.weight));
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

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A random pick among choices in proportion to their weights (a route's backend clusters).
#[derive(Debug)]
pub struct WeightedChoice<T> {
    /// Each choice with the running total of weights up to and including it.
    choices: Vec<(T, u64)>,
    total: u64,
}

impl<T> WeightedChoice<T> {
    /// Builds the choice; zero weights are kept but never picked.
    pub fn new(choices: impl IntoIterator<Item = (T, u32)>) -> Self {
        let mut total = 0_u64;
        let choices = choices
            .into_iter()
            .map(|(choice, weight)| {
                total += u64::from(weight);
                (choice, total)
            })
            .collect();
        WeightedChoice { choices, total }
    }

    /// One choice, or `None` when every weight is zero. A single choice costs no random number.
    pub fn pick(&self) -> Option<&T> {
        match self.choices.as_slice() {
            [] => None,
            [(only, _)] => (self.total > 0).then_some(only),
            many => {
                if self.total == 0 {
                    return None;
                }
                let ticket = fastrand::u64(0..self.total);
                let index = many.partition_point(|(_, running)| *running <= ticket);
                many.get(index).map(|(choice, _)| choice)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;

    use super::*;

    fn set(weights: &[u32]) -> EndpointSet {
        EndpointSet::new(
            weights
                .iter()
                .enumerate()
                .map(|(i, w)| Endpoint { address: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)), weight: *w })
                .collect(),
            Strategy::RoundRobin,
        )
    }

    #[test]
    fn random_picks_follow_the_weights() {
        let endpoints = set(&[3, 1, 0]).endpoints().to_vec();
        let random = EndpointSet::new(endpoints, Strategy::Random);
        let mut counts = [0_usize; 3];
        for _ in 0..40_000 {
            counts[usize::from(random.pick().unwrap().port() - 9000)] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!((29_000..31_000).contains(&counts[0]), "{counts:?}");
    }

    fn ports(set: &EndpointSet, n: usize) -> Vec<u16> {
        (0..n).map(|_| set.pick().unwrap().port() - 9000).collect()
    }

    #[test]
    fn equal_weights_rotate() {
        assert_eq!(ports(&set(&[1, 1, 1]), 6), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weighted_rotation_is_smooth() {
        // nginx's documented sequence for weights 5, 1, 1.
        assert_eq!(ports(&set(&[5, 1, 1]), 7), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn zero_weights_get_nothing_and_all_zero_is_none() {
        assert_eq!(ports(&set(&[0, 2, 0]), 3), [1, 1, 1]);
        assert_eq!(set(&[0, 0]).pick(), None);
        assert_eq!(set(&[]).pick(), None);
    }

    #[test]
    fn huge_weights_keep_their_proportions() {
        let endpoints = set(&[3_000_000, 1_000_000, 1]);
        assert!(endpoints.schedule.len() as u64 <= MAX_SCHEDULE + 3);
        let mut counts: HashMap<u16, usize> = HashMap::new();
        for port in ports(&endpoints, endpoints.schedule.len()) {
            *counts.entry(port).or_default() += 1;
        }
        let ratio = counts[&0] as f64 / counts[&1] as f64;
        assert!((ratio - 3.0).abs() < 0.01, "{ratio}");
        assert_eq!(counts[&2], 1);
    }

    #[test]
    fn weighted_choice_follows_weights() {
        let choice = WeightedChoice::new([("a", 80), ("b", 20), ("c", 0)]);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for _ in 0..20_000 {
            *counts.entry(*choice.pick().unwrap()).or_default() += 1;
        }
        let share = counts["a"] as f64 / 20_000.0;
        assert!((share - 0.8).abs() < 0.02, "{share}");
        assert!(!counts.contains_key("c"));
        assert_eq!(WeightedChoice::new([("a", 0)]).pick(), None);
        assert_eq!(WeightedChoice::new([("a", 1)]).pick(), Some(&"a"));
    }
}
