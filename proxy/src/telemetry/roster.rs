//! Series kept inside each object's own stats, read out of them when `/metrics` is scraped.
//!
//! A cluster has some forty series (connections, responses by class, breakers, retries, timeouts,
//! health...). Kept as series of `Family`s, each cost a hash entry, its own copy of the cluster's
//! name and a shared atomic: 4.2 kB per cluster, more than the compiled cluster and its five
//! endpoints (measured with glibc's `mallinfo2`). Here an object's counters are plain atomics in
//! one struct ([`Count`], [`Level`], a [`Histogram`]), a [`Roster`] maps each object's name to its
//! struct (so the same name gets the same counters across config reloads, until it is removed),
//! and each family in the registry is a description ([`Described`]) that, at scrape time, walks
//! the roster and reads its series out of every member. Data enters through the atomics (the data
//! path's adds, unchanged: no lookup, no lock) and leaves through the encoder.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use super::Registry;

/// A counter: only goes up.
#[derive(Debug, Default)]
pub struct Count(AtomicU64);

impl Count {
    /// Adds one; returns the count before.
    pub fn inc(&self) -> u64 {
        self.inc_by(1)
    }

    /// Adds `n`; returns the count before.
    pub fn inc_by(&self, n: u64) -> u64 {
        self.0.fetch_add(n, Ordering::Relaxed)
    }

    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge: how many of something there are now.
#[derive(Debug, Default)]
pub struct Level(AtomicI64);

impl Level {
    /// Adds one; returns the level before.
    pub fn inc(&self) -> i64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes one away; returns the level before.
    pub fn dec(&self) -> i64 {
        self.0.fetch_sub(1, Ordering::Relaxed)
    }

    /// Sets the level; returns the level before.
    pub fn set(&self, level: i64) -> i64 {
        self.0.swap(level, Ordering::Relaxed)
    }

    /// The level now.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where a member keeps one of its counters.
pub type CountField<T> = fn(&T) -> &Count;

/// Encodes one member's series of a family.
type Reader<T> = Box<dyn Fn(&T, MetricEncoder<'_>) -> Result<(), fmt::Error> + Send + Sync>;

/// A family over a roster's members: its name, help, type, and each member's series in it.
pub struct Described<T> {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    /// The label telling one member's series apart (`reason`, `result`...), if it has several.
    label: Option<&'static str>,
    /// Each series: its value of `label` (unused without one), and how to read it.
    series: Vec<(&'static str, Reader<T>)>,
}

impl<T: 'static> Described<T> {
    /// A counter family with one series per member.
    pub fn count(name: &'static str, help: &'static str, field: CountField<T>) -> Self {
        Described::counts(name, help, None, [("", field)])
    }

    /// A counter family with a series per value of `label`, each read by its `field`.
    pub fn counts<const N: usize>(
        name: &'static str,
        help: &'static str,
        label: Option<&'static str>,
        series: [(&'static str, CountField<T>); N],
    ) -> Self {
        let series = series.into_iter().map(|(value, field)| (value, count_reader(field))).collect();
        Described { name, help, kind: MetricType::Counter, label, series }
    }

    /// A gauge family with one series per member.
    pub fn level(name: &'static str, help: &'static str, field: fn(&T) -> &Level) -> Self {
        let read: Reader<T> = Box::new(move |member, mut encoder| encoder.encode_gauge(&field(member).get()));
        Described { name, help, kind: MetricType::Gauge, label: None, series: vec![("", read)] }
    }

    /// A histogram family with one series per member.
    pub fn histogram<H: EncodeMetric + 'static>(name: &'static str, help: &'static str, field: fn(&T) -> &H) -> Self {
        let read: Reader<T> = Box::new(move |member, encoder| field(member).encode(encoder));
        Described { name, help, kind: MetricType::Histogram, label: None, series: vec![("", read)] }
    }

    /// The same family over objects of which `T` is a part (a cluster's breaker counts, say).
    pub fn within<U: 'static>(self, part: fn(&U) -> &T) -> Described<U> {
        let series = self
            .series
            .into_iter()
            .map(|(value, read)| {
                let read: Reader<U> = Box::new(move |whole, encoder| read(part(whole), encoder));
                (value, read)
            })
            .collect();
        Described { name: self.name, help: self.help, kind: self.kind, label: self.label, series }
    }
}

fn count_reader<T: 'static>(field: CountField<T>) -> Reader<T> {
    Box::new(move |member, mut encoder| encoder.encode_counter::<NoLabelSet, _, u64>(&field(member).get(), None))
}

/// Objects' stats by name; clones share them.
pub struct Roster<T> {
    members: Arc<RwLock<HashMap<Arc<str>, Arc<T>>>>,
    /// The label naming the object in every series (`cluster`).
    object: &'static str,
}

impl<T> Clone for Roster<T> {
    fn clone(&self) -> Self {
        Roster { members: self.members.clone(), object: self.object }
    }
}

impl<T> fmt::Debug for Roster<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Roster").field("object", &self.object).field("members", &self.read().len()).finish()
    }
}

