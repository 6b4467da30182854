//! Consistent hashing for `ring_hash`: a ring of points, each owned by an endpoint.
//!
//! Built by the endpoint set whenever the endpoints eligible for traffic change; read per request by
//! [`Ring::lookup`] with the request's key hashed by [`hash_key`]. Each endpoint owns
//! `POINTS_PER_WEIGHT` points per unit of weight, placed by hashing its address and the point's
//! number, so where an endpoint's points fall depends on nothing but itself: when one endpoint
//! leaves, only the keys on its points move (to the next point clockwise), about 1/N of them, and
//! every other key stays where it was (Karger et al., 1997; the ketama scheme nginx and Envoy use).
//!
//! The hash is FNV-1a with a 64-bit finaliser (from MurmurHash3), written out here rather than
//! taken from a hasher whose output may change between releases: every proxy of a mesh, whatever
//! its version, must put a key on the same endpoint.

use std::net::SocketAddr;

/// Points per unit of endpoint weight. 128 points keep each endpoint's share of a uniform key
/// space within about 10% of its fair share.
const POINTS_PER_WEIGHT: u64 = 128;

/// The most points one endpoint gets, however heavy: weights above 128 all count as 128.
const MAX_POINTS: u64 = POINTS_PER_WEIGHT * 128;

/// A stable 64-bit hash of `bytes`.
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(hash)
}

/// MurmurHash3's fmix64: spreads FNV's weak low bits over the whole word.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A hash ring over some endpoints.
#[derive(Debug, Default)]
pub struct Ring {
    /// Points sorted by position, each with the index of the endpoint (in the set) that owns it.
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// A ring over `members`: (index in the set, address, weight) of each endpoint eligible now.
    pub fn new(members: impl IntoIterator<Item = (u32, SocketAddr, u32)>) -> Ring {
        let mut points = Vec::new();
        for (index, address, weight) in members {
            let count = (u64::from(weight) * POINTS_PER_WEIGHT).min(MAX_POINTS);
            let name = address.to_string();
            let mut buffer = Vec::with_capacity(name.len() + 8);
            for point in 0..count {
                buffer.clear();
                buffer.extend_from_slice(name.as_bytes());
                buffer.push(b'-');
                buffer.extend_from_slice(point.to_string().as_bytes());
                points.push((hash_key(&buffer), index));
            }
        }
        // Ties (two endpoints hashing a point to one position) are broken by index, so every
        // proxy builds the same ring.
        points.sort_unstable();
        Ring { points }
    }

    /// The endpoint owning the first point at or after `key`, wrapping around; `None` on an empty
    /// ring.
    pub fn lookup(&self, key: u64) -> Option<u32> {
        let at = self.points.partition_point(|(position, _)| *position < key);
        self.points.get(at).or_else(|| self.points.first()).map(|(_, index)| *index)
    }

    /// What `wanted` gives for the owner of the first point at or after `key`, wrapping around, that
    /// it gives something for: where a retry of a hashed request goes, past the endpoints it tried.
    pub fn find_from<T>(&self, key: u64, wanted: impl Fn(u32) -> Option<T>) -> Option<T> {
        let at = self.points.partition_point(|(position, _)| *position < key);
        let (before, after) = self.points.split_at(at);
        after.iter().chain(before).find_map(|(_, index)| wanted(*index))
    }

    /// How many points the ring holds.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn address(i: u32) -> SocketAddr {
        SocketAddr::from(([10, 0, (i / 256) as u8, (i % 256) as u8], 8080))
    }

    fn ring(endpoints: &[u32]) -> Ring {
        Ring::new(endpoints.iter().map(|i| (*i, address(*i), 1)))
    }

    #[test]
    fn the_hash_is_stable_across_builds() {
        // Fixed values: a change here moves every key of every mesh.
        assert_eq!(hash_key(b""), mix(0xcbf2_9ce4_8422_2325));
        assert_eq!(hash_key(b"user-1"), hash_key(b"user-1"));
        assert_ne!(hash_key(b"user-1"), hash_key(b"user-2"));
    }

    #[test]
    fn shares_are_close_to_fair_and_follow_weights() {
        let ring = Ring::new([(0, address(0), 1), (1, address(1), 1), (2, address(2), 2)]);
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for key in 0..40_000_u32 {
            *counts.entry(ring.lookup(hash_key(&key.to_le_bytes())).unwrap()).or_default() += 1;
        }
        let share = |i| f64::from(counts[&i]) / 40_000.0;
        assert!((share(0) - 0.25).abs() < 0.05, "{counts:?}");
        assert!((share(2) - 0.5).abs() < 0.06, "{counts:?}");
    }

    proptest! {
        /// Removing one endpoint of n moves only the keys it owned (about 1/n of them); every other
        /// key stays on its endpoint.
        #[test]
        fn removing_an_endpoint_moves_only_its_keys(n in 2_u32..12, removed in 0_u32..12, seed in any::<u64>()) {
            let removed = removed % n;
            let all: Vec<u32> = (0..n).collect();
            let rest: Vec<u32> = all.iter().copied().filter(|i| *i != removed).collect();
            let (before, after) = (ring(&all), ring(&rest));
            let keys = 2_000_u64;
            let mut moved = 0;
            for k in 0..keys {
                let key = hash_key(&(seed ^ k).to_le_bytes());
                let (old, new) = (before.lookup(key).unwrap(), after.lookup(key).unwrap());
                if old != new {
                    prop_assert_eq!(old, removed, "a key moved off an endpoint that stayed");
                    moved += 1;
                }
            }
            let fair = keys as f64 / f64::from(n);
            prop_assert!(f64::from(moved) < fair * 1.5 + 30.0, "{} keys moved, fair share {}", moved, fair);
        }
    }
}