impl<T: Send + Sync + 'static> Roster<T> {
    /// An empty roster whose series name their object with the label `object`.
    pub fn new(object: &'static str) -> Self {
        Roster { members: Arc::default(), object }
    }

    /// Declares `family` in `registry`, read from this roster's members.
    pub fn register(&self, registry: &mut Registry, family: Described<T>) {
        let (name, help) = (family.name, family.help);
        registry.register(name, help, Scraped { roster: self.clone(), family });
    }

    /// The stats of `name`, made by `make` if it has none yet.
    pub fn member(&self, name: &str, make: impl FnOnce(Arc<str>) -> T) -> Arc<T> {
        if let Some(stats) = self.read().get(name) {
            return stats.clone();
        }
        let mut members = self.write();
        if let Some(stats) = members.get(name) {
            return stats.clone();
        }
        let name: Arc<str> = name.into();
        let stats = Arc::new(make(name.clone()));
        members.insert(name, stats.clone());
        stats
    }

    /// Drops `name`'s stats from the roster (and so from `/metrics`); `true` if it had some.
    /// Holders of them go on counting, unseen; the name added again starts from zero.
    pub fn remove(&self, name: &str) -> bool {
        super::remove_and_shrink(&self.members, name)
    }
}

impl<T> Roster<T> {
    fn read(&self) -> RwLockReadGuard<'_, HashMap<Arc<str>, Arc<T>>> {
        super::read(&self.members)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<Arc<str>, Arc<T>>> {
        super::write(&self.members)
    }
}

/// One family as the registry sees it.
struct Scraped<T> {
    roster: Roster<T>,
    family: Described<T>,
}

impl<T> fmt::Debug for Scraped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scraped").field("family", &self.family.name).finish()
    }
}

impl<T> EncodeMetric for Scraped<T> {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), fmt::Error> {
        let object = self.roster.object;
        for (name, member) in self.roster.read().iter() {
            for (value, read) in &self.family.series {
                match self.family.label {
                    Some(label) => read(member, encoder.encode_family(&[(object, &**name), (label, *value)])?)?,
                    None => read(member, encoder.encode_family(&[(object, &**name)])?)?,
                }
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        self.family.kind
    }

    fn is_empty(&self) -> bool {
        self.roster.read().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{MIN_CAPACITY, encode, registry};

    #[derive(Debug, Default)]
    struct Part {
        open: Level,
    }

    #[derive(Debug, Default)]
    struct Stats {
        sent: Count,
        refused: Count,
        timeout: Count,
        part: Part,
    }

    fn roster() -> (Registry, Roster<Stats>) {
        let mut registry = registry();
        let roster = Roster::new("cluster");
        roster.register(&mut registry, Described::count("sent", "Sent", |s: &Stats| &s.sent));
        roster.register(
            &mut registry,
            Described::counts(
                "failures",
                "Failures",
                Some("reason"),
                [("refused", |s: &Stats| &s.refused), ("timeout", |s: &Stats| &s.timeout)],
            ),
        );
        roster
            .register(&mut registry, Described::level("open", "Open", |p: &Part| &p.open).within(|s: &Stats| &s.part));
        (registry, roster)
    }

    /// Every member's series show under their families, labelled with its name (and the
    /// family's own label); the same name gets the same stats; a removed member's series go, and
    /// the table's room with them.
    #[test]
    fn members_encode_by_family_and_leave_when_removed() {
        let (registry, roster) = roster();
        assert_eq!(encode(&registry), "# EOF\n", "no member, no family");
        let shop = roster.member("shop", |_| Stats::default());
        shop.sent.inc_by(3);
        shop.timeout.inc();
        shop.part.open.inc();
        assert!(Arc::ptr_eq(&shop, &roster.member("shop", |_| Stats::default())));
        let text = encode(&registry);
        for line in [
            "remora_sent_total{cluster=\"shop\"} 3",
            "remora_failures_total{cluster=\"shop\",reason=\"refused\"} 0",
            "remora_failures_total{cluster=\"shop\",reason=\"timeout\"} 1",
            "remora_open{cluster=\"shop\"} 1",
            "# TYPE remora_open gauge",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        for i in 0..2_000 {
            roster.member(&format!("c{i}"), |_| Stats::default());
        }
        let full = roster.read().capacity();
        for i in 0..2_000 {
            assert!(roster.remove(&format!("c{i}")));
        }
        assert!(!roster.remove("c1"));
        assert!(roster.read().capacity() <= MIN_CAPACITY, "{} of {full} kept", roster.read().capacity());
        assert!(roster.remove("shop"));
        shop.sent.inc();
        assert_eq!(encode(&registry), "# EOF\n");
        assert_eq!(roster.member("shop", |_| Stats::default()).sent.get(), 0, "added again, counts from zero");
    }
}
